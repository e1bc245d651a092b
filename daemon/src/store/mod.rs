//! The durable store: one SQLite file in WAL mode.
//!
//! - [`writer`]: the only thread that writes. It takes commands from a channel, runs everything
//!   that has arrived as one transaction (group commit), and answers submits only after the
//!   commit; then hands the new tasks to the interchanges (persist, then dispatch).
//! - [`Reader`]: a small pool of read connections for the API; WAL readers never block the
//!   writer.
//!
//! Task states are small integers in the `state` column, see [`State`].

pub mod inputs;
pub mod salvage;
mod tokens;
mod txn;
pub mod writer;

pub use tokens::{create_token, ensure_user, list_tokens, revoke_token, user_count, TokenInfo};

use crate::records::{FunctionRow, TaskRow};
use fnx_interchange::NewTask;
use fnx_protocol::{Attempt, Encoding, FunctionId, Outcome, Payload, TaskId};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;
use thiserror::Error;

/// The schema version this build writes; older stores are migrated on open.
pub const SCHEMA_VERSION: i64 = 7;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS users(
    name TEXT PRIMARY KEY, admin INTEGER NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS tokens(
    hash TEXT PRIMARY KEY, user TEXT NOT NULL, created REAL NOT NULL, expires REAL, revoked REAL,
    admin INTEGER);
CREATE TABLE IF NOT EXISTS functions(
    id INTEGER PRIMARY KEY, owner TEXT NOT NULL, name TEXT NOT NULL, kind TEXT NOT NULL,
    spec TEXT NOT NULL, created REAL NOT NULL, deleted INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS tasks(
    id INTEGER PRIMARY KEY, owner TEXT NOT NULL, function INTEGER NOT NULL, pool TEXT NOT NULL,
    priority INTEGER NOT NULL, walltime_ms INTEGER, retries INTEGER NOT NULL,
    encoding INTEGER NOT NULL, args BLOB NOT NULL, state INTEGER NOT NULL,
    attempt INTEGER NOT NULL, submitted REAL NOT NULL, seq INTEGER, outcome BLOB,
    finished REAL, fetched REAL, files BLOB, crashes INTEGER NOT NULL DEFAULT 0,
    memory_mb INTEGER, started INTEGER);
CREATE INDEX IF NOT EXISTS tasks_live ON tasks(state) WHERE state < 2;
CREATE INDEX IF NOT EXISTS tasks_done ON tasks(owner, seq) WHERE seq IS NOT NULL;
CREATE TABLE IF NOT EXISTS daemon(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS idempotency(
    owner TEXT NOT NULL, key TEXT NOT NULL, ids BLOB NOT NULL, created REAL NOT NULL,
    fingerprint TEXT, PRIMARY KEY(owner, key));
";

/// What brings a store of the version before each one up to it (tables that are new come from
/// `SCHEMA` itself).
const MIGRATIONS: [(i64, &str); 6] = [
    // 2: input files.
    (2, "ALTER TABLE tasks ADD COLUMN files BLOB"),
    // 3: token expiry and revocation.
    (
        3,
        "ALTER TABLE tokens ADD COLUMN expires REAL; ALTER TABLE tokens ADD COLUMN revoked REAL",
    ),
    // 4: admin rights move from the user to each token (older tokens keep their user's: NULL).
    (4, "ALTER TABLE tokens ADD COLUMN admin INTEGER"),
    // 5: idempotency keys remember a hash of their request (FAULTS.md 34).
    (5, "ALTER TABLE idempotency ADD COLUMN fingerprint TEXT"),
    // 6: daemon crashes each running task has seen in a row (FAULTS.md 32).
    (
        6,
        "ALTER TABLE tasks ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0",
    ),
    // 7: a task's own memory limit; the attempt that last started on its manager (a daemon
    // crash counts against a task only if it had started, not if it waited in a manager's
    // queue).
    (
        7,
        "ALTER TABLE tasks ADD COLUMN memory_mb INTEGER;
         ALTER TABLE tasks ADD COLUMN started INTEGER",
    ),
];

/// Whether the last daemon crashed: it was ready (see [`mark_running`]) and never stopped in
/// order. Then every task that was running goes back to queued (it is dispatched again, and a
/// crash before that does not count against it), and each whose attempt had started (not one
/// waiting in a manager's queue) has seen one more crash; `Ok` holds how many of each. A daemon
/// that fails to start never marks the store, so its failures count for nothing.
pub fn crash_check(conn: &Connection) -> Result<Option<(usize, usize)>, StoreError> {
    let crashed = conn
        .query_row("SELECT value FROM daemon WHERE key = 'running'", [], |r| {
            r.get::<_, i64>(0)
        })
        .optional()?
        == Some(1);
    if !crashed {
        return Ok(None);
    }
    let tx = conn.unchecked_transaction()?;
    let started: i64 = tx.query_row(
        "SELECT count(*) FROM tasks WHERE state = 1 AND started = attempt",
        [],
        |r| r.get(0),
    )?;
    // Only an attempt that had started counts; one that waited in a manager's queue did not
    // run, so it cannot be what crashed the daemon.
    let running = tx.execute(
        "UPDATE tasks SET crashes = crashes + coalesce(started = attempt, 0), state = 0
         WHERE state = 1",
        [],
    )?;
    tx.execute("UPDATE daemon SET value = 0 WHERE key = 'running'", [])?;
    tx.commit()?;
    Ok(Some((running, started as usize)))
}

/// Mark the store as in use by a daemon that is ready: a crash from now on is counted.
pub fn mark_running(conn: &Connection) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO daemon(key, value) VALUES ('running', 1)
         ON CONFLICT(key) DO UPDATE SET value = 1",
        [],
    )?;
    Ok(())
}

/// Mark the store as left by a daemon that stopped in order: crashes are counted in a row,
/// so the tasks' counts start again.
pub fn mark_stopped(conn: &Connection) -> Result<(), StoreError> {
    let tx = conn.unchecked_transaction()?;
    tx.execute("UPDATE tasks SET crashes = 0 WHERE crashes > 0", [])?;
    tx.execute("UPDATE daemon SET value = 0 WHERE key = 'running'", [])?;
    tx.commit()?;
    Ok(())
}

/// A task's state as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Waiting for dispatch.
    Queued = 0,
    /// Handed to a manager.
    Running = 1,
    /// Finished with a result.
    Success = 2,
    /// Finished with an error.
    Failed = 3,
    /// Cancelled.
    Cancelled = 4,
}

