"""LoRA's `lora_bias` (a trained bias in lora_B) beyond the conformance battery (tests/test_methods.py, case
"lora-bias": dense math, merges, peft both ways on Qwen2 and GPT-2): a base layer without a bias (Llama) loads peft's
adapter with peft's logits and refuses the merge as peft does, a run trains the bias, and the settings peft refuses
are refused by the recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig as PeftLora
from peft import get_peft_model
from safetensors.torch import load_file

from conftest import cli_user_error, make_recipe
from peftkit.errors import PeftkitError
from peftkit.adapter_base import load_adapted_model
from peftkit.recipe import load_recipe
from peftkit.tiny import build_tiny_model
from tests.conftest import load_fp32

IDS = torch.tensor([[1, 40, 41, 42, 7, 60, 61, 62]])


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bias-models") / "qwen2"
    build_tiny_model(path, arch="qwen2", hidden_size=32, num_layers=2, seed=0)
    return path


def _peft_adapter(base: Path, out: Path, targets: list[str]) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = get_peft_model(load_fp32(base), PeftLora(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=targets,
                                                 init_lora_weights=False, lora_bias=True))
    model.eval().save_pretrained(out)
    return model, out


def test_a_base_without_biases_loads_peft_s_adapter_and_refuses_its_merge(tiny_llama, tmp_path, monkeypatch, capsys):
    """peft lets lora_bias sit on Llama's bias-free layers (with a warning) and refuses to merge it: peftkit loads it
    with peft's logits and refuses `peftkit merge` saying why, writing nothing."""
    with pytest.warns(UserWarning, match="has no bias"):
        reference, adapter = _peft_adapter(tiny_llama, tmp_path / "peft", ["q_proj", "v_proj"])
    with torch.no_grad():
        expected = reference(IDS).logits
        ours = load_adapted_model(str(tiny_llama), str(adapter))[0](IDS).logits
    assert (ours - expected).abs().max() <= 1e-5
    err = cli_user_error(monkeypatch, capsys, "merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged"))
    assert "has a bias (lora_B.bias, lora_bias) on 'model.layers.0.self_attn.q_proj', whose base layer has none" in err
    assert not (tmp_path / "merged").exists()


def test_a_recipe_merging_into_bias_free_layers_is_refused_before_training(tiny_llama, number_data, tmp_path,
                                                                          monkeypatch, capsys):
    recipe = make_recipe(tmp_path, tiny_llama, number_data, adapter={"lora_bias": True}, export={"merged": True})
    err = cli_user_error(monkeypatch, capsys, "train", str(recipe))
    assert "adapter.lora_bias: 'model.layers.0.self_attn.q_proj' (and 13 more) has no bias" in err
    assert "Set export.merged: false" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_run_trains_the_bias_and_merges_it(qwen2, number_data, tmp_path):
    """On Qwen2's biased q/v: the export's lora_B biases moved from zero, peft loads the adapter with the run's
    logits, and the merged export (the bias folded into the base's) gives them too."""
    from peft import PeftModel

    from peftkit.train import train

    recipe = make_recipe(tmp_path, qwen2, number_data, export={"merged": True},
                         adapter={"lora_bias": True, "target_modules": ["q_proj", "v_proj"]})
    train(load_recipe(recipe), show_summary=False)
    run = tmp_path / "run"
    tensors = load_file(run / "adapter" / "adapter_model.safetensors")
    biases = [t for k, t in tensors.items() if k.endswith("lora_B.bias")]
    assert len(biases) == 4 and all(b.abs().max() > 1e-4 for b in biases)
    with torch.no_grad():
        ours = load_adapted_model(str(qwen2), str(run / "adapter"))[0](IDS).logits
        peft = PeftModel.from_pretrained(load_fp32(qwen2), run / "adapter").eval()(IDS).logits
        merged = load_fp32(run / "merged")(IDS).logits
    assert (ours - peft).abs().max() <= 1e-5 and (merged - ours).abs().max() <= 1e-5


@pytest.mark.parametrize(("adapter", "message"), [
    ({"lora_bias": True, "use_dora": True}, "adapter.lora_bias with use_dora is not supported (peft refuses it too)"),
    ({"lora_bias": True, "init": "gaussian"}, "adapter.lora_bias with init: gaussian is not supported"),
])
def test_settings_peft_refuses_are_refused_by_the_recipe(adapter, message, tiny_llama, number_data, tmp_path,
                                                         monkeypatch, capsys):
    recipe = make_recipe(tmp_path, tiny_llama, number_data, adapter=adapter)
    assert message in cli_user_error(monkeypatch, capsys, "train", str(recipe))


def test_an_embedding_target_is_refused(tiny_llama):
    from peftkit.adapters import inject_adapters
    from peftkit.methods.lora import LoraConfig

    with pytest.raises(PeftkitError, match="adapter.lora_bias: 'model.embed_tokens' is an Embedding, which has no bias"):
        inject_adapters(load_fp32(tiny_llama), LoraConfig(r=2, lora_bias=True, target_modules=["embed_tokens", "q_proj"]))


def test_combining_refuses_it_and_a_mixed_batch_gives_its_rows_the_adapter_alone(qwen2, tmp_path):
    """`peftkit merge` of several adapters does not carry lora_B's bias: refused. A mixed batch runs such a layer's
    rows whole (the stacked LoRA products have no bias)."""
    from peftkit.adapters.named import load_named_model
    from peftkit.combine_inputs import read_sources

    _, biased = _peft_adapter(qwen2, tmp_path / "biased", ["q_proj", "v_proj"])
    with pytest.raises(PeftkitError, match=r"has a bias in lora_B \(lora_bias\), which combining does not carry"):
        read_sources([str(biased), str(biased)], False)
    torch.manual_seed(1)
    plain = get_peft_model(load_fp32(qwen2), PeftLora(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"],
                                                  init_lora_weights=False))
    plain.save_pretrained(tmp_path / "plain")
    model, named, _ = load_named_model([("b", str(biased)), ("p", str(tmp_path / "plain"))], str(qwen2))
    ids = torch.cat([IDS, IDS.flip(1)])
    with torch.no_grad(), named.routed(["b", "p"]):
        mixed = model(ids).logits
    for i, name in enumerate(["b", "p"]):
        named.activate(name)
        with torch.no_grad():
            torch.testing.assert_close(mixed[i:i + 1], model(ids[i:i + 1]).logits, rtol=0, atol=1e-5)
