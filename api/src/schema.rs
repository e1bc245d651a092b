//! Schemas of the types the API shares with the wire protocol (`fnx-protocol` has no OpenAPI
//! of its own): the same names and values, checked against the protocol's serde names by the
//! tests below.

use serde::Serialize;
use utoipa::ToSchema;

/// How a payload's bytes are read: UTF-8 JSON text, or a Python pickle.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = Encoding)]
pub enum EncodingSchema {
    /// JSON text. Arguments: an array (positional) or an object (keywords).
    Json,
    /// A pickle. Arguments: the tuple `(args, kwargs)`, or `(args, kwargs, {"python": "X.Y"})`.
    Pickle,
}

/// A container runtime.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = Runtime)]
pub enum RuntimeSchema {
    /// `apptainer exec`.
    Apptainer,
    /// `singularity exec`.
    Singularity,
    /// `docker run`.
    Docker,
    /// `podman run`.
    Podman,
    /// `shifter`.
    Shifter,
    /// The pool's own template.
    Custom,
}

/// Why a task failed.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = ErrorKind)]
pub enum ErrorKindSchema {
    /// The user's code raised (or a shell command exited non-zero). Never retried.
    Exception,
    /// The worker process running the task died.
    WorkerLost,
    /// The manager holding the task was lost.
    ManagerLost,
    /// The task ran past its walltime and was killed.
    Walltime,
    /// The result was larger than the configured limit.
    ResultTooLarge,
    /// The arguments were not valid for the function.
    BadInput,
    /// The result could not be encoded.
    NotSerializable,
    /// The function could not be imported or loaded.
    ImportError,
    /// The task was cancelled.
    Cancelled,
    /// The daemon crashed while the task ran, as many times in a row as it allows.
    DaemonCrashed,
    /// The task's processes used more memory than its limit.
    MemoryExceeded,
    /// The kernel's out-of-memory killer killed the task's process. Retried.
    OomKilled,
}

#[cfg(test)]
mod tests {
    use super::*;
    use fnx_protocol::{Encoding, ErrorKind, Runtime};

    fn name<T: Serialize>(v: T) -> String {
        serde_json::to_value(v)
            .unwrap()
            .as_str()
            .unwrap()
            .to_string()
    }

    #[test]
    fn the_schemas_name_the_protocols_values() {
        assert_eq!(name(EncodingSchema::Json), name(Encoding::Json));
        assert_eq!(name(EncodingSchema::Pickle), name(Encoding::Pickle));
        let runtimes = [
            (RuntimeSchema::Apptainer, Runtime::Apptainer),
            (RuntimeSchema::Singularity, Runtime::Singularity),
            (RuntimeSchema::Docker, Runtime::Docker),
            (RuntimeSchema::Podman, Runtime::Podman),
            (RuntimeSchema::Shifter, Runtime::Shifter),
            (RuntimeSchema::Custom, Runtime::Custom),
        ];
        for (s, r) in runtimes {
            assert_eq!(name(s), name(r));
        }
        let kinds = [
            (ErrorKindSchema::Exception, ErrorKind::Exception),
            (ErrorKindSchema::WorkerLost, ErrorKind::WorkerLost),
            (ErrorKindSchema::ManagerLost, ErrorKind::ManagerLost),
            (ErrorKindSchema::Walltime, ErrorKind::Walltime),
            (ErrorKindSchema::ResultTooLarge, ErrorKind::ResultTooLarge),
            (ErrorKindSchema::BadInput, ErrorKind::BadInput),
            (ErrorKindSchema::NotSerializable, ErrorKind::NotSerializable),
            (ErrorKindSchema::ImportError, ErrorKind::ImportError),
            (ErrorKindSchema::Cancelled, ErrorKind::Cancelled),
            (ErrorKindSchema::DaemonCrashed, ErrorKind::DaemonCrashed),
            (ErrorKindSchema::MemoryExceeded, ErrorKind::MemoryExceeded),
            (ErrorKindSchema::OomKilled, ErrorKind::OomKilled),
        ];
        for (s, k) in kinds {
            assert_eq!(name(s), name(k));
        }
    }
}
