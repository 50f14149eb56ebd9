"""Sharded training (FSDP2 through accelerate, configs/accelerate/fsdp2.yaml).

accelerate turns FSDP on only with CUDA devices, so the training tests run where a GPU is (one GPU: a
single-process FSDP run, which still shards every parameter into DTensors, gathers them for the checkpoint
and the export, and restores them on resume); the refusals are checked everywhere.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from peftkit.distributed import check_engine
from peftkit.errors import PeftkitError
from peftkit.recipe import load_recipe
from tests.conftest import free_port, make_recipe

FSDP2 = str(Path(__file__).parents[1] / "configs" / "accelerate" / "fsdp2.yaml")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate runs FSDP on CUDA devices only")


def _launch(recipe: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", FSDP2, "--num_processes",
               str(torch.cuda.device_count()), "--main_process_port", str(free_port()), "-m", "peftkit", "train",
               str(recipe), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def _sections(**training) -> dict:
    return dict(adapter={"dropout": 0.0}, eval={"base_model": False},
                training={"max_steps": 10, "save_steps": 5, "mixed_precision": "no", "deterministic": True} | training)


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def test_fsdp_refuses_a_merged_export(tiny_llama, number_data, tmp_path):
    recipe = load_recipe(make_recipe(tmp_path, tiny_llama, number_data, export={"merged": True}))
    with pytest.raises(PeftkitError) as e:
        check_engine(recipe, SimpleNamespace(distributed_type=DistributedType.FSDP))
    assert "peftkit merge --adapter RUN_DIR/adapter --output DIR" in str(e.value)


def test_fsdp_refuses_layers_that_skip_their_update_at_random(tiny_llama, number_data, tmp_path):
    recipe = load_recipe(make_recipe(tmp_path, tiny_llama, number_data,
                                     adapter={"method": "lokr", "module_dropout": 0.1}))
    with pytest.raises(PeftkitError) as e:
        check_engine(recipe, SimpleNamespace(distributed_type=DistributedType.FSDP))
    assert "adapter.module_dropout: 0.1 is not supported under FSDP" in str(e.value)
    assert "configs/accelerate/ddp.yaml" in str(e.value)


def test_fsdp_refuses_a_bank_every_layer_trains(tiny_llama, number_data, tmp_path):
    """VB-LoRA's vector bank is one parameter under every layer: FSDP2 shards it with the first decoder layer, and
    fully_shard of the second failed (torch's 'Invariant encountered' TypeError) once the model had loaded."""
    path = make_recipe(tmp_path, tiny_llama, number_data)
    raw = yaml.safe_load(path.read_text())
    raw["adapter"] = {"method": "vblora", "r": 4, "num_vectors": 12, "vector_length": 8}  # (make_recipe's are LoRA's)
    path.write_text(yaml.safe_dump(raw))
    recipe = load_recipe(path)
    with pytest.raises(PeftkitError) as e:
        check_engine(recipe, SimpleNamespace(distributed_type=DistributedType.FSDP))
    assert str(e.value) == (
        "adapter.method: vblora trains one tensor (vblora_vector_bank) that every adapted layer shares, which FSDP "
        "cannot shard once per decoder layer; train it under DDP (configs/accelerate/ddp.yaml) or DeepSpeed ZeRO "
        "(configs/accelerate/zero2.yaml, zero3.yaml).")


@pytest.mark.parametrize("adapter, shared", [
    ({"method": "lily", "r": 4, "stride_A": 2},
     "one B module (lily_B) per kind of layer, which the layers of that kind in every decoder layer share, and an A "
     "(lily_A) per 2 of them (stride_A)"),
    ({"method": "tinylora", "u": 4, "weight_tying": 0.5},
     "one v (tinylora_v) per group of consecutive targets (adapter.weight_tying: 0.5), which spans decoder layers "
     "(weight_tying: 0 gives each layer its own)"),
    ({"method": "frod", "target_modules": ["q_proj", "v_proj"]},
     "one V (frod_V, frozen) and one set of S entries per kind of layer, which the layers of that kind in every "
     "decoder layer share"),
], ids=["lily", "tinylora-weight_tying", "frod"])
def test_fsdp_refuses_a_tensor_several_decoder_layers_train(adapter, shared, tiny_llama, number_data, tmp_path):
    """Lily's B (and with stride_A its A), TinyLoRA's tied v and FRoD's V (frozen, a parameter all the same) are one
    parameter that several decoder layers' adapters reach, as VB-LoRA's bank: by hand, torch's fully_shard per decoder
    layer (accelerate's wrap, on the CPU over gloo) failed at the second layer ('Invariant encountered'; TinyLoRA's and
    FRoD's: 'is shared with a parameter already managed by another FSDP group'), after the model had loaded. Refused
    first, naming what is shared; without tying TinyLoRA passes (its fully_shard and a training step ran). By hand
    under ZeRO-3 on the CPU Lily and TinyLoRA train one process's adapter (3.0e-8, 5.6e-9)."""
    path = make_recipe(tmp_path, tiny_llama, number_data)
    raw = yaml.safe_load(path.read_text())
    raw["adapter"] = adapter  # (make_recipe's are LoRA's)
    path.write_text(yaml.safe_dump(raw))
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP)
    with pytest.raises(PeftkitError) as e:
        check_engine(load_recipe(path), fsdp)
    verb = "holds" if adapter["method"] == "frod" else "trains"
    assert str(e.value) == (
        f"adapter.method: {adapter['method']} {verb} {shared}, which FSDP cannot shard once per decoder layer; train "
        "it under DDP (configs/accelerate/ddp.yaml) or DeepSpeed ZeRO (configs/accelerate/zero2.yaml, zero3.yaml).")
    if adapter["method"] == "tinylora":
        raw["adapter"] = adapter | {"weight_tying": 0.0}
        path.write_text(yaml.safe_dump(raw))
        check_engine(load_recipe(path), fsdp)



