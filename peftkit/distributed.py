"""Several processes, one run: data-parallel training through accelerate (torch DDP; gloo on CPU, NCCL on GPUs).

    peftkit train RECIPE --num-processes N        # = accelerate launch --multi_gpu --num_processes N -m peftkit train RECIPE
    accelerate launch [--config_file F] -m peftkit train RECIPE

(`peftkit.launch` is the first: the launcher's command line and its processes' stderr.)

Semantics (what makes N processes x batch b train the adapter of 1 process x batch N*b):
- Every process draws the same *global* micro-batch of N x `training.batch_size` rows (the data order is still a
  function of seed and epoch) and trains on its own slice of the rows (`shard`), so the global batch per
  optimizer step is batch_size x grad_accum x processes.
- The loss is normalised by the target tokens of the whole global window, which every process counts itself
  from the global batches (no communication): each backpropagates `N x its token-loss sum / global count`, and
  DDP's gradient average turns that into the single-process gradient.
- Gradients are synchronised once per optimizer step (`no_sync` on the other micro-batches).
- Evaluation is shared out: each process takes every N-th batch of the eval loss and of eval.metrics' prompts
  (`peftkit.evaluate`), and the sums and answers are gathered to all; under FSDP the answers are generated whole.
- Only the main process writes (metrics, checkpoints, exports, manifest, report, trackers) or prints; each
  process's RNG state goes into the checkpoint (dropout masks differ by rank), so `--resume` is bit-identical.
- Several machines (accelerate's `--num_machines`): every rank above is the global one, so the run directory must be
  on a filesystem all machines share (`--resume` loads what the main process wrote: `check_sees_checkpoints`).

FSDP2 (`configs/accelerate/fsdp2.yaml`) shards the parameters as DTensors: gathering the adapter or the optimizer
state whole is a collective, so every process computes what the main process then writes (`full`,
`optimizer_state`). A merged export would gather the whole base on one process: it is refused under FSDP
(`check_engine`; `peftkit merge --adapter RUN/adapter` does it afterwards). DeepSpeed ZeRO is `peftkit.zero`: the same
semantics, with DeepSpeed's engine doing the reduction and the optimizer step.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from datetime import timedelta
from inspect import signature
from pathlib import Path

import torch

from peftkit import zero
from peftkit.data import IGNORE_INDEX


def shard(batch: dict[str, torch.Tensor], rank: int, world: int, trim: bool = False,
          group: int = 1) -> dict[str, torch.Tensor]:
    """This process's rows of a global batch: the `rank`-th of `world` nearly equal slices, in order.

    A global batch with fewer rows than processes (an epoch's last, or packed rows) leaves some slices empty. Such
    a process gets the batch's first row with no label instead: it still runs the forward and backward that DDP's,
    FSDP's and DeepSpeed's collectives wait for, and adds nothing to the loss or the gradients.

    With `trim` (`trims_padding`): the global batch is right-padded to its longest row; a slice keeps only the columns
    up to its own longest row (its attention mask's last 1), every per-token tensor (input_ids' shape) alike, per-row
    ones (task_ids, a classifier's labels) whole. The columns cut are padding in every row of the slice (pad ids,
    mask 0, no label), so nothing the model reads changes: not the last non-pad token a sequence classifier's head
    takes, nor a packed row's position ids. Mixed lengths: slices of short rows no longer compute on the long rows'
    padding.

    `group`: rows come in groups that stay together (a DPO batch's pairs, 2), slices are of whole groups, and the
    stand-in is a whole group."""
    if world == 1:
        return batch
    groups = torch.tensor_split(torch.arange(len(batch["input_ids"]) // group), world)[rank]
    rows = (groups[:, None] * group + torch.arange(group)).flatten()
    if not len(rows):
        batch = {k: torch.full_like(v[:group], IGNORE_INDEX) if k == "labels" else v[:group] for k, v in batch.items()}
        rows = torch.arange(group)
    shape = batch["input_ids"].shape
    width = shape[1]
    if trim and "attention_mask" in batch:  # (on the CPU, before the copy to the device: no sync)
        columns = batch["attention_mask"][rows].any(0).nonzero()
        width = int(columns[-1]) + 1 if len(columns) else width
    return {k: v[rows, :width] if v.shape == shape else v[rows] for k, v in batch.items()}


def stands_in(batch: dict[str, torch.Tensor], rank: int, world: int, group: int = 1) -> bool:
    """Whether `shard` gives this process a stand-in for `batch`: its slice is empty (fewer groups than processes)."""
    return world > 1 and rank >= len(batch["input_ids"]) // group


_standing_in = False


@contextlib.contextmanager
def standing_in(active: bool):
    """Mark the forward and backward of a stand-in (`stands_in`) while they run: a statistic that a layer adds up
    over the processes' slices of the global batch (VeLoRA's batch mean, `in_batch_statistics`) must leave it out,
    or the batch's first row counts twice there (3 processes, an epoch's last batch of 2 rows)."""
    global _standing_in
    previous, _standing_in = _standing_in, active
    try:
        yield
    finally:
        _standing_in = previous


def in_batch_statistics() -> bool:
    """Whether this process's rows count in a sum over the global batch (False while it runs a stand-in)."""
    return not _standing_in


