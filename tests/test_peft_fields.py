"""Which adapter_config.json fields peftkit refuses, ignores or warns of, checked against peft's own configs: a peft
feature peftkit does not implement is refused by name (never loaded as something else), peft's defaults load
quietly, and a field nobody here knows is a warning."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import peft
import pytest
import torch
from peft import LoraConfig as PeftLora
from peft import get_peft_model

from peftkit.errors import PeftkitError, PeftkitWarning
from peftkit.methods import method_for_peft_type
from peftkit.adapter_base import load_adapted_model
from peftkit.peft_fields import UNSUPPORTED_FEATURES, check_peft_fields
from peftkit.peft_format import load_adapter
from tests.conftest import load_fp32

IDS = torch.tensor([[1, 40, 41, 42, 7, 60, 61, 62]])
PEFT_CONFIGS = {  # peft's config classes peftkit reads, with what each needs beyond its defaults
    "LoraConfig": {}, "IA3Config": {}, "LoHaConfig": {}, "LoKrConfig": {}, "OFTConfig": {"r": 0, "oft_block_size": 4},
    "VeraConfig": {}, "AdaLoraConfig": {"total_step": 10}, "PromptTuningConfig": {}, "PrefixTuningConfig": {},
    "PromptEncoderConfig": {}, "AdaptionPromptConfig": {"adapter_len": 4, "adapter_layers": 1},
    "MultitaskPromptTuningConfig": {}, "HRAConfig": {}, "BOFTConfig": {},
    "LNTuningConfig": {}, "FourierFTConfig": {}, "TrainableTokensConfig": {"token_indices": [3, 7]},
    "RandLoraConfig": {},
    "VBLoRAConfig": {},
    "MissConfig": {},
    "DeloraConfig": {},
    "RoadConfig": {},
    "HiraConfig": {},
    "C3AConfig": {},
    "ShiraConfig": {},
    "BeftConfig": {},
    "SupertuningConfig": {},
    "GraloraConfig": {},
    "DeftConfig": {},
    "PeanutConfig": {},
    "PveraConfig": {},
    "TinyLoraConfig": {},
    "PsoftConfig": {},
    "GloraConfig": {},
    "UniLoraConfig": {},
    "LilyConfig": {},
    "CartridgeConfig": {},
    "OSFConfig": {},
    "FrodConfig": {},
    "WaveFTConfig": {},
    "PolyConfig": {},
    "AdamssConfig": {},
    "ShadowConfig": {},
    "XLoraConfig": {},
    "CPTConfig": {},
}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    # peft's Poly needs task ids (peftkit's takes task 0 without them): task 0
    poly = isinstance(model, peft.PeftModel) and model.peft_config["default"].peft_type == "POLY"
    tasks = {"task_ids": torch.zeros(len(IDS), dtype=torch.long)} if poly else {}
    with torch.no_grad():
        return model.eval()(IDS, **tasks).logits


def _peft_lora(base: Path, out: Path, **config) -> Path:
    """A peft LoRA far from identity (init_lora_weights=False: B is drawn too), saved by peft."""
    torch.manual_seed(0)
    config = {"target_modules": ["q_proj", "v_proj"], "init_lora_weights": False} | config
    model = get_peft_model(load_fp32(base), PeftLora(task_type="CAUSAL_LM", r=4, lora_alpha=8, **config))
    model.eval().save_pretrained(out)
    return out


def _edit(adapter: Path, **fields) -> Path:
    config = adapter / "adapter_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | fields))
    return config


@pytest.mark.parametrize("name", sorted(PEFT_CONFIGS))
def test_every_peft_config_at_its_defaults_passes_quietly(name):
    """Every field peft writes at its default is either read, or known not to change the outputs: no refusal and no
    warning (a new peft field with a set default would show here)."""
    assert {f.name for f in dataclasses.fields(peft.LoraConfig)} >= set(UNSUPPORTED_FEATURES)  # peft's own names
    config = getattr(peft, name)(task_type="CAUSAL_LM", **PEFT_CONFIGS[name])
    raw = json.loads(json.dumps(config.to_dict(), default=str))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_peft_fields(method_for_peft_type(raw["peft_type"], Path("c.json")), raw, Path("c.json"))


def test_every_peft_type_has_a_method():
    """Each adapter type peft names (PeftType: 45 in 0.21.2) is one peftkit reads and trains, and each has a config
    class in PEFT_CONFIGS above: a peft release with a new type shows here, named."""
    from peftkit.methods import METHODS

    ours = {m.peft_type for m in METHODS.values()}
    assert sorted(p.value for p in peft.PeftType if p.value not in ours) == []
    named = {getattr(peft, name)(task_type="CAUSAL_LM", **settings).peft_type for name, settings in PEFT_CONFIGS.items()}
    assert sorted(p.value for p in peft.PeftType if p not in named) == []


@pytest.mark.parametrize("name", ["LoHaConfig", "LoKrConfig"])
def test_effective_conv2d_passes_quietly(name):
    """`use_effective_conv2d` changes convolution layers only, which peftkit does not adapt: set, it is no warning."""
    raw = json.loads(json.dumps(getattr(peft, name)(task_type="CAUSAL_LM", use_effective_conv2d=True).to_dict(),
                                default=str))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_peft_fields(method_for_peft_type(raw["peft_type"], Path("c.json")), raw, Path("c.json"))


@pytest.mark.parametrize(("key", "value"), [
    ("use_qalora", True), ("arrow_config", {"top_k": 2}),
])
def test_unsupported_peft_features_are_refused_by_name(key, value, tiny_llama, tmp_path):
    config = _edit(_peft_lora(tiny_llama, tmp_path / "lora"), **{key: value})
    with pytest.raises(PeftkitError) as info:
        load_adapter(config.parent)
    assert f"{config}: '{key}' is {json.dumps(value)}: " in str(info.value)
    assert "does not implement it" in str(info.value)


def test_an_unknown_field_that_is_set_warns_and_is_ignored(tiny_llama, tmp_path):
    adapter = _peft_lora(tiny_llama, tmp_path / "lora")
    _edit(adapter, some_future_variant={"blocks": 2}, another_unset=None)
    with pytest.warns(PeftkitWarning, match="sets 'some_future_variant', which peftkit does not know") as seen:
        load_adapter(adapter)
    assert "another_unset" not in str(seen[0].message)


@pytest.mark.parametrize("init", ["orthogonal", "eva"])
def test_inits_that_keep_the_base_load_with_peft_numbers(init, tiny_llama, tmp_path):
    """Orthogonal and EVA inits draw A and B only (unlike PiSSA or OLoRA, which move the base): the adapter is a plain
    LoRA of the original base, with peft's outputs."""
    adapter = _peft_lora(tiny_llama, tmp_path / "lora")  # weights far from identity; peft records its init string
    _edit(adapter, init_lora_weights=init)
    reference = peft.PeftModel.from_pretrained(load_fp32(tiny_llama), adapter).eval()
    ours = load_adapted_model(str(tiny_llama), str(adapter))[0]
    with torch.no_grad():
        diff = (ours(IDS).logits - reference(IDS).logits).abs().max()
        assert (reference(IDS).logits - load_fp32(tiny_llama)(IDS).logits).abs().max() > 0.1  # a change to check
    assert float(diff) <= 1e-5


