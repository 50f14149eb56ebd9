"""X-LoRA (peftkit.methods.xlora), built from LoRA experts' directories (no fixed Case of the battery can name them):
the classifier peft draws for a seed and its two-pass forward, loss and gradients bit for bit, peft's adapter loaded
with peft's logits, our export loaded by peft with ours, generation as cache-free greedy decoding (and peft's), the
shipped recipe, peft 0.21.2's save_pretrained that loses the classifier, and what is refused."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import peft
import pytest
import torch
import yaml
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from peftkit.adapter_base import load_adapted_model
from peftkit.adapters import inject_adapters
from peftkit.errors import PeftkitError, PeftkitWarning
from peftkit.inspect import inspect_adapter
from peftkit.inspect_text import describe
from peftkit.methods.xlora import XLoraConfig
from tests.conftest import load_fp32, save_peft_lora, train_shipped_recipe

IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])
# Every option away from peft's default: a 3-deep classifier with dropout, per-layer scalings, the top expert of each
# token softmaxed alone, a scalings pass at 0.5 (the experts in it too), the experts' outputs doubled, temperature 0.5.
ALL_OPTIONS = {"xlora_depth": 3, "xlora_size": 16, "layerwise_scalings": True, "top_k_lora": 1,
               "enable_softmax_topk": True, "scaling_pass_value": 0.5, "global_scaling_weight": 2.0,
               "softmax_temperature": 0.5}


def _base(path: Path) -> torch.nn.Module:
    model = load_fp32(path)
    model.config.use_cache = False  # (peft's XLoraModel refuses a model that caches)
    return model


@pytest.fixture(scope="module")
def experts(tiny_llama, tmp_path_factory) -> dict[str, str]:
    """Two LoRA experts saved by peft, far from identity: q, v at r 4 and v, down at r 2 with rsLoRA and dropout."""
    root = tmp_path_factory.mktemp("experts")
    first = save_peft_lora(tiny_llama, root / "0",
                           PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    second = save_peft_lora(tiny_llama, root / "1", PeftLoraConfig(r=2, lora_alpha=4, use_rslora=True, lora_dropout=0.1,
                                                                   target_modules=["v_proj", "down_proj"]), seed=1)
    return {"0": str(first), "1": str(second)}


def _peft_xlora(base: Path, experts: dict[str, str], seed: int = 0, **settings):
    torch.manual_seed(seed)
    return get_peft_model(_base(base), peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=32, adapters=experts,
                                                        **settings))


def _classifier(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The classifier's parameters by peft's name (`internal_xlora_classifier.layers.0.weight`), of peft's or ours."""
    return {"internal_xlora_classifier." + n.partition(".internal_xlora_classifier.")[2]: p
            for n, p in model.named_parameters() if "internal_xlora_classifier." in n}


@pytest.mark.parametrize("settings", [{}, ALL_OPTIONS], ids=["defaults", "all-options"])
def test_start_forward_and_gradients_are_peft_s(settings, tiny_llama, experts):
    """From one seed, peftkit's classifier is peft's bit for bit and the generator ends where peft's does (the experts'
    layers are built first, expert after expert, as peft builds them); a training step (the classifier's dropout and
    the experts' drawn alike) gives peft's logits, loss and gradients bit for bit, and so does evaluation; the
    classifier alone trains."""
    theirs = _peft_xlora(tiny_llama, experts, **settings)
    after_theirs = torch.rand(1)
    ours = _base(tiny_llama)
    torch.manual_seed(0)
    inject_adapters(ours, XLoraConfig(method="xlora", adapters=experts, **settings))
    assert torch.equal(torch.rand(1), after_theirs)
    reference = _classifier(theirs)
    assert _classifier(ours).keys() == reference.keys()
    assert all(torch.equal(p, reference[n]) for n, p in _classifier(ours).items())
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == [
        n for n, _ in ours.named_parameters() if "internal_xlora_classifier." in n]
    outputs = []
    for model in (theirs.train(), ours.train()):
        torch.manual_seed(1)
        out = model(input_ids=IDS, labels=IDS)
        out.loss.backward()
        outputs.append(out)
    assert torch.equal(outputs[0].logits, outputs[1].logits) and torch.equal(outputs[0].loss, outputs[1].loss)
    assert all(torch.equal(p.grad, reference[n].grad) for n, p in _classifier(ours).items())
    with torch.no_grad():
        assert torch.equal(theirs.eval()(input_ids=IDS).logits, ours.eval()(input_ids=IDS).logits)
        assert (ours(input_ids=IDS).logits - _base(tiny_llama)(input_ids=IDS).logits).abs().max() > 1e-2


def _save_as_peft_loads_it(model, out: Path) -> Path:
    """peft's adapter as its loader reads it: its config, and its classifier under its state_dict's keys (peft's own
    save_pretrained loses it: test_peft_save_pretrained_loses_the_classifier)."""
    model.peft_config["default"].save_pretrained(out)
    save_file({k: v.detach().clone() for k, v in model.state_dict().items() if "internal_xlora_classifier" in k},
              out / "adapter_model.safetensors")
    return out


def test_peft_adapter_loads_with_peft_logits(tiny_llama, experts, tmp_path):
    """peft's X-LoRA (classifier moved) gives peft's logits in peftkit bit for bit; inspect counts the classifier."""
    theirs = _peft_xlora(tiny_llama, experts, xlora_depth=2, xlora_size=8)
    with torch.no_grad():
        for p in _classifier(theirs).values():
            p.add_(torch.randn(p.shape))
    adapter = _save_as_peft_loads_it(theirs, tmp_path / "xlora")
    ours = load_adapted_model(str(tiny_llama), str(adapter))[0].eval()
    with torch.no_grad():
        assert torch.equal(ours(input_ids=IDS).logits, theirs.eval()(input_ids=IDS).logits)
    info = inspect_adapter(adapter)
    assert info["trainable_params"] == (32 * 8 + 8) + (8 * 2 + 2)
    assert (f"targets        the layers its 2 LoRA experts adapt, each in its own directory: 0 {experts['0']}, 1 "
            f"{experts['1']}") in describe(info)  # (was: '0 modules: ')


