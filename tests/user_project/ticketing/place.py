"""``python -m ticketing.place '{"order_id": "o-1", ...}' ...``: start one saga per order
and print their ids as a JSON list."""

from __future__ import annotations

import json
import sys

from ticketing.app import start_ticket_order


def main(orders: list[str]) -> list[str]:
    return [str(start_ticket_order.delay(json.loads(order)).id) for order in orders]


if __name__ == "__main__":
    sys.stdout.write(json.dumps(main(sys.argv[1:])) + "\n")
