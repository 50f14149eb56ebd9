"""DeepSpeed ZeRO through accelerate, in real processes over gloo on the CPU (`peftkit.zero`)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from peftkit import zero
from peftkit.errors import PeftkitError
from peftkit.methods.kasa import KasaSettings
from peftkit.recipe import load_recipe
from peftkit.train import train
from tests.conftest import free_port, make_recipe

pytest.importorskip("deepspeed")

CONFIGS = Path(__file__).parents[1] / "configs" / "accelerate"
STEPS = 12
# Over gloo on the CPU, 2 processes; on GPUs one per GPU (NCCL takes one process per device), at most 2: so one
# GPU runs the single-process ZeRO of a one-GPU machine against the plain run.
PROCESSES = min(torch.cuda.device_count(), 2) if torch.cuda.is_available() else 2


def _sections(batch_size: int, generate: bool = True, **training) -> dict:
    """`generate`: eval.metrics and eval.samples, whose greedy answers every process generates in step."""
    # No dropout: its masks are drawn per process, so they cannot match a single process's.
    answers = {"metrics": ["exact_match", "token_f1"], "max_new_tokens": 8, "samples": 2} if generate else {}
    return dict(training={"max_steps": STEPS, "batch_size": batch_size, "grad_accum": 2, "save_steps": 6,
                          "eval_steps": 6, "max_grad_norm": 0.5, "mixed_precision": "no", "deterministic": True}
                | training,
                adapter={"dropout": 0.0},
                eval={"base_model": False} | answers)


def _launch(config: Path, recipe: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes",
               str(PROCESSES), "--main_process_port", str(free_port()), "-m", "peftkit", "train", str(recipe), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def _launch_each(config: Path, recipes: list[Path], env: dict | None = None) -> None:
    """Train each recipe in turn in one launch under the accelerate `config` (tests/train_each.py in each process, as
    `peftkit train RECIPE` runs there): the launch's start, nearly all of a 1-step DPO run's 11 s (a quiet 2-core
    machine) to 28 s (a loaded one), paid once for several runs. Only runs of one DeepSpeed config can share it:
    accelerate's state, which holds that config, is one per process."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes",
               str(PROCESSES), "--main_process_port", str(free_port()), str(Path(__file__).with_name("train_each.py")),
               *map(str, recipes)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def _launcher(stem: Path, config: dict) -> Path:
    """An accelerate config file (STEM.yaml) for DeepSpeed `config` (STEM.json), the recipe filling the batch,
    accumulation and clipping."""
    auto = dict.fromkeys(("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"), "auto")
    stem.with_suffix(".json").write_text(json.dumps(config | auto))
    launcher = stem.with_suffix(".yaml")
    launcher.write_text(f"distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: "
                        f"{stem.with_suffix('.json')}\n  zero3_init_flag: false\nnum_machines: 1\n"
                        f"num_processes: {PROCESSES}\n")
    return launcher


def _adapter(run: Path) -> dict:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def _close(one: dict, two: dict) -> float:
    assert one.keys() == two.keys()
    return max((one[k] - two[k]).abs().max().item() for k in one)


def _samples(run: Path) -> list[str]:
    """The fine-tuned model's eval.samples answers (greedy: the same adapter gives the same strings)."""
    return [s["fine_tuned"] for s in json.loads((run / "manifest.json").read_text())["metrics"]["samples"]]


def _lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tiny_llama, number_data, tmp_path_factory) -> Path:
    """The reference: one plain process with the global batch (2 x 2), clipped at 0.5."""
    root = tmp_path_factory.mktemp("single")
    train(load_recipe(make_recipe(root, tiny_llama, number_data, **_sections(4))))
    return root / "run"


QUANT = {"quantization": {"method": "nf4", "double_quant": True, "compute_dtype": "float32"}}


