"""``edgelora bench``: prefill and decode speed of base, one-adapter and mixed-adapter batches.

Configurations are interleaved round by round and medians reported, because these machines are
shared and noisy: only ratios measured in one run mean anything. Also measured in the same run:
switching to a cached adapter, a cold adapter load, decode at a short and a long context, and
the machine's memory read bandwidth against the bytes of weights a decode step must read.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgelora.errors import UserInputError
from edgelora.formats import contract
from edgelora.formats.fileio import write_text_atomic
from edgelora.runtime import native
from edgelora.runtime.config import EngineConfig, SchedulerConfig
from edgelora.runtime.engine import Engine, StepPlan
from edgelora.runtime.sampling import SamplingParams
from edgelora.runtime.scheduler import GenerationRequest, Scheduler

log = logging.getLogger(__name__)


@dataclass(kw_only=True)  # built by keyword only: a field added anywhere cannot shift the others
class BenchOptions:
    onnx_dir: Path
    adapters: list[Path]
    batches: list[int] = field(default_factory=lambda: [1, 4, 8])
    prompt_len: int = 32
    max_tokens: int = 64
    repeats: int = 3
    contexts: list[int] = field(default_factory=lambda: [128, 2048])
    context_batch: int = 4
    context_steps: int = 16
    num_threads: int | None = None
    device: str = "cpu"
    json_path: Path | None = None
    rows: list[list[str | None]] = field(default_factory=list)  # explicit configurations (--rows); None = base
    prompt_file: Path | None = None  # token-id prompts, row i takes prompt i (the peers' workload)
    lora_chunk_rank: int = EngineConfig.lora_chunk_rank  # rows of an adapter pool slot

    def validate(self) -> None:
        problems = []
        if not self.adapters:
            problems.append("--adapters needs at least one processed adapter folder")
        if not self.batches or min(self.batches) < 1:
            problems.append(f"--batch {self.batches}: sizes must be >= 1")
        if self.prompt_len < 1 or self.max_tokens < 2:
            problems.append("--prompt-len must be >= 1 and --max-tokens >= 2")
        if self.repeats < 1:
            problems.append("--repeats must be >= 1")
        if any(c < 1 for c in self.contexts) or self.context_steps < 1:
            problems.append("--contexts and --context-steps must be >= 1")
        known = {adapter_name(path) for path in self.adapters}
        for rows in self.rows:
            unknown = sorted({name for name in rows if name is not None and name not in known})
            if unknown:
                problems.append(f"--rows {','.join(name or '-' for name in rows)}: no adapter folder named "
                                f"{', '.join(unknown)} among --adapters ({', '.join(sorted(known))})")
        if problems:
            raise UserInputError("; ".join(problems))


def adapter_name(path: Path) -> str:
    """The name --rows uses for an adapter: its folder's name."""
    return Path(path).name


def parse_rows(text: str) -> list[str | None]:
    """``A,B,C,-`` -> ["A", "B", "C", None]: one batch, a row per entry, ``-`` a base row."""
    rows = [None if part.strip() == "-" else part.strip() for part in text.split(",")]
    if not rows or any(row == "" for row in rows):
        raise UserInputError(f"--rows {text}: expected adapter names or - (base), comma-separated")
    return rows


