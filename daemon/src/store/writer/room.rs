//! Whether the store takes new work: the writer's answer when a commit fails because the
//! store is full (its filesystem, or `store.max_size_mb`), and when it may say yes again.

use super::Writer;
use crate::store::StoreError;

/// Free bytes below which the store counts as full (its filesystem, or `store.max_size_mb`).
const ROOM: u64 = 1 << 20;

/// SQLite could not grow the store: its filesystem is full, or it reached `max_page_count`.
pub(super) fn is_full(e: &StoreError) -> bool {
    matches!(e, StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, _))
        if f.code == rusqlite::ErrorCode::DiskFull)
}

impl Writer {
    pub(super) fn describe(&self, e: &StoreError) -> String {
        match (is_full(e), self.cfg.max_size_bytes) {
            (true, Some(max)) if !self.disk_nearly_full() => format!(
                "the task store reached its size limit of {} MiB (store.max_size_mb); results are pruned after they are fetched",
                max >> 20
            ),
            (true, _) => format!("the filesystem holding the task store is full: {e}"),
            _ => format!("the task store cannot commit: {e}"),
        }
    }

    /// The filesystem holding the store has less than [`ROOM`] free (so a "full" error is the
    /// disk's, not the configured size limit's).
    fn disk_nearly_full(&self) -> bool {
        self.disk_free().is_some_and(|free| free < ROOM)
    }

    /// Free bytes, for an unprivileged user, of the filesystem holding the store.
    fn disk_free(&self) -> Option<u64> {
        let path = self.conn.path()?;
        let dir = std::path::Path::new(path)
            .parent()
            .unwrap_or(std::path::Path::new("/"));
        let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
        // SAFETY: statvfs writes only into the struct it is given; the path is NUL-terminated.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return None;
        }
        Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
    }

    /// The store can grow by `need` bytes again after it was full (by at least [`ROOM`]): the
    /// filesystem has that much free, and so has the store below `store.max_size_mb` (pages left
    /// under the limit, plus free pages inside the file; at least a sixteenth of the limit).
    /// Unknown counts as room: a probe that cannot read the filesystem must not hold the store
    /// unavailable forever.
    pub(super) fn has_room(&self, need: u64) -> bool {
        if self.disk_free().is_some_and(|free| free < need.max(ROOM)) {
            return false;
        }
        let Some(max_bytes) = self.cfg.max_size_bytes else {
            return true;
        };
        let pragma = |name: &str| -> Option<u64> {
            self.conn
                .query_row(&format!("PRAGMA {name}"), [], |r| r.get::<_, i64>(0))
                .ok()
                .and_then(|n| u64::try_from(n).ok())
        };
        let (Some(size), Some(count), Some(max), Some(free)) = (
            pragma("page_size"),
            pragma("page_count"),
            pragma("max_page_count"),
            pragma("freelist_count"),
        ) else {
            return true;
        };
        (max.saturating_sub(count) + free).saturating_mul(size)
            >= need.max(ROOM.min(max_bytes / 16))
    }

    pub(super) fn unavailable(&self) -> bool {
        self.shared
            .stats
            .lock()
            .expect("stats")
            .unavailable
            .is_some()
    }

    pub(super) fn mark_available(&mut self) {
        self.full = None;
        if self
            .shared
            .stats
            .lock()
            .expect("stats")
            .unavailable
            .take()
            .is_some()
        {
            tracing::info!("the store commits again");
        }
    }

    /// After a commit succeeded: whether the store takes new work again. A store that failed
    /// because it was full is available again when new tasks committed, or when it has room
    /// for what was refused: a retried commit of a few dispatch records, or a registration,
    /// fits where the submit that failed did not, and must not turn health green while every
    /// submit still fails.
    pub(super) fn available_again(&self, new_tasks: bool) -> bool {
        match self.full {
            None => true,
            Some(need) => new_tasks || self.has_room(need),
        }
    }
}
