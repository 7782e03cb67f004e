"""Plain ONNX Runtime calls of model.onnx / lora_model.onnx for the graph-level tests.

Binding adapters here is a small numpy stand-in for the runtime's slot pool: stack the processed
tensors of the batch's adapters, zero-padded to the largest rank.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from safetensors.numpy import load_file

from edgelora.formats import contract
from edgelora.formats.lora_manifest import LoraManifest
from edgelora.formats.model_spec import ModelSpec
from edgelora.runtime.lora_routing import route

NUMPY = {"float32": np.float32, "float16": np.float16}


def all_nodes(graph) -> list:
    """Every node of an ONNX graph, those inside ``If`` branches included (depth first)."""
    found = []
    for node in graph.node:
        found.append(node)
        for attribute in node.attribute:
            if attribute.HasField("g"):
                found.extend(all_nodes(attribute.g))
    return found


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def empty_past(spec: ModelSpec, batch: int, capacity: int) -> dict[str, np.ndarray]:
    """Zeroed cache buffers with room for ``capacity`` positions (the graph writes into them)."""
    shape = (batch, spec.num_kv_heads, capacity, spec.head_dim)
    feeds = {}
    for layer in range(spec.num_layers):
        feeds[contract.past_key_name(layer)] = np.zeros(shape, NUMPY[spec.dtype])
        feeds[contract.past_value_name(layer)] = np.zeros(shape, NUMPY[spec.dtype])
    return feeds


def past_from_outputs(spec: ModelSpec, outputs: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of a run (logits first, then present key/value per layer) as the next run's past."""
    feeds = {}
    for layer in range(spec.num_layers):
        feeds[contract.past_key_name(layer)] = outputs[1 + 2 * layer]
        feeds[contract.past_value_name(layer)] = outputs[2 + 2 * layer]
    return feeds


def token_feeds(input_ids: np.ndarray, past_len: int = 0) -> dict[str, np.ndarray]:
    batch, seq = input_ids.shape
    return {
        contract.INPUT_IDS: input_ids.astype(np.int64),
        contract.ATTENTION_MASK: np.ones((batch, past_len + seq), np.int64),
        contract.POSITION_IDS: np.tile(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, 1)),
    }


def lora_feeds(manifest: LoraManifest, processed_dirs: list[Path | None], seq: int,
               dtype: str = "float32") -> dict[str, np.ndarray]:
    """Stack the distinct adapters of a batch; row b uses ``processed_dirs[b]`` (None: no adapter).

    ``logits_positions`` keeps every one of the ``seq`` positions, so logits compare with model.onnx's.
    """
    distinct = []
    for directory in processed_dirs:
        if directory is not None and directory not in distinct:
            distinct.append(directory)
    tensors = [load_file(str(Path(d) / contract.PROCESSED_ADAPTER)) for d in distinct]
    rank = max((t.shape[1] for adapter in tensors for name, t in adapter.items() if name.endswith(".A")), default=0)
    rows = [() if d is None else ((distinct.index(d) + 1, 1.0),) for d in processed_dirs]
    routing = route(rows, [seq] * len(processed_dirs), NUMPY[dtype])
    feeds = {contract.LORA_TOKENS: routing.tokens, contract.LORA_WEIGHTS: routing.weights, contract.LORA_BACK: routing.back,
             contract.LOGITS_POSITIONS: np.tile(np.arange(seq, dtype=np.int64), (len(processed_dirs), 1))}
    stack = max(len(distinct), 1)  # no adapter: one empty entry
    for site in manifest.sites:
        a = np.zeros((stack, rank, site.in_features), NUMPY[dtype])  # A transposed, per stack entry
        b = np.zeros((stack, rank, site.out_features), NUMPY[dtype])
        for entry, adapter in enumerate(tensors):
            if site.a_name in adapter:
                r = adapter[site.a_name].shape[1]
                a[entry, :r, :] = adapter[site.a_name].T
                b[entry, :r, :] = adapter[site.b_name]
        feeds[site.a_name] = a.reshape(contract.lora_a_shape(stack, site.in_features, rank))
        feeds[site.b_name] = b.reshape(contract.lora_b_shape(stack, rank, site.out_features))
    return feeds
