"""`model.add_tokens`: new special tokens (ChatML's `<|im_start|>`/`<|im_end|>` for a base model, a tool-call
marker) added to the tokenizer, the model's embeddings resized to hold them, and their rows trained.

- The tokenizer: each token not yet in its vocabulary is added as a special token (never split, skipped when an
  answer is decoded), in the order given, so that its id is the same wherever the list is added again: the
  adapter records the list (peftkit.json `added_tokens`), and eval, generate, chat and merge add it to the base's
  tokenizer as training did.
- The model: where the tokenizer then has more tokens than the input embeddings have rows, the embeddings (and an
  untied output head) are resized to the tokenizer's length, as transformers' `resize_token_embeddings` does: the new
  rows drawn around the old rows' mean (its `mean_resizing`), from a fixed seed, so that they depend on the base only.
- The adapter: the new rows train as LoRA's `trainable_token_indices` (peft's; the output head's too where it is
  not tied to the embeddings), or the trainable tokens method's `token_indices`; a module listed in modules_to_save
  trains whole, new rows included. The adapter then holds the new rows' values, so its base's own new rows never
  matter. peft loads the adapter on a base resized to the tokenizer the adapter directory holds
  (`base.resize_token_embeddings(len(tokenizer))`), as its docs for new tokens say, where the base has fewer rows
  (one with spare rows keeps them: shrunk, its embeddings would not take modules_to_save's saved matrices).
"""

from __future__ import annotations

import torch
from torch import nn

from peftkit.errors import PeftkitError

RESIZE_SEED = 0
"""The seed the new rows are drawn from: a function of the base alone, in training and wherever the base is loaded
again (where the adapter's trained rows replace them anyway)."""


def add_to_tokenizer(tok, tokens: list[str]) -> list[int]:
    """Add each of `tokens` that `tok` does not have as a special token, in order; the ids of those added. The tokens
    its loaded vocabulary lacked are kept on it (`peftkit_new_tokens`), for `added_ids`."""
    vocab = tok.get_vocab()
    new = [token for token in tokens if token not in vocab]
    if new:
        tok.add_tokens(new, special_tokens=True)
    tok.peftkit_added_tokens = tuple(tokens)  # in the data by intent: not warned of there (`data.checks._specials`)
    tok.peftkit_new_tokens = getattr(tok, "peftkit_new_tokens", ()) + tuple(new)
    return [tok.convert_tokens_to_ids(token) for token in new]


def added_ids(model_cfg, tok, rows: int) -> tuple[list[int], list[str]]:
    """(the ids of model_cfg.add_tokens whose rows train: those its base tokenizer lacked, and those past the `rows`
    the base's embeddings had (a token added to the tokenizer after the model was saved); the other tokens, which
    the base had already). The base's vocabulary is `tok`'s before `add_to_tokenizer` (where `load_tokenizer` added
    them: a token the base had keeps its id), else the base tokenizer read again."""
    if (fresh := getattr(tok, "peftkit_new_tokens", None)) is not None and set(model_cfg.add_tokens) <= set(
            tok.peftkit_added_tokens):
        new = [t for t in model_cfg.add_tokens if t in fresh or tok.convert_tokens_to_ids(t) >= rows]
    else:
        from peftkit.modeling import load_tokenizer

        vocab = load_tokenizer(model_cfg.model_copy(update={"add_tokens": []})).get_vocab()
        new = [t for t in model_cfg.add_tokens if t not in vocab or vocab[t] >= rows]
    return [tok.convert_tokens_to_ids(t) for t in new], [t for t in model_cfg.add_tokens if t not in new]


