"""training.objective: reward (a reward model: a sequence classifier of one output trained on preference pairs):
against TRL's RewardTrainer, the exported adapter's scores in peft, evaluation, and the recipe's errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch.nn import functional as F

from conftest import cli_user_error, make_recipe, peft_over_4_bit
from peftkit.data.preference import load_pairs
from peftkit.modeling import load_tokenizer
from peftkit.recipe import DataConfig, ModelConfig, load_recipe
from peftkit.tiny import write_jsonl
from peftkit.train import train


@pytest.fixture(scope="module")
def reward_data(tmp_path_factory) -> dict[str, Path]:
    """Sums, the chosen answer right and the rejected one its negative."""
    import random

    root, rng = tmp_path_factory.mktemp("reward"), random.Random(0)
    for name, n in (("train", 32), ("eval", 8)):
        sums = [(rng.randint(1, 50), rng.randint(1, 50)) for _ in range(n)]
        write_jsonl(root / f"{name}.jsonl", [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(-a - b)}
                                             for a, b in sums])
    return {"train": root / "train.jsonl", "eval": root / "eval.jsonl"}


def _reward_recipe(tmp_path: Path, model: Path, data: dict, model_keys: dict | None = None, **training) -> Path:
    recipe = make_recipe(tmp_path, model, data, data={"format": "preference", "max_length": 64},
                         adapter={"dropout": 0.0}, training={"objective": "reward", "lr": 2e-2, **training})
    raw = yaml.safe_load(recipe.read_text())
    raw["model"] |= {"task": "sequence_classification"} | (model_keys or {})
    recipe.write_text(yaml.safe_dump(raw))
    return recipe


def _classifier(path: Path, tok) -> torch.nn.Module:
    """The base as a one-output sequence classifier (its head as the adapter saves it), fp32, eval mode."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    return model.eval()


