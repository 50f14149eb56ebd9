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


def test_a_compiled_step_keeps_every_position_in_one_graph(tmp_path):
    """The output head's trimming (`peftkit.loss.trimmed_head`) is off inside a compiled step
    (torch.compiler.is_compiling): two micro-batches whose loss reads from positions 2 and 4 on run one graph with no
    break, their losses and gradients the eager step's, which trims (within 1e-5: the compiled loss sums every
    position's cross-entropy, the eager one the picked rows'), and under compile trimmed_head gives the labels whole
    and no logits_to_keep. Dynamo's own backend (eager): the capture is where is_compiling holds, and it is 3x
    faster than aot_eager (4 s), whose autograd the test above runs."""
    from torch._dynamo.utils import counters

    from peftkit.adapters import inject_adapters
    from peftkit.data import IGNORE_INDEX
    from peftkit.evaluate import token_loss_sum
    from peftkit.loss import labelled_count, on_device, trimmed_head
    from peftkit.methods.lora import LoraConfig
    from peftkit.start import compiled
    from peftkit.tiny import build_tiny_model
    from tests.conftest import load_fp32, random_adapters

    build_tiny_model(tmp_path / "one-layer", arch="llama", hidden_size=32, num_layers=1, seed=0)
    model = load_fp32(tmp_path / "one-layer")
    inject_adapters(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    random_adapters(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.tensor([[1, 5, 9, 4, 7, 3, 8, 2], [6, 2, 8, 1, 4, 9, 5, 0]])
    mask = (ids != 0).long()
    batches = []
    for prompts in [(3, 5), (5, 6)]:
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        for row, prompt in enumerate(prompts):
            labels[row, :prompt] = IGNORE_INDEX
        batches.append(on_device({"input_ids": ids, "attention_mask": mask, "labels": labels}, torch.device("cpu")))
    assert [b["logits_from"] for b in batches] == [2, 4]
    torch._dynamo.reset()
    counters.clear()
    step = compiled(token_loss_sum, "eager")
    try:
        for batch in batches:
            labelled = labelled_count(batch["labels"])
            runs = [fn(model, batch, labelled)[0] for fn in (token_loss_sum, step)]
            (eager, ours) = [torch.autograd.grad(loss, params) for loss in runs]
            assert abs(float(runs[0].detach() - runs[1].detach())) <= 1e-5
            assert max(float((a - b).abs().max()) for a, b in zip(eager, ours)) <= 1e-5
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["stats"])
        kept = torch.compile(lambda b: trimmed_head(model, b), backend="eager", fullgraph=True)(batches[1])
        assert kept[0] == {} and torch.equal(kept[1], batches[1]["labels"])
    finally:
        torch._dynamo.reset()
