"""The decoding that `peftkit generate`, `peftkit chat`, `peftkit eval` and training's samples share.

Greedy by default (`temperature: 0`); sampling with a temperature (and top-p, top-k, min-p cuts) is seeded.
Decoding goes through transformers' `generate` with its KV cache, batched with left padding (the attention mask then
keeps the pads out of attention, and the position ids start at each prompt's first real token); it stops at the
tokenizer's EOS or the model's own end-of-turn tokens, or at a stop string (--stop), which the text is cut before.
Under dynamic RoPE past the original context it decodes without the cache, as under longrope past it where generate
keeps the keys its short factors rotated (`stale_cache_past_context`); a prompt-family adapter, whose virtual tokens
come in a cache generate keeps, then decodes by forwards of its own (`peftkit.whole_forwards`). It batches a prompt
whose answer passes that context (or longrope's) only with prompts of its own length (`longest_padded`). The test
reference is cache-free greedy decoding — one full forward of the whole sequence per new token — which `peftkit
generate` must match token for token, batched or not.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from peftkit.data.prompts import Prompt
from peftkit.errors import PeftkitError, PeftkitWarning
from peftkit.methods.task_routing import generation_tasks
from peftkit.methods.virtual import generation_inputs, text_config, virtual_tokens
from peftkit.rope_scaling import batch_scaled_context, fresh_dynamic_rope, learned_positions, stale_cache_past_context
from peftkit.whole_forwards import whole_forwards


MIN_TEMPERATURE = 1e-5
"""The lowest sampling temperature taken: below it sampling is greedy decoding in all but name, and far below it
(1e-45) the logits divided by it overflow."""


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0
    """0: greedy (the most likely token each step); above 0, sampled from the softened distribution."""
    top_p: float = 1.0
    """Sample only from the smallest set of tokens whose probabilities add up to top_p."""
    seed: int = 0
    top_k: int = 0
    """Sample only from the top_k most likely tokens; 0: no cut."""
    min_p: float = 0.0
    """Sample only from tokens at least min_p times as likely as the most likely one (transformers' min_p); 0: no
    cut."""
    repetition_penalty: float = 1.0
    """Above 1, each token the prompt or the answer holds already has its logit divided by it (multiplied, when
    negative: CTRL's penalty, transformers' repetition_penalty), under greedy decoding too; 1: none."""
    stop: tuple[str, ...] = ()
    """Stop strings: an answer ends before the first of them its text holds (greedy decoding too)."""

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise PeftkitError(f"--max-new-tokens {self.max_new_tokens}: must be at least 1.")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise PeftkitError(f"--temperature {self.temperature}: must be a number >= 0 (0 = greedy).")
        if 0 < self.temperature < MIN_TEMPERATURE:  # the logits divided by 1e-45 are inf, and sampling fails
            raise PeftkitError(f"--temperature {self.temperature}: too small to sample with; use 0 for greedy "
                               f"decoding, or at least {MIN_TEMPERATURE:g}.")
        if not (0 < self.top_p <= 1):
            raise PeftkitError(f"--top-p {self.top_p}: must be in (0, 1] (1 = no cut).")
        if self.top_k < 0:
            raise PeftkitError(f"--top-k {self.top_k}: must be an integer >= 0 (0 = no cut).")
        if not (0 <= self.min_p <= 1):
            raise PeftkitError(f"--min-p {self.min_p}: must be in [0, 1] (0 = no cut).")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise PeftkitError(f"--repetition-penalty {self.repetition_penalty}: must be a number > 0 (1 = none; "
                               "above 1 discourages repeating a token, e.g. 1.1).")
        if "" in self.stop:
            raise PeftkitError("--stop '': an empty stop string would end every answer before its first token; give "
                               "the text to stop at.")
        if not -(2**63) <= self.seed < 2**64:  # torch.manual_seed's range
            raise PeftkitError(f"--seed {self.seed}: must be an integer from -2**63 to 2**64 - 1.")
        ignored = [f for f, given in (("--top-p", self.top_p != 1), ("--top-k", self.top_k != 0),
                                      ("--min-p", self.min_p != 0), ("--seed", self.seed != 0)) if given]
        if self.temperature == 0 and ignored:
            named = ", ".join(ignored[:-1]) + " and " + ignored[-1] if len(ignored) > 1 else ignored[0]
            warnings.warn(f"{named} {'change' if len(ignored) > 1 else 'changes'} nothing under greedy decoding "
                          "(--temperature 0, the default); add --temperature, e.g. 0.7, to sample.",
                          PeftkitWarning, stacklevel=2)

    def options(self) -> dict:
        """The GenerationConfig fields these settings give (none set to its off value, so that the defaults decode
        as transformers' own defaults do). The repetition penalty applies to greedy decoding too."""
        penalty = {"repetition_penalty": self.repetition_penalty} if self.repetition_penalty != 1 else {}
        if self.temperature == 0:
            return penalty
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k} | (
            {"min_p": self.min_p} if self.min_p else {}) | penalty


def stop_token_ids(model: nn.Module, tok, texts: tuple[str, ...] = ()) -> list[int]:
    """The tokenizer's EOS and the model's own end tokens (a chat model's end-of-turn, from generation_config), then
    the token its chat template closes an assistant turn with, where that is another: a base model's config names its
    EOS only (Llama 3's `<|end_of_text|>`), and a chat fine-tune of it learns to stop at the template's `<|eot_id|>`.
    Then the special tokens that stop strings (`texts`, --stop) name: decoding drops them, so `--stop '<|im_end|>'`
    would never be found in an answer's text."""
    from peftkit.data.conversations import turn_end_token

    ids = [tok.eos_token_id]
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += config_eos if isinstance(config_eos, list) else [config_eos]
    stops = sorted({i for i in ids if i is not None})
    turn_end = turn_end_token(tok)
    stops += [turn_end] if turn_end is not None and turn_end not in stops else []
    special = {token.content: i for i, token in getattr(tok, "added_tokens_decoder", {}).items() if token.special}
    return stops + [special[t] for t in dict.fromkeys(texts) if t in special and special[t] not in stops]


OWN_TOKENS = ("bos", "eos", "unk", "pad", "sep", "cls", "mask")
"""The tokenizer's own special tokens (`tok.bos_token_id`, ...), which no answer is made of (`marked_text`)."""


def marked_text(tok, ids: list[int], **decoding) -> str:
    """`ids` as text with the special tokens a model writes as part of its answer, `model.add_tokens`' markers
    (`<calc>8+3</calc> eleven`), which `skip_special_tokens` drops, and without the tokenizer's own (BOS, EOS,
    unknown, padding...). `decoding`: more `tok.decode` arguments."""
    own = {getattr(tok, f"{name}_token_id", None) for name in OWN_TOKENS}
    return tok.decode([t for t in ids if t not in own], skip_special_tokens=False, **decoding)


class TooLong(PeftkitError):
    """A sequence longer than the positions the model covers (`check_room`)."""


def check_room(model: nn.Module, tokens: int, what: str, new_tokens: int = 0, fix: str = "") -> None:
    """A TooLong error when `tokens` (of `what`: "longest prompt"), the adapter's virtual tokens in front and
    `new_tokens` to generate need more positions than a model with learned positions has: past them its position
    lookup fails."""
    covered = learned_positions(model.config)  # a RoPE model runs past its positions: generation and eval allow it
    virtual = getattr(virtual_tokens(model), "num_virtual_tokens", 0)
    if covered is None or tokens + virtual + new_tokens <= covered:
        return
    parts = [f"{tokens} tokens"] + ([f"the adapter's {virtual} virtual tokens"] if virtual else []) + (
        [f"{new_tokens} new tokens (max_new_tokens)"] if new_tokens else [])
    need = f"has {tokens} tokens" if len(parts) == 1 else f"needs {' + '.join(parts)} = {tokens + virtual + new_tokens}"
    raise TooLong(f"The {what} {need}, more than the {covered} positions this {model.config.model_type} "
                  f"model has (learned ones, which cannot be scaled). {fix}".strip())


def generate_ids(model: nn.Module, tok, prompts: list[list[int]], sampling: Sampling, streamer=None,
                 tasks: list[int | None] | None = None,
                 decode: Callable[[list[int]], str] | None = None) -> list[list[int]]:
    """New token ids for each prompt of one batch (left-padded), each cut before its first stop token. `tasks`:
    each prompt's task id, for a multitask prompt tuning or Poly model (`peftkit.task_ids`; none: task 0). With stop
    strings (`sampling.stop`), a row ends at the token that completes one in its text as `decode` gives it (default:
    `generate_texts`'), which the caller cuts there (`cut_at_stop`)."""
    from transformers import GenerationConfig

    if empty := sum(not p for p in prompts):
        raise PeftkitError(f"{empty} prompt{'s have' if empty > 1 else ' has'} no tokens (an empty text, and a "
                           "tokenizer that adds no BOS token): there is nothing to generate from. Give each prompt "
                           "text.")
    check_room(model, max(len(p) for p in prompts), "longest prompt", sampling.max_new_tokens,
               "Shorten the prompt, or lower max_new_tokens.")
    stops = stop_token_ids(model, tok, sampling.stop)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    task_ids = torch.tensor(tasks, device=device) if tasks and None not in tasks else None
    # Dynamic RoPE past the original context decodes without a KV cache (a forward of the whole sequence per token,
    # as evaluation scores it): cached keys were rotated by a shorter sequence's frequencies; so does longrope past it
    # where generate keeps the keys the short factors rotated (all but Phi-3's family). A prompt-family adapter's
    # virtual tokens take the first positions.
    virtual = virtual_tokens(model)
    positions = getattr(virtual, "num_virtual_tokens", 0) + width + sampling.max_new_tokens
    stale = stale_cache_past_context(model, positions, prefilled=virtual is not None)
    # A prompt-family adapter adds its cache of virtual tokens and the mask with them in front
    # (peftkit.methods.virtual), a cache generate would keep: where it goes stale, the tokens forwards of the whole
    # sequence choose decode (`peftkit.whole_forwards`, with a cache of its own where the RoPE frequencies hold).
    whole = virtual is not None and stale
    extra = generation_inputs(model, mask, task_ids) if not whole else {}
    inputs = {"input_ids": ids, "attention_mask": mask} | extra
    config = GenerationConfig(max_new_tokens=sampling.max_new_tokens, do_sample=sampling.temperature > 0,
                              pad_token_id=pad, eos_token_id=stops, use_cache=not stale, **sampling.options())
    decode = decode or (lambda ids: tok.decode(ids, skip_special_tokens=True))
    ends = [_StopAtText(sampling.stop, width, set(stops), decode)] if sampling.stop else None
    # Dynamic RoPE starts from the model's own frequencies, as a fresh model's generate does: transformers keeps those
    # of the longest sequence seen until a forward shorter than the original context comes, so a prompt past it was
    # answered with the frequencies of the batch before (or of the loss batches `peftkit eval` runs first).
    # Layers that read task ids (Poly) get each row's for every step (`generation_tasks`).
    with torch.no_grad(), _without_model_defaults(model), fresh_dynamic_rope(model), generation_tasks(model, task_ids):
        if whole:
            reads = task_ids is not None and virtual.method.reads_task_ids
            out = whole_forwards(model, ids, mask, sampling, stops, pad, streamer, ends, task_ids if reads else None)
        else:
            out = model.generate(**inputs, generation_config=config, streamer=streamer,
                                 logits_processor=_penalty_past_pads(model, sampling, prompts, width),
                                 stopping_criteria=ends)
    completions = []
    for r, row in enumerate(out[:, width:].tolist()):
        row = row[:next((i for i, t in enumerate(row) if t in stops), len(row))]
        if ends:  # a row done at a stop string went on with pads: up to the token that completed it
            row = row[:ends[0].ends.get(r, len(row))]
        completions.append(row)
    return completions


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """`text` up to the first stop string it holds (`Sampling.stop`), without it."""
    return text[:min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))]


