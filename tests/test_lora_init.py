"""adapter.init (peftkit.methods.lora_init): gaussian, PiSSA and OLoRA, checked against decompositions computed here
and against peft's own inits; the export converted to the original base; resume; the refusals."""

import json
import shutil

import pytest
import torch
import yaml
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from rich.console import Console
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D

from peftkit.adapter_base import load_adapted_model
from peftkit.adapters import adapter_layers, inject_adapters
from peftkit.errors import PeftkitError
from peftkit.fileio import sha256_file
from peftkit.merge import merge_adapter
from peftkit.methods.lora import Lora, LoraConfig
from peftkit.modeling import load_model
from peftkit.recipe import ModelConfig, QuantizationConfig, load_recipe
from peftkit.train import train
from tests.conftest import cli_user_error, load_fp32, make_recipe

IDS = torch.tensor([[1, 40, 41, 42, 7, 60, 61, 62], [1, 55, 12, 80, 81, 3, 47, 2]])


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
    original = _logits(load_fp32(tiny_llama))
    ours = load_fp32(tiny_llama)
    torch.manual_seed(0)
    inject_adapters(ours, ours_cfg)
    torch.manual_seed(0)
    theirs = get_peft_model(load_fp32(tiny_llama), PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
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
    trained = _logits(load_fp32(run / "merged"))
    assert _diff(trained, _logits(load_fp32(tiny_llama))) > 1e-2  # training moved it
    peft_logits = _logits(PeftModel.from_pretrained(load_fp32(tiny_llama), run / "adapter").eval())
    assert _diff(peft_logits, trained) <= 1e-4
    ours = load_adapted_model(str(tiny_llama), str(run / "adapter"), torch.device("cpu"))[0].eval()  # eval --adapter
    assert _diff(_logits(ours), trained) <= 1e-4
    merged = merge_adapter(str(run / "adapter"), str(tmp_path / "merged"), base=str(tiny_llama))  # peftkit merge
    assert _diff(_logits(load_fp32(merged)), trained) <= 1e-4


@pytest.mark.parametrize("rslora", [False, True])
def test_conversion_matches_peft(rslora, tiny_llama, tmp_path):
    """peft's own conversion (save_pretrained with path_initial_model_for_weight_conversion) of a PiSSA adapter
    moved away from its init, and ours of the same A, B: the same rank-2r update per layer and the same r,
    lora_alpha and init_lora_weights in adapter_config.json."""

    from peftkit.adapters.state_dicts import adapter_state_dict

    peft_cfg = PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights="pissa",
                              use_rslora=rslora)
    theirs = get_peft_model(load_fp32(tiny_llama), peft_cfg)
    theirs.peft_config["default"].init_lora_weights = True  # peft's recipe: save the initial adapter as plain LoRA
    theirs.save_pretrained(tmp_path / "init")
    ours = load_fp32(tiny_llama)
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


def test_pissa_on_layers_skip_modules_names_by_a_longer_suffix(tiny_llama, number_data, tmp_path):
    """skip_modules [self_attn.q_proj] keeps every layer of target self_attn.q_proj whole (transformers matches
    suffixes): no conflict. It was refused, comparing last names only. The layers really are left unquantized."""
    quant = {"quantization": {"method": "nf4", "compute_dtype": "float32",
                              "skip_modules": ["lm_head", "self_attn.q_proj"]}}
    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 1},
                         adapter={"init": "pissa", "target_modules": ["self_attn.q_proj"]}, **quant)
    train(load_recipe(recipe), console=Console(quiet=True))
    tensors = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert tensors and all("q_proj" in k for k in tensors)


def test_pissa_refuses_an_embedding(tiny_llama):
    with pytest.raises(PeftkitError, match=r"adapter.init: olora .* 'model.embed_tokens' is an Embedding"):
        inject_adapters(load_fp32(tiny_llama), LoraConfig(r=4, init="olora", target_modules=["embed_tokens"]))


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


# ------------------------------------------------- peft's adapters saved unconverted, for the residual base


def _peft_saved(base, out, init, rslora=False, targets=("q_proj", "down_proj", "embed_tokens"), dora=False, **extra):
    """peft's adapter with init `init`, moved away from it ("trained"), saved as peft saves it by default: for
    the residual base that init left (no path_initial_model_for_weight_conversion)."""
    torch.manual_seed(0)
    model = get_peft_model(load_fp32(base), PeftLoraConfig(r=2, lora_alpha=6, target_modules=list(targets),
                                                       init_lora_weights=init, use_rslora=rslora,
                                                       use_dora=dora, **extra))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize(("arch", "init", "rslora", "dora"), [
    ("llama", "pissa", False, False), ("llama", "olora", True, False), ("llama", "OLoRA", False, False),
    ("gpt2", "pissa", True, False), ("gpt2", "olora", False, False), ("llama", "olora", False, True)])
