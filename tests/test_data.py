"""Tokenization and loss masks for each data format, checked token by token."""

import itertools
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from peftkit.data import IGNORE_INDEX, Collator, Example, epoch_batches, load_examples, step_windows, steps_per_epoch
from peftkit.recipe import DataConfig
from peftkit.tiny import build_char_tokenizer, write_jsonl

TOK = build_char_tokenizer()


def _decode_labels(example):
    return TOK.decode([t for t in example.labels if t != IGNORE_INDEX])


def _load(tmp_path, rows, fmt, max_length=256, **data):
    write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), format=fmt, max_length=max_length, **data)
    return load_examples(TOK, cfg.train, "train", cfg)


def test_alpaca_loss_on_response_only(tmp_path):
    (ex,), _ = _load(tmp_path, [{"instruction": "Add.", "input": "1 2", "output": "3"}], "alpaca")
    text = TOK.decode(ex.input_ids)
    assert text == "<s>### Instruction:\nAdd.\n\n### Input:\n1 2\n\n### Response:\n3</s>"
    assert _decode_labels(ex) == "3</s>"  # response + EOS, nothing of the prompt
    assert len(ex.labels) == len(ex.input_ids)


def test_alpaca_without_input_uses_short_template(tmp_path):
    (ex,), _ = _load(tmp_path, [{"instruction": "Say hi.", "output": "hi"}], "alpaca")
    assert "### Input" not in TOK.decode(ex.input_ids)


def test_completion_and_text(tmp_path):
    (ex,), _ = _load(tmp_path, [{"prompt": "2+2=", "completion": "4"}], "completion")
    assert _decode_labels(ex) == "4</s>"
    (ex,), _ = _load(tmp_path, [{"text": "abc"}], "text")
    assert TOK.decode(ex.input_ids) == "<s>abc</s>"
    assert _decode_labels(ex) == "abc</s>"  # every token but BOS


def test_chat_loss_on_assistant_turns_only(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"}, {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "ciao"}]
    (ex,), _ = _load(tmp_path, [{"messages": messages}], "chat")
    assert TOK.decode(ex.input_ids) == TOK.apply_chat_template(messages, tokenize=False)
    # Each assistant turn's content and its end-of-turn marker, no user or system text, no role headers.
    assert _decode_labels(ex) == "yo</s>ciao</s>"  # not the newline the template puts after


def test_train_on_chooses_the_tokens_with_loss(tmp_path):
    """data.train_on: every answer (the default), a conversation's last answer only, or every token."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"}, {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "ciao"}]
    (ex,), _ = _load(tmp_path, [{"messages": messages}], "chat", train_on="last_answer")
    assert _decode_labels(ex) == "ciao</s>"
    (ex,), _ = _load(tmp_path, [{"messages": messages}], "chat", train_on="all")
    assert ex.labels == ex.input_ids and TOK.decode(ex.input_ids) == TOK.apply_chat_template(messages, tokenize=False)
    row = {"instruction": "Add.", "input": "1 2", "output": "3"}
    (ex,), _ = _load(tmp_path, [row], "alpaca", train_on="all")
    assert ex.labels == ex.input_ids and TOK.decode(ex.input_ids).endswith("### Response:\n3</s>")
    (ex,), _ = _load(tmp_path, [row], "alpaca", train_on="last_answer")  # one answer a row: the answer
    assert _decode_labels(ex) == "3</s>"
    (ex,), _ = _load(tmp_path, [{"prompt": "2+2=", "completion": "4"}], "completion", train_on="all")
    assert ex.labels == ex.input_ids


def _turn_mask(messages, trained):
    """The tiny template's text of `messages` as token ids (a character each, `</s>` one) and whether each is trained:
    the content and `</s>` of the turns whose indices are in `trained`, not the newline after."""
    ids, keep = [], []
    for i, m in enumerate(messages):
        head, body, end = (TOK(text, add_special_tokens=False)["input_ids"]
                           for text in (f"<|{m['role']}|>\n", m["content"] + "</s>", "\n"))
        ids += head + body + end
        keep += [False] * len(head) + [i in trained] * len(body) + [False]
    return ids, [t if k else IGNORE_INDEX for t, k in zip(ids, keep, strict=True)]


# A conversation whose turns say whether they are trained: `"train": false` masks one whatever data.train_on says,
# `true` trains one that last_answer would not; ShareGPT's `weight` (0, 1; null: as its role has it) says the same.
MARKED = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "train": False},
          {"role": "user", "content": "a"}, {"role": "assistant", "content": "ok"},
          {"role": "user", "content": "b"}, {"role": "assistant", "content": "yes", "train": True},
          {"role": "user", "content": "c"}, {"role": "assistant", "content": "ciao", "train": False}]
MARKED_SHAREGPT = {"conversations": [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"],
                                      "weight": {True: 1, False: 0}.get(m.get("train"))} for m in MARKED]}


@pytest.mark.parametrize("row", [{"messages": MARKED}, MARKED_SHAREGPT], ids=["messages", "sharegpt"])
def test_a_turn_marked_not_to_be_trained_is_masked_and_one_marked_true_is_trained(tmp_path, row):
    """axolotl's `message_field_training` and ShareGPT's `weight`: the keys were ignored, every answer trained."""
    (answers,), _ = _load(tmp_path, [row], "chat")
    assert (answers.input_ids, answers.labels) == _turn_mask(MARKED, {3, 5})
    # last_answer: the last answer not marked false ("yo" and "ciao" are context as "ok" is), and "yes", marked true
    (last,), _ = _load(tmp_path, [row], "chat", train_on="last_answer")
    assert (last.input_ids, last.labels) == _turn_mask(MARKED, {5})
    unmarked = [{k: v for k, v in m.items() if k != "train"} for m in MARKED]
    (last,), _ = _load(tmp_path, [{"messages": MARKED[:6] + unmarked[6:]}], "chat", train_on="last_answer")
    assert last.labels == _turn_mask(MARKED, {5, 7})[1]  # ("yes" is the one marked, "ciao" the last)
    (everything,), _ = _load(tmp_path, [row], "chat", train_on="all")  # all: every token but the turns marked false
    ids, marked_false = _turn_mask(MARKED, {1, 7})
    assert (everything.input_ids, everything.labels) == (ids, [IGNORE_INDEX if m != IGNORE_INDEX else t
                                                               for t, m in zip(ids, marked_false, strict=True)])


@pytest.mark.parametrize("train_on", ["answers", "last_answer", "all"])
@pytest.mark.parametrize("row", [{"messages": MARKED}, MARKED_SHAREGPT], ids=["messages", "sharegpt"])
def test_a_chat_row_is_asked_for_its_last_trained_answer_not_one_marked_as_context(tmp_path, row, train_on):
    """eval.samples and `peftkit eval --metrics` asked a marked conversation for its last assistant turn and scored
    against it, "ciao", though it is marked `"train": false` (context, never trained): they ask the conversation
    before the last trained turn, "yes", and score against it, whatever data.train_on. A conversation with no trained
    answer (every one marked false, which data.train_on: all trains on its other turns) gives no prompt, in both."""
    from peftkit.data.prompts import load_prompts
    from peftkit.errors import PeftkitError

    path = tmp_path / "d.jsonl"
    write_jsonl(path, [row])
    cfg = DataConfig(train=str(path), format="chat", train_on=train_on)
    for skip_empty in (True, False):  # eval.samples', and eval's and eval.metrics' prompts
        [prompt] = load_prompts(TOK, str(path), "train", cfg, skip_empty=skip_empty)
        assert prompt.reference == "yes"
        assert prompt.text == TOK.apply_chat_template(MARKED[:5], tokenize=False, add_generation_prompt=True)
    context = [dict(m, train=False) if m["role"] == "assistant" else m for m in MARKED]
    write_jsonl(path, [{"messages": context}, row])
    everything = cfg.model_copy(update={"train_on": "all"})  # (under the others, such a row is a bad row)
    assert [p.reference for p in load_prompts(TOK, str(path), "train", everything, skip_empty=True)] == ["yes"]
    assert [p.reference for p in load_prompts(TOK, str(path), "train", everything)] == ["yes"]
    write_jsonl(path, [{"messages": context}])
    assert load_prompts(TOK, str(path), "train", everything, skip_empty=True) == []
    with pytest.raises(PeftkitError, match=re.escape(f"No usable rows in {path} to take prompts from: every assistant "
                                                     "turn of 1 conversation is marked not to be trained, so there is "
                                                     "no answer to ask for.")):
        load_prompts(TOK, str(path), "train", everything)
    # generate --data (the rows are prompts): the last trained answer's too, and the last answer where none is
    assert load_prompts(TOK, str(path), "train", everything, targets=False)[0].reference == "ciao"


def _writing_other_keys():
    """The character tokenizer with a template that writes each message's keys but role and content (as some write
    `name`)."""
    import copy

    tok = copy.deepcopy(TOK)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{% for k, v in m | dictsort %}"
                         "{% if k not in ('role', 'content') %} {{ k }}={{ v }}{% endif %}{% endfor %}{{ '\\n' }}"
                         "{{ m['content'] }}</s>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    return tok


def test_the_train_key_never_reaches_the_chat_template(tmp_path):
    """A template that writes each message's other keys (as some write `name`) renders a marked conversation as the
    same conversation without the keys: `train=False` was written into the text."""
    tok = _writing_other_keys()
    write_jsonl(tmp_path / "d.jsonl", [{"messages": MARKED}])
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), format="chat")
    (ex,), _ = load_examples(tok, cfg.train, "train", cfg)
    unmarked = [{k: v for k, v in m.items() if k != "train"} for m in MARKED]
    assert (ex.input_ids, ex.labels) == _turn_mask(unmarked, {3, 5})
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(unmarked, tokenize=False)


def test_axolotls_older_training_key_marks_turns_as_train_does(tmp_path):
    """axolotl's older `message_field_training` default, `training`, was ignored (every answer trained) and written
    into the text by a template that writes a message's other keys; a message with both keys is a bad row, and an
    error names the key the row used."""

    from peftkit.errors import PeftkitError

    old = [{("training" if k == "train" else k): v for k, v in m.items()} for m in MARKED]
    for train_on, trained in (("answers", {3, 5}), ("last_answer", {5})):
        (ex,), _ = _load(tmp_path, [{"messages": old}], "chat", train_on=train_on)
        assert (ex.input_ids, ex.labels) == _turn_mask(MARKED, trained)
    tok = _writing_other_keys()
    write_jsonl(tmp_path / "d.jsonl", [{"messages": old}])
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), format="chat")
    (ex,), _ = load_examples(tok, cfg.train, "train", cfg)
    assert "training" not in tok.decode(ex.input_ids)
    both = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "train": True, "training": True}]
    for messages, message in ((both, "messages[1] has both 'train' and 'training' (axolotl's older name of it); "
                                     "keep one"),
                              (old[:3] + [old[3] | {"training": "no"}], 'messages[3].training is a string ("no")'),
                              (old[:2], "each is marked not to be trained (messages[1].training)")):
        with pytest.raises(PeftkitError, match=f"d.jsonl:1: .*{re.escape(message)}"):
            _load(tmp_path, [{"messages": messages}], "chat")


def test_a_parquet_file_of_rows_marked_with_train_and_rows_marked_with_training_reads_each_mark(tmp_path):
    """A parquet file (or hub dataset) gives each message every key a message of it has, null where it had none:
    rows marked with `train` beside rows marked with `training` were all bad rows ("messages[0] has both 'train'
    and 'training'"), and a `training` mark beside a null `train` would have been ignored. A null is no mark."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    old = [{("training" if k == "train" else k): v for k, v in m.items()} for m in MARKED]
    pq.write_table(pa.Table.from_pylist([{"messages": MARKED}, {"messages": old}]), tmp_path / "d.parquet")
    cfg = DataConfig(train=str(tmp_path / "d.parquet"), format="chat")
    examples, _ = load_examples(TOK, cfg.train, "train", cfg, cache=False)
    assert [(ex.input_ids, ex.labels) for ex in examples] == [_turn_mask(MARKED, {3, 5})] * 2


def test_train_on_is_part_of_the_cache_key(tmp_path, monkeypatch):
    """Examples tokenized for one data.train_on are not handed back for another."""
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    rows = [{"instruction": "Add.", "input": "1 2", "output": "3"}]
    (answers,), stats = _load(tmp_path, rows, "alpaca")
    (everything,), again = _load(tmp_path, rows, "alpaca", train_on="all")
    assert "cached" not in again and everything.labels == everything.input_ids != answers.labels
    assert "cached" in _load(tmp_path, rows, "alpaca", train_on="all")[1]


# Qwen3's logic: the assistant turns after the last user message carry a (here empty) <think> block, earlier
# ones none, so `messages[:i + 1]` rendered alone is not a prefix of the whole conversation.
QWEN3_STYLE = (
    "{%- set ns = namespace(last=messages|length - 1, found=false) -%}"
    "{%- for m in messages[::-1] -%}{%- if not ns.found and m.role == 'user' -%}"
    "{%- set ns.found = true -%}{%- set ns.last = messages|length - 1 - loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and loop.index0 > ns.last and loop.last %}<think>\n\n</think>\n\n{% endif %}"
    "{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen2.5's: a default system prompt in front of a conversation without one.
QWEN_STYLE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_masks_follow_the_turns_whatever_the_template_does_to_beginnings(tmp_path):
    """Two templates whose renderings of a conversation's beginning are not prefixes of the whole: Qwen3's (the
    second user turn was trained as if the assistant said it) and a conversation that opens with the assistant
    (the default system prompt and the role header were trained)."""
    import copy

    tok = copy.deepcopy(TOK)
    tok.chat_template = QWEN3_STYLE
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]
    write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), format="chat")
    (ex,), _ = load_examples(tok, cfg.train, "train", cfg)
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode([t for t in ex.labels if t != IGNORE_INDEX]) == "yo<|im_end|><think>\n\n</think>\n\nok<|im_end|>"
    tok.chat_template = QWEN_STYLE
    write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "assistant", "content": "Hello!"}, *messages]}])
    (ex,), _ = load_examples(tok, cfg.train, "train", cfg)
    assert tok.decode([t for t in ex.labels if t != IGNORE_INDEX]) == "Hello!<|im_end|>yo<|im_end|>ok<|im_end|>"


