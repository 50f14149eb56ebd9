"""RoPE scaling from the recipe (peftkit.rope_scaling): the model's rotary embedding uses the factor (its logits are
those of a model transformers builds with that rope config), a LongLoRA recipe trains past max_position_embeddings,
the adapter's peftkit.json and a merged model's config.json carry the scaling (eval after export = the run's own
eval), and a too-long data.max_length is a recipe error naming the keys."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from peftkit.data import load_examples
from peftkit.errors import PeftkitError
from peftkit.eval_job import EvalJob
from peftkit.evaluate import evaluate
from peftkit.inference import ModelSource
from peftkit.modeling import load_config, load_model
from peftkit.recipe import DataConfig, ModelConfig, load_recipe
from peftkit.rope_scaling import stale_cache_past_context
from peftkit.tiny import build_tiny_model
from tests.conftest import make_recipe, save_random_adapter

POSITIONS = 64  # the short model's max_position_embeddings; number_data's rows are 78 to 104 tokens


@pytest.fixture(scope="module")
def short_llama(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rope") / "llama-64"
    build_tiny_model(path, arch="llama", hidden_size=32, num_layers=2, seed=0, max_position_embeddings=POSITIONS)
    return path


def _scaled(base: Path, rope: dict) -> torch.nn.Module:
    return load_model(ModelConfig(name_or_path=str(base), rope_scaling=rope), device=torch.device("cpu")).eval()


@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "yarn"])
def test_rotary_embedding_uses_the_factor(rope_type, short_llama):
    """Logits over 150 tokens equal those of a model transformers builds from a config with that rope_parameters."""
    ours = _scaled(short_llama, {"type": rope_type, "factor": 3})
    raw = AutoConfig.from_pretrained(short_llama).to_dict()
    raw["rope_parameters"] = {"rope_type": rope_type, "factor": 3.0, "rope_theta": 10000.0}
    config = LlamaConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "transformers_version")})
    reference = AutoModelForCausalLM.from_pretrained(short_llama, config=config).eval()
    plain = AutoModelForCausalLM.from_pretrained(short_llama).eval()
    ids = torch.randint(4, 90, (2, 150), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ours(ids).logits
        assert torch.equal(logits, reference(ids).logits)
        assert (logits - plain(ids).logits).abs().max() > 1e-2  # the scaling changes the model
    assert ours.model.rotary_emb.rope_type == rope_type


def _recipe(tmp_path: Path, base: Path, files: dict, rope: dict | None, model_keys: dict | None = None,
            **sections) -> Path:
    """make_recipe's recipe with model.rope_scaling (and `model_keys`) set."""
    path = make_recipe(tmp_path, base, files, **sections)
    recipe = yaml.safe_load(path.read_text())
    recipe["model"] |= (model_keys or {}) | ({"rope_scaling": rope} if rope is not None else {})
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _eval_loss(source: ModelSource, data: str) -> float:
    job = EvalJob(data=data, data_cfg=DataConfig(train=data, max_length=128), batch_size=8, source=source)
    return evaluate(job)["loss"]


def test_longlora_recipe_trains_past_max_position_embeddings_and_exports_the_scaling(short_llama, number_data, tmp_path):
    from peftkit.train import train

    sections = {"adapter": {"modules_to_save": ["embed_tokens", "norm"]},
                "training": {"max_steps": 4, "batch_size": 8, "lr": 1e-2}, "export": {"merged": True}}
    recipe = load_recipe(_recipe(tmp_path, short_llama, number_data, {"type": "linear", "factor": 2},
                                 {"long_context": {"s2_attention": True}}, **sections))
    tok = AutoTokenizer.from_pretrained(short_llama)
    rows = load_examples(tok, str(number_data["train"]), "train", recipe.data)[0]
    assert min(len(e.input_ids) for e in rows) > POSITIONS  # every training row lies past the model's positions
    summary = train(recipe, show_summary=False)
    assert summary["eval_loss"] < summary["base_eval_loss"]
    run = tmp_path / "run"
    assert json.loads((run / "adapter" / "peftkit.json").read_text())["rope_scaling"] == {"type": "linear", "factor": 2.0}
    merged_config = json.loads((run / "merged" / "config.json").read_text())
    assert merged_config["rope_parameters"] | {"rope_theta": None} == {"rope_type": "linear", "factor": 2.0, "rope_theta": None}
    assert merged_config["max_position_embeddings"] == POSITIONS
    data = str(number_data["eval"])
    adapter = _eval_loss(ModelSource(adapter=str(run / "adapter")), data)  # the base from the adapter's record
    assert abs(adapter - summary["eval_loss"]) <= 1e-5
    merged = _eval_loss(ModelSource(ModelConfig(name_or_path=str(run / "merged"))), data)
    assert abs(merged - summary["eval_loss"]) <= 1e-4
    unscaled = tmp_path / "unscaled"  # the same adapter without the record: another model, another loss
    shutil.copytree(run / "adapter", unscaled)
    meta = json.loads((unscaled / "peftkit.json").read_text())
    (unscaled / "peftkit.json").write_text(json.dumps(meta | {"rope_scaling": None}))
    assert abs(_eval_loss(ModelSource(adapter=str(unscaled)), data) - adapter) > 1e-3

    # Combining keeps the record too: a combined adapter's peftkit.json, and a merge into the base's config.json
    # (of a plain LoRA: adapters that save whole modules do not combine).
    from peftkit.combine_adapters import combine_adapters
    from peftkit.combine_inputs import Combination

    plain = _recipe(tmp_path / "plain", short_llama, number_data, {"type": "linear", "factor": 2},
                    training={"max_steps": 2, "batch_size": 8}, eval={"base_model": False})
    train(load_recipe(plain), show_summary=False)
    halves, lora = Combination("linear", (0.5, 0.5)), str(tmp_path / "plain" / "run" / "adapter")
    combined = combine_adapters([lora] * 2, halves, str(tmp_path / "combined"))
    assert json.loads((combined / "peftkit.json").read_text())["rope_scaling"] == {"type": "linear", "factor": 2.0}
    folded = combine_adapters([lora] * 2, halves, str(tmp_path / "folded"), into_base=True)
    assert json.loads((folded / "config.json").read_text())["rope_parameters"]["factor"] == 2.0