def describe(tokens: list[str], ids: list[int], present: list[str], rows: tuple[int, int]) -> list[str]:
    """train's lines on model.add_tokens: what was added, the resize, the tokens left as they were."""
    lines = []
    if ids:
        resized = f"; the embeddings resized from {rows[0]:,} to {rows[1]:,} rows" if rows[1] > rows[0] else ""
        lines.append(f"model.add_tokens: {len(ids)} new special token{'s' * (len(ids) > 1)} "
                     f"({', '.join(f'{t} = {i}' for t, i in zip([t for t in tokens if t not in present], ids))}), "
                     f"{'their embedding rows' if len(ids) > 1 else 'its embedding row'} trained{resized}")
    if present:
        lines.append(f"note: model.add_tokens: {', '.join(present)} already in the tokenizer: left as "
                     f"{'they are' if len(present) > 1 else 'it is'}, {'their rows' if len(present) > 1 else 'its row'} "
                     "the model's own")
    return lines


def resize(model: nn.Module, length: int) -> int:
    """Give `model`'s embeddings (and an untied output head) `length` rows where they have fewer; the rows they had."""
    embedding = model.get_input_embeddings()
    rows = embedding.weight.shape[0]
    if length <= rows:
        return rows
    head = model.get_output_embeddings()
    if head is not None and type(head).__module__.startswith("bitsandbytes"):
        raise PeftkitError("model.add_tokens: the output head is quantized (quantization.skip_modules leaves it out), "
                           "and a quantized head cannot take new rows. Keep lm_head in quantization.skip_modules.")
    meta = embedding.weight.device.type == "meta"
    devices = [embedding.weight.device.index or 0] if embedding.weight.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(RESIZE_SEED)
        model.resize_token_embeddings(length, mean_resizing=not meta)
    return rows


def saved_rows(model: nn.Module, state: dict[str, torch.Tensor]) -> int:
    """The rows of the input embeddings' weight an adapter's PEFT-keyed `state` holds (peft saves the embeddings
    whole where their vocabulary was resized, its save_embedding_layers), 0 where it holds none: more than the
    tokenizer's length where the base was resized with pad_to_multiple_of (TRL's setup_chat_format: 64)."""
    embedding = model.get_input_embeddings()
    path = next(name for name, module in model.named_modules() if module is embedding)
    ends = ("weight", "base_layer.weight", "token_adapter.base_layer.weight")
    keys = [f"base_model.model.{path}.{end}" for end in ends]
    return max((state[key].shape[0] for key in keys if key in state), default=0)

def with_new_rows(adapter, model: nn.Module, ids: list[int]):
    """The adapter settings with the rows of the new token `ids` trained: added to LoRA's `trainable_token_indices`
    (input embeddings, and an untied output head) or the trainable tokens method's `token_indices`, where
    modules_to_save does not train the module whole. A method that can train neither is refused, saying what to do."""
    from peftkit.methods.layer import suffix_match

    if not ids:
        return adapter
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    paths = {id(m): name for name, m in model.named_modules()}
    saved = list(getattr(adapter, "modules_to_save", None) or [])
    wanted = [paths[id(m)] for m in (embedding, head)
              if m is not None and (m is embedding or m.weight is not embedding.weight)
              and not any(suffix_match(paths[id(m)], name) for name in saved)]
    if not wanted:
        return adapter
    if adapter.method == "trainable_tokens":
        return _with_token_indices(adapter, model, wanted, ids)
    if "trainable_token_indices" not in type(adapter).model_fields:
        names = ", ".join(p.rpartition(".")[2] for p in wanted)
        save = (f"Add {names} to adapter.modules_to_save (trained whole), or use" if _takes_saved_modules(adapter)
                else f"It takes no adapter.modules_to_save either: use")
        raise PeftkitError(f"model.add_tokens: the new tokens' embedding rows must train, and adapter.method "
                           f"'{adapter.method}' trains no rows of {' or '.join(wanted)}. {save} method lora "
                           "(trainable_token_indices) or trainable_tokens.")
    given = adapter.target_modules
    if given is not None and not isinstance(given, str) and (adapted := [p for p in wanted if _targeted(given, p)]):
        raise PeftkitError(f"model.add_tokens: the new tokens' rows of {adapted[0]} train as trainable_token_indices, "
                           f"and adapter.target_modules adapts {adapted[0]} too: a module takes one of the two. Leave "
                           f"{adapted[0].rpartition('.')[2]} out of adapter.target_modules (its new rows train), or "
                           "move it to adapter.modules_to_save (trained whole).")
    return adapter.model_copy(update={"trainable_token_indices": _merged(adapter.trainable_token_indices, model,
                                                                         wanted, ids, paths[id(embedding)])})


