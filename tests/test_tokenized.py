"""data.format tokenized (peftkit.data.tokenized): rows of token ids taken as given. The independent computation is
the text formats' own: a file of the ids and labels alpaca rows become trains the alpaca run's adapter bit for bit;
bad rows are said by file, line and key; the cache tells a changed row; prompts are the rows' own ids."""

from __future__ import annotations

import io

import pytest
import yaml
from pydantic import ValidationError
from rich.console import Console
from safetensors.torch import load_file

from peftkit.data import IGNORE_INDEX, load_examples
from peftkit.data.prompts import load_prompts
from peftkit.errors import PeftkitError
from peftkit.preview import preview
from peftkit.recipe import DataConfig, load_recipe
from peftkit.tiny import build_char_tokenizer, number_rows, write_jsonl
from peftkit.train import train
from tests.conftest import check_resumes_to_the_same_bits, make_recipe

TOK = build_char_tokenizer()


def _as_tokenized(source, out, cfg: DataConfig | None = None, keep_labels: bool = True):
    """`source`'s alpaca rows as peftkit tokenizes them, written as tokenized rows to `out`."""
    cfg = cfg or DataConfig(train=str(source), format="alpaca", max_length=128)
    examples, _ = load_examples(TOK, str(source), "train", cfg, cache=False)
    write_jsonl(out, [{"input_ids": e.input_ids} | ({"labels": e.labels} if keep_labels else {}) for e in examples])
    return out


def _adapter(run):
    return load_file(run / "adapter" / "adapter_model.safetensors")


def _same_bits(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_tokenized_alpaca_examples_train_the_alpaca_run_bit_for_bit(tiny_llama, number_data, tmp_path):
    """The ids and labels of number_data's alpaca rows, as a tokenized file (train and eval), with group_by_length:
    the same adapter, bit for bit, and the same eval loss, as the alpaca run; and the same examples digest."""
    files = {k: _as_tokenized(number_data[k], tmp_path / f"{k}.jsonl") for k in ("train", "eval")}
    common = {"training": {"max_steps": 3}, "eval": {"base_model": False}}
    text = make_recipe(tmp_path / "a", tiny_llama, number_data, data={"group_by_length": True}, **common)
    ids = make_recipe(tmp_path / "b", tiny_llama, files, data={"format": "tokenized", "group_by_length": True},
                      **common)
    theirs, ours = (train(load_recipe(r), show_summary=False) for r in (text, ids))
    _same_bits(_adapter(tmp_path / "a" / "run"), _adapter(tmp_path / "b" / "run"))
    assert ours["eval_loss"] == theirs["eval_loss"]


def test_a_mix_of_alpaca_and_tokenized_packed_trains_the_alpaca_run(tiny_llama, number_data, tmp_path):
    """data.train [alpaca rows 0-31, the tokenized ids of rows 32-63] under data.packing trains the run of the 64
    alpaca rows bit for bit (a list is concatenated in order, then shuffled)."""
    rows = number_rows(64, seed=1)
    write_jsonl(tmp_path / "first.jsonl", rows[:32])
    write_jsonl(tmp_path / "second.jsonl", rows[32:])
    second = _as_tokenized(tmp_path / "second.jsonl", tmp_path / "second_ids.jsonl")
    common = {"training": {"max_steps": 3}, "eval": {"base_model": False}}
    whole = make_recipe(tmp_path / "a", tiny_llama, number_data, data={"packing": True}, **common)
    mix = make_recipe(tmp_path / "b", tiny_llama, number_data, **common,
                      data={"packing": True, "train": [str(tmp_path / "first.jsonl"),
                                                       {"path": str(second), "format": "tokenized"}]})
    for recipe in (whole, mix):
        train(load_recipe(recipe), show_summary=False)
    _same_bits(_adapter(tmp_path / "a" / "run"), _adapter(tmp_path / "b" / "run"))


def test_a_tokenized_run_resumes_to_the_same_bits(tiny_llama, number_data, tmp_path):
    files = {k: _as_tokenized(number_data[k], tmp_path / f"{k}.jsonl") for k in ("train", "eval")}
    recipe = make_recipe(tmp_path, tiny_llama, files, data={"format": "tokenized"}, eval={"base_model": False},
                         training={"max_steps": 4, "save_steps": 2, "save_total_limit": 10})
    check_resumes_to_the_same_bits(recipe, tmp_path / "run", kill_after=2, steps=4)


def test_rows_are_taken_as_given(tmp_path):
    """No BOS, no EOS, no template: the ids are the row's, and without labels every token trains."""
    write_jsonl(tmp_path / "d.jsonl", [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
                                       {"input_ids": [9, 10, 11], "attention_mask": [1, 1, 1]}])
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), format="tokenized", max_length=3)
    (first, second), stats = load_examples(TOK, cfg.train, "train", cfg)
    assert (first.input_ids, first.labels) == ([5, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, 7])  # cut at max_length
    assert (second.input_ids, second.labels) == ([9, 10, 11], [9, 10, 11])
    assert stats["truncated"] == 1 and stats["target_cut"] == 1
    # a row of one example packed by TRL's pack_dataset (positions 0, 1, 2, ...; one length) is read as without them
    write_jsonl(tmp_path / "e.jsonl", [{"input_ids": [9, 10, 11], "position_ids": [0, 1, 2], "seq_lengths": [3]}])
    (one,), _ = load_examples(TOK, str(tmp_path / "e.jsonl"), "train", cfg)
    assert (one.input_ids, one.labels, one.position_ids) == ([9, 10, 11], [9, 10, 11], None)


