//! The HTTP API as an OpenAPI 3.1 document, made from the types of this crate and the
//! operations below (each documents one route the daemon serves; the daemon checks that its
//! router and this document name the same routes). `GET /v1/openapi.json` serves
//! [`document`].

use crate::function::{FunctionCreate, FunctionSpec};
use crate::service::*;
use crate::submit::{TaskBatch, TaskIds};
use crate::task::{ResultsPage, TaskRecord};
use serde::{Deserialize, Serialize};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

/// A `unauthorized` answer.
const UNAUTHORIZED: &str = "`unauthorized`: no `Authorization` header, or an unknown token.";
/// A `bad_request` answer.
const BAD_REQUEST: &str = "`bad_request`: malformed JSON/msgpack, a missing or wrong field (the message names it, e.g. `tasks[3].walltime` or `dependencies.python[2]`), arguments that do not bind to the function's signature, an unknown pool, a deleted function, a submit to a function whose image build failed, `dependencies` on a daemon that cannot build images.";
/// A `payload_too_large` answer.
const PAYLOAD_TOO_LARGE: &str = "`payload_too_large`: a request body (`limits.max_request_mb`), a batch (more than 10,000 tasks) or one task's arguments over a limit; the limit is in the message.";
/// A `store_unavailable` answer.
const STORE_UNAVAILABLE: &str = "`store_unavailable`: the store cannot commit (disk full, size limit reached, I/O error), or the image cache cannot be written (a registration with `dependencies`); nothing in the request was accepted; retry later.";
/// A `not_found` answer.
const NOT_FOUND: &str = "`not_found`: no such function or task, or an unknown path.";
/// A `identity_not_allowed` answer.
const IDENTITY_NOT_ALLOWED: &str = "`identity_not_allowed` (users.mode = \"unix\"): the caller's account may not run tasks on this service (root, the service account, a uid below users.min_uid, or no such account). Deliberately vague; the daemon's log says why.";

/// The answer to `POST /v1/tasks/cancel`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Cancelling {
    /// How many of the ids were yours and unfinished.
    pub cancelling: u64,
}

/// The answer to a block action.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct BlockActionAnswer {
    /// The pool.
    pub pool: String,
    /// The block.
    pub block: u64,
    /// `drain` or `cancel`.
    pub action: String,
}

/// Liveness and store health
///
///
#[utoipa::path(
    get,
    path = "/v1/health",
    operation_id = "health",
    tag = "service",
    responses(
        (status = 200, description = "The daemon is up and the store commits.", content((Health = "application/json"))),
        (status = 503, description = "The last store commit failed; `store` is `unavailable: <reason>`.", content((Health = "application/json")))
    ),
    security(())
)]
#[allow(dead_code)]
fn health() {}

/// This OpenAPI document
///
///
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    operation_id = "openapi",
    tag = "service",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document.", content((Object = "application/json")))
    ),
    security(())
)]
#[allow(dead_code)]
fn openapi() {}

/// The user the token belongs to
///
///
#[utoipa::path(
    get,
    path = "/v1/whoami",
    operation_id = "whoami",
    tag = "service",
    responses(
        (status = 200, description = "The caller.", content((Whoami = "application/json"))),
        (status = 401, description = UNAUTHORIZED, body = ErrorBody)
    )
)]
#[allow(dead_code)]
fn whoami() {}

/// Register a function
///
/// Answers at once. With `dependencies` the image build starts in the background (see `build` in the record); 400 for a bad `container` or `dependencies` item, for both together, or for `dependencies` on a daemon that cannot build; 503 if the image cache cannot be written.
#[utoipa::path(
    post,
    path = "/v1/functions",
    operation_id = "registerFunction",
    tag = "functions",
    request_body(content((FunctionCreate = "application/json"))),
    responses(
        (status = 201, description = "Registered; the function record.", content((FunctionRecord = "application/json"))),
        (status = 400, description = BAD_REQUEST, body = ErrorBody),
        (status = 401, description = UNAUTHORIZED, body = ErrorBody),
        (status = 413, description = PAYLOAD_TOO_LARGE, body = ErrorBody),
        (status = 503, description = STORE_UNAVAILABLE, body = ErrorBody)
    )
)]
#[allow(dead_code)]
fn register_function() {}