def test_peft_adapter_of_hub_experts_loads_as_peft_reads_its_adapters(tiny_llama, experts, tmp_path, monkeypatch):
    """peft's documented X-LoRA names its experts by hub id (`adapters: {"0": "user/expert-0"}`): peftkit reads each
    value as peft 0.21.2 does (LoraConfig.from_pretrained and load_peft_weights of it): a local directory, absolute or
    relative to the working directory (not to the X-LoRA's), else a hub id, here from the offline cache; its logits
    are peft's bit for bit (the old code joined each value to the X-LoRA's directory: ".../xlora/acme/expert-0 is not
    a directory"). A value that is neither is refused naming the key, the value and the fix."""
    from huggingface_hub import constants

    from tests.test_hub import _publish_to

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _publish_to(cache, "acme/expert-0", Path(experts["0"]), "a" * 40)
    shutil.copytree(experts["1"], tmp_path / "work" / "experts" / "1")
    monkeypatch.chdir(tmp_path / "work")
    theirs = _peft_xlora(tiny_llama, {"0": "acme/expert-0", "1": "experts/1"}, xlora_depth=2, xlora_size=8)
    with torch.no_grad():
        for p in _classifier(theirs).values():
            p.add_(torch.randn(p.shape))
    adapter = _save_as_peft_loads_it(theirs, tmp_path / "xlora")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        ours = load_adapted_model(str(tiny_llama), str(adapter))[0].eval()
    assert not [w for w in said if issubclass(w.category, PeftkitWarning)], [str(w.message) for w in said]
    with torch.no_grad():
        expected = theirs.eval()(input_ids=IDS).logits
        assert torch.equal(ours(input_ids=IDS).logits, expected)
    # inspect names each expert as the file does, a hub one with the snapshot peftkit reads (was: 0 acme/expert-0)
    snapshot = cache / "models--acme--expert-0" / "snapshots" / ("a" * 40)
    assert (f"targets        the layers its 2 LoRA experts adapt, each in its own directory: 0 acme/expert-0 (hub; "
            f"its snapshot here: {snapshot}), 1 experts/1") in describe(inspect_adapter(adapter))
    # a revision, which peft 0.21.2 cannot load: peftkit loads it, with a warning naming the key (was: none)
    config = json.loads((adapter / "adapter_config.json").read_text())
    pinned = "acme/expert-0@" + "a" * 40
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"adapters": {"0": pinned, "1": "experts/1"}}))
    with pytest.warns(PeftkitWarning) as said:
        ours = load_adapted_model(str(tiny_llama), str(adapter))[0].eval()
    assert str(said[0].message) == (
        f"{adapter / 'adapter_config.json'}: adapters['0'] is '{pinned}', a hub adapter at revision '{'a' * 40}': "
        "peftkit loads it, and peft 0.21.2 would not: it reads each value whole as a directory or a repository id "
        f"(\"Can't find 'adapter_config.json' at '{pinned}'\"). For peft's users, set it to the expert's directory, "
        f"or its hub id alone (acme/expert-0: its main branch, which may hold another expert than '{'a' * 40}').")
    with torch.no_grad():
        assert torch.equal(ours(input_ids=IDS).logits, expected)
    with pytest.raises(ValueError, match=re.escape(f"Can't find 'adapter_config.json' at '{pinned}'")):
        _peft_xlora(tiny_llama, {"0": pinned, "1": "experts/1"})
    with pytest.warns(PeftkitWarning, match=re.escape(f"adapters['0'] is '{pinned}', a hub adapter at revision")):
        info = inspect_adapter(adapter)  # (inspect reads it as peftkit loads it, and says so too)
    assert f"directory: 0 {pinned} (hub; its snapshot here: {snapshot}), 1" in "\n".join(describe(info))
    fix = ("Set it to the LoRA expert's directory (absolute, or relative to the working directory, as peft 0.21.2 "
           "reads it) or its hub id (user/name)")
    for value, why in [("acme/expert-9", f"Adapter acme/expert-9: no such local directory ({tmp_path}/work/"
                                         "acme/expert-9), and of hub adapter acme/expert-9, it is not in the local "
                                         "Hugging Face cache"),
                       ("./experts/9", f"no such directory ({tmp_path}/work/experts/9), and no hub id")]:
        (adapter / "adapter_config.json").write_text(json.dumps(config | {"adapters": {"0": "acme/expert-0",
                                                                                       "1": value}}))
        with pytest.raises(PeftkitError) as e:
            load_adapted_model(str(tiny_llama), str(adapter))
        assert str(e.value).startswith(f"{adapter / 'adapter_config.json'}: adapters['1'] is '{value}': {why}"), e.value
        assert str(e.value).endswith(fix + "."), e.value
        shown = " (hub; not in the local Hugging Face cache)" if value == "acme/expert-9" else ""
        assert f", 1 {value}{shown}\n" in "\n".join(describe(inspect_adapter(adapter)))
    shutil.copytree(experts["1"], tmp_path / "xlora" / "beside")  # (the old code read a relative value from there)
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"adapters": {"0": "acme/expert-0",
                                                                                   "1": "beside"}}))
    with pytest.raises(PeftkitError, match=re.escape(f"{fix}. One lies beside adapter_config.json ({adapter}/beside)"
                                                     ": peft 0.21.2 does not look there, so neither does peftkit; give "
                                                     "its absolute path.")):
        load_adapted_model(str(tiny_llama), str(adapter))


@pytest.mark.parametrize("settings", [{}, {"xlora_depth": 3, "xlora_size": 8}], ids=["depth-1", "depth-3"])
def test_peft_save_pretrained_loads_with_the_saved_model_s_logits(settings, tiny_llama, experts, tmp_path):
    """peft 0.21.2's save_pretrained of an X-LoRA leaves the classifier's first layer out of adapter_model.safetensors
    (its filter of other adapters' keys drops `layers.0.`, taking it for the expert named "0", which peft requires)
    and writes it to the subfolder 0/ as `layers.weight/.bias`, beside the whole base model: peft's own reload draws a
    new first layer, its logits off the saved model's. peftkit reads that layer from 0/ (with a warning) and gives the
    saved model's logits bit for bit; without 0/, the file is refused, saying why."""
    import shutil
    import warnings

    saved = _peft_xlora(tiny_llama, experts, **settings)
    with torch.no_grad():
        for p in _classifier(saved).values():
            p.add_(torch.randn(p.shape))
        expected = saved.eval()(input_ids=IDS).logits
    saved.save_pretrained(tmp_path / "saved")
    assert not any(".layers.0." in k for k in load_file(tmp_path / "saved" / "adapter_model.safetensors"))
    reloaded = PeftModel.from_pretrained(_base(tiny_llama), tmp_path / "saved", adapters=experts).eval()
    with torch.no_grad():
        assert (reloaded(input_ids=IDS).logits - expected).abs().max() > 1e-2
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        ours = load_adapted_model(str(tiny_llama), str(tmp_path / "saved"))[0].eval()
    assert any("classifier's first layer is read from" in str(w.message) for w in said)
    with torch.no_grad():
        assert torch.equal(ours(input_ids=IDS).logits, expected)
    shutil.rmtree(tmp_path / "saved" / "0")
    with pytest.raises(PeftkitError, match=r"lacks the X-LoRA classifier's base_model.internal_xlora_classifier"
                                           r".layers.0.bias, .*layers.0.weight: peft 0.21.2's save_pretrained"):
        load_adapted_model(str(tiny_llama), str(tmp_path / "saved"))