def _byte_level_tokenizer(trim_offsets: bool):
    """GPT-2 style (ByteLevel BPE, trained here on two lines), its post-processor trimming offsets or not, with a chat
    template whose generation prompt `Assistant: ` ends in the space that begins the answer's first token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|end|>", "<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["User: hi\nAssistant: Paris is\nif x:\n    return  x"] * 4, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|end|>", pad_token="<pad>")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}<|end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}Assistant: {% endif %}")
    return tok


def test_chat_trains_every_token_of_the_answer_whatever_its_offsets(tmp_path):
    """Trimmed offsets give a whitespace token no width (`Ġ` at (p, p)): the second space of `return  x` went
    untrained. A token running across the turn's start (`ĠParis`, its space the generation prompt's) was untrained
    too, so the answer's first word never was; it is trained whole, as transformers' assistant mask takes it."""
    for trim in (True, False):
        tok = _byte_level_tokenizer(trim)
        for answer in ("if x:\n    return  x", "Paris is"):
            write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                             {"role": "assistant", "content": answer}]}])
            (ex,), _ = load_examples(tok, str(tmp_path / "c.jsonl"), "train", DataConfig(train="x", format="chat"))
            trained = tok.decode([t for t in ex.labels if t != IGNORE_INDEX])
            assert trained.lstrip(" ") == answer + "<|end|>", (trim, trained)
            assert trained.startswith(" ") == (answer == "Paris is")  # the crossing token, whole


def test_a_tokenizer_that_appends_eos_puts_none_between_prompt_and_answer(tmp_path):
    """Like Llama's with add_eos_token: encoding with special tokens gives `<s> text </s>`. The prompt's EOS sat
    between prompt and answer (trained on, and ending every generation prompt)."""
    import copy

    from tokenizers import processors

    from peftkit.data.prompts import text_prompt

    tok = copy.deepcopy(TOK)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.bos_token_id), ("</s>", tok.eos_token_id)])
    assert tok("ab")["input_ids"][-1] == tok.eos_token_id
    for fmt, row, text in (("completion", {"prompt": "2+2=", "completion": "4"}, "<s>2+2=4</s>"),
                           ("text", {"text": "xy"}, "<s>xy</s>")):
        write_jsonl(tmp_path / "d.jsonl", [row])
        (ex,), _ = load_examples(tok, str(tmp_path / "d.jsonl"), "train", DataConfig(train="x", format=fmt))
        assert tok.decode(ex.input_ids) == text
    assert tok.decode(text_prompt(tok, "2+2=").ids) == "<s>2+2="


def _sentencepiece_style_tokenizer(prepend_scheme: str = "first"):
    """Like Llama-2's and Mistral v0.1's: Metaspace with prepend_scheme first, so a text encoded alone starts with
    a `▁` word piece (`4` alone is `▁4`; after `2+2=` it is `4`). `always`: their `legacy: true`, which starts a text
    anew after each special token too (`</s>4` is `</s> ▁4`)."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = string.ascii_letters + string.digits + "#"
    pieces = ["<pad>", "<s>", "</s>", "<unk>", *sorted(set(words + "+=:\n")), "▁", *("▁" + c for c in words)]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(pieces)}, merges=[("▁", c) for c in words],
                                   unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme, split=False)
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=prepend_scheme, split=False)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


@pytest.mark.parametrize("prepend_scheme", ["first", "always"])
def test_a_target_is_tokenized_as_it_follows_its_prompt(tmp_path, prepend_scheme):
    """A SentencePiece tokenizer marks the start of a text: the target encoded alone began with `▁4`, a token the
    text `2+2=4` never has. The target's tokens are now those of prompt and target encoded together, and the
    prompt's are those generation sends; a prompt whose end merges into the target keeps the target's own, encoded
    as text that continues (no `▁` of its own; with `legacy: true` it had one: `Q: ▁ ▁a`)."""
    from peftkit.data.prompts import text_prompt

    tok = _sentencepiece_style_tokenizer(prepend_scheme)
    assert tok.convert_ids_to_tokens(tok("4", add_special_tokens=False)["input_ids"]) == ["▁4"]
    rows = [({"prompt": "2+2=", "completion": "4"}, "completion", "2+2=", "4"),
            ({"instruction": "Add", "output": "ab"}, "alpaca", "### Instruction:\nAdd\n\n### Response:\n", "ab"),
            ({"prompt": "Q: ", "completion": "a b"}, "completion", "Q: ", "a b")]
    for row, fmt, prompt, answer in rows:
        write_jsonl(tmp_path / "d.jsonl", [row])
        (ex,), _ = load_examples(tok, str(tmp_path / "d.jsonl"), "train", DataConfig(train="x", format=fmt))
        sent = text_prompt(tok, prompt).ids
        assert ex.input_ids[: len(sent)] == sent and all(t == IGNORE_INDEX for t in ex.labels[: len(sent)])
        target = ex.input_ids[len(sent):]
        assert ex.labels[len(sent):] == target and target[-1] == tok.eos_token_id
        joined = tok(prompt + answer)["input_ids"]
        if prompt.endswith(" "):  # the prompt's `▁` merges into `▁a`: the target alone, as text that continues
            assert joined[: len(sent)] != sent
            assert tok.convert_ids_to_tokens(target[:-1]) == ["a", "▁b"]  # alone, it was `▁a` `▁b`: "Q:  a b"
        else:
            assert ex.input_ids == joined + [tok.eos_token_id]
            assert not tok.convert_ids_to_tokens(target[0]).startswith("▁")
        assert tok.decode(ex.input_ids, skip_special_tokens=True) == prompt + answer  # the row's text, no space added


def test_csv_text_is_read_as_written_and_blank_text_lines_are_no_examples(tmp_path):
    """pandas typed a CSV's "4" as a number and an empty cell (an alpaca row without input) as NaN, so those
    rows were refused; a .txt file's blank lines became examples of BOS and EOS alone."""
    (tmp_path / "d.csv").write_text('instruction,input,output\nAdd.,,"4"\nSay NA.,NA,007\n')
    examples, _ = load_examples(TOK, str(tmp_path / "d.csv"), "train", DataConfig(train="x"))
    assert [TOK.decode([t for t in e.labels if t != IGNORE_INDEX]) for e in examples] == ["4</s>", "007</s>"]
    assert "### Input" not in TOK.decode(examples[0].input_ids) and "### Input:\nNA" in TOK.decode(examples[1].input_ids)
    (tmp_path / "d.txt").write_text("The quick fox.\n\nSecond paragraph.\n\n\n")
    examples, _ = load_examples(TOK, str(tmp_path / "d.txt"), "train", DataConfig(train="x", format="text"))
    assert [TOK.decode(e.input_ids) for e in examples] == ["<s>The quick fox.</s>", "<s>Second paragraph.</s>"]


