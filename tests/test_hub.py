"""A hub id as the base model: read offline from a Hugging Face cache laid out as the hub client writes it (blobs,
snapshots of commits, refs of branches), by huggingface_hub and transformers themselves; no network."""

import hashlib
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path

import pytest
from huggingface_hub import constants
from safetensors.torch import load_file, save_file

from peftkit.checkpoint import changed_input
from peftkit.data.rows import rows_digest
from peftkit.errors import PeftkitError
from peftkit.fileio import sha256_file
from peftkit.manifest import changed_model_files, model_weight_hashes
from peftkit.recipe import load_recipe
from peftkit.tiny import number_rows, write_jsonl
from peftkit.train import train
from peftkit.verify import verify
from tests.conftest import cli_user_error, make_recipe

REPO = "acme/tiny-llama"


def _publish(cache: Path, files: Path, commit: str) -> None:
    """Put the files of directory `files` in the cache as commit `commit` of REPO, and point its main branch there."""
    _publish_to(cache, REPO, files, commit)


def _publish_to(cache: Path, repo_id: str, files: Path, commit: str) -> None:
    """`_publish` for repository `repo_id`."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in sorted(f for f in files.rglob("*") if f.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / file.relative_to(files)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture
def hub(tiny_llama, tmp_path, monkeypatch) -> Path:
    """An offline hub cache holding tiny_llama as REPO's main (both libraries read these settings at each call)."""
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _publish(cache, tiny_llama, "a" * 40)
    return cache


def test_a_hub_models_files_are_recorded_and_a_moved_branch_is_refused_on_resume_and_reported_by_verify(
        hub, tiny_llama, number_data, tmp_path):
    """The manifest and the checkpoints hash the cached files the run loaded (they recorded nothing for a hub id, so
    --resume and verify could not tell another base). Once main moves to a commit with other weights, --resume is
    refused and verify names the base model's changed file and the fix."""
    recipe = load_recipe(make_recipe(tmp_path, Path(REPO), number_data, training={"max_steps": 2, "save_steps": 2}))
    assert recipe.model.name_or_path == REPO
    train(recipe)
    run = tmp_path / "run"
    expected = {f.name: sha256_file(f) for f in tiny_llama.iterdir()
                if f.suffix == ".safetensors" or f.name in ("config.json", "tokenizer.json", "tokenizer_config.json",
                                                            "chat_template.jinja", "generation_config.json")}
    assert json.loads((run / "manifest.json").read_text())["base_model_sha256"] == expected
    checksums = json.loads((run / "checkpoints" / "step-00000002" / "checksums.json").read_text())
    assert checksums["inputs"]["model.name_or_path"] == expected
    # The commit that loaded is recorded, and the adapter names it: what loads the adapter later loads this base.
    assert json.loads((run / "manifest.json").read_text())["base_model_commit"] == "a" * 40
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["revision"] == "a" * 40
    final = json.loads((run / "manifest.json").read_text())["metrics"]["eval_loss"]

    moved = tmp_path / "moved"
    moved.mkdir()
    for file in tiny_llama.iterdir():
        (moved / file.name).write_bytes(file.read_bytes())
    weights = load_file(moved / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] + 0.5
    save_file(weights, moved / "model.safetensors", metadata={"format": "pt"})
    _publish(hub, moved, "b" * 40)
    assert model_weight_hashes(REPO)["model.safetensors"] == sha256_file(moved / "model.safetensors")
    assert model_weight_hashes(REPO, "a" * 40) == expected  # a commit stays what it was

    with pytest.raises(PeftkitError, match="model.name_or_path file model.safetensors changed since checkpoint .* The "
                                           f"branch or tag of {REPO} that model.revision names moved on: set "
                                           "model.revision to the commit the run began with"):
        train(recipe, resume=True)
    report = verify(run)
    assert not report.ok
    assert (f"base model: its files differ from the recorded ones ({REPO}: model.safetensors changed); the re-run "
            f"loaded revision 'main' from the hub, a branch or tag that has moved: pin model.revision to a commit "
            f"({'a' * 40} is the run's)" in report.differences)
    # `peftkit eval RUN` scores the adapter on the base it was trained on, not on main's new weights.
    from typer.testing import CliRunner

    from peftkit.cli import app

    result = CliRunner().invoke(app, ["eval", str(run)], catch_exceptions=False)
    assert float(result.output.split()[1]) == pytest.approx(final, abs=1e-4), result.output  # (main now: 4.3575)
    # Pinned to the run's commit, the same run verifies.
    pinned = load_recipe(make_recipe(tmp_path / "pinned", Path(REPO), number_data, training={"max_steps": 2}))
    pinned.model.revision = "a" * 40
    train(pinned)
    assert verify(tmp_path / "pinned" / "run").ok


