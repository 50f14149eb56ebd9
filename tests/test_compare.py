"""`peftkit eval --adapter a=DIR --adapter b=DIR --merged m=DIR`: every row on the same data with the same metrics
as evaluating it alone, the base's row first, differences from it, adapter parameters and size."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from peftkit.cli import app
from peftkit.eval_job import eval_job
from peftkit.evaluate import evaluate
from peftkit.recipe import load_recipe
from peftkit.train import train
from tests.conftest import cli_user_error, make_recipe, tokenizer_reads


@pytest.fixture(scope="module")
def candidates(tiny_llama, number_data, tmp_path_factory):
    """A peftkit run (adapter/ and merged/) and an adapter made by peft with random weights."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("compare")
    recipe = make_recipe(root, tiny_llama, number_data, training={"max_steps": 3, "lr": 5e-2},
                         export={"merged": True})
    train(load_recipe(recipe), console=Console(quiet=True))
    torch.manual_seed(0)
    config = LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), config).save_pretrained(root / "peft")
    return root


def test_comparison_table(tiny_llama, number_data, candidates, tmp_path, monkeypatch, capsys):
    from peftkit.cli import main
    from peftkit.inspect import inspect_adapter

    run, data = candidates / "run", str(number_data["eval"])
    out, preds = tmp_path / "cmp.json", tmp_path / "preds"
    monkeypatch.setattr("sys.argv", ["peftkit", "eval", "--model", str(tiny_llama), "--data", data,
                                     "--adapter", f"ours={run / 'adapter'}", "--adapter", f"theirs={candidates / 'peft'}",
                                     "--merged", f"merged={run / 'merged'}", "--metrics", "loss,exact_match",
                                     "--max-new-tokens", "4", "--json", str(out), "--predictions", str(preds)])
    main()
    results = json.loads(out.read_text())
    assert sorted(results) == ["base", "merged", "ours", "theirs"]  # the JSON file sorts its keys
    for name, adapter in (("ours", run / "adapter"), ("theirs", candidates / "peft")):
        alone = evaluate(eval_job(None, [], str(tiny_llama), data, None, str(adapter), None, None, None,
                                  metrics="loss,exact_match", max_new_tokens=4))
        assert {k: results[name][k] for k in alone} == alone
        info = inspect_adapter(adapter)
        assert (results[name]["trainable_params"], results[name]["adapter_bytes"]) == (info["trainable_params"],
                                                                                       info["size_on_disk"])
    base = evaluate(eval_job(None, [], str(tiny_llama), data, None, None, None, None, None, metrics="loss"))
    assert results["base"]["loss"] == base["loss"]
    assert abs(results["merged"]["loss"] - results["ours"]["loss"]) < 1e-4
    assert sorted(p.name for p in preds.iterdir()) == ["base.jsonl", "merged.jsonl", "ours.jsonl", "theirs.jsonl"]
    shown = capsys.readouterr().out
    assert f"{results['ours']['loss'] - results['base']['loss']:+.4f}" in shown  # the Δ column


@pytest.mark.parametrize("setting", [{"trainable_token_indices": [40, 41, 55]}, {"alora_invocation_tokens": [40, 41]}],
                         ids=["trainable_token_indices", "alora_invocation_tokens"])
def test_an_adapter_that_cannot_share_the_base_is_evaluated_alone(setting, tiny_llama, number_data, candidates,
                                                                   tmp_path, monkeypatch):
    """A LoRA that also trains rows of the embeddings (trainable_token_indices: one model, one set of rows), or an
    activated LoRA (acting from its invocation on), which named adapters refuse: the comparison failed on it (exit
    2); it is evaluated on a model of its own."""
    from peft import LoraConfig, get_peft_model

    from peftkit.cli import main

    torch.manual_seed(1)
    config = LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"], init_lora_weights=False, **setting)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), config).save_pretrained(tmp_path / "odd")
    data, out = str(number_data["eval"]), tmp_path / "cmp.json"
    monkeypatch.setattr("sys.argv", ["peftkit", "eval", "--model", str(tiny_llama), "--data", data, "--adapter",
                                     f"odd={tmp_path / 'odd'}", "--adapter", f"theirs={candidates / 'peft'}",
                                     "--json", str(out)])
    main()
    results = json.loads(out.read_text())
    for name, adapter in (("odd", tmp_path / "odd"), ("theirs", candidates / "peft")):
        alone = evaluate(eval_job(None, [], str(tiny_llama), data, None, str(adapter), None, None, None, metrics="loss"))
        assert results[name]["loss"] == alone["loss"]


