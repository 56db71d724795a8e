"""The database schema: every table the processes share, as ordered migrations.

``upgrade_schema`` applies the pending ones; ``pulsecal-admin migrate`` and the worker call it,
and it is safe to run concurrently (one advisory lock) and repeatedly.
"""

from collections.abc import Sequence
from typing import LiteralString

import psycopg
from psycopg.rows import TupleRow

__all__ = ("MIGRATIONS", "upgrade_schema")

MIGRATIONS: Sequence[tuple[int, str, LiteralString]] = (
    (
        1,
        "devices and their hashed tokens",
        """
        CREATE TABLE devices (
            device_id   text PRIMARY KEY,
            token_hash  bytea NOT NULL UNIQUE,
            created_at  timestamptz NOT NULL DEFAULT now(),
            updated_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
            revoked_at  timestamptz
        );
        CREATE INDEX devices_updated_at ON devices (updated_at);
        """,
    ),
    # The worker's tables (docs/worker-and-alerts.md). readings is partitioned by day on ts; rows
    # outside every daily partition land in readings_default, and
    # readings_ensure_partitions moves them into a day's partition when it creates it.
    (
        2,
        "readings, partitioned by day, and each device's latest reading",
        """
        CREATE TABLE readings (
            device_id    text NOT NULL,
            seq          bigint NOT NULL,
            ts           timestamptz NOT NULL,
            rate_hz      real NOT NULL,
            ppg          double precision[] NOT NULL,
            hr           real,
            spo2         real,
            received_at  timestamptz NOT NULL,
            persisted_at timestamptz NOT NULL DEFAULT now()
        ) PARTITION BY RANGE (ts);
        CREATE UNIQUE INDEX readings_device_ts_seq ON readings (device_id, ts, seq);
        CREATE TABLE readings_default PARTITION OF readings DEFAULT;

        CREATE FUNCTION readings_ensure_partitions(first_day date, days integer)
        RETURNS integer LANGUAGE plpgsql AS $$
        DECLARE
            day date;
            lo timestamptz;
            hi timestamptz;
            part text;
            created integer := 0;
        BEGIN
            PERFORM pg_advisory_xact_lock(7265002);
            FOR i IN 0 .. days - 1 LOOP
                day := first_day + i;
                part := 'readings_' || to_char(day, 'YYYYMMDD');
                CONTINUE WHEN to_regclass(part) IS NOT NULL;
                lo := day::timestamp AT TIME ZONE 'UTC';
                hi := (day + 1)::timestamp AT TIME ZONE 'UTC';
                EXECUTE format(
                    'CREATE TABLE %I (LIKE readings INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                    part);
                EXECUTE format(
                    'INSERT INTO %I SELECT * FROM readings_default WHERE ts >= %L AND ts < %L',
                    part, lo, hi);
                EXECUTE format(
                    'DELETE FROM readings_default WHERE ts >= %L AND ts < %L', lo, hi);
                EXECUTE format(
                    'ALTER TABLE readings ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                    part, lo, hi);
                created := created + 1;
            END LOOP;
            RETURN created;
        END
        $$;
        SELECT readings_ensure_partitions((now() AT TIME ZONE 'UTC')::date - 1, 9);

        CREATE TABLE device_status (
            device_id        text PRIMARY KEY,
            last_ts          timestamptz NOT NULL,
            last_received_at timestamptz NOT NULL,
            hr               real,
            spo2             real
        ) WITH (fillfactor = 70);
        """,
    ),
    (
        3,
        "alerts: at most one open per device and rule",
        """
        CREATE TABLE alerts (
            id            bigserial PRIMARY KEY,
            device_id     text NOT NULL,
            rule          text NOT NULL,
            metric        text NOT NULL,
            above         boolean NOT NULL,
            threshold     double precision NOT NULL,
            value         double precision,
            message       text NOT NULL,
            started_at    timestamptz NOT NULL,
            opened_at     timestamptz NOT NULL DEFAULT now(),
            cleared_at    timestamptz,
            cleared_value double precision
        );
        CREATE UNIQUE INDEX alerts_open ON alerts (device_id, rule) WHERE cleared_at IS NULL;
        CREATE INDEX alerts_opened_at ON alerts (opened_at);
        CREATE INDEX alerts_device_opened_at ON alerts (device_id, opened_at);
        """,
    ),
    (
        4,
        "analyses: one result per device window",
        """
        CREATE TABLE analyses (
            id             bigserial PRIMARY KEY,
            device_id      text NOT NULL,
            window_start   timestamptz NOT NULL,
            window_end     timestamptz NOT NULL,
            status         text NOT NULL,
            samples        integer NOT NULL,
            heart_rate_bpm real,
            hrv_rmssd_ms   real,
            hrv_sdnn_ms    real,
            beats          integer,
            quality        real,
            error          text,
            attempts       integer NOT NULL,
            duration_ms    real,
            created_at     timestamptz NOT NULL DEFAULT now(),
            UNIQUE (device_id, window_start)
        );
        CREATE INDEX analyses_created_at ON analyses (created_at);
        """,
    ),
    # The vital rules' state machine per device (worker.alertrules); times in epoch ms of
    # the device's clock, pending and runs in JSON (as text: written every round, read back
    # only by the worker). An alert's times become the readings' own; recorded_at is when the
    # worker wrote it.
    (
        5,
        "alert_state: each device's vital rules evaluated in its readings' time order",
        """
        CREATE TABLE alert_state (
            device_id    text PRIMARY KEY,
            newest_ts    bigint NOT NULL,
            evaluated_ts bigint NOT NULL,
            pending      text NOT NULL,
            runs         text NOT NULL,
            late         bigint NOT NULL DEFAULT 0
        ) WITH (fillfactor = 70);
        ALTER TABLE alerts ADD COLUMN recorded_at timestamptz;
        UPDATE alerts SET recorded_at = opened_at;
        ALTER TABLE alerts ALTER COLUMN recorded_at SET DEFAULT now(),
            ALTER COLUMN recorded_at SET NOT NULL;
        """,
    ),
)

# Any constant works; it only serialises concurrent upgrades.
_MIGRATION_LOCK = 7_265_001


async def upgrade_schema(conn: psycopg.AsyncConnection[TupleRow]) -> list[int]:
    """Apply pending migrations in order; safe to run concurrently and repeatedly."""
    applied_now: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version     integer PRIMARY KEY,
                description text NOT NULL,
                applied_at  timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        cur = await conn.execute("SELECT version FROM schema_migrations")
        done = {row[0] for row in await cur.fetchall()}
        for version, description, sql in MIGRATIONS:
            if version in done:
                continue
            await conn.execute(sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, description) VALUES (%s, %s)",
                (version, description),
            )
            applied_now.append(version)
    return applied_now
