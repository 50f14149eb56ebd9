"""Datasets → token ids with loss masks → padded batches in a seeded, resumable order.

Formats (the fields each row must have):
- `alpaca`: instruction, output, optional input. Loss on the response only.
- `chat`: messages = [{role, content}, ...], rendered with the tokenizer's chat template. Loss on the
  assistant turns only (their content and the template's end-of-turn marker).
- `completion`: prompt, completion. Loss on the completion only.
- `text`: text. Loss on every token.
EOS is appended to alpaca/completion/text examples so the model learns to stop. Examples are truncated
to `max_length`; one with no target token left after truncation is dropped, with a count.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from peftkit.errors import PeftkitError
from peftkit.recipe import DATA_EXTENSIONS, DataConfig

IGNORE_INDEX = -100  # label value that cross-entropy skips
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
# What `datasets` says when a readable file yields no rows (its ValueError has no type of its own).
_NO_ROWS = "corresponds to no data"
REQUIRED_FIELDS = {"alpaca": ("instruction", "output"), "chat": ("messages",), "completion": ("prompt", "completion"), "text": ("text",)}
OPTIONAL_FIELDS = {"alpaca": ("input",)}  # may be absent or null; a string when given


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def _read_jsonl(path: Path, on_bad_rows: str) -> tuple[list[dict], int, list[int]]:
    """(rows, malformed lines skipped, the line number of each row): blank and skipped lines make row
    numbers and line numbers differ, and messages about a row must name its line."""
    rows, bad, line_numbers = [], 0, []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = _json_object(line)
            except ValueError as e:
                if on_bad_rows == "skip":
                    bad += 1
                    continue
                raise PeftkitError(
                    f"{path}:{lineno}: not a valid JSON object ({e}). Fix the line, or set data.on_bad_rows: skip "
                    "to drop such rows."
                ) from None
            rows.append(row)
            line_numbers.append(lineno)
    return rows, bad, line_numbers


def _json_object(line: str) -> dict:
    try:
        row = json.loads(line)
    except RecursionError:  # the json module recurses per bracket: `[[[[...` 100,000 deep is not a row
        raise ValueError("nested too deeply") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")  # noqa: TRY004 - one kind: a bad line
    return row


def _is_blank(path: Path) -> bool:
    """Whether the file holds only whitespace; reads up to the first other byte, so a real file costs one chunk."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def load_rows(source: str, split: str, on_bad_rows: str = "error") -> tuple[list[dict], int, list[int] | None]:
    """Rows of a local file or hub dataset; returns (rows, bad_rows_skipped, line number of each row or None).

    A .jsonl file is parsed here line by line so a malformed line is reported by number; other formats go
    through `datasets.load_dataset`.
    """
    import datasets

    path = Path(source)
    is_file = path.is_absolute() or path.suffix.lower() in DATA_EXTENSIONS
    if is_file:
        if not path.exists():
            raise PeftkitError(f"Data file not found: {source}. Check data.train/data.eval (relative paths are "
                               "resolved against the recipe's directory).")
        if path.is_dir():
            raise PeftkitError(f"Data path {source} is a directory; point it at a .jsonl/.json/.csv/.parquet file.")
        kind = DATA_EXTENSIONS.get(path.suffix.lower())
        if kind is None:
            raise PeftkitError(f"Data file {source}: unknown extension '{path.suffix}'. Use one of "
                               f"{', '.join(DATA_EXTENSIONS)}.")
        try:
            if path.suffix.lower() == ".jsonl":
                return _read_jsonl(path, on_bad_rows)
            if _is_blank(path):  # `datasets` fails on these with StopIteration or a message about its own internals
                return [], 0, None
            ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        except PermissionError:
            raise PeftkitError(f"Data file {source} is not readable (permission denied).") from None
        except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as e:
            if _NO_ROWS in str(e):  # `[]`, `{}`, a CSV with only its header: no rows, said the way .jsonl says it
                return [], 0, None
            # DatasetGenerationError's own text is "An error occurred while generating the dataset"; the cause says what.
            raise PeftkitError(f"Could not read data file {source}: {e.__cause__ or e}") from None
        return list(ds), 0, None
    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # noqa: BLE001 - the hub client raises many types; all mean "could not get it"
        raise PeftkitError(
            f"Could not load dataset '{source}' (split '{split}') from the hub: {e}. For a local file, give a path "
            "with its extension (.jsonl, .json, .csv, .parquet)."
        ) from None
    return list(ds), 0, None


