"""Several named adapters on one base (`peftkit.adapters.named`): each activated equals it loaded alone, disabled
is the base exactly, delete frees its parameters; a mixed batch gives each row what that row alone gives with its
adapter (logits and greedy tokens), and what peft's `adapter_names=` gives; `peftkit generate --route` and the
mistakes a user can make."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from peftkit.adapters.host import AdapterHost
from peftkit.adapters.named import NamedAdapters, load_named_model
from peftkit.adapters.sharing import loads_alone
from peftkit.decoding import Sampling, generate_ids, generate_texts
from peftkit.errors import PeftkitError
from peftkit.generate import generate_job
from peftkit.methods.ia3 import IA3Config
from peftkit.methods.lora import LoraConfig
from peftkit.methods.lora_layers import LoraLinear
from peftkit.methods.prompt_tuning import PromptTuningConfig
from peftkit.adapter_base import load_adapted_model
from peftkit.tiny import number_rows, write_jsonl
from tests.conftest import cli_user_error, save_random_adapter

PAD = 0
# Left-padded rows of different lengths, as generation batches them.
ROWS = [[1, 40, 41, 42, 7, 60, 61], [1, 50, 51, 52], [1, 5, 6, 7, 8, 9], [1, 33, 34, 35, 36, 37, 38], [1, 70]]


def _batch(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _base(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _make(base: Path, cfg, out: Path, seed: int) -> str:
    """A PEFT-format adapter far from identity (LoRA: nonzero B; IA3 away from 1; saved modules changed)."""
    return str(save_random_adapter(base, cfg, out, seed))


def _configs(arch: str) -> dict:
    # Llama's lm_head is not tied to its embeddings: a saved copy per adapter. DoRA and IA3 take the generic route
    # of a mixed batch, LoRA the additive one; `b` adapts fewer layers than `a`.
    return {"a": LoraConfig(r=4, alpha=8, modules_to_save=["lm_head"] if arch == "llama" else []),
            "b": LoraConfig(r=2, alpha=4, use_dora=True, target_modules=["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"]),
            "c": IA3Config(method="ia3")}


@pytest.fixture(scope="module")
def adapters(tiny_llama, tiny_gpt2, tmp_path_factory) -> dict[str, dict[str, str]]:
    root = tmp_path_factory.mktemp("named")
    return {arch: {name: _make(base, cfg, root / arch / name, seed)
                   for seed, (name, cfg) in enumerate(_configs(arch).items(), start=1)}
            for arch, base in (("llama", tiny_llama), ("gpt2", tiny_gpt2))}


@pytest.fixture(scope="module")
def loaded(adapters):
    """Per architecture: (model with a, b, c loaded, its NamedAdapters, each adapter loaded alone)."""
    out = {}
    for arch, dirs in adapters.items():
        model, named, tok = load_named_model(list(dirs.items()))
        alone = {name: load_adapted_model(None, d)[0] for name, d in dirs.items()}
        out[arch] = (model, named, alone, tok)
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_each_adapter_activated_is_that_adapter_alone_and_disabled_is_the_base(arch, loaded, request):
    model, named, alone, _ = loaded[arch]
    base = _base(request.getfixturevalue(f"tiny_{arch}"))
    ids, mask = _batch(ROWS)
    with torch.no_grad():
        expected_base = base(input_ids=ids, attention_mask=mask).logits
        for name in named.names:
            named.activate(name)
            ours = model(input_ids=ids, attention_mask=mask).logits
            theirs = alone[name](input_ids=ids, attention_mask=mask).logits
            assert (theirs - expected_base).abs().max() > 1e-2  # the adapter really changes the output
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
        with named.disabled():
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, expected_base)
        assert named.active == "c"  # the adapter active before the block
        named.activate(None)
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, expected_base)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_mixed_batch_gives_each_row_what_it_gives_alone(arch, loaded):
    """Logits (<= 1e-5) and greedy tokens (equal) of each row of one mixed batch, against that row alone with its
    adapter activated; LoRA rows (additive update), DoRA and IA3 rows (whole-layer route) and base rows together."""
    model, named, _, tok = loaded[arch]
    routes = ["a", None, "b", "c", "base"]
    ids, mask = _batch(ROWS)
    with torch.no_grad(), named.routed(routes):
        mixed = model(input_ids=ids, attention_mask=mask).logits
    with named.routed(routes):
        mixed_tokens = generate_ids(model, tok, ROWS, Sampling(max_new_tokens=6))
    for i, route in enumerate(routes):
        named.activate(route)
        with torch.no_grad():
            row = model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits
        torch.testing.assert_close(mixed[i:i + 1], row, rtol=0, atol=1e-5)
        assert mixed_tokens[i] == generate_ids(model, tok, [ROWS[i]], Sampling(max_new_tokens=6))[0]
    named.activate(None)
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
    assert all((mixed[i] - base[i]).abs().max() > 1e-2 for i in (0, 2, 3))  # the adapted rows really differ
    assert torch.equal(mixed[[1, 4]], base[[1, 4]])


def test_a_mixed_batch_is_peft_s_adapter_names(tiny_llama, adapters, tmp_path):
    """peft's mixed batch as an independent reference: two LoRA adapters on different layers, each saving its lm_head,
    and base rows. (peft 0.21 raises KeyError for a mixed batch where only some adapters save a module; peftkit
    runs the others' rows through the base module: the test above.)"""
    cfg = LoraConfig(r=2, alpha=2, target_modules=["k_proj", "down_proj"], modules_to_save=["lm_head"])
    other = _make(tiny_llama, cfg, tmp_path / "d", 7)
    model, named, _ = load_named_model([("a", adapters["llama"]["a"]), ("d", other)])
    reference = PeftModel.from_pretrained(_base(tiny_llama), adapters["llama"]["a"], adapter_name="a")
    reference.load_adapter(other, adapter_name="d")
    reference.eval()
    ids, mask = _batch(ROWS)
    with torch.no_grad():
        theirs = reference(input_ids=ids, attention_mask=mask, adapter_names=["a", "__base__", "d", "a", "d"]).logits
        with named.routed(["a", None, "d", "a", "d"]):
            ours = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_a_peft_adapter_saving_norm_layers_keeps_them_out_of_the_shared_base(tiny_llama, adapters, tmp_path):
    """peft matches modules_to_save by string suffix: its `norm` saves every input_layernorm and
    post_attention_layernorm too. Those are that adapter's copies: the base and the other adapters keep their own."""
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model

    torch.manual_seed(0)
    theirs = get_peft_model(_base(tiny_llama), PeftLora(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"],
                                                        modules_to_save=["norm"], init_lora_weights=False))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad and "norm" in name:
                p.add_(0.5 * torch.randn(p.shape))
    theirs.eval().save_pretrained(tmp_path / "norms")
    model, named, _ = load_named_model([("norms", str(tmp_path / "norms")), ("a", adapters["llama"]["a"])])
    ids, mask = _batch(ROWS)
    with torch.no_grad():
        expected = {"norms": theirs(input_ids=ids, attention_mask=mask).logits, None: _base(tiny_llama)(
            input_ids=ids, attention_mask=mask).logits, "a": PeftModel.from_pretrained(_base(tiny_llama), adapters[
                "llama"]["a"]).eval()(input_ids=ids, attention_mask=mask).logits}
        for name, logits in expected.items():
            named.activate(name)
            torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, logits, rtol=0, atol=1e-5)


