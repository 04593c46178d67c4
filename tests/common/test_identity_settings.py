"""What the JWT settings refuse at start-up, and the local key's creation."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from bastion_common.settings import JwtSettings
from bastion_common.tokens import load_or_create_key


def _settings(**values: object) -> JwtSettings:
    return JwtSettings(_env_file=None, **values)  # type: ignore[call-arg]


def test_an_identity_provider_needs_an_audience(tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": []}))
    with pytest.raises(ValidationError, match="AUDIENCE"):
        _settings(jwt_jwks=str(jwks))
    files = [{"kid": "k", "alg": "RS256", "path": str(tmp_path / "k.pem")}]
    with pytest.raises(ValidationError, match="AUDIENCE"):
        _settings(jwt_key_files=files)
    assert _settings(jwt_jwks=str(jwks), jwt_audience="bastion").jwt_audience == "bastion"


def test_a_jwks_url_must_be_https() -> None:
    with pytest.raises(ValidationError, match="https"):
        _settings(jwt_jwks="http://idp.example/jwks", jwt_audience="bastion")
    _settings(jwt_jwks="https://idp.example/jwks", jwt_audience="bastion")


def test_the_local_secret_is_off_by_default_and_long_when_given() -> None:
    assert _settings().jwt_local_key is False
    with pytest.raises(ValidationError, match="32 bytes"):
        _settings(jwt_secret="abc")
    _settings(jwt_secret="s" * 32)


def test_the_generated_key_is_never_read_half_written(tmp_path: Path) -> None:
    """Starts racing on a fresh data folder all read one whole key."""
    path = tmp_path / "keys" / "jwt-hs256.key"
    keys: list[str] = []
    start = threading.Barrier(8)

    def race() -> None:
        start.wait()
        keys.append(load_or_create_key(path))

    threads = [threading.Thread(target=race) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(keys)) == 1 and len(keys[0].encode()) >= 32
    assert keys[0] == path.read_text()
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no staging file left


def test_internal_tls_takes_a_certificate_with_its_key_and_ca(tmp_path: Path) -> None:
    from bastion_common.settings import CommonSettings

    ca, cert, key = (tmp_path / n for n in ("ca.pem", "c.pem", "c.key"))
    for n in (ca, cert, key):
        n.write_text("x")
    assert CommonSettings(internal_tls_ca=ca).internal_tls() is None  # the CA alone: off
    assert CommonSettings(
        internal_tls_ca=ca, internal_tls_cert=cert, internal_tls_key=key
    ).internal_tls() == (b"x", b"x", b"x")
    for partial in ({"internal_tls_cert": cert}, {"internal_tls_ca": ca, "internal_tls_key": key}):
        with pytest.raises(ValidationError, match="INTERNAL_TLS"):
            CommonSettings(**partial)