def test_a_wide_comparison_is_printed_whole_in_a_log():
    """Piped or logged, rich prints at 80 columns and cut cells to fit: Δ -3.0365 showed as `-3.03…`, 2,442,240
    trainable as `2,442…`. Every cell now prints whole (the table runs wider)."""
    import io

    from rich.console import Console

    from peftkit.compare import comparison_table

    metrics = ["loss", "perplexity", "exact_match", "token_f1", "rouge_l"]
    base = dict(zip(metrics, [4.5, 90.0, 0.0, 0.1, 0.2], strict=True))
    results = {"base": base, "a-long-adapter-name": {m: v - 3.0365 for m, v in base.items()}
               | {"trainable_params": 2442240, "adapter_bytes": 9 * 2**20}}
    out = io.StringIO()
    Console(file=out, soft_wrap=True).print(comparison_table(results, metrics))
    shown = out.getvalue()
    assert "…" not in shown and Console(file=io.StringIO()).width == 80
    for cell in ("a-long-adapter-name", "-3.0365", "1.4635", "2,442,240", "9.0 MiB", "exact_match", "perplexity"):
        assert cell in shown, cell


def test_a_small_adapter_s_size_is_shown_in_kib_not_as_zero_mib():
    """The quickstart's IA3 adapter (4,137 bytes) showed as `0.00 MiB` beside LoRA's `0.07 MiB`; the size cell now
    picks its unit as `peftkit inspect`'s `size on disk` does (4,137 / 1024 = 4.04 KiB, 71,670 / 1024 = 70.0 KiB)."""
    import io

    from rich.console import Console

    from peftkit.compare import comparison_table

    results = {"base": {"loss": 4.9}, "ia3": {"loss": 2.6, "trainable_params": 384, "adapter_bytes": 4137},
               "lora": {"loss": 0.6, "trainable_params": 16384, "adapter_bytes": 71670}}
    out = io.StringIO()
    Console(file=out, soft_wrap=True).print(comparison_table(results, ["loss"]))
    shown = out.getvalue()
    assert "4.0 KiB" in shown and "70.0 KiB" in shown and "MiB" not in shown, shown


def test_a_row_named_after_its_directory_shows_its_name_as_written():
    """A bare --adapter DIR names its row after the directory: `sweep[lr=2e-4]` showed as `sweep` (the rest taken
    for rich markup), and `x[/b]` was a MarkupError traceback after the whole evaluation."""
    import io

    from rich.console import Console

    from peftkit.compare import comparison_table

    results = {"base": {"loss": 1.0}, "sweep[lr=2e-4]": {"loss": 0.5}, "x[/b]": {"loss": 0.25}}
    out = io.StringIO()
    Console(file=out, soft_wrap=True).print(comparison_table(results, ["loss"]))
    assert "│ sweep[lr=2e-4] │ 0.5000 │" in out.getvalue() and "│ x[/b]          │ 0.2500 │" in out.getvalue()
    # A control character is shown as `\x1b`, and the column measured as shown: in a table wider than the output
    # (80 columns) the name was cut to its raw length, `run\x1…`.
    metrics = ["loss", "perplexity", "exact_match", "token_f1", "rouge_l"]
    base = dict(zip(metrics, [4.5, 90.0, 0.0, 0.1, 0.2], strict=True))
    out = io.StringIO()
    Console(file=out, soft_wrap=True).print(comparison_table({"base": base, "run\x1b[2J": base}, metrics))
    assert "│ run\\x1b[2J │ 4.5000 │" in out.getvalue()


