"""Task types used by the fault tests (loaded through ORCH_TASK_MODULES=flaky_tasks)."""

from __future__ import annotations

import time
from typing import Annotated, Any

from pydantic import Field

from orchestrator.core.ports import TaskContext
from orchestrator.core.tasktypes import TaskError, TaskInput, TaskType


class FlakyInput(TaskInput):
    fail_attempts: Annotated[int, Field(ge=0, le=10)] = 1
    seconds: Annotated[float, Field(ge=0, le=60)] = 0


def flaky(ctx: TaskContext, inp: FlakyInput) -> dict[str, Any]:
    """Fails with a retryable provider-like error on its first `failAttempts` attempts."""
    ctx.report(10, f"attempt {ctx.attempt}", {"attempt": ctx.attempt})
    time.sleep(inp.seconds)
    if ctx.attempt <= inp.fail_attempts:
        raise TaskError(f"upstream answered 503 on attempt {ctx.attempt}", code="PROVIDER_ERROR", retryable=True)
    return {"artifacts": [], "attempt": ctx.attempt}


def tasks(settings: Any) -> list[TaskType]:
    return [
        TaskType(
            name="flaky",
            queue="generate",
            input_model=FlakyInput,
            cost=1,
            timeout_s=60,
            handler=flaky,
            max_attempts=3,
            retry_backoff_s=(0.2, 0.4),
        )
    ]
