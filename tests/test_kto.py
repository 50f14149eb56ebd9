"""training.objective: kto on data.format: unpaired: the rows and their mismatched examples as tokenized, the loss
against its formula and against TRL's KTOTrainer, a run's evaluation again through `peftkit eval`, and the recipe's
and the data's errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import cli_user_error, load_fp32, logged_steps, make_recipe, save_random_adapter, starting_from, unplaced
from peftkit.data import IGNORE_INDEX
from peftkit.data.unpaired import load_unpaired, mismatched
from peftkit.errors import PeftkitError
from peftkit.kto import KTOLoss
from peftkit.modeling import load_tokenizer
from peftkit.recipe import DataConfig, ModelConfig, load_recipe
from peftkit.tiny import write_jsonl
from peftkit.train import train


def _row(a: int, b: int, good: bool) -> dict:
    return {"prompt": f"{a}+{b}=", "completion": str(a + b) if good else str(-a - b), "label": good}


@pytest.fixture(scope="module")
def unpaired_data(tmp_path_factory) -> dict[str, Path]:
    """Sums, the right answer desirable and its negative not, in a random order."""
    import random

    root, rng = tmp_path_factory.mktemp("unpaired"), random.Random(0)
    for name, n in (("train", 32), ("eval", 8)):
        write_jsonl(root / f"{name}.jsonl", [_row(rng.randint(1, 50), rng.randint(1, 50), rng.random() < 0.5)
                                             for _ in range(n)])
    return {"train": root / "train.jsonl", "eval": root / "eval.jsonl"}


def _kto_recipe(tmp_path: Path, model: Path, data: dict, **training) -> Path:
    return make_recipe(tmp_path, model, data, data={"format": "unpaired", "max_length": 64},
                       adapter={"dropout": 0.0}, training={"objective": "kto", "lr": 2e-2, **training})


def _tok(model: Path):
    return load_tokenizer(ModelConfig(name_or_path=str(model)))


def test_each_answer_s_mismatched_example_is_its_prompt_with_the_answer_before_it_in_its_batch(tiny_llama, tmp_path):
    """Within each run of `chunk` rows (a batch's, as TRL's KTOTrainer pairs them): row i's prompt with the answer of
    row i - 1, the run's first with its last's; a conversation's prompt keeps its own assistant turn as context."""
    parts = [(f"p{i}", f"a{i}", {}) for i in range(7)]
    assert [(p, a) for p, a, _ in mismatched(parts, 3)] == [("p0", "a2"), ("p1", "a0"), ("p2", "a1"), ("p3", "a5"),
                                                            ("p4", "a3"), ("p5", "a4"), ("p6", "a6")]
    prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
              {"role": "user", "content": "2+2?"}]
    rows = [{"prompt": prompt, "completion": "4", "label": True},
            {"prompt": [{"role": "user", "content": "3+3?"}], "completion": [{"role": "assistant", "content": "7"}],
             "label": False}]
    write_jsonl(tmp_path / "rows.jsonl", rows)
    tok = _tok(tiny_llama)
    data, _ = load_unpaired(tok, str(tmp_path / "rows.jsonl"), None, DataConfig(train="x", format="unpaired"), 2)
    assert data.desirable == [True, False] and len(data) == 2
    texts = [tok.decode(e.input_ids) for e in data.examples]
    trained = [tok.decode([t for t in e.labels if t != IGNORE_INDEX]) for e in data.examples]
    assert [t[:1] for t in trained] == ["4", "7", "7", "4"]  # example 0, its mismatched (row 1's answer), ...
    assert "hello" in texts[0] and "hello" in texts[1] and "hello" not in trained[0] + trained[1]
    assert "3+3?" in texts[2] and "3+3?" in texts[3] and "2+2?" not in texts[3]


