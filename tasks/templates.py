"""Chat-template stage: choose the template, make sure every assistant turn ends in the EOS the model
stops on, check that the data's tool calls and image parts really render, and preview it all.

Choices (`template.chat_template`): 'model' keeps the model's own template; a template-less base model
gets ChatML as SmolLM2-Instruct has it (TRL's `clone_chat_template` adds <|im_start|>/<|im_end|> where
the vocabulary lacks them) with <|im_end|> as EOS. A name picks a template shipped in
tasks/chat_templates/; anything else is a local .jinja file. Why the EOS check: a model never trained
on the token it stops on generates forever (TRL issue 2059)."""

from __future__ import annotations

import hashlib
import html
import json
import re
from dataclasses import dataclass
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE, CachePolicy
from pydantic import BaseModel

from tasks.config import TemplateConfig
from tasks.data import SHAPES, DatasetRef, as_written, num_proc_for, row_shapes
from tasks.models import ModelRef, convert_builtin, fingerprint_dir, load_model
from tasks.layout import RunPaths
from tasks.caching import BY_CONTENT
from tasks.prefect_markdown import publish_markdown
from tasks.runtime import atomic_dir, cache_dir, retry_transient, run_logger
from tasks.storage import ArtifactStore
from tasks.yamlfile import read_text

TEMPLATE_DIR = Path(__file__).parent / "chat_templates"
SHIPPED = ("chatml", "chatml-assistant-only", "mistral", "llama3")
CHOICES = ("model", *SHIPPED)
PREVIEW_KEY = "smolflow-chat-templates"
# Written next to a templated model whose vocabulary the template stage grew (e.g. Llama-3's <|eot_id|>
# as SmolLM2's EOS, ChatML's tokens cloned in): the new token ids, whose embedding rows nothing has
# trained yet. Training makes them trainable under LoRA (tasks/lora.py, new_token_rows).
ADDED_TOKENS_FILE = "smolflow_added_tokens.json"
PREVIEW_PATH = RunPaths.template_preview
# The renderings every preview compares, and the markers each writes as text.
COMPARED = {"ChatML (SmolLM2-Instruct)": "chatml", "Mistral-Instruct": "mistral", "Llama-3-Instruct": "llama3"}
MARKERS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "mistral": ("<s>", "[INST]", "[/INST]", "</s>"),
    "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
}
SYSTEM_EXAMPLE = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi! How can I help you today?"},
    {"role": "user", "content": "What's the weather?"},
    {"role": "assistant", "content": "I can't check live weather, but a forecast app can."},
]
_PROBE_ANSWER = "smolflow probe answer"
_PROBE = [{"role": "user", "content": "smolflow probe question"}, {"role": "assistant", "content": _PROBE_ANSWER}]
_FIX_SHAPES = ("use template.chat_template='llama3' (renders tool calls, tool replies and image parts) "
               "or a .jinja file that does, or drop those rows from the data")


class TemplatedModel(BaseModel):
    model: ModelRef
    template_source: str  # what the template is, e.g. "model", "chatml (cloned from ...)", "llama3 (...jinja)"
    rendered_example: str  # the first training conversation as the model will see it
    template_name: str = "model"  # the template used: 'model', a shipped name, or the .jinja path
    assistant_only: bool = False  # loss on assistant replies (and their EOS) only
    loss_why: str = ""  # how template.assistant_only_loss 'auto' decided it, when it did
    eos_token: str = ""  # what every assistant turn ends with and generation stops on
    shapes: dict[str, int] = {}  # rows with tool_calls / tool replies / content parts (train + test)
    preview: str = ""  # markdown: the renderings under ChatML, Mistral, Llama-3 and this run's template


class TemplateError(ValueError):
    pass


# ---- which template ------------------------------------------------------------------------


def shipped_text(name: str) -> str:
    return (TEMPLATE_DIR / f"{name}.jinja").read_text(encoding="utf-8")


