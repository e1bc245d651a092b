//! Frames between the manager and its Python workers (docs/design/worker-protocol.md):
//! `u32 L | u32 H | H bytes of JSON header | L-4-H bytes of payload`, big-endian.

use fnx_protocol::{Encoding, ErrorKind, FunctionBody, FunctionId, TaskError, TaskId};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A worker broke the frame protocol.
#[derive(Debug, Error)]
pub enum WireError {
    /// A frame claims more bytes than any allowed message.
    #[error("worker frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Claimed length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// The header is not what the protocol says.
    #[error("bad worker frame header: {0}")]
    BadHeader(String),
}

#[cfg(test)]
fn push_frame_prefix(out: &mut Vec<u8>, header: &[u8], payload_len: usize) {
    let total = 4 + header.len() + payload_len;
    out.extend_from_slice(&(total as u32).to_be_bytes());
    out.extend_from_slice(&(header.len() as u32).to_be_bytes());
    out.extend_from_slice(header);
}

/// The header of a frame from the manager to a worker.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ToWorker<'a> {
    /// Define function `fid` (always before its first task).
    Def {
        /// The function.
        fid: u64,
        /// What it is.
        body: Body<'a>,
    },
    /// Run task `tid` of function `fid`; its arguments, encoded as `enc`, are the payload.
    Task {
        /// The task.
        tid: u64,
        /// Its function.
        fid: u64,
        /// How the arguments are encoded.
        enc: Encoding,
        /// The task's own directory, holding its input files: the call runs there.
        #[serde(skip_serializing_if = "Option::is_none")]
        cwd: Option<String>,
    },
    /// Exit.
    Exit,
}

/// A function as a worker loads it (`kind` and its fields).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Body<'a> {
    /// `module` imported, then `qualname` looked up in it.
    PythonRef {
        /// The module.
        module: &'a str,
        /// The attribute path.
        qualname: &'a str,
    },
    /// A `.py` file loaded as a module, then `name` looked up in it.
    PythonFile {
        /// The file.
        path: &'a str,
        /// The attribute path.
        name: &'a str,
    },
    /// Source text run as a module, then `name` looked up in it.
    PythonSource {
        /// The source.
        source: &'a str,
        /// The attribute path.
        name: &'a str,
    },
    /// A shell template (shell tasks run without a worker; defined for completeness).
    Shell {
        /// The template.
        template: &'a str,
    },
}

impl<'a> From<&'a FunctionBody> for Body<'a> {
    fn from(b: &'a FunctionBody) -> Body<'a> {
        match b {
            FunctionBody::PythonRef { module, qualname } => Body::PythonRef { module, qualname },
            FunctionBody::PythonFile { path, name } => Body::PythonFile { path, name },
            FunctionBody::PythonSource { source, name } => Body::PythonSource { source, name },
            FunctionBody::Shell { template } => Body::Shell { template },
        }
    }
}

impl ToWorker<'_> {
    /// The frame's prefix and header; `payload_len` bytes of payload follow it on the pipe.
    pub fn frame(&self, payload_len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(96);
        out.extend_from_slice(&[0; 8]);
        serde_json::to_writer(&mut out, self).expect("a header serialises to memory");
        let header = out.len() - 8;
        out[..4].copy_from_slice(&((4 + header + payload_len) as u32).to_be_bytes());
        out[4..8].copy_from_slice(&(header as u32).to_be_bytes());
        out
    }
}

/// The frame that defines a function for a worker.
pub fn def_frame(fid: FunctionId, body: &FunctionBody) -> Vec<u8> {
    ToWorker::Def {
        fid: fid.0,
        body: body.into(),
    }
    .frame(0)
}

/// The head of a task frame; the argument bytes follow it on the pipe.
pub fn task_frame_head(
    tid: TaskId,
    fid: FunctionId,
    enc: Encoding,
    args_len: usize,
    cwd: Option<&std::path::Path>,
) -> Vec<u8> {
    ToWorker::Task {
        tid: tid.0,
        fid: fid.0,
        enc,
        cwd: cwd.map(|d| d.display().to_string()),
    }
    .frame(args_len)
}