def test_dynamic_rope_evaluations_see_the_model_as_loaded(short_llama, number_data, tmp_path):
    """transformers' dynamic RoPE keeps the frequencies of the longest sequence it saw: the run's evaluations used the
    training batches' (its final eval loss 4.9553 where `peftkit eval` of its adapter gave 4.9477 on the hunt's
    model). Long training rows, short eval rows (still past the 64 positions), an adapter training cannot move."""
    from peftkit.tiny import number_rows, write_jsonl
    from peftkit.train import train

    write_jsonl(tmp_path / "short.jsonl", [dict(r, instruction="n") for r in number_rows(8, seed=5)])
    data = {"train": number_data["train"], "eval": tmp_path / "short.jsonl"}
    summary = train(load_recipe(_recipe(tmp_path, short_llama, data, {"type": "dynamic", "factor": 2},
                                        training={"max_steps": 2, "batch_size": 16, "lr": 1e-12})), show_summary=False)
    after = _eval_loss(ModelSource(adapter=str(tmp_path / "run" / "adapter")), str(tmp_path / "short.jsonl"))
    assert summary["eval_loss"] == pytest.approx(after, abs=1e-6)
    assert summary["eval_loss"] == pytest.approx(summary["base_eval_loss"], abs=1e-5)


def test_each_eval_set_and_comparison_row_sees_dynamic_rope_as_loaded(short_llama, number_data, tmp_path):
    """`peftkit eval RECIPE` of several data.eval sets scores them on one loaded model: the second set ran on the
    frequencies of the first's longest rows (4.6722 where the set alone gave 4.6655), and so did a comparison's rows
    on the model they share (a comparison on several sets: the same). Long rows first, then rows still past the 64
    positions but shorter."""
    from peftkit.compare import compare_sets, comparison_jobs
    from peftkit.eval_job import eval_job
    from peftkit.evaluate import evaluate_sets
    from peftkit.tiny import number_rows, write_jsonl

    write_jsonl(tmp_path / "long.jsonl", [dict(r, input=r["input"] * 20) for r in number_rows(8, seed=7)])
    data = {"train": number_data["train"], "eval": number_data["eval"]}
    recipe = _recipe(tmp_path, short_llama, data, {"type": "dynamic", "factor": 4}, data={
        "max_length": 200, "eval": {"long": str(tmp_path / "long.jsonl"), "short": str(number_data["eval"])}})
    flags = dict(overrides=[], model=None, fmt=None, adapter=None, max_length=None, batch_size=None, on_bad_rows=None)
    jobs = {name: eval_job(recipe, data=None, eval_set=name, **flags) for name in ("long", "short")}
    alone = {name: evaluate(eval_job(recipe, data=str(path), **flags))
             for name, path in (("long", tmp_path / "long.jsonl"), ("short", number_data["eval"]))}
    assert evaluate_sets(jobs) == alone
    adapter = save_random_adapter(short_llama, load_recipe(recipe).adapter, tmp_path / "a", seed=1)
    rows = {each: comparison_jobs(job, [("a", str(adapter)), ("b", str(adapter))], []) for each, job in jobs.items()}
    assert compare_sets(rows)["short"] == compare_sets({"short": rows["short"]})["short"]


def test_each_eval_batch_s_loss_is_that_batch_s_on_a_fresh_model_whatever_ran_before(short_llama, tmp_path,
                                                                                      monkeypatch):
    """Within one evaluation, a batch's loss depended on the batches before it: dynamic RoPE kept the frequencies of
    the longest batch, so short rows (still past the 64 positions) after long ones scored otherwise than alone. The
    same rows in two batch orders give each batch's loss exactly, each equal to that batch on a freshly loaded model
    (and the model is left as it was: training's frequencies are its own)."""
    import peftkit.evaluate as evaluation
    from peftkit.evaluate import evaluate_loss
    from peftkit.tiny import number_rows, write_jsonl

    rope, tok = {"type": "dynamic", "factor": 4}, AutoTokenizer.from_pretrained(short_llama)
    batches = {"long": [dict(r, input=r["input"] * 30) for r in number_rows(2, seed=7)], "short": number_rows(2, seed=5)}
    for name, rows in [*batches.items(), ("long_first", batches["long"] + batches["short"]),
                       ("short_first", batches["short"] + batches["long"])]:
        write_jsonl(tmp_path / f"{name}.jsonl", rows)

    def examples(name: str):
        return load_examples(tok, str(tmp_path / f"{name}.jsonl"), None, DataConfig(train="x", max_length=256),
                             cache=False)[0]

    assert min(examples("short").lengths()) > POSITIONS and max(examples("long").lengths()) > 2 * POSITIONS
    seen: list[tuple[tuple, float, int]] = []  # (the batch's first row, its loss sum, its token count), in order
    real = evaluation.token_loss_sum

    def recorded(model, batch, labelled=None):
        loss, n = real(model, batch, labelled)
        seen.append((tuple(batch["input_ids"][0].tolist()), float(loss), int(n)))
        return loss, n

    monkeypatch.setattr(evaluation, "token_loss_sum", recorded)
    fresh = {}
    for name in batches:  # each set alone, on a model just loaded: a batch per row (past the context, each its length)
        del seen[:]
        evaluate_loss(_scaled(short_llama, rope), examples(name), 2, tok.pad_token_id)
        fresh |= {first: rest for first, *rest in seen}
    model = _scaled(short_llama, rope)
    rotary = model.model.rotary_emb
    model(torch.randint(4, 90, (1, 250)))  # a training-like forward past every eval row: frequencies for 250
    before = rotary.inv_freq.clone()
    for order in ("long_first", "short_first"):
        del seen[:]
        evaluate_loss(model, examples(order), 2, tok.pad_token_id)
        assert len(seen) == 4 and {first: rest for first, *rest in seen} == fresh
    assert torch.equal(rotary.inv_freq, before)


