"""Job types: each declares its queue, input model, cost, timeout and handler. The registry of a
process is built by queues.registry (the built-in types, fal's, and ORCH_TASK_MODULES)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

if TYPE_CHECKING:
    from orchestrator.core.ports import TaskContext

QUEUES = ("train", "generate")


class TaskInput(BaseModel):
    """Base for task inputs: camelCase on the wire, unknown fields refused."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class TaskError(Exception):
    """A task failed in a way the user should see (error code TASK_ERROR unless given)."""

    def __init__(self, message: str, code: str = "TASK_ERROR", retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.retryable = retryable


Handler = Callable[["TaskContext", Any], dict[str, Any]]
Setup = Callable[[], Any]


@dataclass(frozen=True)
class TaskType:
    name: str
    queue: str
    input_model: type[BaseModel]
    cost: int
    timeout_s: int
    handler: Handler
    max_attempts: int = 1
    """Attempts in all, counting the first; retryable errors and lost workers use the rest."""
    retry_backoff_s: tuple[float, ...] = (2.0, 10.0, 60.0)
    description: str = ""
    deferred_start: bool = False
    """The handler hands the job to a provider and the job starts when the provider says so
    (the runner neither starts nor finishes it)."""
    extra: dict[str, Any] = field(default_factory=dict)
    setup: Setup | None = None
    """Run once per worker process, before its first job of this type (where a model's weights
    load); the handler finds the result in `ctx.state`. An exception fails that job and the next
    job of the type tries again."""

    def backoff_s(self, attempt: int) -> float:
        idx = min(max(attempt - 1, 0), len(self.retry_backoff_s) - 1)
        return self.retry_backoff_s[idx]

    def describe(self) -> dict[str, Any]:
        schema = self.input_model.model_json_schema(by_alias=True)
        return {
            "type": self.name,
            "queue": self.queue,
            "cost": self.cost,
            "timeoutSeconds": self.timeout_s,
            "inputSchema": schema,
        }


class Registry:
    def __init__(self) -> None:
        self._types: dict[str, TaskType] = {}

    def add(self, task: TaskType) -> None:
        if task.queue not in QUEUES:
            raise ValueError(f"unknown queue {task.queue!r}")
        self._types[task.name] = task

    def get(self, name: str) -> TaskType | None:
        return self._types.get(name)

    def all(self) -> list[TaskType]:
        return list(self._types.values())

    def any_deferred_start(self) -> bool:
        return any(t.deferred_start for t in self._types.values())

    def configured(self, costs: dict[str, int], timeouts: dict[str, int], attempts: dict[str, int]) -> Registry:
        """A copy with costs, timeouts and attempts overridden from settings."""
        out = Registry()
        for t in self._types.values():
            out.add(
                replace(
                    t,
                    cost=costs.get(t.name, t.cost),
                    timeout_s=timeouts.get(t.name, t.timeout_s),
                    max_attempts=attempts.get(t.name, t.max_attempts),
                )
            )
        return out
