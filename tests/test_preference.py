"""training.objective: dpo on data.format: preference: the pairs as tokenized, the DPO loss against a dense
computation of its formula, a run's evaluations against the exported adapter in peft, resume, and the recipe's and
the data's errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch.nn import functional as F

from conftest import cli_user_error, load_fp32, logged_steps, make_recipe, random_adapters, starting_from, unplaced
from peftkit.data import IGNORE_INDEX, load_examples
from peftkit.data.preference import PairCollator, load_pairs
from peftkit.errors import PeftkitError
from peftkit.modeling import load_tokenizer
from peftkit.preference import PreferenceLoss
from peftkit.recipe import DataConfig, ModelConfig, load_recipe
from peftkit.tiny import write_jsonl
from peftkit.train import train


def _sums(a: int, b: int, wrong: int) -> dict:
    return {"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + wrong)}


@pytest.fixture(scope="module")
def pairs_data(tmp_path_factory) -> dict[str, Path]:
    """Sums, the chosen answer right and the rejected one its negative (a preference the tiny model can learn)."""
    import random

    root, rng = tmp_path_factory.mktemp("pairs"), random.Random(0)
    for name, n in (("train", 48), ("eval", 12)):
        sums = [(rng.randint(1, 50), rng.randint(1, 50)) for _ in range(n)]
        write_jsonl(root / f"{name}.jsonl", [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(-a - b)}
                                             for a, b in sums])
    return {"train": root / "train.jsonl", "eval": root / "eval.jsonl"}


def _dpo_recipe(tmp_path: Path, model: Path, data: dict, **training) -> Path:
    return make_recipe(tmp_path, model, data, data={"format": "preference", "max_length": 64},
                       adapter={"dropout": 0.0}, training={"objective": "dpo", "lr": 2e-2, **training})


def _tok(model: Path):
    return load_tokenizer(ModelConfig(name_or_path=str(model)))


def test_text_pairs_are_the_two_completions_of_the_prompt(tiny_llama, tmp_path):
    """A text pair is two examples, each as data.format completion tokenizes {prompt, completion}: chosen at 2i,
    rejected at 2i + 1."""
    rows = [_sums(3, 4, 2), _sums(10, 20, 5)]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    write_jsonl(tmp_path / "completions.jsonl", [{"prompt": r["prompt"], "completion": r[k]}
                                                 for r in rows for k in ("chosen", "rejected")])
    tok = _tok(tiny_llama)
    pairs, stats = load_pairs(tok, str(tmp_path / "pairs.jsonl"), None, DataConfig(train="x", format="preference"))
    completions, _ = load_examples(tok, str(tmp_path / "completions.jsonl"), None,
                                   DataConfig(train="x", format="completion"), cache=False)
    assert len(pairs) == 2 and stats["examples"] == 2
    assert list(pairs.examples) == list(completions)
    chosen, rejected, reference = pairs[1]
    assert tok.decode([t for t in chosen.labels if t != IGNORE_INDEX]) == "30</s>"
    assert tok.decode([t for t in rejected.labels if t != IGNORE_INDEX]) == "35</s>"
    assert reference is None


def test_a_conversation_pair_trains_its_answer_alone_and_its_implicit_prompt_is_the_shared_opening(tiny_llama,
                                                                                                tmp_path):
    """A conversation's answer is labelled, the prompt's own assistant turn is not; without `prompt` the messages
    both conversations open with are the prompt (TRL's implicit prompt); a string answer is one assistant message."""
    prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
              {"role": "user", "content": "2+2?"}]
    rows = [{"prompt": prompt, "chosen": "4", "rejected": [{"role": "assistant", "content": "5"}]},
            {"chosen": [*prompt, {"role": "assistant", "content": "4"}],
             "rejected": [*prompt, {"role": "assistant", "content": "5"}]}]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    tok = _tok(tiny_llama)
    pairs, stats = load_pairs(tok, str(tmp_path / "pairs.jsonl"), None, DataConfig(train="x", format="preference"))
    assert list(pairs.examples)[:2] == list(pairs.examples)[2:]  # the explicit and the implicit prompt alike
    assert stats["form"] == "chat"  # (manifest.json's data_form: tests/test_generate.py)
    for example, answer in zip(pairs.examples, "4545", strict=True):
        trained = tok.decode([t for t in example.labels if t != IGNORE_INDEX])
        assert trained.startswith(answer) and "hello" not in trained and len(trained) < 12, trained
        assert "hello" in tok.decode(example.input_ids)


def test_conversation_rows_on_a_tokenizer_without_a_template_are_said_as_their_format_s(tiny_llama, tmp_path):
    """Preference pairs (and KTO's unpaired rows) given as conversations need a chat template: without one they were
    said as data.format 'chat' ("data.format is 'chat' but ... use another format"), a format the recipe never named.
    The error names the recipe's format and the text form that needs none."""
    from peftkit.data.unpaired import load_unpaired

    tok = _tok(tiny_llama)
    tok.chat_template = None
    prompt = [{"role": "user", "content": "2+2?"}]
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": prompt, "chosen": "4", "rejected": "5"}])
    write_jsonl(tmp_path / "rows.jsonl", [{"prompt": prompt, "completion": "4", "label": True},
                                          {"prompt": prompt, "completion": "5", "label": False}])
    with pytest.raises(PeftkitError) as pairs:
        load_pairs(tok, str(tmp_path / "pairs.jsonl"), None, DataConfig(train="x", format="preference"))
    with pytest.raises(PeftkitError) as rows:
        load_unpaired(tok, str(tmp_path / "rows.jsonl"), None, DataConfig(train="x", format="unpaired"), 2)
    for error, fmt, fields in ((pairs, "preference", "prompt, chosen and rejected"),
                               (rows, "unpaired", "prompt and completion")):
        assert str(error.value) == (
            f"data.format '{fmt}' rows given as conversations need the tokenizer's chat_template, and it has none (a "
            "base model's has none); set data.chat_template (chatml, llama3, a .jinja file, or a tokenizer directory "
            f"to copy it from), use a tokenizer with a template, or give the rows as text ({fields} strings).")


