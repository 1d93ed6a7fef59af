"""The parts of the `db-health-report` flow.

- `thresholds`: the flow's parameters and the thresholds the checks compare against;
- `models`: the report (`HealthReport`, `TableFigures`, `IndexFigures`, `Flag`);
- `bloat`: the statistics-based bloat estimate and the pgstattuple figure, as plain arithmetic;
- `postgres`, `sqlite`: the survey of each backend (its settings, per-table and per-index
  figures), read-only (`statements` runs one query);
- `cleanup_settings`: what Prefect's own settings say about its cleanup services;
- `framework`: the machinery of a check (its context, query kinds, severity rules, the
  `Check` record) and the one loop that walks the catalog;
- `checks`: the catalog, by topic: every health check as a record beside its SQL, in `CHECKS`;
- `history`: the previous report, for growth;
- `render`: the markdown and table artifacts;
- `survey`: the flow's Prefect tasks that put these together.
"""