def test_a_reward_model_from_an_adapter_trains_as_trl_s_reward_trainer(tiny_llama, tmp_path):
    """A reward model on adapter.init_from (a SEQ_CLS LoRA peft made, far from identity, its score head with it)
    against TRL's RewardTrainer on a PeftModel of the same adapter, given the same text rows (TRL tokenizes them: the
    tiny Llama's characters, no merge across the prompt's end; a chosen answer ends with the EOS's text, which both
    score once): the same token ids, and three SGD steps give TRL's losses, accuracies and margins, and its adapter
    and head, with the centring term on."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file

    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_llama)))
    torch.manual_seed(3)
    start = get_peft_model(_classifier(tiny_llama, tok), LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False))
    start.save_pretrained(tmp_path / "start")
    rows = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(-a - b)}
            for a, b in [(3, 4), (10, 20), (1, 1), (7, 8)]]
    rows[1]["chosen"] += "</s>"
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    steps, lr, center = 3, 0.05, 0.01
    recipe = _reward_recipe(tmp_path, tiny_llama, {"train": tmp_path / "pairs.jsonl", "eval": tmp_path / "pairs.jsonl"},
                            max_steps=steps, batch_size=4, optimizer="sgd", lr=lr, scheduler="constant",
                            warmup_steps=0, reward_center=center)
    raw = yaml.safe_load(recipe.read_text())
    raw["adapter"] = {"init_from": str(tmp_path / "start")}
    recipe.write_text(yaml.safe_dump(raw))
    train(load_recipe(recipe))
    ours = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]

    pairs, _ = load_pairs(tok, str(tmp_path / "pairs.jsonl"), None, DataConfig(train="x", format="preference"))
    model = PeftModel.from_pretrained(_classifier(tiny_llama, tok).train(), tmp_path / "start", is_trainable=True)
    args = trl.RewardConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_steps=steps,
                            learning_rate=lr, optim="sgd", lr_scheduler_type="constant", warmup_steps=0,
                            center_rewards_coefficient=center, report_to=[], save_strategy="no", use_cpu=True,
                            logging_steps=1, bf16=False)
    trainer = trl.RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    assert [[row[f"{k}_ids"] for k in ("chosen", "rejected")] for row in trainer.train_dataset] == \
        [[c.input_ids, r.input_ids] for c, r, _ in pairs]
    trainer.train()
    theirs = [x for x in trainer.state.log_history if "loss" in x]
    assert theirs[-1]["loss"] < theirs[0]["loss"] - 1e-3  # it trained
    for a, b in zip(ours, theirs, strict=True):  # each step's figures, as TRL logs them
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and abs(a["reward_margin"] - b["margin"]) <= 1e-5, (a, b)
        assert a["reward_accuracy"] == b["accuracy"]
    ours_final = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    trained = {k.replace(".default", "").replace(".modules_to_save", ""): v for k, v in model.state_dict().items()
               if ".default." in k}
    assert set(ours_final) == set(trained) and "base_model.model.score.weight" in ours_final
    assert max((ours_final[k] - trained[k]).abs().max().item() for k in ours_final) <= 1e-5


def test_a_run_learns_to_score_the_chosen_answer_higher_and_peft_gives_its_figures(tiny_llama, reward_data, tmp_path):
    """The exported adapter is peft's SEQ_CLS LoRA with the score head: peft's scores of the eval pairs give the run's
    final evaluation (loss, accuracy, margin, mean rewards), computed here from the scores alone."""
    from peft import PeftModel

    train(load_recipe(_reward_recipe(tmp_path, tiny_llama, reward_data, max_steps=16, eval_steps=8)))
    run = tmp_path / "run"
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert (config["task_type"], config["modules_to_save"]) == ("SEQ_CLS", ["score"])
    card = (run / "adapter" / "README.md").read_text()
    assert "Objective: a reward model" in card and "num_labels=1)" in card and "--format preference" in card
    last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x][-1]
    assert last["eval_reward_accuracy"] == 1.0

    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_llama)))
    model = PeftModel.from_pretrained(_classifier(tiny_llama, tok), run / "adapter").eval()
    pairs, _ = load_pairs(tok, str(reward_data["eval"]), None, DataConfig(train="x", format="preference"))
    with torch.no_grad():  # one row at a time: no padding involved
        scores = torch.tensor([[model(input_ids=torch.tensor([e.input_ids])).logits.item() for e in pair[:2]]
                               for pair in pairs])
    margin = scores[:, 0] - scores[:, 1]
    expected = {"eval_loss": float(-F.logsigmoid(margin).mean()), "eval_reward_margin": float(margin.mean()),
                "eval_chosen_reward": float(scores[:, 0].mean()), "eval_rejected_reward": float(scores[:, 1].mean())}
    assert all(abs(last[k] - v) <= 1e-4 * max(1.0, abs(v)) for k, v in expected.items()), (last, expected)
    _eval_and_merge(run, reward_data["eval"], last, tmp_path)


def _centred_run(tmp_path: Path, tiny_llama: Path, reward_data: dict) -> None:
    """A reward model trained at training.reward_center 0.5 into tmp_path/run, with its merged export."""
    path = _reward_recipe(tmp_path, tiny_llama, reward_data, max_steps=4, eval_steps=4, reward_center=0.5)
    raw = yaml.safe_load(path.read_text())
    raw["export"] |= {"merged": True}
    path.write_text(yaml.safe_dump(raw))
    train(load_recipe(path))


def test_a_centred_reward_model_is_scored_with_its_centring_term_without_its_recipe(tiny_llama, reward_data, tmp_path):
    """training.reward_center adds center (s(chosen) + s(rejected))^2 to the loss. The adapter and the merged models
    (the run's merged/ and `peftkit merge`'s) record it, so `peftkit eval` of them without the recipe gives the run's
    loss: it scored them with no centring (0.0013 where the run had 0.0053, on SmolLM2 at 0.01) beside its rewards."""
    _centred_run(tmp_path, tiny_llama, reward_data)
    run = tmp_path / "run"
    last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x][-1]
    centring = 0.5 * (last["eval_chosen_reward"] + last["eval_rejected_reward"]) ** 2  # a lower bound of its mean
    assert centring > 0.01  # the term is there to be left out
    _eval_and_merge(run, reward_data["eval"], last, tmp_path)
    from typer.testing import CliRunner

    from peftkit.cli import app

    out = tmp_path / "merged-run.json"
    result = CliRunner().invoke(app, ["eval", "--model", str(run / "merged"), "--data", str(reward_data["eval"]),
                                      "--format", "preference", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert abs(json.loads(out.read_text())["loss"] - last["eval_loss"]) <= 1e-5


def test_a_comparison_of_centred_reward_models_scores_each_with_its_own_centring_term(tiny_llama, reward_data,
                                                                                      tmp_path):
    """Without a reward recipe, a comparison's rows (--adapter NAME=DIR, --merged NAME=DIR) are each scored with the
    training.reward_center its peftkit.json records, as `peftkit eval` of each alone scores it: they took 0, the
    run's adapter 0.364 where its run (and its evaluation alone) had 1.233 at reward_center 0.5."""
    from typer.testing import CliRunner

    from peftkit.cli import app

    _centred_run(tmp_path, tiny_llama, reward_data)
    run = tmp_path / "run"
    last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x][-1]
    out = tmp_path / "rows.json"
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_llama), "--adapter", f"rm={run / 'adapter'}",
                                      "--merged", f"m={run / 'merged'}", "--data", str(reward_data["eval"]),
                                      "--format", "preference", "--json", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    rows = json.loads(out.read_text())
    assert abs(rows["rm"]["loss"] - last["eval_loss"]) <= 1e-5 and abs(rows["m"]["loss"] - last["eval_loss"]) <= 1e-5


