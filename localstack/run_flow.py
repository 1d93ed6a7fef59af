"""Run one maintenance flow in this process and write its report as JSON.

    python -m localstack.run_flow retention '{"dry_run": true}' --json report.json

Against `PREFECT_API_URL` (and `MAINTENANCE_DATABASE_URL` when set), with the Prefect of
the interpreter that runs it: the support matrix runs it from each version's venv. The
run and its artifacts appear in the UI as usual; the exit code is 1 when the flow fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

FLOWS = {
    "retention": ("flows.retention", "retention"),
    "reconcile-stuck-runs": ("flows.reconcile", "reconcile_stuck_runs"),
    "db-health-report": ("flows.db_health", "db_health_report"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localstack.run_flow", description=__doc__.split("\n")[0])
    parser.add_argument("flow", choices=sorted(FLOWS))
    parser.add_argument("parameters", nargs="?", default="{}", help="the flow's parameters as a JSON object")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    module_name, function_name = FLOWS[args.flow]
    module = __import__(module_name, fromlist=[function_name])
    flow = getattr(module, function_name)
    try:
        report = asyncio.run(flow(**json.loads(args.parameters)))
    except Exception as error:
        print(f"{args.flow} failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    if args.json:
        args.json.write_text(report.model_dump_json(indent=2))
    print(report.summary() if hasattr(report, "summary") else report.model_dump_json())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