def _eval_loss(run: Path) -> tuple[float, str]:
    """`peftkit eval RUN`'s loss, and what it said on stderr."""
    from typer.testing import CliRunner

    from peftkit.cli import app

    result = CliRunner().invoke(app, ["eval", str(run)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return float(result.stdout.split()[1]), result.stderr


def test_a_run_at_a_named_branch_is_evaluated_and_verified_at_the_commit_it_loaded(hub, tiny_llama, number_data,
                                                                                  tmp_path):
    """A recipe naming `model.revision: main`: `peftkit eval RUN` loads the commit the run was trained on (weights and
    tokenizer), saying so once main has moved; verify after a move that changed none of the model's files re-runs
    at the run's commit and finds the same bits."""
    recipe = load_recipe(make_recipe(tmp_path, Path(REPO), number_data, training={"max_steps": 2, "save_steps": 1}))
    recipe.model.revision = "main"
    train(recipe)
    run = tmp_path / "run"
    final = json.loads((run / "manifest.json").read_text())["metrics"]["eval_loss"]
    loss, said = _eval_loss(run)
    assert loss == pytest.approx(final, abs=1e-4) and "warning" not in said

    _publish(hub, tiny_llama, "b" * 40)  # main moves to a commit with the same files
    report = verify(run)
    assert report.ok, report.differences
    assert (f"model.revision 'main' of {REPO} has moved from the run's commit {'a' * 40} to {'b' * 40}, which has the "
            f"same weight, config and tokenizer files: the re-run loaded {'a' * 40}, as the run did (pin model.revision to it "
            "to say so in the recipe)") in report.notes

    retokenized = tmp_path / "retokenized"  # main moves to a tokenizer that gives 'e' and 't' each other's ids
    retokenized.mkdir()
    for file in tiny_llama.iterdir():
        (retokenized / file.name).write_bytes(file.read_bytes())
    tokenizer = json.loads((tiny_llama / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["e"], vocab["t"] = vocab["t"], vocab["e"]
    (retokenized / "tokenizer.json").write_text(json.dumps(tokenizer))
    _publish(hub, retokenized, "c" * 40)
    loss, said = _eval_loss(run)
    assert loss == pytest.approx(final, abs=1e-4)  # (main's tokenizer: another loss)
    assert (f"was trained on {REPO} at commit {'a' * 40}, which model.revision 'main' named then; it names {'c' * 40} "
            f"now. Loading {'a' * 40}, the base the adapter was trained on.") in " ".join(said.split())
    # Another branch, or another commit's short hash, is not what the adapter was trained on: refused, as before.
    from peftkit.adapter_base import base_revision

    (hub / "models--acme--tiny-llama" / "refs" / "v2").write_text("c" * 40)
    adapter = str(run / "adapter")
    for asked in ("v2", "ccccccc"):
        with pytest.raises(PeftkitError, match=f"trained on {REPO} at revision {'a' * 40}, and the recipe's "
                                               f"model.revision is {asked}: drop model.revision"):
            base_revision(adapter, REPO, REPO, "a" * 40, asked)
    assert base_revision(adapter, REPO, REPO, "a" * 40, "aaaaaaa") == "a" * 40
    (hub / "models--acme--tiny-llama" / "refs" / "v1").write_text("a" * 40)  # a tag at the commit: that commit
    assert base_revision(adapter, REPO, REPO, "a" * 40, "v1") == "a" * 40


def test_a_record_without_hashes_is_not_a_change():
    """Runs on a hub id recorded {} before its files were hashed: nothing to compare, not every file new."""
    assert changed_model_files({}, {"model.safetensors": "0" * 64}) == []
    assert changed_model_files({"model.safetensors": "0" * 64}, {}) == [("model.safetensors", "is gone")]


DATASET = "acme/numbers"


def _publish_dataset(cache: Path, rows: list[dict], commit: str, tmp_path: Path, test_rows: list[dict] | None = None,
                     ) -> None:
    """Put `rows` (and `test_rows` as a test split) in the datasets cache as commit `commit` of DATASET, as a load of
    it from the hub leaves them (its prepared arrow files and info); offline, `datasets` reads the newest commit there
    (whatever the revision asked)."""
    import shutil

    import datasets

    target = cache / DATASET.replace("/", "___") / "default" / "0.0.0" / commit
    target.mkdir(parents=True)
    info = {}
    for split, split_rows in (("train", rows), ("test", test_rows)):
        if split_rows is None:
            continue
        source = tmp_path / f"rows-{commit[:4]}-{split}.jsonl"
        write_jsonl(source, split_rows)
        built = datasets.load_dataset("json", data_files=str(source), split="train",
                                      cache_dir=str(tmp_path / f"{commit[:4]}-{split}"))
        prepared = Path(built.cache_files[0]["filename"]).parent
        made = json.loads((prepared / "dataset_info.json").read_text())
        info = made | {"splits": info.get("splits", {}) | {split: made["splits"]["train"] | {"name": split}}}
        shutil.copy(prepared / "json-train.arrow", target / f"{DATASET.split('/')[1]}-{split}.arrow")
    (target / "dataset_info.json").write_text(json.dumps(info | {"dataset_name": DATASET.split("/")[1]}))
    os.utime(target, (time.time() + len(os.listdir(target.parent)), ) * 2)  # the newest commit is the newest dir


@pytest.fixture
def hub_dataset(tmp_path, monkeypatch) -> Path:
    """An offline datasets cache holding number rows as DATASET's main."""
    import datasets

    cache = tmp_path / "datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    _publish_dataset(cache, number_rows(64, seed=1), "a" * 40, tmp_path)
    return cache


def test_a_hub_datasets_rows_are_recorded_and_other_rows_are_refused_on_resume_and_reported_by_verify(
        hub_dataset, tiny_llama, number_data, tmp_path):
    """A hub dataset has no file of its own to hash, and runs on one recorded {}: --resume continued on whatever
    main had become, and verify could not say why a loss diverged. A run records a digest of the rows it read."""
    recipe = load_recipe(make_recipe(tmp_path, tiny_llama, {"train": DATASET, "eval": number_data["eval"]},
                                     training={"max_steps": 2, "save_steps": 2}))
    train(recipe)
    run = tmp_path / "run"
    expected = {"rows": rows_digest(number_rows(64, seed=1))}
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["data_sha256"]["train"] == expected and manifest["data_commits"] == {"train": "a" * 40}
    checksums = json.loads((run / "checkpoints" / "step-00000002" / "checksums.json").read_text())
    assert checksums["inputs"]["data.train"] == expected
    assert verify(run).ok

    rows = number_rows(64, seed=1)
    rows[5]["output"] = "five"
    _publish_dataset(hub_dataset, rows, "b" * 40, tmp_path)
    with pytest.raises(PeftkitError, match="data.train: the rows read from the hub changed since checkpoint "
                                           "step-00000002 was written. .* A hub dataset's branch moved on: run without "
                                           "--resume and with --overwrite to start afresh"):
        train(recipe, resume=True)
    report = verify(run)
    assert not report.ok
    assert (f"data.train: the rows the re-run read from hub dataset '{DATASET}' (revision 'main', the run read commit "
            f"{'a' * 40}, the re-run commit {'b' * 40}) differ from the recorded ones, a branch that has moved: pin "
            f"data.revision to a commit ({'a' * 40} is the run's)") in report.differences


def test_a_record_without_rows_is_not_a_change_on_resume():
    """A checkpoint from before the rows were hashed holds {} for a hub dataset: nothing to compare."""
    assert changed_input({"data.train": {}}, {"data.train": {"rows": "0" * 64}}) is None
    assert changed_input({"data.train": {"rows": "1" * 64}}, {"data.train": {"rows": "0" * 64}}) == (
        "data.train: the rows read from the hub changed")


def test_data_revision_of_local_files_or_of_two_hub_datasets_is_a_recipe_error(tiny_llama, number_data, tmp_path):
    with pytest.raises(PeftkitError, match=r"data.revision: a revision of a hub dataset, and data.train and "
                                           r"data.eval are local files; remove data.revision"):
        load_recipe(make_recipe(tmp_path, tiny_llama, number_data, data={"revision": "main"}))
    with pytest.raises(PeftkitError, match=r"data.revision: one revision for two hub datasets \(acme/a, acme/b\)"):
        load_recipe(make_recipe(tmp_path, tiny_llama, {"train": "acme/a", "eval": "acme/b"}, data={"revision": "v1"}))


def test_data_revision_stays_with_the_recipe_s_datasets(tiny_llama, tmp_path):
    """`peftkit eval RECIPE --data OTHER`: the recipe's data.revision is its own datasets', not OTHER's."""
    from peftkit.decoding import Sampling
    from peftkit.eval_job import eval_job
    from peftkit.generate import generate_job

    recipe = make_recipe(tmp_path, tiny_llama, {"train": DATASET, "eval": DATASET}, data={"revision": "c" * 40})
    assert eval_job(recipe, [], None, None, None, None, None, None, None).data_cfg.revision == "c" * 40
    assert eval_job(recipe, [], None, "acme/other", None, None, None, None, None).data_cfg.revision is None
    job = generate_job(recipe, [], None, None, [], "acme/other", None, False, None, Sampling(), 8)
    assert job.data_cfg.revision is None
    # a hub dataset of data.train's list is one of the recipe's datasets: read at data.revision
    (tmp_path / "local.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    mix = make_recipe(tmp_path / "mix", tiny_llama, {"train": DATASET, "eval": DATASET},
                      data={"train": [str(tmp_path / "local.jsonl"), DATASET], "eval": str(tmp_path / "local.jsonl"),
                            "revision": "c" * 40})
    assert eval_job(mix, [], None, DATASET, None, None, None, None, None).data_cfg.revision == "c" * 40
    job = generate_job(mix, [], None, None, [], DATASET, None, False, None, Sampling(), 8)
    assert job.data_cfg.revision == "c" * 40


def test_eval_and_generate_read_the_hub_split_and_revision_given_on_the_command_line(tiny_llama, tmp_path, monkeypatch):
    """`--data DATASET --split test` reads that split (it read train, whatever the user wanted), and --data-revision
    pins it; both are refused for a local file."""
    import datasets
    from typer.testing import CliRunner

    from peftkit.cli import app
    from peftkit.eval_job import eval_job

    cache = tmp_path / "datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    _publish_dataset(cache, number_rows(64, seed=1), "a" * 40, tmp_path, test_rows=number_rows(6, seed=5))
    write_jsonl(tmp_path / "test.jsonl", number_rows(6, seed=5))

    def run(*args: str) -> str:
        result = CliRunner().invoke(app, [*args, "--model", str(tiny_llama)])
        assert result.exit_code == 0, result.output
        return result.output

    def evaluated(*args: str) -> dict:
        run("eval", *args, "--json", str(tmp_path / "e.json"))
        return json.loads((tmp_path / "e.json").read_text())

    assert evaluated("--data", DATASET, "--split", "test") == evaluated("--data", str(tmp_path / "test.jsonl"))
    assert evaluated("--data", DATASET)["num_tokens"] != evaluated("--data", str(tmp_path / "test.jsonl"))["num_tokens"]
    generated = []
    for data in (["--data", DATASET, "--split", "test"], ["--data", str(tmp_path / "test.jsonl")]):
        run("generate", *data, "--limit", "2", "--max-new-tokens", "2", "--json", str(tmp_path / "g.json"))
        generated.append(json.loads((tmp_path / "g.json").read_text()))
    assert generated[0] == generated[1]
    job = eval_job(None, [], str(tiny_llama), DATASET, None, None, None, None, None, data_revision="v1", split="test")
    assert (job.split, job.data_cfg.revision) == ("test", "v1")
    for flag, message in (("--data-revision", "--data-revision picks what is read of a hub dataset given with "
                                               f"--data; {tmp_path / 'test.jsonl'} is a local file."),
                          ("--split", f"Data file {tmp_path / 'test.jsonl'}: split 'x[:1]': Unknown split \"x\". "
                                      "Should be one of ['train']. A local file is one split, 'train', which may be "
                                      "sliced")):
        result = CliRunner().invoke(app, ["eval", "--model", str(tiny_llama), "--data", str(tmp_path / "test.jsonl"),
                                          flag, "x" if flag == "--data-revision" else "x[:1]"])
        assert isinstance(result.exception, PeftkitError)  # the CLI's entry point prints it, exit status 2
        assert str(result.exception).startswith(message)


def test_the_rows_digest_counts_images_and_bytes_by_content():
    """A PIL image's repr holds its memory address: digested by repr, the same rows gave another digest in every
    process, and every --resume on such a dataset was refused."""
    from PIL import Image

    def rows(color):
        return [{"text": "a", "image": Image.new("RGB", (2, 2), color), "raw": b"\x00\x01"}]

    assert rows_digest(rows("red")) == rows_digest(rows("red")) != rows_digest(rows("blue"))


def test_a_pinned_dataset_commit_that_was_not_read_is_refused(hub_dataset, tiny_llama, number_data, tmp_path,
                                                              monkeypatch):
    """Offline, `datasets` reads the newest cached copy whatever the revision: a run pinned to commit a trained on
    commit b's rows, recorded both, and verify vouched for it (its re-run read b again). A pinned commit not read is
    an error; a branch or tag that offline cannot be resolved is a warning naming the commit read."""
    from peftkit.data import load_examples
    from peftkit.errors import PeftkitWarning
    from peftkit.modeling import load_tokenizer
    from peftkit.recipe import DataConfig, ModelConfig

    _publish_dataset(hub_dataset, number_rows(64, seed=7), "b" * 40, tmp_path)
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_llama)))
    with pytest.raises(PeftkitError, match=f"Hub dataset '{DATASET}': revision {'a' * 40} was asked and `datasets` "
                                           f"read commit {'b' * 40} from its cache \\(offline it reads the newest cached "
                                           "copy, whatever the revision\\). The cache holds that commit too: read it "
                                           f"online, or pin the commit read \\({'b' * 40}\\)"):
        load_examples(tok, DATASET, "train", DataConfig(train=DATASET, revision="a" * 40))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # what the user set is what to unset
    with pytest.raises(PeftkitError, match="read it online \\(unset HF_DATASETS_OFFLINE\\), or pin"):
        load_examples(tok, DATASET, "train", DataConfig(train=DATASET, revision="a" * 40))
    with pytest.raises(PeftkitError, match=f"revision aaaaaaa was asked and `datasets` read commit {'b' * 40}"):
        load_examples(tok, DATASET, "train", DataConfig(train=DATASET, revision="aaaaaaa"))  # a short hash: a commit
    with pytest.raises(PeftkitError, match=f"revision {'c' * 40} was asked .* Read it once online"):
        load_examples(tok, DATASET, "train", DataConfig(train=DATASET, revision="c" * 40))
    with pytest.warns(PeftkitWarning, match=f"hub dataset '{DATASET}': offline, `datasets` reads the newest cached copy "
                                            f"whatever the revision, and revision 'v1' cannot be resolved; it read "
                                            f"commit {'b' * 40}"):
        load_examples(tok, DATASET, "train", DataConfig(train=DATASET, revision="v1"))
    assert len(load_examples(tok, DATASET, "train", DataConfig(train=DATASET, revision="b" * 40))[0]) == 64
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the short hash of the commit read is that commit
        assert len(load_examples(tok, DATASET, "train", DataConfig(train=DATASET, revision="bbbbbbbb"))[0]) == 64


def test_what_the_cache_lacks_is_said_offline(hub, tiny_llama, tmp_path):
    """transformers says "check your internet connection" for all of these, with offline mode on and the repository
    cached; a missing weights or tokenizer file got advice about use_safetensors or sentencepiece."""
    from peftkit.modeling import load_model, load_tokenizer
    from peftkit.peft_format import check_adapter_dir
    from peftkit.recipe import ModelConfig

    def refused(name: str, revision: str | None = None, tokenizer: bool = False) -> str:
        cfg = ModelConfig(name_or_path=name, revision=revision)
        with pytest.raises(PeftkitError) as e:
            load_tokenizer(cfg) if tokenizer else load_model(cfg, None)
        return str(e.value)

    assert refused(REPO, "v2") == (
        f"Could not load model {REPO}: revision 'v2' is not in the local Hugging Face cache "
        f"({hub / 'models--acme--tiny-llama'}), which holds 'main', {'a' * 40}, and HF_HUB_OFFLINE is set, so nothing "
        "is downloaded. Ask for a revision it holds, or unset HF_HUB_OFFLINE to download this one.")
    assert refused(REPO, "b" * 40) == (  # a commit, as a run pins one: no other revision will do
        f"Could not load model {REPO}: commit {'b' * 40} is not in the local Hugging Face cache "
        f"({hub / 'models--acme--tiny-llama'}), which holds 'main', {'a' * 40}, and HF_HUB_OFFLINE is set, so nothing "
        "is downloaded. Only that commit has the files pinned: unset HF_HUB_OFFLINE to download this one, or copy its "
        "snapshot into this cache.")
    assert refused("acme/tiny-lama") == (
        f"Could not load model acme/tiny-lama: it is not in the local Hugging Face cache ({hub}), and HF_HUB_OFFLINE "
        f"is set, so nothing is downloaded. Did you mean '{REPO}'? Check the id, or unset HF_HUB_OFFLINE to download it.")
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in tiny_llama.iterdir():
        if file.suffix != ".safetensors" and not file.name.startswith(("tokenizer", "chat_template")):
            (broken / file.name).write_bytes(file.read_bytes())
    (broken / "pytorch_model.bin").write_bytes(b"pickled")
    for name, where in (("acme/broken", None), (str(broken), broken)):
        if where is None:
            _publish_to(hub, name, broken, "d" * 40)
            where = hub / "models--acme--broken" / "snapshots" / ("d" * 40)
        assert refused(name) == (
            f"Could not load model {name}: {where} holds no .safetensors weights (only pytorch_model.bin); peftkit "
            "reads safetensors weights only (loading never unpickles). Use a copy of the model in safetensors, or save "
            "one with transformers' save_pretrained.")
        assert refused(name, tokenizer=True).startswith(
            f"Could not load a tokenizer from {name}: {where} holds none of its files (tokenizer.json, ")
    with pytest.raises(PeftkitError, match=r"Adapter directory not found: acme/adapter. An adapter is read from a "
                                           r"local directory; for one on the Hugging Face hub, the peftkit commands "
                                           r"take its id \(--adapter acme/adapter\), and "
                                           r"`peftkit.hub.hub_adapter\('acme/adapter'\)` gives its directory."):
        check_adapter_dir(Path("acme/adapter"))
    with pytest.raises(PeftkitError, match=r"^Adapter directory not found: a\.\.b/c$"):  # (no hub id: not told to
        check_adapter_dir(Path("a..b/c"))                                                 # fetch it from the hub)


def test_an_unknown_split_names_the_splits_there(hub_dataset):
    from peftkit.data import load_rows

    with pytest.raises(PeftkitError) as e:
        load_rows(DATASET, "validation")
    assert (f"Could not load dataset '{DATASET}' (split 'validation') from the hub: Unknown split \"validation\". "
            "Should be one of ['train']. A name that is no local path is read as a hub id: for local data, give a "
            "file with its extension (.jsonl, .json, .csv, .parquet, .txt) or a directory save_to_disk wrote, that "
            "exists (a recipe's relative to its directory).") in str(e.value)
    with pytest.raises(PeftkitError) as e:  # a mistyped saved dataset's directory: no such path, so a hub id
        load_rows("data/numbers-saved", "train")
    assert str(e.value).startswith("Could not load dataset 'data/numbers-saved' (split 'train') from the hub: ")
    assert "or a directory save_to_disk wrote, that exists" in str(e.value)


def test_adapters_of_one_hub_base_combine_when_one_records_no_revision(hub, tiny_llama, tmp_path):
    """An adapter saved before the commit of a hub base was recorded (revision null) combines with one that records
    it, on that commit, said; two commits are two bases."""
    from peftkit.combine_inputs import Combination
    from peftkit.combine_adapters import combine_adapters
    from peftkit.errors import PeftkitWarning
    from peftkit.methods.lora import LoraConfig
    from tests.test_combine import LLAMA_TARGETS, make_adapter

    dirs = []
    for seed, revision in ((1, None), (2, "a" * 40)):
        made = Path(make_adapter(tiny_llama, LoraConfig(r=4, alpha=8, target_modules=LLAMA_TARGETS), seed,
                                 tmp_path / f"a{seed}"))
        config = json.loads((made / "adapter_config.json").read_text())
        (made / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": REPO,
                                                                       "revision": revision}))
        dirs.append(str(made))
    with pytest.warns(PeftkitWarning, match=f"{dirs[0]} records no revision of {REPO} .*combining on {'a' * 40}, the "
                                            f"commit {dirs[1]} was trained on"):
        combine_adapters(dirs, Combination("linear", (0.5, 0.5)), str(tmp_path / "both"))
    assert json.loads((tmp_path / "both" / "adapter_config.json").read_text())["revision"] == "a" * 40
    config = json.loads((Path(dirs[0]) / "adapter_config.json").read_text())
    (Path(dirs[0]) / "adapter_config.json").write_text(json.dumps(config | {"revision": "b" * 40}))
    with pytest.raises(PeftkitError, match="The adapters were trained on different bases"):
        combine_adapters(dirs, Combination("linear", (0.5, 0.5)), str(tmp_path / "other"))


