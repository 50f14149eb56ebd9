"""data.chat_template: a recipe's chat template on a tokenizer without one (a base model's), or in place of its own."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from peftkit.data.chat_templates import CHATML, LLAMA3
from peftkit.data.examples import IGNORE_INDEX
from peftkit.modeling import load_tokenizer
from peftkit.recipe import load_recipe
from peftkit.tiny import CHAT_TEMPLATE, write_jsonl
from tests.conftest import cli_user_error, make_recipe

CONVERSATIONS = [
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
     {"role": "assistant", "content": "ciao"}],
]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, tiny_llama) -> Path:
    """The tiny Llama with a tokenizer that has no chat template, as a base model's."""
    path = tmp_path_factory.mktemp("models") / "base"
    shutil.copytree(tiny_llama, path)
    for f in path.glob("chat_template.*"):
        f.unlink()
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # transformers 4's name (5 saves TokenizersBackend)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat-data")
    rows = [{"messages": CONVERSATIONS[i % 2]} for i in range(8)]
    write_jsonl(root / "train.jsonl", rows)
    write_jsonl(root / "eval.jsonl", rows[:4])
    return {"train": root / "train.jsonl", "eval": root / "eval.jsonl"}


def chat_recipe(tmp_path: Path, model: Path, data: dict[str, Path], template, **data_keys) -> Path:
    return make_recipe(tmp_path, model, data, data={"format": "chat", "chat_template": template, "max_length": 256,
                                                      **data_keys})


def _chatml_labels(messages: list[dict], turns: set[int] | None = None) -> tuple[str, list[bool]]:
    """ChatML's text of `messages`, and for each of its characters (one token each, the character tokenizer's)
    whether it is trained: each answer (those of indices `turns` where given) and its <|im_end|>, not the newline
    after it."""
    text, trained = "", []
    for i, m in enumerate(messages):
        head = f"<|im_start|>{m['role']}\n"
        body = m["content"] + "<|im_end|>"
        text += head + body + "\n"
        answer = m["role"] == "assistant" if turns is None else i in turns
        trained += [False] * len(head) + [answer] * len(body) + [False]
    return text, trained


def test_chatml_on_a_base_tokenizer_trains_exactly_the_assistant_turns(tmp_path, base_model, chat_data):
    from peftkit.data import load_examples

    cfg = load_recipe(chat_recipe(tmp_path, base_model, chat_data, "chatml"))
    assert load_tokenizer(cfg.model).chat_template is None  # the base's own: none
    tok = load_tokenizer(cfg.model, cfg.data.chat_template)
    assert tok.chat_template == CHATML
    examples, _ = load_examples(tok, cfg.data.train, "train", cfg.data)
    for example, messages in zip(examples, CONVERSATIONS, strict=False):
        text, trained = _chatml_labels(messages)
        assert tok.decode(example.input_ids) == text and len(example.input_ids) == len(text)
        assert example.labels == [t if keep else IGNORE_INDEX for t, keep in zip(example.input_ids, trained,
                                                                                 strict=True)]


