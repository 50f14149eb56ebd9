"""adapter.init (peftkit.methods.lora_init): gaussian, PiSSA and OLoRA, checked against decompositions computed here
and against peft's own inits; the export converted to the original base; resume; the refusals."""

import json
import shutil

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from peftkit.adapters import adapter_layers, inject_adapters
from peftkit.errors import PeftkitError
from peftkit.fileio import sha256_file
from peftkit.merge import merge_adapter
from peftkit.methods.lora import Lora, LoraConfig
from peftkit.modeling import load_adapted_model, load_model
from peftkit.recipe import ModelConfig, QuantizationConfig, load_recipe
from peftkit.train import train
from tests.conftest import cli_user_error, make_recipe

IDS = torch.tensor([[1, 40, 41, 42, 7, 60, 61, 62], [1, 55, 12, 80, 81, 3, 47, 2]])


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


def _diff(a, b) -> float:
    return float((a - b).detach().abs().max())


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize("init", ["pissa", "pissa_niter", "olora"])
def test_init_is_the_decomposition_and_keeps_the_output(init, layout):
    """PiSSA: s B A = U_r S_r V_r^T (torch.linalg.svd here; with pissa_niter, fast SVD finds the same on a
    spectrum that falls fast); OLoRA: B = Q[:, :r], A = R[:r] (torch.linalg.qr); the base keeps W - s B A, so
    the layer's output is the original one."""
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 16) if layout == "linear" else Conv1D(16, 24)
    u, _, vh = torch.linalg.svd(torch.randn(16, 24), full_matrices=False)
    w = u @ torch.diag(torch.tensor([8.0, 6, 4, 3] + [0.01] * 12)) @ vh  # (out, in)
    with torch.no_grad():
        base.weight.copy_(w.T if layout == "conv1d" else w)
    x = torch.randn(3, 24)
    expected = base(x).detach()
    cfg = LoraConfig(r=4, alpha=8, init=init.removesuffix("_niter"), pissa_niter=2 if "niter" in init else None)
    layer = Lora.wrap(base, cfg, "layer")
    a, b, s = layer.lora_A.weight.detach(), layer.lora_B.weight.detach(), 2.0
    if init.startswith("pissa"):
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)
        torch.testing.assert_close(s * b @ a, u[:, :4] @ torch.diag(sv[:4]) @ vh[:4], rtol=0, atol=1e-5)
    else:
        q, r = torch.linalg.qr(w)
        torch.testing.assert_close(b, q[:, :4], rtol=0, atol=1e-6)
        torch.testing.assert_close(a, r[:4], rtol=0, atol=1e-6)
    residual = layer.base_layer.weight.T if layout == "conv1d" else layer.base_layer.weight
    torch.testing.assert_close(residual.detach(), w - s * b @ a, rtol=0, atol=1e-6)
    assert _diff(layer(x), expected) <= 1e-5


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_same_init_as_peft(init, tiny_llama):
    """peft's init_lora_weights on the same weights: the same s B A and residual base weights, and the outputs
    of the original model at step 0."""
    ours_cfg = LoraConfig(r=4, alpha=8, init=init)
    original = _logits(_load(tiny_llama))
    ours = _load(tiny_llama)
    torch.manual_seed(0)
    inject_adapters(ours, ours_cfg)
    torch.manual_seed(0)
    theirs = get_peft_model(_load(tiny_llama), PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                               init_lora_weights=init))
    for name, layer in adapter_layers(ours).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        product = layer.lora_B.weight @ layer.lora_A.weight
        peft_product = peft_layer.lora_B["default"].weight @ peft_layer.lora_A["default"].weight
        assert _diff(product, peft_product) <= 1e-5, name
        assert _diff(layer.base_layer.weight, peft_layer.base_layer.weight) <= 1e-5, name
    assert _diff(_logits(ours.eval()), original) <= 1e-4


