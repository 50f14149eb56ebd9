"""Poly / MHR (method: poly) against HF peft 0.21.2's Poly: from one seed peft's A, B and routing logits and the
generator where peft's ends; outputs with per-row tasks, a training forward's relaxed-Bernoulli sample and every
gradient bit for bit; peft's adapter evaluated, scored and generated with per-row tasks as peft does, and peft loading
our export; the shipped recipe on rows with a `task` column; the refusals by text. The conformance battery
(tests/test_methods.py) checks the rest."""

from __future__ import annotations

import json
from dataclasses import replace

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import AutoTokenizer

from peftkit.adapter_base import load_adapted_model
from peftkit.adapters import adapter_layers, inject_adapters
from peftkit.errors import PeftkitError
from peftkit.methods.poly import PolyConfig, PolyLinear
from tests.conftest import load_fp32 as _load  # (float32, eval mode)
from tests.conftest import cli_user_error, method_recipe, train_shipped_recipe

IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])
TASKS = torch.tensor([2, 0])
SETTINGS = {"r": 4, "n_tasks": 3, "n_skills": 3, "n_splits": 2, "init_weights": False,
            "target_modules": ["q_proj", "v_proj", "down_proj"]}


def _peft_named(model) -> dict[str, torch.Tensor]:
    return {n.replace("base_model.model.", "").replace(".default", ""): p for n, p in model.named_parameters()
            if p.requires_grad}


def _both(tiny_llama, **settings) -> tuple[torch.nn.Module, torch.nn.Module]:
    """peft's model and ours from seed 0 (the generator ends where peft's does: checked)."""
    torch.manual_seed(0)
    theirs = get_peft_model(_load(tiny_llama), peft.PolyConfig(task_type="CAUSAL_LM", **SETTINGS | settings))
    after_peft = torch.get_rng_state()
    torch.manual_seed(0)
    ours = _load(tiny_llama)
    inject_adapters(ours, PolyConfig(method="poly", **SETTINGS | settings))
    assert torch.equal(torch.get_rng_state(), after_peft)
    return theirs.eval(), ours.eval()  # (peft's PeftModel trains after get_peft_model: its routing samples)


def _saved_peft(tiny_llama, directory) -> torch.nn.Module:
    """peft's Poly model (`_both`'s) moved off its init (0.3 N(0, 1) on every trained tensor), saved to `directory`."""
    theirs, _ = _both(tiny_llama)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape))
    theirs.save_pretrained(directory)
    return theirs


def test_draws_outputs_samples_and_gradients_are_peft_s(tiny_llama):
    """One seed: peft's A, B (kaiming-uniform with init_weights false) and logits bit for bit; the eval forward with
    each row's task, and a training forward (a relaxed-Bernoulli sample per layer, in peft's draw order) with every
    gradient, bit for bit. Row 0's task changes its logits, not row 1's; no task ids is task 0 for every row."""
    theirs, model = _both(tiny_llama)
    ours, peft_s = {n: p for n, p in model.named_parameters() if p.requires_grad}, _peft_named(theirs)
    assert ours.keys() == peft_s.keys() and len(ours) == 3 * 3 * 2  # A, B and logits of 3 targets x 2 layers
    assert all(torch.equal(ours[n], peft_s[n]) for n in ours)
    with torch.no_grad():
        mine = model(input_ids=IDS, task_ids=TASKS).logits
        assert torch.equal(mine, theirs(input_ids=IDS, task_ids=TASKS).logits)
        other = model(input_ids=IDS, task_ids=torch.tensor([1, 0])).logits
        assert (other[0] - mine[0]).abs().max() > 1e-4 and torch.equal(other[1], mine[1])
        zeros = torch.zeros(2, dtype=torch.long)
        assert torch.equal(model(input_ids=IDS).logits, theirs(input_ids=IDS, task_ids=zeros).logits)
        with pytest.raises(PeftkitError, match="1 task ids for a batch of 2 rows: give each row one"):
            model(input_ids=IDS, task_ids=torch.tensor([1]))
    model.train(), theirs.train()
    torch.manual_seed(5)
    mine = model(input_ids=IDS, task_ids=TASKS).logits
    torch.manual_seed(5)
    expected = theirs(input_ids=IDS, task_ids=TASKS).logits
    assert torch.equal(mine, expected)
    mine.square().mean().backward()
    expected.square().mean().backward()
    assert all(torch.equal(ours[n].grad, peft_s[n].grad) for n in ours)
    assert ours["model.layers.0.self_attn.q_proj.poly_router.module_logits"].grad[1].abs().max() == 0  # no row's task


