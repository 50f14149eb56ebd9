"""transformers 4's per-expert LoRA adapters (Mixtral's `block_sparse_moe.experts.N.w1`, Qwen2-MoE's
`mlp.experts.N.gate_proj`, and the routers) load on transformers 5's fused experts
(peftkit.methods.expert_lists): against the model they were trained for, rebuilt by adding each expert's update to its
rows of the fused weights (independent of peft and of the conversion), and against peft 0.21's own conversion where it
loads them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from peftkit.errors import PeftkitError
from peftkit.adapter_base import load_adapted_model
from peftkit.tiny import build_tiny_model
from tests.conftest import check_loads_and_merges_as_peft, cli_user_error, load_fp32, method_recipe

IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 8, 4, 6, 10], [4, 4, 2, 9, 1, 3, 3, 7, 5, 8]])
BLOCK = {"mixtral": "block_sparse_moe", "qwen2_moe": "mlp", "qwen3_moe": "mlp"}  # transformers 4's name of the experts' block
QWEN = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
PARTS = {"mixtral": {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)}, "qwen2_moe": QWEN, "qwen3_moe": QWEN}
ALL = {"mixtral": ["q_proj", "w1", "w2", "w3", "gate"], "qwen2_moe": ["q_proj", "gate_proj", "up_proj", "down_proj",
                                                                      "gate"]}
ALL["qwen3_moe"] = ALL["qwen2_moe"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    for arch in BLOCK:
        build_tiny_model(root / arch, arch=arch, hidden_size=32, num_layers=2, seed=0)
    return {arch: root / arch for arch in BLOCK}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def _v4_modules(model: torch.nn.Module, arch: str) -> dict[str, tuple[str, int, slice]]:
    """transformers 4's Linear layers of `model`: {v4 path: (transformers 5 parameter, expert or -1, rows)}."""
    found = {}
    for name, module in model.named_modules():
        if name.endswith(".self_attn.q_proj") or ".shared_expert." in name and hasattr(module, "weight"):
            found[name] = (f"{name}.weight", -1, slice(None))
        elif name.endswith(".mlp") and hasattr(module, "experts"):
            v4 = name.replace(".mlp", f".{BLOCK[arch]}")
            found[f"{v4}.gate"] = (f"{name}.gate.weight", -1, slice(None))
            for fused, parts in PARTS[arch].items():
                weight = getattr(module.experts, fused)
                size = weight.shape[1] // len(parts)
                for e in range(weight.shape[0]):
                    for i, part in enumerate(parts):
                        found[f"{v4}.experts.{e}.{part}"] = (f"{name}.experts.{fused}", e,
                                                             slice(i * size, (i + 1) * size))
    return found


def v4_adapter(base: Path, out: Path, arch: str, targets: list[str], r: int = 2, alpha: float = 4, seed: int = 0,
               use_rslora: bool = False, alpha_pattern: dict | None = None, saved_targets: object = None,
               **config) -> tuple[Path, torch.Tensor]:
    """A LoRA adapter as peft saved it on transformers 4 (far from identity), and the logits of the model it was
    trained for: each v4 layer's s B A added to its rows of the fused weights."""
    model = load_fp32(base)
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(seed)
    state = {}
    with torch.no_grad():
        for path, (param, expert, rows) in _v4_modules(model, arch).items():
            name = path.rsplit(".", 1)[-1]
            if name not in targets:
                continue
            weight = params[param] if expert < 0 else params[param][expert]
            out_features, in_features = weight[rows].shape
            a = torch.randn(r, in_features, generator=g) * 0.3
            b = torch.randn(out_features, r, generator=g) * 0.3
            state[f"base_model.model.{path}.lora_A.weight"], state[f"base_model.model.{path}.lora_B.weight"] = a, b
            # (peft's get_pattern_key: the first key whose regex matches the end of the v4 path)
            a_ = next((v for k, v in (alpha_pattern or {}).items() if re.match(rf"(.*\.)?({k})$", path)), alpha)
            weight[rows] += (b @ a) * (a_ / (r ** 0.5 if use_rslora else r))
    out.mkdir(parents=True)
    save_file(state, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
        "target_modules": targets if saved_targets is None else saved_targets,
        "base_model_name_or_path": str(base), "lora_dropout": 0.0, "bias": "none", "use_rslora": use_rslora,
        "alpha_pattern": alpha_pattern or {}, **config}))
    return out, _logits(model)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_loads_and_merges_as_the_model_it_was_trained_for_and_as_peft(arch, bases, tmp_path):
    adapter, expected = v4_adapter(bases[arch], tmp_path / "v4", arch, ALL[arch])
    check_loads_and_merges_as_peft(bases[arch], adapter, IDS, tmp_path / "merged")  # peft's conversion
    check_loads_and_merges_as_peft(bases[arch], adapter, IDS, tmp_path / "merged_dense", theirs=expected)
    cfg = load_adapted_model(str(bases[arch]), str(adapter), torch.device("cpu"))[1]
    assert {p.split(".", 4)[-1] for p in cfg.target_parameters} == {"experts.gate_up_proj", "experts.down_proj",
                                                                    "gate.weight"}


