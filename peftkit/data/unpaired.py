"""`data.format: unpaired` (training.objective: kto): rows of a prompt, one answer and a `label` saying whether the
answer is desirable (true: a thumbs-up) or not (false), TRL's unpaired preference datasets -> examples, each with
the mismatched example KTO's KL estimate scores beside it -> padded batches.

A row is one of (TRL's standard and conversational forms):
- text: `prompt`, `completion` strings; the answer is tokenized as data.format completion tokenizes the row (the
  prompt, then the answer and EOS, the loss on the answer; none more where it ends with the EOS's text, as TRL's
  KTOTrainer: `peftkit.data.preference.one_eos`).
- a conversation: `prompt` a list of messages, `completion` a list of messages (or a string: one assistant message);
  rendered by the chat template as data.format chat renders it, the loss on the answer's assistant turns.

KTO (Ethayarajh et al. 2024) compares each answer's log-likelihood ratio to the reference with a batch's estimate of
the KL divergence between the policy and the reference, taken on mismatched (prompt, answer) pairs: as TRL's
KTOTrainer builds them, within each run of `chunk` rows (a global micro-batch's, training.batch_size x processes, for data.train; eval.batch_size for an
evaluation set) in the data's order, row i's prompt with the answer of the row before it (the first with the last's).
Each example is stored with its mismatched example after it (example at 2i, mismatched at 2i + 1) in one `Examples`,
so that the reference's log-probabilities of both are computed once, before training, as DPO's pairs' are
(`peftkit.preference.reference_logps`), and a batch (or a process's share of it) holds an example with its own. An
example is kept or dropped by its own length (data.max_length, data.truncation); its mismatched one is cut to
data.max_length, as TRL cuts it. The examples and labels of local files are kept in the tokenized-data cache as
pairs are (`load_unpaired`), under a key of `chunk` too.
"""

from __future__ import annotations

import torch

from peftkit.data.bad_rows import usable_row
from peftkit.data.conversations import check_chat_tokenizer
from peftkit.data.examples import _built_examples, _TargetCuts, check_eos, no_examples_error, truncation_error
from peftkit.data.formats import TRAIN, TRAIN_KEYS, _row_problem, _with_call_arguments, _without_empty_calls, format_rows
from peftkit.data.preference import (PairCollator, Pairs, _count_default_system_prompts, _count_doubled_specials,
                                     _count_left_out, _count_special_messages, _in_row_words, _keep, new_stats,
                                     one_eos, opening_system_prompt)
from peftkit.data.rows import Locations, row_location
from peftkit.data.sources import read_rows
from peftkit.data.stored import Examples
from peftkit.errors import PeftkitError
from peftkit.recipe import DataConfig

TEXT_FIELDS = "prompt and completion"
"""The fields of a text row, whose answer ends with EOS (a conversation's ends with its template's end of turn)."""


def split_unpaired(row: dict) -> tuple[str, tuple, bool] | str:
    """(the format the answer is read in, `completion` or `chat`; its parts, (prompt, answer, extra fields), which
    `compose` makes the row of; whether it is desirable) of an unpaired row, or what makes it unusable (in the row's
    own words: `completion[0].content`)."""
    prompt, answer, label = row.get("prompt"), row.get("completion"), row.get("label")
    for key, value in (("prompt", prompt), ("completion", answer), ("label", label)):
        if value is None:
            return f"missing field '{key}'"
    if not isinstance(label, bool):
        return f"field 'label' must be true (a desirable answer) or false (an undesirable one), got {label!r}"
    if isinstance(prompt, str) and isinstance(answer, str):  # text
        parts = (prompt, answer, {})
        return problem if (problem := _row_problem(compose("completion", parts), "completion")) else \
            ("completion", parts, label)
    answer = [{"role": "assistant", "content": answer}] if isinstance(answer, str) else answer
    for key, value in (("prompt", prompt), ("completion", answer)):
        if not (isinstance(value, list) and all(isinstance(m, dict) for m in value)):
            return f"field '{key}' must be a list of {{role, content}} messages (or, for the completion, a string)"
    if not any(m.get("role") == "assistant" for m in answer):
        return "'completion' has no assistant message: nothing of it to learn"
    context = [{k: v for k, v in m.items() if k not in TRAIN_KEYS} | ({TRAIN: False} if m.get("role") == "assistant"
                                                                        else {}) for m in prompt]
    parts = (context, answer, {k: row[k] for k in ("tools",) if row.get(k) is not None})
    if problem := _row_problem(compose("chat", parts), "chat"):
        return _in_row_words(problem, len(context), "completion", {"prompt": prompt})
    return "chat", parts, label


