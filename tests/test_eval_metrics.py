"""`eval.metrics` during training: task metrics of greedy answers to data.eval's prompts in every eval line of
metrics.jsonl, in the summary and manifest (base vs fine-tuned) and in the report, each equal to what
`peftkit eval` computes on the run's adapter (and on the base), without touching the training RNG."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from peftkit.errors import PeftkitError
from peftkit.eval_job import eval_job
from peftkit.evaluate import evaluate
from peftkit.metrics import GENERATION_METRICS
from peftkit.recipe import load_recipe
from peftkit.report import write_report
from peftkit.train import train
from tests.conftest import make_recipe

METRICS = list(GENERATION_METRICS)  # exact_match, token_f1, rouge_l
EVAL = {"metrics": METRICS, "max_new_tokens": 5}


@pytest.fixture(scope="module")
def yes_data(tmp_path_factory) -> dict:
    """Every answer is `Yes.`: a few steps teach it, so the metrics move from the base's 0."""
    from peftkit.tiny import write_jsonl

    root = tmp_path_factory.mktemp("yes")
    for split, n, offset in (("train", 32, 0), ("eval", 8, 100)):
        write_jsonl(root / f"{split}.jsonl", [{"instruction": f"Is {offset + k} a number?", "input": "",
                                              "output": "Yes."} for k in range(n)])
    return {"train": root / "train.jsonl", "eval": root / "eval.jsonl"}


def _eval_lines(run) -> list[str]:
    return [line for line in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in json.loads(line)]


def _adapter_sha(run) -> str:
    return hashlib.sha256((run / "adapter" / "adapter_model.safetensors").read_bytes()).hexdigest()


def test_metrics_equal_peftkit_eval_on_the_base_and_the_adapter(tiny_llama, yes_data, tmp_path):
    recipe_path = make_recipe(tmp_path, tiny_llama, yes_data, training={"max_steps": 6, "eval_steps": 3, "lr": 5e-2},
                              eval=EVAL | {"normalize": "strip", "batch_size": 3})  # 8 rows: batches of 3, 3, 2
    out = io.StringIO()
    summary = train(load_recipe(recipe_path), console=Console(file=out, width=200))
    run = tmp_path / "run"
    flags = dict(overrides=[], model=None, data=None, fmt=None, adapter=None, max_length=None, batch_size=None,
                 on_bad_rows=None, metrics=",".join(METRICS), max_new_tokens=5, normalize="strip")
    # = `peftkit eval RUN_DIR --metrics exact_match,token_f1,rouge_l --max-new-tokens 5 --normalize strip`
    tuned = evaluate(eval_job(run, **flags))
    base = evaluate(eval_job(recipe_path, **flags))  # the recipe alone: its base model
    for metric in METRICS:
        assert summary[f"eval_{metric}"] == tuned[metric]
        assert summary[f"base_eval_{metric}"] == base[metric]
    assert summary["eval_rouge_l"] > summary["base_eval_rouge_l"]  # training taught the answer
    # Plain `peftkit eval RUN_DIR`: the run's eval.metrics, max_new_tokens and normalize are the defaults.
    plain = flags | {"metrics": None, "max_new_tokens": None, "normalize": None}
    again = evaluate(eval_job(run, **plain))
    assert {m: again[m] for m in METRICS} == {m: tuned[m] for m in METRICS} and again["loss"] == summary["eval_loss"]

    lines = [json.loads(line) for line in _eval_lines(run)]
    assert [r["step"] for r in lines] == [3, 6]
    assert list(lines[-1]) == ["step", "eval_loss", "eval_perplexity"] + [f"eval_{m}" for m in METRICS]
    assert all(lines[-1][f"eval_{m}"] == summary[f"eval_{m}"] for m in METRICS)
    assert all(0.0 <= r[f"eval_{m}"] <= 1.0 for r in lines for m in METRICS)

    manifest = json.loads((run / "manifest.json").read_text())["metrics"]
    assert all(manifest[k] == summary[k] for m in METRICS for k in (f"eval_{m}", f"base_eval_{m}"))
    shown = out.getvalue()
    assert "token_f1, base model" in shown and "token_f1, fine-tuned" in shown
    assert f"{summary['eval_rouge_l']:.4f}" in shown

    page = write_report(run).read_text()
    for metric in METRICS:
        row = f"<tr><th>{metric.replace('_', ' ')}</th><td>{summary[f'base_eval_{metric}']:.4f}</td>"
        assert row + f"<td>{summary[f'eval_{metric}']:.4f}</td></tr>" in page
    assert 'alt="eval_metrics"' in page and (run / "report" / "eval_metrics.png").is_file()


