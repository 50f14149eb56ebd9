"""`peftkit chat`: a multi-turn conversation in the terminal, rendered with the tokenizer's chat template,
each reply streamed as it is generated. Ctrl-C stops a reply (and leaves that turn out), `/reset` starts a new
conversation, `/exit` (or Ctrl-D, or Ctrl-C at the prompt) ends it."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from peftkit.data.prompts import chat_prompt
from peftkit.decoding import (Sampling, TooLong, blank_answer, check_room, cut_at_stop, generate_ids, marked_text,
                              stop_token_ids)
from peftkit.errors import Terminated, visible

HELP = ("Type a message and press Enter. Ctrl-C stops a reply; /reset starts a new conversation, /exit (or Ctrl-D) "
        "ends.")
STOPPED = "(reply stopped: this turn is left out of the conversation)"


def unlike_training(data, recipe) -> str | None:
    """A note for a chat with a run that trained on no conversation (data.format alpaca, completion or text, and no
    chat dataset in data.train): the chat template wraps each message in turns it never saw, so its replies are
    noise however well it learnt (the quickstart's number-words run answers '978' with 'eighsixevent').

    Args:
        data: the recipe's DataConfig.
        recipe: the recipe file or run directory the user gave, for the command to try instead.
    """
    entries = data.train if isinstance(data.train, list) else []
    chat_data = any(getattr(entry, "format", None) == "chat" for entry in entries)  # (a path is str: no format)
    if data.format not in ("alpaca", "completion", "text") or chat_data:
        return None
    return (f"this run trained on data.format {data.format} rows, not on chat conversations, so its replies through "
            f"the chat template may be noise. `peftkit generate {recipe} --prompt TEXT` prompts it as training did.")


def reply_text(tok, ids: list[int]) -> str:
    """A reply's tokens as text, as streamed and as kept in the conversation: without the "clean-up" of spaces before
    punctuation that some tokenizers ask for (Llama 3's), which would rewrite text already on the screen ("ok !"
    printed, "ok!" kept) and change what the model said."""
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def kept_reply(tok, ids: list[int], stop: tuple[str, ...]) -> str:
    """A reply as the conversation keeps it: as the model wrote it, its special tokens too (`model.add_tokens`'
    markers, `<calc>8+3</calc> eleven`), which the screen leaves out as every decoded answer does. Kept as shown, the
    next turn's prompt held an answer the model never gave and never trained on (`8+3 eleven`; a reply of markers
    alone, an empty turn). The tokenizer's own tokens (BOS, EOS, unknown, padding) are left out, as shown: no
    answer is made of them. A reply cut at a --stop string is kept as shown: where the string lies among the markers
    is not known."""
    shown = reply_text(tok, ids)
    if (cut := cut_at_stop(shown, stop)) != shown:
        return cut
    return marked_text(tok, ids, clean_up_tokenization_spaces=False)


class _Streamer:
    """Prints the reply's text as its tokens arrive, skipping the prompt that `generate` pushes first. Text that may
    be the start of a stop string (`texts`, --stop) waits for the tokens that tell; a stop string and what follows
    never print.

    Each token decodes a short window, not the whole reply (which cost time growing with the square of the reply's
    length: a 2,000-token reply decoded 2,003,000 tokens), as transformers' TextStreamer and vLLM do: the tokens of
    the text added last (`ids[prefix:read]`), whose text is then the start of the window's. What the window adds
    beyond it is the new text, once it is whole: a window ending in part of a UTF-8 character, or adding nothing
    (special tokens, which decoding skips), waits for the next token and grows by it. The window's start decodes
    as the whole reply's there (a leading space stripped or a character split there fall in its known text), so
    merged word pieces print right. `end` decodes the whole reply once, so the text shown is `reply_text`'s."""

    def __init__(self, tok, write: Callable[[str], None], stops: list[int], texts: tuple[str, ...] = ()) -> None:
        self.tok, self.write, self.stops, self.texts = tok, write, set(stops), texts
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[:read] are decoded, into `shown` + `unshown`; ids[prefix:read] added last
        self.shown = 0  # characters printed
        self.unshown = ""  # the decoded text past them: held back (it may begin a stop string) or after a stop string
        self.prompt_seen = False
        self.stopped = False  # a stop token arrived: it and what follows are not the reply's (nor shown)

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.flatten().tolist():
            self.stopped = self.stopped or token in self.stops
            if not self.stopped:
                self.ids.append(token)
        known = reply_text(self.tok, self.ids[self.prefix:self.read])
        window = reply_text(self.tok, self.ids[self.prefix:])
        if len(window) > len(known) and not window.endswith("\ufffd"):  # (else an incomplete UTF-8 character)
            self.unshown += window[len(known):]
            self.prefix, self.read = self.read, len(self.ids)
            self._show(done=False)

    def _show(self, done: bool) -> None:
        """Print `unshown` up to a stop string, but (unless `done`) an end of it that may begin one."""
        cut = cut_at_stop(self.unshown, self.texts)  # (what was printed holds no stop string, nor begins one)
        if not done and len(cut) == len(self.unshown):  # the end of the text may begin a stop string: hold it back
            cut = cut[:len(cut) - max((n for s in self.texts for n in range(1, len(s)) if cut.endswith(s[:n])),
                                      default=0)]
        if cut:
            self.write(visible(cut).replace("\r", ""))  # print() obeys a lone CR
            self.shown += len(cut)
        self.unshown = self.unshown[len(cut):]

    def end(self) -> None:
        """Print what was held back and the reply's end, from the whole reply's text (a reply cut in the middle of
        a UTF-8 character ends in U+FFFD, as the conversation keeps it); an empty or whitespace-only reply said to
        be one, as `peftkit generate` says it (`model> ` alone read as if the chat had failed)."""
        whole = reply_text(self.tok, self.ids)
        self.unshown = whole[self.shown:]
        self._show(done=True)
        note = blank_answer(whole[:self.shown])
        self.write(("\n" if self.shown else "") + (f"{note}\n" if note else ""))