def test_a_bare_dir_is_named_after_its_directory_as_a_name_may_be_written(tiny_llama, number_data, candidates,
                                                                          tmp_path, monkeypatch, capsys):
    """`--adapter "my run"` was named `my run`, which the shared model then refused ("Adapter name 'my run': use
    letters, digits, ..."), a name the user never chose, after the base had loaded."""
    import shutil

    from peftkit.cli import main
    from peftkit.compare import parse_named

    assert parse_named(["a/my run [2]", "b/run.v1", "c/[]"], "--adapter") == [
        ("my_run_2", "a/my run [2]"), ("run.v1", "b/run.v1"), ("adapter", "c/[]")]
    shutil.copytree(candidates / "peft", tmp_path / "my run")
    monkeypatch.setattr("sys.argv", ["peftkit", "eval", "--model", str(tiny_llama), "--data", str(number_data["eval"]),
                                     "--adapter", str(tmp_path / "my run"), "--adapter", f"b={candidates / 'peft'}"])
    main()
    out = capsys.readouterr().out
    assert "my_run" in out and " b " in out


def test_a_name_used_twice_is_refused(tiny_llama, number_data, candidates, monkeypatch, capsys):
    args = ["eval", "--model", str(tiny_llama), "--data", str(number_data["eval"])]
    assert "--adapter: the name 'a' is used twice" in cli_user_error(
        monkeypatch, capsys, *args, "--adapter", f"a={candidates / 'peft'}", "--adapter", f"a={candidates / 'peft'}")
    assert "the name 'base' is used twice (or is the base's row" in cli_user_error(
        monkeypatch, capsys, *args, "--adapter", f"base={candidates / 'peft'}")
    assert "--merged: the name 'a' is used twice" in cli_user_error(  # one row each: the adapter's would be lost
        monkeypatch, capsys, *args, "--adapter", f"a={candidates / 'peft'}", "--merged", f"a={tiny_llama}")


def test_a_comparison_s_predictions_file_name_is_refused(tiny_llama, number_data, candidates, tmp_path, monkeypatch,
                                                         capsys):
    """`--predictions preds.jsonl` in a comparison silently made a directory named preds.jsonl."""
    err = cli_user_error(monkeypatch, capsys, "eval", "--model", str(tiny_llama), "--data", str(number_data["eval"]),
                         "--adapter", f"a={candidates / 'peft'}", "--metrics", "exact_match", "--predictions",
                         str(tmp_path / "preds.jsonl"))
    assert (f"--predictions {tmp_path / 'preds.jsonl'}: a comparison writes one NAME.jsonl per model, into a directory; "
            f"give a directory (e.g. --predictions {tmp_path / 'preds'}).") in " ".join(err.split())
    assert not (tmp_path / "preds.jsonl").exists()
    err = cli_user_error(monkeypatch, capsys, "eval", "--model", str(tiny_llama), "--data", str(number_data["eval"]),
                         "--adapter", f"a={candidates / 'peft'}", "--metrics", "exact_match", "--predictions",
                         str(tmp_path / "preds"), "--json", str(tmp_path / "preds" / "a.jsonl"))
    assert (f"--json {tmp_path / 'preds' / 'a.jsonl'} is the --predictions file of a, {tmp_path / 'preds' / 'a.jsonl'}, "
            "too: the metrics would replace the predictions.") in " ".join(err.split())
    assert not (tmp_path / "preds").exists()


