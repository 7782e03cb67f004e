"""API keys: who may call the server, which adapters each key sees, and how much it may queue.

``--api-keys FILE`` is JSON ``{"KEY": {"adapters": ["a", "b", "acme-*"] | "*", "admin": bool,
"max_concurrent": int}}``; ``--api-key KEY`` is one key with every adapter and admin rights;
neither means an open server (every caller is an admin that sees every adapter). An entry of
``adapters`` with ``*``, ``?`` or ``[...]`` is a pattern (``fnmatch``, case-sensitive): a key for
one customer's adapters under ``--lora-root`` names them as ``acme-*``.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

from edgelora.errors import UserInputError


@dataclass(frozen=True)
class Tenant:
    """One key's rights. ``adapters`` None means every adapter, those loaded at run time too."""

    label: str  # for logs and errors; never the key itself
    adapters: frozenset[str] | None = None
    admin: bool = False
    max_concurrent: int | None = None  # running + waiting requests at once

    patterns: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        wild = tuple(sorted(a for a in self.adapters or () if any(c in a for c in "*?[")))
        object.__setattr__(self, "patterns", wild)

    def may_use(self, adapter: str) -> bool:
        if self.adapters is None or adapter in self.adapters:
            return True
        return any(fnmatchcase(adapter, pattern) for pattern in self.patterns)


OPEN = Tenant("open", None, admin=True)


class Tenants:
    """Maps a bearer token to its tenant; compares keys in constant time."""

    def __init__(self, keys: dict[str, Tenant]):
        self._keys = keys

    @property
    def open(self) -> bool:
        return not self._keys

    @classmethod
    def of(cls, api_key: str | None, api_keys: Path | None) -> Tenants:
        """The tenants ``--api-key`` / ``--api-keys`` describe (an open server with neither)."""
        if api_keys is not None:
            return cls.load(api_keys)
        if api_key is not None:
            return cls.single(api_key)
        return cls.none()

    @classmethod
    def none(cls) -> Tenants:
        return cls({})

    @classmethod
    def single(cls, key: str) -> Tenants:
        if not key:
            raise UserInputError("--api-key: the key is empty")
        return cls({key: Tenant("api-key", None, admin=True)})

    @classmethod
    def load(cls, path: Path) -> Tenants:
        """Read and check a keys file; every problem is reported at once."""
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise UserInputError(f"--api-keys {path}: cannot read: {exc}") from exc
        if not isinstance(raw, dict) or not raw:
            raise UserInputError(f"--api-keys {path}: expected a non-empty JSON object {{\"KEY\": {{...}}}}")
        keys, problems = {}, []
        for index, (key, entry) in enumerate(raw.items()):
            where = f"key #{index + 1}"
            if not key or not isinstance(entry, dict):
                problems.append(f"{where}: expected a non-empty key and an object")
                continue
            unknown = sorted(set(entry) - {"adapters", "admin", "max_concurrent"})
            if unknown:
                problems.append(f"{where}: unknown fields {unknown}")
            adapters = entry.get("adapters", [])
            if adapters != "*" and not (isinstance(adapters, list) and all(isinstance(a, str) and a for a in adapters)):
                problems.append(f"{where}: adapters must be \"*\" or a list of names")
                continue
            admin = entry.get("admin", False)
            if not isinstance(admin, bool):
                problems.append(f"{where}: admin must be true or false")
            limit = entry.get("max_concurrent")
            if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
                problems.append(f"{where}: max_concurrent must be a positive integer")
            keys[key] = Tenant(where, None if adapters == "*" else frozenset(adapters), admin is True, limit)
        if problems:
            raise UserInputError(f"--api-keys {path}: " + "; ".join(problems))
        return cls(keys)

    def authenticate(self, authorization: str | None) -> Tenant | None:
        """The tenant of an ``Authorization: Bearer KEY`` header; OPEN without keys; None if it matches none."""
        if self.open:
            return OPEN
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        token = token.strip().encode()
        found = None
        for key, tenant in self._keys.items():  # every key compared: the time does not say which matched
            if hmac.compare_digest(key.encode(), token):
                found = tenant
        return found