def test_the_loss_is_kto_s_formula_with_the_kl_estimate_clamped_and_constant():
    """Hand-computed: the KL estimate is the mean of the mismatched examples' log-ratios (those that count), at least
    0, and carries no gradient; a desirable answer's loss w_d (1 - sigmoid(beta (r - z))), an undesirable one's
    w_u (1 - sigmoid(beta (z - r)))."""
    loss = KTOLoss(beta=0.5, desirable_weight=1.0, undesirable_weight=2.0)
    logps = torch.tensor([-3.0, -2.0, -4.0, -5.0, -1.0, -9.0], requires_grad=True)  # (example, mismatched) x 3
    reference = torch.tensor([-3.5, -3.0, -3.0, -5.5, -2.0, -9.0])
    desirable, real = torch.tensor([True, False, True]), torch.tensor([1.0, 1.0, 0.0])
    out, reward, kl = loss.examples(logps, reference, desirable, real)
    z = (1.0 + 0.5) / 2  # the two real mismatched log-ratios
    r = torch.tensor([0.5, -1.0, 1.0])
    expected = torch.stack([1 - torch.sigmoid(0.5 * (r[0] - z)), 2.0 * (1 - torch.sigmoid(0.5 * (z - r[1]))),
                            1 - torch.sigmoid(0.5 * (r[2] - z))])
    assert torch.allclose(out, expected) and torch.allclose(reward, 0.5 * r) and abs(float(kl) - z) < 1e-7
    out.sum().backward()
    assert (logps.grad[1::2] == 0).all() and (logps.grad[0::2] != 0).all()  # z is a constant
    assert float(loss.examples(logps, reference + 5.0, desirable, real)[2]) == 0.0  # clamped at 0


def _ours_and_trl_s(tiny_llama: Path, tmp_path: Path, rows: list[dict], steps: int):
    """KTO on adapter.init_from (an SFT adapter far from identity) in peftkit and in TRL's KTOTrainer on a PeftModel
    of it (its reference a frozen copy, as peftkit's is that adapter as training starts), SGD over the whole batch of
    `rows` (data.eval too) with an undesirable weight of 1.5: (peftkit's training lines, TRL's, TRL's model)."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoTokenizer

    from peftkit.methods.lora import LoraConfig

    sft = save_random_adapter(tiny_llama, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"),
                              tmp_path / "sft", seed=2, std=0.3)
    write_jsonl(tmp_path / "rows.jsonl", rows)
    lr, beta = 1.0, 0.3
    recipe = _kto_recipe(tmp_path, tiny_llama, {"train": tmp_path / "rows.jsonl", "eval": tmp_path / "rows.jsonl"},
                         max_steps=steps, batch_size=len(rows), optimizer="sgd", lr=lr, scheduler="constant",
                         warmup_steps=0, kto_beta=beta, kto_undesirable_weight=1.5)
    starting_from(recipe, sft)
    train(load_recipe(recipe))
    ours = logged_steps(tmp_path / "run")

    model = PeftModel.from_pretrained(load_fp32(tiny_llama).train(), sft, is_trainable=True)
    args = trl.KTOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(rows), max_steps=steps,
                         learning_rate=lr, optim="sgd", lr_scheduler_type="constant", warmup_steps=0, beta=beta,
                         undesirable_weight=1.5, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1,
                         bf16=False)
    trainer = trl.KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=AutoTokenizer.from_pretrained(tiny_llama))
    trainer.train()
    return ours, [x for x in trainer.state.log_history if "loss" in x], model


TRL_NAMES = {"loss": "loss", "reward_margin": "rewards/margins", "chosen_reward": "rewards/chosen",
             "rejected_reward": "rewards/rejected", "kl": "kl"}
"""peftkit's training figures by the names TRL's KTOTrainer logs them under."""


def test_kto_from_an_sft_adapter_trains_as_trl_s_kto_trainer(tiny_llama, tmp_path):
    """KTO against TRL's KTOTrainer (`_ours_and_trl_s`): four SGD steps over a batch of 3 desirable answers and 1
    undesirable give TRL's losses, rewards, margins and KL estimates (positive from the second step) at every step,
    and its adapter; the undesirable answer ends with the EOS's text, which both score once."""
    from safetensors.torch import load_file

    rows = [_row(3, 4, True), _row(10, 20, True), _row(1, 1, True), _row(7, 8, False)]
    rows[3]["completion"] += "</s>"  # (TRL appends no EOS to an answer ending with it, nor does peftkit now)
    ours, theirs, model = _ours_and_trl_s(tiny_llama, tmp_path, rows, steps=4)
    assert theirs[-1]["kl"] > 0.1 and theirs[-1]["loss"] < theirs[0]["loss"] - 1e-3  # the KL term is exercised
    for a, b in zip(ours, theirs, strict=True):
        assert all(abs(a[k] - b[v]) <= 1e-5 for k, v in TRL_NAMES.items()), (a, b)
    ours_final = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    trained = {k.replace(".default", ""): v for k, v in model.state_dict().items() if ".default." in k}
    assert set(ours_final) == set(trained)
    assert max((ours_final[k] - trained[k]).abs().max().item() for k in ours_final) <= 1e-5