def test_chatml_trains_the_turns_the_rows_mark(tmp_path, base_model, monkeypatch, capsys):
    """`"train": false` on an assistant message (ShareGPT's `"weight": 0`) masks it, `true` (1) trains it under
    data.train_on: last_answer too; the marks were ignored. A mark that is not true or false is a bad row."""
    from peftkit.data import load_examples

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello", "train": True}, {"role": "user", "content": "so?"},
                {"role": "assistant", "content": "so so", "train": False}, {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "ciao"}]
    sharegpt = {"system": "Be brief.", "conversations": [
        {"from": "human" if m["role"] == "user" else "gpt", "value": m["content"],
         "weight": {True: 1, False: 0}.get(m.get("train"))} for m in messages[1:]]}
    data = {"train": tmp_path / "train.jsonl", "eval": tmp_path / "train.jsonl"}
    write_jsonl(data["train"], [{"messages": messages}, sharegpt])
    for train_on, turns in (("answers", {2, 6}), ("last_answer", {2, 6}), ("all", None)):
        cfg = load_recipe(chat_recipe(tmp_path, base_model, data, "chatml", train_on=train_on))
        tok = load_tokenizer(cfg.model, cfg.data.chat_template)
        examples, _ = load_examples(tok, cfg.data.train, "train", cfg.data)
        text, trained = _chatml_labels(messages, turns)
        if turns is None:  # all: every token but those of the answer marked false
            unmarked = _chatml_labels(messages, {4})[1]
            trained = [not false for false in unmarked]
        for example in examples:
            assert tok.decode(example.input_ids) == text and len(example.input_ids) == len(text)
            assert example.labels == [t if keep else IGNORE_INDEX for t, keep in zip(example.input_ids, trained,
                                                                                     strict=True)]
    turns = sharegpt["conversations"]
    halfway = {"from": "gpt", "value": "so so", "weight": 0.5}
    write_jsonl(data["train"], [{"messages": messages},
                                sharegpt | {"conversations": [*turns[:3], halfway, *turns[4:]]}])
    err = cli_user_error(monkeypatch, capsys, "preview", str(chat_recipe(tmp_path, base_model, data, "chatml")))
    assert ("train.jsonl:2: conversations[3].weight is a number (0.5); give 0 (not trained) or 1 (trained), or null "
            "or none for its role's default for data.format 'chat'") in " ".join(err.split())


def test_llama3_puts_the_bos_first_and_trains_trimmed_answers_with_their_eot(tmp_path, base_model, chat_data):
    from peftkit.data.conversations import _chat_example

    cfg = load_recipe(chat_recipe(tmp_path, base_model, chat_data, "llama3"))
    tok = load_tokenizer(cfg.model, cfg.data.chat_template)
    ids, labels = _chat_example(tok, [{"role": "user", "content": "hi "}, {"role": "assistant", "content": " 4 "}])
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids[1:]) == ("<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                                   "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>")
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == "4<|eot_id|>"


def test_a_template_replaces_the_tokenizer_s_own_and_a_recipe_without_the_key_keeps_it(tmp_path, tiny_llama,
                                                                                       chat_data):
    plain = load_recipe(make_recipe(tmp_path / "plain", tiny_llama, chat_data, data={"format": "chat"}))
    assert plain.data.chat_template is None and "chat_template: null" in plain.to_yaml()
    assert load_tokenizer(plain.model, plain.data.chat_template).chat_template == CHAT_TEMPLATE
    replaced = load_recipe(chat_recipe(tmp_path / "replaced", tiny_llama, chat_data, "llama3"))
    assert load_tokenizer(replaced.model, replaced.data.chat_template).chat_template == LLAMA3


def test_a_jinja_file_a_tokenizer_directory_or_the_text_itself(tmp_path, base_model, tiny_llama, chat_data):
    """A .jinja file relative to the recipe's directory, whatever the working directory, or a tokenizer directory to
    copy from, is read into the recipe: a run's recipe.yaml keeps the template it trained with."""
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "mine.jinja").write_text(CHATML)
    from_file = load_recipe(chat_recipe(tmp_path, base_model, chat_data, "templates/mine.jinja"))
    assert from_file.data.chat_template == CHATML
    assert yaml.safe_load(from_file.to_yaml())["data"]["chat_template"] == CHATML
    assert load_recipe(chat_recipe(tmp_path, base_model, chat_data, str(tiny_llama))).data.chat_template == CHAT_TEMPLATE
    assert load_recipe(chat_recipe(tmp_path, base_model, chat_data, LLAMA3)).data.chat_template == LLAMA3
    named = tmp_path / "named"  # transformers 4's named templates in tokenizer_config.json: the default one
    named.mkdir()
    (named / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "{{ 'tools' }}"}, {"name": "default", "template": CHATML}]}))
    assert load_recipe(chat_recipe(tmp_path, base_model, chat_data, str(named))).data.chat_template == CHATML


