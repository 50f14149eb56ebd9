"""`peftkit inspect DIR`: what a PEFT-format adapter is, read from its files alone (no base model loaded).

Works for peftkit's adapters and peft's: the facts come from adapter_config.json, the tensor shapes and
dtypes in adapter_model.safetensors (read from its header, never the data), and peftkit.json when there is
one. An adapter with a feature peftkit cannot apply yet (a peft feature it does not implement) is still
described, with the reason peftkit would refuse to load it.

Whether vLLM and llama.cpp take it is `peftkit.serving`'s verdict.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from peftkit.errors import PeftkitError
from peftkit.methods import Method
from peftkit.methods.monteclora import without_sampler
from peftkit.methods.token_rows import TOKEN_ROWS
from peftkit.methods.trainable_tokens import ROWS_PARAM
from peftkit.methods.xlora_experts import expert_shown
from peftkit.peft_format import (
    CONFIG_NAME,
    check_adapter_dir,
    read_meta,
    read_peft_config,
    unreadable_safetensors,
    without_adapter_name,
)
from peftkit.serving import llama_cpp_verdict, rope_caveat, vllm_verdict

# Tensors of an adapter layer beside its low-rank pair (DoRA's magnitudes): counted with their layer, not taken
# for modules_to_save.
_LAYER_EXTRAS = ("lora_magnitude_vector", "lora_magnitude_vector.weight")

_VARIANTS = {"use_dora": "DoRA", "use_rslora": "rsLoRA scaling", "use_bdlora": "BD-LoRA (block-diagonal factors)",
             "velora_config": "VeLoRA (trained from compressed inputs)",
             "kasa_config": "KaSA (trained singular values, truncated base)",
             "monteclora_config": "MonteCLoRA (plain LoRA outside training)"}
"""adapter_config.json's flags that make a LoRA one of its variants, and the variant's name."""

def inspect_adapter(path: str | Path) -> dict:
    """The facts of an adapter directory, as a JSON-ready dict.

    Raises the PeftkitError `load_adapter` raises for a directory that is not a readable PEFT adapter (no
    directory, no adapter_config.json, no safetensors weights, an unknown peft_type, malformed fields).

    Returns keys: path, method, peft_type, peftkit_reads ({ok, reason}: why not, or how it reads it where
    it converts it), base_model, revision, targets
    ({count, modules: {name: count}}), ranks ({module path: r} for the layers with a low-rank factor; null
    for a method without a rank, IA3), modules_to_save, trainable_tokens ({module path: trained rows}),
    layer_replication (LoRA's stacked ranges, or null), alora_invocation_tokens (aLoRA's, or null),
    target_parameters (LoRA's parameters, or null),
    trainable_params, adapter_params, saved_params (differs
    from trainable_params where an encoder's output is saved: P-tuning), base_copies, shared ({saved:
    {name: shape}, regenerated: [names]}: frozen tensors every layer uses, VeRA's projections; null for other
    methods), dtypes, size_on_disk, quantization, rope_scaling ({type, factor} recorded in peftkit.json, or null),
    trust_remote_code, variants (LoRA's: "DoRA", "rsLoRA scaling"), virtual_tokens (the prompt family's count; null
    for other methods), vllm ({accepts, reasons, caveats}), llama_cpp (the same, for llama.cpp's
    convert_lora_to_gguf.py), classifier (a SEQ_CLS adapter's head: {outputs, labels}, one output a reward model's;
    null for a language model's).
    """
    path = Path(path)
    weights_file = check_adapter_dir(path)
    method, peft = read_peft_config(path)
    meta = read_meta(path)
    raw = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    trained, residual, reads = _how_peftkit_reads(method, peft, path, raw)
    shapes, dtypes = _tensor_header(weights_file)
    renamed = without_adapter_name(shapes, method, weights_file)
    shapes = _shapes_as_loaded(method, peft, {new: shapes[key] for key, new in renamed.items()})
    targets, saved, shared, base_copies = _sort_tensors(method, shapes)
    tied_rows = _tied_row_copies(weights_file, renamed, raw)
    trained, adapter_params, saved_params = _param_counts(method, targets, saved, shared, shapes, tied_rows, trained)
    trained -= method.repeated_in_file(peft, targets)  # (Lily's shared A and B, saved under each of their layers)
    trained -= method.frozen_in_file(peft, shapes)  # (a pretrained ShadowPEFT backbone's embeddings)
    ranks = _ranks(method, targets, weights_file)
    info = {
        "path": str(path),
        "method": method.name,
        "peft_type": method.peft_type,
        "peftkit_reads": reads,
        "base_model": peft.base_model_name_or_path,
        "revision": peft.revision,
        "targets": {"count": len(targets), "modules": dict(sorted(Counter(_label(p) for p in targets).items()))}
        # a file with no per-layer tensor (Uni-LoRA's without save_indices): the layers its config names
        | ({"named": raw["target_modules"]} if not targets and method.layer_targets and raw.get("target_modules")
           else {})
        # those of other adapters, by directory (X-LoRA's experts: its file holds its classifier alone; peftkit reads
        # an export's own copies of them, which its peftkit.json names; a hub expert as the file names it, with the
        # snapshot peftkit reads)
        | ({"experts": {n: str(path / r) for n, r in meta.experts.items()} if meta.experts else
            {n: expert_shown(v) for n, v in (raw.get("adapters") or {}).items()}}
           if not method.targets_in_config else {}),
        "ranks": ranks,
        "modules_to_save": peft.modules_to_save or [],
        "trainable_params": trained,
        "adapter_params": adapter_params,
        "saved_params": saved_params,
        "base_copies": base_copies,
        "shared": {"saved": shared, "regenerated": [n for n in method.shared_names if n not in shared]}
        | ({"trained": list(method.shared_trained)} if method.shared_trained else {}) if method.shared_names else None,
        "dtypes": sorted(dtypes),
        "size_on_disk": sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
        "quantization": meta.quantization.model_dump() if meta.quantization else None,
        "rope_scaling": meta.rope_scaling.model_dump() if meta.rope_scaling else None,
        "trust_remote_code": meta.trust_remote_code,
        "added_tokens": meta.added_tokens,
        "variants": [name for key, name in _VARIANTS.items() if raw.get(key)],
        "virtual_tokens": None if method.layer_targets else raw.get("num_virtual_tokens"),
    }
    info["classifier"] = _classifier(raw, shapes, meta)
    info["layer_replication"] = raw.get("layer_replication")
    info["alora_invocation_tokens"] = raw.get("alora_invocation_tokens")
    info["target_parameters"] = raw.get("target_parameters")
    if info["target_parameters"] and ranks:
        ranks = info["ranks"] = _parameter_ranks(raw, ranks)
    info["trainable_tokens"] = {name.removeprefix("base_model.model.").removesuffix("." + TOKEN_ROWS): shape[0]
                                for name, shape in shapes.items() if name.endswith("." + TOKEN_ROWS)}
    info["tied_rows"] = {_module(copy): _module(kept) for copy, kept in tied_rows.items()}
    info["vllm"], info["llama_cpp"] = _serving_verdicts(method, raw, ranks, targets, saved, base_copies,
                                                        _unservable_as_saved(renamed, residual))
    if info["rope_scaling"] and info["vllm"]["accepts"]:
        info["vllm"]["caveats"].insert(0, rope_caveat(info["rope_scaling"]))
    return info


def _param_counts(method: type[Method], targets: dict, saved: dict, shared: dict, shapes: dict, tied_rows: dict,
                  trained: int | None) -> tuple[int, int, int]:
    """(trainable, adapter, saved) parameter counts of the file's tensors: the adapter's layers' (not the tensors
    that never train, `Method.untrained_names`); with what else the file saves (modules_to_save, a shared tensor that
    trains once for all the layers: VB-LoRA's bank); trainable as the method counts it (`trained`, where it says),
    else the saved ones less the tied head's copies of trained rows."""
    adapter_params = sum(_numel(s) for parts in targets.values() for n, s in parts.items()
                         if n not in method.untrained_names)
    saved_params = adapter_params + sum(saved.values()) + sum(_numel(shared[n]) for n in method.shared_trained
                                                              if n in shared)
    if trained is None:
        trained = saved_params - sum(_numel(shapes[key]) for key in tied_rows)
    return trained, adapter_params, saved_params


def _serving_verdicts(method: type[Method], raw: dict, ranks, targets: dict, saved: dict, base_copies,
                      unservable: list[str]) -> tuple[dict, dict]:
    """vLLM's and llama.cpp's verdicts on the adapter, each refusing too for what the file holds as saved that
    they would read wrong (`unservable`)."""
    verdicts = (vllm_verdict(method.peft_type, raw, ranks, targets, saved, base_copies),
                llama_cpp_verdict(method.peft_type, raw, saved, targets))
    for reason in unservable:
        for verdict in verdicts:
            verdict["accepts"] = False
            verdict["reasons"].append(reason)
    return verdicts


def _shapes_as_loaded(method: type[Method], peft, shapes: dict[str, tuple]) -> dict[str, tuple]:
    """The file's tensor shapes (by PEFT key, the adapter name taken out) as loading makes them: without MonteCLoRA's
    training state, without RandLoRA's copies of the shared bases under each layer (peft's file repeats them; not
    trained), and VB-LoRA's top-k file as the logits it was saved from."""
    shapes = without_sampler(shapes, peft)
    if method.shared_copies_per_layer:
        copies = tuple(f".{n}" for n in method.shared_names)
        shapes = {k: s for k, s in shapes.items() if not (k.startswith("base_model.model.") and k.endswith(copies))}
    if getattr(peft, "save_only_topk_weights", False):
        shapes = {k.removesuffix("_topk_indices"): (*s[:-1], peft.num_vectors) if k.endswith("_topk_indices") else s
                  for k, s in shapes.items() if not k.endswith("_topk_weights")}
    return shapes


def _how_peftkit_reads(method: type[Method], peft, path: Path, raw: dict) -> tuple[int | None, str | None, dict]:
    """(trained parameters as the method counts them, or None; the residual init peft saved it unconverted for, or
    None; `peftkit_reads`: {ok, reason}) of an adapter's config: whether peftkit loads it, and why not or how."""
    try:
        cfg = method.from_peft(peft, path / CONFIG_NAME)
        trained, residual = method.trained_params(cfg, raw), getattr(cfg, "_residual_init", None)
    except PeftkitError as e:
        return None, None, {"ok": False, "reason": str(e)}
    return trained, residual, {"ok": True, "reason": None if residual is None else RESIDUAL.format(init=residual)}


def _parameter_ranks(raw: dict, ranks: dict[str, int]) -> dict[str, int]:
    """`ranks` of an adapter with LoRA on parameters (target_parameters): a parameter's lora_A has r x experts rows,
    so its rank is the config's r (left out under a rank_pattern, which the file's shapes cannot resolve without the
    expert count)."""
    modules = {m.rsplit(".", 1)[-1] for m in raw.get("target_modules") or [] if isinstance(m, str)}

    def on_parameter(path: str) -> bool:
        return ".base_layer" in path or _label(path) not in modules

    return {path: raw["r"] if on_parameter(path) else rank for path, rank in ranks.items()
            if not (on_parameter(path) and raw.get("rank_pattern"))}


def _unservable_as_saved(renamed: dict[str, str], residual: str | None) -> list[str]:
    """Why neither vLLM nor llama.cpp can use the files as saved, whatever their verdicts on the method: weights
    saved for a residual base (PiSSA, OLoRA, ... unconverted), keys carrying peft's in-memory adapter name."""
    from peftkit.adapters import PEFT_PREFIX

    named = next((key for key, new in renamed.items() if key != new), None)
    return (([RESIDUAL_ELSEWHERE.format(init=residual)] if residual else []) +
            ([NAMED_KEYS.format(key=named.removeprefix(PEFT_PREFIX))] if named else []))


RESIDUAL = ("peft saved it unconverted, for the residual base its {init} init leaves; peftkit converts it on loading "
            "(that init computed again from the base weights) to the plain LoRA of rank 2r it is on the original base")
RESIDUAL_ELSEWHERE = ("init_lora_weights {init}: saved unconverted, for the residual base that init leaves, it would "
                      "be applied to the original base (wrong outputs, without an error); `peftkit merge` it, or save "
                      "it again with peft's path_initial_model_for_weight_conversion")


NAMED_KEYS = ("its keys carry peft's in-memory adapter name ({key}), which peft and peftkit read and other loaders "
              "do not: save it with peft's save_pretrained, or `peftkit merge` it")


def _sort_tensors(method, shapes: dict[str, tuple[int, ...]]) -> tuple[dict, dict, dict, list[str]]:
    """The file's tensors by role: (module path -> {tensor suffix: shape} for the adapted layers, modules_to_save
    tensor -> numel, shared frozen tensor name -> shape, the frozen base weights saved beside the adapter: peft's
    `save_embedding_layers` copies an adapted embedding's `base_layer.weight`)."""
    from peftkit.adapters import PEFT_PREFIX, SHARED_PREFIX

    targets: dict[str, dict[str, tuple[int, ...]]] = {}
    saved: dict[str, int] = {}
    base_copies: list[str] = []
    shared = {k[len(SHARED_PREFIX):]: shape for k, shape in shapes.items()
              if not k.startswith(PEFT_PREFIX) and k[len(SHARED_PREFIX):] in method.shared_names}
    for key, shape in shapes.items():
        if not key.startswith(PEFT_PREFIX) and key[len(SHARED_PREFIX):] in shared:
            continue  # frozen, not trained
        if not key.startswith(PEFT_PREFIX) and key[len(SHARED_PREFIX):].split(".")[0] in method.untrained_names:
            continue  # frozen, kept once per kind of layer (FRoD's `base_model.frod_V.<category>`)
        name = key.removeprefix(PEFT_PREFIX)
        if ".fused." in name:
            continue  # AdapterFusion's frozen copies of the adapters it fuses, not trained
        if name.endswith(".base_layer.weight"):
            base_copies.append(name)  # a frozen copy of the base's weight, not trained
            continue
        if not method.layer_targets:  # the prompt family: `prompt_embeddings`, the whole model's adapter
            targets.setdefault("(virtual tokens)", {})[name] = shape
            continue
        suffix = next((s for s in method.param_names + _LAYER_EXTRAS if name.endswith("." + s)), None)
        if suffix is None:
            saved[name] = _numel(shape)
        else:
            targets.setdefault(name[: -len(suffix) - 1], {})[suffix] = shape
    return targets, saved, shared, base_copies


def _label(path: str) -> str:
    """A target's name in the module counts: its last component, wrappers taken out (LoRA on two parameters of
    `experts` nests `experts.base_layer` in `experts`); a whole block's (ShadowPEFT's `model.layers.3`), its list's
    name, `layers`, not its index."""
    parts = path.replace(".base_layer", "").split(".")
    return next((part for part in reversed(parts) if not part.isdecimal()), parts[-1])


def _module(key: str) -> str:
    """The module path of a trained-rows tensor's key: `lm_head` for `base_model.model.lm_head.trainable_tokens_delta`."""
    return key.removeprefix("base_model.model.").removesuffix("." + TOKEN_ROWS).removesuffix("." + ROWS_PARAM)


def _tied_row_copies(weights_file: Path, renamed: dict[str, str], raw: dict) -> dict[str, str]:
    """{copy key: kept key} for trained token rows saved twice: a head tied to the embeddings holds their rows, and
    peft (and peftkit) save them under both modules' names. Two row tensors equal bit for bit are one trained tensor;
    the kept one is the module the config names (`target_modules`, or trainable_token_indices' keys), else the first."""
    from safetensors import safe_open

    keys = [key for key, new in renamed.items() if new.endswith("." + ROWS_PARAM)]  # (TOKEN_ROWS ends so too)
    if len(keys) < 2:
        return {}
    with safe_open(weights_file, "pt") as f:
        rows = {renamed[key]: f.get_tensor(key) for key in keys}
    indices = raw.get("trainable_token_indices")
    named = raw.get("target_modules") if raw.get("peft_type") == "TRAINABLE_TOKENS" else (
        list(indices) if isinstance(indices, dict) else ["embed_tokens"])
    named = [named] if isinstance(named, str) else list(named or [])

    def is_named(key: str) -> bool:
        return any(_module(key) == n or _module(key).endswith("." + n) for n in named)

    copies: dict[str, str] = {}
    order = sorted(rows, key=lambda key: (not is_named(key), key))
    for i, key in enumerate(order):
        kept = next((k for k in order[:i] if k not in copies and rows[k].shape == rows[key].shape
                     and rows[k].dtype == rows[key].dtype and torch.equal(rows[k], rows[key])), None)
        if kept is not None:
            copies[key] = kept
    return copies


def _tensor_header(weights_file: Path) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """{key: shape} and the dtypes of a safetensors file, from its header (no tensor data is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(weights_file, "pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
            shapes = {k: tuple(s.get_shape()) for k, s in slices.items()}
            dtypes = {_DTYPE_NAMES.get(s.get_dtype(), s.get_dtype()) for s in slices.values()}
    except (SafetensorError, OSError) as e:
        raise unreadable_safetensors(weights_file, e, "Export the adapter again, or copy it again") from None
    return shapes, dtypes


# safetensors' dtype codes in torch's words
_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I8": "int8", "U8": "uint8",
                "I32": "int32", "I64": "int64", "BOOL": "bool"}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _ranks(method: type[Method], targets: dict[str, dict[str, tuple[int, ...]]],
           weights_file: Path) -> dict[str, int] | None:
    """Each layer's rank, read from a low-rank tensor's shape (the dimension the method's `rank_dims` names:
    LoRA's A is (r, in), LoHa's hada_w1_a (out, r)): the truth whatever `r` and `rank_pattern` say. None for a
    method without a rank (IA3); a LoKr layer whose two Kronecker factors are both full matrices has none. A tensor
    without that dimension (a 0-d lora_A: a damaged or hand-made file) is a PeftkitError naming it, not an IndexError."""
    if not method.rank_dims:
        return None
    ranks = {}
    for path, parts in sorted(targets.items()):
        for suffix, shape in parts.items():
            dim = method.rank_dims.get(suffix.removesuffix(".weight"))
            if dim is not None and dim >= len(shape):
                raise PeftkitError(f"{weights_file}: {path}.{suffix} has shape {shape}, with no dimension {dim} (its "
                                   "rank): the file is damaged, or not a PEFT adapter's. Export the adapter again, or "
                                   "copy it again.")
            if dim is not None:
                ranks[path] = shape[dim]
                break
    return ranks


def _classifier(raw: dict, shapes: dict, meta) -> dict | None:
    """A SEQ_CLS adapter's head: {outputs (its saved output layer's rows, None without it), labels (peftkit.json's
    class names, or None)}; None for another task. One output is a reward model's score (training.objective:
    reward)."""
    from peftkit.adapters import PEFT_PREFIX
    from peftkit.classify import HEAD_NAMES

    if raw.get("task_type") != "SEQ_CLS":
        return None
    # (the output layer as `adapter_labels` reads it: BERT's and a decoder's head is one Linear, RoBERTa's ends in
    # out_proj)
    head = next((shapes[k] for k in (f"{PEFT_PREFIX}{h}{part}.weight" for h in HEAD_NAMES for part in ("", ".out_proj"))
                 if k in shapes), None)
    return {"outputs": head[0] if head else None, "labels": list(meta.labels) if meta.labels else None}
