"""``edgelora bench-serve``: load on a running server through the official ``openai`` client.

Two modes. Closed loop (``--concurrency``, below). Open loop (``--rates``): Poisson arrivals at each
offered rate for ``--duration`` seconds, adapters drawn Zipf(``--zipf-alpha``), lengths spread
around their means; per rate the requests/s and output tokens/s delivered, TTFT and inter-token
p50/p99, failed requests and the share within ``--slo-ttft``/``--slo-itl``, and the highest rate
sustained with TTFT p99 within ``--sustain-ttft-p99`` and no failure (``open_loop.py``). It drives
any OpenAI-compatible server: ``--adapter-field llama-lora`` for llama-server.

Per concurrency level, ``requests`` streaming completions (random token-id prompts, greedy,
``ignore_eos`` so every request generates ``max_tokens``) are sent by that many concurrent
clients, adapters taken round robin. Reported: request throughput, output tokens/s, time to first
token and inter-token latency (p50/p99), and, from the server's own ``/metrics``, the mean prefill
step and the share of each decode step spent outside ONNX Runtime (scheduling, sampling, text).

With ``--onnx-dir`` the command starts ``edgelora serve`` itself on a free loopback port (and
stops it), and ``--compare-offline`` times the same requests through ``LLM.generate`` in one
batch, interleaved with the server rounds: the two figures come from the same minutes.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgelora.errors import UserInputError
from edgelora.formats.fileio import write_text_atomic
from edgelora.tools.open_loop import (
    ADAPTER_FIELDS,
    LoadShape,
    PlannedRequest,
    chart,
    format_rates,
    load_requests_file,
    plan,
    run_schedule,
    schedule_json,
    summarize,
    sustained_rate,
)
from edgelora.tools.serve_process import running_server

log = logging.getLogger(__name__)

# Metrics read from the server (edgelora/server/metrics.py): histogram sums and counts.
PREFILL_SECONDS = "edgelora_prefill_step_seconds"
DECODE_SECONDS = "edgelora_decode_step_seconds"
DECODE_OVERHEAD_SECONDS = "edgelora_decode_overhead_seconds"


@dataclass(kw_only=True)  # built by keyword only: a field added anywhere cannot shift the others
class BenchServeOptions:
    adapters: list[str]  # served adapter names (None of them: base only); "base" means the served model
    url: str | None = None
    onnx_dir: Path | None = None
    lora_modules: dict[str, Path] = field(default_factory=dict)
    concurrency: list[int] = field(default_factory=lambda: [1, 8, 32])
    requests: int = 32
    prompt_len: int = 32
    max_tokens: int = 64
    repeats: int = 1
    threads: int | None = None
    max_loras: int | None = None
    max_num_seqs: int | None = None
    compare_offline: bool = False
    api_key: str | None = None
    json_path: Path | None = None
    timeout_s: float = 600.0
    # open loop (--rates or --requests-file)
    rates: list[float] | None = None
    requests_file: Path | None = None
    duration_s: float = 60.0
    zipf_alpha: float = 1.0
    spread: float = 0.0
    shared_prefix_len: int = 0  # a system prompt every open-loop request starts with
    seed: int = 0
    slo_ttft_s: float | None = None
    slo_itl_s: float | None = None
    sustain_ttft_p99_s: float = 5.0
    adapter_field: str = "model"
    chart_path: Path | None = None

    @property
    def open_loop(self) -> bool:
        return bool(self.rates) or self.requests_file is not None

    def validate(self) -> None:
        problems = []
        if (self.url is None) == (self.onnx_dir is None):
            problems.append("give --url of a running server or --onnx-dir to start one")
        if not self.concurrency or min(self.concurrency) < 1:
            problems.append(f"--concurrency {self.concurrency}: levels must be >= 1")
        if self.requests < 1 or self.prompt_len < 1 or self.max_tokens < 2:
            problems.append("--requests and --prompt-len must be >= 1, --max-tokens >= 2")
        if self.repeats < 1:
            problems.append("--repeats must be >= 1")
        if self.compare_offline and self.onnx_dir is None:
            problems.append("--compare-offline needs --onnx-dir (the offline run loads the model here)")
        if self.rates is not None and (not self.rates or min(self.rates) <= 0):
            problems.append(f"--rates {self.rates}: offered rates must be > 0 requests/s")
        if self.rates and self.requests_file is not None:
            problems.append("--rates and --requests-file: give one (a file replays its own arrival times)")
        if self.open_loop and self.compare_offline:
            problems.append("--compare-offline goes with --concurrency levels, not an open loop")
        if self.shared_prefix_len < 0 or (self.shared_prefix_len and not self.rates):
            problems.append("--shared-prefix-len must be >= 0, and goes with --rates")
        if self.duration_s <= 0 or self.zipf_alpha < 0 or not 0 <= self.spread < 1:
            problems.append("--duration must be > 0, --zipf-alpha >= 0, --length-spread in [0, 1)")
        if any(bound is not None and bound <= 0 for bound in (self.slo_ttft_s, self.slo_itl_s)):
            problems.append("--slo-ttft and --slo-itl must be > 0 seconds")
        if self.adapter_field not in ADAPTER_FIELDS:
            problems.append(f"--adapter-field {self.adapter_field}: expected one of {', '.join(ADAPTER_FIELDS)}")
        if self.chart_path is not None and not self.open_loop:
            problems.append("--chart draws the open loop's rates (--rates)")
        if self.adapter_field != "model" and self.onnx_dir is not None:
            problems.append("--adapter-field llama-lora is for a llama-server at --url; edgelora takes the adapter "
                            "as model")
        if problems:
            raise UserInputError("; ".join(problems))
        if self.chart_path is not None and importlib.util.find_spec("matplotlib") is None:
            # before any load is sent; the CLI names the extra that brings it
            raise ModuleNotFoundError("--chart needs matplotlib", name="matplotlib")


@dataclass
class RequestTiming:
    ttft_s: float
    itl_s: list[float]
    output_tokens: int
    total_s: float


@dataclass
class LevelResult:
    """One concurrency level, medians over the repeats."""

    concurrency: int
    requests: int
    output_tokens: int = 0  # of the last repeat (requests x max_tokens: ignore_eos)
    request_throughput: float = 0.0  # requests/s
    output_tokens_per_s: float = 0.0
    ttft_p50_ms: float = 0.0
    ttft_p99_ms: float = 0.0
    itl_p50_ms: float = 0.0
    itl_p99_ms: float = 0.0
    mean_prefill_ms: float | None = None  # the server's own prefill steps during this level
    decode_overhead_share: float | None = None  # of decode step time, outside ONNX Runtime
    samples_output_tokens_per_s: list[float] = field(default_factory=list)
    offline_output_tokens_per_s: float | None = None  # LLM.generate of `concurrency` requests in one batch
    samples_offline: list[float] = field(default_factory=list)


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def _prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, length).tolist() for _ in range(count)]


async def _one(client, model: str, prompt: list[int], max_tokens: int) -> RequestTiming:
    started = time.perf_counter()
    stamps = []
    output_tokens = 0
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True, "return_token_ids": True})
    async for chunk in stream:
        # A chunk per step that produced tokens (vLLM's token_ids), text or not: a random model's
        # tokens may decode to nothing, and a character split over tokens arrives with its last one.
        if chunk.choices and (chunk.choices[0].text or (chunk.choices[0].model_extra or {}).get("token_ids")):
            stamps.append(time.perf_counter())
        if chunk.usage is not None:
            output_tokens = chunk.usage.completion_tokens
    if not stamps:
        raise UserInputError(f"model {model!r}: the stream carried no tokens")
    return RequestTiming(stamps[0] - started, list(np.diff(stamps)), output_tokens, time.perf_counter() - started)


async def _level(base_url: str, api_key: str, models: list[str], prompts: list[list[int]], concurrency: int,
                 max_tokens: int) -> tuple[list[RequestTiming], float]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=600.0)
    queue: asyncio.Queue = asyncio.Queue()
    for index, prompt in enumerate(prompts):
        queue.put_nowait((models[index % len(models)], prompt))
    timings: list[RequestTiming] = []

    async def worker():
        while not queue.empty():
            model, prompt = queue.get_nowait()
            timings.append(await _one(client, model, prompt, max_tokens))

    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await client.close()
    return timings, time.perf_counter() - started


def _scrape(base: str, api_key: str) -> dict[str, float]:
    """Histogram sums and counts of the server's step timings (empty when /metrics is not readable)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        response = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {api_key}"}, timeout=10)
    except httpx.HTTPError:
        return {}
    if response.status_code != 200:
        return {}
    values = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name.endswith(("_sum", "_count")):
                values[sample.name] = sample.value
    return values


