"""DeLoRA (peftkit.methods.delora) beyond the conformance battery of tests/test_methods.py: its layer against peft
0.21's DeloraLinear (init, forward with dropout, gradients, merge, unmerge), peft's adapter with per-module ranks and
lambdas loaded, trained and merged with peft's numbers, a 4-bit base (where peft's DeLoRA fails), the shipped recipe
resumed to the same bits, and what it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
import yaml
from peft import get_peft_model
from peft.tuners.delora.layer import DeloraLinear
from safetensors.torch import load_file
from torch import nn

from peftkit.adapters import adapter_layers, inject_adapters
from peftkit.errors import PeftkitError
from peftkit.inspect import inspect_adapter
from peftkit.merge import merge_adapter
from peftkit.methods.delora import Delora, DeloraConfig
from tests.conftest import load_fp32 as _load  # (float32, eval mode)
from tests.conftest import (check_loads_and_merges_as_peft, check_resumes_to_the_same_bits, cli_user_error,
                            method_recipe, peft_and_our_gradients, unplaced)

IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])
PATTERNS = {"r": 2, "rank_pattern": {"down_proj": 4}, "lambda_pattern": {"v_proj": 3}}


@pytest.mark.parametrize(("init_weights", "r", "lam", "dropout"), [(False, 4, 15, 0.0), (True, 3, 2.5, 0.3)])
def test_the_layer_is_peft_s(init_weights, r, lam, dropout):
    """One layer, from the same seed: peft's draws of A and B, its column norms, and then (B and lambda moved) the
    same output in training with the same dropout mask, the same gradients of A, B and lambda, the same merged weight
    and the weight back on unmerging, bit for bit."""
    base, copy = nn.Linear(12, 7), nn.Linear(12, 7)
    copy.load_state_dict(base.state_dict())
    config = peft.DeloraConfig(r=r, delora_lambda=lam, init_weights=init_weights, module_dropout=dropout)
    torch.manual_seed(3)
    theirs = DeloraLinear(base, "default", config=config, r=r, delora_lambda=lam).train()
    torch.manual_seed(3)
    ours = Delora.wrap(copy, DeloraConfig(method="delora", r=r, delora_lambda=lam, init_weights=init_weights,
                                          module_dropout=dropout), "layer").train()
    names = ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")
    assert all(torch.equal(getattr(ours, n), getattr(theirs, n)["default"]) for n in names)
    assert torch.equal(ours.delora_w_norm, copy.weight.norm(dim=0)) and not ours.delora_w_norm.requires_grad
    with torch.no_grad():
        theirs.delora_B["default"].normal_()
        theirs.delora_lambda["default"].fill_(0.7)
        ours.delora_B.copy_(theirs.delora_B["default"])
        ours.delora_lambda.fill_(0.7)
    x = torch.randn(3, 5, 12)
    torch.manual_seed(1)
    out_theirs = theirs(x)
    torch.manual_seed(1)
    out_ours = ours(x)
    assert torch.equal(out_ours, out_theirs) and (out_ours - copy(x)).abs().max() > 0.1
    out_theirs.square().sum().backward()
    out_ours.square().sum().backward()
    assert all(torch.equal(getattr(ours, n).grad, getattr(theirs, n)["default"].grad) for n in names[:3])

    weight = base.weight.detach().clone()
    theirs.merge()
    ours.merge()
    assert torch.equal(copy.weight, base.weight) and (copy.weight - weight).abs().max() > 1e-2
    theirs.unmerge()
    ours.unmerge()
    assert (copy.weight - weight).abs().max() <= 1e-6


def test_peft_s_adapter_with_patterns_loads_merges_and_trains_as_peft_s(tiny_llama, tmp_path):
    """peft's adapter with per-module ranks and lambdas (B drawn: far from identity) gives peft's logits, merged in
    place, by `merged_model` and by `peftkit merge` (peft's merge_and_unload's), and one training step's loss and
    gradients (A, B and lambda of each layer) are peft's."""
    torch.manual_seed(0)
    config = peft.DeloraConfig(init_weights=False, target_modules=["q_proj", "v_proj", "down_proj"], **PATTERNS)
    made = get_peft_model(_load(tiny_llama), config)
    made.save_pretrained(tmp_path / "peft")
    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert saved["base_model.model.model.layers.0.mlp.down_proj.delora_A"].shape == (4, 64)
    info = inspect_adapter(tmp_path / "peft")  # the column norms are saved, not trained
    assert (info["trainable_params"], info["ranks"]["model.layers.0.mlp.down_proj"]) == (
        made.get_nb_trainable_parameters()[0], 4)
    check_loads_and_merges_as_peft(tiny_llama, tmp_path / "peft", IDS, tmp_path / "merged", unloaded=True)
    difference, expected, grads = peft_and_our_gradients(tiny_llama, tmp_path / "peft", IDS)
    grads = {n: g for n, g in grads.items() if not n.endswith("delora_w_norm")}  # (the helper unfroze the norms)
    assert difference <= 1e-6 and grads.keys() == expected.keys() and len(grads) == 18
    assert max(float((grads[n] - expected[n]).abs().max() / expected[n].abs().max()) for n in grads) <= 1e-5