/// List functions (your own; admins: everyone's)
///
///
#[utoipa::path(
    get,
    path = "/v1/functions",
    operation_id = "listFunctions",
    tag = "functions",
    responses(
        (status = 200, description = "The function records.", content((FunctionList = "application/json"))),
        (status = 401, description = UNAUTHORIZED, body = ErrorBody)
    )
)]
#[allow(dead_code)]
fn list_functions() {}

/// A function record, plus its source
///
///
#[utoipa::path(
    get,
    path = "/v1/functions/{id}",
    operation_id = "getFunction",
    tag = "functions",
    params(
        ("id" = u64, Path, description = "The function id (a positive integer).")
    ),
    responses(
        (status = 200, description = "The record plus `source` (Python source functions), with the current state of its image `build` (functions with `dependencies`).", content((FunctionRecord = "application/json"))),
        (status = 400, description = BAD_REQUEST, body = ErrorBody),
        (status = 401, description = UNAUTHORIZED, body = ErrorBody),
        (status = 404, description = NOT_FOUND, body = ErrorBody)
    )
)]
#[allow(dead_code)]
fn get_function() {}

/// Delete a function
///
/// Tasks already submitted still run; new submits get 400.
#[utoipa::path(
    delete,
    path = "/v1/functions/{id}",
    operation_id = "deleteFunction",
    tag = "functions",
    params(
        ("id" = u64, Path, description = "The function id (a positive integer).")
    ),
    responses(
        (status = 204, description = "Deleted."),
        (status = 400, description = BAD_REQUEST, body = ErrorBody),
        (status = 401, description = UNAUTHORIZED, body = ErrorBody),
        (status = 404, description = NOT_FOUND, body = ErrorBody),
        (status = 503, description = STORE_UNAVAILABLE, body = ErrorBody)
    )
)]
#[allow(dead_code)]
fn delete_function() {}

/// Submit a batch of 1 to 10,000 tasks
///
/// The answer comes only after the batch is committed to the store. If any task is rejected, nothing in the batch is accepted.
#[utoipa::path(
    post,
    path = "/v1/tasks",
    operation_id = "submitTasks",
    tag = "tasks",
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "Any string up to 200 bytes. A request that repeats an earlier committed request of the same user with the same key returns the same ids (201, `Idempotent-Replayed: true`) and creates nothing. Keys are kept for 24 hours.")
    ),
    request_body(content((TaskBatch = "application/json"), (TaskBatch = "application/msgpack"))),
    responses(
        (status = 201, description = "Committed; the task ids in request order.", content((TaskIds = "application/json"))),
        (status = 400, description = BAD_REQUEST, body = ErrorBody),
        (status = 401, description = UNAUTHORIZED, body = ErrorBody),
        (status = 403, description = IDENTITY_NOT_ALLOWED, body = ErrorBody),
        (status = 404, description = NOT_FOUND, body = ErrorBody),
        (status = 413, description = PAYLOAD_TOO_LARGE, body = ErrorBody),
        (status = 429, description = "`queue_limit`: the user's unfinished tasks would exceed `limits.max_queued_per_user`.", body = ErrorBody),
        (status = 503, description = STORE_UNAVAILABLE, body = ErrorBody),
        (status = 409, description = "`idempotency_conflict`: the Idempotency-Key was used before with another request body; nothing was created.", body = ErrorBody)
    )
)]
#[allow(dead_code)]
fn submit_tasks() {}

/// Records of many tasks (at most 10,000 ids)
///
///
#[utoipa::path(
    post,
    path = "/v1/tasks/status",
    operation_id = "taskStatus",
    tag = "tasks",
    request_body(content((TaskIdList = "application/json"))),
    responses(
        (status = 200, description = "Records in request order; ids that do not exist or are not yours (for an admin: that do not exist) appear as `{\"id\": N, \"state\": \"unknown\"}`.", content((TaskStatusList = "application/json"))),
        (status = 400, description = BAD_REQUEST, body = ErrorBody),
        (status = 401, description = UNAUTHORIZED, body = ErrorBody),
        (status = 413, description = PAYLOAD_TOO_LARGE, body = ErrorBody)
    )
)]
#[allow(dead_code)]
fn task_status() {}

