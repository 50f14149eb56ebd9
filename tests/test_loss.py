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


# ---------------------------------------------------------------- the trimmed head under each feature (exact)

HEAD_IDS = torch.tensor([[1, 5, 9, 4, 7, 3, 8, 2, 6, 4],
                         [6, 2, 8, 1, 4, 9, 5, 7, 0, 0],
                         [3, 5, 9, 6, 8, 6, 4, 0, 0, 0]])
"""Rows with prompts of 3, 6 and 5 tokens (the head's logits from position 2 on), two of them padded; aLoRA's
invocation [5, 9] in the first and last row's prompt."""


def _head_batch() -> dict[str, torch.Tensor]:
    mask = (torch.arange(10) < torch.tensor([[10], [8], [7]])).long()
    labels = HEAD_IDS.masked_fill(mask == 0, IGNORE_INDEX)
    for row, prompt in enumerate((3, 6, 5)):
        labels[row, :prompt] = IGNORE_INDEX
    return {"input_ids": HEAD_IDS, "attention_mask": mask, "labels": labels}


@pytest.fixture(scope="module")
def head_models(tmp_path_factory) -> dict[str, object]:
    from peftkit.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("head-models")
    for arch in ("llama", "qwen2", "gpt2", "gemma2", "gemma3", "mixtral", "qwen2_moe"):
        build_tiny_model(root / arch, arch=arch, hidden_size=32, num_layers=2, seed=0)
    return {arch: root / arch for arch in ("llama", "qwen2", "gpt2", "gemma2", "gemma3", "mixtral", "qwen2_moe")}


def _adapted(path, cfg=None, before=None, after=None):
    """A builder of the model at `path` (fp32) with `cfg`'s adapter (LoRA r 4 on every linear layer by default) far
    from its init; `before(model)` runs before the injection, `after(model)` after."""
    from transformers import AutoModelForCausalLM

    from peftkit.adapters import inject_adapters
    from peftkit.methods.lora import LoraConfig
    from tests.conftest import random_adapters

    def build():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        if before is not None:
            before(model)
        torch.manual_seed(0)
        inject_adapters(model, cfg or LoraConfig(r=4, alpha=8))
        random_adapters(model, seed=1, std=0.1)
        if after is not None:
            after(model)
        return model
    return build


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gemma2", "gemma3", "mixtral", "qwen2_moe"])
def test_the_trimmed_head_trains_as_the_full_one_on_each_architecture(arch, head_models, monkeypatch):
    """Every tiny architecture's forward takes logits_to_keep in this transformers (GPT-2's Conv1D model too), and
    its training micro-batch with the head trimmed is bit for bit the full head's: Qwen2's and Gemma's heads tied to
    their embeddings, Gemma's soft-capped logits (Gemma 3's cap set here: its config has none by default), the
    mixtures of experts' routing (the router sees every position whatever the head does; peftkit's loss adds no
    router auxiliary loss)."""
    from tests.conftest import trimming_changes_nothing

    def softcapped(model):
        if arch.startswith("gemma"):
            model.config.final_logit_softcapping = model.config.final_logit_softcapping or 30.0

    trimmed, full = trimming_changes_nothing(_adapted(head_models[arch], before=softcapped), _head_batch(), monkeypatch)
    assert (trimmed, full) == ([8], [10])


@pytest.mark.parametrize("kind", ["dpo", "ipo", "orpo", "simpo", "kto"])
def test_preference_losses_train_the_same_with_the_head_trimmed(kind, tiny_llama, monkeypatch):
    """DPO's (sigmoid and IPO), ORPO's, SimPO's and KTO's per-row log-likelihoods (`sequence_logps`) of a batch of
    two pairs (a shared prompt each, answers of other lengths) with the head trimmed: the loss and gradients are the
    full head's within float rounding, 1e-5 of each tensor's largest value (measured: DPO's loss 2.4e-7 apart of
    2.68, gradients at most 9.4e-7 of their largest, KTO's): `row_logps` sums each row's log-probabilities along the
    kept width (6 positions, not 8), which torch's vectorised sum adds in another order. (KTO's rows are an example
    and its mismatched one, as its batches hold them.)"""
    from peftkit.kto import KTOLoss
    from peftkit.preference import PreferenceLoss
    from tests.conftest import trimming_changes_nothing

    ids = torch.tensor([[1, 5, 9, 4, 7, 3, 8, 2], [1, 5, 9, 4, 6, 2, 0, 0],
                        [3, 7, 2, 5, 8, 6, 4, 0], [3, 7, 2, 5, 9, 0, 0, 0]])
    mask = (ids != 0).long()
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:2, :4] = IGNORE_INDEX
    labels[2:, :4] = IGNORE_INDEX
    labels[:, :3] = IGNORE_INDEX
    labels[0, 3] = 4  # the first pair's chosen answer starts a token earlier: the head from position 2
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels,
             "reference_logps": torch.tensor([-9.0, -7.5, -8.0, -6.0])}
    if kind == "kto":
        loss, batch["desirable"] = KTOLoss(beta=0.1), torch.tensor([True, True, False, False])
    else:
        loss = {"dpo": PreferenceLoss(0.1), "ipo": PreferenceLoss(0.1, "ipo"), "orpo": PreferenceLoss(0.1, "orpo"),
                "simpo": PreferenceLoss(2.0, "simpo", 0.5)}[kind]
    trimmed, full = trimming_changes_nothing(_adapted(tiny_llama), batch, monkeypatch, loss, exact=False)
    assert (trimmed, full) == ([6], [8])