def test_ensure_weight_tying_on_tied_embeddings_is_refused_by_name(tmp_path):
    """peft gives tied output embeddings the input embeddings' adapter too (and saves more tensors): refused by name,
    not as an adapter trained on another base model."""
    from peftkit.tiny import build_tiny_model

    base = tmp_path / "qwen2"
    build_tiny_model(base, arch="qwen2", hidden_size=32, num_layers=1, seed=0)
    assert load_fp32(base).config.tie_word_embeddings
    adapter = _peft_lora(base, tmp_path / "lora", target_modules=["embed_tokens"], ensure_weight_tying=True)
    with pytest.raises(PeftkitError, match="'ensure_weight_tying' is true and the adapter covers embed_tokens of a "
                                           "model whose input and output embeddings are tied: peft then"):
        load_adapted_model(str(base), str(adapter))


def test_ensure_weight_tying_on_an_untied_model_loads_with_peft_numbers(tiny_llama, tmp_path):
    """On a model whose embeddings are not tied, peft only warns of the flag: the adapter loads, as it did before the
    flag was checked."""
    assert not load_fp32(tiny_llama).config.tie_word_embeddings
    adapter = _peft_lora(tiny_llama, tmp_path / "lora", target_modules=["embed_tokens", "q_proj"],
                         ensure_weight_tying=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's own "no tied modules were found"
        reference = peft.PeftModel.from_pretrained(load_fp32(tiny_llama), adapter).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PeftkitWarning)  # nor an "unknown field" warning
        ours = load_adapted_model(str(tiny_llama), str(adapter))[0]
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, reference(IDS).logits, atol=1e-6, rtol=0)


def test_a_module_in_target_modules_and_modules_to_save_is_trained_in_full_as_in_peft(tiny_llama, tmp_path):
    """peft puts no adapter on a module that modules_to_save trains in full (its copy wins); peftkit wrapped it too and
    refused peft's adapter for its missing lora_A/lora_B."""
    adapter = _peft_lora(tiny_llama, tmp_path / "lora", target_modules=["q_proj", "lm_head"], modules_to_save=["lm_head"])
    with torch.no_grad():
        model = peft.PeftModel.from_pretrained(load_fp32(tiny_llama), adapter).eval()
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)  # a copy that differs from the base
        model.save_pretrained(adapter)
        reference = peft.PeftModel.from_pretrained(load_fp32(tiny_llama), adapter).eval()(IDS).logits
        ours = load_adapted_model(str(tiny_llama), str(adapter))[0]
        assert (reference - load_fp32(tiny_llama)(IDS).logits).abs().max() > 0.05
        torch.testing.assert_close(ours(IDS).logits, reference, atol=1e-6, rtol=0)


def test_a_recipe_target_that_modules_to_save_trains_in_full_is_an_error(tiny_llama, tmp_path):
    from peftkit.adapters import inject_adapters
    from peftkit.methods.lora import LoraConfig

    cfg = LoraConfig(target_modules=["q_proj", "lm_head"], modules_to_save=["lm_head"])
    with pytest.raises(PeftkitError, match="adapter.target_modules entry 'lm_head' names modules that "
                                           "adapter.modules_to_save trains in full"):
        inject_adapters(load_fp32(tiny_llama), cfg)