def test_conversation_rows_given_by_the_format_flag_are_not_told_a_recipe_key(tiny_llama, tmp_path):
    """The same error where --format gave the format (`peftkit eval --format preference` without a recipe): there is no
    data.chat_template to set, so it says what the flag's own chat error says (a model with a template, or a recipe)."""
    tok = _tok(tiny_llama)
    tok.chat_template = None
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": [{"role": "user", "content": "2+2?"}], "chosen": "4",
                                            "rejected": "5"}])
    cfg = DataConfig(train="x", format="preference")
    cfg._format_key = "--format"
    with pytest.raises(PeftkitError) as error:
        load_pairs(tok, str(tmp_path / "pairs.jsonl"), None, cfg)
    assert str(error.value) == (
        "--format 'preference' rows given as conversations need the tokenizer's chat_template, and it has none (a base "
        "model's has none); use a model whose tokenizer has a template (or a recipe that sets data.chat_template: "
        "chatml, llama3, a .jinja file, or a tokenizer directory to copy it from), or give the rows as text (prompt, "
        "chosen and rejected strings).")


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "hinge", "orpo", "simpo"])
def test_the_loss_is_dpo_s_formula_on_dense_log_probabilities(tiny_llama, tmp_path, kind):
    """The loss and its gradients equal the formula (TRL's; ORPO's as LLaMA-Factory's, per pair) computed from a full
    log-softmax of the adapted model's and the base model's logits, pair by pair; ORPO and SimPO on the answers' mean
    log-probabilities per token, without the reference."""
    from peftkit.adapters import inject_adapters, trainable_parameters
    from peftkit.methods.lora import LoraConfig

    rows = [_sums(3, 4, 2), _sums(10, 20, 5), _sums(1, 1, 9)]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    tok = _tok(tiny_llama)
    pairs, _ = load_pairs(tok, str(tmp_path / "pairs.jsonl"), None, DataConfig(train="x", format="preference"))
    base, model = load_fp32(tiny_llama), load_fp32(tiny_llama)
    inject_adapters(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    random_adapters(model, seed=3, std=0.3)
    batch = PairCollator(tok.pad_token_id)(list(pairs))

    def dense(m: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps = F.log_softmax(logits[:, :-1], -1)
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE_INDEX
        return (logps.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask).sum(1), mask.sum(1)

    with torch.no_grad():
        reference, _ = dense(base)
    batch["reference_logps"] = reference
    beta = 0.3
    policy, tokens = dense(model)
    chosen, rejected = policy[0::2] - reference[0::2], policy[1::2] - reference[1::2]
    mean_c, mean_r = policy[0::2] / tokens[0::2], policy[1::2] / tokens[1::2]
    if kind == "sigmoid":
        expected = -F.logsigmoid(beta * (chosen - rejected))
    elif kind == "hinge":
        expected = torch.relu(1 - beta * (chosen - rejected))
    elif kind == "ipo":
        expected = (chosen / tokens[0::2] - rejected / tokens[1::2] - 1 / (2 * beta)) ** 2
    elif kind == "simpo":  # the paper's eq. 6, gamma 0.7
        expected = -F.logsigmoid(beta * (mean_c - mean_r) - 0.7)
    else:  # ORPO's eq. 6-7: odds p / (1 - p) of p = exp(mean log-probability)
        odds_c, odds_r = mean_c.exp() / (1 - mean_c.exp()), mean_r.exp() / (1 - mean_r.exp())
        expected = -mean_c - beta * F.logsigmoid(torch.log(odds_c / odds_r))
    params = trainable_parameters(model)
    wanted = torch.autograd.grad(expected.sum(), params)
    if kind in ("orpo", "simpo"):
        del batch["reference_logps"]  # (not needed: a batch of theirs has none)
    loss, counted = PreferenceLoss(beta, kind, 0.7 if kind == "simpo" else 0.0)(model, batch)
    got = torch.autograd.grad(loss, params)
    assert int(counted[0]) == 3 and (expected - expected.mean()).abs().max() > 1e-3  # pairs far from each other
    assert abs(loss.item() - expected.sum().item()) <= 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(got, wanted, strict=True)) <= 1e-5


def test_a_run_learns_the_preferences_and_its_figures_are_the_adapter_s_in_peft(tiny_llama, pairs_data, tmp_path):
    """DPO on sums: the eval loss falls below log 2 and the reward accuracy rises above a half; the run's last
    evaluation is what the exported adapter, loaded in peft over the base (the reference), gives by the formula."""
    from peft import PeftModel

    recipe = _dpo_recipe(tmp_path, tiny_llama, pairs_data, max_steps=24, eval_steps=12, dpo_beta=0.5)
    summary = train(load_recipe(recipe))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "eval_loss" in x]
    assert [x["step"] for x in evals] == [12, 24]
    last = evals[-1]
    assert last["eval_loss"] < math.log(2) - 0.05 and last["eval_reward_accuracy"] > 0.6, last
    assert summary["eval_reward_accuracy"] == last["eval_reward_accuracy"]
    card = (tmp_path / "run" / "adapter" / "README.md").read_text()
    assert "Objective: DPO (`sigmoid` loss, beta 0.5)" in card and "the reference the base model" in card
    assert f"| reward accuracy | {last['eval_reward_accuracy']:.4f} |" in card

    tok = _tok(tiny_llama)
    pairs, _ = load_pairs(tok, str(pairs_data["eval"]), None, DataConfig(train="x", format="preference"))
    batch = PairCollator(tok.pad_token_id)(list(pairs))
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX

    def logps(m: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            out = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        return (F.log_softmax(out, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask).sum(1)

    reference = logps(load_fp32(tiny_llama))
    policy = logps(PeftModel.from_pretrained(load_fp32(tiny_llama), tmp_path / "run" / "adapter").eval())
    chosen, rejected = 0.5 * (policy[0::2] - reference[0::2]), 0.5 * (policy[1::2] - reference[1::2])
    assert abs(-F.logsigmoid(chosen - rejected).mean().item() - last["eval_loss"]) <= 1e-5
    assert (chosen > rejected).float().mean().item() == last["eval_reward_accuracy"]
    assert abs((chosen - rejected).mean().item() - last["eval_reward_margin"]) <= 1e-5


def test_a_killed_dpo_run_resumes_to_the_same_bits_and_verifies(tiny_llama, pairs_data, tmp_path):
    """The reference is computed again at the resume, to the same numbers; export.best follows the reward accuracy
    (higher is better) through the resume; `verify` re-runs the whole to the same bits."""
    from rich.console import Console

    from conftest import check_resumes_to_the_same_bits
    from peftkit.verify import verify

    recipe = _dpo_recipe(tmp_path, tiny_llama, pairs_data, max_steps=6, save_steps=2, save_total_limit=5,
                         eval_steps=2)
    raw = yaml.safe_load(recipe.read_text())
    raw["export"]["best"] = "reward_accuracy"
    recipe.write_text(yaml.safe_dump(raw))
    check_resumes_to_the_same_bits(recipe, tmp_path / "run", kill_after=2, steps=6)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    evals = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]
    best = max(evals, key=lambda x: (x["eval_reward_accuracy"], -x["step"]))  # the first of the highest
    assert manifest["metrics"]["best"]["step"] == best["step"]
    assert manifest["data_form"] == "completion"  # text pairs, recorded by the resumed run too
    assert verify(tmp_path / "run", console=Console(quiet=True)).ok
    # a manifest from before data_form was recorded (by older code) verifies; an edited one does not
    older = {k: v for k, v in manifest.items() if k != "data_form"}
    older["environment"]["versions"].pop("peftkit source", None)
    for edited, ok in ((older, True), (manifest | {"data_form": "chat"}, False)):
        (tmp_path / "run" / "manifest.json").write_text(json.dumps(edited))
        result = verify(tmp_path / "run", console=Console(quiet=True))
        assert result.ok is ok, result.differences
        assert ok or "manifest.json: data_form is 'chat' recorded, 'completion' now" in result.differences


@pytest.mark.parametrize(("sections", "said"), [
    ({"training": {"objective": "dpo"}}, "training.objective is dpo and data.format is alpaca"),
    ({"data": {"format": "preference"}}, "training.objective is sft and data.format is preference"),
    ({"training": {"dpo_beta": 0.2}}, "training.dpo_beta is a setting of training.objective: dpo"),
    ({"training": {"objective": "dpo"}, "data": {"format": "preference", "packing": True}}, "data.packing"),
    ({"training": {"objective": "dpo"}, "data": {"format": "preference"}, "eval": {"metrics": ["rouge_l"]}},
     "eval.metrics: rouge_l score generated answers"),
    ({"training": {"objective": "dpo"}, "data": {"format": "preference", "max_length": 64},
      "model": {"long_context": {"s2_attention": True}}}, "model.long_context.s2_attention: DPO compares"),
])
def test_recipe_mistakes_about_dpo_are_said_at_their_key(tiny_llama, pairs_data, tmp_path, monkeypatch, capsys,
                                                          sections, said):
    recipe = make_recipe(tmp_path, tiny_llama, pairs_data, **{k: v for k, v in sections.items() if k != "model"})
    if "model" in sections:  # (make_recipe's `model` is the model's path)
        raw = yaml.safe_load(recipe.read_text())
        raw["model"] |= sections["model"]
        recipe.write_text(yaml.safe_dump(raw))
    err = cli_user_error(monkeypatch, capsys, "train", str(recipe))
    assert said in err and "recipe.yaml:" in err, err  # at the key's line


@pytest.mark.parametrize(("row", "said"), [
    ({"prompt": "1+1=", "chosen": "2"}, "missing field 'rejected'"),
    ({"prompt": "1+1=", "chosen": "2", "rejected": "2"}, "'chosen' and 'rejected' are the same answer"),
    ({"prompt": "1+1=", "chosen": "2", "rejected": "2</s>"}, "'chosen' and 'rejected' are the same answer once the "
     "EOS's text '</s>' one of them ends with is taken off (each is scored through one EOS), which teaches nothing"),
    ({"chosen": "2", "rejected": "3"}, "missing field 'prompt'"),
    ({"prompt": "1+1=", "chosen": "2", "rejected": 3}, "field 'rejected' must be a string"),
    ({"prompt": [{"role": "user", "content": "1+1?"}], "chosen": "2",
      "rejected": [{"role": "user", "content": "3"}]}, "'rejected' has no assistant message after the prompt"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
     "share no opening message"),
    ({"prompt": [{"role": "usr", "content": "1+1?"}], "chosen": "2", "rejected": "3"},
     "prompt[0].role is 'usr'"),
])
def test_a_bad_pair_is_named_by_its_line_and_field(tiny_llama, pairs_data, tmp_path, monkeypatch, capsys, row, said):
    """Said alike by train, by validate (data.train, and a set of data.eval's) and by eval's prompts (samples)."""
    from peftkit.data.prompts import load_prompts

    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [_sums(1, 2, 3), row])
    recipe = _dpo_recipe(tmp_path, tiny_llama, {"train": bad, "eval": pairs_data["eval"]})
    err = cli_user_error(monkeypatch, capsys, "train", str(recipe))
    assert f"{bad}:2" in err and said in err, err
    validated = cli_user_error(monkeypatch, capsys, "validate", str(recipe))
    assert " ".join(unplaced(validated, recipe).split()) == " ".join(err.split()), validated
    swapped = _dpo_recipe(tmp_path / "swapped", tiny_llama, {"train": pairs_data["train"], "eval": bad})
    err = " ".join(cli_user_error(monkeypatch, capsys, "validate", str(swapped)).split())
    assert f"{bad}:2" in err and said in err, err
    with pytest.raises(PeftkitError, match=f"{bad}:2: ") as raised:
        load_prompts(_tok(tiny_llama), str(bad), None, load_recipe(swapped).data.for_eval("eval"))
    assert said in str(raised.value)