def test_a_batch_without_undesirable_answers_has_no_margin_as_in_trl(tiny_llama, tmp_path, monkeypatch, capsys):
    """A batch of desirable answers alone logged a reward_margin of the chosen mean less 0 and a rejected_reward of
    0. TRL's KTOTrainer logs neither rewards/rejected nor rewards/margins for it: peftkit's training lines leave out
    the same keys and give TRL's other figures (<= 1e-5); an evaluation of such answers records both as null
    (metrics.jsonl, `peftkit eval --json`), printed `n/a`; a batch of undesirable answers alone has no chosen_reward
    nor margin. KTOLoss.figures by hand."""
    from peftkit.cli import main

    rows = [_row(3, 4, True), _row(10, 20, True), _row(1, 1, True)]
    ours, theirs, _ = _ours_and_trl_s(tiny_llama, tmp_path, rows, steps=2)
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs, strict=True):
        assert set(TRL_NAMES.values()) - b.keys() == {"rewards/rejected", "rewards/margins"}, b
        assert set(TRL_NAMES) - a.keys() == {"rejected_reward", "reward_margin"}, a
        assert all(abs(a[k] - b[v]) <= 1e-5 for k, v in TRL_NAMES.items() if v in b), (a, b)
    evaluation = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
                  if "eval_loss" in x][-1]
    assert evaluation["eval_reward_margin"] is None and evaluation["eval_rejected_reward"] is None
    assert evaluation["eval_chosen_reward"] > 0 or evaluation["eval_chosen_reward"] <= 0  # (a number)
    monkeypatch.setattr("sys.argv", ["peftkit", "eval", str(tmp_path / "run"), "--json", str(tmp_path / "e.json")])
    main()
    got = json.loads((tmp_path / "e.json").read_text())
    assert got["reward_margin"] is None and got["rejected_reward"] is None
    assert abs(got["chosen_reward"] - evaluation["eval_chosen_reward"]) <= 1e-5
    assert f"reward_margin n/a  chosen_reward {got['chosen_reward']:.4f}  rejected_reward n/a" in capsys.readouterr().out

    # sums: loss, examples, desirable, undesirable, their rewards' sums, KL x examples
    assert KTOLoss.figures(torch.tensor([1.2, 3.0, 3.0, 0.0, 0.6, 0.0, 0.3])) == pytest.approx(
        {"loss": 0.4, "reward_margin": None, "chosen_reward": 0.2, "rejected_reward": None, "kl": 0.1})
    assert KTOLoss.figures(torch.tensor([1.2, 2.0, 0.0, 2.0, 0.0, -0.6, 0.2])) == pytest.approx(
        {"loss": 0.6, "reward_margin": None, "chosen_reward": None, "rejected_reward": -0.3, "kl": 0.1})
    assert KTOLoss.figures(torch.tensor([1.2, 3.0, 1.0, 2.0, 0.5, -0.6, 0.3])) == pytest.approx(
        {"loss": 0.4, "reward_margin": 0.8, "chosen_reward": 0.5, "rejected_reward": -0.3, "kl": 0.1})
    # None is never the best value of export.best / early stopping, and a comparison's cell `n/a`, without a Δ
    from rich.console import Console

    from peftkit.compare import BASE, comparison_table
    from peftkit.selection import Watch

    watch = Watch("reward_margin", lower=False)
    assert watch.see(1, None) is False and watch.see(2, 0.5) is True and (watch.value, watch.step) == (0.5, 2)
    console = Console(record=True, width=200)
    console.print(comparison_table({BASE: {"reward_margin": None}, "a": {"reward_margin": 0.25},
                                    "b": {"reward_margin": None}}, ["reward_margin"]))
    table = console.export_text()
    assert [[cell.strip() for cell in line.split("│")[1:4]] for line in table.splitlines()
            if line.startswith("│")] == [["base", "n/a", ""], ["a", "0.2500", ""], ["b", "n/a", ""]], table


