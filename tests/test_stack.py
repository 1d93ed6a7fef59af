"""The local stack comes up, answers, goes down, and comes up again the same way."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy import text

from localstack.stack import Stack, free_port
from tasks.database import connect
from tasks.prefect_api import call, prefect_client


@pytest.mark.no_stack
def test_stack_up_down_twice_and_reuse(tmp_path):
    for _ in range(2):
        stack = Stack(state_dir=tmp_path / "stack", port=free_port()).up()
        try:
            assert httpx.get(f"{stack.api_url}/health").json() is True
            first_pid = stack.server.running_pid()
            again = Stack(state_dir=tmp_path / "stack", port=stack.port).up()
            assert again.server.running_pid() == first_pid, "a second up must reuse the server"
        finally:
            stack.down()
        assert stack.server.running_pid() is None
        assert not stack.server.is_healthy()
        assert not (tmp_path / "stack" / "pgdata" / "postmaster.pid").exists()


async def test_session_server_is_on_postgres(stack):
    async with connect() as connection:
        version = (await connection.execute(text("SHOW server_version"))).scalar_one()
        tables = (
            await connection.execute(
                text("SELECT count(*) FROM information_schema.tables WHERE table_name = 'flow_run'")
            )
        ).scalar_one()
    assert int(version.split(".")[0]) >= 15
    assert tables == 1
    async with prefect_client() as client:
        assert await call(client, "GET", "/health") is True


async def test_sqlite_server_works(on_sqlite_server):
    async with prefect_client() as client:
        flow_id = await client.create_flow_from_name("sqlite-check")
        rows = await call(client, "POST", "/flows/filter", json={})
    assert str(flow_id) in {row["id"] for row in rows}
    async with connect() as connection:
        count = (await connection.execute(text("SELECT count(*) FROM flow"))).scalar_one()
    assert count >= 1


async def test_fresh_server_is_isolated(stack, on_fresh_server):
    async with prefect_client() as client:
        await client.create_flow_from_name("only-here")
        rows = await call(client, "POST", "/flows/filter", json={})
    assert [row["name"] for row in rows] == ["only-here"]
    assert on_fresh_server.database_url != stack.database_url
