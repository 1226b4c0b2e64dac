"""`sleep`: the diagnostic task. Waits, reports `ticks` evenly spaced events, can fail on purpose."""

from __future__ import annotations

import time
from typing import Annotated, Any

from pydantic import Field

from orchestrator.core.ports import TaskContext
from orchestrator.core.tasktypes import TaskError, TaskInput, TaskType


class SleepInput(TaskInput):
    seconds: Annotated[float, Field(ge=0, le=3600)] = 1
    ticks: Annotated[int, Field(ge=0, le=1000)] = 10
    fail: bool = False


def run(ctx: TaskContext, inp: SleepInput) -> dict[str, Any]:
    if inp.ticks == 0:
        time.sleep(inp.seconds)
    else:
        interval = inp.seconds / inp.ticks
        start = time.monotonic()
        for tick in range(1, inp.ticks + 1):
            delay = start + tick * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            ctx.report(100.0 * tick / inp.ticks, f"tick {tick}/{inp.ticks}", {"tick": tick})
    if inp.fail:
        raise TaskError("sleep was asked to fail")
    return {"artifacts": [], "seconds": inp.seconds}


TASK = TaskType(
    name="sleep",
    queue="generate",
    input_model=SleepInput,
    cost=1,
    timeout_s=3660,
    handler=run,
    description="Diagnostic: wait, report ticks, optionally fail.",
)