def test_an_empty_text_row_is_a_bad_row_and_a_byte_order_mark_is_not_one(tmp_path):
    import pytest

    from peftkit.errors import PeftkitError

    (tmp_path / "d.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "ab"}\n{"text": "  "}\n')
    with pytest.raises(PeftkitError, match=r"d.jsonl:2: field 'text' is empty for data.format 'text'"):
        load_examples(TOK, str(tmp_path / "d.jsonl"), "train", DataConfig(train="x", format="text"))
    (ex,), _ = load_examples(TOK, str(tmp_path / "d.jsonl"), "train", DataConfig(train="x", format="text",
                                                                              on_bad_rows="skip"))
    assert TOK.decode(ex.input_ids) == "<s>ab</s>"


def test_truncation_and_examples_with_nothing_left(tmp_path):
    rows = [{"prompt": "x" * 50, "completion": "yy"}, {"prompt": "p", "completion": "z" * 40}]
    examples, stats = _load(tmp_path, rows, "completion", max_length=20)
    assert stats["too_long"] == 1  # the first one's completion lies beyond 20 tokens
    assert len(examples) == 1 and len(examples[0].input_ids) == 20


def test_collator_pads_with_ignore_labels():
    batch = Collator(pad_id=0)([Example([1, 2, 3], [IGNORE_INDEX, 2, 3]), Example([1, 4], [IGNORE_INDEX, 4])])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [1, 4, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3], [IGNORE_INDEX, 4, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_order_is_seeded_and_resumable():
    a = epoch_batches(10, 3, seed=0, epoch=0, shuffle=True)
    assert a == epoch_batches(10, 3, seed=0, epoch=0, shuffle=True)
    assert a != epoch_batches(10, 3, seed=1, epoch=0, shuffle=True)
    assert a != epoch_batches(10, 3, seed=0, epoch=1, shuffle=True)
    assert sorted(i for b in a for i in b) == list(range(10))
    examples = [Example([1, i + 5], [IGNORE_INDEX, i + 5]) for i in range(10)]
    # 4 micro-batches of 3 an epoch, in windows of 3 and 1: steps 0-5 cross two epochs, each window in its own.
    assert steps_per_epoch(10, 3, 3) == 2
    full = step_windows(examples, 3, 3, seed=0, shuffle=True, pad_id=0)
    stream = [[b["input_ids"] for b in next(full)] for _ in range(6)]
    assert [len(w) for w in stream] == [3, 1, 3, 1, 3, 1]
    for epoch in (0, 1, 2):
        rows = sorted(int(ids[i, 1]) - 5 for w in stream[2 * epoch:2 * epoch + 2] for ids in w for i in range(len(ids)))
        assert rows == list(range(10))  # every example once an epoch
    resumed = step_windows(examples, 3, 3, seed=0, shuffle=True, pad_id=0, start=3)
    for expected in stream[3:]:
        assert all(torch.equal(a["input_ids"], b) for a, b in zip(next(resumed), expected, strict=True))


def _mixed_lengths(n: int = 103) -> list[Example]:
    """`n` examples of 5 to 200 tokens, example i made of the token i + 1 (so a padded row names its example)."""
    import random

    rng = random.Random(0)
    return [Example([i + 1] * k, [i + 1] * k) for i, k in enumerate(rng.randint(5, 200) for _ in range(n))]


def _epoch_rows(stream, steps: int) -> list[list[int]]:
    """The examples of each micro-batch of the next `steps` windows of `step_windows`, in order."""
    return [[int(row[0]) - 1 for row in batch["input_ids"]] for _ in range(steps) for batch in next(stream)]


def test_group_by_length_is_transformers_grouping_of_the_epochs_generator():
    """data.group_by_length: each epoch's order is transformers' get_length_grouped_indices drawn from the generator
    the plain shuffle draws from, seeded by (seed, epoch); every example comes once an epoch (103 rows, batch 4,
    grad_accum 2: 26 micro-batches in 13 windows, the last epoch's batch of 3 and window of 1 included)."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    examples = _mixed_lengths()
    lengths = [len(e.input_ids) for e in examples]
    stream = step_windows(examples, 4, 2, seed=7, shuffle=True, pad_id=0, group_by_length=True)
    for epoch in range(2):
        order = get_length_grouped_indices(lengths, 4, generator=torch.Generator().manual_seed(7 * 1_000_003 + epoch))
        rows = _epoch_rows(stream, steps_per_epoch(103, 4, 2))
        assert rows == [order[i:i + 4] for i in range(0, 103, 4)]
        assert sorted(i for batch in rows for i in batch) == list(range(103))
    # The megabatch structure itself (an independent computation of transformers' steps): the plain shuffle's
    # permutation in megabatches of 6 batches (103 // (4 x 4)), each sorted longest first, the longest one first.
    perm = torch.randperm(103, generator=torch.Generator().manual_seed(7 * 1_000_003)).tolist()
    mega = [sorted(perm[i:i + 24], key=lambda j: -lengths[j]) for i in range(0, 103, 24)]
    top = max(range(len(mega)), key=lambda m: lengths[mega[m][0]])
    mega[0][0], mega[top][0] = mega[top][0], mega[0][0]
    assert [i for m in mega for i in m] == [i for b in epoch_batches(103, 4, 7, 0, True, lengths) for i in b]


def test_group_by_length_pads_less_and_resumes_mid_epoch():
    """On rows of 5 to 200 tokens the padding (sum over batches of rows x longest - tokens) falls to a quarter;
    a stream started at step 5 (mid-epoch) gives the unbroken stream's batches from there."""
    examples = _mixed_lengths()

    def padding(group: bool) -> int:
        stream = step_windows(examples, 4, 1, seed=0, shuffle=True, pad_id=0, group_by_length=group)
        return sum(b["input_ids"].numel() - int(b["attention_mask"].sum()) for _ in range(26) for b in next(stream))

    assert padding(True) < padding(False) / 3  # measured: 1,339 vs 5,720 pad tokens for 10,676 real ones
    full = _epoch_rows(step_windows(examples, 4, 1, seed=0, shuffle=True, pad_id=0, group_by_length=True), 40)
    resumed = step_windows(examples, 4, 1, seed=0, shuffle=True, pad_id=0, start=5, group_by_length=True)
    assert _epoch_rows(resumed, 35) == full[5:]


def test_group_by_length_gives_each_process_rows_of_similar_length_once_an_epoch():
    """Under 2 processes the loop groups the global batch (batch 4 x 2 processes) and each process trains on its
    consecutive half (`shard`): every example once an epoch over the two, and a process's rows as close in length
    as a single process's batch of 4 (transformers' DistributedLengthGroupedSampler deals each its own batches)."""
    from peftkit.distributed import shard

    examples = _mixed_lengths(96)
    stream = step_windows(examples, 8, 1, seed=0, shuffle=True, pad_id=0, group_by_length=True)
    seen, spread = [], []
    for (batch,) in (next(stream) for _ in range(12)):
        for rank in (0, 1):
            rows = shard(batch, rank, 2)
            seen += [int(r[0]) - 1 for r in rows["input_ids"]]
            widths = rows["attention_mask"].sum(1)
            spread.append(int(widths.max() - widths.min()))
    assert sorted(seen) == list(range(96))
    ungrouped = step_windows(examples, 4, 1, seed=0, shuffle=True, pad_id=0)
    plain = [int(w.max() - w.min()) for (b,) in (next(ungrouped) for _ in range(24)) for w in [b["attention_mask"].sum(1)]]
    assert sum(spread) < sum(plain) / 3


def test_group_by_length_is_refused_with_packing_or_without_shuffle(tmp_path, monkeypatch, capsys, tiny_llama,
                                                                     number_data):
    from tests.conftest import cli_user_error, make_recipe

    for data, message in [
        ({"packing": True}, "data.group_by_length and data.packing both cut padding: packing fills each row with "
                            "several examples, so there is no padding left to group away; keep one of them"),
        ({"shuffle": False}, "data.group_by_length draws a random order (megabatches sorted by length), and "
                             "data.shuffle: false keeps the data's own order; keep one of them")]:
        recipe = make_recipe(tmp_path, tiny_llama, number_data, data={"group_by_length": True, **data})
        err = " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())
        assert message in err, err


def test_a_grouped_run_trains_on_the_grouped_batches_and_resumes_mid_epoch_to_the_same_bits(tmp_path, tiny_llama,
                                                                                            number_data):
    """64 rows, batch 4: killed after step 2 of 6, in the first epoch of 16 steps. Each step's tokens (metrics.jsonl)
    are those of the grouped batches of the run's examples, not of the plain shuffle's."""
    from peftkit.modeling import load_tokenizer
    from peftkit.recipe import load_recipe
    from tests.conftest import check_resumes_to_the_same_bits, make_recipe

    recipe = make_recipe(tmp_path, tiny_llama, number_data, data={"group_by_length": True}, eval={"base_model": False},
                         training={"save_steps": 2, "save_total_limit": 10})
    check_resumes_to_the_same_bits(recipe, tmp_path / "run", kill_after=2, steps=6)
    cfg = load_recipe(recipe)
    examples = load_examples(load_tokenizer(cfg.model), cfg.data.train, "train", cfg.data)[0]

    def tokens(group: bool) -> list[int]:
        stream = step_windows(examples, 4, 1, seed=0, shuffle=True, pad_id=0, group_by_length=group)
        return list(itertools.accumulate(int(b["attention_mask"].sum()) for _ in range(6) for b in next(stream)))

    logged = [json.loads(line)["tokens"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert logged == tokens(True) != tokens(False)


def _worker_handlers(batch) -> tuple:
    """A collate function, which runs in the DataLoader worker: that worker's SIGINT and SIGTERM handlers."""
    import signal

    return signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)


def test_data_workers_leave_stop_signals_to_the_main_process():
    """SIGINT/SIGTERM sent to the whole process group (Ctrl-C, Slurm, systemd) must not kill a worker: the main
    process checkpoints and stops. A worker that kept the default SIGTERM died, and the run crashed with a traceback."""
    import signal

    examples = [Example([1, 2, 3], [1, 2, 3]) for _ in range(4)]
    stream = step_windows(examples, 2, 1, seed=0, shuffle=False, pad_id=0, num_workers=1, collate=_worker_handlers)
    assert next(stream) == [(signal.SIG_IGN, signal.SIG_IGN)]


def _worker_pid(batch) -> int:
    return os.getpid()


def test_data_workers_start_once_for_every_epoch():
    """A DataLoader per epoch started its workers anew each epoch: on small data of many epochs, 2 workers made
    training 2.5x slower than none. The batches are the same either way (test_order_is_seeded_and_resumable)."""
    examples = [Example([1, 2, 3], [1, 2, 3]) for _ in range(4)]
    stream = step_windows(examples, 2, 1, seed=0, shuffle=True, pad_id=0, num_workers=1, collate=_worker_pid)
    pids = {pid for _ in range(6) for pid in next(stream)}  # 3 epochs of 2 steps
    assert len(pids) == 1 and os.getpid() not in pids


def test_a_jsonl_file_is_read_without_importing_datasets(tmp_path):
    """`datasets` takes 0.7 s of a process's start; a .jsonl file (the quickstart's, most recipes') does not need it."""
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n')
    code = (f"import sys; from peftkit.data.rows import load_rows; print(load_rows({str(path)!r}, 'train')[0], "
            "'datasets' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[{'a': 1}] False", done.stdout + done.stderr


def test_a_bad_row_deep_in_a_file_is_an_error_before_any_tokenizing(tmp_path, monkeypatch):
    """A missing field on line 70,001 of 100k rows was reported after the 70,000 rows before it were tokenized
    (minutes, for real data). Rows go to the tokenizer 512 at a time; a chunk boundary changes no example."""
    import pytest

    from peftkit.data import examples as examples_module
    from peftkit.errors import PeftkitError

    rows = [{"prompt": f"{i}+{i}=", "completion": str(2 * i)} for i in range(1200)]
    whole = _load(tmp_path, rows, "completion")[0]
    singly = [e for i in range(0, 1200, 150) for e in _load(tmp_path, rows[i:i + 150], "completion")[0]]
    assert [(e.input_ids, e.labels) for e in whole] == [(e.input_ids, e.labels) for e in singly]

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized before the bad row was found")

    monkeypatch.setattr(examples_module, "_full_examples", no_tokenizing)
    with pytest.raises(PeftkitError, match=r"d\.jsonl:1201: missing field 'completion'"):
        _load(tmp_path, [*rows, {"prompt": "x"}], "completion")


# DeepSeek-R1-distill's logic: the generation prompt opens a <think> block that the conversation's own turns lack, so
# no rendering of a conversation's beginning with the generation prompt is a prefix of the whole.
DEEPSEEK_STYLE = ("{% for m in messages %}{% if m.role == 'user' %}<U>{{ m.content }}{% else %}<A>{{ m.content }}</s>"
                  "{% endif %}{% endfor %}{% if add_generation_prompt %}<A><think>\n{% endif %}")


def test_a_turn_found_by_its_content_is_never_an_earlier_copy_of_it(tmp_path):
    """Where the renderings of beginnings are not prefixes, a turn is found by its content: that found the first copy
    of the answer anywhere (a user turn, an earlier answer, the default system prompt) and trained everything from
    there on. An empty answer there has nothing to find: refused, not trained as nothing."""
    import copy

    import pytest

    from peftkit.errors import PeftkitError

    tok = copy.deepcopy(TOK)
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), format="chat")

    def trained(messages):
        write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])
        (ex,), _ = load_examples(tok, cfg.train, "train", cfg)
        return tok.decode([t for t in ex.labels if t != IGNORE_INDEX])

    tok.chat_template = DEEPSEEK_STYLE
    assert trained([{"role": "user", "content": "Say Yes or No"}, {"role": "assistant", "content": "Yes"},
                    {"role": "user", "content": "Yes again?"}, {"role": "assistant", "content": "Yes"}]) == "Yes</s>Yes</s>"
    with pytest.raises(PeftkitError, match=r"d\.jsonl:1: messages\[1\]\.content is empty \(an assistant turn\)"):
        trained([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}])
    tok.chat_template = QWEN_STYLE  # "assistant" is in the default system prompt too
    assert trained([{"role": "assistant", "content": "assistant"}, {"role": "user", "content": "thanks"},
                    {"role": "assistant", "content": "ok"}]) == "assistant<|im_end|>ok<|im_end|>"