/// A task record, optionally waiting for it to finish
///
///
#[utoipa::path(
    get,
    path = "/v1/tasks/{id}",
    operation_id = "getTask",
    tag = "tasks",
    params(
        ("id" = u64, Path, description = "The task id (a positive integer)."),
        ("wait" = Option<f64>, Query, description = "Hold the answer until the task is terminal or this many seconds (at most 60) are up.")
    ),
    responses(
        (status = 200, description = "The task record.", content((TaskRecord = "application/json"))),
        (status = 400, description = BAD_REQUEST, body = ErrorBody),
        (status = 401, description = UNAUTHORIZED, body = ErrorBody),
        (status = 404, description = NOT_FOUND, body = ErrorBody)
    )
)]
#[allow(dead_code)]
fn get_task() {}

/// Cancel a task
///
/// A queued task never runs; a running one is killed (SIGTERM, grace, SIGKILL of its process group).
#[utoipa::path(
    delete,
    path = "/v1/tasks/{id}",
    operation_id = "cancelTask",
    tag = "tasks",
    params(
        ("id" = u64, Path, description = "The task id (a positive integer).")
    ),
    responses(
        (status = 200, description = "The task is terminal: its state is `cancelled`, or the state it reached first.", content((TaskRecord = "application/json"))),
        (status = 202, description = "The kill is still under way after 5 s; the current record.", content((TaskRecord = "application/json"))),
        (status = 400, description = BAD_REQUEST, body = ErrorBody),
        (status = 401, description = UNAUTHORIZED, body = ErrorBody),
        (status = 404, description = NOT_FOUND, body = ErrorBody),
        (status = 503, description = STORE_UNAVAILABLE, body = ErrorBody)
    )
)]
#[allow(dead_code)]
fn cancel_task() {}

/// Your finished tasks in completion order
///
/// Asking with `since=C` acknowledges every result up to `C` as fetched. Results are kept until fetched plus `store.result_retention_s` (default 1 day), then pruned; unfetched results are pruned after `store.unfetched_retention_s` (default 30 days).
#[utoipa::path(
    get,
    path = "/v1/results",
    operation_id = "getResults",
    tag = "results",
    params(
        ("since" = Option<String>, Query, description = "The `cursor` of the previous answer, or `end`: answer at once with no results and the cursor of your newest result, acknowledging nothing (a new consumer starts there)."),
        ("wait" = Option<f64>, Query, description = "If nothing is newer than `since`, hold the request until something is or this many seconds (at most 60) are up; then `results` is empty and `cursor` is unchanged."),
        ("limit" = Option<u64>, Query, description = "At most this many records (at most 10,000)."),
        ("Accept" = Option<String>, Header, description = "`application/msgpack` for a msgpack answer (same shape); JSON otherwise.")
    ),
    responses(
        (status = 200, description = "A page of results and the new cursor.", content((ResultsPage = "application/json"), (ResultsPage = "application/msgpack"))),
        (status = 400, description = BAD_REQUEST, body = ErrorBody),
        (status = 401, description = UNAUTHORIZED, body = ErrorBody),
        (status = 503, description = STORE_UNAVAILABLE, body = ErrorBody)
    )
)]
#[allow(dead_code)]
fn get_results() {}

/// Counts, pools, managers and store
///
///
#[utoipa::path(
    get,
    path = "/v1/status",
    operation_id = "status",
    tag = "service",
    responses(
        (status = 200, description = "The status document. Admins see every pool's load, managers, paths, `users` and the `store`; others their own tasks and managers, and what each pool offers.", content((StatusDocument = "application/json"))),
        (status = 401, description = UNAUTHORIZED, body = ErrorBody)
    )
)]
#[allow(dead_code)]
fn status() {}

/// Prometheus metrics
///
/// Prometheus text format: `fnx_tasks_submitted_total`, `fnx_tasks_finished_total{state="success|failed|cancelled"}`, `fnx_tasks_queued`, `fnx_tasks_running`, `fnx_managers`, `fnx_workers`, `fnx_store_commits_total`, `fnx_store_commit_errors_total`, `fnx_store_size_bytes`.
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    tag = "service",
    responses(
        (status = 200, description = "Metrics in Prometheus text exposition format.", content((String = "text/plain")))
    ),
    security(())
)]
#[allow(dead_code)]
fn metrics() {}