def _takes_saved_modules(adapter) -> bool:
    """Whether the adapter's method takes adapter.modules_to_save (the prompt family and Llama-Adapter do not: their
    refusal was the advice of the error above, a recipe no one could write)."""
    if "modules_to_save" not in type(adapter).model_fields:
        return False
    try:
        type(adapter).model_validate(adapter.model_dump() | {"modules_to_save": ["embed_tokens"]})
    except ValueError:
        return False
    return True


def _merged(given, model: nn.Module, wanted: list[str], ids: list[int], embedding: str):
    """`trainable_token_indices` with `ids` added for each module path in `wanted`: the list form where only the input
    embeddings (path `embedding`) need them (a tied head follows them), else {module: ids} (an untied head alone,
    where modules_to_save trains the embeddings whole: the list form would name the embeddings). A tied head that
    `given` names with ids of its own trains its own rows (peft's), so it gets `ids` too."""
    from peftkit.methods.token_rows import _wanted

    named = _wanted(model, given) if given else {}
    if set(named) <= {embedding} and wanted == [embedding] and not isinstance(given, dict):
        return sorted({*named.get(embedding, []), *ids})
    weight = model.get_input_embeddings().weight
    tied = [path for path, module in model.named_modules()
            if path in named and path != embedding and getattr(module, "weight", None) is weight]
    out = {path: list(rows) for path, rows in named.items()}
    for path in dict.fromkeys([*wanted, *tied]):
        out[path] = sorted({*out.get(path, []), *ids})
    return out


def _targeted(given, path: str) -> bool:
    """Whether adapter.target_modules `given` (a list of names, or a regex) names the module at `path`."""
    import re

    from peftkit.methods.layer import suffix_match
    from peftkit.section import TargetRegex

    if isinstance(given, TargetRegex):
        return re.fullmatch(given.regex, path) is not None
    return any(suffix_match(path, entry) for entry in given)


def _with_token_indices(adapter, model: nn.Module, wanted: list[str], ids: list[int]):
    """The trainable tokens method with `ids` among its token_indices; an untied head it does not target is refused."""

    def targeted(path: str) -> bool:
        given = adapter.target_modules
        return path == wanted[0] if given is None else _targeted(given, path)  # None: the input embeddings

    if (missing := [path for path in wanted if not targeted(path)]) and getattr(adapter, "init_from", None):
        _refuse_untrained_head(adapter, missing[0])
    if missing:
        raise PeftkitError(f"model.add_tokens: the new tokens' rows of {missing[0]} must train too (the output head is "
                           "not tied to the embeddings), and adapter.target_modules leaves it out. Name the "
                           f"embeddings and {missing[0].rpartition('.')[2]} in adapter.target_modules.")
    return adapter.model_copy(update={"token_indices": sorted({*adapter.token_indices, *ids})})


def _refuse_untrained_head(adapter, head: str) -> None:
    """adapter.init_from an adapter of the trainable tokens method that trains no rows of the untied output head
    (peft's, on the embeddings alone): naming the head in adapter.target_modules cannot be followed, since init_from
    takes the method's settings from the adapter, so the message says what the adapter is and what can be done."""
    name = head.rpartition(".")[2]
    raise PeftkitError(f"model.add_tokens: adapter.init_from {adapter.init_from} is a trainable tokens adapter that "
                       f"trains rows of the embeddings alone, none of the output head {head} (not tied to the "
                       "embeddings; peft's adapter on embed_tokens only), so the new tokens' output rows would "
                       "stay untrained; its settings come from the adapter, so they cannot name the head. Train a new "
                       "adapter without adapter.init_from instead: with model.add_tokens, method lora trains the new "
                       f"tokens' rows of the embeddings and of {name} (trainable_token_indices).")