# Phi-3's template: the EOS closes the whole conversation, so a rendering up to a middle answer ends otherwise than
# that answer does in the whole ("<|end|>\n<|endoftext|>" against "<|end|>\n<|user|>").
PHI3_STYLE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}")


def test_a_turn_rendered_with_the_conversations_end_is_trained_alone(tmp_path):
    """A middle answer of Phi-3's template was found by its content followed by the conversation's end, which only
    the last answer has: an answer the last one ends with ("yo" of "yo yo") trained everything from the first answer
    to the end, user turns and all; one it does not end with was an error."""
    import copy

    tok = copy.deepcopy(TOK)
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    tok.chat_template = PHI3_STYLE
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), format="chat")
    for first, last in (("yo", "yo yo"), ("Lima", "Nairobi")):
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "again"}, {"role": "assistant", "content": last}]
        write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])
        (ex,), _ = load_examples(tok, cfg.train, "train", cfg)
        assert tok.decode([t for t in ex.labels if t != IGNORE_INDEX]) == f"{first}<|end|>{last}<|end|>\n</s>"


# Mistral v0.3's template: the system message goes into the last user turn (so no beginning of a conversation with
# one renders as a prefix of the whole), and each answer is trimmed.
MISTRAL_STYLE = ("{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
                 "{% set messages = messages[1:] %}{% endif %}{{ bos_token }}{% for m in messages %}"
                 "{% if m['role'] == 'user' %}{% if loop.last and system is defined %}"
                 "{{ '[INST] ' + system + '\\n\\n' + m['content'] + '[/INST]' }}{% else %}"
                 "{{ '[INST] ' + m['content'] + '[/INST]' }}{% endif %}"
                 "{% else %}{{ ' ' + m['content'] | trim + eos_token }}{% endif %}{% endfor %}")


def test_an_answer_the_template_trims_is_found_trimmed(tmp_path):
    """Where a turn is found by its content (Mistral v0.3's template with a system message), an answer with space
    around it (a newline at its end, common in data) was looked for as it is, which the template trims away: the row
    was an error, and with data.on_bad_rows: skip a conversation of such rows trained nothing."""
    import copy

    tok = copy.deepcopy(TOK)
    tok.add_special_tokens({"additional_special_tokens": ["[INST]", "[/INST]"]})
    tok.chat_template = MISTRAL_STYLE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"},
                {"role": "assistant", "content": "Lima\n"}, {"role": "user", "content": "And Kenya?"},
                {"role": "assistant", "content": " Nairobi "}]
    write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), format="chat")
    (ex,), _ = load_examples(tok, cfg.train, "train", cfg)
    assert tok.decode(ex.input_ids) == "<s>[INST] Capital of Peru?[/INST] Lima</s>[INST] And Kenya?[/INST] Nairobi</s>"
    assert tok.decode([t for t in ex.labels if t != IGNORE_INDEX]) == "Lima</s>Nairobi</s>"


def test_an_answer_the_template_rewrites_is_an_error_that_says_so(tmp_path):
    """DeepSeek-R1's template drops an answer's reasoning up to `</think>`: the row was an error saying the template
    renders the turn in a way peftkit cannot locate and to use a template whose beginnings are prefixes of the whole,
    which says nothing of the cause (the answer is not written as the row has it) or of the fix."""
    import copy

    from peftkit.errors import PeftkitError

    tok = copy.deepcopy(TOK)
    tok.chat_template = DEEPSEEK_STYLE.replace("<A>{{ m.content }}", "<A>{{ m.content.split('</think>')[-1] }}")
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>add</think>4"}]
    write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), format="chat")
    with pytest.raises(PeftkitError, match=r"d\.jsonl:1: the chat template does not write assistant turn 2 as the "
                       r"row has it: it rewrites the answer \(DeepSeek-R1's drops the reasoning up to '</think>'\)"):
        load_examples(tok, cfg.train, "train", cfg)
    with pytest.raises(PeftkitError, match=r"does not write assistant turn 2 as"):  # (not data.system_prompt's: 3)
        load_examples(tok, cfg.train, "train", cfg.model_copy(update={"system_prompt": "Be brief."}), cache=False)
    messages[1]["content"] = "4"
    write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])
    (ex,), _ = load_examples(tok, cfg.train, "train", cfg)
    assert tok.decode([t for t in ex.labels if t != IGNORE_INDEX]) == "4</s>"


def test_a_conversation_the_template_refuses_is_an_error_naming_its_row(tmp_path):
    """Gemma's template raises on a system message: it was a jinja traceback from train, eval, generate and chat."""
    import copy

    import pytest

    from peftkit.data.prompts import load_prompts
    from peftkit.errors import PeftkitError

    tok = copy.deepcopy(TOK)
    tok.chat_template = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not "
                         "supported') }}{% endif %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}")
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    write_jsonl(tmp_path / "d.jsonl", [ok, {"messages": [{"role": "system", "content": "Be brief."}, *ok["messages"]]}])
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), format="chat")
    expected = r"d\.jsonl:2: the chat template refuses this conversation \(System role not supported\)\. Fix"
    with pytest.raises(PeftkitError, match=expected):
        load_examples(tok, cfg.train, "train", cfg)
    with pytest.raises(PeftkitError, match=expected):
        load_prompts(tok, cfg.train, "train", cfg)


def test_a_generation_prompt_unlike_training_s_prefix_is_warned_about(tmp_path):
    """DeepSeek-R1's template opens a <think> block in the generation prompt that its turns lack: generate --data and
    eval's metrics asked the model in a form it never trained on, without a word."""
    import copy
    import warnings

    from peftkit.data.prompts import load_prompts
    from peftkit.errors import PeftkitWarning

    tok = copy.deepcopy(TOK)
    rows = [{"messages": [{"role": "user", "content": f"{i}?"}, {"role": "assistant", "content": str(i)}]}
            for i in range(3)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), format="chat")
    for template, expected in ((DEEPSEEK_STYLE, 1), (QWEN_STYLE, 0)):
        tok.chat_template = template
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_prompts(tok, cfg.train, "train", cfg)
        said = [str(w.message) for w in caught if issubclass(w.category, PeftkitWarning)]
        assert len(said) == expected  # once, for the first row, not per row
        assert all(m.startswith(f"{cfg.train}:1: the chat template's generation prompt differs") and "<think>" in m
                   for m in said)


def test_examples_store_gives_back_what_went_in():
    from peftkit.data import Examples

    made = [Example([5, 300, 70_000], [IGNORE_INDEX, 300, 70_000], task_id=2), Example([1], [1]),
            Example([9, 8], [IGNORE_INDEX, IGNORE_INDEX], task_id=0)]
    stored = Examples(made)
    assert len(stored) == 3 and list(stored) == made and stored[-1] == made[-1]
    assert stored.lengths() == [3, 1, 2] and stored.task_ids == [2, None, 0]
    try:
        stored[3]
    except IndexError:
        pass
    else:
        raise AssertionError("no IndexError past the end")
    packed = Examples([Example([1, 2, 3], [IGNORE_INDEX, 2, 3], [0, 1, 0])])
    assert packed[0].position_ids == [0, 1, 0]
    for mixed in (Example([4], [4]), Example([4], [4, 4], [0]), Example([4], [4], token_type_ids=[1])):
        try:
            Examples([Example([1], [1], [0]), mixed])
        except ValueError:
            continue
        raise AssertionError(f"{mixed} accepted")


def test_loaded_examples_are_held_in_about_8_bytes_a_token(tmp_path):
    """A list of Examples holds a pointer per token in each of two lists (16 bytes with this tokenizer's small ids,
    about 45 with a real tokenizer's); the store holds an int32 id and label per token."""
    import tracemalloc

    rows = [{"instruction": f"Write {i} in words, please." * 3, "output": f"number {i} " * 5} for i in range(300)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), format="alpaca", max_length=512)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        examples, _ = load_examples(TOK, cfg.train, "train", cfg)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    tokens = sum(len(e.input_ids) for e in examples)
    assert tokens > 50_000 and held / tokens < 10, f"{held / tokens:.1f} bytes a token"


def test_chat_trained_tokens_are_transformers_assistant_mask(tmp_path):
    """The trained tokens are those transformers' assistant mask marks, with `{% generation %}` around each answer
    and its end-of-turn marker as TRL's templates put it: the newline the template writes after the marker is not
    trained (it was: on one-word answers a fifth of the targets, and the eval loss fell with it)."""
    from peftkit.tiny import build_char_tokenizer

    tok = build_char_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}"
        "{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}{{ '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"},
                {"role": "assistant", "content": "Lima"}, {"role": "user", "content": "And Kenya?"},
                {"role": "assistant", "content": "Nairobi"}]
    write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])
    (ex,), _ = load_examples(tok, str(tmp_path / "d.jsonl"), "train", DataConfig(train="x", format="chat"))
    reference = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    assert ex.input_ids == reference["input_ids"] and "<|im_end|>\n<|im_start|>" in tok.decode(ex.input_ids)
    assert [label != IGNORE_INDEX for label in ex.labels] == [bool(m) for m in reference["assistant_masks"]]
    assert tok.decode([t for t in ex.labels if t != IGNORE_INDEX]) == "Lima<|im_end|>Nairobi<|im_end|>"


def test_sharegpt_rows_are_conversations(tmp_path):
    """ShareGPT's rows (`conversations` of {from, value}, a `system` field beside them, as LLaMA-Factory and axolotl
    read them) give the examples and prompts of the same conversation as `messages`; they were refused for their
    missing 'messages'."""
    from peftkit.data.prompts import load_prompts

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"}, {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "ciao"}]
    sharegpt = {"system": "Be brief.", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"},
                                                          {"from": "human", "value": "bye"},
                                                          {"from": "gpt", "value": "ciao"}]}
    (ex,), _ = _load(tmp_path, [sharegpt], "chat")
    (expected,), _ = _load(tmp_path, [{"messages": messages}], "chat")
    assert ex.input_ids == expected.input_ids and ex.labels == expected.labels
    # A column of ShareGPT's turns mapped as the messages (columns: {messages: conversation}) was refused as messages
    # that are not {role, content}.
    mapped = {"system": sharegpt["system"], "conversation": sharegpt["conversations"]}
    (ex,), _ = _load(tmp_path, [mapped], "chat", columns={"messages": "conversation"})
    assert ex.input_ids == expected.input_ids and ex.labels == expected.labels
    write_jsonl(tmp_path / "d.jsonl", [sharegpt])
    [prompt] = load_prompts(TOK, str(tmp_path / "d.jsonl"), "train", DataConfig(train="x", format="chat"))
    assert prompt.reference == "ciao" and prompt.text == TOK.apply_chat_template(messages[:-1], tokenize=False,
                                                                                add_generation_prompt=True)


