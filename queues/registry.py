"""The registry of this deployment: the built-in types (queues/tasks), fal.* types when FAL_KEY is
set, and the types of every module named in ORCH_TASK_MODULES."""

from __future__ import annotations

import importlib

from orchestrator.core.tasktypes import Registry, TaskError, TaskInput, TaskType
from orchestrator.settings import Settings

__all__ = ["BUILT_IN", "Registry", "TaskError", "TaskInput", "TaskType", "build_registry"]
"""TaskType, TaskInput and TaskError are also importable from here, where task modules found them
before they moved to orchestrator.core.tasktypes."""

BUILT_IN = ("queues.tasks.lora", "queues.tasks.image", "queues.tasks.sleep")


def build_registry(settings: Settings) -> Registry:
    """The built-in types, fal.* types when FAL_KEY is set, and the types of every module named in
    ORCH_TASK_MODULES (each module exposes `TASK` or `tasks(settings) -> list[TaskType]`)."""
    modules = list(BUILT_IN)
    if settings.fal_key:
        modules.append("orchestrator.fal.tasks")
    modules += [m.strip() for m in settings.task_modules.split(",") if m.strip()]
    reg = Registry()
    for name in modules:
        mod = importlib.import_module(name)
        found = mod.tasks(settings) if hasattr(mod, "tasks") else [mod.TASK]
        for task in found:
            reg.add(task)
    return reg.configured(settings.task_costs, settings.task_timeouts, settings.task_max_attempts)
