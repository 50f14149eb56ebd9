"""Arrow routing (`NamedAdapters.arrow`, peftkit.adapters.arrow): a library of LoRA adapters combined per token, against
peft 0.21's `create_arrow_model` (with and without GenKnowSub) and against a hand-computed routing of one layer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig as PeftLora
from peft import get_peft_model
from peft.tuners.lora.arrow import create_arrow_model
from peft.tuners.lora.config import ArrowConfig

from peftkit.adapters.arrow import ArrowSettings, prototype
from peftkit.adapters.named import load_named_model
from peftkit.errors import PeftkitError
from tests.conftest import load_fp32, save_peft_lora

IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _adapters(base: Path, root: Path, count: int, seed: int, r: int = 4, **settings) -> list[str]:
    """`count` peft LoRA adapters, far from identity, each its own alpha."""
    dirs = []
    for i in range(count):
        save_peft_lora(base, root / f"a{seed + i}",
                       PeftLora(r=r, lora_alpha=4 + 4 * i, target_modules=TARGETS, **settings), seed + i)
        dirs.append(str(root / f"a{seed + i}"))
    return dirs


@pytest.mark.parametrize(("top_k", "temperature", "general"), [(2, 1.0, 0), (1, 0.5, 0), (3, 2.0, 0), (2, 1.0, 2)])
def test_logits_are_peft_s(top_k, temperature, general, tiny_llama, tmp_path):
    tasks, generals = _adapters(tiny_llama, tmp_path, 3, 0), _adapters(tiny_llama, tmp_path, general, 10)
    config = ArrowConfig(top_k=top_k, router_temperature=temperature, use_gks=bool(general), rng_seed=0)
    theirs = create_arrow_model(load_fp32(tiny_llama), tasks, config, general_adapter_paths=generals or None).eval()
    model, adapters, _ = load_named_model([(f"t{i}", d) for i, d in enumerate(tasks)]
                                          + [(f"g{i}", d) for i, d in enumerate(generals)], str(tiny_llama))
    with torch.no_grad():
        expected = theirs(input_ids=IDS).logits
        with adapters.arrow([f"t{i}" for i in range(3)], [f"g{i}" for i in range(general)],
                            ArrowSettings(top_k=top_k, temperature=temperature, seed=0)):
            ours = model(input_ids=IDS).logits
        plain = model(input_ids=IDS).logits
    assert (ours - expected).abs().max() <= 1e-5
    assert (plain - load_fp32(tiny_llama)(input_ids=IDS).logits).abs().max() == 0  # after the block: the base again
    assert (ours - plain).abs().max() > 1e-2


def test_routing_under_bf16_autocast(tiny_llama, tmp_path):
    """Under bf16 autocast, as `generate`/`chat`/`eval --arrow` run a recipe's model on a GPU (here the CPU's
    autocast), Arrow routes in fp32 and the update's products run in bf16: the logits are the fp32 ones to bf16's
    precision. (The scores came out bf16 and scatter refused them: --arrow on a recipe's model failed on a GPU.)"""
    tasks = _adapters(tiny_llama, tmp_path, 3, 0)
    model, adapters, _ = load_named_model([(f"t{i}", d) for i, d in enumerate(tasks)], str(tiny_llama))
    with torch.no_grad(), adapters.arrow(["t0", "t1", "t2"], [], ArrowSettings(top_k=2, seed=0)):
        exact = model(input_ids=IDS).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(input_ids=IDS).logits.float()
    assert torch.isfinite(autocast).all()
    assert (autocast - exact).abs().max() <= 0.05 * exact.abs().max()


def test_one_layer_routes_as_computed_by_hand(tiny_llama, tmp_path):
    """Independent of peft: the prototypes are B A's top right singular vectors (up to sign; 15 power iterations, as
    peft's, come close to the exact SVD's), and a token's update is the softmax-weighed sum of its top-2 adapters'
    s B A x."""
    tasks = _adapters(tiny_llama, tmp_path, 3, 0)
    model, adapters, _ = load_named_model([(f"t{i}", d) for i, d in enumerate(tasks)], str(tiny_llama))
    host = model.model.layers[0].self_attn.q_proj
    layers = [host.adapters[f"t{i}"] for i in range(3)]
    x = torch.randn(5, 32)
    with torch.no_grad(), adapters.arrow(["t0", "t1", "t2"], settings=ArrowSettings(top_k=2)):
        got = host(x) - host.base_layer(x)
        for layer, proto in zip(layers, host.arrow.prototypes):
            top = torch.linalg.svd(layer.lora_B.weight @ layer.lora_A.weight)[2][0]
            assert abs(float(proto @ top)) > 0.999  # (unit vectors: the same direction, within 2.6 degrees)
        protos = host.arrow.prototypes.clone()
    for t in range(5):
        scores = (x[t] @ protos.T).abs()
        top = scores.topk(2).indices
        weights = torch.softmax(scores[top], 0)
        want = sum(w * layers[i].scaling * (layers[i].lora_B.weight @ (layers[i].lora_A.weight @ x[t]))
                   for w, i in zip(weights, top.tolist()))
        assert (got[t] - want).abs().max() < 1e-5


def test_what_it_cannot_route_is_refused(tiny_llama, tmp_path):
    tasks = _adapters(tiny_llama, tmp_path, 2, 0)
    other_rank = _adapters(tiny_llama, tmp_path / "r8", 1, 5, r=8)
    dora = _adapters(tiny_llama, tmp_path / "dora", 1, 7, use_dora=True)
    model, adapters, _ = load_named_model([("a", tasks[0]), ("b", tasks[1]), ("wide", other_rank[0]),
                                           ("dora", dora[0])], str(tiny_llama))
    from peft import PromptTuningConfig

    torch.manual_seed(0)
    get_peft_model(load_fp32(tiny_llama), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(
        tmp_path / "prompt")
    adapters.load("prompt", tmp_path / "prompt")
    for names, general, settings, message in [
        (["a", "b"], [], ArrowSettings(top_k=3), "top_k takes 1 to 2"),
        (["a", "b"], [], ArrowSettings(top_k=1, temperature=float("nan")), "a finite number above 0"),
        (["prompt"], [], ArrowSettings(top_k=1), "'prompt' is a Prompt tuning adapter, not a LoRA on linear layers"),
        (["a", "wide"], [], ArrowSettings(top_k=1), "adapters of one rank"),
        (["a", "dora"], [], ArrowSettings(top_k=1), "'dora' is not a plain LoRA on linear layers"),
        (["a"], ["a"], ArrowSettings(top_k=1), "none of them also a general adapter"),
        (["a"], ["b", "b"], ArrowSettings(top_k=1), "each named once"),  # [g1, g1, g2] weighed g1 twice in the mean
        (["a", "nope"], [], ArrowSettings(top_k=1), "No adapter named 'nope'"),
    ]:
        with pytest.raises(PeftkitError, match=message), adapters.arrow(names, general, settings):
            pass
    with adapters.arrow(["a", "b"], settings=ArrowSettings(top_k=1)):  # (blocks do not nest, nor mix with routes)
        with pytest.raises(PeftkitError, match="blocks of either do not nest"), \
                adapters.arrow(["a"], [], ArrowSettings(1)):
            pass
        with pytest.raises(PeftkitError, match="end the `arrow` block first"), adapters.routed(["a", "b"]):
            pass
    assert prototype(torch.ones(2, 3), torch.ones(3, 2), 0).shape == (3,)


def test_generate_arrow_is_cache_free_greedy_through_peft_s_arrow_model(tiny_llama, tmp_path, monkeypatch, capsys):
    """`peftkit generate --adapter NAME=DIR ... --arrow` (batched, left-padded, with a KV cache) gives, for each prompt,
    greedy decoding with one full forward per token through peft's Arrow model."""
    import json
    import sys

    from peftkit.cli import main
    from peftkit.data.prompts import text_prompt
    from peftkit.decoding import stop_token_ids
    from peftkit.modeling import load_tokenizer
    from peftkit.recipe import ModelConfig
    from tests.test_generate import greedy_no_cache

    tasks = _adapters(tiny_llama, tmp_path, 3, 0)
    prompts = ["### Instruction:\nadd 12 and 30\n\n### Response:\n", "count: 1 2 3"]
    out = tmp_path / "out.json"
    monkeypatch.setattr(sys, "argv", ["peftkit", "generate", "--model", str(tiny_llama), "--arrow", "--arrow-top-k",
                                      "2", "--max-new-tokens", "10", "--json", str(out)]
                        + [a for i, d in enumerate(tasks) for a in ("--adapter", f"t{i}={d}")]
                        + [a for p in prompts for a in ("--prompt", p)])
    main()
    theirs = create_arrow_model(load_fp32(tiny_llama), tasks, ArrowConfig(top_k=2, rng_seed=0)).eval()
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_llama)))
    stops = stop_token_ids(theirs, tok)
    expected = [tok.decode(greedy_no_cache(theirs, text_prompt(tok, p).ids, stops, 10), skip_special_tokens=True)
                for p in prompts]
    assert [r["completion"] for r in json.loads(out.read_text())] == expected
    assert expected != [tok.decode(greedy_no_cache(load_fp32(tiny_llama), text_prompt(tok, p).ids, stops, 10),
                                   skip_special_tokens=True) for p in prompts]


