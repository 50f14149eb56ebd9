"""Loading the base model and tokenizer (optionally quantized by bitsandbytes), and k-bit preparation."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.recipe import ModelConfig, QuantizationConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(preference: str = "auto") -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise PeftkitError("model.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'.")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def quiet_transformers() -> None:
    """Silence per-file progress bars and hints ('kernels' not installed) that drown peftkit's own output."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _check_source(name_or_path: str) -> None:
    """A path that should be a model directory but is not gets a clear message before transformers' own."""
    path = Path(name_or_path)
    if path.is_absolute() or name_or_path.startswith((".", "~")):
        if not path.exists():
            raise PeftkitError(
                f"Model directory not found: {name_or_path}. Give a local directory containing config.json, or a "
                "hub id such as 'meta-llama/Llama-3.2-1B'."
            )
        if not (path / "config.json").exists():
            raise PeftkitError(f"{name_or_path} has no config.json; it is not a transformers model directory.")


def bnb_config(q: QuantizationConfig):
    from transformers import BitsAndBytesConfig

    if q.method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=q.skip_modules)
    # Spelled out, not left to defaults: bitsandbytes' Linear4bit alone means FP4, blocksize 64.
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.method,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=DTYPES[q.compute_dtype],
        bnb_4bit_quant_storage={"uint8": torch.uint8, **DTYPES}[q.quant_storage],
        llm_int8_skip_modules=q.skip_modules,
    )


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    _check_source(cfg.name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise PeftkitError(f"Could not load a tokenizer from {cfg.name_or_path}: {e}") from None
    if tok.pad_token is None:
        # Padding positions are masked out of attention and loss, so reusing EOS is safe.
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig, quant: QuantizationConfig | None = None, device: torch.device | None = None) -> nn.Module:
    """AutoModelForCausalLM from a local directory or hub id, in the recipe dtype, on `device`.

    Only safetensors weights are read (`use_safetensors=True`): loading never unpickles.
    """
    from transformers import AutoModelForCausalLM

    _check_source(cfg.name_or_path)
    device = device or resolve_device(cfg.device)
    kwargs: dict = dict(
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
        use_safetensors=True,
        dtype="auto" if cfg.dtype == "auto" else DTYPES[cfg.dtype],
    )
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if quant is not None:
        kwargs["quantization_config"] = bnb_config(quant)
    if device.type == "cuda":
        kwargs["device_map"] = {"": device.index or 0}
    elif quant is not None:
        # Spelled out: without a device_map, transformers puts a bitsandbytes model on the GPU whenever one
        # is present, whatever model.device says.
        kwargs["device_map"] = {"": "cpu"}
    quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **kwargs)
    except OSError as e:
        raise PeftkitError(
            f"Could not load model {cfg.name_or_path}: {e}\nFor a hub id this needs network access (or a cached "
            "copy); only safetensors weights are accepted."
        ) from None
    if quant is None and device.type != "cuda":
        model.to(device)
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            # On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a Linear4bit's weight in place on its
            # first no-grad eval forward (our base eval) and from then on runs the layer in bf16 whatever
            # compute_dtype says, through a kernel without autograd: measured here, LoRA gradients off by
            # 112%, eval loss after 30 steps 3.46 instead of 1.97, absmax rounded to bf16 (so merges drift),
            # and a crash for layers narrower than 64. We keep the weights as quantized, on every CPU.
            module.support_avx512bf16_for_cpu = False
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    return model


def prepare_for_training(model: nn.Module, gradient_checkpointing: bool) -> None:
    """Get a (possibly k-bit) model ready for adapter training, doing no more than needed.

    peft's `prepare_model_for_kbit_training` upcasts every non-quantized parameter to fp32, which costs
    gigabytes on large models (users report 81 vs 63 GB). We don't: the base is frozen (by injection), its
    norms stay in the load dtype (Llama-style RMSNorm already computes in fp32 internally), and LoRA weights
    are fp32 on their own. Gradient checkpointing uses the non-reentrant implementation, which needs no
    `requires_grad` hook on the embedding outputs (the reentrant one would not backpropagate without it).
    """
    if gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise PeftkitError(
                f"training.gradient_checkpointing: {type(model).__name__} does not support gradient checkpointing; "
                "set it to false."
            )
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def load_adapted_model(base: str | None, adapter_dir: str, device: torch.device | None = None):
    """Base model (re-quantized as the adapter was trained, if it was) with a PEFT adapter injected.

    bitsandbytes quantization is deterministic, so re-quantizing the same base weights gives the exact
    4-bit weights the adapter was trained against.

    Returns:
        (model, adapter settings, tokenizer, base model path, quantization or None)
    """
    from peftkit.adapters import inject_adapters, load_adapter_state_dict
    from peftkit.peft_format import load_adapter

    adapter_cfg, state, raw, quant = load_adapter(adapter_dir)
    base = base or raw.get("base_model_name_or_path")
    if not base:
        raise PeftkitError(f"{adapter_dir}/adapter_config.json names no base_model_name_or_path; pass --base.")
    model_cfg = ModelConfig(name_or_path=base, dtype="auto" if quant is None else "float32")
    model = load_model(model_cfg, quant, device)
    inject_adapters(model, adapter_cfg)
    load_adapter_state_dict(model, state)
    model.eval()
    return model, adapter_cfg, load_tokenizer(model_cfg), base, quant
