"""Data-parallel training of adapter methods whose mechanisms differ from LoRA's (tests/test_distributed.py has
LoRA's: its kill, resume and verify): N processes x batch b train the adapter of 1 process x batch N*b.

Each case writes its recipes in `prepare_*` (a recipe "several" for the multi-process run, the others trained in this
process by its test); the module's `launched` fixture trains every case's "several" run in one launch per process
count (conftest's `train_each`: a launch's start, ~6 s of imports, paid once rather than per case), and `resumed`
the resume cases' second halves in one more."""

import functools
import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from peftkit.recipe import load_recipe
from peftkit.train import train
from tests.conftest import make_recipe, save_peft_lora, save_random_adapter, train_each

METHODS = {
    # The rank allocator (importance averages of |p * grad|, a budget pruned every step from step 2 on) and the
    # orthogonality regulariser, added after the gradients' all-reduce, on each process alike.
    "adalora": ({"method": "adalora", "init_r": 6, "target_r": 3, "tinit": 1, "tfinal": 1, "deltaT": 1,
                 "orth_reg_weight": 0.5, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}, 6),
    # Virtual tokens before each process's rows (and its slice trimmed after them).
    "prompt_tuning": ({"method": "prompt_tuning", "num_virtual_tokens": 8, "init": "random"}, 4),
    # Frozen random projections shared by every layer, drawn from projection_prng_key.
    "vera": ({"method": "vera", "r": 16, "target_modules": "all-linear", "dropout": 0.0}, 4),
    # Rows of the embedding, trained as a delta that only the rows' tokens reach.
    "trainable_tokens": ({"method": "trainable_tokens", "token_indices": [76, 85, 86]}, 4),
    # AdaMSS's subspace allocation: importance averages of |p * grad| after the all-reduce, subspaces frozen after steps
    # 3 to 5 (down to 6 of 18) alike on each process; DDP finds the frozen ones unused (find_unused_parameters).
    "adamss-asa": ({"method": "adamss", "r": 8, "num_subspaces": 3, "subspace_rank": 2,
                    "target_modules": ["q_proj", "v_proj", "o_proj"], "use_asa": True, "asa_target_subspaces": 6,
                    "init_warmup": 2, "final_warmup": 4, "mask_interval": 1}, 5),
    # CPT's own loss (each process's rows count their context's answers) and its projection after each step.
    "cpt": ({"method": "cpt", "cpt_token_ids": [5, 6, 7, 8, 9, 10], "cpt_tokens_type_mask": [1, 2, 3, 4, 6, 8],
             "opt_weighted_loss_type": "decay", "opt_loss_decay_factor": 0.5, "opt_projection_epsilon": 0.5}, 4),
    # The classifier's scalings pass, a whole forward of the model run inside each DDP forward (its experts: below).
    "xlora": ({"method": "xlora", "xlora_depth": 2, "xlora_size": 8, "xlora_dropout_p": 0.0}, 4),
    # Frozen SVD factors of each base weight, P seeded per layer, and one trained v shared by consecutive layers
    # (weight_tying: a parameter several layers reach, its gradients summed before the all-reduce), drawn uniform.
    "tinylora": ({"method": "tinylora", "r": 2, "u": 4, "weight_tying": 0.5, "init_weights": "uniform",
                  "target_modules": "all-linear"}, 4),
    # Coefficients at entries drawn from random_loc_seed (never saved: drawn alike on each process) and the inverse
    # DWT of a longer wavelet than Haar's.
    "waveft": ({"method": "waveft", "n_frequency": 48, "wavelet_family": "db2", "init_weights": False,
                "target_modules": ["q_proj", "v_proj", "down_proj"]}, 4),
    # A shadow network riding the layer loop, its auxiliary loss (the base's head on s0) added per process's rows,
    # and the last block's update MLPs unused: they feed nothing (in peft too), and plain DDP failed its second forward
    # ('Expected to have finished reduction in the prior iteration'); `Method.skips_parameters` has DDP look for them.
    "shadow": ({"method": "shadow", "r": 4, "shadow_dropout": 0.0, "shadow_intermediate_size": 16,
                "auxiliary_loss_weight": 0.5}, 4),
}


