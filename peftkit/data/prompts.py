"""Prompts of data rows, for generation: the same prompt tokens training built for each row, and the row's
reference answer (its target), so that what a model generates can be set beside what it was taught.

- `alpaca` / `completion`: the prompt part of the row, tokenized as training tokenizes it (BOS and all).
- `chat`: the conversation up to its last trained assistant turn (one not marked `"train": false`, as the loss
  has it), rendered by the chat template with the generation prompt (`<|im_start|>assistant\\n`); the reference is
  that turn. A row with no trained turn (every answer marked false, under data.train_on: all) has no prompt.
- `text` has no prompt: every token is target.
- `tokenized`: the ids before the row's last run of trained tokens, as they are; that run, as answers are scored
  (`_ids_prompt`), the reference.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from peftkit.data.conversations import render_chat, trained_turns, turn_end_token
from peftkit.data.bad_rows import all_skipped, bad_rows_fix, row_problem, usable_row
from peftkit.data.examples import (BuiltExample, _TargetCuts, build_examples, encode_prompt, located, loss_keeps,
                                   prompt_and_target_text, row_location, row_task, truncation_error, without_eos)
from peftkit.data.formats import format_rows
from peftkit.data.rows import load_rows
from peftkit.data.stored import IGNORE_INDEX
from peftkit.data.tokenized import MASKS, ids_and_labels, prompt_and_answer, vocabulary_problem
from peftkit.data.unpaired import OneForm, compose, eos_only, split_unpaired
from peftkit.errors import PeftkitError, PeftkitWarning
from peftkit.recipe import DataConfig


@dataclass
class Prompt:
    ids: list[int]
    """Token ids, as training builds the prompt part of the example."""
    text: str
    """The prompt as text (the chat template's rendering for `chat`)."""
    reference: str | None = None
    """The row's target: what the model was taught to answer."""
    task_id: int | None = None
    """The row's `task` (multitask prompt tuning's task id), or `--task`'s: `peftkit.task_ids`."""
    row: dict | None = field(default=None, repr=False)
    """The data row it came from (`peftkit generate --route` reads a column of it)."""
    where: str | None = field(default=None, repr=False)
    """That row's place in its data (`FILE:LINE`, `row_location`): a skipped row before it leaves its index behind."""


class Prompts(list):
    """`load_prompts`' prompts, with `left_out`: the usable rows left out as the loss leaves them out (`as_loss`)."""

    def __init__(self, items=(), left_out: int = 0):
        super().__init__(items)
        self.left_out = left_out


@dataclass
class LossRows:
    """Which rows generation metrics answer (`load_prompts(as_loss=True)`): those the loss scores, so that the metrics
    and the loss cover the same examples. A row is answered where the loss keeps its example (`loss_keeps`: some
    target token within data.max_length, and under data.truncation: drop, the target's end too) and the answer asked
    for begins within data.max_length (a conversation's earlier answers can keep an example whose last answer, the one
    asked for, lies past it). Under data.truncation: error, a cut target stops it as it stops the loss."""

    cfg: DataConfig
    cuts: _TargetCuts = field(default_factory=_TargetCuts)
    left_out: int = 0

    def answers(self, prompt: Prompt, built: BuiltExample) -> bool:
        if built.target_lost:
            self.cuts.add(built)
        if loss_keeps(built, self.cfg) and len(prompt.ids) < self.cfg.max_length:
            return True
        self.left_out += 1
        return False

    def check(self) -> None:
        """The loss's data.truncation: error, where a row's target was cut."""
        if self.cfg.truncation == "error" and self.cuts.first is not None:
            raise PeftkitError(truncation_error(self.cuts, self.cfg))


def left_out_text(left_out: int, max_length: int) -> str:
    """`N rows left out ...`: what `load_prompts(as_loss=True)`'s `left_out` means, for a message."""
    return (f"{left_out} row{'s' * (left_out != 1)} left out, as the loss leaves {'them' if left_out != 1 else 'it'} "
            f"out: the answer asked for lies past max_length {max_length}, or (truncation: drop) is cut short of its "
            "end")


NO_TEMPLATE_FIX = "drop --chat (the prompt is then used as it is), or use a model whose tokenizer has a template"
"""The way out `generate --chat` offers for a tokenizer without a chat template (`chat_prompt`'s `fix`)."""


def chat_prompt(tok, messages: list[dict], fix: str = NO_TEMPLATE_FIX, tools: list[dict] | None = None) -> Prompt:
    """A conversation rendered by the chat template with the generation prompt (and `tools`, the tool schemas);
    without a template, an error ending in `fix`: what the command that asked can do instead."""
    if not getattr(tok, "chat_template", None):
        raise PeftkitError(f"This tokenizer has no chat_template, so there is no chat format to render: {fix}.")
    text = render_chat(tok, messages, add_generation_prompt=True, tools=tools)
    return Prompt(tok(text, add_special_tokens=False)["input_ids"], text)


def text_prompt(tok, text: str) -> Prompt:
    """A plain prompt, tokenized as training tokenizes a prompt (the tokenizer's special tokens added)."""
    return Prompt(encode_prompt(tok, text), text)


def row_prompt(tok, row: dict, fmt: str, train_on: str = "answers", targets: bool = True) -> Prompt | None:
    """The prompt and reference of one valid row of format `fmt`; for a chat row, of its last assistant turn that
    `train_on` and the turns' marks train (`answer_turn`), None where none is."""
    if fmt == "tokenized":
        return _ids_prompt(tok, row, targets)
    if fmt == "chat":
        messages, tools = row["messages"], row.get("tools")
        last = answer_turn(messages, train_on, targets)
        if last is None:
            return None
        prompt = chat_prompt(tok, messages[:last], "use a model whose tokenizer has a template, or data in another "
                             "format (--format alpaca, completion or text)", tools)
        prompt.reference = (_tool_calls_text(tok, messages[:last + 1], prompt.text, tools)
                            if messages[last].get("tool_calls") else messages[last]["content"])
        return prompt
    text, target = prompt_and_target_text(row, fmt)
    prompt = text_prompt(tok, text)
    prompt.reference = target if target is None else without_eos(tok, target)  # (what is trained before the EOS)
    return prompt


def _ids_prompt(tok, row: dict, targets: bool = True) -> Prompt:
    """A tokenized row's prompt: its ids before its last run of trained tokens, given to generation as they are (no
    text in between to tokenize again), that run decoded the reference. Without `targets` (`peftkit generate --data`:
    rows as prompts), a row without labels, or none trained, is a prompt whole. The reference is the run as an
    answer is to be scored: up to its first token generation stops at (EOS, the chat template's end of turn), with
    model.add_tokens' markers (`marked_text`): decoded without them, an answer that was the run token for token
    scored 0."""
    from peftkit.decoding import marked_text  # (it imports this module)

    if problem := vocabulary_problem(row, len(tok)):
        raise PeftkitError(problem)
    ids, labels = ids_and_labels(row)
    marked = any(row.get(key) is not None for key in ("labels", *MASKS))  # (TRL's masks: the labels they stand for)
    asked = targets or (marked and any(x != IGNORE_INDEX for x in labels))
    prompt, answer = prompt_and_answer(ids, labels) if asked else (ids, None)
    if answer is not None:
        stops = {tok.eos_token_id, turn_end_token(tok)} - {None}
        answer = marked_text(tok, answer[:next((i for i, t in enumerate(answer) if t in stops), len(answer))])
    return Prompt(prompt, tok.decode(prompt), answer)


def _prompt_of(tok, row: dict, cfg: DataConfig, targets: bool) -> Prompt | None:
    """`row_prompt` of a valid row of `cfg`'s format; a preference pair's is its prompt, asked as its chosen answer's
    example is built (a completion's prompt, or the conversation before the answer), the chosen answer the reference."""
    if cfg.format == "unpaired":  # its prompt, its answer the reference (desirable or not: as the row says)
        kind, parts, _ = split_unpaired(row)
        answer = format_rows([compose(kind, parts)], cfg.model_copy(update={"format": kind, "columns": {}}))[0]
        return row_prompt(tok, answer, kind, cfg.train_on, targets)
    if cfg.format != "preference":
        return row_prompt(tok, row, cfg.format, cfg.train_on, targets)
    from peftkit.data.preference import split_pair

    kind, (chosen, _) = split_pair(row)
    chosen = format_rows([chosen], cfg.model_copy(update={"format": kind, "columns": {}}))[0]  # (data.system_prompt)
    return row_prompt(tok, chosen, kind, cfg.train_on, targets)


def answer_turn(messages: list[dict], train_on: str, targets: bool = True) -> int | None:
    """The assistant turn a chat row is asked up to and answers: the last one the loss trains (`trained_turns`: the
    last not marked `"train": false` / `weight: 0`, whatever `train_on`), not a turn given as context; None where
    none is trained (every answer marked false: a bad row, but under data.train_on: all, whose other turns train).
    Without `targets` (`peftkit generate --data`: rows as prompts), the last assistant turn where none is trained."""
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    trained = trained_turns(messages, answers, train_on) or ([] if targets else answers)
    return trained[-1] if trained else None


def _tool_calls_text(tok, messages: list[dict], prompt: str, tools: list[dict] | None) -> str:
    """The reference of a last assistant turn that calls tools: the template's text of the calls, what training
    teaches the model to write after `prompt` (up to its end-of-turn marker, where generation stops)."""
    through = render_chat(tok, messages, tools=tools)
    if not through.startswith(prompt):
        raise PeftkitError("the chat template renders the tool calls of the last assistant turn in a way that does not "
                           "follow the generation prompt, so there is no reference text to score answers against. Use "
                           "a template whose renderings of a conversation's beginnings are prefixes of the whole.")
    turn = through[len(prompt):].rstrip()
    end = turn_end_token(tok)
    marker = tok.decode([end]) if end is not None else ""
    return turn[:-len(marker)] if marker and turn.endswith(marker) else turn


def load_prompts(tok, source: str, split: str, cfg: DataConfig, limit: int | None = None,
                 skip_empty: bool = False, *, tasks: bool = False, targets: bool = True,
                 as_loss: bool = False) -> Prompts:
    """The prompts of the rows of `source` (the first `limit`), bad rows handled as data.on_bad_rows says. A row
    whose prompt has no tokens is an error, or left out with `skip_empty` (eval.samples: a training row may have
    no prompt). `tasks`: read the rows' `task` column (a model whose method reads task ids). `targets`: a row's
    answer, the reference, must not be empty (False: `peftkit generate --data`, where the rows may be prompts only).
    `as_loss` (generation metrics): only the rows the loss scores (`LossRows`), the others counted in `left_out`."""
    if cfg.format == "classification":
        raise PeftkitError(f"{cfg._format_key} 'classification' has no prompt to generate from in {source}: a "
                           "classifier predicts a label (peftkit eval reports accuracy and macro_f1). Use data in the "
                           "alpaca, completion or chat format (with peftkit generate, --prompt also works).")
    if cfg.format == "text":
        raise PeftkitError(f"{cfg._format_key} 'text' has no prompt to generate from in {source} (every token is "
                           "target). Use data in the alpaca, completion or chat format (with peftkit generate, --prompt "
                           "also works; with peftkit eval, so does leaving out the generation metrics).")
    rows, skipped, line_numbers = load_rows(source, split, cfg.on_bad_rows, cfg.revision, bad_rows_fix(cfg, "skip"))
    rows = format_rows(rows, cfg)
    prompts, checked, bad, untrained = Prompts(), False, skipped, 0
    built = build_examples(tok, rows, cfg, source, line_numbers) if as_loss else None  # the loss's examples
    scored, forms = LossRows(cfg), OneForm() if cfg.format == "unpaired" else None
    for i, row in enumerate(rows):
        if limit is not None and len(prompts) >= limit:
            break
        where = row_location(source, i, line_numbers)
        usable = usable_row(row, cfg, where, targets, problem=_past_vocabulary(tok, row, cfg, targets),
                            found=_pair_alike(tok, row, cfg))
        bad += not usable  # a bad row skipped under on_bad_rows: skip (under error, it raised)
        example = next(built) if built is not None else None  # (every row's, None for a bad one: in step)
        if usable and forms is not None:  # a KTO row's form, the first row's (as train has it)
            forms.check(split_unpaired(row)[0], where)
        if usable:
            prompt = located(where, _prompt_of, tok, row, cfg, targets)
            if prompt is None:  # no trained answer to ask for, nor to score against (its loss has none either)
                untrained += 1
                continue
            if example is not None and not scored.answers(prompt, example):
                continue
            if not prompt.ids and skip_empty:
                continue
            if not prompt.ids and cfg.format == "tokenized":
                raise PeftkitError(f"{where}: its first token is trained (no labels, or a label on input_ids[0]), so "
                                   "there is no prompt to generate from: the prompt is the ids before the last run of "
                                   "trained tokens. Mask the prompt's labels (-100); a loss-only eval needs none.")
            if not prompt.ids:
                raise PeftkitError(f"{where}: its prompt is empty, and this tokenizer adds no BOS token, so there is "
                                   "nothing to generate from. Give the row a prompt (a loss-only eval needs none).")
            prompt.task_id, prompt.row, prompt.where = row_task(row, where) if tasks else None, row, where
            prompts.append(prompt)
            if cfg.format == "chat" and len(prompts) <= CHAT_PROMPTS_CHECKED:
                checked = checked or _warn_if_not_as_trained(tok, row, prompt, where)
    scored.check()
    prompts.left_out = scored.left_out
    if not prompts and not skip_empty:
        why = [all_skipped(bad, cfg)] if bad else []
        if untrained:
            why.append(f"every assistant turn of {untrained} conversation{'s' * (untrained > 1)} is marked not to be "
                       "trained, so there is no answer to ask for")
        if scored.left_out:
            why.append(f"{left_out_text(scored.left_out, cfg.max_length)}; raise data.max_length (--max-length)")
        raise PeftkitError(f"No usable rows in {source} to take prompts from{': ' + '; '.join(why) if why else ''}.")
    return prompts


def _past_vocabulary(tok, row: object, cfg: DataConfig, targets: bool) -> str | None:
    """A well-formed tokenized row's id past the tokenizer's (`vocabulary_problem`), a bad row as the loss's examples
    take it (`build_examples`), or None."""
    if cfg.format != "tokenized" or row_problem(row, cfg.format, targets) is not None:
        return None
    return vocabulary_problem(row, len(tok))


def _pair_alike(tok, row: object, cfg: DataConfig) -> str | None:
    """A preference row's answers alike but for the EOS's text (`peftkit.data.preference.eos_alike`), or a KTO row's
    answer of the EOS's text alone (`peftkit.data.unpaired.eos_only`), a bad row as train takes it, or None."""
    if cfg.format == "unpaired":
        return eos_only(tok, row)
    if cfg.format != "preference":
        return None
    from peftkit.data.preference import eos_alike

    return eos_alike(tok, row)


CHAT_PROMPTS_CHECKED = 16
"""Chat rows whose generation prompt is compared with what training puts before the answer (a template's habit)."""


def _warn_if_not_as_trained(tok, row: dict, prompt: Prompt, where: str) -> bool:
    """Warn (and return True) when the chat template's generation prompt is not the token prefix training has before
    the row's last answer: DeepSeek-R1's opens a `<think>` block the turns lack, Mistral v0.3's moves the system
    message into the last user turn, a prompt ending in a space gives the space its own token."""
    trained = tok(render_chat(tok, row["messages"], tools=row.get("tools")), add_special_tokens=False)["input_ids"]
    if trained[: len(prompt.ids)] == prompt.ids:
        return False
    k = next((k for k, (a, b) in enumerate(zip(prompt.ids, trained)) if a != b), len(trained))  # where they part
    warnings.warn(f"{where}: the chat template's generation prompt differs from what training puts before the answer, "
                  f"from token {k}: the prompt has {tok.decode(prompt.ids[k:k + 12])!r} (ids {prompt.ids[k:k + 3]}), "
                  f"training {tok.decode(trained[k:k + 12])!r} (ids {trained[k:k + 3]}). The model is asked in a form "
                  "it did not learn; its answers (and generation metrics) may suffer. Prefer a template whose generation prompt is what its turns "
                  "begin with.", PeftkitWarning, stacklevel=2)
    return True
