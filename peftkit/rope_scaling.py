"""RoPE scaling from the recipe (`model.rope_scaling: {type, factor}`): how LongLoRA trains past a model's
max_position_embeddings. The scaling is set on the model's transformers config as it loads, in transformers' own
terms (`rope_parameters`, standardized and validated by transformers), so the rotary embedding computes it and a
merged model's config.json carries it; the adapter records it in peftkit.json (`peftkit.peft_format`), so that
`peftkit eval`/`generate`/`merge` load the base scaled as it trained.

A model covers max_position_embeddings positions, or factor times as many with scaling: a longer data.max_length is
a recipe error before anything loads (a RoPE model runs past it, extrapolating positions it never saw; a model with
learned positions, GPT-2's, fails with an index error).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator

from peftkit.errors import PeftkitError
from peftkit.methods import method_of
from peftkit.methods.virtual import virtual_tokens
from peftkit.recipe import ModelConfig, Recipe, RopeScalingConfig

KEY = "model.rope_scaling"


def scale_rope(config, scaling: RopeScalingConfig, name: str) -> dict:
    """Set `scaling` on the transformers `config` of model `name` (in place) and return its `rope_parameters`.

    The model's own rope_theta (and partial rotary factor) stay; transformers fills in the rest (yarn's
    original_max_position_embeddings) and validates. A model with a RoPE per attention type (Gemma 3) has its
    full-attention RoPE scaled, as Gemma 3's long-context checkpoints do: its sliding-window layers see no more than
    their window. A model without RoPE, or whose config already scales it (a long-context model such as Llama 3.1),
    is refused: stacking a second scaling is not what its authors trained."""
    current = getattr(config, "rope_parameters", None)
    per_type = bool(current) and all(isinstance(v, dict) for v in current.values())
    if per_type and "full_attention" not in current:
        raise PeftkitError(f"{KEY}: {name} ({config.model_type}) has a RoPE per attention type "
                           f"({', '.join(current)}) and none for full attention, the one peftkit scales; remove {KEY}.")
    own = current["full_attention"] if per_type else current
    which = "its full-attention RoPE" if per_type else "its RoPE"
    if not own or "rope_theta" not in own:
        raise PeftkitError(f"{KEY}: {name} ({config.model_type}) has no rotary position embeddings to scale; remove "
                           f"{KEY}.")
    if own.get("rope_type", "default") != "default":
        raise PeftkitError(f"{KEY}: {name} scales {which} already (rope_type {own['rope_type']!r}, factor "
                           f"{own.get('factor')}, in its config.json); remove {KEY} and train within its "
                           f"{config.max_position_embeddings} positions.")
    if per_type and scaling.type == "dynamic":  # (its frequencies, kept per attention type, are not reset for evals)
        raise PeftkitError(f"{KEY}: dynamic scaling of {name}'s RoPE per attention type is not supported; use "
                           "type: linear or yarn.")
    kept = {k: own[k] for k in ("rope_theta", "partial_rotary_factor") if k in own}
    scaled = kept | {"rope_type": scaling.type, "factor": scaling.factor}
    config.rope_parameters = {**current, "full_attention": scaled} if per_type else scaled
    try:
        config.standardize_rope_params()
        config.validate_rope()
    except (KeyError, ValueError) as e:
        raise PeftkitError(f"{KEY}: transformers refuses {scaling.type} scaling for {name}: {e}") from None
    return dict(config.rope_parameters)


def covered_positions(config, scaling: RopeScalingConfig | None) -> int | None:
    """How many positions the model covers: max_position_embeddings x the recipe's factor; without one, as far as the
    model's own config scales its RoPE (a merged model of a scaled run: linear, factor 2 over 64 positions covers
    128; Llama 3.1's llama3 scaling extends an original 8,192 that max_position_embeddings already counts); None if
    unknown."""
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int):
        return None
    if scaling:
        return int(positions * scaling.factor)
    own = getattr(config, "rope_parameters", None) or {}
    factor = own.get("factor") if own.get("rope_type", "default") != "default" else None
    if not isinstance(factor, (int, float)):
        return positions
    return max(positions, int(int(own.get("original_max_position_embeddings") or positions) * factor))


@contextlib.contextmanager
def fresh_dynamic_rope(model) -> Iterator[None]:
    """Run the block with dynamic RoPE as a freshly loaded model has it, then put training's state back.

    transformers' dynamic scaling keeps the frequencies of the longest sequence it has seen until one shorter than
    the original context comes: an evaluation during or after training then depended on the training batches (and
    differed from `peftkit eval` of the exported adapter), and would in turn change the training after it."""
    saved = [(m, m.inv_freq, m.max_seq_len_cached, m.attention_scaling) for m in model.modules()
             if "dynamic" in str(getattr(m, "rope_type", "")) and hasattr(m, "original_inv_freq")
             and hasattr(m, "max_seq_len_cached")]
    for m, inv_freq, _, _ in saved:
        m.register_buffer("inv_freq", m.original_inv_freq.to(inv_freq.device), persistent=False)
        m.max_seq_len_cached = m.original_max_seq_len
    try:
        yield
    finally:
        for m, inv_freq, cached, scaling in saved:
            m.register_buffer("inv_freq", inv_freq, persistent=False)
            m.max_seq_len_cached, m.attention_scaling = cached, scaling


def dynamic_context(model) -> int | None:
    """The original context of `model`'s dynamic RoPE (its rotary embeddings' smallest original_max_seq_len), past
    which transformers scales the frequencies by the sequence's length; None where no RoPE is dynamic."""
    return min((m.original_max_seq_len for m in model.modules() if "dynamic" in str(getattr(m, "rope_type", ""))
                and isinstance(getattr(m, "original_max_seq_len", None), int)), default=None)