def blank_answer(text: str) -> str | None:
    """What is shown for an answer with nothing to see, None for one with text: an empty answer said to be one, and a
    whitespace-only one (an instruct model's newline given a prompt outside its chat template) as its characters,
    where a blank line read as if the command had failed."""
    if text.strip():
        return None
    if not text:
        return "(an empty answer)"
    n = len(text)
    return f"(an answer of {n} whitespace character{'s' * (n != 1)} only: {text[:12]!r}{'...' * (n > 12)})"


def _holds(text: str, stop: tuple[str, ...]) -> bool:
    return any(s in text for s in stop)


class _StopAtText:
    """A stopping criterion of `generate`: each row is done once the text of its answer holds a stop string.
    transformers' own `stop_strings` is not used: it matches the string's tokens at the end of the whole sequence,
    so it stopped an answer whose first tokens complete a string the prompt began (--stop 9P after a prompt ending
    in 9: the answer 'P'), and it reads the special tokens that decoding skips as text (an answer '`<unk>^m', shown
    as '`^m', never stopped at '`^m'); and it leaves the stop string in the answer.

    Each step decodes only the end of each answer: decoding the whole of it every step cost time growing with the
    square of its length (2,000 new tokens from a tiny model: twice the time without --stop). A stop string that the
    newest token completes ends in that token's text, so it lies in a window of the last tokens whose text reaches
    `reach` characters (the longest stop string and 8 more) before that token's: the window grows until it does,
    over special tokens that decode to nothing too. Its first few characters may read otherwise than in the whole
    answer (a leading space the tokenizer strips, a UTF-8 character split between tokens, spaces cleaned up before
    punctuation), but they lie before any such match. A match the window shows is checked on the whole answer's
    text, so a row never ends where that text holds no stop string; `ends` keeps each such row's answer length."""

    def __init__(self, stop: tuple[str, ...], width: int, end_tokens: set[int], decode: Callable[[list[int]], str]):
        self.stop, self.width, self.end_tokens, self.decode = stop, width, end_tokens, decode
        self.reach = max(map(len, stop)) + 8
        self.ends: dict[int, int] = {}  # row -> the answer's length at the token that completed a stop string
        self.over: set[int] = set()  # rows ended by an end token, which go on with pads

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        answers = input_ids[:, self.width:]
        for i, tail in enumerate(answers[:, -(self.reach + 1):].tolist()):  # (one copy from the device a step)
            if i in self.ends or i in self.over:
                continue
            if tail[-1] in self.end_tokens:
                self.over.add(i)
            elif self._completes(answers[i], tail):
                self.ends[i] = answers.shape[1]
        return torch.tensor([i in self.ends for i in range(len(answers))], device=input_ids.device)

    def _completes(self, answer: torch.Tensor, tail: list[int]) -> bool:
        """Whether the text of `answer` (its last tokens: `tail`) holds a stop string, found at its newest token."""
        newest = len(self.decode(tail[-1:]))
        window = self.decode(tail)
        while len(window) - newest < self.reach and len(tail) < len(answer):  # double it until it reaches
            tail = answer[-2 * len(tail):].tolist()
            window = self.decode(tail)
        if not _holds(window, self.stop):
            return False
        return len(tail) == len(answer) or _holds(self.decode(answer.tolist()), self.stop)  # (the whole text's word)


