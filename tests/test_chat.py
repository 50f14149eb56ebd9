"""`peftkit chat`: each reply is the greedy continuation of the whole conversation so far (chat template and
all), /reset forgets it, /exit ends; and the real command in a real terminal (tmux) streams the same reply."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftkit.chat import chat_loop
from peftkit.data.prompts import chat_prompt
from peftkit.decoding import Sampling, stop_token_ids
from tests.test_generate import greedy_no_cache

NEW = 6


def _expected_reply(model, tok, messages: list[dict]) -> str:
    ids = greedy_no_cache(model, chat_prompt(tok, messages).ids, stop_token_ids(model, tok), NEW)
    return tok.decode(ids, skip_special_tokens=True)


def test_replies_continue_the_conversation_and_reset_forgets_it(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    lines = iter(["hi", "and then?", "/reset", "and then?", "/exit", "never read"])
    shown: list[str] = []
    messages = chat_loop(model, tok, Sampling(max_new_tokens=NEW), read=lambda _: next(lines), write=shown.append)

    first = _expected_reply(model, tok, [{"role": "user", "content": "hi"}])
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "and then?"}]
    second = _expected_reply(model, tok, history)
    fresh = _expected_reply(model, tok, [{"role": "user", "content": "and then?"}])
    assert second != fresh  # the history changes the reply, so the test can tell whether it was kept
    assert messages == [{"role": "user", "content": "and then?"}, {"role": "assistant", "content": fresh}]
    text = "".join(shown)
    assert f"model> {first}\n" in text and f"model> {second}\n" in text and f"model> {fresh}\n" in text
    assert "(new conversation)" in text


def test_the_decoding_options_reply_as_transformers_generate_does(tiny_llama):
    """A reply sampled with --top-k, --min-p and --repetition-penalty is transformers' generate() of the conversation's
    prompt with the same GenerationConfig values and seed (the chat command seeds torch once, before the first turn)."""
    from tests.test_generate import transformers_answer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    sampling = Sampling(NEW, temperature=1.5, seed=5, top_k=8, min_p=0.05, repetition_penalty=1.3)
    lines = iter(["hi", "/exit"])
    torch.manual_seed(5)
    messages = chat_loop(model, tok, sampling, read=lambda _: next(lines), write=lambda _: None)
    prompt = chat_prompt(tok, messages[:1]).ids
    assert messages[1]["content"] == transformers_answer(model, tok, prompt, 5, new=NEW, do_sample=True, temperature=1.5,
                                                         top_k=8, top_p=1.0, min_p=0.05, repetition_penalty=1.3)


def test_a_stop_string_ends_the_reply_before_it_on_screen_and_in_the_conversation(tiny_llama):
    """--stop: the reply shown and kept ends before the stop string, which never prints."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    whole = _expected_reply(model, tok, [{"role": "user", "content": "hi"}])
    stop = whole[3:5]  # a piece of the greedy reply
    lines = iter(["hi", "/exit"])
    shown: list[str] = []
    messages = chat_loop(model, tok, Sampling(NEW, stop=(stop,)), read=lambda _: next(lines), write=shown.append)
    assert messages[1]["content"] == whole[:whole.index(stop)] and len(whole[:whole.index(stop)]) >= 3
    assert f"model> {whole[:whole.index(stop)]}\n" in "".join(shown)


def test_text_that_may_begin_a_stop_string_waits_for_the_tokens_that_tell():
    """The streamer holds back an end of the reply that begins a stop string: shown once it turns out another text
    (or the reply ends), never when it completes the stop string."""
    from peftkit.chat import _Streamer

    class Chars:  # a tokenizer of one character a token
        def decode(self, ids, **kwargs):
            return "".join(map(chr, ids))

    for stop, shown_after_each, end in [("cd", ["", "a", "ab", "ab", "ab"], "ab\n"),
                                        ("bx", ["", "a", "a", "abc", "abcd"], "abcd\n")]:
        shown: list[str] = []
        streamer = _Streamer(Chars(), shown.append, stops=[], texts=(stop,))
        streamer.put(torch.tensor([[0]]))  # the prompt
        for i, char in enumerate("abcd"):
            streamer.put(torch.tensor([ord(char)]))
            assert "".join(shown) == shown_after_each[i + 1], (stop, char)
        streamer.end()
        assert "".join(shown) == end