def longrope_context(model) -> int | None:
    """The original_max_position_embeddings of `model`'s longrope rotary embeddings (their smallest), past which
    transformers rotates a sequence by its long factors, within it by its short ones; None where none is longrope."""
    return min((m.config.rope_parameters.get("original_max_position_embeddings") for m in model.modules()
                if getattr(m, "rope_type", None) == "longrope"
                and isinstance(getattr(getattr(m, "config", None), "rope_parameters", None), dict)), default=None)


def rotation_by_length(model) -> Callable[[int], tuple[int, bool]]:
    """What sets the rotary frequencies of `model`'s forward over a sequence of `length` positions (its largest
    position id + 1, virtual tokens counted), as transformers 5.25's `dynamic_rope_update` picks them: dynamic RoPE
    rotates by the base frequencies up to its original context and past it by frequencies of the length itself, each
    length its own; longrope by its short factors up to original_max_position_embeddings, by its long ones past it.
    Two forwards whose lengths give the same value rotate alike, so a KV cache filled at one length holds the keys a
    forward of the whole sequence computes at the other (`peftkit.whole_forwards`)."""
    dynamic, longrope = dynamic_context(model), longrope_context(model)

    def rotation(length: int) -> tuple[int, bool]:
        return (length if dynamic is not None and length > dynamic else 0,
                longrope is not None and length > longrope)
    return rotation


def batch_scaled_context(model) -> int | None:
    """The context past which transformers scales a sequence's RoPE by its length, so a batch's by its longest row
    (the largest position id): a dynamic RoPE's original context (`dynamic_context`), or longrope's
    original_max_position_embeddings, past which it rotates by its long factors (`longrope_context`); None where
    neither is."""
    return min([c for c in (dynamic_context(model), longrope_context(model)) if isinstance(c, int)], default=None)


def row_positions(example) -> int:
    """The positions an example's forward runs over: its token count, or a packed row's longest example's (its
    position ids restart at each)."""
    return max(example.position_ids) + 1 if example.position_ids is not None else len(example.input_ids)


def alone_batches(model, count: int, positions: Callable[[int], int], batch_size: int) -> list[list[int]]:
    """The indices of `count` items (examples, preference pairs) in an evaluation's batches of `batch_size`: runs in
    order, as a DataLoader cuts them; where transformers scales a batch by its longest row (`batch_scaled_context`),
    an item whose `positions(i)` (a pair's: its longer answer's), the model's virtual tokens counted, pass that
    context shares a batch only with items of its own positions, after the others, so that every item scores as
    alone and the figures do not depend on eval.batch_size (SmolLM2-135M-Instruct at 128 positions, dynamic x2: loss
    0.5553 at batch 8, 0.5531 at 1, before). The items within keep their batches."""
    context = batch_scaled_context(model)
    if context is None:
        runs = [list(range(count))]
    else:
        within = context - getattr(virtual_tokens(model), "num_virtual_tokens", 0)
        length = [positions(i) for i in range(count)]
        past = sorted((i for i in range(count) if length[i] > within), key=length.__getitem__)
        runs = [[i for i in range(count) if length[i] <= within]]
        runs += [list(g) for _, g in itertools.groupby(past, key=length.__getitem__)]
    return [run[start:start + batch_size] for run in runs for start in range(0, len(run), batch_size)]


REBUILT_AT_THE_SWITCH = frozenset({"phi3", "phimoe", "phi4_multimodal"})
"""Model types whose generate computes its KV cache again where longrope switches to its long factors: their
prepare_inputs_for_generation drops the cache once the sequence passes config.original_max_position_embeddings
(transformers 5.25), so their cached decoding is the cache-free one. Other models run longrope through the same
rotary embedding (MiniCPM3's config.json sets it; a Llama or Mistral config may) and keep the cache."""


