//! Rows as the store returns them, and their JSON form in the API (docs/api.md).

use crate::store::State;
use base64::Engine;
use fnx_protocol::{Attempt, Encoding, FunctionId, Outcome, Payload, TaskId};
use serde_json::{json, Map, Value};

/// A task as stored.
#[derive(Clone, Debug)]
pub struct TaskRow {
    /// Id.
    pub id: TaskId,
    /// Owner.
    pub owner: String,
    /// Function.
    pub function: FunctionId,
    /// Pool.
    pub pool: String,
    /// State.
    pub state: State,
    /// Last attempt (0: never dispatched).
    pub attempt: Attempt,
    /// Submit time.
    pub submitted: f64,
    /// Finish time.
    pub finished: Option<f64>,
    /// Completion sequence number (results cursor).
    pub seq: Option<u64>,
    /// Outcome, once terminal.
    pub outcome: Option<Outcome>,
}

/// A function as stored: its API record (`spec`, JSON) plus bookkeeping columns.
#[derive(Clone, Debug)]
pub struct FunctionRow {
    /// Id.
    pub id: FunctionId,
    /// Owner.
    pub owner: String,
    /// The record as registered (kind, name, source, signature, ...).
    pub spec: Value,
    /// Registration time.
    pub created: f64,
    /// Deleted (tasks submitted earlier still run).
    pub deleted: bool,
}

/// Base64 (standard alphabet, padded).
pub fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Decode base64 (standard alphabet, padding optional).
pub fn unb64(text: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::STANDARD
        .decode(text.trim_end_matches('='))
        .or_else(|_| base64::engine::general_purpose::STANDARD.decode(text))
        .map_err(|e| e.to_string())
}

/// The API form of a payload: JSON inline, pickle as base64.
pub fn payload_json(p: &Payload) -> Value {
    match p.encoding {
        Encoding::Json => match serde_json::from_slice::<Value>(&p.data) {
            Ok(v) => json!({"encoding": "json", "value": v}),
            Err(_) => json!({"encoding": "json", "text": String::from_utf8_lossy(&p.data)}),
        },
        Encoding::Pickle => json!({"encoding": "pickle", "data_b64": b64(&p.data)}),
    }
}

impl TaskRow {
    /// The task record of the API. `with_seq` adds the completion sequence number.
    pub fn to_json(&self, with_seq: bool) -> Value {
        let mut m = Map::new();
        m.insert("id".into(), json!(self.id.0));
        m.insert("function".into(), json!(self.function.0));
        m.insert("pool".into(), json!(self.pool));
        m.insert("state".into(), json!(self.state.as_str()));
        m.insert("attempt".into(), json!(self.attempt.0));
        m.insert("submitted_at".into(), json!(self.submitted));
        m.insert("finished_at".into(), json!(self.finished));
        if with_seq {
            m.insert("seq".into(), json!(self.seq));
        }
        match &self.outcome {
            Some(Outcome::Ok(p)) => {
                m.insert("result".into(), payload_json(p));
            }
            Some(Outcome::Err(e)) => {
                m.insert(
                    "error".into(),
                    json!({"kind": e.kind.as_str(), "type": e.type_name,
                           "message": e.message, "traceback": e.traceback}),
                );
            }
            None => {}
        }
        Value::Object(m)
    }
}

impl FunctionRow {
    /// The function record of the API; `with_source` keeps the Python source.
    pub fn to_json(&self, with_source: bool) -> Value {
        let mut v = self.spec.clone();
        if let Value::Object(m) = &mut v {
            if !with_source {
                m.remove("source");
            }
            m.insert("id".into(), json!(self.id.0));
            m.insert("owner".into(), json!(self.owner));
            m.insert("created_at".into(), json!(self.created));
            if self.deleted {
                m.insert("deleted".into(), json!(true));
            }
        }
        v
    }
}
