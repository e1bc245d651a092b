//! A damaged store (FAULTS.md 4): say where it is damaged, and on request (`fnx daemon
//! --salvage`) move it aside and copy every row that can still be read into a new store.

use super::{open_writer, StoreError};
use rusqlite::{Connection, ErrorCode, OpenFlags};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Whether `e` says the store file is damaged (not merely busy, full or unwritable).
pub fn is_damage(e: &StoreError) -> bool {
    matches!(e, StoreError::Sqlite(e) if damaged_page(e))
}

/// Where the store at `path` is damaged: every page of its tables' and indexes' trees that is
/// not a valid tree page, with its byte offsets in the file (at most 8 named), found by walking
/// the trees from their roots. The write-ahead log is not read: a clean stop has merged it.
pub fn describe_damage(path: &Path) -> String {
    let roots = || -> rusqlite::Result<Vec<(String, u32)>> {
        let c = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        let mut st = c.prepare("SELECT name, rootpage FROM sqlite_schema WHERE rootpage > 0")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u32>(1)?)))?;
        rows.collect()
    };
    let roots = match roots() {
        Ok(r) => r,
        Err(e) => return format!("its schema cannot be read ({e}): the file header or page 1"),
    };
    // Page by page: the store may be far larger than memory.
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => return format!("it cannot be read: {e}"),
    };
    let mut head = [0u8; 100];
    if let Err(e) = file.read_exact_at(&mut head, 0) {
        return format!("its header cannot be read: {e}");
    }
    let size = page_size(&head);
    let count = file.metadata().map(|m| m.len() / size as u64).unwrap_or(0) as u32;
    let read = |n: u32| {
        let mut buf = vec![0u8; size];
        file.read_exact_at(&mut buf, u64::from(n - 1) * size as u64)
            .ok()
            .map(|()| buf)
    };
    let bad = damaged_pages(read, size, count, &roots);
    if bad.is_empty() {
        return "no tree page is damaged in the file itself (the damage may be in its \
                write-ahead log, or in the rows' own bytes)"
            .to_string();
    }
    let page = size as u64;
    let mut named: Vec<String> = bad
        .iter()
        .take(8)
        .map(|(name, n, why)| match u64::from(*n) {
            n if n == 0 || n > u64::from(count) => format!("{name}: {why}"),
            n => format!(
                "page {n} (bytes {} to {}) of {name}: {why}",
                (n - 1) * page,
                n * page - 1
            ),
        })
        .collect();
    if bad.len() > 8 {
        named.push(format!("and {} more pages", bad.len() - 8));
    }
    named.join("; ")
}

/// A SQLite varint at the start of `b` (big-endian 7-bit groups, the ninth byte whole);
/// `u64::MAX` if `b` ends first.
fn varint(b: &[u8]) -> u64 {
    let mut v = 0u64;
    for (i, &byte) in b.iter().enumerate().take(9) {
        if i == 8 {
            return (v << 8) | u64::from(byte);
        }
        v = (v << 7) | u64::from(byte & 0x7f);
        if byte & 0x80 == 0 {
            return v;
        }
    }
    u64::MAX
}

/// The page size in the file header (bytes 16-17; 1 means 65536).
fn page_size(file: &[u8]) -> usize {
    match file.get(16..18).map(|b| u16::from_be_bytes([b[0], b[1]])) {
        Some(1) => 65536,
        Some(n) if n >= 512 && n.is_power_of_two() => usize::from(n),
        _ => 4096,
    }
}

/// Pages of the trees rooted at `roots` that are not valid tree pages: (tree, page, why).
/// Each page is visited once; a pointer out of the file is a damaged page too.
fn damaged_pages(
    read: impl Fn(u32) -> Option<Vec<u8>>,
    size: usize,
    count: u32,
    roots: &[(String, u32)],
) -> Vec<(String, u32, String)> {
    let file_len = u64::from(count) * size as u64;
    let mut seen = std::collections::HashSet::new();
    let mut bad = Vec::new();
    for (name, root) in roots {
        let mut stack = vec![*root];
        while let Some(n) = stack.pop() {
            if !seen.insert(n) {
                continue;
            }
            if n == 0 || n > count {
                let why = format!("a pointer to page {n}, outside the file's {count} pages");
                bad.push((name.clone(), n, why));
                continue;
            }
            let Some(page) = read(n) else {
                bad.push((name.clone(), n, "it cannot be read".to_string()));
                continue;
            };
            let page = &page[..];
            let h = if n == 1 { 100 } else { 0 };
            let interior = match page[h] {
                0x02 | 0x05 => true,
                0x0a | 0x0d => false,
                other => {
                    bad.push((name.clone(), n, format!("its type byte is {other:#04x}")));
                    continue;
                }
            };
            let cells = usize::from(u16::from_be_bytes([page[h + 3], page[h + 4]]));
            let header = h + if interior { 12 } else { 8 };
            if header + 2 * cells > size {
                bad.push((
                    name.clone(),
                    n,
                    format!("{cells} cells cannot fit the page"),
                ));
                continue;
            }
            if !interior {
                // A leaf's cells start with their payload's length: none may claim more than
                // the whole file (SQLite refuses such a cell without allocating it; the
                // length is named here to find it).
                for c in 0..cells {
                    let at = header + 2 * c;
                    let off = usize::from(u16::from_be_bytes([page[at], page[at + 1]]));
                    if off < header + 2 * cells || off >= size {
                        bad.push((name.clone(), n, format!("cell {c} points outside the page")));
                        break;
                    }
                    let claim = varint(&page[off..]);
                    if claim > file_len {
                        let why = format!("cell {c} claims a payload of {claim} bytes");
                        bad.push((name.clone(), n, why));
                        break;
                    }
                }
                continue;
            }
            let right = u32::from_be_bytes([page[h + 8], page[h + 9], page[h + 10], page[h + 11]]);
            stack.push(right);
            for c in 0..cells {
                let at = header + 2 * c;
                let off = usize::from(u16::from_be_bytes([page[at], page[at + 1]]));
                if off < header + 2 * cells || off + 4 > size {
                    bad.push((name.clone(), n, format!("cell {c} points outside the page")));
                    break;
                }
                stack.push(u32::from_be_bytes([
                    page[off],
                    page[off + 1],
                    page[off + 2],
                    page[off + 3],
                ]));
            }
        }
    }
    bad
}