def _delta(after: dict, before: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def _server_args(options: BenchServeOptions) -> list[str]:
    """The flags of the ``edgelora serve`` that ``--onnx-dir`` starts."""
    args = ["--onnx-dir", str(options.onnx_dir), "--quiet"]
    if options.lora_modules:
        args += ["--lora-modules", *(f"{name}={path}" for name, path in options.lora_modules.items())]
    for flag, value in (("--threads", options.threads), ("--max-loras", options.max_loras),
                        ("--max-num-seqs", options.max_num_seqs or max(options.concurrency))):
        if value is not None:
            args += [flag, str(value)]
    if options.api_key:
        args += ["--api-key", options.api_key]
    return args


def _offline(options: BenchServeOptions, prompts: list[list[int]]):
    """An LLM over the same folder and adapters, and a function timing one batch of the given prompts."""
    from edgelora.entrypoints.api import LLM, LoraConfig, LoRARequest, SamplingParams
    from edgelora.runtime.config import EngineConfig

    names = [name for name in options.adapters if name != "base"]
    max_loras = max(1, options.max_loras or len(names) or 1)
    host_loras = max(EngineConfig(max_loras=max_loras).host_loras, len(names))  # every adapter stays host-ready
    llm = LLM(options.onnx_dir, LoraConfig(max_loras=max_loras, max_cpu_loras=host_loras),
              max_batch_size=max(options.concurrency), num_threads=options.threads)
    requests = {name: LoRARequest(name, index + 1, str(options.lora_modules[name])) for index, name in enumerate(names)}
    params = SamplingParams(max_tokens=options.max_tokens, temperature=0.0, ignore_eos=True)

    def run(count: int) -> float:
        batch = prompts[:count]
        lora = [requests.get(options.adapters[index % len(options.adapters)]) for index in range(count)]
        started = time.perf_counter()
        outputs = llm.generate(batch, params, lora)
        return sum(len(o.token_ids) for o in outputs) / (time.perf_counter() - started)

    return run


def run_bench_serve(options: BenchServeOptions) -> dict:
    """Measure every concurrency level; print a table; optionally write JSON; return the figures."""
    options.validate()
    if options.onnx_dir is not None:
        from edgelora.formats.model_spec import ModelSpec

        vocab = ModelSpec.load(Path(options.onnx_dir)).vocab_size
        missing = [name for name in options.adapters if name != "base" and name not in options.lora_modules]
        if missing:
            raise UserInputError(f"--adapters {', '.join(missing)}: not given by --lora-modules NAME=PATH")
        with running_server(*_server_args(options), timeout_s=300) as (url, _):
            return _open_loop(options, url, vocab) if options.open_loop else _measure(options, url, vocab)
    url = options.url.rstrip("/").removesuffix("/v1")
    return _open_loop(options, url, None) if options.open_loop else _measure(options, url, None)


def _served_models(options: BenchServeOptions, url: str, api_key: str) -> dict[str, str]:
    """--adapters name -> the ``model`` a request sends ("base": the served base model)."""
    from openai import OpenAI

    served = OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0).models.list().data
    base = next((m.id for m in served if getattr(m, "parent", None) in (None, "")), served[0].id)
    models = {name: (base if name == "base" else name) for name in options.adapters}
    models["base"] = base
    return models


