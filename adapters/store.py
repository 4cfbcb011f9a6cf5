"""The adapter store: a directory of PEFT adapter folders, addressed by safe ids.

An adapter id is the relative path of one or two segments (`name` or `org/name`), each
matching `[A-Za-z0-9][A-Za-z0-9._-]*`, never `..`; its resolved path must stay inside the
store, so a symlink pointing out is refused. Only safetensors weights are ever read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraserve.errors import FailedPrecondition, InvalidArgument, NotFound
from loraserve.ids import validate_adapter_id

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")


@dataclass(frozen=True)
class AdapterFiles:
    """Where one adapter's files are, and a fingerprint that changes when they change."""

    adapter_id: str
    folder: Path
    config: Path
    weights: Path

    def fingerprint(self) -> tuple[int, int, int, int]:
        config, weights = self.config.stat(), self.weights.stat()
        return (config.st_mtime_ns, config.st_size, weights.st_mtime_ns, weights.st_size)


class AdapterStore:
    """Read-only view of the store directory; the only code that turns ids into paths."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def _folder(self, adapter_id: str) -> Path:
        validate_adapter_id(adapter_id)
        folder = self.root / adapter_id
        if not folder.exists():
            raise NotFound(f"adapter {adapter_id!r} not found in the adapter store")
        resolved = folder.resolve()
        if not resolved.is_relative_to(self.root):
            raise FailedPrecondition(f"adapter {adapter_id!r} resolves outside the adapter store; refused")
        if not resolved.is_dir():
            raise NotFound(f"adapter {adapter_id!r} is not a folder in the adapter store")
        return resolved

    def exists(self, adapter_id: str) -> bool:
        try:
            self._folder(adapter_id)
        except (NotFound, FailedPrecondition):
            return False
        return True

    def files(self, adapter_id: str) -> AdapterFiles:
        """Checks the folder holds a PEFT adapter in safetensors format and returns its files."""
        folder = self._folder(adapter_id)
        config = folder / CONFIG_FILE
        weights = folder / WEIGHTS_FILE
        for path in (config, weights):
            if path.exists() and not path.resolve().is_relative_to(self.root):
                raise FailedPrecondition(f"adapter {adapter_id!r}: {path.name} resolves outside the store")
        if not config.is_file():
            raise FailedPrecondition(f"adapter {adapter_id!r} has no {CONFIG_FILE}")
        if not weights.is_file():
            if any((folder / name).exists() for name in PICKLE_FILES):
                raise FailedPrecondition(
                    f"adapter {adapter_id!r} has only pickle weights (adapter_model.bin); "
                    f"safetensors is required ({WEIGHTS_FILE}), pickle files are never loaded"
                )
            raise FailedPrecondition(f"adapter {adapter_id!r} has no {WEIGHTS_FILE}")
        return AdapterFiles(adapter_id, folder, config, weights)

    def list_ids(self) -> list[str]:
        """Ids of every folder (depth one or two) holding an adapter_config.json, sorted."""
        found: list[str] = []
        if not self.root.is_dir():
            return found
        for config in sorted(self.root.glob(f"*/{CONFIG_FILE}")) + sorted(
            self.root.glob(f"*/*/{CONFIG_FILE}")
        ):
            adapter_id = config.parent.relative_to(self.root).as_posix()
            try:
                validate_adapter_id(adapter_id)
            except InvalidArgument:
                continue
            if self.exists(adapter_id):
                found.append(adapter_id)
        return sorted(found)
