"""prometheus/alerts.yml: every expression uses metrics the exporter really exports, and
``promtool`` (Debian package ``prometheus``) checks and unit-tests the rules."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from celery_sagas import metrics
from celery_sagas.stats import Histogram, SagaStats, StepStats
from tests.conftest import in_ci

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "prometheus"
REQUIRED_ALERTS = {
    "SagaCompletionRateLow",
    "SagaStuck",
    "SagaDeadLettersWaiting",
    "SagaCompensationFailureRate",
    "SagaStepLatencyOverBudget",
}
# Labels Prometheus adds to every scraped series, and the histogram's bucket label.
TARGET_LABELS = {"instance", "job", "le"}
PROMQL_WORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "inf",
    "nan",
}


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def exported() -> frozenset[str]:
    """Sample names, from what the collector really yields (both the healthy and the
    database-down scrape), not from a list kept by hand."""
    hist = Histogram((1.0,), (1,), 1, 0.5)
    stats = SagaStats(
        states={"s": {"COMPLETED": 1}},
        compensation_failed={"s": 1},
        steps={("s", "a"): StepStats(hist, hist, 1, 1, 1)},
        dead_letters={"dead": 1},
        oldest_unfinished_age={"s": 1.0},
        durations={("s", "completed"): hist},
        stuck={"s": 1},
    )
    collectors = [metrics.SagaCollector(lambda: stats, {("s", "a"): 1.0})]
    collectors.append(metrics.SagaCollector(_down))
    names = {s.name for c in collectors for family in c.collect() for s in family.samples}
    assert names == metrics.exported_names()
    return frozenset(names)


def _down() -> SagaStats:
    raise RuntimeError("database down")


def _strip(expr: str) -> str:
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    # grouping and matching clauses: "sum by (saga) (x)" becomes "sum (x)"
    return re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)


def metric_names(expr: str) -> set[str]:
    """Identifiers in ``expr`` that are neither functions, aggregations nor keywords."""
    names = set()
    for match in re.finditer(r"(?<![A-Za-z0-9_:.])[A-Za-z_:][A-Za-z0-9_:]*", _strip(expr)):
        word = match.group()
        if word.lower() in PROMQL_WORDS:
            continue
        rest = _strip(expr)[match.end() :].lstrip()
        if rest.startswith("("):
            continue  # a function or an aggregation
        names.add(word)
    return names


def label_names(expr: str) -> set[str]:
    """Labels named in grouping and matching clauses and in label matchers."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    found: set[str] = set()
    for clause in re.findall(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr
    ):
        found |= {label.strip() for label in clause.split(",") if label.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        found |= set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
    return found


def test_the_required_alerts_exist_with_severity_and_help() -> None:
    alerts = {rule["alert"]: rule for rule in rules()}
    assert alerts.keys() >= REQUIRED_ALERTS
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert "for" in rule, f"{name} fires on a single evaluation"


@pytest.mark.parametrize("rule", rules(), ids=lambda rule: rule["alert"])
def test_every_expression_uses_only_exported_metrics(rule: dict[str, Any]) -> None:
    used = metric_names(rule["expr"])
    assert used, f"{rule['alert']} references no metric"
    assert used <= exported(), f"{rule['alert']}: unknown metrics {sorted(used - exported())}"


@pytest.mark.parametrize("rule", rules(), ids=lambda rule: rule["alert"])
def test_every_label_in_an_expression_is_a_real_label(rule: dict[str, Any]) -> None:
    known = {label for spec in metrics.SPECS for label in spec.labels} | TARGET_LABELS
    used = label_names(rule["expr"])
    assert used <= known, f"{rule['alert']}: unknown labels {sorted(used - known)}"


def test_the_parser_sees_through_promql() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (saga, le) (rate(x_bucket{job="a b"}[5m])))'
        " > on (saga) group_left max by (saga) (y) and z offset 5m"
    )
    assert metric_names(expr) == {"x_bucket", "y", "z"}
    assert label_names(expr) == {"saga", "le", "job"}


def test_an_unknown_metric_would_be_caught() -> None:
    assert "celery_sagas_dlq_size" not in exported()
    assert metric_names("celery_sagas_dlq_size > 0") == {"celery_sagas_dlq_size"}


# --- promtool -------------------------------------------------------------------------


def promtool() -> str:
    found = shutil.which("promtool")
    if found:
        return found
    why = "promtool is not installed (apt-get install prometheus)"
    if in_ci():
        pytest.fail(f"{why}; CI must have it", pytrace=False)
    pytest.skip(why)


@pytest.mark.parametrize(
    "args",
    [
        ("check", "rules", "alerts.yml"),
        ("test", "rules", "alerts_test.yml"),
        ("check", "config", "prometheus.yml"),
    ],
    ids=" ".join,
)
def test_promtool(args: tuple[str, ...]) -> None:
    result = subprocess.run(
        [promtool(), *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_promtool_unit_test() -> None:
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    tested = {
        case["alertname"]
        for test in tests
        for case in test["alert_rule_test"]
        if case.get("exp_alerts")  # a test that sees the alert fire, not only stay quiet
    }
    assert tested == {rule["alert"] for rule in rules()}
