"""QLoRA with real bitsandbytes on CPU: 4-bit/8-bit loading, merging into dequant(quant(W)), training with
8-bit and paged optimizers, and the recipe checks around them. No mocks; every expected value is computed
here with bitsandbytes.functional or plain torch, not with peftkit's own merge code.

bitsandbytes' CPU paths differ by mode. On a CPU with AVX512-BF16, bitsandbytes 0.49+ repacks a
Linear4bit's weight in place on its first eval-mode forward without grad and from then on computes that layer
in bf16 (whatever compute_dtype says) through a kernel with no autograd; load_model opts out of that, and the
"CPU bf16 repack" tests below hold it to it. Linear8bitLt computes with the dequantized weight in train mode
but quantizes activations too (LLM.int8()) in eval mode. `fp32_logits` runs a quantized model in train mode
(dropout is 0 here, so it is the same function), the exact path of both.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner
from transformers import AutoModelForCausalLM

from peftkit.adapters import adapter_layers, inject_adapters
from peftkit.adapters.state_dicts import adapter_state_dict, merge_state_dict
from peftkit.cli import app
from peftkit.errors import PeftkitError
from peftkit.merge import merge_adapter, merge_device
from peftkit.merge_weights import MergeWarning, merged_model
from peftkit.methods.adalora import AdaLoraConfig
from peftkit.methods.lora import LoraConfig
from peftkit.methods.vera import VeraConfig
from peftkit.adapter_base import load_adapted_model
from peftkit.modeling import load_model
from peftkit.peft_format import peft_config, save_adapter
from peftkit.recipe import ModelConfig, QuantizationConfig, load_recipe
from peftkit.tiny import build_tiny_model
from peftkit.train import train
from tests.conftest import cli_user_error, method_recipe, random_adapters

ROOT = Path(__file__).resolve().parents[1]
QLORA_RECIPE = ROOT / "recipes" / "qlora.yaml"
CPU = torch.device("cpu")
TRAIN_DEVICE = torch.device("cuda", 0) if torch.cuda.is_available() else CPU  # where recipes train (device: auto)
ADAPTER = LoraConfig(r=4, alpha=8)
SCALING = 8 / 4  # alpha / r, written out rather than read from LoraConfig.scaling
IDS = torch.tensor([[1, 40, 41, 42, 7, 60, 61, 62, 5, 9, 33, 70], [1, 55, 12, 80, 81, 3, 3, 47, 48, 49, 50, 2]])
# The 7 linear layers of each of the 2 Llama blocks; lm_head is in skip_modules and stays nn.Linear.
LINEARS = [f"model.layers.{i}.{m}" for i in range(2) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]

# Whether bitsandbytes would repack 4-bit weights for its CPU bf16 kernel here, if allowed to.
BF16_REPACK = (
    bnbF.has_avx512bf16()
    and hasattr(bnb.nn.Linear4bit(8, 8), "support_avx512bf16_for_cpu")
    and not torch.cuda.is_available()
)


def test_a_qlora_merge_is_written_in_the_base_checkpoint_s_dtype(qllama, tmp_path):
    """Without --dtype, the checkpoint's own (bfloat16 here), not the float32 the 4-bit base computed in."""
    from transformers import AutoTokenizer

    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(qllama, dtype=torch.bfloat16).save_pretrained(bf16)
    AutoTokenizer.from_pretrained(qllama).save_pretrained(bf16)
    adapter_dir = _saved_qlora(injected(qllama), qllama, tmp_path / "adapter")
    out = merge_adapter(str(adapter_dir), str(tmp_path / "merged"), base=str(bf16))
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def qllama(tmp_path_factory) -> Path:
    """A saved 2-layer, hidden-64 Llama. Hidden 64, not conftest's 32: with 2 KV heads k_proj has 32 output
    rows here, the multiple of 32 bitsandbytes' CPU bf16 kernel asserts on (conftest's model has 16)."""
    path = tmp_path_factory.mktemp("models") / "qllama"
    build_tiny_model(path, arch="llama", hidden_size=64, num_layers=2, seed=0)
    return path


@pytest.fixture(scope="module")
def original(qllama) -> dict[str, torch.Tensor]:
    """The checkpoint's fp32 weights, before any quantization."""
    return AutoModelForCausalLM.from_pretrained(qllama, dtype=torch.float32).state_dict()


def load_quantized(path: Path, **quant) -> nn.Module:
    quant.setdefault("compute_dtype", "float32")
    return load_model(ModelConfig(name_or_path=str(path), dtype="float32"), QuantizationConfig(**quant), CPU)


def injected(path: Path, **quant) -> nn.Module:
    """A quantized model with LoRA on every linear layer and nonzero random B, so merges are not trivial."""
    model = load_quantized(path, **quant)
    torch.manual_seed(0)
    inject_adapters(model, ADAPTER)
    random_adapters(model, seed=1, std=0.1)
    return model


