"""Multitask prompt tuning against peft's own forward, fp32, on a tiny Llama: per-row task ids (the data's `task`
column) give peft's logits and eval loss (<= 1e-4) for adapters peftkit made and adapters peft made (from a source
adapter, EXACT_SOURCE_TASK / AVERAGE_SOURCE_TASKS), saved as peft saves them; training reads the task column; the
family's refusals hold."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from peft import MultitaskPromptTuningConfig as PeftMPTConfig
from peft import MultitaskPromptTuningInit, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftkit.adapters import inject_adapters
from peftkit.adapters.state_dicts import adapter_state_dict
from peftkit.data import IGNORE_INDEX, eval_loader, load_examples
from peftkit.errors import PeftkitError
from peftkit.eval_job import EvalJob
from peftkit.evaluate import evaluate, token_loss_sum
from peftkit.inference import ModelSource
from peftkit.methods.lora import LoraConfig
from peftkit.methods.multitask_prompt_tuning import MultitaskPromptTuningConfig
from peftkit.methods.virtual import virtual_tokens
from peftkit.peft_format import peft_config, save_adapter
from peftkit.recipe import DataConfig, ModelConfig
from peftkit.tiny import number_rows, write_jsonl
from tests.conftest import cli_user_error, make_recipe
from tests.test_methods import models  # noqa: F401  (the fixture: tiny llama, qwen2 and gpt2)

TOL = 1e-4
N, TASKS, RANKS = 4, 3, 2


@pytest.fixture(scope="module")
def llama(tiny_llama) -> Path:
    return tiny_llama  # conftest's session model: the same 2-layer, hidden-32 Llama, built once


@pytest.fixture(scope="module")
def task_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mpt-data")
    rows = [r | {"task": i % TASKS} for i, r in enumerate(number_rows(12, seed=3))]
    write_jsonl(root / "train.jsonl", rows)
    return {"train": root / "train.jsonl", "eval": root / "train.jsonl"}


def _cfg(**kw) -> MultitaskPromptTuningConfig:
    return MultitaskPromptTuningConfig(method="multitask_prompt_tuning", **{"num_virtual_tokens": N,
                                       "num_tasks": TASKS, "num_ranks": RANKS} | kw)


def _model(base: Path):
    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()


def _ours(base: Path, out: Path, cfg: MultitaskPromptTuningConfig | None = None) -> Path:
    cfg = cfg or _cfg()
    model = _model(base)
    torch.manual_seed(1)
    inject_adapters(model, cfg)
    save_adapter(out, adapter_state_dict(model, []), peft_config(cfg, [], str(base), False, model.config.model_type,
                                                                 model_config=model.config))
    return out


def _peft_made(base: Path, out: Path, seed: int, **config) -> Path:
    torch.manual_seed(seed)
    cfg = PeftMPTConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, **{"num_tasks": TASKS, "num_ranks": RANKS} | config)
    get_peft_model(_model(base), cfg).save_pretrained(out)
    return out


def _peftkit_model(base: Path, adapter: Path):
    from peftkit.adapter_base import load_adapted_model
    return load_adapted_model(str(base), str(adapter))[0].float().eval()


def _logits_pair(base: Path, adapter: Path, tasks: list[int]):
    ids = torch.tensor([[1, 5, 9, 13, 2, 7], [1, 4, 4, 8, 3, 0], [1, 6, 2, 2, 9, 11]])[: len(tasks)]
    mask = torch.ones_like(ids)
    mask[1, -1] = 0
    task_ids = torch.tensor(tasks)
    reference = PeftModel.from_pretrained(_model(base), adapter).eval()
    ours = _peftkit_model(base, adapter)
    with torch.no_grad():
        theirs = reference(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits[:, -ids.shape[1]:]
        mine = ours(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits
        base_logits = reference.get_base_model()(input_ids=ids, attention_mask=mask).logits
    return mine, theirs, base_logits, mask


def test_saved_as_peft_saves_and_peft_gives_our_logits_per_task(llama, tmp_path):
    adapter = _ours(llama, tmp_path / "ours")
    state = load_file(str(adapter / "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "prompt_embeddings": (N, 32), "prefix_task_cols": (TASKS, N, RANKS), "prefix_task_rows": (TASKS, RANKS, 32)}
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "MULTITASK_PROMPT_TUNING" and config["num_tasks"] == TASKS
    peft_saved = load_file(str(_peft_made(llama, tmp_path / "peft", seed=2) / "adapter_model.safetensors"))
    assert set(peft_saved) == set(state)  # the same three keys as peft writes
    mine, theirs, base_logits, mask = _logits_pair(llama, adapter, [2, 0, 1])
    real = mask.bool()
    assert float((mine - theirs)[real].abs().max()) <= TOL
    assert float((mine - base_logits)[real].abs().max()) > 1e-3
    same_input = _logits_pair(llama, adapter, [0, 1, 2])[0]  # the task really selects the prompt
    assert float((same_input[0] - mine[0]).abs().max()) > 1e-4


@pytest.mark.parametrize("init", ["EXACT_SOURCE_TASK", "AVERAGE_SOURCE_TASKS"])
def test_peft_made_target_from_a_source_and_our_init_source_agree(init, llama, tmp_path):
    source = _peft_made(llama, tmp_path / "source", seed=3)
    target = _peft_made(llama, tmp_path / "target", seed=4, num_tasks=1, prompt_tuning_init=MultitaskPromptTuningInit[init],
                        prompt_tuning_init_task=2,
                        prompt_tuning_init_state_dict_path=str(source / "adapter_model.safetensors"))
    mine, theirs, _, mask = _logits_pair(llama, target, [0, 0, 0])
    assert float((mine - theirs)[mask.bool()].abs().max()) <= TOL
    cfg = _cfg(num_tasks=1, init="source", source_adapter=str(source), source_task=2 if init == "EXACT_SOURCE_TASK" else None)
    ours = load_file(str(_ours(llama, tmp_path / "ours", cfg) / "adapter_model.safetensors"))
    peft_target = load_file(str(target / "adapter_model.safetensors"))
    for key, tensor in peft_target.items():
        assert torch.allclose(ours[key], tensor), key


def test_eval_loss_reads_the_task_column_as_peft(llama, task_data, tmp_path):
    adapter = _peft_made(llama, tmp_path / "peft", seed=5)
    data = str(task_data["train"])
    job = EvalJob(data=data, data_cfg=DataConfig(train=data, max_length=128), batch_size=3,
                  source=ModelSource(ModelConfig(name_or_path=str(llama), dtype="float32"), adapter=str(adapter)))
    ours = evaluate(job)
    tok = AutoTokenizer.from_pretrained(llama)
    examples = load_examples(tok, data, "train", job.data_cfg, tasks=True)[0]
    reference = PeftModel.from_pretrained(_model(llama), adapter).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in eval_loader(examples, 3, tok.pad_token_id):
            length = batch["input_ids"].shape[1]
            logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               task_ids=batch["task_ids"]).logits[:, -length:]
            labels = batch["labels"][:, 1:]
            total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                           reduction="sum"))
            count += int((labels != IGNORE_INDEX).sum())
    assert abs(ours["loss"] - total / count) <= TOL and ours["num_tokens"] == count


def test_training_trains_only_the_tasks_in_the_batch(llama, task_data):
    model = _model(llama)
    inject_adapters(model, _cfg())
    tok = AutoTokenizer.from_pretrained(llama)
    examples = [e for e in load_examples(tok, str(task_data["train"]), "train", DataConfig(train="x", max_length=128),
                                        tasks=True)[0]
                if e.task_id != 1]
    batch = next(iter(eval_loader(examples, 4, tok.pad_token_id)))
    assert sorted(set(batch["task_ids"].tolist())) == [0, 2]
    loss, _ = token_loss_sum(model, batch)
    loss.backward()
    virtual = virtual_tokens(model)
    grads = virtual.cols.grad.flatten(1).abs().sum(1)
    assert grads[0] > 0 and grads[2] > 0 and grads[1] == 0
    assert virtual.table.grad.abs().sum() > 0


def test_a_task_id_out_of_range_is_a_clear_error_before_training(llama, task_data, tmp_path, monkeypatch, capsys):
    """Checked as the data loads (the forward does not check: on a GPU that would be a host sync per step)."""
    recipe = _recipe(tmp_path, llama, task_data, {"num_tasks": TASKS - 1})
    message = cli_user_error(monkeypatch, capsys, "train", str(recipe))
    assert (f"data.train ({task_data['train']}): a row's 'task' is {TASKS - 1}, but adapter.num_tasks is "
            f"{TASKS - 1}" in message and f"set adapter.num_tasks: {TASKS}" in message)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_task_id_out_of_range_in_a_named_eval_set_names_the_set(llama, task_data, tmp_path, monkeypatch, capsys):
    """data.eval as named sets: a set's task id past adapter.num_tasks is said at the set's key and file (the check
    read the path as an attribute `eval.NAME` of data and failed with an AttributeError's traceback)."""
    recipe = _recipe(tmp_path, llama, task_data, {"num_tasks": TASKS})
    raw = yaml.safe_load(recipe.read_text())
    write_jsonl(tmp_path / "other.jsonl", [{"instruction": "a", "output": "b", "task": TASKS}])
    raw["data"]["eval"] = {"main": str(task_data["eval"]), "other": str(tmp_path / "other.jsonl")}
    recipe.write_text(yaml.safe_dump(raw))
    message = cli_user_error(monkeypatch, capsys, "train", str(recipe))
    assert (f"data.eval.other ({tmp_path / 'other.jsonl'}): a row's 'task' is {TASKS}, but adapter.num_tasks is "
            f"{TASKS}" in message), message


def test_bad_task_field_names_the_row(llama, tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b", "task": "one"}])
    tok = AutoTokenizer.from_pretrained(llama)
    with pytest.raises(PeftkitError, match="field 'task' is 'one'"):
        load_examples(tok, str(tmp_path / "d.jsonl"), "train", DataConfig(train="x", format="completion"), tasks=True)


def test_rows_with_and_without_a_task_are_refused_as_the_data_loads(llama, tmp_path):
    """Not at the first batch that mixes them, some steps into training (the order depends on the shuffle)."""
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b", "task": 0}, {"prompt": "c", "completion": "d"}])
    tok = AutoTokenizer.from_pretrained(llama)
    with pytest.raises(PeftkitError, match="some rows have a 'task' field and some do not"):
        load_examples(tok, str(tmp_path / "d.jsonl"), "train", DataConfig(train="x", format="completion"), tasks=True)


def test_another_method_ignores_the_task_column_whatever_it_holds(llama, tmp_path):
    """The README's promise: a LoRA run on data whose `task` column holds names, or is missing from some rows,
    trains exactly as on the same rows without the column (it was refused, or failed some steps in)."""
    from rich.console import Console

    from peftkit.decoding import Sampling
    from peftkit.recipe import load_recipe
    from peftkit.train import train

    rows = number_rows(12, seed=3)
    tagged = [r | ({"task": ["numbers", 1, None][i % 3]} if i % 4 else {}) for i, r in enumerate(rows)]
    adapters = []
    for name, data in (("plain", rows), ("tagged", tagged)):
        write_jsonl(tmp_path / name / "train.jsonl", data)
        files = {"train": tmp_path / name / "train.jsonl", "eval": tmp_path / name / "train.jsonl"}
        recipe = make_recipe(tmp_path / name, llama, files, training={"max_steps": 3}, eval={"samples": 2})
        train(load_recipe(recipe), console=Console(quiet=True))
        adapters.append(load_file(tmp_path / name / "run" / "adapter" / "adapter_model.safetensors"))
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
    job = EvalJob(data=str(tmp_path / "tagged" / "train.jsonl"), metrics=["loss", "exact_match"],
                  data_cfg=DataConfig(train="x", max_length=128), sampling=Sampling(max_new_tokens=4),
                  source=ModelSource(ModelConfig(name_or_path=str(llama)), adapter=str(tmp_path / "tagged" / "run" / "adapter")))
    assert evaluate(job)["num_tokens"] > 0


def test_eval_of_a_run_on_its_own_data_without_tasks_is_task_0_as_training(llama, number_data, tmp_path, monkeypatch,
                                                                            capsys):
    """Training reads data without a `task` column as task 0 throughout; `peftkit eval RUN_DIR` refused the run's own
    eval data ("nothing says which task"), so it could not give the run's final eval loss. Data given apart still
    must say."""
    import json

    from rich.console import Console

    from peftkit.eval_job import eval_job
    from peftkit.recipe import load_recipe
    from peftkit.train import train

    recipe = _recipe(tmp_path, llama, number_data, {"num_tasks": 2}, training={"max_steps": 2})
    train(load_recipe(recipe), console=Console(quiet=True))
    run = tmp_path / "run"
    final = json.loads((run / "manifest.json").read_text())["metrics"]["eval_loss"]
    args = dict(overrides=[], model=None, fmt=None, adapter=None, max_length=None, batch_size=None, on_bad_rows=None)
    assert evaluate(eval_job(run, data=None, **args))["loss"] == pytest.approx(final, abs=1e-6)
    assert "nothing says which task to use: pass --task N (0 .. 1)" in cli_user_error(
        monkeypatch, capsys, "eval", "--model", str(llama), "--adapter", str(run / "adapter"), "--data",
        str(number_data["eval"]))


def _recipe(tmp_path, llama, task_data, adapter: dict, **sections) -> Path:
    recipe = make_recipe(tmp_path, llama, task_data, **sections)
    data = yaml.safe_load(recipe.read_text())
    data["adapter"] = {"method": "multitask_prompt_tuning", "num_virtual_tokens": N} | adapter
    recipe.write_text(yaml.safe_dump(data))
    return recipe


@pytest.mark.parametrize(("adapter", "sections", "message"), [
    ({}, {"export": {"merged": True}}, "A multitask_prompt_tuning adapter cannot be merged"),
    ({}, {"data": {"packing": True}}, "data.packing: multitask_prompt_tuning puts its virtual tokens"),
    ({"init": "source"}, {}, "init: source needs source_adapter"),
    ({"init": "source", "source_adapter": "x", "num_tasks": 2}, {}, "set num_tasks: 1"),
    ({"source_task": 1}, {}, "only read with init: source"),
])
def test_recipe_refusals(adapter, sections, message, llama, task_data, tmp_path, monkeypatch, capsys):
    recipe = _recipe(tmp_path, llama, task_data, adapter, **sections)
    assert message in cli_user_error(monkeypatch, capsys, "validate", str(recipe))


def test_merge_is_refused(llama, tmp_path, monkeypatch, capsys):
    adapter = _ours(llama, tmp_path / "adapter")
    err = cli_user_error(monkeypatch, capsys, "merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged"))
    assert "multitask_prompt_tuning adapter cannot be merged" in err


def test_a_missing_or_unfitting_source_adapter_names_the_key(llama, tmp_path):
    model = _model(llama)
    with pytest.raises(PeftkitError, match="adapter.source_adapter"):
        inject_adapters(model, _cfg(num_tasks=1, init="source", source_adapter=str(tmp_path / "nowhere")))
    source = _ours(llama, tmp_path / "source")  # of rank RANKS
    with pytest.raises(PeftkitError, match=f"adapter.source_adapter: its tasks' factors have rank {RANKS} "
                                           rf"\(prefix_task_cols \({TASKS}, {N}, {RANKS}\)\), but adapter.num_ranks is "
                                           f"{RANKS + 1}; set adapter.num_ranks: {RANKS}."):
        inject_adapters(model, _cfg(num_tasks=1, num_ranks=RANKS + 1, init="source", source_adapter=str(source)))


# ------------------------------------------------------- generation, eval and chat with task ids (--task)

GEN_ROWS = [("### Instruction:\nadd 12 and 30\n\n### Response:\n", 2), ("hi", 0), ("count: 1 2 3 4 5 6", 1),
            ("abc", 2)]  # four prompt lengths in one left-padded batch, three tasks


def _strong(base: Path, out: Path, num_tasks: int = TASKS) -> Path:
    """A peftkit adapter whose task factors are N(0, 1) (peft's init draws them N(0, 0.02), which leaves every
    task's prompt near zero), so that the tasks generate differently."""
    model = _model(base)
    torch.manual_seed(1)
    cfg = _cfg(num_tasks=num_tasks)
    inject_adapters(model, cfg)
    virtual = virtual_tokens(model)
    with torch.no_grad():
        virtual.cols.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(2))
        virtual.rows.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(3))
    save_adapter(out, adapter_state_dict(model, []), peft_config(cfg, [], str(base), False, model.config.model_type,
                                                                 model_config=model.config))
    return out