def test_a_dpo_reference_is_scored_batch_by_batch_as_the_policy_is(short_llama, tmp_path):
    """`PreferenceEval` scores each batch with dynamic RoPE as loaded, and the reference's log-probabilities of the
    same batches were taken one after the other: a batch after a longer one on that one's frequencies. A model set
    against itself then had rewards off 0 (the comparison's base row: loss 0.6908, margin 0.0048 on these pairs).
    Long pairs, then pairs still past the 64 positions but shorter, in batches of 2: a DPO run that cannot move its
    adapter ends at log 2 with rewards 0, and `peftkit eval` of it (a comparison, its base row the base against
    itself) says the same."""
    import math

    from typer.testing import CliRunner

    from peftkit.cli import app
    from peftkit.tiny import preference_rows, write_jsonl
    from peftkit.train import train

    pairs = preference_rows(4, seed=3)
    write_jsonl(tmp_path / "eval.jsonl", [dict(r, prompt=r["prompt"] * (8 if i < 2 else 3))
                                          for i, r in enumerate(pairs)])
    write_jsonl(tmp_path / "train.jsonl", [dict(r, prompt=r["prompt"] * 8) for r in preference_rows(4, seed=4)])
    data = {"train": tmp_path / "train.jsonl", "eval": tmp_path / "eval.jsonl"}
    recipe = _recipe(tmp_path, short_llama, data, {"type": "dynamic", "factor": 8},
                     data={"format": "preference", "max_length": 512}, adapter={"dropout": 0.0},
                     training={"objective": "dpo", "max_steps": 1, "batch_size": 2, "lr": 1e-12},
                     eval={"batch_size": 2})
    summary = train(load_recipe(recipe), show_summary=False)
    assert summary["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(summary["eval_reward_margin"]) <= 1e-6 and summary["eval_reward_accuracy"] == 0.0
    out = tmp_path / "figures.json"
    result = CliRunner().invoke(app, ["eval", str(recipe), "--adapter", f"a={tmp_path / 'run' / 'adapter'}", "--json",
                                      str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    rows = json.loads(out.read_text())
    assert rows["base"]["loss"] == pytest.approx(math.log(2), abs=1e-7), rows
    assert rows["base"]["reward_margin"] == rows["base"]["chosen_reward"] == rows["base"]["rejected_reward"] == 0.0
    assert rows["a"]["loss"] == pytest.approx(summary["eval_loss"], abs=1e-7)


@pytest.mark.parametrize(("rope", "max_length", "message"), [
    (None, 128, "data.max_length 128 is longer than {model}'s max_position_embeddings (64). Lower data.max_length "
                "to 64, or scale its RoPE to cover it: model.rope_scaling: {{type: linear, factor: 2}}."),
    ({"type": "linear", "factor": 2}, 200, "data.max_length 200 is longer than the 128 positions model.rope_scaling "
                                           "covers (max_position_embeddings 64 x factor 2). Raise "
                                           "model.rope_scaling.factor to 4, or lower data.max_length to 128."),
])
def test_too_long_max_length_is_a_recipe_error(rope, max_length, message, short_llama, number_data, tmp_path):
    from peftkit.train import train

    recipe = _recipe(tmp_path, short_llama, number_data, rope, data={"max_length": max_length})
    with pytest.raises(PeftkitError) as error:
        train(load_recipe(recipe), show_summary=False)
    assert str(error.value) == message.format(model=short_llama)
    assert not (tmp_path / "run" / "recipe.yaml").exists()  # said before the model loads or the run starts


def test_virtual_tokens_that_fill_the_positions_alone_are_the_fix(short_llama, number_data, tmp_path):
    """A prompt-family adapter whose virtual tokens alone take every position: no data.max_length fits beside them,
    so the fix is fewer virtual tokens (it said 'Lower data.max_length to 0', and -808 for SmolLM2's 8192 and 9000)."""
    from peftkit.rope_scaling import check_context_length

    config = load_config(ModelConfig(name_or_path=str(short_llama)))
    for rope, virtual, fix in [
            (None, 64, "Give the adapter fewer virtual tokens (adapter.num_virtual_tokens; CPT's: a shorter "
                       "adapter.context): its 64 alone leave none of the 64 positions to the data, or scale its "
                       "RoPE to cover it: model.rope_scaling: {type: linear, factor: 2}."),
            ({"type": "linear", "factor": 2}, 130, "Raise model.rope_scaling.factor to 3, or give the adapter fewer "
                                                   "virtual tokens (adapter.num_virtual_tokens; CPT's: a shorter "
                                                   "adapter.context): its 130 alone leave none of the 128 positions "
                                                   "to the data."),
            (None, 40, "Lower data.max_length to 24, or scale")]:
        path = _recipe(tmp_path, short_llama, number_data, rope, data={"max_length": 32})
        path.write_text(yaml.safe_dump(yaml.safe_load(path.read_text()) | {
            "adapter": {"method": "prompt_tuning", "num_virtual_tokens": virtual}}))
        with pytest.raises(PeftkitError) as error:
            check_context_length(load_recipe(path), config)
        assert f"data.max_length 32 plus the adapter's {virtual} virtual tokens is longer than" in str(error.value)
        assert fix in str(error.value)


def test_a_model_whose_config_scales_covers_its_scaled_length(short_llama, number_data, tmp_path):
    """A merged model of a scaled run (linear, factor 2 over 64 positions) was refused at max_length 128 with advice
    to scale its RoPE, which is then refused as scaling twice."""
    from peftkit.rope_scaling import check_context_length

    scaled = shutil.copytree(short_llama, tmp_path / "scaled")
    config = json.loads((scaled / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    (scaled / "config.json").write_text(json.dumps(config))
    model_config = load_config(ModelConfig(name_or_path=str(scaled)))
    check_context_length(load_recipe(_recipe(tmp_path, scaled, number_data, None, data={"max_length": 128})), model_config)
    with pytest.raises(PeftkitError, match=r"data.max_length 129 is longer than the 128 positions .* covers \(its "
                                           r"config.json's RoPE scaling\). Lower data.max_length to 128."):
        check_context_length(load_recipe(_recipe(tmp_path, scaled, number_data, None, data={"max_length": 129})),
                             model_config)


def test_a_model_without_rope_is_refused(tiny_gpt2):
    with pytest.raises(PeftkitError, match=r"model.rope_scaling: .* \(gpt2\) has no rotary position embeddings"):
        load_config(ModelConfig(name_or_path=str(tiny_gpt2), rope_scaling={"type": "linear", "factor": 2}))


def test_a_model_that_scales_already_is_refused(short_llama, tmp_path):
    scaled = tmp_path / "scaled"
    shutil.copytree(short_llama, scaled)
    config = json.loads((scaled / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    (scaled / "config.json").write_text(json.dumps(config))
    with pytest.raises(PeftkitError, match="scales its RoPE already .rope_type 'dynamic'"):
        load_config(ModelConfig(name_or_path=str(scaled), rope_scaling={"type": "linear", "factor": 2}))


def test_gemma3_has_its_full_attention_rope_scaled(number_data, tmp_path):
    """Gemma 3 keeps a RoPE per attention type: the recipe's scaling goes to the full-attention one (as Gemma 3's
    long-context checkpoints scale it), the sliding-window one stays; logits are those of the model transformers
    builds with that config, a run trains past max_position_embeddings, and its adapter and merged model evaluate as
    the run did. A full-attention RoPE scaled already, or dynamic scaling per type, is refused."""
    from peftkit.recipe import RopeScalingConfig
    from peftkit.rope_scaling import scale_rope
    from peftkit.train import train

    base = tmp_path / "gemma3-64"
    build_tiny_model(base, arch="gemma3", hidden_size=32, num_layers=2, seed=0, max_position_embeddings=POSITIONS)
    ours = _scaled(base, {"type": "linear", "factor": 2})
    config = AutoConfig.from_pretrained(base)
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    rotary, unscaled = ours.model.rotary_emb, plain.model.rotary_emb
    assert torch.equal(rotary.full_attention_inv_freq, unscaled.full_attention_inv_freq / 2)
    assert torch.equal(rotary.sliding_attention_inv_freq, unscaled.sliding_attention_inv_freq)
    config.rope_parameters = {**config.rope_parameters,
                              "full_attention": config.rope_parameters["full_attention"] | {"rope_type": "linear",
                                                                                            "factor": 2.0}}
    theirs = AutoModelForCausalLM.from_pretrained(base, config=config, dtype=torch.float32).eval()
    ids = torch.arange(4, 4 + 2 * POSITIONS).unsqueeze(0) % 90 + 4
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
        assert not torch.equal(ours(input_ids=ids).logits, plain(input_ids=ids).logits)

    recipe = load_recipe(_recipe(tmp_path, base, number_data, {"type": "linear", "factor": 2},
                                 training={"max_steps": 3, "batch_size": 8, "lr": 1e-2}, export={"merged": True}))
    summary = train(recipe, show_summary=False)
    run, data = tmp_path / "run", str(number_data["eval"])
    merged_rope = json.loads((run / "merged" / "config.json").read_text())["rope_parameters"]
    assert merged_rope["full_attention"] | {"rope_theta": None} == {"rope_type": "linear", "factor": 2.0,
                                                                    "rope_theta": None}
    assert merged_rope["sliding_attention"]["rope_type"] == "default"
    assert abs(_eval_loss(ModelSource(adapter=str(run / "adapter")), data) - summary["eval_loss"]) <= 1e-5
    assert abs(_eval_loss(ModelSource(ModelConfig(name_or_path=str(run / "merged"))), data) - summary["eval_loss"]) <= 1e-4

    with pytest.raises(PeftkitError, match=r"model.rope_scaling: m scales its full-attention RoPE already \(rope_type "
                                           r"'linear', factor 2.0, in its config.json\)"):
        scale_rope(AutoConfig.from_pretrained(run / "merged"), RopeScalingConfig(type="linear", factor=2), "m")
    with pytest.raises(PeftkitError, match="dynamic scaling of g's RoPE per attention type is not supported; use "
                                           "type: linear or yarn"):
        scale_rope(AutoConfig.from_pretrained(base), RopeScalingConfig(type="dynamic", factor=2), "g")


def _answers(n: int, seed: int, repeat: int, objective: str) -> list[dict]:
    """`n` sums, each prompt `repeat` times as long (past the 64 positions): DPO's pairs or KTO's unpaired answers."""
    import random

    rng, rows = random.Random(seed), []
    for i in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        prompt = f"{a}+{b}=" * repeat
        rows.append({"prompt": prompt, "chosen": str(a + b), "rejected": str(a - b)} if objective == "dpo" else
                    {"prompt": prompt, "completion": str(a + b if i % 2 else a - b), "label": bool(i % 2)})
    return rows


def _preference_recipe(tmp_path: Path, base: Path, objective: str, max_steps: int) -> Path:
    """A DPO or KTO recipe on tmp_path's train.jsonl and eval.jsonl, dynamic RoPE x4 over the 64 positions."""
    return _recipe(tmp_path, base, {"train": tmp_path / "train.jsonl", "eval": tmp_path / "eval.jsonl"},
                   {"type": "dynamic", "factor": 4}, data={"format": "preference" if objective == "dpo" else
                                                           "unpaired", "max_length": 256},
                   adapter={"dropout": 0.0}, eval={"batch_size": 2, "samples": 0},
                   training={"objective": objective, "max_steps": max_steps, "batch_size": 4, "lr": 1e-2})


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_a_preference_run_s_last_evaluation_is_eval_s_under_dynamic_rope(short_llama, tmp_path, objective):
    """The eval rows' reference log-probabilities were computed with the frequencies the training rows' reference
    left (dynamic RoPE keeps the longest sequence's), where `peftkit eval RUN_DIR` computed them from the model's own:
    the run's last figures differed from eval's. Long training rows, eval rows past the 64 positions in mixed lengths
    (long batches, then shorter ones): each eval batch's reference is now that batch's on a freshly loaded model, in
    the run as in eval, and the two give the same figures."""
    from typer.testing import CliRunner

    from peftkit.cli import app
    from peftkit.tiny import write_jsonl
    from peftkit.train import train

    write_jsonl(tmp_path / "train.jsonl", _answers(8, 1, 32, objective))  # ~190 tokens a row
    write_jsonl(tmp_path / "eval.jsonl", _answers(4, 2, 28, objective) + _answers(4, 3, 12, objective))
    train(load_recipe(_preference_recipe(tmp_path, short_llama, objective, 2)), show_summary=False)
    run = tmp_path / "run"
    last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x][-1]
    result = CliRunner().invoke(app, ["eval", str(run), "--json", str(tmp_path / "figures.json")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    figures = json.loads((tmp_path / "figures.json").read_text())
    names = [k for k in figures if k not in ("num_pairs", "num_examples")]
    assert {name: figures[name] for name in names} == {name: last[f"eval_{name}"] for name in names}


def test_a_dpo_run_s_training_does_not_depend_on_its_eval_rows_under_dynamic_rope(short_llama, tmp_path):
    """The eval rows' reference, computed after the training rows' and before training, left the frequencies of the
    longest eval row to the first training step: eval rows longer than the training rows changed training (its first
    loss 0.6947 where the adapter, zero at step 0, scores log 2 against the reference). Each eval batch now puts the
    model's state back: the training losses are those of the same run with short eval rows, the first log 2."""
    from peftkit.tiny import write_jsonl
    from peftkit.train import train

    losses = {}
    for repeat in (28, 6):  # eval rows of ~165 tokens, then of ~36 (within the 64 positions)
        run = tmp_path / str(repeat)
        write_jsonl(run / "train.jsonl", _answers(8, 1, 12, "dpo"))  # ~75 tokens a row
        write_jsonl(run / "eval.jsonl", _answers(4, 2, repeat, "dpo"))
        train(load_recipe(_preference_recipe(run, short_llama, "dpo", 3)), show_summary=False)
        losses[repeat] = [json.loads(x)["loss"] for x in (run / "run" / "metrics.jsonl").read_text().splitlines()
                          if '"loss"' in x and "eval_loss" not in x]
    assert len(losses[6]) == 3 and losses[28] == losses[6]
    assert losses[6][0] == pytest.approx(math.log(2), abs=1e-7)


def _greedy(model, prompt: list[int], steps: int) -> list[int]:
    """The model's own greedy answer: one forward of the whole sequence per new token, no cache."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            seq.append(int(model(torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
    return seq[len(prompt):]


def test_generation_past_the_context_under_dynamic_rope_is_cache_free_greedy(short_llama):
    """Dynamic RoPE rotates each new key by the frequencies of the sequence's length then: with a KV cache, the keys
    of a 56-token prompt kept their unscaled rotation while a 100-token sequence's forward scales them all, so a
    generation past the 64 positions left the model's own greedy answer (SmolLM2-135M-Instruct at 128 positions,
    dynamic x2: at the 12th token of a 200-token prompt's answer). Decoded cache-free there, it is that answer.

    In a batch, transformers scales every row by the longest: beside the 56-token prompt, a 20-token one (whose answer
    alone stays within the 64 positions) and a 30-token one (past them, alone at other lengths) were answered with
    its frequencies. Each is answered as alone, its own greedy answer."""
    from peftkit.data.prompts import Prompt
    from peftkit.decoding import Sampling, generate_ids, generate_texts

    model = _scaled(short_llama, {"type": "dynamic", "factor": 4})
    tok = AutoTokenizer.from_pretrained(short_llama)
    prompt = torch.randint(4, 90, (56,), generator=torch.Generator().manual_seed(0)).tolist()
    got = generate_ids(model, tok, [prompt], Sampling(max_new_tokens=44))[0]
    assert len(prompt) + len(got) > POSITIONS and got == _greedy(model, prompt, len(got))
    with torch.no_grad():
        cached = model.generate(torch.tensor([prompt]), max_new_tokens=len(got), do_sample=False, eos_token_id=None,
                                pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
    assert cached != got  # what the KV cache gives here
    prompts = [prompt[-20:], prompt, prompt[-30:]]
    answers = generate_texts(model, tok, [Prompt(p, "") for p in prompts], Sampling(max_new_tokens=44), batch_size=3)
    alone = [tok.decode(_greedy(model, p, 44), skip_special_tokens=True) for p in prompts]
    assert answers == alone and len(set(alone)) == 3


def test_a_batch_under_longrope_answers_each_prompt_as_alone():
    """longrope (Phi-3's long-context models) rotates by its long factors where a sequence passes its
    original_max_position_embeddings, a batch by its longest row's: beside a 56-token prompt whose answer passes the 64
    positions, a 30-token one was answered with the long factors from the step where the 56-token one passed them
    (its 10th token differed). Each is answered as alone (transformers' generate of it, for which Phi-3 computes its
    cache again where the factors change)."""
    from peftkit.data.prompts import Prompt
    from peftkit.decoding import Sampling, generate_texts
    from peftkit.tiny import build_char_tokenizer

    tok = build_char_tokenizer()
    model = _tiny_longrope("phi3", tok)
    prompt = torch.randint(4, 90, (56,), generator=torch.Generator().manual_seed(0)).tolist()
    prompts = [prompt[-30:], prompt]
    answers = generate_texts(model, tok, [Prompt(p, "") for p in prompts], Sampling(max_new_tokens=44), batch_size=2)
    with torch.no_grad():
        alone = [model.generate(torch.tensor([p]), max_new_tokens=44, do_sample=False, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id)[0, len(p):].tolist() for p in prompts]
    assert answers == [tok.decode(a, skip_special_tokens=True) for a in alone] and answers[0] != answers[1]
    assert not stale_cache_past_context(model, 56 + 44)  # Phi-3's generate computes its cache again at the switch


@pytest.mark.parametrize("arch", ["llama", "minicpm3"])
def test_generation_past_the_context_under_longrope_without_a_rebuilt_cache_is_cache_free_greedy(arch):
    """A model other than Phi-3's family whose config sets longrope (MiniCPM3-4B's does; a Llama's may) keeps in
    its KV cache the keys its short factors rotated when the sequence passes original_max_position_embeddings, where
    a forward of the whole sequence rotates them all by the long factors: a 56-token prompt's cached answer left the
    model's own greedy one at its 10th or 11th new token (64 original positions). Decoded cache-free there, it is that
    answer, alone and beside a 30-token prompt."""
    import transformers

    from peftkit.data.prompts import Prompt
    from peftkit.decoding import Sampling, generate_ids, generate_texts
    from peftkit.tiny import build_char_tokenizer

    tok = build_char_tokenizer()
    half = 16 if arch == "minicpm3" else 4  # its rotary half-dimension (MiniCPM3: qk_rope_head_dim 32)
    config_class, model_class = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                                 "minicpm3": ("MiniCPM3Config", "MiniCPM3ForCausalLM")}[arch]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=4 * POSITIONS, initializer_range=0.1,
        tie_word_embeddings=False, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * half,
                         "long_factor": [2.0 ** (i % 4) for i in range(half)],
                         "original_max_position_embeddings": POSITIONS})).eval()
    prompt = torch.randint(4, 90, (56,), generator=torch.Generator().manual_seed(0)).tolist()
    got = generate_ids(model, tok, [prompt], Sampling(max_new_tokens=44))[0]
    assert len(got) == 44 and got == _greedy(model, prompt, 44)
    with torch.no_grad():
        cached = model.generate(torch.tensor([prompt]), max_new_tokens=44, do_sample=False, eos_token_id=None,
                                pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
    assert cached[:9] == got[:9] and cached != got  # the KV cache's answer, from past the 64 positions
    prompts = [prompt[-30:], prompt]
    answers = generate_texts(model, tok, [Prompt(p, "") for p in prompts], Sampling(max_new_tokens=44), batch_size=2)
    assert answers == [tok.decode(_greedy(model, p, 44), skip_special_tokens=True) for p in prompts]


def _tiny_longrope(arch: str, tok) -> torch.nn.Module:
    """A tiny Llama or Phi-3 with longrope: 64 original positions of 256, long factors up to 8."""
    import transformers

    config_class, model_class = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                                 "phi3": ("Phi3Config", "Phi3ForCausalLM")}[arch]
    torch.manual_seed(0)
    return getattr(transformers, model_class)(getattr(transformers, config_class)(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4 * POSITIONS, original_max_position_embeddings=POSITIONS,
        initializer_range=0.1, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4,
                         "long_factor": [1.0, 2.0, 4.0, 8.0], "original_max_position_embeddings": POSITIONS})).eval()


@pytest.mark.parametrize(("rope", "method"), [("longrope-llama", "prompt_tuning"), ("longrope-llama", "prefix_tuning"),
                                              ("longrope-phi3", "prompt_tuning"), ("dynamic", "prefix_tuning")])
def test_a_prompt_family_adapter_past_the_rope_switch_answers_as_its_whole_forwards(rope, method, short_llama):
    """The prompt family's virtual tokens come to generate in a prefilled KV cache, which it kept past the RoPE switch
    (dynamic past the original context, longrope past original_max_position_embeddings), where a forward of the whole
    sequence rotates the keys otherwise: with 8 virtual tokens and a 40-token prompt, the answer left the model's own
    greedy one (a forward of the whole sequence per token, the adapter putting its virtual tokens in front, as a
    user's `model(input_ids=...)` runs) at the 18th or 19th new token under longrope (Phi-3's too: its generate, which
    computes the cache again at the switch, counts the input ids and not the cache's virtual tokens, and never does),
    at the 29th under dynamic x4. Decoded by whole forwards there, it is that answer."""
    from peftkit.adapters import inject_adapters
    from peftkit.decoding import Sampling, generate_ids
    from peftkit.methods.prefix_tuning import PrefixTuningConfig
    from peftkit.methods.prompt_tuning import PromptTuningConfig
    from peftkit.methods.virtual import generation_inputs
    from peftkit.tiny import build_char_tokenizer
    from tests.conftest import random_adapters

    if rope == "dynamic":
        model, tok = _scaled(short_llama, {"type": "dynamic", "factor": 4}), AutoTokenizer.from_pretrained(short_llama)
    else:
        tok = build_char_tokenizer()
        model = _tiny_longrope(rope.split("-")[1], tok)
    config = {"prompt_tuning": PromptTuningConfig, "prefix_tuning": PrefixTuningConfig}[method]
    torch.manual_seed(0)
    inject_adapters(model, config(method=method, num_virtual_tokens=8))
    random_adapters(model, seed=1, std=0.3)
    prompt = torch.randint(4, 90, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    got = generate_ids(model, tok, [prompt], Sampling(max_new_tokens=44))[0]
    assert 8 + len(prompt) + len(got) > POSITIONS + 16 and got == _greedy(model, prompt, len(got))
    ids = torch.tensor([prompt])
    with torch.no_grad():  # what generate with the prefilled cache gives (the old code)
        cached = model.generate(ids, **generation_inputs(model, torch.ones_like(ids)), max_new_tokens=len(got),
                                do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    assert cached[0, len(prompt):].tolist() != got


def test_whole_forward_decoding_samples_as_transformers_generate():
    """The prompt family's decoding by whole forwards (`peftkit.whole_forwards`) chooses each token as transformers'
    generate does without a cache: on a model without virtual tokens, the same ids, sampled (temperature, top-k,
    top-p, min-p and the repetition penalty, one seed) and greedy with the penalty."""
    from transformers import GenerationConfig

    from peftkit.decoding import Sampling
    from peftkit.tiny import build_char_tokenizer
    from peftkit.whole_forwards import whole_forwards

    tok = build_char_tokenizer()
    model = _tiny_longrope("llama", tok)
    ids = torch.randint(4, 90, (1, 40), generator=torch.Generator().manual_seed(0))
    for sampling in (Sampling(30, temperature=0.8, top_k=20, top_p=0.9, min_p=0.02, repetition_penalty=1.3),
                     Sampling(30, repetition_penalty=2.0)):
        config = GenerationConfig(max_new_tokens=30, do_sample=sampling.temperature > 0, use_cache=False,
                                  pad_token_id=tok.pad_token_id, eos_token_id=[tok.eos_token_id], **sampling.options())
        with torch.no_grad():
            torch.manual_seed(5)
            ours = whole_forwards(model, ids, torch.ones_like(ids), sampling, [tok.eos_token_id], tok.pad_token_id)
            torch.manual_seed(5)
            assert torch.equal(ours, model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config))


def test_eval_loss_past_the_context_does_not_depend_on_the_batch_size(short_llama):
    """Under dynamic RoPE transformers scales a batch by its longest row (longrope picks its factors so), so a row
    beside one past the 64 positions scored by the longer's frequencies and the loss depended on eval.batch_size.
    Now (`loss_batches`) a row past the context shares a batch only with rows of its own length: at batch 4 the loss
    is batch 1's and a hand mean over the rows, each scored alone by transformers' own model (rows ascending in
    length: dynamic RoPE then scales each by its own); within the context the batches are a DataLoader's, as before.
    A longrope Phi-3's loss too is batch 1's at batch 4."""
    from peftkit.data.stored import Example
    from peftkit.evaluate import evaluate_loss, loss_batches

    lengths = [20, 90, 40, 70, 90, 30, 120, 50, 60]  # within 64 positions and past them, two of one length
    gen = torch.Generator().manual_seed(3)
    ids = [torch.randint(4, 90, (n,), generator=gen).tolist() for n in lengths]
    rows = [Example(input_ids=r, labels=[-100] * 5 + r[5:]) for r in ids]
    model = _scaled(short_llama, {"type": "dynamic", "factor": 4})
    one, four = (evaluate_loss(model, rows, b, pad_id=0)["loss"] for b in (1, 4))
    raw = AutoConfig.from_pretrained(short_llama).to_dict()
    raw["rope_parameters"] = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}
    config = LlamaConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "transformers_version")})
    reference = AutoModelForCausalLM.from_pretrained(short_llama, config=config).eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in sorted(range(len(rows)), key=lambda i: lengths[i]):
            logits = reference(torch.tensor([ids[i]])).logits[0, :-1].double()
            labels = torch.tensor(rows[i].labels[1:])
            total += float(torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
            tokens += int((labels != -100).sum())
    assert abs(four - one) <= 1e-6 and abs(one - total / tokens) <= 1e-6
    # 3 processes share the 5 batches (2 + 2 + 1), each its own sum: they add up
    shares = [evaluate_loss(model, rows, 4, 0, SimpleNamespace(process_index=r, num_processes=3,
                                                               reduce=lambda v, **_: v)) for r in range(3)]
    assert abs(sum(p["loss"] * p["num_tokens"] for p in shares) / sum(p["num_tokens"] for p in shares) - four) <= 1e-12
    assert loss_batches(model, rows, 4) == [[0, 2, 5, 7], [8], [3], [1, 4], [6]]
    phi3 = _tiny_longrope("phi3", AutoTokenizer.from_pretrained(short_llama))  # its factors switch past 64 positions
    assert abs(evaluate_loss(phi3, rows, 4, 0)["loss"] - evaluate_loss(phi3, rows, 1, 0)["loss"]) <= 1e-6
    assert loss_batches(_scaled(short_llama, {"type": "linear", "factor": 4}), rows, 4) == [[0, 1, 2, 3], [4, 5, 6, 7],
                                                                                             [8]]


def _random_rows(lengths: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 90, (n,), generator=gen).tolist() for n in lengths]


def test_dpo_figures_past_the_context_do_not_depend_on_the_batch_size(short_llama):
    """A pair within the 64 positions batched beside one past them took the longer's dynamic frequencies, in the
    reference's log-probabilities and the policy's, so DPO's figures depended on eval.batch_size. Now
    (`pair_batches`) a pair past the context (its longer answer) shares a batch only with pairs of its length: at
    batch 4 the reference's log-probabilities and every figure are batch 1's; pairs within keep a DataLoader's
    batches. KTO's unpaired answers keep theirs: their batches are their KL estimate's."""
    from peftkit.data.preference import Pairs
    from peftkit.data.stored import Example, Examples
    from peftkit.data.unpaired import Unpaired
    from peftkit.preference import PreferenceEval, PreferenceLoss, pair_batches, reference_logps

    lengths = [(20, 24), (90, 80), (30, 40), (70, 70), (50, 90), (36, 30), (120, 100), (44, 50)]
    ids = _random_rows([n for pair in lengths for n in pair], seed=5)
    pairs = Pairs(Examples(Example(input_ids=r, labels=[-100] * 8 + r[8:]) for r in ids))
    model = _scaled(short_llama, {"type": "dynamic", "factor": 4})
    assert pair_batches(model, pairs, 4) == [[0, 2, 5, 7], [3], [1, 4], [6]]
    reference = {b: reference_logps(model, pairs, b, pad_id=0) for b in (1, 4)}
    assert torch.allclose(reference[4], reference[1], rtol=1e-6, atol=1e-6)  # (fp32 sums of up to 112 tokens)
    with torch.no_grad():  # the policy: the model moved off the reference
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    figures = {}
    for b in (1, 4):
        pairs.reference = reference[b]
        figures[b] = PreferenceEval(pairs, 0, b, PreferenceLoss(0.1))(model)
    assert figures[4].keys() == figures[1].keys() and figures[1]["num_pairs"] == 8
    assert all(abs(figures[4][k] - figures[1][k]) <= 1e-6 for k in figures[1]), figures
    assert figures[1]["reward_margin"] != 0.0  # (the policy is not the reference)
    unpaired = Unpaired(pairs.examples, [True, False] * 4)
    assert pair_batches(model, unpaired, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_classifier_figures_past_the_context_do_not_depend_on_the_batch_size(short_llama):
    """A Llama classifier reads its last token, rotated by the batch's dynamic frequencies: a row within the 64
    positions beside one past them scored otherwise, and the loss depended on eval.batch_size. Now (`predict`'s
    `alone_batches`) the loss, accuracy and macro-F1 at batch 4 are batch 1's, and the loss is a hand mean of the
    rows' cross-entropies, each row alone in transformers' own classifier; the logits come back in the rows'
    order."""
    from transformers import AutoModelForSequenceClassification

    from peftkit.classify import evaluate_classification, predict
    from peftkit.data.stored import Example

    lengths = [20, 90, 40, 70, 90, 30, 120, 50, 60]
    ids = _random_rows(lengths, seed=6)
    rows = [Example(input_ids=r, labels=[i % 3]) for i, r in enumerate(ids)]
    raw = AutoConfig.from_pretrained(short_llama).to_dict()
    raw |= {"rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}, "pad_token_id": 0}
    config = LlamaConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "transformers_version",
                                                                       "id2label", "label2id")}, num_labels=3)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(short_llama, config=config).eval()
    one, four = (evaluate_classification(model, rows, b, pad_id=0) for b in (1, 4))
    assert all(abs(four[k] - one[k]) <= 1e-6 for k in one), (one, four)
    with torch.no_grad():
        alone = torch.cat([model(torch.tensor([r])).logits for r in ids])
    labels = torch.tensor([i % 3 for i in range(len(ids))])
    assert abs(one["loss"] - float(torch.nn.functional.cross_entropy(alone, labels))) <= 1e-6
    logits, classes = predict(model, rows, 4, 0)
    assert classes == labels.tolist() and torch.allclose(logits, alone, rtol=0, atol=1e-5)
