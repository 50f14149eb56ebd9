"""`peftkit inspect`: the facts of our adapters and of peft's, and the vLLM verdict."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from peftkit.adapters import inject_adapters
from peftkit.adapters.state_dicts import adapter_state_dict
from peftkit.inspect import inspect_adapter
from peftkit.inspect_text import describe
from peftkit.methods import IA3Config, LohaConfig, LokrConfig, LoraConfig, VeraConfig
from peftkit.peft_format import peft_config, save_adapter
from peftkit.recipe import QuantizationConfig
from tests.conftest import cli_user_error


def _ours(base, cfg, out, quantization=None, quantized_on=None, rope_scaling=None):
    """An adapter peftkit exported (fresh init: inspect reads shapes, not values)."""
    model = AutoModelForCausalLM.from_pretrained(base)
    targets = inject_adapters(model, cfg)
    config = peft_config(cfg, targets, str(base), False, model.config.model_type)
    save_adapter(out, adapter_state_dict(model, cfg.modules_to_save), config, quantization, quantized_on,
                 rope_scaling=rope_scaling)
    return out


def _peft(base, out, **config):
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), PeftLora(task_type="CAUSAL_LM", **config))
    model.save_pretrained(out)
    return out


def test_our_lora(tiny_llama, tmp_path):
    quant = QuantizationConfig(method="nf4", compute_dtype="float32")
    info = inspect_adapter(_ours(tiny_llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), tmp_path / "a",
                                 quantization=quant, quantized_on="cpu"))
    assert (info["method"], info["peft_type"], info["base_model"]) == ("lora", "LORA", str(tiny_llama))
    assert info["targets"] == {"count": 4, "modules": {"q_proj": 2, "v_proj": 2}}  # 2 layers
    assert set(info["ranks"].values()) == {4}
    # r * (in + out) per layer, from the model's own shapes:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    expected = sum(4 * (m.in_features + m.out_features) for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj")))
    assert info["trainable_params"] == info["adapter_params"] == expected
    assert info["dtypes"] == ["float32"]
    assert info["size_on_disk"] == sum(f.stat().st_size for f in (tmp_path / "a").iterdir())
    assert info["quantization"]["method"] == "nf4"
    assert info["vllm"]["accepts"] and not info["vllm"]["reasons"]


def test_our_ia3_and_modules_to_save(tiny_llama, tmp_path):
    info = inspect_adapter(_ours(tiny_llama, IA3Config(method="ia3"), tmp_path / "ia3"))
    assert info["method"] == "ia3" and info["ranks"] is None
    assert info["targets"]["modules"] == {"down_proj": 2, "k_proj": 2, "v_proj": 2}
    assert not info["vllm"]["accepts"] and "LoRA adapters only" in info["vllm"]["reasons"][0]
    info = inspect_adapter(_ours(tiny_llama, LoraConfig(r=2, modules_to_save=["lm_head"]), tmp_path / "mts"))
    assert info["trainable_params"] > info["adapter_params"]
    assert not info["vllm"]["accepts"] and "modules_to_save" in info["vllm"]["reasons"][0]


def test_our_loha_and_lokr_ranks_and_vllm(tiny_llama, tmp_path):
    """Ranks read from the low-rank factors; LoKr's full-matrix factors have none. vLLM serves LoRA only."""
    loha = inspect_adapter(_ours(tiny_llama, LohaConfig(method="loha", r=4), tmp_path / "loha"))
    assert set(loha["ranks"].values()) == {4} and len(loha["ranks"]) == loha["targets"]["count"] == 14
    # 2 layers x 2 pairs x r x (in + out), summed: q, o 32 + 32; k, v 32 + 16 (2 KV heads); gate, up, down 32 + 64
    assert loha["adapter_params"] == 2 * 2 * 4 * (2 * 64 + 2 * 48 + 3 * 96)
    assert loha["vllm"] == {"accepts": False, "reasons": ["vLLM serves LoRA adapters only; this is LOHA"], "caveats": []}
    # Split 8 x 4 (hidden) and 8 x 8 (FFN): r 3 factors w2 on the MLP (max(8, 4) / 2 > 3), not on attention.
    lokr = inspect_adapter(_ours(tiny_llama, LokrConfig(method="lokr", r=3, decompose_factor=8), tmp_path / "lokr"))
    assert sorted({p.rsplit(".", 1)[-1] for p in lokr["ranks"]}) == ["down_proj", "gate_proj", "up_proj"]
    assert "rank           r=3 on 6 targets (8 have full-matrix factors only)" in describe(lokr)
    assert not lokr["vllm"]["accepts"] and lokr["peftkit_reads"]["ok"]


