"""The install as it ships (issue 12): a clean venv with only `requirements.lock` (hash-checked,
no dev extras) and the project (`--no-deps`), exactly as the Dockerfile installs it, then the
image's commands from that venv, from a directory outside the source tree: `orchestrator users
create`, `serve` and `worker` against a real Redis and a real Postgres, and a job of each
built-in type submitted and completed.

The venv is built once per lock file (kept under the system temp dir by the lock's hash, built
aside and renamed into place), so the SQLite and Postgres passes of ./scripts/test share it; the
project itself is installed into it afresh on every run, and the test checks that the venv holds
nothing but the lock's pins and the project."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support import ROOT, Postgres, _stop, track, wait_http

from orchestrator.dev.redis_server import RedisServer, free_port
from orchestrator.states import FINAL

LOCK = ROOT / "requirements.lock"


def _pins(lock: Path) -> set[str]:
    """Lower-cased names of the packages the lock pins for this Python."""
    out = set()
    for line in lock.read_text().splitlines():
        if line and not line[0].isspace() and not line.startswith("#") and "==" in line:
            name, _, rest = line.partition("==")
            marker = rest.partition(";")[2].split("\\")[0].strip()
            if not marker or _marker_holds(marker):
                out.add(name.strip().lower().replace("_", "-"))
    return out


def _marker_holds(marker: str) -> bool:
    from packaging.markers import Marker

    return Marker(marker).evaluate()


def _runtime_venv() -> Path:
    """A venv holding exactly requirements.lock, built once per lock content (under a file lock:
    two runs at once build it once)."""
    digest = hashlib.sha256(LOCK.read_bytes()).hexdigest()[:16]
    home = Path(tempfile.gettempdir()) / "orchestrator-install-test"
    venv = home / f"venv-{digest}-py{sys.version_info.major}{sys.version_info.minor}"
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (venv / ".complete").exists():
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
            done = subprocess.run(
                [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--require-hashes", "-r", str(LOCK)],
                capture_output=True,
                text=True,
                timeout=900,
            )
            assert done.returncode == 0, done.stderr[-3000:]
            (venv / ".complete").touch()
    return venv


@pytest.fixture(scope="module")
def venv() -> Path:
    return _runtime_venv()


@pytest.fixture(scope="module")
def pg(postgres: Postgres | None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    """The session's Postgres when the run has one, else one of this module's own."""
    if postgres is not None:
        yield postgres
        return
    own = Postgres(tmp_path_factory.mktemp("pg-install")).start()
    try:
        yield own
    finally:
        own.stop()


def test_the_runtime_lock_and_project_run_every_built_in_type(venv: Path, pg: Postgres, tmp_path: Path):
    py = venv / "bin" / "python"
    # the project with --no-deps on top of the lock, as the Dockerfile does
    done = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    freeze = subprocess.run([str(py), "-m", "pip", "freeze", "--all"], capture_output=True, text=True, check=True)
    installed = {
        line.split("==")[0].split(" @ ")[0].strip().lower().replace("_", "-")
        for line in freeze.stdout.splitlines()
        if line.strip()
    }
    extra = installed - _pins(LOCK) - {"orchestrator", "pip", "setuptools", "wheel"}
    assert extra == set(), f"the venv holds what the lock does not pin: {sorted(extra)}"
    check = subprocess.run([str(py), "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    where = subprocess.run(
        [str(py), "-c", "import orchestrator, queues; print(orchestrator.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    )
    assert where.stdout.startswith(str(venv)), where.stdout
    no_dev = subprocess.run([str(py), "-c", "import pytest"], capture_output=True, cwd=tmp_path)
    assert no_dev.returncode != 0, "a dev dependency (pytest) is installed: the runtime lock is not alone"

    redis = RedisServer(tmp_path / "redis").start()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "PYTHON", "VIRTUAL_ENV"))}
    env |= {
        "PATH": f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}",
        "REDIS_URL": redis.url,
        "DATABASE_URL": pg.create_db("install_" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:10]),
        "ORCH_DATA_DIR": str(tmp_path / "data"),
        "ORCH_PORT": str(port),
        "ORCH_LOG_LEVEL": "WARNING",
    }
    exe = str(venv / "bin" / "orchestrator")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        created = subprocess.run(
            [exe, "users", "create", "alice", "--credits", "1000", "--json"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert created.returncode == 0, created.stderr[-3000:]
        key = json.loads(created.stdout.strip().splitlines()[-1])["apiKey"]
        for args, log in (([exe, "serve"], "serve.log"), ([exe, "worker"], "worker.log")):
            procs.append(
                track(
                    subprocess.Popen(
                        args,
                        env=env,
                        cwd=tmp_path,
                        stdout=open(tmp_path / log, "ab"),
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            )
        wait_http(f"http://127.0.0.1:{port}/healthz", procs[0], timeout_s=60)
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}, timeout=30
        ) as client:
            assert client.get("/readyz").status_code == 200
            submits = [
                ("train", {"type": "lora", "input": {"name": "tiny", "steps": 2, "rank": 2}}),
                ("generate", {"type": "image", "input": {"prompt": "a fox", "width": 64, "height": 64, "steps": 1}}),
                ("generate", {"type": "sleep", "input": {"seconds": 0, "ticks": 2}}),
            ]
            jobs = []
            for queue, body in submits:
                r = client.post(f"/api/{queue}", json=body)
                assert r.status_code == 202, r.text
                jobs.append(r.json()["jobId"])
            finished = {}
            deadline = time.monotonic() + 180
            while len(finished) < len(jobs):
                assert time.monotonic() < deadline, f"not finished in time: {set(jobs) - set(finished)}"
                for job_id in jobs:
                    if job_id not in finished:
                        job = client.get(f"/api/jobs/{job_id}", params={"waitSeconds": 2}).json()
                        if job["status"] in FINAL:
                            finished[job_id] = job
            for job_id in jobs:
                job = finished[job_id]
                assert job["status"] == "completed", (job, (tmp_path / "worker.log").read_text()[-3000:])
            for job_id in jobs[:2]:
                artifact = finished[job_id]["result"]["artifacts"][0]
                got = httpx.get(f"http://127.0.0.1:{port}{artifact['url']}", timeout=30)
                assert got.status_code == 200 and len(got.content) == artifact["bytes"]
    finally:
        for proc in procs:
            _stop(proc, signal.SIGTERM)
        redis.stop()
