"""What each data.format reads of a row (rows as `peftkit.data.rows` reads them): its fields, data.columns'
mapping, ShareGPT's conversations, data.system_prompt, and what makes a row unusable (a problem named in the row's
own words)."""

from __future__ import annotations

import json
import re

from peftkit.data.class_labels import ClassId
from peftkit.data.class_labels import label_problem as class_label_problem
from peftkit.data.class_labels import type_name

REQUIRED_FIELDS = {"alpaca": ("instruction", "output"), "chat": ("messages",), "completion": ("prompt", "completion"),
                   "text": ("text",), "classification": ("text", "label"), "preference": ("chosen", "rejected"),
                   "unpaired": ("prompt", "completion", "label"), "tokenized": ("input_ids",)}
OPTIONAL_FIELDS = {"alpaca": ("input",), "classification": ("text_pair",), "preference": ("prompt",),
                   "tokenized": ("labels", "completion_mask", "assistant_masks", "attention_mask", "input_type_mask")}
"""Fields a row may leave out or give as null: a string when given (a tokenized row's: a list of integers,
`peftkit.data.tokenized`)."""


# The roles chat templates render: an assistant turn is the one trained; `tool` (and Llama 3.1's `ipython`, OpenAI's
# `developer` and older `function`) are roles of templates that call tools. Any other role was rendered as a turn
# of its own (`<|bot|>`) and trained silently, or, as ShareGPT's `gpt`, left the row with no assistant turn.
CHAT_ROLES = ("system", "user", "assistant", "tool", "developer", "ipython", "function")
_ROLE_NAMES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "ai": "assistant",
               "chatgpt": "assistant"}  # ShareGPT's, Gemma's and others' names for user and assistant


def format_fields(fmt: str) -> tuple[str, ...]:
    """The fields a row of data.format `fmt` is read from (what data.columns may map): the format's own, and the
    `task` of multitask prompt tuning."""
    extra = {"chat": ("tools", "conversations", "system")}.get(fmt, ())
    return (*REQUIRED_FIELDS[fmt], *OPTIONAL_FIELDS.get(fmt, ()), *extra, "task")


def format_rows(rows: list, cfg) -> list:
    """Rows as data.format reads them: each field that data.columns maps taken from its column (missing where the
    row lacks the column, whatever the row holds under the field's own name), ShareGPT's conversations as messages
    (`sharegpt_rows`) for chat, and data.system_prompt opening each conversation without a system message."""
    if cfg.columns:
        rows = [{k: v for k, v in row.items() if k not in cfg.columns}
                | {field: row[column] for field, column in cfg.columns.items() if column in row}
                if isinstance(row, dict) else row for row in rows]
    if cfg.format != "chat":
        return rows
    rows = [_with_call_arguments(_without_empty_calls(row)) for row in sharegpt_rows(rows)]
    return rows if cfg.system_prompt is None else [_with_system(row, cfg.system_prompt) for row in rows]


def _without_empty_calls(row):
    """A chat row without the `"tool_calls": []` of turns that call no tool (OpenAI's logs write it): Llama 3.1's
    template takes a message holding the key for a turn of calls, and refuses one without a single call. And without
    `"tools": []`, for which it writes its tool-calling instructions (`tools is not none`), with no tool to call.
    `tools` given as JSON text (LLaMA-Factory's and glaive's datasets store it so) is read as what it holds."""
    if isinstance(row, dict) and isinstance(row.get("tools"), str):  # LLaMA-Factory's and glaive's: a JSON text
        try:
            row = row | {"tools": json.loads(row["tools"])}
        except ValueError:
            pass  # (said as the row's problem: not a list of objects)
    if isinstance(row, dict) and row.get("tools") in ([], ""):
        row = {k: v for k, v in row.items() if k != "tools"}
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list) or not any(isinstance(m, dict) and m.get("tool_calls") == [] for m in messages):
        return row
    return row | {"messages": [{k: v for k, v in m.items() if k != "tool_calls"}
                               if isinstance(m, dict) and m.get("tool_calls") == [] else m for m in messages]}