def _adapters_recording(tiny_llama, tmp_path, revisions) -> list[str]:
    """LoRA adapters of `tiny_llama` (seeds 1, 2, ...) whose adapter_config.json records REPO at each revision."""
    from peftkit.methods.lora import LoraConfig
    from tests.test_combine import make_adapter

    dirs = []
    for seed, revision in enumerate(revisions, 1):
        made = Path(make_adapter(tiny_llama, LoraConfig(r=4, alpha=8, target_modules=["q_proj"]), seed,
                                 tmp_path / f"a{seed}"))
        config = json.loads((made / "adapter_config.json").read_text())
        (made / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": REPO,
                                                                       "revision": revision}))
        dirs.append(str(made))
    return dirs


def test_combining_with_base_named_as_recorded_keeps_the_recorded_commit(hub, tiny_llama, tmp_path):
    """`peftkit merge --base REPO`, REPO the base the adapters record at commit a while main has moved to b: the
    recorded commit was dropped (the combined adapter recorded none, so it loaded on b, and --into-base merged into
    b's weights). Two commits of the --base among the inputs are two bases, as without --base."""
    from peftkit.combine_adapters import combine_adapters
    from peftkit.combine_inputs import Combination

    _publish_to(hub, REPO, tiny_llama, "b" * 40)
    dirs = _adapters_recording(tiny_llama, tmp_path, ["a" * 40, "a" * 40])
    out = combine_adapters(dirs, Combination("cat", (0.5, 0.5)), str(tmp_path / "both"), base=REPO)
    assert json.loads((out / "adapter_config.json").read_text())["revision"] == "a" * 40
    config = json.loads((Path(dirs[1]) / "adapter_config.json").read_text())
    (Path(dirs[1]) / "adapter_config.json").write_text(json.dumps(config | {"revision": "b" * 40}))
    with pytest.raises(PeftkitError, match=f"{dirs[1]} was trained on {REPO} at revision {'b' * 40}, {dirs[0]} at "
                                           f"revision {'a' * 40}: only adapters of one base combine, at one commit"):
        combine_adapters(dirs, Combination("cat", (0.5, 0.5)), str(tmp_path / "other"), base=REPO)