def test_peft_s_adapter_evaluates_generates_and_peft_loads_ours(tiny_llama, tmp_path):
    """peft's adapter of 3 tasks: peft's logits for each row's task, the loss summed over a batch with a `task` column
    (`token_loss_sum`, as training and `peftkit eval` score it), greedy generation with each row's task at every step
    (peft's generate with task_ids); inspect's trained count; merging refused by text. peft loads our export of it with
    our logits."""
    from peftkit.adapters.state_dicts import adapter_state_dict
    from peftkit.decoding import Sampling, generate_ids
    from peftkit.evaluate import token_loss_sum
    from peftkit.inspect import inspect_adapter
    from peftkit.merge import merge_adapter
    from peftkit.peft_format import peft_config, save_adapter

    theirs = _saved_peft(tiny_llama, tmp_path / "peft")
    theirs.eval()
    model, cfg = load_adapted_model(str(tiny_llama), str(tmp_path / "peft"), torch.device("cpu"))[:2]
    model.eval()
    mask = torch.ones_like(IDS)
    with torch.no_grad():
        expected = theirs(input_ids=IDS, task_ids=TASKS).logits
        assert torch.equal(model(input_ids=IDS, task_ids=TASKS).logits, expected)
        batch = {"input_ids": IDS, "attention_mask": mask, "labels": IDS, "task_ids": TASKS}
        loss, count = token_loss_sum(model, batch)
        reference = torch.nn.functional.cross_entropy(expected[:, :-1].flatten(0, 1), IDS[:, 1:].flatten(),
                                                      reduction="sum")
        assert abs(float(loss) - float(reference)) <= 1e-4 and int(count) == 14
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert inspect_adapter(tmp_path / "peft")["trainable_params"] == trained == sum(
        p.numel() for p in theirs.parameters() if p.requires_grad)

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    prompts = [tok("12 3")["input_ids"], tok("7")["input_ids"]]
    ours = generate_ids(model, tok, prompts, Sampling(max_new_tokens=6), tasks=[2, 1])
    for prompt, task, answer in zip(prompts, (2, 1), ours, strict=True):
        out = theirs.generate(input_ids=torch.tensor([prompt]), task_ids=torch.tensor([task]), max_new_tokens=6,
                              attention_mask=torch.ones(1, len(prompt), dtype=torch.long), do_sample=False)
        assert answer == out[0, len(prompt):].tolist()[:len(answer)] and len(answer) > 0
    assert generate_ids(model, tok, prompts, Sampling(max_new_tokens=6), tasks=[0, 0]) != ours  # the tasks matter

    with pytest.raises(PeftkitError, match=r"Poly adapters \(method: poly\) cannot be merged into a plain model: each "
                                           r"row's update mixes the skills by that row's task"):
        merge_adapter(str(tmp_path / "peft"), str(tmp_path / "merged"), base=str(tiny_llama))
    with pytest.raises(PeftkitError, match="cannot be merged"):
        next(iter(adapter_layers(model).values())).merge()

    save_adapter(tmp_path / "ours", adapter_state_dict(model, []), peft_config(
        cfg, list(adapter_layers(model)), str(tiny_llama), False, "llama", model_config=model.config))
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "r", "n_tasks", "n_skills", "n_splits", "poly_type")} == {
        "peft_type": "POLY", "r": 4, "n_tasks": 3, "n_skills": 3, "n_splits": 2, "poly_type": "poly"}
    again = PeftModel.from_pretrained(_load(tiny_llama), tmp_path / "ours").eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=IDS, task_ids=TASKS).logits, expected)


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    from tests.conftest import number_rows, write_jsonl

    root = tmp_path_factory.mktemp("poly-data")
    write_jsonl(root / "train.jsonl", [r | {"task": i % 3} for i, r in enumerate(number_rows(12, seed=3))])
    return {"train": root / "train.jsonl", "eval": root / "train.jsonl"}


