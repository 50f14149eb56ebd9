"""VB-LoRA (`method: vblora`, peftkit.methods.vblora): LoRA factors whose rows are top-k mixtures of one trained vector
bank shared by every layer. Checked against peft 0.21 beyond the conformance suite (tests/test_methods.py): the dense
math on layers the bank tiles, the same bank, logits and file (full and top-k only) from the same seed, one step's
gradients (the shared bank's too), peft's adapters loading and merging as peft's merge_and_unload (Linear and Conv1D,
full and top-k only), the shipped recipe resumed to the same bits and loading in peft, combining, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel, VBLoRAConfig, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit.adapters import adapter_layers, inject_adapters, share_tensors
from peftkit.adapters.state_dicts import merge_state_dict
from peftkit.errors import PeftkitError
from peftkit.methods.vblora import VbLora, VbLoraConfig
from tests.conftest import load_fp32 as _load  # (float32, eval mode)
from tests.conftest import (check_halves_into_base_and_refuses_fusion, check_loads_and_merges_as_peft,
                            check_routed_as_peft, check_run_for_peft_resumes, cli_user_error, gpt2_without_dropout,
                            method_recipe, peft_and_our_gradients, save_random_adapter)

IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])
TARGETS = {"llama": ["q_proj", "k_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"]}  # Linear; Conv1D
SETTINGS = {"r": 4, "num_vectors": 12, "vector_length": 8}


def _peft_adapter(base: Path, out: Path, targets: list[str], **settings) -> Path:
    """peft's VB-LoRA adapter, its logits and bank moved far from their small start, as by training."""
    torch.manual_seed(0)
    model = get_peft_model(_load(base), VBLoRAConfig(task_type="CAUSAL_LM", target_modules=targets,
                                                     **SETTINGS | settings))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 1.0 if "logits" in name else 0.3) if "vblora_" in name else None
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_dense_math(layout):
    """The layer, its in-place merge and unmerge and the state-dict merge equal the dense W + B A of
    tests/test_methods.py's vblora_dense, on a 16 -> 8 layer that vectors of 4 tile."""
    from tests.test_methods import vblora_dense

    cfg = VbLoraConfig(method="vblora", r=3, num_vectors=10, vector_length=4, topk=3)
    torch.manual_seed(0)
    base = nn.Linear(16, 8) if layout == "linear" else Conv1D(8, 16)
    weight = base.weight.detach().clone()
    layer = VbLora.wrap(base, cfg, "layer")
    share_tensors(VbLora, cfg, [layer])
    VbLora.randomize(layer, torch.Generator().manual_seed(2), 0.3)
    parts = {n: t.detach().clone() for n, t in layer.parts().items()}
    dense = vblora_dense(weight, None, parts, cfg, layout)[0]
    x = torch.randn(3, 5, 16)
    expected = (x @ dense if layout == "conv1d" else x @ dense.T) + base.bias
    assert (dense - weight).abs().max() > 1e-2 and (layer(x) - expected).abs().max() <= 1e-5
    adapter = {"base_model.vblora_vector_bank": parts["vblora_vector_bank"]} | {
        f"base_model.model.layer.{n}": parts[n] for n in VbLora.param_names}
    state = merge_state_dict({"layer.weight": weight}, adapter, cfg, {"layer"} if layout == "conv1d" else set())
    assert (state["layer.weight"] - dense).abs().max() <= 1e-6
    layer.merge()
    assert (base.weight - dense).abs().max() <= 1e-6 and (layer(x) - expected).abs().max() <= 1e-5
    layer.unmerge()
    assert (base.weight - weight).abs().max() <= 1e-6


