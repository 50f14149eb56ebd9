"""`peftkit validate` against the recipe's model (`peftkit.model_checks`): train's refusals that config.json, the
tokenizer and an empty (meta-device) model decide, in train's words, without reading a weight: each is checked on a
copy of the model whose weights file is garbage, which any read would fail on."""

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from huggingface_hub import constants

from peftkit.tiny import build_char_tokenizer, write_jsonl
from tests.conftest import cli_user_error, make_recipe, unplaced
from tests.test_hub import _publish


def _garbage_weights(model: Path, out: Path) -> Path:
    """A copy of `model` whose model.safetensors is not safetensors: loading it fails at once."""
    shutil.copytree(model, out)
    (out / "model.safetensors").write_bytes(b"not safetensors")
    return out


def _tiny_mamba(out: Path) -> Path:
    """An attention-free model's config.json and tokenizer, and no weights file at all."""
    from transformers import MambaConfig

    tok = build_char_tokenizer(out)
    MambaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, state_size=4,
                pad_token_id=tok.pad_token_id).save_pretrained(out)
    return out


def _said(text: str) -> str:
    return " ".join(text.split())


def _refusal(monkeypatch, capsys, recipe: Path) -> tuple[str, str]:
    """(validate's error, train's error) for `recipe`: each exits 2 with a message and no traceback."""
    validated = unplaced(_said(cli_user_error(monkeypatch, capsys, "validate", str(recipe))), recipe)
    trained = _said(cli_user_error(monkeypatch, capsys, "train", str(recipe)))
    return validated, trained


