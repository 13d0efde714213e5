"""Tokenization stage: conversations -> token ids under the chat template, cached on disk.

`tokenize_dataset` renders every conversation with the model's chat template and tokenizes it
(batched, multi-process `datasets.map` on memory-mapped Arrow), cuts it to `max_length`, adds the
`assistant_masks` TRL turns into labels when only assistant tokens count, and measures every
conversation's full token length on the way. The result is saved under
`cache_dir("tokenized")/<key>`, the key hashing the dataset's fingerprint, the tokenizer's files,
the template text, max_length and assistant_only_loss: a nightly run on unchanged data loads it
instead of re-tokenizing (open-r1 issue 435), and a changed template or dataset misses it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefect import task
from pydantic import BaseModel

from tasks.code_version import code_digest
from tasks.data import DatasetRef, as_written, num_proc_for
from tasks.models import ModelRef, local_model_dir
from tasks.layout import RunPaths
from tasks.caching import BY_CONTENT
from tasks.runtime import atomic_dir, cache_dir, figure_png, retry_transient, run_logger, sha256_files
from tasks.storage import ArtifactStore

SPLITS = ("train", "test")
HIST_BINS = 40
# The files that decide how text becomes tokens; weights and model config do not.
_TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt",
                    "*.model", "chat_template*")


class TokenizationError(ValueError):
    pass


class SplitStats(BaseModel):
    """Token lengths of one split's conversations, before truncation."""

    rows: int
    min: int
    median: float
    p95: float
    max: int
    mean: float
    over_max_length: int  # rows that are truncated to max_length
    no_loss_rows: int = 0  # assistant-only: rows whose assistant tokens all lie past max_length (dropped)
    hist_edges: list[float]
    hist_counts: list[int]


class TokenStats(BaseModel):
    max_length: int
    splits: dict[str, SplitStats]

    def table(self) -> list[dict]:
        """One row per split, for the report and the Prefect table artifact."""
        return [
            {"split": name, "rows": s.rows, "min": s.min, "median": s.median, "p95": round(s.p95, 1), "max": s.max,
             "mean": round(s.mean, 1), "over max_length": s.over_max_length,
             "dropped (no assistant token left)": s.no_loss_rows}
            for name, s in self.splits.items()
        ]

    @property
    def over_max_length(self) -> int:
        return sum(s.over_max_length for s in self.splits.values())


class TokenizedRef(BaseModel):
    """Tokenized train/test splits on local disk, and their token-length statistics."""

    path: str
    key: str  # sha256 of everything the tokens depend on
    rows: dict[str, int]  # rows that train (assistant-only drops rows without assistant tokens)
    stats: TokenStats
    cached: bool = False  # whether this call found them already on disk

    @property
    def fingerprint(self) -> str:  # what ContentInputs keys a cached task on
        return self.key


def tokenizer_fingerprint(model_dir: Path) -> str:
    files = {p for pattern in _TOKENIZER_FILES for p in Path(model_dir).glob(pattern) if p.is_file()}
    return sha256_files(sorted(files))


def template_text(tokenizer) -> str:
    template = tokenizer.chat_template
    if not template:
        raise TokenizationError(
            f"the tokenizer of {tokenizer.name_or_path} has no chat template: pass the model that "
            "prepare_chat_template returned (it clones ChatML onto template-less models)"
        )
    return template if isinstance(template, str) else json.dumps(template, sort_keys=True)


