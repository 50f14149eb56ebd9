"""model.task: sequence_classification: data.format classification, the classifier head saved as modules_to_save,
accuracy / macro-F1, and the SEQ_CLS adapter format both ways with peft (its logits to 1e-5)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from peftkit.adapters import inject_adapters
from peftkit.classify import evaluate_classification, with_head
from peftkit.data.classification import ClassificationCollator, LabelSet, load_classification
from peftkit.errors import PeftkitError
from peftkit.metrics import accuracy, macro_f1
from peftkit.adapter_base import load_adapted_model
from peftkit.modeling import load_model, load_tokenizer
from peftkit.recipe import DataConfig, ModelConfig, load_recipe
from peftkit.tiny import build_tiny_encoder, sentiment_rows, write_jsonl
from peftkit.export import export
from peftkit.train import train
from tests.conftest import cli_user_error, make_recipe, peft_over_4_bit, random_adapters, tokenizer_reads, unplaced

LABELS = LabelSet(("negative", "positive"))
TEXTS = ["good nice fine", "bad sad awful grim dull", "x", "happy lovely bright superb great good"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A saved 2-layer, hidden-32 BertModel (no task head, as a pretrained encoder ships) and its tokenizer."""
    path = tmp_path_factory.mktemp("models") / "tiny-bert"
    build_tiny_encoder(path, hidden_size=32, num_layers=2, seed=0)
    return path


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sentiment")
    write_jsonl(root / "train.jsonl", sentiment_rows(96, seed=3))
    write_jsonl(root / "eval.jsonl", sentiment_rows(32, seed=4))
    return {"train": root / "train.jsonl", "eval": root / "eval.jsonl"}


@pytest.fixture(params=["bert", "llama"])
def base(request, tiny_bert, tiny_llama) -> Path:
    """An encoder ([CLS] pooling, head `classifier`) and a decoder (last-token pooling, head `score`)."""
    return tiny_bert if request.param == "bert" else tiny_llama


def classification_recipe(tmp_path: Path, model_dir: Path, files: dict[str, Path], adapter: dict | None = None,
                          **sections) -> Path:
    """`make_recipe`'s small recipe as a classifier's: `adapter` replaces its adapter section, `sections` update."""
    path = make_recipe(tmp_path, model_dir, files, data={"format": "classification", "max_length": 64})
    raw = yaml.safe_load(path.read_text())
    raw["model"]["task"] = "sequence_classification"
    raw["adapter"] = adapter or raw["adapter"]
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def batch_of(tok, texts: list[str]) -> dict[str, torch.Tensor]:
    """Right-padded rows of different lengths, as peftkit's collator builds them."""
    return tok(texts, padding=True, return_tensors="pt")


def peft_logits(base_dir: Path, adapter_dir: Path, batch: dict) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)
    with torch.no_grad():
        return PeftModel.from_pretrained(model, adapter_dir).eval()(**batch).logits


ADAPTERS = {
    "lora": {"method": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
    "loha": {"method": "loha", "r": 4, "alpha": 8, "target_modules": "all-linear"},
    "ia3": {"method": "ia3"},  # its Llama defaults: k_proj, v_proj, down_proj
}


@pytest.mark.parametrize("method", ["lora", "loha", "ia3"])
def test_export_loads_in_peft_with_the_same_logits(tmp_path, base, sentiment, method):
    if method == "ia3" and base.name == "tiny-bert":
        pytest.skip("IA3 has defaults for decoders only; LoRA and LoHa cover the encoder")
    recipe = load_recipe(classification_recipe(tmp_path, base, sentiment, ADAPTERS[method]))
    torch.manual_seed(0)
    model = load_model(recipe.model, labels=LABELS).eval()
    adapter = with_head(recipe.adapter, model)
    targets = inject_adapters(model, adapter)
    random_adapters(model)
    head = model.get_submodule(adapter.modules_to_save[0])
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.5)  # a head unlike the one from_pretrained draws, so a head not loaded would show
    export(model, load_tokenizer(recipe.model), recipe.model_copy(update={"adapter": adapter}), targets, tmp_path / "out",
           labels=LABELS)
    out = tmp_path / "out" / "adapter"

    config = json.loads((out / "adapter_config.json").read_text())
    head_name = "classifier" if base.name == "tiny-bert" else "score"
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == [head_name]
    assert not any(t.startswith(head_name) for t in config["target_modules"]), "the head is saved whole, not adapted"
    assert f"base_model.model.{head_name}.weight" in load_file(out / "adapter_model.safetensors")
    assert json.loads((out / "peftkit.json").read_text())["labels"] == ["negative", "positive"]

    batch = batch_of(load_tokenizer(recipe.model), TEXTS)
    with torch.no_grad():
        ours = model(**batch).logits
    theirs = peft_logits(base, out, batch)
    diff = (ours - theirs).abs().max().item()
    assert diff <= 1e-5, diff
    # The card's snippet, run as a user runs it, loads the adapter with the classes the run found, by name (it gave
    # their count alone: pipelines said LABEL_0, LABEL_1)
    snippet = (out / "README.md").read_text().split("```python\n")[1].split("```")[0]
    scope: dict = {}
    exec(snippet.replace(f"PATH/TO/{base.name}", str(base)).replace("ADAPTER_DIR", str(out)), scope)
    config = scope["model"].config
    assert config.id2label == {0: "negative", 1: "positive"} and config.label2id == {"negative": 0, "positive": 1}
    with torch.no_grad():
        assert torch.equal(scope["model"].eval()(**batch).logits, theirs)
    assert ours.std() > 0.1  # not trivially equal: the adapter and head moved the logits


