//! The decoder returns an error on arbitrary bytes: it never panics and never allocates past
//! the frame it was given. Bounded property runs (scripts/check.sh sets PROPTEST_CASES).

use fnx_protocol::frame::peek_version;
use fnx_protocol::*;
use proptest::prelude::*;

const MAX: usize = 1 << 20;

fn any_frame_decodes_or_errors(bytes: &[u8]) {
    let _ = decode::<ManagerToInterchange>(bytes, MAX);
    let _ = decode::<InterchangeToManager>(bytes, MAX);
    let _ = peek_version(bytes);
    let _ = peek_variant(bytes);
}

proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        any_frame_decodes_or_errors(&bytes);
    }

    #[test]
    fn random_bytes_after_a_valid_envelope_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..512)
    ) {
        let mut frame = vec![0x92, PROTOCOL_VERSION as u8];
        frame.extend_from_slice(&bytes);
        any_frame_decodes_or_errors(&frame);
    }

    #[test]
    fn mutated_valid_frames_never_panic(
        pos in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let msg = ManagerToInterchange::Results(vec![TaskResult {
            id: TaskId(1),
            attempt: Attempt(1),
            outcome: Outcome::Ok(Payload::json("[1,2,3]")),
        }]);
        let mut frame = encode(&msg, MAX).unwrap();
        let i = pos.index(frame.len());
        frame[i] = byte;
        let end = cut.index(frame.len() + 1);
        any_frame_decodes_or_errors(&frame[..end]);
    }
}

#[test]
fn truncated_frames_are_errors() {
    let msg = ManagerToInterchange::Heartbeat;
    let frame = encode(&msg, MAX).unwrap();
    for end in 0..frame.len() {
        assert!(
            decode::<ManagerToInterchange>(&frame[..end], MAX).is_err(),
            "cut at {end}"
        );
    }
}

#[test]
fn a_length_claiming_four_gib_is_an_error_not_an_allocation() {
    // envelope, this version, {"results": [[id, attempt, {"ok": ["json", bin32 len 0xffffffff]}]]}
    let v = PROTOCOL_VERSION as u8;
    let mut frame = vec![0x92, v, 0x81, 0xa7];
    frame.extend_from_slice(b"results");
    frame.extend_from_slice(&[0x91, 0x93, 0x01, 0x01, 0x81, 0xa2, b'o', b'k', 0x92, 0xa4]);
    frame.extend_from_slice(b"json");
    frame.extend_from_slice(&[0xc6, 0xff, 0xff, 0xff, 0xff, 0x00]);
    let err = decode::<ManagerToInterchange>(&frame, MAX).unwrap_err();
    assert!(matches!(err, FrameError::Malformed { .. }), "{err:?}");
    // An array header claiming 2^32-1 elements.
    let frame = [
        0x92, v, 0x81, 0xa7, b'r', b'e', b's', b'u', b'l', b't', b's', 0xdd, 0xff, 0xff, 0xff, 0xff,
    ];
    assert!(decode::<ManagerToInterchange>(&frame, MAX).is_err());
}

#[test]
fn oversized_frames_are_refused_before_decoding() {
    let frame = vec![0u8; MAX + 1];
    assert_eq!(
        decode::<ManagerToInterchange>(&frame, MAX),
        Err(FrameError::TooLarge {
            len: MAX + 1,
            max: MAX
        })
    );
    let big = ManagerToInterchange::Bye {
        reason: "x".repeat(100),
    };
    assert!(matches!(encode(&big, 50), Err(FrameError::TooLarge { .. })));
}

#[test]
fn another_version_is_named_in_the_error() {
    // [1, "heartbeat"]: the version before this one
    let mut frame = vec![0x92, 0x01, 0xa9];
    frame.extend_from_slice(b"heartbeat");
    assert_eq!(
        decode::<ManagerToInterchange>(&frame, MAX),
        Err(FrameError::VersionMismatch {
            peer: 1,
            ours: PROTOCOL_VERSION
        })
    );
    assert_eq!(peek_version(&frame), Ok(1));
    let text = decode::<ManagerToInterchange>(&frame, MAX)
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("version 1") && text.contains(&format!("version {PROTOCOL_VERSION}")),
        "{text}"
    );
}

#[test]
fn a_message_of_the_other_direction_is_an_error() {
    let frame = encode(&InterchangeToManager::Drained, MAX).unwrap();
    assert!(decode::<ManagerToInterchange>(&frame, MAX).is_err());
    let frame = encode(&InterchangeToManager::Rejected { reason: "x".into() }, MAX).unwrap();
    assert!(decode::<ManagerToInterchange>(&frame, MAX).is_err());
}