def test_a_method_s_fsdp_refusal_is_said_under_fsdp_only(tiny_llama, number_data, tmp_path):
    """Method.fsdp_refusal was said under ZeRO-3 too ('adapter.method: shadow cannot train under FSDP', by hand from
    `accelerate launch --config_file configs/accelerate/zero3.yaml`), where ShadowPEFT trains: by hand, 2 processes
    under ZeRO-3 on the CPU train the adapter of 1 process x batch 8 within 1.2e-7 (2 steps, auxiliary loss 0.5).
    Under ZeRO-3 it now passes, and CPT gets DeepSpeed's own refusal."""
    zero3 = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=2, state=SimpleNamespace(
        deepspeed_plugin=SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": 3}})))
    recipes = {}
    for method, adapter in (("shadow", {"method": "shadow", "r": 4}),
                            ("cpt", {"method": "cpt", "cpt_token_ids": [5, 6, 7], "cpt_tokens_type_mask": [1, 2, 3]})):
        path = make_recipe(tmp_path / method, tiny_llama, number_data)
        raw = yaml.safe_load(path.read_text())
        raw["adapter"] = adapter
        path.write_text(yaml.safe_dump(raw))
        recipes[method] = load_recipe(path)
    check_engine(recipes["shadow"], zero3)
    with pytest.raises(PeftkitError, match="adapter.method: cpt is not supported under DeepSpeed"):
        check_engine(recipes["cpt"], zero3)
    for method in recipes:
        with pytest.raises(PeftkitError, match=f"adapter.method: {method} cannot train under FSDP"):
            check_engine(recipes[method], SimpleNamespace(distributed_type=DistributedType.FSDP, num_processes=2))

def test_an_fsdp_config_without_cuda_devices_warns_that_it_runs_ddp(tiny_llama, number_data, tmp_path, monkeypatch):
    """accelerate turns FSDP on only with CUDA devices: on a CPU `accelerate launch --config_file fsdp2.yaml` ran plain
    DDP without a word (by hand: a ShadowPEFT recipe, which FSDP refuses, trained on 2 processes, its manifest saying
    MULTI_CPU), each process holding the whole model. It now warns; a real FSDP run and a DDP config do not."""
    from peftkit.errors import PeftkitWarning

    path = make_recipe(tmp_path, tiny_llama, number_data)
    raw = yaml.safe_load(path.read_text())
    raw["adapter"] = {"method": "shadow", "r": 4}
    path.write_text(yaml.safe_dump(raw))
    recipe = load_recipe(path)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # (what accelerate's launcher sets for fsdp2.yaml)
    with pytest.warns(PeftkitWarning) as said:
        check_engine(recipe, SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=2))
    assert str(said[0].message) == (
        "The accelerate config asks for FSDP, which accelerate runs on GPUs (and other accelerators) only: these 2 "
        "processes train under plain data parallelism (MULTI_CPU), each holding the whole model, and what FSDP refuses "
        "is not checked. On a CPU launch with configs/accelerate/ddp.yaml (or peftkit train --num-processes N) to say so.")
    with pytest.raises(PeftkitError, match="adapter.method: shadow cannot train under FSDP"):
        check_engine(recipe, SimpleNamespace(distributed_type=DistributedType.FSDP, num_processes=2))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_engine(recipe, SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=2))

