"""Render the Prefect UI pages users will see into docs/ (headless Debian chromium via Playwright).

    python scripts/ui_screenshots.py [--port 4300]

Starts a throwaway Prefect server and deployments/serve.py, runs the on-demand deployment once
with a short configuration on the built-in model, and screenshots the deployment's Run form, the
finished run, its report artifact (scrolled to the tables) and the deployment page. Pages are the
V1 UI: where a flow run's "View at" link and every deep link land.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from deployments.local import start_server, start_serving, stop  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Short but whole: every stage runs (training, samples, benchmark, judge, gate, report).
SHORT = {"training": {"max_steps": 4, "eval_steps": 2, "logging_steps": 1, "max_length": 256},
         "sampling": {"prompts": ["Hello! How are you?", "How do I keep my basil plant alive?"], "max_new_tokens": 48},
         "benchmarks": [{"name": "gsm8k", "limit": 2}],
         "judge": {"limit": 2, "max_new_tokens": 48}}


def shoot(page, url: str, out: Path, ready: str, height: int = 1800, scroll_to: str | None = None) -> None:
    """Open `url`, wait until `ready` (a selector) is shown and the network is idle, and save the view."""
    page.set_viewport_size({"width": 1400, "height": height})
    page.goto(url)
    page.wait_for_selector(ready, timeout=120_000)
    page.wait_for_load_state("networkidle", timeout=120_000)
    if scroll_to:
        page.locator(scroll_to).first.evaluate("e => e.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(1500)  # the UI fades content in
    page.screenshot(path=str(out))
    print("wrote", out)


def main() -> None:
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=4300)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp())
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PREFECT_API_URL=f"http://127.0.0.1:{args.port}/api")
    server = start_server(args.port, home=home)
    serving = start_serving(args.port, home=home)
    try:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

        with get_client(sync_client=True) as client, sync_playwright() as pw:
            for _ in range(120):
                try:
                    deployment = client.read_deployment_by_name("smolflow-finetune/on-demand")
                    break
                except Exception:
                    time.sleep(1)
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run"])
            page = browser.new_page()
            ui = f"http://127.0.0.1:{args.port}"
            shoot(page, f"{ui}/deployments/deployment/{deployment.id}/run", DOCS / "prefect-run-form.png",
                  "text=Parameters")
            short = SHORT | {"output": {"artifacts_uri": str(home / "artifacts")}}
            run = client.create_flow_run_from_deployment(deployment.id, parameters={"config": short})
            while not (run := client.read_flow_run(run.id)).state.is_final():
                time.sleep(5)
            print("run", run.name, run.state.name)
            shoot(page, f"{ui}/runs/flow-run/{run.id}", DOCS / "prefect-flow-run.png", "text=Task Runs")
            report = client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]), key=ArtifactFilterKey(any_=["smolflow-report"])))
            shoot(page, f"{ui}/artifacts/artifact/{report[0].id}", DOCS / "prefect-report-artifact.png",
                  ".markdown-renderer__table", height=1500, scroll_to="text=Training health")
            shoot(page, f"{ui}/deployments/deployment/{deployment.id}", DOCS / "prefect-deployment.png",
                  "text=on-demand", height=1000)
            browser.close()
    finally:
        stop(serving)
        stop(server)
        shutil.rmtree(home, ignore_errors=True)  # the run folder holds two models (~0.5 GB)


if __name__ == "__main__":
    main()