def test_a_run_learns_and_eval_gives_its_last_evaluation(tiny_llama, unpaired_data, tmp_path):
    """A KTO run raises the desirable answers' rewards over the undesirable ones'; `peftkit eval RUN_DIR` and the
    adapter alone (`--adapter DIR --data FILE --format unpaired`, KTO's defaults: the recipe's beta 0.1 too) give its
    last evaluation."""
    from typer.testing import CliRunner

    from peftkit.cli import app

    train(load_recipe(_kto_recipe(tmp_path, tiny_llama, unpaired_data, max_steps=12, eval_steps=6)))
    run = tmp_path / "run"
    last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x][-1]
    assert last["eval_reward_margin"] > 0.1 and last["eval_loss"] < 0.5  # 0.5: every reward 0, the start
    for args in ([str(run)], ["--adapter", str(run / "adapter"), "--data", str(unpaired_data["eval"]),
                              "--format", "unpaired"]):
        result = CliRunner().invoke(app, ["eval", *args, "--json", str(tmp_path / "f.json")])
        assert result.exit_code == 0, result.output + repr(result.exception)
        got = json.loads((tmp_path / "f.json").read_text())
        assert got["num_examples"] == 8 and all(abs(got[k] - last[f"eval_{k}"]) <= 1e-5 for k in KTOLoss.FIGURES)
        # (the count was shown as a classifier's 'rows 8')
        assert f"loss {got['loss']:.4f}  answers 8  reward_margin {got['reward_margin']:.4f}" in result.output
    assert "Objective: KTO (beta 0.1)" in (run / "adapter" / "README.md").read_text()


@pytest.mark.parametrize("flags, said", [
    # a batch of one answer is its own mismatched example: the KL estimate would be its reward (the figures were given
    # as if it were one)
    (["--batch-size", "1"], "--batch-size 1: KTO's figures estimate the KL term from each answer's prompt with another "
                            "answer of its batch, and a batch of one has none"),
    # (said 'preference pairs ... scored by the preference figures (loss, reward_accuracy, ...)')
    (["--metrics", "exact_match"], "--metrics: unpaired answers (data.format 'unpaired') are scored by KTO's figures "
                                   "(loss, reward_margin, chosen_reward, rejected_reward, kl), and nothing is generated"),
])
def test_eval_flags_that_do_not_fit_unpaired_answers_are_refused(tiny_llama, unpaired_data, tmp_path, monkeypatch,
                                                                 capsys, flags, said):
    from peftkit.methods.lora import LoraConfig

    adapter = save_random_adapter(tiny_llama, LoraConfig(r=4, alpha=8, target_modules="all-linear"), tmp_path / "a",
                                  seed=1)
    err = cli_user_error(monkeypatch, capsys, "eval", "--adapter", str(adapter), "--data", str(unpaired_data["eval"]),
                         "--format", "unpaired", *flags)
    assert said in " ".join(err.split()), err


