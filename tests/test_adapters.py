"""Injection on real transformers models, and interop with HF peft (a test-only reference)."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from peftkit.adapters import count_parameters, find_targets, inject_adapters
from peftkit.adapters.state_dicts import adapter_state_dict
from peftkit.errors import PeftkitError
from peftkit.merge_weights import conv1d_modules, merged_model
from peftkit.adapter_base import load_adapted_model
from peftkit.methods.lora import LoraConfig
from peftkit.peft_format import peft_config, save_adapter
from peftkit.recipe import TargetRegex
from tests.conftest import load_fp32, random_adapters

IDS = torch.tensor([[1, 40, 41, 42, 7, 60, 61], [1, 50, 51, 52, 53, 54, 55]])


def test_all_linear_excludes_output_head(tiny_llama):
    names = find_targets(load_fp32(tiny_llama), "all-linear")
    assert "lm_head" not in names
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert all(n.startswith("model.layers.") for n in names)


def test_suffix_and_regex_targets(tiny_llama):
    model = load_fp32(tiny_llama)
    assert find_targets(model, ["q_proj", "v_proj"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
    ]
    assert find_targets(model, TargetRegex(regex=r"model\.layers\.1\..*_proj")) == [
        n for n in find_targets(model, "all-linear") if n.startswith("model.layers.1.")
    ]
    assert find_targets(model, ["embed_tokens"]) == ["model.embed_tokens"]


def test_injection_freezes_base_and_counts(tiny_llama):
    model = load_fp32(tiny_llama)
    total_before = sum(p.numel() for p in model.parameters())
    inject_adapters(model, LoraConfig(r=4, target_modules=["q_proj"]))
    trainable, total = count_parameters(model)
    assert trainable == 2 * 4 * (32 + 32)  # 2 layers x r x (in + out)
    assert total == total_before + trainable
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())


def test_target_matching_nothing_lists_layers(tiny_llama):
    with pytest.raises(PeftkitError) as e:
        find_targets(load_fp32(tiny_llama), ["query"])
    assert "matches no module" in str(e.value) and "q_proj" in str(e.value)


def _train_like(path, cfg):
    """An injected model with nonzero adapters, as after training."""
    model = load_fp32(path)
    torch.manual_seed(0)
    targets = inject_adapters(model, cfg)
    random_adapters(model)
    for name in cfg.modules_to_save:
        with torch.no_grad():
            model.get_submodule(name).weight.add_(0.05)
    return model.eval(), targets


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("modules_to_save", [[], ["lm_head"]])
def test_adapter_loads_in_peft_with_same_logits(arch, modules_to_save, request, tmp_path):
    path = request.getfixturevalue(arch)
    cfg = LoraConfig(r=4, alpha=8, target_modules="all-linear", modules_to_save=modules_to_save)
    model, targets = _train_like(path, cfg)
    ours = model(IDS).logits
    state = adapter_state_dict(model, cfg.modules_to_save)
    save_adapter(tmp_path, state, peft_config(cfg, targets, str(path), fan_in_fan_out=bool(conv1d_modules(model))))
    assert all(k.startswith("base_model.model.") for k in load_file(tmp_path / "adapter_model.safetensors"))

    reference = PeftModel.from_pretrained(load_fp32(path), tmp_path).eval()
    theirs = reference(IDS).logits
    assert (ours - load_fp32(path)(IDS).logits).abs().max() > 1e-3  # the adapter really changes the output
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_merged_model_equals_adapter_model(arch, request):
    path = request.getfixturevalue(arch)
    cfg = LoraConfig(r=4, alpha=8, target_modules="all-linear", modules_to_save=["lm_head"])
    model, _ = _train_like(path, cfg)
    merged = merged_model(model, cfg, torch.float32).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert (merged(IDS).logits - model(IDS).logits).abs().max() <= 1e-4


def test_embedding_lora_in_peft(tiny_llama, tmp_path):
    cfg = LoraConfig(r=2, alpha=4, target_modules=["embed_tokens", "o_proj"])
    model, targets = _train_like(tiny_llama, cfg)
    save_adapter(tmp_path, adapter_state_dict(model, []), peft_config(cfg, targets, str(tiny_llama), False))
    reference = PeftModel.from_pretrained(load_fp32(tiny_llama), tmp_path).eval()
    torch.testing.assert_close(reference(IDS).logits, model(IDS).logits, rtol=0, atol=1e-5)


def test_modules_to_save_are_written_as_full_paths_so_peft_loads_them(tiny_llama, tmp_path):
    """`norm` names the final norm only (dotted suffix); peft matches by string suffix, which would also catch
    every `input_layernorm`: adapter_config.json lists the full paths, and peft loads the adapter exactly."""
    cfg = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["norm", "embed_tokens"])
    model = load_fp32(tiny_llama)
    torch.manual_seed(0)
    targets = inject_adapters(model, cfg)
    random_adapters(model)
    with torch.no_grad():
        model.model.norm.weight.add_(0.3)
        model.model.embed_tokens.weight.add_(0.05)
    model.eval()
    save_adapter(tmp_path, adapter_state_dict(model, cfg.modules_to_save), peft_config(cfg, targets, str(tiny_llama), False))
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["modules_to_save"] == ["model.embed_tokens", "model.norm"]
    reference = PeftModel.from_pretrained(load_fp32(tiny_llama), tmp_path).eval()
    torch.testing.assert_close(reference(IDS).logits, model(IDS).logits, rtol=0, atol=1e-5)
    ours, *_ = load_adapted_model(str(tiny_llama), str(tmp_path))
    torch.testing.assert_close(ours(IDS).logits, model(IDS).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("adapter", [
    {"r": 4, "alpha": 8, "target_modules": ["q_proj"], "modules_to_save": ["rotary_emb"]},
    {"method": "ia3", "target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"],
     "modules_to_save": ["norm", "act_fn"]},
])
def test_modules_to_save_without_parameters_is_refused(adapter, tiny_llama, number_data, tmp_path, monkeypatch,
                                                       capsys):
    """A modules_to_save entry naming a module with no parameters (the rotary embedding's buffers, an activation)
    trained nothing extra, without a word, in every method: validate and train refuse it, naming the module and those
    with parameters."""
    import yaml

    from tests.conftest import cli_user_error, make_recipe, unplaced

    recipe = make_recipe(tmp_path, tiny_llama, number_data)
    recipe.write_text(yaml.safe_dump({**yaml.safe_load(recipe.read_text()), "adapter": adapter}, sort_keys=False))
    wanted = adapter["modules_to_save"][-1]
    held = {"rotary_emb": ("model.rotary_emb, a LlamaRotaryEmbedding", " (only buffers, which are not trained: "
                                                                        "inv_freq, original_inv_freq)"),
            "act_fn": ("model.layers.0.mlp.act_fn, a SiLUActivation", "")}[wanted]
    expected = (f"adapter.modules_to_save: '{wanted}' ({held[0]}) has no parameters{held[1]}: training it whole would "
                "train nothing. Name a module with parameters (this model's: embed_tokens, q_proj, k_proj, v_proj, "
                "o_proj, gate_proj, up_proj, down_proj, input_layernorm, post_attention_layernorm, norm, lm_head), or "
                "remove it.")
    for command in ("validate", "train"):
        said = unplaced(" ".join(cli_user_error(monkeypatch, capsys, command, str(recipe)).split()), recipe)
        assert said == f"error: {expected}", said
    assert not (tmp_path / "run" / "adapter").exists()
