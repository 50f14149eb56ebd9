"""A memory estimate printed before loading, from the model config alone (a meta-device model: no weights
are read or allocated), so a recipe that cannot fit is noticed before minutes of loading.

What it counts, for the peak of a training run:
- the model state, alive the whole run: base weights (tied weights once), adapter weights, and the
  gradients and optimizer state of the trainable ones (LoRA-FA's frozen A has neither);
- activations: what one micro-batch keeps for backward (per-layer tensors and the logits, see
  `peftkit.activations`), or the base/periodic evaluation's logits if those are larger;
- on CPU, a measured constant for the torch runtime's own working memory (`CPU_RUNTIME_BYTES`).
Sequences are taken to be `data.max_length` long: the activation term is an upper bound, reached when
examples fill max_length. `scripts/measure_memory.py` compares the estimate with measured peaks.
Not counted: the merged export (`export.merged` builds a full fp32 copy of the model at the end).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
from rich.console import Console

from peftkit.activations import activation_memory, logits_bytes, model_shape
from peftkit.errors import PeftkitError
from peftkit.recipe import Recipe

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# A 4-bit weight of n values (bitsandbytes' Params4bit, nf4 or fp4 alike) holds n/2 bytes of codes and a quant_state:
# one fp32 absmax a block of 64 weights (0.5 bit a weight: 4.5 bits), and the 16-value fp32 code table (64 bytes). With
# double quantization the absmax is 8-bit, itself quantized in blocks of 256 with one fp32 absmax each (4 + 8/64 +
# 32/(64*256) ≈ 4.127 bits a weight), and the nested state adds an fp32 offset and its own 256-value fp32 code table:
# 64 + 4 + 1024 bytes a layer, each layer's own (measured on a loaded model's quant states, tests/test_memory.py).
QUANT_BLOCK, NESTED_BLOCK, CODE_BYTES, NESTED_CODE_BYTES = 64, 256, 16 * 4, 256 * 4


def four_bit_bytes(n: int, double_quant: bool) -> int:
    """The bytes bitsandbytes holds for a 4-bit weight of `n` values: its codes and its quant_state's tensors."""
    blocks = -(-n // QUANT_BLOCK)
    if not double_quant:
        return -(-n // 2) + 4 * blocks + CODE_BYTES
    return -(-n // 2) + blocks + 4 * -(-blocks // NESTED_BLOCK) + CODE_BYTES + 4 + NESTED_CODE_BYTES
# optimizer state bytes per trainable parameter: AdamW keeps two fp32 moments; 8-bit AdamW two int8
# moments (+ a negligible per-block scale), but only for tensors of >= 4096 elements (bitsandbytes keeps
# smaller ones in fp32); SGD without momentum keeps none.
OPTIMIZER_BYTES = {"adamw": 8, "paged_adamw_32bit": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2, "sgd": 0}
MIN_8BIT_SIZE = 4096


def _optimizer_bytes(optimizer: str, sizes: list[int], embeddings: list[int] = ()) -> float:
    """`sizes`: the trainable tensors' element counts, but for `embeddings`': embedding weights, which the 8-bit
    optimizers keep in 32 bits (`peftkit.runtime.build_optimizer`)."""
    per = OPTIMIZER_BYTES[optimizer]
    if per == 2:
        return sum(n * (2 if n >= MIN_8BIT_SIZE else 8) for n in sizes) + 8 * sum(embeddings)
    return per * (sum(sizes) + sum(embeddings))


# The torch runtime's own working memory on CPU, beyond the tensors above: code pages of libtorch and
# oneDNN first touched by a forward/backward, the allocator's and thread pools' buffers, lazily imported
# modules. Measured by scripts/measure_memory.py: the quickstart and qlora runs, whose tensors are
# < 11 MiB, grew the peak RSS by 123 and 173 MiB (2 CPU cores, torch 2.13): ~140 MiB, give or take 30.
# On CUDA, max_memory_allocated counts tensors only, so the term is 0 there.
CPU_RUNTIME_BYTES = 140 * 2**20


@dataclass
class MemoryEstimate:
    """Bytes, per part. `model_state` lives the whole run; `activations` is the peak of one micro-batch
    (an upper bound: sequences of data.max_length); `runtime` is the CPU constant above (0 on CUDA)."""

    base_weights: float
    adapter: float
    gradients: float
    optimizer: float
    activations: float = 0.0
    runtime: float = 0.0

    @property
    def model_state(self) -> float:
        """Weights, adapter, gradients and optimizer state: known exactly from the config and recipe."""
        return self.base_weights + self.adapter + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return self.model_state + self.activations + self.runtime


def _as_trained(recipe: Recipe, model: torch.nn.Module, tok=None):
    """recipe.adapter as train injects it: a classifier's head trained in full (`with_head`: a head name peft writes
    and the model lacks, `classifier` beside `score`, dropped), and model.add_tokens' rows trained with `model`
    resized to hold them (an adapter.init_from trained with them names ids past the base's rows); `tok`: the
    recipe's tokenizer where the caller has it (else loaded)."""
    from peftkit.classify import with_head

    adapter = with_head(recipe.adapter, model) if recipe.classifier else recipe.adapter
    if not recipe.model.add_tokens:
        return adapter
    from peftkit.modeling import load_tokenizer
    from peftkit.new_tokens import added_ids, resize, with_new_rows

    tok = tok if tok is not None else load_tokenizer(recipe.model)
    return with_new_rows(adapter, model, added_ids(recipe.model, tok, resize(model, len(tok)))[0])

def estimate_memory(recipe: Recipe, device: torch.device | None = None, tok=None) -> MemoryEstimate | None:
    """Bytes of base weights, adapter weights, their gradients, optimizer state, activations and (on CPU)
    the runtime constant; None if no model can be built from the config (the loader will then say why).
    A broken config.json raises a PeftkitError.

    Args:
        recipe: the run's recipe.
        device: where it runs (decides the runtime constant); by default the one recipe.model.device picks.
        tok: the recipe's tokenizer (`load_tokenizer`) where the caller has it: model.add_tokens' rows are counted
            from it, else it is read again.
    """
    from peftkit.adapters import adapter_layers, inject_adapters, shared_holders, trainable_parameters
    from peftkit.methods.expert_lists import check_start
    from peftkit.modeling import load_config, resolve_device

    config = load_config(recipe.model)
    dtype = load_dtype(recipe.model.dtype, config)
    model = meta_model(recipe, config)
    if model is None:
        return None
    base = _base_bytes(recipe, model, dtype)
    # The method's own layers, built on the meta device (nothing is allocated), say what it trains, for every
    # method alike (LoRA's A and B, IA3's vectors, modules_to_save). A bad target fails here, before loading.
    check_start(recipe.adapter, model)
    inject_adapters(model, _as_trained(recipe, model, tok), every_entry=not recipe.adapter.init_from)  # (as train)
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    trainable = trainable_parameters(model)
    # The adapters' own tensors are fp32; what trains in full (modules_to_save, a classifier's head) is the base's
    # copy, in the load dtype, and so are its gradients and torch AdamW's moments (bitsandbytes' 32-bit state is fp32).
    # The meta model is built in the load dtype, so each trainable tensor has the dtype it trains in.
    width = {id(p): p.element_size() for p in trainable}
    # Frozen adapter tensors (LoRA-FA's A) are weights without gradient or optimizer state, and so are the frozen
    # tensors every layer shares (VeRA's projections; a pretrained ShadowPEFT backbone's embeddings and its rotary
    # buffers, in the load dtype): each in the dtype it is held in.
    frozen = [p for layer in adapter_layers(model).values() for p in layer.adapter_params().values()
              if not p.requires_grad]
    frozen += [t for holder in shared_holders(model) for t in [*holder.buffers(),
                                                               *(p for p in holder.parameters() if not p.requires_grad)]]
    frozen_bytes = float(sum(t.numel() * t.element_size() for t in frozen))
    trained = float(sum(p.numel() * width[id(p)] for p in trainable))
    # What each method's layers keep for backward: per token (LoRA's rank-r intermediate), per layer (LoHa's
    # and LoKr's full (out, in) update, built every forward) and per row (Poly's mixed factors), fp32.
    kept = [layer.method.kept_for_backward(recipe.adapter, layer) for layer in adapter_layers(model).values()]
    per_row = sum(layer.method.kept_per_row(recipe.adapter, layer) for layer in adapter_layers(model).values())
    activations = _activations(recipe, config, sum(k[0] for k in kept), 4.0 * sum(k[1] for k in kept), dtype,
                               4.0 * per_row,
                               _virtual_tokens(recipe.adapter, model))
    # and what one layer allocates for a moment in its forward (DoRA's norm), on top: the largest layer's
    activations += 4.0 * max((layer.method.forward_scratch(recipe.adapter, layer)
                              for layer in adapter_layers(model).values()), default=0)
    device = device if device is not None else resolve_device(recipe.model.device)
    optimizer = _optimizer_bytes(recipe.training.optimizer, [p.numel() for p in trainable if id(p) not in embedded],
                                 [p.numel() for p in trainable if id(p) in embedded])
    if recipe.training.optimizer == "adamw":  # torch's moments take each parameter's dtype
        optimizer = 2.0 * sum(p.numel() * width[id(p)] for p in trainable)
    return MemoryEstimate(base, trained + frozen_bytes, trained, optimizer, activations=activations,
                          runtime=CPU_RUNTIME_BYTES if device.type == "cpu" else 0.0)


def _base_bytes(recipe: Recipe, model: torch.nn.Module, dtype: str) -> float:
    """Bytes of the base's weights as loaded: in the load dtype, or quantized (a Linear's weight; never its bias)."""
    from peftkit.quantization import kept_modules

    modules = dict(model.named_modules())
    q = recipe.quantization
    base = 0.0
    for name, p in _unique_parameters(model):
        module_name, _, _ = name.rpartition(".")
        module = modules[module_name]
        # bitsandbytes quantizes a Linear's weight only: its bias stays in the load dtype (Qwen2's q/k/v biases)
        quantized = q is not None and _quantizable(module) and p is module.weight \
            and not _skipped(module_name, kept_modules(q, recipe.model.task))
        if quantized and q.method == "int8":  # LLM.int8(): one byte a weight and one fp32 absmax (SCB) an output row
            base += p.numel() + 4 * (p.shape[0] if type(module) is torch.nn.Linear else p.shape[1])  # Conv1D: (in, out)
        elif quantized:
            base += four_bit_bytes(p.numel(), q.double_quant)
        else:
            base += p.numel() * BYTES[dtype]
    return base


def meta_model(recipe: Recipe, config) -> torch.nn.Module | None:
    """The recipe's model built from its `config` on the meta device, in the load dtype: every module and parameter
    shape, no value (nothing is read or allocated). None if transformers builds no such model from the config (the
    loader will then say why); a PeftkitError for a config that describes a model that cannot be built."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        with torch.device("meta"):
            auto = AutoModelForSequenceClassification if recipe.classifier else AutoModelForCausalLM
            return auto.from_config(config, trust_remote_code=recipe.model.trust_remote_code,
                                    dtype=getattr(torch, load_dtype(recipe.model.dtype, config)))
    except (OSError, ValueError):
        return None
    except RuntimeError as e:  # nothing is allocated on the meta device: only the config can be at fault
        raise PeftkitError(f"{recipe.model.name_or_path}/config.json describes a model that cannot be built ({e}). "
                           "Fix config.json, or restore it from where the model came from.") from None


def _quantizable(module: torch.nn.Module) -> bool:
    """Whether transformers' bitsandbytes integration replaces `module` by a 4-bit/8-bit layer: an nn.Linear (not a
    subclass) or GPT-2's Conv1D, whose weight it quantizes transposed."""
    from transformers.pytorch_utils import Conv1D

    return type(module) is torch.nn.Linear or isinstance(module, Conv1D)


def _skipped(name: str, skip_modules: list[str]) -> bool:
    """Whether transformers keeps module `name` out of quantization for quantization.skip_modules: in transformers 5 an
    entry names a path prefix ("model.layers.0"), a regex or a suffix, not only a last component ("lm_head")."""
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:  # transformers 4
        return name.rsplit(".", 1)[-1] in skip_modules
    return not should_convert_module(name, skip_modules)


def _unique_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) with tied weights once: SmolLM2's lm_head.weight is embed_tokens.weight.

    On the meta device `from_config` ties them into one object, which `named_parameters` already yields
    once; `all_tied_weights_keys` ({"lm_head.weight": "model.embed_tokens.weight"}) also drops a tied copy
    that a model class left as a separate tensor.
    """
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None)
    tied = set(tied) if isinstance(tied, dict) and getattr(model.config, "tie_word_embeddings", True) else set()
    return [(n, p) for n, p in model.named_parameters() if n not in tied]


def load_dtype(dtype: str, config) -> str:
    """model.dtype as from_pretrained reads it: `auto` is the checkpoint's config.json dtype (float32 when it records
    none of BYTES')."""
    from peftkit.modeling import dtype_name

    return dtype if dtype != "auto" else dtype_name(getattr(config, "dtype", None))


def frees_a_inputs(adapter) -> bool:
    """LoRA-FA (A frozen) and VeLoRA (A's gradient from compressed inputs, counted by `kept_for_backward`) keep no
    input of A for its gradient."""
    return bool(getattr(adapter, "lora_fa", False) or getattr(adapter, "velora_config", None))


def _activations(recipe: Recipe, config, per_token: int, per_layer_bytes: float, load: str, per_row_bytes: float,
                 virtual: int) -> float:
    """The larger of a training micro-batch's activations and an evaluation batch's logits (no grad: the logits and
    the loss's copies, as in training; a DPO run's reference batches too). `per_token`: the fp32 values all the
    adapter layers keep per token; `per_layer_bytes`: the bytes they keep whatever the tokens, `per_row_bytes`: per
    row of the micro-batch whatever its length (with gradient checkpointing, one decoder layer's share at a time);
    `virtual`: the positions put in front of each sequence (`_virtual_tokens`)."""
    shape = model_shape(config)
    if shape is None:
        return 0.0
    if recipe.classifier:  # its head scores a few classes (a reward model: one), never the vocabulary: no such logits
        shape = replace(shape, vocab=0)
    q, tcfg, seq = recipe.quantization, recipe.training, recipe.data.max_length + virtual
    # Activations have the load dtype: a 4-bit layer computes in its compute_dtype but returns its input's dtype,
    # and the norms, the residual stream and the unquantized head (the logits) run in the load dtype; the wider
    # of the two bounds both (mixed precision on CUDA makes most of them 16-bit: then this is an upper bound).
    dtype = max(q.compute_dtype, load, key=BYTES.__getitem__) if q is not None and q.method != "int8" else load
    # (the adapters compute in fp32: their values count as that many of the activations' dtype)
    width = per_token * 4 // (BYTES[dtype] * max(shape.layers, 1))
    attention = recipe.model.attn_implementation
    rows = tcfg.batch_size * (2 if tcfg.pairs else 1)  # a DPO micro-batch: each pair's two answers
    logits, layers = activation_memory(shape, rows, seq, BYTES[dtype], tcfg.gradient_checkpointing,
                                       width, attention == "eager", frees_a_inputs(recipe.adapter),
                                       packed_sdpa=recipe.data.packing and attention in (None, "sdpa"),
                                       prefix=recipe.adapter.num_virtual_tokens if recipe.adapter.method in (
                                           "prefix_tuning", "cartridge") else 0)
    adapters = per_layer_bytes + per_row_bytes * rows
    layers += adapters / max(shape.layers, 1) if tcfg.gradient_checkpointing else adapters
    # (the reference log-probabilities of data.train's pairs, DPO's, or of KTO's answers and their mismatched
    # examples, are such batches too, with or without data.eval)
    from peftkit.preference import objective_loss

    referenced = tcfg.pairs and objective_loss(tcfg).needs_reference
    evaluation = logits_bytes(rows // tcfg.batch_size * recipe.eval.batch_size * seq, shape.vocab, BYTES[dtype]) \
        if recipe.data.eval or referenced else 0
    return max(logits + layers, evaluation)


def _virtual_tokens(adapter, model: torch.nn.Module) -> int:
    """How many positions the method puts in front of every sequence: prompt tuning, P-tuning, multitask prompt
    tuning and CPT prepend embeddings, which every layer then computes and keeps like the text's (prefix tuning adds
    keys and values only: `activation_memory`'s `prefix`). Counted on the injected `model`: CPT's are its context's
    tokens, which a context of examples says only once tokenized."""
    from peftkit.methods import method_of
    from peftkit.methods.prompt_tuning import PromptTuning
    from peftkit.methods.virtual import virtual_tokens

    return virtual_tokens(model).num_virtual_tokens if issubclass(method_of(adapter), PromptTuning) else 0


def check_fits(estimate: MemoryEstimate | None, device: torch.device) -> None:
    """Refuse a run whose model state exceeds all the memory of `device` (RAM on CPU, the GPU's on CUDA).

    Generous on purpose: activations and the runtime are left out (they are an upper bound that depends on
    how long the examples really are, and batch_size or gradient checkpointing fix them without changing
    the model), and only the device's *total* memory counts, so only a run that cannot possibly fit is
    refused, before it dies in the allocator or the OOM killer (an absurd adapter.r such as 10,000,000
    asks for terabytes). A None estimate (config unreadable) passes.
    """
    if estimate is None:
        return
    available = device_memory(device)
    if estimate.model_state <= available:
        return
    where = "of RAM on this machine" if device.type == "cpu" else f"on {torch.cuda.get_device_name(device)}"
    adapter_part = estimate.adapter + estimate.gradients + estimate.optimizer
    if adapter_part >= estimate.base_weights:
        fix = ("Most of it is the adapter, whose weights, gradients and optimizer state grow with its size: lower "
               "adapter.r (8 to 64 is usual; adapter.init_r for adalora, num_virtual_tokens for the prompt family, a "
               "larger reduction_factor for bottleneck adapters), or target fewer modules.")
    else:
        fix = ("Most of it is the base model's weights: load them 4-bit (a quantization section with method: nf4; "
               "classifiers and reward models too), or use a smaller model.")
    raise PeftkitError(
        f"This run needs an estimated {_size(estimate.model_state)} before activations ({_parts(estimate)}), more "
        f"than the {_size(available)} {where}. {fix}"
    )


def device_memory(device: torch.device) -> int:
    """Total bytes of memory of `device`: physical RAM for the CPU, the GPU's own for CUDA."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _parts(est: MemoryEstimate) -> str:
    parts = (("weights", est.base_weights), ("adapter", est.adapter), ("gradients", est.gradients),
             ("optimizer", est.optimizer))
    return " + ".join(f"{n} {_size(v)}" for n, v in parts)


def print_estimate(console: Console, est: MemoryEstimate | None) -> None:
    """One line: the model state's parts, activations (an upper bound at data.max_length), the CPU runtime."""
    if est is not None:
        console.print(estimate_text(est))


def estimate_text(est: MemoryEstimate) -> str:
    """The estimate as train prints it (and validate, as a comment)."""
    extra = f" + activations ≤ {_size(est.activations)}"
    if est.runtime:
        extra += f" + runtime {_size(est.runtime)}"
    return (f"Memory estimate: {_parts(est)}{extra} = {_size(est.total)} "
            "(activations for sequences of data.max_length)")


def _size(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 2**10:.1f} KiB"
