"""Training compute, counted: hand-computed values for the formulas of rmt.flops."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rmt.flops import ModelShape, causal_context_sum, forward_flops, sequence_forward_flops, step_flops, train_flops

SHAPE = ModelShape(params=1000, n_layers=2, d_model=10)


def test_context_sums_by_hand():
    assert causal_context_sum(3) == 1 + 2 + 3
    assert causal_context_sum(2, start=5) == 6 + 7
    assert causal_context_sum(0, start=9) == 0


@given(st.integers(0, 500), st.integers(0, 500))
def test_context_sum_is_the_plain_sum(length, start):
    assert causal_context_sum(length, start) == sum(range(start + 1, start + length + 1))


def test_forward_and_train_by_hand():
    # 3 tokens: 2 * 1000 * 3 matmul FLOPs, attention 2 * 2 * 10 * (1 + 2 + 3)
    assert forward_flops(SHAPE, 3, 6) == 6000 + 240
    assert sequence_forward_flops(SHAPE, 3) == 6240
    assert sequence_forward_flops(SHAPE, 2, start=5) == 4000 + 40 * 13
    assert train_flops(SHAPE, 6240) == 3 * 6240


def test_step_flops_by_hand():
    # one sequence of 4 tokens; one response of 2 tokens after a 3-token prompt; that prompt prefilled once and two
    # responses generated (2 and 1 tokens)
    seq = 2 * 1000 * 4 + 40 * 10
    resp = 2 * 1000 * 2 + 40 * (4 + 5)
    prefill = 2 * 1000 * 3 + 40 * 6
    gen = resp + (2 * 1000 + 40 * 4)
    got = step_flops(SHAPE, [4], [(3, 2)], [3], [(3, 2), (3, 1)], extra_forwards=1, iterations=2)
    assert got == {"train": 2 * 3 * (seq + resp), "extra_forward": resp, "generation": prefill + gen,
                   "total": pytest.approx(2 * 3 * (seq + resp) + resp + prefill + gen)}


def test_model_shape_of_a_tied_llama(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    shape = ModelShape.of(model)
    total = sum(p.numel() for p in model.parameters())  # tied: the embedding is counted once
    assert shape.params == total  # minus the input lookup, plus the output layer: the same matrix
    assert (shape.n_layers, shape.d_model) == (2, 32)