def test_a_saved_adapter_s_weights_keep_a_module_inside_modules_to_save_adapted(tiny_llama):
    """peftkit before December 2026 adapted modules inside a classifier head it also saved whole (RoBERTa's
    classifier.dense): its adapters must still load, so a module the saved weights adapt stays wrapped."""
    from peftkit.adapters import adapter_layers, inject_adapters
    from peftkit.methods.lora import LoraConfig

    cfg = LoraConfig(r=2, target_modules=["q_proj", "lm_head"], modules_to_save=["lm_head"])
    plain = inject_adapters(load_fp32(tiny_llama), cfg, every_entry=False)
    assert "lm_head" not in plain
    state = {"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 32)}
    model = load_fp32(tiny_llama)
    kept = inject_adapters(model, cfg, every_entry=False, state=state)
    assert kept == [*plain, "lm_head"] and "lm_head" in adapter_layers(model)


@pytest.mark.parametrize("dora", [False, True])
def test_keys_with_peft_s_adapter_name_load_as_peft_loads_them(dora, tiny_llama, tmp_path):
    """A file saved from model.state_dict() keeps peft's in-memory names (`q_proj.lora_A.default.weight`, DoRA's
    `lora_magnitude_vector.default.weight`, or `lora_magnitude_vector.weight`); peft loads them, and so does peftkit,
    with the logits of the file save_pretrained writes. Other loaders do not (inspect says so); a file holding two
    adapters' names is refused."""
    from safetensors.torch import load_file, save_file

    from peftkit.inspect import inspect_adapter

    saved = _peft_lora(tiny_llama, tmp_path / "saved", use_dora=dora)
    reference = _logits(load_adapted_model(str(tiny_llama), str(saved), torch.device("cpu"))[0])
    state = load_file(saved / "adapter_model.safetensors")
    for suffix in (".default.weight", ".weight") if dora else (".default.weight",):
        named = tmp_path / f"named{suffix}"
        named.mkdir()
        (named / "adapter_config.json").write_text((saved / "adapter_config.json").read_text())
        save_file({(k.removesuffix(".weight") + suffix if k.endswith(".weight") or k.endswith("vector") else k): t
                   for k, t in state.items()}, named / "adapter_model.safetensors")
        assert torch.equal(_logits(load_adapted_model(str(tiny_llama), str(named), torch.device("cpu"))[0]), reference)
        theirs = peft.PeftModel.from_pretrained(load_fp32(tiny_llama), named).eval()
        assert float((_logits(theirs) - reference).abs().max()) <= 1e-5
        info = inspect_adapter(named)
        assert info["targets"]["count"] == 4 and not info["modules_to_save"]
        assert "its keys carry peft's in-memory adapter name" in info["vllm"]["reasons"][-1]
    if dora:
        return
    both = load_file(named / "adapter_model.safetensors")
    both |= {k.replace(".default.", ".other."): t.clone() for k, t in both.items()}
    save_file(both, named / "adapter_model.safetensors")
    with pytest.raises(PeftkitError, match=r"holds the tensors of 2 adapters \(default, other, the names in its"):
        load_adapter(named)


def test_targets_the_weights_do_not_adapt_are_left_alone_with_a_warning(tiny_llama, number_data, tmp_path):
    """adapter_config.json's target_modules naming more than its weights hold (a tool that saved some layers):
    peft gives the others a zero update and warns; peftkit leaves them unwrapped and warns, with peft's logits,
    merged too. init_from, which would train them, refuses it and says why (it blamed the base model)."""
    from peftkit.merge import merge_adapter
    from peftkit.recipe import load_recipe
    from tests.conftest import make_recipe

    adapter = _peft_lora(tiny_llama, tmp_path / "qv")
    # (init_lora_weights true, as peft saves it after training: peft's own layers for k, o then start at zero)
    _edit(adapter, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=True)
    theirs = _logits(peft.PeftModel.from_pretrained(load_fp32(tiny_llama), adapter))
    assert float((theirs - _logits(load_fp32(tiny_llama))).abs().max()) > 0.1
    with pytest.warns(PeftkitWarning, match=r"target_modules match 4 modules its weights do not adapt \(e.g. "
                                            r"'model.layers.0.self_attn.k_proj'\): they are left as they are"):
        ours = load_adapted_model(str(tiny_llama), str(adapter), torch.device("cpu"))[0]
    assert float((_logits(ours) - theirs).abs().max()) <= 1e-5
    merged = merge_adapter(str(adapter), str(tmp_path / "merged"), base=str(tiny_llama))
    assert float((_logits(load_fp32(merged)) - theirs).abs().max()) <= 1e-5
    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 1})
    recipe.write_text(recipe.read_text().replace("adapter:\n  r: 4\n  alpha: 8\n  target_modules: all-linear\n",
                                                 f"adapter:\n  init_from: {adapter}\n"))
    from peftkit.train import train

    with pytest.raises(PeftkitError, match=r"target_modules \(adapter_config.json\) match 4 modules its weights do "
                                           r"not adapt \(e.g. 'model.layers.0.self_attn.k_proj'\)"):
        train(load_recipe(recipe), show_summary=False)


def test_null_target_modules_take_the_modules_the_weights_adapt(tiny_llama, tmp_path):
    """target_modules: null (torchtune-style minimal configs): peft takes its default targets for the architecture
    (q_proj, v_proj on Llama); peftkit takes what the weights adapt, the same modules here, with peft's logits."""
    from peftkit.inspect import inspect_adapter

    adapter = _peft_lora(tiny_llama, tmp_path / "qv")
    _edit(adapter, target_modules=None)
    theirs = _logits(peft.PeftModel.from_pretrained(load_fp32(tiny_llama), adapter))
    cfg = load_adapter(adapter)[0]
    assert sorted(cfg.target_modules) == ["q_proj", "v_proj"]
    ours = load_adapted_model(str(tiny_llama), str(adapter), torch.device("cpu"))[0]
    assert float((_logits(ours) - theirs).abs().max()) <= 1e-5
    assert inspect_adapter(adapter)["targets"]["count"] == 4


def test_modules_to_save_without_weights_in_the_file_load_with_a_warning(tiny_llama, tmp_path):
    """A config listing modules_to_save whose weights the file lacks: peft fails (KeyError); peftkit loads the
    rest, keeping the base's module, and warns."""
    from safetensors.torch import load_file, save_file

    adapter = _peft_lora(tiny_llama, tmp_path / "saved", modules_to_save=["lm_head"])
    state = load_file(adapter / "adapter_model.safetensors")
    save_file({k: t for k, t in state.items() if "lm_head" not in k}, adapter / "adapter_model.safetensors")
    without = _peft_lora(tiny_llama, tmp_path / "without")  # the same LoRA (seed 0), no saved module
    with pytest.warns(PeftkitWarning, match="lists 'lm_head' in modules_to_save, and the adapter's file holds no "
                                            "weights for it: it keeps the base's"):
        ours = load_adapted_model(str(tiny_llama), str(adapter), torch.device("cpu"))[0]
    reference = load_adapted_model(str(tiny_llama), str(without), torch.device("cpu"))[0]
    assert torch.equal(_logits(ours), _logits(reference))


