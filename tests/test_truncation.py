"""data.max_length cuts: what is counted, what data.truncation keep | drop | error does, the lines printed,
and the warning about a chat template's default system prompt. The character tokenizer makes every count
a count of characters, so each expectation below is worked out by hand."""

import json

import pytest

from peftkit.data import (
    IGNORE_INDEX,
    describe_stats,
    injected_system_tokens,
    load_examples,
)
from peftkit.errors import PeftkitError
from peftkit.recipe import DataConfig, load_recipe
from peftkit.tiny import build_char_tokenizer, write_jsonl

TOK = build_char_tokenizer()
BOS, EOS = TOK.bos_token_id, TOK.eos_token_id
X = IGNORE_INDEX


def ids(text: str) -> list[int]:
    """Ids of plain characters, one token each."""
    return TOK.convert_tokens_to_ids(list(text))


# Completion rows at max_length 6: <s> + prompt + completion + </s>.
ROWS = [
    {"prompt": "ab", "completion": "cd"},  # 1+2+2+1 = 6 tokens: fits exactly
    {"prompt": "ab", "completion": "cdefgh"},  # 10 tokens: cut after "cde", loses "fgh</s>" (4 target tokens)
    {"prompt": "abcdefgh", "completion": "i"},  # 11 tokens: the prompt alone fills the 6, no target left
    {"prompt": "a", "completion": "b"},  # 4 tokens
]


def _jsonl(tmp_path, rows):
    """A .jsonl file with a blank first line, so that row N is on line N + 1."""
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + "".join(json.dumps(r) + "\n" for r in rows))
    return path


def _load(path, fmt="completion", **kw):
    cfg = DataConfig(train=str(path), format=fmt, **kw)
    return (*load_examples(TOK, cfg.train, "train", cfg), cfg)


def test_keep_trains_the_cut_example_and_counts_it(tmp_path):
    examples, stats, cfg = _load(_jsonl(tmp_path, ROWS), max_length=6)
    assert [(e.input_ids, e.labels) for e in examples] == [
        ([BOS, *ids("abcd"), EOS], [X, X, X, *ids("cd"), EOS]),
        ([BOS, *ids("abcde")], [X, X, X, *ids("cde")]),  # no EOS: the model is not taught to stop here
        ([BOS, *ids("ab"), EOS], [X, X, *ids("b"), EOS]),
    ]
    assert stats == {"rows": 4, "bad_rows": 0, "too_long": 1, "truncated": 2, "target_cut": 1, "target_cut_given": 0,
                     "truncation_dropped": 0,
                     "system_prompt_rows": 0, "system_prompt_tokens": 0, "special_text_rows": 0,
                     "special_text_first": None, "turn_ends_unmarked": False, "dropped_message_rows": 0,
                     "dropped_message_first": None, "examples": 3}
    assert describe_stats(stats, cfg) == [
        ("3 training examples; 2 of 4 cut at data.max_length=6 tokens; dropped 1 whose target lies beyond "
        "data.max_length"),
        ("warning: 1 of 4 examples lost the end of their target (the EOS / end-of-turn the model should learn to stop "
        "on) to data.max_length=6 and are trained as cut (data.truncation: keep), so the model is not taught to stop "
        "after them. Raise data.max_length, or set data.truncation: drop to leave them out."),
    ]


def test_drop_leaves_out_examples_whose_target_lost_its_end(tmp_path):
    examples, stats, cfg = _load(_jsonl(tmp_path, ROWS), max_length=6, truncation="drop")
    assert [e.input_ids for e in examples] == [[BOS, *ids("abcd"), EOS], [BOS, *ids("ab"), EOS]]
    assert (stats["examples"], stats["too_long"], stats["target_cut"], stats["truncation_dropped"]) == (2, 1, 1, 1)
    assert describe_stats(stats, cfg) == [
        ("2 training examples; 2 of 4 cut at data.max_length=6 tokens; dropped 1 whose target lies beyond "
        "data.max_length; dropped 1 whose target lost its end (data.truncation: drop)"),
    ]


