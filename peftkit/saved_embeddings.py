"""The embeddings and output head an adapter saved whole, fitted to a run that trains from it (`adapter.init_from`)
with `model.add_tokens`.

peft's `save_embedding_layers` (on by default once the base's vocabulary was resized) writes the resized embeddings
and output head beside the adapter's tensors: a module that trains rows as its frozen base
(`<path>.token_adapter.base_layer.weight`, the trainable tokens method's `<path>.base_layer.weight`), one that trains
nothing as itself (`lm_head.weight`: LoRA's trainable_token_indices on the embeddings alone, over an untied head).
Those matrices hold the base's new rows as that base was resized (a draw of its own), which the adapter's outputs
depend on where no trained rows replace them. A run that adds tokens trains the rows of every module the new tokens
reach (`new_tokens.with_new_rows`: an untied head's too), so it takes those matrices as its frozen bases, each
widened with the run's own new rows, and starts the rows of a module the adapter saved whole from that module's saved
rows: its model at step 0 is the adapter's. A base peft resized past its tokenizer (TRL's setup_chat_format pads to a
multiple of 64: 128 rows for 104 tokens) saved rows no token has; the run's model has the rows of its own tokenizer,
as the exported adapter is loaded again, so those are left out (they did not fit, and training refused to start).
"""

from __future__ import annotations

import torch
from torch import nn


def fitted(model: nn.Module, state: dict[str, torch.Tensor], vocabulary: int | None = None) -> dict[str, torch.Tensor]:
    """init_from's PEFT-keyed `state` with its whole embeddings and head fitted to `model` (injected with the run's
    adapter, its embeddings resized to the run's tokens): a module saved whole that trains rows here becomes the
    frozen base of those rows, and its rows start as its saved ones; every saved matrix of the embeddings or head with
    more rows than the model's keeps those of the adapter's `vocabulary` (its tokenizer's length, where known) that the
    model has, the rest being padding no token reads (`_trim`); every one with fewer rows than the model's gets the
    model's rows past its own (the run's new tokens, drawn as in a run without init_from)."""
    out = dict(state)
    taken = _whole_as_bases(model, out)
    _trim(model, out, vocabulary)
    _widen(model, out)
    for rows, (base, ids) in taken.items():
        out[rows] = out[base][torch.tensor(ids, device=out[base].device)].float()  # (trained rows are fp32)
    return out


def _whole_as_bases(model: nn.Module, out: dict[str, torch.Tensor]) -> dict[str, tuple[str, list[int]]]:
    """Move each `<path>.weight` of `out` whose module trains rows in `model` (and for which `out` holds neither rows
    nor a base) to that module's base key; {its rows' key: (the base key, the ids its rows are)}."""
    from peftkit.adapters import PEFT_PREFIX
    from peftkit.methods.trainable_tokens import ROWS_PARAM, ReplacedRows

    taken = {}
    for name, module in model.named_modules():
        if not isinstance(module, ReplacedRows) or module._parameters.get(ROWS_PARAM) is None:
            continue  # (a head tied to the embeddings' rows holds none of its own)
        rows, base = f"{PEFT_PREFIX}{name}.{ROWS_PARAM}", f"{PEFT_PREFIX}{name}.base_layer.weight"
        whole = f"{PEFT_PREFIX}{name.removesuffix('.token_adapter')}.weight"
        if whole in out and rows not in out and base not in out:
            out[base] = out.pop(whole)
            taken[rows] = (base, module.ids)
    return taken


def oversized(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Whether `state` saves an embeddings or head matrix with more rows than `model`'s: a base peft resized past its
    tokenizer (TRL's setup_chat_format pads to a multiple of 64), whose tokens fit the rows the base has to spare, so
    that no model.add_tokens is asked for. It must be fitted (`fitted`) there too: it was refused as "trained on a
    different base model"."""
    return any(saved.shape[0] > weight.shape[0] for _, saved, weight in _matrices(model, state))


def _trim(model: nn.Module, out: dict[str, torch.Tensor], vocabulary: int | None) -> None:
    """Cut each matrix of `out` with more rows than `model`'s weight (a base peft resized to a multiple of 64) to the
    rows of the adapter's `vocabulary` the model has (all the model's where it is unknown): the rows past the adapter's
    tokens are padding that no token reads, and the model's own rows, drawn as a run without init_from draws them,
    stand for the run's new tokens there (`_widen`)."""
    for key, saved, weight in _matrices(model, out):
        if saved.shape[0] > weight.shape[0]:
            out[key] = saved[:min(weight.shape[0], vocabulary or weight.shape[0])]


def _widen(model: nn.Module, out: dict[str, torch.Tensor]) -> None:
    """Give each matrix of `out` that is `model`'s input embeddings' or output head's weight (itself, or the base of
    its trained rows) and has fewer rows the model's rows past its own."""
    for key, saved, weight in _matrices(model, out):
        if saved.shape[0] < weight.shape[0]:
            out[key] = torch.cat([saved.to(weight.device), weight.detach()[saved.shape[0]:].to(saved.dtype)])


def _matrices(model: nn.Module, out: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(key, saved matrix, `model`'s weight) of each matrix of `out` that is the model's input embeddings' or output
    head's weight (itself, or the base of its trained rows), of the weight's width."""
    from peftkit.adapters import PEFT_PREFIX
    from peftkit.methods.token_rows import plain_name

    paths = {id(module): name for name, module in model.named_modules()}
    layers = {plain_name(paths[id(module)]) for module in (model.get_input_embeddings(), model.get_output_embeddings())
              if module is not None and id(module) in paths}
    params = dict(model.named_parameters(remove_duplicate=False))  # (a tied weight under each of its names)
    found = []
    for key, saved in out.items():
        name = key.removeprefix(PEFT_PREFIX)
        weight = params.get(name)
        if weight is None or plain_name(name).removesuffix(".weight") not in layers:
            continue
        if saved.dim() == weight.dim() == 2 and saved.shape[1] == weight.shape[1]:
            found.append((key, saved, weight))
    return found