def _penalty_past_pads(model: nn.Module, sampling: Sampling, prompts: list[list[int]], width: int):
    """transformers' repetition penalty leaves out a left-padded row's pads, counted up to the attention mask's first
    1; a prompt-family adapter's mask starts with its virtual tokens' ones, so there the pads were penalized as tokens
    of the prompt: with the EOS as pad (a tokenizer without a pad token), a padded row's answer ran on past where it
    ends alone. The same processor, told each row's pad count, takes the place of the one transformers makes. None
    where transformers counts right, no row is padded or there is no penalty."""
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    pads = [width - len(p) for p in prompts]
    if sampling.repetition_penalty == 1 or not any(pads) or virtual_tokens(model) is None:
        return None
    return LogitsProcessorList([RepetitionPenaltyLogitsProcessor(  # (it moves the counts to the ids' device)
        sampling.repetition_penalty, prompt_ignore_length=torch.tensor(pads))])


@contextmanager
def _without_model_defaults(model: nn.Module) -> Iterator[None]:
    """transformers fills every field a generate() call leaves unset from the model's generation_config.json: a chat
    model's repetition_penalty, top_k, num_beams, no_repeat_ngram_size... would change greedy answers (and their
    scores). Here the call's own config and transformers' neutral defaults stand alone; the end tokens were read
    from the model's config before (`stop_token_ids`)."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


def length_batches(prompts: list[Prompt], batch_size: int, padded_up_to: int | None = None) -> list[list[int]]:
    """The prompts' indices in the batches `generate_texts` generates: sorted by length (equal lengths in their
    order), so that prompts of similar length share a batch and little padding is computed, then cut into runs
    of `batch_size`; `padded_up_to` (`longest_padded`): the longest prompt a padded batch holds, the longer ones
    cut wherever the length changes too, so that none of them is padded (0: no batch is)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].ids))
    def run_of(i: int) -> int:  # the shorter prompts share one run (-1), each longer length has its own
        n = len(prompts[i].ids)
        return n if padded_up_to is not None and n > padded_up_to else -1
    runs = [list(g) for _, g in itertools.groupby(order, key=run_of)]
    return [run[start:start + batch_size] for run in runs for start in range(0, len(run), batch_size)]


