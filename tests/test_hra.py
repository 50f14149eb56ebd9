"""HRA (peftkit.methods.hra) beyond the conformance battery of tests/test_methods.py: its compact form against peft
0.21's chain of reflections layer by layer (forward, gradients, merge, unmerge), peft's adapters (with and without
Gram-Schmidt) loaded, trained and merged with peft's numbers, a resumed run, the shipped recipe, and what it refuses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import peft
import pytest
import torch
import yaml
from peft import PeftModel, get_peft_model
from peft.tuners.hra.layer import HRALinear
from safetensors.torch import load_file
from torch import nn

from peftkit.adapters import inject_adapters
from peftkit.errors import PeftkitError
from peftkit.merge import merge_adapter
from peftkit.methods.hra import Hra, HraConfig, householder_factors
from tests.conftest import load_fp32 as _load  # (float32, eval mode)
from tests.conftest import (check_combined_into_base_as_peft_merges, check_loads_and_merges_as_peft,
                            check_resumes_to_the_same_bits, check_trained_bias_refused, cli_user_error, make_recipe,
                            method_recipe, peft_and_our_gradients, train_shipped_recipe, unplaced)

IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _peft_adapter(base: Path, out: Path, **settings) -> Path:
    """peft's HRA with every vector drawn (init_weights=False: its default pairs them, the identity), saved by peft."""
    torch.manual_seed(0)
    model = get_peft_model(_load(base), peft.HRAConfig(r=4, init_weights=False, target_modules=TARGETS, **settings))
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize(("r", "apply_gs"), [(4, False), (5, False), (3, True)])
def test_the_compact_form_is_peft_s_chain_of_reflections(r, apply_gs):
    """One layer: peft's HRALinear and peftkit's on the same vectors give the same output, the same gradients and the
    same merged and unmerged weights (peft: W H and W H^-1 as (in, in) matrices; here x - ((x U) T^T) U^T)."""
    torch.manual_seed(0)
    config = peft.HRAConfig(r=r, apply_GS=apply_gs, init_weights=False)
    theirs = HRALinear(nn.Linear(12, 7), "default", config=config, r=r)
    ours = Hra.wrap(nn.Linear(12, 7), HraConfig(method="hra", r=r, apply_GS=apply_gs), "layer")
    ours.base_layer.load_state_dict(theirs.base_layer.state_dict())
    with torch.no_grad():
        ours.hra_u.copy_(theirs.hra_u["default"])
    x = torch.randn(3, 5, 12)
    out_theirs, out_ours = theirs(x), ours(x)
    assert (out_ours - out_theirs).abs().max() <= 1e-5 and (out_ours - ours.base_layer(x)).abs().max() > 0.1
    out_theirs.square().sum().backward()
    out_ours.square().sum().backward()
    grad = theirs.hra_u["default"].grad  # of order 10 here: fp32 rounding is relative to that
    assert (ours.hra_u.grad - grad).abs().max() <= 2e-6 * grad.abs().max()

    weight = theirs.base_layer.weight.detach().clone()
    theirs.merge()
    ours.merge()
    assert (ours.base_layer.weight - theirs.base_layer.weight).abs().max() <= 1e-6
    theirs.unmerge()
    ours.unmerge()
    assert (ours.base_layer.weight - weight).abs().max() <= 1e-6
    assert (theirs.base_layer.weight - weight).abs().max() <= 1e-6

    # The factors: H = I - U T U^T is orthogonal (and peft's product of the reflections, checked through the merge).
    vectors, t = householder_factors(ours.hra_u.detach(), ours.facts)
    h = torch.eye(12) - vectors @ t @ vectors.T
    assert (h @ h.T - torch.eye(12)).abs().max() <= 1e-5


def test_the_init_pairs_peft_s_draw_and_gram_schmidt_draws_apart():
    """peft's init: r / 2 kaiming-uniform columns, each twice (bound 1 / sqrt(r / 2)), from torch's global generator,
    so one seed gives peft's vectors. With apply_GS the columns are drawn apart (pairs would Gram-Schmidt to noise)."""
    torch.manual_seed(5)
    theirs = HRALinear(nn.Linear(16, 4), "default", config=peft.HRAConfig(r=6), r=6).hra_u["default"]
    torch.manual_seed(5)
    base = nn.Linear(16, 4)  # (peft's base layer drew first)
    ours = Hra.wrap(base, HraConfig(method="hra", r=6), "layer").hra_u
    assert torch.equal(ours, theirs) and torch.equal(ours[:, 0::2], ours[:, 1::2])
    assert ours.abs().max() <= 1 / math.sqrt(3)
    drawn = Hra.wrap(nn.Linear(16, 4), HraConfig(method="hra", r=6, apply_GS=True), "layer").hra_u
    assert not torch.equal(drawn[:, 0::2], drawn[:, 1::2])
    assert torch.isfinite(householder_factors(drawn.detach(), Hra.layer_facts(HraConfig(method="hra", apply_GS=True),
                                                                              "layer", False))[0]).all()


