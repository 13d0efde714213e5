"""Markdown artifacts in Prefect's own UI, rendered by headless Chromium: no table wider than the
pane that shows it (Prefect 3.9's V1 UI hides the scrollbar of a markdown table, so a wide one is
simply cut off), and nothing of the report lost on the way.

The artifacts go to the session's Prefect server (tests/conftest.py); the pages are Prefect's UI app
(`create_ui_app`, the one `prefect server start` mounts) served from this process, pointed at that
server's API, because the session server runs with its UI turned off.
"""

import contextvars
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from tasks.prefect_markdown import ROW_BUDGET, PAD, cell_width, narrow_tables, publish_markdown, split_row

# The report.md of a real run: scripts/ui_screenshots.py's short run of the built-in model.
REPORT = Path(__file__).parent / "data" / "report.md"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
VIEWPORT = {"width": 1280, "height": 900}  # ROW_BUDGET is sized for this window

# For every table: its width, the width the nearest clipping ancestor shows of it, and how many of
# its cells cut their own text (V1's cells are nowrap with an ellipsis).
MEASURE = """() => [...document.querySelectorAll('table')].map(t => {
  let box = t.parentElement;
  while (box && getComputedStyle(box).overflowX === 'visible') box = box.parentElement;
  return {head: t.querySelector('th') ? t.querySelector('th').innerText : '', width: t.getBoundingClientRect().width,
          shown: box.clientWidth, scrollbar: getComputedStyle(box).scrollbarWidth,
          cutCells: [...t.querySelectorAll('td, th')].filter(c => c.scrollWidth > c.clientWidth + 1).length};
})"""


def representative_report() -> str:
    """The real run's report with its health and gate sections rendered by the real code for a run
    that failed both: fired signs carry advice and a rejection its reasons, long cells a healthy
    run's report lacks."""
    from tasks.gate import Score, decide, section
    from tasks.generation import Sample
    from tasks.health import assess

    history = [{"step": s, "loss": v} for s, v in [(1, 2.0), (2, 1.99), (3, 1.98), (4, 1.985)]]
    history += [{"step": s, "eval_loss": v} for s, v in [(2, 2.6), (3, 2.5), (4, 2.9)]]
    samples = [Sample(prompt="Hello! How are you?", completion="Hi!\nuser\nAnd you?", new_tokens=48,
                      stopped_at_eos=False)]
    health = assess(history, samples)
    assert not health.healthy
    key = "same items, template and scorer"
    decision = decide({"gsm8k": Score(score=0.1, stderr=0.05, n=20, comparability_key=key)},
                      {"gsm8k": Score(score=0.5, stderr=0.05, n=20, comparability_key=key)},
                      "base model", blocking_health=health.blocking())
    assert decision.reasons
    new = {"## Training health\n": health.markdown(), "## Regression gate\n": section(decision)}
    parts = re.split(r"(?m)^(?=## )", REPORT.read_text())
    return "".join(next((f"{h}\n{body.rstrip()}\n\n" for h, body in new.items() if part.startswith(h)), part)
                   for part in parts)


def tables(markdown: str) -> list[list[list[str]]]:
    """Every table as rows of cells (header first, delimiter left out)."""
    from markdown_it import MarkdownIt

    lines = markdown.split("\n")
    return [[split_row(x) for i, x in enumerate(lines[a:b]) if i != 1]
            for a, b in (t.map for t in MarkdownIt("commonmark").enable("table").parse(markdown)
                         if t.type == "table_open")]


