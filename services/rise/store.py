"""Object stores: put, get, list, delete; no rename.

The index lives behind this interface so the same code runs on a local folder (the
embedded default) and on S3/MinIO in a cluster.  Every put is atomic: a reader sees the
whole object or nothing.  ``put(..., create_only=True)`` refuses to overwrite; manifests
use it so two writers can never both commit the same generation.
"""

from __future__ import annotations

import builtins
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from rise.errors import AlreadyExists, InvalidInput, NotFound, StorageError


@runtime_checkable
class Store(Protocol):
    """The object-store interface of an index (keys are '/'-separated relative names)."""

    def put(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        """Write ``data`` at ``key`` atomically; AlreadyExists if create_only and present."""

    def get(self, key: str) -> bytes:
        """The object's bytes; NotFound if absent."""

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes of the object from ``offset`` (fewer at its end); NotFound if
        absent.  Not checked against the object's hash: the caller checks the range."""

    def exists(self, key: str) -> bool:
        """Whether ``key`` holds an object."""

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys that start with ``prefix``."""

    def list_times(self, prefix: str = "") -> builtins.list[tuple[str, float]]:
        """``list`` with each object's last-modified time (epoch seconds)."""

    def delete(self, key: str) -> None:
        """Remove ``key``; absent keys are not an error (deletes are idempotent)."""

    def describe(self) -> str:
        """Where this store is, for messages."""


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


MAX_KEY_BYTES = 1024
"""S3's limit on an object key, in UTF-8 bytes."""


def key_problem(key: str) -> str | None:
    """Why ``key`` is not a valid object key, or None.  A valid key is at most
    ``MAX_KEY_BYTES`` of UTF-8 in '/'-separated names, none empty, '.' or '..', with no
    control character and no backslash (some S3 servers read it as a '/', so a key that
    looks inside a tenant's area could leave it)."""
    if not key:
        return "empty"
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        return "not valid UTF-8"
    if size > MAX_KEY_BYTES:
        return f"{size} bytes, over {MAX_KEY_BYTES}"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        return "a control character"
    if "\\" in key:
        return "a backslash"
    if any(p in ("", ".", "..") for p in key.split("/")):
        return "an empty, '.' or '..' part"
    return None


def check_key(key: str) -> str:
    """``key`` if it is a valid object key (``key_problem``), else InvalidInput: every
    store checks keys with it, and the gateway the keys a caller names."""
    problem = key_problem(key)
    if problem is not None:
        raise InvalidInput(f"invalid object key ({problem}): {key!r}")
    return key


def _check_range(offset: int, length: int) -> None:
    if isinstance(offset, bool) or isinstance(length, bool) or not isinstance(offset, int) \
            or not isinstance(length, int) or offset < 0 or length < 0:
        raise InvalidInput(f"invalid byte range: offset {offset!r}, length {length!r}")


class LocalStore:
    """A folder as an object store.

    Atomic puts write a temporary file in the target folder, fsync it, then either
    ``os.replace`` it (overwrite) or ``os.link`` it (create-only: link fails if the name
    exists, so exactly one of two racing writers wins).
    """

    def __init__(self, root: str | os.PathLike, label: str | None = None) -> None:
        self.root = Path(root)
        # What messages call this store (default: its folder): a service names it as its
        # callers address it, never by a path of its host.
        self.label = label

    def describe(self) -> str:
        return self.label or str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
            os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; objects are ordinary files
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                if create_only:
                    try:
                        os.link(tmp, path)
                    except FileExistsError:
                        raise AlreadyExists(f"{key} already exists in {self.describe()}") from None
                else:
                    os.replace(tmp, path)
                    tmp = ""
            finally:
                if tmp:
                    os.unlink(tmp)
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:
            raise StorageError(f"cannot write {key} in {self.describe()}: {e.strerror}") from None

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{key} not found in {self.describe()}") from None
        except OSError as e:
            raise StorageError(f"cannot read {key} in {self.describe()}: {e.strerror}") from None

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        _check_range(offset, length)
        try:
            with open(self._path(key), "rb") as f:
                f.seek(offset)
                return f.read(length)
        except FileNotFoundError:
            raise NotFound(f"{key} not found in {self.describe()}") from None
        except OSError as e:
            raise StorageError(f"cannot read {key} in {self.describe()}: {e.strerror}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        return [k for k, _ in self.list_times(prefix)]

    def list_times(self, prefix: str = "") -> builtins.list[tuple[str, float]]:
        if not self.root.is_dir():
            return []
        keys = []
        for dirpath, _, files in os.walk(self.root):
            rel = Path(dirpath).relative_to(self.root)
            for name in files:
                if name.startswith(".tmp-"):
                    continue  # an interrupted put: never an object
                key = (rel / name).as_posix() if rel != Path(".") else name
                if key.startswith(prefix):
                    try:
                        keys.append((key, os.stat(Path(dirpath) / name).st_mtime))
                    except FileNotFoundError:
                        continue  # deleted while listing
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StorageError(f"cannot delete {key} in {self.describe()}: {e.strerror}") from None
        # Keys are flat names: folders are an artefact of this store, so drop empty ones.
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent


class CountingStore:
    """A Store that reports the bytes it reads and writes (for the services' metrics)."""

    def __init__(self, inner: Store, on_read: Callable[[int], None] | None = None,
                 on_write: Callable[[int], None] | None = None) -> None:
        self.inner, self.on_read, self.on_write = inner, on_read, on_write

    def put(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        self.inner.put(key, data, create_only=create_only)
        if self.on_write is not None:
            self.on_write(len(data))

    def get(self, key: str) -> bytes:
        data = self.inner.get(key)
        if self.on_read is not None:
            self.on_read(len(data))
        return data

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        data = self.inner.get_range(key, offset, length)
        if self.on_read is not None:
            self.on_read(len(data))
        return data

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def list(self, prefix: str = "") -> list[str]:
        return self.inner.list(prefix)

    def list_times(self, prefix: str = "") -> builtins.list[tuple[str, float]]:
        return self.inner.list_times(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def describe(self) -> str:
        return self.inner.describe()
