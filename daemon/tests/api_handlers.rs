//! The HTTP handlers without a network: requests go straight into the router (as a tower
//! service), over a real store and writer and a real interchange that no manager serves.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use fnx_daemon::api::{router, App, PoolRef};
use fnx_daemon::config::SiteConfig;
use fnx_daemon::store::writer::{Cmd, Shared, Stats, Writer, WriterConfig};
use fnx_daemon::store::{create_token, open_writer, Reader};
use fnx_interchange::driver::{self, DriverConfig, Handle};
use fnx_interchange::Finished;
use fnx_protocol::{Attempt, Outcome, Payload, TaskId};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tower_service::Service;

struct Api {
    router: axum::Router,
    writer: Sender<Cmd>,
    alice: String,
    bob: String,
    admin: String,
    /// The text of the last answer (as sent: numbers as they were written).
    last_body: String,
    _handle: Arc<Handle>,
    _dir: tempfile::TempDir,
}

impl Api {
    fn start() -> Api {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fnx.db");
        let conn = open_writer(&path, false).unwrap();
        let (_, alice) = create_token(&conn, "alice", false, None).unwrap();
        let (_, bob) = create_token(&conn, "bob", false, None).unwrap();
        let (_, admin) = create_token(&conn, "root", true, None).unwrap();
        let cfg = SiteConfig::defaults();
        let (handle, _events) = driver::start(DriverConfig::new("tcp://127.0.0.1:0")).unwrap();
        let handle = Arc::new(handle);
        let mut pools = HashMap::new();
        pools.insert(cfg.pools[0].name.clone(), handle.clone());
        let shared = Arc::new(Shared::new(Stats::default()));
        let wcfg = WriterConfig {
            full_sync: false,
            ..WriterConfig::of_site(&cfg)
        };
        let writer = Writer::new(conn, wcfg, shared.clone(), pools, false).unwrap();
        let (wtx, wrx) = channel();
        std::thread::spawn(move || writer.run(wrx));
        let builds = fnx_daemon::builds::Builds::new(fnx_daemon::builds::BuildConfig {
            dir: dir.path().join("images"),
            command: cfg.builds.command.clone(),
            base: cfg.builds.base_image.clone(),
            timeout: cfg.builds.timeout,
            max_running: 1,
            max_per_user: 1,
        });
        let app = App::new(
            Reader::new(&path),
            wtx.clone(),
            shared,
            vec![PoolRef {
                name: cfg.pools[0].name.clone(),
                handle: handle.clone(),
                report: Arc::new(Mutex::new(Default::default())),
                mem_per_worker_mb: None,
            }],
            cfg.limits.clone(),
            "python3".into(),
            path,
            builds,
            fnx_daemon::identity::Identities::new(&cfg.users),
        );
        Api {
            router: router(Arc::new(app)),
            writer: wtx,
            alice,
            bob,
            admin,
            last_body: String::new(),
            _handle: handle,
            _dir: dir,
        }
    }

    /// Status and JSON body of one request as `token` (None: no Authorization header).
    async fn call(
        &mut self,
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let body = match body {
            Some(v) => {
                req = req.header("Content-Type", "application/json");
                Body::from(v.to_string())
            }
            None => Body::empty(),
        };
        let resp = self.router.call(req.body(body).unwrap()).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        self.last_body = String::from_utf8_lossy(&bytes).into_owned();
        let v = serde_json::from_slice(&bytes).unwrap_or(Value::String(self.last_body.clone()));
        (status, v)
    }

    async fn alice(&mut self, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
        let t = self.alice.clone();
        self.call(method, uri, Some(&t), body).await
    }

    /// Finish a task as a manager would have reported it.
    fn finish(&self, id: u64, value: &str) {
        self.writer
            .send(Cmd::Dispatched(vec![(TaskId(id), Attempt(1), true)]))
            .unwrap();
        self.writer
            .send(Cmd::Finished(vec![Finished {
                id: TaskId(id),
                attempt: Attempt(1),
                outcome: Outcome::Ok(Payload::json(value)),
            }]))
            .unwrap();
    }
}

fn message(v: &Value) -> &str {
    v["error"]["message"].as_str().unwrap_or("")
}

