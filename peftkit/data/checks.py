"""What the data does to training that a user should hear of, beyond the counts: a chat template's default system
prompt that fills the window, a chat template that never teaches the model to stop, and the text of special tokens
inside the data (encoded as those tokens); `describe_stats` turns them and the counts into the lines to print."""

from __future__ import annotations

import functools
import re

from peftkit.data.formats import OPTIONAL_FIELDS, REQUIRED_FIELDS, message_name
from peftkit.data.template import render
from peftkit.progress import counted
from peftkit.recipe import DataConfig


@functools.lru_cache(maxsize=8)  # once per tokenizer, not per row
def _specials(tok) -> tuple[frozenset[int], re.Pattern | None]:
    """The ids of the tokens the tokenizer splits out of any text as special (BOS, EOS, a chat template's turn
    markers: its added tokens marked special), and their text as one pattern, the longest first. The tokens
    model.add_tokens added (`new_tokens.add_to_tokenizer`) are left out, the data's to use (a tool-call marker),
    but for the EOS and the markers the chat template writes."""
    meant = set(getattr(tok, "peftkit_added_tokens", ())) - {tok.eos_token, tok.bos_token}
    if meant and tok.chat_template:
        conversation = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        try:
            written = render(tok, conversation)
        except Exception:  # noqa: BLE001 - a template that cannot render this: every special token is said
            written = "".join(meant)
        meant = {token for token in meant if token not in written}
    added = {i: t.content for i, t in tok.added_tokens_decoder.items()
             if t.special and t.content.strip() and t.content not in meant}
    names = sorted(set(added.values()), key=len, reverse=True)
    return frozenset(added), re.compile("|".join(map(re.escape, names))) if names else None


def special_tokens_in(tok, row: dict, fmt: str, body: list[int]) -> str | None:
    """Where the first special token's text sits in a row ("field 'output' holds '</s>'"), or None.

    A tokenizer encodes that text as the special token itself, whoever wrote it: an EOS inside an answer teaches
    the model to stop there, and an end-of-turn marker in a message ends the turn (what follows reads as a turn of
    the template's own). Alpaca rows are looked for in their tokens (`body`: the example's ids between the BOS the
    tokenizer puts in front and the EOS peftkit appends), chat messages in their text. `text` and `completion` rows
    are often text already rendered (a ChatML prompt), whose special tokens are meant: there only a BOS the text
    begins with (when the tokenizer puts one in front too) and an EOS it ends with are said, two of them in a row:
    one at the very end is the one EOS peftkit keeps (`without_eos`), a second before it, or one before the text's
    last whitespace (`</s>\n`: peftkit appends one more), are two."""
    from peftkit.data.examples import without_eos  # (it imports this module)

    if fmt == "tokenized":  # the ids are the user's, special tokens and all
        return None
    ids, pattern = _specials(tok)
    if fmt in ("text", "completion"):
        first, last = ("text", "text") if fmt == "text" else ("prompt", "completion")
        bos, eos = tok.bos_token, tok.eos_token
        if bos and row[first].lstrip().startswith(bos) and _adds_bos(tok):
            return f"field '{first}' begins with '{bos}', and the tokenizer puts a BOS in front of it too (two BOS)"
        if eos and (kept := without_eos(tok, row[last])).rstrip().endswith(eos):  # (the one at its very end is kept)
            then = " twice" if kept != row[last] else ", and peftkit appends an EOS to it too"
            return f"field '{last}' ends with '{eos}'{then} (two EOS)"
        return None
    if fmt == "chat":
        fields = [(message_name(row["messages"], i, ".content"), m.get("content"))
                  for i, m in enumerate(row["messages"])]
        for name, value in fields:
            if pattern is not None and isinstance(value, str) and (found := pattern.search(value)):
                return f"{name} holds '{found.group()}'"
        return None
    if ids.isdisjoint(body):  # alpaca: a set's look-up per token, in C (a pattern over 6k names is not)
        return None
    text = tok.convert_ids_to_tokens(next(t for t in body if t in ids))
    fields = (*REQUIRED_FIELDS[fmt], *OPTIONAL_FIELDS.get(fmt, ()))
    where = next((f"field '{name}'" for name in fields if isinstance(row.get(name), str) and text in row[name]), "it")
    return f"{where} holds '{text}'"


@functools.lru_cache(maxsize=8)
def _adds_bos(tok) -> bool:
    return tok.bos_token_id is not None and tok("", add_special_tokens=True)["input_ids"][:1] == [tok.bos_token_id]