def _peft_greedy(reference, ids: list[int], task: int, stops: list[int]) -> list[int]:
    """Cache-free greedy decoding through peft's forward for a row of task `task`."""
    from tests.test_generate import greedy_no_cache

    task_ids = torch.tensor([task])
    return greedy_no_cache(lambda x, **kw: reference(input_ids=x, task_ids=task_ids, **kw), ids, stops)


def _job(adapter: Path, **kw):
    from peftkit.decoding import Sampling
    from peftkit.generate import generate_job

    args = {"prompts": [], "data": None, "fmt": None, "chat": False, "limit": None, "task": None} | kw
    return generate_job(None, [], None, str(adapter), args["prompts"], args["data"], args["fmt"], args["chat"],
                        args["limit"], Sampling(max_new_tokens=12), batch_size=8, task=args["task"])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_generate_with_each_row_s_task_is_cache_free_greedy_through_peft(arch, models, tmp_path):  # noqa: F811
    """`peftkit generate --data` (rows of three tasks, one left-padded batch) gives, token for token, cache-free
    greedy decoding through peft's forward with each row's task_ids; and --task N gives task N's for all."""
    from peftkit.decoding import stop_token_ids
    from peftkit.generate import run_generate

    adapter = _strong(models[arch], tmp_path / "adapter")
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": p, "completion": "x", "task": t} for p, t in GEN_ROWS])
    ours = [r["completion"] for r in run_generate(_job(adapter, data=str(tmp_path / "d.jsonl"), fmt="completion"))]
    reference = PeftModel.from_pretrained(_model(models[arch]), adapter).eval()
    tok = AutoTokenizer.from_pretrained(models[arch])
    stops = stop_token_ids(reference.get_base_model(), tok)
    ids = [tok(p)["input_ids"] for p, _ in GEN_ROWS]
    expected = [tok.decode(_peft_greedy(reference, i, t, stops), skip_special_tokens=True)
                for i, (_, t) in zip(ids, GEN_ROWS, strict=True)]
    assert ours == expected
    as_task_1 = [r["completion"] for r in run_generate(_job(adapter, prompts=[p for p, _ in GEN_ROWS], task=1))]
    assert as_task_1 == [tok.decode(_peft_greedy(reference, i, 1, stops), skip_special_tokens=True) for i in ids]
    assert len(set(ours)) > 1
    if arch != "gpt2":  # tiny GPT-2's top logits lie within 0.01 of each other: a task moves them by 0.02, no argmax
        assert as_task_1 != ours  # the task really changes the answers


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_eval_with_task_is_peft_s_loss(arch, models, number_data, tmp_path):  # noqa: F811
    """`peftkit eval --task 1` on rows without a task column: peft's loss with task_ids all 1 (<= 1e-4)."""
    adapter = _strong(models[arch], tmp_path / "adapter")
    data = str(number_data["eval"])
    job = EvalJob(data=data, data_cfg=DataConfig(train=data, max_length=128), batch_size=4, task=1,
                  source=ModelSource(ModelConfig(name_or_path=str(models[arch]), dtype="float32"), adapter=str(adapter)))
    ours = evaluate(job)["loss"]
    tok = AutoTokenizer.from_pretrained(models[arch])
    reference = PeftModel.from_pretrained(_model(models[arch]), adapter).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in eval_loader(load_examples(tok, data, "train", job.data_cfg)[0], 4, tok.pad_token_id):
            length = batch["input_ids"].shape[1]
            task_ids = torch.ones(batch["input_ids"].shape[0], dtype=torch.long)
            logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               task_ids=task_ids).logits[:, -length:]
            labels = batch["labels"][:, 1:]
            total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                           reduction="sum"))
            count += int((labels != IGNORE_INDEX).sum())
    # Tighter than TOL (measured: 0.0), since on tiny GPT-2 another task moves the loss by only 1.3e-5 (Llama: 0.054).
    assert abs(ours - total / count) <= 1e-6
    assert abs(ours - evaluate(replace(job, task=0))["loss"]) > 5e-6  # another task, another loss