@pytest.mark.parametrize("apply_gs", [False, True])
def test_peft_s_adapter_loads_merges_and_trains_as_peft_s(apply_gs, tiny_llama, tmp_path):
    """peft's adapter (far from identity) gives peft's logits, merged in place, by `merged_model` and by `peftkit merge`
    (whose weights are peft's merge_and_unload's), and one training step's loss and gradients are peft's."""
    adapter = _peft_adapter(tiny_llama, tmp_path / "peft", apply_GS=apply_gs)
    check_loads_and_merges_as_peft(tiny_llama, adapter, IDS, tmp_path / "merged")
    theirs = PeftModel.from_pretrained(_load(tiny_llama), adapter).merge_and_unload().state_dict()
    ours = _load(tmp_path / "merged").state_dict()
    assert ours.keys() == theirs.keys() and max(float((ours[k] - theirs[k]).abs().max()) for k in ours) <= 1e-6

    difference, expected, grads = peft_and_our_gradients(tiny_llama, adapter, IDS)
    assert difference <= 1e-6 and grads.keys() == expected.keys() and len(grads) == 6
    assert max(float((grads[n] - expected[n]).abs().max()) for n in grads) <= 1e-6


def test_a_run_exports_peft_s_keys_and_resumes_to_the_same_bits(tiny_llama, number_data, tmp_path):
    """A recipe run saves peft's file (keys, shapes, config) and a run killed after step 2 and resumed gives the
    unbroken run's adapter, bit for bit."""
    recipe = make_recipe(tmp_path, tiny_llama, number_data, eval={"base_model": False},
                         adapter={"method": "hra", "r": 4, "target_modules": TARGETS},
                         training={"max_steps": 6, "save_steps": 2, "save_total_limit": 10})
    raw = yaml.safe_load(recipe.read_text())
    raw["adapter"] = {"method": "hra", "r": 4, "apply_GS": True, "target_modules": TARGETS}
    recipe.write_text(yaml.safe_dump(raw))
    check_resumes_to_the_same_bits(recipe, tmp_path / "run", kill_after=2, steps=6)
    adapter = tmp_path / "run" / "adapter"
    shapes = {k: tuple(v.shape) for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    made = _peft_adapter(tiny_llama, tmp_path / "peft", apply_GS=True)
    assert shapes == {k: tuple(v.shape) for k, v in load_file(made / "adapter_model.safetensors").items()}
    assert shapes["base_model.model.model.layers.0.mlp.down_proj.hra_u"] == (64, 4)  # (in_features, r)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["apply_GS"], config["init_weights"]) == ("HRA", 4, True, False)


def test_the_shipped_recipe_trains(tiny_llama, number_data, tmp_path):
    summary = train_shipped_recipe("hra", tiny_llama, number_data, tmp_path / "run")
    assert summary["eval_loss"] < summary["base_eval_loss"]
    assert (tmp_path / "run" / "merged").is_dir()


def test_what_it_cannot_do_is_refused(tiny_llama, tiny_gpt2, number_data, tmp_path, monkeypatch, capsys):
    """An odd r without Gram-Schmidt (no equal pairs: peft warns and starts at random reflections), GPT-2's Conv1D
    (peft's HRA refuses it too), a peft file whose bias is trained, and AdapterFusion."""
    from peftkit.methods.fusion import FusionConfig
    from peftkit.methods.fusion_sources import check_fusable, fused_adapters

    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "hra", "r": 5})
    assert "adapter.r: 5 is odd; HRA starts at the base model by pairing equal reflections" in cli_user_error(
        monkeypatch, capsys, "train", str(recipe))
    with pytest.raises(PeftkitError, match=r"'transformer.h.0.attn.c_attn' is GPT-2's Conv1D; HRA reflects the input"):
        inject_adapters(_load(tiny_gpt2), HraConfig(method="hra", r=2))

    adapter = _peft_adapter(tiny_llama, tmp_path / "peft")
    with pytest.raises(PeftkitError, match=r"HRA adapter; AdapterFusion fuses bottleneck adapters, or"):
        check_fusable(fused_adapters(FusionConfig(method="fusion", fuse=[str(adapter), str(adapter)])), "adapter.fuse")
    check_trained_bias_refused(adapter, "hra_only")
    with pytest.raises(PeftkitError, match="bias='hra_only'"):
        merge_adapter(str(adapter), str(tmp_path / "merged"), base=str(tiny_llama))


