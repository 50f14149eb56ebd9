"""The inputs of `peftkit merge` with several adapters: the combination asked for, the adapters read from
their directories, and every check that they can be combined (weights, density, method, bases, quantization,
ranks, target modules, shapes), all made before any weight is combined (`peftkit.combine_adapters`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from peftkit.combine import COMBINATIONS, DRAWS, ELECTS_SIGN, FACTOR_WISE, NEEDS_DENSITY, SVD, MajoritySign
from peftkit.errors import PeftkitError, PeftkitWarning, did_you_mean
from peftkit.peft_format import trained_base_biases


@dataclass(frozen=True)
class Combination:
    """How to combine: peft's `add_weighted_adapter` arguments, and the seed of DARE's draws."""

    method: str
    weights: tuple[float, ...]
    density: float | None = None
    svd_rank: int | None = None
    svd_clamp: float | None = None
    majority_sign: MajoritySign = "total"
    seed: int = 0

    def check(self, n_adapters: int) -> None:
        """Refuse a combination that cannot be computed, before any file is read."""
        if self.method not in COMBINATIONS:
            raise PeftkitError(f"--method {self.method!r} is not a combination peftkit knows; use one of "
                               f"{', '.join(COMBINATIONS)}.{did_you_mean(self.method, COMBINATIONS)}")
        if len(self.weights) != n_adapters:
            raise PeftkitError(f"--weights gives {len(self.weights)} weight{'s' * (len(self.weights) != 1)} for "
                               f"{n_adapters} --adapter{'s' * (n_adapters != 1)}: give one weight per adapter, in "
                               "the same order (e.g. --weights 0.7,0.3).")
        if not all(math.isfinite(w) for w in self.weights):
            raise PeftkitError(f"--weights {','.join(map(str, self.weights))}: every weight must be a finite number.")
        if self.method in NEEDS_DENSITY and self.density is None:
            raise PeftkitError(f"--method {self.method} prunes each adapter's update: give the fraction to keep, "
                               "e.g. --density 0.5.")
        if self.density is not None and self.method not in NEEDS_DENSITY:
            raise PeftkitError(f"--density is for the pruning methods ({', '.join(NEEDS_DENSITY)}); "
                               f"--method {self.method} keeps every value. Remove --density.")
        if self.density is not None and not 0 < self.density <= 1:
            raise PeftkitError(f"--density {self.density}: the fraction of values kept must be in (0, 1] "
                               "(1 keeps everything).")
        if (self.svd_rank is not None or self.svd_clamp is not None) and self.method not in SVD:
            raise PeftkitError(f"--svd-rank and --svd-clamp are for the SVD methods ({', '.join(SVD)}), not "
                               f"--method {self.method}.")
        if self.svd_rank is not None and self.svd_rank < 1:
            raise PeftkitError(f"--svd-rank {self.svd_rank}: the rank must be at least 1.")
        if self.svd_clamp is not None and not 0 < self.svd_clamp <= 1:
            raise PeftkitError(f"--svd-clamp {self.svd_clamp}: a quantile in (0, 1], e.g. 0.99.")
        if self.majority_sign not in ("total", "frequency"):
            raise PeftkitError(f"--majority-sign {self.majority_sign!r}: use total or frequency.")
        if not 0 <= self.seed < 2**64:  # torch.Generator's range
            raise PeftkitError(f"--seed {self.seed}: use an integer from 0 to 2**64 - 1.")
        if big := [w for w in self.weights if abs(w) > torch.finfo(torch.float32).max]:
            raise PeftkitError(f"--weights: {big[0]:g} is beyond float32's range (the adapters' dtype); the combined "
                               "adapter would hold inf.")
        # Refused as --density is: a flag the method does not read would be taken for one it does.
        if self.majority_sign != "total" and self.method not in ELECTS_SIGN:
            raise PeftkitError(f"--majority-sign is for the TIES methods ({', '.join(ELECTS_SIGN)}); --method "
                               f"{self.method} elects no sign. Remove --majority-sign.")
        if self.seed != 0 and self.method not in DRAWS:
            raise PeftkitError(f"--seed is for the DARE methods ({', '.join(DRAWS)}), which prune at random; --method "
                               f"{self.method} draws nothing. Remove --seed.")


@dataclass
class Source:
    """One input adapter, as read from its directory."""

    path: str
    cfg: object
    state: dict[str, torch.Tensor]
    base: str | None
    revision: str | None
    quant: object

    @property
    def plain_lora(self) -> bool:
        """A LoRA without DoRA: its update is s B A, combined through its factors."""
        return self.cfg.method == "lora" and not self.cfg.use_dora

    @property
    def describe(self) -> str:
        from peftkit.methods import method_of

        return f"{self.path} ({method_of(self.cfg).describe(self.cfg)})"


def read_sources(adapter_dirs: list[str], trust_remote_code: bool) -> list[Source]:
    """The adapters, read and checked one by one (PEFT format, no NaN, remote code allowed)."""
    from peftkit.methods import method_of
    from peftkit.methods.layer import refuse_unmergeable
    from peftkit.adapter_base import check_remote_code
    from peftkit.adapter_meta import read_meta
    from peftkit.peft_format import load_adapter

    sources = []
    for path in adapter_dirs:
        cfg, state, peft, quant = load_adapter(path)
        if added := read_meta(path).added_tokens:
            raise PeftkitError(f"{path} adds tokens to its base's tokenizer and embeddings (model.add_tokens: "
                               f"{', '.join(added)}), which the other adapters' base lacks. Merge it alone (`peftkit "
                               "merge --adapter` once).")
        refuse_unmergeable(method_of(cfg), cfg)  # module adapters and the prompt family: no weight update to combine
        if getattr(cfg, "_residual_init", None):
            from peftkit.methods.lora_init import residual_refusal

            raise residual_refusal("peftkit merge", path, "combining adapters reads them before their base's weights")
        check_remote_code(path, trust_remote_code)
        _refuse_uncombinable(path, cfg, peft, state)
        # (loading it alone refuses such a pair, as peft does; combining scaled the update by alpha / the config's r)
        if cfg.method == "lora" and (off := _off_rank(cfg, state)):
            raise PeftkitError(f"{path}: its adapter_config.json says r: {_rank_of(cfg, off)}"
                               f"{' (rank_pattern)' if _rank_of(cfg, off) != cfg.r else ''}, and {off} has rank "
                               f"{state[off].shape[0]}: the two files come from different runs. Put back the "
                               "adapter_config.json saved with these weights, or export the adapter again.")
        if untargeted := _untargeted(cfg, state):
            raise PeftkitError(f"{path}: its weights adapt {len(untargeted)} modules that its adapter_config.json's "
                               f"target_modules do not name (e.g. '{untargeted[0]}'): the config says less than the "
                               "weights (loading it alone refuses them; peft leaves them out without a word). Add them "
                               "to its target_modules, or put back the adapter_config.json saved with these weights.")
        sources.append(Source(path, cfg, state, peft.base_model_name_or_path, peft.revision, quant))
    return sources


def _refuse_uncombinable(path: str, cfg, peft, state: dict[str, torch.Tensor]) -> None:
    """Refuse an adapter that holds what a combination (weighted updates, as LoRA factors or full updates)
    cannot carry: whole modules, trained base biases or embedding rows (values, not updates), a LoRA variant's
    extra structure, or updates that follow from the layers' order or their base's spectrum."""
    if cfg.modules_to_save:
        raise PeftkitError(f"{path} also saves whole modules ({', '.join(cfg.modules_to_save)}): those have no "
                           "update to weight and combine. Combine adapters without modules_to_save.")
    # peft's `bias: all` / `lora_only` saves the trained biases of the base itself (values, not updates):
    # combining reads lora_A/lora_B only, so they were dropped without a word.
    if getattr(peft, "bias", "none") not in (None, "none") and (biases := trained_base_biases(cfg, state)):
        raise PeftkitError(f"{path} also trains the base's biases (bias: {peft.bias} in adapter_config.json; "
                           f"{len(biases)} saved, e.g. {biases[0]}): those are values, not updates to weigh and "
                           "combine. Merge it alone (`peftkit merge --adapter` once), or combine adapters trained "
                           "with bias: none.")
    if getattr(cfg, "velora_config", None):
        raise PeftkitError(f"{path} is a VeLoRA (velora_config), whose projections combining does not carry; merge "
                           "it alone (`peftkit merge --adapter` once), or combine it as the plain LoRA it saves.")
    if getattr(cfg, "kasa_config", None):
        raise PeftkitError(f"{path} is a KaSA adapter (kasa_config), which applies to its base without the r "
                           "smallest singular components of each target; combining adds updates to the base as "
                           "saved. Merge it alone (`peftkit merge --adapter` once).")
    if getattr(cfg, "use_bdlora", None):
        raise PeftkitError(f"{path} has block-diagonal factors (use_bdlora), which combining does not carry; merge "
                           "it alone (`peftkit merge --adapter` once).")
    if getattr(cfg, "target_parameters", None):
        raise PeftkitError(f"{path} adapts parameters (target_parameters), which combining does not carry; merge "
                           "it alone (`peftkit merge --adapter` once).")
    if getattr(cfg, "layer_replication", None):
        raise PeftkitError(f"{path} stacks the base's layers again (layer_replication): its layers are not the "
                           "others'. Merge it alone (`peftkit merge --adapter` once).")
    if getattr(cfg, "lora_bias", False):
        raise PeftkitError(f"{path} has a bias in lora_B (lora_bias), which combining does not carry; merge it "
                           "alone (`peftkit merge --adapter` once).")
    if cfg.method == "unilora" and not cfg.save_indices:
        raise PeftkitError(f"{path} is a Uni-LoRA adapter saved without its layers' indices (save_indices: false): "
                           "its file names no layer for combining to read. Merge it alone (`peftkit merge "
                           "--adapter` once), or export it with adapter.save_indices: true.")
    if cfg.method == "ln_tuning":
        raise PeftkitError(f"{path} is an LN tuning adapter, whose trained copies replace the norms' weights: "
                           "those are values, not updates to weigh and combine. Merge it alone (`peftkit merge "
                           "--adapter` once).")
    if getattr(cfg, "trainable_token_indices", None) or cfg.method == "trainable_tokens":
        raise PeftkitError(f"{path} also trains rows of the embeddings (trainable tokens): those are "
                           "values, not updates to weigh and combine. Combine adapters without them, or merge "
                           "this one alone (`peftkit merge`).")
    if cfg.method == "frod" and not cfg.save_projection:
        raise PeftkitError(f"{path} is a FRoD adapter saved without its projections (save_projection: false): each "
                           "kind of layer's basis V is computed from all its layers' weights, which combining (an "
                           "adapter's tensors alone) does not do. Merge it alone (`peftkit merge --adapter` once), or "
                           "export it again with save_projection: true.")
    if cfg.method == "tinylora":
        raise PeftkitError(f"{path} is a TinyLoRA adapter, whose trained v each group of consecutive target layers "
                           "shares (base_model.tinylora_v.<group>): which layers a group holds follows from the "
                           "model's order of its layers, which combining (weights only) does not read. Merge it "
                           "alone (`peftkit merge --adapter` once).")


def _off_rank(cfg, state: dict[str, torch.Tensor]) -> str | None:
    """A LoRA's first lora_A whose rank is not the one its config gives that layer (r, or rank_pattern's)."""
    return next((k for k, t in state.items() if k.endswith((".lora_A.weight", ".lora_embedding_A")) and t.dim() == 2
                 and t.shape[0] != _rank_of(cfg, k)), None)


def _rank_of(cfg, key: str) -> int:
    """The rank a LoRA's config gives the layer of tensor `key` (PEFT-keyed)."""
    from peftkit.adapters import PEFT_PREFIX

    return cfg.rank_and_alpha(key[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0])[0]


