"""A `datasets` ClassLabel label column (a saved DatasetDict's, a parquet file's that datasets wrote, a hub
dataset's) read as its names in its order (`peftkit.data.class_labels`): it was read as the ids it stores, and the
classes were named 0, 1, ..."""

import json
from pathlib import Path

import datasets
import pytest
from datasets import ClassLabel, Features, Value
from safetensors.torch import load_file

from peftkit.data.class_labels import ClassId
from peftkit.data.classification import LabelSet, load_classification
from peftkit.errors import PeftkitError
from peftkit.modeling import load_tokenizer
from peftkit.recipe import DataConfig, ModelConfig, load_recipe
from peftkit.tiny import build_tiny_encoder, sentiment_rows, write_jsonl
from peftkit.train import train
from tests.conftest import make_recipe


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-bert"
    build_tiny_encoder(path, hidden_size=32, num_layers=2, seed=0)
    return path


def class_label_dataset(rows: list[dict], names: list[str]) -> datasets.Dataset:
    """`rows` ({text, label: a class name, or None for no label}) as a Dataset whose label is a ClassLabel of
    `names` (a row without one stores -1, as GLUE's test splits do)."""
    features = Features({"text": Value("string"), "label": ClassLabel(names=names)})
    ids = [-1 if r["label"] is None else names.index(r["label"]) for r in rows]
    return datasets.Dataset.from_dict({"text": [r["text"] for r in rows], "label": ids}, features=features)


def classifier_recipe(tmp_path: Path, base: Path, train_data: Path, eval_data: Path) -> Path:
    path = make_recipe(tmp_path, base, {"train": train_data, "eval": eval_data},
                       data={"format": "classification", "max_length": 64})
    path.write_text(path.read_text().replace("dtype: float32", "dtype: float32\n  task: sequence_classification"))
    return path


def test_a_saved_class_label_dataset_trains_as_the_jsonl_of_its_names(tmp_path, tiny_bert):
    """The saved DatasetDict trains the bytes and classes that a .jsonl of the same rows with the names as strings
    does (names in sorted order, as string labels are numbered). Its eval set, a parquet file whose ClassLabel lists
    the names the other way round, is scored by name: the .jsonl run's figures. On the old code its classes were
    `0`, `1` and the eval rows were read by id (every label flipped)."""
    train_rows, eval_rows = sentiment_rows(24, seed=3), sentiment_rows(16, seed=4)
    write_jsonl(tmp_path / "train.jsonl", train_rows)
    write_jsonl(tmp_path / "eval.jsonl", eval_rows)
    datasets.DatasetDict({"train": class_label_dataset(train_rows, ["negative", "positive"])}).save_to_disk(
        str(tmp_path / "saved"))
    class_label_dataset(eval_rows, ["positive", "negative"]).to_parquet(str(tmp_path / "eval.parquet"))
    summaries, runs = [], []
    for name, train_data, eval_data in (("jsonl", "train.jsonl", "eval.jsonl"), ("saved", "saved", "eval.parquet")):
        recipe = classifier_recipe(tmp_path / name, tiny_bert, tmp_path / train_data, tmp_path / eval_data)
        summaries.append(train(load_recipe(recipe)))
        runs.append(tmp_path / name / "run" / "adapter")
    weights = [(run / "adapter_model.safetensors").read_bytes() for run in runs]
    assert weights[0] == weights[1]
    labels = [json.loads((run / "peftkit.json").read_text())["labels"] for run in runs]
    assert labels == [["negative", "positive"]] * 2
    for key in ("base_eval_loss", "base_eval_accuracy", "eval_loss", "eval_accuracy", "eval_macro_f1"):
        assert summaries[0][key] == summaries[1][key], key


