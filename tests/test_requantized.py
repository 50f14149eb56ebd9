"""`peftkit merge --requantize`'s measure of the update OUTPUT-nf4 keeps (peftkit/requantized.py), against the same
figures computed here from the checkpoint and the adapter file with bitsandbytes' own quantize_4bit / dequantize_4bit,
not with peftkit's merge."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import bitsandbytes.functional as bnbF
import pytest
import torch
from safetensors.torch import load_file

from peftkit.adapters import adapter_layers, inject_adapters
from peftkit.adapters.state_dicts import adapter_state_dict
from peftkit.cli import main
from peftkit.merge_weights import conv1d_modules
from peftkit.methods.lora import LoraConfig
from peftkit.modeling import load_model
from peftkit.peft_format import peft_config, save_adapter
from peftkit.recipe import ModelConfig, QuantizationConfig
from tests.conftest import load_fp32, random_adapters

SCALING = 8 / 4  # alpha / r of the adapters below
PREFIX = "base_model.model."


def _quantized(weight: torch.Tensor, quant_type: str = "nf4") -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes, dequantized weight, in the weight's dtype) of NF4 (FP4) with double quantization, blocks of 64:
    what --requantize nf4 (fp4) and a QLoRA base load with."""
    codes, state = bnbF.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type=quant_type)
    return codes, bnbF.dequantize_4bit(codes, state)


def _expected(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], quant_type: str = "nf4",
              dtype: torch.dtype = torch.float32) -> dict:
    """kept, across and the codes changed, per layer and summed over layers, for {layer: (W0, dW)} in the layout
    bitsandbytes quantizes: R = deq(Q(W0 + dW)) set against B = deq(Q(W0)), both in the merge's output `dtype` (the
    merged weight computed in fp32, then cast)."""
    layers, along, size, change, changed = {}, 0.0, 0.0, 0.0, 0
    for name, (w0, dw) in pairs.items():
        merged, w0 = (w0 + dw).to(dtype), w0.to(dtype)  # (as the merged model holds them: its update is merged - W0)
        r_codes, r = _quantized(merged, quant_type)
        b_codes, b = _quantized(w0, quant_type)
        d, dw = r.double() - b.double(), merged.double() - w0.double()  # (bfloat16's difference: rounded)
        nibbles = [torch.cat([c.view(-1) >> 4, c.view(-1) & 15]) for c in (r_codes, b_codes)]
        layers[name] = (float((d * dw).sum() / (dw * dw).sum()), int((nibbles[0] != nibbles[1]).sum()))
        along, size, change = (along + float((d * dw).sum()), size + float((dw * dw).sum()),
                               change + float((d * d).sum()))
        changed += layers[name][1]
    kept = along / size
    return {"kept": kept, "across": ((change - 2 * kept * along + kept ** 2 * size) / size) ** 0.5,
            "codes_changed": changed, "layers": layers}


def _merge(monkeypatch, capsys, adapter: Path, output: Path, method: str = "nf4", *flags: str) -> list[str]:
    monkeypatch.setattr(sys, "argv", ["peftkit", "merge", "--adapter", str(adapter), "--output", str(output),
                                      "--requantize", method, *flags])
    main()
    return capsys.readouterr().out.splitlines()


