"""The method registry: `adapter.method` in a recipe and `peft_type` in adapter_config.json pick a `Method`.

Each method lives in one file here (its recipe config, its layers, its one merge math, its PEFT config);
everything shared (targets, freezing, state dicts, the merge, the PEFT format, checkpoints, the parameter
count and the memory estimate) is in `peftkit.adapters`, `peftkit.peft_format` and their callers, written
once over the protocol in `base.py`. A new method is one file plus its `register` line below.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import Discriminator, Tag

from peftkit.errors import PeftkitError
from peftkit.methods.adalora import AdaLora, AdaLoraConfig
from peftkit.methods.base import Method, MethodTrainer
from peftkit.methods.layer import AdapterLayer
from peftkit.methods.boft import Boft, BoftConfig
from peftkit.methods.bottleneck import Bottleneck, BottleneckConfig
from peftkit.methods.delora import Delora, DeloraConfig
from peftkit.methods.fourierft import FourierFt, FourierFtConfig
from peftkit.methods.fusion import Fusion, FusionConfig
from peftkit.methods.hira import Hira, HiraConfig
from peftkit.methods.hra import Hra, HraConfig
from peftkit.methods.ia3 import IA3, IA3Config
from peftkit.methods.loha import Loha, LohaConfig
from peftkit.methods.llama_adapter import LlamaAdapter, LlamaAdapterConfig
from peftkit.methods.ln_tuning import LnTuning, LnTuningConfig
from peftkit.methods.lokr import Lokr, LokrConfig
from peftkit.methods.lora import Lora, LoraConfig
from peftkit.methods.miss import Miss, MissConfig
from peftkit.methods.vera import Vera, VeraConfig
from peftkit.methods.multitask_prompt_tuning import MultitaskPromptTuning, MultitaskPromptTuningConfig
from peftkit.methods.oft import Oft
from peftkit.methods.p_tuning import PTuning, PTuningConfig
from peftkit.methods.prefix_tuning import PrefixTuning, PrefixTuningConfig
from peftkit.methods.cartridge import Cartridge
from peftkit.methods.prompt_tuning import PromptTuning, PromptTuningConfig
from peftkit.methods.road import Road, RoadConfig
from peftkit.methods.trainable_tokens import TrainableTokens
from peftkit.methods.randlora import RandLora, RandLoraConfig
from peftkit.methods.vblora import VbLora, VbLoraConfig
from peftkit.methods.c3a import C3a
from peftkit.methods.shira import Shira
from peftkit.methods.beft import Beft
from peftkit.methods.supertuning import Supertuning
from peftkit.methods.peanut import Peanut
from peftkit.methods.gralora import Gralora
from peftkit.methods.deft import Deft
from peftkit.methods.pvera import Pvera
from peftkit.methods.tinylora import TinyLora
from peftkit.methods.psoft import Psoft
from peftkit.methods.glora import Glora
from peftkit.methods.unilora import UniLora
from peftkit.methods.lily import Lily
from peftkit.methods.osf import Osf
from peftkit.methods.frod import Frod
from peftkit.methods.waveft import WaveFt
from peftkit.methods.poly import Poly
from peftkit.methods.adamss import Adamss
from peftkit.methods.shadow import Shadow
from peftkit.methods.xlora import XLora
from peftkit.methods.cpt import Cpt

METHODS: dict[str, type[Method]] = {}


def register(method: type[Method]) -> type[Method]:
    """Add `method` to the registry, under its recipe name."""
    if method.name in METHODS:
        raise ValueError(f"adapter method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


register(Lora)
register(IA3)
register(Loha)
register(Lokr)
register(Vera)
register(AdaLora)
register(Oft)
register(Hra)
register(Boft)
register(TrainableTokens)
register(LlamaAdapter)
register(Bottleneck)
register(PromptTuning)
register(PTuning)
register(PrefixTuning)
register(MultitaskPromptTuning)
register(Fusion)
register(LnTuning)
register(FourierFt)
register(RandLora)
register(VbLora)
register(Miss)
register(Delora)
register(Road)
register(Hira)
register(C3a)
register(Shira)
register(Beft)
register(Supertuning)
register(Gralora)
register(Deft)
register(Peanut)
register(Pvera)
register(TinyLora)
register(Psoft)
register(Glora)
register(UniLora)
register(Lily)
register(Cartridge)
register(Osf)
register(Frod)
register(WaveFt)
register(Poly)
register(Adamss)
register(Shadow)
register(XLora)
register(Cpt)

DEFAULT_METHOD = "lora"  # an `adapter` section without `method:`


def _chosen_method(value: Any) -> str | None:
    """The union member a recipe's `adapter` section is validated as: its `method`, LoRA when it has none. A
    section that is not a mapping goes to LoRA's config, whose error says it must be a section of keys."""
    if isinstance(value, dict):
        method = value.get("method", DEFAULT_METHOD)
        return method if isinstance(method, str) and method in METHODS else None
    return getattr(value, "method", DEFAULT_METHOD)


# The recipe's `adapter` section: one config per method, chosen by `method` (pydantic's discriminated union,
# so an error names only the chosen method's keys). An unknown method is the `adapter_method` error.
AdapterConfig = Annotated[
    Union[tuple(Annotated[m.config, Tag(m.name)] for m in METHODS.values())],  # noqa: UP007
    Discriminator(_chosen_method, custom_error_type="adapter_method",
                  custom_error_message="adapter.method names no method peftkit has"),
]


def default_adapter() -> LoraConfig:
    """The `adapter` section of a recipe that has none: LoRA with its defaults."""
    return LoraConfig()


def method_of(cfg) -> type[Method]:
    """The method an adapter config belongs to."""
    return METHODS[cfg.method]


def method_for_peft_type(peft_type: object, config_file: object) -> type[Method]:
    """The method that reads adapters of `peft_type`; a PeftkitError naming the file for any other."""
    for method in METHODS.values():
        if method.peft_type == peft_type:
            return method
    supported = ", ".join(m.peft_type for m in METHODS.values())
    raise PeftkitError(f"{config_file}: peft_type is {peft_type!r}; peftkit reads {supported} adapters.")


__all__ = ["AdaLoraConfig", "AdapterConfig", "AdapterLayer", "BoftConfig", "BottleneckConfig", "DEFAULT_METHOD",
           "DeloraConfig", "FourierFtConfig", "FusionConfig", "HiraConfig", "HraConfig", "IA3Config",
           "LlamaAdapterConfig", "LnTuningConfig", "LohaConfig", "LokrConfig", "LoraConfig", "METHODS", "Method",
           "MethodTrainer", "MissConfig", "MultitaskPromptTuningConfig", "PTuningConfig", "PrefixTuningConfig",
           "PromptTuningConfig", "RandLoraConfig", "RoadConfig", "VbLoraConfig", "VeraConfig", "default_adapter",
           "method_for_peft_type", "method_of", "register"]