def test_an_empty_sharegpt_system_field_is_no_system_message(tmp_path):
    """LLaMA-Factory's ShareGPT rows often hold `"system": ""`, which it reads as no system message (its template's
    default one, or none). It was an empty system turn, trained on as context, and data.system_prompt was not applied."""
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    (empty,), _ = _load(tmp_path, [{"system": "", "conversations": turns}], "chat")
    (expected,), _ = _load(tmp_path, [{"messages": messages}], "chat")
    assert empty.input_ids == expected.input_ids
    (given,), _ = _load(tmp_path, [{"system": "", "conversations": turns}], "chat", system_prompt="Be brief.")
    (expected,), _ = _load(tmp_path, [{"messages": [{"role": "system", "content": "Be brief."}, *messages]}], "chat")
    assert given.input_ids == expected.input_ids


CALL_FORM = ('a function_call turn\'s value is JSON text of a call, {"name": ..., "arguments": {...}}, or of a list of '
             "calls")


@pytest.mark.parametrize(("row", "message"), [
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "x"}]},
     "conversations[1].from is 'bot', not a ShareGPT speaker (human, gpt, function_call, observation, system); "
     "rename it 'gpt'"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": " "}]},
     "conversations[1].value is empty (an assistant turn)"),
    ({"system": "s", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]},
     "conversations[0].value must be a string, got int"),
    ({"system": 5, "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]},
     "field 'system' must be a string, got int"),
    ({"conversations": [{"from": "human", "text": "hi"}]},
     "'conversations' must be a list of {from, value} objects (ShareGPT's turns: from human, gpt, function_call, "
     "observation, system)"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "function", "value": "3"}, {"from": "gpt", "value": "x"}]},
     "conversations[1].from is 'function', not a ShareGPT speaker (human, gpt, function_call, observation, system); "
     "rename it 'observation' (a tool's result) or 'function_call' (a call)"),
    ({"conversations": [{"from": ["human"], "value": "hi"}, {"from": "gpt", "value": "x"}]},  # a TypeError before
     "conversations[0].from is ['human'], not a ShareGPT speaker (human, gpt, function_call, observation, system)"),
    ({"conversations": [{"from": "Human", "value": "hi"}, {"from": "gpt", "value": "x"}]},
     "conversations[0].from is 'Human', not a ShareGPT speaker (human, gpt, function_call, observation, system); "
     "rename it 'human'"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": "{'name': 'add'}"}]},
     "conversations[1].value is not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 "
     "(char 1)); " + CALL_FORM),
    ({"system": "s", "conversations": [{"from": "human", "value": "hi"},
                                       {"from": "function_call", "value": '[{"name": "add", "arguments": "a=1"}]'}]},
     "conversations[1].value holds a call whose 'arguments' is a string that is not JSON text of an object: an object "
     "of the arguments by name ({} for none), or JSON text of one; " + CALL_FORM),
    ({"conversations": [{"from": "human", "value": "hi"},
                        {"from": "function_call", "value": '{"name": "add", "arguments": "[1, 2]"}'}]},
     "conversations[1].value holds a call whose 'arguments' is a string that is not JSON text of an object: an object "
     "of the arguments by name ({} for none), or JSON text of one; " + CALL_FORM),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": '{"name": "add"}'}]},
     "conversations[1].value holds a call without 'arguments': an object of the arguments by name ({} for none), or "
     "JSON text of one; " + CALL_FORM),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": '{"arguments": {}}'}]},
     "conversations[1].value holds a call without a 'name' (a nonempty string); " + CALL_FORM),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": "[]"}]},
     "conversations[1].value is an empty list of calls; " + CALL_FORM),
])
def test_bad_sharegpt_rows_are_named_in_their_own_words(tmp_path, row, message):
    from peftkit.errors import PeftkitError

    # (what each row needs: it said 'messages' alone, of a row that is rightly ShareGPT's)
    needs = "(each row needs messages, or ShareGPT's conversations)"
    with pytest.raises(PeftkitError, match=f"d.jsonl:1: {re.escape(message)} for data.format 'chat' {re.escape(needs)}"):
        _load(tmp_path, [row], "chat")


def _marked(*marks, sharegpt=False, system=None):
    """A row of user/assistant turns, `marks` the assistant turns' `train` (ShareGPT's `weight`) values."""
    if sharegpt:
        turns = [t for mark in marks
                 for t in ({"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "weight": mark})]
        return {"conversations": turns} | ({"system": system} if system else {})
    return {"messages": [m for mark in marks for m in ({"role": "user", "content": "q"},
                                                       {"role": "assistant", "content": "a", "train": mark})]}


@pytest.mark.parametrize(("row", "message"), [
    (_marked(True, "no"), 'messages[3].train is a string ("no"); give true or false (whether this assistant turn is '
                          "trained), or leave it out"),
    (_marked(1), "messages[1].train is a number (1); give true or false"),
    ({"messages": [{"role": "user", "content": "q", "train": True}, {"role": "assistant", "content": "a"}]},
     "messages[0].train is true on a user message: only assistant messages are trained (data.train_on: all trains "
     "every message); give false, or leave it out"),
    (_marked(False, False), "no assistant message to learn from: each is marked not to be trained (messages[1].train, "
                            "messages[3].train); train one, or leave the row out"),
    (_marked(0.5, sharegpt=True), "conversations[1].weight is a number (0.5); give 0 (not trained) or 1 (trained), or "
                                  "null or none for its role's default"),
    (_marked("0", sharegpt=True), 'conversations[1].weight is a string ("0"); give 0'),
    (_marked(True, sharegpt=True), "conversations[1].weight is a boolean (true); give 0"),
    ({"conversations": [{"from": "human", "value": "q", "weight": 1}, {"from": "gpt", "value": "a"}]},
     "conversations[0].weight is 1 on a 'human' turn: only gpt (assistant) turns are trained (data.train_on: all "
     "trains every turn); give 0, or leave it out"),
    (_marked(0, 0.0, sharegpt=True, system="s"), "no assistant message to learn from: each is marked not to be "
                                                 "trained (conversations[1].weight, conversations[3].weight)"),
])
def test_a_bad_train_key_or_weight_is_a_bad_row_naming_it(tmp_path, row, message):
    """They were ignored: a string, a weight of 0.5 or a user turn's `train: true` trained as if unmarked, and a
    conversation marked all untrained trained every answer. Such a row is skipped under data.on_bad_rows: skip."""
    from peftkit.errors import PeftkitError

    with pytest.raises(PeftkitError, match=f"d.jsonl:1: {re.escape(message)}.* for data.format 'chat'"):
        _load(tmp_path, [row], "chat")
    examples, stats = _load(tmp_path, [row, _marked(None)], "chat", on_bad_rows="skip")
    assert len(examples) == 1 and stats["bad_rows"] == 1



@pytest.mark.parametrize(("row", "message"), [
    ({"messages": [{"role": "user", "content": "q", "train": False}, {"role": "assistant", "content": "a"}]},
     "messages[0].train is false on a user message, but data.train_on: all trains every message and masks only "
     "assistant messages marked false; leave it out, or set data.train_on: answers"),
    ({"conversations": [{"from": "human", "value": "q", "weight": 0}, {"from": "gpt", "value": "a"}]},
     "conversations[0].weight is 0 on a 'human' turn, but data.train_on: all trains every turn and masks only gpt "
     "(assistant) turns marked 0; leave it out, or set data.train_on: answers"),
])
def test_under_train_on_all_a_user_turn_marked_false_is_a_bad_row(tmp_path, row, message):
    """It was accepted and ignored: the user turn trained as every token does. Under `answers` it says what happens."""
    from peftkit.errors import PeftkitError

    with pytest.raises(PeftkitError, match=f"d.jsonl:1: {re.escape(message)} for data.format 'chat'"):
        _load(tmp_path, [row], "chat", train_on="all")
    examples, stats = _load(tmp_path, [row, _marked(None)], "chat", train_on="all", on_bad_rows="skip")
    assert len(examples) == 1 and stats["bad_rows"] == 1
    (answers,), _ = _load(tmp_path, [row], "chat")
    assert _decode_labels(answers) == "a</s>"


@pytest.mark.parametrize("sharegpt", [False, True], ids=["messages", "sharegpt"])
def test_under_train_on_all_a_conversation_of_answers_marked_false_trains_its_other_turns(tmp_path, sharegpt):
    """It was refused as having nothing to learn, though `all` trains its user turns; `answers` still refuses it."""
    from peftkit.errors import PeftkitError

    row = _marked(*([0, 0] if sharegpt else [False, False]), sharegpt=sharegpt)
    (ex,), _ = _load(tmp_path, [row], "chat", train_on="all")
    ids, answers = _turn_mask(_marked(None, None)["messages"], {1, 3})
    assert (ex.input_ids, ex.labels) == (ids, [IGNORE_INDEX if a != IGNORE_INDEX else t
                                               for t, a in zip(ids, answers, strict=True)])
    with pytest.raises(PeftkitError, match="no assistant message to learn from: each is marked not to be trained"):
        _load(tmp_path, [row], "chat")


def test_data_columns_map_the_formats_fields(tmp_path, monkeypatch):
    """data.columns reads a format's fields from columns named otherwise; the cache keys on it (these rows hold both
    names, with other text), and a missing column is named as the data names it."""
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    row = {"instruction": "Add.", "output": "3", "question": "Sum.", "answer": "4"}
    (plain,), _ = _load(tmp_path, [row], "alpaca")
    (mapped,), stats = _load(tmp_path, [row], "alpaca", columns={"instruction": "question", "output": "answer"})
    (expected,), _ = _load(tmp_path, [{"instruction": "Sum.", "output": "4"}], "alpaca")
    assert "cached" not in stats and mapped.input_ids == expected.input_ids and mapped.labels == expected.labels
    assert plain.input_ids != mapped.input_ids
    from peftkit.errors import PeftkitError

    with pytest.raises(PeftkitError, match=re.escape("d.jsonl:1: missing column 'question' (data.columns.instruction) "
                                                     "for data.format 'alpaca' (each row needs question (as "
                                                     "instruction), output)")):
        _load(tmp_path, [{"instruction": "Add.", "output": "3"}], "alpaca", columns={"instruction": "question"})


@pytest.mark.parametrize(("fmt", "columns", "row", "message"), [
    ("completion", {"completion": "answer"}, {"prompt": "a", "answer": " "},
     "column 'answer' (data.columns.completion) is empty"),
    ("completion", {"completion": "answer"}, {"prompt": "a", "answer": 3},
     "column 'answer' (data.columns.completion) must be a string, got int"),
    ("chat", {"messages": "dialog"}, {"dialog": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
     "dialog[1].content is empty (an assistant turn)"),
    ("chat", {"messages": "dialog"}, {"dialog": "hi"}, "'dialog' must be a list of {role, content} objects"),
    ("chat", {"conversations": "turns"}, {"turns": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": ""}]},
     "turns[1].value is empty (an assistant turn)"),
])
def test_a_bad_mapped_column_is_named_as_the_data_names_it(tmp_path, fmt, columns, row, message):
    """A field data.columns reads from another column was named by the field's name, which the row does not hold
    ('field completion is empty' of a row whose 'answer' is)."""
    from peftkit.errors import PeftkitError

    with pytest.raises(PeftkitError, match=f"d.jsonl:1: {re.escape(message)}"):
        _load(tmp_path, [row], fmt, columns=columns)


def test_a_data_column_for_no_field_is_a_recipe_error(tmp_path, monkeypatch, capsys, tiny_llama, number_data):
    from tests.conftest import cli_user_error, make_recipe

    recipe = make_recipe(tmp_path, tiny_llama, number_data, data={"columns": {"instrution": "question"}})
    err = " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())
    assert ("data.columns: 'instrution' is not a field of data.format alpaca (instruction, output, input, task); "
            "each key names a field, its value the data's column. Did you mean 'instruction'?") in err
    assert f"{recipe}:" in err


def test_a_local_file_is_sliced_as_a_hub_split(tmp_path, monkeypatch):
    """train_split / eval_split slice a local file in the datasets library's syntax, so one file gives a training
    set and a held-out one (a local file's split was ignored: `validation` read every row, now with a warning). The slices are cached
    apart, and a bad row's line is its line in the file."""
    from peftkit.data import load_rows
    from peftkit.errors import PeftkitError

    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    rows = [{"prompt": f"{i}+{i}=", "completion": str(2 * i)} for i in range(8)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), format="completion")
    head, stats = load_examples(TOK, cfg.train, "train[:75%]", cfg)
    tail, again = load_examples(TOK, cfg.train, "train[75%:]", cfg)
    assert "cached" not in again and [_decode_labels(e) for e in tail] == ["12</s>", "14</s>"] and len(head) == 6
    assert load_rows(cfg.train, "train[-3:]+train[:1]")[0] == rows[-3:] + rows[:1]
    write_jsonl(tmp_path / "d.jsonl", [*rows[:7], {"prompt": "x"}])
    with pytest.raises(PeftkitError, match="d.jsonl:8: missing field 'completion'"):
        load_examples(TOK, cfg.train, "train[50%:]", cfg)
    with pytest.raises(PeftkitError, match=re.escape(f"Data file {cfg.train}: split 'validation[:5]': Unknown split "
                                                     "\"validation\". Should be one of ['train']. A local file is one "
                                                     "split, 'train', which may be sliced as a hub dataset's")):
        load_rows(cfg.train, "validation[:5]")
    from peftkit.errors import PeftkitWarning  # a name alone reads every row, as before slicing: older runs resume

    with pytest.warns(PeftkitWarning, match=re.escape(f"Data file {cfg.train}: split 'validation': a local file is "
                                                      "one split, 'train', so every row is read.")):
        assert len(load_rows(cfg.train, "validation")[0]) == 8


def test_each_slice_of_a_file_counts_its_own_skipped_lines(tmp_path):
    """data.on_bad_rows: skip with one file sliced apart (train[:50%], train[50%:]): each slice said the whole file's
    malformed lines as its own. A malformed line counts in the slice of the row after it (the last row's at the
    file's end), and a slice's rows are still named by their lines in the file."""
    from peftkit.data import describe_stats

    rows = [json.dumps({"prompt": f"{i}+{i}=", "completion": str(2 * i)}) for i in range(8)]
    rows[5] = json.dumps({"prompt": "5+5=", "completion": "10</s>\n"})  # (a special token's text: a warning naming it)
    rows[6] = json.dumps({"prompt": "x"})  # a row without the format's fields: its slice's, as ever
    lines = [rows[0], "{bad", *rows[1:5], "{bad", *rows[5:], "{bad"]  # malformed: lines 2, 7 and 11
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), format="completion", on_bad_rows="skip")
    head, head_stats = load_examples(TOK, cfg.train, "train[:50%]", cfg, cache=False)
    tail, tail_stats = load_examples(TOK, cfg.train, "train[50%:]", cfg, cache=False)
    assert (len(head), head_stats["bad_rows"], len(tail), tail_stats["bad_rows"]) == (4, 1, 3, 3)
    assert describe_stats(head_stats, cfg)[0] == "4 training examples; skipped 1 bad row (data.on_bad_rows: skip)"
    assert tail_stats["special_text_first"].startswith(f"{cfg.train}:8: field 'completion' ends with '</s>'")
    assert load_examples(TOK, cfg.train, "train", cfg, cache=False)[1]["bad_rows"] == 4  # the whole file's


@pytest.mark.parametrize(("row", "message"), [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
     "messages[1].content is empty (an assistant turn)"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": " "}]},
     "conversations[1].value is empty (an assistant turn)"),
    ({"system": "s", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]},
     "conversations[0].value must be a string, got int"),
])
def test_a_bad_row_is_named_in_its_own_words_beside_data_system_prompt(tmp_path, row, message):
    """The message data.system_prompt puts in front of a conversation is not the row's: a bad messages[1] was said
    to be messages[2]."""
    from peftkit.errors import PeftkitError

    with pytest.raises(PeftkitError, match=f"d.jsonl:1: {re.escape(message)}"):
        _load(tmp_path, [row], "chat", system_prompt="Be brief.")


