"""The chunked next-token loss (`peftkit.loss`) against the plain full-size fp32 cross-entropy."""

import pytest
import torch
from torch.nn import functional as F

from peftkit import loss as loss_mod
from peftkit.data import IGNORE_INDEX
from peftkit.loss import next_token_loss_sum


def _batch(dtype: torch.dtype, vocab: int = 50):
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 9, vocab, generator=gen)).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (3, 9), generator=gen)
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[2, 6:] = IGNORE_INDEX  # padding
    return logits, labels


def _plain(logits, labels):
    flat = logits[:, :-1].flatten(0, 1).float()
    return F.cross_entropy(flat, labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def test_loss_and_gradients_equal_the_full_fp32_cross_entropy(monkeypatch):
    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", 5 * 50)  # 5 rows a chunk: several chunks and a short last one
    for dtype in (torch.float32, torch.bfloat16):
        logits, labels = _batch(dtype)
        total, n = next_token_loss_sum(logits, labels)
        (grad,) = torch.autograd.grad(total, logits)
        expected = _plain(logits, labels)
        (expected_grad,) = torch.autograd.grad(expected, logits)
        assert int(n) == int((labels[:, 1:] != IGNORE_INDEX).sum()) == 18
        assert total.dtype == torch.float32 and abs(float(total - expected)) <= 1e-4
        assert torch.equal(grad, expected_grad) if dtype == torch.bfloat16 else torch.allclose(grad, expected_grad, atol=1e-7)


def test_backward_keeps_no_fp32_copy_of_the_logits():
    """With gradients on, what the loss saves for backward is the labelled rows in the logits' dtype, not an fp32
    log-softmax of every position (the plain computation's)."""
    logits, labels = _batch(torch.bfloat16, vocab=4096)
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        next_token_loss_sum(logits, labels)
    ours = sum(saved.values())
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _plain(logits, labels)
    assert ours <= 18 * 4096 * 2 + 1024  # the 18 labelled rows in bf16 (+ their indices)
    assert sum(saved.values()) >= 24 * 4096 * 4  # the plain loss: an fp32 log-softmax of all 3 x 8 positions


@pytest.mark.parametrize("labelled", [None, 0])
def test_no_labels_give_a_zero_that_backpropagates_zeros(labelled):
    """A process's stand-in row (`peftkit.distributed.shard`) has no label: its loss is 0, and its backward still
    reaches the logits (every parameter, which DDP's gradient reduction waits for) with zeros."""
    logits, labels = _batch(torch.float32)
    total, n = next_token_loss_sum(logits, torch.full_like(labels, IGNORE_INDEX), labelled)
    assert float(total) == 0.0 and int(n) == 0
    total.backward()
    assert logits.grad is not None and not logits.grad.any()


def test_under_mixed_precision_the_model_returns_its_logits_in_autocast_dtype(tiny_llama):
    """accelerate's prepare (native bf16 autocast, here on the CPU) would hand the loss fp32 logits, a full-size
    copy; after `autocast_only` the forward still runs under autocast (fp32 weights, bf16 logits, the values of
    an autocast forward) and the logits stay bf16."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import AutoModelForCausalLM

    from peftkit.distributed import autocast_only

    ids = torch.tensor([[1, 40, 41, 42, 7]])
    try:
        AcceleratorState._reset_state()
        accelerator = Accelerator(cpu=True, mixed_precision="bf16")
        model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
        with torch.autocast("cpu", torch.bfloat16):
            expected = model(input_ids=ids).logits
        model = accelerator.prepare(model)
        assert model(input_ids=ids).logits.dtype == torch.float32  # accelerate's conversion, which this undoes
        autocast_only(accelerator, model)
        logits = model(input_ids=ids).logits
    finally:
        AcceleratorState._reset_state()
    assert logits.dtype == torch.bfloat16 and torch.equal(logits, expected)
    assert next(model.parameters()).dtype == torch.float32


def test_logits_that_do_not_match_the_labels_are_refused():
    """The labelled rows are picked by flat (batch x time) position: logits of other positions (a method that
    prepended tokens and did not strip them) would give other rows' losses, so they are an error, not a number."""
    logits, labels = _batch(torch.float32)
    with pytest.raises(ValueError, match=r"logits of \(3, 8\) positions for labels of \(3, 9\)"):
        next_token_loss_sum(logits[:, 1:], labels)


def _head_widths(model, batch) -> tuple[list[int], torch.Tensor, list[torch.Tensor]]:
    """The positions the output head saw in `token_loss_sum`, its loss and the trainable parameters' gradients."""
    from peftkit.evaluate import token_loss_sum

    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[1]))
    try:
        loss, n = token_loss_sum(model, batch)
    finally:
        hook.remove()
    assert int(n) == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    params = [p for p in model.parameters() if p.requires_grad]
    return seen, loss, list(torch.autograd.grad(loss, params))


