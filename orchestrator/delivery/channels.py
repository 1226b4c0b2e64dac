"""The durable channels: each writes its outbox row in the transaction of the event it carries
(see orchestrator.core.ports.DurableChannel). A new one (a queue, a chat hook) is a module beside
outbox.py with its `record` and its sender loop, and one line here."""

from __future__ import annotations

from orchestrator.core.ports import DurableChannel
from orchestrator.delivery.outbox import WebhookOutbox


def durable_channels() -> list[DurableChannel]:
    return [WebhookOutbox()]
