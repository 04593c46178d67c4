"""``bastion``: run the local platform, mint tokens, build models."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from bastion_common.settings import JwtSettings
from bastion_common.tokens import mint

READY_TIMEOUT_S = 600.0


def cmd_token(args: argparse.Namespace) -> int:
    settings = JwtSettings()
    print(
        mint(
            settings.jwt_key(),
            subject=args.sub,
            role=args.role,
            tenant=args.tenant,
            issuer=settings.jwt_issuer,
            ttl_s=args.ttl,
        )
    )
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    if args.kind == "tiny":
        from bastion_worker.tiny_model import build

        print(build(Path(args.path)))
    else:
        from bastion_worker.demo_model import prepare

        print(prepare(Path(args.path)))
    return 0


@contextlib.contextmanager
def _redis(url: str, data_dir: Path) -> Iterator[str]:
    """The Redis at ``url`` when it answers, else an embedded Valkey for this run."""
    from bastion_cli.stack import embedded_valkey, redis_answers

    if redis_answers(url):
        yield url
        return
    print(f"No Redis at {url}; starting an embedded Valkey.", flush=True)
    with embedded_valkey(data_dir / "valkey") as embedded_url:
        yield embedded_url


def cmd_run(args: argparse.Namespace) -> int:
    from bastion_auditor.settings import AuditorSettings
    from bastion_cli.stack import Stack
    from bastion_common import logs
    from bastion_gateway.settings import GatewaySettings

    settings = JwtSettings()
    log = logs.setup("launcher", settings.log_level)
    data_dir = settings.data_dir.resolve()
    model_path = args.model_path
    if model_path is None:
        from bastion_worker.demo_model import prepare

        log.info("preparing the demo model (converted once, then reused)")
        model_path = prepare(data_dir / "models")

    def _stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    with _redis(settings.redis_url.get_secret_value(), data_dir) as redis_url:
        env = {
            "BASTION_REDIS_URL": redis_url,
            "BASTION_DATA_DIR": str(data_dir),
            "BASTION_MODEL_PATH": str(Path(model_path).resolve()),
            "BASTION_PORT": str(args.port or GatewaySettings().port),
            "BASTION_AUDITOR_PORT": str(args.auditor_port or AuditorSettings().auditor_port),
        }
        stack = Stack(env)
        try:
            stack.start()
            stack.wait_ready(READY_TIMEOUT_S)
            token = mint(
                settings.jwt_key(),
                subject="demo",
                role="admin",
                tenant="default",
                issuer=settings.jwt_issuer,
                ttl_s=86400,
            )
            _print_welcome(stack.gateway_url, Path(model_path).name, token)
            while True:
                stack.check_alive()
                time.sleep(1.0)
        except KeyboardInterrupt:
            print("\nStopping Bastion...", flush=True)
        except (RuntimeError, TimeoutError) as exc:
            log.error("%s", exc)
            return 1
        finally:
            stack.stop()
    return 0


def _print_welcome(url: str, model: str, token: str) -> None:
    print(
        f"""
Bastion is up at {url}   (model: {model})

Try it:
  curl -s {url}/v1/chat/completions \\
    -H "Authorization: Bearer {token}" \\
    -H "Content-Type: application/json" \\
    -d '{{"model": "{model}", "max_tokens": 32,
         "messages": [{{"role": "user", "content": "Say hello."}}]}}'

Mint another token:  .venv/bin/bastion token --sub alice --role user
Press Ctrl-C to stop.
""",
        flush=True,
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bastion", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    token = sub.add_parser("token", help="mint a bearer token for the local deployment")
    token.add_argument("--sub", required=True, help="the subject (user or service name)")
    token.add_argument("--role", default="user", help="role claim (admin, user, auditor)")
    token.add_argument("--tenant", default="default", help="tenant claim")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    token.set_defaults(func=cmd_token)
    run = sub.add_parser("run", help="start the whole platform on this machine")
    run.add_argument("--model-path", type=Path, default=None, help="a HF model folder")
    run.add_argument("--port", type=int, default=None, help="gateway port (BASTION_PORT, 8080)")
    run.add_argument(
        "--auditor-port", type=int, default=None, help="audit API port (BASTION_AUDITOR_PORT, 8090)"
    )
    run.set_defaults(func=cmd_run)
    model = sub.add_parser("model", help="build the tiny test model or convert the demo model")
    model.add_argument("kind", choices=["tiny", "demo"])
    model.add_argument("path", help="tiny: the model folder; demo: the models folder")
    model.set_defaults(func=cmd_model)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
