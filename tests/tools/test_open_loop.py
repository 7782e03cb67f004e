"""The open loop's schedule and summary (no server): arrivals, Zipf popularity, lengths, SLO, sustained rate."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgelora.errors import UserInputError
from edgelora.tools.open_loop import (
    LoadShape,
    Outcome,
    load_requests_file,
    plan,
    schedule_json,
    summarize,
    sustained_rate,
    zipf_weights,
)


def test_zipf_weights_fall_with_rank_and_alpha_zero_is_uniform():
    weights = zipf_weights(4, 1.0)
    np.testing.assert_allclose(weights, np.array([1, 1 / 2, 1 / 3, 1 / 4]) / (25 / 12))
    np.testing.assert_allclose(zipf_weights(3, 0.0), [1 / 3] * 3)


def test_a_schedule_is_poisson_at_the_rate_zipf_over_adapters_and_reproducible():
    shape = LoadShape(adapters=[f"a{i}" for i in range(8)], duration_s=100.0, prompt_len=40, output_len=20,
                      spread=0.5, vocab=50, seed=3)
    schedule = plan(20.0, shape)
    assert abs(len(schedule) - 2000) < 4 * np.sqrt(2000), "about rate x duration arrivals"
    gaps = np.diff([r.at_s for r in schedule])
    assert gaps.min() >= 0 and abs(gaps.mean() - 0.05) < 0.005 and abs(gaps.std() / gaps.mean() - 1) < 0.1
    counts = np.array([sum(r.adapter == f"a{i}" for r in schedule) for i in range(8)])
    expected = zipf_weights(8, 1.0) * len(schedule)
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected)), (counts, expected)
    assert all(20 <= len(r.prompt) <= 60 and 10 <= r.max_tokens <= 30 for r in schedule)
    assert all(3 <= t < 50 for r in schedule for t in r.prompt)
    assert schedule_json(plan(20.0, shape)) == schedule_json(schedule)
    assert schedule_json(plan(20.0, LoadShape(**{**shape.__dict__, "seed": 4}))) != schedule_json(schedule)


def _done(at: float, ttft: float, gaps: list[float], end: float) -> Outcome:
    return Outcome("a", at, 4, len(gaps) + 1, ttft, gaps, len(gaps) + 1, end)


def test_summary_counts_failures_slo_and_the_sustained_rate():
    outcomes = [_done(0.0, 0.5, [0.1, 0.1], 1.0), _done(1.0, 3.0, [0.1], 4.0), _done(2.0, 0.2, [0.9], 3.5),
                Outcome("a", 2.5, 4, 3, error="APITimeoutError")]
    result = summarize(2.0, outcomes, slo_ttft_s=1.0, slo_itl_s=0.5)
    assert (result.offered, result.completed, result.failed) == (4, 3, 1)
    assert result.errors == {"APITimeoutError": 1}
    assert result.wall_s == 4.0 and result.request_throughput == 3 / 4.0 and result.output_tokens_per_s == 7 / 4.0
    assert result.slo_share == 1 / 4, "only the first: the second is late, the third too slow, the fourth failed"
    assert result.ttft_p50_ms == pytest.approx(500.0)
    clean = summarize(1.0, outcomes[:1], None, None)
    assert clean.slo_share is None
    assert sustained_rate([clean, result], ttft_p99_s=5.0) == 1.0, "a rate with a failure is not sustained"
    assert sustained_rate([result], ttft_p99_s=5.0) is None


def test_a_requests_file_replays_every_rate_or_one_list(tmp_path):
    shape = LoadShape(adapters=["a", "base"], duration_s=2.0, seed=1)
    report = {"schedules": [{"rate": rate, "schedule": schedule_json(plan(rate, shape))} for rate in (3.0, 9.0)]}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(report))
    loaded = load_requests_file(path)
    assert [rate for rate, _ in loaded] == [3.0, 9.0]
    assert schedule_json(loaded[1][1]) == report["schedules"][1]["schedule"]
    path.write_text(json.dumps(report["schedules"][0]["schedule"]))
    assert load_requests_file(path)[0][0] is None
    path.write_text(json.dumps([{"at_s": 0, "adapter": "a"}]))
    with pytest.raises(UserInputError, match="at_s, adapter, prompt"):
        load_requests_file(path)
