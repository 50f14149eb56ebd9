"""`peftkit eval RECIPE --adapter a=DIR --adapter b=DIR [--merged m=DIR]` on preference pairs: each row's figures
are those of `peftkit eval` of that model alone (DPO: against the base, computed once; ORPO and reward models: each
row alone, the base included), and what cannot be compared is said."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch.nn import functional as F
from typer.testing import CliRunner

from conftest import cli_user_error, make_recipe, save_random_adapter
from peftkit.cli import app
from peftkit.tiny import write_jsonl

FIGURES = ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, Path]:
    """Sums, the chosen answer right and the rejected one its negative; two eval sets."""
    import random

    root, rng = tmp_path_factory.mktemp("cmp_pairs"), random.Random(0)
    for name, n in (("train", 8), ("eval", 6), ("held", 5)):
        sums = [(rng.randint(1, 50), rng.randint(1, 50)) for _ in range(n)]
        write_jsonl(root / f"{name}.jsonl", [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(-a - b)}
                                             for a, b in sums])
    return {"train": root / "train.jsonl", "eval": root / "eval.jsonl", "held": root / "held.jsonl"}


def _recipe(tmp_path: Path, model: Path, data: dict, eval_sets: dict | None = None, adapter: dict | None = None,
            model_keys: dict | None = None, **training) -> Path:
    recipe = make_recipe(tmp_path, model, data, data={"format": "preference", "max_length": 64},
                         adapter={"dropout": 0.0}, training=training)
    raw = yaml.safe_load(recipe.read_text())
    raw["adapter"] = adapter or raw["adapter"]  # (adapter.init_from: the settings are that adapter's)
    raw["data"]["eval"] = eval_sets or raw["data"]["eval"]
    raw["model"] |= model_keys or {}
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    return recipe


def _eval(tmp_path: Path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "figures.json"
    result = CliRunner().invoke(app, ["eval", *args, "--json", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return json.loads(out.read_text()), result.output


def _close(got: dict, want: dict, tol: float = 1e-5) -> bool:
    return all(abs(got[k] - want[k]) <= tol for k in FIGURES) and got["num_pairs"] == want["num_pairs"]


def _lora(model: Path, out: Path, seed: int) -> Path:
    from peftkit.methods.lora import LoraConfig

    return save_random_adapter(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"), out,
                               seed=seed, std=0.3)


def test_a_dpo_comparison_scores_each_row_against_the_base_as_eval_alone_does(tiny_llama, pairs, tmp_path):
    """Two adapters and one merged, on a recipe with two eval sets and adapter.init_from (which a comparison does not
    take: its reference is the base): each adapter's figures on each set are `peftkit eval RECIPE --adapter DIR`'s
    without init_from, its reference computed apart; the merged model's those of its adapter; the base row is the
    base against itself, loss log 2 and rewards 0; one table per set, with the differences from the base."""
    a, b = _lora(tiny_llama, tmp_path / "a", 1), _lora(tiny_llama, tmp_path / "b", 2)
    assert CliRunner().invoke(app, ["merge", "--adapter", str(a), "--output", str(tmp_path / "m")]).exit_code == 0
    sets = {"main": str(pairs["eval"]), "held": str(pairs["held"])}
    plain = _recipe(tmp_path / "plain", tiny_llama, pairs, sets, objective="dpo", dpo_beta=0.5)
    with_init = _recipe(tmp_path / "init", tiny_llama, pairs, sets, {"init_from": str(b)}, objective="dpo",
                        dpo_beta=0.5)
    rows, printed = _eval(tmp_path, str(with_init), "--adapter", f"a={a}", "--adapter", f"b={b}", "--merged",
                          f"m={tmp_path / 'm'}")
    assert list(rows) == ["held", "main"] and sorted(rows["main"]) == ["a", "b", "base", "m"]
    for name, adapter in (("a", a), ("b", b)):
        alone, _ = _eval(tmp_path, str(plain), "--adapter", str(adapter))
        for each in ("main", "held"):
            assert _close(rows[each][name], alone[each]), (name, each, rows[each][name], alone[each])
            assert abs(rows[each]["m"]["loss"] - rows[each]["a"]["loss"]) <= 1e-4
    for each, n in (("main", 6), ("held", 5)):
        base = rows[each]["base"]
        assert abs(base["loss"] - math.log(2)) <= 1e-6 and base["num_pairs"] == n
        assert base["reward_accuracy"] == base["reward_margin"] == base["chosen_reward"] == 0.0
    assert "comparison on main" in printed and "comparison on held" in printed
    assert f"{rows['main']['a']['loss'] - math.log(2):+.4f}" in printed  # the Δ column
    assert rows["main"]["a"]["trainable_params"] > 0 and "trainable_params" not in rows["main"]["m"]
    # without a recipe or --model: the base a and b (and m's peftkit.json merged_from) record, the same rows
    args = ["--adapter", f"a={a}", "--adapter", f"b={b}", "--merged", f"m={tmp_path / 'm'}", "--data",
            str(pairs["eval"]), "--format", "preference"]
    recorded, given = _eval(tmp_path, *args)[0], _eval(tmp_path, "--model", str(tiny_llama), *args)[0]
    assert recorded == given and sorted(recorded) == ["a", "b", "base", "m"], (recorded, given)


def test_a_merged_model_whose_tokens_are_not_the_base_s_is_refused_under_dpo(tiny_llama, pairs, tmp_path,
                                                                             monkeypatch, capsys):
    """The base's reference log-probabilities are of the base's tokens: a merged model whose tokenizer reads the
    pairs otherwise (an added token) cannot be scored against them, and is refused before any model loads."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(tiny_llama, tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    tok.add_tokens([f"+{d}" for d in range(1, 10)])  # (each row "a+b=" then reads "+b" as one token)
    tok.save_pretrained(tmp_path / "m")
    recipe = _recipe(tmp_path, tiny_llama, pairs, objective="dpo")
    said = cli_user_error(monkeypatch, capsys, "eval", str(recipe), "--merged", f"m={tmp_path / 'm'}")
    assert ("--merged m: its tokenizer reads the pairs into other tokens than the base's (added tokens, another chat "
            "template), so the base's log-probabilities, DPO's reference, are not of its answers"
            ) in " ".join(said.split())


