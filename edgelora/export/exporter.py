"""Export a Hugging Face decoder to ``model.onnx`` with an in-place KV cache (see attention.py)."""

from __future__ import annotations

import json
import logging
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from tqdm import tqdm

from edgelora.errors import UnsupportedModelError, UserInputError
from edgelora.export import attention, rotary
from edgelora.export.branches import where_to_if
from edgelora.export.gguf import convert_gguf, find_gguf
from edgelora.export.hf_folder import copy_tokenizer_files, eos_token_ids, read_hf_config
from edgelora.formats import contract
from edgelora.formats.fileio import staged_output
from edgelora.formats.model_spec import DTYPES, ModelSpec

log = logging.getLogger(__name__)

OPSET = 17
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_PROJECTION_RE = re.compile(r"/layers\.(\d+)/(self_attn|mlp)/(\w+_proj)/MatMul$")


@dataclass
class ExportOptions:
    """What ``edgelora export`` takes besides the two folders."""

    dtype: str = "float32"
    progress: bool = True
    gguf_file: str | None = None  # a .gguf inside --model-dir (transformers' gguf_file)
    save_hf_dir: Path | None = None  # keep the float HF folder a GGUF is turned into (else a temporary one)


class _DecoderWithCache(torch.nn.Module):
    """Flat graph interface around a transformers CausalLM: tensors in, logits + cache out."""

    def __init__(self, model: torch.nn.Module, num_layers: int):
        super().__init__()
        self.model = model
        self.num_layers = num_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        # Each row's cache holds its tokens at their positions; the mask says which keys are real.
        state = attention.KVState(past=list(past), attention_mask=attention_mask, position_ids=position_ids)
        out = self.model(
            input_ids=input_ids, position_ids=position_ids, attention_mask=None, use_cache=False, edgelora_kv=state
        )
        flat = []
        for layer in range(self.num_layers):
            flat.extend(state.present[layer])
        return (out.logits, *flat)


def _io_names(num_layers: int) -> tuple[list[str], list[str]]:
    cache_in, cache_out = [], []
    for layer in range(num_layers):
        cache_in += [contract.past_key_name(layer), contract.past_value_name(layer)]
        cache_out += [contract.present_key_name(layer), contract.present_value_name(layer)]
    inputs = [contract.INPUT_IDS, contract.ATTENTION_MASK, contract.POSITION_IDS, *cache_in]
    return inputs, [contract.LOGITS, *cache_out]


def _dynamic_axes(inputs: list[str], outputs: list[str]) -> dict[str, dict[int, str]]:
    axes = {
        contract.INPUT_IDS: {0: "batch", 1: "sequence"},
        contract.ATTENTION_MASK: {0: "batch", 1: "total_sequence"},
        contract.POSITION_IDS: {0: "batch", 1: "sequence"},
        contract.LOGITS: {0: "batch", 1: "sequence"},
    }
    for name in inputs[3:]:
        axes[name] = {0: "batch", 2: "past_sequence"}
    for name in outputs[1:]:  # present is the past buffer with this call's positions written
        axes[name] = {0: "batch", 2: "past_sequence"}
    return axes