def _peft_lora_saving(base: Path, out: Path, saved: list[str]) -> Path:
    """`_peft_lora` with `saved` as modules_to_save, their copies moved away from the base's values."""
    adapter = _peft_lora(base, out, modules_to_save=saved)
    model = peft.PeftModel.from_pretrained(load_fp32(base), adapter).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".modules_to_save." in name:
                p.add_(0.5)
    model.save_pretrained(adapter)
    return adapter


def test_modules_to_save_that_peft_matched_by_string_suffix_load_as_peft_loads_them(tiny_llama, tmp_path):
    """peft picks modules_to_save by *string* suffix: its `layernorm` saves every `input_layernorm` and
    `post_attention_layernorm`, which peftkit's dotted match missed ("'layernorm' matches no module of this model")."""
    from peftkit.merge import merge_adapter

    adapter = _peft_lora_saving(tiny_llama, tmp_path / "a", ["layernorm"])
    theirs = _logits(peft.PeftModel.from_pretrained(load_fp32(tiny_llama), adapter))
    ours, cfg = load_adapted_model(str(tiny_llama), str(adapter), torch.device("cpu"))[:2]
    assert cfg.modules_to_save == [f"model.layers.{i}.{norm}" for i in (0, 1)
                                   for norm in ("input_layernorm", "post_attention_layernorm")]
    assert float((_logits(ours) - theirs).abs().max()) <= 1e-5
    assert float((_logits(ours) - _logits(load_adapted_model(str(tiny_llama), str(_peft_lora(
        tiny_llama, tmp_path / "plain")), torch.device("cpu"))[0])).abs().max()) > 0.05  # (the saved copies count)
    merged = merge_adapter(str(adapter), str(tmp_path / "merged"), base=str(tiny_llama))
    assert float((_logits(load_fp32(merged)) - theirs).abs().max()) <= 1e-5


# ------------------------------------------------------------------------- rank_pattern and alpha_pattern


PATTERNS = {"rank_pattern": {r"layers\.0\.self_attn\.v_proj": 2, "o_proj": 6},
            "alpha_pattern": {"v_proj": 24, r"layers\.1\..*q_proj": 3}}


@pytest.mark.parametrize("extra", [{}, {"use_dora": True}, {"use_rslora": True}])
def test_peft_s_rank_and_alpha_patterns_load_with_peft_s_numbers(extra, tiny_llama, tmp_path):
    """Per-module ranks and alphas (peft's rank_pattern / alpha_pattern, which axolotl writes too): each module's
    rank and scaling as peft gives them (first matching key, matched at the end of the path), unmerged and
    merged. They were refused."""
    from peftkit.adapters import adapter_layers
    from peftkit.merge import merge_adapter

    adapter = _peft_lora(tiny_llama, tmp_path / "a", target_modules=["q_proj", "v_proj", "o_proj"], **PATTERNS, **extra)
    theirs = peft.PeftModel.from_pretrained(load_fp32(tiny_llama), adapter).eval()
    ours, cfg = load_adapted_model(str(tiny_llama), str(adapter), torch.device("cpu"))[:2]
    assert (cfg.rank_pattern, cfg.alpha_pattern) == (PATTERNS["rank_pattern"], PATTERNS["alpha_pattern"])
    layers = adapter_layers(ours)
    for name, layer in layers.items():
        reference = theirs.base_model.model.get_submodule(name)
        assert (layer.r, layer.scaling) == (reference.r["default"], reference.scaling["default"]), name
    assert {layer.r for layer in layers.values()} == {2, 4, 6}
    assert float((_logits(ours) - _logits(theirs)).abs().max()) <= 1e-5
    merged = merge_adapter(str(adapter), str(tmp_path / "merged"), base=str(tiny_llama))
    assert float((_logits(load_fp32(merged)) - _logits(theirs)).abs().max()) <= 1e-5


def test_a_recipe_s_rank_and_alpha_patterns_train_and_load_in_peft(tiny_llama, number_data, tmp_path):
    """adapter.rank_pattern / alpha_pattern in a recipe: the layers get their own rank (the file's shapes) and
    scaling, the export records both patterns, and peft loads it with peftkit's logits. A key that is no regular
    expression is refused naming it."""
    from safetensors.torch import load_file

    from peftkit.recipe import load_recipe
    from peftkit.train import train
    from tests.conftest import make_recipe

    recipe = make_recipe(tmp_path, tiny_llama, number_data, adapter={"target_modules": ["q_proj", "v_proj", "o_proj"],
                                                                     **PATTERNS}, training={"max_steps": 2})
    train(load_recipe(recipe), show_summary=False)
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["rank_pattern"], config["alpha_pattern"]) == (PATTERNS["rank_pattern"], PATTERNS["alpha_pattern"])
    shapes = {k.split("layers.")[1].split(".lora")[0]: t.shape for k, t in
              load_file(adapter / "adapter_model.safetensors").items() if "lora_A" in k}
    assert (shapes["0.self_attn.v_proj"][0], shapes["1.self_attn.v_proj"][0], shapes["0.self_attn.o_proj"][0],
            shapes["0.self_attn.q_proj"][0]) == (2, 4, 6, 4)
    ours = load_adapted_model(str(tiny_llama), str(adapter), torch.device("cpu"))[0]
    theirs = peft.PeftModel.from_pretrained(load_fp32(tiny_llama), adapter).eval()
    assert float((_logits(ours) - _logits(theirs)).abs().max()) <= 1e-5
    from peftkit.combine_adapters import combine_adapters
    from peftkit.combine_inputs import Combination

    with pytest.raises(PeftkitError, match="--method linear combines factors of one rank and scaling per adapter, "
                                           "and .* sets rank_pattern or alpha_pattern .*Use --method cat"):
        combine_adapters([str(adapter), str(adapter)], Combination(method="linear", weights=(1.0, 1.0)),
                         str(tmp_path / "linear"))
    bad = make_recipe(tmp_path / "bad", tiny_llama, number_data, adapter={"rank_pattern": {"(q_proj": 2}})
    with pytest.raises(PeftkitError, match=r"adapter.rank_pattern.*'\(q_proj' is not a regular expression"):
        load_recipe(bad)