TRIMMED = "PEFTKIT_TRIMMED_SLICES"
"""Set by `peftkit verify` for its re-run of a run of several processes (launched processes inherit it): "1" where the
recorded run trimmed its slices (manifest.json's `distributed.trimmed_slices`), "0" where it did not (a manifest
without the field: a run from before the trim, or one `trims_padding` refused)."""


def trims_slices(cfg, config, world: int) -> bool:
    """Whether a run that starts now trims each process's slice (`shard`'s `trim`, recorded in its checkpoints'
    `LoopState.trimmed_slices` and its manifest): under several processes, `trims_padding`'s answer, or in verify's
    re-run what the recorded run did (`TRIMMED`). `config`: the model's transformers config."""
    if world == 1:
        return False
    recorded = os.environ.get(TRIMMED)
    return recorded == "1" if recorded is not None else trims_padding(cfg, config)


def trims_padding(cfg, config=None) -> bool:
    """Whether a process's slice of the global batch may drop the padding all its rows share (`shard`'s `trim`): not
    where something reads the padded batch as a whole, whose result would then depend on how it was sliced: VeLoRA's
    batch averages (over every padded position, pads included, as peft's), NEFTune's noise scale (the padded
    length), a RoPE that picks its frequencies by the batch's longest position, padding included (dynamic scaling,
    the recipe's or the model's own; Phi-3's longrope): a slice of short rows trimmed below the model's context ran
    on other frequencies than one process gives the same rows. `config`: the model's transformers config."""
    velora = getattr(cfg.adapter, "velora_config", None)
    dynamic = cfg.model.rope_scaling is not None and cfg.model.rope_scaling.type == "dynamic"
    return not (cfg.training.neftune_noise_alpha or dynamic or (config is not None and _rope_reads_width(config))) \
        and (velora is None or velora.init_type == "random")


def _rope_reads_width(config) -> bool:
    """Whether the model's RoPE is scaled by the longest position of each forward (transformers' `dynamic` and
    `longrope` types), which right padding makes the batch's width."""
    params = getattr(config.get_text_config(), "rope_parameters", None) or {}
    entries = params.values() if all(isinstance(v, dict) for v in params.values()) else [params]
    return any(entry.get("rope_type") in ("dynamic", "longrope") for entry in entries)


