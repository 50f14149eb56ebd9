"""GraLoRA (method: gralora) against HF peft 0.21's GraLoRA: its layer for Linear and GPT-2's Conv1D (the draws for a
seed, forward, gradients, merge, unmerge; with and without the hybrid LoRA, k 2 and 4), peft's adapters loaded, merged
and trained with peft's numbers, the shipped recipe, and what it refuses. The conformance battery (tests/test_methods.py)
checks the rest."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.gralora.layer import Linear as PeftGraloraLinear
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit.adapters import inject_adapters
from peftkit.errors import PeftkitError
from peftkit.methods.gralora import Gralora, GraloraConfig
from tests.conftest import load_fp32 as _load  # (float32, eval mode)
from tests.conftest import (check_loads_and_merges_as_peft, check_trained_bias_refused, cli_user_error, method_recipe,
                            peft_and_our_gradients, train_shipped_recipe)
from tests.test_methods import gralora_dense

IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])
LAYERS = {"linear": lambda: nn.Linear(12, 8), "conv1d": lambda: Conv1D(8, 12)}


def _names(hybrid: int) -> list[str]:
    return ["gralora_A", "gralora_B"] + (["gralora_A_general", "gralora_B_general"] if hybrid else [])


def _peft_s(layer: nn.Module, name: str) -> torch.Tensor:
    held = getattr(layer, name)["default"]
    return held if isinstance(held, nn.Parameter) else held.weight


def _ours(layer: nn.Module, name: str) -> torch.Tensor:
    held = getattr(layer, name)
    return held if isinstance(held, nn.Parameter) else held.weight


@pytest.mark.parametrize(("kind", "init", "hybrid", "k"), [("linear", True, 0, 2), ("linear", False, 2, 4),
                                                          ("conv1d", True, 2, 2), ("conv1d", False, 0, 4)])
def test_the_layer_is_peft_s(kind, init, hybrid, k):
    """One layer: from one seed, peft's A and B (and the hybrid pair) bit for bit; on random tensors the output and
    gradients are peft's bit for bit and the dense block update's (tests/test_methods.py's gralora_dense); merged,
    peft's weight (1e-6); unmerged, the weight before (1e-6)."""
    cfg = GraloraConfig(method="gralora", r=4, gralora_k=k, hybrid_r=hybrid, alpha=6, init_weights=init)
    torch.manual_seed(0)
    theirs = PeftGraloraLinear(LAYERS[kind](), "default", "layer", r=4, config=peft.GraloraConfig(
        r=4, gralora_k=k, hybrid_r=hybrid, alpha=6, init_weights=init, fan_in_fan_out=kind == "conv1d"))
    torch.manual_seed(0)
    ours = Gralora.wrap(LAYERS[kind](), cfg, "layer")
    pairs = [(_ours(ours, n), _peft_s(theirs, n)) for n in _names(hybrid)]
    assert all(torch.equal(mine, peft_s) for mine, peft_s in pairs) and len(pairs) == 2 + 2 * bool(hybrid)
    assert torch.equal(ours.base_layer.weight, theirs.base_layer.weight)
    assert (ours.gralora_B.abs().max() == 0) == init
    with torch.no_grad():
        for mine, peft_s in pairs:
            mine.copy_(torch.randn(mine.shape))
            peft_s.copy_(mine)
    weight = ours.base_layer.weight.detach().clone()
    parts = {n: p.detach().clone() for n, p in ours.parts().items()}
    dense = gralora_dense(weight, None, parts, cfg, kind)[0]
    x = torch.randn(3, 5, 12)
    out_theirs, out_ours = theirs(x), ours(x)
    exact = (x @ dense if kind == "conv1d" else x @ dense.T) + ours.base_layer.bias
    assert torch.equal(out_ours, out_theirs) and (out_ours - exact).abs().max() <= 1e-5
    assert (out_ours - ours.base_layer(x)).abs().max() > 1
    out_theirs.square().sum().backward()
    out_ours.square().sum().backward()
    assert all(torch.equal(mine.grad, peft_s.grad) for mine, peft_s in pairs)
    theirs.merge()
    ours.merge()
    assert (ours.base_layer.weight - theirs.base_layer.weight).abs().max() <= 1e-6
    assert (ours.base_layer.weight - dense).abs().max() <= 1e-5
    ours.unmerge()
    assert (ours.base_layer.weight - weight).abs().max() <= 1e-6


def _peft_adapter(base: Path, out: Path, **settings) -> Path:
    """peft's GraLoRA with B drawn too (init_weights=False: its default B is 0, the identity), saved by peft."""
    torch.manual_seed(0)
    config = {"r": 4, "alpha": 6, "init_weights": False, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    model = get_peft_model(_load(base), peft.GraloraConfig(task_type="CAUSAL_LM", **config | settings))
    model.save_pretrained(out)
    return out


def test_peft_s_adapter_loads_merges_and_trains_as_peft_s(tiny_llama, tmp_path):
    """peft's hybrid adapter with k 4 (the battery loads peft's on GPT-2's Conv1D too): peft's logits in peftkit, merged
    in place (and back), by merged_model and by `peftkit merge` (peft's merge_and_unload's logits, and weights within
    1e-6), and one training step's loss and gradients are peft's (1e-5 relative)."""
    adapter = _peft_adapter(tiny_llama, tmp_path / "peft", gralora_k=4, hybrid_r=2)
    check_loads_and_merges_as_peft(tiny_llama, adapter, IDS, tmp_path / "merged", unloaded=True)
    theirs = PeftModel.from_pretrained(_load(tiny_llama), adapter).merge_and_unload().state_dict()
    ours = _load(tmp_path / "merged").state_dict()
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours if k in theirs) <= 1e-6
    difference, expected, grads = peft_and_our_gradients(tiny_llama, adapter, IDS)
    assert difference <= 1e-6 and grads.keys() == expected.keys() and len(grads) == 4 * 3 * 2  # 4 tensors, 3 targets
    assert max(float((grads[n] - expected[n]).abs().max() / expected[n].abs().max()) for n in grads) <= 1e-5


def test_the_shipped_recipe_trains_and_peft_loads_its_export(tiny_llama, number_data, tmp_path):
    summary = train_shipped_recipe("gralora", tiny_llama, number_data, tmp_path / "run", steps=3, batch_size=2)
    assert summary["eval_loss"] < summary["base_eval_loss"]
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["gralora_k"], config["alpha"]) == ("GRALORA", 8, 2, 16)
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(_load(tiny_llama), tmp_path / "run" / "adapter")(input_ids=IDS).logits
        merged = _load(tmp_path / "run" / "merged")(input_ids=IDS).logits
    assert (merged - theirs).abs().max() <= 1e-5