@pytest.mark.parametrize(("adapter", "said"), [
    ({"rank_pattern": {"q_proj": 2, "q_prj": 6}},
     "adapter.rank_pattern: 'q_prj' matches none of the 4 adapted modules, so it would change nothing (every module "
     "keeps adapter.r). A key matches the end of a module's path after a dot (q_proj, v_proj), or a regex over it. "
     "Did you mean 'q_proj'?"),
    ({"alpha_pattern": {r"layers\.5\..*": 3}}, r"adapter.alpha_pattern: 'layers\\.5\\..*' matches none of the 4 "
                                              "adapted modules, so it would change nothing (every module keeps "
                                              "adapter.alpha)."),
    ({"method": "fourierft", "n_frequency": 8, "n_frequency_pattern": {"v_prj": 4}, "r": None, "alpha": None},
     "adapter.n_frequency_pattern: 'v_prj' matches none of the 4 adapted modules, so it would change nothing (every "
     "module keeps adapter.n_frequency)."),
    ({"method": "c3a", "block_size": 8, "block_size_pattern": {"v_prj": 4}, "r": None, "alpha": None},
     "adapter.block_size_pattern: 'v_prj' matches none of the 4 adapted modules, so it would change nothing (every "
     "module keeps adapter.block_size)."),
])
def test_a_recipe_s_pattern_key_that_matches_no_target_is_refused(adapter, said, tiny_llama, number_data, tmp_path,
                                                                  monkeypatch, capsys):
    """A recipe's rank_pattern / alpha_pattern / n_frequency_pattern key matching none of the adapted modules (a typo)
    was accepted by validate and train, which trained every module at adapter.r (alpha, n_frequency) without a word
    (peft passes over it too). Refused, by validate as by train; a saved adapter's such key still loads (peft's does)."""
    import yaml

    from peftkit.adapters import adapter_layers, inject_adapters
    from peftkit.methods.lora import LoraConfig
    from tests.conftest import cli_user_error, make_recipe

    recipe = make_recipe(tmp_path, tiny_llama, number_data, adapter={"target_modules": ["q_proj", "v_proj"]})
    raw = yaml.safe_load(recipe.read_text())
    raw["adapter"] = {k: v for k, v in {**raw["adapter"], **adapter}.items() if v is not None}
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    for command in ("validate", "train"):
        assert said in " ".join(cli_user_error(monkeypatch, capsys, command, str(recipe)).split())
    saved = LoraConfig(r=4, alpha=8, target_modules=["q_proj"], rank_pattern={"q_prj": 2})
    model = load_fp32(tiny_llama)
    inject_adapters(model, saved, every_entry=False)
    assert {layer.r for layer in adapter_layers(model).values()} == {4}


@pytest.mark.parametrize("layers", [{"layers_to_transform": [1]}, {"layers_to_transform": 0, "layers_pattern": "layers"}])
def test_layers_to_transform_adapts_the_layers_peft_adapts(layers, tiny_llama, number_data, tmp_path):
    """peft's layers_to_transform (with layers_pattern; an integer is one layer, 0 included): peft's adapter loads
    with its logits; a recipe's adapts the
    same modules peft picks for the same settings, and peft loads its export with peftkit's logits. Refused: with
    a regex or all-linear target_modules (as peft refuses it), and indices of no layer."""
    from peftkit.adapters import adapter_layers, inject_adapters
    from peftkit.methods.lora import LoraConfig
    from peftkit.recipe import load_recipe
    from peftkit.train import train
    from tests.conftest import make_recipe

    peft_made = _peft_lora(tiny_llama, tmp_path / "peft", **layers)
    theirs = peft.PeftModel.from_pretrained(load_fp32(tiny_llama), peft_made).eval()
    ours = load_adapted_model(str(tiny_llama), str(peft_made), torch.device("cpu"))[0]
    assert float((_logits(ours) - _logits(theirs)).abs().max()) <= 1e-5
    picked = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    assert set(adapter_layers(ours)) == picked and len(picked) == 2
    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 2},
                         adapter={"target_modules": ["q_proj", "v_proj"], **layers})
    train(load_recipe(recipe), show_summary=False)
    adapter = tmp_path / "run" / "adapter"
    ours = load_adapted_model(str(tiny_llama), str(adapter), torch.device("cpu"))[0]
    assert set(adapter_layers(ours)) == picked
    theirs = peft.PeftModel.from_pretrained(load_fp32(tiny_llama), adapter).eval()
    assert float((_logits(ours) - _logits(theirs)).abs().max()) <= 1e-5
    with pytest.raises(PeftkitError, match=r"layers_to_transform \[5\] leaves none of the 4 target modules: their "
                                           r"layers are numbered 0 to 1"):
        inject_adapters(load_fp32(tiny_llama), LoraConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=[5]))
    bad = make_recipe(tmp_path / "bad", tiny_llama, number_data, adapter=layers)  # all-linear
    with pytest.raises(PeftkitError, match=r"adapter.layers_to_transform picks among the modules of a list of "
                                           r"target_modules; with target_modules 'all-linear'"):
        load_recipe(bad)