def unwrap(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP's, FSDP's or DeepSpeed's wrapper; in a plain run the model itself, without a call to
    accelerate's `unwrap_model`, which imports deepspeed where it is installed (seconds, and a warning printed)."""
    from accelerate.utils import DistributedType

    return model if accelerator.distributed_type == DistributedType.NO else accelerator.unwrap_model(model)


def autocast_only(accelerator, model: torch.nn.Module) -> None:
    """Under native mixed precision accelerate's `prepare` wraps the forward in autocast and then converts every
    floating output to fp32: the full (batch, time, vocab) logits, twice the bf16 size, the very copy
    `peftkit.loss` exists to avoid (4.2 GB at batch 4 x 2048 tokens of a 128k vocabulary). Keep the autocast, drop
    the conversion: the loss takes its labelled rows to fp32 itself."""
    inner = unwrap(accelerator, model)
    original = inner.__dict__.pop("_original_forward", None)
    if original is not None:
        from accelerate.utils import get_mixed_precision_context_manager

        inner.forward = get_mixed_precision_context_manager(accelerator.native_amp, accelerator.autocast_handler)(
            original)


def no_sync(accelerator, model, last: bool):
    """Skip DDP's gradient all-reduce on every micro-batch of a window but the last (DeepSpeed: `backward`)."""
    if last or accelerator.num_processes == 1 or zero.active(accelerator):
        return contextlib.nullcontext()
    return accelerator.no_sync(model)


def backward(accelerator, model, loss: torch.Tensor, last: bool) -> None:
    """Backward of one micro-batch of a window (`last`: the window's end)."""
    if zero.active(accelerator):
        zero.backward(model, loss, last)
    else:
        accelerator.backward(loss)


def optimizer_step(accelerator, model, optimizer, parameters, max_grad_norm: float | None,
                   check_finite: bool = False) -> tuple[float | None, bool]:
    """Clip the gradients to `max_grad_norm` (if set) and step: (the norm before clipping, or None where it was not
    measured; whether it stepped). `check_finite`: measure the norm even unclipped, and do not step when it is not
    finite (then it is returned): every process decides alike, the gradients being already reduced."""
    if zero.active(accelerator):  # the engine clips to gradient_clipping (= max_grad_norm, `zero.configure`)
        norm = zero.step(model)
        return (norm if max_grad_norm is not None else None), True
    if max_grad_norm is None and not check_finite:
        optimizer.step()
        return None, True
    # An infinite max_norm measures without clipping (the factor clamps to 1).
    norm = float(accelerator.clip_grad_norm_(parameters, math.inf if max_grad_norm is None else max_grad_norm))
    if check_finite and not math.isfinite(norm):
        return norm, False
    optimizer.step()
    return norm, True


def total(accelerator, value: torch.Tensor) -> torch.Tensor:
    """The sum of `value` over processes (itself with one process)."""
    return value if accelerator.num_processes == 1 else accelerator.reduce(value, reduction="sum")


def any_signal(accelerator, signum: int | None) -> int | None:
    """The signal a process was sent (SIGTERM over SIGINT: the larger number), the same on every process, or None
    when none was (a stop request must be taken by all at the same step, and said alike: a SIGTERM to one process had
    the others say 'Interrupted', two error lines)."""
    if accelerator.num_processes == 1:
        return signum
    largest = torch.tensor(signum or 0, device=accelerator.device)
    torch.distributed.all_reduce(largest, op=torch.distributed.ReduceOp.MAX)
    return int(largest) or None


def rng_states(accelerator) -> list[dict]:
    """Each process's RNG states, by rank (every process calls this; all get the list)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return by_rank(accelerator, state)


def by_rank(accelerator, value) -> list:
    """Each process's `value` (picklable), by rank (every process calls this; all get the list)."""
    if accelerator.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])


def describe(accelerator) -> dict:
    """What manifest.json records of the processes (the machines they ran on, when more than one; DeepSpeed's ZeRO
    stage, and its 16-bit mode when one is on)."""
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
    return {"processes": accelerator.num_processes, "backend": backend,
            "type": str(accelerator.distributed_type).removeprefix("DistributedType.")} | (
        {"machines": machines} if (machines := num_machines(accelerator)) > 1 else {}) | (
        {"zero_stage": zero.stage(accelerator)} if zero.active(accelerator) else {}) | (
        {"precision": precision} if (precision := zero.precision(accelerator)) else {})


def num_machines(accelerator) -> int:
    """How many machines the processes run on: torch's launcher starts LOCAL_WORLD_SIZE of them on each (1 when
    launched otherwise)."""
    return accelerator.num_processes // int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))


