"""The optimizer's parameter groups: LoRA+ (training.loraplus_lr_ratio) with every optimizer peftkit offers."""

import json
import os
from typing import get_args

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM

from peftkit.adapters import adapter_layers, inject_adapters
from peftkit.errors import PeftkitError
from peftkit.methods.lora import LoraConfig
from peftkit.recipe import TrainingConfig, load_recipe
from peftkit.runtime import build_optimizer, inference_autocast, lr_lambda, optimizer_groups, under_autocast
from tests.conftest import make_recipe

IDS = torch.tensor([[1, 40, 41, 42, 7, 60, 61, 62]])
OPTIMIZERS = get_args(TrainingConfig.model_fields["optimizer"].annotation)


def _injected(path, **adapter):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(0)
    inject_adapters(model, LoraConfig(r=4, alpha=8, **adapter))
    return model


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_loraplus_groups_with_every_optimizer(optimizer, tiny_llama):
    """B at ratio x lr, A at lr, an embedding's LoRA at loraplus_lr_embedding, DoRA's magnitude at lr; the
    scheduler scales every group alike; weight decay is training.weight_decay everywhere."""
    model = _injected(tiny_llama, use_dora=False, target_modules=["q_proj", "down_proj", "embed_tokens"])
    cfg = TrainingConfig(optimizer=optimizer, lr=1e-3, weight_decay=0.01, loraplus_lr_ratio=16,
                         loraplus_lr_embedding=3e-6, scheduler="linear", max_steps=4)
    opt = build_optimizer(cfg, optimizer_groups(cfg, model), torch.device("cpu"), Console(quiet=True))
    groups = {g["loraplus"]: g for g in opt.param_groups}
    assert {role: g["lr"] for role, g in groups.items()} == {"A": 1e-3, "B": 16e-3, "embedding": 3e-6}
    assert all(g["weight_decay"] == 0.01 for g in opt.param_groups)
    layers = adapter_layers(model)
    expected = {"A": [layers["model.layers.0.self_attn.q_proj"].lora_A.weight],
                "B": [layers["model.layers.0.self_attn.q_proj"].lora_B.weight],
                "embedding": [layers["model.embed_tokens"].lora_embedding_A]}
    for role, params in expected.items():
        assert all(any(p is q for q in groups[role]["params"]) for p in params), role
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in model.parameters())

    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, 4))
    model(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()
    scheduler.step()
    factor = lr_lambda(cfg, 4)(1)
    assert groups["B"]["lr"] == pytest.approx(16e-3 * factor) and groups["A"]["lr"] == pytest.approx(1e-3 * factor)


def test_loraplus_steps_apply_each_groups_lr(tiny_llama):
    """SGD without decay: each tensor moves by exactly -lr_of_its_group x grad (an independent check that the
    groups' rates are the ones used); DoRA's magnitude and a saved module train at lr."""
    model = _injected(tiny_llama, use_dora=True, target_modules=["q_proj"], modules_to_save=["lm_head"])
    cfg = TrainingConfig(optimizer="sgd", lr=0.1, loraplus_lr_ratio=16)
    opt = build_optimizer(cfg, optimizer_groups(cfg, model), torch.device("cpu"), Console(quiet=True))
    layer = adapter_layers(model)["model.layers.0.self_attn.q_proj"]
    torch.nn.init.normal_(layer.lora_B.weight, std=0.1)  # a nonzero B, so A gets a gradient
    tensors = {"A": layer.lora_A.weight, "B": layer.lora_B.weight, "m": layer.lora_magnitude_vector,
               "head": model.lm_head.weight}
    before = {k: t.detach().clone() for k, t in tensors.items()}
    model(input_ids=IDS, labels=IDS).loss.backward()
    grads = {k: t.grad.clone() for k, t in tensors.items()}
    opt.step()
    for key, lr in {"A": 0.1, "B": 1.6, "m": 0.1, "head": 0.1}.items():
        torch.testing.assert_close(tensors[key].detach(), before[key] - lr * grads[key], rtol=0, atol=1e-7)


@pytest.mark.parametrize("loraplus", [None, 16])
def test_biases_and_norms_get_no_weight_decay_as_in_trainer(loraplus, tiny_gpt2):
    """One weight_decay for every group decayed a trained norm's scale (and biases) toward 0, where transformers'
    Trainer leaves them out: the groups now follow Trainer.get_decay_parameter_names, taken here as the reference."""
    from transformers import Trainer

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2, dtype=torch.float32)
    inject_adapters(model, LoraConfig(r=4, alpha=8, target_modules=["c_attn"], modules_to_save=["ln_f"]))
    cfg = TrainingConfig(lr=1e-3, weight_decay=0.5, loraplus_lr_ratio=loraplus)
    opt = build_optimizer(cfg, optimizer_groups(cfg, model), torch.device("cpu"), Console(quiet=True))
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    trainer_decays = set(Trainer.get_decay_parameter_names(None, model))
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trained if "ln_f" in n} and {n for n in trained if "lora_" in n}  # both kinds are there
    assert {name: decay[id(p)] for name, p in trained.items()} == {
        name: 0.5 if name in trainer_decays else 0.0 for name in trained}
    assert optimizer_groups(TrainingConfig(lr=1e-3, loraplus_lr_ratio=loraplus), model)[0].get("weight_decay") is None


