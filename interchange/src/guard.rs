//! Encrypted, authenticated manager links (CurveZMQ).
//!
//! With a [`CurveServer`] the ROUTER is a CURVE server: every connection is encrypted with the
//! interchange's key pair, and a ZAP handler (a REP socket at `inproc://zeromq.zap.01` in the
//! driver's ZeroMQ context, answered on the driver thread) accepts only the client public keys
//! the daemon issued. A socket monitor reports failed handshakes (a wrong key, a plaintext
//! manager, a manager holding another server's key), which are logged with the peer's address
//! and a rate limit. Nothing from a connection that failed its handshake reaches the state
//! machine.

use crate::driver::{DriverError, RateLimit};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// How manager links authenticate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    /// CurveZMQ: encrypted and authenticated; `clients` are public keys.
    Curve,
    /// ZeroMQ PLAIN: authenticated by a password, not encrypted; `clients` are passwords.
    /// Only for loopback links of managers that the interchange's own process starts (they
    /// cannot outlive it, so no one else can pose as the interchange to them).
    Plain,
}

/// The interchange's side of link authentication.
#[derive(Clone)]
pub struct CurveServer {
    /// The mechanism.
    pub mechanism: Mechanism,
    /// The interchange's secret key (32 bytes; unused with PLAIN).
    pub secret: Vec<u8>,
    /// The credentials of the managers allowed to connect (public keys of 32 bytes, or
    /// passwords), each with the tenant (user) whose tasks its holder may receive (`""`: the
    /// shared tenant).
    pub clients: Vec<(Vec<u8>, String)>,
}

impl std::fmt::Debug for CurveServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret key.
        write!(
            f,
            "CurveServer {{ mechanism: {:?}, clients: {} }}",
            self.mechanism,
            self.clients.len()
        )
    }
}

/// A new CurveZMQ key pair, Z85 text: (public, secret).
pub fn new_key_pair() -> Result<(String, String), DriverError> {
    let pair = zmq::CurveKeyPair::new().map_err(zerr("new CURVE key pair"))?;
    let public = zmq::z85_encode(&pair.public_key).map_err(|_| DriverError::KeyText)?;
    let secret = zmq::z85_encode(&pair.secret_key).map_err(|_| DriverError::KeyText)?;
    Ok((public, secret))
}

/// The 32 bytes of a Z85 CurveZMQ key, or None when `z85` is not one.
pub fn decode_key(z85: &str) -> Option<Vec<u8>> {
    zmq::z85_decode(z85).ok().filter(|k| k.len() == 32)
}

/// The ZAP handler and handshake monitor of a CURVE server socket.
pub(crate) struct Guard {
    pub(crate) zap: zmq::Socket,
    pub(crate) monitor: zmq::Socket,
    /// Issued keys and their tenants.
    allowed: HashMap<Vec<u8>, String>,
    mechanism: Mechanism,
    log: RateLimit,
}

static NEXT_MONITOR: AtomicU64 = AtomicU64::new(0);

fn zerr(what: &'static str) -> impl FnOnce(zmq::Error) -> DriverError {
    move |source| DriverError::Zmq { what, source }
}

impl Guard {
    /// Make `router` a CURVE server (before it binds) and start authenticating.
    pub(crate) fn install(
        ctx: &zmq::Context,
        router: &zmq::Socket,
        cfg: &CurveServer,
    ) -> Result<Guard, DriverError> {
        let zap = ctx.socket(zmq::REP).map_err(zerr("ZAP socket"))?;
        zap.bind("inproc://zeromq.zap.01")
            .map_err(zerr("bind ZAP"))?;
        match cfg.mechanism {
            Mechanism::Curve => {
                router
                    .set_curve_server(true)
                    .map_err(zerr("CURVE_SERVER"))?;
                router
                    .set_curve_secretkey(&cfg.secret)
                    .map_err(zerr("CURVE_SECRETKEY"))?;
            }
            Mechanism::Plain => router
                .set_plain_server(true)
                .map_err(zerr("PLAIN_SERVER"))?,
        }
        router.set_zap_domain("fnx").map_err(zerr("ZAP_DOMAIN"))?;
        let addr = format!(
            "inproc://fnx-interchange-monitor-{}",
            NEXT_MONITOR.fetch_add(1, Ordering::Relaxed)
        );
        let events = zmq::SocketEvent::HANDSHAKE_FAILED_NO_DETAIL as i32
            | zmq::SocketEvent::HANDSHAKE_FAILED_PROTOCOL as i32
            | zmq::SocketEvent::HANDSHAKE_FAILED_AUTH as i32;
        router.monitor(&addr, events).map_err(zerr("monitor"))?;
        let monitor = ctx.socket(zmq::PAIR).map_err(zerr("monitor socket"))?;
        monitor.connect(&addr).map_err(zerr("connect monitor"))?;
        Ok(Guard {
            zap,
            monitor,
            allowed: cfg.clients.iter().cloned().collect(),
            mechanism: cfg.mechanism,
            log: RateLimit::default(),
        })
    }

