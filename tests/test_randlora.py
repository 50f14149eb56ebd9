"""RandLoRA (`method: randlora`, peftkit.methods.randlora): per-layer scalings of frozen random bases shared by every
layer, a full-rank update. Checked against peft 0.21 beyond the conformance suite (tests/test_methods.py): the same
bases (dense, sparse, very sparse) and first weights from the same seeds, the file's names and shapes, one step's
gradients, peft's adapters loading and merging as peft's merge_and_unload (Linear and Conv1D), the shipped recipe,
combining, and what it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, RandLoraConfig as PeftRandLora, get_peft_model
from safetensors.torch import load_file, save_file

from peftkit.adapters import adapter_layers, inject_adapters, shared_holders
from peftkit.errors import PeftkitError
from peftkit.methods.randlora import RandLoraConfig
from tests.conftest import load_fp32 as _load  # (float32, eval mode)
from tests.conftest import (check_halves_into_base_and_refuses_fusion, check_loads_and_merges_as_peft,
                            check_routed_as_peft, cli_user_error, gpt2_without_dropout, method_recipe,
                            peft_and_our_gradients, save_random_adapter, train_shipped_recipe)

IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])
# Linear layers of in = out, in < out and in > out; GPT-2's Conv1D c_attn (32 -> 96) and mlp.c_proj (128 -> 32)
TARGETS = {"llama": ["q_proj", "up_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"]}


def _peft_adapter(base: Path, out: Path, targets: list[str], **settings) -> Path:
    """peft's RandLoRA adapter started at random (init_weights false), moved on as by training."""
    torch.manual_seed(0)
    model = get_peft_model(_load(base), PeftRandLora(task_type="CAUSAL_LM", target_modules=targets, **{
        "r": 4, "randlora_alpha": 8, "init_weights": False} | settings))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "randlora_gamma" in name:
                p.mul_(1 + 0.5 * torch.randn(p.shape))
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("settings", [{}, {"sparse": True}, {"very_sparse": True, "init_weights": False, "r": 5}])
def test_the_same_seeds_give_peft_s_bases_first_weights_and_file(settings, tiny_gpt2, tmp_path):
    """The shared A, B and every layer's lambda, gamma equal peft's bit for bit, and so does the saved file: peft's
    names (the shared pair also repeated under each layer), shapes and values."""
    settings = {"r": 8, "projection_prng_key": 11, "target_modules": TARGETS["gpt2"]} | settings
    torch.manual_seed(4)
    theirs = get_peft_model(_load(tiny_gpt2), PeftRandLora(task_type="CAUSAL_LM", **settings))
    torch.manual_seed(4)
    ours = _load(tiny_gpt2)
    targets = inject_adapters(ours, RandLoraConfig(method="randlora", **settings))
    holder = shared_holders(ours)[0]
    assert torch.equal(holder.randlora_A, theirs.base_model.randlora_A["default"])
    assert torch.equal(holder.randlora_B, theirs.base_model.randlora_B["default"])
    for path, layer in adapter_layers(ours).items():
        reference = theirs.base_model.model.get_submodule(path)
        assert torch.equal(layer.randlora_lambda, reference.randlora_lambda["default"])
        assert torch.equal(layer.randlora_gamma, reference.randlora_gamma["default"])
    theirs.save_pretrained(tmp_path / "peft")
    _save(ours, RandLoraConfig(method="randlora", **settings), targets, tiny_gpt2, tmp_path / "ours")
    expected, saved = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "ours"))
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in expected)
    assert len(expected) == 2 + 4 * 4  # base_model.randlora_A/B, and lambda, gamma, A, B per layer


def _save(model, cfg, targets, base: Path, out: Path) -> None:
    from peftkit.adapters.state_dicts import adapter_state_dict
    from peftkit.merge_weights import conv1d_modules
    from peftkit.peft_format import peft_config, save_adapter

    save_adapter(out, adapter_state_dict(model, []), peft_config(cfg, targets, str(base), bool(conv1d_modules(model)),
                                                                 model.config.model_type, model_config=model.config))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_step_s_gradients_are_peft_s(arch, tiny_llama, tiny_gpt2, tmp_path):
    base = gpt2_without_dropout(tiny_gpt2, tmp_path / "gpt2") if arch == "gpt2" else tiny_llama
    adapter = _peft_adapter(base, tmp_path / "peft", TARGETS[arch])
    difference, expected, grads = peft_and_our_gradients(base, adapter, IDS)
    assert difference <= 1e-5 and set(grads) >= set(expected) and len(expected) == 2 * len(TARGETS[arch]) * 2
    assert max((grads[n] - expected[n]).abs().max() / expected[n].abs().max() for n in expected) <= 1e-4
    assert min(expected[n].abs().max() for n in expected) > 1e-5


@pytest.mark.parametrize(("arch", "settings"), [("llama", {"sparse": True, "r": 5}), ("gpt2", {"save_projection": False})])
def test_peft_s_adapters_load_and_merge_as_peft_s_merge_and_unload(arch, settings, tiny_llama, tiny_gpt2, tmp_path):
    base = {"llama": tiny_llama, "gpt2": tiny_gpt2}[arch]
    adapter = _peft_adapter(base, tmp_path / "peft", TARGETS[arch], **settings)
    check_loads_and_merges_as_peft(base, adapter, IDS, tmp_path / "merged", unloaded=True)