def test_a_comparison_that_fails_leaves_no_empty_predictions_directory(tiny_llama, number_data, candidates, tmp_path,
                                                                      monkeypatch, capsys):
    """The directory was made before the models loaded; an error (or Ctrl-C) then left it behind, empty."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(candidates / "peft", broken)
    (broken / "adapter_config.json").write_text("[]")
    err = cli_user_error(monkeypatch, capsys, "eval", "--model", str(tiny_llama), "--data", str(number_data["eval"]),
                         "--adapter", f"a={candidates / 'peft'}", "--adapter", f"b={broken}", "--metrics",
                         "exact_match", "--predictions", str(tmp_path / "preds"))
    assert "adapter_config.json" in err and not (tmp_path / "preds").exists()


def test_a_comparison_needs_data_and_a_recorded_base(tiny_llama, number_data, candidates, tmp_path, monkeypatch,
                                                    capsys):
    """Without a recipe, a comparison needs --data; without --model, a base its candidates record: one that records
    none, or whose recorded base is gone, is said (a comparison was refused without --model whatever it recorded)."""
    peft, data = candidates / "peft", ("--data", str(number_data["eval"]))
    err = " ".join(cli_user_error(monkeypatch, capsys, "eval", "--adapter", f"a={peft}", "--adapter", f"b={peft}").split())
    assert err == ("error: peftkit eval of a comparison (--adapter NAME=DIR, --merged) needs the data to compare the "
                   "candidates on: --data FILE, or a RECIPE (or a run directory) whose data.eval it is."), err
    err = " ".join(cli_user_error(monkeypatch, capsys, "eval", *data, "--merged", f"m={tiny_llama}").split())
    assert err == ("error: peftkit eval of a comparison (--adapter NAME=DIR, --merged) needs the base the candidates "
                   "are compared on, its base row, and none of them records one (a merged model records it in its "
                   "peftkit.json merged_from, which `peftkit merge` writes): give --model M, or a RECIPE (or a run "
                   "directory) whose model it is."), err
    unnamed = _copy(peft, tmp_path / "unnamed", {"base_model_name_or_path": None})
    err = " ".join(cli_user_error(monkeypatch, capsys, "eval", *data, "--adapter", f"u={unnamed}").split())
    assert err == (f"error: Adapter 'u': {unnamed / 'adapter_config.json'} records no base model "
                   "(base_model_name_or_path), so the comparison's base row is unknown: name it with --model M."), err
    gone = _copy(peft, tmp_path / "gone", {"base_model_name_or_path": str(tmp_path / "moved")})
    err = " ".join(cli_user_error(monkeypatch, capsys, "eval", *data, "--adapter", f"g={gone}").split())
    assert err == (f"error: The base model {tmp_path / 'moved'} (base_model_name_or_path of "
                   f"{gone / 'adapter_config.json'}) is not there: moved or deleted since? Give it with --model DIR."), err


def test_a_comparison_without_model_takes_the_base_its_candidates_record(tiny_llama, number_data, candidates,
                                                                         tmp_path):
    """Without --model or a recipe, the base row is the base the adapters (and the merged model's peftkit.json
    merged_from) record, as `peftkit eval --adapter DIR` of one takes it: every row is the one of the same comparison
    with --model of that base (it was refused: "needs the base")."""
    run, data = candidates / "run", str(number_data["eval"])
    rows = ["--data", data, "--adapter", f"ours={run / 'adapter'}", "--adapter", f"theirs={candidates / 'peft'}",
            "--merged", f"merged={run / 'merged'}", "--metrics", "loss,exact_match", "--max-new-tokens", "4"]
    for args in (rows, rows[:4]):  # (one named adapter: a comparison too)
        recorded, given = (_figures(tmp_path, *args, *model) for model in ((), ("--model", str(tiny_llama))))
        assert recorded == given and len(recorded) == (4 if args is rows else 2), (recorded, given)


def _figures(tmp_path, *args: str) -> dict:
    out = tmp_path / "cmp.json"
    result = CliRunner().invoke(app, ["eval", *args, "--json", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return json.loads(out.read_text())


def _copy(adapter, to, config: dict | None = None, meta: dict | None = None):
    """A copy of `adapter` with adapter_config.json keys `config` and peftkit.json `meta` set."""
    import shutil

    shutil.copytree(adapter, to)
    raw = json.loads((to / "adapter_config.json").read_text())
    (to / "adapter_config.json").write_text(json.dumps(raw | (config or {})))
    if meta is not None:
        (to / "peftkit.json").write_text(json.dumps(meta))
    return to


def test_candidates_that_record_different_bases_are_refused_without_model(tiny_llama, number_data, candidates,
                                                                          tmp_path, monkeypatch, capsys):
    """Without --model, candidates whose records disagree (another base, another revision, another quantization, a
    merged model of another base) have no one base row: refused before anything loads, each named with its base."""
    peft, merged = candidates / "peft", candidates / "run" / "merged"
    other = _copy(peft, tmp_path / "other", {"base_model_name_or_path": "other/base"})
    at_a = _copy(peft, tmp_path / "at_a", {"revision": "a" * 40})
    at_b = _copy(peft, tmp_path / "at_b", {"revision": "b" * 40})
    nf4 = _copy(peft, tmp_path / "nf4", meta={"quantization": {"method": "nf4"}, "base_dtype": "bfloat16"})
    made = tmp_path / "made"
    import shutil

    shutil.copytree(merged, made)
    (made / "peftkit.json").write_text(json.dumps({"merged_from": {"base_model_name_or_path": "other/base"}}))
    start = ("error: The compared candidates record different bases, and a comparison has one base row (taken from "
             "them without --model): ")
    end = (". If they were trained on one model under two names, name it with --model M; else compare the candidates "
           "of each base apart.")
    for args, said in [
        (["--adapter", f"p={peft}", "--adapter", f"o={other}"],
         f"adapter 'p' ({peft}): {tiny_llama}; adapter 'o' ({other}): other/base"),
        (["--adapter", f"a={at_a}", "--adapter", f"p={peft}", "--adapter", f"b={at_b}"],
         f"adapter 'a' ({at_a}): {tiny_llama} at revision {'a' * 40}; adapter 'p' ({peft}): {tiny_llama}; "
         f"adapter 'b' ({at_b}): {tiny_llama} at revision {'b' * 40}"),
        (["--adapter", f"p={peft}", "--adapter", f"q={nf4}"],
         f"adapter 'p' ({peft}): {tiny_llama}; adapter 'q' ({nf4}): {tiny_llama}, nf4 (bitsandbytes) quantized "
         "from bfloat16"),
        (["--adapter", f"p={peft}", "--merged", f"m={made}"],
         f"adapter 'p' ({peft}): {tiny_llama}; --merged m ({made}): other/base"),
    ]:
        err = cli_user_error(monkeypatch, capsys, "eval", "--data", str(number_data["eval"]), *args)
        assert " ".join(err.split()) == start + said + end, err
    from peftkit.compare_base import comparison_base

    # (a revision recorded by one adapter and not by another agrees, as named adapters take it: the base loads at it)
    source = comparison_base([("p", str(peft)), ("a", str(at_a))], [("m", str(merged))])
    assert (source.model.name_or_path, source.model.revision, source.quantization) == (str(tiny_llama), "a" * 40, None)
    source = comparison_base([("q", str(nf4))], [])
    assert (source.model.dtype, source.quantization.method) == ("bfloat16", "nf4")


def test_a_merged_model_on_the_hub_records_its_base_as_a_local_one(tiny_llama, number_data, candidates, tmp_path,
                                                                    monkeypatch, capsys):
    """`--merged m=user/name` of a merged model published with its peftkit.json (`peftkit push --merged`; here an
    offline hub cache): its merged_from is read from the hub as a directory's, so without --model the base row is the
    base it records (it was refused: "none of them records one"), the figures those of the same comparison with
    --model of that base and the merged directory; a recorded base that disagrees, or is gone, is said with the hub
    model's record."""
    import shutil

    from huggingface_hub import constants

    from tests.test_hub import _publish_to

    run, data = candidates / "run", ("--data", str(number_data["eval"]), "--metrics", "loss")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _publish_to(tmp_path / "hub", "acme/merged", run / "merged", "a" * 40)
    hub = _figures(tmp_path, *data, "--merged", "m=acme/merged")
    local = _figures(tmp_path, *data, "--model", str(tiny_llama), "--merged", f"m={run / 'merged'}")
    assert hub == local and sorted(hub) == ["base", "m"], (hub, local)
    with_adapter = ("--adapter", f"ours={run / 'adapter'}", "--merged", "m=acme/merged")
    assert _figures(tmp_path, *data, *with_adapter) == _figures(tmp_path, *data, "--model", str(tiny_llama),
                                                                  *with_adapter)
    made = tmp_path / "made"
    shutil.copytree(run / "merged", made)
    (made / "peftkit.json").write_text(json.dumps({"merged_from": {"base_model_name_or_path": "other/base"}}))
    _publish_to(tmp_path / "hub", "acme/other-merged", made, "b" * 40)
    err = cli_user_error(monkeypatch, capsys, "eval", *data, "--adapter", f"ours={run / 'adapter'}", "--merged",
                         "m=acme/other-merged")
    assert (f"adapter 'ours' ({run / 'adapter'}): {tiny_llama}; --merged m (acme/other-merged): other/base. "
            in " ".join(err.split())), err
    (made / "peftkit.json").write_text(json.dumps({"merged_from": {"base_model_name_or_path": str(tmp_path / "moved")}}))
    _publish_to(tmp_path / "hub", "acme/gone-merged", made, "c" * 40)
    err = cli_user_error(monkeypatch, capsys, "eval", *data, "--merged", "m=acme/gone-merged")
    assert " ".join(err.split()) == (f"error: The base model {tmp_path / 'moved'} (merged_from of peftkit.json of hub "
                                     "model acme/gone-merged) is not there: moved or deleted since? Give it with "
                                     "--model DIR."), err