def test_nothing_cut_prints_one_line_as_before(tmp_path):
    examples, stats, cfg = _load(_jsonl(tmp_path, ROWS), max_length=11, truncation="error")
    assert len(examples) == 4 and stats["truncated"] == stats["target_cut"] == 0
    assert describe_stats(stats, cfg) == ["4 training examples"]


def test_error_names_the_first_cut_row_by_line(tmp_path):
    path = _jsonl(tmp_path, [*ROWS, {"prompt": "a", "completion": "b" * 20}])  # a second cut: 23 tokens
    with pytest.raises(PeftkitError) as info:
        _load(path, max_length=6, truncation="error")
    assert str(info.value) == (
        f"{path}:3: this example has 10 tokens but data.max_length is 6, so its last 4 target tokens, with the "
        "EOS / end-of-turn the model should learn to stop on, are cut (data.truncation: error). 2 more examples are "
        "cut the same way; the longest has 23 tokens. Raise data.max_length to 23, or set data.truncation: drop to "
        "leave such examples out (keep trains on them as cut).")


def test_error_names_the_row_number_of_other_files(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS))
    with pytest.raises(PeftkitError) as info:
        _load(path, max_length=6, truncation="error")
    assert str(info.value).startswith(f"{path} row 2: this example has 10 tokens but data.max_length is 6, ")


def test_error_names_an_example_whose_prompt_leaves_no_target(tmp_path):
    # Dropped and counted under keep and drop; under error it was dropped too, unnamed, where the user asked to stop.
    path = _jsonl(tmp_path, [ROWS[0], ROWS[2]])
    with pytest.raises(PeftkitError) as info:
        _load(path, max_length=6, truncation="error")
    assert str(info.value) == (
        f"{path}:3: this example has 11 tokens but data.max_length is 6, so none of its 2 target tokens is left: the "
        "prompt fills data.max_length (data.truncation: error). Raise data.max_length to 11, or set data.truncation: "
        "drop to leave such examples out (keep trains on them as cut).")
    examples, stats, _ = _load(path, max_length=6, truncation="keep")
    assert len(examples) == 1 and stats["too_long"] == 1 and stats["target_cut"] == 0


def test_drop_of_every_example_explains_itself(tmp_path):
    path = _jsonl(tmp_path, [ROWS[1], ROWS[2]])
    with pytest.raises(PeftkitError) as info:
        _load(path, max_length=6, truncation="drop")
    assert str(info.value) == (
        f"No examples from {path}: 1 examples lost the end of their target to data.max_length=6 tokens, "
        "which data.truncation: drop leaves out, and the other 1 have their whole target beyond it; raise "
        "data.max_length, or set data.truncation: keep.")


def test_chat_example_that_loses_its_end_of_turn(tmp_path):
    # "<|user|>\nhi</s>\n" is 13 tokens, "<|assistant|>\n" 14 more, "hello</s>\n" 7: 34 in all. Cut at 30.
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}])
    (example,), stats, _ = _load(tmp_path / "c.jsonl", fmt="chat", max_length=30)
    assert example.labels == [X] * 27 + ids("hel")
    assert (stats["truncated"], stats["target_cut"]) == (1, 1)
    (example,), stats, _ = _load(tmp_path / "c.jsonl", fmt="chat", max_length=34)
    assert example.labels == [X] * 27 + ids("hello") + [EOS] + [X] * len(ids("\n"))  # the newline after: untrained
    assert (stats["truncated"], stats["target_cut"]) == (0, 0)
    # Cut at 33, only the template's newline after the end-of-turn marker goes: the end is kept and trained, so
    # nothing is said of a lost end, and truncation: error trains it (it stopped here, and drop left it out).
    (example,), stats, _ = _load(tmp_path / "c.jsonl", fmt="chat", max_length=33, truncation="error")
    assert example.labels == [X] * 27 + ids("hello") + [EOS]
    assert (stats["truncated"], stats["target_cut"]) == (1, 0)
    with pytest.raises(PeftkitError, match="its last target token,"):  # the marker (the newline is no target)
        _load(tmp_path / "c.jsonl", fmt="chat", max_length=32, truncation="error")