@pytest.mark.parametrize(("case", "expected"), [
    ("target", "adapter.target_modules entry 'qq_proj' (of ['qq_proj']) matches no module of this model."),
    ("no_template", "data.format is 'chat' but the tokenizer has no chat_template"),
    ("no_template_entry", "data.train[1].format is 'chat' but the tokenizer has no chat_template"),
    ("llama_adapter", "adapter.adapter_layers: 5, but the model has 2 attention layers"),
    ("learned_positions", "data.max_length 600 is longer than the 512 positions"),
    ("mamba_prefix", "this mamba model's config has no num_attention_heads"),
    ("pissa_rank", "adapter.init: pissa takes r directions of 'model.layers.0.self_attn.q_proj''s (32, 32) weight; "
                   "adapter.r (40) is larger than 32. Lower adapter.r, give 'q_proj' a rank of at most 32 in "
                   "adapter.rank_pattern or leave it out (adapter.exclude_modules), or use init: default."),
    ("alora_vocab", "adapter.alora_invocation_tokens [5, 102]: token id 102 is past the tokenizer's 102 tokens (ids 0 "
                    "to 101), so no text holds the invocation and the adapter would never act."),
    ("flash_fp32", "model.attn_implementation: flash_attention_2 computes in float16 or bfloat16 only, and "
                   "model.dtype is float32. Set model.dtype: bfloat16"),
    ("flash_auto_fp32", "flash_attention_2 computes in float16 or bfloat16 only, and model.dtype is auto, the "
                        "checkpoint's float32."),
    ("no_eos", "data.format 'alpaca' ends each target with the tokenizer's EOS token, so the model learns to stop, and "
               "this tokenizer has none."),
])
def test_validate_refuses_as_train_without_reading_weights(case, expected, tiny_llama, tiny_gpt2, number_data,
                                                          tmp_path, monkeypatch, capsys):
    """Refusals train made only once a GPU job had started (the model's modules, its tokenizer, its architecture):
    validate says them in train's words, from a model whose weights cannot be read."""
    sections: dict = {"adapter": {"r": 4, "alpha": 8, "target_modules": ["qq_proj"]}}
    base = tiny_llama
    if case.startswith("no_template"):  # chat rows (all, or a list entry's), and a tokenizer without a template
        sections = {"data": {"format": "chat", "train": str(tmp_path / "chat.jsonl"), "eval": None}}
        if case == "no_template_entry":
            sections = {"data": {"train": [str(number_data["train"]), {"path": str(tmp_path / "chat.jsonl"),
                                                                        "format": "chat"}], "eval": None}}
        (tmp_path / "chat.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, '
                                             '{"role": "assistant", "content": "ho"}]}\n')
    elif case == "llama_adapter":
        sections = {"adapter": {"method": "llama_adapter", "adapter_len": 4, "adapter_layers": 5}}
    elif case == "learned_positions":  # GPT-2's 512 learned positions
        sections, base = {"data": {"max_length": 600}}, tiny_gpt2
    elif case == "mamba_prefix":
        sections = {"adapter": {"method": "prefix_tuning", "num_virtual_tokens": 4}}
    elif case == "alora_vocab":  # an id no text encodes to (it was said as one the data lacked, by train only)
        sections = {"adapter": {"r": 4, "alpha": 8, "target_modules": ["q_proj"], "alora_invocation_tokens": [5, 102]}}
    elif case == "no_eos":
        sections = {"adapter": {"r": 4, "alpha": 8, "target_modules": ["q_proj"]}}
    elif case.startswith("flash"):  # refused from the recipe and config.json alone, before any device is asked
        sections = {"model": {"attn_implementation": "flash_attention_2",
                              "dtype": "auto" if "auto" in case else "float32"}}
    elif case == "pissa_rank":  # a rank past the weight's: said from its shape, before the SVD needs the values
        sections = {"adapter": {"r": 40, "alpha": 80, "target_modules": "all-linear", "init": "pissa"}}
    model = _tiny_mamba(tmp_path / "mamba") if case == "mamba_prefix" else _garbage_weights(base, tmp_path / "model")
    if case.startswith("no_template"):
        (model / "chat_template.jinja").unlink()
    if case == "no_eos":  # a BERT-style tokenizer ([CLS] ... [SEP]): alpaca rows' targets cannot end with EOS
        from peftkit.tiny import build_encoder_tokenizer

        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            (model / name).unlink(missing_ok=True)
        build_encoder_tokenizer(model)
    model_keys = sections.pop("model", {})  # (make_recipe's `model` is the path)
    recipe = make_recipe(tmp_path / "r", model, number_data, **sections)
    if model_keys:
        raw = yaml.safe_load(recipe.read_text())
        recipe.write_text(yaml.safe_dump({**raw, "model": raw["model"] | model_keys}, sort_keys=False))
    if case in ("llama_adapter", "mamba_prefix"):  # the adapter section whole, not make_recipe's LoRA updated
        recipe.write_text(yaml.safe_dump({**yaml.safe_load(recipe.read_text()), **sections}, sort_keys=False))
    validated, trained = _refusal(monkeypatch, capsys, recipe)
    assert expected in validated, validated
    # train names the row it stopped at; the message is the same (a list entry's row: the tokenizer's fault)
    assert trained == validated or (case == "no_template" and trained.endswith(validated.removeprefix("error: "))) \
        or (case == "no_template_entry" and f"{tmp_path / 'chat.jsonl'}:1: " in trained
            and "the tokenizer has no chat_template" in trained), (trained, validated)


def test_validate_gives_the_tokenizer_the_recipes_chat_template(tiny_llama, tmp_path, monkeypatch, capsys):
    """data.chat_template on a base whose tokenizer has none: train renders the chat rows with it, so validate's
    tokenizer check must see it too, not refuse the tokenizer as template-less."""
    from peftkit.cli import main

    model = _garbage_weights(tiny_llama, tmp_path / "model")
    (model / "chat_template.jinja").unlink()
    (tmp_path / "chat.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, '
                                         '{"role": "assistant", "content": "ho"}]}\n')
    recipe = make_recipe(tmp_path / "r", model, {"train": tmp_path / "chat.jsonl", "eval": tmp_path / "chat.jsonl"},
                         data={"format": "chat", "eval": None, "chat_template": "chatml"})
    monkeypatch.setattr("sys.argv", ["peftkit", "validate", str(recipe)])
    main()  # (no SystemExit: valid)
    assert "# model checks (no weight read): LoRA r=4" in capsys.readouterr().out


