"""PSOFT (method: psoft) against HF peft 0.21's PSOFT: its layer under each setting (the draw for a seed, A and B from
the weight's SVD, outputs, gradients, merge, unmerge), peft's adapters loaded, merged and trained with peft's numbers
(A and B computed again from the base on loading, as peft does), the shipped recipe resumed to the same bits, and what
it refuses. The conformance battery (tests/test_methods.py) checks the rest."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
import yaml
from peft import PeftModel, get_peft_model
from peft.tuners.psoft.layer import Linear as PeftPsoftLinear
from torch import nn

from peftkit.adapters import inject_adapters
from peftkit.errors import PeftkitError
from peftkit.methods.psoft import Psoft, PsoftConfig
from tests.conftest import load_fp32 as _load  # (float32, eval mode)
from tests.conftest import (check_loads_and_merges_as_peft, check_resumes_to_the_same_bits, cli_user_error,
                            method_recipe, peft_and_our_gradients)

IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])
TARGETS = ["q_proj", "v_proj", "down_proj"]
SETTINGS = [{}, {"psoft_orth": False, "psoft_mag_a": False},
            {"use_cayley_neumann": True, "num_cayley_neumann_terms": 6, "cayley_neumann_eps": 0.5},
            {"ab_svd_init": "pissa_init", "psoft_alpha": 8, "psoft_mag_b": False},
            {"psoft_svd": "lowrank", "random_seed": 3, "psoft_svd_lowrank_niter": 2}]


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(s) or "defaults")
@pytest.mark.parametrize("init", [True, False])
def test_the_layer_is_peft_s(settings, init):
    """From one seed, peftkit's layer draws peft's R and computes peft's A and B; on moved tensors its output and
    gradients are peft's bit for bit, its merge is peft's weight and its unmerge gives the weight back."""
    layers = []
    for _ in range(2):
        torch.manual_seed(0)
        layers.append(nn.Linear(12, 9))
    torch.manual_seed(1)
    theirs = PeftPsoftLinear(layers[0], "default", config=peft.PsoftConfig(r=4, init_weights=init, **settings))
    torch.manual_seed(1)
    ours = Psoft.wrap(layers[1], PsoftConfig(method="psoft", r=4, init_weights=init, **settings), "layer")
    peft_s, mine = dict(theirs.psoft_R["default"].named_parameters()), dict(ours.psoft_R.named_parameters())
    assert peft_s.keys() == mine.keys() and all(torch.equal(mine[n], peft_s[n]) for n in mine)
    assert torch.equal(ours.psoft_A, theirs._psoft_A_cache["default"])
    assert torch.equal(ours.psoft_B, theirs._psoft_B_cache["default"])
    with torch.no_grad():
        for n in mine:
            mine[n].add_(torch.randn(mine[n].shape) * 0.2)
            peft_s[n].copy_(mine[n])
    x = torch.randn(3, 5, 12)
    out_theirs, out_ours = theirs(x), ours(x)
    assert torch.equal(out_ours, out_theirs) and (out_ours - layers[1](x)).abs().max() > 0.1
    out_theirs.square().sum().backward()
    out_ours.square().sum().backward()
    assert all(torch.equal(mine[n].grad, peft_s[n].grad) for n in mine)

    weight = layers[1].weight.detach().clone()
    with torch.no_grad():
        theirs.merge()
        ours.merge()
        assert (ours.base_layer.weight - theirs.base_layer.weight).abs().max() <= 1e-6
        assert (ours(x) - out_theirs).abs().max() <= 1e-5
        ours.unmerge()
        assert (ours.base_layer.weight - weight).abs().max() <= 1e-6


def _peft_adapter(base: Path, out: Path, **settings) -> Path:
    """peft's PSOFT with R drawn (init_weights=False: its default R is I, the identity), saved by peft."""
    torch.manual_seed(0)
    config = {"r": 4, "init_weights": False, "target_modules": TARGETS} | settings
    model = get_peft_model(_load(base), peft.PsoftConfig(**config))
    with torch.no_grad():  # the scales off 1 too
        for name, p in model.named_parameters():
            if "vector_" in name:
                p.add_(0.3 * torch.randn(p.shape))
    model.save_pretrained(out)
    return out


def test_peft_s_adapter_loads_merges_and_trains_as_peft_s(tiny_llama, tmp_path):
    """peft's adapter of a seeded low-rank SVD (A and B computed again from the base on loading, by peftkit as by
    peft): peft's logits, merged in place, by `merged_model` and by `peftkit merge` (which computes A and B from the
    weights it merges into; peft's merge_and_unload's logits), and one training step's loss and gradients. Only R's
    tensors are in the file."""
    from peftkit.inspect import inspect_adapter

    adapter = _peft_adapter(tiny_llama, tmp_path / "peft", psoft_svd="lowrank", random_seed=5,
                            psoft_svd_lowrank_niter=2)
    check_loads_and_merges_as_peft(tiny_llama, adapter, IDS, tmp_path / "merged", unloaded=True)
    info = inspect_adapter(adapter)
    assert info["trainable_params"] == 2 * 3 * (6 + 4 + 4) and set(info["ranks"].values()) == {4}  # R's, 6 layers
    difference, expected, grads = peft_and_our_gradients(tiny_llama, adapter, IDS)
    assert difference <= 1e-6 and grads.keys() == expected.keys() and len(grads) == 3 * 2 * len(TARGETS)
    assert max(float((grads[n] - expected[n]).abs().max() / expected[n].abs().max()) for n in grads) <= 1e-5