def test_generate_flags_that_do_not_go_together_are_refused(tiny_llama, tmp_path, monkeypatch, capsys):
    from tests.conftest import cli_user_error

    tasks = _adapters(tiny_llama, tmp_path, 2, 0)
    named = ["--adapter", f"a={tasks[0]}", "--adapter", f"b={tasks[1]}"]
    for args, message in [
        (["--arrow", "--adapter", tasks[0]], "--arrow routes among named adapters"),
        ([*named, "--arrow", "--general", "c"], "--general c names none of them"),
        ([*named, "--general", "b"], "pass --arrow too"),
        ([*named, "--arrow", "--route", "x", "--data", "d.jsonl"], "give one of them"),
        ([*named, "--arrow", "--arrow-top-k", "3"], "--arrow-top-k 3: takes 1 to 2, the task adapters"),
        ([*named, "--arrow", "--general", "b", "--arrow-top-k", "2"], "--arrow-top-k 2: takes 1 to 1"),
        ([*named, "--arrow", "--arrow-temperature", "0"], "--arrow-temperature 0.0: give a finite number above 0"),
        ([*named, "--arrow-temperature", "2"], "--arrow-temperature sets Arrow routing: pass --arrow too"),
        ([*named, "--arrow", "--general", "b", "--general", "b"], "each adapter once"),
    ]:
        err = cli_user_error(monkeypatch, capsys, "generate", "--model", str(tiny_llama), "--prompt", "hi", *args)
        assert message in " ".join(err.split()), err


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["chat"], ["eval", "--data", "d.jsonl"]])
def test_wrong_arrow_flags_are_said_before_a_hub_adapter_is_fetched(command, tiny_llama, monkeypatch, capsys):
    """The flags are checked first: a mistake is said at once, not after downloading every hub adapter named (eval
    fetched them all first)."""
    import peftkit.hub
    from tests.conftest import cli_user_error

    def fetch(value: str):
        raise AssertionError(f"{value} fetched before the flags were checked")

    monkeypatch.setattr(peftkit.hub, "hub_adapter", fetch)
    hub = ["--adapter", "a=acme/a", "--adapter", "b=acme/b"]
    for args, message in [
        ([*hub, "--general", "b"], "pass --arrow too"),
        ([*hub, "--arrow", "--arrow-top-k", "3"], "--arrow-top-k 3: takes 1 to 2"),
        ([*hub, "--arrow", "--general", "c"], "--general c names none of them"),
        (["--adapter", "acme/a", "--arrow"], "--arrow routes among named adapters"),
        ([*hub, "--arrow", "--task", "0"], "--task 0 picks the task of a multitask prompt tuning or Poly adapter"),
        ([*hub, "--arrow", "--general", "a", "--general", "b"],  # no task adapter: was found after loading, or never
         "--general names 2 of the 2 --adapter NAME=DIR adapters: Arrow routes each token among the task adapters, "
         "those not --general, so leave at least one out of --general."),
    ]:
        err = cli_user_error(monkeypatch, capsys, *command, "--model", str(tiny_llama), *args)
        assert message in " ".join(err.split()), err
    if command[0] == "eval":  # its reserved row name too
        err = cli_user_error(monkeypatch, capsys, *command, "--model", str(tiny_llama), "--adapter", "a=acme/a",
                             "--adapter", "arrow=acme/b", "--arrow")
        assert "--arrow adds a row named 'arrow' to the comparison: name that adapter otherwise." in err


