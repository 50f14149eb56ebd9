"""`adapter.init_from: DIR`: training starts from an existing PEFT-format adapter (peftkit's or peft's)."""

import re

import pytest
import torch
import yaml
from rich.console import Console
from transformers import AutoModelForCausalLM

from peftkit.errors import PeftkitError
from peftkit.recipe import load_recipe
from peftkit.start import make_accelerator, setup
from peftkit.train import train
from tests.conftest import make_recipe

IDS = torch.tensor([[1, 40, 41, 42, 7, 60, 61, 62]])


def _init_recipe(tmp_path, model, files, adapter: dict):
    path = make_recipe(tmp_path, model, files, training={"max_steps": 1}, eval={"base_model": False})
    recipe = yaml.safe_load(path.read_text())
    recipe["adapter"] = adapter
    path.write_text(yaml.safe_dump(recipe))
    return path


def _step0(recipe_path, tmp_path):
    """The model and settings `peftkit train` would start its first step from."""
    recipe = load_recipe(recipe_path)
    out = tmp_path / "run"
    return setup(recipe, out, False, Console(quiet=True), make_accelerator(recipe, out)), recipe


def test_step0_weights_are_the_adapters(tiny_llama, number_data, tmp_path):
    from peftkit.adapters.state_dicts import adapter_state_dict
    from peftkit.peft_format import load_adapter

    first = make_recipe(tmp_path / "a", tiny_llama, number_data, training={"max_steps": 2})
    train(load_recipe(first), console=Console(quiet=True))
    saved = tmp_path / "a" / "run" / "adapter"
    run, recipe = _step0(_init_recipe(tmp_path / "b", tiny_llama, number_data, {"init_from": str(saved)}), tmp_path / "b")
    assert (recipe.adapter.method, recipe.adapter.r, recipe.adapter.alpha) == ("lora", 4, 8)  # from the adapter
    state = adapter_state_dict(run.model, [])
    expected = load_adapter(saved)[1]
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_a_peft_adapter_s_modules_to_save_train_on_and_are_saved_again(tiny_llama, number_data, tmp_path):
    """peft's modules_to_save `norm` (a string suffix) saves every `input_layernorm` beside `model.norm`: a run from it
    loaded those into the base, froze them and left them out of its adapter (the base's values again on loading)."""
    from peft import LoraConfig, get_peft_model

    from peftkit.adapters import trainable_parameters
    from peftkit.adapters.state_dicts import adapter_state_dict
    from peftkit.peft_format import load_adapter

    config = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"], modules_to_save=["norm"])
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), config).save_pretrained(tmp_path / "peft")
    saved = load_adapter(tmp_path / "peft")[1]
    assert "base_model.model.model.layers.1.input_layernorm.weight" in saved
    run, recipe = _step0(_init_recipe(tmp_path, tiny_llama, number_data, {"init_from": str(tmp_path / "peft")}), tmp_path)
    state = adapter_state_dict(run.model, recipe.adapter.modules_to_save)
    assert state.keys() == saved.keys()
    assert sum(p.numel() for p in trainable_parameters(run.model)) == sum(t.numel() for t in saved.values())


@pytest.mark.parametrize("peft_type", ["LORA", "IA3"])
def test_starts_at_a_peft_adapters_logits(peft_type, tiny_llama, number_data, tmp_path):
    from peft import IA3Config, LoraConfig, get_peft_model

    config = (LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
              if peft_type == "LORA" else IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False))
    torch.manual_seed(0)
    reference = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), config).eval()
    reference.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        theirs = reference(IDS).logits
    run, recipe = _step0(_init_recipe(tmp_path, tiny_llama, number_data, {"init_from": str(tmp_path / "peft")}), tmp_path)
    assert recipe.adapter.method == peft_type.lower()
    model = run.accelerator.unwrap_model(run.model).eval()
    with torch.no_grad():
        ours = model(IDS).logits
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_llama)(IDS).logits
    assert float((theirs - base).abs().max()) > 1e-3  # peft's weights really change the output
    assert float((ours - theirs).abs().max()) <= 1e-4


