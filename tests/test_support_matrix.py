"""Every supported Prefect server, each with its own client: the README's support table.

For each version of `SUPPORTED_VERSIONS`, a real server of that version (its own venv)
on a new database of the session PostgreSQL, and every client-side step run with that
venv's Prefect, the way a worker matching its server runs them: a messy history seeded
through its API, reconcile found by SQL and through the API alone (dry run, then a real
pass through the API only), retention through the API engine and the SQL engine (dry run,
then real), the health report, then `make deploy` and one run through the single worker.
The flows run through the command line, `prefect-maintenance`.
What is left is read straight from the database.
"""

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import serving
from history import QUICK, RunState, run_states
from workers import start_worker, stop_worker, wait_for_task_runs, wait_until_final

from cli import build_parser
from localstack.orphans import count_orphans
from localstack.prefect_versions import SUPPORTED_VERSIONS, run_with_client, venv_python
from tasks.prefect_api import DELETES_LOGS_OF_DELETED_RUNS, prefect_client, version_tuple

LATE_AFTER_HOURS = 48

pytestmark = pytest.mark.timeout(900)


@dataclass
class VersionedServer:
    version: str
    server: object
    home: Path
    runs: int = 0
    outputs: list[str] = field(default_factory=list)

    @property
    def database_url(self) -> str:
        return self.server.database_url

    def client(self, arguments: list[str], *, database: bool, timeout: float = 600) -> str:
        """Run `python ARGUMENTS` with this version's client; fails the test on a non-zero exit."""
        self.runs += 1
        result = run_with_client(
            self.version,
            arguments,
            api_url=self.server.api_url,
            database_url=self.database_url if database else None,
            home=self.home / f"client-{self.runs}",
            timeout=timeout,
        )
        output = f"$ python {' '.join(arguments)}\n{result.stdout}\n{result.stderr}"
        self.outputs.append(output)
        assert result.returncode == 0, output[-4000:]
        return result.stdout

    def seed(self, prefix: str) -> dict[str, list[str]]:
        target = self.home / f"history-{prefix}.json"
        self.client(["-m", "localstack.seed", "--prefix", prefix, "--json", str(target)], database=True)
        return json.loads(target.read_text())

    def run_flow(self, command: str, parameters: dict, *, database: bool) -> dict:
        """`prefect-maintenance COMMAND` with these parameters as its options; the report."""
        self.runs += 1
        target = self.home / f"report-{self.runs}.json"
        arguments = command_line(command, parameters)
        if command == "retention" and not parameters.get("dry_run"):
            arguments.append("--yes")
        self.client(["-m", "cli", *arguments, "--json", str(target)], database=database)
        return json.loads(target.read_text())


def command_line(command: str, parameters: dict) -> list[str]:
    """The options of the command line that set these flow parameters."""
    _, options = build_parser()
    arguments = [command]
    for parameter, value in parameters.items():
        option = options[command][parameter]
        if isinstance(value, bool):
            arguments.append(option if value else f"--no-{option[2:]}")
        elif value is None:
            arguments += [option, "none"]
        elif isinstance(value, list):
            for item in value:
                arguments += [option, str(item)]
        elif isinstance(value, dict):
            for key, item in value.items():
                arguments += [option, f"{key}={item}"]
        else:
            arguments += [option, str(value)]
    return arguments


@pytest.fixture(scope="module", params=SUPPORTED_VERSIONS)
def versioned(request, module_server_factory, tmp_path_factory) -> VersionedServer:
    version = request.param
    venv_python(version)
    server = module_server_factory(version=version)
    assert server.version() == version
    return VersionedServer(version, server, tmp_path_factory.mktemp(f"prefect-{version}"))


async def states_of(database_url: str) -> dict[str, RunState]:
    """Every flow run and task run with its state, by id as the seeded history's JSON writes it."""
    return {str(run_id): state for run_id, state in (await run_states(database_url)).items()}


@dataclass
class Reconciled:
    history: dict[str, list[str]]
    before: dict
    sql_dry: dict
    api_dry: dict
    api_real: dict
    after: dict
    sql_second: dict


