"""A memory estimate printed before loading, from the model config alone (a meta-device model: no weights
are read or allocated), so a recipe that cannot fit is noticed before minutes of loading."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from rich.console import Console

from peftkit.errors import PeftkitError
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
    """Bytes of base weights, adapter weights, their gradients and optimizer state; None if no model can
    be built from the config (the loader will then say why). A broken config.json raises a PeftkitError."""
    from transformers import AutoModelForCausalLM

    from peftkit.adapters import inject_adapters, trainable_parameters
    from peftkit.modeling import load_config

    config = load_config(recipe.model)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    except (OSError, ValueError):
        return None
    except RuntimeError as e:  # nothing is allocated on the meta device: only the config can be at fault
        raise PeftkitError(f"{recipe.model.name_or_path}/config.json describes a model that cannot be built ({e}). "
                           "Fix config.json, or restore it from where the model came from.") from None
    modules = dict(model.named_modules())
    q = recipe.quantization
    skip = set(q.skip_modules) if q else set()
    base = 0.0
    for name, module in modules.items():
        for p in module.parameters(recurse=False):
            quantized = q is not None and isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in skip
            if quantized:
                base += p.numel() * (1 if q.method == "int8" else QUANT_BITS[(q.method, q.double_quant)] / 8)
            else:
                base += p.numel() * BYTES[recipe.model.dtype]
    # The method's own layers, built on the meta device (nothing is allocated), say what it trains, for every
    # method alike (LoRA's A and B, IA3's vectors, modules_to_save). A bad target fails here, before loading.
    inject_adapters(model, recipe.adapter)
    sizes = [p.numel() for p in trainable_parameters(model)]  # trainable tensors' element counts
    adapter = 4.0 * sum(sizes)  # fp32
    return MemoryEstimate(base, adapter, adapter, _optimizer_bytes(recipe.training.optimizer, sizes))


def check_fits(estimate: MemoryEstimate | None, device: torch.device) -> None:
    """Refuse a run whose estimate exceeds all the memory of `device` (RAM on CPU, the GPU's on CUDA).

    Generous on purpose: activations are left out and only the device's *total* memory counts, so only a
    run that cannot possibly fit is refused, before it dies in the allocator or the OOM killer (an absurd
    adapter.r such as 10,000,000 asks for terabytes). A None estimate (config unreadable) passes.
    """
    if estimate is None:
        return
    available = device_memory(device)
    if estimate.total <= available:
        return
    where = "of RAM on this machine" if device.type == "cpu" else f"on {torch.cuda.get_device_name(device)}"
    adapter_part = estimate.adapter + estimate.gradients + estimate.optimizer
    if adapter_part >= estimate.base_weights:
        fix = ("Most of it is the adapter, whose A and B matrices, gradients and optimizer state grow linearly "
               "with adapter.r: lower adapter.r (8 to 64 is usual), or target fewer modules.")
    else:
        fix = ("Most of it is the base model's weights: load them 4-bit (a quantization section with method: nf4), "
               "or use a smaller model.")
    raise PeftkitError(
        f"This run needs an estimated {_size(estimate.total)} before activations ({_parts(estimate)}), more than "
        f"the {_size(available)} {where}. {fix}"
    )


def device_memory(device: torch.device) -> int:
    """Total bytes of memory of `device`: physical RAM for the CPU, the GPU's own for CUDA."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _parts(est: MemoryEstimate) -> str:
    parts = (("weights", est.base_weights), ("adapter", est.adapter), ("gradients", est.gradients),
             ("optimizer", est.optimizer))
    return " + ".join(f"{n} {_size(v)}" for n, v in parts)


def print_estimate(console: Console, est: MemoryEstimate | None) -> None:
    if est is None:
        return
    console.print(f"Memory estimate before activations: {_parts(est)} = {_size(est.total)}")


def _size(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 2**10:.1f} KiB"