def template_choice(value: str) -> tuple[str, str | None]:
    """(name, Jinja text) for template.chat_template; text None for 'model' (the model's own)."""
    if value == "model":
        return value, None
    if value in SHIPPED:
        return value, shipped_text(value)
    path = Path(value).expanduser()
    if path.is_file():
        # As UTF-8 whatever the locale (a latin-1 one trained on mojibake), without a byte-order mark.
        return str(path.resolve()), read_text(path, TemplateError)
    choices = ", ".join(repr(c) for c in CHOICES)
    if value.endswith(".jinja") or "/" in value or value.startswith((".", "~")):
        raise TemplateError(f"template.chat_template={value!r}: no such file ({path.resolve()}). "
                            f"Give the path of an existing .jinja file, or one of {choices}.")
    raise TemplateError(f"template.chat_template={value!r} is not a known template: choose one of {choices}, "
                        "or give the path of a local .jinja file.")


def _texts_used(cfg: TemplateConfig) -> str | None:
    """Every template text this config may end up using ('model' can fall back to the ChatML files)."""
    try:
        _, text = template_choice(cfg.chat_template)
    except (TemplateError, OSError):
        return None  # the task itself raises the clear error
    return text if text is not None else shipped_text("chatml") + shipped_text("chatml-assistant-only")


@dataclass
class TemplateText(CachePolicy):
    """Key on the content of the template file(s) the config names: editing a .jinja (the user's,
    or one shipped here, data, not code: no part of the code key) must invalidate the cached result."""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs):
        text = _texts_used((inputs or {}).get("cfg") or TemplateConfig())
        return hashlib.sha256(text.encode()).hexdigest() if text is not None else None


def assistant_only_wanted(cfg: TemplateConfig, layout: str) -> tuple[bool, str]:
    """template.assistant_only_loss for rows laid out as `layout` (tasks/data.py layout_of): (on, why)."""
    if cfg.assistant_only_loss != "auto":
        return bool(cfg.assistant_only_loss), ""
    if layout == "prompt/completion":
        return True, "auto: prompt/completion rows, as TRL trains them"
    if layout == "sharegpt":
        return True, "auto: ShareGPT rows, as axolotl and LLaMA-Factory train them"
    return False, "auto: messages rows, as TRL trains them"


def effective_template(cfg: TemplateConfig, own: str | None, assistant_only: bool | None = None) -> tuple[str, str | None]:
    """The template to train with: template.chat_template, switched to the ChatML template with
    {% generation %} markers when assistant-only loss (`assistant_only`, else the setting) needs them."""
    name, text = template_choice(cfg.chat_template)
    if not (cfg.assistant_only_loss is True if assistant_only is None else assistant_only):
        return name, text
    from trl.chat_template_utils import has_generation_markers

    current = text if text is not None else own
    if current and has_generation_markers(current):
        return name, text
    if name == "chatml" or (name == "model" and (not own or "<|im_start|>" in own)):
        return "chatml-assistant-only", shipped_text("chatml-assistant-only")
    raise TemplateError(
        f"template.assistant_only_loss=true needs {{% generation %}} markers around each assistant reply, and "
        f"template.chat_template={cfg.chat_template!r} has none. Use template.chat_template='chatml-assistant-only' "
        "or 'llama3' (both have them), add the markers to your .jinja (around the reply AND its end-of-turn "
        "token), or set template.assistant_only_loss=false."
    )


# ---- EOS: every assistant turn must end in the token generation stops on --------------------


def _render(tokenizer, messages, template: str | None = None) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)


def _template_line(err: Exception) -> int | None:
    """The line of the template an error is at: a syntax error carries it, a runtime error (an
    undefined value, raise_exception()) has it in the traceback frame Jinja maps to the template."""
    import traceback

    from jinja2 import TemplateSyntaxError

    if isinstance(err, TemplateSyntaxError) and err.lineno:
        return err.lineno
    lines = [frame.lineno for frame in traceback.extract_tb(err.__traceback__) if frame.filename == "<template>"]
    return lines[-1] if lines else None