def test_task_flag_overrides_whatever_the_task_column_holds(llama, tmp_path):
    """--task N is every row's task: eval and generate give the figures of rows that all carry task N, whatever the
    column holds (eval refused rows of which only some had a task, both refused a task named in words)."""
    from peftkit.decoding import Sampling
    from peftkit.generate import run_generate

    adapter = _strong(llama, tmp_path / "adapter")
    rows = number_rows(6, seed=3)
    write_jsonl(tmp_path / "one.jsonl", [r | {"task": 1} for r in rows])
    write_jsonl(tmp_path / "mixed.jsonl", [r | ({"task": 2} if i % 2 else {}) for i, r in enumerate(rows)])
    write_jsonl(tmp_path / "named.jsonl", [r | {"task": "numbers"} for r in rows])

    def scores(data: str, task: int | None):
        job = EvalJob(data=data, data_cfg=DataConfig(train=data, max_length=128), batch_size=4, task=task,
                      metrics=["loss", "exact_match"], sampling=Sampling(max_new_tokens=6),
                      predictions=tmp_path / "predictions.jsonl",
                      source=ModelSource(ModelConfig(name_or_path=str(llama), dtype="float32"), adapter=str(adapter)))
        result = evaluate(job)
        texts = [r["completion"] for r in run_generate(_job(adapter, data=data, fmt="alpaca", task=task))]
        return result, (tmp_path / "predictions.jsonl").read_text(), texts

    expected = scores(str(tmp_path / "one.jsonl"), None)
    assert scores(str(tmp_path / "mixed.jsonl"), 1) == expected
    assert scores(str(tmp_path / "named.jsonl"), 1) == expected
    assert scores(str(tmp_path / "one.jsonl"), 0)[0]["loss"] != expected[0]["loss"]


