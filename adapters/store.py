"""The adapter store: a directory of PEFT adapter folders, opened safely by id.

An adapter id is the relative path of one or two segments (`name` or `org/name`). The store is
the only code that turns ids into files, and it does so without a check-then-use race: each
segment is opened relative to its parent's directory descriptor with `O_NOFOLLOW`, and the two
files relative to the folder's descriptor, so a symbolic link anywhere below the store root is
refused at the moment of opening (a folder swapped for a link to outside between a check and a
read cannot be followed). Files are opened non-blocking and must be regular files (a FIFO named
`adapter_model.safetensors` cannot hang a reader). Only safetensors weights are ever read.

`OpenedAdapter.fingerprint` is the identity (device, inode, size, times) of what was actually
opened; the adapter manager records it at first load and checks it on every re-read.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from loraserve.errors import FailedPrecondition, InvalidArgument, NotFound
from loraserve.ids import validate_adapter_id

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
# adapter_config.json is a few hundred bytes; anything past this is not a PEFT config.
MAX_CONFIG_BYTES = 1024 * 1024

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def _identity(info: os.stat_result) -> tuple[int, ...]:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


@dataclass(frozen=True)
class Fingerprint:
    """Identity and version of an adapter's two files, as opened; changes when either changes."""

    config: tuple[int, ...]
    weights: tuple[int, ...]


@dataclass(frozen=True)
class AdapterFiles:
    """Paths of an adapter's files (for tools and tests; serving reads through AdapterStore.open)."""

    adapter_id: str
    folder: Path
    config: Path
    weights: Path