def end_of_turn(tokenizer, label: str) -> str:
    """The text the template writes right after an assistant reply, e.g. '<|im_end|>' or '</s>'."""
    try:
        rendered = _render(tokenizer, _PROBE)
    except Exception as err:  # Jinja syntax or runtime errors, raise_exception() in the template
        # The line, so a typo in a long .jinja is found without bisecting the file.
        where = f" (line {line} of the template)" if (line := _template_line(err)) else ""
        raise TemplateError(f"template {label} cannot render a plain user/assistant exchange{where}: "
                            f"{type(err).__name__}: {err}. Fix the template.") from err
    tail = rendered[rendered.rindex(_PROBE_ANSWER) + len(_PROBE_ANSWER):].split() if _PROBE_ANSWER in rendered else []
    if not tail:
        raise TemplateError(
            f"template {label} writes nothing after an assistant reply, so the model could never learn where "
            "its turn ends and would generate until max_new_tokens. Make the template end each assistant "
            "turn with an end-of-turn token (e.g. '<|im_end|>' or {{ eos_token }})."
        )
    return tail[0]


def _eos_follows_reply(tokenizer, end: str) -> bool:
    rendered = _render(tokenizer, _PROBE)
    pos = rendered.rindex(_PROBE_ANSWER) + len(_PROBE_ANSWER)
    pos = rendered.index(end, pos)
    enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    index = enc.char_to_token(pos)
    return (index is not None and enc["input_ids"][index] == tokenizer.eos_token_id
            and tuple(enc["offset_mapping"][index]) == (pos, pos + len(end)))


def ensure_eos(model, tokenizer, label: str) -> bool:
    """Make the template's end-of-turn text one token and the EOS (model + generation config, as
    clone_chat_template does); True if anything changed. A clear error if it can't be done."""
    from tokenizers import AddedToken

    end = end_of_turn(tokenizer, label)
    changed = False
    if not _eos_follows_reply(tokenizer, end):
        # Not one token yet (e.g. Llama-3's '<|eot_id|>' in SmolLM2's vocabulary), or not the EOS: make it
        # a special token (a new embedding row, which training teaches the model to emit) and the EOS.
        tokenizer.add_tokens([AddedToken(end, special=True, normalized=False)], special_tokens=True)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
        tokenizer.eos_token = end
        changed = True
    if not _eos_follows_reply(tokenizer, end):
        ids = tokenizer(end, add_special_tokens=False)["input_ids"]
        raise TemplateError(f"template {label} ends assistant turns with {end!r}, which this tokenizer turns into "
                            f"{ids}, not the EOS token {tokenizer.eos_token!r}: the model would not learn to stop. "
                            "End each assistant turn with {{ eos_token }} in the template.")
    eos_id = tokenizer.eos_token_id
    configured = [model.config.eos_token_id, model.generation_config.eos_token_id]
    if not all(eos_id == ids or (isinstance(ids, list) and eos_id in ids) for ids in configured):
        model.config.eos_token_id = model.generation_config.eos_token_id = eos_id
        changed = True
    return changed


