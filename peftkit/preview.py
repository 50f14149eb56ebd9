"""`peftkit preview`: the first training examples the way the model sees them.

Each example is shown after formatting, the chat template and the cut at data.max_length, token by token:
the loss-masked part (labels -100: the prompt, role headers, system text) dim, the trained part bold green.
Without a terminal, or with NO_COLOR set, styles are dropped and delimiters take their place, so logs and
tests read the same thing: `[masked]` and `«trained»`. Tokenized rows with CPT's per-token types
(`input_type_mask`) show each run of one type led by it, `‹2›[2+2=]‹4›«four»`. Labels are shown as the data builds
them, aligned with the input ids (the model shifts them: position t is trained to predict the label of t + 1).

Only the tokenizer is loaded, never the model, so a preview of a 70B recipe costs seconds. The whole training
set is tokenized for the closing counts (the same counts `peftkit train` prints).
"""

from __future__ import annotations

from itertools import islice

from rich.console import Console
from rich.text import Text

from peftkit.data import (
    IGNORE_INDEX,
    BuiltExample,
    Example,
    build_examples,
    count_examples,
    describe_stats,
    no_examples_error,
    truncation_error,
)
from peftkit.data.examples import mixed_tasks_error
from peftkit.data.sources import format_spans, read_rows
from peftkit.data.stored import UNTYPED
from peftkit.data.tokenized import TYPES
from peftkit.data.packing import describe_packing, pack_examples
from peftkit.errors import PeftkitError, visible
from peftkit.recipe import DataConfig, Recipe
from peftkit.task_ids import check_training_tasks, recipe_reads_tasks

MASKED_STYLE = "dim"
TRAINED_STYLE = "bold green"
# Plain-text delimiters: brackets are what people expect for "left out"; guillemets rarely occur in data.
MASKED_OPEN, MASKED_CLOSE = "[", "]"
TRAINED_OPEN, TRAINED_CLOSE = "«", "»"
TYPE_OPEN, TYPE_CLOSE = "‹", "›"  # CPT's type of the tokens after it (input_type_mask), styled or not
TYPE_STYLE = "magenta"
NEWLINE_MARK = "↵"  # a newline shows as ↵ and then breaks the line: a trained trailing newline stays visible
CUT_MARK = " ✂"
_WINDOW = 8  # tokens of left context when decoding one token (see _pieces)


def is_plain(console: Console) -> bool:
    """Delimiters instead of styles: not a terminal (a log, a pipe, a test), NO_COLOR, or TERM=dumb."""
    return not console.is_terminal or console.no_color or console.color_system is None


def _pieces(tok, ids: list[int]) -> list[str]:
    """The text of each token, such that the pieces join to the decoded text.

    Decoding one id alone loses context: SentencePiece drops a word's leading space at the start of a decode,
    and a byte-level BPE splits a multi-byte character over tokens. So each piece is the decode of a few
    tokens of left context plus this one, minus the decode of the context alone, both without a trailing half
    character (U+FFFD): a character split over tokens shows with the token that completes it (`東` is 3 byte
    tokens: "", "", "東"), never as `�`. Where that is not a prefix, the token's own decode.
    """
    pieces = []
    for i, token_id in enumerate(ids):
        context = ids[max(0, i - _WINDOW) : i]
        before = tok.decode(context, skip_special_tokens=False).rstrip("\ufffd") if context else ""
        after = tok.decode([*context, token_id], skip_special_tokens=False).rstrip("\ufffd")
        pieces.append(after[len(before) :] if after.startswith(before) else tok.decode([token_id]))
    return pieces