def _recipe(tmp_path, tiny_llama, number_data, adapter: dict, batch_size: int, steps: int, **sections):
    """The tests' small recipe, without eval data, with `adapter` as its whole adapter section (make_recipe's LoRA keys,
    r and alpha, are not every method's), `sections` merged into its sections. No dropout anywhere: its masks are drawn
    per process. grad_accum 2: `no_sync` on the first micro-batch of each step."""
    path = make_recipe(tmp_path, tiny_llama, number_data, eval={"base_model": False},
                       training={"max_steps": steps, "batch_size": batch_size, "grad_accum": 2, "lr": 2e-2,
                                 "save_steps": steps})
    recipe = yaml.safe_load(path.read_text())
    recipe["adapter"] = adapter
    del recipe["data"]["eval"]  # (the adapters are compared; an eval would only cost time)
    for section, values in sections.items():
        recipe[section] |= values
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _exported(recipe) -> tuple[dict, dict]:
    """The tensors and config of the adapter `recipe`'s run exported."""
    adapter = recipe.parent / "run" / "adapter"
    return load_file(adapter / "adapter_model.safetensors"), json.loads((adapter / "adapter_config.json").read_text())


def _one_and_several(root, tiny_llama, files, adapter: dict, processes: int, batch: int, steps: int,
                     training: dict | None = None, **sections) -> dict:
    """The recipes of `adapter` trained by 1 process x batch `processes * batch` ("one") and by `processes` processes
    x `batch` ("several"), `training` and `sections` merged into both."""
    return {name: _recipe(root / name, tiny_llama, files, adapter, size, steps, training=training or {}, **sections)
            for name, size in (("one", processes * batch), ("several", batch))}


def _apart(a: dict, b: dict) -> float:
    """The largest difference between two adapters' tensors, which must have the same names and shapes."""
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    return max(((a[k] - b[k]).abs().max().item() for k in a if a[k].numel()), default=0.0)


PREPARED = {}
"""{case: (its processes, its prepare function: (root, tiny_llama, number_data) -> {role: recipe})}"""


def prepared(name: str, processes: int = 2):
    def register(prepare):
        PREPARED[name] = (processes, prepare)
        return prepare
    return register


RESUMED = ("pvera", "poly-sampled")
"""The cases whose "several" run is killed after its step-2 checkpoint and resumed (`resumed`)."""


@pytest.fixture(scope="module")
def launched(tiny_llama, number_data, tmp_path_factory) -> dict[str, dict]:
    """Every case's recipes, {case: {role: recipe}}, its "several" run trained: one launch per process count."""
    root = tmp_path_factory.mktemp("launched")
    recipes = {name: prepare(root / name, tiny_llama, number_data) for name, (_, prepare) in PREPARED.items()}
    for count in sorted({processes for processes, _ in PREPARED.values()}):
        train_each([recipes[name]["several"] for name, (processes, _) in PREPARED.items() if processes == count], count)
    return recipes


@pytest.fixture(scope="module")
def resumed(launched) -> dict[str, tuple[bytes, dict]]:
    """The RESUMED cases' 2-process runs (4 steps, a checkpoint every 2) killed after step 2 (their last checkpoint and
    manifest deleted, as the kill leaves them) and resumed in 2 processes, in one launch: {case: (the unbroken run's
    adapter bytes, the step-2 checkpoint's training state)}."""
    kept = {}
    for name in RESUMED:
        run = launched[name]["several"].parent / "run"
        kept[name] = ((run / "adapter" / "adapter_model.safetensors").read_bytes(),
                      torch.load(run / "checkpoints" / "step-00000002" / "training_state.pt", weights_only=True))
        shutil.rmtree(run / "checkpoints" / "step-00000004")
        (run / "manifest.json").unlink()
    train_each([launched[name]["several"] for name in RESUMED], 2, resume=True)
    return kept


