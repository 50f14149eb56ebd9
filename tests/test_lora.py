"""LoRA layers against dense computations, with non-identity (nonzero B) adapters."""

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit.adapters.state_dicts import merge_state_dict
from peftkit.errors import PeftkitError
from peftkit.methods.lora import LoraConfig
from peftkit.methods.lora_layers import LoraEmbedding, LoraLinear


def _nonzero(layer, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.adapter_params().values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_linear_forward_matches_dense(use_rslora):
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    layer = LoraLinear(base, r=3, alpha=6, use_rslora=use_rslora)
    _nonzero(layer)
    x = torch.randn(5, 12)
    scaling = 6 / (math.sqrt(3) if use_rslora else 3)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    expected = x @ base.weight.T + base.bias + scaling * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
    assert layer.scaling == pytest.approx(scaling)


def test_default_init_is_identity_and_b_zero():
    base = nn.Linear(8, 8)
    layer = LoraLinear(base, r=2, alpha=4)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert torch.count_nonzero(layer.lora_A.weight) > 0
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), base(x))


def test_conv1d_forward_and_delta_layout():
    torch.manual_seed(0)
    base = Conv1D(nf=6, nx=10)  # weight (in=10, out=6)
    nn.init.normal_(base.weight)
    layer = LoraLinear(base, r=2, alpha=2)
    _nonzero(layer)
    x = torch.randn(4, 10)
    delta = layer.lora_B.weight @ layer.lora_A.weight  # (out, in)
    torch.testing.assert_close(layer(x), x @ base.weight + base.bias + x @ delta.T, rtol=0, atol=1e-5)
    assert layer.delta_weight().shape == base.weight.shape == (10, 6)
    torch.testing.assert_close(layer.delta_weight(), delta.T)


def test_embedding_forward_matches_dense():
    torch.manual_seed(0)
    base = nn.Embedding(20, 6)
    layer = LoraEmbedding(base, r=3, alpha=3)
    _nonzero(layer)
    ids = torch.tensor([[1, 5, 19], [0, 2, 2]])
    dense = base.weight + (layer.lora_embedding_B @ layer.lora_embedding_A).T
    torch.testing.assert_close(layer(ids), dense[ids], rtol=0, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: nn.Linear(9, 5), lambda: Conv1D(5, 9), lambda: nn.Embedding(11, 5)])
def test_merge_unmerge_round_trip_and_idempotent(make):
    torch.manual_seed(0)
    base = make()
    nn.init.normal_(base.weight)
    original = base.weight.detach().clone()
    layer = (LoraEmbedding if isinstance(base, nn.Embedding) else LoraLinear)(base, r=2, alpha=4)
    _nonzero(layer)
    x = torch.randint(0, 11, (3, 4)) if isinstance(base, nn.Embedding) else torch.randn(3, 9)
    before = layer(x)
    layer.merge()
    layer.merge()  # idempotent: the delta is added once
    assert layer.merged
    torch.testing.assert_close(base.weight, original + layer.delta_weight(), rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-5)
    layer.unmerge()
    layer.unmerge()
    torch.testing.assert_close(base.weight, original, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-5)


def test_merge_refuses_non_finite():
    layer = LoraLinear(nn.Linear(4, 4), r=1, alpha=1)
    with torch.no_grad():
        layer.lora_B.weight.fill_(float("inf"))
    with pytest.raises(PeftkitError, match="NaN/inf"):
        layer.merge()
    assert not layer.merged


def test_merge_in_place_refuses_weights_float16_cannot_hold():
    """The in-place merge checked the fp32 sum, then cast it into a float16 weight: 70000 was written as inf."""
    layer = LoraLinear(nn.Linear(6, 4).half(), r=2, alpha=2)
    with torch.no_grad():
        layer.base_layer.weight.fill_(60000.0)
        layer.lora_A.weight.fill_(1.0)
        layer.lora_B.weight.fill_(5000.0)  # update: 2 x 5000 x (alpha / r = 1) = 10000 per weight
    with pytest.raises(PeftkitError, match=r"^Merging this layer gives weights beyond what float16 holds \(largest "
                                           r"magnitude 70000\): the layer was left unmerged; convert it to bfloat16"):
        layer.merge()
    assert not layer.merged and (layer.base_layer.weight == 60000.0).all()