#[tokio::test]
async fn a_task_goes_from_submit_to_result_and_its_number_text_is_kept_exactly() {
    let mut api = Api::start();
    let (s, f) = api
        .alice(
            "POST",
            "/v1/functions",
            Some(json!({"kind": "shell", "command": "echo {x}"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{f}");
    let fid = f["id"].as_u64().unwrap();
    let (s, t) = api
        .alice(
            "POST",
            "/v1/tasks",
            Some(json!({"tasks": [{"function": fid, "args": {"x": 1}}]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{t}");
    let id = t["ids"][0].as_u64().unwrap();
    let (s, rec) = api.alice("GET", &format!("/v1/tasks/{id}"), None).await;
    assert_eq!(
        (s, rec["state"].as_str()),
        (StatusCode::OK, Some("queued")),
        "{rec}"
    );
    // A result is given back as written: every digit, no re-formatting.
    api.finish(id, "1.10000000000000000000001");
    let (s, page) = api.alice("GET", "/v1/results?wait=10", None).await;
    assert_eq!(s, StatusCode::OK, "{page}");
    assert!(
        api.last_body.contains(":1.10000000000000000000001"),
        "{}",
        api.last_body
    );
    assert_eq!(page["results"][0]["id"].as_u64(), Some(id), "{page}");
    assert_eq!(page["results"][0]["state"], "success");
}

#[tokio::test]
async fn bad_requests_name_the_field_and_nothing_is_stored() {
    let mut api = Api::start();
    let (_, f) = api
        .alice(
            "POST",
            "/v1/functions",
            Some(json!({"kind": "shell", "command": "echo {x}"})),
        )
        .await;
    let fid = f["id"].as_u64().unwrap();
    let ok = json!({"function": fid, "args": {"x": 1}});
    for (body, field) in [
        (
            json!({"tasks": [ok, {"function": fid, "args": {"x": 1}, "walltime": 1e300}]}),
            "tasks[1].walltime",
        ),
        (
            json!({"tasks": [ok, {"function": fid, "args": {"y": 1}}]}),
            "tasks[1].args",
        ),
        (
            json!({"tasks": [{"function": fid, "args": {"x": 1}, "files": [{"name": "../x", "path": "/tmp/x"}]}]}),
            "tasks[0].files[0].name",
        ),
        (
            json!({"tasks": [{"function": fid, "args": {"x": 1}, "files": [{"name": "a", "path": "rel"}]}]}),
            "tasks[0].files[0].path",
        ),
        (
            json!({"tasks": [{"function": fid, "encoding": "yaml"}]}),
            "tasks[0].encoding",
        ),
    ] {
        let (s, e) = api.alice("POST", "/v1/tasks", Some(body.clone())).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {e}");
        assert!(message(&e).contains(field), "{body}: {e}");
    }
    for (spec, field) in [
        (
            json!({"kind": "python", "ref": "m:f", "container": {"image": "-x"}}),
            "container.image",
        ),
        (
            json!({"kind": "python", "ref": "m:f", "dependencies": {"python": ["numpy; rm -rf /"]}}),
            "dependencies.python[0]",
        ),
    ] {
        let (s, e) = api.alice("POST", "/v1/functions", Some(spec.clone())).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{spec}: {e}");
        assert!(message(&e).contains(field), "{spec}: {e}");
    }
    // No batch left a task behind (ids start at 1).
    let (s, e) = api.alice("GET", "/v1/tasks/1", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{e}");
}

#[tokio::test]
async fn callers_are_authenticated_and_see_only_their_own_tasks() {
    let mut api = Api::start();
    let (s, e) = api.call("GET", "/v1/whoami", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{e}");
    let (s, e) = api
        .call("GET", "/v1/whoami", Some("not-a-token"), None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{e}");
    let (s, me) = api.alice("GET", "/v1/whoami", None).await;
    assert_eq!(
        (s, me["user"].as_str()),
        (StatusCode::OK, Some("alice")),
        "{me}"
    );
    let (_, f) = api
        .alice(
            "POST",
            "/v1/functions",
            Some(json!({"kind": "shell", "command": "true"})),
        )
        .await;
    let fid = f["id"].as_u64().unwrap();
    let (_, t) = api
        .alice(
            "POST",
            "/v1/tasks",
            Some(json!({"tasks": [{"function": fid}]})),
        )
        .await;
    let id = t["ids"][0].as_u64().unwrap();
    let bob = api.bob.clone();
    let (s, e) = api
        .call("GET", &format!("/v1/tasks/{id}"), Some(&bob), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "bob sees alice's task: {e}");
    let (s, e) = api
        .call("DELETE", &format!("/v1/tasks/{id}"), Some(&bob), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "bob cancels alice's task: {e}");
    let (s, e) = api
        .call(
            "POST",
            "/v1/tasks",
            Some(&bob),
            Some(json!({"tasks": [{"function": fid}]})),
        )
        .await;
    assert!(
        s == StatusCode::NOT_FOUND || s == StatusCode::BAD_REQUEST,
        "bob runs alice's function: {s} {e}"
    );
    let (s, e) = api.alice("GET", "/v1/nowhere", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{e}");
}

#[tokio::test]
async fn a_damaged_function_record_is_shown_refused_by_name_and_can_be_deleted() {
    let mut api = Api::start();
    let (_, f) = api
        .alice(
            "POST",
            "/v1/functions",
            Some(json!({"kind": "shell", "command": "true"})),
        )
        .await;
    let fid = f["id"].as_u64().unwrap();
    let (tx, rx) = channel();
    api.writer
        .send(Cmd::Exec(Box::new(move |c| {
            c.execute(
                "UPDATE functions SET spec = '{broken' WHERE id = ?1",
                [fid as i64],
            )
            .unwrap();
            let _ = tx.send(());
        })))
        .unwrap();
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let (s, rec) = api
        .alice("GET", &format!("/v1/functions/{fid}"), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{rec}");
    assert!(
        rec["damaged"]
            .as_str()
            .is_some_and(|d| d.contains("does not decode")),
        "{rec}"
    );
    let bob = api.bob.clone();
    let (s, e) = api
        .call("GET", &format!("/v1/functions/{fid}"), Some(&bob), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "another user learns nothing: {e}");
    let (s, e) = api
        .alice(
            "POST",
            "/v1/tasks",
            Some(json!({"tasks": [{"function": fid}]})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert!(message(&e).contains("register the function again"), "{e}");
    let (s, e) = api
        .alice("DELETE", &format!("/v1/functions/{fid}"), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{e}");
}

#[tokio::test]
async fn a_hostile_submit_body_is_refused_cheaply_naming_its_field() {
    let mut api = Api::start();
    let (_, f) = api
        .alice(
            "POST",
            "/v1/functions",
            Some(json!({"kind": "shell", "command": "echo {x}"})),
        )
        .await;
    let fid = f["id"].as_u64().unwrap();
    let raw = |api: &mut Api, body: String| {
        let token = api.alice.clone();
        let req = Request::builder()
            .method("POST")
            .uri("/v1/tasks")
            .header("Authorization", format!("Bearer {token}"))
            .header("Content-Type", "application/json")
            .body(Body::from(body))
            .unwrap();
        api.router.call(req)
    };
    // Tasks and files are objects: fields by position are not fields by name.
    for (body, field) in [
        (format!("[[[{fid}]]]"), "the body"),
        (format!(r#"{{"tasks": [[{fid}, null, [1]]]}}"#), "tasks[0]"),
        (
            format!(
                r#"{{"tasks": [{{"function": {fid}, "args": {{"x": 1}}, "files": [["a", null, null, "/x"]]}}]}}"#
            ),
            "tasks[0].files[0]",
        ),
        (
            format!(r#"{{"tasks": [{{"function": {fid}}}], "extra": 1}}"#),
            "extra",
        ),
        (
            format!(
                r#"{{"tasks": [{{"function": {fid}, "memory_mb": "{}"}}]}}"#,
                "x".repeat(100_000)
            ),
            "tasks[0].memory_mb",
        ),
    ] {
        let resp = raw(&mut api, body.clone()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{body:.80}");
        let text = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&text);
        assert!(text.contains(field), "{body:.80}: {text}");
        assert!(
            text.len() < 2000,
            "the answer quotes the input: {} bytes",
            text.len()
        );
    }
    // A long hostile value is not quoted whole.
    let long = format!(
        r#"{{"tasks": [{{"function": "{}"}}]}}"#,
        "\u{85}".repeat(50_000)
    );
    let resp = raw(&mut api, long).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(text.len() < 4000, "{} bytes", text.len());
    // More tasks than a request may hold: 413 before they are all read.
    let many = format!(r#"{{"tasks": [{}]}}"#, vec!["{}"; 10_001].join(","));
    let resp = raw(&mut api, many).await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // At most MAX_FILES files a task, refused before the rest are read.
    let files = vec![r#"{"name": "a", "path": "/x"}"#; fnx_api::submit::MAX_FILES + 1].join(",");
    let body =
        format!(r#"{{"tasks": [{{"function": {fid}, "args": {{"x": 1}}, "files": [{files}]}}]}}"#);
    let resp = raw(&mut api, body).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&text).contains("tasks[0].files: more than 10000"));
    // Files given as null mean none, as before.
    let (s, e) = api
        .alice(
            "POST",
            "/v1/tasks",
            Some(json!({"tasks": [{"function": fid, "args": {"x": 1}, "files": null}]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{e}");
}

#[tokio::test]
async fn the_served_openapi_document_is_the_one_made_from_the_types_and_names_real_routes() {
    let mut api = Api::start();
    let resp = api
        .router
        .call(
            Request::builder()
                .uri("/v1/openapi.json")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let served = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(served, fnx_api::openapi::document().as_bytes());
    // Every operation the document names is a route of the router (not its 404 fallback).
    let doc: Value = serde_json::from_slice(&served).unwrap();
    let mut operations = 0;
    for (path, methods) in doc["paths"].as_object().unwrap() {
        let concrete = path
            .replace("{id}", "1")
            .replace("{pool}", "local")
            .replace("{action}", "drain");
        for method in methods.as_object().unwrap().keys() {
            operations += 1;
            let token = api.alice.clone();
            let req = Request::builder()
                .method(method.to_uppercase().as_str())
                .uri(concrete.as_str())
                .header("Authorization", format!("Bearer {token}"))
                .header("Content-Type", "application/json")
                .body(Body::from("{}"))
                .unwrap();
            let resp = api.router.call(req).await.unwrap();
            let status = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let text = String::from_utf8_lossy(&body);
            assert!(
                !text.contains("no such endpoint") && status != StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path}: {status} {text:.200}"
            );
        }
    }
    assert_eq!(operations, 19);
}

/// Read an answer as the API type the document gives it.
fn typed<'a, T: serde::Deserialize<'a>>(what: &str, body: &'a str) -> T {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: {e}: {body:.400}"))
}

#[tokio::test]
async fn every_answer_reads_as_the_type_the_document_gives_it() {
    use fnx_api::openapi::Cancelling;
    use fnx_api::service::*;
    let mut api = Api::start();
    let (s, _) = api.call("GET", "/v1/health", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let _: Health = typed("health", &api.last_body.clone());
    api.alice("GET", "/v1/whoami", None).await;
    let me: Whoami = typed("whoami", &api.last_body.clone());
    assert_eq!(me.user, "alice");
    let (s, _) = api
        .alice(
            "POST",
            "/v1/functions",
            Some(json!({"kind": "shell", "command": "echo {x}", "name": "echo"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let f: FunctionRecord = typed("registration", &api.last_body.clone());
    assert_eq!(f.spec.name.as_deref(), Some("echo"));
    api.alice("GET", &format!("/v1/functions/{}", f.id), None)
        .await;
    let _: FunctionRecord = typed("function", &api.last_body.clone());
    api.alice("GET", "/v1/functions", None).await;
    let list: FunctionList = typed("functions", &api.last_body.clone());
    assert_eq!(list.functions.len(), 1);
    let (s, _) = api
        .alice(
            "POST",
            "/v1/tasks",
            Some(json!({"tasks": [{"function": f.id, "args": {"x": 1}}]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let ids: fnx_api::TaskIds = typed("submit", &api.last_body.clone());
    let id = ids.ids[0];
    api.alice("GET", &format!("/v1/tasks/{id}"), None).await;
    let body = api.last_body.clone();
    let _: fnx_api::TaskRecord = typed("task", &body);
    api.alice("POST", "/v1/tasks/status", Some(json!({"ids": [id, 999]})))
        .await;
    let body = api.last_body.clone();
    let st: TaskStatusList = typed("status of tasks", &body);
    assert!(matches!(st.tasks[1], TaskStatus::Unknown(_)));
    api.alice("GET", "/v1/results", None).await;
    let body = api.last_body.clone();
    let _: fnx_api::ResultsPage = typed("results", &body);
    api.alice("GET", "/v1/status", None).await;
    let mine: StatusDocument = typed("status", &api.last_body.clone());
    assert!(mine.store.is_none() && mine.users.is_none() && mine.pools[0].queued.is_none());
    let admin = api.admin.clone();
    api.call("GET", "/v1/status", Some(&admin), None).await;
    let all: StatusDocument = typed("status (admin)", &api.last_body.clone());
    assert!(all.store.is_some() && all.users.is_some() && all.pools[0].queued.is_some());
    api.call("GET", "/v1/tokens", Some(&admin), None).await;
    let _: TokenList = typed("tokens (admin)", &api.last_body.clone());
    let (s, _) = api
        .alice("POST", "/v1/tokens", Some(json!({"expires_s": 60})))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let t: TokenCreated = typed("token", &api.last_body.clone());
    assert_eq!(t.user, "alice");
    api.alice("GET", "/v1/tokens", None).await;
    let _: TokenList = typed("tokens", &api.last_body.clone());
    api.alice("POST", "/v1/tasks/cancel", Some(json!({"ids": [id]})))
        .await;
    let c: Cancelling = typed("cancel", &api.last_body.clone());
    assert_eq!(c.cancelling, 1);
    let (s, _) = api.alice("GET", "/v1/tasks/987654", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let e: ErrorBody = typed("error", &api.last_body.clone());
    assert_eq!(e.error.code, "not_found");
}