LAYER_METHODS = {  # peft's config class, its settings, and peftkit's adapter section, for each method with layers
    "loha": ("LoHaConfig", {"r": 2, "alpha": 4}, {"r": 2, "alpha": 4}),
    "lokr": ("LoKrConfig", {"r": 2, "alpha": 4}, {"r": 2, "alpha": 4}),
    "vera": ("VeraConfig", {"r": 8}, {"r": 8}),
    "adalora": ("AdaLoraConfig", {"init_r": 4, "target_r": 2, "total_step": 10}, {"init_r": 4, "target_r": 2}),
    "oft": ("OFTConfig", {"r": 0, "oft_block_size": 4}, {"r": 0, "oft_block_size": 4}),
    "hra": ("HRAConfig", {"r": 4, "init_weights": False}, {"r": 4}),
    "boft": ("BOFTConfig", {"boft_block_size": 4}, {"boft_block_size": 4}),
    "fourierft": ("FourierFTConfig", {"n_frequency": 16}, {"n_frequency": 16}),
    "randlora": ("RandLoraConfig", {"r": 4, "randlora_alpha": 8}, {"r": 4, "randlora_alpha": 8}),
    "vblora": ("VBLoRAConfig", {"vector_length": 8, "num_vectors": 12}, {"vector_length": 8, "num_vectors": 12}),
    "miss": ("MissConfig", {"r": 4, "init_weights": False}, {"r": 4}),
    "delora": ("DeloraConfig", {"r": 2, "init_weights": False}, {"r": 2}),
    "hira": ("HiraConfig", {"r": 2, "init_weights": False}, {"r": 2}),
    "c3a": ("C3AConfig", {"block_size": 16}, {"block_size": 16}),
    "gralora": ("GraloraConfig", {"r": 4, "init_weights": False}, {"r": 4}),
    "deft": ("DeftConfig", {"r": 2, "init_weights": False}, {"r": 2}),
    "peanut": ("PeanutConfig", {"r": 4, "init_weights": False}, {"r": 4}),
    "pvera": ("PveraConfig", {"r": 4, "init_weights": False}, {"r": 4}),
    "tinylora": ("TinyLoraConfig", {"u": 4, "init_weights": "uniform"}, {"u": 4}),
    "psoft": ("PsoftConfig", {"r": 2, "init_weights": False}, {"r": 2}),
    "unilora": ("UniLoraConfig", {"r": 2, "theta_d_length": 32, "init_weights": False}, {"r": 2, "theta_d_length": 32}),
    "lily": ("LilyConfig", {"r": 2, "init_weights": False}, {"r": 2}),
    "frod": ("FrodConfig", {"init_weights": False, "progressbar": False}, {}),
    "waveft": ("WaveFTConfig", {"n_frequency": 16, "wavelet_family": "sym2", "init_weights": False},
               {"n_frequency": 16, "wavelet_family": "sym2"}),
    "adamss": ("AdamssConfig", {"r": 8, "num_subspaces": 3, "init_weights": None}, {"r": 8, "num_subspaces": 3}),
}


@pytest.mark.parametrize("method", sorted(LAYER_METHODS))
def test_layers_to_transform_picks_peft_s_layers_for_every_method(method, tiny_llama, tmp_path):
    """layers_to_transform and layers_pattern are every method's whose peft config has them (it was LoRA's alone,
    and peft's LoHa, LoKr, VeRA, AdaLoRA and OFT adapters with it were refused; peft's IA3 has none): peft's adapter (moved far from identity)
    loads with peft's modules and logits, and peftkit's adapter on the same settings adapts the modules peft picks
    and loads in peft with peftkit's logits."""
    from peftkit.adapters import adapter_layers
    from peftkit.methods import method_of
    from pydantic import TypeAdapter

    from peftkit.methods import AdapterConfig
    from tests.conftest import save_random_adapter

    kind, theirs_settings, ours_settings = LAYER_METHODS[method]
    layers = {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": 1, "layers_pattern": "layers"}
    torch.manual_seed(0)
    made = get_peft_model(load_fp32(tiny_llama), getattr(peft, kind)(task_type="CAUSAL_LM", **layers, **theirs_settings))
    with torch.no_grad():
        for p in made.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape) * 0.2)
    picked = {n.removeprefix("base_model.model.") for n, m in made.named_modules()
              if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)}
    assert picked == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    made.eval().save_pretrained(tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(load_fp32(tiny_llama), tmp_path / "peft").eval()
    ours = load_adapted_model(str(tiny_llama), str(tmp_path / "peft"), torch.device("cpu"))[0]
    assert set(adapter_layers(ours)) == picked
    assert float((_logits(ours) - _logits(tiny_base := load_fp32(tiny_llama))).abs().max()) > 1e-3
    assert float((_logits(ours) - _logits(theirs)).abs().max()) <= 1e-5

    cfg = TypeAdapter(AdapterConfig).validate_python({"method": method, **layers, **ours_settings})
    adapter = save_random_adapter(tiny_llama, cfg, tmp_path / "ours", seed=3)
    ours = load_adapted_model(str(tiny_llama), str(adapter), torch.device("cpu"))[0]
    assert set(adapter_layers(ours)) == picked and method_of(cfg).name == method
    theirs = peft.PeftModel.from_pretrained(load_fp32(tiny_llama), adapter).eval()
    assert float((_logits(ours) - _logits(tiny_base)).abs().max()) > 1e-3
    assert float((_logits(ours) - _logits(theirs)).abs().max()) <= 1e-5


@pytest.mark.parametrize("targets", ["all-linear", r".*\.(q_proj|v_proj)"])
def test_layers_to_transform_beside_all_linear_or_a_regex_is_what_peft_does(targets, tiny_llama, number_data,
                                                                              tmp_path):
    """peft applies no layers_to_transform beside a regex target_modules (it matches the regex alone) or all-linear
    (which becomes every linear layer's full path, matched before any layer index), where LoHa's config allows the
    pair (LoRA's and AdaLoRA's refuse it): peft's file, saved as peft saves it and with the string itself, loads
    with peft's modules, the string with a warning that the layers are not applied. A recipe with the pair is refused
    for every method, naming the fix (peftkit does not drop a setting it was given)."""
    from pydantic import ValidationError

    from peftkit.adapters import adapter_layers
    from peftkit.methods.adalora import AdaLoraConfig
    from peftkit.recipe import load_recipe
    from tests.conftest import make_recipe

    settings = {"target_modules": targets, "layers_to_transform": [0]}
    made = get_peft_model(load_fp32(tiny_llama), peft.LoHaConfig(task_type="CAUSAL_LM", r=2, **settings))
    tuned = {n.removeprefix("base_model.model.") for n, m in made.named_modules()
             if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)}
    assert len(tuned) == (14 if targets == "all-linear" else 4)  # both layers'
    made.save_pretrained(tmp_path / "loha")
    ours = load_adapted_model(str(tiny_llama), str(tmp_path / "loha"), torch.device("cpu"))[0]
    assert set(adapter_layers(ours)) == tuned
    _edit(tmp_path / "loha", target_modules=targets)
    kind = "'all-linear'" if targets == "all-linear" else "a regex"
    with pytest.warns(PeftkitWarning, match=rf"layers_to_transform \[0\] is not applied, because target_modules is "
                                            rf"{kind}, which peft matches alone"):
        ours = load_adapted_model(str(tiny_llama), str(tmp_path / "loha"), torch.device("cpu"))[0]
    assert set(adapter_layers(ours)) == tuned
    shown = "'all-linear'" if targets == "all-linear" else r"\{regex: "
    refused = rf"layers_to_transform picks among the modules of a list of target_modules; with target_modules {shown}"
    given = targets if targets == "all-linear" else {"regex": targets}
    for method in ("lora", "loha"):
        bad = make_recipe(tmp_path / method, tiny_llama, number_data, adapter={
            "method": method, "target_modules": given, "layers_to_transform": [0]})
        with pytest.raises(PeftkitError, match=r"recipe.yaml:\d+: .*" + refused):
            load_recipe(bad)
    with pytest.raises(ValidationError, match=refused):
        AdaLoraConfig(method="adalora", target_modules=given, layers_to_transform=[0])


