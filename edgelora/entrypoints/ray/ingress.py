"""The HTTP side on Ray Serve: ``edgelora serve``'s own FastAPI app, over the replicas instead of one engine.

Same routes (/v1/models, /v1/completions, /v1/chat/completions with streaming, /health, /metrics,
load/unload), the same tenants, the same protocol module and error shapes: ``create_app`` is
called with a ``ReplicaBackend``. Run-time loads are checked and (PEFT folders) processed here,
into ``--lora-cache-dir``, so that folder, like ``--lora-root``, must be storage every node sees.
"""

from __future__ import annotations

from pathlib import Path

from ray import serve

from edgelora.entrypoints.ray.backend import ReplicaBackend
from edgelora.entrypoints.ray.hub import Registry
from edgelora.entrypoints.server import ServeOptions
from edgelora.entrypoints.server.adapters import AdapterSources
from edgelora.entrypoints.server.app import AppState, create_app
from edgelora.entrypoints.server.metrics import ServerMetrics
from edgelora.entrypoints.server.tenants import Tenants
from edgelora.runtime.tokenizer import ChatTokenizer


@serve.deployment(name="EdgeLoraIngress", ray_actor_options={"num_cpus": 0})
@serve.ingress()
class EdgeLoraIngress:
    """Tokenizes, checks keys and adapters, and streams each request from the replica Ray picks."""

    async def __init__(self, options: ServeOptions, adapters: Registry, replicas, hub):
        onnx_dir = Path(options.onnx_dir)
        backend = ReplicaBackend(replicas, hub, adapters, onnx_dir, options.max_lora_rank)
        info = await replicas.info.remote()
        metrics = ServerMetrics(options.adapter_labels)
        self._state = AppState(options.name, backend, Tenants.of(options.api_key, options.api_keys), metrics,
                               AdapterSources(onnx_dir, options.cache_dir, options.lora_root), ChatTokenizer(onnx_dir),
                               info["max_model_len"], options.enable_lora_updates, set(adapters),
                               render_metrics=lambda: backend.render_metrics(metrics.registry),
                               on_demand=options.lora_on_demand, cache_max_bytes=options.lora_cache_max_size,
                               share_base_prefixes=options.prefix_cache_share_base,
                               max_num_seqs=options.max_num_seqs)

    def __serve_build_asgi_app__(self):
        return create_app(self._state)
