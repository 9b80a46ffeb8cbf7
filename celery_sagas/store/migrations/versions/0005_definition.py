"""The fingerprint of the definition each saga started with, so a worker that does not
know it leaves the saga alone (a rolling deploy of a changed saga).

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("saga") as table:
        table.add_column(sa.Column("definition", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("saga") as table:
        table.drop_column("definition")
