"""Open a run's report.html in headless Chromium (Debian's; never a downloaded browser): check that
it renders offline (every image loaded, no request leaves the file) and save a screenshot.

    python scripts/report_screenshot.py smolflow-runs/runs/RUN_ID docs/report-html.png
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]


def render(report_html: Path, screenshot: Path | None = None) -> dict:
    """{'images': [naturalWidth of each <img>], 'requests': [every URL the page asked for], 'title': ...}."""
    from playwright.sync_api import sync_playwright

    url = report_html.resolve().as_uri()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1600})
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url)
            page.wait_for_load_state("load")
            images = page.eval_on_selector_all("img", "els => els.map(e => e.complete ? e.naturalWidth : 0)")
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=False)
            return {"images": images, "requests": [r for r in requests if r != url], "title": page.title()}
        finally:
            browser.close()


if __name__ == "__main__":
    run, out = Path(sys.argv[1]), Path(sys.argv[2])
    print(render(run / "report" / "report.html", out))