def check_sees_checkpoints(out: Path, rank: int) -> None:
    """--resume, on a process other than the main one: it loads the checkpoint the main process has just found in
    `out`, so it must see the same directory (several machines: a filesystem they all share)."""
    from peftkit.checkpoint import checkpoint_dirs
    from peftkit.errors import PeftkitError

    if not checkpoint_dirs(out):
        raise PeftkitError(
            f"--resume: process {rank} (on {socket.gethostname()}) finds no checkpoint in {out / 'checkpoints'}, "
            "where the main process resumes from. Every machine of a run must see export.output_dir at the same "
            "path: put it on a filesystem they share.")


CLOSE_TIMEOUT = timedelta(minutes=1)
"""How long the main process waits at `close` for the others (they have less to do after training, so they are
there first) before it ends its part alone."""


def close(finished: bool = True, timeout: timedelta = CLOSE_TIMEOUT) -> None:
    """End this process's part in a multi-process run: wait for the others (`finished`, gloo), then destroy the
    process group before the interpreter exits.

    Why the wait: a gloo worker thread drops its last reference to a collective's work (and so to its tensors, which
    takes the GIL) just after the caller has been told it finished. A process that ended right after its last
    collective (a process other than the main one, while the main process writes the exports) sometimes reached
    interpreter shutdown first; the thread, taking the GIL then, was ended by Python mid-destructor: 'terminate
    called without an active exception', exit status 1 after a finished run (seen in core dumps; 8 of 221 toy runs).
    Destroying the group does not end that thread (a process keeps all its threads after it, the DDP model freed or
    not). Waiting here for the main process gives it that time. The wait is gloo's `monitored_barrier` (its send and
    receive run in this thread, the GIL released): the main process gives up after `timeout`; the others wait for it
    up to the group's timeout (`PROCESS_GROUP_TIMEOUT`, as in any collective), and one whose peer died fails at once
    on the closed connection; a failed wait is passed over. Not after an error (`finished` False): the others may be
    in another collective, which this process must not wait out. NCCL has no monitored barrier and its plain one
    could wait for a dead peer: there the group is destroyed straight away."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if finished and torch.distributed.get_world_size() > 1 and torch.distributed.get_backend() == "gloo":
        with contextlib.suppress(RuntimeError):  # (gloo's errors: a peer's closed connection, the timeout)
            torch.distributed.monitored_barrier(timeout=timeout)
    torch.distributed.destroy_process_group()


def sharded(accelerator) -> bool:
    """FSDP or ZeRO-3: parameters are shards, so every forward, and gathering a parameter whole, is a collective
    every process joins."""
    return str(accelerator.distributed_type).endswith("FSDP") or zero.stage(accelerator) == 3


def gathered_state(accelerator, model, saved_modules: list[str], optimizer) -> tuple[dict, object] | None:
    """(adapter weights, optimizer state) for a checkpoint when they are spread over the processes (FSDP,
    DeepSpeed): every process calls this and joins the gathers. None when the main process reads them itself."""
    if zero.active(accelerator):
        return adapter_weights(model, saved_modules), zero.optimizer_state(optimizer)
    if sharded(accelerator):
        return adapter_weights(model, saved_modules), optimizer_state(model, optimizer)
    return None


def adapter_weights(model, saved_modules: list[str]) -> dict[str, torch.Tensor]:
    """The adapter's state dict, whole (gathered from FSDP or ZeRO-3 shards: every process calls this)."""
    from peftkit.adapters.state_dicts import adapter_state_dict

    with zero.gathered(model), zero.masters(model):  # under DeepSpeed's 16-bit modes, the fp32 masters
        weights = adapter_state_dict(model, saved_modules)
        return {k: v.clone() for k, v in weights.items()} if zero.is_partitioned(model) else weights


PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)
"""How long a process waits in a collective before the run fails: transformers Trainer's `ddp_timeout`. NCCL's own
default is 10 minutes, and the other processes wait while the main process alone writes a merged export, the
report and the base model's samples."""