def _tokenize_batch(batch, indices, tokenizer, max_length: int, assistant_only: bool, split: str, strip: bool):
    conversations = [as_written(m) for m in batch["messages"]] if strip else batch["messages"]
    try:
        if assistant_only:  # the mask needs the template's generation spans and the tokens' offsets
            out = tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
        elif not hasattr(tokenizer, "backend_tokenizer"):  # a slow (Python) tokenizer
            out = tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True)
        else:  # the same ids as apply_chat_template(tokenize=True), ~25% faster: no offsets, no masks
            texts = tokenizer.apply_chat_template(conversations, tokenize=False)
            encodings = tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)
            out = {"input_ids": [e.ids for e in encodings]}
    except Exception:
        for i, conversation in zip(indices, conversations):  # find the row, to name it
            try:
                tokenizer.apply_chat_template(conversation, tokenize=False)
            except Exception as err:
                raise TokenizationError(
                    f"split {split!r} row {i}: the chat template cannot render this conversation "
                    f"({type(err).__name__}: {err}). Choose a template that renders its shape "
                    "(template.chat_template) or remove such rows from the data."
                ) from err
        raise
    ids = out["input_ids"]
    result = {"input_ids": [x[:max_length] for x in ids], "n_tokens": [len(x) for x in ids]}
    if assistant_only:
        masks = out["assistant_masks"]
        for i, mask in zip(indices, masks):
            if 1 not in mask:
                raise TokenizationError(
                    f"split {split!r} row {i}: assistant_only_loss is on but the chat template marks no "
                    "assistant token (it needs {% generation %} ... {% endgeneration %} around each assistant "
                    "turn). Use template.chat_template='chatml-assistant-only' or set "
                    "template.assistant_only_loss=false."
                )
        result["assistant_masks"] = [m[:max_length] for m in masks]
        result["has_loss"] = [1 in m for m in result["assistant_masks"]]
    return result


def tokenize_split(ds, tokenizer, max_length: int, assistant_only_loss: bool = False, *, split: str = "train",
                   num_proc: int | None = None, cache_file_name: str | None = None):
    """One split as token ids cut to max_length, with `n_tokens` (full length) and, when
    assistant-only, `assistant_masks` and `has_loss`. Batched; several processes for big splits."""
    from datasets import Features, List, Value

    if assistant_only_loss:
        from trl.chat_template_utils import has_generation_markers

        if not has_generation_markers(template_text(tokenizer)):
            raise TokenizationError(
                "template.assistant_only_loss is on but the chat template has no {% generation %} markers, so "
                "no token can be told apart as the assistant's. Use template.chat_template='chatml-assistant-only' "
                "(or a .jinja file with the markers), or set template.assistant_only_loss=false."
            )
    # Plain {role, content} rows hold no nulls Arrow added for other rows' fields: nothing to strip.
    message = ds.features["messages"].feature if isinstance(ds.features["messages"], List) else None
    plain = isinstance(message, dict) and set(message) == {"role", "content"} and message["content"] == Value("string")
    features = {"input_ids": List(Value("int32")), "n_tokens": Value("int32")}
    if assistant_only_loss:
        features |= {"assistant_masks": List(Value("int8")), "has_loss": Value("bool")}
    return ds.map(
        _tokenize_batch, batched=True, with_indices=True, remove_columns=ds.column_names,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "assistant_only": assistant_only_loss,
                   "split": split, "strip": not plain},
        features=Features(features), num_proc=num_proc_for(len(ds), num_proc),
        # Our own cache (tokenized_splits) decides reuse; datasets' would hash the tokenizer object.
        load_from_cache_file=False, keep_in_memory=cache_file_name is None, cache_file_name=cache_file_name,
        new_fingerprint=hashlib.sha256(f"{ds._fingerprint}{max_length}{assistant_only_loss}".encode()).hexdigest()[:16],
        desc=f"Tokenizing {split}",
    )


def split_stats(lengths, max_length: int, no_loss_rows: int = 0) -> SplitStats:
    """Min / median / p95 / max / mean of full token lengths, rows over max_length, a histogram."""
    import numpy as np

    lengths = np.asarray(lengths)
    if not len(lengths):
        return SplitStats(rows=0, min=0, median=0, p95=0, max=0, mean=0, over_max_length=0, hist_edges=[0, 1],
                          hist_counts=[0])
    counts, edges = np.histogram(lengths, bins=HIST_BINS, range=(0, max(int(lengths.max()), max_length) + 1))
    return SplitStats(
        rows=len(lengths), min=int(lengths.min()), median=float(np.median(lengths)),
        p95=float(np.percentile(lengths, 95)), max=int(lengths.max()), mean=float(lengths.mean()),
        over_max_length=int(np.count_nonzero(lengths > max_length)), no_loss_rows=no_loss_rows,
        hist_edges=[float(e) for e in edges], hist_counts=[int(c) for c in counts],
    )


