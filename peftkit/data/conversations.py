"""A conversation -> token ids and labels through the tokenizer's chat template: where each assistant turn lies in
the rendered text (its loss span), the end-of-turn marker that teaches the model to stop, and the template's
refusals in its own words."""

from __future__ import annotations

import bisect
import functools
import os

from peftkit.data.checks import PROBE
from peftkit.data.formats import SystemPrompt, train_mark
from peftkit.data.stored import IGNORE_INDEX
from peftkit.data.template import render
from peftkit.errors import PeftkitError


def check_chat_tokenizer(tok, key: str = "data.format", rows: tuple[str, str] | None = None) -> None:
    """What data.format chat (`key`: or a data.train entry's format, or the flag `--format`) needs of the tokenizer:
    a chat template, and offsets (a fast tokenizer). `rows`: (the format, the fields of its text form) of preference
    or unpaired rows given as conversations, which need the template too (they were said to be format 'chat')."""
    if not getattr(tok, "chat_template", None):
        kinds = "chatml, llama3, a .jinja file, or a tokenizer directory to copy it from"
        if rows is not None:  # (the flag's user may have no recipe: data.chat_template is a recipe's key)
            template = (f"use a model whose tokenizer has a template (or a recipe that sets data.chat_template: "
                        f"{kinds})" if key.startswith("--") else
                        f"set data.chat_template ({kinds}), use a tokenizer with a template")
            raise PeftkitError(f"{key} '{rows[0]}' rows given as conversations need the tokenizer's chat_template, and "
                               f"it has none (a base model's has none); {template}, or give the rows as text "
                               f"({rows[1]} strings).")
        fix = (f"use a model whose tokenizer has a template (or a recipe that sets data.chat_template: {kinds}), or "
               "data in another format (--format alpaca, completion or text)" if key.startswith("--") else
               f"set data.chat_template ({kinds}), use a tokenizer with a template, or use another format")
        raise PeftkitError(f"{key} is 'chat' but the tokenizer has no chat_template (a base model's has none); {fix}.")
    if not tok.is_fast:
        raise PeftkitError(f"{key} 'chat' needs a fast tokenizer (character offsets to find assistant turns).")


def _chat_example(tok, messages: list[dict], train_on: str = "answers", tools: list[dict] | None = None,
                  format_key: str = "data.format") -> tuple[list[int], list[int]]:
    """A conversation's token ids and labels: its assistant turns trained (`train_on` answers), the last one only
    (last_answer), or every token (all); a turn marked `"train": false` is not trained whatever `train_on` says, and
    one marked true is (`trained_turns`). `tools`: the row's tool schemas, which the template writes (not trained);
    `format_key`: the key that made the rows chat, as a tokenizer without a template is told."""
    check_chat_tokenizer(tok, format_key)
    text = render_chat(tok, messages, tools=tools)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    masked = [i for i in answers if train_mark(messages[i]) is False]
    if train_on == "all" and not masked:
        return ids, list(ids)
    spans: list[tuple[int, int]] = []
    for i in answers:  # each turn after the one before it
        spans.append(_assistant_span(tok, messages, i, text, spans[-1][1] if spans else 0, tools))
    chosen = set(masked if train_on == "all" else trained_turns(messages, answers, train_on))
    spans = [span for i, span in zip(answers, spans, strict=True) if i in chosen]
    # A token is trained when its characters overlap a turn's: a whitespace token that a tokenizer gives no width
    # (ByteLevel's trim_offsets: `(p, p)`) counts from inside the turn, and a token that runs across the turn's start
    # (a generation prompt ending in a space that merges into the answer's first word) is trained whole, as the
    # assistant mask of transformers' apply_chat_template takes it. With `all`, the spans are the turns not trained.
    apart = all(e0 <= s1 for (_, e0), (s1, _) in zip(spans, spans[1:]))  # in turn order: always, but checked
    return ids, [t if _in_a_span(a, b, spans, apart) != (train_on == "all") else IGNORE_INDEX
                 for t, (a, b) in zip(ids, enc["offset_mapping"], strict=True)]


