"""RoAd (peftkit.methods.road) beyond the conformance battery of tests/test_methods.py: its layer against peft 0.21's
RoadLayer for each variant (init for a seed, forward, gradients, merge with the bias, unmerge), peft's adapters loaded,
trained and merged with peft's numbers, the shipped recipe with peft's file layout, and what it refuses. (RoAd keeps
no state beyond its parameters and has no dropout: a resumed run is any method's, tests/test_train.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.road.layer import Linear as PeftRoadLinear
from safetensors.torch import load_file
from torch import nn

from peftkit.adapters import inject_adapters
from peftkit.errors import PeftkitError
from peftkit.methods.road import Road, RoadConfig
from tests.conftest import load_fp32 as _load  # (float32, eval mode)
from tests.conftest import (check_combined_into_base_as_peft_merges, check_loads_and_merges_as_peft, cli_user_error,
                            method_recipe, peft_and_our_gradients, train_shipped_recipe)

IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _peft_adapter(base: Path, out: Path, **settings) -> Path:
    """peft's RoAd with random angles and scales (init_weights=False: its default is the identity), saved by peft."""
    torch.manual_seed(0)
    model = get_peft_model(_load(base), peft.RoadConfig(init_weights=False, target_modules=TARGETS, **settings))
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_the_layer_is_peft_s(variant):
    """One biased layer of 8 outputs in groups of 4: from one seed, peftkit's layer draws peft's angles and scales
    (init_weights false), and gives peft's output and gradients bit for bit; merged, peft's weight and bias (R W, R b);
    unmerged, the base's again (peft inverts R as a matrix, peftkit each 2 x 2 block)."""
    settings = {"variant": variant, "group_size": 4, "init_weights": False}
    torch.manual_seed(0)
    theirs = PeftRoadLinear(nn.Linear(12, 8), "default", config=peft.RoadConfig(**settings))
    torch.manual_seed(0)
    ours = Road.wrap(nn.Linear(12, 8), RoadConfig(method="road", **settings), "layer")
    assert torch.equal(ours.road_theta, theirs.road_theta["default"])
    assert torch.equal(ours.road_alpha, theirs.road_alpha["default"])
    assert torch.equal(ours.base_layer.weight, theirs.base_layer.weight)
    x = torch.randn(3, 5, 12)
    out_theirs, out_ours = theirs(x), ours(x)
    assert torch.equal(out_ours, out_theirs) and (out_ours - ours.base_layer(x)).abs().max() > 0.1
    out_theirs.square().sum().backward()
    out_ours.square().sum().backward()
    assert torch.equal(ours.road_theta.grad, theirs.road_theta["default"].grad)
    assert torch.equal(ours.road_alpha.grad, theirs.road_alpha["default"].grad)

    weight, bias = theirs.base_layer.weight.detach().clone(), theirs.base_layer.bias.detach().clone()
    theirs.merge()
    ours.merge()
    assert (ours.base_layer.weight - theirs.base_layer.weight).abs().max() <= 1e-6
    assert (ours.base_layer.bias - theirs.base_layer.bias).abs().max() <= 1e-6
    assert (ours(x) - out_theirs).abs().max() <= 1e-5
    theirs.unmerge()
    ours.unmerge()
    assert (ours.base_layer.weight - weight).abs().max() <= 1e-6 and (ours.base_layer.bias - bias).abs().max() <= 1e-6


def test_the_shipped_recipe_trains_and_saves_peft_s_file(tiny_llama, number_data, tmp_path):
    """recipes/methods/road.yaml trains (the loss falls, the merged model is written) and saves the keys, shapes and
    settings of peft's own file for the same targets."""
    summary = train_shipped_recipe("road", tiny_llama, number_data, tmp_path / "run",
                                   sets=("adapter.group_size=16", "adapter.variant=road_4",))
    assert summary["eval_loss"] < summary["base_eval_loss"]
    assert (tmp_path / "run" / "merged").is_dir()
    adapter = tmp_path / "run" / "adapter"
    shapes = {k: tuple(v.shape) for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    torch.manual_seed(0)
    made = get_peft_model(_load(tiny_llama), peft.RoadConfig(variant="road_4", group_size=16,
                                                             target_modules="all-linear"))
    made.save_pretrained(tmp_path / "peft")
    assert shapes == {k: tuple(v.shape) for k, v in load_file(tmp_path / "peft" / "adapter_model.safetensors").items()}
    assert shapes["base_model.model.model.layers.0.self_attn.k_proj.road_theta"] == (32,)  # 2 x 16 outputs
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["variant"], config["group_size"], config["init_weights"]) == (
        "ROAD", "road_4", 16, True)


