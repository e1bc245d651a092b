//! Rows as the store returns them, and their JSON form in the API (docs/api.md).

use crate::store::State;
use base64::Engine;
use fnx_api::{ErrorRecord, ResultRecord, TaskRecord};
use fnx_protocol::{Attempt, Encoding, FunctionId, Outcome, Payload, TaskId};
use serde_json::value::RawValue;
use serde_json::Value;
use std::borrow::Cow;

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
    /// The outcome exists but was left out: the answer had reached its size limit.
    pub omitted: bool,
}

/// A function as stored: its API record (`spec`, JSON) plus bookkeeping columns.
#[derive(Clone, Debug)]
pub struct FunctionRow {
    /// Id.
    pub id: FunctionId,
    /// Owner.
    pub owner: String,
    /// The record as registered (kind, name, source, signature, ...).
    pub spec: fnx_api::FunctionSpec,
    /// Registration time.
    pub created: f64,
    /// Deleted (tasks submitted earlier still run).
    pub deleted: bool,
    /// Why its stored record cannot be read (then `spec` holds only its kind and name).
    pub damaged: Option<String>,
}

/// Base64 (standard alphabet, padded).
pub fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Decode base64 (standard alphabet, padding optional).
pub fn unb64(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    base64::engine::general_purpose::STANDARD
        .decode(text.trim_end_matches('='))
        .or_else(|_| base64::engine::general_purpose::STANDARD.decode(text))
}

/// What a record says when its outcome did not fit in the answer.
pub const OMITTED: &str = "the answer reached its size limit (limits.max_answer_mb); ask for \
                           this task again";

impl TaskRow {
    /// The task record of the API. `with_seq` adds the completion sequence number.
    pub fn record(&self, with_seq: bool) -> TaskRecord<'_> {
        let (result, error) = match &self.outcome {
            Some(Outcome::Ok(p)) => (Some(result_record(p)), None),
            Some(Outcome::Err(e)) => (
                None,
                Some(ErrorRecord {
                    kind: e.kind,
                    type_name: Cow::Borrowed(&e.type_name),
                    message: Cow::Borrowed(&e.message),
                    traceback: e.traceback.as_deref().map(Cow::Borrowed),
                }),
            ),
            None => (None, None),
        };
        TaskRecord {
            id: self.id.0,
            function: self.function.0,
            pool: Cow::Borrowed(&self.pool),
            state: self.state.api(),
            attempt: self.attempt.0,
            submitted_at: self.submitted,
            finished_at: self.finished,
            seq: if with_seq { self.seq } else { None },
            result,
            error,
            waiting: None,
            omitted: self.omitted.then_some(Cow::Borrowed(OMITTED)),
        }
    }

    /// The task record as a JSON value.
    pub fn to_json(&self, with_seq: bool) -> Value {
        serde_json::to_value(self.record(with_seq)).unwrap_or(Value::Null)
    }
}

fn result_record(p: &Payload) -> ResultRecord<'_> {
    let none = ResultRecord {
        encoding: p.encoding,
        value: None,
        text: None,
        data_b64: None,
    };
    match p.encoding {
        Encoding::Json => match serde_json::from_slice::<&RawValue>(&p.data) {
            Ok(v) => ResultRecord {
                value: Some(Cow::Borrowed(v)),
                ..none
            },
            Err(_) => ResultRecord {
                text: Some(String::from_utf8_lossy(&p.data)),
                ..none
            },
        },
        Encoding::Pickle => ResultRecord {
            data_b64: Some(Cow::Owned(b64(&p.data))),
            ..none
        },
    }
}

impl FunctionRow {
    /// The function record of the API; `with_source` keeps the Python source.
    pub fn record(&self, with_source: bool) -> fnx_api::service::FunctionRecord {
        let mut spec = self.spec.clone();
        if !with_source {
            spec.source = None;
        }
        fnx_api::service::FunctionRecord {
            id: self.id.0,
            owner: self.owner.clone(),
            created_at: self.created,
            deleted: self.deleted,
            damaged: self.damaged.clone(),
            spec,
        }
    }
}
