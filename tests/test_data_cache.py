"""The tokenized-data cache (`peftkit.data.cache`): a second run reads the examples it kept and trains the same bits;
anything that shapes the examples is a new key; a damaged entry is said and remade; verify never reads it."""

import io
import json
import shutil
import warnings
from pathlib import Path

import pytest
from rich.console import Console

from peftkit.data import Examples, load_examples
from peftkit.data.cache import _load as _load_entry
from peftkit.data.cache import _save
from peftkit.data.checks import describe_stats
from peftkit.data.examples import tokenize_rows
from peftkit.errors import PeftkitWarning
from peftkit.modeling import load_tokenizer
from peftkit.recipe import DataConfig, ModelConfig, load_recipe
from peftkit.tiny import number_rows, write_jsonl
from peftkit.train import train
from peftkit.verify import verify
from tests.conftest import make_recipe
from tests.test_hub import hub_dataset  # noqa: F401 - a fixture


def _entries(root: Path) -> list[Path]:
    return sorted((root / "examples").glob("*.safetensors")) if (root / "examples").is_dir() else []


def _same(a: Examples, b: Examples) -> bool:
    return list(a) == list(b) and a.task_ids == b.task_ids


def _load(tok, path: Path, **data) -> tuple[Examples, dict]:
    return load_examples(tok, str(path), "train", DataConfig(train=str(path), **data))


def test_a_second_load_reads_the_examples_and_counts_kept_by_the_first(tiny_llama, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("PEFTKIT_CACHE", str(cache))
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_llama)))
    rows = number_rows(40, seed=3)
    write_jsonl(tmp_path / "train.jsonl", rows)
    fresh = tokenize_rows(tok, rows, DataConfig(train="x", max_length=90), "x")
    first = _load(tok, tmp_path / "train.jsonl", max_length=90)
    assert len(_entries(cache)) == 1 and "cached" not in first[1]
    second = _load(tok, tmp_path / "train.jsonl", max_length=90)
    assert second[1].pop("cached") == str(_entries(cache)[0])
    assert _same(first[0], fresh[0]) and _same(second[0], fresh[0])
    assert first[1] == second[1] == fresh[1] and fresh[1]["truncated"] > 0
    said = describe_stats(second[1] | {"cached": "PATH"}, DataConfig(train="x", max_length=90))[0]
    assert said.startswith("40 training examples, read from the tokenized-data cache (PATH); ")
    # The same bytes under another name are the same data.
    shutil.copy(tmp_path / "train.jsonl", tmp_path / "copy.jsonl")
    assert _same(_load(tok, tmp_path / "copy.jsonl", max_length=90)[0], fresh[0]) and len(_entries(cache)) == 1


def test_what_shapes_the_examples_is_another_key(tiny_llama, tmp_path, monkeypatch):
    """The data's content, each data setting that shapes an example, the task ids and the tokenizer each make a new
    entry; each entry read back equals the examples tokenized anew."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("PEFTKIT_CACHE", str(cache))
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_llama)))
    rows = [{**row, "task": i % 2} for i, row in enumerate(number_rows(24, seed=4))]
    path = tmp_path / "train.jsonl"
    write_jsonl(path, rows)
    variants = [({}, False), ({"max_length": 90}, False), ({"max_length": 90, "truncation": "drop"}, False),
                ({"on_bad_rows": "skip"}, False), ({"format": "completion"}, False),
                ({"format": "completion"}, True)]
    for i, (data, tasks) in enumerate(variants):
        if data.get("format") == "completion" and not tasks:
            write_jsonl(path, [{"prompt": r["instruction"], "completion": r["output"], "task": r["task"]} for r in rows])
        cfg = DataConfig(train=str(path), **data)
        kept = load_examples(tok, str(path), "train", cfg, tasks=tasks)
        assert len(_entries(cache)) == i + 1
        again = load_examples(tok, str(path), "train", cfg, tasks=tasks)
        fresh = tokenize_rows(tok, [json.loads(line) for line in path.read_text().splitlines()], cfg, "x", tasks=tasks)
        assert "cached" not in kept[1] and again[1].pop("cached")  # kept by the first load, read by the second
        assert _same(kept[0], fresh[0]) and _same(again[0], fresh[0]) and kept[1] == again[1]
    assert again[0].task_ids == [i % 2 for i in range(24)]
    write_jsonl(path, [*[{"prompt": r["instruction"], "completion": r["output"], "task": r["task"]} for r in rows],
                       {"prompt": "one more", "completion": "row", "task": 0}])
    assert len(load_examples(tok, str(path), "train", cfg, tasks=True)[0]) == 25 and len(_entries(cache)) == 7
    tok.pad_token = tok.unk_token  # another tokenizer (as saved): another key
    load_examples(tok, str(path), "train", cfg, tasks=True)
    assert len(_entries(cache)) == 8


def _one_entry(tiny_llama, tmp_path: Path, monkeypatch, rows: int) -> tuple:
    """(tokenizer, examples and counts of tmp_path/train.jsonl, the one cache entry they were kept in)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("PEFTKIT_CACHE", str(cache))
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_llama)))
    write_jsonl(tmp_path / "train.jsonl", number_rows(rows, seed=5))
    fresh = _load(tok, tmp_path / "train.jsonl")
    [entry] = _entries(cache)
    return tok, fresh, entry


