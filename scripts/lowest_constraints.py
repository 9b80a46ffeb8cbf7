"""Print pip constraints pinning each direct dependency to the lowest version pyproject.toml
allows (``name>=X`` becomes ``name==X``), for ``make test-lowest``.

    python scripts/lowest_constraints.py redis postgres prometheus flower > lowest.txt

The runtime dependencies are always pinned; the extras named on the command line too.
Development tools (the ``dev`` extra) are never pinned: they test, they do not ship.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
FLOOR = re.compile(r"^\s*([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*[^;]*?>=\s*([0-9][^,;\s]*)")


def lowest(requirements: list[str]) -> dict[str, str]:
    pins: dict[str, str] = {}
    for requirement in requirements:
        match = FLOOR.match(requirement)
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def constraints(extras: list[str]) -> list[str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    pins = lowest(project["dependencies"])
    for extra in extras:
        pins.update(lowest(project["optional-dependencies"][extra]))
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


if __name__ == "__main__":
    sys.stdout.write("".join(f"{line}\n" for line in constraints(sys.argv[1:])))
