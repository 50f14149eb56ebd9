"""The module that takes an adapted module's place in a model with named adapters (`peftkit.adapters.named`):
`AdapterHost` holds the frozen base module and, by adapter name, each adapter's module wrapping that same base,
and its forward picks among them: the active adapter (or the base), each row's adapter in a mixed batch (the
base computed once, plain LoRA linear adapters stacked into two batched matmuls), or Arrow's per-token mix.
"""

from __future__ import annotations

import torch
from torch import nn

from peftkit.adapters.arrow import ArrowLayer
from peftkit.errors import PeftkitError
from peftkit.methods.lora_layers import LoraEmbedding, LoraLinear, plus_update


class _ByName(nn.ModuleDict):
    """{adapter name: module}. torch refuses a module key with a '.' (`v1.2`) or one that is an attribute of the
    dict (`train`, `keys`, `to`): each name is kept under '@' + the name with ':' for '.', which no name holds."""

    @staticmethod
    def _key(name: str) -> str:
        return "@" + name.replace(".", ":")

    def __getitem__(self, name: str) -> nn.Module:
        return super().__getitem__(self._key(name))

    def __setitem__(self, name: str, module: nn.Module) -> None:
        super().__setitem__(self._key(name), module)

    def __delitem__(self, name: str) -> None:
        super().__delitem__(self._key(name))

    def __contains__(self, name: str | None) -> bool:
        return name is not None and super().__contains__(self._key(name))


class AdapterHost(nn.Module):
    """A module of a model with named adapters: the frozen base module and, by adapter name, the module that
    replaces it for that adapter (a method layer wrapping the same base, or a `modules_to_save` copy)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = _ByName()
        self.active: str | None = None
        self.routes: tuple[int, list[tuple[str, torch.Tensor]]] | None = None
        """In a mixed batch: (rows in the batch, [(adapter name, its row indices)]) for the adapters held here."""
        self._stacked: tuple[torch.Tensor, ...] | None = None
        self.tokens: int | None = None
        """In a mixed batch: the tokens of each row in the model's current forward (`NamedAdapters.routed` sets it),
        so that a layer given the batch's tokens flattened to (rows x tokens, features) routes them by row."""
        self.arrow: ArrowLayer | None = None
        """Under `NamedAdapters.arrow`: the task adapters this layer routes each token among."""

    @property
    def weight(self) -> torch.Tensor:
        # As AdapterLayer: transformers' dtype/device probes read `module.weight`.
        return self.base_layer.weight

    def route(self, batch: int, groups: list[tuple[str, torch.Tensor]] | None) -> None:
        """Start (or with None, end) a mixed batch of `batch` rows, `groups` giving each adapter's rows."""
        self.routes = None if groups is None else (batch, [(n, rows) for n, rows in groups if n in self.adapters])
        lora = [(n, rows) for n, rows in (self.routes or (0, []))[1] if stackable(self.adapters[n])]
        self._stacked = _stack_lora([self.adapters[n] for n, _ in lora], [rows for _, rows in lora], batch) if lora else None

    def forward(self, *args, **kwargs):
        if self.arrow is not None:
            return self._arrow(*args, **kwargs)
        if self.routes is not None and self.routes[1]:
            return self._mixed(*args, **kwargs)
        module = self.adapters[self.active] if self.active in self.adapters else self.base_layer
        return module(*args, **kwargs)

    def _mixed(self, x: torch.Tensor) -> torch.Tensor:
        """Each row through its own adapter's module (or the base), the base computed once for all rows. A layer
        given the tokens flattened, (rows x tokens, features), as OPT's feed-forward and Qwen2-MoE's shared expert
        are, routes each row's tokens (consecutive there) as that row."""
        batch, groups = self.routes
        per = self._tokens_per_row(x, batch)
        result = self.base_layer(x)
        if self._stacked is not None:  # every LoRA linear adapter at once: two batched matmuls, whatever their number
            a, b, scale, slot = self._stacked
            h = torch.bmm(x.reshape(batch, -1, a.shape[-1]).to(a.dtype), a[slot].transpose(1, 2))
            update = (torch.bmm(h, b[slot].transpose(1, 2)) * scale[slot][:, None, None]).reshape(result.shape)
            # rounded as each row's adapter alone rounds it (`LoraLinear.forward`): a zero update leaves a row's bits
            result = plus_update(self.base_layer, result, update)
        for name, rows in groups:
            layer, rows = self.adapters[name], rows.to(x.device)
            if stackable(layer):
                continue
            if per > 1:  # the row's tokens, flattened
                rows = (rows[:, None] * per + torch.arange(per, device=x.device)).flatten()
            if type(layer) is LoraEmbedding:
                result = result.index_copy(0, rows, (result[rows] + layer.update(x[rows])).to(result.dtype))
            else:  # a layer that does more than add (DoRA, IA3, lora_bias...) or a modules_to_save copy: rows whole
                result = result.index_copy(0, rows, layer(x[rows]).to(result.dtype))
        return result

    def _tokens_per_row(self, x: torch.Tensor, batch: int) -> int:
        """1 for an input of `batch` rows; the tokens of each row for the batch's tokens flattened; else an error."""
        if x.shape[0] == batch:
            return 1
        if x.dim() == 2 and self.tokens and x.shape[0] == batch * self.tokens:
            return self.tokens
        raise PeftkitError(f"A mixed batch routes {batch} rows, but this forward has {x.shape[0]} (beam search or "
                           "several samples per prompt multiply the rows; route each copy of a row).")

    def _arrow(self, x: torch.Tensor) -> torch.Tensor:
        """The base's output plus each token's Arrow-weighed adapter updates, rounded as one LoRA's update is."""
        return plus_update(self.base_layer, self.base_layer(x), self.arrow.update(x))


def stackable(layer: nn.Module) -> bool:
    """A plain LoRA linear layer, whose update `_stack_lora` batches (not one with lora_bias)."""
    return type(layer) is LoraLinear and layer.lora_B.bias is None


def _stack_lora(layers: list[LoraLinear], rows: list[torch.Tensor], batch: int) -> tuple[torch.Tensor, ...]:
    """(A (k+1, r, in), B (k+1, out, r), scaling (k+1,), each row's slot (batch,)) for k LoRA layers of one base:
    slot 0 is all zeros (the rows of the base or of another method), a lower rank is padded with zeros (exact)."""
    first = layers[0].lora_A.weight
    r = max(layer.lora_A.weight.shape[0] for layer in layers)
    a = first.new_zeros(len(layers) + 1, r, first.shape[1])
    b = first.new_zeros(len(layers) + 1, layers[0].lora_B.weight.shape[0], r)
    scale = first.new_zeros(len(layers) + 1)
    slot = torch.zeros(batch, dtype=torch.long, device=first.device)
    with torch.no_grad():
        for k, (layer, row) in enumerate(zip(layers, rows, strict=True), start=1):
            rank = layer.lora_A.weight.shape[0]
            a[k, :rank], b[k, :, :rank], scale[k] = layer.lora_A.weight, layer.lora_B.weight, layer.scaling
            slot[row.to(first.device)] = k
    return a, b, scale, slot
