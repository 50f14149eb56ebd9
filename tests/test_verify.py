"""`peftkit verify`: the files in RUN_DIR are checked against the manifest before the re-run, a tolerance
cannot hide a changed file, a manifest cannot make verify run model code, a malformed manifest is a clear
error, and the re-run never writes into RUN_DIR.

One real 3-step run of the tiny Llama is trained per module and copied for each test (shutil.copytree),
so each test changes its own copy; each `verify` re-runs those 3 steps (a few seconds on 2 cores).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import make_recipe
from rich.console import Console
from typer.testing import CliRunner

from peftkit import __version__
from peftkit.cli import app
from peftkit.errors import PeftkitError
from peftkit.fileio import atomic_write_json, sha256_file
from peftkit.recipe import load_recipe
from peftkit.train import train
from peftkit.verify import verify

ADAPTER = "adapter/adapter_model.safetensors"


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=1000)


@pytest.fixture(scope="module")
def recorded_run(tiny_llama, number_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recorded")
    recipe = make_recipe(root, tiny_llama, number_data, training={"max_steps": 3, "save_steps": 2},
                         eval={"base_model": False})
    train(load_recipe(recipe), console=_quiet())
    return root / "run"


@pytest.fixture
def run(recorded_run, tmp_path) -> Path:
    return Path(shutil.copytree(recorded_run, tmp_path / "run"))


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root with its bytes' hash and mtime: any write shows."""
    return {str(p.relative_to(root)): ("dir",) if p.is_dir() else (hashlib.sha256(p.read_bytes()).hexdigest(),
                                                                   p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def _edit_manifest(run: Path, edit) -> None:
    path = run / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(edit(manifest) or manifest))


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # the last byte lies in the last tensor's data: the file still parses
    path.write_bytes(bytes(data))


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "1000", "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "peftkit", *args], check=False, capture_output=True, text=True, env=env,
                          timeout=300)


# ------------------------------------------------------------------------------------ an intact run


def test_an_intact_run_verifies_and_nothing_is_written_into_it(run, recorded_run):
    before, recorded_before = _snapshot(run), _snapshot(recorded_run)  # recorded_run: the recipe's output_dir
    result = CliRunner().invoke(app, ["verify", str(run)])
    assert result.exit_code == 0, result.output
    assert f"Re-running the recipe recorded in {run} in a temporary directory" in result.output
    assert f"verified: {run} reproduces bit for bit." in result.output
    assert _snapshot(run) == before and _snapshot(recorded_run) == recorded_before