def test_an_adapter_path_holding_an_equals_sign_is_a_path(tiny_llama, number_data, candidates, tmp_path, monkeypatch,
                                                         capsys):
    """A sweep's directory (`lr=5e-2/adapter`) is one adapter, evaluated alone, not an adapter named `lr` at
    `5e-2/adapter`; NAME=DIR still names one where no such path exists."""
    import shutil

    from peftkit.cli import main
    from peftkit.compare import parse_named, split_named

    monkeypatch.chdir(tmp_path)
    shutil.copytree(candidates / "run" / "adapter", tmp_path / "lr=5e-2" / "adapter")
    assert split_named("lr=5e-2/adapter") is None and split_named("best=lr=5e-2/adapter") == ("best", "lr=5e-2/adapter")
    assert parse_named(["lr=5e-2/adapter", "x=lr=5e-2/adapter"], "--adapter") == [
        ("adapter", "lr=5e-2/adapter"), ("x", "lr=5e-2/adapter")]
    data = str(number_data["eval"])
    monkeypatch.setattr("sys.argv", ["peftkit", "eval", "--model", str(tiny_llama), "--data", data,
                                     "--adapter", "lr=5e-2/adapter"])
    main()
    alone = evaluate(eval_job(None, [], str(tiny_llama), data, None, str(candidates / "run" / "adapter"), None, None,
                              None, metrics="loss"))
    assert capsys.readouterr().out.startswith(f"loss {alone['loss']:.4f}")