def test_a_fusion_of_adapters_of_another_commit_of_its_hub_base_is_refused(hub, tiny_llama, number_data, tmp_path):
    """adapter.fuse adapters recording commit a of REPO, main moved to b: the fusion trained on b's weights without a
    word; with model.revision a it trains."""

    dirs = _adapters_recording(tiny_llama, tmp_path, ["a" * 40, "a" * 40])
    _publish_to(hub, REPO, tiny_llama, "b" * 40)
    path = make_recipe(tmp_path, Path(REPO), number_data, training={"max_steps": 1})
    import yaml

    data = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump(data | {"adapter": {"method": "fusion", "fuse": dirs}}, sort_keys=False))
    with pytest.raises(PeftkitError, match=f"adapter.fuse: the adapters were trained on {REPO} at commit {'a' * 40}, "
                                           f"and this run loaded commit {'b' * 40} .model.revision main.. .*set "
                                           f"model.revision: {'a' * 40}"):
        train(load_recipe(path))
    train(load_recipe(path, [f"model.revision={'a' * 40}"]))
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


def test_named_adapters_of_two_commits_of_one_hub_base_are_refused(hub, tiny_llama, tmp_path):
    """Named adapters share the base loaded at the first one's commit: one trained on another commit was put on it
    without a word (combining refuses such adapters); one that records no revision loads, as combining takes it."""
    from peftkit.adapters.named import load_named_model

    _publish_to(hub, REPO, tiny_llama, "b" * 40)
    dirs = _adapters_recording(tiny_llama, tmp_path, ["a" * 40, "b" * 40, None])
    with pytest.raises(PeftkitError, match=f"Adapter 'y' .* was trained on {REPO} at revision {'b' * 40}, adapter 'x' "
                                           f"at revision {'a' * 40}: adapters in one model share one base, at one "
                                           "commit"):
        load_named_model([("x", dirs[0]), ("y", dirs[1])])
    assert load_named_model([("x", dirs[0]), ("z", dirs[2])])[1].names == ["x", "z"]