def longest_padded(model: nn.Module, prompts: list[Prompt], max_new_tokens: int,
                   unpadded: bool | None = None) -> int | None:
    """The longest prompt that `generate_texts` answers in a left-padded batch as it would alone (`length_batches`):
    none (0) where `unpadded` (default: where `padding_hides_virtual_tokens`); under dynamic RoPE (and longrope's
    choice of factors), those whose answers stay within the original context (`batch_scaled_context`), since
    transformers scales a batch's frequencies by its longest row, so a shorter row beside one past the context was
    answered with the longer's frequencies (the tiny 64-position Llama, dynamic x4, 44 new tokens: a 20-token prompt,
    which alone never leaves the context, answered otherwise beside a 56-token one); the longer ones share a batch
    only with prompts of their own length. None: any."""
    if unpadded is None:
        unpadded = padding_hides_virtual_tokens(model, prompts, max_new_tokens)
    if unpadded:
        return 0
    context = batch_scaled_context(model)
    if context is None:
        return None
    return max(context - max_new_tokens - getattr(virtual_tokens(model), "num_virtual_tokens", 0), 0)


def padding_hides_virtual_tokens(model: nn.Module, prompts: list[Prompt], max_new_tokens: int) -> bool:
    """Whether a left-padded batch would answer otherwise than each prompt alone: a prompt-family adapter's virtual
    tokens come before the pads, so in a sliding-window layer (Mistral, Gemma 2 and 3) the pads push them out of
    a padded row's window. Not when the whole of the longest answer fits in the window."""
    virtual = virtual_tokens(model)
    text = text_config(model.config)
    window, layer_types = getattr(text, "sliding_window", None), getattr(text, "layer_types", None)
    if virtual is None or not window or (layer_types is not None and "sliding_attention" not in layer_types):
        return False
    longest = max((len(p.ids) for p in prompts), default=0)
    return virtual.num_virtual_tokens + longest + max_new_tokens > window