BAD = [
    ({"input_ids": []}, "field 'input_ids' is empty"),
    ({"labels": [1]}, "missing field 'input_ids'"),
    ({"input_ids": [5, 6.0]}, "input_ids[1] is 6.0, not an integer"),
    ({"input_ids": [5, True]}, "input_ids[1] is True, not an integer"),
    ({"input_ids": "5 6"}, "field 'input_ids' must be a list of integers, got str"),
    ({"input_ids": [5, -1]}, "input_ids[1] is -1 (a token id is 0 or more)"),
    ({"input_ids": [5, 102]}, "input_ids[1] is 102, past this tokenizer's 102 tokens (ids 0 .. 101: tokenized with "
                              "another tokenizer?)"),
    ({"input_ids": [5, 6], "labels": [5]}, "field 'labels' has 1 entries and field 'input_ids' 2 (one for each token)"),
    ({"input_ids": [5, 6, 7], "labels": [6, 7, -100]},
     "labels[0] is 6, neither input_ids[0] (5) nor -100 (a label is its own token's id, which peftkit shifts as "
     "transformers' causal models do: shifted by one already?)"),
    ({"input_ids": [5, 6], "labels": [-100, -100]}, "field 'labels' trains no token (every label is -100)"),
    ({"input_ids": [5, 6], "attention_mask": [1, 0]}, "attention_mask[1] is 0 (every token of a row is attended: "
                                                      "peftkit pads batches itself, so leave the row's padding out)"),
    ({"input_ids": [5, 6], "input_type_mask": [2, -4]}, "input_type_mask[1] is -4 (CPT's types are 0, none, or "
                                                        "4k + 1 .. 4k + 4)"),
    ({"input_ids": [5, 6], "input_type_mask": [2]}, "field 'input_type_mask' has 1 entries and field 'input_ids' 2 "
                                                    "(one for each token)"),
    ({"input_ids": [5, 6, 7], "labels": [-100, 6, -100], "input_type_mask": [2, 3, 4]},
     "field 'input_type_mask' marks no trained token an output (4k + 4), so CPT's loss has none of this row's tokens"),
    ({"input_ids": [5, 6], "labels": [5, 6], "completion_mask": [0, 1]},
     "fields 'labels' and 'completion_mask' both say which tokens train: give one"),
    ({"input_ids": [5, 6], "assistant_masks": [0, 2]}, "assistant_masks[1] is 2 (1: the token trains, 0: it does not)"),
    ({"input_ids": [5, 6], "completion_mask": [0, 0]}, "field 'completion_mask' trains no token (every entry is 0)"),
    ({"input_ids": [5, 6], "completion_mask": [1]}, "field 'completion_mask' has 1 entries and field 'input_ids' 2 "
                                                    "(one for each token)"),
]


PACKED = ("the row packs several examples, which would attend to one another here (a row is one sequence); give each "
          "example as a row of its own and set data.packing: true (positions restart there, with no attention across "
          "examples)")
