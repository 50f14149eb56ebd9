"""MiSS (peftkit.methods.miss) beyond the conformance battery of tests/test_methods.py: each variant against peft 0.21's
MissLinear layer by layer (forward with dropout, gradients, merge, unmerge, init), peft's bat adapter loaded, trained
and merged with peft's numbers, the shipped recipe, and what it refuses."""

from __future__ import annotations

import json

import peft
import pytest
import torch
import yaml
from peft import get_peft_model
from peft.tuners.miss.layer import MissLinear
from torch import nn

from peftkit.adapters import inject_adapters
from peftkit.errors import PeftkitError
from peftkit.merge import merge_adapter
from peftkit.methods.miss import Miss, MissConfig
from tests.conftest import load_fp32 as _load  # (float32, eval mode)
from tests.conftest import (check_loads_and_merges_as_peft, check_routed_as_peft, cli_user_error, make_recipe,
                            peft_and_our_gradients, train_shipped_recipe)

IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])


@pytest.mark.parametrize(("init_weights", "r", "mini_r", "shape", "dropout"), [
    (False, 5, 1, (13, 8), 0.3),  # balance, 3 of 13 inputs past the last whole shard (padded), dropout on
    ("mini", 4, 2, (13, 8), 0.0),
    ("bat", 4, 1, (12, 8), 0.0),  # (peft's bat applies no dropout)
])
def test_each_variant_is_peft_s_layer(init_weights, r, mini_r, shape, dropout):
    """One layer: peft's MissLinear and peftkit's on the same block give the same output (in training, with the same
    dropout mask), the same gradients, and the same merged and unmerged weights."""
    torch.manual_seed(0)
    config = peft.MissConfig(r=r, init_weights=init_weights, mini_r=mini_r, miss_dropout=dropout)
    theirs = MissLinear(nn.Linear(*shape), "default", config=config, r=r).train()
    ours = Miss.wrap(nn.Linear(*shape), MissConfig(method="miss", r=r, init_weights=init_weights, mini_r=mini_r,
                                                   miss_dropout=dropout), "layer").train()
    ours.base_layer.load_state_dict(theirs.base_layer.state_dict())
    with torch.no_grad():
        theirs.miss_block["default"].normal_()
        ours.miss_block.copy_(theirs.miss_block["default"])
    x = torch.randn(3, 5, shape[0])
    torch.manual_seed(1)
    out_theirs = theirs(x)
    torch.manual_seed(1)
    out_ours = ours(x)
    assert torch.equal(out_ours, out_theirs) and (out_ours - ours.base_layer(x)).abs().max() > 0.5
    out_theirs.square().sum().backward()
    out_ours.square().sum().backward()
    assert torch.equal(ours.miss_block.grad, theirs.miss_block["default"].grad)

    weight = theirs.base_layer.weight.detach().clone()
    theirs.merge()
    ours.merge()
    assert torch.equal(ours.base_layer.weight, theirs.base_layer.weight)
    assert (ours.base_layer.weight - weight).abs().max() > 0.5
    theirs.unmerge()
    ours.unmerge()
    assert (ours.base_layer.weight - weight).abs().max() <= 1e-6


def test_the_init_is_peft_s():
    """Zeros in every variant (the base model), at peft's shapes; init_weights false draws peft's kaiming-uniform
    block from torch's global generator: one seed, peft's numbers."""
    for init_weights, shape in ((True, (4, 8)), ("bat", (2, 4, 4)), ("mini", (4, 2))):
        layer = Miss.wrap(nn.Linear(12, 8), MissConfig(method="miss", r=4, init_weights=init_weights, mini_r=2), "l")
        assert tuple(layer.miss_block.shape) == shape and not layer.miss_block.any()
    torch.manual_seed(5)
    theirs = MissLinear(nn.Linear(12, 8), "default", config=peft.MissConfig(r=4, init_weights=False), r=4)
    torch.manual_seed(5)
    ours = Miss.wrap(nn.Linear(12, 8), MissConfig(method="miss", r=4, init_weights=False), "layer")
    assert torch.equal(ours.miss_block, theirs.miss_block["default"]) and ours.miss_block.abs().min() > 0


def test_peft_s_bat_adapter_loads_merges_and_trains_as_peft_s(tiny_llama, tmp_path):
    """peft's bat adapter (moved off zeros) gives peft's logits, merged in place, by `merged_model` and by `peftkit
    merge` (peft's merge_and_unload's), and one training step's loss and gradients are peft's."""
    torch.manual_seed(0)
    made = get_peft_model(_load(tiny_llama), peft.MissConfig(r=4, init_weights="bat",
                                                             target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for p in made.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape))
    made.save_pretrained(tmp_path / "peft")
    check_loads_and_merges_as_peft(tiny_llama, tmp_path / "peft", IDS, tmp_path / "merged", unloaded=True)
    difference, expected, grads = peft_and_our_gradients(tiny_llama, tmp_path / "peft", IDS)
    assert difference <= 1e-6 and grads.keys() == expected.keys() and len(grads) == 6
    assert max(float((grads[n] - expected[n]).abs().max()) for n in grads) <= 1e-6


