"""LongLoRA's shifted sparse attention (peftkit.long_context): exact against a hand-built mask, plain in eval mode,
and a recipe that trains with it."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from peftkit.errors import PeftkitError
from peftkit.long_context import NAME, enable_s2_attention
from peftkit.recipe import load_recipe
from peftkit.tiny import build_tiny_model
from tests.conftest import make_recipe


def _recipe(tmp_path, tiny_llama, number_data, long_context=None, **sections):
    """make_recipe's recipe with model.long_context set (its `model` argument is the model's path)."""
    import yaml

    path = make_recipe(tmp_path, tiny_llama, number_data, **sections)
    recipe = yaml.safe_load(path.read_text())
    if long_context is not None:
        recipe["model"]["long_context"] = long_context
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _model(impl: str = "sdpa", heads: tuple[int, int] | None = None):
    """The tiny Llama (4 heads on 2 key/value heads), or with `heads` (query, key/value) as SmolLM2's 9 on 3."""
    if heads is None:
        model, _ = build_tiny_model(hidden_size=32, num_layers=2, seed=0)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(hidden_size=36, intermediate_size=64, num_hidden_layers=1, vocab_size=96,
                                             num_attention_heads=heads[0], num_key_value_heads=heads[1],
                                             initializer_range=0.1))
    model.set_attn_implementation(impl)
    return model