def test_a_run_with_its_report_verifies(tiny_llama, number_data, tmp_path):
    """export.report (true by default; the tests' recipes turn it off): verify's re-run waited for ever as it put its
    report in place, for the lock of its run directory, which verify itself held (fd80e76: the scratch directory's
    lock, so that a later verify can tell a live one's directory from a killed one's). The re-run's run directory is
    now one inside the scratch directory. (A process with a time limit: a regression hangs, it does not fail.)"""
    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 2}, eval={"base_model": False},
                         export={"report": True})
    train(load_recipe(recipe), console=_quiet())
    assert (tmp_path / "run" / "report" / "report.html").is_file()
    result = _cli("verify", str(tmp_path / "run"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"verified: {tmp_path / 'run'} reproduces bit for bit." in result.stdout


def test_the_manifest_records_the_dtype_auto_resolved_to_and_an_older_auto_still_verifies(tiny_llama, number_data,
                                                                                           tmp_path):
    """model.dtype: auto loads the checkpoint's dtype: the manifest says which (it said "auto"); a manifest written
    before that records "auto", and verify does not take the re-run's resolved dtype for a difference."""
    from peftkit.tiny import build_tiny_model

    base = tmp_path / "bf16-llama"
    build_tiny_model(base, arch="llama", hidden_size=32, num_layers=2, seed=0)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(config | {"dtype": "bfloat16", "torch_dtype": "bfloat16"}))
    for model, dtype in ((tiny_llama, "float32"), (base, "bfloat16")):
        recipe = load_recipe(make_recipe(tmp_path / dtype, model, number_data, training={"max_steps": 2}))
        recipe.model.dtype = "auto"
        train(recipe, console=_quiet())
        run = tmp_path / dtype / "run"
        assert json.loads((run / "manifest.json").read_text())["dtype"] == dtype
    _edit_manifest(run, lambda manifest: manifest | {"dtype": "auto"})
    assert verify(run, console=_quiet()).ok
    _edit_manifest(run, lambda manifest: manifest | {"dtype": "float16"})
    assert "manifest.json: dtype is 'float16' recorded, 'bfloat16' now" in verify(run, console=_quiet()).differences


# ---------------------------------------------------------------------------- files changed in RUN_DIR


def test_files_changed_after_the_run_are_reported_though_the_recipe_reproduces(run):
    _flip_a_bit(run / ADAPTER)
    config = json.loads((run / "adapter/adapter_config.json").read_text())
    (run / "adapter/adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 99}))
    (run / "adapter/notes.txt").write_text("added by hand")
    (run / "adapter/peftkit.json").unlink()
    (run / "recipe.yaml").write_text((run / "recipe.yaml").read_text().replace("lr: 0.01", "lr: 0.02"))

    report = verify(run, console=_quiet())
    assert not report.ok
    expected = [f"{ADAPTER} in {run} was changed after the run: sha256 ",
                f"adapter/adapter_config.json in {run} was changed after the run",
                f"adapter/notes.txt in {run} is not in the manifest; it was added after the run",
                f"adapter/peftkit.json is missing from {run}",
                f"recipe.yaml in {run} was changed after the run"]
    for text in expected:
        assert any(d.startswith(text) for d in report.differences), (text, report.differences)
    assert len(report.differences) == len(expected), report.differences  # the re-run itself matched
    assert f"the recipe still reproduces the recorded run; only the files in {run} differ from it" in report.notes


def test_results_logs_and_checkpoints_edited_after_the_run_are_reported(run):
    """Every record of the run is checked, not only the exported files: the manifest's results against the re-run's,
    metrics.jsonl line by line, each checkpoint against its checksums.json and the re-run's."""
    def edit(manifest):
        manifest["metrics"]["eval_loss"] = 0.01
        manifest["seed"], manifest["added"] = 7, 1
        manifest["loss_digest"] = "0" * 64
    _edit_manifest(run, edit)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = json.dumps(json.loads(lines[1]) | {"loss": 0.5})
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    _flip_a_bit(run / "checkpoints/step-00000002/adapter_model.safetensors")
    expected = ["manifest.json: its loss_digest does not match its losses; the manifest was edited after the run",
                "manifest.json: added is 1 recorded, None now",
                "manifest.json: metrics.eval_loss is 0.01 recorded, ",
                "manifest.json: seed is 7 recorded, 0 now",
                f"metrics.jsonl in {run} was changed after the run: sha256 ",  # (its log_sha256)
                "metrics.jsonl line 2: loss is 0.5 recorded, ",
                f"checkpoints/step-00000002 in {run}: adapter_model.safetensors does not match its checksum (truncated "
                "or modified); it was changed after the run"]
    for tolerance in (0.0, 1e-3):
        report = verify(run, tolerance=tolerance, console=_quiet())
        for text in expected:
            assert any(d.startswith(text) for d in report.differences), (text, report.differences)
        assert len(report.differences) == len(expected), report.differences


def test_a_boolean_edited_in_for_a_number_is_a_difference(run):
    """JSON's false is not 0, though Python's False == 0: a manifest whose seed 0 and skipped_steps 0 became false
    verified; so did a list of numbers with a false among them."""
    from peftkit.reproduced import _differ

    def edit(manifest):
        manifest["seed"] = False
        manifest["metrics"]["skipped_steps"] = False
    _edit_manifest(run, edit)
    report = verify(run, console=_quiet())
    assert report.differences == ["manifest.json: metrics.skipped_steps is False recorded, 0 now",
                                  "manifest.json: seed is False recorded, 0 now"], report.differences
    assert _differ("x", [1, False], [1, 0], 0.0) == ["x is [1, False] recorded, [1, 0] now"]


def _rewrite_with_its_checksums(checkpoint: Path) -> None:
    """A bit of the checkpoint's weights changed, and checksums.json made to agree: whole, but not the run's."""
    _flip_a_bit(checkpoint / "adapter_model.safetensors")
    checksums = json.loads((checkpoint / "checksums.json").read_text())
    checksums["files"]["adapter_model.safetensors"] = sha256_file(checkpoint / "adapter_model.safetensors")
    (checkpoint / "checksums.json").write_text(json.dumps(checksums))


def test_a_checkpoint_rewritten_with_its_checksums_is_not_the_re_run_s(run):
    _rewrite_with_its_checksums(run / "checkpoints/step-00000002")
    report = verify(run, console=_quiet())
    assert len(report.differences) == 1, report.differences
    assert report.differences[0].startswith("checkpoints/step-00000002/adapter_model.safetensors: sha256 ")


def test_a_stopped_run_s_checkpoint_is_compared_with_the_re_run_s_too(run, tiny_llama, number_data, tmp_path):
    """A run stopped after step 1 and resumed has a checkpoint at step 1, which its save_steps (2) do not make (here
    the same state, made by a run saving every step). The re-run checkpoints there too: intact, the run verifies;
    rewritten with its checksums, it is reported. (The re-run made none there, and verify vouched for it.)"""
    every = make_recipe(tmp_path / "every", tiny_llama, number_data,
                        training={"max_steps": 3, "save_steps": 1, "save_total_limit": 3},
                        eval={"base_model": False})
    train(load_recipe(every), console=_quiet())
    shutil.copytree(tmp_path / "every/run/checkpoints/step-00000001", run / "checkpoints/step-00000001")
    report = verify(run, console=_quiet())
    assert report.ok, report.differences
    _rewrite_with_its_checksums(run / "checkpoints/step-00000001")
    report = verify(run, console=_quiet())
    assert len(report.differences) == 1, report.differences
    assert report.differences[0].startswith("checkpoints/step-00000001/adapter_model.safetensors: sha256 ")


def test_leftovers_that_the_next_train_would_act_on_are_reported(run):
    """A `.step-N.old` (what a kill mid-replace leaves) is restored as step N by the next `--resume`, which then
    trained from it: planted in a finished run, verify said OK. A file named like a checkpoint, a run entry's temp
    copy and `clear_run`'s folder are no part of a finished run either."""
    shutil.copytree(run / "checkpoints/step-00000002", run / "checkpoints/.step-00000003.old")
    (run / "checkpoints/step-00000009").write_text("x")
    (run / "checkpoints/.step-00000002.pruned.tmp").mkdir()
    (run / ".adapter.old").mkdir()
    (run / ".peftkit-replaced-abc").mkdir()
    report = verify(run, console=_quiet())
    assert report.differences == [
        f".adapter.old in {run}: left by an interrupted write, which the next `peftkit train` there would act on; no "
        "finished run holds it",
        f".peftkit-replaced-abc in {run}: left by an interrupted write, which the next `peftkit train` there would act "
        "on; no finished run holds it",
        f"checkpoints/.step-00000002.pruned.tmp in {run}: left by an interrupted write, which the next `peftkit train` "
        "there would remove; no finished run holds it",
        f"checkpoints/.step-00000003.old in {run}: a checkpoint left by an interrupted replace, which `--resume` would "
        "restore as step-00000003; no finished run holds it",
        f"checkpoints/step-00000009 in {run}: not a checkpoint directory; it was added after the run"]


def test_a_checkpoint_s_recorded_inputs_and_files_it_does_not_list_are_checked(run):
    """--resume refuses changed data or base by the hashes in a checkpoint's checksums.json: emptied, it refused
    nothing, and verify said OK. A file the checksums do not list is not the run's either."""
    checksums_file = run / "checkpoints/step-00000002/checksums.json"
    checksums = json.loads(checksums_file.read_text())
    checksums_file.write_text(json.dumps(checksums | {"inputs": {}}))
    report = verify(run, console=_quiet())
    assert report.differences == ["checkpoints/step-00000002/checksums.json: the data and base-model hashes it records "
                                  "(which --resume checks the inputs against) differ from the re-run's; it was changed "
                                  "after the run"]
    checksums_file.write_text(json.dumps(checksums))
    (run / "checkpoints/step-00000002/notes.txt").write_text("x")
    assert verify(run, console=_quiet()).differences == [
        f"checkpoints/step-00000002 in {run}: it holds notes.txt, which its checksums.json does not list; it was changed "
        "after the run"]


EDITED_RECORDS = {
    "base_model_sha256": ({}, "manifest.json: base_model_sha256 records 0 files of the base, the re-run hashed "),
    "dtype": ("auto", "manifest.json: dtype is 'auto' recorded, 'float32' now"),
    "data_commits": ({"train": "a" * 40}, "manifest.json: data_commits records a hub commit for data.train, which is "
                                          "not a hub dataset; the manifest was edited after the run"),
    "base_model_commit": ("a" * 40, f"manifest.json: base_model_commit is '{'a' * 40}' recorded, None in the re-run; "
                                    "the manifest was edited after the run"),
    "init_from_sha256": ({"adapter_model.safetensors": "0" * 64}, "manifest.json: init_from_sha256 records files, and "
                         "the recipe has no adapter.init_from; the manifest was edited after the run"),
}


@pytest.mark.parametrize("field", EDITED_RECORDS)
def test_input_records_no_other_check_reads_are_compared_with_the_re_run_s(run, field):
    """An emptied base record compared nothing (and `peftkit eval` stopped warning of a changed base); a recorded
    dtype 'auto' passed as an older manifest's; commits and an init_from record for inputs that have none: all
    verified OK."""
    value, expected = EDITED_RECORDS[field]
    _edit_manifest(run, lambda manifest: manifest.update({field: value}))
    report = verify(run, console=_quiet())
    assert len(report.differences) == 1 and report.differences[0].startswith(expected), report.differences


def _nudge_checkpoint(checkpoint: Path, by: float) -> None:
    """The optimizer's moments and the logged losses moved by `by`, checksums.json made to agree: a checkpoint as
    another machine's rounding would write it."""
    import torch

    state = torch.load(checkpoint / "training_state.pt", weights_only=True)
    for moments in state["optimizer"]["state"].values():
        moments["exp_avg"] += by
    state["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)]  # a GPU machine's generators, recorded too
    torch.save(state, checkpoint / "training_state.pt")
    trainer = json.loads((checkpoint / "trainer_state.json").read_text())
    trainer["losses"] = [loss + by for loss in trainer["losses"]]
    (checkpoint / "trainer_state.json").write_text(json.dumps(trainer))
    checksums = json.loads((checkpoint / "checksums.json").read_text())
    checksums["files"] |= {name: sha256_file(checkpoint / name) for name in ("training_state.pt", "trainer_state.json")}
    (checkpoint / "checksums.json").write_text(json.dumps(checksums))


def test_under_a_tolerance_a_checkpoint_s_state_is_compared_as_numbers(run):
    """A run with checkpoints made on another machine never verified under --tolerance: the optimizer's state and the
    logged losses were compared by their bytes (the README's CI recipe checkpoints at step 20). The generators'
    states are another machine's own (a GPU's recorded beside the CPU's)."""
    _nudge_checkpoint(run / "checkpoints/step-00000002", 1e-7)
    assert verify(run, tolerance=1e-5, console=_quiet()).ok
    differences = verify(run, console=_quiet()).differences
    assert [d.split(":")[0] for d in differences] == ["checkpoints/step-00000002/trainer_state.json",
                                                      "checkpoints/step-00000002/training_state.pt"], differences
    _nudge_checkpoint(run / "checkpoints/step-00000002", 1e-3)
    differences = verify(run, tolerance=1e-5, console=_quiet()).differences
    assert differences[0].startswith("checkpoints/step-00000002/trainer_state.json: losses is [") and \
        differences[1].startswith("checkpoints/step-00000002/training_state.pt: optimizer.state.0.exp_avg: max abs "
                                  "diff 0.001 > 1e-05"), differences


def test_a_tolerance_does_not_hide_a_changed_adapter(run):
    _flip_a_bit(run / ADAPTER)
    report = verify(run, tolerance=1e-3, console=_quiet())
    assert not report.ok
    assert [d for d in report.differences if d.startswith(f"{ADAPTER} in {run} was changed after the run")]


def test_a_tolerance_does_not_pass_a_nan_weight(run):
    """A NaN is within no tolerance: the largest difference over the tensors was taken by max() of (NaN, name) pairs,
    which keeps the first pair, so a NaN in any tensor but the first passed (here with its hash made anew)."""
    from safetensors.torch import load_file, save_file

    weights = load_file(run / ADAPTER)
    last = list(weights)[-1]
    weights[last][0, 0] = float("nan")
    save_file(weights, run / ADAPTER)
    _edit_manifest(run, lambda m: m["outputs_sha256"].__setitem__(ADAPTER, sha256_file(run / ADAPTER)))
    report = verify(run, tolerance=1e-3, console=_quiet())
    assert report.differences == [f"output {ADAPTER}: max abs diff inf at {last} > 0.001"], report.differences


def test_a_tolerance_does_not_pass_a_weight_of_another_dtype(run):
    """A tensor saved in another dtype is another file, whatever its values: compared as floats, a float64 copy of the
    adapter's last tensor (the same values) passed --tolerance with its hash made anew."""
    from safetensors.torch import load_file, save_file

    weights = load_file(run / ADAPTER)
    last = list(weights)[-1]
    weights[last] = weights[last].double()
    save_file(weights, run / ADAPTER)
    _edit_manifest(run, lambda m: m["outputs_sha256"].__setitem__(ADAPTER, sha256_file(run / ADAPTER)))
    report = verify(run, tolerance=1e-3, console=_quiet())
    assert report.differences == [f"output {ADAPTER}: {last} is torch.float64 recorded, torch.float32 now"], \
        report.differences


def test_a_tolerance_leaves_the_model_cards_rounded_figures_to_the_metrics(run):
    """adapter/README.md shows the eval loss to 4 decimals: a run made elsewhere, whose loss is within the tolerance,
    may round to another card. The metrics themselves are compared within it; bit for bit the card must match. Its
    words must match under a tolerance too: the whole card was left out, so an edited way to load it passed."""
    card = run / "adapter" / "README.md"
    text = card.read_text()
    loss = re.search(r"\| eval loss \| ([0-9.]+) \|", text).group(1)
    card.write_text(text.replace(f"| eval loss | {loss} |", f"| eval loss | {float(loss) + 1e-4:.4f} |"))
    _edit_manifest(run, lambda m: m["outputs_sha256"].update({"adapter/README.md": sha256_file(card)}))
    assert verify(run, tolerance=1e-3, console=_quiet()).differences == []
    assert [d for d in verify(run, console=_quiet()).differences if d.startswith("output adapter/README.md: sha256")]

    card.write_text(text.replace("| eval loss |", "| eval loss (as another machine rounded it) |"))
    _edit_manifest(run, lambda m: m["outputs_sha256"].update({"adapter/README.md": sha256_file(card)}))
    assert verify(run, tolerance=1e-3, console=_quiet()).differences == [
        "output adapter/README.md: its text differs from the re-run's (beyond the figures in it)"]


def test_a_tolerance_leaves_the_cards_peftkit_version_to_the_environment_notes(run):
    """A run made with a development build of peftkit: its card's version has another shape than a release's, which
    masking its digits alone left as a text difference; the manifest's version is reported as an environment note."""
    card = run / "adapter" / "README.md"
    text = card.read_text()
    assert f"Trained with peftkit {__version__} on " in text
    card.write_text(text.replace(f"Trained with peftkit {__version__} on ", "Trained with peftkit 0.2.0.dev3+g1a2b on "))
    _edit_manifest(run, lambda m: m["outputs_sha256"].update({"adapter/README.md": sha256_file(card)}))
    assert verify(run, tolerance=1e-3, console=_quiet()).differences == []


def test_a_run_recorded_before_the_model_card_still_verifies(run):
    """A run made before peftkit wrote adapter/README.md has no card, nor a record of one: its re-run writes one,
    which is no difference (the card is made from the recipe and metrics, which are compared on their own)."""
    (run / "adapter" / "README.md").unlink()

    def no_card(manifest):
        del manifest["outputs_sha256"]["adapter/README.md"]
        del manifest["examples_sha256"]
        del manifest["environment"]["versions"]["peftkit source"]  # (recorded since 5 December 2026, after the card)
    _edit_manifest(run, no_card)
    report = verify(run, console=_quiet())
    assert report.ok, report.differences


def test_a_manifest_made_to_look_older_than_the_code_that_wrote_it_is_reported(run):
    """What a run made before a record was kept lacks (the model card and its hash, log_sha256) was taken as missing
    from an older run whatever the manifest's own code: a card deleted with its record, or a timing edited in
    metrics.jsonl with log_sha256 set to null, verified. The same peftkit code as the re-run's (its `peftkit source`
    digest) records what the re-run records."""
    (run / "adapter" / "README.md").unlink()
    log = run / "metrics.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    rows[0]["tokens_per_s"] *= 10
    log.write_text("".join(json.dumps(row) + "\n" for row in rows))

    def older(manifest):
        del manifest["outputs_sha256"]["adapter/README.md"]
        manifest["log_sha256"] = None
        del manifest["examples_sha256"]
    _edit_manifest(run, older)
    source = json.loads((run / "manifest.json").read_text())["environment"]["versions"]["peftkit source"]
    same_code = f"which the re-run by the same peftkit code (peftkit source {source}) records; the manifest was edited"
    assert verify(run, console=_quiet()).differences == [
        "output adapter/README.md: written by the re-run, but not recorded",
        f"manifest.json: it records no examples_sha256, {same_code} after the run",
        f"manifest.json: it records no log_sha256, {same_code} after the run"]


def test_a_rerun_that_makes_other_examples_of_the_same_rows_says_so_first(run, monkeypatch):
    """As a transformers or peftkit upgrade that tokenizes otherwise would: the data files and the base are the same,
    the examples are not (manifest.json's examples_sha256), and the report says that first, as the cause of the
    losses and weights that differ after it."""
    from peftkit.data import examples

    recorded = json.loads((run / "manifest.json").read_text())["examples_sha256"]
    assert set(recorded) == {"train", "eval"}
    original = examples._prompts_and_targets
    monkeypatch.setattr(examples, "_prompts_and_targets",  # each target one token longer
                        lambda tok, rows, *args: [(p, t + t[-1:]) for p, t in original(tok, rows, *args)])
    differences = verify(run, console=_quiet()).differences
    assert differences[0].startswith("data.train: the re-run made other examples of the same rows (their tokens or "
                                     "labels differ): what turns rows into tokens changed")
    assert differences[1].startswith("data.eval: the re-run made other examples of the same rows")
    assert any(d.startswith("loss diverges first at step 1") for d in differences[2:])


def test_files_replaced_by_symbolic_links_are_reported_though_their_bytes_match(run, tmp_path):
    """A run writes files, never links: one in place of a file it wrote (to a copy with the same bytes, so every hash
    matches) holds bytes outside the run, which can change without the run changing. verify vouched for such a run."""
    outside = tmp_path / "outside"
    outside.mkdir()
    names = [ADAPTER, "manifest.json", "recipe.yaml", "metrics.jsonl", "checkpoints/step-00000002/training_state.pt"]
    for i, name in enumerate(names):
        copy = Path(shutil.copy(run / name, outside / str(i)))
        (run / name).unlink()
        (run / name).symlink_to(copy)
    (run / "adapter" / "extra").symlink_to(outside, target_is_directory=True)  # hashing walks no linked directory

    report = verify(run, tolerance=1e-3, console=_quiet())
    said = [f"{name} in {run} is a symbolic link (to {outside / str(i)}); the run wrote no link: it was replaced "
            "after the run, and what it holds can change without the run changing" for i, name in enumerate(names)]
    said.append(f"adapter/extra in {run} is a symbolic link (to {outside}); the run wrote no link: it was replaced "
                "after the run, and what it holds can change without the run changing")
    assert sorted(report.differences) == sorted(said), report.differences
    assert not report.ok


def test_a_named_pipe_among_the_run_s_files_or_a_file_for_its_checkpoints_is_reported(run):
    """Entries no hash reads: a named pipe added in adapter/ (which `peftkit push` uploads whole, reading each entry)
    and a file in place of checkpoints/ verified bit for bit."""
    os.mkfifo(run / "adapter" / "extra.safetensors")
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").write_text("")
    assert verify(run, console=_quiet()).differences == [
        f"adapter/extra.safetensors in {run} is not a regular file (a named pipe, socket or device); the run wrote none: "
        "it was added after the run",
        f"checkpoints in {run}: not a directory, where a run keeps its checkpoints; it was added after the run"]


def test_metrics_jsonl_edited_within_a_tolerance_or_in_its_timings_is_reported(run):
    """metrics.jsonl was compared with the re-run's only: a loss nudged within --tolerance, or a speed or time (which
    no re-run repeats), passed. The manifest records its sha256; a manifest from before that compares it as before."""
    log = run / "metrics.jsonl"
    assert json.loads((run / "manifest.json").read_text())["log_sha256"] == hashlib.sha256(log.read_bytes()).hexdigest()
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    rows[0]["loss"] += 1e-6
    rows[0]["tokens_per_s"] *= 10
    log.write_text("".join(json.dumps(row) + "\n" for row in rows))

    report = verify(run, tolerance=1e-3, console=_quiet())
    assert len(report.differences) == 1, report.differences
    assert report.differences[0].startswith(f"metrics.jsonl in {run} was changed after the run: sha256 ")

    def older(manifest):  # (recorded since 5 December 2026, by other code than today's)
        del manifest["log_sha256"]
        manifest["environment"]["versions"]["peftkit source"] = "0" * 16
    _edit_manifest(run, older)
    assert verify(run, tolerance=1e-3, console=_quiet()).ok


def test_a_run_moved_or_copied_with_its_project_verifies_where_its_inputs_lie_now(tiny_llama, number_data, tmp_path,
                                                                                 monkeypatch, capsys):
    """A run's recipe.yaml records its inputs' absolute paths: with the project moved (a clone at another path, a CI
    job's workspace), verify stopped with 'model.name_or_path .../model: no such directory' and every input 'no longer
    exists'. An input that is not at its recorded path is read where it lies relative to RUN_DIR as it lay relative to
    the recorded export.output_dir, said in a note; its hashes decide, and the re-run's adapter_config.json, which names
    the base where it lies now, is compared with the base's recorded path written back."""
    project = tmp_path / "project"
    shutil.copytree(tiny_llama, project / "model")
    (project / "data").mkdir()
    for name in ("train", "eval"):
        shutil.copy(number_data[name], project / "data" / f"{name}.jsonl")
    recipe = make_recipe(project, project / "model", {name: project / "data" / f"{name}.jsonl" for name in ("train", "eval")},
                         training={"max_steps": 2}, eval={"base_model": False})
    summary = train(load_recipe(recipe), console=_quiet())
    shutil.copytree(project / "run", tmp_path / "copy")  # a copy of the run alone: its inputs are where they were
    assert verify(tmp_path / "copy", console=_quiet()).notes == []
    moved = tmp_path / "moved"
    project.rename(moved)
    report = verify(moved / "run", console=_quiet())
    assert report.ok, report.differences
    assert [note.split(" is not there")[0] for note in report.notes] == [
        f"model.name_or_path: {project / 'model'}", f"data.train: {project / 'data/train.jsonl'}",
        f"data.eval: {project / 'data/eval.jsonl'}"]
    assert report.notes[1].endswith(f"read at {moved / 'data/train.jsonl'}, which lies where it did relative to the run "
                                    "directory (a project moved with its run): its files' hashes decide")
    # `peftkit eval RUN_DIR` of the moved project reads them there too, saying so (it said data.eval 'is not there')
    from peftkit.cli import main

    monkeypatch.setattr("sys.argv", ["peftkit", "eval", str(moved / "run"), "--json", str(tmp_path / "eval.json")])
    main()
    assert abs(json.loads((tmp_path / "eval.json").read_text())["loss"] - summary["eval_loss"]) <= 1e-6
    assert (f"warning: data.eval: {project / 'data/eval.jsonl'} is not there; read at {moved / 'data/eval.jsonl'}, which "
            "lies where it did relative to the run directory (a project moved with its run).") in \
        " ".join(capsys.readouterr().err.split())
    with (moved / "data" / "train.jsonl").open("a") as f:
        f.write('{"instruction": "1 + 1", "output": "2"}\n')
    assert f"data.train: the content of {moved / 'data/train.jsonl'} differs from the recorded one" in \
        verify(moved / "run", console=_quiet()).differences

def test_a_missing_exported_directory_is_reported(run):
    shutil.rmtree(run / "adapter")
    report = verify(run, tolerance=1e-3, console=_quiet())
    assert report.differences == [f"adapter/ is missing from {run} (the manifest records 4 files in it)"]


@pytest.fixture(scope="module")
def merged_run(tiny_llama, number_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recorded-merged")
    recipe = make_recipe(root, tiny_llama, number_data, training={"max_steps": 2}, eval={"base_model": False},
                         export={"merged": True})
    train(load_recipe(recipe), console=_quiet())
    return root / "run"


def test_a_merged_export_is_checked_and_reproduced(merged_run, tmp_path):
    run = Path(shutil.copytree(merged_run, tmp_path / "run"))
    _flip_a_bit(run / "merged/model.safetensors")
    report = verify(run, console=_quiet())
    # Only the changed file: the re-run wrote adapter/ and merged/ bit for bit again.
    assert len(report.differences) == 1, report.differences
    assert report.differences[0].startswith(f"merged/model.safetensors in {run} was changed after the run")


def test_a_tampered_run_whose_manifest_was_rehashed_is_not_vouched_for(run, tmp_path):
    """Three forgeries verify passed: an adapter_config.json edited (lora_alpha 8 -> 800) with its hash in the manifest
    made anew, under --tolerance, which compared weights only; an adapter/ added to a run that exported none, which
    eval and generate then load; and a checkpoint past the run's last step, which --resume then took up."""
    config = run / "adapter" / "adapter_config.json"
    config.write_text(config.read_text().replace('"lora_alpha": 8', '"lora_alpha": 800'))
    _edit_manifest(run, lambda m: m["outputs_sha256"].__setitem__("adapter/adapter_config.json", sha256_file(config)))
    report = verify(run, tolerance=1e-4, console=_quiet())
    assert ("output adapter/adapter_config.json: its content differs from the re-run's (beyond the library versions it "
            "records)") in report.differences, report.differences

    exported_none = Path(shutil.copytree(run, tmp_path / "none"))
    _edit_manifest(exported_none, lambda m: m.__setitem__(
        "outputs_sha256", {k: v for k, v in m["outputs_sha256"].items() if not k.startswith("adapter/")}))
    assert f"adapter/ in {exported_none} is not in the manifest (the run exported none); it was added after the run" in (
        _changed_files_of(exported_none))

    forged = Path(shutil.copytree(run, tmp_path / "forged"))
    step = Path(shutil.copytree(forged / "checkpoints" / "step-00000002", forged / "checkpoints" / "step-00000004"))
    state = json.loads((step / "trainer_state.json").read_text())
    (step / "trainer_state.json").write_text(json.dumps(state | {"step": 4}))
    checksums = json.loads((step / "checksums.json").read_text())
    checksums["files"]["trainer_state.json"] = sha256_file(step / "trainer_state.json")
    (step / "checksums.json").write_text(json.dumps(checksums))
    report = verify(forged, console=_quiet())
    assert (f"checkpoints/step-00000004 in {forged}: a checkpoint past the run's 3 steps; it was added after the run"
            in report.differences)
    recipe = load_recipe(forged / "recipe.yaml", [f"export.output_dir={forged}"])
    with pytest.raises(PeftkitError, match="step-00000004 is at step 4, past this run's 3 steps: no run of this recipe"):
        train(recipe, resume=True, console=_quiet())


@pytest.mark.parametrize("recorded, edited", [('"use_rslora": false', '"use_rslora": 0'),
                                               ('"inference_mode": true', '"inference_mode": 1')])
def test_under_a_tolerance_a_boolean_edited_to_a_number_in_a_settings_file_is_a_difference(run, recorded, edited):
    """Exported JSON settings files were compared as values with Python's ==, for which False == 0 and True == 1: an
    adapter_config.json with use_rslora false edited to 0 (its hash made anew) verified under --tolerance. A boolean
    is no number now, as in the manifest's records (an int for a float of the same value still loads the same)."""
    config = run / "adapter" / "adapter_config.json"
    text = config.read_text()
    assert recorded in text
    config.write_text(text.replace(recorded, edited))
    _edit_manifest(run, lambda m: m["outputs_sha256"].__setitem__("adapter/adapter_config.json", sha256_file(config)))
    report = verify(run, tolerance=1e-4, console=_quiet())
    assert report.differences == ["output adapter/adapter_config.json: its content differs from the re-run's (beyond "
                                  "the library versions it records)"], report.differences


def test_settings_files_compare_booleans_apart_from_numbers(tmp_path):
    from peftkit.reproduced import _same_settings

    def same(a, b) -> bool:
        (tmp_path / "a.json").write_text(json.dumps(a))
        (tmp_path / "b.json").write_text(json.dumps(b))
        return _same_settings(tmp_path / "a.json", tmp_path / "b.json")

    assert not same({"x": [1, {"y": False}]}, {"x": [1, {"y": 0}]})
    assert not same([True], [1]) and not same({"x": 1}, {"x": True}) and not same(False, 0.0)
    assert same({"x": [1, {"y": False}], "peftkit_version": "1"}, {"x": [1.0, {"y": False}], "peftkit_version": "2"})
    assert not same({"x": [1, 2]}, {"x": [1]}) and not same({"x": 1}, {"x": 1, "y": 1})


def test_under_a_tolerance_the_versions_an_export_records_are_no_difference(run, monkeypatch):
    """An honest re-run under a newer peftkit (or transformers) writes its version into adapter/peftkit.json: bit for
    bit that differs, and a re-run made elsewhere (--tolerance) is said through the environment notes instead."""
    import peftkit.manifest
    import peftkit.peft_format

    monkeypatch.setattr(peftkit.peft_format, "__version__", "9.9.9")
    monkeypatch.setattr(peftkit.manifest, "__version__", "9.9.9")
    report = verify(run, tolerance=1e-4, console=_quiet())
    assert report.ok, report.differences
    assert any("peftkit" in note and "9.9.9" in note for note in report.notes), report.notes
    assert any(d.startswith("output adapter/peftkit.json: sha256") for d in verify(run, console=_quiet()).differences)


def _changed_files_of(run: Path) -> list[str]:
    from peftkit.manifest import read_manifest
    from peftkit.verify import _changed_files, _exported_hashes

    manifest = read_manifest(run)
    return _changed_files(run, manifest, _exported_hashes(run, manifest))


# ------------------------------------------------------------------------------------ remote code


def _record_trust_remote_code(run: Path) -> None:
    """As if the run had been trained with model.trust_remote_code: true (manifest and recipe.yaml agree)."""
    recipe = load_recipe(run / "recipe.yaml")
    recipe.model.trust_remote_code = True
    (run / "recipe.yaml").write_text(recipe.to_yaml())

    # The exported adapter records it too (peftkit.json), so the re-run's would differ from a stale one.
    meta_file = run / "adapter" / "peftkit.json"
    atomic_write_json(meta_file, {**json.loads(meta_file.read_text()), "trust_remote_code": True})  # as export writes it

    def edit(manifest: dict) -> None:
        manifest["recipe"] = recipe.model_dump(mode="json")
        manifest["recipe_sha256"] = recipe.sha256()
        manifest["outputs_sha256"]["adapter/peftkit.json"] = sha256_file(meta_file)
    _edit_manifest(run, edit)


def test_a_manifest_cannot_make_verify_run_model_code(run):
    _record_trust_remote_code(run)
    result = _cli("verify", str(run))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.startswith(f"error: {run / 'manifest.json'} records model.trust_remote_code: true")
    assert "pass --trust-remote-code to `peftkit verify`" in result.stderr
    assert "Re-running" not in result.stdout  # refused before anything was loaded

    report = verify(run, console=_quiet(), trust_remote_code=True)  # the user's own flag allows it
    assert report.ok, report.differences


def test_a_run_s_recipe_cannot_make_eval_generate_or_chat_run_model_code(run, monkeypatch, capsys):
    """`peftkit eval RUN_DIR` (generate, chat) loaded the base with the run's recipe's model.trust_remote_code: a
    downloaded run whose recipe names a base inside it, with an auto_map, ran that code unasked."""
    from tests.conftest import cli_user_error

    _record_trust_remote_code(run)
    said = (f"{run / 'recipe.yaml'} records model.trust_remote_code: true, so loading")
    for args in (["eval", str(run)], ["generate", str(run), "--prompt", "12"], ["chat", str(run)],
                 ["eval", str(run / "recipe.yaml")]):  # the run's recipe file named, not the run
        err = " ".join(cli_user_error(monkeypatch, capsys, *args).split())
        assert err.startswith(f"error: {said}") and "if you trust that code, pass --trust-remote-code." in err
    monkeypatch.setattr("sys.argv", ["peftkit", "eval", str(run), "--trust-remote-code"])
    from peftkit.cli import main

    main()  # the user's own flag allows it
    assert capsys.readouterr().out.startswith("loss ")


# ------------------------------------------------------------------------------------ malformed manifests


def _drop(*keys: str):
    return lambda m: {k: v for k, v in m.items() if k not in keys}


def _set(value, *path):
    def edit(manifest: dict) -> None:
        node = manifest
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


MALFORMED = {
    "not an object": (lambda m: [m], ["holds an array, not the JSON object `peftkit train` writes"]),
    "missing keys": (_drop("losses", "environment"), ["(2 problems)", "missing key 'losses'", "missing key 'environment'"]),
    "wrong type": (_set("abc", "losses"), ["'losses' = 'abc': must be a valid list"]),
    "a loss as text": (lambda m: m["losses"].__setitem__(1, "0.5"), ["'losses.1' = '0.5': must be a valid number"]),
    "not a sha256": (_set("zzz", "outputs_sha256", ADAPTER),
                     [f"'outputs_sha256.{ADAPTER}' = 'zzz': must be a sha256 digest (64 lowercase hex digits)"]),
    "an output outside the run": (_set("0" * 64, "outputs_sha256", "../../etc/passwd"),
                                  ["'../../etc/passwd' is not a file inside an exported directory"]),
    "an invalid recipe value": (_set(-1, "recipe", "training", "lr"),
                                ["recipe in manifest.json: 'training.lr' = -1: must be greater than 0"]),
    "an unknown recipe key": (_set(0.1, "recipe", "training", "learning_rate"),
                              ["recipe in manifest.json: unknown key 'learning_rate' in training. Did you mean 'lr'?"]),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_manifest_is_a_clear_error(run, case):
    edit, expected = MALFORMED[case]
    _edit_manifest(run, edit)
    with pytest.raises(PeftkitError) as info:
        verify(run, console=_quiet())
    message = str(info.value)
    assert message.startswith(str(run / "manifest.json")), message
    for text in expected:
        assert text in message, message
    assert "restore it from a copy of the run, or train the recipe again" in message
    assert "validation error" not in message and "pydantic" not in message


def test_a_manifest_that_is_not_json_or_missing(run):
    # a run's adapter/ given for the run (the hint was "finish it with `peftkit train RECIPE --resume`")
    with pytest.raises(PeftkitError, match=f"^{run / 'adapter'} is the adapter/ of a run, not the run directory: "
                                           f"pass {run}.$"):
        verify(run / "adapter", console=_quiet())
    (run / "manifest.json").write_bytes(b'{"recipe": "\xff"}')  # not UTF-8
    with pytest.raises(PeftkitError, match=f"^{run / 'manifest.json'} is not valid JSON .*restore it from a copy"):
        verify(run, console=_quiet())
    (run / "manifest.json").unlink()
    with pytest.raises(PeftkitError, match=f"^{run} has no manifest.json; .* `peftkit train RECIPE --resume`"):
        verify(run, console=_quiet())
    with pytest.raises(PeftkitError, match=f"^{run / 'nope'} is not a directory. Give the run directory"):
        verify(run / "nope", console=_quiet())


def test_cli_malformed_manifest_exits_2_without_a_traceback(run):
    _edit_manifest(run, _set(-1, "recipe", "training", "lr"))
    result = _cli("verify", str(run))
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr
    assert result.stderr.startswith(f"error: {run / 'manifest.json'} is not a valid peftkit manifest")
    assert "'training.lr' = -1: must be greater than 0" in result.stderr


@pytest.mark.parametrize("tolerance", [float("nan"), -1e-3, float("inf")])
def test_a_tolerance_must_be_a_finite_non_negative_number(run, tolerance):
    with pytest.raises(PeftkitError, match=f"^--tolerance {tolerance}: must be a finite number >= 0"):
        verify(run, tolerance=tolerance, console=_quiet())


def test_a_run_recorded_before_a_recipe_key_was_added_still_verifies(run):
    """A manifest written by an older peftkit lacks keys today's schema adds with their defaults
    (`data.truncation`): the recorded recipe must hash as written, not as re-dumped today."""
    def drop_truncation(manifest):
        del manifest["recipe"]["data"]["truncation"]
        as_run = yaml.safe_load((run / "recipe.yaml").read_text())  # the schema's key order, as to_yaml writes
        del as_run["data"]["truncation"]
        old_yaml = yaml.safe_dump(as_run, sort_keys=False)
        manifest["recipe_sha256"] = hashlib.sha256(old_yaml.encode()).hexdigest()
        (run / "recipe.yaml").write_text(old_yaml)

    _edit_manifest(run, drop_truncation)
    report = verify(run, console=_quiet())
    assert report.ok, report.differences


def test_training_deterministic_is_strict_and_a_kernel_without_a_deterministic_variant_is_a_recipe_error():
    """training.deterministic: true must not merely warn: in warn-only mode torch keeps the nondeterministic SDPA
    backward kernels on CUDA. An op with no deterministic kernel then stops the run with the recipe's message
    (torch's own text, as its CUDA kernels raise it, since no CPU op raises)."""
    import torch

    from peftkit.runtime import nondeterministic_op_error, seed_everything

    try:
        seed_everything(0, deterministic_cuda=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        with pytest.raises(PeftkitError) as e, nondeterministic_op_error():
            raise RuntimeError("histc_cuda does not have a deterministic implementation, but you set "
                               "'torch.use_deterministic_algorithms(True)'. You can turn off determinism just for "
                               "this operation, or you can use the 'warn_only=True' option, if that's acceptable.")
        assert "training.deterministic: true" in str(e.value) and "(histc_cuda does not have" in str(e.value)
        assert "training.deterministic: false" in str(e.value)
        with pytest.raises(RuntimeError, match="other"), nondeterministic_op_error():
            raise RuntimeError("other")  # anything else passes through
    finally:
        seed_everything(0, deterministic_cuda=False)
    assert torch.are_deterministic_algorithms_enabled() != torch.cuda.is_available()  # on CPU: warn-only


def test_a_divergence_after_a_skipped_step_is_not_named_by_a_wrong_step():
    """A step skipped for a non-finite loss (nan_policy: skip_step) records no loss: the n-th loss is not step n's."""
    from peftkit.reproduced import _first_divergence

    assert _first_divergence([1.0, 2.0, 3.0], [1.0, 2.5, 3.0], 0) == "loss diverges first at step 2: 2.0 recorded, 2.5 now"
    assert _first_divergence([1.0, 2.0, 3.0], [1.0, 2.5, 3.0], 0, skipped=True) == (
        "loss diverges first at loss 2 of those recorded (skipped steps record none): 2.0 recorded, 2.5 now")
    assert _first_divergence([1.0], [1.0, 2.0], 0, skipped=True) == "1 losses recorded, 2 now"


def test_a_re_run_that_fills_the_temporary_directory_says_where_to_make_room(tmp_path):
    """The re-run's own advice was `peftkit train RECIPE --resume`, for a temporary directory deleted by then."""
    from peftkit.fileio import DiskFullError
    from peftkit.verify import VerifyReport, _rerun_failed

    tmp = str(tmp_path / "peftkit-verify-x" / "run")  # (the re-run's directory, inside verify's scratch directory)
    error = DiskFullError(f"No space left on the device while writing {tmp}/checkpoints/step-00000020. The previous "
                          "version of it, if any, is intact; free some disk space, or write somewhere else. The newest "
                          "whole checkpoint is step-00000010: continue with `peftkit train RECIPE --resume`.")
    said = str(_rerun_failed(error, tmp, tmp_path / "run", VerifyReport(run_dir=tmp_path / "run", ok=True)))
    assert said == (f"verify could not re-run the recipe recorded in {tmp_path / 'run' / 'manifest.json'}: No space "
                    "left on the device while writing <verify's temporary directory>/checkpoints/step-00000020. verify "
                    f"re-runs in {tmp_path} (the system's temporary directory, TMPDIR): free space there, or point TMPDIR "
                    "at a directory with room for the run.")


def test_a_checkpoint_saved_before_the_loss_scale_was_compares_without_it(tmp_path):
    """fp16 checkpoints hold the loss scaler's state since December 2026: verify --tolerance of an older fp16 run
    said its training_state.pt differed ('scaler' in one only), whatever the run's numbers."""
    import torch

    from peftkit.reproduced import _close

    state = {"optimizer": {"state": {}, "param_groups": []}, "scheduler": {"last_epoch": 3}}
    scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
              "_growth_tracker": 3}
    torch.save(state, tmp_path / "older.pt")
    torch.save(state | {"scaler": scaler}, tmp_path / "now.pt")
    torch.save(state | {"scaler": scaler | {"scale": 32768.0}}, tmp_path / "other.pt")
    assert _close("training_state.pt", tmp_path / "older.pt", tmp_path / "now.pt", 1e-4) is None
    assert _close("training_state.pt", tmp_path / "other.pt", tmp_path / "now.pt", 1e-4) == (
        "training_state.pt: scaler.scale: 32768.0 recorded, 65536.0 now")
    assert _close("training_state.pt", tmp_path / "now.pt", tmp_path / "older.pt", 1e-4) == (
        "training_state.pt: its keys: ['scaler'] in one only")



def test_a_run_whose_data_train_lists_entries_recorded_before_they_took_a_format_still_verifies(tiny_llama,
                                                                                                 number_data, tmp_path):
    """data.train's entries ({path: ...}) gained `format` (default null): a manifest written before lacks it in each
    entry of the list, whose recorded recipe must still hash as written."""
    recipe = make_recipe(tmp_path, tiny_llama, number_data, data={"train": [{"path": str(number_data["train"])}]},
                         training={"max_steps": 2}, eval={"base_model": False})
    train(load_recipe(recipe), console=_quiet())
    run = tmp_path / "run"

    def drop_entry_formats(manifest):
        as_run = yaml.safe_load((run / "recipe.yaml").read_text())
        for raw in (manifest["recipe"], as_run):
            for entry in raw["data"]["train"]:
                entry.pop("format")
        old_yaml = yaml.safe_dump(as_run, sort_keys=False)
        manifest["recipe_sha256"] = hashlib.sha256(old_yaml.encode()).hexdigest()
        (run / "recipe.yaml").write_text(old_yaml)

    _edit_manifest(run, drop_entry_formats)
    report = verify(run, console=_quiet())
    assert report.ok, report.differences


def test_a_re_run_by_other_peftkit_code_is_said_with_the_same_version_number(run, monkeypatch):
    """The version number stays while peftkit's code changes (a newer checkout): the environment records a digest of
    the package's source, and verify names it where the re-run's differs."""
    import peftkit.manifest
    from peftkit.manifest import read_manifest

    recorded = read_manifest(run).environment.versions["peftkit source"]
    assert recorded == peftkit.manifest.source_digest() and len(recorded) == 16
    monkeypatch.setattr(peftkit.manifest, "source_digest", lambda: "0" * 16)
    report = verify(run, console=_quiet())
    assert f"environment: peftkit source {recorded} recorded, {'0' * 16} now" in report.notes, report.notes


@pytest.mark.parametrize("chunk", [3, 7, 1 << 22])
def test_the_largest_difference_is_found_in_any_chunk(chunk, monkeypatch):
    """verify --tolerance compares tensors in float64 chunks (a whole large embedding took some 25 GB of temporaries):
    the largest difference, a NaN against a number (infinite) and NaNs or infinities on both sides (none) are found
    in whichever chunk they lie, as one comparison of the whole tensors finds them."""
    import torch

    from peftkit import reproduced

    monkeypatch.setattr(reproduced, "DIFFERENCE_CHUNK", chunk)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 4, generator=gen)
    b = a + 1e-4 * torch.randn(5, 4, generator=gen)
    b[4, 2] = a[4, 2] + 0.25  # the largest, in the last chunk
    a[1, 1] = b[1, 1] = float("nan")
    a[2, 0] = b[2, 0] = -float("inf")
    assert reproduced._max_difference(a, b) == pytest.approx(0.25, rel=1e-6)
    assert reproduced._max_difference(a, b) == (a.double() - b.double()).abs().nan_to_num(nan=0.0).max().item()
    b[4, 3] = float("nan")
    assert reproduced._max_difference(a, b) == float("inf")
    assert reproduced._max_difference(torch.zeros(0), torch.zeros(0)) == 0.0


def test_a_checkpoint_s_state_is_compared_as_the_weights_are(monkeypatch):
    """The optimizer's and scheduler's states (`_state_difference`) are compared with the weights' comparison
    (`_max_difference`): in float64 chunks, not a whole float64 copy of each tensor and its difference (an optimizer
    moment of a saved 128k x 4096 embedding: some 16 GB), and a NaN or an infinity on both sides at one place is no
    difference (it was 'max abs diff nan', a difference, between two identical states)."""
    import torch

    from peftkit import reproduced

    monkeypatch.setattr(reproduced, "DIFFERENCE_CHUNK", 3)
    a = torch.arange(20, dtype=torch.float32).reshape(4, 5)
    a[0, 1], a[2, 2] = float("nan"), float("inf")
    state = {"state": {0: {"exp_avg": a, "step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1}]}
    again = {"state": {0: {"exp_avg": a.clone(), "step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1}]}
    assert reproduced._state_difference(state, again, 1e-6) is None
    again["state"][0]["exp_avg"][3, 4] += 0.5  # in the last chunk
    assert reproduced._state_difference(state, again, 1e-6) == "state.0.exp_avg: max abs diff 0.5 > 1e-06"
    again["state"][0]["exp_avg"][0, 1] = 1.0  # a number where the recorded state has NaN
    assert reproduced._state_difference(state, again, 1e-6) == "state.0.exp_avg: max abs diff inf > 1e-06"