def render_tokens(tok, example: Example, *, plain: bool, show_ids: bool = False, cut: bool = False,
                  types: list[int] | None = None) -> Text:
    """The example's tokens, masked ones (label -100) and trained ones told apart.

    Args:
        plain: delimit runs with `[...]` (masked) and `«...»` (trained) instead of styling them.
        show_ids: follow each token with its id, `⟨id⟩`, which also shows token boundaries.
        cut: the example was cut at data.max_length; end with a scissors mark.
        types: CPT's type of each token (`example_types`), each run of one type led by it, `‹4›`; None: none shown.
    """
    text = Text()
    runs: list[tuple[bool, int | None, list[tuple[str, int]]]] = []  # (trained, type, [(piece, id), ...]), contiguous
    for piece, token_id, label, kind in zip(_pieces(tok, example.input_ids), example.input_ids, example.labels,
                                            types or [None] * len(example.input_ids), strict=True):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][:2] == (trained, kind):
            runs[-1][2].append((piece, token_id))
        else:
            runs.append((trained, kind, [(piece, token_id)]))
    for n, (trained, kind, tokens) in enumerate(runs):
        style = TRAINED_STYLE if trained else MASKED_STYLE
        if kind is not None and (n == 0 or runs[n - 1][1] != kind):  # where a type starts, before the run's delimiter
            text.append(f"{TYPE_OPEN}{kind}{TYPE_CLOSE}", style=None if plain else TYPE_STYLE)
        if plain:
            text.append(TRAINED_OPEN if trained else MASKED_OPEN)
        for piece, token_id in tokens:
            # a row's control characters shown as `\x1b`, not obeyed: `\x1b[2J` in the data cleared the screen
            text.append(visible(piece).replace("\n", NEWLINE_MARK), style=None if plain else style)
            if show_ids:
                text.append(f"⟨{token_id}⟩", style=None if plain else "italic cyan")
            text.append("\n" * piece.count("\n"))  # the line breaks after the id, so an id stays with its token
        if plain:
            text.append(TRAINED_CLOSE if trained else MASKED_CLOSE)
    if cut:
        text.append(CUT_MARK, style=None if plain else "bold red")
    return text


def describe_example(built: BuiltExample, cfg: DataConfig) -> str:
    """The header line of one example: where it is, its token counts, and whether its target kept its end."""
    example = built.example
    n = len(example.input_ids)
    # Trained = tokens with loss: the first label is never learned (nothing comes before it), as in data.py.
    trained = sum(label != IGNORE_INDEX for label in example.labels[1:])
    size = (f"{n} of {built.length} tokens (cut at data.max_length={cfg.max_length})" if built.truncated
            else f"{n} tokens")
    line = f"{built.where}: {size}, {trained} trained" + (f", task {example.task_id}" if example.task_id is not None else "")
    if built.no_target:
        return line + ("; no target token within data.max_length: training stops here (data.truncation: error)"
                       if cfg.truncation == "error" and built.target_lost else
                       "; dropped: no target token within data.max_length")
    end = "the row's last trained token; no EOS appended" if built.given else "EOS / end-of-turn"  # (tokenized rows)
    if not built.target_lost:
        return line + f"; end of target ({end}): trained"
    fate = {"keep": "trained as cut (data.truncation: keep)", "drop": "left out (data.truncation: drop)",
            "error": "training stops here (data.truncation: error)"}[cfg.truncation]
    return (line + f"; end of target ({end}): CUT, its last {built.target_lost} target tokens lie "
            f"beyond data.max_length; {fate}")


def legend(plain: bool, typed: bool = False) -> Text:
    """The legend line; `typed`: the data has CPT's per-token types, whose mark it explains."""
    types = ("", f"  {TYPE_OPEN}n{TYPE_CLOSE} CPT's type of the tokens after it (input_type_mask: 4k + 1 input "
                 "template, 4k + 2 input, 4k + 3 output template, 4k + 4 output, 0 none)")[typed]
    if plain:
        return Text(f"legend: {MASKED_OPEN}masked: no loss (label -100){MASKED_CLOSE} "
                    f"{TRAINED_OPEN}trained: loss{TRAINED_CLOSE}  ↵ newline  ✂ cut at data.max_length{types}")
    return Text.assemble("legend: ", ("masked: no loss (label -100)", MASKED_STYLE), "  ",
                         ("trained: loss", TRAINED_STYLE), "  ↵ newline  ✂ cut at data.max_length", (types, TYPE_STYLE))


def is_typed(rows: list[dict], cfg: DataConfig, line_numbers: list | None) -> bool:
    """Whether a tokenized row of the data has CPT's types (`input_type_mask`): training then types every row's
    tokens, a row without the column's `UNTYPED`, so preview shows them all (`example_types`)."""
    return any(isinstance(rows[i], dict) and rows[i].get(TYPES) is not None
               for own, span in format_spans(cfg, line_numbers, len(rows)) if own.format == "tokenized" for i in span)