@pytest.mark.parametrize("method", ["lora", "loha"])
def test_peft_seq_cls_adapter_loads_with_the_same_logits(tmp_path, base, method):
    from peft import LoHaConfig, LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=3)
    # init_lora_weights / init_weights False: lora_B (hada_w1_b) random too, so the update is not zero.
    config = (LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
              if method == "lora" else
              LoHaConfig(task_type="SEQ_CLS", r=4, alpha=8, target_modules="all-linear", init_weights=False))
    peft_model = get_peft_model(model, config).eval()
    head = "classifier" if base.name == "tiny-bert" else "score"
    with torch.no_grad():
        for p in peft_model.base_model.model.get_submodule(head).modules_to_save["default"].parameters():
            p.normal_(0, 0.5)
    peft_model.save_pretrained(tmp_path / "peft")
    batch = batch_of(load_tokenizer(ModelConfig(name_or_path=str(base))), TEXTS)
    with torch.no_grad():
        theirs = peft_model(**batch).logits

    ours_model, adapter, *_ = load_adapted_model(None, str(tmp_path / "peft"))
    assert adapter.modules_to_save == [head]  # peft writes [classifier, score]: the one this model has is kept
    assert ours_model.config.num_labels == 3  # read from the saved head's shape (peft saves no label names)
    with torch.no_grad():
        ours = ours_model(**batch).logits
    diff = (ours - theirs).abs().max().item()
    assert diff <= 1e-5, diff
    assert theirs.std() > 0.1


def test_accuracy_and_macro_f1_by_hand():
    predicted, reference = [0, 1, 1, 2], [0, 1, 2, 2]
    assert accuracy(predicted, reference) == 0.75
    # class 0: TP 1 -> F1 1; class 1: TP 1, FP 1 -> 2/3; class 2: TP 1, FN 1 -> 2/3
    assert macro_f1(predicted, reference) == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    # a class only predicted, never present, counts with F1 0 (scikit-learn's default labels)
    assert macro_f1([0, 0], [1, 1]) == 0.0
    assert macro_f1([1, 0, 1], [1, 0, 1]) == 1.0


def test_evaluate_classification_matches_the_logits(tiny_bert, sentiment):
    cfg = DataConfig(train=str(sentiment["eval"]), format="classification", max_length=64)
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_bert)))
    examples, _, labels = load_classification(tok, cfg.train, "train", cfg)
    torch.manual_seed(0)
    model = load_model(ModelConfig(name_or_path=str(tiny_bert), task="sequence_classification"), labels=labels)
    result = evaluate_classification(model, examples, 5, tok.pad_token_id)  # 32 rows: batches of 5 and a rest of 2

    batch = ClassificationCollator(tok.pad_token_id)(examples)
    with torch.no_grad():
        logits = model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    predicted, reference = logits.argmax(-1).tolist(), batch["labels"].tolist()
    assert result["accuracy"] == sum(p == r for p, r in zip(predicted, reference)) / 32
    assert result["macro_f1"] == pytest.approx(macro_f1(predicted, reference))
    assert result["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, batch["labels"]).item(), abs=1e-6)
    assert result["num_examples"] == 32


def test_training_from_a_recipe_improves_accuracy(tmp_path, tiny_bert, sentiment):
    from peftkit.eval_job import eval_job
    from peftkit.evaluate import evaluate

    recipe = classification_recipe(tmp_path, tiny_bert, sentiment,
                                   training={"max_steps": 40, "batch_size": 16, "lr": 5e-3, "warmup_steps": 2})
    summary = train(load_recipe(recipe))
    assert summary["base_eval_accuracy"] < 0.75 and summary["eval_accuracy"] >= 0.9, summary
    assert summary["eval_macro_f1"] >= 0.9 and summary["eval_perplexity"] is None
    run = tmp_path / "run"
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["eval_accuracy"] == summary["eval_accuracy"]
    # peftkit eval of the run directory (its adapter on the base) gives the run's final figures
    result = evaluate(eval_job(run, [], None, None, None, None, None, None, None))
    assert result["accuracy"] == summary["eval_accuracy"]
    assert result["loss"] == pytest.approx(summary["eval_loss"], abs=1e-6)
    # The report shows the accuracy and macro-F1, base and fine-tuned, and their curve; no perplexity (it showed only
    # a perplexity made from the class loss).
    from peftkit.report import write_report

    page = write_report(run).read_text()
    for metric in ("accuracy", "macro f1"):
        key = metric.replace(" ", "_")
        row = f"<tr><th>{metric}</th><td>{summary[f'base_eval_{key}']:.4f}</td><td>{summary[f'eval_{key}']:.4f}</td></tr>"
        assert row in page
    assert "perplexity" not in page.split("<h2>Curves</h2>")[0]
    assert (run / "report" / "eval_metrics.png").is_file()


def test_decoder_run_exports_what_peft_loads(tmp_path, tiny_llama, sentiment, monkeypatch, capsys):
    """A Llama classifier trained from a recipe: pooling on the last non-pad token, its `score` head saved."""
    recipe = classification_recipe(tmp_path, tiny_llama, sentiment, training={"max_steps": 3, "batch_size": 8},
                                   eval={"batch_size": 8, "samples": 3}, export={"merged": True})
    train(load_recipe(recipe))  # eval.samples is no error: a classifier has no generations to show
    adapter = tmp_path / "run" / "adapter"
    batch = batch_of(load_tokenizer(ModelConfig(name_or_path=str(tiny_llama))), TEXTS)
    ours = load_adapted_model(None, str(adapter))[0]
    with torch.no_grad():
        logits = ours(**batch).logits
    assert (logits - peft_logits(tiny_llama, adapter, batch)).abs().max() <= 1e-5
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "merged").eval()
    assert merged.config.id2label == {0: "negative", 1: "positive"}
    with torch.no_grad():
        assert (merged(**batch).logits - logits).abs().max() <= 1e-5
    # A classifier generates no text: generate and chat said so with an AttributeError traceback (generation_config),
    # and the no-prompt and no-template errors suggested `--prompt`.
    from tests.conftest import cli_user_error

    run = tmp_path / "run"
    for args in (("generate", str(run), "--prompt", "great movie"), ("generate", str(run)), ("chat", str(run)),
                 ("generate", "--model", str(run / "merged"), "--prompt", "x"), ("generate", "--adapter", str(adapter))):
        err = " ".join(cli_user_error(monkeypatch, capsys, *args).split())
        assert "is a sequence classifier: it predicts a label and generates no text, so there is nothing for peftkit " \
               f"{args[0]} to do. Score it with `peftkit eval` (loss, accuracy, macro_f1)." in err, err