def test_a_template_refusing_data_system_prompt_names_it(tmp_path):
    """A template without a system role (Gemma's) refuses the conversations data.system_prompt opens: the error told
    the user to fix a conversation that holds no system message; it now names data.system_prompt."""
    from peftkit.data.prompts import load_prompts
    from peftkit.errors import PeftkitError

    tok = build_char_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                         "supported') }}{% endif %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                     {"role": "assistant", "content": "yo"}]}])
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), format="chat", system_prompt="Be brief.")
    fix = ("d.jsonl:1: the chat template refuses this conversation (System role not supported): its system message is "
           "data.system_prompt, which this model's template takes no system message for; remove data.system_prompt")
    with pytest.raises(PeftkitError, match=re.escape(fix)):
        load_examples(tok, cfg.train, "train", cfg, cache=False)
    with pytest.raises(PeftkitError, match=re.escape(fix)):
        load_prompts(tok, cfg.train, "train", cfg)


def test_an_empty_slice_of_a_local_file_is_said_as_such(tmp_path):
    """train[95%:] of a 10-row file is no row (the datasets library refuses such a slice of a hub split): the error
    said the file 'has no rows'."""
    from peftkit.errors import PeftkitError

    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}] * 10)
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), format="completion")
    with pytest.raises(PeftkitError, match=re.escape("d.jsonl: split 'train[95%:]' is none of its 10 rows; take a "
                                                     "larger slice")):
        load_examples(TOK, cfg.train, "train[95%:]", cfg, cache=False)


def test_a_bad_row_of_a_sliced_file_without_lines_is_named_by_its_row_in_the_file(tmp_path):
    """A .json/.csv/.parquet file's rows are named `FILE row N`; in a slice, N was the row's place in the slice (row 2
    of train[80%:] for the file's row 10)."""
    import json

    from peftkit.errors import PeftkitError

    rows = [{"prompt": f"{i}+", "completion": str(i)} for i in range(9)] + [{"prompt": "9+", "completion": ""}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    cfg = DataConfig(train=str(tmp_path / "d.json"), format="completion")
    with pytest.raises(PeftkitError, match=re.escape("d.json row 10: field 'completion' is empty")):
        load_examples(TOK, cfg.train, "train[80%:]", cfg, cache=False)


def test_eval_s_on_bad_rows_flag_is_named_in_the_errors_its_value_causes(tmp_path, tiny_llama, number_data,
                                                                          monkeypatch, capsys):
    """`peftkit eval --on-bad-rows skip` of rows all bad told the user to `set data.on_bad_rows: error`, a recipe key
    the flag overrides (and there may be no recipe); every such error now names the flag, as `--on-bad-rows error`'s
    bad row names `--on-bad-rows skip`. The recipe's own key is still named where the flag is not given (with the
    flag beside it); without a recipe, the flags are named (not data.format or data.on_bad_rows, keys of no recipe)."""
    from tests.conftest import cli_user_error, make_recipe

    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [{"question": "1+1", "answer": "2"}] * 3)
    recipe = make_recipe(tmp_path, tiny_llama, number_data, data={"on_bad_rows": "skip"})

    def err(*args: str) -> str:
        return " ".join(cli_user_error(monkeypatch, capsys, "eval", *args, "--data", str(bad)).split())

    for source in (["--model", str(tiny_llama)], [str(recipe)]):
        key = "--format" if source[0] == "--model" else "data.format"  # without a recipe, the flag sets it
        said = err(*source, "--on-bad-rows", "skip")
        assert (f"all 3 rows were skipped as malformed or missing the fields of {key} 'alpaca' (instruction, "
                f"output); check {key}, or pass --on-bad-rows error to see the first bad row.") in said, said
        said = err(*source, "--on-bad-rows", "skip", "--metrics", "exact_match")
        assert (f"No usable rows in {bad} to take prompts from: all 3 rows were skipped as malformed or missing the "
                f"fields of {key} 'alpaca' (instruction, output); check {key}, or pass --on-bad-rows "
                "error to see the first bad row.") in said, said
        said = err(*source, "--on-bad-rows", "error")
        assert ("Fix the row, pass the right --format, or pass --on-bad-rows skip." if source[0] == "--model" else
                "Fix the row, set the right data.format (or pass --format), or pass --on-bad-rows skip.") in said, said
        said = err(*source, "--on-bad-rows", "skip", "--format", "classification")
        assert (f"{bad} has no usable rows for --format 'classification' (3 rows, 0 unreadable lines); each row needs "
                "text and label; or pass --on-bad-rows error to see the first bad row.") in said, said
    bad.write_text("{oops\n")  # a malformed line, without a recipe: the flag is the way
    said = err("--model", str(tiny_llama))
    assert said.endswith("Fix the line, or pass --on-bad-rows skip to drop such rows."), said
    write_jsonl(bad, [{"question": "1+1", "answer": "2"}] * 3)
    said = err(str(recipe))  # the recipe's data.on_bad_rows: skip, no flag
    assert ("check data.format, or set data.on_bad_rows: error (or pass --on-bad-rows error) to see the first bad "
            "row.") in said, said


def test_data_system_prompt_opens_conversations_without_one(tmp_path, monkeypatch):
    """data.system_prompt is the system message of a conversation that has none (a ShareGPT row's too), in training
    and in eval's prompts; a conversation's own stays. The cache keys on it."""
    from peftkit.data.prompts import load_prompts

    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    own = [{"role": "system", "content": "Mine."}, *turns]
    rows = [{"messages": turns}, {"messages": own},
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]
    (bare, kept, shared), _ = _load(tmp_path, rows, "chat")
    (given, kept_too, shared_given), stats = _load(tmp_path, rows, "chat", system_prompt="Be brief.")
    (expected,), _ = _load(tmp_path, [{"messages": [{"role": "system", "content": "Be brief."}, *turns]}], "chat")
    assert "cached" not in stats and given.input_ids == shared_given.input_ids == expected.input_ids != bare.input_ids
    assert kept_too.input_ids == kept.input_ids and given.labels == expected.labels
    write_jsonl(tmp_path / "d.jsonl", rows[:1])
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), format="chat", system_prompt="Be brief.")
    [prompt] = load_prompts(TOK, cfg.train, "train", cfg)
    assert prompt.text.startswith(TOK.apply_chat_template([{"role": "system", "content": "Be brief."}],
                                                          tokenize=False))
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="data.system_prompt is the system message of chat conversations, and "
                                              "data.format is alpaca"):
        DataConfig(train="x", system_prompt="Be brief.")