def test_chat_arrow_replies_as_cache_free_greedy_through_peft_s_arrow_model(tiny_llama, tmp_path, monkeypatch, capsys):
    """`peftkit chat --adapter NAME=DIR ... --arrow --general NAME`: each reply is greedy decoding of the conversation
    so far, one full forward per token, through peft's Arrow model with GenKnowSub; several adapters without --arrow
    are refused."""
    import builtins
    import sys

    from peftkit.cli import main
    from peftkit.data.prompts import chat_prompt
    from peftkit.decoding import stop_token_ids
    from peftkit.modeling import load_tokenizer
    from peftkit.recipe import ModelConfig
    from tests.conftest import cli_user_error
    from tests.test_generate import greedy_no_cache

    dirs = _adapters(tiny_llama, tmp_path, 4, 0)
    named = [a for i, d in enumerate(dirs) for a in ("--adapter", f"t{i}={d}")]
    lines = iter(["hi", "and then?", "/exit"])
    monkeypatch.setattr(builtins, "input", lambda _: next(lines))
    monkeypatch.setattr(sys, "argv", ["peftkit", "chat", "--model", str(tiny_llama), *named, "--arrow",
                                      "--general", "t3", "--max-new-tokens", "6"])
    main()
    shown = capsys.readouterr().out
    theirs = create_arrow_model(load_fp32(tiny_llama), dirs[:3], ArrowConfig(top_k=3, rng_seed=0, use_gks=True),
                                general_adapter_paths=dirs[3:]).eval()
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_llama)))
    messages = []
    for line in ("hi", "and then?"):
        messages.append({"role": "user", "content": line})
        ids = greedy_no_cache(theirs, chat_prompt(tok, messages).ids, stop_token_ids(theirs, tok), 6)
        messages.append({"role": "assistant", "content": tok.decode(ids, skip_special_tokens=True)})
        assert f"model> {messages[-1]['content']}\n" in shown
    base = greedy_no_cache(load_fp32(tiny_llama), chat_prompt(tok, messages[:1]).ids, stop_token_ids(theirs, tok), 6)
    assert tok.decode(base, skip_special_tokens=True) != messages[1]["content"]

    err = cli_user_error(monkeypatch, capsys, "chat", "--model", str(tiny_llama), *named[:4])
    assert "peftkit chat runs one adapter" in err and "--arrow" in err


