"""Rows -> token ids with loss masks: the formats' prompts and targets, the chat template, the cut at
data.max_length and what it did (counts, `describe_stats`), and the default-system-prompt check. Whether a row
has the fields its format needs, and the error for one that has not, are in `peftkit.data.bad_rows`."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

from peftkit.data.bad_rows import all_skipped, bad_rows_fix, in_data_words, needed_fields, row_problem, usable_row
from peftkit.data.checks import injected_system_tokens, special_tokens_in, target_end
from peftkit.data.formats import message_name
from peftkit.data.rows import Locations, row_location
from peftkit.data.sources import bad_rows_by_dataset, format_spans, row_columns
from peftkit.data.conversations import _chat_example, render_chat, turn_end_text, turn_end_token
from peftkit.data.stored import IGNORE_INDEX, Example, Examples
from peftkit.data.tokenized import TYPES, ids_and_labels, vocabulary_problem
from peftkit.errors import PeftkitError
from peftkit.progress import work
from peftkit.recipe import DataConfig

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


@dataclass
class BuiltExample:
    """One row tokenized, masked and cut to data.max_length, with what the cut did (for the counts, and for
    `peftkit preview`)."""

    index: int
    """Position of the row in the data (0-based)."""
    where: str
    """`FILE:LINE` (a .jsonl file) or `FILE row N`, for messages."""
    example: Example
    """Already cut to data.max_length: what training sees (before data.truncation decides whether it is kept)."""
    length: int
    """Tokens before the cut."""
    target_lost: int
    """Target tokens the cut removed. A cut removes a suffix, so > 0 means the target's end (the EOS or
    end-of-turn marker the model should learn to stop on) is not trained. 0 when the cut target tokens are all
    whitespace: what a chat template puts after its end-of-turn marker (ChatML's newline after `<|im_end|>`),
    which the cut leaves in place."""
    given: bool = False
    """A data.format tokenized row's (its ids as given): peftkit appended no EOS, so the target's end is the row's own
    last trained tokens (`target_end`)."""

    @property
    def truncated(self) -> bool:
        return self.length > len(self.example.input_ids)

    @property
    def no_target(self) -> bool:
        # Position t predicts token t+1, so the first label can never be learned.
        return all(label == IGNORE_INDEX for label in self.example.labels[1:])


def prompt_and_target_text(row: dict, fmt: str) -> tuple[str, str | None]:
    """The text without loss (the prompt) and with loss (the target) of an alpaca, completion or text row; the target
    None where a row to generate from has none (`peftkit generate --data` of prompts alone)."""
    if fmt == "alpaca":
        template = ALPACA_PROMPT_WITH_INPUT if row.get("input") else ALPACA_PROMPT
        return template.format(**row), row.get("output")
    if fmt == "completion":
        return row["prompt"], row.get("completion")
    return "", row["text"]


EOS_FORMATS = ("alpaca", "completion", "text")
"""The formats whose targets end with the tokenizer's EOS token (`_prompts_and_targets`)."""


def check_eos(tok, fmt: str, format_key: str = "data.format", text_fields: str | None = None) -> None:
    """Refuse format `fmt` (one of EOS_FORMATS) with a tokenizer that has no EOS token (a BERT-style one): the model
    could not learn to stop. `format_key`: the key (or flag) that set `fmt`. `text_fields`: for data.format preference
    or unpaired, the fields of its text rows ("prompt and completion"), whose answers end with EOS as completion's
    targets do (its conversations' need a chat template instead)."""
    if tok.eos_token_id is None and text_fields:
        raise PeftkitError(f"{format_key} '{fmt}' rows of text ({text_fields} strings) end each answer with the "
                           "tokenizer's EOS token, so the model learns to stop, and this tokenizer has none. Give it "
                           f"one (tokenizer_config.json's eos_token), or give the rows as conversations ({text_fields} "
                           "as lists of messages) with a chat template that marks the end of each turn.")
    if tok.eos_token_id is None:
        chat = f"{format_key} chat" if format_key.startswith("--") else f"{format_key}: chat"  # a flag, a recipe key
        raise PeftkitError(f"{format_key} '{fmt}' ends each target with the tokenizer's EOS token, so the model learns "
                           "to stop, and this tokenizer has none. Give it one (tokenizer_config.json's eos_token), or "
                           f"use {chat} with a chat template that marks the end of each turn.")


def _prompts_and_targets(tok, rows: list[dict], fmt: str,
                         format_key: str = "data.format") -> list[tuple[list[int], list[int]]]:
    """Token ids of each row's part without loss (prompt) and part with loss (target, EOS appended: one, where the
    target ends with its text, `without_eos`). The texts go to the tokenizer in two calls for all rows, not two per row
    (20-25 % less CPU on 10k rows: transformers' own work per call). `format_key`: the key that set `fmt` (a data.train
    entry's own: data.train[1].format)."""
    check_eos(tok, fmt, format_key)
    texts = [(prompt, without_eos(tok, target))
             for prompt, target in (prompt_and_target_text(row, fmt) for row in rows)]
    prompts = encode_prompts(tok, [prompt for prompt, _ in texts])
    joined = encode_prompts(tok, [prompt + target for prompt, target in texts])
    return [(prompt_ids, _target_ids(tok, prompt_ids, whole, target) + [tok.eos_token_id])
            for (_, target), prompt_ids, whole in zip(texts, prompts, joined, strict=True)]


def without_eos(tok, target: str) -> str:
    """A target's text without the EOS's text it ends with, to which peftkit appends the EOS token: a target that
    already ends with it (text rendered by hand: ChatML's `...<|im_end|>`, `4</s>`) is trained through that one EOS,
    as TRL's SFTTrainer appends none to a text or completion that ends with it (its `add_eos`), and its DPO, KTO and
    reward trainers none to such an answer. Only the very end is taken: a target ending `</s>\n` gets a second, as
    there (`special_tokens_in` says so)."""
    eos = tok.eos_token
    return target[:-len(eos)] if eos and target.endswith(eos) else target


def _target_ids(tok, prompt_ids: list[int], joined: list[int], target: str) -> list[int]:
    """The target's tokens as they follow the prompt: the rest of the prompt and target encoded together, where
    that begins with `prompt_ids` (the prompt generation sends), else the target encoded alone.

    Encoded alone, a target loses its context: a SentencePiece tokenizer that marks the start of a text with `▁`
    (Llama-2, Mistral v0.1: Metaspace with prepend_scheme first) turns "4" after "2+2=" into `▁4`, a token the
    joined text never has. Where the joined encoding does not begin with the prompt's own tokens (a prompt ending
    in a space that merges into the target's first word), the model could not produce it after the prompt that
    generation sends, so the target is encoded alone (TRL's SFTTrainer warns and keeps the joined one), as text that
    continues (`_continuing`): after a text the tokenizer keeps apart, so that no start-of-text `▁` comes in.
    """
    if joined[: len(prompt_ids)] == prompt_ids:  # `joined`: the prompt and target encoded together
        return joined[len(prompt_ids):]
    after = _encoded_after(tok, _continuing(tok), target)
    return after if after is not None else tok(target, add_special_tokens=False)["input_ids"]


def _encoded_after(tok, lead: str, text: str) -> list[int] | None:
    """The ids of `text` encoded after `lead`, without lead's own; None where the two merge into other tokens."""
    lead_ids = tok(lead, add_special_tokens=False)["input_ids"]
    ids = tok(lead + text, add_special_tokens=False)["input_ids"]
    return ids[len(lead_ids):] if ids[: len(lead_ids)] == lead_ids else None


@functools.lru_cache(maxsize=8)  # once per tokenizer, not per row
def _continuing(tok) -> str:
    """A text after which the tokenizer encodes what follows as the middle of a text: its EOS token; or, for a
    SentencePiece tokenizer that starts a text anew after each special token (Llama-2's `legacy: true`: `</s>f` is
    `</s> ▁f`, as `f` alone is `▁f`), a newline, which it encodes apart (`\nf` is `▁ <0x0A> f`)."""
    alone = tok(PROBE_WORD, add_special_tokens=False)["input_ids"]
    after_eos, after_newline = (_encoded_after(tok, lead, PROBE_WORD) for lead in (tok.eos_token, "\n"))
    return "\n" if after_eos == alone and after_newline not in (None, alone) else tok.eos_token


PROBE_WORD = "f"


def encode_prompt(tok, text: str) -> list[int]:
    """`text` as the beginning of an example: with the special tokens the tokenizer puts in front (BOS), without
    those it puts after (a Llama tokenizer with `add_eos_token` appends EOS, which would then sit between the
    prompt and its answer, in training and in generation alike). An empty `text` is the leading specials alone."""
    return encode_prompts(tok, [text])[0]


def encode_prompts(tok, texts: list[str]) -> list[list[int]]:
    """`encode_prompt` of each text, in one call to the tokenizer."""
    if not texts:
        return []
    tail = _trailing_specials(tok)
    return [ids[: len(ids) - len(tail)] if tail and ids[-len(tail):] == tail else ids
            for ids in tok(texts, add_special_tokens=True)["input_ids"]]


@functools.lru_cache(maxsize=8)  # once per tokenizer, not per row
def _trailing_specials(tok) -> list[int]:
    """The special tokens the tokenizer appends to an encoded text ([] for most: they add a BOS in front only)."""
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a", add_special_tokens=True)["input_ids"]
    starts = [k for k in range(len(full) - len(plain) + 1) if full[k:k + len(plain)] == plain]
    return full[starts[0] + len(plain):] if plain and starts else []


def _full_examples(tok, rows: list[dict], fmt: str, train_on: str,
                   format_key: str = "data.format") -> Iterator[tuple[list[int], list[int]]]:
    """Token ids and labels of valid alpaca/completion/text rows, before any cut, `ROWS_PER_CALL` rows at a time; the
    prompt is trained too with `train_on` all."""
    for start in range(0, len(rows), ROWS_PER_CALL):
        for prompt, target in _prompts_and_targets(tok, rows[start:start + ROWS_PER_CALL], fmt, format_key):
            yield prompt + target, (prompt if train_on == "all" else [IGNORE_INDEX] * len(prompt)) + target


ROWS_PER_CALL = 512
"""Rows tokenized together (`_prompts_and_targets`)."""


def build_examples(
    tok, rows: list[dict], cfg: DataConfig, source: str, line_numbers: list[int] | None = None, *, tasks: bool = False
) -> Iterator[BuiltExample | None]:
    """Each row tokenized (in its format: data.format, or its list entry's own), masked and cut to data.max_length,
    in order; None for a bad row skipped under
    data.on_bad_rows: skip (a bad row raises under `error`). Applies no data.truncation policy.

    Args:
        line_numbers: the file line of each row (a .jsonl file), so that a message names the line.
        tasks: read each row's `task` (the model's method reads task ids: `peftkit.task_ids`); another method
            ignores the column, whatever it holds.
    """
    for own, span in format_spans(cfg, line_numbers, len(rows)):  # (a mix's entries of their own formats apart)
        yield from _built_examples(tok, rows, own, source, line_numbers, span, tasks)


def _built_examples(tok, rows: list[dict], cfg: DataConfig, source: str, line_numbers: list[int] | None, span: range,
                    tasks: bool) -> Iterator[BuiltExample | None]:
    """`build_examples` of the rows in `span`, all of data.format `cfg.format`."""
    if cfg.format == "classification":  # one label per row, not target tokens: peftkit.data.classification
        raise PeftkitError(f"{source}: data.format 'classification' rows are read by peftkit train and peftkit eval only; "
                           "this command does not show them yet.")
    if cfg.format == "preference":  # pairs of answers: peftkit.data.preference, for training.objective: dpo
        raise PeftkitError(f"{source}: data.format 'preference' rows (a prompt, a chosen and a rejected answer) are "
                           "read by peftkit train (training.objective: dpo), preview and eval only; this command does "
                           "not read them yet.")
    if cfg.format == "unpaired":  # answers with labels: peftkit.data.unpaired, for training.objective: kto
        raise PeftkitError(f"{source}: data.format 'unpaired' rows (a prompt, an answer and its label) are read by "
                           "peftkit train (training.objective: kto), preview and eval only; this command does not read "
                           "them yet.")
    chat, given = cfg.format == "chat", cfg.format == "tokenized"
    good = [row_problem(rows[i], cfg.format, train_on=cfg.train_on) is None for i in span]  # a bad row raises (or is None) in its turn below
    full = None if chat or given else _full_examples(tok, [rows[i] for i, ok in zip(span, good, strict=True) if ok],
                                                     cfg.format, cfg.train_on, cfg._format_key)
    for i, ok in zip(span, good, strict=True):
        row, where = rows[i], row_location(source, i, line_numbers)
        past = given and ok and vocabulary_problem(row, len(tok))  # (the ids are the user's: no tokenizer made them)
        if (not ok or past) and not usable_row(row, cfg, where, problem=past or None):
            yield None
            continue
        ids, labels = (located(where, _chat_example, tok, row["messages"], cfg.train_on, row.get("tools"),
                               cfg._format_key) if chat else ids_and_labels(row) if given else next(full))
        n = cfg.max_length
        lost = [label for label in labels[n:] if label != IGNORE_INDEX]
        if lost and not tok.decode(lost).strip():  # only whitespace after the end-of-turn marker: the end is kept
            lost = []
        types = row.get(TYPES) if given else None  # (CPT's, handed to its loss: peftkit.data.tokenized)
        example = Example(ids[:n], labels[:n], task_id=row_task(row, where) if tasks else None,
                          types=None if types is None else types[:n])
        yield BuiltExample(i, where, example, len(ids), len(lost), given)


def row_task(row: dict, where: str) -> int | None:
    """A row's `task` field (an integer >= 0: the task id multitask prompt tuning reads), or None without one."""
    task = row.get("task")
    if task is None:
        return None
    if isinstance(task, bool) or not isinstance(task, int) or task < 0:
        raise PeftkitError(f"{where}: field 'task' is {task!r}; a task id is an integer >= 0 (0 .. adapter.num_tasks - 1).")
    return task


def located(where: str, make, *args):
    """`make(*args)`, its error (about one row) prefixed with the row's location."""
    try:
        return make(*args)
    except PeftkitError as e:
        raise PeftkitError(f"{where}: {e}") from None


@dataclass
class _TargetCuts:
    """The examples whose target lost its end, for the data.truncation: error message."""

    first: BuiltExample | None = None
    longest: int = 0
    count: int = 0

    def add(self, built: BuiltExample) -> None:
        self.first = self.first or built
        self.longest = max(self.longest, built.length)
        self.count += 1


def count_examples(
    tok, rows: list[dict], cfg: DataConfig, source: str, line_numbers: list[int] | None = None, *, tasks: bool = False
) -> tuple[Examples, dict, _TargetCuts]:
    """The examples training keeps and the counts, with data.truncation `error` counted like `keep` (the
    caller decides whether to stop): `tokenize_rows` without its errors, so `peftkit preview` can report
    what training would do."""
    examples = Examples()
    spans = format_spans(cfg, line_numbers, len(rows))  # one, but for a mix with entries of their own formats
    chat = any(own.format == "chat" for own, _ in spans)
    stats = {"rows": len(rows), "bad_rows": 0, "too_long": 0, "truncated": 0, "target_cut": 0, "target_cut_given": 0,
             "truncation_dropped": 0, "system_prompt_rows": 0, "system_prompt_tokens": 0, "special_text_rows": 0,
             "special_text_first": None, "turn_ends_unmarked": chat and turn_end_token(tok) is None,
             "dropped_message_rows": 0, "dropped_message_first": None}
    if stats["turn_ends_unmarked"] and cfg.chat_template is not None:  # the recipe's template: name its marker
        stats["turn_end_text"] = turn_end_text(tok)
    cuts, skipped = _TargetCuts(), []
    for own, span in spans:  # every row's fields first: a bad row deep in a large file is an error in seconds,
        for i in span:  # not after the tokenizing of all the rows before it
            if row_problem(rows[i], own.format, train_on=own.train_on):
                usable_row(rows[i], own, row_location(source, i, line_numbers))
    shown = source if source.startswith("data.train (") else source.rstrip("/").rsplit("/", 1)[-1]  # (a mix: whole)
    with work(f"tokenizing {shown}", len(rows), "rows") as advance:
        for own, span in spans:
            lead = len(encode_prompt(tok, "")) if own.format != "chat" else 0  # the special tokens put in front (BOS)
            for i, built in zip(span, _built_examples(tok, rows, own, source, line_numbers, span, tasks), strict=True):
                advance()
                _count(built, rows, own, stats, cuts, examples)
                if built is not None:
                    _warnings(tok, built, rows, own.format, lead, stats, cfg, line_numbers)
                else:
                    skipped.append(i)
    if isinstance(line_numbers, Locations) and (by := bad_rows_by_dataset(line_numbers, skipped)):
        stats["bad_rows_by_dataset"] = by  # (a mix: which datasets the skipped rows came from)
    if stats["system_prompt_rows"]:
        stats["system_prompt_tokens"] = injected_system_tokens(tok)
    stats["examples"] = len(examples)
    return examples, stats, cuts


def _warnings(tok, built: BuiltExample, rows: list[dict], fmt: str, lead: int, stats: dict, cfg: DataConfig,
              line_numbers: list[int] | None) -> None:
    """`count_examples`' counts of a row (of format `fmt`) with the text of a special token, and of a conversation
    whose system message the template leaves out (`left_out`), each with the first such row in the data's words."""
    row = rows[built.index]

    def said(text: str) -> str:
        return f"{built.where}: {in_data_words(text, row, row_columns(cfg, line_numbers, built.index))}"

    if found := special_tokens_in(tok, row, fmt, _body(built, lead)):
        stats["special_text_rows"] += 1
        stats["special_text_first"] = stats["special_text_first"] or said(found)
    if fmt == "chat" and (left := left_out(tok, row)):
        stats["dropped_message_rows"] += 1
        stats["dropped_message_first"] = stats["dropped_message_first"] or said(left)


def left_out(tok, row: dict) -> str | None:
    """The first system message whose content the chat template does not render ("messages[0]"), or None. Mistral
    v0.3's template writes the system message into the last user turn only, so a conversation ending in an answer,
    as each training row does, is rendered without it. (Other roles are not looked for: Llama 3.1's template writes
    a tool's output as JSON, whose escapes a content with quotes or newlines does not match.)"""
    messages = row["messages"]
    if not any(m["role"] == "system" for m in messages):  # (no render: this runs for every row)
        return None
    text = render_chat(tok, messages, tools=row.get("tools"))
    return next((message_name(messages, i) for i, m in enumerate(messages)
                 if m["role"] == "system" and m["content"].strip() not in text), None)


def _body(built: BuiltExample, lead: int) -> list[int]:
    """An example's ids between the `lead` special tokens the tokenizer puts in front and the EOS peftkit appends
    (kept unless cut at data.max_length)."""
    ids = built.example.input_ids
    return ids[lead:len(ids) - (not built.truncated)]


def _count(built: BuiltExample | None, rows: list[dict], cfg: DataConfig, stats: dict, cuts: _TargetCuts,
           examples: Examples) -> None:
    """`count_examples` of one row: counted, and kept in `examples` or not."""
    if built is None:
        stats["bad_rows"] += 1
        return
    stats["truncated"] += built.truncated
    if built.target_lost:
        cuts.add(built)
    if built.no_target:  # dropped under every setting: nothing of it is learned; `error` names it too
        stats["too_long"] += 1
        return
    if built.target_lost:
        stats["target_cut"] += 1
        stats["target_cut_given"] += built.given
    if not loss_keeps(built, cfg):
        stats["truncation_dropped"] += 1
        return
    if cfg.format == "chat" and rows[built.index]["messages"][0]["role"] != "system":
        stats["system_prompt_rows"] += 1
    examples.append(built.example)


def loss_keeps(built: BuiltExample, cfg: DataConfig) -> bool:
    """Whether the loss (training's, an evaluation's) keeps this example: one with a target token left, and under
    data.truncation: drop, one whose target kept its end (under `error`, a cut target stops the whole: `tokenize_rows`).
    Generation metrics answer the same rows (`peftkit.data.prompts.LossRows`)."""
    return not built.no_target and not (built.target_lost and cfg.truncation == "drop")


def tokenize_rows(
    tok, rows: list[dict], cfg: DataConfig, source: str, line_numbers: list[int] | None = None, skipped: int = 0, *,
    tasks: bool = False
) -> tuple[Examples, dict]:
    """Tokenize and mask; returns the examples and the counts that `describe_stats` prints:
    `bad_rows` skipped, `too_long` (no target left, dropped), `truncated` (cut at all), `target_cut` (the
    target lost its end: EOS / end-of-turn), `truncation_dropped` (left out by data.truncation: drop),
    `system_prompt_rows`/`system_prompt_tokens` (chat conversations without a system message, and the tokens
    the template's default system prompt adds to each), `examples`.

    Args:
        line_numbers: the file line of each row (a .jsonl file), so that a message names the line.
        skipped: malformed lines the reader already dropped, so an empty result can say why.
        tasks: read the rows' `task` column (`build_examples`).
    """
    examples, stats, cuts = count_examples(tok, rows, cfg, source, line_numbers, tasks=tasks)
    if cfg.truncation == "error" and cuts.first is not None:
        raise PeftkitError(truncation_error(cuts, cfg))
    if not examples:
        raise PeftkitError(no_examples_error(stats, cfg, source, skipped, line_numbers))
    return examples, stats


def no_examples_error(stats: dict, cfg: DataConfig, source: str, skipped: int = 0, where: list | None = None) -> str:
    """Why `source` gave no examples (`tokenize_rows`' counts; `skipped`: malformed lines the reader dropped), and
    the fix: the error training stops with, which `peftkit preview` shows too. `where`: the rows' line numbers, whose
    `Locations` (a data.train list) say which entries read rows in a format of their own."""
    bad = stats["bad_rows"] + skipped
    too_long, dropped = stats["too_long"], stats["truncation_dropped"]
    if dropped:
        reason = (f"{'all ' if not too_long else ''}{dropped} examples lost the end of their target to "
                  f"data.max_length={cfg.max_length} tokens, which data.truncation: drop leaves out"
                  + (f", and the other {too_long} have their whole target beyond it" if too_long else "")
                  + "; raise data.max_length, or set data.truncation: keep")
    elif too_long:
        reason = (f"all {too_long} examples have their whole target beyond data.max_length={cfg.max_length} "
                  "tokens, so there is nothing left to learn; raise data.max_length")
    elif bad and len(formats := _entry_formats(cfg, where)) > 1:  # a mix of formats: each entry's fields
        reason = (f"all {bad} rows were skipped as malformed or missing the fields of their dataset's format: "
                  + "; ".join(f"{fmt} for {' and '.join(names)}" for fmt, names in formats.items())
                  + f"; check those keys, or {bad_rows_fix(cfg, 'error')} to see the first bad row")
    elif bad:
        reason = all_skipped(bad, cfg)
    else:
        reason = "it has no rows; point data.train/data.eval at data with examples"
    return f"No examples from {source}: {reason}."


def _entry_formats(cfg: DataConfig, where: list | None) -> dict[str, list[str]]:
    """{`data.format 'alpaca' (instruction, output)`: the data.train entries read so} of a mix whose entries have
    formats of their own (`format_spans`); one item otherwise."""
    formats: dict[str, list[str]] = {}
    spans = format_spans(cfg, where, len(where or []))
    for i, (own, _) in enumerate(spans):
        formats.setdefault(f"{own._format_key} '{own.format}' ({needed_fields(own)})", []).append(f"data.train[{i}]")
    return formats


def truncation_error(cuts: _TargetCuts, cfg: DataConfig) -> str:
    """The data.truncation: error message: the first example whose target lost its end (or all of it), and how to
    fix it."""
    first, count, longest = cuts.first, cuts.count, cuts.longest
    others = f"{count - 1} more example is" if count == 2 else f"{count - 1} more examples are"
    more = f" {others} cut the same way; the longest has {longest} tokens." if count > 1 else ""
    n, end = first.target_lost, target_end(first.given)
    kind = "trained" if first.given else "target"  # (a tokenized row's: its labels' last, no EOS of peftkit's)
    cut = (f"none of its {n} target tokens is left: the prompt fills data.max_length" if first.no_target
           else f"its last {n} {kind} tokens, {'' if first.given else 'with '}{end}, are cut" if n > 1
           else f"its last {kind} token, {end}, is cut")
    return (f"{first.where}: this example has {first.length} tokens but data.max_length is {cfg.max_length}, so "
            f"{cut} (data.truncation: error).{more} Raise data.max_length to {longest}, or set data.truncation: drop "
            "to leave such examples out (keep trains on them as cut).")


def mixed_tasks_error(source: str, tasks: list[int | None]) -> str | None:
    """The error of data whose rows only partly have a `task` (multitask prompt tuning), or None."""
    if len({task is None for task in tasks}) > 1:
        return f"{source}: some rows have a 'task' field and some do not; give every row its task id."
    return None