def test_narrowed_tables_fit_the_budget_and_keep_every_cell():
    report = representative_report()
    narrowed = narrow_tables(report)
    before, after = tables(report), tables(narrowed)
    assert any(sum(max(cell_width(r[j]) for r in t) + PAD for j in range(len(t[0]))) > ROW_BUDGET for t in before)
    for t in after:
        assert sum(max(cell_width(r[j]) for r in t) + PAD for j in range(len(t[0]))) <= ROW_BUDGET, t[0]
    # Every cell that said something is still there: in a narrowed table, or in the list under it.
    for t in before:
        for row in t[1:]:
            for cell in row:
                assert cell in ("", "-") or cell in narrowed, cell
    # Long free text left its table: the benchmark's source, the health advice, the base model's answer.
    for moved in ("source: fixture: hand-written items", "advice: Use fewer steps or epochs",
                  "before training: Hello! How are you? I'm here"):
        assert re.search(rf"(?m)^ *- .*{re.escape(moved)}", narrowed), moved
    # Outside tables nothing changed; a table that fits stays as it was.
    strip = lambda md: re.sub(r"^(\|.*|  - .*|- .*)\n", "", md, flags=re.M).replace("\n", "")  # noqa: E731
    assert strip(narrowed) == strip(report)
    small = "text\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n```\n| not | a | table |\n```\n"
    assert narrow_tables(small) == small
    # Width is what renders: tags and entities (the template preview's markers) count as their text.
    markers = "| template | marker | tokens |\n|---|---|---|\n" + (
        "| Llama-3-Instruct | <code>&lt;&#124;start_header_id&#124;&gt;</code> | 9 |\n" * 3)
    assert narrow_tables(markers) == markers
    assert narrow_tables(markers, budget=30) != markers
    # A row with nothing to move still shows its first cell when no table is left to hold it.
    assert narrow_tables("| k | long |\n|---|---|\n| a | " + "x" * 100 + " |\n| b | - |\n").endswith("- **b**\n")


def test_every_markdown_artifact_goes_through_publish_markdown():
    root = Path(__file__).resolve().parent.parent
    callers = [str(p.relative_to(root)) for pkg in ("tasks", "flows", "deployments") for p in (root / pkg).rglob("*.py")
               if "create_markdown_artifact(" in p.read_text()]
    assert callers == ["tasks/prefect_markdown.py"], callers


@pytest.fixture(scope="module")
def prefect_ui():
    """Prefect's UI app on a free port, talking to the session server's API; yields its address."""
    import uvicorn
    from prefect.server.api.server import create_ui_app
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_API_URL, temporary_settings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with temporary_settings({PREFECT_UI_API_URL: PREFECT_API_URL.value()}):
        app = create_ui_app(ephemeral=False)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
        # The app reads its settings per request: run it in a copy of this context, which has them.
        thread = threading.Thread(target=contextvars.copy_context().run, args=(server.run,), daemon=True)
        thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "Prefect's UI app did not start within 60 s"
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


def test_no_table_of_the_report_artifact_is_cut_off_in_prefects_ui(prefect_ui):
    from playwright.sync_api import sync_playwright
    from prefect.artifacts import create_markdown_artifact

    # The report as the flow publishes it, and as it was published before (tables untouched): the
    # second must overflow, or this measurement could not tell a clipped table from a fitting one.
    report = representative_report()
    fixed = publish_markdown("smolflow-report", report, description="smolflow run report")
    raw = create_markdown_artifact(key="smolflow-report-unnarrowed", markdown=report, description="before")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"])
        try:
            page = browser.new_page(viewport=VIEWPORT)
            seen = {}
            # The V1 UI: where deep links (a flow run's "View at" URL) land. V2, the default at "/",
            # wraps table cells, so nothing is cut off there (1280 px: every table 584 px wide).
            for artifact in (fixed, raw):
                page.goto(f"{prefect_ui}/artifacts/artifact/{artifact}")
                page.wait_for_selector("table", timeout=60_000)
                page.wait_for_function("n => document.querySelectorAll('table').length >= n",
                                       arg=len(tables(narrow_tables(report))), timeout=30_000)
                seen[artifact] = page.evaluate(MEASURE), page.inner_text("body")
        finally:
            browser.close()

    # Plain text (no markup) of every cell of the report, up to its first line break.
    cells = {c.split("<br>")[0][:40] for t in tables(report) for r in t for c in r}
    cells = {c for c in cells if c and not re.search(r"[`*\\\[<&]", c) and c != "-"}
    assert len(cells) > 20
    before = seen[raw][0]
    assert before[0]["scrollbar"] == "none"  # what makes a wide table a clipped one in V1
    assert any(t["width"] > t["shown"] + 1 for t in before), before
    measured, text = seen[fixed]
    cut = [t for t in measured if t["width"] > t["shown"] + 1 or t["cutCells"]]
    assert not cut, f"tables cut off: {cut}"
    assert len(measured) == len(tables(narrow_tables(report))), measured
    # What left the tables is on the page too (the start of every plain-text cell).
    for cell in cells:
        assert cell in text, cell