def generate_texts(model: nn.Module, tok, prompts: list[Prompt], sampling: Sampling, batch_size: int = 8,
                   on_batch: Callable[[list[Prompt], list[str]], None] | None = None,
                   route: Callable[[list[int]], AbstractContextManager] | None = None,
                   unpadded: bool | None = None, decode: Callable[[list[int]], str] | None = None) -> list[str]:
    """The completion of each prompt, in order, generated `batch_size` at a time (`length_batches`). `on_batch`
    sees each batch's prompts and completions; `route`, given the indices of a batch's prompts, the context its
    generation runs in (a mixed-adapter batch: `NamedAdapters.routed`); `unpadded`: batches without padding
    (default: where `padding_hides_virtual_tokens`; under dynamic RoPE, those past the context: `longest_padded`);
    `decode`: a completion's ids as text (default: without special tokens; `marked_text` keeps `model.add_tokens`'
    markers).

    The model is left in the train/eval mode it was in, and torch's global RNG as it was (sampling seeds a fork
    of it): generating in the middle of a training run must not change the dropout masks that follow."""
    sampling.check()
    decode = decode or (lambda ids: tok.decode(ids, skip_special_tokens=True))
    if prompts:  # all of them before the first batch: the longest comes last
        check_room(model, max(len(p.ids) for p in prompts), "longest prompt", sampling.max_new_tokens,
                   "Shorten the prompt, or lower max_new_tokens.")
    texts: list[str] = [""] * len(prompts)
    was_training = model.training
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # CPU's always, + that GPU's
        torch.manual_seed(sampling.seed)
        model.eval()
        try:
            padded_up_to = longest_padded(model, prompts, sampling.max_new_tokens, unpadded)
            for batch in length_batches(prompts, batch_size, padded_up_to):
                with route(batch) if route else nullcontext():
                    new = generate_ids(model, tok, [prompts[i].ids for i in batch], sampling,
                                       tasks=[prompts[i].task_id for i in batch], decode=decode)
                for i, ids in zip(batch, new, strict=True):
                    texts[i] = cut_at_stop(decode(ids), sampling.stop)
                if on_batch:
                    on_batch([prompts[i] for i in batch], [texts[i] for i in batch])
        finally:
            model.train(was_training)
    return texts