def adapter_tokens(adapter_dir, base_cfg, theirs=None) -> list[str]:
    """The tokens to add to the base's tokenizer, and rows to its embeddings, for the adapter at `adapter_dir`:
    the list its peftkit.json records; for an adapter peft saved (with the tokenizer Trainer writes beside it, or
    `tokenizer.save_pretrained` did), the tokens that tokenizer has past the base's, where it is the base's with
    tokens added (TRL's `setup_chat_format`, a pad token added and the model resized). `theirs`: that tokenizer,
    where the caller has read it already (`held_tokenizer`: a load of a large tokenizer takes a fifth of a second)."""
    from peftkit.adapter_meta import read_meta
    from peftkit.modeling import load_tokenizer

    meta = read_meta(adapter_dir)
    if meta.peftkit_version is not None or not _holds_tokenizer(adapter_dir):
        return meta.added_tokens
    theirs = held_tokenizer(adapter_dir) if theirs is None else theirs
    if theirs is None:
        return []  # a tokenizer that does not load alone is not one to take tokens from
    base = load_tokenizer(base_cfg.model_copy(update={"add_tokens": []}))
    if len(theirs) <= len(base):
        return []
    vocab, their_vocab = base.get_vocab(), theirs.get_vocab()
    if any(their_vocab.get(token) != i for token, i in vocab.items()):
        return []  # another tokenizer, not the base's with tokens added
    return [theirs.convert_ids_to_tokens(i) for i in range(len(base), len(theirs))]


def held_tokenizer(adapter_dir):
    """The tokenizer an adapter peft saved holds beside it (Trainer writes it there), None where it holds none, is
    peftkit's (whose peftkit.json lists the tokens its training added), or does not load alone."""
    from transformers import AutoTokenizer

    from peftkit.adapter_meta import read_meta

    if read_meta(adapter_dir).peftkit_version is not None or not _holds_tokenizer(adapter_dir):
        return None
    try:
        return AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=False)  # never the adapter's code
    except Exception:  # noqa: BLE001 - a tokenizer that does not load alone says nothing of the adapter
        return None


def check_rows_known(adapter_dir, adapter_cfg, state: dict[str, torch.Tensor], model: nn.Module, base: str) -> None:
    """An adapter peft saved for a base with tokens added (TRL's setup_chat_format) trains rows past `model`'s
    embeddings, and no tokenizer lies beside it to tell `adapter_tokens` those tokens: said with what is missing and
    how to get it, where it failed as "token id 102 is past the 102 rows" (a hub adapter cached before peftkit fetched
    the tokenizer files with it: `peftkit.hub.tokenizer_fetch`)."""
    from pathlib import Path

    from peftkit.adapter_meta import read_meta
    from peftkit.hub import TOKENIZER_FILES, tokenizer_fetch

    if read_meta(adapter_dir).peftkit_version is not None or any((Path(adapter_dir) / name).is_file()
                                                                 for name in TOKENIZER_FILES):
        return  # (peftkit.json lists the tokens its run added; a tokenizer beside the adapter tells them)
    try:
        rows, saved = model.get_input_embeddings().weight.shape[0], saved_rows(model, state)
    except (AttributeError, NotImplementedError, StopIteration):  # a model without plain input embeddings
        return
    given = getattr(adapter_cfg, "trainable_token_indices", None) or []
    ids = [*(given if isinstance(given, list) else (i for each in given.values() for i in each)),
           *(getattr(adapter_cfg, "token_indices", None) or [])]
    if max([saved - 1, *ids], default=-1) < rows:
        return
    what = (f"its trainable token ids reach {max(ids)}" if ids and max(ids) >= rows
            else f"its saved embeddings have {saved} rows")
    fix = tokenizer_fetch(adapter_dir) or ("Copy the tokenizer saved with the adapter into it (tokenizer.json, "
                                           "tokenizer_config.json, special_tokens_map.json), or give --model the base "
                                           "with those tokens added and its embeddings resized to hold them.")
    raise PeftkitError(f"Adapter {adapter_dir}: {what}, past the {rows} embedding rows of its base {base}: it was made "
                       "for the base with tokens added (as TRL's setup_chat_format adds them), which peftkit learns "
                       "from the tokenizer saved beside the adapter, and the adapter's directory holds none of its "
                       f"files ({', '.join(TOKENIZER_FILES[:3])}, ...). {fix}")


