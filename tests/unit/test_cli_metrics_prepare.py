"""``celery-sagas metrics`` reads ``prepared_statements`` as the workers do: the app's
setting, else ``SAGAS_PREPARED_STATEMENTS``, else on (``--[no-]prepared-statements`` wins;
tests/integration/test_psycopg3_prepared.py runs the command on psycopg 3)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from celery_sagas.cli.metrics import _prepare
from celery_sagas.errors import SagaConfigurationError

URL = "postgresql+psycopg://sagas@127.0.0.1:1/never_connected"


def app_with(prepared_statements: object) -> SimpleNamespace:
    return SimpleNamespace(settings=SimpleNamespace(prepared_statements=prepared_statements))


@pytest.mark.parametrize(
    ("runtime", "env", "expected"),
    [
        (None, None, True),
        (None, "false", False),
        (None, "true", True),
        (app_with(False), None, False),
        (app_with(False), "true", False),  # the app's config over the environment
    ],
    ids=["default", "env-false", "env-true", "app", "app-over-env"],
)
def test_the_exporter_prepares_as_the_workers_do(
    monkeypatch: pytest.MonkeyPatch, runtime: object, env: str | None, expected: bool
) -> None:
    if env is None:
        monkeypatch.delenv("SAGAS_PREPARED_STATEMENTS", raising=False)
    else:
        monkeypatch.setenv("SAGAS_PREPARED_STATEMENTS", env)
    assert _prepare(runtime, URL) is expected


@pytest.mark.parametrize("text", ["False", "no", "off"])
def test_a_setting_that_would_read_as_true_is_refused(
    monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    """Not JSON, so the text itself: true, whatever it says."""
    monkeypatch.setenv("SAGAS_PREPARED_STATEMENTS", text)
    with pytest.raises(SagaConfigurationError, match="must be true or false"):
        _prepare(None, URL)
