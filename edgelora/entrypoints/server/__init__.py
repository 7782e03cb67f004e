"""``edgelora serve``: an OpenAI-compatible multi-LoRA server over the step scheduler.

    from edgelora.entrypoints.server import ServeOptions, serve
    serve(ServeOptions(onnx_dir=Path("llm_onnx"), lora_modules={"french": Path("adapters/french")}))

Startup order: check the options, bind the port, prepare the ``--lora-modules`` (PEFT folders are
processed), load the model on the engine thread, then serve with uvicorn until SIGTERM/SIGINT;
on SIGTERM new connections are refused, running requests finish (up to ``shutdown_timeout_s``)
and ``serve`` returns normally.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

from edgelora.errors import UserInputError
from edgelora.formats import contract
from edgelora.runtime.config import ADAPTER_LABELS, EngineConfig, SchedulerConfig

log = logging.getLogger(__name__)

__all__ = ["ServeOptions", "bind_port", "engine_settings", "prepare_startup_adapters", "serve"]


@dataclass(kw_only=True)  # built by keyword only: a field added anywhere cannot shift the others
class ServeOptions:
    """Every setting of ``edgelora serve`` (vLLM's flag names)."""

    onnx_dir: Path
    lora_modules: dict[str, Path] = field(default_factory=dict)  # name -> PEFT or processed folder
    served_model_name: str | None = None  # default: the onnx folder's name
    max_loras: int = EngineConfig.max_loras
    max_cpu_loras: int | None = EngineConfig.max_cpu_loras  # None: EngineConfig.host_loras' rule
    max_cpu_lora_memory: int | None = EngineConfig.max_cpu_lora_bytes  # bytes of host-ready adapters (per replica)
    max_lora_rank: int = EngineConfig.max_lora_rank
    max_num_seqs: int = SchedulerConfig.max_num_seqs
    max_model_len: int | None = None
    max_num_batched_tokens: int | None = SchedulerConfig.max_num_batched_tokens  # None: the default rule; 0: no limit
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    api_keys: Path | None = None
    lora_root: Path | None = None
    lora_cache_dir: Path | None = None  # default: <onnx_dir>/.lora_cache
    enable_lora_updates: bool = False
    lora_on_demand: bool = False  # a request naming a folder directly under lora_root loads it
    lora_cache_max_size: int | None = None  # bytes of on-demand PEFT adapters processed into the cache (LRU)
    max_waiting: int | None = None
    device: str = "cpu"
    threads: int | None = None
    shutdown_timeout_s: float = 30.0
    adapter_labels: int = ADAPTER_LABELS  # adapters with metric series of their own; later ones count as "other"
    enable_prefix_caching: bool = SchedulerConfig.enable_prefix_caching
    prefix_cache_memory: int = SchedulerConfig.prefix_cache_bytes  # bytes of cached prompt KV (per replica)
    prefix_cache_share_base: bool = False  # base-model prefixes shared across tenants (else keyed by tenant)

    def validate(self) -> None:
        """Everything that can be refused before the model loads, all problems at once."""
        problems = []
        if self.enable_lora_updates and self.lora_root is None:
            problems.append("--enable-lora-updates needs --lora-root DIR (run-time adapters must come from inside it)")
        if self.lora_on_demand and self.lora_root is None:
            problems.append("--lora-on-demand needs --lora-root DIR (the folders requests may name)")
        if self.lora_cache_max_size is not None and self.lora_cache_max_size < 1:
            problems.append(f"--lora-cache-max-size {self.lora_cache_max_size} (>= 1 byte)")
        if self.lora_root is not None and not Path(self.lora_root).is_dir():
            problems.append(f"--lora-root {self.lora_root}: no such folder")
        if self.api_key is not None and self.api_keys is not None:
            problems.append("give --api-key or --api-keys, not both")
        if not 0 <= self.port <= 65535:
            problems.append(f"--port {self.port} (0..65535)")
        if self.adapter_labels < 0:
            problems.append(f"--metrics-adapter-labels {self.adapter_labels} (>= 0)")
        if self.shutdown_timeout_s < 0:
            problems.append(f"--shutdown-timeout {self.shutdown_timeout_s} (>= 0)")
        if self.served_model_name is not None and not self.served_model_name.strip():
            problems.append("--served-model-name is empty")
        for config in (self.engine_config(), self.scheduler_config()):
            try:
                config.validate()
            except UserInputError as exc:
                problems.append(str(exc))
        if problems:
            raise UserInputError("; ".join(problems))

    def engine_config(self, threads: int | None = None) -> EngineConfig:
        """The engine's settings (``threads`` overrides ``--threads``: a Ray replica's share)."""
        return EngineConfig(max_lora_rank=self.max_lora_rank, max_loras=self.max_loras,
                            max_cpu_loras=self.max_cpu_loras, max_cpu_lora_bytes=self.max_cpu_lora_memory,
                            device=self.device, num_threads=threads or self.threads)

    def scheduler_config(self, max_waiting: int | None = None) -> SchedulerConfig:
        """The scheduler's settings (``max_waiting`` overrides ``--max-waiting``: a Ray replica's bound)."""
        return SchedulerConfig(max_num_seqs=self.max_num_seqs, max_model_len=self.max_model_len,
                               max_num_batched_tokens=self.max_num_batched_tokens,
                               max_waiting=self.max_waiting if max_waiting is None else max_waiting,
                               enable_prefix_caching=self.enable_prefix_caching,
                               prefix_cache_bytes=self.prefix_cache_memory)

    @property
    def name(self) -> str:
        return self.served_model_name or Path(self.onnx_dir).resolve().name

    @property
    def cache_dir(self) -> Path:
        return Path(self.lora_cache_dir or Path(self.onnx_dir) / ".lora_cache")

    def check_onnx_dir(self) -> Path:
        onnx_dir = Path(self.onnx_dir)
        if not (onnx_dir / contract.LORA_MODEL_ONNX).is_file():
            raise UserInputError(f"{onnx_dir}: no {contract.LORA_MODEL_ONNX}; "
                                 f"run 'edgelora insert-lora --onnx-dir {onnx_dir}'")
        return onnx_dir


def prepare_startup_adapters(options: ServeOptions, sources) -> dict[str, Path]:
    """``--lora-modules`` as processed folders (PEFT folders processed into the cache), name clashes refused."""
    startup = {}
    for name, path in options.lora_modules.items():
        try:
            startup[name] = sources.prepare(path)
        except UserInputError as exc:
            raise type(exc)(f"--lora-modules {name}: {exc}") from exc
    if options.name in startup:
        raise UserInputError(f"--lora-modules {options.name}: the served model has that name")
    return startup


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_port(host: str, port: int) -> socket.socket:
    """Bind the port before the model loads, so a taken port fails at once with one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    # without it a response whose headers and body are two writes waits for a delayed ACK (40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserInputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


def serve(options: ServeOptions) -> None:
    """Run the server until SIGTERM or SIGINT (KeyboardInterrupt); raises our errors on bad settings."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise UserInputError(f"edgelora serve needs {exc.name}: pip install 'edgelora[serve]'") from exc

    from edgelora.entrypoints.server.adapters import AdapterSources
    from edgelora.entrypoints.server.app import AppState, create_app
    from edgelora.entrypoints.server.engine_loop import EngineLoop
    from edgelora.entrypoints.server.metrics import ServerMetrics
    from edgelora.entrypoints.server.tenants import Tenants
    from edgelora.runtime.tokenizer import ChatTokenizer

    options.validate()
    onnx_dir = options.check_onnx_dir()
    tenants = Tenants.of(options.api_key, options.api_keys)
    if tenants.open and not _is_loopback(options.host):
        log.warning("listening on %s with no API key: anyone who can reach it may use it "
                    "(give --api-key or --api-keys)", options.host)
    sock = bind_port(options.host, options.port)
    try:
        sources = AdapterSources(onnx_dir, options.cache_dir, options.lora_root)
        startup = prepare_startup_adapters(options, sources)
        settings = engine_settings(options, startup)
        metrics = ServerMetrics(options.adapter_labels)
        engine = EngineLoop(settings, metrics)
        info = engine.start()
        try:
            state = AppState(options.name, engine, tenants, metrics, sources, ChatTokenizer(onnx_dir),
                             info.max_model_len, options.enable_lora_updates, set(info.adapters),
                             max_loras=options.max_loras, on_demand=options.lora_on_demand,
                             cache_max_bytes=options.lora_cache_max_size,
                             share_base_prefixes=options.prefix_cache_share_base, max_num_seqs=options.max_num_seqs)
            config = uvicorn.Config(create_app(state), log_config=None, lifespan="on",
                                    timeout_graceful_shutdown=options.shutdown_timeout_s)
            server = uvicorn.Server(config)
            log.info("serving %s (%d adapters) on http://%s:%d/v1", options.name, len(info.adapters),
                     options.host, sock.getsockname()[1])
            room = settings.engine
            chunk = min(room.lora_chunk_rank, room.max_lora_rank)
            log.info("adapter slots: room for %d adapters of rank %d, or %d of rank %d and below at once",
                     room.max_loras, room.max_lora_rank, room.max_loras * -(-room.max_lora_rank // chunk), chunk)
            _run_until_signal(server, sock)
        finally:
            engine.stop()
    finally:
        sock.close()


def engine_settings(options: ServeOptions, adapters: dict[str, Path], threads: int | None = None,
                    max_waiting: int | None = None):
    """What one engine thread builds from the options (``threads``/``max_waiting`` override them: Ray replicas)."""
    from edgelora.entrypoints.server.engine_loop import EngineSettings

    return EngineSettings(onnx_dir=Path(options.onnx_dir), engine=options.engine_config(threads),
                          scheduler=options.scheduler_config(max_waiting), adapters=adapters,
                          adapter_labels=options.adapter_labels)


def _run_until_signal(server, sock: socket.socket) -> None:
    """Run uvicorn; SIGTERM means a graceful stop and a normal return (exit 0).

    uvicorn handles SIGTERM itself while it runs, then restores the previous handler and raises the
    signal again; ours only asks the server to exit (a no-op by then, and a prompt stop if the
    signal comes before uvicorn has installed its own).
    """
    if threading.current_thread() is not threading.main_thread():
        server.run(sockets=[sock])
        return

    def stop(signum, frame) -> None:
        server.should_exit = True

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
