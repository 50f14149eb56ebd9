"""`data.packing`: a packed batch has the loss and the gradients of the same examples unpacked, no token of one
example depends on another in its row (Llama, Qwen2 and GPT-2 attention), and a packed run trains."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, DataCollatorWithFlattening

from peftkit.adapters import inject_adapters, trainable_parameters
from peftkit.data import Collator, Example
from peftkit.data.packing import check_isolated, flatten, pack_examples
from peftkit.errors import PeftkitError
from peftkit.evaluate import token_loss_sum
from peftkit.methods.lora import LoraConfig
from peftkit.recipe import load_recipe
from peftkit.train import train
from tests.conftest import cli_user_error, make_recipe, random_adapters
from tests.test_methods import models  # noqa: F401  (the fixture: tiny llama, qwen2 and gpt2)

PAD = 0


def _examples(seed: int = 0) -> list[Example]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n, prompt in ((7, 3), (5, 2), (9, 4), (4, 1), (6, 6)):
        ids = torch.randint(3, 90, (n,), generator=gen).tolist()
        out.append(Example(ids, [-100] * prompt + ids[prompt:]))
    return out


def _model(path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    torch.manual_seed(0)
    inject_adapters(model, LoraConfig(r=4, alpha=8))
    random_adapters(model, seed=1, std=0.2)
    return model.eval()  # gradients all the same; GPT-2's dropout off


def _loss_and_grads(model, batch) -> tuple[float, int, list[torch.Tensor]]:
    model.zero_grad()
    loss, n = token_loss_sum(model, batch)
    loss.backward()
    return float(loss), int(n), [p.grad.clone() for p in trainable_parameters(model)]


def test_packing_keeps_order_and_fits():
    rows = pack_examples(_examples(), 16)
    assert [len(r.input_ids) for r in rows] == [12, 13, 6]  # 7+5 | 9+4 | 6: next fit, never split
    assert rows[0].position_ids == list(range(7)) + list(range(5))
    assert rows[0].labels[7] == -100  # the first label of each packed example is masked


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_packed_loss_and_gradients_equal_unpacked(arch, models):  # noqa: F811
    examples = _examples()
    model = _model(models[arch])
    loss, n, grads = _loss_and_grads(model, Collator(PAD)(examples))
    packed = Collator(PAD)(pack_examples(examples, 16))
    assert "position_ids" in packed
    p_loss, p_n, p_grads = _loss_and_grads(model, packed)
    assert p_n == n and abs(p_loss - loss) <= 1e-5 * max(1.0, abs(loss))
    assert max(float((a - b).abs().max()) for a, b in zip(grads, p_grads, strict=True)) <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_a_flattened_packed_batch_has_the_loss_and_gradients_of_the_rows(arch, models):  # noqa: F811
    """What a flash-attention model trains on (`flatten`): the packed rows' real tokens as one row, no padding.
    Checked through SDPA, which finds the examples from the same position ids."""
    model = _model(models[arch])
    packed = Collator(PAD)(pack_examples(_examples(), 16))
    flat = flatten(packed)
    assert flat["input_ids"].shape == (1, int(packed["attention_mask"].sum())) and "attention_mask" not in flat
    # As transformers' own padding-free collator gives them: the examples' bounds spare every flash layer a sync.
    reference = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
        [{"input_ids": e.input_ids, "labels": e.labels} for e in _examples()])
    for key, value in reference.items():
        assert torch.equal(torch.as_tensor(flat[key]), torch.as_tensor(value)), key
    assert flat["cu_seq_lens_q"].dtype == torch.int32 and isinstance(flat["max_length_q"], int)
    loss, n, grads = _loss_and_grads(model, packed)
    f_loss, f_n, f_grads = _loss_and_grads(model, flat)
    assert f_n == n and abs(f_loss - loss) <= 1e-5 * max(1.0, abs(loss))
    assert max(float((a - b).abs().max()) for a, b in zip(grads, f_grads, strict=True)) <= 1e-5


def test_flash_attention_needs_16_bit_weights_and_cuda(tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    recipe = make_recipe(tmp_path, tiny_llama, number_data, data={"packing": True})
    flash = ("--set", "model.attn_implementation=flash_attention_2")
    err = cli_user_error(monkeypatch, capsys, "train", str(recipe), *flash)  # model.dtype: float32
    assert "flash_attention_2 computes in float16 or bfloat16 only, and model.dtype is float32" in err
    assert "Set model.dtype: bfloat16" in err
    err = cli_user_error(monkeypatch, capsys, "train", str(recipe), *flash, "--set", "model.dtype=bfloat16",
                         "--set", "model.device=cpu")
    assert "model.attn_implementation: flash_attention_2 needs a CUDA device; use sdpa" in err
    # model.dtype auto is the checkpoint's float32 (tiny_llama's config.json): refused as float32 is, where it had
    # passed on a GPU with flash-attn (and failed in flash-attn's kernel); a 16-bit checkpoint passes that check.
    err = cli_user_error(monkeypatch, capsys, "train", str(recipe), *flash, "--set", "model.dtype=auto")
    assert "flash_attention_2 computes in float16 or bfloat16 only, and model.dtype is auto, the checkpoint's float32" in err
    from peftkit.modeling import check_attention
    from peftkit.recipe import ModelConfig

    cuda = torch.device("cuda", 0)  # check_attention looks at the device's type only
    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).save_pretrained(bf16)
    with pytest.raises(PeftkitError, match="needs (a CUDA device|the flash-attn package)"):
        check_attention(ModelConfig(name_or_path=str(bf16), dtype="auto", attn_implementation="flash_attention_2"), cuda)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_no_token_depends_on_another_example(arch, models):  # noqa: F811
    """Change every token of the first example of a row: the logits of the second do not move."""
    model = _model(models[arch])
    first, second = _examples()[:2]
    other = Example([t + 1 for t in first.input_ids], first.labels)
    logits = []
    for a in (first, other):
        batch = Collator(PAD)(pack_examples([a, second], 32))
        with torch.no_grad():
            logits.append(model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits)
    n = len(first.input_ids)
    assert float((logits[0][:, :n] - logits[1][:, :n]).abs().max()) > 1e-3  # the first example did change
    assert float((logits[0][:, n:] - logits[1][:, n:]).abs().max()) <= 1e-6


def test_a_packed_run_trains(tiny_llama, number_data, tmp_path):
    import io

    out = io.StringIO()
    recipe = make_recipe(tmp_path, tiny_llama, number_data, data={"packing": True}, training={"max_steps": 4})
    summary = train(load_recipe(recipe), console=Console(file=out, width=200))
    assert "data.packing: 64 examples in" in out.getvalue()
    assert summary["eval_loss"] < summary["base_eval_loss"]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packing_is_refused_for_a_model_whose_packed_examples_see_each_other(attention, models, number_data,
                                                                             tmp_path):  # noqa: F811
    """transformers builds the per-example mask of a packed row only for models that pass it their position ids:
    Llama, Qwen2 and GPT-2 do, OPT (5.24) does not, so `peftkit train` refuses packing there before training."""
    from peftkit.tiny import build_tiny_model

    for arch in ("llama", "qwen2", "gpt2"):
        check_isolated(AutoModelForCausalLM.from_pretrained(models[arch], attn_implementation=attention))
    build_tiny_model(tmp_path / "opt", arch="opt", hidden_size=32, num_layers=2, seed=0)
    recipe = make_recipe(tmp_path, tmp_path / "opt", number_data, data={"packing": True})
    with pytest.raises(PeftkitError, match=rf"data.packing: with opt models \({attention} attention\) the examples "
                       r"packed into one row would attend to each other \(a change in one moved the next one's "
                       r"logits by .*\): transformers builds the per-example mask only for models that pass it their "
                       r"position ids. Set data.packing: false."):
        train(load_recipe(recipe, [f"model.attn_implementation={attention}"]), show_summary=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before training


def test_packing_is_refused_for_a_model_that_takes_no_position_ids(models):  # noqa: F811
    """A model whose forward has no position_ids argument (remote code can be so) gets a clear refusal, where the
    isolation check's forward failed with a TypeError traceback."""

    class NoPositionIds(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids, attention_mask=None, use_cache=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)

    with pytest.raises(PeftkitError, match=r"data.packing: this llama model's forward takes no position_ids, and a "
                       r"packed row needs them to keep its examples apart. Set data.packing: false."):
        check_isolated(NoPositionIds(AutoModelForCausalLM.from_pretrained(models["llama"])))