BAD += [
    ({"input_ids": [5, 6, 7, 8], "position_ids": [0, 1, 0, 1]}, f"position_ids[2] is 0, not 2: {PACKED}"),
    ({"input_ids": [5, 6, 7, 8], "seq_lengths": [2, 2]}, f"field 'seq_lengths' is [2, 2], not one length: {PACKED}"),
    ({"input_ids": [5, 6], "position_ids": [0, 1, 2]}, "field 'position_ids' has 3 entries and field 'input_ids' 2 "
                                                       "(one for each token)"),
]


@pytest.mark.parametrize(("row", "said"), BAD)
def test_a_bad_row_is_said_by_file_line_and_key(row, said, tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"input_ids": [5, 6]}, row])
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), format="tokenized")
    with pytest.raises(PeftkitError) as e:
        load_examples(TOK, cfg.train, "train", cfg)
    assert str(e.value) == (f"{tmp_path / 'd.jsonl'}:2: {said} for data.format 'tokenized' (each row needs "
                            "input_ids). Fix the row, set the right data.format, or set data.on_bad_rows: skip.")
    skipping = cfg.model_copy(update={"on_bad_rows": "skip"})
    examples, stats = load_examples(TOK, cfg.train, "train", skipping)
    assert len(examples) == 1 and stats["bad_rows"] == 1


@pytest.mark.parametrize("mask", ["completion_mask", "assistant_masks"])
def test_trl_s_masks_read_as_the_labels_they_stand_for(mask, tmp_path):
    """TRL's pre-tokenized columns, 1 where a token trains (SFTTrainer's completion_only_loss, assistant_only_loss),
    give the examples the same rows with labels give, and generation the same prompt and reference."""
    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, -100]},
            {"input_ids": [9, 10, 11], "labels": [-100, 10, 11]}]
    write_jsonl(tmp_path / "labels.jsonl", rows)
    write_jsonl(tmp_path / "mask.jsonl", [{"input_ids": r["input_ids"], mask: [int(x != -100) for x in r["labels"]]}
                                          for r in rows])
    read = {}
    for name in ("labels", "mask"):
        cfg = DataConfig(train=str(tmp_path / f"{name}.jsonl"), format="tokenized")
        examples, _ = load_examples(TOK, cfg.train, "train", cfg)
        read[name] = [(e.input_ids, e.labels) for e in examples]
        # generate --data: a row with the mask is asked for its trained run, as with labels (not taken whole)
        read[name].append([(p.ids, p.reference) for p in load_prompts(TOK, cfg.train, "train", cfg, targets=False)])
    assert read["mask"] == read["labels"]
    assert read["mask"][:2] == [([5, 6, 7, 8, 9], [IGNORE_INDEX, IGNORE_INDEX, 7, 8, IGNORE_INDEX]),
                                ([9, 10, 11], [IGNORE_INDEX, 10, 11])]
    assert [ids for ids, _ in read["mask"][2]] == [[5, 6], [9]]


def test_columns_name_the_fields_and_the_errors_say_the_columns(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"ids": [5, 6, 7], "target": [-100, 6, 7]}, {"ids": [5, 6], "target": [6, 6]}])
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), format="tokenized", columns={"input_ids": "ids",
                                                                                 "labels": "target"})
    with pytest.raises(PeftkitError, match=r"d\.jsonl:2: target\[0\] is 6, neither ids\[0\] \(5\) nor -100"):
        load_examples(TOK, cfg.train, "train", cfg)
    (example,), _ = load_examples(TOK, cfg.train, "train", cfg.model_copy(update={"on_bad_rows": "skip"}))
    assert (example.input_ids, example.labels) == ([5, 6, 7], [IGNORE_INDEX, 6, 7])


@pytest.mark.parametrize(("key", "value", "said"), [
    ("train_on", "all", "data.train_on: all: tokenized rows say which tokens train by their labels"),
    ("chat_template", "chatml", "data.chat_template is the template of chat conversations, and data.format is "
                                "tokenized"),
    ("system_prompt", "Be brief.", "data.system_prompt is the system message of chat conversations, and "
                                   "data.format is tokenized"),
])
def test_chat_and_train_on_keys_are_refused(key, value, said):
    with pytest.raises(ValidationError, match=said):
        DataConfig(train="d.jsonl", format="tokenized", **{key: value})


def test_train_on_still_reads_a_mix_s_text_rows():
    cfg = DataConfig(train=["a.jsonl", {"path": "b.jsonl", "format": "tokenized"}], format="completion",
                     train_on="all")
    assert cfg.train_on == "all"