@pytest.mark.parametrize("save_projection", [True, False])
def test_our_vera(save_projection, tiny_llama, tmp_path):
    """The shared projections are frozen: not counted as trained nor taken for modules_to_save; when left out of
    the file, inspect says they are drawn again on loading. vLLM serves LoRA only."""
    cfg = VeraConfig(method="vera", r=4, target_modules=["q_proj", "down_proj"], save_projection=save_projection)
    info = inspect_adapter(_ours(tiny_llama, cfg, tmp_path / "v"))
    assert info["method"] == "vera" and info["modules_to_save"] == []
    assert set(info["ranks"].values()) == {4} and len(info["ranks"]) == 4  # r of the shared pair, read from d
    assert info["trainable_params"] == info["adapter_params"] == 2 * ((4 + 32) + (4 + 32))  # d (r) + b (out) a layer
    # A (r, largest in: down_proj's 64), B (largest out: 32, r)
    assert info["shared"] == ({"saved": {"vera_A": (4, 64), "vera_B": (32, 4)}, "regenerated": []} if save_projection
                              else {"saved": {}, "regenerated": ["vera_A", "vera_B"]})
    assert info["vllm"] == {"accepts": False, "reasons": ["vLLM serves LoRA adapters only; this is VERA"], "caveats": []}
    text = "\n".join(describe(info))
    assert ("vera_A (4, 64), vera_B (32, 4): frozen" in text) == save_projection
    assert ("vera_A, vera_B not saved: drawn again on loading" in text) != save_projection


def test_peft_lora_with_rank_pattern_and_dora(tiny_llama, tmp_path):
    """peft's adapters, made and saved by peft: per-layer ranks read from the tensors; DoRA described (peftkit
    reads it, vLLM refuses it). Per-layer ranks and alpha_pattern depend on the vLLM version: 0.10's PEFTHelper
    scales every layer by lora_alpha / r, the newest stored one reads both patterns (get_rank_and_scaling); inspect
    refused them outright."""
    made = _peft(tiny_llama, tmp_path / "p", r=4, target_modules=["q_proj", "o_proj"],
                 rank_pattern={"o_proj": 8})
    info = inspect_adapter(made)
    assert {p.rsplit(".", 1)[-1]: r for p, r in info["ranks"].items()} == {"q_proj": 4, "o_proj": 8}
    assert len(set(info["ranks"].values())) == 2
    assert info["quantization"] is None and info["peftkit_reads"]["ok"]
    # a vLLM without get_rank_and_scaling scales every layer by lora_alpha / r (the config's r): o_proj's update
    # would be twice too small there; one with it scales o_proj as peft does. The caveat names both and the test
    versions = ("a vLLM whose PEFTHelper has get_rank_and_scaling (vllm/lora/peft_helper.py; not 0.10's) scales each "
                "layer by its own rank and alpha, as peft does; an older one scales every layer by lora_alpha / r, "
                "those layers silently wrong: there, merge it (peftkit merge)")
    assert info["vllm"]["accepts"] and not info["vllm"]["reasons"]
    assert f"per-layer ranks (rank_pattern: 8 beside r=4): {versions}" in info["vllm"]["caveats"]
    alpha = inspect_adapter(_peft(tiny_llama, tmp_path / "a", r=4, target_modules=["q_proj"], alpha_pattern={"q_proj": 16}))
    assert alpha["vllm"]["accepts"] and f"alpha_pattern: {versions}" in alpha["vllm"]["caveats"]
    assert f"               note: alpha_pattern: {versions}" in describe(alpha)
    dora = inspect_adapter(_peft(tiny_llama, tmp_path / "d", r=4, target_modules=["q_proj"], use_dora=True,
                                 use_rslora=True))
    assert not dora["vllm"]["accepts"] and "DoRA" in dora["vllm"]["reasons"][0]
    assert dora["variants"] == ["DoRA", "rsLoRA scaling"] and info["variants"] == []
    assert "method         lora, DoRA, rsLoRA scaling (peft_type LORA)" in describe(dora)  # was: plain "lora"
    # The magnitude vectors (one per output feature) count with their layers, not as modules_to_save.
    assert dora["trainable_params"] == dora["adapter_params"] == 2 * (4 * (32 + 32) + 32)