impl State {
    /// From the stored integer (None: not a state's code; the store is damaged).
    pub fn from_i64(v: i64) -> Option<State> {
        match v {
            0 => Some(State::Queued),
            1 => Some(State::Running),
            2 => Some(State::Success),
            3 => Some(State::Failed),
            4 => Some(State::Cancelled),
            _ => None,
        }
    }

    /// The API's state.
    pub fn api(self) -> fnx_api::TaskState {
        match self {
            State::Queued => fnx_api::TaskState::Queued,
            State::Running => fnx_api::TaskState::Running,
            State::Success => fnx_api::TaskState::Success,
            State::Failed => fnx_api::TaskState::Failed,
            State::Cancelled => fnx_api::TaskState::Cancelled,
        }
    }

    /// The API's name.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Running => "running",
            State::Success => "success",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
        }
    }

    /// The state an outcome puts a task in.
    pub fn of(outcome: &Outcome) -> State {
        match outcome {
            Outcome::Ok(_) => State::Success,
            Outcome::Err(e) if e.kind == fnx_protocol::ErrorKind::Cancelled => State::Cancelled,
            Outcome::Err(_) => State::Failed,
        }
    }

    /// Success, failed or cancelled.
    pub fn is_terminal(self) -> bool {
        self as i64 >= 2
    }
}