def test_a_conversation_past_a_learned_position_table_is_refused_and_the_chat_goes_on(tmp_path):
    """GPT-2's positions are a table (here 48): past it the lookup fails. That turn is refused with the reason and
    left out of the history; the next one is answered."""
    from peftkit.tiny import build_tiny_model

    build_tiny_model(tmp_path / "gpt2", arch="gpt2", hidden_size=32, num_layers=1, seed=0, max_position_embeddings=48)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "gpt2")
    lines = iter(["1 2 3 4 5 6 7 8 9 " * 3, "hi", "1 2 3 4 5 6 7 8 9 " * 3, "/exit"])
    shown: list[str] = []
    messages = chat_loop(model, tok, Sampling(max_new_tokens=NEW), read=lambda _: next(lines), write=shown.append)
    text = "".join(shown)
    assert "The conversation needs " in text and "more than the 48 positions this gpt2 model has" in text
    # What helps: a new conversation when there is one to forget, a shorter message (or reply) when there is not.
    too_long = [line.rsplit(". ", 1)[-1] for line in text.splitlines() if "positions this gpt2 model has" in line]
    assert too_long == ["Write a shorter message, or start peftkit chat with a lower --max-new-tokens.",
                        "/reset starts a new conversation."]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["hi"]
    assert messages[1]["content"] == _expected_reply(model, tok, messages[:1])


def test_the_reply_shown_stops_where_the_stored_reply_stops(tiny_llama):
    """A model whose end tokens include an ordinary token: the screen shows what the history keeps, not the stop."""
    from peftkit.chat import _Streamer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    shown: list[str] = []
    streamer = _Streamer(tok, shown.append, stops=[tok.convert_tokens_to_ids("q")])
    streamer.put(torch.tensor([[1, 2]]))  # the prompt, which generate pushes first
    for token in "ddq6":
        streamer.put(torch.tensor([tok.convert_tokens_to_ids(token)]))
    assert "".join(shown) == "dd"


def test_the_reply_shown_is_the_reply_kept_with_a_tokenizer_that_cleans_up_spaces(tiny_llama):
    """Llama 3's tokenizer asks for `clean_up_tokenization_spaces`, which rewrites " !" as "!" in text already on the
    screen: the streamer printed "Bonjour  Oui  ok " (each punctuation mark lost) and kept "Bonjour! Oui, ok?"."""
    from peftkit.chat import _Streamer, reply_text

    tok = AutoTokenizer.from_pretrained(tiny_llama, clean_up_tokenization_spaces=True)
    ids = tok("Bonjour ! Oui , ok ?", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "Bonjour! Oui, ok?"  # what the tokenizer's own decode makes of it
    shown: list[str] = []
    streamer = _Streamer(tok, shown.append, stops=[])
    streamer.put(torch.tensor([[1, 2]]))
    for token in ids:
        streamer.put(torch.tensor([token]))
    assert "".join(shown) == reply_text(tok, streamer.ids) == "Bonjour ! Oui , ok ?"


def _pane(session: str) -> str:
    return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True,
                          check=True).stdout


