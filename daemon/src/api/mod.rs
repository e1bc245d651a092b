//! The HTTP API (docs/api.md): routing, authentication, errors and body reading. Handlers are
//! in [`functions`], [`submit`], [`tasks`] and [`status`].

mod caller;
mod functions;
mod status;
mod submit;
mod tasks;
mod tokens;

pub use caller::{Caller, SocketPeer};

/// The msgpack media type (submit bodies, results answers).
const MSGPACK: &str = "application/msgpack";

use crate::config::Limits;
use crate::store::writer::{Cmd, Shared};
use crate::store::{Reader, StoreError};
use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use fnx_interchange::Handle;
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One pool as the API sees it.
pub struct PoolRef {
    /// Its name.
    pub name: String,
    /// Its interchange.
    pub handle: Arc<Handle>,
    /// Its provider, blocks and failure, published by its block thread.
    pub report: Arc<Mutex<crate::blocks::PoolReport>>,
    /// Memory per worker slot (MiB): the most a task of this pool may ask for.
    pub mem_per_worker_mb: Option<u64>,
}

/// Everything the handlers share.
pub struct App {
    /// Read connections.
    pub reader: Reader,
    /// The writer's queue.
    pub writer: Mutex<Sender<Cmd>>,
    /// Counters and the results sequence.
    pub shared: Arc<Shared>,
    /// Pools; the first is the default.
    pub pools: Vec<PoolRef>,
    /// Limits.
    pub limits: Limits,
    /// Interpreter used to read signatures of Python source.
    pub python: String,
    /// Start time.
    pub started: Instant,
    /// The store file.
    pub store_path: PathBuf,
    /// Cleared when the daemon stops: new work is refused with 503.
    pub accepting: AtomicBool,
    /// Container images built from functions' dependencies.
    pub builds: crate::builds::Builds,
    /// Functions whose tasks may wait for an image build, with the build's key.
    pub building: Mutex<HashMap<fnx_protocol::FunctionId, String>>,
    /// Whose account users' code runs under, and who is refused.
    pub identities: crate::identity::Identities,
    tokens: caller::TokenCache,
    /// Signature readers that may run at once (each is an interpreter of up to 1 GiB).
    signature_readers: Arc<tokio::sync::Semaphore>,
    /// MiB of large request bodies that may be read at once (4 × `limits.max_request_mb`).
    body_budget: Arc<tokio::sync::Semaphore>,
    /// Long-polls woken by a result of their user.
    poll_wakeups: std::sync::atomic::AtomicU64,
    /// Open API connections (counted by the server).
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
}

impl App {
    /// The shared state of the API.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        reader: Reader,
        writer: Sender<Cmd>,
        shared: Arc<Shared>,
        pools: Vec<PoolRef>,
        limits: Limits,
        python: String,
        store_path: PathBuf,
        builds: crate::builds::Builds,
        identities: crate::identity::Identities,
    ) -> App {
        let body_budget_mib = (limits.max_request_bytes >> 20).max(1) * 4;
        App {
            reader,
            writer: Mutex::new(writer),
            shared,
            pools,
            limits,
            python,
            started: Instant::now(),
            store_path,
            accepting: AtomicBool::new(true),
            builds,
            building: Mutex::new(HashMap::new()),
            identities,
            tokens: caller::TokenCache::default(),
            body_budget: Arc::new(tokio::sync::Semaphore::new(body_budget_mib)),
            poll_wakeups: Default::default(),
            connections: Default::default(),
            signature_readers: Arc::new(tokio::sync::Semaphore::new(
                (fnx_sys::node::usable_cpus() as usize / 2).clamp(1, 4),
            )),
        }
    }

    fn send(&self, cmd: Cmd) -> Result<(), ApiError> {
        if !self.accepting.load(Ordering::Relaxed) {
            return Err(ApiError::unavailable("the daemon is shutting down"));
        }
        self.writer
            .lock()
            .map_err(|_| ApiError::unavailable("the store is shutting down"))?
            .send(cmd)
            .map_err(|_| ApiError::unavailable("the store is shutting down"))
    }

    fn pool(&self, name: &str) -> Option<&PoolRef> {
        self.pools.iter().find(|p| p.name == name)
    }

    /// Why a queued task of `function` in `pool` waits: the pool is marked failed (its blocks
    /// never connect), or the function's container image is being built.
    fn waiting(&self, pool: &str, function: fnx_protocol::FunctionId) -> Option<String> {
        let failed = self
            .pool(pool)
            .and_then(|p| p.report.lock().ok()?.failed.clone());
        failed.or_else(|| {
            let mut building = self.building.lock().ok()?;
            let key = building.get(&function)?.clone();
            match self.builds.info(&key) {
                Some(i) if i.state == crate::builds::BuildState::Building => Some(format!(
                    "its function's container image is being built (log: {})",
                    i.log.display()
                )),
                _ => {
                    building.remove(&function);
                    None
                }
            }
        })
    }
}