def largest_rank(cfg) -> int:
    """A LoRA's largest layer rank: r, or a larger one of its rank_pattern."""
    return max([cfg.r, *cfg.rank_pattern.values()])


def _untargeted(cfg, state: dict[str, torch.Tensor]) -> list[str]:
    """The module paths an adapter's weights adapt that its target_modules (a list, or a regex) do not match: combining
    merged them without a word, where loading the adapter alone refuses them."""
    from peftkit.adapters import modules_adapted_by, regex_targets
    from peftkit.methods import method_of
    from peftkit.methods.layer import suffix_match
    from peftkit.recipe import TargetRegex

    targets = getattr(cfg, "target_modules", None)
    if not targets or targets == "all-linear":  # (which layers all-linear takes, the model says)
        return []
    adapted = sorted(modules_adapted_by(state, method_of(cfg)))
    if isinstance(targets, TargetRegex):
        return sorted(set(adapted) - set(regex_targets(targets, adapted)))
    return [m for m in adapted if not any(suffix_match(m, t) for t in targets)]


def _saved_quantized(name: str, revision: str | None) -> bool:
    """Whether the base is a checkpoint saved quantized (its config.json's quantization_config): its 4-bit codes are
    the saved ones wherever it loads, so where each adapter's run quantized (quantized_on) does not matter."""
    import json

    from peftkit.manifest import model_directory

    directory = model_directory(name, revision)
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8")) if directory else {}
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("quantization_config") is not None


