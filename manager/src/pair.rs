//! The messages between the pool and the link thread, over their inproc PAIR socket: each is
//! two parts, a one-byte tag and a body. Only this module knows the tags.

/// From the link thread to the pool.
#[derive(Debug)]
pub enum ToPool {
    /// A message from the interchange, as received (not copied, not decoded here).
    Frame(zmq::Message),
    /// The link ended: why.
    Ended(String),
}

/// From the pool to the link thread.
#[derive(Debug)]
pub enum ToLink {
    /// An encoded message for the interchange (sent on as it is, not copied).
    Send(zmq::Message),
    /// Stop, first saying `Bye` with this reason to the interchange if there is one.
    Quit(Option<String>),
}

const FRAME: u8 = b'F';
const ENDED: u8 = b'X';
const SEND: u8 = b'R';
const QUIT: u8 = b'Q';

impl ToPool {
    /// Send it (blocking: the pool always reads).
    pub fn send(self, pair: &zmq::Socket) -> zmq::Result<()> {
        match self {
            ToPool::Frame(frame) => {
                pair.send(&[FRAME][..], zmq::SNDMORE)?;
                pair.send(frame, 0)
            }
            ToPool::Ended(why) => pair.send_multipart([&[ENDED][..], why.as_bytes()], 0),
        }
    }

    /// The next message, if one is waiting (`flags`: `zmq::DONTWAIT` or 0). Malformed
    /// messages (which only a bug could send) are skipped.
    pub fn recv(pair: &zmq::Socket, flags: i32) -> Option<ToPool> {
        loop {
            let (tag, body) = recv_two(pair, flags)?;
            match tag {
                FRAME => return Some(ToPool::Frame(body)),
                ENDED => return Some(ToPool::Ended(lossy(&body))),
                other => tracing::error!("unknown message {other} from the link thread"),
            }
        }
    }
}

impl ToLink {
    /// Send it.
    pub fn send(self, pair: &zmq::Socket) -> zmq::Result<()> {
        match self {
            ToLink::Send(frame) => {
                pair.send(&[SEND][..], zmq::SNDMORE)?;
                pair.send(frame, 0)
            }
            ToLink::Quit(bye) => {
                let bye = bye.as_deref().unwrap_or("");
                pair.send_multipart([&[QUIT][..], bye.as_bytes()], 0)
            }
        }
    }

    /// The next message, if one is waiting (`flags`: `zmq::DONTWAIT` or 0).
    pub fn recv(pair: &zmq::Socket, flags: i32) -> Option<ToLink> {
        loop {
            let (tag, body) = recv_two(pair, flags)?;
            match tag {
                SEND => return Some(ToLink::Send(body)),
                QUIT => {
                    let bye = (!body.is_empty()).then(|| lossy(&body));
                    return Some(ToLink::Quit(bye));
                }
                other => tracing::error!("unknown message {other} from the pool"),
            }
        }
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A tag and a body; None when nothing waits or the socket fails. A message of another shape
/// is read whole and skipped.
fn recv_two(pair: &zmq::Socket, flags: i32) -> Option<(u8, zmq::Message)> {
    loop {
        let tag = pair.recv_msg(flags).ok()?;
        if !tag.get_more() {
            tracing::error!("a message of one part on the pool's pair; skipped");
            continue;
        }
        let body = pair.recv_msg(0).ok()?;
        let mut more = body.get_more();
        while more {
            more = pair.recv_msg(0).map(|m| m.get_more()).unwrap_or(false);
        }
        match (tag.len(), tag.first()) {
            (1, Some(&t)) => return Some((t, body)),
            _ => tracing::error!("a message with a tag of {} bytes; skipped", tag.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_message_arrives_as_it_was_sent_in_order() {
        let ctx = zmq::Context::new();
        let (a, b) = (
            ctx.socket(zmq::PAIR).unwrap(),
            ctx.socket(zmq::PAIR).unwrap(),
        );
        a.bind("inproc://pair-test").unwrap();
        b.connect("inproc://pair-test").unwrap();
        ToPool::Frame(zmq::Message::from(&b"abc"[..]))
            .send(&a)
            .unwrap();
        ToPool::Ended("gone".into()).send(&a).unwrap();
        match ToPool::recv(&b, 0) {
            Some(ToPool::Frame(m)) => assert_eq!(&m[..], b"abc"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(ToPool::recv(&b, 0), Some(ToPool::Ended(w)) if w == "gone"));
        assert!(ToPool::recv(&b, zmq::DONTWAIT).is_none());
        ToLink::Send(zmq::Message::from(&[1u8, 2, 3][..]))
            .send(&b)
            .unwrap();
        match ToLink::recv(&a, 0) {
            Some(ToLink::Send(m)) => assert_eq!(&m[..], &[1, 2, 3]),
            other => panic!("{other:?}"),
        }
        for bye in [None, Some("drained".to_string())] {
            ToLink::Quit(bye.clone()).send(&b).unwrap();
            assert!(matches!(ToLink::recv(&a, 0), Some(ToLink::Quit(got)) if got == bye));
        }
        // Malformed messages are skipped, not taken for another.
        a.send(&b"F"[..], 0).unwrap();
        a.send_multipart([&b"FF"[..], b"x"], 0).unwrap();
        a.send_multipart([&b"Z"[..], b"x"], 0).unwrap();
        ToLink::Send(zmq::Message::from(&[9u8][..]))
            .send(&a)
            .unwrap();
        assert!(matches!(ToLink::recv(&b, 0), Some(ToLink::Send(m)) if m[..] == [9]));
    }
}
