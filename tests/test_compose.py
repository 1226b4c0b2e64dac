"""compose.yaml, Dockerfile, Prometheus and Grafana configs agree with the CLI, the settings and each other.

Nothing here can run Docker, so these checks read the files.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import skip_or_fail

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
PROMETHEUS_YML = ROOT / "deploy" / "prometheus.yml"
DOCKERFILE = ROOT / "Dockerfile"

# From the contract's "Processes and configuration".
SUBCOMMANDS = {"serve": set[str](), "worker": {"--queues", "--burst"}}
QUEUES = {"train", "generate"}
SETTINGS = {
    "REDIS_URL",
    "DATABASE_URL",
    "ORCH_HOST",
    "ORCH_PORT",
    "ORCH_DATA_DIR",
    "ORCH_PUBLIC_URL",
    "ORCH_WEBHOOK_ALLOW_PRIVATE",
    "ORCH_WEBHOOK_RETRY_SCHEDULE",
    "ORCH_WORKER_LOST_AFTER",
    "ORCH_METRICS_PORT",
    "FAL_KEY",
}
EXPECTED_SERVICES = {"redis", "postgres", "api", "worker", "prometheus", "grafana"}
PUBLISHED = {"api": 8080, "prometheus": 9090, "grafana": 3000}


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = _load(COMPOSE)
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


@pytest.fixture(scope="module")
def prometheus_config() -> dict[str, Any]:
    data = _load(PROMETHEUS_YML)
    assert isinstance(data, dict)
    return data


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    if command is None:
        return []
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def _env(service: dict[str, Any]) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = [item.split("=", 1) for item in env]
        return {pair[0]: (pair[1] if len(pair) == 2 else None) for pair in pairs}
    return {str(key): (None if value is None else str(value)) for key, value in env.items()}


def _project_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Services that run the project's image (built from the Dockerfile)."""
    return {name: svc for name, svc in services.items() if "build" in svc}


def _published_ports(service: dict[str, Any]) -> dict[int, int]:
    """container port → host port."""
    result: dict[int, int] = {}
    for port in service.get("ports", []):
        if isinstance(port, dict):
            result[int(port["target"])] = int(str(port.get("published", port["target"])))
            continue
        parts = str(port).split("/")[0].split(":")
        result[int(parts[-1])] = int(parts[-2]) if len(parts) > 1 else int(parts[-1])
    return result


def _options(args: list[str]) -> dict[str, str | None]:
    options: dict[str, str | None] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        assert arg.startswith("--"), f"unexpected positional argument {arg!r} in {args}"
        if "=" in arg:
            key, value = arg.split("=", 1)
            options[key] = value
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            options[arg] = args[i + 1]
            i += 1
        else:
            options[arg] = None
        i += 1
    return options


def test_all_services_present(services: dict[str, dict[str, Any]]) -> None:
    assert EXPECTED_SERVICES <= set(services)


def test_project_services_use_known_subcommands(services: dict[str, dict[str, Any]]) -> None:
    project = _project_services(services)
    assert set(project) == {"api", "worker"}
    expected = {"api": "serve", "worker": "worker"}
    for name, service in project.items():
        command = _command(service)
        assert command[:1] == ["orchestrator"], f"{name}: {command}"
        subcommand = command[1]
        assert subcommand == expected[name], f"{name} runs {subcommand!r}"
        options = _options(command[2:])
        assert set(options) <= SUBCOMMANDS[subcommand], f"{name}: unknown options {options}"
        if "--queues" in options:
            queues = set(str(options["--queues"]).split(","))
            assert queues <= QUEUES, queues