@pytest.mark.parametrize("topk_only", [False, True])
def test_the_same_seed_gives_peft_s_bank_logits_and_file(topk_only, tiny_gpt2, tmp_path):
    from peftkit.adapters.state_dicts import adapter_state_dict
    from peftkit.merge_weights import conv1d_modules
    from peftkit.peft_format import peft_config, save_adapter

    settings = SETTINGS | {"topk": 3, "save_only_topk_weights": topk_only, "target_modules": TARGETS["gpt2"]}
    torch.manual_seed(4)
    theirs = get_peft_model(_load(tiny_gpt2), VBLoRAConfig(task_type="CAUSAL_LM", **settings))
    torch.manual_seed(4)
    ours = _load(tiny_gpt2)
    cfg = VbLoraConfig(method="vblora", **settings)
    targets = inject_adapters(ours, cfg)
    for path, layer in adapter_layers(ours).items():
        reference = theirs.base_model.model.get_submodule(path)
        assert torch.equal(layer.vblora_logits_A, reference.vblora_logits_A["default"])
        assert torch.equal(layer.vblora_logits_B, reference.vblora_logits_B["default"])
        assert torch.equal(layer.shared.vblora_vector_bank, theirs.base_model.vblora_vector_bank["default"])
    theirs.save_pretrained(tmp_path / "peft")
    save_adapter(tmp_path / "ours", adapter_state_dict(ours, []), peft_config(
        cfg, targets, str(tiny_gpt2), bool(conv1d_modules(ours)), "gpt2", model_config=ours.config))
    expected, saved = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "ours"))
    assert saved.keys() == expected.keys() and len(expected) == 1 + 2 * 4 * (2 if topk_only else 1)
    assert all(saved[k].dtype == expected[k].dtype and torch.equal(saved[k], expected[k]) for k in expected)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_step_s_gradients_are_peft_s_the_shared_bank_s_too(arch, tiny_llama, tiny_gpt2, tmp_path):
    base = gpt2_without_dropout(tiny_gpt2, tmp_path / "gpt2") if arch == "gpt2" else tiny_llama
    adapter = _peft_adapter(base, tmp_path / "peft", TARGETS[arch])
    difference, expected, grads = peft_and_our_gradients(base, adapter, IDS)
    bank = expected.pop(next(n for n in expected if n.endswith("vblora_vector_bank")))  # (under peft's first layer)
    ours = [g for n, g in grads.items() if n.endswith("shared.vblora_vector_bank")]
    assert difference <= 1e-5 and len(ours) == 1 and (ours[0] - bank).abs().max() <= 1e-5 * bank.abs().max()
    assert set(grads) >= set(expected) and len(expected) == 2 * 2 * len(TARGETS[arch])  # 2 blocks
    assert max((grads[n] - expected[n]).abs().max() / expected[n].abs().max() for n in expected) <= 1e-4
    assert min(expected[n].abs().max() for n in expected) > 1e-5


@pytest.mark.parametrize(("arch", "topk_only"), [("llama", True), ("gpt2", False)])
def test_peft_s_adapters_load_and_merge_as_peft_s_merge_and_unload(arch, topk_only, tiny_llama, tiny_gpt2, tmp_path):
    base = {"llama": tiny_llama, "gpt2": tiny_gpt2}[arch]
    adapter = _peft_adapter(base, tmp_path / "peft", TARGETS[arch], save_only_topk_weights=topk_only, topk=3)
    assert any(k.endswith("_topk_weights") for k in load_file(adapter / "adapter_model.safetensors")) == topk_only
    check_loads_and_merges_as_peft(base, adapter, IDS, tmp_path / "merged", unloaded=True)
    # `peftkit inspect` counts what trained, the top-k file's logits and the shared bank, and says the bank trains
    from peftkit.inspect import inspect_adapter
    from peftkit.inspect_text import describe

    info = inspect_adapter(adapter)
    trained = sum(p.numel() for p in _load_peft_trainable(base, adapter))
    assert info["trainable_params"] == trained and info["targets"]["count"] == 2 * len(TARGETS[arch])
    assert "vblora_vector_bank (12, 8): used by every adapted layer, trained once for all of them" in "\n".join(describe(info))


def _load_peft_trainable(base: Path, adapter: Path) -> list[torch.Tensor]:
    """The tensors peft trains for the adapter at `adapter` (the bank once)."""
    model = PeftModel.from_pretrained(_load(base), adapter, is_trainable=True)
    return [p for p in model.parameters() if p.requires_grad]


