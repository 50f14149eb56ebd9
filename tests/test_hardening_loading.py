"""Broken models and adapters on disk, absurd adapter sizes, NaN adapters: each is a PeftkitError that
names the file (or recipe key) and the fix, and the CLI prints it as one `error:` line with exit 2.

Every broken input is a real file: a tiny model saved with `build_tiny_model`, or an adapter injected
into one and saved with `save_adapter`, then truncated, overwritten or edited.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import cli_user_error, make_recipe
from peftkit.errors import PeftkitError
from peftkit.recipe import ModelConfig
from peftkit.tiny import build_tiny_model

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A saved 1-layer, hidden-32 Llama (untied output head)."""
    path = tmp_path_factory.mktemp("hardening") / "base"
    build_tiny_model(path, arch="llama", hidden_size=32, num_layers=1, seed=0)
    return path


@pytest.fixture(scope="module")
def adapter(base) -> Path:
    """A LoRA (r=4 on q_proj, v_proj; lm_head saved whole) for `base`, saved as a real PEFT directory."""
    from peftkit.adapters import inject_adapters
    from peftkit.adapters.state_dicts import adapter_state_dict
    from peftkit.modeling import load_model
    from peftkit.peft_format import peft_config, save_adapter
    from peftkit.methods.lora import LoraConfig

    cfg = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    model = load_model(ModelConfig(name_or_path=str(base)))
    torch.manual_seed(0)
    targets = inject_adapters(model, cfg)
    path = base.parent / "adapter"
    save_adapter(path, adapter_state_dict(model, cfg.modules_to_save), peft_config(cfg, targets, str(base), False))
    return path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(file: Path, **changes) -> None:
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


def _load(path: Path, **quant):
    from peftkit.modeling import load_model
    from peftkit.recipe import QuantizationConfig

    q = QuantizationConfig(**quant) if quant else None
    return load_model(ModelConfig(name_or_path=str(path)), q)


def _main(monkeypatch, capsys, *args: str) -> str:
    """stderr of a user mistake that peftkit itself reports ('error: ...'), whitespace-normalised."""
    stderr = cli_user_error(monkeypatch, capsys, *args)
    assert stderr.startswith("error: "), stderr
    return " ".join(stderr.split())