def test_a_bottleneck_adapters_trained_norms_get_no_weight_decay(tiny_gpt2, tiny_llama):
    """train_norms wraps each norm, so its trained weight sat in no nn.LayerNorm, and GPT-2's ln_1/ln_2/ln_f.norm_weight
    matched no name pattern either: they decayed toward 0 (Llama's *_layernorm.norm_weight did not), where the README
    says normalisation weights are left out, as Trainer leaves out a norm it trains."""
    from peftkit.methods.bottleneck import BottleneckConfig

    for path in (tiny_gpt2, tiny_llama):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        inject_adapters(model, BottleneckConfig(method="bottleneck", train_norms=True))
        cfg = TrainingConfig(lr=1e-3, weight_decay=0.5)
        decay = {id(p): g.get("weight_decay", 0.5) for g in optimizer_groups(cfg, model) for p in g["params"]}
        trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
        assert {n for n in trained if n.endswith("norm_weight")}, path.name
        assert {name: decay[id(p)] for name, p in trained.items()} == {
            name: 0.0 if ".norm_" in name or name.endswith("bias") else 0.5 for name in trained}, path.name


def test_the_logged_lr_is_training_lr_whatever_group_comes_first(tiny_llama, number_data, tmp_path):
    """With LoRA+ on the embeddings, their group (loraplus_lr_embedding, 1e-6) came first and its rate was logged,
    and shown on the progress line and the report's plot, as the run's learning rate."""
    from peftkit.train import train

    recipe = make_recipe(tmp_path, tiny_llama, number_data,
                         adapter={"r": 4, "alpha": 8, "target_modules": ["embed_tokens", "q_proj"]},
                         training={"max_steps": 2, "lr": 1e-3, "warmup_steps": 0, "scheduler": "constant",
                                   "loraplus_lr_ratio": 16, "log_steps": 1}, eval={"base_model": False})
    train(load_recipe(recipe))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["lr"] for line in lines if "lr" in line] == [1e-3, 1e-3]


def test_an_8bit_optimizer_keeps_32bit_state_for_trained_embeddings(tmp_path):
    """As transformers' Trainer has bitsandbytes do (optim_bits 32 for every nn.Embedding): an embedding trained in
    full (modules_to_save) kept uint8 moments, which Trainer avoids for stability."""
    from peftkit.tiny import build_tiny_model

    model = build_tiny_model(hidden_size=64)[0]  # an embedding of 102 x 64 values: above bitsandbytes' 4096 floor
    inject_adapters(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens"]))
    cfg = TrainingConfig(optimizer="adamw_8bit", lr=1e-3)
    opt = build_optimizer(cfg, optimizer_groups(cfg, model), torch.device("cpu"), Console(quiet=True), model)
    model(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()
    embedding = model.get_input_embeddings().weight
    assert embedding.requires_grad and embedding.numel() > 4096
    assert opt.state[embedding]["state1"].dtype == torch.float32


def test_without_loraplus_one_group(tiny_llama):
    model = _injected(tiny_llama)
    groups = optimizer_groups(TrainingConfig(), model)
    assert len(groups) == 1 and "lr" not in groups[0]


@pytest.mark.parametrize("method", ["ia3", "adalora"])
def test_loraplus_refused_for_methods_other_than_lora(method, tiny_llama, number_data, tmp_path):
    """AdaLoRA has A and B matrices too, but LoRA+ is LoRA's: the message does not say it has none."""
    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"loraplus_lr_ratio": 16})
    recipe.write_text(recipe.read_text().replace("  r: 4\n  alpha: 8\n", f"  method: {method}\n"))
    with pytest.raises(PeftkitError) as info:
        load_recipe(recipe)
    message = str(info.value)
    assert "training.loraplus_lr_ratio" in message and "for adapter.method: lora" in message
    assert f"only, not {method}" in message and "remove training.loraplus_lr_ratio" in message