@pytest.mark.parametrize("method", ["p_tuning", "prefix_tuning"])
def test_a_prompt_encoder_counts_what_trains_not_what_is_saved(method, tiny_llama, tmp_path):
    """P-tuning (and prefix tuning with its projection) save the encoder's output, not the encoder: inspect (and
    eval's comparison table) counted the saved table as "trainable", 320 of peft's 2,720."""
    from peft import PrefixTuningConfig, PromptEncoderConfig, get_peft_model

    from peftkit.methods.p_tuning import PTuningConfig
    from peftkit.methods.prefix_tuning import PrefixTuningConfig as OurPrefix

    ours, theirs = {"p_tuning": (PTuningConfig(method="p_tuning", num_virtual_tokens=5, encoder_hidden_size=16),
                                 PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, encoder_hidden_size=16)),
                    "prefix_tuning": (OurPrefix(method="prefix_tuning", num_virtual_tokens=5, projection=True,
                                                encoder_hidden_size=16),
                                      PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5,
                                                         prefix_projection=True, encoder_hidden_size=16))}[method]
    reference = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), theirs)
    expected = reference.get_nb_trainable_parameters()[0]
    reference.save_pretrained(tmp_path / "peft")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    inject_adapters(model, ours)
    config = peft_config(ours, [], str(tiny_llama), False, model.config.model_type, model_config=model.config)
    save_adapter(tmp_path / "ours", adapter_state_dict(model, []), config)
    for path in (tmp_path / "peft", tmp_path / "ours"):
        info = inspect_adapter(path)
        assert info["trainable_params"] == expected and info["saved_params"] == info["adapter_params"] < expected
        assert "saved (the prompt encoder's output" in "\n".join(describe(info))


def test_peft_s_copy_of_an_adapted_embedding_is_not_trainable(tiny_llama, tmp_path):
    """peft saves `embed_tokens.base_layer.weight` beside a LoRA on the embedding: inspect counted it trainable
    (8,216 of 1,688) and named it modules_to_save in the vLLM verdict."""
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           PeftLora(task_type="CAUSAL_LM", r=2, target_modules=["embed_tokens", "q_proj"]))
    model.save_pretrained(tmp_path / "a", save_embedding_layers=True)
    info = inspect_adapter(tmp_path / "a")
    assert info["trainable_params"] == model.get_nb_trainable_parameters()[0]
    assert info["base_copies"] == ["model.embed_tokens.base_layer.weight"]
    assert not any("modules_to_save" in r for r in info["vllm"]["reasons"])


def test_cli_text_and_json(tiny_llama, tmp_path, capsys, monkeypatch):
    import sys

    from peftkit.cli import main

    made = _peft(tiny_llama, tmp_path / "p", r=4, target_modules=["q_proj", "v_proj"])
    monkeypatch.setattr(sys, "argv", ["peftkit", "inspect", str(made)])
    main()
    out = capsys.readouterr().out
    assert "q_proj x2" in out and "r=4 on every target" in out and "vLLM           would accept it" in out
    monkeypatch.setattr(sys, "argv", ["peftkit", "inspect", str(made), "--json"])
    main()
    assert json.loads(capsys.readouterr().out)["targets"]["count"] == 4


@pytest.mark.parametrize("kind", ["missing", "model", "no-weights"])
def test_not_an_adapter_gives_load_adapters_errors(kind, tiny_llama, tmp_path, capsys, monkeypatch):
    from peftkit.errors import PeftkitError
    from peftkit.peft_format import load_adapter

    path = {"missing": tmp_path / "nothing", "model": tiny_llama, "no-weights": tmp_path / "empty"}[kind]
    if kind == "no-weights":
        path.mkdir()
        (path / "adapter_config.json").write_text("{}")
    with pytest.raises(PeftkitError) as theirs:
        load_adapter(path)
    # (a missing path is said before loading, with what is there: cli.options.adapter_path)
    said = f"{path}: no such directory; {tmp_path}/ is empty." if kind == "missing" else str(theirs.value)
    assert said in cli_user_error(monkeypatch, capsys, "inspect", str(path)).replace("\n", "")


