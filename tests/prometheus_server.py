"""Run a real Prometheus server (Debian's ``prometheus`` binary) for tests.

``start_prometheus`` derives a config from the project's own ``deploy/prometheus.yml``: the same job
names and scrape settings, but static targets instead of DNS service discovery and a 1 s scrape
interval. The server runs as a subprocess with its storage in a temp dir and is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROJECT_CONFIG = ROOT / "deploy" / "prometheus.yml"
DASHBOARD_SCRIPT = ROOT / "grafana" / "dashboard.py"
SELF_JOB = "prometheus"


class PrometheusError(RuntimeError):
    pass


def prometheus_binary() -> str | None:
    """Path of the ``prometheus`` executable, or None when it is not installed."""
    return shutil.which("prometheus")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def load_dashboard() -> ModuleType:
    """Import ``grafana/dashboard.py`` (not a package) as a module."""
    name = "orchestrator_grafana_dashboard"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, DASHBOARD_SCRIPT)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {DASHBOARD_SCRIPT}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def project_job_names(config: Path = PROJECT_CONFIG) -> list[str]:
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    return [str(job["job_name"]) for job in data.get("scrape_configs", [])]


def _resolve_job(key: str, job_names: Sequence[str]) -> str:
    """``"api"`` → ``"orchestrator-api"``: a key is a job name, or what a job name ends with."""
    if key in job_names:
        return key
    matches = [name for name in job_names if name.endswith(f"-{key}") or name.endswith(f"_{key}")]
    if len(matches) != 1:
        raise ValueError(f"no single scrape job in {PROJECT_CONFIG.name} matches {key!r}: {list(job_names)}")
    return matches[0]


def adapted_config(
    targets: Mapping[str, Sequence[str]],
    port: int,
    *,
    config: Path = PROJECT_CONFIG,
    scrape_interval: str = "1s",
) -> dict[str, Any]:
    """The project's Prometheus config with static ``targets`` per job (keyed by job name or suffix).

    Jobs given no targets are left out, except Prometheus's own job, which scrapes this server.
    """
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    jobs: list[dict[str, Any]] = data.get("scrape_configs", [])
    names = [str(job["job_name"]) for job in jobs]
    wanted: dict[str, list[str]] = {}
    for key, hosts in targets.items():
        wanted.setdefault(_resolve_job(key, names), []).extend(hosts)
    wanted.setdefault(SELF_JOB, []).append(f"127.0.0.1:{port}")

    scrape_configs: list[dict[str, Any]] = []
    for job in jobs:
        name = str(job["job_name"])
        if not wanted.get(name):
            continue
        adapted = {key: value for key, value in job.items() if not key.endswith("_sd_configs")}
        adapted.pop("static_configs", None)
        adapted.pop("scrape_interval", None)
        adapted.pop("scrape_timeout", None)
        adapted["static_configs"] = [{"targets": list(wanted[name])}]
        scrape_configs.append(adapted)

    global_config = dict(data.get("global") or {})
    global_config.update(
        scrape_interval=scrape_interval, scrape_timeout=scrape_interval, evaluation_interval=scrape_interval
    )
    return {"global": global_config, "scrape_configs": scrape_configs}


class PrometheusServer:
    """A running Prometheus; ``query`` evaluates PromQL through its HTTP API, ``stop`` ends it."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, workdir: Path, log_path: Path) -> None:
        self.process = process
        self.pid = process.pid
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.workdir = workdir
        self.log_path = log_path
        self.config_path = workdir / "prometheus.yml"
        self._client = httpx.Client(base_url=self.url, timeout=10.0)

    def _api(self, path: str, params: Mapping[str, str | float] | None = None) -> Any:
        response = self._client.get(path, params=params)
        body = response.json()
        if response.status_code != 200 or body.get("status") != "success":
            raise PrometheusError(f"{path} {dict(params or {})}: {response.status_code} {body}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query: the ``result`` list (vector samples; a scalar comes back as one sample)."""
        params: dict[str, str | float] = {"query": expr}
        if at is not None:
            params["time"] = at
        data = self._api("/api/v1/query", params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def value(self, expr: str, at: float | None = None) -> float | None:
        """The single value of ``expr`` (summed if it has several series), or None without data."""
        result = self.query(expr, at)
        if not result:
            return None
        return sum(float(sample["value"][1]) for sample in result)

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets, as in ``/api/v1/targets``."""
        return list(self._api("/api/v1/targets", {"state": "active"})["activeTargets"])

    def wait_for_targets(self, timeout: float = 30.0) -> None:
        """Wait until every target has been scraped successfully at least once."""

        def all_up() -> bool:
            targets = self.targets()
            return bool(targets) and all(target.get("health") == "up" for target in targets)

        self.wait_until(all_up, timeout, "scrape targets never all came up")

    def wait_until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            if predicate():
                return
            if time.monotonic() > deadline:
                detail = ""
                with contextlib.suppress(Exception):
                    detail = f"; targets: {self.targets()}"
                raise PrometheusError(f"{what} within {timeout} s{detail}")
            time.sleep(0.25)

    def _check_alive(self) -> None:
        if self.process.poll() is not None:
            raise PrometheusError(f"prometheus exited with {self.process.returncode}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM this server's PID, SIGKILL it if it has not exited within ``timeout``."""
        self._client.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)

    def __enter__(self) -> PrometheusServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_prometheus(
    targets: Mapping[str, Sequence[str]],
    port: int,
    tmp_dir: Path,
    *,
    config: Path = PROJECT_CONFIG,
    scrape_interval: str = "1s",
    ready_timeout: float = 30.0,
) -> PrometheusServer:
    """Start Prometheus on ``127.0.0.1:port`` scraping ``targets`` and wait until it is ready.

    ``targets`` maps a job of the project's prometheus.yml (``"orchestrator-api"``, or just ``"api"``) to
    ``host:port`` strings, e.g. ``{"api": ["127.0.0.1:8081"], "worker": ["127.0.0.1:9101"]}``.
    Prometheus always scrapes itself too (job ``prometheus``). Raises PrometheusError if the binary
    is missing, exits, or is not ready within ``ready_timeout`` seconds.
    """
    binary = prometheus_binary()
    if binary is None:
        raise PrometheusError("the prometheus binary is not installed (apt-get install -y prometheus)")
    workdir = Path(tmp_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "prometheus.yml"
    config_path.write_text(
        yaml.safe_dump(adapted_config(targets, port, config=config, scrape_interval=scrape_interval)),
        encoding="utf-8",
    )
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
    server = PrometheusServer(process, port, workdir, log_path)

    def ready() -> bool:
        try:
            return httpx.get(f"{server.url}/-/ready", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        server.wait_until(ready, ready_timeout, "prometheus was not ready")
    except BaseException:
        server.stop()
        raise
    return server