@pytest.mark.parametrize(("setting", "device", "expected"), [
    ("no", "cuda", None), ("bf16", "cuda", torch.bfloat16), ("fp16", "cuda", torch.float16),
    ("bf16", "cpu", None), ("fp16", "cpu", None), ("auto", "cpu", None),  # a GPU recipe evaluates on a CPU as is
])
def test_inference_runs_under_training_s_autocast_on_cuda_only(setting, device, expected):
    assert inference_autocast(setting, torch.device(device)) is expected


def test_eval_and_generate_models_run_under_the_recipe_s_autocast(tiny_llama, number_data, tmp_path):
    """`peftkit eval`/`generate`/`chat` load the model of a recipe (or run directory) with the recipe's
    training.mixed_precision, and run its forward under that autocast, as the run's own evaluations did: here
    bf16 autocast on the CPU stands in for the GPU's; the wrapped forward gives an autocast forward's logits."""
    from peftkit.eval_job import eval_job
    from peftkit.inference import model_source

    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"mixed_precision": "fp16"})
    assert model_source(recipe, [], None, None, False, "generate")[0].mixed_precision == "fp16"
    job = eval_job(recipe, ["training.mixed_precision=no"], None, None, None, None, None, None, None, False, None,
                   None, None, None, None)
    assert job.source.mixed_precision == "no"
    # Without a recipe: the weights' dtype, and --set (which would change nothing) is an error, not ignored.
    assert model_source(None, [], str(tiny_llama), None, False, "generate")[0].mixed_precision == "no"
    with pytest.raises(PeftkitError, match=r"--set training.mixed_precision=bf16: --set changes keys of a recipe"):
        model_source(None, ["training.mixed_precision=bf16"], str(tiny_llama), None, False, "generate")
    with pytest.raises(PeftkitError, match="this `peftkit eval` has none. Give a RECIPE or run directory first"):
        eval_job(None, ["eval.batch_size=2"], str(tiny_llama), str(number_data["eval"]), None, None, None, None, None,
                 False, None, None, None, None, None)
    ids = torch.tensor([[5, 9, 3, 7, 2]])
    model = under_autocast(AutoModelForCausalLM.from_pretrained(tiny_llama), torch.bfloat16, torch.device("cpu"))
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(ids).logits
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.dtype == torch.bfloat16 and torch.equal(logits, expected)
    assert not torch.equal(logits.float(), reference(ids).logits)  # not the fp32 forward's


# ------------------------------------------------------------------ GPU-only decisions, taken on the CPU's side
# What a GPU answers to torch.cuda's queries is set here: the decisions on those answers are what is tested.


