"""Report: stitch the sections the stages wrote into one page, report.md and a self-contained
report.html, and show it in the Prefect UI.

Each stage saves its own results and writes its own section (`report/sections/<name>.md`, see
tasks/layout.py SECTIONS); this module adds only the run-wide ones (summary, links, configuration,
score trend) and joins them in order. A section a stage did not write (judge off, no benchmarks) is
left out.
"""

from __future__ import annotations

import base64
import re

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.layout import SECTIONS, RunPaths
from tasks.prefect_markdown import publish_markdown
from tasks.runtime import retry_transient
from tasks.storage import ArtifactStore
from tasks.trends import DEFAULT_RUNS, write_trend


def config_markdown(config: dict | None, resolved: dict | None = None) -> str:
    """What each `auto` meant in this run, then the RunConfig as a YAML block (it holds no secrets by
    design: keys come from the environment)."""
    if not config:
        return "Not recorded.\n"
    import yaml

    autos = "".join(f"- `{k}`: `{_as_set(config, k)}` → {v}\n" for k, v in (resolved or {}).items() if v)
    autos = f"Resolved on this machine:\n\n{autos}\n" if autos else ""
    return f"{autos}```yaml\n{yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=100)}```\n"


def _as_set(config: dict, key: str) -> str:
    """The value `key` ("benchmarks[0].data") has in `config` as the user set it: `auto`, or `null`
    (torch_threads, judge.max_new_tokens), which resolve too."""
    node = config
    try:
        for part in re.findall(r"[^.\[\]]+", key):
            node = node[int(part)] if isinstance(node, list) else node[part]
    except (KeyError, IndexError, TypeError, ValueError):
        return "auto"
    return "null" if node is None else str(node)


def summary_markdown(run: ArtifactStore) -> str:
    """The run in a few lines, read back from what the stages saved (their sections have the rest):
    the gate's verdict, training, each benchmark, the judge. What a reader of a night looks for first,
    above the configuration."""
    read = lambda rel: run.read_json(rel) if run.exists(rel) else None  # noqa: E731
    first = lambda rel: run.read_text(rel).strip().split("\n\n", 1)[0] if run.exists(rel) else None  # noqa: E731
    lines = []
    if verdict := first(RunPaths.section("gate")):  # the gate's own words: "**Promoted**, compared with ..."
        decision = read(RunPaths.gate) or {}
        weak = [line.split(":", 1)[0] for line in decision.get("weak") or []]
        reasons = (decision.get("reasons") or []) + ([f"weak evidence (a drop could pass unseen): {', '.join(weak)}; "
                                                      "the gate section says how to sharpen it"] if weak else [])
        lines.append(f"- {verdict}" + "".join(f"\n  - {reason}" for reason in reasons))
    metrics, health = read(RunPaths.metrics), first(RunPaths.section("health"))
    if metrics and isinstance(metrics.get("eval_loss"), (int, float)):
        lines.append(f"- training: {int(metrics.get('steps') or 0)} steps, eval loss {metrics['eval_loss']:.4f}"
                     + (f" · {health}" if health else ""))
    for rel in sorted(run.glob(f"{RunPaths.benchmarks}/**/model.summary.json")):  # smolflow eval: one model
        s = run.read_json(rel)
        provenance = s.get("provenance") or {}
        lines.append(f"- {s['name']}: {s['score']:.4f} (n={s['n']}, {provenance.get('note') or provenance.get('source')})")
    for r in read(RunPaths.comparison) or []:  # a fine-tune: base and tuned
        change = ("not comparable with the base's" if r["delta"] is None else
                  f"{r['delta']:+.4f}, {'beyond' if r['beyond_noise'] else 'within'} noise" if r["stderr"] is not None
                  else f"{r['delta']:+.4f}, noise unknown")
        lines.append(f"- {r['benchmark']}, base → tuned: {r['base']:.4f} → {r['tuned']:.4f} "
                     f"({change}; n={r['n']}, {r['source']})")
    judge = read(RunPaths.judge_summary)
    if judge:
        rate = ("n/a (no pair judged in both orders)" if judge.get("win_rate") is None else
                f"{judge['win_rate']:.1f}%" + (f" ± {judge['stderr']:.1f}" if judge.get("stderr") is not None else ""))
        reference = (judge.get("settings") or {}).get("reference")
        weak = "; " + judge["note"].split(":", 1)[0] + " (see the judge section)" if judge.get("note") else ""
        lines.append(f"- judge: win rate {rate} against {reference!r} (n={judge['n']} of {judge.get('pairs')} pairs{weak})")
    return "\n".join(lines) + "\n" if lines else "Nothing measured yet.\n"