@pytest.mark.parametrize(("method", "dtype"), [("nf4", "float32"), ("fp4", "bfloat16")])
def test_merge_requantize_says_how_much_of_a_qlora_update_it_keeps(method, dtype, tiny_llama, tmp_path, monkeypatch,
                                                                   capsys):
    """A QLoRA adapter whose q_proj update is far above a 4-bit step and whose v_proj update is far below it: the
    first is kept (~100 %), the second rounded away (~0 %), the sums over layers are bitsandbytes' own rounding of
    W0 + dW against W0 (W0 the NF4 base dequantized), and the embeddings' update stays whole in full precision. The
    same figures of an FP4 QLoRA adapter (computing in bfloat16) merged to bfloat16 (--dtype) and re-quantized to FP4:
    R and B are the bfloat16 weights' FP4 codes (v_proj's update there, 2e-3, is above bfloat16's rounding, which would
    take it whole, and moves a few codes: FP4's two codes nearest 0 lie 0.0052 x absmax apart)."""
    quant = QuantizationConfig(method=method, compute_dtype=dtype)
    model = load_model(ModelConfig(name_or_path=str(tiny_llama), dtype="float32"), quant, torch.device("cpu"))
    cfg = LoraConfig(r=4, alpha=8, target_modules=["embed_tokens", "q_proj", "v_proj"])
    torch.manual_seed(0)
    targets = inject_adapters(model, cfg)
    random_adapters(model, seed=1, std=0.1)  # B of 0.1: a product of 0.04 against weights of ~0.1, steps of ~0.03
    with torch.no_grad():
        for name, layer in adapter_layers(model).items():
            if name.endswith("v_proj"):
                layer.lora_B.weight.mul_(1e-4 if dtype == "float32" else 0.05)  # ~4e-6 (2e-3): below half a step
    save_adapter(tmp_path / "adapter", adapter_state_dict(model, []),
                 peft_config(cfg, targets, str(tiny_llama), False, "llama"), quant)

    flags = () if dtype == "float32" else ("--dtype", dtype)  # (float32: the base checkpoint's, merge's default)
    lines = _merge(monkeypatch, capsys, tmp_path / "adapter", tmp_path / "merged", method, *flags)

    original = load_fp32(tiny_llama).state_dict()
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    pairs = {}
    for name in [n for n in adapter_layers(model) if "proj" in n]:
        w0 = _quantized(original[f"{name}.weight"], method)[1]
        b, a = (adapter[f"{PREFIX}{name}.lora_{x}.weight"] for x in "BA")
        pairs[name] = (w0, SCALING * b @ a)
    expected = _expected(pairs, method, getattr(torch, dtype))
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert all(torch.equal(merged[f"{name}.weight"], (w0 + dw).to(getattr(torch, dtype)))
               for name, (w0, dw) in pairs.items())  # (the weights R was quantized from)
    record = json.loads((tmp_path / f"merged-{method}" / "peftkit.json").read_text())
    assert record["merged_from"]["base_model_name_or_path"] == str(tiny_llama)
    got = record["requantized"]
    assert abs(got["kept"] - expected["kept"]) <= 1e-6 and abs(got["across"] - expected["across"]) <= 1e-6
    assert got["codes_changed"] == expected["codes_changed"] > 0
    assert got["codes"] == sum(original[f"model.layers.{i}.{m}.weight"].numel() for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
        "mlp.down_proj"))
    for name, (kept, changed) in expected["layers"].items():
        assert abs(got["layers"][name]["kept"] - kept) <= 1e-6 and got["layers"][name]["codes_changed"] == changed
        if method == "nf4":  # (FP4's v_proj keeps 9 to 16 %)
            assert kept > 0.95 if name.endswith("q_proj") else abs(kept) < 0.05, (name, kept)
            assert changed > 0 if name.endswith("q_proj") else changed == 0, (name, changed)
    assert sorted(got["layers"]) == sorted(pairs)  # (k, o and the MLP: unchanged, not listed)
    assert got["full_precision"] == ["model.embed_tokens.weight"]
    least = sorted(expected["layers"].items(), key=lambda item: item[1][0])[:3]
    assert lines == [
        f"Merged model written to {tmp_path / 'merged'}",
        f"Re-quantized ({method}) model written to {tmp_path / f'merged-{method}'}",
        (f"{tmp_path / f'merged-{method}'} keeps {100 * expected['kept']:.1f} % of the adapter's update to its 4-bit "
         f"weights ({expected['codes_changed']:,} of {got['codes']:,} 4-bit codes changed; rounding added noise "
         f"{100 * expected['across']:.1f} % of the update's size)."),
        "Least kept: " + ", ".join(f"{name} {round(100 * kept, 1) + 0.0:.1f} %" for name, (kept, _) in least)
        + ". Kept whole in full precision: model.embed_tokens.weight."]


def test_a_full_precision_base_is_quantized_the_same_way_and_a_conv1d_as_transformers_does(tiny_gpt2, tmp_path,
                                                                                            monkeypatch, capsys):
    """A LoRA of a 32-bit GPT-2: B is W0 itself quantized as the merged weights were, and GPT-2's Conv1D weights, (in,
    out) in the model, are quantized transposed, (out, in), as transformers loads them 4-bit."""
    model = load_fp32(tiny_gpt2)
    cfg = LoraConfig(r=4, alpha=8, target_modules=["c_attn"])
    torch.manual_seed(0)
    targets = inject_adapters(model, cfg)
    random_adapters(model, seed=1, std=0.01)
    save_adapter(tmp_path / "adapter", adapter_state_dict(model, []),
                 peft_config(cfg, targets, str(tiny_gpt2), bool(conv1d_modules(model)), "gpt2"))

    _merge(monkeypatch, capsys, tmp_path / "adapter", tmp_path / "merged")

    original = load_fp32(tiny_gpt2).state_dict()
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    expected = _expected({name: (original[f"{name}.weight"].T.contiguous(), SCALING * (
        adapter[f"{PREFIX}{name}.lora_B.weight"] @ adapter[f"{PREFIX}{name}.lora_A.weight"])) for name in targets})
    got = json.loads((tmp_path / "merged-nf4" / "peftkit.json").read_text())["requantized"]
    assert abs(got["kept"] - expected["kept"]) <= 1e-6 and abs(got["across"] - expected["across"]) <= 1e-6
    assert got["codes_changed"] == expected["codes_changed"] and got["full_precision"] == []