def test_same_adapter_bits_and_eval_losses_with_and_without_metrics(tiny_llama, number_data, tmp_path):
    """Generating between steps must not consume the RNG that draws the dropout masks (generate_texts seeds it)."""
    runs = {}
    for name, extra in (("plain", {}), ("metrics", EVAL)):
        recipe = make_recipe(tmp_path / name, tiny_llama, number_data, training={"max_steps": 3, "eval_steps": 1},
                             adapter={"dropout": 0.3}, eval={"base_model": False} | extra)
        train(load_recipe(recipe), console=Console(quiet=True))
        runs[name] = tmp_path / name / "run"
    assert _adapter_sha(runs["plain"]) == _adapter_sha(runs["metrics"])
    losses = [[{k: v for k, v in json.loads(line).items() if k in ("step", "eval_loss")} for line in _eval_lines(r)]
              for r in runs.values()]
    assert losses[0] == losses[1] and len(losses[0]) == 3


def test_resumed_run_writes_the_same_eval_lines(tiny_llama, number_data, tmp_path):
    sections = dict(training={"max_steps": 4, "eval_steps": 1, "save_steps": 2, "save_total_limit": 3},
                    adapter={"dropout": 0.1}, eval={"base_model": False} | EVAL)
    recipe = make_recipe(tmp_path, tiny_llama, number_data, **sections)
    train(load_recipe(recipe), console=Console(quiet=True))
    run = tmp_path / "run"
    straight, sha = _eval_lines(run), _adapter_sha(run)
    # As if the run had been killed after its step-2 checkpoint: the later checkpoint and the outputs are gone.
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    shutil.rmtree(run / "adapter")
    (run / "manifest.json").unlink()
    train(load_recipe(recipe), resume=True, console=Console(quiet=True))
    assert _eval_lines(run) == straight and len(straight) == 4
    assert _adapter_sha(run) == sha


def _load_error(tmp_path, tiny_llama, files, **sections) -> str:
    with pytest.raises(PeftkitError) as e:
        load_recipe(make_recipe(tmp_path, tiny_llama, files, **sections))
    return str(e.value)


def test_recipe_errors(tiny_llama, number_data, tmp_path):
    message = _load_error(tmp_path, tiny_llama, number_data, eval={"metrics": ["exact_match", "bleu"]})
    assert "eval.metrics" in message and "'bleu'" in message and "exact_match, token_f1, rouge_l" in message
    message = _load_error(tmp_path, tiny_llama, number_data, eval={"normalize": "lower"})
    assert "normalize" in message and "squad" in message
    message = _load_error(tmp_path, tiny_llama, number_data, eval={"metrics": ["rouge_l"]}, data={"format": "text"})
    assert "eval.metrics" in message and "'text' has no prompt" in message
    # loss and perplexity are always computed: listing them is allowed, and they add no generation
    cfg = load_recipe(make_recipe(tmp_path, tiny_llama, number_data, eval={"metrics": ["loss", "token_f1"]}))
    assert cfg.eval.generation_metrics == ["token_f1"]
    assert load_recipe(make_recipe(tmp_path, tiny_llama, number_data, data={"format": "text"},
                                   eval={"metrics": ["perplexity"]})).eval.generation_metrics == []


