"""LoRA's `trainable_token_indices` (peft's): a few rows of an embedding trained beside LoRA, the rest frozen, e.g. for
new special tokens (a chat template's) without training the whole embedding as modules_to_save.

`adapter.trainable_token_indices` is a list of token ids (rows of the model's input embeddings) or {module name:
ids} (`{embed_tokens: [...], lm_head: [...]}`, names matched as modules_to_save's). Each named module is wrapped
as peft wraps it (`TrainableTokensWrapper` around a `TrainableTokensLayer`), so the keys are peft's:

- the trained rows: `<path>.token_adapter.trainable_tokens_delta`, (len(ids), dim), row j the new value of token
  ids[j]: values, not differences from the base (peft's name notwithstanding), starting as the base's rows;
- the frozen base: `<path>.token_adapter.base_layer.weight`.

Where the model ties its output head to the input embeddings (tie_word_embeddings) and the list form (or the
embeddings' own entry) is given, the head is wrapped too, sharing the embedding's rows (and saving none of its own),
as peft does: the head's logits for those tokens use the trained rows. As in peft, a head named with other ids
trains rows of its own instead; under an adapter layer (LoRA on lm_head) the head's base layer takes the rows.

The rows compute as the trainable tokens method's (`peftkit.methods.trainable_tokens.ReplacedRows`: no copy of the
whole matrix per forward). A merge writes them into the weight (`merge_rows`).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import field_validator
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.methods.base import PeftConfigBase
from peftkit.methods.layer import refuse_non_lookup, suffix_match
from peftkit.methods.trainable_tokens import (ReplacedRows, TokenIndices, check_indices, initial_rows,
                                              refuse_past_rows, replace_module)
from peftkit.section import AdapterSection

TOKEN_ROWS = "token_adapter.trainable_tokens_delta"
"""A wrapper's trained rows, after its module path (the key peft saves)."""

class TrainableTokenIndices(AdapterSection):
    """The `adapter` key that trains rows of an embedding."""

    trainable_token_indices: TokenIndices = None
    """Token ids whose embedding rows train (new special tokens), the rest of the embedding frozen: a list (the
    input embeddings, and a head tied to them) or {module name: ids}. Saved as peft's."""

    _indices = field_validator("trainable_token_indices")(lambda value: check_indices(value))


class PeftTrainableTokens(PeftConfigBase):
    """adapter_config.json's trainable_token_indices."""

    trainable_token_indices: TokenIndices = None
    _indices = field_validator("trainable_token_indices")(lambda value: check_indices(value))

    def token_settings(self) -> dict[str, Any]:
        return {"trainable_token_indices": self.trainable_token_indices} if self.trainable_token_indices else {}