def test_the_shipped_recipe_resumes_to_the_same_bits_and_peft_loads_its_top_k_file(tiny_llama, number_data,
                                                                                  tmp_path):
    """The bank trains once for all the layers, and a resumed run restores it and its optimizer state: the same bits.
    Exported top-k only, peft's logits are the merged model's (which merged the full logits)."""
    raw = yaml.safe_load((Path(__file__).resolve().parent.parent / "recipes/methods/vblora.yaml").read_text())
    raw["model"]["name_or_path"] = str(tiny_llama)
    raw["data"] |= {"train": str(number_data["train"]), "eval": str(number_data["eval"])}
    raw["adapter"]["save_only_topk_weights"] = True
    raw["training"] |= {"max_steps": 6, "warmup_steps": 1, "eval_steps": 6, "batch_size": 4}
    raw["export"] |= {"output_dir": str(tmp_path / "run"), "report": False}
    raw["eval"] = {"samples": 0, "base_model": False}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    check_run_for_peft_resumes(tmp_path / "recipe.yaml", tiny_llama, IDS, 1e-4)
    assert any(k.endswith("_topk_indices") for k in load_file(tmp_path / "run/adapter/adapter_model.safetensors"))


def _recipe(tmp_path: Path, model: Path, data: dict, **adapter) -> Path:
    recipe = method_recipe(tmp_path, model, data,
                           {"method": "vblora", **SETTINGS, **adapter}, eval={"base_model": False})
    return recipe


@pytest.mark.parametrize(("adapter", "message"), [
    ({"vector_length": 12}, "adapter.vector_length: 12 does not divide the sizes of 'model.layers.0.self_attn.q_proj' "
                            "(32 in, 32 out)"),
    ({"topk": 13}, "topk 13 is more than the bank's num_vectors 12"),
    ({"target_modules": ["embed_tokens"]}, "'model.embed_tokens' is an embedding; VB-LoRA (as peft's) adapts Linear"),
    ({"init_vector_bank_bound": 0}, "'adapter.init_vector_bank_bound' = 0"),
])
def test_recipe_mistakes_are_refused(adapter, message, tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    recipe = _recipe(tmp_path, tiny_llama, number_data, **adapter)
    for command in ("validate", "train"):
        assert message in " ".join(cli_user_error(monkeypatch, capsys, command, str(recipe)).split()), command


def test_training_on_from_a_top_k_file_is_refused(tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    """Its logits outside the top-k are gone (-inf once read): peft refuses to train on from such a file too."""
    adapter = _peft_adapter(tiny_llama, tmp_path / "peft", TARGETS["llama"], save_only_topk_weights=True)
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"init_from": str(adapter)})
    said = " ".join(cli_user_error(monkeypatch, capsys, "train", str(recipe)).split())
    assert (f"adapter.init_from: {adapter} is a VB-LoRA adapter saved with save_only_topk_weights: its file keeps "
            "each row's top-k logits only") in said


def test_peft_s_settings_it_cannot_apply_are_refused(tiny_llama, tmp_path):
    from peftkit.adapter_base import load_adapted_model

    adapter = _peft_adapter(tiny_llama, tmp_path / "peft", TARGETS["llama"])
    config = adapter / "adapter_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"bias": "vblora_only"}))
    with pytest.raises(PeftkitError, match="bias='vblora_only'; peftkit supports bias='none' only"):
        load_adapted_model(str(tiny_llama), str(adapter))


def test_combined_into_the_base_it_adds_the_updates_and_fusion_refuses_it(tiny_llama, tmp_path):
    a = str(save_random_adapter(tiny_llama, VbLoraConfig(method="vblora", **SETTINGS, target_modules=TARGETS["llama"]),
                                tmp_path / "a", seed=1))
    check_halves_into_base_and_refuses_fusion(tiny_llama, a, "VB-LoRA", tmp_path / "half", IDS)


def test_two_named_adapters_each_with_its_bank_serve_each_its_rows_as_peft(tiny_llama, tmp_path):
    for name, topk in (("a", 2), ("b", 3)):
        _peft_adapter(tiny_llama, tmp_path / name, TARGETS["llama"], topk=topk)
    check_routed_as_peft(tiny_llama, [tmp_path / "a", tmp_path / "b"], IDS)
