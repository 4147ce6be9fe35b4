"""The accounts tables. Alembic migrations under ``migrations/`` create and change them."""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import BigInteger, Boolean, Date, DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # SHA-256 hex; the key itself is never stored
    prefix: Mapped[str] = mapped_column(String(16))  # "sk-abcd", for listings and logs
    name: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Optional rate limits; None means no limit.
    requests_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tokens_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_concurrent: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Grant(Base):
    """A key may call a model; with a token allowance valid for a period (None: unlimited)."""

    __tablename__ = "grants"
    __table_args__ = (UniqueConstraint("key_id", "model"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(200))
    allowance_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    used_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    # Tokens promised to requests still running (their input plus max_tokens); see AccountStore.admit.
    reserved_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    granted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    exhausted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class UsageRecord(Base):
    """The ledger: one row per request that reached a model."""

    __tablename__ = "usage"
    __table_args__ = (Index("ix_usage_key_started", "key_id", "started_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), unique=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(200))
    input_tokens: Mapped[int] = mapped_column(Integer)
    output_tokens: Mapped[int] = mapped_column(Integer)
    image_tokens: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(40))  # ok, cancelled, or the error code
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Refusals(Base):
    """Requests of a key refused before they reached a model, which have no ledger row: how many, per model,
    DashScope code and day (UTC). Counted in memory and added in batches (see AccountStore.record_refusal)."""

    __tablename__ = "refusals"

    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), primary_key=True)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)  # "" when the request named none
    code: Mapped[str] = mapped_column(String(80), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger)


class InFlight(Base):
    """A running request's hold on its grant and the tokens it had made at its last checkpoint.

    Written at admission (with the reservation) or by the checkpoint writer, deleted when the request is
    settled. A row still here when its replica is gone is an interrupted request: see AccountStore.reclaim.
    """

    __tablename__ = "in_flight"

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    replica_id: Mapped[str] = mapped_column(String(36), index=True)
    grant_id: Mapped[int] = mapped_column(ForeignKey("grants.id", ondelete="CASCADE"))
    key_id: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(200))
    reserved_tokens: Mapped[int] = mapped_column(BigInteger)  # held in grants.reserved_tokens for this request
    input_tokens: Mapped[int] = mapped_column(Integer)
    output_tokens: Mapped[int] = mapped_column(Integer)
    image_tokens: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    checkpoint_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Replica(Base):
    """A serving process and its lease: it renews ``lease_until`` while it lives."""

    __tablename__ = "replicas"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    host: Mapped[str] = mapped_column(String(200))  # host name and boot id: where ``process`` can be checked
    process: Mapped[str] = mapped_column(String(64))  # "pid:start time": the process, even after its pid is reused
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    lease_until: Mapped[datetime] = mapped_column(DateTime(timezone=True))


# -- batch jobs (llamascope.batch) ---------------------------------------------------------------------------


class BatchFile(Base):
    """A file of the Files API: a batch's input (purpose ``batch``) or its output or errors (``batch_output``).
    Its bytes are in the batch file store (``llamascope.batch.files``), under its id."""

    __tablename__ = "batch_files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class BatchJob(Base):
    """A batch: its input file, its state (``llamascope.batch.records.Status``) and its counts.

    ``worker`` is the replica doing a step of the whole batch (validating it, writing its result files); the
    step is taken over when that replica's lease in ``replicas`` runs out. ``ending`` is what a batch
    cancelled or past its window becomes once its running lines have stopped."""

    __tablename__ = "batches"
    __table_args__ = (Index("ix_batches_key_created", "key_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"))
    input_file_id: Mapped[str] = mapped_column(String(64))
    endpoint: Mapped[str] = mapped_column(String(200))
    completion_window: Mapped[str] = mapped_column(String(16))
    model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    ending: Mapped[str | None] = mapped_column(String(16), nullable=True)
    worker: Mapped[str | None] = mapped_column(String(36), nullable=True)
    errors: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON: [{code, message, param, line}]
    meta: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON: the caller's metadata
    output_file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    total: Mapped[int] = mapped_column(Integer, default=0)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    in_progress_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finalizing_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    failed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    expired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    cancelling_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class BatchLine(Base):
    """One line of a batch's input: where it is in the file, its state, and once done its result line.

    ``pending`` -> ``running`` (``owner``: the replica running it, a lease that ends with that replica's) ->
    ``done``. The result is written once, by the owner, in the same transaction that counts it."""

    __tablename__ = "batch_lines"
    __table_args__ = (Index("ix_batch_lines_state", "batch_id", "state"),)

    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True)
    line: Mapped[int] = mapped_column(Integer, primary_key=True)  # 1-based, as error messages name it
    custom_id: Mapped[str] = mapped_column(Text)
    offset: Mapped[int] = mapped_column(BigInteger)
    length: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(8))
    owner: Mapped[str | None] = mapped_column(String(36), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    ok: Mapped[bool | None] = mapped_column(Boolean, nullable=True)  # True: the output file; False: the errors
    result: Mapped[str | None] = mapped_column(Text, nullable=True)  # the result file's line, JSON
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