def test_the_norms_are_peft_s_on_bf16_and_the_dequantized_weight_s_on_4_bit(tiny_llama, tmp_path):
    """On a bf16 base peft takes the column norms in bf16 (rounded: up to 0.002 from the fp32 norms of the same
    weights here), and so does peftkit: a run starts from peft's numbers. peft 0.21's DeLoRA takes the norm of a 4-bit
    layer's packed bytes and fails; peftkit's norms are the dequantized weight's, and the layer's output is the base's
    plus the dense update of those norms."""
    from transformers import AutoModelForCausalLM

    from peftkit.merge import dequantize_weight
    from peftkit.modeling import load_model
    from peftkit.recipe import ModelConfig, QuantizationConfig

    def bf16() -> nn.Module:
        return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16)

    path = "model.layers.0.self_attn.q_proj"
    theirs = get_peft_model(bf16(), peft.DeloraConfig(r=2, target_modules=["q_proj"])).base_model.model
    ours = bf16()
    inject_adapters(ours, DeloraConfig(method="delora", r=2, target_modules=["q_proj"]))
    norms = adapter_layers(ours)[path].delora_w_norm
    assert torch.equal(norms, theirs.get_submodule(path).delora_w_norm["default"])
    assert (norms - ours.get_submodule(path).base_layer.weight.float().norm(dim=0)).abs().max() > 1e-4

    def quantized() -> nn.Module:
        quant = QuantizationConfig(method="nf4", compute_dtype="float32")
        return load_model(ModelConfig(name_or_path=str(tiny_llama), dtype="float32"), quant, torch.device("cpu"))

    with pytest.raises(RuntimeError, match="Expected a floating point or complex tensor as input. Got Byte"):
        get_peft_model(quantized(), peft.DeloraConfig(r=2, target_modules=["q_proj"]))
    model = quantized()
    inject_adapters(model, DeloraConfig(method="delora", r=2, target_modules=["q_proj"]))
    layer = adapter_layers(model)["model.layers.0.self_attn.q_proj"]
    dense = dequantize_weight(layer.base_layer)
    assert torch.equal(layer.delora_w_norm, dense.norm(dim=0))
    Delora.randomize(layer, torch.Generator().manual_seed(0), 0.3)
    x = torch.randn(2, 3, 32)
    expected = x @ (Delora.merge_weight(dense, layer.parts(), layer.facts)).T
    assert (layer(x) - expected).abs().max() <= 1e-4 and (layer(x) - x @ dense.T).abs().max() > 0.1