def trained_turns(messages: list[dict], answers: list[int], train_on: str) -> list[int]:
    """Which of the assistant turns `answers` (indices into `messages`) are trained: under `answers` each but those
    marked `"train": false`; under `last_answer` the last of those, the turns marked false being context as the earlier
    ones are, and every turn marked true."""
    unmasked = [i for i in answers if train_mark(messages[i]) is not False]
    if train_on != "last_answer":
        return unmasked
    return [i for i in answers if train_mark(messages[i]) is True or i in unmasked[-1:]]


def turn_end_token(tok) -> int | None:
    """The special token that closes an assistant turn in the chat template and that the turn's loss covers (an EOS
    or end-of-turn marker, `<|im_end|>`, `<|eot_id|>`: what teaches the model to stop, and what generation stops at);
    None for a template that ends turns with plain text, or that refuses the probe conversation (its own rows then
    fail in their own words)."""
    template = getattr(tok, "chat_template", None)
    if isinstance(template, dict):  # named templates (Hermes, Command-R): apply_chat_template's is "default"
        template = template.get("default")
    return _turn_end_token(tok, template) if isinstance(template, str) and tok.is_fast else None


@functools.lru_cache(maxsize=8)  # once per tokenizer and template: generation asks each batch
def _turn_end_token(tok, template: str) -> int | None:
    messages = [{"role": "user", "content": PROBE}, {"role": "assistant", "content": "ok"}]
    try:
        ids, labels = _chat_example(tok, messages)
    except PeftkitError:
        return None
    trained = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    while trained and not tok.decode(trained[-1:]).strip():  # whitespace the template writes after its marker
        trained.pop()
    specials = {i for i, t in tok.added_tokens_decoder.items() if t.special} | set(tok.all_special_ids)
    return trained[-1] if trained and trained[-1] in specials else None


def turn_end_text(tok) -> str:
    """What the chat template writes after an answer as part of the turn (`<|im_end|>`), for a template whose turns
    end with no special token (`turn_end_token` None): the marker a warning names. '' where there is none."""
    try:
        ids, labels = _chat_example(tok, [{"role": "user", "content": PROBE}, {"role": "assistant", "content": "ok"}])
    except PeftkitError:
        return ""
    trained = tok.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]).strip()
    return trained.removeprefix("ok") if trained.startswith("ok") else ""


def _in_a_span(a: int, b: int, spans: list[tuple[int, int]], apart: bool) -> bool:
    """Whether characters [a, b) overlap one of `spans`; of spans `apart` (in order, none overlapping) found by
    bisection, so a long conversation's mask costs tokens x log(turns), not tokens x turns."""
    if not apart:
        return any(a < e and b > s for s, e in spans)
    j = bisect.bisect_right(spans, a, key=lambda span: span[1])  # the first span ending after a
    return j < len(spans) and spans[j][0] < b


