"""Benchmarks: our flows side by side with Prefect's own ways, on one database, in one run.

- `bench.retention`: deleting old runs, eight ways, each on its own slice of one database.
- `bench.reconcile`: a reconcile pass on a big healthy database, and the rate it fixes stuck runs.
- `bench.health`: the health report on a big database.
- `bench.events`: deleting old events at 10,000,000 events, and logs at 30,000,000 lines.

Each starts its own embedded PostgreSQL + Prefect server (`.local/bench`), prints a markdown
table with the targets it checks, and writes every figure to `--json`.
"""