def test_a_centred_reward_model_on_the_hub_is_scored_with_its_centring_term(tiny_llama, reward_data, tmp_path,
                                                                             monkeypatch):
    """`peftkit eval --model user/rm` of a merged reward model published with its peftkit.json (`peftkit push
    --merged`): the record is read from the hub (here an offline cache), which transformers never fetches, so the loss
    is the run's; it was scored with no centring."""
    from huggingface_hub import constants
    from typer.testing import CliRunner

    from peftkit.cli import app
    from tests.test_hub import _publish_to

    _centred_run(tmp_path, tiny_llama, reward_data)
    last = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x][-1]
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _publish_to(tmp_path / "hub", "acme/rm", tmp_path / "run" / "merged", "a" * 40)
    out = tmp_path / "hub-rm.json"
    result = CliRunner().invoke(app, ["eval", "--model", "acme/rm", "--data", str(reward_data["eval"]),
                                      "--format", "preference", "--json", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert abs(json.loads(out.read_text())["loss"] - last["eval_loss"]) <= 1e-5


def test_a_requantized_centred_reward_model_keeps_its_centring_term(tiny_llama, reward_data, tmp_path):
    """`peftkit merge --requantize nf4` of a centred reward model: OUTPUT-nf4 carries the merged model's peftkit.json,
    so `peftkit eval --model OUTPUT-nf4` without the recipe scores the loss the reward recipe gives it (it had no
    peftkit.json: 0.390 where the recipe's eval of the same model gives 1.182, at reward_center 0.5)."""
    from typer.testing import CliRunner

    from peftkit.cli import app

    path = _reward_recipe(tmp_path, tiny_llama, reward_data, max_steps=4, eval_steps=4, reward_center=0.5)
    train(load_recipe(path))
    out = tmp_path / "merged"
    result = CliRunner().invoke(app, ["merge", "--adapter", str(tmp_path / "run" / "adapter"), "--output", str(out),
                                      "--requantize", "nf4"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    nf4 = tmp_path / "merged-nf4"
    record = json.loads((nf4 / "peftkit.json").read_text())  # (with what it keeps of the update: test_requantized)
    assert record.pop("requantized")["method"] == "nf4" and record == json.loads((out / "peftkit.json").read_text())

    def loss(*args: str) -> float:
        result = CliRunner().invoke(app, ["eval", *args, "--model", str(nf4), "--json", str(tmp_path / "f.json")])
        assert result.exit_code == 0, result.output + repr(result.exception)
        return json.loads((tmp_path / "f.json").read_text())["loss"]

    alone = loss("--data", str(reward_data["eval"]), "--format", "preference")
    assert abs(alone - loss(str(path))) <= 1e-6


def _eval_and_merge(run: Path, data: Path, last: dict, tmp_path: Path) -> None:
    """`peftkit eval RUN_DIR`, of the adapter alone (a SEQ_CLS adapter of one output is scored as a reward model
    without a recipe saying so) and of the merged model give the run's last evaluation; generate refuses."""
    from typer.testing import CliRunner

    from peftkit.cli import app

    def figures(*args: str) -> dict:
        result = CliRunner().invoke(app, ["eval", *args, "--json", str(tmp_path / "figures.json")])
        assert result.exit_code == 0, result.output + repr(result.exception)
        return json.loads((tmp_path / "figures.json").read_text())

    assert CliRunner().invoke(app, ["merge", "--adapter", str(run / "adapter"), "--output",
                                    str(tmp_path / "merged")]).exit_code == 0
    for args in ([str(run)], ["--adapter", str(run / "adapter"), "--data", str(data), "--format", "preference"],
                 ["--model", str(tmp_path / "merged"), "--data", str(data), "--format", "preference"]):
        got = figures(*args)
        assert got["num_pairs"] == 8 and all(abs(got[k] - last[f"eval_{k}"]) <= 1e-5 for k in (
            "loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")), (args, got, last)
    result = CliRunner().invoke(app, ["generate", str(run), "--prompt", "1+1="])
    assert "is a reward model: it scores a prompt with an answer" in str(result.exception)


def test_a_reward_model_over_a_4_bit_base_is_peft_s(tiny_llama, reward_data, tmp_path):
    """QLoRA reward model: NF4 + double quant, paged 8-bit AdamW, the head in full precision; peft over the base
    loaded 4-bit as a peft user loads it gives the run's last evaluation, and so does `peftkit eval` of the run."""
    recipe = _reward_recipe(tmp_path, tiny_llama, reward_data, max_steps=8, eval_steps=8, optimizer="paged_adamw_8bit")
    raw = yaml.safe_load(recipe.read_text())
    raw["quantization"] = {"method": "nf4", "double_quant": True, "compute_dtype": "float32"}
    recipe.write_text(yaml.safe_dump(raw))
    train(load_recipe(recipe))
    run, tok = tmp_path / "run", load_tokenizer(ModelConfig(name_or_path=str(tiny_llama)))
    last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x][-1]
    model = peft_over_4_bit(tiny_llama, run / "adapter", 1, tok.pad_token_id)
    pairs, _ = load_pairs(tok, str(reward_data["eval"]), None, DataConfig(train="x", format="preference"))
    with torch.no_grad():
        scores = torch.tensor([[model(input_ids=torch.tensor([e.input_ids])).logits.item() for e in pair[:2]]
                               for pair in pairs])
    margin = scores[:, 0] - scores[:, 1]
    assert abs(last["eval_loss"] - float(-F.logsigmoid(margin).mean())) <= 1e-5
    assert abs(last["eval_reward_margin"] - float(margin.mean())) <= 1e-4 and last["eval_reward_accuracy"] > 0.5
    from typer.testing import CliRunner

    from peftkit.cli import app

    assert CliRunner().invoke(app, ["eval", str(run), "--json", str(tmp_path / "f.json")]).exit_code == 0
    assert abs(json.loads((tmp_path / "f.json").read_text())["loss"] - last["eval_loss"]) <= 1e-6


@pytest.mark.parametrize("change, said", [
    ({"model": {"task": "causal_lm"}}, "training.objective: reward trains a reward model, a sequence classifier with "
                                       "one output"),
    ({"model": {"num_labels": 2}}, "model.num_labels: 2: a reward model (training.objective: reward) has one output"),
    ({"training": {"objective": "dpo"}}, "training.objective: dpo trains a language model's answers; model.task is "
                                         "sequence_classification"),
    ({"data": {"format": "classification"}}, "DPO, ORPO, SimPO and reward models train on pairs of answers"),
    ({"training": {"objective": "dpo", "reward_center": 0.1}, "model": {"task": "causal_lm"}},
     "training.reward_center is a setting of training.objective: reward"),
])
def test_recipe_mistakes_about_a_reward_model_are_said_at_their_key(tiny_llama, reward_data, tmp_path, monkeypatch,
                                                                    capsys, change, said):
    recipe = _reward_recipe(tmp_path, tiny_llama, reward_data)
    raw = yaml.safe_load(recipe.read_text())
    for section, keys in change.items():
        raw[section] |= keys
    recipe.write_text(yaml.safe_dump(raw))
    assert said in " ".join(cli_user_error(monkeypatch, capsys, "train", str(recipe)).split())


def test_a_classifier_of_classes_scores_no_pairs(tiny_llama, reward_data, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=2).save_pretrained(tmp_path / "c2")
    load_tokenizer(ModelConfig(name_or_path=str(tiny_llama))).save_pretrained(tmp_path / "c2")
    said = cli_user_error(monkeypatch, capsys, "eval", "--model", str(tmp_path / "c2"), "--data",
                          str(reward_data["eval"]), "--format", "preference")
    assert "is a classifier of classes, not a reward model" in " ".join(said.split())


def test_a_reward_model_on_unpaired_answers_is_refused_saying_why(tiny_llama, tmp_path, monkeypatch, capsys):
    """A merged reward model (a classifier of one output) on data.format unpaired rows: KTO's figures are a language
    model's log-probabilities, which a classifier has none of. It stopped with a traceback (row_logps: 'logits of (16,
    1) positions for labels of ...')."""
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1).save_pretrained(tmp_path / "r")
    load_tokenizer(ModelConfig(name_or_path=str(tiny_llama))).save_pretrained(tmp_path / "r")
    write_jsonl(tmp_path / "u.jsonl", [{"prompt": "1+1=", "completion": "2", "label": True},
                                       {"prompt": "2+2=", "completion": "5", "label": False}])
    said = cli_user_error(monkeypatch, capsys, "eval", "--model", str(tmp_path / "r"), "--data",
                          str(tmp_path / "u.jsonl"), "--format", "unpaired")
    assert f"{tmp_path / 'r'} is a sequence classifier, which scores an answer and gives it no log-probability, and " \
           "unpaired answers (data.format 'unpaired') are scored by KTO's figures" in " ".join(said.split()), said


def test_a_roberta_reward_adapter_is_scored_as_a_reward_model(reward_data, tmp_path):
    """RoBERTa's head is a dense layer and out_proj (classifier.out_proj.weight, one row): `peftkit eval --adapter DIR`
    took its one-output adapter for a classifier of classes ('scores no preference pairs') as it found no
    classifier.weight. Now its figures are the Bradley-Terry formula on peft's scores of the pairs."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForSequenceClassification, RobertaConfig, RobertaModel
    from typer.testing import CliRunner

    from peftkit.cli import app
    from peftkit.tiny import build_encoder_tokenizer

    tok = build_encoder_tokenizer()
    tok.eos_token = tok.sep_token  # (data.format preference's answers end with EOS)
    torch.manual_seed(0)
    RobertaModel(RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=140, pad_token_id=tok.pad_token_id)
                 ).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    head = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=1)
    get_peft_model(head, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"],
                                    init_lora_weights=False)).save_pretrained(tmp_path / "adapter")
    result = CliRunner().invoke(app, ["eval", "--adapter", str(tmp_path / "adapter"), "--data",
                                      str(reward_data["eval"]), "--format", "preference", "--json",
                                      str(tmp_path / "f.json")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    got = json.loads((tmp_path / "f.json").read_text())
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "base", num_labels=1, dtype=torch.float32), tmp_path / "adapter").eval()
    pairs, _ = load_pairs(tok, str(reward_data["eval"]), None, DataConfig(train="x", format="preference"))
    with torch.no_grad():  # one row at a time: no padding involved
        scores = torch.tensor([[model(input_ids=torch.tensor([e.input_ids])).logits.item() for e in pair[:2]]
                               for pair in pairs])
    margin = scores[:, 0] - scores[:, 1]
    assert got["num_pairs"] == 8 and abs(got["loss"] - float(-F.logsigmoid(margin).mean())) <= 1e-5
    assert abs(got["reward_margin"] - float(margin.mean())) <= 1e-5, (got, margin)


def test_a_merged_reward_model_requantizes_as_a_classifier(tiny_llama, tmp_path):
    """`peftkit merge --requantize nf4` of a reward adapter: the merged classifier was loaded again as a causal LM and
    refused (score.weight where lm_head was expected). Now OUTPUT-nf4 is the one-output classifier, its head in full
    precision, whose scores are the merged model's loaded 4-bit by transformers with the head skipped."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig
    from typer.testing import CliRunner

    from peftkit.cli import app

    pytest.importorskip("bitsandbytes")
    head = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1)
    get_peft_model(head, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"],
                                    init_lora_weights=False)).save_pretrained(tmp_path / "adapter")
    result = CliRunner().invoke(app, ["merge", "--adapter", str(tmp_path / "adapter"), "--output",
                                      str(tmp_path / "merged"), "--requantize", "nf4"])
    assert result.exit_code == 0, result.output + repr(result.exception)

    def scores(path: Path, **kwargs) -> torch.Tensor:
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32, device_map={"": "cpu"},
                                                                   **kwargs).eval()
        assert model.config.num_labels == 1 and type(model.score) is torch.nn.Linear
        for module in model.modules():  # (as conftest's peft_over_4_bit: the same kernel on any CPU)
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
        with torch.no_grad():
            return model(input_ids=torch.tensor([[5, 9, 14, 20, 7], [3, 8, 11, 6, 2]])).logits

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["lm_head", "score"])
    expected = scores(tmp_path / "merged", quantization_config=q)
    assert (scores(tmp_path / "merged-nf4") - expected).abs().max() <= 1e-5