def _reference_attention(attn, hidden, cos, sin, group: int) -> torch.Tensor:
    """LlamaAttention's output computed by hand, each head with its explicit mask: causal inside groups of `group`
    tokens; the second half of the heads in groups shifted by group/2, its first group the first group/2 tokens
    alone (no wrap-around to the sequence's end)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    b, length, _ = hidden.shape
    shape = (b, length, -1, attn.head_dim)
    q = attn.q_proj(hidden).view(shape).transpose(1, 2)
    k = attn.k_proj(hidden).view(shape).transpose(1, 2)
    v = attn.v_proj(hidden).view(shape).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k, v = repeat_kv(k, attn.num_key_value_groups), repeat_kv(v, attn.num_key_value_groups)
    heads = q.shape[1]
    pos = torch.arange(length)
    causal = pos[None, :] <= pos[:, None]
    outs = []
    for h in range(heads):
        shift = group // 2 if h >= heads // 2 else 0
        g = torch.div(pos - shift, group, rounding_mode="floor")
        mask = causal & (g[:, None] == g[None, :])
        scores = (q[:, h] @ k[:, h].transpose(-1, -2)) * attn.scaling
        outs.append(torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v[:, h])
    return attn.o_proj(torch.stack(outs, 2).reshape(b, length, -1))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("length,group,heads", [(32, 8, None), (30, 8, None), (12, 4, None), (8, 16, None),
                                                (30, 8, (9, 3)), (16, 8, (3, 3)), (16, 8, (6, 2))])
def test_s2_attention_matches_hand_built_mask(impl, length, group, heads):
    """Odd head counts too (SmolLM2's 9 on 3 key/value heads, refused before): heads[heads // 2:] shifted."""
    model = _model(impl, heads)
    enable_s2_attention(model, group)
    model.train()
    model.config._attn_implementation = NAME  # what the pre-hook sets for a training forward
    attn = model.model.layers[0].self_attn
    hidden = torch.randn(2, length, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    cos, sin = model.model.rotary_emb(hidden, torch.arange(length)[None].expand(2, -1))
    with torch.no_grad():
        got, _ = attn(hidden, position_embeddings=(cos, sin), attention_mask=None)
        want = _reference_attention(attn, hidden, cos, sin, group)
    assert (got - want).abs().max() <= 1e-5


def test_each_token_sees_only_its_groups():
    """Whole model, one layer: changing a token changes the outputs only of the positions in its (shifted) groups."""
    model, _ = build_tiny_model(hidden_size=32, num_layers=1, seed=0)
    enable_s2_attention(model, 8)
    model.train()
    ids = torch.randint(4, 90, (1, 32), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[0, 5] = 4 if ids[0, 5] != 4 else 5
    with torch.no_grad():
        diff = (model(ids).logits - model(changed).logits).abs().amax(-1)[0]
    affected = set(torch.nonzero(diff > 1e-6).flatten().tolist())
    # position 5: its own group 0..7 (unshifted heads) and the shifted group 4..11; causal: only 5 and later
    assert affected == set(range(5, 12))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_a_padded_row_trains_as_itself_alone(impl):
    """A 13-token row in a batch padded to 20 gives the logits it has alone. The group that wraps around let the
    row's end see its start when the row was alone (padded to 16 inside the attention), not in the batch: 1.5 apart."""
    model = _model(impl)
    enable_s2_attention(model, 8)
    model.train()
    ids = torch.randint(4, 90, (2, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 13:] = 0
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        assert (batch[1, :13] - model(ids[1:, :13]).logits[0]).abs().max() <= 1e-5
        assert (batch[0] - model(ids[:1]).logits[0]).abs().max() <= 1e-5


def test_off_and_eval_are_the_plain_model():
    plain, on = _model(), _model()
    enable_s2_attention(on, 8)
    ids = torch.randint(4, 90, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain.train(), on.train()
        trained = on(ids).logits
        assert (trained - plain(ids).logits).abs().max() > 1e-3  # S²-Attn is on while training
        plain.eval(), on.eval()
        assert torch.equal(on(ids).logits, plain(ids).logits)
        assert on.config._attn_implementation == "sdpa"
        on.train()
        assert torch.equal(on(ids).logits, trained)  # and back on when training resumes
        generated = on.eval().generate(ids[:1, :8], max_new_tokens=4, do_sample=False)
        assert torch.equal(generated, plain.generate(ids[:1, :8], max_new_tokens=4, do_sample=False))


def test_recipe_without_long_context_is_the_plain_model(tmp_path, tiny_llama, number_data):
    from peftkit import long_context

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    for off in (None, {"s2_attention": False}):
        long_context.apply(model, load_recipe(_recipe(tmp_path, tiny_llama, number_data, off)))
    assert not model._forward_pre_hooks
    assert not any(hasattr(m, "_peftkit_s2") for m in model.modules())


def test_group_size_must_be_whole(tmp_path, tiny_llama, number_data):
    path = _recipe(tmp_path, tiny_llama, number_data, {"s2_attention": True, "group_size_ratio": 0.3})
    with pytest.raises(PeftkitError, match="model.long_context.group_size_ratio"):
        load_recipe(path)


def test_packing_is_refused(tmp_path, tiny_llama, number_data):
    """S²-Attn's groups start at each row, not at each packed example: a packed example would train unlike itself
    alone (the groups shift with its offset in the row)."""
    path = _recipe(tmp_path, tiny_llama, number_data, {"s2_attention": True})
    with pytest.raises(PeftkitError, match=r"data.packing: shifted sparse attention \(model.long_context.s2_attention\) "
                       r"groups tokens from the start of each row, not of each packed example"):
        load_recipe(path, ["data.packing=true"])


def test_unsupported_model_is_refused():
    model, _ = build_tiny_model(arch="gpt2", hidden_size=32, num_layers=1, seed=0)
    with pytest.raises(PeftkitError, match="model.long_context.s2_attention"):
        enable_s2_attention(model, 8)


def _losses(run) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_recipe_trains_and_adapter_loads(tmp_path, tiny_llama, number_data):
    from peftkit.adapter_base import load_adapted_model
    from peftkit.train import train

    sections = {"adapter": {"modules_to_save": ["embed_tokens", "norm"]},
                    "training": {"max_steps": 12, "batch_size": 8, "lr": 1e-2, "log_steps": 1}}
    train(load_recipe(_recipe(tmp_path / "s2", tiny_llama, number_data, {"s2_attention": True}, **sections)))
    train(load_recipe(_recipe(tmp_path / "plain", tiny_llama, number_data, None, **sections)))
    s2, plain = _losses(tmp_path / "s2" / "run"), _losses(tmp_path / "plain" / "run")
    assert s2[-1] < s2[0] - 0.5  # 4.65 -> 3.61 measured
    assert abs(s2[0] - plain[0]) > 1e-4  # the training forward did use S²-Attn (rows are longer than a group)
    adapter = tmp_path / "s2" / "run" / "adapter"
    model = load_adapted_model(None, str(adapter))[0].eval()
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "_peftkit_s2") for m in model.modules())
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ids = torch.randint(4, 90, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(ids).logits
        assert torch.isfinite(logits).all() and (logits - base(ids).logits).abs().max() > 1e-2


def test_packed_rows_stay_apart():
    """Packed examples (position ids restarting): a token never sees another example, inside its group or not."""
    model, _ = build_tiny_model(hidden_size=32, num_layers=2, seed=0)
    enable_s2_attention(model, 8)
    model.train()
    ids = torch.randint(4, 90, (1, 32), generator=torch.Generator().manual_seed(4))
    positions = torch.cat([torch.arange(13), torch.arange(19)])[None]  # two examples: 0..12 and 13..31
    changed = ids.clone()
    changed[0, 10] = 4 if ids[0, 10] != 4 else 5
    model.config.use_cache = False  # as load_model sets it: transformers finds packed rows only without a cache
    with torch.no_grad():
        diff = (model(ids, position_ids=positions).logits - model(changed, position_ids=positions).logits).abs()
    assert diff[0, 13:].max() == 0 and diff[0, 10].max() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(4, 90, (2, 30), generator=torch.Generator().manual_seed(5))
    grads = []
    for checkpointing in (False, True):
        model = _model()
        enable_s2_attention(model, 8)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        model(ids, labels=ids).loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