# ----------------------------------------------------------------------------- 1. corrupt weights files


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _garbage_header(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[:64] = b"\xff" * 64
    file.write_bytes(bytes(data))


def _empty(file: Path) -> None:
    file.write_bytes(b"")


def test_the_model_s_own_code_runs_not_hub_kernels(base):
    """transformers 5 swaps layers for hub kernels by default when the `kernels` package is installed: code fetched
    at load time (an offline GPU run failed on it) and other bits than the model's. peftkit loads without them."""
    from peftkit.modeling import load_model

    model = load_model(ModelConfig(name_or_path=str(base)))
    assert getattr(model, "_use_kernels", False) is False


@pytest.mark.parametrize("saved", [False, True])
def test_bitsandbytes_loads_without_asking_the_hub_for_a_kernel(saved, base, tmp_path):
    """On a CPU with AVX512-BF16 (this machine's, and many servers'), bitsandbytes 0.50's import calls
    `kernels.get_kernel("kernels-community/quantization-bitsandbytes")`: with the hub unreachable, 4.5 s of waiting in
    every QLoRA process; reachable, code nobody asked for. A QLoRA load and the 8-bit optimizers never call it now,
    and the `kernels` module is left as it was. (In a fresh process: bitsandbytes is imported once per process.)
    `saved`: a checkpoint saved 4-bit (`peftkit merge --requantize`'s), loaded without a quantization section
    (`peftkit eval --model OUTPUT-nf4`), where transformers imported bitsandbytes first and the kernel was asked for."""
    import subprocess
    import sys

    model, quant = str(base), 'QuantizationConfig(method="nf4", double_quant=True)'
    if saved:
        from peftkit.modeling import load_model
        from peftkit.recipe import QuantizationConfig

        quantized = load_model(ModelConfig(name_or_path=str(base)), QuantizationConfig(method="nf4"))
        quantized.save_pretrained(tmp_path / "nf4")
        assert "quantization_config" in (tmp_path / "nf4" / "config.json").read_text()
        model, quant = str(tmp_path / "nf4"), "None"
    script = f"""
import os, sys
os.environ.pop("HF_HUB_OFFLINE", None)  # (offline, the kernel is only looked for in the cache)
import kernels
calls = []
kernels.get_kernel = lambda *args, **kwargs: calls.append(args)
from peftkit.modeling import load_model
from peftkit.recipe import ModelConfig, QuantizationConfig
model = load_model(ModelConfig(name_or_path={model!r}), {quant})
from peftkit.runtime import build_optimizer
assert "bitsandbytes" in sys.modules and sys.modules["kernels"] is kernels
print("calls", len(calls))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["calls", "0"], done.stdout


@pytest.mark.parametrize("damage, reason", [(_truncate, "file not fully covered"), (_garbage_header, "header too large"),
                                            (_empty, "header too small")])
def test_corrupt_model_weights_name_the_file(base, tmp_path, damage, reason):
    broken = _copy(base, tmp_path / "model")
    damage(broken / WEIGHTS)
    with pytest.raises(PeftkitError) as info:
        _load(broken)
    message = str(info.value)
    assert message.startswith(f"{broken / WEIGHTS} is truncated or corrupt (")
    assert reason in message and message.endswith("Copy or download the model again.")


def test_corrupt_shard_of_a_sharded_model_is_named(base, tmp_path):
    from peftkit.modeling import load_model

    broken = tmp_path / "sharded"
    model = load_model(ModelConfig(name_or_path=str(base)))
    model.save_pretrained(broken, max_shard_size="20KB")
    shards = sorted(broken.glob("model-*.safetensors"))
    assert len(shards) > 1
    _truncate(shards[-1])
    with pytest.raises(PeftkitError, match=rf"^{shards[-1]} is truncated or corrupt \("):
        _load(broken)


def test_cli_eval_of_a_truncated_model(base, number_data, tmp_path, monkeypatch, capsys):
    broken = _copy(base, tmp_path / "model")
    _truncate(broken / WEIGHTS)
    stderr = _main(monkeypatch, capsys, "eval", "--model", str(broken), "--data", str(number_data["eval"]),
                   "--format", "alpaca")
    assert f"{broken / WEIGHTS} is truncated or corrupt" in stderr


# ----------------------------------------------------------------------------- 2. broken config.json


@pytest.mark.parametrize("text, expected", [
    ('{"model_type": "llama",', "config.json: not valid JSON (Expecting"),
    ("[1, 2]", "config.json must hold a JSON object of settings, but holds a list."),
    ("null", "config.json must hold a JSON object of settings, but holds null."),
    ('{"hidden_size": 32}', "config.json has no 'model_type' (the architecture, e.g. \"llama\")"),
    ('{"model_type": "llamaXYZ"}', "config.json: model_type 'llamaXYZ' is not an architecture transformers"),
])
def test_broken_config_json_names_the_file(base, tmp_path, text, expected):
    from peftkit.modeling import load_tokenizer

    broken = _copy(base, tmp_path / "model")
    (broken / "config.json").write_text(text)
    for load in (_load, lambda path: load_tokenizer(ModelConfig(name_or_path=str(path)))):
        with pytest.raises(PeftkitError) as info:
            load(broken)
        assert str(info.value).startswith(f"{broken / 'config.json'}"), str(info.value)
        assert expected in str(info.value)


def test_a_tokenizer_without_eos_or_pad(base, number_data, tmp_path):
    """Padding falls back to UNK (or BOS) when there is no EOS; the formats that end targets with EOS say it is
    missing (a TypeError deep in decode, or in the collator, before)."""
    from transformers import AutoTokenizer

    from peftkit.data import load_examples
    from peftkit.modeling import load_tokenizer
    from peftkit.recipe import DataConfig

    model = shutil.copytree(base, tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(model)
    tok.eos_token, tok.pad_token = None, None
    tok.save_pretrained(model)
    tok = load_tokenizer(ModelConfig(name_or_path=str(model)))
    assert tok.eos_token is None and tok.pad_token == tok.unk_token is not None
    with pytest.raises(PeftkitError, match="data.format 'alpaca' ends each target with the tokenizer's EOS token, so "
                                           "the model learns to stop, and this tokenizer has none"):
        load_examples(tok, str(number_data["train"]), "train", DataConfig(train="x"))


def test_unknown_model_type_suggests_the_closest(base, tmp_path):
    broken = _copy(base, tmp_path / "model")
    _edit_json(broken / "config.json", model_type="llamaXYZ")
    with pytest.raises(PeftkitError, match=r"Did you mean 'llama'\? If the model is newer than this transformers, "
                                           r"upgrade it \(pip install -U transformers\)"):
        _load(broken)


def test_config_field_of_the_wrong_type(base, tmp_path):
    broken = _copy(base, tmp_path / "model")
    _edit_json(broken / "config.json", hidden_size="abc")
    with pytest.raises(PeftkitError) as info:
        _load(broken)
    message = str(info.value)
    assert message.startswith(f"{broken / 'config.json'}: transformers cannot use this model config: ")
    assert "'hidden_size' expected int, got str" in message and "\n" not in message


def test_config_with_a_negative_size_is_refused_by_the_estimate(base, number_data, tmp_path):
    from peftkit.memory import estimate_memory
    from peftkit.recipe import load_recipe

    broken = _copy(base, tmp_path / "model")
    _edit_json(broken / "config.json", hidden_size=-4)
    with pytest.raises(PeftkitError, match=r"config\.json describes a model that cannot be built \(Trying to create "
                                           r"tensor with negative dimension -4"):
        estimate_memory(load_recipe(make_recipe(tmp_path, broken, number_data)))


def test_cli_train_with_an_unknown_model_type(base, number_data, tmp_path, monkeypatch, capsys):
    broken = _copy(base, tmp_path / "model")
    _edit_json(broken / "config.json", model_type="llamaXYZ")
    recipe = make_recipe(tmp_path, broken, number_data)
    stderr = _main(monkeypatch, capsys, "train", str(recipe))
    assert "model_type 'llamaXYZ' is not an architecture transformers" in stderr
    assert not (tmp_path / "run" / "adapter").exists()


# ----------------------------------------------------------------------------- 3. weights that do not fit the config


@pytest.mark.parametrize("changes, expected", [
    ({"hidden_size": 64}, "weights have another shape than config.json says (e.g. lm_head.weight is (102, 32) in "
                          "the weights files, (102, 64) by the config)"),
    ({"num_hidden_layers": 2}, "9 weights the config describes are not in the weights files "
                               "(e.g. model.layers.1.input_layernorm.weight)"),
])
def test_weights_that_do_not_fit_the_config_are_refused(base, tmp_path, changes, expected):
    broken = _copy(base, tmp_path / "model")
    _edit_json(broken / "config.json", **changes)
    with pytest.raises(PeftkitError) as info:
        _load(broken)
    message = str(info.value)
    assert message.startswith(f"The weights of {broken} do not match its config.json: ")
    assert expected in message
    assert message.endswith("Put back the config.json saved with these weights.")


def test_weights_the_model_has_no_place_for_are_refused(base, tmp_path):
    broken = _copy(base, tmp_path / "model")
    state = load_file(broken / WEIGHTS)
    save_file({**state, "model.extra.weight": torch.zeros(2)}, broken / WEIGHTS, metadata={"format": "pt"})
    with pytest.raises(PeftkitError, match=r"1 weights in the files have no place in the model the config describes "
                                           r"\(e\.g\. model\.extra\.weight\)"):
        _load(broken)


def test_quantized_weights_that_do_not_fit_the_config_are_refused(base, tmp_path):
    # transformers skips its own shape check for weights it quantizes: this loaded, then failed at a matmul.
    broken = _copy(base, tmp_path / "model")
    _edit_json(broken / "config.json", intermediate_size=100)
    with pytest.raises(PeftkitError, match=r"3 weights have another shape than config\.json says \(e\.g\. "
                                           r"model\.layers\.0\.mlp\.down_proj\.weight is \(32, 64\) in the weights "
                                           r"files, \(32, 100\) by the config\)"):
        _load(broken, method="nf4", compute_dtype="float32")


def test_tied_output_head_missing_from_the_files_is_normal(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in load_file(tmp_path / "tied" / WEIGHTS)
    model = _load(tmp_path / "tied")
    assert model.lm_head.weight is model.model.embed_tokens.weight


# ----------------------------------------------------------------------------- 4. malformed adapter directories


def _load_adapter(path: Path):
    from peftkit.adapter_base import load_adapted_model

    return load_adapted_model(None, str(path))


@pytest.mark.parametrize("text, kind", [("[]", "a list"), ('"r: 8"', "a string"), ("null", "null")])
def test_adapter_config_that_is_not_an_object(adapter, tmp_path, text, kind):
    broken = _copy(adapter, tmp_path / "adapter")
    (broken / "adapter_config.json").write_text(text)
    with pytest.raises(PeftkitError) as info:
        _load_adapter(broken)
    assert str(info.value) == (f"{broken / 'adapter_config.json'} must hold a JSON object of settings, but holds "
                               f"{kind}. Fix the file, or export the adapter again.")


@pytest.mark.parametrize("planted, said", [
    ("fifo", "adapter_config.json is not a regular file (a device, a FIFO or a directory)"),
    ("zero", "adapter_config.json is not a regular file (a device, a FIFO or a directory)"),
    ("huge", "adapter_config.json is larger than 64 MiB: not a settings file"),
    ("deep", "adapter_config.json: not a settings file (JSON nested thousands of levels deep)"),
])
def test_an_adapter_config_that_is_no_settings_file_is_refused_at_once(adapter, tmp_path, planted, said):
    """A FIFO in its place blocked for ever, deaf to Ctrl-C; a link to /dev/zero read until memory ran out; JSON
    nested 100,000 deep was a RecursionError traceback."""
    import os

    broken = _copy(adapter, tmp_path / "adapter")
    config = broken / "adapter_config.json"
    config.unlink()
    if planted == "fifo":
        os.mkfifo(config)
    elif planted == "zero":
        config.symlink_to("/dev/zero")
    elif planted == "huge":
        with open(config, "wb") as f:
            f.truncate(64 * 2**20 + 1)
    else:
        config.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(PeftkitError, match=re.escape(said)):
        _load_adapter(broken)


def test_generate_with_an_adapter_config_that_is_a_fifo_says_so(adapter, tmp_path):
    """`generate --adapter` read adapter_config.json for the base's name and the adapter's task before loading did:
    on a FIFO that read waited for ever."""
    import os
    import subprocess
    import sys

    broken = _copy(adapter, tmp_path / "adapter")
    (broken / "adapter_config.json").unlink()
    os.mkfifo(broken / "adapter_config.json")
    done = subprocess.run([sys.executable, "-m", "peftkit", "generate", "--adapter", str(broken), "--prompt", "12"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "adapter_config.json is not a regular file (a device, a FIFO or a directory)" in (
        " ".join(done.stderr.split())), done.stderr


@pytest.mark.parametrize("changes, expected", [
    ({"r": "eight"}, '"r" is "eight"; it should be a whole number'),
    ({"r": 0}, '"r" is 0; it should be a number > 0'),
    ({"lora_alpha": []}, '"lora_alpha" is []; it should be a number'),
    ({"lora_dropout": 1.5}, '"lora_dropout" is 1.5; it should be a number < 1'),
    ({"lora_alpha": float("nan")}, '"lora_alpha" is NaN; it should be a finite number.'),  # (was "be input should be")
    ({"target_modules": 5}, '"target_modules" is 5; it should be a list of module names, or a regular expression string'),
    ({"target_modules": ["q_proj", 7]}, '"target_modules" is ["q_proj", 7]; it should be a list of module names'),
    ({"target_modules": []}, '"target_modules" is []; it should name the adapted modules'),  # (null: the weights')
    ({"modules_to_save": "x"}, '"modules_to_save" is "x"; it should be a list of module names, or null'),
    ({"use_rslora": "maybe"}, '"use_rslora" is "maybe"; it should be true or false'),
])
def test_adapter_config_field_of_the_wrong_type(adapter, tmp_path, changes, expected):
    broken = _copy(adapter, tmp_path / "adapter")
    _edit_json(broken / "adapter_config.json", **changes)
    with pytest.raises(PeftkitError) as info:
        _load_adapter(broken)
    message = str(info.value)
    assert message.startswith(f"{broken / 'adapter_config.json'}: ") and expected in message
    assert message.endswith("Fix the file, or export the adapter again.")
    assert "type=" not in message and "Input should" not in message  # pydantic's words stay inside


def test_adapter_config_without_r(adapter, tmp_path):
    broken = _copy(adapter, tmp_path / "adapter")
    config = json.loads((broken / "adapter_config.json").read_text())
    del config["r"]
    (broken / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(PeftkitError, match='adapter_config.json: "r" is missing. Fix the file'):
        _load_adapter(broken)


@pytest.mark.parametrize("text, expected", [
    ("{quantization: nf4", "peftkit.json: not valid JSON (Expecting"),
    ("[]", "peftkit.json must hold a JSON object of settings, but holds a list."),
    ('{"quantization": "nf4"}', '"quantization" is "nf4"; it should be an object'),
    ('{"quantization": {"method": "nf5"}}', "\"quantization.method\" is \"nf5\"; it should be one of 'nf4', 'fp4' or 'int8'"),
    ('{"quantization": {"double_quant": "yes please"}}', '"quantization.double_quant" is "yes please"; it should be true or false'),
    ('{"quantization": {"bits": 4}}', '"quantization.bits" is not a setting peftkit knows'),
    ('{"quantized_on": "tpu"}', "\"quantized_on\" is \"tpu\"; it should be one of 'cpu' or 'cuda'"),
])
def test_bad_peftkit_json(adapter, tmp_path, text, expected):
    from peftkit.adapter_meta import quantized_on

    broken = _copy(adapter, tmp_path / "adapter")
    (broken / "peftkit.json").write_text(text)
    for load in (_load_adapter, quantized_on):  # quantized_on: what `peftkit merge` reads first
        with pytest.raises(PeftkitError) as info:
            load(broken)
        assert str(info.value).startswith(str(broken / "peftkit.json")) and expected in str(info.value)
        assert "type=" not in str(info.value)


def test_an_adapter_saved_as_a_pickle_only_says_how_to_convert_it(adapter, tmp_path, monkeypatch, capsys):
    """adapter_model.bin alone (peft's safe_serialization=False) was refused without a way out."""
    legacy = _copy(adapter, tmp_path / "adapter")
    (legacy / "adapter_model.safetensors").unlink()
    torch.save({}, legacy / "adapter_model.bin")
    err = _main(monkeypatch, capsys, "merge", "--adapter", str(legacy), "--output", str(tmp_path / "merged"))
    assert err == (f"error: {legacy} has no adapter_model.safetensors. Only adapter_model.bin is there; peftkit loads "
                   "safetensors only (it never unpickles). If you trust the file, convert it: peft's "
                   "PeftModel.from_pretrained(base, DIR).save_pretrained(NEW_DIR) writes adapter_model.safetensors.")


def test_peft_s_save_of_several_adapters_names_its_subdirectories(base, tmp_path, monkeypatch, capsys):
    """peft's save_pretrained of a model with adapters `sql` and `chat` writes DIR/sql and DIR/chat, and nothing in DIR:
    given DIR, the error said only that it has no adapter_config.json."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(target_modules=["q_proj"]), "sql")
    model.add_adapter("chat", LoraConfig(target_modules=["v_proj"]))
    model.save_pretrained(tmp_path / "saved")
    capsys.readouterr()  # (transformers' progress bar)
    err = " ".join(_main(monkeypatch, capsys, "merge", "--adapter", str(tmp_path / "saved"), "--output",
                         str(tmp_path / "merged")).split())
    assert (f"{tmp_path / 'saved'} is not a PEFT adapter directory: it has no adapter_config.json. Its subdirectories "
            f"chat, sql hold adapters (peft saves each adapter of a model but 'default' in one named after it): give "
            f"one of those, e.g. {tmp_path / 'saved' / 'chat'}.") in err


def test_truncated_adapter_weights(adapter, tmp_path):
    broken = _copy(adapter, tmp_path / "adapter")
    _truncate(broken / "adapter_model.safetensors")
    with pytest.raises(PeftkitError) as info:
        _load_adapter(broken)
    message = str(info.value)
    assert message.startswith(f"{broken / 'adapter_model.safetensors'} is truncated or corrupt (")
    assert message.endswith("Export the adapter again, or copy it again.")


def test_truncated_adapter_weights_whose_config_leaves_the_targets_to_them(adapter, tmp_path):
    """target_modules: null takes the targets from the weights; with the weights truncated, the error blamed the config
    ('"target_modules" is null; it should name the adapted modules')."""
    broken = _copy(adapter, tmp_path / "adapter")
    _edit_json(broken / "adapter_config.json", target_modules=None)
    _truncate(broken / "adapter_model.safetensors")
    with pytest.raises(PeftkitError) as info:
        _load_adapter(broken)
    assert str(info.value).startswith(f"{broken / 'adapter_model.safetensors'} is truncated or corrupt (")


def test_adapter_weights_of_another_rank_than_its_config(adapter, tmp_path):
    broken = _copy(adapter, tmp_path / "adapter")
    _edit_json(broken / "adapter_config.json", r=8)
    with pytest.raises(PeftkitError) as info:
        _load_adapter(broken)
    message = str(info.value)
    assert message.startswith("The adapter's weights do not match its adapter_config.json: module "
                              "'model.layers.0.self_attn.q_proj' expects lora_A of shape (8, 32) but the adapter has (4, 32).")
    assert "The weights have rank 4, the config gives it rank 8 (its r, or a rank_pattern entry)." in message


def test_adapter_weights_of_an_integer_dtype_are_refused_not_cast(adapter, tmp_path):
    """An int32 lora_B (a damaged file, or a tool's integer export) was cast into the float weights without a word:
    its 0.3 became 0."""
    broken = _copy(adapter, tmp_path / "adapter")
    weights = broken / "adapter_model.safetensors"
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    save_file(load_file(weights) | {key: torch.ones(32, 4, dtype=torch.int32)}, weights)
    with pytest.raises(PeftkitError) as info:
        _load_adapter(broken)
    assert str(info.value) == (f"{weights}: {key} is int32, where adapter weights are floating-point: cast, it would "
                               "give other numbers than were saved. The file is damaged, or not a PEFT adapter's; export "
                               "the adapter again.")


def test_an_adapter_tensor_with_another_number_of_dimensions_is_said_damaged(adapter, tmp_path):
    """A 1-d lora_A was "trained on a different base model (another size or vocabulary)": another base changes sizes,
    never the number of dimensions. (A 0-d one lacks the rank dimension: said on reading the file.)"""
    broken = _copy(adapter, tmp_path / "adapter")
    weights = broken / "adapter_model.safetensors"
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    save_file(load_file(weights) | {key: torch.ones(4)}, weights)
    with pytest.raises(PeftkitError) as info:
        _load_adapter(broken)
    assert str(info.value) == ("The adapter's file does not hold what its adapter_config.json describes: module "
                               "'model.layers.0.self_attn.q_proj' expects lora_A of shape (4, 32) but the adapter has "
                               "(4,). The file is damaged, or not a PEFT adapter's; export the adapter again.")
    save_file(load_file(weights) | {key: torch.tensor(1.0)}, weights)
    with pytest.raises(PeftkitError, match=re.escape(f"{weights}: {key} has shape (), with no dimension 0 (its rank)")):
        _load_adapter(broken)


def test_adapter_keys_without_peft_s_prefix_are_said_so(adapter, tmp_path, monkeypatch, capsys):
    """A file of a model's state_dict keys (`model.layers.0.self_attn.q_proj.lora_A.weight`, no `base_model.model.`):
    every weight was "for modules this model lacks", and the error asked whether it was trained on another base."""
    broken = _copy(adapter, tmp_path / "adapter")
    weights = broken / "adapter_model.safetensors"
    save_file({k.removeprefix("base_model.model."): t for k, t in load_file(weights).items()}, weights)
    err = _main(monkeypatch, capsys, "merge", "--adapter", str(broken), "--output", str(tmp_path / "merged"))
    assert err == (f"error: {weights}: its keys lack peft's 'base_model.model.' prefix (e.g. "
                   "model.layers.0.self_attn.q_proj.lora_A.weight): it holds a model's state_dict, not an adapter as "
                   "peft's save_pretrained writes it. Load it into the peft model it came from and save that with "
                   "save_pretrained, or add the prefix to every key.")


def test_adapter_weights_of_a_module_its_config_does_not_target_are_said_so(adapter, tmp_path):
    """LoRA weights for k_proj under a target_modules without it (peft drops them silently) were "weights for modules
    this model lacks; was it trained on another base model?", of a model that has k_proj."""
    broken = _copy(adapter, tmp_path / "adapter")
    weights = broken / "adapter_model.safetensors"
    k_proj = "base_model.model.model.layers.0.self_attn.k_proj"
    save_file(load_file(weights) | {f"{k_proj}.lora_A.weight": torch.zeros(4, 32),
                                    f"{k_proj}.lora_B.weight": torch.ones(32, 4)}, weights)
    with pytest.raises(PeftkitError) as info:
        _load_adapter(broken)
    assert str(info.value) == (
        "The adapter's weights adapt 1 modules of this model that its target_modules (adapter_config.json) do not name "
        "(e.g. 'model.layers.0.self_attn.k_proj'): the config says less than the weights (peft would leave those "
        "weights out without a word). Add them to its target_modules, or put back the adapter_config.json saved with "
        "these weights.")
    other = _copy(adapter, tmp_path / "other")  # a tensor under k_proj that is no adapter tensor: not an untargeted layer
    weights = other / "adapter_model.safetensors"
    save_file(load_file(weights) | {f"{k_proj}.scale.weight": torch.zeros(4)}, weights)
    with pytest.raises(PeftkitError, match=r"The adapter does not fit this model: 1 weights for modules this model lacks "
                                           rf"\(e\.g\. {re.escape(k_proj)}\.scale\.weight\)"):
        _load_adapter(other)


def test_an_adapter_config_of_another_method_than_the_weights_is_said_so(adapter, tmp_path):
    """An IA3 adapter_config.json beside LoRA weights (the config of another adapter): every weight was "for modules
    this model lacks; was it trained on another base model?"."""
    broken = _copy(adapter, tmp_path / "adapter")
    (broken / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "IA3", "task_type": "CAUSAL_LM", "target_modules": ["q_proj", "v_proj"], "feedforward_modules": []}))
    with pytest.raises(PeftkitError) as info:
        _load_adapter(broken)
    assert str(info.value) == (
        f"{broken / 'adapter_model.safetensors'} holds LoRA tensors (e.g. on 'model.layers.0.self_attn.q_proj'), and "
        "its adapter_config.json says peft_type IA3 (IA3): the two files come from different adapters. Put back the "
        "adapter_config.json saved with these weights, or export the adapter again.")


def test_a_peft_model_s_state_dict_with_its_modules_to_save_wrapper_is_said_so(base, tmp_path):
    """`model.state_dict()` of a peft model keeps a saved module as `lm_head.modules_to_save.default.weight` beside
    `lm_head.original_module.weight` (peft fails on it with a KeyError): "2 weights for modules this model lacks;
    was it trained on another base model?"."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(target_modules=["q_proj"],
                                                                                  modules_to_save=["lm_head"]))
    model.save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    save_file({k: t.contiguous() for k, t in model.state_dict().items() if "lora_" in k or "lm_head" in k}, weights)
    with pytest.raises(PeftkitError) as info:
        _load_adapter(tmp_path / "adapter")
    assert str(info.value) == (f"{weights} holds peft's in-memory modules_to_save wrapper (base_model.model.lm_head."
                               "modules_to_save.default.weight): it is a peft model's state_dict, not an adapter as "
                               "peft's save_pretrained writes it. Save that peft model with save_pretrained.")


def test_an_absurd_rank_in_an_adapter_config_is_refused_before_any_layer_is_built(adapter, tmp_path):
    """r: 1000000000 allocated r x width per layer before the shapes were compared: a 128 GB RuntimeError traceback
    (or, for a rank of a few GB a layer, memory run out)."""
    broken = _copy(adapter, tmp_path / "adapter")
    _edit_json(broken / "adapter_config.json", r=10**9)
    with pytest.raises(PeftkitError, match=r"it says r: 1000000000, and its lora_A weights have rank 4 at most"):
        _load_adapter(broken)


def test_a_backtracking_target_regex_neither_hangs_nor_goes_unsaid(adapter, tmp_path, monkeypatch):
    """`(.|.)*Z` in an adapter_config.json kept `re.fullmatch` busy for ever (still running at 120 s); matched through
    the `regex` package it matches nothing at once, and one past the timeout is said."""
    import time

    from peftkit import adapters

    broken = _copy(adapter, tmp_path / "adapter")
    _edit_json(broken / "adapter_config.json", target_modules="(.|.)*Z")
    started = time.monotonic()
    with pytest.raises(PeftkitError, match="match no module of this base model"):
        _load_adapter(broken)
    assert time.monotonic() - started < 60
    monkeypatch.setattr(adapters, "REGEX_TIMEOUT_S", 1e-9)  # (a pattern slow for `regex` too: said, not waited on)
    with pytest.raises(PeftkitError, match=r"the regular expression took over 1e-09 s to match one module name"):
        _load_adapter(broken)


def test_an_adapter_on_another_architecture_says_so_not_to_edit_its_targets(adapter, tiny_gpt2, tmp_path, monkeypatch,
                                                                           capsys):
    """A Llama adapter merged with --base a GPT-2 was told, as a recipe's typo, "Use some of those names, or
    'all-linear'": an edit of its adapter_config.json that its weights cannot follow."""
    err = _main(monkeypatch, capsys, "merge", "--adapter", str(adapter), "--base", str(tiny_gpt2), "--output",
                str(tmp_path / "merged"))
    assert err == ("error: adapter_config.json's target_modules ['model.layers.0.self_attn.q_proj', "
                   "'model.layers.0.self_attn.v_proj'] match no module of this base model (its linear/embedding layers are named wte, wpe, c_attn, c_proj, c_fc, lm_head): the adapter "
                   "was trained on another base model. Load it on that one (adapter_config.json's "
                   "base_model_name_or_path names it).")
    edited = _copy(adapter, tmp_path / "edited")  # the base it was trained on, the config made to match nothing
    _edit_json(edited / "adapter_config.json", target_modules="q_proj")  # (a string is a regex of the whole path)
    err = _main(monkeypatch, capsys, "merge", "--adapter", str(edited), "--output", str(tmp_path / "merged"))
    assert err.endswith("yet its weights adapt modules of this model (e.g. 'model.layers.0.self_attn.q_proj'): the "
                        "file was edited or damaged. Fix its target_modules, or export the adapter again.")


def test_a_relative_recorded_base_that_is_not_there_names_the_adapter_s_config(adapter, tmp_path, monkeypatch, capsys):
    """peft records the path its base was loaded from, often relative (`../base`): run from elsewhere, it was "Model
    directory not found: ../base", without saying that the adapter's config named it, or from where it is read."""
    moved = _copy(adapter, tmp_path / "adapter")
    _edit_json(moved / "adapter_config.json", base_model_name_or_path="../models/base")
    monkeypatch.chdir(tmp_path)
    where = (f"(base_model_name_or_path of {moved / 'adapter_config.json'}, read from the current directory {tmp_path}) "
             "is not there: moved or deleted since?")
    assert _main(monkeypatch, capsys, "generate", "--adapter", str(moved), "--prompt", "12") == (
        f"error: The base model ../models/base {where} Give it with --model DIR.")
    assert _main(monkeypatch, capsys, "merge", "--adapter", str(moved), "--output", str(tmp_path / "merged")) == (
        f"error: The base model ../models/base {where} Give it with --base DIR.")


def test_cli_merge_of_an_adapter_with_a_bad_config(adapter, tmp_path, monkeypatch, capsys):
    broken = _copy(adapter, tmp_path / "adapter")
    _edit_json(broken / "adapter_config.json", r="eight")
    stderr = _main(monkeypatch, capsys, "merge", "--adapter", str(broken), "--output", str(tmp_path / "merged"))
    assert '"r" is "eight"; it should be a whole number' in stderr
    assert not (tmp_path / "merged").exists()


# ----------------------------------------------------------------------------- 5. memory that cannot exist


def test_absurd_rank_is_refused_before_loading(base, number_data, tmp_path):
    from peftkit.memory import check_fits, estimate_memory
    from peftkit.recipe import load_recipe

    recipe = load_recipe(make_recipe(tmp_path, base, number_data, adapter={"r": 10**9}))
    with pytest.raises(PeftkitError) as info:
        check_fits(estimate_memory(recipe), torch.device("cpu"))
    message = str(info.value)
    assert message.startswith("This run needs an estimated ") and " TiB before activations (weights " in message
    assert "of RAM on this machine. Most of it is the adapter, whose weights, gradients and optimizer state grow " \
           "with its size: lower adapter.r (8 to 64 is usual; adapter.init_r for adalora" in message


def test_usual_rank_fits(base, number_data, tmp_path):
    from peftkit.memory import check_fits, estimate_memory
    from peftkit.recipe import load_recipe

    check_fits(estimate_memory(load_recipe(make_recipe(tmp_path, base, number_data))), torch.device("cpu"))
    check_fits(None, torch.device("cpu"))  # no estimate (config unreadable): nothing to refuse


def test_base_too_large_for_the_device_suggests_quantization():
    from peftkit.memory import MemoryEstimate, check_fits

    with pytest.raises(PeftkitError) as error:
        check_fits(MemoryEstimate(base_weights=2.0**60, adapter=1, gradients=1, optimizer=0), torch.device("cpu"))
    # (QLoRA trains classifiers and reward models too since 180210f: it said "causal language models")
    assert str(error.value).endswith("Most of it is the base model's weights: load them 4-bit (a quantization section "
                                     "with method: nf4; classifiers and reward models too), or use a smaller model.")


def test_train_with_an_absurd_rank_is_refused(base, number_data, tmp_path):
    import io

    from rich.console import Console

    from peftkit.recipe import load_recipe
    from peftkit.train import train

    # 10**12: petabytes, so that even without the check the allocator refuses at once on any machine.
    recipe = load_recipe(make_recipe(tmp_path, base, number_data, adapter={"r": 10**12}))
    with pytest.raises(PeftkitError, match="adapter.r"):
        train(recipe, console=Console(file=io.StringIO()))


# ----------------------------------------------------------------------------- 6. target selection


def test_target_modules_entry_matching_nothing_is_named_even_when_others_match():
    from peftkit.adapters import find_targets

    model, _ = build_tiny_model(None, arch="llama", hidden_size=32, num_layers=1)
    with pytest.raises(PeftkitError) as info:
        find_targets(model, ["q_proj", "v_prj"])
    message = str(info.value)
    assert message.startswith("adapter.target_modules entry 'v_prj' (of ['q_proj', 'v_prj']) matches no module of "
                              "this model. Its linear/embedding layers are named: embed_tokens, q_proj, ")
    assert message.endswith("Use some of those names, or 'all-linear'. Did you mean 'v_proj'?")


def test_target_modules_typo_is_refused_by_the_estimate_before_loading(base, number_data, tmp_path):
    from peftkit.memory import estimate_memory
    from peftkit.recipe import load_recipe

    recipe = load_recipe(make_recipe(tmp_path, base, number_data, adapter={"target_modules": ["q_proj", "v_prj"]}))
    with pytest.raises(PeftkitError, match=r"entry 'v_prj' .* Did you mean 'v_proj'\?$"):
        estimate_memory(recipe)


def test_modules_to_save_typo_suggests_the_closest():
    from peftkit.adapters import inject_adapters
    from peftkit.methods.lora import LoraConfig

    model, _ = build_tiny_model(None, arch="llama", hidden_size=32, num_layers=1)
    with pytest.raises(PeftkitError) as info:
        inject_adapters(model, LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_haed"]))
    assert str(info.value) == ("adapter.modules_to_save: 'lm_haed' matches no module of this model (top-level "
                               "modules: model, lm_head). Did you mean 'lm_head'?")


# ----------------------------------------------------------------------------- 7. NaN adapters and losses


def test_nonfinite_tensors_names_them():
    from peftkit.adapters.state_dicts import nonfinite_tensors

    state = {"a": torch.zeros(2), "b": torch.tensor([1.0, float("nan")]), "c": torch.tensor([float("-inf")]),
             "ids": torch.tensor([1, 2])}
    assert nonfinite_tensors(state) == ["b", "c"]
    assert nonfinite_tensors({"a": torch.ones(3, dtype=torch.bfloat16)}) == []


def test_adapter_with_nan_weights_is_refused(adapter, tmp_path):
    broken = _copy(adapter, tmp_path / "adapter")
    state = load_file(broken / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    state[key][0, 0] = float("nan")
    save_file(state, broken / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PeftkitError) as info:
        _load_adapter(broken)
    assert str(info.value).startswith(f"{broken / 'adapter_model.safetensors'}: 1 of its 5 tensors hold NaN or inf "
                                      f"values (e.g. {key}): training diverged before this adapter was saved.")


def test_cli_eval_of_a_nan_adapter(adapter, base, number_data, tmp_path, monkeypatch, capsys):
    broken = _copy(adapter, tmp_path / "adapter")
    state = {k: torch.full_like(v, float("nan")) for k, v in load_file(broken / "adapter_model.safetensors").items()}
    save_file(state, broken / "adapter_model.safetensors", metadata={"format": "pt"})
    stderr = _main(monkeypatch, capsys, "eval", "--model", str(base), "--adapter", str(broken), "--data",
                   str(number_data["eval"]), "--format", "alpaca")
    assert "5 of its 5 tensors hold NaN or inf values" in stderr


def test_eval_of_a_model_with_a_nonfinite_loss(base, number_data, tmp_path):
    from peftkit.eval_job import eval_job
    from peftkit.evaluate import evaluate

    broken = _copy(base, tmp_path / "model")
    state = load_file(broken / WEIGHTS)
    state["model.norm.weight"][0] = float("inf")
    save_file(state, broken / WEIGHTS, metadata={"format": "pt"})
    with pytest.raises(PeftkitError) as info:
        evaluate(eval_job(None, [], str(broken), str(number_data["eval"]), "alpaca", None, None, None, None))
    assert str(info.value).startswith(f"{broken} produces a non-finite loss (nan) on {number_data['eval']}: its "
                                      "weights hold NaN/inf")
