"""transformers 4's per-expert LoRA adapters on transformers 5's fused experts.

transformers 4 held a mixture of experts' experts as Linear layers, one per expert and projection (Mixtral's
`block_sparse_moe.experts.3.w1`; Qwen2-MoE's, Qwen3-MoE's, OLMoE's, DeepSeek's `mlp.experts.3.gate_proj`), and the
router as a Linear layer (`block_sparse_moe.gate`, `mlp.gate`): the LoRA adapters trained then adapt those. transformers
5 renames Mixtral's block to `mlp`, fuses each layer's experts into 3-D parameters (`experts.gate_up_proj`, each
expert's gate and up projections stacked, (E, 2 I, H); `experts.down_proj`, (E, H, I)) and makes the router a module
holding a `weight`. `on_fused_experts` rewrites such an adapter, where the model it loads on has the fused layout, as
LoRA on those parameters (`target_parameters`, `peftkit.methods.param_lora`), exactly:

- expert e's gate and up updates s B_g A_g and s B_u A_u are the stacked weight's update s [B_g 0; 0 B_u] [A_g; A_u],
  rank 2r with alpha chosen to keep s (2 alpha; sqrt(2) alpha under rsLoRA). Parts of other scalings (rank_pattern,
  alpha_pattern) have the ratio folded into their B; a part adapted alone gets zeros beside it;
- a router's update is its weight's, under the same keys.

peft 0.21 converts the same adapters (`peft.utils.transformers_weight_conversion`) and is the reference for the layout,
but fails to load one with lora_dropout (most of them: its parameter wrapper refuses dropout, which a loaded adapter
does not use), refuses a part adapted alone, scales an rsLoRA pair's update by sqrt(2) too much (it doubles alpha with
the rank), and leaves Qwen2-MoE's own model type unconverted (its experts' weights silently left out). What cannot be
converted (some experts missing, DoRA) is refused, naming it; layers of neither layout keep their error
(`peftkit.adapters._check_expert_layout`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from peftkit.adapters import PEFT_PREFIX as PREFIX
from peftkit.adapters import modules_adapted_by
from peftkit.errors import PeftkitError

RENAMED = ((".block_sparse_moe.", ".mlp."),)  # transformers 4's module path part -> transformers 5's
FUSED = {"gate_up_proj": (("w1", "w3"), ("gate_proj", "up_proj")), "down_proj": (("w2",), ("down_proj",))}
"""transformers 5's fused parameter -> the transformers 4 projections stacked in it, in order, per family."""
EXPERT = re.compile(r"^(?P<experts>.+\.experts)\.(?P<index>\d+)\.(?P<proj>[^.]+)$")
LINEAR_KINDS = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _adapted(keys) -> set[str]:
    """The module paths a LoRA file's keys adapt."""
    from peftkit.methods.lora import Lora

    return modules_adapted_by(keys, Lora)


def _renamed(path: str, modules: dict[str, nn.Module]) -> str:
    """`path` with transformers 4's block names replaced by transformers 5's, where the model has such a block."""
    for old, new in RENAMED:
        head, sep, tail = f".{path}.".partition(old)
        if sep and (block := f"{head}{new}"[1:-1]) in modules:
            return f"{block}.{tail}"[:-1]
    return path


def _router(path: str, modules: dict[str, nn.Module]) -> bool:
    """`path` is a transformers 5 router: a `gate` beside its block's `experts`, holding a 2-D `weight` alone (not a
    Linear layer)."""
    block, _, leaf = path.rpartition(".")
    module = modules.get(path)
    params = dict(module.named_parameters(recurse=False)) if module is not None else {}
    return (leaf == "gate" and f"{block}.experts" in modules and not isinstance(module, LINEAR_KINDS)
            and list(params) == ["weight"] and params["weight"].dim() == 2)


def _plan(cfg, adapted: set[str], model: nn.Module):
    """Of the adapted modules `model` lacks (or holds as routers): {transformers 4 router path: its path here},
    {(experts module, fused parameter): {projection: {expert index: transformers 4 path}}}."""
    from peftkit.methods.param_lora import _matches

    modules = dict(model.named_modules())
    # (a router keeps its path in most families: a module LoRA cannot wrap, its weight not already a target_parameter)
    old = {path: _renamed(path, modules) for path in sorted(adapted) if path not in modules or (
        _router(path, modules) and not _matches(f"{path}.weight", cfg.target_parameters or []))}
    groups: dict[tuple[str, str], dict[str, dict[int, str]]] = {}
    routers = {}
    for path, new in old.items():
        if _router(new, modules):
            routers[path] = new
        elif (match := EXPERT.match(new)) and match["experts"] in modules:
            fused = next((f for f, families in FUSED.items() for parts in families if match["proj"] in parts), None)
            if fused is not None and isinstance(getattr(modules[match["experts"]], fused, None), nn.Parameter):
                by_index = groups.setdefault((match["experts"], fused), {}).setdefault(match["proj"], {})
                by_index[int(match["index"])] = path
    return routers, groups


