//! Serving the API: the TCP listener the caller bound, and the local Unix socket.

use super::{io, DaemonError};
use crate::api::{self, App, SocketPeer};
use axum::extract::connect_info::ConnectInfo;
use fnx_interchange::RateLimit;
use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Bind the local socket (mode 0666: the kernel tells who connects, see `api::SocketPeer`).
/// A stale socket file is replaced; a live one (another daemon answers on it) is an error.
pub(super) fn bind_socket(path: &Path) -> Result<std::os::unix::net::UnixListener, DaemonError> {
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::net::{UnixListener, UnixStream};
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("cannot create {}", dir.display())))?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(DaemonError::Io {
                what: format!("daemon.socket {}", path.display()),
                source: std::io::Error::other(
                    "exists and is not a socket; remove it or choose another path",
                ),
            });
        }
        if UnixStream::connect(path).is_ok() {
            return Err(DaemonError::Io {
                what: format!("daemon.socket {}", path.display()),
                source: std::io::Error::other("another daemon answers on it"),
            });
        }
        std::fs::remove_file(path).map_err(io(format!("cannot replace {}", path.display())))?;
    }
    let l = UnixListener::bind(path).map_err(io(format!("cannot listen on {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .map_err(io(format!("cannot set the mode of {}", path.display())))?;
    l.set_nonblocking(true)
        .map_err(io("cannot configure the socket"))?;
    Ok(l)
}

pub(super) fn serve(
    app: Arc<App>,
    listener: std::net::TcpListener,
    socket: Option<std::os::unix::net::UnixListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("http")
        .enable_all()
        .build()
        .map_err(io("cannot start the HTTP runtime"))?;
    listener
        .set_nonblocking(true)
        .map_err(io("cannot configure the listener"))?;
    let limits = Arc::new(ConnLimits::new(&app.limits, app.connections.clone()));
    rt.block_on(async move {
        let tcp =
            tokio::net::TcpListener::from_std(listener).map_err(io("cannot use the listener"))?;
        let unix = match socket {
            Some(l) => Some(
                tokio::net::UnixListener::from_std(l).map_err(io("cannot use the local socket"))?,
            ),
            None => None,
        };
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let router = api::router(app);
        let tcp_loop = tokio::spawn(accept_loop(
            Listener::Tcp(tcp),
            router.clone(),
            limits.clone(),
            stop_rx.clone(),
        ));
        let unix_loop = unix.map(|u| {
            tokio::spawn(accept_loop(
                Listener::Unix(u),
                router,
                limits.clone(),
                stop_rx,
            ))
        });
        shutdown.await;
        tracing::info!("stopping: no new requests; waiting up to 2 s for requests in progress");
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = tcp_loop.await;
            if let Some(u) = unix_loop {
                let _ = u.await;
            }
            while limits.total.load(Ordering::Relaxed) > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        Ok::<(), DaemonError>(())
    })?;
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// Who a connection comes from, for the per-peer cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Peer {
    Ip(IpAddr),
    Uid(Option<u32>),
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Ip(ip) => write!(f, "{ip}"),
            Peer::Uid(Some(uid)) => write!(f, "uid {uid} on the local socket"),
            Peer::Uid(None) => f.write_str("an unknown uid on the local socket"),
        }
    }
}

/// The connection caps and timeouts, and the count of open connections.
struct ConnLimits {
    max: usize,
    per_peer: usize,
    idle: Duration,
    write_stall: Duration,
    total: Arc<AtomicUsize>,
    peers: Mutex<HashMap<Peer, usize>>,
    log: Mutex<RateLimit>,
}

impl ConnLimits {
    fn new(l: &crate::config::Limits, total: Arc<AtomicUsize>) -> ConnLimits {
        // Each connection is one descriptor; keep room for the store, pools and managers.
        let fds = fnx_sys::node::raise_fd_limit().unwrap_or(1024);
        let room = (fds.saturating_sub(256) / 2).max(16) as usize;
        let max = if l.max_connections > room {
            tracing::warn!(
                "limits.max_connections = {} is more than the open-file limit ({fds}) allows; \
                 using {room} (raise LimitNOFILE, or `ulimit -Hn`, to allow more)",
                l.max_connections
            );
            room
        } else {
            l.max_connections
        };
        tracing::info!(
            "API connections: at most {max} ({} per peer), open-file limit {fds}",
            l.max_connections_per_peer
        );
        ConnLimits {
            max,
            per_peer: l.max_connections_per_peer,
            idle: l.idle_timeout,
            write_stall: l.body_timeout,
            total,
            peers: Mutex::new(HashMap::new()),
            log: Mutex::new(RateLimit::default()),
        }
    }

