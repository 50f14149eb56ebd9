"""PEANuT (peftkit.methods.peanut) beyond the conformance battery of tests/test_methods.py: its layer against peft
0.21's (init and generator for a seed, forward, gradients, merge, unmerge), peft's adapters loaded, trained and merged
with peft's numbers, the shipped recipe with peft's file layout, and what it refuses. (It keeps no state beyond its
parameters and has no dropout: a resumed run is any method's, tests/test_train.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from peft import get_peft_model
from peft.tuners.peanut.layer import Linear as PeftPeanutLinear
from safetensors.torch import load_file
from torch import nn

from peftkit.adapters import inject_adapters
from peftkit.errors import PeftkitError
from peftkit.methods.peanut import Peanut, PeanutConfig
from tests.conftest import load_fp32 as _load  # (float32, eval mode)
from tests.conftest import (check_loads_and_merges_as_peft, cli_user_error, method_recipe, peft_and_our_gradients,
                            train_shipped_recipe)

IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _peft_adapter(base: Path, out: Path, **settings) -> Path:
    """peft's PEANuT far from identity (init_weights=False: B drawn too), saved by peft."""
    torch.manual_seed(0)
    made = get_peft_model(_load(base), peft.PeanutConfig(init_weights=False, target_modules=TARGETS, **settings))
    made.save_pretrained(out)
    return out


@pytest.mark.parametrize("settings", [{"r": 4}, {"r": 4, "depth": 2, "act_fn": "gelu", "scaling": 0.5}])
def test_the_layer_is_peft_s(settings):
    """One biased layer: from one seed, peftkit's layer builds and draws peft's network in peft's order (the generator
    ends where peft's does), gives peft's output and gradients bit for bit, and merges and unmerges to peft's weights."""
    settings = settings | {"init_weights": False}
    torch.manual_seed(0)
    theirs_base, ours_base = nn.Linear(12, 8), nn.Linear(12, 8)
    ours_base.load_state_dict(theirs_base.state_dict())
    torch.manual_seed(1)
    theirs = PeftPeanutLinear(theirs_base, "default", r=settings["r"], config=peft.PeanutConfig(**settings))
    after_theirs = torch.randn(3)
    torch.manual_seed(1)
    ours = Peanut.wrap(ours_base, PeanutConfig(method="peanut", **settings), "layer")
    assert torch.equal(torch.randn(3), after_theirs)
    theirs_params = {n.replace(".default", ""): p for n, p in theirs.named_parameters() if not n.startswith("base_layer.")}
    assert theirs_params.keys() == ours.adapter_params().keys()
    assert all(torch.equal(p, theirs_params[n]) for n, p in ours.adapter_params().items())
    x = torch.randn(3, 5, 12)
    out_theirs, out_ours = theirs(x), ours(x)
    assert torch.equal(out_ours, out_theirs) and (out_ours - ours.base_layer(x)).abs().max() > 0.1
    out_theirs.square().sum().backward()
    out_ours.square().sum().backward()
    assert all(torch.equal(p.grad, theirs_params[n].grad) for n, p in ours.adapter_params().items())
    weight = theirs.base_layer.weight.detach().clone()
    theirs.merge()
    ours.merge()
    assert (ours.base_layer.weight - theirs.base_layer.weight).abs().max() <= 1e-6
    assert (ours(x) - out_theirs).abs().max() <= 1e-5
    ours.unmerge()
    assert torch.equal(ours.base_layer.weight, weight)


def test_peft_s_adapter_loads_merges_and_trains_as_peft_s(tiny_llama, tmp_path):
    """peft's PEANuT with a deep network (far from identity): peft's logits loaded, merged in place (and back), by
    `merged_model` and by `peftkit merge` (= merge_and_unload's); one training step's loss and gradients are peft's."""
    adapter = _peft_adapter(tiny_llama, tmp_path / "peft", r=4, depth=1, act_fn="silu")
    check_loads_and_merges_as_peft(tiny_llama, adapter, IDS, tmp_path / "merged", unloaded=True)
    difference, expected, grads = peft_and_our_gradients(tiny_llama, adapter, IDS)
    assert difference <= 1e-6 and grads.keys() == expected.keys() and len(grads) == 24
    assert max(float((grads[n] - expected[n]).abs().max()) for n in grads) <= 1e-6


def test_the_shipped_recipe_trains_and_saves_peft_s_file(tiny_llama, number_data, tmp_path):
    """recipes/methods/peanut.yaml trains (the loss falls, the merged model is written) and saves the keys, shapes and
    settings of peft's own file for the same targets."""
    summary = train_shipped_recipe("peanut", tiny_llama, number_data, tmp_path / "run")
    assert summary["eval_loss"] < summary["base_eval_loss"]
    assert (tmp_path / "run" / "merged").is_dir()
    adapter = tmp_path / "run" / "adapter"
    shapes = {k: tuple(v.shape) for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    torch.manual_seed(0)
    made = get_peft_model(_load(tiny_llama), peft.PeanutConfig(r=8, depth=1, target_modules="all-linear"))
    made.save_pretrained(tmp_path / "peft")
    assert shapes == {k: tuple(v.shape) for k, v in load_file(tmp_path / "peft" / "adapter_model.safetensors").items()}
    assert shapes["base_model.model.model.layers.0.self_attn.k_proj.peanut_encoders.0.weight"] == (8, 8)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["depth"], config["act_fn"]) == ("PEANUT", 8, 1, "relu")


@pytest.mark.parametrize(("adapter", "message"), [
    ({"act_fn": "relu6x"}, "'adapter.act_fn' = 'relu6x': 'relu6x' is no activation transformers has; use one of"),
    ({"depth": 33}, "'adapter.depth' = 33: must be less than or equal to 32"),
])
def test_recipe_mistakes_are_refused(adapter, message, tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "peanut", **adapter})
    assert message in " ".join(cli_user_error(monkeypatch, capsys, "train", str(recipe)).split())


def test_what_it_cannot_do_is_refused(tiny_llama, tiny_gpt2, tmp_path):
    """GPT-2's Conv1D and embeddings (peft's PEANuT adapts nn.Linear only), a model type without a default, and
    AdapterFusion."""
    from peftkit.methods.fusion import FusionConfig
    from peftkit.methods.fusion_sources import check_fusable, fused_adapters

    with pytest.raises(PeftkitError, match=r"'transformer.h.0.attn.c_attn' is GPT-2's Conv1D; PEANuT adapts"):
        inject_adapters(_load(tiny_gpt2), PeanutConfig(method="peanut", target_modules=["c_attn"]))
    with pytest.raises(PeftkitError, match=r"^adapter.target_modules: PEANuT has no default for model type 'gpt2'"):
        inject_adapters(_load(tiny_gpt2), PeanutConfig(method="peanut"))
    with pytest.raises(PeftkitError, match=r"'model.embed_tokens' is an Embedding; PEANuT adapts nn.Linear"):
        inject_adapters(_load(tiny_llama), PeanutConfig(method="peanut", target_modules=["embed_tokens"]))
    adapter = _peft_adapter(tiny_llama, tmp_path / "peft", r=4)
    with pytest.raises(PeftkitError, match=r"PEANuT adapter; AdapterFusion fuses bottleneck adapters, or"):
        check_fusable(fused_adapters(FusionConfig(method="fusion", fuse=[str(adapter), str(adapter)])), "adapter.fuse")