def test_two_processes_train_the_adapter_of_one_with_twice_the_batch(tiny_llama, pairs_data, tmp_path):
    """2 processes x 2 pairs a micro-batch (each process's slice whole pairs, the reference log-probabilities
    shared out) give the losses, evaluations and adapter of 1 process x 4 pairs, up to float rounding; 45 pairs, so
    the epoch's last micro-batch holds one pair and the second process trains a stand-in that adds nothing. (~20 s)"""
    import subprocess
    import sys

    from safetensors.torch import load_file

    odd = tmp_path / "odd.jsonl"
    odd.write_text("".join(pairs_data["train"].read_text().splitlines(keepends=True)[:45]))
    data = {"train": odd, "eval": pairs_data["eval"]}
    sections = dict(max_steps=6, eval_steps=3, grad_accum=2)
    one = _dpo_recipe(tmp_path / "one", tiny_llama, data, batch_size=4, **sections)
    two = _dpo_recipe(tmp_path / "two", tiny_llama, data, batch_size=2, **sections)
    train(load_recipe(one))
    done = subprocess.run([sys.executable, "-m", "peftkit", "train", str(two), "--num-processes", "2"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr

    def lines(run: str) -> list[dict]:
        return [json.loads(x) for x in (tmp_path / run / "run" / "metrics.jsonl").read_text().splitlines()]

    for a, b in zip(lines("one"), lines("two"), strict=True):
        assert a.keys() == b.keys()
        for key in ("loss", "eval_loss", "eval_reward_accuracy", "eval_reward_margin"):
            assert abs(a.get(key, 0.0) - b.get(key, 0.0)) <= 1e-5, (key, a, b)
    ours = load_file(tmp_path / "one" / "run" / "adapter" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "two" / "run" / "adapter" / "adapter_model.safetensors")
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-5


def test_dpo_from_an_sft_adapter_trains_as_trl_s_dpo_trainer(tiny_llama, tmp_path):
    """DPO on adapter.init_from (an SFT adapter, far from identity) against TRL's DPOTrainer on a PeftModel of the same
    adapter (whose reference is a frozen copy of it, as peftkit's is that adapter as training starts): three SGD
    steps over the whole batch give TRL's losses (the first log 2: the policy is its reference) and its adapter; a
    chosen answer ends with the EOS's text, which both score once."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from conftest import save_random_adapter
    from peftkit.methods.lora import LoraConfig

    sft = save_random_adapter(tiny_llama, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"),
                              tmp_path / "sft", seed=2, std=0.3)
    rows = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(-a - b)} for a, b in [(3, 4), (10, 20), (1, 1),
                                                                                                  (7, 8)]]
    rows[3]["chosen"] += "</s>"  # (an answer ending with the EOS's text: TRL appends none, nor does peftkit now)
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    steps, lr, beta = 3, 0.5, 0.3
    recipe = _dpo_recipe(tmp_path, tiny_llama, {"train": tmp_path / "pairs.jsonl", "eval": tmp_path / "pairs.jsonl"},
                         max_steps=steps, batch_size=4, optimizer="sgd", lr=lr, scheduler="constant", warmup_steps=0,
                         dpo_beta=beta)
    starting_from(recipe, sft)
    train(load_recipe(recipe))
    ours = logged_steps(tmp_path / "run")

    model = PeftModel.from_pretrained(load_fp32(tiny_llama).train(), sft, is_trainable=True)
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_steps=steps,
                         learning_rate=lr, optim="sgd", lr_scheduler_type="constant", warmup_steps=0, beta=beta,
                         report_to=[], save_strategy="no", use_cpu=True, logging_steps=1, bf16=False)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=AutoTokenizer.from_pretrained(tiny_llama))
    trainer.train()
    theirs = [x for x in trainer.state.log_history if "loss" in x]
    assert abs(theirs[0]["loss"] - math.log(2)) <= 1e-6 and theirs[-1]["loss"] < theirs[0]["loss"] - 1e-3  # it trained
    assert theirs[-1]["rewards/accuracies"] > 0  # (the rewards move: each is compared below)
    names = {"loss": "loss", "reward_accuracy": "rewards/accuracies", "reward_margin": "rewards/margins",
             "chosen_reward": "rewards/chosen", "rejected_reward": "rewards/rejected"}
    for a, b in zip(ours, theirs, strict=True):  # each step's figures, as TRL logs them
        assert all(abs(a[k] - b[v]) <= 1e-5 for k, v in names.items()), (a, b)
    ours_final = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    trained = {k.replace(".default", ""): v for k, v in model.state_dict().items() if ".default." in k}
    assert set(ours_final) == set(trained)
    assert max((ours_final[k] - trained[k]).abs().max().item() for k in ours_final) <= 1e-5


def test_pairs_are_kept_in_the_tokenized_data_cache_under_a_key_of_their_own(tiny_llama, pairs_data, tmp_path):
    """A second load reads the pairs and counts the first kept (the same examples, the entry named); a run from the
    cache trains the same bits."""
    tok = _tok(tiny_llama)
    cfg = DataConfig(train="x", format="preference", max_length=80)
    first, stats = load_pairs(tok, str(pairs_data["train"]), None, cfg)
    again, cached = load_pairs(tok, str(pairs_data["train"]), None, cfg)
    assert "cached" not in stats and "cached" in cached
    assert list(again.examples) == list(first.examples) and len(again) == len(first) == 48
    assert {k: v for k, v in cached.items() if k != "cached"} == stats
    recipe = _dpo_recipe(tmp_path, tiny_llama, pairs_data, max_steps=3)
    train(load_recipe(recipe))
    unbroken = (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes()
    train(load_recipe(recipe), overwrite=True)  # data.train and data.eval from the cache now
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes() == unbroken


def test_a_list_of_datasets_is_read_as_its_pairs_in_order(tiny_llama, pairs_data, tmp_path, monkeypatch, capsys):
    """data.train as a list of two files gives the pairs of the two as one file, in order, from the cache too; a bad
    row of the second is named by its own file and line."""
    lines = pairs_data["train"].read_text().splitlines(keepends=True)
    (tmp_path / "a.jsonl").write_text("".join(lines[:20]))
    (tmp_path / "b.jsonl").write_text("".join(lines[20:]))
    tok = _tok(tiny_llama)
    whole, _ = load_pairs(tok, str(pairs_data["train"]), None, DataConfig(train="x", format="preference"))
    mix = DataConfig(train=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], format="preference")
    for _ in range(2):  # tokenized, then from the cache
        parts, stats = load_pairs(tok, mix.train, None, mix)
        assert list(parts.examples) == list(whole.examples) and stats["examples"] == 48
    (tmp_path / "b.jsonl").write_text("".join(lines[20:22]) + '{"prompt": "1+1=", "chosen": "2"}\n')
    recipe = _dpo_recipe(tmp_path, tiny_llama, pairs_data)
    raw = yaml.safe_load(recipe.read_text())
    raw["data"]["train"] = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    recipe.write_text(yaml.safe_dump(raw))
    err = cli_user_error(monkeypatch, capsys, "train", str(recipe))
    assert f"{tmp_path / 'b.jsonl'}:3" in err and "missing field 'rejected'" in err, err


def test_named_eval_sets_are_each_evaluated_and_an_own_format_is_refused(tiny_llama, pairs_data, tmp_path, monkeypatch,
                                                                          capsys):
    """data.eval as named sets: each set's figures logged (eval_loss, eval_other_loss, ...); a set or a dataset of
    data.train with a format of its own is a recipe error at its key."""
    recipe = _dpo_recipe(tmp_path, tiny_llama, pairs_data, max_steps=2)
    raw = yaml.safe_load(recipe.read_text())
    raw["data"]["eval"] = {"main": str(pairs_data["eval"]), "other": str(pairs_data["train"])}
    recipe.write_text(yaml.safe_dump(raw))
    summary = train(load_recipe(recipe))
    assert summary["eval_other_reward_accuracy"] is not None and summary["eval_reward_accuracy"] is not None
    other = (f"{summary['eval_other_loss']:.4f}, reward_accuracy {summary['eval_other_reward_accuracy']:.4f}, "
             f"reward_margin {summary['eval_other_reward_margin']:.4f}")
    lines = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines()]
    assert f"eval loss, other {other}" in lines, lines  # the summary's line of the other set
    raw["data"]["eval"]["other"] = {"path": str(pairs_data["train"]), "format": "chat"}
    recipe.write_text(yaml.safe_dump(raw))
    err = cli_user_error(monkeypatch, capsys, "train", str(recipe), "--overwrite")
    assert "data.eval.other.format: a dpo run evaluates pairs" in err, err


def _eval_json(tmp_path: Path, *args: str) -> tuple[dict, str]:
    """`peftkit eval ARGS --json FILE`: the figures written, and what it printed."""
    from typer.testing import CliRunner

    from peftkit.cli import app

    out = tmp_path / "figures.json"
    result = CliRunner().invoke(app, ["eval", *args, "--json", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return json.loads(out.read_text()), result.output


def _last_eval(run: Path) -> dict:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x][-1]


FIGURES = ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")


def test_eval_of_a_dpo_run_gives_its_last_evaluation(tiny_llama, pairs_data, tmp_path):
    """`peftkit eval RUN_DIR` of a DPO run (refused before: 'this command does not read them yet') reports the DPO
    figures of its adapter against the base, at the recipe's dpo_beta: the run's last evaluation. The adapter alone
    (`--adapter DIR --data FILE --format preference`, over its recorded base) gives them at the default beta 0.1:
    the same reward accuracy, and rewards a fifth of beta 0.5's."""
    recipe = _dpo_recipe(tmp_path, tiny_llama, pairs_data, max_steps=6, eval_steps=3, dpo_beta=0.5)
    train(load_recipe(recipe))
    last, run = _last_eval(tmp_path / "run"), tmp_path / "run"
    figures, printed = _eval_json(tmp_path, str(run))
    for name in FIGURES:
        assert abs(figures[name] - last[f"eval_{name}"]) <= 1e-5, (name, figures, last)
    assert figures["num_pairs"] == 12 and last["eval_loss"] < math.log(2) - 1e-3
    assert printed.startswith(f"loss {figures['loss']:.4f}  pairs 12  reward_accuracy "
                              f"{figures['reward_accuracy']:.4f}  reward_margin {figures['reward_margin']:.4f}  ")
    alone, _ = _eval_json(tmp_path, "--adapter", str(run / "adapter"), "--data", str(pairs_data["eval"]),
                          "--format", "preference")
    assert alone["reward_accuracy"] == figures["reward_accuracy"]
    for name in ("chosen_reward", "rejected_reward", "reward_margin"):
        assert abs(5 * alone[name] - figures[name]) <= 1e-5, name


def test_eval_of_a_dpo_run_from_init_from_takes_that_adapter_as_the_reference(tiny_llama, pairs_data, tmp_path):
    """With adapter.init_from the reference is that adapter over the base, as in training: `peftkit eval RUN_DIR`
    gives the run's last evaluation, where the base as the reference (the adapter given alone) gives others. The
    samples' answers before training are that adapter's too (`start`), as `peftkit generate --adapter` answers (they
    were the bare base's, `base`), and `peftkit generate RECIPE`; no figure before training (DPO's loss against its
    own reference is log 2)."""
    from typer.testing import CliRunner

    from conftest import save_random_adapter
    from peftkit.cli import app
    from peftkit.methods.lora import LoraConfig

    sft = save_random_adapter(tiny_llama, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"),
                              tmp_path / "sft", seed=2, std=0.3)
    recipe = _dpo_recipe(tmp_path, tiny_llama, pairs_data, max_steps=4, eval_steps=2)
    raw = yaml.safe_load(recipe.read_text())
    raw["adapter"] = {"init_from": str(sft)}
    raw["eval"] |= {"samples": 2, "max_new_tokens": 4}
    recipe.write_text(yaml.safe_dump(raw))
    summary = train(load_recipe(recipe))
    assert summary["start_eval_loss"] is None and not any(key.startswith("base_eval_") for key in summary)
    done = CliRunner().invoke(app, ["generate", "--model", str(tiny_llama), "--adapter", str(sft), "--data",
                                    str(pairs_data["eval"]), "--format", "preference", "--max-new-tokens", "4",
                                    "--limit", "2", "--json", str(tmp_path / "start.json")])
    assert done.exit_code == 0, done.output
    answers = [row["completion"] for row in json.loads((tmp_path / "start.json").read_text())]
    assert [s["start"] for s in summary["samples"]] == answers and all("base" not in s for s in summary["samples"])
    # `peftkit generate RECIPE` answers with that start too (the bare base's answers, before), said on its first line;
    # eval RECIPE keeps init_from as the reference
    done = CliRunner().invoke(app, ["generate", str(recipe), "--max-new-tokens", "4", "--limit", "2", "--json",
                                    str(tmp_path / "of_recipe.json")])
    assert done.exit_code == 0 and done.output.startswith("start (init_from: sft): the base with the recipe's "), \
        done.output
    assert [row["completion"] for row in json.loads((tmp_path / "of_recipe.json").read_text())] == answers
    last, run = _last_eval(tmp_path / "run"), tmp_path / "run"
    figures, _ = _eval_json(tmp_path, str(run))
    for name in FIGURES:
        assert abs(figures[name] - last[f"eval_{name}"]) <= 1e-5, (name, figures, last)
    on_base, _ = _eval_json(tmp_path, "--adapter", str(run / "adapter"), "--data", str(pairs_data["eval"]),
                            "--format", "preference")
    assert abs(on_base["loss"] - figures["loss"]) > 1e-3


def test_eval_of_preference_pairs_refuses_what_it_cannot_compute(tiny_llama, pairs_data, tmp_path, monkeypatch,
                                                                   capsys):
    """A model without an adapter is its own reference; --metrics and --predictions are not for pairs, nor --arrow
    yet in a comparison (which compares pairs now: tests/test_preference_compare.py): each said, no traceback."""
    recipe = _dpo_recipe(tmp_path, tiny_llama, pairs_data)
    err = cli_user_error(monkeypatch, capsys, "eval", "--model", str(tiny_llama), "--data", str(pairs_data["eval"]),
                         "--format", "preference")
    assert "A preference evaluation compares an adapter with its base" in err and "pass --adapter DIR" in err
    assert "pass --adapter DIR" in cli_user_error(monkeypatch, capsys, "eval", str(recipe))
    adapter = tmp_path / "adapter"
    from conftest import save_random_adapter
    from peftkit.methods.lora import LoraConfig

    save_random_adapter(tiny_llama, LoraConfig(r=4, alpha=8, target_modules="all-linear"), adapter, seed=1)
    err = cli_user_error(monkeypatch, capsys, "eval", str(recipe), "--adapter", f"a={adapter}", "--adapter",
                         f"b={adapter}", "--arrow")
    assert "--arrow on preference pairs (data.format 'preference') is not supported yet" in " ".join(err.split())
    err = cli_user_error(monkeypatch, capsys, "eval", str(recipe), "--adapter", str(adapter), "--metrics",
                         "exact_match")
    said = " ".join(err.split())
    assert "--metrics: preference pairs (data.format 'preference') are scored by the preference figures" in said


def test_a_dpo_run_evaluates_sets_named_by_path_and_eval_gives_each_set_s_figures(tiny_llama, pairs_data, tmp_path,
                                                                                     monkeypatch, capsys):
    """data.eval by name, each set a path, was refused ('data.eval.a.format: ... remove it': a path's `format`
    read as str.format); a set's own format is still refused. `peftkit eval RUN_DIR` gives each set's last
    figures (eval_loss, eval_held_loss, ...), one line each."""
    recipe = _dpo_recipe(tmp_path, tiny_llama, pairs_data, max_steps=4, eval_steps=2)
    raw = yaml.safe_load(recipe.read_text())
    raw["data"]["eval"] = {"main": str(pairs_data["eval"]), "held": str(pairs_data["train"])}
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))  # (main first: the primary set)
    train(load_recipe(recipe))
    last, run = _last_eval(tmp_path / "run"), tmp_path / "run"
    figures, printed = _eval_json(tmp_path, str(run))
    for name in FIGURES:
        assert abs(figures["main"][name] - last[f"eval_{name}"]) <= 1e-5, (name, figures, last)
        assert abs(figures["held"][name] - last[f"eval_held_{name}"]) <= 1e-5, (name, figures, last)
    assert figures["held"]["num_pairs"] == 48 and printed.startswith("main: loss ") and "\nheld: loss " in printed
    raw["data"]["eval"]["held"] = {"path": str(pairs_data["train"]), "format": "completion"}
    recipe.write_text(yaml.safe_dump(raw))
    assert "data.eval.held.format: a dpo run evaluates pairs" in cli_user_error(monkeypatch, capsys, "train",
                                                                                str(recipe))


