"""What a run sets up around the model: seeds and deterministic kernels, the device and precision checks,
the optimizer and learning-rate schedule, and peak-memory measurement."""

from __future__ import annotations

import contextlib
import math
import os
import resource
import warnings

import torch
from rich.console import Console

from peftkit.adapters import adapter_layers, trainable_parameters
from peftkit.errors import PeftkitError
from peftkit.recipe import Recipe, TrainingConfig


FLASH_DETERMINISTIC = "FLASH_ATTENTION_DETERMINISTIC"
CUBLAS_CONFIG = "CUBLAS_WORKSPACE_CONFIG"
_flash_deterministic_set = False
"""Whether seed_everything set FLASH_DETERMINISTIC (a user's own setting is left alone)."""


def seed_everything(seed: int, deterministic_cuda: bool, device: torch.device | None = None) -> None:
    """Seed torch (CPU and CUDA) and pick deterministic kernels.

    CPU kernels are deterministic for a given thread count anyway; `use_deterministic_algorithms` also fills new
    tensors with NaN, so an op that read uninitialized memory shows rather than silently differs: always on for a
    run on the CPU (`device`; without it, where no GPU is). On CUDA determinism costs speed (no atomics-based
    kernels, cuBLAS workspace pinned), so it is opt-in there with training.deterministic, and then strict: in
    warn-only mode torch's SDPA backward kernels (memory-efficient and flash) only warn and keep their
    nondeterministic algorithm; strict mode switches them to a deterministic one, and an op that has none raises
    (`nondeterministic_op_error` says which). flash-attn's own kernels (attn_implementation: flash_attention_2) are
    outside torch's switch: transformers asks them for their deterministic backward when
    FLASH_ATTENTION_DETERMINISTIC is 1, read at every call. cuBLAS's CUBLAS_WORKSPACE_CONFIG: `pin_cublas_workspace`,
    earlier in a run (and here for other callers).
    """
    global _flash_deterministic_set
    torch.manual_seed(seed)
    if deterministic_cuda:
        os.environ.setdefault(CUBLAS_CONFIG, ":4096:8")
        if os.environ.get(FLASH_DETERMINISTIC) != "1":
            os.environ[FLASH_DETERMINISTIC], _flash_deterministic_set = "1", True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True)
    else:  # (off on CUDA: a process may train more than once, and a later run gets flash-attn's faster backward back)
        if _flash_deterministic_set:
            os.environ.pop(FLASH_DETERMINISTIC, None)
            _flash_deterministic_set = False
        on_cpu = device.type != "cuda" if device is not None else not torch.cuda.is_available()
        torch.use_deterministic_algorithms(on_cpu, warn_only=True)


def pin_cublas_workspace(deterministic: bool, device: str) -> str | None:
    """For training.deterministic off the CPU (`device`: model.device): set CUBLAS_WORKSPACE_CONFIG before anything
    in the run starts CUDA (accelerate's Accelerator does, with several processes). torch reads it once, at its
    first cuBLAS call: where CUDA had started already in this process (a notebook), setting it satisfies torch's
    check without reaching cuBLAS, and the note returned says so; None otherwise."""
    if not deterministic or device == "cpu" or CUBLAS_CONFIG in os.environ:
        return None
    os.environ[CUBLAS_CONFIG] = ":4096:8"
    if not torch.cuda.is_initialized():
        return None
    return (f"training.deterministic: CUDA was already in use in this process, so {CUBLAS_CONFIG}, set now, may not "
            "reach cuBLAS, whose results can then differ between runs. For bit-identical runs set "
            f"{CUBLAS_CONFIG}=:4096:8 in the environment before Python starts (for a notebook, before its kernel "
            "starts), or run `peftkit train` from a shell.")