/// An error answer: `{"error": {"code", "message"}}` with a status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl From<crate::invalid::Invalid> for ApiError {
    fn from(e: crate::invalid::Invalid) -> ApiError {
        ApiError::bad(e.to_string())
    }
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    /// The identity may not run code here; deliberately vague (the admin log says why).
    fn not_allowed() -> ApiError {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "identity_not_allowed",
            crate::identity::NOT_ALLOWED,
        )
    }
    fn too_large(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }
    /// Too much of the same work at once: 503 with `Retry-After`.
    fn busy(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", message)
    }
    fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            message,
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::QueueLimit { .. } => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "queue_limit", e.to_string())
            }
            StoreError::ByteQuota { .. } => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "quota", e.to_string())
            }
            StoreError::IdempotencyConflict { .. } => {
                ApiError::new(StatusCode::CONFLICT, "idempotency_conflict", e.to_string())
            }
            StoreError::Unavailable(m) => ApiError::unavailable(m),
            other => {
                tracing::error!("store: {other}");
                ApiError::unavailable(format!("the task store failed: {other}"))
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = fnx_api::service::ErrorBody {
            error: fnx_api::service::ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        let mut r = record_response(self.status, &body);
        if self.code == "busy" {
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        r
    }
}

type ApiResult = Result<Response, ApiError>;

/// A JSON answer serialised straight from `v` (no intermediate tree, which would re-parse
/// results and lose digits of numbers).
fn record_response(status: StatusCode, v: &impl serde::Serialize) -> Response {
    match serde_json::to_vec(v) {
        Ok(body) => (status, [(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => ApiError::bad(format!("cannot encode the answer: {e}")).into_response(),
    }
}

/// A request body as read, holding its share of the daemon's budget for large bodies until it
/// is dropped (after its request is handled).
pub(crate) struct ReadBody {
    bytes: Bytes,
    _budget: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl std::ops::Deref for ReadBody {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

/// Bodies up to this size need no share of the budget.
const SMALL_BODY: usize = 1 << 20;

/// Read a request body, refusing more than `limit` bytes while reading (chunked bodies too):
/// memory stays within the limit, and a body that pauses longer than `limits.body_timeout_s`
/// is a 408. Large bodies (over 1 MiB, or of unknown length) together may hold at most four
/// times `limits.max_request_mb` at once; past that a request gets 503 `busy`.
async fn read_body(
    app: &App,
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<ReadBody, ApiError> {
    use http_body_util::BodyExt;
    let too_large = || {
        ApiError::too_large(format!(
            "the request body exceeds the limit of {} MiB (limits.max_request_mb)",
            limit >> 20
        ))
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    // Reserve once what the client declared, or else the limit: address space only, as pages
    // are resident once written. Growing by doubling would leave every smaller copy resident
    // in the allocator for a while: twice the body's size or more. If the reservation fails
    // (strict overcommit), the buffer grows as it fills instead.
    let want = declared.map_or(limit, |n| n as usize);
    let budget = if want > SMALL_BODY {
        let mib = want.div_ceil(1 << 20) as u32;
        Some(
            app.body_budget
                .clone()
                .try_acquire_many_owned(mib)
                .map_err(|_| {
                    ApiError::busy(
                        "too many large request bodies are being read at once; retry in a moment",
                    )
                })?,
        )
    } else {
        None
    };
    let mut buf: Vec<u8> = Vec::new();
    let _ = buf.try_reserve_exact(want);
    let mut body = body;
    let pause = app.limits.body_timeout;
    loop {
        let frame = match tokio::time::timeout(pause, body.frame()).await {
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "body_timeout",
                    format!(
                        "the request body paused for more than {} s (limits.body_timeout_s) \
                         after {} bytes",
                        pause.as_secs_f64(),
                        buf.len()
                    ),
                ))
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(ApiError::bad(format!("cannot read the request body: {e}")))
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        let need = buf.len() + data.len();
        if need > limit {
            return Err(too_large());
        }
        if need > buf.capacity() {
            // Double, but never past the limit: the buffer never holds more than it allows.
            let want = need.max(buf.capacity() * 2).min(limit);
            buf.reserve_exact(want - buf.len());
        }
        buf.extend_from_slice(&data);
    }
    Ok(ReadBody {
        bytes: Bytes::from(buf),
        _budget: budget,
    })
}

fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad(format!("the body is not valid JSON: {e}")))
}

fn parse_id(text: &str, what: &str) -> Result<u64, ApiError> {
    text.parse::<u64>()
        .map_err(|_| ApiError::bad(format!("{what} must be a positive integer, got {text:?}")))
}

/// Run a store read that may take milliseconds (thousands of rows) on a blocking thread, so
/// that the two HTTP worker threads keep serving short requests meanwhile.
async fn blocking<T: Send + 'static>(
    app: &Arc<App>,
    read: impl FnOnce(&App) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    let app = app.clone();
    tokio::task::spawn_blocking(move || read(&app))
        .await
        .map_err(|e| ApiError::unavailable(format!("a store read failed: {e}")))?
        .map_err(ApiError::from)
}

/// Wait until `results` (a user's, see [`Shared::results_of`]) passes the value last seen
/// through it, or `until` comes. The caller is checked again every
/// [`caller::TOKEN_RECHECK`]: a token revoked or expired meanwhile ends the wait with 401.
///
/// [`Shared::results_of`]: crate::store::writer::Shared::results_of
async fn wait_for_results(
    app: &App,
    caller: &Caller,
    results: &mut tokio::sync::watch::Receiver<u64>,
    until: Instant,
) -> Result<(), ApiError> {
    loop {
        if results.has_changed().unwrap_or(true) {
            return Ok(());
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        let slice = left.min(caller::TOKEN_RECHECK);
        if tokio::time::timeout(slice, results.changed()).await.is_ok() {
            app.poll_wakeups.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        app.recheck(caller)?;
    }
}

fn wait_param(q: &HashMap<String, String>) -> Result<Duration, ApiError> {
    match q.get("wait") {
        None => Ok(Duration::ZERO),
        Some(w) => w
            .parse::<f64>()
            .ok()
            .filter(|w| w.is_finite() && *w >= 0.0)
            .map(|w| Duration::from_secs_f64(w.min(60.0)))
            .ok_or_else(|| ApiError::bad(format!("wait must be a number of seconds, got {w:?}"))),
    }
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint; see GET /v1/openapi.json")
}

/// The OpenAPI document, made once from the API's types (`fnx_api::openapi`).
fn openapi_document() -> &'static str {
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DOC.get_or_init(fnx_api::openapi::document)
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        openapi_document(),
    )
        .into_response()
}

/// The API's routes.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/health", get(status::health))
        .route("/v1/openapi.json", get(openapi))
        .route("/metrics", get(status::metrics))
        .route("/v1/whoami", get(status::whoami))
        .route("/v1/status", get(status::status))
        .route(
            "/v1/functions",
            post(functions::register).get(functions::list),
        )
        .route(
            "/v1/functions/{id}",
            get(functions::show).delete(functions::delete),
        )
        .route("/v1/tasks", post(submit::submit))
        .route("/v1/tasks/status", post(tasks::status_many))
        .route("/v1/tasks/cancel", post(tasks::cancel_many))
        .route("/v1/tasks/{id}", get(tasks::show).delete(tasks::cancel))
        .route("/v1/results", get(tasks::results))
        .route("/v1/tokens", get(tokens::list).post(tokens::create))
        .route("/v1/tokens/{id}", axum::routing::delete(tokens::revoke))
        .route(
            "/v1/pools/{pool}/blocks/{id}/{action}",
            post(status::block_action),
        )
        .fallback(not_found)
        .with_state(app)
}
