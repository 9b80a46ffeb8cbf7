"""The Sagas pages inside Flower (``celery -A workers.app sagas flower``), behind basic auth:
HTTP checks (auth, escaping, errors, dead letters, navigation, search, paging, the diagram,
the warning without auth) and a real headless Chromium that filters the list by state, opens
a failed saga and reads its compensations in reverse order, then comes from Flower's own
navigation bar, searches, pages, turns auto-refresh on and reads the diagram. Screenshots
are kept in ``build/test-artifacts/sagas-page/``.

The browser is Debian's ``chromium`` with its ``chromedriver`` (``scripts/install_browser.sh``
installs both). Without them the browser test skips locally and fails under CI.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from celery_sagas.store import SqlSagaStore
from celery_sagas.store.browse import Filter, count_by_state
from tests.conftest import in_ci
from tests.integration.conftest import Deployment, make_order, wait_settled
from tests.integration.test_flower import (
    FlowerProcess,
    sagas_flower_argv,
    wait_for_event_capture,
)
from tests.support.processes import REPO_ROOT, wait_until
from workers import db

ARTIFACTS = REPO_ROOT / "build" / "test-artifacts" / "sagas-page"

CHROMIUM = os.environ.get("SAGAS_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("SAGAS_CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--window-size=1440,1800",
]
FAST_REFUNDS = json.dumps(
    {"refund_payment": {"max_retries": 1, "backoff_base": 0.2, "backoff_cap": 1, "jitter": 0}}
)
HOSTILE_KEY = "T-<script>alert('key')</script>"
HOSTILE_REASON = "refunded by phone <b>bold</b> & <img src=x onerror=alert(1)>"


@dataclass
class Site:
    flower: FlowerProcess
    completed: str  # saga ids
    failed: str
    hostile: str
    dead: str | None  # COMPENSATION_FAILED, then discarded by an operator


def _operator_cli(deployment: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celery_sagas.cli", "--app", "workers.app", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **deployment.env, "SAGAS_RETRY_POLICIES": FAST_REFUNDS},
        timeout=60,
    )


def _wait_state(key: str, state: str) -> Any:
    def reached() -> Any:
        record = SqlSagaStore(db.database_url()).find(key)
        return record if record is not None and record.state.value == state else None

    return wait_until(reached, timeout=30, interval=0.1, message=f"{key} {state}")


def _dead_then_discarded(deployment: Deployment, start_saga: Any, sku: str) -> str:
    order = make_order(sku, simulate={"create_shipment": "fail", "refund_payment": "fail"})
    start_saga.delay(order)
    record = _wait_state(order["order_id"], "COMPENSATION_FAILED")
    (entry,) = SqlSagaStore(db.database_url()).dead_letters(saga_id=record.saga_id)
    done = _operator_cli(deployment, "dlq", "discard", str(entry.id), "--reason", HOSTILE_REASON)
    assert done.returncode == 0, done.stdout + done.stderr
    _wait_state(order["order_id"], "FAILED")
    return str(record.saga_id)


@pytest.fixture(scope="module")
def site(
    deployment: Deployment, start_saga: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Site]:
    logs = tmp_path_factory.mktemp("sagas-page")
    env = {**deployment.env, "SAGAS_RETRY_POLICIES": FAST_REFUNDS}
    credentials = f"operator:{secrets.token_urlsafe(12)}"
    flower = FlowerProcess(
        sagas_flower_argv(),
        {**env, "FLOWER_BASIC_AUTH": credentials},  # never on the command line
        logs / "flower.log",
        credentials=credentials,
    )
    worker = deployment.worker(name="page-worker", events=True, log_dir=logs, env=env)
    with contextlib.ExitStack() as stack:
        stack.callback(flower.stop)
        flower.start()
        stack.enter_context(worker)
        wait_for_event_capture(flower)
        sku = f"SKU-{uuid.uuid4().hex[:10]}"
        db.seed_inventory({sku: 50})
        completed = make_order(sku)
        failed = make_order(sku, simulate={"create_shipment": "fail"})
        hostile = make_order(sku, order_id=HOSTILE_KEY + uuid.uuid4().hex[:6])
        for order in (completed, failed, hostile):
            start_saga.delay(order)
        records = wait_settled([o["order_id"] for o in (completed, failed, hostile)])
        dead = _dead_then_discarded(deployment, start_saga, sku)
        yield Site(
            flower,
            completed=records[completed["order_id"]].saga_id,
            failed=records[failed["order_id"]].saga_id,
            hostile=records[hostile["order_id"]].saga_id,
            dead=dead,
        )
        assert credentials not in flower.log_text()


# --------------------------------------------------------------------------- HTTP


def test_the_pages_refuse_requests_without_flowers_basic_auth(site: Site) -> None:
    for path in ("/sagas", f"/sagas/{site.failed}", "/sagas?state=FAILED"):
        status, body = site.flower.get(path, auth=False)
        assert status == 401, (path, status)
        assert site.failed not in body
    wrong = FlowerProcess(site.flower.argv, {}, site.flower.log_path, "operator:wrong")
    wrong.port = site.flower.port
    assert wrong.get("/sagas")[0] == 401
    assert site.flower.get("/sagas")[0] == 200


def test_the_list_counts_states_and_filters_by_state_and_name(site: Site) -> None:
    _, everything = site.flower.get("/sagas?limit=1000")
    for saga_id in (site.completed, site.failed, site.hostile):
        assert saga_id in everything
    status, failed = site.flower.get("/sagas?state=FAILED&name=order_fulfillment&limit=1000")
    assert status == 200
    assert site.failed in failed
    assert site.completed not in failed
    # the page counts the sagas of the type it lists (the session's database holds others)
    engine = SqlSagaStore(db.database_url()).engine
    counts = count_by_state(engine, Filter(name="order_fulfillment"))
    assert 'data-state="FAILED"' in failed
    assert f"FAILED</span> {counts['FAILED']}</a>" in failed
    _, other = site.flower.get("/sagas?name=no_such_saga")
    assert site.failed not in other and "No sagas" in other


def test_unknown_state_is_a_400_and_unknown_saga_a_404(site: Site) -> None:
    assert site.flower.get("/sagas?state=BOGUS")[0] == 400
    assert site.flower.get("/sagas?limit=0")[0] == 400
    assert site.flower.get("/sagas/no-such-saga")[0] == 404


def test_everything_from_the_database_is_escaped(site: Site) -> None:
    _, listing = site.flower.get("/sagas?limit=1000")
    assert "<script>alert('key')</script>" not in listing
    assert "&lt;script&gt;alert(&#x27;key&#x27;)&lt;/script&gt;" in listing
    _, page = site.flower.get(f"/sagas/{site.hostile}")
    assert "<script>alert" not in page
    assert "&lt;script&gt;" in page
    if site.dead is not None:
        _, dead = site.flower.get(f"/sagas/{site.dead}")
        assert HOSTILE_REASON not in dead
        assert "refunded by phone &lt;b&gt;bold&lt;/b&gt; &amp; &lt;img" in dead


def test_a_saga_is_found_by_its_business_key_too(site: Site) -> None:
    record = SqlSagaStore(db.database_url()).load(site.completed)
    assert record is not None
    status, page = site.flower.get("/sagas/" + quote(record.business_key, safe=""))
    assert status == 200 and site.completed in page


def test_the_saga_page_shows_dead_letters_and_operator_actions(site: Site) -> None:
    assert site.dead is not None
    status, page = site.flower.get(f"/sagas/{site.dead}")
    assert status == 200
    assert 'id="dead-letters-table"' in page
    assert 'data-status="discarded"' in page
    assert "order_fulfillment.refund_payment" in page
    assert "simulated compensation failure" in page
    assert 'id="operator-actions-table"' in page
    assert "4111111111111111" not in page  # the payload is redacted


def test_the_saga_page_links_the_sagas_tasks_in_flower(site: Site) -> None:
    hook_row = '<tr data-task-name="celery_sagas.hook"'  # the on_completed hook, after the steps
    page = wait_until(
        lambda: (page := site.flower.get(f"/sagas/{site.completed}")[1]).count(hook_row) and page,
        timeout=20,
        message="the saga page lists the hook task",
    )
    assert page.count(hook_row) == 1
    links = [part.split('"', 1)[0] for part in page.split('href="/task/')[1:]]
    assert len(set(links)) == 5  # 4 steps (each applies its own outcome) + the hook
    for task_id in set(links):
        assert site.flower.get(f"/task/{task_id}")[0] == 200


def _business_key(saga_id: str) -> str:
    record = SqlSagaStore(db.database_url()).load(saga_id)
    assert record is not None
    return str(record.business_key)


def test_flowers_own_pages_link_the_sagas_page(site: Site) -> None:
    for path in ("/workers", "/tasks", "/broker"):
        status, page = site.flower.get(path)
        assert status == 200, path
        assert 'id="nav-sagas" href="/sagas"' in page, path
    _, sagas = site.flower.get("/sagas")
    link = sagas[sagas.index('<a class="nav-link') : sagas.index(">Sagas</a>")]
    assert "active" in link.split('id="nav-sagas"')[0].rsplit("<a", 1)[1]


def test_search_finds_a_saga_by_id_prefix_or_business_key(site: Site) -> None:
    key = _business_key(site.completed)
    for term in (site.completed[:8], key):
        status, page = site.flower.get("/sagas?q=" + quote(term, safe=""))
        assert status == 200
        assert f'data-saga-id="{site.completed}"' in page, term
        assert f'data-saga-id="{site.failed}"' not in page, term
    _, none = site.flower.get("/sagas?q=no-such-saga-anywhere")
    assert 'id="no-sagas"' in none


def test_the_list_is_paged(site: Site) -> None:
    rows = []
    for number in (1, 2):
        status, page = site.flower.get(f"/sagas?limit=1&page={number}")
        assert status == 200
        assert page.count("<tr data-saga-id=") == 1
        assert f"page {number} of " in page and 'id="page-next"' in page
        rows.append(page.split('<tr data-saga-id="', 1)[1].split('"', 1)[0])
    assert rows[0] != rows[1]
    _, last = site.flower.get("/sagas?limit=1&page=1000000")  # clamped to the last page
    assert last.count("<tr data-saga-id=") == 1
    assert site.flower.get("/sagas?page=0")[0] == 400
    assert site.flower.get("/sagas?refresh=7")[0] == 400


def test_the_diagram_colours_each_step_and_compensation(site: Site) -> None:
    _, page = site.flower.get(f"/sagas/{site.failed}")
    start = page.index('<svg id="saga-diagram"')
    svg = page[start : page.index("</svg>", start)]
    actions = [part.split('"', 1)[0] for part in svg.split('data-role="action" data-status="')[1:]]
    undos = [
        part.split('"', 1)[0] for part in svg.split('data-role="compensation" data-status="')[1:]
    ]
    assert actions == ["completed", "completed", "failed", "skipped"]
    assert undos == ["compensated", "compensated", "not_needed", "not_needed"]
    assert "release_inventory" in svg and "refund_payment" in svg


def test_without_auth_flower_warns_in_its_log_and_on_the_page(
    site: Site, deployment: Deployment, tmp_path: Path
) -> None:
    assert 'id="auth-warning"' not in site.flower.get("/sagas")[1]
    env = {k: v for k, v in deployment.env.items() if k != "FLOWER_BASIC_AUTH"}
    open_flower = FlowerProcess(sagas_flower_argv(), env, tmp_path / "open-flower.log")
    try:
        open_flower.start()
        status, page = open_flower.get("/sagas")
    finally:
        open_flower.stop()
    assert status == 200 and 'id="auth-warning"' in page
    assert "runs without authentication" in open_flower.log_text()


# --------------------------------------------------------------------------- browser


def _require_browser() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if not missing:
        return
    why = f"{', '.join(missing)} missing (run scripts/install_browser.sh)"
    if in_ci():
        pytest.fail(f"{why}; CI must have it", pytrace=False)
    pytest.skip(why)


@pytest.fixture
def browser(site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # never let Selenium Manager download anything
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        assert site.flower.credentials is not None
        token = base64.b64encode(site.flower.credentials.encode()).decode()
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd(
            "Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}}
        )
        yield driver
    finally:
        driver.quit()


def _texts(driver: Any, css: str) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.text.strip() for e in driver.find_elements(By.CSS_SELECTOR, css)]


def _screenshot(driver: Any, path: Path) -> None:
    """The whole page, not only the window: resize to the document's height first. A copy
    is kept in ``ARTIFACTS`` (the test's own ``tmp_path`` is pruned by pytest)."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1440, max(900, min(int(height) + 120, 8000)))
    driver.save_screenshot(str(path))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, ARTIFACTS / path.name)
    driver.set_window_size(1440, 1800)