def test_recipe_rejects_an_unknown_truncation_policy(tmp_path):
    (tmp_path / "r.yaml").write_text("model: {name_or_path: m}\ndata: {train: d.jsonl, truncation: cut}\n"
                                     "export: {output_dir: run}\n")
    with pytest.raises(PeftkitError) as info:
        load_recipe(tmp_path / "r.yaml")
    assert "data.truncation" in str(info.value) and "'keep', 'drop' or 'error'" in str(info.value)


# --------------------------------------------------------------------------- default system prompt

# Qwen2.5's template in miniature: a conversation without a system message gets a default one.
QWEN_STYLE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _qwen_tok():
    """The character tokenizer with Qwen's turn markers as single special tokens, as in Qwen's own."""
    tok = build_char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = QWEN_STYLE
    return tok


def _chat_stats(tmp_path, tok, conversations, max_length):
    write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in conversations])
    cfg = DataConfig(train=str(tmp_path / "c.jsonl"), format="chat", max_length=max_length)
    return load_examples(tok, cfg.train, "train", cfg)[1], cfg


NO_SYSTEM = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
WITH_SYSTEM = [{"role": "system", "content": "Be brief."}, *NO_SYSTEM]


def test_injected_system_prompt_is_measured_in_tokens():
    # "You are a helpful assistant." (28 characters) is what a one-character system message "." replaces.
    assert injected_system_tokens(_qwen_tok()) == 27
    assert injected_system_tokens(TOK) == 0  # the tiny template adds nothing


def test_warning_when_the_default_system_prompt_takes_a_large_share(tmp_path):
    # NO_SYSTEM renders as 38 tokens of default system turn + 12 of user turn + 11 of assistant header + "4",
    # end-of-turn and newline: 64 tokens, which fit in 100.
    stats, cfg = _chat_stats(tmp_path, _qwen_tok(), [NO_SYSTEM, WITH_SYSTEM, NO_SYSTEM], max_length=100)
    assert (stats["system_prompt_rows"], stats["system_prompt_tokens"]) == (2, 27)
    assert describe_stats(stats, cfg) == [
        "3 training examples",
        ("warning: the chat template adds a default system prompt of 27 tokens (27% of data.max_length=100) to each "
        "of the 2 conversations without a system message; it is masked from the loss but takes room the answers "
        "need. Add a short explicit system message to those conversations, or raise data.max_length."),
    ]


def test_no_warning_below_the_threshold_or_with_system_messages(tmp_path):
    stats, cfg = _chat_stats(tmp_path, _qwen_tok(), [NO_SYSTEM], max_length=108)  # 27 tokens = 25 %: not more
    assert describe_stats(stats, cfg) == ["1 training example"]
    stats, cfg = _chat_stats(tmp_path, _qwen_tok(), [WITH_SYSTEM], max_length=64)
    assert stats["system_prompt_rows"] == 0 and describe_stats(stats, cfg) == ["1 training example"]


def test_a_mix_with_tokenized_rows_says_what_each_kind_lost(tmp_path):
    """A mix of completion rows and data.format tokenized ones (to which peftkit appends no EOS), each with a cut
    target: the warning says the EOS / end-of-turn of the first and the end the labels give of the second (it said
    the EOS / end-of-turn of all; all tokenized: tests/test_preview.py)."""
    a, b, c, d, e, f, g, h = ids("abcdefgh")
    write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": [a, b, c, d, e, f, g, h], "labels": [X, X, c, d, e, f, g, h]}])
    cfg = DataConfig(train=[{"path": str(tmp_path / "ids.jsonl"), "format": "tokenized"}, str(_jsonl(tmp_path, ROWS))],
                     format="completion", max_length=6)
    _, stats = load_examples(TOK, cfg.train, "train", cfg)
    assert (stats["target_cut"], stats["target_cut_given"]) == (2, 1)
    assert describe_stats(stats, cfg)[1] == (
        "warning: 2 of 5 examples lost the end of their target (the EOS / end-of-turn the model should learn to stop "
        "on; of the 1 tokenized row among them, the end its labels give: peftkit appends no EOS to data.format "
        "tokenized rows) to data.max_length=6 and are trained as cut (data.truncation: keep), so the model is not "
        "taught how they end. Raise data.max_length, or set data.truncation: drop to leave them out.")