def chat_loop(model: nn.Module, tok, sampling: Sampling, read: Callable[[str], str] = input,
              write: Callable[[str], None] | None = None, system: str | None = None,
              task: int | None = None) -> list[dict]:
    """Run the conversation until /exit or end of input; returns its messages. `system`: the system message opening
    it (an empty one too, as a recipe's `data.system_prompt: ''` opened its training conversations); None: none.
    `task`: the task id of a multitask prompt tuning model (`peftkit.task_ids`)."""
    write = write or (lambda text: print(text, end="", flush=True))
    start = [{"role": "system", "content": system}] if system is not None else []
    messages = list(start)
    write(HELP + "\n")
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            write("\n")
            return messages
        except KeyboardInterrupt:  # Ctrl-C: the CLI's `interrupted` was printed after `you> `, on its line
            write("\n")
            raise
        if line == "/exit":
            return messages
        if line == "/reset":
            messages = list(start)
            write("(new conversation)\n")
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        prompt = chat_prompt(tok, messages).ids
        try:
            check_room(model, len(prompt), "conversation", sampling.max_new_tokens)
        except TooLong as e:
            messages.pop()
            fix = ("/reset starts a new conversation." if len(messages) > len(start) else
                   "Write a shorter message, or start peftkit chat with a lower --max-new-tokens.")
            write(f"{e} {fix}\n")
            continue
        write("model> ")
        streamer = _Streamer(tok, write, stop_token_ids(model, tok, sampling.stop), sampling.stop)
        try:
            ids = generate_ids(model, tok, [prompt], sampling, streamer=streamer, tasks=[task],
                               decode=lambda ids: reply_text(tok, ids))[0]
        except Terminated:  # SIGTERM ends the chat, after the half-streamed reply, on its line
            write("\n")
            raise
        except KeyboardInterrupt:  # Ctrl-C stops the reply: the turn is left out, the conversation goes on
            messages.pop()
            write(f"\n{STOPPED}\n")
            continue
        messages.append({"role": "assistant", "content": kept_reply(tok, ids, sampling.stop)})
