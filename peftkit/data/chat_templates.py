"""data.chat_template: the chat template a recipe gives its tokenizer, so that a base model (whose tokenizer has no
template) trains on data.format: chat, or an instruct model's template is replaced (axolotl's `chat_template`,
LLaMA-Factory's `template`, TRL's `clone_chat_template`).

The recipe names a built-in template (`BUILT_IN`), or gives a .jinja file, a local tokenizer or model directory whose
template to copy, or the jinja text itself. `load_recipe` reads a file or directory into its text
(`resolved_template`), so that a run's recipe.yaml holds the template it trained with: `peftkit eval|generate|chat
RUN_DIR` and `peftkit verify` use that one, whatever becomes of the file. `load_tokenizer` sets it on each tokenizer
loaded for the recipe (`template_text`).
"""

from __future__ import annotations

import json
from pathlib import Path

from peftkit.errors import PeftkitError, did_you_mean

# The built-ins write each answer and its end-of-turn marker inside `{% generation %}`: transformers'
# return_assistant_tokens_mask (TRL's assistant_only_loss) then masks what peftkit's own chat labels mask.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML (Qwen, SmolLM, Hermes): `<|im_start|>ROLE\\nCONTENT<|im_end|>\\n`, no default system prompt."""
LLAMA3 = (
    "{% if bos_token %}{{ bos_token }}{% endif %}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
"""Llama 3's (as Meta's Llama-3-8B-Instruct has it, without 3.1's tools and date): each content trimmed, then
`<|eot_id|>`; the tokenizer's BOS first."""
BUILT_IN = {"chatml": CHATML, "llama3": LLAMA3}

ADAPTER_TEMPLATE = "chat_template.jinja"
"""The file a run's adapter/ keeps the template of its data.chat_template in: the name transformers 5 reads a
tokenizer's template from, and a file vLLM's `--chat-template` takes."""

_NAMES = ", ".join(BUILT_IN)
FORMS = (f"a built-in template ({_NAMES}), a .jinja file (relative to the recipe's directory), a local tokenizer or "
         "model directory whose template to copy, or the jinja text itself")


def is_jinja(value: str) -> bool:
    """Whether `value` is a template's own text (it has a jinja statement or expression), not a name or path."""
    return "{%" in value or "{{" in value


def template_text(value: str) -> str:
    """The jinja text of a resolved data.chat_template: a built-in's, or the text itself."""
    if value in BUILT_IN:
        return BUILT_IN[value]
    if not is_jinja(value):  # (a recipe validated without load_recipe: its path was never read)
        raise PeftkitError(f"data.chat_template {value!r} is not a built-in template ({_NAMES}) nor jinja text.")
    return value


def adapter_template(adapter_dir: str | Path | None) -> str | None:
    """The chat template an adapter directory carries (`ADAPTER_TEMPLATE`: a run's with data.chat_template), or
    None: the base tokenizer's own then applies."""
    path = Path(adapter_dir) / ADAPTER_TEMPLATE if adapter_dir else None
    if path is None or not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PeftkitError(f"{path} cannot be read ({getattr(e, 'strerror', None) or e}): it is the chat template the "
                           "adapter was trained with. Restore it from the run, or delete it to use the base "
                           "tokenizer's own.") from None


def warn_init_from_template(cfg, tok, form: str | None) -> None:
    """Warn where a recipe continues an adapter.init_from that carries its own chat template (`ADAPTER_TEMPLATE`: an
    SFT run's with data.chat_template) and renders its conversations in another, `tok`'s (data.chat_template's, or the
    base tokenizer's own): the run trains, evaluates and samples the adapter in a template it did not learn, likely a
    data.chat_template left out. Only for conversations: data.format chat (data.train's or data.eval's), or preference
    pairs' and KTO's rows of that form (`form`: the first usable row's, `chat`). `cfg`: the Recipe."""
    import warnings

    from peftkit.errors import PeftkitWarning

    data, init_from = cfg.data, cfg.adapter.init_from
    sources = [*data.train_sources(), *data.eval_sources().values()]
    if not init_from or not (form == "chat" or any(source.format == "chat" for source in sources)):
        return
    theirs = adapter_template(init_from)
    if theirs is None or theirs == getattr(tok, "chat_template", None):
        return
    ours = "data.chat_template's" if data.chat_template else "the base tokenizer's own (no data.chat_template)"
    file = Path(init_from) / ADAPTER_TEMPLATE
    warnings.warn(PeftkitWarning(
        f"adapter.init_from: {init_from} carries the chat template its run trained with ({file}), and this run renders "
        f"its conversations in another, {ours}: the adapter trains on, and is evaluated and sampled, in a template it "
        f"did not learn. To continue in the adapter's, set data.chat_template: {file}"), stacklevel=2)


def resolved_template(value: str, base: Path) -> str:
    """data.chat_template as a recipe keeps it: a built-in's name or jinja text as given, a file's or a tokenizer
    directory's template read into its text (`base`: the recipe's directory, which a relative path starts from).
    Checked by rendering a one-message conversation; a PeftkitError says what is wrong and the forms it takes."""
    if not value.strip():
        raise PeftkitError(f"the value is empty; give {FORMS}.")
    if value in BUILT_IN:
        return value
    text = value if is_jinja(value) else _read(value, base)
    check_template(text)
    return text


def _read(value: str, base: Path) -> str:
    """The template of the file or tokenizer directory `value` names."""
    try:
        path = Path(value).expanduser()
        path = path if path.is_absolute() else base / path
        if path.is_dir():
            return _directory_template(path)
        if path.is_file():
            return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, ValueError) as e:  # unreadable, not UTF-8, a NUL byte in the name
        raise PeftkitError(f"{value!r} cannot be read ({getattr(e, 'strerror', None) or e}); give {FORMS}.") from None
    raise PeftkitError(f"{value!r} is not a built-in template ({_NAMES}) and there is no file or directory "
                       f"{path}.{did_you_mean(value, list(BUILT_IN))} Give {FORMS}.")


def _directory_template(path: Path) -> str:
    """The chat template a tokenizer directory holds, where transformers reads it: chat_template.jinja (transformers
    5's), else tokenizer_config.json's `chat_template` (a text, or named templates: the "default" one)."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    config = path / "tokenizer_config.json"
    found = json.loads(config.read_text(encoding="utf-8")).get("chat_template") if config.is_file() else None
    if isinstance(found, list):  # [{name, template}, ...]
        found = next((t.get("template") for t in found if isinstance(t, dict) and t.get("name") == "default"), None)
    if not isinstance(found, str) or not found:
        raise PeftkitError(f"the directory {path} holds no chat template (no chat_template.jinja, nor a chat_template "
                           f"in tokenizer_config.json) to copy; give {FORMS}.")
    return found


def check_template(text: str) -> None:
    """Compile `text` as transformers does and render a one-message conversation with it: a template that does
    not parse, or fails on the simplest conversation, is said before any model loads."""
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        render_jinja_template([[{"role": "user", "content": "Hi"}]], chat_template=text, bos_token="<s>",
                              eos_token="</s>", add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - jinja's syntax and runtime errors, and what the template raises
        line = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
        raise PeftkitError(f"the template does not render a one-message conversation: {type(e).__name__}{line}: "
                           f"{str(e).rstrip('.')}. Fix the template, or use a built-in one ({_NAMES}).") from None