def test_a_peft_adapter_that_trained_the_base_s_biases_is_refused_and_compared_alone(tiny_gpt2, adapters, tmp_path):
    """peft's `bias: all` saves the base's own biases, trained: loaded beside other adapters they went into the shared
    base layers, and the base's rows and every other adapter ran with them (logits 0.3 off). A comparison
    (`peftkit eval --adapter NAME=DIR ...`) evaluates such an adapter on a model of its own."""
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model

    theirs = get_peft_model(_base(tiny_gpt2), PeftLora(task_type="CAUSAL_LM", r=4, target_modules=["c_attn"],
                                                       bias="all", fan_in_fan_out=True))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if name.endswith(".bias"):
                p.add_(0.3)
    theirs.save_pretrained(tmp_path / "biased")
    for order in ([("a", adapters["gpt2"]["a"]), ("biased", str(tmp_path / "biased"))],
                  [("biased", str(tmp_path / "biased")), ("a", adapters["gpt2"]["a"])]):
        with pytest.raises(PeftkitError, match=r"^Adapter 'biased' \(.*\) also trained the base's biases \(bias: all in "
                                               r"its adapter_config.json; \d+ saved, e.g. transformer.h.0"):
            load_named_model(order)
    assert loads_alone(str(tmp_path / "biased")) == "bias"
    assert loads_alone(adapters["gpt2"]["a"]) is None