@pytest.mark.parametrize("change, said", [
    ({"data": {"format": "preference"}}, "KTO trains on unpaired answers (data.format: unpaired"),
    ({"training": {"objective": "dpo"}}, "training.objective is dpo and data.format is unpaired: KTO trains on"),
    ({"training": {"batch_size": 1}}, "training.batch_size: 1: KTO estimates the KL term"),
    ({"training": {"kto_beta": 0.2, "objective": "sft"}, "data": {"format": "alpaca"}},
     "training.kto_beta is a setting of training.objective: kto"),
    # (said in pairs' terms, "preference data ... (it has two) ... reward_accuracy", "every dataset read as data.format
    # preference", before)
    ({"eval": {"metrics": ["exact_match"]}}, "eval.metrics: exact_match score generated answers against a reference, "
     "which unpaired answers do not have (each is labelled desirable or not); remove them: a kto run's evaluations "
     "report loss, reward_margin, kl, chosen_reward, rejected_reward"),
    ({"eval": {"batch_size": 1}}, "eval.batch_size: 1: KTO's evaluation estimates the KL term from each answer's "
     "prompt with another answer of its evaluation batch, and a batch of one has none"),
    ({"data": {"train_on": "all"}}, "data.train_on: all: kto compares each answer's likelihood with the reference's"),
    ({"data": {"packing": True}}, "data.packing: a kto batch holds each answer and its mismatched example side by side"),
    ({"data": {"eval": {"a": "EVAL", "b": {"path": "EVAL", "format": "alpaca"}}}},
     "data.eval.b.format: a kto run evaluates unpaired answers, every set read as data.format unpaired; remove it"),
])
def test_recipe_mistakes_about_kto_are_said_at_their_key(tiny_llama, unpaired_data, tmp_path, monkeypatch, capsys,
                                                         change, said):
    recipe = _kto_recipe(tmp_path, tiny_llama, unpaired_data)
    raw = yaml.safe_load(recipe.read_text())
    for section, keys in change.items():
        raw[section] |= keys
    recipe.write_text(yaml.safe_dump(raw).replace("EVAL", str(unpaired_data["eval"])))
    assert said in " ".join(cli_user_error(monkeypatch, capsys, "train", str(recipe)).split())


@pytest.mark.parametrize("row, said", [
    ({"prompt": "1+1=", "completion": "2"}, "missing field 'label'"),
    ({"prompt": "1+1=", "completion": "2", "label": "yes"}, "field 'label' must be true (a desirable answer) or false"),
    ({"prompt": [{"role": "user", "content": "1+1?"}], "completion": [{"role": "user", "content": "2"}],
      "label": True}, "'completion' has no assistant message"),
    ({"prompt": "1+1=", "completion": "", "label": True}, "field 'completion' is empty"),
    ({"prompt": [{"role": "user", "content": "1+1?"}], "completion": "2", "label": True},
     "a conversation, and the first row"),
    ({"prompt": "1+1=", "completion": "</s>", "label": True}, "field 'completion' is the EOS's text '</s>' alone"),
])
def test_a_bad_row_is_named_by_its_line_and_field(tiny_llama, unpaired_data, tmp_path, monkeypatch, capsys, row, said):
    """Said alike by train, by validate (data.train, and a set of data.eval's) and by eval's prompts (samples)."""
    from peftkit.data.prompts import load_prompts

    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [_row(1, 2, True), row])
    recipe = _kto_recipe(tmp_path, tiny_llama, {"train": bad, "eval": unpaired_data["eval"]})
    err = " ".join(cli_user_error(monkeypatch, capsys, "train", str(recipe)).split())
    assert f"{bad}:2" in err and said in err, err
    validated = cli_user_error(monkeypatch, capsys, "validate", str(recipe))
    assert " ".join(unplaced(validated, recipe).split()) == err, validated
    swapped = _kto_recipe(tmp_path / "swapped", tiny_llama, {"train": unpaired_data["train"], "eval": bad})
    err = " ".join(cli_user_error(monkeypatch, capsys, "validate", str(swapped)).split())
    assert f"{bad}:2" in err and said in err, err
    with pytest.raises(PeftkitError) as raised:
        load_prompts(_tok(tiny_llama), str(bad), None, load_recipe(swapped).data.for_eval("eval"))
    assert "error: " + " ".join(str(raised.value).split()) == err, raised.value


