//! `POST /v1/tasks`: parse a batch (JSON or msgpack), check every task against its function
//! (signature, kind, pool, payload and file limits), persist it, answer with the ids.

use super::functions::owned;
use super::{read_body, record_response, ApiError, ApiResult, App, Caller, MSGPACK};
use crate::invalid::Invalid;
use crate::records::{unb64, FunctionRow};
use crate::signature;
use crate::store::writer::{Cmd, TaskInput};
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use fnx_api::{FileSubmission, FunctionKind, Signature, TaskSubmission};
use fnx_protocol::{Encoding, FileSource, FunctionId, Payload, TaskFile};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;

/// The longest walltime a task may ask for, in seconds.
const LONGEST_WAIT_S: f64 = fnx_protocol::LONGEST_WAIT.as_secs() as f64;

/// The largest memory limit a task may ask for, MiB (1 TiB).
const MAX_MEMORY_MB: u64 = 1 << 20;

/// What a function allows, looked up once per request.
struct Target {
    row: FunctionRow,
    kind: FunctionKind,
    signature: Option<Signature>,
    shell_params: Option<Vec<String>>,
}

struct Checker<'a> {
    app: &'a App,
    caller: &'a Caller,
    functions: HashMap<u64, Target>,
}

/// An input file as given: its name, and its bytes or a path (not checked yet).
type RawFile = (String, RawSource);

/// Where an input file's bytes are, as given.
enum RawSource {
    /// In the request.
    Inline(Vec<u8>),
    /// At this path (it must be absolute).
    Path(String),
}

/// Why a task's input files cannot be taken.
enum FilesError {
    /// A name or a path.
    Invalid(Invalid),
    /// The inline bytes, more than the payload limit leaves.
    TooLarge {
        /// Inline bytes.
        inline: usize,
        /// What the limit leaves.
        room: usize,
    },
}

/// Check input files: plain unique names, absolute paths, and the inline bytes within what is
/// left of the payload limit.
fn check_files(files: Vec<RawFile>, room: usize) -> Result<Vec<TaskFile>, FilesError> {
    let mut out: Vec<TaskFile> = Vec::with_capacity(files.len());
    let mut inline = 0usize;
    // Linear in the number of files (issue 12: a pairwise check was quadratic).
    let mut seen = std::collections::HashSet::with_capacity(files.len());
    for (j, (name, source)) in files.into_iter().enumerate() {
        let bad = |field: &str, why: String| {
            FilesError::Invalid(Invalid::at(format!("files[{j}].{field}"), why))
        };
        TaskFile::check_name(&name).map_err(|e| bad("name", e.to_string()))?;
        if !seen.insert(name.clone()) {
            return Err(bad("name", format!("{name:?} appears twice")));
        }
        let source = match source {
            RawSource::Inline(bytes) => {
                inline += bytes.len();
                FileSource::Inline(bytes)
            }
            RawSource::Path(path) if path.starts_with('/') => FileSource::Path(path),
            RawSource::Path(path) => {
                return Err(bad(
                    "path",
                    format!("must be an absolute path, got {path:?}"),
                ))
            }
        };
        out.push(TaskFile { name, source });
    }
    if inline > room {
        return Err(FilesError::TooLarge { inline, room });
    }
    Ok(out)
}

