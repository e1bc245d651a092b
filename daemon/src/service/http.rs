//! Serving the API: the TCP listener the caller bound, and the local Unix socket.

use super::{io, DaemonError};
use crate::api::{self, App};
use std::future::{Future, IntoFuture};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

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
    rt.block_on(async move {
        let listener =
            tokio::net::TcpListener::from_std(listener).map_err(io("cannot use the listener"))?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        // No Nagle delay on small answers (one request at a time per keep-alive connection).
        let listener =
            axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
                let _ = tcp.set_nodelay(true);
            });
        // The local socket: the same API, the caller known by the kernel.
        let (utx, urx) = tokio::sync::oneshot::channel::<()>();
        let local = match socket {
            Some(l) => {
                let l = tokio::net::UnixListener::from_std(l)
                    .map_err(io("cannot use the local socket"))?;
                let svc = api::router(app.clone())
                    .into_make_service_with_connect_info::<api::SocketPeer>();
                Some(tokio::spawn(
                    axum::serve(l, svc)
                        .with_graceful_shutdown(async move {
                            let _ = urx.await;
                        })
                        .into_future(),
                ))
            }
            None => None,
        };
        let server = axum::serve(listener, api::router(app)).with_graceful_shutdown(async move {
            let _ = rx.await;
        });
        let mut server = std::pin::pin!(server.into_future());
        tokio::select! {
            r = &mut server => return r.map_err(io("the HTTP server failed")),
            () = shutdown => {}
        }
        tracing::info!("stopping: no new requests; waiting up to 2 s for requests in progress");
        let _ = tx.send(());
        let _ = utx.send(());
        let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
        if let Some(local) = local {
            let _ = tokio::time::timeout(Duration::from_secs(1), local).await;
        }
        Ok(())
    })?;
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}
