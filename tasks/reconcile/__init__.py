"""The parts of the `reconcile-stuck-runs` flow.

- `parameters`: the flow's parameters (one threshold per rule, the Unknown action, the
  cap, the include filters), validated before anything is touched;
- `rules`: every stuck-run rule as a declarative record with its judge, walked in order;
- `detect`: read-only detection, by SQL when the database is reachable and through the
  API otherwise, and `count_stuck_runs()` for the health report;
- `heartbeats`: the latest `prefect.flow-run.heartbeat` of many runs at once;
- `actions`: re-read, then end each run through the API, one event per fixed run;
- `unreadable`: the ids of runs the API cannot read, from their events, for servers
  without `bulk_set_state`;
- `report`: the pass's report and its markdown.
"""