class TokenAdapter(ReplacedRows, nn.Module):
    """peft's `TrainableTokensLayer` as LoRA's `trainable_token_indices` nests it: the frozen `base_layer` (an
    embedding, or a linear output head) with the rows `ids` of its weight replaced by `trainable_tokens_delta`, or by
    those of `source` (a head tied to the embedding), which it holds outside its own modules, so that they are
    saved once."""

    def __init__(self, base_layer: nn.Module, ids: list[int], source: TokenAdapter | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._setup(base_layer, ids)
        self._source = [source] if source is not None else []
        if source is None:
            self.trainable_tokens_delta = initial_rows(base_layer, self.ids)

    @property
    def rows(self) -> torch.Tensor:
        return self._source[0].trainable_tokens_delta if self._source else self.trainable_tokens_delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.replace_rows(x, self.base_layer(x))

    def merged_weight(self) -> torch.Tensor:
        """The base weight with the rows replaced (peft's `get_merged_weights`); the base's as it is where either is a
        shard (ZeRO-3's flat one outside a forward, FSDP2's DTensor), of which only the dtype and device mean much."""
        from torch.distributed.tensor import DTensor

        weight = self.base_layer.weight
        if weight.dim() != 2 or self.rows.dim() != 2 or isinstance(weight, DTensor) or isinstance(self.rows, DTensor):
            return weight
        ids, _ = self.tables(weight.device)
        return weight.index_copy(0, ids, self.rows.detach().to(weight.dtype))


class TokenRows(nn.Module):
    """peft's `TrainableTokensWrapper`, put where the embedding (or tied head) was: its `token_adapter` does the
    work; `weight` is the merged weight, as peft's wrapper answers it (code that reads an embedding's weight)."""

    def __init__(self, base_layer: nn.Module, ids: list[int], source: TokenRows | None = None) -> None:
        super().__init__()
        self.token_adapter = TokenAdapter(base_layer, ids, source.token_adapter if source is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.token_adapter(x)

    @property
    def weight(self) -> torch.Tensor:
        return self.token_adapter.merged_weight()

    @property
    def tied(self) -> bool:
        return bool(self.token_adapter._source)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The trained rows under their key after the module's path; none for a tied head."""
        return {} if self.tied else {TOKEN_ROWS: self.token_adapter.trainable_tokens_delta}


def token_wrappers(model: nn.Module) -> dict[str, TokenRows]:
    """The trainable-token wrappers of an injected model, by full path."""
    return {n: m for n, m in model.named_modules() if isinstance(m, TokenRows)}


def without_tied_copies(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` without the rows peft saves for a head tied to the embeddings (`lm_head.token_adapter.
    trainable_tokens_delta`: its tied layer holds the embeddings' rows as an attribute of its own, so they are saved
    twice), where they equal the embeddings' saved rows: here a tied head holds none (`TokenRows.tied`), and the copy
    was refused as a weight "for modules this model lacks". A copy that differs is left, to be refused so."""
    from peftkit.adapters import PEFT_PREFIX  # (peftkit.adapters imports this module)

    paths = {id(module): name for name, module in model.named_modules()}
    out = dict(state)
    for path, wrapper in token_wrappers(model).items():
        if not wrapper.tied:
            continue
        key = f"{PEFT_PREFIX}{path}.{TOKEN_ROWS}"
        source = f"{PEFT_PREFIX}{paths[id(wrapper.token_adapter._source[0])]}.trainable_tokens_delta"
        if key in out and source in out and torch.equal(out[key], out[source]):
            del out[key]
    return out


def plain_name(name: str) -> str:
    """A module or tensor path of an injected model as the base model has it (wrappers taken out)."""
    return name.replace(".token_adapter.base_layer", "").replace(".base_layer", "")


def _wanted(model: nn.Module, indices: TokenIndices) -> dict[str, list[int]]:
    """{full module path: ids} that `indices` names: a list is the input embeddings'; a dict's names match as
    modules_to_save's (a path, or its end after a dot)."""
    if not isinstance(indices, dict):
        embedding = model.get_input_embeddings()
        path = next(n for n, m in model.named_modules() if m is embedding)
        return {path: indices}
    wanted: dict[str, list[int]] = {}
    for name, ids in indices.items():
        hits = [n for n, _ in model.named_modules() if n and suffix_match(n, name)]
        if not hits:
            raise PeftkitError(f"adapter.trainable_token_indices: {name!r} names no module of this model; name its "
                               "embeddings (e.g. embed_tokens) or output head (lm_head).")
        wanted.update(dict.fromkeys(hits, ids))
    return wanted


def inject_token_rows(model: nn.Module, indices: TokenIndices, saved: list[str]) -> list[str]:
    """Wrap the modules `indices` (trainable_token_indices) names, and the heads tied to a wrapped input embedding;
    their rows train. `saved`: modules_to_save's full paths, which may not be named too. Returns the wrapped paths.

    Tying as peft's: a linear head sharing the embeddings' weight uses the embeddings' rows (and saves none) unless
    it is named with other ids (then each trains its own rows); where an adapter layer wraps it, its base layer."""
    if not indices:
        return []
    wanted = _wanted(model, indices)
    embedding = model.get_input_embeddings()
    tied = [path for path, module in model.named_modules()
            if module is not embedding and getattr(module, "weight", None) is embedding.weight]
    embedding_path = next(path for path, module in model.named_modules() if module is embedding)
    ties = embedding_path in wanted and all(wanted.get(path, wanted[embedding_path]) == wanted[embedding_path]
                                            for path in tied)
    wrapped: dict[str, TokenRows] = {}
    for path, ids in wanted.items():
        if not (ties and path in tied):  # (a tied head named with the embeddings' own ids: tied below)
            wrapped[path] = replace_module(model, path, TokenRows(_wrappable(model, path, saved, ids), ids))
    if ties:
        source = wrapped[embedding_path]
        for path in tied:
            module = model.get_submodule(path)
            # (an adapter layer's `.weight` is its base's: the base layer inside it takes the rows, as in peft)
            if type(module) is nn.Linear:
                wrapped[path] = replace_module(model, path, TokenRows(module, source.token_adapter.ids, source))
    return list(wrapped)


def refuse_saved_tied_head(model: nn.Module, indices: TokenIndices, saved: list[str]) -> None:
    """A recipe that trains rows of the input embeddings and, in modules_to_save, a head tied to them (Gemma's, Qwen2's
    small models'): peft 0.21 wraps that head's saved copy in the embeddings' trained rows, then its forward fails
    ('TrainableTokensLayer wraps an unknown layer type') and it cannot load such an adapter (a KeyError on
    `lm_head.token_adapter.base_layer.weight`), so no peft reads what the run would export. Refused before training;
    a saved adapter of peftkit's with the two still loads here."""
    if not indices or not saved:
        return
    embedding = model.get_input_embeddings()
    if not any(module is embedding for path, module in model.named_modules() if path in _wanted(model, indices)):
        return
    for path in saved:
        head = model.get_submodule(path)
        if head is not embedding and getattr(head, "weight", None) is embedding.weight:
            raise PeftkitError(
                f"adapter.trainable_token_indices trains rows of the input embeddings, and adapter.modules_to_save "
                f"trains '{path}', the output head tied to them, whole: peft 0.21 can neither run nor load that "
                f"adapter (its trained rows wrap the head's copy). Leave '{path}' out of modules_to_save (the tied "
                "head then uses the trained rows, as in peft), or train the embeddings whole too (modules_to_save) "
                "without trainable_token_indices.")


def _wrappable(model: nn.Module, path: str, saved: list[str], ids: list[int]) -> nn.Module:
    """The module at `path`, checked to take trained rows `ids`."""
    module = model.get_submodule(path)
    if path in saved:
        raise PeftkitError(f"adapter.trainable_token_indices: '{path}' is in modules_to_save too, which trains it "
                           "whole; give one of the two.")
    if not isinstance(module, (nn.Embedding, nn.Linear)) or type(module).__module__.startswith("bitsandbytes"):
        raise PeftkitError(f"adapter.trainable_token_indices: '{path}' is a {type(module).__name__}, not an "
                           "embedding or a plain linear output head (an adapter layer already wraps it, or it "
                           "is quantized); name the embeddings, or leave the module out of target_modules.")
    refuse_non_lookup(module, path, "adapter.trainable_token_indices")
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.scale_grad_by_freq):
        raise PeftkitError(f"adapter.trainable_token_indices: '{path}' renormalises its rows or scales their "
                           "gradients by frequency, which trained rows do not do; train it whole (modules_to_save).")
    resized = module is model.get_input_embeddings() or module is model.get_output_embeddings()
    refuse_past_rows(module, ids, "adapter.trainable_token_indices", path, resized)
    return module


def merge_rows(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A plain state dict of the base (`merge.base_state_dict`) with every wrapper's trained rows written into its
    module's weight (a tied head's too, so that the merged model ties them again)."""
    out = dict(state)
    for path, wrapper in token_wrappers(model).items():
        key = f"{plain_name(path)}.weight"
        adapter = wrapper.token_adapter
        rows = adapter.rows.detach().to(out[key].device, out[key].dtype)
        out[key] = out[key].index_copy(0, torch.tensor(adapter.ids, device=out[key].device), rows)
    return out
