"""Where the services' bytes live: the index store of a prefix, and dataset files.

``open_store(settings, prefix)`` is the one place a service turns settings into a Store:
S3/MinIO normally, or a local folder when ``RISE_S3_ENDPOINT`` is ``file:///abs/path``
(tests and the embedded case; the folder plays the bucket, so the prefix is a sub-folder).

``materialize(uri, settings)`` turns a dataset URI into a local file the data layer reads:
``s3://bucket/key`` is downloaded once into the cache (named by the sha256 of the URI and
the object's ETag, so a changed object is fetched again), a local path is used in place.

Neither function imports torch, so the gateway can use them.  Their errors name the
bucket, the key or the URI a caller gave, never the endpoint's host:port nor a path of this
machine (logged instead).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
from pathlib import Path
from urllib.parse import unquote, urlsplit

import urllib3
from minio.error import MinioException, S3Error

from rise.constants import cache_dir
from rise.data import ByteSource, FileBytes
from rise.errors import InvalidInput, NotFound, StorageError
from rise.s3store import S3Store
from rise.settings import Settings
from rise.store import LocalStore, Store, key_problem

log = logging.getLogger("rise.datasets")

FILE_SCHEME = "file://"
# Longest suffix first: ".jsonl.gz" must not be read as ".gz" (same list as rise.data).
DATASET_SUFFIXES = (".jsonl.gz", ".jsonl", ".json", ".parquet")


def local_root(settings: Settings) -> Path | None:
    """The folder of a ``file:///abs/path`` endpoint, or None for a real S3 endpoint."""
    endpoint = settings.s3_endpoint
    if not endpoint.startswith(FILE_SCHEME):
        return None
    path = unquote(urlsplit(endpoint).path)
    if not path.startswith("/") or urlsplit(endpoint).netloc not in ("", "localhost"):
        raise InvalidInput(f"RISE_S3_ENDPOINT {endpoint!r}: a file endpoint is file:///abs/path")
    return Path(path)


def open_store(settings: Settings, prefix: str) -> Store:
    """The store holding the objects under ``prefix`` (an index's folder in the bucket)."""
    root = local_root(settings)
    if root is not None:
        # Named as the S3 URI it stands for: the folder is this machine's business.
        inner = prefix.strip("/")
        label = f"s3://{settings.s3_bucket}/{inner + '/' if inner else ''}"
        return LocalStore(root / inner if inner else root, label=label)
    return S3Store.from_url(
        settings.s3_endpoint, settings.s3_access_key, settings.s3_secret_key,
        settings.s3_bucket, prefix=prefix, secure=settings.s3_secure, region=settings.s3_region,
    )


def store_at(location: str, settings: Settings) -> Store:
    """The store of an index location a user names: ``s3://bucket/prefix/`` (the endpoint
    and credentials of ``settings``; with a ``file://`` endpoint its folder is the
    deployment's bucket) or a local folder (a path or ``file:///abs/path``)."""
    if not isinstance(location, str) or not location.strip():
        raise InvalidInput("index location is empty")
    if location.startswith("s3://"):
        parts = urlsplit(location)
        bucket, prefix = parts.netloc, location[5:].partition("/")[2].strip("/")
        if not bucket or not prefix or parts.query or parts.fragment:
            raise InvalidInput(f"index location {location!r} must be s3://bucket/prefix/")
        problem = key_problem(prefix)
        if problem is not None:
            raise InvalidInput(f"invalid prefix ({problem}) in index location {location!r}")
        root = local_root(settings)
        if root is not None:
            if bucket != settings.s3_bucket:
                raise NotFound(f"bucket {bucket!r} of {location!r} is not "
                               f"{settings.s3_bucket!r}")
            return LocalStore(root / prefix, label=f"s3://{bucket}/{prefix}/")
        return S3Store.from_url(settings.s3_endpoint, settings.s3_access_key or None,
                                settings.s3_secret_key or None, bucket, prefix=prefix + "/",
                                secure=settings.s3_secure, region=settings.s3_region)
    if location.startswith(FILE_SCHEME):
        parts = urlsplit(location)
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise InvalidInput(f"index location {location!r}: a file URI is file:///abs/path")
        return LocalStore(unquote(parts.path))
    if "://" in location:
        raise InvalidInput(f"index location {location!r}: use s3://bucket/prefix/ or a folder")
    return LocalStore(location)


def dataset_suffix(name: str) -> str:
    """The data-format suffix of a file or key name, or InvalidInput."""
    lower = name.lower()
    for suffix in DATASET_SUFFIXES:
        if lower.endswith(suffix):
            return suffix
    raise InvalidInput(
        f"{name}: unknown data file extension (use {', '.join(DATASET_SUFFIXES)})")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, key) of ``s3://bucket/key``; InvalidInput when either part is missing."""
    parts = urlsplit(uri)
    bucket, key = parts.netloc, parts.path.lstrip("/")
    if parts.scheme != "s3" or not bucket or not key or key.endswith("/") \
            or parts.query or parts.fragment:
        raise InvalidInput(f"dataset URI {uri!r} must be s3://bucket/key")
    # The key as written (urlsplit drops tabs and newlines): '..' would leave a file
    # endpoint's folder, and S3 servers refuse the others as bad requests.
    problem = key_problem(uri[5:].partition("/")[2])
    if problem is not None:
        raise InvalidInput(f"invalid object key ({problem}) in dataset URI {uri!r}")
    return bucket, key