def test_delete_takes_the_adapter_and_its_parameters_out(tiny_llama, adapters):
    model, named, _ = load_named_model(list(adapters["llama"].items()))
    base = _base(tiny_llama)
    base_params = sum(p.numel() for p in base.parameters())
    ids, mask = _batch(ROWS)
    named.activate("b")
    named.delete("b")
    assert named.names == ["a", "c"] and named.active is None
    assert not any(".b." in n for n, _ in model.named_parameters())
    named.delete("a")
    named.delete("c")
    assert sum(p.numel() for p in model.parameters()) == base_params
    assert not any(isinstance(m, AdapterHost) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           base(input_ids=ids, attention_mask=mask).logits)
    named.load("a", adapters["llama"]["a"])  # and loads again
    assert named.names == ["a"]


def test_a_prompt_family_adapter_is_active_alone_and_refused_in_a_mixed_batch(tiny_llama, adapters, tmp_path):
    prompt = _make(tiny_llama, PromptTuningConfig(method="prompt_tuning", num_virtual_tokens=3), tmp_path / "p", 5)
    model, named, _ = load_named_model([("a", adapters["llama"]["a"]), ("p", prompt)])
    alone = load_adapted_model(None, prompt)[0]
    ids, mask = _batch(ROWS)
    with torch.no_grad():
        named.activate("p")
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                   alone(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=1e-6)
        named.activate("a")  # the prompt is taken off the model
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                   load_adapted_model(None, adapters["llama"]["a"])[0](input_ids=ids, attention_mask=mask).logits,
                                   rtol=0, atol=1e-6)
    with pytest.raises(PeftkitError, match=r"Adapter 'p' is Prompt tuning \(method: prompt_tuning\), which cannot "
                                           r"serve a mixed batch: it adds virtual tokens to the whole batch"), named.routed(["a", "p"]):
        pass
    assert named.active == "a"