def test_the_shipped_recipe_trains_on_tasks_and_peft_loads_its_export(tiny_llama, task_data, tmp_path):
    """Its adapter in peft gives our logits per row's task; with adapter.merge_task 1 and export.merged, merged/ is
    task 1's model: peft's logits with task 1 for every row (peftkit's own key: not in adapter_config.json)."""
    summary = train_shipped_recipe("poly", tiny_llama, task_data, tmp_path / "run", steps=2, batch_size=2,
                                   sets=("adapter.merge_task=1", "export.merged=true"))
    assert summary["eval_loss"] < summary["base_eval_loss"]
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["n_tasks"], config["n_skills"], config["n_splits"]) == ("POLY", 3, 4, 2)
    assert "merge_task" not in config
    ours = load_adapted_model(str(tiny_llama), str(adapter), torch.device("cpu"))[0].eval()
    theirs = PeftModel.from_pretrained(_load(tiny_llama), adapter).eval()
    with torch.no_grad():
        expected = theirs(input_ids=IDS, task_ids=TASKS).logits
        assert (ours(input_ids=IDS, task_ids=TASKS).logits - expected).abs().max() <= 1e-5
        ones = torch.ones(2, dtype=torch.long)
        merged = _load(tmp_path / "run" / "merged")(input_ids=IDS).logits
        assert (merged - theirs(input_ids=IDS, task_ids=ones).logits).abs().max() <= 1e-5


def test_one_task_merges_into_the_base_as_peft_computes_it(tiny_llama, tmp_path, monkeypatch, capsys):
    """`peftkit merge --task N` folds task N's evaluation update, (A_t B_t)^T / r, into the weights (peft cannot merge
    Poly at all): the merged model gives peft's logits with task N for every row, another task another model; the same
    through merged_model. A task it does not have, and --task on another method's adapter, are refused by text."""
    from peftkit.merge import merge_adapter
    from peftkit.merge_weights import merged_model
    from tests.conftest import save_random_adapter

    theirs = _saved_peft(tiny_llama, tmp_path / "peft")
    merged = {}
    for task in (0, 2):
        out = merge_adapter(str(tmp_path / "peft"), str(tmp_path / f"merged-{task}"), base=str(tiny_llama), task=task)
        with torch.no_grad():
            merged[task] = _load(out)(input_ids=IDS).logits
            expected = theirs.eval()(input_ids=IDS, task_ids=torch.full((2,), task)).logits
        assert (merged[task] - expected).abs().max() <= 1e-5
    assert (merged[0] - merged[2]).abs().max() > 1e-2
    model, cfg = load_adapted_model(str(tiny_llama), str(tmp_path / "peft"), torch.device("cpu"))[:2]
    with torch.no_grad():
        alone = merged_model(model, cfg.model_copy(update={"merge_task": 2}), torch.float32).eval()
        alone = alone(input_ids=IDS).logits
        assert (alone - merged[2]).abs().max() <= 1e-5

    merge = ("merge", "--adapter", str(tmp_path / "peft"), "--base", str(tiny_llama), "--output", str(tmp_path / "m"))
    assert f"--task 3: {tmp_path / 'peft'} has 3 task(s); give a task id in 0 .. 2." in " ".join(
        cli_user_error(monkeypatch, capsys, *merge, "--task", "3").split())
    assert "Name the one task to fold in: `peftkit merge --adapter DIR --task N`" in " ".join(
        cli_user_error(monkeypatch, capsys, *merge).split())
    from peftkit.methods.lora import LoraConfig

    lora = save_random_adapter(tiny_llama, LoraConfig(r=2, alpha=4, target_modules=["q_proj"]), tmp_path / "lora",
                               seed=1)
    assert "--task 1: only a Poly adapter is merged for one task" in " ".join(cli_user_error(
        monkeypatch, capsys, "merge", "--adapter", str(lora), "--output", str(tmp_path / "m"), "--task", "1").split())
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(("adapter", "message"), [
    ({"n_splits": 3}, "adapter.n_splits: 3 does not divide the features of 'model.layers.0.self_attn.q_proj' (32 in, "
                      "32 out): each skill is cut into n_splits equal heads of both."),
    ({"n_skills": 0}, "'adapter.n_skills' = 0"),
    ({"poly_type": "mhr"}, "'adapter.poly_type' = 'mhr'"),
    ({"n_tasks": 2, "merge_task": 2}, "merge_task 2 is past the adapter's tasks (0 .. 1); name one of them"),
    ({"target_modules": ["embed_tokens"]}, "adapter.target_modules: 'model.embed_tokens' is an Embedding; Poly adapts "
                                           "nn.Linear (and 4-bit/8-bit) layers only"),
])
def test_recipe_mistakes_are_refused(adapter, message, tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "poly", **adapter})
    assert message in " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())


