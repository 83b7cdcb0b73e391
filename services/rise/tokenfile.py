"""Bearer tokens -> tenants, from the JSON file ``RISE_AUTH_TOKENS_FILE``, revocable.

The file maps each token to its tenant.  A key is the token itself, or ``sha256:<hex>``,
the hex SHA-256 of the token's UTF-8 bytes, so the file (a mounted Secret) need not hold
the secrets at all:

    {"sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08": "team-a",
     "a-plain-token": "team-b"}

(``printf %s TOKEN | sha256sum`` gives the hex.)  A tenant name is 1-64 characters of
[A-Za-z0-9._-] starting with a letter or digit: it becomes the prefix ``tenants/<tenant>/``
of the tenant's objects, so a slash or a ``..`` must never get that far.

Revocation.  ``TokenFile.tenant`` looks at the file's inode, size and mtime at most once
per ``CHECK_INTERVAL_S`` (1 s; a ``stat``, nothing read) and reloads it when they changed,
so a token removed from the file stops working within about a second (Kubernetes itself
takes up to a minute or so to update a mounted Secret).  A file that cannot be read or
parsed after a good load (deleted, half-written, a bad edit) keeps the last good map in
force: a typo must not lock every tenant out; the gateway logs it once per change of the
file at ERROR, and the gauge ``rise_auth_tokens_stale`` is 1 until a good file is loaded.
To revoke every token, write ``{}``.  At start an unreadable file is fatal (``TokenFile``
raises; the gateway logs the file and why, and exits).  No error a caller sees names the
file.

Comparison.  The presented token is hashed with SHA-256 and looked up by its digest.  The
lookup's timing can depend only on the digest of what the caller sent, and finding a
token whose digest shares a prefix with a stored one is a preimage search on SHA-256: the
timing tells nothing about the stored tokens, which is what a constant-time comparison
would guarantee.  (Hashing takes time linear in the token's length, which the caller
already knows.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable

from rise.errors import InvalidInput

log = logging.getLogger("rise.auth")

HASH_PREFIX = "sha256:"
CHECK_INTERVAL_S = 1.0
"""How often a call may stat the file: the revocation delay, about."""
TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def token_digest(token: str) -> bytes:
    """SHA-256 of a token's UTF-8 bytes (lone surrogates kept: never an error)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def parse_tokens(text: str) -> dict[bytes, str]:
    """digest -> tenant from the file's text; InvalidInput naming the first problem (no
    token appears in a message, only its position)."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise InvalidInput(f"not valid JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise InvalidInput("expected a JSON object mapping tokens to tenants")
    out: dict[bytes, str] = {}
    for i, (key, tenant) in enumerate(data.items()):
        if not isinstance(key, str) or not key:
            raise InvalidInput(f"entry {i}: the token is empty")
        if not isinstance(tenant, str) or not TENANT.fullmatch(tenant):
            raise InvalidInput(f"entry {i}: the tenant must be 1-64 characters of "
                               "[A-Za-z0-9._-] starting with a letter or digit")
        if key.startswith(HASH_PREFIX):
            hexdigest = key[len(HASH_PREFIX):]
            if not _HEX64.fullmatch(hexdigest):
                raise InvalidInput(f"entry {i} ({tenant}): a sha256: key needs 64 hex digits")
            digest = bytes.fromhex(hexdigest)
        else:
            digest = token_digest(key)
        if out.get(digest, tenant) != tenant:
            raise InvalidInput(f"entry {i}: one token maps to tenants {out[digest]!r} and "
                               f"{tenant!r}")
        out[digest] = tenant
    return out


Signature = tuple[int, int, int, int]
_MISSING: Signature = (-1, -1, -1, -1)
RACY_S = 2.0
"""A file modified less than this before it was read may change again without a new
mtime (coarse timestamps): it is read again at each check until it is older."""


def _signature(st: os.stat_result) -> Signature:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class TokenFile:
    """The token map of ``path`` (empty path: no tokens, every call unauthenticated),
    reloaded when the file changes (see the module's docstring).

    ``on_stale(bool)`` is told whether the map in force is older than the file (the file
    could not be loaded); ``clock`` is for tests.  InvalidInput when the file cannot be
    loaded at construction (start-up)."""

    def __init__(self, path: str, *, interval: float = CHECK_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic,
                 on_stale: Callable[[bool], None] | None = None) -> None:
        self.path = path
        self.interval = interval
        self.clock = clock
        self.on_stale = on_stale
        self.stale = False
        self._lock = threading.Lock()
        self._map: dict[bytes, str] = {}
        self._loaded: Signature | None = None  # the file the map came from
        self._loaded_at = 0.0  # wall-clock time it was read
        self._bad: Signature | None = None  # the file as it last failed to load
        self._bad_at = 0.0
        self._next = 0.0
        if path:
            try:
                sig, mapping = self._read()
            except InvalidInput as e:  # the entry point logs it and does not start
                raise InvalidInput(f"auth tokens file {path} cannot be loaded: {e}") from None
            self._accept(sig, mapping, quiet=True)
            self._next = clock() + interval
        self._notify()

    def __len__(self) -> int:
        return len(self._map)

    def tenant(self, token: str) -> str | None:
        """The tenant of ``token``, or None; the file is checked first when the last check
        is ``interval`` old."""
        if self.path and self.clock() >= self._next:
            self.check(due=True)
        return self._map.get(token_digest(token))

    def check(self, due: bool = False) -> None:
        """Reload the file if it changed (what ``tenant`` does once per interval; ``due``:
        unless another call just did)."""
        with self._lock:
            if due and self.clock() < self._next:
                return
            self._next = self.clock() + self.interval
            try:
                sig = _signature(os.stat(self.path))
            except OSError as e:
                self._fail(_MISSING, f"cannot stat it: {e.strerror or type(e).__name__}")
                return
            if sig == self._loaded and sig[3] / 1e9 < self._loaded_at - RACY_S:
                if self.stale:  # the good file is back as it was
                    self._bad = None
                    self._set_stale(False)
                return
            if sig == self._bad and sig[3] / 1e9 < self._bad_at - RACY_S:
                return  # still the file that failed: logged once already
            try:
                sig, mapping = self._read()
            except InvalidInput as e:
                self._fail(sig, str(e))
                return
            self._accept(sig, mapping)

    def _read(self) -> tuple[Signature, dict[bytes, str]]:
        """(signature of what was read, its map); InvalidInput saying why not."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
                sig = _signature(os.fstat(f.fileno()))
        except OSError as e:
            raise InvalidInput(f"cannot read it: {e.strerror or type(e).__name__}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput("not UTF-8") from None
        return sig, parse_tokens(text)

    def _accept(self, sig: Signature, mapping: dict[bytes, str], quiet: bool = False) -> None:
        if not quiet and mapping != self._map:
            log.info("auth tokens file reloaded: %d tokens (was %d)", len(mapping),
                     len(self._map))
        self._map, self._loaded, self._loaded_at, self._bad = mapping, sig, time.time(), None
        self._set_stale(False)

    def _fail(self, sig: Signature, why: str) -> None:
        if sig != self._bad:
            log.error("auth tokens file %s cannot be loaded (%s): the %d tokens loaded before "
                      "stay in force until it can", self.path, why, len(self._map))
        self._bad, self._bad_at = sig, time.time()
        self._set_stale(True)

    def _set_stale(self, stale: bool) -> None:
        if stale != self.stale:
            self.stale = stale
            self._notify()

    def _notify(self) -> None:
        if self.on_stale is not None:
            try:
                self.on_stale(self.stale)
            except Exception:  # noqa: BLE001 - a metric must never fail a call
                log.debug("on_stale callback failed", exc_info=True)
