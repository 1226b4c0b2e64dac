"""`image`: renders a PNG with Pillow in `steps` passes, each refining the picture.

`setup()` loads the caption font once per worker process (Pillow's built-in FreeType font,
about 7 ms a job otherwise)."""

from __future__ import annotations

import hashlib
import io
from typing import Annotated, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from pydantic import Field

from orchestrator.core.ports import TaskContext
from orchestrator.core.tasktypes import TaskInput, TaskType


class ImageInput(TaskInput):
    prompt: Annotated[str, Field(min_length=1, max_length=2000)]
    width: Annotated[int, Field(ge=64, le=2048)] = 512
    height: Annotated[int, Field(ge=64, le=2048)] = 512
    steps: Annotated[int, Field(ge=1, le=200)] = 20
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0


def load_font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default()


def render(ctx: TaskContext, inp: ImageInput) -> dict[str, Any]:
    digest = hashlib.sha256(f"{inp.prompt}\0{inp.seed}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "big"))
    w, h = inp.width, inp.height
    # A base gradient between two colours drawn from the prompt.
    c1 = np.array(list(digest[8:11]), dtype=np.float32)
    c2 = np.array(list(digest[11:14]), dtype=np.float32)
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    canvas = (c1 * (1 - t) + c2 * t) * np.ones((h, w, 3), dtype=np.float32)
    img = Image.fromarray(canvas.astype(np.uint8), "RGB")
    for step in range(1, inp.steps + 1):
        layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
        draw = ImageDraw.Draw(layer)
        for _ in range(8):
            cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
            r = int(rng.integers(max(4, min(w, h) // 40), max(8, min(w, h) // 6)))
            colour = (*(int(x) for x in rng.integers(0, 256, 3)), int(40 + 120 * step / inp.steps))
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        img = Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB")
        img = img.filter(ImageFilter.GaussianBlur(radius=max(0.0, 3.0 * (1 - step / inp.steps))))
        ctx.report(100.0 * step / inp.steps, f"pass {step}/{inp.steps}", {"step": step})
    font = ctx.state if ctx.state is not None else load_font()
    ImageDraw.Draw(img).text((8, h - 16), inp.prompt[:80], fill=(255, 255, 255), font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    artifact = ctx.artifact("image.png", buf.getvalue(), "image/png")
    return {"artifacts": [artifact], "width": w, "height": h}


TASK = TaskType(
    name="image",
    queue="generate",
    input_model=ImageInput,
    cost=2,
    timeout_s=600,
    handler=render,
    setup=load_font,
    max_attempts=2,
    description="Render a PNG with Pillow in `steps` passes.",
)