# Qwen2.5's way with tools, cut short: the tool schemas in a system block, tool calls as JSON in the assistant turn
# (content null beside them), tool results in a user turn; `{% generation %}` marks what transformers' assistant mask
# takes as the assistant's.
TOOLS_STYLE = (
    "{%- if tools %}<|system|>\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools></s>\n{% endif %}"
    "{%- for m in messages %}{%- if m.role == 'assistant' %}<|assistant|>\n{% generation %}"
    "{%- if m.content %}{{ m.content }}{% endif %}{% for c in m.tool_calls or [] %}"
    "<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}</s>{% endgeneration %}\n"
    "{%- elif m.role == 'tool' %}<|user|>\n<tool_response>{{ m.content }}</tool_response></s>\n"
    "{%- else %}<|{{ m.role }}|>\n{{ m.content }}</s>\n{% endif %}{%- endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
CALL = {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}


def test_tool_calls_are_trained_as_the_template_writes_them(tmp_path):
    """An assistant turn of tool calls with null content (OpenAI's form) was refused as empty; the row's `tools`
    never reached the template. Now both do: the trained tokens are transformers' assistant mask, the tool schemas,
    call results and user turns untrained, and eval's reference for a last turn of calls is their text."""
    import copy

    from peftkit.data.prompts import load_prompts

    tok = copy.deepcopy(TOK)
    tok.chat_template = TOOLS_STYLE
    messages = [{"role": "user", "content": "1+2?"}, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "content": "3"}, {"role": "assistant", "content": "It is 3."}]
    write_jsonl(tmp_path / "d.jsonl", [{"messages": messages, "tools": TOOLS}])
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), format="chat")
    (ex,), _ = load_examples(tok, cfg.train, "train", cfg)
    reference = tok.apply_chat_template(messages, tools=TOOLS, return_dict=True, return_assistant_tokens_mask=True)
    assert ex.input_ids == reference["input_ids"] and '<tools>{"type": "function"' in tok.decode(ex.input_ids)
    assert [label != IGNORE_INDEX for label in ex.labels] == [bool(m) for m in reference["assistant_masks"]]
    call = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    assert tok.decode([t for t in ex.labels if t != IGNORE_INDEX], skip_special_tokens=False) == \
        f"{call}</s>It is 3.</s>"
    write_jsonl(tmp_path / "d.jsonl", [{"messages": messages, "tools": json.dumps(TOOLS)}])  # glaive's JSON text
    (as_text,), _ = load_examples(tok, cfg.train, "train", cfg)
    assert as_text.input_ids == ex.input_ids and as_text.labels == ex.labels
    write_jsonl(tmp_path / "d.jsonl", [{"messages": messages[:2], "tools": TOOLS}])
    [prompt] = load_prompts(tok, cfg.train, "train", cfg)
    assert prompt.reference == call and prompt.text == tok.apply_chat_template(
        messages[:1], tools=TOOLS, tokenize=False, add_generation_prompt=True)


def test_sharegpt_function_calls_are_tool_calls(tmp_path):
    """LLaMA-Factory's ShareGPT rows call tools in `function_call` turns (JSON text of {name, arguments}, or a list of
    such calls), the results in `observation` turns and the schemas in `tools` as JSON text; the rows were refused
    ('function_call' was no ShareGPT speaker). Their text, trained tokens and eval prompt are now those of the same
    conversation as `messages` with `tool_calls`; a `tool` speaker is an observation."""
    import copy

    from peftkit.data.prompts import load_prompts

    tok = copy.deepcopy(TOK)
    tok.chat_template = TOOLS_STYLE
    other = {"type": "function", "function": {"name": "mul", "arguments": {"a": 3, "b": 3}}}
    messages = [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "1+2?"},
                {"role": "assistant", "content": None, "tool_calls": [CALL]}, {"role": "tool", "content": "3"},
                {"role": "assistant", "content": None, "tool_calls": [other, CALL]},
                {"role": "tool", "content": "9"}, {"role": "tool", "content": "3"}, {"role": "assistant", "content": "9, 3."}]
    turns = [{"from": "human", "value": "1+2?"}, {"from": "function_call", "value": json.dumps(CALL["function"])},
             {"from": "observation", "value": "3"},
             {"from": "function_call", "value": json.dumps([other["function"], CALL["function"]])},
             {"from": "tool", "value": "9"}, {"from": "observation", "value": "3"}, {"from": "gpt", "value": "9, 3."}]
    sharegpt = {"system": "Use tools.", "conversations": turns, "tools": json.dumps(TOOLS)}
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), format="chat", max_length=2048)
    examples = []
    for row in ({"messages": messages, "tools": TOOLS}, sharegpt):
        write_jsonl(tmp_path / "d.jsonl", [row])
        examples.append(load_examples(tok, cfg.train, "train", cfg, cache=False)[0][0])
    expected, ex = examples
    assert ex.input_ids == expected.input_ids and ex.labels == expected.labels
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(messages, tools=TOOLS, tokenize=False)
    assert '<tool_call>{"name": "mul", "arguments": {"a": 3, "b": 3}}</tool_call><tool_call>{"name": "add"' in \
        tok.decode([t for t in ex.labels if t != IGNORE_INDEX], skip_special_tokens=False)
    write_jsonl(tmp_path / "d.jsonl", [sharegpt | {"conversations": turns[:2]}])  # eval's prompt and reference
    [prompt] = load_prompts(tok, cfg.train, "train", cfg)
    write_jsonl(tmp_path / "d.jsonl", [{"messages": messages[:3], "tools": TOOLS}])
    [expected] = load_prompts(tok, cfg.train, "train", cfg)
    assert (prompt.text, prompt.reference) == (expected.text, expected.reference) and "<tool_call>" in prompt.reference


def test_sharegpt_call_arguments_as_json_text_are_read_as_the_object(tmp_path):
    """A function_call whose `arguments` is JSON text of an object (OpenAI's form: "{\\"city\\": \\"Paris\\"}") was
    refused; it is now read as that object, so the template writes the same tokens as for `arguments` given as one
    (a string would be written quoted, its inner quotes escaped)."""
    import copy

    tok = copy.deepcopy(TOK)
    tok.chat_template = TOOLS_STYLE
    weather = {"name": "weather", "arguments": {"city": "Paris", "days": [1, 2]}}
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), format="chat", max_length=2048)
    examples = []
    as_text = weather | {"arguments": json.dumps(weather["arguments"])}  # '{"city": "Paris", "days": [1, 2]}'
    for calls in ([CALL["function"], weather], [CALL["function"], as_text]):
        write_jsonl(tmp_path / "d.jsonl", [{"tools": json.dumps(TOOLS), "conversations": [
            {"from": "human", "value": "Weather?"}, {"from": "function_call", "value": json.dumps(calls)},
            {"from": "observation", "value": "sun"}, {"from": "gpt", "value": "Sunny."}]}])
        examples.append(load_examples(tok, cfg.train, "train", cfg, cache=False)[0][0])
    mapping, text = examples
    assert text.input_ids == mapping.input_ids and text.labels == mapping.labels
    assert '{"name": "weather", "arguments": {"city": "Paris", "days": [1, 2]}}' in tok.decode(text.input_ids)


def test_tool_call_arguments_as_json_text_are_read_as_the_object(tmp_path):
    """A `messages` row's tool call whose `function.arguments` is JSON text of an object (what OpenAI's API returns,
    and datasets exported from it hold) reached the template as a string, which it wrote quoted, inner quotes
    escaped ("{\\"city\\": ...}"): the model trained on that text. It is now read as the object, as a ShareGPT
    function_call's is, so the row trains the tokens of the same row with `arguments` as a mapping, and eval's
    reference is the same."""
    import copy

    from peftkit.data.prompts import load_prompts

    tok = copy.deepcopy(TOK)
    tok.chat_template = TOOLS_STYLE
    weather = {"id": "call_1", "type": "function",
               "function": {"name": "weather", "arguments": {"city": "Paris", "days": [1, 2]}}}
    as_text = weather | {"function": weather["function"] | {"arguments": json.dumps(weather["function"]["arguments"])}}
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), format="chat", max_length=2048)
    examples, prompts = [], []
    for calls in ([CALL, weather], [CALL, as_text]):
        messages = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": calls},
                    {"role": "tool", "content": "sun"}, {"role": "assistant", "content": "Sunny."}]
        write_jsonl(tmp_path / "d.jsonl", [{"messages": messages, "tools": TOOLS}])
        examples.append(load_examples(tok, cfg.train, "train", cfg, cache=False)[0][0])
        write_jsonl(tmp_path / "d.jsonl", [{"messages": messages[:2], "tools": TOOLS}])
        prompts.append(load_prompts(tok, cfg.train, "train", cfg)[0].reference)
    (mapping, text), (reference, text_reference) = examples, prompts
    assert text.input_ids == mapping.input_ids and text.labels == mapping.labels and text_reference == reference
    assert '{"name": "weather", "arguments": {"city": "Paris", "days": [1, 2]}}' in \
        tok.decode([t for t in text.labels if t != IGNORE_INDEX], skip_special_tokens=False)


