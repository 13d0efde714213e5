"""One conversation at a time: what is wrong with a row, what shapes it has, and how it is
normalised before training. Pure functions of a row; tasks/data.py runs them in batched maps.

Normalisation rewrites two things and nothing else:
- the seed tutorial's tool-call shorthand (`tool_calls: [{tool: N, parameters: P}]`, `tool_name`
  on tool replies) into the shape Hugging Face chat templates render
  (`{type: 'function', function: {name: N, arguments: P}}`, `name`);
- with data.special_tokens_in_text='escape', every special token of the model typed inside the
  text (e.g. '<|im_start|>') gets a zero-width space after its first character, so the tokenizer
  reads it as plain text and never as the control token ('reject', the default, makes it a bad row).
"""

from __future__ import annotations

import json
import re

ROLES = {"system", "user", "assistant", "tool"}
PART_TYPES = ("text", "image")
SHAPES = ("tool_calls", "tool_messages", "multimodal")
# Breaks a special token's text so the tokenizer no longer matches it; invisible when printed.
ESCAPE = "\u200b"
# Checked when the caller does not pass the model's own tokens: ChatML's, which SmolLM2 uses and
# smolflow clones onto template-less models.
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


# pattern text -> whether every token reads the same inside JSON text (no quote, backslash or
# control character), so that one search of a row's JSON can rule tokens out.
_JSON_SAFE: dict[str, bool] = {}


def token_pattern(tokens) -> re.Pattern | None:
    """One regex for all the tokens, longest first (so '<|a|>x' wins over '<|a|>')."""
    tokens = sorted({t for t in tokens if t}, key=len, reverse=True)
    if not tokens:
        return None
    pattern = re.compile("|".join(map(re.escape, tokens)))
    _JSON_SAFE[pattern.pattern] = all(json.dumps(t, ensure_ascii=False)[1:-1] == t for t in tokens)
    return pattern


def row_json(messages) -> str:
    """The row as canonical JSON text: its digest finds duplicates, and one search of it tells
    whether any special token is in the row (the per-string walk runs only on a hit)."""
    return json.dumps(messages, sort_keys=True, ensure_ascii=False)


def may_hold_token(text: str, pattern: re.Pattern | None) -> bool:
    """A cheap pre-check on `row_json` text: False means no string of the row holds a token."""
    return pattern is not None and (pattern.search(text) is not None or not _JSON_SAFE.get(pattern.pattern))


def _strings(value, path: str = ""):
    """(path, string) for every string the template may render: contents, part texts, tool names and arguments."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, list):
        for j, item in enumerate(value):
            yield from _strings(item, f"{path}[{j}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            if key != "role":  # checked against ROLES; never free text
                yield from _strings(item, f"{path}.{key}")


def special_token_problem(messages: list[dict], pattern: re.Pattern | None) -> str | None:
    """The first special token typed inside a message's text, as a row problem."""
    if pattern is None:
        return None
    for i, m in enumerate(messages):
        for path, text in _strings(m):
            if found := pattern.search(text):
                return (f"messages[{i}]{path} contains the special token {found.group(0)!r}: it would be trained as "
                        "a control token, not as text (remove it, or set data.special_tokens_in_text='escape')")
    return None


def _escape_text(value, pattern: re.Pattern):
    if isinstance(value, str):
        return pattern.sub(lambda m: m.group(0)[0] + ESCAPE + m.group(0)[1:], value)
    if isinstance(value, list):
        return [_escape_text(v, pattern) for v in value]
    if isinstance(value, dict):
        return {k: v if k == "role" else _escape_text(v, pattern) for k, v in value.items()}
    return value


def _seed_call(call):
    """The seed's {tool: N, parameters: P} as {type: 'function', function: {name: N, arguments: P}}."""
    if isinstance(call, dict) and "tool" in call and "function" not in call and set(call) <= {"tool", "parameters", "id"}:
        out = {"type": "function", "function": {"name": call["tool"], "arguments": call.get("parameters") or {}}}
        return out | ({"id": call["id"]} if call.get("id") is not None else {})
    return call