def test_a_hub_adapter_is_read_from_the_hub_cache_by_every_command(hub, tiny_llama, number_data, tmp_path,
                                                                  monkeypatch, capsys):
    """`--adapter user/name[@REV]` that is no local path is a hub adapter: fetched into the Hugging Face cache (here,
    offline, read from it) and used as the same directory would be: eval, generate, merge and inspect give what the
    local copy gives; what the cache lacks is said."""
    from typer.testing import CliRunner

    from peftkit.cli import app
    from tests.conftest import cli_user_error

    recipe = load_recipe(make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 2}))
    train(recipe)
    local = tmp_path / "run" / "adapter"
    _publish_to(hub, "acme/tiny-lora", local, "e" * 40)
    from peftkit.methods.lora import LoraConfig
    from tests.test_combine import LLAMA_TARGETS, make_adapter

    make_adapter(tiny_llama, LoraConfig(r=4, alpha=8, target_modules=LLAMA_TARGETS), 3, tmp_path / "other-adapter")
    runner = CliRunner()

    def said(*args: str) -> str:
        result = runner.invoke(app, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.stdout

    data = ["--model", str(tiny_llama), "--data", str(number_data["eval"])]
    expected = said("eval", *data, "--adapter", str(local))
    assert said("eval", *data, "--adapter", "acme/tiny-lora") == expected
    assert said("eval", *data, "--adapter", f"acme/tiny-lora@{'e' * 40}") == expected
    prompt = ["generate", "--model", str(tiny_llama), "--prompt", "1 plus 2", "--max-new-tokens", "5"]
    assert said(*prompt, "--adapter", "acme/tiny-lora") == said(*prompt, "--adapter", str(local))
    said("merge", "--adapter", "acme/tiny-lora", "--base", str(tiny_llama), "--output", str(tmp_path / "merged"))
    said("merge", "--adapter", str(local), "--base", str(tiny_llama), "--output", str(tmp_path / "merged-local"))
    merged, merged_local = (load_file(tmp_path / d / "model.safetensors") for d in ("merged", "merged-local"))
    assert merged.keys() == merged_local.keys() and all(merged[k].equal(merged_local[k]) for k in merged)
    snapshot = hub / "models--acme--tiny-lora" / "snapshots" / ("e" * 40)
    assert said("inspect", "acme/tiny-lora", "--json") == said("inspect", str(snapshot), "--json")
    assert json.loads(said("inspect", "acme/tiny-lora", "--json"))["peft_type"] == "LORA"

    several = tmp_path / "several"  # a repository of two adapters in subfolders
    shutil.copytree(local, several / "first")
    shutil.copytree(tmp_path / "other-adapter", several / "second")
    _publish_to(hub, "acme/several", several, "f" * 40)
    assert said("eval", *data, "--adapter", "acme/several/first") == expected
    assert said("eval", *data, "--adapter", f"acme/several/second@{'f' * 40}") == \
        said("eval", *data, "--adapter", str(tmp_path / "other-adapter"))
    err = cli_user_error(monkeypatch, capsys, "eval", *data, "--adapter", "acme/several/third")
    assert "Adapter acme/several/third: hub repository acme/several has no adapter files in third/ (" in err
    err = cli_user_error(monkeypatch, capsys, "eval", *data, "--adapter", "acme/tiny-lorra")
    assert "Adapter acme/tiny-lorra: no such local directory, and of hub adapter acme/tiny-lorra, it is not in the " \
           "local Hugging Face cache" in " ".join(err.split())
    assert "Did you mean 'acme/tiny-lora'?" in " ".join(err.split()), err
    err = cli_user_error(monkeypatch, capsys, "eval", *data, "--adapter", "acme/tiny-lora@v2")
    assert (f"revision 'v2' is not in the local Hugging Face cache ({hub / 'models--acme--tiny-lora'}), which holds "
            f"'main', {'e' * 40}, and HF_HUB_OFFLINE is set, so nothing is downloaded.") in " ".join(err.split()), err


def test_a_hub_adapter_brings_the_chat_template_it_was_trained_with(hub, tiny_llama, tmp_path, monkeypatch):
    """A run with data.chat_template keeps it in adapter/chat_template.jinja, which `--adapter DIR` uses in place of
    the base tokenizer's own; fetched from the hub, the adapter has it too (it was left behind)."""
    from peftkit.data.chat_templates import CHATML, adapter_template
    from peftkit.hub import hub_adapter
    from peftkit.inference import ModelSource
    from peftkit.methods.lora import LoraConfig
    from peftkit.recipe import ModelConfig
    from tests.test_combine import LLAMA_TARGETS, make_adapter

    local = tmp_path / "adapter"
    make_adapter(tiny_llama, LoraConfig(r=4, alpha=8, target_modules=LLAMA_TARGETS), 3, local)
    (local / "chat_template.jinja").write_text(CHATML)
    _publish_to(hub, "acme/chatml-lora", local, "c" * 40)
    import huggingface_hub

    asked, fetch = [], huggingface_hub.snapshot_download  # offline the whole cached snapshot comes back: what is
    monkeypatch.setattr(huggingface_hub, "snapshot_download",  # asked for is what an online fetch downloads
                        lambda *a, **k: asked.append(k["allow_patterns"]) or fetch(*a, **k))
    assert adapter_template(hub_adapter("acme/chatml-lora")) == CHATML
    assert "chat_template.jinja" in asked[0]
    source = ModelSource(ModelConfig(name_or_path=str(tiny_llama)), adapter=hub_adapter("acme/chatml-lora"))
    assert source.tokenizer().chat_template == CHATML


def _fetch_as_online(monkeypatch, hub: Path, into: Path) -> None:
    """huggingface_hub's snapshot_download as it fetches online: the files of the repository's snapshot in the cache
    `hub` that `allow_patterns` match, those alone, copied to a fresh directory under `into` (offline, the whole
    cached snapshot comes back, whatever was asked)."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    def fetch(repo_id, revision=None, allow_patterns=None):
        repo = hub / f"models--{repo_id.replace('/', '--')}"
        snapshot = repo / "snapshots" / (revision or (repo / "refs" / "main").read_text())
        files = [f.relative_to(snapshot).as_posix() for f in snapshot.rglob("*") if f.is_file()]
        target = into / str(len(list(into.glob("*")))) if into.is_dir() else into / "0"
        for name in filter_repo_objects(files, allow_patterns=allow_patterns):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(snapshot / name, target / name)
        return str(target)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fetch)


MARKERS = ["<|im_start|>", "<|im_end|>"]


def _new_token_adapter(tiny_llama, local: Path) -> Path:
    """peft's adapter for tiny_llama with MARKERS added (ids 102 and 103; TRL's setup_chat_format), its tokenizer
    saved beside it, as Trainer saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from tests.conftest import load_fp32

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.add_special_tokens({"additional_special_tokens": MARKERS})
    base = load_fp32(tiny_llama)
    base.resize_token_embeddings(len(tok))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False,
                        trainable_token_indices={"embed_tokens": [102, 103], "lm_head": [102, 103]})
    get_peft_model(base, config).save_pretrained(local)
    tok.save_pretrained(local)
    return local