def test_the_head_computes_logits_from_the_first_position_the_loss_reads(tiny_llama):
    """The output head's logits before any row's first label are read by no loss: `token_loss_sum` asks the model
    for those from the position before it on (transformers' `logits_to_keep`), sparing the head's forward and
    backward over the prompts (a fifth of SmolLM2-135M's compute) and their batch x time x vocab logits. The loss
    and every gradient are the plain full-logits cross-entropy's. Where an adapter wraps the head, or the prompt
    family puts virtual tokens in front, the head sees every position."""
    from transformers import AutoModelForCausalLM

    from peftkit.adapters import inject_adapters
    from peftkit.loss import LOGITS_FROM, logits_from
    from peftkit.methods.lora import LoraConfig
    from peftkit.methods.prompt_tuning import PromptTuningConfig

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 60, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    labels = ids.clone()
    labels[0, :7] = IGNORE_INDEX  # prompts of 7 and 5 tokens, then padding
    labels[1, :5] = IGNORE_INDEX
    labels[1, 10:] = IGNORE_INDEX
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    assert logits_from(labels) == 4 and logits_from(torch.full_like(labels, IGNORE_INDEX)) == 0
    for cfg, width in [(None, 12 - 4), (LoraConfig(method="lora", r=2, target_modules=["q_proj", "lm_head"]), 12),
                       (PromptTuningConfig(method="prompt_tuning", num_virtual_tokens=3), 12 + 3)]:
        model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
        if cfg is None:
            model.requires_grad_(False)
            model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
        else:
            torch.manual_seed(1)
            inject_adapters(model, cfg)
        seen, loss, grads = _head_widths(model, batch)
        assert seen == [width], cfg
        if cfg is None:  # the reference: every position's logits, the plain cross-entropy
            logits = model(input_ids=ids, attention_mask=mask).logits
            expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                       ignore_index=IGNORE_INDEX, reduction="sum")
            (expected_grad,) = torch.autograd.grad(expected, [model.model.layers[0].mlp.up_proj.weight])
            assert abs(float(loss - expected)) <= 1e-5 and torch.allclose(grads[0], expected_grad, atol=1e-7)
            seen, _, _ = _head_widths(model, batch | {LOGITS_FROM: 3})  # as the caller counted it (on the CPU)
            assert seen == [12 - 3]
            _dpo_rows_read_the_trimmed_head(model, batch, logits.detach())


def _dpo_rows_read_the_trimmed_head(model, batch, logits) -> None:
    """DPO's and KTO's per-row log-likelihoods (`sequence_logps`) ask for the same positions: each row's sum is the
    full logits' (a hand-built gather of the labelled tokens' log-probabilities)."""
    from peftkit.preference import sequence_logps

    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[1]))
    with torch.no_grad():
        rows = sequence_logps(model, batch)
    hook.remove()
    targets = batch["labels"][:, 1:]
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    assert seen == [12 - 4] and torch.allclose(rows, (logps * (targets != IGNORE_INDEX)).sum(1), atol=1e-5)
