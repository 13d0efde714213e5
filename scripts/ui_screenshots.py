"""Render the Prefect UI pages users will see into docs/ (headless Debian chromium).

    python scripts/ui_screenshots.py [--port 4300]

Starts a throwaway Prefect server and deployments/serve.py, runs the on-demand deployment once
with a short configuration, and screenshots the deployment's Run form and the finished run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from deployments.local import start_server, start_serving, stop  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"


def screenshot(url: str, out: Path, size: str = "1400,1800") -> None:
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
         f"--user-data-dir={tempfile.mkdtemp()}", f"--window-size={size}", "--virtual-time-budget=15000",
         f"--screenshot={out}", url],
        check=True, capture_output=True, timeout=120,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=4300)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp())
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PREFECT_API_URL=f"http://127.0.0.1:{args.port}/api")
    server = start_server(args.port, home=home)
    serving = start_serving(args.port, home=home)
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            for _ in range(120):
                try:
                    deployment = client.read_deployment_by_name("smolflow-finetune/on-demand")
                    break
                except Exception:
                    time.sleep(1)
            ui = f"http://127.0.0.1:{args.port}"
            screenshot(f"{ui}/deployments/deployment/{deployment.id}/run", DOCS / "prefect-run-form.png")
            short = {"training": {"max_steps": 4, "eval_steps": 2, "logging_steps": 1},
                     "sampling": {"prompts": ["Hello! How are you?"], "max_new_tokens": 24},
                     "benchmarks": [{"name": "gsm8k", "limit": 2}],
                     "output": {"artifacts_uri": str(home / "artifacts")}}
            run = client.create_flow_run_from_deployment(deployment.id, parameters={"config": short})
            while not (run := client.read_flow_run(run.id)).state.is_final():
                time.sleep(3)
            print("run", run.name, run.state.name)
            screenshot(f"{ui}/runs/flow-run/{run.id}", DOCS / "prefect-flow-run.png")
            screenshot(f"{ui}/deployments/deployment/{deployment.id}", DOCS / "prefect-deployment.png", "1400,1000")
    finally:
        stop(serving)
        stop(server)


if __name__ == "__main__":
    main()
