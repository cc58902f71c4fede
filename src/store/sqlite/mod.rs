//! The SQLite store: users in one local file, durable without any external service.
//!
//! - WAL mode with `synchronous=FULL`: a committed flush survives a crash or power loss, and a
//!   crash at any moment leaves a file that opens clean (an unfinished flush is rolled back).
//! - The sync engine writes; a flush is one transaction holding only the users that changed.
//!   Counted requests are added to the stored count, and the transaction records the batch's
//!   number, so a retried batch is never added twice, a crash never counts a request twice,
//!   and during a graceful upgrade the old and the new process's counts add up.
//! - Others may write the file too (the other process of a graceful upgrade, an operator's
//!   `sqlite3`): the engine's once-a-second check reads every user again when
//!   `PRAGMA data_version` on the writer connection moved, and a flush merges only the fields
//!   this process changed into the stored row (`rows.rs`), so an edit not read back yet is
//!   kept.
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

use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
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
use crate::users::{Change, User, UserCache};
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
    #[error("{path}: cannot create the file: {source}")]
    CreateFile {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path}: the database file was moved, deleted or replaced while tollgate ran; changes \
         stay queued here until the file is back at this path (or restart tollgate to load \
         the file now there)"
    )]
    Replaced { path: String },
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
            Self::CreateDir { .. }
            | Self::CreateFile { .. }
            | Self::Replaced { .. }
            | Self::ReadOnly { .. } => false,
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

/// Opens the file read-write, checks and migrates its schema, and sets the pragmas. Only
/// [`SqliteStore::open`] may create it: a file that disappears later (moved, deleted, a
/// restore in progress) must not come back empty and swallow the next writes.
fn connect(path: &Path, create: bool) -> Result<Connection, SqliteError> {
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
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

/// The flush connection, and what it knows of other connections' commits.
struct Writer {
    conn: Connection,
    /// `PRAGMA data_version` when the cache last took every user from the file. It changes
    /// when another connection commits (an operator's `sqlite3`, another tollgate), never for
    /// this connection's own flushes; it means nothing on another connection.
    read_at: Option<i64>,
}

/// The writer connection, and the one it replaced after an error: that one, still open,
/// tells whether anyone wrote the file before the new one started counting.
#[derive(Default)]
struct WriterSlot {
    current: Option<Writer>,
    retired: Option<Writer>,
    /// A writer connection was made in this process before.
    connected: bool,
    /// Start-up's read of every user is too old to be the first connection's baseline (see
    /// [`StoreBackend::startup_read_may_be_stale`]).
    startup_read_stale: bool,
}

fn data_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA data_version", [], |r| r.get(0))
}

/// The flush connection: also forgets writers that stopped long ago. A reconnection takes
/// over what `retired` knew when nobody wrote the file since; otherwise the cache is read
/// again once. The process's first connection (the engine makes it as it starts) takes
/// start-up's read of every user as its baseline: an edit by another client in the moment
/// between the two is not seen until the file changes again, where a second full read at
/// every start would cost an instance of a million users about 8 s of CPU and 1 GB of memory.
/// Not so when that read may be stale (the new process of a graceful upgrade, which waited for
/// the hand-over since): `first` is false then, and the first check reads every user again.
fn connect_writer(
    path: &Path,
    retired: Option<&Writer>,
    first: bool,
) -> Result<Writer, SqliteError> {
    let conn = connect(path, false)?;
    let version =
        data_version(&conn).map_err(|e| SqliteError::sqlite_on(&conn, path, "cannot read", e))?;
    // Before this connection's first commit (the prune), which the old one would count.
    let read_at = if first {
        Some(version)
    } else {
        retired
            .filter(|old| old.read_at.is_some() && data_version(&old.conn).ok() == old.read_at)
            .map(|_| version)
    };
    conn.execute(PRUNE, [now_ms() as i64 - FLUSHES_KEPT_MS])
        .map_err(|e| SqliteError::sqlite_on(&conn, path, "cannot write", e))?;
    Ok(Writer { conn, read_at })
}