def materialize(uri: str, settings: Settings) -> Path:
    """A local file with the bytes of dataset ``uri``.

    ``s3://bucket/key`` is downloaded into ``<cache>/datasets/<sha256(uri + etag)><ext>``
    (to a temp file, then renamed, so concurrent workers never read a partial file; skipped
    when already there).  A local path (or ``file:///abs/path``) is returned as is.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise InvalidInput("dataset URI is empty")
    if uri.startswith("s3://"):
        return _materialize_s3(uri, settings)
    if uri.startswith(FILE_SCHEME):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise InvalidInput(f"dataset URI {uri!r}: a file URI is file:///abs/path")
        path = Path(unquote(parts.path))
    elif "://" in uri:
        raise InvalidInput(f"dataset URI {uri!r}: use s3://bucket/key or a local path")
    else:
        path = Path(uri)
    if not path.is_file():
        raise NotFound(f"dataset {uri} not found")
    return path


def _materialize_s3(uri: str, settings: Settings) -> Path:
    bucket, key = parse_s3_uri(uri)
    suffix = dataset_suffix(key)
    root = local_root(settings)
    if root is not None:
        # A file endpoint is one bucket: s3://<settings.s3_bucket>/key is <root>/key.
        if bucket != settings.s3_bucket:
            raise NotFound(f"dataset {uri} not found (bucket {bucket!r} is not "
                           f"{settings.s3_bucket!r})")
        path = root / key
        if not path.is_file():
            raise NotFound(f"dataset {uri} not found")
        return path

    # The store's client: same endpoint parsing (host:port or URL) and no urllib3 retries.
    client = S3Store.from_url(settings.s3_endpoint, settings.s3_access_key or None,
                              settings.s3_secret_key or None, bucket,
                              secure=settings.s3_secure, region=settings.s3_region).client
    tmp = ""
    try:
        stat = client.stat_object(bucket, key)
        name = hashlib.sha256(f"{uri}\n{stat.etag}".encode()).hexdigest()
        target = cache_dir(settings.cache_dir) / "datasets" / f"{name}{suffix}"
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = str(target.parent / f".{name}.{secrets.token_hex(6)}.tmp")
        client.fget_object(bucket, key, tmp, tmp_file_path=tmp + ".part")
        os.replace(tmp, target)
        tmp = ""
        return target
    except S3Error as e:
        if e.code in ("NoSuchKey", "NoSuchBucket", "NoSuchObject", "NotFound"):
            raise NotFound(f"dataset {uri} not found") from None
        if e.code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise InvalidInput(f"dataset {uri}: access denied ({e.code})") from None
        raise StorageError(f"cannot download dataset {uri}: {e.code}") from None
    except MinioException as e:  # ServerError, InvalidResponseError: retryable
        raise StorageError(f"cannot download dataset {uri}: {type(e).__name__}") from None
    except (urllib3.exceptions.HTTPError, OSError) as e:  # unreachable endpoint, local disk
        # The detail names the endpoint's host:port or the cache's path: the log's, not
        # the caller's (a job's message reaches the tenant).
        log.warning("cannot download dataset %s: %s: %s", uri, type(e).__name__, e)
        raise StorageError(f"cannot download dataset {uri}: {type(e).__name__} (the store "
                           "is unreachable or the local cache failed; see the worker log)"
                           ) from None
    finally:
        if tmp:
            for leftover in (tmp, tmp + ".part"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)


class StoreBytes:
    """A ByteSource over one object of a store: every read is a ranged GET."""

    def __init__(self, store: Store, key: str) -> None:
        self.store, self.key = store, key

    def read(self, offset: int, length: int) -> bytes:
        return self.store.get_range(self.key, offset, length)


def dataset_bytes(uri: str, settings: Settings) -> ByteSource:
    """Ranged reads of dataset ``uri`` without fetching it whole: ``s3://bucket/key``
    through ranged GETs (a file endpoint's folder: reads of its file), a local path read in
    place.  What a shard task reads its records through (``rise.ingest.DatasetRecords``)."""
    if not isinstance(uri, str) or not uri.strip():
        raise InvalidInput("dataset URI is empty")
    if not uri.startswith("s3://"):
        return FileBytes(materialize(uri, settings), uri)
    bucket, key = parse_s3_uri(uri)
    dataset_suffix(key)
    root = local_root(settings)
    if root is not None:
        if bucket != settings.s3_bucket:
            raise NotFound(f"dataset {uri} not found (bucket {bucket!r} is not "
                           f"{settings.s3_bucket!r})")
        return StoreBytes(LocalStore(root, label=f"s3://{bucket}/"), key)
    store = S3Store.from_url(settings.s3_endpoint, settings.s3_access_key or None,
                             settings.s3_secret_key or None, bucket,
                             secure=settings.s3_secure, region=settings.s3_region)
    return StoreBytes(store, key)
