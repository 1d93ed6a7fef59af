"""The parts of the `db-health-report` flow.

- `thresholds`: the flow's parameters and the thresholds the checks compare against;
- `models`: the report (`HealthReport`, `TableFigures`, `IndexFigures`, `Flag`);
- `bloat`: the statistics-based bloat estimate and the pgstattuple figure, as plain arithmetic;
- `postgres`, `sqlite`: what each backend can tell, read-only (`statements` runs one query);
- `backlog`: what Prefect has piled up (runs past retention, stuck runs, events);
- `checks`: every health check as a declarative record, walked by one loop;
- `history`: the previous report, for growth;
- `render`: the markdown and table artifacts;
- `survey`: the flow's Prefect tasks that put these together.
"""