def test_the_cache_tells_a_changed_row(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}])
    cfg = DataConfig(train=str(path), format="tokenized")
    first, stats = load_examples(TOK, cfg.train, "train", cfg)
    again, cached = load_examples(TOK, cfg.train, "train", cfg)
    assert "cached" not in stats and "cached" in cached and list(again) == list(first)
    write_jsonl(path, [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 10]}])  # one id changed
    changed, stats = load_examples(TOK, cfg.train, "train", cfg)
    assert "cached" not in stats and changed[1].input_ids == [8, 10]


def test_a_prompt_is_the_ids_before_the_last_trained_run(tmp_path):
    """Generation is given the row's own ids (no decode and encode in between), the last run of trained tokens
    decoded is the reference; a row with every token trained has no prompt, which is said."""
    answer = TOK("four</s>", add_special_tokens=False)["input_ids"]
    prompt = [1, *TOK("2+2=", add_special_tokens=False)["input_ids"]]
    write_jsonl(tmp_path / "d.jsonl", [{"input_ids": prompt + answer,
                                        "labels": [IGNORE_INDEX] * len(prompt) + answer}])
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), format="tokenized")
    (asked,) = load_prompts(TOK, cfg.train, "train", cfg)
    assert asked.ids == prompt and asked.reference == "four"
    write_jsonl(tmp_path / "e.jsonl", [{"input_ids": prompt + answer}])
    with pytest.raises(PeftkitError, match=r"e\.jsonl:1: its first token is trained \(no labels, or a label on "
                                           r"input_ids\[0\]\), so there is no prompt to generate from"):
        load_prompts(TOK, str(tmp_path / "e.jsonl"), "train", cfg)
    (whole,) = load_prompts(TOK, str(tmp_path / "e.jsonl"), "train", cfg, targets=False)  # generate --data
    assert whole.ids == prompt + answer and whole.reference is None


def test_a_run_with_samples_and_metrics_preview_validate_verify_and_eval(tiny_llama, number_data, tmp_path):
    """A tokenized run with eval.samples and eval.metrics; `peftkit validate` of its recipe, `peftkit verify` of the
    run (re-trained from the files: the same adapter), `peftkit eval RUN_DIR` (the run's final eval loss) and
    `peftkit preview` (the rows decoded)."""
    import json

    from typer.testing import CliRunner

    from peftkit.cli import app
    from peftkit.verify import verify

    files = {k: _as_tokenized(number_data[k], tmp_path / f"{k}.jsonl") for k in ("train", "eval")}
    recipe = make_recipe(tmp_path, tiny_llama, files, data={"format": "tokenized"}, training={"max_steps": 1},
                         eval={"samples": 2, "metrics": ["exact_match"], "max_new_tokens": 4, "base_model": False})
    assert CliRunner().invoke(app, ["validate", str(recipe)]).exit_code == 0
    summary = train(load_recipe(recipe), show_summary=False)
    assert "eval_exact_match" in summary
    assert verify(tmp_path / "run", console=Console(file=io.StringIO())).ok
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "run"), "--json", str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval.json").read_text())["loss"] == pytest.approx(summary["eval_loss"], abs=1e-6)
    out = io.StringIO()
    shown = preview(load_recipe(recipe), 1, Console(file=out, width=300, no_color=True))
    assert len(shown) == 1 and "format tokenized" in out.getvalue() and "Write the number in words." in out.getvalue()
    assert yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["data"]["format"] == "tokenized"


def test_cpt_types_are_kept_cached_and_a_row_without_them_is_typed_4(tmp_path):
    """A row's input_type_mask masks the labels of tokens not typed an output; a row without the column, among rows
    with it, is typed 4 throughout (peft's default); the cache gives the types back."""
    write_jsonl(tmp_path / "d.jsonl", [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9, 10], "input_type_mask": [2, 4, 0]}])
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), format="tokenized")
    (first, second), stats = load_examples(TOK, cfg.train, "train", cfg)
    assert (first.types, first.labels) == ([4, 4, 4], [5, 6, 7])
    assert (second.types, second.labels) == ([2, 4, 0], [IGNORE_INDEX, 9, IGNORE_INDEX])
    cached, again = load_examples(TOK, cfg.train, "train", cfg)
    assert "cached" in again and list(cached) == [first, second]


