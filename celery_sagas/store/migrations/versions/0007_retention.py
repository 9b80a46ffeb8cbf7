"""Retention: a mark on sagas whose guards and sent outbox rows the periodic pass deleted
(with a partial index of the finished sagas not compacted yet), and an index on the
attempts' saga id, which pruning deletes by.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

from celery_sagas.store.tables import UtcDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

COMPACTABLE = sa.text("finished_at IS NOT NULL AND compacted_at IS NULL")


def upgrade() -> None:
    with op.batch_alter_table("saga") as table:
        table.add_column(sa.Column("compacted_at", UtcDateTime()))
    op.create_index(
        "ix_saga_compactable",
        "saga",
        ["finished_at"],
        postgresql_where=COMPACTABLE,
        sqlite_where=COMPACTABLE,
    )
    op.create_index("ix_saga_attempt_saga_id", "saga_attempt", ["saga_id"])


def downgrade() -> None:
    op.drop_index("ix_saga_attempt_saga_id", table_name="saga_attempt")
    op.drop_index("ix_saga_compactable", table_name="saga")
    with op.batch_alter_table("saga") as table:
        table.drop_column("compacted_at")