def test_an_operator_filters_failed_sagas_and_reads_the_compensations_in_reverse(
    site: Site, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 10)
    browser.get(site.flower.url + "/sagas")
    wait.until(lambda d: d.find_elements(By.ID, "sagas-table"))
    assert "Sagas" in browser.title
    _screenshot(browser, tmp_path / "sagas.png")

    Select(browser.find_element(By.ID, "filter-state")).select_by_value("FAILED")
    browser.find_element(By.ID, "filter-submit").click()
    wait.until(lambda d: "state=FAILED" in d.current_url)
    rows = browser.find_elements(By.CSS_SELECTOR, "#sagas-table tbody tr")
    assert rows and {r.get_attribute("data-state") for r in rows} == {"FAILED"}
    _screenshot(browser, tmp_path / "sagas-failed.png")

    browser.find_element(By.CSS_SELECTOR, f'tr[data-saga-id="{site.failed}"] a').click()
    wait.until(lambda d: d.find_elements(By.ID, "compensation-order"))
    assert browser.find_element(By.ID, "saga-id").text == site.failed
    assert browser.find_element(By.ID, "saga-state").text == "FAILED"
    assert "create_shipment" in browser.find_element(By.ID, "saga-reason").text
    assert _texts(browser, "#compensation-order li") == ["process_payment", "reserve_inventory"]
    compensated = browser.find_elements(
        By.CSS_SELECTOR, '#timeline-table tr[data-new="compensated"]'
    )
    assert [r.get_attribute("data-step") for r in compensated] == [
        "process_payment",
        "reserve_inventory",
    ]
    statuses = [
        r.get_attribute("data-status")
        for r in browser.find_elements(By.CSS_SELECTOR, "#steps-table tbody tr")
    ]
    assert statuses == ["compensated", "compensated", "failed", "skipped"]
    assert browser.find_elements(By.ID, "dead-letters-none")
    _screenshot(browser, tmp_path / "saga-failed.png")

    # the saga's tasks link to Flower's own task pages
    link = browser.find_element(By.CSS_SELECTOR, "#tasks-table-saga a")
    task_id = link.text
    # Bootstrap scrolls smoothly: scroll at once, or the click lands mid-animation
    browser.execute_script(
        "arguments[0].scrollIntoView({block: 'center', behavior: 'instant'})", link
    )
    link.click()
    wait.until(lambda d: f"/task/{task_id}" in d.current_url)
    assert task_id in browser.page_source
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == [], severe


