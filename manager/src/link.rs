//! The link thread: owns the DEALER socket to the interchange, registers, sends heartbeats on
//! its own clock (never blocked by user work), watches for interchange silence, and relays
//! frames between the interchange and the pool over an inproc pair.

use crate::pair::{ToLink, ToPool};
use fnx_protocol::{
    decode, encode, peek_variant, FrameError, InterchangeToManager, ManagerToInterchange, Register,
};
use std::time::{Duration, Instant};

/// Settings of the link.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    /// Interchange endpoint.
    pub interchange: String,
    /// Heartbeat period until the interchange says otherwise.
    pub heartbeat_period: Duration,
    /// Silence after which the interchange is considered gone (also the registration timeout).
    pub heartbeat_threshold: Duration,
    /// Largest frame accepted.
    pub max_frame_bytes: usize,
    /// How the link authenticates (`None`: it does not; only against an interchange without
    /// authentication, as in tests of the interchange alone).
    pub curve: Option<Credentials>,
}

/// What the manager authenticates with.
#[derive(Clone, Debug)]
pub enum Credentials {
    /// CurveZMQ: encrypted and authenticated.
    Curve(ClientKeys),
    /// ZeroMQ PLAIN with a password: authenticated, not encrypted (loopback only).
    Plain(String),
}

/// A manager's side of CurveZMQ (32-byte keys).
#[derive(Clone)]
pub struct ClientKeys {
    /// The interchange's public key.
    pub server_public: Vec<u8>,
    /// This manager's public key.
    pub public: Vec<u8>,
    /// This manager's secret key.
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for ClientKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientKeys { .. }") // never print a secret key
    }
}

/// Run the link until the pool says quit or the link fails. `pair` is connected to the pool.
pub fn run(ctx: &zmq::Context, cfg: LinkConfig, register: Register, pair: zmq::Socket) {
    let end = match Link::connect(ctx, &cfg, register, &pair) {
        Ok(mut link) => link.serve(&pair),
        Err(e) => Some(format!(
            "cannot connect to the interchange at {}: {e}",
            cfg.interchange
        )),
    };
    if let Some(reason) = end {
        tracing::error!("{reason}");
        let _ = ToPool::Ended(reason).send(&pair);
        // Wait for the pool to acknowledge with Quit so it is not left talking to nobody.
        while let Some(m) = ToLink::recv(&pair, 0) {
            if matches!(m, ToLink::Quit(_)) {
                break;
            }
        }
    }
}

struct Link {
    dealer: zmq::Socket,
    /// Failed encryption handshakes of the dealer (with `curve`).
    monitor: Option<zmq::Socket>,
    cfg: LinkConfig,
    /// The registration, sent again when a restarted interchange asks for it.
    register: Register,
    registered: bool,
    last_contact: Instant,
    next_heartbeat: Instant,
}