def dequant_and_delta(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For each adapted layer: (the weight bitsandbytes stores, dequantized by bitsandbytes; scaling * B @ A).
    Call before any eval-mode forward (see the module docstring)."""
    out = {}
    for name, layer in adapter_layers(model).items():
        w = layer.base_layer.weight
        if isinstance(layer.base_layer, bnb.nn.Linear4bit):
            deq = bnbF.dequantize_4bit(w.data, w.quant_state).float()
        else:  # LLM.int8(): int8 codes with one absmax per output row
            deq = bnbF.int8_vectorwise_dequant(w.data, w.SCB).float()
        delta = SCALING * (layer.lora_B.weight.detach() @ layer.lora_A.weight.detach())
        out[name] = (deq, delta)
    return out


def fp32_logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    """Logits through bitsandbytes' exact (dequantize, then fp32 matmul) path: train mode, no grad."""
    was_training = model.training
    model.train()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model.train(was_training)
    return logits


def plain_logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# --------------------------------------------------------------------------- 1. what gets loaded


@pytest.mark.parametrize(("method", "double_quant"), [("nf4", True), ("fp4", True), ("nf4", False)])
def test_loaded_base_is_the_requested_4bit_format(qllama, original, method, double_quant):
    model = load_quantized(qllama, method=method, double_quant=double_quant)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert sorted(layers) == sorted(LINEARS)
    for name, layer in layers.items():
        state = layer.weight.quant_state
        assert state.quant_type == method and state.blocksize == 64 and state.nested is double_quant
        assert layer.weight.dtype == torch.uint8 and layer.compute_dtype == torch.float32  # quant_storage, compute
        if double_quant:  # absmax itself 8-bit, with one fp32 absmax per 256 blocks in state2
            assert state.state2 is not None and state.state2.blocksize == 256 and state.absmax.dtype == torch.uint8
        # Independently: bitsandbytes quantizing the checkpoint's weight itself gives the same codes and values.
        codes, ref = bnbF.quantize_4bit(original[f"{name}.weight"], blocksize=64, compress_statistics=double_quant,
                                        quant_type=method)
        assert torch.equal(layer.weight.data.view(-1), codes.view(-1))
        assert torch.equal(bnbF.dequantize_4bit(layer.weight.data, state), bnbF.dequantize_4bit(codes, ref))
    head = model.lm_head  # skip_modules: full precision, untouched
    assert type(head) is nn.Linear and head.weight.dtype == torch.float32
    assert torch.equal(head.weight, original["lm_head.weight"])


# ------------------------------------------------------------------------------------ peft over 4-bit


@pytest.mark.parametrize("cfg", [LoraConfig(r=4, alpha=8, use_dora=True), VeraConfig(method="vera", r=4),
                                 AdaLoraConfig(method="adalora", init_r=4, target_r=2)], ids=["dora", "vera", "adalora"])
def test_a_bf16_4bit_base_gives_peft_s_logits_and_gradients(qllama, tmp_path, cfg):
    """model.dtype and compute_dtype bfloat16 over NF4: DoRA and VeRA rounded their fp32 update to bf16 before adding
    it to the base output, where peft adds in fp32 and rounds the sum once (its DoRA variant and its VeRA layer do so
    over 4-bit layers too): logits 0.04 apart, gradients up to 90 % (VeRA with peft's own adapter). AdaLoRA added its
    update rounded, where peft's 4-bit layer rounds the product before scaling it and adds in fp32: 0.05 apart."""
    from peft import PeftModel

    quant = {"compute_dtype": "bfloat16", "double_quant": False}

    def loaded() -> nn.Module:
        return load_model(ModelConfig(name_or_path=str(qllama), dtype="bfloat16"), QuantizationConfig(**quant), CPU)

    ours = loaded()
    torch.manual_seed(0)
    targets = inject_adapters(ours, cfg)
    random_adapters(ours, seed=1, std=0.3)
    save_adapter(tmp_path, adapter_state_dict(ours, []), peft_config(cfg, targets, str(qllama), False, "llama"))
    theirs = PeftModel.from_pretrained(loaded(), tmp_path, is_trainable=True)
    theirs.peft_config["default"].orth_reg_weight = 0.0  # (AdaLoRA: peft adds it to the loss; peftkit's trainer does)
    logits, grads = [], []
    for model in (ours, theirs):
        model.train()
        out = model(input_ids=IDS, labels=IDS)
        out.loss.backward()
        logits.append(out.logits)
        grads.append({n.replace("base_model.model.", "").replace(".default", "").removesuffix(".weight"): p.grad
                      for n, p in model.named_parameters() if p.requires_grad and "ranknum" not in n})
    assert logits[0].dtype == torch.bfloat16 and torch.equal(logits[0], logits[1])
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-5, atol=1e-5 * float(grad.abs().max()))


# ---------------------------------------------------------------------------------- 2-4. merging


def test_modules_to_save_of_a_quantized_layer_is_a_clear_error(qllama):
    """It was torch's 'only Tensors of floating point dtype can require gradients', with a traceback."""
    model = load_quantized(qllama)
    with pytest.raises(PeftkitError, match=r"adapter.modules_to_save: 'model.layers.0.self_attn.q_proj' holds quantized "
                                           r"weights \(weight: torch.uint8\).* Add it to quantization.skip_modules"):
        inject_adapters(model, LoraConfig(r=2, target_modules=["v_proj"], modules_to_save=["q_proj"]))


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_a_quantized_output_head_tied_to_the_embeddings_is_a_clear_error(tmp_path, qllama, method):
    """skip_modules without lm_head on a tied model (Qwen2's small ones) loaded, then its first forward failed inside
    bitsandbytes: a bare AssertionError (4-bit) or 'Parameter' object has no attribute 'CB' (int8). An untied head
    is quantized as asked."""
    qwen2 = tmp_path / "qwen2"
    build_tiny_model(qwen2, arch="qwen2", hidden_size=32, num_layers=1, seed=0)
    with pytest.raises(PeftkitError, match=r"quantization.skip_modules \[\] leaves out lm_head, the output head, and "
                                           r"this model ties it to its input embeddings.* Add 'lm_head' to "
                                           r"quantization.skip_modules"):
        load_quantized(qwen2, method=method, skip_modules=[])
    if method == "nf4":
        untied = load_quantized(qllama, method=method, skip_modules=[])
        assert isinstance(untied.lm_head, bnb.nn.Linear4bit)
        assert torch.isfinite(fp32_logits(untied)).all()