def check_same_base(sources: list[Source], base: str | None) -> tuple[str, str | None]:
    """(base name, revision) the adapters share; a PeftkitError for adapters of different bases (name, revision,
    quantization, RoPE scaling)."""
    from peftkit.adapter_meta import describe_rope, read_meta

    first = sources[0]
    name = base or first.base
    # The commit those recording the base (--base too, where they name it) were trained on: it loads, and is recorded.
    recorded = [s for s in sources if s.base == name]
    revision = _shared_revision(recorded) if recorded else None
    for other in sources[1:]:
        if base is None and (other.base != first.base or other.revision not in (None, revision)):
            raise PeftkitError(
                f"The adapters were trained on different bases: {first.path} on {first.base} (revision "
                f"{first.revision}), {other.path} on {other.base} (revision {other.revision}). Only adapters of "
                "one base combine; if these are the same model under two names, pass it as --base.")
        if base is not None and other.base == name and other.revision not in (None, revision):
            raise PeftkitError(
                f"{other.path} was trained on {name} at revision {other.revision}, {recorded[0].path} at revision "
                f"{revision}: only adapters of one base combine, at one commit.")
        if other.quant != first.quant:
            raise PeftkitError(
                f"{first.path} was trained against {_quant(first.quant)}, {other.path} against "
                f"{_quant(other.quant)}: their updates were trained against different weights and do not combine.")
        if first.quant is not None and (dtype := read_meta(other.path).quantized_from) != \
                (first_dtype := read_meta(first.path).quantized_from):
            # The 4-bit codes are rounded from the weights in that dtype: `_load_base` loads the first's.
            raise PeftkitError(
                f"{first.path} was trained against a base quantized from {first_dtype}, {other.path} from "
                f"{dtype} (their peftkit.json base_dtype): their updates were trained against "
                "different 4-bit weights and do not combine.")
        # (None: saved before peftkit recorded the device, which is then unknown, not another one)
        if first.quant is not None and None not in (where := read_meta(other.path).quantized_on,
                                                    first_where := read_meta(first.path).quantized_on) and \
                where != first_where and not _saved_quantized(name, revision):
            warnings.warn(PeftkitWarning(
                f"{first.path} was trained against a base quantized on {first_where}, {other.path} on {where} (their "
                f"peftkit.json quantized_on): CUDA and CPU kernels round a few weights to other quantized codes, and the "
                f"combined adapter records {first_where}, so {other.path}'s update meets weights a little off those "
                "it was trained against (about 1e-3 in logits on a test model)."), stacklevel=2)
        if (scaling := read_meta(other.path).rope_scaling) != (first_scaling := read_meta(first.path).rope_scaling):
            # The combined adapter records the first's (its peftkit.json), with which every command then loads the base.
            raise PeftkitError(
                f"{first.path} was trained with RoPE scaling {describe_rope(first_scaling)}, {other.path} with "
                f"{describe_rope(scaling)} (their peftkit.json): their updates were trained against a base scaled two "
                "ways and do not combine.")
    if not name:
        raise PeftkitError(f"{first.path}/adapter_config.json names no base_model_name_or_path; pass --base.")
    return name, revision