def test_export_best_on_kl_keeps_the_adapter_nearest_the_reference(tiny_llama, unpaired_data, tmp_path):
    """`kl` (the KL estimate, the policy's drift from the reference) and `rejected_reward` are better lower under
    mode auto: export.best: kl exports the evaluation of the smallest eval_kl (the earliest of ties). It took the
    largest, the adapter furthest from the reference."""
    from peftkit.selection import lower_is_better

    recipe = _kto_recipe(tmp_path, tiny_llama, unpaired_data, max_steps=6, eval_steps=2)
    raw = yaml.safe_load(recipe.read_text())
    raw["export"]["best"] = "kl"
    recipe.write_text(yaml.safe_dump(raw))
    train(load_recipe(recipe))
    run = tmp_path / "run"
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]
    assert len({e["eval_kl"] for e in evals}) > 1, evals  # (else any choice passes)
    best = min(evals, key=lambda e: (e["eval_kl"], e["step"]))
    assert json.loads((run / "manifest.json").read_text())["metrics"]["best"]["step"] == best["step"]
    assert lower_is_better("general.rejected_reward") and not lower_is_better("reward_margin")


@pytest.mark.parametrize("watch, rows, said", [
    ({"export": {"best": "reward_margin"}, "training": {"eval_steps": 2}}, [True, True],
     "export.best follows reward_margin, which data.eval never defines: none of its 2 answers is an undesirable one "
     "(`label: false`)"),
    ({"training": {"early_stopping": {"metric": "chosen_reward"}, "eval_steps": 2}}, [False, False],
     "training.early_stopping.metric follows chosen_reward, which data.eval never defines: none of its 2 answers is a "
     "desirable one (`label: true`)"),
])
def test_following_a_reward_the_eval_set_never_defines_is_refused_before_training(
        tiny_llama, unpaired_data, tmp_path, monkeypatch, capsys, watch, rows, said):
    """A KTO eval set of one kind of answer has no margin (`KTOLoss.figures`: None), and no mean reward of the other
    kind: early stopping or export.best following one trained the whole run unable to choose."""
    one_kind = tmp_path / "one_kind.jsonl"
    write_jsonl(one_kind, [_row(i, 2, good) for i, good in enumerate(rows, 1)])
    recipe = _kto_recipe(tmp_path, tiny_llama, {"train": unpaired_data["train"], "eval": one_kind}, max_steps=4)
    raw = yaml.safe_load(recipe.read_text())
    for section, keys in watch.items():
        raw[section] |= keys
    recipe.write_text(yaml.safe_dump(raw))
    assert said in " ".join(cli_user_error(monkeypatch, capsys, "train", str(recipe)).split())
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_rows_of_two_forms_across_data_train_s_datasets_are_named_both(tiny_llama, tmp_path):
    """data.train lists a dataset of text answers and one of conversations: the error names the row and the first
    row it differs from (it said 'in a dataset whose first row is a text answer' of the conversations' own file)."""
    from peftkit.errors import PeftkitError

    write_jsonl(tmp_path / "text.jsonl", [_row(1, 2, True), _row(2, 3, False)])
    write_jsonl(tmp_path / "chat.jsonl", [{"prompt": [{"role": "user", "content": "1+1?"}], "completion": "2",
                                           "label": True}])
    files = [str(tmp_path / "text.jsonl"), str(tmp_path / "chat.jsonl")]
    with pytest.raises(PeftkitError) as error:
        load_unpaired(_tok(tiny_llama), files, None, DataConfig(train=files, format="unpaired"), 2)
    assert str(error.value) == (f"{tmp_path / 'chat.jsonl'}:1: a conversation, and the first row "
                                f"({tmp_path / 'text.jsonl'}:1) is a text answer; give every row the same form "
                                "(every dataset's, where data.train lists several)")