def test_what_poly_cannot_do_is_refused(tiny_gpt2, tiny_llama, number_data, task_data, tmp_path, monkeypatch, capsys):
    """GPT-2's Conv1D (peft's Poly takes nn.Linear only), a merged export, packing with several tasks (packed rows lose
    their task ids), a row's task past n_tasks, a Poly adapter among named adapters, a poly_type peft does not have."""
    from peftkit.adapters.named import load_named_model
    from tests.conftest import save_random_adapter

    with pytest.raises(PeftkitError, match="'transformer.h.0.attn.c_attn' is GPT-2's Conv1D; Poly adapts nn.Linear"):
        inject_adapters(_load(tiny_gpt2), PolyConfig(method="poly", target_modules=["c_attn"]))
    said = lambda recipe: " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())  # noqa: E731
    assert "export.merged: Poly adapters (method: poly) cannot be merged" in said(
        method_recipe(tmp_path, tiny_llama, number_data, {"method": "poly"}, export={"merged": True}))
    assert "data.packing: a packed row holds several examples, and Poly routes each row by one task id" in said(
        method_recipe(tmp_path, tiny_llama, number_data, {"method": "poly", "n_tasks": 2}, data={"packing": True}))
    assert (f"data.train ({task_data['train']}): a row's 'task' is 2, but adapter.n_tasks is 2: the rows' task ids "
            "must lie in 0 .. 1. Fix the rows, or set adapter.n_tasks: 3.") in " ".join(cli_user_error(
                monkeypatch, capsys, "train", str(method_recipe(tmp_path, tiny_llama, task_data,
                                                                {"method": "poly", "n_tasks": 2}))).split())
    adapter = save_random_adapter(tiny_llama, PolyConfig(method="poly", n_tasks=3), tmp_path / "poly", seed=1)
    with pytest.raises(PeftkitError, match="Adapter 'p' is a Poly adapter, whose layers mix their skills by each row's "
                                           r"task id, which named adapters do not hand them; load it alone"):
        load_named_model([("p", str(adapter))], str(tiny_llama))
    gen = ("generate", "--adapter", str(adapter), "--model", str(tiny_llama), "--max-new-tokens", "2", "--prompt", "x")
    assert "is a Poly adapter of 3 tasks, and nothing says which task to use: pass --task N (0 .. 2)." in \
        cli_user_error(monkeypatch, capsys, *gen)
    assert f"--task 3: {adapter} has 3 task(s); give a task id in 0 .. 2." in cli_user_error(
        monkeypatch, capsys, *gen, "--task", "3")
    config = adapter / "adapter_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"poly_type": "mhr"}))
    with pytest.raises(PeftkitError, match="poly_type is 'mhr'; peft 0.21 .and peftkit. has the 'poly' router only"):
        load_adapted_model(str(tiny_llama), str(adapter))