def normalize(messages, pattern: re.Pattern | None = None, escape: bool = False) -> tuple[object, list[str]]:
    """(the row as later stages want it, what was rewritten: 'seed tool-call shorthand',
    'special tokens escaped'). A row that is not a list of dicts comes back as it is."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return messages, []
    if not escape and not any(m.get("tool_calls") or "tool_name" in m for m in messages):
        return messages, []  # the common case: nothing to rewrite
    changes, out = [], []
    for m in messages:
        calls = m.get("tool_calls")
        if isinstance(calls, list) and any(_seed_call(c) is not c for c in calls):
            m = m | {"tool_calls": [_seed_call(c) for c in calls]}
            changes.append("seed tool-call shorthand")
        if m.get("role") == "tool" and "tool_name" in m and m.get("name") is None:
            m = {k: v for k, v in m.items() if k != "tool_name"} | {"name": m["tool_name"]}
            changes.append("seed tool-call shorthand")
        out.append(m)
    if escape and may_hold_token(row_json(out), pattern) and special_token_problem(out, pattern):
        out = [_escape_text(m, pattern) for m in out]
        changes.append("special tokens escaped")
    return out, sorted(set(changes))


# ShareGPT's speakers (axolotl, LLaMA-Factory, FastChat) as chat roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "system": "system", "tool": "tool", "observation": "tool"}


def sharegpt_to_messages(conversation, system=None) -> object:
    """A ShareGPT row ({from, value} turns, and the format's optional `system` prompt) as messages;
    turns of another shape are kept as they are, for the row checks to name."""
    if not isinstance(conversation, list):
        return conversation
    turns = [{"role": SHAREGPT_ROLES.get(t["from"], t["from"]), "content": t["value"]}
             | {k: v for k, v in t.items() if k not in ("from", "value")}
             if isinstance(t, dict) and "from" in t and "value" in t else t for t in conversation]
    starts_with_system = bool(turns) and isinstance(turns[0], dict) and turns[0].get("role") == "system"
    if isinstance(system, str) and system.strip() and not starts_with_system:
        turns.insert(0, {"role": "system", "content": system})
    return turns


def sharegpt_problem(conversation) -> str | None:
    """A `from` ShareGPT does not define, named as the user wrote it (converted, it was reported as
    `messages[i].role`, a field the file does not have)."""
    for j, turn in enumerate(conversation if isinstance(conversation, list) else []):
        if isinstance(turn, dict) and "from" in turn and turn["from"] not in SHAREGPT_ROLES:
            return f"conversations[{j}].from is {turn['from']!r}, expected one of {sorted(SHAREGPT_ROLES)}"
    return None


def pairs_to_messages(prompt, completion) -> list:
    """TRL's prompt/completion pair (plain text, or lists of messages) as one conversation."""
    def turns(value, role):
        return list(value) if isinstance(value, list) else [{"role": role, "content": value}]

    return turns(prompt, "user") + turns(completion, "assistant")


def as_written(messages: list[dict]) -> list[dict]:
    """A conversation without the null fields Arrow adds so that all rows share one schema (a
    `tool_calls: None` on every plain turn, `text: None` on image parts): templates test `is
    defined`, so those nulls must not reach them."""
    def strip(value, key=None):
        if key == "arguments":  # the caller's own data, nulls included
            return value
        if isinstance(value, list):
            return [strip(v) for v in value]
        if isinstance(value, dict):
            return {k: strip(v, k) for k, v in value.items() if v is not None or k == "content"}
        return value

    return strip(messages)


def _content_problem(i: int, m: dict) -> str | None:
    content = m.get("content")
    if isinstance(content, list):  # multimodal: a list of {type: text|image} parts
        if not content:
            return f"messages[{i}].content is an empty list of parts"
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in PART_TYPES:
                return (f"messages[{i}].content[{j}] has type {kind!r}, expected a part "
                        "{type: 'text', text: ...} or {type: 'image', ...}")
            if kind == "text" and (not isinstance(part.get("text"), str) or not part["text"].strip()):
                return f"messages[{i}].content[{j}] is a text part without text"
        return None
    if content in (None, "") and m.get("tool_calls"):
        return None  # an assistant turn that only calls tools
    if not isinstance(content, str) or not content.strip():
        return f"messages[{i}].content is empty or not a string (nor a list of {{type: text|image}} parts)"
    return None


# Per-turn loss switches other tools read (axolotl's `weight: 0` / `train: false`): smolflow trains on
# whole conversations, or on assistant turns only (template.assistant_only_loss), never per turn.
_TURN_SWITCHES = {"weight": lambda v: v not in (None, 1, 1.0, True), "train": lambda v: v not in (None, True),
                  "training": lambda v: v not in (None, True)}


def _turn_switch_problem(i: int, m: dict) -> str | None:
    for key, masks in _TURN_SWITCHES.items():
        if key in m and masks(m[key]):
            return (f"messages[{i}].{key}={m[key]!r}: per-turn loss switches are not read (the turn would be "
                    "trained on); remove the key, or set template.assistant_only_loss: true to train on assistant "
                    "turns only")
    return None


def _tool_calls_problem(i: int, m: dict) -> str | None:
    calls = m.get("tool_calls")
    if calls is None:
        return None
    if m["role"] != "assistant":
        return f"messages[{i}] has tool_calls but role {m['role']!r} (only assistant turns call tools)"
    if not isinstance(calls, list) or not calls:
        return f"messages[{i}].tool_calls is not a non-empty list"
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"] \
                or call.get("type", "function") not in ("function", None):
            return (f"messages[{i}].tool_calls[{j}] is not {{type: 'function', function: {{name, arguments}}}} "
                    "nor the seed's {tool: name, parameters: {...}}")
        if not isinstance(fn.get("arguments"), (dict, str)):
            return f"messages[{i}].tool_calls[{j}].function.arguments is not an object or a JSON string"
    return None


def row_problem(messages) -> str | None:
    """Why a row can't be trained on, or None. Messages follow smoltalk's schema."""
    if messages is None:
        return "missing `messages`"
    if not isinstance(messages, list):
        return f"`messages` is a {type(messages).__name__}, not a list"
    if not messages:
        return "`messages` is empty"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"messages[{i}] is not a dict"
        if m.get("role") not in ROLES:
            return f"messages[{i}].role is {m.get('role')!r}, expected one of {sorted(ROLES)}"
        if problem := _tool_calls_problem(i, m) or _content_problem(i, m) or _turn_switch_problem(i, m):
            return problem
    if any(m["role"] == "system" for m in messages[1:]):
        return "a system message that is not first (templates only accept it as messages[0])"
    for i in range(1, len(messages)):
        if messages[i]["role"] == messages[i - 1]["role"] in ("user", "assistant"):
            return f"messages[{i - 1}] and messages[{i}] are both {messages[i]['role']!r} turns (roles must alternate)"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn to learn from"
    if not any(m["role"] == "user" for m in messages):
        return "no user turn (the assistant answers nobody: add the user's message, or drop the row)"
    return None


def row_shapes(messages: list[dict]) -> tuple[bool, bool, bool]:
    """(calls tools, has tool replies, has content as a list of parts) for a good row."""
    return (any(m.get("tool_calls") for m in messages), any(m["role"] == "tool" for m in messages),
            any(isinstance(m.get("content"), list) for m in messages))


def reason_kind(problem: str) -> str:
    """A problem without its row's particulars (indices, values), for counting by reason."""
    if problem.startswith("duplicate"):
        return "duplicate row"
    if problem.startswith("not valid JSON"):
        return "not valid JSON"
    if problem.startswith("key ") and " twice in one object" in problem:
        return "a key twice in one object"
    kind = re.sub(r"\[\d+\]", "[i]", problem)
    kind = re.sub(r"\.role is .*", ".role is not a known role", kind)
    kind = re.sub(r"has type .*", "has an unknown part type", kind)
    kind = re.sub(r" contains the special token .*", " contains a special token", kind)
    return kind.split(" (")[0]