/// Row ids `first..=last` that could not be read.
pub type Lost = (i64, i64);

/// What a salvage kept and lost of one table.
#[derive(Debug, Default)]
pub struct TableSalvage {
    /// The table.
    pub table: String,
    /// Rows copied.
    pub copied: u64,
    /// Row id ranges that could not be read.
    pub lost: Vec<Lost>,
}

/// What a salvage kept and lost, per table.
#[derive(Debug, Default)]
pub struct Salvaged {
    /// Where the damaged file was moved.
    pub damaged: PathBuf,
    /// Each table's.
    pub tables: Vec<TableSalvage>,
}

impl std::fmt::Display for Salvaged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the damaged store is kept as {}", self.damaged.display())?;
        for TableSalvage {
            table,
            copied,
            lost,
        } in &self.tables
        {
            write!(f, "; {table}: {copied} rows copied")?;
            if !lost.is_empty() {
                let ranges: Vec<String> = lost
                    .iter()
                    .take(20)
                    .map(|(a, b)| {
                        if a == b {
                            a.to_string()
                        } else {
                            format!("{a}-{b}")
                        }
                    })
                    .collect();
                let more = if lost.len() > 20 { ", ..." } else { "" };
                write!(f, ", unreadable rowids {}{more}", ranges.join(", "))?;
            }
        }
        Ok(())
    }
}

/// The tables copied, parents first.
const TABLES: [&str; 6] = [
    "daemon",
    "users",
    "tokens",
    "functions",
    "idempotency",
    "tasks",
];

/// Rows copied per statement before a failing range is split.
const CHUNK: i64 = 4096;

/// Add rowids `a..=b` to the lost ranges (merged with the last one when adjacent).
fn note_lost(lost: &mut Vec<Lost>, a: i64, b: i64) {
    match lost.last_mut() {
        Some(last) if last.1.saturating_add(1) >= a => last.1 = last.1.max(b),
        _ => lost.push((a, b)),
    }
}

/// Copy every readable row of every table of the store at `path` into a new store, then move
/// the damaged one aside (with its write-ahead log) and the new one into its place. Rows on
/// damaged pages are lost and reported.
pub fn salvage(path: &Path) -> Result<Salvaged, StoreError> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "fnx.db".into());
    let beside = |suffix: &str| path.with_file_name(format!("{name}{suffix}"));
    let with_ext = |p: &Path, ext: &str| PathBuf::from(format!("{}{ext}", p.display()));
    let damaged = beside(&format!(".damaged-{stamp}"));
    // Built beside the damaged store, which stays in place until the copy is complete: a
    // salvage that fails leaves everything as it was.
    let fresh = beside(".salvage");
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(with_ext(&fresh, ext));
    }
    let mut out = Salvaged {
        damaged: damaged.clone(),
        tables: Vec::new(),
    };
    {
        let conn = open_writer(&fresh, true)?;
        conn.execute("ATTACH DATABASE ?1 AS old", [read_only_uri(path)])?;
        for table in TABLES {
            let (copied, lost) = copy_table(&conn, table)?;
            out.tables.push(TableSalvage {
                table: table.to_string(),
                copied,
                lost,
            });
        }
        conn.execute("DETACH DATABASE old", [])?;
        conn.pragma_update(None, "wal_checkpoint", "TRUNCATE")?;
    }
    let rename = |from: &Path, to: &Path| -> Result<(), StoreError> {
        match std::fs::rename(from, to) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::Unavailable(format!(
                "cannot move {} to {}: {e}",
                from.display(),
                to.display()
            ))),
        }
    };
    for ext in ["", "-wal", "-shm"] {
        rename(&with_ext(path, ext), &with_ext(&damaged, ext))?;
    }
    let _ = std::fs::remove_file(with_ext(&fresh, "-shm"));
    rename(&with_ext(&fresh, "-wal"), &with_ext(path, "-wal"))?;
    rename(&fresh, path)?;
    Ok(out)
}