def test_resume_mid_run_is_bit_identical(tmp_path, tiny_bert, sentiment):
    """The head is checkpointed with the adapter (and its optimizer state): resuming at step 3 of 6 exports the
    same bytes as the uninterrupted run."""
    recipe = load_recipe(classification_recipe(tmp_path, tiny_bert, sentiment, training={"max_steps": 6, "save_steps": 3},
                                               eval={"base_model": False}))
    train(recipe)
    weights = tmp_path / "run" / "adapter" / "adapter_model.safetensors"
    whole = weights.read_bytes()
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-00000006")
    train(recipe, resume=True)
    assert weights.read_bytes() == whole


def test_a_decoder_pads_with_the_tokenizer_s_pad_id_whatever_the_checkpoint_says(tmp_path, tiny_llama, sentiment):
    """config.json's pad_token_id 3 and the tokenizer's 0: the head read padding, and the figures changed with the
    batch size (0.1348 at batch 8, 0.3215 one row at a time on the hunt's model)."""
    from peftkit.eval_job import eval_job
    from peftkit.evaluate import evaluate

    model = shutil.copytree(tiny_llama, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"pad_token_id": 3}))
    figures = [evaluate(eval_job(None, [], str(model), str(sentiment["eval"]), "classification", None, None, size,
                                 None))["loss"] for size in (1, 8)]
    assert figures[0] == pytest.approx(figures[1], abs=1e-5)