def test_a_skip_modules_entry_that_matches_no_module_is_refused(qllama, number_data, tmp_path, monkeypatch, capsys):
    """quantization.skip_modules: [lm_hed] (a typo for lm_head) was accepted by validate and train, which quantized the
    output head the entry meant to keep in full precision (transformers passes over an entry that matches nothing).
    Refused by both, in the same words; an entry that matches (a name, a path prefix) still trains."""
    from tests.conftest import cli_user_error, make_recipe

    said = ("quantization.skip_modules entry 'lm_hed' matches no module of this model, so it keeps nothing in full "
            "precision (transformers passes over it, and quantizes what it meant to keep). Name a module or a path "
            "prefix (lm_head, model.layers.0), or remove it. Did you mean 'lm_head'?")
    quant = {"method": "nf4", "compute_dtype": "float32", "skip_modules": ["lm_hed"]}
    recipe = make_recipe(tmp_path, qllama, number_data, quantization=quant, training={"max_steps": 1})
    for command in ("validate", "train"):
        assert said in " ".join(cli_user_error(monkeypatch, capsys, command, str(recipe)).split()), command
    recipe = make_recipe(tmp_path / "kept", qllama, number_data, training={"max_steps": 1},
                         quantization={**quant, "skip_modules": ["lm_head", "model.layers.1"]})
    train(load_recipe(recipe), show_summary=False)
    assert (tmp_path / "kept" / "run" / "adapter" / "adapter_model.safetensors").exists()


def test_a_run_s_recorded_skip_modules_retrain_on_a_model_whose_head_is_not_lm_head(qllama, number_data, tmp_path):
    """Every run's recipe.yaml writes skip_modules: [lm_head]; on BioGPT (head: output_projection) cca515e's check
    refused it, so a run trained with the default could not be re-run from its recipe.yaml (verify: 'could not
    re-run the recipe ... entry 'lm_head' matches no module'). The recorded recipe trains again, to the same loss."""
    from transformers import AutoTokenizer, BioGptConfig, BioGptForCausalLM

    from tests.conftest import make_recipe

    tok = AutoTokenizer.from_pretrained(qllama)  # (its character tokenizer)
    torch.manual_seed(0)
    base = tmp_path / "biogpt"
    BioGptForCausalLM(BioGptConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=128, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id, tie_word_embeddings=False)).save_pretrained(base)
    tok.save_pretrained(base)
    quant = {"method": "nf4", "compute_dtype": "float32"}
    first = train(load_recipe(make_recipe(tmp_path / "a", base, number_data, quantization=quant,
                                          adapter={"target_modules": ["q_proj"]}, training={"max_steps": 1})),
                  show_summary=False)
    recorded = load_recipe(tmp_path / "a" / "run" / "recipe.yaml")
    assert recorded.quantization.skip_modules == ["lm_head"]
    again = train(recorded.model_copy(update={"export": recorded.export.model_copy(
        update={"output_dir": str(tmp_path / "b")})}), show_summary=False)
    assert again["train_loss"] == first["train_loss"]


def test_a_quantization_section_that_differs_from_a_prequantized_checkpoint_is_refused(qllama, tmp_path):
    """A checkpoint saved 4-bit (merge --requantize's OUTPUT-nf4) loads with its own settings: a section asking int8
    or fp4 trained on nf4 without a word (transformers' warning goes to a silenced log), and the adapter recorded the
    section's method. The section that says what the checkpoint holds loads it."""
    from peftkit.merge import requantize_model

    saved = tmp_path / "nf4"
    requantize_model(qllama, saved, "nf4")  # nf4, double quant, compute float32
    for quant, key in (({"method": "int8"}, "quantization.method: nf4"),
                       ({"method": "fp4"}, "quantization.method: nf4"),
                       ({"method": "nf4", "double_quant": False}, "quantization.double_quant: True"),
                       ({"method": "nf4", "quant_storage": "bfloat16"}, "quantization.quant_storage: uint8")):
        with pytest.raises(PeftkitError, match=rf"nf4 is already quantized by bitsandbytes .* Set {key} as the "
                                               "checkpoint has it"):
            load_quantized(saved, **quant)
    layer = load_quantized(saved, method="nf4").model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_state.quant_type == "nf4"
    # The compute dtype is the layers' setting, not the weights': the section's applies (transformers kept the saved
    # float32).
    bf16 = load_quantized(saved, method="nf4", compute_dtype="bfloat16")
    assert {m.compute_dtype for m in bf16.modules() if isinstance(m, bnb.nn.Linear4bit)} == {torch.bfloat16}
    # Another quantizer's checkpoint (its config says so; the weights are not read): transformers' "quantized with
    # AwqConfig but you are passing a BitsAndBytesConfig" came out as "Could not load model".
    awq = tmp_path / "awq"
    shutil.copytree(qllama, awq)
    config = json.loads((awq / "config.json").read_text())
    (awq / "config.json").write_text(json.dumps(config | {"quantization_config": {"quant_method": "awq", "bits": 4}}))
    with pytest.raises(PeftkitError, match=r"awq is already quantized \(awq, in its config.json's quantization_config\)"
                                           r", and the quantization section quantizes through bitsandbytes: remove"):
        load_quantized(awq)


def test_a_run_over_a_prequantized_checkpoint_without_a_quantization_section_is_refused(qllama, number_data, tmp_path):
    """transformers loaded the checkpoint 4-bit all the same, and the adapter recorded `quantization: null`: a merge
    later loaded the base as an unquantized model. The error gives the section the checkpoint has."""
    from peftkit.merge import requantize_model

    saved = tmp_path / "nf4"
    requantize_model(qllama, saved, "nf4")  # nf4, double quant
    overrides = [f"model.name_or_path={saved}", f"data.train={number_data['train']}", "data.eval=null",
                 "training.max_steps=1", "training.warmup_steps=0", f"export.output_dir={tmp_path / 'run'}"]
    with pytest.raises(PeftkitError, match=r"nf4 is already quantized by bitsandbytes \(its config.json's "
                                           r"quantization_config\), and the recipe has no quantization section\. Add "
                                           r"the one the checkpoint has \(quantization: \{method: nf4, double_quant: "
                                           r"true, quant_storage: uint8\}\)"):
        train(load_recipe(QLORA_RECIPE, [*overrides, "quantization=null"]), console=Console(file=io.StringIO()))