impl Checker<'_> {
    fn target(&mut self, id: u64) -> Result<&Target, ApiError> {
        if !self.functions.contains_key(&id) {
            let row = owned(self.app, self.caller, id).map_err(|e| {
                if e.status == StatusCode::NOT_FOUND {
                    ApiError::bad(format!("function {id} does not exist"))
                } else {
                    e
                }
            })?;
            if let Some(why) = &row.damaged {
                return Err(ApiError::bad(format!(
                    "function {id}: {why}; register the function again"
                )));
            }
            if let Some(info) = row
                .spec
                .build_key()
                .and_then(|key| self.app.builds.info(key))
                .filter(|i| i.state == crate::builds::BuildState::Failed)
            {
                return Err(ApiError::bad(format!(
                    "function {id}: {} (register it again to retry the build)",
                    crate::images::build_error(row.id, &info).message
                )));
            }
            let kind = row.spec.kind;
            let signature = row.spec.signature.clone();
            let shell_params = (kind == FunctionKind::Shell).then(|| row.spec.param_names());
            self.functions.insert(
                id,
                Target {
                    row,
                    kind,
                    signature,
                    shell_params,
                },
            );
        }
        Ok(&self.functions[&id])
    }

    /// Task `i` of a submit as read (`is_msgpack`: from a msgpack body), checked against its
    /// function, its pool and the limits.
    fn check(
        &mut self,
        i: usize,
        t: TaskSubmission<'_>,
        is_msgpack: bool,
    ) -> Result<TaskInput, ApiError> {
        // Every message starts with the field it is about: `tasks[3].args: ...`.
        let at = |m: String| ApiError::bad(format!("tasks[{i}].{m}"));
        let function = t
            .function
            .ok_or_else(|| bad_field(i, "function", "required (a function id)"))?;
        let raw_data = bytes_of(i, "", is_msgpack, t.data, t.data_b64)?;
        let raw_files = files_of(i, is_msgpack, t.files)?;
        let encoding = t.encoding.unwrap_or(Encoding::Json);
        let max_payload = self.app.limits.max_payload_bytes;
        let pool = match t.pool {
            Some(p) => self.app.pool(&p).map(|p| p.name.clone()).ok_or_else(|| {
                let names: Vec<_> = self.app.pools.iter().map(|p| p.name.as_str()).collect();
                at(format!(
                    "pool: unknown pool {p:?} (pools: {})",
                    names.join(", ")
                ))
            })?,
            None => self.app.pools[0].name.clone(),
        };
        let target = self.target(function).map_err(|e| ApiError {
            message: format!("tasks[{i}]: {}", e.message),
            ..e
        })?;
        let name = target.row.spec.name.as_deref().unwrap_or("");
        if target.row.deleted {
            return Err(at(format!(
                "function: function {function} ({name}) was deleted"
            )));
        }
        if target.kind == FunctionKind::Mpi {
            return Err(at(format!(
                "function: function {function} ({name}) is an mpi function: it is stored, but this version cannot run mpi tasks yet"
            )));
        }
        // A JSON `null` is no arguments.
        let args = t.args.filter(|a| a.get().trim() != "null");
        let data = match (encoding, args, raw_data) {
            (Encoding::Pickle, _, _) if target.kind != FunctionKind::Python => {
                return Err(at(format!(
                    "encoding: {} functions take JSON arguments",
                    target.kind.name()
                )))
            }
            (Encoding::Pickle, _, None) => {
                return Err(at("data_b64: required with encoding \"pickle\"".into()))
            }
            (Encoding::Pickle, _, Some(d)) => d,
            (Encoding::Json, args, data) => {
                // The arguments' own text goes to the worker unchanged (numbers keep every
                // digit, objects their key order); a parsed copy serves only the checks.
                let text: Vec<u8> = match (args, data) {
                    (Some(a), _) => a.get().as_bytes().to_vec(),
                    (None, Some(d)) => d,
                    (None, None) => b"[]".to_vec(),
                };
                let args: Value = serde_json::from_slice(&text)
                    .map_err(|e| at(format!("args: not valid JSON: {e}")))?;
                let bind_err =
                    |e: signature::BindError| at(format!("args: function {function} ({name}) {e}"));
                if let Some(params) = &target.shell_params {
                    let values = signature::shell_values(params, &text).map_err(bind_err)?;
                    serde_json::to_vec(&values).expect("strings serialise")
                } else {
                    if let Some(sig) = &target.signature {
                        signature::check_binding(sig, &args).map_err(bind_err)?;
                    } else if !matches!(args, Value::Array(_) | Value::Object(_)) {
                        return Err(at(format!(
                            "args: must be an array or object, got {}",
                            signature::json_type(&args)
                        )));
                    }
                    text
                }
            }
        };
        if data.len() > max_payload {
            return Err(ApiError::too_large(format!(
                "tasks[{i}].args: arguments of {} bytes exceed the limit of {} bytes (limits.max_payload_mb)",
                data.len(),
                max_payload
            )));
        }
        let walltime_ms = match t.walltime {
            None => None,
            Some(w) if w > 0.0 && w <= LONGEST_WAIT_S => Some((w * 1000.0).ceil() as u64),
            Some(w) => {
                return Err(at(format!(
                    "walltime: must be a number of seconds above 0 and at most {LONGEST_WAIT_S:e}, got {w}"
                )))
            }
        };
        let retries = t.retries.unwrap_or(2);
        if retries > 100 {
            return Err(at(format!("retries: at most 100, got {}", retries)));
        }
        let files = check_files(raw_files, max_payload - data.len()).map_err(|e| match e {
            FilesError::TooLarge { inline, room } => ApiError::too_large(format!(
                "tasks[{i}].files: {inline} bytes of inline files exceed what the payload limit \
                 leaves ({room} bytes, limits.max_payload_mb); pass large files by \"path\" on \
                 a shared filesystem"
            )),
            FilesError::Invalid(e) => at(e.to_string()),
        })?;
        let worker_mb = self.app.pool(&pool).and_then(|p| p.mem_per_worker_mb);
        let memory_mb = match (t.memory_mb, worker_mb) {
            (None, _) => None,
            (Some(m), _) if m == 0 || m > MAX_MEMORY_MB => {
                return Err(at(format!(
                    "memory_mb: must be a number of MiB in 1..={MAX_MEMORY_MB}, got {m}"
                )))
            }
            (Some(m), Some(w)) if m > w => {
                return Err(at(format!(
                    "memory_mb: {m} MiB is more than a worker of pool {pool:?} has ({w} MiB, its \
                     mem_per_worker)"
                )))
            }
            (Some(m), _) => Some(m as u32),
        };
        Ok(TaskInput {
            memory_mb,
            files,
            function: FunctionId(function),
            pool,
            priority: t.priority.unwrap_or(0),
            walltime_ms,
            retries,
            args: Payload { encoding, data },
        })
    }
}