def compose(kind: str, parts: tuple) -> dict:
    """The row of data.format `kind` (completion or chat) of a prompt, an answer and a conversation's extra fields."""
    prompt, answer, extra = parts
    if kind == "completion":
        return {"prompt": prompt, "completion": answer}
    return _with_call_arguments(_without_empty_calls({"messages": prompt + answer} | extra))


def _one_eos(tok, parts: tuple) -> tuple:
    """A text row's parts without the EOS text its answer ends with (`one_eos`): its mismatched examples take it so."""
    prompt, answer, extra = parts
    return prompt, one_eos(tok, {"prompt": prompt, "completion": answer})["completion"], extra


def unpaired_problem(row: dict) -> str | None:
    """What makes an unpaired row unusable (`peftkit.data.formats._row_problem`'s, for data.format unpaired)."""
    split = split_unpaired(row)
    return split if isinstance(split, str) else None


def mismatched(parts: list[tuple], chunk: int) -> list[tuple]:
    """Each row's mismatched parts (KTO's KL estimate): within each run of `chunk` rows, row i's prompt with the
    answer of the row before it, the first's with the last's (TRL's KTOTrainer's `KL_completion_ids`)."""
    out = []
    for start in range(0, len(parts), chunk):
        run = parts[start:start + chunk]
        out += [(prompt, run[i - 1][1], extra) for i, (prompt, _, extra) in enumerate(run)]
    return out


class Unpaired(Pairs):
    """An unpaired dataset's examples: item i is (example, its mismatched example, their reference log-probabilities
    or None, whether the answer is desirable), from `examples` 2i and 2i + 1 (`Pairs`' layout, so that batches and
    the reference's computation treat them as DPO's pairs)."""

    def __init__(self, examples: Examples, desirable: list[bool]) -> None:
        super().__init__(examples)
        self.desirable = desirable

    def __getitem__(self, i: int):  # type: ignore[override]
        i = range(len(self))[i]
        return (*super().__getitem__(i), self.desirable[i])

    def collator(self, pad_id: int) -> UnpairedCollator:
        return UnpairedCollator(pad_id)


class UnpairedCollator(PairCollator):  # (defined after Unpaired, which names it: annotations are lazy)
    """`PairCollator`'s batch (rows example, mismatched, example, ...) and each row's example's label, `desirable`
    (a row's: a process's share of a batch is cut by rows, `peftkit.distributed.shard`)."""

    def __call__(self, items: list) -> dict[str, torch.Tensor]:
        batch = super().__call__([item[:3] for item in items])
        batch["desirable"] = torch.tensor([item[3] for item in items for _ in range(2)], dtype=torch.bool)
        return batch


