"""Every recipe shipped in recipes/ (searched recursively) validates, and what its header says of it (its command, its
trainable count) holds."""

import re
from pathlib import Path

import pytest

from peftkit.errors import PeftkitError
from peftkit.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent / "recipes"
RECIPES = sorted(ROOT.rglob("*.yaml"))


def test_recipes_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in RECIPES}
    assert {"quickstart.yaml", "ci/repro.yaml"} <= names, names


def test_every_method_has_a_recipe():
    """docs/recipe.md's adapter section: "Recipes for each: `recipes/methods/`"."""
    from peftkit.methods import METHODS

    used = {load_recipe(path).adapter.method for path in RECIPES if path.parent.name == "methods"}
    assert set(METHODS) - used == set()


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(path):
    recipe = load_recipe(path)
    # Relative paths resolve against the recipe's own directory, wherever pytest runs from.
    assert Path(recipe.export.output_dir).is_absolute()
    assert Path(recipe.data.train).is_absolute()
    command = f"# peftkit train recipes/{path.relative_to(ROOT).as_posix()}"
    first = path.read_text().splitlines()[0]
    assert first == command or first.startswith(command + " "), f"every recipe starts with the command that runs it: {command}"


def test_issue_recipe_accepted_exactly_as_written(tmp_path):
    text = """\
model:
  name_or_path: /abs/path/to/tiny-llama   # a local directory or a hub id
  dtype: float32                          # float32 | bfloat16 | float16 | auto
adapter:
  method: lora
  r: 8
  alpha: 16
  dropout: 0.0
  target_modules: all-linear              # or a list of module-name suffixes, or {regex: "..."}
data:
  train: /abs/path/train.jsonl            # local json/jsonl/csv/parquet file or a hub dataset id
  eval: /abs/path/eval.jsonl
  format: alpaca                          # alpaca | chat | completion | text
  max_length: 128
training:
  max_steps: 30
  batch_size: 4
  grad_accum: 1
  lr: 1.0e-3
  optimizer: adamw                        # adamw | adamw_8bit | paged_adamw_8bit | paged_adamw_32bit | sgd
  scheduler: cosine                       # cosine | linear | constant
  warmup_steps: 3
  seed: 0
export:
  output_dir: /abs/path/runs/canonical
  adapter: true
  merged: true
"""
    (tmp_path / "r.yaml").write_text(text)
    recipe = load_recipe(tmp_path / "r.yaml", ["training.lr=2e-4", "adapter.target_modules=[q_proj, v_proj]"])
    assert recipe.training.lr == 2e-4 and recipe.adapter.target_modules == ["q_proj", "v_proj"]
    assert recipe.adapter.scaling == 2.0 and recipe.export.merged


def test_relative_paths_resolve_against_recipe_dir(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "r.yaml").write_text(
        "model: {name_or_path: ../models/m}\ndata: {train: data/train.jsonl}\nexport: {output_dir: out}\n"
        "training: {max_steps: 1}\n")
    (tmp_path / "hub.yaml").write_text(
        "model: {name_or_path: meta-llama/Llama-3.2-1B}\ndata: {train: tatsu-lab/alpaca}\nexport: {output_dir: o}\n")
    monkeypatch.chdir("/")
    recipe = load_recipe(tmp_path / "sub" / "r.yaml")
    assert recipe.model.name_or_path == str(tmp_path / "models" / "m")
    assert recipe.data.train == str(tmp_path / "sub" / "data" / "train.jsonl")
    assert recipe.export.output_dir == str(tmp_path / "sub" / "out")
    hub = load_recipe(tmp_path / "hub.yaml")
    assert hub.model.name_or_path == "meta-llama/Llama-3.2-1B" and hub.data.train == "tatsu-lab/alpaca"


def test_validate_prints_every_default(tmp_path):
    from typer.testing import CliRunner

    from peftkit.cli import app

    (tmp_path / "r.yaml").write_text("model: {name_or_path: m}\ndata: {train: t.jsonl}\nexport: {output_dir: o}\n")
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "r.yaml")])
    assert result.exit_code == 0
    for key in ("use_rslora:", "nan_policy: stop", "grad_accum: 1", "on_bad_rows: error", "merged: false"):
        assert key in result.output
    # t.jsonl is a local path by its extension, and is not there (`m` may be a hub id): said, still valid.
    assert f"warning: data.train {tmp_path / 't.jsonl'} does not exist here" in " ".join(result.output.split())
    assert "warning: model.name_or_path" not in result.output


