"""`peftkit preview`: examples shown token by token, masked (label -100) apart from trained, with their
counts and whether the target kept its end; checked against hand-built masks and the exact text printed.

The model directory holds a tokenizer and config.json but no weights: a preview that loaded the model
would fail."""

import io
import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from peftkit.cli import app
from peftkit.errors import PeftkitError
from peftkit.data import IGNORE_INDEX, Example, load_examples
from peftkit.preview import TRAINED_STYLE, is_plain, preview, render_tokens
from peftkit.recipe import DataConfig, load_recipe
from peftkit.tiny import build_char_tokenizer, write_jsonl

TOK = build_char_tokenizer()
BOS, EOS = TOK.bos_token_id, TOK.eos_token_id
X = IGNORE_INDEX

ROWS = [
    {"prompt": "2+2=", "completion": "4"},  # <s> + 4 + 1 + </s> = 7 tokens
    {"prompt": "Say hi:", "completion": " hello there"},  # 8 + 13 = 21 tokens: cut at 12 after " hel"
    {"prompt": "a", "completion": "b"},
]


def ids(text: str) -> list[int]:
    return TOK.convert_tokens_to_ids(list(text))


def _model_dir(tmp_path, chat_template=None):
    """Tokenizer and config, no weights."""
    from transformers import LlamaConfig

    path = tmp_path / "tok-only"
    tok = build_char_tokenizer()
    if chat_template:
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.chat_template = chat_template
    tok.save_pretrained(path)
    LlamaConfig(vocab_size=len(TOK), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(path)
    return path


def _recipe(tmp_path, rows, chat_template=None, **data):
    write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = {"model": {"name_or_path": str(_model_dir(tmp_path, chat_template))},
              "data": {"train": "train.jsonl", "format": "completion", "max_length": 12, **data},
              "export": {"output_dir": "run"}}
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))  # JSON is YAML
    return tmp_path / "r.yaml"


def _preview(recipe_path, n=3, **kw) -> str:
    out = io.StringIO()
    preview(load_recipe(recipe_path), n, Console(file=out, width=80), **kw)  # a file, not a terminal: plain
    return out.getvalue()


def test_plain_rendering_delimits_masked_and_trained_tokens():
    example = Example([BOS, *ids("ab\ncd"), EOS], [X, X, X, X, *ids("cd"), EOS])
    assert render_tokens(TOK, example, plain=True).plain == "[<s>ab↵\n]«cd</s>»"
    assert render_tokens(TOK, example, plain=True, cut=True).plain == "[<s>ab↵\n]«cd</s>» ✂"
    a, b, nl, c, d = ids("ab\ncd")
    assert render_tokens(TOK, example, plain=True, show_ids=True).plain == (
        f"[<s>⟨{BOS}⟩a⟨{a}⟩b⟨{b}⟩↵⟨{nl}⟩\n]«c⟨{c}⟩d⟨{d}⟩</s>⟨{EOS}⟩»")


def test_styled_rendering_colours_the_same_tokens():
    example = Example([BOS, *ids("ab\ncd"), EOS], [X, X, X, X, *ids("cd"), EOS])
    text = render_tokens(TOK, example, plain=False)
    assert text.plain == "<s>ab↵\ncd</s>"  # no delimiters: the styles tell the parts apart

    def styled(style):
        return "".join(text.plain[s.start : s.end] for s in text.spans if s.style == style)

    assert styled("dim") == "<s>ab↵"
    assert styled(TRAINED_STYLE) == "cd</s>"


def test_plain_when_not_a_terminal_or_no_color(monkeypatch):
    assert is_plain(Console(file=io.StringIO()))
    assert not is_plain(Console(file=io.StringIO(), force_terminal=True, color_system="standard"))
    monkeypatch.setenv("NO_COLOR", "1")
    assert is_plain(Console(file=io.StringIO(), force_terminal=True, color_system="standard"))