def _gpu(monkeypatch, name: str, capability: tuple[int, int]) -> torch.device:
    """torch.cuda answering as `name` would: bf16 "supported" (torch counts emulation), its compute capability."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.version, "hip", None)
    return torch.device("cuda", 0)


@pytest.mark.parametrize(("name", "capability", "native"), [
    ("Tesla T4", (7, 5), False), ("Tesla V100-SXM2-16GB", (7, 0), False), ("NVIDIA A100-SXM4-40GB", (8, 0), True),
    ("NVIDIA H100 80GB HBM3", (9, 0), True)])
def test_auto_precision_is_bf16_only_where_the_gpu_computes_it_natively(name, capability, native, monkeypatch,
                                                                         tiny_llama, number_data, tmp_path):
    """torch.cuda.is_bf16_supported() says yes on a T4 or V100, which only emulate bf16 (several times slower):
    mixed_precision: auto trains there in fp32, evaluations run without autocast, and a recipe's bfloat16 is
    noted as emulated; on Ampere and later, bf16."""
    from peftkit.runtime import emulated_bf16_note, mixed_precision

    device = _gpu(monkeypatch, name, capability)
    assert mixed_precision(TrainingConfig(), device) == ("bf16" if native else "no")
    assert inference_autocast("auto", device) is (torch.bfloat16 if native else None)
    recipe = load_recipe(make_recipe(tmp_path, tiny_llama, number_data, quantization={"method": "nf4"}))
    note = emulated_bf16_note(recipe, device)  # quantization.compute_dtype's default is bfloat16
    if native:
        assert note is None
    else:
        assert note.startswith(f"quantization.compute_dtype: bfloat16 on {name} (compute capability "
                               f"{capability[0]}.{capability[1]}; native from 8.0) is emulated")
        assert "float16" in note.split("is emulated")[1]
    assert emulated_bf16_note(load_recipe(make_recipe(tmp_path, tiny_llama, number_data)), device) is None  # fp32


def test_deterministic_runs_ask_flash_attention_for_its_deterministic_backward(monkeypatch):
    """flash-attn's kernels are outside torch's deterministic switch; transformers passes them
    deterministic=True when FLASH_ATTENTION_DETERMINISTIC is 1. A CPU run is deterministic on a GPU machine too."""
    from peftkit.runtime import seed_everything

    monkeypatch.delenv("FLASH_ATTENTION_DETERMINISTIC", raising=False)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        seed_everything(0, deterministic_cuda=False, device=torch.device("cuda"))
        assert "FLASH_ATTENTION_DETERMINISTIC" not in os.environ and not torch.are_deterministic_algorithms_enabled()
        seed_everything(0, deterministic_cuda=True, device=torch.device("cuda"))
        assert os.environ["FLASH_ATTENTION_DETERMINISTIC"] == "1"
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, the run on its CPU
        seed_everything(0, deterministic_cuda=False, device=torch.device("cpu"))
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert "FLASH_ATTENTION_DETERMINISTIC" not in os.environ  # a later run in the process: flash-attn's fast backward
        os.environ["FLASH_ATTENTION_DETERMINISTIC"] = "1"  # the user's own is left alone
        seed_everything(0, deterministic_cuda=True, device=torch.device("cuda"))
        seed_everything(0, deterministic_cuda=False, device=torch.device("cuda"))
        assert os.environ["FLASH_ATTENTION_DETERMINISTIC"] == "1"
    finally:
        monkeypatch.undo()
        seed_everything(0, deterministic_cuda=False)


def test_determinism_asked_after_cuda_started_notes_that_cublas_may_not_follow(monkeypatch):
    """torch reads CUBLAS_WORKSPACE_CONFIG once, at its first cuBLAS call: `peftkit train` sets it before the
    Accelerator (which starts CUDA with several processes). Set where CUDA had started already (a notebook), it
    passes torch's check but may not reach cuBLAS: the note says how to set it in time. Set before, with CUDA not
    started, for a run on the CPU or without training.deterministic, there is nothing to say."""
    from peftkit.runtime import pin_cublas_workspace

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert pin_cublas_workspace(True, "cpu") is None and pin_cublas_workspace(False, "auto") is None
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    note = pin_cublas_workspace(True, "auto")
    assert note.startswith("training.deterministic: CUDA was already in use in this process")
    assert "set CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment before Python starts" in note
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # torch's check passes: the run goes on
    assert pin_cublas_workspace(True, "cuda") is None  # (set before)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert pin_cublas_workspace(True, "cuda") is None and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_fp16_mixed_precision_refuses_parameters_that_would_train_in_float16(tiny_llama):
    """A checkpoint stored in float16 under model.dtype: auto gives modules_to_save copies in float16, whose
    gradients fp16's loss scaler cannot unscale (torch: "Attempting to unscale FP16 gradients", at step 1)."""
    from peftkit.runtime import check_fp16_gradients

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float16)
    inject_adapters(model, LoraConfig(r=4, alpha=8, modules_to_save=["lm_head"]))
    with pytest.raises(PeftkitError) as e:
        check_fp16_gradients(model, "fp16")
    assert str(e.value).startswith("training.mixed_precision: fp16 unscales fp32 gradients only, and lm_head.")
    assert "would train in float16" in str(e.value) and "Set model.dtype: float32" in str(e.value)
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):  # what it stands for (torch's)
        param = next(p for p in model.parameters() if p.requires_grad and p.dtype == torch.float16)
        param.grad = torch.ones_like(param)
        scaler = torch.amp.GradScaler("cpu")
        scaler.scale(torch.ones(()))  # (its scale is made at the first loss it scales)
        scaler.unscale_(torch.optim.SGD([param]))
    check_fp16_gradients(model, "bf16")  # bf16 autocast has no scaler
    check_fp16_gradients(_injected(tiny_llama, modules_to_save=["lm_head"]), "fp16")  # float32 copies
