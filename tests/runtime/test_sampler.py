"""The C++ sampler on crafted logits: greedy, top-k, top-p never leave the nucleus, seeds repeat."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgelora.runtime import native

DRAWS = 3000
VOCAB = 151936  # Qwen's: large enough that the sampler must not sort it all for a small nucleus


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


def _reference_nucleus(logits: np.ndarray, temperature: float, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The nucleus by the documented rule, with the C++ arithmetic: (tokens in order, running mass).

    Largest logit first, ties by lower index; weights exp((logit - max) / temperature) in float64
    through the C library's exp (math.exp), so they are the C++ weights bit for bit; running sums in
    that order (np.cumsum adds one at a time); the nucleus is the first prefix reaching top_p * total.
    """
    finite = np.flatnonzero(np.isfinite(logits))
    order = finite[np.lexsort((finite, -logits[finite]))]
    top = float(logits[order[0]])
    inverse_temperature = 1.0 / float(np.float32(temperature))
    weights = np.array([math.exp((float(value) - top) * inverse_temperature) for value in logits[order]])
    mass = np.cumsum(weights)
    kept = int(np.argmax(mass >= float(np.float32(top_p)) * mass[-1])) + 1
    return order[:kept], mass[:kept]


def _reference_draws(logits, seed: int, temperature: float, top_p: float, draws: int) -> tuple[np.ndarray, int]:
    """Tokens the rule gives for a twin Sampler's uniforms (one per step), and the nucleus size."""
    nucleus, mass = _reference_nucleus(np.asarray(logits, np.float32), temperature, top_p)
    twin = native.Sampler(seed)
    points = np.array([twin.next_uniform() for _ in range(draws)]) * mass[-1]
    picked = np.minimum(np.searchsorted(mass, points, side="right"), len(nucleus) - 1)  # first mass > point
    return nucleus[picked], len(nucleus)


# peaked: a nucleus of a few tokens; broad and flat: far more than the 64 a first guess would sort
@pytest.mark.parametrize(("spread", "draws", "nucleus_sizes"),
                         [(4.0, 200, (2, 64)), (2.0, 100, (5000, 50000)), (0.1, 30, (100000, VOCAB))])
def test_top_p_on_a_large_vocabulary_matches_the_reference_rule(spread, draws, nucleus_sizes):
    logits = (np.random.default_rng(11).standard_normal(VOCAB) * spread).astype(np.float32)
    expected, nucleus_size = _reference_draws(logits, seed=5, temperature=0.8, top_p=0.9, draws=draws)
    assert nucleus_sizes[0] <= nucleus_size <= nucleus_sizes[1]
    picked = _draw(logits, seed=5, temperature=0.8, top_p=0.9, draws=draws)
    np.testing.assert_array_equal(picked, expected)


def test_top_p_breaks_ties_by_lower_index_when_the_target_is_hit_exactly():
    # 128 tied tokens of weight exactly 1, the rest weigh exactly 0: top_p 0.5 reaches its target
    # (64) at the 64th tied token exactly, so the nucleus is the 64 lowest indices of the tie.
    rng = np.random.default_rng(12)
    tied = np.sort(rng.choice(VOCAB, 128, replace=False))
    logits = np.full(VOCAB, -1e4, np.float32)
    logits[tied] = 0.0
    picked = _draw(logits, seed=9, top_p=0.5, draws=100)
    expected, nucleus_size = _reference_draws(logits, seed=9, temperature=1.0, top_p=0.5, draws=100)
    assert nucleus_size == 64
    assert set(picked) <= set(tied[:64]) and len(set(picked)) > 32
    np.testing.assert_array_equal(picked, expected)


def test_top_p_cut_inside_a_tie_keeps_the_lower_indices():
    # 50 tokens at logit 1, 5000 tied at 0, the rest far below: the 0.5 nucleus ends inside the tie.
    rng = np.random.default_rng(13)
    logits = (rng.standard_normal(VOCAB) - 30.0).astype(np.float32)
    positions = rng.permutation(VOCAB)
    high, tied = np.sort(positions[:50]), np.sort(positions[50:5050])
    logits[high], logits[tied] = 1.0, 0.0
    picked = _draw(logits, seed=3, top_p=0.5, draws=300)
    expected, nucleus_size = _reference_draws(logits, seed=3, temperature=1.0, top_p=0.5, draws=300)
    assert 2000 < nucleus_size - 50 < 3000  # the cut lands inside the tied block
    kept_tied = tied[: nucleus_size - 50]
    assert set(picked) <= set(high) | set(kept_tied) and set(picked) & set(kept_tied)
    np.testing.assert_array_equal(picked, expected)


def test_sample_batch_top_p_on_a_large_vocabulary_matches_the_reference_rule():
    rng = np.random.default_rng(14)
    logits = (rng.standard_normal((3, VOCAB)) * np.array([[4.0], [3.0], [1.0]])).astype(np.float32)
    seeds, temperatures, top_ps = [21, 22, 23], [0.8, 1.0, 0.5], [0.9, 0.6, 0.95]
    samplers = [native.Sampler(seed) for seed in seeds]
    picked = np.stack([native.sample_batch(logits, samplers, temperatures, [0, 0, 0], top_ps) for _ in range(20)], 1)
    for row in range(3):
        expected, _ = _reference_draws(logits[row], seeds[row], temperatures[row], top_ps[row], draws=20)
        np.testing.assert_array_equal(picked[row], expected)


# -- logit adjustments (output.adjust_logits) ----------------------------------------------------


def _state(prompt: list[int], output: list[int], **sampling):
    from edgelora.runtime.output import OutputStage
    from edgelora.runtime.sampling import SamplingParams

    state = OutputStage([0]).start(SamplingParams(**sampling), prompt)
    state.output_ids = list(output)
    return state


def test_repetition_penalty_equals_transformers_processor():
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    from edgelora.runtime.output import adjust_logits

    rng = np.random.default_rng(0)
    logits = rng.standard_normal(50).astype(np.float32) * 3
    prompt, output = [3, 7, 7, 12], [7, 20, 31]
    row = logits.copy()
    adjust_logits(row, _state(prompt, output, repetition_penalty=1.3))
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + output]), torch.tensor(logits[None]))
    np.testing.assert_allclose(row, expected[0].numpy(), rtol=1e-6)


def test_openai_bias_presence_and_frequency_penalties():
    from edgelora.runtime.output import adjust_logits

    logits = np.zeros(10, np.float32)
    adjust_logits(logits, _state([1, 2], [4, 4, 4, 5], logit_bias={9: -100, 3: 2.5}, presence_penalty=0.5,
                                 frequency_penalty=0.25))
    expected = np.zeros(10, np.float32)
    expected[9], expected[3] = -100, 2.5
    expected[4] = -(0.25 * 3 + 0.5)
    expected[5] = -(0.25 + 0.5)
    np.testing.assert_allclose(logits, expected)


@pytest.mark.parametrize("bad", [dict(logit_bias={1: 101}), dict(logit_bias={-1: 1}), dict(presence_penalty=2.5),
                                 dict(frequency_penalty=-3), dict(repetition_penalty=0)])
def test_out_of_range_adjustments_are_refused(bad):
    from edgelora.errors import UserInputError
    from edgelora.runtime.sampling import SamplingParams

    with pytest.raises(UserInputError):
        SamplingParams(**bad).validate()
