"""How a LoRA layer's A and B start (`adapter.init`, peft's `init_lora_weights`), and the export of an adapter whose
init moved part of the base weight into it.

- default: A kaiming-uniform, B = 0 (the layer's own `reset_parameters`): the update starts at zero.
- gaussian: A ~ N(0, (1/r)^2), B = 0 (peft's "gaussian"); an embedding keeps its default.
- pissa (Meng et al. 2024): with W = U S V^T, B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T (s the scaling), so
  s B A is W's best rank-r part, and the base keeps the residual W - s B A. `pissa_niter` swaps the exact SVD
  for `torch.svd_lowrank` with that many subspace iterations (peft's "pissa_niter_N"; it draws from torch's RNG).
- olora (Büyükakyüz 2024): W = Q R, B = Q[:, :r], A = R[:r], the base keeps W - s B A.

PiSSA and OLoRA keep the model's outputs at step 0 (W - s B0 A0 + s B0 A0 = W) but change the base weights, so
the trained adapter only fits the residual base. The export converts it as peft's `save_pretrained(...,
path_initial_model_for_weight_conversion=...)` does: W_res + s B A = W + s (B A - B0 A0) = W + s' B' A' with
A' = [A; A0], B' = [B, -B0] of rank 2r and alpha doubled (x sqrt(2) with rsLoRA), so that s' = s: a plain LoRA on
the original base. A0 and B0 are kept on the layer (`initial_parts`); a resumed run recomputes them from the
original base, bit for bit, since the init is deterministic after the seed.

peft's own adapters saved without that conversion (adapter_config.json's init_lora_weights still "pissa" or
"olora") fit the residual base, which peft's loading rebuilds by running the init again on the base weights.
`on_original_base` converts them the same way instead, when the base is at hand: A0, B0 are computed again
from the base weights (exact SVD and QR are deterministic), and the adapter becomes the rank-2r plain LoRA above,
so every path after it (merge, several named adapters) sees an ordinary LoRA and the base stays as it is.
"pissa_niter_N" is refused: its randomized SVD gives other A0, B0 on every run, peft's own loading included.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.methods.base import draw_device
from peftkit.methods.layer import AdapterLayer, is_conv1d, is_quantized

MOVES_BASE = ("pissa", "olora")
"""Inits that move part of the base weight into the adapter (and convert at export)."""


def without_niter(pissa_niter: int | None) -> str:
    """For a message that points away from init: pissa, the key that would then be refused in turn."""
    return " (and remove pissa_niter)" if pissa_niter is not None else ""


def initialize(layer: AdapterLayer, init: str, pissa_niter: int | None, path: str) -> None:
    """Give `layer` (a LoRA Linear/Conv1D/Embedding layer) the init `init`; see the module docstring."""
    if init == "default":
        return
    embedding = isinstance(layer.base_layer, nn.Embedding)
    if init == "gaussian":
        if not embedding:  # as peft: an embedding's A is zero and its B normal whatever init says
            a = layer.lora_A.weight
            with torch.no_grad():  # drawn on the CPU, then moved: one seed, one adapter on any device
                a.copy_(torch.empty(a.shape, device=draw_device(a.device)).normal_(std=1 / layer.r))
        return
    if embedding:
        raise PeftkitError(f"adapter.init: {init} decomposes a Linear or Conv1D weight; '{path}' is an Embedding. "
                           f"Leave embeddings out of adapter.target_modules, or use init: default"
                           f"{without_niter(pissa_niter)}.")
    if is_quantized(layer.base_layer):
        # As peft ("initialize PiSSA under float32 ... then re-quantize the residual"): the residual W - s B A
        # would be re-quantized, so the converted adapter would no longer give the trained model on the base.
        raise PeftkitError(
            f"adapter.init: {init} rewrites the base weights as W - s B A, and '{path}' is quantized (bitsandbytes), "
            "so the residual would be re-quantized and the exported adapter would not reproduce the trained model. "
            f"Use init: default or gaussian with a quantized base{without_niter(pissa_niter)}, or drop the "
            "quantization section."
        )
    weight = layer.base_layer.weight
    shape = tuple(weight.shape[::-1] if layer.facts.fan_in_fan_out else weight.shape)  # (out, in)
    if layer.r > min(shape):  # (on the meta model too: validate's and the memory estimate's say it before loading)
        raise PeftkitError(f"adapter.init: {init} takes r directions of '{path}''s {shape} weight; adapter.r "
                           f"({layer.r}) is larger than {min(shape)}. Lower adapter.r, give "
                           f"'{path.rpartition('.')[2]}' a rank of at most {min(shape)} in adapter.rank_pattern or "
                           "leave it out (adapter.exclude_modules), or use init: default.")
    if weight.device.type == "meta":  # the memory estimate's model: shapes only
        return
    w = weight.detach().float()
    w = w.T if layer.facts.fan_in_fan_out else w  # (out, in)
    a, b = (_pissa if init == "pissa" else _olora)(w, layer.r, layer.scaling, pissa_niter)
    residual = w - layer.scaling * b @ a
    with torch.no_grad():
        layer.lora_A.weight.copy_(a)
        layer.lora_B.weight.copy_(b)
        weight.copy_((residual.T if layer.facts.fan_in_fan_out else residual).to(weight.dtype))
    layer.initial_parts = {"lora_A.weight": a.clone(), "lora_B.weight": b.clone()}


def _pissa(w: torch.Tensor, r: int, scaling: float, niter: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) from the r principal singular triplets of `w` (out, in), with s B A = U_r S_r V_r^T."""
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, v = torch.svd_lowrank(w, q=r, niter=niter)
        vh = v.T
    root = torch.sqrt(s / scaling)
    return root[:, None] * vh, u * root[None, :]