def test_preview_prints_examples_counts_and_whether_the_end_survived(tmp_path):
    recipe = _recipe(tmp_path, ROWS)
    data = tmp_path / "train.jsonl"
    assert _preview(recipe, n=2) == (
        f"data.train {data}: format completion, data.max_length 12, the first 2 of 3 rows\n"
        "legend: [masked: no loss (label -100)] «trained: loss»  ↵ newline  ✂ cut at data.max_length\n"
        "\n"
        f"example 1  {data}:1: 7 tokens, 2 trained; end of target (EOS / end-of-turn): trained\n"
        "[<s>2+2=]«4</s>»\n"
        "\n"
        f"example 2  {data}:2: 12 of 21 tokens (cut at data.max_length=12), 4 trained; end of target "
        "(EOS / end-of-turn): CUT, its last 9 target tokens lie beyond data.max_length; trained as cut "
        "(data.truncation: keep)\n"
        "[<s>Say hi:]« hel» ✂\n"
        "\n"
        "3 training examples; 1 of 3 cut at data.max_length=12 tokens\n"
        "warning: 1 of 3 examples lost the end of their target (the EOS / end-of-turn the model should learn to stop "
        "on) to data.max_length=12 and are trained as cut (data.truncation: keep), so the model is not taught to "
        "stop after them. Raise data.max_length, or set data.truncation: drop to leave them out.\n"
    )


def test_preview_prints_training_s_packing_line(tmp_path):
    """With data.packing, the counts end with the line `peftkit train` prints: 7 + 4 tokens in one row of 12, the
    cut example (12) in another."""
    printed = _preview(_recipe(tmp_path, [ROWS[0], ROWS[2], ROWS[1]], packing=True), n=1)
    assert printed.endswith("data.packing: 3 examples in 2 rows of up to 12 tokens (96% filled)\n")


def test_preview_shows_what_error_and_no_target_mean(tmp_path):
    rows = [ROWS[1], {"prompt": "x" * 20, "completion": "y"}]
    out = _preview(_recipe(tmp_path, rows, truncation="error"))
    data = tmp_path / "train.jsonl"
    assert "CUT, its last 9 target tokens lie beyond data.max_length; training stops here (data.truncation: error)" in out
    assert (f"example 2  {data}:2: 12 of 23 tokens (cut at data.max_length=12), 0 trained; no target token within "
            "data.max_length: training stops here (data.truncation: error)\n[<s>xxxxxxxxxxx] ✂\n") in out
    assert out.endswith(
        f"training would stop: {data}:1: this example has 21 tokens but data.max_length is 12, so its last 9 target "
        "tokens, with the EOS / end-of-turn the model should learn to stop on, are cut (data.truncation: error). "
        "1 more example is cut the same way; the longest has 23 tokens. Raise data.max_length to 23, or set "
        "data.truncation: drop to leave such examples out (keep trains on them as cut).\n")
    out = _preview(_recipe(tmp_path, rows, truncation="keep"))
    assert (f"example 2  {data}:2: 12 of 23 tokens (cut at data.max_length=12), 0 trained; dropped: no target token "
            "within data.max_length\n[<s>xxxxxxxxxxx] ✂\n") in out