@gpu
def test_fsdp2_trains_the_adapter_of_a_plain_run_and_resumes_bit_identically(tiny_llama, number_data, tmp_path):
    """The FSDP2 run's adapter equals the plain run's (fp32, deterministic kernels); its checkpoints hold whole
    tensors; resuming from step 5 gives the uninterrupted run's bits."""
    from peftkit.train import train

    plain = make_recipe(tmp_path / "plain", tiny_llama, number_data, **_sections())
    train(load_recipe(plain))
    sharded = make_recipe(tmp_path / "fsdp", tiny_llama, number_data, **_sections())
    done = _launch(sharded)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    run = tmp_path / "fsdp" / "run"
    assert json.loads((run / "manifest.json").read_text())["distributed"]["type"] == "FSDP"
    one, two = _adapter(tmp_path / "plain" / "run"), _adapter(run)
    assert one.keys() == two.keys()
    assert max((one[k] - two[k]).abs().max().item() for k in one) <= 1e-5

    shutil.rmtree(run / "checkpoints" / "step-00000010")
    for leftover in ("adapter", "manifest.json"):
        shutil.rmtree(run / leftover) if (run / leftover).is_dir() else (run / leftover).unlink()
    resumed = _launch(sharded, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-6000:]
    again = _adapter(run)
    assert all(torch.equal(two[k], again[k]) for k in two)


@gpu
@pytest.mark.parametrize("adapter", [
    {"target_modules": ["q_proj", "v_proj"], "alora_invocation_tokens": "### Response:"},
    {"trainable_token_indices": [76, 85, 86]},
    {"method": "trainable_tokens", "token_indices": [76, 85, 86], "target_modules": None},
    # TinyLoRA untied (its tied v is refused: above): frozen SVD factors and P sharded with their layer beside v.
    {"method": "tinylora", "u": 4, "init_weights": "uniform"},
    # WaveFT: coefficients at seeded entries, the inverse DWT of the gathered coefficients.
    {"method": "waveft", "n_frequency": 48, "wavelet_family": "db2", "init_weights": False,
     "target_modules": ["q_proj", "v_proj", "down_proj"]},
], ids=["alora", "lora_trainable_token_indices", "trainable_tokens", "tinylora", "waveft"])
def test_fsdp2_trains_each_method_s_adapter_as_a_plain_run(adapter, tiny_llama, number_data, tmp_path):
    """aLoRA (its mask from each row's last invocation), trained embedding rows (a slice of an FSDP2-sharded
    embedding, and the rows' own parameters), TinyLoRA and WaveFT: the FSDP2 run's adapter equals the plain run's (fp32,
    deterministic). TinyLoRA's and WaveFT's entries have not run on a GPU yet (none lent when they were added); by hand
    on the CPU, torch's fully_shard per decoder layer over gloo, 2 processes x 2 rows gave one process's 4 rows'
    adapter after 3 SGD steps within 6.0e-8 and 1.2e-6 (Poly, evaluation routing with per-row tasks: 6.0e-8)."""
    from transformers import AutoTokenizer

    from peftkit.train import train

    if isinstance(adapter.get("alora_invocation_tokens"), str):
        tok = AutoTokenizer.from_pretrained(tiny_llama)
        adapter = adapter | {"alora_invocation_tokens": tok(adapter["alora_invocation_tokens"],
                                                             add_special_tokens=False)["input_ids"]}
    recipes = [make_recipe(tmp_path / name, tiny_llama, number_data, **_sections(max_steps=6, save_steps=6))
               for name in ("plain", "fsdp")]
    for recipe in recipes:  # the whole adapter section: trainable_tokens has no r, alpha or dropout
        raw = yaml.safe_load(recipe.read_text())
        raw["adapter"] = adapter if "method" in adapter else raw["adapter"] | adapter
        recipe.write_text(yaml.safe_dump(raw))
    train(load_recipe(recipes[0]))
    done = _launch(recipes[1])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    one, two = _adapter(tmp_path / "plain" / "run"), _adapter(tmp_path / "fsdp" / "run")
    assert one.keys() == two.keys()
    assert max((one[k] - two[k]).abs().max().item() for k in one) <= 1e-5