def _packed_batch() -> dict[str, torch.Tensor]:
    """data.packing's rows: two examples in the first (their position ids from 0 each, the second's first label
    masked), one and padding in the second; no attention mask goes to the model."""
    ids = torch.tensor([[1, 5, 9, 4, 7, 1, 8, 2, 6, 4], [1, 2, 8, 6, 4, 9, 5, 7, 0, 0]])
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7, 0, 0]])
    mask = (torch.arange(10) < torch.tensor([[10], [8]])).long()
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[0, :3], labels[0, 5:7], labels[1, :6] = IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": labels}


def test_features_train_the_same_with_the_head_trimmed(tiny_llama, monkeypatch):
    """The trimmed head's micro-batch is bit for bit the full head's under NEFTune's noise (torch's generator seeded
    alike), gradient checkpointing (non-reentrant, as peftkit turns it on), LongLoRA's S²-Attn (groups of 4 tokens),
    data.packing's rows (position ids, no mask) and the flattened row flash attention takes (`flatten`: one row with
    the examples' boundaries; here through SDPA, which finds them from the position ids: flash attention itself needs
    a GPU), aLoRA (its invocation in two rows' prompts), LoRA beside a head trained whole (modules_to_save:
    lm_head, whose weight's gradient sums over the positions it saw), and a bf16 base (bf16 logits) with its fp32
    adapter."""
    from peftkit import neftune
    from peftkit.data.packing import flatten
    from peftkit.long_context import enable_s2_attention
    from peftkit.methods.lora import LoraConfig
    from peftkit.modeling import prepare_for_training
    from tests.conftest import trimming_changes_nothing

    batch = _head_batch()
    for name, build, on, width in [
            ("neftune", _adapted(tiny_llama, after=lambda m: neftune.attach(m, 5.0)), batch, 8),
            ("checkpointing", _adapted(tiny_llama, after=lambda m: prepare_for_training(m, True)), batch, 8),
            ("s2-attention", _adapted(tiny_llama, after=lambda m: enable_s2_attention(m, 4)), batch, 8),
            ("packing", _adapted(tiny_llama), _packed_batch(), 10 - 2),
            ("flattened", _adapted(tiny_llama), flatten(_packed_batch()), 18 - 2),
            ("alora", _adapted(tiny_llama, LoraConfig(r=4, alpha=8, alora_invocation_tokens=[5, 9],
                                                      target_modules=["q_proj", "v_proj", "down_proj"])), batch, 8),
            ("trained head", _adapted(tiny_llama, LoraConfig(r=4, alpha=8, modules_to_save=["lm_head"])), batch, 8),
            ("bf16 base", _adapted(tiny_llama, before=lambda m: m.to(torch.bfloat16)), batch, 8)]:
        trimmed, full = trimming_changes_nothing(build, on, monkeypatch)
        assert trimmed == [width] and full == [on["input_ids"].shape[1]], name