def test_peft_s_unconverted_pissa_and_olora_adapters_load_as_peft_loads_them(arch, init, rslora, dora, request,
                                                                              tmp_path):
    """peft loads such an adapter by running the init again on the base (its residual W - s B0 A0); peftkit
    converts it instead (A0, B0 computed again), to the rank-2r plain LoRA on the untouched base: the same logits
    as peft's, unmerged and merged. An embedding among the targets (peft leaves its base alone) keeps its update;
    GPT-2's Conv1D weights are stored (in, out): peft's PiSSA decomposes W, its OLoRA the stored W^T (it runs on
    square Conv1D layers only, as attn.c_proj). DoRA's magnitudes rescale the same W + s B A either way."""

    base = request.getfixturevalue(f"tiny_{arch}")
    targets = (("attn.c_proj",) if init == "olora" else ("c_attn", "c_fc")) if arch == "gpt2" else \
        ("q_proj", "down_proj") if dora else ("q_proj", "down_proj", "embed_tokens")
    adapter = _peft_saved(base, tmp_path / "adapter", init, rslora, targets, dora)
    theirs = _logits(PeftModel.from_pretrained(load_fp32(base), adapter).eval())
    assert _diff(theirs, _logits(load_fp32(base))) > 0.3  # the adapter matters
    ours, cfg = load_adapted_model(str(base), str(adapter), torch.device("cpu"))[:2]
    assert _diff(_logits(ours.eval()), theirs) <= 1e-5
    assert (cfg.r, cfg.alpha) == (4, 6 * (2**0.5 if rslora else 2))
    original = load_file(next(base.glob("*.safetensors")))
    for key, tensor in ours.state_dict().items():  # the base as saved: other adapters can share it
        if ".base_layer." in key or "lora_" not in key and key in original:
            assert torch.equal(tensor, original[key.replace(".base_layer.", ".")]), key
    merged = merge_adapter(str(adapter), str(tmp_path / "merged"), base=str(base))
    assert _diff(_logits(load_fp32(merged)), theirs) <= 1e-5


def test_an_unconverted_pissa_adapter_with_per_module_ranks_converts_each_at_its_own(tiny_llama, tmp_path):
    """rank_pattern / alpha_pattern: each module's A0, B0 at its own rank and scaling, patterns doubled as r and
    alpha are."""
    adapter = _peft_saved(tiny_llama, tmp_path / "a", "pissa", targets=("q_proj", "down_proj"),
                          rank_pattern={"down_proj": 3}, alpha_pattern={r"layers\.1\..*q_proj": 5})
    theirs = _logits(PeftModel.from_pretrained(load_fp32(tiny_llama), adapter).eval())
    ours, cfg = load_adapted_model(str(tiny_llama), str(adapter), torch.device("cpu"))[:2]
    assert _diff(_logits(ours.eval()), theirs) <= 1e-5
    assert (cfg.rank_pattern, cfg.alpha_pattern) == ({"down_proj": 6}, {r"layers\.1\..*q_proj": 10})


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_unconverted_adapter_on_a_layer_narrower_than_r_loads_as_peft_s(init, tiny_llama, tmp_path):
    """peft's PiSSA and OLoRA take at most min(out, in) directions of a layer, here k_proj's 16 of r 20 (all-linear
    on Qwen2-MoE: its shared_expert_gate, (1, hidden), gets one), where the config says r: the converted pair had
    2 x 16 rows for the config's 2 x 20, and loading refused it as weights of another run. Padded with zeros: peft's
    logits, merged too."""
    adapter = _peft_saved(tiny_llama, tmp_path / "a", init, targets=("q_proj", "k_proj"), rank_pattern={"k_proj": 20})
    assert load_file(adapter / "adapter_model.safetensors")[
        "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"].shape == (16, 32)
    theirs = _logits(PeftModel.from_pretrained(load_fp32(tiny_llama), adapter).eval())
    ours, cfg = load_adapted_model(str(tiny_llama), str(adapter), torch.device("cpu"))[:2]
    assert _diff(_logits(ours.eval()), theirs) <= 1e-5 and cfg.rank_pattern == {"k_proj": 40}
    merged = merge_adapter(str(adapter), str(tmp_path / "merged"), base=str(tiny_llama))
    assert _diff(_logits(load_fp32(merged)), theirs) <= 1e-5


def test_an_unconverted_pissa_adapter_shares_its_base_with_other_named_adapters(tiny_llama, tmp_path):
    """Several adapters on one base (`peftkit chat --adapter a=DIR --adapter b=DIR`): the PiSSA one, converted,
    leaves the base as it is, so the plain LoRA beside it and the bare base give what they give alone."""
    from peftkit.adapters.named import load_named_model

    pissa = _peft_saved(tiny_llama, tmp_path / "pissa", "pissa")
    plain = _peft_saved(tiny_llama, tmp_path / "plain", True, targets=("q_proj", "v_proj"))
    model, named, _ = load_named_model([("plain", str(plain)), ("pissa", str(pissa))])
    for name, adapter in (("pissa", pissa), ("plain", plain)):
        named.activate(name)
        assert _diff(_logits(model), _logits(PeftModel.from_pretrained(load_fp32(tiny_llama), adapter).eval())) <= 1e-5
    named.activate(None)
    assert torch.equal(_logits(model), _logits(load_fp32(tiny_llama)))