EXCLUDE_METHODS = {  # peft's config class, its settings, and peftkit's adapter section: the methods with exclude_modules
    "lora": ("LoraConfig", {"r": 2}, {"r": 2}),
    "ia3": ("IA3Config", {"feedforward_modules": []}, {"feedforward_modules": []}),
    "loha": ("LoHaConfig", {"r": 2, "alpha": 4}, {"r": 2, "alpha": 4}),
    "lokr": ("LoKrConfig", {"r": 2, "alpha": 4}, {"r": 2, "alpha": 4}),
    "adalora": ("AdaLoraConfig", {"init_r": 4, "target_r": 2, "total_step": 10}, {"init_r": 4, "target_r": 2}),
    "oft": ("OFTConfig", {"r": 0, "oft_block_size": 4}, {"r": 0, "oft_block_size": 4}),
    "hra": ("HRAConfig", {"r": 4, "init_weights": False}, {"r": 4}),
    "boft": ("BOFTConfig", {"boft_block_size": 4}, {"boft_block_size": 4}),
    "fourierft": ("FourierFTConfig", {"n_frequency": 16}, {"n_frequency": 16}),
    "vblora": ("VBLoRAConfig", {"vector_length": 8, "num_vectors": 12}, {"vector_length": 8, "num_vectors": 12}),
    "miss": ("MissConfig", {"r": 4, "init_weights": False}, {"r": 4}),
    "delora": ("DeloraConfig", {"r": 2, "init_weights": False}, {"r": 2}),
    "hira": ("HiraConfig", {"r": 2, "init_weights": False}, {"r": 2}),
    "deft": ("DeftConfig", {"r": 2, "init_weights": False}, {"r": 2}),
    "peanut": ("PeanutConfig", {"r": 4, "init_weights": False}, {"r": 4}),
    "psoft": ("PsoftConfig", {"r": 2, "init_weights": False}, {"r": 2}),
    "lily": ("LilyConfig", {"r": 2, "init_weights": False}, {"r": 2}),
    "waveft": ("WaveFTConfig", {"n_frequency": 16, "init_weights": False}, {"n_frequency": 16}),
    "poly": ("PolyConfig", {"r": 2, "init_weights": False}, {"r": 2}),
}


def _far_from_identity(made: torch.nn.Module) -> set[str]:
    """Move a peft model's trained tensors far from their init; the module paths it adapts."""
    with torch.no_grad():
        for p in made.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape) * 0.2)
    return {n.removeprefix("base_model.model.") for n, m in made.named_modules()
            if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)}


