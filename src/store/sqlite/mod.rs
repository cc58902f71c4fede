//! The SQLite store: users in one local file, durable without any external service.
//!
//! - WAL mode with `synchronous=FULL`: a committed flush survives a crash or power loss, and a
//!   crash at any moment leaves a file that opens clean (an unfinished flush is rolled back).
//! - The sync engine writes; a flush is one transaction holding only the users that changed.
//!   Counted requests are added to the stored count, and the transaction records the batch's
//!   number, so a retried batch is never added twice, a crash never counts a request twice,
//!   and during a graceful upgrade the old and the new process's counts add up.
//! - The schema is versioned and migrated on start (see `schema.rs`); a file from a newer
//!   tollgate, another application's file, a corrupt, read-only or unwritable one stops
//!   start-up with one line naming the file and the problem.
//! - No connection is open while tollgate starts: the file is checked and migrated, users are
//!   loaded, and each connection is closed again, because Pingora's `-d` forks afterwards and
//!   an SQLite connection must not cross a `fork()`. The writer connects on its first flush.

mod rows;
mod schema;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior, MAIN_DB};

pub use schema::{APPLICATION_ID, SCHEMA_VERSION};

use super::{ApplyReport, Batch, StoreBackend, StoreError};
use crate::clock::now_ms;
use crate::observe::token_id;
use crate::users::User;
use rows::Op;

/// How long a statement waits for a lock held by someone else (a backup, an operator's
/// `sqlite3` shell) before the flush fails and is retried.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Users per flush transaction: a bulk import of 100,000 users is ten commits.
pub const BATCH_USERS: usize = 10_000;
/// The WAL file is cut back to this after a checkpoint, so one big import does not leave a
/// large `-wal` file behind for good.
const JOURNAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// A problem with the database file, always naming it.
#[derive(Debug, thiserror::Error)]
pub enum SqliteError {
    #[error("{path}: cannot create the directory {dir}: {source}")]
    CreateDir {
        path: String,
        dir: String,
        source: std::io::Error,
    },
    #[error(
        "{path}: the file is read-only, and tollgate must write it (check its permissions \
         and owner, and that the file system is mounted read-write)"
    )]
    ReadOnly { path: String },
    #[error("{path}: not a tollgate database (it has other tables or another application id); use a new path")]
    Foreign { path: String },
    #[error(
        "{path}: the database has schema version {found}, newer than this tollgate supports \
         ({supported}); run the newer tollgate that wrote it, or restore a backup"
    )]
    TooNew {
        path: String,
        found: u32,
        supported: u32,
    },
    #[error("{path}: {context}: {problem}")]
    Sqlite {
        path: String,
        context: String,
        problem: String,
        code: Option<ErrorCode>,
    },
    #[error("{path}: row {rowid} (user {user}) cannot be read: {problem}")]
    BadRow {
        path: String,
        rowid: i64,
        user: String,
        problem: String,
    },
}

impl SqliteError {
    fn sqlite(path: &Path, context: impl Into<String>, e: rusqlite::Error) -> Self {
        Self::Sqlite {
            path: path.display().to_string(),
            context: context.into(),
            problem: describe(&e),
            code: e.sqlite_error_code(),
        }
    }

    /// As [`Self::sqlite`], adding the operating system's error behind an I/O failure
    /// ("No space left on device", "File too large", "Read-only file system").
    fn sqlite_on(
        conn: &Connection,
        path: &Path,
        context: impl Into<String>,
        e: rusqlite::Error,
    ) -> Self {
        let mut error = Self::sqlite(path, context, e);
        if let Self::Sqlite {
            problem,
            code: Some(code),
            ..
        } = &mut error
        {
            let io = matches!(
                code,
                ErrorCode::SystemIoFailure
                    | ErrorCode::DiskFull
                    | ErrorCode::CannotOpen
                    | ErrorCode::ReadOnly
                    | ErrorCode::PermissionDenied
            );
            if let Some(os) = os_error(conn).filter(|_| io) {
                problem.push_str(&format!(": {os}"));
            }
        }
        error
    }

    fn migration(path: &Path, from: u32, context: &str, e: rusqlite::Error) -> Self {
        let context = if from == 0 {
            context.to_string()
        } else {
            format!(
                "{context} from version {from} to {} (the file is unchanged, still version {from})",
                from + 1
            )
        };
        Self::sqlite(path, context, e)
    }

    /// Whether a retry cannot help without someone repairing the file.
    fn is_fatal(&self) -> bool {
        match self {
            Self::Foreign { .. } | Self::TooNew { .. } | Self::BadRow { .. } => true,
            Self::Sqlite { code, .. } => matches!(
                code,
                Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
            ),
            Self::CreateDir { .. } | Self::ReadOnly { .. } => false,
        }
    }
}