def _with_call_arguments(row):
    """A chat row whose tool calls' `arguments` given as JSON text of an object (as OpenAI's API returns them:
    "{\\"city\\": \\"Paris\\"}") hold that object, as `_function_calls` reads ShareGPT's: transformers' chat
    templates write a mapping's items (Qwen 2.5's `tojson`), and a string would be written quoted, escapes and all.
    A call written without its `function` wrapper ({"name": ..., "arguments": ...}, as some datasets do) is wrapped
    (`BareCall`). Other text is left as it is, for `_messages_problem` to name."""
    def parsed(call):
        if isinstance(call, dict) and "function" not in call and "name" in call:
            call = _wrapped(call)
        function = call.get("function") if isinstance(call, dict) else None
        text = function.get("arguments") if isinstance(function, dict) else None
        if not isinstance(text, str) or (arguments := _json_object(text)) is None:
            return call
        return type(call)(call | {"function": function | {"arguments": arguments}})

    def calls(m) -> bool:
        return isinstance(m, dict) and isinstance(m.get("tool_calls"), list)

    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list) or not any(calls(m) for m in messages):
        return row
    return row | {"messages": [m | {"tool_calls": [parsed(c) for c in m["tool_calls"]]} if calls(m) else m
                               for m in messages]}


class BareCall(dict):
    """A tool call the row wrote without its `function` wrapper, wrapped as transformers' docs write a call,
    {"type": "function", "function": {"name": ..., "arguments": ...}}: Llama 3.1's template reads
    `tool_call.function` alone (Qwen 2.5's takes either). A dict to the template; a problem names the row's own keys
    (`tool_calls[0].name`)."""


def _wrapped(call: dict) -> BareCall:
    function = {k: call[k] for k in ("name", "arguments") if k in call}
    return BareCall({"type": "function"} | {k: v for k, v in call.items() if k not in function}
                    | {"function": function})


def _with_system(row, system: str):
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list) or (messages and isinstance(messages[0], dict)
                                          and messages[0].get("role") == "system"):
        return row  # (a malformed row is said as it is)
    return row | {"messages": [SystemPrompt(role="system", content=system), *messages]}


class SystemPrompt(dict):
    """The system message data.system_prompt puts in front of a conversation (a dict to the chat template), so that
    a template refusing it names data.system_prompt, not the row (`render_chat`)."""


def message_name(messages: list[dict], i: int, part: str = "") -> str:
    """`messages[i]` (with `part`, `.content`) as the row numbers its messages, or data.system_prompt for its."""
    lead = int(bool(messages) and isinstance(messages[0], SystemPrompt))
    return "data.system_prompt" if lead and i == 0 else f"messages[{i - lead}]{part}"


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "function_call": "assistant", "observation": "tool", "tool": "tool"}
"""ShareGPT's speakers (a turn's `from`: LLaMA-Factory's and axolotl's names) as chat roles; a `function_call` turn is
an assistant turn of tool calls (`_function_calls`), an `observation` a tool's result."""
SHAREGPT_SPEAKERS = "human, gpt, function_call, observation, system"
# Other datasets' names for a speaker, and the one to rename it to ("function": OpenAI's old role of a function's
# result; some ShareGPT exports write it for the call).
_SPEAKER_NAMES = {"function": "'observation' (a tool's result) or 'function_call' (a call)",
                  **dict.fromkeys(("function_response", "function-response", "tool_response", "ipython"),
                                  "'observation'"),
                  **dict.fromkeys(("function-call", "tool_call", "tool_calls"), "'function_call'"),
                  "bot": "'gpt'", "model": "'gpt'"}


def sharegpt_rows(rows: list) -> list:
    """Rows of data.format chat, ShareGPT's among them (`conversations`: {from, value} turns, `system` beside them
    as LLaMA-Factory writes it, empty for none) as `messages` rows, the other fields kept; a turn whose `from` is no ShareGPT speaker
    keeps it as its role (the role check names it). ShareGPT's turns under `messages` (a column of them mapped there,
    `columns: {messages: conversation}`) are read alike."""
    def turns(row) -> list[dict] | None:
        conversation = row.get("conversations") if isinstance(row, dict) and "messages" not in row else None
        if not _sharegpt_turns(conversation):
            return None
        # ("system": "" is no system message, as LLaMA-Factory reads it: data.system_prompt then opens it)
        system = [{"role": "system", "content": row["system"]}] if row.get("system") not in (None, "") else []
        return system + [_sharegpt_message(t) | _weight_as_train(t) for t in conversation]
    rows = [{k: v for k, v in row.items() if k != "messages"} | {"conversations": row["messages"]}
            if isinstance(row, dict) and "conversations" not in row and _sharegpt_turns(row.get("messages")) else row
            for row in rows]
    return [row | {"messages": messages, SHAREGPT: True} if (messages := turns(row)) is not None else row
            for row in rows]


