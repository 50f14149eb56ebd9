"""`peftkit merge` with several adapters (`--weights`, `--method`): combine them layer by layer
(`peftkit.combine`) and write a PEFT LoRA adapter, or, with `--into-base`, fold the combined update into the
base (dequantized, for a 4-bit base, as the single-adapter merge) and write a plain model.

The output adapter has scaling 1 (`lora_alpha` = `r`, `use_rslora: false`): its factors already carry each
adapter's own scaling, rsLoRA's alpha / sqrt(r) included (peft copies `use_rslora` from the first adapter
with `lora_alpha` = `r`, so its combination of rsLoRA adapters is sqrt(r) times too large).

LoRA adapters combine through their factors; any other method, and LoRA with DoRA, through its full per-layer
update merge_weight(W) - W (the `*_svd` types and `--into-base`). A DoRA adapter's update so includes its
magnitude, m (W + s B A) / ||W + s B A||_c - W, which peft's combination drops (it keeps the first adapter's
DoRA setting and starts the new magnitude at ||W||_c).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from peftkit.combine import FACTOR_WISE, combine_factors, combine_tensors, concatenate, low_rank
from peftkit.combine_inputs import (Combination, Source, adapted_modules, check_combinable, check_fits,
                                    check_same_base, lora_layers, output_rank, read_sources, skeleton,
                                    uses_full_updates)
from peftkit.errors import PeftkitError
from peftkit.methods.lora import LoraConfig
from peftkit.methods.lora_layers import LoraFacts, lora_delta, lora_scaling

Layers = dict[str, tuple[torch.Tensor, torch.Tensor, bool]]
"""{module path: (A, B, is_embedding)}: a LoRA adapter's factors, scaling 1."""


def full_deltas(source: Source, base: dict[str, torch.Tensor], conv1d: set[str]) -> dict[str, torch.Tensor]:
    """{module path: merge_weight(W) - W}, fp32, in the base weight's layout, for an adapter of any method.

    An update that also changes a bias (IA3 on a biased layer) is refused: a LoRA cannot carry it."""
    from peftkit.adapters.state_dicts import merge_state_dict

    modules = adapted_modules(source)
    subset = {k: v for k, v in base.items() if k.rsplit(".", 1)[0] in modules}
    try:
        merged = merge_state_dict(subset, _without_base_copies(source, subset), source.cfg, conv1d, dtype=torch.float32)
    except PeftkitError as e:  # "The adapter does not fit...": say which of the inputs
        raise PeftkitError(f"{source.path}: {e}") from None
    for m in modules:
        bias = f"{m}.bias"
        if bias in subset and not torch.equal(merged[bias], subset[bias].float()):
            raise PeftkitError(f"{source.describe} also changes the bias of '{m}', which a combination (a LoRA "
                               "update of the weights) cannot carry. Leave this adapter out.")
    return {m: merged[f"{m}.weight"] - subset[f"{m}.weight"].float() for m in modules}