def test_a_pair_whose_prompt_fills_max_length_stops_training_under_truncation_error(tiny_llama, pairs_data, tmp_path,
                                                                                    monkeypatch, capsys):
    """data.truncation: error stops on a pair none of whose answer tokens is left (its prompt fills
    data.max_length), naming its line, as it does for any example (a pair was dropped unsaid); keep drops it."""
    long = tmp_path / "long.jsonl"
    write_jsonl(long, [_sums(1, 2, 3), {"prompt": "9" * 30 + "=", "chosen": "1", "rejected": "2"}, _sums(4, 5, 6)])
    tok = _tok(tiny_llama)
    pairs, stats = load_pairs(tok, str(long), None, DataConfig(train="x", format="preference", max_length=16))
    assert len(pairs) == 2 and stats["too_long"] == 1
    recipe = _dpo_recipe(tmp_path, tiny_llama, {"train": long, "eval": pairs_data["eval"]})
    raw = yaml.safe_load(recipe.read_text())
    raw["data"] |= {"max_length": 16, "truncation": "error"}
    recipe.write_text(yaml.safe_dump(raw))
    err = cli_user_error(monkeypatch, capsys, "train", str(recipe))
    assert (f"{long}:2: this example has 34 tokens but data.max_length is 16, so none of its 2 target tokens is left: "
            "the prompt fills data.max_length (data.truncation: error)") in err, err