def _wait_for(session: str, predicate, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = _pane(session)
        if predicate(text):
            return text
        time.sleep(0.3)
    raise AssertionError(f"timed out; the terminal shows:\n{_pane(session)}")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_ctrl_c_at_the_prompt_ends_the_chat_and_during_a_reply_stops_the_reply(tiny_llama, monkeypatch):
    """Ctrl-C at `you> ` ends the chat (the CLI says `interrupted`, status 130), that word on the interrupted line.
    Ctrl-C in the middle of a streamed reply stopped the whole chat: it now stops the reply, leaves that turn out of
    the conversation and goes on; SIGTERM there still ends the chat."""
    import peftkit.chat
    from peftkit.errors import Terminated

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)

    def ctrl_c(_):
        raise KeyboardInterrupt

    shown: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        chat_loop(model, tok, Sampling(max_new_tokens=NEW), read=ctrl_c, write=shown.append)
    assert shown == [peftkit.chat.HELP + "\n", "\n"]  # (`you> ` is input()'s, so the line is ended after it)

    generate = peftkit.chat.generate_ids
    calls = []

    def interrupted(*args, streamer, **kwargs):
        calls.append(args[2])  # the prompt
        if len(calls) > 1:
            return generate(*args, streamer=streamer, **kwargs)
        streamer.put(torch.tensor([[1, 2]]))  # the prompt, then half a reply, then Ctrl-C
        streamer.put(torch.tensor([tok("ab", add_special_tokens=False)["input_ids"][0]]))
        raise KeyboardInterrupt

    monkeypatch.setattr(peftkit.chat, "generate_ids", interrupted)
    shown.clear()
    lines = iter(["hi", "ho", "/exit"])
    messages = chat_loop(model, tok, Sampling(max_new_tokens=NEW), read=lambda _: next(lines), write=shown.append)
    assert f"model> a\n{peftkit.chat.STOPPED}\nmodel> " in "".join(shown)
    assert [m["content"] for m in messages[:1]] == ["ho"] and len(messages) == 2  # the stopped turn is left out
    assert calls[1] == [chat_prompt(tok, [{"role": "user", "content": "ho"}]).ids]

    def terminated(*args, streamer, **kwargs):
        streamer.put(torch.tensor([[1, 2]]))
        raise Terminated

    monkeypatch.setattr(peftkit.chat, "generate_ids", terminated)
    shown.clear()
    with pytest.raises(Terminated):
        chat_loop(model, tok, Sampling(max_new_tokens=NEW), read=lambda _: "hi", write=shown.append)
    assert "".join(shown).endswith("model> \n")


def test_chat_in_a_real_terminal(tiny_llama, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    reply = _expected_reply(model, tok, [{"role": "user", "content": "hi"}])
    # (the process id too: a session left by a killed run, or another run's at the same time, has the same tmp_path
    # name, and tmux refused the new session)
    session = f"peftkit-chat-{os.getpid()}-{tmp_path.name}"
    # The pane outlives the command, so that its exit status (and any error it printed) stays on screen.
    command = f"{sys.executable} -m peftkit.cli chat --model {tiny_llama} --max-new-tokens {NEW}; echo EXITED $?; sleep 600"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "40", command], check=True)
    try:
        _wait_for(session, lambda t: "you>" in t or "EXITED" in t)  # capture-pane drops trailing spaces
        assert "EXITED" not in _pane(session), _pane(session)
        subprocess.run(["tmux", "send-keys", "-t", session, "hi", "Enter"], check=True)
        screen = _wait_for(session, lambda t: t.count("you>") >= 2)
        assert f"you> hi\nmodel> {reply}".rstrip() + "\n" in screen
        subprocess.run(["tmux", "send-keys", "-t", session, "/exit", "Enter"], check=True)
        assert "EXITED 0" in _wait_for(session, lambda t: "EXITED" in t, timeout=30)  # /exit ends it, status 0
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def test_chat_without_a_model_is_a_clear_error(monkeypatch, capsys):
    from tests.conftest import cli_user_error

    assert "peftkit chat needs a model: --model M (and/or --adapter DIR)" in cli_user_error(monkeypatch, capsys, "chat")