def test_bad_values_are_recipe_errors_that_name_the_key(tmp_path, base_model, chat_data, monkeypatch, capsys):
    def said(template, **data_keys) -> str:
        recipe = chat_recipe(tmp_path, base_model, chat_data, template, **data_keys)
        return cli_user_error(monkeypatch, capsys, "validate", str(recipe))

    unknown = said("chatm")
    assert "data.chat_template: 'chatm' is not a built-in template (chatml, llama3)" in unknown
    assert "Did you mean 'chatml'?" in unknown and "a .jinja file (relative to the recipe's directory)" in unknown
    assert f"there is no file or directory {tmp_path / 'missing.jinja'}" in said("missing.jinja")
    broken = said("{% for m in messages %}{{ m['content'] }}")
    assert "data.chat_template: the template does not render a one-message conversation: TemplateSyntaxError" in broken
    assert "use a built-in one (chatml, llama3)" in broken
    assert "data.chat_template: the value is empty" in said(" ")
    assert "holds no chat template" in said(str(base_model))
    other = said("chatml", format="alpaca")
    assert "data.chat_template is the template of chat conversations, and data.format is alpaca" in other


def test_the_cache_key_changes_with_the_template(tmp_path, base_model, chat_data):
    from peftkit.data import load_examples

    cfg = load_recipe(chat_recipe(tmp_path, base_model, chat_data, "chatml"))
    chatml = load_tokenizer(cfg.model, "chatml")
    llama3 = load_tokenizer(cfg.model, "llama3")
    assert "cached" not in load_examples(chatml, cfg.data.train, "train", cfg.data)[1]
    assert "cached" not in load_examples(llama3, cfg.data.train, "train", cfg.data)[1]
    assert "cached" in load_examples(load_tokenizer(cfg.model, "chatml"), cfg.data.train, "train", cfg.data)[1]


def test_an_end_marker_that_is_no_token_is_warned_and_a_special_one_stops_generation(tmp_path, base_model,
                                                                                     chat_data):
    from peftkit.data import describe_stats, load_examples
    from peftkit.data.conversations import turn_end_token

    cfg = load_recipe(chat_recipe(tmp_path, base_model, chat_data, "chatml"))
    tok = load_tokenizer(cfg.model, cfg.data.chat_template)
    assert turn_end_token(tok) is None
    lines = describe_stats(load_examples(tok, cfg.data.train, "train", cfg.data)[1], cfg.data)
    assert any(line.startswith("warning: data.chat_template ends each assistant turn with '<|im_end|>', which is "
                               "not a token of this tokenizer") and "generation does not stop at it" in line
               for line in lines), lines
    tok = load_tokenizer(cfg.model, cfg.data.chat_template)  # (a new one: turn_end_token keeps its answers)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    assert turn_end_token(tok) == tok.convert_tokens_to_ids("<|im_end|>")
    lines = describe_stats(load_examples(tok, cfg.data.train, "train", cfg.data)[1], cfg.data)
    assert not any("<|im_end|>" in line for line in lines), lines


@pytest.fixture(scope="module")
def chatml_run(tmp_path_factory, base_model, chat_data) -> Path:
    """A run trained with data.chat_template: chatml on the base model, its adapter/ and merged/ exported."""
    from rich.console import Console

    from peftkit.train import train

    root = tmp_path_factory.mktemp("chatml-run")
    recipe = chat_recipe(root, base_model, chat_data, "chatml", eval=None)
    cfg = load_recipe(recipe, ["training.max_steps=2", "export.merged=true"])
    train(cfg, console=Console(quiet=True))
    return root / "run"