@pytest.mark.parametrize("value, expected", [
    ("a=", "--merged 'a=': the DIR of NAME=DIR is empty"),
    ("=runs/a/adapter", "--merged '=runs/a/adapter': the NAME of NAME=DIR is empty"),
    ("my run=runs/a", "a NAME holds only letters, digits, '_', '.' and '-' (e.g. --merged my_run=runs/a)"),
])
def test_a_name_dir_value_with_an_empty_or_unusable_part_says_which(value, expected, tmp_path, monkeypatch):
    """`a=` and `=DIR` were taken for directories and reported "not found" (or as hub ids); a value that exists as a
    path is still a path."""
    from peftkit.compare import parse_named
    from peftkit.errors import PeftkitError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(PeftkitError) as caught:
        parse_named([value], "--merged")
    assert expected in str(caught.value)
    (tmp_path / value).mkdir(parents=True)
    assert parse_named([value], "--merged")[0][1] == value


def test_an_output_that_is_or_is_inside_an_input_is_refused(tiny_llama, number_data, candidates, tmp_path, monkeypatch,
                                                           capsys):
    """`--json` and `--predictions` were written over the command's own inputs: `--predictions ev.jsonl` or `--json
    ev.jsonl` replaced the dataset, a comparison's `--predictions` at the data's directory wrote base.jsonl over a data
    file of that name. Each is refused before anything loads, and the input is left as it was."""
    import shutil

    data = tmp_path / "ev.jsonl"
    shutil.copy(number_data["eval"], data)
    before = data.read_bytes()
    args = ["eval", "--model", str(tiny_llama), "--data", str(data), "--metrics", "exact_match"]
    for extra, said in [
        (["--predictions", str(data)], f"--predictions {data} is the data ({data}), an input of this command: writing "
                                       "it would overwrite it. Give --predictions another path."),
        (["--json", str(data)], f"--json {data} is the data ({data})"),
        (["--json", str(tiny_llama / "e.json")], f"--json {tiny_llama / 'e.json'} is inside the model ({tiny_llama})"),
        (["--adapter", str(candidates / "peft"), "--json", str(candidates / "peft" / "adapter_config.json")],
         "is inside the adapter"),
        (["--adapter", f"a={candidates / 'peft'}", "--predictions", str(candidates / "peft")],
         f"--predictions {candidates / 'peft'} is the adapter"),
        (["--merged", f"m={candidates / 'run' / 'merged'}", "--json", str(candidates / "run" / "merged" / "e.json")],
         "is inside the merged model"),
    ]:
        assert said in " ".join(cli_user_error(monkeypatch, capsys, *args, *extra).split())
    assert data.read_bytes() == before

    base = tmp_path / "base.jsonl"  # the data is named as the comparison's base row's predictions
    shutil.copy(number_data["eval"], base)
    err = cli_user_error(monkeypatch, capsys, "eval", "--model", str(tiny_llama), "--data", str(base), "--metrics",
                         "exact_match", "--adapter", f"a={candidates / 'peft'}", "--predictions", str(tmp_path))
    assert f"--predictions {tmp_path}: the comparison's base.jsonl is the data ({base})" in " ".join(err.split())
    assert base.read_bytes() == before

    run = candidates / "run"  # a run directory: its recipe's data.eval, its adapter/, the run's own files
    for out, said in [(run / "manifest.json", f"is the run's manifest.json ({run / 'manifest.json'})"),
                      (run / "adapter" / "eval.json", f"is inside the run's adapter ({run / 'adapter'})"),
                      (number_data["eval"], f"is the data ({number_data['eval']})")]:
        assert said in " ".join(cli_user_error(monkeypatch, capsys, "eval", str(run), "--json", str(out)).split())
    beside = run / "eval.json"  # beside the run's files, a result is the user's to keep with the run
    result = CliRunner().invoke(app, ["eval", str(run), "--json", str(beside)])
    assert result.exit_code == 0 and beside.is_file(), result.output
    beside.unlink()


