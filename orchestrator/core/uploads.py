"""Uploaded input files, and the rule for naming local files in a job's input.

An upload is stored in the artifact store like an artifact: `/artifacts/{folder}/{token}/{name}`,
where `folder` is the owner's upload folder, an HMAC of the user id under the secret key (so
neither the URL nor the folder says whose it is, and nobody else can name one), and `token` is
128 random bits. A user's uploads are the files of that one folder, which gives the quota
(`ORCH_UPLOAD_QUOTA_BYTES`) by a directory walk and their expiry (`expire`, from the sweeper) by
file age, as artifacts expire with `ORCH_RETENTION_DAYS`.

A job input may name a local file (an upload, or an artifact of one of the caller's jobs) by its
URL, relative (`/artifacts/…`) or absolute on this API's own origin. `own_files` checks at submit
that each one exists and is the caller's (404 otherwise, as for a foreign job) and rewrites it
to the relative form; a provider (fal) then reads the file from the store (`local_path`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.core import jobs
from orchestrator.core.artifacts import SAFE_ID, ArtifactStore
from orchestrator.errors import NotFound, ValidationFailed

if TYPE_CHECKING:
    from orchestrator.core.services import Core

LOCAL_URL = re.compile(r"^(?P<origin>https?://[^/?#]+)?/artifacts/(?P<a>[^/?#]+)/(?P<b>[^/?#]+)/(?P<c>[^/?#]+)$")
MAX_WALK_DEPTH = 8
MAX_REFS = 20
"""Local files one job input may name."""

IMAGE_TYPES: dict[str, tuple[bytes, ...]] = {
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/gif": (b"GIF87a", b"GIF89a"),
}
FOLDER_CHARS = 24
"""An upload folder is `u_` + 24 characters: never a job id (22)."""
EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/gif": "gif", "image/webp": "webp"}


def sniff_image(content: bytes) -> str | None:
    """The image type the bytes are (by their magic number), or None: the name and the claimed
    Content-Type are not trusted."""
    for ctype, magics in IMAGE_TYPES.items():
        if any(content.startswith(m) for m in magics):
            return ctype
    if content[:4] == b"RIFF" and content[8:12] == b"WEBP":
        return "image/webp"
    return None


def upload_folder(signing_key: str, user_id: str) -> str:
    mac = hmac.new(signing_key.encode(), b"uploads\0" + user_id.encode(), hashlib.sha256).digest()
    return "u_" + base64.urlsafe_b64encode(mac[:18]).decode()


def used_bytes(store: ArtifactStore, folder: str) -> int:
    root = store.root / folder
    if not root.is_dir():
        return 0
    return sum(p.stat().st_size for p in root.glob("*/*") if p.is_file())


def save(store: ArtifactStore, folder: str, content: bytes, content_type: str) -> dict[str, Any]:
    return store.save(folder, f"upload.{EXTENSIONS.get(content_type, 'bin')}", content, content_type)


def expire(store: ArtifactStore, older_than: float) -> int:
    """Removes uploads last written before `older_than` (unix s); returns how many."""
    removed = 0
    if not store.root.is_dir():
        return 0
    for folder in store.root.glob("u_" + "?" * FOLDER_CHARS):
        for token_dir in list(folder.iterdir()) if folder.is_dir() else []:
            files = [p for p in token_dir.iterdir()] if token_dir.is_dir() else []
            if files and all(p.stat().st_mtime < older_than for p in files):
                for p in files:
                    p.unlink(missing_ok=True)
                token_dir.rmdir()
                removed += 1
    return removed


def local_refs(value: Any, origins: Iterable[str], depth: int = 0) -> list[str]:
    """Every string in `value` that names a local file (relative, or absolute on `origins`)."""
    found: list[str] = []
    if depth > MAX_WALK_DEPTH:
        return found
    if isinstance(value, str):
        m = LOCAL_URL.match(value)
        if m and (m.group("origin") is None or m.group("origin").rstrip("/") in origins):
            found.append(value)
    elif isinstance(value, dict):
        for v in value.values():
            found += local_refs(v, origins, depth + 1)
    elif isinstance(value, list):
        for v in value:
            found += local_refs(v, origins, depth + 1)
    return found


def relative(url: str) -> str:
    m = LOCAL_URL.match(url)
    assert m is not None
    return f"/artifacts/{m.group('a')}/{m.group('b')}/{m.group('c')}"


def local_path(store: ArtifactStore, url: str) -> Path | None:
    m = LOCAL_URL.match(url)
    return store.path(m.group("a"), m.group("b"), m.group("c")) if m else None


def rewrite(value: Any, change: Callable[[str], str], origins: Iterable[str], depth: int = 0) -> Any:
    """`value` with each local file URL replaced by `change(url)`."""
    if depth > MAX_WALK_DEPTH:
        return value
    if isinstance(value, str):
        return change(value) if local_refs(value, origins) else value
    if isinstance(value, dict):
        return {k: rewrite(v, change, origins, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [rewrite(v, change, origins, depth + 1) for v in value]
    return value


def owner_check(url: str, own_folder: str) -> tuple[str, bool]:
    """(the job id or folder the URL names, whether it is the caller's upload folder)."""
    m = LOCAL_URL.match(url)
    assert m is not None
    first = m.group("a")
    return first, first == own_folder and SAFE_ID.match(first) is not None


async def own_input_files(c: Core, user_id: str, inp: dict[str, Any], origins: set[str]) -> dict[str, Any]:
    """The input with each local file URL checked (it exists and is the caller's, else 404)
    and made relative; unchanged when it names none."""
    refs = local_refs(inp, origins)
    if not refs:
        return inp
    if len(refs) > MAX_REFS:
        raise ValidationFailed(f"an input names at most {MAX_REFS} files")
    own = upload_folder(c.settings.signing_key, user_id)
    for url in refs:
        first, is_own_upload = owner_check(url, own)
        if not is_own_upload:
            await jobs.get_job(c.db, first, user_id)  # NotFound for another user's job
        if await asyncio.to_thread(local_path, c.artifacts, url) is None:
            raise NotFound(f"file not found: {relative(url)}")
    out: dict[str, Any] = rewrite(inp, relative, origins)
    return out
