"""Open-loop load for ``bench-serve --rates``: requests arrive on their own clock, not when a client is free.

A closed loop (N clients, each sending its next request when the last one ends) slows its own
arrivals down when the server slows, so it never shows overload. Here each rate gets a schedule
made up front: Poisson arrivals (exponential gaps of mean 1/rate) over ``duration_s``, each request's
adapter drawn from a Zipf(alpha) popularity over the adapters (the first named the most popular),
its prompt and output lengths uniform within ±spread of the means. Every request is sent at its
time whatever the server is doing; failures (HTTP errors, broken streams, timeouts) count as failed
requests, never stop the run. The schedule is part of the report, so a run can be replayed
(``--requests-file``) against another server.

How the adapter travels depends on the server: ``model`` (edgelora, vLLM: the adapter's served
name) or ``llama-lora`` (llama-server: every adapter loaded at its start, the request's
``lora`` list gives its own scale 1 and the others 0; a base request gives them all 0).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgelora.errors import UserInputError

ADAPTER_FIELDS = ("model", "llama-lora")


@dataclass
class PlannedRequest:
    at_s: float  # arrival, seconds after the rate's start
    adapter: str  # a name from --adapters ("base": the served base model)
    prompt: list[int]
    max_tokens: int


@dataclass(kw_only=True)
class LoadShape:
    """What a schedule is made of (everything but the rate)."""

    adapters: list[str]
    duration_s: float = 60.0
    zipf_alpha: float = 1.0
    prompt_len: int = 32
    output_len: int = 64
    spread: float = 0.0  # lengths uniform in [mean * (1 - spread), mean * (1 + spread)]
    vocab: int = 1000
    seed: int = 0
    # tokens of one system prompt every request starts with (a prefix-cache workload); the rest
    # (prompt_len) is each request's own
    shared_prefix_len: int = 0


@dataclass
class Outcome:
    adapter: str
    at_s: float
    prompt_tokens: int
    max_tokens: int
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    end_s: float | None = None  # seconds after the rate's start
    error: str | None = None


@dataclass
class RateResult:
    """One offered rate: what the server delivered."""

    rate: float
    offered: int
    completed: int
    failed: int
    wall_s: float  # first arrival to last completion
    request_throughput: float
    output_tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    slo_share: float | None  # of offered requests: completed within both SLO bounds
    errors: dict[str, int] = field(default_factory=dict)


def zipf_weights(count: int, alpha: float) -> np.ndarray:
    """Popularity of ranks 1..count: proportional to 1 / rank^alpha (alpha 0: uniform)."""
    weights = 1.0 / np.arange(1, count + 1, dtype=np.float64) ** alpha
    return weights / weights.sum()


def _length(rng: np.random.Generator, mean: int, spread: float) -> int:
    if spread <= 0:
        return mean
    return max(1, round(rng.uniform(mean * (1 - spread), mean * (1 + spread))))


def plan(rate: float, shape: LoadShape) -> list[PlannedRequest]:
    """The schedule of one rate (same seed and shape: the same requests)."""
    rng = np.random.default_rng([shape.seed, int(rate * 1000)])
    weights = zipf_weights(len(shape.adapters), shape.zipf_alpha)
    shared = np.random.default_rng([shape.seed, 7]).integers(3, shape.vocab, shape.shared_prefix_len).tolist()
    planned, clock = [], 0.0
    while True:
        clock += rng.exponential(1.0 / rate)
        if clock >= shape.duration_s:
            return planned
        adapter = shape.adapters[int(rng.choice(len(weights), p=weights))]
        prompt = shared + rng.integers(3, shape.vocab, _length(rng, shape.prompt_len, shape.spread)).tolist()
        planned.append(PlannedRequest(clock, adapter, prompt, max(2, _length(rng, shape.output_len, shape.spread))))


def load_requests_file(path: Path) -> list[tuple[float | None, list[PlannedRequest]]]:
    """Schedules to replay: every rate of an earlier run's JSON (its ``schedules``), or one JSON list of
    requests (rate None: taken from its arrivals)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserInputError(f"--requests-file {path}: {exc}") from None
    groups = [(entry.get("rate"), entry.get("schedule")) for entry in data.get("schedules", [])] \
        if isinstance(data, dict) else [(None, data)]
    try:
        loaded = [(rate, [PlannedRequest(float(item["at_s"]), str(item["adapter"]), [int(t) for t in item["prompt"]],
                                         int(item["max_tokens"])) for item in items]) for rate, items in groups]
    except (KeyError, TypeError, ValueError) as exc:
        raise UserInputError(f"--requests-file {path}: each request needs at_s, adapter, prompt (token ids), "
                             f"max_tokens ({exc!r})") from None
    if not loaded or not any(schedule for _, schedule in loaded):
        raise UserInputError(f"--requests-file {path}: no requests")
    return loaded


def _is_token(chunk) -> bool:
    """A streamed chunk that carries a token: text, vLLM's token_ids, or any chunk before the finish."""
    if not chunk.choices:
        return False
    choice = chunk.choices[0]
    return bool(choice.text or (choice.model_extra or {}).get("token_ids") or not choice.finish_reason)


