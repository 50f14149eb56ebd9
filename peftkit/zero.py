"""DeepSpeed ZeRO through accelerate (configs/accelerate/zero2.yaml, zero3.yaml), with peftkit's training semantics.

    accelerate launch --config_file configs/accelerate/zero2.yaml --num_processes N -m peftkit train RECIPE

The recipe stays the authority. DeepSpeed's engine would run its own gradient accumulation and clipping; peftkit
fills the config from the recipe instead (`configure`: micro-batch, accumulation, clipping; a value the config
sets otherwise is an error naming both keys) and drives the engine's boundary itself (`backward`, `step`), so the
loss keeps its normalisation by the global window's target tokens and N processes train the adapter of one.
ZeRO-2 partitions the optimizer state and gradients, ZeRO-3 the parameters too: the adapter is gathered for each
checkpoint and export (`gathered`, a collective every process joins), the optimizer state is kept per rank
(`optimizer_state`), so `--resume` needs the same number of processes.

On a machine without GPUs accelerate's DeepSpeed path would not start a process group (it skips DeepSpeed for
`cpu=True` and has no CPU backend otherwise): `accelerator_kwargs` asks for gloo, which DeepSpeed's CPU accelerator
uses, so the same code runs (and is tested) over gloo on CPU.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch

from peftkit.errors import PeftkitError


def requested() -> bool:
    """Whether accelerate's launcher was told to use DeepSpeed (before any Accelerator exists)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def accelerator_kwargs(device: torch.device) -> dict:
    """Accelerator arguments for a DeepSpeed run on `device`: on the CPU (launched as several processes), a gloo
    process group."""
    if device.type == "cpu":
        _without_shared_memory_op()
    if device.type != "cpu" or int(os.environ.get("LOCAL_RANK", -1)) == -1:
        return {}
    from accelerate.utils import InitProcessGroupKwargs

    return {"cpu": False, "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}


def _without_shared_memory_op() -> None:
    """DeepSpeed on the CPU builds its shared-memory collective (the C++ op `deepspeed_shm_comm`) as its process group
    starts, compiling it the first time on a machine: 52 s measured, in every fresh CI machine's first DeepSpeed run.
    It serves DeepSpeed inference's all-reduce (`inference_all_reduce`), never training's collectives, which go through
    torch.distributed. Marked unavailable in DeepSpeed's table of compatible ops (which keeps edits to it), as an op
    it cannot build is, it is not built."""
    import deepspeed.ops

    try:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except (AttributeError, TypeError):  # another DeepSpeed's layout: it builds the op as it would
        pass


def active(accelerator) -> bool:
    return str(accelerator.distributed_type).endswith("DEEPSPEED")


def stage(accelerator) -> int:
    """The ZeRO stage of a DeepSpeed run (0 when not one)."""
    if not active(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def precision(accelerator) -> str | None:
    """DeepSpeed's 16-bit mode of a run ("bf16" or "fp16"; None when off, or not a DeepSpeed run): set by the
    config's bf16/fp16 sections, which accelerate fills from mixed_precision."""
    if not active(accelerator):
        return None
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    return next((mode for mode in ("bf16", "fp16") if str(config.get(mode, {}).get("enabled")).lower() == "true"),
                None)


def cast_as_the_engine(accelerator, model: torch.nn.Module) -> None:
    """Under DeepSpeed's bf16 or fp16 mode (`precision`), the model's floating parameters in that dtype now, as the
    engine casts them at `prepare` (parameters only: buffers keep their dtype, as DeepSpeed leaves them), for the
    passes made before it that must match training's forward: a DPO or KTO run's reference log-probabilities. Taken
    at model.dtype (float32 by default) while the policy ran in bf16, they differed by bf16's rounding, so the first
    step's rewards were not 0 nor its loss log 2 (ZeRO-2 bf16 on the tiny model: loss 0.69345, margin -6e-4, a
    reward accuracy of 0.25 before any update). The engine's own cast then changes nothing."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision(accelerator))
    if dtype is None:
        return
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:  # (a 4-bit base's packed weights are integers: left alone)
            p.data = p.data.to(dtype)


def check(cfg, accelerator) -> None:
    """What DeepSpeed cannot do with this recipe, said before the model loads."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    where = _config_name()
    if stage(accelerator) == 0:
        raise PeftkitError(f"{where} runs ZeRO stage 0 (DeepSpeed without ZeRO), which peftkit does not support: it "
                           "checkpoints, restores and exports the adapter through ZeRO's optimizer (its partitions "
                           "and fp32 masters), which stage 0 does not have. Set zero_optimization.stage: 2 "
                           "(configs/accelerate/zero2.yaml), or use configs/accelerate/ddp.yaml for plain data "
                           "parallelism.")
    for section, instead in (("optimizer", "training.optimizer and training.lr"), ("scheduler", "training.scheduler")):
        if section in config:
            raise PeftkitError(f"{where} has an '{section}' section; peftkit builds it from the recipe "
                               f"({instead}). Remove the section.")
    if cfg.quantization is not None and stage(accelerator) == 3:
        raise PeftkitError(f"quantization.method: {cfg.quantization.method} is not supported under ZeRO-3 (it would "
                           "partition the quantized weights, which bitsandbytes' layers read whole). Use "
                           "configs/accelerate/zero2.yaml, or fsdp2.yaml with quantization.quant_storage set to the "
                           "compute dtype.")
    if cfg.adapter.method == "adalora":
        raise PeftkitError("adapter.method: adalora is not supported under DeepSpeed: its rank allocator reads each "
                           "weight's gradient after the step, which ZeRO has partitioned and freed by then. Use "
                           "configs/accelerate/ddp.yaml.")
    if cfg.adapter.method == "cpt":
        raise PeftkitError("adapter.method: cpt is not supported under DeepSpeed: its projection puts the context's "
                           "delta back into its balls after each step, and ZeRO steps fp32 master copies of its own, "
                           "which the projection would not reach. Use configs/accelerate/ddp.yaml.")
    if getattr(cfg.adapter, "regularization", 0):
        raise PeftkitError(f"adapter.regularization: {cfg.adapter.regularization} is not supported under DeepSpeed "
                           "(a second backward per step, which ZeRO's gradient partitioning does not allow). Set it "
                           "to 0, or use configs/accelerate/ddp.yaml.")
    kasa = getattr(cfg.adapter, "kasa_config", None)
    if kasa is not None and (kasa.beta or kasa.gamma):
        raise PeftkitError(f"adapter.kasa_config's regularisers (beta: {kasa.beta}, gamma: {kasa.gamma}) are not "
                           "supported under DeepSpeed (a second backward per step, which ZeRO's gradient partitioning "
                           "does not allow). Set both to 0 (KaSA without them), or use configs/accelerate/ddp.yaml.")
    if cfg.training.nan_policy == "skip_step":
        raise PeftkitError("training.nan_policy: skip_step is not supported under DeepSpeed: ZeRO has reduced the "
                           "step's gradients into its partitions by the time the loss is known. Use stop (the "
                           "default), or configs/accelerate/ddp.yaml.")
    if stage(accelerator) == 3 and _prompt_family(cfg.adapter.method):
        raise PeftkitError(f"adapter.method: {cfg.adapter.method} is not supported under ZeRO-3: its virtual tokens "
                           "read the embedding table outside the embedding's forward, where ZeRO-3 holds only a "
                           "partition of it. Use configs/accelerate/zero2.yaml, fsdp2.yaml or ddp.yaml.")
    if stage(accelerator) == 3 and cfg.export.merged:
        raise PeftkitError("export.merged: true under ZeRO-3 would gather the whole base model on one process. Set "
                           "export.merged: false and merge afterwards with `peftkit merge --adapter RUN_DIR/adapter --output DIR`.")


def build_whole(accelerator) -> None:
    """Under ZeRO-3, let transformers build models whole in each process (the engine partitions the base at
    `prepare`): accelerate's DeepSpeed config, registered with transformers, would make it build them partitioned
    under `deepspeed.zero.Init`, which neither adapter injection nor the memory estimate's meta-device model
    handle. So the model must fit one process while it loads."""
    if stage(accelerator) == 3:
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()


def _config_name() -> str:
    """The DeepSpeed config as a user knows it: its file, when accelerate was given one."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    return "the DeepSpeed config" + (f" {path}" if path != "none" else "")


def _prompt_family(method: str) -> bool:
    from peftkit.methods import METHODS
    from peftkit.methods.virtual import VirtualMethod

    return issubclass(METHODS[method], VirtualMethod)


def configure(cfg, accelerator, model) -> None:
    """Write the recipe's batch, accumulation and clipping into the DeepSpeed config ("auto" or absent there); a
    value the config sets otherwise is an error that names both keys. ZeRO's gradient buckets, unless set, hold
    the trainable parameters at once: DeepSpeed's defaults (5e8 numbers, 2 GB in fp32, allocated and cleared each
    step) are sized for full fine-tuning, and made a tiny LoRA step take seconds on a CPU."""
    tcfg, world = cfg.training, accelerator.num_processes
    wanted = {
        "train_micro_batch_size_per_gpu": (tcfg.batch_size, "training.batch_size"),
        "gradient_accumulation_steps": (tcfg.grad_accum, "training.grad_accum"),
        "gradient_clipping": (tcfg.max_grad_norm or 0.0, "training.max_grad_norm"),
        "train_batch_size": (tcfg.batch_size * tcfg.grad_accum * world, "training.batch_size x grad_accum x processes"),
    }
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    for key, (value, recipe_key) in wanted.items():
        given = config.get(key, "auto")
        if given != "auto" and float(given) != float(value):
            raise PeftkitError(f"{_config_name()} sets {key}: {given}, but the recipe's {recipe_key} is {value}. "
                               f"Set {key}: auto in the config (peftkit fills it from the recipe), or change the "
                               "recipe.")
        config[key] = value
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    section = config.setdefault("zero_optimization", {})
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        if section.get(key, "auto") == "auto":
            section[key] = int(min(5e8, max(trainable, 1)))
    config["steps_per_print"] = 2**31 - 1  # the run's progress bar and metrics.jsonl say it already
    accelerator.gradient_accumulation_steps = tcfg.grad_accum


def backward(engine, loss: torch.Tensor, last: bool) -> None:
    """Backward of one micro-batch; `last` marks the window's end, where ZeRO reduces the gradients. The loss is
    already normalised by the window (DeepSpeed would divide it by the accumulation steps again)."""
    engine.set_gradient_accumulation_boundary(last)
    engine.backward(loss, scale_wrt_gas=False)


def step(engine) -> float | None:
    """The optimizer step, DeepSpeed's way: clip to gradient_clipping, step, zero the gradients. The gradient norm
    before clipping, as torch's clip_grad_norm_ reports it (None when the config clips nothing)."""
    engine.step()
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def skipped(accelerator, engine) -> bool:
    """Whether DeepSpeed's last step was skipped: its fp16 loss scaler found inf/nan gradients (it then leaves its own
    schedule where it was; the run's, outside the engine, must be left so by the loop). Never outside DeepSpeed."""
    return active(accelerator) and not engine.was_step_applied()


def gathered(model, modify: bool = False):
    """Under ZeRO-3, a context in which the adapter's parameters (every trainable or adapter parameter: not the
    frozen base) are whole on every process; with `modify`, what the main process writes into them is kept. A
    collective: every process enters it. Elsewhere a no-op."""
    params = [p for p in _adapter_params(model) if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)


@contextlib.contextmanager
def masters(model):
    """Under DeepSpeed's bf16 or fp16 mode the engine holds the whole model in 16 bits, the adapter included, and
    the optimizer holds the adapter's fp32 masters, split over the processes: inside this context each trainable
    16-bit parameter holds its fp32 master, whole, so what is read there (a checkpoint's or the export's adapter)
    is what the optimizer trains, not its rounding. A collective per parameter: every process enters it, inside
    `gathered` under ZeRO-3. Elsewhere (fp32 parameters, no engine) a no-op."""
    swapped = []
    try:
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32 and (hasattr(p, "_hp_mapping") or hasattr(p, "ds_id")):
                from deepspeed.utils import safe_get_full_fp32_param

                swapped.append((p, p.data))
                p.data = safe_get_full_fp32_param(p)
        yield
    finally:
        for p, data in swapped:
            p.data = data


def is_partitioned(model) -> bool:
    """Whether ZeRO-3 holds `model`'s parameters as partitions."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _adapter_params(model) -> list[torch.nn.Parameter]:
    from peftkit.adapters import adapter_layers

    held = {id(p) for layer in adapter_layers(model).values() for p in layer.adapter_params().values()}
    return [p for p in model.parameters() if p.requires_grad or id(p) in held]


def optimizer_state(optimizer) -> list[dict]:
    """Every process's part of the ZeRO optimizer state, by rank, on the CPU (every process calls this)."""
    from accelerate.utils import gather_object

    state = _to_cpu(getattr(optimizer, "optimizer", optimizer).state_dict())
    return gather_object([state]) if torch.distributed.get_world_size() > 1 else [state]


def load_optimizer_state(optimizer, states: list[dict]) -> None:
    """Restore `optimizer_state`'s per-rank parts (the same number of processes), the fp32 masters included."""
    if len(states) != torch.distributed.get_world_size():
        raise PeftkitError(f"the checkpoint's ZeRO optimizer state is split over {len(states)} processes; resume with "
                           f"--num_processes {len(states)}.")
    getattr(optimizer, "optimizer", optimizer).load_state_dict(states, load_optimizer_states=True,
                                                               load_from_fp32_weights=True)


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def safe_globals() -> list:
    """The DeepSpeed classes a ZeRO optimizer state holds, for `torch.load(weights_only=True)`; none outside a
    DeepSpeed run (which has imported deepspeed already: importing it costs seconds and prints)."""
    if "deepspeed" not in sys.modules:
        return []
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
