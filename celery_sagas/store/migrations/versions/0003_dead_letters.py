"""Dead letters (compensations that exhausted their retries) and failed attempts.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

from celery_sagas.store.tables import UtcDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "saga_dead_letter",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column(
            "saga_id", sa.String(36), sa.ForeignKey("saga.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("saga_name", sa.String(200), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("step_name", sa.String(200), nullable=False),
        sa.Column("task_name", sa.String(400), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("deaths", sa.Integer(), nullable=False, server_default=sa.text("1")),
        sa.Column("error", sa.Text()),
        sa.Column("traceback", sa.Text()),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.Column("resolved_at", UtcDateTime()),
        sa.Column("resolution", sa.Text()),
        sa.Column("auto_retries", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("next_auto_retry_at", UtcDateTime()),
        sa.UniqueConstraint("saga_id", "step", name="uq_saga_dead_letter_step"),
    )
    op.create_index(
        "ix_saga_dead_letter_open",
        "saga_dead_letter",
        ["created_at"],
        postgresql_where=sa.text("status IN ('dead', 'retrying')"),
        sqlite_where=sa.text("status IN ('dead', 'retrying')"),
    )
    op.create_table(
        "saga_attempt",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column(
            "saga_id", sa.String(36), sa.ForeignKey("saga.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("key", sa.String(300), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("at", UtcDateTime(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
    )
    op.create_index("ix_saga_attempt_key", "saga_attempt", ["key", "attempt"])


def downgrade() -> None:
    op.drop_table("saga_attempt")
    op.drop_table("saga_dead_letter")
