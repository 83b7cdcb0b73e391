"""Where a pool's model comes from: an S3 prefix, a mounted path or a hub id.

A pool names its model as one of

* ``s3://bucket/models/<name>/``: a folder pushed with ``rise models push`` (every file
  plus ``rise-model.json``, the manifest of their sizes and sha256).  ``local_model``
  downloads it once into ``<cache>/models/s3/`` (the pool's cache volume), checks every
  file against the manifest and renames the finished folder into place, all under a file
  lock: several worker processes (or pods sharing a node's cache) download it once, the
  others wait and reuse it.  A cached file changed since it was verified is hashed again
  and fetched again when it differs; an object in S3 that differs from the manifest is
  refused (Corrupt), never loaded.
* a local path (``/models/pythia-1.4b``, ``file:///models/x``, a ``.gguf`` file or a
  ``config.json``): a mounted volume, used in place.
* a hub id (``org/name``, ``org/name@revision`` or ``hf://org/name``), fetched with
  huggingface_hub (safetensors, configs and tokenizer files only) into its cache
  (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``), with the token in ``$HF_TOKEN``; with
  ``HF_HUB_OFFLINE=1`` only a copy already in that cache is used.

The gateway plans from ``model_config``: config.json alone, fetched from the same source
and cached (never the weights).  Errors name the model as the pool gives it, never the
S3 endpoint, the hub's host or a path of this machine's cache (logged instead).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import urllib3
from minio import Minio
from minio.error import MinioException, S3Error
from minio.helpers import DictType
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rise.constants import cache_dir
from rise.errors import Corrupt, InvalidInput, NotFound, RiseError, StorageError
from rise.s3store import PART_SIZE, S3Store
from rise.settings import Settings

log = logging.getLogger("rise.modelsource")

MANIFEST = "rise-model.json"
"""The manifest beside a model's files in S3: their paths, sizes and sha256."""
MANIFEST_FORMAT: Literal[1] = 1
CONFIG = "config.json"
VERIFIED = "verified.json"
"""Beside a cached model: each file's (size, mtime_ns, inode) when it was last verified."""
FETCH_TRIES = 2
"""Downloads of one file before a mismatch with the manifest is final."""
CONFIG_TTL_SECONDS = 60.0
"""How long the gateway reuses a model's config.json without looking at its manifest."""
LOCK_LOG_SECONDS = 30.0
"""While waiting for another process's download, a log line this often."""
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
"""What a hub model's download takes: weights as safetensors, configs and tokenizers; no
code (remote code is never run) and no other weight formats."""
_CHUNK = 8 * 1024**2
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(@[\w./-]+)?$")


# ---------------------------------------------------------------------------- manifest


class ModelFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    """'/'-separated, relative to the model's folder."""
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class ModelManifest(BaseModel):
    """``rise-model.json``: every file of a model folder with its size and sha256."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[1] = MANIFEST_FORMAT
    files: list[ModelFile]

    def to_json(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=1).encode()

    def file(self, path: str) -> ModelFile | None:
        return next((f for f in self.files if f.path == path), None)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def parse_manifest(data: bytes, where: str) -> ModelManifest:
    try:
        m = ModelManifest.model_validate_json(data)
    except ValidationError as e:
        raise Corrupt(f"{where}: not a valid {MANIFEST}: {e.errors()[0]['msg']}") from None
    for f in m.files:
        _check_relative(f.path, where)
    if len({f.path for f in m.files}) != len(m.files):
        raise Corrupt(f"{where}: {MANIFEST} names a file twice")
    return m


def _check_relative(path: str, where: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise Corrupt(f"{where}: {MANIFEST} names an invalid path {path!r}")
    return path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def build_manifest(folder: str | os.PathLike) -> ModelManifest:
    """The manifest of every regular file under ``folder`` (symlinks followed, as in a hub
    snapshot; hidden files and the manifest itself left out)."""
    root = Path(folder)
    if not root.is_dir():
        raise NotFound(f"model folder {str(folder)!r} does not exist")
    files = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if rel == MANIFEST or any(part.startswith(".") for part in rel.split("/")) \
                or not p.is_file():
            continue
        files.append(ModelFile(path=rel, size=p.stat().st_size, sha256=file_sha256(p)))
    if not any(f.path == CONFIG for f in files):
        raise InvalidInput(f"model folder {str(folder)!r} has no {CONFIG}")
    return ModelManifest(files=files)


# ---------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """A parsed model source."""

    kind: Literal["s3", "path", "hub"]
    uri: str
    """As the pool gives it (what messages name)."""
    bucket: str = ""
    prefix: str = ""
    """The S3 prefix, ending in '/'."""
    path: str = ""
    repo: str = ""
    revision: str | None = None

    @property
    def name(self) -> str:
        """The model's own name: the last part of its prefix, path or hub id."""
        if self.kind == "s3":
            return self.prefix.rstrip("/").rsplit("/", 1)[-1]
        if self.kind == "hub":
            return self.repo.rsplit("/", 1)[-1]
        return Path(self.path).name