def test_a_recipe_s_data_system_prompt_opens_chat_and_generate_chat(tiny_llama, number_data, tmp_path, monkeypatch):
    """A model trained with data.system_prompt saw it open every conversation; `peftkit chat RECIPE` and `generate
    RECIPE --chat --prompt` asked it without one. It is now their default system message (--system still wins)."""
    import peftkit.chat
    from peftkit.cli import main
    from peftkit.generate import generate_job
    from tests.conftest import make_recipe

    recipe = make_recipe(tmp_path, tiny_llama, number_data, data={"format": "chat", "system_prompt": "Be brief."})
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    job = generate_job(recipe, [], None, None, ["hi"], None, None, True, None, Sampling(), 8)
    opened = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert job.build_prompts(tok)[0].text == chat_prompt(tok, opened).text
    seen = []
    monkeypatch.setattr(peftkit.chat, "chat_loop", lambda *args, system, **kwargs: seen.append(system))
    for flags, system in (([], "Be brief."), (["--system", "Mine."], "Mine."), (["--system", ""], "")):
        monkeypatch.setattr(sys, "argv", ["peftkit", "chat", str(recipe), "--set", "export.output_dir=x", *flags])
        main()
    assert seen == ["Be brief.", "Mine.", None]


def test_a_recipe_s_empty_data_system_prompt_opens_chat_as_it_opened_training(tiny_llama, number_data, tmp_path,
                                                                             monkeypatch):
    """data.system_prompt: '' (a way to keep a template's default system message out: Qwen2.5's says "You are
    Qwen...") opened every training conversation with an empty system message, and `generate --chat` asks so;
    `peftkit chat RECIPE` left it out, asking in a form the model never saw. It opens the chat too; `--system ''`
    still means none."""
    import peftkit.chat
    from peftkit.cli import main
    from peftkit.data.formats import format_rows
    from peftkit.data.prompts import row_prompt
    from peftkit.recipe import DataConfig
    from tests.conftest import make_recipe

    recipe = make_recipe(tmp_path, tiny_llama, number_data, data={"format": "chat", "system_prompt": ""})
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
    trained = format_rows([row], DataConfig(train="x", format="chat", system_prompt=""))[0]
    asked = row_prompt(tok, trained, "chat").text  # the prompt training put before the answer
    assert asked.startswith("<|system|>\n</s>")
    real, conversations = peftkit.chat.chat_loop, []

    def one_turn(*args, **kwargs):
        lines = iter(["hi"])

        def read(_):
            line = next(lines, None)
            if line is None:  # (Ctrl-D)
                raise EOFError
            return line
        conversations.append(real(*args, **kwargs | {"read": read, "write": lambda _: None}))

    monkeypatch.setattr(peftkit.chat, "chat_loop", one_turn)
    for flags in ([], ["--system", ""]):
        monkeypatch.setattr(sys, "argv", ["peftkit", "chat", str(recipe), "--set", "export.output_dir=x",
                                          "--max-new-tokens", "2", *flags])
        main()
    with_empty, without = (chat_prompt(tok, messages[:-1]).text for messages in conversations)
    assert with_empty == asked and without == chat_prompt(tok, [{"role": "user", "content": "hi"}]).text


def test_chat_with_a_run_that_trained_on_no_conversation_says_so(tiny_llama, number_data, tmp_path, monkeypatch,
                                                                 capsys):
    """`peftkit chat runs/quickstart` (an alpaca run) answered '978' with 'eighsixevent' and said nothing: the chat
    template wraps messages in turns it never trained on. It now says so before the chat, and what to run instead;
    a chat run says nothing."""
    import peftkit.chat
    from peftkit.cli import main
    from tests.conftest import make_recipe

    monkeypatch.setattr(peftkit.chat, "chat_loop", lambda *args, **kwargs: None)  # (the note is said before it)
    for fmt in ("alpaca", "chat"):
        recipe = make_recipe(tmp_path / fmt, tiny_llama, number_data, data={"format": fmt})
        monkeypatch.setattr(sys, "argv", ["peftkit", "chat", str(recipe), "--set", "export.output_dir=x"])
        main()
        said = capsys.readouterr().err
        if fmt == "alpaca":
            assert said == (f"note: this run trained on data.format alpaca rows, not on chat conversations, so its "
                            f"replies through the chat template may be noise. `peftkit generate {recipe} --prompt "
                            "TEXT` prompts it as training did.\n")
        else:
            assert "note:" not in said