impl From<SqliteError> for StoreError {
    fn from(e: SqliteError) -> Self {
        if e.is_fatal() {
            StoreError::Fatal(e.to_string())
        } else {
            StoreError::Unavailable(e.to_string())
        }
    }
}

/// The OS error behind the connection's last failed system call, if any.
fn os_error(conn: &Connection) -> Option<std::io::Error> {
    // SAFETY: the handle is valid while `conn` lives; the call only reads an integer.
    let errno = unsafe { rusqlite::ffi::sqlite3_system_errno(conn.handle()) };
    (errno != 0).then(|| std::io::Error::from_raw_os_error(errno))
}

/// SQLite's message, with what it usually means for an operator.
fn describe(e: &rusqlite::Error) -> String {
    let hint = match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => {
            "the file is not an SQLite database, or its header is damaged"
        }
        Some(ErrorCode::DatabaseCorrupt) => {
            "the database is corrupt; restore a backup (see docs/stores.md)"
        }
        Some(ErrorCode::DiskFull) => "the disk is full",
        Some(ErrorCode::ReadOnly) => "the file or its directory is read-only",
        Some(ErrorCode::CannotOpen) => {
            "cannot open the file or create its -wal/-shm files next to it (check that the \
             directory exists and is writable)"
        }
        Some(ErrorCode::PermissionDenied) => "permission denied",
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            "another process holds a lock on the database"
        }
        Some(ErrorCode::SystemIoFailure) => "the operating system refused a read or write",
        _ => "",
    };
    match hint {
        "" => e.to_string(),
        hint => format!("{hint} ({e})"),
    }
}

/// Opens the file read-write, checks and migrates its schema, and sets the pragmas.
fn connect(path: &Path) -> Result<Connection, SqliteError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(path, flags)
        .map_err(|e| SqliteError::sqlite(path, "cannot open", e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| SqliteError::sqlite_on(&conn, path, "cannot configure", e))?;
    let found = schema::inspect(&conn, path)?;
    // SQLite falls back to read-only when the file is write-protected; tollgate must write.
    if conn
        .is_readonly(MAIN_DB)
        .map_err(|e| SqliteError::sqlite_on(&conn, path, "cannot open", e))?
    {
        return Err(SqliteError::ReadOnly {
            path: path.display().to_string(),
        });
    }
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(|e| SqliteError::sqlite_on(&conn, path, "cannot switch to WAL mode", e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(SqliteError::Sqlite {
            path: path.display().to_string(),
            context: "cannot switch to WAL mode".into(),
            problem: format!("the file system does not support it (journal mode stays {mode})"),
            code: None,
        });
    }
    conn.pragma_update(None, "synchronous", "FULL")
        .and_then(|()| conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT))
        .map_err(|e| SqliteError::sqlite_on(&conn, path, "cannot configure", e))?;
    let from = match found {
        schema::Found::Empty => 0,
        schema::Found::Version(v) => v,
    };
    schema::migrate(&mut conn, path, from)?;
    Ok(conn)
}

/// The flush connection: also forgets writers that stopped long ago.
fn connect_writer(path: &Path) -> Result<Connection, SqliteError> {
    let conn = connect(path)?;
    conn.execute(PRUNE, [now_ms() as i64 - FLUSHES_KEPT_MS])
        .map_err(|e| SqliteError::sqlite_on(&conn, path, "cannot write", e))?;
    Ok(conn)
}

/// Below this many rows one thread reads them all.
const ROWS_PER_LOAD_THREAD: i64 = 100_000;
/// Decoding users is most of start-up; it is spread over up to this many threads.
const MAX_LOAD_THREADS: usize = 4;

/// Every user in the file. Large files are read in rowid ranges on several threads, each
/// with its own connection: decoding a million users is CPU work that parallelises well.
fn load(path: &Path) -> Result<Vec<User>, SqliteError> {
    load_in_ranges(path, ROWS_PER_LOAD_THREAD)
}

