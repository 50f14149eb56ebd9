"""The base's bitsandbytes quantization (the recipe's quantization section) and its checks.

bitsandbytes imported without its hub kernel, the BitsAndBytesConfig a section stands for, the refusals of a section
that a checkpoint saved quantized contradicts (or lacks), and of what bitsandbytes cannot quantize (a tied output head,
weights of another shape than their layer). `peftkit.modeling.load_model` applies them.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from peftkit.errors import PeftkitError, did_you_mean
from peftkit.recipe import ModelConfig, QuantizationConfig


def import_bitsandbytes():
    """bitsandbytes, imported without its hub kernel. On a CPU with AVX512-BF16, bitsandbytes 0.50's import asks the
    hub for `kernels-community/quantization-bitsandbytes` (through the `kernels` package, which transformers 5.25
    requires): seconds of waiting on every start where the hub cannot be reached (4.5 s measured here), and where it
    can, code nobody asked for, run by an eval-time layout peftkit turns off anyway (`peftkit.modeling.load_model`).
    Refused its import, bitsandbytes falls back to its own kernels, as without `kernels` installed."""
    import sys

    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    missing = object()
    kernels = sys.modules.get("kernels", missing)
    sys.modules["kernels"] = None  # `from kernels import get_kernel` raises ImportError, which bitsandbytes catches
    quiet = logging.getLogger("bitsandbytes")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # (its note that the kernel did not load)
    try:
        import bitsandbytes
    finally:
        quiet.setLevel(level)
        if kernels is missing:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = kernels
    return bitsandbytes


def kept_modules(q: QuantizationConfig, task: str = "causal_lm") -> list[str]:
    """The modules bitsandbytes leaves in full precision: quantization.skip_modules, and a classifier's head (trained in
    full beside the adapter; transformers keeps the last module out of quantization only where no skip list is given,
    and a 4-bit head can neither train nor take a one-row output: bitsandbytes asserts on it)."""
    from peftkit.classify import HEAD_NAMES

    heads = [h for h in HEAD_NAMES if h not in q.skip_modules] if task == "sequence_classification" else []
    return [*q.skip_modules, *heads]


def bnb_config(q: QuantizationConfig, task: str = "causal_lm"):
    from transformers import BitsAndBytesConfig

    from peftkit.modeling import DTYPES

    import_bitsandbytes()  # before transformers imports it

    if q.method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=kept_modules(q, task))
    # Spelled out, not left to defaults: bitsandbytes' Linear4bit alone means FP4, blocksize 64.
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.method,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=DTYPES[q.compute_dtype],
        bnb_4bit_quant_storage={"uint8": torch.uint8, **DTYPES}[q.quant_storage],
        llm_int8_skip_modules=kept_modules(q, task),
    )


def check_prequantized(config, quant: QuantizationConfig, name_or_path: str) -> None:
    """A checkpoint saved quantized (its config.json has a quantization_config: `peftkit merge --requantize`'s
    OUTPUT-nf4, a hub "-bnb-4bit" model) loads with its own settings: transformers ignores every setting of the
    quantization section (it only warns, in a log peftkit silences), so a recipe asking int8 or fp4 trained on nf4
    and recorded int8 in the adapter. A section that says otherwise of the stored weights (method, double_quant,
    quant_storage) is refused, naming the key; its compute_dtype, a setting of the layers, `load_model` applies."""
    saved = saved_quantization(config)
    if saved is None:
        return
    if saved.get("quant_method") != "bitsandbytes":
        raise PeftkitError(f"{name_or_path} is already quantized ({saved.get('quant_method')}, in its config.json's "
                           "quantization_config), and the quantization section quantizes through bitsandbytes: remove "
                           "the quantization section.")
    checkpoint = _stored_settings(saved, quant.method == "int8")
    differ = [f"quantization.{key}: {value}" for key, value in checkpoint.items() if getattr(quant, key) != value]
    if differ:
        raise PeftkitError(f"{name_or_path} is already quantized by bitsandbytes (its config.json's "
                           f"quantization_config): its weights load as they were stored, whatever the quantization section "
                           f"says. Set {', '.join(differ)} as the checkpoint has it, or quantize the unquantized model "
                           "instead.")


def saved_quantization(config) -> dict | None:
    """The quantization_config of a checkpoint saved quantized (its config.json's), as a dict; None for one that is
    not."""
    saved = getattr(config, "quantization_config", None)
    return None if saved is None else saved if isinstance(saved, dict) else saved.to_dict()


def _stored_settings(saved: dict, int8: bool) -> dict:
    """The quantization section's settings a bitsandbytes checkpoint's `saved` quantization_config stores (`int8`: the
    section asks int8, whose weights have no double_quant or quant_storage)."""
    four_bit = not saved.get("load_in_8bit")
    settings = {"method": saved.get("bnb_4bit_quant_type", "fp4") if four_bit else "int8"}
    if four_bit and not int8:
        settings |= {"double_quant": bool(saved.get("bnb_4bit_use_double_quant")),
                     "quant_storage": str(saved.get("bnb_4bit_quant_storage") or "uint8").removeprefix("torch.")}
    return settings


def check_quantization_section(config, cfg: ModelConfig, quant: QuantizationConfig | None,
                               resume: bool = False) -> None:
    """A run over a checkpoint saved by bitsandbytes needs the quantization section that says so: without it the
    weights loaded 4-bit all the same, and the adapter recorded an unquantized base, which a merge then loaded.
    `resume`: a run started so (before this was refused) cannot go on, since the section makes it another recipe."""
    saved = saved_quantization(config)
    if quant is not None or saved is None or saved.get("quant_method") != "bitsandbytes":
        return
    settings = ", ".join(f"{key}: {value}".replace("True", "true").replace("False", "false")
                         for key, value in _stored_settings(saved, False).items())
    said = (f"{cfg.name_or_path} is already quantized by bitsandbytes (its config.json's quantization_config), and "
            "the recipe has no quantization section.")
    if resume:
        raise PeftkitError(f"{said} This run was started without one, so it cannot be resumed: adding the section "
                           f"makes it another recipe. Train it again with the one the checkpoint has (quantization: "
                           f"{{{settings}}}), with --overwrite or in another export.output_dir, so that the adapter "
                           "records the quantized base it is trained against.")
    raise PeftkitError(f"{said} Add the one the checkpoint has (quantization: {{{settings}}}), so that the adapter "
                       "records the quantized base it is trained against, and merges and evaluations load it as "
                       "trained.")


def check_skip_modules(model: nn.Module, quant: QuantizationConfig) -> None:
    """A quantization.skip_modules entry the recipe wrote that matches no module of the model (a typo: `lm_hed`)
    keeps nothing in full precision, and transformers passes over it without a word, so what it meant to keep (the
    output head) was quantized. Refused, matched as transformers matches the entries (a path prefix, a regex, a name
    at the end). The default `lm_head` is no typo whatever the model: every run's recipe.yaml writes it (so `verify`
    and a re-run read it as written), also for a model without one (a classifier's `score`, BioGPT's
    `output_projection`)."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    if "skip_modules" not in quant.model_fields_set:
        return
    names = [name for name, _ in model.named_modules() if name]
    for entry in quant.skip_modules:
        if entry != "lm_head" and all(should_convert_module(name, [entry]) for name in names):
            kinds = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in names))
            raise PeftkitError(f"quantization.skip_modules entry {entry!r} matches no module of this model, so it "
                               "keeps nothing in full precision (transformers passes over it, and quantizes what it "
                               "meant to keep). Name a module or a path prefix (lm_head, model.layers.0), or remove "
                               f"it.{did_you_mean(entry, kinds)}")


