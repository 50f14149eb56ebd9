"""A chat template rendered the same on every day: the one place peftkit calls `apply_chat_template`.

Some templates write today's date into every conversation through transformers' `strftime_now` (Llama 3.1-3.3's
"Today Date: 04 Dec 2026" in the system header, Mistral Small's and SmolLM3's system prompts). Rendered as they are,
a run's tokens would depend on the day it ran: `peftkit verify` a day later would report other bits, a `--resume`
past midnight would train on other tokens than the steps before it, and the tokenized-data cache would hand back
another day's. So each `strftime_now("FORMAT")` with a literal format is given `CHAT_DATE`, in training, evaluation,
generation and chat alike (a model's answers then match the prompts it was trained on).
"""

from __future__ import annotations

import datetime
import functools
import json
import re
import warnings

from peftkit.data.formats import TRAIN_KEYS
from peftkit.errors import PeftkitWarning

CHAT_DATE = datetime.date(2024, 7, 26)
"""The day templates are given: the one Llama 3.1's own template falls back to when it is given no clock."""

_STRFTIME_CALL = re.compile(r"""strftime_now\(\s*(?:"([^"\\]*)"|'([^'\\]*)')\s*\)""")
_STRFTIME_USE = re.compile(r"strftime_now(?!\s+is\s+(?:not\s+)?defined)")  # not Llama's `strftime_now is defined`


def render(tok, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None) -> str:
    """The tokenizer's chat template's text of `messages` (its `"default"` one where it has several), with
    `CHAT_DATE` for today; `tools`: the JSON schemas of the tools the conversation may call (a row's `tools`).
    Raises what the template raises, and ValueError for a tokenizer without a template."""
    template = dated_template(tok.get_chat_template())
    # A message's `train` key, or its alias `training` (whether its turn is trained: `formats.TRAIN_KEYS`), is
    # peftkit's, not the template's: one that writes each message's items or its JSON would write it into the text.
    messages = [{k: v for k, v in m.items() if k not in TRAIN_KEYS}
                if isinstance(m, dict) and not m.keys().isdisjoint(TRAIN_KEYS) else m for m in messages]
    if _writes_arguments_as_text(tok, template):
        messages = [_with_text_arguments(m) for m in messages]
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                   add_generation_prompt=add_generation_prompt, tools=tools)


_ARGUMENTS_AS_TEXT: dict[str, bool] = {}
_PROBE_ARGUMENTS = '{"peftkit_probe": 1}'


def _writes_arguments_as_text(tok, template: str) -> bool:
    """Whether `template` writes a tool call's `arguments` given as JSON text as that text (DeepSeek V3's
    `'```json\\n' + arguments`, Qwen 3's `arguments is string`), rather than as a string value (`tojson`: quoted,
    escaped), the mapping form transformers' templates want. Rows hold mappings (`formats._with_call_arguments`); a
    template of the first kind is given their JSON text, which it would otherwise refuse (a str + dict TypeError) or
    write as a Python dict. Asked once per template, of a probe call."""
    if template not in _ARGUMENTS_AS_TEXT:
        call = {"id": "call00001", "type": "function", "function": {"name": "probe", "arguments": _PROBE_ARGUMENTS}}
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [call]}]
        try:
            text = tok.apply_chat_template(probe, chat_template=template, tokenize=False)
        except Exception:  # noqa: BLE001 - a template raises what it likes; one that refuses the probe gets mappings
            text = ""
        _ARGUMENTS_AS_TEXT[template] = _PROBE_ARGUMENTS in text
    return _ARGUMENTS_AS_TEXT[template]


def _with_text_arguments(message):
    """`message` with each tool call's mapping `arguments` as its JSON text."""
    calls = message.get("tool_calls") if isinstance(message, dict) else None
    if not isinstance(calls, list):
        return message

    def as_text(call):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("arguments"), dict):
            return call
        return call | {"function": function | {"arguments": json.dumps(function["arguments"], ensure_ascii=False)}}

    return message | {"tool_calls": [as_text(c) for c in calls]}


@functools.lru_cache(maxsize=16)
def dated_template(template: str) -> str:
    """`template` with each `strftime_now("FORMAT")` replaced by the string `CHAT_DATE` formats to. A template that
    reads the clock otherwise (a format held in a variable) is left as it is, with a warning."""
    def literal(match: re.Match) -> str:
        fmt = match.group(1) if match.group(1) is not None else match.group(2)
        return json.dumps(CHAT_DATE.strftime(fmt))  # a JSON string is a jinja string literal

    dated = _STRFTIME_CALL.sub(literal, template)
    if _STRFTIME_USE.search(dated):
        warnings.warn(PeftkitWarning("the chat template reads today's date in a way peftkit cannot fix to one day "
                                     "(strftime_now without a literal format), so the same data tokenizes differently "
                                     "on different days: a run made on another day will not verify bit for bit. "
                                     "To make runs repeatable, write a fixed date into the template (the "
                                     "tokenizer's chat_template) in place of the call."),
                      stacklevel=2)
    return dated