# A default system prompt the chat template adds to each conversation without one is masked from the loss
# but still fills the window. Past a quarter of data.max_length it is the largest part of a short example's
# prompt and pushes long answers into the cut (Qwen2.5's default, "You are Qwen, created by Alibaba Cloud.
# You are a helpful assistant.", is ~20 tokens: 4 % of 512, 31 % of 64), so it is worth a line then.
SYSTEM_PROMPT_WARN_SHARE = 0.25
PROBE = "PROBE_peftkit_7f3a"  # a user message no template's own text contains


def injected_system_tokens(tok) -> int:
    """Tokens a chat template adds as a default system prompt to a conversation without a system message.

    Counts the tokens before the first user message's content in a conversation without a system message,
    minus the same with a one-character system message: what an explicit short system message saves. 0 for a
    template that adds none, or one that adds the same text either way (Llama 3.1's date header), which no
    change to the data avoids.
    """
    user = [{"role": "user", "content": PROBE}, {"role": "assistant", "content": "ok"}]

    def tokens_before_user(messages: list[dict]) -> int:
        text = render(tok, messages)
        start = text.rfind(PROBE)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return sum(1 for a, _ in enc["offset_mapping"] if a < start)

    try:
        without = tokens_before_user(user)
        with_short = tokens_before_user([{"role": "system", "content": "."}, *user])
    except Exception:  # noqa: BLE001 - a template may refuse a system role (Gemma's raises): it injects none either
        return 0
    return max(0, without - with_short)


NO_EOS = "peftkit appends no EOS to data.format tokenized rows"


def target_end(given: bool) -> str:
    """What a cut takes from the end of an example's target: the EOS / end-of-turn that tokenizing put there, or, of a
    data.format tokenized row (`given`), to which peftkit appends nothing, the end its labels give."""
    return (f"the end the row's labels give ({NO_EOS})" if given else
            "the EOS / end-of-turn the model should learn to stop on")