def test_shipped_recipe_trains_and_peft_loads_ours(tiny_llama, number_data, experts, tmp_path):
    """recipes/methods/xlora.yaml trains the classifier (eval loss down); the export holds it alone under peft's names,
    peft loads it with our logits, and so does peftkit."""
    summary = train_shipped_recipe("xlora", tiny_llama, number_data, tmp_path / "run", steps=4, sets=(
        f"adapter.adapters={json.dumps(experts)}", "training.lr=5e-2"))
    assert summary["eval_loss"] < summary["base_eval_loss"]
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "XLORA" and config["adapters"] == experts and config["hidden_size"] == 32
    assert sorted(load_file(adapter / "adapter_model.safetensors")) == [
        "base_model.internal_xlora_classifier.layers.0.bias", "base_model.internal_xlora_classifier.layers.0.weight"]
    card = (adapter / "README.md").read_text()  # (peft's loading of it needs the experts and no cache)
    assert "base.config.use_cache = False" in card
    assert "config.adapters = {name: f\"ADAPTER_DIR/{name}\" for name in config.adapters}" in card
    assert "PeftModel.from_pretrained(base, \"ADAPTER_DIR\", config=config)" in card
    theirs = PeftModel.from_pretrained(_base(tiny_llama), adapter).eval()
    ours = load_adapted_model(None, str(adapter))[0].eval()
    with torch.no_grad():
        assert torch.equal(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits)


def test_generate_is_cache_free_greedy_decoding(tiny_llama, experts, tmp_path):
    """peftkit's batched generation (left-padded, through transformers' generate) gives each row's greedy decoding by
    one full forward per token, and peft's generate (which runs without the cache too) gives the same tokens."""
    from transformers import AutoTokenizer

    from peftkit.decoding import Sampling, generate_ids

    theirs = _peft_xlora(tiny_llama, experts)
    with torch.no_grad():
        for p in _classifier(theirs).values():
            p.mul_(20)  # sharp scalings: the experts' mix changes from token to token
    adapter = _save_as_peft_loads_it(theirs, tmp_path / "xlora")
    ours = load_adapted_model(str(tiny_llama), str(adapter))[0].eval()
    prompts = [[3, 4, 5, 9], [40, 41, 42, 43, 44, 45]]

    def greedy(prompt: list[int]) -> list[int]:
        ids = torch.tensor([prompt])
        for _ in range(5):
            with torch.no_grad():
                ids = torch.cat([ids, ours(input_ids=ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
        return ids[0, len(prompt):].tolist()

    expected = [greedy(p) for p in prompts]
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    assert generate_ids(ours, tok, prompts, Sampling(max_new_tokens=5, temperature=0)) == expected
    with torch.no_grad():
        out = theirs.eval().generate(input_ids=torch.tensor([prompts[1]]), max_new_tokens=5, do_sample=False)
    assert out[0, len(prompts[1]):].tolist() == expected[1]


def test_refusals(tiny_llama, experts, number_data, tmp_path):
    """What X-LoRA cannot do is refused, naming the fix."""
    from peftkit.merge import merge_adapter
    from peftkit.recipe import load_recipe
    from tests.conftest import method_recipe

    adapter = {"method": "xlora", "adapters": experts}
    with pytest.raises(PeftkitError, match="export.merged: X-LoRA adapters .* cannot be merged into a plain model"):
        load_recipe(method_recipe(tmp_path / "merged", tiny_llama, number_data, adapter, export={"merged": True}))
    with pytest.raises(PeftkitError, match="an X-LoRA starts from the experts adapter.adapters lists .* remove "
                                           "init_from"):
        load_recipe(method_recipe(tmp_path / "init", tiny_llama, number_data, adapter | {"init_from": experts["0"]}))

    with pytest.raises(ValidationError, match="named by position, '0' to '1' in order"):
        XLoraConfig(method="xlora", adapters={"math": experts["0"], "code": experts["1"]})
    with pytest.raises(PeftkitError, match=r"adapter.adapters\['1'\]: .*/nowhere is not a directory. List the adapter "
                                           "directories of the LoRA experts, as `peftkit train` exports them"):
        inject_adapters(_base(tiny_llama), XLoraConfig(method="xlora", adapters={"0": experts["0"],
                                                                                 "1": str(tmp_path / "nowhere")}))
    other = tmp_path / "other"
    shutil.copytree(experts["1"], other)
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "another/model"}))
    with pytest.raises(PeftkitError, match=r"adapter.adapters: .* was trained on .*tiny-llama \(revision None\), "
                                           r"adapter.adapters\['1'\] .* on another/model \(revision None\)\. X-LoRA "
                                           "weighs experts of one base"):
        inject_adapters(_base(tiny_llama), XLoraConfig(method="xlora", adapters={"0": experts["0"], "1": str(other)}))
    scaled = tmp_path / "scaled"  # (AdapterFusion's checks of one base: RoPE scaling too, which X-LoRA passed over)
    shutil.copytree(experts["1"], scaled)
    (scaled / "peftkit.json").write_text(json.dumps({"rope_scaling": {"type": "linear", "factor": 2.0}}))
    with pytest.raises(PeftkitError, match=r"adapter.adapters\['1'\] .* with linear x2.0 \(their peftkit.json\): "
                                           "X-LoRA weighs experts of one base, scaled one way"):
        inject_adapters(_base(tiny_llama), XLoraConfig(method="xlora", adapters={"0": experts["0"], "1": str(scaled)}))
    with pytest.raises(ValidationError, match="top_k_lora is 3, and adapter.adapters lists 2 experts"):
        XLoraConfig(method="xlora", adapters=experts, top_k_lora=3)
    dora = save_peft_lora(tiny_llama, tmp_path / "dora", PeftLoraConfig(r=2, use_dora=True, target_modules=["q_proj"]))
    with pytest.raises(PeftkitError, match=r"has DoRA \(peft's X-LoRA refuses it too\).*plain LoRA experts"):
        inject_adapters(_base(tiny_llama), XLoraConfig(method="xlora", adapters={"0": experts["0"], "1": str(dora)}))
    embedding = save_peft_lora(tiny_llama, tmp_path / "embedding", PeftLoraConfig(r=2, target_modules=["embed_tokens"]))
    with pytest.raises(PeftkitError, match=r"adapter.adapters\['1'\]: .* adapts the embedding 'model.embed_tokens'; "
                                           "peftkit's X-LoRA weighs experts on linear layers only"):
        inject_adapters(_base(tiny_llama),
                        XLoraConfig(method="xlora", adapters={"0": experts["0"], "1": str(embedding)}))
    with pytest.raises(PeftkitError, match="hidden_size is 64, and this model's hidden size is 32"):
        inject_adapters(_base(tiny_llama), XLoraConfig(method="xlora", adapters=experts, hidden_size=64))
    adapter = _save_as_peft_loads_it(_peft_xlora(tiny_llama, experts), tmp_path / "xlora")
    with pytest.raises(PeftkitError, match="weigh their LoRA experts per token .* cannot be merged into a plain model"):
        merge_adapter(str(adapter), str(tmp_path / "merged"), base=str(tiny_llama))
    model = load_adapted_model(str(tiny_llama), str(adapter))[0]
    with torch.no_grad():
        cache = model(input_ids=IDS[:, :4], use_cache=True).past_key_values  # (a decoding loop of one's own)
    with torch.no_grad(), pytest.raises(PeftkitError, match="forward with a KV cache: .* use_cache=False"):
        model(input_ids=IDS[:, 4:], past_key_values=cache)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"use_trainable_adapters": True}))
    with pytest.raises(PeftkitError,
                       match="use_trainable_adapters is true: .* peftkit's X-LoRA keeps the experts frozen"):
        load_adapted_model(str(tiny_llama), str(adapter))