# A lone UTF-16 surrogate (JSON "\\ud800") is not valid Unicode: no tokenizer can encode it, and the fast
# (Rust) ones fail with a TypeError that names neither the row nor the text.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _row_problem(row: dict, fmt: str) -> str | None:
    """What makes a row unusable for `fmt`, or None."""
    for field in REQUIRED_FIELDS[fmt]:
        if field not in row or row[field] is None:
            return f"missing field '{field}'"
    if fmt == "chat":
        return _messages_problem(row["messages"])
    present = [f for f in (*REQUIRED_FIELDS[fmt], *OPTIONAL_FIELDS.get(fmt, ())) if row.get(f) is not None]
    return next((p for f in present if (p := _text_problem(f"field '{f}'", row[f]))), None)


def _messages_problem(messages: object) -> str | None:
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in messages):
        return "'messages' must be a list of {role, content} objects"
    for i, m in enumerate(messages):
        for key in ("role", "content"):
            if problem := _text_problem(f"messages[{i}].{key}", m[key]):
                return problem
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message to learn from"
    return None


def _text_problem(name: str, value: object) -> str | None:
    if not isinstance(value, str):
        return f"{name} must be a string, got {'null' if value is None else type(value).__name__}"
    if bad := _SURROGATE.search(value):
        return (f"{name} holds a lone surrogate \\u{ord(bad.group()):04x} at character {bad.start()}, which is not "
                "valid Unicode and cannot be tokenized")
    return None


def _prompt_and_target(tok, row: dict, fmt: str) -> tuple[list[int], list[int]]:
    """Token ids of the part without loss (prompt) and the part with loss (target, EOS appended)."""
    if fmt == "alpaca":
        template = ALPACA_PROMPT_WITH_INPUT if row.get("input") else ALPACA_PROMPT
        prompt, target = template.format(**row), row["output"]
    elif fmt == "completion":
        prompt, target = row["prompt"], row["completion"]
    else:  # text
        prompt, target = "", row["text"]
    prompt_ids = tok(prompt, add_special_tokens=True)["input_ids"] if prompt else []
    if not prompt and tok.bos_token_id is not None:
        bos = tok("", add_special_tokens=True)["input_ids"]  # [] for tokenizers that add no BOS
        prompt_ids = bos
    target_ids = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return prompt_ids, target_ids


def _chat_example(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    if not getattr(tok, "chat_template", None):
        raise PeftkitError("data.format is 'chat' but the tokenizer has no chat_template; use another format or a "
                           "tokenizer with a template.")
    if not tok.is_fast:
        raise PeftkitError("data.format 'chat' needs a fast tokenizer (character offsets to find assistant turns).")
    text = tok.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)) if i else 0
            end = len(tok.apply_chat_template(messages[: i + 1], tokenize=False))
            spans.append((start, end))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [t if any(s <= a < e for s, e in spans) and b > a else IGNORE_INDEX
              for t, (a, b) in zip(ids, enc["offset_mapping"], strict=True)]
    return ids, labels