def test_a_comparison_evaluates_it_alone_with_its_task(tiny_llama, number_data, tmp_path):
    """`peftkit eval --adapter poly=DIR --adapter lora=DIR --task 1`: the Poly adapter loads on a model of its own
    (named adapters do not route task ids) and its row is its loss with task 1, LoRA's its loss alone."""
    from peftkit.compare import compare, comparison_jobs
    from peftkit.eval_job import EvalJob
    from peftkit.evaluate import evaluate
    from peftkit.inference import ModelSource
    from peftkit.methods.lora import LoraConfig
    from peftkit.recipe import DataConfig, ModelConfig
    from tests.conftest import save_random_adapter

    poly = save_random_adapter(tiny_llama, PolyConfig(method="poly", n_tasks=2), tmp_path / "poly", seed=1, std=0.5)
    lora = save_random_adapter(tiny_llama, LoraConfig(r=2, alpha=4, target_modules=["q_proj"]), tmp_path / "lora",
                               seed=1)
    data = str(number_data["eval"])
    job = EvalJob(data=data, data_cfg=DataConfig(train=data, max_length=128), batch_size=4, task=1,
                  source=ModelSource(ModelConfig(name_or_path=str(tiny_llama), dtype="float32")))
    rows = compare(comparison_jobs(job, [("poly", str(poly)), ("lora", str(lora))], []))
    alone = {task: evaluate(replace(job, task=task, source=replace(job.source, adapter=str(poly))))["loss"]
             for task in (0, 1)}
    assert rows["poly"]["loss"] == alone[1] != alone[0]


def test_a_compiled_training_forward_draws_the_eager_routing_samples():
    """training.compile: true (inductor, as `peftkit.start.compiled` compiles the step) samples each row's routing
    from torch's generator as the eager forward does: inductor's own generator drew other samples, so a compiled run
    trained another adapter than the eager run (0.038 max abs difference after 3 steps of a 1-layer Llama, measured;
    1.9e-7 now). The outputs and gradients of one seed are the eager layer's (1e-6)."""
    import torch._dynamo

    from peftkit.start import compiled

    torch.manual_seed(0)
    layer = PolyLinear(nn.Linear(8, 8), PolyConfig(method="poly", r=2, n_tasks=2, n_skills=3, init_weights=False))
    layer.train()
    x, tasks = torch.randn(3, 4, 8), torch.tensor([1, 0, 1])

    def step(x: torch.Tensor) -> torch.Tensor:
        layer.tasks.current = tasks
        return layer(x)

    results = []
    for forward in (step, compiled(step, True)):
        layer.zero_grad()
        torch.manual_seed(5)
        y = forward(x)
        y.square().sum().backward()
        results.append((y.detach(), *(p.grad.clone() for p in layer.adapter_params().values())))
    torch._dynamo.reset()
    assert all((a - b).abs().max() <= 1e-6 for a, b in zip(*results))


def test_combining_a_poly_adapter_is_refused_without_sending_it_to_task(tiny_llama, tmp_path, monkeypatch, capsys):
    """`peftkit merge` of two Poly adapters (--weights, into the base or into a LoRA) is refused, and the refusal no
    longer tells the user to name a task with `peftkit merge --task N`, which combining refuses ('combining adapters
    takes none. Drop --task.'): it says --task merges one Poly adapter alone."""
    from tests.conftest import save_random_adapter

    adapters = [str(save_random_adapter(tiny_llama, PolyConfig(method="poly", n_tasks=2), tmp_path / f"p{seed}",
                                        seed=seed)) for seed in (1, 2)]
    combine = ("merge", "--adapter", adapters[0], "--adapter", adapters[1], "--weights", "0.5,0.5",
               "--output", str(tmp_path / "out"))
    for how in (("--method", "linear", "--into-base"), ("--method", "cat")):
        said = " ".join(cli_user_error(monkeypatch, capsys, *combine, *how).split())
        assert ("Poly adapters (method: poly) cannot be merged into a plain model" in said
                and "`peftkit merge --adapter DIR --task N` merges one Poly adapter alone (combining adapters takes "
                    "no task;" in said), how
    assert "combining adapters takes none. Drop --task." in " ".join(cli_user_error(
        monkeypatch, capsys, *combine, "--method", "linear", "--into-base", "--task", "1").split())
    assert not (tmp_path / "out").exists()


