"""Settings of an edgelora application on Ray Serve: ``edgelora serve``'s options plus the replicas.

``RayOptions.from_config`` reads the ``args`` of a ``serve run`` / ``serve deploy`` config file:
the same names as ``edgelora serve``'s flags (``onnx_dir`` or ``onnx-dir``), plus ``replicas``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from edgelora.entrypoints.lora_modules import parse_lora_modules
from edgelora.entrypoints.server import ServeOptions
from edgelora.errors import UserInputError
from edgelora.runtime.config import parse_size

# A replica's queue when --max-waiting is not given: Ray needs a bound (max_ongoing_requests).
WAITING_PER_ROW = 8
INGRESS_MIN_ONGOING = 256
PATH_FIELDS = {"onnx_dir", "api_keys", "lora_root", "lora_cache_dir"}


@dataclass(kw_only=True)  # built by keyword only: a field added anywhere cannot shift the others
class RayOptions:
    """``edgelora serve --ray``: K replicas, each one engine with its own scheduler, behind one ingress."""

    serve: ServeOptions
    replicas: int = 1
    ray_address: str | None = None  # None: start a local Ray instance (loopback only)
    app_name: str = "edgelora"
    cpus: int | None = None  # logical CPUs of a local Ray instance; default: this machine's

    def validate(self) -> None:
        problems = []
        try:
            self.serve.validate()
        except UserInputError as exc:
            problems.append(str(exc))
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or self.replicas < 1:
            problems.append(f"--replicas {self.replicas} (>= 1)")
        if not self.app_name.strip():
            problems.append("the application name is empty")
        if problems:
            raise UserInputError("; ".join(problems))

    @property
    def threads(self) -> int:
        """ONNX Runtime threads of one replica, and the CPUs Ray reserves for it."""
        if self.serve.threads is not None:
            return self.serve.threads
        return max(1, (os.cpu_count() or 1) // self.replicas)

    @property
    def max_waiting(self) -> int:
        """A replica's queue beyond its rows."""
        if self.serve.max_waiting is not None:
            return self.serve.max_waiting
        return WAITING_PER_ROW * self.serve.max_num_seqs

    @property
    def replica_ongoing(self) -> int:
        """Ray's ``max_ongoing_requests`` of a replica: its rows plus its queue.

        The replica batches by itself; a lower limit would make Ray's router call the replica that
        holds an adapter "busy" and load the adapter on another one instead.
        """
        return self.serve.max_num_seqs + self.max_waiting

    @property
    def ingress_ongoing(self) -> int:
        return max(INGRESS_MIN_ONGOING, 2 * self.replicas * self.replica_ongoing)

    @classmethod
    def from_config(cls, args: dict) -> RayOptions:
        """Options from a Serve config's ``args`` (snake_case or kebab-case names); one-line errors."""
        if not isinstance(args, dict):
            raise UserInputError("the application's args must be a mapping (onnx_dir: ..., replicas: ...)")
        values = {str(key).replace("-", "_"): value for key, value in args.items()}
        own = {name: values.pop(name) for name in ("replicas", "ray_address", "app_name", "cpus") if name in values}
        serve_fields = {f.name for f in dataclasses.fields(ServeOptions)}
        unknown = sorted(set(values) - serve_fields)
        if unknown:
            raise UserInputError(f"unknown args {unknown}; expected {sorted(serve_fields | {'replicas'})}")
        if "onnx_dir" not in values:
            raise UserInputError("args: onnx_dir is required")
        for name in PATH_FIELDS & set(values):
            if values[name] is not None:
                values[name] = Path(values[name])
        modules = values.get("lora_modules") or {}
        if isinstance(modules, list):
            values["lora_modules"] = parse_lora_modules(modules)
        elif isinstance(modules, dict):
            values["lora_modules"] = {str(name): Path(path) for name, path in modules.items()}
        else:
            raise UserInputError("args: lora_modules must be a list of NAME=PATH or a mapping")
        for name in ("max_cpu_lora_memory", "lora_cache_max_size", "prefix_cache_memory"):
            if isinstance(values.get(name), str):  # "2GiB" in a Serve config
                values[name] = parse_size(values[name])
        options = cls(serve=ServeOptions(**values), **own)
        options.validate()
        return options
