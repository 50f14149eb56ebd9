"""BEFT (peftkit.methods.beft) beyond the conformance battery of tests/test_methods.py: its layer against peft 0.21's
BEFT Linear (init for a seed, forward, gradients, merge into the bias, unmerge), peft's adapter loaded and merged with
peft's numbers on a biased model, the shipped recipe with peft's file layout, and what it refuses: a merge into a
layer without a bias (in place, `peftkit merge`, export.merged before training), GPT-2's Conv1D, AdapterFusion. (BEFT
keeps no state beyond its parameters and has no dropout: a resumed run is any method's, tests/test_train.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.beft.layer import Linear as PeftBeftLinear
from safetensors.torch import load_file
from torch import nn

from peftkit.adapters import adapter_layers, inject_adapters
from peftkit.errors import PeftkitError
from peftkit.methods.beft import Beft, BeftConfig
from tests.conftest import load_fp32 as _load  # (float32, eval mode)
from tests.conftest import check_loads_and_merges_as_peft, cli_user_error, method_recipe, train_shipped_recipe

IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory) -> Path:
    """The tiny Qwen2 (biased q, k and v projections) with its biases drawn: the built model's are zero."""
    from transformers import AutoModelForCausalLM

    from peftkit.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("beft")
    build_tiny_model(root / "zero", arch="qwen2", hidden_size=32, num_layers=2, seed=0)
    model = AutoModelForCausalLM.from_pretrained(root / "zero")
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_()
    model.save_pretrained(root / "qwen2")
    return root / "qwen2"


def _peft_adapter(base: Path, out: Path, targets: list[str] | None = None) -> Path:
    """peft's BEFT with random biases (init_weights=False: its default is the base model), saved by peft."""
    torch.manual_seed(0)
    model = get_peft_model(_load(base), peft.BeftConfig(init_weights=False, target_modules=targets))
    model.save_pretrained(out)
    return out


def test_the_layer_is_peft_s():
    """One biased layer: from one seed, peftkit's layer draws peft's vector (init_weights false; peft draws it with
    init_weights true too, then zeroes it, as peftkit does), and gives peft's output and gradient bit for bit; merged,
    peft's bias (b + d) and the weight untouched; unmerged, the base's bias again."""
    torch.manual_seed(0)
    theirs = PeftBeftLinear(nn.Linear(12, 8), "default", config=peft.BeftConfig(init_weights=False))
    torch.manual_seed(0)
    ours = Beft.wrap(nn.Linear(12, 8), BeftConfig(method="beft", init_weights=False), "layer")
    assert torch.equal(ours.beft_bias, theirs.beft_bias["default"]) and ours.beft_bias.shape == (1, 8)
    assert torch.equal(ours.base_layer.weight, theirs.base_layer.weight)
    torch.manual_seed(1)
    PeftBeftLinear(nn.Linear(12, 8), "default", config=peft.BeftConfig())
    after_theirs = torch.randn(3)
    torch.manual_seed(1)
    zeroed = Beft.wrap(nn.Linear(12, 8), BeftConfig(method="beft"), "layer")
    assert not zeroed.beft_bias.any() and torch.equal(torch.randn(3), after_theirs)  # the generator where peft's is
    x = torch.randn(3, 5, 12)
    out_theirs, out_ours = theirs(x), ours(x)
    assert torch.equal(out_ours, out_theirs) and (out_ours - ours.base_layer(x)).abs().max() > 0.1
    out_theirs.square().sum().backward()
    out_ours.square().sum().backward()
    assert torch.equal(ours.beft_bias.grad, theirs.beft_bias["default"].grad)

    weight, bias = theirs.base_layer.weight.detach().clone(), theirs.base_layer.bias.detach().clone()
    theirs.merge()
    ours.merge()
    assert torch.equal(ours.base_layer.weight, weight) and torch.equal(ours.base_layer.bias, theirs.base_layer.bias)
    assert (ours(x) - out_theirs).abs().max() <= 1e-6
    ours.unmerge()
    assert torch.equal(ours.base_layer.weight, weight) and (ours.base_layer.bias - bias).abs().max() <= 1e-6