def _shared_revision(sources: list[Source]) -> str | None:
    """The base revision the adapters record. One that records none was saved before peftkit recorded the commit a
    hub base loaded (or by another tool): taken as trained on that commit too, and said."""
    recorded = [source for source in sources if source.revision]
    if not recorded or len(recorded) == len(sources):
        return sources[0].revision
    unrecorded = ", ".join(str(source.path) for source in sources if not source.revision)
    warnings.warn(PeftkitWarning(
        f"{unrecorded} records no revision of {recorded[0].base} (saved before peftkit recorded the commit a hub base "
        f"loaded, or by another tool); combining on {recorded[0].revision}, the commit {recorded[0].path} was trained "
        "on."), stacklevel=3)
    return recorded[0].revision


def _quant(quant) -> str:
    return "a full-precision base" if quant is None else (f"a base quantized to {quant.method} (double_quant "
                                                           f"{quant.double_quant})")


def lora_layers(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor, bool]]:
    """{module path: (A, B, is_embedding)} of a LoRA adapter's PEFT-keyed tensors."""
    from peftkit.adapters import PEFT_PREFIX

    layers: dict[str, tuple[torch.Tensor, torch.Tensor, bool]] = {}
    for key, tensor in state.items():
        for a_name, b_name, embedding in (("lora_A.weight", "lora_B.weight", False),
                                          ("lora_embedding_A", "lora_embedding_B", True)):
            if key.endswith("." + a_name):
                module = key[len(PEFT_PREFIX): -len(a_name) - 1]
                layers[module] = (tensor.float(), state[key[: -len(a_name)] + b_name].float(), embedding)
    return layers


