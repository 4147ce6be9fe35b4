"""Ended batches' lines: dropped. Their results are in the batches' output and error files, and the batches'
records keep their counts and usage; the runner now drops a batch's lines as it ends it, and this drops those
that batches ended before then left behind (about 0.4 KB a line, every line of every batch ever run).

Revision ID: 0005
Revises: 0004
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

ENDED = ("completed", "failed", "expired", "cancelled")  # llamascope.batch.records.ENDED, as of this revision


def upgrade() -> None:
    ended = ", ".join(f"'{status}'" for status in ENDED)
    op.execute(f"DELETE FROM batch_lines WHERE batch_id IN (SELECT id FROM batches WHERE status IN ({ended}))")


def downgrade() -> None:
    pass  # the lines are gone; their results stay in the batches' files