def test_a_pair_s_prompt_is_asked_as_its_chosen_answer_is_built_and_samples_show_it(tiny_llama, pairs_data, tmp_path):
    """A pair's prompt, for eval.samples and `peftkit generate`: a text pair's is the completion format's prompt of
    {prompt, chosen}, a conversation's the chat template's generation prompt of the conversation before the chosen
    answer; the chosen answer is the reference. A DPO run's samples hold the base's and the fine-tuned model's
    answers, which `peftkit generate RUN_DIR` (greedy, as the samples) answers again (where it was a KeyError
    traceback, then a refusal)."""
    from typer.testing import CliRunner

    from peftkit.cli import app
    from peftkit.data.prompts import load_prompts, row_prompt

    tok = _tok(tiny_llama)
    text = {"prompt": "3+4=", "chosen": "7", "rejected": "-7"}
    chat = {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                       {"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "5"}
    write_jsonl(tmp_path / "rows.jsonl", [text, chat])
    prompts = load_prompts(tok, str(tmp_path / "rows.jsonl"), None, DataConfig(train="x", format="preference"))
    completion = row_prompt(tok, {"prompt": "3+4=", "completion": "7"}, "completion")
    conversation = row_prompt(tok, {"messages": [*chat["prompt"], {"role": "assistant", "content": "4"}]}, "chat")
    assert (prompts[0].ids, prompts[0].reference) == (completion.ids, "7")
    assert (prompts[1].ids, prompts[1].reference) == (conversation.ids, "4") and prompts[1].text.endswith(
        tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True)[-12:])

    recipe = _dpo_recipe(tmp_path, tiny_llama, pairs_data, max_steps=4)
    raw = yaml.safe_load(recipe.read_text())
    raw["eval"] |= {"samples": 2, "max_new_tokens": 4}
    recipe.write_text(yaml.safe_dump(raw))
    summary = train(load_recipe(recipe))
    samples = summary["samples"]
    eval_rows = [json.loads(x) for x in pairs_data["eval"].read_text().splitlines()[:2]]
    assert [s["reference"] for s in samples] == [r["chosen"] for r in eval_rows]
    assert all(s["prompt"] == r["prompt"] and "base" in s for s, r in zip(samples, eval_rows, strict=True))
    done = CliRunner().invoke(app, ["generate", str(tmp_path / "run"), "--max-new-tokens", "4", "--limit", "2"])
    assert done.exit_code == 0, done.output
    assert all(s["fine_tuned"] and s["fine_tuned"] in done.output for s in samples), (samples, done.output)


def test_dpo_over_a_4_bit_base_evaluates_again_as_its_run_did(tiny_llama, pairs_data, tmp_path):
    """QLoRA + DPO (NF4 + double quantization, paged 8-bit AdamW, on CPU): the reference is the 4-bit base, and
    `peftkit eval RUN_DIR`, which quantizes the base again (deterministic), gives the run's last evaluation."""
    recipe = _dpo_recipe(tmp_path, tiny_llama, pairs_data, max_steps=4, optimizer="paged_adamw_8bit")
    raw = yaml.safe_load(recipe.read_text())
    raw["quantization"] = {"method": "nf4", "double_quant": True, "compute_dtype": "float32"}
    recipe.write_text(yaml.safe_dump(raw))
    train(load_recipe(recipe))
    last = _last_eval(tmp_path / "run")
    figures, _ = _eval_json(tmp_path, str(tmp_path / "run"))
    assert last["eval_loss"] != math.log(2)  # (it trained)
    for name in FIGURES:
        assert abs(figures[name] - last[f"eval_{name}"]) <= 1e-5, (name, figures, last)


@pytest.mark.parametrize(("objective", "weights"), [("orpo", {"orpo_lambda": 0.5}), ("simpo", {"simpo_gamma": 0.5})])
def test_orpo_and_simpo_learn_without_a_reference_and_evaluate_again_as_their_run(tiny_llama, pairs_data, tmp_path,
                                                                                  objective, weights):
    """ORPO and SimPO runs: no reference pass, the base model evaluated before training (a figure, as for SFT), the
    eval loss falls and the reward accuracy rises; `peftkit eval RUN_DIR` gives the last evaluation; the model card
    says the objective."""
    recipe = _dpo_recipe(tmp_path, tiny_llama, pairs_data, max_steps=12, eval_steps=6, objective=objective, **weights)
    summary = train(load_recipe(recipe))
    last = _last_eval(tmp_path / "run")
    assert summary["base_eval_loss"] is not None and last["eval_loss"] < summary["base_eval_loss"]
    assert last["eval_reward_accuracy"] > summary["base_eval_reward_accuracy"]
    figures, _ = _eval_json(tmp_path, str(tmp_path / "run"))
    for name in FIGURES:
        assert abs(figures[name] - last[f"eval_{name}"]) <= 1e-5, (name, figures, last)
    card = (tmp_path / "run" / "adapter" / "README.md").read_text()
    assert f"Objective: {objective.upper()}" in card and "without a reference model" in card
    base, _ = _eval_json(tmp_path, str(recipe))  # the recipe's base alone, no adapter: its own figures
    for name in FIGURES:
        assert abs(base[name] - summary[f"base_eval_{name}"]) <= 1e-5, (name, base, summary)


@pytest.mark.parametrize(("training", "said"), [
    ({"objective": "dpo", "orpo_lambda": 0.2}, "training.orpo_lambda is a setting of training.objective: orpo, and the "
     "objective is dpo"),
    ({"objective": "orpo", "simpo_gamma": 0.2}, "training.simpo_gamma is a setting of training.objective: simpo"),
    ({"objective": "simpo", "dpo_loss": "ipo"}, "training.dpo_loss is a setting of training.objective: dpo"),
])
def test_a_setting_of_another_preference_objective_is_refused(tiny_llama, pairs_data, tmp_path, monkeypatch, capsys,
                                                               training, said):
    recipe = _dpo_recipe(tmp_path, tiny_llama, pairs_data, **training)
    err = cli_user_error(monkeypatch, capsys, "train", str(recipe))
    assert said in err and "recipe.yaml" in err, err


def test_simpo_from_an_sft_adapter_trains_as_trl_s_cpo_trainer(tiny_llama, tmp_path):
    """SimPO against TRL's CPOTrainer (loss_type simpo, cpo_alpha 0: SimPO as its docs set it) on a PeftModel of an
    adapter far from identity: three SGD steps over the whole batch give TRL's losses, rewards and adapter (a rejected
    answer ends with the EOS's text, which both score once). Its
    figures before training are that adapter's (`start_eval_*`), as `peftkit eval RECIPE --adapter SFT` gives them
    (they were the bare base's, `base_eval_*`), and `peftkit eval RECIPE` too."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoTokenizer
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    from conftest import save_random_adapter
    from peftkit.methods.lora import LoraConfig

    sft = save_random_adapter(tiny_llama, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"),
                              tmp_path / "sft", seed=2, std=0.3)
    rows = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(-a - b)}
            for a, b in [(3, 4), (10, 20), (1, 1), (7, 8)]]
    rows[1]["rejected"] += "</s>"  # (TRL's CPOTrainer appends no EOS to an answer ending with it, nor does peftkit now)
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    steps, lr = 3, 0.2
    recipe = _dpo_recipe(tmp_path, tiny_llama, {"train": tmp_path / "pairs.jsonl", "eval": tmp_path / "pairs.jsonl"},
                         objective="simpo", simpo_beta=2.0, simpo_gamma=1.0, max_steps=steps, batch_size=4,
                         optimizer="sgd", lr=lr, scheduler="constant", warmup_steps=0)
    starting_from(recipe, sft)
    summary = train(load_recipe(recipe))
    start, _ = _eval_json(tmp_path, str(recipe), "--adapter", str(sft))
    assert all(abs(start[name] - summary[f"start_eval_{name}"]) <= 1e-6 for name in FIGURES), (start, summary)
    of_recipe, said = _eval_json(tmp_path, str(recipe))  # (no reference: the recipe's start, as the run's)
    assert all(abs(of_recipe[name] - start[name]) <= 1e-6 for name in FIGURES) and "start (init_from: sft)" in said
    ours = logged_steps(tmp_path / "run")

    model = PeftModel.from_pretrained(load_fp32(tiny_llama).train(), sft, is_trainable=True)
    args = CPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_steps=steps, learning_rate=lr,
                     optim="sgd", lr_scheduler_type="constant", warmup_steps=0, loss_type="simpo", cpo_alpha=0.0,
                     beta=2.0, simpo_gamma=1.0, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1,
                     bf16=False)
    trainer = CPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(tiny_llama))
    _trains_as(trainer, model, ours, tmp_path / "run")


def test_orpo_trains_as_trl_s_orpo_trainer_where_their_likelihood_terms_agree(tiny_llama, tmp_path):
    """ORPO against TRL's ORPOTrainer on a PeftModel of an adapter far from identity. The two define the likelihood
    term otherwise (docs/recipe.md): TRL over every token of the chosen sequence but its first, the prompt's too, as
    a mean over a micro-batch's tokens; peftkit over the answer's tokens, per pair (LLaMA-Factory's). They agree on
    pairs without a prompt ("": the answer follows the BOS) taken one a micro-batch (TRL: batch 1, 4 accumulated),
    where three SGD steps of 4 pairs give TRL's losses, rewards (lambda x the mean log-probability), accuracies and
    margins at each step, and its adapter; a chosen answer ends with the EOS's text, which both score once."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoTokenizer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from conftest import save_random_adapter
    from peftkit.methods.lora import LoraConfig

    sft = save_random_adapter(tiny_llama, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"),
                              tmp_path / "sft", seed=2, std=0.3)
    rows = [{"prompt": "", "chosen": f"{a}+{b}={a + b}", "rejected": f"{a}+{b}={-a - b}"}
            for a, b in [(3, 4), (10, 20), (1, 1), (7, 8)]]
    rows[2]["chosen"] += "</s>"
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    steps, lr, lam = 3, 0.5, 0.5
    recipe = _dpo_recipe(tmp_path, tiny_llama, {"train": tmp_path / "pairs.jsonl", "eval": tmp_path / "pairs.jsonl"},
                         objective="orpo", orpo_lambda=lam, max_steps=steps, batch_size=4, optimizer="sgd", lr=lr,
                         scheduler="constant", warmup_steps=0)
    starting_from(recipe, sft)
    train(load_recipe(recipe))
    ours = logged_steps(tmp_path / "run")

    model = PeftModel.from_pretrained(load_fp32(tiny_llama).train(), sft, is_trainable=True)
    args = ORPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=1, gradient_accumulation_steps=4,
                      max_steps=steps, learning_rate=lr, optim="sgd", lr_scheduler_type="constant", warmup_steps=0,
                      beta=lam, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1, bf16=False)
    trainer = ORPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=AutoTokenizer.from_pretrained(tiny_llama))
    _trains_as(trainer, model, ours, tmp_path / "run")


