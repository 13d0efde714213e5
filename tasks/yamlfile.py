"""YAML/JSON files the user writes (run configs, custom benchmark definitions): where each key is.

`key_lines` maps every key path to its 1-based line, so an error can say file:line, and refuses a
key given twice (YAML would silently keep the last one); `json_loads` does the same for JSON rows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml


def read_text(path: str | Path, error: type[Exception] = ValueError) -> str:
    """A file the user wrote, as UTF-8 text; `error` names its file:line if it is not UTF-8."""
    data = Path(path).expanduser().read_bytes()
    try:
        return data.decode("utf-8-sig")  # a byte-order mark (some Windows editors write one) is not text
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise error(f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save the file as UTF-8") from None


class KeyTwice(ValueError):
    """A JSON object with a key twice, whose first value json would drop without a word."""


def unique_keys(pairs: list[tuple]) -> dict:
    """json's object_pairs_hook: the object, each key once (KeyTwice otherwise)."""
    found: dict = {}
    for key, value in pairs:
        if key in found:
            raise KeyTwice(f"key {key!r} twice in one object (JSON readers keep only the last value; "
                           "write each key once)")
        found[key] = value
    return found


def json_loads(text: str | bytes):
    """json.loads for files the user wrote: a key twice in one object raises KeyTwice."""
    return json.loads(text, object_pairs_hook=unique_keys)


def json_list_items(text: str) -> list[tuple[int, object]]:
    """(line, item) of each item of a JSON list, read as json_loads reads it; a key twice is a
    KeyTwice naming the item and its line (AlpacaEval's files are one list of hundreds of rows)."""
    decoder = json.JSONDecoder(object_pairs_hook=unique_keys)
    space = re.compile(r"\s*")
    i = space.match(text).end()
    if text[i:i + 1] != "[":
        return [(1, item) for item in json_loads(text)]  # not a list: json's own error, or the caller's
    items, i = [], space.match(text, i + 1).end()
    while text[i:i + 1] != "]":
        line = text.count("\n", 0, i) + 1
        try:
            item, i = decoder.raw_decode(text, i)
        except KeyTwice as err:
            raise KeyTwice(f"item {len(items) + 1} (line {line}): {err}") from None
        except json.JSONDecodeError:
            json_loads(text)  # json's own message, with its line
            raise
        items.append((line, item))
        i = space.match(text, i).end()
        if text[i:i + 1] == ",":
            i = space.match(text, i + 1).end()
            if text[i:i + 1] == "]":  # a trailing comma, which json refuses
                json_loads(text)
                raise json.JSONDecodeError("Expecting value", text, i)
        elif text[i:i + 1] != "]":  # a missing comma or bracket: json's own message, with its line
            json_loads(text)
            raise json.JSONDecodeError("Expecting ',' delimiter", text, i)
    if text[space.match(text, i + 1).end():]:  # text after the list
        json_loads(text)
        raise json.JSONDecodeError("Extra data", text, i + 1)
    return items


def key_lines(text: str, where: str, error: type[Exception] = ValueError) -> dict[tuple, int]:
    """1-based line of every key and list entry, by path (("scorer_args", "pattern") -> 7)."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return {}  # valid JSON that YAML 1.1 can't compose: errors just go without a line
    lines: dict[tuple, int] = {}

    def walk(node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = (*path, key.value)
                if sub in lines:
                    raise error(f"{where}:{key.start_mark.line + 1}: key {key.value!r} appears twice "
                                f"(first on line {lines[sub]}); keep one")
                lines[sub] = key.start_mark.line + 1
                walk(value, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, value in enumerate(node.value):
                lines[(*path, i)] = value.start_mark.line + 1
                walk(value, (*path, i))

    walk(root, ())
    return lines


def at(where: str, lines: dict[tuple, int], loc: tuple) -> str:
    """'file:line' for the deepest part of `loc` that has a line, else 'file'."""
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return f"{where}:{lines[loc[:n]]}"
    return where


def yaml_error(path: str, err: yaml.YAMLError) -> str:
    """'file:line: not valid YAML (problem); fix the syntax'."""
    mark = getattr(err, "problem_mark", None)
    line = f":{mark.line + 1}" if mark else ""
    return f"{path}{line}: not valid YAML ({getattr(err, 'problem', None) or err}); fix the syntax"