/// A field's problem in task `i` of a submit, named by its path.
fn bad_field(i: usize, field: &str, why: impl std::fmt::Display) -> ApiError {
    ApiError::from(Invalid::at(field, why.to_string()).under(&format!("tasks[{i}]")))
}

/// Bytes given in `data` (msgpack bodies) or `data_b64` (JSON bodies) of task `i`; `at` is the
/// fields' path inside the task (`""` for its arguments, `files[j].` for a file).
fn bytes_of(
    i: usize,
    at: &str,
    is_msgpack: bool,
    data: Option<Vec<u8>>,
    data_b64: Option<String>,
) -> Result<Option<Vec<u8>>, ApiError> {
    let bad = |field: &str, why: String| bad_field(i, &format!("{at}{field}"), why);
    match (is_msgpack, data, data_b64) {
        (true, _, Some(_)) => Err(bad(
            "data_b64",
            "only in JSON bodies; a msgpack body gives the bytes in data".into(),
        )),
        (false, Some(_), _) => Err(bad(
            "data",
            if at.is_empty() {
                "only in msgpack bodies; a JSON body gives args, or data_b64 with a pickle"
            } else {
                "only in msgpack bodies; a JSON body gives them in data_b64"
            }
            .into(),
        )),
        (true, data, None) => Ok(data),
        (false, None, Some(s)) => {
            Ok(Some(unb64(&s).map_err(|e| {
                bad("data_b64", format!("not base64: {e}"))
            })?))
        }
        (false, None, None) => Ok(None),
    }
}

/// A task's input files as given: each with its bytes (by the body's own encoding) or a path,
/// not both; names and paths are checked by [`check_files`].
fn files_of(
    i: usize,
    is_msgpack: bool,
    files: Vec<FileSubmission>,
) -> Result<Vec<RawFile>, ApiError> {
    files
        .into_iter()
        .enumerate()
        .map(|(j, f)| {
            let at = format!("files[{j}].");
            let inline = bytes_of(i, &at, is_msgpack, f.data, f.data_b64)?;
            let source = match (inline, f.path) {
                (Some(bytes), None) => RawSource::Inline(bytes),
                (None, Some(p)) => RawSource::Path(p),
                _ => {
                    let bytes = if is_msgpack { "data" } else { "data_b64" };
                    return Err(bad_field(
                        i,
                        &format!("files[{j}]"),
                        format!("give exactly one of {bytes} and path"),
                    ));
                }
            };
            Ok((f.name, source))
        })
        .collect()
}

