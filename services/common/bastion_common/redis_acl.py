"""A Redis ACL user per service, holding only the commands and keys it needs.

Every service trusts what it reads from Redis, so each gets the least it can
work with: the worker cannot read API keys or touch the audit stream, only the
gateway adds requests, only the auditor consumes audit events, the guard sees
nothing but its tenants' prompt-size statistics. Rules use Redis 7's
selectors, so that one user can hold, say, read-write access to one stream
and append-only access to another.

``bastion run`` and the end-to-end tests create these users (``provision``)
with passwords kept under ``var/keys/``, and give each service a URL with its
own user (``service_url``).
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from pathlib import Path

import redis

from bastion_common.keys import Keys
from bastion_common.tokens import load_or_create_key

SERVICES = ("gateway", "guard", "worker", "auditor")
# What every client needs to connect and say it is alive.
_CONNECTION = "+auth +hello +ping +select +quit +echo +client|setname +client|id"


def user_name(keys: Keys, service: str) -> str:
    return f"{keys.prefix}-{service}"


def rules(keys: Keys, service: str) -> list[str]:
    """The ACL SETUSER rules of ``service``'s user (its password apart)."""
    p = keys.prefix
    root = ["reset", "on", "resetchannels", "-@all", *_CONNECTION.split()]
    selectors: dict[str, list[str]] = {
        "gateway": [
            f"+xadd +xdel ~{p}:req:*",  # queues requests, withdraws abandoned ones
            f"+xread +xtrim +xdel +del ~{p}:res:*",  # reads its results
            f"+get +set ~{p}:apikey:*",
            f"+set ~{p}:cancel:*",
            f"+get ~{p}:worker:*",
            f"+hgetall ~{p}:stats:*",
            f"+xadd %W~{p}:audit",  # appends audit events, never reads them
            # The rate limiter's script, and what it calls.
            f"+evalsha +eval +hmget +hget +hset +pexpire +zremrangebyscore +zcard +zadd "
            f"+zrem +get +incrby +decrby +exists ~{p}:limit:*",
        ],
        "guard": [f"+evalsha +eval +hmget +hset +expire ~{p}:guard:*"],
        "worker": [
            f"+xreadgroup +xack +xdel +xpending +xclaim +xgroup|create ~{p}:req:*",
            f"+xadd +expire %W~{p}:res:*",  # answers, never reads another's results
            f"+set +del +exists ~{p}:answered:*",
            f"+mget %R~{p}:cancel:*",
            f"+set +del +exists ~{p}:worker:*",
            f"+hincrby ~{p}:stats:*",
        ],
        "auditor": [
            f"+xreadgroup +xack +xdel +xgroup|create ~{p}:audit",
            f"+xadd %W~{p}:audit:dead",
        ],
    }
    keyless = {
        "gateway": ["+scan", "+time", "+script|load"],  # the worker registry; the scripts
        "guard": ["+time", "+script|load"],
        "worker": [],
        "auditor": [],
    }
    return root + keyless[service] + [f"({s})" for s in selectors[service]]


def passwords(directory: Path) -> dict[str, str]:
    """Each service's Redis password, made on first use under ``directory``."""
    return {s: load_or_create_key(directory / f"redis-{s}.pass") for s in SERVICES}


def provision(client: redis.Redis, keys: Keys, secrets: Mapping[str, str]) -> None:
    """Create (or reset) every service's user on the Redis ``client`` talks to."""
    for service in SERVICES:
        name = user_name(keys, service)
        client.execute_command(
            "ACL", "SETUSER", name, *rules(keys, service), f">{secrets[service]}"
        )


def service_urls(admin_url: str, keys: Keys, secrets: Mapping[str, str]) -> dict[str, str]:
    """Create every service's user through ``admin_url``; each service's URL."""
    with redis.Redis.from_url(admin_url) as admin:
        provision(admin, keys, secrets)
    return {s: service_url(admin_url, user_name(keys, s), secrets[s]) for s in SERVICES}


def remove(client: redis.Redis, keys: Keys) -> None:
    client.execute_command("ACL", "DELUSER", *(user_name(keys, s) for s in SERVICES))


def service_url(url: str, user: str, password: str) -> str:
    """``url`` with ``user`` and ``password`` as its credentials."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}@"
    netloc += f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