def test_a_run_directory_is_its_adapter_in_a_recipe_s_adapter_directories(tiny_llama, experts, number_data, tmp_path):
    """A training run's directory given where a recipe names an adapter directory (X-LoRA's experts, init_from) is
    its adapter/, as `--adapter RUN_DIR` reads it; it was refused ("its adapter is RUN/adapter")."""
    from peftkit.recipe import load_recipe
    from tests.conftest import method_recipe

    run = tmp_path / "runs" / "expert"
    shutil.copytree(experts["0"], run / "adapter")
    (run / "recipe.yaml").write_text("adapter: {method: lora}\n")
    recipe = load_recipe(method_recipe(tmp_path / "x", tiny_llama, number_data,
                                       {"method": "xlora", "adapters": {"0": str(run), "1": experts["1"]}}))
    assert recipe.adapter.adapters == {"0": str(run / "adapter"), "1": experts["1"]}
    assert len(inject_adapters(_base(tiny_llama), recipe.adapter)) > 0  # the experts read from RUN/adapter
    started = load_recipe(method_recipe(tmp_path / "i", tiny_llama, number_data,
                                        {"method": "lora", "init_from": "../runs/expert"}))
    assert started.adapter.init_from == str(run / "adapter")


@pytest.mark.parametrize("settings", [{}, ALL_OPTIONS], ids=["defaults", "all-options"])
def test_memory_estimate_is_an_upper_bound(settings, tiny_llama, experts):
    """What autograd saves in one forward beyond LoRA r=4's is at most what the estimate adds (tests/test_memory.py's
    measure): the experts' inputs and scalings, the expert with dropout's masks, and the classifier's activations.
    With the default estimate (nothing counted), X-LoRA at its defaults saved 14,848 bytes more than LoRA where 4,096
    fewer were estimated."""
    from peftkit.methods.lora import LoraConfig
    from tests.test_memory import saved_and_estimated

    lora_saved, lora_estimate = saved_and_estimated(tiny_llama, LoraConfig(r=4, alpha=8))
    saved, estimate = saved_and_estimated(tiny_llama, XLoraConfig(method="xlora", adapters=experts, **settings))
    assert saved - lora_saved <= estimate - lora_estimate


def _dense_logits(model: torch.nn.Module, experts: dict[str, str], classifier: dict[str, torch.Tensor]) -> torch.Tensor:
    """X-LoRA at its defaults computed independently, on `model` (a plain base): the base's last hidden state, the
    scalings softmax(W h + b) (one set for every layer), then each adapted module's output plus sum_i s_i x (s_i B_i
    A_i)^T, from the experts' files (LoRA's update s B A is linear in the input: scaling the input is scaling it)."""
    with torch.no_grad():
        hidden = model(input_ids=IDS, output_hidden_states=True).hidden_states[-1]
        s = torch.softmax(hidden @ classifier["weight"].T + classifier["bias"], dim=-1)
    updates: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for i, path in enumerate(experts.values()):
        config = json.loads((Path(path) / "adapter_config.json").read_text())
        scaling = config["lora_alpha"] / (config["r"] ** 0.5 if config["use_rslora"] else config["r"])
        tensors = load_file(Path(path) / "adapter_model.safetensors")
        for key, a in tensors.items():
            if key.endswith(".lora_A.weight"):
                module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                b = tensors[key.replace("lora_A", "lora_B")]
                updates.setdefault(module, []).append((i, scaling * b.double() @ a.double()))
    def adds(parts: list[tuple[int, torch.Tensor]]):
        return lambda _, args, out: out + sum(s[..., i:i + 1] * (args[0].double() @ d.T)
                                              for i, d in parts).to(out.dtype)

    handles = [model.get_submodule(module).register_forward_hook(adds(parts)) for module, parts in updates.items()]
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    for handle in handles:
        handle.remove()
    return logits


def test_conv1d_and_nf4_bases_against_a_dense_computation(tiny_llama, tiny_gpt2, experts, tmp_path):
    """GPT-2's Conv1D layers and a 4-bit NF4 Llama give the independent computation's logits (1e-5). peft 0.21.2's
    X-LoRA fails on both: it cannot load GPT-2's experts (its key rewrite wants a module named 'model.': 'Got
    unexpected keys!'), and on the 4-bit base its pre-forward hook hands `scalings` to its 4-bit LoRA layers, which
    are no lora.Linear and were never swapped for X-LoRA's: "Linear4bit.forward() got an unexpected keyword argument
    'scalings'"."""
    from peftkit.modeling import load_model
    from peftkit.recipe import ModelConfig, QuantizationConfig

    gpt2 = {str(i): str(save_peft_lora(tiny_gpt2, tmp_path / str(i), PeftLoraConfig(
        r=2 + 2 * i, lora_alpha=8, target_modules=targets, fan_in_fan_out=True), seed=i))
        for i, targets in enumerate([["c_attn"], ["c_attn", "c_fc"]])}
    nf4 = QuantizationConfig(method="nf4", double_quant=True, compute_dtype="float32")
    for base, adapters, quant in ((tiny_gpt2, gpt2, None), (tiny_llama, experts, nf4)):
        def plain(base=base, quant=quant) -> torch.nn.Module:
            return load_model(ModelConfig(name_or_path=str(base), dtype="float32"), quant, torch.device("cpu")).eval()

        ours = plain()
        inject_adapters(ours, XLoraConfig(method="xlora", adapters=adapters))
        ours.eval()  # (the new layers: the second Llama expert's dropout off)
        classifier = {n.rpartition(".")[2]: p for n, p in _classifier(ours).items()}
        with torch.no_grad():
            for p in classifier.values():
                p.copy_(torch.randn(p.shape) * 3)  # sharp: the experts' mix differs from token to token
            logits = ours(input_ids=IDS).logits
        assert (logits - _dense_logits(plain(), adapters, classifier)).abs().max() <= 1e-5
        assert (logits - plain()(input_ids=IDS).logits).abs().max() > 1e-2


