"""Campaign leases: one runner per campaign.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

A table of its own (not columns on ``campaigns``): the heartbeat writes every few seconds never
touch the campaign row, and both SQLite and PostgreSQL create and drop it without a table copy.
Column types are spelled out here, as in 0001, so the revision keeps its meaning when the ORM changes.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create ``campaign_leases`` (no row = nobody runs the campaign)."""
    op.create_table(
        "campaign_leases",
        sa.Column("campaign_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("token", sa.String(length=64), nullable=False),
        sa.Column("holder", sa.String(length=200), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("acquired_at", TIMESTAMP, nullable=False),
        sa.Column("heartbeat_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(
            ["campaign_id"],
            ["campaigns.id"],
            name=op.f("fk_campaign_leases_campaign_id_campaigns"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("campaign_id", name=op.f("pk_campaign_leases")),
    )


def downgrade() -> None:
    """Drop ``campaign_leases`` (a running campaign loses its lease, nothing else)."""
    op.drop_table("campaign_leases")