/// Cancel many tasks without waiting (at most 10,000 ids)
///
///
#[utoipa::path(
    post,
    path = "/v1/tasks/cancel",
    operation_id = "cancelTasks",
    tag = "tasks",
    request_body(content((TaskIdList = "application/json"))),
    responses(
        (status = 202, description = "How many of the ids were yours and unfinished; their records reach `cancelled` (or the state they reached first) shortly after.", content((Cancelling = "application/json"))),
        (status = 400, description = BAD_REQUEST, body = ErrorBody),
        (status = 401, description = UNAUTHORIZED, body = ErrorBody),
        (status = 413, description = PAYLOAD_TOO_LARGE, body = ErrorBody)
    )
)]
#[allow(dead_code)]
fn cancel_tasks() {}

/// Drain a batch pool's block now, or cancel its job even while it runs tasks (admins).
///
/// `drain`: the block's managers finish the tasks they hold, take no new ones and exit; then its job ends. `cancel`: the job is cancelled at once; its running tasks are retried elsewhere. Neither counts as a failed block. The scaler may submit a replacement when the pool needs one (min_blocks, queued tasks).
#[utoipa::path(
    post,
    path = "/v1/pools/{pool}/blocks/{id}/{action}",
    operation_id = "blockAction",
    tag = "service",
    params(
        ("pool" = String, Path, description = "The batch pool."),
        ("id" = u64, Path, description = "The block's number (`GET /v1/status`)."),
        ("action" = String, Path, description = "`drain` or `cancel`.")
    ),
    responses(
        (status = 202, description = "Requested; `GET /v1/status` shows the block's phase.", content((BlockActionAnswer = "application/json"))),
        (status = 401, description = UNAUTHORIZED, body = ErrorBody),
        (status = 403, description = "Not an admin.", body = ErrorBody),
        (status = 404, description = "No such pool, live block or action.", body = ErrorBody)
    )
)]
#[allow(dead_code)]
fn block_action() {}

/// List tokens (never the tokens themselves)
///
/// Admins see everyone's (or one user's with ?user=NAME); others their own.
#[utoipa::path(
    get,
    path = "/v1/tokens",
    operation_id = "listTokens",
    tag = "service",
    params(
        ("user" = Option<String>, Query, description = "")
    ),
    responses(
        (status = 200, description = "The tokens.", content((TokenList = "application/json"))),
        (status = 401, description = UNAUTHORIZED, body = ErrorBody),
        (status = 403, description = IDENTITY_NOT_ALLOWED, body = ErrorBody)
    )
)]
#[allow(dead_code)]
fn list_tokens() {}

/// Create a token
///
/// Admins for anyone; users for themselves (e.g. a user known by the local socket makes a token for remote use).
#[utoipa::path(
    post,
    path = "/v1/tokens",
    operation_id = "createToken",
    tag = "service",
    request_body(content((TokenCreate = "application/json"))),
    responses(
        (status = 201, description = "Created.", content((TokenCreated = "application/json"))),
        (status = 400, description = BAD_REQUEST, body = ErrorBody),
        (status = 401, description = UNAUTHORIZED, body = ErrorBody),
        (status = 403, description = "`forbidden`: an admin-only action (block actions), or a token for another user or an admin token asked for by a non-admin.", body = ErrorBody),
        (status = 503, description = STORE_UNAVAILABLE, body = ErrorBody)
    )
)]
#[allow(dead_code)]
fn create_token() {}

/// Revoke a token
///
/// Admins any; users their own (another user's id answers 404). The token stops working at once, long-polls already open within a second.
#[utoipa::path(
    delete,
    path = "/v1/tokens/{id}",
    operation_id = "revokeToken",
    tag = "service",
    params(
        ("id" = u64, Path, description = "")
    ),
    responses(
        (status = 204, description = "Revoked."),
        (status = 401, description = UNAUTHORIZED, body = ErrorBody),
        (status = 404, description = NOT_FOUND, body = ErrorBody),
        (status = 503, description = STORE_UNAVAILABLE, body = ErrorBody)
    )
)]
#[allow(dead_code)]
fn revoke_token() {}