def load_prompt_file(path: Path) -> list[list[int]]:
    """Prompts as token ids: a JSON list of id lists, or an object with a "prompts" list (a peer workload)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserInputError(f"--prompt-file {path}: {exc}") from exc
    prompts = data.get("prompts") if isinstance(data, dict) else data
    if (not isinstance(prompts, list) or not prompts
            or not all(isinstance(p, list) and p and all(isinstance(t, int) and t >= 0 for t in p) for p in prompts)):
        raise UserInputError(f"--prompt-file {path}: expected a non-empty list of non-empty token-id lists")
    return prompts


@dataclass
class ConfigResult:
    """Medians over the repeats of one (kind, batch) configuration."""

    kind: str  # base | single | mixed
    batch: int
    adapters: list[str | None]
    prefill_ms: float = 0.0
    decode_tokens_per_s: float = 0.0
    samples_decode_tokens_per_s: list[float] = field(default_factory=list)
    samples_prefill_ms: list[float] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)  # greedy ids per row, last round


def _rows(adapters: list[str | None], options: BenchOptions, vocab: int, seed: int,
          prompts: list[list[int]] | None) -> list[GenerationRequest]:
    if prompts:  # the given prompts, the same every round (the peers see the same workload)
        chosen = [prompts[row % len(prompts)] for row in range(len(adapters))]
    else:
        rng = np.random.default_rng(seed)
        chosen = [rng.integers(0, vocab, options.prompt_len).tolist() for _ in adapters]
    # EOS masked until max_tokens (min_tokens; ignore_eos would let it be sampled and go on), as the
    # peers do (min_new_tokens, min_length): every engine picks the same greedy token where EOS would win.
    greedy = SamplingParams(max_tokens=options.max_tokens, temperature=0.0, min_tokens=options.max_tokens)
    return [GenerationRequest(prompt, adapter, greedy) for prompt, adapter in zip(chosen, adapters)]


def _configurations(names: list[str], batches: list[int], rows: list[list[str | None]]) -> list[ConfigResult]:
    if rows:
        return [ConfigResult(_kind(config), len(config), list(config)) for config in rows]
    configs = []
    for batch in batches:
        configs.append(ConfigResult("base", batch, [None] * batch))
        configs.append(ConfigResult("single", batch, [names[0]] * batch))
        if batch > 1 and len(names) > 1:
            configs.append(ConfigResult("mixed", batch, [names[row % len(names)] for row in range(batch)]))
    return configs


def _kind(rows: list[str | None]) -> str:
    if all(row is None for row in rows):
        return "base"
    return "single" if len(set(rows)) == 1 else "mixed"


def _run_config(engine: Engine, config: ConfigResult, options: BenchOptions, seed: int,
                prompts: list[list[int]] | None = None) -> tuple[float, float]:
    """One batch on the step scheduler (every row admitted at once): prefill ms, decode tokens/s."""
    scheduler = Scheduler(engine, SchedulerConfig(max_num_seqs=config.batch))
    finished = scheduler.run_to_completion(_rows(config.adapters, options, engine.spec.vocab_size, seed, prompts))
    config.tokens = [request.output_ids for request in finished]
    stats = scheduler.stats
    return stats.prefill_s * 1e3, stats.decode_rows / stats.decode_s


def _switch_ms(engine: Engine, names: list[str], rounds: int = 50) -> dict:
    """Time to point a batch at another cached adapter: acquire its slot and bind its stack."""
    binding = engine.session.io_binding()
    for name in names[:2]:  # both in slots, their stacks' views made once
        engine.bind_adapters(binding, [((engine.adapters.acquire([name])[name], 1.0),)], [1])
        engine.adapters.release([name])
    durations = []
    for turn in range(rounds):
        name = names[turn % min(2, len(names))]
        started = time.perf_counter()
        slot = engine.adapters.acquire([name])[name]
        engine.bind_adapters(binding, [((slot, 1.0),)], [1])
        durations.append(time.perf_counter() - started)
        engine.adapters.release([name])
    return {"median_ms": statistics.median(durations) * 1e3, "max_ms": max(durations) * 1e3}


def _cold_load_ms(engine: Engine, name: str, rounds: int = 5) -> dict:
    """Deactivate then activate from the file: read, validated, converted and copied into a slot."""
    durations = []
    for _ in range(rounds):
        engine.adapters.deactivate(name)
        engine.adapters.forget_host_copy(name)
        started = time.perf_counter()
        engine.adapters.activate(name)
        durations.append(time.perf_counter() - started)
    return {"median_ms": statistics.median(durations) * 1e3, "rank_capacity": engine.pool.rank_capacity}


def time_decode(engine: Engine, adapters: list[str | None], context_len: int, steps: int) -> list[float]:
    """Seconds per greedy decode step for rows whose caches already hold ``context_len`` tokens.

    The cache is filled with random keys/values instead of a prefill (which would take minutes on
    a CPU), so only the decode cost at that length is timed; attention cost does not depend on values.
    """
    batch = len(adapters)
    names = [name for name in adapters if name]
    slot_of = engine.adapters.acquire(names)
    try:
        cache = engine.open_rows(batch, context_len + steps)
        rng = np.random.default_rng(0)
        for buffer in cache.host_buffers():
            buffer[...] = rng.standard_normal(buffer.shape, dtype=np.float32).astype(buffer.dtype)
        cache.note_written(0, np.full(batch, cache.length))
        slots = [slot_of[n] if n else 0 for n in adapters]
        tokens = [0] * batch
        samplers = [native.Sampler(0) for _ in range(batch)]
        zeros, ones = [0.0] * batch, [1.0] * batch
        durations = []
        for step in range(steps):
            started = time.perf_counter()
            logits = engine.step(StepPlan(0, [[token] for token in tokens], [context_len + step] * batch, slots))
            tokens = native.sample_batch(np.ascontiguousarray(logits[:, 0], dtype=np.float32), samplers, zeros,
                                         [0] * batch, ones).tolist()
            durations.append(time.perf_counter() - started)
        return durations
    finally:
        engine.adapters.release(names)


def _contexts(engine: Engine, name: str, options: BenchOptions) -> list[dict]:
    rows = [name] * options.context_batch
    samples: dict[int, list[float]] = {context: [] for context in options.contexts}
    for _ in range(options.repeats):
        for context in options.contexts:
            steps = time_decode(engine, rows, context, options.context_steps)
            samples[context].append(options.context_batch * len(steps[1:]) / sum(steps[1:]) if len(steps) > 1
                                    else options.context_batch / steps[0])
    return [{"context": context, "batch": options.context_batch, "decode_tokens_per_s": statistics.median(values),
             "samples": values} for context, values in samples.items()]


def weight_bytes(onnx_dir: Path) -> int:
    """Bytes of the base weights a decode step reads (external data file + inline initializers)."""
    total = 0
    for name in (contract.MODEL_ONNX_DATA, contract.LORA_MODEL_ONNX):
        path = Path(onnx_dir) / name
        if path.is_file():
            total += path.stat().st_size
    return total


def run_bench(options: BenchOptions) -> dict:
    """Measure everything, print the table, optionally write JSON; return the figures."""
    options.validate()
    threads = options.num_threads
    names = [adapter_name(path) for path in options.adapters]
    if len(set(names)) < len(names):  # two folders of one name: tell them apart by position
        names = [f"{name}#{index}" for index, name in enumerate(names)]
    engine = Engine(Path(options.onnx_dir), EngineConfig(
        max_loras=max(len(names), 1), max_cpu_loras=max(len(names), 1), lora_chunk_rank=options.lora_chunk_rank,
        device=options.device, num_threads=threads))
    for name, path in zip(names, options.adapters):
        engine.adapters.add(name, Path(path))
        engine.adapters.activate(name)
    log.info("bench: %d adapters, batches %s, prompt %d, %d tokens generated per row, %d repeats", len(names), options.batches,
             options.prompt_len, options.max_tokens, options.repeats)
    prompts = load_prompt_file(options.prompt_file) if options.prompt_file else None
    configs = _configurations(names, options.batches, options.rows)
    for config in configs:  # warm-up: first runs pay for allocations
        _run_config(engine, config, options, 0, prompts)
    bandwidths = []  # measured every round, between the configurations: the machine's mood drifts
    for round_index in range(options.repeats):
        order = configs[round_index % len(configs):] + configs[: round_index % len(configs)]
        for config in order:
            prefill_ms, tokens_per_s = _run_config(engine, config, options, round_index + 1, prompts)
            config.samples_prefill_ms.append(prefill_ms)
            config.samples_decode_tokens_per_s.append(tokens_per_s)
        bandwidths.append(native.read_bandwidth(threads or 0, repeats=3))
    for config in configs:
        config.prefill_ms = statistics.median(config.samples_prefill_ms)
        config.decode_tokens_per_s = statistics.median(config.samples_decode_tokens_per_s)

    bandwidth = statistics.median(bandwidths)
    weights = weight_bytes(options.onnx_dir)
    result = {
        "model": str(options.onnx_dir),
        "dtype": engine.spec.dtype,
        "threads": threads,
        "device": options.device,
        "prompt_len": options.prompt_len,
        "max_tokens": options.max_tokens,
        "repeats": options.repeats,
        "configs": [asdict(config) for config in configs],
        "switch": _switch_ms(engine, names),
        "cold_load": _cold_load_ms(engine, names[0]),
        "contexts": _contexts(engine, names[0], options),
        "memory": {"read_bandwidth_gb_s": bandwidth / 1e9, "samples_read_bandwidth_gb_s": [b / 1e9 for b in bandwidths],
                   "weight_bytes": weights,
                   "decode_bound_tokens_per_s": bandwidth / weights if weights else None},
    }
    result["ratios"] = _ratios(result)
    print(format_table(result))
    if options.json_path:
        write_text_atomic(Path(options.json_path), json.dumps(result, indent=2) + "\n")
    return result


def _ratios(result: dict) -> dict:
    by_key = {(c["kind"], c["batch"]): c["decode_tokens_per_s"] for c in result["configs"]}
    ratios = {}
    for (kind, batch), value in by_key.items():
        if kind == "single" and ("base", batch) in by_key:
            ratios[f"single/base b{batch}"] = value / by_key[("base", batch)]
        if kind == "mixed" and ("single", batch) in by_key:
            ratios[f"mixed/single b{batch}"] = value / by_key[("single", batch)]
    bound = result["memory"]["decode_bound_tokens_per_s"]
    if bound and ("base", 1) in by_key:
        ratios["base b1 / bandwidth bound"] = by_key[("base", 1)] / bound
    contexts = result["contexts"]
    if len(contexts) >= 2:
        ratios[f"ctx{contexts[-1]['context']}/ctx{contexts[0]['context']}"] = (
            contexts[-1]["decode_tokens_per_s"] / contexts[0]["decode_tokens_per_s"])
    return ratios


def format_table(result: dict) -> str:
    lines = [f"{'config':<8} {'batch':>5} {'prefill ms':>11} {'decode tok/s':>13}  adapters"]
    for config in result["configs"]:
        adapters = ",".join(a.split("#")[0] if a else "-" for a in config["adapters"])
        lines.append(f"{config['kind']:<8} {config['batch']:>5} {config['prefill_ms']:>11.1f} "
                     f"{config['decode_tokens_per_s']:>13.2f}  {adapters}")
    switch, cold = result["switch"], result["cold_load"]
    lines.append(f"switch to a cached adapter: {switch['median_ms']:.3f} ms median ({switch['max_ms']:.3f} max)")
    lines.append(f"cold adapter load: {cold['median_ms']:.1f} ms median")
    for context in result["contexts"]:
        lines.append(f"decode at context {context['context']}, batch {context['batch']}: "
                     f"{context['decode_tokens_per_s']:.2f} tok/s")
    memory = result["memory"]
    lines.append(f"memory read bandwidth {memory['read_bandwidth_gb_s']:.1f} GB/s, weights {memory['weight_bytes'] / 1e9:.3f} GB"
                 + (f" -> bound {memory['decode_bound_tokens_per_s']:.1f} tok/s at batch 1"
                    if memory["decode_bound_tokens_per_s"] else ""))
    for name, value in result["ratios"].items():
        lines.append(f"ratio {name}: {value:.3f}")
    return "\n".join(lines)