def test_the_shipped_recipe_trains_resumes_to_the_same_bits_and_saves_peft_s_file(tiny_llama, number_data, tmp_path):
    """recipes/methods/delora.yaml (with dropout, so the resumed run must restore its generator), on the test model:
    a run killed after step 2 and resumed saves the unbroken run's adapter bit for bit, with peft's keys, shapes and
    config (the column norms among them)."""
    shipped = yaml.safe_load((Path(__file__).resolve().parent.parent / "recipes/methods/delora.yaml").read_text())
    shipped["model"]["name_or_path"] = str(tiny_llama)
    shipped["data"] |= {"train": str(number_data["train"]), "eval": str(number_data["eval"])}
    shipped["adapter"] |= {"module_dropout": 0.1, "lambda_pattern": {"v_proj": 5}}
    shipped["training"] |= {"max_steps": 4, "save_steps": 2, "save_total_limit": 10, "warmup_steps": 1,
                            "eval_steps": 4, "batch_size": 4, "lr": 1e-2}
    shipped["export"] |= {"output_dir": str(tmp_path / "run"), "merged": False, "report": False}
    shipped["eval"] = {"samples": 0}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(shipped))
    check_resumes_to_the_same_bits(recipe, tmp_path / "run", kill_after=2, steps=4)
    adapter = tmp_path / "run" / "adapter"
    saved = load_file(adapter / "adapter_model.safetensors")
    torch.manual_seed(0)
    made = get_peft_model(_load(tiny_llama), peft.DeloraConfig(r=8, target_modules="all-linear"))
    assert {k: v.shape for k, v in saved.items()} == {
        k.replace(".default", ""): v.shape for k, v in made.state_dict().items() if "delora_" in k}
    assert torch.equal(saved["base_model.model.model.layers.0.mlp.down_proj.delora_w_norm"],
                       _load(tiny_llama).model.layers[0].mlp.down_proj.weight.norm(dim=0))
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "r", "delora_lambda", "module_dropout", "lambda_pattern")} == {
        "peft_type": "DELORA", "r": 8, "delora_lambda": 15, "module_dropout": 0.1, "lambda_pattern": {"v_proj": 5}}
    assert float(saved["base_model.model.model.layers.0.self_attn.v_proj.delora_lambda"]) != 5  # it trained


def test_what_it_cannot_do_is_refused(tiny_llama, tiny_gpt2, number_data, tmp_path, monkeypatch, capsys):
    """GPT-2's Conv1D (peft's DeLoRA refuses it too), a lambda_pattern key that matches no adapted module (a typo:
    peft passes over it), AdapterFusion, and a peft file whose bias is trained."""
    from peftkit.methods.fusion import FusionConfig
    from peftkit.methods.fusion_sources import check_fusable, fused_adapters

    with pytest.raises(PeftkitError, match=r"'transformer.h.0.attn.c_attn' is GPT-2's Conv1D; DeLoRA adapts nn.Linear"):
        inject_adapters(_load(tiny_gpt2), DeloraConfig(method="delora", r=2))
    recipe = method_recipe(tmp_path, tiny_llama, number_data,
                           {"method": "delora", "r": 2, "target_modules": ["q_proj", "v_proj"],
                            "lambda_pattern": {"v_prj": 3}})
    said = unplaced(" ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split()), recipe)
    assert said.startswith("error: adapter.lambda_pattern: 'v_prj' matches none of the 4 adapted modules, so it would "
                           "change nothing (every module keeps adapter.delora_lambda).")

    torch.manual_seed(0)
    get_peft_model(_load(tiny_llama), peft.DeloraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "p")
    with pytest.raises(PeftkitError, match=r"is a DeLoRA adapter; AdapterFusion fuses bottleneck adapters, or"):
        check_fusable(fused_adapters(FusionConfig(method="fusion", fuse=[str(tmp_path / "p")] * 2)), "adapter.fuse")
    config = tmp_path / "p" / "adapter_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"bias": "delora_only"}))
    with pytest.raises(PeftkitError, match="bias='delora_only'; peftkit supports bias='none' only"):
        merge_adapter(str(tmp_path / "p"), str(tmp_path / "merged"), base=str(tiny_llama))


def test_norms_of_an_integer_dtype_are_refused_not_cast(tiny_llama, tmp_path):
    """The saved column norms never train, but they are weights the update is computed with: an int32 delora_w_norm
    (a damaged file) passed the adapter-tensor check once every untrained tensor was exempt from it, as SHiRA's
    integer indices are."""
    from safetensors.torch import save_file

    from peftkit.peft_format import load_adapter

    get_peft_model(_load(tiny_llama), peft.DeloraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    key = "base_model.model.model.layers.0.self_attn.q_proj.delora_w_norm"
    state = load_file(weights)
    save_file(state | {key: state[key].to(torch.int32)}, weights)
    with pytest.raises(PeftkitError) as info:
        load_adapter(tmp_path)
    assert str(info.value) == (f"{weights}: {key} is int32, where adapter weights are floating-point: cast, it would "
                               "give other numbers than were saved. The file is damaged, or not a PEFT adapter's; export "
                               "the adapter again.")