def accelerator_handlers(cfg, engine: list) -> list:
    """accelerate's kwargs handlers for a run: the engine's (`peftkit.zero`), with the process group's timeout; for
    torch DDP, a method whose layers skip their update at random (`skips_parameters`) leaves parameters out of one
    process's graph that another's uses, which DDP must look for every step (else its next forward fails); their
    gradients stay None where no process used them, as in a single process."""
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    from peftkit.methods import method_of

    handlers = list(engine)
    group = next((h for h in handlers if isinstance(h, InitProcessGroupKwargs)), None)
    if group is None:
        group = InitProcessGroupKwargs()
        handlers.append(group)
    group.timeout = PROCESS_GROUP_TIMEOUT
    if method_of(cfg.adapter).skips_parameters(cfg.adapter):
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    return handlers


def check_engine(cfg, accelerator) -> None:
    """What an accelerate configuration cannot do with this recipe, said before the model loads."""
    from peftkit.errors import PeftkitError
    from peftkit.methods import method_of

    kind = str(accelerator.distributed_type).removeprefix("DistributedType.")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and kind != "FSDP":
        # accelerate's state takes FSDP only with GPUs (and other accelerators), and on a CPU runs DDP instead
        import warnings

        from peftkit.errors import PeftkitWarning

        warnings.warn(PeftkitWarning(
            f"The accelerate config asks for FSDP, which accelerate runs on GPUs (and other accelerators) only: these "
            f"{accelerator.num_processes} processes train under plain data parallelism ({kind}), each holding the whole "
            "model, and what FSDP refuses is not checked. On a CPU launch with configs/accelerate/ddp.yaml (or peftkit "
            "train --num-processes N) to say so."), stacklevel=2)

    if sharded(accelerator) and getattr(cfg.adapter, "layer_replication", None):
        raise PeftkitError(
            "adapter.layer_replication stacks copies of layers that share their weights, which FSDP and ZeRO-3 shard "
            "once per layer; train it under DDP (configs/accelerate/ddp.yaml) or ZeRO-2.")
    if sharded(accelerator) and getattr(cfg.adapter, "velora_config", None):
        raise PeftkitError(
            "adapter.velora_config writes each layer's projection in its forward, which FSDP and ZeRO-3 hold sharded "
            "(not run here); train it under DDP (configs/accelerate/ddp.yaml) or ZeRO-2.")
    if sharded(accelerator) and getattr(cfg.adapter, "kasa_config", None):
        raise PeftkitError(
            "adapter.kasa_config truncates each target's whole base weight by its SVD when the layer is built, which "
            "FSDP and ZeRO-3 hold sharded (not run here); train it under DDP (configs/accelerate/ddp.yaml).")
    if sharded(accelerator) and getattr(cfg.adapter, "target_parameters", None):
        raise PeftkitError(
            "adapter.target_parameters adds its update to whole parameters each forward, which FSDP and ZeRO-3 hold "
            "sharded (not run here); train it under DDP (configs/accelerate/ddp.yaml) or ZeRO-2.")
    if (zero.active(accelerator) or sharded(accelerator)) and getattr(cfg.adapter, "use_asa", False):
        raise PeftkitError(
            "adapter.use_asa: AdaMSS's subspace allocation freezes subspaces while training (their requires_grad off), "
            "which DeepSpeed and FSDP cannot follow once they have wrapped the model; train it under DDP "
            "(configs/accelerate/ddp.yaml) or on one process, or set use_asa: false.")
    if kind == "FSDP" and (why := method_of(cfg.adapter).fsdp_refusal):  # (ZeRO-3: `zero.check`'s own)
        raise PeftkitError(f"adapter.method: {cfg.adapter.method} cannot train under FSDP: {why}; train it under DDP "
                           "(configs/accelerate/ddp.yaml).")
    if zero.active(accelerator):
        zero.check(cfg, accelerator)
    elif sharded(accelerator) and (shared := method_of(cfg.adapter).shared_across_layers(cfg.adapter)):
        # FSDP2 shards each decoder layer's parameters as its own unit; a parameter several layers' adapters reach
        # (VB-LoRA's `SharedTensors`, Lily's B, TinyLoRA's tied v, FRoD's V) is a DTensor of the first unit when the second is
        # sharded, and fully_shard fails there (torch's TypeError 'Invariant encountered', or its ValueError 'shared with
        # a parameter already managed by another FSDP group'), after the model had loaded. ZeRO-3 gathers it (tested).
        raise PeftkitError(
            f"adapter.method: {cfg.adapter.method} {shared}, which FSDP cannot shard once per decoder layer; "
            "train it under DDP (configs/accelerate/ddp.yaml) or DeepSpeed ZeRO (configs/accelerate/zero2.yaml, "
            "zero3.yaml).")
    elif sharded(accelerator) and cfg.export.merged:
        raise PeftkitError(
            "export.merged: true under FSDP would gather the whole base model on one process. Set export.merged: "
            "false and merge afterwards with `peftkit merge --adapter RUN_DIR/adapter --output DIR`.")
    elif sharded(accelerator) and method_of(cfg.adapter).skips_parameters(cfg.adapter):
        raise PeftkitError(
            f"adapter.module_dropout: {cfg.adapter.module_dropout} is not supported under FSDP: each process skips "
            "other layers' updates, and FSDP reduces only the gradients a process has, so the processes' reductions "
            "would not match. Set it to 0, or use configs/accelerate/ddp.yaml.")


