//! Tasks: the record `GET /v1/tasks/{id}` and `GET /v1/results` answer with. The daemon
//! serialises it straight from a stored row (borrowing, no JSON tree); clients read it back
//! with the same type (owning).

use fnx_protocol::{Encoding, ErrorKind};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::borrow::Cow;

/// Where a task is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting in the daemon (or for its function's image build).
    Queued,
    /// Handed to a node manager (running, or in its local prefetch queue).
    Running,
    /// Finished with a result.
    Success,
    /// Finished with an error.
    Failed,
    /// Cancelled.
    Cancelled,
}

impl TaskState {
    /// Its name in the API.
    pub fn name(self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Running => "running",
            TaskState::Success => "success",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
        }
    }

    /// Success, failed or cancelled.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Success | TaskState::Failed | TaskState::Cancelled
        )
    }
}

/// A task as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskRecord<'a> {
    /// Its id.
    pub id: u64,
    /// Its function.
    pub function: u64,
    /// Its pool.
    #[serde(borrow)]
    pub pool: Cow<'a, str>,
    /// Where it is.
    pub state: TaskState,
    /// Its attempt (0: never dispatched).
    pub attempt: u32,
    /// When it was submitted (Unix seconds).
    pub submitted_at: f64,
    /// When it finished (Unix seconds).
    pub finished_at: Option<f64>,
    /// Its completion number (in `GET /v1/results` answers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Its result, when it succeeded.
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub result: Option<ResultRecord<'a>>,
    /// Its error, when it failed or was cancelled.
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorRecord<'a>>,
    /// Why a queued task waits (its pool is marked failed, its image is being built).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// Why a finished task's outcome is left out of this answer.
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub omitted: Option<Cow<'a, str>>,
}

impl TaskRecord<'_> {
    /// Say why the task waits, if it is queued and `why` is known.
    pub fn waiting(mut self, why: Option<String>) -> Self {
        if self.state == TaskState::Queued {
            self.waiting = why;
        }
        self
    }
}

/// A task's result: a JSON value as the function returned it (its text, every digit kept),
/// text that is not JSON, or a pickle in base64.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ResultRecord<'a> {
    /// How the result is encoded.
    pub encoding: Encoding,
    /// The JSON value (`json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Value>)]
    pub value: Option<Cow<'a, RawValue>>,
    /// A `json` result that is not valid JSON, as text.
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub text: Option<Cow<'a, str>>,
    /// The pickle (`pickle`), base64.
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub data_b64: Option<Cow<'a, str>>,
}

/// Why a task failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorRecord<'a> {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// The exception's type.
    #[serde(rename = "type", default, borrow)]
    pub type_name: Cow<'a, str>,
    /// Its message.
    #[serde(default, borrow)]
    pub message: Cow<'a, str>,
    /// Its traceback, if any.
    #[serde(default, borrow)]
    pub traceback: Option<Cow<'a, str>>,
}

/// A page of `GET /v1/results`.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ResultsPage<'a> {
    /// Finished tasks in completion order.
    #[serde(borrow)]
    pub results: Vec<TaskRecord<'a>>,
    /// Ask for the next page from here (`since=`).
    pub cursor: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back_as_written_with_the_numbers_of_its_result_exact() {
        let text = r#"{"id":7,"function":1,"pool":"local","state":"success","attempt":1,"submitted_at":1.5,"finished_at":2.5,"seq":3,"result":{"encoding":"json","value":{"x":1.10000000000000000000001}}}"#;
        let rec: TaskRecord = serde_json::from_str(text).unwrap();
        assert_eq!(rec.state, TaskState::Success);
        let value = rec.result.as_ref().unwrap().value.as_ref().unwrap();
        assert_eq!(value.get(), r#"{"x":1.10000000000000000000001}"#);
        assert_eq!(serde_json::to_string(&rec).unwrap(), text);
    }

    #[test]
    fn an_error_record_keeps_its_kind_and_a_queued_record_its_reason() {
        let text = r#"{"id":8,"function":1,"pool":"local","state":"failed","attempt":2,"submitted_at":1.0,"finished_at":2.0,"error":{"kind":"worker_lost","type":"WorkerLost","message":"signal 9","traceback":null}}"#;
        let rec: TaskRecord = serde_json::from_str(text).unwrap();
        let e = rec.error.as_ref().unwrap();
        assert_eq!(
            (e.kind, e.message.as_ref()),
            (ErrorKind::WorkerLost, "signal 9")
        );
        assert_eq!(serde_json::to_string(&rec).unwrap(), text);
        let q: TaskRecord = serde_json::from_str(
            r#"{"id":9,"function":1,"pool":"p","state":"queued","attempt":0,"submitted_at":1.0,"finished_at":null,"waiting":"its pool is marked failed"}"#,
        )
        .unwrap();
        assert!(!q.state.is_terminal() && q.waiting.is_some());
    }
}