def held_tokenizer_length(adapter_dir) -> int | None:
    """The length of `held_tokenizer`'s tokenizer, None where there is none."""
    return len(tok) if (tok := held_tokenizer(adapter_dir)) is not None else None


def _holds_tokenizer(adapter_dir) -> bool:
    """Whether a tokenizer's files are in the adapter's directory (Trainer's, or `tokenizer.save_pretrained`'s)."""
    from pathlib import Path

    return any((Path(adapter_dir) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))


def start_state(model: nn.Module, state: dict[str, torch.Tensor], trained,
                vocabulary: int | None = None) -> dict[str, torch.Tensor]:
    """adapter.init_from's `state` fitted to `model`, injected with the run's adapter, where the run adds tokens
    (`trained`: the adapter's own settings). The embeddings and head the adapter saved whole (peft's, for a resized
    base) as `peftkit.saved_embeddings.fitted` fits them, a tied head's copy of the embeddings' rows (peft's) left
    out; where model.add_tokens lists new tokens after the adapter's, each tensor of trained rows is built again by
    token id for the ids its layer now trains, an id the adapter trained taking its saved row, a new one the row the
    layer starts from (the base's resized row, as in a run without init_from). Rows held by id, never by position: the
    ids the adapter's config lists need not be in the run's order. `vocabulary`: the length of the tokenizer beside a
    peft adapter (`held_tokenizer_length`), past which its saved matrices hold padding (`saved_embeddings._trim`)."""
    from peftkit.adapters import PEFT_PREFIX
    from peftkit.methods.token_rows import without_tied_copies
    from peftkit.methods.trainable_tokens import ROWS_PARAM, ReplacedRows
    from peftkit.saved_embeddings import fitted

    out = fitted(model, without_tied_copies(model, state), vocabulary)
    ids = _trained_ids(model, trained)
    for name, module in model.named_modules():
        key = f"{PEFT_PREFIX}{name}.{ROWS_PARAM}"
        old = ids.get(name.removesuffix(".token_adapter"))
        if not isinstance(module, ReplacedRows) or key not in out or old is None or old == module.ids:
            continue
        rows = module.trainable_tokens_delta.detach()
        saved = out[key].to(rows.device)
        out[key] = torch.stack([saved[old.index(i)] if i in old else rows[j].to(saved.dtype)
                                for j, i in enumerate(module.ids)])
    return out


def _trained_ids(model: nn.Module, trained) -> dict[str, list[int]]:
    """{module path: the token ids whose rows the adapter settings `trained` train there}: LoRA's
    trainable_token_indices, or the trainable tokens method's token_indices on each module it adapts."""
    from peftkit.adapters import adapter_layers
    from peftkit.methods.token_rows import _wanted

    if trained.method == "trainable_tokens":
        return {path: list(trained.token_indices) for path in adapter_layers(model)}
    given = getattr(trained, "trainable_token_indices", None)
    return {path: list(rows) for path, rows in _wanted(model, given).items()} if given else {}
