"""training.compile: the training step through torch.compile gives the eager step's numbers."""

import json

import torch
from safetensors.torch import load_file

from peftkit.recipe import load_recipe
from peftkit.train import train
from tests.conftest import make_recipe


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_compiled_training_matches_eager(number_data, tmp_path):
    """aot_eager (graph capture and the compiled autograd, no code generation: fast enough for CI) trains the
    eager run's adapter; the compile really happened (dynamo made graphs), and the step is whole: no graph break
    (the CPU fast path's thread check and the loss's masked rows once made one in every layer and in the loss).
    One layer, LoRA on q_proj and v_proj: tracing time grows with the graph (31 s for 2 layers all-linear, 17 s)."""
    from torch._dynamo.utils import counters

    from peftkit.tiny import build_tiny_model

    model = tmp_path / "one-layer"
    build_tiny_model(model, arch="llama", hidden_size=32, num_layers=1, seed=0)
    sections = dict(training={"max_steps": 3, "batch_size": 4}, eval={"base_model": False},
                    adapter={"target_modules": ["q_proj", "v_proj"]})
    train(load_recipe(make_recipe(tmp_path / "eager", model, number_data, **sections)))
    counters.clear()
    sections["training"]["compile"] = "aot_eager"
    train(load_recipe(make_recipe(tmp_path / "compiled", model, number_data, **sections)))
    assert counters["stats"]["unique_graphs"] > 0
    assert not counters["graph_break"], dict(counters["graph_break"])
    eager, compiled = tmp_path / "eager" / "run", tmp_path / "compiled" / "run"
    assert max(abs(a - b) for a, b in zip(_losses(eager), _losses(compiled), strict=True)) <= 1e-5
    one, two = (load_file(r / "adapter" / "adapter_model.safetensors") for r in (eager, compiled))
    assert max((one[k] - two[k]).abs().max().item() for k in one) <= 1e-5
    torch._dynamo.reset()
