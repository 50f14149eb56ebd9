"""`peftkit train RECIPE --num-processes N`: accelerate's launcher, run as a child whose processes' stderr is passed on
once (`launch`), and the flags that make its command line (`launch_command`) data parallel, FSDP2 or DeepSpeed ZeRO as
the configs/accelerate files say. What the launched processes do together is `peftkit.distributed`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys


FSDP2_FLAGS = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
               "--fsdp_reshard_after_forward", "true", "--fsdp_state_dict_type", "SHARDED_STATE_DICT",
               "--fsdp_cpu_ram_efficient_loading", "false"]
"""configs/accelerate/fsdp2.yaml as launcher flags (the package does not ship the configs folder)."""


def launch_command(num_processes: int, argv: list[str], kind: str = "MULTI_GPU", zero_stage: int = 2) -> list[str]:
    """accelerate's launcher running `peftkit <argv>` in `num_processes` processes, as data parallel or, for `kind`
    (a manifest's `distributed.type`) FSDP, as configs/accelerate/fsdp2.yaml shards, or DEEPSPEED, as
    configs/accelerate/zero<zero_stage>.yaml. Each launch meets on a port free at its start (port 0: accelerate
    picks one), so two runs started at once on one machine do not both take torch's default 29500."""
    engine = {"FSDP": FSDP2_FLAGS, "DEEPSPEED": [*ZERO_FLAGS, "--zero_stage", str(zero_stage)]}.get(kind, ["--multi_gpu"])
    return [sys.executable, "-m", "accelerate.commands.launch", *engine, "--num_machines", "1",
            "--num_processes", str(num_processes), "--main_process_port", "0", "--mixed_precision", "no",
            "--dynamo_backend", "no", "-m", "peftkit", *argv]


ZERO_FLAGS = ["--use_deepspeed", "--offload_optimizer_device", "none", "--offload_param_device", "none",
              "--zero3_init_flag", "false"]
"""configs/accelerate/zero2.yaml and zero3.yaml as launcher flags, but for the stage."""


def die_with_parent() -> None:
    """Have the kernel send this process SIGTERM when its parent dies, SIGKILL included (Linux; elsewhere nothing).
    torch elastic starts each worker in a session of its own, so a kill of the launcher's process group left them
    training on, alone; with it they stop as on a scheduler's SIGTERM: at the step's end, with a checkpoint."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before the call
        os.kill(os.getpid(), signal.SIGTERM)


def launch(num_processes: int, argv: list[str], kind: str = "MULTI_GPU", zero_stage: int = 2,
           inherit: list[int] = ()) -> int:
    """Run `launch_command` (data parallel, or FSDP2 for `kind` FSDP); the exit status (2 when the processes
    stopped on a user error, as `peftkit` itself). Their stderr is passed on without the launcher's own noise
    (torch elastic's log lines and its traceback of the failed child) and without an error line that another
    process already printed. The launcher runs in a session of its own and dies with this process; Ctrl-C or
    SIGTERM here is passed to it once (it passes it to the processes, which checkpoint and stop) and this process
    relays their last words. `inherit`: descriptors the launcher keeps open (a verify's scratch locks,
    `peftkit.scratch.held_locks`), so that what they lock stays locked until it exits, after its processes."""
    linux = sys.platform.startswith("linux")
    # The processes write their stderr in the encoding this one's has (the same environment): read it back in it.
    proc = subprocess.Popen(launch_command(num_processes, argv, kind, zero_stage), stderr=subprocess.PIPE,
                            encoding=sys.stderr.encoding or "utf-8", errors="replace", bufsize=1,
                            start_new_session=linux, preexec_fn=die_with_parent if linux else None,
                            pass_fds=tuple(inherit))
    forward = {sig: signal.signal(sig, lambda number, _: proc.send_signal(number))
               for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        errors = _relay(proc.stderr)
        code = proc.wait()
    finally:
        for sig, previous in forward.items():
            signal.signal(sig, previous)
    if code and errors:
        print(f"error: the run stopped in its {num_processes} processes (the message is above).", file=sys.stderr)
        return 2
    return code


_ELASTIC_LOG = re.compile(r"^[WEI]\d{4} .*torch/distributed/elastic")


_RANK_PREFIX = re.compile(r"^\[rank\d+\]: ")
"""torch's prefix of the lines of a process's uncaught exception (`[rank1]: Traceback ...`)."""


_STOPPED = re.compile(r"^error: process \d+ stopped: process \d+ failed")
"""A process's line in place of its broken collective's traceback (`peftkit.said_once.stopped_by_another`)."""


_ROOT_CAUSE_RANK = re.compile(r"^\s*rank\s*: (\d+)")
_ROOT_CAUSE_SIGNAL = re.compile(r"^\s*exitcode\s*: -(\d+) \(pid: (\d+)\)")
"""The launcher's failure summary, under its `Root Cause (first observed failure):`: the rank, and the exit code of
a process a signal ended (`exitcode  : -9 (pid: 4242)  (SIGKILL)`)."""


def _killed(summary) -> str | None:
    """What the launcher's failure summary (`summary`, read to its end) says of a run whose first failure was a
    process ended by a signal, as an error line; None when it was not."""
    rank, root, said = None, False, None
    for line in summary:
        root = root or line.startswith("Root Cause")
        if root and (found := _ROOT_CAUSE_RANK.match(line)):
            rank = found[1]
        elif root and said is None and (found := _ROOT_CAUSE_SIGNAL.match(line)):
            number = int(found[1])
            name = signal.Signals(number).name if number in set(signal.Signals) else f"signal {number}"
            said = (f"error: process {rank} (pid {found[2]}) was killed by {name}"
                    + (", most often the kernel's out-of-memory killer (see `dmesg`)" if name == "SIGKILL" else "")
                    + "; the other processes were stopped. --resume continues from the run's newest checkpoint.\n")
    return said


def _relay(stream) -> bool:
    """Copy `stream` to stderr, filtered as `launch` says (a `warning:` or `error:` line that another process said
    already left out); whether a peftkit `error:` line went by. A process's
    `[rankN]:` traceback is held to the end and dropped when another process said its error: it is the collective
    that broke when that process stopped (`Connection closed by peer`). A process's line in its place, that another
    process failed (`_STOPPED`), is left out and does not count: the failed process's traceback is then shown. A
    process killed by a signal (the out-of-memory killer's SIGKILL) says nothing itself: the launcher's failure
    summary, otherwise dropped, names it in an error line of its own, in place of the other processes' tracebacks."""
    seen_errors: set[str] = set()
    seen_warnings: set[str] = set()
    held: list[str] = []  # a traceback's first lines: the launcher's own is dropped with all that follows it
    ranks: list[str] = []
    for line in stream:
        if _RANK_PREFIX.match(line):
            ranks.append(line)
            continue
        if held or line.startswith("Traceback (most recent call last):"):
            held.append(line)
            if any("accelerate/commands/launch.py" in h or "torch/distributed/run.py" in h for h in held):
                # the launcher's traceback and failure summary: all that is left
                if (killed := _killed(stream)) is not None and not seen_errors:
                    sys.stderr.write(killed)  # (a failure, not a user error: the launcher's exit status stays)
                    ranks = []
                break
            if len(held) < 8:
                continue
            sys.stderr.writelines(held)
            held = []
            continue
        if _ELASTIC_LOG.match(line):
            continue
        if line.startswith("warning:"):  # every process warns of the same recipe and data: said once
            if line in seen_warnings:
                continue
            seen_warnings.add(line)
        if line.startswith("error:"):
            if line in seen_errors or _STOPPED.match(line):  # (the broken collective: left out, as its traceback)
                continue
            seen_errors.add(line)
        sys.stderr.write(line)
    sys.stderr.writelines(held if not any("launch.py" in h for h in held) else [])
    sys.stderr.writelines(ranks if not seen_errors else [])
    return bool(seen_errors)
