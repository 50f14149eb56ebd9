"""Llama-Adapter (`method: llama_adapter`, peft's ADAPTION_PROMPT), beyond the conformance suite of test_methods.py:
the attention formula written out densely, a Mistral with 4 query heads per key/value head against peft both ways
(logits and loss), cached left-padded generation on it, and the refusals (merge, unsupported models)."""

from __future__ import annotations

import math

import pytest
import torch
from peft import AdaptionPromptConfig, PeftModel, get_peft_model
from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

from peftkit.adapters import adapter_layers, count_parameters, inject_adapters
from peftkit.adapters.state_dicts import adapter_state_dict
from peftkit.errors import PeftkitError
from peftkit.merge import merge_adapter
from peftkit.merge_weights import merged_model
from peftkit.methods.llama_adapter import LlamaAdapterConfig
from peftkit.adapter_base import load_adapted_model
from peftkit.peft_format import peft_config, save_adapter
from peftkit.tiny import build_char_tokenizer
from tests.conftest import load_fp32, random_adapters
from tests.test_generate import _check_matches_reference
from tests.test_methods import IDS, models  # noqa: F401  (the fixture: tiny llama, qwen2 and gpt2)

CFG = LlamaAdapterConfig(method="llama_adapter", adapter_len=5, adapter_layers=2)


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    """A 2-layer Mistral, hidden 32, 4 query heads sharing 1 key/value head (GQA factor 4), saved."""
    path = tmp_path_factory.mktemp("mistral")
    tok = build_char_tokenizer(path)
    config = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512,
                           initializer_range=0.1, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        MistralForCausalLM(config).save_pretrained(path)
    return path


def _rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)


