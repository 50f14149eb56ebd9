"""A prompt-family adapter's decoding where generate's KV cache goes stale (peftkit.whole_forwards): each token is the
one a forward of the whole sequence chooses, and a KV cache decodes the steps whose RoPE frequencies are those it was
filled with (`rotation_by_length`): under dynamic RoPE up to the original context, under longrope before the switch
and after one whole forward there. The reference is a forward of the whole sequence per new token, as the adapter
runs in training and evaluation."""

from __future__ import annotations

import pytest
import torch
import transformers

from peftkit.adapters import inject_adapters
from peftkit.decoding import Sampling, generate_ids
from peftkit.methods.multitask_prompt_tuning import MultitaskPromptTuningConfig
from peftkit.methods.prefix_tuning import PrefixTuningConfig
from peftkit.methods.prompt_tuning import PromptTuningConfig
from peftkit.rope_scaling import fresh_dynamic_rope, rotation_by_length
from peftkit.tiny import build_char_tokenizer
from tests.conftest import random_adapters

CONTEXT = 64  # the original context: dynamic RoPE's max_position_embeddings, longrope's original one
VIRTUAL = 8


def _tiny(rope: str, tok) -> torch.nn.Module:
    """A tiny Llama (or Phi-3) of 64 original positions: dynamic RoPE x4, or longrope with long factors up to 8."""
    arch, rope_type = ("phi3", "longrope") if rope == "longrope-phi3" else ("llama", rope)
    config_class, model_class = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                                 "phi3": ("Phi3Config", "Phi3ForCausalLM")}[arch]
    parameters = {"rope_type": "dynamic", "factor": 4.0} if rope_type == "dynamic" else {
        "rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.0, 2.0, 4.0, 8.0],
        "original_max_position_embeddings": CONTEXT}
    original = {} if rope_type == "dynamic" else {"original_max_position_embeddings": CONTEXT}  # (Phi-3's: 4096)
    torch.manual_seed(0)
    return getattr(transformers, model_class)(getattr(transformers, config_class)(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=CONTEXT if rope_type == "dynamic" else 4 * CONTEXT,
        initializer_range=0.1, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **original,
        rope_parameters={"rope_theta": 10000.0} | parameters)).eval()


def _with_adapter(rope: str, method: str, tok, **settings) -> torch.nn.Module:
    model = _tiny(rope, tok)
    config = {"prompt_tuning": PromptTuningConfig, "prefix_tuning": PrefixTuningConfig,
              "multitask_prompt_tuning": MultitaskPromptTuningConfig}[method]
    torch.manual_seed(0)
    inject_adapters(model, config(method=method, num_virtual_tokens=VIRTUAL, **settings))
    random_adapters(model, seed=1, std=0.3)
    return model


