"""Choreographed sagas: their event timeline and which handler reacted to which event.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

from celery_sagas.store.tables import UtcDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "saga_event",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(36), nullable=False, unique=True),
        sa.Column(
            "saga_id", sa.String(36), sa.ForeignKey("saga.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("service", sa.String(200), nullable=False),
        sa.Column("handler", sa.String(400)),
        sa.Column("caused_by", sa.String(36)),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("published_at", UtcDateTime(), nullable=False),
        sa.Column("sent_at", UtcDateTime()),
    )
    op.create_index("ix_saga_event_saga_id", "saga_event", ["saga_id", "id"])
    op.create_index(
        "ix_saga_event_unsent",
        "saga_event",
        ["published_at"],
        postgresql_where=sa.text("sent_at IS NULL"),
        sqlite_where=sa.text("sent_at IS NULL"),
    )
    op.create_table(
        "saga_reaction",
        sa.Column("event_id", sa.String(36), primary_key=True),
        sa.Column("handler", sa.String(400), primary_key=True),
        sa.Column(
            "saga_id", sa.String(36), sa.ForeignKey("saga.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("at", UtcDateTime(), nullable=False),
    )
    op.create_index("ix_saga_reaction_saga_id", "saga_reaction", ["saga_id"])


def downgrade() -> None:
    op.drop_table("saga_reaction")
    op.drop_table("saga_event")
