"""`make screenshots`: the demo's reports as a user sees them, in a headless Chromium.

Runs the demo (a clean stack, the messy history, every flow, the maintenance deployments),
starts the stack again with the Prefect UI, and takes PNG screenshots 1,600 px wide of the
three reports, a retention run's page and the retention Custom run form, into
`docs/screenshots/`, which the README shows. Chromium comes from Debian's packages
(`make screenshots` installs it when it is missing).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
from pathlib import Path

from localstack.stack import DEFAULT_PORT, DEFAULT_STATE_DIR, PROJECT_ROOT, Stack

SCREENSHOTS_DIR = PROJECT_ROOT / "docs" / "screenshots"
WIDTH = 1600


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("Chromium is not installed: apt-get install chromium (make screenshots does it)")


def screenshot(url: str, target: Path, height: int) -> None:
    subprocess.run(
        [
            chromium(),
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--window-size={WIDTH},{height}",
            # The UI is a single-page app: give it time to fetch and draw.
            "--virtual-time-budget=20000",
            f"--screenshot={target}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    print(f"  {target.relative_to(PROJECT_ROOT)}  <- {url}")


async def pages(api_url: str, ui_url: str) -> dict[str, tuple[str, int]]:
    """Screenshot name -> (the UI page, the window's height)."""
    from localstack.client import pointed_at
    from tasks.prefect_api import call, prefect_client

    with pointed_at(api_url, None):
        async with prefect_client() as client:
            runs = await call(
                client,
                "POST",
                "/flow_runs/filter",
                json={"flows": {"name": {"any_": ["retention"]}}, "sort": "START_TIME_DESC", "limit": 1},
            )
            deployment = await client.read_deployment_by_name("retention/ad-hoc")
            latest = {
                key: (
                    await call(
                        client,
                        "POST",
                        "/artifacts/filter",
                        json={"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1},
                    )
                )[0]["id"]
                for key in ("retention-report", "reconcile-report", "db-health-report")
            }
    return {
        "retention-report": (f"{ui_url}/artifacts/artifact/{latest['retention-report']}", 1900),
        "reconcile-report": (f"{ui_url}/artifacts/artifact/{latest['reconcile-report']}", 1900),
        "db-health-report": (f"{ui_url}/artifacts/artifact/{latest['db-health-report']}", 2400),
        "retention-history": (f"{ui_url}/artifacts/key/retention-report", 500),
        "retention-run": (f"{ui_url}/runs/flow-run/{runs[0]['id']}", 1100),
        "retention-custom-run": (f"{ui_url}/deployments/deployment/{deployment.id}/run", 1800),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m localstack.screenshots", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--out", type=Path, default=SCREENSHOTS_DIR)
    args = parser.parse_args(argv)
    chromium()
    from localstack.demo import main as demo

    demo(["--state-dir", str(args.state_dir), "--port", str(args.port)])
    stack = Stack(state_dir=args.state_dir, port=args.port, ui=True).up()
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        print(f"\nScreenshots, {WIDTH} px wide:")
        for name, (url, height) in asyncio.run(pages(stack.api_url, stack.server.ui_url)).items():
            screenshot(url, args.out / f"{name}.png", height)
    finally:
        stack.down()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