def _load_model(model_dir: Path, dtype: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserInputError(f"--model_dir {model_dir}: cannot load the model: {str(exc).splitlines()[0]}") from exc
    return model.to(TORCH_DTYPES[dtype]).eval()


def _spec_from_model(model: torch.nn.Module, config: dict, model_dir: Path, dtype: str) -> ModelSpec:
    hf = model.config
    layers = model.model.layers
    first = layers[0]
    shapes = {}
    for module in contract.MODULES:
        linear = getattr(getattr(first, module.block), module.hf_name, None)
        if linear is None:
            raise UnsupportedModelError(f"{model_dir}: layer 0 has no {module.block}.{module.hf_name}")
        out_features, in_features = linear.weight.shape
        shapes[module.short] = [int(in_features), int(out_features)]
    num_heads = int(hf.num_attention_heads)
    head_dim = int(getattr(hf, "head_dim", None) or hf.hidden_size // num_heads)
    return ModelSpec(
        architecture=(config.get("architectures") or [type(model).__name__])[0],
        family=config["model_type"],
        num_layers=len(layers),
        num_heads=num_heads,
        num_kv_heads=int(getattr(hf, "num_key_value_heads", None) or num_heads),
        head_dim=head_dim,
        hidden_size=int(hf.hidden_size),
        intermediate_size=int(hf.intermediate_size),
        vocab_size=int(hf.vocab_size),
        max_position_embeddings=int(getattr(hf, "max_position_embeddings", 0) or 0),
        dtype=dtype,
        eos_token_ids=eos_token_ids(model_dir, config),
        bos_token_id=getattr(hf, "bos_token_id", None),
        pad_token_id=getattr(hf, "pad_token_id", None),
        module_shapes=shapes,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        source_model=str(Path(model_dir).resolve()),
    )


def _trace(model: torch.nn.Module, spec: ModelSpec, path: Path) -> None:
    """Trace the wrapped model with small dummy inputs; every size stays symbolic in the graph."""
    attention.register()
    model.config._attn_implementation = attention.ATTENTION_IMPLEMENTATION
    wrapper = _DecoderWithCache(model, spec.num_layers)
    batch, seq, max_len = 2, 3, 7
    dtype = TORCH_DTYPES[spec.dtype]
    input_ids = torch.zeros((batch, seq), dtype=torch.int64)
    attention_mask = torch.ones((batch, seq), dtype=torch.int64)
    position_ids = torch.arange(seq, dtype=torch.int64).expand(batch, seq)
    past = [torch.zeros((batch, spec.num_kv_heads, max_len, spec.head_dim), dtype=dtype)
            for _ in range(2 * spec.num_layers)]
    inputs, outputs = _io_names(spec.num_layers)
    # The tracer's warnings are about shapes it freezes (head counts), which is what we want.
    with torch.no_grad(), warnings.catch_warnings(), rotary.fused_rotary(model):
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            wrapper,
            (input_ids, attention_mask, position_ids, *past),
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=_dynamic_axes(inputs, outputs),
            opset_version=OPSET,
            dynamo=False,
        )


def name_projections(model_proto: onnx.ModelProto, spec: ModelSpec) -> None:
    """Rename every projection MatMul to the contract's name and check that none is missing."""
    found: dict[str, onnx.NodeProto] = {}
    hf_to_short = {m.hf_name: m.short for m in contract.MODULES}
    for node in model_proto.graph.node:
        match = _PROJECTION_RE.search(node.name) if node.op_type == "MatMul" else None
        if match and match.group(3) in hf_to_short:
            name = contract.projection_node_name(int(match.group(1)), hf_to_short[match.group(3)])
            if name in found:
                raise UnsupportedModelError(f"two MatMuls map to {name}: the graph layout is not understood")
            node.name = name
            found[name] = node
    expected = {contract.projection_node_name(layer, m) for layer in range(spec.num_layers) for m in contract.MODULE_NAMES}
    missing = sorted(expected - set(found))
    if missing:
        raise UnsupportedModelError(f"exported graph lacks projection MatMuls, e.g. {missing[0]} ({len(missing)} missing)")


def export_model(model_dir: Path, output_dir: Path, options: ExportOptions | None = None) -> ModelSpec:
    """Write ``model.onnx`` (+ ``model.onnx.data``), ``config.json`` and the tokenizer files."""
    options = options or ExportOptions()
    if options.dtype not in DTYPES:
        raise UserInputError(f"--dtype {options.dtype}: expected one of {', '.join(DTYPES)}")
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    gguf = find_gguf(model_dir, options.gguf_file)
    if gguf is not None:  # GGUF -> float HF folder (kept with save_hf_dir) -> the export below
        if options.save_hf_dir is not None:
            return export_model(convert_gguf(gguf, Path(options.save_hf_dir)), output_dir,
                                ExportOptions(options.dtype, options.progress))
        with tempfile.TemporaryDirectory(prefix="edgelora-gguf-") as folder:
            return export_model(convert_gguf(gguf, Path(folder) / "model"), output_dir,
                                ExportOptions(options.dtype, options.progress))
    if options.save_hf_dir is not None:
        raise UserInputError("--save-hf-dir is for a GGUF --model-dir; this one is a Hugging Face folder")
    config = read_hf_config(model_dir)
    steps = tqdm(total=4, desc="export", unit="step", disable=not options.progress)
    steps.set_postfix_str("loading weights")
    model = _load_model(model_dir, options.dtype)
    spec = _spec_from_model(model, config, model_dir, options.dtype)
    steps.update()
    with staged_output(output_dir, stale=contract.DERIVED_FROM_EXPORT) as staging, tempfile.TemporaryDirectory(dir=staging) as trace_dir:
        steps.set_postfix_str("tracing")
        traced = Path(trace_dir) / contract.MODEL_ONNX
        _trace(model, spec, traced)
        del model
        steps.update()
        steps.set_postfix_str("naming projections")
        model_proto = onnx.load(str(traced))
        name_projections(model_proto, spec)
        if where_to_if(model_proto, spec.dtype) != spec.num_layers:
            raise UnsupportedModelError("exported graph: the attention of some layer has no phase branch")
        steps.update()
        steps.set_postfix_str("writing model.onnx")
        onnx.save_model(
            model_proto,
            str(staging / contract.MODEL_ONNX),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=contract.MODEL_ONNX_DATA,
            size_threshold=1024,
        )
        del model_proto
        spec.save(staging)
        (staging / "hf_config.json").write_text(json.dumps(config, indent=2) + "\n")
        copied = copy_tokenizer_files(model_dir, staging)
        if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
            log.warning("%s has no tokenizer.json / tokenizer.model: 'infer' will need one in the output folder", model_dir)
        steps.update()
    steps.close()
    log.info("exported %s (%d layers, %s) to %s", spec.architecture, spec.num_layers, spec.dtype, output_dir)
    return spec