def test_conflicting_method_keys_are_refused(tiny_llama, number_data, tmp_path):
    from peft import LoraConfig, get_peft_model

    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                   LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj"])).save_pretrained(tmp_path / "p")
    init = str(tmp_path / "p")
    recipe = _init_recipe(tmp_path / "r", tiny_llama, number_data, {"init_from": init, "r": 16})
    line = next(i for i, text in enumerate(recipe.read_text().splitlines(), 1) if "init_from:" in text)
    with pytest.raises(PeftkitError, match=rf"^{recipe}:{line}: adapter.init_from: .* \(r: 16 in the recipe, 4 in the "
                                           "adapter\)"):
        load_recipe(recipe)
    with pytest.raises(PeftkitError, match="holds a lora adapter, but adapter.method is 'ia3'"):
        load_recipe(_init_recipe(tmp_path / "m", tiny_llama, number_data, {"init_from": init, "method": "ia3"}))
    # Keys that say the same as the adapter are fine.
    assert load_recipe(_init_recipe(tmp_path / "ok", tiny_llama, number_data,
                                    {"init_from": init, "method": "lora", "r": 4})).adapter.alpha == 8
    with pytest.raises(PeftkitError, match="not found"):
        load_recipe(_init_recipe(tmp_path / "x", tiny_llama, number_data, {"init_from": str(tmp_path / "nothing")}))


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_a_peft_adapter_that_trained_the_base_s_biases_is_refused(bias, tiny_gpt2, number_data, tmp_path):
    """peft's `bias: all` / `lora_only` saves the base's biases as trained: a run from it loaded them and trained with
    them, then exported its LoRA without them (bias: none), a model other than the one it trained."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_gpt2),
                           LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn"], bias=bias,
                                      fan_in_fan_out=True))
    model.save_pretrained(tmp_path / "p")
    recipe = _init_recipe(tmp_path / "r", tiny_gpt2, number_data, {"init_from": str(tmp_path / "p")})
    with pytest.raises(PeftkitError, match=rf"adapter.init_from: .* also trained the base's biases \(bias: {bias} in "
                                           r"its adapter_config.json; \d+ saved, e.g. transformer.h.0.attn.c_attn\)"):
        load_recipe(recipe)
    # With bias: none (peft's default) the biases stay the base's: the same adapter trains on from it.
    model.peft_config["default"].bias = "none"
    model.save_pretrained(tmp_path / "none")
    assert load_recipe(_init_recipe(tmp_path / "n", tiny_gpt2, number_data,
                                    {"init_from": str(tmp_path / "none")})).adapter.r == 4


def test_the_starting_adapter_is_an_input_of_the_run(tiny_llama, number_data, tmp_path):
    """The adapter a run starts from is hashed like its data and base: in manifest.json, checked by `--resume`
    and by `peftkit verify`, so a run cannot silently continue from, or vouch for, another starting point."""
    import json

    from peftkit.fileio import sha256_file
    from peftkit.verify import verify

    first = make_recipe(tmp_path / "a", tiny_llama, number_data, training={"max_steps": 1})
    train(load_recipe(first), console=Console(quiet=True))
    start = tmp_path / "a" / "run" / "adapter"
    path = make_recipe(tmp_path / "b", tiny_llama, number_data, training={"max_steps": 2, "save_steps": 2},
                       eval={"base_model": False})
    path.write_text(path.read_text().replace("adapter:\n", f"adapter:\n  init_from: {start}\n")
                    .replace("  r: 4\n  alpha: 8\n  target_modules: all-linear\n", ""))
    recipe = load_recipe(path)
    train(recipe, console=Console(quiet=True))
    manifest = json.loads((tmp_path / "b" / "run" / "manifest.json").read_text())
    assert manifest["init_from_sha256"] == {f.name: sha256_file(f) for f in sorted(start.iterdir())}

    weights = start / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")  # the last weight's last bytes change
    with pytest.raises(PeftkitError, match="^--resume: adapter.init_from file adapter_model.safetensors changed since"):
        train(recipe, resume=True, console=Console(quiet=True))
    report = verify(tmp_path / "b" / "run", console=Console(quiet=True))
    assert not report.ok
    assert f"adapter.init_from: the files of {start} differ from the recorded ones" in report.differences


def test_a_recipe_copied_from_the_run_is_told_its_target_modules_in_short(tiny_llama, number_data, tmp_path):
    """A recipe that keeps the SFT run's `target_modules: all-linear` beside `init_from` differs from the module
    paths the adapter records: the error names them by count and kind, where it printed every path (210 of them,
    10 kB, on SmolLM2), and says why a recipe copied from that run differs."""
    from collections import Counter

    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    paths = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
    get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=paths)
                   ).save_pretrained(tmp_path / "p")
    recipe = _init_recipe(tmp_path / "r", tiny_llama, number_data,
                          {"init_from": str(tmp_path / "p"), "r": 4, "target_modules": "all-linear"})
    kinds = ", ".join(f"{kind} x{n}" for kind, n in sorted(Counter(p.rsplit(".", 1)[-1] for p in paths).items()))
    with pytest.raises(PeftkitError) as caught:
        load_recipe(recipe)
    message = str(caught.value)
    assert f"(target_modules: 'all-linear' in the recipe, {len(paths)} modules ({kinds}) in the adapter)" in message
    assert paths[0] not in message
    assert message.endswith("The adapter records the module paths its run adapted, never 'all-linear' or short "
                            "names, so a recipe copied from that run's says otherwise here.")
    # A short list is still shown whole.
    short = _init_recipe(tmp_path / "s", tiny_llama, number_data,
                         {"init_from": str(tmp_path / "p"), "target_modules": ["q_proj"]})
    with pytest.raises(PeftkitError, match=r"target_modules: \['q_proj'\] in the recipe, 14 modules \("):
        load_recipe(short)


def test_an_adapter_of_short_names_is_not_said_to_record_paths(tiny_llama, number_data, tmp_path):
    """peft records target_modules as its user wrote them: short names (['v_proj', 'q_proj']) stay short names. The
    note that the adapter records module paths, never short names, was added to every target_modules conflict, here
    beside the adapter's own short names; it is said where the adapter records paths and the recipe does not."""
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
                   ).save_pretrained(tmp_path / "p")
    recipe = _init_recipe(tmp_path / "r", tiny_llama, number_data,
                          {"init_from": str(tmp_path / "p"), "target_modules": ["q_proj"]})
    with pytest.raises(PeftkitError) as caught:
        load_recipe(recipe)
    message = str(caught.value)
    assert re.search(r"\(target_modules: \['q_proj'\] in the recipe, \['(q|v)_proj', '(q|v)_proj'\] in the adapter\)",
                     message), message
    assert message.endswith("Remove those keys from the recipe's adapter section (init_from takes them from the "
                            "adapter), or make them match.")