def test_generation_is_given_the_row_s_own_ids(tiny_llama, tmp_path):
    """The model's first forward in generation reads exactly the row's ids before its trained run, passed through
    untouched: its text encoded again as a prompt is encoded would give another BOS in front."""
    import torch

    from peftkit.decoding import Sampling, generate_texts
    from tests.conftest import load_fp32

    prompt = [1, 40, 41, 97, 3]  # <s> A B z <unk>
    write_jsonl(tmp_path / "d.jsonl", [{"input_ids": prompt + [42, 43], "labels": [IGNORE_INDEX] * 5 + [42, 43]}])
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), format="tokenized")
    prompts = load_prompts(TOK, cfg.train, "train", cfg)
    assert TOK(prompts[0].text)["input_ids"] == [1, *prompt]  # (what a text round trip would have asked)
    model, seen = load_fp32(tiny_llama), []
    model.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs["input_ids"].clone()), with_kwargs=True)
    generate_texts(model, TOK, prompts, Sampling(max_new_tokens=2))
    assert torch.equal(seen[0], torch.tensor([prompt]))


def test_ids_of_model_add_tokens_tokens_are_in_the_vocabulary(tmp_path):
    tok = build_char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    write_jsonl(tmp_path / "d.jsonl", [{"input_ids": [5, 102, 6]}])
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), format="tokenized")
    (example,), _ = load_examples(tok, cfg.train, "train", cfg)
    assert example.input_ids == [5, 102, 6]


def test_an_id_past_the_model_s_embedding_rows_is_refused(tiny_llama, tmp_path, monkeypatch, capsys):
    """A tokenizer with a token the model has no row for (103 tokens, 102 rows): an id of it in tokenized rows is
    within the tokenizer's length (no bad row), and was said only at the first forward (the guard's 'token
    '<|extra|>' (id 102) has no embedding'). train and validate say it where they read the rows, by file, line and
    id (data.train's, data.eval's); with model.add_tokens naming the token, as the error says, the recipe validates."""
    import shutil

    from peftkit.errors import PeftkitError
    from tests.conftest import cli_user_error

    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    tok = build_char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    tok.save_pretrained(base)
    bad, good = tmp_path / "d.jsonl", tmp_path / "good.jsonl"
    write_jsonl(bad, [{"input_ids": [5, 6, 7]}, {"input_ids": [5, 102, 6]}])
    write_jsonl(good, [{"input_ids": [5, 6, 7]}])
    recipe = make_recipe(tmp_path, base, {"train": bad, "eval": good}, data={"format": "tokenized"},
                         training={"max_steps": 1})
    said = ("input_ids[1] is 102 ('<|extra|>'), past the model's 102 embedding rows (ids 0 .. 101): its tokenizer has "
            "103 tokens, some added after the model was saved, which the model has no embedding for. Tokenize the "
            "rows with the tokenizer the model was saved with (tokenized with another one?), or list the tokens they "
            "use in model.add_tokens (peftkit adds their rows and trains them: ['<|extra|>']).")
    with pytest.raises(PeftkitError) as e:
        train(load_recipe(recipe), show_summary=False)
    assert f"{bad}:2: {said}" == " ".join(str(e.value).split())
    err = cli_user_error(monkeypatch, capsys, "validate", str(recipe), "--set", f"data.train={good}",
                         "--set", f"data.eval={bad}")
    assert f"{bad}:2: {said}" in " ".join(err.split()), err
    from typer.testing import CliRunner

    from peftkit.cli import app

    fixed = CliRunner().invoke(app, ["validate", str(recipe), "--set", "model.add_tokens=['<|extra|>']"])
    assert fixed.exit_code == 0, fixed.output


