"""API keys: who may call, as which tenant, on which adapters, with or without admin rights.

Keys live hashed (SHA-256) in a TOML file named by `api_keys_file`:

    [[keys]]
    name = "acme-prod"                 # shown in logs
    tenant = "acme"                    # fairness and per-tenant limits
    key_sha256 = "<64 hex digits>"     # `loraserve keygen` prints one
    adapters = ["acme/*", "pt-en"]     # glob patterns of adapter ids it may use
    base_model = true                  # may it call the base model (empty adapter_id)
    admin = false                      # may it call AdapterAdmin
    train = false                      # may it create and cancel training jobs (for its adapters)

Clients send `authorization: Bearer <key>` metadata.
"""

from __future__ import annotations

import fnmatch
import hashlib
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError, field_validator

from loraserve.config import ConfigError
from loraserve.errors import PermissionDenied, Unauthenticated

KEY_PREFIX = "lsk_"


class KeyEntry(BaseModel):
    """One entry of the keys file."""

    model_config = {"extra": "forbid"}

    name: str = ""
    tenant: str = Field(min_length=1, max_length=128)
    key_sha256: str
    adapters: list[str] = Field(default_factory=lambda: ["*"])
    base_model: bool = True
    admin: bool = False
    train: bool = False

    @field_validator("key_sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        value = value.strip().lower()
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise ValueError("key_sha256 must be 64 hex digits (the SHA-256 of the key)")
        return value


@dataclass(frozen=True)
class Principal:
    """The caller behind a request: a tenant and what it may do."""

    tenant: str
    name: str = ""
    adapters: tuple[str, ...] = ("*",)
    base_model: bool = True
    admin: bool = True
    train: bool = False

    def check_adapter(self, adapter_id: str) -> None:
        if adapter_id == "":
            if not self.base_model:
                raise PermissionDenied(f"tenant {self.tenant!r} may not use the base model")
            return
        if not any(fnmatch.fnmatchcase(adapter_id, pattern) for pattern in self.adapters):
            raise PermissionDenied(f"tenant {self.tenant!r} may not use adapter {adapter_id!r}")

    def check_admin(self) -> None:
        if not self.admin:
            raise PermissionDenied(f"tenant {self.tenant!r} may not call AdapterAdmin")

    def check_train(self, adapter_id: str) -> None:
        """Creating or cancelling a training job: the admin or train right, and the adapter id."""
        if not (self.admin or self.train):
            raise PermissionDenied(
                f"tenant {self.tenant!r} may not train adapters (needs the train or admin right)"
            )
        self.check_adapter(adapter_id)


# Without API keys every caller is this principal; the tenant then comes from the adapter id.
ANONYMOUS = Principal(tenant="")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class KeyRing:
    """Hashed keys -> principals, loaded once from the keys file."""

    def __init__(self, entries: list[KeyEntry]) -> None:
        self._by_hash = {
            e.key_sha256: Principal(
                e.tenant, e.name or e.tenant, tuple(e.adapters), e.base_model, e.admin, e.train
            )
            for e in entries
        }

    @classmethod
    def from_file(cls, path: Path) -> KeyRing:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"--api-keys-file: cannot read {path}: {error}") from None
        items = raw.get("keys")
        if not isinstance(items, list) or not items:
            raise ConfigError(f"--api-keys-file: {path} has no [[keys]] entries")
        entries = []
        for i, item in enumerate(items):
            try:
                entries.append(KeyEntry.model_validate(item))
            except ValidationError as error:
                first = error.errors()[0]
                field = ".".join(str(p) for p in first["loc"])
                raise ConfigError(f"--api-keys-file: keys[{i}].{field}: {first['msg']}") from None
        return cls(entries)

    def __len__(self) -> int:
        return len(self._by_hash)

    def authenticate(self, metadata: tuple | list | None) -> Principal:
        """The principal for `authorization: Bearer <key>` metadata, or Unauthenticated."""
        header = None
        for key, value in metadata or ():
            if key.lower() == "authorization":
                header = value if isinstance(value, str) else value.decode(errors="replace")
                break
        if header is None:
            raise Unauthenticated("missing API key: send metadata `authorization: Bearer <key>`")
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("malformed authorization metadata: expected `Bearer <key>`")
        principal = self._by_hash.get(hash_key(token.strip()))
        if principal is None:
            raise Unauthenticated("invalid API key")
        return principal


def key_entry_toml(
    key: str, tenant: str, adapters: list[str], admin: bool, name: str = "", base_model: bool = True
) -> str:
    """A [[keys]] block for the keys file (the key itself is not in it).

    Every right is written out, `base_model` included: a key limited to some adapters may still
    call the base model unless `base_model = false`, which a reader of the entry should see.
    """
    patterns = ", ".join(f'"{p}"' for p in adapters)
    return (
        "[[keys]]\n"
        f'name = "{name or tenant}"\n'
        f'tenant = "{tenant}"\n'
        f'key_sha256 = "{hash_key(key)}"\n'
        f"adapters = [{patterns}]  # glob patterns of the adapter ids it may use\n"
        f"base_model = {'true' if base_model else 'false'}  # may it call the base model (empty adapter_id)\n"
        f"admin = {'true' if admin else 'false'}  # may it call AdapterAdmin\n"
    )
