"""What the content of a data file does to the examples, beyond cuts (test_truncation): the text of special tokens
in the rows, a chat template that never teaches the model to stop, and files with a byte order mark, blank lines or
bytes that are not UTF-8. The character tokenizer makes each token one character, so expectations are by hand."""

import copy
import json

import pytest

from peftkit.data import IGNORE_INDEX, describe_stats, load_examples, load_rows
from peftkit.data.prompts import load_prompts
from peftkit.errors import PeftkitError
from peftkit.recipe import DataConfig
from peftkit.tiny import build_char_tokenizer

TOK = build_char_tokenizer()
BOS, EOS = TOK.bos_token_id, TOK.eos_token_id
X = IGNORE_INDEX


def ids(text: str) -> list[int]:
    return TOK.convert_tokens_to_ids(list(text))


def _load(tmp_path, rows, fmt, tok=TOK, **data):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(train=str(path), format=fmt, max_length=64, **data)
    examples, stats = load_examples(tok, cfg.train, "train", cfg, cache=False)
    return examples, stats, describe_stats(stats, cfg), path


def test_the_text_of_a_special_token_in_a_row_is_said_with_its_place(tmp_path):
    """A `</s>` written in an answer was encoded as the EOS token itself, mid-target, teaching the model to stop
    there, without a word (as in transformers and axolotl: a tokenizer parses special tokens out of any text)."""
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": "x</s>y"},
            {"instruction": "c<pad>", "output": "d"}]
    examples, stats, said, path = _load(tmp_path, rows, "alpaca")
    assert examples[1].input_ids[-4:] == [*ids("x"), EOS, *ids("y"), EOS]  # what the warning is about
    assert said[1] == (
        f"warning: 2 of 3 rows hold the text of a special token, which the tokenizer encodes as that token, not as "
        f"text (first: {path}:2: field 'output' holds '</s>'). An EOS or end-of-turn marker inside an answer "
        "teaches the model to stop there, and one in a message ends that turn. Remove or reword it where it is meant "
        "as text.")
    chat = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ok"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a<pad>"}]}]
    assert _load(tmp_path, chat, "chat")[1]["special_text_first"] == f"{path}:2: messages[1].content holds '<pad>'"
    assert _load(tmp_path, rows[:1], "alpaca")[2] == ["1 training example"]


def test_the_warnings_name_a_row_s_place_as_the_data_names_it(tmp_path):
    """With data.columns, or in a ShareGPT row, the special-token and dropped-message warnings named the format's
    field or the converted messages (`field 'output'`, `messages[2].content`), which the data has not; they name the
    column and the conversation's turn now, as a bad row's error does."""
    rows = [{"instruction": "a", "answer": "x</s>y"}]
    stats = _load(tmp_path, rows, "alpaca", columns={"output": "answer"})[1]
    path = tmp_path / "d.jsonl"
    assert stats["special_text_first"] == f"{path}:1: column 'answer' (data.columns.output) holds '</s>'"
    stats = _load(tmp_path, [{"prompt": "a", "answer": "b</s>\n"}], "completion", columns={"completion": "answer"})[1]
    assert stats["special_text_first"] == (f"{path}:1: column 'answer' (data.columns.completion) ends with '</s>', "
                                           "and peftkit appends an EOS to it too (two EOS)")
    dialog = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a<pad>"}]
    stats = _load(tmp_path, [{"dialog": dialog}], "chat", columns={"messages": "dialog"})[1]
    assert stats["special_text_first"] == f"{path}:1: dialog[1].content holds '<pad>'"
    turns = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a<pad>"}]
    stats = _load(tmp_path, [{"system": "s", "conversations": turns}], "chat")[1]
    assert stats["special_text_first"] == f"{path}:1: conversations[1].value holds '<pad>'"
    stats = _load(tmp_path, [{"turns": turns}], "chat", columns={"conversations": "turns"})[1]
    assert stats["special_text_first"] == f"{path}:1: turns[1].value holds '<pad>'"
    turns[1]["value"] = "a"
    stats = _load(tmp_path, [{"system": "s<pad>", "conversations": turns}], "chat")[1]
    assert stats["special_text_first"] == f"{path}:1: field 'system' holds '<pad>'"
    tok = copy.deepcopy(TOK)
    tok.chat_template = SYSTEM_IN_LAST_USER_TURN
    stats = _load(tmp_path, [{"prompt": "Be brief.", "conversations": turns}], "chat", tok,
                  columns={"system": "prompt"})[1]
    assert stats["dropped_message_first"] == f"{path}:1: column 'prompt' (data.columns.system)"