def _open_loop(options: BenchServeOptions, url: str, vocab: int | None) -> dict:
    """Every offered rate (or the replayed file) in turn, each after the last has drained."""
    api_key = options.api_key or "none"
    models = _served_models(options, url, api_key)
    shape = LoadShape(adapters=list(options.adapters), duration_s=options.duration_s, zipf_alpha=options.zipf_alpha,
                      prompt_len=options.prompt_len, output_len=options.max_tokens, spread=options.spread,
                      shared_prefix_len=options.shared_prefix_len,
                      vocab=vocab or 1000, seed=options.seed)
    if options.requests_file is not None:
        runs = []
        for rate, replay in load_requests_file(options.requests_file):
            unknown = sorted({r.adapter for r in replay} - set(options.adapters))
            if unknown:
                raise UserInputError(f"--requests-file: adapters {', '.join(unknown)} are not in --adapters")
            runs.append((rate or len(replay) / (max((r.at_s for r in replay), default=0.0) or 1.0), replay))
    else:
        runs = [(rate, plan(rate, shape)) for rate in options.rates]
        empty = [f"{rate:g}" for rate, schedule in runs if not schedule]
        if empty:
            raise UserInputError(f"--rates {', '.join(empty)}: no request arrives within --duration "
                                 f"{options.duration_s:g} s; give a longer --duration")
    # Warm-up: one short request per adapter, so no rate pays for first loads.
    warm = [PlannedRequest(0.0, name, [5] * 4, 2) for name in options.adapters]
    warmed = asyncio.run(run_schedule(f"{url}/v1", api_key, warm, models, options.adapter_field, options.adapters,
                                      options.timeout_s))
    broken = [f"{o.adapter} ({o.error})" for o in warmed if o.error is not None]
    if broken:
        raise UserInputError(f"{url}: a first request failed for {', '.join(broken)}; is every --adapters name served?")
    results, schedules = [], []
    for rate, schedule in runs:
        log.info("rate %.2f/s: %d requests over %.0f s", rate, len(schedule), options.duration_s)
        outcomes = asyncio.run(run_schedule(f"{url}/v1", api_key, schedule, models, options.adapter_field,
                                            options.adapters, options.timeout_s))
        results.append(summarize(rate, outcomes, options.slo_ttft_s, options.slo_itl_s))
        schedules.append({"rate": rate, "schedule": schedule_json(schedule)})
    sustained = sustained_rate(results, options.sustain_ttft_p99_s)
    slo = options.slo_ttft_s is not None or options.slo_itl_s is not None
    sys.stdout.write(format_rates(results, slo) + "\n")
    sys.stdout.write(f"sustained: {'none' if sustained is None else f'{sustained:g} requests/s'} "
                     f"(TTFT p99 <= {options.sustain_ttft_p99_s:g} s, no failed request)\n")
    report = {"mode": "open-loop", "url": url, "adapter_field": options.adapter_field,
              "shape": {**asdict(shape), "adapters": list(options.adapters)}, "cpu_count": os.cpu_count(),
              "slo": {"ttft_s": options.slo_ttft_s, "itl_s": options.slo_itl_s},
              "sustain_ttft_p99_s": options.sustain_ttft_p99_s, "sustained_rate": sustained,
              "rates": [asdict(result) for result in results], "schedules": schedules}
    if options.json_path is not None:
        write_text_atomic(Path(options.json_path), json.dumps(report) + "\n")
    if options.chart_path is not None:
        chart(results, Path(options.chart_path), f"{len(options.adapters)} adapters, Zipf {options.zipf_alpha:g}")
    return report


