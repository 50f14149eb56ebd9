"""adapter/README.md, the model card a run writes beside its adapter (peftkit.model_card): the Hub's front matter,
the run's evaluations, how to load it, and nothing a re-run would write otherwise."""

import json

import yaml

from huggingface_hub import ModelCard
from peft import PeftModel
from transformers import AutoModelForCausalLM

from peftkit.model_card import model_card
from peftkit.recipe import RopeScalingConfig, load_recipe
from peftkit.train import train
from tests.conftest import make_recipe


def test_a_run_writes_a_model_card_the_hub_reads_with_its_evaluations(tiny_llama, number_data, tmp_path):
    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 4, "min_lr_ratio": 0.1})
    train(load_recipe(recipe))
    run = tmp_path / "run"
    card_file = run / "adapter" / "README.md"
    manifest = json.loads((run / "manifest.json").read_text())
    assert "adapter/README.md" in manifest["outputs_sha256"]  # so verify checks it (a re-run writes the same bytes)

    card = ModelCard.load(card_file)
    meta = card.data.to_dict()
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert "lora" in meta["tags"] and "base_model" not in meta  # a local base is no hub id: the Hub would refuse it
    text = card_file.read_text()
    metrics = manifest["metrics"]
    assert f"| eval loss | {metrics['base_eval_loss']:.4f} | {metrics['eval_loss']:.4f} |" in text
    assert "min_lr_ratio: 0.1" in text and "r: 4" in text and "alpha: 8.0" in text
    assert str(tmp_path) not in text  # no machine's path: the base and the data by their names only
    assert f"`{tiny_llama.name}`" in text and f"`{number_data['train'].name}`" in text
    # peft loads the directory as before: the card is one more file beside the adapter's own
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), run / "adapter")


def _recipe(tmp_path, tiny_llama, number_data, adapter=None, **sections):
    path = make_recipe(tmp_path, tiny_llama, number_data, **sections)
    if adapter is not None:  # the whole section: another method's keys are not LoRA's
        recipe = yaml.safe_load(path.read_text()) | {"adapter": adapter}
        path.write_text(yaml.safe_dump(recipe))
    return load_recipe(path)


def test_a_hub_base_is_the_cards_base_model(tiny_llama, number_data, tmp_path):
    cfg = _recipe(tmp_path, tiny_llama, number_data)
    hub = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name_or_path": "HuggingFaceTB/SmolLM2-135M"})})
    text = model_card(hub, "LORA", {})
    meta = ModelCard(text).data.to_dict()
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert "base_model:adapter:HuggingFaceTB/SmolLM2-135M" in meta["tags"]
    assert 'from_pretrained("HuggingFaceTB/SmolLM2-135M")' in text
    pinned = hub.model_copy(update={"model": hub.model.model_copy(update={"revision": "a" * 40})})
    assert f'from_pretrained("HuggingFaceTB/SmolLM2-135M", revision="{"a" * 40}")' in model_card(pinned, "LORA", {})
    assert "## Evaluation" not in text  # a run without data.eval has no table


def test_a_mix_of_datasets_is_named_dataset_by_dataset(tiny_llama, number_data, tmp_path):
    mix = [str(number_data["train"]), {"path": "org/more-numbers", "split": "train[:100]"}]
    text = model_card(_recipe(tmp_path, tiny_llama, number_data, data={"train": mix}), "LORA", {})
    assert "on `train.jsonl` + `org/more-numbers` (`alpaca` format" in text
    mixed = [str(number_data["train"]), {"path": "org/chats", "format": "chat"}]  # (it said `alpaca` format alone)
    text = model_card(_recipe(tmp_path, tiny_llama, number_data, data={"train": mixed}), "LORA", {})
    assert "on `train.jsonl` (`alpaca` format) + `org/chats` (`chat` format) (up to 128 tokens an example)" in text


def test_the_card_says_how_a_base_was_quantized_and_a_peftkit_only_method_loads(tiny_llama, number_data, tmp_path):
    qlora = _recipe(tmp_path, tiny_llama, number_data, quantization={"method": "nf4"})
    assert "quantized by bitsandbytes (nf4, double quantization)" in model_card(qlora, "LORA", {})
    bottleneck = _recipe(tmp_path / "b", tiny_llama, number_data, adapter={"method": "bottleneck"})
    text = model_card(bottleneck, "BOTTLENECK", {})
    assert "no peft equivalent" in text and "PeftModel" not in text