/// The most characters of an error message about a body: serde quotes the value it did not
/// expect, and a hostile value can be long.
const MAX_MESSAGE_CHARS: usize = 400;

/// A body that does not read as a submit: where, and why (413 past the task limit).
fn unreadable<E: std::fmt::Display>(e: serde_path_to_error::Error<E>, max: usize) -> ApiError {
    let path = e.path().to_string();
    let mut why = e.inner().to_string();
    if path == "tasks" && why.starts_with("more than ") {
        return ApiError::too_large(format!(
            "tasks: more than {max} tasks in one request; the limit is {max} \
             (limits.max_tasks_per_request)"
        ));
    }
    if let Some((cut, _)) = why.char_indices().nth(MAX_MESSAGE_CHARS) {
        why.truncate(cut);
        why.push_str("...");
    }
    match path.as_str() {
        "." => ApiError::bad(format!("the body: {why}")),
        _ => ApiError::bad(format!("{path}: {why}")),
    }
}

/// Reads a submit's body: an object (never an array) with `tasks`, at most `max` of them, each
/// an object; so a body cannot cost more memory than the tasks it may hold (a task read takes
/// far more room than its smallest form in a body).
struct Batch {
    max: usize,
}

impl<'de> serde::de::DeserializeSeed<'de> for Batch {
    type Value = Option<Vec<TaskSubmission<'de>>>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Batch {
    type Value = Option<Vec<TaskSubmission<'de>>>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object {\"tasks\": [...]}")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        use serde::de::Error;
        let mut tasks = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<str>>()? {
            if key != "tasks" {
                return Err(A::Error::unknown_field(&key, &["tasks"]));
            }
            if tasks.is_some() {
                return Err(A::Error::duplicate_field("tasks"));
            }
            tasks = Some(map.next_value_seed(fnx_api::submit::MapsUpTo::new(self.max))?);
        }
        Ok(tasks.flatten())
    }
}

/// Read `bytes` with `de` into a batch of at most `max` tasks; an error names its path.
fn read_batch<'de, D: serde::Deserializer<'de>>(
    de: D,
    max: usize,
) -> Result<Option<Vec<TaskSubmission<'de>>>, ApiError> {
    use serde::de::DeserializeSeed;
    let mut track = serde_path_to_error::Track::new();
    Batch { max }
        .deserialize(serde_path_to_error::Deserializer::new(de, &mut track))
        .map_err(|e| unreadable(serde_path_to_error::Error::new(track.path(), e), max))
}

/// Read a submit's body, JSON or msgpack, into its tasks. Both are read into the same types
/// (`fnx_api::TaskSubmission`): an error names the field's path (`tasks[3].walltime`), and a
/// JSON task's `args` borrow their own text from the body.
fn parse_submit(
    is_msgpack: bool,
    bytes: &[u8],
    max: usize,
) -> Result<Vec<TaskSubmission<'_>>, ApiError> {
    let tasks = if is_msgpack {
        let mut cursor = std::io::Cursor::new(bytes);
        let tasks = read_batch(&mut rmp_serde::Deserializer::new(&mut cursor), max)?;
        if cursor.position() != bytes.len() as u64 {
            return Err(ApiError::bad(format!(
                "the msgpack body has {} bytes after its end (at byte {})",
                bytes.len() as u64 - cursor.position(),
                cursor.position()
            )));
        }
        tasks
    } else {
        // serde_json skips the values it keeps as text without a depth limit, at a byte of
        // memory per level: `[[[[...` of 256 MiB would cost 2.5 times its size.
        if let Some(at) = nested_deeper_than(bytes, MAX_JSON_DEPTH) {
            return Err(ApiError::bad(format!(
                "the body is not valid JSON here: it nests arrays and objects deeper than \
                 {MAX_JSON_DEPTH} levels (at byte {at})"
            )));
        }
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let tasks = read_batch(&mut de, max)?;
        de.end()
            .map_err(|e| ApiError::bad(format!("the body is not valid JSON: {e}")))?;
        tasks
    };
    tasks.ok_or_else(|| ApiError::bad("tasks: required (an array of tasks)"))
}

