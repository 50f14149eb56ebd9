"""`data.format: preference` (training.objective: dpo): rows of a prompt and two answers to it, the `chosen` and the
`rejected`, as TRL's preference datasets hold them -> a pair of examples per row -> padded batches of pairs.

A row is one of (TRL's standard and conversational forms):
- text: `prompt`, `chosen`, `rejected` strings. Each answer is tokenized as data.format completion tokenizes
  `{prompt, completion}`: the prompt, then the answer and EOS, the loss on the answer; an answer that ends with the
  EOS's text gets none more, as in TRL's trainers (`one_eos`).
- a conversation: `prompt` a list of messages, `chosen` and `rejected` lists of messages (or strings: one assistant
  message each). Each answer is the prompt's conversation continued, rendered by the chat template as data.format
  chat renders it; the loss is on the answer's assistant turns only (the prompt's own assistant turns are context).
- a conversation without `prompt` (TRL's implicit prompt, Anthropic HH's form): `chosen` and `rejected` whole
  conversations; the messages they open with alike are the prompt.

The two examples of a pair are stored one after the other (chosen at 2i, rejected at 2i + 1) in one `Examples`,
whose digest and cache work as for any data; `Pairs` reads them as pairs. A pair is kept or dropped whole: a row
with no target left of either answer after data.max_length, or (data.truncation: drop) either answer cut.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from peftkit.data.batches import Collator
from peftkit.data.bad_rows import usable_row
from peftkit.data.conversations import check_chat_tokenizer
from peftkit.data.examples import (BuiltExample, _built_examples, _TargetCuts, check_eos, no_examples_error,
                                   truncation_error, without_eos)
from peftkit.data.formats import (TRAIN, TRAIN_KEYS, SystemPrompt, _row_problem, _with_call_arguments, _with_system,
                                  _without_empty_calls, format_rows)
from peftkit.data.rows import Locations, row_location
from peftkit.data.sources import mix_name, read_rows
from peftkit.data.stored import Example, Examples
from peftkit.errors import PeftkitError
from peftkit.recipe import DataConfig, is_hub_dataset, is_local_dataset

ANSWERS = ("chosen", "rejected")
TEXT_FIELDS = "prompt, chosen and rejected"
"""The fields of a text pair, whose answers end with EOS (a conversation's end with its template's end of turn)."""


def split_pair(row: dict) -> tuple[str, list[dict]] | str:
    """(the format each answer is read in, `completion` or `chat`, [the chosen answer's row, the rejected's]) of a
    preference row, or what makes it unusable (in the row's own words: `chosen[1].content`)."""
    prompt, answers = row.get("prompt"), [row.get(k) for k in ANSWERS]
    for key, value in zip(ANSWERS, answers, strict=True):
        if value is None:
            return f"missing field '{key}'"
    if not (isinstance(prompt, list) or any(isinstance(a, list) for a in answers)):  # text
        if prompt is None:
            return ("missing field 'prompt' (a pair of text answers needs the prompt they answer; a conversation "
                    "may leave it out, its opening messages alike being the prompt)")
        for key, value in (("prompt", prompt), *zip(ANSWERS, answers, strict=True)):
            if not isinstance(value, str):
                return f"field '{key}' must be a string, got {type(value).__name__}"
        if answers[0] == answers[1]:
            return "'chosen' and 'rejected' are the same answer, which teaches nothing"
        rows = [{"prompt": prompt, "completion": a} for a in answers]
        for key, r in zip(ANSWERS, rows, strict=True):
            if problem := _row_problem(r, "completion"):
                return problem.replace("'completion'", f"'{key}'")
        return "completion", rows
    return _conversation_pair(row, prompt, answers)


def _conversation_pair(row: dict, prompt: object, answers: list) -> tuple[str, list[dict]] | str:
    """`split_pair` of a row whose prompt or answers are messages."""
    answers = [[{"role": "assistant", "content": a}] if isinstance(a, str) else a for a in answers]
    for key, value in (("prompt", prompt), *zip(ANSWERS, answers, strict=True)):
        if value is not None and not (isinstance(value, list) and all(isinstance(m, dict) for m in value)):
            return f"field '{key}' must be a list of {{role, content}} messages (or, for an answer, a string)"
    if prompt is None:  # the implicit prompt: the messages both open with
        shared = next((i for i, (a, b) in enumerate(zip(*answers)) if a != b), min(map(len, answers)))
        if not shared:
            return ("'chosen' and 'rejected' share no opening message to be the prompt; give the prompt in field "
                    "'prompt', or open both conversations with it")
        prompt, answers = answers[0][:shared], [a[shared:] for a in answers]
    if answers[0] == answers[1]:
        return "'chosen' and 'rejected' are the same answer, which teaches nothing"
    for key, answer in zip(ANSWERS, answers, strict=True):
        if not any(m.get("role") == "assistant" for m in answer):
            return f"'{key}' has no assistant message after the prompt: nothing of it to learn"
    context = [{k: v for k, v in m.items() if k not in TRAIN_KEYS} | ({TRAIN: False} if m.get("role") == "assistant"
                                                                        else {}) for m in prompt]
    extra = {k: row[k] for k in ("tools",) if row.get(k) is not None}
    rows = [_with_call_arguments(_without_empty_calls({"messages": context + answer} | extra)) for answer in answers]
    for key, r in zip(ANSWERS, rows, strict=True):
        if problem := _row_problem(r, "chat"):
            return _in_row_words(problem, len(context), key, row)
    return "chat", rows


def _in_row_words(problem: str, opening: int, key: str, row: dict) -> str:
    """A chat problem of a pair's answer row (`messages[3].content`) in the preference row's words
    (`chosen[1].content`, `prompt[0].role`)."""
    explicit = row.get("prompt") is not None

    def name(match: re.Match) -> str:
        i = int(match.group(1))
        if i < opening:
            return f"prompt[{i}]" if explicit else f"{key}[{i}]"
        return f"{key}[{i - opening if explicit else i}]"
    return re.sub(r"messages\[(\d+)\]", name, problem).replace("'messages'", f"'{key}'")


def pair_problem(row: dict) -> str | None:
    """What makes a preference row unusable (`peftkit.data.formats._row_problem`'s, for data.format preference)."""
    split = split_pair(row)
    return split if isinstance(split, str) else None


class Pairs(Sequence):
    """A preference dataset's examples as pairs: item i is (chosen, rejected, their reference log-probabilities or
    None), from `examples` 2i and 2i + 1. `reference` ((pairs, 2) float32: the base model's summed log-probabilities
    of each answer, `peftkit.preference.reference_logps`) is set before training starts."""

    def __init__(self, examples: Examples) -> None:
        self.examples = examples
        self.reference: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.examples) // 2

    def __getitem__(self, i: int) -> tuple[Example, Example, torch.Tensor | None]:  # type: ignore[override]
        i = range(len(self))[i]
        return (self.examples[2 * i], self.examples[2 * i + 1],
                None if self.reference is None else self.reference[i])

    def lengths(self) -> list[int]:
        """Each pair's longer answer's token count (data.group_by_length groups pairs by it)."""
        lengths = self.examples.lengths()
        return [max(lengths[i], lengths[i + 1]) for i in range(0, len(lengths), 2)]

    @property
    def task_ids(self) -> list[int | None]:
        """Each pair's task id (its answers'; None without one): multitask prompt tuning's."""
        return [self.examples[2 * i].task_id for i in range(len(self))]

    def collator(self, pad_id: int) -> PairCollator:
        """What makes batches of these pairs."""
        return PairCollator(pad_id)