    /// Count a new connection from `peer`, or say which cap it hits.
    fn admit(self: &Arc<Self>, peer: Peer) -> Result<Admitted, CapReached> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let total = self.total.load(Ordering::Relaxed);
        if total >= self.max {
            return Err(CapReached::Total {
                open: total,
                max: self.max,
            });
        }
        let mine = peers.entry(peer).or_insert(0);
        if *mine >= self.per_peer {
            return Err(CapReached::Peer {
                open: *mine,
                peer,
                max: self.per_peer,
            });
        }
        *mine += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(Admitted {
            limits: self.clone(),
            peer,
        })
    }

    fn warn(&self, what: &str) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(suppressed) = log.allow(Instant::now()) {
            let more = if suppressed > 0 {
                format!(" ({suppressed} similar warnings suppressed)")
            } else {
                String::new()
            };
            tracing::warn!("API: {what}{more}");
        }
    }
}

/// Which connection cap a new connection hits.
#[derive(Debug, thiserror::Error)]
enum CapReached {
    #[error("{open} connections are open (limits.max_connections = {max})")]
    Total { open: usize, max: usize },
    #[error("{open} connections from {peer} are open (limits.max_connections_per_peer = {max})")]
    Peer { open: usize, peer: Peer, max: usize },
}

/// An open connection, counted until dropped.
struct Admitted {
    limits: Arc<ConnLimits>,
    peer: Peer,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut peers = self.limits.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = peers.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                peers.remove(&self.peer);
            }
        }
        self.limits.total.fetch_sub(1, Ordering::Relaxed);
    }
}

enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl Listener {
    async fn accept(&self) -> std::io::Result<(Stream, Peer)> {
        match self {
            Listener::Tcp(l) => {
                let (s, addr) = l.accept().await?;
                // No Nagle delay on small answers (one request at a time per connection).
                let _ = s.set_nodelay(true);
                Ok((Stream::Tcp(s), Peer::Ip(addr.ip())))
            }
            Listener::Unix(l) => {
                let (s, _) = l.accept().await?;
                let uid = s.peer_cred().ok().map(|c| c.uid());
                Ok((Stream::Unix(s), Peer::Uid(uid)))
            }
        }
    }
}