def test_a_reference_that_is_not_finite_is_said_in_answers(tiny_llama, unpaired_data, tmp_path, monkeypatch, capsys):
    """As DPO's (tests/test_preference.py), in KTO's words: answers, not pairs."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight[7, 0] = float("inf")
    model.save_pretrained(tmp_path / "broken")
    _tok(tiny_llama).save_pretrained(tmp_path / "broken")
    err = " ".join(cli_user_error(monkeypatch, capsys, "train",
                                  str(_kto_recipe(tmp_path, tmp_path / "broken", unpaired_data))).split())
    assert "gives 32 of the 32 answers of data.train a log-probability that is not finite (the first: answer 1" in err
    assert "KTO would stop at its first step" in err



def test_the_kl_estimate_is_summed_across_the_processes_sharing_a_batch():
    """With several processes each holds a share of a batch: the KL estimate is the whole batch's, its sum and count
    added across them (accelerate's reduce: here a stand-in for a second process holding the same share, so the
    sums double and the mean stays; a share with another mean moves it). By hand, 2 real processes x 2 answers gave
    1 x 4's losses, KL estimates and adapter (<= 1e-5); that run as a test once failed in CI at gloo's teardown after
    a finished run ('terminate called without an active exception'), so it is not in the suite."""
    class Twin:  # the other process's share: sums `other` in
        num_processes = 2

        def __init__(self, other: torch.Tensor) -> None:
            self.other = other

        def reduce(self, value: torch.Tensor, reduction: str) -> torch.Tensor:
            assert reduction == "sum"
            return value + self.other

    logps = torch.tensor([-3.0, -2.0, -4.0, -5.0])  # (example, mismatched) x 2
    reference = torch.tensor([-3.5, -3.0, -3.0, -6.0])  # mismatched log-ratios 1.0 and 1.0
    desirable, real = torch.tensor([True, False]), torch.tensor([1.0, 1.0])
    alone = KTOLoss(0.5).examples(logps, reference, desirable, real)[2]
    assert float(alone) == 1.0
    shared = KTOLoss(0.5, processes=Twin(torch.tensor([5.0, 2.0]))).examples(logps, reference, desirable, real)[2]
    assert float(shared) == (2.0 + 5.0) / 4  # the other share's log-ratios sum to 5 over 2 answers


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
def test_unpaired_answers_without_an_adapter_are_refused_whatever_the_recipe_s_objective(tiny_llama, unpaired_data,
                                                                                        tmp_path, monkeypatch, capsys,
                                                                                        objective):
    """KTO's figures, by which unpaired answers are scored, need an adapter over its reference: an ORPO or SimPO
    recipe (whose own figures need none) on --format unpaired without --adapter is a user error, said in a line.
    (The recipe's objective was asked, not KTO's: the reference loaded an adapter of None, a TypeError.)"""
    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(pairs, [{"prompt": "1+2=", "chosen": "3", "rejected": "-3"}] * 2)
    recipe = make_recipe(tmp_path, tiny_llama, {"train": pairs, "eval": pairs},
                         data={"format": "preference", "max_length": 64}, training={"objective": objective})
    err = cli_user_error(monkeypatch, capsys, "eval", str(recipe), "--data", str(unpaired_data["eval"]), "--format",
                         "unpaired")
    assert ("KTO's figures compare an adapter with its base (the reference, as KTO training does), and "
            f"{tiny_llama} has no adapter: pass --adapter DIR, or a KTO run's directory.") in " ".join(err.split())


def test_unpaired_rows_get_the_data_warnings_of_sft_rows(tiny_llama, tmp_path):
    """A text answer ending with the EOS's text is scored through that one EOS, as TRL's KTOTrainer appends none to
    it (the old code appended a second, '4</s></s>', its mismatched example too, and warned), one whose EOS is
    followed by more (`5</s>\n`) gets one appended, as in TRL, and the warning SFT rows (and preference pairs) get;
    conversations under a chat template's default system prompt get theirs, naming the first row."""
    from peftkit.data.checks import describe_stats
    from peftkit.tiny import CHAT_TEMPLATE

    tok, cfg = _tok(tiny_llama), DataConfig(train="x", format="unpaired", max_length=80)
    write_jsonl(tmp_path / "text.jsonl", [{"prompt": "1+1=", "completion": "2", "label": True},
                                          {"prompt": "1+2=", "completion": f"4{tok.eos_token}", "label": False},
                                          {"prompt": "2+2=", "completion": f"5{tok.eos_token}\n", "label": False}])
    data, stats = load_unpaired(tok, str(tmp_path / "text.jsonl"), None, cfg, 3, cache=False)
    answers = [tok.decode([t for t in e.labels if t != IGNORE_INDEX]) for e in (data[1][0], data[2][1], data[2][0])]
    assert answers == ["4</s>", "4</s>", "5</s>\n</s>"]  # (row 3's mismatched example: its prompt, row 2's answer)
    said = " ".join(describe_stats(stats, cfg))
    assert (f"1 of 3 rows hold the text of a special token, which the tokenizer encodes as that token, not as text "
            f"(first: {tmp_path / 'text.jsonl'}:3: field 'completion' ends with '</s>', and peftkit appends an EOS to "
            "it too (two EOS))") in said, said
    assert stats["form"] == "completion"  # (manifest.json's data_form)
    tok.chat_template = "{% if messages[0]['role'] != 'system' %}<|system|>\nYou are a helpful model.</s>\n{% endif %}" \
        + CHAT_TEMPLATE
    write_jsonl(tmp_path / "chat.jsonl", [{"prompt": [{"role": "user", "content": f"1+{n}?"}], "completion": str(n + 1),
                                           "label": n % 2 == 0} for n in range(2)])
    stats = load_unpaired(tok, str(tmp_path / "chat.jsonl"), None, cfg, 2, cache=False)[1]
    said = " ".join(describe_stats(stats, cfg))
    assert "default system prompt of 23 tokens (29% of data.max_length=80) to each of the 2 conversations" in said, said
    assert stats["form"] == "chat"