/// A read-only SQLite URI for `path` (`%`, `?` and `#` escaped).
fn read_only_uri(path: &Path) -> String {
    let mut uri = String::from("file:");
    for c in path.display().to_string().chars() {
        match c {
            '%' => uri.push_str("%25"),
            '?' => uri.push_str("%3f"),
            '#' => uri.push_str("%23"),
            c => uri.push(c),
        }
    }
    uri.push_str("?mode=ro");
    uri
}

/// The columns `table` has in both stores, in the new store's order.
fn common_columns(conn: &Connection, table: &str) -> rusqlite::Result<Vec<String>> {
    let names = |schema: &str| -> rusqlite::Result<Vec<String>> {
        let mut st = conn.prepare(&format!("PRAGMA {schema}.table_info({table})"))?;
        let rows = st.query_map([], |r| r.get::<_, String>(1))?;
        rows.collect()
    };
    let old = names("old")?;
    Ok(names("main")?
        .into_iter()
        .filter(|c| old.contains(c))
        .collect())
}

/// Most failed statements one table's copy may run: a tree damaged near its root fails every
/// range, and splitting each down to single rows must not run for ever.
const MAX_FAILURES: u64 = 1_000_000;

/// Whether SQLite says the page it read is damaged.
pub fn damaged_page(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if matches!(f.code, ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase))
}

/// Copy what can be read of `table`: rows copied, and rowid ranges that could not be read.
/// An error other than damage (the new store's disk is full) ends the salvage.
fn copy_table(conn: &Connection, table: &str) -> rusqlite::Result<(u64, Vec<Lost>)> {
    let cols = match common_columns(conn, table) {
        Ok(c) => c,
        Err(e) if damaged_page(&e) => return Ok((0, vec![(i64::MIN, i64::MAX)])),
        Err(e) => return Err(e),
    };
    if cols.is_empty() {
        return Ok((0, Vec::new()));
    }
    let cols = cols.join(", ");
    let bounds = conn.query_row(
        &format!("SELECT min(rowid), max(rowid) FROM old.{table}"),
        [],
        |r| Ok((r.get::<_, Option<i64>>(0)?, r.get::<_, Option<i64>>(1)?)),
    );
    // The bounds come from the two ends of the table's tree: copied in chunks between them,
    // jumping over ids no row has (ids skip far ahead after a loss). If either end is
    // unreadable, all ids at once, the failing ranges split in halves.
    let (mut next, hi) = match bounds {
        Ok((Some(lo), Some(hi))) => (Some(lo), hi),
        Ok(_) => return Ok((0, Vec::new())),
        Err(e) if damaged_page(&e) => (Some(i64::MIN), i64::MAX),
        Err(e) => return Err(e),
    };
    let whole = next == Some(i64::MIN);
    let sql = format!(
        "INSERT OR IGNORE INTO main.{table}({cols}) SELECT {cols} FROM old.{table}
         WHERE rowid BETWEEN ?1 AND ?2"
    );
    let after = format!("SELECT min(rowid) FROM old.{table} WHERE rowid > ?1");
    let mut copied = 0u64;
    let mut lost: Vec<Lost> = Vec::new();
    let mut failures = 0u64;
    while let Some(a) = next.filter(|&a| a <= hi) {
        let b = if whole {
            hi
        } else {
            a.saturating_add(CHUNK - 1).min(hi)
        };
        // Lowest range on top; a failing one is split in two until single rows.
        let mut todo = vec![(a, b)];
        while let Some((x, y)) = todo.pop() {
            if failures > MAX_FAILURES {
                note_lost(&mut lost, x, y);
                continue;
            }
            match conn.execute(&sql, [x, y]) {
                Ok(n) => copied += n as u64,
                Err(e) if !damaged_page(&e) => return Err(e),
                Err(_) if x == y => {
                    failures += 1;
                    note_lost(&mut lost, x, x);
                }
                Err(_) => {
                    failures += 1;
                    let mid = (i128::from(x) + i128::from(y)).div_euclid(2) as i64;
                    todo.push((mid + 1, y));
                    todo.push((x, mid));
                }
            }
        }
        next = if b >= hi {
            None
        } else {
            match conn.query_row(&after, [b], |r| r.get::<_, Option<i64>>(0)) {
                Ok(n) => n,
                Err(_) => Some(b + 1),
            }
        };
    }
    Ok((copied, lost))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_decode_as_sqlite_writes_them() {
        assert_eq!(varint(&[0x05]), 5);
        assert_eq!(varint(&[0x87, 0x68]), 1000);
        // 2^40: six bytes.
        assert_eq!(varint(&[0xa0, 0x80, 0x80, 0x80, 0x80, 0x00]), 1 << 40);
        assert_eq!(varint(&[0xff; 9]), u64::MAX);
        assert_eq!(varint(&[0x81]), u64::MAX, "cut short");
    }
}
