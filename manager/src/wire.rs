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
pub fn task_frame_head(tid: TaskId, fid: FunctionId, enc: Encoding, args_len: usize) -> Vec<u8> {
    let header = format!(
        r#"{{"op":"task","tid":{},"fid":{},"enc":"{}"}}"#,
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
}

/// Splits the byte stream from a worker into frames.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
}

impl FrameReader {
    /// Space to read into: the caller fills `buf[len..]` and calls [`FrameReader::filled`].
    pub fn spare(&mut self, want: usize) -> &mut [u8] {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > (1 << 20) {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let len = self.buf.len();
        self.buf.resize(len + want, 0);
        &mut self.buf[len..]
    }

    /// After reading `n` bytes into the slice from [`FrameReader::spare`] of size `want`.
    pub fn filled(&mut self, want: usize, n: usize) {
        let len = self.buf.len();
        self.buf.truncate(len - want + n);
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
            let spare = r.spare(chunk.len());
            spare.copy_from_slice(chunk);
            r.filled(chunk.len(), chunk.len());
        }
        let (h, payload) = r.next_frame(1 << 20).unwrap().unwrap();
        assert_eq!(
            (h.op.as_str(), h.tid, h.ok, payload.as_slice()),
            ("result", Some(3), Some(true), &b"42"[..])
        );
        assert!(r.next_frame(1 << 20).unwrap().is_none());
    }

    #[test]
    fn oversized_and_inconsistent_frames_are_errors() {
        let mut r = FrameReader::default();
        let spare = r.spare(8);
        spare.copy_from_slice(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1]);
        assert!(matches!(
            r.next_frame(1 << 20),
            Err(WireError::TooLarge { .. })
        ));
        let mut r = FrameReader::default();
        let spare = r.spare(8);
        spare.copy_from_slice(&[0, 0, 0, 8, 0, 0, 0, 9]);
        assert!(matches!(
            r.next_frame(1 << 20),
            Err(WireError::BadHeader(_))
        ));
    }
}
