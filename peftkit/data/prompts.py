"""Prompts of data rows, for generation: the same prompt tokens training built for each row, and the row's
reference answer (its target), so that what a model generates can be set beside what it was taught.

- `alpaca` / `completion`: the prompt part of the row, tokenized as training tokenizes it (BOS and all).
- `chat`: the conversation up to its last assistant turn, rendered by the chat template with the generation
  prompt (`<|im_start|>assistant\\n`); the reference is that last assistant turn.
- `text` has no prompt: every token is target.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from peftkit.data.conversations import render_chat, turn_end_token
from peftkit.data.examples import (all_skipped, bad_rows_fix, encode_prompt, located, prompt_and_target_text,
                                   row_location, row_task, usable_row)
from peftkit.data.formats import format_rows
from peftkit.data.rows import load_rows
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


def row_prompt(tok, row: dict, fmt: str) -> Prompt:
    """The prompt and reference of one valid row of format `fmt`."""
    if fmt == "chat":
        messages, tools = row["messages"], row.get("tools")
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = chat_prompt(tok, messages[:last], "use a model whose tokenizer has a template, or data in another "
                             "format (--format alpaca, completion or text)", tools)
        prompt.reference = (_tool_calls_text(tok, messages[:last + 1], prompt.text, tools)
                            if messages[last].get("tool_calls") else messages[last]["content"])
        return prompt
    text, target = prompt_and_target_text(row, fmt)
    prompt = text_prompt(tok, text)
    prompt.reference = target
    return prompt


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
                 skip_empty: bool = False, *, tasks: bool = False, targets: bool = True) -> list[Prompt]:
    """The prompts of the rows of `source` (the first `limit`), bad rows handled as data.on_bad_rows says. A row
    whose prompt has no tokens is an error, or left out with `skip_empty` (eval.samples: a training row may have
    no prompt). `tasks`: read the rows' `task` column (a model whose method reads task ids). `targets`: a row's
    answer, the reference, must not be empty (False: `peftkit generate --data`, where the rows may be prompts only)."""
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
    prompts, checked, bad = [], False, skipped
    for i, row in enumerate(rows):
        if limit is not None and len(prompts) >= limit:
            break
        where = row_location(source, i, line_numbers)
        usable = usable_row(row, cfg, where, targets)
        bad += not usable  # a bad row skipped under on_bad_rows: skip (under error, it raised)
        if usable:
            prompt = located(where, row_prompt, tok, row, cfg.format)
            if not prompt.ids and skip_empty:
                continue
            if not prompt.ids:
                raise PeftkitError(f"{where}: its prompt is empty, and this tokenizer adds no BOS token, so there is "
                                   "nothing to generate from. Give the row a prompt (a loss-only eval needs none).")
            prompt.task_id, prompt.row = row_task(row, where) if tasks else None, row
            prompts.append(prompt)
            if cfg.format == "chat" and len(prompts) <= CHAT_PROMPTS_CHECKED:
                checked = checked or _warn_if_not_as_trained(tok, row, prompt, where)
    if not prompts and not skip_empty:
        raise PeftkitError(f"No usable rows in {source} to take prompts from{': ' + all_skipped(bad, cfg) if bad else ''}"
                           ".")
    return prompts


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