def test_a_special_token_s_text_in_an_unpaired_conversation_is_warned_of_as_in_sft_chat(tiny_llama, tmp_path):
    """'</s>' typed into a message of KTO's conversation rows is read as the token itself: SFT's data warning names
    the row's line and message (no warning on the old code), and data.system_prompt holding it each row it opens; a
    system message the chat template leaves out is said too."""
    from peftkit.data.checks import describe_stats

    tok, cfg = _tok(tiny_llama), DataConfig(train="x", format="unpaired")
    write_jsonl(tmp_path / "chat.jsonl", [{"prompt": [{"role": "user", "content": "1+1?"}], "completion": "2",
                                           "label": True},
                                          {"prompt": [{"role": "user", "content": "1+2?</s>"}], "completion": "4",
                                           "label": False}])
    said = " ".join(describe_stats(load_unpaired(tok, str(tmp_path / "chat.jsonl"), None, cfg, 2, cache=False)[1], cfg))
    assert (f"1 of 2 rows hold the text of a special token, which the tokenizer encodes as that token, not as text "
            f"(first: {tmp_path / 'chat.jsonl'}:2: prompt[0].content holds '</s>')") in said, said
    given = cfg.model_copy(update={"system_prompt": "Be brief.</s>"})  # said of each row it opens, as in SFT
    said = " ".join(describe_stats(load_unpaired(tok, str(tmp_path / "chat.jsonl"), None, given, 2, cache=False)[1],
                                   given))
    assert (f"2 of 2 rows hold the text of a special token, which the tokenizer encodes as that token, not as text "
            f"(first: {tmp_path / 'chat.jsonl'}:1: data.system_prompt holds '</s>')") in said, said
    # a system message the chat template leaves out (Mistral v0.3's) is said as SFT's is (no warning on the old code)
    from test_data_checks import SYSTEM_IN_LAST_USER_TURN

    tok.chat_template = SYSTEM_IN_LAST_USER_TURN
    write_jsonl(tmp_path / "left.jsonl", [{"prompt": [{"role": "user", "content": "1+1?"}], "completion": "2",
                                           "label": True},
                                          {"prompt": [{"role": "system", "content": "Be terse."},
                                                      {"role": "user", "content": "1+2?"}], "completion": "4",
                                           "label": False}])
    for data, first in ((cfg, "1 of 2 conversations (first: {}:2: prompt[0])"),
                        (cfg.model_copy(update={"system_prompt": "Be brief."}),
                         "2 of 2 conversations (first: {}:1: data.system_prompt)")):
        said = " ".join(describe_stats(load_unpaired(tok, str(tmp_path / "left.jsonl"), None, data, 2, cache=False)[1],
                                       data))
        assert "the chat template leaves the system message out of " + first.format(tmp_path / "left.jsonl") in said
