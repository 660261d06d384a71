"""Campaign controls (pause / resume / cancel) and approvals of proposed batches.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03

Tables of their own, not new campaign states: the ``campaigns`` check constraint stays as it was
(SQLite could only change it by copying a table that every other table references), the runner's
polling never touches the campaign row, and an approval keeps its own who / when / via.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

TIMESTAMP = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    """Create ``campaign_controls`` (no row: never controlled) and ``approvals``."""
    op.create_table(
        "campaign_controls",
        sa.Column("campaign_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("requested_by", sa.String(length=200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("flow_run_id", sa.String(length=64), nullable=True),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.CheckConstraint(
            "state IN ('running', 'paused', 'cancelling', 'cancelled')", name=op.f("ck_campaign_controls_state")
        ),
        sa.ForeignKeyConstraint(
            ["campaign_id"], ["campaigns.id"], name=op.f("fk_campaign_controls_campaign_id_campaigns"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("campaign_id", name=op.f("pk_campaign_controls")),
    )
    op.create_table(
        "approvals",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("batch_id", sa.String(length=100), nullable=True),
        sa.Column("candidate_key", sa.String(length=512), nullable=False),
        sa.Column("params", JSON, nullable=False),
        sa.Column("predicted_mean", sa.Double(), nullable=True),
        sa.Column("predicted_std", sa.Double(), nullable=True),
        sa.Column("decision", sa.String(length=20), nullable=False),
        sa.Column("edited_candidate_key", sa.String(length=512), nullable=True),
        sa.Column("edited_params", JSON, nullable=True),
        sa.Column("decided_by", sa.String(length=200), nullable=True),
        sa.Column("via", sa.String(length=50), nullable=True),
        sa.Column("experiment_id", sa.Integer(), nullable=True),
        sa.Column("proposed_at", TIMESTAMP, nullable=False),
        sa.Column("decided_at", TIMESTAMP, nullable=True),
        sa.CheckConstraint(
            "decision IN ('pending', 'accepted', 'dropped', 'edited', 'superseded')",
            name=op.f("ck_approvals_decision"),
        ),
        sa.ForeignKeyConstraint(
            ["campaign_id"], ["campaigns.id"], name=op.f("fk_approvals_campaign_id_campaigns"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["experiment_id"], ["experiments.id"], name=op.f("fk_approvals_experiment_id_experiments")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_approvals")),
    )
    op.create_index("ix_approvals_campaign_id_decision", "approvals", ["campaign_id", "decision"], unique=False)


def downgrade() -> None:
    """Drop both tables (pause requests and the approval history go with them)."""
    op.drop_index("ix_approvals_campaign_id_decision", table_name="approvals")
    op.drop_table("approvals")
    op.drop_table("campaign_controls")