def test_mistakes_are_clear(tiny_llama, adapters, loaded):
    model, named, _, _ = loaded["llama"]
    with pytest.raises(PeftkitError, match=r"No adapter named 'x' is loaded \(loaded: a, b, c\)"):
        named.activate("x")
    with pytest.raises(PeftkitError, match=r"An adapter named 'a' is already loaded \(from .*/a\); give this one"):
        named.load("a", adapters["llama"]["b"])
    with pytest.raises(PeftkitError, match=r"Adapter name 'v1/2': use letters, digits, _, . and -"):
        named.load("v1/2", adapters["llama"]["b"])
    with pytest.raises(PeftkitError, match=r"Adapter 'g' \(.*\) was trained on .*tiny-gpt2, adapter 'a' on .*tiny-llama: "
                                           "adapters in one model share one base"):
        named.load("g", adapters["gpt2"]["a"])
    with pytest.raises(PeftkitError, match=r"A mixed batch routes 2 rows, but this forward has 5"), torch.no_grad(), named.routed(["a", "b"]):
        model(input_ids=_batch(ROWS)[0])
    ids = _batch(ROWS[:2])[0]
    with torch.no_grad(), named.routed(["a", "b"]):  # a nested block's end ended the outer one: its rows ran the base
        mixed = model(input_ids=ids).logits
        with pytest.raises(PeftkitError, match=r"A mixed batch inside a mixed batch: blocks of `routed` do not nest"), \
                named.routed(["b", "a"]):
            pass
        assert torch.equal(model(input_ids=ids).logits, mixed)
        # disabled() (or activate) here changed nothing: the rows still ran their adapters, not the base
        with pytest.raises(PeftkitError, match=r"A mixed batch \(or Arrow routing\) is on: .* End the block first"), \
                named.disabled():
            pass
        with pytest.raises(PeftkitError, match=r"A mixed batch \(or Arrow routing\) is on"):
            named.activate("a")
        # delete here left b's rows running the base from then on, without a word
        with pytest.raises(PeftkitError, match=r"A mixed batch \(or Arrow routing\) is on: delete adapter 'b' after"):
            named.delete("b")
        assert torch.equal(model(input_ids=ids).logits, mixed)
    assert named.active is None
    model.train()
    try:
        with pytest.raises(PeftkitError, match=r"A mixed batch is for inference: call model.eval\(\) first"), named.routed(["a"]):
            pass
    finally:
        model.eval()
    scaled = Path(named._adapters["b"].directory).parent / "b-scaled"  # b again, recorded as trained RoPE-scaled
    shutil.copytree(adapters["llama"]["b"], scaled)
    meta = json.loads((scaled / "peftkit.json").read_text()) | {"rope_scaling": {"type": "linear", "factor": 2.0}}
    (scaled / "peftkit.json").write_text(json.dumps(meta))
    with pytest.raises(PeftkitError, match=r"Adapter 's' \(.*\) was trained with RoPE scaling linear x2.0, adapter 'a' "
                                           "with none: adapters in one model share one base, scaled one way"):
        named.load("s", scaled)
    # One NF4 base quantized from other dtypes (peftkit.json base_dtype): other 4-bit codes, loaded on the first's.
    from peftkit.recipe import QuantizationConfig

    quantized = {}
    for dtype in ("bfloat16", None):
        quantized[dtype] = Path(named._adapters["b"].directory).parent / f"b-nf4-{dtype}"
        shutil.copytree(adapters["llama"]["b"], quantized[dtype])
        meta = json.loads((quantized[dtype] / "peftkit.json").read_text())
        meta |= {"quantization": QuantizationConfig().model_dump(), "quantized_on": "cpu", "base_dtype": dtype}
        (quantized[dtype] / "peftkit.json").write_text(json.dumps(meta))
    nf4 = NamedAdapters(_base(tiny_llama), quantization=QuantizationConfig())  # (the weights' dtype is not read)
    nf4.load("q16", quantized["bfloat16"])
    with pytest.raises(PeftkitError, match=r"Adapter 'q32' \(.*\) was trained on a base quantized from float32, "
                                           "adapter 'q16' on one quantized from bfloat16"):
        nf4.load("q32", quantized[None])
    # The base named by the caller: the weights decide, and another architecture's do not fit.
    own = NamedAdapters(_base(tiny_llama), base=str(tiny_llama))
    with pytest.raises(PeftkitError, match=r"^Adapter 'g' \(.*\): adapter_config.json's target_modules .* match no "
                                           r"module of this base model .*: the adapter was trained on another base model"):
        own.load("g", adapters["gpt2"]["a"])
    assert own.names == [] and not any(isinstance(m, AdapterHost) for m in own.model.modules())


@pytest.fixture(scope="module")
def routed_data(tmp_path_factory) -> Path:
    rows = number_rows(6, seed=3)
    for row, adapter in zip(rows, ["a", "", "c", "b", "base", "a"], strict=True):
        row["adapter"] = adapter
    path = tmp_path_factory.mktemp("routed") / "rows.jsonl"
    write_jsonl(path, rows)
    return path


def test_generate_route_gives_each_row_its_adapter_s_completion(tiny_llama, adapters, routed_data, tmp_path, monkeypatch):
    from peftkit.cli import main

    dirs, out = adapters["llama"], tmp_path / "out.json"
    monkeypatch.setattr("sys.argv", ["peftkit", "generate", "--data", str(routed_data), "--route", "adapter",
                                     *[f"--adapter={n}={d}" for n, d in dirs.items()], "--max-new-tokens", "6",
                                     "--batch-size", "4", "--json", str(out)])
    main()
    results = json.loads(out.read_text())
    assert [r["adapter"] for r in results] == ["a", "base", "c", "b", "base", "a"]
    job = generate_job(None, [], None, dirs["a"], [], str(routed_data), None, False, None, Sampling(max_new_tokens=6), 4)
    tok = job.source.tokenizer()
    prompts = job.build_prompts(tok)
    for name in ("a", "b", "c", "base"):
        model = _base(tiny_llama) if name == "base" else load_adapted_model(None, dirs[name])[0]
        rows = [i for i, r in enumerate(results) if r["adapter"] == name]
        expected = generate_texts(model, tok, [prompts[i] for i in rows], Sampling(max_new_tokens=6))
        assert [results[i]["completion"] for i in rows] == expected
    assert len({r["completion"] for r in results}) > 2  # the adapters really answer differently


