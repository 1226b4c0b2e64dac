"""The `orchestrator` command: dev, serve, worker, users, submit, watch."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys

from pydantic import ValidationError

from orchestrator.settings import Settings


def _serve(settings: Settings, processes: int = 1, reuse_port: bool = False) -> int:
    if processes > 1:
        from orchestrator.serve import supervise

        return supervise(processes)
    from aiohttp import web

    from orchestrator.app import create_app

    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        access_log=None,
        handle_signals=True,
        shutdown_timeout=5,
        print=None,
        reuse_port=reuse_port or None,
    )
    return 0


def _processes(v: str) -> int:
    n = _at_least_one(v)
    if n > 64:
        raise argparse.ArgumentTypeError("must be 1..64")
    return n


def _at_least_one(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def _users(args: argparse.Namespace, settings: Settings) -> int:
    from orchestrator.core import accounts
    from orchestrator.errors import ApiError
    from orchestrator.store.db import Database

    async def run() -> int:
        db = Database(settings.db_url)
        try:
            await db.create_schema()
            if args.users_cmd == "create":
                user = await accounts.create_user(db, args.name, args.credits, signing_key=settings.signing_key)
                if args.json:
                    print(json.dumps(user.as_json()))
                else:
                    print(f"user {user.name} ({user.user_id}) with {user.credits} credits")
                    print(f"API key:        {user.api_key}   (shown once: keep it)")
                    print(f"webhook secret: {user.webhook_secret}")
            else:
                balance = await accounts.add_credits(db, args.name, args.amount)
                print(f"{args.name}: {balance} credits")
            return 0
        except ApiError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return 1
        finally:
            await db.dispose()

    return asyncio.run(run())


def _credits(v: str, low: int) -> int:
    from orchestrator.core.accounts import MAX_CREDIT

    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r} is not a whole number") from None
    if not low <= n <= MAX_CREDIT:
        raise argparse.ArgumentTypeError(f"credits must be {low}..{MAX_CREDIT}, not {v}")
    return n


def _positive_credits(v: str) -> int:
    return _credits(v, 0)


def _top_up(v: str) -> int:
    """A top-up adds credits: 1..MAX_CREDIT (argparse exits 2 with the message otherwise)."""
    return _credits(v, 1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orchestrator", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    dev = sub.add_parser("dev", help="Redis, SQLite, the API and workers on this machine")
    dev.add_argument("--workers", type=int, default=2, help="worker processes (2)")
    dev.add_argument("--port", type=_at_least_one, help="the API's port (else ORCH_PORT, 8080)")
    dev.add_argument(
        "--redis-port", type=_at_least_one, help="the embedded Redis's port (else ORCH_REDIS_PORT, any free)"
    )
    dev.add_argument("--data-dir", help="SQLite, Redis data, artifacts, keys (else ORCH_DATA_DIR, ./.orchestrator)")
    serve = sub.add_parser("serve", help="the API and WebSocket gateway")
    serve.add_argument(
        "--processes",
        type=_processes,
        default=1,
        help="API processes sharing the port (SO_REUSEPORT), each a full API and gateway (default 1)",
    )
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    w = sub.add_parser("worker", help="one warm RQ worker process, under a supervisor that restarts it")
    w.add_argument("--queues", default="train,generate")
    w.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    w.add_argument("--max-jobs", type=_at_least_one, default=0, help="start a fresh process after N jobs")
    users = sub.add_parser("users", help="manage users")
    usub = users.add_subparsers(dest="users_cmd", required=True)
    uc = usub.add_parser("create")
    uc.add_argument("name")
    uc.add_argument("--credits", type=_positive_credits, default=0)
    uc.add_argument("--json", action="store_true")
    ucr = usub.add_parser("credit")
    ucr.add_argument("name")
    ucr.add_argument("amount", type=_top_up)
    s = sub.add_parser("submit", help="submit a job (reads ORCH_URL and ORCH_API_KEY)")
    s.add_argument("queue", choices=["train", "generate"])
    s.add_argument("--type", dest="type_")
    s.add_argument("--input", default="{}", help="the input as JSON")
    s.add_argument("--wait", action="store_true", help="follow it live; exit 0 on completed, 1 otherwise")
    s.add_argument("--json", action="store_true", help="with --wait: print the full job resource at the end")
    wa = sub.add_parser("watch", help="follow a job live until it ends")
    wa.add_argument("job_id")
    wa.add_argument("--json", action="store_true", help="print the full job resource at the end")
    return p


def _dev_flags_to_env(args: argparse.Namespace) -> None:
    """`dev`'s flags win over the environment, for this process and the children it starts."""
    for flag, var in (("port", "ORCH_PORT"), ("redis_port", "ORCH_REDIS_PORT"), ("data_dir", "ORCH_DATA_DIR")):
        value = getattr(args, flag)
        if value is not None:
            os.environ[var] = str(value)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "dev":
        _dev_flags_to_env(args)
    try:
        settings = Settings()
    except ValidationError as exc:
        for err in exc.errors():
            print(f"orchestrator: bad setting: {err['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.cmd == "dev":
        from orchestrator.dev.stack import run_dev

        return run_dev(settings, args.workers)
    if args.cmd == "serve":
        return _serve(settings, args.processes, args.reuse_port)
    if args.cmd == "worker":
        from queues.supervisor import run_worker

        queues = [q.strip() for q in args.queues.split(",") if q.strip()]
        return run_worker(settings, queues, args.burst, args.max_jobs)
    if args.cmd == "users":
        return _users(args, settings)
    from orchestrator.client import cli as client_cli

    if args.cmd == "submit":
        return client_cli.submit(args.queue, args.type_, args.input, args.wait, args.json)
    return client_cli.watch(args.job_id, args.json)


if __name__ == "__main__":
    sys.exit(main())