def test_named_adapters_and_combining_refuse_it(tiny_llama, experts, tmp_path):
    """Beside other named adapters (a mixed batch, `--adapter a=DIR --adapter b=DIR`), an X-LoRA's pass over the whole
    model would run for the others too: refused, saying to load it alone; a comparison loads it alone. Combining it
    into the base with others is refused as its merge is."""
    from peftkit.adapters.named import load_named_model
    from peftkit.adapters.sharing import loads_alone
    from peftkit.combine_adapters import combine_adapters
    from peftkit.combine_inputs import Combination

    adapter = _save_as_peft_loads_it(_peft_xlora(tiny_llama, experts), tmp_path / "xlora")
    with pytest.raises(PeftkitError, match="Adapter 'x' is X-LoRA .method: xlora., which loads alone: its scalings "
                                           "pass runs over the whole model .*, which named adapters cannot switch or "
                                           "route rows to; load it alone"):
        load_named_model([("lora", experts["0"]), ("x", str(adapter))], base=str(tiny_llama))
    assert loads_alone(str(adapter)) == "peft_type XLORA" and loads_alone(experts["0"]) is None
    with pytest.raises(PeftkitError, match="cannot be merged into a plain model"):
        combine_adapters([experts["0"], str(adapter)], Combination("linear", (0.5, 0.5)), str(tmp_path / "combined"),
                         into_base=True, base=str(tiny_llama))


def test_run_resumes_to_the_same_bits_and_checkpointing_changes_nothing(tiny_llama, number_data, experts, tmp_path):
    """A run killed after step 2 of 4 and resumed writes the unbroken run's classifier byte for byte (its checkpoint
    holds the classifier, the frozen experts come from their directories again); with gradient checkpointing (whose
    recomputation in backward reads the forward's scalings) the same run gives the same file to float rounding."""
    from peftkit.recipe import load_recipe
    from peftkit.train import train
    from tests.conftest import check_resumes_to_the_same_bits, method_recipe

    adapter = {"method": "xlora", "adapters": experts, "xlora_depth": 2, "xlora_size": 8}
    recipe = method_recipe(tmp_path / "a", tiny_llama, number_data, adapter,
                           training={"max_steps": 4, "save_steps": 2, "save_total_limit": 10, "lr": 5e-2})
    check_resumes_to_the_same_bits(recipe, tmp_path / "a" / "run", kill_after=2, steps=4)
    checkpointed = method_recipe(tmp_path / "b", tiny_llama, number_data, adapter,
                                 training={"max_steps": 4, "lr": 5e-2, "gradient_checkpointing": True})
    train(load_recipe(checkpointed), show_summary=False)
    ours, plain = (load_file(tmp_path / run / "run" / "adapter" / "adapter_model.safetensors") for run in ("b", "a"))
    assert ours.keys() == plain.keys() and all((ours[k] - plain[k]).abs().max() <= 1e-6 for k in plain)


def test_bf16_base_keeps_the_experts_file_values_where_peft_rounds_them(tiny_llama, experts):
    """On a bf16 base the classifier is bf16 (peft's, from one seed) and the experts keep their files' fp32 values, as
    peftkit's and peft's own LoRA loading keep them. peft 0.21.2's X-LoRA loads the experts' weights into layers still
    in the base's dtype and casts them to fp32 after: they are the files' values rounded to bf16. That rounding is
    the only difference: with the experts rounded so, peftkit's bf16 logits are peft's bit for bit."""
    def bf16() -> torch.nn.Module:
        model = load_fp32(tiny_llama).to(torch.bfloat16)
        model.config.use_cache = False
        return model

    torch.manual_seed(0)
    theirs = get_peft_model(bf16(), peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=32, adapters=experts)).eval()
    ours = bf16()
    torch.manual_seed(0)
    inject_adapters(ours, XLoraConfig(method="xlora", adapters=experts))
    ours.eval()
    reference = _classifier(theirs)
    assert all(p.dtype == torch.bfloat16 and torch.equal(p, reference[n]) for n, p in _classifier(ours).items())
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    saved = load_file(Path(experts["0"]) / "adapter_model.safetensors")[key]
    peft_a = theirs.base_model.lora_model.model.model.layers[0].self_attn.q_proj.lora_A["0"].weight
    our_a = ours.model.layers[0].self_attn.q_proj.experts["0"].lora_A.weight
    assert torch.equal(our_a, saved) and not torch.equal(peft_a, saved)
    assert torch.equal(peft_a, saved.bfloat16().float())
    with torch.no_grad():
        reference = theirs(input_ids=IDS).logits
        assert not torch.equal(ours(input_ids=IDS).logits, reference)
        for name, p in ours.named_parameters():
            if ".experts." in name:
                p.copy_(p.bfloat16().float())
        assert torch.equal(ours(input_ids=IDS).logits, reference)



def _experts_recording(experts: dict[str, str], out: Path, config: dict | None = None,
                       meta: dict | None = None) -> dict[str, str]:
    """Copies of `experts` under `out` whose adapter_config.json and peftkit.json record `config` and `meta` too."""
    copies = {}
    for name, path in experts.items():
        copy = out / name
        shutil.copytree(path, copy)
        written = json.loads((copy / "adapter_config.json").read_text())
        (copy / "adapter_config.json").write_text(json.dumps(written | (config or {})))
        (copy / "peftkit.json").write_text(json.dumps(meta or {}))
        copies[name] = str(copy)
    return copies