def cache_key(data: DatasetRef, tokenizer_fp: str, template: str, max_length: int, assistant_only_loss: bool) -> str:
    import tokenizers
    import transformers

    what = {
        "data": data.fingerprint, "tokenizer": tokenizer_fp, "template": template, "max_length": max_length,
        "assistant_only_loss": assistant_only_loss,
        "code": code_digest(__name__), "versions": [transformers.__version__, tokenizers.__version__],
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def tokenized_splits(model: ModelRef, data: DatasetRef, max_length: int, assistant_only_loss: bool = False,
                     num_proc: int | None = None) -> TokenizedRef:
    """The tokenized train/test splits: from the on-disk cache when present, else made and saved."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    model_dir = local_model_dir(model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    key = cache_key(data, tokenizer_fingerprint(model_dir), template_text(tokenizer), max_length, assistant_only_loss)
    target = cache_dir("tokenized") / key[:16]
    if (target / "stats.json").exists():
        meta = json.loads((target / "stats.json").read_text(encoding="utf-8"))
        return TokenizedRef(path=str(target), key=key, rows=meta["rows"], stats=meta["stats"], cached=True)
    import numpy as np

    splits = load_from_disk(data.path)
    # The maps write their Arrow files straight into the staged copy: a save_to_disk of the
    # result would write (and map into memory) every token a second time.
    with atomic_dir(target) as staging:
        files, rows, stats = {}, {}, {}
        for split in SPLITS:
            ds = tokenize_split(splits[split], tokenizer, max_length, assistant_only_loss, split=split,
                                num_proc=num_proc, cache_file_name=str(staging / f"{split}.arrow"))
            files[split] = [Path(f["filename"]).name for f in ds.cache_files]
            lengths, no_loss = ds.data.column("n_tokens").to_numpy(), 0
            if assistant_only_loss:  # a row whose assistant turns all lie past max_length has no loss
                has_loss = ds.data.column("has_loss").to_numpy(zero_copy_only=False)
                no_loss = int(np.count_nonzero(~has_loss))
                if no_loss:
                    np.save(staging / f"{split}-rows.npy", np.flatnonzero(has_loss))  # the rows that train
            stats[split], rows[split] = split_stats(lengths, max_length, no_loss), len(ds) - no_loss
        token_stats = TokenStats(max_length=max_length, splits=stats)
        meta = {"rows": rows, "stats": token_stats.model_dump(), "files": files}
        (staging / "stats.json").write_text(json.dumps(meta), encoding="utf-8")
    return TokenizedRef(path=str(target), key=key, rows=rows, stats=token_stats, cached=False)


def load_tokenized(ref: TokenizedRef):
    """(train, test) as the trainer takes them: input_ids, plus assistant_masks when assistant-only."""
    import numpy as np
    from datasets import Dataset, concatenate_datasets

    path = Path(ref.path)
    files = json.loads((path / "stats.json").read_text(encoding="utf-8"))["files"]
    out = []
    for split in SPLITS:
        ds = concatenate_datasets([Dataset.from_file(str(path / name)) for name in files[split]])
        if (path / f"{split}-rows.npy").exists():
            ds = ds.select(np.load(path / f"{split}-rows.npy"))
        out.append(ds.remove_columns([c for c in ("n_tokens", "has_loss") if c in ds.column_names]))
    return tuple(out)


def content_digest(ref: TokenizedRef) -> str:
    """sha256 of the tokens themselves, as load_tokenized gives them to the Trainer (token ids, loss
    masks, the rows that train, both splits). Unlike ref.key, which hashes how the tokens were made
    (the data and tokenizing code, library versions), it stays the same across an upgrade that
    makes identical tokens: what resume_key needs, so that a stopped run's checkpoints are not
    thrown away by a `git pull` that changed a line of tasks/data.py."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    path = Path(ref.path)
    files = json.loads((path / "stats.json").read_text(encoding="utf-8"))["files"]
    digest = hashlib.sha256()
    for split in SPLITS:
        for column in ("input_ids", "assistant_masks"):
            # Lengths and values apart, batch by batch: the same whatever the Arrow files' batching.
            lengths, values, present = hashlib.sha256(), hashlib.sha256(), False
            for name in files[split]:
                with pa.memory_map(str(path / name)) as source:
                    for batch in pa.ipc.open_stream(source):
                        if column not in batch.schema.names:
                            continue
                        present, col = True, batch.column(column)
                        lengths.update(pc.list_value_length(col).to_numpy(zero_copy_only=False).astype("<i8").tobytes())
                        values.update(col.flatten().to_numpy(zero_copy_only=False).astype("<i8").tobytes())
            digest.update(f"{split}/{column}/{present}/{lengths.hexdigest()}/{values.hexdigest()}\n".encode())
        rows = path / f"{split}-rows.npy"
        digest.update(np.load(rows).astype("<i8").tobytes() if rows.exists() else b"all rows")
    return digest.hexdigest()


@task(cache_policy=BY_CONTENT, retries=1, retry_condition_fn=retry_transient, retry_delay_seconds=10)
def tokenize_dataset(
    model: ModelRef, data: DatasetRef, max_length: int, assistant_only_loss: bool = False
) -> TokenizedRef:
    """Render and tokenize the dataset with the model's chat template (cached on disk) and measure token lengths."""
    ref = tokenized_splits(model, data, max_length, assistant_only_loss)
    log = run_logger()
    log.info("Tokenized %s (%s): %s", ref.rows, "cached" if ref.cached else "new", ref.path)
    if ref.stats.over_max_length:
        log.warning(
            "%d conversation(s) are longer than training.max_length=%d tokens and will be truncated (%s); "
            "raise max_length to keep them whole", ref.stats.over_max_length, max_length,
            {k: s.over_max_length for k, s in ref.stats.splits.items()},
        )
    return ref


def plot_token_lengths(stats: TokenStats) -> bytes:
    """Histogram PNG of each split's token lengths, with the max_length cut as a line."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and workers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, s in stats.splits.items():
        ax.stairs(s.hist_counts, s.hist_edges, label=f"{name} ({s.rows} rows)", fill=name == "train", alpha=0.6)
    ax.axvline(stats.max_length, color="red", linestyle="--", label=f"max_length {stats.max_length}")
    ax.set_xlabel("tokens per conversation (before truncation)")
    ax.set_ylabel("conversations")
    ax.legend()
    return figure_png(fig)


def tokens_markdown(stats: TokenStats) -> str:
    """Token lengths per split, and where the template preview and the histogram are."""
    rows = stats.table()
    head = "| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n" if rows else ""
    body = "".join("| " + " | ".join(str(v) for v in r.values()) + " |\n" for r in rows)
    return (f"Tokens per conversation (chat template applied, before truncation to max_length={stats.max_length}):"
            f"\n\n{head}{body}\n![token lengths](../{RunPaths.token_lengths_png})\n")


def write_token_stats(run: ArtifactStore, stats: TokenStats, data: DatasetRef | None = None) -> None:
    """Write the token-length stats and histogram, and the report's data section, into the run
    folder, and a Prefect table artifact."""
    from prefect.artifacts import create_table_artifact

    run.write_json(RunPaths.token_lengths, stats.model_dump())
    run.write_bytes(RunPaths.token_lengths_png, plot_token_lengths(stats))
    run.write_text(RunPaths.section("data"), (data.markdown() + "\n" if data else "") + tokens_markdown(stats))
    create_table_artifact(key="smolflow-token-lengths", table=stats.table(),
                          description=f"Tokens per conversation; rows over max_length={stats.max_length} are truncated")
