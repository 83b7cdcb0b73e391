"""rise.internalauth: the gateway's signatures on scorer calls and their checks (the scorer
over real gRPC is in tests/rise/scorer/test_server.py)."""

from __future__ import annotations

import grpc
import pytest
from rise.errors import InvalidInput, PermissionDenied, RiseError, Unauthenticated
from rise.internalauth import (
    EXPIRES,
    MAX_AHEAD_SECONDS,
    PREFIX,
    SCORE_SHARDS,
    SIGNATURE,
    SIGNATURE_SECONDS,
    TENANT,
    VALUE_SHARDS,
    Grant,
    Signer,
    Verifier,
    authorize,
    internal_key,
    signature,
)
from rise.settings import Settings

KEY = b"k" * 32
NOW = 1_700_000_000.0


def signer(key: bytes | None = KEY, at: float = NOW) -> Signer:
    return Signer(key, clock=lambda: at)


def verifier(key: bytes | None = KEY, at: float = NOW) -> Verifier:
    return Verifier(key, clock=lambda: at)


def test_a_signed_call_verifies_and_grants_its_prefix():
    md = signer().metadata(SCORE_SHARDS, "a", "tenants/a/indexes/docs/")
    assert [k for k, _ in md] == [TENANT, PREFIX, EXPIRES, SIGNATURE]
    assert dict(md)[EXPIRES] == str(int(NOW + SIGNATURE_SECONDS))
    grant = verifier().verify(SCORE_SHARDS, md)
    assert grant == Grant("a", "tenants/a/indexes/docs/")
    authorize(grant, "tenants/a/indexes/docs/")
    # metadata values may arrive as bytes; other entries (the bearer token...) are ignored
    as_bytes = [(k, v.encode()) for k, v in md] + [("authorization", "Bearer x")]
    assert verifier().verify(SCORE_SHARDS, as_bytes) == grant


def test_the_signature_covers_method_tenant_prefix_and_expiry():
    base = signature(KEY, SCORE_SHARDS, "a", "tenants/a/x/", 100)
    assert base != signature(KEY, VALUE_SHARDS, "a", "tenants/a/x/", 100)
    assert base != signature(KEY, SCORE_SHARDS, "b", "tenants/a/x/", 100)
    assert base != signature(KEY, SCORE_SHARDS, "a", "tenants/a/y/", 100)
    assert base != signature(KEY, SCORE_SHARDS, "a", "tenants/a/x/", 101)
    assert base != signature(b"j" * 32, SCORE_SHARDS, "a", "tenants/a/x/", 100)
    # no two splits of the same characters sign alike
    assert signature(KEY, "m", "a,b", "c", 1) != signature(KEY, "m", "a", "b,c", 1)


def test_odd_tenant_names_travel_percent_encoded():
    tenant, prefix = "équipe b\n", "tenants/équipe b\n/indexes/x/"
    md = signer().metadata(VALUE_SHARDS, tenant, prefix)
    assert all(v.isascii() and "\n" not in v for _, v in md)
    assert verifier().verify(VALUE_SHARDS, md) == Grant(tenant, prefix)


@pytest.mark.parametrize("at, ok", [
    (NOW, True), (NOW + SIGNATURE_SECONDS, True), (NOW + SIGNATURE_SECONDS + 1, False),
    (NOW + SIGNATURE_SECONDS - MAX_AHEAD_SECONDS, True),
    (NOW + SIGNATURE_SECONDS - MAX_AHEAD_SECONDS - 1, False)])
def test_expiry_window(at, ok):
    md = signer().metadata(SCORE_SHARDS, "a", "tenants/a/x/")
    if ok:
        assert verifier(at=at).verify(SCORE_SHARDS, md) is not None
    else:
        with pytest.raises(Unauthenticated, match="expire"):
            verifier(at=at).verify(SCORE_SHARDS, md)


@pytest.mark.parametrize("md, message", [
    ((), "unsigned call"),
    (((TENANT, "a"), (PREFIX, "tenants/a/x/"), (EXPIRES, "1")), SIGNATURE),
])
def test_missing_metadata_is_unauthenticated(md, message):
    with pytest.raises(Unauthenticated, match=message):
        verifier().verify(SCORE_SHARDS, md)