async def _send(client, request: PlannedRequest, started: float, model: str, extra: dict, outcome: Outcome) -> None:
    await asyncio.sleep(max(0.0, started + request.at_s - time.perf_counter()))
    sent = time.perf_counter()
    stamps = []
    try:
        stream = await client.completions.create(
            model=model, prompt=request.prompt, max_tokens=request.max_tokens, temperature=0.0, stream=True,
            stream_options={"include_usage": True}, extra_body=extra)
        async for chunk in stream:
            if _is_token(chunk):
                stamps.append(time.perf_counter())
            if chunk.usage is not None:
                outcome.output_tokens = chunk.usage.completion_tokens
        if not stamps:
            raise RuntimeError("the stream carried no tokens")
        outcome.output_tokens = outcome.output_tokens or len(stamps)
        outcome.ttft_s = stamps[0] - sent
        outcome.itl_s = list(np.diff(stamps))
        outcome.end_s = time.perf_counter() - started
    except Exception as exc:  # every failure is a failed request, counted by kind
        outcome.error = type(exc).__name__


async def run_schedule(base_url: str, api_key: str, schedule: list[PlannedRequest], models: dict[str, str],
                       adapter_field: str, adapter_order: list[str], timeout_s: float) -> list[Outcome]:
    """Send every request at its time; wait for all (each bounded by ``timeout_s``)."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout_s)
    lora_names = [name for name in adapter_order if name != "base"]
    outcomes = [Outcome(r.adapter, r.at_s, len(r.prompt), r.max_tokens) for r in schedule]
    started = time.perf_counter()
    tasks = []
    for request, outcome in zip(schedule, outcomes):
        extra: dict = {"ignore_eos": True}
        if adapter_field == "model":
            model = models[request.adapter]
            extra["return_token_ids"] = True
        else:  # llama-server: one scale per adapter it loaded, in --adapters order
            model = models["base"]
            extra["lora"] = [{"id": index, "scale": 1.0 if name == request.adapter else 0.0}
                             for index, name in enumerate(lora_names)]
        tasks.append(asyncio.create_task(_send(client, request, started, model, extra, outcome)))
    try:
        await asyncio.gather(*tasks)
    finally:
        await client.close()
    return outcomes


def _percentile_ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1e3 if values else 0.0


def summarize(rate: float, outcomes: list[Outcome], slo_ttft_s: float | None, slo_itl_s: float | None) -> RateResult:
    """Throughput over first arrival to last completion; latency percentiles over completed requests.

    A request meets the SLO when it completed, its TTFT is within ``slo_ttft_s`` and its mean
    inter-token gap within ``slo_itl_s`` (vLLM's goodput uses the same per-request mean).
    """
    done = [o for o in outcomes if o.error is None]
    errors: dict[str, int] = {}
    for outcome in outcomes:
        if outcome.error is not None:
            errors[outcome.error] = errors.get(outcome.error, 0) + 1
    first = min((o.at_s for o in outcomes), default=0.0)
    wall = max((o.end_s for o in done), default=first) - first
    ttfts = [o.ttft_s for o in done]
    itls = [gap for o in done for gap in o.itl_s]
    slo = None
    if slo_ttft_s is not None or slo_itl_s is not None:
        def meets(o: Outcome) -> bool:
            mean_itl = float(np.mean(o.itl_s)) if o.itl_s else 0.0
            return ((slo_ttft_s is None or o.ttft_s <= slo_ttft_s)
                    and (slo_itl_s is None or mean_itl <= slo_itl_s))
        slo = sum(meets(o) for o in done) / len(outcomes) if outcomes else 0.0
    tokens = sum(o.output_tokens for o in done)
    return RateResult(rate, len(outcomes), len(done), len(outcomes) - len(done), wall,
                      len(done) / wall if wall > 0 else 0.0, tokens / wall if wall > 0 else 0.0,
                      _percentile_ms(ttfts, 50), _percentile_ms(ttfts, 99), _percentile_ms(itls, 50),
                      _percentile_ms(itls, 99), slo, errors)


def sustained_rate(results: list[RateResult], ttft_p99_s: float) -> float | None:
    """The highest offered rate with no failed request and TTFT p99 within the bound (None: none)."""
    good = [r.rate for r in results if r.failed == 0 and r.completed and r.ttft_p99_ms <= ttft_p99_s * 1e3]
    return max(good) if good else None


def schedule_json(schedule: list[PlannedRequest]) -> list[dict]:
    return [asdict(request) for request in schedule]


def format_rates(results: list[RateResult], slo: bool) -> str:
    header = (f"{'rate/s':>7} {'sent':>5} {'done':>5} {'fail':>5} {'req/s':>6} {'out tok/s':>9} {'TTFT p50':>9} "
              f"{'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}" + (f" {'in SLO':>7}" if slo else ""))
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r.rate:>7.2f} {r.offered:>5} {r.completed:>5} {r.failed:>5} {r.request_throughput:>6.2f} "
                     f"{r.output_tokens_per_s:>9.1f} {r.ttft_p50_ms:>8.0f}m {r.ttft_p99_ms:>8.0f}m "
                     f"{r.itl_p50_ms:>7.1f}m {r.itl_p99_ms:>7.1f}m"
                     + (f" {100 * r.slo_share:>6.0f}%" if slo and r.slo_share is not None else ""))
    lines.append("(ms; req/s and tokens/s delivered from the first arrival to the last completion)")
    return "\n".join(lines)


def chart(results: list[RateResult], path: Path, title: str) -> None:
    """Output tokens/s and TTFT p99 against the offered rate (needs matplotlib: the [bench] extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [r.rate for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=80)
    left.plot(rates, [r.output_tokens_per_s for r in results], marker="o")
    left.set_xlabel("offered requests/s")
    left.set_ylabel("output tokens/s")
    right.plot(rates, [r.ttft_p99_ms / 1e3 for r in results], marker="o", color="tab:red")
    right.set_xlabel("offered requests/s")
    right.set_ylabel("TTFT p99 (s)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