@contextlib.contextmanager
def nondeterministic_op_error():
    """Turn torch's error for an op without a deterministic kernel (under training.deterministic: true) into the
    recipe's."""
    try:
        yield
    except RuntimeError as e:
        if "does not have a deterministic implementation" not in str(e):
            raise
        raise PeftkitError(
            f"training.deterministic: true, but this run uses an operation torch has no deterministic kernel for "
            f"({str(e).split(',')[0]}). Set training.deterministic: false (runs then reproduce only up to "
            "kernel-level rounding on GPUs), or change what uses it (model.attn_implementation, the method)."
        ) from None


# Trainer's rule (transformers' Trainer.get_decay_parameter_names): no weight decay for biases and normalisation
# weights, known by layer type (nn.LayerNorm) or by name.
NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def optimizer_groups(cfg: TrainingConfig, model: torch.nn.Module) -> list[dict]:
    """The trainable parameters as the optimizer's parameter groups: one group, or with LoRA+
    (`loraplus_lr_ratio`) one per role, each with its `lr` and a `loraplus` key naming the role ("A", "B",
    "embedding", "other": modules_to_save, DoRA's magnitude), in the model's parameter order. Weight decay is
    training.weight_decay, but for biases and normalisation weights (a bottleneck's trained norms too: a group of
    their own with weight_decay 0, as transformers' Trainer leaves them out); the scheduler scales every group's lr
    by the same factor."""
    from transformers.trainer_pt_utils import get_parameter_names

    params = trainable_parameters(model)
    roles, lrs = {}, {}
    if cfg.loraplus_lr_ratio is not None:
        roles = {id(p): layer.method.loraplus_roles.get(name, "other")
                 for layer in adapter_layers(model).values() for name, p in layer.adapter_params().items()}
        lrs = {"A": cfg.lr, "B": cfg.lr * cfg.loraplus_lr_ratio, "embedding": cfg.loraplus_lr_embedding,
               "other": cfg.lr}
    decayed = None
    if cfg.weight_decay:
        from peftkit.methods.bottleneck import TrainedNorm

        # A bottleneck's train_norms wraps each norm: its weight is in no nn.LayerNorm, and GPT-2's ln_1.norm_weight
        # matches no pattern, so the wrapper counts as a norm layer.
        names = set(get_parameter_names(model, [torch.nn.LayerNorm, TrainedNorm], NO_DECAY_PATTERNS))
        decayed = {id(p) for name, p in model.named_parameters() if name in names}
    groups: dict[tuple[str | None, bool], list[torch.nn.Parameter]] = {}
    for p in params:
        role = roles.get(id(p), "other") if cfg.loraplus_lr_ratio is not None else None
        groups.setdefault((role, decayed is not None and id(p) not in decayed), []).append(p)
    return [{"params": ps} | ({"lr": lrs[role], "loraplus": role} if role else {})
            | ({"weight_decay": 0.0} if exempt else {}) for (role, exempt), ps in groups.items()]


def scheduled_lr(cfg: TrainingConfig, scheduler) -> float:
    """training.lr as the schedule scales it for the coming step: the rate of every parameter but LoRA+'s B and
    embedding groups (whatever group comes first), as transformers' Trainer logs lora_A's."""
    return cfg.lr * scheduler.lr_lambdas[0](scheduler.last_epoch)


def build_optimizer(cfg: TrainingConfig, params: list, device: torch.device, console: Console,
                    model: torch.nn.Module | None = None):
    """The optimizer of `training.optimizer` over `params`: parameters or parameter groups (`optimizer_groups`),
    a group's own `lr` winning over training.lr. A bitsandbytes 8-bit optimizer keeps 32-bit state for the
    embeddings of `model` it trains (modules_to_save), as transformers' Trainer has it do for their stability."""
    if cfg.optimizer == "adamw":
        # The fused kernel (as transformers' default optim, adamw_torch_fused): one pass over every tensor. On CPU
        # its step over a LoRA's 56 tensors took 0.4 ms instead of the for-loop's 2.4 ms.
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_epsilon,
                                 weight_decay=cfg.weight_decay, fused=device.type in ("cuda", "cpu"))
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    from peftkit.quantization import import_bitsandbytes

    bnb = import_bitsandbytes()
    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[cfg.optimizer]
    if cfg.optimizer.startswith("paged") and device.type != "cuda":
        console.print(f"[yellow]note:[/] {cfg.optimizer} on CPU: bitsandbytes has no paged memory here and keeps the "
                      "optimizer state in ordinary buffers; the results are the same, the memory saving is not.")
    # bitsandbytes warns again at the first step(); the note above says it once, in our words.
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    optimizer = cls(params, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    if "8bit" in cfg.optimizer and model is not None:  # read at the first step, by parameter identity
        manager = bnb.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding) and module.weight.requires_grad:
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer


