"""`prefect-maintenance` on the command line, against a real Prefect server and PostgreSQL.

The story: after an incident, an operator cleans up one flow's old runs from a terminal.
A typo in an option fails at once and changes nothing; the cleanup shows its dry-run count
and will not delete without a yes; with `--yes` it deletes exactly that count and the run's
report is in the UI as usual. Every flow parameter is an option, with its docstring as help.
"""

import json
import os
import subprocess
import sys
import uuid

import pytest
from conftest import serving
from history import existing, scalar
from prefect import flow

from cli import FLOW_COMMANDS, add_flow_options, build_parser, flow_parameters
from deploy import PROJECT_ROOT
from localstack.seed import MessyHistory, seed_messy_history
from tasks.reports import human_bytes


def prefect_maintenance(server, *arguments: str) -> subprocess.CompletedProcess:
    """The console script, in a process of its own, pointed at `server` and its database."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("MAINTENANCE_")}
    environment.update(PREFECT_API_URL=server.api_url, MAINTENANCE_DATABASE_URL=server.database_url)
    return subprocess.run(
        [sys.executable, "-m", "cli", *arguments],
        cwd=PROJECT_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
async def history(module_server) -> MessyHistory:
    with serving(module_server):
        return await seed_messy_history(module_server.database_url, prefix="cli", poison_pill=False)


async def flow_run_count(server) -> int:
    return await scalar("SELECT count(*) FROM flow_run", database_url=server.database_url)


def test_every_flow_parameter_is_an_option_with_its_docstring_as_help(capsys):
    parser, options = build_parser()
    for command in FLOW_COMMANDS:
        from prefect.utilities.callables import parameter_schema

        schema = parameter_schema(command.flow().fn).model_dump()
        assert set(options[command.name]) == set(schema["properties"]), command.name
        with pytest.raises(SystemExit) as exited:
            parser.parse_args([command.name, "--help"])
        assert exited.value.code == 0
        help_text = " ".join(capsys.readouterr().out.split())
        for parameter, option in options[command.name].items():
            assert option in help_text, option
            first_words = " ".join(schema["properties"][parameter]["description"].split()[:4])
            assert first_words in help_text, parameter


def test_a_new_parameter_becomes_an_option_by_itself():
    @flow(name="toy")
    def toy(
        names: list[str] | None = None,
        ages: dict[str, float] | None = None,
        strict: bool = False,
        limit: int | None = 5,
    ) -> None:
        """A toy.

        Args:
            names: some names.
            ages: an age per name.
            strict: be strict.
            limit: at most this many.
        """

    import argparse

    parser = argparse.ArgumentParser()
    options = add_flow_options(parser, toy)
    assert options == {"names": "--name", "ages": "--ages", "strict": "--strict", "limit": "--limit"}
    arguments = parser.parse_args(
        ["--name", "a", "--name", "b", "--ages", "a=3", "--strict", "--limit", "none"]
    )
    assert flow_parameters(arguments, options) == {
        "names": ["a", "b"],
        "ages": {"a": 3.0},
        "strict": True,
        "limit": None,
    }
    assert flow_parameters(parser.parse_args([]), options) == {}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["retention", "--older-than-days", "thirty"], "--older-than-days: takes a number, not 'thirty'"),
        (["retention", "--state", "RUNNING"], "--state: takes one of COMPLETED, FAILED, CANCELLED, CRASHED"),
        (["retention", "--per-state-days", "FAILED"], "--per-state-days: takes KEY=VALUE"),
        (["reconcile", "--unknown-state-action", "explode"], "--unknown-state-action: takes one of crash"),
        (["health", "--top-n", "many"], "--top-n: takes a integer"),
    ],
)
async def test_a_bad_option_fails_at_once_naming_it_and_changes_nothing(
    module_server, history, arguments, message
):
    before = await flow_run_count(module_server)
    result = prefect_maintenance(module_server, *arguments)
    assert result.returncode == 2
    assert message in result.stderr
    assert await flow_run_count(module_server) == before


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["retention", "--older-than-days", "0.01", "--yes"],
            "--older-than-days: must be more than one hour",
        ),
        (
            ["retention", "--deployment-name", "no-slash", "--dry-run"],
            "--deployment-name.0: 'no-slash' is not of the form 'flow-name/deployment-name'",
        ),
        (["reconcile", "--max-actions", "0"], "--max-actions: Input should be greater than or equal to 1"),
        (
            ["health", "--threshold", "tabel_bloat_percent=30"],
            "--thresholds.tabel_bloat_percent: unknown threshold",
        ),
    ],
)
async def test_a_value_the_flow_would_refuse_fails_before_any_run_naming_the_option(
    module_server, history, arguments, message
):
    before = await flow_run_count(module_server)
    # Whatever the module's other tests deleted before.
    old_before = await existing(history.old_finished, database_url=module_server.database_url)
    assert old_before
    result = prefect_maintenance(module_server, *arguments)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    # Refused before the flow ran: not even a failed run in the UI, nothing deleted.
    assert await flow_run_count(module_server) == before
    assert await existing(history.old_finished, database_url=module_server.database_url) == old_before


async def test_deleting_asks_first_and_deletes_exactly_the_dry_run_count_with_yes(module_server, history):
    only_etl = ["--flow-name", "cli-etl", "--no-vacuum", "--max-runs-per-second", "0"]
    etl_runs = await existing(history.old_finished, database_url=module_server.database_url)

    refused = prefect_maintenance(module_server, "retention", *only_etl)
    assert refused.returncode == 2
    assert "would delete" in refused.stdout
    assert "without confirmation: run it in a terminal or pass --yes" in refused.stderr
    assert await existing(etl_runs, database_url=module_server.database_url) == etl_runs

    dry = prefect_maintenance(module_server, "retention", *only_etl, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr[-2000:]
    dry_report = json.loads(dry.stdout[dry.stdout.index("{") :])
    counted = dry_report["flow_runs_deleted"]
    assert counted > 0
    # The confirmation's summary says how much space the rows take.
    space = human_bytes(sum(dry_report["bytes_deleted"].values()))
    assert f"  space: about {space} in the rows (" in refused.stdout

    deleted = prefect_maintenance(module_server, "retention", *only_etl, "--yes", "--json", "-")
    assert deleted.returncode == 0, deleted.stderr[-2000:]
    report = json.loads(deleted.stdout[deleted.stdout.rindex('{\n  "engine"') :])
    assert report["dry_run"] is False
    assert report["flow_runs_deleted"] == counted
    assert report["bytes_deleted"] == dry_report["bytes_deleted"]
    # Only the etl flow's runs went.
    left = await existing(history.old_finished, database_url=module_server.database_url)
    assert left and all(run_id not in left for run_id in report_ids(report))


def report_ids(report: dict) -> set[uuid.UUID]:
    return {uuid.UUID(str(run["id"])) for run in report.get("sample", [])}


async def test_the_flow_subcommands_print_their_summary_and_the_whole_report_on_request(
    module_server, history, tmp_path
):
    target = tmp_path / "health.json"
    health = prefect_maintenance(module_server, "health", "--json", str(target))
    assert health.returncode == 0, health.stderr[-2000:]
    assert "verdict " in health.stdout
    assert json.loads(target.read_text())["backend"] == "postgresql"

    reconcile = prefect_maintenance(module_server, "reconcile", "--dry-run")
    assert reconcile.returncode == 0, reconcile.stderr[-2000:]
    assert "found" in reconcile.stdout and "would fix" in reconcile.stdout