class PairCollator:
    """Right-pads a list of pairs to their longest answer: rows chosen, rejected, chosen, rejected, ... (a pair's two
    rows together, so that a process's slice of the batch holds whole pairs), and each row's reference
    log-probability (`reference_logps`) where the pairs have one."""

    def __init__(self, pad_id: int) -> None:
        self.rows = Collator(pad_id)

    def __call__(self, pairs: list[tuple[Example, Example, torch.Tensor | None]]) -> dict[str, torch.Tensor]:
        batch = self.rows([e for chosen, rejected, *_ in pairs for e in (chosen, rejected)])
        if pairs and pairs[0][2] is not None:
            batch["reference_logps"] = torch.stack([ref for _, _, ref, *_ in pairs]).flatten()
        return batch


def load_pairs(tok, source: str | list, split: str | None, cfg: DataConfig,
               cache: bool = True, tasks: bool = False) -> tuple[Pairs, dict]:
    """The pairs of `source` (one path or hub id at `split`, or data.train's list, read as
    `peftkit.data.loading.load_examples` reads rows) and their counts, the keys `describe_stats` prints (an example
    is a pair). With `cache`, local files' are read from the tokenized-data cache where they are there
    (`peftkit.data.cache`: keyed by data.format preference too), and kept there when not. `tasks`: read each row's
    `task` as both its answers' (`peftkit.data.examples.build_examples`' `tasks`)."""
    from peftkit.data.cache import kept_warnings

    entry, parts = local_entry(tok, source, split, cfg, cache, tasks)
    # (the cache counts the examples it holds, two a pair)
    if entry is not None and (hit := entry.read()) is not None:
        return Pairs(hit[0]), hit[1] | {"examples": len(hit[0]) // 2}
    with kept_warnings() as said:
        pairs, stats = _tokenized_pairs(tok, source, split, cfg, tasks)
    keep_entry(entry, parts, cfg, pairs.examples, stats | {"examples": len(pairs.examples), "warnings": said})
    return pairs, stats


def local_entry(tok, source: str | list, split: str | None, cfg: DataConfig, cache: bool, tasks: bool,
                chunk: int | None = None) -> tuple[object | None, list[tuple]]:
    """(the tokenized-data cache's entry (`peftkit.data.cache.ExampleCache`) of pairs, or of unpaired answers made
    within runs of `chunk` rows, read from local files: None for a hub dataset, without `cache`, or with the cache
    off; the datasets it is of, for `keep_entry` to check that their files did not change while they were read)."""
    from peftkit.data.cache import cache_root
    from peftkit.data.loading import cache_entry, data_digests

    parts = [(source, split, cfg.columns, None)] if isinstance(source, str) else \
        [(entry.path, entry.split, entry.columns, None) for entry in cfg.train_sources()]
    local = all(not is_hub_dataset(path) and is_local_dataset(path) for path, *_ in parts)
    root = cache_root() if cache and local else None
    if root is None:
        return None, parts
    name = source if isinstance(source, str) else mix_name(cfg)
    return cache_entry(root, tok, data_digests(parts, cfg), cfg, tasks, name, chunk), parts


def keep_entry(entry, parts: list[tuple], cfg: DataConfig, examples: Examples, stats: dict) -> None:
    """Keep `examples` and `stats` in `local_entry`'s `entry` (None: nothing) unless a file of `parts` changed
    since the entry was keyed (then the examples may be of neither content)."""
    from peftkit.data.loading import data_digests

    if entry is not None and data_digests(parts, cfg) == entry.digests:
        entry.write(examples, stats)


def _tokenized_pairs(tok, source: str | list, split: str | None, cfg: DataConfig,
                     tasks: bool) -> tuple[Pairs, dict]:
    """`load_pairs` of the rows themselves."""
    built, stats, name, line_numbers = build_pairs(tok, source, split, cfg, tasks)
    pairs, cuts = kept_pairs(built, cfg, stats)
    if cfg.truncation == "error" and cuts.first is not None:
        raise PeftkitError(truncation_error(cuts, cfg))
    if not pairs:
        raise PeftkitError(no_examples_error(stats, cfg, name, 0, line_numbers))
    return pairs, stats


def build_pairs(tok, source: str | list, split: str | None, cfg: DataConfig,
                tasks: bool = False) -> tuple[list[tuple[BuiltExample, BuiltExample]], dict, str, object]:
    """(each usable row's chosen and rejected answer tokenized and cut, as `BuiltExample`s, before data.truncation
    decides; the counts so far; the data's name and line numbers, for `no_examples_error`). A bad row raises under
    data.on_bad_rows: error, naming its FILE:LINE (`peftkit preview` shows the pairs `load_pairs` trains). `tasks`:
    each row's `task` is both its answers' (multitask prompt tuning)."""
    rows, skipped, line_numbers, name = read_rows(source, split, cfg)
    stats = new_stats(len(rows), skipped)
    where = [row_location(name, i, line_numbers) for i in range(len(rows))]
    split_rows, kept, fmt, first = [], [], None, None
    for row, at in zip(rows, where, strict=True):
        split = usable_split(tok, row, cfg, at)  # (a good row's split once, not checked first)
        if split is None:  # a bad row: said under data.on_bad_rows: error (naming it), else skipped
            stats["bad_rows"] += 1
            continue
        kind, pair = split
        if fmt is not None and kind != fmt:  # (data.train's list: the first pair may be another dataset's)
            raise PeftkitError(f"{at}: a pair of {'conversations' if kind == 'chat' else 'text answers'}, and the "
                               f"first pair ({first}) is of {'conversations' if fmt == 'chat' else 'text answers'}; "
                               "give every row the same form (every dataset's, where data.train lists several)")
        fmt, first = kind, first or at
        if kind == "chat":
            _count_special_messages(tok, row, ("prompt", *ANSWERS), at, stats, opening_system_prompt(cfg, pair[0]))
        task = {"task": row["task"]} if tasks and "task" in row else {}  # (row_task checks it as the answers build)
        split_rows.append((at, [answer | task for answer in pair]))
        kept.append(row)
    stats["form"] = fmt  # (manifest.json's data_form: `generate --prompt` reads it where the rows are a hub dataset's)
    if not split_rows:
        return [], stats, name, line_numbers
    if fmt == "completion" and (key := next((k for k in ("system_prompt", "chat_template") if getattr(cfg, k)), None)):
        raise PeftkitError(f"data.{key}: {name} holds text pairs (prompt, chosen and rejected strings), which no chat "
                           f"template renders, so data.{key} would be ignored; remove it, or give the pairs as "
                           "conversations (prompt, chosen and rejected as lists of messages)")
    if fmt == "completion":
        check_eos(tok, cfg.format, cfg._format_key, TEXT_FIELDS)
        _count_doubled_specials(tok, split_rows, stats)
        split_rows = [(at, [one_eos(tok, answer) for answer in pair]) for at, pair in split_rows]
    elif fmt == "chat":  # (conversations: said as this format's, not as data.format chat's)
        check_chat_tokenizer(tok, cfg._format_key, (cfg.format, TEXT_FIELDS))
    own = cfg.model_copy(update={"format": fmt, "columns": {}})
    answers = format_rows([r for _, pair in split_rows for r in pair], own)
    if fmt == "chat":  # (the default system prompt's warning, as `count_examples` counts conversations)
        _count_default_system_prompts(tok, answers[::2], stats)
    doubled = Locations(at for at, _ in split_rows for _ in ANSWERS)
    doubled.parts = []
    built = list(_built_examples(tok, answers, own, name, doubled, range(len(answers)), tasks))
    if fmt == "chat":  # (once built: a row whose system message the template refuses is an error naming it first)
        for (at, _), row, i in zip(split_rows, kept, range(0, len(answers), 2), strict=True):
            _count_left_out(tok, answers[i:i + 2], ANSWERS, at, stats, row)
    return list(zip(built[::2], built[1::2], strict=True)), stats, name, line_numbers


def usable_split(tok, row: object, cfg: DataConfig, at: str) -> tuple[str, list[dict]] | None:
    """`split_pair` of a usable row; None for a bad one (`split_pair`'s problem, or a text pair's answers alike but for
    the EOS's text, which needs the tokenizer), which raises under data.on_bad_rows: error, naming `at`."""
    split = split_pair(row) if isinstance(row, dict) else None
    alike = _alike_but_for_eos(tok, split)
    if not isinstance(split, tuple) or alike:
        usable_row(row, cfg, at, found=alike)
        return None
    return split


def check_pairs(tok, source: str | list, split: str | None, cfg: DataConfig) -> None:
    """The bad rows `build_pairs` refuses under data.on_bad_rows: error, in its words (FILE:LINE), read but not
    tokenized: `peftkit validate`'s check of `source` (data.train, or a set of data.eval's, as train reads it)."""
    if cfg.on_bad_rows == "skip":
        return
    rows, _, line_numbers, name = read_rows(source, split, cfg)
    for i, row in enumerate(rows):
        usable_split(tok, row, cfg, row_location(name, i, line_numbers))


def eos_alike(tok, row: object) -> str | None:
    """Why a preference row is no pair once the tokenizer is known (`_alike_but_for_eos`), or None: the problem a
    reader of rows as prompts (`peftkit.data.prompts.load_prompts`) hands `usable_row` as train does."""
    return _alike_but_for_eos(tok, split_pair(row)) if isinstance(row, dict) else None


def _alike_but_for_eos(tok, split: tuple | str | None) -> str | None:
    """Why a text pair (`split_pair`'s) whose answers differ only by the EOS's text one ends with (`4</s>` and `4`) is
    no pair: each is scored through one EOS (`one_eos`), so the two are the same answer, as `split_pair` refuses
    answers that are equal; None for any other."""
    if not isinstance(split, tuple) or split[0] != "completion":
        return None
    chosen, rejected = (one_eos(tok, answer)["completion"] for answer in split[1])
    if chosen != rejected:
        return None
    return (f"'chosen' and 'rejected' are the same answer once the EOS's text '{tok.eos_token}' one of them ends with "
            "is taken off (each is scored through one EOS), which teaches nothing")


def _count_default_system_prompts(tok, chosen: list[dict], stats: dict) -> None:
    """Conversation pairs without a system message (`chosen`: each pair's chosen answer's row, data.system_prompt
    given), and the tokens the chat template's default system prompt adds to each (SmolLM2's 'You are a helpful AI
    assistant named SmolLM, ...': 20), in `stats` as `count_examples` counts SFT conversations: `describe_stats` warns
    where they take a quarter of data.max_length."""
    from peftkit.data.checks import injected_system_tokens

    stats["system_prompt_rows"] = sum(row["messages"][0]["role"] != "system" for row in chosen)
    if stats["system_prompt_rows"]:
        stats["system_prompt_tokens"] = injected_system_tokens(tok)


def one_eos(tok, row: dict) -> dict:
    """A text answer's row (`{prompt, completion}`) without the EOS text its answer ends with, which peftkit appends
    to every answer (`peftkit.data.examples.without_eos`, as for an SFT completion): an answer rendered by hand
    (`"30</s>"`, ChatML's `...<|im_end|>`) is scored through one EOS, as TRL's DPOTrainer, KTOTrainer and
    RewardTrainer (the text's end) and CPOTrainer and ORPOTrainer (the tokens') append none to it. Only the very end
    is taken: an answer ending `</s>\n` gets a second, as there (said as two EOS, `_count_doubled_specials`)."""
    return row | {"completion": without_eos(tok, row["completion"])}


def _count_doubled_specials(tok, split_rows: list[tuple[str, list[dict]]], stats: dict,
                            keys: tuple[str, ...] = ANSWERS) -> None:
    """Text pairs whose answer, without the one EOS `one_eos` takes off, still ends with the EOS's text (`30</s></s>`,
    `30</s>\n`: peftkit appends one more, as TRL's trainers do), or whose prompt begins with the BOS the tokenizer
    puts in front too, counted in `stats` as `count_examples` counts such SFT rows (the same warning). `keys`: the
    answers' fields in the row (KTO's unpaired row: its `completion`)."""
    from peftkit.data.checks import special_tokens_in

    for at, pair in split_rows:
        for key, answer in zip(keys, pair, strict=True):
            if found := special_tokens_in(tok, answer, "completion", []):
                said = found.replace("field 'completion'", f"field '{key}'")  # (the pair's own words)
                stats["special_text_rows"] += 1
                stats["special_text_first"] = stats["special_text_first"] or f"{at}: {said}"
                break


def opening_system_prompt(cfg: DataConfig, conversation: dict) -> str | None:
    """data.system_prompt where it opens `conversation` (an answer's row, `{messages}`: one without a system message
    of its own, as `format_rows` puts it there), else None."""
    if cfg.system_prompt is None:
        return None
    return cfg.system_prompt if isinstance(_with_system(conversation, cfg.system_prompt)["messages"][0],
                                           SystemPrompt) else None


def _count_special_messages(tok, row: dict, keys: tuple[str, ...], at: str, stats: dict,
                            system: str | None = None) -> None:
    """A conversation row (a pair's, KTO's) with the text of a special token in a message ('<|im_end|>' typed into a
    turn, which the tokenizer encodes as the end of that turn), counted in `stats` as `count_examples` counts such SFT
    conversations (the same warning), in the row's words (`chosen[1].content`; an answer given as a string: its
    field). `keys`: the row's fields of messages. `system`: data.system_prompt where it opens the row's conversation
    (`opening_system_prompt`), looked at first and named as SFT names it (`data.system_prompt holds '<|im_end|>'`)."""
    from peftkit.data.checks import special_tokens_in

    opening = [SystemPrompt(role="system", content=system)] if system is not None else []
    if opening and (found := special_tokens_in(tok, {"messages": opening}, "chat", [])):
        stats["special_text_rows"] += 1
        stats["special_text_first"] = stats["special_text_first"] or f"{at}: {found}"
        return
    for key in keys:
        value = row.get(key)
        messages = [{"role": "assistant", "content": value}] if isinstance(value, str) else value or []
        if found := special_tokens_in(tok, {"messages": messages}, "chat", []):
            said = (found.replace("messages[0].content", f"field '{key}'", 1) if isinstance(value, str)
                    else found.replace("messages[", f"{key}[", 1))
            stats["special_text_rows"] += 1
            stats["special_text_first"] = stats["special_text_first"] or f"{at}: {said}"
            return


def _count_left_out(tok, answers: list[dict], keys: tuple[str, ...], at: str, stats: dict, row: dict) -> None:
    """A conversation row (a pair's, KTO's) whose system message the chat template leaves out of an answer's rendering
    (`peftkit.data.examples.left_out`: Mistral v0.3's writes it into the last user turn only), counted in `stats` as
    `count_examples` counts such SFT conversations (the same warning), named in the row's words (`prompt[0]`, or
    `data.system_prompt`). `answers`: the row's answers' conversations as built (data.system_prompt in place), one a
    key of `keys`; `row`: the row's fields (its `prompt`, the messages the answers' conversations open with)."""
    from peftkit.data.examples import left_out

    opening = len(row["prompt"]) if isinstance(row.get("prompt"), list) else 0
    for key, answer in zip(keys, answers, strict=True):
        if left := left_out(tok, answer):
            stats["dropped_message_rows"] += 1
            said = _in_row_words(left, opening, key, row)
            stats["dropped_message_first"] = stats["dropped_message_first"] or f"{at}: {said}"
            return


def new_stats(rows: int, bad_rows: int) -> dict:
    """The counts `describe_stats` prints, before any row is built (of preference pairs, of unpaired answers), and
    the rows' `form` (`chat`: conversations, `completion`: text), once read."""
    return {"rows": rows, "bad_rows": bad_rows, "too_long": 0, "truncated": 0, "target_cut": 0,
            "truncation_dropped": 0, "system_prompt_rows": 0, "system_prompt_tokens": 0, "special_text_rows": 0,
            "special_text_first": None, "turn_ends_unmarked": False, "dropped_message_rows": 0,
            "dropped_message_first": None, "examples": 0, "form": None}


def kept_pairs(built: list[tuple[BuiltExample, BuiltExample]], cfg: DataConfig,
               stats: dict) -> tuple[Pairs, _TargetCuts]:
    """The pairs of `build_pairs` that train (data.max_length, data.truncation), counted in `stats`, and the
    answers that lost their target's end."""
    examples, cuts = Examples(), _TargetCuts()
    for chosen, rejected in built:
        if _keep(chosen, rejected, cfg, stats, cuts):
            examples.append(chosen.example)
            examples.append(rejected.example)
    stats["examples"] = len(examples) // 2
    return Pairs(examples), cuts


def _keep(chosen, rejected, cfg: DataConfig, stats: dict, cuts: _TargetCuts) -> bool:
    """Whether a pair's two answers (`BuiltExample`s) are trained, counted in `stats` as one example."""
    stats["truncated"] += chosen.truncated or rejected.truncated
    lost = next((b for b in (chosen, rejected) if b.target_lost), None)
    if chosen.no_target or rejected.no_target:  # dropped under every setting; `error` names it too, as any example
        stats["too_long"] += 1
        if lost is not None:
            cuts.add(lost)
        return False
    if lost is not None:
        stats["target_cut"] += 1
        cuts.add(lost)
        if cfg.truncation == "drop":
            stats["truncation_dropped"] += 1
            return False
    return True


__all__ = ["ANSWERS", "PairCollator", "Pairs", "build_pairs", "check_pairs", "eos_alike", "kept_pairs", "load_pairs",
           "one_eos", "pair_problem", "split_pair", "usable_split"]