def _prepare_method(method, root, tiny_llama, number_data) -> dict:
    adapter, steps = METHODS[method]
    if method == "xlora":  # two LoRA experts saved by peft (no dropout: its masks are drawn per process)
        from peft import LoraConfig

        configs = [LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                   LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj", "down_proj"])]
        adapter = adapter | {"adapters": {str(i): str(save_peft_lora(tiny_llama, root / f"expert{i}", c, seed=i))
                                          for i, c in enumerate(configs)}}
    return _one_and_several(root, tiny_llama, number_data, adapter, 2, 2, steps)


for _method in METHODS:
    prepared(_method)(functools.partial(_prepare_method, _method))


@pytest.mark.parametrize("method", list(METHODS))
def test_two_processes_train_each_method_s_adapter_of_one_with_twice_the_batch(method, launched):
    """Each method's adapter after a few steps (AdaLoRA: 6, its ranks pruned from step 2 on) is the 1-process one
    up to float rounding, and so is its exported config (AdaLoRA's rank pattern, decided on each process from the
    all-reduced gradients)."""
    recipes = launched[method]
    train(load_recipe(recipes["one"]))
    (a, config_a), (b, config_b) = _exported(recipes["one"]), _exported(recipes["several"])
    assert _apart(a, b) <= 1e-5
    assert config_a == config_b
    if method == "adalora":  # the allocator pruned (rank 6 down to an average of 3), alike
        kept = [sum(keep) for keep in config_a["rank_pattern"].values()]
        assert sum(kept) == 3 * len(kept) and set(kept) != {3}, kept


LILY = {"method": "lily", "r": 4, "num_B": 3, "stride_A": 2, "init_weights": False,
        "target_modules": ["q_proj", "v_proj", "down_proj"]}


@prepared("lily")
def prepare_lily(root, tiny_llama, number_data) -> dict:
    return {name: _recipe(root / name, tiny_llama, number_data, LILY, batch_size, 4,
                          training={"grad_accum": grad_accum})
            for name, batch_size, grad_accum in (("halves", 2, 4), ("whole", 4, 2), ("several", 2, 2))}


def test_lily_s_router_averages_over_each_process_s_rows(launched):
    """Lily's router weighs its B experts by the mean of its softmax over every token of the forward's batch, so a row's
    output depends on the rows beside it: 2 processes x batch 2 each average over their own slice (trimmed to its
    longest row, as one process pads a micro-batch of those rows), as one process averages over each micro-batch of
    its gradient accumulation. They train the adapter of 1 process x batch 2 with twice the grad_accum (the same
    global window, the same forwards: 8.4e-8 measured), not 1 x batch 4's (2.2e-2 apart, measured). Shared A
    (stride_A 2) and B, a router per layer."""
    recipes = launched["lily"]
    for name in ("halves", "whole"):
        train(load_recipe(recipes[name]))
    (a, config_a), (b, config_b) = _exported(recipes["halves"]), _exported(recipes["several"])
    assert config_a == config_b and _apart(a, b) <= 1e-5
    assert _apart(_exported(recipes["whole"])[0], b) > 1e-3  # (the batch's mean is the slice's)


@prepared("poly-task-ids")
def prepare_poly_task_ids(root, tiny_llama, number_data) -> dict:
    from peftkit.methods.poly import PolyConfig
    from peftkit.tiny import number_rows, write_jsonl

    root.mkdir(parents=True)
    for name, rows, seed in (("train", 64, 1), ("eval", 16, 2)):
        write_jsonl(root / f"{name}.jsonl", [r | {"task": i % 3} for i, r in enumerate(number_rows(rows, seed))])
    data = {"train": root / "train.jsonl", "eval": root / "eval.jsonl"}
    start = save_random_adapter(tiny_llama, PolyConfig(method="poly", r=4, n_tasks=3, n_skills=3, n_splits=2,
                                                       target_modules=["q_proj", "v_proj", "down_proj"]),
                                root / "start", seed=1)
    saturated = torch.full((3, 2, 3), -40.0)  # (task, head, skill)
    for task in range(3):
        saturated[task, [0, 1], [task, (task + 1) % 3]] = 40.0
    state = load_file(start / "adapter_model.safetensors")
    state = {k: saturated.reshape(3, 6).clone() if k.endswith("module_logits") else t for k, t in state.items()}
    save_file(state, start / "adapter_model.safetensors", metadata={"format": "pt"})
    return _one_and_several(root, tiny_llama, data, {"init_from": str(start)}, 2, 2, 4,
                            training={"optimizer": "sgd", "lr": 0.5, "warmup_steps": 0},
                            data={"eval": str(data["eval"])})


def test_poly_s_task_ids_travel_with_their_rows(launched):
    """Poly routes each row by its task; in training the routing is a RelaxedBernoulli sample, which each process
    draws for its own rows (as dropout's masks), so runs agree bit for bit only where the sample cannot vary: here
    every task's logits are +-40 (task t takes skill (t + head) % 3 of each of its 2 heads; the logistic noise is
    within +-16 in fp32), so the sample is 1.0 or within 1e-10 of 0, and the logits' gradients ~1e-10 (SGD: they do
    not move). 2 processes x batch 2 then train the skills of 1 process x batch 4 only if each row's task id goes to
    the process with the row: with the first rows' ids in each slice instead (tried by hand in `shard`) the skills end
    2.0e-2 apart; 1.5e-6 now (measured). The eval loss, each process scoring whole batches with their rows' tasks, is
    the one process's."""
    recipes = launched["poly-task-ids"]
    train(load_recipe(recipes["one"]))
    a, b = _exported(recipes["one"])[0], _exported(recipes["several"])[0]
    assert _apart(a, b) <= 1e-5
    start = load_file(recipes["one"].parent.parent / "start" / "adapter_model.safetensors")
    assert _apart(a, start) > 1e-2  # (the skills trained)
    losses = [json.loads((recipe.parent / "run" / "manifest.json").read_text())["metrics"]["eval_loss"]
              for recipe in (recipes["one"], recipes["several"])]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


STAND_IN = {
    # VeLoRA's batch_average projection is the mean over the global batch, added up over the processes: the
    # stand-in's copy was added too, its row counted twice (max abs difference 0.053, in the saved projection,
    # measured on the old code; 1.4e-7 now).
    "velora": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear",
               "velora_config": {"num_groups": 4, "init_type": "batch_average"}},
    # CPT's loss scores each row's context outputs as well as its labels: the stand-in's context terms were added to
    # the gradient, a row the global batch does not hold (max abs difference 3.3e-3 in the prompt, measured on the
    # old code; 7e-9 now).
    "cpt": METHODS["cpt"][0],
}