/// Parse a submit body and check each of its tasks.
fn check_submit(
    app: &App,
    caller: &Caller,
    is_msgpack: bool,
    body: super::ReadBody,
) -> Result<Vec<TaskInput>, ApiError> {
    let tasks = parse_submit(is_msgpack, &body, app.limits.max_tasks_per_request)?;
    let max = app.limits.max_tasks_per_request;
    if tasks.len() > max {
        return Err(ApiError::too_large(format!(
            "{} tasks in one request; the limit is {max} (limits.max_tasks_per_request)",
            tasks.len()
        )));
    }
    if tasks.is_empty() {
        return Err(ApiError::bad("tasks: must hold at least one task"));
    }
    let mut checker = Checker {
        app,
        caller,
        functions: HashMap::new(),
    };
    // Each task's arguments are copied out of the body once, into what the store keeps.
    tasks
        .into_iter()
        .enumerate()
        .map(|(i, t)| checker.check(i, t, is_msgpack))
        .collect()
}

/// How deep a request's JSON may nest.
const MAX_JSON_DEPTH: usize = 128;

/// The offset at which `text` nests arrays and objects deeper than `max`, found in one pass
/// (strings and their escapes are skipped).
fn nested_deeper_than(text: &[u8], max: usize) -> Option<usize> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (at, &b) in text.iter().enumerate() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Some(at);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

pub(super) async fn submit(
    State(app): State<Arc<App>>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    // In `unix` mode tasks run as their owner's account: refused before anything is stored
    // or spawned when there is no such account or it may not be used (FAULTS.md 24).
    if app.identities.mode() == crate::config::UsersMode::Unix {
        if let Err(r) = app.identities.account(&caller.user) {
            app.identities
                .log_refusal(&format!("tasks of user {:?}", caller.user), &r);
            return Err(ApiError::not_allowed());
        }
    }
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(k) => {
            let k = k
                .to_str()
                .map_err(|_| ApiError::bad("Idempotency-Key: must be printable ASCII"))?;
            if k.is_empty() || k.len() > 200 {
                return Err(ApiError::bad("Idempotency-Key: must be 1 to 200 bytes"));
            }
            Some(k.to_string())
        }
    };
    let body = read_body(&app, &headers, body, app.limits.max_request_bytes).await?;
    // What the key stands for: this very request (its media type and body).
    let key = key.map(|k| {
        let ctype = headers
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let mut fp = crate::auth::hash_token(ctype);
        fp.push_str(&crate::auth::hash_bytes(&body));
        (k, fp)
    });
    let is_msgpack = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(MSGPACK));
    // Parsing and checking are linear, but a request may hold 10,000 tasks: off the HTTP
    // threads, so that other requests keep their latency.
    let (a, who) = (app.clone(), caller.clone());
    let tasks = tokio::task::spawn_blocking(move || check_submit(&a, &who, is_msgpack, body))
        .await
        .map_err(|e| ApiError::unavailable(format!("checking the request failed: {e}")))??;
    let (tx, rx) = tokio::sync::oneshot::channel();
    app.send(Cmd::Submit {
        owner: caller.user,
        tasks,
        key,
        reply: tx,
    })?;
    let done = rx
        .await
        .map_err(|_| ApiError::unavailable("the store is shutting down"))??;
    let ids: Vec<u64> = done.ids.iter().map(|t| t.0).collect();
    let mut resp = record_response(StatusCode::CREATED, &fnx_api::TaskIds { ids });
    if done.replayed {
        resp.headers_mut().insert(
            "idempotent-replayed",
            header::HeaderValue::from_static("true"),
        );
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::nested_deeper_than;

    #[test]
    fn depth_counts_arrays_and_objects_outside_strings() {
        assert_eq!(nested_deeper_than(b"[[1],{\"a\":[2]}]", 3), None);
        assert_eq!(nested_deeper_than(b"[[[1]]]", 2), Some(2));
        // Brackets inside strings, escaped quotes included, do not count.
        assert_eq!(
            nested_deeper_than(br#"["[[[[", "\"[[[[", {"k": "}}]]"}]"#, 2),
            None
        );
        let deep = vec![b'['; 1 << 20];
        assert_eq!(nested_deeper_than(&deep, 128), Some(128));
    }
}