@pytest.mark.parametrize(("sections", "said"), [
    ({"training": {"objective": "dpo"}}, "training.objective is dpo and data.format is tokenized: DPO, ORPO, SimPO "
                                         "and reward models train on pairs of answers"),
    ({"training": {"objective": "simpo"}}, "training.objective is simpo and data.format is tokenized: DPO, ORPO, "
                                           "SimPO and reward models train on pairs of answers"),
    ({"training": {"objective": "kto"}}, "training.objective is kto and data.format is tokenized: KTO trains on "
                                         "unpaired answers (data.format: unpaired: prompt, completion and a "
                                         "true/false label)"),
    ({"model": {"task": "sequence_classification", "num_labels": 2}},
     "model.task is 'sequence_classification' and data.format is 'tokenized': a sequence_classification model trains "
     "on data.format: classification"),
])
def test_pair_and_classifier_recipes_refuse_tokenized_rows(sections, said, tiny_llama, number_data, tmp_path):
    recipe = make_recipe(tmp_path, tiny_llama, number_data, data={"format": "tokenized"})
    raw = yaml.safe_load(recipe.read_text())
    for section, keys in sections.items():
        raw[section] |= keys
    recipe.write_text(yaml.safe_dump(raw))
    with pytest.raises(PeftkitError) as e:
        load_recipe(recipe)
    assert said in " ".join(str(e.value).split())


def test_a_mix_s_skip_counts_per_dataset_count_an_id_past_the_tokenizer(tiny_llama, tmp_path):
    """data.train [tokenized rows, one with an id past the tokenizer's and one with shifted labels; alpaca rows, one
    without its output] under on_bad_rows: skip: each file's count says its skipped rows, the id's row too, and they
    add up to the total, in train's line and preview's alike (the id's row was left out of the file's count)."""
    from peftkit.data import describe_stats

    write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": [5, 6, 7]}, {"input_ids": [5, 500, 6]},
                                         {"input_ids": [5, 6, 7], "labels": [6, 7, -100]}])
    write_jsonl(tmp_path / "alpaca.jsonl", [*number_rows(2, seed=1), {"instruction": "x"}])
    data = {"train": [{"path": str(tmp_path / "ids.jsonl"), "format": "tokenized"}, str(tmp_path / "alpaca.jsonl")],
            "on_bad_rows": "skip"}
    recipe = load_recipe(make_recipe(tmp_path, tiny_llama, {"train": "x", "eval": tmp_path / "alpaca.jsonl"},
                                     data=data))
    _, stats = load_examples(TOK, recipe.data.train, None, recipe.data, cache=False)
    said = "skipped 3 bad rows (ids.jsonl 2, alpaca.jsonl 1; data.on_bad_rows: skip)"
    assert stats["bad_rows_by_dataset"] == {"ids.jsonl": 2, "alpaca.jsonl": 1}
    assert said in describe_stats(stats, recipe.data)[0]
    out = io.StringIO()
    preview(recipe, 1, Console(file=out, width=300, no_color=True))
    assert said in out.getvalue()


