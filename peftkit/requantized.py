"""How much of an adapter's update `peftkit merge --requantize` keeps in OUTPUT-nf4.

Re-quantizing rounds each merged weight W0 + dW to 4 bits again, R = deq(Q(W0 + dW)). What the 4-bit model carries of
the update is R - B, B = deq(Q(W0)) the base quantized the same way: for a 16/32-bit base what loading it 4-bit gives;
for a QLoRA adapter, whose W0 is already the dequantized NF4 base, its own codes, but not W0 itself: double
quantization's absmax is stored as 8 bits around its mean, which quantizing again moves (SmolLM2-135M's layer 0
q_proj: 0.82034 -> 0.82038), and with it every weight, by up to 0.0044 there, four times its 4-step LoRA update. Over
every 4-bit weight the merge changed (sums over layers, so a layer counts by the size of its update, not one vote each):

    kept   = sum <R - B, dW> / sum <dW, dW>                 the least-squares k of R - B ~ k dW
    across = sqrt(sum |R - B - kept dW|^2 / sum <dW, dW>)   what rounding added that is not along dW

kept is 1 where the update passes whole and 0 where rounding gave the base's codes back; across is the noise, in units
of the update's size. Read together they do not mislead for any kind of update:

- An additive update (LoRA, DoRA, LoHa, LoKr, VeRA) below half a 4-bit step over a QLoRA base, whose weights sit on
  the codes, gives them back: kept near 0, few codes changed (across, a fraction of the update, is the absmax's
  drift).
- Over a 16/32-bit base the weights lie anywhere between two codes, so a small update tips some over a midpoint: kept
  near 1 on average, but across several times 1 (a whole step here and there, none elsewhere).
- IA3 on an attention layer scales its weight's rows, and so the blocks' absmax, keeping every code: kept near 1 with
  no code changed (the codes count alone would say nothing survived), but double quantization's 8-bit absmax rounds
  a scale very close to 1 away. On a feed-forward layer it scales columns, moving codes as an additive update does.
- OFT rotates each row's weights, moving codes wherever a weight moves past half a step: kept is the part of the
  rotation that survives, across the rounding's scatter.

Measured on SmolLM2-135M-Instruct (recipes/qlora.yaml, 4 steps; eval loss of OUTPUT-nf4, its 4-bit base 2.646): LoRA
r 8 keeps 0.2 %, no code changed (2.631; the adapter 0.386); IA3 78.0 %, no code changed (0.315; the adapter 0.335);
OFT -0.1 %, 50 codes changed (2.577; the adapter 0.463).

Weights left in full precision (embeddings, norms, the output head) keep their update whole; they are named apart.
Memory: one layer's weights at a time (W0, the merged weight, R, B), beside the models the merge holds already.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

LEAST_KEPT = 3
"""How many layers the printed line names, those that keep the least of their update."""


@torch.no_grad()
def update_kept(quantized: nn.Module, merged: nn.Module, base: dict[str, Callable[[], torch.Tensor]]) -> dict:
    """What `quantized` (the merged model loaded 4-bit) keeps of the update `merged` holds over `base`, the weights the
    merge started from (`peftkit.merge_weights.base_tensors`): the record DIR-nf4's peftkit.json holds as
    `requantized` (the module docstring defines kept and across).

    Returns:
        {kept, across, codes_changed, codes (all the model's 4-bit codes), layers: {name: {kept, across,
        codes_changed, codes}} of the 4-bit weights the merge changed, full_precision: [the names of weights it changed
        that stay 16/32-bit]}.
    """
    from peftkit.merge_weights import quantized_codes

    merged_state = merged.state_dict()
    layers, totals, codes, four_bit = {}, torch.zeros(3, dtype=torch.float64), 0, set()
    for name, module in quantized.named_modules():
        if getattr(getattr(module, "weight", None), "quant_state", None) is None:
            continue
        r_codes, r_state = quantized_codes(module)
        codes += r_state.shape.numel()
        four_bit.add(key := f"{name}.weight")
        if key not in base:  # (a weight the adapted model did not have: nothing to compare with)
            continue
        layout = (lambda t: t.T) if _transposed(module) else (lambda t: t)  # GPT-2's Conv1D: quantized as (out, in)
        w0 = layout(base[key]()).to(r_state.dtype).contiguous()
        update = layout(merged_state[key]).float() - w0.float()
        if not update.any():
            continue
        sums, changed = _layer_sums(w0, update, r_codes, r_state)
        totals += sums
        layers[name] = _figures(sums) | {"codes_changed": changed, "codes": r_state.shape.numel()}
    return _figures(totals) | {
        "codes_changed": sum(layer["codes_changed"] for layer in layers.values()), "codes": codes, "layers": layers,
        "full_precision": _changed_in_full_precision(merged_state, base, four_bit)}


def _transposed(module: nn.Module) -> bool:
    """A 4-bit layer transformers made from GPT-2's Conv1D: it quantized the (out, in) transpose of the plain model's
    (in, out) weight."""
    from peftkit.methods.layer import from_conv1d

    return from_conv1d(module)


def _layer_sums(w0: torch.Tensor, update: torch.Tensor, r_codes: torch.Tensor, r_state) -> tuple[torch.Tensor, int]:
    """(<D, dW>, <dW, dW>, <D, D>) in float64 for D = R - B, and how many 4-bit codes R changed against B: W0
    quantized here as the re-quantized layer was (its block size, data type, double quantization, input dtype)."""
    import bitsandbytes.functional as bnbF

    b_codes, b_state = bnbF.quantize_4bit(w0, blocksize=r_state.blocksize, compress_statistics=r_state.nested,
                                          quant_type=r_state.quant_type, quant_storage=r_codes.dtype)
    change = (bnbF.dequantize_4bit(r_codes, r_state).double()
              - bnbF.dequantize_4bit(b_codes, b_state).double()).reshape(update.shape)
    update = update.double()
    differ = r_codes.view(torch.uint8) ^ b_codes.view(torch.uint8)  # two codes a byte
    changed = int((differ & 0x0F).count_nonzero() + (differ >> 4).count_nonzero())
    return torch.stack([(change * update).sum(), (update * update).sum(), (change * change).sum()]), changed


def _figures(sums: torch.Tensor) -> dict:
    """kept and across from (<D, dW>, <dW, dW>, <D, D>): |D - k dW|^2 = <D, D> - k <D, dW> at the least-squares k."""
    along, size, change = (float(s) for s in sums)
    if size == 0:
        return {"kept": None, "across": None}
    kept = along / size
    return {"kept": kept, "across": max(change - kept * along, 0.0) ** 0.5 / size ** 0.5}


def _changed_in_full_precision(merged_state: dict, base: dict, four_bit: set[str]) -> list[str]:
    """The weights the merge changed that the 4-bit model keeps in 16/32 bits (embeddings, norms, the head)."""
    changed = []
    for key, value in merged_state.items():
        if key in four_bit or key not in base or not value.is_floating_point():
            continue
        if not torch.equal(value, base[key]().to(value.dtype)):
            changed.append(key)
    return changed


def kept_line(record: dict, directory) -> str:
    """What `peftkit merge --requantize` prints from DIR-nf4's record (`update_kept`): two lines at most."""
    if record["kept"] is None:
        lines = [f"{directory} holds no update in its 4-bit weights: the merge changed none of them."]
    else:
        least = sorted(record["layers"].items(), key=lambda item: item[1]["kept"])[:LEAST_KEPT]
        lines = [(f"{directory} keeps {_percent(record['kept'])} of the adapter's update to its 4-bit weights "
                  f"({record['codes_changed']:,} of {record['codes']:,} 4-bit codes changed; rounding added noise "
                  f"{_percent(record['across'])} of the update's size)."),
                 "Least kept: " + ", ".join(f"{name} {_percent(layer['kept'])}" for name, layer in least) + "."]
    if names := record["full_precision"]:
        more = f" and {len(names) - LEAST_KEPT} more" if len(names) > LEAST_KEPT else ""
        lines[-1] += f" Kept whole in full precision: {', '.join(names[:LEAST_KEPT])}{more}."
    return "\n".join(lines)


def _percent(fraction: float) -> str:
    return f"{round(100 * fraction, 1) + 0.0:.1f} %"  # (+ 0.0: -0.0 reads 0.0)
