# tasks.py: your Celery app, with a saga installed beside your own tasks
from celery import Celery

from celery_sagas import BusinessError, Saga, Step, StepContext, install

app = Celery("tasks")  # the broker comes from CELERY_BROKER_URL


class NoFlight(BusinessError):
    """Declined: this step did nothing, so only the steps before it are compensated."""


def book_room(ctx: StepContext) -> dict[str, str]:
    return {"room": f"R-{ctx.payload['trip_id']}"}  # JSON: it is stored and passed on


def cancel_room(ctx: StepContext) -> None:
    print("cancelling", ctx.result)  # ctx.result: what book_room returned


def book_flight(ctx: StepContext) -> dict[str, str]:
    if ctx.payload["to"] == "Atlantis":
        raise NoFlight("no flights to Atlantis")
    return {"flight": f"F-{ctx.payload['trip_id']}", "room": ctx.results["book_room"]["room"]}


def cancel_flight(ctx: StepContext) -> None:
    print("cancelling", ctx.result)


trip = Saga(
    "trip",
    business_key="trip_id",  # one saga per trip, however often it is started
    steps=[
        Step("book_room", action=book_room, compensation=cancel_room),
        Step("book_flight", action=book_flight, compensation=cancel_flight, timeout=60),
    ],
)

sagas = install(app, [trip])  # the saga database comes from SAGAS_DATABASE_URL
start_trip = sagas.start_task("trip")