def adapted_modules(source: Source) -> list[str]:
    """The module paths an adapter updates, read from its tensors (any method)."""
    from peftkit.adapters import PEFT_PREFIX
    from peftkit.methods import method_of

    names = method_of(source.cfg).param_names
    found = {key[len(PEFT_PREFIX): -len(n) - 1] for key in source.state for n in names
             if key.startswith(PEFT_PREFIX) and key.endswith("." + n)}
    return sorted(found)


def uses_full_updates(combination: Combination, sources: list[Source], into_base: bool) -> bool:
    """`--into-base` with a factor type (linear, cat, ties, ...) and an input that has no LoRA factors: every
    input's full update is combined instead, untruncated (linear and cat: the exact weighted sum)."""
    return into_base and combination.method in (*FACTOR_WISE, "cat") and not all(s.plain_lora for s in sources)


def check_combinable(combination: Combination, sources: list[Source], into_base: bool = False) -> None:
    """Refuse what the method cannot combine: other methods than LoRA for the factor types (except into the
    base), unequal ranks, different target modules."""
    if uses_full_updates(combination, sources, into_base):
        return
    if combination.method in (*FACTOR_WISE, "cat"):
        for s in sources:
            if not s.plain_lora:
                raise PeftkitError(
                    f"--method {combination.method} combines LoRA factors (A and B); {s.describe} has no such factors"
                    + (" (DoRA's update also rescales W by its magnitude)" if getattr(s.cfg, "use_dora", False) else "")
                    + ". Use an SVD method (--method svd, ties_svd, ...), or --into-base, which combine each "
                    "adapter's full update.")
    if combination.method in FACTOR_WISE:
        if patterned := next((s for s in sources if s.cfg.method == "lora" and (s.cfg.rank_pattern or
                                                                                s.cfg.alpha_pattern)), None):
            raise PeftkitError(
                f"--method {combination.method} combines factors of one rank and scaling per adapter, and "
                f"{patterned.path} sets rank_pattern or alpha_pattern (per-module ranks or alphas). Use --method cat "
                "(exact) or an SVD method (--method svd, ties_svd, ...), which take each layer's own.")
        ranks = {s.path: s.cfg.r for s in sources}
        if len(set(ranks.values())) > 1:
            raise PeftkitError(
                f"--method {combination.method} needs adapters of equal rank, and these have "
                f"{', '.join(f'r={r} ({p})' for p, r in ranks.items())}. Use --method cat (exact, rank = the sum) or "
                "--method svd (rank --svd-rank).")
        targets = {s.path: adapted_modules(s) for s in sources}
        first = sources[0].path
        for path, modules in targets.items():
            if modules != targets[first]:
                only = sorted(set(modules) ^ set(targets[first]))
                raise PeftkitError(
                    f"--method {combination.method} needs adapters on the same modules; {first} and {path} differ on "
                    f"{', '.join(only[:3])}{' ...' if len(only) > 3 else ''}. Use --method cat or svd, which "
                    "combine adapters on different modules.")
    if combination.method in SVD and combination.svd_rank is None and not any(s.cfg.method == "lora" for s in sources):
        raise PeftkitError(f"--method {combination.method}: none of the adapters has a LoRA rank to default to; "
                           "give the rank of the combined adapter with --svd-rank.")