@pytest.mark.parametrize("damage", ["flip", "cut", "empty"])
def test_a_damaged_entry_is_said_and_remade(tiny_llama, tmp_path, monkeypatch, damage):
    tok, fresh, entry = _one_entry(tiny_llama, tmp_path, monkeypatch, 16)
    data = bytearray(entry.read_bytes())
    if damage == "flip":
        data[-9] ^= 1  # a token id in the last array
    entry.write_bytes(data if damage == "flip" else data[: len(data) // 2] if damage == "cut" else b"")
    why = "its content does not match its sha256" if damage == "flip" else "not a readable entry"
    with pytest.warns(PeftkitWarning, match=rf"the cached examples of {tmp_path / 'train.jsonl'} at {entry} are "
                                            rf"damaged \({why}.*\); tokenizing again"):
        again = _load(tok, tmp_path / "train.jsonl")
    assert _same(again[0], fresh[0]) and again[1] == fresh[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remade: read without a word
        assert _same(_load(tok, tmp_path / "train.jsonl")[0], fresh[0])


@pytest.mark.parametrize("failure, said", [
    ("written", r"could not write the tokenized-data cache at .*; going on without it. Set PEFTKIT_CACHE to a writable "
                r"directory, or PEFTKIT_CACHE=off"),
    ("keyed", r"the tokenized-data cache is not used: saving the tokenizer to .* to key it failed \(No space left on "
              r"device \(os error 28\)\)"),
])
def test_a_cache_that_cannot_be_written_or_keyed_is_said_and_the_examples_are_the_same(tiny_llama, tmp_path, monkeypatch,
                                                                                       failure, said):
    """keyed: the key hashes the tokenizer saved into a temporary directory, and a full TMPDIR was a traceback (the
    tokenizers library's bare `Exception: No space left on device`), with a warm cache too."""
    from peftkit.data import cache

    def full(tok):
        raise Exception("No space left on device (os error 28)")  # noqa: TRY002 - what the tokenizers library raises

    if failure == "written":
        (tmp_path / "a-file").write_text("")
        monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "a-file" / "cache"))
    else:
        monkeypatch.setattr(cache, "tokenizer_digest", full)
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_llama)))
    write_jsonl(tmp_path / "train.jsonl", number_rows(8, seed=6))
    with pytest.warns(PeftkitWarning, match=said):
        examples, stats = _load(tok, tmp_path / "train.jsonl")
    assert len(examples) == stats["examples"] == 8


def test_off_keeps_nothing(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTKIT_CACHE", "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_llama)))
    write_jsonl(tmp_path / "train.jsonl", number_rows(8, seed=6))
    _load(tok, tmp_path / "train.jsonl")
    assert not (tmp_path / "xdg").exists() and not (tmp_path / "home").exists()
    monkeypatch.delenv("PEFTKIT_CACHE")  # the default: under XDG_CACHE_HOME
    _load(tok, tmp_path / "train.jsonl")
    assert len(_entries(tmp_path / "xdg" / "peftkit")) == 1