def test_qwen2_moe_s_shared_expert_keeps_its_layers_where_peft_drops_the_experts(bases, tmp_path):
    """peft 0.21 converts Qwen2-MoE's model type's adapters not at all: its experts' weights are left out (and
    `gate` on the router fails); each of the 2 x 4 experts' layers and the shared expert's load here."""
    from peft import PeftModel

    targets = ["q_proj", "gate_proj", "up_proj", "down_proj"]
    adapter, expected = v4_adapter(bases["qwen2_moe"], tmp_path / "v4", "qwen2_moe", targets)
    check_loads_and_merges_as_peft(bases["qwen2_moe"], adapter, IDS, tmp_path / "merged", theirs=expected)
    model = load_adapted_model(str(bases["qwen2_moe"]), str(adapter), torch.device("cpu"))[0]
    assert type(model.model.layers[0].mlp.shared_expert.gate_proj).__name__ == "LoraLinear"
    assert (_logits(PeftModel.from_pretrained(load_fp32(bases["qwen2_moe"]), adapter)) - expected).abs().max() > 1e-2
    adapter, expected = v4_adapter(bases["qwen2_moe"], tmp_path / "router", "qwen2_moe", ALL["qwen2_moe"])
    assert (_logits(load_adapted_model(str(bases["qwen2_moe"]), str(adapter), torch.device("cpu"))[0])
            - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("case", ["dropout", "rslora", "one_of_a_pair", "alpha_pattern", "router_alpha",
                                  "pattern_of_new_paths", "regex_targets"])
def test_what_peft_does_not_load_right_loads_as_the_model_it_was_trained_for(case, bases, tmp_path):
    """peft 0.21 refuses lora_dropout (most Hub adapters have it) and a projection of a fused pair adapted alone,
    and scales an rsLoRA pair by sqrt(2) too much (it doubles alpha with the rank)."""
    from peft import PeftModel

    settings = {"dropout": {"lora_dropout": 0.05}, "rslora": {"use_rslora": True}, "one_of_a_pair": {},
                "alpha_pattern": {"alpha_pattern": {"w3": 16, "w2": 1}},
                "router_alpha": {"alpha_pattern": {"gate": 1}},  # (no match on the router's new path, gate.weight)
                "pattern_of_new_paths": {"alpha_pattern": {r".*mlp.*": 16}},  # (matches transformers 5's paths only)
                "regex_targets": {"saved_targets": r".*\.(w1|w2|w3|gate|q_proj)"}}[case]
    targets = ["q_proj", "w1", "w2"] if case == "one_of_a_pair" else ALL["mixtral"]
    adapter, expected = v4_adapter(bases["mixtral"], tmp_path / "v4", "mixtral", targets, **settings)
    check_loads_and_merges_as_peft(bases["mixtral"], adapter, IDS, tmp_path / "merged", theirs=expected)
    if case in ("dropout", "one_of_a_pair"):
        with pytest.raises(ValueError, match="lora_dropout|without also targeting w3"):
            PeftModel.from_pretrained(load_fp32(bases["mixtral"]), adapter)
    elif case == "rslora":
        theirs = _logits(PeftModel.from_pretrained(load_fp32(bases["mixtral"]), adapter))
        assert (theirs - expected).abs().max() > 1e-2


def test_named_adapters_refuse_it_as_lora_on_parameters(bases, tmp_path):
    from peftkit.adapters.named import NamedAdapters

    adapter, _ = v4_adapter(bases["mixtral"], tmp_path / "v4", "mixtral", ALL["mixtral"])
    with pytest.raises(PeftkitError, match=r"adapts parameters \(target_parameters\), which named adapters do not "
                                           "route per row; load it alone"):
        NamedAdapters(load_fp32(bases["mixtral"])).load("moe", adapter)


def test_an_adapter_missing_experts_is_refused_naming_them(bases, tmp_path):
    adapter, _ = v4_adapter(bases["mixtral"], tmp_path / "v4", "mixtral", ALL["mixtral"])
    state = load_file(adapter / "adapter_model.safetensors")
    save_file({k: v for k, v in state.items() if ".experts.3.w1." not in k}, adapter / "adapter_model.safetensors")
    with pytest.raises(PeftkitError, match=r"adapts 3 of the 4 experts' w1 in 'model.layers.0.mlp.experts' \(not "
                                           r"expert 3\)"):
        load_adapted_model(str(bases["mixtral"]), str(adapter), torch.device("cpu"))


def test_dora_on_the_experts_is_refused(bases, tmp_path):
    adapter, _ = v4_adapter(bases["mixtral"], tmp_path / "v4", "mixtral", ["w1", "w3"], use_dora=True)
    state = load_file(adapter / "adapter_model.safetensors")
    for key in [k for k in state if k.endswith(".lora_B.weight")]:
        state[key.replace(".lora_B.weight", ".lora_magnitude_vector")] = torch.ones(state[key].shape[0])
    save_file(state, adapter / "adapter_model.safetensors")
    with pytest.raises(PeftkitError, match="per-expert layers .* with DoRA"):
        load_adapted_model(str(bases["mixtral"]), str(adapter), torch.device("cpu"))


def test_training_on_from_it_is_refused_saying_what_to_do(bases, number_data, tmp_path, monkeypatch, capsys):

    adapter, _ = v4_adapter(bases["mixtral"], tmp_path / "v4", "mixtral", ALL["mixtral"])
    recipe = method_recipe(tmp_path, bases["mixtral"], number_data, {"init_from": str(adapter)})
    err = " ".join(cli_user_error(monkeypatch, capsys, "train", str(recipe)).split())
    assert (f"adapter.init_from: {adapter} adapts transformers 4's per-expert mixture-of-experts layers (e.g. "
            "'model.layers.0.block_sparse_moe.experts.0.w1')") in err and "not to train on from it" in err


def test_inspect_says_the_experts_are_adapted_one_by_one(bases, tmp_path):
    from peftkit.inspect import inspect_adapter

    adapter, _ = v4_adapter(bases["mixtral"], tmp_path / "v4", "mixtral", ALL["mixtral"])
    info = inspect_adapter(adapter)
    for verdict in (info["vllm"], info["llama_cpp"]):
        assert any("experts one by one (transformers 4's layout, e.g. 'model.layers.0.block_sparse_moe.experts.0.w1')"
                   in caveat for caveat in verdict["caveats"])


def test_combining_says_it_does_not_convert(bases, tmp_path):
    from peftkit.combine_adapters import combine_adapters
    from peftkit.combine_inputs import Combination

    adapter, _ = v4_adapter(bases["mixtral"], tmp_path / "v4", "mixtral", ALL["mixtral"])
    with pytest.raises(PeftkitError, match="a mixture-of-experts layer of transformers 4's layout, which this "
                                           "transformers fuses: loading one adapter converts it, combining does not"):
        combine_adapters([str(adapter)] * 2, Combination("linear", (0.5, 0.5)), str(tmp_path / "combined"))


def test_inspect_says_which_vllm_drops_rslora_s_scale_on_the_experts(bases, tmp_path):
    """vLLM packs transformers 4's per-expert LoRAs with PackedLoRALayerWeights.pack_moe, which scaled them by
    lora_alpha / r whatever use_rslora says (vllm/lora/lora_weights.py), sqrt(r) times too small, until
    vllm-project/vllm#55548 (September 2026) kept PEFTHelper's rsLoRA factor there. inspect refused the adapter for
    every vLLM; it is a caveat naming the fix."""
    from peftkit.inspect import inspect_adapter
    from peftkit.inspect_text import describe

    adapter, _ = v4_adapter(bases["mixtral"], tmp_path / "v4", "mixtral", ALL["mixtral"], use_rslora=True)
    info = inspect_adapter(adapter)
    said = ("use_rslora on a mixture's experts one by one: vLLM before its fix of September 2026 "
            "(vllm-project/vllm#55548) packs them scaled by lora_alpha / r, not lora_alpha / sqrt(r) (sqrt(r) times "
            "too small, silently; there, merge it); later versions keep the rsLoRA scale")
    assert info["vllm"]["accepts"] and not info["vllm"]["reasons"] and said in info["vllm"]["caveats"]
    assert f"               note: {said}" in describe(info)
    plain, _ = v4_adapter(bases["mixtral"], tmp_path / "plain", "mixtral", ALL["mixtral"])
    assert not any("use_rslora" in c for c in inspect_adapter(plain)["vllm"]["caveats"])