impl Link {
    fn connect(
        ctx: &zmq::Context,
        cfg: &LinkConfig,
        register: Register,
        _pair: &zmq::Socket,
    ) -> Result<Link, zmq::Error> {
        let dealer = ctx.socket(zmq::DEALER)?;
        dealer.set_sndhwm(0)?;
        dealer.set_rcvhwm(0)?;
        dealer.set_linger(1000)?;
        dealer.set_maxmsgsize(cfg.max_frame_bytes as i64)?;
        // A send never blocks for long: with no usable connection (the interchange gone, or a
        // handshake that keeps failing) a blocking send would hang the manager, even its exit.
        dealer.set_sndtimeo(2000)?;
        let monitor = match &cfg.curve {
            Some(creds) => {
                match creds {
                    Credentials::Curve(keys) => {
                        dealer.set_curve_serverkey(&keys.server_public)?;
                        dealer.set_curve_publickey(&keys.public)?;
                        dealer.set_curve_secretkey(&keys.secret)?;
                    }
                    Credentials::Plain(password) => {
                        dealer.set_plain_username(Some("fnx"))?;
                        dealer.set_plain_password(Some(password.as_str()))?;
                    }
                }
                let events = zmq::SocketEvent::HANDSHAKE_FAILED_NO_DETAIL as i32
                    | zmq::SocketEvent::HANDSHAKE_FAILED_PROTOCOL as i32
                    | zmq::SocketEvent::HANDSHAKE_FAILED_AUTH as i32;
                dealer.monitor("inproc://fnx-manager-link-monitor", events)?;
                let m = ctx.socket(zmq::PAIR)?;
                m.connect("inproc://fnx-manager-link-monitor")?;
                Some(m)
            }
            None => None,
        };
        dealer.connect(&cfg.interchange)?;
        let frame = encode(
            &ManagerToInterchange::Register(register.clone()),
            cfg.max_frame_bytes,
        )
        .map_err(|_| zmq::Error::EMSGSIZE)?;
        dealer.send(frame, 0)?;
        let now = Instant::now();
        Ok(Link {
            dealer,
            monitor,
            cfg: cfg.clone(),
            register,
            registered: false,
            last_contact: now,
            next_heartbeat: now + cfg.heartbeat_period,
        })
    }

    fn send(&self, msg: &ManagerToInterchange) {
        match encode(msg, self.cfg.max_frame_bytes) {
            Ok(frame) => {
                if let Err(e) = self.dealer.send(frame, 0) {
                    tracing::error!("send to the interchange failed: {e}");
                }
            }
            Err(e) => tracing::error!("cannot encode a message for the interchange: {e}"),
        }
    }

    /// Serve until quit (returns `None`) or failure (returns the reason).
    fn serve(&mut self, pair: &zmq::Socket) -> Option<String> {
        loop {
            let now = Instant::now();
            let silence_deadline = self.last_contact + self.cfg.heartbeat_threshold;
            if now >= silence_deadline {
                let what = if self.registered {
                    "has been silent"
                } else {
                    "did not answer the registration"
                };
                let hint = match (self.registered, &self.cfg.curve) {
                    (true, _) => "",
                    (false, Some(_)) => {
                        " (the link is encrypted: does the key file belong to this interchange's \
                         daemon? its log names failed handshakes)"
                    }
                    (false, None) => {
                        " (if the interchange is encrypted, this manager needs its key file: \
                         --curve-keys)"
                    }
                };
                return Some(format!(
                    "the interchange at {} {what} for {:.1}s{hint}; exiting",
                    self.cfg.interchange,
                    now.duration_since(self.last_contact).as_secs_f64()
                ));
            }
            if self.registered && now >= self.next_heartbeat {
                self.send(&ManagerToInterchange::Heartbeat);
                self.next_heartbeat = now + self.cfg.heartbeat_period;
            }
            let wake = if self.registered {
                self.next_heartbeat.min(silence_deadline)
            } else {
                silence_deadline
            };
            let timeout = wake.saturating_duration_since(now).as_millis().max(1) as i64;
            let (from_ic, from_pool, from_monitor) = {
                let mut items = vec![
                    self.dealer.as_poll_item(zmq::POLLIN),
                    pair.as_poll_item(zmq::POLLIN),
                ];
                if let Some(m) = &self.monitor {
                    items.push(m.as_poll_item(zmq::POLLIN));
                }
                if zmq::poll(&mut items, timeout).is_err() {
                    continue;
                }
                let monitor = items.get(2).is_some_and(|i| i.is_readable());
                (items[0].is_readable(), items[1].is_readable(), monitor)
            };
            if from_monitor {
                if let Some(reason) = self.handshake_failure() {
                    return Some(reason);
                }
            }
            if from_pool {
                while let Some(m) = ToLink::recv(pair, zmq::DONTWAIT) {
                    match m {
                        ToLink::Quit(bye) => {
                            if let Some(reason) = bye {
                                self.send(&ManagerToInterchange::Bye { reason });
                            }
                            return None;
                        }
                        ToLink::Send(frame) => {
                            if let Err(e) = self.dealer.send(frame, 0) {
                                tracing::error!("send to the interchange failed: {e}");
                            }
                        }
                    }
                }
            }
            if from_ic {
                while let Ok(frame) = self.dealer.recv_msg(zmq::DONTWAIT) {
                    self.last_contact = Instant::now();
                    if let Some(reason) = self.on_frame(frame, pair) {
                        return Some(reason);
                    }
                }
            }
        }
    }