def example_types(example: Example, typed: bool) -> list[int] | None:
    """The types `render_tokens` shows of an example of typed data (`is_typed`): its own, or the `UNTYPED` training
    gives a row without the column; None for data without them."""
    if not typed:
        return None
    return example.types if example.types is not None else [UNTYPED] * len(example.input_ids)


def preview(recipe: Recipe, n: int, console: Console, *, show_ids: bool = False) -> list[BuiltExample]:
    """Print the first `n` examples of the recipe's training data as the model sees them, then the counts
    training would print for the whole set. Loads the tokenizer, not the model. Returns the examples shown.

    Args:
        n: how many rows to show (bad rows skipped under data.on_bad_rows: skip are not shown).
        show_ids: print each token's id after it.
    """
    from peftkit.modeling import load_tokenizer
    from peftkit.start_data import input_types_error

    cfg = recipe.data
    tok = load_tokenizer(recipe.model, cfg.chat_template)
    if cfg.format == "preference":
        return preview_pairs(tok, cfg, n, console, show_ids=show_ids)
    if cfg.format == "unpaired":
        return preview_unpaired(tok, cfg, recipe.training.batch_size, n, console, show_ids=show_ids)
    rows, bad, line_numbers, name = read_rows(cfg.train, cfg.train_split, cfg)
    tasks = recipe_reads_tasks(recipe)
    shown = list(islice((b for b in build_examples(tok, rows, cfg, name, line_numbers, tasks=tasks)
                         if b is not None), n))
    plain = is_plain(console)
    out = {"markup": False, "highlight": False, "soft_wrap": True}  # data is not rich markup; one line stays one line
    listed = ", ".join(_entry(e, cfg) for e in cfg.train_sources())
    console.print(f"data.train {listed if isinstance(cfg.train, list) else cfg.train}: format {cfg.format}, "
                  f"data.max_length {cfg.max_length}, the first {len(shown)} of {len(rows)} rows", **out)
    typed = is_typed(rows, cfg, line_numbers)
    console.print(legend(plain, typed), **out)
    for i, built in enumerate(shown, 1):
        console.print()
        console.print(f"example {i}  {describe_example(built, cfg)}", **out)
        console.print(render_tokens(tok, built.example, plain=plain, show_ids=show_ids, cut=built.truncated,
                                    types=example_types(built.example, typed)), **out)
    examples, stats, cuts = count_examples(tok, rows, cfg, name, line_numbers, tasks=tasks)
    stats["bad_rows"] += bad
    console.print()
    for line in describe_stats(stats, cfg):
        console.print(line, **out)
    if cfg.packing and examples:
        console.print(describe_packing(examples, pack_examples(examples, cfg.max_length), cfg.max_length), **out)
    if cfg.truncation == "error" and cuts.first is not None:
        console.print("training would stop: " + truncation_error(cuts, cfg), **out)
    elif not examples:  # "0 training examples" alone, where train stops at once
        console.print("training would stop: " + no_examples_error(stats, cfg, name, where=line_numbers), **out)
    elif tasks and (stop := task_error(recipe, examples.task_ids, name)):
        console.print("training would stop: " + stop, **out)
    elif stop := input_types_error(recipe.adapter, "data.train", examples):
        console.print("training would stop: " + stop, **out)
    return shown