def test_a_classifiers_card_has_its_labels_and_accuracy(tiny_llama, number_data, tmp_path):
    cfg = _recipe(tmp_path, tiny_llama, number_data)
    classifier = cfg.model_copy(update={"model": cfg.model.model_copy(update={"task": "sequence_classification",
                                                                                "num_labels": 3})})
    metrics = {"base_eval_loss": 1.1, "eval_loss": 0.4, "base_eval_accuracy": 0.3, "eval_accuracy": 0.9}
    text = model_card(classifier, "LORA", metrics)
    assert ModelCard(text).data.to_dict()["pipeline_tag"] == "text-classification"
    assert "num_labels=3" in text and "| accuracy | 0.3000 | 0.9000 |" in text
    assert "perplexity" not in text  # a class has none


def test_a_classifier_whose_classes_came_from_its_data_is_loaded_with_them(tiny_llama, number_data, tmp_path):
    """model.num_labels unset: the classes are read from data.train (3 string labels here), and the snippet must make
    a 3-class head (else transformers makes a 2-class one and peft cannot load the adapter's 3-row one into it) named
    by them (test_seqcls runs the snippet); numbered classes (trained on ids) by their count."""
    cfg = _recipe(tmp_path, tiny_llama, number_data)
    classifier = cfg.model_copy(update={"model": cfg.model.model_copy(update={"task": "sequence_classification"})})
    text = model_card(classifier, "LORA", {}, labels=["bad", "so-so", "gut \u00fcbel"])
    assert 'labels = ["bad", "so-so", "gut \u00fcbel"]  # its classes, in the order of its head\'s outputs' in text
    assert ("from_pretrained(\"PATH/TO/tiny-llama\", num_labels=len(labels), id2label=dict(enumerate(labels)),\n"
            "    label2id={name: i for i, name in enumerate(labels)})") in text
    for numbered in (["0", "1", "2"], ["LABEL_0", "LABEL_1", "LABEL_2"]):
        text = model_card(classifier, "LORA", {}, labels=numbered)
        assert "from_pretrained(\"PATH/TO/tiny-llama\", num_labels=3)" in text and "id2label" not in text


def test_the_adapters_a_run_started_from_are_named_not_given_by_their_paths(tiny_llama, number_data, tmp_path):
    """adapter.init_from (and AdapterFusion's fuse, multitask prompt tuning's source_adapter) hold directories of this
    machine: the card, made to be pushed, names them as it names the base, by their names."""
    cfg = _recipe(tmp_path, tiny_llama, number_data)
    snapshot = tmp_path / "cache" / "models--acme--tiny-lora" / "snapshots" / ("e" * 40)  # a hub adapter, as resolved
    # A run's adapter/ by its run too (it was `init_from: adapter`), a hub adapter by its pin (its commit alone): as
    # the results table's column names them, and never by a part of this machine's path beyond them (verify's re-run
    # of a moved project reads them elsewhere).
    for path, name in ((tmp_path / "sft", "sft"), (tmp_path / "runs" / "sft" / "adapter", "sft/adapter"),
                       (snapshot, f"acme/tiny-lora@{'e' * 40}")):
        started = cfg.model_copy(update={"adapter": cfg.adapter.model_copy(update={"init_from": str(path)})})
        text = model_card(started, "LORA", {"start_eval_loss": 2.0, "eval_loss": 1.0})
        assert str(tmp_path) not in text and f"\n  init_from: {name}\n" in text, text
        assert f"| | start (init_from: {name}) | fine-tuned |" in text, text


def test_without_the_base_model_s_evaluation_the_table_has_no_empty_column(tiny_llama, number_data, tmp_path):
    """eval.base_model: false evaluates the fine-tuned model only: an empty base column read as results missing."""
    text = model_card(_recipe(tmp_path, tiny_llama, number_data), "LORA", {"eval_loss": 0.5, "eval_perplexity": 1.6487})
    assert "| | fine-tuned |\n| --- | --- |\n| eval loss | 0.5000 |\n| eval perplexity | 1.6487 |" in text


def test_a_card_of_a_run_with_a_chat_template_says_to_use_it(tiny_llama, number_data, tmp_path):
    cfg = _recipe(tmp_path, tiny_llama, number_data, data={"format": "chat", "chat_template": "chatml"})
    assert "trained with the chat template in `chat_template.jinja` beside it" in model_card(cfg, "LORA", {})
    assert "chat_template.jinja" not in model_card(_recipe(tmp_path / "p", tiny_llama, number_data), "LORA", {})


def test_a_card_of_a_run_with_rope_scaling_says_so(tiny_llama, number_data, tmp_path):
    cfg = _recipe(tmp_path, tiny_llama, number_data)
    rope = RopeScalingConfig(type="linear", factor=2)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"rope_scaling": rope})})
    assert "the base's RoPE scaled (`model.rope_scaling`: linear, factor 2)" in model_card(cfg, "LORA", {})
