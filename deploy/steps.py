"""A pull step that gives a flow run its own database role.

The worker's environment holds the URL of the role that may delete
(`MAINTENANCE_DATABASE_URL`, role `maintenance_purge`) and may hold the URL of a
read-only role (`MAINTENANCE_REPORT_DATABASE_URL`, role `maintenance_report`).
Deployments that only read the database run this step, which makes the read-only URL
the run's `MAINTENANCE_DATABASE_URL`. Pull steps run in the flow run's own process
before the flow is loaded, so the worker and the other runs keep their URL, and the
deployment stores the variable's name, never the URL.
"""

from __future__ import annotations

import os


def use_database_url_from(variable: str) -> dict[str, str]:
    """Use the URL in `variable` as this run's database URL, when the variable is set."""
    url = os.environ.get(variable)
    if url:
        os.environ["MAINTENANCE_DATABASE_URL"] = url
    return {}