def test_generate_route_refuses_a_prompt_family_adapter_by_name(tiny_llama, adapters, routed_data, tmp_path,
                                                               monkeypatch, capsys):
    prompt = _make(tiny_llama, PromptTuningConfig(method="prompt_tuning", num_virtual_tokens=3), tmp_path / "c", 5)
    err = cli_user_error(monkeypatch, capsys, "generate", "--data", str(routed_data), "--route", "adapter",
                         f"--adapter=a={adapters['llama']['a']}", f"--adapter=b={adapters['llama']['b']}",
                         f"--adapter=c={prompt}", "--max-new-tokens", "2")
    assert "Adapter 'c' is Prompt tuning (method: prompt_tuning), which cannot serve a mixed batch" in err


def test_generate_route_mistakes(adapters, routed_data, monkeypatch, capsys):
    dirs = adapters["llama"]
    named = [f"--adapter=a={dirs['a']}", f"--adapter=b={dirs['b']}"]
    args = ["generate", "--data", str(routed_data)]
    assert "2 --adapter given: pass --data FILE --route COLUMN" in cli_user_error(monkeypatch, capsys, *args, *named)
    assert "--route adapter: name the adapters it picks from" in cli_user_error(
        monkeypatch, capsys, *args, "--route", "adapter", "--adapter", dirs["a"])
    assert "--route adapter reads a column of each --data row; pass --data FILE" in cli_user_error(
        monkeypatch, capsys, "generate", "--prompt", "hi", "--route", "adapter", *named)
    assert "rows.jsonl:3 names adapter 'c'" in cli_user_error(monkeypatch, capsys, *args, "--route", "adapter", *named)
    assert "--route task: " in (err := cli_user_error(monkeypatch, capsys, *args, "--route", "task", *named))
    assert "rows.jsonl:1 has no 'task' column" in err


def test_generate_route_names_a_row_by_its_line_past_a_skipped_row(tiny_llama, adapters, routed_data, tmp_path,
                                                                   monkeypatch, capsys):
    """A row skipped under data.on_bad_rows: skip is no prompt: the rows after it were named by their prompt's index,
    one line early (row 2 for the 'c' of line 3)."""
    from tests.conftest import make_recipe

    rows = [json.loads(line) for line in routed_data.read_text().splitlines()]
    rows[1]["instruction"] = 5  # line 2: bad, skipped
    write_jsonl(tmp_path / "rows.jsonl", rows)
    recipe = make_recipe(tmp_path, tiny_llama, {"train": tmp_path / "rows.jsonl", "eval": tmp_path / "rows.jsonl"},
                         data={"on_bad_rows": "skip"})
    dirs = adapters["llama"]
    err = cli_user_error(monkeypatch, capsys, "generate", str(recipe), "--data", str(tmp_path / "rows.jsonl"),
                         "--route", "adapter", f"--adapter=a={dirs['a']}", f"--adapter=b={dirs['b']}")
    assert f"--route adapter: {tmp_path / 'rows.jsonl'}:3 names adapter 'c'" in err



def test_generate_route_asks_each_row_in_its_own_adapter_s_chat_template(tiny_llama, adapters, tmp_path, monkeypatch):
    """Chat rows of a mixed batch are rendered as each row's adapter alone renders them: a run's adapter carries its
    data.chat_template (chat_template.jinja), another none (the base tokenizer's own, as a base row's). Every row was
    rendered in the first adapter's template, so b's rows were asked in ChatML, which b never saw."""
    from peftkit.cli import main
    from peftkit.data.chat_templates import ADAPTER_TEMPLATE, CHATML
    from peftkit.generate import run_generate

    chatml = tmp_path / "a"
    shutil.copytree(adapters["llama"]["a"], chatml)
    (chatml / ADAPTER_TEMPLATE).write_text(CHATML)
    dirs = {"a": str(chatml), "b": adapters["llama"]["b"]}
    rows = [{"messages": [{"role": "user", "content": f"{i}+{i}?"}, {"role": "assistant", "content": str(2 * i)}],
             "adapter": name} for i, name in enumerate(["a", "b", "base", "b", "a"])]
    write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "out.json"
    monkeypatch.setattr("sys.argv", ["peftkit", "generate", "--model", str(tiny_llama), "--data",
                                     str(tmp_path / "chat.jsonl"), "--format", "chat", "--route", "adapter",
                                     *[f"--adapter={n}={d}" for n, d in dirs.items()], "--max-new-tokens", "4",
                                     "--json", str(out)])
    main()
    mixed = json.loads(out.read_text())
    assert mixed[0]["prompt"].startswith("<|im_start|>user") and not mixed[1]["prompt"].startswith("<|im_start|>")
    for name in ("a", "b", "base"):
        write_jsonl(tmp_path / f"{name}.jsonl", [r for r in rows if r["adapter"] == name])
        job = generate_job(None, [], str(tiny_llama), dirs.get(name), [], str(tmp_path / f"{name}.jsonl"), "chat",
                           False, None, Sampling(max_new_tokens=4), 8)
        alone = run_generate(job)
        assert [(r["prompt"], r["completion"]) for r in mixed if r["adapter"] == name] == [
            (r["prompt"], r["completion"]) for r in alone]

