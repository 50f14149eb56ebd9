"""`eval.samples`: the summary shows the base model's and the fine-tuned model's greedy answers to the first
eval rows, each the answer `peftkit generate` gives for that model, and the manifest and report keep them."""

from __future__ import annotations

import io
import json

import torch
import yaml
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftkit.data.prompts import load_prompts
from peftkit.adapter_base import load_adapted_model
from peftkit.decoding import Sampling, generate_texts
from peftkit.recipe import DataConfig, load_recipe
from peftkit.report import write_report
from peftkit.train import train
from tests.conftest import make_recipe


def test_samples_before_and_after(tiny_llama, number_data, tmp_path):
    recipe_path = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 3, "lr": 5e-2},
                              eval={"samples": 2, "max_new_tokens": 6})
    out = io.StringIO()
    summary = train(load_recipe(recipe_path), console=Console(file=out, width=200))
    data = str(number_data["eval"])
    prompts = load_prompts(AutoTokenizer.from_pretrained(tiny_llama), data, "train", DataConfig(train=data), limit=2)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tuned, _, tok, *_ = load_adapted_model(None, str(tmp_path / "run" / "adapter"))
    expected_base = generate_texts(base, tok, prompts, Sampling(max_new_tokens=6))
    expected_tuned = generate_texts(tuned, tok, prompts, Sampling(max_new_tokens=6))
    assert [s["base"] for s in summary["samples"]] == expected_base
    assert [s["fine_tuned"] for s in summary["samples"]] == expected_tuned
    assert [s["reference"] for s in summary["samples"]] == [p.reference for p in prompts]
    assert expected_base != expected_tuned  # training changed the answers
    shown = out.getvalue()
    assert "generations (greedy)" in shown and all(t in shown for t in expected_tuned if t.strip())
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["metrics"]["samples"] == summary["samples"]
    page = write_report(tmp_path / "run").read_text()
    assert "Generations (greedy)" in page and "<th>fine-tuned</th>" in page


def test_no_samples_for_the_text_format(tiny_llama, tmp_path):
    from peftkit.tiny import write_jsonl

    write_jsonl(tmp_path / "t.jsonl", [{"text": "one two three"}] * 8)
    files = {"train": tmp_path / "t.jsonl", "eval": tmp_path / "t.jsonl"}
    recipe_path = make_recipe(tmp_path, tiny_llama, files, training={"max_steps": 1}, data={"format": "text"},
                              eval={"samples": 2})
    assert yaml.safe_load(recipe_path.read_text())["eval"]["samples"] == 2
    assert "samples" not in train(load_recipe(recipe_path), console=Console(quiet=True))


def test_the_samples_table_prints_text_as_written():
    """Mistral's prompts hold `[INST] ... [/INST]`: read as rich markup, `[/INST]` ended every chat run that showed
    samples with a MarkupError traceback."""
    import io

    from rich.console import Console

    from peftkit.samples import samples_table

    out = io.StringIO()
    Console(file=out, width=200).print(samples_table([{"prompt": "[INST] hi [/INST]", "reference": "[b]x[/b]",
                                                       "fine_tuned": "[/INST] y"}]))
    assert "[INST] hi [/INST]" in out.getvalue() and "[b]x[/b]" in out.getvalue() and "[/INST] y" in out.getvalue()


def test_in_a_log_the_samples_are_lines_never_wrapped():
    """In a log (no terminal), a table at 80 columns cut prompts and wrapped cells; the README says a log's long lines
    are never wrapped. Each field is one line, markup shown as written."""
    import io

    from rich.console import Console

    from peftkit.samples import print_samples

    out = io.StringIO()
    reference = "nine hundred seventy-eight, " * 6
    print_samples(Console(file=out, width=80), [{"prompt": "Write 978 in words.\n", "reference": reference,
                                                 "base": "[/INST] Ygg", "fine_tuned": "nine\nhundred"}])
    assert out.getvalue().splitlines() == [
        "generations (greedy)", "  1  prompt      Write 978 in words.", f"  1  reference   {reference.strip()}",
        "  1  base model  [/INST] Ygg", "  1  fine-tuned  nine hundred"]