def test_eval_generate_and_chat_with_a_run_directory_use_its_template(chatml_run, base_model):
    """`peftkit generate RUN_DIR --chat` renders with the run's template; --model alone keeps the tokenizer's own."""
    from peftkit.decoding import Sampling
    from peftkit.generate import generate_job

    assert yaml.safe_load((chatml_run / "recipe.yaml").read_text())["data"]["chat_template"] == "chatml"
    job = generate_job(chatml_run, [], None, None, ["hi"], None, None, True, None, Sampling(), 8)
    tok = job.source.tokenizer()
    assert tok.chat_template == CHATML
    assert job.build_prompts(tok)[0].text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    plain = generate_job(None, [], str(base_model), None, ["hi"], None, None, False, None, Sampling(), 8)
    assert plain.source.tokenizer().chat_template is None


def test_the_adapter_and_the_merged_model_carry_the_template(chatml_run, base_model, tmp_path):
    """adapter/ holds chat_template.jinja (hashed in the manifest, so verify checks it), merged/'s tokenizer has the
    template in the base's own files, and so has `peftkit merge` of the adapter, and `generate --adapter` without a
    recipe uses it."""
    from transformers import AutoTokenizer

    from peftkit.decoding import Sampling
    from peftkit.generate import generate_job
    from peftkit.merge import merge_adapter

    assert (chatml_run / "adapter" / "chat_template.jinja").read_text(encoding="utf-8") == CHATML
    assert "adapter/chat_template.jinja" in json.loads((chatml_run / "manifest.json").read_text())["outputs_sha256"]
    merge_adapter(str(chatml_run / "adapter"), str(tmp_path / "merged"))
    for merged in (chatml_run / "merged", tmp_path / "merged"):
        assert AutoTokenizer.from_pretrained(merged).chat_template == CHATML
        # the base's files, as transformers 4, TGI and llama.cpp's converter read them, with the template written in
        assert (merged / "tokenizer.json").read_bytes() == (base_model / "tokenizer.json").read_bytes()
        assert json.loads((merged / "tokenizer_config.json").read_text()) == {
            **json.loads((base_model / "tokenizer_config.json").read_text()), "chat_template": CHATML}
        assert not (merged / "chat_template.jinja").exists()
    job = generate_job(None, [], str(base_model), str(chatml_run / "adapter"), ["hi"], None, None, True, None,
                       Sampling(), 8)
    assert job.source.tokenizer().chat_template == CHATML


def test_a_run_without_the_key_exports_no_template_file(tmp_path, tiny_llama, number_data):
    from rich.console import Console

    from peftkit.train import train

    train(load_recipe(make_recipe(tmp_path, tiny_llama, number_data), ["training.max_steps=1"]),
          console=Console(quiet=True))
    assert sorted(p.name for p in (tmp_path / "run" / "adapter").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "peftkit.json"]  # (README.md: the model card)


@pytest.mark.parametrize("template", [CHATML, LLAMA3])
def test_the_built_ins_train_what_transformers_assistant_mask_marks(template):
    """Their `{% generation %}` blocks mark the tokens peftkit trains (TRL's assistant_only_loss reads them)."""
    from peftkit.data.conversations import _chat_example
    from peftkit.tiny import build_char_tokenizer

    tok = build_char_tokenizer()
    tok.chat_template = template
    ids, labels = _chat_example(tok, CONVERSATIONS[1])
    marked = tok.apply_chat_template(CONVERSATIONS[1], tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
    assert marked["input_ids"] == ids
    assert [bool(m) for m in marked["assistant_masks"]] == [label != IGNORE_INDEX for label in labels]


def test_a_replaced_template_is_written_over_the_base_s_own_in_the_merged_files(tiny_llama, tmp_path):
    """An instruct model's chat_template.jinja (which transformers 5 reads first) gets the new template too."""
    from transformers import AutoTokenizer

    from peftkit.merge import save_tokenizer
    from peftkit.recipe import ModelConfig

    assert (tiny_llama / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_llama)), "llama3")
    save_tokenizer(tok, tmp_path, str(tiny_llama))
    assert (tmp_path / "chat_template.jinja").read_text() == LLAMA3
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"] == LLAMA3
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == LLAMA3
    assert (tmp_path / "tokenizer.json").read_bytes() == (tiny_llama / "tokenizer.json").read_bytes()