def test_any_name_eval_accepts_works_dots_and_torch_s_own_words_too(adapters, loaded):
    """A layer holds its adapters in a torch ModuleDict, whose keys may not hold a '.' nor be its attributes: `eval
    --adapter v1.2=DIR` (a NAME it takes) and `train=DIR` failed, the second with a KeyError traceback."""
    dirs, alone = adapters["llama"], loaded["llama"][2]
    model, named, _ = load_named_model([("v1.2", dirs["a"]), ("train", dirs["b"]), ("keys", dirs["c"])])
    ids, mask = _batch(ROWS[:3])
    with torch.no_grad():
        for name, original in zip(["v1.2", "train", "keys"], "abc", strict=True):
            named.activate(name)
            expected = alone[original](input_ids=ids, attention_mask=mask).logits
            assert (model(input_ids=ids, attention_mask=mask).logits - expected).abs().max() <= 1e-5
        with named.routed(["v1.2", "train", "keys"]):
            mixed = model(input_ids=ids, attention_mask=mask).logits
        for row, original in enumerate("abc"):
            named.activate(None)
            expected = alone[original](input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1]).logits
            assert (mixed[row:row + 1] - expected).abs().max() <= 1e-5
    named.delete("train")
    assert named.names == ["v1.2", "keys"]


def _first_llama_cases():
    from tests.test_methods import CASES

    return [pytest.param(cases[0], id=cases[0].id) for cases in CASES.values() if cases and "llama" in cases[0].archs]


