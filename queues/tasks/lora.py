"""`lora`: trains a rank-r LoRA adapter with numpy (Adam) and writes it as `.safetensors`.

The frozen base layer W is the "model": `setup()` builds it once per worker process (where a
real trainer would load the base model's weights) and every job trains against it. A hidden
rank-r change ΔW is drawn from the job's seed; the adapter (B @ A, with B starting at zero as in
LoRA) learns ΔW from synthetic inputs, so the loss falls.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import Field
from safetensors.numpy import save

from orchestrator.core.ports import TaskContext
from orchestrator.core.tasktypes import TaskInput, TaskType

DIM = 128
BATCH = 256
BASE_SEED = 20261202


@dataclass(frozen=True)
class Base:
    w: np.ndarray[Any, np.dtype[np.float32]]
    """The frozen base layer, shared by every job in the process (never written)."""


def load_base() -> Base:
    w = np.random.default_rng(BASE_SEED).normal(0, 1 / np.sqrt(DIM), (DIM, DIM)).astype(np.float32)
    w.setflags(write=False)
    return Base(w)


class LoraInput(TaskInput):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    steps: Annotated[int, Field(ge=1, le=100_000)] = 200
    rank: Annotated[int, Field(ge=1, le=64)] = 4
    learning_rate: Annotated[float, Field(gt=0, le=10)] = 0.01
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0


def train(ctx: TaskContext, inp: LoraInput) -> dict[str, Any]:
    base: Base = ctx.state if isinstance(ctx.state, Base) else load_base()
    w = base.w
    rng = np.random.default_rng(inp.seed)
    true_b = rng.normal(0, 0.5, (DIM, inp.rank)).astype(np.float32)
    true_a = rng.normal(0, 0.5, (inp.rank, DIM)).astype(np.float32)
    target = w + true_b @ true_a / np.sqrt(DIM)

    a = rng.normal(0, 1 / np.sqrt(DIM), (inp.rank, DIM)).astype(np.float32)
    b = np.zeros((DIM, inp.rank), dtype=np.float32)
    params = [a, b]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8

    every = max(1, inp.steps // 100)
    loss = float("nan")
    started = time.monotonic()
    for step in range(1, inp.steps + 1):
        x = rng.normal(0, 1, (BATCH, DIM)).astype(np.float32)
        y = x @ target.T + rng.normal(0, 0.1, (BATCH, DIM)).astype(np.float32)
        err = x @ (w + b @ a).T - y  # (BATCH, DIM)
        loss = float(np.mean(err**2))
        g_delta = (2.0 / err.size) * err.T @ x  # d loss / d (B A)
        grads = [b.T @ g_delta, g_delta @ a.T]
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            m_hat = m[i] / (1 - beta1**step)
            v_hat = v[i] / (1 - beta2**step)
            p -= inp.learning_rate * m_hat / (np.sqrt(v_hat) + eps)
        if step % every == 0 or step == inp.steps:
            ctx.report(
                100.0 * step / inp.steps,
                f"step {step}/{inp.steps}",
                {"step": step, "loss": round(loss, 6)},
            )

    metadata = {
        "format": "pt",
        "name": inp.name,
        "rank": str(inp.rank),
        "alpha": str(inp.rank),
        "steps": str(inp.steps),
        "finalLoss": repr(loss),
        "trainSeconds": f"{time.monotonic() - started:.3f}",
        "config": json.dumps(inp.model_dump(by_alias=True)),
    }
    blob = save(
        {
            "base_model.model.layer.lora_A.weight": np.ascontiguousarray(a),
            "base_model.model.layer.lora_B.weight": np.ascontiguousarray(b),
        },
        metadata=metadata,
    )
    artifact = ctx.artifact(f"{inp.name}.safetensors", bytes(io.BytesIO(blob).getbuffer()), "application/octet-stream")
    return {"artifacts": [artifact], "finalLoss": loss, "steps": inp.steps}


TASK = TaskType(
    name="lora",
    queue="train",
    input_model=LoraInput,
    cost=10,
    timeout_s=3600,
    handler=train,
    setup=load_base,
    max_attempts=2,
    description="Train a rank-r LoRA adapter on the CPU with numpy; yields a .safetensors file.",
)