def test_list_columns_survive_parquet_json_arrays_and_a_hub_dataset(tmp_path, monkeypatch):
    """Rows of ids read through `datasets` (a .parquet file of int64 lists and one of int32/int16 lists, a .json
    array, a hub dataset in an offline datasets cache: its arrow files) give the .jsonl file's examples, a row's null
    labels (every token trained) too; a parquet column of floats is a bad row by text."""
    import json

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.test_hub import DATASET, _publish_dataset

    rows = [{"input_ids": [1, 40, 41, 42], "labels": [-100, -100, 41, 42]}, {"input_ids": [5, 6, 7], "labels": None},
            {"input_ids": [9, 10, 11, 12, 13], "labels": [-100, 10, 11, -100, -100]}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    narrow = {"input_ids": pa.array([r["input_ids"] for r in rows], pa.list_(pa.int32())),
              "labels": pa.array([r["labels"] for r in rows], pa.list_(pa.int16()))}
    pq.write_table(pa.table(narrow), tmp_path / "narrow.parquet")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    _publish_dataset(tmp_path / "datasets", rows, "a" * 40, tmp_path)

    def read(path):
        cfg = DataConfig(train=path, format="tokenized")
        return [(e.input_ids, e.labels) for e in load_examples(TOK, path, "train", cfg, cache=False)[0]]

    expected = read(str(tmp_path / "d.jsonl"))
    assert expected[1] == ([5, 6, 7], [5, 6, 7])
    for path in ("d.parquet", "narrow.parquet", "d.json"):
        assert read(str(tmp_path / path)) == expected, path
    assert read(DATASET) == expected
    pq.write_table(pa.table({"input_ids": [[1.0, 2.0]]}), tmp_path / "floats.parquet")
    with pytest.raises(PeftkitError, match=r"floats\.parquet row 1: input_ids\[0\] is 1\.0, not an integer"):
        read(str(tmp_path / "floats.parquet"))


def test_a_reference_keeps_model_add_tokens_markers_as_answers_are_scored(tmp_path):
    """A row whose trained run holds tokens of model.add_tokens (`<calc>8+3</calc> eleven</s>`): its reference keeps
    the markers, up to the EOS, as an answer is decoded to be scored (`evaluate.answer_text`, of the ids generation
    gives: cut before the first stop token), so an answer that is the trained run token for token scores 1 (its
    reference decoded without the markers scored 0), as the text formats' references, the row's own text, do; a
    conversation's run ends at the chat template's end of turn, `<|im_end|>`, as generation does."""
    from peftkit.evaluate import answer_text
    from peftkit.metrics import score
    from peftkit.new_tokens import add_to_tokenizer

    tok = build_char_tokenizer()
    add_to_tokenizer(tok, ["<calc>", "</calc>"])
    prompt = TOK("2+2=", add_special_tokens=True)["input_ids"]
    answer = tok("<calc>8+3</calc> eleven", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(set(answer) & {102, 103}) == 2  # the markers are one token each
    write_jsonl(tmp_path / "d.jsonl", [{"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}])
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), format="tokenized")
    (asked,) = load_prompts(tok, cfg.train, "train", cfg)
    assert asked.ids == prompt and asked.reference == "<calc>8+3</calc> eleven"
    assert score([answer_text(tok)(answer[:-1])], [asked.reference], ["exact_match"])["exact_match"] == 1.0
    # a conversation's ids (ChatML): the run ends at the template's end of turn, where generation stops
    from peftkit.data.chat_templates import CHATML

    add_to_tokenizer(tok, ["<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHATML
    answer = tok("<calc>1</calc> one<|im_end|>", add_special_tokens=False)["input_ids"]
    write_jsonl(tmp_path / "d.jsonl", [{"input_ids": prompt + answer,
                                        "assistant_masks": [0] * len(prompt) + [1] * len(answer)}])
    (asked,) = load_prompts(tok, cfg.train, "train", cfg)
    assert asked.reference == "<calc>1</calc> one"


def test_the_columns_row_names_every_field_a_tokenized_row_may_map():
    """docs/recipe.md's `columns` row lists the keys data.columns takes for tokenized rows: every field the format
    reads (TRL's completion_mask and assistant_masks were left out)."""
    from pathlib import Path

    from peftkit.data.formats import OPTIONAL_FIELDS, REQUIRED_FIELDS

    row = next(line for line in (Path(__file__).parents[1] / "docs" / "recipe.md").read_text().splitlines()
               if line.startswith("| `columns` |"))
    listed = row.split("for `tokenized` ", 1)[1].split(", whose errors", 1)[0]
    assert [f.strip("`") for f in listed.replace(" and ", ", ").split(", ")] == [
        *REQUIRED_FIELDS["tokenized"], *OPTIONAL_FIELDS["tokenized"]]


def test_prompts_skip_a_row_with_an_id_past_the_tokenizer_as_the_loss_does(tmp_path):
    """eval.metrics and `peftkit eval --metrics` under on_bad_rows: skip: a row with an id past the tokenizer's is
    skipped by the prompts as by the loss's examples (it stopped the prompts with the bare problem, no file's fix),
    and under error it is said as a bad row is, with the fix."""
    rows = [{"input_ids": [1, 40, 41, 42], "labels": [-100, -100, 41, 42]},
            {"input_ids": [1, 40, 500, 42], "labels": [-100, -100, 500, 42]},
            {"input_ids": [1, 43, 44], "labels": [-100, -100, 44]}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), format="tokenized", on_bad_rows="skip")
    prompts = load_prompts(TOK, cfg.train, "train", cfg, as_loss=True)
    assert [p.ids for p in prompts] == [[1, 40], [1, 43]]
    with pytest.raises(PeftkitError) as e:
        load_prompts(TOK, cfg.train, "train", cfg.model_copy(update={"on_bad_rows": "error"}), as_loss=True)
    assert str(e.value) == (f"{tmp_path / 'd.jsonl'}:2: input_ids[2] is 500, past this tokenizer's 102 tokens (ids "
                            "0 .. 101: tokenized with another tokenizer?) for data.format 'tokenized' (each row needs "
                            "input_ids). Fix the row, set the right data.format, or set data.on_bad_rows: skip.")
