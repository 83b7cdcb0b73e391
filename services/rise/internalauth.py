"""Signed calls from the gateway to the scorer: the scorer answers only the gateway, and
only for the index the gateway resolved for the caller's tenant.

The gateway (``Signer``) adds four metadata entries to each ScorerService call:

    x-rise-tenant     the caller's tenant (percent-encoded)
    x-rise-prefix     the one index prefix the call may read (percent-encoded)
    x-rise-expires    unix seconds after which the signature is void
    x-rise-signature  hex HMAC-SHA256, keyed with the internal secret, over the full method
                      name, the tenant, the prefix and the expiry

The scorer (``Verifier``) refuses a call without a valid, unexpired signature with
UNAUTHENTICATED, and (``authorize``) a call whose shard selector names another prefix
than the signed one, or one outside ``tenants/<tenant>/``, with PERMISSION_DENIED.

The signature does not cover the request body: whoever captures one may repeat calls on
that one tenant's index until it expires (SIGNATURE_SECONDS).  The chart's NetworkPolicy
lets only gateway pods reach the scorer's port.

The secret comes from ``RISE_INTERNAL_SECRET`` or the file ``RISE_INTERNAL_SECRET_FILE``
(a mounted Secret), the same on the gateway and every scorer; ``internal_key`` refuses
to go on without one unless ``RISE_INTERNAL_AUTH=off``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from rise.errors import InvalidInput, PermissionDenied, Unauthenticated
from rise.settings import Settings

SCORER_SERVICE = "rise.v1.ScorerService"
SCORE_SHARDS = f"/{SCORER_SERVICE}/ScoreShards"
VALUE_SHARDS = f"/{SCORER_SERVICE}/ValueShards"
GROUP_CANDIDATES = f"/{SCORER_SERVICE}/GroupCandidates"

TENANT = "x-rise-tenant"
PREFIX = "x-rise-prefix"
EXPIRES = "x-rise-expires"
SIGNATURE = "x-rise-signature"
HEADERS = (TENANT, PREFIX, EXPIRES, SIGNATURE)

SIGNATURE_SECONDS = 60
"""How long a signature is good for: it is checked when the call arrives, so this covers
the network and the clocks of gateway and scorer being a little apart."""
MAX_AHEAD_SECONDS = 600
"""A signature expiring further ahead than this is refused (a signer's clock far off)."""
MIN_SECRET_CHARS = 32
VERSION = "rise-internal-v1"


def internal_key(settings: Settings) -> bytes | None:
    """The HMAC key of internal calls, or None when ``internal_auth`` is off.

    InvalidInput when it is on and no usable secret is configured: a gateway cannot sign,
    and a scorer would answer anyone, so neither starts."""
    if settings.internal_auth == "off":
        return None
    secret = settings.internal_secret.get_secret_value()
    if settings.internal_secret_file:
        if secret:
            raise InvalidInput("set RISE_INTERNAL_SECRET or RISE_INTERNAL_SECRET_FILE, not both")
        try:
            secret = Path(settings.internal_secret_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidInput(f"cannot read the internal secret file "
                               f"{settings.internal_secret_file}: {e}") from None
    if not secret:
        raise InvalidInput(
            "no internal secret: set RISE_INTERNAL_SECRET or RISE_INTERNAL_SECRET_FILE (the "
            "same on the gateway and every scorer), or RISE_INTERNAL_AUTH=off to let the "
            "scorer answer unsigned calls for any index")
    if len(secret) < MIN_SECRET_CHARS:
        raise InvalidInput(f"the internal secret has {len(secret)} characters; use at least "
                           f"{MIN_SECRET_CHARS} (e.g. python -c 'import secrets; "
                           "print(secrets.token_urlsafe(48))')")
    return secret.encode()


def signature(key: bytes, method: str, tenant: str, prefix: str, expires: int) -> str:
    """Hex HMAC-SHA256 of the call's method, tenant, prefix and expiry (a JSON array, so no
    two different calls sign the same bytes)."""
    msg = json.dumps([VERSION, method, tenant, prefix, expires], separators=(",", ":"))
    return hmac.new(key, msg.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Grant:
    """What a verified signature allows: reading ``prefix`` for ``tenant``."""

    tenant: str
    prefix: str


class Signer:
    """The gateway's side: metadata for one scorer call (none when internal auth is off)."""

    def __init__(self, key: bytes | None, seconds: float = SIGNATURE_SECONDS,
                 clock: Callable[[], float] = time.time) -> None:
        self.key, self.seconds, self.clock = key, seconds, clock

    @classmethod
    def from_settings(cls, settings: Settings) -> Signer:
        return cls(internal_key(settings))

    def metadata(self, method: str, tenant: str, prefix: str) -> tuple[tuple[str, str], ...]:
        if self.key is None:
            return ()
        expires = int(self.clock() + self.seconds)
        return ((TENANT, quote(tenant, safe="")), (PREFIX, quote(prefix, safe="/")),
                (EXPIRES, str(expires)),
                (SIGNATURE, signature(self.key, method, tenant, prefix, expires)))


class Verifier:
    """The scorer's side: ``verify`` a call's metadata (None when internal auth is off)."""

    def __init__(self, key: bytes | None, clock: Callable[[], float] = time.time,
                 max_ahead: float = MAX_AHEAD_SECONDS) -> None:
        self.key, self.clock, self.max_ahead = key, clock, max_ahead

    @classmethod
    def from_settings(cls, settings: Settings) -> Verifier:
        return cls(internal_key(settings))

    @property
    def enabled(self) -> bool:
        return self.key is not None

    def verify(self, method: str, metadata: Iterable[tuple[str, str | bytes]]
               ) -> Grant | None:
        """The call's Grant; Unauthenticated unless the gateway signed it and it has not
        expired.  None (everything allowed) when internal auth is off."""
        if self.key is None:
            return None
        md: dict[str, str] = {}
        for k, v in metadata:
            if k in HEADERS:
                if k in md:
                    raise Unauthenticated(f"metadata {k} given twice")
                md[k] = v.decode("utf-8", "replace") if isinstance(v, bytes) else v
        missing = [h for h in HEADERS if h not in md]
        if missing:
            raise Unauthenticated(f"unsigned call (no {', '.join(missing)}): the scorer "
                                  "answers only calls the gateway signed")
        tenant, prefix = unquote(md[TENANT]), unquote(md[PREFIX])
        try:
            expires = int(md[EXPIRES])
        except ValueError:
            raise Unauthenticated(f"{EXPIRES} is not a number of seconds") from None
        want = signature(self.key, method, tenant, prefix, expires).encode()
        if not hmac.compare_digest(want, md[SIGNATURE].encode("utf-8", "replace")):
            raise Unauthenticated("bad signature (the gateway and the scorer must share one "
                                  "internal secret)")
        now = self.clock()
        if expires < now:
            raise Unauthenticated(f"the signature expired {now - expires:.0f} s ago (are the "
                                  "gateway's and the scorer's clocks apart?)")
        if expires > now + self.max_ahead:
            raise Unauthenticated(f"the signature expires {expires - now:.0f} s ahead, more "
                                  f"than {self.max_ahead:.0f} s (is the gateway's clock ahead?)")
        return Grant(tenant=tenant, prefix=prefix)


def authorize(grant: Grant | None, prefix: str) -> None:
    """PermissionDenied unless ``grant`` lets its call read ``prefix``: the very prefix the
    gateway signed, inside its tenant's area ``tenants/<tenant>/``."""
    if grant is None:
        return
    if prefix != grant.prefix:
        raise PermissionDenied(f"the call reads {prefix!r} but the gateway signed it for "
                               f"{grant.prefix!r}")
    tenant = grant.tenant
    escapes = any(part in (".", "..") for part in prefix.split("/"))
    if not tenant or "/" in tenant or tenant in (".", "..") or escapes or \
            not prefix.startswith(f"tenants/{tenant}/"):
        raise PermissionDenied(f"prefix {prefix!r} is outside tenant {tenant!r}'s area "
                               f"tenants/{tenant}/")