def test_the_shipped_recipe_trains(tiny_llama, number_data, tmp_path):
    summary = train_shipped_recipe("miss", tiny_llama, number_data, tmp_path / "run",
                                   steps=3, sets=("training.lr=1e-2",))
    assert summary["eval_loss"] < summary["base_eval_loss"]
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["init_weights"], config["mini_r"]) == ("MISS", 16, True, 1)
    assert (tmp_path / "run" / "merged").is_dir()


def test_what_it_cannot_do_is_refused(tiny_llama, tiny_gpt2, number_data, tmp_path, monkeypatch, capsys):
    """peft's layer checks as recipe errors naming the key, the layer and the fix (r past a layer's inputs, bat's
    blocks that do not tile a weight, a mini_r that does not divide the outputs), GPT-2's Conv1D (peft's MiSS refuses
    it too), AdapterFusion, and a peft file whose bias is trained."""
    from peftkit.methods.fusion import FusionConfig
    from peftkit.recipe import load_recipe
    from peftkit.methods.fusion_sources import check_fusable, fused_adapters

    recipe = make_recipe(tmp_path, tiny_llama, number_data)
    raw = yaml.safe_load(recipe.read_text())
    for adapter, message in (
        ({"r": 40}, "adapter.r: 40 is more than the 32 inputs of 'model.layers.0.self_attn.q_proj'; MiSS cuts a "
                    "layer's inputs into r-wide shards, so r can be at most its input size (peft refuses it too). "
                    "Lower r, or leave this layer out of target_modules."),
        ({"r": 12, "init_weights": "bat"}, "adapter.r: 12 does not divide the 32 x 32 weight of "
                                           "'model.layers.0.self_attn.q_proj', which init_weights: bat cuts into r x r "
                                           "blocks (peft refuses it too)."),
        ({"r": 4, "init_weights": "mini", "mini_r": 12}, "adapter.mini_r: 12 does not divide the 32 outputs of "
                                                         "'model.layers.0.self_attn.q_proj', across which init_weights: "
                                                         "mini repeats its (r, mini_r) block (peft refuses it too)."),
    ):
        raw["adapter"] = {"method": "miss", **adapter}
        recipe.write_text(yaml.safe_dump(raw))
        assert message in " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())
    raw["adapter"] = {"method": "miss", "init_weights": "bta"}  # (pydantic's union said it twice, once per member)
    recipe.write_text(yaml.safe_dump(raw))
    with pytest.raises(PeftkitError) as refused:
        load_recipe(recipe)
    assert str(refused.value).split(": ", 1)[1] == ("'adapter.init_weights' = 'bta': must be true (balance), false "
                                                    "(balance from a random start), bat or mini: peft's MiSS variants.")
    with pytest.raises(PeftkitError, match=r"'transformer.h.0.attn.c_attn' is GPT-2's Conv1D; MiSS adapts nn.Linear"):
        inject_adapters(_load(tiny_gpt2), MissConfig(method="miss", r=4))

    torch.manual_seed(0)
    get_peft_model(_load(tiny_llama), peft.MissConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "p")
    config = tmp_path / "p" / "adapter_config.json"
    with pytest.raises(PeftkitError, match=r"is a MiSS adapter; AdapterFusion fuses bottleneck adapters, or"):
        check_fusable(fused_adapters(FusionConfig(method="fusion", fuse=[str(tmp_path / "p")] * 2)), "adapter.fuse")
    config.write_text(json.dumps(json.loads(config.read_text()) | {"bias": "MiSS_only"}))
    with pytest.raises(PeftkitError, match="bias='MiSS_only'; peftkit supports bias='none' only"):
        merge_adapter(str(tmp_path / "p"), str(tmp_path / "merged"), base=str(tiny_llama))


def test_named_adapters_of_two_variants_serve_each_its_rows_as_peft(tiny_llama, tmp_path):
    """A mixed batch over a bat adapter (the layer computed from its updated weight) and a balance one (an update
    added to the base output): each row gets its own adapter's peft logits."""


    for name, variant in (("a", "bat"), ("b", True)):
        torch.manual_seed(0)
        made = get_peft_model(_load(tiny_llama), peft.MissConfig(r=4, init_weights=variant,
                                                                 target_modules=["q_proj", "down_proj"]))
        with torch.no_grad():
            for p in made.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn(p.shape))
        made.save_pretrained(tmp_path / name)
    check_routed_as_peft(tiny_llama, [tmp_path / "a", tmp_path / "b"], IDS)