@pytest.fixture(scope="module")
def zero2(tiny_llama, number_data, tmp_path_factory) -> Path:
    """configs/accelerate/zero2.yaml's runs, trained in one launch (`_launch_each`) under a fresh TORCH_EXTENSIONS_DIR
    (a fresh machine's: nothing built yet), ROOT/extensions: ROOT/lora/run (`_sections(2)`, the adapter of
    `single`'s batch 4 in 2 processes) and ROOT/qlora/run (test_zero2_trains_qlora_as_one_process's). ROOT."""
    root = tmp_path_factory.mktemp("zero2")
    recipes = [make_recipe(root / "lora", tiny_llama, number_data, **_sections(4 // PROCESSES)),
               make_recipe(root / "qlora", tiny_llama, number_data, **_sections(4 // PROCESSES, False, max_steps=6),
                           **QUANT)]
    _launch_each(CONFIGS / "zero2.yaml", recipes, env=os.environ | {"TORCH_EXTENSIONS_DIR": str(root / "extensions")})
    return root


def test_zero2_trains_the_adapter_of_one_process(single, zero2):
    """configs/accelerate/zero2.yaml, 2 processes x batch 2 x grad_accum 2 (on one GPU: 1 x 4): the adapter, losses
    and clipped grad norms of one process with batch 4 (the recipe's accumulation and clipping, not DeepSpeed's
    defaults)."""
    extensions = zero2 / "extensions"
    # DeepSpeed's shared-memory collective, for inference only, is not compiled (52 s on a fresh machine's first run)
    assert torch.cuda.is_available() or not (extensions.exists() and any(extensions.rglob("*shm*")))
    run = zero2 / "lora" / "run"
    assert _close(_adapter(single), _adapter(run)) <= 1e-5
    ours, theirs = _lines(run), _lines(single)
    for a, b in zip(ours, theirs, strict=True):
        for key in ("loss", "grad_norm", "eval_loss", "eval_token_f1"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a, b)
    assert _samples(run) == _samples(single) and all(_samples(run))
    manifest = json.loads((run / "manifest.json").read_text())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    expected = {"processes": PROCESSES, "backend": backend, "type": "DEEPSPEED", "zero_stage": 2}
    assert manifest["distributed"] == expected | ({"trimmed_slices": True} if PROCESSES > 1 else {})
    # Resuming under ZeRO-2: test_zero2_in_bf16_checkpoints_and_exports_the_fp32_masters (the fp32 masters too).


def test_zero3_partitions_the_parameters_and_trains_the_adapter_of_one_process(single, tiny_llama, number_data,
                                                                               tmp_path):
    """ZeRO-3 with every parameter partitioned (persistence threshold 0: the tiny model's tensors would otherwise
    stay whole): the checkpoint's and the export's adapter are gathered whole and equal one process's; eval.metrics
    and eval.samples generate through the partitioned model; resumed from step 6, the uninterrupted run's bits."""
    partitioned = {"stage": 3, "stage3_param_persistence_threshold": 0}
    launcher = _launcher(tmp_path / "zero3", {"zero_optimization": partitioned})
    recipe = make_recipe(tmp_path, tiny_llama, number_data, **_sections(4 // PROCESSES))
    done = _launch(launcher, recipe)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert "FutureWarning" not in done.stderr  # DeepSpeed's deprecated torch.distributed calls: ~100 of them once
    run = tmp_path / "run"
    assert _close(_adapter(single), _adapter(run)) <= 1e-5
    # Every forward gathers the partitions: the processes generate the answers and samples whole, in step.
    assert _samples(run) == _samples(single) and all(_samples(run))
    checkpoint = load_file(run / "checkpoints" / f"step-{STEPS:08d}" / "adapter_model.safetensors")
    assert _close(checkpoint, _adapter(run)) == 0.0
    assert json.loads((run / "manifest.json").read_text())["distributed"]["zero_stage"] == 3
    _resume_from_the_middle(launcher, recipe, run)


BF16 = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}
"""ZeRO-2 in DeepSpeed's bf16 mode (what mixed_precision: auto gives on a bf16 GPU; here the config's bf16 section)."""
OBJECTIVES = ["dpo"]
"""The objectives test_zero2_in_bf16_takes_the_reference_at_the_engine_s_precision trains in the `zero2_bf16` launch."""


def _preference_recipe(root: Path, tiny_llama: Path, objective: str, init_from: Path | None = None) -> Path:
    """A 1-step run of `objective` (dpo, or kto) on 16 sums under DeepSpeed, its first step logged, no eval step and
    no checkpoint; `init_from`: from that adapter (adapter.init_from, whose settings are the adapter's)."""
    import random

    import yaml

    from peftkit.tiny import write_jsonl

    rng, rows = random.Random(0), []
    for _ in range(16):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        rows.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(-a - b)} if objective == "dpo" else
                    {"prompt": f"{a}+{b}=", "completion": str(a + b), "label": rng.random() < 0.5})
    data = {"train": root / "train.jsonl", "eval": root / "eval.jsonl"}
    write_jsonl(data["train"], rows)
    write_jsonl(data["eval"], rows[:4])
    sections = _sections(4 // PROCESSES, generate=False, objective=objective, max_steps=1, log_steps=1,
                         eval_steps=None, save_steps=None)
    recipe = make_recipe(root, tiny_llama, data, data={"format": "preference" if objective == "dpo" else "unpaired",
                                                       "max_length": 64}, **sections)
    if init_from is not None:
        raw = yaml.safe_load(recipe.read_text())
        raw["adapter"] = {"init_from": str(init_from)}
        recipe.write_text(yaml.safe_dump(raw))
    return recipe


@pytest.fixture(scope="module")
def zero2_bf16(tiny_llama, number_data, tmp_path_factory) -> Path:
    """The runs under `BF16` (ROOT/zero2-bf16.yaml), trained in one launch (`_launch_each`): ROOT/masters/run
    (`_sections(2)` without generation), ROOT/OBJECTIVE/run for each of OBJECTIVES and ROOT/init_from/run (DPO from
    ROOT/start, a random LoRA adapter): `_preference_recipe`'s. ROOT."""
    from peftkit.methods.lora import LoraConfig
    from tests.conftest import save_random_adapter

    root = tmp_path_factory.mktemp("zero2-bf16")
    start = save_random_adapter(tiny_llama, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], dropout=0.0),
                                root / "start", seed=3)
    recipes = [make_recipe(root / "masters", tiny_llama, number_data, **_sections(4 // PROCESSES, generate=False)),
               *(_preference_recipe(root / objective, tiny_llama, objective) for objective in OBJECTIVES),
               _preference_recipe(root / "init_from", tiny_llama, "dpo", init_from=start)]
    _launch_each(_launcher(root / "zero2-bf16", BF16), recipes)
    return root


def test_zero2_in_bf16_checkpoints_and_exports_the_fp32_masters(single, zero2_bf16):
    """DeepSpeed's bf16 mode (what mixed_precision: auto gives on a bf16 GPU; here the config's bf16 section): the
    engine holds the whole model in bf16 and ZeRO the adapter's fp32 masters. The export and the checkpoints hold
    the masters (fp32 values that bf16 cannot hold: the engine's bf16 copy would be all bf16 values), near one fp32
    process's adapter (the forward and backward ran in bf16); resumed from step 6, the uninterrupted run's bits."""
    run = zero2_bf16 / "masters" / "run"
    adapter, reference = _adapter(run), _adapter(single)
    for key, value in adapter.items():
        assert value.dtype == torch.float32 and not value.equal(value.bfloat16().float()), key
    distance = sum((adapter[k] - reference[k]).square().sum() for k in adapter).sqrt()
    assert 0 < distance <= 0.05 * sum(v.square().sum() for v in reference.values()).sqrt()  # 1.7 % here
    ours, theirs = _lines(run), _lines(single)
    assert ours[-1]["eval_loss"] == pytest.approx(theirs[-1]["eval_loss"], rel=1e-3)
    checkpoint = load_file(run / "checkpoints" / f"step-{STEPS:08d}" / "adapter_model.safetensors")
    assert _close(checkpoint, adapter) == 0.0
    assert json.loads((run / "manifest.json").read_text())["distributed"]["precision"] == "bf16"
    _resume_from_the_middle(zero2_bf16 / "zero2-bf16.yaml", zero2_bf16 / "masters" / "recipe.yaml", run)


def _resume_from_the_middle(launcher: Path, recipe: Path, run: Path) -> None:
    """Remove what the run wrote after step 6, resume: the uninterrupted run's bits."""
    uninterrupted = _adapter(run)
    shutil.rmtree(run / "checkpoints" / f"step-{STEPS:08d}")
    shutil.rmtree(run / "adapter")
    (run / "manifest.json").unlink()
    resumed = _launch(launcher, recipe, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-6000:]
    assert "Resumed from step-00000006" in resumed.stdout
    again = _adapter(run)
    assert all((uninterrupted[k] == again[k]).all() for k in uninterrupted)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_zero2_in_bf16_takes_the_reference_at_the_engine_s_precision(objective, zero2_bf16):
    """DPO under DeepSpeed's bf16 mode, model.dtype float32: the engine trains the model in bf16, so the reference
    log-probabilities (computed before `prepare`) are taken in bf16 too. The first step's policy is the reference
    (LoRA's B is 0, no dropout): every reward 0 and the loss that of a zero margin, log 2 for DPO and 1 - sigmoid(0) =
    0.5 for KTO (with float32 references: DPO's loss 0.69345, rewards off 0 by bf16's rounding). KTO's references are
    taken by the same code after the same cast (`start_base._reference_logps`, `zero.cast_as_the_engine`): its run,
    in the `zero2_bf16` launch, passes with kto among OBJECTIVES."""
    import math

    first = next(line for line in _lines(zero2_bf16 / objective / "run") if line.get("step") == 1 and "loss" in line)
    assert first["loss"] == pytest.approx(math.log(2) if objective == "dpo" else 0.5, abs=1e-6)
    rewards = [first[k] for k in ("chosen_reward", "rejected_reward", "reward_margin") if first.get(k) is not None]
    assert rewards and all(value == 0.0 for value in rewards), first


def test_zero2_trains_qlora_as_one_process(zero2, tiny_llama, number_data, tmp_path):
    """QLoRA (NF4 + double quant) under ZeRO-2 (configs/accelerate/zero2.yaml, the `zero2` launch): the 4-bit base
    stays whole and unpartitioned in each process (ZeRO-2 partitions only what trains), and 2 processes give one
    process's adapter (dequantized fp32 compute)."""
    plain = make_recipe(tmp_path / "one", tiny_llama, number_data, **_sections(4, False, max_steps=6), **QUANT)
    train(load_recipe(plain))
    # Float rounding, amplified by Adam on near-zero gradients: one process at batch 2 x grad_accum 4 differs from
    # itself at 4 x 2 by 1.1e-5 here (fused AdamW; 5.8e-6 with the for-loop one), and so does ZeRO-2.
    assert _close(_adapter(tmp_path / "one" / "run"), _adapter(zero2 / "qlora" / "run")) <= 2e-5


def _accelerator(stage: int, **config) -> SimpleNamespace:
    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": stage}} | config)
    return SimpleNamespace(distributed_type="DistributedType.DEEPSPEED", num_processes=2,
                           state=SimpleNamespace(deepspeed_plugin=plugin), gradient_accumulation_steps=1)


@pytest.mark.parametrize(("sections", "adapter", "config", "expected"), [
    ({"quantization": {"method": "nf4"}}, {}, {}, "quantization.method: nf4 is not supported under ZeRO-3"),
    ({}, {"method": "adalora"}, {}, "adapter.method: adalora is not supported under DeepSpeed"),
    ({}, {"regularization": 0.1}, {}, "adapter.regularization: 0.1 is not supported under DeepSpeed"),
    ({}, {"kasa_config": KasaSettings(beta=0, gamma=0.1)}, {}, "kasa_config's regularisers (beta: 0.0, gamma: 0.1)"),
    ({"training": {"nan_policy": "skip_step"}}, {}, {}, "training.nan_policy: skip_step"),
    ({"export": {"merged": True}}, {}, {}, "peftkit merge --adapter RUN_DIR/adapter --output DIR"),
    ({}, {"method": "prefix_tuning"}, {}, "adapter.method: prefix_tuning is not supported under ZeRO-3"),
    ({}, {}, {"optimizer": {"type": "AdamW"}}, "has an 'optimizer' section"),
    ({}, {}, {"zero_optimization": {"stage": 0}}, "runs ZeRO stage 0 (DeepSpeed without ZeRO)"),
])
def test_deepspeed_refuses_what_it_cannot_do(tiny_llama, number_data, tmp_path, sections, adapter, config, expected):
    """Checked before the model loads, each with its way out (AdaLoRA's, fusion's and KaSA's settings stand in as
    attributes: the check reads nothing else of them)."""
    recipe = load_recipe(make_recipe(tmp_path, tiny_llama, number_data, **sections))
    recipe = recipe.model_copy(update={"adapter": SimpleNamespace(**vars(recipe.adapter) | adapter)})
    with pytest.raises(PeftkitError) as e:
        zero.check(recipe, _accelerator(3, **config))
    assert expected in str(e.value)


def test_deepspeed_config_values_must_agree_with_the_recipe(tiny_llama, number_data, tmp_path):
    """"auto" (or absent) takes the recipe's value; a different explicit value names both keys."""
    recipe = load_recipe(make_recipe(tmp_path, tiny_llama, number_data, training={"grad_accum": 3,
                                                                                  "max_grad_norm": 0.3}))
    accelerator = _accelerator(2, gradient_clipping="auto")
    zero.configure(recipe, accelerator, torch.nn.Linear(3, 2))
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["gradient_clipping"], config["train_batch_size"]) == (4, 3, 0.3, 24)
    assert config["zero_optimization"]["reduce_bucket_size"] == 8  # the trainable numbers: one bucket
    with pytest.raises(PeftkitError) as e:
        zero.configure(recipe, _accelerator(2, gradient_clipping=1.0), torch.nn.Linear(3, 2))
    assert "gradient_clipping: 1.0, but the recipe's training.max_grad_norm is 0.3" in str(e.value)


@pytest.mark.parametrize("stage", [2, 3])
def test_verify_relaunches_deepspeed_runs_as_the_shipped_configs(stage):
    """`peftkit verify` re-runs a DeepSpeed run through launcher flags: they say what zero<stage>.yaml says."""
    import yaml

    from peftkit.launch import launch_command

    command = launch_command(2, ["train", "r.yaml"], "DEEPSPEED", stage)
    flags = dict(zip(command[command.index("--use_deepspeed") + 1::2], command[command.index("--use_deepspeed") + 2::2]))
    shipped = yaml.safe_load((CONFIGS / f"zero{stage}.yaml").read_text())["deepspeed_config"]
    assert {key: str(value).lower() for key, value in shipped.items()} == {
        key.removeprefix("--"): value for key, value in flags.items() if key.startswith("--") and "process" not in key
        and key not in ("--num_machines", "--mixed_precision", "--dynamo_backend", "-m")}


def test_zero2_in_bf16_takes_the_reference_from_init_from_at_the_engine_s_precision(zero2_bf16):
    """DPO from adapter.init_from under DeepSpeed's bf16 mode: the reference is the init_from adapter over the base,
    taken after the injection, whose adapter weights the engine also trains in bf16. The first step's policy is that
    reference (no dropout): every reward 0 and the loss log 2."""
    import math

    first = next(line for line in _lines(zero2_bf16 / "init_from" / "run") if line.get("step") == 1 and "loss" in line)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6), first
    rewards = [first[k] for k in ("chosen_reward", "rejected_reward", "reward_margin") if first.get(k) is not None]
    assert rewards and all(value == 0.0 for value in rewards), first