@pytest.mark.parametrize("task", ["causal_lm", "classifier"])
def test_validate_counts_the_trainable_parameters_train_counts(task, tiny_llama, number_data, tmp_path, monkeypatch,
                                                               capsys):
    """A valid recipe: validate prints train's adapter line (its trainable count too), from a model whose weights
    cannot be read, and the printout stays YAML. A classifier's head has as many rows as data.train has classes (3
    here; config.json says 2), read from its rows as train reads them."""
    from peftkit.cli import main
    from tests.test_seqcls import classification_recipe

    adapter = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    training = {"max_steps": 1, "warmup_steps": 0}
    if task == "classifier":
        rows = [{"text": f"row {i}", "label": ["low", "mid", "high"][i % 3]} for i in range(12)]
        (tmp_path / "classes.jsonl").write_text("".join(f"{json.dumps(row)}\n" for row in rows))
        files = {"train": tmp_path / "classes.jsonl", "eval": tmp_path / "classes.jsonl"}
        recipe = classification_recipe(tmp_path, tiny_llama, files, adapter, training=training, data={"eval": None})
    else:
        recipe = make_recipe(tmp_path, tiny_llama, number_data, adapter=adapter, training=training, data={"eval": None})
    monkeypatch.setattr("sys.argv", ["peftkit", "train", str(recipe)])
    main()
    line = next(line for line in capsys.readouterr().out.splitlines() if "trainable of" in line)
    head = 3 * 32 if task == "classifier" else 0  # `score`: 3 classes x hidden 32, trained in full
    assert line.startswith(f"LoRA r=4 on 4 modules: {896 + head:,} trainable of"), line
    text = recipe.read_text().replace(str(tiny_llama), str(_garbage_weights(tiny_llama, tmp_path / "model")))
    recipe.write_text(text)
    monkeypatch.setattr("sys.argv", ["peftkit", "validate", str(recipe)])
    main()  # (no SystemExit: valid)
    out = capsys.readouterr().out
    assert f"# model checks (no weight read): {line}; adapted: q_proj, v_proj\n" in out, out
    assert yaml.safe_load(out)["adapter"]["r"] == 4