def test_padding_positions_do_not_rescale_dynamic_rope(tmp_path):
    """Dynamic RoPE rescales by the largest position id in the batch: a packed batch's padding (a row of one
    40-token example beside a row of three) must not count as a sequence longer than any example, which past
    max_position_embeddings 64 would rescale every real token. The packed loss is the unpacked one."""
    from transformers import AutoConfig

    from peftkit.tiny import build_tiny_model

    build_tiny_model(tmp_path / "m", arch="llama", hidden_size=32, num_layers=2, seed=0, max_position_embeddings=64)
    config = AutoConfig.from_pretrained(tmp_path / "m")
    config.rope_parameters = {"rope_theta": config.rope_parameters["rope_theta"], "rope_type": "dynamic", "factor": 2.0}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", config=config, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    examples = [Example(ids := torch.randint(4, 90, (40,), generator=gen).tolist(), [-100] * 10 + ids[10:])
                for _ in range(4)]
    rows = pack_examples(examples, 128)
    assert [len(r.input_ids) for r in rows] == [120, 40]
    with torch.no_grad():
        packed, n = token_loss_sum(model, Collator(PAD)(rows))
        unpacked, m = token_loss_sum(model, Collator(PAD)(examples))
    assert int(n) == int(m) and abs(float(packed) - float(unpacked)) <= 1e-5 * float(unpacked)
