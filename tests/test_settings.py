"""Settings: where the database URL comes from, and that its password never shows."""

from __future__ import annotations

import pytest

from localstack.stack import free_port
from tasks.database import DatabaseUnavailable, connect, is_reachable
from tasks.settings import SettingsError, describe_database_url, get_settings

PASSWORD = "s3cr3t-Pa55word"
URL_NAMES = (
    "MAINTENANCE_DATABASE_URL",
    "PREFECT_API_DATABASE_CONNECTION_URL",
    "PREFECT_SERVER_DATABASE_CONNECTION_URL",
)


@pytest.fixture
def environment(monkeypatch):
    for name in URL_NAMES:
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    monkeypatch.undo()
    get_settings(refresh=True)


@pytest.mark.no_stack
@pytest.mark.parametrize(
    ("present", "chosen"),
    [
        (URL_NAMES, "MAINTENANCE_DATABASE_URL"),
        (URL_NAMES[1:], "PREFECT_API_DATABASE_CONNECTION_URL"),
        (URL_NAMES[2:], "PREFECT_SERVER_DATABASE_CONNECTION_URL"),
    ],
)
def test_database_url_falls_back_in_order(environment, present, chosen):
    for name in present:
        environment.setenv(name, f"postgresql+asyncpg://user:{PASSWORD}@host-{name.lower()}:5432/prefect")
    settings = get_settings(refresh=True)
    assert settings.database_url.get_secret_value().endswith(f"@host-{chosen.lower()}:5432/prefect")
    assert settings.database_description == f"postgresql database 'prefect' on host-{chosen.lower()}:5432"


@pytest.mark.no_stack
def test_no_database_url_means_api_only(environment):
    assert get_settings(refresh=True).database_url is None
    assert get_settings().database_description == "no database configured"


@pytest.mark.no_stack
def test_password_never_in_repr_str_or_description(environment):
    environment.setenv(
        "MAINTENANCE_DATABASE_URL", f"postgresql+asyncpg://maint:{PASSWORD}@db.internal:5432/prefect"
    )
    settings = get_settings(refresh=True)
    for shown in (repr(settings), str(settings), settings.database_description, settings.model_dump_json()):
        assert PASSWORD not in shown
        assert "maint:" not in shown


@pytest.mark.no_stack
@pytest.mark.parametrize(
    "url",
    [
        f"mysql://root:{PASSWORD}@db/prefect",
        f"not a url {PASSWORD}",
        f"postgresql+asyncpg://root:{PASSWORD}@db:notaport/prefect",
    ],
)
def test_malformed_url_error_names_the_problem_without_the_password(environment, url):
    environment.setenv("MAINTENANCE_DATABASE_URL", url)
    try:
        settings = get_settings(refresh=True)
        description = settings.database_description
    except SettingsError as error:
        assert PASSWORD not in str(error)
        assert "database URL" in str(error)
        return
    # The port is checked when the URL is described or used.
    assert PASSWORD not in description
    assert "invalid" in description


async def test_unreachable_database_gives_one_clear_error_without_secrets():
    url = f"postgresql+asyncpg://maint:{PASSWORD}@127.0.0.1:{free_port()}/prefect"
    with pytest.raises(DatabaseUnavailable) as raised:
        async with connect(url):
            pass
    message = str(raised.value)
    assert PASSWORD not in message and url not in message
    assert "could not connect to the postgresql database 'prefect' on 127.0.0.1" in message
    # The driver's own exception (which may quote connection details) is not chained.
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    assert await is_reachable(url) is False


async def test_wrong_password_error_does_not_repeat_it(stack):
    stack.postgres.psql(
        "DO $$ BEGIN CREATE ROLE secretive LOGIN PASSWORD 'right-one'; "
        "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
    )
    url = stack.database_url.replace("postgres@", f"secretive:{PASSWORD}@")
    # The embedded server trusts local sockets, so connect as an unknown database instead.
    url = url.replace("/prefect?", "/no_such_database?")
    with pytest.raises(DatabaseUnavailable) as raised:
        async with connect(url):
            pass
    assert PASSWORD not in str(raised.value)
    assert "no_such_database" in str(raised.value)


async def test_describe_never_prints_user_or_password():
    described = describe_database_url(f"postgresql+asyncpg://maint:{PASSWORD}@/prefect?host=/var/run/pg")
    assert described == "postgresql database 'prefect' on unix socket"