@pytest.mark.parametrize(("adapter", "message"), [
    ({"group_size": 32}, "adapter.group_size: 32 does not divide the 16 outputs of 'model.layers.0.self_attn.k_proj' "
                         "(peft refuses it too); give a group size that divides every target's outputs (an even "
                         "divisor of the hidden size), or leave this layer out of target_modules."),
    ({"group_size": 5}, "'adapter.group_size' = 5: 5 does not split into two halves; give an even group size (peft's "
                        "default: 64)"),
    ({"variant": "road_3"}, "'adapter.variant' = 'road_3': must be one of 'road_1', 'road_2' or 'road_4'."),
])
def test_recipe_mistakes_are_refused(adapter, message, tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "road", "group_size": 8, **adapter})
    assert message in " ".join(cli_user_error(monkeypatch, capsys, "train", str(recipe)).split())


def test_what_it_cannot_do_is_refused(tiny_llama, tiny_gpt2, tmp_path):
    """GPT-2's Conv1D and embeddings (peft's RoAd adapts nn.Linear only), and AdapterFusion."""
    from peftkit.methods.fusion import FusionConfig
    from peftkit.methods.fusion_sources import check_fusable, fused_adapters

    with pytest.raises(PeftkitError, match=r"'transformer.h.0.attn.c_attn' is GPT-2's Conv1D; RoAd rotates the outputs"):
        inject_adapters(_load(tiny_gpt2), RoadConfig(method="road", group_size=8))
    with pytest.raises(PeftkitError, match=r"'model.embed_tokens' is an Embedding; RoAd rotates the outputs of nn.Linear"):
        inject_adapters(_load(tiny_llama), RoadConfig(method="road", group_size=8, target_modules=["embed_tokens"]))
    adapter = _peft_adapter(tiny_llama, tmp_path / "peft", group_size=8)
    with pytest.raises(PeftkitError, match=r"RoAd adapter; AdapterFusion fuses bottleneck adapters, or"):
        check_fusable(fused_adapters(FusionConfig(method="fusion", fuse=[str(adapter), str(adapter)])), "adapter.fuse")


def test_combining_adds_the_full_updates(tiny_llama, tmp_path):
    """`peftkit merge` of two RoAd adapters (a multiplicative update, so through its full per-layer update, as HRA's):
    weights 0.5 and 0.5 into the base give W + (R_1 W - W) / 2 + (R_2 W - W) / 2, from peft's merges of each."""
    first = _peft_adapter(tiny_llama, tmp_path / "a", group_size=8)
    torch.manual_seed(1)
    made = get_peft_model(_load(tiny_llama), peft.RoadConfig(variant="road_2", group_size=4, init_weights=False,
                                                             target_modules=TARGETS))
    made.save_pretrained(tmp_path / "b")
    check_combined_into_base_as_peft_merges(tiny_llama, [first, tmp_path / "b"], tmp_path / "c")


def test_peft_s_adapter_loads_merges_and_trains_as_peft_s(tmp_path):
    """peft's road_4 adapter (far from identity; the battery checks road_1) on a Qwen2 with biases (drawn: the tiny
    model's are zero) gives peft's logits, merged in place, by `merged_model` and by `peftkit merge`, whose weights and
    rotated biases are peft's merge_and_unload's; one training step's loss and gradients are peft's. Combining such
    adapters, whose update changes a bias that a combination cannot carry, is refused by name."""
    from transformers import AutoModelForCausalLM

    from peftkit.combine_adapters import combine_adapters
    from peftkit.combine_inputs import Combination
    from peftkit.tiny import build_tiny_model

    build_tiny_model(tmp_path / "zero", arch="qwen2", hidden_size=32, num_layers=2, seed=0)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "zero")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.bias.normal_()
    model.save_pretrained(tmp_path / "qwen2")
    base = tmp_path / "qwen2"
    adapter = _peft_adapter(base, tmp_path / "peft", variant="road_4", group_size=8)
    check_loads_and_merges_as_peft(base, adapter, IDS, tmp_path / "merged")
    theirs = PeftModel.from_pretrained(_load(base), adapter).merge_and_unload().state_dict()
    ours = _load(tmp_path / "merged").state_dict()
    assert ours.keys() == theirs.keys() and max(float((ours[k] - theirs[k]).abs().max()) for k in ours) <= 1e-6
    bias = "model.layers.0.self_attn.q_proj.bias"
    assert (ours[bias] - model.state_dict()[bias]).abs().max() > 1e-2

    difference, expected, grads = peft_and_our_gradients(base, adapter, IDS)
    assert difference <= 1e-6 and grads.keys() == expected.keys() and len(grads) == 12
    assert max(float((grads[n] - expected[n]).abs().max()) for n in grads) <= 1e-6
    with pytest.raises(PeftkitError, match="also changes the bias of 'model.layers.0.self_attn.q_proj', which a "
                                           "combination"):
        combine_adapters([str(adapter), str(adapter)], Combination("linear", (0.5, 0.5)), str(tmp_path / "c"),
                         into_base=True)