def test_eval_arrow_adds_a_row_with_peft_s_arrow_model_s_figures(tiny_llama, number_data, tmp_path, monkeypatch):
    """`peftkit eval --adapter NAME=DIR ... --arrow` adds the row `arrow`: the loss (and exact match of its greedy
    answers) that peft's Arrow model gives on the same rows."""
    import json
    import sys

    from peftkit.cli import main
    from peftkit.eval_job import eval_job
    from peftkit.evaluate import evaluate

    tasks = _adapters(tiny_llama, tmp_path, 3, 0)
    out = tmp_path / "out.json"
    monkeypatch.setattr(sys, "argv", ["peftkit", "eval", "--model", str(tiny_llama), "--data", str(number_data["eval"]),
                                      "--metrics", "loss,exact_match", "--max-new-tokens", "6", "--arrow",
                                      "--arrow-top-k", "2", "--general", "t2", "--json", str(out)]
                        + [a for i, d in enumerate(tasks) for a in ("--adapter", f"t{i}={d}")])
    main()
    results = json.loads(out.read_text())
    assert set(results) == {"base", "t0", "t1", "t2", "arrow"}
    theirs = create_arrow_model(load_fp32(tiny_llama), tasks[:2], ArrowConfig(top_k=2, use_gks=True, rng_seed=0),
                                general_adapter_paths=tasks[2:]).eval()
    job = eval_job(None, [], str(tiny_llama), str(number_data["eval"]), None, None, None, None, None,
                   metrics="loss,exact_match", max_new_tokens=6)
    expected = evaluate(job, theirs)
    assert abs(results["arrow"]["loss"] - expected["loss"]) <= 1e-5
    assert results["arrow"]["exact_match"] == expected["exact_match"]
    assert abs(results["arrow"]["loss"] - results["base"]["loss"]) > 1e-3