def _without_base_copies(source: Source, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's tensors without the copies of adapted layers' base weights that peft saves beside the factors
    (`embed_tokens.base_layer.weight`: save_embedding_layers, on by default with an embedding target); they were read
    as saved modules the base lacks. A copy that differs from the base's weight is refused: the adapter was saved on
    other weights, and its update is to those."""
    from peftkit.adapters import PEFT_PREFIX

    state = {}
    for key, tensor in source.state.items():
        module = key[len(PEFT_PREFIX):].removesuffix(".base_layer.weight")
        if not key.endswith(".base_layer.weight") or f"{module}.weight" not in base:
            state[key] = tensor
        elif not _same(tensor, base[f"{module}.weight"]):
            raise _differing_copy(source, module, key)
    return state


def check_lora_base_copies(sources: list[Source], base_weight) -> None:
    """A plain LoRA's copies of adapted layers' base weights (peft's save_embedding_layers) equal the base's: its
    factors combine without them, so one that differs (the adapter was saved on other weights, and its update is to
    those) was ignored silently. `base_weight(key)`: the base's tensor of that state-dict key, None where it has
    none. Other methods' copies are checked by `full_deltas`."""
    from peftkit.adapters import PEFT_PREFIX

    for source in (s for s in sources if s.plain_lora):
        for key, tensor in source.state.items():
            if key.startswith(PEFT_PREFIX) and key.endswith(".base_layer.weight"):
                module = key[len(PEFT_PREFIX):].removesuffix(".base_layer.weight")
                weight = base_weight(f"{module}.weight")
                if weight is None or not _same(tensor, weight):
                    raise _differing_copy(source, module, key)


def _same(copy: torch.Tensor, weight: torch.Tensor) -> bool:
    """The copy is the base's weight, in the dtype it was saved in (a float32 checkpoint loaded in bfloat16 to train
    on is the same base)."""
    return copy.shape == weight.shape and torch.equal(copy, weight.to(copy.dtype))


def _differing_copy(source: Source, module: str, key: str) -> PeftkitError:
    return PeftkitError(f"{source.path} saves a copy of '{module}''s weight ({key}, peft's save_embedding_layers) "
                        "that differs from the base's: it was saved on other weights (a resized or trained "
                        "embedding), and its update is to those. Merge it alone (`peftkit merge --adapter` once).")


def _base_weight_reader(name: str, revision: str | None, load):
    """key -> the base's tensor, read alone from its safetensors (safe_open: the one tensor, not the model); the
    whole base is loaded (`load()`: its plain state dict) only where no local file holds the key by that name (a
    hub id not in the cache, a checkpoint of another layout)."""
    from safetensors import safe_open

    from peftkit.manifest import model_directory
    from peftkit.model_source import _weight_files

    directory = model_directory(name, revision)
    files = _weight_files(directory) if directory is not None else []
    loaded: list[dict[str, torch.Tensor]] = []

    def read(key: str) -> torch.Tensor:
        for file in files:
            with safe_open(file, "pt") as f:
                if key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    return f.get_tensor(key)
        if not loaded:
            loaded.append(load())
        return loaded[0].get(key)
    return read


def _lora_delta(a: torch.Tensor, b: torch.Tensor, embedding: bool, cfg, path: str, fan_in_fan_out: bool) -> torch.Tensor:
    """s B A of the layer at `path` in the base weight's layout, as peft's get_delta_weight."""
    parts = {"lora_embedding_A": a, "lora_embedding_B": b} if embedding else {"lora_A.weight": a, "lora_B.weight": b}
    return lora_delta(parts, LoraFacts(_alpha(cfg, path), cfg.use_rslora, fan_in_fan_out))


def _alpha(cfg, path: str) -> float:
    """The alpha of a LoRA's layer at `path`: its alpha_pattern's, else its alpha (the rank comes from A's shape)."""
    return cfg.rank_and_alpha(path)[1]


def _combine_layer(c: Combination, path: str, terms: list[tuple[int, object]], sources: list[Source],
                   rank: int, transposed: bool, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the layer at `path` from the adapters that adapt it: `terms` [(adapter index, its (A, B,
    embedding) factors or its full delta)]. `transposed`: the base weight is stored (in, out) (Conv1D, embedding)."""
    weights = [c.weights[i] for i, _ in terms]
    if c.method in (*FACTOR_WISE, "cat"):
        a, b = [t[0] for _, t in terms], [t[1] for _, t in terms]
        scalings = [lora_scaling(_alpha(sources[i].cfg, path), t[0].shape[0], sources[i].cfg.use_rslora)
                    for i, t in terms]
        if c.method == "cat":
            return concatenate(a, b, weights, scalings, rank)
        return combine_factors(c.method, a, b, weights, scalings, c.density, c.majority_sign, generator)
    deltas = [t if isinstance(t, torch.Tensor) else _lora_delta(*t, sources[i].cfg, path, transposed and not t[2])
              for i, t in terms]
    delta = combine_tensors(c.method, deltas, weights, c.density, c.majority_sign, generator)
    return low_rank(delta.T if transposed else delta, rank, c.svd_clamp)


def combine_layers(c: Combination, sources: list[Source], model: nn.Module,
                   base: dict[str, torch.Tensor] | None, generator: torch.Generator | None = None) -> Layers:
    """The combined adapter's factors, layer by layer in model order (DARE's draws in peft's order).

    Args:
        model: the base model, on the meta device will do (names, layer types).
        base: the base's plain fp32 state dict; needed only for adapters other than plain LoRA.
        generator: DARE's draws; default one seeded with `c.seed`.
    """
    from peftkit.merge_weights import conv1d_modules

    generator = generator or torch.Generator().manual_seed(c.seed)
    conv1d = conv1d_modules(model)
    terms = [lora_layers(s.state) if s.plain_lora else full_deltas(s, base, conv1d) for s in sources]
    rank = output_rank(c, sources)
    layers: Layers = {}
    for name, module in model.named_modules():
        present = [(i, t[name]) for i, t in enumerate(terms) if name in t]
        if present:
            embedding = isinstance(module, nn.Embedding)
            a, b = _combine_layer(c, name, present, sources, rank, embedding or name in conv1d, generator)
            layers[name] = (a.contiguous(), b.contiguous(), embedding)
    return layers


def combined_updates(c: Combination, sources: list[Source], model: nn.Module, base: dict[str, torch.Tensor],
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """{module path: the combined full update}, fp32, in the base weight's layout, untruncated: `--into-base`
    with a factor type and an input without LoRA factors (`uses_full_updates`). linear and cat become the exact
    weighted sum; the pruning types prune and elect on the full updates."""
    from peftkit.merge_weights import conv1d_modules

    generator = generator or torch.Generator().manual_seed(c.seed)
    conv1d = conv1d_modules(model)
    kind = "svd" if c.method in ("linear", "cat") else c.method  # combine_tensors: "svd" is the weighted sum
    # A LoRA's update is made from its factors as its layer is combined (all of them made first took another fp32
    # copy of the adapted layers per LoRA input); another method's come whole from `full_deltas`.
    updates = [lora_layers(s.state) if s.plain_lora else full_deltas(s, base, conv1d) for s in sources]
    combined = {}
    for name, _ in model.named_modules():
        present = [(i, u[name]) for i, u in enumerate(updates) if name in u]
        if present:
            deltas = [d if isinstance(d, torch.Tensor) else _lora_delta(*d, sources[i].cfg, name, name in conv1d)
                      for i, d in present]
            combined[name] = combine_tensors(kind, deltas, [c.weights[i] for i, _ in present],
                                             c.density, c.majority_sign, generator)
    return combined


def added_to_base(base: dict[str, torch.Tensor], updates: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base's state with each full update added to its module's weight, in fp32. Each update's own tensor takes
    the sum (update + W is W + update bit for bit) and leaves `updates` as it is added: the sums made beside the
    updates held two fp32 copies of the adapted layers at once."""
    merged = dict(base)
    for m in list(updates):
        merged[f"{m}.weight"] = updates.pop(m).add_(base[f"{m}.weight"])
    return merged


def adapter_files(layers: Layers, rank: int, base: str, revision: str | None,
                  conv1d: set[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """(PEFT-keyed tensors, adapter_config.json) of the combined LoRA: rank `rank`, alpha = rank (scaling 1)."""
    from peftkit.adapters import PEFT_PREFIX
    from peftkit.peft_format import peft_config

    state = {}
    for name, (a, b, embedding) in layers.items():
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        state[f"{PEFT_PREFIX}{name}.{a_key}"], state[f"{PEFT_PREFIX}{name}.{b_key}"] = a, b
    targets = sorted(layers)
    cfg = LoraConfig(r=rank, alpha=float(rank), target_modules=targets)
    return state, peft_config(cfg, targets, base, bool(conv1d & set(targets)), revision=revision)


def combine_adapters(adapter_dirs: list[str], combination: Combination, output_dir: str, into_base: bool = False,
                     base: str | None = None, dtype: str | None = None, overwrite: bool = False,
                     trust_remote_code: bool = False) -> Path:
    """`peftkit merge --adapter A --adapter B ... --weights ... --method ...`.

    Args:
        adapter_dirs: PEFT adapter directories of one base.
        combination: the method, the weights (one per adapter, any sign) and its options.
        output_dir: the combined LoRA adapter, or with `into_base` the merged model.
        into_base: fold the combined update into the base and save a plain model (+ tokenizer).
        base: base model for all; default their common base_model_name_or_path.
        dtype: `into_base`: float32 | bfloat16 | float16; default the base checkpoint's own.
        overwrite: replace an existing output (never the base, an adapter or the current directory).
        trust_remote_code: the user's `--trust-remote-code`.
    """
    from peftkit.adapter_meta import read_meta
    from peftkit.adapters.state_dicts import merge_state_dict
    from peftkit.merge import check_merge_output, checkpoint_dtype, merge_device
    from peftkit.merge_weights import base_state_dict, conv1d_modules, plain_conv1d_modules
    from peftkit.modeling import DTYPES

    combination.check(len(adapter_dirs))
    sources = read_sources(adapter_dirs, trust_remote_code)
    template = _common_template(adapter_dirs)
    name, revision = check_same_base(sources, base)
    check_combinable(combination, sources, into_base)
    protected = {"base model": name} | {f"adapter {i + 1}": d for i, d in enumerate(adapter_dirs)}
    output_dir = str(check_merge_output(Path(output_dir), protected, overwrite))  # (a symbolic link: its target)
    model = skeleton(name, revision, trust_remote_code)
    check_fits(sources, model, combination)

    def load() -> nn.Module:
        return _load_base(name, revision, sources[0].quant, merge_device(adapter_dirs[0]), trust_remote_code,
                          read_meta(adapter_dirs[0]))

    loaded = load() if into_base or not all(s.plain_lora for s in sources) else None
    base_state = base_state_dict(loaded) if loaded is not None else None
    check_lora_base_copies(sources, base_state.get if base_state is not None
                           else _base_weight_reader(name, revision, lambda: base_state_dict(load())))
    if uses_full_updates(combination, sources, into_base):
        updates = combined_updates(combination, sources, model, base_state)
        merged = added_to_base(base_state, updates)
        _write_merged(loaded, merged, base_state, name, revision, dtype, output_dir, trust_remote_code, overwrite,
                      template)
        return Path(output_dir)
    layers = combine_layers(combination, sources, model, base_state)
    rank = output_rank(combination, sources)
    state, config = adapter_files(layers, rank, name, revision, conv1d_modules(model))
    if into_base:
        # Each layer merged in fp32 and cast to the output dtype as it is done (the checks of NaN and of overflow
        # made on it as merged: merge_state_dict), as `merged_model` does: merged whole in fp32 and cast after, the
        # merged layers took twice a bf16 model's size and the cast a copy more.
        dtype = dtype or checkpoint_dtype(name, revision)
        cfg = LoraConfig(r=rank, alpha=float(rank), target_modules=list(layers))
        merged = merge_state_dict(base_state, state, cfg, plain_conv1d_modules(loaded), dtype=DTYPES[dtype])
        _write_merged(loaded, merged, base_state, name, revision, dtype, output_dir, trust_remote_code, overwrite,
                      template)
    else:
        _write_adapter(output_dir, state, config, sources[0], overwrite, template)
    return Path(output_dir)


def _load_base(name: str, revision: str | None, quant, device: torch.device, trust_remote_code: bool,
               meta) -> nn.Module:
    """The base, quantized (from the dtype it was quantized from) and RoPE-scaled as the adapters were trained, by
    their first's peftkit.json `meta` (so that its dequantized weights are theirs, and the merged model's config.json
    keeps the scaling)."""
    from peftkit.modeling import load_model
    from peftkit.recipe import ModelConfig

    dtype = "auto" if quant is None else meta.base_dtype or "float32"
    cfg = ModelConfig(name_or_path=name, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code,
                      rope_scaling=meta.rope_scaling)
    return load_model(cfg, quant, device)


def _common_template(adapter_dirs: list[str]) -> str | None:
    """The chat template the adapters carry (chat_template.jinja: runs with data.chat_template), where they all carry
    the same one; else None, warned about where only some have one or theirs differ."""
    import warnings

    from peftkit.data.chat_templates import ADAPTER_TEMPLATE, adapter_template
    from peftkit.errors import PeftkitWarning

    templates = {adapter_template(d) for d in adapter_dirs}
    if len(templates) > 1:
        warnings.warn(PeftkitWarning(f"the adapters' chat templates ({ADAPTER_TEMPLATE}, which a run with "
                                     "data.chat_template trained with) are not all the same, so the output carries "
                                     "none: the base tokenizer's own applies to it. Copy the one to use into it."),
                      stacklevel=3)
        return None
    return templates.pop()


def _write_adapter(output_dir: str, state: dict[str, torch.Tensor], config: dict, first: Source,
                   replace: bool, template: str | None = None) -> None:
    """The combined adapter, atomically as a directory (`replace`: an output there by then, as `save_merged`); its
    peftkit.json keeps the inputs' quantization; `template`, the adapters' chat template, in chat_template.jinja.
    Put in place under the lock of the names beside it (`atomic_directories`), as a merged model is: another merge's
    checks of the same --output, in the milliseconds of the swap, took its set-aside `.OUTPUT.old` for a killed
    write's leftover and put it back, and the swap failed."""
    from peftkit.adapter_meta import quantized_on, read_meta
    from peftkit.data.chat_templates import ADAPTER_TEMPLATE
    from peftkit.fileio import atomic_directories, atomic_write_bytes
    from peftkit.peft_format import save_adapter

    if not all(torch.isfinite(t).all() for t in state.values()):
        raise PeftkitError("The combined adapter has NaN/inf values; nothing was written.")
    with atomic_directories([Path(output_dir)], replace) as (tmp,):
        meta = read_meta(first.path)
        save_adapter(tmp, state, config, first.quant, quantized_on(first.path), meta.trust_remote_code,
                     rope_scaling=meta.rope_scaling, base_dtype=meta.base_dtype)
        if template is not None:
            atomic_write_bytes(tmp / ADAPTER_TEMPLATE, template.encode())


def _made_non_finite(merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> bool:
    """Whether the combination made a value NaN or inf that the base holds finite. An infinity the base holds itself
    (a -inf mask or +-inf clamp bound in a persistent buffer, which no adapter touches) is the base's, written as it
    is, as `peftkit merge` of one adapter writes it; it was refused as "the combined update has NaN/inf values".
    The base is read only beside a tensor that is not finite: read beside every one, the check took 2.4 times as
    long (7.5 s against 3.2 s over a 512 MiB float32 state on 2 CPU cores)."""
    for key, tensor in merged.items():
        if not tensor.is_floating_point() or (finite := torch.isfinite(tensor)).all():
            continue
        made = ~finite
        if key in base and base[key].shape == tensor.shape:
            made &= torch.isfinite(base[key]).to(made.device)
        if made.any():
            return True
    return False


def _write_merged(loaded: nn.Module, merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor], name: str,
                  revision: str | None, dtype: str | None, output_dir: str, trust_remote_code: bool, replace: bool,
                  template: str | None = None) -> None:
    """The merged fp32 state as a plain model (+ tokenizer, with the adapters' chat `template` where they have one)
    in `dtype`, with the single-adapter merge's code. `base`: the base's state, whose own infinities are kept."""
    from peftkit.merge import base_provenance, checkpoint_dtype, save_merged
    from peftkit.merge_weights import check_state_in_range, non_persistent_buffers, plain_model_from_state
    from peftkit.modeling import DTYPES, load_tokenizer
    from peftkit.recipe import ModelConfig

    dtype = dtype or checkpoint_dtype(name, revision)
    if _made_non_finite(merged, base):
        raise PeftkitError("The combined update has NaN/inf values; nothing was written.")
    check_state_in_range(merged, DTYPES[dtype])  # finite in fp32, past float16's 65504: refused, not written as inf
    model = plain_model_from_state(loaded.config, merged, DTYPES[dtype], non_persistent_buffers(loaded),
                                   generation_config=getattr(loaded, "generation_config", None))
    tok = load_tokenizer(ModelConfig(name_or_path=name, revision=revision, trust_remote_code=trust_remote_code),
                         template)
    save_merged(model, tok, output_dir, base_provenance(name, revision, trust_remote_code), replace)
