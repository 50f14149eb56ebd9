"""Super-Tuning (peftkit.methods.supertuning) beyond the conformance battery of tests/test_methods.py: its layer
against peft 0.21's (the support, init and generator for a seed, forward, gradients, merge, unmerge; with and without
the LoRA beside it, the largest and the smallest entries), peft's adapters loaded, trained and merged with peft's
numbers (one that leaves its indices out too), a bf16 base's logits bit for bit, the shipped recipe with peft's file
layout, and what it refuses. (It keeps no state beyond its parameters and the support its base decides: a resumed
run is any method's, tests/test_train.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.supertuning.layer import Linear as PeftSupertuningLinear
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from peftkit.adapters import inject_adapters
from peftkit.errors import PeftkitError
from peftkit.methods.supertuning import Supertuning, SupertuningConfig
from tests.conftest import load_fp32 as _load  # (float32, eval mode)
from tests.conftest import (check_loads_and_merges_as_peft, cli_user_error, method_recipe, peft_and_our_gradients,
                            train_shipped_recipe)

IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _peft_adapter(base: Path, out: Path, dtype: torch.dtype = torch.float32, **settings) -> Path:
    """peft's Super-Tuning far from identity (init_weights=False), saved by peft."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    made = get_peft_model(model, peft.SupertuningConfig(init_weights=False, target_modules=TARGETS, **settings))
    made.save_pretrained(out)
    return out


@pytest.mark.parametrize("settings", [{"sparsity": 0.8}, {"sparsity": 0.7, "r": 2, "lora_alpha": 3.0},
                                      {"sparsity": 0.8, "select_top": False, "r": 2}])
def test_the_layer_is_peft_s(settings):
    """One biased layer: from one seed, peftkit's layer picks peft's support (topk of |W|), draws peft's values and
    LoRA factors in peft's order (the generator ends where peft's does), gives peft's output and gradients bit for
    bit; merged and unmerged, peft's weights (1e-6)."""
    settings = settings | {"init_weights": False}
    torch.manual_seed(0)
    theirs_base, ours_base = nn.Linear(12, 8), nn.Linear(12, 8)
    ours_base.load_state_dict(theirs_base.state_dict())
    torch.manual_seed(1)
    theirs = PeftSupertuningLinear(theirs_base, "default", config=peft.SupertuningConfig(**settings))
    after_theirs = torch.randn(3)
    torch.manual_seed(1)
    ours = Supertuning.wrap(ours_base, SupertuningConfig(method="supertuning", **settings), "layer")
    assert torch.equal(torch.randn(3), after_theirs)
    assert torch.equal(ours.supertuning_indices, theirs.supertuning_indices["default"])
    assert torch.equal(ours.supertuning_values, theirs.supertuning_values["default"])
    if "r" in settings:
        assert torch.equal(ours.supertuning_lora_A.weight, theirs.supertuning_lora_A["default"].weight)
        assert torch.equal(ours.supertuning_lora_B.weight, theirs.supertuning_lora_B["default"].weight)
    x = torch.randn(3, 5, 12)
    out_theirs, out_ours = theirs(x), ours(x)
    assert torch.equal(out_ours, out_theirs) and (out_ours - ours.base_layer(x)).abs().max() > 0.1
    out_theirs.square().sum().backward()
    out_ours.square().sum().backward()
    ours_grads = {n: p.grad for n, p in ours.adapter_params().items() if p.is_floating_point()}
    theirs_grads = {n.replace(".default", ""): p.grad for n, p in theirs.named_parameters()
                    if not n.startswith("base_layer.")}
    assert ours_grads.keys() == theirs_grads.keys() and all(torch.equal(ours_grads[n], theirs_grads[n])
                                                            for n in ours_grads)
    theirs.merge()
    ours.merge()
    assert (ours.base_layer.weight - theirs.base_layer.weight).abs().max() <= 1e-6
    theirs.unmerge()
    ours.unmerge()
    assert (ours.base_layer.weight - theirs.base_layer.weight).abs().max() <= 1e-6


@pytest.mark.parametrize("saved", [True, False])
def test_peft_s_adapter_loads_merges_and_trains_as_peft_s(saved, tiny_llama, tmp_path):
    """peft's Super-Tuning with a LoRA beside its support (the smallest entries), its indices saved or not (then
    picked again from the base on loading, by both): peft's logits loaded, merged in place, by `merged_model` and by
    `peftkit merge` (= merge_and_unload's); one training step's loss and gradients are peft's; peftkit's export of
    the loaded adapter leaves the indices out as the file did."""
    from peftkit.adapter_base import load_adapted_model
    from peftkit.adapters.state_dicts import adapter_state_dict

    adapter = _peft_adapter(tiny_llama, tmp_path / "peft", sparsity=0.9, r=2, select_top=False,
                            save_precomputed_indices=saved)
    assert any(k.endswith("supertuning_indices") for k in load_file(adapter / "adapter_model.safetensors")) == saved
    check_loads_and_merges_as_peft(tiny_llama, adapter, IDS, tmp_path / "merged", unloaded=True)
    difference, expected, grads = peft_and_our_gradients(tiny_llama, adapter, IDS)
    assert difference <= 1e-6 and grads.keys() == expected.keys() and len(grads) == 18
    assert max(float((grads[n] - expected[n]).abs().max()) for n in grads) <= 1e-6
    model = load_adapted_model(None, str(adapter))[0]
    assert any(k.endswith("supertuning_indices") for k in adapter_state_dict(model, [])) == saved