@pytest.fixture(scope="module")
async def reconciled(versioned: VersionedServer) -> Reconciled:
    history = versioned.seed("stuck")
    parameters = {"late_after_hours": LATE_AFTER_HOURS}
    before = await states_of(versioned.database_url)
    sql_dry = versioned.run_flow("reconcile", {**parameters, "dry_run": True}, database=True)
    api_dry = versioned.run_flow("reconcile", {**parameters, "dry_run": True}, database=False)
    api_real = versioned.run_flow("reconcile", parameters, database=False)
    after = await states_of(versioned.database_url)
    sql_second = versioned.run_flow("reconcile", {**parameters, "dry_run": True}, database=True)
    return Reconciled(history, before, sql_dry, api_dry, api_real, after, sql_second)


def rule(report: dict, name: str) -> dict:
    return next(entry for entry in report["rules"] if entry["rule"] == name)


def ids(rule_report: dict, outcome: str) -> set[str]:
    return {str(action["run_id"]) for action in rule_report["runs"] if action["outcome"] == outcome}


ENDS = {
    "unknown_state": ("CRASHED", "unknown-state"),
    "cancelling_subflows": ("CANCELLED", "stuck-cancelling"),
    "stuck_pending": ("CRASHED", "stuck-pending"),
    "zombie_running": ("CRASHED", "zombie"),
    "late": ("CANCELLED", "late"),
    "running_subflow_under_finished_parent": ("CRASHED", "orphaned-subflow"),
    "open_task_runs_in_finished_flow": ("COMPLETED", "open-task-run"),
}
LEFT_ALONE = (
    "healthy_running",
    "running_without_heartbeat",
    "fresh_pending",
    "fresh_cancelling",
    "scheduled_tomorrow",
    "old_finished",
    "recent_finished",
)


async def test_reconcile_through_the_api_alone_ends_every_stuck_run(reconciled: Reconciled):
    for category, (state_type, rule_name) in ENDS.items():
        run_ids = reconciled.history[category]
        assert run_ids, category
        for run_id in run_ids:
            assert reconciled.after[run_id].state_type == state_type, (
                category,
                run_id,
                reconciled.after[run_id],
            )
        assert set(run_ids) <= ids(rule(reconciled.api_real, rule_name), "fixed"), category
    for category in LEFT_ALONE:
        for run_id in reconciled.history[category]:
            assert reconciled.after[run_id] == reconciled.before[run_id], (category, run_id)


async def test_reconcile_repairs_the_poison_pill_through_the_api_alone(reconciled: Reconciled):
    (poisoned,) = reconciled.history["null_state_timestamp"]
    before, after = reconciled.before[poisoned], reconciled.after[poisoned]
    assert (before.state_type, before.state_name, before.state_timestamp) == ("RUNNING", "Running", None)
    assert (after.state_type, after.state_name) == (
        "RUNNING",
        "Running",
    ) and after.state_timestamp is not None
    assert poisoned in ids(rule(reconciled.api_real, "poison-pill"), "fixed")


async def test_reconcile_finds_the_same_runs_by_sql_and_through_the_api(reconciled: Reconciled):
    for sql_rule, api_rule in zip(reconciled.sql_dry["rules"], reconciled.api_dry["rules"], strict=True):
        assert sql_rule["found"] == api_rule["found"], sql_rule["rule"]
        if sql_rule["rule"] != "poison-pill":  # through the API its ids show once it is repaired
            assert ids(sql_rule, "would fix") == ids(api_rule, "would fix"), sql_rule["rule"]


async def test_reconcile_dry_run_predicts_the_real_pass(reconciled: Reconciled):
    for dry_rule, real_rule in zip(reconciled.api_dry["rules"], reconciled.api_real["rules"], strict=True):
        assert dry_rule["fixed"] == real_rule["fixed"], dry_rule["rule"]
        assert real_rule["skipped"] == real_rule["left"] == 0, real_rule
    assert sum(entry["found"] for entry in reconciled.sql_second["rules"]) == 0


@dataclass
class Retained:
    history: dict[str, list[str]]
    dry: dict
    real: dict
    left: dict
    orphans: dict[str, int]


