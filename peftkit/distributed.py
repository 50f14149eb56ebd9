"""Several processes, one run: data-parallel training through accelerate (torch DDP; gloo on CPU, NCCL on GPUs).

    peftkit train RECIPE --num-processes N        # = accelerate launch --multi_gpu --num_processes N -m peftkit train RECIPE
    accelerate launch [--config_file F] -m peftkit train RECIPE

Semantics (what makes N processes x batch b train the adapter of 1 process x batch N*b):
- Every process draws the same *global* micro-batch of N x `training.batch_size` rows (the data order is still a
  function of seed and epoch) and trains on its own slice of the rows (`shard`), so the global batch per
  optimizer step is batch_size x grad_accum x processes.
- The loss is normalised by the target tokens of the whole global window, which every process counts itself
  from the global batches (no communication): each backpropagates `N x its token-loss sum / global count`, and
  DDP's gradient average turns that into the single-process gradient.
- Gradients are synchronised once per optimizer step (`no_sync` on the other micro-batches).
- Only the main process writes (metrics, checkpoints, exports, manifest, report, trackers) or prints; each
  process's RNG state goes into the checkpoint (dropout masks differ by rank), so `--resume` is bit-identical.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys

import torch


def shard(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """This process's rows of a global batch: the `rank`-th of `world` nearly equal slices, in order."""
    if world == 1:
        return batch
    rows = torch.tensor_split(torch.arange(len(batch["input_ids"])), world)[rank]
    return {k: v[rows] for k, v in batch.items()}


def no_sync(accelerator, model, last: bool):
    """Skip DDP's gradient all-reduce on every micro-batch of a window but the last."""
    return contextlib.nullcontext() if last or accelerator.num_processes == 1 else accelerator.no_sync(model)


def total(accelerator, value: torch.Tensor) -> torch.Tensor:
    """The sum of `value` over processes (itself with one process)."""
    return value if accelerator.num_processes == 1 else accelerator.reduce(value, reduction="sum")


def any_process(accelerator, flag: bool) -> bool:
    """True on every process when it is true on one (a stop request must be taken by all at the same step)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum") > 0)


def rng_states(accelerator) -> list[dict]:
    """Each process's RNG states, by rank (every process calls this; all get the list)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if accelerator.num_processes == 1:
        return [state]
    from accelerate.utils import gather_object

    return gather_object([state])


def describe(accelerator) -> dict:
    """What manifest.json records of the processes."""
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
    return {"processes": accelerator.num_processes, "backend": backend,
            "type": str(accelerator.distributed_type).removeprefix("DistributedType.")}


def launch(num_processes: int, argv: list[str]) -> int:
    """Run `peftkit <argv>` in `num_processes` processes through accelerate's launcher; its exit code."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
               "--num_processes", str(num_processes), "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "peftkit", *argv]
    return subprocess.run(command, check=False).returncode