def test_a_decoder_classifier_run_reads_the_tokenizer_once_and_pads_with_its_id(tmp_path, tiny_llama, sentiment,
                                                                               monkeypatch):
    """train read a classifier's tokenizer twice (the data's, then loading the model for its pad id); it reads it once
    and passes it on. The head still reads the tokenizer's pad id, not the checkpoint's 3: the run's last eval loss
    (batches of 8) is `peftkit eval RUN --batch-size 1`'s. `peftkit eval RUN` read it three times (the rows', the
    model's pad id, the tokenizer the adapted model's loading returned) and `peftkit merge` twice: once each now
    (merge's read-back of the files it wrote aside)."""
    from transformers import AutoTokenizer
    from typer.testing import CliRunner

    from peftkit.cli import app

    model = shutil.copytree(tiny_llama, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"pad_token_id": 3}))
    loads, load = [], AutoTokenizer.from_pretrained.__func__
    monkeypatch.setattr(AutoTokenizer, "from_pretrained",
                        classmethod(lambda cls, path, *a, **k: loads.append(str(path)) or load(cls, path, *a, **k)))
    recipe = classification_recipe(tmp_path, model, sentiment, training={"max_steps": 4, "eval_steps": 4})
    train(load_recipe(recipe))
    assert loads.count(str(model)) == 1, loads
    last = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x][-1]
    out = tmp_path / "eval.json"
    del loads[:]
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "run"), "--batch-size", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert abs(json.loads(out.read_text())["loss"] - last["eval_loss"]) <= 1e-5
    assert loads == [str(model)], loads
    del loads[:]
    result = CliRunner().invoke(app, ["merge", "--adapter", str(tmp_path / "run" / "adapter"), "--output",
                                      str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert loads.count(str(model)) == 1, loads


def test_a_classifier_s_eval_of_two_sets_reads_the_tokenizer_once(tmp_path, tiny_llama, sentiment, monkeypatch):
    """`peftkit eval RUN` of a classifier with two data.eval sets read the base's tokenizer three times (loading the
    model, then each set's rows: each set had a source of its own), and its comparison with two adapters on those sets
    eight (a headless base row loads once per set, for the pad id). Once each now; each set's loss is the run's last
    (batches of 8) to 1e-5, and an adapter row's is `peftkit eval RUN --data FILE` of that set."""
    from typer.testing import CliRunner

    from peftkit.cli import app

    recipe = classification_recipe(tmp_path, tiny_llama, sentiment, training={"max_steps": 4, "eval_steps": 4})
    raw = yaml.safe_load(recipe.read_text())
    raw["data"]["eval"] = {"a": str(sentiment["eval"]), "b": str(sentiment["train"])}
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    train(load_recipe(recipe))
    run = tmp_path / "run"
    last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x][-1]
    reads = tokenizer_reads(monkeypatch)
    result = CliRunner().invoke(app, ["eval", str(run), "--batch-size", "1", "--json", str(tmp_path / "sets.json")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert reads == [str(tiny_llama)]
    figures = json.loads((tmp_path / "sets.json").read_text())
    assert abs(figures["a"]["loss"] - last["eval_loss"]) <= 1e-5 and abs(figures["b"]["loss"] - last["eval_b_loss"]) <= 1e-5
    del reads[:]
    adapters = ["--adapter", f"x={run / 'adapter'}", "--adapter", f"y={run / 'adapter'}"]
    result = CliRunner().invoke(app, ["eval", str(run), *adapters, "--json", str(tmp_path / "cmp.json")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert reads == [str(tiny_llama)]
    rows = json.loads((tmp_path / "cmp.json").read_text())
    result = CliRunner().invoke(app, ["eval", str(run), "--data", str(sentiment["train"]), "--json",
                                      str(tmp_path / "y.json")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert rows["b"]["y"]["loss"] == json.loads((tmp_path / "y.json").read_text())["loss"]


def test_eval_of_rows_past_an_encoder_s_positions_is_a_clear_error(tmp_path, tiny_bert):
    """It was a RuntimeError from BERT's position embeddings (a GPT-2 language model's eval said it clearly)."""
    from peftkit.eval_job import eval_job
    from peftkit.evaluate import evaluate

    positions = json.loads((tiny_bert / "config.json").read_text())["max_position_embeddings"]
    write_jsonl(tmp_path / "long.jsonl", [{"text": "ab" * positions, "label": "positive"},  # cut to max_length
                                          {"text": "ab", "label": "negative"}])  # (a head of one class is refused)
    with pytest.raises(PeftkitError, match=rf"The longest row of .*long.jsonl has {positions + 100} tokens, more than "
                                           rf"the {positions} positions this bert model has"):
        evaluate(eval_job(None, [], str(tiny_bert), str(tmp_path / "long.jsonl"), "classification", None,
                          positions + 100, None, None))


def test_eval_of_a_base_without_head_repeats(tiny_bert, sentiment):
    """`peftkit eval --model BASE --format classification`: the data's classes and a head drawn from seed 0."""
    from peftkit.eval_job import eval_job
    from peftkit.evaluate import evaluate

    def run():
        return evaluate(eval_job(None, [], str(tiny_bert), str(sentiment["eval"]), "classification", None, None, None,
                                 None))

    first = run()
    assert first == run() and first["num_examples"] == 32 and set(first) == {"loss", "accuracy", "macro_f1",
                                                                              "num_examples"}


def test_integer_labels_and_text_pairs(tmp_path, tiny_bert):
    rows = [{"text": "good", "text_pair": "fine", "label": 2}, {"text": "bad", "label": 0}]
    write_jsonl(tmp_path / "t.jsonl", rows)
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_bert)))
    cfg = DataConfig(train=str(tmp_path / "t.jsonl"), format="classification")
    examples, _, labels = load_classification(tok, cfg.train, "train", cfg)
    assert labels.names == ("0", "1", "2")  # integer labels are class ids: up to the largest
    assert [e.labels for e in examples] == [[2], [0]]
    batch = ClassificationCollator(tok.pad_token_id)(examples)
    # [CLS] g o o d [SEP] f i n e [SEP]: the pair's tokens are segment 1
    assert batch["token_type_ids"][0].tolist() == [0] * 6 + [1] * 5
    assert batch["token_type_ids"][1].sum() == 0 and batch["attention_mask"][1].sum() == 5
    with pytest.raises(PeftkitError, match=r"t.jsonl:1: label 2 is not a class id below model.num_labels \(2\)"):
        load_classification(tok, cfg.train, "train", cfg, num_labels=2)


# ------------------------------------------------------------------------------- what the user sees


@pytest.mark.parametrize(("label", "shown"), [("positive", "'positive'"), (0, "0")])
def test_one_class_of_labels_is_refused(tmp_path, tiny_bert, sentiment, monkeypatch, capsys, label, shown):
    """Every train label the same: a one-class head learns nothing (its loss is 0 from the start). String labels
    trained such a head silently; integer labels were refused."""
    write_jsonl(tmp_path / "one.jsonl", [{"text": t, "label": label} for t in ("good", "bad", "fine")])
    recipe = classification_recipe(tmp_path, tiny_bert, {"train": tmp_path / "one.jsonl", "eval": sentiment["eval"]})
    err = cli_user_error(monkeypatch, capsys, "train", str(recipe))
    assert " ".join(err.split()) == (
        f"error: {tmp_path / 'one.jsonl'}: every label is {shown}, so there is only one class; a classifier needs at "
        "least 2.")
    assert not (tmp_path / "run" / "adapter").exists()


def test_missing_label_column_names_the_line(tmp_path, tiny_bert, sentiment):
    write_jsonl(tmp_path / "bad.jsonl", [{"text": "good", "label": "positive"}, {"text": "bad"}])
    recipe = classification_recipe(tmp_path, tiny_bert, {"train": tmp_path / "bad.jsonl", "eval": sentiment["eval"]})
    with pytest.raises(PeftkitError) as err:
        train(load_recipe(recipe))
    assert str(err.value) == (
        f"{tmp_path / 'bad.jsonl'}:2: missing field 'label' for data.format 'classification' (each row needs text, "
        "label). Fix the row, set the right data.format, or set data.on_bad_rows: skip.")
    assert not (tmp_path / "run" / "adapter").exists()


def test_unknown_label_in_eval_names_file_and_row(tmp_path, tiny_bert, sentiment, monkeypatch, capsys):
    """An eval label that data.train has not: train stops at its row; validate says the same (it passed)."""
    write_jsonl(tmp_path / "eval.jsonl", [{"text": "good", "label": "positive"}, {"text": "meh", "label": "neutral"}])
    recipe = classification_recipe(tmp_path, tiny_bert, {"train": sentiment["train"], "eval": tmp_path / "eval.jsonl"})
    with pytest.raises(PeftkitError) as err:
        train(load_recipe(recipe))
    expected = (
        f"{tmp_path / 'eval.jsonl'}:2: label 'neutral' is not one of the 2 classes the model was trained on (negative, "
        "positive; or their ids 0-1). Fix the row, or train with data that has this class.")
    assert str(err.value) == expected
    validated = cli_user_error(monkeypatch, capsys, "validate", str(recipe))
    assert " ".join(validated.split()) == f"error: {expected}", validated


@pytest.mark.parametrize(("sections", "message"), [
    ({"eval": {"metrics": ["exact_match"]}},
     ("eval.metrics: exact_match score generated text, and a sequence_classification model generates none; remove "
      "them (accuracy and macro_f1 are always computed for classification)")),
    ({"data": {"format": "alpaca"}},
     ("model.task is 'sequence_classification' and data.format is 'alpaca': a sequence_classification model trains "
      "on data.format: classification (text, label, optional text_pair) and that format needs it; set both, or "
      "neither")),
    ({"model": {"task": "causal_lm", "num_labels": 3}, "data": {"format": "alpaca"}},
     ("model.num_labels is set, but model.task is causal_lm; remove model.num_labels or set model.task: "
      "sequence_classification")),
    ({"data": {"format": "classification", "packing": True}},
     "data.packing: a classification row is one example with one label; set data.packing: false"),
    ({"data": {"format": "classification", "train_on": "all"}},
     "data.train_on: all chooses the tokens a language model's loss covers, and a classifier's loss is one label per "
     "row; remove data.train_on"),
    # The prompt family cut the class columns off the logits (an IndexError at step 1), and Llama-Adapter and prefix
    # tuning left the head untrained and unsaved.
    *(({"adapter": {"method": method}}, f"adapter.method: {method} cannot train a classifier")
      for method in ("prompt_tuning", "p_tuning", "prefix_tuning", "multitask_prompt_tuning", "llama_adapter")),
    # AdapterFusion was refused with a reason naming the prompt family and Llama-Adapter only
    ({"adapter": {"method": "fusion", "fuse": ["a", "b"]}},
     "adapter.method: fusion cannot train a classifier: the new head must train in full beside the adapter, which "
     "the prompt family, Llama-Adapter, AdapterFusion and X-LoRA do not do here"),
    ({"adapter": {"method": "xlora", "adapters": {"0": "a", "1": "b"}}},
     "adapter.method: xlora cannot train a classifier: the new head must train in full beside the adapter, which "
     "the prompt family, Llama-Adapter, AdapterFusion and X-LoRA do not do here"),
])
def test_recipe_errors(tmp_path, tiny_bert, sentiment, sections, message):
    recipe = classification_recipe(tmp_path, tiny_bert, sentiment, **sections)
    with pytest.raises(PeftkitError) as err:
        load_recipe(recipe)
    assert message in str(err.value)


def test_classification_metric_on_a_causal_task_is_refused(tmp_path, tiny_llama, number_data):
    recipe = make_recipe(tmp_path, tiny_llama, number_data, eval={"metrics": ["accuracy"]})
    with pytest.raises(PeftkitError, match="eval.metrics: accuracy score a classifier's predicted labels; model.task "
                                           "is causal_lm"):
        load_recipe(recipe)


def test_eval_cli_refuses_classification_metrics_on_other_rows(tmp_path, monkeypatch, capsys, tiny_llama, number_data):
    """--metrics accuracy on alpaca rows printed a blank line (and --json wrote {}), exit 0."""
    from tests.conftest import cli_user_error

    err = cli_user_error(monkeypatch, capsys, "eval", "--model", str(tiny_llama), "--data", str(number_data["eval"]),
                         "--metrics", "accuracy,loss")
    assert ("--metrics accuracy: accuracy scores a classifier's predicted labels, on data.format 'classification' "
            "rows; these rows are 'alpaca'. Use loss, perplexity, exact_match, token_f1, rouge_l") in " ".join(err.split())


def test_eval_cli_refuses_generation_metrics(tmp_path, monkeypatch, capsys, tiny_bert, sentiment):
    from tests.conftest import cli_user_error

    err = cli_user_error(monkeypatch, capsys, "eval", "--model", str(tiny_bert), "--data", str(sentiment["eval"]),
                         "--format", "classification", "--metrics", "exact_match")
    assert "--metrics exact_match: data.format 'classification' is scored by predicted class" in " ".join(err.split())


def test_eval_cli_says_a_classifier_writes_no_predictions(tmp_path, monkeypatch, capsys, tiny_bert, sentiment):
    """--predictions on classification rows said to add --metrics exact_match, which is refused there in turn."""
    from tests.conftest import cli_user_error

    err = " ".join(cli_user_error(monkeypatch, capsys, "eval", "--model", str(tiny_bert), "--data",
                                  str(sentiment["eval"]), "--format", "classification", "--predictions",
                                  str(tmp_path / "p.jsonl")).split())
    assert "--predictions writes generated answers, and a classifier (data.format 'classification') generates " \
           "none: drop --predictions." in err
    assert "--metrics exact_match" not in err


def test_classification_assets_are_deterministic(tmp_path):
    from peftkit.tiny import build_classification_assets

    first, second = build_classification_assets(tmp_path / "a"), build_classification_assets(tmp_path / "b")
    for key in first:
        files = sorted(p.relative_to(first[key]) for p in first[key].rglob("*")) if first[key].is_dir() else [Path()]
        for rel in files:
            a, b = first[key] / rel, second[key] / rel
            if a.is_file():
                assert a.read_bytes() == b.read_bytes(), a


def test_export_best_keeps_the_head_of_that_step(tmp_path, tiny_bert, sentiment):
    """export.best by the highest eval loss is step 1's adapter, the classifier head included: `peftkit eval` of the
    exported adapter gives step 1's loss (with the final head it would not)."""
    from peftkit.eval_job import eval_job
    from peftkit.evaluate import evaluate

    recipe = classification_recipe(tmp_path, tiny_bert, sentiment, eval={"base_model": False}, export={"best": True},
                                   training={"max_steps": 4, "eval_steps": 1, "lr": 5e-3,
                                             "early_stopping": {"metric": "loss", "mode": "max", "patience": 100}})
    summary = train(load_recipe(recipe))
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if "eval_loss" in e]
    assert summary["best"]["step"] == 1 and evals[0]["eval_loss"] != evals[-1]["eval_loss"]
    result = evaluate(eval_job(tmp_path / "run", [], None, None, None, None, None, None, None))
    assert result["loss"] == pytest.approx(evals[0]["eval_loss"], abs=1e-6)


def test_selection_metrics_of_a_classifier(tmp_path, tiny_bert, sentiment):
    recipe = classification_recipe(tmp_path, tiny_bert, sentiment, training={"eval_steps": 2},
                                   export={"best": "accuracy"})
    assert load_recipe(recipe).best_metric == "accuracy"  # computed without being listed in eval.metrics
    recipe = classification_recipe(tmp_path, tiny_bert, sentiment, training={"eval_steps": 2},
                                   export={"best": "perplexity"})
    with pytest.raises(PeftkitError, match=r"export.best: metric 'perplexity' is not computed during training "
                                           r"\(computed: loss, accuracy, macro_f1\); use one of those\.") as e:
        load_recipe(recipe)
    assert "eval.metrics" not in str(e.value)  # a classifier's evaluations ignore it: no advice to add it there


def test_an_encoder_given_as_a_causal_lm_is_named_as_the_wrong_model(tmp_path, monkeypatch, capsys, tiny_bert,
                                                                       tiny_llama):
    """An encoder where a causal LM belongs (a wrong merge --base, or --model) was blamed on its config.json ("Was
    config.json edited, or copied from another model? Put back the config.json saved with these weights")."""
    from peftkit.methods.lora import LoraConfig
    from tests.conftest import cli_user_error, save_random_adapter

    adapter = save_random_adapter(tiny_llama, LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "lora", seed=1)
    err = " ".join(cli_user_error(monkeypatch, capsys, "merge", "--adapter", str(adapter), "--base", str(tiny_bert),
                                  "--output", str(tmp_path / "merged")).split())
    assert f"error: {tiny_bert} holds a BertModel, and it was to load as a BertLMHeadModel: " in err, err
    assert "Is it the model you meant?" in err and "config.json edited" not in err


def test_a_target_inside_the_head_is_a_recipe_error_naming_the_head(tmp_path, tiny_llama, sentiment):
    """The head is trained in full (modules_to_save, added by peftkit, not written in the recipe): LoRA inside it
    gave adapters peft cannot load. The error names the head and why, not a modules_to_save the user never wrote."""
    recipe = classification_recipe(tmp_path, tiny_llama, sentiment,
                                   adapter={"r": 2, "alpha": 4, "target_modules": ["q_proj", "score"]})
    with pytest.raises(PeftkitError, match=r"adapter.target_modules entry 'score' names the classification head "
                                           r"'score' \(or modules inside it\), which a sequence classifier trains in "
                                           r"full \(as peft's SEQ_CLS\); remove 'score' from adapter.target_modules."):
        train(load_recipe(recipe))


def test_a_config_that_lists_a_causal_lm_class_is_no_classifier(tmp_path):
    """generate/chat refuse a classifier by its files: a config.json listing a causal LM class beside a classifier
    class still generates."""
    from peftkit.inference import ModelSource

    def source(*classes):
        path = tmp_path / "-".join(classes)
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"architectures": list(classes)}))
        return ModelSource(model=ModelConfig(name_or_path=str(path)))

    assert source("LlamaForSequenceClassification").classifier()
    assert not source("LlamaForCausalLM", "LlamaForSequenceClassification").classifier()
    assert not source("LlamaForCausalLM").classifier()