def test_class_label_names_order_no_label_and_mismatched_eval_names(tmp_path, tiny_bert):
    """Names not in sorted order give the ids the ClassLabel gives, a name no row uses is a class too (a head output
    that trains on no row), and model.num_labels must count them all; datasets' no-label -1 is a bad row named by
    its place, skipped under on_bad_rows: skip; an eval set whose ClassLabel names a class the model lacks is
    refused, naming it; a mix of two ClassLabels that name the classes otherwise too; a model whose classes are only
    numbered reads the ids; a mix of the same names in another order reads each row by its name. Each read as ids on
    the old code."""
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_bert)))
    rows = sentiment_rows(8, seed=3)
    names = ["positive", "negative", "neutral"]  # (neutral: no row)
    unlabelled = [{"text": "good fine", "label": None}, {"text": "bad", "label": None}]
    datasets.DatasetDict({"train": class_label_dataset(rows, names),
                          "test": class_label_dataset(rows[:1] + unlabelled, names)}).save_to_disk(str(tmp_path / "dd"))
    cfg = DataConfig(train=str(tmp_path / "dd"), format="classification")
    examples, _, labels = load_classification(tok, cfg.train, "train", cfg)
    assert labels.names == ("positive", "negative", "neutral")
    assert [e.labels[0] for e in examples] == [names.index(r["label"]) for r in rows]
    with pytest.raises(PeftkitError) as err:
        load_classification(tok, cfg.train, "train", cfg, num_labels=2)
    assert str(err.value) == (
        f"model.num_labels is 2, but {tmp_path / 'dd'}'s label column is a ClassLabel of 3 classes (positive, "
        "negative, neutral). Remove model.num_labels (it is read from the data), or fix the labels.")

    with pytest.raises(PeftkitError) as err:
        load_classification(tok, cfg.train, "test", cfg, labels)
    assert str(err.value) == (
        f"{tmp_path / 'dd'}[test][1]: field 'label' is -1, datasets' 'no label' in a ClassLabel column (a split "
        "without labels, as GLUE's test splits): no class to train or score on; read a split that has its labels "
        "for data.format 'classification' (each row needs text, label). Fix the row, set the right data.format, or "
        "set data.on_bad_rows: skip.")
    skip = cfg.model_copy(update={"on_bad_rows": "skip"})
    examples, stats, _ = load_classification(tok, cfg.train, "test", skip, labels)
    assert [e.labels[0] for e in examples] == [names.index(rows[0]["label"])] and stats["bad_rows"] == 2

    short = [{"text": r["text"], "label": r["label"][:3]} for r in rows[:2]]
    class_label_dataset(short, ["neg", "pos", "neutral"]).save_to_disk(str(tmp_path / "other"))
    with pytest.raises(PeftkitError) as err:
        load_classification(tok, str(tmp_path / "other"), "train", cfg, labels)
    first = "neg" if rows[0]["label"] == "negative" else "pos"
    assert str(err.value) == (
        f"{tmp_path / 'other'}[0]: label {first!r} (id {['neg', 'pos'].index(first)} of its ClassLabel: neg, pos, "
        "neutral) is not one of the 3 classes the model was trained on (positive, negative, neutral); a ClassLabel's "
        "ids are read as its names. Name the classes as the model does (datasets' "
        "Dataset.align_labels_with_mapping, or cast_column), or train with data that has this class.")
    # a model whose classes are only numbered (trained on the ids, as before ClassLabels were read) reads the ids
    for numbered in (("0", "1", "2"), ("LABEL_0", "LABEL_1", "LABEL_2")):
        assert LabelSet(numbered).id_of(ClassId(1, ("neg", "pos", "neutral")), "x") == 1
    mix = DataConfig(train=[str(tmp_path / "dd"), str(tmp_path / "other")], format="classification")
    with pytest.raises(PeftkitError) as err:
        load_classification(tok, mix.train, None, mix)
    assert str(err.value) == (
        "data.train (dd, other): its ClassLabel columns name the classes differently "
        f"({tmp_path / 'dd'}[train][0]: positive, negative, neutral; {tmp_path / 'other'}[0]: neg, pos, neutral), so a "
        "class id means one class in one dataset and another in the other. Give them one ClassLabel (datasets' "
        "Dataset.align_labels_with_mapping, or cast_column), or labels as class names.")
    # the same names in another order are one ClassLabel (refused as the above on the previous code): the first's
    # order, each row read by its name
    class_label_dataset(rows[:2], ["neutral", "negative", "positive"]).save_to_disk(str(tmp_path / "reordered"))
    mix = DataConfig(train=[str(tmp_path / "dd"), str(tmp_path / "reordered")], format="classification")
    examples, _, labels = load_classification(tok, mix.train, None, mix)
    assert labels.names == ("positive", "negative", "neutral")
    assert [e.labels[0] for e in examples] == [names.index(r["label"]) for r in rows + rows[:2]]