def _train_over(tiny_llama, number_data, adapters: dict[str, str], out: Path, *sets: str) -> dict:
    from peftkit.recipe import load_recipe
    from peftkit.train import train
    from tests.conftest import method_recipe

    recipe = method_recipe(out, tiny_llama, number_data, {"method": "xlora", "adapters": adapters},
                           training={"max_steps": 1})
    return train(load_recipe(recipe, list(sets)), show_summary=False)


NF4_EXPERTS = {"quantization": {"method": "nf4", "double_quant": True, "compute_dtype": "float32",
                                "quant_storage": "uint8", "skip_modules": ["lm_head"]},
               "quantized_on": "cuda", "base_dtype": "bfloat16"}
"""peftkit.json of experts trained against an NF4 base quantized from bf16 weights on CUDA."""
OTHER_BASES = {  # what the experts record, the recipe's settings, and the refusal
    "name": ({"config": {"base_model_name_or_path": "another/model"}}, [],
             r"^adapter.adapters: the adapters were trained on another/model, and model.name_or_path is .*tiny-llama. "
             "X-LoRA needs the base the adapters were trained on: set model.name_or_path to it"),
    "rope": ({"meta": {"rope_scaling": {"type": "linear", "factor": 2.0}}}, [],
             r"^adapter.adapters: the adapters were trained with RoPE scaling linear x2.0 \(their peftkit.json\), and "
             "model.rope_scaling is none. X-LoRA needs the base"),
    "unquantized": ({"meta": NF4_EXPERTS}, [],
                    "^adapter.adapters: the adapters were trained against a 4/8-bit base, and this recipe does not "
                    "quantize it; set the quantization section as they"),
    "settings": ({"meta": NF4_EXPERTS}, ["quantization.double_quant=false", "quantization.compute_dtype=float32",
                                         "model.dtype=bfloat16"],
                 r"^adapter.adapters: .*/0 was trained against a base quantized as nf4, compute_dtype: float32 \(its "
                 r"peftkit.json\), and the recipe's quantization section is nf4, double_quant: False, compute_dtype: "
                 "float32: other 4-bit/8-bit weights. X-LoRA needs"),
    "dtype": ({"meta": NF4_EXPERTS}, ["quantization.compute_dtype=float32"],
              r"^adapter.adapters: .*/0 was trained against a base quantized from bfloat16 weights \(its peftkit.json "
              "base_dtype\), and model.dtype is float32: other 4-bit weights. X-LoRA needs .* set model.dtype: "
              "bfloat16"),
}


@pytest.mark.parametrize("case", OTHER_BASES)
def test_experts_of_another_base_than_the_recipe_s_are_refused(case, tiny_llama, number_data, experts, tmp_path):
    """The experts are checked against the base the recipe loads, not only against each other (each case trained on
    the old code without a word): both recorded as trained on another model, or with RoPE scaling the recipe does not
    set, or against 4-bit weights the recipe does not make (not quantized, quantized otherwise, or from another
    dtype). The run is refused before it trains, naming the fix."""
    recorded, sets, refusal = OTHER_BASES[case]
    adapters = _experts_recording(experts, tmp_path / "experts", **recorded)
    with pytest.raises(PeftkitError, match=refusal):
        _train_over(tiny_llama, number_data, adapters, tmp_path / "run", *sets)


def test_validate_says_train_s_refusal_of_experts_of_a_quantized_base(tiny_llama, number_data, experts, tmp_path,
                                                                       monkeypatch, capsys):
    """Experts trained against an NF4 base, the recipe unquantized: `peftkit validate` said the recipe was valid (its
    empty model's layers cannot tell a quantized base, so the check waited for train's loaded model); it now decides
    from the recipe's quantization section and says train's refusal in train's words (exit 2, no traceback)."""
    from tests.conftest import cli_user_error, method_recipe, unplaced

    adapters = _experts_recording(experts, tmp_path / "experts", meta=NF4_EXPERTS)
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "xlora", "adapters": adapters},
                           training={"max_steps": 1})
    said = {command: " ".join(unplaced(cli_user_error(monkeypatch, capsys, command, str(recipe)), recipe).split())
            for command in ("validate", "train")}
    assert said["validate"] == said["train"], said
    assert ("error: adapter.adapters: the adapters were trained against a 4/8-bit base, and this recipe does not "
            "quantize it; set the quantization section as they were trained (their peftkit.json records it).") in \
        said["train"], said


def test_experts_over_a_quantized_base_train(tiny_llama, number_data, experts, tmp_path):
    """Experts trained unquantized train over the recipe's NF4 base (X-LoRA's memory saving, which AdapterFusion's
    check of the same name refuses for its adapters); experts of this very NF4 base, quantized on CUDA, train here
    with the warning a QLoRA adapter re-quantized on the CPU gets."""
    import warnings

    from peftkit.errors import PeftkitWarning

    over_nf4 = _train_over(tiny_llama, number_data, experts, tmp_path / "a", "quantization.compute_dtype=float32")
    assert over_nf4["trainable_params"] == 32 * 2 + 2
    quantized = _experts_recording(experts, tmp_path / "experts", meta=NF4_EXPERTS)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        _train_over(tiny_llama, number_data, quantized, tmp_path / "b", "quantization.compute_dtype=float32",
                    "model.dtype=bfloat16")
    assert torch.cuda.is_available() or any(
        isinstance(w.message, PeftkitWarning) and str(w.message).startswith("adapter.adapters: ") and "was trained on "
        "a base quantized on CUDA, and no CUDA device is here: the base is re-quantized on CPU" in str(w.message)
        for w in said)