def warmup_steps(cfg: TrainingConfig, total_steps: int) -> int:
    """training.warmup_steps, or warmup_ratio of the run's steps rounded up, as transformers' get_warmup_steps."""
    return cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)


def lr_lambda(cfg: TrainingConfig, total_steps: int):
    """Linear warmup over `warmup_steps`, then cosine/linear decay to `min_lr_ratio` at total_steps, constant,
    wsd: constant, then a `decay_type` decay to `min_lr_ratio` over the last `decay_ratio` of the steps, or
    cosine_with_restarts: `num_cycles` cosine decays to 0, each restarting at lr."""
    warmup, floor = warmup_steps(cfg, total_steps), cfg.min_lr_ratio
    # wsd's decay: rounded up as warmup_ratio is (10% of 25 steps: 3), and never into the warmup.
    decay_steps = min(math.ceil(cfg.decay_ratio * total_steps), total_steps - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.scheduler == "constant":
            return 1.0
        start, shape = warmup, cfg.scheduler
        if cfg.scheduler == "wsd":
            start, shape = total_steps - decay_steps, cfg.decay_type
            if step < start:
                return 1.0
        progress = min((step - start) / max(1, total_steps - start), 1.0)
        if shape == "cosine_with_restarts":  # transformers' get_cosine_with_hard_restarts_schedule_with_warmup
            return 0.0 if progress == 1.0 else 0.5 * (1.0 + math.cos(math.pi * ((cfg.num_cycles * progress) % 1.0)))
        if shape == "linear":
            decay = 1.0 - progress
        elif shape == "1-sqrt":  # Hägele et al. 2024 (arXiv:2405.18392), transformers' wsd decay_type
            decay = 1.0 - math.sqrt(progress)
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return floor + (1.0 - floor) * decay  # exactly `decay` at floor 0
    return factor


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated by torch; CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def native_bf16(device: torch.device) -> bool:
    """Whether CUDA `device` computes in bfloat16 natively: compute capability 8.0 on (Ampere, Hopper...), or ROCm.
    `torch.cuda.is_bf16_supported()` also says yes for GPUs that only emulate it (T4, V100: much slower, and
    flash-attn refuses them), and asks about the current device, not necessarily the run's."""
    if device.type != "cuda":
        return False
    return bool(torch.version.hip) or torch.cuda.get_device_capability(device) >= (8, 0)


def mixed_precision(cfg: TrainingConfig, device: torch.device) -> str:
    if cfg.mixed_precision != "auto":
        if cfg.mixed_precision != "no" and device.type != "cuda":
            raise PeftkitError(f"training.mixed_precision: {cfg.mixed_precision} needs a CUDA device; use auto or no on CPU.")
        return cfg.mixed_precision
    return "bf16" if native_bf16(device) else "no"


def check_fp16_gradients(model: torch.nn.Module, precision: str) -> None:
    """fp16 mixed precision's loss scaler unscales fp32 gradients only. A parameter that trains in float16 (a
    modules_to_save copy or a classifier's head, from a checkpoint stored in float16 under model.dtype: auto;
    `Recipe` refuses model.dtype: float16 itself) would stop the first step with torch's "Attempting to unscale FP16
    gradients"."""
    if precision != "fp16":
        return
    half = [name for name, p in model.named_parameters() if p.requires_grad and p.dtype == torch.float16]
    if half:
        more = f" (and {len(half) - 1} more)" if len(half) > 1 else ""
        raise PeftkitError(
            f"training.mixed_precision: fp16 unscales fp32 gradients only, and {half[0]}{more} would train in "
            "float16: the checkpoint's own dtype, which model.dtype: auto keeps. Set model.dtype: float32 (the "
            "matmuls still run in fp16 under autocast), or use mixed_precision: bf16 where the GPU has it.")


def inference_autocast(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype `peftkit eval`, `generate` and `chat` run a recipe's model under: training's
    (`mixed_precision`, from the recipe's training.mixed_precision; `no` without a recipe), so that they evaluate
    as the run's own evaluations did, at their speed. Only on CUDA: a recipe trained on a GPU evaluates on a CPU as
    it is."""
    if device.type != "cuda" or setting == "no":
        return None
    if setting == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[setting]


def under_autocast(model: torch.nn.Module, dtype: torch.dtype | None, device: torch.device) -> torch.nn.Module:
    """`model` with its forward run under `device`'s autocast to `dtype` (as accelerate's `prepare` wraps it for
    training: every caller, `generate` included, goes through it); as it is for None."""
    if dtype is not None:
        model.forward = torch.autocast(device.type, dtype=dtype)(model.forward)
    return model


def check_device_support(cfg: Recipe, device: torch.device) -> None:
    """Combinations that only fail once the device is known, caught before anything is loaded."""
    from peftkit.modeling import check_attention

    check_attention(cfg.model, device)
    q = cfg.quantization
    if q is not None and device.type == "cpu" and q.method != "int8" and q.compute_dtype == "float16":
        raise PeftkitError(
            "quantization.compute_dtype: float16 on CPU: CPUs have no fast float16 matmuls and float16 training "
            "needs the loss scaling that only runs on CUDA, so it would be slow and underflow. Use float32 (or "
            "bfloat16) on CPU; float16 is for CUDA devices without bfloat16."
        )
    if device.type == "cuda" and _bf16_keys(cfg) and not torch.cuda.is_bf16_supported():
        raise PeftkitError(f"bfloat16 is not supported by {torch.cuda.get_device_name(device)}; use float16 or float32.")


def _bf16_keys(cfg: Recipe) -> list[str]:
    """The recipe keys that ask for bfloat16 weights or matmuls."""
    q = cfg.quantization
    return [key for key, value in (("model.dtype", cfg.model.dtype),
                                   ("quantization.compute_dtype", q.compute_dtype if q else None)) if value == "bfloat16"]


def emulated_bf16_note(cfg: Recipe, device: torch.device) -> str | None:
    """A note for bfloat16 asked of a GPU that only emulates it (T4, V100): it runs, several times slower."""
    keys = _bf16_keys(cfg)
    if device.type != "cuda" or not keys or native_bf16(device):
        return None
    capability = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return (f"{' and '.join(keys)}: bfloat16 on {torch.cuda.get_device_name(device)} (compute capability {capability}; "
            "native from 8.0) is emulated, several times slower than float16, which is native there. Set them to "
            "float16 (or float32).")


def cpu_dtype_note(dtype: str, device: torch.device) -> str | None:
    """A note for 16-bit weights on a CPU without native bf16 matmuls, where they are slow, not lean.

    Measured on a 2-core AVX2 machine: a (1024 x 256) @ (256 x 32000) matmul ran at 12 GFLOP/s in bf16 vs 73 in
    fp32, and the QLoRA benchmark with bf16 embeddings/lm_head (vocab 32000) stepped 24x slower than with fp32.
    """
    if device.type != "cpu" or dtype not in ("bfloat16", "float16"):
        return None
    with contextlib.suppress(Exception):
        if dtype == "bfloat16" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return None  # AVX512-BF16 / AMX: bf16 matmuls are fast here
    return (f"model.dtype: {dtype} on a CPU without native 16-bit matmuls: the weights take half the "
            "memory, but matmuls run several times slower than in float32 (up to ~20x for a large vocabulary). "
            "Use model.dtype: float32 on this machine unless memory is what limits you.")