def test_resuming_a_run_started_over_a_prequantized_checkpoint_without_a_section_says_to_start_again(
        qllama, number_data, tmp_path, monkeypatch):
    """A run started before the section was required could not resume, and the error said to add the section, which
    --resume then refused as another recipe (its recipe.yaml differs): a loop of advice. It now says to train again."""
    import peftkit.start
    from peftkit.merge import requantize_model

    saved = tmp_path / "nf4"
    requantize_model(qllama, saved, "nf4")
    overrides = [f"model.name_or_path={saved}", f"data.train={number_data['train']}", "data.eval=null",
                 "training.max_steps=2", "training.warmup_steps=0", "training.save_steps=1",
                 f"export.output_dir={tmp_path / 'run'}", "quantization=null"]
    with monkeypatch.context() as before:  # the run as made before the check
        before.setattr(peftkit.start, "check_quantization_section", lambda *args: None)
        train(load_recipe(QLORA_RECIPE, overrides), console=Console(file=io.StringIO()))
    (tmp_path / "run" / "manifest.json").unlink()  # unfinished: its checkpoints to resume from
    with pytest.raises(PeftkitError) as caught:
        train(load_recipe(QLORA_RECIPE, overrides), resume=True, console=Console(file=io.StringIO()))
    message = " ".join(str(caught.value).split())
    assert ("the recipe has no quantization section. This run was started without one, so it cannot be resumed: "
            "adding the section makes it another recipe. Train it again with the one the checkpoint has "
            "(quantization: {method: nf4, double_quant: true, quant_storage: uint8}), with --overwrite or in another "
            "export.output_dir") in message, message


def test_a_16bit_compute_dtype_does_not_shrink_the_activation_estimate_of_a_float32_base(qllama, number_data, tmp_path):
    """compute_dtype bfloat16 (the default) on a float32 base: the estimate sized every activation in bf16 (half the
    fp32 figure), but a 4-bit layer returns its input's dtype and the rest runs in fp32: autograd keeps the same
    bytes either way, and so does the estimate now."""
    from peftkit.memory import estimate_memory
    from peftkit.activations import saved_activation_bytes

    estimated, kept = [], []
    for compute in ("bfloat16", "float32"):
        recipe = load_recipe(QLORA_RECIPE, [f"model.name_or_path={qllama}", f"data.train={number_data['train']}",
                                            "data.eval=null", "data.max_length=64", "training.batch_size=2",
                                            f"quantization.compute_dtype={compute}", f"export.output_dir={tmp_path}"])
        model = load_model(recipe.model, recipe.quantization, CPU)
        torch.manual_seed(0)
        inject_adapters(model, recipe.adapter)
        model.train()
        kept.append(saved_activation_bytes(model, {"input_ids": torch.randint(3, 40, (2, 64))}))
        estimated.append(estimate_memory(recipe, CPU).activations)
    assert kept[0] == kept[1] and estimated[0] == estimated[1]


def test_merge_folds_delta_into_dequantized_weights(qllama, original):
    model = injected(qllama)
    expected = dequant_and_delta(model)
    merged = merged_model(model, ADAPTER, torch.float32).state_dict()
    for name, (deq, delta) in expected.items():
        got = merged[f"{name}.weight"]
        assert got.dtype == torch.float32
        assert max_diff(got, deq + delta) <= 1e-6, name
        # Not the classic bug: merging into the original W would be off by the whole 4-bit rounding error.
        assert max_diff(got, original[f"{name}.weight"] + delta) > 1e-3, name
    for key in set(original) - {f"{n}.weight" for n in expected}:  # embeddings, norms, lm_head pass through
        assert torch.equal(merged[key], original[key]), key


def test_merge_after_eval_forward_reads_the_weights_the_layer_uses(qllama):
    """After bitsandbytes has repacked the 4-bit weights for its CPU kernel, the merge must still decode them.
    The repack rounds the absmax to bf16, so each weight may move by 2^-8 of itself (bf16's unit roundoff)."""
    if not BF16_REPACK:
        pytest.skip("this CPU has no AVX512-BF16 (or a GPU is used): bitsandbytes never repacks weights here")
    model = injected(qllama)
    expected = dequant_and_delta(model)
    layers = [layer.base_layer for layer in adapter_layers(model).values()]
    # Each layer's own eval forward, with bitsandbytes' default (load_model turns it off): what repacks. A model's eval
    # forward reaches it where LoRA runs as modules (more than lowrank.MAX_THREADS threads); the fused CPU node calls
    # bitsandbytes' matmul itself and leaves the weights alone.
    with torch.no_grad():
        for layer in layers:
            layer.support_avx512bf16_for_cpu = True
            layer.eval()(torch.randn(2, layer.in_features))
    assert all(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for layer in layers)
    merged = merged_model(model, ADAPTER, torch.float32).state_dict()
    for name, (deq, delta) in expected.items():
        err = (merged[f"{name}.weight"] - (deq + delta)).abs()
        assert bool((err <= 2**-8 * deq.abs() + 1e-6).all()), f"{name}: off by up to {float(err.max()):.3g}"


def test_merged_logits_equal_qlora_logits(qllama, original):
    model = injected(qllama)
    qlora = fp32_logits(model)
    merged = plain_logits(merged_model(model, ADAPTER, torch.float32))
    assert max_diff(merged, qlora) <= 1e-4
    # For scale: the same adapter merged into the original (unquantized) weights drifts far more.
    naive_state = merge_state_dict(original, adapter_state_dict(model, []), ADAPTER)
    naive = AutoModelForCausalLM.from_pretrained(qllama, dtype=torch.float32)
    naive.load_state_dict(naive_state, strict=True)
    assert max_diff(plain_logits(naive), qlora) > 1e-2