def test_a_bf16_base_gives_peft_s_bf16_logits(tiny_llama, tmp_path):
    """On a bf16 base the support is the topk of the bf16 weight (its ties pick other entries than the fp32 one's,
    as in peft) and W + S is composed in bf16: peft's adapter made on the bf16 base, its indices left out, gives
    peft's bf16 logits bit for bit."""
    from peftkit.adapter_base import load_adapted_model
    from peftkit.recipe import ModelConfig

    adapter = _peft_adapter(tiny_llama, tmp_path / "peft", torch.bfloat16, sparsity=0.9, save_precomputed_indices=False)
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16),
                                           adapter).eval()(IDS).logits
        ours = load_adapted_model(ModelConfig(name_or_path=str(tiny_llama), dtype="bfloat16"), str(adapter))[0]
        ours = ours.eval()(IDS).logits
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, theirs)


def test_the_shipped_recipe_trains_and_saves_peft_s_file(tiny_llama, number_data, tmp_path):
    """recipes/methods/supertuning.yaml trains (the loss falls, the merged model is written) and saves the keys,
    shapes, support and settings of peft's own file for the same base and targets."""
    summary = train_shipped_recipe("supertuning", tiny_llama, number_data, tmp_path / "run")
    assert summary["eval_loss"] < summary["base_eval_loss"]
    assert (tmp_path / "run" / "merged").is_dir()
    adapter = tmp_path / "run" / "adapter"
    ours = load_file(adapter / "adapter_model.safetensors")
    torch.manual_seed(0)
    made = get_peft_model(_load(tiny_llama), peft.SupertuningConfig(sparsity=0.95, target_modules="all-linear"))
    made.save_pretrained(tmp_path / "peft")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if k.endswith("supertuning_indices"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["sparsity"], config["r"], config["save_precomputed_indices"]) == (
        "SUPERTUNING", 0.95, None, True)


@pytest.mark.parametrize(("adapter", "sections", "message"), [
    ({"lora_alpha": 4.0}, {}, "adapter: lora_alpha is set but r is null: the LoRA beside the support (Supra) needs a "
                              "rank; set adapter.r, or remove lora_alpha (peft refuses it too)"),
    ({"sparsity": 1.0}, {}, "'adapter.sparsity' = 1.0: must be less than 1"),
    ({"sparsity": 0.9999}, {}, "adapter.sparsity: 0.9999 leaves no trainable entry of 'model.layers.0.self_attn.q_proj' "
                               "(1024 entries; peft refuses it too); lower the sparsity."),
    ({}, {"quantization": {"method": "nf4"}},
     "adapter.target_modules: 'model.layers.0.self_attn.q_proj' is a 4-bit/8-bit (bitsandbytes) layer; Super-Tuning "
     "composes each layer's weight with its trained entries"),
])
def test_recipe_mistakes_are_refused(adapter, sections, message, tiny_llama, number_data, tmp_path, monkeypatch,
                                     capsys):
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "supertuning", **adapter}, **sections)
    assert message in " ".join(cli_user_error(monkeypatch, capsys, "train", str(recipe)).split())


def test_what_it_cannot_do_is_refused(tiny_llama, tiny_gpt2, tmp_path):
    """GPT-2's Conv1D and embeddings (peft's Super-Tuning adapts nn.Linear only), and AdapterFusion."""
    from peftkit.methods.fusion import FusionConfig
    from peftkit.methods.fusion_sources import check_fusable, fused_adapters

    with pytest.raises(PeftkitError, match=r"'transformer.h.0.attn.c_attn' is GPT-2's Conv1D; Super-Tuning composes"):
        inject_adapters(_load(tiny_gpt2), SupertuningConfig(method="supertuning", target_modules=["c_attn"]))
    with pytest.raises(PeftkitError, match=r"'model.embed_tokens' is an Embedding; Super-Tuning composes"):
        inject_adapters(_load(tiny_llama), SupertuningConfig(method="supertuning", target_modules=["embed_tokens"]))
    adapter = _peft_adapter(tiny_llama, tmp_path / "peft", sparsity=0.9)
    with pytest.raises(PeftkitError, match=r"Super-Tuning adapter; AdapterFusion fuses bottleneck adapters, or"):
        check_fusable(fused_adapters(FusionConfig(method="fusion", fuse=[str(adapter), str(adapter)])), "adapter.fuse")