def test_a_special_token_s_name_the_tokenizer_does_not_split_out_is_text(tmp_path):
    """`sep_token = "Human:"` names a special token that the tokenizer never splits out of a text: "Human: hi" is
    plain characters, and no warning."""
    tok = copy.deepcopy(TOK)
    tok.sep_token = "Human:"
    rows = [{"instruction": "Human: hi", "output": "b"}]
    examples, stats, _, _ = _load(tmp_path, rows, "alpaca", tok)
    assert ids("Human: hi") == examples[0].input_ids[1 + len(ids("### Instruction:\n")):][:9]
    assert stats["special_text_rows"] == 0


def test_text_and_completion_rows_are_taken_as_rendered_but_a_doubled_bos_or_eos_is_said(tmp_path, tiny_llama):
    """`text` and `completion` rows are often text already rendered (TRL's prompt/completion with a ChatML prompt),
    whose special tokens are meant; one that begins with the BOS (which the tokenizer adds too) trains two in a row.
    One that ends with the EOS's text gets no second (peftkit appended one to every target, and warned), as TRL's
    SFTTrainer tokenizes it (its add_eos): the same ids and labels as TRL's for each row (on the old code
    '7</s></s>'); the EOS after it is still said where the text's end is not that EOS (`</s>\n`, two of them)."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    assert _load(tmp_path, [{"text": "a</s>b"}], "text")[1]["special_text_rows"] == 0
    assert _load(tmp_path, [{"prompt": "<pad>a", "completion": "b<pad>"}], "completion")[1]["special_text_rows"] == 0
    examples, stats, _, path = _load(tmp_path, [{"text": "<s>ab"}, {"text": "ab</s>\n"}], "text")
    assert examples[0].input_ids[:2] == [BOS, BOS] and examples[1].input_ids[-3:] == [EOS, *ids("\n"), EOS]
    assert stats["special_text_rows"] == 2
    assert stats["special_text_first"] == (f"{path}:1: field 'text' begins with '<s>', and the tokenizer puts a BOS "
                                           "in front of it too (two BOS)")
    completions = [{"prompt": "3+4=", "completion": "7</s>"}, {"prompt": "1+1=", "completion": "2"},
                   {"prompt": "5+5=", "completion": "10</s>\n"}, {"prompt": "2+2=", "completion": "4</s></s>"}]
    texts = [{"text": "3+4=7</s>"}, {"text": "1+1=2"}, {"text": "ab</s></s>"}]
    args = trl.SFTConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, max_length=64)
    trainer = trl.SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_llama), args=args, processing_class=TOK,
                             train_dataset=Dataset.from_list(completions), eval_dataset=Dataset.from_list(texts))
    for rows, fmt, theirs in ((completions, "completion", trainer.train_dataset), (texts, "text", trainer.eval_dataset)):
        examples, stats, _, path = _load(tmp_path, rows, fmt)
        assert [[e.input_ids, e.labels[1:]] for e in examples] == [  # (a first label is never learned: TRL's text
            [row["input_ids"], row.get("labels", row["input_ids"])[1:]] for row in theirs]  # rows label their BOS)
        assert stats["special_text_rows"] == len(rows) - 2 and examples[0].input_ids[-2:] == [*ids("7"), EOS]
    assert stats["special_text_first"] == f"{path}:3: field 'text' ends with '</s>' twice (two EOS)"
    stats = _load(tmp_path, completions[1:], "completion")[1]
    assert stats["special_text_first"] == (f"{path}:2: field 'completion' ends with '</s>', and peftkit appends an "
                                           "EOS to it too (two EOS)")
    # generation metrics score an answer, cut at its EOS, against the text trained before it: '4</s>', not '4</s></s>'
    completion = DataConfig(train=str(path), format="completion")
    assert [p.reference for p in load_prompts(TOK, str(path), "train", completion)] == ["2", "10</s>\n", "4</s>"]
    alpaca = _load(tmp_path, [{"instruction": "a", "output": "b</s>"}], "alpaca")  # (its output: the same)
    assert alpaca[0][0].input_ids[-2:] == [*ids("b"), EOS] and alpaca[1]["special_text_rows"] == 0
    assert load_prompts(TOK, str(path), "train", DataConfig(train="x"))[0].reference == "b"


def test_a_chat_template_that_closes_turns_with_plain_text_is_said(tmp_path):
    """A template writing `role: content` lines trains the answer, never a token to stop on: the model runs on to
    the generation limit. preview and train now say so."""
    tok = copy.deepcopy(TOK)
    tok.chat_template = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ok"}]}]
    examples, stats, said, _ = _load(tmp_path, rows, "chat", tok)
    assert [t for t, label in zip(examples[0].input_ids, examples[0].labels) if label != X] == ids("ok")
    assert said[1:] == [
        "warning: the chat template ends an assistant turn with no special token (no EOS or end-of-turn marker after "
        "the answer), so training never teaches the model to stop: generation runs on to its token limit. Use a "
        "tokenizer whose chat template closes each turn with one (its EOS or an end-of-turn token)."]
    assert _load(tmp_path, rows, "chat")[2] == ["1 training example"]  # the tiny template closes turns with </s>


def test_a_byte_order_mark_is_no_text_in_csv_and_txt_files(tmp_path):
    """A BOM (Windows editors write one) kept the first CSV column from being read as text ("007" became the
    number 7, then a bad row), and began the first row of a .txt file, where it was trained."""
    csv = tmp_path / "d.csv"
    csv.write_bytes(b"\xef\xbb\xbfprompt,completion\n007,8\n")
    assert load_rows(str(csv), "train")[0] == [{"prompt": "007", "completion": "8"}]
    txt = tmp_path / "d.txt"
    txt.write_bytes(b"\xef\xbb\xbfhello\n\n\nworld\n")
    assert load_rows(str(txt), "train") == ([{"text": "hello"}, {"text": "world"}], 0, [1, 4])


def test_a_value_of_the_wrong_type_is_its_own_row_s_problem_in_json_and_csv_files(tmp_path):
    """`datasets` gives a column one type: one `"input": 5` in a .json array made every row's input a JSON value
    (the string "4" became the number 4, and row 1 was blamed), one label `1.5` in a .csv made every label a float;
    data.on_bad_rows: skip then dropped every row. Now the row holding it is named, and only it is skipped."""
    from peftkit.data.classification import load_classification

    rows = [{"instruction": f"Add {i}.", "input": str(i), "output": str(i + 1)} for i in range(8)]
    rows[5]["input"] = 5
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    assert load_rows(str(path), "train")[0][:2] == rows[:2]  # "0" stays the text "0"
    with pytest.raises(PeftkitError) as err:
        load_examples(TOK, str(path), "train", DataConfig(train=str(path)), cache=False)
    assert str(err.value).startswith(f"{path} row 6: field 'input' must be a string, got int for data.format 'alpaca'")
    skip = DataConfig(train=str(path), on_bad_rows="skip")
    assert load_examples(TOK, str(path), "train", skip, cache=False)[1]["bad_rows"] == 1

    path = tmp_path / "d.csv"
    path.write_text("text,label\ngood,1\nbad,0\nfine,1\nmeh,1.5\nawful,0\n")
    assert [row["label"] for row in load_rows(str(path), "train")[0]] == [1, 0, 1, 1.5, 0]
    cfg = DataConfig(train=str(path), format="classification")
    with pytest.raises(PeftkitError) as err:
        load_classification(TOK, str(path), "train", cfg)
    assert str(err.value).startswith(f"{path} row 4: field 'label' must be a string or an integer, got float for "
                                     "data.format 'classification'")
    examples, stats, labels = load_classification(TOK, str(path), "train", cfg.model_copy(update={"on_bad_rows": "skip"}))
    assert (len(examples), stats["bad_rows"], labels.names) == (4, 1, ("0", "1"))


def test_txt_rows_are_the_lines_datasets_reads(tmp_path):
    """Lines end at \\n, \\r\\n and \\r as in `datasets`' text reader, not at the other breaks str.splitlines
    knows (a form feed from a PDF, Word's \\v, \\x85, \\u2028): those stay in their line."""
    import datasets

    txt = tmp_path / "d.txt"
    txt.write_bytes("page one\fpage two\nweb\u2028second\nnel\x85x\r\nlast\rz\n".encode())
    theirs = datasets.load_dataset("text", data_files=str(txt), split="train", download_mode="force_redownload")
    rows, _, lines = load_rows(str(txt), "train")
    assert rows == list(theirs) and len(rows) == 5 and lines == [1, 2, 3, 4, 5]


def test_a_txt_rows_line_is_named_past_blank_lines(tmp_path):
    txt = tmp_path / "d.txt"
    txt.write_text("ab\n\n\n" + "c" * 80 + "\n")
    cfg = DataConfig(train=str(txt), format="text", max_length=16, truncation="error")
    with pytest.raises(PeftkitError, match=f"^{txt}:4: this example has 82 tokens"):
        load_examples(TOK, cfg.train, "train", cfg, cache=False)


def test_a_line_that_is_not_utf8_is_named_and_can_be_skipped(tmp_path):
    """A Latin-1 `é` deep in a .jsonl was "'utf-8' codec can't decode byte 0xe9 in position 5489" (an offset in a
    read chunk), which data.on_bad_rows: skip could not skip."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n\n{"prompt": "caf\xe9", "completion": "b"}\n')
    with pytest.raises(PeftkitError) as error:
        load_rows(str(path), "train")
    assert str(error.value) == (
        f"{path}:3: not UTF-8 text (byte 0xe9 at character 16; a file saved as Latin-1 or Windows-1252?). Save the "
        "file as UTF-8, or set data.on_bad_rows: skip to drop such rows.")
    assert load_rows(str(path), "train", "skip") == ([{"prompt": "a", "completion": "b"}], 1, [1])
    txt = tmp_path / "d.txt"
    txt.write_bytes(b"ab\ncaf\xe9\n")
    with pytest.raises(PeftkitError, match=f"^{txt}:2: not UTF-8 text \\(byte 0xe9 at character 4;"):
        load_rows(str(txt), "train")


def test_a_token_added_to_the_tokenizer_but_not_the_model_is_a_clear_error(tiny_llama, tmp_path, monkeypatch, capsys):
    """A token added to the tokenizer after the model was saved (ChatML markers on a base model) was torch's
    `IndexError: index out of range in self`, a traceback from deep in the forward, in train, eval and generate."""
    import shutil

    from transformers import AutoTokenizer

    from peftkit.cli import main
    from peftkit.tiny import write_jsonl
    from tests.conftest import cli_user_error, make_recipe

    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.save_pretrained(base)
    rows = len(tok) - 1
    data = tmp_path / "d.jsonl"
    write_jsonl(data, [{"prompt": "<|im_start|>12", "completion": "twelve"}] * 4)
    said = (f"token '<|im_start|>' (id {rows}) has no embedding: the model has {rows} embedding rows and its "
            f"tokenizer {rows + 1} tokens, some added after the model was saved. Use the tokenizer the model was "
            "saved with, list the new tokens in a recipe's model.add_tokens")
    recipe = make_recipe(tmp_path, base, {"train": data, "eval": data}, data={"format": "completion"})
    for args in (["train", str(recipe)], ["eval", "--model", str(base), "--data", str(data), "--format", "completion"],
                 ["generate", "--model", str(base), "--prompt", "<|im_start|>hi", "--max-new-tokens", "2"]):
        assert said in " ".join(cli_user_error(monkeypatch, capsys, *args).split())
    # A prompt-tuning adapter's own pre-hook embeds input_ids: the guard runs before it.
    from peftkit.methods import PromptTuningConfig
    from tests.conftest import save_random_adapter

    adapter = save_random_adapter(base, PromptTuningConfig(method="prompt_tuning", num_virtual_tokens=4),
                                  tmp_path / "pt", seed=1)
    assert said in " ".join(cli_user_error(monkeypatch, capsys, "eval", "--model", str(base), "--adapter", str(adapter),
                                           "--data", str(data), "--format", "completion").split())
    # Text without the added token runs as ever.
    monkeypatch.setattr("sys.argv", ["peftkit", "generate", "--model", str(base), "--prompt", "12", "--max-new-tokens",
                                     "2"])
    main()
    assert capsys.readouterr().out.startswith("12")


# Mistral v0.3's template, cut to its system message: it goes into the conversation's last user turn only, so a
# conversation that ends in an answer (every training row) is rendered without it.
SYSTEM_IN_LAST_USER_TURN = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set messages = messages[1:] %}"
    "{% endif %}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {% if loop.last and system is defined %}"
    "{{ system }}\n\n{% endif %}{{ m['content'] }}[/INST]{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}")


def test_a_message_the_chat_template_leaves_out_is_said(tmp_path):
    """Mistral v0.3's template leaves the system message out of a conversation ending in an answer: each row's
    system message was dropped from training without a word, while generation's prompt (ending in a user turn) has
    it."""
    tok = copy.deepcopy(TOK)
    tok.chat_template = SYSTEM_IN_LAST_USER_TURN
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"},
                          {"role": "assistant", "content": "a"}]}]
    (_, ex), stats, said, path = _load(tmp_path, rows, "chat", tok)
    assert "Be brief" not in tok.decode(ex.input_ids)  # what the warning is about
    assert stats["dropped_message_rows"] == 1
    assert said[-1] == (
        f"warning: the chat template leaves the system message out of 1 of 2 conversations (first: {path}:2: "
        "messages[0]), so training never sees it. Mistral v0.3's template, for one, writes the system message "
        "into the last user turn only, which a conversation ending in an answer does not have (a generation prompt "
        "does: the model is asked in a form it was not trained on). Put what it says into the first user message, or "
        "use a template that keeps it.")
    tok.chat_template = TOK.chat_template
    assert _load(tmp_path, rows, "chat", tok)[1]["dropped_message_rows"] == 0


def test_data_system_prompt_s_message_is_named_as_such_not_as_the_row_s(tmp_path):
    """A conversation's messages are named as the row numbers them, the one data.system_prompt puts in front by that
    key: it was counted, so a row's messages[0] was said to be messages[1], and the dropped system message the row's
    messages[0]."""
    tok = copy.deepcopy(TOK)
    rows = [{"messages": [{"role": "user", "content": "q<pad>"}, {"role": "assistant", "content": "a"}]}]
    _, stats, _, path = _load(tmp_path, rows, "chat", tok, system_prompt="Be brief.")
    assert stats["special_text_first"] == f"{path}:1: messages[0].content holds '<pad>'"
    assert _load(tmp_path, rows, "chat", tok, system_prompt="No <pad>.")[1]["special_text_first"] == (
        f"{path}:1: data.system_prompt holds '<pad>'")
    tok.chat_template = SYSTEM_IN_LAST_USER_TURN
    rows[0]["messages"][0]["content"] = "q"
    assert _load(tmp_path, rows, "chat", tok, system_prompt="Be brief.")[1]["dropped_message_first"] == (
        f"{path}:1: data.system_prompt")
