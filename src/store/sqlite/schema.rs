//! The database layout and its versions. `PRAGMA application_id` marks the file as tollgate's;
//! `PRAGMA user_version` is the schema version. A new file runs every step from zero, so a
//! fresh database and a migrated one are the same by construction.
//!
//! Versions:
//! - **v1**: one row per user, `token` and `doc`, the user as the older proxy's JSON.
//! - **v2**: `promptCount` and `lastUsedAt` move out of the document into `prompt_count` and
//!   `last_used_at` columns, and the `flushes` table records each writer's newest batch.
//!   Under traffic nearly every change is "requests were counted": a flush now adds to an
//!   integer instead of re-encoding and rewriting the user's whole document, and increments
//!   from two processes on one file (a graceful upgrade) add up instead of the later process
//!   overwriting the earlier one's count. `flushes` makes a retried batch apply once. The
//!   counters can also be read with plain SQL (`ORDER BY prompt_count`).

use std::path::Path;

use log::info;
use rusqlite::{Connection, TransactionBehavior};

use super::SqliteError;

/// "TlGt": files with another application id are not tollgate's and are left alone.
pub const APPLICATION_ID: i32 = 0x546c_4774;

/// The schema this build writes. Older files are migrated; newer ones are refused.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// `MIGRATIONS[n]` takes a database from version `n` to `n + 1`, in one transaction together
/// with the version bump. Never edit a step that has shipped: add a new one.
const MIGRATIONS: &[&str] = &[
    // 0 → 1: the table.
    "CREATE TABLE users (
         token TEXT NOT NULL PRIMARY KEY,
         doc   TEXT NOT NULL
     ) STRICT;",
    // 1 → 2: counters get their own columns, batches are recorded (see the module comment).
    // `flushes`: one row per tollgate process (a random id per start), its newest batch.
    "ALTER TABLE users ADD COLUMN prompt_count INTEGER NOT NULL DEFAULT 0
         CHECK (prompt_count >= 0);
     ALTER TABLE users ADD COLUMN last_used_at INTEGER;
     UPDATE users SET
         prompt_count = CAST(COALESCE(json_extract(doc, '$.promptCount'), 0) AS INTEGER),
         last_used_at = CAST(json_extract(doc, '$.lastUsedAt') AS INTEGER),
         doc = json_remove(doc, '$.promptCount', '$.lastUsedAt');
     CREATE TABLE flushes (
         writer     TEXT    NOT NULL PRIMARY KEY,
         seq        INTEGER NOT NULL,
         written_at INTEGER NOT NULL
     ) STRICT;",
];

/// What a file is, before anything is written to it.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Found {
    /// No tables, no marks: a new (or empty) file.
    Empty,
    /// tollgate's file at this version.
    Version(u32),
}

/// Reads the marks and refuses files that are not tollgate's or are newer than this build.
/// Reading the header is also where a file that is not SQLite at all is noticed.
pub(super) fn inspect(conn: &Connection, path: &Path) -> Result<Found, SqliteError> {
    let app_id: i32 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(|e| SqliteError::sqlite(path, "cannot read the database header", e))?;
    let version: u32 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| SqliteError::sqlite(path, "cannot read the schema version", e))?;
    let tables: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE name NOT LIKE 'sqlite\\_%' ESCAPE '\\'",
            [],
            |r| r.get(0),
        )
        .map_err(|e| SqliteError::sqlite(path, "cannot read the schema", e))?;
    if app_id == 0 && version == 0 && tables == 0 {
        return Ok(Found::Empty);
    }
    if app_id != APPLICATION_ID || version == 0 {
        return Err(SqliteError::Foreign {
            path: path.display().to_string(),
        });
    }
    if version > SCHEMA_VERSION {
        return Err(SqliteError::TooNew {
            path: path.display().to_string(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(Found::Version(version))
}

/// Brings the file to [`SCHEMA_VERSION`], one transaction per step: a step that fails leaves
/// the file at the version before it.
pub(super) fn migrate(conn: &mut Connection, path: &Path, from: u32) -> Result<(), SqliteError> {
    if from == 0 {
        info!(
            "sqlite store {}: new database, schema version {SCHEMA_VERSION}",
            path.display()
        );
    }
    for version in from..SCHEMA_VERSION {
        // A new file takes every step from zero: that is creation, not a migration.
        if from > 0 {
            info!(
                "sqlite store {}: migrating the schema from version {version} to {}",
                path.display(),
                version + 1
            );
        }
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| SqliteError::sqlite(path, "cannot start the schema migration", e))?;
        // Another tollgate starting on the same file may have taken this step meanwhile.
        let current: u32 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| SqliteError::sqlite(path, "cannot read the schema version", e))?;
        if current > version {
            continue;
        }
        let step = MIGRATIONS[version as usize];
        let context = if version == 0 {
            "cannot create the schema"
        } else {
            "cannot migrate the schema"
        };
        tx.execute_batch(step)
            .map_err(|e| SqliteError::migration(path, version, context, e))?;
        tx.pragma_update(None, "application_id", APPLICATION_ID)
            .and_then(|()| tx.pragma_update(None, "user_version", version + 1))
            .map_err(|e| SqliteError::migration(path, version, context, e))?;
        tx.commit()
            .map_err(|e| SqliteError::migration(path, version, context, e))?;
    }
    Ok(())
}