def describe_stats(stats: dict, cfg: DataConfig) -> list[str]:
    """The lines to print about the training data that `load_examples` returned `stats` for.

    The first line counts examples, skipped bad rows, truncated and dropped ones; lines starting with
    `warning: ` follow when examples are trained without the end of their target (data.truncation: keep) or
    when the chat template's default system prompt takes more than SYSTEM_PROMPT_WARN_SHARE of max_length, or when the
    tokenizer joins a classification row's text_pair to its text with nothing between them.
    The lines hold no rich markup (print them with markup=False).
    """
    limit = f"data.max_length={cfg.max_length}"
    total = stats["examples"] + stats["too_long"] + stats["truncation_dropped"]
    line = counted(stats["examples"], "training pair" if cfg.format == "preference" else "training example")
    if stats.get("cached"):
        line += f", read from the tokenized-data cache ({stats['cached']})"
    if stats["bad_rows"]:
        by = ", ".join(f"{name} {n}" for name, n in stats.get("bad_rows_by_dataset", {}).items())
        line += f"; skipped {counted(stats['bad_rows'], 'bad row')} ({by + '; ' if by else ''}data.on_bad_rows: skip)"
    if stats["truncated"]:
        line += f"; {stats['truncated']} of {total} cut at {limit} tokens"
    if stats["too_long"]:
        line += f"; dropped {stats['too_long']} whose target lies beyond data.max_length"
    if stats["truncation_dropped"]:
        line += f"; dropped {stats['truncation_dropped']} whose target lost its end (data.truncation: drop)"
    lines = [line]
    if stats["target_cut"] and cfg.truncation != "drop":
        given = stats.get("target_cut_given", 0)  # data.format tokenized rows': no EOS of peftkit's to lose
        end = f" ({target_end(False)})"
        if given == stats["target_cut"]:
            end = f", the end their rows' labels give ({NO_EOS}),"
        elif given:  # a mix
            end = (f" ({target_end(False)}; of the {counted(given, 'tokenized row')} among them, the end "
                   f"{'its' if given == 1 else 'their'} labels give: {NO_EOS})")
        taught = "to stop after them" if not given else "how they end"
        lines.append(
            f"warning: {stats['target_cut']} of {total} examples lost the end of their target{end} to {limit}"
            + (f" and are trained as cut (data.truncation: keep), so the model is not taught {taught}. "
               "Raise data.max_length, or set data.truncation: drop to leave them out."
               if cfg.truncation == "keep" else "; data.truncation: error stops training at the first of them.")
        )
    if rows := stats.get("special_text_rows"):
        lines.append(
            f"warning: {rows} of {stats.get('rows', rows)} rows hold the text of a special token, which the tokenizer "
            f"encodes as that token, not as text (first: {stats['special_text_first']}). An EOS or end-of-turn "
            "marker inside an answer teaches the model to stop there, and one in a message ends that turn. Remove or "
            "reword it where it is meant as text."
        )
    if rows := stats.get("dropped_message_rows"):
        lines.append(
            f"warning: the chat template leaves the system message out of {rows} of {stats.get('rows', rows)} "
            f"conversations (first: {stats['dropped_message_first']}), so training never sees it. Mistral v0.3's "
            "template, for one, writes the system message into the last user turn only, which a conversation ending "
            "in an answer does not have (a generation prompt does: the model is asked in a form it was not trained "
            "on). Put what it says into the first user message, or use a template that keeps it."
        )
    if stats.get("turn_ends_unmarked") and (marker := stats.get("turn_end_text")):
        lines.append(
            f"warning: data.chat_template ends each assistant turn with {marker!r}, which is not a token of this "
            "tokenizer: the model is taught to write it as plain text, not to stop, and generation does not stop at "
            "it (it runs on to its token limit). Add it as a token, with new embedding rows trained "
            f"(model.add_tokens: [{marker!r}], and the template's other markers), or use a template whose turns end "
            "with the tokenizer's EOS ({{ eos_token }})."
        )
    elif stats.get("turn_ends_unmarked"):
        lines.append(
            "warning: the chat template ends an assistant turn with no special token (no EOS or end-of-turn marker "
            "after the answer), so training never teaches the model to stop: generation runs on to its token limit. "
            "Use a tokenizer whose chat template closes each turn with one (its EOS or an end-of-turn token)."
        )
    if rows := stats.get("unmarked_pair_rows"):
        lines.append(
            f"warning: the tokenizer joins text and text_pair with nothing between them (no separator token, no "
            f"token_type_ids), so the model reads each of the {rows} rows with a text_pair as one text and cannot tell "
            f"where the first ends (first: {stats['unmarked_pair_first']}); transformers (a pipeline, peft) joins them "
            "alike. Put a separator into the rows' text (end it with a newline, or write both texts into `text` with a "
            "marker between them) and the same at inference."
        )
    injected = stats["system_prompt_tokens"]
    if injected > SYSTEM_PROMPT_WARN_SHARE * cfg.max_length:
        lines.append(
            f"warning: the chat template adds a default system prompt of {injected} tokens "
            f"({100 * injected / cfg.max_length:.0f}% of {limit}) to each of the {stats['system_prompt_rows']} "
            "conversations without a system message; it is masked from the loss but takes room the answers need. "
            "Add a short explicit system message to those conversations, or raise data.max_length."
        )
    return lines


def guard_token_ids(model, tok) -> None:
    """Where the tokenizer has more tokens than the model has embedding rows (tokens added to it after the model was
    saved, which peftkit does not resize the model for), an id past the rows is a clear error, not torch's
    `IndexError: index out of range in self` from deep inside the forward: in training, evaluation, generation
    and chat alike. A pre-hook on the model's forward, checking its input_ids; nothing is hooked otherwise."""
    from peftkit.errors import PeftkitError

    embedding = model.get_input_embeddings()
    rows = getattr(embedding, "num_embeddings", None) or getattr(getattr(embedding, "weight", None), "shape", [None])[0]
    if rows is None or len(tok) <= rows or getattr(model, "_peftkit_token_guard", False):
        return

    def check(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or not ids.numel() or (top := int(ids.max())) < rows:
            return
        raise PeftkitError(f"token {tok.convert_ids_to_tokens(top)!r} (id {top}) has no embedding: the model has "
                           f"{rows} embedding rows and its tokenizer {len(tok)} tokens, some added after the model "
                           "was saved. Use the tokenizer the model was saved with, list the new tokens in a recipe's "
                           "model.add_tokens (peftkit adds them and trains their rows), or give the model the rows "
                           "first (model.resize_token_embeddings(len(tokenizer)), then save_pretrained both).")

    # First of the model's pre-hooks: the prompt family's own (registered when its adapter loads) embeds input_ids.
    model.register_forward_pre_hook(check, with_kwargs=True, prepend=True)
    model._peftkit_token_guard = True
