"""Commands run without the app read ``prepared_statements`` as the workers do:
``SAGAS_PREPARED_STATEMENTS``, else on; their store follows it, and so does
``celery-sagas metrics`` unless ``--[no-]prepared-statements`` says otherwise
(tests/integration/test_psycopg3_prepared.py runs the command on psycopg 3). No database:
engines connect lazily."""

from __future__ import annotations

import pytest

from celery_sagas.cli.context import CliContext, prepared_statements
from celery_sagas.errors import SagaConfigurationError

URL = "postgresql+psycopg2://sagas@127.0.0.1:1/never_connected"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (None, True),
        ("false", False),
        ("true", True),
        ("0", False),
        ("False", False),
        ("off", False),
    ],
    ids=["unset", "false", "true", "zero", "False", "off"],
)
def test_a_command_prepares_as_the_workers_do(
    monkeypatch: pytest.MonkeyPatch, env: str | None, expected: bool
) -> None:
    if env is None:
        monkeypatch.delenv("SAGAS_PREPARED_STATEMENTS", raising=False)
    else:
        monkeypatch.setenv("SAGAS_PREPARED_STATEMENTS", env)
    assert prepared_statements(URL) is expected
    assert CliContext(URL).store.prepare is expected


@pytest.mark.parametrize("text", ["maybe", "2"])
def test_a_setting_that_is_neither_true_nor_false_is_refused(
    monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    """Not an on/off word: refused rather than guessed."""
    monkeypatch.setenv("SAGAS_PREPARED_STATEMENTS", text)
    with pytest.raises(SagaConfigurationError, match="must be true or false"):
        _ = CliContext(URL).store
