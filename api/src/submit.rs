//! `POST /v1/tasks`: a batch of tasks, in a JSON body or a msgpack one (the same fields; the
//! daemon reads both into these types, so an error names the same field path, `tasks[3].args`).

use fnx_protocol::Encoding;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// A submit's body.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskBatch<'a> {
    /// 1 to `limits.max_tasks_per_request` tasks (None: the field is missing).
    #[serde(borrow, default)]
    pub tasks: Option<Vec<TaskSubmission<'a>>>,
}

/// One task of a submit.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSubmission<'a> {
    /// The function's id (required; None: the field is missing).
    #[serde(default)]
    pub function: Option<u64>,
    /// How the arguments are encoded (default `json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<Encoding>,
    /// JSON arguments as written: an array (positional) or an object (keywords). JSON bodies.
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub args: Option<&'a RawValue>,
    /// Pickled `(args, kwargs)`, base64. JSON bodies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_b64: Option<String>,
    /// The arguments' bytes (JSON text, or a pickle). Msgpack bodies.
    #[serde(default, with = "serde_bytes", skip_serializing_if = "Option::is_none")]
    pub data: Option<Vec<u8>>,
    /// The pool (default: the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Higher runs first (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// Seconds the task may run per attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub walltime: Option<f64>,
    /// Runs again after an infrastructure failure (default 2, at most 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// Its own memory limit in MiB (at most the pool's `mem_per_worker`).
    #[serde(
        default,
        deserialize_with = "mebibytes",
        skip_serializing_if = "Option::is_none"
    )]
    pub memory_mb: Option<u64>,
    /// Input files placed in the task's working directory.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileSubmission>,
}

/// An input file: its name, and its bytes (`data_b64` in JSON, `data` in msgpack) or an
/// absolute path on a filesystem the nodes share.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSubmission {
    /// A plain file name (no `/`).
    pub name: String,
    /// Its bytes, base64 (JSON bodies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_b64: Option<String>,
    /// Its bytes (msgpack bodies).
    #[serde(default, with = "serde_bytes", skip_serializing_if = "Option::is_none")]
    pub data: Option<Vec<u8>>,
    /// An absolute path the task's directory links to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// A number of MiB: null, or a whole number above 0 (an error says so, whatever was given).
fn mebibytes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    use serde::de::Error;
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Null => Ok(None),
        v => match v.as_u64().filter(|&n| n > 0) {
            Some(n) => Ok(Some(n)),
            None => Err(D::Error::custom(format!(
                "must be a whole number of MiB above 0, got {v}"
            ))),
        },
    }
}

/// The answer to a submit.
#[derive(Debug, Serialize, Deserialize)]
pub struct TaskIds {
    /// The new tasks' ids, in request order.
    pub ids: Vec<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_batch_keeps_each_tasks_arguments_as_written() {
        let body = r#"{"tasks": [{"function": 3, "args": [1.000000000000000000001, {"b": 1, "a": 2}], "walltime": 10},
                                 {"function": 3, "encoding": "pickle", "data_b64": "gAU="}]}"#;
        let b: TaskBatch = serde_json::from_str(body).unwrap();
        let tasks = b.tasks.unwrap();
        assert_eq!(
            tasks[0].args.unwrap().get(),
            r#"[1.000000000000000000001, {"b": 1, "a": 2}]"#
        );
        assert_eq!(
            (tasks[0].walltime, tasks[1].encoding),
            (Some(10.0), Some(Encoding::Pickle))
        );
        let unknown =
            serde_json::from_str::<TaskBatch>(r#"{"tasks": [{"function": 1, "argz": []}]}"#);
        assert!(unknown.unwrap_err().to_string().contains("argz"));
    }

    #[test]
    fn a_msgpack_batch_reads_into_the_same_types() {
        #[derive(Serialize)]
        struct Task<'a> {
            function: u64,
            #[serde(with = "serde_bytes")]
            data: &'a [u8],
            files: Vec<FileSubmission>,
        }
        #[derive(Serialize)]
        struct Body<'a> {
            tasks: Vec<Task<'a>>,
        }
        let file = FileSubmission {
            name: "in.txt".into(),
            data: Some(b"hello".to_vec()),
            ..FileSubmission::default()
        };
        let bytes = rmp_serde::to_vec_named(&Body {
            tasks: vec![Task {
                function: 1,
                data: b"[1]",
                files: vec![file],
            }],
        })
        .unwrap();
        let b: TaskBatch = rmp_serde::from_slice(&bytes).unwrap();
        let t = &b.tasks.unwrap()[0];
        assert_eq!(
            (t.function, t.data.as_deref()),
            (Some(1), Some(&b"[1]"[..]))
        );
        assert_eq!(t.files[0].data.as_deref(), Some(&b"hello"[..]));
    }
}
