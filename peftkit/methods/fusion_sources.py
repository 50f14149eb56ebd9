"""The adapters an AdapterFusion fuses (`peftkit.methods.fusion`): read from their directories for training (or
from a fusion export's adapter_config.json when it is reloaded), checked to be fusable, and copied into the
fused layers."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pydantic import ValidationError

from peftkit.errors import PeftkitError
from peftkit.methods.base import REEXPORT
from peftkit.methods.layer import AdapterLayer
from peftkit.methods.fusion import WEIGHT_UPDATE, Fused

if TYPE_CHECKING:
    from peftkit.methods.fusion import FusionConfig


def fused_adapters(cfg: FusionConfig) -> list[Fused]:
    """The adapters `cfg.fuse` names, read (weights included) and checked once; those of a reloaded export as is."""
    if cfg._fused is None:
        cfg._fused = [_read_dir(path, f"adapter.fuse[{i}]") for i, path in enumerate(cfg.fuse)]
        check_fusable(cfg._fused, "adapter.fuse")
        check_same_base(cfg._fused)
    return cfg._fused


def _read_dir(path: str, where: str, purpose: str = "to fuse",
              keeps: str = "fusion keeps its sources as saved") -> Fused:
    """The adapter at `path` (named `where` in errors), read whole, for a method built from others (`purpose`: what it
    does with them; `keeps`: why it cannot convert peft's PiSSA/OLoRA adapter)."""
    from peftkit.methods import method_of
    from peftkit.peft_format import CONFIG_NAME, load_adapter
    from peftkit.settings_json import read_json_object

    if not Path(path).is_dir():
        raise PeftkitError(f"{where}: {path} is not a directory. List the adapter directories {purpose}, as `peftkit "
                           "train` exports them (runs/NAME/adapter, with adapter_config.json and "
                           "adapter_model.safetensors); train those adapters first.")
    try:
        cfg, state, peft, quant = load_adapter(path)
    except PeftkitError as e:
        raise PeftkitError(f"{where}: {e}") from None
    if getattr(cfg, "_residual_init", None):
        from peftkit.methods.lora_init import residual_refusal

        raise residual_refusal(where, path, keeps)
    config = read_json_object(Path(path) / CONFIG_NAME, REEXPORT)
    return Fused(path, method_of(cfg), cfg, config, state, (peft.base_model_name_or_path, peft.revision), quant)


def read_entry(config: dict, source: str | None, where: str) -> Fused:
    """A fused adapter as a fusion export records it: its whole adapter_config.json (its weights are in the
    export's own file)."""
    from peftkit.methods import method_for_peft_type
    from peftkit.settings_json import field_problems

    method = method_for_peft_type(config.get("peft_type"), where)
    try:
        peft = method.peft_config.model_validate(config)
    except ValidationError as e:
        raise PeftkitError(f"{where}: {'; '.join(field_problems(e, config))}. {REEXPORT}") from None
    return Fused(source or "", method, method.from_peft(peft, Path(where)), config)


def _article(title: str) -> str:
    """'a' or 'an' before a method's title: an IA3, an LN tuning (an initialism read letter by letter), a LoRA, a
    Uni-LoRA (said "you")."""
    spelled = title.split()[0].isupper()
    return "an" if title[0] in ("AEFHILMNORSX" if spelled else "AEIOU") and not title.startswith("Uni") else "a"


def check_fusable(fused: list[Fused], where: str) -> None:
    """Methods AdapterFusion can fuse, of one kind: all bottleneck (one placement) or all weight-update methods."""
    for i, f in enumerate(fused):
        name = f.method.name
        if name != "bottleneck" and name not in WEIGHT_UPDATE:
            why = (" (its random projections are shared model-wide under one name, so two cannot sit in one model)"
                   if name in ("vera", "pvera") else "")
            raise PeftkitError(f"{where}[{i}]: {f.source} is {_article(f.method.title)} {f.method.title} adapter{why}; AdapterFusion fuses "
                               f"bottleneck adapters, or weight-update adapters ({', '.join(WEIGHT_UPDATE)}).")
        if f.cfg.modules_to_save:
            raise PeftkitError(f"{where}[{i}]: {f.source} also trains whole modules ({', '.join(f.cfg.modules_to_save)}"
                               "), which have no output to weigh against the others'. Fuse adapters without "
                               "modules_to_save.")
        if getattr(f.cfg, "layer_replication", None):
            raise PeftkitError(f"{where}[{i}]: {f.source} stacks the base's layers again (layer_replication), so it "
                               "is not on the others' base. Fuse adapters without it.")
        if getattr(f.cfg, "velora_config", None):
            raise PeftkitError(f"{where}[{i}]: {f.source} is a VeLoRA (velora_config); fuse adapters without it.")
        if getattr(f.cfg, "kasa_config", None):
            raise PeftkitError(f"{where}[{i}]: {f.source} is a KaSA adapter (kasa_config), which truncates the base "
                               "the others share. Fuse adapters without it, or merge it first.")
        if getattr(f.cfg, "use_bdlora", None):
            raise PeftkitError(f"{where}[{i}]: {f.source} has block-diagonal factors (use_bdlora), which fusion does "
                               "not stack. Fuse adapters without them, or merge it first.")
        if getattr(f.cfg, "target_parameters", None):
            raise PeftkitError(f"{where}[{i}]: {f.source} adapts parameters (target_parameters), which have no output "
                               "of their own to weigh against the others'. Fuse adapters without them.")
        if getattr(f.cfg, "alora_invocation_tokens", None):
            raise PeftkitError(f"{where}[{i}]: {f.source} is an activated LoRA (alora_invocation_tokens), which acts "
                               "only from its invocation on. Fuse adapters without it.")
        if getattr(f.cfg, "trainable_token_indices", None):
            raise PeftkitError(f"{where}[{i}]: {f.source} also trains rows of the embeddings (trainable_token_indices"
                               "), which have no output to weigh against the others'. Fuse adapters without them.")
        if name == "bottleneck" and f.cfg.train_norms:
            raise PeftkitError(f"{where}[{i}]: {f.source} also trains the normalisation layers (train_norms: true), "
                               "which replace the model's own and cannot be weighed. Fuse adapters trained with "
                               "train_norms: false.")
    kinds = {f.method.name == "bottleneck" for f in fused}
    if len(kinds) > 1:
        raise PeftkitError(f"{where} mixes bottleneck adapters (after whole attention/MLP blocks) with weight-update "
                           "adapters (inside single linear layers): their outputs sit in different places and cannot "
                           "be weighed against each other. Fuse adapters of one kind.")
    placements = {f.cfg.placement for f in fused if f.method.name == "bottleneck"}
    if len(placements) > 1:
        raise PeftkitError(f"{where} mixes serial and parallel bottleneck adapters, which read different inputs (the "
                           "sub-layer's output or its input), so the fusion has no single query. Fuse adapters of one "
                           "placement.")


def check_same_base(fused: list[Fused], section: str = "adapter.fuse", purpose: str = "AdapterFusion combines adapters",
                    item=lambda i: f"adapter.fuse[{i}]") -> None:
    """Adapters read from directories were trained on one base (adapter_config.json's base_model_name_or_path and
    revision), quantized alike and from one dtype, RoPE-scaled alike (their peftkit.json): each one's update meets the
    weights it was trained on. Named as the recipe names them: `section` (AdapterFusion's `adapter.fuse`, X-LoRA's
    `adapter.adapters`), `item(i)` the i-th; `purpose` says why one base (`<purpose> of one base model`)."""
    from peftkit.adapter_meta import describe_rope, read_meta

    first = fused[0]
    for i, other in enumerate(fused[1:], start=1):
        if other.base != first.base:
            raise PeftkitError(f"{section}: {first.source} was trained on {first.base[0]} (revision "
                               f"{first.base[1]}), {item(i)} {other.source} on {other.base[0]} (revision "
                               f"{other.base[1]}). {purpose} of one base model.")
        if other.quant != first.quant:
            raise PeftkitError(f"{section}: {first.source} and {item(i)} {other.source} were trained against bases "
                               f"quantized differently (see their peftkit.json); {purpose} trained against the same "
                               "weights.")
        if first.quant is not None and (dtype := read_meta(other.source).quantized_from) != \
                (first_dtype := read_meta(first.source).quantized_from):
            raise PeftkitError(f"{section}: {first.source} was trained against a base quantized from {first_dtype}, "
                               f"{item(i)} {other.source} from {dtype} (their peftkit.json base_dtype): other 4-bit "
                               f"weights. {purpose} trained against the same weights.")
        if (scaling := read_meta(other.source).rope_scaling) != (first_scaling := read_meta(first.source).rope_scaling):
            raise PeftkitError(f"{section}: {first.source} was trained with RoPE scaling "
                               f"{describe_rope(first_scaling)}, {item(i)} {other.source} with "
                               f"{describe_rope(scaling)} (their peftkit.json): {purpose} of one base, scaled one way.")


def check_model(fused: list[Fused], model: torch.nn.Module, section: str = "adapter.fuse",
                who: str = "AdapterFusion") -> None:
    """Adapters read for training were trained on this model: the recipe's model.name_or_path. Named as the recipe
    names them: `section`, and `who` needs them so. (Whether the base is quantized as theirs was: `check_quantization`,
    from the recipe's quantization section.)"""
    if fused[0].state is None:  # a fusion export, checked when it was trained; loaded on its recorded base
        return
    recorded, name = fused[0].base[0], getattr(model, "name_or_path", "") or ""
    if recorded and name and not _same_model(recorded, name):
        raise PeftkitError(f"{section}: the adapters were trained on {recorded}, and model.name_or_path is {name}. "
                           f"{who} needs the base the adapters were trained on: set model.name_or_path to it (or "
                           "train the adapters again on this one).")


def check_quantization(fused: list[Fused], quantization, dtype: str, here: str | None, section: str = "adapter.fuse",
                       who: str = "AdapterFusion", quantized_base_allowed: bool = False) -> None:
    """Adapters read for training meet the base they were trained against: a quantized one where they were, and then
    the same 4-bit/8-bit weights: the recipe's quantization section as theirs (one among them: `check_same_base`),
    from the same model.dtype `dtype` (other weights, other codes); where the recipe quantizes on another kind of
    device (`here`: 'cpu' or 'cuda', None unknown) than they were, a warning (bitsandbytes' CPU and CUDA kernels round
    a few weights otherwise). Decided by the recipe's section, not the loaded layers, so that `peftkit validate`
    (whose model is empty) says what train says.

    Args:
        quantized_base_allowed: adapters trained against an unquantized base may be used over a 4/8-bit one (X-LoRA
            over a quantized base, its memory saving: the experts' updates were fitted to the weights that base
            approximates). Without it the base is refused, as AdapterFusion's must be quantized as its adapters'.
    """
    import warnings

    from peftkit.adapter_meta import read_meta, requantized_note
    from peftkit.errors import PeftkitWarning

    first = fused[0]
    if first.state is None:
        return
    quantizes = quantization is not None  # (a checkpoint saved quantized has one: `check_quantization_section`)
    if quantizes != (first.quant is not None) and not (quantizes and quantized_base_allowed):
        trained = "a 4/8-bit" if first.quant is not None else "an unquantized"
        raise PeftkitError(f"{section}: the adapters were trained against {trained} base, and this recipe "
                           f"{'quantizes' if quantizes else 'does not quantize'} it; set the quantization section as "
                           "they were trained (their peftkit.json records it).")
    if first.quant is None or quantization is None:
        return
    if quantization != first.quant:
        raise PeftkitError(f"{section}: {first.source} was trained against a base quantized as {_quant(first.quant)} "
                           f"(its peftkit.json), and the recipe's quantization section is {_quant(quantization)}: other "
                           f"4-bit/8-bit weights. {who} needs the weights the adapters were trained against: set the "
                           "quantization section as their peftkit.json records it.")
    if (recorded := read_meta(first.source).quantized_from) != dtype:
        raise PeftkitError(f"{section}: {first.source} was trained against a base quantized from {recorded} weights "
                           f"(its peftkit.json base_dtype), and model.dtype is {dtype}: other 4-bit weights. {who} "
                           f"needs the weights the adapters were trained against: set model.dtype: {recorded}.")
    if here is not None and (note := requantized_note(
            first.source, here, "the experts meet slightly other weights than they were trained against",
            "Train on {where} for the exact base.", f"{section}: {first.source}")):
        warnings.warn(PeftkitWarning(note), stacklevel=3)


def _quant(quantization) -> str:
    """A quantization section in words: its method and the settings of it that are not the defaults."""
    settings = quantization.model_dump(exclude={"method"}, exclude_defaults=True)
    return quantization.method + "".join(f", {k}: {v}" for k, v in settings.items())


def check_commit(fused: list[Fused], name: str, revision: str | None, commit: str | None, section: str = "adapter.fuse",
                 who: str = "AdapterFusion") -> None:
    """Adapters read for training that record the commit of hub base `name` they were trained on (peftkit records the
    commit it loaded) are used on that commit: `commit`, the one this run loaded at model.revision `revision`."""
    import re

    if commit is None or fused[0].state is None:
        return
    base, recorded = fused[0].base  # one for all: `check_same_base`
    if base == name and recorded and re.fullmatch(r"[0-9a-f]{40}", recorded) and recorded != commit:
        raise PeftkitError(f"{section}: the adapters were trained on {name} at commit {recorded}, and this run "
                           f"loaded commit {commit} (model.revision {revision or 'main'}). {who} needs the "
                           f"base the adapters were trained on: set model.revision: {recorded}.")


def check_rope(fused: list[Fused], rope_scaling, section: str = "adapter.fuse", who: str = "AdapterFusion") -> None:
    """Adapters read for training were trained on the base scaled as the recipe's model.rope_scaling scales it: each
    adapter's update meets the base it was trained against (they all record one: `check_same_base`)."""
    from peftkit.adapter_meta import describe_rope, read_meta

    if fused[0].state is None:
        return
    if (recorded := read_meta(fused[0].source).rope_scaling) != rope_scaling:
        raise PeftkitError(f"{section}: the adapters were trained with RoPE scaling {describe_rope(recorded)} "
                           f"(their peftkit.json), and model.rope_scaling is {describe_rope(rope_scaling)}. "
                           f"{who} needs the base the adapters were trained on: set model.rope_scaling as "
                           "they record it.")


def _same_model(a: str, b: str) -> bool:
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


def copy_weights(layer: AdapterLayer, fused: Fused, path: str) -> None:
    """Copy the adapter's tensors for the module at `path` from its file into its freshly wrapped `layer`."""
    from peftkit.adapters import PEFT_PREFIX

    for name, p in layer.adapter_params().items():
        key = f"{PEFT_PREFIX}{path}.{name}"
        tensor = fused.state.get(key)
        if tensor is None or tuple(tensor.shape) != tuple(p.shape):
            found = "is missing" if tensor is None else f"has shape {tuple(tensor.shape)}, not {tuple(p.shape)}"
            raise PeftkitError(f"adapter.fuse: {fused.source} does not fit this model: {key} {found}. Was it "
                               "trained on another base model?")
        if p.device.type != "meta":  # the memory estimate builds the layers on the meta device
            with torch.no_grad():
                p.copy_(tensor.to(p.dtype))
