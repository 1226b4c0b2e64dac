"""Artifacts live in the data dir under an unguessable path and are served without headers.

The URL is `/artifacts/{jobId}/{token}/{filename}`: the job id and a 128-bit token are both
random, so knowing one artifact's URL tells nothing about another's. Several machines must share
the data dir (a volume) for API processes to serve what workers wrote.
"""

from __future__ import annotations

import re
import secrets
import shutil
from pathlib import Path
from typing import Any

from orchestrator.settings import private_dir

SAFE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")
"""A file name: no path separators, no leading dot (so never `.` or `..`)."""
SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""A job id or token (URL-safe base64: may start with `-` or `_`)."""


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def save(self, job_id: str, filename: str, content: bytes, content_type: str) -> dict[str, Any]:
        if not SAFE_NAME.match(filename):
            raise ValueError(f"unsafe artifact name {filename!r}")
        token = secrets.token_urlsafe(16)
        folder = self.root / job_id / token
        private_dir(folder)
        tmp = folder / f".{filename}.tmp"
        tmp.write_bytes(content)
        tmp.replace(folder / filename)
        return {
            "url": f"/artifacts/{job_id}/{token}/{filename}",
            "contentType": content_type,
            "bytes": len(content),
        }

    def path(self, job_id: str, token: str, filename: str) -> Path | None:
        if not (SAFE_ID.match(job_id) and SAFE_ID.match(token) and SAFE_NAME.match(filename)):
            return None
        p = self.root / job_id / token / filename
        return p if p.is_file() else None

    def remove_job(self, job_id: str) -> None:
        if SAFE_ID.match(job_id):
            shutil.rmtree(self.root / job_id, ignore_errors=True)
