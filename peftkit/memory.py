"""A memory estimate printed before loading, from the model config alone (a meta-device model: no weights
are read or allocated), so a recipe that cannot fit is noticed before minutes of loading."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.console import Console

from peftkit.recipe import Recipe

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}
# bits per quantized weight: 4-bit codes + one fp32 absmax per 64 weights (0.5 bit) = 4.5; with double
# quantization the absmax is 8-bit with one fp32 per 256 blocks: 4 + 8/64 + 32/(64*256) ≈ 4.127.
QUANT_BITS = {("nf4", True): 4.127, ("nf4", False): 4.5, ("fp4", True): 4.127, ("fp4", False): 4.5}
# optimizer state bytes per trainable parameter: AdamW keeps two fp32 moments; 8-bit AdamW two int8
# moments (+ a negligible per-block scale), but only for tensors of >= 4096 elements (bitsandbytes keeps
# smaller ones in fp32); SGD without momentum keeps none.
OPTIMIZER_BYTES = {"adamw": 8, "paged_adamw_32bit": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2, "sgd": 0}
MIN_8BIT_SIZE = 4096


def _optimizer_bytes(optimizer: str, sizes: list[int]) -> float:
    per = OPTIMIZER_BYTES[optimizer]
    if per == 2:
        return sum(n * (2 if n >= MIN_8BIT_SIZE else 8) for n in sizes)
    return per * sum(sizes)


@dataclass
class MemoryEstimate:
    base_weights: float
    adapter: float
    gradients: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.base_weights + self.adapter + self.gradients + self.optimizer


def estimate_memory(recipe: Recipe) -> MemoryEstimate | None:
    """Bytes of base weights, adapter weights, their gradients and optimizer state; None if the config
    cannot be read (the loader will then say why)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftkit.adapters import find_targets, modules_to_save
    from peftkit.adapters.lora import linear_shape

    try:
        config = AutoConfig.from_pretrained(recipe.model.name_or_path, revision=recipe.model.revision,
                                            trust_remote_code=recipe.model.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    except (OSError, ValueError):
        return None
    targets = find_targets(model, recipe.adapter.target_modules)  # a bad target fails here, before loading
    modules = dict(model.named_modules())
    q, r = recipe.quantization, recipe.adapter.r
    skip = set(q.skip_modules) if q else set()
    base = 0.0
    sizes: list[int] = []  # trainable tensors' element counts
    for name, module in modules.items():
        for p in module.parameters(recurse=False):
            quantized = q is not None and isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in skip
            if quantized:
                base += p.numel() * (1 if q.method == "int8" else QUANT_BITS[(q.method, q.double_quant)] / 8)
            else:
                base += p.numel() * BYTES[recipe.model.dtype]
    for name in targets:
        m = modules[name]
        fan_in, fan_out = m.weight.shape[::-1] if isinstance(m, torch.nn.Embedding) else linear_shape(m)
        sizes += [r * fan_in, r * fan_out]  # A and B
    for module in modules_to_save(model, recipe.adapter.modules_to_save).values():
        sizes += [p.numel() for p in module.parameters()]
    adapter = 4.0 * sum(sizes)  # fp32
    return MemoryEstimate(base, adapter, adapter, _optimizer_bytes(recipe.training.optimizer, sizes))


def print_estimate(console: Console, est: MemoryEstimate | None) -> None:
    if est is None:
        return
    parts = (("weights", est.base_weights), ("adapter", est.adapter), ("gradients", est.gradients),
             ("optimizer", est.optimizer))
    console.print("Memory estimate before activations: " + " + ".join(f"{n} {_size(v)}" for n, v in parts)
                  + f" = {_size(est.total)}")


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 2**10:.1f} KiB"
