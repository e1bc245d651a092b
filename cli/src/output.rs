//! Result lines, their order, the progress bar and the summary.

use fnx_protocol::{Encoding, ErrorKind, Outcome, TaskError};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Write;
use std::time::{Duration, Instant};

/// An error as written in output lines and on the API, fields in this order.
#[derive(serde::Serialize)]
pub struct ErrorJson<'a> {
    kind: &'static str,
    #[serde(rename = "type")]
    type_name: &'a str,
    message: &'a str,
    traceback: Option<&'a str>,
}

impl<'a> From<&'a TaskError> for ErrorJson<'a> {
    fn from(e: &'a TaskError) -> Self {
        ErrorJson {
            kind: e.kind.as_str(),
            type_name: &e.type_name,
            message: &e.message,
            traceback: e.traceback.as_deref(),
        }
    }
}

#[derive(serde::Serialize)]
struct ErrorLine<'a> {
    index: u64,
    ok: bool,
    error: ErrorJson<'a>,
}

/// The output line of a task (without newline); the kind if it failed.
pub fn result_line(index: u64, outcome: &Outcome) -> (String, Option<ErrorKind>) {
    match outcome {
        Outcome::Ok(p) if p.encoding == Encoding::Json && valid_json(&p.data) => {
            let mut line = String::with_capacity(p.data.len() + 40);
            line.push_str(r#"{"index":"#);
            line.push_str(&index.to_string());
            line.push_str(r#","ok":true,"result":"#);
            line.push_str(std::str::from_utf8(&p.data).expect("checked as JSON"));
            line.push('}');
            (line, None)
        }
        Outcome::Ok(p) => {
            let e = TaskError::new(
                ErrorKind::NotSerializable,
                "NotSerializable",
                format!(
                    "the result ({} bytes, {}) cannot be written as JSON",
                    p.data.len(),
                    p.encoding.as_str()
                ),
            );
            error_line(index, &e)
        }
        Outcome::Err(e) => error_line(index, e),
    }
}

fn valid_json(data: &[u8]) -> bool {
    std::str::from_utf8(data).is_ok()
        && serde_json::from_slice::<serde::de::IgnoredAny>(data).is_ok()
}

/// The output line of a failed task.
pub fn error_line(index: u64, e: &TaskError) -> (String, Option<ErrorKind>) {
    let line = serde_json::to_string(&ErrorLine {
        index,
        ok: false,
        error: e.into(),
    })
    .expect("strings serialize");
    (line, Some(e.kind))
}

/// Writes result lines in completion order, or in input order with `ordered`.
pub struct ResultWriter {
    out: Box<dyn Write>,
    ordered: bool,
    order: VecDeque<u64>,
    pending: HashMap<u64, String>,
    last_flush: Instant,
}

impl ResultWriter {
    /// A writer over `out`.
    pub fn new(out: Box<dyn Write>, ordered: bool) -> Self {
        ResultWriter {
            out,
            ordered,
            order: VecDeque::new(),
            pending: HashMap::new(),
            last_flush: Instant::now(),
        }
    }

    /// In ordered mode, announce that `index` will produce a line (in input order).
    pub fn expect(&mut self, index: u64) {
        if self.ordered {
            self.order.push_back(index);
        }
    }

    /// Write (or hold back, in ordered mode) a task's line.
    pub fn write(&mut self, index: u64, line: String) -> std::io::Result<()> {
        if !self.ordered {
            self.out.write_all(line.as_bytes())?;
            return self.out.write_all(b"\n");
        }
        self.pending.insert(index, line);
        while let Some(front) = self.order.front() {
            let Some(line) = self.pending.remove(front) else {
                break;
            };
            self.order.pop_front();
            self.out.write_all(line.as_bytes())?;
            self.out.write_all(b"\n")?;
        }
        Ok(())
    }

    /// Lines held back waiting for an earlier line (ordered mode).
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Flush if some time has passed (so a reader of a pipe sees results as they come).
    pub fn maybe_flush(&mut self) -> std::io::Result<()> {
        if self.last_flush.elapsed() >= Duration::from_millis(100) {
            self.last_flush = Instant::now();
            self.out.flush()?;
        }
        Ok(())
    }

    /// Flush now.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Counts of outcomes.
#[derive(Default)]
pub struct Tally {
    /// Succeeded tasks.
    pub ok: u64,
    /// Failed tasks by kind.
    pub failed: BTreeMap<&'static str, u64>,
}

impl Tally {
    /// Count one outcome.
    pub fn add(&mut self, kind: Option<ErrorKind>) {
        match kind {
            None => self.ok += 1,
            Some(k) => *self.failed.entry(k.as_str()).or_default() += 1,
        }
    }

    /// Failed tasks.
    pub fn failures(&self) -> u64 {
        self.failed.values().sum()
    }

    /// Finished tasks.
    pub fn done(&self) -> u64 {
        self.ok + self.failures()
    }

    /// One line: `10000 tasks: 9998 succeeded, 2 failed (1 exception, 1 walltime) in 3.2s (3100 tasks/s)`.
    pub fn summary(&self, elapsed: Duration) -> String {
        let secs = elapsed.as_secs_f64();
        let rate = if secs > 0.0 {
            self.done() as f64 / secs
        } else {
            0.0
        };
        let mut s = format!(
            "{} tasks: {} succeeded, {} failed",
            self.done(),
            self.ok,
            self.failures()
        );
        if !self.failed.is_empty() {
            let kinds: Vec<String> = self
                .failed
                .iter()
                .map(|(k, n)| format!("{n} {k}"))
                .collect();
            s.push_str(&format!(" ({})", kinds.join(", ")));
        }
        s.push_str(&format!(" in {secs:.2}s ({rate:.0} tasks/s)"));
        s
    }
}

/// A one-line progress bar on stderr.
pub struct Progress {
    enabled: bool,
    started: Instant,
    last: Option<Instant>,
}

impl Progress {
    /// A bar that draws only if `enabled`.
    pub fn new(enabled: bool) -> Self {
        Progress {
            enabled,
            started: Instant::now(),
            last: None,
        }
    }

    /// Redraw at most every 100 ms.
    pub fn draw(&mut self, tally: &Tally, total: Option<u64>, force: bool) {
        if !self.enabled {
            return;
        }
        if !force
            && self
                .last
                .is_some_and(|t| t.elapsed() < Duration::from_millis(100))
        {
            return;
        }
        self.last = Some(Instant::now());
        let done = tally.done();
        let secs = self.started.elapsed().as_secs_f64();
        let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
        let (bar, eta) = match total {
            Some(total) if total > 0 => {
                let frac = done as f64 / total as f64;
                let filled = (frac * 30.0).round() as usize;
                let eta = if rate > 0.0 {
                    format!("{:.0}s", (total - done.min(total)) as f64 / rate)
                } else {
                    "?".into()
                };
                (
                    format!(
                        "[{}{}] {done}/{total}",
                        "#".repeat(filled.min(30)),
                        ".".repeat(30 - filled.min(30))
                    ),
                    eta,
                )
            }
            _ => (format!("{done}/?"), "?".into()),
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[K{bar}  {} failed  {rate:.0} tasks/s  ETA {eta}",
            tally.failures()
        );
        let _ = err.flush();
    }

    /// Clear the bar's line.
    pub fn clear(&self) {
        if self.enabled {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fnx_protocol::Payload;
    use std::sync::{Arc, Mutex};

    #[test]
    fn lines_splice_json_results_and_describe_errors() {
        let (line, kind) = result_line(
            3,
            &Outcome::Ok(Payload::json("123456789012345678901234567890")),
        );
        assert_eq!(
            line,
            r#"{"index":3,"ok":true,"result":123456789012345678901234567890}"#
        );
        assert_eq!(kind, None);
        let (line, kind) = result_line(4, &Outcome::Ok(Payload::json("nope{")));
        assert!(line.contains(r#""kind":"not_serializable""#), "{line}");
        assert_eq!(kind, Some(ErrorKind::NotSerializable));
        let e = TaskError::new(ErrorKind::Walltime, "WalltimeExceeded", "late");
        assert_eq!(
            error_line(5, &e).0,
            r#"{"index":5,"ok":false,"error":{"kind":"walltime","type":"WalltimeExceeded","message":"late","traceback":null}}"#
        );
    }

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn ordered_mode_holds_lines_until_their_turn() {
        let buf = Shared::default();
        let mut w = ResultWriter::new(Box::new(buf.clone()), true);
        for i in [0, 1, 2] {
            w.expect(i);
        }
        w.write(2, "c".into()).unwrap();
        w.write(1, "b".into()).unwrap();
        assert!(buf.0.lock().unwrap().is_empty());
        w.write(0, "a".into()).unwrap();
        assert_eq!(
            String::from_utf8(buf.0.lock().unwrap().clone()).unwrap(),
            "a\nb\nc\n"
        );
    }
}