def test_a_run_from_the_cache_trains_the_same_bits_and_verify_tokenizes_anew(tiny_llama, number_data, tmp_path,
                                                                              monkeypatch):
    """A second run reads both datasets from the cache and writes the same adapter and losses as the first and as a
    run without the cache. verify tokenizes anew: an entry swapped for another dataset's (a valid entry, under this
    data's key) changes what a run from the cache trains, and verify still finds the run reproduced."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("PEFTKIT_CACHE", str(cache))
    runs = {}
    for name, cached in (("first", True), ("second", True), ("without", False)):
        recipe = load_recipe(make_recipe(tmp_path / name, tiny_llama, number_data, training={"max_steps": 3}))
        shown = io.StringIO()
        train(recipe, console=Console(file=shown, width=400), cache=cached)
        run = Path(recipe.export.output_dir)
        runs[name] = ((run / "adapter" / "adapter_model.safetensors").read_bytes(),
                      json.loads((run / "manifest.json").read_text())["losses"])
        assert ("64 training examples, read from the tokenized-data cache (" in shown.getvalue()) == (name == "second")
    assert runs["first"] == runs["second"] == runs["without"]
    assert len(_entries(cache)) == 2

    train_entry = next(e for e in _entries(cache) if e.stat().st_size == max(x.stat().st_size for x in _entries(cache)))
    other = tmp_path / "other.jsonl"
    write_jsonl(other, number_rows(64, seed=9))
    before = set(_entries(cache))
    recipe = load_recipe(make_recipe(tmp_path / "other", tiny_llama, {"train": other, "eval": number_data["eval"]},
                                     training={"max_steps": 3}))
    train(recipe, console=Console(file=io.StringIO()))
    [forged] = set(_entries(cache)) - before
    # (a valid entry under this key: a copy would be refused as another key's, so its examples are saved anew)
    _save(train_entry, *_load_entry(forged, forged.stem), train_entry.stem)
    recipe = load_recipe(make_recipe(tmp_path / "forged", tiny_llama, number_data, training={"max_steps": 3}))
    train(recipe, console=Console(file=io.StringIO()))
    assert (tmp_path / "forged" / "run" / "adapter" / "adapter_model.safetensors").read_bytes() != runs["first"][0]
    report = verify(tmp_path / "first" / "run", console=Console(file=io.StringIO()))
    assert report.ok, report.differences


def test_examples_from_arrays_refuse_arrays_that_do_not_fit():
    from array import array

    with pytest.raises(ValueError, match="do not fit together"):
        Examples.from_arrays(array("i", [1, 2, 3]), array("i", [1, 2, 3]), array("q", [2, 4]), [None, None])
    with pytest.raises(ValueError, match="do not fit together"):
        Examples.from_arrays(array("i", [1, 2, 3]), array("i", [1, 2]), array("q", [3]), [None])
    examples = Examples.from_arrays(array("i", [1, 2, 3]), array("i", [-100, 2, 3]), array("q", [1, 3]), [None, 1])
    assert [e.input_ids for e in examples] == [[1], [2, 3]] and examples.task_ids == [None, 1]


def test_the_examples_digest_is_the_sha256_of_their_arrays_bytes_and_task_ids():
    """examples_digest hashes the arrays' buffers as they are (no copy of the token ids): the digest is still the
    sha256 of their bytes in order (ids, labels, ends) and then of the task ids' repr, as manifests recorded it."""
    import hashlib
    from array import array

    from peftkit.data.stored import examples_digest

    ids, labels = array("i", [5, -7, 2**31 - 1, 0, 3]), array("i", [-100, -7, 2**31 - 1, -100, 3])
    ends, tasks = array("q", [2, 5]), [None, 1]
    expected = hashlib.sha256(ids.tobytes() + labels.tobytes() + ends.tobytes() + repr(tasks).encode()).hexdigest()
    assert examples_digest(Examples.from_arrays(ids, labels, ends, tasks)) == expected


def test_a_hub_dataset_is_kept_under_its_rows_digest(hub_dataset, tiny_llama, tmp_path, monkeypatch):
    """A hub dataset has no file to hash: its entry is keyed by the rows read, so rows that changed on the hub are
    another entry, never the old examples."""
    from tests.test_hub import DATASET, _publish_dataset

    cache = tmp_path / "cache"
    monkeypatch.setenv("PEFTKIT_CACHE", str(cache))
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_llama)))
    cfg = DataConfig(train=DATASET)
    first = load_examples(tok, DATASET, "train", cfg)
    again = load_examples(tok, DATASET, "train", cfg)
    assert _same(again[0], first[0]) and again[1]["cached"] == str(_entries(cache)[0])
    rows = number_rows(64, seed=1)
    rows[5]["output"] = "five"
    _publish_dataset(hub_dataset, rows, "b" * 40, tmp_path)
    moved = load_examples(tok, DATASET, "train", cfg)
    assert "cached" not in moved[1]
    assert _same(moved[0], tokenize_rows(tok, rows, cfg, "x")[0]) and not _same(moved[0], first[0])
    assert len(_entries(cache)) == 2