def test_a_bad_merged_directory_is_said_before_evaluating(tiny_llama, number_data, candidates, tmp_path, monkeypatch,
                                                          capsys):
    """A --merged DIR that is missing, or an adapter's directory, was reported after the base and every adapter had
    been evaluated; it is said before anything loads now, as an --adapter's is."""
    import peftkit.compare

    def compare(*args, **kwargs):
        raise AssertionError("evaluated before --merged was checked")

    monkeypatch.setattr(peftkit.compare, "compare_sets", compare)  # what `peftkit eval` evaluates a comparison with
    args = ["eval", "--model", str(tiny_llama), "--data", str(number_data["eval"]), "--adapter",
            f"a={candidates / 'peft'}"]
    peft, missing = candidates / "peft", tmp_path / "nope"
    for value, said in [
        (f"m={missing}", f"--merged m={missing}: no such directory; {tmp_path}/ "),
        (f"m={peft}", f"--merged m={peft}: {peft} is an adapter directory, not a merged model. Compare it as "
                      f"--adapter m={peft}, or merge it first"),
        (f"m={tmp_path}", f"--merged m={tmp_path}: {tmp_path} has no config.json, so it is not a model directory."),
    ]:
        assert said in " ".join(cli_user_error(monkeypatch, capsys, *args, "--merged", value).split())