def test_a_moved_export_loads_the_experts_it_holds(tiny_llama, number_data, experts, tmp_path):
    """The export holds a copy of each expert (0/, 1/: its files byte for byte, named in peftkit.json relative to the
    export; adapter_config.json's `adapters` still records the experts' own directories): a run moved to another
    directory, the experts' own directories removed, loads in peftkit with the run's logits bit for bit (as
    eval and generate load it), inspect names the copies, and merge is refused for its reason; peft, given the copies
    as the model card does, gives those logits too, as it did in place. On the old code the moved adapter failed:
    "adapter.adapters['0']: ... is not a directory". A copy gone is refused, naming it. peft 0.21.2 ignores the
    `adapters=` of PeftModel.from_pretrained (the file's `adapters` override it): it looks for the experts where the
    file says, and fails."""
    from peft import PeftConfig

    from peftkit.eval_job import eval_job
    from peftkit.evaluate import evaluate
    from peftkit.merge import merge_adapter
    from peftkit.recipe import load_recipe
    from peftkit.train import train
    from tests.conftest import method_recipe

    sources = {n: str(shutil.copytree(p, tmp_path / "experts" / n)) for n, p in experts.items()}
    recipe = method_recipe(tmp_path / "a", tiny_llama, number_data, {"method": "xlora", "adapters": sources},
                           training={"max_steps": 2, "lr": 5e-2})
    summary = train(load_recipe(recipe), show_summary=False)
    adapter = tmp_path / "a" / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["adapters"] == sources
    assert json.loads((adapter / "peftkit.json").read_text())["experts"] == {"0": "0", "1": "1"}
    for name, source in sources.items():
        files = sorted(f.name for f in Path(source).iterdir())
        assert sorted(f.name for f in (adapter / name).iterdir()) == files
        assert all((adapter / name / f).read_bytes() == (Path(source) / f).read_bytes() for f in files)
    with torch.no_grad():
        expected = load_adapted_model(None, str(adapter))[0](input_ids=IDS).logits
        assert torch.equal(PeftModel.from_pretrained(_base(tiny_llama), adapter).eval()(input_ids=IDS).logits,
                           expected)
    moved = tmp_path / "elsewhere" / "run"
    shutil.move(tmp_path / "a" / "run", moved)
    shutil.rmtree(tmp_path / "experts")
    adapter = moved / "adapter"
    copies = {n: str(adapter / n) for n in sources}
    # `peftkit eval RUN_DIR`: its recipe.yaml names the experts' directories, gone (they were refused on loading it)
    assert evaluate(eval_job(moved, [], None, None, None, None, None, None, None))["loss"] == \
        pytest.approx(summary["eval_loss"], abs=1e-6)
    with torch.no_grad():
        assert torch.equal(load_adapted_model(None, str(adapter))[0](input_ids=IDS).logits, expected)
        config = PeftConfig.from_pretrained(adapter)  # (the model card's way)
        config.adapters = copies
        theirs = PeftModel.from_pretrained(_base(tiny_llama), adapter, config=config).eval()
        assert torch.equal(theirs(input_ids=IDS).logits, expected)
    with pytest.raises(ValueError, match=r"Can't find 'adapter_config.json' at '.*/experts/0'"):
        PeftModel.from_pretrained(_base(tiny_llama), adapter, adapters=copies)  # (peft's: the file's wins)
    assert (f"targets        the layers its 2 LoRA experts adapt, each in its own directory: 0 {adapter / '0'}, 1 "
            f"{adapter / '1'}") in describe(inspect_adapter(adapter))
    with pytest.raises(PeftkitError, match="weigh their LoRA experts per token .* cannot be merged into a plain model"):
        merge_adapter(str(adapter), str(tmp_path / "merged"), base=str(tiny_llama))
    shutil.rmtree(adapter / "1")
    with pytest.raises(PeftkitError, match=r"the copy of the expert '1' \(.*/adapter/1, named by its peftkit.json\) is "
                                           "missing: an X-LoRA directory holds its experts. Copy or move the adapter "
                                           "directory whole"):
        load_adapted_model(None, str(adapter))


def test_verify_is_clean_and_names_a_changed_expert(tiny_llama, number_data, experts, tmp_path):
    """`peftkit verify` of an X-LoRA run is clean: its re-run writes the same bytes, the experts' copies among them.
    The experts are inputs of the run: manifest.json records their files' sha256 (`sources_sha256`), so an expert
    changed after the run is named by verify (before, verify said only that the re-run's classifier differed, and
    under a tolerance an expert changed slightly could pass) and refused by --resume; a copy in the run's export
    changed is a changed output."""
    from rich.console import Console

    from peftkit.fileio import sha256_file
    from peftkit.recipe import load_recipe
    from peftkit.train import train
    from peftkit.verify import verify
    from tests.conftest import method_recipe

    sources = {n: str(shutil.copytree(p, tmp_path / "experts" / n)) for n, p in experts.items()}
    recipe = load_recipe(method_recipe(tmp_path, tiny_llama, number_data, {"method": "xlora", "adapters": sources},
                                       training={"max_steps": 2, "save_steps": 2, "lr": 5e-2},
                                       eval={"base_model": False}))
    train(recipe, console=Console(quiet=True))
    run = tmp_path / "run"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["sources_sha256"] == {f"adapter.adapters['{n}']": {f.name: sha256_file(f) for f in
                                                                       sorted(Path(p).iterdir())}
                                          for n, p in sources.items()}
    report = verify(run, console=Console(quiet=True))
    assert report.ok, report.differences
    weights = Path(sources["1"]) / "adapter_model.safetensors"  # another expert under the same name
    tensors = load_file(weights)
    save_file({k: t * 1.001 if "lora_B" in k else t for k, t in tensors.items()}, weights)
    with pytest.raises(PeftkitError, match=r"^--resume: adapter.adapters\['1'\] file adapter_model.safetensors "
                                           "changed since"):
        train(recipe, resume=True, console=Console(quiet=True))
    copy = run / "adapter" / "0" / "adapter_config.json"
    copy.write_text(copy.read_text().replace('"r": 4', '"r": 4 '))
    report = verify(run, tolerance=1e-2, console=Console(quiet=True))
    assert f"adapter.adapters['1']: the files of {sources['1']} differ from the recorded ones" in report.differences
    assert any(d.startswith(f"adapter/0/adapter_config.json in {run} was changed after the run")
               for d in report.differences), report.differences



