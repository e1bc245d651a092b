//! `/v1/functions`: register, list, show, delete.

use super::{parse_id, parse_json, read_body, record_response, ApiError, ApiResult, App, Caller};
use crate::builds::recipe;
use crate::images;
use crate::records::FunctionRow;
use crate::signature;
use crate::store::writer::{Cmd, FunctionInput};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use fnx_api::service::{FunctionList, FunctionRecord};
use fnx_api::{BuildRef, ContainerSpec, Dependencies, FunctionKind, FunctionSpec};
use fnx_protocol::{FunctionBody, FunctionContainer, FunctionId};
use serde_json::{Map, Value};
use std::sync::Arc;
use std::time::Duration;

const MAX_FUNCTION_BYTES: usize = 4 << 20;

fn string_field<'a>(m: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(ApiError::bad(format!(
            "{key}: must be a string, got {}",
            signature::json_type(other)
        ))),
    }
}

fn required<'a>(m: &'a Map<String, Value>, key: &str, why: &str) -> Result<&'a str, ApiError> {
    string_field(m, key)?
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| ApiError::bad(format!("{key}: required {why}")))
}

struct Parsed {
    name: Option<String>,
    spec: FunctionSpec,
    body: Option<FunctionBody>,
    container: Option<FunctionContainer>,
    build: Option<String>,
}

/// The function's container: the one it names, or the image built from its dependencies
/// (requested here; the build runs in the background and its tasks wait for it). Recorded in
/// `spec`.
async fn container(
    app: &App,
    caller: &Caller,
    m: &Map<String, Value>,
    spec: &mut FunctionSpec,
) -> Result<(Option<FunctionContainer>, Option<String>), ApiError> {
    let named = match m.get("container") {
        None | Some(Value::Null) => None,
        Some(v) => Some(images::parse_container(v)?),
    };
    let deps = match m.get("dependencies") {
        None | Some(Value::Null) => None,
        Some(v) => Some(recipe::parse(v)?),
    };
    spec.container = named.as_ref().map(ContainerSpec::from);
    let Some(deps) = deps else {
        return Ok((named, None));
    };
    if named.is_some() {
        return Err(ApiError::bad(
            "give container (an existing image) or dependencies (an image built from them), \
             not both",
        ));
    }
    app.builds.can_build().map_err(|e| {
        ApiError::bad(format!(
            "dependencies: this daemon cannot build container images: {e} (see [builds] in \
             the site configuration)"
        ))
    })?;
    let builds = app.builds.clone();
    let (wanted, user) = (deps.clone(), caller.user.clone());
    let info = tokio::task::spawn_blocking(move || builds.request(&wanted, &user))
        .await
        .map_err(|e| ApiError::bad(format!("cannot start the image build: {e}")))?
        .map_err(|e| match e {
            crate::builds::BuildError::UserLimit(_) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "build_limit", e.to_string())
            }
            e => ApiError::unavailable(format!("cannot start the image build: {e}")),
        })?;
    let c = FunctionContainer {
        runtime: images::runtime_of_builds(app.builds.command()),
        image: info.image.display().to_string(),
    };
    spec.container = Some(ContainerSpec::from(&c));
    spec.dependencies = Some(Dependencies {
        python: deps.python,
        system: deps.system,
    });
    spec.build = Some(BuildRef {
        key: info.key.clone(),
        status: None,
    });
    Ok((Some(c), Some(info.key)))
}