@pytest.mark.parametrize(("init", "rslora"), [("pissa", False), ("olora", True)])
def test_trained_export_applies_to_the_original_base(init, rslora, tiny_llama, number_data, tmp_path):
    """The exported adapter is a plain LoRA of rank 2r (alpha x 2, x sqrt(2) with rsLoRA): peft, peftkit's eval
    and `peftkit merge` on the ORIGINAL base give the trained model, which the merged export is."""
    recipe = make_recipe(tmp_path, tiny_llama, number_data, adapter={"init": init, "use_rslora": rslora},
                         training={"max_steps": 4, "lr": 5e-2}, export={"merged": True})
    summary = train(load_recipe(recipe), show_summary=False)
    assert summary["eval_loss"] < summary["base_eval_loss"]
    run = tmp_path / "run"
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 8 * (2**0.5 if rslora else 2), True)
    trained = _logits(_load(run / "merged"))
    assert _diff(trained, _logits(_load(tiny_llama))) > 1e-2  # training moved it
    peft_logits = _logits(PeftModel.from_pretrained(_load(tiny_llama), run / "adapter").eval())
    assert _diff(peft_logits, trained) <= 1e-4
    ours = load_adapted_model(str(tiny_llama), str(run / "adapter"), torch.device("cpu"))[0].eval()  # eval --adapter
    assert _diff(_logits(ours), trained) <= 1e-4
    merged = merge_adapter(str(run / "adapter"), str(tmp_path / "merged"), base=str(tiny_llama))  # peftkit merge
    assert _diff(_logits(_load(merged)), trained) <= 1e-4


@pytest.mark.parametrize("rslora", [False, True])
def test_conversion_matches_peft(rslora, tiny_llama, tmp_path):
    """peft's own conversion (save_pretrained with path_initial_model_for_weight_conversion) of a PiSSA adapter
    moved away from its init, and ours of the same A, B: the same rank-2r update per layer and the same r,
    lora_alpha and init_lora_weights in adapter_config.json."""
    from safetensors.torch import load_file

    from peftkit.adapters import adapter_state_dict

    peft_cfg = PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights="pissa",
                              use_rslora=rslora)
    theirs = get_peft_model(_load(tiny_llama), peft_cfg)
    theirs.peft_config["default"].init_lora_weights = True  # peft's recipe: save the initial adapter as plain LoRA
    theirs.save_pretrained(tmp_path / "init")
    ours = _load(tiny_llama)
    cfg = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"], init="pissa", use_rslora=rslora)
    inject_adapters(ours, cfg)
    gen = torch.Generator().manual_seed(1)
    for name, layer in adapter_layers(ours).items():  # "training": the same new A, B on both sides
        peft_layer = theirs.base_model.model.get_submodule(name)
        for part in ("lora_A", "lora_B"):
            new = getattr(layer, part).weight + 0.1 * torch.randn(getattr(layer, part).weight.shape, generator=gen)
            with torch.no_grad():
                getattr(layer, part).weight.copy_(new)
                getattr(peft_layer, part)["default"].weight.copy_(new)
    theirs.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    peft_state = load_file(tmp_path / "converted" / "adapter_model.safetensors")
    peft_config = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    config = Lora.to_peft(cfg, ["q_proj", "down_proj"], "base", False)
    state, config = Lora.for_original_base(adapter_layers(ours), adapter_state_dict(ours, []), config)
    assert {k: config[k] for k in ("r", "lora_alpha", "init_lora_weights")} == \
        {k: peft_config[k] for k in ("r", "lora_alpha", "init_lora_weights")}
    assert set(state) == set(peft_state)
    for key in (k for k in state if k.endswith("lora_A.weight")):
        b_key = key.replace("lora_A", "lora_B")
        assert _diff(state[b_key] @ state[key], peft_state[b_key] @ peft_state[key]) <= 1e-5, key


