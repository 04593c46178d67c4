"""``bastion``: run the local platform, mint tokens, build models."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from bastion_common.settings import JwtSettings
from bastion_common.settings import load as load_settings
from bastion_common.tokens import mint

READY_TIMEOUT_S = 600.0
SUPERVISE_EVERY_S = 0.5
DEMO_TOKEN_TTL_S = 3600


def cmd_token(args: argparse.Namespace) -> int:
    settings = load_settings(JwtSettings)
    if args.ttl > settings.jwt_max_lifetime_s:
        print(
            f"bastion: --ttl may be at most {settings.jwt_max_lifetime_s:.0f} s "
            "(BASTION_JWT_MAX_LIFETIME_S); the gateway refuses longer-lived tokens",
            file=sys.stderr,
        )
        return 2
    print(
        mint(
            settings.jwt_key(),
            subject=args.sub,
            role=args.role,
            tenant=args.tenant,
            issuer=settings.jwt_issuer,
            ttl_s=args.ttl,
            audience=settings.jwt_audience,
        )
    )
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """API keys, straight in the deployment's Redis (the admin API does the same over HTTP)."""
    import asyncio
    import json

    import redis.asyncio as aioredis

    from bastion_gateway.apikeys import ApiKeyStore

    settings = load_settings(JwtSettings)

    async def run() -> int:
        redis = aioredis.from_url(settings.redis_url.get_secret_value(), decode_responses=True)
        store = ApiKeyStore(redis, settings.keys)
        try:
            if args.action == "create":
                if args.role not in settings.policy().roles:
                    print(f"bastion: there is no role {args.role!r}", file=sys.stderr)
                    return 2
                key, record = await store.create(
                    name=args.name,
                    tenant=args.tenant,
                    role=args.role,
                    models=tuple(args.model) if args.model else None,
                    ttl_s=args.ttl,
                )
                print(json.dumps({"key": key, **record.public()}, indent=2))
                print("Store the key now: it is not shown again.", file=sys.stderr)
            elif args.action == "list":
                for record in await store.list():
                    print(json.dumps(record.public()))
            else:
                print(json.dumps((await store.revoke(args.key_id)).public()))
        finally:
            await redis.aclose()
        return 0

    return asyncio.run(run())


def cmd_model(args: argparse.Namespace) -> int:
    if args.kind == "tiny":
        from bastion_worker.model.tiny_model import build

        print(build(Path(args.path)))
    else:
        from bastion_worker.model.demo_model import prepare

        print(prepare(Path(args.path)))
    return 0


@contextlib.contextmanager
def _redis(url: str, data_dir: Path) -> Iterator[str]:
    """The Redis at ``url`` when it answers, else an embedded Valkey for this run."""
    from bastion_cli.stack import embedded_valkey, redis_answers

    if redis_answers(url):
        yield url
        return
    from bastion_common.tokens import load_or_create_key

    print(f"No Redis at {url}; starting an embedded Valkey.", flush=True)
    password = load_or_create_key(data_dir / "keys" / "redis-admin.pass")
    with embedded_valkey(data_dir / "valkey", password=password) as embedded_url:
        yield embedded_url