def test_a_hub_adapter_of_peft_with_new_tokens_brings_its_tokenizer(hub, tiny_llama, number_data, tmp_path,
                                                                   monkeypatch):
    """peft's adapter for a base with new tokens (TRL's setup_chat_format: the tokenizer saved beside it) tells them by
    that tokenizer: fetched from the hub, the tokenizer's files come with the adapter's (the adapter's alone came: the
    tokens were missing, and the adapter did not load), and eval gives what the local directory gives."""
    from typer.testing import CliRunner

    from peftkit.cli import app
    from peftkit.hub import hub_adapter
    from peftkit.inference import ModelSource
    from peftkit.recipe import ModelConfig

    markers = MARKERS
    local = _new_token_adapter(tiny_llama, tmp_path / "peft-adapter")
    (local / "README.md").write_text("a model card")
    _publish_to(hub, "acme/chatml-peft", local, "d" * 40)
    _fetch_as_online(monkeypatch, hub, tmp_path / "fetched")

    fetched = Path(hub_adapter("acme/chatml-peft"))
    assert {"tokenizer.json", "tokenizer_config.json", "adapter_config.json"} <= {f.name for f in fetched.iterdir()}
    assert not (fetched / "README.md").exists()  # what the adapter is not read from stays on the hub
    tokenizer = ModelSource(ModelConfig(name_or_path=str(tiny_llama)), adapter=str(fetched)).tokenizer()
    assert tokenizer.convert_tokens_to_ids(markers) == [102, 103]
    runner = CliRunner()
    data = ["eval", "--model", str(tiny_llama), "--data", str(number_data["eval"]), "--adapter"]
    local_eval, hub_eval = (runner.invoke(app, [*data, adapter], catch_exceptions=False)
                            for adapter in (str(local), "acme/chatml-peft"))
    assert local_eval.exit_code == 0 and hub_eval.exit_code == 0, local_eval.output + hub_eval.output
    assert hub_eval.stdout == local_eval.stdout


def test_a_new_token_adapter_cached_without_its_tokenizer_says_what_is_missing(hub, tiny_llama, number_data, tmp_path,
                                                                              monkeypatch, capsys):
    """An offline cache filled before peftkit fetched the tokenizer files beside a hub adapter holds the new-token
    adapter's files alone: loading it failed with "token id 102 is past the 102 rows", not saying why; it says the
    tokenizer files are missing and how to fetch them, and with them fetched into the snapshot (what that does) eval
    gives what the local directory gives. A local directory without them is told to get them back."""
    from tests.conftest import cli_user_error

    local = _new_token_adapter(tiny_llama, tmp_path / "peft-adapter")
    adapter_only = tmp_path / "adapter-only"
    adapter_only.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(local / name, adapter_only / name)
    _publish_to(hub, "acme/chatml-peft", adapter_only, "d" * 40)
    snapshot = hub / "models--acme--chatml-peft" / "snapshots" / ("d" * 40)
    data = ["eval", "--model", str(tiny_llama), "--data", str(number_data["eval"]), "--adapter"]
    start = ("its trainable token ids reach 103, past the 102 embedding rows of its base {base}: it was made for the "
             "base with tokens added (as TRL's setup_chat_format adds them), which peftkit learns from the tokenizer "
             "saved beside the adapter, and the adapter's directory holds none of its files (tokenizer.json, "
             "tokenizer_config.json, special_tokens_map.json, ...).").format(base=tiny_llama)
    err = " ".join(cli_user_error(monkeypatch, capsys, *data, "acme/chatml-peft").split())
    assert err == (f"error: Adapter {snapshot}: {start} It is hub adapter acme/chatml-peft's snapshot {'d' * 40} in "
                   "the local Hugging Face cache, which holds only the files fetched when it was cached (before "
                   "peftkit fetched the tokenizer's with an adapter's), and HF_HUB_OFFLINE is set, so nothing is "
                   "fetched now. Fetch them once: run this command again with HF_HUB_OFFLINE=0 (peftkit fetches them "
                   f"beside the adapter), or `hf download acme/chatml-peft --revision {'d' * 40} --include "
                   "'tokenizer*' --include special_tokens_map.json --include added_tokens.json --include vocab.json "
                   "--include merges.txt --include vocab.txt --include spiece.model`."), err
    err = " ".join(cli_user_error(monkeypatch, capsys, *data, str(adapter_only)).split())
    assert err == (f"error: Adapter {adapter_only}: {start} Copy the tokenizer saved with the adapter into it "
                   "(tokenizer.json, tokenizer_config.json, special_tokens_map.json), or give --model the base with "
                   "those tokens added and its embeddings resized to hold them."), err

    for file in local.iterdir():  # the tokenizer's files fetched into the snapshot, as `hf download` puts them
        if not (snapshot / file.name).exists():
            shutil.copyfile(file, snapshot / file.name)
    from typer.testing import CliRunner

    from peftkit.cli import app

    fetched, alone = (CliRunner().invoke(app, [*data, adapter]) for adapter in ("acme/chatml-peft", str(local)))
    assert fetched.exit_code == 0 and fetched.stdout == alone.stdout, fetched.output