def _measure(options: BenchServeOptions, url: str, vocab: int | None) -> dict:
    api_key = options.api_key or "none"
    served = _served_models(options, url, api_key)
    models = [served[name] for name in options.adapters] or [served["base"]]
    prompts = _prompts(max(options.requests, max(options.concurrency)), options.prompt_len, vocab or 1000)
    offline = _offline(options, prompts) if options.compare_offline else None
    # Warm-up: one request per model, so no level pays for first adapter loads and allocations.
    asyncio.run(_level(f"{url}/v1", api_key, models, prompts[: len(models)], len(models), 4))
    if offline is not None:
        offline(1)
    results = []
    for concurrency in options.concurrency:
        level = LevelResult(concurrency, options.requests)
        ttfts, itls, tputs, prefill, overhead = [], [], [], [], []
        for _ in range(options.repeats):
            before = _scrape(url, api_key)
            timings, wall_s = asyncio.run(_level(f"{url}/v1", api_key, models, prompts[: options.requests],
                                                 concurrency, options.max_tokens))
            after = _scrape(url, api_key)
            ttfts += [t.ttft_s for t in timings]
            itls += [gap for t in timings for gap in t.itl_s]
            level.output_tokens = sum(t.output_tokens for t in timings)
            tputs.append(level.output_tokens / wall_s)
            level.request_throughput = len(timings) / wall_s
            if _delta(after, before, f"{PREFILL_SECONDS}_count"):
                prefill.append(_delta(after, before, f"{PREFILL_SECONDS}_sum")
                               / _delta(after, before, f"{PREFILL_SECONDS}_count"))
            if _delta(after, before, f"{DECODE_SECONDS}_sum"):
                overhead.append(_delta(after, before, f"{DECODE_OVERHEAD_SECONDS}_sum")
                                / _delta(after, before, f"{DECODE_SECONDS}_sum"))
            if offline is not None:
                level.samples_offline.append(offline(concurrency))
        level.samples_output_tokens_per_s = tputs
        level.output_tokens_per_s = statistics.median(tputs)
        level.ttft_p50_ms, level.ttft_p99_ms = _percentile(ttfts, 50) * 1e3, _percentile(ttfts, 99) * 1e3
        level.itl_p50_ms, level.itl_p99_ms = _percentile(itls, 50) * 1e3, _percentile(itls, 99) * 1e3
        level.mean_prefill_ms = statistics.median(prefill) * 1e3 if prefill else None
        level.decode_overhead_share = statistics.median(overhead) if overhead else None
        if level.samples_offline:
            level.offline_output_tokens_per_s = statistics.median(level.samples_offline)
        results.append(level)
        log.info("concurrency %d: %.1f output tokens/s", concurrency, level.output_tokens_per_s)
    report = {"url": url, "models": models, "prompt_len": options.prompt_len, "max_tokens": options.max_tokens,
              "requests": options.requests, "repeats": options.repeats, "threads": options.threads,
              "cpu_count": os.cpu_count(), "levels": [asdict(level) for level in results]}
    _print_table(results)
    if options.json_path is not None:
        write_text_atomic(Path(options.json_path), json.dumps(report, indent=2) + "\n")
    return report


