"""Experiment: `orchestrator serve` moves all surviving objects to the permanent generation every
5 s (gc.freeze), so full collections no longer walk every socket's objects. Logs pauses too."""

import gc
import os
import sys
import threading
import time
from typing import Any

if "serve" in sys.argv:
    _start = [0.0]
    _log = open(os.path.join(os.environ.get("BENCH_GC_LOG_DIR", "/tmp"), f"gc-{os.getpid()}.log"), "a", buffering=1)

    def _cb(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            _start[0] = time.perf_counter()
            return
        ms = (time.perf_counter() - _start[0]) * 1000
        if ms > 2:
            _log.write(f"{time.time():.3f} gen{info['generation']} {ms:.1f}ms\n")

    gc.callbacks.append(_cb)

    def _freezer() -> None:
        while True:
            time.sleep(5)
            gc.freeze()

    threading.Thread(target=_freezer, daemon=True).start()
