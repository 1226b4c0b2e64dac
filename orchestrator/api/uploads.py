"""`POST /api/uploads`: a user's input file (an image), stored like an artifact (see uploads.py).

The body is the file itself with its `Content-Type`, or `multipart/form-data` with one file part.
Its type is decided by its content; only images are taken, up to ORCH_MAX_UPLOAD_BYTES, within
the user's ORCH_UPLOAD_QUOTA_BYTES.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

from orchestrator.core import uploads
from orchestrator.errors import ApiError, BadRequest, PayloadTooLarge
from orchestrator.web import Route, core, full_access, json_response


class UnsupportedMediaType(ApiError):
    status, code = 415, "UNSUPPORTED_MEDIA_TYPE"


class Upload(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    url: str
    content_type: str
    bytes: int


async def create_upload(request: web.Request) -> web.Response:
    user = await full_access(request)
    c = core(request)
    limit = c.settings.max_upload_bytes
    if request.content_length is not None and request.content_length > limit + 64 * 1024:
        raise PayloadTooLarge(f"uploads are at most {limit} bytes")
    content = await _read_file(request, limit)
    if not content:
        raise BadRequest("the upload is empty")
    ctype = uploads.sniff_image(content)
    if ctype is None:
        raise UnsupportedMediaType("the upload is not an image (PNG, JPEG, GIF or WebP, by its content)")
    folder = uploads.upload_folder(c.settings.signing_key, user.user_id)
    used = await asyncio.to_thread(uploads.used_bytes, c.artifacts, folder)
    if used + len(content) > c.settings.upload_quota_bytes:
        raise PayloadTooLarge(
            f"your uploads would exceed the quota of {c.settings.upload_quota_bytes} bytes",
            code="UPLOAD_QUOTA_EXCEEDED",
            details={"usedBytes": used, "quotaBytes": c.settings.upload_quota_bytes},
        )
    saved = await asyncio.to_thread(uploads.save, c.artifacts, folder, content, ctype)
    return json_response(saved, status=201, headers={"Location": saved["url"]})


async def _read_file(request: web.Request, limit: int) -> bytes:
    if request.content_type.startswith("multipart/"):
        try:
            reader = await request.multipart()
            while True:
                part = await reader.next()
                if part is None:
                    raise BadRequest("the multipart body has no file part")
                if isinstance(part, BodyPartReader) and part.filename is not None:
                    return await _read_limited(part.read_chunk, limit)
        except (ValueError, HttpProcessingError) as exc:  # malformed multipart (bad part headers)
            raise BadRequest("unreadable multipart body") from exc
    return await _read_limited(request.content.read, limit)


async def _read_limited(read: Any, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await read(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"uploads are at most {limit} bytes")
        chunks.append(chunk)


ROUTES: list[Route] = [
    Route(
        "POST",
        "/api/uploads",
        create_upload,
        "Upload an input image (raw body with its Content-Type, or multipart); name its url in a job input",
        Upload,
        201,
        tag="uploads",
    ),
]