def check_assistant_mask(tokenizer, label: str) -> None:
    """assistant-only loss: the {% generation %} span must hold the reply and its EOS."""
    enc = tokenizer.apply_chat_template(_PROBE, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    eos_in_loss = [m for i, m in zip(ids, mask) if i == tokenizer.eos_token_id][-1:] == [1]
    if not any(mask) or not eos_in_loss:
        raise TemplateError(f"template {label}: its {{% generation %}} block must enclose the assistant reply AND its "
                            f"end-of-turn token {tokenizer.eos_token!r}, or the model never learns to stop. "
                            "Move {% endgeneration %} after the end-of-turn token.")


# ---- tool calls and content parts: rendered, or a clear error ------------------------------


def _row_shapes(batch):
    flags = [row_shapes(messages) for messages in batch["messages"]]
    return {shape: [f[i] for f in flags] for i, shape in enumerate(SHAPES)}


def scan_shapes(split) -> dict[str, tuple[int, int | None]]:
    """{shape: (rows with it, first such row)}, by a batched map over the Arrow data (no row list)."""
    import numpy as np

    flags = split.map(_row_shapes, batched=True, remove_columns=split.column_names, keep_in_memory=True,
                      load_from_cache_file=False, num_proc=num_proc_for(len(split)), desc="Finding tool calls and parts")
    flags = flags.with_format("numpy")
    hits = {shape: np.flatnonzero(flags[shape]) for shape in SHAPES}
    return {shape: (int(h.size), int(h[0]) if h.size else None) for shape, h in hits.items()}


def _renders_differently(tokenizer, rendered: str, changed: list[dict]) -> bool:
    try:
        return _render(tokenizer, changed) != rendered
    except Exception:  # the template needs the removed parts to render at all: it does use them
        return True


def rendering_problem(tokenizer, shape: str, messages: list[dict]) -> str | None:
    """Why this row's tool calls / tool replies / content parts don't show in the rendering, or None."""
    try:
        rendered = _render(tokenizer, messages)
    except Exception as err:
        return f"rendering it fails ({type(err).__name__}: {err})"
    if shape == "tool_calls":
        names = [c["function"]["name"] for m in messages for c in (m.get("tool_calls") or [])]
        missing = [n for n in names if n and n not in rendered]
        without = [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]
        if missing or not _renders_differently(tokenizer, rendered, without):
            return f"the called function(s) {missing or names} do not appear in the rendering"
    elif shape == "tool_messages":
        missing = [m["content"] for m in messages if m.get("role") == "tool" and isinstance(m.get("content"), str)
                   and m["content"].strip() not in rendered]
        if missing:
            return f"the tool replies {missing[:2]} do not appear in the rendering"
    elif shape == "multimodal":
        parts = [p for m in messages if isinstance(m.get("content"), list) for p in m["content"]]
        missing = [p.get("text") for p in parts if p.get("type") == "text" and p.get("text", "") not in rendered]
        if missing:
            return f"the text parts {missing[:2]} do not appear in the rendering"
        no_images = [{**m, "content": [p for p in m["content"] if p.get("type") != "image"]}
                     if isinstance(m.get("content"), list) else m for m in messages]
        if any(p.get("type") == "image" for p in parts) and not _renders_differently(tokenizer, rendered, no_images):
            return "it writes no placeholder for the image parts: they would vanish silently"
    return None


def check_shapes(tokenizer, label: str, data: DatasetRef, splits) -> dict[str, int]:
    """Rows with tool calls, tool replies or content parts, per shape; raise if the template drops them."""
    if data.shapes and not any(data.shapes.get(shape, 1) for shape in SHAPES):  # the data stage counted none
        return {shape: 0 for shape in SHAPES}
    counts = {shape: 0 for shape in SHAPES}
    for split_name, split in splits.items():
        for shape, (n, first) in scan_shapes(split).items():
            counts[shape] += n
            problem = rendering_problem(tokenizer, shape, as_written(split[first]["messages"])) if n else None
            if problem:
                raise TemplateError(
                    f"template {label} does not render `{shape}`: in split {split_name!r}, {n} row(s) have them and "
                    f"for row {first} {problem}. Fix: {_FIX_SHAPES}."
                )
    return counts


# ---- the task --------------------------------------------------------------------------------


def _apply(model, tokenizer, name: str, text: str | None):
    """Put the template on the tokenizer (ChatML tokens cloned in where missing).
    Returns (model, tokenizer, source, changed)."""
    if text is None:
        return model, tokenizer, "model", False
    source = f"{name} (tasks/chat_templates/{name}.jinja)" if name in SHIPPED else f"file {name}"
    changed = tokenizer.chat_template != text
    if name.startswith("chatml") and not {"<|im_start|>", "<|im_end|>"} <= set(tokenizer.get_vocab()):
        from trl import clone_chat_template

        # The built-in SmolLM2-Instruct tokenizer carries ChatML and needs no network.
        chatml = convert_builtin()
        model, tokenizer, _ = clone_chat_template(model, tokenizer, str(chatml))
        source, changed = f"{name} (tasks/chat_templates/{name}.jinja; ChatML tokens cloned from {chatml.name})", True
    tokenizer.chat_template = text
    return model, tokenizer, source, changed


def _save(model, tokenizer, base: ModelRef, name: str, text: str, added: list[int]) -> ModelRef:
    slug = name if name in CHOICES else "file"
    # "-added": folders saved before ADDED_TOKENS_FILE existed lack it; they are not reused
    target = cache_dir("models") / (f"{base.fingerprint[:16]}-{slug}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
                                    + ("-added" if added else ""))
    if not (target / "config.json").exists():
        with atomic_dir(target) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            if added:
                (Path(staging) / ADDED_TOKENS_FILE).write_text(json.dumps(
                    {"token_ids": added, "tokens": tokenizer.convert_ids_to_tokens(added)}, indent=1) + "\n",
                    encoding="utf-8")
    return ModelRef(source=base.source, path=str(target), fingerprint=fingerprint_dir(target))


def added_token_ids(model_dir: Path) -> list[int]:
    """The ids of the tokens the template stage added to this model's vocabulary ([] if none)."""
    path = Path(model_dir) / ADDED_TOKENS_FILE
    return [int(i) for i in json.loads(path.read_text(encoding="utf-8"))["token_ids"]] if path.is_file() else []


@task(cache_policy=BY_CONTENT + TemplateText(), retries=1, retry_condition_fn=retry_transient)
def prepare_chat_template(base: ModelRef, data: DatasetRef, cfg: TemplateConfig = TemplateConfig()) -> TemplatedModel:
    """Set the run's chat template, check its EOS and the data's shapes on it, and preview it."""
    from datasets import load_from_disk

    model, tokenizer = load_model(base, as_stored=True)  # saved again below: keep the stored weights
    own, vocabulary = tokenizer.chat_template, len(tokenizer)
    on, why = assistant_only_wanted(cfg, data.layout)
    try:
        name, text = effective_template(cfg, own, on)
        if cfg.assistant_only_loss == "auto" and cfg.chat_template == "model" and name != "model" and own \
                and own != shipped_text("chatml"):
            # 'auto' swaps a model's own template only for the identical text with markers (SmolLM2's
            # ChatML), never another model's ChatML (its own system prompt); `true` asks for the swap.
            raise TemplateError(f"{cfg.chat_template!r} is not SmolLM2's ChatML")
    except TemplateError:
        if cfg.assistant_only_loss != "auto":
            raise
        on, why = False, (f"auto: {data.layout} rows, but template.chat_template={cfg.chat_template!r} cannot mark "
                          "the replies ({% generation %}); 'chatml-assistant-only' or 'llama3' can")
        run_logger().warning("template.assistant_only_loss %s", why)
        name, text = effective_template(cfg, own, False)
    if text is None and not own:  # a base model without a template: ChatML, as SmolLM2-Instruct has it
        name, text = "chatml", shipped_text("chatml")
    model, tokenizer, source, changed = _apply(model, tokenizer, name, text)
    label = repr(cfg.chat_template) + (f" (as {name!r})" if name != cfg.chat_template else "")
    if source == "model":
        label += f" ({Path(base.path).name}'s own template)"
    changed = ensure_eos(model, tokenizer, label) or changed
    if on:
        check_assistant_mask(tokenizer, label)
    splits = load_from_disk(data.path)
    shapes = check_shapes(tokenizer, label, data, splits)
    if changed:  # the ids past the original vocabulary are the tokens added (ChatML cloned in, the EOS)
        base = _save(model, tokenizer, base, name, tokenizer.chat_template, list(range(vocabulary, len(tokenizer))))
    example = as_written(splits["train"][0]["messages"])  # as tokenization renders it: no Arrow nulls
    rendered = _render(tokenizer, example)
    run_logger().info("Chat template: %s, EOS %r. First training example as rendered:\n%s",
                      source, tokenizer.eos_token, rendered)
    return TemplatedModel(
        model=base, template_source=source, rendered_example=rendered, template_name=name,
        assistant_only=on, loss_why=why, eos_token=tokenizer.eos_token, shapes=shapes,
        preview=preview_markdown(tokenizer, example, on, source, why),
    )


# ---- preview ---------------------------------------------------------------------------------


def _code(text: str) -> str:
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    return f"{fence}text\n{text}\n{fence}"


def _cell(text: str) -> str:
    return "<code>" + html.escape(repr(text)[1:-1]).replace("|", "&#124;") + "</code>"


def _rendering(tokenizer, messages, template: str | None) -> str:
    try:
        return _code(_render(tokenizer, messages, template))
    except Exception as err:
        return f"*This template cannot render this conversation:* {html.escape(f'{type(err).__name__}: {err}')}"


def _token_table(tokenizer, messages, assistant_only: bool, limit: int = 300) -> str:
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=assistant_only)
    ids = list(enc["input_ids"])
    mask = list(enc["assistant_masks"]) if assistant_only else [1] * len(ids)
    special = set(tokenizer.all_special_ids)
    rows = ["| # | id | token | text | special | in loss |", "|---|---|---|---|---|---|"]
    for i, (token_id, token, m) in enumerate(zip(ids, tokenizer.convert_ids_to_tokens(ids), mask)):
        if i == limit:
            rows.append(f"| … | {len(ids) - limit} more tokens | | | | |")
            break
        rows.append(f"| {i} | {token_id} | {_cell(token)} | {_cell(tokenizer.decode([token_id]))} | "
                    f"{'yes' if token_id in special else ''} | {'✓' if m else '–'} |")
    loss = sum(mask)
    return "\n".join(rows) + f"\n\n{len(ids)} tokens, {loss} in the loss."


