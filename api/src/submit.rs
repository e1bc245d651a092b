//! `POST /v1/tasks`: a batch of tasks, in a JSON body or a msgpack one (the same fields; the
//! daemon reads both into these types, so an error names the same field path, `tasks[3].args`).

use fnx_protocol::Encoding;
use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::fmt;
use std::marker::PhantomData;

/// A submit's body.
#[derive(Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskBatch<'a> {
    /// 1 to `limits.max_tasks_per_request` tasks (None: the field is missing). Each task is
    /// an object (a map), never an array of fields by position.
    #[serde(borrow, default, deserialize_with = "maps")]
    #[schema(required = true)]
    pub tasks: Option<Vec<TaskSubmission<'a>>>,
}

/// One task of a submit.
#[derive(Clone, Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskSubmission<'a> {
    /// The function's id (required; None: the field is missing).
    #[serde(default)]
    #[schema(required = true)]
    pub function: Option<u64>,
    /// How the arguments are encoded (default `json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<Encoding>,
    /// JSON arguments as written: an array (positional) or an object (keywords). JSON bodies.
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Value>)]
    pub args: Option<&'a RawValue>,
    /// Pickled `(args, kwargs)`, base64. JSON bodies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_b64: Option<String>,
    /// The arguments' bytes (JSON text, or a pickle). Msgpack bodies (binary).
    #[serde(default, with = "serde_bytes", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Binary)]
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
    /// Input files placed in the task's working directory (null: none).
    #[serde(
        default,
        deserialize_with = "files",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub files: Vec<FileSubmission>,
}

/// An input file: its name, and its bytes (`data_b64` in JSON, `data` in msgpack) or an
/// absolute path on a filesystem the nodes share.
#[derive(Clone, Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FileSubmission {
    /// A plain file name (no `/`).
    pub name: String,
    /// Its bytes, base64 (JSON bodies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_b64: Option<String>,
    /// Its bytes (msgpack bodies, binary).
    #[serde(default, with = "serde_bytes", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Binary)]
    pub data: Option<Vec<u8>>,
    /// An absolute path the task's directory links to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// A number of MiB: null, or a whole number above 0. Anything else is an error saying so,
/// naming the number or only the kind of value given (never quoting it at length).
fn mebibytes<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct Mib;
    fn bad<E: serde::de::Error>(got: impl fmt::Display) -> E {
        E::custom(format!("must be a whole number of MiB above 0, got {got}"))
    }
    impl<'de> Visitor<'de> for Mib {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a whole number of MiB above 0")
        }
        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Self::Value, E> {
            if n == 0 {
                return Err(bad(n));
            }
            Ok(Some(n))
        }
        fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Self::Value, E> {
            match u64::try_from(n) {
                Ok(n) => self.visit_u64(n),
                Err(_) => Err(bad(n)),
            }
        }
        fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<Self::Value, E> {
            Err(bad(n))
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Err(bad("a string"))
        }
        fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Err(bad("a boolean"))
        }
        fn visit_bytes<E: serde::de::Error>(self, _: &[u8]) -> Result<Self::Value, E> {
            Err(bad("bytes"))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
            Err(bad("an array"))
        }
        fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
            Err(bad("an object"))
        }
    }
    d.deserialize_any(Mib)
}

/// Reads a `T` from a map only: an array of its fields by position (which serde takes for a
/// struct) is refused, so a value is read by its fields' names or not at all.
pub struct MapOnly<T>(PhantomData<T>);

impl<T> Default for MapOnly<T> {
    fn default() -> Self {
        MapOnly(PhantomData)
    }
}

impl<'de, T: Deserialize<'de>> DeserializeSeed<'de> for MapOnly<T> {
    type Value = T;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for MapOnly<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
    }
}

/// Null, or an array of objects each read as a `T` ([`MapOnly`]), at most `max` of them.
pub struct MapsUpTo<T> {
    /// The most elements taken; one more is an error.
    pub max: usize,
    _of: PhantomData<T>,
}

impl<T> MapsUpTo<T> {
    /// At most `max` elements.
    pub fn new(max: usize) -> Self {
        MapsUpTo {
            max,
            _of: PhantomData,
        }
    }
}

impl<'de, T: Deserialize<'de>> DeserializeSeed<'de> for MapsUpTo<T> {
    type Value = Option<Vec<T>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for MapsUpTo<T> {
    type Value = Option<Vec<T>>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "an array of at most {} objects", self.max)
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        // The hint comes from the sender: it sizes nothing.
        let mut out = Vec::new();
        while let Some(item) = seq.next_element_seed(MapOnly::<T>::default())? {
            if out.len() == self.max {
                return Err(A::Error::custom(format!("more than {} of them", self.max)));
            }
            out.push(item);
        }
        Ok(Some(out))
    }
}

/// The most tasks a body may hold, whatever `limits.max_tasks_per_request` says (it is
/// checked against that limit once read).
pub const MAX_TASKS: usize = 1_000_000;

fn maps<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Vec<T>>, D::Error> {
    MapsUpTo::new(MAX_TASKS).deserialize(d)
}

/// The most input files one task may have.
pub const MAX_FILES: usize = 10_000;

fn files<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<FileSubmission>, D::Error> {
    Ok(MapsUpTo::new(MAX_FILES).deserialize(d)?.unwrap_or_default())
}

/// The answer to a submit.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
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