def test_a_recipe_s_init_from_may_name_a_hub_adapter(hub, tiny_llama, number_data, tmp_path):
    """adapter.init_from: user/name, no local path, continues from the hub adapter (read from the cache offline);
    a misspelled one names the recipe's line, the local path looked for and the adapters the cache holds."""
    import yaml

    first = load_recipe(make_recipe(tmp_path / "first", tiny_llama, number_data, training={"max_steps": 2}))
    train(first)
    _publish_to(hub, "acme/tiny-lora", tmp_path / "first" / "run" / "adapter", "e" * 40)
    for name, init_from in (("hub", "acme/tiny-lora"), ("local", str(tmp_path / "first" / "run" / "adapter"))):
        path = make_recipe(tmp_path / name, tiny_llama, number_data, training={"max_steps": 2})
        recipe = yaml.safe_load(path.read_text())
        recipe["adapter"] = {"init_from": init_from}
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        loaded = load_recipe(path)
        if name == "hub":
            assert loaded.adapter.init_from == str(hub / "models--acme--tiny-lora" / "snapshots" / ("e" * 40))
        train(loaded)
    assert load_file(tmp_path / "hub" / "run" / "adapter" / "adapter_model.safetensors").keys() == \
        load_file(tmp_path / "local" / "run" / "adapter" / "adapter_model.safetensors").keys()
    assert (json.loads((tmp_path / "hub" / "run" / "manifest.json").read_text())["losses"]
            == json.loads((tmp_path / "local" / "run" / "manifest.json").read_text())["losses"])
    path.write_text(path.read_text().replace(init_from, "acme/tiny-lorra"))
    with pytest.raises(PeftkitError) as e:
        load_recipe(path)
    said = " ".join(str(e.value).split())
    assert said.startswith(f"{path}:") and "adapter.init_from" in said, said
    assert (f"Adapter acme/tiny-lorra: no such local directory ({tmp_path / 'local' / 'acme' / 'tiny-lorra'}), and of "
            "hub adapter acme/tiny-lorra, it is not in the local Hugging Face cache") in said, said
    assert "Did you mean 'acme/tiny-lora'?" in said


def test_a_run_records_a_hub_adapter_pinned_and_verify_and_resume_read_that_commit_elsewhere(
        hub, tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    """adapter.init_from: acme/tiny-lora is recorded in recipe.yaml and manifest.json as acme/tiny-lora@COMMIT, the
    commit read (they named its snapshot in this machine's cache: verify elsewhere stopped with a FileNotFoundError).
    With the cache moved: one holding another commit only is an error naming the repository and the run's commit; that
    commit put back (main elsewhere), verify reproduces the run and --resume of the run's recipe.yaml reads it (before,
    --resume said that error in its own words, which asked for another revision), while
    the user's recipe, whose main now has other weights, is refused naming both commits and the pin. A run recorded
    before (the snapshot's path) still verifies, also where that path is another machine's (its commit fetched), and
    resumes from its recipe.yaml as the same run. validate prints the recipe as train records it, pinned, and so do the
    trackers' hyperparameters (TensorBoard's hparams.yml)."""
    import io
    from importlib.util import find_spec
    import re

    import yaml
    from rich.console import Console
    from typer.testing import CliRunner

    from peftkit.cli import app
    from peftkit.methods.lora import LoraConfig
    from peftkit.rundir import check_output_dir
    from tests.test_combine import make_adapter

    first, other, quiet = "e" * 40, "f" * 40, Console(quiet=True)
    lora = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    adapters = [Path(make_adapter(tiny_llama, lora, seed, tmp_path / f"lora-{seed}")) for seed in (3, 4)]
    _publish_to(hub, "acme/tiny-lora", adapters[0], first)
    path = make_recipe(tmp_path, tiny_llama, number_data, eval={"base_model": False}, training={
        "max_steps": 2, "save_steps": 2, "report_to": ["tensorboard"] if find_spec("tensorboard") else []})
    path.write_text(yaml.safe_dump(yaml.safe_load(path.read_text()) | {"adapter": {"init_from": "acme/tiny-lora"}}))
    train(load_recipe(path), console=quiet)
    run, pin = tmp_path / "run", f"acme/tiny-lora@{first}"
    assert yaml.safe_load((run / "recipe.yaml").read_text())["adapter"]["init_from"] == pin
    if find_spec("tensorboard"):  # the trackers' hyperparameters too (they held the snapshot's path)
        hparams = yaml.safe_load(next((run / "trackers" / "run").glob("*/hparams.yml")).read_text())
        assert hparams["adapter.init_from"] == pin, hparams["adapter.init_from"]
    assert json.loads((run / "manifest.json").read_text())["recipe"]["adapter"]["init_from"] == pin
    text = (run / "recipe.yaml").read_text()  # the same pin is the same run; another commit may be (its files decide)
    shown = CliRunner().invoke(app, ["validate", str(path)])  # what train writes (it printed the snapshot's path)
    assert shown.exit_code == 0 and yaml.safe_load(shown.stdout) == yaml.safe_load(text), shown.output
    (tmp_path / "shown.yaml").write_text(shown.stdout)  # and what it prints validates again, from the cache
    again = CliRunner().invoke(app, ["validate", str(tmp_path / "shown.yaml")])
    assert again.exit_code == 0 and yaml.safe_load(again.stdout) == yaml.safe_load(text), again.output
    assert check_output_dir(run, text, False, False) == []
    assert (f"made with its files at other paths or its hub adapters at other commits (adapter.init_from: {pin} -> "
            f"acme/tiny-lora@{other})") in check_output_dir(run, text.replace(first, other), False, False)[0]
    with pytest.raises(PeftkitError, match=r"holds a run of a different recipe \(its recipe.yaml differs in "
                                           r"adapter.init_from\)"):  # another repository's
        check_output_dir(run, text.replace("acme/tiny-lora", "acme/other-lora"), False, False)

    elsewhere = tmp_path / "elsewhere"  # another machine's cache: the run's is gone, this one holds another commit
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(elsewhere))
    shutil.rmtree(hub)
    _publish_to(elsewhere, "acme/tiny-lora", adapters[1], other)
    with pytest.raises(PeftkitError) as e:
        verify(run, console=quiet)
    said = (f"adapter.init_from is hub adapter {pin}: the run read acme/tiny-lora at commit {first}, which the local "
            f"Hugging Face cache ({elsewhere / 'models--acme--tiny-lora'}) lacks (it holds 'main', {other}), and "
            "HF_HUB_OFFLINE is set, so nothing is downloaded. Only that commit reproduces the run: unset HF_HUB_OFFLINE "
            "to fetch it (the network), or copy its snapshot into this cache.")
    assert " ".join(str(e.value).split()) == f"{run / 'manifest.json'}: {said}"
    # --resume of the run's recipe.yaml says it in the same words (it said 'Ask for a revision it holds': not a fix)
    line = next(n for n, text_line in enumerate(text.splitlines(), 1) if text_line.strip().startswith("init_from:"))
    capsys.readouterr()  # (what the steps before printed)
    err = " ".join(cli_user_error(monkeypatch, capsys, "train", str(run / "recipe.yaml"), "--resume").split())
    assert err == f"error: {run / 'recipe.yaml'}:{line}: {said}", err
    _publish_to(elsewhere, "acme/tiny-lora", adapters[0], first)
    (elsewhere / "models--acme--tiny-lora" / "refs" / "main").write_text(other)  # main: the other weights
    report = verify(run, console=quiet)
    assert report.ok, report.differences
    with pytest.raises(PeftkitError, match=re.escape(
            f"adapter.init_from is hub adapter acme/tiny-lora, now at commit {other} (the run began at {first}): the "
            f"branch or tag it names moved on. Set adapter.init_from to {pin}, the commit the run began with")):
        train(load_recipe(path), resume=True, console=quiet)
    resumed = CliRunner().invoke(app, ["train", str(run / "recipe.yaml"), "--resume"], catch_exceptions=False)
    assert resumed.exit_code == 0, resumed.output  # the pinned commit: the run's inputs, unchanged

    # the record of a run made before: the snapshot's path in this cache, then in the first machine's (gone)
    for snapshot in (elsewhere, hub):
        old = yaml.safe_load((run / "recipe.yaml").read_text())
        old["adapter"]["init_from"] = str(snapshot / "models--acme--tiny-lora" / "snapshots" / first)
        (run / "recipe.yaml").write_text(text := yaml.safe_dump(old, sort_keys=False))
        manifest = json.loads((run / "manifest.json").read_text())
        manifest["recipe"]["adapter"]["init_from"] = old["adapter"]["init_from"]
        manifest["recipe_sha256"] = hashlib.sha256(text.encode()).hexdigest()
        (run / "manifest.json").write_text(json.dumps(manifest))
        report = verify(run, console=quiet)
        assert report.ok, report.differences
    said = io.StringIO()  # resumed from that record: the same run, its commit fetched
    train(load_recipe(run / "recipe.yaml"), resume=True, console=Console(file=said, width=400))
    assert "Resumed from step-00000002" in said.getvalue() and "other paths" not in said.getvalue(), said.getvalue()