def test_a_quantized_gpt2_merges_into_its_conv1d_layout(tmp_path):
    """transformers quantizes GPT-2's Conv1D weights transposed, (out, in); the merge wrote them so into the plain
    model's Conv1D layers, which store (in, out): a size mismatch error ('copying a param with shape [96, 32] ... the
    shape in current model is [32, 96]') from `peftkit merge` and export.merged of every QLoRA GPT-2."""
    gpt2 = tmp_path / "gpt2"
    build_tiny_model(gpt2, arch="gpt2", hidden_size=32, num_layers=2, seed=0)
    model = load_quantized(gpt2)
    torch.manual_seed(0)
    inject_adapters(model, ADAPTER)
    random_adapters(model, seed=1, std=0.1)
    layer = adapter_layers(model)["transformer.h.0.attn.c_attn"]
    w = layer.base_layer.weight
    deq = bnbF.dequantize_4bit(w.data, w.quant_state).float()
    delta = SCALING * (layer.lora_B.weight.detach() @ layer.lora_A.weight.detach())
    merged = merged_model(model, ADAPTER, torch.float32)
    assert max_diff(merged.state_dict()["transformer.h.0.attn.c_attn.weight"], (deq + delta).T) <= 1e-6
    assert max_diff(plain_logits(merged), plain_logits(model)) <= 1e-4  # eval mode: GPT-2's dropout off
    # `peftkit merge` of the saved QLoRA adapter, and combining it with itself (cat, half each: the same update) into
    # the base, which failed the same way.
    from peftkit.combine_adapters import combine_adapters
    from peftkit.combine_inputs import Combination

    adapter = _saved_qlora(model, gpt2, tmp_path / "adapter")
    shutil.copytree(adapter, tmp_path / "again")
    for out in (merge_adapter(str(adapter), str(tmp_path / "merged")),
                combine_adapters([str(adapter), str(tmp_path / "again")], Combination("cat", (0.5, 0.5)),
                                 str(tmp_path / "combined"), into_base=True)):
        assert max_diff(plain_logits(AutoModelForCausalLM.from_pretrained(out)), plain_logits(model)) <= 1e-4, out


def _saved_qlora(model: nn.Module, base: Path, out: Path) -> Path:
    """`model`'s adapter saved as a QLoRA run exports it (peftkit.json records the nf4 base)."""
    quant = QuantizationConfig(method="nf4", double_quant=True, compute_dtype="float32")
    save_adapter(out, adapter_state_dict(model, []),
                 peft_config(ADAPTER, list(adapter_layers(model)), str(base), fan_in_fan_out=False), quant)
    assert json.loads((out / "peftkit.json").read_text())["quantization"]["method"] == "nf4"
    return out


def test_merge_adapter_requantizes_base_from_adapter_metadata(qllama, original, tmp_path):
    model = injected(qllama)
    expected = dequant_and_delta(model)
    adapter_dir = _saved_qlora(model, qllama, tmp_path / "adapter")

    out = merge_adapter(str(adapter_dir), str(tmp_path / "merged"), requantize="nf4")
    state = load_file(out / "model.safetensors")
    for name, (deq, delta) in expected.items():  # quantizing again is deterministic: the same 4-bit base
        assert max_diff(state[f"{name}.weight"], deq + delta) <= 1e-6, name
        assert max_diff(state[f"{name}.weight"], original[f"{name}.weight"] + delta) > 1e-3, name
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert max_diff(plain_logits(merged), fp32_logits(model)) <= 1e-4

    # <out>-nf4: the merged weights quantized again, a 4-bit model transformers loads as such.
    nf4 = AutoModelForCausalLM.from_pretrained(tmp_path / "merged-nf4", device_map={"": "cpu"})
    for name in LINEARS:
        layer = nf4.get_submodule(name)
        assert isinstance(layer, bnb.nn.Linear4bit), name
        assert layer.weight.quant_state.quant_type == "nf4" and layer.weight.quant_state.nested
        codes, _ = bnbF.quantize_4bit(state[f"{name}.weight"], blocksize=64, compress_statistics=True, quant_type="nf4")
        assert torch.equal(layer.weight.data.view(-1), codes.view(-1)), name
    # Lossy, as documented. On this random tiny model 4 bits are coarse: re-rounding moves the logits by ~1.2
    # (max abs), as quantizing the base did (~0.9), so only a working forward is asserted here.
    assert torch.isfinite(fp32_logits(nf4)).all()


# ------------------------------------------------------------------------------------ 5, 7. training


@pytest.fixture(scope="module", params=["paged_adamw_8bit", "adamw_8bit"])
def qlora_run(request, qllama, number_data, tmp_path_factory) -> dict:
    """recipes/qlora.yaml, shortened and pointed at the test model: 20 steps of 4 examples, checkpoint at 20.
    r=32 makes lora_B of gate/up_proj (128x32) and lora_A of down_proj (32x128) 4096 elements, the size from
    which bitsandbytes keeps 8-bit optimizer state (smaller tensors get fp32 state)."""
    out = tmp_path_factory.mktemp(request.param) / "run"
    recipe = load_recipe(QLORA_RECIPE, [
        f"model.name_or_path={qllama}", f"data.train={number_data['train']}", f"data.eval={number_data['eval']}",
        "training.max_steps=20", "training.batch_size=4", "training.warmup_steps=2", "training.eval_steps=null",
        "training.save_steps=20", f"training.optimizer={request.param}", "adapter.r=32", "adapter.alpha=64",
        "eval.batch_size=16", f"export.output_dir={out}",
    ])
    buffer = io.StringIO()
    summary = train(recipe, console=Console(file=buffer, width=200, color_system=None))
    return {"out": out, "summary": summary, "console": buffer.getvalue(), "optimizer": request.param, "recipe": recipe}


def test_qlora_training_lowers_loss_and_exports_peft(qlora_run):
    out, summary = qlora_run["out"], qlora_run["summary"]
    assert summary["eval_loss"] < summary["base_eval_loss"] - 0.5, summary
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 21))
    assert all(r["peak_mem_mb"] > 0 for r in steps)
    assert records[-1]["eval_loss"] == pytest.approx(summary["eval_loss"])

    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert sorted(weights) == sorted(f"base_model.model.{n}.lora_{ab}.weight" for n in LINEARS for ab in "AB")
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 32 and config["lora_alpha"] == 64
    meta = json.loads((out / "adapter" / "peftkit.json").read_text())
    assert meta["quantization"] == qlora_run["recipe"].quantization.model_dump()
    assert meta["quantization"]["method"] == "nf4" and meta["quantization"]["double_quant"] is True

    # The optimizer really was bitsandbytes' 8-bit AdamW: uint8 moments for the >= 4096-element tensors.
    blob = torch.load(out / "checkpoints" / f"step-{20:08d}" / "training_state.pt", weights_only=True)
    moment_dtypes = {t.dtype for s in blob["optimizer"]["state"].values()
                     for k, t in s.get("__bnb_optimizer_quant_state__", s).items() if k in ("state1", "state2")}
    assert moment_dtypes == {torch.uint8, torch.float32}, moment_dtypes