def test_prompt_tuning_s_virtual_tokens_and_a_recorded_rope_scaling(tiny_llama, tmp_path):
    """The prompt family adapts the model as a whole: its targets line said "1 modules: (virtual tokens) x1". The RoPE
    scaling an adapter was trained under (peftkit.json, which peft does not read) was not shown at all."""
    from peftkit.methods.prompt_tuning import PromptTuningConfig
    from peftkit.recipe import RopeScalingConfig

    cfg = PromptTuningConfig(method="prompt_tuning", num_virtual_tokens=6)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    inject_adapters(model, cfg)
    config = peft_config(cfg, [], str(tiny_llama), False, model.config.model_type, model_config=model.config)
    save_adapter(tmp_path / "pt", adapter_state_dict(model, []), config,
                 rope_scaling=RopeScalingConfig(type="linear", factor=4))
    info = inspect_adapter(tmp_path / "pt")
    assert info["virtual_tokens"] == 6 and info["rope_scaling"] == {"type": "linear", "factor": 4.0}
    lines = describe(info)
    assert "targets        the whole model: 6 virtual tokens" in lines
    assert any(line.startswith("rope scaling   linear, factor 4: peftkit loads the base so") for line in lines)
    plain = inspect_adapter(_ours(tiny_llama, LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "lora"))
    assert plain["virtual_tokens"] is None and plain["rope_scaling"] is None
    assert not any(line.startswith("rope scaling") for line in describe(plain))
    assert not any("RoPE" in c for c in plain["vllm"]["caveats"])


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn"])
def test_vllm_is_told_the_rope_scaling_the_adapter_trained_under(tiny_llama, tmp_path, kind):
    """vLLM reads the base's config.json, never peftkit.json: 'would accept it' alone served a LoRA trained with
    linear x2 over the unscaled RoPE (found on SmolLM2-135M-Instruct, its positions lowered to 128)."""
    from peftkit.recipe import RopeScalingConfig

    path = _ours(tiny_llama, LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "lora",
                 rope_scaling=RopeScalingConfig(type=kind, factor=2))
    vllm = inspect_adapter(path)["vllm"]
    yarn = ', "original_max_position_embeddings": ORIGINAL' if kind == "yarn" else ""
    assert vllm["accepts"] and vllm["caveats"][0].startswith(
        f"RoPE scaling ({kind}, factor 2, in peftkit.json): vLLM reads the base's config.json only, so it serves the "
        f"adapter over the unscaled RoPE unless started with --hf-overrides '{{\"rope_parameters\": {{\"rope_type\": "
        f"\"{kind}\", \"factor\": 2.0, \"rope_theta\": THETA{yarn}}}}}' (THETA the base's rope_theta")
    assert ("other numbers than peftkit's" in vllm["caveats"][0]) == (kind == "dynamic")