def _trains_as(trainer, model, ours: list[dict], run: Path) -> None:
    """TRL's `trainer` of the PeftModel `model` trains (its last loss below its first) to each step's loss, rewards,
    accuracy and margin of ours (`run`'s metrics.jsonl lines, `ours`) within 1e-5, and to `run`'s adapter."""
    from safetensors.torch import load_file

    trainer.train()
    theirs = [x for x in trainer.state.log_history if "loss" in x]
    assert theirs[-1]["loss"] < theirs[0]["loss"] - 1e-3  # it trained
    names = {"loss": "loss", "reward_accuracy": "rewards/accuracies", "reward_margin": "rewards/margins",
             "chosen_reward": "rewards/chosen", "rejected_reward": "rewards/rejected"}
    for a, b in zip(ours, theirs, strict=True):
        assert all(abs(a[k] - b[v]) <= 1e-5 for k, v in names.items()), (a, b)
    ours_final = load_file(run / "adapter" / "adapter_model.safetensors")
    trained = {k.replace(".default", ""): v for k, v in model.state_dict().items() if ".default." in k}
    assert max((ours_final[k] - trained[k]).abs().max().item() for k in ours_final) <= 1e-5


def test_multitask_prompt_tuning_reads_each_pair_s_task(tiny_llama, pairs_data, tmp_path, monkeypatch, capsys):
    """adapter.method multitask_prompt_tuning: a pair's `task` is both answers' task id (each batch carries it), and
    one past adapter.num_tasks is refused as the data loads, as for SFT rows."""
    rows = [_sums(1, 2, 3) | {"task": 1}, _sums(4, 5, 6) | {"task": 0}]
    write_jsonl(tmp_path / "tasks.jsonl", rows)
    pairs, _ = load_pairs(_tok(tiny_llama), str(tmp_path / "tasks.jsonl"), None,
                          DataConfig(train="x", format="preference"), cache=False, tasks=True)
    assert [e.task_id for e in pairs.examples] == [1, 1, 0, 0] and pairs.task_ids == [1, 0]
    assert PairCollator(0)(list(pairs))["task_ids"].tolist() == [1, 1, 0, 0]
    write_jsonl(tmp_path / "tasks.jsonl", [*rows, _sums(7, 8, 9) | {"task": 2}])
    recipe = _dpo_recipe(tmp_path, tiny_llama, {"train": tmp_path / "tasks.jsonl", "eval": pairs_data["eval"]})
    raw = yaml.safe_load(recipe.read_text())
    raw["adapter"] = {"method": "multitask_prompt_tuning", "num_virtual_tokens": 4, "num_tasks": 2}
    recipe.write_text(yaml.safe_dump(raw))
    err = cli_user_error(monkeypatch, capsys, "train", str(recipe))
    assert "a row's 'task' is 2, but adapter.num_tasks is 2" in err, err