/// The frame that tells a worker to exit.
pub fn exit_frame() -> Vec<u8> {
    ToWorker::Exit.frame(0)
}

/// The kind of a task's failure as a worker reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerErrorKind {
    /// The function could not be loaded.
    ImportError,
    /// The arguments could not be read or bound.
    BadInput,
    /// The result cannot be encoded.
    NotSerializable,
    /// The result is larger than allowed.
    ResultTooLarge,
    /// The function raised (and any kind this manager does not know, from a newer worker).
    #[serde(other)]
    Exception,
}

/// An error as a worker reports it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct WorkerError {
    /// What failed.
    pub kind: WorkerErrorKind,
    /// The exception's type.
    #[serde(rename = "type")]
    pub type_name: String,
    /// Its message.
    pub message: String,
    /// Its traceback.
    pub traceback: Option<String>,
}

impl WorkerError {
    /// As a protocol error.
    pub fn into_task_error(self) -> TaskError {
        let kind = match self.kind {
            WorkerErrorKind::ImportError => ErrorKind::ImportError,
            WorkerErrorKind::BadInput => ErrorKind::BadInput,
            WorkerErrorKind::NotSerializable => ErrorKind::NotSerializable,
            WorkerErrorKind::ResultTooLarge => ErrorKind::ResultTooLarge,
            WorkerErrorKind::Exception => ErrorKind::Exception,
        };
        TaskError {
            kind,
            type_name: self.type_name,
            message: self.message,
            traceback: self.traceback,
        }
    }
}

/// The header of a frame from a worker.
#[derive(Clone, Debug, PartialEq)]
pub enum FromWorker {
    /// Started and ready for work (its first frame).
    Ready {
        /// Its pid.
        pid: u32,
        /// Its Python version (`3.11.7`).
        python: String,
        /// Its interpreter, resolved (`sys.executable`; None when Python cannot tell, or
        /// the path is not UTF-8).
        executable: Option<String>,
    },
    /// Task `tid` ended: its result's encoding (the payload is the result), or its error.
    Result {
        /// The task.
        tid: TaskId,
        /// How it ended.
        outcome: Result<Encoding, WorkerError>,
    },
}

/// The header as it is on the pipe: every field of every op (decoded without buffering, then
/// checked into a [`FromWorker`]).
#[derive(Deserialize)]
struct RawHeader {
    op: Op,
    tid: Option<u64>,
    ok: Option<bool>,
    enc: Option<Encoding>,
    error: Option<WorkerError>,
    pid: Option<u32>,
    python: Option<String>,
    executable: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Op {
    Ready,
    Result,
}

impl FromWorker {
    /// Decode a header: its op and the fields that op must have.
    pub fn decode(header: &[u8]) -> Result<FromWorker, WireError> {
        let h: RawHeader =
            serde_json::from_slice(header).map_err(|e| WireError::BadHeader(e.to_string()))?;
        let missing = |what: &str| WireError::BadHeader(format!("a {what} without its fields"));
        match h.op {
            Op::Ready => Ok(FromWorker::Ready {
                pid: h.pid.ok_or_else(|| missing("ready"))?,
                python: h.python.ok_or_else(|| missing("ready"))?,
                executable: h.executable,
            }),
            Op::Result => {
                let tid = TaskId(h.tid.ok_or_else(|| missing("result"))?);
                let outcome =
                    match (h.ok, h.enc, h.error) {
                        (Some(true), Some(enc), None) => Ok(enc),
                        (Some(false), None, Some(error)) => Err(error),
                        _ => return Err(WireError::BadHeader(
                            "a result must have ok true with its enc, or ok false with its error"
                                .into(),
                        )),
                    };
                Ok(FromWorker::Result { tid, outcome })
            }
        }
    }
}

/// Splits the byte stream from a worker into frames.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
}