def stale_cache_past_context(model, positions: int, prefilled: bool = False) -> bool:
    """Whether a KV cache of `positions` holds keys rotated otherwise than a forward of the whole sequence rotates
    them. Under dynamic RoPE past its original context: transformers rotates each new key by the frequencies of the
    sequence's length then (SmolLM2-135M-Instruct at 128 positions, dynamic x2: a 200-token prompt's greedy answer
    left the cache-free one at its 12th token). Under longrope past original_max_position_embeddings, in a model
    whose generate does not compute its cache again there (`REBUILT_AT_THE_SWITCH`): the keys cached before the
    switch keep the short factors (a tiny Llama and a tiny MiniCPM3, 64 original positions, a 56-token prompt: at
    the 11th and the 10th new token). `prefilled`: the cache comes to generate holding tokens (the prompt family's
    virtual tokens, counted in `positions`), which Phi-3's family does not count: it drops the cache where the input
    ids pass original_max_position_embeddings and the cache holds no more than that many, and one with the virtual
    tokens in front holds more then, so it is kept (a tiny Phi-3, 8 virtual tokens and a 40-token prompt: prompt and
    prefix tuning left the cache-free answer at their 19th and 18th new token)."""
    context = dynamic_context(model)
    if context is not None and context < positions:
        return True
    context = longrope_context(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return context is not None and context < positions and (prefilled or model_type not in REBUILT_AT_THE_SWITCH)


def learned_positions(config) -> int | None:
    """How many positions a model with a learned position table has (GPT-2's n_positions, OPT's): past them its
    lookup fails. None for a RoPE model, which runs past its max_position_embeddings (worse, but it runs)."""
    positions = getattr(config, "max_position_embeddings", None)
    return positions if isinstance(positions, int) and not getattr(config, "rope_parameters", None) else None


def check_answer_room(recipe: Recipe, config, prompts: list) -> None:
    """The run's own generations (eval.samples, eval.metrics: `prompts`) within a learned position table, counted as
    `peftkit.decoding.check_room` counts them: the longest prompt, the adapter's virtual tokens and
    eval.max_new_tokens. Checked before the model loads: the samples are generated after training, before the
    export, so a run past the table trained to its end and then stopped without its adapter."""
    covered = learned_positions(config)
    if covered is None or not prompts:
        return
    virtual = method_of(recipe.adapter).positions_in_front(recipe.adapter)
    longest, new = max(len(p.ids) for p in prompts), recipe.eval.max_new_tokens
    if longest + virtual + new <= covered:
        return
    room = covered - longest - virtual
    parts = f"{longest} tokens" + (f" + the adapter's {virtual} virtual tokens" if virtual else "")
    fix = f"Lower eval.max_new_tokens to {room}" if room > 0 else "Shorten data.eval's longest prompt"
    raise PeftkitError(f"eval.max_new_tokens {new}: the run's generations (eval.samples, eval.metrics) answer prompts "
                       f"of data.eval that need {parts} + {new} new tokens = {longest + virtual + new} positions, more "
                       f"than the {covered} positions {recipe.model.name_or_path} has (learned ones, which cannot be "
                       f"scaled). {fix}, or generate nothing (eval.samples: 0, no generation eval.metrics).")


def _lower_length(room: int, virtual: int, capital: bool = True) -> str:
    """The fix that gives data.max_length `room` positions beside the adapter's `virtual` tokens, or, where those
    alone fill them (a max_length of 0 or less is none), fewer virtual tokens. `capital`: the fix starts a
    sentence."""
    fix = (f"lower data.max_length to {room}" if room > 0 else
           f"give the adapter fewer virtual tokens (adapter.num_virtual_tokens; CPT's: a shorter adapter.context): its "
           f"{virtual} alone leave none of the {room + virtual} positions to the data")
    return fix[0].upper() + fix[1:] if capital else fix


def check_context_length(recipe: Recipe, config) -> None:
    """data.max_length within the positions the model covers, or a PeftkitError naming both keys and the fix."""
    model: ModelConfig = recipe.model
    covered, max_length = covered_positions(config, model.rope_scaling), recipe.data.max_length
    if covered is None:  # (before the count: CPT's tokenizes its context)
        return
    virtual = method_of(recipe.adapter).positions_in_front(recipe.adapter)  # the prompt family's, before every row
    if max_length + virtual <= covered:
        return
    positions = config.max_position_embeddings
    factor = math.ceil((max_length + virtual) / positions)
    length = f"data.max_length {max_length}" + (f" plus the adapter's {virtual} virtual tokens" if virtual else "")
    if learned_positions(config) is not None:
        raise PeftkitError(f"{length} is longer than the {positions} positions {model.name_or_path} has (learned "
                           f"positions, which cannot be scaled). {_lower_length(positions - virtual, virtual)}.")
    if model.rope_scaling is None and covered > positions:  # the model's config scales its RoPE already
        raise PeftkitError(f"{length} is longer than the {covered} positions {model.name_or_path} covers (its "
                           f"config.json's RoPE scaling). {_lower_length(covered - virtual, virtual)}.")
    if model.rope_scaling is None:
        raise PeftkitError(f"{length} is longer than {model.name_or_path}'s max_position_embeddings ({positions}). "
                           f"{_lower_length(positions - virtual, virtual)}, or scale its RoPE to cover it: "
                           f"{KEY}: {{type: linear, factor: {factor}}}.")
    raise PeftkitError(f"{length} is longer than the {covered} positions {KEY} covers "
                       f"(max_position_embeddings {positions} x factor {model.rope_scaling.factor:g}). Raise "
                       f"{KEY}.factor to {factor}, or {_lower_length(covered - virtual, virtual, capital=False)}.")