def parse_source(model: str) -> Source:
    """What ``model`` names: ``s3://bucket/prefix/``, a local path, or a hub id."""
    if not isinstance(model, str) or not model.strip():
        raise InvalidInput("model source is empty")
    model = model.strip()
    if model.startswith("s3://"):
        parts = urlsplit(model)
        prefix = parts.path.strip("/")
        if not parts.netloc or not prefix or parts.query or parts.fragment \
                or any(p in (".", "..") for p in prefix.split("/")):
            raise InvalidInput(f"model source {model!r} must be s3://bucket/prefix/")
        return Source("s3", model, bucket=parts.netloc, prefix=prefix + "/")
    if model.startswith("file://"):
        parts = urlsplit(model)
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise InvalidInput(f"model source {model!r}: a file URI is file:///abs/path")
        return Source("path", model, path=unquote(parts.path))
    if model.startswith("hf://"):
        model_id = model[len("hf://"):]
        if not _HUB_ID.match(model_id):
            raise InvalidInput(f"model source {model!r}: a hub id is hf://org/name[@revision]")
        return _hub(model, model_id)
    if "://" in model:
        raise InvalidInput(f"model source {model!r}: use s3://bucket/prefix/, a local path "
                           "or a hub id (org/name)")
    if model.startswith(("/", ".", "~")) or Path(model).exists() or not _HUB_ID.match(model):
        return Source("path", model, path=os.path.expanduser(model))
    return _hub(model, model)


def _hub(uri: str, model_id: str) -> Source:
    repo, _, revision = model_id.partition("@")
    return Source("hub", uri, repo=repo, revision=revision or None)


def local_model(model: str, settings: Settings) -> str:
    """A local path for ``rise.model.load_model``: the mounted path as is, the S3 model's
    verified folder in the cache (downloaded when needed), the hub snapshot's folder."""
    src = parse_source(model)
    if src.kind == "path":
        if not Path(src.path).exists():
            raise NotFound(f"model {model!r} does not exist (is its volume mounted?)")
        return src.path
    if src.kind == "hub":
        return str(_hub_fetch(src, None))
    return str(S3Models(settings).fetch(src))


_configs: dict[str, tuple[float, Path]] = {}
_configs_lock = threading.Lock()


def model_config(model: str, settings: Settings) -> Path:
    """The local config.json of ``model`` (for the planner), fetched alone from an S3 or
    hub source and cached (in memory for CONFIG_TTL_SECONDS, on disk by its sha256)."""
    src = parse_source(model)
    if src.kind == "path":
        path = Path(src.path)
        return path / CONFIG if path.is_dir() else path
    now = time.monotonic()
    with _configs_lock:
        hit = _configs.get(model)
        if hit is not None and hit[0] > now and hit[1].is_file():
            return hit[1]
    path = _hub_fetch(src, CONFIG) if src.kind == "hub" else S3Models(settings).config(src)
    with _configs_lock:
        _configs[model] = (now + CONFIG_TTL_SECONDS, path)
    return path


# ---------------------------------------------------------------------------- S3


@contextlib.contextmanager
def file_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive flock on ``path``, logging while another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        waited = 0.0
        next_log = 0.0
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if waited >= next_log:
                log.info("waiting for another process fetching %s (%.0f s)", what, waited)
                next_log += LOCK_LOG_SECONDS
            time.sleep(0.2)
            waited += 0.2
        yield
    finally:
        os.close(fd)  # releases the lock