def test_an_init_from_run_is_evaluated_from_the_adapter_it_starts_from(tiny_llama, number_data, tmp_path, monkeypatch):
    """A run that continues an adapter (adapter.init_from) evaluates, before training, the model it starts from: the
    base with that adapter, whose loss `peftkit eval --adapter DIR` gives (an independent computation), recorded as
    `start_eval_loss` (each named set's `start_eval_<set>_loss`) and titled 'start (init_from: NAME)' in the summary,
    the report and the card; its samples' answers before training are the adapter's (`start`). These were the bare
    base's, titled 'base model': the table said the run improved from the bare base. The start's evaluation, after
    the adapter is loaded, leaves training as it was (the losses of a run evaluating the bare base first), and the
    run verifies; so does an older run, which evaluated the bare base (`base_eval_loss`, ...)."""
    import io
    import json

    from peft import LoraConfig, get_peft_model
    from typer.testing import CliRunner

    from peftkit.cli import app
    from peftkit.start_eval import AS_BASE
    from peftkit.verify import verify

    torch.manual_seed(0)
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), config).save_pretrained(tmp_path / "sft")
    runner, figures = CliRunner(), {}
    for name, adapter in (("base", []), ("start", ["--adapter", str(tmp_path / "sft")])):
        done = runner.invoke(app, ["eval", "--model", str(tiny_llama), "--data", str(number_data["eval"]), "--format",
                                   "alpaca", "--max-length", "128", "--json", str(tmp_path / f"{name}.json"), *adapter])
        assert done.exit_code == 0, done.output
        figures[name] = json.loads((tmp_path / f"{name}.json").read_text())["loss"]
    assert abs(figures["start"] - figures["base"]) > 0.01  # the adapter really moves the figure

    def run(where, **env):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        path = _init_recipe(tmp_path / where, tiny_llama, number_data, {"init_from": str(tmp_path / "sft")})
        raw = yaml.safe_load(path.read_text())
        raw["data"]["eval"] = {"again": str(number_data["eval"]), "numbers": str(number_data["eval"])}  # (sorted)
        raw["training"]["max_steps"] = 2
        raw["eval"] |= {"base_model": True, "samples": 2, "max_new_tokens": 4}
        raw["export"]["report"] = True
        path.write_text(yaml.safe_dump(raw))
        out = io.StringIO()
        summary = train(load_recipe(path), console=Console(file=out, width=200))
        monkeypatch.delenv(AS_BASE, raising=False)
        return summary, out.getvalue(), tmp_path / where / "run"

    summary, printed, out = run("new")
    start, final = summary["start_eval_loss"], summary["eval_loss"]
    assert abs(start - figures["start"]) <= 1e-5 and abs(summary["start_eval_numbers_loss"] - figures["start"]) <= 1e-5
    assert not any(key.startswith("base_eval_") for key in summary)
    assert f"start (init_from: sft): eval loss {start:.4f}" in printed
    assert re.search(rf"eval loss, start \(init_from: sft\) +{start:.4f} ", printed), printed
    assert re.search(rf"eval loss, numbers +{start:.4f} start -> {final:.4f} ", printed), printed
    samples = summary["samples"]
    assert all("start" in s and "base" not in s for s in samples) and "\n  1  start (init_from: sft)  " in printed
    card = (out / "adapter" / "README.md").read_text()
    assert "| | start (init_from: sft) | fine-tuned |" in card and f"| eval loss | {start:.4f} | {final:.4f} |" in card
    page = (out / "report" / "report.html").read_text()
    assert f"<th>start (init_from: sft)</th><th>fine-tuned</th></tr><tr><th>eval loss</th><td>{start:.4f}" in page
    assert page.count("<th>start (init_from: sft)</th>") == 2  # the figures' table and the samples'
    assert verify(out, console=Console(quiet=True)).ok
    # `peftkit eval RECIPE` scores the same start, titled so (it scored the bare base, untitled): each set's figure is
    # `eval RECIPE --adapter DIR`'s; --set adapter.init_from=null gives the bare base.
    recipe, said = tmp_path / "new" / "recipe.yaml", {}
    for name, flags in (("recipe", []), ("adapter", ["--adapter", str(tmp_path / "sft")]),
                        ("bare", ["--set", "adapter.init_from=null"])):
        done = runner.invoke(app, ["eval", str(recipe), "--json", str(tmp_path / f"{name}.json"), *flags])
        assert done.exit_code == 0, done.output
        said[name] = json.loads((tmp_path / f"{name}.json").read_text()), done.output
    for each in ("again", "numbers"):
        assert abs(said["recipe"][0][each]["loss"] - said["adapter"][0][each]["loss"]) <= 1e-6
        assert abs(said["recipe"][0][each]["loss"] - start) <= 1e-5
        assert abs(said["bare"][0][each]["loss"] - figures["base"]) <= 1e-5
    assert said["recipe"][1].startswith("start (init_from: sft): the base with the recipe's adapter.init_from, as "
                                        "train evaluates it before training (the bare base: --set "
                                        "adapter.init_from=null)\n"), said["recipe"][1]
    assert "init_from" not in said["adapter"][1] + said["bare"][1]
    # `generate RECIPE` and `chat RECIPE` answer with the same start, as the run's samples before training did (they
    # answered with the bare base): `generate --adapter DIR`'s answers, said so; --set adapter.init_from=null the bare
    # base's, which differ. (A DPO or KTO recipe's too: their runs' samples are the start's; only eval keeps init_from
    # as their reference.)
    line = "start (init_from: sft): the base with the recipe's adapter.init_from, as train evaluates it before training"
    answers = {}
    data = ["--data", str(number_data["eval"]), "--format", "alpaca"]
    for name, flags, of_data in (("recipe", [str(recipe)], []),
                                 ("bare", [str(recipe), "--set", "adapter.init_from=null"], []),
                                 ("adapter", ["--adapter", str(tmp_path / "sft")], data)):
        done = runner.invoke(app, ["generate", *flags, *of_data, "--limit", "2", "--max-new-tokens", "4", "--json",
                                   str(tmp_path / f"{name}.generated.json")])
        assert done.exit_code == 0, done.output
        assert done.output.startswith(line) == (name == "recipe"), done.output
        answers[name] = [a["completion"] for a in json.loads((tmp_path / f"{name}.generated.json").read_text())]
        chatted = runner.invoke(app, ["chat", *flags, "--max-new-tokens", "4"], input="12+3=\n")
        assert chatted.exit_code == 0, chatted.output
        assert chatted.output.startswith(line) == (name == "recipe"), chatted.output
        answers[name].append(chatted.output.split("model> ", 1)[1])
    assert answers["recipe"] == answers["adapter"] and all(map(str.__ne__, answers["recipe"], answers["bare"])), answers
    assert answers["recipe"][:2] == [s["start"] for s in samples], (answers, samples)

    # A run as peftkit made them before 7 December 2026 (verify's re-run of one evaluates the bare base too).
    older, _, older_out = run("older", **{AS_BASE: "1"})
    assert abs(older["base_eval_loss"] - figures["base"]) <= 1e-5 and "start_eval_loss" not in older
    assert all("base" in s for s in older["samples"])
    assert "| | base model | fine-tuned |" in (older_out / "adapter" / "README.md").read_text()
    assert "<tr><th></th><th>base</th><th>fine-tuned</th></tr>" in (older_out / "report" / "report.html").read_text()
    assert json.loads((older_out / "manifest.json").read_text())["losses"] == \
        json.loads((out / "manifest.json").read_text())["losses"]
    assert verify(older_out, console=Console(quiet=True)).ok