def output_rank(combination: Combination, sources: list[Source]) -> int:
    """The combined adapter's rank: the common rank, the sum (`cat`), or --svd-rank (default the largest)."""
    ranks = [largest_rank(s.cfg) for s in sources if s.cfg.method == "lora"]
    if combination.method == "cat":
        return sum(ranks)
    if combination.method in SVD:
        return combination.svd_rank or max(ranks)
    return ranks[0]


def skeleton(name: str, revision: str | None, trust_remote_code: bool) -> nn.Module:
    """The base model's modules on the meta device: names in model order, layer types and shapes, no weights."""
    from transformers import AutoModelForCausalLM

    from peftkit.modeling import load_config
    from peftkit.recipe import ModelConfig

    config = load_config(ModelConfig(name_or_path=name, revision=revision, trust_remote_code=trust_remote_code))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def check_fits(sources: list[Source], model: nn.Module, combination: Combination | None = None) -> None:
    """Every adapted module exists in the base, each LoRA's update has the shape of its weight, and --svd-rank is a
    rank some adapted layer can hold (a larger one would only be padded with zeros)."""
    from peftkit.adapters import MOE_V4
    from peftkit.merge_weights import conv1d_modules

    modules, conv1d = dict(model.named_modules()), conv1d_modules(model)
    for s in sources:
        for name in adapted_modules(s):
            if name not in modules and MOE_V4.search(f".{name}."):
                raise PeftkitError(f"{s.path} adapts '{name}', a mixture-of-experts layer of transformers 4's layout, "
                                   "which this transformers fuses: loading one adapter converts it, combining does "
                                   "not. Merge it alone (`peftkit merge --adapter` once), or combine adapters on the "
                                   "attention layers.")
            if name not in modules or not hasattr(modules[name], "weight"):
                raise PeftkitError(f"{s.path} adapts '{name}', which the base model does not have: it was trained on "
                                   "another base. Combine adapters of one base.")
    for s in sources:
        if not s.plain_lora:
            continue  # checked by merge_state_dict against the real weights
        for name, (a, b, embedding) in lora_layers(s.state).items():
            shape = tuple(modules[name].weight.shape)
            expected = (a.shape[1], b.shape[0]) if embedding or name in conv1d else (b.shape[0], a.shape[1])
            if shape != expected:
                raise PeftkitError(f"{s.path} does not fit the base model: '{name}' has weight {shape} but the "
                                   f"adapter's update is {expected}. It was trained on another base.")
    if combination is not None and combination.svd_rank is not None:
        most = max(min(modules[name].weight.shape) for s in sources for name in adapted_modules(s))
        if combination.svd_rank > most:
            raise PeftkitError(f"--svd-rank {combination.svd_rank}: no adapted layer holds more than rank {most} (the "
                               f"smaller side of its weight); a larger rank is only zeros. Use --svd-rank {most} or "
                               "less.")