def _header(entry: Path) -> dict:
    data = entry.read_bytes()
    return json.loads(data[8: 8 + int.from_bytes(data[:8], "little")])


def _with_header(entry: Path, header) -> None:
    """Rewrite `entry` with another header, its data unchanged (the header padded to its old length)."""
    data = entry.read_bytes()
    size = int.from_bytes(data[:8], "little")
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= size
    entry.write_bytes(data[:8] + text.ljust(size) + data[8 + size:])


@pytest.mark.parametrize("header", ["a list", "metadata a list", "stats a number", "no key", "no sha256"])
def test_an_entry_with_a_header_of_other_shapes_is_damaged_not_a_crash(tiny_llama, tmp_path, monkeypatch, header):
    tok, fresh, entry = _one_entry(tiny_llama, tmp_path, monkeypatch, 8)
    kept = _header(entry)
    metadata = kept["__metadata__"]
    altered = {"a list": [kept], "metadata a list": kept | {"__metadata__": [metadata]},
               "stats a number": kept | {"__metadata__": metadata | {"stats": 8}},
               "no key": kept | {"__metadata__": {k: v for k, v in metadata.items() if k != "key"}},
               "no sha256": kept | {"__metadata__": {k: v for k, v in metadata.items() if k != "sha256"}}}[header]
    _with_header(entry, altered)
    with pytest.warns(PeftkitWarning, match=r"are damaged \(not a readable entry: \w+Error: .*\); tokenizing again"):
        again = _load(tok, tmp_path / "train.jsonl")
    assert _same(again[0], fresh[0]) and again[1] == fresh[1]


def test_an_entry_under_another_keys_name_is_not_read(tiny_llama, tmp_path, monkeypatch):
    """An entry copied or renamed onto another key's name (whole and valid in itself) holds other examples."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("PEFTKIT_CACHE", str(cache))
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_llama)))
    write_jsonl(tmp_path / "a.jsonl", number_rows(8, seed=5))
    write_jsonl(tmp_path / "b.jsonl", number_rows(12, seed=6))
    _load(tok, tmp_path / "a.jsonl")
    [a] = _entries(cache)
    fresh_b = _load(tok, tmp_path / "b.jsonl")
    [b] = set(_entries(cache)) - {a}
    shutil.copy(a, b)
    with pytest.warns(PeftkitWarning, match=rf"at {b} are damaged \(it was written for another key\)"):
        again = _load(tok, tmp_path / "b.jsonl")
    assert _same(again[0], fresh_b[0]) and len(again[0]) == 12


def test_the_same_bytes_read_as_another_kind_of_file_are_another_entry(tiny_llama, tmp_path, monkeypatch):
    """A .jsonl file's bytes as a .txt file are other rows (one text a line): not the .jsonl's examples."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("PEFTKIT_CACHE", str(cache))
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_llama)))
    write_jsonl(tmp_path / "train.jsonl", [{"text": f"row {i} says {i * 7}"} for i in range(6)])
    shutil.copy(tmp_path / "train.jsonl", tmp_path / "train.txt")
    as_jsonl = _load(tok, tmp_path / "train.jsonl", format="text")
    as_text = _load(tok, tmp_path / "train.txt", format="text")
    assert "cached" not in as_text[1] and len(_entries(cache)) == 2
    uncached = load_examples(tok, str(tmp_path / "train.txt"), "train", DataConfig(train="x", format="text"),
                             cache=False)
    assert _same(as_text[0], uncached[0]) and not _same(as_text[0], as_jsonl[0])


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_a_file_rewritten_with_its_modification_time_kept_is_read_anew(tiny_llama, tmp_path, monkeypatch, suffix):
    """`datasets` keys its own cache of a file by path and modification time; a file rewritten with its time kept
    (`cp -p`, `rsync -t`) gives the new rows, with or without peftkit's cache."""
    import csv
    import os

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_llama)))
    path = tmp_path / f"train{suffix}"

    def write(output: str) -> None:
        rows = [{"instruction": f"say {i}", "output": f"{output} {i}"} for i in range(4)]
        if suffix == ".json":
            path.write_text(json.dumps(rows))
        else:
            with path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=["instruction", "output"])
                writer.writeheader()
                writer.writerows(rows)

    write("aaaa")
    kept = os.stat(path)
    for cached in (False, True):
        old = load_examples(tok, str(path), "train", DataConfig(train="x"), cache=cached)
    write("bbbb")
    os.utime(path, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    for cached in (False, True):
        new = load_examples(tok, str(path), "train", DataConfig(train="x"), cache=cached)
        assert "bbbb 3" in tok.decode(new[0][3].input_ids) and not _same(new[0], old[0])


def test_entries_are_as_readable_as_other_files_and_killed_writes_are_cleared(tiny_llama, tmp_path, monkeypatch):
    import os
    import time

    from peftkit.data.cache import STALE_TEMPORARY_S

    cache = tmp_path / "cache"
    monkeypatch.setenv("PEFTKIT_CACHE", str(cache))
    (cache / "examples").mkdir(parents=True)
    stale, young = cache / "examples" / ".x.safetensors.ab12.tmp", cache / "examples" / ".y.safetensors.cd34.tmp"
    stale.write_bytes(b"half")
    young.write_bytes(b"being written")
    old = time.time() - STALE_TEMPORARY_S - 60
    os.utime(stale, (old, old))
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_llama)))
    write_jsonl(tmp_path / "train.jsonl", number_rows(8, seed=5))
    previous = os.umask(0o022)
    try:
        _load(tok, tmp_path / "train.jsonl")
    finally:
        os.umask(previous)
    [entry] = _entries(cache)
    assert entry.stat().st_mode & 0o777 == 0o644
    assert not stale.exists() and young.exists()


