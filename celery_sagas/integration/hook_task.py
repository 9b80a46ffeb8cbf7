"""``celery_sagas.hook``: runs a saga's outcome hook once (see ``celery_sagas.hooks``).

It claims the hook's key in the saga database, calls the hook task in this process (it
was sent to the hook task's queue, so the workers that own the hook run it), then records
it done. A duplicate finds the claim done (nothing to do) or held (it looks again every
few seconds: a holder that died loses the claim when its lease, the hook's hard time
limit, runs out, and the next look takes it over). A hook that raises gives the claim back and
is retried with backoff, ``HOOK_RETRIES`` times; then it is logged as failed and left.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery import Celery, Task

from celery_sagas.integration.config import SAGA_TASK_OPTIONS
from celery_sagas.integration.dispatcher import HOOK_TASK

if TYPE_CHECKING:
    from celery_sagas.integration.runtime import SagaRuntime

HOOK_LEASE = 60.0  # seconds a claim is held; also the hook's hard time limit
HOOK_BUSY_RETRY = 5.0  # a duplicate looks again this often while the claim is held
HOOK_RETRIES = 10


def register_hook_task(app: Celery, runtime: SagaRuntime) -> None:
    @app.task(
        name=HOOK_TASK,
        bind=True,
        shared=False,
        **SAGA_TASK_OPTIONS,
        ignore_result=True,
        max_retries=HOOK_RETRIES,
        soft_time_limit=HOOK_LEASE - 5,
        time_limit=HOOK_LEASE,  # a hook still running past its lease is killed
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
        if verdict == "busy":  # another delivery holds it: done soon, or its lease runs out
            raise self.retry(countdown=HOOK_BUSY_RETRY, max_retries=None)
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
