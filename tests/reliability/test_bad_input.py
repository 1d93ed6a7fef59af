"""Bad input: hostile names, invalid parameters and broken database settings.

Every invalid value is refused before anything changes, with a message naming the
parameter; a broken or unreachable database gives one clear error without its password;
names and tags that look like SQL are only ever data.
"""

from __future__ import annotations

import pytest
from history import QUICK, PlannedRun, create_history, existing, owned_rows, scalar

from flows.reconcile import reconcile_stuck_runs
from flows.retention import retention
from tasks.prefect_api import call, prefect_client
from tasks.settings import SettingsError, get_settings

HOSTILE_FLOW = "hostile'); DELETE FROM flow_run; --"
HOSTILE_DEPLOYMENT = "x'; DROP TABLE log;--"
HOSTILE_TAG = "x'; DROP TABLE log;--"
HOSTILE_EXCLUDED_TAG = '"; TRUNCATE artifact; --'
PASSWORD = "hunter2-secret"


async def test_hostile_deployment_names_and_tags_are_only_data(stack):
    history = await create_history(
        "hostile",
        [
            PlannedRun("COMPLETED", 90, tags=(HOSTILE_TAG,)),
            PlannedRun("FAILED", 90, tags=(HOSTILE_TAG, HOSTILE_EXCLUDED_TAG)),
            PlannedRun("PENDING", 1, tags=(HOSTILE_TAG,)),
            PlannedRun("COMPLETED", 90),
        ],
    )
    tagged, excluded, pending, untagged = history.ids
    async with prefect_client() as client:
        flow = await call(client, "POST", "/flows/", json={"name": HOSTILE_FLOW})
        deployment = await call(
            client,
            "POST",
            "/deployments/",
            json={"name": HOSTILE_DEPLOYMENT, "flow_id": flow["id"], "paused": True},
        )
        hostile_run = await call(
            client,
            "POST",
            "/flow_runs/",
            json={
                "flow_id": flow["id"],
                "deployment_id": deployment["id"],
                "tags": [HOSTILE_TAG],
                "state": {"type": "COMPLETED", "name": "Completed"},
            },
        )
    kept_before = await owned_rows([excluded, pending, untagged])
    by_tag = {"tags": [HOSTILE_TAG], "exclude_tags": [HOSTILE_EXCLUDED_TAG], "flow_names": history.flow_names}
    for engine in ("api", "sql"):
        dry = await retention(engine=engine, dry_run=True, **by_tag, **QUICK)
        assert dry.flow_runs_deleted == 1, engine
    report = await retention(engine="sql", **by_tag, **QUICK)
    assert report.flow_runs_deleted == 1
    assert await existing(history.ids) == {excluded, pending, untagged}

    # The hostile deployment is found by its name, and only its (young) run is looked at.
    deployment_name = f"{HOSTILE_FLOW}/{HOSTILE_DEPLOYMENT}"
    for engine in ("api", "sql"):
        dry = await retention(engine=engine, dry_run=True, deployment_names=[deployment_name], **QUICK)
        assert dry.flow_runs_deleted == 0, engine
    scoped = await reconcile_stuck_runs(
        deployment_names=[deployment_name], tags=[HOSTILE_TAG], flow_names=[HOSTILE_FLOW], dry_run=True
    )
    assert scoped.found == 0
    # Every table is still there, and so is every row that was not deliberately deleted.
    tables = (
        "SELECT count(*) FROM information_schema.tables WHERE table_name IN ('log', 'flow_run', 'artifact')"
    )
    assert await scalar(tables) == 3
    assert await owned_rows([excluded, pending, untagged]) == kept_before
    assert await existing([hostile_run["id"]])


@pytest.mark.parametrize(
    ("values", "parameter"),
    [
        ({"states": []}, "states"),
        ({"states": ["PENDING"]}, "states"),
        ({"per_state_days": {"COMPLETED": 0}}, "per_state_days"),
        ({"older_than_days": "thirty"}, "older_than_days"),
        ({"older_than_days": -1}, "older_than_days"),
        ({"keep_last_per_deployment": -1}, "keep_last_per_deployment"),
        ({"batch_size": 10_001}, "batch_size"),
        ({"max_minutes": 0}, "max_minutes"),
        ({"deployment_names": [""]}, "deployment_names"),
        ({"deployment_names": ["no-slash"]}, "deployment_names"),
        ({"flow_names": ["no-such-flow"]}, "flow_names"),
        ({"engine": "fast"}, "engine"),
    ],
)
async def test_invalid_retention_parameters_change_nothing(stack, values, parameter):
    history = await create_history("bad-retention", [PlannedRun("COMPLETED", 400)])
    before = await owned_rows(history.ids)
    # Aimed at everything old on the server: a bad value must stop it before it starts.
    with pytest.raises(Exception, match=parameter):
        await retention(older_than_days=0.05, **{**QUICK, **values})
    assert await existing(history.ids) == set(history.ids)
    assert await owned_rows(history.ids) == before


@pytest.mark.parametrize(
    ("values", "parameter"),
    [
        ({"unknown_state_action": "explode"}, "unknown_state_action"),
        ({"max_actions": 0}, "max_actions"),
        ({"cancelling_after_minutes": -5}, "cancelling_after_minutes"),
        ({"pending_after_minutes": 0}, "pending_after_minutes"),
        ({"late_after_hours": "soon"}, "late_after_hours"),
        ({"deployment_names": ["no-slash"]}, "deployment_names"),
        ({"flow_names": ["no-such-flow"]}, "flow_names"),
    ],
)
async def test_invalid_reconcile_parameters_change_nothing(stack, values, parameter):
    history = await create_history("bad-reconcile", [PlannedRun("PENDING", 1)])
    (pending,) = history.ids
    state_before = await scalar("SELECT state_id FROM flow_run WHERE id = :id", id=pending)
    with pytest.raises(Exception, match=parameter):
        await reconcile_stuck_runs(pending_after_minutes=1, **values)
    assert await scalar("SELECT state_id FROM flow_run WHERE id = :id", id=pending) == state_before


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql+asyncpg://maintenance:{PASSWORD}@127.0.0.1:1/prefect",
        f"mysql://maintenance:{PASSWORD}@127.0.0.1/prefect",
        f"maintenance:{PASSWORD}@127.0.0.1/prefect",
    ],
    ids=["unreachable", "unsupported-dialect", "not-a-url"],
)
async def test_a_broken_database_url_gives_one_clear_error_without_the_password(stack, monkeypatch, url):
    monkeypatch.setenv("MAINTENANCE_DATABASE_URL", url)
    try:
        get_settings(refresh=True)
    except SettingsError as error:
        assert PASSWORD not in str(error)
    for flow_call in (
        retention(engine="sql", dry_run=True, **QUICK, return_state=True),
        reconcile_stuck_runs(dry_run=True, return_state=True),
    ):
        try:
            state = await flow_call
        except Exception as error:
            message = f"{type(error).__name__}: {error}"
        else:
            if state.is_completed():
                # Without database access reconcile works through the API and says so.
                report = await state.result()
                assert report.detection == "api" and PASSWORD not in report.detection_note
                continue
            message = str(state.message)
        assert PASSWORD not in message and url not in message
        assert "database" in message.lower(), message
        assert len(message.splitlines()) == 1, message