impl FrameReader {
    /// Read everything `fd` (non-blocking) has into the buffer, straight into its spare
    /// capacity (no zero-fill, no bounce buffer); returns `true` at end-of-file.
    pub fn fill_from(&mut self, fd: std::os::fd::RawFd) -> std::io::Result<bool> {
        loop {
            if self.start > 0 && self.start == self.buf.len() {
                self.buf.clear();
                self.start = 0;
            } else if self.start > (1 << 20) {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            let missing = self.missing();
            self.buf.reserve(missing.clamp(64 * 1024, 16 << 20));
            let spare = self.buf.spare_capacity_mut();
            // SAFETY: read(2) writes at most spare.len() bytes into the spare capacity.
            let n = unsafe { libc::read(fd, spare.as_mut_ptr().cast(), spare.len()) };
            if n == 0 {
                return Ok(true);
            }
            if n < 0 {
                let err = std::io::Error::last_os_error();
                match err.kind() {
                    std::io::ErrorKind::WouldBlock => return Ok(false),
                    std::io::ErrorKind::Interrupted => continue,
                    _ => return Err(err),
                }
            }
            // SAFETY: the kernel initialised n bytes past the old length.
            unsafe { self.buf.set_len(self.buf.len() + n as usize) };
        }
    }

    /// Bytes still missing for the frame at the head of the buffer (0 if unknown).
    fn missing(&self) -> usize {
        let avail = &self.buf[self.start..];
        if avail.len() < 4 {
            return 0;
        }
        let total = u32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        (4 + total).saturating_sub(avail.len())
    }

    #[cfg(test)]
    fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete frame, if one is buffered.
    pub fn next_frame(&mut self, max: usize) -> Result<Option<(FromWorker, Vec<u8>)>, WireError> {
        let avail = &self.buf[self.start..];
        if avail.len() < 8 {
            return Ok(None);
        }
        let total = u32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        let hlen = u32::from_be_bytes([avail[4], avail[5], avail[6], avail[7]]) as usize;
        if total > max {
            return Err(WireError::TooLarge { len: total, max });
        }
        if hlen > total.saturating_sub(4) {
            return Err(WireError::BadHeader(format!(
                "header length {hlen} exceeds frame length {total}"
            )));
        }
        if avail.len() < 4 + total {
            return Ok(None);
        }
        let header = FromWorker::decode(&avail[8..8 + hlen])?;
        let payload = avail[8 + hlen..4 + total].to_vec();
        self.start += 4 + total;
        Ok(Some((header, payload)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_split_across_partial_reads() {
        let mut frame = Vec::new();
        push_frame_prefix(
            &mut frame,
            br#"{"op":"result","tid":3,"ok":true,"enc":"json"}"#,
            2,
        );
        frame.extend_from_slice(b"42");
        let mut r = FrameReader::default();
        for chunk in frame.chunks(5) {
            assert!(r.next_frame(1 << 20).unwrap().is_none());
            r.push(chunk);
        }
        let (h, payload) = r.next_frame(1 << 20).unwrap().unwrap();
        assert_eq!(
            (h, payload.as_slice()),
            (
                FromWorker::Result {
                    tid: TaskId(3),
                    outcome: Ok(Encoding::Json)
                },
                &b"42"[..]
            )
        );
        assert!(r.next_frame(1 << 20).unwrap().is_none());
    }

    #[test]
    fn frames_are_read_from_a_pipe_without_a_bounce_buffer() {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two fds, closed below.
        assert_eq!(
            unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK) },
            0
        );
        let mut frame = Vec::new();
        push_frame_prefix(
            &mut frame,
            br#"{"op":"ready","pid":1,"python":"3.12.1","executable":"/usr/bin/python3"}"#,
            0,
        );
        // SAFETY: writing a local buffer to our pipe.
        unsafe { libc::write(fds[1], frame.as_ptr().cast(), frame.len()) };
        let mut r = FrameReader::default();
        assert!(!r.fill_from(fds[0]).unwrap(), "open pipe, no eof");
        assert!(matches!(
            r.next_frame(1 << 20).unwrap().unwrap().0,
            FromWorker::Ready { pid: 1, .. }
        ));
        // SAFETY: closing the fds we opened.
        unsafe { libc::close(fds[1]) };
        assert!(r.fill_from(fds[0]).unwrap(), "eof after close");
        unsafe { libc::close(fds[0]) };
    }

    #[test]
    fn oversized_and_inconsistent_frames_are_errors() {
        let mut r = FrameReader::default();
        r.push(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1]);
        assert!(matches!(
            r.next_frame(1 << 20),
            Err(WireError::TooLarge { .. })
        ));
        let mut r = FrameReader::default();
        r.push(&[0, 0, 0, 8, 0, 0, 0, 9]);
        assert!(matches!(
            r.next_frame(1 << 20),
            Err(WireError::BadHeader(_))
        ));
    }

    /// The frames both sides agree on (`sdk/python/tests/golden/worker_frames.json`, which
    /// the Python worker's tests check too).
    fn golden(direction: &str) -> Vec<(String, Vec<u8>)> {
        let text = include_str!("../../sdk/python/tests/golden/worker_frames.json");
        let doc: serde_json::Value = serde_json::from_str(text).unwrap();
        doc[direction]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                let (header, payload) = (
                    f["header"].as_str().unwrap(),
                    f["payload"].as_str().unwrap(),
                );
                let mut frame = Vec::new();
                push_frame_prefix(&mut frame, header.as_bytes(), payload.len());
                frame.extend_from_slice(payload.as_bytes());
                (f["name"].as_str().unwrap().to_string(), frame)
            })
            .collect()
    }

    #[test]
    fn the_manager_writes_the_golden_frames_byte_for_byte() {
        let source = FunctionBody::PythonSource {
            source: "def double(x):\n    return 2 * x\n".into(),
            name: "double".into(),
        };
        let neg = FunctionBody::PythonRef {
            module: "operator".into(),
            qualname: "neg".into(),
        };
        let with_payload = |mut head: Vec<u8>, payload: &[u8]| {
            head.extend_from_slice(payload);
            head
        };
        let ours: Vec<(&str, Vec<u8>)> = vec![
            ("def_python_source", def_frame(FunctionId(1), &source)),
            ("def_python_ref", def_frame(FunctionId(2), &neg)),
            (
                "task_json",
                with_payload(
                    task_frame_head(TaskId(7), FunctionId(1), Encoding::Json, 4, None),
                    b"[21]",
                ),
            ),
            (
                "task_in_cwd",
                with_payload(
                    task_frame_head(
                        TaskId(8),
                        FunctionId(2),
                        Encoding::Json,
                        3,
                        Some(std::path::Path::new("/")),
                    ),
                    b"[5]",
                ),
            ),
            ("exit", exit_frame()),
        ];
        let golden = golden("manager_to_worker");
        assert_eq!(golden.len(), ours.len());
        for ((name, frame), (our_name, ours)) in golden.iter().zip(&ours) {
            assert_eq!(name, our_name);
            assert_eq!(
                String::from_utf8_lossy(&ours[8..]),
                String::from_utf8_lossy(&frame[8..]),
                "{name}"
            );
            assert_eq!(&ours[..8], &frame[..8], "{name}: the length prefix");
        }
    }

    #[test]
    fn the_golden_frames_of_a_worker_decode_to_their_typed_headers() {
        let mut r = FrameReader::default();
        let golden = golden("worker_to_manager");
        for (_, frame) in &golden {
            r.push(frame);
        }
        let mut got = Vec::new();
        while let Some((h, payload)) = r.next_frame(1 << 20).unwrap() {
            got.push((h, String::from_utf8(payload).unwrap()));
        }
        let ok = |tid, value: &str| {
            (
                FromWorker::Result {
                    tid: TaskId(tid),
                    outcome: Ok(Encoding::Json),
                },
                value.to_string(),
            )
        };
        let want = vec![
            (
                FromWorker::Ready {
                    pid: 4242,
                    python: "3.11.7".into(),
                    executable: Some("/usr/bin/python3".into()),
                },
                String::new(),
            ),
            ok(7, "42"),
            ok(8, "-5"),
            (
                FromWorker::Result {
                    tid: TaskId(9),
                    outcome: Err(WorkerError {
                        kind: WorkerErrorKind::Exception,
                        type_name: "ValueError".into(),
                        message: "boom".into(),
                        traceback: Some(
                            "Traceback (most recent call last):\nValueError: boom\n".into(),
                        ),
                    }),
                },
                String::new(),
            ),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn a_worker_header_missing_its_fields_or_with_an_unknown_op_is_a_protocol_error() {
        for bad in [
            r#"{"op":"hello"}"#,
            r#"{"tid":1,"ok":true,"enc":"json"}"#,
            r#"{"op":"result","tid":1}"#,
            r#"{"op":"result","ok":true,"enc":"json"}"#,
            r#"{"op":"result","tid":1,"ok":true}"#,
            r#"{"op":"result","tid":1,"ok":false}"#,
            r#"{"op":"result","tid":1,"ok":true,"enc":"yaml"}"#,
            r#"{"op":"result","tid":-1,"ok":true,"enc":"json"}"#,
            r#"{"op":"result","tid":1,"ok":true,"enc":"json","error":{"kind":"exception","type":"E","message":"m","traceback":null}}"#,
            r#"{"op":"ready","pid":1,"executable":"/x"}"#,
            r#"["op","ready"]"#,
            "not json",
        ] {
            assert!(
                matches!(
                    FromWorker::decode(bad.as_bytes()),
                    Err(WireError::BadHeader(_))
                ),
                "{bad} was accepted"
            );
        }
    }

    #[test]
    fn a_worker_that_cannot_tell_its_interpreter_is_ready_all_the_same() {
        let h = br#"{"op":"ready","pid":7,"python":"3.12.1","executable":null}"#;
        assert_eq!(
            FromWorker::decode(h).unwrap(),
            FromWorker::Ready {
                pid: 7,
                python: "3.12.1".into(),
                executable: None
            }
        );
    }

    #[test]
    fn an_error_kind_from_a_newer_worker_is_reported_as_an_exception() {
        let h = br#"{"op":"result","tid":1,"ok":false,"error":{"kind":"brand_new","type":"E","message":"m","traceback":null}}"#;
        let FromWorker::Result {
            outcome: Err(e), ..
        } = FromWorker::decode(h).unwrap()
        else {
            panic!("not a failed result")
        };
        assert_eq!(e.into_task_error().kind, ErrorKind::Exception);
    }

    proptest::proptest! {
        /// A worker's bytes are hostile (user code could write to the protocol pipe): any
        /// stream splits into frames or errors, and any header decodes or errors, never a panic.
        #[test]
        fn any_bytes_from_a_worker_decode_or_error(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            split in 0usize..600,
        ) {
            let _ = FromWorker::decode(&bytes);
            let mut r = FrameReader::default();
            let (a, b) = bytes.split_at(split.min(bytes.len()));
            r.push(a);
            while let Ok(Some(_)) = r.next_frame(1 << 20) {}
            r.push(b);
            while let Ok(Some(_)) = r.next_frame(1 << 20) {}
        }

        /// Headers with the right shape but any values decode or error.
        #[test]
        fn any_field_values_in_a_result_header_decode_or_error(
            tid in proptest::prelude::any::<i64>(),
            ok in proptest::prelude::any::<Option<bool>>(),
            enc in "[a-z]{0,8}",
            kind in "[a-z_]{0,16}",
        ) {
            let h = format!(
                r#"{{"op":"result","tid":{tid},"ok":{},"enc":"{enc}","error":{{"kind":"{kind}","type":"T","message":"m","traceback":null}}}}"#,
                ok.map_or("null".to_string(), |b| b.to_string())
            );
            let _ = FromWorker::decode(h.as_bytes());
        }
    }
}