/// Validate a registration body into the stored record and what managers run.
async fn parse(app: &App, caller: &Caller, v: Value) -> Result<Parsed, ApiError> {
    let Value::Object(m) = v else {
        return Err(ApiError::bad("the body must be a JSON object"));
    };
    const KNOWN: [&str; 9] = [
        "kind",
        "name",
        "source",
        "entry",
        "ref",
        "command",
        "container",
        "dependencies",
        "description",
    ];
    if let Some(k) = m.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(ApiError::bad(format!(
            "{k}: unknown field (known: {})",
            KNOWN.join(", ")
        )));
    }
    let name = string_field(&m, "name")?.map(str::to_string);
    let kind = required(&m, "kind", "(\"python\", \"shell\" or \"mpi\")")?;
    let mut spec = FunctionSpec {
        description: string_field(&m, "description")?.map(str::to_string),
        ..FunctionSpec::new(FunctionKind::Python)
    };
    let body = match kind {
        "python" => match (string_field(&m, "source")?, string_field(&m, "ref")?) {
            (Some(_), Some(_)) => {
                return Err(ApiError::bad(
                    "give either source (with entry) or ref, not both",
                ))
            }
            (Some(source), None) => {
                let entry = required(&m, "entry", "with source: the name of the function to call")?;
                let max = app.limits.max_source_bytes;
                if source.len() > max {
                    return Err(ApiError::too_large(format!(
                        "source: {} KiB; the limit is {} KiB (limits.max_source_kb). Put large \
                         code in a module the workers import, and register a ref to it",
                        source.len() >> 10,
                        max >> 10
                    )));
                }
                // A bounded number of readers at a time; the others wait their turn a while.
                // The slot is owned and moved into the reader's thread: a client that
                // disconnects ends this handler, not the reader, which keeps it until it ends.
                let readers = app.signature_readers.clone();
                let permit = tokio::time::timeout(Duration::from_secs(30), readers.acquire_owned())
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .ok_or_else(|| {
                        ApiError::busy("the daemon is busy reading other functions' signatures")
                    })?;
                let (python, src, ent) =
                    (app.python.clone(), source.to_string(), entry.to_string());
                let sig = tokio::task::spawn_blocking(move || {
                    let _slot = permit;
                    signature::from_python_source(&python, &src, &ent)
                })
                .await
                .map_err(|e| ApiError::bad(format!("cannot read the signature: {e}")))?
                .map_err(|e| ApiError::bad(format!("source: {e}")))?;
                spec.source = Some(source.into());
                spec.entry = Some(entry.into());
                spec.signature = Some(sig);
                Some(FunctionBody::PythonSource {
                    source: source.into(),
                    name: entry.into(),
                })
            }
            (None, Some(r)) => {
                let (module, qualname) = r
                    .split_once(':')
                    .filter(|(m, q)| !m.is_empty() && !q.is_empty())
                    .ok_or_else(|| {
                        ApiError::bad(format!("ref: must be \"module:qualname\", got {r:?}"))
                    })?;
                spec.reference = Some(r.into());
                Some(FunctionBody::PythonRef {
                    module: module.into(),
                    qualname: qualname.into(),
                })
            }
            (None, None) => {
                return Err(ApiError::bad(
                    "python functions need source (with entry) or ref",
                ))
            }
        },
        "shell" | "mpi" => {
            let why = format!("for {kind} functions: the command template");
            let command = required(&m, "command", &why)?;
            let t = fnx_protocol::shell::parse(command)
                .map_err(|e| ApiError::bad(format!("command: {e}")))?;
            spec.command = Some(command.into());
            spec.signature = Some(signature::of_shell(&t.params));
            if kind == "shell" {
                spec.kind = FunctionKind::Shell;
                Some(FunctionBody::Shell {
                    template: command.into(),
                })
            } else {
                spec.kind = FunctionKind::Mpi;
                None
            }
        }
        other => {
            return Err(ApiError::bad(format!(
                "kind: must be \"python\", \"shell\" or \"mpi\", got {other:?}"
            )))
        }
    };
    let (container, build) = container(app, caller, &m, &mut spec).await?;
    Ok(Parsed {
        name,
        spec,
        body,
        container,
        build,
    })
}

