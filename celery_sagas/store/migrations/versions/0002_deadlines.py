"""Deadlines, the scanner's due time, admission (max_concurrent) and the stuck alarm.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

from celery_sagas.store.tables import UtcDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("saga") as saga:
        saga.add_column(sa.Column("deadline_at", UtcDateTime()))
        saga.add_column(sa.Column("due_at", UtcDateTime()))
        saga.add_column(
            sa.Column("admitted", sa.Boolean(), nullable=False, server_default=sa.true())
        )
        saga.add_column(sa.Column("stuck_reported_at", UtcDateTime()))
    with op.batch_alter_table("saga_step") as step:
        step.add_column(sa.Column("deadline_at", UtcDateTime()))
        step.add_column(sa.Column("redispatch_at", UtcDateTime()))
        step.add_column(
            sa.Column("dispatches", sa.Integer(), nullable=False, server_default=sa.text("0"))
        )
    op.create_index(
        "ix_saga_due",
        "saga",
        ["due_at"],
        postgresql_where=sa.text("due_at IS NOT NULL"),
        sqlite_where=sa.text("due_at IS NOT NULL"),
    )
    op.create_index(
        "ix_saga_waiting",
        "saga",
        ["name", "created_at"],
        postgresql_where=sa.text("admitted = false AND state = 'STARTED'"),
        sqlite_where=sa.text("admitted = 0 AND state = 'STARTED'"),
    )
    op.create_index(
        "ix_saga_unfinished",
        "saga",
        ["created_at"],
        postgresql_where=sa.text("finished_at IS NULL"),
        sqlite_where=sa.text("finished_at IS NULL"),
    )


def downgrade() -> None:
    for index in ("ix_saga_unfinished", "ix_saga_waiting", "ix_saga_due"):
        op.drop_index(index, table_name="saga")
    with op.batch_alter_table("saga_step") as step:
        for column in ("dispatches", "redispatch_at", "deadline_at"):
            step.drop_column(column)
    with op.batch_alter_table("saga") as saga:
        for column in ("stuck_reported_at", "admitted", "due_at", "deadline_at"):
            saga.drop_column(column)
