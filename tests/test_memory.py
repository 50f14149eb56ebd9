"""The memory estimate, against counts worked out by hand for the tiny Llama."""

import pytest

from peftkit.memory import estimate_memory
from peftkit.recipe import load_recipe
from tests.conftest import make_recipe


@pytest.mark.parametrize("optimizer, state_bytes", [("adamw", 8), ("sgd", 0), ("adamw_8bit", 8)])
def test_estimate_counts_adapter_and_optimizer(tiny_llama, number_data, tmp_path, optimizer, state_bytes):
    recipe = load_recipe(make_recipe(tmp_path, tiny_llama, number_data, training={"optimizer": optimizer}))
    est = estimate_memory(recipe)
    # hidden 32, intermediate 64, 4 heads of 8, 2 kv heads -> k/v out 16; r = 4; 2 layers
    per_layer = 4 * ((32 + 32) + (32 + 16) * 2 + (32 + 32) + (32 + 64) * 2 + (64 + 32))
    assert est.adapter == 4 * 2 * per_layer
    # every tensor is < 4096 elements, so bitsandbytes keeps even 8-bit AdamW state in fp32
    assert est.optimizer == state_bytes * 2 * per_layer
    vocab = 102
    weights = 2 * vocab * 32 + 2 * (32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64 + 2 * 32) + 32
    assert est.base_weights == 4 * weights


def test_estimate_nf4_weights(tiny_llama, number_data, tmp_path):
    recipe = load_recipe(make_recipe(tmp_path, tiny_llama, number_data, quantization={"method": "nf4"}))
    est = estimate_memory(recipe)
    linear = 2 * (32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64)
    rest = 2 * 102 * 32 + 2 * 2 * 32 + 32  # embeddings, lm_head (skipped), norms
    assert est.base_weights == pytest.approx(linear * 4.127 / 8 + 4 * rest)