/// A store operation failed.
#[derive(Debug, Error)]
pub enum StoreError {
    /// SQLite reported an error (I/O, full disk, corruption, ...).
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The store file is from a newer fnx.
    #[error(
        "{path} has schema version {found}; this fnx handles up to {SCHEMA_VERSION}: upgrade fnx"
    )]
    TooNew {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: i64,
    },
    /// A record could not be encoded for the store.
    #[error("cannot encode a record for the store: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    /// A record could not be written as JSON.
    #[error("cannot encode a record for the store: {0}")]
    Json(#[from] serde_json::Error),
    /// The store cannot commit (disk full, size limit, I/O error); nothing was accepted.
    #[error("{0}")]
    Unavailable(String),
    /// The user's unfinished tasks would exceed their limit.
    #[error("{user} has {live} unfinished tasks; {more} more would exceed the limit of {limit} (limits.max_queued_per_user)")]
    QueueLimit {
        /// The user.
        user: String,
        /// Unfinished tasks now.
        live: u64,
        /// Tasks in the request.
        more: u64,
        /// The limit.
        limit: u64,
    },
    /// The bytes of the user's unfinished tasks would exceed their quota.
    #[error(
        "{user}'s unfinished tasks hold {} MiB of arguments and files; {} MiB more would exceed \
         the quota of {} MiB (limits.max_queued_mb_per_user)",
        live.div_ceil(1 << 20), more.div_ceil(1 << 20), limit >> 20
    )]
    ByteQuota {
        /// The user.
        user: String,
        /// Bytes of their unfinished tasks now.
        live: u64,
        /// Bytes in the request.
        more: u64,
        /// The quota.
        limit: u64,
    },
    /// An idempotency key was used before with another request.
    #[error(
        "Idempotency-Key {key:?} was used before with another request; nothing was created \
         (use a new key for a new request)"
    )]
    IdempotencyConflict {
        /// The key.
        key: String,
    },
    /// The writer thread is gone (the daemon is stopping).
    #[error("the store is shutting down")]
    Closed,
}

/// Seconds since the Unix epoch.
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Open (creating if needed) the store at `path` for writing, and bring its schema up to date.
pub fn open_writer(path: &Path, full_sync: bool) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(
        None,
        "synchronous",
        if full_sync { "FULL" } else { "NORMAL" },
    )?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    conn.pragma_update(None, "cache_size", -65536)?; // 64 MiB
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found: version,
        });
    }
    let existed: bool = conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'tasks'",
        [],
        |r| r.get::<_, i64>(0),
    )? > 0;
    if existed {
        for (to, sql) in MIGRATIONS.iter().filter(|(to, _)| version < *to) {
            tracing::info!(
                "migrating the task store {} to schema version {to}",
                path.display()
            );
            conn.execute_batch(sql)?;
        }
    }
    conn.execute_batch(SCHEMA)?;
    conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    Ok(conn)
}

/// Look at the write-ahead log before SQLite opens it: a log whose length is not a whole number
/// of frames ends in a torn or foreign tail, which SQLite drops silently (with the last commit
/// in it, if that commit was torn). `Some` describes it with its byte offset.
pub fn wal_damage(db: &Path) -> Option<String> {
    let wal = PathBuf::from(format!("{}-wal", db.display()));
    let len = std::fs::metadata(&wal).ok()?.len();
    if len == 0 {
        return None;
    }
    let mut head = [0u8; 32];
    let read = std::fs::File::open(&wal).and_then(|mut f| {
        use std::io::Read;
        f.read_exact(&mut head)
    });
    if read.is_err() {
        return Some(format!(
            "{}: {len} bytes, shorter than a log header; ignored from offset 0",
            wal.display()
        ));
    }
    let page = u32::from_be_bytes([head[8], head[9], head[10], head[11]]) as u64;
    let frame = 24 + if page == 1 { 65536 } else { page };
    if !(512..=65536).contains(&page) && page != 1 {
        return Some(format!(
            "{}: not a log header (page size {page})",
            wal.display()
        ));
    }
    let tail = (len - 32) % frame;
    (tail != 0).then(|| {
        format!(
            "{}: {tail} bytes at offset {} are not a whole log frame (a torn or foreign tail); \
             the last commit in the log may be lost",
            wal.display(),
            len - tail
        )
    })
}

/// Read connections for the API.
pub struct Reader {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

/// A read connection borrowed from the [`Reader`]; returned when dropped.
pub struct ReadConn<'a> {
    conn: Option<Connection>,
    reader: &'a Reader,
}

impl std::ops::Deref for ReadConn<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn.as_ref().expect("present until drop")
    }
}

impl Drop for ReadConn<'_> {
    fn drop(&mut self) {
        if let (Some(c), Ok(mut idle)) = (self.conn.take(), self.reader.idle.lock()) {
            if idle.len() < 8 {
                idle.push(c);
            }
        }
    }
}

/// The outcome a task shows when its stored row is damaged: the row stays readable (one
/// damaged row must not stop its owner's results), and says what is wrong with it.
fn damaged_outcome(why: String) -> Outcome {
    Outcome::Err(fnx_protocol::TaskError::new(
        fnx_protocol::ErrorKind::Exception,
        "DamagedRecord",
        format!("{why}; the task store was damaged (see `fnx daemon --salvage`)"),
    ))
}