def test_attention_formula(models):  # noqa: F811
    """The adapted block's output minus the base block's is o_proj(gate * softmax(RoPE(Q) K^T / sqrt(d)) V), written
    here per head with einsum: K = P Wk^T, V = P Wv^T un-rotated, key/value head j serving query heads 2j, 2j + 1."""
    model = load_fp32(models["llama"])
    torch.manual_seed(0)
    inject_adapters(model, CFG)
    random_adapters(model, seed=1, std=0.1)
    layer = adapter_layers(model)["model.layers.1.self_attn"]
    attn, prompt, gate = layer.base_layer, layer.adaption_prompt[0].detach(), float(layer.adaption_gate.detach())
    h = torch.randn(2, 6, 32)
    position_ids = torch.arange(6)[None].expand(2, -1)
    cos, sin = model.model.rotary_emb(h, position_ids)
    with torch.no_grad():
        got = layer(hidden_states=h, position_embeddings=(cos, sin), attention_mask=None)[0] \
            - attn(hidden_states=h, position_embeddings=(cos, sin), attention_mask=None)[0]
    d = 8  # head_dim: 32 / 4 heads
    q = torch.einsum("bnh,oh->bno", h, attn.q_proj.weight).view(2, 6, 4, d)
    q = q * cos[:, :, None] + _rotate_half(q) * sin[:, :, None]
    k = (prompt @ attn.k_proj.weight.T).view(5, 2, d)
    v = (prompt @ attn.v_proj.weight.T).view(5, 2, d)
    heads = []
    for head in range(4):
        scores = torch.einsum("bnd,ld->bnl", q[:, :, head], k[:, head // 2]) / math.sqrt(d)
        heads.append(gate * torch.softmax(scores, dim=-1) @ v[:, head // 2])
    expected = torch.cat(heads, dim=-1) @ attn.o_proj.weight.T
    assert float((got - expected).abs().max()) <= 1e-5
    assert float(expected.abs().max()) > 1e-2


def test_heads_narrower_than_the_hidden_size_run_here_and_fail_in_peft(tmp_path):
    """A Mistral whose heads x head_dim is not the hidden size (Mistral-Nemo's 32 x 128 = 4096 of 5120; here 4 x 12 =
    48 of 32, 2 key/value heads): peftkit's block adds the formula of `test_attention_formula`, and its cached
    generation is cache-free greedy decoding; peft 0.21's ADAPTION_PROMPT reads the key/value heads from k_proj's
    in/out ratio (32 // 24 = 1, so 4 heads of 12 for 24 numbers) and fails on the adapter (the README says so)."""
    tok = build_char_tokenizer(tmp_path / "nemo")
    config = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=12, initializer_range=0.1,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(tmp_path / "nemo")
    model = load_fp32(tmp_path / "nemo")
    targets = inject_adapters(model, CFG)
    random_adapters(model, seed=1, std=0.1)
    layer = adapter_layers(model)["model.layers.1.self_attn"]
    attn, prompt, gate = layer.base_layer, layer.adaption_prompt[0].detach(), float(layer.adaption_gate.detach())
    h = torch.randn(2, 6, 32)
    cos, sin = model.model.rotary_emb(h, torch.arange(6)[None].expand(2, -1))
    with torch.no_grad():
        got = layer(hidden_states=h, position_embeddings=(cos, sin), attention_mask=None)[0] \
            - attn(hidden_states=h, position_embeddings=(cos, sin), attention_mask=None)[0]
    q = (h @ attn.q_proj.weight.T).view(2, 6, 4, 12)
    q = q * cos[:, :, None] + _rotate_half(q) * sin[:, :, None]
    k, v = ((prompt @ proj.weight.T).view(5, 2, 12) for proj in (attn.k_proj, attn.v_proj))
    heads = [gate * torch.softmax(torch.einsum("bnd,ld->bnl", q[:, :, i], k[:, i // 2]) / math.sqrt(12), dim=-1)
             @ v[:, i // 2] for i in range(4)]
    expected = torch.cat(heads, dim=-1) @ attn.o_proj.weight.T
    assert float((got - expected).abs().max()) <= 1e-5 < float(expected.abs().max())
    _check_matches_reference(model, tok)
    save_adapter(tmp_path / "a", adapter_state_dict(model, []),
                 peft_config(CFG, targets, str(tmp_path / "nemo"), False, "mistral"))
    with pytest.raises(RuntimeError, match="is invalid for input of size"):  # peft's view(1, 5, 4, 12) of 5 x 24
        PeftModel.from_pretrained(load_fp32(tmp_path / "nemo"), tmp_path / "a")(IDS)


def test_only_prompts_and_gates_train_and_step_0_is_the_base(models):  # noqa: F811
    model = load_fp32(models["llama"])
    with torch.no_grad():
        base = model(IDS).logits
    inject_adapters(model, CFG)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, base)  # gate 0: exactly the base model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("adaption_prompt", "adaption_gate")}
    assert count_parameters(model)[0] == 2 * (5 * 32 + 1)


def _peft_reference(path, seed: int = 3):
    """An adapter peft made: random prompts (peft's N(0, 1) init) and a gate moved off 0."""
    torch.manual_seed(seed)
    reference = get_peft_model(load_fp32(path), AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=5, adapter_layers=2))
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name.endswith("adaption_gate"):
                p.copy_(0.5 + torch.rand(p.shape))
    return reference.eval()


def test_mistral_gqa_matches_peft_both_ways(mistral, tmp_path):
    """Ours in peft and peft's in peftkit: logits and loss within 1e-4 (fp32; measured ~1e-7)."""
    ours = load_fp32(mistral)
    torch.manual_seed(0)
    targets = inject_adapters(ours, CFG)
    random_adapters(ours, seed=1, std=0.1)
    save_adapter(tmp_path / "ours", adapter_state_dict(ours, []),
                 peft_config(CFG, targets, str(mistral), False, "mistral"))
    theirs = PeftModel.from_pretrained(load_fp32(mistral), tmp_path / "ours").eval()
    with torch.no_grad():
        a, b = ours(IDS, labels=IDS), theirs(IDS, labels=IDS)
    assert float((a.logits - b.logits).abs().max()) <= 1e-4 and abs(float(a.loss - b.loss)) <= 1e-4
    assert float((a.logits - load_fp32(mistral)(IDS).logits).abs().max()) > 1e-2

    reference = _peft_reference(mistral)
    reference.save_pretrained(tmp_path / "peft")
    loaded, cfg, *_ = load_adapted_model(str(mistral), str(tmp_path / "peft"))
    assert (cfg.adapter_len, cfg.adapter_layers) == (5, 2)
    with torch.no_grad():
        a, b = loaded(IDS, labels=IDS), reference(IDS, labels=IDS)
    assert float((a.logits - b.logits).abs().max()) <= 1e-4 and abs(float(a.loss - b.loss)) <= 1e-4


def test_mistral_generation_is_cache_free_greedy(mistral):
    """transformers' generate with its KV cache and left padding: the queries of the new tokens get the RoPE of
    their own positions (from the attention mask), as in one full forward per token without a cache."""
    model = load_fp32(mistral)
    torch.manual_seed(0)
    inject_adapters(model, CFG)
    random_adapters(model, seed=1, std=0.3)
    _check_matches_reference(model, AutoTokenizer.from_pretrained(mistral))


def test_merge_is_refused_everywhere(models, tmp_path):  # noqa: F811
    from peftkit.recipe import load_recipe

    model = load_fp32(models["llama"])
    targets = inject_adapters(model, CFG)
    message = r"Llama-Adapter adapters \(method: llama_adapter\) add computation of their own .* cannot be merged"
    with pytest.raises(PeftkitError, match=message):
        merged_model(model, CFG, torch.float32)
    with pytest.raises(PeftkitError, match=message):
        next(iter(adapter_layers(model).values())).merge()
    save_adapter(tmp_path / "a", adapter_state_dict(model, []), peft_config(CFG, targets, str(models["llama"]), False))
    with pytest.raises(PeftkitError, match=message + r".*peftkit eval/generate --adapter"):
        merge_adapter(str(tmp_path / "a"), str(tmp_path / "merged"))
    (tmp_path / "r.yaml").write_text("model: {name_or_path: m}\ndata: {train: t.jsonl}\n"
                                     "export: {output_dir: o, merged: true}\nadapter: {method: llama_adapter}\n")
    with pytest.raises(PeftkitError, match=r"export.merged: Llama-Adapter adapters .*set export.merged: false"):
        load_recipe(tmp_path / "r.yaml")


def test_refusals(models, tmp_path):  # noqa: F811
    with pytest.raises(PeftkitError, match=r"model type 'qwen2' is not supported; peft's ADAPTION_PROMPT.*llama, "
                                           r"mistral, gpt2"):
        inject_adapters(load_fp32(models["qwen2"]), CFG)
    with pytest.raises(PeftkitError, match=r"adapter.adapter_layers: 3, but the model has 2 attention layers"):
        inject_adapters(load_fp32(models["llama"]), CFG.model_copy(update={"adapter_layers": 3}))
    from peftkit.methods.llama_adapter import LlamaAdapter, PeftAdaptionPromptConfig

    file = tmp_path / "adapter_config.json"
    with pytest.raises(PeftkitError, match='"adapter_len" is missing'):
        LlamaAdapter.from_peft(PeftAdaptionPromptConfig(target_modules="self_attn", adapter_layers=2), file)
    with pytest.raises(PeftkitError, match='"target_modules" is \'q_proj\''):
        LlamaAdapter.from_peft(PeftAdaptionPromptConfig(target_modules="q_proj", adapter_len=2, adapter_layers=2), file)


def test_inspect(models, tmp_path):  # noqa: F811
    from peftkit.inspect import inspect_adapter

    model = load_fp32(models["gpt2"])
    targets = inject_adapters(model, CFG.model_copy(update={"adapter_layers": None}))
    save_adapter(tmp_path / "a", adapter_state_dict(model, []),
                 peft_config(CFG, targets, str(models["gpt2"]), True, "gpt2"))
    info = inspect_adapter(tmp_path / "a")
    assert (info["method"], info["peft_type"], info["ranks"], info["peftkit_reads"]["ok"]) == \
        ("llama_adapter", "ADAPTION_PROMPT", None, True)
    assert info["targets"] == {"count": 2, "modules": {"attn": 2}} and info["adapter_params"] == 2 * (5 * 32 + 1)
    assert "vLLM serves LoRA adapters only; this is ADAPTION_PROMPT" in info["vllm"]["reasons"]
