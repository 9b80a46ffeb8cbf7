"""``celery_sagas.hook``: runs a saga's outcome hook once (see ``celery_sagas.hooks``).

It claims the hook's key in the saga database, calls the hook task in this process (it
was sent to the hook task's queue, so the workers that own the hook run it), then records
it done. A duplicate finds the claim done (nothing to do) or held (it checks again after
the lease: if the holder died, it takes over). A hook that raises gives the claim back and
is retried with backoff, ``HOOK_RETRIES`` times; then it is logged as failed and left.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery import Celery, Task

from celery_sagas.integration.dispatcher import HOOK_TASK

if TYPE_CHECKING:
    from celery_sagas.integration.runtime import SagaRuntime

HOOK_LEASE = 300.0  # seconds a claim is held before another delivery may take it over
HOOK_RETRIES = 10


def register_hook_task(app: Celery, runtime: SagaRuntime) -> None:
    @app.task(
        name=HOOK_TASK,
        bind=True,
        shared=False,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
        max_retries=HOOK_RETRIES,
    )
    def hook(
        self: Task,
        saga_id: str,
        task: str,
        key: str,
        args: list[Any],
        kwargs: dict[str, Any],
    ) -> str:
        verdict = runtime.claim_hook(key)
        if verdict == "busy":  # another delivery holds it: look again when its lease ends
            raise self.retry(countdown=HOOK_LEASE, max_retries=None)
        if verdict == "done":
            runtime.finish_hook(key, saga_id)  # its outbox row, if a crash left it unmarked
            return "duplicate"
        try:
            app.tasks[task](*args, **kwargs)
        except Exception as exc:
            if self.request.retries >= HOOK_RETRIES:  # given up: never relayed again
                runtime.finish_hook(key, saga_id)
                raise
            runtime.release_hook(key)
            raise self.retry(exc=exc, countdown=min(2**self.request.retries, 300)) from exc
        runtime.finish_hook(key, saga_id)
        return "ran"
