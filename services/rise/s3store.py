"""The S3 backend of the object-store interface (any S3 server: AWS, MinIO, SeaweedFS).

Every object carries the sha256 of its bytes as user metadata (``x-amz-meta-sha256``) and
``get`` checks it, so a truncated or tampered object is reported as Corrupt, never used.
Large objects upload as multipart.  ``put(..., create_only=True)`` is one conditional
PUT (``If-None-Match: *``, never multipart), which the server decides atomically: of
racing writers exactly one wins (AWS S3 since 2024-08, MinIO, and SeaweedFS 4.48 -- the
test server -- honour it).  For a server that ignores the header,
``S3Store(..., conditional=False)`` falls back to a lock, which is only safe between
threads of one process.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import urllib3
from minio import Minio
from minio.credentials import Credentials
from minio.credentials.providers import (
    ChainedProvider,
    EnvAWSProvider,
    EnvMinioProvider,
    IamAwsProvider,
    Provider,
)
from minio.error import MinioException, S3Error, ServerError
from minio.helpers import DictType

from rise.errors import AlreadyExists, Corrupt, InvalidInput, NotFound, StorageError
from rise.store import MAX_KEY_BYTES, check_key

T = TypeVar("T")
log = logging.getLogger("rise.s3store")

PART_SIZE = 16 * 1024 * 1024  # objects larger than this upload as multipart
MAX_SINGLE_PUT = 5 * 1024**3  # S3's limit for one PUT, hence for create_only objects
TRIES = 3  # attempts per operation on connection errors and 5xx answers
BACKOFF_S = 0.2  # first retry delay; doubles each try
META = "x-amz-meta-sha256"
_MISSING = ("NoSuchKey", "NotFound", "ResourceNotFound")
_EXISTS = ("PreconditionFailed",)
# AWS answers 409 to a conditional put racing another one on the same key: try again.
_RETRY_CODES = ("ConditionalRequestConflict", "SlowDown", "RequestTimeout")
_CREATE_LOCK = threading.Lock()  # the conditional=False fallback (one process only)


class _Chain(Provider):
    """minio's ChainedProvider whose failure says what was tried: the first provider that
    yields keys wins; it is asked again when its (temporary) keys expire."""

    def __init__(self, providers: list[Provider]) -> None:
        self.chain = ChainedProvider(providers)

    def retrieve(self) -> Credentials:
        try:
            return self.chain.retrieve()
        except Exception as e:  # noqa: BLE001 - any provider's failure means "no credentials"
            log.warning("no S3 credentials from the provider chain: %s", _one_line(e))
            raise StorageError(
                "no S3 credentials: give an access and a secret key (RISE_S3_ACCESS_KEY, "
                "RISE_S3_SECRET_KEY), AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "MINIO_ACCESS_KEY/MINIO_SECRET_KEY, a web identity token "
                "(AWS_WEB_IDENTITY_TOKEN_FILE with AWS_ROLE_ARN) or an instance role"
            ) from None


def provider_chain() -> Provider:
    """Where credentials come from when none are configured, in order: the environment
    (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` with ``AWS_SESSION_TOKEN``, then
    ``MINIO_ACCESS_KEY``/``MINIO_SECRET_KEY``); a web identity token exchanged at STS
    (``AWS_WEB_IDENTITY_TOKEN_FILE``, ``AWS_ROLE_ARN``: EKS IRSA and other workload
    identities; ``AWS_ENDPOINT_URL_STS`` overrides the regional STS endpoint); else the
    ECS task role or the EC2 instance profile (IMDSv2).  Temporary keys are renewed
    before they expire."""
    sts = os.environ.get("AWS_ENDPOINT_URL_STS") or None
    web_identity = bool(os.environ.get("AWS_WEB_IDENTITY_TOKEN_FILE"))
    # Short timeouts: off a cloud, the metadata address answers nothing.
    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=2, read=10),
                               retries=urllib3.Retry(total=2, backoff_factor=0.2,
                                                     status_forcelist=[500, 502, 503, 504]))
    return _Chain([EnvAWSProvider(), EnvMinioProvider(),
                   IamAwsProvider(custom_endpoint=sts if web_identity else None,
                                  http_client=http)])


class S3Store:
    """A prefix of an S3 bucket as an object store; keys are relative to ``prefix``.

    The store retries transient failures itself: give it a client whose urllib3 pool does
    not retry too (``from_url`` builds one), or an unreachable server takes long to report.
    """

    def __init__(self, client: Minio, bucket: str, prefix: str = "", *,
                 conditional: bool = True) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.conditional = conditional

    @classmethod
    def from_url(cls, endpoint: str, access_key: str | None, secret_key: str | None,
                 bucket: str, prefix: str = "", secure: bool = False,
                 region: str | None = None) -> S3Store:
        """A store on ``endpoint`` ("host:port", or a URL whose scheme sets ``secure``)."""
        if "://" in endpoint:
            scheme, endpoint = endpoint.split("://", 1)
            secure = scheme == "https"
        # The store retries itself; urllib3's own retries (5 by default in minio) would
        # multiply with ours and make an unreachable server take a minute to report.
        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=10, read=120),
                                   retries=False, maxsize=16)
        if access_key and secret_key:
            client = Minio(endpoint.rstrip("/"), access_key=access_key,
                           secret_key=secret_key, secure=secure, region=region,
                           http_client=http)
        else:
            # No keys given: never unsigned requests; the credentials come from where the
            # process runs (environment, a web identity token, the instance's role).
            client = Minio(endpoint.rstrip("/"), credentials=provider_chain(),
                           secure=secure, region=region, http_client=http)
        return cls(client, bucket, prefix)

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def _name(self, key: str) -> str:
        name = self.prefix + check_key(key)
        if len(name.encode()) > MAX_KEY_BYTES:  # a server would refuse it: not an outage
            raise InvalidInput(f"invalid object key (over {MAX_KEY_BYTES} bytes in "
                               f"{self.describe()}): {key!r}")
        return name

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` with exponential backoff on transient failures.

        Non-transient S3 errors (NoSuchKey, PreconditionFailed, AccessDenied...) are
        re-raised as S3Error for the caller to translate.
        """
        delay = BACKOFF_S
        for attempt in range(1, TRIES + 1):
            try:
                return fn()
            except S3Error as e:
                status = getattr(getattr(e, "response", None), "status", 0) or 0
                if status < 500 and e.code not in _RETRY_CODES:
                    raise
                reason = f"{e.code} (HTTP {status})"
            except ServerError as e:
                reason = f"HTTP {e.status_code}"
            except (urllib3.exceptions.HTTPError, OSError, MinioException) as e:
                # The detail names the endpoint (host:port): logged, never in the error,
                # which reaches callers and tenants' job messages.
                log.warning("cannot %s at %s (try %d of %d): %s", what, self.describe(),
                            attempt, TRIES, _one_line(e))
                reason = f"the store is unreachable ({_kind(e)})"
            if attempt == TRIES:
                raise StorageError(f"cannot {what} at {self.describe()}: {reason} "
                                   f"(after {TRIES} tries)") from None
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def _refused(self, what: str, e: S3Error) -> StorageError:
        return StorageError(f"cannot {what} at {self.describe()}: {e.code}: {e.message}")

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (a racing creator is fine)."""
        try:
            if not self._call("check bucket", lambda: self.client.bucket_exists(self.bucket)):
                self._call("create bucket", lambda: self.client.make_bucket(self.bucket))
        except S3Error as e:
            if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise self._refused("create bucket", e) from None

    def put(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        name = self._name(key)
        if create_only and len(data) > MAX_SINGLE_PUT:
            raise InvalidInput(f"{key}: create-only objects are at most 5 GiB (one S3 PUT)")
        digest = hashlib.sha256(data).hexdigest()
        tries = 0

        def upload() -> None:
            nonlocal tries
            tries += 1
            if create_only and self.conditional:
                self._put_if_absent(name, data, digest)
            else:
                self.client.put_object(self.bucket, name, io.BytesIO(data), len(data),
                                       metadata={"sha256": digest}, part_size=PART_SIZE)

        try:
            if create_only and not self.conditional:
                with _CREATE_LOCK:
                    if self.exists(key):
                        raise AlreadyExists(f"{key} already exists in {self.describe()}")
                    self._call(f"write {key}", upload)
            else:
                self._call(f"write {key}", upload)
        except S3Error as e:
            if e.code not in _EXISTS:
                raise self._refused(f"write {key}", e) from None
            # A retried conditional put can lose to its own first attempt, whose answer
            # was lost: finding exactly our bytes there is the outcome of winning.
            if tries > 1 and self._stored_sha256(name) == digest:
                return
            raise AlreadyExists(f"{key} already exists in {self.describe()}") from None

    def _put_if_absent(self, name: str, data: bytes, digest: str) -> None:
        """One PUT with ``If-None-Match: *``, whatever the size.

        Never multipart: SeaweedFS 4.48 checks the condition of CompleteMultipartUpload
        outside its object lock, so racing multipart completions can all succeed (seen
        in tests), while its conditional single PUT is atomic.  minio 7.2's public
        put_object cannot send extra headers, hence its (pinned) request helper.
        """
        headers: DictType = {"Content-Type": "application/octet-stream", META: digest,
                             "If-None-Match": "*"}
        self.client._put_object(self.bucket, name, data, headers)

    def _stored_sha256(self, name: str) -> str | None:
        try:
            st = self._call("stat", lambda: self.client.stat_object(self.bucket, name))
        except S3Error:
            return None
        return (st.metadata or {}).get(META)

    def get(self, key: str) -> bytes:
        name = self._name(key)

        def read() -> tuple[bytes, str | None]:
            resp = self.client.get_object(self.bucket, name)
            try:
                return resp.read(), resp.headers.get(META)
            finally:
                resp.close()
                resp.release_conn()

        try:
            data, want = self._call(f"read {key}", read)
        except S3Error as e:
            if e.code in _MISSING:
                raise NotFound(f"{key} not found in {self.describe()}") from None
            raise self._refused(f"read {key}", e) from None
        if want is None:
            raise Corrupt(f"{key} in {self.describe()} has no sha256 metadata")
        if hashlib.sha256(data).hexdigest() != want:
            raise Corrupt(f"{key} in {self.describe()}: sha256 of the bytes differs from "
                          f"its metadata ({len(data)} bytes read)")
        return data

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """A ranged GET: ``length`` bytes from ``offset``.  The object's sha256 metadata
        covers the whole object, so the range is the caller's to check (a dataset's
        ranges are checked against the hashes in the ingest plan)."""
        name = self._name(key)
        if isinstance(offset, bool) or isinstance(length, bool) or offset < 0 or length < 0:
            raise InvalidInput(f"invalid byte range: offset {offset!r}, length {length!r}")
        if length == 0:
            return b""

        def read() -> bytes:
            resp = self.client.get_object(self.bucket, name, offset=offset, length=length)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        try:
            return self._call(f"read {key}", read)
        except S3Error as e:
            if e.code in _MISSING:
                raise NotFound(f"{key} not found in {self.describe()}") from None
            if e.code == "InvalidRange":
                return b""
            raise self._refused(f"read {key}", e) from None

    def exists(self, key: str) -> bool:
        name = self._name(key)
        try:
            self._call(f"stat {key}", lambda: self.client.stat_object(self.bucket, name))
        except S3Error as e:
            if e.code in _MISSING:
                return False
            raise self._refused(f"stat {key}", e) from None
        return True

    def list(self, prefix: str = "") -> list[str]:
        return [k for k, _ in self.list_times(prefix)]

    def list_times(self, prefix: str = "") -> builtins.list[tuple[str, float]]:
        def names() -> builtins.list[tuple[str, float]]:  # lazy: errors surface while iterating
            objs = self.client.list_objects(self.bucket, prefix=self.prefix + prefix,
                                            recursive=True)
            return [(o.object_name, o.last_modified.timestamp() if o.last_modified else 0.0)
                    for o in objs if not o.is_dir]

        try:
            found = self._call("list", names)
        except S3Error as e:
            if e.code == "NoSuchBucket":
                return []
            raise self._refused("list", e) from None
        return sorted((n[len(self.prefix):], t) for n, t in found)

    def delete(self, key: str) -> None:
        name = self._name(key)
        try:  # S3 deletes are idempotent: an absent key answers 204 too
            self._call(f"delete {key}", lambda: self.client.remove_object(self.bucket, name))
        except S3Error as e:
            if e.code not in _MISSING:
                raise self._refused(f"delete {key}", e) from None


def _kind(e: BaseException) -> str:
    """The class name of the real cause (urllib3 nests it), for messages: never its text,
    which names the endpoint."""
    return type(getattr(e, "reason", None) or e).__name__


def _one_line(e: BaseException) -> str:
    """A short reason: urllib3 nests the real cause (connection refused...) in its message."""
    inner = getattr(e, "reason", None) or e
    text = " ".join(str(inner).split()) or type(inner).__name__
    return text if len(text) <= 200 else text[:197] + "..."