def test_a_fusion_of_hub_adapters_records_them_pinned_and_verifies_with_the_cache_elsewhere(
        hub, tiny_llama, number_data, tmp_path, monkeypatch):
    """AdapterFusion of two hub adapters: its adapter_config.json records each fused adapter's source as its pin
    (acme/lora-3@COMMIT), as recipe.yaml does, not the snapshot's path in the cache, which made the export differ on a
    machine whose cache lies elsewhere. With the cache moved, verify reproduces the run, exports bit for bit."""
    import yaml
    from rich.console import Console

    from peftkit.methods.lora import LoraConfig
    from tests.test_combine import make_adapter

    commit, quiet, names = "e" * 40, Console(quiet=True), ["acme/lora-3", "acme/lora-4"]
    lora = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    for seed, name in zip((3, 4), names):
        _publish_to(hub, name, Path(make_adapter(tiny_llama, lora, seed, tmp_path / f"lora-{seed}")), commit)
    path = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 2}, eval={"base_model": False})
    path.write_text(yaml.safe_dump(yaml.safe_load(path.read_text()) | {"adapter": {"method": "fusion", "fuse": names}}))
    train(load_recipe(path), console=quiet)
    run = tmp_path / "run"
    pins = [f"{name}@{commit}" for name in names]
    assert yaml.safe_load((run / "recipe.yaml").read_text())["adapter"]["fuse"] == pins
    assert [f["source"] for f in json.loads((run / "adapter" / "adapter_config.json").read_text())["fused"]] == pins
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(hub, elsewhere, symlinks=True)
    shutil.rmtree(hub)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(elsewhere))
    report = verify(run, console=quiet)
    assert report.ok, report.differences


def test_paths_that_look_like_hub_ids_stay_paths(hub, tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    """What no hub id can be stays a (missing) path, said as one: `--` or `..` in a name (a traceback from
    huggingface_hub's validation), `./acme/x`, a subfolder with `..` (it reached any directory: /etc, another
    repository's files). A subfolder the cache lacks offline is said as such, not as missing from the hub."""
    from peftkit.cli.options import adapter_path
    from peftkit.hub import hub_adapter
    from tests.conftest import cli_user_error

    recipe = load_recipe(make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 1}))
    train(recipe)
    _publish_to(hub, "acme/tiny-lora", tmp_path / "run" / "adapter", "e" * 40)
    monkeypatch.chdir(tmp_path)
    for value in ("stage--1/adapter", "runs/my..run", "./acme/tiny-lora", "acme/tiny-lora/../../../../etc",
                  "acme/tiny-lora/./x", "/acme/tiny-lora"):
        assert hub_adapter(value) is None, value
        with pytest.raises(PeftkitError, match=f"^--adapter {re.escape(value)}: no such directory"):
            adapter_path(value)  # (at once, as a missing path: it was loaded and said missing, without the flag)
    err = cli_user_error(monkeypatch, capsys, "inspect", "./acme/tiny-lora")
    assert "error: ./acme/tiny-lora: no such directory" in err, err  # (typer's Path dropped the ./: loaded the hub's)
    err = cli_user_error(monkeypatch, capsys, "inspect", "stage--1/adapter")
    assert "error: stage--1/adapter: no such directory" in err, err
    err = cli_user_error(monkeypatch, capsys, "inspect", "acme/tiny-lora/nosub")
    assert ("Adapter acme/tiny-lora/nosub: hub repository acme/tiny-lora has no adapter files in nosub/ (the local "
            "Hugging Face cache holds none, and HF_HUB_OFFLINE is set, so nothing is downloaded).") in " ".join(err.split())


def test_prompt_tuning_text_init_reads_the_tokenizer_of_the_commit_the_base_loaded(hub, tiny_llama, tmp_path):
    """init: text tokenized init_text with the tokenizer of the hub base's main branch, whatever model.revision
    loaded: here main's tokenizer ends each text with </s> where the loaded commit's begins it with <s>."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    from peftkit.methods.prompt_tuning import text_ids
    from peftkit.modeling import load_model, resolve_device
    from peftkit.recipe import ModelConfig

    newer = Path(shutil.copytree(tiny_llama, tmp_path / "newer"))
    tok = AutoTokenizer.from_pretrained(newer)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tok.eos_token_id)])
    tok.save_pretrained(newer)
    _publish(hub, newer, "b" * 40)  # main moves on
    model = load_model(ModelConfig(name_or_path=REPO, revision="a" * 40, dtype="float32"), device=resolve_device("cpu"))
    expected = AutoTokenizer.from_pretrained(tiny_llama)("hi")["input_ids"]
    assert expected != AutoTokenizer.from_pretrained(REPO)("hi")["input_ids"]
    assert text_ids(model, "hi", 4).tolist() == (expected * 2)[:4]