def test_what_llama_cpp_s_converter_makes_of_an_adapter(tiny_llama, tmp_path):
    """llama.cpp's convert_lora_to_gguf.py reads lora_alpha and the lora_A/lora_B tensors alone: rsLoRA's scale is
    lost there without an error (sqrt(r) times too small), and DoRA's magnitudes or saved modules stop it."""
    plain = inspect_adapter(_peft(tiny_llama, tmp_path / "p", r=4, target_modules=["q_proj"]))
    assert plain["llama_cpp"] == {"accepts": True, "reasons": [], "caveats": []}
    assert "llama.cpp      convert_lora_to_gguf.py would convert it" in describe(plain)
    both = inspect_adapter(_peft(tiny_llama, tmp_path / "d", r=4, target_modules=["q_proj"], use_dora=True,
                                 use_rslora=True))
    assert not both["llama_cpp"]["accepts"] and [r.split(":")[0] for r in both["llama_cpp"]["reasons"]] == [
        "use_dora", "use_rslora"]
    said = "\n".join(describe(both))
    assert "alpha/sqrt(r)" in said and "merge it (peftkit merge) and convert the merged model" in said
    saved = inspect_adapter(_peft(tiny_llama, tmp_path / "s", r=4, target_modules=["q_proj"],
                                  modules_to_save=["lm_head"], alpha_pattern={"q_proj": 16}))
    assert [r.split(" (")[0].split(":")[0] for r in saved["llama_cpp"]["reasons"]] == [
        "tensors other than lora_A/lora_B", "alpha_pattern"]
    # convert_lora_to_gguf.py exits on a tensor that is neither lora_A/lora_B weight nor a norm: lora_B's bias is one
    # (it said the bias "would be lost or misread")
    bias = inspect_adapter(_peft(tiny_llama, tmp_path / "b", r=4, target_modules=["q_proj"], lora_bias=True))
    assert bias["llama_cpp"]["reasons"] == [("lora_bias: convert_lora_to_gguf.py reads lora_A/lora_B weights alone and "
                                             "stops at lora_B's bias tensors (llama.cpp applies no LoRA bias)")]
    other = inspect_adapter(_ours(tiny_llama, IA3Config(method="ia3"), tmp_path / "i"))
    assert not other["llama_cpp"]["accepts"] and "LoRA adapters only; this is IA3" in other["llama_cpp"]["reasons"][0]


def test_control_characters_from_a_file_are_shown_not_obeyed(tiny_llama, tmp_path, monkeypatch, capsys):
    """A base_model_name_or_path holding `\\x1b[2J` cleared the screen on `inspect`; in an error message, escape
    sequences wrote a fake `loss ...` line over the error."""
    import sys

    from peftkit.cli import main

    adapter = _ours(tiny_llama, LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "a")
    config = json.loads((adapter / "adapter_config.json").read_text())
    sneaky = "/models/base\x1b[2J\x1b[H\x9b1m"
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": sneaky}))
    monkeypatch.setattr(sys, "argv", ["peftkit", "inspect", str(adapter)])
    main()
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x9b" not in out and "/models/base\\x1b[2J\\x1b[H\\x9b1m" in out
    err = cli_user_error(monkeypatch, capsys, "generate", "--adapter", str(adapter), "--prompt", "12")
    assert "\x1b" not in err and "/models/base\\x1b[2J" in " ".join(err.split())


def test_a_tied_head_s_copy_of_trained_rows_counts_once(tmp_path):
    """On Qwen2 (head tied to the embeddings) peft saves trained token rows under both modules' names; inspect counts
    the one trained tensor, as peft's own count does, and says which is the copy. Rows of their own do not merge."""
    from peft import TrainableTokensConfig as PeftTrainableTokens
    from peft import get_peft_model

    from peftkit.tiny import build_tiny_model

    base = tmp_path / "qwen2"
    build_tiny_model(base, arch="qwen2", hidden_size=32, num_layers=2, seed=0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           PeftTrainableTokens(target_modules=["embed_tokens"], token_indices=[3, 7, 12]))
    model.save_pretrained(tmp_path / "tt")
    info = inspect_adapter(tmp_path / "tt")
    assert info["targets"]["modules"] == {"embed_tokens": 1, "lm_head": 1}  # the file holds both
    assert info["saved_params"] == 2 * 3 * 32
    assert info["trainable_params"] == 3 * 32 == model.get_nb_trainable_parameters()[0]
    assert info["tied_rows"] == {"lm_head": "model.embed_tokens"}
    assert "96 trainable; 192 saved (lm_head's rows are model.embed_tokens's" in "\n".join(describe(info))

    # Other ids on each module: two trained tensors, nothing tied, even where their values agree.
    rows = {"embed_tokens": [3, 7], "lm_head": [5, 9]}
    info = inspect_adapter(_ours(base, LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=rows),
                                 tmp_path / "own"))
    assert info["tied_rows"] == {} and info["trainable_params"] == info["saved_params"]
    assert info["trainable_tokens"] == {"model.embed_tokens": 2, "lm_head": 2}


def test_a_file_given_as_the_adapter_is_said_to_be_a_file(tmp_path, monkeypatch, capsys):
    """`peftkit inspect train.jsonl` (a file that exists) said "Adapter directory not found"."""
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "x"}\n')
    err = " ".join(cli_user_error(monkeypatch, capsys, "inspect", str(data)).split())
    assert (f"error: {data} is a file, not an adapter directory: an adapter is a directory holding "
            "adapter_config.json and adapter_model.safetensors. Give that directory.") in err