def test_commands_accepted_by_the_real_cli(services: dict[str, dict[str, Any]]) -> None:
    """Each project service's options appear in ``orchestrator SUBCOMMAND --help`` of the installed CLI."""
    entry = Path(sys.executable).parent / "orchestrator"
    if not entry.exists():
        skip_or_fail("the orchestrator entry point is not installed in this environment")
    for name, service in _project_services(services).items():
        command = _command(service)
        result = subprocess.run(
            [str(entry), command[1], "--help"], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, f"{name}: {command[1]} --help failed:\n{result.stderr}"
        for option in _options(command[2:]):
            assert option in result.stdout, f"{name}: {option} not in `orchestrator {command[1]} --help`"


def test_project_env_names_are_settings(services: dict[str, dict[str, Any]]) -> None:
    for name, service in _project_services(services).items():
        unknown = set(_env(service)) - SETTINGS
        assert not unknown, f"{name}: unknown settings {sorted(unknown)}"


def test_project_env_points_at_compose_services(services: dict[str, dict[str, Any]]) -> None:
    pg = _env(services["postgres"])
    user, password, db = pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"]
    for name, service in _project_services(services).items():
        env = _env(service)
        assert env["REDIS_URL"] is not None and re.fullmatch(r"redis://redis:6379(/\d+)?", env["REDIS_URL"])
        assert env["DATABASE_URL"] == f"postgresql+asyncpg://{user}:{password}@postgres:5432/{db}", name
        assert env.get("ORCH_HOST") == "0.0.0.0", f"{name} must listen on every interface in a container"
        depends = service.get("depends_on") or {}
        for dependency in ("redis", "postgres"):
            assert depends.get(dependency, {}).get("condition") == "service_healthy", (name, dependency)


def test_api_port(services: dict[str, dict[str, Any]]) -> None:
    env = _env(services["api"])
    assert env.get("ORCH_PORT", "8080") == "8080"
    assert _published_ports(services["api"]) == {8080: 8080}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_ports(services: dict[str, dict[str, Any]], name: str) -> None:
    assert _published_ports(services[name]).get(PUBLISHED[name]) == PUBLISHED[name]


def test_worker_publishes_no_host_port(services: dict[str, dict[str, Any]]) -> None:
    # Several replicas cannot share a host port; Prometheus reaches them on the compose network.
    assert not services["worker"].get("ports")


@pytest.mark.parametrize("name", sorted(EXPECTED_SERVICES))
def test_healthchecks(services: dict[str, dict[str, Any]], name: str) -> None:
    check = services[name].get("healthcheck")
    assert check and check.get("test") and not check.get("disable"), f"{name} has no health check"


def test_health_checks_probe_the_right_endpoints(services: dict[str, dict[str, Any]]) -> None:
    api_test = " ".join(services["api"]["healthcheck"]["test"])
    assert "/readyz" in api_test and ":8080" in api_test
    worker_test = " ".join(services["worker"]["healthcheck"]["test"])
    assert f":{_env(services['worker'])['ORCH_METRICS_PORT']}/metrics" in worker_test


def test_worker_replicas(services: dict[str, dict[str, Any]]) -> None:
    assert int(services["worker"]["deploy"]["replicas"]) >= 2
    assert _env(services["worker"]).get("ORCH_METRICS_PORT") not in (None, "", "0")


def test_redis_persists(services: dict[str, dict[str, Any]]) -> None:
    command = _command(services["redis"])
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert any(str(v).split(":")[1] == "/data" for v in services["redis"]["volumes"])
    assert any(str(v).endswith("/var/lib/postgresql/data") for v in services["postgres"]["volumes"])


def test_artifacts_shared_between_api_and_workers(services: dict[str, dict[str, Any]]) -> None:
    for name in ("api", "worker"):
        data_dir = _env(services[name])["ORCH_DATA_DIR"]
        assert f"artifacts:{data_dir}" in services[name]["volumes"], name


def test_relative_mounts_exist(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"


def _mount_target(service: dict[str, Any], source: str) -> str:
    for volume in service.get("volumes", []):
        parts = str(volume).split(":")
        if (ROOT / parts[0]).resolve() == (ROOT / source).resolve():
            return parts[1]
    raise AssertionError(f"{source} is not mounted")


def test_prometheus_scrapes_api_and_workers(
    services: dict[str, dict[str, Any]], prometheus_config: dict[str, Any]
) -> None:
    prom = services["prometheus"]
    config_in_container = _mount_target(prom, "deploy/prometheus.yml")
    assert f"--config.file={config_in_container}" in _command(prom)

    wanted = {
        "api": int(_env(services["api"]).get("ORCH_PORT") or 8080),
        "worker": int(_env(services["worker"])["ORCH_METRICS_PORT"] or 0),
    }
    found: dict[str, int] = {}
    for job in prometheus_config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for sd in job.get("dns_sd_configs", []):
            assert sd.get("type", "SRV") == "A", "plain compose has no SRV records"
            for host in sd["names"]:
                found[host] = int(sd["port"])
    assert found == wanted
    for host in wanted:
        assert host in services


def test_grafana_provisioning(services: dict[str, dict[str, Any]]) -> None:
    grafana = services["grafana"]
    env = _env(grafana)
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert _mount_target(grafana, "grafana/provisioning") == "/etc/grafana/provisioning"
    dashboards_dir = _mount_target(grafana, "grafana/dashboards")

    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home is not None and home.startswith(dashboards_dir + "/")
    assert (ROOT / "grafana" / "dashboards" / home.removeprefix(dashboards_dir + "/")).is_file()

    providers = _load(ROOT / "grafana/provisioning/dashboards/dashboards.yml")["providers"]
    assert [p["options"]["path"] for p in providers] == [dashboards_dir]
    assert all(p["type"] == "file" for p in providers)

    datasources = _load(ROOT / "grafana/provisioning/datasources/prometheus.yml")["datasources"]
    (prometheus,) = datasources
    assert prometheus["type"] == "prometheus" and prometheus["uid"] == "prometheus"
    assert prometheus["url"] == f"http://prometheus:{PUBLISHED['prometheus']}"


def test_dockerfile() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    # the hash-checked runtime lock, then the project alone (tests/test_install.py runs that install)
    assert re.search(r"pip install --require-hashes -r requirements\.lock(\s|$)", text)
    assert re.search(r"pip install --no-deps \.(\s|$)", text)
    assert lines[-1] == 'CMD ["orchestrator", "serve"]'

    copied = {part.rstrip("/") for line in lines if line.startswith("COPY ") for part in line.split()[1:-1]}
    for source in copied:
        assert (ROOT / source).exists() or source == "README.md", f"COPY {source}: missing"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        assert package in copied, f"the Dockerfile does not copy package {package}"
    readme = pyproject["project"].get("readme")
    if isinstance(readme, str):
        assert readme in copied, "pyproject's readme must be in the build context"

    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()]
    for source in copied:
        assert source not in ignored, f".dockerignore excludes {source}, which the Dockerfile copies"