def test_a_comparison_reads_the_base_tokenizer_once(tiny_llama, number_data, candidates, tmp_path, monkeypatch):
    """`peftkit eval --adapter ours=DIR --adapter theirs=DIR` read the base's tokenizer once per row and once more
    loading the shared base (4 reads; 1 to 2 s each for a 151k-token vocabulary): once now, and each row's loss is
    its own evaluation's."""
    run, data = candidates / "run", str(number_data["eval"])
    adapters = {"ours": run / "adapter", "theirs": candidates / "peft"}
    reads = tokenizer_reads(monkeypatch)
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_llama), "--data", data, "--metrics", "loss",
                                      *(a for name, path in adapters.items() for a in ("--adapter", f"{name}={path}")),
                                      "--json", str(tmp_path / "cmp.json")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert reads == [str(tiny_llama)]
    results = json.loads((tmp_path / "cmp.json").read_text())
    for name, adapter in [("base", None), *adapters.items()]:
        alone = evaluate(eval_job(None, [], str(tiny_llama), data, None, adapter and str(adapter), None, None, None,
                                  metrics="loss"))
        assert results[name]["loss"] == alone["loss"]


def test_the_base_row_says_it_lacks_an_adapter_s_added_tokens(tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    """Tokenized rows holding the id of a token an adapter's run added (model.add_tokens): the comparison stopped on
    the base row, first evaluated, with the bare bad row ('input_ids[1] is 102, past this tokenizer's 102 tokens (...:
    tokenized with another tokenizer?)... or pass --on-bad-rows skip'), not saying it was the base's row nor why. It
    now says both and the way out, which works: the adapter evaluated on its own (its tokenizer has the token)."""
    from peftkit.tiny import write_jsonl

    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 1})
    recipe.write_text(recipe.read_text().replace("dtype: float32", "dtype: float32\n  add_tokens: ['<calc>']"))
    train(load_recipe(recipe), console=Console(quiet=True))
    write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": [5, 6, 7]}, {"input_ids": [5, 102, 6, 7]}])
    adapter, data = tmp_path / "run" / "adapter", ["--data", str(tmp_path / "ids.jsonl"), "--format", "tokenized"]
    err = " ".join(cli_user_error(monkeypatch, capsys, "eval", *data, "--adapter", f"a={adapter}").split())
    assert err == (f"error: {tmp_path / 'ids.jsonl'}:2: input_ids[1] is 102, past this tokenizer's 102 tokens, in the "
                   f"comparison's base row ({tiny_llama}): the compared adapters were trained with tokens added to its "
                   f"tokenizer (adapter 'a' ({adapter}) <calc>), which the base row reads the data without, and this "
                   "row holds one. Compare on rows the base's tokenizer reads (without those ids), or leave the base "
                   "row out by evaluating each such adapter on its own: peftkit eval --adapter DIR --data FILE (one "
                   "--adapter, no NAME=)."), err
    result = CliRunner().invoke(app, ["eval", *data, "--adapter", str(adapter)])
    assert result.exit_code == 0 and "tokens 5" in result.stdout, result.output
