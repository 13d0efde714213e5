"""The commands that read an artifact root's runs without running a flow: `smolflow runs`,
`compare` and `promote` (they import no Prefect: runs and compare answer in about a second)."""

from __future__ import annotations

import argparse
import json


def _short(text: str | None, n: int = 72) -> str:
    """One line of a table: the whole text is in the run's status.json (and `runs --json`)."""
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def cmd_runs(args: argparse.Namespace, rest: list[str]) -> int:
    """The runs under an artifact root: id, start, status, promoted, headline scores."""
    from tasks.run_table import list_runs

    rows = list_runs(args.root)
    if args.json:
        print(json.dumps(rows, indent=2), flush=True)
        return 0
    # Eval losses measured on other test rows, template or max_length: a letter per way, as the
    # benchmarks' columns are split by way (tasks/run_table.py eval_loss_way).
    ways = list(dict.fromkeys(r["eval_loss_measured"] for r in rows if r.get("eval_loss_measured")))
    way = {w: f" [{chr(ord('a') + i)}]" for i, w in enumerate(ways)} if len(ways) > 1 else {}
    shown = [r | {"started": _when(r["started"]), "promoted": _promoted(r),
                  "loss (train/eval)": (_losses(r["losses"]) + way.get(r.get("eval_loss_measured"), ""))
                  if r["losses"] else "",
                  "scores": " ".join(f"{k}={v:.4f}" if isinstance(v, (int, float)) else f"{k}={v}"
                                     for k, v in r["scores"].items()),
                  "source": "; ".join(sorted(set(r["sources"].values()))),
                  "status": r["status"] + (f" ({_short(r['why'])})" if r["status"] in ("failed", "stopped") else "")}
             for r in rows]
    # flush: a closed stdout (`| head -1`) raises here, where main ends quietly, not at the interpreter's exit
    print(_table(shown, ["run_id", "started", "status", "promoted", "loss (train/eval)", "scores", "source"]) if rows
          else f"no runs under {args.root}", flush=True)
    if way:
        print(f"eval losses marked {', '.join(w.strip() for w in way.values())} were measured on other test rows, "
              "template or training.max_length: compare only those with the same mark (`smolflow compare` "
              "says which differ)", flush=True)
    return 0


def _promoted(row: dict) -> str:
    """`yes (now)` for the promoted run; for the others what their gate decided: the reason a nightly was not."""
    gate, by_hand = row["gate"], row.get("by_hand")
    if row["promoted"]:
        return f"yes (now, by hand: {_short(by_hand['reason'], 40)})" if by_hand else "yes (now)"
    if gate is None:  # an eval run, or one stopped before its gate
        return ""
    return "yes" if gate["promote"] else f"no: {_short('; '.join(gate['reasons']), 48)}"


def cmd_promote(args: argparse.Namespace, rest: list[str]) -> int:
    """Make a completed run the promoted one by hand (a roll-back): the next run's gate compares with it."""
    from tasks.pointers import promote_by_hand
    from tasks.runs import runs_root

    pointer, before = promote_by_hand(runs_root(args.root).uri, args.flow, args.run_id, args.reason)
    if before == args.run_id:
        print(f"{args.run_id} is already the promoted run of {args.flow}: nothing moved", flush=True)
        return 0
    print(f"promoted: {args.run_id} (by hand: {args.reason}; {pointer['by_hand']['by']}), before: {before or 'none'}\n"
          "The next run's gate compares with it; the W&B tag `promoted` stays on the runs the gate promoted.",
          flush=True)
    return 0


def cmd_compare(args: argparse.Namespace, rest: list[str]) -> int:
    """Two runs side by side: scores, settings (differences marked), health, data."""
    from tasks.run_table import compare_runs

    result = compare_runs(args.root, args.run_a, args.run_b)
    if args.json:
        print(json.dumps(result, indent=2, default=str), flush=True)
        return 0
    a, b = args.run_a, args.run_b
    print(f"A = {a} ({result['status']['a']})\nB = {b} ({result['status']['b']})\n\nScores (tuned model)")
    # "-": a benchmark one run did not score (its JSON keeps null)
    scores = [{k: "-" if v is None else v for k, v in row.items()} for row in result["scores"]]
    print(_table(scores, ["benchmark", "a", "b", "delta", "stderr", "beyond_noise", "n_a", "n_b", "source"]))
    diff = [s | {"mark": "*" if s["differs"] else ""} for s in result["settings"] if s["differs"] or args.all]
    print(f"\nSettings{'' if args.all else ' that differ'} (* = differs)")
    print(_table(diff, ["mark", "setting", "a", "b"]) if diff else "  none: same settings")
    promoted = {side: _promoted(row) or "no gate (an eval run, or stopped before it)"
                for side, row in result["promoted"].items()}
    print(f"\nPromoted: A {promoted['a']} · B {promoted['b']}")
    healthy = {True: "yes", False: "no (its training/health.md says why)", None: "not assessed"}
    print(f"Healthy: A {healthy[result['health']['a']]} · B {healthy[result['health']['b']]}")
    apart = result["training"].get("eval_loss_apart")
    print(f"Training loss (train/eval): A {_losses(result['training']['a'])} · B {_losses(result['training']['b'])}"
          + (f" (eval losses not comparable: {', '.join(apart)} differ)" if apart else ""))
    data = {side: _dataset(d) for side, d in result["data"].items()}
    print(f"Data: {data['a']} (both)" if data["a"] == data["b"] else f"Data: A {data['a']}\n      B {data['b']}",
          flush=True)  # flush: as in cmd_runs
    return 0


def _dataset(data: dict) -> str:
    if not data:
        return "none recorded"
    rows = " / ".join(f"{n} {split}" for split, n in (data.get("rows") or {}).items())
    return (f"{data.get('source') or 'unknown'}" + (f" · rows {rows}" if rows else "")
            + (f" · fingerprint {data['fingerprint'][:12]}" if data.get("fingerprint") else ""))


def _when(started: str) -> str:
    """'2026-12-07 18:12:26 UTC' from status.json's ISO time (seconds are enough to tell runs apart)."""
    import datetime as dt

    try:
        return dt.datetime.fromisoformat(started).astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except ValueError:  # a run from before status.json's start time: its id's timestamp
        return started


def _losses(losses: dict) -> str:
    said = lambda v: f"{v:.4f}" if isinstance(v, (int, float)) else "-"  # noqa: E731  (1.734 stood beside 1.7788)
    return "/".join(said(losses.get(k)) for k in ("train_loss", "eval_loss")) if losses else "none (no training)"