def _print_table(levels: list[LevelResult]) -> None:
    header = (f"{'conc':>4} {'req/s':>7} {'out tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} "
              f"{'ITL p99':>8} {'prefill':>8} {'sched %':>7} {'offline':>8} {'ratio':>6}")
    lines = [header, "-" * len(header)]
    for level in levels:
        prefill = f"{level.mean_prefill_ms:.1f}" if level.mean_prefill_ms is not None else "-"
        share = f"{100 * level.decode_overhead_share:.1f}" if level.decode_overhead_share is not None else "-"
        offline = level.offline_output_tokens_per_s
        lines.append(f"{level.concurrency:>4} {level.request_throughput:>7.2f} {level.output_tokens_per_s:>9.1f} "
                     f"{level.ttft_p50_ms:>8.1f}m {level.ttft_p99_ms:>8.1f}m {level.itl_p50_ms:>7.1f}m "
                     f"{level.itl_p99_ms:>7.1f}m {prefill:>8} {share:>7} "
                     f"{offline if offline is None else round(offline, 1)!s:>8} "
                     f"{'-' if offline is None else round(level.output_tokens_per_s / offline, 2)!s:>6}")
    lines.append("(ms; prefill = the server's mean prefill step; sched % = decode step time outside ONNX Runtime; "
                 "offline = LLM.generate of the same requests in one batch, tokens/s)")
    sys.stdout.write("\n".join(lines) + "\n")