def test_an_orpo_comparison_scores_each_row_alone_the_base_included(tiny_llama, pairs, tmp_path):
    """ORPO has no reference: the base row is `peftkit eval RECIPE` (the base alone), an adapter's its eval alone."""
    a = _lora(tiny_llama, tmp_path / "a", 3)
    recipe = _recipe(tmp_path, tiny_llama, pairs, objective="orpo", orpo_lambda=0.5)
    rows, _ = _eval(tmp_path, str(recipe), "--adapter", f"a={a}")
    base, _ = _eval(tmp_path, str(recipe))
    alone, _ = _eval(tmp_path, str(recipe), "--adapter", str(a))
    assert _close(rows["base"], base) and _close(rows["a"], alone), (rows, base, alone)
    assert abs(rows["a"]["loss"] - base["loss"]) > 1e-3


def _reward_adapter(model: Path, out: Path, seed: int, outputs: int = 1) -> Path:
    """A SEQ_CLS LoRA of one output (a reward model; `outputs` classes: a classifier) made by peft, far from
    identity, its head with it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(model, num_labels=outputs, dtype=torch.float32)
    get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules="all-linear",
                                    init_lora_weights=False)).save_pretrained(out)
    return out


def _peft_figures(model: Path, adapter: Path, data: Path) -> dict:
    """The Bradley-Terry figures of peft's scores, one answer at a time (no padding)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from peftkit.data.preference import load_pairs
    from peftkit.modeling import load_tokenizer
    from peftkit.recipe import DataConfig, ModelConfig

    tok = load_tokenizer(ModelConfig(name_or_path=str(model)))
    base = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1, dtype=torch.float32)
    scorer = PeftModel.from_pretrained(base, adapter).eval()
    read, _ = load_pairs(tok, str(data), None, DataConfig(train="x", format="preference"))
    with torch.no_grad():
        scores = torch.tensor([[scorer(input_ids=torch.tensor([e.input_ids])).logits.item() for e in pair[:2]]
                               for pair in read])
    margin = scores[:, 0] - scores[:, 1]
    return {"loss": float(-F.logsigmoid(margin).mean()), "reward_accuracy": float((margin > 0).float().mean()),
            "reward_margin": float(margin.mean()), "chosen_reward": float(scores[:, 0].mean()),
            "rejected_reward": float(scores[:, 1].mean()), "num_pairs": len(read)}


