"""The latency probe: how a worker's API calls feel while maintenance runs.

It runs in a process of its own, so that the benchmark's event loop (busy deleting and
parsing) cannot delay it, and does what a running flow does, several times a second:
`POST /flow_runs/filter` for its own flow's Running runs, then `set_state` Running on its
own run, which writes a state row into the very tables maintenance deletes from. Each
sample (wall-clock end time, milliseconds, ok) is appended to a file at once, and
`Probe.summary(started, ended)` reads the samples of any time window.

    python -m bench.probe --out samples.txt      # against PREFECT_API_URL
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness import percentile
from tasks.prefect_api import PrefectApiError, call, prefect_client

PROBE_FLOW = "bench-latency-probe"
DEFAULT_INTERVAL_SECONDS = 0.1


class Probe:
    """The probe process, started and stopped by the benchmark."""

    def __init__(self, api_url: str, samples_file: Path, interval: float = DEFAULT_INTERVAL_SECONDS) -> None:
        self.api_url = api_url
        self.samples_file = Path(samples_file)
        self.interval = interval
        self._process: subprocess.Popen | None = None

    def start(self) -> Probe:
        self.samples_file.unlink(missing_ok=True)
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.probe",
                "--out",
                str(self.samples_file),
                "--interval",
                str(self.interval),
            ],
            env={**os.environ, "PREFECT_API_URL": self.api_url},
            stdin=subprocess.DEVNULL,
        )
        return self

    async def sampling(self, timeout: float = 120) -> None:
        """Wait for the first sample: the probe has imported Prefect and made its run."""
        deadline = time.monotonic() + timeout
        while not self._samples():
            if self._process is None or self._process.poll() is not None:
                raise RuntimeError("the latency probe is not running")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the latency probe took no sample in {timeout} s")
            await asyncio.sleep(0.1)

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def summary(self, started: float, ended: float) -> dict[str, Any]:
        """p50/p99 of the samples that ended between `started` and `ended` (`time.time()`)."""
        window = [
            (milliseconds, ok) for moment, milliseconds, ok in self._samples() if started <= moment <= ended
        ]
        latencies = [milliseconds for milliseconds, _ in window]
        p50, p99 = percentile(latencies, 0.50), percentile(latencies, 0.99)
        return {
            "samples": len(window),
            "errors": sum(1 for _, ok in window if not ok),
            "p50_ms": None if p50 is None else round(p50, 1),
            "p99_ms": None if p99 is None else round(p99, 1),
        }

    def _samples(self) -> list[tuple[float, float, bool]]:
        try:
            lines = self.samples_file.read_text().splitlines()
        except FileNotFoundError:
            return []
        samples = []
        for line in lines:
            fields = line.split()
            # The last line may be half written while the probe runs.
            if len(fields) == 3:
                samples.append((float(fields[0]), float(fields[1]), fields[2] == "1"))
        return samples


async def probe(samples_file: Path, interval: float) -> None:
    """Sample until SIGTERM, then finish the probe's own run."""
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    running = {"type": "RUNNING", "name": "Running"}
    async with prefect_client() as client:
        flow = await call(client, "POST", "/flows/", json={"name": PROBE_FLOW})
        run = await call(client, "POST", "/flow_runs/", json={"flow_id": flow["id"], "state": running})
        running_runs_of_this_flow = {
            "flows": {"id": {"any_": [flow["id"]]}},
            "flow_runs": {"state": {"type": {"any_": ["RUNNING"]}}},
            "limit": 10,
        }
        with open(samples_file, "a", buffering=1) as samples:
            while not stopping.is_set():
                started = time.perf_counter()
                ok = True
                try:
                    await call(client, "POST", "/flow_runs/filter", json=running_runs_of_this_flow)
                    await call(client, "POST", f"/flow_runs/{run['id']}/set_state", json={"state": running})
                except PrefectApiError:
                    ok = False
                milliseconds = 1000 * (time.perf_counter() - started)
                samples.write(f"{time.time():.3f} {milliseconds:.2f} {int(ok)}\n")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), timeout=interval)
        await call(
            client,
            "POST",
            f"/flow_runs/{run['id']}/set_state",
            json={"state": {"type": "COMPLETED", "name": "Completed"}},
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.probe", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="file the samples are appended to")
    parser.add_argument(
        "--interval", type=float, default=DEFAULT_INTERVAL_SECONDS, help="pause between samples"
    )
    args = parser.parse_args(argv)
    asyncio.run(probe(args.out, args.interval))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