def _olora(w: torch.Tensor, r: int, scaling: float, niter: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (R[:r], Q[:, :r]) of the QR decomposition of `w` (out, in), as peft (no division by s)."""
    q, rr = torch.linalg.qr(w)
    return rr[:r].contiguous(), q[:, :r].contiguous()


def for_original_base(layers: dict[str, AdapterLayer], state: dict[str, torch.Tensor],
                      config: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """The exported adapter (PEFT-keyed `state`, adapter_config.json `config`) converted to apply to the original
    base, when its layers' init moved part of the base into it (see the module docstring); else as given."""
    from peftkit.adapters import PEFT_PREFIX  # peftkit.adapters imports the method registry

    moved = {path: layer.initial_parts for path, layer in layers.items() if getattr(layer, "initial_parts", None)}
    if not moved:
        return state, config
    state = dict(state)
    for path, initial in moved.items():
        a_key, b_key = f"{PEFT_PREFIX}{path}.lora_A.weight", f"{PEFT_PREFIX}{path}.lora_B.weight"
        state[a_key] = torch.cat([state[a_key], initial["lora_A.weight"].cpu()], dim=0).contiguous()
        state[b_key] = torch.cat([state[b_key], -initial["lora_B.weight"].cpu()], dim=1).contiguous()
    return state, _converted_config(config)


def _converted_config(config: dict) -> dict:
    """peft's rewrite of the config: r doubles; alpha doubles (alpha / r kept), x sqrt(2) with rsLoRA (alpha /
    sqrt(r) kept); so do rank_pattern's and alpha_pattern's values."""
    factor = math.sqrt(2) if config["use_rslora"] else 2
    return {**config, "r": 2 * config["r"], "lora_alpha": config["lora_alpha"] * factor, "init_lora_weights": True,
            "rank_pattern": {k: 2 * r for k, r in (config.get("rank_pattern") or {}).items()},
            "alpha_pattern": {k: a * factor for k, a in (config.get("alpha_pattern") or {}).items()}}


def _to_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (k, in) and B (out, k) padded with zero rows / columns to `rank` (the converted config's 2r): peft's PiSSA
    and OLoRA take at most min(out, in) directions of a layer (Qwen2-MoE's shared_expert_gate, (1, hidden): one),
    where its config records r for every layer. Zeros change no product; the scaling stays peft's alpha / r."""
    missing = rank - a.shape[0]
    if missing > 0:
        a, b = torch.cat([a, a.new_zeros(missing, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], missing)], dim=1)
    return a.contiguous(), b.contiguous()


def residual_refusal(where: str, path: str | Path, what: str) -> PeftkitError:
    """The error for an unconverted PiSSA/OLoRA adapter from peft (`cfg._residual_init`) where `where` cannot
    convert it (`what`: why not)."""
    return PeftkitError(
        f"{where}: {path} is an adapter peft saved for the residual base its PiSSA or OLoRA init left "
        f"(init_lora_weights in its adapter_config.json), and {what}. Save it again with peft's save_pretrained(..., "
        "path_initial_model_for_weight_conversion=...), which converts it to a plain LoRA; `peftkit merge` (of it "
        "alone), `generate`, `eval` and `chat` load it as it is.")


def shared_weight(model: nn.Module, module: nn.Module) -> str | None:
    """The other name of `module`'s weight in `model` where another module uses it too (a tied lm_head's
    embeddings), else None."""
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is module.weight]
    mine = {f"{n}.weight" for n, m in model.named_modules(remove_duplicate=False) if m is module}
    return next((n for n in names if n not in mine), None)


_CONVERT = ("Save it again with peft's save_pretrained(..., path_initial_model_for_weight_conversion=...), which "
            "converts it to a plain LoRA.")


def base_weight_of(model: nn.Module) -> Callable[[str], tuple[torch.Tensor, bool] | None]:
    """(the weight as stored, whether stored (in, out): Conv1D) of the base layer at a module path of `model`,
    injected or not (None: no such module)."""
    def weight(path: str) -> tuple[torch.Tensor, bool] | None:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            return None  # loading says which of the adapter's modules the model lacks
        module = getattr(module, "base_layer", module)
        why = "peft saved this adapter for the residual base its init left (init_lora_weights: pissa or olora)"
        if is_quantized(module):
            raise PeftkitError(f"{why}, and the base is quantized here ('{path}'): the residual cannot be rebuilt "
                               f"from 4-bit or 8-bit weights. Load it on the unquantized base, or: {_CONVERT}")
        if other := shared_weight(model, module):
            raise PeftkitError(f"{why}, and '{path}' shares its weight with '{other}' (tied): peft's init moved "
                               f"both, which no LoRA on '{path}' alone gives back (peft's conversion neither). Train "
                               f"it again without '{path.rsplit('.', 1)[-1]}' in target_modules.")
        return module.weight, is_conv1d(module)
    return weight


def on_original_base(cfg, state: dict[str, torch.Tensor],
                     weight_of: Callable[[str], tuple[torch.Tensor, bool] | None]):
    """(LoRA settings, PEFT-keyed tensors) of an adapter peft saved unconverted for its init's residual base
    (`cfg._residual_init`, see the module docstring), as the plain rank-2r LoRA it is on the original base,
    whose weights `weight_of(module path)` gives (`base_weight_of`); anything else as given.

    Each target's A0, B0 are its init computed again from that weight in fp32, as peft's loading does; an
    embedding (peft does not move its base) has zeros for them, to keep one rank. peft's OLoRA takes the QR of the
    weight as stored, (in, out) on Conv1D (square layers only: it fails on others), so the residual it leaves there
    is W - s (B0 A0)^T. On a bfloat16 base the result differs from peft's loading by the rounding of peft's residual
    to bfloat16, as peft's own conversion does."""
    from peftkit.adapters import PEFT_PREFIX  # peftkit.adapters imports the method registry
    from peftkit.methods.lora_layers import lora_scaling  # (which imports this module)

    init = getattr(cfg, "_residual_init", None)
    if init is None:
        return cfg, state
    state = dict(state)
    for key in [k for k in state if k.startswith(PEFT_PREFIX) and k.endswith(".lora_A.weight")]:
        path, b_key = key[len(PEFT_PREFIX):-len(".lora_A.weight")], key.replace(".lora_A.", ".lora_B.")
        a, b, found = state[key], state[b_key], weight_of(path)
        if found is None:
            continue
        stored, conv1d = found
        w = stored.detach().float()  # on the weight's device (a GPU's SVD is fast), as peft's init runs
        out_in = tuple(w.shape[::-1] if conv1d else w.shape)
        if (b.shape[0], a.shape[1]) != out_in:
            raise PeftkitError(f"The adapter does not fit this base: its '{path}' maps {a.shape[1]} features to "
                               f"{b.shape[0]}, the base's layer {out_in[1]} to {out_in[0]}. Load it on the base it "
                               "was trained on.")
        r, alpha = cfg.rank_and_alpha(path)
        scaling = lora_scaling(alpha, r, cfg.use_rslora)
        if init == "pissa":
            a0, b0 = _pissa(w.T if conv1d else w, r, scaling, None)
        else:
            a0, b0 = _olora(w, r, scaling, None)
            a0, b0 = (b0.T, a0.T) if conv1d else (a0, b0)  # (B0 A0)^T as a LoRA pair on the (out, in) weight
        a0, b0 = a0.cpu(), b0.cpu()
        state[key], state[b_key] = _to_rank(torch.cat([a, a0.to(a.dtype)], dim=0),
                                            torch.cat([b, -b0.to(b.dtype)], dim=1), 2 * r)
    for key in [k for k in state if k.startswith(PEFT_PREFIX) and k.endswith(".lora_embedding_A")]:
        b_key = key.replace(".lora_embedding_A", ".lora_embedding_B")
        a, b = state[key], state[b_key]
        state[key] = torch.cat([a, torch.zeros_like(a)], dim=0)
        state[b_key] = torch.cat([b, torch.zeros_like(b)], dim=1)
    config = _converted_config({"r": cfg.r, "lora_alpha": cfg.alpha, "use_rslora": cfg.use_rslora,
                                "rank_pattern": cfg.rank_pattern, "alpha_pattern": cfg.alpha_pattern})
    converted = cfg.model_copy(update={"r": config["r"], "alpha": config["lora_alpha"], "rank_pattern":
                                       config["rank_pattern"], "alpha_pattern": config["alpha_pattern"]})
    converted._residual_init = None
    return converted, state