class S3Models:
    """Models under S3 prefixes: read (fetch, config), written (push), listed.

    Reached with the deployment's S3 settings (endpoint, credentials); the bucket is the
    model's own.  A ``file:///abs/path`` endpoint is the deployment's bucket as a folder
    (tests, the embedded case)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cache = cache_dir(settings.cache_dir) / "models"
        endpoint = settings.s3_endpoint
        self.root: Path | None = None
        self.client: Minio | None = None
        if endpoint.startswith("file://"):
            parts = urlsplit(endpoint)
            if not parts.path.startswith("/") or parts.netloc not in ("", "localhost"):
                raise InvalidInput(f"RISE_S3_ENDPOINT {endpoint!r}: a file endpoint is "
                                   "file:///abs/path")
            self.root = Path(unquote(parts.path))
        else:
            self.client = S3Store.from_url(
                endpoint, settings.s3_access_key or None, settings.s3_secret_key or None,
                settings.s3_bucket, secure=settings.s3_secure, region=settings.s3_region).client

    # ------------------------------------------------------------- object access

    def _local(self, src: Source, key: str) -> Path:
        assert self.root is not None
        if src.bucket != self.settings.s3_bucket:
            raise NotFound(f"model {src.uri} not found (bucket {src.bucket!r} is not "
                           f"{self.settings.s3_bucket!r})")
        return self.root / (src.prefix + key)

    def read(self, src: Source, key: str) -> bytes:
        """A small object (manifest, config) of the model's prefix."""
        with _s3_errors(src.uri, f"read {key}"):
            if self.client is None:
                p = self._local(src, key)
                if not p.is_file():
                    raise NotFound(f"model {src.uri} has no {key}")
                return p.read_bytes()
            resp = self.client.get_object(src.bucket, src.prefix + key)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

    def download(self, src: Source, key: str, dest: Path) -> None:
        with _s3_errors(src.uri, f"download {key}"):
            if self.client is None:
                shutil.copyfile(self._local(src, key), dest)
            else:
                self.client.fget_object(src.bucket, src.prefix + key, str(dest),
                                        tmp_file_path=str(dest) + ".part")

    def upload(self, src: Source, key: str, path: Path | None, data: bytes = b"",
               sha256: str = "") -> None:
        with _s3_errors(src.uri, f"upload {key}"):
            if self.client is None:
                dest = self._local(src, key)
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")
                if path is not None:
                    shutil.copyfile(path, tmp)
                else:
                    tmp.write_bytes(data)
                os.replace(tmp, dest)
                return
            meta: DictType = {"sha256": sha256 or hashlib.sha256(data).hexdigest()}
            if path is not None:
                self.client.fput_object(src.bucket, src.prefix + key, str(path), metadata=meta,
                                        part_size=PART_SIZE)
            else:
                self.client.put_object(src.bucket, src.prefix + key, io.BytesIO(data), len(data),
                                       metadata=meta, part_size=PART_SIZE)

    def sizes(self, src: Source, prefix: str = "") -> dict[str, int]:
        """Key (relative to the model's prefix) -> size of every object under it."""
        with _s3_errors(src.uri, "list"):
            if self.client is None:
                base = self._local(src, "x").parent
                if not base.is_dir():
                    return {}
                return {p.relative_to(base).as_posix(): p.stat().st_size
                        for p in base.rglob("*") if p.is_file()
                        and p.relative_to(base).as_posix().startswith(prefix)}
            objs = self.client.list_objects(src.bucket, prefix=src.prefix + prefix,
                                            recursive=True)
            return {o.object_name[len(src.prefix):]: o.size or 0 for o in objs if not o.is_dir}

    def manifest(self, src: Source) -> tuple[ModelManifest, bytes]:
        try:
            data = self.read(src, MANIFEST)
        except NotFound:
            raise NotFound(f"model {src.uri} has no {MANIFEST} (upload it with "
                           "`rise models push`)") from None
        return parse_manifest(data, src.uri), data

    # ------------------------------------------------------------- the cache

    def _slot(self, src: Source) -> Path:
        return self.cache / "s3" / hashlib.sha256(f"{src.bucket}/{src.prefix}".encode()
                                                  ).hexdigest()[:24]

    def fetch(self, src: Source) -> Path:
        """The model's folder in the cache, every file verified against the manifest."""
        manifest, raw = self.manifest(src)
        version = hashlib.sha256(raw).hexdigest()[:16]
        slot = self._slot(src)
        target = slot / version / src.name
        marker = slot / version / VERIFIED
        if _unchanged(target, marker, manifest):
            return target  # the common case: verified before, untouched since
        with _s3_errors(src.uri, "fetch it into the cache"), file_lock(slot / ".lock", src.uri):
            if target.is_dir() and marker.is_file():
                self._repair(src, manifest, target, marker)
                return target
            for old in [*slot.glob(".tmp-*"), slot / version]:  # what a dead download left
                shutil.rmtree(old, ignore_errors=True)
            tmp = slot / f".tmp-{secrets.token_hex(6)}"
            try:
                (tmp / src.name).mkdir(parents=True)
                start = time.monotonic()
                for f in manifest.files:
                    self._fetch_file(src, f, tmp / src.name)
                _write_marker(tmp / VERIFIED, tmp / src.name, manifest)
                os.rename(tmp, slot / version)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            log.info("fetched model %s: %d files, %d bytes in %.1f s", src.uri,
                     len(manifest.files), manifest.total_bytes, time.monotonic() - start)
            for other in slot.iterdir():  # older versions of this prefix
                if other.is_dir() and other.name != version and not other.name.startswith("."):
                    shutil.rmtree(other, ignore_errors=True)
        return target

    def _repair(self, src: Source, manifest: ModelManifest, folder: Path, marker: Path) -> None:
        """Hash again every cached file changed since it was verified; fetch again those
        that differ from the manifest."""
        seen = _read_marker(marker)
        for f in manifest.files:
            p = folder / f.path
            if p.is_file() and seen.get(f.path) == _stat(p):
                continue
            if p.is_file() and p.stat().st_size == f.size and file_sha256(p) == f.sha256:
                continue
            log.warning("model %s: cached file %s differs from the manifest: fetching it "
                        "again", src.uri, f.path)
            self._fetch_file(src, f, folder)
        _write_marker(marker, folder, manifest)

    def _fetch_file(self, src: Source, f: ModelFile, folder: Path) -> None:
        """Download one file beside its place, check size and sha256, rename it in."""
        dest = folder / f.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")
        try:
            for attempt in range(1, FETCH_TRIES + 1):
                self.download(src, f.path, tmp)
                size = tmp.stat().st_size
                if size == f.size and file_sha256(tmp) == f.sha256:
                    os.replace(tmp, dest)
                    return
                log.warning("model %s: %s downloaded with %d bytes, sha256 differs from the "
                            "manifest (try %d of %d)", src.uri, f.path, size, attempt,
                            FETCH_TRIES)
        finally:
            tmp.unlink(missing_ok=True)
        raise Corrupt(f"model {src.uri}: {f.path} in S3 differs from {MANIFEST} (size or "
                      f"sha256, {FETCH_TRIES} downloads); push the model again")

    def config(self, src: Source) -> Path:
        """config.json alone, checked against the manifest, cached by its sha256."""
        manifest, _ = self.manifest(src)
        entry = manifest.file(CONFIG)
        if entry is None:
            raise NotFound(f"model {src.uri} has no {CONFIG}")
        path = self.cache / "configs" / f"{entry.sha256}.json"
        if path.is_file() and file_sha256(path) == entry.sha256:
            return path
        data = self.read(src, CONFIG)
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise Corrupt(f"model {src.uri}: {CONFIG} in S3 differs from {MANIFEST}; push "
                          "the model again")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return path

    # ------------------------------------------------------------- push, verify, list

    def push(self, folder: str | os.PathLike, src: Source,
             skip_same: bool = False) -> ModelManifest:
        """Upload every file of ``folder``, then its manifest (last: a prefix without one is
        not a model yet).  ``skip_same``: upload nothing when the prefix's manifest is
        already this folder's."""
        manifest = build_manifest(folder)
        if skip_same:
            with contextlib.suppress(NotFound, Corrupt):
                if self.manifest(src)[0] == manifest:
                    return manifest
        for f in manifest.files:
            self.upload(src, f.path, Path(folder) / f.path, sha256=f.sha256)
        self.upload(src, MANIFEST, None, manifest.to_json())
        return manifest

    def verify(self, src: Source, deep: bool = False) -> ModelManifest:
        """Every file of the manifest is in S3 with its size (``deep``: and its sha256, by
        downloading it); Corrupt naming the first that is not."""
        manifest, _ = self.manifest(src)
        found = self.sizes(src)
        for f in manifest.files:
            if f.path not in found:
                raise Corrupt(f"model {src.uri}: {f.path} is missing")
            if found[f.path] != f.size:
                raise Corrupt(f"model {src.uri}: {f.path} has {found[f.path]} bytes, the "
                              f"manifest says {f.size}")
        if deep:
            scratch = self.cache / f".verify-{secrets.token_hex(6)}"
            scratch.mkdir(parents=True)
            try:
                for f in manifest.files:
                    tmp = scratch / "file"
                    self.download(src, f.path, tmp)
                    if file_sha256(tmp) != f.sha256:
                        raise Corrupt(f"model {src.uri}: {f.path} differs from {MANIFEST} "
                                      "(sha256)")
                    tmp.unlink()
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        return manifest

    def list(self, src: Source) -> list[tuple[str, int, int]]:
        """(uri, files, bytes) of every model (a prefix with a manifest) under ``src``."""
        out = []
        for key in sorted(self.sizes(src)):
            if key == MANIFEST or key.endswith("/" + MANIFEST):
                sub = key[: -len(MANIFEST)]
                model = Source("s3", f"s3://{src.bucket}/{src.prefix}{sub}", bucket=src.bucket,
                               prefix=src.prefix + sub)
                m, _ = self.manifest(model)
                out.append((model.uri, len(m.files), m.total_bytes))
        return out