def preview_markdown(tokenizer, messages: list[dict], assistant_only: bool,
                     template_label: str = "this run's template", why: str = "") -> str:
    """The conversation and a built-in one under ChatML, Mistral, Llama-3 and the tokenizer's own
    template (special tokens visible), plus the token ids of `messages` with their loss mask."""
    eos = tokenizer.eos_token
    loss = ("assistant replies and their EOS only (assistant_only_loss: system, user and tool tokens are -100)"
            if assistant_only else "every token (system, user and assistant turns)") + (f"; {why}" if why else "")
    parts = [
        "# Chat templates",
        f"This run's template: **{html.escape(template_label)}**. EOS: {_cell(eos)} (id {tokenizer.eos_token_id}): "
        f"every assistant turn ends with it and generation stops on it. Trained on: {loss}.",
        "Special tokens are written as text in every rendering below. In this model's tokenizer a marker that "
        "takes more than one token is not one of its special tokens: the Mistral and Llama-3 renderings show "
        "those models' formats for comparison (their tokenizers have each marker as one token); training with "
        "such a template here makes its end-of-turn marker a new special token, the EOS.",
        "\n".join(["| template | marker | tokens in this tokenizer |", "|---|---|---|"] + [
            f"| {title} | {_cell(marker)} | {len(tokenizer.encode(marker, add_special_tokens=False))} |"
            for title, name in COMPARED.items() for marker in MARKERS[name]
        ]),
    ]
    for heading, conversation in (("First training conversation", messages),
                                  ("Built-in example with a system turn", SYSTEM_EXAMPLE)):
        parts.append(f"## {heading}")
        for title, name in COMPARED.items():
            parts += [f"### {title}", _rendering(tokenizer, conversation, shipped_text(name))]
        parts += [f"### This run: {html.escape(template_label)}", _rendering(tokenizer, conversation, None)]
    parts += ["## Token ids of the first training conversation under this run's template",
              _token_table(tokenizer, messages, assistant_only)]
    return "\n\n".join(parts) + "\n"


@task(cache_policy=NO_CACHE, retries=2, retry_condition_fn=retry_transient, retry_delay_seconds=[2, 10])
def write_template_preview(run: ArtifactStore, templated: TemplatedModel) -> str:
    """Write the chat-template preview, the rendered example and the report's template section into
    the run folder (cached template task or not), and show the preview as a Prefect artifact."""
    uri = run.write_text(PREVIEW_PATH, templated.preview)
    run.write_text(RunPaths.rendered_example, templated.rendered_example)
    run.write_text(RunPaths.section("template"), (
        f"Template: {templated.template_source} · loss on "
        f"{'assistant replies only' if templated.assistant_only else 'every token'}"
        f"{f' ({templated.loss_why})' if templated.loss_why else ''} · turns end with "
        f"`{templated.eos_token}` · preview under other templates: `{PREVIEW_PATH}`\n\n"
        f"The first training conversation as the model sees it:\n\n```text\n{templated.rendered_example}\n```\n"))
    publish_markdown(PREVIEW_KEY, templated.preview,
                     description="The same conversations under ChatML, Mistral, Llama-3 and this run's template")
    return uri
