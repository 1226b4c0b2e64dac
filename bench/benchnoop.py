"""The no-op job of the bare RQ baselines (imported by `rq.Worker` through PYTHONPATH=bench)."""


def noop() -> None:
    return None