def preview_pairs(tok, cfg: DataConfig, n: int, console: Console, *, show_ids: bool = False) -> list[BuiltExample]:
    """`preview` of data.format: preference (training.objective: dpo): each of the first `n` pairs' chosen and
    rejected answer as the model sees them, then the counts training prints (an example is a pair). Returns the
    answers shown, chosen and rejected in turn."""
    from peftkit.data.preference import build_pairs, kept_pairs

    built, stats, name, line_numbers = build_pairs(tok, cfg.train, cfg.train_split, cfg)
    plain = is_plain(console)
    out = {"markup": False, "highlight": False, "soft_wrap": True}
    console.print(f"data.train {cfg.train}: format preference, data.max_length {cfg.max_length}, the first "
                  f"{min(n, len(built))} of {stats['rows']} rows (pairs)", **out)
    console.print(legend(plain), **out)
    for i, pair in enumerate(built[:n], 1):
        for answer, one in zip(("chosen", "rejected"), pair, strict=True):
            console.print()
            console.print(f"pair {i} {answer}  {describe_example(one, cfg)}", **out)
            console.print(render_tokens(tok, one.example, plain=plain, show_ids=show_ids, cut=one.truncated), **out)
        out_of = [one.no_target or (one.target_lost and cfg.truncation == "drop") for one in pair]
        if any(out_of) and not all(out_of):  # the other answer's line alone would say it trains
            console.print(f"pair {i}: left out whole with its {'chosen' if out_of[0] else 'rejected'} answer (a pair "
                          "is kept or dropped whole)", **out)
    pairs, cuts = kept_pairs(built, cfg, stats)
    _print_counts(console, stats, cfg, cuts, bool(pairs), name, line_numbers)
    return [one for pair in built[:n] for one in pair]


def preview_unpaired(tok, cfg: DataConfig, chunk: int, n: int, console: Console, *,
                     show_ids: bool = False) -> list[BuiltExample]:
    """`preview` of data.format: unpaired (training.objective: kto): each of the first `n` answers, its label, and
    the mismatched example its KL estimate scores (its prompt with another row's answer, within runs of `chunk`
    rows: training.batch_size, one process's), then the counts training prints. Returns the examples shown, each
    answer and its mismatched one in turn."""
    from peftkit.data.unpaired import build_unpaired, kept_unpaired

    built, desirable, stats, name, line_numbers = build_unpaired(tok, cfg.train, cfg.train_split, cfg, chunk)
    plain = is_plain(console)
    out = {"markup": False, "highlight": False, "soft_wrap": True}
    console.print(f"data.train {cfg.train}: format unpaired, data.max_length {cfg.max_length}, the first "
                  f"{min(n, len(built))} of {stats['rows']} rows (answers)", **out)
    console.print(legend(plain), **out)
    for i, (pair, good) in enumerate(zip(built[:n], desirable, strict=False), 1):
        for what, one in zip((f"({'desirable' if good else 'undesirable'})", "mismatched (KL estimate)"), pair,
                             strict=True):
            console.print()
            console.print(f"example {i} {what}  {describe_example(one, cfg)}", **out)
            console.print(render_tokens(tok, one.example, plain=plain, show_ids=show_ids, cut=one.truncated), **out)
    kept, cuts = kept_unpaired(built, desirable, cfg, stats)
    _print_counts(console, stats, cfg, cuts, bool(kept), name, line_numbers)
    return [one for pair in built[:n] for one in pair]


def _print_counts(console: Console, stats: dict, cfg: DataConfig, cuts, any_kept: bool, name: str,
                  line_numbers) -> None:
    """The counts training prints of pairs (unpaired answers), then what it would stop on, if anything."""
    out = {"markup": False, "highlight": False, "soft_wrap": True}
    console.print()
    for line in describe_stats(stats, cfg):
        console.print(line, **out)
    if cfg.truncation == "error" and cuts.first is not None:
        console.print("training would stop: " + truncation_error(cuts, cfg), **out)
    elif not any_kept:
        console.print("training would stop: " + no_examples_error(stats, cfg, name, 0, line_numbers), **out)


def _entry(entry, cfg: DataConfig) -> str:
    """A dataset of data.train's list in the header: `b.jsonl (train[:10], format chat)`."""
    said = ([entry.split] if entry.split != "train" else []) + ([f"format {entry.format}"]
                                                                 if entry.format != cfg.format else [])
    return entry.path + (f" ({', '.join(said)})" if said else "")


def task_error(recipe: Recipe, tasks: list[int | None], name: str) -> str | None:
    """What training's checks of data.train's task ids (multitask prompt tuning) would stop on, if anything: rows of
    which only some have one (`load_examples`), or one past adapter.num_tasks - 1 (`check_training_tasks`)."""
    if mixed := mixed_tasks_error(name, tasks):
        return mixed
    try:
        check_training_tasks(recipe, "data.train", tasks)
    except PeftkitError as e:
        return str(e)
    return None
