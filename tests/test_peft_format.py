"""What export records about the base (`model.revision`, `trust_remote_code`) and how merge/eval use it."""

import json

import pytest

from peftkit.errors import PeftkitError
from tests.conftest import cli_user_error, make_recipe


@pytest.fixture(scope="module")
def pinned_run(tmp_path_factory, tiny_llama, number_data):
    """A 1-step run of a recipe that pins model.revision, exporting adapter/ and merged/."""
    from peftkit.recipe import load_recipe
    from peftkit.train import train

    tmp = tmp_path_factory.mktemp("pinned")
    recipe = make_recipe(tmp, tiny_llama, number_data, training={"max_steps": 1}, export={"merged": True})
    train(load_recipe(recipe, ["model.revision=v1.0"]))
    return tmp / "run"


def test_export_records_revision_and_remote_code(pinned_run, tiny_llama):
    config = json.loads((pinned_run / "adapter" / "adapter_config.json").read_text())
    assert config["revision"] == "v1.0"  # PEFT's own field: AutoPeftModelForCausalLM loads the base at it too
    meta = json.loads((pinned_run / "adapter" / "peftkit.json").read_text())
    assert meta["trust_remote_code"] is False
    merged_from = json.loads((pinned_run / "merged" / "peftkit.json").read_text())["merged_from"]
    assert merged_from == {"base_model_name_or_path": str(tiny_llama), "revision": "v1.0", "trust_remote_code": False}


def _capture_loads(monkeypatch) -> list[dict]:
    """The kwargs every base load passes to from_pretrained (transformers ignores `revision` for a local
    directory, so what reaches it is what we can check offline)."""
    from peftkit import modeling

    calls, real = [], modeling._from_pretrained

    def spy(name_or_path, kwargs, device, *task):
        calls.append({"name_or_path": name_or_path, **kwargs})
        return real(name_or_path, kwargs, device, *task)

    monkeypatch.setattr(modeling, "_from_pretrained", spy)
    return calls


def test_merge_loads_the_recorded_revision(pinned_run, tiny_llama, tmp_path, monkeypatch):
    from peftkit.merge import merge_adapter

    calls = _capture_loads(monkeypatch)
    merge_adapter(str(pinned_run / "adapter"), str(tmp_path / "merged"))
    assert [(c["name_or_path"], c["revision"], c["trust_remote_code"]) for c in calls] == [(str(tiny_llama), "v1.0", False)]
    assert json.loads((tmp_path / "merged" / "peftkit.json").read_text())["merged_from"]["revision"] == "v1.0"
    # Another --base is loaded as given: the recorded revision belongs to the recorded base.
    calls.clear()
    merge_adapter(str(pinned_run / "adapter"), str(tmp_path / "other"), base=str(tmp_path / "merged"))
    assert calls[0]["revision"] is None


def test_remote_code_base_needs_the_users_flag(pinned_run, tmp_path, monkeypatch, capsys, number_data):
    import shutil

    from peftkit.merge import merge_adapter

    adapter = tmp_path / "adapter"
    shutil.copytree(pinned_run / "adapter", adapter)
    meta = json.loads((adapter / "peftkit.json").read_text())
    (adapter / "peftkit.json").write_text(json.dumps({**meta, "trust_remote_code": True}))
    err = cli_user_error(monkeypatch, capsys, "merge", "--adapter", str(adapter), "--output", str(tmp_path / "m"))
    assert "--trust-remote-code" in err and "peftkit.json" in err
    err = cli_user_error(monkeypatch, capsys, "eval", "--model", str(pinned_run.parent / "run" / "merged"),
                         "--adapter", str(adapter), "--data", str(number_data["eval"]))
    assert "--trust-remote-code" in err
    with pytest.raises(PeftkitError, match="--trust-remote-code"):
        merge_adapter(str(adapter), str(tmp_path / "m"))
    calls = _capture_loads(monkeypatch)
    merge_adapter(str(adapter), str(tmp_path / "m"), trust_remote_code=True)
    assert calls[0]["trust_remote_code"] is True
    assert json.loads((tmp_path / "m" / "peftkit.json").read_text())["merged_from"]["trust_remote_code"] is True


def test_a_merged_model_keeps_the_base_s_generation_config_and_tokenizer_files(tiny_llama, tmp_path, monkeypatch):
    """The merged model was rebuilt from config.json: generation_config.json lost a chat model's end-of-turn token
    and its sampling defaults; its tokenizer was re-saved in transformers 5's layout (tokenizer_class
    TokenizersBackend, which transformers 4, llama.cpp's GGUF converter, cannot read) with peftkit's pad token
    added (EOS, where the base has none). Both are now the base's, byte for byte."""
    import filecmp
    import shutil

    from transformers import AutoTokenizer, GenerationConfig

    from peftkit.cli import main
    from peftkit.methods.lora import LoraConfig
    from tests.conftest import save_random_adapter

    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config | {"tokenizer_class": "PreTrainedTokenizerFast"}))
    (base / "special_tokens_map.json").unlink(missing_ok=True)
    GenerationConfig(eos_token_id=[2, 5], bos_token_id=1, do_sample=True, temperature=0.6, top_p=0.9).save_pretrained(base)
    assert AutoTokenizer.from_pretrained(base).pad_token is None
    adapter = save_random_adapter(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), tmp_path / "a", seed=1)
    monkeypatch.setattr("sys.argv", ["peftkit", "merge", "--adapter", str(adapter), "--output", str(tmp_path / "m")])
    main()
    merged = tmp_path / "m"
    kept = GenerationConfig.from_pretrained(merged)
    assert (kept.eos_token_id, kept.do_sample, kept.temperature, kept.top_p) == ([2, 5], True, 0.6, 0.9)
    tokenizer_files = [f.name for f in base.iterdir() if f.name.startswith(("tokenizer", "chat_template"))]
    assert tokenizer_files and all(filecmp.cmp(base / f, merged / f, shallow=False) for f in tokenizer_files)
    assert AutoTokenizer.from_pretrained(merged).pad_token is None
    other = save_random_adapter(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), tmp_path / "b", seed=2)
    monkeypatch.setattr("sys.argv", ["peftkit", "merge", "--adapter", str(adapter), "--adapter", str(other),
                                     "--weights", "0.5,0.5", "--method", "linear", "--into-base", "--output",
                                     str(tmp_path / "c")])
    main()  # several adapters combined into the base: the same
    assert GenerationConfig.from_pretrained(tmp_path / "c").eos_token_id == [2, 5]
    assert all(filecmp.cmp(base / f, tmp_path / "c" / f, shallow=False) for f in tokenizer_files)