def _sharegpt_turns(conversation) -> bool:
    """Whether `conversation` is a list of ShareGPT's turns, {from, value} (and no `role`)."""
    return isinstance(conversation, list) and all(
        isinstance(t, dict) and {"from", "value"} <= t.keys() and "role" not in t for t in conversation)


def _sharegpt_message(turn: dict) -> dict:
    """A ShareGPT turn as a message: a `function_call` turn's calls as `tool_calls` (None where they are malformed:
    `_sharegpt_problem` names them)."""
    if turn["from"] == "function_call":
        return {"role": "assistant", "content": None, "tool_calls": _function_calls(turn["value"])[0]}
    speaker = turn["from"]
    return {"role": SHAREGPT_ROLES.get(speaker, speaker) if isinstance(speaker, str) else speaker,
            "content": turn["value"]}


def _weight_as_train(turn: dict) -> dict:
    """A ShareGPT turn's `weight` (OpenHermes' and axolotl's: 0, not trained; 1, trained; null, as its role has it)
    as the message's `TRAIN` key; {} for none, or for a weight `_sharegpt_problem` refuses."""
    weight = turn.get("weight")
    return {TRAIN: weight == 1} if _valid_weight(weight) and weight is not None else {}


def _valid_weight(weight: object) -> bool:
    return weight is None or (not isinstance(weight, bool) and isinstance(weight, (int, float)) and weight in (0, 1))


TRAIN = "train"
"""The key of a `messages` entry that says whether an assistant turn is trained (`"train": false` masks it from the
loss, `true` trains it where data.train_on: last_answer would not; axolotl's `message_field_training`); ShareGPT's
`weight` is read as it. The chat template never sees it (`template.render`)."""

TRAIN_KEYS = (TRAIN, "training")
"""`TRAIN` and its alias `training`, the default of axolotl's `message_field_training` in its older releases."""


def train_key(message: dict) -> str:
    """The key a message marks its turn with (`TRAIN`, or the alias `training` where it gives that one alone): the
    one read, and the one an error names. A null is no mark: a parquet file or hub dataset gives every message each
    key any message of it has (null where it had none), so rows marked with `train` beside rows marked with
    `training` have both."""
    return "training" if message.get("training") is not None and message.get(TRAIN) is None else TRAIN


def train_mark(message: dict) -> object:
    """A message's mark (true, false; None without one), under either of `TRAIN_KEYS`."""
    return message.get(train_key(message))


SHAREGPT = "_peftkit_sharegpt"
"""The key `sharegpt_rows` marks a row it converted with, so that a problem is named in the row's own terms."""


def _function_calls(value: object) -> tuple[list[dict] | None, str | None]:
    """A ShareGPT `function_call` turn's value, as LLaMA-Factory writes it (JSON text of {"name", "arguments"}, or of
    a list of such calls), as `tool_calls` in OpenAI's and transformers' form; or None and what is wrong with it.
    `arguments` given as JSON text of an object (OpenAI's form) is read as that object: transformers' chat templates
    write a mapping's items (Qwen 2.5's `tojson`), and a string would be written quoted, escapes and all."""
    form = ("a function_call turn's value is JSON text of a call, {\"name\": ..., \"arguments\": {...}}, or of a "
            "list of calls")
    if not isinstance(value, str):
        return None, f"must be a string, got {'null' if value is None else type(value).__name__} ({form})"
    try:
        calls = json.loads(value)
    except (ValueError, RecursionError) as e:
        return None, f"is not valid JSON ({'nested too deeply' if isinstance(e, RecursionError) else e}); {form}"
    calls = calls if isinstance(calls, list) else [calls]
    if not calls:
        return None, f"is an empty list of calls; {form}"
    found = []
    for call in calls:
        if not isinstance(call, dict):
            return None, f"holds a call that is {_json_type(call)}, not an object; {form}"
        if not isinstance(call.get("name"), str) or not call["name"].strip():
            return None, f"holds a call without a 'name' (a nonempty string); {form}"
        arguments = call.get("arguments")
        if isinstance(arguments, str):
            arguments = _json_object(arguments)
        if not isinstance(arguments, dict):
            given = "without 'arguments'" if "arguments" not in call else "whose 'arguments' is " + (
                "a string that is not JSON text of an object" if isinstance(call["arguments"], str)
                else _json_type(call["arguments"]))
            return None, (f"holds a call {given}: an object of the arguments by name ({{}} for none), or JSON text "
                          f"of one; {form}")
        found.append({"type": "function", "function": {"name": call["name"], "arguments": arguments}})
    return found, None