fn row_task(r: &rusqlite::Row<'_>) -> rusqlite::Result<TaskRow> {
    let outcome: Option<Vec<u8>> = r.get(9)?;
    let code: i64 = r.get(4)?;
    let decoded = outcome.map(|b| {
        rmp_serde::from_slice::<Outcome>(&b)
            .unwrap_or_else(|e| damaged_outcome(format!("its stored outcome does not decode: {e}")))
    });
    let (state, outcome) = match State::from_i64(code) {
        Some(s) => (s, decoded),
        None => (
            State::Failed,
            Some(damaged_outcome(format!(
                "its stored state {code} is not one"
            ))),
        ),
    };
    Ok(TaskRow {
        id: TaskId(r.get::<_, i64>(0)? as u64),
        owner: r.get(1)?,
        function: FunctionId(r.get::<_, i64>(2)? as u64),
        pool: r.get(3)?,
        state,
        attempt: Attempt(r.get::<_, i64>(5)? as u32),
        submitted: r.get(6)?,
        finished: r.get(7)?,
        seq: r.get::<_, Option<i64>>(8)?.map(|s| s as u64),
        outcome,
        omitted: false,
    })
}

const TASK_COLUMNS: &str =
    "id, owner, function, pool, state, attempt, submitted, finished, seq, outcome";