def test_peft_s_adapter_loads_and_merges_as_peft_s(tiny_qwen2, tmp_path):
    """peft's BEFT adapter (far from identity) on the tiny Qwen2's q/k/v projections, which have biases: peft's
    logits loaded, merged in place, by `merged_model` and by `peftkit merge`, whose biases are peft's
    merge_and_unload's. Its default targets (v_proj) are peft's too. Combining such adapters, whose update is a bias
    that a combination cannot carry, is refused by name."""
    from peftkit.combine_adapters import combine_adapters
    from peftkit.combine_inputs import Combination

    adapter = _peft_adapter(tiny_qwen2, tmp_path / "peft", ["q_proj", "k_proj", "v_proj"])
    check_loads_and_merges_as_peft(tiny_qwen2, adapter, IDS, tmp_path / "merged")
    theirs = PeftModel.from_pretrained(_load(tiny_qwen2), adapter).merge_and_unload().state_dict()
    ours = _load(tmp_path / "merged").state_dict()
    assert ours.keys() == theirs.keys() and max(float((ours[k] - theirs[k]).abs().max()) for k in ours) <= 1e-6
    bias = "model.layers.0.self_attn.v_proj.bias"
    assert (ours[bias] - _load(tiny_qwen2).state_dict()[bias]).abs().max() > 0.1
    with pytest.raises(PeftkitError, match="also changes the bias of 'model.layers.0.self_attn.k_proj', which a "
                                           "combination"):
        combine_adapters([str(adapter), str(adapter)], Combination("linear", (0.5, 0.5)), str(tmp_path / "c"),
                         into_base=True)
    model = _load(tiny_qwen2)
    assert sorted(inject_adapters(model, BeftConfig(method="beft"))) == [
        "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]


def test_the_shipped_recipe_trains_and_saves_peft_s_file(tiny_llama, number_data, tmp_path):
    """recipes/methods/beft.yaml (peft's default targets, v_proj, unmerged) trains, and saves the keys, shapes and
    settings of peft's own file for the same model; peft loads it with our logits."""
    from peftkit.adapter_base import load_adapted_model

    summary = train_shipped_recipe("beft", tiny_llama, number_data, tmp_path / "run")
    assert summary["eval_loss"] < summary["base_eval_loss"]
    adapter = tmp_path / "run" / "adapter"
    shapes = {k: tuple(v.shape) for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    _peft_adapter(tiny_llama, tmp_path / "peft")
    assert shapes == {k: tuple(v.shape) for k, v in load_file(tmp_path / "peft" / "adapter_model.safetensors").items()}
    assert shapes == {f"base_model.model.model.layers.{i}.self_attn.v_proj.beft_bias": (1, 16) for i in (0, 1)}
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["init_weights"]) == ("BEFT", True)
    with torch.no_grad():
        ours = load_adapted_model(None, str(adapter))[0].eval()(IDS).logits
        theirs = PeftModel.from_pretrained(_load(tiny_llama), adapter).eval()(IDS).logits
    assert (ours - theirs).abs().max() <= 1e-5


def test_a_layer_without_a_bias_cannot_be_merged(tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    """A Llama's projections have no bias: export.merged is refused before training (not after it), and an adapter's
    in-place merge and `peftkit merge` are refused by name (peft refuses too); the layer is left unmerged."""
    from peftkit.merge import merge_adapter

    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "beft"}, export={"merged": True})
    said = " ".join(cli_user_error(monkeypatch, capsys, "train", str(recipe)).split())
    assert ("adapter.target_modules: 'model.layers.0.self_attn.v_proj' (and 1 more) has no bias, so export.merged "
            "cannot fold BEFT's trained bias into the model (peft cannot either). Set export.merged: false") in said
    assert not (tmp_path / "run" / "checkpoints").exists()
    model = _load(tiny_llama)
    inject_adapters(model, BeftConfig(method="beft", init_weights=False))
    layer = adapter_layers(model)["model.layers.0.self_attn.v_proj"]
    with pytest.raises(PeftkitError, match=r"^this layer has no bias, so its BEFT adapter, a trained bias, cannot be "
                                           r"merged into it \(peft cannot either\)"):
        layer.merge()
    assert not layer.merged
    adapter = _peft_adapter(tiny_llama, tmp_path / "peft")
    with pytest.raises(PeftkitError, match=r"^'model.layers.0.self_attn.v_proj' has no bias, so its BEFT adapter"):
        merge_adapter(str(adapter), str(tmp_path / "merged"))


def test_what_it_cannot_do_is_refused(tiny_llama, tiny_gpt2, tmp_path):
    """GPT-2's Conv1D and embeddings (peft's BEFT adapts nn.Linear only), a model type without a default, and
    AdapterFusion."""
    from peftkit.methods.fusion import FusionConfig
    from peftkit.methods.fusion_sources import check_fusable, fused_adapters

    with pytest.raises(PeftkitError, match=r"'transformer.h.0.attn.c_attn' is GPT-2's Conv1D; BEFT adds a bias"):
        inject_adapters(_load(tiny_gpt2), BeftConfig(method="beft", target_modules=["c_attn"]))
    with pytest.raises(PeftkitError, match=r"^adapter.target_modules: BEFT has no default for model type 'gpt2'"):
        inject_adapters(_load(tiny_gpt2), BeftConfig(method="beft"))
    with pytest.raises(PeftkitError, match=r"'model.embed_tokens' is an Embedding; BEFT adds a bias to nn.Linear"):
        inject_adapters(_load(tiny_llama), BeftConfig(method="beft", target_modules=["embed_tokens"]))
    adapter = _peft_adapter(tiny_llama, tmp_path / "peft")
    with pytest.raises(PeftkitError, match=r"BEFT adapter; AdapterFusion fuses bottleneck adapters, or"):
        check_fusable(fused_adapters(FusionConfig(method="fusion", fuse=[str(adapter), str(adapter)])), "adapter.fuse")
