"""Package metadata as declared in pyproject.toml (the built wheel is checked in
tests/integration/test_user_project.py)."""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

from click.testing import CliRunner

from celery_sagas.cli import cli

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def requirement_names(requirements: list[str]) -> set[str]:
    return {r.split(";")[0].split(">")[0].split("<")[0].split("=")[0].strip() for r in requirements}


def test_no_broker_client_or_database_driver_is_a_hard_dependency() -> None:
    names = requirement_names(PROJECT["dependencies"])

    assert not names & {"redis", "psycopg2", "psycopg2-binary", "psycopg", "celery[redis]"}
    assert {"celery", "kombu", "sqlalchemy", "alembic", "click"} <= names


def test_extras_name_the_brokers_and_drivers() -> None:
    extras = PROJECT["optional-dependencies"]

    assert requirement_names(extras["redis"]) == {"celery[redis]"}
    assert requirement_names(extras["postgres"]) == {"psycopg2-binary"}
    assert requirement_names(extras["postgres-source"]) == {"psycopg2"}
    assert requirement_names(extras["psycopg"]) == {"psycopg[binary]"}
    assert {"rabbitmq", "flower", "prometheus"} <= set(extras)


def test_license_classifiers_and_urls_are_declared() -> None:
    assert PROJECT["license"] == "MIT"
    assert (REPO / "LICENSE").read_text().startswith("MIT License")
    assert "Framework :: Celery" in PROJECT["classifiers"]
    assert "Typing :: Typed" in PROJECT["classifiers"]
    assert {"Source", "Issues", "Changelog"} <= set(PROJECT["urls"])
    assert (REPO / "CHANGELOG.md").exists()


def test_only_the_library_is_packaged() -> None:
    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert find["packages"]["find"]["include"] == ["celery_sagas*"]


def test_version_option_prints_the_installed_version() -> None:
    result = CliRunner().invoke(cli, ["--version"])

    assert result.exit_code == 0
    assert result.output == f"celery-sagas, version {version('celery-sagas')}\n"
