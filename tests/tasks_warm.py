"""Task types for the warm-worker tests (loaded through ORCH_TASK_MODULES=tasks_warm).

Each reports its process id first, so a test can tell whether a job ran in the same process as
another and whether the process that ran it still lives. The misbehaving ones stop on their own
after `seconds` (bounded), so a broken watchdog fails a test instead of hanging it.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Annotated, Any

from pydantic import Field

from orchestrator.core.ports import TaskContext
from orchestrator.core.tasktypes import TaskInput, TaskType

SETUPS = 0


class WarmInput(TaskInput):
    seconds: Annotated[float, Field(ge=0, le=120)] = 0


def setup() -> dict[str, int]:
    global SETUPS
    SETUPS += 1
    return {"pid": os.getpid(), "setupNo": SETUPS}


def counted(ctx: TaskContext, inp: WarmInput) -> dict[str, Any]:
    """Reports its pid, sleeps without reporting, returns how often `setup()` ran here."""
    ctx.report(1, "started", {"pid": os.getpid()})
    time.sleep(inp.seconds)
    return {"artifacts": [], "pid": os.getpid(), "setups": SETUPS, "setupPid": ctx.state["pid"]}


def deaf(ctx: TaskContext, inp: WarmInput) -> dict[str, Any]:
    """Ignores every stop: swallows whatever `report`, the watch or RQ's alarm raise."""
    ctx.report(1, "started", {"pid": os.getpid()})
    end = time.monotonic() + inp.seconds
    while time.monotonic() < end:
        try:
            time.sleep(0.05)
            ctx.report(2, "still here")
        except BaseException:  # swallowing every stop is the point of this task
            pass
    return {"artifacts": [], "pid": os.getpid()}


def suicide(ctx: TaskContext, inp: WarmInput) -> dict[str, Any]:
    """Kills its own process, as a segfault or the OOM killer would."""
    ctx.report(1, "started", {"pid": os.getpid()})
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(inp.seconds)
    return {"artifacts": [], "pid": os.getpid()}


def tasks(settings: Any) -> list[TaskType]:
    def t(name: str, handler: Any, queue: str = "generate", timeout_s: int = 300, **kw: Any) -> TaskType:
        return TaskType(name, queue, WarmInput, cost=3, timeout_s=timeout_s, handler=handler, **kw)

    return [
        t("warm.counted", counted, setup=setup),
        t("warm.recycled", counted, queue="train", setup=setup),
        t("warm.deaf", deaf),
        t("warm.overdue", deaf, timeout_s=1),
        t("warm.suicide", suicide),
    ]