@gpu
def test_fsdp2_refuses_shadowpeft_before_the_model_loads(tiny_llama, number_data, tmp_path):
    """What a user sees who launches ShadowPEFT with configs/accelerate/fsdp2.yaml: the refusal's one line (its
    backbone is one module every targeted block reaches), said before the memory estimate and the model's loading.
    Not run yet (no GPU lent when it was added); on a CPU the config runs DDP instead, with a warning (above)."""
    recipe = make_recipe(tmp_path, tiny_llama, number_data, **_sections())
    raw = yaml.safe_load(recipe.read_text())
    raw["adapter"] = {"method": "shadow", "r": 4}
    recipe.write_text(yaml.safe_dump(raw))
    done = _launch(recipe)
    said = " ".join((done.stdout + done.stderr).split())
    assert done.returncode != 0
    assert ("error: adapter.method: shadow cannot train under FSDP: its backbone is one module every targeted block "
            "reaches (the trunk)") in said, said[-3000:]
    assert "Memory estimate" not in said and not (tmp_path / "run" / "manifest.json").exists()

@gpu
def test_fsdp2_qlora_with_float_quant_storage(tiny_llama, number_data, tmp_path):
    """QLoRA under FSDP2 (4-bit weights stored as bfloat16, so FSDP can shard them): it trains, and the exported
    adapter evaluates in `peftkit eval` to the run's own final eval loss."""
    quant = {"method": "nf4", "double_quant": True, "compute_dtype": "bfloat16", "quant_storage": "bfloat16"}
    recipe = make_recipe(tmp_path, tiny_llama, number_data, quantization=quant,
                         **_sections(max_steps=20, save_steps=10, lr=5e-3, mixed_precision="bf16", deterministic=False))
    done = _launch(recipe)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    final = json.loads((tmp_path / "run" / "manifest.json").read_text())["metrics"]["eval_loss"]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses[-1] < losses[0]
    out = tmp_path / "eval.json"
    ev = subprocess.run([sys.executable, "-m", "peftkit", "eval", "--model", str(tiny_llama), "--adapter",
                         str(tmp_path / "run" / "adapter"), "--data", str(number_data["eval"]), "--format", "alpaca",
                         "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stdout[-3000:] + ev.stderr[-3000:]
    assert abs(json.loads(out.read_text())["loss"] - final) <= 1e-3 * final


def test_verify_relaunches_fsdp_runs_as_the_shipped_config():
    """`peftkit verify` re-runs an FSDP run through launcher flags (the package ships no configs folder): they say
    what configs/accelerate/fsdp2.yaml says; a data-parallel run goes back to --multi_gpu."""

    from peftkit.launch import launch_command

    command = launch_command(1, ["train", "r.yaml"], "FSDP")
    flags = dict(zip(command[command.index("--fsdp_version")::2], command[command.index("--fsdp_version") + 1::2]))
    shipped = yaml.safe_load(Path(FSDP2).read_text())["fsdp_config"]
    for key, value in shipped.items():
        if key != "fsdp_activation_checkpointing":  # off in both: the recipe's gradient_checkpointing decides
            assert flags[f"--{key}"].lower() == str(value).lower(), key
    assert "--use_fsdp" in command and "--multi_gpu" not in command
    assert "--multi_gpu" in launch_command(2, ["train", "r.yaml"]) and "--use_fsdp" not in launch_command(2, ["x"])
    for kind in ("MULTI_GPU", "FSDP", "DEEPSPEED"):  # a free port each, not torch's 29500 (two runs at once collided)
        command = launch_command(2, ["train", "r.yaml"], kind)
        assert command[command.index("--main_process_port") + 1] == "0"