def test_integer_labels_in_eval_name_classes_of_digits(tmp_path, tiny_bert):
    """Star ratings "1".."3" as strings in train.jsonl and 1, 2 in an eval CSV (which reads them as integers): each
    is the class of its digits. An integer was a class id, so 1 was silently the class "2" and 3 an error."""
    write_jsonl(tmp_path / "t.jsonl", [{"text": t, "label": s} for t, s in [("bad", "1"), ("ok", "2"), ("good", "3")]])
    (tmp_path / "e.csv").write_text("text,label\nbad,1\nok,2\ngood,3\n")
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_bert)))
    cfg = DataConfig(train=str(tmp_path / "t.jsonl"), format="classification")
    labels = load_classification(tok, cfg.train, "train", cfg)[2]
    examples = load_classification(tok, str(tmp_path / "e.csv"), "train", cfg, labels)[0]
    assert [labels.names[e.labels[0]] for e in examples] == ["1", "2", "3"]
    with pytest.raises(PeftkitError) as err:  # 0 is no class's name, and no id where names are digits
        labels.id_of(0, "e.csv row 1")
    assert str(err.value) == ("e.csv row 1: label 0 is not one of the 3 classes the model was trained on (1, 2, 3). "
                              "Fix the row, or train with data that has this class.")
    assert LABELS.id_of(1, "x") == 1 and LabelSet(("0", "1", "2")).id_of(2, "x") == 2  # ids where names are not digits