def test_unconverted_adapters_are_refused_where_they_cannot_be_converted(tiny_llama, number_data, tmp_path,
                                                                         monkeypatch, capsys):
    """Combining reads the adapters before the base, fusion keeps its sources as saved, init_from would train the
    init's directions too, a quantized base has no exact weights to compute the init from, and pissa_niter's
    randomized SVD cannot be computed again: each says so, and how to convert the adapter with peft."""
    from peftkit.methods.lora_init import base_weight_of
    from peftkit.peft_format import load_adapter

    pissa = _peft_saved(tiny_llama, tmp_path / "pissa", "pissa", targets=("q_proj",))
    convert = "save_pretrained(..., path_initial_model_for_weight_conversion=...)"
    err = cli_user_error(monkeypatch, capsys, "merge", "--adapter", str(pissa), "--adapter", str(pissa),
                         "--weights", "0.5,0.5", "--method", "linear", "--output", str(tmp_path / "combined"))
    assert f"peftkit merge: {pissa} is an adapter peft saved for the residual base" in " ".join(err.split())
    assert convert in " ".join(err.split())
    plain = _peft_saved(tiny_llama, tmp_path / "plain", True, targets=("q_proj",))
    for adapter, where in (({"init_from": str(pissa)}, "adapter.init_from"),
                           ({"method": "fusion", "fuse": [str(plain), str(pissa)]}, "adapter.fuse")):
        recipe = make_recipe(tmp_path, tiny_llama, number_data)
        recipe.write_text(recipe.read_text().split("adapter:")[0] + yaml.safe_dump({"adapter": adapter}) +
                          "data:" + recipe.read_text().split("data:", 1)[1])
        with pytest.raises(PeftkitError, match=rf"{where}.*: {pissa} is an adapter peft saved for the residual base"):
            train(load_recipe(recipe), show_summary=False)  # (fusion reads its sources when the run starts)
    quant = QuantizationConfig(method="nf4", compute_dtype="float32")
    model = load_model(ModelConfig(name_or_path=str(tiny_llama), dtype="float32"), quant, torch.device("cpu"))
    with pytest.raises(PeftkitError, match="the base is quantized here .'model.layers.0.self_attn.q_proj'.: the "
                                           "residual cannot be rebuilt"):
        base_weight_of(model)("model.layers.0.self_attn.q_proj")
    from peftkit.tiny import build_tiny_model

    build_tiny_model(tmp_path / "wider", arch="llama", hidden_size=48, num_layers=2, seed=0)
    with pytest.raises(PeftkitError, match="does not fit this base: its 'model.layers.0.self_attn.q_proj' maps 32 "
                                           "features to 32, the base's layer 48 to 48"):
        load_adapted_model(str(tmp_path / "wider"), str(pissa), torch.device("cpu"))
    build_tiny_model(tmp_path / "qwen2", arch="qwen2", hidden_size=32, num_layers=2, seed=0)  # lm_head tied
    tied = _peft_saved(tmp_path / "qwen2", tmp_path / "tied", "pissa", targets=("q_proj", "lm_head"))
    with pytest.raises(PeftkitError, match="'lm_head' shares its weight with 'model.embed_tokens.weight' .tied.: "
                                           "peft's init moved both"):
        load_adapted_model(str(tmp_path / "qwen2"), str(tied), torch.device("cpu"))
    with pytest.raises(PeftkitError, match="adapter.init: olora rewrites the base weight of 'lm_head' as W - s B A, "
                                           "and it is shared with 'model.embed_tokens.weight'"):  # training it: too
        inject_adapters(load_fp32(tmp_path / "qwen2"), LoraConfig(r=2, init="olora", target_modules=["q_proj", "lm_head"]))
    fast = _peft_saved(tiny_llama, tmp_path / "fast", "pissa_niter_4", targets=("q_proj",))
    with pytest.raises(PeftkitError, match=r"init_lora_weights is 'pissa_niter_4'.*its fast SVD draws random numbers"):
        load_adapter(fast)
    config = json.loads((fast / "adapter_config.json").read_text())
    (fast / "adapter_config.json").write_text(json.dumps(config | {"init_lora_weights": "loftq"}))
    with pytest.raises(PeftkitError, match=r"init_lora_weights is 'loftq': peft saved this adapter for the residual"):
        load_adapter(fast)  # LoftQ (and CorDA, LoRA-GA) move the base too, not from the weights alone


def test_inspect_says_peftkit_converts_it_and_vllm_and_llama_cpp_would_not(tiny_llama, tmp_path):
    from peftkit.inspect import inspect_adapter
    from peftkit.inspect_text import describe

    info = inspect_adapter(_peft_saved(tiny_llama, tmp_path / "olora", "olora", targets=("q_proj",)))
    assert info["peftkit_reads"]["ok"] and "peftkit converts it on loading" in info["peftkit_reads"]["reason"]
    for tool in ("vllm", "llama_cpp"):
        assert not info[tool]["accepts"] and "would be applied to the original base" in info[tool]["reasons"][-1]
    assert any(line.startswith("peftkit        loads it: peft saved it unconverted") for line in describe(info))
