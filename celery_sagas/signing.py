"""Signed step commands for participant workers that cannot read the saga database
(``coordinator_hop``).

Such a worker cannot check that the saga expects a message, so the check travels with it:
the coordinator's side signs every step command (HMAC-SHA256 over its canonical JSON,
with a secret both sides read from ``SAGAS_SIGNING_KEY``) and stamps it with the moment
it expires. The participant's worker refuses a command whose signature does not verify
(forged or altered: ``bad signature``) or that expired (``late``) before any side effect.
Pure: no clock is read here.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

SIGNATURE = "signature"
EXPIRES_AT = "expires_at"
BAD_SIGNATURE = "bad signature"
EXPIRED = "late"
DEFAULT_VALIDITY = 3600.0  # seconds, for a step with no timeout
UNSIGNED = ("store_retries", "applying", SIGNATURE)  # added by retries, or the signature


def _canonical(command: Mapping[str, Any], task_name: str) -> bytes:
    signed = {k: v for k, v in command.items() if k not in UNSIGNED}
    return json.dumps([task_name, signed], sort_keys=True, separators=(",", ":")).encode()


def validity(timeout: float | None, queue_timeout: float | None, grace: float) -> float:
    """Seconds a step command stays valid after it is sent: its wait for a worker (the
    ``queue_timeout``, else one more timeout) plus its own time. A re-send is signed anew."""
    own = timeout if timeout is not None else DEFAULT_VALIDITY
    return (queue_timeout if queue_timeout is not None else own) + own + grace


def sign(
    command: Mapping[str, Any], task_name: str, secret: str, expires_at: datetime
) -> dict[str, Any]:
    """``command`` (a step task's kwargs) stamped with ``expires_at`` and signed for the
    task ``task_name`` (a command for one task is not valid for another)."""
    stamped = {**command, EXPIRES_AT: expires_at.isoformat()}
    digest = hmac.new(secret.encode(), _canonical(stamped, task_name), hashlib.sha256)
    return {**stamped, SIGNATURE: digest.hexdigest()}


def refusal(command: Mapping[str, Any], task_name: str, secret: str, now: datetime) -> str | None:
    """Why a signed command must not run (``bad signature`` or ``late``), or None."""
    signature = command.get(SIGNATURE)
    expected = hmac.new(secret.encode(), _canonical(command, task_name), hashlib.sha256)
    if not isinstance(signature, str) or not hmac.compare_digest(signature, expected.hexdigest()):
        return BAD_SIGNATURE
    try:
        expires_at = datetime.fromisoformat(str(command[EXPIRES_AT]))
    except (KeyError, ValueError):
        return BAD_SIGNATURE
    return EXPIRED if now >= expires_at else None