def test_shadow_xlora_and_new_tokens_train_the_same_with_the_head_trimmed(tiny_llama, head_models, tmp_path,
                                                                           monkeypatch):
    """ShadowPEFT's step (its auxiliary loss, `ShadowTrainer.batch_loss`, reads the base head on its shadow state of
    every position: untouched by the trimming) and X-LoRA's (its scalings pass gets the forward's logits_to_keep
    with the rest of its keywords; the classifier reads the last hidden state, every position) are bit for bit the
    full head's. model.add_tokens (LoRA's trainable_token_indices) wraps the head, untied (lm_head's own rows) or
    tied (Qwen2's: the embeddings' rows, which the head follows), so the head keeps every position there."""
    from peft import LoraConfig as PeftLoraConfig
    from transformers import AutoModelForCausalLM

    from peftkit.evaluate import token_loss_sum
    from peftkit.methods import method_of
    from peftkit.methods.lora import LoraConfig
    from peftkit.methods.shadow import ShadowConfig
    from peftkit.methods.xlora import XLoraConfig
    from peftkit.new_tokens import resize, with_new_rows
    from tests.conftest import save_peft_lora, trimming_changes_nothing

    batch = _head_batch()
    shadow = ShadowConfig(method="shadow", r=4)
    trainer = {}

    def with_aux(model, on, labelled):
        trainer.setdefault(id(model), method_of(shadow).trainer(model, shadow, 1))
        loss, _ = token_loss_sum(model, on, labelled)
        return loss + trainer[id(model)].batch_loss(on, labelled)

    trimmed, full = trimming_changes_nothing(_adapted(tiny_llama, shadow), batch, monkeypatch, with_aux)
    assert (trimmed, full) == ([8, 10], [10, 10])  # (the model's head, then the auxiliary loss's on s0)
    first = PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    second = PeftLoraConfig(r=2, lora_alpha=4, target_modules=["v_proj", "down_proj"])
    experts = {"0": str(save_peft_lora(tiny_llama, tmp_path / "0", first)),
               "1": str(save_peft_lora(tiny_llama, tmp_path / "1", second, seed=1))}
    xlora = XLoraConfig(method="xlora", adapters=experts, hidden_size=32)
    assert trimming_changes_nothing(_adapted(tiny_llama, xlora), batch, monkeypatch) == ([8, 8], [10, 10])

    new = batch | {"input_ids": batch["input_ids"].clone(), "labels": batch["labels"].clone()}
    new["input_ids"][0, 5:7] = new["labels"][0, 5:7] = torch.tensor([102, 103])  # the new tokens, trained
    for arch in ("llama", "qwen2"):
        model = AutoModelForCausalLM.from_pretrained(head_models[arch], dtype=torch.float32)
        resize(model, 104)
        cfg = with_new_rows(LoraConfig(r=4, alpha=8), model, [102, 103])
        assert cfg.trainable_token_indices == ({"model.embed_tokens": [102, 103], "lm_head": [102, 103]}
                                               if arch == "llama" else [102, 103])  # (a tied head follows)
        trimmed, full = trimming_changes_nothing(_adapted(head_models[arch], cfg, before=lambda m: resize(m, 104)),
                                                 new, monkeypatch)
        assert (trimmed, full) == ([10], [10]), arch


LORA_VARIANTS = {  # (LoRA's settings, the tiny architecture, the positions the head sees)
    "dropout": ({"dropout": 0.1}, "llama", 8),
    "dora-dropout": ({"use_dora": True, "dropout": 0.1}, "llama", 8),
    "kasa": ({"target_modules": ["q_proj", "down_proj"], "kasa_config": {"beta": 0.01, "gamma": 0.02}}, "llama", 8),
    "velora": ({"target_modules": ["q_proj", "v_proj", "down_proj"], "velora_config": {"num_groups": 5}}, "llama", 8),
    # VeLoRA's embed is the mean over the forward's tokens: on the head it would see other tokens, so it keeps all
    "velora-head": ({"target_modules": ["q_proj", "lm_head"], "velora_config": {"num_groups": 5}}, "llama", 10),
    "bdlora": ({"target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"],
                "use_bdlora": {"target_modules_bd_a": ["o_proj", "down_proj"],
                               "target_modules_bd_b": ["q_proj", "v_proj"], "nblocks": 2}}, "llama", 8),
    "layer-replication": ({"layer_replication": [[0, 2], [1, 2]]}, "llama", 8),
    "target-parameters": ({"target_modules": ["q_proj"], "target_parameters": ["experts.gate_up_proj",
                                                                            "experts.down_proj"]}, "mixtral", 8),
}


@pytest.mark.parametrize("variant", LORA_VARIANTS)
def test_lora_variants_train_the_same_with_the_head_trimmed(variant, head_models, monkeypatch):
    """LoRA's variants, each bit for bit with the head trimmed as with the full head: dropout's masks (torch's
    generator seeded alike: the head draws none, so the draws are the same), DoRA's, KaSA, VeLoRA in the layers
    (its batch_average embed from every token of the layer's input, which the trimming leaves whole) and on the head
    (wrapped: every position), BD-LoRA, layer_replication and LoRA on a mixture's fused expert parameters."""
    from peftkit.methods.lora import LoraConfig
    from tests.conftest import trimming_changes_nothing

    settings, arch, width = LORA_VARIANTS[variant]
    build = _adapted(head_models[arch], LoraConfig(r=4, alpha=8, **settings))
    assert trimming_changes_nothing(build, _head_batch(), monkeypatch) == ([width], [10])
