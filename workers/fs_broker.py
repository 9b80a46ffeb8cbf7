"""The embedded demo broker: kombu's ``filesystem://`` transport, with atomic writes.

kombu 5.7's filesystem transport writes a message file in place; a worker polling the same
folder can move and read it before it is written, get an empty file and die with
``JSONDecodeError`` ("Unrecoverable error"). Since the caller now publishes the first step
of every saga (the durable start), the demo's worker, beat and caller write concurrently
and hit that race. Here a message is written under a name the reader skips, then renamed
into place (atomic on one filesystem). ``workers.config`` makes ``filesystem://`` resolve
to this transport for the example app.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic
from typing import Any

from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

PART = ".part"  # a file still being written: its name does not end in ".<queue>.msg"


class Channel(filesystem.Channel):
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        with open(final + PART, "wb") as file:
            file.write(str_to_bytes(dumps(payload)))
        os.replace(final + PART, final)


class Transport(filesystem.Transport):
    Channel = Channel