def tokenize_rows(
    tok, rows: list[dict], cfg: DataConfig, source: str, line_numbers: list[int] | None = None, skipped: int = 0
) -> tuple[list[Example], dict]:
    """Tokenize and mask; returns the examples and counts of skipped rows by reason.

    Args:
        line_numbers: the file line of each row (a .jsonl file), so that a message names the line.
        skipped: malformed lines the reader already dropped, so an empty result can say why.
    """
    examples, stats = [], {"bad_rows": 0, "too_long": 0}
    for i, row in enumerate(rows):
        problem = _row_problem(row, cfg.format) if isinstance(row, dict) else "not an object"
        if problem:
            if cfg.on_bad_rows == "skip":
                stats["bad_rows"] += 1
                continue
            where = f"{source}:{line_numbers[i]}" if line_numbers else f"{source} row {i + 1}"
            raise PeftkitError(
                f"{where}: {problem} for data.format '{cfg.format}' (each row needs "
                f"{', '.join(REQUIRED_FIELDS[cfg.format])}). Fix the row, set the right data.format, or set "
                "data.on_bad_rows: skip."
            )
        if cfg.format == "chat":
            ids, labels = _chat_example(tok, row["messages"])
        else:
            prompt, target = _prompt_and_target(tok, row, cfg.format)
            ids, labels = prompt + target, [IGNORE_INDEX] * len(prompt) + target
        ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
        # Position t predicts token t+1, so the first label can never be learned.
        if all(label == IGNORE_INDEX for label in labels[1:]):
            stats["too_long"] += 1
            continue
        examples.append(Example(ids, labels))
    if not examples:
        bad = stats["bad_rows"] + skipped
        if stats["too_long"]:
            reason = (f"all {stats['too_long']} examples have their whole target beyond data.max_length="
                      f"{cfg.max_length} tokens, so there is nothing left to learn; raise data.max_length")
        elif bad:
            reason = (f"all {bad} rows were skipped as malformed or missing the fields of data.format "
                      f"'{cfg.format}' ({', '.join(REQUIRED_FIELDS[cfg.format])}); check data.format, or set "
                      "data.on_bad_rows: error to see the first bad row")
        else:
            reason = "it has no rows; point data.train/data.eval at data with examples"
        raise PeftkitError(f"No training examples from {source}: {reason}.")
    return examples, stats


def load_examples(tok, source: str, split: str, cfg: DataConfig) -> tuple[list[Example], dict]:
    rows, bad, line_numbers = load_rows(source, split, cfg.on_bad_rows)
    examples, stats = tokenize_rows(tok, rows, cfg, source, line_numbers, skipped=bad)
    stats["bad_rows"] += bad
    stats["examples"] = len(examples)
    return examples, stats


class Collator:
    """Right-pads a list of examples to the longest; pad labels are IGNORE_INDEX, attention 0."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: list[Example]) -> dict[str, torch.Tensor]:
        width = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, e in enumerate(batch):
            n = len(e.input_ids)
            ids[i, :n] = torch.tensor(e.input_ids)
            labels[i, :n] = torch.tensor(e.labels)
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool) -> list[list[int]]:
    """Index batches of one epoch: a permutation that depends only on (seed, epoch), so any position can be
    recomputed on resume without replaying the loader."""
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    else:
        order = list(range(n))
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def micro_batches(
    examples: list[Example], batch_size: int, seed: int, shuffle: bool, pad_id: int, start: int = 0, num_workers: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """An endless stream of collated micro-batches across epochs, starting at micro-batch index `start`.

    Batch composition is decided here in the main process; workers only collate, so `num_workers > 0`
    yields the same batches in the same order.
    """
    per_epoch = -(-len(examples) // batch_size)
    epoch, offset = divmod(start, per_epoch)
    while True:
        batches = epoch_batches(len(examples), batch_size, seed, epoch, shuffle)[offset:]
        # An own generator: a DataLoader otherwise draws its worker seed from the global RNG, which would
        # shift dropout masks depending on where an epoch (or a resumed run) starts.
        loader = DataLoader(examples, batch_sampler=batches, collate_fn=Collator(pad_id), num_workers=num_workers,
                            generator=torch.Generator().manual_seed(seed + epoch))
        yield from loader
        epoch, offset = epoch + 1, 0


def eval_loader(examples: list[Example], batch_size: int, pad_id: int) -> DataLoader:
    return DataLoader(examples, batch_size=batch_size, shuffle=False, collate_fn=Collator(pad_id),
                      generator=torch.Generator().manual_seed(0))