fn load_in_ranges(path: &Path, rows_per_thread: i64) -> Result<Vec<User>, SqliteError> {
    let conn = connect(path)?;
    let (first, last): (i64, i64) = conn
        .query_row(
            "SELECT coalesce(min(rowid), 0), coalesce(max(rowid), -1) FROM users",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(|e| SqliteError::sqlite_on(&conn, path, "cannot read users", e))?;
    let span = last.saturating_sub(first).saturating_add(1).max(0);
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(MAX_LOAD_THREADS)
        .min(usize::try_from(span / rows_per_thread.max(1)).unwrap_or(1))
        .max(1);
    if threads == 1 {
        let mut users = Vec::with_capacity(usize::try_from(span).unwrap_or(0));
        read_range(&conn, path, first, last, &mut users)?;
        return Ok(users);
    }
    let step = (span + threads as i64 - 1) / threads as i64;
    let parts = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads as i64)
            .map(|i| {
                let from = first + i * step;
                let to = (from + step - 1).min(last);
                scope.spawn(move || {
                    let conn = connect_reader(path)?;
                    let mut users = Vec::with_capacity(usize::try_from(step).unwrap_or(0));
                    read_range(&conn, path, from, to, &mut users)?;
                    Ok::<_, SqliteError>(users)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a load thread panicked"))
            .collect::<Result<Vec<_>, _>>()
    })?;
    // Growing the first part reallocates in place (a large allocation is remapped, not
    // copied); only the other parts are moved.
    let total: usize = parts.iter().map(Vec::len).sum();
    let mut parts = parts.into_iter();
    let mut users = parts.next().unwrap_or_default();
    users.reserve_exact(total - users.len());
    for part in parts {
        users.extend(part);
    }
    Ok(users)
}

/// A second connection for reading, on a file `connect` has already checked.
fn connect_reader(path: &Path) -> Result<Connection, SqliteError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| SqliteError::sqlite(path, "cannot open", e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| SqliteError::sqlite_on(&conn, path, "cannot configure", e))?;
    Ok(conn)
}

/// Decodes the users with `from <= rowid <= to` into `users`.
fn read_range(
    conn: &Connection,
    path: &Path,
    from: i64,
    to: i64,
    users: &mut Vec<User>,
) -> Result<(), SqliteError> {
    let read_err = |e| SqliteError::sqlite_on(conn, path, "cannot read users", e);
    let mut stmt = conn
        .prepare(
            "SELECT rowid, token, prompt_count, last_used_at, doc FROM users
             WHERE rowid BETWEEN ?1 AND ?2",
        )
        .map_err(read_err)?;
    let mut rows = stmt.query([from, to]).map_err(read_err)?;
    while let Some(row) = rows.next().map_err(read_err)? {
        let rowid: i64 = row.get(0).map_err(read_err)?;
        let token = row.get_ref(1).and_then(|v| Ok(v.as_str()?));
        let decoded = token.as_ref().map_err(|e| e.to_string()).and_then(|token| {
            let doc = row
                .get_ref(4)
                .and_then(|v| Ok(v.as_str()?))
                .map_err(|e| format!("doc: {e}"))?;
            let prompt_count = row.get(2).map_err(|e| format!("prompt_count: {e}"))?;
            let last_used_at = row.get(3).map_err(|e| format!("last_used_at: {e}"))?;
            rows::decode(token, prompt_count, last_used_at, doc)
        });
        match decoded {
            Ok(user) => users.push(user),
            Err(problem) => {
                return Err(SqliteError::BadRow {
                    path: path.display().to_string(),
                    rowid,
                    user: token
                        .as_ref()
                        .map(|t| token_id(t))
                        .unwrap_or_else(|_| "?".into()),
                    problem,
                })
            }
        }
    }
    Ok(())
}

const PUT: &str = "INSERT INTO users (token, doc, prompt_count, last_used_at)
     VALUES (?1, ?2, ?3, ?4)
     ON CONFLICT (token) DO UPDATE SET
         doc = excluded.doc,
         prompt_count = CASE WHEN ?6 THEN excluded.prompt_count ELSE prompt_count + ?5 END,
         last_used_at = excluded.last_used_at";
const COUNTERS: &str = "UPDATE users SET
         prompt_count = CASE WHEN ?5 THEN ?2 ELSE prompt_count + ?4 END,
         last_used_at = ?3
     WHERE token = ?1";
const DELETE: &str = "DELETE FROM users WHERE token = ?1";
const WRITTEN: &str = "SELECT seq FROM flushes WHERE writer = ?1";
const RECORD: &str = "INSERT INTO flushes (writer, seq, written_at) VALUES (?1, ?2, ?3)
     ON CONFLICT (writer) DO UPDATE SET seq = excluded.seq, written_at = excluded.written_at";
/// A writer's row only matters while it may retry a batch (seconds); a day is plenty.
const PRUNE: &str = "DELETE FROM flushes WHERE written_at < ?1";
const FLUSHES_KEPT_MS: i64 = 24 * 3600 * 1000;

/// Writes batch `seq` of `writer` in one transaction; nothing is written unless everything
/// is, and a batch already written (a retry after a commit that reported failure) is skipped.
fn write(
    conn: &mut Connection,
    path: &Path,
    writer: &str,
    seq: u64,
    ops: &[Op],
) -> Result<(), SqliteError> {
    write_ops(conn, writer, seq, ops)
        .map_err(|e| SqliteError::sqlite_on(conn, path, "cannot write", e))
}

fn write_ops(conn: &mut Connection, writer: &str, seq: u64, ops: &[Op]) -> rusqlite::Result<()> {
    let seq = i64::try_from(seq).unwrap_or(i64::MAX);
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let written: Option<i64> = tx
        .prepare_cached(WRITTEN)?
        .query_row([writer], |r| r.get(0))
        .optional()?;
    if written.is_some_and(|w| w >= seq) {
        return tx.commit();
    }
    {
        let mut put = tx.prepare_cached(PUT)?;
        let mut counters = tx.prepare_cached(COUNTERS)?;
        let mut delete = tx.prepare_cached(DELETE)?;
        for op in ops {
            match op {
                Op::Put {
                    token,
                    counters: c,
                    doc,
                } => {
                    put.execute((
                        &**token,
                        doc,
                        c.prompt_count,
                        c.last_used_at,
                        c.delta,
                        c.absolute,
                    ))?;
                }
                Op::Counters { token, counters: c } => {
                    // No row: the user was deleted (during a graceful upgrade, by the other
                    // process). Counting its last requests must not bring it back.
                    counters.execute((
                        &**token,
                        c.prompt_count,
                        c.last_used_at,
                        c.delta,
                        c.absolute,
                    ))?;
                }
                Op::Delete { token } => {
                    delete.execute([&**token])?;
                }
            }
        }
    }
    tx.prepare_cached(RECORD)?
        .execute((writer, seq, now_ms() as i64))?;
    tx.commit()
}

/// The SQLite backend. Cheap to share; the connection is behind a mutex and only the sync
/// engine writes.
///
/// One sync engine per instance: batches are numbered per engine, and the instance records
/// the newest it wrote under its own random writer id.
pub struct SqliteStore {
    path: PathBuf,
    writer_id: Arc<str>,
    writer: Arc<Mutex<Option<Connection>>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Creates the directory and the file when missing, checks that the file is tollgate's,
    /// writable and not newer than this build, and migrates it. Blocking; call before the
    /// runtime starts (or from `spawn_blocking`). Keeps no connection open. A relative path
    /// is taken from the current working directory.
    pub fn open(path: &Path) -> Result<Self, SqliteError> {
        // Absolute from here on: messages name the file unambiguously, and Pingora's `-d`
        // changes the working directory when it forks.
        let path = &std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| SqliteError::CreateDir {
                path: path.display().to_string(),
                dir: dir.display().to_string(),
                source,
            })?;
        }
        drop(connect(path)?);
        Ok(Self {
            path: path.to_path_buf(),
            writer_id: uuid::Uuid::new_v4().to_string().into(),
            writer: Arc::new(Mutex::new(None)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Runs blocking database work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SqliteError> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result.map_err(StoreError::from),
        Err(e) => Err(StoreError::Unavailable(format!(
            "the database thread failed: {e}"
        ))),
    }
}

#[async_trait]
impl StoreBackend for SqliteStore {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    async fn load_all(&self) -> Result<Vec<User>, StoreError> {
        let path = self.path.clone();
        blocking(move || load(&path)).await
    }

    async fn apply(&self, batch: &Batch) -> Result<ApplyReport, StoreError> {
        let mut report = ApplyReport::default();
        let mut ops = Vec::with_capacity(batch.changes.len());
        for change in &batch.changes {
            match rows::encode(change) {
                Ok(op) => ops.push(op),
                Err(reason) => report.rejected.push((Arc::clone(change.token()), reason)),
            }
        }
        if ops.is_empty() {
            return Ok(report);
        }
        let (path, writer, writer_id, seq) = (
            self.path.clone(),
            Arc::clone(&self.writer),
            Arc::clone(&self.writer_id),
            batch.seq,
        );
        blocking(move || {
            let mut slot = writer.lock();
            let conn = match slot.as_mut() {
                Some(conn) => conn,
                None => slot.insert(connect_writer(&path)?),
            };
            let result = write(conn, &path, &writer_id, seq, &ops);
            if result.is_err() {
                // Reconnect on the next attempt: that re-checks the file from scratch (it may
                // have been replaced, repaired or made writable again meanwhile).
                *slot = None;
            }
            result
        })
        .await?;
        Ok(report)
    }
}