def links_markdown(run: ArtifactStore, about: dict[str, str | None]) -> str:
    """Where the run's pieces are, relative to report/ so the folder can move (or be synced) whole;
    plus the absolute run folder, the W&B run, the Prefect flow run and the code version."""
    rel = [("tuned model", RunPaths.model + "/"), ("benchmark results", RunPaths.benchmarks + "/"),
           ("loss curves", RunPaths.curves), ("gate decision", RunPaths.gate_md), ("judge pairs", RunPaths.judge_pairs),
           ("template preview", RunPaths.template_preview), ("manifest", RunPaths.manifest)]
    lines = [f"- run folder: `{run.uri}`"]
    # Only what this run wrote: an eval run has no model, curves, gate or template preview, and a
    # run with the judge off has no pairs. The manifest is written after the report, always.
    lines += [f"- [{label}](../{path})" for label, path in rel
              if path == RunPaths.manifest or run.exists(path.rstrip("/"))]
    for label, value in about.items():
        if value:
            lines.append(f"- {label}: [{value}]({value})" if value.startswith("http") else f"- {label}: `{value}`")
    return "\n".join(lines) + "\n"


def stitch(run: ArtifactStore, title: str) -> str:
    """report.md: the title, then every section that exists, in SECTIONS order."""
    parts = [f"# {title}\n"]
    for name, heading, _ in SECTIONS:
        path = RunPaths.section(name)
        if run.exists(path):
            parts.append(f"## {heading}\n\n{run.read_text(path).rstrip()}\n")
    return "\n".join(parts)


_IMAGE = re.compile(r'<img src="\.\./([^"]+\.png)"')


def to_html(run: ArtifactStore, markdown: str, title: str) -> str:
    """A page that opens offline: images inlined as data: URIs, wide tables scroll inside the page."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)

    def inline(match: re.Match) -> str:
        rel = match.group(1)
        if not run.exists(rel):
            return match.group(0)
        return f'<img src="data:image/png;base64,{base64.b64encode(run.read_bytes(rel)).decode()}"'

    body = _IMAGE.sub(inline, body)
    body = body.replace("<table>", '<div class="wide"><table>').replace("</table>", "</table></div>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
             ".wide{overflow-x:auto}table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
             "padding:.25em .5em;vertical-align:top;font-size:.9em}th{background:#f3f3f3}img{max-width:100%}"
             "pre{background:#f6f6f6;padding:.6em;overflow-x:auto}code{font-size:.9em}")
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"<style>{style}</style></head><body>\n{body}</body></html>\n")


@task(cache_policy=NO_CACHE, retries=3, retry_condition_fn=retry_transient, retry_delay_seconds=[2, 10, 30])
def write_report(
    run_uri: str, config: dict, root: str | None = None, about: dict[str, str | None] | None = None,
    trend_runs: int = DEFAULT_RUNS,
) -> dict:
    """Write the run-wide sections, stitch report.md and report.html, and publish the Prefect artifact;
    return the run's summary (read back from what the stages saved)."""
    run = ArtifactStore(run_uri)
    run_id = run_uri.rstrip("/").rsplit("/", 1)[-1]
    run.write_text(RunPaths.section("links"), links_markdown(run, about or {}))
    resolved = run.read_json(RunPaths.resolved) if run.exists(RunPaths.resolved) else None
    run.write_text(RunPaths.section("config"), config_markdown(config, resolved))
    run.write_text(RunPaths.section("summary"), summary_markdown(run))
    if root:
        trend_md, trend_png = write_trend(root, run_uri, trend_runs)
        run.write_text(RunPaths.section("trend"), f"![trend](../{RunPaths.trend})\n\n{trend_md}")
        png = base64.b64encode(trend_png).decode()
        publish_markdown("smolflow-score-trend", description="Tuned scores over the last runs",
                         markdown=f"![trend](data:image/png;base64,{png})\n\n{trend_md}")
    title = f"smolflow run `{run_id}`"
    report = stitch(run, title)
    run.write_text(RunPaths.report, report)
    run.write_text(RunPaths.report_html, to_html(run, report, f"smolflow run {run_id}"))
    # Relative images resolve only next to the run folder; the UI shows the plots in their own artifacts.
    # Relative links resolve only next to the run folder too: in the UI, the link's target is named
    # where it lies (a local path or s3:// URI a browser page cannot open anyway).
    in_ui = re.sub(r"!\[[^\]]*\]\(\.\./[^)]*\)\n*", "", report)
    in_ui = re.sub(r"\[([^\]]*)\]\(\.\./([^)]*)\)", lambda m: f"{m.group(1)}: `{run.url(m.group(2))}`", in_ui)
    publish_markdown("smolflow-report", in_ui, description="smolflow run report")
    read = lambda rel: run.read_json(rel) if run.exists(rel) else None  # noqa: E731
    judged = read(RunPaths.judge_summary)
    if judged:
        judged = {k: judged.get(k) for k in ("win_rate", "stderr", "n", "wins", "ties", "losses", "parse_failures")}
    metrics = read(RunPaths.metrics)
    # As the benchmarks' rows are: 4 decimals, counts as counts (training/metrics.json keeps the rest)
    metrics = metrics and {k: (int(v) if float(v).is_integer() else round(v, 4)) if isinstance(v, float) else v
                           for k, v in metrics.items()}
    if not judged and not (config.get("judge") or {}).get("enabled", True):
        judged = "not run: judge.enabled: false"  # not `judge: null`, which reads as a judge that gave nothing
    return {"run": run_uri, "model": run.url(RunPaths.model), "training": metrics,
            "benchmarks": read(RunPaths.comparison) or [], "judge": judged,
            "report": run.url(RunPaths.report_html)}
