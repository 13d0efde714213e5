"""The arena's files in the artifact store (local or S3), shared by the flow and the vote page:

    <root>/arena/models.json            the models of the last arena run, and the anchor
    <root>/arena/answers/<key>.jsonl    one model's answers: {prompt, answer, new_tokens, stopped_at_eos}
    <root>/arena/battles/judge.jsonl    the judge's battles of the last arena run
    <root>/arena/votes/human.jsonl      people's votes, one JSON line each, appended (local store)
    <root>/arena/votes/human/<id>.json  the same on S3, one object per vote (S3 objects cannot grow)
    <root>/arena/leaderboard.{json,md,png}

A model's key is the start of its content fingerprint, so votes keep counting for the same
weights whatever the model is called or wherever it lies.
"""

from __future__ import annotations

import json
import os
import textwrap
import uuid
from datetime import datetime, timezone
from typing import Any

from tasks.arena import fit_ratings, leaderboard
from tasks.runtime import figure_png
from tasks.storage import ArtifactStore

KEY_CHARS = 12


def arena_store(root: str) -> ArtifactStore:
    return ArtifactStore(root).child("arena")


def model_key(fingerprint: str) -> str:
    return fingerprint[:KEY_CHARS]


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _read_jsonl(store: ArtifactStore, rel: str) -> list[dict[str, Any]]:
    if not store.exists(rel):
        return []
    with store.fs.open(store._path(rel), "rb") as f:
        # A line cut short by a crash mid-append is skipped rather than failing every reader.
        return [row for row in (_loads(line) for line in f.read().decode().splitlines() if line.strip()) if row]


def _loads(line: str) -> dict[str, Any] | None:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def write_models(store: ArtifactStore, models: list[dict[str, Any]], anchor: str, prompts: list[str]) -> None:
    store.write_json("models.json", {"models": models, "anchor": anchor, "prompts": prompts,
                                     "updated_at": datetime.now(timezone.utc).isoformat()})


def read_models(store: ArtifactStore) -> dict[str, Any] | None:
    return store.read_json("models.json") if store.exists("models.json") else None


def write_answers(store: ArtifactStore, key: str, answers: list[dict[str, Any]]) -> None:
    store.write_text(f"answers/{key}.jsonl", _jsonl(answers))


def read_answers(store: ArtifactStore, key: str) -> dict[str, str]:
    """{prompt: answer} of one model."""
    return {row["prompt"]: row["answer"] for row in _read_jsonl(store, f"answers/{key}.jsonl")}


def write_judge_battles(store: ArtifactStore, battles: list[dict[str, Any]]) -> None:
    store.write_text("battles/judge.jsonl", _jsonl(battles))


def read_judge_battles(store: ArtifactStore) -> list[dict[str, Any]]:
    return _read_jsonl(store, "battles/judge.jsonl")


def append_vote(store: ArtifactStore, vote: dict[str, Any]) -> dict[str, Any]:
    """Record one person's vote durably: appended as one line locally, one object on S3."""
    vote = {"id": uuid.uuid4().hex, "time": datetime.now(timezone.utc).isoformat(), "source": "human", **vote}
    line = json.dumps(vote, ensure_ascii=False) + "\n"
    if store.is_s3:
        store.write_text(f"votes/human/{vote['time'][:19].replace(':', '')}-{vote['id']}.json", line)
        return vote
    path = store._path("votes/human.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # One write() of one line on an O_APPEND file: concurrent voters never interleave, and the
    # fsync makes the vote survive a crash or a restart right after the answer.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return vote


def read_votes(store: ArtifactStore) -> list[dict[str, Any]]:
    """Every person's vote, oldest first, from either layout."""
    votes = _read_jsonl(store, "votes/human.jsonl")
    for rel in store.glob("votes/human/*.json"):
        with store.fs.open(store._path(rel), "rb") as f:
            row = _loads(f.read().decode())
        if row:
            votes.append(row)
    return sorted(votes, key=lambda v: v.get("time", ""))


def current_board(store: ArtifactStore, human: bool = True, rounds: int = 200, seed: int = 0) -> dict[str, Any] | None:
    """The leaderboard from the last arena run's judge battles plus every person's vote (None: no arena yet)."""
    meta = read_models(store)
    if meta is None:
        return None
    keys = [m["key"] for m in meta["models"]]
    judged = read_judge_battles(store)
    votes = read_votes(store) if human else []
    names = {m["key"]: m["name"] for m in meta["models"]}
    board = leaderboard(fit_ratings(judged + votes, keys, meta["anchor"], rounds=rounds, seed=seed), names)
    keyset = set(keys)
    counted = [v for v in votes if v["model_a"] in keyset and v["model_b"] in keyset]
    board |= {"anchor": names[meta["anchor"]], "judge_battles": len(judged), "human_votes": len(counted),
              "updated_at": datetime.now(timezone.utc).isoformat()}
    return board


def markdown(board: dict[str, Any]) -> str:
    rows = "".join(f"| {r['rank']} | {r['name']} | {r['rating']:.0f} | {r['lower']:.0f} to {r['upper']:.0f} | "
                   f"{r['battles']} | `{r['model']}` |\n" for r in board["rows"])
    return (f"# Arena leaderboard\n\nBradley-Terry ratings on the Elo scale, anchored at {board['anchor']} = 1000; "
            f"95% bootstrap intervals. {board['judge_battles']} judge battles, {board['human_votes']} human votes.\n\n"
            f"**{board['verdict']}**\n\n| rank | model | rating | 95% interval | battles | key |\n"
            f"|---|---|---|---|---|---|\n{rows}")


def plot(board: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = board["rows"][::-1]  # best at the top
    labels = [textwrap.fill(r["name"], 48) for r in rows]  # merged models' names run long
    longest = max((len(line) for label in labels for line in label.splitlines()), default=0)
    fig, ax = plt.subplots(figsize=(max(7.0, 5 + 0.08 * longest), 0.5 * len(rows) + 1.5))  # room for the labels
    y = range(len(rows))
    ax.errorbar([r["rating"] for r in rows], y, fmt="o",
                xerr=[[r["rating"] - r["lower"] for r in rows], [r["upper"] - r["rating"] for r in rows]], capsize=4)
    ax.set_yticks(list(y), labels)
    ax.axvline(1000, color="grey", lw=0.8, ls="--")
    ax.set_xlabel(textwrap.fill(f"rating (Elo scale, {board['anchor']} = 1000), 95% interval", 80))
    ax.set_title("Arena leaderboard")
    return figure_png(fig)


def write_board(store: ArtifactStore, board: dict[str, Any]) -> dict[str, str]:
    return {"json": store.write_json("leaderboard.json", board),
            "md": store.write_text("leaderboard.md", markdown(board)),
            "png": store.write_bytes("leaderboard.png", plot(board))}