def test_a_class_label_with_a_name_no_row_uses_trains_a_head_output_for_it(tmp_path, tiny_bert):
    """The ClassLabel's declared classes, in its order: `neutral`, which no training row has, is a class (the
    head's third output) and trains; its eval rows (names as strings) are scored by name."""
    rows, names = sentiment_rows(16, seed=3), ["positive", "negative", "neutral"]
    class_label_dataset(rows, names).save_to_disk(str(tmp_path / "saved"))
    write_jsonl(tmp_path / "eval.jsonl", sentiment_rows(8, seed=4) + [{"text": "so so", "label": "neutral"}])
    summary = train(load_recipe(classifier_recipe(tmp_path, tiny_bert, tmp_path / "saved", tmp_path / "eval.jsonl")))
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "peftkit.json").read_text())["labels"] == names
    head = load_file(adapter / "adapter_model.safetensors")["base_model.model.classifier.weight"]
    assert head.shape[0] == 3 and summary["eval_accuracy"] is not None


def test_a_hub_dataset_s_class_label_is_read_and_its_names_are_in_the_rows_digest(tmp_path, tiny_bert, monkeypatch):
    """A hub dataset (here an offline datasets cache, as one read from the hub leaves it): its ClassLabel's names are
    the classes, and the digest a run records of its rows holds them (renamed classes are other data)."""
    from peftkit.checkpoint import changed_input
    from peftkit.data.rows import HUB_ROWS, rows_digest

    cache = tmp_path / "datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    rows, names = sentiment_rows(8, seed=3), ["negative", "positive"]
    class_label_dataset(rows, names).to_parquet(str(tmp_path / "sst.parquet"))
    built = datasets.load_dataset("parquet", data_files=str(tmp_path / "sst.parquet"), split="train",
                                  cache_dir=str(tmp_path / "built"))
    prepared = Path(built.cache_files[0]["filename"]).parent
    commit = cache / "acme___sst" / "default" / "0.0.0" / ("a" * 40)
    commit.mkdir(parents=True)
    (commit / "sst-train.arrow").write_bytes((prepared / "parquet-train.arrow").read_bytes())
    info = json.loads((prepared / "dataset_info.json").read_text())
    (commit / "dataset_info.json").write_text(json.dumps(info | {"dataset_name": "sst"}))

    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_bert)))
    cfg = DataConfig(train="acme/sst", format="classification")
    examples, _, labels = load_classification(tok, cfg.train, "train", cfg)
    assert labels.names == ("negative", "positive")
    assert [e.labels[0] for e in examples] == [names.index(r["label"]) for r in rows]
    digests = HUB_ROWS[("acme/sst", "train", None)]
    assert digests["classes"] == rows_digest([{"label": names}])
    # --resume: a checkpoint recorded without the names (before they were read) resumes, its ids being the same
    # classes; names other than the recorded ones are other data
    assert changed_input({"data.train": {"rows": digests["rows"]}}, {"data.train": digests}) is None
    assert changed_input({"data.train": digests | {"classes": "0" * 64}}, {"data.train": digests}) == (
        "data.train: the ClassLabel names read from the hub changed")