def test_a_template_that_writes_arguments_as_text_is_given_their_json_text(tmp_path):
    """A template that writes a call's arguments as text (DeepSeek V3's `'```json\\n' + arguments`) trained a
    `messages` row whose arguments were JSON text; once such text was read as its object, the template got a mapping
    and failed (str + dict: a TypeError traceback). Such a template is now given the arguments' JSON text, for
    arguments given as text or as a mapping alike."""
    import copy

    tok = copy.deepcopy(TOK)
    tok.chat_template = TOOLS_STYLE.replace(
        "{{ c.function | tojson }}", "{{ c.function.name + '\\n```json\\n' + c.function.arguments + '\\n```' }}")
    weather = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris", "days": [1, 2]}}}
    as_text = weather | {"function": weather["function"] | {"arguments": json.dumps(weather["function"]["arguments"])}}
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), format="chat", max_length=2048)
    examples = []
    for call in (as_text, weather):
        write_jsonl(tmp_path / "d.jsonl", [{"messages": [
            {"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "sun"}, {"role": "assistant", "content": "Sunny."}]}])
        examples.append(load_examples(tok, cfg.train, "train", cfg, cache=False)[0][0])
    text, mapping = examples
    assert text.input_ids == mapping.input_ids and text.labels == mapping.labels
    assert '<tool_call>weather\n```json\n{"city": "Paris", "days": [1, 2]}\n```</tool_call>' in \
        tok.decode([t for t in text.labels if t != IGNORE_INDEX], skip_special_tokens=False)


def test_a_tool_call_without_its_function_wrapper_is_wrapped(tmp_path):
    """A tool call written as {"name": ..., "arguments": ...} (some datasets', and Qwen 2.5's template takes it) went
    to the template as it was: one that reads `tool_call.function`, as transformers' docs write a call (Llama 3.1's),
    wrote nothing for it, and the turn trained on no call. It is wrapped as {"type": "function", "function": {...}},
    its other keys kept: the tokens are those of the wrapped row, `arguments` as JSON text too."""
    import copy

    tok = copy.deepcopy(TOK)
    tok.chat_template = TOOLS_STYLE
    bare = {"id": "call_1", "name": "add", "arguments": json.dumps({"a": 1, "b": 2})}
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), format="chat", max_length=2048)
    examples = []
    for call in (CALL | {"id": "call_1"}, bare):
        messages = [{"role": "user", "content": "1+2?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "content": "3"}, {"role": "assistant", "content": "3."}]
        write_jsonl(tmp_path / "d.jsonl", [{"messages": messages, "tools": TOOLS}])
        examples.append(load_examples(tok, cfg.train, "train", cfg, cache=False)[0][0])
    wrapped, ex = examples
    assert ex.input_ids == wrapped.input_ids and ex.labels == wrapped.labels
    assert '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>' in \
        tok.decode([t for t in ex.labels if t != IGNORE_INDEX], skip_special_tokens=False)


def test_an_empty_tool_calls_list_is_no_calls(tmp_path):
    """OpenAI's chat logs, and datasets exported from them, write `"tool_calls": []` in turns without calls (a user's
    too); such rows, which trained before tool calls were read, were refused as bad rows (an old run's data too)."""
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    (ex,), _ = _load(tmp_path, [{"messages": [{**m, "tool_calls": []} for m in plain]}], "chat")
    (expected,), _ = _load(tmp_path, [{"messages": plain}], "chat")
    assert ex.input_ids == expected.input_ids and ex.labels == expected.labels


def test_an_empty_tools_list_is_no_tools(tmp_path):
    """Llama 3.1's template writes its tool-calling instructions whenever `tools is not none`: a row's `"tools": []`
    (mixed datasets write it in rows without tools) got them, with no tool to call. An empty list is no tools."""
    tok = build_char_tokenizer()
    tok.chat_template = ("{% if tools is not none %}<|system|>\nCall a tool.</s>\n{% endif %}{% for m in messages %}"
                         "<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}")
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), format="chat")
    write_jsonl(tmp_path / "d.jsonl", [{"messages": plain, "tools": []}])
    (ex,), _ = load_examples(tok, cfg.train, "train", cfg, cache=False)
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(plain, tokenize=False)


def test_an_empty_tool_calls_list_reaches_no_template(tmp_path):
    """Llama 3.1's template takes a message holding the key `tool_calls` for a turn of calls, and refuses one that
    is not a single call: `"tool_calls": []` in a plain turn was refused ('only supports single tool-calls'). An empty
    list is left out of what the template sees, as transformers leaves a null one out."""
    tok = build_char_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if 'tool_calls' in m %}{% if not m.tool_calls|length == 1 %}"
                         "{{ raise_exception('This model only supports single tool-calls at once!') }}{% endif %}"
                         "<|call|>{{ m.tool_calls[0].function.name }}</s>\n{% else %}<|{{ m['role'] }}|>\n"
                         "{{ m['content'] }}</s>\n{% endif %}{% endfor %}")
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), format="chat")
    write_jsonl(tmp_path / "d.jsonl", [{"messages": [{**m, "tool_calls": []} for m in plain]}])
    (ex,), _ = load_examples(tok, cfg.train, "train", cfg, cache=False)
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(plain, tokenize=False)


@pytest.mark.parametrize(("row", "message"), [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]},
     "messages[1].content must be a string, got null"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": []}]},
     "messages[1].content must be a string, got null"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": {}}]},
     "messages[1].tool_calls must be a nonempty list of objects, in an assistant message (or null)"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [CALL]}, {"role": "assistant", "content": "x"}]},
     "messages[0].tool_calls must be a nonempty list of objects, in an assistant message (or null)"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        CALL, {"type": "function", "function": {"name": "add", "arguments": "a=1"}}]}]},
     "messages[1].tool_calls[1].function.arguments is a string that is not JSON text of an object; give an object of "
     "the arguments by name ({} for none), or JSON text of one"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": "[1, 2]"}}]}]},
     "messages[1].tool_calls[0].function.arguments is a string that is not JSON text of an object"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        CALL, {"type": "function", "function": {"name": "add", "arguments": [1, 2]}}]}]},
     "messages[1].tool_calls[1].function.arguments is a list, not an object; give an object of the arguments by name "
     "({} for none), or JSON text of one"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": 3}}]}]},
     "messages[1].tool_calls[0].function.arguments is a number, not an object"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "add"}}]}]},
     "messages[1].tool_calls[0].function.arguments is missing; give an object of the arguments by name ({} for none)"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}, {"role": "assistant",
      "content": None, "tool_calls": [{"type": "function", "function": {"arguments": {}}}]}]},
     "messages[2].tool_calls[0].function.name is missing; give the tool's name (a nonempty string)"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": " ", "arguments": {}}}]}]},
     "messages[1].tool_calls[0].function.name is empty; give the tool's name (a nonempty string)"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": "add"}]}]},
     'messages[1].tool_calls[0].function is a string, not an object; a tool call is {"type": "function", "function": '
     '{"name": ..., "arguments": {...}}}, or {"name": ..., "arguments": {...}}'),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "id": "call_1"}]}]},
     "messages[1].tool_calls[0] has no 'function' (nor 'name'); a tool call is"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"name": None, "arguments": {}}]}]},
     "messages[1].tool_calls[0].name is null; give the tool's name"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"name": "add", "arguments": "[1, 2]"}]}]},
     "messages[1].tool_calls[0].arguments is a string that is not JSON text of an object"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}], "tools": "add"},
     "field 'tools' must be a list of objects, or JSON text of one (the tools' JSON schemas, as the chat template "
     "takes them)"),
])
def test_bad_tool_fields_are_named(tmp_path, row, message):
    from peftkit.errors import PeftkitError

    with pytest.raises(PeftkitError, match=f"d.jsonl:1: {re.escape(message)}"):
        _load(tmp_path, [row], "chat")


# Llama 3.1's way of writing today's date into every conversation (its template, cut to the date header).
DATED_STYLE = ('{%- if not date_string is defined %}{%- if strftime_now is defined %}'
               '{%- set date_string = strftime_now("%d %b %Y") %}{%- else %}{%- set date_string = "x" %}{%- endif %}'
               "{%- endif %}<|system|>\nToday Date: {{ date_string }} {{ strftime_now('%Y-%m-%d') }}</s>\n"
               "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
               "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _on_day(monkeypatch, day: int):
    """transformers' `strftime_now` reads the clock of `datetime` in its module: make today 2026-12-`day`."""
    import datetime

    import transformers.utils.chat_template_utils as chat_utils

    class Clock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime(2026, 12, day, 23, 59)

    monkeypatch.setattr(chat_utils, "datetime", Clock)


def test_a_template_that_writes_todays_date_tokenizes_the_same_on_every_day(tmp_path, monkeypatch):
    # Rendered as transformers renders it, the date was the day's: verify on another day, a --resume past midnight
    # or the tokenized-data cache saw other tokens for the same data.
    from peftkit.data.prompts import chat_prompt

    monkeypatch.setenv("PEFTKIT_CACHE", "off")
    tok = build_char_tokenizer()
    tok.chat_template = DATED_STYLE
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), format="chat")
    seen = []
    for day in (3, 4):
        _on_day(monkeypatch, day)
        assert f"{day:02d} Dec 2026" in tok.apply_chat_template(messages, tokenize=False)  # the clock did move
        (ex,), _ = load_examples(tok, cfg.train, "train", cfg)
        seen.append((ex.input_ids, ex.labels, chat_prompt(tok, messages[:1]).ids))
    assert seen[0] == seen[1]
    ids, labels, prompt = seen[0]
    assert tok.decode(ids).startswith("<|system|>\nToday Date: 26 Jul 2024 2024-07-26</s>\n<|user|>\nhi")
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == "yo</s>"
    assert tok.decode(prompt) == tok.decode(ids[:len(prompt)])  # generation's prompt: training's, date and all


def test_a_template_reading_the_clock_some_other_way_is_said(tmp_path, monkeypatch):
    from peftkit.data.template import render
    from peftkit.errors import PeftkitWarning

    tok = build_char_tokenizer()
    tok.chat_template = "{% set f = '%Y' %}{{ strftime_now(f) }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.warns(PeftkitWarning, match="reads today's date in a way peftkit cannot fix to one day"):
        assert render(tok, [{"role": "user", "content": "hi"}]).endswith("hi")


def test_reading_a_csv_prints_no_progress_bar_of_the_datasets_library(tmp_path, capfd):
    """`peftkit preview` (and train, eval) of a .csv printed datasets' `Generating train split: 2 examples [00:00, ...]`
    bar among its own lines, in a log too: peftkit's own bars say what it reads. The bar is off for that read only."""
    import datasets

    from peftkit.data.rows import load_rows

    datasets.enable_progress_bars()
    (tmp_path / "d.csv").write_text("instruction,input,output\nWrite it.,12,twelve\nWrite it.,4,four\n")
    rows = load_rows(str(tmp_path / "d.csv"), "train")[0]
    assert [r["output"] for r in rows] == ["twelve", "four"]
    assert "Generating" not in capfd.readouterr().err
    assert not datasets.utils.are_progress_bars_disabled()  # the user's own setting is left as it was


def test_a_row_missing_a_field_its_data_names_otherwise_is_told_of_data_columns(tmp_path):
    """A file of `question`/`answer` rows read as alpaca said `missing field 'instruction'` and offered data.format
    and on_bad_rows, neither of which reads it; data.columns does, and the error now says so where the row has
    columns the format does not read: for every field the row lacks (instruction and output, one edit, where the
    hint named the instruction alone and the next run stopped at the output)."""
    from peftkit.errors import PeftkitError

    path = tmp_path / "qa.jsonl"
    write_jsonl(path, [{"question": "Write 5 in words.", "answer": "five"}])
    with pytest.raises(PeftkitError) as err:
        load_examples(TOK, str(path), "train", DataConfig(train="x"))
    said = " ".join(str(err.value).split())
    assert said.startswith(f"{path}:1: missing field 'instruction' for data.format 'alpaca'"), said
    assert said.endswith("If its columns (question, answer) hold the instruction and output, a recipe's data.columns "
                         "reads them: {instruction: COLUMN, output: COLUMN}."), said
    mapped = DataConfig(train="x", columns={"instruction": "question"})  # mapped: the missing field is output
    with pytest.raises(PeftkitError) as err:
        load_examples(TOK, str(path), "train", mapped)
    said = " ".join(str(err.value).split())
    assert said.endswith("If one of its columns (answer) is the output, a recipe's data.columns reads it: "
                         "{output: COLUMN}."), said
    write_jsonl(path, [{"instruction": "Write 5 in words.", "input": "5"}])  # no other column to read it from
    with pytest.raises(PeftkitError) as err:
        load_examples(TOK, str(path), "train", DataConfig(train="x"))
    assert "missing field 'output'" in str(err.value) and "data.columns" not in str(err.value), str(err.value)
    write_jsonl(path, [{"messages": [{"role": "user", "content": "5?"}]}])  # another format's field: data.format's
    with pytest.raises(PeftkitError) as err:
        load_examples(TOK, str(path), "train", DataConfig(train="x"))
    assert "data.columns" not in str(err.value), str(err.value)
    write_jsonl(path, [{"instruction": "Write 5 in words.", "output": 5}])  # present, of the wrong type: no hint
    with pytest.raises(PeftkitError) as err:
        load_examples(TOK, str(path), "train", DataConfig(train="x"))
    assert "data.columns" not in str(err.value), str(err.value)