def test_eval_of_a_classifier_with_placeholder_names_keeps_its_head(tmp_path, tiny_bert):
    """A saved 3-class classifier whose config names its classes LABEL_0..2 (transformers' default, as a peft-trained
    one has), scored on rows labelled 0 and 1: its own head, checked against its logits by hand. It was taken for a
    base without a head, and the data's 2 classes got a new random one."""
    from transformers import AutoModelForSequenceClassification

    from peftkit.eval_job import eval_job

    from peftkit.evaluate import evaluate

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3).eval()
    torch.nn.init.normal_(model.classifier.weight, std=2.0, generator=torch.Generator().manual_seed(1))
    shutil.copytree(tiny_bert, tmp_path / "cls")
    model.save_pretrained(tmp_path / "cls")
    rows = [("bad", 0), ("ok", 1), ("good", 1), ("fine", 0)]
    write_jsonl(tmp_path / "eval.jsonl", [{"text": t, "label": label} for t, label in rows])
    got = evaluate(eval_job(None, [], str(tmp_path / "cls"), str(tmp_path / "eval.jsonl"), "classification", None,
                            None, None, None))
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_bert)))
    with torch.no_grad():
        logits = torch.cat([model(**tok(t, return_tensors="pt")).logits for t, _ in rows])
    want = torch.nn.functional.cross_entropy(logits, torch.tensor([label for _, label in rows]))
    assert abs(got["loss"] - float(want)) < 1e-5


