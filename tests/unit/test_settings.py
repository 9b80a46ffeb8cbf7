"""Settings: one frozen object from the Celery config, keyword overrides or the environment."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from celery_sagas.errors import SagaConfigurationError
from celery_sagas.settings import DEFAULT_REDACT_FIELDS, SagaSettings, redact_url

URL = "postgresql+psycopg2://sagas:s3cret@db:5432/sagas"
OTHER_URL = "postgresql+psycopg2://other:pw@db2/other"


@pytest.fixture(autouse=True)
def no_env_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAGAS_DATABASE_URL", raising=False)


def test_from_config_reads_sagas_keys() -> None:
    conf = {
        "sagas_database_url": URL,
        "sagas_coordinator_queue": "sagas",
        "sagas_relay_interval": 0.5,
        "sagas_relay_after": 3,
        "sagas_relay_batch": 50,
        "sagas_redact_fields": ["iban"],
        "sagas_step_timeouts": {"order.charge": 10.0},
        "sagas_engine_options": {"pool_size": 3},
        "broker_url": "redis://localhost",
        "relay_interval": 99,
    }

    settings = SagaSettings.from_config(conf)

    assert settings == SagaSettings(
        database_url=URL,
        coordinator_queue="sagas",
        relay_interval=0.5,
        relay_after=3,
        relay_batch=50,
        redact_fields=("iban",),
        step_timeouts={"order.charge": 10.0},
        engine_options={"pool_size": 3},
    )


def test_from_config_defaults() -> None:
    settings = SagaSettings.from_config({"sagas_database_url": URL})

    assert settings.coordinator_queue is None
    assert settings.relay_interval == 2.0
    assert settings.relay_after == 5.0
    assert settings.relay_batch == 500
    assert settings.redact_fields == DEFAULT_REDACT_FIELDS
    assert settings.step_timeouts == {}
    assert settings.engine_options == {}


def test_none_in_config_means_default() -> None:
    conf = {"sagas_database_url": URL, "sagas_relay_interval": None}
    assert SagaSettings.from_config(conf).relay_interval == 2.0


@pytest.mark.parametrize(
    ("overrides", "attribute", "expected"),
    [
        pytest.param({"relay_interval": 9.0}, "relay_interval", 9.0, id="relay-interval"),
        pytest.param({"database_url": OTHER_URL}, "database_url", OTHER_URL, id="database-url"),
        pytest.param({"coordinator_queue": "q2"}, "coordinator_queue", "q2", id="queue"),
    ],
)
def test_overrides_win_over_config(
    overrides: dict[str, Any], attribute: str, expected: Any
) -> None:
    conf = {"sagas_database_url": URL, "sagas_relay_interval": 1.0, "sagas_coordinator_queue": "q1"}

    settings = SagaSettings.from_config(conf, **overrides)

    assert getattr(settings, attribute) == expected


def test_overrides_alone_are_enough() -> None:
    settings = SagaSettings.from_config({}, database_url=URL, relay_batch=7)
    assert (settings.database_url, settings.relay_batch) == (URL, 7)


def test_none_override_falls_back_to_config() -> None:
    conf = {"sagas_database_url": URL, "sagas_coordinator_queue": "q1"}

    settings = SagaSettings.from_config(conf, coordinator_queue=None)

    assert settings.coordinator_queue == "q1"


def test_unknown_override_is_refused() -> None:
    with pytest.raises(SagaConfigurationError, match="unknown settings: bogus, relay_intervall"):
        SagaSettings.from_config({"sagas_database_url": URL}, relay_intervall=1, bogus=2)


def test_environment_is_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGAS_DATABASE_URL", OTHER_URL)

    assert SagaSettings.from_config({}).database_url == OTHER_URL
    assert SagaSettings.from_config({"sagas_database_url": URL}).database_url == URL
    assert SagaSettings.from_config({}, database_url=URL).database_url == URL


def test_no_database_is_refused() -> None:
    with pytest.raises(SagaConfigurationError, match="no saga database") as caught:
        SagaSettings.from_config({})
    assert caught.value.code == "configuration"
    assert "SAGAS_DATABASE_URL" in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://sagas:s3cret@db:5432/sagas",
        "postgres://sagas:s3cret@db/sagas",
    ],
    ids=["postgresql", "postgres"],
)
def test_bare_postgresql_url_is_refused(url: str) -> None:
    with pytest.raises(SagaConfigurationError) as caught:
        SagaSettings.from_config({"sagas_database_url": url})

    message = str(caught.value)
    assert "postgresql+psycopg2://" in message
    assert "psycopg 3" in message
    assert "s3cret" not in message
    assert "sagas:***@db" in message


@pytest.mark.parametrize(
    "url",
    [URL, "postgresql+psycopg://u:p@h/db", "sqlite:///sagas.db", "sqlite://"],
    ids=["psycopg2", "psycopg3-explicit", "sqlite-file", "sqlite-memory"],
)
def test_explicit_driver_urls_are_accepted(url: str) -> None:
    assert SagaSettings(database_url=url).database_url == url


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param({"relay_interval": 0}, "relay_interval must be positive", id="interval-0"),
        pytest.param({"relay_after": -1}, "relay_after must be positive", id="after-negative"),
        pytest.param({"relay_batch": 0}, "relay_batch must be >= 1", id="batch-0"),
    ],
)
def test_invalid_values_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(SagaConfigurationError, match=message):
        SagaSettings(database_url=URL, **options)


def test_settings_are_frozen() -> None:
    settings = SagaSettings(database_url=URL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.relay_batch = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        pytest.param(URL, "postgresql+psycopg2://sagas:***@db:5432/sagas", id="password"),
        pytest.param("redis://:hunter2@cache:6379/0", "redis://:***@cache:6379/0", id="no-user"),
        pytest.param("postgresql://u:p@ss@db/x", "postgresql://u:***@db/x", id="at-in-password"),
        pytest.param("postgresql://u:a:b@db/x", "postgresql://u:***@db/x", id="colon-in-password"),
        pytest.param("postgresql://user@db/x", "postgresql://user@db/x", id="user-only"),
        pytest.param("postgresql://db/x", "postgresql://db/x", id="no-credentials"),
        pytest.param("sqlite:///sagas.db", "sqlite:///sagas.db", id="sqlite"),
        pytest.param("not a url", "not a url", id="not-a-url"),
    ],
)
def test_redact_url(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("true", True), ("False", False), ("no", False), ("ON", True), ("0", False), ("1", True)],
)
def test_on_off_settings_from_the_environment_are_booleans(
    monkeypatch: pytest.MonkeyPatch, raw: str, expected: bool
) -> None:
    """``SAGAS_PREPARED_STATEMENTS=False`` is not JSON: read as the text "False", it was
    a true value and the workers kept preparing behind a pooler."""
    monkeypatch.setenv("SAGAS_PREPARED_STATEMENTS", raw)
    monkeypatch.setenv("SAGAS_INLINE_STEPS", raw)
    settings = SagaSettings.from_config({}, database_url="sqlite://")
    assert settings.prepared_statements is expected
    assert settings.inline_steps is expected


def test_an_on_off_setting_that_is_neither_is_refused() -> None:
    with pytest.raises(SagaConfigurationError, match="inline_steps must be true or false"):
        SagaSettings.from_config({"sagas_inline_steps": "maybe"}, database_url="sqlite://")
