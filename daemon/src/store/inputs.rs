//! Large task inputs stay in the store while their tasks wait (`limits.spill_kb`): the
//! interchange holds only the id, the size and the routing key, and reads the arguments and
//! files back here at each dispatch. A queue of 100,000 tasks of 100 KiB then costs the daemon
//! no more memory than a queue of small ones, before and after a restart.

use super::encoding_from;
use fnx_interchange::{Inputs, LoadError, Loader, NewTask};
use fnx_protocol::{FileSource, Payload, TaskFile, TaskId};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use std::path::PathBuf;
use std::time::Duration;

/// The bytes a task's inputs take in memory: its arguments and its inline files.
pub fn input_bytes(args: &Payload, files: &[TaskFile]) -> u64 {
    let inline: usize = files
        .iter()
        .map(|f| match &f.source {
            FileSource::Inline(data) => data.len(),
            FileSource::Path(p) => p.len(),
        })
        .sum();
    (args.data.len() + inline) as u64
}

/// Leave the inputs of a task larger than `spill_bytes` in the store: empty them here and mark
/// the task stored with their size. Returns the bytes freed (0: the task keeps its inputs).
pub fn spill(task: &mut NewTask, spill_bytes: u64) -> u64 {
    let size = input_bytes(&task.args, &task.files);
    if size <= spill_bytes {
        return 0;
    }
    task.args.data = Vec::new();
    task.files = Vec::new();
    task.stored = Some(size);
    size
}

/// Reads stored inputs on the interchange's thread, through its own read-only connection
/// (WAL readers never wait for the writer). The connection opens on first use and again after
/// a failure.
pub struct InputLoader {
    path: PathBuf,
    conn: Option<Connection>,
}

impl InputLoader {
    /// A loader for the store at `path` (which the writer has created).
    pub fn new(path: PathBuf) -> InputLoader {
        InputLoader { path, conn: None }
    }

    fn connection(&mut self) -> rusqlite::Result<&Connection> {
        if self.conn.is_none() {
            let c = Connection::open_with_flags(
                &self.path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            // Short: this runs on the interchange's thread, which answers heartbeats; a store
            // that stays busy fails the read, and the tasks wait for a later dispatch.
            c.busy_timeout(Duration::from_millis(200))?;
            self.conn = Some(c);
        }
        match &self.conn {
            Some(c) => Ok(c),
            None => Err(rusqlite::Error::InvalidQuery),
        }
    }

    fn read(&mut self, ids: &[TaskId]) -> rusqlite::Result<Vec<Result<Inputs, LoadError>>> {
        let conn = self.connection()?;
        let mut st =
            conn.prepare_cached("SELECT encoding, args, files FROM tasks WHERE id = ?1")?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let row = st
                .query_row(params![id.0 as i64], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, Vec<u8>>(1)?,
                        r.get::<_, Option<Vec<u8>>>(2)?,
                    ))
                })
                .optional();
            // Each row on its own: a damaged one fails its task alone; anything else is the
            // store failing for now.
            out.push(match row {
                Err(e) if super::salvage::damaged_page(&e) => {
                    Err(LoadError::Damaged("its row is on a damaged page".into()))
                }
                Err(e) => Err(LoadError::Store(e.to_string())),
                Ok(None) => Err(LoadError::Missing),
                Ok(Some((code, data, files))) => {
                    let encoding = encoding_from(code).ok_or_else(|| {
                        LoadError::Damaged(format!("its stored encoding {code} is not one"))
                    });
                    let files = match files {
                        None => Ok(Vec::new()),
                        Some(blob) => rmp_serde::from_slice(&blob).map_err(|e| {
                            LoadError::Damaged(format!("its stored files do not decode: {e}"))
                        }),
                    };
                    encoding.and_then(|encoding| {
                        files.map(|files| Inputs {
                            args: Payload { encoding, data },
                            files,
                        })
                    })
                }
            });
        }
        Ok(out)
    }
}

impl Loader for InputLoader {
    fn load(&mut self, ids: &[TaskId]) -> Vec<Result<Inputs, LoadError>> {
        match self.read(ids) {
            Ok(out) => out,
            Err(e) => {
                tracing::error!(
                    "cannot read {} task inputs from the store {}: {e}",
                    ids.len(),
                    self.path.display()
                );
                self.conn = None;
                ids.iter()
                    .map(|_| Err(LoadError::Store(e.to_string())))
                    .collect()
            }
        }
    }
}