def test_a_hub_model_is_checked_from_the_local_cache_only(tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    """A hub id in the local Hugging Face cache is checked from there, online too, without a request to the hub; one
    that is not there is skipped with a note, and the recipe is still valid."""
    import huggingface_hub.file_download as download

    from peftkit.cli import main

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def no_network(*args, **kwargs):
        raise AssertionError("validate asked the hub")

    monkeypatch.setattr(download, "get_hf_file_metadata", no_network)
    _publish(cache, _garbage_weights(tiny_llama, tmp_path / "model"), "a" * 40)
    skipped = ("note: model checks skipped: model.name_or_path acme/other is no local directory, and as a hub id it "
               f"is not in the local Hugging Face cache ({cache}); validate downloads nothing.")
    for name, said in (("acme/tiny-llama", "# model checks (no weight read): LoRA r=4 on 14 modules"),
                       ("acme/other", skipped)):
        recipe = make_recipe(tmp_path, tiny_llama, number_data)
        recipe.write_text(recipe.read_text().replace(str(tiny_llama), name))
        monkeypatch.setattr("sys.argv", ["peftkit", "validate", str(recipe)])
        main()  # (no SystemExit: valid)
        captured = capsys.readouterr()
        assert said in _said(captured.out + captured.err), captured
        assert re.search(r"^model:$", captured.out, re.MULTILINE)


def test_validate_meets_the_4bit_layers_train_meets(tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    """KaSA refuses a 4-bit layer, which train met only once the quantized model had loaded (its memory estimate
    injects into unquantized layers): validate swaps its empty model's layers as from_pretrained does, and says it."""
    sections = {"adapter": {"r": 4, "alpha": 8, "target_modules": ["q_proj"], "kasa_config": {}},
                "quantization": {"method": "nf4"}}
    trained = _said(cli_user_error(monkeypatch, capsys, "train", str(make_recipe(tmp_path, tiny_llama, number_data,
                                                                                  **sections))))
    recipe = make_recipe(tmp_path, _garbage_weights(tiny_llama, tmp_path / "model"), number_data, **sections)
    validated = unplaced(_said(cli_user_error(monkeypatch, capsys, "validate", str(recipe))), recipe)
    assert validated == trained, (validated, trained)
    assert "adapter.kasa_config: 'model.layers.0.self_attn.q_proj' is a 4-bit/8-bit layer" in validated


@pytest.mark.parametrize(("sections", "expected"), [
    ({"adapter": {"method": "adalora", "init_r": 4, "target_r": 2, "tinit": 4, "tfinal": 4}},
     "adapter.tinit (4) + adapter.tfinal (4) leave no step of this run's 6 optimizer steps"),
    ({"adapter": {"method": "prefix_tuning", "num_virtual_tokens": 4}, "training": {"gradient_checkpointing": True}},
     "training.gradient_checkpointing: prefix tuning's key/value prefixes sit in the attention cache"),
])
def test_validate_makes_the_method_s_checks_of_the_run(sections, expected, tiny_llama, number_data, tmp_path,
                                                       monkeypatch, capsys):
    """What the method adds to the training loop checks the run (AdaLoRA's schedule against its steps, prefix tuning
    against gradient checkpointing): train said it after loading the model; validate says it where training.max_steps
    gives the run's steps without the data, and prefix tuning's, which no step count decides, without it too."""
    recipe = make_recipe(tmp_path, tiny_llama, number_data)
    raw = yaml.safe_load(recipe.read_text())
    for section, values in sections.items():  # the adapter section whole, not make_recipe's LoRA updated
        raw[section] = values if section == "adapter" else {**raw[section], **values}
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    trained = _said(cli_user_error(monkeypatch, capsys, "train", str(recipe)))
    recipe.write_text(recipe.read_text().replace(str(tiny_llama), str(_garbage_weights(tiny_llama, tmp_path / "m"))))
    validated = unplaced(_said(cli_user_error(monkeypatch, capsys, "validate", str(recipe))), recipe)
    assert validated == trained, (validated, trained)
    assert expected in validated
    if "tinit" not in expected:  # a check the steps do not decide: said without training.max_steps too
        raw = yaml.safe_load(recipe.read_text())
        del raw["training"]["max_steps"]
        recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
        assert unplaced(_said(cli_user_error(monkeypatch, capsys, "validate", str(recipe))), recipe) == trained


def test_validate_refuses_a_quantized_tied_head_as_train(number_data, tmp_path, monkeypatch, capsys):
    """An output head tied to the embeddings (Qwen2's small models) left out of quantization.skip_modules: train refused
    it once the quantized model had loaded; validate ties its empty quantized model's weights as from_pretrained does,
    and says it in train's words."""
    from peftkit.tiny import build_tiny_model

    build_tiny_model(tmp_path / "qwen2", arch="qwen2", hidden_size=32, num_layers=2, seed=0)
    capsys.readouterr()  # (transformers' progress bar of saving it)
    sections = {"quantization": {"method": "nf4", "skip_modules": []}}
    trained = _said(cli_user_error(monkeypatch, capsys, "train",
                                   str(make_recipe(tmp_path / "r", tmp_path / "qwen2", number_data, **sections))))
    recipe = make_recipe(tmp_path, _garbage_weights(tmp_path / "qwen2", tmp_path / "model"), number_data, **sections)
    validated = unplaced(_said(cli_user_error(monkeypatch, capsys, "validate", str(recipe))), recipe)
    assert validated == trained, (validated, trained)
    assert "quantization.skip_modules [] leaves out lm_head, the output head, and this model ties it" in validated


def _encoder_tokenized(model: Path, out: Path) -> Path:
    """`_garbage_weights` of `model` with a BERT-style tokenizer ([CLS] ... [SEP]): no EOS token."""
    from peftkit.tiny import build_encoder_tokenizer

    out = _garbage_weights(model, out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (out / name).unlink(missing_ok=True)
    build_encoder_tokenizer(out)
    return out


def _objective_recipe(root: Path, model: Path, rows: Path, fmt: str, objective: str) -> Path:
    """A recipe training `objective` on `rows` (train and eval) of data.format `fmt`; a reward model is a sequence
    classifier of one output."""
    recipe = make_recipe(root, model, {"train": rows, "eval": rows}, data={"format": fmt},
                         training={"objective": objective})
    if objective == "reward":
        raw = yaml.safe_load(recipe.read_text())
        recipe.write_text(yaml.safe_dump({**raw, "model": raw["model"] | {"task": "sequence_classification"}}))
    return recipe


@pytest.mark.parametrize("objective", ["dpo", "orpo", "simpo", "reward", "kto"])
def test_validate_refuses_text_answers_without_eos_as_train(objective, tiny_llama, number_data, tmp_path, monkeypatch,
                                                            capsys):
    """Preference pairs (DPO, ORPO, SimPO, a reward model) and KTO's unpaired rows of text end each answer with EOS:
    on a tokenizer without one, train refused them as it read the data, naming data.format 'completion' (which the
    recipe did not set) and advising data.format: chat; validate said nothing. Both now say it, in the same words;
    conversations (which end with the template's end of turn) are not refused for it, given a template."""
    model = _encoder_tokenized(tiny_llama, tmp_path / "model")
    unpaired = objective == "kto"
    if unpaired:
        rows = [{"prompt": f"q{i}", "completion": f"a{i}", "label": i % 2 == 0} for i in range(8)]
    else:
        rows = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(8)]
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps(row) + "\n" for row in rows))
    turns = tmp_path / "turns.jsonl"  # the same rows as conversations: the prompt a user message
    turns.write_text("".join(json.dumps(row | {"prompt": [{"role": "user", "content": row["prompt"]}]}) + "\n"
                             for row in rows))
    recipe = _objective_recipe(tmp_path / "r", model, text, "unpaired" if unpaired else "preference", objective)
    validated, trained = _refusal(monkeypatch, capsys, recipe)
    fields = "prompt and completion" if unpaired else "prompt, chosen and rejected"
    assert validated == trained, (validated, trained)
    assert validated == (f"error: data.format '{'unpaired' if unpaired else 'preference'}' rows of text ({fields} "
                         "strings) end each answer with the tokenizer's EOS token, so the model learns to stop, and "
                         "this tokenizer has none. Give it one (tokenizer_config.json's eos_token), or give the rows as "
                         f"conversations ({fields} as lists of messages) with a chat template that marks the end of "
                         "each turn."), validated
    raw = yaml.safe_load(recipe.read_text().replace(str(text), str(turns)))  # (conversations need a template)
    recipe.write_text(yaml.safe_dump({**raw, "data": raw["data"] | {"chat_template": "chatml"}}))
    from peftkit.cli import main

    monkeypatch.setattr("sys.argv", ["peftkit", "validate", str(recipe)])
    main()
    assert "# model checks (no weight read): " in capsys.readouterr().out


