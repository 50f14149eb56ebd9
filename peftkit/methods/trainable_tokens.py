"""Trainable tokens (peft's TRAINABLE_TOKENS): rows of the embeddings trained, the rest of the model frozen, e.g. the
embeddings of new special tokens. `method: trainable_tokens` trains them alone; LoRA's `trainable_token_indices`
trains them beside LoRA (`peftkit.methods.token_rows`). Both compute with `ReplacedRows`.

Saved as peft saves them: `<path>.trainable_tokens_delta`, (len(ids), dim), row j the new value of token ids[j]:
values, not differences from the base (peft's name notwithstanding), starting as the base's rows (fp32). A linear head
tied to the embeddings (tie_word_embeddings) is wrapped too and holds the embeddings' own tensor, so its logits of
those tokens use the trained rows, as peft's; the file carries it under both names, as peft's does.

The forward never copies the whole matrix (peft's does, each call: `weight.index_copy`): the embedding looks the
base up and puts the trained rows where the ids are trained (`torch.where` over a token -> row table, no host
sync); the head computes the trained tokens' logits alone and writes them into the base's logits. The values are
peft's: a lookup is a copy, so the embedding's are bit for bit; a logit is the same dot product, summed in another
order (float rounding). The embedding's padding row, if trained, gets no gradient, as in the base lookup. A merge
writes the rows into the weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.nn import functional as F

from peftkit.errors import PeftkitError
from peftkit.methods.base import Method, PeftConfigBase, targets_from_peft
from peftkit.methods.layer import AdapterLayer
from peftkit.section import AdapterSection, TargetRegex, none_saved

TokenIds = list[Annotated[int, Field(ge=0)]]
TokenIndices = TokenIds | dict[str, TokenIds] | None



def check_indices(value: TokenIndices) -> TokenIndices:
    if value is None:
        return value
    if not value:
        raise ValueError("is empty; give the token ids whose embedding rows train")
    for name, ids in (value.items() if isinstance(value, dict) else [("", value)]):
        where = f" for {name!r}" if name else ""
        if not ids:
            raise ValueError(f"the list of token ids{where} is empty; give the ids whose embeddings train")
        if len(set(ids)) != len(ids):
            twice = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"token ids{where} given twice: {twice}; give each once")
    return value


ROWS_PARAM = "trainable_tokens_delta"
"""The trained rows' tensor name after a module path (peft's; under LoRA, after `token_adapter.`)."""


class ReplacedRows:
    """The lookup (or head) with rows `ids` of the base layer's weight replaced by `rows`: what peft's
    `TrainableTokensLayer` computes, shared by LoRA's `TokenAdapter` and the method's `TokenLayer`."""

    base_layer: nn.Module
    rows: torch.Tensor

    def _setup(self, base_layer: nn.Module, ids: list[int]) -> None:
        self.ids = list(ids)
        self.num_rows = base_layer.weight.shape[0]  # (read now: under ZeRO-3 the weight is a shard later)
        padding = getattr(base_layer, "padding_idx", None)
        self.padding_row = self.ids.index(padding) if padding in self.ids else None
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(the ids, and token id -> row or -1 over the vocabulary) on `device`, made once per device (a tensor made
        from a list in the forward would copy from the host at every call)."""
        if device not in self._tables:
            ids = torch.tensor(self.ids, device=device)
            lookup = torch.full((self.num_rows,), -1, dtype=torch.long, device=device)
            lookup[ids] = torch.arange(len(self.ids), device=device)
            self._tables[device] = ids, lookup
        return self._tables[device]

    def replace_rows(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out`, the base layer's output for `x`, with the trained rows' values where they apply."""
        weight = self.base_layer.weight
        if isinstance(self.base_layer, nn.Embedding):
            _, lookup = self.tables(x.device)
            row = lookup[x]
            # The embedding's padding row, if trained, gets no gradient (as the base lookup's, and peft's).
            new = F.embedding(row.clamp(min=0), self.rows.to(weight.dtype), padding_idx=self.padding_row)
            if (scale := getattr(self.base_layer, "embed_scale", None)) is not None:  # Gemma's scaled lookup
                new = new * scale.to(new.dtype)
            return torch.where((row >= 0).unsqueeze(-1), new.to(out.dtype), out)
        ids, _ = self.tables(x.device)
        logits = F.linear(x, self.rows.to(x.dtype))
        if self.base_layer.bias is not None:
            logits = logits + self.base_layer.bias[ids].to(logits.dtype)
        # (in place: the head's output is no tensor its backward keeps)
        return out.index_copy_(-1, ids, logits.to(out.dtype))


def initial_rows(base_layer: nn.Module, ids: list[int]) -> nn.Parameter:
    """The base's rows `ids`, as the trained rows' start: fp32 whatever the base's dtype, as every adapter weight
    (cast to the base's in the forward)."""
    rows = base_layer.weight.detach()[torch.tensor(ids, device=base_layer.weight.device)]
    return nn.Parameter(rows.float().clone())


def replace_module(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
    return module


class TrainableTokensConfig(AdapterSection):
    """peft's TRAINABLE_TOKENS method: rows of the embeddings train, and nothing else (no LoRA)."""

    method: Literal["trainable_tokens"] = "trainable_tokens"
    token_indices: TokenIds
    """Token ids whose embedding rows train (e.g. new special tokens; give the model rows for them first)."""
    target_modules: list[str] | TargetRegex | None = None
    """The embeddings to train rows of: null for the model's input embeddings (peft's default); names or {regex}."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Not supported here (always empty): use LoRA's trainable_token_indices beside modules_to_save."""

    _indices = field_validator("token_indices")(lambda value: check_indices(value))

    _none_saved = field_validator("modules_to_save")(lambda value: none_saved(
        value, "trainable tokens train rows of the embeddings only (peft's method has no modules_to_save); remove it, "
        "or use method: lora with trainable_token_indices"))


class PeftTrainableTokensConfig(PeftConfigBase):
    """The fields of a TRAINABLE_TOKENS adapter_config.json that peftkit reads."""

    token_indices: TokenIds
    _indices = field_validator("token_indices")(lambda value: check_indices(value))


@dataclass(frozen=True)
class TokenFacts:
    ids: tuple[int, ...]


class TokenLayer(ReplacedRows, AdapterLayer):
    """The method's layer, where the embedding (or a head tied to it) was: keys `<path>.trainable_tokens_delta`, as
    peft's. A tied head holds the embedding's own Parameter (`TrainableTokens.link_layers`): one tensor, saved under
    both names, as peft saves it."""

    def __init__(self, base_layer: nn.Module, ids: list[int]) -> None:
        super().__init__(base_layer)
        self._setup(base_layer, ids)
        self.facts = TokenFacts(tuple(ids))
        self.trainable_tokens_delta = initial_rows(base_layer, self.ids)

    @property
    def rows(self) -> torch.Tensor:
        return self.trainable_tokens_delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        return out if self.merged else self.replace_rows(x, out)

    # The rows a merge overwrites are kept on the weight itself, for the unmerge: an embedding and the head tied to it
    # are two layers over one weight, merged and unmerged in either order, and only the first merge sees the base's.
    def merge(self) -> None:
        weight = self.base_layer.weight
        if not self.merged and not hasattr(weight, "_peftkit_rows"):
            weight._peftkit_rows = weight.detach()[list(self.ids)].clone()
        super().merge()

    def unmerge(self) -> None:
        weight = self.base_layer.weight
        if self.merged and hasattr(weight, "_peftkit_rows"):
            with torch.no_grad():
                weight[list(self.ids)] = weight._peftkit_rows
            del weight._peftkit_rows
        self.merged = False


def refuse_past_rows(module: nn.Module, ids: list[int], key: str, path: str, resized: bool) -> None:
    """Refuse an id of `key` past the rows of `module` (at `path`). `resized`: whether it is the input embeddings or
    the output head, whose rows are the tokenizer's and which model.add_tokens resizes; another embedding's rows (BERT's
    two token types, learned positions) are no token's, and no resize adds to them."""
    rows = module.weight.shape[0]
    if not (past := [i for i in ids if i >= rows]):
        return
    fix = ("Resize the embeddings first (the tokenizer's new tokens need rows)." if resized else
           "model.add_tokens resizes the input embeddings and the output head only: this embedding's rows are not "
           f"the tokenizer's ids, and stay {rows}. Give ids below {rows}, or name the input embeddings.")
    raise PeftkitError(f"{key}: token id {past[0]} is past the {rows} rows of '{path}'. {fix}")


class TrainableTokens(Method):
    name = "trainable_tokens"
    title = "Trainable tokens"
    peft_type = "TRAINABLE_TOKENS"
    config = TrainableTokensConfig
    peft_config = PeftTrainableTokensConfig
    param_names = (ROWS_PARAM,)
    merges_tied = True

    @classmethod
    def select_targets(cls, model: nn.Module, cfg: TrainableTokensConfig, every_entry: bool) -> list[str]:
        from peftkit.adapters import find_targets  # (peftkit.adapters imports this module)

        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
        if cfg.target_modules is None:
            names = [next(path for path, module in model.named_modules() if module is embedding)]
        else:
            names = find_targets(model, cfg.target_modules, every_entry)
        for path in names:
            module = model.get_submodule(path)
            if not isinstance(module, nn.Embedding) and module is not head:
                raise PeftkitError(f"adapter.target_modules: '{path}' is a {type(module).__name__}; trainable tokens "
                                   "take rows of an embedding (or of the output head): name the embeddings, or leave "
                                   "target_modules null for the input embeddings.")
            if type(module) is nn.Linear or isinstance(module, nn.Embedding):  # (a quantized head: `wrap` refuses it)
                resized = module is embedding or module is head
                refuse_past_rows(module, cfg.token_indices, "adapter.token_indices", path, resized)
        return names

    @classmethod
    def wrap(cls, base: nn.Module, cfg: TrainableTokensConfig, path: str) -> TokenLayer:
        if type(base) is not nn.Linear and not isinstance(base, nn.Embedding):  # (a quantized head: no rows)
            raise PeftkitError(f"adapter.target_modules: '{path}' is a {type(base).__name__}; trainable tokens take "
                               "rows of an embedding (or of a plain linear output head).")
        return TokenLayer(base, cfg.token_indices)

    @classmethod
    def link_layers(cls, model: nn.Module, cfg: TrainableTokensConfig, layers: dict[str, AdapterLayer]) -> None:
        """A linear head tied to a wrapped embedding (tie_word_embeddings) holds the embedding's rows, so its logits
        of those tokens use them, as peft ties it: wrapped for the purpose, or, named in target_modules too, given
        the embedding's rows in place of its own (peft means to; 0.21 fails on it)."""
        for layer in [layer for layer in layers.values() if isinstance(layer.base_layer, nn.Embedding)]:
            for path, module in list(model.named_modules()):
                inside = any(path.startswith(f"{wrapped}.") for wrapped in layers)
                if isinstance(module, TokenLayer) and module is not layer and module.base_layer.weight is \
                        layer.base_layer.weight:
                    module.trainable_tokens_delta = layer.trainable_tokens_delta
                elif type(module) is nn.Linear and module.weight is layer.base_layer.weight and not inside:
                    head = replace_module(model, path, TokenLayer(module, layer.ids))
                    head.trainable_tokens_delta = layer.trainable_tokens_delta
                    layers[path] = head

    @classmethod
    def layer_facts(cls, cfg: TrainableTokensConfig, path: str, fan_in_fan_out: bool) -> TokenFacts:
        return TokenFacts(tuple(cfg.token_indices))

    @staticmethod
    def merge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: TokenFacts) -> torch.Tensor:
        rows = parts["trainable_tokens_delta"]
        if len(facts.ids) != rows.shape[0] or max(facts.ids) >= weight.shape[0]:
            raise PeftkitError(f"The adapter's {rows.shape[0]} trained rows do not fit its token_indices "
                               f"({len(facts.ids)} ids, up to {max(facts.ids)}) and a weight of {weight.shape[0]} "
                               "rows.")
        return weight.index_copy(0, torch.tensor(facts.ids, device=weight.device), rows.to(weight))

    @staticmethod
    def unmerge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: TokenFacts) -> torch.Tensor:
        raise PeftkitError("A merge of trained token rows overwrote the base's; the layer's unmerge() kept them.")

    @staticmethod
    def update_shape(parts: dict[str, torch.Tensor], facts: TokenFacts) -> tuple[int | None, ...]:
        return None, parts["trainable_tokens_delta"].shape[1]

    @classmethod
    def to_peft(cls, cfg: TrainableTokensConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        common = cls.peft_common(cfg, targets, base_name)
        return {k: common[k] for k in ("peft_type", "task_type", "base_model_name_or_path", "target_modules",
                                       "inference_mode", "revision")} | {
            "token_indices": list(cfg.token_indices), "init_weights": True}

    @classmethod
    def from_peft(cls, peft: PeftTrainableTokensConfig, config_file: Path) -> TrainableTokensConfig:
        targets = None if peft.target_modules is None else targets_from_peft(peft.target_modules, config_file)
        return TrainableTokensConfig(token_indices=peft.token_indices, target_modules=targets)

    @classmethod
    def describe(cls, cfg: TrainableTokensConfig) -> str:
        return f"Trainable tokens ({len(cfg.token_indices)} rows)"


TokenLayer.method = TrainableTokens