def _stream(tok, ids: list[int], texts: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """What the streamer printed of `ids` (after a prompt): after each token, and at the end."""
    from peftkit.chat import _Streamer

    shown: list[str] = []
    streamer = _Streamer(tok, shown.append, stops=[], texts=texts)
    streamer.put(torch.tensor([[1, 2]]))
    after_each = []
    for token in ids:
        streamer.put(torch.tensor([token]))
        after_each.append("".join(shown))
    streamer.end()
    return after_each, shown


def test_a_reply_streams_in_time_that_grows_with_its_length():
    """The streamer decoded the whole reply at every token: 2,003,000 tokens for a reply of 2,000. It now decodes a
    window of the last few tokens a token, and the whole reply once at the end; the text is the same."""
    from peftkit.chat import reply_text
    from peftkit.tiny import build_char_tokenizer

    tok = build_char_tokenizer()
    text = "Hello, world! Each token is one character here.\n" * 42
    ids = tok(text, add_special_tokens=False)["input_ids"]
    decoded = []
    decode = tok.decode
    tok.decode = lambda ids, **kwargs: decoded.append(len(ids)) or decode(ids, **kwargs)
    _, shown = _stream(tok, ids, texts=("STOP",))
    assert "".join(shown) == reply_text(tok, ids) + "\n" == text + "\n" and len(ids) == 2016
    assert sum(decoded) <= 5 * len(ids)  # (4 a token, the window twice, and the whole reply at the end)


@pytest.mark.parametrize("make_tok", ["_byte_level_tokenizer", "_sentencepiece_tokenizer", "_cleaning_char_tokenizer"])
def test_the_streamed_text_is_the_reply_s_text(make_tok):
    """Decoding a window of the reply's last tokens, not all of them, prints what decoding all of them gives: checked
    on random replies (text of 2-, 3- and 4-byte characters split between tokens, special tokens, which decoding
    skips, stray byte tokens) with stop strings of their text, for a byte-level BPE, a sentencepiece tokenizer (a
    leading space stripped) and one that cleans up spaces. After each token the screen shows a beginning of the
    reply's text up to its first stop string, and at the end all of it (a reply ending in part of a character: its
    U+FFFD, as the conversation keeps it). Left out: replies whose text a later token rewrites (sentencepiece's byte
    fallback decodes the bytes of "here" then a stray byte as five U+FFFD), which no streamer can print."""
    import random

    import tests.test_generate
    from peftkit.chat import reply_text
    from peftkit.decoding import blank_answer, cut_at_stop
    from peftkit.errors import visible

    tok = getattr(tests.test_generate, make_tok)()
    specials = [i for i in tok.all_special_ids if i != tok.eos_token_id]
    rng = random.Random(0)
    checked = split = cut = 0  # replies checked, with a character split between tokens, cut at a stop string
    for trial in range(60):
        ids: list[int] = []
        while len(ids) < 60:
            kind = rng.random()
            if kind < 0.1:
                ids += [rng.choice(specials)] * rng.choice([1, 3])
            elif kind < 0.15:
                ids.append(rng.randrange(len(tok)))
            else:
                text = rng.choice(tests.test_generate.STOP_TEXTS)
                start = rng.randrange(len(text))
                ids += tok(text[start:start + rng.randrange(1, 12)], add_special_tokens=False)["input_ids"]
        whole = reply_text(tok, ids)
        if not all(whole.startswith(reply_text(tok, ids[:n]).rstrip("\ufffd")) for n in range(len(ids))):
            continue
        texts = tuple(whole[s:s + rng.randrange(1, 6)] for s in [rng.randrange(len(whole))] if trial % 2)
        texts = tuple(t for t in texts if "\ufffd" not in t)
        final = visible(cut_at_stop(whole, texts)).replace("\r", "")  # (as the screen shows it)
        after_each, shown = _stream(tok, ids, texts)
        assert all(final.startswith(text) for text in after_each), (trial, texts, whole)
        note = blank_answer(cut_at_stop(whole, texts))  # (cut at its start: an empty answer; whitespace: said so)
        assert "".join(shown) == (final + "\n" if final else "") + (note + "\n" if note else ""), (trial, texts, whole)
        checked += 1
        split += any("\ufffd" in tok.decode(ids[i:i + 1]) for i in range(len(ids)))
        cut += any(t in whole for t in texts)
    if make_tok == "_byte_level_tokenizer":  # a reply cut after the first byte of 😀 (the old streamer left it out)
        ids = tok("ok", add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("ð")]  # (byte F0)
        assert "".join(_stream(tok, ids)[1]) == reply_text(tok, ids) + "\n" == "ok\ufffd\n"
    assert checked >= 50 and cut >= 25 and split >= (0 if make_tok == "_cleaning_char_tokenizer" else 50)


def test_a_reply_s_special_tokens_stay_in_the_conversation_and_off_the_screen(tiny_llama):
    """A model trained with `model.add_tokens` writes its markers (`<calc>`) in replies. The screen leaves them out,
    as every decoded answer does; the conversation keeps them, so the next turn's prompt holds the tokens the model
    gave. It kept the text shown: the next prompt lacked them (here a turn of markers alone was kept empty)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.add_tokens(["<calc>"], special_tokens=True)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    marker = tok.convert_tokens_to_ids("<calc>")
    last = {}
    model.register_forward_pre_hook(lambda m, args, kwargs: last.update(ids=kwargs.get("input_ids", *args[:1])[:, -1]),
                                    with_kwargs=True)

    def every_other_token_a_marker(module, args, logits):  # <calc> after any other token: "<calc>a<calc>b..."
        logits[:, -1, marker] += torch.where(last["ids"] == marker, -100.0, 100.0)
        return logits

    model.lm_head.register_forward_hook(every_other_token_a_marker)
    lines = iter(["hi", "/exit"])
    shown: list[str] = []
    messages = chat_loop(model, tok, Sampling(max_new_tokens=NEW), read=lambda _: next(lines), write=shown.append)
    prompt = chat_prompt(tok, messages[:1]).ids
    ids = greedy_no_cache(model, prompt, stop_token_ids(model, tok), NEW)
    assert ids.count(marker) == NEW // 2 and ids[0] == marker
    assert chat_prompt(tok, messages).ids[len(prompt):len(prompt) + len(ids)] == ids  # the next turn sees them
    assert messages[1]["content"] == tok.decode([t for t in ids if t != tok.unk_token_id], skip_special_tokens=False)
    assert f"model> {tok.decode(ids, skip_special_tokens=True)}\n" in "".join(shown)
    assert "<calc>" not in "".join(shown)


def test_an_empty_reply_is_said_to_be_one(tiny_llama, tmp_path):
    """A model that answers nothing (every logit 0: greedy takes <pad>, which decodes to nothing; an instruct model
    whose first token is its end of turn) showed `model> ` and an empty line, as if the chat had failed; it says
    so, as `peftkit generate` does (the conversation keeps the empty reply)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    lines, shown = iter(["hi", "/exit"]), []
    messages = chat_loop(model, tok, Sampling(max_new_tokens=2), read=lambda _: next(lines), write=shown.append)
    assert "model> (an empty answer)\n" in "".join(shown)
    assert messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]


def test_a_whitespace_reply_is_said_to_be_one(tiny_llama):
    """A reply of newlines alone (an instruct model given text outside its template) printed as blank lines, read as
    if the chat had failed: its characters are said after it (the conversation keeps the reply as it was)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    newline = tok.convert_tokens_to_ids("\n")

    def newlines(module, args, logits):
        logits = torch.zeros_like(logits)
        logits[..., newline] = 1.0
        return logits

    model.lm_head.register_forward_hook(newlines)
    lines, shown = iter(["hi", "/exit"]), []
    messages = chat_loop(model, tok, Sampling(max_new_tokens=3), read=lambda _: next(lines), write=shown.append)
    assert "model> \n\n\n\n(an answer of 3 whitespace characters only: '\\n\\n\\n')\n" in "".join(shown)
    assert messages[1] == {"role": "assistant", "content": "\n\n\n"}
