"""Uploads as files: what counts as an image, which input strings name a local file, expiry."""

from __future__ import annotations

import os
import time
from pathlib import Path

from orchestrator.core import uploads
from orchestrator.core.artifacts import ArtifactStore

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16


def test_the_type_comes_from_the_bytes_not_the_name():
    assert uploads.sniff_image(PNG) == "image/png"
    assert uploads.sniff_image(b"\xff\xd8\xff\xe0rest") == "image/jpeg"
    assert uploads.sniff_image(b"GIF89a...") == "image/gif"
    assert uploads.sniff_image(b"RIFF\0\0\0\0WEBPVP8 ") == "image/webp"
    for other in (b"<svg/>", b"%PDF-1.7", b"", b"RIFF\0\0\0\0WAVEfmt "):
        assert uploads.sniff_image(other) is None


def test_an_upload_folder_is_per_user_and_never_a_job_id():
    a, b = uploads.upload_folder("key", "user-a"), uploads.upload_folder("key", "user-b")
    assert a != b and a == uploads.upload_folder("key", "user-a") != uploads.upload_folder("other", "user-a")
    assert len(a) == 2 + uploads.FOLDER_CHARS and a.startswith("u_")


def test_local_file_urls_are_found_relative_or_on_our_origin():
    origins = {"https://orch.example.com"}
    inp = {
        "image_url": "/artifacts/job/tok/a.png",
        "more": [{"mask": "https://orch.example.com/artifacts/job/tok/m.png"}, "https://elsewhere.com/artifacts/x/y/z"],
        "text": "see /artifacts/job/tok/a.png",
        "n": 3,
    }
    assert uploads.local_refs(inp, origins) == [
        "/artifacts/job/tok/a.png",
        "https://orch.example.com/artifacts/job/tok/m.png",
    ]
    out = uploads.rewrite(inp, uploads.relative, origins)
    assert out["more"][0]["mask"] == "/artifacts/job/tok/m.png"
    assert out["more"][1] == "https://elsewhere.com/artifacts/x/y/z" and out["text"] == inp["text"]


def test_uploads_are_counted_and_expire_with_retention(tmp_path: Path):
    store = ArtifactStore(tmp_path)
    folder = uploads.upload_folder("key", "user-a")
    old = uploads.save(store, folder, PNG, "image/png")
    new = uploads.save(store, folder, PNG + b"x", "image/png")
    job_artifact = store.save("j" * 22, "out.png", PNG, "image/png")
    assert uploads.used_bytes(store, folder) == 2 * len(PNG) + 1
    old_path = uploads.local_path(store, old["url"])
    assert old_path is not None and old["url"].endswith("/upload.png")
    week_ago = time.time() - 8 * 86400
    job_path = uploads.local_path(store, job_artifact["url"])
    assert job_path is not None
    for path in (old_path, job_path):
        os.utime(path, (week_ago, week_ago))
    assert uploads.expire(store, time.time() - 7 * 86400) == 1
    assert uploads.local_path(store, old["url"]) is None
    assert uploads.local_path(store, new["url"]) is not None
    assert job_path.exists()  # a job's artifacts go with the job's retention, not here
