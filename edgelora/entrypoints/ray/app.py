"""Build the Serve application (hub, replicas, ingress) and run it: ``edgelora serve --ray``.

``build_app`` checks everything it can before Ray sees it (the export, the keys file, every
``--lora-modules`` adapter against the model), so bad input fails in one line, not in a replica's
log. ``app_builder`` is the import path for ``serve run`` / ``serve deploy`` config files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from edgelora.entrypoints.ray.options import RayOptions
from edgelora.entrypoints.server import ServeOptions, bind_port, engine_settings, prepare_startup_adapters
from edgelora.entrypoints.server.adapters import AdapterSources
from edgelora.entrypoints.server.tenants import Tenants
from edgelora.errors import RuntimeFailure, UserInputError
from edgelora.formats.lora_manifest import LoraManifest
from edgelora.formats.model_spec import ModelSpec
from edgelora.runtime.adapter_cache import check_adapter

log = logging.getLogger(__name__)

# Ray picks the machine's routable address for a local instance unless told this is a one-box
# "cluster"; with it every Ray port binds 127.0.0.1.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}


def build_app(options: RayOptions):
    """The Serve application: ``EdgeLoraIngress`` over ``EdgeLoraReplica`` x K and one ``AdapterHub``."""
    from edgelora.entrypoints.ray.hub import AdapterHub
    from edgelora.entrypoints.ray.ingress import EdgeLoraIngress
    from edgelora.entrypoints.ray.replica import EdgeLoraReplica

    options.validate()
    served = _absolute(options.serve)  # replicas on other nodes (or another cwd) read the same paths
    onnx_dir = served.check_onnx_dir()
    Tenants.of(served.api_key, served.api_keys)  # a bad keys file fails here, not in the ingress
    startup = prepare_startup_adapters(served, AdapterSources(onnx_dir, served.cache_dir, served.lora_root))
    spec, manifest = ModelSpec.load(onnx_dir), LoraManifest.load(onnx_dir)
    adapters = {}  # name -> (folder, version): replicas load exactly the bytes checked here
    for name, folder in startup.items():
        try:
            adapters[name] = (str(folder), check_adapter(folder, spec, manifest, served.max_lora_rank).version)
        except UserInputError as exc:
            raise type(exc)(f"--lora-modules {name}: {exc}") from exc
    settings = engine_settings(served, {}, threads=options.threads, max_waiting=options.max_waiting)
    settings.engine.validate()
    settings.scheduler.validate()
    actor = {"num_cpus": options.threads}
    if served.device == "cuda":
        actor["num_gpus"] = 1
    hub = AdapterHub.bind(adapters)
    replicas = EdgeLoraReplica.options(
        num_replicas=options.replicas, max_ongoing_requests=options.replica_ongoing, ray_actor_options=actor,
        graceful_shutdown_timeout_s=served.shutdown_timeout_s).bind(settings, hub)
    return EdgeLoraIngress.options(max_ongoing_requests=options.ingress_ongoing,
                                   graceful_shutdown_timeout_s=served.shutdown_timeout_s
                                   ).bind(served, adapters, replicas, hub)


def _absolute(served: ServeOptions) -> ServeOptions:
    """The options with every path made absolute where the application is built."""
    def absolute(path):
        return None if path is None else Path(path).expanduser().absolute()

    return dataclasses.replace(
        served, onnx_dir=absolute(served.onnx_dir), api_keys=absolute(served.api_keys),
        lora_root=absolute(served.lora_root), lora_cache_dir=absolute(served.lora_cache_dir),
        lora_modules={name: absolute(path) for name, path in served.lora_modules.items()})


def app_builder(args: dict):
    """``import_path: edgelora.entrypoints.ray:app_builder`` in a Serve config; ``args`` as ``edgelora serve``'s flags."""
    return build_app(RayOptions.from_config(args))


def run(options: RayOptions) -> None:
    """Start (or join) Ray, deploy, serve until SIGTERM/SIGINT, then delete the application."""
    neutral_dir = Path(tempfile.mkdtemp(prefix="edgelora-ray-"))  # holds nothing a worker could import
    try:
        _run(options, neutral_dir)
    finally:
        shutil.rmtree(neutral_dir, ignore_errors=True)