def test_the_shipped_recipe_resumes_to_the_same_bits_and_peft_loads_its_export(tiny_llama, number_data, tmp_path):
    """A and B are computed from the base again on resuming; with dropout (random per step) the resumed run's adapter
    is the unbroken run's, bit for bit, and peft loads it with the merged model's logits."""
    raw = yaml.safe_load((Path(__file__).resolve().parent.parent / "recipes" / "methods" / "psoft.yaml").read_text())
    raw["model"]["name_or_path"] = str(tiny_llama)
    raw["adapter"] |= {"r": 4, "psoft_dropout": 0.2}  # (the tiny model's key/value layers are 16 wide)
    raw["data"] |= {"train": str(number_data["train"]), "eval": str(number_data["eval"])}
    raw["training"] |= {"max_steps": 2, "save_steps": 1, "save_total_limit": 10, "warmup_steps": 1, "eval_steps": 2,
                        "batch_size": 2, "lr": 0.1, "mixed_precision": "no"}
    raw["export"] |= {"output_dir": str(tmp_path / "run"), "report": False}
    raw["eval"] = {"samples": 0}
    (recipe := tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    check_resumes_to_the_same_bits(recipe, tmp_path / "run", kill_after=1, steps=2)
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["psoft_dropout"], config["ab_svd_init"]) == (
        "PSOFT", 4, 0.2, "psoft_init")
    theirs = _logits(PeftModel.from_pretrained(_load(tiny_llama), tmp_path / "run" / "adapter"))
    assert (_logits(_load(tmp_path / "run" / "merged")) - theirs).abs().max() <= 1e-5
    assert (theirs - _logits(_load(tiny_llama))).abs().max() > 1e-4


@pytest.mark.parametrize(("adapter", "message"), [
    ({"r": 17}, "adapter.r: 17 is past the size of 'model.layers.0.self_attn.k_proj' (16 x 32): PSOFT turns its top-r "
                "singular subspace, at most 16 wide (peft refuses it too); use a smaller r, or leave this layer out "
                "of target_modules."),
    ({"psoft_svd_lowrank_niter": 4}, "adapter.psoft_svd_lowrank_niter: 4 does nothing unless psoft_svd is 'lowrank' "
                                     "(peft only warns that it ignores it); set psoft_svd: lowrank, or remove "
                                     "psoft_svd_lowrank_niter"),
    ({"cayley_neumann_eps": 0.5}, "adapter.cayley_neumann_eps: 0.5 does nothing unless use_cayley_neumann is True"),
    ({"cayley_neumann_eps": 1.5, "use_cayley_neumann": True}, "'adapter.cayley_neumann_eps' = 1.5"),
    ({"ab_svd_init": "olora"}, "'adapter.ab_svd_init' = 'olora'"),
    ({"target_modules": ["embed_tokens"]}, "'model.embed_tokens' is an Embedding; PSOFT adapts nn.Linear layers only"),
])
def test_recipe_mistakes_are_refused(adapter, message, tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "psoft", "r": 2, **adapter})
    assert message in " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())


def test_gpt2_s_conv1d_and_a_quantized_base_are_refused(tiny_llama, tiny_gpt2, number_data, tmp_path, monkeypatch,
                                                        capsys):
    """peft's PSOFT takes nn.Linear only, and computes A and B from the unquantized weight (a 4-bit one: TypeError):
    an adapter trained on the quantized weights would not be what peft or a merge applies. Both refused by text,
    the quantized base by validate (its quantized meta model) and by inject_adapters on the loaded 4-bit model."""
    from peftkit.modeling import load_model
    from peftkit.recipe import ModelConfig, QuantizationConfig

    with pytest.raises(PeftkitError, match=r"'transformer.h.0.attn.c_attn' is GPT-2's Conv1D; PSOFT adapts nn.Linear"):
        inject_adapters(_load(tiny_gpt2), PsoftConfig(method="psoft", r=2, target_modules=["c_attn"]))
    said = ("adapter.target_modules: 'model.layers.0.self_attn.q_proj' is a 4-bit/8-bit (bitsandbytes) layer; PSOFT "
            "takes A and B from the SVD of the base weight")
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "psoft", "r": 2, "target_modules": ["q_proj"]},
                           quantization={"method": "nf4"})
    shown = " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())
    assert said in shown and "(remove the recipe's quantization section)" in shown  # (no model.quantization key)
    quantized = load_model(ModelConfig(name_or_path=str(tiny_llama), dtype="float32"),
                           QuantizationConfig(method="nf4", compute_dtype="float32"), torch.device("cpu"))
    with pytest.raises(PeftkitError, match="^" + said.replace("(", r"\(").replace(")", r"\)")):
        inject_adapters(quantized, PsoftConfig(method="psoft", r=2, target_modules=["q_proj"]))


def test_peftkit_merge_into_a_smaller_base_says_the_adapter_does_not_fit():
    """`peftkit merge` computes A and B from the weight it merges into: a weight narrower than r is another base's,
    refused by text (it failed in a matrix product)."""
    from peftkit.adapters.state_dicts import merge_state_dict

    adapter = {f"base_model.model.layer.psoft_R.{n}": t for n, t in
               (("weight", torch.zeros(6)), ("vector_b", torch.ones(4)), ("vector_a", torch.ones(4)))}
    with pytest.raises(PeftkitError, match=r"^The adapter does not fit this model: its PSOFT r 4 is past the size of a "
                                           r"weight of \(3, 12\), whose top-r singular subspace it turns"):
        merge_state_dict({"layer.weight": torch.randn(3, 12)}, adapter, PsoftConfig(method="psoft", r=4))