def test_eval_of_a_classifier_s_eval_sets_loads_it_once_where_it_has_its_classes(tmp_path, tiny_bert, sentiment,
                                                                                  monkeypatch, capsys):
    """`peftkit eval RECIPE` of a classifier's two data.eval sets loaded it once per set. A classifier with classes of
    its own (here a saved one's) now loads once; a base without a head still loads for each set, the head of the
    set's classes. Either way each set's figures are `peftkit eval RECIPE --data FILE`'s of its file."""
    from transformers import AutoModelForSequenceClassification

    from peftkit.cli import main
    from peftkit.eval_job import eval_job
    from peftkit.evaluate import evaluate
    from peftkit.inference import ModelSource

    shutil.copytree(tiny_bert, tmp_path / "cls")
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_bert, id2label=dict(enumerate(LABELS.names)))
    classifier.save_pretrained(tmp_path / "cls")
    write_jsonl(tmp_path / "other.jsonl", sentiment_rows(8, seed=5))
    sets = {"sentiment": sentiment["eval"], "other": tmp_path / "other.jsonl"}
    loads, load = [], ModelSource.load
    monkeypatch.setattr(ModelSource, "load", lambda self, *args, **kwargs: loads.append(self) or load(self, *args,
                                                                                                    **kwargs))
    for model, count in ((tmp_path / "cls", 1), (tiny_bert, 2)):
        recipe = classification_recipe(tmp_path / model.name, model, sentiment,
                                       data={"eval": {name: str(path) for name, path in sets.items()}})
        alone = {name: evaluate(eval_job(recipe, [], None, str(path), None, None, None, None, None))
                 for name, path in sets.items()}
        loads.clear()
        monkeypatch.setattr("sys.argv", ["peftkit", "eval", str(recipe), "--json", str(tmp_path / "eval.json")])
        main()
        capsys.readouterr()
        assert len(loads) == count, model
        assert json.loads((tmp_path / "eval.json").read_text()) == alone


def test_a_classifier_trains_over_a_4_bit_base_and_peft_gives_its_logits(tmp_path, tiny_llama, sentiment):
    """QLoRA for a classifier (refused before): the base NF4, the head kept in full precision and trained beside
    the adapter (bitsandbytes' 4-bit head failed its first forward: transformers keeps the last module out of
    quantization only without a skip list, and quantization.skip_modules is one); peft over the 4-bit base gives
    peftkit's logits, and the merged model (dequantized weights) its predictions."""
    from transformers import AutoModelForSequenceClassification

    quant = {"method": "nf4", "double_quant": True, "compute_dtype": "float32"}
    recipe = classification_recipe(tmp_path, tiny_llama, sentiment, quantization=quant, export={"merged": True},
                                   training={"max_steps": 4, "batch_size": 8, "optimizer": "paged_adamw_8bit"})
    train(load_recipe(recipe))
    adapter, tok = tmp_path / "run" / "adapter", load_tokenizer(ModelConfig(name_or_path=str(tiny_llama)))
    batch = batch_of(tok, TEXTS)
    ours = load_adapted_model(None, str(adapter))[0]
    assert type(ours.score).__name__ == "Linear" and ours.score.weight.dtype == torch.float32
    with torch.no_grad():
        logits = ours(**batch).logits
        assert (logits - peft_over_4_bit(tiny_llama, adapter, 2, tok.pad_token_id)(**batch).logits).abs().max() <= 1e-5
        merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "merged").eval()
        assert (merged(**batch).logits - logits).abs().max() <= 1e-4