def _prepare_stand_in(method, root, tiny_llama, number_data) -> dict:
    from peftkit.tiny import number_rows, write_jsonl

    root.mkdir(parents=True)
    write_jsonl(root / "five.jsonl", number_rows(5, seed=3))
    data = {"train": root / "five.jsonl", "eval": root / "five.jsonl"}
    return _one_and_several(root, tiny_llama, data, STAND_IN[method], 3, 1, 2,
                            training={"grad_accum": 1, "warmup_steps": 0, "optimizer": "sgd", "lr": 0.5})


for _method in STAND_IN:
    prepared(f"stand-in-{_method}", processes=3)(functools.partial(_prepare_stand_in, _method))


@pytest.mark.parametrize("method", list(STAND_IN))
def test_a_stand_in_row_counts_nowhere(method, launched):
    """3 processes x batch 1 over 5 rows: the second global batch has 2 rows, so the third process runs a stand-in
    (`shard`: the first row again, without labels), which must count nowhere: the adapter is 1 process x batch 3's.
    SGD: Adam's step on a gradient entry near zero (a difference of sums) turns the summation order's rounding into up
    to ~1e-5 (plain LoRA here under Adam, 3 processes), and this test asks for 1e-6."""
    from peftkit.distributed import shard, stands_in

    batch = {"input_ids": torch.arange(6).reshape(2, 3), "labels": torch.arange(6).reshape(2, 3)}
    assert [stands_in(batch, r, 3) for r in range(3)] == [False, False, True]
    assert (shard(batch, 2, 3)["labels"] == -100).all() and not stands_in(batch, 0, 1)
    recipes = launched[f"stand-in-{method}"]
    train(load_recipe(recipes["one"]))
    assert _apart(_exported(recipes["one"])[0], _exported(recipes["several"])[0]) <= 1e-6


def _resume_recipe(root, tiny_llama, data, adapter: dict) -> dict:
    """A 2-process run of 4 steps with a checkpoint every 2 (`resumed` stops it after step 2 and resumes it)."""
    return {"several": _recipe(root, tiny_llama, data, adapter, 2, 4,
                               training={"save_steps": 2, "save_total_limit": 4})}


@prepared("pvera")
def prepare_pvera(root, tiny_llama, number_data) -> dict:
    adapter = {"method": "pvera", "r": 8, "generator_seed": 3, "target_modules": ["q_proj", "v_proj"]}
    return _resume_recipe(root, tiny_llama, number_data, adapter)