def test_chat_preview_matches_the_hand_built_mask(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"}]
    recipe = _recipe(tmp_path, [{"messages": messages}], format="chat", max_length=64)
    # Everything up to and including the assistant header is masked; "yo</s>" is trained, not the newline after.
    prompt = ids("<|system|>\nBe brief.") + [EOS] + ids("\n<|user|>\nhi") + [EOS] + ids("\n<|assistant|>\n")
    (example,), _ = load_examples(TOK, str(tmp_path / "train.jsonl"), "train", DataConfig(
        train=str(tmp_path / "train.jsonl"), format="chat", max_length=64))
    assert example.input_ids == prompt + ids("yo") + [EOS] + ids("\n")
    assert example.labels == [X] * len(prompt) + ids("yo") + [EOS] + [X] * len(ids("\n"))
    out = _preview(recipe)
    assert len(prompt) == 49  # 20 + </s> + 12 + </s> + 15
    assert ": 53 tokens, 3 trained; end of target (EOS / end-of-turn): trained\n" in out
    assert "[<|system|>↵\nBe brief.</s>↵\n<|user|>↵\nhi</s>↵\n<|assistant|>↵\n]«yo</s>»[↵\n]\n" in out


# Qwen2.5's template in miniature (as in test_truncation.py): a default system prompt when there is none.
QWEN_STYLE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NO_SYSTEM = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


def test_chat_preview_shows_the_injected_system_prompt_and_warns(tmp_path):
    out = _preview(_recipe(tmp_path, [{"messages": NO_SYSTEM}], chat_template=QWEN_STYLE, format="chat",
                           max_length=100))
    assert ("[<|im_start|>system↵\nYou are a helpful assistant.<|im_end|>↵\n<|im_start|>user↵\n2+2?<|im_end|>↵\n"
            "<|im_start|>assistant↵\n]«4<|im_end|>»[↵\n]\n") in out
    assert out.endswith("1 training example\nwarning: the chat template adds a default system prompt of 27 tokens (27% "
                        "of data.max_length=100) to each of the 1 conversations without a system message; it is masked "
                        "from the loss but takes room the answers need. Add a short explicit system message to those "
                        "conversations, or raise data.max_length.\n")


def test_preview_renders_with_the_recipe_s_data_chat_template(tmp_path):
    """The char tokenizer's own template is `<|role|>` lines; data.chat_template: chatml replaces it (its marker no
    token of this tokenizer: said)."""
    out = io.StringIO()
    recipe = load_recipe(_recipe(tmp_path, [{"messages": NO_SYSTEM}], format="chat", max_length=100),
                         ["data.chat_template=chatml"])
    preview(recipe, 1, Console(file=out, width=80))
    assert "[<|im_start|>user↵\n2+2?<|im_end|>↵\n<|im_start|>assistant↵\n]«4<|im_end|>»[↵\n]\n" in out.getvalue()
    assert "warning: data.chat_template ends each assistant turn with '<|im_end|>'" in out.getvalue()


def test_cli_preview_with_overrides_and_ids(tmp_path):
    recipe = _recipe(tmp_path, ROWS)
    result = CliRunner().invoke(app, ["preview", str(recipe), "--n", "1", "--show-ids",
                                      "--set", "data.truncation=drop"])
    assert result.exit_code == 0, result.output
    four, plus, equals = ids("4"), ids("+"), ids("=")
    assert (f"[<s>⟨{BOS}⟩2⟨{ids('2')[0]}⟩+⟨{plus[0]}⟩2⟨{ids('2')[0]}⟩=⟨{equals[0]}⟩]«4⟨{four[0]}⟩</s>⟨{EOS}⟩»\n"
            in result.output)
    assert ("2 training examples; 1 of 3 cut at data.max_length=12 tokens; dropped 1 whose target lost its end "
            "(data.truncation: drop)\n") in result.output
    assert "warning" not in result.output  # drop leaves nothing trained without its end


def test_cli_help_shows_flags(tmp_path):
    result = CliRunner().invoke(app, ["preview", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0
    assert "--show-ids" in result.output and "--show-ids <" not in result.output
    assert "--n" in result.output and "Loads the tokenizer, not the model." in " ".join(result.output.split())


def test_a_character_split_over_byte_tokens_shows_whole():
    """A byte-level BPE splits `東` and `😀` over byte tokens; each token decoded alone is U+FFFD, which preview showed
    (`«�⟨30679⟩�⟨126⟩…»` for SmolLM2). The pieces join to the decoded text, and none is half a character."""
    from peftkit.data import Example
    from peftkit.preview import _pieces, render_tokens
    from tests.test_data import _byte_level_tokenizer

    tok = _byte_level_tokenizer(trim_offsets=False)
    ids = tok("Paris 東京 😀 is", add_special_tokens=False)["input_ids"]
    assert len(ids) > len("Paris 東京 😀 is".split()) + 6  # the characters really are split over tokens
    pieces = _pieces(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == "Paris 東京 😀 is" and not any("\ufffd" in p for p in pieces)
    shown = render_tokens(tok, Example(ids, ids), plain=True).plain
    assert shown == "«Paris 東京 😀 is»"


def test_a_row_s_control_characters_are_shown_not_obeyed():
    """A dataset row's escape sequences (`\x1b[2J` clears the screen) reached the terminal raw through a byte-level
    tokenizer, which decodes them back; they show as `\x1b`, as in every other printed row."""
    import io

    from rich.console import Console

    from peftkit.data import Example
    from peftkit.preview import render_tokens
    from tests.test_data import _byte_level_tokenizer

    tok = _byte_level_tokenizer(trim_offsets=False)
    ids = tok("Say \x1b[2J\x1b[31mred\x07!", add_special_tokens=False)["input_ids"]
    out = io.StringIO()
    Console(file=out, force_terminal=True).print(render_tokens(tok, Example(ids, ids), plain=True), markup=False,
                                                 highlight=False, soft_wrap=True)
    assert out.getvalue() == "«Say \\x1b[2J\\x1b[31mred\\x07!»\n"


def test_preview_shows_the_examples_before_a_bad_row_then_its_error(tmp_path):
    """Rows are tokenized 512 at a time; preview still shows the first examples before a bad row's error."""
    import pytest

    from peftkit.errors import PeftkitError

    rows = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(40)]
    rows[20] = {"prompt": "no completion"}
    out = io.StringIO()
    with pytest.raises(PeftkitError, match=r"train\.jsonl:21: missing field 'completion'"):
        preview(load_recipe(_recipe(tmp_path, rows)), 2, Console(file=out, width=80))
    assert "example 2" in out.getvalue()


def test_preview_of_data_that_gives_no_examples_says_training_would_stop(tmp_path):
    """A data.train of no rows (or only bad ones, skipped) previewed as "0 training examples" alone, where train
    stops at once with an error; preview now says so, in train's words."""
    recipe = _recipe(tmp_path, [])
    data = tmp_path / "train.jsonl"
    assert _preview(recipe).endswith(
        "0 training examples\n"
        f"training would stop: No examples from {data}: it has no rows; point data.train/data.eval at data with "
        "examples.\n")
    recipe = _recipe(tmp_path, [{"prompt": "x"}], on_bad_rows="skip")
    assert _preview(recipe).endswith(
        "0 training examples; skipped 1 bad row (data.on_bad_rows: skip)\n"
        f"training would stop: No examples from {data}: all 1 rows were skipped as malformed or missing the fields of "
        "data.format 'completion' (prompt, completion); check data.format, or set data.on_bad_rows: error to see the "
        "first bad row.\n")


def test_preview_shows_each_row_s_task_and_what_training_would_stop_on(tmp_path):
    """Multitask prompt tuning reads each row's task id: preview shows it, and says that training would stop on a
    task past adapter.num_tasks - 1 or on rows of which only some have one (it said nothing; train stopped)."""
    def recipe(rows):
        path = _recipe(tmp_path, rows)
        raw = json.loads(path.read_text())
        path.write_text(json.dumps(raw | {"adapter": {"method": "multitask_prompt_tuning", "num_virtual_tokens": 2,
                                                      "num_tasks": 2}}))
        return path

    shown = _preview(recipe([{"prompt": "a", "completion": "b", "task": 1}, {"prompt": "c", "completion": "d", "task": 0}]))
    assert ":1: 4 tokens, 2 trained, task 1;" in shown and ":2: 4 tokens, 2 trained, task 0;" in shown
    assert "training would stop" not in shown
    data = tmp_path / "train.jsonl"
    assert _preview(recipe([{"prompt": "a", "completion": "b", "task": 2}])).endswith(
        f"training would stop: data.train ({data}): a row's 'task' is 2, but adapter.num_tasks is 2: the rows' task "
        "ids must lie in 0 .. 1. Fix the rows, or set adapter.num_tasks: 3.\n")
    assert _preview(recipe([{"prompt": "a", "completion": "b", "task": 1}, {"prompt": "c", "completion": "d"}])).endswith(
        f"training would stop: {data}: some rows have a 'task' field and some do not; give every row its task id.\n")


def _pairs_recipe(tmp_path, rows, **data):
    """A DPO recipe (training.objective: dpo) on preference rows."""
    path = _recipe(tmp_path, rows, **{"format": "preference", "max_length": 64} | data)
    path.write_text(json.dumps(json.loads(path.read_text()) | {"training": {"objective": "dpo"}}))
    return path


def test_preview_of_preference_pairs_shows_each_pair_s_chosen_and_rejected_answer(tmp_path):
    """A DPO recipe's pairs (previously refused: 'this command does not read them yet'): each answer as the model
    sees it, the prompt masked and the answer trained, labelled chosen or rejected; the counts count pairs."""
    data = tmp_path / "train.jsonl"
    rows = [{"prompt": "2+2=", "chosen": "4", "rejected": "5"}, {"prompt": "1+1=", "chosen": "2", "rejected": "3"}]
    assert _preview(_pairs_recipe(tmp_path, rows), n=1) == (
        f"data.train {data}: format preference, data.max_length 64, the first 1 of 2 rows (pairs)\n"
        "legend: [masked: no loss (label -100)] «trained: loss»  ↵ newline  ✂ cut at data.max_length\n"
        "\n"
        f"pair 1 chosen  {data}:1: 7 tokens, 2 trained; end of target (EOS / end-of-turn): trained\n"
        "[<s>2+2=]«4</s>»\n"
        "\n"
        f"pair 1 rejected  {data}:1: 7 tokens, 2 trained; end of target (EOS / end-of-turn): trained\n"
        "[<s>2+2=]«5</s>»\n"
        "\n"
        "2 training pairs\n")
    # a conversation: the prompt's own assistant turn is context, masked; the answer's turn is trained
    prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
              {"role": "user", "content": "2+2?"}]
    out = _preview(_pairs_recipe(tmp_path, [{"prompt": prompt, "chosen": "4", "rejected": "five"}], max_length=128))
    opening = "[<|user|>↵\nhi</s>↵\n<|assistant|>↵\nyo</s>↵\n<|user|>↵\n2+2?</s>↵\n<|assistant|>↵\n]"
    assert f"pair 1 chosen  {data}:1: " in out and f"pair 1 rejected  {data}:1: " in out
    assert f"{opening}«4</s>»[↵\n]\n" in out and f"{opening}«five</s>»[↵\n]\n" in out
    assert out.endswith("\n1 training pair\n")


def test_preview_of_pairs_says_a_pair_is_dropped_whole_and_names_a_bad_row(tmp_path, monkeypatch, capsys):
    """An answer cut under data.truncation: drop drops its pair, said beside the other answer's line; a bad row is
    the FILE:LINE error training gives, not a traceback."""
    from conftest import cli_user_error

    data = tmp_path / "train.jsonl"
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, {"prompt": "x" * 9, "chosen": "y", "rejected": "z" * 9}]
    out = _preview(_pairs_recipe(tmp_path, rows, max_length=12, truncation="drop"))
    assert f"pair 2 chosen  {data}:2: 12 tokens, 2 trained; end of target (EOS / end-of-turn): trained\n" in out
    assert "; left out (data.truncation: drop)\n[<s>xxxxxxxxx]«zz» ✂\npair 2: left out whole with its rejected answer" in out
    assert out.endswith("1 training pair; 1 of 2 cut at data.max_length=12 tokens; dropped 1 whose target lost "
                        "its end (data.truncation: drop)\n")
    recipe = _pairs_recipe(tmp_path, [rows[0], {"prompt": "1+1=", "chosen": "2"}])
    err = cli_user_error(monkeypatch, capsys, "preview", str(recipe))
    assert f"{data}:2: missing field 'rejected'" in err, err


def test_preview_of_unpaired_answers_shows_each_label_and_its_mismatched_example(tmp_path):
    """A KTO recipe's rows (previously refused: 'this command does not read them yet'): each answer with its label,
    then its mismatched example (its prompt with the answer of the row before it in its batch: the KL estimate's)."""
    data = tmp_path / "train.jsonl"
    rows = [{"prompt": "2+2=", "completion": "4", "label": True}, {"prompt": "1+1=", "completion": "3", "label": False}]
    path = _recipe(tmp_path, rows, format="unpaired", max_length=64)
    path.write_text(json.dumps(json.loads(path.read_text()) | {"training": {"objective": "kto", "batch_size": 2}}))
    assert _preview(path, n=2) == (
        f"data.train {data}: format unpaired, data.max_length 64, the first 2 of 2 rows (answers)\n"
        "legend: [masked: no loss (label -100)] «trained: loss»  ↵ newline  ✂ cut at data.max_length\n"
        + "".join(f"\nexample {i} {what}  {data}:{i}: 7 tokens, 2 trained; end of target (EOS / end-of-turn): trained\n"
                  f"[<s>{prompt}]«{answer}</s>»\n"
                  for i, what, prompt, answer in ((1, "(desirable)", "2+2=", "4"),
                                                  (1, "mismatched (KL estimate)", "2+2=", "3"),
                                                  (2, "(undesirable)", "1+1=", "3"),
                                                  (2, "mismatched (KL estimate)", "1+1=", "4")))
        + "\n2 training examples\n")


def test_preview_of_classification_rows_is_refused_and_the_cli_reference_says_so(tmp_path):
    """A classifier's rows (text and label, no target tokens) are not shown: an error says so, and docs/cli.md's
    `peftkit preview` section, which promised any recipe's first examples, says it too (docs/recipe.md did)."""
    path = _recipe(tmp_path, [{"text": "good", "label": "positive"}, {"text": "bad", "label": "negative"}],
                   format="classification")
    recipe = json.loads(path.read_text())
    recipe["model"]["task"] = "sequence_classification"
    path.write_text(json.dumps(recipe))
    with pytest.raises(PeftkitError, match="data.format 'classification' rows are read by peftkit train and peftkit "
                                           "eval only; this command does not show them yet"):
        _preview(path)
    cli = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text(encoding="utf-8")
    section = cli.split("## `peftkit preview`", 1)[1].split("\n## ", 1)[0]
    assert "`data.format: classification`" in section and "not shown" in section, section


def test_cpt_s_types_of_tokenized_rows_lead_each_run_of_one_type(tmp_path):
    """Tokenized rows with CPT's input_type_mask: each run of one type is led by it, `‹2›`, beside the masked and
    trained delimiters (a type no output's masks its tokens: `[...]`); a row without the column among them shows
    the type 4 training gives it; the legend says what the mark is. A method other than CPT: preview says training
    would stop, in train's words."""
    rows = [{"input_ids": [1, 40, 41, 7, 42, 43, 2], "input_type_mask": [0, 2, 2, 3, 4, 4, 8]},
            {"input_ids": [44, 45]}]
    path = _recipe(tmp_path, rows, format="tokenized")
    raw = json.loads(path.read_text()) | {"adapter": {"method": "cpt", "cpt_token_ids": [5, 6, 7],
                                                      "cpt_tokens_type_mask": [2, 3, 4]}}
    path.write_text(json.dumps(raw))
    lines = _preview(path, n=2).splitlines()
    assert lines[1].endswith("‹n› CPT's type of the tokens after it (input_type_mask: 4k + 1 input template, 4k + 2 "
                             "input, 4k + 3 output template, 4k + 4 output, 0 none)")
    assert lines[4] == "‹0›[<s>]‹2›[AB]‹3›[ ]‹4›«CD»‹8›«</s>»"
    assert lines[7] == "‹4›«EF»"
    assert "training would stop" not in "".join(lines)
    path.write_text(json.dumps(raw | {"adapter": {"r": 4}}))
    assert ("training would stop: data.train: its rows have an 'input_type_mask' (CPT's per-token types, which mask "
            "the labels of every token not typed an output), and adapter.method: lora reads none") in \
        " ".join(_preview(path, n=2).split())
    rows[0].pop("input_type_mask")  # untyped data: no marks, as before
    path = _recipe(tmp_path, rows, format="tokenized")
    assert "‹" not in _preview(path, n=2)


def test_a_cut_tokenized_row_loses_the_end_its_labels_give(tmp_path):
    """peftkit appends no EOS to data.format tokenized rows: a cut one loses its own last trained tokens. The example's
    line, the warning and data.truncation: error's message said 'EOS / end-of-turn (the model should learn to stop
    on)' of them too; they now say what is lost, and the text formats' wording stays (the tests above)."""
    a, b, c, d, e, f, g, h = ids("abcdefgh")
    rows = [{"input_ids": [a, b, c, d, e, f, g, h], "labels": [X, X, c, d, e, f, g, h]}, {"input_ids": [a, b, c]}]
    data = tmp_path / "train.jsonl"
    out = _preview(_recipe(tmp_path, rows, format="tokenized", max_length=6), n=2)
    assert (f"example 1  {data}:1: 6 of 8 tokens (cut at data.max_length=6), 4 trained; end of target (the row's last "
            "trained token; no EOS appended): CUT, its last 2 target tokens lie beyond data.max_length; trained as cut "
            "(data.truncation: keep)\n") in out, out
    assert f"example 2  {data}:2: 3 tokens, 2 trained; end of target (the row's last trained token; no EOS " \
           "appended): trained\n" in out, out
    assert out.endswith(
        "warning: 1 of 2 examples lost the end of their target, the end their rows' labels give (peftkit appends no EOS "
        "to data.format tokenized rows), to data.max_length=6 and are trained as cut (data.truncation: keep), so the "
        "model is not taught how they end. Raise data.max_length, or set data.truncation: drop to leave them out.\n")
    out = _preview(_recipe(tmp_path, rows, format="tokenized", max_length=6, truncation="error"), n=0)
    assert out.endswith(
        f"training would stop: {data}:1: this example has 8 tokens but data.max_length is 6, so its last 2 trained "
        "tokens, the end the row's labels give (peftkit appends no EOS to data.format tokenized rows), are cut "
        "(data.truncation: error). Raise data.max_length to 8, or set data.truncation: drop to leave such examples "
        "out (keep trains on them as cut).\n"), out