def test_inspect_counts_what_trains_not_peft_s_copies_of_the_bases(tiny_llama, tmp_path):
    """peft's file repeats the shared bases under every layer: inspect counted each copy as trained (66,304 of a
    1,792-parameter adapter; here 2,880 of 576)."""
    from peftkit.inspect import inspect_adapter

    adapter = _peft_adapter(tiny_llama, tmp_path / "peft", ["q_proj"])
    model = PeftModel.from_pretrained(_load(tiny_llama), adapter, is_trainable=True)
    info = inspect_adapter(adapter)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert info["trainable_params"] == trained == 2 * (4 * 8 + 8 * 32)  # lambda (4, 8), gamma (8, 32) on 2 layers
    assert info["shared"] == {"saved": {"randlora_A": (4, 1, 32), "randlora_B": (32, 8, 4)}, "regenerated": []}


def test_the_shipped_recipe_trains_and_peft_loads_its_adapter(tiny_llama, number_data, tmp_path):
    summary = train_shipped_recipe("randlora", tiny_llama, number_data, tmp_path / "run")
    assert summary["eval_loss"] < summary["base_eval_loss"]
    with torch.no_grad():
        merged = _load(tmp_path / "run" / "merged")(input_ids=IDS).logits
        theirs = PeftModel.from_pretrained(_load(tiny_llama), tmp_path / "run" / "adapter")(input_ids=IDS).logits
        base = _load(tiny_llama)(input_ids=IDS).logits
    assert (merged - theirs).abs().max() <= 1e-4 and (merged - base).abs().max() > 1e-3


def _recipe(tmp_path: Path, model: Path, data: dict, **adapter) -> Path:
    recipe = method_recipe(tmp_path, model, data, {"method": "randlora", "r": 4, **adapter}, eval={"base_model": False})
    return recipe


@pytest.mark.parametrize(("adapter", "message"), [
    ({"r": 0}, "'adapter.r' = 0"),
    ({"randlora_alpha": 0}, "0 scales the update and its gradients to nothing, so the adapter would never train"),
    ({"target_modules": ["embed_tokens"]}, "'model.embed_tokens' is an embedding; RandLoRA (as peft's) adapts Linear"),
    ({"alpha": 8}, "has no 'alpha'. Did you mean 'randlora_alpha'? Valid keys for method randlora: method, r, "
                   "randlora_alpha, randlora_dropout, projection_prng_key, save_projection, sparse, very_sparse"),
])
def test_recipe_mistakes_are_refused(adapter, message, tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    recipe = _recipe(tmp_path, tiny_llama, number_data, **adapter)
    for command in ("validate", "train"):
        assert message in " ".join(cli_user_error(monkeypatch, capsys, command, str(recipe)).split()), command


def test_peft_files_it_cannot_apply_faithfully_are_refused(tiny_llama, tmp_path):
    """A trained bias (peft's bias 'randlora_only'), and a file whose per-layer copy of the shared bases differs from
    the shared one (peft would compute with either, by the order it loads them)."""
    from peftkit.adapter_base import load_adapted_model

    adapter = _peft_adapter(tiny_llama, tmp_path / "peft", TARGETS["llama"])
    config = adapter / "adapter_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"bias": "randlora_only"}))
    with pytest.raises(PeftkitError, match="bias='randlora_only'; peftkit supports bias='none' only"):
        load_adapted_model(str(tiny_llama), str(adapter))
    config.write_text(json.dumps(json.loads(config.read_text()) | {"bias": "none"}))
    weights = adapter / "adapter_model.safetensors"
    state = load_file(weights)
    key = "base_model.model.model.layers.1.mlp.up_proj.randlora_B"
    save_file(state | {key: state[key] * 2}, weights)
    with pytest.raises(PeftkitError, match=f"{key} differs from base_model.randlora_B, the tensor every layer shares"):
        load_adapted_model(str(tiny_llama), str(adapter))


def test_combined_into_the_base_it_adds_the_updates_and_fusion_refuses_it(tiny_llama, tmp_path):
    a = str(save_random_adapter(tiny_llama, RandLoraConfig(method="randlora", r=4, randlora_alpha=8,
                                                           target_modules=TARGETS["llama"]), tmp_path / "a", seed=1))
    check_halves_into_base_and_refuses_fusion(tiny_llama, a, "RandLoRA", tmp_path / "half", IDS)


def test_two_named_adapters_of_other_bases_serve_each_its_rows_as_peft(tiny_llama, tmp_path):
    for name, key in (("a", 0), ("b", 3)):  # other shared bases too
        _peft_adapter(tiny_llama, tmp_path / name, TARGETS["llama"], projection_prng_key=key)
    check_routed_as_peft(tiny_llama, [tmp_path / "a", tmp_path / "b"], IDS)
