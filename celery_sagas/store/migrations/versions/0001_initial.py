"""The initial saga schema: saga, saga_step, saga_transition, saga_outbox, saga_guard.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from celery_sagas.store.tables import UtcDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "saga",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("business_key", sa.String(200), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("payload_hash", sa.String(64), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("current_step", sa.Integer(), nullable=False),
        sa.Column("token", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text()),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.Column("finished_at", UtcDateTime()),
        sa.UniqueConstraint("name", "business_key", name="uq_saga_name_business_key"),
    )
    op.create_index("ix_saga_state", "saga", ["state"])
    op.create_index("ix_saga_created_at", "saga", ["created_at"])
    op.create_table(
        "saga_step",
        sa.Column(
            "saga_id",
            sa.String(36),
            sa.ForeignKey("saga.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("idx", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column(
            "compensation_attempts", sa.Integer(), nullable=False, server_default=sa.text("0")
        ),
        sa.Column("result", sa.JSON()),
        sa.Column("error", sa.Text()),
        sa.Column("error_kind", sa.String(16)),
        sa.Column("started_at", UtcDateTime()),
        sa.Column("finished_at", UtcDateTime()),
        sa.Column("compensation_started_at", UtcDateTime()),
        sa.Column("compensation_finished_at", UtcDateTime()),
    )
    op.create_table(
        "saga_transition",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column(
            "saga_id", sa.String(36), sa.ForeignKey("saga.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("at", UtcDateTime(), nullable=False),
        sa.Column("step", sa.String(200)),
        sa.Column("old", sa.String(32), nullable=False),
        sa.Column("new", sa.String(32), nullable=False),
        sa.Column("reason", sa.Text()),
        sa.Column("actor", sa.String(200), nullable=False),
    )
    op.create_index("ix_saga_transition_saga_id", "saga_transition", ["saga_id", "id"])
    op.create_table(
        "saga_outbox",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("saga_id", sa.String(36), nullable=False),
        sa.Column("body", sa.JSON(), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("sent_at", UtcDateTime()),
    )
    op.create_index(
        "ix_saga_outbox_unsent",
        "saga_outbox",
        ["created_at"],
        postgresql_where=sa.text("sent_at IS NULL"),
        sqlite_where=sa.text("sent_at IS NULL"),
    )
    op.create_table(
        "saga_guard",
        sa.Column("key", sa.String(300), primary_key=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("result", sa.JSON()),
        sa.Column("error", sa.Text()),
        sa.Column("recorded_at", UtcDateTime(), nullable=False),
    )


def downgrade() -> None:
    for table in ("saga_guard", "saga_outbox", "saga_transition", "saga_step", "saga"):
        op.drop_table(table)