def _json_object(text: str) -> dict | None:
    """The object JSON `text` holds (a call's arguments as OpenAI writes them: '{"city": "Paris"}'), else None."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _json_type(value: object) -> str:
    """`value`'s JSON type, as a message says it (`null`, `a string`, `a list`)."""
    return {type(None): "null", str: "a string", bool: "a boolean", int: "a number", float: "a number",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


# A lone UTF-16 surrogate (JSON "\\ud800") is not valid Unicode: no tokenizer can encode it, and the fast
# (Rust) ones fail with a TypeError that names neither the row nor the text.
_SURROGATE = re.compile("[\ud800-\udfff]")


# The field a row's loss is on: empty (or only whitespace), the row trained on the end token alone, without a word
# (as an empty assistant turn did); now a bad row, as an empty `text` was.
TARGET_FIELDS = {"alpaca": "output", "completion": "completion", "text": "text"}


def _row_problem(row: dict, fmt: str, target: bool = True, train_on: str = "answers") -> str | None:
    """What makes a row unusable for `fmt`, or None. `target`: an empty or missing answer is a problem (not where the
    rows are only prompts to generate from, `peftkit generate --data`: `{"instruction": ...}` was refused for its
    missing output); `train_on`: data.train_on, which decides what a conversation's turn marks can say."""
    if fmt == "preference":  # a prompt and two answers, each read as a completion or a conversation
        from peftkit.data.preference import pair_problem

        return pair_problem(row)
    if fmt == "unpaired":  # a prompt, an answer and its label, the answer read as a completion or a conversation
        from peftkit.data.unpaired import unpaired_problem

        return unpaired_problem(row)
    if fmt == "tokenized":  # token ids, the user's own: peftkit.data.tokenized
        from peftkit.data.tokenized import tokenized_problem

        return tokenized_problem(row, target)
    if fmt == "chat" and "messages" not in row and "conversations" in row:  # (a well-formed one is converted)
        return f"'conversations' must be a list of {{from, value}} objects (ShareGPT's turns: from {SHAREGPT_SPEAKERS})"
    if row.get(SHAREGPT):
        return _sharegpt_problem(row, fmt, target, train_on)
    for field in REQUIRED_FIELDS[fmt]:
        optional = not target and fmt != "text" and field == TARGET_FIELDS.get(fmt)
        if (field not in row or row[field] is None) and not optional:
            return f"missing field '{field}'"
    if fmt == "chat":
        tools = row.get("tools")
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            return ("field 'tools' must be a list of objects, or JSON text of one (the tools' JSON schemas, as the "
                    "chat template takes them)")
        messages = row["messages"]
        if isinstance(messages, list) and messages and isinstance(messages[0], SystemPrompt):
            messages = messages[1:]  # (data.system_prompt's, not the row's: its messages are named as it numbers them)
        return _messages_problem(messages, target, train_on)
    if fmt == "classification" and (problem := _label_problem(row["label"])):
        return problem
    field = TARGET_FIELDS.get(fmt)
    if (target or fmt == "text") and field and isinstance(row[field], str) and not row[field].strip():
        return f"field '{field}' is empty"
    present = [f for f in (*REQUIRED_FIELDS[fmt], *OPTIONAL_FIELDS.get(fmt, ())) if row.get(f) is not None and f != "label"]
    return next((p for f in present if (p := _text_problem(f"field '{f}'", row[f]))), None)


def _sharegpt_problem(row: dict, fmt: str, target: bool, train_on: str) -> str | None:
    """`_row_problem` of a row `sharegpt_rows` converted, in the row's own words (`conversations[i].value`)."""
    for i, turn in enumerate(row["conversations"]):
        if not isinstance(turn["from"], str) or turn["from"] not in SHAREGPT_ROLES:  # (a list is no dict key)
            name = str(turn["from"]).lower()
            meant = f"'{name}'" if name in SHAREGPT_ROLES else _SPEAKER_NAMES.get(name)
            return (f"conversations[{i}].from is {turn['from']!r}, not a ShareGPT speaker ({SHAREGPT_SPEAKERS})"
                    + (f"; rename it {meant}" if meant else ""))
        if turn["from"] == "function_call" and (problem := _function_calls(turn["value"])[1]):
            return f"conversations[{i}].value {problem}"
        if not _valid_weight(weight := turn.get("weight")):
            return (f"conversations[{i}].weight is {_json_type(weight)} ({json.dumps(weight, default=str)}); give 0 "
                    "(not trained) or 1 (trained), or null or none for its role's default")
        if weight == 1 and SHAREGPT_ROLES[turn["from"]] != "assistant":
            return (f"conversations[{i}].weight is 1 on a '{turn['from']}' turn: only gpt (assistant) turns are "
                    "trained (data.train_on: all trains every turn); give 0, or leave it out")
        if target and weight == 0 and train_on == "all" and SHAREGPT_ROLES[turn["from"]] != "assistant":
            return (f"conversations[{i}].weight is 0 on a '{turn['from']}' turn, but data.train_on: all trains every "
                    "turn and masks only gpt (assistant) turns marked 0; leave it out, or set data.train_on: answers")
    problem = _row_problem({k: v for k, v in row.items() if k != SHAREGPT}, fmt, target, train_on)
    return None if problem is None else sharegpt_words(problem, row)


def sharegpt_words(text: str, row: dict) -> str:
    """`text` about a row (a problem, a warning) in the row's own words where `sharegpt_rows` converted it: its
    `messages[2].content` as `conversations[1].value`, a message from its `system` field as `field 'system'`."""
    if not row.get(SHAREGPT):
        return text
    own = [m for m in row["messages"] if not isinstance(m, SystemPrompt)]  # (`message_name` numbers these)
    shift = len(own) - len(row["conversations"])  # a `system` field's turn in front
    text = re.sub(r"messages\[(\d+)\]", lambda m: f"conversations[{int(m.group(1)) - shift}]"
                  if int(m.group(1)) >= shift else "field 'system'", text)
    return (text.replace("].content", "].value").replace(f"].{TRAIN}", "].weight")
            .replace("field 'system'.content", "field 'system'"))


_NESTED = {
    list: (" (one class a row: a list of labels, multi-label classification as datasets' Sequence(ClassLabel), is not "
           "supported)"),
    dict: (" (a struct: data.columns names a top-level column; datasets' Dataset.flatten() makes each of its fields "
           "one, named as 'meta.label')"),
}
"""Why a label read as a list or a struct (a `datasets` column nested in one, ClassLabel or not) is no class."""


def _label_problem(label: object) -> str | None:
    """A classification label is a class name (string) or a class id (integer >= 0), or a ClassLabel column's id of
    one of its names."""
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        got = type(label).__name__
        return f"field 'label' must be a string or an integer, got {got}" + _NESTED.get(type(label), "")
    if isinstance(label, ClassId):
        return class_label_problem(label)
    if isinstance(label, int) and label < 0:
        return f"field 'label' is {label}; an integer label is a class id, 0 or more"
    if isinstance(label, str) and not label.strip():
        return "field 'label' is an empty string"
    return None


def _messages_problem(messages: object, target: bool = True, train_on: str = "answers") -> str | None:
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and ("content" in m or
                                                                                          m.get("tool_calls"))
                                                 for m in messages):
        return "'messages' must be a list of {role, content} objects"
    for i, m in enumerate(messages):
        calls = m.get("tool_calls")  # an assistant turn that calls tools (OpenAI's and transformers' form)
        calls = None if calls == [] else calls  # (OpenAI's logs write [] in turns without calls, users' too)
        if calls is not None and not (m["role"] == "assistant" and isinstance(calls, list) and calls
                                      and all(isinstance(c, dict) for c in calls)):
            return (f"messages[{i}].tool_calls must be a nonempty list of objects, in an assistant message (or "
                    "null)")
        for j, call in enumerate(calls or []):
            if problem := _call_problem(call):
                return f"messages[{i}].tool_calls[{j}]{problem}"
        for key in ("role", "content"):
            if (key == "role" or m.get(key) is not None or not calls) and (
                    problem := _text_problem(f"messages[{i}].{key}", m.get(key))):
                return problem
        if m["role"] not in CHAT_ROLES:
            meant = m["role"].lower() if m["role"].lower() in CHAT_ROLES else _ROLE_NAMES.get(m["role"].lower())
            return (f"messages[{i}].role is {m['role']!r}, not a chat role ({', '.join(CHAT_ROLES)})"
                    + (f"; rename it {meant!r}" if meant else ""))
        if target and m["role"] == "assistant" and not calls and not m["content"].strip():
            return f"messages[{i}].content is empty (an assistant turn)"
        if problem := _train_problem(m, i, target and train_on == "all"):
            return problem
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not answers:
        return "no assistant message to learn from"
    if target and train_on != "all" and all(train_mark(messages[i]) is False for i in answers):  # (all: others train)
        return (f"no assistant message to learn from: each is marked not to be trained "
                f"({', '.join(f'messages[{i}].{train_key(messages[i])}' for i in answers)}); train one, or leave the "
                "row out")
    return None