@contextlib.contextmanager
def _s3_errors(uri: str, what: str) -> Iterator[None]:
    """S3 and network errors as RiseErrors naming the model, never the endpoint."""
    try:
        yield
    except RiseError:
        raise
    except S3Error as e:
        if e.code in ("NoSuchKey", "NoSuchBucket", "NoSuchObject", "NotFound"):
            raise NotFound(f"model {uri}: cannot {what}: {e.code}") from None
        if e.code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise InvalidInput(f"model {uri}: cannot {what}: access denied ({e.code})") from None
        raise StorageError(f"model {uri}: cannot {what}: {e.code}") from None
    except MinioException as e:
        raise StorageError(f"model {uri}: cannot {what}: {type(e).__name__}") from None
    except (urllib3.exceptions.HTTPError, OSError) as e:
        log.warning("model %s: cannot %s: %s: %s", uri, what, type(e).__name__, e)
        raise StorageError(f"model {uri}: cannot {what}: {type(e).__name__} (the store is "
                           "unreachable or the local cache failed; see the log)") from None


def _stat(p: Path) -> list[int]:
    st = p.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _write_marker(marker: Path, folder: Path, manifest: ModelManifest) -> None:
    stats = {f.path: _stat(folder / f.path) for f in manifest.files}
    tmp = marker.with_name(f".{marker.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(json.dumps(stats, sort_keys=True))
    os.replace(tmp, marker)


def _read_marker(marker: Path) -> dict[str, Any]:
    try:
        data = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _unchanged(folder: Path, marker: Path, manifest: ModelManifest) -> bool:
    """Every file is where it was verified, with the same size, mtime and inode."""
    seen = _read_marker(marker)
    try:
        return bool(seen) and all(seen.get(f.path) == _stat(folder / f.path)
                                  for f in manifest.files)
    except OSError:
        return False


# ---------------------------------------------------------------------------- hub


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_cache() -> str:
    """huggingface_hub's cache folder as the environment says now (its own constant is
    read once, at import)."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub")


def _hub_fetch(src: Source, filename: str | None) -> Path:
    """The snapshot folder of a hub model (``filename``: that one file of it)."""
    # start-up: huggingface_hub (~0.3 s) only for a hub source, which most pools are not
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import hf_hub_download, snapshot_download

    offline = hub_offline()
    token = os.environ.get("HF_TOKEN") or None
    kw: dict[str, Any] = dict(revision=src.revision, cache_dir=hub_cache(),
                              local_files_only=offline, token=token)
    name = src.repo + (f"@{src.revision}" if src.revision else "")
    try:
        if filename is not None:
            return Path(hf_hub_download(src.repo, filename, **kw))
        return Path(snapshot_download(src.repo, allow_patterns=HUB_PATTERNS, **kw))
    except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled) as e:
        if offline:
            raise NotFound(f"hub model {name!r} is not in the local Hugging Face cache and "
                           "HF_HUB_OFFLINE=1 forbids downloading it: put it in S3 (rise "
                           "models push) or on a mounted volume") from None
        log.warning("hub model %s: %s", name, e)
        raise StorageError(f"cannot download hub model {name!r}: the hub is unreachable "
                           "(set HF_HUB_OFFLINE=1 where there is no internet)") from None
    except (hub_errors.GatedRepoError, hub_errors.RepositoryNotFoundError) as e:
        log.warning("hub model %s: %s", name, e)
        raise NotFound(f"hub model {name!r} not found or not accessible (a gated model "
                       "needs HF_TOKEN, from a Secret)") from None
    except (hub_errors.RevisionNotFoundError, hub_errors.EntryNotFoundError):
        raise NotFound(f"hub model {name!r}: no such revision or file"
                       + (f" ({filename})" if filename else "")) from None
    except (hub_errors.HfHubHTTPError, OSError, ValueError) as e:
        log.warning("hub model %s: %s: %s", name, type(e).__name__, e)
        raise StorageError(f"cannot download hub model {name!r}: {type(e).__name__}; see "
                           "the log") from None
