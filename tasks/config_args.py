"""A RunConfig from a YAML file and `--section.field value` flags, with errors that name the place.

    --config FILE | --config=FILE        a whole config (YAML or JSON)
    --training.max-steps 100             a field (dashes or underscores: --training.max_steps=100)
    --benchmarks '[{"name": "mmlu"}]'    values are read as YAML, so JSON lists and dicts work

Flags apply on top of the file. A bad value is reported as `file:line: field: problem` or
`flag --x: field: problem` (UserError), never as a traceback.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError

from tasks.arena_config import ArenaConfig
from tasks.config import RunConfig
from tasks.yamlfile import at, key_lines, read_text, yaml_error


class UserError(ValueError):
    """Bad input from the user: the message says where and what to change."""


def _field_key(flag: str) -> tuple[str, ...]:
    return tuple(part.replace("-", "_") for part in flag.split("."))


def split_flags(argv: list[str]) -> tuple[str | None, list[tuple[tuple[str, ...], str | None, str]]]:
    """(config file, [(field path, value, flag as typed)]) from the command line."""
    config, flags, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise UserError(f"unexpected argument {arg!r}: settings are given as --section.field VALUE")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            elif name != "config":
                value = None  # a bare flag: on, for a boolean (parse_config checks)
            else:
                raise UserError("--config needs a file: --config FILE.yaml")
        if name == "config":
            if config is not None:  # the second replaced the first, silently: which one did the user mean?
                raise UserError(f"--config given twice ({config}, {value}): give one file; flags override its settings")
            config = value
        else:
            flags.append((_field_key(name), value, f"--{name}"))
        i += 1
    return config, flags


def _read_config_file(path: str) -> tuple[dict, dict[tuple, int]]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"--config {path}: no such file")
    text = read_text(file, UserError)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(yaml_error(path, err)) from None
    if data is None:  # an empty file (or only comments): every default
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config file is a mapping of sections (model, data, training, ...), "
                        f"got {type(data).__name__}")
    return data, key_lines(text, path, UserError)


def _set(data: dict, key: tuple[str, ...], value: Any) -> None:
    for part in key[:-1]:
        data = data.setdefault(part, {})
        if not isinstance(data, dict):
            raise UserError(f"--{'.'.join(key)}: {part} is not a section")
    data[key[-1]] = value


def _is_flag(model: type[BaseModel], key: tuple[str, ...]) -> bool:
    """Whether the setting at `key` is a boolean, which a bare flag switches on (unknown: True, so
    validation names the unknown setting)."""
    annotation: Any = model
    for part in key:
        models = [a for a in (get_args(annotation) or (annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not models or part not in models[0].model_fields:
            return True
        annotation = models[0].model_fields[part].annotation
    return bool in (get_args(annotation) or (annotation,))


def _fields(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _explain(err: dict, model: type[BaseModel] = RunConfig) -> str:
    loc = tuple(err["loc"])
    field = ".".join(str(p) for p in loc) or "config"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        section: type[BaseModel] = model
        for part in loc[:-1]:
            if isinstance(part, int):
                continue
            annotation = section.model_fields[part].annotation
            inner = [a for a in (get_args(annotation) or (annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)]
            if get_origin(annotation) in (list, tuple) or inner:
                section = inner[0] if inner else section
        near = difflib.get_close_matches(str(loc[-1]), _fields(section), n=1)
        return f"{field}: unknown setting" + (f"; did you mean {near[0]!r}?" if near else "") + \
            f" (known: {', '.join(_fields(section))})"
    if err["type"] == "value_error":  # a section's own check names its fields already
        # RunConfig's own checks (loc ()) name a field of a section (training.max_steps, gate.tolerance):
        # kept as they are, so parse_config blames where that field was set, not the first flag given.
        return msg if msg.startswith(f"{field}.") or (not loc and _FIELD.match(msg)) else f"{field}: {msg}"
    return f"{field}: {msg}, got {err.get('input')!r}"


def parse_config(argv: list[str], defaults: dict | None = None, model: type[BaseModel] = RunConfig):
    """The config (a RunConfig, or e.g. the arena's) of a command line: defaults, then the --config
    file, then the flags."""
    path, flags = split_flags(argv)
    data, lines = _read_config_file(path) if path else ({}, {})
    data = (defaults or {}) | data
    where: dict[tuple, str] = {}
    for key, raw, flag in flags:
        if raw is None:
            if not _is_flag(model, key):
                raise UserError(f"{flag} needs a value: {flag} VALUE (only true/false settings may be given bare)")
            raw = "true"
        key_lines(raw, f"flag {flag}", UserError)  # a key given twice in a flag's mapping is refused too
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        # `null` / `~` is YAML's None (back to a setting's default of None); an empty value stays
        # the empty text, for the field's own check to refuse or accept.
        _set(data, key, raw if raw == "" else value)
        where[key] = f"flag {flag}"
    try:
        return model.model_validate(data)
    except ValidationError as err:
        found = []
        for e in err.errors():
            loc, explained = tuple(e["loc"]), _explain(e, model)
            # A section's own check (e.g. wandb.project while wandb.mode is disabled) fails at the
            # section and names its field first: blame where that field was set.
            named = _FIELD.match(explained)
            key = _key(named.group(1)) if named and _key(named.group(1))[: len(loc)] == loc else loc
            origin = next((w for k, w in reversed(where.items()) if key[: len(k)] == k), None)
            origin = origin or next((w for k, w in where.items() if loc[: len(k)] == k or k[: len(loc)] == loc), None)
            origin = origin or (at(path, lines, key if key in lines else loc) if path else "defaults")
            found.append(f"{origin}: {explained}")
        raise UserError("\n".join(found)) from None


class ServeConfig(RunConfig):
    """`smolflow serve`'s settings: the nightly's, plus the arena that runs after each nightly."""

    arena: ArenaConfig = Field(default_factory=ArenaConfig, description=(
        "The after-nightly arena's settings (`smolflow arena run --help`); its artifacts_uri is the nightly's."))


def serve_config(argv: list[str]) -> tuple[dict, dict]:
    """`smolflow serve`'s settings as the served deployments' parameters, (fine-tune, arena): only
    what was set (the defaults stay the code's, so an upgrade's new defaults apply after a restart)."""
    config = parse_config(argv, model=ServeConfig)
    if config.output.run_id is not None:  # every night would resume (or overwrite) that one run
        raise UserError(locate(argv, "output.run_id: served runs get a new run id each; remove it"))
    if "artifacts_uri" in config.arena.model_fields_set:  # two roots: the arena would rate none of the nightly's runs
        raise UserError(locate(argv, "arena.artifacts_uri: the arena reads the nightly's runs, under output.artifacts_uri; "
                                     "remove it"))
    arena = config.arena.model_dump(mode="json", exclude_unset=True)
    return {"config": config.model_dump(mode="json", exclude_unset=True, exclude={"arena"})}, {"config": arena}


_FIELD = re.compile(r"([a-z_]+(?:\.[a-z_0-9]+|\[\d+\])+)[:= ]")


def _key(field: str) -> tuple:
    """('training', 'sft_args', 'x') for 'training.sft_args.x'; list indexes as ints."""
    return tuple(int(p) if p.isdigit() else p for p in re.findall(r"[a-z_0-9]+", field))


def locate(argv: list[str], message: str) -> str:
    """`message` of a check after parsing, which starts with a field (`training.sft_args.x: ...`),
    prefixed with where that field was set: `file:line` or `flag --x` (unchanged if neither)."""
    found = _FIELD.match(message)
    if not found:
        return message
    key = _key(found.group(1))
    path, flags = split_flags(argv)
    for flag_key, _, flag in reversed(flags):  # the last flag setting it wins, as in parse_config
        if key[: len(flag_key)] == flag_key or flag_key[: len(key)] == key:
            return f"flag {flag}: {message}"
    if path:
        lines = key_lines(read_text(path, UserError), path, UserError)
        if any(key[:n] in lines for n in range(1, len(key) + 1)):
            return f"{at(path, lines, key)}: {message}"
    return message


def config_help(model: type[BaseModel] = RunConfig, leave_out: dict | None = None,
                example: str = "training: {max_steps: 100}") -> str:
    """Every setting as a flag, with its default and description; `leave_out`: {section: None (all of
    it) or its fields} a command does not take."""
    out, leave_out = [], leave_out or {}

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            section = prefix.rstrip(".")
            if (not prefix and name in leave_out and leave_out[name] is None) or name in (leave_out.get(section) or ()):
                continue
            flag = f"{prefix}{name}".replace("_", "-")
            ann = info.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                out.append(f"\n{flag}: {(ann.__doc__ or '').strip().splitlines()[0]}")
                walk(ann, f"{prefix}{name}.")
                continue
            default = info.get_default(call_default_factory=True)
            if isinstance(default, list) and default and isinstance(default[0], BaseModel):
                default = [d.model_dump() for d in default]
            shown = json.dumps(default) if not isinstance(default, str) else default
            out.append(f"  --{flag} (default: {shown})\n      {info.description or ''}".rstrip())

    walk(model, "")
    return (f"Settings: --config FILE, a YAML or JSON file of them nested by section (e.g. `{example}`), "
            "then any flag below on top of it; each flag also accepts underscores and --flag=VALUE, and values "
            "are read as YAML (lists and dicts work):\n" + "\n".join(out) + "\n")


def port_number(text: str) -> int:
    """argparse type of a --port: 1 to 65535, refused as the arguments are read (a bind then failed
    in an OverflowError traceback, after the URL was printed)."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: give a number from 1 to 65535")
    return port


def seconds(text: str) -> float:
    """argparse type of a wait in seconds: a finite number above 0 (`--startup-timeout -5` started
    the server, then said it "did not answer within -5 s")."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds: give a number above 0, e.g. 300")
    return value
