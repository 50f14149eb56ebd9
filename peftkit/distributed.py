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
import re
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
    """Run `peftkit <argv>` in `num_processes` processes through accelerate's launcher; the exit status (2 when
    the processes stopped on a user error, as `peftkit` itself). Their stderr is passed on without the launcher's
    own noise (torch elastic's log lines and its traceback of the failed child) and without an error line that
    another process already printed."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
               "--num_processes", str(num_processes), "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "peftkit", *argv]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, bufsize=1)
    errors = _relay(proc.stderr)
    code = proc.wait()
    if code and errors:
        print(f"error: the run stopped in its {num_processes} processes (the message is above).", file=sys.stderr)
        return 2
    return code


_ELASTIC_LOG = re.compile(r"^[WEI]\d{4} .*torch/distributed/elastic")


def _relay(stream) -> bool:
    """Copy `stream` to stderr, filtered as `launch` says; whether a peftkit `error:` line went by."""
    seen_errors: set[str] = set()
    held: list[str] = []  # a traceback's first lines: the launcher's own is dropped with all that follows it
    for line in stream:
        if held or line.startswith("Traceback (most recent call last):"):
            held.append(line)
            if any("accelerate/commands/launch.py" in h or "torch/distributed/run.py" in h for h in held):
                for _ in stream:  # the launcher's traceback and failure summary: all that is left
                    pass
                break
            if len(held) < 8:
                continue
            sys.stderr.writelines(held)
            held = []
            continue
        if _ELASTIC_LOG.match(line):
            continue
        if line.startswith("error:"):
            if line in seen_errors:
                continue
            seen_errors.add(line)
        sys.stderr.write(line)
    sys.stderr.writelines(held if not any("launch.py" in h for h in held) else [])
    return bool(seen_errors)
