"""``install`` in someone else's app: the app's own tasks and settings stay as they were.

The sagas' delivery settings sit on the saga tasks; global settings that would make the
sagas incorrect are refused with the setting and the value to use (or, for RabbitMQ
publish confirms, one warning) and never changed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_sagas import Saga, Step, install
from celery_sagas.errors import SagaConfigurationError
from celery_sagas.integration.config import SAGA_TASK_OPTIONS, required_visibility_timeout

DELIVERY_KEYS = (
    "task_acks_late",
    "task_reject_on_worker_lost",
    "worker_prefetch_multiplier",
    "accept_content",
    "task_serializer",
    "result_serializer",
    "result_accept_content",
    "broker_transport_options",
)


def noop(ctx: Any) -> None:
    return None


def shipping_saga(timeout: float = 60) -> Saga:
    return Saga(
        "shipping",
        steps=[
            Step("pack", noop, noop, compensation_name="unpack"),
            Step("ship", noop, noop, timeout=timeout, compensation_name="recall"),
        ],
    )


@pytest.fixture(autouse=True)
def no_saga_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SAGAS_STEP_TIMEOUTS", "SAGAS_DATABASE_URL", "CELERY_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)


def host_app(broker: str = "redis://127.0.0.1:6379/0", **conf: Any) -> Celery:
    app = Celery("host", broker=broker, set_as_current=False)
    app.conf.update(conf)

    def send_newsletter(user_id: int) -> int:
        return user_id

    app.task(name="host.send_newsletter", shared=False)(send_newsletter)
    return app


def database(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'sagas.db'}"


def delivery_settings(app: Celery) -> dict[str, Any]:
    return {key: app.conf.get(key) for key in DELIVERY_KEYS}


def test_install_leaves_the_apps_own_tasks_and_delivery_settings_alone(tmp_path: Path) -> None:
    app = host_app()
    before = delivery_settings(app)
    own = app.tasks["host.send_newsletter"]

    install(app, [shipping_saga()], database_url=database(tmp_path))

    assert delivery_settings(app) == before
    assert app.conf.task_acks_late is False
    assert app.conf.worker_prefetch_multiplier == 4
    assert (own.acks_late, own.reject_on_worker_lost) == (False, None)
    routed = set(app.conf.task_routes or {})
    assert "host.send_newsletter" not in routed
    assert all(name.startswith(("shipping.", "celery_sagas.")) for name in routed)


def test_every_saga_task_carries_the_delivery_settings(tmp_path: Path) -> None:
    app = host_app()

    install(app, [shipping_saga()], database_url=database(tmp_path))

    saga_tasks = [t for name, t in app.tasks.items() if name.startswith(("shipping.", "celery_"))]
    saga_tasks = [t for t in saga_tasks if not t.name.startswith("celery.")]
    names = {t.name for t in saga_tasks}
    assert {"shipping.start", "shipping.pack", "shipping.unpack", "shipping.recall"} <= names
    assert {"celery_sagas.advance", "celery_sagas.scan", "celery_sagas.dead_letter"} <= names
    for task in saga_tasks:
        for option, value in SAGA_TASK_OPTIONS.items():
            assert getattr(task, option) == value, (task.name, option)


@pytest.mark.parametrize("key", ["accept_content", "result_accept_content"])
def test_a_pickle_accepting_app_is_refused_with_the_setting_to_change(
    tmp_path: Path, key: str
) -> None:
    app = host_app(**{key: ["json", "pickle"]})

    with pytest.raises(SagaConfigurationError) as raised:
        install(app, [shipping_saga()], database_url=database(tmp_path))

    assert f"Set {key}=['json']" in str(raised.value)
    assert app.conf.get(key) == ["json", "pickle"]


def test_a_redis_visibility_timeout_shorter_than_a_declared_step_is_refused(
    tmp_path: Path,
) -> None:
    app = host_app()
    wanted = required_visibility_timeout([7200])

    with pytest.raises(SagaConfigurationError) as raised:
        install(app, [shipping_saga(timeout=7200)], database_url=database(tmp_path))

    assert "visibility_timeout" in str(raised.value)
    assert f"{{'visibility_timeout': {wanted}}}" in str(raised.value)
    assert app.conf.broker_transport_options == {}


@pytest.mark.parametrize("key", ["create_shipment", "shipping.create_shipment"])
def test_configured_step_timeouts_count_for_the_visibility_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    """Issue 9: SAGAS_STEP_TIMEOUTS='{"create_shipment": 7200}' left 3600 s in place."""
    saga = Saga("shipping", steps=[Step("create_shipment", noop, noop, timeout=60)])
    monkeypatch.setenv("SAGAS_STEP_TIMEOUTS", f'{{"{key}": 7200}}')
    app = host_app()

    with pytest.raises(SagaConfigurationError, match="visibility_timeout"):
        install(app, [saga], database_url=database(tmp_path))

    wanted = required_visibility_timeout([7200])
    app = host_app(broker_transport_options={"visibility_timeout": wanted})
    install(app, [saga], database_url=database(tmp_path))
    assert app.conf.broker_transport_options == {"visibility_timeout": wanted}


def test_the_default_visibility_timeout_covers_the_default_step_timeout(tmp_path: Path) -> None:
    app = host_app()

    install(app, [Saga("quick", steps=[Step("one", noop, noop)])], database_url=database(tmp_path))

    assert required_visibility_timeout([300]) <= 3600
    assert app.conf.broker_transport_options == {}


def test_visibility_timeout_outlasts_twice_the_longest_step_with_its_grace() -> None:
    assert required_visibility_timeout([10, 7200, 60]) > 2 * 7200
    assert required_visibility_timeout([]) > 0


def test_other_brokers_need_no_visibility_timeout(tmp_path: Path) -> None:
    app = host_app(broker="filesystem://")

    install(app, [shipping_saga(timeout=7200)], database_url=database(tmp_path))

    assert app.conf.broker_transport_options == {}


def test_rabbitmq_without_publish_confirms_is_left_alone_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = host_app(broker="amqp://guest:guest@127.0.0.1:5672//")

    with caplog.at_level(logging.WARNING, logger="celery_sagas"):
        install(app, [shipping_saga()], database_url=database(tmp_path))

    warnings = [r.getMessage() for r in caplog.records if r.name == "celery_sagas"]
    assert len(warnings) == 1
    assert "confirm_publish" in warnings[0]
    assert app.conf.broker_transport_options == {}


def test_rabbitmq_with_publish_confirms_gets_no_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = host_app(
        broker="amqp://guest:guest@127.0.0.1:5672//",
        broker_transport_options={"confirm_publish": True},
    )

    with caplog.at_level(logging.WARNING, logger="celery_sagas"):
        install(app, [shipping_saga()], database_url=database(tmp_path))

    assert [r for r in caplog.records if r.name == "celery_sagas"] == []


def test_an_app_that_lists_routers_keeps_them_and_gets_the_saga_routes_first() -> None:
    """``task_routes`` may be a list of routers (functions, dicts): install used to merge
    into it as a dict and raised ``TypeError: 'tuple' object is not a mapping``."""
    from celery import Celery

    from celery_sagas import Saga, Step, install

    def own(name: str, args: Any, kwargs: Any, options: Any, **_: Any) -> Any:
        return {"queue": "mine"} if name == "app.own_task" else None

    app = Celery("listed-routes", broker="memory://")
    app.conf.task_routes = (own,)
    saga = Saga(
        "listed",
        [Step("s0", lambda c: None, lambda c: None, compensation_name="u0", queue="steps")],
    )
    install(app, [saga], database_url="sqlite://")
    router = app.amqp.router
    assert router.route({}, "listed.s0")["queue"].name == "steps"
    assert router.route({}, "celery_sagas.dead_letter")["queue"].name == "sagas.dlq"
    assert router.route({}, "app.own_task")["queue"].name == "mine"
    routers = app.conf.task_routes
    assert isinstance(routers, tuple) and routers[-1] is own and len(routers) == 2


def test_inline_runs_longer_than_the_redis_visibility_timeout_are_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With inline_steps a delivery holds its message unacked for its whole inline run, up
    to its budget: five 300 s steps may run 3101 s in one delivery, past a visibility
    timeout the per-step check accepts (1200 s). Redis then delivers it again mid-run,
    and that copy re-sends the running step (a second run beside it)."""
    steps = [Step(f"s{i}", noop, noop, compensation_name=f"u{i}", timeout=300) for i in range(5)]
    visibility = required_visibility_timeout([300])
    app = host_app(broker_transport_options={"visibility_timeout": visibility})

    with caplog.at_level(logging.WARNING, logger="celery_sagas"):
        install(app, [Saga("long", steps)], database_url=database(tmp_path), inline_steps=True)

    warnings = [r.getMessage() for r in caplog.records if r.name == "celery_sagas"]
    assert any("visibility_timeout" in w and "inline" in w for w in warnings), warnings