def _run(options: RayOptions, neutral_dir: Path) -> None:
    options.validate()
    served = options.serve
    # The port stays bound until Ray has started: a taken one fails now, and Ray's own ports
    # (picked in ray.init) can never be this one. Serve's proxy binds it after.
    port = bind_port(served.host, served.port)
    try:
        for name, value in {**QUIET_ENV, **(LOOPBACK_ENV if options.ray_address is None else {})}.items():
            os.environ.setdefault(name, value)
        try:
            import ray
            from ray import serve
        except ImportError as exc:
            raise UserInputError(f"edgelora serve --ray needs {exc.name}: pip install 'edgelora[ray]'") from exc
        app = build_app(options)  # before Ray starts: bad input costs nothing
        if served.device == "cuda" and options.ray_address is None:
            from edgelora.runtime import native

            native.require_device("cuda")  # the replicas run here: a CPU-only build fails now, not in each one
        _init_ray(ray, options, neutral_dir)
    finally:
        port.close()
    stop = threading.Event()
    _check_resources(ray, options)
    # After ray.init (Ray's core installs a SIGTERM handler that aborts the process), and kept
    # through the teardown: a second SIGTERM must not cut the graceful stop short.
    with _stop_on_signals(stop):
        try:
            serve.start(http_options={"host": served.host, "port": served.port})
            try:
                serve.run(app, name=options.app_name, route_prefix="/")
            except RuntimeError as exc:
                raise RuntimeFailure(f"the application did not start: {str(exc).strip().splitlines()[0]}") from exc
            log.info("serving %s on http://%s:%d/v1 with %d replicas (Ray)", served.name, served.host, served.port,
                     options.replicas)
            while not stop.wait(0.5):
                pass
            log.info("stopping: deleting the application (running requests get up to %.0f s)",
                     served.shutdown_timeout_s)
            serve.delete(options.app_name)
        finally:
            if options.ray_address is None:
                serve.shutdown()
            ray.shutdown()


def _init_ray(ray, options: RayOptions, neutral_dir: Path) -> None:
    """``ray.init`` from ``neutral_dir``: Ray puts the driver's working directory first on every worker's
    ``sys.path``, so started from a source checkout the replicas would import its unbuilt ``edgelora/``
    instead of the installed package. A local instance's processes keep that folder as theirs."""
    with _chdir(neutral_dir):
        if options.ray_address is not None:
            try:
                ray.init(address=options.ray_address, log_to_driver=False)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise UserInputError(f"--ray-address {options.ray_address}: cannot join the Ray cluster: "
                                     f"{str(exc).strip().splitlines()[0]}") from exc
            return
        cpus = options.cpus or max(os.cpu_count() or 1, options.replicas * options.threads)
        # address "local": always a new instance, never one found on this machine; GPUs: Ray counts them itself
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)


@contextlib.contextmanager
def _chdir(path: Path):
    """contextlib.chdir for Python 3.10."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _check_resources(ray, options: RayOptions) -> None:
    """Replicas Ray cannot place would wait forever: refuse on a local instance, warn on a cluster
    (an autoscaler may still add nodes)."""
    available = ray.cluster_resources()
    wanted = {"CPU": options.replicas * options.threads}
    if options.serve.device == "cuda":
        wanted["GPU"] = options.replicas
    short = [f"{amount:g} {name} (Ray has {available.get(name, 0):g})" for name, amount in wanted.items()
             if available.get(name, 0) < amount]
    if not short:
        return
    message = (f"{options.replicas} replicas need " + ", ".join(short) + "; lower --replicas or --threads")
    if options.ray_address is None:
        ray.shutdown()
        raise UserInputError(message)
    log.warning("%s, or add nodes: until then Serve waits for them", message)


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event):
    """SIGTERM and SIGINT set ``stop`` (main thread only; the previous handlers come back afterwards)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, lambda *_: stop.set()) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