def _by_whole_forwards(model, prompts: list[list[int]], pad: int, steps: int, temperature: float = 0.0,
                       tasks: list[int] | None = None) -> list:
    """Each left-padded row's `steps` new tokens, each from a forward of the whole sequence (no cache), greedy or
    sampled at `temperature` from the softmax (torch's RNG, as seeded by the caller); `tasks`: each row's task id."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    extra = {"task_ids": torch.tensor(tasks)} if tasks else {}
    with torch.no_grad(), fresh_dynamic_rope(model):
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits[:, -1].float()
            new = torch.multinomial((logits / temperature).softmax(-1), 1)[:, 0] if temperature else logits.argmax(-1)
            ids, mask = torch.cat([ids, new[:, None]], 1), torch.cat([mask, torch.ones_like(new)[:, None]], 1)
    return ids[:, width:].tolist()


def _cut(row: list[int], stops: set[int]) -> list[int]:
    return row[:next((i for i, t in enumerate(row) if t in stops), len(row))]


@pytest.mark.parametrize("rope", ["dynamic", "longrope"])
def test_forwards_of_one_rotation_rotate_alike(rope):
    """transformers' rotary embedding, asked for the positions of sequences of growing length as decoding asks
    (53 to 75 positions), gives the same cos/sin to the positions they share exactly where `rotation_by_length` says
    the lengths rotate alike: dynamic RoPE up to the 64 positions and never again past them, longrope up to them and
    past them."""
    model = _tiny(rope, build_char_tokenizer())
    rotation, rotary = rotation_by_length(model), model.model.rotary_emb
    x = torch.zeros(1, 1, 8)
    with torch.no_grad(), fresh_dynamic_rope(model):
        cos = {n: rotary(x, torch.arange(n)[None])[0][0, :50] for n in range(53, 76)}
    alike = {(a, b): torch.equal(cos[a], cos[b]) for a in cos for b in cos}
    assert alike == {(a, b): rotation(a) == rotation(b) for a in cos for b in cos}
    assert rotation(64) == rotation(53) and rotation(65) != rotation(64)
    assert (rotation(66) == rotation(65)) == (rope == "longrope")


@pytest.mark.parametrize(("rope", "method"), [("dynamic", "prompt_tuning"), ("dynamic", "prefix_tuning"),
                                              ("longrope", "prompt_tuning"), ("longrope", "prefix_tuning"),
                                              ("longrope-phi3", "prompt_tuning")])
def test_an_answer_across_the_switch_is_that_of_whole_forwards_from_fewer_of_them(rope, method):
    """8 virtual tokens and a 40-token prompt start within the 64 positions; 44 new tokens cross them. The answer is
    the one a forward of the whole sequence per token gives, greedy and sampled (one seed), and it took fewer such
    forwards than its 44 (a KV cache decoded the rest): under dynamic RoPE one and then one per step past the 64
    positions (the 17th step's on, 28), under longrope one and one at the switch (2)."""
    tok = build_char_tokenizer()
    model = _with_adapter(rope, method, tok)
    prompt = torch.randint(4, 90, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    whole = []
    hook = model.register_forward_pre_hook(  # (before the adapter's own hook, which edits the inputs)
        lambda _, args, kwargs: whole.append(kwargs["input_ids"].shape[1] > 1), with_kwargs=True, prepend=True)
    with torch.no_grad():
        got = generate_ids(model, tok, [prompt], Sampling(max_new_tokens=44))[0]
    hook.remove()
    assert len(got) == 44 and got == _by_whole_forwards(model, [prompt], tok.pad_token_id, 44)[0]
    past = sum(VIRTUAL + 40 + step > CONTEXT for step in range(44))  # the steps past the context: 27
    assert len(whole) == 44 and sum(whole) == (1 + past if rope == "dynamic" else 2)
    torch.manual_seed(5)
    sampled = generate_ids(model, tok, [prompt], Sampling(max_new_tokens=44, temperature=1.5))[0]
    torch.manual_seed(5)
    reference = _by_whole_forwards(model, [prompt], tok.pad_token_id, 44, temperature=1.5)[0]
    assert sampled == _cut(reference, {tok.eos_token_id}) and len(sampled) > 20


def test_a_left_padded_batch_answers_as_whole_forwards_across_the_switch():
    """Beside a 40-token prompt whose answer crosses longrope's switch, a 30-token one left-padded to its length: the
    cached steps give each row the positions a whole forward gives it (the mask's running count after the virtual
    tokens), so both answers are those of whole forwards of the padded batch."""
    tok = build_char_tokenizer()
    model = _with_adapter("longrope", "prompt_tuning", tok)
    prompt = torch.randint(4, 90, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    prompts = [prompt, prompt[-30:]]
    got = generate_ids(model, tok, prompts, Sampling(max_new_tokens=30))
    reference = _by_whole_forwards(model, prompts, tok.pad_token_id, 30)
    assert got == [_cut(r, {tok.eos_token_id}) for r in reference] and got[0] != got[1]


def test_multitask_prompt_tuning_rows_keep_their_tasks_across_the_switch():
    """Multitask prompt tuning's rows of tasks 2 and 1 (their prompts scaled apart): the steps over the cache and the
    whole forward at longrope's switch each take the rows' task ids, and the answers are those of whole forwards
    given them."""
    tok = build_char_tokenizer()
    model = _with_adapter("longrope", "multitask_prompt_tuning", tok, num_tasks=3, num_ranks=2)
    with torch.no_grad():  # the task factors away from their near-identity start
        for p in model.peftkit_virtual.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.3)
    prompt = torch.randint(4, 90, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    got = generate_ids(model, tok, [prompt, prompt], Sampling(max_new_tokens=44), tasks=[2, 1])
    reference = _by_whole_forwards(model, [prompt, prompt], tok.pad_token_id, 44, tasks=[2, 1])
    assert got == [_cut(r, {tok.eos_token_id}) for r in reference] and got[0] != got[1]