def test_hub_experts_train_offline_record_their_commit_and_a_moved_branch_is_named(tiny_llama, number_data, experts,
                                                                                   tmp_path, monkeypatch):
    """Experts named by hub id (`acme/expert-0`, read offline from a Hugging Face cache laid out as the hub client
    writes it) train, and the run records the commit each was read at: its recipe.yaml pins it
    (`acme/expert-0@COMMIT`), adapter_config.json names its hub id, which peft loads (with peftkit's logits) on any
    machine (it named the commit's snapshot in this machine's cache), and the export holds its copy. Once
    expert-1's main moves to a commit with another lora_B, `--resume` is refused naming the moved branch and the pin
    (before: 'holds a run of a different recipe (its recipe.yaml differs in adapter.adapters.1)', which the user did
    not change; and that refused resume rewrote the run's recipe.yaml, which verify then reported changed), and the
    pinned recipe resumes; `verify` re-runs the run's commit, clean, and says where main points now (it said
    nothing)."""
    from huggingface_hub import constants
    from rich.console import Console

    from peftkit.recipe import load_recipe
    from peftkit.train import train
    from peftkit.verify import verify
    from tests.conftest import method_recipe
    from tests.test_hub import _publish_to

    cache, first, second = tmp_path / "hub", "a" * 40, "b" * 40
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for name, path in experts.items():
        _publish_to(cache, f"acme/expert-{name}", Path(path), first)
    recipe_file = method_recipe(tmp_path, tiny_llama, number_data,
                                {"method": "xlora", "adapters": {"0": "acme/expert-0", "1": "acme/expert-1"}},
                                training={"max_steps": 2, "save_steps": 2, "lr": 5e-2}, eval={"base_model": False})
    train(load_recipe(recipe_file), console=Console(quiet=True))
    run = tmp_path / "run"
    assert yaml.safe_load((run / "recipe.yaml").read_text())["adapter"]["adapters"] == {
        n: f"acme/expert-{n}@{first}" for n in experts}
    # adapter_config.json names each expert by its hub id, which peft loads on any machine (it named the snapshot in
    # this machine's cache, a path peft takes for a hub id elsewhere, and fails), and peft loads the export so, the
    # experts from the hub (here the cache, offline), with peftkit's logits
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["adapters"] == {
        n: f"acme/expert-{n}" for n in experts}
    theirs = PeftModel.from_pretrained(_base(tiny_llama), run / "adapter").eval()
    ours = load_adapted_model(None, str(run / "adapter"))[0].eval()
    with torch.no_grad():
        assert torch.equal(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits)
    card = (run / "adapter" / "README.md").read_text()  # (its settings named the snapshots too)
    assert str(cache) not in card and f"  adapters:\n    '0': acme/expert-0@{first}\n    '1': acme/expert-1@{first}\n" \
        in card, card
    assert (run / "adapter" / "1" / "adapter_model.safetensors").read_bytes() == \
        (Path(experts["1"]) / "adapter_model.safetensors").read_bytes()
    recorded = (run / "recipe.yaml").read_bytes()

    moved = tmp_path / "moved"
    shutil.copytree(experts["1"], moved)
    tensors = load_file(moved / "adapter_model.safetensors")
    save_file({k: t * 1.001 if "lora_B" in k else t for k, t in tensors.items()}, moved / "adapter_model.safetensors")
    _publish_to(cache, "acme/expert-1", moved, second)
    with pytest.raises(PeftkitError, match=re.escape(
            "--resume: adapter.adapters['1'] file adapter_model.safetensors changed since checkpoint step-00000002 "
            "was written. Resuming would continue training on other inputs than the run began with. "
            f"adapter.adapters['1'] is hub adapter acme/expert-1, now at commit {second} (the run began at {first}): "
            "the branch or tag it names moved on. Set adapter.adapters['1'] to "
            f"acme/expert-1@{first}, the commit the run began with, or run without --resume")):
        train(load_recipe(recipe_file), resume=True, console=Console(quiet=True))
    assert (run / "recipe.yaml").read_bytes() == recorded
    report = verify(run, console=Console(quiet=True))
    assert report.ok, report.differences
    assert report.notes == [f"adapter.adapters['1']: hub adapter acme/expert-1 was read at commit {first}, as the "
                            f"re-run reads it; the local cache's main points to {second} now, which a recipe naming "
                            f"it trains on (pin acme/expert-1@{first} for the run's expert)"]
    train(load_recipe(recipe_file, [f"adapter.adapters.1=acme/expert-1@{first}"]), resume=True,
          console=Console(quiet=True))


def test_a_hub_expert_in_a_subfolder_is_exported_with_a_warning_peft_cannot_load_it(tiny_llama, experts, tmp_path,
                                                                                     monkeypatch):
    """A hub expert in a subfolder of its repository (`acme/experts/math`) is named so in adapter_config.json, which
    peft 0.21.2 cannot load: it takes the whole for a repository id, and its one route by subfolder
    (XLoraConfig._subfolders, which its PeftModel.from_pretrained sets for an X-LoRA on the hub) fails unpacking its
    own loop (peft's bug). The export (its save_sources hook) warns, naming the expert and what peft's users must do:
    load the export's copies (no warning for a repository's top level or a local expert)."""
    from huggingface_hub import constants

    from peftkit.errors import PeftkitWarning
    from peftkit.hub import hub_adapter
    from peftkit.methods.xlora import XLora
    from peftkit.methods.xlora_experts import peft_expert
    from tests.test_hub import _publish_to

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    shutil.copytree(experts["0"], tmp_path / "repo" / "math")
    _publish_to(cache, "acme/experts", tmp_path / "repo", "a" * 40)
    _publish_to(cache, "acme/expert-1", Path(experts["1"]), "a" * 40)
    cfg = XLoraConfig(method="xlora", adapters={"0": hub_adapter("acme/experts/math"), "1": hub_adapter("acme/expert-1")})
    assert XLora.to_peft(cfg, [], str(tiny_llama), False)["adapters"] == {"0": "acme/experts/math", "1": "acme/expert-1"}
    (tmp_path / "out").mkdir()
    with pytest.warns(PeftkitWarning) as said:
        XLora.save_sources(cfg, tmp_path / "out")
    assert [str(w.message) for w in said] == [
        "X-LoRA: adapter_config.json's `adapters` names expert '0' acme/experts/math (adapter.adapters: a hub adapter "
        "in a subfolder of its repository), which peft 0.21.2 cannot load: it takes 'user/name/SUBFOLDER' for a "
        "repository id (\"Can't find 'adapter_config.json'\"). peftkit loads the export as it is; peft's users must "
        "set config.adapters to the export's copies of the experts (ADAPTER_DIR/0, ADAPTER_DIR/1, ...) and pass "
        "config= to PeftModel.from_pretrained, as the model card shows"]
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json' at 'acme/experts/math'"):
        _peft_xlora(tiny_llama, {"0": "acme/experts/math", "1": "acme/expert-1"})
    with pytest.warns(PeftkitWarning) as said:  # (peftkit loads such a file, and says peft would not)
        peft_expert("0", "acme/experts/math", tmp_path / "adapter_config.json")
    assert str(said[0].message).startswith(
        f"{tmp_path / 'adapter_config.json'}: adapters['0'] is 'acme/experts/math', a hub adapter in a subfolder of "
        "acme/experts: peftkit loads it, and peft 0.21.2 would not"), said[0].message
    assert str(said[0].message).endswith("For peft's users, set it to the expert's directory."), said[0].message
    by_subfolder = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=32,
                                    adapters={"0": "acme/experts", "1": "acme/expert-1"})
    by_subfolder._subfolders = ["math", None]
    with pytest.raises(ValueError, match="not enough values to unpack"):
        get_peft_model(_base(tiny_llama), by_subfolder)
    (tmp_path / "local").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PeftkitWarning)
        XLora.save_sources(XLoraConfig(method="xlora", adapters={"0": hub_adapter("acme/expert-1"), "1": experts["1"]}),
                           tmp_path / "local")