def test_chat_uses_the_task(llama, tmp_path):
    from peftkit.chat import chat_loop
    from peftkit.data.prompts import chat_prompt
    from peftkit.adapter_base import load_adapted_model
    from peftkit.decoding import Sampling, stop_token_ids

    adapter = _strong(llama, tmp_path / "adapter")
    model, _, tok, *_ = load_adapted_model(str(llama), str(adapter))
    lines = iter(["hi", "/exit"])
    messages = chat_loop(model, tok, Sampling(max_new_tokens=12), read=lambda _: next(lines), write=lambda _: None,
                         task=2)
    reference = PeftModel.from_pretrained(_model(llama), adapter).eval()
    ids = chat_prompt(tok, [{"role": "user", "content": "hi"}]).ids
    expected = _peft_greedy(reference, ids, 2, stop_token_ids(model, tok))
    assert messages[-1]["content"] == tok.decode(expected, skip_special_tokens=True)


def test_one_task_needs_no_task_flag(llama, tmp_path):
    from peftkit.generate import run_generate

    adapter = _strong(llama, tmp_path / "adapter", num_tasks=1)
    assert run_generate(_job(adapter, prompts=["hi"])) == run_generate(_job(adapter, prompts=["hi"], task=0))


def test_missing_or_wrong_tasks_are_clear_errors(llama, tmp_path, monkeypatch, capsys):
    adapter = str(_strong(llama, tmp_path / "adapter"))
    lora = tmp_path / "lora"
    model = _model(llama)
    lora_cfg = LoraConfig(method="lora", r=2, target_modules=["q_proj"])
    inject_adapters(model, lora_cfg)
    save_adapter(lora, adapter_state_dict(model, []), peft_config(lora_cfg, ["q_proj"], str(llama), False, "llama"))
    plain = tmp_path / "plain.jsonl"
    write_jsonl(plain, [{"prompt": "a", "completion": "b"}])
    write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "a", "completion": "b", "task": 1}, {"prompt": "c", "completion": "d"}])
    write_jsonl(tmp_path / "high.jsonl", [{"prompt": "a", "completion": "b", "task": 7}])
    gen = ("generate", "--adapter", adapter, "--max-new-tokens", "2")
    assert "adapter of 3 tasks, and nothing says which task to use: pass --task N (0 .. 2)." in cli_user_error(
        monkeypatch, capsys, *gen, "--prompt", "x")
    assert f"pass --task N (0 .. 2), or give every row of {plain} a 'task' column" in cli_user_error(
        monkeypatch, capsys, *gen, "--data", str(plain), "--format", "completion")
    assert "--task 3: " in cli_user_error(monkeypatch, capsys, *gen, "--prompt", "x", "--task", "3")
    assert "a row's 'task' is 7, but" in cli_user_error(
        monkeypatch, capsys, *gen, "--data", str(tmp_path / "high.jsonl"), "--format", "completion")
    assert "Some rows of" in cli_user_error(
        monkeypatch, capsys, *gen, "--data", str(tmp_path / "mixed.jsonl"), "--format", "completion")
    assert "only a multitask prompt tuning or Poly adapter reads a task id" in cli_user_error(
        monkeypatch, capsys, "generate", "--adapter", str(lora), "--prompt", "x", "--task", "1")
    assert "pass --task N (0 .. 2)" in cli_user_error(
        monkeypatch, capsys, "eval", "--model", str(llama), "--adapter", adapter, "--data", str(plain), "--format",
        "completion")
    assert "pass --task N (0 .. 2)." in cli_user_error(monkeypatch, capsys, "chat", "--adapter", adapter)
    write_jsonl(tmp_path / "classes.jsonl", [{"text": "a b", "label": "x"}, {"text": "c", "label": "y"}])
    assert "--task 1: only a multitask prompt tuning or Poly adapter reads a task id, and a sequence classifier" in cli_user_error(
        monkeypatch, capsys, "eval", "--model", str(llama), "--data", str(tmp_path / "classes.jsonl"), "--format",
        "classification", "--task", "1")  # (it was ignored)


