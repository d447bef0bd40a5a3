"""The ledger's tables, their migrations, and how a connection is opened."""

from __future__ import annotations

import sqlite3
from pathlib import Path

__all__ = ["MIGRATIONS", "connect", "migrate"]

# Each entry moves the schema one version forward; never edit one that has shipped.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE tasks (
            id INTEGER PRIMARY KEY,
            task_id TEXT UNIQUE,
            external_task_id TEXT UNIQUE,
            action TEXT,
            callback_ref TEXT,
            status TEXT,
            status_msg TEXT,
            kling_created_at INTEGER,
            kling_updated_at INTEGER,
            state_digest TEXT,
            terminal_source TEXT,
            params TEXT,
            updates INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            archived_at TEXT
        )""",
        "CREATE INDEX tasks_status ON tasks (status, id)",
        "CREATE INDEX tasks_callback_ref ON tasks (callback_ref)",
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            task_pk INTEGER NOT NULL REFERENCES tasks (id),
            source TEXT NOT NULL,
            status TEXT NOT NULL,
            body BLOB NOT NULL,
            digest TEXT NOT NULL,
            headers TEXT NOT NULL,
            remote TEXT,
            received_at TEXT NOT NULL,
            last_received_at TEXT NOT NULL,
            times_received INTEGER NOT NULL DEFAULT 1,
            applied INTEGER NOT NULL,
            UNIQUE (task_pk, source, digest)
        )""",
        """CREATE TABLE assets (
            id INTEGER PRIMARY KEY,
            task_pk INTEGER NOT NULL REFERENCES tasks (id),
            kind TEXT NOT NULL,
            idx INTEGER NOT NULL,
            url TEXT NOT NULL,
            remote_id TEXT,
            state TEXT NOT NULL,
            location TEXT,
            sha256 TEXT,
            size INTEGER,
            content_type TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            error TEXT,
            lease_owner TEXT,
            lease_expires_at TEXT,
            next_attempt_at TEXT,
            stored_at TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            UNIQUE (task_pk, kind, idx)
        )""",
        "CREATE INDEX assets_queue ON assets (state, next_attempt_at)",
    ],
    [
        # Submission through the service, and polling as the fallback for lost callbacks.
        "ALTER TABLE tasks ADD COLUMN submission TEXT",
        "ALTER TABLE tasks ADD COLUMN submit_error TEXT",
        "ALTER TABLE tasks ADD COLUMN idempotency_key TEXT",
        "CREATE UNIQUE INDEX tasks_idempotency_key ON tasks (idempotency_key)",
        "ALTER TABLE tasks ADD COLUMN next_poll_at TEXT",
        "ALTER TABLE tasks ADD COLUMN quiet_polls INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE tasks ADD COLUMN polls INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE tasks ADD COLUMN verifications INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE tasks ADD COLUMN verify_due INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE tasks ADD COLUMN flag TEXT",
        "CREATE INDEX tasks_next_poll ON tasks (next_poll_at)",
    ],
    [
        # `track` on a known task starts polling again: the give-up horizon counts from then.
        "ALTER TABLE tasks ADD COLUMN polls_since TEXT",
    ],
    [
        # Kling's current API standard: the shape each delivery came in, outputs with several
        # files (an audio's mp3 and wav, watermarked copies) told apart by `variant`, image
        # groups, and the account sweep's durable window. SQLite cannot change a UNIQUE
        # constraint in place, so the assets table is rebuilt with `variant` in its key.
        "ALTER TABLE events ADD COLUMN shape TEXT",
        """CREATE TABLE assets_v4 (
            id INTEGER PRIMARY KEY,
            task_pk INTEGER NOT NULL REFERENCES tasks (id),
            kind TEXT NOT NULL,
            idx INTEGER NOT NULL,
            variant TEXT NOT NULL DEFAULT '',
            group_id TEXT,
            url TEXT NOT NULL,
            remote_id TEXT,
            state TEXT NOT NULL,
            location TEXT,
            sha256 TEXT,
            size INTEGER,
            content_type TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            error TEXT,
            lease_owner TEXT,
            lease_expires_at TEXT,
            next_attempt_at TEXT,
            stored_at TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            UNIQUE (task_pk, kind, idx, variant)
        )""",
        """INSERT INTO assets_v4 (id, task_pk, kind, idx, url, remote_id, state, location, sha256,
                                 size, content_type, attempts, error, lease_owner,
                                 lease_expires_at, next_attempt_at, stored_at, created_at,
                                 updated_at)
           SELECT id, task_pk, kind, idx, url, remote_id, state, location, sha256, size,
                  content_type, attempts, error, lease_owner, lease_expires_at, next_attempt_at,
                  stored_at, created_at, updated_at
           FROM assets""",
        "DROP TABLE assets",
        "ALTER TABLE assets_v4 RENAME TO assets",
        "CREATE INDEX assets_queue ON assets (state, next_attempt_at)",
        """CREATE TABLE marks (
            name TEXT PRIMARY KEY,
            value TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )""",
    ],
    [
        """CREATE TABLE turns (
            name TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            until TEXT NOT NULL
        )""",
    ],
    [
        # Outbound events: the outbox, one delivery per event and endpoint, each attempt's log.
        """CREATE TABLE outbox (
            id INTEGER PRIMARY KEY,
            msg_id TEXT NOT NULL UNIQUE,
            type TEXT NOT NULL,
            task_id TEXT,
            body BLOB NOT NULL,
            created_at TEXT NOT NULL
        )""",
        "CREATE INDEX outbox_task ON outbox (task_id, id)",
        "CREATE INDEX outbox_created ON outbox (created_at)",
        """CREATE TABLE event_endpoints (
            url TEXT PRIMARY KEY,
            active INTEGER NOT NULL,
            gone_at TEXT,
            added_at TEXT NOT NULL
        )""",
        """CREATE TABLE event_deliveries (
            id INTEGER PRIMARY KEY,
            event_pk INTEGER NOT NULL REFERENCES outbox (id),
            endpoint TEXT NOT NULL,
            task_id TEXT,
            state TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at TEXT NOT NULL,
            lease_owner TEXT,
            lease_expires_at TEXT,
            last_status INTEGER,
            last_error TEXT,
            delivered_at TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )""",
        "CREATE INDEX event_deliveries_due ON event_deliveries (state, next_attempt_at)",
        "CREATE INDEX event_deliveries_event ON event_deliveries (event_pk)",
        # What keeps one task's events in order at an endpoint: the unsent ones before this.
        """CREATE INDEX event_deliveries_order ON event_deliveries (endpoint, task_id, event_pk)
           WHERE state = 'pending'""",
        """CREATE TABLE event_attempts (
            id INTEGER PRIMARY KEY,
            delivery_pk INTEGER NOT NULL REFERENCES event_deliveries (id),
            at TEXT NOT NULL,
            status INTEGER,
            latency_ms REAL NOT NULL,
            error TEXT,
            response TEXT
        )""",
        "CREATE INDEX event_attempts_delivery ON event_attempts (delivery_pk)",
        # asset.expiring is raised once per file.
        "ALTER TABLE assets ADD COLUMN expiry_warned_at TEXT",
    ],
    [
        # The dashboard's filters and counts, each an index seek rather than a scan.
        "CREATE INDEX tasks_action ON tasks (action, id)",
        "CREATE INDEX tasks_created ON tasks (created_at)",
        "CREATE INDEX tasks_flagged ON tasks (id) WHERE flag IS NOT NULL",
        "CREATE INDEX tasks_learned ON tasks (terminal_source)",
        "CREATE INDEX assets_state ON assets (state, id)",
        "CREATE INDEX events_received ON events (received_at)",
    ],
]


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA foreign_keys = ON")
    # FULL: a delivery acknowledged with 200 survives power loss too; group commit pays for it.
    conn.execute("PRAGMA synchronous = FULL")
    return conn


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema up to date; one process migrates while the others wait."""
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        for number, statements in enumerate(MIGRATIONS[version:], start=version + 1):
            for statement in statements:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number:d}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