def cmd_run(args: argparse.Namespace) -> int:
    from bastion_auditor.settings import AuditorSettings
    from bastion_cli.stack import Stack, Supervisor
    from bastion_common import logs
    from bastion_common.tls import ensure_local_tls

    settings = load_settings(JwtSettings)
    log = logs.setup("launcher", settings.log_level)
    data_dir = settings.data_dir.resolve()
    model_path = args.model_path
    if model_path is None:
        from bastion_worker.model.demo_model import prepare

        log.info("preparing the demo model (converted once, then reused)")
        model_path = prepare(data_dir / "models")

    def _stop(signum: int, frame: object) -> None:
        # Once: a second signal (a wrapper forwarding the first, an impatient
        # Ctrl-C) must not break off the stop and leave services running.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    # SIGINT too: a shell that starts the launcher in the background leaves
    # SIGINT ignored, and Python then installs no handler of its own.
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    tls = ensure_local_tls(data_dir / "tls")
    with _redis(settings.redis_url.get_secret_value(), data_dir) as redis_url:
        env = {
            "BASTION_REDIS_URL": redis_url,
            "BASTION_DATA_DIR": str(data_dir),
            "BASTION_MODEL_PATH": str(Path(model_path).resolve()),
            "BASTION_PORT": str(args.port),
            "BASTION_TLS_CERT_FILE": str(tls.cert),
            "BASTION_TLS_KEY_FILE": str(tls.key),
            # The internal hops too: the guard's gRPC with mutual TLS, the auditor's API.
            "BASTION_INTERNAL_TLS_CA": str(tls.ca_cert),
            "BASTION_AUDITOR_PORT": str(args.auditor_port or AuditorSettings().auditor_port),
        }
        # The local secret signs the tokens `bastion token` mints; on one
        # machine it is the identity provider, unless the environment says otherwise.
        env.setdefault("BASTION_JWT_LOCAL_KEY", os.environ.get("BASTION_JWT_LOCAL_KEY", "true"))
        if "BASTION_MODELS" not in os.environ:
            # Until the worker has loaded it, the model is unavailable (503), not unknown (404).
            served = os.environ.get("BASTION_MODEL_NAME") or Path(model_path).name
            env["BASTION_MODELS"] = json.dumps([served])
        service_env = {
            s: {"BASTION_REDIS_URL": url} for s, url in _service_users(redis_url, settings).items()
        }
        # The internal certificate's key goes only to the services on those hops.
        for name in ("gateway", "guard", "auditor"):
            service_env.setdefault(name, {}).update(
                BASTION_INTERNAL_TLS_CERT=str(tls.internal_cert),
                BASTION_INTERNAL_TLS_KEY=str(tls.internal_key),
            )
        stack = Stack(env, ca_file=tls.ca_cert, service_env=service_env)
        try:
            stack.start()
            stack.wait_ready(READY_TIMEOUT_S)
            # A short-lived user token to try it with; never an admin token on a terminal.
            token = mint(
                settings.jwt_key(),
                subject="demo",
                role="user",
                tenant="default",
                issuer=settings.jwt_issuer,
                ttl_s=DEMO_TOKEN_TTL_S,
                audience=settings.jwt_audience,
            )
            _print_welcome(stack.gateway_url, Path(model_path).name, token, tls.ca_cert)
            supervisor = Supervisor(stack)
            while True:  # until Ctrl-C or SIGTERM
                supervisor.poll()
                time.sleep(SUPERVISE_EVERY_S)
        except KeyboardInterrupt:
            print("\nStopping Bastion...", flush=True)
        except (RuntimeError, TimeoutError) as exc:
            log.error("%s", exc)
            return 1
        finally:
            stack.stop()
    return 0


def _service_users(admin_url: str, settings: JwtSettings) -> dict[str, str]:
    """Each service's Redis URL with its own ACL user (bastion_common.redis_acl),
    passwords under the data folder; none where this Redis cannot make users."""
    import redis

    from bastion_common import redis_acl

    secrets = redis_acl.passwords(settings.data_dir.resolve() / "keys")
    try:
        return redis_acl.service_urls(admin_url, settings.keys, secrets)
    except redis.RedisError as exc:
        print(
            f"bastion: could not create the services' Redis users ({exc}); "
            "every service uses BASTION_REDIS_URL's user",
            file=sys.stderr,
        )
        return {}


def _print_welcome(url: str, model: str, token: str, ca_file: Path) -> None:
    print(
        f"""
Bastion is up at {url}   (model: {model}, TLS 1.3, local CA {ca_file})

Try it:
  curl -s --cacert {ca_file} {url}/v1/chat/completions \\
    -H "Authorization: Bearer {token}" \\
    -H "Content-Type: application/json" \\
    -d '{{"model": "{model}", "max_tokens": 32,
         "messages": [{{"role": "user", "content": "Say hello."}}]}}'

That token is a user's, valid for an hour. Mint others (roles: user, admin, auditor):
  .venv/bin/bastion token --sub alice --role user
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
    run.add_argument("--port", type=int, default=8443, help="gateway HTTPS port (8443)")
    run.add_argument(
        "--auditor-port", type=int, default=None, help="audit API port (BASTION_AUDITOR_PORT, 8090)"
    )
    run.set_defaults(func=cmd_run)
    keys = sub.add_parser("keys", help="create, list and revoke API keys")
    keys_sub = keys.add_subparsers(dest="action", required=True)
    create = keys_sub.add_parser("create", help="create a key (shown once)")
    create.add_argument("--name", required=True)
    create.add_argument("--tenant", default="default")
    create.add_argument("--role", default="user")
    create.add_argument("--model", action="append", help="allowed model (repeatable; default all)")
    create.add_argument("--ttl", type=float, default=None, help="lifetime in seconds")
    keys_sub.add_parser("list", help="list keys (never the secrets)")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")
    keys.set_defaults(func=cmd_keys)
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
