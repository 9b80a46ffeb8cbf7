"""The outbox row's guard key, so the relay skips messages a worker already took, and
marking a saga's earlier messages sent in its next transition.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("saga_outbox") as table:
        table.add_column(sa.Column("key", sa.String(300)))
    op.create_index(
        "ix_saga_outbox_unsent_saga",
        "saga_outbox",
        ["saga_id"],
        postgresql_where=sa.text("sent_at IS NULL"),
        sqlite_where=sa.text("sent_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_saga_outbox_unsent_saga", table_name="saga_outbox")
    with op.batch_alter_table("saga_outbox") as table:
        table.drop_column("key")