def test_a_class_label_column_outside_a_classifier_s_label_is_read_as_its_ids(tmp_path, tiny_llama):
    """Only a classifier's label reads a ClassLabel as its names: an alpaca dataset's extra ClassLabel column
    (`source`) leaves its examples those of the same rows without it, and a ClassLabel mapped to a text field
    (output: label) is a bad row that says what it holds: it said 'got ClassId', peftkit's own type."""
    from peftkit.data.loading import load_examples

    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_llama)))
    rows = [{"instruction": r["text"], "output": r["label"], "source": i % 2}
            for i, r in enumerate(sentiment_rows(6, seed=3))]
    features = Features({"instruction": Value("string"), "output": Value("string"),
                         "source": ClassLabel(names=["web", "book"])})
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "alpaca"))
    write_jsonl(tmp_path / "alpaca.jsonl", [{k: r[k] for k in ("instruction", "output")} for r in rows])
    read = [load_examples(tok, str(tmp_path / name), "train", DataConfig(train=str(tmp_path / name)), cache=False)[0]
            for name in ("alpaca", "alpaca.jsonl")]
    assert [e.input_ids for e in read[0]] == [e.input_ids for e in read[1]] and len(read[0]) == 6

    class_label_dataset(sentiment_rows(4, seed=3), ["negative", "positive"]).save_to_disk(str(tmp_path / "sst"))
    cfg = DataConfig(train=str(tmp_path / "sst"), columns={"instruction": "text", "output": "label"})
    with pytest.raises(PeftkitError) as err:
        load_examples(tok, cfg.train, "train", cfg, cache=False)
    label = sentiment_rows(4, seed=3)[0]["label"]
    assert (f"[0]: column 'label' (data.columns.output) must be a string, got int (id "
            f"{['negative', 'positive'].index(label)} named {label!r} of a ClassLabel; only data.format "
            "classification's label reads a ClassLabel as its names)") in str(err.value)


def test_a_class_label_nested_in_a_list_or_a_struct_is_refused_saying_why(tmp_path, tiny_bert):
    """A multi-label Sequence(ClassLabel) and a struct's ClassLabel field are never read as classes (peftkit reads
    top-level ClassLabel columns): they were refused as 'got list' / 'got dict' alone, which said not what to do."""
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_bert)))
    names = ClassLabel(names=["negative", "positive"])
    multi = Features({"text": Value("string"), "label": datasets.Sequence(names)})
    multi_label = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [[0, 1], [1]]}, features=multi)
    multi_label.save_to_disk(tmp_path / "m")
    nested = Features({"text": Value("string"), "meta": {"label": names}})
    struct = datasets.Dataset.from_dict({"text": ["a", "b"], "meta": [{"label": 0}, {"label": 1}]}, features=nested)
    struct.save_to_disk(tmp_path / "s")
    for path, columns, said in (
            ("m", {}, "field 'label' must be a string or an integer, got list (one class a row: a list of labels, "
                      "multi-label classification as datasets' Sequence(ClassLabel), is not supported)"),
            ("s", {"label": "meta"}, "must be a string or an integer, got dict (a struct: data.columns names a "
                                     "top-level column; datasets' Dataset.flatten() makes each of its fields one, "
                                     "named as 'meta.label')")):
        cfg = DataConfig(train=str(tmp_path / path), format="classification", columns=columns)
        with pytest.raises(PeftkitError, match=r"\[0\]: .*" + said.replace("(", r"\(").replace(")", r"\)")):
            load_classification(tok, cfg.train, "train", cfg)
    flat = tmp_path / "flat"
    struct.flatten().save_to_disk(flat)  # what the message says: its field a top-level ClassLabel, read as names
    cfg = DataConfig(train=str(flat), format="classification", columns={"label": "meta.label"})
    assert load_classification(tok, cfg.train, "train", cfg)[2].names == ("negative", "positive")