@pytest.mark.parametrize("method", sorted(EXCLUDE_METHODS))
def test_exclude_modules_leaves_out_what_peft_leaves_out(method, tiny_llama, tmp_path):
    """exclude_modules (a full path, or the end of one after a dot), as peft's, for every method whose peft config
    has it (it was refused): peft's adapter loads with peft's modules and logits, and peftkit's adapter adapts the
    modules peft keeps and loads in peft with peftkit's logits, without peft's "no modules were excluded" warning
    (the export lists the kept modules and no exclude_modules)."""
    from pydantic import TypeAdapter

    from peftkit.adapters import adapter_layers
    from peftkit.methods import AdapterConfig
    from tests.conftest import save_random_adapter

    kind, theirs_settings, ours_settings = EXCLUDE_METHODS[method]
    settings = {"target_modules": ["q_proj", "v_proj"],
                "exclude_modules": ["model.layers.0.self_attn.q_proj", "layers.1.self_attn.v_proj"]}
    torch.manual_seed(0)
    made = get_peft_model(load_fp32(tiny_llama), getattr(peft, kind)(task_type="CAUSAL_LM", **settings, **theirs_settings))
    kept = _far_from_identity(made)
    assert kept == {"model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj"}
    made.eval().save_pretrained(tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(load_fp32(tiny_llama), tmp_path / "peft").eval()
    ours = load_adapted_model(str(tiny_llama), str(tmp_path / "peft"), torch.device("cpu"))[0]
    assert set(adapter_layers(ours)) == kept
    base = _logits(load_fp32(tiny_llama))
    assert float((_logits(ours) - base).abs().max()) > 1e-3
    assert float((_logits(ours) - _logits(theirs)).abs().max()) <= 1e-5

    cfg = TypeAdapter(AdapterConfig).validate_python({"method": method, **settings, **ours_settings})
    adapter = save_random_adapter(tiny_llama, cfg, tmp_path / "ours", seed=3)
    ours = load_adapted_model(str(tiny_llama), str(adapter), torch.device("cpu"))[0]
    assert set(adapter_layers(ours)) == kept
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(load_fp32(tiny_llama), adapter).eval()
    assert not [w for w in seen if "exclude" in str(w.message)]
    assert float((_logits(ours) - base).abs().max()) > 1e-3
    assert float((_logits(ours) - _logits(theirs)).abs().max()) <= 1e-5


def test_exclude_modules_as_a_regex_and_its_mistakes(tiny_llama, number_data, tmp_path):
    """A string exclude_modules in a file is a regex matched against the full path (peft's re.fullmatch), as
    {regex: ...} in a recipe. A recipe's entry that names no module of the model is a typo, refused with the names
    there are (peft only warns), also where target_modules is the architecture's default; one naming a module that
    is no target (lm_head beside all-linear) passes, as in peft. Leaving out every target is refused, as peft
    refuses it. IA3's feedforward_modules name targets before exclusion (peft's subset of target_modules)."""
    from peftkit.adapters import adapter_layers, inject_adapters
    from peftkit.methods.ia3 import IA3Config
    from peftkit.methods.lora import LoraConfig

    adapter = _peft_lora(tiny_llama, tmp_path / "regex", exclude_modules=r".*layers\.0\..*")
    theirs = peft.PeftModel.from_pretrained(load_fp32(tiny_llama), adapter).eval()
    ours = load_adapted_model(str(tiny_llama), str(adapter), torch.device("cpu"))[0]
    assert set(adapter_layers(ours)) == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    assert float((_logits(ours) - _logits(theirs)).abs().max()) <= 1e-5
    cfg = LoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules={"regex": r".*layers\.0\..*"})
    assert set(inject_adapters(load_fp32(tiny_llama), cfg)) == set(adapter_layers(ours))
    assert len(inject_adapters(load_fp32(tiny_llama), LoraConfig(exclude_modules=["lm_head", "down_proj"]))) == 12
    ia3 = IA3Config(method="ia3", target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"],
                    exclude_modules=["down_proj"])
    assert set(inject_adapters(load_fp32(tiny_llama), ia3)) == {f"model.layers.{i}.self_attn.v_proj" for i in (0, 1)}

    for settings, message in (
            ({"exclude_modules": ["v_proj", "q_prj"]}, r"adapter.exclude_modules entry 'q_prj' names no module of "
                                                       r"this model; fix it or remove it. Did you mean 'q_proj'\?"),
            ({"exclude_modules": {"regex": r".*\.kv_proj"}}, r"adapter.exclude_modules \{regex: .*\} matches no "
                                                             r"module of this model"),
            ({"exclude_modules": ["q_proj", "v_proj"]}, r"adapter.exclude_modules leaves out all 4 target modules, "
                                                        r"so nothing would be adapted")):
        with pytest.raises(PeftkitError, match=message):
            inject_adapters(load_fp32(tiny_llama), LoraConfig(target_modules=["q_proj", "v_proj"], **settings))
    with pytest.raises(PeftkitError, match=r"entry 'down_prj' names no module of this model"):
        inject_adapters(load_fp32(tiny_llama), IA3Config(method="ia3", exclude_modules=["down_prj"]))  # (targets: null)


def test_init_from_a_peft_adapter_whose_exclude_modules_names_nothing_trains(tiny_llama, number_data, tmp_path):
    """peft saves an exclude_modules entry that excluded nothing (it only warns); a run starting from that adapter
    (init_from) trains, where its memory estimate refused the file's entry as if the recipe had it."""
    import yaml

    from peftkit.recipe import load_recipe
    from peftkit.train import train
    from tests.conftest import make_recipe

    adapter = _peft_lora(tiny_llama, tmp_path / "peft", exclude_modules=["zzz", "model.layers.0.self_attn.q_proj"])
    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 1})
    text = yaml.safe_load(recipe.read_text())
    text["adapter"] = {"init_from": str(adapter)}
    recipe.write_text(yaml.safe_dump(text))
    train(load_recipe(recipe), show_summary=False)
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj",
                                                "model.layers.1.self_attn.v_proj"]


def test_layers_to_transform_edge_cases_follow_peft(tiny_llama, number_data, tmp_path):
    """An empty list picks no layers out (all adapted, as peft); a module's full path in target_modules is adapted
    whatever its layer (peft matches it first); a layers_pattern that is no regular expression is refused, in a
    file and in a recipe, naming it (it was a raw re.error)."""
    from peftkit.adapters import adapter_layers
    from peftkit.recipe import load_recipe
    from tests.conftest import make_recipe

    for name, settings in (("empty", {"layers_to_transform": []}),
                           ("path", {"target_modules": ["model.layers.0.self_attn.q_proj", "v_proj"],
                                     "layers_to_transform": [1]})):
        adapter = _peft_lora(tiny_llama, tmp_path / name, **settings)
        theirs = peft.PeftModel.from_pretrained(load_fp32(tiny_llama), adapter).eval()
        ours = load_adapted_model(str(tiny_llama), str(adapter), torch.device("cpu"))[0]
        assert set(adapter_layers(ours)) == {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                                             if hasattr(m, "lora_A")}
        assert float((_logits(ours) - _logits(theirs)).abs().max()) <= 1e-5
    _edit(adapter, layers_pattern="(lay")
    with pytest.raises(PeftkitError, match=r'"layers_pattern" is "\(lay": .\(lay. is not a regular expression'):
        load_adapter(adapter)
    layers = {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": "(l"}
    recipe = make_recipe(tmp_path, tiny_llama, number_data, adapter=layers)
    with pytest.raises(PeftkitError, match=r"adapter.layers_pattern.*'\(l' is not a regular expression"):
        load_recipe(recipe)