def test_a_reward_model_comparison_scores_each_model_alone(tiny_llama, pairs, tmp_path, monkeypatch, capsys):
    """Two reward adapters compared on --model (a causal LM) without a recipe: each row's figures are `peftkit eval
    --adapter DIR`'s and peft's scores' (the formula on them); the base row is the base as a classifier of one output,
    its new head drawn from seed 0: a reward recipe's `peftkit eval RECIPE`. A language model's adapter beside a
    reward model, and a classifier of classes, are refused, saying why."""
    r1, r2 = _reward_adapter(tiny_llama, tmp_path / "r1", 1), _reward_adapter(tiny_llama, tmp_path / "r2", 2)
    data = str(pairs["eval"])
    rows, _ = _eval(tmp_path, "--model", str(tiny_llama), "--data", data, "--format", "preference",
                    "--adapter", f"r1={r1}", "--adapter", f"r2={r2}")
    for name, adapter in (("r1", r1), ("r2", r2)):
        alone, _ = _eval(tmp_path, "--adapter", str(adapter), "--data", data, "--format", "preference")
        assert _close(rows[name], alone), (name, rows[name], alone)
        assert _close(rows[name], _peft_figures(tiny_llama, adapter, pairs["eval"]), 1e-4)
    recipe = _recipe(tmp_path, tiny_llama, pairs, model_keys={"task": "sequence_classification"}, objective="reward")
    base, _ = _eval(tmp_path, str(recipe))
    assert _close(rows["base"], base), (rows["base"], base)
    lm = _lora(tiny_llama, tmp_path / "lm", 1)
    said = cli_user_error(monkeypatch, capsys, "eval", "--model", str(tiny_llama), "--data", data, "--format",
                          "preference", "--adapter", f"r1={r1}", "--adapter", f"lm={lm}")
    assert "'lm' is not a reward model (a classifier of one output, training.objective: reward), and 'r1' is: a " \
           "comparison scores reward models, or language models, not both." in " ".join(said.split())
    classes = _reward_adapter(tiny_llama, tmp_path / "c2", 3, outputs=2)
    said = cli_user_error(monkeypatch, capsys, "eval", "--model", str(tiny_llama), "--data", data, "--format",
                          "preference", "--adapter", f"r1={r1}", "--adapter", f"c2={classes}")
    assert "'c2' is a classifier of classes, not a reward model" in " ".join(said.split())