def test_the_dead_letter_and_the_operators_action_read_well(
    site: Site, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    assert site.dead is not None
    browser.get(f"{site.flower.url}/sagas/{site.dead}")
    rows = browser.find_elements(By.CSS_SELECTOR, "#dead-letters-table tr[data-status]")
    assert [r.get_attribute("data-status") for r in rows] == ["discarded"]
    actions = _texts(browser, "#operator-actions-table tbody tr")
    assert len(actions) >= 1 and HOSTILE_REASON in "\n".join(actions)
    _screenshot(browser, tmp_path / "saga-dead-letter.png")
    assert browser.get_log("browser") == [] or all(
        e["level"] != "SEVERE" for e in browser.get_log("browser")
    )


def test_an_operator_navigates_searches_pages_refreshes_and_reads_the_diagram(
    site: Site, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 15)
    browser.get(site.flower.url + "/workers")  # Flower's own page
    browser.find_element(By.ID, "nav-sagas").click()
    wait.until(lambda d: d.find_elements(By.ID, "sagas-table"))
    assert "active" in browser.find_element(By.ID, "nav-sagas").get_attribute("class")

    key = _business_key(site.completed)
    box = browser.find_element(By.ID, "filter-search")
    box.send_keys(key)
    browser.find_element(By.ID, "filter-submit").click()
    wait.until(lambda d: "q=" in d.current_url)
    rows = browser.find_elements(By.CSS_SELECTOR, "#sagas-table tbody tr")
    assert [r.get_attribute("data-saga-id") for r in rows] == [site.completed]
    _screenshot(browser, tmp_path / "sagas-search.png")

    browser.get(site.flower.url + "/sagas?limit=2")
    first = [
        r.get_attribute("data-saga-id")
        for r in browser.find_elements(By.CSS_SELECTOR, "#sagas-table tbody tr")
    ]
    browser.find_element(By.ID, "page-next").click()
    wait.until(lambda d: "page=2" in d.current_url)
    second = [
        r.get_attribute("data-saga-id")
        for r in browser.find_elements(By.CSS_SELECTOR, "#sagas-table tbody tr")
    ]
    assert len(first) == 2 and second and not set(first) & set(second)
    assert "page 2 of" in browser.find_element(By.ID, "page-current").text
    _screenshot(browser, tmp_path / "sagas-page-2.png")

    Select(browser.find_element(By.ID, "auto-refresh")).select_by_value("5")
    wait.until(lambda d: "refresh=5" in d.current_url and "page=2" in d.current_url)
    browser.execute_script("window.__before_refresh = true")
    wait.until(lambda d: d.execute_script("return window.__before_refresh === undefined"))
    assert "refresh=5" in browser.current_url  # it reloaded by itself, keeping the choice
    Select(browser.find_element(By.ID, "auto-refresh")).select_by_value("0")
    wait.until(lambda d: "refresh" not in d.current_url)

    browser.get(f"{site.flower.url}/sagas/{site.failed}")
    diagram = wait.until(lambda d: d.find_element(By.ID, "saga-diagram"))
    assert diagram.is_displayed()
    nodes = browser.find_elements(By.CSS_SELECTOR, "#saga-diagram g.node")
    by_role = {
        role: [
            n.get_attribute("data-status") for n in nodes if n.get_attribute("data-role") == role
        ]
        for role in ("action", "compensation")
    }
    assert by_role == {
        "action": ["completed", "completed", "failed", "skipped"],
        "compensation": ["compensated", "compensated", "not_needed", "not_needed"],
    }
    _screenshot(browser, tmp_path / "saga-diagram.png")
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == [], severe
