"""`peftkit merge` at model sizes the tiny models hide: its peak memory against the model's size, and output files
split in shards as the hub's checkpoints are."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peftkit.methods.lora import LoraConfig
from tests.conftest import INFINITE_KEY, base_with_infinities, save_random_adapter


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS is reset through Linux's /proc")
def test_a_bf16_merge_peaks_near_the_model_s_size():
    """The merged layers were held in fp32 and then cast: a bf16 model of 84 MiB peaked 257 MiB (3.05x) over what was
    loaded, which for an 8B model is 50 GB more. Each layer now takes the output dtype as it is merged (1.4x: the
    merged copies of the adapted weights). Measured as the process's peak RSS (Linux: clear_refs resets it)."""
    script = textwrap.dedent("""
        import re
        import torch
        from peftkit.adapters import inject_adapters
        from peftkit.merge_weights import merged_model
        from peftkit.methods.lora import LoraConfig
        from peftkit.tiny import build_tiny_model

        def rss(key):
            return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024

        model = build_tiny_model(hidden_size=768, num_layers=8)[0].to(torch.bfloat16).eval()
        cfg = LoraConfig(r=8, target_modules="all-linear")
        inject_adapters(model, cfg)
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        open("/proc/self/clear_refs", "w").write("5")
        before = rss("VmRSS")
        merged = merged_model(model, cfg, torch.bfloat16)
        print((rss("VmHWM") - before) / size)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # 1.2-1.4x alone; 2.02x and 2.07x late in two full runs on one long-running 2-core VM (the cause is not
    # established: peak RSS also counts pages that are not the merge's); the fp32 detour measured 3.05x.
    assert float(done.stdout) < 2.5


def test_a_merged_model_is_written_in_shards(tiny_llama, tmp_path, monkeypatch):
    """transformers 5 writes a model in one file up to 50 GB (an 8B model whole); a merge keeps to 5 GB shards with
    an index, as transformers 4 and the hub's checkpoints do (here 20 kB shards of the tiny model)."""
    from peftkit import merge

    adapter = save_random_adapter(tiny_llama, LoraConfig(r=4, alpha=8), tmp_path / "adapter", seed=1)
    whole = merge.merge_adapter(str(adapter), str(tmp_path / "whole"))
    monkeypatch.setattr(merge, "SHARD_SIZE", "20KB")
    sharded = merge.merge_adapter(str(adapter), str(tmp_path / "sharded"))
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (sharded / "model.safetensors").exists()
    assert {k: v for f in files for k, v in load_file(sharded / f).items()}.keys() == load_file(
        whole / "model.safetensors").keys()
    ids = torch.tensor([[1, 5, 9, 13]])
    logits = [AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)(ids).logits for d in (whole, sharded)]
    assert torch.equal(*logits)


def test_a_float16_merge_refuses_a_base_weight_no_adapter_changed_past_its_range(tiny_llama, tmp_path):
    """Only the weights an adapter changed were checked against float16's range (65504): a base weight no adapter
    touched at 1e5 was written as inf without a word. Every floating tensor is checked now, the layer named."""
    import shutil

    from safetensors.torch import save_file

    from peftkit import merge
    from peftkit.errors import PeftkitError

    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    weights = load_file(base / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.weight"
    weights[key][0, 0] = 1e5
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    adapter = save_random_adapter(base, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
                                  tmp_path / "adapter", seed=1)
    assert not any("down_proj" in k for k in load_file(adapter / "adapter_model.safetensors"))
    with pytest.raises(PeftkitError, match=r"^Merging 'model\.layers\.1\.mlp\.down_proj' gives weights beyond what "
                                           r"float16 holds \(largest magnitude 100000\): merge into bfloat16 or "
                                           r"float32 \(peftkit merge --dtype\)\.$"):
        merge.merge_adapter(str(adapter), str(tmp_path / "out"), dtype="float16")
    assert not (tmp_path / "out").exists()
    wide = merge.merge_adapter(str(adapter), str(tmp_path / "wide"), dtype="bfloat16")
    written = AutoModelForCausalLM.from_pretrained(wide, dtype=torch.bfloat16).state_dict()[key]
    assert written[0, 0].item() == pytest.approx(1e5, rel=1e-2)  # bfloat16 holds it (8 bits of mantissa)


def test_a_float16_merge_keeps_what_the_base_holds_as_infinite(tiny_llama, tmp_path):
    """An infinity the base holds itself (a -inf mask or +-inf clamp bound in a persistent buffer: Gemma 4's audio
    tower registers four) is no overflow: a float16 merge writes it as it is, as a float32 merge does. The check of
    the tensors no adapter touched refused such a base ('largest magnitude inf') in float16 only; a finite value past
    65504 in the same tensor is still refused, its magnitude named."""
    from peftkit import merge
    from peftkit.errors import PeftkitError
    from peftkit.merge_weights import check_state_in_range

    base, key = base_with_infinities(tiny_llama, tmp_path / "base"), INFINITE_KEY
    weights = load_file(base / "model.safetensors")
    adapter = save_random_adapter(base, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
                                  tmp_path / "adapter", seed=1)
    written = {}
    for dtype in ("float16", "float32"):
        out = merge.merge_adapter(str(adapter), str(tmp_path / dtype), dtype=dtype)
        written[dtype] = load_file(Path(out) / "model.safetensors")
    assert written["float16"][key].dtype == torch.float16
    for state in written.values():  # the base's own values, each in its place; every other one of them finite
        assert state[key][0, 0].item() == -float("inf") and state[key][0, 1].item() == float("inf")
        assert torch.isfinite(state[key].flatten()[2:]).all()
    assert torch.equal(written["float16"][key], weights[key].to(torch.float16))

    mask = torch.tensor([0.0, -float("inf"), 7e4])  # an overflow beside an infinity: the overflow is named
    with pytest.raises(PeftkitError, match=r"^Merging 'model\.rotary' gives weights beyond what float16 holds \(largest "
                                           r"magnitude 70000\)"):
        check_state_in_range({"model.rotary.mask": mask}, torch.float16)
    check_state_in_range({"model.rotary.mask": mask[:2], "model.rotary.steps": torch.tensor([70000]),
                          "model.rotary.near": torch.tensor([65280.0, -65280.0], dtype=torch.bfloat16)}, torch.float16)