def test_the_reference_of_a_run_stacking_layers_is_the_stacked_base(tiny_llama, pairs_data, tmp_path):
    """adapter.layer_replication: training starts from the base with its layers stacked again (LoRA's B zero), so the
    reference is that model: the first step's pairs have rewards 0 and the DPO loss log 2, as without stacking."""
    recipe = _dpo_recipe(tmp_path, tiny_llama, pairs_data, max_steps=1)
    raw = yaml.safe_load(recipe.read_text())
    raw["adapter"]["layer_replication"] = [[0, 2], [0, 2]]
    recipe.write_text(yaml.safe_dump(raw))
    train(load_recipe(recipe))
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6), first
    assert abs(first["chosen_reward"]) < 1e-6 and abs(first["rejected_reward"]) < 1e-6, first
    card = (tmp_path / "run" / "adapter" / "README.md").read_text()
    assert "the reference the base model, its layers stacked (adapter.layer_replication)" in card


@pytest.mark.parametrize("key", ["system_prompt", "chat_template"])
def test_a_chat_setting_on_text_pairs_is_refused(tiny_llama, pairs_data, tmp_path, monkeypatch, capsys, key):
    """data.system_prompt and data.chat_template render conversations; text pairs have none, and were trained without
    them, silently."""
    recipe = _dpo_recipe(tmp_path, tiny_llama, pairs_data)
    raw = yaml.safe_load(recipe.read_text())
    raw["data"][key] = "You add numbers." if key == "system_prompt" else "{{ messages }}"
    recipe.write_text(yaml.safe_dump(raw))
    err = cli_user_error(monkeypatch, capsys, "train", str(recipe))
    assert f"data.{key}: {pairs_data['train']} holds text pairs" in err, err


def test_an_alora_adapter_trains_on_pairs_whose_answers_follow_its_invocation(tiny_llama, pairs_data, tmp_path):
    """adapter.alora_invocation_tokens: the check that the invocation occurs before the trained tokens reads the
    pairs' answers (it failed on the pairs with an AttributeError's traceback), and the run trains."""
    tok = _tok(tiny_llama)
    recipe = _dpo_recipe(tmp_path, tiny_llama, pairs_data, max_steps=2)
    raw = yaml.safe_load(recipe.read_text())
    raw["adapter"]["alora_invocation_tokens"] = tok("=", add_special_tokens=False)["input_ids"]  # "1+2=" ends each prompt
    recipe.write_text(yaml.safe_dump(raw))
    summary = train(load_recipe(recipe))
    assert summary["eval_reward_accuracy"] is not None and math.isfinite(summary["train_loss"])


def test_the_base_model_s_dropout_is_off_so_the_first_step_is_the_reference_s(tiny_gpt2, pairs_data, tmp_path):
    """On GPT-2 (dropout 0.1 in its embeddings, attention and residuals), as TRL's disable_dropout: the first step's
    policy is the reference (loss log 2, rewards 0); with the base's dropout on, it was not."""
    recipe = _dpo_recipe(tmp_path, tiny_gpt2, pairs_data, max_steps=1)
    train(load_recipe(recipe))
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["loss"] - math.log(2)) <= 1e-6  # (rewards 0 to float rounding: other batch shapes)
    assert abs(first["chosen_reward"]) <= 1e-6 and abs(first["rejected_reward"]) <= 1e-6


def test_a_reference_that_is_not_finite_is_said_before_training(tiny_llama, pairs_data, tmp_path, monkeypatch, capsys):
    """A base whose head holds an inf gives the reference non-finite log-probabilities: said before the first step,
    naming the set and what to do, where training stopped at step 1 with 'Loss became nan'. chosen_reward is a metric
    export.best may follow."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight[7, 0] = float("inf")
    model.save_pretrained(tmp_path / "broken")
    _tok(tiny_llama).save_pretrained(tmp_path / "broken")
    recipe = _dpo_recipe(tmp_path, tmp_path / "broken", pairs_data)
    err = cli_user_error(monkeypatch, capsys, "train", str(recipe))
    assert "gives 48 of the 48 pairs of data.train a log-probability that is not finite (the first: pair 1" in err, err
    assert "Load it in float32 or bfloat16 rather than float16" in err
    assert load_recipe(_dpo_recipe(tmp_path, tiny_llama, pairs_data, eval_steps=3)).best_metric is None
    raw = yaml.safe_load(recipe.read_text())
    raw["export"]["best"], raw["training"]["eval_steps"] = "chosen_reward", 3
    recipe.write_text(yaml.safe_dump(raw))
    assert load_recipe(recipe).best_metric == "chosen_reward"


def test_pairs_of_two_forms_across_data_train_s_datasets_are_named_both(tiny_llama, tmp_path):
    """As unpaired rows (tests/test_kto.py): the error names the pair and the first pair it differs from, in another
    of data.train's datasets."""
    from peftkit.errors import PeftkitError

    write_jsonl(tmp_path / "text.jsonl", [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}])
    write_jsonl(tmp_path / "chat.jsonl", [{"prompt": [{"role": "user", "content": "1+1?"}], "chosen": "2",
                                           "rejected": "3"}])
    files = [str(tmp_path / "text.jsonl"), str(tmp_path / "chat.jsonl")]
    with pytest.raises(PeftkitError) as error:
        load_pairs(load_tokenizer(ModelConfig(name_or_path=str(tiny_llama))), files, None,
                   DataConfig(train=files, format="preference"))
    assert str(error.value) == (f"{tmp_path / 'chat.jsonl'}:1: a pair of conversations, and the first pair "
                                f"({tmp_path / 'text.jsonl'}:1) is of text answers; give every row the same form "
                                "(every dataset's, where data.train lists several)")