def test_bf16_base_keeps_fp32_adapter_and_output_dtype():
    base = nn.Linear(8, 8).to(torch.bfloat16)
    layer = LoraLinear(base, r=2, alpha=2)
    assert layer.lora_A.weight.dtype == torch.float32
    assert layer(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_bf16_base_adds_the_update_before_rounding_as_peft(tiny_llama, tmp_path):
    """On a bf16 base the fp32 update is added, then the sum rounded once, as peft's Linear does: the same logits
    bit for bit (rounded first, then added, they were up to 0.05 apart)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftkit.adapter_base import load_adapted_model
    from peftkit.recipe import ModelConfig
    from tests.conftest import save_random_adapter

    adapter = save_random_adapter(tiny_llama, LoraConfig(r=4, alpha=8), tmp_path / "adapter", seed=3, std=0.2)
    ids = torch.randint(4, 100, (2, 40), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16)
    reference = PeftModel.from_pretrained(base, str(adapter)).eval()
    ours = load_adapted_model(ModelConfig(name_or_path=str(tiny_llama), dtype="bfloat16"), str(adapter))[0]
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_state_dict_merge_loads_into_plain_model_strict():
    """merge_state_dict is pure and its output loads into a plain nn.Linear model with strict=True."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    base_state = {k: v.clone() for k, v in plain.state_dict().items()}
    A, B = torch.randn(2, 6), torch.randn(3, 2)
    adapter = {"base_model.model.2.lora_A.weight": A, "base_model.model.2.lora_B.weight": B}
    merged = merge_state_dict(base_state, adapter, LoraConfig(r=2, alpha=1))  # scaling alpha / r = 0.5
    for k, v in plain.state_dict().items():  # inputs untouched
        torch.testing.assert_close(base_state[k], v)
    target = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    target.load_state_dict(merged, strict=True)
    x = torch.randn(4, 6)
    expected = plain(x) + 0.5 * (torch.relu(plain[0](x)) @ A.T @ B.T)
    torch.testing.assert_close(target(x), expected, rtol=0, atol=1e-5)


def test_state_dict_merge_into_float16_refuses_weights_it_cannot_hold():
    """The fp32 sum was checked finite, then cast: a float16 output wrote 70000 as inf without a word."""
    base = {"fc.weight": torch.full((4, 6), 60000.0), "fc.bias": torch.zeros(4)}
    adapter = {"base_model.model.fc.lora_A.weight": torch.ones(2, 6), "base_model.model.fc.lora_B.weight":
               torch.full((4, 2), 5000.0)}  # update: 2 x 5000 x (alpha / r = 1) = 10000 per weight
    with pytest.raises(PeftkitError, match=r"^Merging 'fc' gives weights beyond what float16 holds \(largest "
                                           r"magnitude 70000\): merge into bfloat16 or float32"):
        merge_state_dict(base, adapter, LoraConfig(r=2, alpha=2), dtype=torch.float16)
    wide = merge_state_dict(base, adapter, LoraConfig(r=2, alpha=2), dtype=torch.bfloat16)
    assert torch.isfinite(wide["fc.weight"]).all()


def test_state_dict_merge_rejects_wrong_shape():
    base = {"fc.weight": torch.zeros(4, 6)}
    adapter = {"base_model.model.fc.lora_A.weight": torch.zeros(2, 5), "base_model.model.fc.lora_B.weight": torch.zeros(4, 2)}
    with pytest.raises(PeftkitError, match="module 'fc' has weight \\(4, 6\\)"):
        merge_state_dict(base, adapter, LoraConfig(r=2, alpha=2))