def refuse_quantized_tied_head(model: nn.Module, quant: QuantizationConfig) -> None:
    """An output head that shares its weight with the embeddings (Qwen2's small models, Gemma, GPT-2) cannot be
    quantized: transformers swaps in a bitsandbytes layer that still holds the embeddings' float matrix, and its
    first forward fails inside bitsandbytes (a bare AssertionError for 4-bit, an AttributeError for int8)."""
    from peftkit.methods.layer import is_quantized

    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embedding is None or not is_quantized(head) or head.weight is not embedding.weight:
        return
    name = next(n for n, m in model.named_modules() if m is head)
    raise PeftkitError(f"quantization.skip_modules {quant.skip_modules} leaves out {name}, the output head, and this "
                       f"model ties it to its input embeddings, which bitsandbytes cannot quantize. Add {name!r} to "
                       "quantization.skip_modules (its default, [lm_head], keeps it).")


def quantized_shape_mismatches(model: nn.Module) -> list[tuple[str, tuple, tuple]]:
    """bitsandbytes layers whose quantized weight has another shape than the layer's config.

    transformers skips its shape check for weights it quantizes: a 64x32 checkpoint weight loads into a
    layer configured as 100x32 and only fails (or worse, not) at the first matmul.
    """
    from peftkit.methods.layer import is_quantized

    found = []
    for name, module in model.named_modules():
        if is_quantized(module) and hasattr(module, "in_features"):
            quant_state = getattr(module.weight, "quant_state", None)
            saved = tuple(quant_state.shape) if quant_state is not None else tuple(module.weight.shape)
            expected = (module.out_features, module.in_features)
            if saved != expected:
                found.append((f"{name}.weight", saved, expected))
    return found