def test_eval_of_an_adapter_not_trained_from_the_recipe_s_init_from_says_so(tiny_llama, pairs_data, tmp_path,
                                                                             monkeypatch, capsys):
    """The reference of a recipe with adapter.init_from is that adapter's weights in the evaluated adapter's layers: an
    adapter they do not fit (another rank) was not trained from it, which is said with the way out (the base as the
    reference), not as an adapter 'trained on a different base model'."""
    from conftest import save_random_adapter
    from peftkit.methods.lora import LoraConfig

    sft = save_random_adapter(tiny_llama, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"),
                              tmp_path / "sft", seed=2)
    other = save_random_adapter(tiny_llama, LoraConfig(r=8, alpha=8, dropout=0.0, target_modules="all-linear"),
                                tmp_path / "other", seed=3)
    recipe = _dpo_recipe(tmp_path, tiny_llama, pairs_data)
    starting_from(recipe, sft)
    err = " ".join(cli_user_error(monkeypatch, capsys, "eval", str(recipe), "--adapter", str(other)).split())
    assert (f"The recipe's adapter.init_from {sft}, the reference (the adapter the recipe's runs train from), "
            f"does not fit {other}, so it was not trained from it") in err, err
    assert "evaluate it against the base with --set adapter.init_from=null" in err, err


def test_a_text_answer_ending_with_the_eos_text_is_scored_through_one_eos_as_in_trl(tiny_llama, tmp_path):
    """A pair rendered by hand (`"rejected": "9</s>"`, as ChatML's `...<|im_end|>`) is scored through one EOS: TRL's
    preference trainers append none to an answer ending with it, where peftkit appended a second (found on
    SmolLM2-135M-Instruct, where SimPO's rewards were TRL's less the second <|im_end|>'s log-probability; the old code
    gave '9</s></s>' and a warning of it). An answer whose EOS is followed by more (`11</s>\n`) gets one appended, as
    in TRL, and the data warning `count_examples` gives an SFT completion that ends so names its pair's line and
    answer; an ordinary pair has none."""
    from peftkit.data.checks import describe_stats

    tok, cfg = _tok(tiny_llama), DataConfig(train="x", format="preference")
    write_jsonl(tmp_path / "pairs.jsonl", [_sums(1, 2, 3), _sums(3, 4, 2) | {"rejected": f"9{tok.eos_token}"},
                                           _sums(5, 6, 1) | {"chosen": f"11{tok.eos_token}\n"}])
    pairs, stats = load_pairs(tok, str(tmp_path / "pairs.jsonl"), None, cfg)
    answers = [tok.decode([t for t in e.labels if t != IGNORE_INDEX]) for e in (pairs[1][1], pairs[2][0])]
    assert answers == ["9</s>", "11</s>\n</s>"]
    said = " ".join(describe_stats(stats, cfg))
    assert (f"1 of 3 rows hold the text of a special token, which the tokenizer encodes as that token, not as text "
            f"(first: {tmp_path / 'pairs.jsonl'}:3: field 'chosen' ends with '</s>', and peftkit appends an EOS to it "
            "too (two EOS))") in said, said
    write_jsonl(tmp_path / "plain.jsonl", [_sums(1, 2, 3), _sums(3, 4, 2)])
    assert "warning" not in " ".join(describe_stats(load_pairs(tok, str(tmp_path / "plain.jsonl"), None, cfg)[1], cfg))


def test_conversation_pairs_warn_of_a_default_system_prompt_as_sft_conversations_do(tiny_llama, tmp_path):
    """A chat template that puts a default system prompt in front of a conversation without one (SmolLM2's, 15 tokens
    more than a short one's) takes room from the answers: conversation pairs get the warning SFT conversations get
    (none on the old code: build_pairs never counted them), naming the pairs without a system message; a pair with
    its own, or data.system_prompt, has none."""
    from peftkit.data.checks import describe_stats
    from peftkit.tiny import CHAT_TEMPLATE

    tok = _tok(tiny_llama)
    tok.chat_template = "{% if messages[0]['role'] != 'system' %}<|system|>\nYou are a helpful model.</s>\n{% endif %}" \
        + CHAT_TEMPLATE
    user = [{"role": "user", "content": "2+2?"}]
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": user, "chosen": "4", "rejected": "5"},
                                           {"prompt": [{"role": "system", "content": "."}, *user], "chosen": "4",
                                            "rejected": "5"}])
    cfg = DataConfig(train="x", format="preference", max_length=80)
    said = " ".join(describe_stats(load_pairs(tok, str(tmp_path / "pairs.jsonl"), None, cfg, cache=False)[1], cfg))
    assert ("warning: the chat template adds a default system prompt of 23 tokens (29% of data.max_length=80) to each "
            "of the 1 conversations without a system message") in said, said
    given = cfg.model_copy(update={"system_prompt": "."})
    said = " ".join(describe_stats(load_pairs(tok, str(tmp_path / "pairs.jsonl"), None, given, cache=False)[1], given))
    assert "warning" not in said, said


def test_a_special_token_s_text_in_a_conversation_pair_s_message_is_warned_of_as_in_sft_chat(tiny_llama, tmp_path):
    """'</s>' (the tiny Llama's end of turn, as ChatML's '<|im_end|>') typed into a message of a conversation pair is
    read as the token itself: the data warning `count_examples` gives an SFT conversation names the pair's line and
    field, in the row's words (no warning on the old code); a pair of plain messages has none. data.system_prompt
    holding such text is said of each pair it opens, as in SFT (no warning on the old code); and so is a system
    message the chat template leaves out."""
    from peftkit.data.checks import describe_stats

    tok, cfg = _tok(tiny_llama), DataConfig(train="x", format="preference")
    ask = [{"role": "user", "content": "1+1?"}]
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": ask, "chosen": "2", "rejected": "3"},
                                           {"prompt": ask, "chosen": "2", "rejected": "3</s> 4"},
                                           {"prompt": ask, "chosen": [{"role": "assistant", "content": "</s>2"}],
                                            "rejected": "3"}])
    said = " ".join(describe_stats(load_pairs(tok, str(tmp_path / "pairs.jsonl"), None, cfg)[1], cfg))
    assert (f"2 of 3 rows hold the text of a special token, which the tokenizer encodes as that token, not as text "
            f"(first: {tmp_path / 'pairs.jsonl'}:2: field 'rejected' holds '</s>')") in said, said
    write_jsonl(tmp_path / "plain.jsonl", [{"prompt": ask, "chosen": "2", "rejected": "3"}] * 2)
    assert "warning" not in " ".join(describe_stats(load_pairs(tok, str(tmp_path / "plain.jsonl"), None, cfg)[1], cfg))
    # data.system_prompt's text is looked at, as SFT's is, where it opens a pair (not the second row's, own system)
    given = cfg.model_copy(update={"system_prompt": "Be brief.</s>"})
    write_jsonl(tmp_path / "own.jsonl", [{"prompt": ask, "chosen": "2", "rejected": "3"},
                                         {"prompt": [{"role": "system", "content": "."}, *ask], "chosen": "2",
                                          "rejected": "3"}])
    said = " ".join(describe_stats(load_pairs(tok, str(tmp_path / "own.jsonl"), None, given)[1], given))
    assert f"1 of 2 rows hold the text of a special token, which the tokenizer encodes as that token, not as text " \
           f"(first: {tmp_path / 'own.jsonl'}:1: data.system_prompt holds '</s>')" in said, said
    # a system message the chat template leaves out (Mistral v0.3's) is said as SFT's is (no warning on the old code):
    # a pair's own (an implicit prompt's, named in its chosen answer's words), data.system_prompt where it opens one
    from test_data_checks import SYSTEM_IN_LAST_USER_TURN

    tok.chat_template = SYSTEM_IN_LAST_USER_TURN
    system = [{"role": "system", "content": "Be terse."}, *ask]
    write_jsonl(tmp_path / "left.jsonl", [{"prompt": ask, "chosen": "2", "rejected": "3"},
                                          {"chosen": [*system, {"role": "assistant", "content": "2"}],
                                           "rejected": [*system, {"role": "assistant", "content": "3"}]}])
    for data, first in ((cfg, "1 of 2 conversations (first: {}:2: chosen[0])"),
                        (cfg.model_copy(update={"system_prompt": "Be brief."}),
                         "2 of 2 conversations (first: {}:1: data.system_prompt)")):
        said = " ".join(describe_stats(load_pairs(tok, str(tmp_path / "left.jsonl"), None, data, cache=False)[1], data))
        assert "the chat template leaves the system message out of " + first.format(tmp_path / "left.jsonl") in said