def test_eval_flags_that_do_not_go_together_are_refused(tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    from tests.conftest import cli_user_error

    tasks = _adapters(tiny_llama, tmp_path, 2, 0)
    base = ["eval", "--model", str(tiny_llama), "--data", str(number_data["eval"])]
    for args, message in [
        (["--arrow", "--adapter", tasks[0]], "--arrow routes among named adapters"),
        (["--adapter", f"a={tasks[0]}", "--adapter", f"arrow={tasks[1]}", "--arrow"], "name that adapter otherwise"),
        (["--adapter", f"a={tasks[0]}", "--adapter", f"b={tasks[1]}", "--arrow", "--general", "c"],
         "--general c names none of them"),
        (["--adapter", f"a={tasks[0]}", "--adapter", f"b={tasks[1]}", "--general", "b"], "pass --arrow too"),
        (["--adapter", tasks[0], "--general", "b"], "pass --arrow too"),  # was ignored
        (["--adapter", f"a={tasks[0]}", "--adapter", f"b={tasks[1]}", "--arrow-top-k", "1"], "pass --arrow too"),
        (["--adapter", f"a={tasks[0]}", "--adapter", f"b={tasks[1]}", "--arrow", "--arrow-top-k", "3"],
         "--arrow-top-k 3: takes 1 to 2"),
        (["--adapter", f"a={tasks[0]}", "--adapter", f"b={tasks[1]}", "--arrow", "--task", "1"], "drop --task"),
    ]:
        err = cli_user_error(monkeypatch, capsys, *base, *args)
        assert message in " ".join(err.split()), err


def test_eval_arrow_refuses_adapters_of_other_ranks_before_evaluating(tiny_llama, number_data, tmp_path, monkeypatch,
                                                                     capsys):
    """Adapters Arrow cannot route (here of ranks 4 and 2) were refused after the base and every adapter had been
    evaluated, their predictions written; now right after loading, before any row is evaluated."""
    from tests.conftest import cli_user_error

    dirs = _adapters(tiny_llama, tmp_path, 1, 0) + _adapters(tiny_llama, tmp_path, 1, 1, r=2)
    preds = tmp_path / "preds"
    err = cli_user_error(monkeypatch, capsys, "eval", "--model", str(tiny_llama), "--data", str(number_data["eval"]),
                         "--metrics", "exact_match", "--max-new-tokens", "2", "--adapter", f"a={dirs[0]}", "--adapter",
                         f"b={dirs[1]}", "--arrow", "--predictions", str(preds))
    assert "Arrow routes adapters of one rank (as peft's)" in err and "a r=4, b r=2" in err
    assert not preds.exists()  # no model's predictions written (the directory made for them is gone)


def test_arrow_warns_where_the_adapters_carry_other_chat_templates(tiny_llama, number_data, tmp_path, monkeypatch,
                                                                  capsys):
    """Arrow picks adapters per token, so a prompt has one chat template: the first --adapter's. Where another carries
    its own (a run's adapter/chat_template.jinja), generate --arrow and chat --arrow rendered every prompt in the
    first's with no word; now a warning names both and how to choose. Prompts that use no template (a plain
    --prompt), adapters of one template, and a recipe's data.chat_template (one for all) are not warned of."""
    import builtins
    import shutil
    import sys

    from peftkit.cli import main
    from peftkit.data.chat_templates import ADAPTER_TEMPLATE, CHATML
    from peftkit.tiny import write_jsonl
    from tests.conftest import make_recipe

    a, b = _adapters(tiny_llama, tmp_path, 2, 0)
    shutil.copytree(b, tmp_path / "b_chatml")
    (tmp_path / "b_chatml" / ADAPTER_TEMPLATE).write_text(CHATML)
    named = ["--adapter", f"a={a}", "--adapter", f"b={tmp_path / 'b_chatml'}", "--arrow"]
    said = (f"warning: --arrow routes each token among adapters whose chat templates differ, and every prompt is "
            f"rendered in a's, the first --adapter's (the base tokenizer's own), not in b's "
            f"({tmp_path / 'b_chatml' / ADAPTER_TEMPLATE}). To prompt in another, give a recipe or run directory whose "
            "data.chat_template sets it for all (or --set data.chat_template=NAME|FILE with one), or name that "
            "adapter first.")
    recipe = make_recipe(tmp_path, tiny_llama, number_data)
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "1+1?"},
                                                        {"role": "assistant", "content": "2"}]}])
    lines = iter(["hi", "/exit"])
    monkeypatch.setattr(builtins, "input", lambda _: next(lines))
    for args, warned in [(["generate", "--model", str(tiny_llama), *named, "--prompt", "hi", "--chat"], True),
                         (["chat", "--model", str(tiny_llama), *named], True),
                         (["eval", "--model", str(tiny_llama), *named, "--data", str(tmp_path / "chat.jsonl"),
                           "--format", "chat"], "the base row's (the base tokenizer's own)"),
                         (["generate", "--model", str(tiny_llama), *named, "--prompt", "hi"], False),  # no template
                         (["generate", "--model", str(tiny_llama), *named[:2], "--adapter", f"b={b}", "--arrow",
                           "--prompt", "hi", "--chat"], False),
                         (["generate", str(recipe), "--set", "data.format=chat", "--set",
                           "data.chat_template=chatml", *named, "--prompt", "hi", "--chat"], False)]:
        monkeypatch.setattr(sys, "argv", ["peftkit", *args, *(["--max-new-tokens", "1"] * (args[0] != "eval"))])
        main()
        err = " ".join(capsys.readouterr().err.split())
        if isinstance(warned, str):  # eval's arrow row reads its rows as the base row does
            assert said.replace("a's, the first --adapter's (the base tokenizer's own)", warned).replace(
                ", or name that adapter first", "") in err, err
        else:
            assert ("chat templates differ" in err) is warned and (said in err) is warned, (args, err)
