"""Initial schema of the knowledge repository, and the append-only guard on ``events``.

Revision ID: 0001
Revises:
Create Date: 2026-11-22

Column types are spelled out here (not imported from ``sdl.repository.schema``) so that this
revision keeps meaning the same thing when the ORM changes later; a test checks that the ORM and
the migrated database do not differ.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

TIMESTAMP = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")

_PG_APPEND_ONLY = """
CREATE OR REPLACE FUNCTION sdl_events_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'events is an append-only log: % is not allowed', TG_OP;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION sdl_events_append_only();
"""
_SQLITE_APPEND_ONLY = (
    "CREATE TRIGGER events_no_update BEFORE UPDATE ON events "
    "BEGIN SELECT RAISE(ABORT, 'events is an append-only log: UPDATE is not allowed'); END",
    "CREATE TRIGGER events_no_delete BEFORE DELETE ON events "
    "BEGIN SELECT RAISE(ABORT, 'events is an append-only log: DELETE is not allowed'); END",
)


def _append_only_events() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute(_PG_APPEND_ONLY)
    elif dialect == "sqlite":
        for statement in _SQLITE_APPEND_ONLY:
            op.execute(statement)


def upgrade() -> None:
    """Create every table, its indexes, and the append-only triggers on ``events``."""
    op.create_table('campaigns',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('config_snapshot', JSON, nullable=False),
    sa.Column('config_hash', sa.String(length=128), nullable=False),
    sa.Column('code_version', sa.String(length=100), nullable=True),
    sa.Column('seed', sa.Integer(), nullable=True),
    sa.Column('budget', sa.Integer(), nullable=True),
    sa.Column('state', sa.String(length=20), nullable=False),
    sa.Column('created_at', TIMESTAMP, nullable=False),
    sa.Column('updated_at', TIMESTAMP, nullable=False),
    sa.CheckConstraint("state IN ('running', 'completed', 'stopped', 'failed')", name=op.f('ck_campaigns_state')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_campaigns')),
    sa.UniqueConstraint('name', name=op.f('uq_campaigns_name'))
    )
    op.create_table('materials',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('canonical_key', sa.String(length=512), nullable=False),
    sa.Column('formula', sa.String(length=200), nullable=True),
    sa.Column('structure', JSON, nullable=True),
    sa.Column('cif', sa.Text(), nullable=True),
    sa.Column('params', JSON, nullable=True),
    sa.Column('source_id', sa.String(length=200), nullable=True),
    sa.Column('created_at', TIMESTAMP, nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_materials')),
    sa.UniqueConstraint('canonical_key', name=op.f('uq_materials_canonical_key'))
    )
    op.create_index(op.f('ix_materials_formula'), 'materials', ['formula'], unique=False)
    op.create_table('model_versions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('campaign_id', sa.Integer(), nullable=False),
    sa.Column('model', sa.String(length=100), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('n_train', sa.Integer(), nullable=False),
    sa.Column('metrics', JSON, nullable=False),
    sa.Column('info', JSON, nullable=False),
    sa.Column('created_at', TIMESTAMP, nullable=False),
    sa.ForeignKeyConstraint(['campaign_id'], ['campaigns.id'], name=op.f('fk_model_versions_campaign_id_campaigns'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_model_versions')),
    sa.UniqueConstraint('campaign_id', 'model', 'version', name=op.f('uq_model_versions_campaign_id_model_version'))
    )
    op.create_table('experiments',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('campaign_id', sa.Integer(), nullable=False),
    sa.Column('material_id', sa.Integer(), nullable=True),
    sa.Column('candidate_key', sa.String(length=512), nullable=False),
    sa.Column('params', JSON, nullable=False),
    sa.Column('state', sa.String(length=20), nullable=False),
    sa.Column('idempotency_key', sa.String(length=200), nullable=False),
    sa.Column('model_version_id', sa.Integer(), nullable=True),
    sa.Column('model_version', sa.String(length=200), nullable=True),
    sa.Column('acquisition_value', sa.Double(), nullable=True),
    sa.Column('predicted_mean', sa.Double(), nullable=True),
    sa.Column('predicted_std', sa.Double(), nullable=True),
    sa.Column('batch_id', sa.String(length=200), nullable=True),
    sa.Column('provenance_extra', JSON, nullable=True),
    sa.Column('instruments', JSON, nullable=True),
    sa.Column('failure_kind', sa.String(length=20), nullable=True),
    sa.Column('failure_reason', sa.Text(), nullable=True),
    sa.Column('proposed_at', TIMESTAMP, nullable=False),
    sa.Column('started_at', TIMESTAMP, nullable=True),
    sa.Column('finished_at', TIMESTAMP, nullable=True),
    sa.CheckConstraint("failure_kind IS NULL OR failure_kind IN ('instrument', 'material')", name=op.f('ck_experiments_failure_kind')),
    sa.CheckConstraint("state IN ('proposed', 'running', 'completed', 'failed', 'abandoned')", name=op.f('ck_experiments_state')),
    sa.ForeignKeyConstraint(['campaign_id'], ['campaigns.id'], name=op.f('fk_experiments_campaign_id_campaigns'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['material_id'], ['materials.id'], name=op.f('fk_experiments_material_id_materials')),
    sa.ForeignKeyConstraint(['model_version_id'], ['model_versions.id'], name=op.f('fk_experiments_model_version_id_model_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_experiments')),
    sa.UniqueConstraint('idempotency_key', name=op.f('uq_experiments_idempotency_key'))
    )
    op.create_index(op.f('ix_experiments_batch_id'), 'experiments', ['batch_id'], unique=False)
    op.create_index('ix_experiments_campaign_id_candidate_key', 'experiments', ['campaign_id', 'candidate_key'], unique=False)
    op.create_index('ix_experiments_campaign_id_state', 'experiments', ['campaign_id', 'state'], unique=False)
    op.create_index(op.f('ix_experiments_material_id'), 'experiments', ['material_id'], unique=False)
    op.create_table('bluesky_runs',
    sa.Column('uid', sa.String(length=100), nullable=False),
    sa.Column('experiment_id', sa.Integer(), nullable=True),
    sa.Column('plan_name', sa.String(length=200), nullable=True),
    sa.Column('exit_status', sa.String(length=40), nullable=True),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('start_time', TIMESTAMP, nullable=False),
    sa.Column('stop_time', TIMESTAMP, nullable=True),
    sa.ForeignKeyConstraint(['experiment_id'], ['experiments.id'], name=op.f('fk_bluesky_runs_experiment_id_experiments')),
    sa.PrimaryKeyConstraint('uid', name=op.f('pk_bluesky_runs'))
    )
    op.create_index(op.f('ix_bluesky_runs_experiment_id'), 'bluesky_runs', ['experiment_id'], unique=False)
    op.create_table('events',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('ts', TIMESTAMP, nullable=False),
    sa.Column('campaign_id', sa.Integer(), nullable=True),
    sa.Column('experiment_id', sa.Integer(), nullable=True),
    sa.Column('kind', sa.String(length=100), nullable=False),
    sa.Column('level', sa.String(length=20), nullable=False),
    sa.Column('message', sa.Text(), nullable=False),
    sa.Column('payload', JSON, nullable=True),
    sa.ForeignKeyConstraint(['campaign_id'], ['campaigns.id'], name=op.f('fk_events_campaign_id_campaigns')),
    sa.ForeignKeyConstraint(['experiment_id'], ['experiments.id'], name=op.f('fk_events_experiment_id_experiments')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_events'))
    )
    op.create_index('ix_events_campaign_id_kind', 'events', ['campaign_id', 'kind'], unique=False)
    op.create_index('ix_events_experiment_id', 'events', ['experiment_id'], unique=False)
    op.create_table('samples',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('experiment_id', sa.Integer(), nullable=False),
    sa.Column('instrument', sa.String(length=200), nullable=False),
    sa.Column('sample_uid', sa.String(length=200), nullable=False),
    sa.Column('state', sa.String(length=40), nullable=False),
    sa.Column('created_at', TIMESTAMP, nullable=False),
    sa.ForeignKeyConstraint(['experiment_id'], ['experiments.id'], name=op.f('fk_samples_experiment_id_experiments'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_samples')),
    sa.UniqueConstraint('instrument', 'sample_uid', name=op.f('uq_samples_instrument_sample_uid'))
    )
    op.create_index(op.f('ix_samples_experiment_id'), 'samples', ['experiment_id'], unique=False)
    op.create_table('bluesky_documents',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('run_uid', sa.String(length=100), nullable=True),
    sa.Column('name', sa.String(length=40), nullable=False),
    sa.Column('sequence', sa.Integer(), nullable=False),
    sa.Column('doc_uid', sa.String(length=200), nullable=True),
    sa.Column('document', JSON, nullable=False),
    sa.Column('created_at', TIMESTAMP, nullable=False),
    sa.ForeignKeyConstraint(['run_uid'], ['bluesky_runs.uid'], name=op.f('fk_bluesky_documents_run_uid_bluesky_runs')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_bluesky_documents')),
    sa.UniqueConstraint('doc_uid', name=op.f('uq_bluesky_documents_doc_uid')),
    sa.UniqueConstraint('run_uid', 'sequence', name=op.f('uq_bluesky_documents_run_uid_sequence'))
    )
    op.create_table('measurements',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('experiment_id', sa.Integer(), nullable=False),
    sa.Column('sample_id', sa.Integer(), nullable=True),
    sa.Column('property', sa.String(length=200), nullable=False),
    sa.Column('value', sa.Double(), nullable=False),
    sa.Column('unit', sa.String(length=50), nullable=True),
    sa.Column('uncertainty', sa.Double(), nullable=True),
    sa.Column('instrument', sa.String(length=200), nullable=True),
    sa.Column('timestamp', TIMESTAMP, nullable=False),
    sa.Column('quality', sa.String(length=32), nullable=False),
    sa.Column('run_uid', sa.String(length=100), nullable=True),
    sa.Column('event_uid', sa.String(length=100), nullable=True),
    sa.ForeignKeyConstraint(['experiment_id'], ['experiments.id'], name=op.f('fk_measurements_experiment_id_experiments'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['run_uid'], ['bluesky_runs.uid'], name=op.f('fk_measurements_run_uid_bluesky_runs')),
    sa.ForeignKeyConstraint(['sample_id'], ['samples.id'], name=op.f('fk_measurements_sample_id_samples')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_measurements')),
    sa.UniqueConstraint('event_uid', 'property', name=op.f('uq_measurements_event_uid_property'))
    )
    op.create_index(op.f('ix_measurements_experiment_id'), 'measurements', ['experiment_id'], unique=False)
    op.create_index('ix_measurements_property_quality', 'measurements', ['property', 'quality'], unique=False)
    op.create_index(op.f('ix_measurements_run_uid'), 'measurements', ['run_uid'], unique=False)
    _append_only_events()


def downgrade() -> None:
    """Drop everything (the triggers go with their table; the PostgreSQL function explicitly)."""
    op.drop_index(op.f('ix_measurements_run_uid'), table_name='measurements')
    op.drop_index('ix_measurements_property_quality', table_name='measurements')
    op.drop_index(op.f('ix_measurements_experiment_id'), table_name='measurements')
    op.drop_table('measurements')
    op.drop_table('bluesky_documents')
    op.drop_index(op.f('ix_samples_experiment_id'), table_name='samples')
    op.drop_table('samples')
    op.drop_index('ix_events_experiment_id', table_name='events')
    op.drop_index('ix_events_campaign_id_kind', table_name='events')
    op.drop_table('events')
    op.drop_index(op.f('ix_bluesky_runs_experiment_id'), table_name='bluesky_runs')
    op.drop_table('bluesky_runs')
    op.drop_index(op.f('ix_experiments_material_id'), table_name='experiments')
    op.drop_index('ix_experiments_campaign_id_state', table_name='experiments')
    op.drop_index('ix_experiments_campaign_id_candidate_key', table_name='experiments')
    op.drop_index(op.f('ix_experiments_batch_id'), table_name='experiments')
    op.drop_table('experiments')
    op.drop_table('model_versions')
    op.drop_index(op.f('ix_materials_formula'), table_name='materials')
    op.drop_table('materials')
    op.drop_table('campaigns')
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS sdl_events_append_only()")
