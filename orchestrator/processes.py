"""Process control shared by the supervisors (`dev`, `serve`, `worker`) and the tests: the process
tree, read from /proc, to stop a child with everything it started (a child may lead a session of
its own, out of reach of its group), and children that die with their parent."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (none where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, frontier = [], [pid]
    while frontier:
        for child in children.get(frontier.pop(), []):
            out.append(child)
            frontier.append(child)
    return out


def die_with_parent() -> None:
    """preexec_fn (Linux): SIGTERM this child when the thread that started it ends."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def parent_death_signal() -> Callable[[], None] | None:
    """`die_with_parent` when called on the main thread; None elsewhere, since the signal follows
    the starting thread (a worker thread of asyncio.to_thread ends long before the process)."""
    return die_with_parent if threading.current_thread() is threading.main_thread() else None