def _train_problem(message: dict, i: int, all_trained: bool = False) -> str | None:
    """What is wrong with a message's `TRAIN` key or its alias (both; true or false, on an assistant turn; false, or null, anywhere but
    where `all_trained`, data.train_on: all, trains every message: only an assistant turn's spans are found, so a
    user or system message's false would be ignored and its tokens trained)."""
    if all(message.get(key) is not None for key in TRAIN_KEYS):  # (a null is none: `train_key`)
        return (f"messages[{i}] has both '{TRAIN}' and 'training' (axolotl's older name of it); keep one")
    key, train = train_key(message), train_mark(message)
    if train is not None and not isinstance(train, bool):
        return (f"messages[{i}].{key} is {_json_type(train)} ({json.dumps(train, default=str)}); give true or "
                "false (whether this assistant turn is trained), or leave it out")
    if train and message["role"] != "assistant":
        return (f"messages[{i}].{key} is true on a {message['role']} message: only assistant messages are trained "
                "(data.train_on: all trains every message); give false, or leave it out")
    if train is False and all_trained and message["role"] != "assistant":
        return (f"messages[{i}].{key} is false on a {message['role']} message, but data.train_on: all trains every "
                "message and masks only assistant messages marked false; leave it out, or set data.train_on: answers")
    return None


