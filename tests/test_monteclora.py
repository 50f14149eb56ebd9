"""MonteCLoRA (`monteclora_config`, peftkit.methods.monteclora) is read as the plain LoRA it is outside training:
peft's adapters load, evaluate and merge with peft's logits (its sampler's tensors left out), and continuing to
train one is refused."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig as PeftLora
from safetensors.torch import load_file

from tests.conftest import check_loads_and_merges_as_peft, cli_user_error, method_recipe, save_peft_lora

IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])


def _peft_adapter(base: Path, out: Path) -> Path:
    return save_peft_lora(base, out, PeftLora(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                              monteclora_config={"num_samples": 4, "buffer_size": 3}))


def test_peft_s_adapter_loads_and_merges_as_peft_evaluates_it(tiny_llama, tmp_path):
    adapter = _peft_adapter(tiny_llama, tmp_path / "peft")
    assert any(".lora_monteclora_sampler." in key for key in load_file(adapter / "adapter_model.safetensors"))
    check_loads_and_merges_as_peft(tiny_llama, adapter, IDS, tmp_path / "merged")


def test_training_on_from_it_is_refused(tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    adapter = _peft_adapter(tiny_llama, tmp_path / "peft")
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"init_from": str(adapter)})
    err = " ".join(cli_user_error(monkeypatch, capsys, "train", str(recipe)).split())
    assert f"adapter.init_from: {adapter} is a MonteCLoRA adapter, which peftkit reads (it is plain LoRA outside " \
           "training) but does not train" in err


def test_inspect_counts_the_lora_and_names_the_sampler(tiny_llama, tmp_path):
    from peftkit.inspect import inspect_adapter

    info = inspect_adapter(_peft_adapter(tiny_llama, tmp_path / "peft"))
    assert "MonteCLoRA (plain LoRA outside training)" in info["variants"] and info["peftkit_reads"]["ok"]
    assert info["saved_params"] == info["adapter_params"] == 2 * 4 * (32 + 32) + 2 * 4 * (64 + 32)
    assert not info["llama_cpp"]["accepts"] and "lora_monteclora_sampler" in info["llama_cpp"]["reasons"][0]