def test_a_cache_directory_that_cannot_be_searched_costs_the_cache_not_the_run(tiny_llama, tmp_path, monkeypatch):
    """A cache whose examples/ another user made private (mode 700): looking for the entry there was an uncaught
    PermissionError (pathlib's is_file raises on EACCES), and the run failed before tokenizing."""
    import os
    import pathlib
    import tempfile

    cache = tmp_path / "cache"
    monkeypatch.setenv("PEFTKIT_CACHE", str(cache))
    (cache / "examples").mkdir(parents=True)
    (cache / "examples").chmod(0)
    stat = pathlib.Path.stat

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    def stat_denied(self, *args, **kwargs):
        return denied() if self.parent == cache / "examples" else stat(self, *args, **kwargs)

    if os.geteuid() == 0:  # what mode 0 does to others than root, whom it lets in
        monkeypatch.setattr(pathlib.Path, "stat", stat_denied)
        monkeypatch.setattr(tempfile, "mkstemp", denied)
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_llama)))
    rows = number_rows(8, seed=6)
    write_jsonl(tmp_path / "train.jsonl", rows)
    try:
        with pytest.warns(PeftkitWarning, match=r"could not read the tokenized-data cache at .*Permission denied"):
            examples, stats = _load(tok, tmp_path / "train.jsonl")
    finally:
        (cache / "examples").chmod(0o700)
    assert _same(examples, tokenize_rows(tok, rows, DataConfig(train="x"), "x")[0]) and "cached" not in stats


def test_a_load_from_the_cache_warns_as_the_load_that_kept_it(tiny_llama, tmp_path, monkeypatch):
    """A warning said while the examples were read (a local file at split 'validation': every row read) is said again
    when they come from the cache, where it was said by the first run alone (and under a launch, where another process
    kept the entry the main process read, by none)."""
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_llama)))
    write_jsonl(tmp_path / "train.jsonl", number_rows(8, seed=3))
    said = []
    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = load_examples(tok, str(tmp_path / "train.jsonl"), "validation",
                                   DataConfig(train=str(tmp_path / "train.jsonl")))
        said.append([str(w.message) for w in caught if issubclass(w.category, PeftkitWarning)])
    assert "cached" in loaded[1] and "warnings" not in loaded[1]
    assert said[0] == said[1] == [f"Data file {tmp_path / 'train.jsonl'}: split 'validation': a local file is one "
                                  "split, 'train', so every row is read. Set the split to train, or slice the file as "
                                  "a hub dataset's split is sliced: 'train[:95%]' and 'train[95%:]'."]
