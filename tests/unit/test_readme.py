"""The README tells a new user the truth: its quickstart is the tested file, its sample
order works with the demo stock, and its links stay inside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from workers.bootstrap import DEMO_STOCK
from workers.validation import validate_order

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def code_block_starting(marker: str) -> str:
    start = README.index(f"```python\n{marker}") + len("```python\n")
    return README[start : README.index("```", start)]


def test_the_quickstart_is_the_file_the_user_project_test_runs() -> None:
    tested = (REPO / "tests" / "user_project" / "quickstart" / "tasks.py").read_text()

    assert code_block_starting("# tasks.py") == tested


def test_the_quickstart_says_how_to_install_and_set_up_the_database() -> None:
    assert 'pip install "celery-sagas[redis,postgres]"' in README
    assert "createdb" in README
    assert "celery-sagas migrate" in README
    assert "default 300 s" in README


def test_the_sample_order_is_valid_and_in_stock() -> None:
    block = code_block_starting("from workers.orders import start_saga")
    order = eval(block[block.index("start_saga.delay(") + len("start_saga.delay(") : -2])

    validate_order(order)
    for item in order["items"]:
        assert DEMO_STOCK.get(item["sku"], 0) >= item["qty"], item


@pytest.mark.parametrize("target", re.findall(r"\]\(([^)#]+)\)", README) or ["README.md"])
def test_links_stay_inside_the_repository(target: str) -> None:
    if re.match(r"https?://", target):
        pytest.skip("a web link")
    path = (REPO / target).resolve()
    assert path.is_relative_to(REPO), target
    assert path.exists(), target


def test_no_path_points_outside_the_repository() -> None:
    assert "../" not in README


@pytest.mark.parametrize(
    "name", ["celerybeat-schedule", "celerybeat-schedule.db", "celerybeat-schedule.dir"]
)
def test_beat_schedule_files_are_ignored(name: str) -> None:
    ignored = subprocess.run(["git", "check-ignore", "-q", name], cwd=REPO, check=False)
    assert ignored.returncode == 0, f"{name} is not covered by .gitignore"