def test_a_comparison_gives_the_task_to_the_adapters_that_read_one(llama, number_data, tmp_path):
    """`peftkit eval --adapter mpt=DIR --adapter lora=DIR --task 1`: the multitask adapter's row is its loss with
    task 1, LoRA's row its loss alone (it reads no task id; it stopped the whole comparison before); a --task that no
    compared adapter reads is still an error."""
    from peftkit.compare import compare, comparison_jobs
    from tests.conftest import save_random_adapter

    mpt = _strong(llama, tmp_path / "mpt")
    lora = save_random_adapter(llama, LoraConfig(r=2, alpha=4, target_modules=["q_proj"]), tmp_path / "lora", seed=1)
    data = str(number_data["eval"])
    job = EvalJob(data=data, data_cfg=DataConfig(train=data, max_length=128), batch_size=4, task=1,
                  source=ModelSource(ModelConfig(name_or_path=str(llama), dtype="float32")))
    rows = compare(comparison_jobs(job, [("mpt", str(mpt)), ("lora", str(lora))], []))
    alone = {name: evaluate(replace(job, task=task, source=replace(job.source, adapter=str(path))))["loss"]
             for name, path, task in (("mpt", mpt, 1), ("lora", lora, None))}
    assert rows["mpt"]["loss"] == alone["mpt"] and rows["lora"]["loss"] == alone["lora"]
    assert rows["mpt"]["loss"] != evaluate(replace(job, task=0, source=replace(job.source, adapter=str(mpt))))["loss"]
    with pytest.raises(PeftkitError, match="--task 1: only a multitask prompt tuning or Poly adapter reads a task id, and none "
                                           "of the compared adapters is one; drop --task"):
        comparison_jobs(job, [("lora", str(lora))], [])
