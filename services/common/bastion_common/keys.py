"""Every Redis key, stream and consumer-group name Bastion uses, in one place.

All names hang off one prefix (``BASTION_KEY_PREFIX``), so that several
deployments, or several test runs, can share one Redis without seeing each other.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

WORKER_GROUP = "workers"
AUDITOR_GROUP = "auditors"

# A worker refreshes its registration this often, and it expires after the TTL.
WORKER_HEARTBEAT_S = 2.0
WORKER_TTL_S = 10
# A result stream nobody reads any more disappears after this long, and so
# does the mark that a request's answer has begun.
RESULT_TTL_S = 120
# A cancel mark lives this long; the worker checks it between decode steps.
CANCEL_TTL_S = 300


def part(value: str) -> str:
    """``value`` as one part of a key: ``:`` and ``%`` escaped, so that values
    joined with ``:`` never spell another combination's key."""
    return urllib.parse.quote(value, safe="")


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "bastion"

    def requests(self, model: str) -> str:
        """Stream of generation requests for one model, read by the worker group."""
        return f"{self.prefix}:req:{model}"

    def results(self, reader_id: str) -> str:
        """One gateway's stream of results for every request it waits on: an
        entry holds one record per request (the field is the request's id); a
        request's records come in order and end with exactly one final record."""
        return f"{self.prefix}:res:{reader_id}"

    def answered(self, request_id: str) -> str:
        """Set while a worker sends a request's answer, so that a worker taking
        the request over from one that stopped does not answer it again."""
        return f"{self.prefix}:answered:{request_id}"

    def cancel(self, request_id: str) -> str:
        """Set when the client went away; the worker stops that sequence."""
        return f"{self.prefix}:cancel:{request_id}"

    def worker(self, model: str, worker_id: str) -> str:
        """A live worker's registration; expires unless refreshed."""
        return f"{self.prefix}:worker:{model}:{worker_id}"

    def worker_pattern(self) -> str:
        return f"{self.prefix}:worker:*"

    @property
    def audit(self) -> str:
        """Stream of audit events, read by the auditor group."""
        return f"{self.prefix}:audit"

    @property
    def audit_dead(self) -> str:
        """Audit entries the auditor could not parse, kept for inspection."""
        return f"{self.prefix}:audit:dead"

    @property
    def dead_letters(self) -> str:
        """Hash of requests per model that were delivered too often to be tried
        again (the worker's dead-letter count; ids and text are not kept)."""
        return f"{self.prefix}:stats:dead_letters"

    def api_key(self, key_id: str) -> str:
        """An API key's record (hash, tenant, role, limits); never the key itself."""
        return f"{self.prefix}:apikey:{key_id}"

    def limit(self, scope: str, name: str) -> str:
        """Rate-limit state of one scope (principal or tenant) and one limit."""
        return f"{self.prefix}:limit:{scope}:{name}"

    def tenant_baseline(self, tenant: str) -> str:
        """The guard's running statistics of a tenant's prompt sizes (numbers only)."""
        return f"{self.prefix}:guard:baseline:{tenant}"

    def model_of_worker_key(self, key: str) -> str:
        """The model name inside a key made by :meth:`worker`."""
        head = f"{self.prefix}:worker:"
        return key[len(head) :].rsplit(":", 1)[0]