def _assistant_span(tok, messages: list[dict], i: int, text: str, floor: int = 0,
                    tools: list[dict] | None = None) -> tuple[int, int]:
    """Where assistant turn `messages[i]` lies in `text`, the whole conversation rendered: from the end of the
    conversation before it with the generation prompt, to the end of the conversation up to it (its content and
    end-of-turn marker), without the whitespace the template writes after the marker (ChatML's newline after
    `<|im_end|>`), as transformers' assistant mask ends a turn where `{% generation %}` closes.

    Both renderings are usually prefixes of `text`. Some templates render a turn differently once later turns
    follow (Qwen3 gives the last assistant turn an empty `<think>` block, earlier ones none), and a turn that opens
    the conversation has no conversation before it: there the turn is found by its content, with the text the
    shorter rendering puts after the content (the end-of-turn marker), so the loss never runs into later turns
    or the template's header and default system prompt.
    """
    content = messages[i].get("content") or ""  # (none beside tool calls)
    before = _render(tok, messages[:i], add_generation_prompt=True, tools=tools)
    start = len(before) if before is not None and text.startswith(before) else None
    through = _render(tok, messages[: i + 1], tools=tools)
    end = len(through.rstrip()) if through is not None else 0  # at the marker, not the whitespace after it
    if start is not None and through is not None and text.startswith(through) and end > start:
        return start, end
    # The content followed by its end-of-turn text, after the turn before (`floor`): never an earlier copy of the
    # answer in a user turn or a default system prompt. An empty content has nothing of its own to find. A template
    # that trims answers (Llama 3, Gemma, Mistral v0.3) renders one with space around it without that space.
    if through is not None and content not in through:
        content = content.strip()
    tail = (through[through.rfind(content) + len(content):] if through is not None and content and content in through
            else None)
    found = _content_and_end(tok, text, content, tail, max(start or 0, floor)) if tail is not None else None
    turn = i + 1 - isinstance(messages[0], SystemPrompt)  # as the row numbers it (not data.system_prompt's)
    if found is None and messages[i].get("tool_calls"):
        raise PeftkitError(f"the chat template renders the tool calls of assistant turn {turn} in a way peftkit cannot "
                           "locate in the whole conversation (its rendering of the conversation up to that turn is "
                           "not a prefix of the whole), so its loss mask would be a guess. Use a template whose "
                           "renderings of a conversation's beginnings are prefixes of the whole.")
    if found is None and through is not None and content not in through:
        raise PeftkitError(f"the chat template does not write assistant turn {turn} as the row has it: it rewrites "
                           "the answer (DeepSeek-R1's drops the reasoning up to '</think>'), so peftkit cannot find "
                           "the answer to put the loss on. Give the answers as the template writes them (without "
                           "what it drops), or use another template.")
    if found is None:
        raise PeftkitError(f"the chat template renders assistant turn {turn} in a way peftkit cannot locate in the "
                           "whole conversation, so its loss mask would be a guess. Use a template whose renderings "
                           "of a conversation's beginnings are prefixes of the whole, or another data.format.")
    return (found[0] if start is None else start), found[1]


def _content_and_end(tok, text: str, content: str, tail: str, after: int) -> tuple[int, int] | None:
    """Where the first `content` in `text` from `after` that `tail` (the text the turn's rendering puts after its
    content) follows begins, and where that tail ends; None where none is. Only the part of `tail` through a special
    token need follow: Phi-3's template closes the conversation with an EOS after the last turn's `<|end|>\\n`, so
    its rendering up to a middle turn ends in `<|end|>\\n<|endoftext|>`, which that turn lacks in the whole (found
    whole, it was the last turn's, and everything from this turn to there was trained)."""
    specials = None  # read once needed: most templates' tails follow whole
    at = text.find(content, after)
    while at >= 0:
        end = at + len(content)
        shared = os.path.commonprefix([tail, text[end:]])
        if shared.rstrip() == tail.rstrip():
            return at, end + len(shared.rstrip())
        if specials is None:
            specials = [t.content for t in tok.added_tokens_decoder.values() if t.special and t.content.strip()]
        through_special = max((shared.rfind(s) + len(s) for s in specials if s in shared), default=0)
        if through_special:
            return at, end + through_special
        at = text.find(content, at + 1)
    return None


def render_chat(tok, messages: list[dict], add_generation_prompt: bool = False,
                tools: list[dict] | None = None) -> str:
    """The chat template's text of a conversation; a conversation it refuses (Gemma's takes no system message;
    most want user and assistant turns in turn) is an error in the template's own words, not a jinja traceback."""
    from jinja2 import TemplateError

    try:
        return render(tok, messages, add_generation_prompt, tools)
    except TemplateError as e:
        if messages and isinstance(messages[0], SystemPrompt):
            raise PeftkitError(f"the chat template refuses this conversation ({e}): its system message is "
                               "data.system_prompt, which this model's template takes no system message for; remove "
                               "data.system_prompt (or put it into the first user message of each row).") from None
        raise PeftkitError(f"the chat template refuses this conversation ({e}). Fix the conversation (for example, "
                           "put a system message the template refuses into the first user message) or use a "
                           "model whose template takes it.") from None


def _render(tok, messages: list[dict], add_generation_prompt: bool = False,
            tools: list[dict] | None = None) -> str | None:
    """The chat template's text of `messages`; None where it refuses them (some refuse an empty conversation)."""
    try:
        return render(tok, messages, add_generation_prompt, tools)
    except Exception:  # noqa: BLE001 - a template raises what it likes (jinja's TemplateError, IndexError, ...)
        return None
