//! Frames: the versioned msgpack envelope every message travels in.
//!
//! A frame is a msgpack array `[protocol_version, message]`. Decoding checks the frame's size
//! first, then the version, then the message; it returns an error on any input (never panics)
//! and never allocates more than the frame's own size, because every length field is checked
//! against the bytes that are actually there.

use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

/// The version of the manager ⇄ interchange protocol spoken by this build.
pub const PROTOCOL_VERSION: u32 = 4;

/// Frames larger than this are refused unless configured otherwise (64 MiB).
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 << 20;

/// The largest result a message to the interchange can carry: the message limit less room
/// for the batch it travels in (results are sent once a batch holds 4 MiB) and its framing.
pub const LARGEST_RESULT_BYTES: u64 = (DEFAULT_MAX_FRAME_BYTES as u64) - (8 << 20);

/// Why a frame could not be encoded or decoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    /// The frame is larger than the cap.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Size of the frame.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// The peer speaks another protocol version.
    #[error(
        "protocol version mismatch: peer speaks version {peer}, this side speaks version {ours}"
    )]
    VersionMismatch {
        /// The peer's version.
        peer: u64,
        /// Ours.
        ours: u32,
    },
    /// The bytes are not a frame (bad envelope, truncated, wrong type, unknown variant).
    #[error("malformed frame: {reason}")]
    Malformed {
        /// What the decoder found wrong.
        reason: String,
    },
    /// The message could not be encoded.
    #[error("cannot encode message: {reason}")]
    Encode {
        /// What the encoder reported.
        reason: String,
    },
}

fn malformed(reason: impl ToString) -> FrameError {
    FrameError::Malformed {
        reason: reason.to_string(),
    }
}

/// Encode `msg` as a frame. Fails if the result would exceed `max` bytes.
pub fn encode<T: Serialize>(msg: &T, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut buf = Vec::with_capacity(64);
    rmp::encode::write_array_len(&mut buf, 2).map_err(|e| FrameError::Encode {
        reason: e.to_string(),
    })?;
    rmp::encode::write_uint(&mut buf, u64::from(PROTOCOL_VERSION)).map_err(|e| {
        FrameError::Encode {
            reason: e.to_string(),
        }
    })?;
    rmp_serde::encode::write(&mut buf, msg).map_err(|e| FrameError::Encode {
        reason: e.to_string(),
    })?;
    if buf.len() > max {
        return Err(FrameError::TooLarge {
            len: buf.len(),
            max,
        });
    }
    Ok(buf)
}

/// Read only the protocol version of a frame (used to answer a peer of another version).
pub fn peek_version(frame: &[u8]) -> Result<u64, FrameError> {
    let mut rest = frame;
    let n =
        rmp::decode::read_array_len(&mut rest).map_err(|e| malformed(format!("envelope: {e}")))?;
    if n != 2 {
        return Err(malformed(format!("envelope has {n} elements, expected 2")));
    }
    rmp::decode::read_int::<u64, _>(&mut rest).map_err(|e| malformed(format!("version: {e}")))
}

/// The name of the message a frame holds (`tasks`, `heartbeat`, ...: its variant), read without
/// decoding the message, so that a router can forward the bytes of the messages it does not
/// handle. The version is checked as [`decode`] does.
pub fn peek_variant(frame: &[u8]) -> Result<&str, FrameError> {
    let version = peek_version(frame)?;
    if version != u64::from(PROTOCOL_VERSION) {
        return Err(FrameError::VersionMismatch {
            peer: version,
            ours: PROTOCOL_VERSION,
        });
    }
    let mut rest = frame;
    // Past the envelope's array marker and the version (both checked above).
    let _ = rmp::decode::read_array_len(&mut rest);
    let _ = rmp::decode::read_int::<u64, _>(&mut rest);
    // A unit variant is its name; any other is a map of one entry, its name to its fields.
    if let Some(0x80..=0x8f | 0xde | 0xdf) = rest.first() {
        let n =
            rmp::decode::read_map_len(&mut rest).map_err(|e| malformed(format!("message: {e}")))?;
        if n != 1 {
            return Err(malformed(format!(
                "message is a map of {n} entries, expected 1"
            )));
        }
    }
    rmp::decode::read_str_from_slice(rest)
        .map(|(name, _)| name)
        .map_err(|e| malformed(format!("message name: {e}")))
}

/// Decode a frame of at most `max` bytes into a message.
pub fn decode<T: DeserializeOwned>(frame: &[u8], max: usize) -> Result<T, FrameError> {
    if frame.len() > max {
        return Err(FrameError::TooLarge {
            len: frame.len(),
            max,
        });
    }
    let mut rest = frame;
    let n =
        rmp::decode::read_array_len(&mut rest).map_err(|e| malformed(format!("envelope: {e}")))?;
    if n != 2 {
        return Err(malformed(format!("envelope has {n} elements, expected 2")));
    }
    let version = rmp::decode::read_int::<u64, _>(&mut rest)
        .map_err(|e| malformed(format!("version: {e}")))?;
    if version != u64::from(PROTOCOL_VERSION) {
        return Err(FrameError::VersionMismatch {
            peer: version,
            ours: PROTOCOL_VERSION,
        });
    }
    // Decoding from a slice borrows every length-prefixed field from the frame itself, so a
    // length claiming more bytes than remain is an error, never an allocation.
    rmp_serde::from_slice(rest).map_err(malformed)
}