def test_forged_or_altered_calls_are_unauthenticated():
    md = dict(signer().metadata(SCORE_SHARDS, "a", "tenants/a/x/"))
    for key, value in ((TENANT, "b"), (PREFIX, "tenants/b/x/"), (EXPIRES, str(int(NOW) + 30)),
                       (SIGNATURE, "0" * 64), (SIGNATURE, "é")):
        with pytest.raises(Unauthenticated):
            verifier().verify(SCORE_SHARDS, {**md, key: value}.items())
    with pytest.raises(Unauthenticated, match="bad signature"):
        verifier(key=b"j" * 32).verify(SCORE_SHARDS, md.items())
    with pytest.raises(Unauthenticated, match="bad signature"):
        verifier().verify(VALUE_SHARDS, md.items())
    with pytest.raises(Unauthenticated, match="twice"):
        verifier().verify(SCORE_SHARDS, [*md.items(), (TENANT, "a")])


@pytest.mark.parametrize("grant, prefix", [
    (Grant("a", "tenants/a/x/"), "tenants/a/y/"),           # not the signed prefix
    (Grant("a", "tenants/b/x/"), "tenants/b/x/"),           # another tenant's area
    (Grant("a", "tenants/ab/x/"), "tenants/ab/x/"),         # a longer tenant name
    (Grant("a", "tenants/a/../b/x/"), "tenants/a/../b/x/"),  # escapes its area
    (Grant("", "tenants//x/"), "tenants//x/"),
    (Grant("a/b", "tenants/a/b/x/"), "tenants/a/b/x/"),
    (Grant("a", "other/a/x/"), "other/a/x/"),
])
def test_foreign_prefixes_are_permission_denied(grant, prefix):
    with pytest.raises(PermissionDenied):
        authorize(grant, prefix)


def test_auth_off_signs_nothing_and_allows_everything():
    assert Signer(None).metadata(SCORE_SHARDS, "a", "tenants/a/x/") == ()
    off = Verifier(None)
    assert not off.enabled and off.verify(SCORE_SHARDS, ()) is None
    authorize(None, "anything/at/all/")


def test_internal_key_from_settings(tmp_path, monkeypatch):
    for name in ("RISE_INTERNAL_SECRET", "RISE_INTERNAL_SECRET_FILE", "RISE_INTERNAL_AUTH"):
        monkeypatch.delenv(name, raising=False)
    secret = "s" * 40
    assert internal_key(Settings(internal_secret=secret)) == secret.encode()
    f = tmp_path / "key"
    f.write_text(secret + "\n")
    assert internal_key(Settings(internal_secret_file=str(f))) == secret.encode()
    monkeypatch.setenv("RISE_INTERNAL_SECRET_FILE", str(f))
    assert internal_key(Settings()) == secret.encode()
    monkeypatch.delenv("RISE_INTERNAL_SECRET_FILE")
    assert internal_key(Settings(internal_auth="off")) is None
    assert internal_key(Settings(internal_auth="off", internal_secret=secret)) is None
    for settings, message in (
            (Settings(), "no internal secret"),
            (Settings(internal_secret="x" * 31), "at least 32"),
            (Settings(internal_secret=secret, internal_secret_file=str(f)), "not both"),
            (Settings(internal_secret_file=str(tmp_path / "none")), "cannot read")):
        with pytest.raises(InvalidInput, match=message):
            internal_key(settings)
    # the secret never shows in the settings' repr (logs of bad settings)
    assert secret not in repr(Settings(internal_secret=secret))


# --- the gateway's half -------------------------------------------------------------------------


class _Refusal(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "bad signature"


def scoring_service(signer: Signer | None, stubs=()):
    from rise.gateway.service import Deps, ScoringService

    def no(*a, **k):
        raise AssertionError("not reached")

    deps = Deps(settings=Settings(), jobs=None, send_task=no, store=no, scorers=list(stubs),
                materialize=no, signer=signer)
    return ScoringService(deps, auth=None)


def test_the_gateway_signs_the_prefix_of_the_callers_index():
    svc = scoring_service(Signer(KEY))
    md = svc._signed(VALUE_SHARDS, "a", "docs")
    grant = Verifier(KEY).verify(VALUE_SHARDS, md)
    assert grant == Grant("a", "tenants/a/indexes/docs/")
    authorize(grant, "tenants/a/indexes/docs/")
    assert scoring_service(None)._signed(VALUE_SHARDS, "a", "docs") == ()


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAUTHENTICATED,
                                  grpc.StatusCode.PERMISSION_DENIED])
def test_a_refused_signature_is_the_deployments_fault_not_the_callers(code):
    """A scorer refusing the gateway's signature (secrets that differ) reaches the caller
    as INTERNAL, never as UNAUTHENTICATED or PERMISSION_DENIED about its own token."""
    def refuse(stub, i, n):
        raise _Refusal(code)

    svc = scoring_service(Signer(KEY), stubs=[object()])
    with pytest.raises(RiseError) as info:
        svc._fan_out(refuse)
    assert info.value.grpc_code == "INTERNAL" and "internal secret" in info.value.message