def load_unpaired(tok, source: str | list, split: str | None, cfg: DataConfig, chunk: int,
                  tasks: bool = False, cache: bool = True) -> tuple[Unpaired, dict]:
    """The examples of `source` (one path or hub id at `split`, or data.train's list), each with its mismatched
    example (within runs of `chunk` rows), and their counts, the keys `describe_stats` prints. With `cache`, local
    files' are read from the tokenized-data cache where they are there, and kept there when not, as pairs are
    (`peftkit.data.preference.load_pairs`), under a key of `chunk` too: the mismatched examples depend on it."""
    from peftkit.data.cache import kept_warnings
    from peftkit.data.preference import keep_entry, local_entry

    entry, parts = local_entry(tok, source, split, cfg, cache, tasks, chunk)
    if entry is not None and (hit := entry.read()) is not None:
        examples, stats = hit
        labels = stats.pop("desirable")  # (the cache counts the examples it holds, two an answer)
        return Unpaired(examples, [label == "1" for label in labels]), stats | {"examples": len(examples) // 2}
    with kept_warnings() as said:
        built, desirable, stats, name, line_numbers = build_unpaired(tok, source, split, cfg, chunk, tasks)
    data, cuts = kept_unpaired(built, desirable, cfg, stats)
    if cfg.truncation == "error" and cuts.first is not None:
        raise PeftkitError(truncation_error(cuts, cfg))
    if not data:
        raise PeftkitError(no_examples_error(stats, cfg, name, 0, line_numbers))
    # (the labels with the counts, one character an answer: the cache's arrays are those of any examples)
    keep_entry(entry, parts, cfg, data.examples, stats | {"examples": len(data.examples), "warnings": said,
                                                          "desirable": "".join("01"[d] for d in data.desirable)})
    return data, stats


def kept_unpaired(built: list, desirable: list[bool], cfg: DataConfig, stats: dict) -> tuple[Unpaired, _TargetCuts]:
    """The examples of `build_unpaired` that train (by their own length: data.max_length, data.truncation), each with
    its mismatched example, counted in `stats`, and the examples that lost their target's end."""
    examples, kept, cuts = Examples(), [], _TargetCuts()
    for (example, other), label in zip(built, desirable, strict=True):
        if _keep(example, example, cfg, stats, cuts):
            examples.append(example.example)
            examples.append(other.example)
            kept.append(label)
    stats["examples"] = len(kept)
    return Unpaired(examples, kept), cuts


def eos_only(tok, row: object) -> str | None:
    """Why a text row whose answer is the EOS's text alone (`</s>`) is unusable once the tokenizer is known: `one_eos`
    takes that text off (each answer is scored through one EOS), leaving nothing; None for any other row. The problem
    a reader of rows as prompts (`peftkit.data.prompts.load_prompts`) hands `usable_row` as train does."""
    split = split_unpaired(row) if isinstance(row, dict) else None
    if not isinstance(split, tuple) or split[0] != "completion" or _one_eos(tok, split[1])[1]:
        return None
    return (f"field 'completion' is the EOS's text '{tok.eos_token}' alone, which is taken off (each answer is scored "
            "through the one EOS peftkit appends), leaving nothing of it to learn")


def usable_unpaired(row: object, cfg: DataConfig, at: str, tok=None) -> tuple[str, tuple, bool] | None:
    """`split_unpaired` of a usable row; None for a bad one, which raises under data.on_bad_rows: error, naming `at`
    (with `tok`, a text answer of the EOS's text alone too: `eos_only`)."""
    parsed = split_unpaired(row) if isinstance(row, dict) else None
    found = eos_only(tok, row) if tok is not None else None
    if not isinstance(parsed, tuple) or found:
        usable_row(row, cfg, at, found=found)
        return None
    return parsed


class OneForm:
    """The form of a source's first usable row (`completion`: a text answer, `chat`: a conversation), which every
    later row must have: `build_unpaired`'s check, which eval's prompts (`load_prompts`) make in its words too."""

    def __init__(self) -> None:
        self.form: str | None = None
        self.first: str | None = None

    def check(self, kind: str, at: str) -> str:
        """`kind`, the form of the usable row at `at`; an error where it is not the first row's."""
        if self.form is not None and kind != self.form:  # (data.train's list: the first row may be another dataset's)
            raise PeftkitError(f"{at}: a {'conversation' if kind == 'chat' else 'text answer'}, and the first row "
                               f"({self.first}) is a {'conversation' if self.form == 'chat' else 'text answer'}; give "
                               "every row the same form (every dataset's, where data.train lists several)")
        self.form, self.first = kind, self.first or at
        return kind


def check_unpaired(tok, source: str | list, split: str | None, cfg: DataConfig) -> None:
    """The bad rows `build_unpaired` refuses under data.on_bad_rows: error, and a row of another form than the
    first's (refused under skip too), in its words (FILE:LINE), read but not tokenized: `peftkit validate`'s check
    of `source` (data.train, or a set of data.eval's, as train reads it)."""
    rows, _, line_numbers, name = read_rows(source, split, cfg)
    form = OneForm()
    for i, row in enumerate(rows):
        if (parsed := usable_unpaired(row, cfg, at := row_location(name, i, line_numbers), tok)) is not None:
            form.check(parsed[0], at)


def build_unpaired(tok, source: str | list, split: str | None, cfg: DataConfig, chunk: int, tasks: bool = False):
    """(each usable row's example and mismatched example as `BuiltExample`s, its label, the counts so far, the
    data's name and line numbers). A bad row raises under data.on_bad_rows: error, naming its FILE:LINE."""
    rows, skipped, line_numbers, name = read_rows(source, split, cfg)
    stats = new_stats(len(rows), skipped)
    kept, fmt, form = [], None, OneForm()
    for i, row in enumerate(rows):
        at = row_location(name, i, line_numbers)
        parsed = usable_unpaired(row, cfg, at, tok)
        if parsed is None:  # a bad row: said under data.on_bad_rows: error (naming it), else skipped
            stats["bad_rows"] += 1
            continue
        kind, answer, label = parsed  # (answer: its parts)
        fmt = form.check(kind, at)
        if kind == "chat":
            _count_special_messages(tok, row, ("prompt", "completion"), at, stats,
                                    opening_system_prompt(cfg, compose(kind, answer)))
        kept.append((at, answer, label, {"task": row["task"]} if tasks and "task" in row else {}))
    stats["form"] = fmt
    if not kept:
        return [], [], stats, name, line_numbers
    if fmt == "completion" and (key := next((k for k in ("system_prompt", "chat_template") if getattr(cfg, k)), None)):
        raise PeftkitError(f"data.{key}: {name} holds text answers (prompt and completion strings), which no chat "
                           f"template renders, so data.{key} would be ignored; remove it, or give the rows as "
                           "conversations (prompt and completion as lists of messages)")
    if fmt == "completion":
        check_eos(tok, cfg.format, cfg._format_key, TEXT_FIELDS)
        _count_doubled_specials(tok, [(at, [compose(fmt, p)]) for at, p, _, _ in kept], stats, ("completion",))
        kept = [(at, _one_eos(tok, parts), label, task) for at, parts, label, task in kept]
    elif fmt == "chat":  # (conversations: said as this format's, not as data.format chat's)
        check_chat_tokenizer(tok, cfg._format_key, (cfg.format, TEXT_FIELDS))
    own = cfg.model_copy(update={"format": fmt, "columns": {}})
    parts = [p for _, p, _, _ in kept]
    both = format_rows([r for part, other, (*_, task) in zip(parts, mismatched(parts, chunk), kept, strict=True)
                        for r in (compose(fmt, part) | task, compose(fmt, other) | task)], own)
    if fmt == "chat":  # (each row's own conversation, data.system_prompt applied)
        _count_default_system_prompts(tok, both[::2], stats)
    doubled = Locations(at for at, *_ in kept for _ in range(2))
    doubled.parts = []
    built = list(_built_examples(tok, both, own, name, doubled, range(len(both)), tasks))
    if fmt == "chat":  # (once built: a row whose system message the template refuses is an error naming it first)
        for (at, (prompt, *_), _, _), own_row in zip(kept, both[::2], strict=True):
            _count_left_out(tok, [own_row], ("completion",), at, stats, {"prompt": prompt})
    return list(zip(built[::2], built[1::2], strict=True)), [label for _, _, label, _ in kept], stats, name, line_numbers


__all__ = ["Unpaired", "UnpairedCollator", "build_unpaired", "check_unpaired", "kept_unpaired", "load_unpaired",
           "mismatched", "split_unpaired", "unpaired_problem", "usable_unpaired"]