def test_a_run_directory_is_inspected_through_its_adapter(tiny_llama, tmp_path, capsys, monkeypatch):
    """`peftkit inspect RUN_DIR` was refused ("its adapter is RUN_DIR/adapter") where eval, generate, merge and push
    take the run directory: it now describes the run's adapter/, as `inspect RUN_DIR/adapter` does."""
    import sys

    from peftkit.cli import main

    run = tmp_path / "run"
    _peft(tiny_llama, run / "adapter", r=4, target_modules=["q_proj", "v_proj"])
    (run / "manifest.json").write_text("{}")
    said = {}
    for which, path in [("run", run), ("adapter", run / "adapter")]:
        monkeypatch.setattr(sys, "argv", ["peftkit", "inspect", str(path), "--json"])
        main()
        said[which] = json.loads(capsys.readouterr().out)
    assert said["run"] == said["adapter"] and said["run"]["targets"]["count"] == 4


def test_a_run_that_has_exported_no_adapter_yet_is_said_to_be_one(tmp_path, monkeypatch, capsys):
    """`peftkit inspect RUN_DIR` of a run still training (recipe.yaml, metrics.jsonl, no adapter/ yet) said only
    "it has no adapter_config.json", as for any directory."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("model: {name_or_path: x}\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    err = " ".join(cli_user_error(monkeypatch, capsys, "inspect", str(run)).split())
    assert (f"error: {run} is not a PEFT adapter directory: it has no adapter_config.json. It is a training run's "
            "directory holding no adapter/ (export.adapter: false, or the run has not finished: `peftkit train RECIPE "
            "--resume` finishes it).") in err
    # a finished run of export.adapter: false and export.merged: true: its merged/ is named (eval's --adapter RUN
    # said the above, the merged model beside it unsaid)
    (run / "merged").mkdir()
    (run / "merged" / "config.json").write_text("{}")
    err = " ".join(cli_user_error(monkeypatch, capsys, "eval", "--adapter", str(run), "--data", "x.jsonl").split())
    assert (f"error: {run} is not a PEFT adapter directory: it has no adapter_config.json. It is a training run's "
            f"directory holding no adapter/ (export.adapter: false); its model with the adapter merged in is "
            f"{run / 'merged'} (eval, generate and chat take it as --model).") in err


def test_a_lora_tensor_without_its_rank_dimension_is_said_not_a_traceback(tiny_llama, tmp_path, monkeypatch, capsys):
    """A 0-d lora_A (a damaged or hand-made file) was an IndexError traceback from `peftkit inspect`."""
    from safetensors.torch import load_file, save_file

    made = _peft(tiny_llama, tmp_path / "p", r=4, target_modules=["q_proj"])
    weights = made / "adapter_model.safetensors"
    state = load_file(weights)
    state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.tensor(1.0)
    save_file(state, weights)
    err = " ".join(cli_user_error(monkeypatch, capsys, "inspect", str(made)).split())
    assert f"{weights}: model.layers.0.self_attn.q_proj.lora_A.weight has shape (), with no dimension 0 (its rank): " \
           "the file is damaged" in err


@pytest.mark.parametrize("labels, said", [
    (1, "task           sequence classification, one output: a reward model (it scores a prompt and an answer; "
        "peftkit eval --format preference)"),
    (3, "task           sequence classification, 3 classes"),
])
def test_a_classifier_s_adapter_says_its_task(tiny_llama, tmp_path, labels, said):
    """A SEQ_CLS adapter (a reward model's, a classifier's) said nothing of its task: only `saved whole score`. Its
    head's output rows say which (the JSON's `classifier`); a language model's adapter has none."""
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=labels)
    get_peft_model(model, PeftLora(task_type="SEQ_CLS", r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    info = inspect_adapter(tmp_path)
    assert info["classifier"] == {"outputs": labels, "labels": None}
    assert describe(info)[3] == said
    causal = inspect_adapter(_peft(tiny_llama, tmp_path / "lm", r=2, target_modules=["q_proj"]))
    assert causal["classifier"] is None and not any(line.startswith("task ") for line in describe(causal))