def test_pvera_s_seeded_noise_resumes_in_two_processes_to_the_same_bits(launched, resumed):
    """PVeRA with generator_seed: each layer of each process draws its noise from its own seeded generator, as many
    numbers as its batch holds, and the two processes' batches are padded to other lengths. A checkpoint kept the
    main process's generator states only, which a resume gave to both: the second process's noise after it was
    another than the unbroken run's, and so was the adapter (measured on that code: its bytes differ). Now every
    process's states are kept and each gets its own back."""
    unbroken, state = resumed["pvera"]
    assert (launched["pvera"]["several"].parent / "run" / "adapter" / "adapter_model.safetensors").read_bytes() == unbroken
    mine, other = state["method_trainer_ranks"]
    assert any(not torch.equal(mine["generators"][k], other["generators"][k]) for k in mine["generators"])


@prepared("poly-sampled")
def prepare_poly_sampled(root, tiny_llama, number_data) -> dict:
    from peftkit.tiny import number_rows, write_jsonl

    root.mkdir(parents=True)
    write_jsonl(root / "train.jsonl", [r | {"task": i % 3} for i, r in enumerate(number_rows(64, seed=1))])
    data = {"train": root / "train.jsonl", "eval": root / "train.jsonl"}
    adapter = {"method": "poly", "r": 4, "n_tasks": 3, "n_skills": 3, "n_splits": 2, "init_weights": False,
               "target_modules": ["q_proj", "v_proj"]}
    return _resume_recipe(root, tiny_llama, data, adapter)


def test_poly_s_sampled_routing_resumes_in_two_processes_to_the_same_bits(launched, resumed):
    """Poly in training draws a RelaxedBernoulli routing sample per layer and forward from torch's generator, each
    process for its own rows (its generator reseeded with seed + rank), a draw no other method's resume test makes: a
    2-process run killed after its step-2 checkpoint and resumed must draw what the unbroken run drew after it, on
    each process, and write its adapter byte for byte. Three tasks, two heads."""
    unbroken, state = resumed["poly-sampled"]
    run = launched["poly-sampled"]["several"].parent / "run"
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == unbroken
    assert not torch.equal(state["rng_ranks"][0]["cpu"], state["rng_ranks"][1]["cpu"])  # (each process's own)


@prepared("cpt-types")
def prepare_cpt_types(root, tiny_llama, number_data) -> dict:
    from transformers import AutoTokenizer

    from peftkit.data import IGNORE_INDEX, load_examples
    from peftkit.recipe import DataConfig
    from peftkit.tiny import write_jsonl

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    cfg = DataConfig(train=str(number_data["train"]), format="alpaca", max_length=128)
    rows = []
    for i, e in enumerate(load_examples(tok, cfg.train, "train", cfg, cache=False)[0]):
        answer = [k for k, label in enumerate(e.labels) if label != IGNORE_INDEX]
        types = [2] * len(e.input_ids)
        for j, k in enumerate(answer):
            types[k] = 8 if i % 2 and j else 4
        rows.append({"input_ids": e.input_ids, "labels": e.labels, "input_type_mask": types})
    root.mkdir(parents=True)
    write_jsonl(root / "typed.jsonl", rows)
    write_jsonl(root / "fours.jsonl", [r | {"input_type_mask": [4] * len(r["input_ids"])} for r in rows])
    adapter, files = METHODS["cpt"][0], {"train": root / "typed.jsonl", "eval": root / "typed.jsonl"}
    tokenized = {"format": "tokenized"}
    return _one_and_several(root, tiny_llama, files, adapter, 2, 2, 4, data=tokenized) | {
        "fours": _recipe(root / "fours", tiny_llama, files | {"train": root / "fours.jsonl"}, adapter, 4, 4,
                         data=tokenized)}


def test_cpt_s_input_types_travel_with_their_rows(launched):
    """CPT on tokenized rows with an input_type_mask: even rows' answers typed 4 throughout, odd rows' first answer
    token 4 and the rest 8, so decay (0.5) weighs an odd row's context answers a factor further down than an even
    row's; 2 processes x batch 2 train 1 process x batch 4's adapter only if each process's slice of the batch's types
    is its own rows'. The types matter: the same rows all typed 4 train another adapter."""
    recipes = launched["cpt-types"]
    for name in ("one", "fours"):
        train(load_recipe(recipes[name]))
    a = _exported(recipes["one"])[0]
    assert _apart(a, _exported(recipes["several"])[0]) <= 1e-5
    assert _apart(a, _exported(recipes["fours"])[0]) > 1e-4