@pytest.mark.parametrize(("adapter", "message"), [
    ({"r": 6, "gralora_k": 4}, "adapter.gralora_k: 4 does not divide r 6; each of the k x k blocks has rank r / k "
                               "(peft refuses it too): make r a multiple of gralora_k"),
    ({"r": 6, "gralora_k": 3}, "adapter.gralora_k: 3 does not divide both sizes of 'model.layers.0.self_attn.q_proj' "
                               "(32 inputs, 32 outputs); GraLoRA cuts each into 3 equal parts (peft refuses it too). "
                               "Use a k dividing every target's sizes (and r), at most 32 here"),
    ({"target_modules": ["embed_tokens"]}, "adapter.target_modules: 'model.embed_tokens' is an Embedding; GraLoRA "
                                           "adapts nn.Linear and GPT-2's Conv1D (and 4-bit/8-bit) layers only"),
    ({"gralora_dropout": 1.0}, "'adapter.gralora_dropout' = 1.0"),
    ({"hybrid_r": -1}, "'adapter.hybrid_r' = -1"),
    ({"dropout": 0.1}, "GraLoRA (method: gralora) has no 'dropout'. Did you mean 'gralora_dropout'? Valid keys for "
                       "method gralora: method, r, hybrid_r, alpha, gralora_dropout, gralora_k, init_weights"),
])
def test_recipe_mistakes_are_refused(adapter, message, tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "gralora", "r": 4, **adapter})
    assert message in " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())


def test_a_trained_bias_and_embeddings_are_refused(tiny_llama, tmp_path):
    """peftkit does not train a bias (peft's bias 'gralora_only'), and peft's GraLoRA has no embedding layer."""

    with pytest.raises(PeftkitError, match=r"'model.embed_tokens' is an Embedding; GraLoRA adapts nn.Linear"):
        inject_adapters(_load(tiny_llama), GraloraConfig(method="gralora", r=4, target_modules=["embed_tokens"]))
    adapter = _peft_adapter(tiny_llama, tmp_path / "peft")
    check_trained_bias_refused(adapter, "gralora_only")