def test_num_labels_1_is_a_reward_model_s_alone(tiny_llama, tmp_path, monkeypatch, capsys):
    write_jsonl(tmp_path / "c.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}])
    recipe = make_recipe(tmp_path, tiny_llama, {"train": tmp_path / "c.jsonl", "eval": tmp_path / "c.jsonl"},
                         data={"format": "classification"})
    raw = yaml.safe_load(recipe.read_text())
    raw["model"] |= {"task": "sequence_classification", "num_labels": 1}
    recipe.write_text(yaml.safe_dump(raw))
    assert "model.num_labels: 1 is a reward model's one score" in " ".join(
        cli_user_error(monkeypatch, capsys, "train", str(recipe)).split())


def test_eval_of_a_reward_recipe_scores_the_base_head_its_run_scored(tiny_llama, reward_data, tmp_path):
    """The base's new head is drawn from the recipe's training.seed, as the run drew the head its base evaluation
    scored: `peftkit eval RECIPE` gives the run's base_eval figures at training.seed 3 (it drew from seed 0: 0.6894
    against the run's 0.6521 on the hunt's data)."""
    from typer.testing import CliRunner

    from peftkit.cli import app

    recipe = _reward_recipe(tmp_path, tiny_llama, reward_data, max_steps=1, seed=3)
    train(load_recipe(recipe))
    summary = json.loads((tmp_path / "run" / "manifest.json").read_text())["metrics"]
    result = CliRunner().invoke(app, ["eval", str(recipe), "--json", str(tmp_path / "f.json")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    got = json.loads((tmp_path / "f.json").read_text())
    assert all(abs(got[k] - summary[f"base_eval_{k}"]) <= 1e-6 for k in ("loss", "reward_margin", "chosen_reward"))