def test_the_start_of_an_init_from_recipe_is_prompted_in_the_run_s_chat_template(tiny_llama, number_data, tmp_path,
                                                                                  monkeypatch, capsys):
    """`generate RECIPE`, `chat RECIPE` and `eval RECIPE` of an adapter.init_from recipe run its start as the run does,
    prompts rendered in the recipe's chat template (here none: the base tokenizer's own), not in the one init_from
    carries (chat_template.jinja, from its run's data.chat_template), which they used. Train and validate warn of the
    two templates where the data are conversations (SFT chat, conversation pairs), not of alpaca rows, nor with
    data.chat_template the adapter's file."""
    import warnings

    from peftkit.cli import main
    from peftkit.errors import PeftkitWarning
    from peftkit.tiny import write_jsonl
    from peft import LoraConfig, get_peft_model

    from peftkit.decoding import Sampling
    from peftkit.eval_job import eval_job
    from peftkit.generate import generate_job

    config = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"])
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), config).save_pretrained(tmp_path / "sft")
    (tmp_path / "sft" / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}</s>{% endfor %}{% if add_generation_prompt %}[assistant]"
        "{% endif %}")
    recipe = _init_recipe(tmp_path, tiny_llama, number_data, {"init_from": str(tmp_path / "sft")})
    said = (f"adapter.init_from: {tmp_path / 'sft'} carries the chat template its run trained with ({tmp_path / 'sft'}"
            "/chat_template.jinja), and this run renders its conversations in another, the base tokenizer's own (no "
            "data.chat_template): the adapter trains on, and is evaluated and sampled, in a template it did not learn. "
            f"To continue in the adapter's, set data.chat_template: {tmp_path / 'sft'}/chat_template.jinja")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run, _ = _step0(recipe, tmp_path)  # alpaca rows: no template
    assert not [w for w in caught if "carries the chat template" in str(w.message)]
    chat, pairs = tmp_path / "chat.jsonl", tmp_path / "pairs.jsonl"
    write_jsonl(chat, [{"messages": [{"role": "user", "content": f"{i}?"}, {"role": "assistant", "content": str(i)}]}
                       for i in range(4)])
    write_jsonl(pairs, [{"prompt": [{"role": "user", "content": f"{i}?"}], "chosen": str(i), "rejected": "no"}
                        for i in range(4)])

    def validated(path, *overrides: str) -> str:
        monkeypatch.setattr("sys.argv", ["peftkit", "validate", str(path), *overrides])
        main()
        return " ".join(capsys.readouterr().err.split())

    def init_from(path):  # (the adapter section init_from alone, as _init_recipe's)
        raw = yaml.safe_load(path.read_text())
        path.write_text(yaml.safe_dump(raw | {"adapter": {"init_from": str(tmp_path / "sft")}}))
        return path

    sft = init_from(make_recipe(tmp_path / "c", tiny_llama, {"train": chat, "eval": chat}, data={"format": "chat"},
                                training={"max_steps": 1}, eval={"base_model": False}))
    dpo = init_from(make_recipe(tmp_path / "p", tiny_llama, {"train": pairs, "eval": pairs},
                                data={"format": "preference"}, training={"max_steps": 1, "objective": "dpo"}))
    assert f"warning: {said}" in validated(sft) and f"warning: {said}" in validated(dpo)
    assert "carries" not in validated(sft, "--set", f"data.chat_template={tmp_path / 'sft' / 'chat_template.jinja'}")
    with pytest.warns(PeftkitWarning, match=re.escape(said)):
        _step0(sft, tmp_path / "c")
    job = generate_job(recipe, [], None, None, ["hi"], None, None, True, None, Sampling(), 8)
    assert job.start == "start (init_from: sft)" and job.source.adapter == str(tmp_path / "sft")
    asked = job.build_prompts(job.source.tokenizer())[0].text
    assert asked == run.tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                add_generation_prompt=True) and "[user]" not in asked, asked
    evaluated = eval_job(recipe, [], None, None, None, None, None, None, None)
    assert evaluated.start and evaluated.source.tokenizer().chat_template == run.tok.chat_template
