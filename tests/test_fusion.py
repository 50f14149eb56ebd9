"""AdapterFusion (`peftkit.methods.fusion`): training moves the fusion parameters and nothing else; with W_v = I
and uniform attention a site outputs the mean of what the adapters output alone (checked against the adapters
loaded one at a time, and against a dense model built by hand); export -> reload gives the same logits; bad
input is a clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peftkit.adapters import PEFT_PREFIX, adapter_layers, inject_adapters, trainable_parameters
from peftkit.adapters.state_dicts import adapter_state_dict
from peftkit.errors import PeftkitError
from peftkit.methods.bottleneck import BottleneckConfig
from peftkit.methods.fusion import FusionConfig, FusionLayer
from peftkit.methods.ia3 import IA3Config
from peftkit.methods.lora import LoraConfig
from peftkit.methods.oft import OftConfig
from peftkit.methods.prompt_tuning import PromptTuningConfig
from peftkit.adapter_base import load_adapted_model
from peftkit.peft_format import peft_config, save_adapter
from tests.conftest import cli_user_error, make_recipe, random_adapters, save_random_adapter

IDS = torch.tensor([[1, 40, 41, 42, 7, 60, 61, 62], [1, 55, 12, 80, 81, 3, 47, 2]])


def _base(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _source(model_path: Path, cfg, out: Path, seed: int) -> Path:
    """An adapter far from identity (random weights), saved as `peftkit train` exports it."""
    return save_random_adapter(model_path, cfg, out, seed)


@pytest.fixture(scope="module")
def sources(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fusion-sources")
    return {
        "lora-a": _source(tiny_llama, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
                          root / "lora-a", 1),
        "lora-b": _source(tiny_llama, LoraConfig(r=2, alpha=2, target_modules=["q_proj", "o_proj"]), root / "lora-b",
                          2),
        "ia3": _source(tiny_llama, IA3Config(method="ia3"), root / "ia3", 3),  # k, v, down_proj (input-scaled)
        "dora": _source(tiny_llama, LoraConfig(r=2, alpha=4, use_dora=True, target_modules=["q_proj", "up_proj"]),
                        root / "dora", 6),
        "oft": _source(tiny_llama, OftConfig(method="oft", oft_block_size=4, target_modules=["q_proj", "v_proj"]),
                       root / "oft", 7),
        "bn-a": _source(tiny_llama, BottleneckConfig(method="bottleneck", reduction_factor=4, after="both"),
                        root / "bn-a", 4),
        "bn-b": _source(tiny_llama, BottleneckConfig(method="bottleneck", reduction_factor=8, non_linearity="gelu",
                                                     after="ffn"), root / "bn-b", 5),
    }


def _fusion(model_path: Path, dirs: list[Path], **settings):
    model = _base(model_path)
    torch.manual_seed(0)
    cfg = FusionConfig(method="fusion", fuse=[str(d) for d in dirs], **settings)
    return model, cfg, inject_adapters(model, cfg)


def _uniform(model) -> None:
    """Zero W_q, W_k and their biases: every score is 0, so the attention is uniform."""
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            if isinstance(layer, FusionLayer) and layer.fusion_query is not None:  # None: one adapter, p = 1
                for linear in (layer.fusion_query, layer.fusion_key):
                    linear.weight.zero_()
                    linear.bias.zero_()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


# IA3 scales k and v's outputs but down_proj's input, OFT rotates the input, DoRA rescales the base output: the
# fused layers hand all of them the base output they would compute, or let them compute their own.
KINDS = {"weight-update": ["lora-a", "lora-b", "ia3"], "dora-oft": ["dora", "oft", "lora-a"],
         "bottleneck": ["bn-a", "bn-b"]}


@pytest.mark.parametrize("kind", KINDS)
def test_uniform_identity_fusion_is_the_mean_of_the_adapters_alone(kind, sources, tiny_llama):
    """W_v = I, uniform attention: each site outputs y + mean_i (out_i - y) over the adapters at that site, out_i
    the output of the same module in a model with adapter i loaded alone (peftkit eval's path)."""
    names = KINDS[kind]
    model, _, targets = _fusion(tiny_llama, [sources[n] for n in names])
    _uniform(model)
    alone = [load_adapted_model(None, str(sources[n]))[0] for n in names]
    base = _base(tiny_llama)
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for path in targets:
        fused = model.get_submodule(path)
        width = base.config.hidden_size if kind == "bottleneck" else base.get_submodule(path).in_features
        x = torch.randn(2, 5, width, generator=gen)
        kwargs = _attention_kwargs(base, x) if path.endswith("self_attn") else {}
        with torch.no_grad():
            y = _first(base.get_submodule(path)(x, **kwargs))
            outs = [_first(m.get_submodule(path)(x, **kwargs)) for m, n in zip(alone, names)
                    if path in _adapted(m)]
            expected = y + torch.stack([o - y for o in outs]).mean(0)
            got = _first(fused(x, **kwargs))
        assert len(outs) == len(fused.fused) >= 1
        assert (expected - y).abs().max() > 1e-3  # the adapters do change the output
        worst = max(worst, float((got - expected).abs().max()))
    assert worst <= 1e-5, worst
    assert len({len(model.get_submodule(p).fused) for p in targets}) > 1  # sites with 1, 2 and 3 adapters


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _adapted(model) -> set[str]:
    return set(adapter_layers(model))


def _attention_kwargs(base, x: torch.Tensor) -> dict:
    """What a Llama decoder layer passes its attention block (rotary embeddings; no mask: causal by default)."""
    positions = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
    return {"position_embeddings": base.model.rotary_emb(x, positions), "attention_mask": None}


def test_uniform_identity_lora_fusion_equals_a_dense_model_built_by_hand(sources, tiny_llama):
    """Two LoRAs fused with W_v = I and uniform attention: W + mean of s_i B_i A_i on the layers both adapt, W + s B A
    / 1 where one does (a site's mean is over its own adapters): the logits of a plain model with those weights."""
    model, _, _ = _fusion(tiny_llama, [sources["lora-a"], sources["lora-b"]])
    _uniform(model)
    dense = _base(tiny_llama)
    weights = dense.state_dict()
    updates: dict[str, list[torch.Tensor]] = {}
    for name in ("lora-a", "lora-b"):
        state = load_file(sources[name] / "adapter_model.safetensors")
        config = json.loads((sources[name] / "adapter_config.json").read_text())
        for key, a in state.items():
            if key.endswith("lora_A.weight"):
                module = key[len(PEFT_PREFIX):-len(".lora_A.weight")]
                b = state[key.replace("lora_A", "lora_B")]
                updates.setdefault(module, []).append(config["lora_alpha"] / config["r"] * b @ a)
    for module, deltas in updates.items():
        weights[f"{module}.weight"] = weights[f"{module}.weight"] + torch.stack(deltas).mean(0)
    dense.load_state_dict(weights)
    assert {len(d) for d in updates.values()} == {1, 2}
    diff = float((_logits(model) - _logits(dense)).abs().max())
    assert diff <= 1e-5, diff
    assert float((_logits(dense) - _logits(_base(tiny_llama))).abs().max()) > 1e-2


@pytest.mark.parametrize("kind", KINDS)
def test_export_and_reload_give_the_same_logits(kind, sources, tiny_llama, tmp_path):
    """Random fusion parameters, exported as training does; the reload (peftkit eval's path) computes the same
    logits bit for bit, and the export holds copies of the fused adapters (it reloads with the sources gone)."""
    import shutil

    dirs = [tmp_path / n for n in KINDS[kind]]
    for n, d in zip(KINDS[kind], dirs):
        shutil.copytree(sources[n], d)
    model, cfg, targets = _fusion(tiny_llama, dirs, temperature=True)
    random_adapters(model, seed=7, std=0.3)  # the fusion parameters only (its `randomize`)
    save_adapter(tmp_path / "fusion", adapter_state_dict(model, []),
                 peft_config(cfg, targets, str(tiny_llama), False, model.config.model_type))
    for d in dirs:
        shutil.rmtree(d)
    from peftkit.inspect import inspect_adapter

    info = inspect_adapter(tmp_path / "fusion")
    assert info["peftkit_reads"]["ok"] and info["targets"]["count"] == len(targets)
    assert info["trainable_params"] == sum(p.numel() for p in trainable_parameters(model))  # not the fused copies
    reloaded, loaded_cfg, *_ = load_adapted_model(None, str(tmp_path / "fusion"))
    assert torch.equal(_logits(model), _logits(reloaded))
    assert loaded_cfg.temperature and loaded_cfg.fuse == [str(d) for d in dirs]
    assert float((_logits(reloaded) - _logits(_base(tiny_llama))).abs().max()) > 1e-2


def test_training_changes_the_fusion_parameters_and_nothing_else(sources, tiny_llama, number_data, tmp_path,
                                                                 monkeypatch):
    """`peftkit train` with method: fusion, the trained model taken as it is exported: every base tensor and every
    fused adapter tensor is bit-identical to its file, every trained fusion tensor moved from its initial value,
    and the export's copies of the fused adapters are their files' tensors."""
    import peftkit.finish
    from peftkit.eval_job import eval_job
    from peftkit.evaluate import evaluate
    from peftkit.recipe import load_recipe
    from peftkit.train import train

    trained_models = []
    real_export = peftkit.finish.export
    monkeypatch.setattr(peftkit.finish, "export", lambda model, *a, **k: trained_models.append(model) or
                        real_export(model, *a, **k))
    names = ["lora-a", "ia3"]
    adapter = {"method": "fusion", "fuse": [str(sources[n]) for n in names]}
    recipe = make_recipe(tmp_path, tiny_llama, number_data, adapter=adapter, training={"max_steps": 3, "lr": 1e-2})
    _rewrite_adapter(recipe, adapter)
    summary = train(load_recipe(recipe), show_summary=False)
    (model,) = trained_models
    base = dict(_base(tiny_llama).named_parameters())
    files = [load_file(sources[n] / "adapter_model.safetensors") for n in names]
    initial_model, _, _ = _fusion(tiny_llama, [sources[n] for n in names])  # the same seed as the run's
    initial = dict(initial_model.named_parameters())
    counts = {"base": 0, "fused": 0, "fusion": 0}
    for name, p in model.named_parameters():
        if ".fused." in name:  # <site>.fused.<i>.<suffix>: adapter i's tensor <site>.<suffix> in its file
            site, rest = name.split(".fused.")
            i, suffix = rest.split(".", 1)
            assert torch.equal(p, files[int(i)][f"{PEFT_PREFIX}{site}.{suffix}"]), name
            counts["fused"] += 1
        elif ".fusion_" in name:
            assert p.requires_grad and not torch.equal(p, initial[name]), name
            counts["fusion"] += 1
        else:
            assert torch.equal(p, base[name.replace(".base_layer", "")]), name
            counts["base"] += 1
    assert counts["base"] == len(base) and counts["fused"] == sum(len(f) for f in files)
    assert counts["fusion"] == len(trainable_parameters(model))
    # Sites one adapter alone adapts (q: LoRA, k: IA3) have W_v only; those of both (v, down), W_q and W_k too.
    assert {n.rsplit(".", 3)[1] for n, _ in model.named_parameters() if ".fusion_query." in n} == \
        {"v_proj", "down_proj"} and len([n for n, _ in model.named_parameters() if ".fusion_value." in n]) == 8
    assert summary["trainable_params"] == sum(p.numel() for p in trainable_parameters(initial_model))
    exported = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    for i, file in enumerate(files):
        copies = {k.replace(f".fused.{i}.", "."): v for k, v in exported.items() if f".fused.{i}." in k}
        assert set(copies) == set(file) and all(torch.equal(v, file[k]) for k, v in copies.items())
    # The export, reloaded by `peftkit eval RUN`, has the run's final eval loss.
    assert evaluate(eval_job(tmp_path / "run", [], None, None, None, None, None, None, None))["loss"] == \
        pytest.approx(summary["eval_loss"], abs=1e-6)


def test_a_run_on_a_base_scaled_otherwise_than_its_adapters_is_refused(sources, tiny_llama, number_data, tmp_path):
    """model.rope_scaling set where the fused adapters were trained unscaled: their updates met a base scaled another
    way, and the run trained on without a word."""
    from peftkit.recipe import load_recipe
    from peftkit.train import train

    adapter = {"method": "fusion", "fuse": [str(sources[n]) for n in ("lora-a", "lora-b")]}
    recipe = make_recipe(tmp_path, tiny_llama, number_data, adapter=adapter, training={"max_steps": 1})
    _rewrite_adapter(recipe, adapter)
    with pytest.raises(PeftkitError, match=r"^adapter.fuse: the adapters were trained with RoPE scaling none \(their "
                                           r"peftkit.json\), and model.rope_scaling is linear x2.0. AdapterFusion needs"):
        train(load_recipe(recipe, ["model.rope_scaling={type: linear, factor: 2}"]), show_summary=False)


def test_a_run_on_other_4_bit_weights_than_its_adapters_is_refused(sources, tiny_llama, number_data, tmp_path):
    """Adapters trained against an NF4 base quantized from bf16 weights, fused over the recipe's NF4 base quantized
    from fp32 (other 4-bit codes): check_model saw a quantized base, and the run trained without a word. Refused now
    by fusion_sources.check_quantization, the check of X-LoRA's experts against the recipe's quantization."""
    from peftkit.recipe import load_recipe
    from peftkit.train import train

    adapter = {"method": "fusion", "fuse": _recorded_as_nf4(sources, tmp_path, "bfloat16")}
    recipe = make_recipe(tmp_path, tiny_llama, number_data, adapter=adapter, training={"max_steps": 1},
                         quantization={"compute_dtype": "float32"})
    _rewrite_adapter(recipe, adapter)
    with pytest.raises(PeftkitError, match=r"^adapter.fuse: .*lora-a was trained against a base quantized from bfloat16 "
                                           r"weights \(its peftkit.json base_dtype\), and model.dtype is float32: "
                                           "other 4-bit weights. AdapterFusion needs .* set model.dtype: bfloat16"):
        train(load_recipe(recipe), show_summary=False)


@pytest.mark.parametrize("trained_on", ["nf4", "unquantized"])
def test_validate_says_train_s_refusal_of_another_quantization(trained_on, sources, tiny_llama, number_data,
                                                                tmp_path, monkeypatch, capsys):
    """Adapters trained against an NF4 base fused over the recipe's unquantized one, or trained unquantized and fused
    over its NF4: train refused both once the model had loaded, and `peftkit validate` said the recipe was valid (its
    empty model cannot tell). Both now decide from the recipe's quantization section, in one message."""
    from tests.conftest import unplaced

    fuse = [str(sources[n]) for n in ("lora-a", "lora-b")]
    sections = {"quantization": {"compute_dtype": "float32"}} if trained_on == "unquantized" else {}
    if trained_on == "nf4":
        fuse = _recorded_as_nf4(sources, tmp_path, "float32")
    adapter = {"method": "fusion", "fuse": fuse}
    recipe = make_recipe(tmp_path, tiny_llama, number_data, adapter=adapter, training={"max_steps": 1}, **sections)
    _rewrite_adapter(recipe, adapter)
    said = {command: " ".join(unplaced(cli_user_error(monkeypatch, capsys, command, str(recipe)), recipe).split())
            for command in ("validate", "train")}
    assert said["validate"] == said["train"], said
    trained, recipe_does = ("a 4/8-bit", "does not quantize") if trained_on == "nf4" else ("an unquantized", "quantizes")
    assert (f"error: adapter.fuse: the adapters were trained against {trained} base, and this recipe {recipe_does} "
            "it; set the quantization section as they were trained (their peftkit.json records it).") in \
        said["train"], said


def test_a_moved_run_with_its_adapters_gone_loads_as_it_was(sources, tiny_llama, number_data, tmp_path):
    """An AdapterFusion's export holds copies of the fused adapters' tensors and configs (not references to their
    directories), so a run directory moved elsewhere, the fused adapters' own directories deleted, loads with the
    run's logits bit for bit, and `peftkit eval RUN_DIR` (whose recipe.yaml names the deleted directories) gives the
    run's final eval loss; nothing under the export names another directory but as the record of `fused[i].source`.
    Passes on the code as it was (checked: no fix needed; X-LoRA's export needed its experts' copies)."""
    from peftkit.eval_job import eval_job
    from peftkit.evaluate import evaluate
    from peftkit.recipe import load_recipe
    from peftkit.train import train

    fuse = [str(shutil.copytree(sources[n], tmp_path / "adapters" / n)) for n in ("lora-a", "ia3")]
    adapter = {"method": "fusion", "fuse": fuse}
    recipe = make_recipe(tmp_path / "a", tiny_llama, number_data, adapter=adapter, training={"max_steps": 2})
    _rewrite_adapter(recipe, adapter)
    summary = train(load_recipe(recipe), show_summary=False)
    expected = _logits(load_adapted_model(None, str(tmp_path / "a" / "run" / "adapter"))[0])
    assert float((expected - _logits(_base(tiny_llama))).abs().max()) > 1e-2
    moved = tmp_path / "elsewhere" / "run"
    shutil.move(tmp_path / "a" / "run", moved)
    shutil.rmtree(tmp_path / "adapters")
    assert sorted(p.name for p in (moved / "adapter").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "peftkit.json"]
    assert [f["source"] for f in json.loads((moved / "adapter" / "adapter_config.json").read_text())["fused"]] == fuse
    assert torch.equal(_logits(load_adapted_model(None, str(moved / "adapter"))[0]), expected)
    assert evaluate(eval_job(moved, [], None, None, None, None, None, None, None))["loss"] == \
        pytest.approx(summary["eval_loss"], abs=1e-6)


def _rewrite_adapter(recipe: Path, adapter: dict) -> None:
    import yaml

    data = yaml.safe_load(recipe.read_text())
    recipe.write_text(yaml.safe_dump(data | {"adapter": adapter}, sort_keys=False))


# ------------------------------------------------------------------------------------------------ bad input


def _error(tiny_llama, dirs) -> str:
    with pytest.raises(PeftkitError) as e:
        _fusion(tiny_llama, dirs)
    return str(e.value)


def test_refuses_what_it_cannot_fuse(sources, tiny_llama, tiny_gpt2, tmp_path):
    assert "adapter.fuse[1]" in (msg := _error(tiny_llama, [sources["lora-a"], tmp_path / "nope"])) and \
        "is not a directory" in msg
    mixed = _error(tiny_llama, [sources["lora-a"], sources["bn-a"]])
    assert "mixes bottleneck adapters" in mixed and "Fuse adapters of one kind" in mixed
    prompt = _source(tiny_llama, PromptTuningConfig(method="prompt_tuning", num_virtual_tokens=2), tmp_path / "pt", 1)
    msg = _error(tiny_llama, [sources["lora-a"], prompt])
    assert "adapter.fuse[1]" in msg and "is a Prompt tuning adapter" in msg and "lora, ia3" in msg.lower()
    parallel = _source(tiny_llama, BottleneckConfig(method="bottleneck", placement="parallel"), tmp_path / "par", 1)
    assert "mixes serial and parallel" in _error(tiny_llama, [sources["bn-a"], parallel])
    gpt2 = _source(tiny_gpt2, LoraConfig(r=2, alpha=2), tmp_path / "gpt2", 1)
    assert "AdapterFusion combines adapters of one base model" in _error(tiny_llama, [sources["lora-a"], gpt2])
    assert "set model.name_or_path to it" in _error(tiny_llama, [gpt2, gpt2])
    scaled = tmp_path / "scaled"  # lora-b, recorded as trained on the base RoPE-scaled: fused without a word before
    shutil.copytree(sources["lora-b"], scaled)
    meta = json.loads((scaled / "peftkit.json").read_text()) | {"rope_scaling": {"type": "linear", "factor": 2.0}}
    (scaled / "peftkit.json").write_text(json.dumps(meta))
    assert f"{sources['lora-a']} was trained with RoPE scaling none, adapter.fuse[1] {scaled} with linear x2.0" in \
        (msg := _error(tiny_llama, [sources["lora-a"], scaled])) and "one base, scaled one way" in msg
    from peftkit.recipe import QuantizationConfig

    quantized = []  # one NF4 base quantized from bf16 and from fp32 weights: other 4-bit codes, fused before
    for name, dtype in (("lora-a", "bfloat16"), ("lora-b", None)):
        shutil.copytree(sources[name], tmp_path / f"{name}-nf4")
        meta = json.loads((tmp_path / f"{name}-nf4" / "peftkit.json").read_text())
        meta |= {"quantization": QuantizationConfig().model_dump(), "quantized_on": "cpu", "base_dtype": dtype}
        (tmp_path / f"{name}-nf4" / "peftkit.json").write_text(json.dumps(meta))
        quantized.append(tmp_path / f"{name}-nf4")
    from peftkit.modeling import load_model
    from peftkit.recipe import ModelConfig

    nf4 = load_model(ModelConfig(name_or_path=str(tiny_llama)), QuantizationConfig(), torch.device("cpu"))
    with pytest.raises(PeftkitError) as e:
        inject_adapters(nf4, FusionConfig(method="fusion", fuse=[str(d) for d in quantized]))
    assert f"{quantized[0]} was trained against a base quantized from bfloat16, adapter.fuse[1] {quantized[1]} from " \
        "float32" in str(e.value)
    with pytest.raises(ValueError, match="lists 1 adapter directory; AdapterFusion combines at least 2"):
        FusionConfig(method="fusion", fuse=[str(sources["lora-a"])])


def test_recipe_and_merge_refuse(sources, tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    """export.merged is a recipe error; `peftkit merge` of a fusion export says why and what to do instead."""
    from peftkit.recipe import load_recipe

    adapter = {"method": "fusion", "fuse": [str(sources["lora-a"])]}
    recipe = make_recipe(tmp_path, tiny_llama, number_data, adapter=adapter, export={"merged": True})
    _rewrite_adapter(recipe, adapter)
    with pytest.raises(PeftkitError) as e:
        load_recipe(recipe)
    assert "adapter.fuse" in str(e.value) and "at least 2" in str(e.value)
    a = sources["lora-a"]
    twice = "adapter.fuse=" + json.dumps([str(sources["ia3"]), str(a), f"{a.parent}/./{a.name}"])  # one, spelled 2 ways
    with pytest.raises(PeftkitError, match=r"--set adapter.fuse.*: adapter.fuse\[2\] is adapter.fuse\[1\] again .*List "
                                           "each adapter directory once"):
        load_recipe(recipe, [twice, "export.merged=false"])
    two = "adapter.fuse=" + json.dumps([str(sources["lora-a"]), str(sources["ia3"])])
    with pytest.raises(PeftkitError, match="AdapterFusion adapters .method: fusion. add computation"):
        load_recipe(recipe, [two])
    with pytest.raises(PeftkitError, match="an AdapterFusion starts from the adapters adapter.fuse lists"):
        load_recipe(recipe, [two, "export.merged=false", f"adapter.init_from={sources['lora-a']}"])
    model, cfg, targets = _fusion(tiny_llama, [sources["lora-a"], sources["ia3"]])
    save_adapter(tmp_path / "fusion", adapter_state_dict(model, []),
                 peft_config(cfg, targets, str(tiny_llama), False, model.config.model_type))
    err = cli_user_error(monkeypatch, capsys, "merge", "--adapter", str(tmp_path / "fusion"), "--output",
                         str(tmp_path / "merged"))
    assert "cannot be merged" in err and "--adapter DIR" in err
    config_file = tmp_path / "fusion" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(config | {"fused": config["fused"][:1]}))
    with pytest.raises(PeftkitError, match='"fused" lists 1 adapters; an AdapterFusion has at least 2'):
        load_adapted_model(None, str(tmp_path / "fusion"))


def test_generation_is_cache_free_greedy(sources, tiny_llama):
    """Batched, cached generation through fused attention blocks (the KV cache passes through them) gives the
    tokens of one full forward per new token. (Fused linear layers act per token: nothing cached to get wrong.)"""
    from transformers import AutoTokenizer

    from tests.test_generate import _check_matches_reference

    model, _, _ = _fusion(tiny_llama, [sources[n] for n in KINDS["bottleneck"]])
    random_adapters(model, seed=3, std=0.3)
    _check_matches_reference(model.eval(), AutoTokenizer.from_pretrained(tiny_llama))


def test_trainer_anneals_the_temperature_and_regularizes_the_value(sources, tiny_llama):
    """temperature: T = 50 - 0.05 x step, down to 1, while training (evaluation at T = 1), kept by a checkpoint; the
    regulariser is 0.01 x sum of ||I - W_v||^2 over the sites, by hand."""
    from peftkit.methods.fusion import Fusion

    model, cfg, _ = _fusion(tiny_llama, [sources["bn-a"], sources["bn-b"]], temperature=True)
    layers = [m for m in model.modules() if isinstance(m, FusionLayer)]
    trainer = Fusion.trainer(model, cfg, 10)
    assert {layer.temperature for layer in layers} == {50.0}
    trainer.after_step(100)
    assert {layer.temperature for layer in layers} == {45.0}
    state = trainer.state_dict()
    trainer.after_step(2000)
    assert {layer.temperature for layer in layers} == {1.0}
    trainer.load_state_dict(state)
    assert {layer.temperature for layer in layers} == {45.0}
    model.eval()
    assert torch.equal(_logits(model), _logits(_with_temperature(model, layers, 1.0)))
    assert trainer.regularizer() == 0  # W_v starts at the identity
    random_adapters(model, seed=2, std=0.1)
    values = [layer.fusion_value.weight.detach() for layer in layers]
    expected = 0.01 * sum(float(((torch.eye(v.shape[0]) - v) ** 2).sum()) for v in values)
    assert float(trainer.regularizer().detach()) == pytest.approx(expected, rel=1e-6) and expected > 0


def _with_temperature(model, layers: list[FusionLayer], temperature: float):
    for layer in layers:
        layer.temperature = temperature
    return model


def test_the_base_layer_runs_once_per_site(sources, tiny_llama):
    """The fused layers get the base output back for the input it ran on: one base call per site for LoRA and
    output-scaled IA3 (k, v), one more for input-scaled IA3 (down_proj: the base runs on the scaled input)."""
    model, _, targets = _fusion(tiny_llama, [sources[n] for n in KINDS["weight-update"]])
    calls: dict[str, int] = {}
    for path in targets:
        model.get_submodule(path).base_layer.register_forward_hook(
            lambda *_, path=path: calls.__setitem__(path, calls.get(path, 0) + 1))
    _logits(model)
    assert calls == {p: 2 if p.endswith("down_proj") else 1 for p in targets}


def _recorded_as_nf4(sources, root, base_dtype: str) -> list[str]:
    """Copies of lora-a and lora-b under `root` whose peftkit.json says they were trained against an NF4 base
    quantized from `base_dtype` weights: the adapters' paths."""
    from peftkit.recipe import QuantizationConfig

    copies = []
    for name in ("lora-a", "lora-b"):
        shutil.copytree(sources[name], root / name)
        meta = json.loads((root / name / "peftkit.json").read_text()) | {
            "quantization": QuantizationConfig(compute_dtype="float32").model_dump(), "base_dtype": base_dtype}
        (root / name / "peftkit.json").write_text(json.dumps(meta))
        copies.append(str(root / name))
    return copies