/// The bearer token scheme every operation but health, metrics and this document needs.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        let scheme = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .bearer_format("fnx_…")
            .description(Some(
                "An fnx token (`fnx token create --user NAME`); the daemon stores only its SHA-256 hash.",
            ))
            .build();
        components.add_security_scheme("bearerAuth", SecurityScheme::Http(scheme));
    }
}

/// The API's OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "fnx HTTP API",
        description = "Functions as a service for HPC: register functions, submit tasks in batches, fetch results. The OpenAPI form of docs/api.md (which is authoritative). Bodies are JSON; `POST /v1/tasks` also accepts `application/msgpack` and `GET /v1/results` answers in msgpack when asked with `Accept: application/msgpack`. Every endpoint except `GET /v1/health`, `GET /v1/openapi.json` and `GET /metrics` needs `Authorization: Bearer <token>`. Ids are positive integers; times are Unix seconds (floating point). A request body may be at most `limits.max_request_mb` (default 256 MiB). An unknown path is answered with 404 `not_found`.",
        license(name = "Apache-2.0"),
    ),
    servers((url = "http://127.0.0.1:8470", description = "Default `fnx daemon` address.")),
    security(("bearerAuth" = [])),
    tags(
        (name = "service", description = "Health, identity, status, metrics and this document."),
        (name = "functions", description = "Function registry."),
        (name = "tasks", description = "Task submission, status and cancellation."),
        (name = "results", description = "Results by long-poll with a cursor."),
    ),
    paths(health, openapi, whoami, register_function, list_functions, get_function, delete_function, submit_tasks, task_status, get_task, cancel_task, get_results, status, metrics, cancel_tasks, block_action, list_tokens, create_token, revoke_token),
    components(schemas(FunctionSpec, ErrorBody, crate::function::BuildStatus)),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;

/// The document as JSON text.
pub fn document() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"cannot write the OpenAPI document: {e}\"}}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_names_every_route_its_schemas_and_the_token_scheme() {
        let doc: serde_json::Value = serde_json::from_str(&document()).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        let paths = doc["paths"].as_object().unwrap();
        assert_eq!(paths.len(), 15, "{:?}", paths.keys().collect::<Vec<_>>());
        let ops: usize = paths.values().map(|p| p.as_object().unwrap().len()).sum();
        assert_eq!(ops, 19);
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for s in [
            "TaskBatch",
            "TaskSubmission",
            "FileSubmission",
            "TaskRecord",
            "ResultsPage",
            "FunctionCreate",
            "FunctionRecord",
            "ErrorBody",
            "StatusDocument",
            "Encoding",
            "ErrorKind",
            "Runtime",
        ] {
            assert!(schemas.contains_key(s), "{s} missing: {:?}", schemas.keys());
        }
        assert_eq!(
            doc["components"]["securitySchemes"]["bearerAuth"]["scheme"],
            "bearer"
        );
        // The health check needs no token; submitting does.
        assert_eq!(
            doc["paths"]["/v1/health"]["get"]["security"],
            serde_json::json!([{}])
        );
        assert!(doc["paths"]["/v1/tasks"]["post"].get("security").is_none());
        let body = &doc["paths"]["/v1/tasks"]["post"]["requestBody"]["content"];
        assert!(
            body.get("application/json").is_some() && body.get("application/msgpack").is_some()
        );
        // Values of any JSON type are not narrowed to objects; what must be there is required.
        let schema = |name: &str| doc["components"]["schemas"][name].clone();
        let any = |v: &serde_json::Value| v.get("type").is_none() && v.get("$ref").is_none();
        assert!(
            any(&schema("PoolStatus")["properties"]["failed"]),
            "{}",
            schema("PoolStatus")
        );
        assert!(
            !schema("TaskSubmission")["properties"]["args"]["type"]
                .to_string()
                .contains("object"),
            "{}",
            schema("TaskSubmission")["properties"]["args"]
        );
        assert!(schema("TaskBatch")["required"]
            .to_string()
            .contains("tasks"));
        assert!(schema("TaskSubmission")["required"]
            .to_string()
            .contains("function"));
        assert!(schema("UnknownTask")["properties"]["state"]
            .to_string()
            .contains("Unknown"));
        assert!(schema("BuildRef")["properties"].get("status").is_none());
    }
}
