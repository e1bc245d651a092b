//! Frames between the manager and its Python workers (docs/design/worker-protocol.md):
//! `u32 L | u32 H | H bytes of JSON header | L-4-H bytes of payload`, big-endian.

use fnx_protocol::{Encoding, ErrorKind, FunctionBody, FunctionId, TaskError, TaskId};
use serde::Deserialize;
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

fn push_frame_prefix(out: &mut Vec<u8>, header: &[u8], payload_len: usize) {
    let total = 4 + header.len() + payload_len;
    out.extend_from_slice(&(total as u32).to_be_bytes());
    out.extend_from_slice(&(header.len() as u32).to_be_bytes());
    out.extend_from_slice(header);
}

/// The frame that defines a function for a worker.
pub fn def_frame(fid: FunctionId, body: &FunctionBody) -> Vec<u8> {
    let body = match body {
        FunctionBody::PythonRef { module, qualname } => {
            serde_json::json!({"kind": "python_ref", "module": module, "qualname": qualname})
        }
        FunctionBody::PythonFile { path, name } => {
            serde_json::json!({"kind": "python_file", "path": path, "name": name})
        }
        FunctionBody::PythonSource { source, name } => {
            serde_json::json!({"kind": "python_source", "source": source, "name": name})
        }
        FunctionBody::Shell { template } => {
            serde_json::json!({"kind": "shell", "template": template})
        }
    };
    let header = serde_json::json!({"op": "def", "fid": fid.0, "body": body}).to_string();
    let mut out = Vec::with_capacity(8 + header.len());
    push_frame_prefix(&mut out, header.as_bytes(), 0);
    out
}

/// The head of a task frame; the argument bytes follow it on the pipe.
pub fn task_frame_head(
    tid: TaskId,
    fid: FunctionId,
    enc: Encoding,
    args_len: usize,
    cwd: Option<&std::path::Path>,
) -> Vec<u8> {
    // `cwd`: the task's own directory holding its input files; the worker runs the call there.
    let cwd = cwd.map_or(String::new(), |d| {
        format!(
            r#","cwd":{}"#,
            serde_json::Value::String(d.display().to_string())
        )
    });
    let header = format!(
        r#"{{"op":"task","tid":{},"fid":{},"enc":"{}"{cwd}}}"#,
        tid.0,
        fid.0,
        enc.as_str()
    );
    let mut out = Vec::with_capacity(8 + header.len());
    push_frame_prefix(&mut out, header.as_bytes(), args_len);
    out
}

/// The frame that tells a worker to exit.
pub fn exit_frame() -> Vec<u8> {
    let mut out = Vec::new();
    push_frame_prefix(&mut out, br#"{"op":"exit"}"#, 0);
    out
}

/// An error as a worker reports it.
#[derive(Debug, Deserialize)]
pub struct WorkerError {
    kind: String,
    #[serde(rename = "type")]
    type_name: String,
    message: String,
    traceback: Option<String>,
}

impl WorkerError {
    /// As a protocol error; an unknown kind is reported as `exception`.
    pub fn into_task_error(self) -> TaskError {
        let kind = match self.kind.as_str() {
            "import_error" => ErrorKind::ImportError,
            "bad_input" => ErrorKind::BadInput,
            "not_serializable" => ErrorKind::NotSerializable,
            "result_too_large" => ErrorKind::ResultTooLarge,
            _ => ErrorKind::Exception,
        };
        TaskError {
            kind,
            type_name: self.type_name,
            message: self.message,
            traceback: self.traceback,
        }
    }
}

/// A frame header from a worker.
#[derive(Debug, Deserialize)]
pub struct WorkerHeader {
    /// `ready` or `result`.
    pub op: String,
    /// The task a result belongs to.
    pub tid: Option<u64>,
    /// Whether the task succeeded.
    pub ok: Option<bool>,
    /// The encoding of a successful result.
    pub enc: Option<String>,
    /// The failure, if not ok.
    pub error: Option<WorkerError>,
    /// The worker's pid (`ready`).
    pub pid: Option<u32>,
    /// The worker's Python version (`ready`).
    pub python: Option<String>,
    /// The worker's interpreter, resolved (`ready`).
    pub executable: Option<String>,
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
    pub fn next_frame(&mut self, max: usize) -> Result<Option<(WorkerHeader, Vec<u8>)>, WireError> {
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
        let header: WorkerHeader = serde_json::from_slice(&avail[8..8 + hlen])
            .map_err(|e| WireError::BadHeader(e.to_string()))?;
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
            (h.op.as_str(), h.tid, h.ok, payload.as_slice()),
            ("result", Some(3), Some(true), &b"42"[..])
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
        push_frame_prefix(&mut frame, br#"{"op":"ready","pid":1}"#, 0);
        // SAFETY: writing a local buffer to our pipe.
        unsafe { libc::write(fds[1], frame.as_ptr().cast(), frame.len()) };
        let mut r = FrameReader::default();
        assert!(!r.fill_from(fds[0]).unwrap(), "open pipe, no eof");
        assert_eq!(r.next_frame(1 << 20).unwrap().unwrap().0.pid, Some(1));
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
}