async def _retain(versioned: VersionedServer, prefix: str, engine: str) -> Retained:
    history = versioned.seed(prefix)
    parameters = {**QUICK, "engine": engine, "flow_names": history["flow_names"]}
    database = engine == "sql"
    if database:
        # With the database, retention also sweeps what the API engine could not delete.
        parameters["include_orphans"] = True
    dry = versioned.run_flow("retention", {**parameters, "dry_run": True}, database=database)
    real = versioned.run_flow("retention", parameters, database=database)
    left = await states_of(versioned.database_url)
    return Retained(history, dry, real, left, await count_orphans(versioned.database_url))


def after(request, stage: str) -> None:
    """The stages share one database and go in order; one that failed fails its own tests
    only, and the next stages still run."""
    with contextlib.suppress(Exception, pytest.fail.Exception):
        request.getfixturevalue(stage)


@pytest.fixture(scope="module")
async def retained_by_api(request, versioned: VersionedServer) -> Retained:
    after(request, "reconciled")
    return await _retain(versioned, "api", "api")


@pytest.fixture(scope="module")
async def retained_by_sql(request, versioned: VersionedServer) -> Retained:
    after(request, "retained_by_api")
    return await _retain(versioned, "sql", "sql")


def _assert_old_runs_gone(retained: Retained) -> None:
    assert retained.dry["flow_runs_deleted"] == retained.real["flow_runs_deleted"] > 0
    for run_id in retained.history["old_finished"] + retained.history["old_subflows"]:
        assert run_id not in retained.left, run_id
    for run_id in retained.history["recent_finished"]:
        assert run_id in retained.left, run_id


async def test_retention_through_the_api_deletes_what_its_dry_run_counted(versioned, retained_by_api):
    _assert_old_runs_gone(retained_by_api)
    orphans = retained_by_api.orphans
    # Through the API alone nothing can delete cache rows; before 3.4.9 the server keeps the
    # deleted runs' logs too. The report says so; everything else is gone.
    server_deletes_logs = version_tuple(versioned.version) >= DELETES_LOGS_OF_DELETED_RUNS
    assert {table: count for table, count in orphans.items() if count} == {
        **({} if server_deletes_logs else {"log": orphans["log"]}),
        **(
            {"task_run_state_cache": orphans["task_run_state_cache"]}
            if orphans["task_run_state_cache"]
            else {}
        ),
    }
    if not server_deletes_logs:
        assert orphans["log"] > 0
        assert any("include_orphans" in note for note in retained_by_api.real["notes"])


async def test_retention_by_sql_deletes_what_its_dry_run_counted_and_sweeps_every_orphan(retained_by_sql):
    _assert_old_runs_gone(retained_by_sql)
    assert retained_by_sql.orphans == dict.fromkeys(retained_by_sql.orphans, 0)


@pytest.fixture(scope="module")
async def health(request, versioned: VersionedServer) -> dict:
    after(request, "retained_by_sql")
    return versioned.run_flow("health", {}, database=True)


async def test_the_health_report_runs_every_check(health):
    assert health["backend"] == "postgresql"
    assert not [note for note in health["notes"] if "could not run" in note]


async def test_deploy_and_one_run_through_the_single_worker(request, versioned: VersionedServer):
    after(request, "health")
    output = versioned.client(["-m", "deploy.bootstrap"], database=False)
    for name in (
        "retention/nightly",
        "retention/ad-hoc",
        "reconcile-stuck-runs/every-10-minutes",
        "db-health-report/daily",
    ):
        assert f"deployment {name!r}:" in output, output
    assert output.splitlines()[-1] == "next: `make worker` starts the one worker of maintenance/maintenance"
    database_url = versioned.database_url
    roles = {"maintenance_purge": database_url, "maintenance_report": database_url}
    command = (str(venv_python(versioned.version)), "-m", "deploy.worker")
    worker = start_worker(versioned.server, roles, versioned.home / "worker.log", command=command)
    try:
        with serving(versioned.server):
            async with prefect_client() as client:
                deployment = await client.read_deployment_by_name("db-health-report/daily")
                run_id = (await client.create_flow_run_from_deployment(deployment.id)).id
            runs = await wait_until_final([run_id])
            task_runs = await wait_for_task_runs(run_id)
    finally:
        stop_worker(worker)
    log = (versioned.home / "worker.log").read_text(errors="replace")[-5000:]
    assert runs[run_id].state_name == "Completed", log
    # The flow's own task runs reach the server through its event stream.
    assert task_runs, log
    assert {task_run.state_name for task_run in task_runs} == {"Completed"}