@pytest.mark.parametrize(("adapter", "expected"), [
    ({"method": "adalora", "init_r": 4, "target_r": 2},
     "adapter.target_modules: AdaLoRA has no default for model type 'bert' (it has for llama, qwen2, qwen3, gemma, "
     "gemma2, gemma3_text, gpt2, bloom, opt, gpt_neox); name the modules: this model's linear layers are named query, "
     "key, value, dense."),
    ({"method": "ia3", "target_modules": ["query", "value", "dense"]},
     "adapter.feedforward_modules: IA3 has no default for model type 'bert' (it has for llama, mistral, mixtral, "
     "qwen2, qwen3, gemma, gemma2, gemma3_text, bloom, phi, gpt2, opt, falcon, gpt_neox); name the modules "
     "(target_modules, and in "
     "feedforward_modules those of them that are feed-forward layers): this model's linear layers are named query, "
     "key, value, dense."),
    ({"method": "ln_tuning"},
     "adapter.target_modules: LN tuning has no default for model type 'bert' (it has for llama, mistral, gemma, "
     "gemma2, gemma3_text, qwen2, qwen3, bloom"),
])
def test_a_method_without_a_default_for_the_model_names_its_own_layers(adapter, expected, tiny_bert, sentiment,
                                                                       tmp_path, monkeypatch, capsys):
    """AdaLoRA, IA3 and LN tuning leave target_modules to the architecture; on one they have no default for (BERT) the
    error suggested a Llama's names (target_modules: [q_proj, v_proj]), which BERT lacks: validate and train name
    the model's own linear (or normalisation) layers, the classifier head left out."""
    recipe = classification_recipe(tmp_path, tiny_bert, sentiment, adapter)
    said = [unplaced(" ".join(cli_user_error(monkeypatch, capsys, command, str(recipe)).split()), recipe)
            for command in ("validate", "train")]
    assert said[0] == said[1], said
    assert said[0].startswith(f"error: {expected}"), said[0]
    if adapter["method"] == "ln_tuning":
        assert said[0].endswith("); name the normalisation layers: this model's normalisation layers are named "
                                "LayerNorm."), said[0]


def test_a_text_pair_joined_with_nothing_between_is_warned_of(tmp_path, tiny_bert, tiny_llama):
    """A decoder's tokenizer (SmolLM2's, the tiny Llama's) joins text and text_pair token to token, no
    separator and no token_type_ids: the run said nothing, and the model read 'the matA cat'. BERT's [SEP] marks it."""
    from peftkit.data.checks import describe_stats

    write_jsonl(tmp_path / "t.jsonl", [{"text": "bad", "label": 0}, {"text": "ab", "text_pair": "cd", "label": 1},
                                       {"text": "good", "text_pair": "fine", "label": 1}])
    cfg = DataConfig(train=str(tmp_path / "t.jsonl"), format="classification")
    llama = load_tokenizer(ModelConfig(name_or_path=str(tiny_llama)))
    examples, stats, _ = load_classification(llama, cfg.train, "train", cfg)
    assert examples[1].input_ids == llama("abcd", add_special_tokens=False)["input_ids"]  # one text: abcd
    warning = describe_stats(stats, cfg)[1]
    assert warning.startswith("warning: the tokenizer joins text and text_pair with nothing between them (no "
                              "separator token, no token_type_ids), so the model reads each of the 2 rows with a "
                              f"text_pair as one text and cannot tell where the first ends (first: {cfg.train}:2)")
    bert = load_tokenizer(ModelConfig(name_or_path=str(tiny_bert)))
    assert len(describe_stats(load_classification(bert, cfg.train, "train", cfg)[1], cfg)) == 1


def test_the_card_s_snippet_pads_as_the_run_did_where_the_base_s_config_says_otherwise(tmp_path, tiny_llama, sentiment):
    """config.json's pad_token_id 3, the tokenizer's 0: peftkit pads with 0, and the card's snippet loaded the base
    with 3, so its head read padding on a batch's shorter rows (logits off by the head's reading of a pad token)."""
    base = shutil.copytree(tiny_llama, tmp_path / "tiny-llama")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(config | {"pad_token_id": 3}))
    recipe = load_recipe(classification_recipe(tmp_path, base, sentiment, ADAPTERS["lora"]))
    torch.manual_seed(0)
    model = load_model(recipe.model, labels=LABELS).eval()
    adapter = with_head(recipe.adapter, model)
    targets = inject_adapters(model, adapter)
    random_adapters(model)
    tok = load_tokenizer(recipe.model)
    export(model, tok, recipe.model_copy(update={"adapter": adapter}), targets, tmp_path / "out", labels=LABELS)
    out = tmp_path / "out" / "adapter"
    snippet = (out / "README.md").read_text().split("```python\n")[1].split("```")[0]
    assert "label2id={name: i for i, name in enumerate(labels)}, pad_token_id=0)" in snippet
    scope: dict = {}
    exec(snippet.replace(f"PATH/TO/{base.name}", str(base)).replace("ADAPTER_DIR", str(out)), scope)
    batch = batch_of(tok, TEXTS)
    with torch.no_grad():
        assert (scope["model"].eval()(**batch).logits - model(**batch).logits).abs().max() <= 1e-5