def _example(routers: dict[str, str], groups: dict) -> str:
    return min([*routers, *(p for found in groups.values() for by_index in found.values() for p in by_index.values())])


def check_start(cfg, model: nn.Module) -> None:
    """Refuse `adapter.init_from` naming such an adapter: training on would need LoRA on parameters with its
    settings, and those of most (lora_dropout) go with it neither in peft nor in an export peft could load."""
    from safetensors import safe_open

    from peftkit.peft_format import WEIGHTS_NAME

    if not getattr(cfg, "init_from", None) or not hasattr(cfg, "target_parameters"):
        return
    with safe_open(Path(cfg.init_from) / WEIGHTS_NAME, "pt") as f:
        keys = list(f.keys())
    routers, groups = _plan(cfg, _adapted(keys), model)
    if routers or groups:
        raise PeftkitError(
            f"adapter.init_from: {cfg.init_from} adapts transformers 4's per-expert mixture-of-experts layers (e.g. "
            f"'{_example(routers, groups)}'), which this model holds as fused 3-D parameters. peftkit converts such an "
            "adapter to evaluate, generate or merge it, not to train on from it: merge it into its base (`peftkit merge "
            f"--adapter {cfg.init_from} --output MERGED`) and train a new adapter on MERGED, or train one with "
            "adapter.target_parameters ([experts.gate_up_proj, experts.down_proj]).")


def on_fused_experts(cfg, state: dict[str, torch.Tensor], model: nn.Module):
    """(LoRA settings, PEFT-keyed tensors) of a transformers 4 mixture-of-experts adapter (see the module docstring)
    as LoRA on `model`'s fused experts and routers; anything else as given."""
    if not hasattr(cfg, "target_parameters"):
        return cfg, state
    modules = dict(model.named_modules())
    routers, groups = _plan(cfg, _adapted(state), model)
    if not routers and not groups:
        return cfg, state
    if cfg.use_dora or cfg.lora_bias:
        raise PeftkitError(f"The adapter adapts transformers 4's per-expert layers (e.g. "
                           f"'{_example(routers, groups)}') with {'DoRA' if cfg.use_dora else 'lora_bias'}, which "
                           "LoRA on transformers 5's fused experts does not have (nor peft's): load it with "
                           "transformers 4, or on the attention layers only.")
    state = dict(state)
    targets = {f"{new}.weight": (new, "weight") for new in routers.values()}  # parameter path -> (module, name)
    targets |= {f"{experts}.{fused}": (experts, fused) for experts, fused in groups}
    ranks, alphas = {}, {}  # (parameter path: each converted target's own entry, whatever the file's patterns say)
    for path, new in routers.items():  # (a parameter of a module of its own: the keys stay the module's)
        for part in ("A", "B"):
            state[f"{PREFIX}{new}.lora_{part}.weight"] = state.pop(f"{PREFIX}{path}.lora_{part}.weight")
        ranks[new, "weight"] = state[f"{PREFIX}{new}.lora_A.weight"].shape[0]
        alphas[new, "weight"] = cfg.rank_and_alpha(path)[1]
    for (experts, fused), found in groups.items():
        a, b, ranks[experts, fused], alphas[experts, fused] = _fused(cfg, state, experts, fused, found,
                                                                     getattr(modules[experts], fused))
        prefix = _key_prefix(experts, fused, modules[experts], targets)
        state[f"{PREFIX}{prefix}.lora_A.weight"], state[f"{PREFIX}{prefix}.lora_B.weight"] = a, b
    # Every converted parameter's own entries, first (patterns apply the first that matches): the file's patterns were
    # written for transformers 4's paths, and may match the new ones otherwise (`.*mlp.*`), or miss them (`gate`).
    patterns = {re.escape(f"{m}.{n}"): r for (m, n), r in ranks.items()}
    alpha_patterns = {re.escape(f"{m}.{n}"): alpha for (m, n), alpha in alphas.items()}
    kept = cfg.target_modules
    if isinstance(kept, list):  # (without the entries that named transformers 4's layers only: `w1`, `gate`)
        kept = [e for e in kept if any(p == e or p.endswith("." + e) for p in modules if not _router(p, modules))]
    elif not isinstance(kept, str) and kept is not None:  # a regex, which may match a router: the modules it adapted
        kept = sorted(p for p in _adapted(state) if p in modules and f"{p}.weight" not in targets)
    return cfg.model_copy(update={
        "target_modules": kept,
        "target_parameters": list(cfg.target_parameters or []) + list(targets),
        "rank_pattern": {**patterns, **cfg.rank_pattern}, "alpha_pattern": {**alpha_patterns, **cfg.alpha_pattern},
    }), state


