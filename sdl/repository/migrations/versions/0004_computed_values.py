"""Computed values of cheap sources (``fidelities:``), beside the measurements but never experiments.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None

TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create ``computed_values`` (one row per campaign, candidate and source)."""
    op.create_table(
        "computed_values",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("candidate_key", sa.String(length=512), nullable=False),
        sa.Column("source", sa.String(length=200), nullable=False),
        sa.Column("property", sa.String(length=200), nullable=False),
        sa.Column("value", sa.Double(), nullable=True),
        sa.Column("cost", sa.Double(), nullable=False),
        sa.Column("model_version", sa.String(length=200), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(
            ["campaign_id"], ["campaigns.id"], name=op.f("fk_computed_values_campaign_id_campaigns"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_computed_values")),
        sa.UniqueConstraint(
            "campaign_id", "candidate_key", "source", name=op.f("uq_computed_values_campaign_id_candidate_key_source")
        ),
    )


def downgrade() -> None:
    """Drop the table (the computed values go with it)."""
    op.drop_table("computed_values")