    /// Accept `key` from now on, for managers of `tenant`.
    pub(crate) fn allow(&mut self, key: Vec<u8>, tenant: String) {
        self.allowed.insert(key, tenant);
    }

    /// Answer waiting ZAP requests: 200 for an issued key, naming its tenant as the user id
    /// (every message of that connection carries it as `User-Id`), 400 otherwise.
    pub(crate) fn serve_zap(&mut self) {
        while let Ok(req) = self.zap.recv_multipart(zmq::DONTWAIT) {
            // version, request id, domain, address, identity, mechanism, credentials...
            let field = |i: usize| req.get(i).cloned().unwrap_or_default();
            let (address, mechanism) = (field(3), field(5));
            // CURVE: the client's public key; PLAIN: username, then password.
            let (expected, key): (&[u8], Vec<u8>) = match self.mechanism {
                Mechanism::Curve => (b"CURVE", field(6)),
                Mechanism::Plain => (b"PLAIN", field(7)),
            };
            let tenant = (mechanism == expected)
                .then(|| self.allowed.get(&key))
                .flatten()
                .cloned();
            let ok = tenant.is_some();
            if !ok {
                let who = String::from_utf8_lossy(&address).into_owned();
                let key = match self.mechanism {
                    Mechanism::Curve => zmq::z85_encode(&key).unwrap_or_else(|_| "(none)".into()),
                    Mechanism::Plain => "(a password)".into(),
                };
                if let Some(suppressed) = self.log.allow(Instant::now()) {
                    if suppressed > 0 {
                        tracing::warn!(
                            "{suppressed} more refused manager connections were not logged"
                        );
                    }
                    tracing::warn!(
                        "refused a manager connection from {who}: its key {key} was not issued by \
                         this daemon (HANDSHAKE_FAILED_AUTH)"
                    );
                }
            }
            let (code, text): (&[u8], &[u8]) = if ok {
                (b"200", b"OK")
            } else {
                (b"400", b"key not issued by this daemon")
            };
            let user = tenant.unwrap_or_default();
            let reply: [&[u8]; 6] = [b"1.0", &field(1), code, text, user.as_bytes(), b""];
            if let Err(e) = self.zap.send_multipart(reply, 0) {
                tracing::error!("cannot answer an authentication request: {e}");
            }
        }
    }

    /// Log failed handshakes the monitor reported.
    pub(crate) fn drain_monitor(&mut self) {
        while let Ok(parts) = self.monitor.recv_multipart(zmq::DONTWAIT) {
            let event = parts.first().filter(|p| p.len() >= 6).map(|p| {
                (
                    u16::from_le_bytes([p[0], p[1]]),
                    u32::from_le_bytes([p[2], p[3], p[4], p[5]]),
                )
            });
            let peer = parts
                .get(1)
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .unwrap_or_default();
            let Some((event, value)) = event else {
                continue;
            };
            let what = match zmq::SocketEvent::from_raw(event) {
                zmq::SocketEvent::HANDSHAKE_FAILED_AUTH => continue, // logged by the ZAP handler
                zmq::SocketEvent::HANDSHAKE_FAILED_PROTOCOL => "protocol error",
                _ => "no details",
            };
            if let Some(suppressed) = self.log.allow(Instant::now()) {
                if suppressed > 0 {
                    tracing::warn!("{suppressed} more failed manager handshakes were not logged");
                }
                tracing::warn!(
                    "an encrypted handshake with a manager failed on {peer} ({what}, code {value}): \
                     a plaintext manager, or one holding another daemon's key?"
                );
            }
        }
    }
}