impl Reader {
    /// Read connections to the store at `path` (which the writer has created).
    pub fn new(path: &Path) -> Reader {
        Reader {
            path: path.to_path_buf(),
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Borrow a connection.
    pub fn get(&self) -> Result<ReadConn<'_>, StoreError> {
        let pooled = self.idle.lock().ok().and_then(|mut v| v.pop());
        let conn = match pooled {
            Some(c) => c,
            None => {
                let c = Connection::open_with_flags(
                    &self.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                c.busy_timeout(Duration::from_secs(5))?;
                c
            }
        };
        Ok(ReadConn {
            conn: Some(conn),
            reader: self,
        })
    }

    /// The user and admin flag of a live token (not revoked, not expired) by its hash.
    pub fn token_user(&self, hash: &str) -> Result<Option<(String, bool)>, StoreError> {
        let c = self.get()?;
        Ok(c.query_row(
            "SELECT u.name, COALESCE(t.admin, u.admin) FROM tokens t JOIN users u ON u.name = t.user
             WHERE t.hash = ?1 AND t.revoked IS NULL AND (t.expires IS NULL OR t.expires > ?2)",
            params![hash, now()],
            |r| Ok((r.get(0)?, r.get::<_, i64>(1)? != 0)),
        )
        .optional()?)
    }

    /// Tokens (of `user`, or everyone's).
    pub fn tokens(&self, user: Option<&str>) -> Result<Vec<TokenInfo>, StoreError> {
        let c = self.get()?;
        list_tokens(&c, user)
    }

    /// The user and admin flag of a user, if it exists.
    pub fn user(&self, name: &str) -> Result<Option<bool>, StoreError> {
        let c = self.get()?;
        Ok(
            c.query_row("SELECT admin FROM users WHERE name = ?1", [name], |r| {
                Ok(r.get::<_, i64>(0)? != 0)
            })
            .optional()?,
        )
    }

    /// One task.
    pub fn task(&self, id: TaskId) -> Result<Option<TaskRow>, StoreError> {
        let c = self.get()?;
        let mut st =
            c.prepare_cached(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?1"))?;
        Ok(st.query_row([id.0 as i64], row_task).optional()?)
    }

    /// Many tasks (missing ones are left out).
    pub fn tasks(&self, ids: &[TaskId]) -> Result<Vec<TaskRow>, StoreError> {
        self.tasks_within(ids, u64::MAX)
    }

    /// Tasks by id, with outcomes until they add up to `max_bytes` (the first is always
    /// whole); later outcomes are not read and their rows say `omitted`.
    pub fn tasks_within(&self, ids: &[TaskId], max_bytes: u64) -> Result<Vec<TaskRow>, StoreError> {
        let c = self.get()?;
        // The outcome only if it fits what is left; its length (from the record header) always.
        let mut st = c.prepare_cached(
            "SELECT id, owner, function, pool, state, attempt, submitted, finished, seq,
                    CASE WHEN length(outcome) <= ?2 THEN outcome END, length(outcome)
             FROM tasks WHERE id = ?1",
        )?;
        let mut out = Vec::with_capacity(ids.len().min(10_000));
        let mut left = max_bytes;
        for id in ids {
            let room = if out.is_empty() {
                i64::MAX
            } else {
                left.min(i64::MAX as u64) as i64
            };
            let row = st
                .query_row(params![id.0 as i64, room], |r| {
                    let len: Option<i64> = r.get(10)?;
                    let mut t = row_task(r)?;
                    t.omitted = len.is_some() && r.get_ref(9)?.as_blob_or_null()?.is_none();
                    Ok((t, len.unwrap_or(0) as u64))
                })
                .optional()?;
            if let Some((t, len)) = row {
                if !t.omitted {
                    left = left.saturating_sub(len);
                }
                out.push(t);
            }
        }
        Ok(out)
    }

    /// A user's finished tasks with `seq > since`, in completion order: at most `limit`, and
    /// outcomes adding up to about `max_bytes` (at least one task; the page ends before the
    /// task that would pass the limit, and the next page starts with it).
    pub fn results(
        &self,
        owner: &str,
        since: u64,
        limit: usize,
        max_bytes: u64,
    ) -> Result<Vec<TaskRow>, StoreError> {
        let c = self.get()?;
        // First the sizes (record headers only), then the rows that fit.
        let mut sizes = c.prepare_cached(
            "SELECT seq, length(outcome) FROM tasks WHERE owner = ?1 AND seq > ?2
             ORDER BY seq LIMIT ?3",
        )?;
        let mut last = None;
        let mut total = 0u64;
        let mut rows = sizes.query(params![owner, since as i64, limit as i64])?;
        while let Some(r) = rows.next()? {
            let seq: i64 = r.get(0)?;
            total += r.get::<_, Option<i64>>(1)?.unwrap_or(0) as u64;
            if last.is_some() && total > max_bytes {
                break;
            }
            last = Some(seq);
        }
        drop(rows);
        let Some(last) = last else {
            return Ok(Vec::new());
        };
        let mut st = c.prepare_cached(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE owner = ?1 AND seq > ?2 AND seq <= ?3
             ORDER BY seq"
        ))?;
        let rows = st.query_map(params![owner, since as i64, last], row_task)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// One function.
    pub fn function(&self, id: FunctionId) -> Result<Option<FunctionRow>, StoreError> {
        let c = self.get()?;
        Ok(c.query_row(
            "SELECT id, owner, spec, created, deleted, kind, name FROM functions WHERE id = ?1",
            [id.0 as i64],
            row_function,
        )
        .optional()?)
    }

    /// The size of one owner's function records, not deleted.
    pub fn function_bytes(&self, owner: &str) -> Result<u64, StoreError> {
        let c = self.get()?;
        let n: Option<i64> = c.query_row(
            "SELECT sum(length(spec)) FROM functions WHERE owner = ?1 AND deleted = 0",
            [owner],
            |r| r.get(0),
        )?;
        Ok(n.unwrap_or(0) as u64)
    }

    /// Functions of one owner (None: everyone's), not deleted.
    pub fn functions(&self, owner: Option<&str>) -> Result<Vec<FunctionRow>, StoreError> {
        let c = self.get()?;
        let mut st = c.prepare(
            "SELECT id, owner, spec, created, deleted, kind, name FROM functions
             WHERE deleted = 0 AND (?1 IS NULL OR owner = ?1) ORDER BY id",
        )?;
        let rows = st.query_map([owner], row_function)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The size of the store file and its write-ahead log, in bytes.
    pub fn size_bytes(&self) -> u64 {
        let wal = PathBuf::from(format!("{}-wal", self.path.display()));
        [&self.path, &wal]
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }
}

fn row_function(r: &rusqlite::Row<'_>) -> rusqlite::Result<FunctionRow> {
    let spec: String = r.get(2)?;
    // A record that does not decode keeps its id, owner, kind and name (their own columns):
    // it can be listed, shown and deleted, and its tasks are refused naming the damage.
    let (spec, damaged) = match serde_json::from_str(&spec) {
        Ok(spec) => (spec, None),
        Err(e) => {
            let kind = serde_json::from_value(serde_json::Value::String(r.get(5)?))
                .unwrap_or(fnx_api::FunctionKind::Python);
            (
                fnx_api::FunctionSpec::unreadable(kind, r.get(6)?),
                Some(format!("its stored record does not decode: {e}")),
            )
        }
    };
    Ok(FunctionRow {
        id: FunctionId(r.get::<_, i64>(0)? as u64),
        owner: r.get(1)?,
        spec,
        damaged,
        created: r.get(3)?,
        deleted: r.get::<_, i64>(4)? != 0,
    })
}

/// A task to hand to an interchange again after a restart.
pub struct Recovered {
    /// The task, as the interchange takes it (with its last recorded attempt: 0 if never
    /// dispatched).
    pub task: NewTask,
    /// Its owner.
    pub owner: String,
    /// Its pool.
    pub pool: String,
    /// It was running when the daemon stopped.
    pub was_running: bool,
    /// Daemon crashes in a row it was running in.
    pub crashes: u32,
}

/// Every unfinished task, in id order. Inputs larger than `spill_bytes` stay in the store (the
/// task comes back marked [`NewTask::stored`]; see [`inputs`]).
pub fn unfinished(conn: &Connection, spill_bytes: u64) -> Result<Vec<Recovered>, StoreError> {
    let mut st = conn.prepare(
        "SELECT id, owner, pool, function, encoding,
                CASE WHEN length(args) + coalesce(length(files), 0) > ?1 THEN NULL ELSE args END,
                priority, walltime_ms, retries, attempt, state,
                CASE WHEN length(args) + coalesce(length(files), 0) > ?1 THEN NULL ELSE files END,
                crashes, length(args) + coalesce(length(files), 0), memory_mb
         FROM tasks WHERE state < 2 ORDER BY id",
    )?;
    let rows = st.query_map(params![spill_bytes.min(i64::MAX as u64) as i64], |r| {
        let encoding = encoding_from(r.get(4)?);
        let files = match r.get::<_, Option<Vec<u8>>>(11)? {
            None => Some(Vec::new()),
            Some(blob) => rmp_serde::from_slice(&blob).ok(),
        };
        // Inputs that are large, or that do not decode, stay in the store: the task reads
        // them at dispatch, and a damaged row then fails its task alone, naming the damage.
        let args = match (r.get::<_, Option<Vec<u8>>>(5)?, encoding, files) {
            (Some(data), Some(encoding), Some(files)) => Some((Payload { encoding, data }, files)),
            _ => None,
        };
        let stored = args.is_none().then(|| r.get::<_, i64>(13)).transpose()?;
        let (args, files) = args.unwrap_or_else(|| (Payload::json(Vec::new()), Vec::new()));
        Ok(Recovered {
            task: NewTask {
                id: TaskId(r.get::<_, i64>(0)? as u64),
                function: FunctionId(r.get::<_, i64>(3)? as u64),
                args,
                priority: r.get(6)?,
                walltime_ms: r.get::<_, Option<i64>>(7)?.map(|w| w as u64),
                retries: r.get::<_, i64>(8)? as u32,
                attempt: Attempt(r.get::<_, i64>(9)? as u32),
                files,
                stored: stored.map(|n| n.max(0) as u64),
                memory_mb: r
                    .get::<_, Option<i64>>(14)?
                    .map(|m| m.clamp(1, u32::MAX as i64) as u32),
            },
            owner: r.get(1)?,
            pool: r.get(2)?,
            was_running: r.get::<_, i64>(10)? == 1,
            crashes: r.get::<_, i64>(12)? as u32,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Every function, deleted or not (tasks submitted before a delete still run).
pub fn all_functions(conn: &Connection) -> Result<Vec<FunctionRow>, StoreError> {
    let mut st =
        conn.prepare("SELECT id, owner, spec, created, deleted, kind, name FROM functions")?;
    let rows = st.query_map([], row_function)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The stored integer of an encoding.
pub fn encoding_code(e: Encoding) -> i64 {
    match e {
        Encoding::Json => 0,
        Encoding::Pickle => 1,
    }
}

/// The encoding of a stored code (None: not one; the row is damaged).
fn encoding_from(v: i64) -> Option<Encoding> {
    match v {
        0 => Some(Encoding::Json),
        1 => Some(Encoding::Pickle),
        _ => None,
    }
}

impl rusqlite::types::FromSql for State {
    fn column_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<State> {
        let code = i64::column_result(v)?;
        State::from_i64(code).ok_or(rusqlite::types::FromSqlError::OutOfRange(code))
    }
}

#[cfg(test)]
mod tests;