def _call_problem(call: dict) -> str | None:
    """What is wrong with a `messages` row's tool call, said after its key path (`.function.name must be ...`), or
    None. JSON text of an object in `arguments` was read as it, and a call without the `function` wrapper wrapped
    (`_with_call_arguments`): such a call's problem names its own keys."""
    form = ('a tool call is {"type": "function", "function": {"name": ..., "arguments": {...}}}, or {"name": ..., '
            '"arguments": {...}}')
    path = "" if isinstance(call, BareCall) else ".function"
    function = call.get("function")
    if not isinstance(function, dict):
        return (f" has no 'function' (nor 'name'); {form}" if function is None else
                f".function is {_json_type(function)}, not an object; {form}")
    if not isinstance(function.get("name"), str) or not function["name"].strip():
        name = function.get("name")
        given = ("is missing" if "name" not in function else "is empty" if isinstance(name, str)
                 else f"is {_json_type(name)}")
        return f"{path}.name {given}; give the tool's name (a nonempty string)"
    arguments = function.get("arguments")
    if not isinstance(arguments, dict):
        given = ("is missing" if "arguments" not in function else "is a string that is not JSON text of an object"
                 if isinstance(arguments, str) else f"is {_json_type(arguments)}, not an object")
        return f"{path}.arguments {given}; give an object of the arguments by name ({{}} for none), or JSON text of one"
    return None


def _text_problem(name: str, value: object) -> str | None:
    if not isinstance(value, str):
        return f"{name} must be a string, got {type_name(value)}"
    if bad := _SURROGATE.search(value):
        return (f"{name} holds a lone surrogate \\u{ord(bad.group()):04x} at character {bad.start()}, which is not "
                "valid Unicode and cannot be tokenized")
    return None