def test_qlora_merged_export_matches_trained_model(qlora_run, tmp_path):
    """merged/ (export.merged: true) and `peftkit merge` give the logits of the trained adapter on the 4-bit
    base, in fp32. The base is re-quantized where it was trained (CUDA when the tests run on a GPU)."""
    out = qlora_run["out"]
    trained_on = TRAIN_DEVICE.type
    assert json.loads((out / "adapter" / "peftkit.json").read_text())["quantized_on"] == trained_on
    qlora, _, _, _, quant = load_adapted_model(None, str(out / "adapter"), TRAIN_DEVICE)
    assert quant is not None and isinstance(qlora.get_submodule(LINEARS[0]).base_layer, bnb.nn.Linear4bit)
    expected = fp32_logits(qlora, IDS.to(TRAIN_DEVICE)).cpu()
    exported = AutoModelForCausalLM.from_pretrained(out / "merged", device_map={"": "cpu"})
    assert max_diff(plain_logits(exported), expected) <= 1e-4
    merged = merge_adapter(str(out / "adapter"), str(tmp_path / "merged"))
    assert max_diff(plain_logits(AutoModelForCausalLM.from_pretrained(merged, device_map={"": "cpu"})), expected) <= 1e-4


def test_a_merge_quantizes_the_base_from_the_dtype_training_did(qllama, number_data, tmp_path):
    """model.dtype: bfloat16 on a float32 checkpoint (the usual GPU QLoRA recipe): training quantized bf16 weights,
    and `peftkit merge` (no recipe) quantized the fp32 ones: other 4-bit codes, every quantized layer off (0.086 on a
    test model). peftkit.json records the dtype, and the merge equals the run's own merged/ bit for bit."""
    recipe = load_recipe(QLORA_RECIPE, [
        f"model.name_or_path={qllama}", "model.dtype=bfloat16", f"data.train={number_data['train']}",
        "data.eval=null", "training.max_steps=2", "training.warmup_steps=0", "training.eval_steps=null",
        "training.save_steps=null", "export.merged=true", f"export.output_dir={tmp_path / 'run'}"])
    train(recipe, console=Console(quiet=True))
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "peftkit.json").read_text())["base_dtype"] == "bfloat16"
    merged = merge_adapter(str(adapter), str(tmp_path / "merged"))  # both in the checkpoint's dtype, float32
    ours, theirs = load_file(tmp_path / "run" / "merged" / "model.safetensors"), load_file(merged / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert {t.dtype for t in ours.values()} == {torch.float32}


def test_merge_of_a_cuda_quantized_adapter_without_cuda_warns(qlora_run, tmp_path, monkeypatch):
    adapter = tmp_path / "adapter"
    shutil.copytree(qlora_run["out"] / "adapter", adapter)
    meta = json.loads((adapter / "peftkit.json").read_text())
    (adapter / "peftkit.json").write_text(json.dumps({**meta, "quantized_on": "cuda"}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(MergeWarning, match="quantized on CUDA, and no CUDA device is here.*re-quantized on CPU"):
        assert merge_device(str(adapter)) == CPU
    result = CliRunner().invoke(app, ["merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    assert "warning: this adapter was trained on a base quantized on CUDA" in " ".join(result.output.split())
    assert (tmp_path / "merged" / "model.safetensors").exists()


def test_eval_and_generate_of_an_adapter_quantized_elsewhere_warn(qllama, number_data, tmp_path, monkeypatch, capsys):
    """`peftkit merge` warned that a CUDA-quantized adapter's base is re-quantized on this CPU, a few weights to other
    4-bit codes; eval, generate and chat ran on that base without a word. They now say it too (one adapter, or named
    adapters: each one quantized elsewhere), in merge's words; an adapter quantized where it runs says nothing."""
    from peftkit.cli import main

    here = "cuda" if torch.cuda.is_available() else "cpu"  # where the CLI loads (model.device: auto)
    names = {"cpu": "CPU", "cuda": "CUDA"}
    other = "cpu" if here == "cuda" else "cuda"
    model = injected(qllama)
    for name, where in (("elsewhere", other), ("here", here)):
        adapter = _saved_qlora(model, qllama, tmp_path / name)
        meta = json.loads((adapter / "peftkit.json").read_text())
        (adapter / "peftkit.json").write_text(json.dumps({**meta, "quantized_on": where}))

    def stderr(*args: str) -> str:
        monkeypatch.setattr("sys.argv", ["peftkit", *args])
        main()
        return " ".join(capsys.readouterr().err.split())

    elsewhere, data = tmp_path / "elsewhere", ["--model", str(qllama), "--data", str(number_data["eval"])]
    reason = "no CUDA device is here" if other == "cuda" else f"this runs on {names[here]}"
    said = (f"warning: adapter {elsewhere} was trained on a base quantized on {names[other]}, and {reason}: the base "
            f"is re-quantized on {names[here]}, whose rounding can differ for a few weights, so its outputs may "
            "differ slightly from the trained model's (about 1e-3 in logits on a test model). Run it on "
            f"{names[other]} for the exact base.")
    assert said in stderr("eval", "--adapter", str(elsewhere), *data)
    assert said in stderr("generate", "--adapter", str(elsewhere), "--prompt", "1 + 1 =", "--max-new-tokens", "2")
    compared = stderr("eval", "--adapter", f"a={tmp_path / 'here'}", "--adapter", f"b={elsewhere}", *data)
    assert said in compared and compared.count("re-quantized") == 1
    assert "re-quantized" not in stderr("eval", "--adapter", str(tmp_path / "here"), *data)


def test_paged_optimizer_on_cpu_notes_it_once_and_only_on_cpu(qlora_run):
    note = "on CPU: bitsandbytes has no paged memory here"
    expected = 1 if qlora_run["optimizer"].startswith("paged") and not torch.cuda.is_available() else 0
    assert qlora_run["console"].count(note) == expected, qlora_run["console"]


# -------------------------------------------------------------------------------- CPU bf16 repack
# Without load_model's opt-out, on an AVX512-BF16 CPU: eval logits off by ~0.04, LoRA gradients after the
# base eval off by 100%+ (no autograd through the repacked base), and a RuntimeError for layers with
# in_features < 64 (conftest's hidden-32 model) or out_features not a multiple of 32.


def test_loading_opts_every_4bit_layer_out_of_the_bf16_repack_on_any_cpu(qllama, monkeypatch):
    """The tests below only bite on a CPU with AVX512-BF16, where bitsandbytes turns its bf16 repack on. Here the
    CPU is made to say it has it: every Linear4bit comes out of load_model with the repack off all the same."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    layers = [m for m in load_quantized(qllama).modules() if isinstance(m, bnb_modules.Linear4bit)]
    assert len(layers) == 14 and not any(layer.support_avx512bf16_for_cpu for layer in layers)


@pytest.mark.parametrize("hidden", [64, 32], ids=["hidden_64", "hidden_32"])
def test_eval_forward_computes_in_compute_dtype(hidden, tmp_path):
    """evaluate_loss (eval mode, no grad) must compute what training computes, with compute_dtype float32."""
    path = tmp_path / "model"
    build_tiny_model(path, arch="llama", hidden_size=hidden, num_layers=2, seed=0)
    model = injected(path)
    want = fp32_logits(model)
    assert max_diff(plain_logits(model), want) <= 1e-5


def test_base_eval_does_not_change_training_gradients(qllama):
    """train() evaluates the base before training; afterwards the LoRA gradients must be those of a fresh model."""
    grads = []
    for evaluate_first in (False, True):
        model = injected(qllama)
        if evaluate_first:
            plain_logits(model)
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    worst = max(max_diff(grads[0][n], grads[1][n]) / float(grads[0][n].abs().max()) for n in grads[0])
    assert worst <= 1e-4, f"largest relative gradient difference {worst:.3g}"


# ---------------------------------------------------------------------------------------- 6. int8


def _int8_runs_here() -> str | None:
    """None if bitsandbytes' Linear8bitLt quantizes and runs on this machine, else why not."""
    try:
        layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False).to(CPU)
        layer(torch.randn(2, 64))
    except (RuntimeError, NotImplementedError, AttributeError) as e:
        return f"bitsandbytes {bnb.__version__} cannot run Linear8bitLt on this CPU: {e}"
    return None


def test_int8_base_lora_forward_and_merge(qllama, original):
    reason = _int8_runs_here()
    if reason:
        pytest.skip(reason)
    model = injected(qllama, method="int8")
    assert sorted(n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)) == sorted(
        f"{n}.base_layer" for n in LINEARS)
    assert type(model.lm_head) is nn.Linear
    expected = dequant_and_delta(model)
    for name, (deq, _) in expected.items():
        # Independently: bitsandbytes' row-wise absmax quantization of the fp16-cast checkpoint weight (what
        # Int8Params does), and the dequantized weight within one int8 step of the original.
        base = model.get_submodule(name).base_layer.weight
        w = original[f"{name}.weight"]
        codes, scales, _ = bnbF.int8_vectorwise_quant(w.half())
        assert torch.equal(base.data, codes) and torch.equal(base.SCB, scales), name
        assert bool(((deq - w).abs() <= w.abs().amax(dim=1, keepdim=True) / 127).all()), name

    # LoRA forward on an int8 base: the base layer's own output plus the low-rank update.
    layer = adapter_layers(model)[LINEARS[0]]
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = layer.base_layer(x) + SCALING * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
        assert max_diff(layer(x), want) <= 1e-5

    merged_net = merged_model(model, ADAPTER, torch.float32)
    merged = merged_net.state_dict()
    for name, (deq, delta) in expected.items():
        assert max_diff(merged[f"{name}.weight"], deq + delta) <= 1e-6, name
        assert max_diff(merged[f"{name}.weight"], original[f"{name}.weight"] + delta) > 1e-4, name
    # Train mode computes with the dequantized weight: the merged model's logits exactly. Eval mode is
    # LLM.int8() proper, activations quantized too: only close (~0.08 max abs here, logits' std ~0.85).
    want = plain_logits(merged_net)
    assert max_diff(fp32_logits(model), want) <= 1e-4
    assert max_diff(plain_logits(model), want) < 0.2 * float(want.std())


# ------------------------------------------------------------------------------- 8. recipe checks


def test_qlora_recipe_is_the_quickstart_quantized():
    lines = QLORA_RECIPE.read_text().splitlines()
    assert lines[0] == "# peftkit train recipes/qlora.yaml"
    recipe, quick = load_recipe(QLORA_RECIPE), load_recipe(ROOT / "recipes" / "quickstart.yaml")
    assert recipe.quantization == QuantizationConfig(method="nf4", double_quant=True, compute_dtype="float32",
                                                     quant_storage="uint8")
    assert recipe.training.optimizer == "paged_adamw_8bit" and recipe.training.gradient_checkpointing
    assert (recipe.model.name_or_path, recipe.data.train, recipe.data.eval) == (
        quick.model.name_or_path, quick.data.train, quick.data.eval)
    assert Path(recipe.export.output_dir) == ROOT / "runs" / "qlora"


@pytest.mark.skipif(torch.cuda.is_available(), reason="float16 compute is a CPU-only error")
def test_float16_compute_on_cpu_is_a_recipe_error(qllama, number_data, tmp_path):
    recipe = load_recipe(QLORA_RECIPE, [
        f"model.name_or_path={qllama}", f"data.train={number_data['train']}", "data.eval=null",
        "quantization.compute_dtype=float16", "training.max_steps=1", "training.warmup_steps=0",
        "training.batch_size=2",
        "training.save_steps=null", "training.eval_steps=null", "eval.base_model=false", "export.adapter=false",
        "export.merged=false", f"export.output_dir={tmp_path / 'run'}",
    ])
    with pytest.raises(PeftkitError, match=r"quantization\.compute_dtype") as error:
        train(recipe, console=Console(file=io.StringIO()))
    assert "float32" in str(error.value)  # says what to use instead
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # rejected before any training


def test_a_paged_optimizer_run_resumes_bit_identically(tiny_llama, number_data, tmp_path):
    """A paged optimizer's state is restored through bitsandbytes' load_state_dict without its move to the GPU, and
    paged again there (`peftkit.distributed._page_again`; CUDA: the test below): the resumed run gives the bits of
    the unbroken one."""
    from tests.conftest import make_recipe

    recipe = make_recipe(tmp_path, tiny_llama, number_data, eval={"base_model": False},
                         training={"max_steps": 4, "save_steps": 2, "optimizer": "paged_adamw_8bit"})
    train(load_recipe(recipe), show_summary=False)
    adapter = tmp_path / "run" / "adapter" / "adapter_model.safetensors"
    straight = adapter.read_bytes()
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-00000004")
    train(load_recipe(recipe), resume=True, show_summary=False)
    assert adapter.read_bytes() == straight


@pytest.mark.skipif(not torch.cuda.is_available(), reason="paged memory is CUDA's (scripts/gpu_check.sh runs it)")
@pytest.mark.parametrize("optimizer", ["paged_adamw_8bit", "paged_adamw_32bit"])
def test_a_paged_optimizer_s_state_is_paged_again_after_loading(optimizer):
    """bitsandbytes' load_state_dict moves a paged optimizer's moments onto the GPU as ordinary tensors, all at once,
    so a resumed run held in GPU memory what the unbroken one paged out (and could run out of it where that one
    fitted). `load_optimizer_state` keeps them on the CPU and pages them again, with the same values: the next steps
    give the unbroken run's bits."""
    from peftkit.distributed import load_optimizer_state
    from peftkit.recipe import TrainingConfig
    from peftkit.runtime import build_optimizer

    def run(steps: int, p: nn.Parameter, opt) -> None:
        for step in range(steps):
            p.grad = torch.randn(p.shape, device=p.device, generator=torch.Generator(p.device).manual_seed(step))
            opt.step()

    cfg = TrainingConfig(optimizer=optimizer, lr=1e-2)
    make = lambda p: build_optimizer(cfg, [p], p.device, Console(file=io.StringIO()))  # noqa: E731
    start = torch.randn(1024, 128, device="cuda")  # 131,072 elements: bitsandbytes pages from 1e5
    straight = nn.Parameter(start.clone())
    opt = make(straight)
    run(2, straight, opt)
    assert all(getattr(s["state1"], "is_paged", False) for s in opt.state.values())
    buffer = io.BytesIO()  # as a checkpoint keeps it, and --resume reads it (onto the CPU)
    torch.save(opt.state_dict(), buffer)
    run(2, straight, opt)

    resumed = nn.Parameter(start.clone())
    run(2, resumed, make(resumed))
    again = make(resumed)
    load_optimizer_state(nn.Linear(1, 1), again, torch.load(io.BytesIO(buffer.getvalue()), weights_only=True,
                                                            map_location="cpu"))
    state = next(iter(again.state.values()))
    assert all(getattr(state[k], "is_paged", False) for k in ("state1", "state2") if k in state)
    run(2, resumed, again)  # (the generator gives steps 0 and 1 again: the same for both runs)
    torch.testing.assert_close(resumed, straight, rtol=0, atol=0)


@pytest.mark.parametrize("adapter", [{"method": "road", "group_size": 8}, {"method": "miss", "r": 4},
                                     {"method": "delora", "r": 4}, {"method": "hra", "r": 2},
                                     {"method": "boft", "boft_block_size": 4},
                                     {"method": "oft", "r": 0, "oft_block_size": 4}, {"method": "c3a", "block_size": 8},
                                     {"method": "shira", "r": 2},
                                     {"method": "psoft", "r": 2},
                                     {"method": "glora", "r": 2},
                                     {"method": "tinylora", "u": 4}],  # (its SVD: the plain Conv1D only)
                         ids=lambda a: a["method"])
def test_a_quantized_gpt2_s_conv1d_is_refused_by_the_methods_that_refuse_conv1d(adapter, number_data, tmp_path,
                                                                                 monkeypatch, capsys):
    """RoAd, MiSS, DeLoRA, HRA, BOFT, OFT, C3A, SHiRA, PSOFT and GLoRA refuse GPT-2's Conv1D (as peft's): transformers quantizes it into a bitsandbytes Linear,
    which they took, so `peftkit validate` (on a quantized meta model) passed a recipe train refuses, and the Python
    API trained an adapter no merge could write into the plain model's Conv1D. Refused when the adapter is made."""
    gpt2 = tmp_path / "gpt2"
    build_tiny_model(gpt2, arch="gpt2", hidden_size=32, num_layers=1, seed=0)
    said = (r"adapter.target_modules: 'transformer.h.0.attn.c_attn' is GPT-2's Conv1D, quantized \(a merge writes it "
            r"back as a Conv1D\); ")
    recipe = method_recipe(tmp_path, gpt2, number_data, adapter | {"target_modules": ["c_attn"]},
                           quantization={"method": "nf4"})
    assert re.search(said, cli_user_error(monkeypatch, capsys, "validate", str(recipe)))
    with pytest.raises(PeftkitError, match="^" + said):
        inject_adapters(load_quantized(gpt2), load_recipe(recipe).adapter)