@pytest.mark.parametrize("r", [32, 40])
def test_gram_schmidt_past_a_layer_s_inputs_is_refused(r, tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    """apply_GS makes r orthonormal vectors of a layer's inputs (32 for the tiny Llama's q_proj): at r = 32 they span
    them all, so H = -I whatever they are and their gradients vanish; past it H is no longer orthogonal (peft computes
    both without a word, and peftkit trained them). Checked here from the vectors themselves, then validate and train
    refuse it, naming the layer, in the same words."""
    from peftkit.methods.hra import HraFacts

    u = torch.randn(32, r, generator=torch.Generator().manual_seed(0), requires_grad=True)
    vectors, t = householder_factors(u, HraFacts(apply_GS=True))
    h = torch.eye(32) - vectors @ t @ vectors.T
    singular = torch.linalg.svdvals(h.detach())
    if r == 32:
        assert torch.allclose(h, -torch.eye(32), atol=1e-5)
        (h * torch.randn(32, 32)).sum().backward()
        assert u.grad.abs().max() < 1e-4
    else:
        assert singular.max() > 1.5  # a reflection's singular values are all 1
    recipe = method_recipe(tmp_path, tiny_llama, number_data,
                           {"method": "hra", "r": r, "apply_GS": True, "target_modules": ["q_proj"]})
    what = ("they would span all of them, so H is -I whatever they are and nothing trains" if r == 32 else
            "past 32, Gram-Schmidt leaves rounding noise to scale to unit length, and H is no longer orthogonal")
    expected = (f"error: adapter.r: {r} with apply_GS makes {r} orthonormal vectors of the 32 inputs of "
                f"'model.layers.0.self_attn.q_proj': {what}. Set r below 32 (or leave this layer out of "
                "target_modules), or set apply_GS: false (a chain of reflections takes any r).")
    for command in ("validate", "train"):
        assert unplaced(" ".join(cli_user_error(monkeypatch, capsys, command, str(recipe)).split()), recipe) == expected


def test_a_peft_adapter_with_r_at_a_layer_s_inputs_loads_as_peft_s(tiny_llama, tmp_path):
    """The refusal above is a recipe's: peft's own adapter with apply_GS and r = 32 on the 32-input q_proj (H = -I) is
    what peft loads and computes, and peftkit loads and merges it with peft's logits."""
    torch.manual_seed(0)
    config = peft.HRAConfig(r=32, apply_GS=True, init_weights=False, target_modules=["q_proj"])
    get_peft_model(_load(tiny_llama), config).save_pretrained(tmp_path / "peft")
    check_loads_and_merges_as_peft(tiny_llama, tmp_path / "peft", IDS, tmp_path / "merged")


def test_a_run_from_a_peft_adapter_with_r_at_a_layer_s_inputs_is_refused(tiny_llama, number_data, tmp_path, monkeypatch,
                                                                        capsys):
    """The recipe's refusal above, for a run that trains on from peft's r 32 apply_GS adapter (adapter.init_from, whose
    settings are the adapter's): H is -I whatever the vectors, so the run trained 6 steps and changed nothing, without
    a word. validate (training.max_steps set or not) and train refuse it, naming the adapter and the layer."""
    torch.manual_seed(0)
    config = peft.HRAConfig(r=32, apply_GS=True, init_weights=False, target_modules=["q_proj"])
    get_peft_model(_load(tiny_llama), config).save_pretrained(tmp_path / "peft")
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"init_from": str(tmp_path / "peft")})
    expected = (f"error: adapter.init_from: {tmp_path / 'peft'} is an HRA adapter of r 32 with apply_GS, which makes 32 "
                "orthonormal vectors of the 32 inputs of 'model.layers.0.self_attn.q_proj': they would span all of "
                "them, so H is -I whatever they are and nothing trains, so a run cannot train on from it (peftkit eval "
                "and merge take it as peft computes it). Start from an adapter with r below 32 or apply_GS false, or "
                "train a fresh adapter.")
    for command in ("validate", "train"):  # (train says it once the weights have loaded, after their progress bar)
        said = " ".join(cli_user_error(monkeypatch, capsys, command, str(recipe)).split())
        assert unplaced(said[said.index("error: "):], recipe) == expected
    raw = yaml.safe_load(recipe.read_text())
    del raw["training"]["max_steps"]  # (validate said it only where the run's steps were known, which do not decide it)
    recipe.write_text(yaml.safe_dump(raw))
    said = " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())
    assert unplaced(said[said.index("error: "):], recipe) == expected


def test_combining_adds_the_full_updates(tiny_llama, tmp_path):
    """`peftkit merge` of two HRA adapters (a multiplicative update, so through its full per-layer update, as OFT's):
    weights 0.5 and 0.5 into the base give W + (W H_1 - W) / 2 + (W H_2 - W) / 2, from peft's merges of each."""
    first = _peft_adapter(tiny_llama, tmp_path / "a")
    torch.manual_seed(1)
    made = get_peft_model(_load(tiny_llama), peft.HRAConfig(r=2, init_weights=False, target_modules=TARGETS))
    made.save_pretrained(tmp_path / "b")
    check_combined_into_base_as_peft_merges(tiny_llama, [first, tmp_path / "b"], tmp_path / "c")