def full(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` whole: an FSDP2 shard (DTensor) is gathered, a collective every process must join."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def place_like(tensor: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A whole `tensor` laid out as `target`: this process's shard of it when `target` is a DTensor."""
    if hasattr(target, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(tensor.to(target.device, target.dtype), target.device_mesh, target.placements)
    return tensor


def _fsdp(model) -> bool:
    return any(hasattr(p, "device_mesh") for p in model.parameters())


def optimizer_state(model, optimizer) -> dict:
    """The optimizer's state dict; under FSDP the whole state by parameter name, on the CPU (a collective)."""
    if not _fsdp(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, optimizer, state: dict | list) -> None:
    """Restore what `optimizer_state` (or `zero.optimizer_state`, a list by rank) saved (every process read the
    whole checkpoint)."""
    if isinstance(state, list):
        zero.load_optimizer_state(optimizer, state)
        return
    if not _fsdp(model):
        inner = getattr(optimizer, "optimizer", optimizer)  # (accelerate's wrapper)
        if getattr(inner, "is_paged", False):
            # (paged below, not all on the GPU first; an older bitsandbytes has no such argument)
            keep = {"move_to_device": False} if "move_to_device" in signature(inner.load_state_dict).parameters else {}
            inner.load_state_dict(state, **keep)
            _page_again(inner)
        else:
            optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), state,
                             options=StateDictOptions(full_state_dict=True))


def _page_again(optimizer) -> None:
    """Page a bitsandbytes paged optimizer's moments again after its `load_state_dict(move_to_device=False)`, which
    leaves them as ordinary CPU tensors: its default `.to(device)` put them all on the GPU at once, so a resumed run
    held there what the unbroken run kept paged, and could run out of memory where that one fitted. Paged as
    bitsandbytes' `get_state_buffer` pages new ones (the state of CUDA parameters of 1e5 elements and more), with the
    same values; its first `step()` moves the rest to the GPU (`to_gpu`). Not under FSDP or DeepSpeed, which restore
    optimizer state their own way (there it stays unpaged after a resume)."""
    import bitsandbytes.functional as bnb_functional

    for param, state in optimizer.state.items():
        if param.device.type != "cuda" or param.numel() < 1e5:
            continue
        for key in ("state1", "state2"):
            value = state.get(key)
            if isinstance(value, torch.Tensor) and not getattr(value, "is_paged", False):
                paged = bnb_functional.get_paged(*value.shape, dtype=value.dtype, device=param.device)
                paged.copy_(value)
                optimizer.page_mng.paged_tensors.append(paged)
                state[key] = paged