class OpenedAdapter:
    """An adapter's config and weights, open; read them through the descriptors, then close."""

    def __init__(self, adapter_id: str, config_fd: int, weights_fd: int) -> None:
        self.adapter_id = adapter_id
        self.config_fd = config_fd
        self.weights_fd = weights_fd
        config, weights = os.fstat(config_fd), os.fstat(weights_fd)
        self.fingerprint = Fingerprint(_identity(config), _identity(weights))
        self.config_size = config.st_size
        self.weights_size = weights.st_size

    def read_config(self) -> bytes:
        if self.config_size > MAX_CONFIG_BYTES:
            raise FailedPrecondition(
                f"adapter {self.adapter_id!r}: {CONFIG_FILE} is {self.config_size} bytes, above the "
                f"{MAX_CONFIG_BYTES}-byte limit for an adapter config"
            )
        return read_exactly(self.config_fd, 0, self.config_size, CONFIG_FILE)

    def close(self) -> None:
        for fd in (self.config_fd, self.weights_fd):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> OpenedAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_exactly(fd: int, offset: int, size: int, name: str) -> bytes:
    """`size` bytes at `offset` (pread, so the descriptor's position does not matter)."""
    chunks, done = [], 0
    while done < size:
        chunk = os.pread(fd, size - done, offset + done)
        if not chunk:
            raise FailedPrecondition(f"{name} is shorter than expected (truncated while reading?)")
        chunks.append(chunk)
        done += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class AdapterStore:
    """Read-only view of the store directory; the only code that turns ids into files."""

    def __init__(self, root: Path) -> None:
        # The root itself may be a link (e.g. a mounted volume); it is resolved once, here.
        self.root = Path(root).resolve()

    # ------------------------------------------------------------------ opening
    def _open_folder(self, adapter_id: str) -> int:
        """A descriptor of the adapter's folder, reached without following any link."""
        # Ids are validated at the edge; this re-check is the store's own guard, since it is the
        # layer where a bad segment would become a path.
        validate_adapter_id(adapter_id)
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as error:
            raise NotFound(
                f"adapter {adapter_id!r} not found: the adapter store is unreadable ({error})"
            ) from None
        for segment in adapter_id.split("/"):
            try:
                child = os.open(segment, _DIR_FLAGS, dir_fd=fd)
            except OSError as error:
                raise self._open_error(adapter_id, segment, fd, error, folder=True) from None
            finally:
                os.close(fd)
            fd = child
        return fd

    def _open_error(self, adapter_id: str, name: str, dir_fd: int, error: OSError, folder: bool) -> Exception:
        try:
            info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            info = None
        if info is not None and stat.S_ISLNK(info.st_mode):
            return FailedPrecondition(
                f"adapter {adapter_id!r}: {name} is a symbolic link, which could lead outside the "
                "adapter store; links are not followed in the store, refused"
            )
        if isinstance(error, PermissionError):
            return FailedPrecondition(f"adapter {adapter_id!r}: permission denied reading {name}")
        if folder:
            if error.errno == errno.ENOTDIR:
                return NotFound(f"adapter {adapter_id!r} is not a folder in the adapter store")
            return NotFound(f"adapter {adapter_id!r} not found in the adapter store")
        return FailedPrecondition(f"adapter {adapter_id!r}: cannot open {name}: {error.strerror}")

    def _open_file(self, adapter_id: str, folder_fd: int, name: str) -> int | None:
        """A regular file of the folder, opened without following a link; None when absent."""
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=folder_fd)
        except FileNotFoundError:
            return None
        except OSError as error:
            raise self._open_error(adapter_id, name, folder_fd, error, folder=False) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise FailedPrecondition(f"adapter {adapter_id!r}: {name} is not a regular file")
        return fd

    def open(self, adapter_id: str) -> OpenedAdapter:
        """Opens a PEFT adapter in safetensors format. NotFound, FailedPrecondition naming the problem."""
        folder = self._open_folder(adapter_id)
        config = weights = None
        try:
            config = self._open_file(adapter_id, folder, CONFIG_FILE)
            if config is None:
                raise FailedPrecondition(f"adapter {adapter_id!r} has no {CONFIG_FILE}")
            weights = self._open_file(adapter_id, folder, WEIGHTS_FILE)
            if weights is None:
                if any(_lexists(name, folder) for name in PICKLE_FILES):
                    raise FailedPrecondition(
                        f"adapter {adapter_id!r} has only pickle weights (adapter_model.bin); "
                        f"safetensors is required ({WEIGHTS_FILE}), pickle files are never loaded"
                    )
                raise FailedPrecondition(f"adapter {adapter_id!r} has no {WEIGHTS_FILE}")
            opened = OpenedAdapter(adapter_id, config, weights)
        except BaseException:
            for fd in (config, weights):
                if fd is not None:
                    os.close(fd)
            raise
        finally:
            os.close(folder)
        return opened

    def files(self, adapter_id: str) -> AdapterFiles:
        """The paths of an adapter whose files open cleanly now (tools and tests only: a path can
        be swapped for a link after this returns, a descriptor from open() cannot)."""
        self.open(adapter_id).close()
        folder = self.root / adapter_id
        return AdapterFiles(adapter_id, folder, folder / CONFIG_FILE, folder / WEIGHTS_FILE)

    def exists(self, adapter_id: str) -> bool:
        try:
            os.close(self._open_folder(adapter_id))
        except (NotFound, FailedPrecondition, InvalidArgument):
            return False
        return True

    def list_ids(self) -> list[str]:
        """Ids of every real folder (depth one or two) holding an adapter_config.json, sorted."""
        found: list[str] = []
        for first in _subfolders(self.root):
            if _is_file(first / CONFIG_FILE):
                found.append(first.name)
            found.extend(
                f"{first.name}/{second.name}"
                for second in _subfolders(first)
                if _is_file(second / CONFIG_FILE)
            )
        valid = []
        for adapter_id in found:
            try:
                valid.append(validate_adapter_id(adapter_id))
            except InvalidArgument:
                continue
        return sorted(valid)


def _lexists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return False
    return True


def _subfolders(path: Path) -> list[Path]:
    try:
        with os.scandir(path) as entries:
            return [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _is_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False