/// Below this many rows one thread decodes them all.
const ROWS_PER_LOAD_THREAD: usize = 100_000;
/// Decoding users is most of start-up; it is spread over up to this many threads.
const MAX_LOAD_THREADS: usize = 4;
/// Rows handed to a decoding thread at a time.
const LOAD_CHUNK_ROWS: usize = 4_096;

/// Other writers' newest batch numbers (the `flushes` table) as of a read of the users: a
/// writer missing from it, or with a newer batch, has changed the file since.
type WriterSeqs = HashMap<String, i64>;

fn read_writers(conn: &Connection, own: &str) -> rusqlite::Result<WriterSeqs> {
    let mut stmt = conn.prepare_cached("SELECT writer, seq FROM flushes WHERE writer <> ?1")?;
    let rows = stmt.query_map([own], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// Whether `now` shows a batch that `seen` did not (writers that disappeared were pruned).
fn written_since(seen: &WriterSeqs, now: &WriterSeqs) -> bool {
    now.iter()
        .any(|(writer, seq)| seen.get(writer).is_none_or(|s| seq > s))
}

/// Every user in the file, and the other writers' batches the read includes.
fn load(path: &Path, own: &str) -> Result<(Vec<User>, WriterSeqs), SqliteError> {
    load_with(path, own, ROWS_PER_LOAD_THREAD)
}

/// One read transaction, so the users are one consistent state of the file even while
/// another process writes it (the old process during a graceful upgrade). Reading the rows
/// is fast; decoding each user's JSON is the cost, so large files are decoded on several
/// threads while this one reads.
fn load_with(
    path: &Path,
    own: &str,
    rows_per_thread: usize,
) -> Result<(Vec<User>, WriterSeqs), SqliteError> {
    let mut conn = connect(path, false)?;
    let read_err =
        |conn: &Connection, e| SqliteError::sqlite_on(conn, path, "cannot read users", e);
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Deferred)
        .map_err(|e| SqliteError::sqlite(path, "cannot read users", e))?;
    let count: i64 = tx
        .query_row("SELECT count(*) FROM users", [], |r| r.get(0))
        .map_err(|e| read_err(&tx, e))?;
    let writers = read_writers(&tx, own).map_err(|e| read_err(&tx, e))?;
    let count = usize::try_from(count).unwrap_or(0);
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(MAX_LOAD_THREADS)
        .min(count / rows_per_thread.max(1))
        .max(1);
    let mut stmt = tx
        .prepare("SELECT rowid, token, prompt_count, last_used_at, doc FROM users")
        .map_err(|e| read_err(&tx, e))?;
    let mut rows = stmt.query([]).map_err(|e| read_err(&tx, e))?;
    let mut next_row = || -> Result<Option<RawRow>, SqliteError> {
        match rows.next() {
            Ok(Some(row)) => RawRow::read(row, path).map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(SqliteError::sqlite(path, "cannot read users", e)),
        }
    };
    if threads == 1 {
        let mut users = Vec::with_capacity(count);
        while let Some(raw) = next_row()? {
            users.push(raw.decode(path)?);
        }
        return Ok((users, writers));
    }
    let (send, receive) = std::sync::mpsc::sync_channel::<Vec<RawRow>>(threads * 2);
    let receive = Mutex::new(receive);
    let users = std::thread::scope(|scope| {
        let decoders: Vec<_> = (0..threads)
            .map(|_| {
                let receive = &receive;
                scope.spawn(move || {
                    let mut users = Vec::with_capacity(count / threads + LOAD_CHUNK_ROWS);
                    // The lock is held only to take a chunk; a closed channel ends the loop.
                    while let Ok(chunk) = receive.lock().recv() {
                        for raw in chunk {
                            users.push(raw.decode(path)?);
                        }
                    }
                    Ok::<_, SqliteError>(users)
                })
            })
            .collect();
        let mut read = || -> Result<(), SqliteError> {
            let mut chunk = Vec::with_capacity(LOAD_CHUNK_ROWS);
            while let Some(raw) = next_row()? {
                chunk.push(raw);
                if chunk.len() == LOAD_CHUNK_ROWS {
                    let full = std::mem::replace(&mut chunk, Vec::with_capacity(LOAD_CHUNK_ROWS));
                    if send.send(full).is_err() {
                        return Ok(()); // every decoder stopped at a bad row: its error follows
                    }
                }
            }
            let _ = send.send(chunk);
            Ok(())
        };
        let read = read();
        drop(send);
        let mut parts = Vec::with_capacity(threads);
        for decoder in decoders {
            parts.push(decoder.join().expect("a load thread panicked")?);
        }
        read?;
        Ok::<_, SqliteError>(parts)
    })?;
    // Growing the first part reallocates in place (a large allocation is remapped, not
    // copied); only the other parts are moved.
    let total: usize = users.iter().map(Vec::len).sum();
    let mut parts = users.into_iter();
    let mut users = parts.next().unwrap_or_default();
    users.reserve_exact(total - users.len());
    for part in parts {
        users.extend(part);
    }
    Ok((users, writers))
}

/// The stored value of each of `tokens`, in order (`None`: no row).
fn read_users(
    conn: &Connection,
    path: &Path,
    tokens: &[Arc<str>],
) -> Result<Vec<Option<User>>, SqliteError> {
    let read_err = |e| SqliteError::sqlite_on(conn, path, "cannot read users", e);
    let mut stmt = conn
        .prepare_cached(
            "SELECT rowid, token, prompt_count, last_used_at, doc FROM users WHERE token = ?1",
        )
        .map_err(read_err)?;
    let mut users = Vec::with_capacity(tokens.len());
    for token in tokens {
        let mut rows = stmt.query([token.as_ref()]).map_err(read_err)?;
        let user = match rows.next().map_err(read_err)? {
            Some(row) => Some(RawRow::read(row, path)?.decode(path)?),
            None => None,
        };
        users.push(user);
    }
    Ok(users)
}

/// A row as stored, read on the loading thread and decoded on another.
struct RawRow {
    rowid: i64,
    token: String,
    prompt_count: i64,
    last_used_at: Option<i64>,
    doc: String,
}

impl RawRow {
    fn read(row: &rusqlite::Row<'_>, path: &Path) -> Result<Self, SqliteError> {
        let rowid: i64 = row
            .get(0)
            .map_err(|e| SqliteError::sqlite(path, "cannot read users", e))?;
        let bad = |token: Option<&str>, problem: String| SqliteError::BadRow {
            path: path.display().to_string(),
            rowid,
            user: token.map_or_else(|| "?".to_string(), token_id),
            problem,
        };
        let token: String = row.get(1).map_err(|e| bad(None, format!("token: {e}")))?;
        let column = |name: &str, e| bad(Some(&token), format!("{name}: {e}"));
        Ok(Self {
            rowid,
            prompt_count: row.get(2).map_err(|e| column("prompt_count", e))?,
            last_used_at: row.get(3).map_err(|e| column("last_used_at", e))?,
            doc: row.get(4).map_err(|e| column("doc", e))?,
            token,
        })
    }

    fn decode(self, path: &Path) -> Result<User, SqliteError> {
        rows::decode(&self.token, self.prompt_count, self.last_used_at, &self.doc).map_err(
            |problem| SqliteError::BadRow {
                path: path.display().to_string(),
                rowid: self.rowid,
                user: token_id(&self.token),
                problem,
            },
        )
    }
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
/// A user an upsert may create, when its token is not in the file (a bulk import's users).
const CREATE: &str = "INSERT INTO users (token, doc, prompt_count, last_used_at)
     VALUES (?1, ?2, ?3, ?4)
     ON CONFLICT (token) DO NOTHING";
const STORED_DOC: &str = "SELECT doc FROM users WHERE token = ?1";
const SET_DOC: &str = "UPDATE users SET doc = ?2 WHERE token = ?1";
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
                Op::Edit(edit) => write_edit(&tx, edit)?,
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

/// Merges an edit into the row as stored now, in the flush's transaction: fields this
/// process did not change keep what another client wrote, even one not read back yet.
fn write_edit(tx: &rusqlite::Transaction<'_>, edit: &rows::Edit) -> rusqlite::Result<()> {
    let token = &*edit.token;
    let c = &edit.counters;
    if edit.create {
        // One statement for the usual case, a token the file does not hold yet.
        let created = tx.prepare_cached(CREATE)?.execute((
            token,
            &edit.doc,
            c.prompt_count,
            c.last_used_at,
        ))?;
        if created == 1 {
            return Ok(());
        }
    }
    let stored: Option<String> = tx
        .prepare_cached(STORED_DOC)?
        .query_row([token], |r| r.get(0))
        .optional()?;
    // Absent: deleted elsewhere (by hand, or by the other process of an upgrade), and it stays
    // deleted (a user this edit may create was inserted above).
    let Some(stored) = stored else {
        return Ok(());
    };
    let doc = edit.merge_into(&stored).unwrap_or_else(|| edit.doc.clone());
    tx.prepare_cached(SET_DOC)?.execute((token, doc))?;
    tx.prepare_cached(COUNTERS)?.execute((
        token,
        c.prompt_count,
        c.last_used_at,
        c.delta,
        c.absolute,
    ))?;
    Ok(())
}

/// The SQLite backend. Cheap to share; the connection is behind a mutex and only the sync
/// engine writes.
///
/// One sync engine per instance: batches are numbered per engine, and the instance records
/// the newest it wrote under its own random writer id.
pub struct SqliteStore {
    path: PathBuf,
    /// The file's device and inode when it was opened.
    identity: (u64, u64),
    writer_id: Arc<str>,
    writer: Arc<Mutex<WriterSlot>>,
    /// Other writers' batches included in the cache's last full read (`None`: not read yet).
    seen: Arc<Mutex<Option<WriterSeqs>>>,
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
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| SqliteError::CreateDir {
                    path: path.display().to_string(),
                    dir: dir.display().to_string(),
                    source,
                })?;
        }
        create_private(path)?;
        drop(connect(path, true)?);
        let identity = file_identity(path).map_err(|source| SqliteError::CreateFile {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            identity,
            writer_id: uuid::Uuid::new_v4().to_string().into(),
            writer: Arc::new(Mutex::new(WriterSlot::default())),
            seen: Arc::new(Mutex::new(None)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The file holds every user's token in clear text, so a new one is readable by its owner
/// only (SQLite gives its `-wal` and `-shm` files the same mode). An existing file readable
/// by others is reported, not changed: its mode is the operator's choice.
fn create_private(path: &Path) -> Result<(), SqliteError> {
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
    match created {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let mode = std::fs::metadata(path).map_or(0, |m| m.permissions().mode());
            if mode & 0o044 != 0 {
                log::warn!(
                    "{}: other users can read this file (mode {:o}), and it holds every user's \
                     token: `chmod 600` it and its -wal and -shm files",
                    path.display(),
                    mode & 0o777
                );
            }
            Ok(())
        }
        Err(source) => Err(SqliteError::CreateFile {
            path: path.display().to_string(),
            source,
        }),
    }
}

/// Device and inode: which file a path names, to notice it being moved, deleted or replaced.
fn file_identity(path: &Path) -> std::io::Result<(u64, u64)> {
    let meta = std::fs::metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

/// Writes go to the file opened at start-up or nowhere: a connection to a file that was
/// deleted or moved away keeps writing into it, and nobody would ever read that.
fn check_same_file(path: &Path, identity: (u64, u64)) -> Result<(), SqliteError> {
    match file_identity(path) {
        Ok(found) if found == identity => Ok(()),
        _ => Err(SqliteError::Replaced {
            path: path.display().to_string(),
        }),
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

    fn batch_users(&self) -> usize {
        BATCH_USERS
    }

    /// Without a baseline, the first writer connection's check reads every user again.
    fn startup_read_may_be_stale(&self) {
        self.writer.lock().startup_read_stale = true;
    }

    async fn load_all(&self) -> Result<Vec<User>, StoreError> {
        let (path, own, seen) = (
            self.path.clone(),
            Arc::clone(&self.writer_id),
            Arc::clone(&self.seen),
        );
        blocking(move || {
            let (users, writers) = load(&path, &own)?;
            *seen.lock() = Some(writers);
            Ok(users)
        })
        .await
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
        let (path, identity, writer, writer_id, seq) = (
            self.path.clone(),
            self.identity,
            Arc::clone(&self.writer),
            Arc::clone(&self.writer_id),
            batch.seq,
        );
        blocking(move || {
            with_writer(&mut writer.lock(), &path, identity, |w| {
                write(&mut w.conn, &path, &writer_id, seq, &ops)
            })
        })
        .await?;
        Ok(report)
    }

    /// The refused users' rows, read on the writer connection (the file holds them as the last
    /// accepted write left them).
    async fn restore(&self, cache: &UserCache, refused: &[&Change]) -> Result<(), StoreError> {
        let tokens: Vec<Arc<str>> = refused.iter().map(|c| Arc::clone(c.token())).collect();
        let (path, identity, writer) = (self.path.clone(), self.identity, Arc::clone(&self.writer));
        let stored = blocking(move || {
            with_writer(&mut writer.lock(), &path, identity, |w| {
                read_users(&w.conn, &path, &tokens)
            })
        })
        .await?;
        for (change, user) in refused.iter().zip(stored) {
            match user {
                None if change.is_creation() => cache.undo_refused_creation(change.token()),
                user => cache.apply_remote(change.token(), user.as_ref()),
            }
        }
        Ok(())
    }

    async fn reload_if_changed(&self) -> Result<Option<Vec<User>>, StoreError> {
        let (path, identity, writer, own, seen) = (
            self.path.clone(),
            self.identity,
            Arc::clone(&self.writer),
            Arc::clone(&self.writer_id),
            Arc::clone(&self.seen),
        );
        blocking(move || {
            let Some(before) = seen.lock().clone() else {
                return Ok(None);
            };
            // Held through the read: the version must stay that of the connection it is for.
            let mut slot = writer.lock();
            let (changed, version) = with_writer(&mut slot, &path, identity, |w| {
                let read_err = |e| SqliteError::sqlite_on(&w.conn, &path, "cannot read", e);
                let version = data_version(&w.conn).map_err(read_err)?;
                let writers = read_writers(&w.conn, &own).map_err(read_err)?;
                let changed = w.read_at != Some(version) || written_since(&before, &writers);
                Ok((changed, version))
            })?;
            if !changed {
                return Ok(None);
            }
            // Whatever is committed after `version` was read changes it again: read next time.
            let (users, writers) = load(&path, &own)?;
            *seen.lock() = Some(writers);
            if let Some(w) = slot.current.as_mut() {
                w.read_at = Some(version);
            }
            Ok(Some(users))
        })
        .await
    }
}

/// Runs `work` on the writer connection, connecting first if needed, once the path still
/// names the file opened at start-up.
fn with_writer<T>(
    slot: &mut WriterSlot,
    path: &Path,
    identity: (u64, u64),
    work: impl FnOnce(&mut Writer) -> Result<T, SqliteError>,
) -> Result<T, SqliteError> {
    let result = check_same_file(path, identity).and_then(|()| {
        let writer = match slot.current.take() {
            Some(writer) => writer,
            None => {
                let first = !slot.connected && !slot.startup_read_stale;
                let writer = connect_writer(path, slot.retired.as_ref(), first)?;
                slot.connected = true;
                slot.retired = None;
                writer
            }
        };
        work(slot.current.insert(writer))
    });
    if result.is_err() {
        // Reconnect on the next attempt: that re-checks the file from scratch (it may have
        // been repaired or made writable again meanwhile). The old connection is kept until
        // then only to bridge the watch for other writers.
        if let Some(old) = slot.current.take().filter(|w| w.read_at.is_some()) {
            slot.retired = Some(old);
        }
    }
    result
}