    /// A failed encryption handshake ends the link at once with an explicit error (libzmq
    /// would otherwise retry silently forever).
    fn handshake_failure(&self) -> Option<String> {
        let parts = self.monitor.as_ref()?.recv_multipart(zmq::DONTWAIT).ok()?;
        let head = parts.first().filter(|p| p.len() >= 6)?;
        let event = zmq::SocketEvent::from_raw(u16::from_le_bytes([head[0], head[1]]));
        let why = match event {
            zmq::SocketEvent::HANDSHAKE_FAILED_AUTH => {
                "the interchange refused this manager's key (not issued by that daemon)"
            }
            zmq::SocketEvent::HANDSHAKE_FAILED_PROTOCOL => {
                "the encrypted handshake failed (a plaintext interchange, or another protocol)"
            }
            _ => "the encrypted handshake failed (the key file may belong to another daemon)",
        };
        Some(format!(
            "cannot connect to the interchange at {}: {why}; check --curve-keys",
            self.cfg.interchange
        ))
    }

    fn on_frame(&mut self, frame: zmq::Message, pair: &zmq::Socket) -> Option<String> {
        // Only the link's own messages are decoded here; the rest (task batches above all)
        // go to the pool as received, which decodes them once.
        let mine = match peek_variant(&frame) {
            Ok(name) => matches!(name, "registered" | "rejected" | "heartbeat" | "reregister"),
            Err(FrameError::VersionMismatch { peer, ours }) => {
                return Some(format!(
                    "protocol version mismatch: the interchange speaks version {peer}, this manager speaks version {ours}"
                ))
            }
            Err(e) => {
                tracing::error!("ignoring a malformed message from the interchange: {e}");
                return None;
            }
        };
        if !mine {
            let _ = ToPool::Frame(frame).send(pair);
            return None;
        }
        let msg = match decode::<InterchangeToManager>(&frame, self.cfg.max_frame_bytes) {
            Ok(msg) => msg,
            Err(e) => {
                tracing::error!("ignoring a malformed message from the interchange: {e}");
                return None;
            }
        };
        match msg {
            InterchangeToManager::Registered {
                manager,
                heartbeat_period_ms,
                heartbeat_threshold_ms,
            } => {
                tracing::info!("registered with the interchange as {manager}");
                self.registered = true;
                self.cfg.heartbeat_period = fnx_protocol::bounded_ms(heartbeat_period_ms.max(1));
                self.cfg.heartbeat_threshold =
                    fnx_protocol::bounded_ms(heartbeat_threshold_ms.max(1));
                self.next_heartbeat = Instant::now() + self.cfg.heartbeat_period;
                None
            }
            InterchangeToManager::Rejected { reason } => {
                Some(format!("the interchange refused this manager: {reason}"))
            }
            InterchangeToManager::Heartbeat => None,
            InterchangeToManager::Reregister { reason } => {
                // Once per restart: more may come (for frames queued while the interchange
                // was away) until the new registration is answered.
                if self.registered {
                    tracing::warn!("{reason}; registering again (running tasks go on)");
                    self.registered = false;
                    self.send(&ManagerToInterchange::Register(self.register.clone()));
                    // The pool drops the tasks it has not started: the restarted interchange
                    // dispatches them again.
                    let _ = ToPool::Frame(frame).send(pair);
                }
                None
            }
            _ => {
                let _ = ToPool::Frame(frame).send(pair);
                None
            }
        }
    }
}