def test_a_model_check_s_error_says_where_the_recipe_gives_its_key(tiny_llama, number_data, tmp_path, monkeypatch,
                                                                   capsys):
    """validate's model checks named the key but not where, unlike the recipe's own errors: they say `recipe.yaml:N:`
    of the key they start with (its line in the file, counted here), or the --set that gave it; a message that starts
    with no key the recipe writes is left as train says it (train's own messages never change)."""
    recipe = make_recipe(tmp_path, _garbage_weights(tiny_llama, tmp_path / "model"), number_data,
                         adapter={"target_modules": ["qq_proj"]})
    line = recipe.read_text().splitlines().index("  target_modules:") + 1
    said = _said(cli_user_error(monkeypatch, capsys, "validate", str(recipe)))
    assert said.startswith(f"error: {recipe}:{line}: adapter.target_modules entry 'qq_proj' (of ['qq_proj']) matches "
                           "no module of this model."), said
    said = _said(cli_user_error(monkeypatch, capsys, "validate", str(recipe), "--set", "adapter.target_modules=[qk]"))
    assert said.startswith(f"error: {recipe} (--set adapter.target_modules): adapter.target_modules entry 'qk'"), said
    said = _said(cli_user_error(monkeypatch, capsys, "train", str(recipe)))
    assert said.startswith("error: adapter.target_modules entry 'qq_proj'"), said
    from peftkit.recipe.loader import located

    assert located(recipe, [], "The tokenizer has no pad token.") == "The tokenizer has no pad token."
    assert located(recipe, [], "adapter.dropout: x") == "adapter.dropout: x"  # a default's key: not in the file