def _dpo_figures(model: Path, adapter: Path, data: Path, beta: float) -> dict:
    """DPO's sigmoid figures of `adapter` against its base, from log-probabilities of a plain forward of each answer
    (peft's model for the adapter, one answer at a time: no padding)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftkit.data.preference import load_pairs
    from peftkit.modeling import load_tokenizer
    from peftkit.recipe import DataConfig, ModelConfig

    tok = load_tokenizer(ModelConfig(name_or_path=str(model)))
    read, _ = load_pairs(tok, str(data), None, DataConfig(train="x", format="preference"))
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), adapter).eval()

    def logp(net, example) -> float:
        ids, labels = torch.tensor([example.input_ids]), torch.tensor(example.labels[1:])
        logps = F.log_softmax(net(input_ids=ids).logits[0, :-1].float(), -1)
        keep = labels != -100
        return float(logps[keep].gather(-1, labels[keep, None]).sum())

    with torch.no_grad():
        ratios = torch.tensor([[logp(policy, e) for e in pair[:2]] for pair in read])
        with policy.disable_adapter():
            ratios -= torch.tensor([[logp(policy, e) for e in pair[:2]] for pair in read])
    chosen, rejected = beta * ratios[:, 0], beta * ratios[:, 1]
    return {"loss": float(-F.logsigmoid(chosen - rejected).mean()),
            "reward_accuracy": float((chosen > rejected).float().mean()),
            "reward_margin": float((chosen - rejected).mean()), "chosen_reward": float(chosen.mean()),
            "rejected_reward": float(rejected.mean()), "num_pairs": len(read)}


def test_a_kto_recipe_s_comparison_on_pairs_scores_them_by_dpo_s_defaults(tiny_llama, pairs, tmp_path):
    """A KTO recipe (data.format unpaired) compared on --data PAIRS --format preference: KTO scores no pairs, so each
    row is DPO's by its defaults (sigmoid, beta 0.1), as `peftkit eval` of the adapter alone scores it, and as the
    formula gives it on plain forwards. (The recipe's ("kto", beta, weights) was read as DPO's (beta, kind, ...): a
    TypeError.)"""
    a, b = _lora(tiny_llama, tmp_path / "a", 1), _lora(tiny_llama, tmp_path / "b", 2)
    unpaired = tmp_path / "unpaired.jsonl"
    write_jsonl(unpaired, [{"prompt": "1+2=", "completion": str(3 - 6 * (i % 2)), "label": i % 2 == 0}
                           for i in range(4)])
    recipe = make_recipe(tmp_path, tiny_llama, {"train": unpaired, "eval": unpaired},
                         data={"format": "unpaired", "max_length": 64}, adapter={"dropout": 0.0},
                         training={"objective": "kto", "kto_beta": 0.7})
    on_pairs = ("--data", str(pairs["eval"]), "--format", "preference")
    rows, _ = _eval(tmp_path, str(recipe), *on_pairs, "--adapter", f"a={a}", "--adapter", f"b={b}")
    assert abs(rows["base"]["loss"] - math.log(2)) <= 1e-6
    for name, adapter in (("a", a), ("b", b)):
        alone, _ = _eval(tmp_path, str(recipe), *on_pairs, "--adapter", str(adapter))
        assert _close(rows[name], alone), (name, rows[name], alone)
        assert _close(rows[name], _dpo_figures(tiny_llama, adapter, pairs["eval"], 0.1), 1e-4), (name, rows[name])


def test_multitask_prompt_tuning_pairs_are_scored_with_their_task_as_its_run_scored_them(tiny_llama, tmp_path,
                                                                                        monkeypatch, capsys):
    """A DPO run of multitask prompt tuning evaluates each pair with its `task`: `peftkit eval RUN_DIR`, and the
    adapter's row in a comparison, give its last evaluation; --task N scores every pair as task N, as its data with
    every `task` N does; --task on an adapter that reads none is refused, as on other rows. (The pairs were read
    without their task, and --task was ignored.)"""
    from peftkit.recipe import load_recipe
    from peftkit.train import train

    rows = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(-a - b), "task": i % 2}
            for i, (a, b) in enumerate([(3, 4), (10, 20), (7, 1), (25, 13), (2, 40), (31, 9), (8, 8), (17, 6)])]
    write_jsonl(tmp_path / "tasks.jsonl", rows)
    write_jsonl(tmp_path / "task1.jsonl", [row | {"task": 1} for row in rows])
    data = {"train": tmp_path / "tasks.jsonl", "eval": tmp_path / "tasks.jsonl"}
    recipe = _recipe(tmp_path, tiny_llama, data, adapter={"method": "multitask_prompt_tuning", "num_virtual_tokens": 4,
                                                          "num_tasks": 2},
                     objective="dpo", lr=0.3, max_steps=6, eval_steps=6)
    train(load_recipe(recipe))
    run = tmp_path / "run"
    last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x][-1]
    last = {k: last[f"eval_{k}"] for k in FIGURES} | {"num_pairs": len(rows)}
    lora = _lora(tiny_llama, tmp_path / "lora", 1)
    alone, _ = _eval(tmp_path, str(run))
    compared, _ = _eval(tmp_path, str(recipe), "--adapter", f"m={run / 'adapter'}", "--adapter", f"l={lora}")
    assert _close(alone, last) and _close(compared["m"], last), (alone, compared["m"], last)
    given = ("--adapter", str(run / "adapter"), "--format", "preference")
    as_one, _ = _eval(tmp_path, *given, "--data", str(tmp_path / "tasks.jsonl"), "--task", "1")
    as_zero, _ = _eval(tmp_path, *given, "--data", str(tmp_path / "tasks.jsonl"), "--task", "0")
    ones, _ = _eval(tmp_path, *given, "--data", str(tmp_path / "task1.jsonl"))
    assert _close(as_one, ones) and abs(as_one["loss"] - as_zero["loss"]) > 1e-4, (as_one, as_zero, ones)
    said = cli_user_error(monkeypatch, capsys, "eval", str(recipe), "--adapter", str(lora), "--task", "1")
    assert "--task 1: only a multitask prompt tuning or Poly adapter reads a task id" in " ".join(said.split())


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_answers_that_fit_the_positions_only_without_the_virtual_tokens_are_refused(tiny_gpt2, tmp_path, monkeypatch,
                                                                                   capsys, objective):
    """GPT-2's learned positions (512) hold a 511-token answer, not with a prompt-tuning adapter's 4 virtual tokens in
    front: eval of the adapter alone and a comparison say so, as of ORPO's alone, before scoring. (DPO's alone, and
    every comparison, checked the model without the adapter's tokens: an IndexError's traceback.)"""
    from peftkit.methods.prompt_tuning import PromptTuningConfig

    prompt = save_random_adapter(tiny_gpt2, PromptTuningConfig(method="prompt_tuning", num_virtual_tokens=4),
                                 tmp_path / "pt", seed=1)
    write_jsonl(tmp_path / "long.jsonl", [{"prompt": "1+2=", "chosen": "3" * 505, "rejected": "4" * 505}] * 2)
    recipe = make_recipe(tmp_path, tiny_gpt2, {"train": tmp_path / "long.jsonl", "eval": tmp_path / "long.jsonl"},
                         data={"format": "preference", "max_length": 512}, training={"objective": objective})
    for adapters in ([str(prompt)], [f"p={prompt}", f"q={prompt}"]):
        said = cli_user_error(monkeypatch, capsys, "eval", str(recipe), *(f for a in adapters for f in ("--adapter", a)))
        assert (f"The longest answer of {tmp_path / 'long.jsonl'} needs 511 tokens + the adapter's 4 virtual tokens = "
                "515, more than the 512 positions this gpt2 model has") in " ".join(said.split()), (adapters, said)


def test_a_merged_model_of_another_base_is_refused_under_dpo(tiny_llama, tiny_gpt2, pairs, tmp_path, monkeypatch,
                                                            capsys):
    """DPO scores a merged model against the comparison's base, its reference: one merged from another base (its
    peftkit.json merged_from; a GPT-2 with the tiny Llama's character tokenizer, so its tokens are the base's) is
    refused, naming both bases, before any model loads (a hub model's record read from the hub, here an offline
    cache); one merged from the base, named by another path, is not."""
    g = _lora(tiny_gpt2, tmp_path / "g", 1)
    assert CliRunner().invoke(app, ["merge", "--adapter", str(g), "--output", str(tmp_path / "gm")]).exit_code == 0
    recipe = _recipe(tmp_path, tiny_llama, pairs, objective="dpo")
    said = " ".join(cli_user_error(monkeypatch, capsys, "eval", str(recipe), "--merged", f"m={tmp_path / 'gm'}")
                    .split())
    assert (f"--merged m: {tmp_path / 'gm'} was merged from {tiny_gpt2} (its peftkit.json merged_from), and the "
            f"comparison's base, DPO's reference, is {tiny_llama}, so its figures against that reference would not be "
            f"its DPO run's. Compare it with a recipe or --model of {tiny_gpt2}.") in said
    from huggingface_hub import constants

    from tests.test_hub import _publish_to

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # (published with its peftkit.json)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _publish_to(tmp_path / "hub", "acme/gm", tmp_path / "gm", "a" * 40)
    said = " ".join(cli_user_error(monkeypatch, capsys, "eval", str(recipe), "--merged", "m=acme/gm").split())
    assert (f"--merged m: acme/gm was merged from {tiny_gpt2} (its peftkit.json merged_from), and the comparison's "
            f"base, DPO's reference, is {tiny_llama}") in said, said
    a = _lora(tiny_llama, tmp_path / "a", 1)
    assert CliRunner().invoke(app, ["merge", "--adapter", str(a), "--output", str(tmp_path / "am")]).exit_code == 0
    spelled = _recipe(tmp_path / "spelled", Path(f"{tiny_llama.parent}/../{tiny_llama.parent.name}/{tiny_llama.name}"),
                      pairs, objective="dpo")
    rows, _ = _eval(tmp_path, str(spelled), "--adapter", f"a={a}", "--merged", f"m={tmp_path / 'am'}")
    assert abs(rows["m"]["loss"] - rows["a"]["loss"]) <= 1e-4


def test_a_hub_merged_model_s_base_is_read_at_its_revision(tiny_llama, tiny_gpt2, pairs, tmp_path, monkeypatch):
    """A hub merged model's peftkit.json is read at the revision the row's model loads at, as its weights are (and as
    evaluate_pairs reads its reward_center): commit a of acme/gm merged from GPT-2, commit b (main) from the base. It
    was read at main whatever the revision, so the row at commit a passed the DPO check against the wrong base."""
    from dataclasses import replace

    from huggingface_hub import constants

    from peftkit.compare import comparison_jobs
    from peftkit.compare_preference import _check_merged_bases
    from peftkit.errors import PeftkitError
    from peftkit.eval_job import eval_job
    from tests.test_hub import _publish_to

    for model, out in ((tiny_gpt2, "gm"), (tiny_llama, "lm")):
        adapter = _lora(model, tmp_path / f"{out}-adapter", 1)
        assert CliRunner().invoke(app, ["merge", "--adapter", str(adapter), "--output", str(tmp_path / out)]
                                  ).exit_code == 0
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _publish_to(tmp_path / "hub", "acme/gm", tmp_path / "gm", "a" * 40)
    _publish_to(tmp_path / "hub", "acme/gm", tmp_path / "lm", "b" * 40)  # main is now b
    job = eval_job(_recipe(tmp_path, tiny_llama, pairs, objective="dpo"), [], None, None, None, None, None, None,
                   None, comparing=True)
    rows = comparison_jobs(job, [], [("m", "acme/gm")])
    _check_merged_bases(rows, "DPO")  # at main: merged from the base
    def at(revision: str) -> dict:
        model = rows["m"].source.model.model_copy(update={"revision": revision})
        return rows | {"m": replace(rows["m"], source=replace(rows["m"].source, model=model))}

    for revision in ("b" * 40, "main"):
        _check_merged_bases(at(revision), "DPO")
    with pytest.raises(PeftkitError) as said:
        _check_merged_bases(at("a" * 40), "DPO")
    assert (f"--merged m: acme/gm was merged from {tiny_gpt2} (its peftkit.json merged_from), and the comparison's "
            f"base, DPO's reference, is {tiny_llama}") in " ".join(str(said.value).split())


def test_a_language_model_s_adapter_on_a_reward_model_is_refused_as_such(tiny_llama, pairs, tmp_path, monkeypatch,
                                                                         capsys):
    """A causal LM's LoRA over a reward model's directory (--model, a classifier of one output) was taken for a
    classifier of classes, from the adapter's head it has none of: it is said to be a language model's adapter and
    the model a reward model, with its own base to give, alone, in a comparison and to generate."""
    import shutil

    from transformers import AutoModelForSequenceClassification

    rm = tmp_path / "rm"
    AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1).save_pretrained(rm)
    for file in tiny_llama.iterdir():
        if "token" in file.name or file.suffix in (".jinja", ".txt"):
            shutil.copyfile(file, rm / file.name)
    lm = _lora(tiny_llama, tmp_path / "lm", 1)
    want = (f"{lm} is a language model's adapter (task_type CAUSAL_LM in its adapter_config.json), and {rm} is a "
            f"reward model (a sequence classifier of one output): the adapter was not trained on it. Give --model its "
            f"language model ({tiny_llama}), or evaluate {rm} alone or with a SEQ_CLS adapter trained on it.")
    data = ["--data", str(pairs["eval"]), "--format", "preference"]
    for args in (["eval", "--model", str(rm), "--adapter", str(lm), *data],
                 ["eval", "--model", str(rm), "--adapter", f"lm={lm}", "--adapter", f"r={lm}", *data],
                 ["generate", "--model", str(rm), "--adapter", str(lm), "--prompt", "1+2="]):
        said = " ".join(cli_user_error(monkeypatch, capsys, *args).split())
        assert want in said and "classifier of classes" not in said, (args, said)


def test_a_reward_adapter_s_head_decides_over_the_recipe_s_num_labels(tiny_llama, pairs, tmp_path, monkeypatch,
                                                                       capsys):
    """A one-output reward adapter evaluated on pairs with a classifier recipe of model.num_labels 3 loads with its own
    head (`adapter_labels`), and is scored as the reward model it is, alone and compared: peft's figures. It was
    refused as a classifier of classes, the recipe's number taken over the head's; the other way round, a reward
    recipe (num_labels 1) with a two-class adapter is that classifier of classes."""
    r1, r2 = _reward_adapter(tiny_llama, tmp_path / "r1", 1), _reward_adapter(tiny_llama, tmp_path / "r2", 2)
    write_jsonl(tmp_path / "c.jsonl", [{"text": "a", "label": i % 3} for i in range(6)])
    recipe = make_recipe(tmp_path, tiny_llama, {"train": tmp_path / "c.jsonl", "eval": tmp_path / "c.jsonl"},
                         data={"format": "classification"})
    raw = yaml.safe_load(recipe.read_text())
    raw["model"] |= {"task": "sequence_classification", "num_labels": 3}
    recipe.write_text(yaml.safe_dump(raw))
    data = ["--data", str(pairs["eval"]), "--format", "preference"]
    alone, _ = _eval(tmp_path, str(recipe), "--adapter", str(r1), *data)
    assert _close(alone, _peft_figures(tiny_llama, r1, pairs["eval"]), 1e-4), alone
    rows, _ = _eval(tmp_path, str(recipe), "--adapter", f"r1={r1}", "--adapter", f"r2={r2}", *data)
    for name, adapter in (("r1", r1), ("r2", r2)):
        assert _close(rows[name], _peft_figures(tiny_llama, adapter, pairs["eval"]), 1e-4), (name, rows[name])
    reward = _recipe(tmp_path / "reward", tiny_llama, pairs, model_keys={"task": "sequence_classification"},
                     objective="reward")
    base, _ = _eval(tmp_path, str(reward))  # (the base row: a one-output classifier, its new head from seed 0)
    assert _close(rows["base"], base), (rows["base"], base)
    classes = _reward_adapter(tiny_llama, tmp_path / "c2", 3, outputs=2)
    said = " ".join(cli_user_error(monkeypatch, capsys, "eval", str(reward), "--adapter", str(classes)).split())
    assert "is a classifier of classes, not a reward model" in said