/// Accept connections until `stop`, each served by its own task within the caps. When the
/// process is out of descriptors, a spare one is given up to answer the waiting client with
/// 503 rather than leave it hanging in the backlog.
async fn accept_loop(
    listener: Listener,
    router: axum::Router,
    limits: Arc<ConnLimits>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut spare = std::fs::File::open("/dev/null").ok();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e)
                if e.raw_os_error() == Some(libc::EMFILE)
                    || e.raw_os_error() == Some(libc::ENFILE) =>
            {
                limits.warn(&format!(
                    "cannot accept a connection: {e}; refusing new connections with 503 until \
                     descriptors are free (raise the open-file limit, or lower \
                     limits.max_connections)"
                ));
                drop(spare.take());
                let next = tokio::time::timeout(Duration::from_millis(100), listener.accept());
                if let Ok(Ok((stream, _))) = next.await {
                    match stream {
                        Stream::Tcp(s) => refuse(s),
                        Stream::Unix(s) => refuse(s),
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                spare = std::fs::File::open("/dev/null").ok();
                continue;
            }
            Err(e) => {
                limits.warn(&format!("cannot accept a connection: {e}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let admitted = match limits.admit(peer) {
            Ok(a) => a,
            Err(why) => {
                limits.warn(&format!("refused a connection with 503: {why}"));
                match stream {
                    Stream::Tcp(s) => refuse(s),
                    Stream::Unix(s) => refuse(s),
                }
                continue;
            }
        };
        let conn_info = match peer {
            Peer::Uid(uid) => Some(ConnectInfo(SocketPeer { uid })),
            Peer::Ip(_) => None,
        };
        let router = router.clone();
        let stop = stop.clone();
        let idle = limits.idle;
        let stall = limits.write_stall;
        tokio::spawn(async move {
            let _admitted = admitted;
            match stream {
                Stream::Tcp(s) => {
                    serve_conn(Stalls::new(s, stall), router, conn_info, idle, stop).await
                }
                Stream::Unix(s) => {
                    serve_conn(Stalls::new(s, stall), router, conn_info, idle, stop).await
                }
            }
        });
    }
}

/// Answer 503 with `Retry-After` on a connection over a cap, and close it.
fn refuse<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(stream: S) {
    tokio::spawn(async move {
        let mut stream = stream;
        let body = r#"{"error":{"code":"too_many_connections","message":"the fnx daemon has too many open connections; retry later"}}"#;
        let answer = format!(
            "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = stream.write_all(answer.as_bytes()).await;
            let _ = stream.shutdown().await;
            // Read what the client sent (a little, briefly): closing with its request unread
            // would reset the connection, and the client might never see the 503.
            let mut sink = [0u8; 4096];
            let mut left: usize = 64 << 10;
            while left > 0 {
                match stream.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left -= n.min(left),
                }
            }
        })
        .await;
    });
}

/// Serve one connection: HTTP/1.1 keep-alive, closed when idle past `idle` (hyper's header
/// timer starts when the connection waits for a request head), drained at `stop`.
async fn serve_conn<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    io: S,
    router: axum::Router,
    conn_info: Option<ConnectInfo<SocketPeer>>,
    idle: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            if let Some(info) = conn_info {
                req.extensions_mut().insert(info);
            }
            let mut router = router.clone();
            async move { tower_service::Service::call(&mut router, req).await }
        });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(idle)
        .serve_connection(hyper_util::rt::TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = stop.changed() => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
}

/// A stream whose writes fail with `TimedOut` once they have made too little progress for
/// `limit`: less than [`MIN_PROGRESS`] bytes since the client stopped taking them at once. A
/// client that stops reading its answer, or takes a byte now and then, does not hold the answer
/// and the connection for long. A flush that completes (the answer went out) ends the watch.
struct Stalls<S> {
    inner: S,
    limit: Duration,
    /// Since the first write that had to wait: the deadline, and the bytes written since.
    stalled: Option<(Pin<Box<tokio::time::Sleep>>, usize)>,
}

/// Bytes a slow client must take per `limits.body_timeout_s` (1 MiB: 35 kB/s at the default).
const MIN_PROGRESS: usize = 1 << 20;

impl<S> Stalls<S> {
    fn new(inner: S, limit: Duration) -> Stalls<S> {
        Stalls {
            inner,
            limit,
            stalled: None,
        }
    }

    /// A write's result: enough progress ends a watch; none starts (or goes on with) one.
    fn after_write(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<std::io::Result<usize>>,
    ) -> Poll<std::io::Result<usize>> {
        match r {
            Poll::Pending => self.check(cx).map(Err),
            Poll::Ready(Ok(n)) => {
                if let Some((_, written)) = self.stalled.as_mut() {
                    *written += n;
                    if *written >= MIN_PROGRESS {
                        self.stalled = None;
                    }
                }
                Poll::Ready(Ok(n))
            }
            failed => failed,
        }
    }

    /// While waiting: `Ready(Err)` once the watch has run past the limit.
    fn check(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        let limit = self.limit;
        let (timer, _) = self
            .stalled
            .get_or_insert_with(|| (Box::pin(tokio::time::sleep(limit)), 0));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client took less than 1 MiB of its answer in limits.body_timeout_s",
            )),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Stalls<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Stalls<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.after_write(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.after_write(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => self.check(cx).map(Err),
            Poll::Ready(Ok(())) => {
                self.stalled = None; // all of it went out
                Poll::Ready(Ok(()))
            }
            failed => failed,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
