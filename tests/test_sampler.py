"""The C++ sampler on crafted logits: greedy, top-k, top-p never leave the nucleus, seeds repeat."""

from __future__ import annotations

import numpy as np
import pytest

from edgelora.runtime import native

DRAWS = 3000


def _draw(logits, seed=0, temperature=1.0, top_k=0, top_p=1.0, draws=DRAWS) -> np.ndarray:
    sampler = native.Sampler(seed)
    logits = np.asarray(logits, np.float32)
    return np.array([native.sample_row(logits, sampler, temperature, top_k, top_p) for _ in range(draws)])


def test_greedy_picks_lowest_index_of_the_maximum():
    logits = [0.1, 3.0, float("nan"), 3.0, -1.0]
    assert set(_draw(logits, temperature=0.0, draws=20)) == {1}
    assert set(_draw(logits, temperature=0.7, top_k=1, draws=20)) == {1}


def test_top_k_stays_inside_the_k_largest():
    logits = np.array([0.5, 2.0, 1.9, -3.0, 1.8, 0.0], np.float32)
    picked = _draw(logits, top_k=3)
    assert set(picked) == {1, 2, 4}


def test_top_p_stays_inside_the_nucleus():
    probabilities = np.array([0.05, 0.5, 0.15, 0.3])
    logits = np.log(probabilities)
    assert set(_draw(logits, top_p=0.75)) == {1, 3}  # 0.5 + 0.3 reaches 0.75
    assert set(_draw(logits, top_p=0.85)) == {1, 3, 2}
    assert set(_draw(logits, top_p=0.4)) == {1}
    # top-k first, then top-p over the renormalised k
    assert set(_draw(logits, top_k=2, top_p=0.6)) == {1}


def test_frequencies_follow_softmax_and_temperature():
    logits = np.log(np.array([0.25, 0.75]))
    share = _draw(logits, seed=3, draws=6000).mean()
    assert abs(share - 0.75) < 0.03
    # temperature 2 flattens: p1 = sqrt(3) / (1 + sqrt(3))
    share = _draw(logits, seed=4, temperature=2.0, draws=6000).mean()
    assert abs(share - np.sqrt(3) / (1 + np.sqrt(3))) < 0.03


def test_masked_tokens_are_never_drawn():
    logits = [-np.inf, 0.0, -np.inf, 0.0]
    assert set(_draw(logits, temperature=5.0)) == {1, 3}


def test_seed_reproduces_and_differs():
    logits = np.zeros(1000, np.float32)
    first, again, other = _draw(logits, seed=42, draws=50), _draw(logits, seed=42, draws=50), _draw(logits, seed=7, draws=50)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    uniforms = [native.Sampler(1).next_uniform() for _ in range(2)]
    assert uniforms[0] == uniforms[1] and 0.0 <= uniforms[0] < 1.0


def test_sample_batch_uses_each_rows_settings():
    logits = np.stack([np.array([0.0, 5.0, 1.0], np.float32), np.log(np.array([0.5, 0.25, 0.25], np.float32))])
    samplers = [native.Sampler(1), native.Sampler(2)]
    seen = set()
    for _ in range(400):
        tokens = native.sample_batch(logits, samplers, [0.0, 1.0], [0, 0], [1.0, 0.45])
        assert tokens.dtype == np.int64 and tokens[0] == 1
        seen.add(int(tokens[1]))
    assert seen == {0}  # top_p 0.45 keeps only the 0.5 token


def test_sample_batch_rejects_bad_arguments():
    logits = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="one entry per logits row"):
        native.sample_batch(logits, [native.Sampler(0)], [0.0], [0], [1.0])
    with pytest.raises(ValueError, match="top_p"):
        native.sample_batch(logits, [native.Sampler(0)] * 2, [1.0, 1.0], [0, 0], [0.0, 1.0])
    with pytest.raises(ValueError, match=r"\[batch, vocab\]"):
        native.sample_batch(np.zeros(4, np.float32), [native.Sampler(0)], [0.0], [0], [1.0])
