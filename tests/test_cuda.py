"""On a GPU (skipped elsewhere; scripts/gpu_check.sh runs it): each method's training run on CUDA gives the adapter
and the eval loss of the same recipe run on the CPU. Both train in fp32 with deterministic kernels, so what differs
is the order of the floating-point sums: the adapters agree to 1e-4, the eval losses to 1e-5 relative. The CPU
suite compares every method with peft and a dense reference; this file checks that the CUDA paths (the layers'
devices, the methods' own tensors made on the GPU, KaSA's SVD, VeLoRA's projections and its random start, the MoE
experts' updates) compute the same thing. (X-LoRA and CPT need experts and a context: not here yet.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from peftkit.recipe import load_recipe
from peftkit.train import train
from tests.conftest import make_recipe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

METHODS = {
    "lora": {"target_modules": "all-linear"},
    "dora": {"target_modules": "all-linear", "use_dora": True},
    "kasa": {"target_modules": "all-linear", "kasa_config": {"beta": 1e-4, "gamma": 1e-3}},
    "velora": {"target_modules": "all-linear", "velora_config": {"num_groups": 16, "init_type": "batch_average"}},
    "velora_random": {"target_modules": "all-linear", "velora_config": {"num_groups": 16, "init_type": "random"}},
    "bdlora": {"target_modules": ["q_proj", "v_proj", "o_proj"],
               "use_bdlora": {"target_modules_bd_a": ["o_proj"], "target_modules_bd_b": ["q_proj", "v_proj"],
                              "nblocks": 2}},
    "lora_fa": {"target_modules": "all-linear", "lora_fa": True},
    "alora": {"target_modules": ["q_proj", "v_proj"], "alora_invocation_tokens": "### Response:"},
    "trainable_token_indices": {"target_modules": ["q_proj", "v_proj"], "trainable_token_indices": [76, 85, 86]},
    "trainable_tokens": {"method": "trainable_tokens", "token_indices": [76, 85, 86], "target_modules": None},
    "ia3": {"method": "ia3"},
    "loha": {"method": "loha", "r": 4, "alpha": 8},
    "lokr": {"method": "lokr", "r": 4, "alpha": 8},
    "vera": {"method": "vera", "r": 8},
    "oft": {"method": "oft", "r": 4},
    "prompt_tuning": {"method": "prompt_tuning", "num_virtual_tokens": 4},
    "prefix_tuning": {"method": "prefix_tuning", "num_virtual_tokens": 4},
    "moe": {"target_modules": ["q_proj", "v_proj"], "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]},
    # The methods added since (each checked here on the CPU half only: no GPU has run them yet). Those whose start is
    # an SVD (PSOFT, TinyLoRA, OSF, FRoD, AdaMSS's) may start otherwise on CUDA (a decomposition's signs): what this
    # finds there is to read before it is to mend. Poly is left out: its routing samples come from the device's RNG.
    "fourierft": {"method": "fourierft", "n_frequency": 50, "scaling": 10.0},
    "randlora": {"method": "randlora", "r": 4},
    "vblora": {"method": "vblora", "num_vectors": 12, "vector_length": 8},
    "hra": {"method": "hra", "r": 4},
    "boft": {"method": "boft", "boft_block_size": 4},
    "ln_tuning": {"method": "ln_tuning"},
    "miss": {"method": "miss", "r": 4},
    "delora": {"method": "delora", "r": 4},
    "road": {"method": "road", "group_size": 8},
    "hira": {"method": "hira", "r": 4},
    "c3a": {"method": "c3a", "block_size": 16},
    "shira": {"method": "shira", "r": 4},
    "beft": {"method": "beft"},
    "supertuning": {"method": "supertuning"},
    "gralora": {"method": "gralora", "r": 4, "gralora_k": 2},
    "deft": {"method": "deft", "r": 4},
    "peanut": {"method": "peanut", "r": 4},
    "pvera": {"method": "pvera", "r": 8, "generator_seed": 1},  # (its noise drawn on the CPU, then moved)
    "tinylora": {"method": "tinylora"},
    "psoft": {"method": "psoft", "r": 4},
    "glora": {"method": "glora", "r": 4},
    "unilora": {"method": "unilora", "r": 4},
    "lily": {"method": "lily", "r": 4},
    "osf": {"method": "osf"},
    "frod": {"method": "frod", "sparse_rate": 0.05},
    "waveft": {"method": "waveft", "n_frequency": 64, "wavelet_family": "sym2"},
    "adamss": {"method": "adamss", "r": 8, "num_subspaces": 2},
    "shadow": {"method": "shadow", "r": 4, "shadow_dropout": 0.0},
    "cartridge": {"method": "cartridge", "num_virtual_tokens": 4},
    "p_tuning": {"method": "p_tuning", "num_virtual_tokens": 4},
    "multitask_prompt_tuning": {"method": "multitask_prompt_tuning", "num_virtual_tokens": 4, "num_tasks": 2,
                                "num_ranks": 2},
    "llama_adapter": {"method": "llama_adapter", "adapter_len": 4},
    "adalora": {"method": "adalora", "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1, "deltaT": 1},
}


def _run(root: Path, model: Path, data: dict, adapter: dict, device: str) -> tuple[dict, float]:
    recipe = make_recipe(root / device, model, data, training={"max_steps": 6, "deterministic": True},
                         eval={"base_model": False})
    raw = yaml.safe_load(recipe.read_text())
    raw["model"]["device"] = device
    plain = "method" in adapter and adapter["method"] not in ("lora",)
    raw["adapter"] = adapter if plain else {"r": 4, "alpha": 8, "dropout": 0.0} | adapter
    recipe.write_text(yaml.safe_dump(raw))
    train(load_recipe(recipe))
    run = root / device / "run"
    loss = json.loads((run / "manifest.json").read_text())["metrics"]["eval_loss"]
    return load_file(run / "adapter" / "adapter_model.safetensors"), loss


@pytest.mark.parametrize("name", list(METHODS))
def test_a_method_trains_on_cuda_as_on_the_cpu(name, tiny_llama, number_data, tmp_path):
    from transformers import AutoTokenizer

    from peftkit.tiny import build_tiny_model

    adapter, model = dict(METHODS[name]), tiny_llama
    if name == "moe":
        model = tmp_path / "mixtral"
        build_tiny_model(model, arch="mixtral", hidden_size=32, num_layers=2, seed=0)
    if isinstance(adapter.get("alora_invocation_tokens"), str):
        tok = AutoTokenizer.from_pretrained(model)
        invocation = tok(adapter["alora_invocation_tokens"], add_special_tokens=False)
        adapter["alora_invocation_tokens"] = invocation["input_ids"]
    cpu, cpu_loss = _run(tmp_path, model, number_data, adapter, "cpu")
    cuda, cuda_loss = _run(tmp_path, model, number_data, adapter, "cuda")
    assert cpu.keys() == cuda.keys()
    moved = max((cpu[k] - cuda[k]).abs().max().item() for k in cpu)
    assert moved <= 1e-4, moved
    assert cuda_loss == pytest.approx(cpu_loss, rel=1e-5)



def _trains_without_a_host_sync(layer, x: torch.Tensor) -> None:
    """`layer`'s training forward and backward on `x` under torch's sync check (after a first forward, which may
    make its device tables), its gradients finite."""
    layer.train()(x).sum().backward()
    layer.zero_grad()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x).square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.requires_grad)


def test_a_boft_layer_trains_without_a_host_sync():
    """A BOFT layer's training forward and backward (block dropout on) queue their work without waiting for the GPU:
    `torch.linalg.solve` read its singularity check on the host, and the dropout's indices were drawn on the CPU and
    copied over, each a sync per layer per micro-batch. Its outputs are the CPU layer's (eval mode: no dropout)."""
    from torch import nn

    from peftkit.methods.boft import Boft, BoftConfig

    torch.manual_seed(0)
    cfg = BoftConfig(method="boft", boft_block_size=4, boft_n_butterfly_factor=2, boft_dropout=0.5)
    cpu = Boft.wrap(nn.Linear(16, 8), cfg, "layer")
    Boft.randomize(cpu, torch.Generator().manual_seed(0), 0.3)
    layer = Boft.wrap(nn.Linear(16, 8), cfg, "layer").cuda()
    layer.load_state_dict(cpu.state_dict())
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert (layer.eval()(x.cuda()).cpu() - cpu.eval()(x)).abs().max() <= 1e-5
    _trains_without_a_host_sync(layer, x.cuda())


def test_an_oft_layer_of_the_exact_cayley_transform_trains_without_a_host_sync():
    """OFT with use_cayley_neumann: false solves (I + Q) R = I - Q in every forward: `torch.linalg.solve` read its
    singularity check on the host, a sync per layer per micro-batch. Its outputs are the CPU layer's."""
    from torch import nn

    from peftkit.methods.oft import Oft, OftConfig

    torch.manual_seed(0)
    cfg = OftConfig(method="oft", r=4, use_cayley_neumann=False)
    cpu = Oft.wrap(nn.Linear(16, 8), cfg, "layer")
    Oft.randomize(cpu, torch.Generator().manual_seed(0), 0.3)
    layer = Oft.wrap(nn.Linear(16, 8), cfg, "layer").cuda()
    layer.load_state_dict(cpu.state_dict())
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert (layer.eval()(x.cuda()).cpu() - cpu.eval()(x)).abs().max() <= 1e-5
    _trains_without_a_host_sync(layer, x.cuda())
