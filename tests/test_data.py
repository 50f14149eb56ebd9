"""Tokenization and loss masks for each data format, checked token by token."""

import subprocess
import sys

import torch

from peftkit.data import IGNORE_INDEX, Collator, Example, epoch_batches, load_examples, micro_batches
from peftkit.recipe import DataConfig
from peftkit.tiny import build_char_tokenizer, write_jsonl

TOK = build_char_tokenizer()


def _decode_labels(example):
    return TOK.decode([t for t in example.labels if t != IGNORE_INDEX])


def _load(tmp_path, rows, fmt, max_length=256):
    write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), format=fmt, max_length=max_length)
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
    assert _decode_labels(ex) == "yo</s>\nciao</s>\n"


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
    full = micro_batches(examples, 3, seed=0, shuffle=True, pad_id=0)
    stream = [next(full)["input_ids"] for _ in range(9)]  # 4 batches per epoch: crosses two epochs
    resumed = micro_batches(examples, 3, seed=0, shuffle=True, pad_id=0, start=5)
    for expected in stream[5:]:
        assert torch.equal(next(resumed)["input_ids"], expected)


def _worker_handlers(batch) -> tuple:
    """A collate function, which runs in the DataLoader worker: that worker's SIGINT and SIGTERM handlers."""
    import signal

    return signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)


def test_data_workers_leave_stop_signals_to_the_main_process():
    """SIGINT/SIGTERM sent to the whole process group (Ctrl-C, Slurm, systemd) must not kill a worker: the main
    process checkpoints and stops. A worker that kept the default SIGTERM died, and the run crashed with a traceback."""
    import signal

    examples = [Example([1, 2, 3], [1, 2, 3]) for _ in range(4)]
    stream = micro_batches(examples, 2, seed=0, shuffle=False, pad_id=0, num_workers=1, collate=_worker_handlers)
    assert next(stream) == (signal.SIG_IGN, signal.SIG_IGN)


def test_a_jsonl_file_is_read_without_importing_datasets(tmp_path):
    """`datasets` takes 0.7 s of a process's start; a .jsonl file (the quickstart's, most recipes') does not need it."""
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n')
    code = (f"import sys; from peftkit.data.rows import load_rows; print(load_rows({str(path)!r}, 'train')[0], "
            "'datasets' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[{'a': 1}] False", done.stdout + done.stderr
