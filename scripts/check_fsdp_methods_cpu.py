"""Each layer method under torch's FSDP2 on the CPU against one process: accelerate turns FSDP on only with GPUs, so
this shards as accelerate's TRANSFORMER_BASED_WRAP does (`fully_shard` per decoder layer, then the root) by hand, over
gloo. Too slow for the test suite (a 2-process launch per method); run by hand after changing a method's sharing of
tensors between layers or `peftkit.distributed.check_engine`.

    python scripts/check_fsdp_methods_cpu.py                 # every method below
    python scripts/check_fsdp_methods_cpu.py lily tinylora   # some

Each adapter is injected into the tiny Llama (2 decoder layers), moved far from identity (its method's `randomize`)
and trained 3 SGD steps (lr 0.05) on 4 rows: in one process, and in 2 FSDP2 processes of 2 rows each (the loss summed
and scaled by 2 / the tokens, so the gradients' average is the one process's). Prints the largest difference of the
trained tensors, gathered; above 1e-5, or a failure (a parameter several decoder layers share: torch's `fully_shard`
of the second fails), is said on its line and in the exit status (1). What check_engine refuses under FSDP is said
instead of run, and PVeRA (its noise drawn per process's rows) is not compared. Measured: every other method within
2.4e-6 (RandLoRA; most 1.2e-7); Lily, tied TinyLoRA and FRoD refused (their fully_shard failed before check_engine refused them).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import yaml

QV = ["q_proj", "v_proj"]
METHODS = {  # small enough for the tiny Llama's 32-wide layers
    "lora": {"target_modules": QV}, "adalora": {"init_r": 4, "target_r": 2, "total_step": 10}, "beft": {},
    "boft": {"target_modules": QV}, "bottleneck": {}, "c3a": {"block_size": 8, "target_modules": QV},
    "deft": {"target_modules": QV}, "delora": {"target_modules": QV},
    "fourierft": {"n_frequency": 64, "target_modules": QV}, "frod": {"target_modules": QV},
    "glora": {"target_modules": QV}, "gralora": {"target_modules": QV}, "hira": {"target_modules": QV},
    "hra": {"target_modules": QV}, "ia3": {"target_modules": QV}, "lily": {"r": 4, "target_modules": QV},
    "llama_adapter": {}, "ln_tuning": {}, "loha": {"target_modules": QV}, "lokr": {"target_modules": QV},
    "miss": {"r": 8, "target_modules": QV}, "oft": {"target_modules": QV}, "osf": {"target_modules": QV},
    "peanut": {"target_modules": QV}, "psoft": {"r": 4, "target_modules": QV}, "pvera": {"target_modules": QV},
    "randlora": {"target_modules": QV}, "road": {"group_size": 8, "target_modules": QV},
    "shira": {"r": 4, "target_modules": QV}, "supertuning": {"target_modules": QV},
    "tinylora": {"u": 4, "init_weights": "uniform"}, "tinylora_tied": {"u": 4, "weight_tying": 0.5},
    "vera": {"target_modules": QV}, "waveft": {"n_frequency": 48, "wavelet_family": "db2", "target_modules": QV},
}
PER_PROCESS = {"pvera": "its noise is drawn for each process's rows, as dropout's masks (6.4e-3 apart, measured)"}
ROWS = 4


def _adapter(name: str) -> dict:
    return {"method": name.removesuffix("_tied")} | METHODS[name]


def _trained(model_dir: str, adapter: dict, rows: slice, world: int, shard: bool) -> dict:
    """The trained tensors after 3 SGD steps on `rows` of the 4 (gathered whole where sharded)."""
    import torch
    from pydantic import TypeAdapter
    from transformers import AutoModelForCausalLM

    from peftkit.adapters import adapter_layers, inject_adapters
    from peftkit.recipe import AdapterConfig

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    inject_adapters(model, TypeAdapter(AdapterConfig).validate_python(adapter))
    generator = torch.Generator().manual_seed(1)
    for layer in adapter_layers(model).values():
        layer.method.randomize(layer, generator, 0.3)
    if shard:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    ids = (torch.arange(ROWS * 10).reshape(ROWS, 10) * 7) % 60 + 3
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        logits = model(input_ids=ids[rows]).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[rows][:, 1:].reshape(-1),
                                                 reduction="sum")
        (loss * world / (ROWS * 9)).backward()
        optimizer.step()
        optimizer.zero_grad()
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for n, p in model.named_parameters()
            if p.requires_grad}


def worker(name: str, model_dir: str) -> None:
    """One of the 2 processes (torch.distributed.run): the one-process reference, then its FSDP2 share."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    one = _trained(model_dir, _adapter(name), slice(0, ROWS), 1, shard=False)
    half = ROWS // world
    two = _trained(model_dir, _adapter(name), slice(rank * half, (rank + 1) * half), world, shard=True)
    if rank == 0:
        print(f"RESULT {max((one[k] - two[k]).abs().max().item() for k in one):.2g}", flush=True)
    dist.barrier()  # (gloo's worker thread may still release the last collective: see peftkit.distributed.close)
    dist.destroy_process_group()


def refusal(name: str, model_dir: str) -> str | None:
    """check_engine's refusal of this adapter under FSDP, or None."""
    from accelerate.utils import DistributedType

    from peftkit.distributed import check_engine
    from peftkit.errors import PeftkitError
    from peftkit.recipe import load_recipe
    from peftkit.tiny import number_rows, write_jsonl

    with tempfile.TemporaryDirectory() as tmp:
        write_jsonl(Path(tmp) / "d.jsonl", number_rows(4, seed=1))
        recipe = Path(tmp) / "r.yaml"
        recipe.write_text(yaml.safe_dump({"model": {"name_or_path": model_dir}, "adapter": _adapter(name),
                                          "data": {"train": str(Path(tmp) / "d.jsonl"), "format": "alpaca"},
                                          "export": {"output_dir": str(Path(tmp) / "run")}}))
        cfg = load_recipe(recipe)
        try:
            check_engine(cfg, SimpleNamespace(distributed_type=DistributedType.FSDP, num_processes=2))
        except PeftkitError as e:
            return str(e)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("methods", nargs="*", help=f"methods to check (default: all of {', '.join(METHODS)})")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return 0
    from peftkit.tiny import build_tiny_model

    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "llama"
        build_tiny_model(model, arch="llama", hidden_size=32, num_layers=2, seed=0)
        for name in args.methods or METHODS:
            if name in PER_PROCESS:
                print(f"{name:14} not compared: {PER_PROCESS[name]}")
                continue
            if why := refusal(name, str(model)):
                print(f"{name:14} refused under FSDP: {why[:100]}...")
                continue
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                   "--master_port", str(port), __file__, "--worker", name, str(model)],
                                  capture_output=True, text=True, timeout=600, check=False)
            result = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("RESULT")]
            if done.returncode != 0 or not result:
                failed += 1
                errors = [line for line in done.stderr.splitlines() if "Error:" in line]
                print(f"{name:14} FAILED: {(errors or ['exit status ' + str(done.returncode)])[-1][:200]}")
            else:
                bad = float(result[0]) > 1e-5
                failed += bad
                print(f"{name:14} {result[0]}" + ("  FAILED: above 1e-5" if bad else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