@pytest.mark.parametrize("objective", ["dpo", "orpo", "simpo", "reward", "kto"])
def test_validate_refuses_conversations_without_a_template_as_train(objective, tiny_llama, tmp_path, monkeypatch,
                                                                    capsys):
    """Preference pairs (DPO, ORPO, SimPO, a reward model) and KTO's unpaired rows given as conversations are rendered
    by the chat template: on a tokenizer without one (the tiny Llama's, its template removed), train refused them as it read the data and
    validate said nothing. Both now say it, in the same words, validate with the recipe's line of data.format; with
    data.chat_template set, validate passes."""
    model = _garbage_weights(tiny_llama, tmp_path / "model")
    (model / "chat_template.jinja").unlink()
    unpaired = objective == "kto"
    user = [{"role": "user", "content": "q"}]
    if unpaired:
        rows = [{"prompt": user, "completion": f"a{i}", "label": i % 2 == 0} for i in range(8)]
    else:
        rows = [{"prompt": user, "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(8)]
    turns = tmp_path / "turns.jsonl"
    turns.write_text("".join(json.dumps(row) + "\n" for row in rows))
    fmt = "unpaired" if unpaired else "preference"
    recipe = _objective_recipe(tmp_path / "r", model, turns, fmt, objective)
    said = _said(cli_user_error(monkeypatch, capsys, "validate", str(recipe)))
    line = next(i for i, text in enumerate(recipe.read_text().splitlines(), 1) if text.strip() == f"format: {fmt}")
    assert said.startswith(f"error: {recipe}:{line}: data.format "), said
    validated, trained = _refusal(monkeypatch, capsys, recipe)
    fields = "prompt and completion" if unpaired else "prompt, chosen and rejected"
    assert validated == trained, (validated, trained)
    assert validated == (f"error: data.format '{fmt}' rows given as conversations need the tokenizer's chat_template, "
                         "and it has none (a base model's has none); set data.chat_template (chatml, llama3, a .jinja "
                         "file, or a tokenizer directory to copy it from), use a tokenizer with a template, or give "
                         f"the rows as text ({fields} strings)."), validated
    raw = yaml.safe_load(recipe.read_text())
    recipe.write_text(yaml.safe_dump({**raw, "data": raw["data"] | {"chat_template": "chatml"}}))
    from peftkit.cli import main

    monkeypatch.setattr("sys.argv", ["peftkit", "validate", str(recipe)])
    main()
    assert "# model checks (no weight read): " in capsys.readouterr().out


@pytest.mark.parametrize("listed", [False, True], ids=["file", "list"])
def test_validate_reads_the_rows_only_to_the_first_usable_one(listed, tiny_llama, tmp_path, monkeypatch, capsys):
    """validate reads a preference file's first usable row for its form, where the tokenizer lacks a chat template (or
    an EOS): it read the whole file (a 300k-row, 89 MB one: 15 s where an 8-row one takes 11 s), and a malformed line
    far past that row made the check give up, saying nothing. It reads no further than that row now: a line that
    does not parse after it changes nothing, and the verdict is that of the file without it (train's words); a
    malformed line before it is said as train says it, by the read of every pair for its bad rows (`check_pairs`,
    which needs the whole file). data.train as a list: its first entry's rows."""
    model = _garbage_weights(tiny_llama, tmp_path / "model")
    (model / "chat_template.jinja").unlink()
    user = [{"role": "user", "content": "q"}]
    rows = "".join(json.dumps({"prompt": user, "chosen": f"a{i}", "rejected": f"b{i}"}) + "\n" for i in range(8))
    clean, bad_after, bad_before = tmp_path / "clean.jsonl", tmp_path / "after.jsonl", tmp_path / "before.jsonl"
    clean.write_text(rows)
    bad_after.write_text(rows + "{not json\n")
    bad_before.write_text("{not json\n" + rows)
    said = {}
    for rows_file in (clean, bad_after, bad_before):
        recipe = _objective_recipe(tmp_path / rows_file.stem, model, rows_file, "preference", "dpo")
        if listed:
            raw = yaml.safe_load(recipe.read_text())
            raw["data"]["train"] = [str(rows_file), str(clean)]
            recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
        said[rows_file.stem] = unplaced(_said(cli_user_error(monkeypatch, capsys, "validate", str(recipe))), recipe)
    trained = _said(cli_user_error(monkeypatch, capsys, "train", str(_objective_recipe(tmp_path / "t", model, clean,
                                                                                        "preference", "dpo"))))
    malformed = _said(cli_user_error(monkeypatch, capsys, "train", str(_objective_recipe(
        tmp_path / "tb", model, bad_before, "preference", "dpo"))))
    assert said == {"clean": trained, "after": trained, "before": malformed}, (said, trained, malformed)
    assert f"{bad_before}:1: not a valid JSON object" in malformed, malformed
    assert trained.startswith("error: data.format 'preference' rows given as conversations need the tokenizer's "
                              "chat_template"), trained


@pytest.mark.parametrize("case", ["dpo", "dpo_named", "kto", "sft_chat", "sft_own_chat", "sft_own_completion",
                                  "sft_eval_alone_in_data_format"])
def test_validate_refuses_each_eval_set_s_rows_as_train(case, tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    """data.eval's sets were not checked: conversations in data.eval (one set, or one of several by name) beside
    data.train's rows of text, on a tokenizer without a chat template, and an SFT set whose own format needs a
    template (chat) or an EOS token (completion) the tokenizer lacks, were refused by train as it read the set, while
    validate passed. validate now says train's words, at the recipe's line of the set's format key; data.format: chat
    (every set read as chat) was, and still is, refused from data.train's check."""
    user = [{"role": "user", "content": "q"}]
    rows = {"pairs": [{"prompt": "q", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(4)],
            "turn_pairs": [{"prompt": user, "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(4)],
            "unpaired": [{"prompt": "q", "completion": f"a{i}", "label": i % 2 == 0} for i in range(4)],
            "turn_unpaired": [{"prompt": user, "completion": f"a{i}", "label": i % 2 == 0} for i in range(4)],
            "chat": [{"messages": user + [{"role": "assistant", "content": f"a{i}"}]} for i in range(4)]}
    for name, written in rows.items():
        write_jsonl(tmp_path / f"{name}.jsonl", written)
    path = {name: str(tmp_path / f"{name}.jsonl") for name in rows}
    data, training, key = {"format": "alpaca"}, {}, "format: alpaca"
    if case == "dpo":
        data, training, key = {"format": "preference", "train": path["pairs"], "eval": path["turn_pairs"]}, \
            {"objective": "dpo"}, "format: preference"
    elif case == "dpo_named":
        data, training, key = {"format": "preference", "train": path["pairs"],
                               "eval": {"text": path["pairs"], "turns": path["turn_pairs"]}}, {"objective": "dpo"}, \
            "format: preference"
    elif case == "kto":
        data, training, key = {"format": "unpaired", "train": path["unpaired"], "eval": path["turn_unpaired"]}, \
            {"objective": "kto"}, "format: unpaired"
    elif case == "sft_chat":
        data, key = {"format": "chat", "train": path["chat"], "eval": {"turns": path["chat"]}}, "format: chat"
    elif case == "sft_own_chat":
        data, key = {"eval": {"plain": str(number_data["eval"]), "turns": {"path": path["chat"], "format": "chat"}}}, \
            "format: chat"
    elif case == "sft_eval_alone_in_data_format":  # every data.train entry sets its own format: data.format (an
        # EOS one) is data.eval's alone, which data.train's check never reads
        data, key = {"format": "completion", "chat_template": "chatml", "columns": {
            "prompt": "instruction", "completion": "output"}, "train": [{"path": path["chat"], "format": "chat", "columns": {}}]}, \
            "format: completion"
    else:  # an EOS-less tokenizer given a template: chat rows train, a completion set cannot end its targets
        data, key = {"format": "chat", "train": path["chat"], "chat_template": "chatml",
                     "eval": {"turns": path["chat"], "text": {"path": str(number_data["eval"]),
                                                              "format": "completion", "columns": {
                                                                  "prompt": "instruction", "completion": "output"}}}},\
            "format: completion"
    model = _encoder_tokenized(tiny_llama, tmp_path / "model") if case.startswith("sft_e") or case.endswith(
        "completion") else \
        _garbage_weights(tiny_llama, tmp_path / "model")
    (model / "chat_template.jinja").unlink(missing_ok=True)
    recipe = make_recipe(tmp_path / "r", model, number_data, data=data, training=training)
    said = _said(cli_user_error(monkeypatch, capsys, "validate", str(recipe)))
    line = next(i for i, text in enumerate(recipe.read_text().splitlines(), 1) if text.strip() == key)
    assert said.startswith(f"error: {recipe}:{line}: "), said
    validated, trained = _refusal(monkeypatch, capsys, recipe)
    set_key = {"sft_chat": "data.format", "sft_own_chat": "data.eval.turns.format",
               "sft_own_completion": "data.eval.text.format", "sft_eval_alone_in_data_format": "data.format"}.get(case)
    if set_key is None:  # the rows' words: data.format's, as train says them
        assert validated == trained, (validated, trained)
        assert validated.startswith("error: data.format "), validated
    else:  # train names the row it stopped at
        assert trained.endswith(validated.removeprefix("error: ")) and validated.startswith(f"error: {set_key} "), \
            (validated, trained)


def test_validate_prints_the_memory_estimate_train_prints(tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    """docs/cli.md's table gives validate 'the memory estimate': it printed none. It prints train's line, the same
    figures (from the meta-device model: the weights cannot be read here), as a YAML comment."""
    from peftkit.cli import main

    recipe = make_recipe(tmp_path, tiny_llama, number_data, adapter={"r": 4, "target_modules": ["q_proj", "v_proj"]},
                         training={"max_steps": 1, "warmup_steps": 0}, data={"eval": None})
    monkeypatch.setattr("sys.argv", ["peftkit", "train", str(recipe)])
    main()
    trained = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Memory estimate: "))
    recipe.write_text(recipe.read_text().replace(str(tiny_llama), str(_garbage_weights(tiny_llama, tmp_path / "m"))))
    monkeypatch.setattr("sys.argv", ["peftkit", "validate", str(recipe)])
    main()
    out = capsys.readouterr().out
    assert f"\n# {trained}\n" in out, out
    assert yaml.safe_load(out)["adapter"]["r"] == 4
    # A GPU recipe validates here too (the device is not checked): its estimate holds no CPU runtime.
    monkeypatch.setattr("sys.argv", ["peftkit", "validate", str(recipe), "--set", "model.device=cuda"])
    main()
    out = capsys.readouterr().out
    assert trained.split(" + runtime")[0] + " = " in out and "runtime" not in out.split("# Memory estimate")[1], out