pub(super) async fn register(
    State(app): State<Arc<App>>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let bytes = read_body(&app, &headers, body, MAX_FUNCTION_BYTES).await?;
    // Each user's functions are held in memory by every pool: their total size is a quota
    // (the body stands for the new record, which is at most about as large).
    let user = caller.user.clone();
    let used = super::blocking(&app, move |a| a.reader.function_bytes(&user)).await?;
    let quota = app.limits.max_function_bytes_per_user;
    if used + bytes.len() as u64 > quota {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "quota",
            format!(
                "your functions hold {} KiB; this one would pass the quota of {} MiB \
                 (limits.max_function_mb_per_user): delete functions you no longer use",
                used.div_ceil(1024),
                quota >> 20
            ),
        ));
    }
    let p = parse(&app, &caller, parse_json(&bytes)?).await?;
    let mut spec = p.spec;
    // Default name: the entry, the ref's qualname, or (shell, mpi) `<kind>-<id>` once the id
    // is known.
    let name = p.name.unwrap_or_else(|| {
        spec.entry
            .as_deref()
            .or_else(|| spec.reference.as_deref().and_then(|r| r.rsplit(':').next()))
            .unwrap_or("")
            .to_string()
    });
    let created = crate::store::now();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let input = FunctionInput {
        owner: caller.user.clone(),
        name: name.clone(),
        created,
        spec: spec.clone(),
        body: p.body,
        container: p.container,
        build: p.build.clone(),
    };
    app.send(Cmd::Register(Box::new(input), tx))?;
    // Once stored, the function is held in every pool (the store writer does that) until
    // its build ends: the rest runs as its own task, so a client that disconnects now cannot
    // leave it held forever.
    let (app2, build) = (app.clone(), p.build.clone());
    let id = tokio::spawn(async move {
        let id = rx
            .await
            .map_err(|_| ApiError::unavailable("the store is shutting down"))??;
        if let Some(key) = build {
            watch_build(&app2, &key, id)?;
        }
        Ok::<_, ApiError>(id)
    })
    .await
    .map_err(|e| ApiError::unavailable(format!("the registration did not finish: {e}")))??;
    let shown = |row: &FunctionRow| with_build(&app, row.record(false));
    let name = if name.is_empty() {
        format!("{}-{}", spec.kind.name(), id.0)
    } else {
        name
    };
    spec.name = Some(name);
    let row = FunctionRow {
        id,
        owner: caller.user,
        spec,
        created,
        deleted: false,
        damaged: None,
    };
    Ok(record_response(StatusCode::CREATED, &shown(&row)))
}

/// Release function `id` (held by the store writer) when the build `key` ends. If the build
/// runs now, functions registered earlier with the same dependencies (their build failed, or
/// their image was removed) wait for it too.
fn watch_build(app: &App, key: &str, id: FunctionId) -> Result<(), ApiError> {
    let pools: Vec<_> = app.pools.iter().map(|p| p.handle.clone()).collect();
    images::release_when_built(&app.builds, key, id, pools.clone());
    let mut waiting = vec![id];
    let building = app
        .builds
        .info(key)
        .is_some_and(|i| i.state == crate::builds::BuildState::Building);
    if building {
        for r in app.reader.functions(None)? {
            if r.id != id && r.spec.build_key() == Some(key) {
                images::hold_until_built(&app.builds, key, r.id, pools.clone());
                waiting.push(r.id);
            }
        }
    }
    if let Ok(mut b) = app.building.lock() {
        for f in waiting {
            b.insert(f, key.to_string());
        }
    }
    Ok(())
}

/// A function's record with the current state of its image build, if it has one.
fn with_build(app: &App, mut record: FunctionRecord) -> FunctionRecord {
    if let Some(build) = record.spec.build.as_mut() {
        build.status = app
            .builds
            .info(&build.key)
            .map(|i| images::build_status(&i));
    }
    record
}

pub(super) async fn list(State(app): State<Arc<App>>, caller: Caller) -> ApiResult {
    let owner = (!caller.admin).then_some(caller.user.as_str());
    let rows = app.reader.functions(owner)?;
    let functions = rows.iter().map(|r| r.record(false)).collect();
    Ok(record_response(StatusCode::OK, &FunctionList { functions }))
}

/// A function the caller may use, or the error to answer with. Another user's function
/// answers exactly like a missing one (404).
pub(super) fn owned(app: &App, caller: &Caller, id: u64) -> Result<FunctionRow, ApiError> {
    app.reader
        .function(FunctionId(id))?
        .filter(|r| caller.may_see(&r.owner))
        .ok_or_else(|| ApiError::not_found(format!("function {id} does not exist")))
}

pub(super) async fn show(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult {
    let row = owned(&app, &caller, parse_id(&id, "the function id")?)?;
    Ok(record_response(
        StatusCode::OK,
        &with_build(&app, row.record(true)),
    ))
}

pub(super) async fn delete(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult {
    let row = owned(&app, &caller, parse_id(&id, "the function id")?)?;
    if !row.deleted {
        let (tx, rx) = tokio::sync::oneshot::channel();
        app.send(Cmd::Delete(row.id, tx))?;
        rx.await
            .map_err(|_| ApiError::unavailable("the store is shutting down"))??;
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}