@pytest.mark.parametrize(("adapter", "missing"), [
    ("{method: fusion, fuse: [a, b]}", ["adapter.fuse[0] {d}/a", "adapter.fuse[1] {d}/b"]),
    # Two parts: a hub id too (`user/name`), which the offline cache lacks: a warning still, not an error.
    ("{method: fusion, fuse: [adapters/a, adapters/b]}", ["adapter.fuse[0] {d}/adapters/a", "adapter.fuse[1] {d}/adapters/b"]),
    ("{method: multitask_prompt_tuning, num_tasks: 1, init: source, source_adapter: mpt}", ["adapter.source_adapter {d}/mpt"]),
    # X-LoRA's experts: validate stopped with train's error (recipes/methods/xlora.yaml before its experts trained).
    ("{method: xlora, adapters: {'0': a, '1': b}}", ["adapter.adapters.0 {d}/a", "adapter.adapters.1 {d}/b"]),
])
def test_validate_warns_of_missing_adapter_directories(adapter, missing, tmp_path, monkeypatch):
    """The adapters a recipe starts from (AdapterFusion's, X-LoRA's, multitask prompt tuning's source) are paths as
    the model's and the data's are: one that is not there is said by validate, as theirs are. One that could be a hub
    id was an error once hub adapters came (validate of a recipe meant for another machine failed); train still stops
    at it."""
    from huggingface_hub import constants
    from typer.testing import CliRunner

    from peftkit.cli import app

    (tmp_path / "r.yaml").write_text(f"model: {{name_or_path: m}}\ndata: {{train: t.jsonl}}\nadapter: {adapter}\n"
                                     "export: {output_dir: o}\n")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "r.yaml")])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    if "adapters/" not in adapter:
        for key in missing:
            assert f"warning: {key.format(d=tmp_path)} does not exist here" in said
    else:  # why it is neither a local directory nor a hub adapter, as train would say it
        assert (f"warning: {tmp_path / 'r.yaml'}:3: adapter.fuse[0]: Adapter adapters/a: no such local directory "
                f"({tmp_path / 'adapters' / 'a'}), and of hub adapter adapters/a, it is not in the local Hugging Face "
                f"cache ({tmp_path / 'hf-cache'}), and HF_HUB_OFFLINE is set") in said, said
        assert said.count("warning:") == 3 and said.count("adapter.fuse[1]: Adapter adapters/b: no such local") == 1
        with pytest.raises(PeftkitError, match=r"r.yaml:3: adapter.fuse\[0\]: Adapter adapters/a: no such local"):
            load_recipe(tmp_path / "r.yaml")


def test_paths_that_look_like_rich_markup_are_printed_as_they_are(tmp_path):
    """A directory named `[bold]x[/bold]` lost its brackets in validate's lines (and in train's notes, merge's and
    verify's): rich read them as markup. Warnings were also folded at 80 columns in a log."""
    from typer.testing import CliRunner

    from peftkit.cli import app

    folder = tmp_path / "[bold]x[/bold] dir"  # "[bold]x[" inside which "bold] dir"
    folder.mkdir(parents=True)
    (folder / "[red]r.yaml").write_text('model: {name_or_path: "/nope/[bold]m[/bold]"}\ndata: {train: t.jsonl}\n'
                                        "export: {output_dir: o}\n")
    result = CliRunner().invoke(app, ["validate", str(folder / "[red]r.yaml")])
    assert result.exit_code == 0, result.output
    assert f"# {folder / '[red]r.yaml'}: valid" in result.output
    assert ("warning: model.name_or_path /nope/[bold]m[/bold] does not exist here (a relative path is resolved against "
            "the recipe's directory); train would stop at it.") in result.output.splitlines()


def stated_count(path: Path) -> int | None:
    """The trainable count a recipe's header comment gives ('= 4,608 trainable parameters', '1,920 trainable
    numbers'), or None: the number before 'trainable' where a count follows it, not '20 trainable embeddings'."""
    header = " ".join(line.lstrip("# ") for line in path.read_text().splitlines() if line.startswith("#"))
    said = re.search(r"(\d[\d,]*) trainable(?= parameters| numbers|[,;)]| \()", header)
    return int(said[1].replace(",", "")) if said else None


# Built from other runs' adapters (fuse, X-LoRA's experts), which validate's model checks read: not checked here.
FROM_RUNS = {"fusion.yaml", "xlora.yaml"}
COUNTED = [p for p in RECIPES if stated_count(p) is not None and p.name not in FROM_RUNS]


@pytest.fixture(scope="module")
def shipped_tree(tmp_path_factory) -> Path:
    """recipes/ beside the tiny assets make_tiny_assets.py writes (its artifacts/), as in a clone after the Quickstart."""
    import shutil

    from peftkit import tiny

    root = tmp_path_factory.mktemp("clone")
    shutil.copytree(ROOT, root / "recipes")
    for build in (tiny.build_quickstart_assets, tiny.build_classification_assets, tiny.build_multitask_assets,
                  tiny.build_long_context_assets, tiny.build_moe_assets, tiny.build_preference_assets):
        build(root / "artifacts")
    return root


@pytest.mark.parametrize("path", COUNTED, ids=lambda p: p.name)
def test_a_recipes_stated_count_is_what_it_trains(path, shipped_tree):
    """A count of trainable parameters a recipe's header gives is what `peftkit validate` counts (train's own count,
    on the meta-device model): the comment is the recipe's documentation."""
    from peftkit.model_checks import check_model

    line = check_model(load_recipe(shipped_tree / "recipes" / path.relative_to(ROOT)))
    assert f"{stated_count(path):,} trainable of" in line, line