@pytest.mark.parametrize("case", _first_llama_cases())
def test_every_method_beside_lora(case, tiny_llama, adapters, tmp_path):
    """Each method's first conformance case, loaded beside a LoRA adapter: activated, it is that adapter alone; in a
    mixed batch, a weight-update method's rows are those rows alone, and any other method is refused by name (while
    a mixed batch of the other adapters runs past its modules). A Poly adapter, whose layers read each row's task id, is
    refused by name: it loads alone (sharing.refuse_alone). A method that loads alone (`Method.alone`: ShadowPEFT)
    is refused by name."""
    from peftkit.methods import method_of

    other = _make(tiny_llama, case.cfg, tmp_path / "m", 11)
    if getattr(case.cfg, "poly_type", None):
        with pytest.raises(PeftkitError, match="Adapter 'm' is a Poly adapter, whose layers mix their skills by each "
                                               "row's task id, which named adapters do not hand them; load it alone"):
            load_named_model([("a", adapters["llama"]["a"]), ("m", other)])
        return
    if why := method_of(case.cfg).alone:
        with pytest.raises(PeftkitError, match=rf"Adapter 'm' is {method_of(case.cfg).title} .*, which loads alone: "
                                               f"{re.escape(why)}"):
            load_named_model([("a", adapters["llama"]["a"]), ("m", other)])
        return
    model, named, _ = load_named_model([("a", adapters["llama"]["a"]), ("m", other)])
    ids, mask = _batch(ROWS[:3])
    with torch.no_grad():
        named.activate("m")
        alone = load_adapted_model(None, other)[0](input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, alone, rtol=0, atol=1e-6)
        method = method_of(case.cfg)
        if not method.mergeable:
            why = "it computes outputs of its own beside" if method.layer_targets else "it adds virtual tokens"
            with pytest.raises(PeftkitError, match=rf"Adapter 'm' is {method.title} \(method: {method.name}\), which "
                                                   f"cannot serve a mixed batch: {why}"), named.routed(["m", "a", None]):
                pass
        routes = ["m", "a", None] if method.mergeable else ["a", "a", None]
        with named.routed(routes):
            mixed = model(input_ids=ids, attention_mask=mask).logits
        if method.mergeable:
            torch.testing.assert_close(mixed[:1], alone[:1], rtol=0, atol=1e-5)
        named.activate("a")
        torch.testing.assert_close(mixed[1:2], model(input_ids=ids[1:2], attention_mask=mask[1:2]).logits, rtol=0, atol=1e-5)
        with named.disabled():
            torch.testing.assert_close(mixed[2:], model(input_ids=ids[2:], attention_mask=mask[2:]).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_a_mixed_batch_on_a_bf16_base_gives_each_row_the_bits_of_its_adapter_alone(kind):
    """On a bf16 base, each adapter alone adds its fp32 update before rounding once (as peft); a mixed batch rounded
    the update first, and 30 % of a LoRA row's outputs were one bf16 step off."""
    from torch import nn

    from peftkit.methods.lora_layers import LoraEmbedding

    torch.manual_seed(0)
    base = (nn.Linear(64, 48) if kind == "linear" else nn.Embedding(80, 48)).to(torch.bfloat16)
    host = AdapterHost(base)
    for name in ("a", "b"):
        layer = LoraLinear(base, r=4, alpha=8) if kind == "linear" else LoraEmbedding(base, r=4, alpha=8)
        for weight in layer.parameters():
            nn.init.normal_(weight, std=0.5)  # (far from identity)
        host.adapters[name] = layer.eval()
    x = torch.randn(4, 9, 64).to(torch.bfloat16) if kind == "linear" else torch.randint(0, 80, (4, 9))
    host.route(4, [("a", torch.tensor([0, 2])), ("b", torch.tensor([1]))])
    with torch.no_grad():
        mixed = host(x)
        for i, name in enumerate(["a", "b", "a", None]):
            alone = host.adapters[name](x) if name else base(x)
            assert mixed.dtype == torch.bfloat16 and torch.equal(mixed[i], alone[i]), name


def test_a_mixed_batch_through_layers_given_the_tokens_flattened_routes_them_by_row(tmp_path):
    """OPT's feed-forward (and Qwen2-MoE's shared expert) takes the batch's tokens flattened to (rows x tokens,
    features): each row's tokens go through its adapter there too, as peft runs that row alone with it (LoRA rows
    stacked, DoRA rows whole, base rows). The mixed batch was refused as if beam search had multiplied its rows."""
    from peftkit.tiny import build_tiny_model

    build_tiny_model(tmp_path / "opt", arch="opt", hidden_size=32, num_layers=2, seed=0)
    dirs = {"a": _make(tmp_path / "opt", LoraConfig(r=4, alpha=8), tmp_path / "a", 1),
            "c": _make(tmp_path / "opt", LoraConfig(r=2, alpha=4, use_dora=True, target_modules=["fc1", "v_proj"]),
                       tmp_path / "c", 2)}
    model, named, tok = load_named_model(list(dirs.items()))
    routes, rows = ["a", None, "c", "a"], ROWS[:4]
    ids, mask = _batch(rows)
    with torch.no_grad(), named.routed(routes):
        mixed = model(input_ids=ids, attention_mask=mask).logits
    with named.routed(routes):
        tokens = generate_ids(model, tok, rows, Sampling(max_new_tokens=5))
    for i, route in enumerate(routes):
        alone = PeftModel.from_pretrained(_base(tmp_path / "opt"), dirs[route]).eval() if route \
            else _base(tmp_path / "opt")
        with torch.no_grad():
            theirs = alone(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits
        torch.testing.assert_close(mixed[i:i + 1], theirs, rtol=0, atol=1e-5)
        named.activate(route)
        assert tokens[i] == generate_ids(model, tok, [rows[i]], Sampling(max_new_tokens=5))[0]
    with torch.no_grad():
        base = _base(tmp_path / "opt")(input_ids=ids, attention_mask=mask).logits
    assert all((mixed[i] - base[i]).abs().max() > 1e-2 for i in (0, 2, 3))  # (the adapters change the output)
