"""The webhook SSRF guard: a URL must be http(s) and resolve only to public addresses."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from orchestrator.errors import ValidationFailed


class ForbiddenUrl(ValidationFailed):
    code = "WEBHOOK_URL_FORBIDDEN"


def is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            ip = embedded
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local)


def _invalid(message: str) -> ValidationFailed:
    return ValidationFailed(message, details=[{"field": "webhookUrl", "message": "invalid URL"}])


def check_syntax(url: str) -> tuple[str, int]:
    """The host and port of an http(s) URL; ValidationFailed (422) for anything else, never
    another exception (urlsplit raises ValueError on a bad bracketed host such as `[::1`)."""
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError as exc:
        raise _invalid(f"webhookUrl is not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https") or not hostname:
        raise _invalid("webhookUrl must be an http or https URL")
    if parts.username or parts.password:
        raise ForbiddenUrl("webhookUrl must not carry credentials")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise _invalid("webhookUrl has an invalid port") from exc
    return hostname, port


async def check_url(url: str, allow_private: bool) -> None:
    """Return when the URL may be called; otherwise raise ValidationFailed (422: a malformed URL)
    or its subclass ForbiddenUrl (a host that does not resolve, or resolves to a non-public
    address). Nothing else escapes: the idna codec's UnicodeError (`a..b`, a label over 63
    characters) and getaddrinfo's ValueError (a NUL in the host) count as "does not resolve"."""
    host, port = check_syntax(url)
    if allow_private:
        return
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
        addrs = [ip]
    except ValueError:
        try:
            infos = await asyncio.wait_for(
                asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout=5
            )
        except (OSError, TimeoutError, ValueError) as exc:  # UnicodeError is a ValueError
            raise ForbiddenUrl(f"webhookUrl host {host!r} does not resolve") from exc
        addrs = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    bad = [str(a) for a in addrs if not is_public(a)]
    if bad or not addrs:
        raise ForbiddenUrl(f"webhookUrl resolves to a non-public address ({', '.join(bad) or 'none'})")


class PublicOnlyResolver(AbstractResolver):
    """Resolves like aiohttp's default resolver but refuses non-public addresses, so a name that
    starts resolving to a private address between the check and the connect is not reached."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        bad = [r["host"] for r in found if not is_public(ipaddress.ip_address(r["host"].split("%")[0]))]
        if bad:
            raise ForbiddenUrl(f"webhookUrl resolves to a non-public address ({', '.join(bad)})")
        return found

    async def close(self) -> None:
        await self._inner.close()