def test_eval_of_a_run_loads_its_base_as_the_run_did(tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    """`peftkit eval RUN_DIR` loads the adapter's base with the recipe's model.dtype and attn_implementation, as
    training did, so a bfloat16 run (of a float32 checkpoint) evaluates to its own eval loss; --model names a base
    only, loaded in the checkpoint's dtype."""
    import torch

    from peftkit.inference import model_source

    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 3})
    summary = train(load_recipe(recipe, ["model.dtype=bfloat16", "model.attn_implementation=eager"]),
                    show_summary=False)
    run = tmp_path / "run"
    flags = dict(overrides=[], model=None, data=None, fmt=None, adapter=None, max_length=None, batch_size=None,
                 on_bad_rows=None, metrics=None, max_new_tokens=None, normalize=None)
    assert evaluate(eval_job(run, **flags))["loss"] == summary["eval_loss"]
    source = model_source(run, [], None, None, False, "eval")[0]
    for model in (source.load(torch.device("cpu")), source.load_named([("a", str(run / "adapter"))])[0]):
        assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"
    flagged = model_source(run, [], str(tiny_llama), None, False, "eval")[0].load(torch.device("cpu"))
    assert flagged.dtype == torch.float32 and flagged.config._attn_implementation != "eager"
    other = tmp_path / "other"  # an adapter trained at another revision of the recipe's base: said, not loaded
    shutil.copytree(run / "adapter", other)
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps(config | {"revision": "v1"}))
    with pytest.raises(PeftkitError, match=rf"{other} was trained on .*tiny-llama at revision v1, and the recipe's "
                       r"model.revision is v2: drop model.revision \(or --set model.revision=v1\)"):
        model_source(run, ["model.revision=v2"], None, str(other), False, "eval")[0].load(torch.device("cpu"))

    # A GPU run's flash_attention_2 evaluates on a CPU with transformers' default kernel, and says so; 16-bit
    # weights on a CPU without native bf16 matmuls are said to be slow.
    import yaml

    from peftkit.cli import main

    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    saved["model"]["attn_implementation"] = "flash_attention_2"
    (run / "recipe.yaml").write_text(yaml.safe_dump(saved))
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    monkeypatch.setattr("sys.argv", ["peftkit", "eval", str(run), "--json", str(tmp_path / "eval.json")])
    main()
    err = " ".join(capsys.readouterr().err.split())
    assert ("warning: model.attn_implementation: flash_attention_2 needs a CUDA device; running with transformers' "
            "default attention here instead (the same outputs up to rounding).") in err
    assert "warning: model.dtype: bfloat16 on a CPU without native 16-bit matmuls" in err
    assert "Here: --set model.dtype=float32." in err
    assert abs(json.loads((tmp_path / "eval.json").read_text())["loss"] - summary["eval_loss"]) < 1e-2  # sdpa


def test_normalize_without_a_metric_it_applies_to_is_said(tiny_llama, number_data):
    """`--normalize strip` with --metrics loss (or rouge_l) was silently ignored."""
    import warnings

    from peftkit.errors import PeftkitWarning

    flags = dict(overrides=[], model=str(tiny_llama), data=str(number_data["eval"]), fmt=None, adapter=None,
                 max_length=None, batch_size=None, on_bad_rows=None, max_new_tokens=None)
    with pytest.warns(PeftkitWarning, match=r"--normalize strip: only exact_match and token_f1 are normalized, and "
                                            r"neither is among the metrics \(loss, rouge_l\)"):
        eval_job(None, **flags, metrics="loss,rouge_l", normalize="strip")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eval_job(None, **flags, metrics="loss,token_f1", normalize="strip")
        eval_job(None, **flags, metrics="loss", normalize=None)