def test_resume_with_pissa_and_loraplus_is_bit_identical(tiny_llama, number_data, tmp_path):
    """A resumed run recomputes A0/B0 (and the residual base) from the original base: with fast SVD (which draws
    from the RNG) and LoRA+ groups in the optimizer state, the export matches the uninterrupted run's bits."""
    recipe = make_recipe(tmp_path, tiny_llama, number_data, adapter={"init": "pissa", "pissa_niter": 2},
                         training={"max_steps": 6, "save_steps": 3, "loraplus_lr_ratio": 16}, eval={"base_model": False})
    train(load_recipe(recipe), show_summary=False)
    run = tmp_path / "run"
    straight = sha256_file(run / "adapter" / "adapter_model.safetensors")
    shutil.rmtree(run / "checkpoints" / "step-00000006")
    train(load_recipe(recipe), resume=True, show_summary=False)
    assert sha256_file(run / "adapter" / "adapter_model.safetensors") == straight


def test_gaussian_init_draws_a_normal_a_and_zero_b():
    torch.manual_seed(0)
    layer = Lora.wrap(torch.nn.Linear(64, 64), LoraConfig(r=8, init="gaussian"), "layer")
    a = layer.lora_A.weight.detach()
    assert torch.equal(layer.lora_B.weight, torch.zeros_like(layer.lora_B.weight))
    assert abs(float(a.std()) - 1 / 8) < 0.02 and abs(float(a.mean())) < 0.02


# ------------------------------------------------------------------------------------------- refusals


def test_pissa_refuses_a_quantized_base(tiny_llama):
    quant = QuantizationConfig(method="nf4", compute_dtype="float32")
    model = load_model(ModelConfig(name_or_path=str(tiny_llama), dtype="float32"), quant, torch.device("cpu"))
    with pytest.raises(PeftkitError, match=r"adapter.init: pissa rewrites the base weights .* quantized"):
        inject_adapters(model, LoraConfig(r=4, init="pissa"))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_quantized_base_is_refused_by_the_recipe(init, tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    """`peftkit validate` says it (it passed, and `train` refused after loading the model), naming the line; a LoRA
    on layers the quantization leaves whole (quantization.skip_modules: lm_head) is no conflict."""
    quant = {"quantization": {"method": "nf4", "compute_dtype": "float32"}}
    recipe = make_recipe(tmp_path, tiny_llama, number_data, adapter={"init": init}, **quant)
    err = " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())
    assert f"adapter.init: {init} rewrites the base weights as W - s B A, and quantization.method nf4 quantizes" in err
    assert f"{recipe}:" in err
    load_recipe(make_recipe(tmp_path, tiny_llama, number_data, adapter={"init": init, "target_modules": ["lm_head"]},
                            **quant))


def test_pissa_refuses_an_embedding(tiny_llama):
    with pytest.raises(PeftkitError, match=r"adapter.init: olora .* 'model.embed_tokens' is an Embedding"):
        inject_adapters(_load(tiny_llama), LoraConfig(r=4, init="olora", target_modules=["embed_tokens"]))


@pytest.mark.parametrize(("adapter", "message"), [
    ({"init": "pissa", "init_from": "."}, "adapter.init: pissa draws the step-0 weights, and adapter.init_from already "
                                          "gives them; remove adapter.init"),
    ({"init": "olora", "use_dora": True}, "adapter.init: olora with use_dora is not supported"),
    ({"init": "olora", "pissa_niter": 4}, "adapter.pissa_niter is for init: pissa (init is olora)"),
])
def test_recipe_refuses_init_combinations(adapter, message, tiny_llama, number_data, tmp_path):
    recipe = make_recipe(tmp_path, tiny_llama, number_data, adapter=adapter)
    with pytest.raises(PeftkitError) as info:
        load_recipe(recipe)
    assert message in str(info.value) and str(recipe) in str(info.value)


def test_an_unconverted_peft_pissa_adapter_is_refused(tiny_llama, tmp_path):
    """peft's save without path_initial_model_for_weight_conversion fits only the residual base."""
    from peftkit.peft_format import load_adapter

    model = get_peft_model(_load(tiny_llama), PeftLoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa"))
    model.save_pretrained(tmp_path / "pissa")
    with pytest.raises(PeftkitError, match="init_lora_weights is 'pissa'.*path_initial_model_for_weight_conversion"):
        load_adapter(tmp_path / "pissa")
