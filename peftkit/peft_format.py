"""Reading and writing adapters in the Hugging Face PEFT checkpoint format.

A directory holds `adapter_model.safetensors` (keys `base_model.model.<path>.lora_A.weight`, ...) and
`adapter_config.json`, so `peft.PeftModel.from_pretrained(base, dir)` and vLLM load it unchanged. peftkit
adds `peftkit.json` with what the PEFT format has no field for (the quantization the adapter was trained
against, so that a merge dequantizes the same 4-bit weights); PEFT tools ignore that file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from peftkit import __version__
from peftkit.errors import PeftkitError
from peftkit.fileio import atomic_write_bytes, atomic_write_json
from peftkit.recipe import AdapterConfig, QuantizationConfig, TargetRegex

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
META_NAME = "peftkit.json"


def peft_config(cfg: AdapterConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
    """adapter_config.json. `target_modules` lists the exact module paths adapted, so that peft's
    suffix matching selects exactly the same layers whatever form the recipe used."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted(targets),
        "use_rslora": cfg.use_rslora,
        "use_dora": False,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "modules_to_save": cfg.modules_to_save or None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def save_adapter(
    path: str | Path,
    state: dict[str, torch.Tensor],
    config: dict,
    quantization: QuantizationConfig | None = None,
    quantized_on: str | None = None,
) -> None:
    """Write the three files, each atomically; the weights last-but-one so a reader never sees new config
    with old weights for long. Callers that need the whole directory atomic wrap it in atomic_directory.

    Args:
        quantization: the bitsandbytes settings of the base the adapter was trained against, if any.
        quantized_on: 'cpu' or 'cuda', where that base was quantized: a merge re-quantizes there, because
            bitsandbytes' CPU and CUDA kernels can round a few weights differently.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path / CONFIG_NAME, config)
    atomic_write_bytes(path / WEIGHTS_NAME, save(state, metadata={"format": "pt"}))
    meta = {"peftkit_version": __version__, "quantization": quantization.model_dump() if quantization else None,
            "quantized_on": quantized_on if quantization else None}
    atomic_write_json(path / META_NAME, meta)


def load_adapter(path: str | Path) -> tuple[AdapterConfig, dict[str, torch.Tensor], dict, QuantizationConfig | None]:
    """Read a PEFT LoRA directory: (adapter settings, PEFT-keyed tensors, raw config, quantization or None)."""
    path = Path(path)
    if not path.is_dir():
        raise PeftkitError(f"Adapter directory not found: {path}")
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_file.exists():
        hint = " It holds a full model (config.json); pass it as --model/--base instead." if (path / "config.json").exists() else ""
        raise PeftkitError(f"{path} is not a PEFT adapter directory: it has no {CONFIG_NAME}.{hint}")
    if not weights_file.exists():
        legacy = " Only adapter_model.bin is there; peftkit loads safetensors only (it never unpickles)." if (path / "adapter_model.bin").exists() else ""
        raise PeftkitError(f"{path} has no {WEIGHTS_NAME}.{legacy}")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise PeftkitError(f"{config_file}: not valid JSON ({e}).") from None
    if raw.get("peft_type") != "LORA":
        raise PeftkitError(f"{config_file}: peft_type is {raw.get('peft_type')!r}; peftkit reads LORA adapters.")
    for key in ("use_dora", "rank_pattern", "alpha_pattern", "layers_to_transform"):
        if raw.get(key):
            raise PeftkitError(f"{config_file}: '{key}' is set; peftkit does not support it yet.")
    if raw.get("bias", "none") != "none":
        raise PeftkitError(f"{config_file}: bias={raw['bias']!r}; peftkit supports bias='none' only.")
    targets = raw.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        targets = TargetRegex(regex=targets)
    try:
        cfg = AdapterConfig(
            r=raw["r"],
            alpha=raw.get("lora_alpha", 8),
            dropout=raw.get("lora_dropout", 0.0),
            target_modules=targets,
            use_rslora=raw.get("use_rslora", False),
            modules_to_save=raw.get("modules_to_save") or [],
        )
    except (KeyError, ValueError) as e:
        raise PeftkitError(f"{config_file}: not a usable LoRA config ({e}).") from None
    try:
        state = load_file(weights_file)
    except (SafetensorError, OSError) as e:
        raise PeftkitError(f"{weights_file}: cannot read ({e}).") from None
    quant = None
    if (path / META_NAME).exists():
        q = json.loads((path / META_NAME).read_text()).get("quantization")
        quant = QuantizationConfig(**q) if q else None
    return cfg, state, raw, quant


def quantized_on(path: str | Path) -> str | None:
    """'cpu' or 'cuda': where the 4-bit/8-bit base of a peftkit adapter was quantized (None if unknown)."""
    meta = Path(path) / META_NAME
    return json.loads(meta.read_text()).get("quantized_on") if meta.exists() else None
