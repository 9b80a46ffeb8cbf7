"""``python -m workers.bootstrap``: prepare the example deployment's database.

Creates or upgrades the saga schema, creates the example participants' tables (stock,
reservations, payments, shipments, notifications) and seeds demo stock if the inventory is
empty. Safe to run on every release and every ``docker compose up``: a second run changes
nothing. The database comes from ``SAGAS_DATABASE_URL`` (a ``postgresql+psycopg2://`` URL),
or the embedded demo's SQLite file when it is unset.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sqlalchemy import func, select

from celery_sagas.settings import redact_url
from celery_sagas.store import upgrade
from workers import choreography, config, db

DEMO_STOCK = {"WIDGET": 10_000, "GADGET": 10_000, "RARE-GEM": 6}


def bootstrap(seed: bool = True) -> list[str]:
    """Do the work; returns what happened, one line per step."""
    url = config.database_url()
    done = [f"saga schema at revision {upgrade(url)} ({redact_url(url)})"]
    choreography.create_tables()
    done.append("participant tables and the choreography services' outbox present")
    if not seed:
        return done
    with db.get_engine().connect() as conn:
        skus = conn.execute(select(func.count()).select_from(db.inventory)).scalar_one()
    if skus:
        done.append(f"inventory has {skus} SKUs: not seeded")
    else:
        db.seed_inventory(DEMO_STOCK)
        done.append(f"seeded demo stock: {', '.join(f'{k}={v}' for k, v in DEMO_STOCK.items())}")
    return done


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m workers.bootstrap",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--no-seed", action="store_true", help="do not seed demo stock into an empty inventory"
    )
    args = parser.parse_args(argv)
    for line in bootstrap(seed=not args.no_seed):
        sys.stdout.write(f"bootstrap: {line}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