def test_max_new_tokens_without_a_generation_metric_is_said(tiny_llama, number_data):
    """`--max-new-tokens 5` with only loss metrics was silently ignored, where --normalize warned."""
    import warnings

    from peftkit.errors import PeftkitWarning

    flags = dict(overrides=[], model=str(tiny_llama), data=str(number_data["eval"]), fmt=None, adapter=None,
                 max_length=None, batch_size=None, on_bad_rows=None)
    with pytest.warns(PeftkitWarning, match=r"--max-new-tokens 5: only the generation metrics \(exact_match, token_f1, "
                                            r"rouge_l\) generate, and none is among the metrics \(loss, perplexity\)"):
        eval_job(None, **flags, metrics="loss,perplexity", max_new_tokens=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eval_job(None, **flags, metrics="loss,exact_match", max_new_tokens=5)
        eval_job(None, **flags, metrics="loss", max_new_tokens=None)


LENGTH = 64  # data.max_length of the rows below: "Is N a number?" rows fit it whole


@pytest.fixture(scope="module")
def long_rows(tmp_path_factory, tiny_llama) -> dict:
    """Eval rows that fit data.max_length (`fit`), and the same with rows the loss leaves out between them (`all`): two
    whose prompt alone fills it, and one whose answer it cuts (which data.truncation: keep trains as cut, and drop
    leaves out)."""
    from transformers import AutoTokenizer

    from peftkit.data.examples import ALPACA_PROMPT
    from peftkit.tiny import write_jsonl

    root = tmp_path_factory.mktemp("long")
    fit = [{"instruction": f"Is {k} a number?", "input": "", "output": "Yes."} for k in range(100, 106)]
    past = [{"instruction": f"Is {k} a number? " + "Think about it. " * 3, "input": "", "output": "Yes."} for k in (7, 8)]
    cut = {"instruction": "Is 9 a number, now?", "input": "", "output": "Yes, nine is a number."}
    tok = AutoTokenizer.from_pretrained(tiny_llama)

    def length(row):
        return len(tok(ALPACA_PROMPT.format(**row))["input_ids"])

    assert max(length(r) + len(tok(r["output"], add_special_tokens=False)["input_ids"]) + 1 for r in fit) <= LENGTH
    assert all(length(r) >= LENGTH for r in past) and length(cut) < LENGTH < length(cut) + len(cut["output"])
    for name, rows in (("fit", fit), ("all", fit[:2] + past[:1] + fit[2:4] + [cut] + past[1:] + fit[4:]),
                       ("fit_and_cut", fit + [cut])):
        write_jsonl(root / f"{name}.jsonl", rows)
    return {name: root / f"{name}.jsonl" for name in ("fit", "all", "fit_and_cut")}


def test_generation_metrics_answer_the_rows_the_loss_scores(tiny_llama, long_rows, tmp_path, monkeypatch, capsys):
    """The loss leaves out a row whose answer lies past data.max_length (and, under data.truncation: drop, one whose
    answer it cuts), while the generation metrics answered it: the two were computed over different rows. Now the
    metrics answer the rows the loss scores, and `peftkit eval` says how many it left out: every figure equals that
    of the rows that fit alone (their own file), predictions included."""
    from peftkit.cli import main

    def cli(data: Path, name: str, *extra: str) -> tuple[dict, str, list]:
        out, preds = tmp_path / f"{name}.json", tmp_path / f"{name}.preds.jsonl"
        monkeypatch.setattr("sys.argv", ["peftkit", "eval", "--model", str(tiny_llama), "--data", str(data),
                                         "--max-length", str(LENGTH), "--metrics", "loss,perplexity," + ",".join(METRICS),
                                         "--max-new-tokens", "5", "--json", str(out), "--predictions", str(preds),
                                         *extra])
        main()
        return (json.loads(out.read_text()), " ".join(capsys.readouterr().out.split()),
                [json.loads(line) for line in preds.read_text().splitlines()])

    alone, _, alone_preds = cli(long_rows["fit"], "fit")
    kept, said, kept_preds = cli(long_rows["all"], "all")  # data.truncation: keep (no recipe): the cut row answers
    assert [p["prompt"] for p in kept_preds if "nine" not in p["reference"]] == [p["prompt"] for p in alone_preds]
    both, _, both_preds = cli(long_rows["fit_and_cut"], "fit_and_cut")  # the same 7 rows, without those left out
    assert sorted(map(json.dumps, kept_preds)) == sorted(map(json.dumps, both_preds))
    assert {k: v for k, v in kept.items() if k != "rows_left_out"} == {k: v for k, v in both.items()
                                                                       if k != "rows_left_out"}
    assert alone["rows_left_out"] == 0 and kept["rows_left_out"] == 2 and kept["num_rows"] == 7
    assert "rows 7 (2 left out, as the loss leaves them out: the answer past max_length, or cut under truncation: " \
           "drop)" in said


def test_a_run_s_metrics_leave_out_the_rows_its_loss_does(tiny_llama, long_rows, yes_data, tmp_path):
    """Under data.truncation: drop the run's eval.metrics leave out the rows past data.max_length and the one whose
    answer it cuts, as its eval loss does, and say so; `peftkit eval RUN_DIR` gives the same figures, each that of the
    rows that fit alone; under error, generation metrics alone stop at the cut row as the loss does."""
    recipe = make_recipe(tmp_path, tiny_llama, {"train": yes_data["train"], "eval": long_rows["all"]},
                         data={"max_length": LENGTH, "truncation": "drop"}, training={"max_steps": 2},
                         eval=EVAL | {"base_model": False})
    out = io.StringIO()
    summary = train(load_recipe(recipe), console=Console(file=out, width=300))
    flags = dict(overrides=[], model=None, fmt=None, adapter=None, max_length=None, batch_size=None, on_bad_rows=None,
                 metrics=None, max_new_tokens=None, normalize=None)
    run = tmp_path / "run"
    again, fit = evaluate(eval_job(run, data=None, **flags)), evaluate(eval_job(run, data=str(long_rows["fit"]), **flags))
    assert again["num_rows"] == fit["num_rows"] == 6
    for key in ("loss", *METRICS):
        assert summary[f"eval_{key}"] == again[key] == fit[key]
    assert again["rows_left_out"] == 3 and fit["rows_left_out"] == 0
    assert (f"note: eval.metrics answer 6 rows of data.eval; 3 rows left out, as the loss leaves them out: the answer "
            f"asked for lies past max_length {LENGTH}, or (truncation: drop) is cut short of its end.") in out.getvalue()
    said = {}
    for metrics in ("loss", "exact_match"):  # the loss alone, the generation metrics alone: one error
        with pytest.raises(PeftkitError) as e:
            evaluate(eval_job(run, data=None, **flags | {"overrides": ["data.truncation=error"], "metrics": metrics}))
        said[metrics] = str(e.value)
    assert said["loss"] == said["exact_match"]
    assert said["loss"].startswith(f"{long_rows['all']}:3: this example has 102 tokens but data.max_length is {LENGTH}")


def test_a_prompt_past_max_length_is_left_out_though_train_on_all_keeps_its_example(tiny_llama, long_rows):
    """Under data.train_on: all the loss keeps an example whose prompt fills data.max_length (its prompt tokens are
    trained), but none of the answer the metrics ask for is in it: that row is not answered."""
    from transformers import AutoTokenizer

    from peftkit.data import load_examples
    from peftkit.data.prompts import load_prompts
    from peftkit.recipe import DataConfig

    tok, path = AutoTokenizer.from_pretrained(tiny_llama), str(long_rows["all"])
    cfg = DataConfig(train=path, max_length=LENGTH, train_on="all")
    assert len(load_examples(tok, path, None, cfg, cache=False)[0]) == 9  # every row: its prompt tokens trained
    prompts = load_prompts(tok, path, "train", cfg, as_loss=True)
    assert len(prompts) == 7 and prompts.left_out == 2 and all(len(p.ids) < LENGTH for p in prompts)
    assert len(load_prompts(tok, path, "train", cfg)) == 9  # (eval.samples, generate --data: every row)