def _key_prefix(module_path: str, name: str, module: nn.Module, targets: dict[str, tuple[str, str]]) -> str:
    """The path of `name`'s lora_A/lora_B as `param_lora.wrap_parameters` nests the wrappers of one module: the
    first targeted parameter the module registers innermost (`<module>.base_layer.base_layer...`)."""
    targeted = [p for p, _ in module.named_parameters(recurse=False) if f"{module_path}.{p}" in targets]
    return module_path + ".base_layer" * (len(targeted) - 1 - targeted.index(name))


def _fused(cfg, state: dict[str, torch.Tensor], experts: str, fused: str, found: dict[str, dict[int, str]],
           weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """lora_A (E R, in), lora_B (out, R E) in peft's layout for one fused parameter (its per-expert tensors taken out
    of `state`), its rank R and alpha."""
    from peftkit.methods.lora_layers import lora_scaling

    parts = next(family for family in FUSED[fused] if set(found) <= set(family))
    count = weight.shape[0]
    if weight.dim() != 3 or getattr(weight, "is_transposed", False):
        raise PeftkitError(f"'{experts}.{fused}' is not a stack of (out, in) expert weights: the adapter's per-expert "
                           "layers cannot be converted to it.")
    factors = {}  # projection -> (A (E, r, in), B (E, out, r), scaling)
    for proj, by_index in found.items():
        if max(by_index) >= count:
            raise PeftkitError(f"The adapter adapts {max(by_index) + 1} experts' {proj} in '{experts}', and this "
                               f"model's '{fused}' holds {count}: load it on the base it was trained on.")
        if sorted(by_index) != list(range(count)):
            missing = sorted(set(range(count)) - set(by_index))
            raise PeftkitError(f"The adapter adapts {len(by_index)} of the {count} experts' {proj} in '{experts}' "
                               f"(not expert {missing[0]}): transformers 5 fuses all "
                               f"{count} into '{fused}', and a partial set cannot be converted.")
        paths = [by_index[i] for i in range(count)]
        a = [state.pop(f"{PREFIX}{p}.lora_A.weight") for p in paths]
        b = [state.pop(f"{PREFIX}{p}.lora_B.weight") for p in paths]
        settings = {(t.shape[0], cfg.rank_and_alpha(p)[1]) for p, t in zip(paths, a)}
        if len({t.shape for t in a}) > 1 or len({t.shape for t in b}) > 1 or len(settings) > 1:
            raise PeftkitError(f"The adapter's experts in '{experts}' differ in the rank or alpha of their {proj}: "
                               f"transformers 5's '{fused}' holds one rank for all {count}; it cannot be converted.")
        r, alpha = settings.pop()
        factors[proj] = (torch.stack(a), torch.stack(b), lora_scaling(alpha, r, cfg.use_rslora), alpha)
    out, in_features = weight.shape[1], weight.shape[2]
    sizes = {p: t[1].shape[1] for p, t in factors.items()}
    if len(sizes) < len(parts):  # (a projection adapted alone: the others' rows are the rest, equal in size)
        rest = (out - sum(sizes.values())) // (len(parts) - len(sizes))
        sizes = {p: sizes.get(p, rest) for p in parts}
    if sum(sizes.values()) != out or any(t[0].shape[2] != in_features for t in factors.values()):
        raise PeftkitError(f"The adapter's experts in '{experts}' do not fit '{fused}' {tuple(weight.shape)}: load it "
                           "on the base it was trained on.")
    first = factors[next(p for p in parts if p in factors)]
    scaling, dtype, first_rank, first_alpha = first[2], first[0].dtype, first[0].shape[1], first[3]
    rank = sum(t[0].shape[1] for t in factors.values())
    a_fused = torch.cat([factors[p][0] for p in parts if p in factors], dim=1)  # (E, R, in)
    b_fused = torch.zeros(count, out, rank, dtype=dtype)
    row = col = 0
    for p in parts:
        if p in factors:
            _, b, s, _ = factors[p]
            b = b if s == scaling else (b.float() * (s / scaling)).to(dtype)
            b_fused[:, row:row + sizes[p], col:col + b.shape[2]] = b
            col += b.shape[2]
        row += sizes[p]
    # The first part's scaling, alpha over r (or sqrt(r)): alpha grows with the rank (2 alpha for a pair, exactly).
    alpha = first_alpha * (math.sqrt(rank / first_rank) if cfg.use_rslora else rank / first_rank)
    return (a_fused.reshape(count * rank, in_features).contiguous(),
            b_fused.permute(1, 2, 0).reshape(out, rank * count).contiguous(), rank, alpha)