def test_a_run_from_a_poly_adapter_with_export_merged_is_refused_by_text(tiny_llama, task_data, tmp_path, monkeypatch,
                                                                         capsys):
    """adapter: {init_from: DIR} of a Poly adapter with export.merged: true: validate and train crashed with pydantic's
    traceback (exit 1): the recipe's checks, run again when init_from's settings replace the section, raised a
    ValidationError nothing caught. Both now say the merge refusal at adapter.init_from's line (exit 2)."""
    from tests.conftest import save_random_adapter

    adapter = save_random_adapter(tiny_llama, PolyConfig(method="poly", n_tasks=3), tmp_path / "poly", seed=1)
    recipe = method_recipe(tmp_path, tiny_llama, task_data, {"init_from": str(adapter)}, export={"merged": True})
    for command in ("validate", "train"):
        said = " ".join(cli_user_error(monkeypatch, capsys, command, str(recipe)).split())
        assert (f"recipe.yaml:2: adapter.init_from {adapter} holds a poly adapter, which the recipe's other settings "
                "do not allow: export.merged: Poly adapters (method: poly) cannot be merged") in said, command


def test_a_run_from_a_poly_adapter_merges_the_task_its_recipe_names(tiny_llama, task_data, tmp_path, monkeypatch,
                                                                    capsys):
    """adapter: {method: poly, init_from: DIR, merge_task: 1} with export.merged: merge_task is peftkit's own, never in
    adapter_config.json, and init_from refused it as a setting the adapter says otherwise ('merge_task: 1 in the
    recipe, None in the adapter'; and without n_tasks repeated, as past the default n_tasks 1's tasks), so a run
    from a Poly adapter could not export a merged model. The run now keeps it (Method.recipe_only): merged/ is the
    trained adapter's task 1 (1e-5); a task past the adapter's n_tasks is refused by text."""
    from peftkit.recipe import load_recipe
    from peftkit.train import train
    from tests.conftest import save_random_adapter

    start = save_random_adapter(tiny_llama, PolyConfig(method="poly", n_tasks=3), tmp_path / "poly", seed=1)
    adapter = {"method": "poly", "init_from": str(start), "merge_task": 1}
    recipe = method_recipe(tmp_path / "a", tiny_llama, task_data, adapter, export={"merged": True},
                           training={"max_steps": 2}, eval={"base_model": False})
    train(load_recipe(recipe), show_summary=False)
    run = tmp_path / "a" / "run"
    model = load_adapted_model(str(tiny_llama), str(run / "adapter"), torch.device("cpu"))[0].eval()
    with torch.no_grad():
        expected = model(input_ids=IDS, task_ids=torch.ones(2, dtype=torch.long)).logits
        assert (_load(run / "merged")(input_ids=IDS).logits - expected).abs().max() <= 1e-5
    recipe = method_recipe(tmp_path / "b", tiny_llama, task_data, adapter | {"merge_task": 3}, export={"merged": True})
    assert f"adapter.init_from: {start}: merge_task 3 is past the adapter's tasks (0 .. 2); name one of them" in \
        " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())


def test_a_run_resumes_to_the_same_bits_and_checkpointing_changes_nothing(tiny_llama, task_data, tmp_path):
    """Training samples each row's routing from torch's generator every forward: a run of 3 tasks killed after step 2
    of 4 and resumed writes the unbroken run's file byte for byte (the checkpoint's generator state gives the same
    samples), and gradient checkpointing, whose recomputation in backward draws them again (torch's checkpoint puts
    the generator back first) from the forward's task ids, trains the same adapter (measured: equal bits)."""
    from tests.conftest import check_resumes_and_checkpoints_alike

    adapter = {"method": "poly", "r": 4, "n_tasks": 3, "n_skills": 3, "n_splits": 2}
    plain = check_resumes_and_checkpoints_alike(tmp_path, tiny_llama, task_data, adapter)
    assert min(v.abs().max() for k, v in plain.items() if k.endswith("poly_lora_B")) > 1e-3  # (B started at 0)
