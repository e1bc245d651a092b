//! Functions: what a client registers, and the record the daemon stores and shows.

use fnx_protocol::{FunctionBody, FunctionContainer, Runtime};
use serde::{Deserialize, Serialize};

/// What a function runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FunctionKind {
    /// A Python callable: source text with an entry, or a `module:qualname` reference.
    Python,
    /// A shell command template.
    Shell,
    /// An MPI program's command template (stored; not run yet).
    Mpi,
}

impl FunctionKind {
    /// Its name in the API.
    pub fn name(self) -> &'static str {
        match self {
            FunctionKind::Python => "python",
            FunctionKind::Shell => "shell",
            FunctionKind::Mpi => "mpi",
        }
    }
}

/// How a parameter can be passed (Python's `inspect.Parameter.kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ParamKind {
    /// Before `/`.
    PositionalOnly,
    /// The usual kind.
    PositionalOrKeyword,
    /// `*args`.
    VarPositional,
    /// After `*` or `*args`.
    KeywordOnly,
    /// `**kwargs`.
    VarKeyword,
}

/// One parameter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Param {
    /// Its name.
    pub name: String,
    /// How it is passed.
    pub kind: ParamKind,
    /// The source text of its default value, if it has one.
    pub default: Option<String>,
}

/// A function's parameters: read from Python source, or one per field of a shell template.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Signature {
    /// In order.
    pub params: Vec<Param>,
}

/// A container image a function runs in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContainerSpec {
    /// A `.sif` path, a registry reference, ...
    pub image: String,
    /// The runtime (None: the pool's).
    #[serde(default)]
    pub runtime: Option<Runtime>,
}

impl From<&FunctionContainer> for ContainerSpec {
    fn from(c: &FunctionContainer) -> ContainerSpec {
        ContainerSpec {
            image: c.image.clone(),
            runtime: c.runtime,
        }
    }
}

impl From<&ContainerSpec> for FunctionContainer {
    fn from(c: &ContainerSpec) -> FunctionContainer {
        FunctionContainer {
            runtime: c.runtime,
            image: c.image.clone(),
        }
    }
}

/// Packages an image is built with, validated and normalised by the daemon.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Dependencies {
    /// Python requirements for pip.
    #[serde(default)]
    pub python: Vec<String>,
    /// Debian packages for apt-get.
    #[serde(default)]
    pub system: Vec<String>,
}

/// The image build a function's tasks run in: its cache key, and (in `GET
/// /v1/functions/{id}` and the registration answer) where the build stands.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BuildRef {
    /// The build's key (the SHA-256 of its definition file; the cache directory's name).
    pub key: String,
    /// Where the build stands: in `GET /v1/functions/{id}` and the registration answer the
    /// record carries the fields of [`BuildStatus`] too (left out of lists and of the stored
    /// record).
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    #[schema(ignore)]
    pub status: Option<BuildStatus>,
}

/// Where an image build stands. Tasks submitted while it is `building` are held; `ready`: they
/// run in the image; `failed`: they fail with `ImageBuildFailed`, and new submits get 400
/// until the dependencies are registered again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BuildStatus {
    /// `building`, `ready` or `failed`.
    pub state: String,
    /// `<dir>/<key>/image.sif`.
    pub image: String,
    /// `<dir>/<key>/image.def`.
    pub definition: String,
    /// `<dir>/<key>/build.log`: every build's output.
    pub log: String,
    /// Why the last build failed: `COMMAND exited with status N: <its last output line>`,
    /// `timed out after S s`, ...
    pub error: Option<String>,
    /// When the last build started (Unix seconds).
    pub started: Option<f64>,
    /// When it ended (Unix seconds; null while building).
    pub finished: Option<f64>,
}

/// A function's record as registered: what `GET /v1/functions/{id}` shows besides its id,
/// owner and time, and what the store keeps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FunctionSpec {
    /// What it runs.
    pub kind: FunctionKind,
    /// Its name (the entry, the reference's last part, or `<kind>-<id>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Python source text (left out of lists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The function to call in `source`.
    #[serde(default)]
    pub entry: Option<String>,
    /// `module:qualname` of an importable Python function.
    #[serde(default, rename = "ref")]
    pub reference: Option<String>,
    /// The command template of a shell or MPI function.
    #[serde(default)]
    pub command: Option<String>,
    /// Its parameters (None: not known, e.g. a reference).
    #[serde(default)]
    pub signature: Option<Signature>,
    /// The container its tasks run in. A stored container this version cannot read (from an
    /// older one) reads as one without an image: its tasks fail, asking to register the
    /// function again, rather than run outside it.
    #[serde(default, deserialize_with = "container_or_unusable")]
    pub container: Option<ContainerSpec>,
    /// The packages its image is built with (read leniently, as `container`).
    #[serde(default, deserialize_with = "dependencies_or_unreadable")]
    pub dependencies: Option<Dependencies>,
    /// The image build its tasks wait for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<BuildRef>,
    /// What it is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A stored `container`: null, a container, or (anything else) one without an image.
fn container_or_unusable<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<ContainerSpec>, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    if v.is_null() {
        return Ok(None);
    }
    Ok(Some(serde_json::from_value(v).unwrap_or(ContainerSpec {
        image: String::new(),
        runtime: None,
    })))
}

/// Stored `dependencies`: null, the lists, or (anything else) none known.
fn dependencies_or_unreadable<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Dependencies>, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    if v.is_null() {
        return Ok(None);
    }
    Ok(Some(serde_json::from_value(v).unwrap_or_default()))
}

impl FunctionSpec {
    /// The record of a function whose stored record cannot be read: its kind and name (kept
    /// in their own columns) and nothing it could run.
    pub fn unreadable(kind: FunctionKind, name: String) -> FunctionSpec {
        FunctionSpec {
            name: Some(name),
            ..FunctionSpec::new(kind)
        }
    }

    /// A record of `kind` with nothing else in it yet.
    pub fn new(kind: FunctionKind) -> FunctionSpec {
        FunctionSpec {
            kind,
            name: None,
            source: None,
            entry: None,
            reference: None,
            command: None,
            signature: None,
            container: None,
            dependencies: None,
            build: None,
            description: None,
        }
    }

    /// What managers run (None for kinds that cannot run yet, or a record without its body).
    pub fn body(&self) -> Option<FunctionBody> {
        match self.kind {
            FunctionKind::Python => match (&self.source, &self.entry, &self.reference) {
                (Some(source), Some(name), _) => Some(FunctionBody::PythonSource {
                    source: source.clone(),
                    name: name.clone(),
                }),
                (_, _, Some(r)) => {
                    let (module, qualname) = r.split_once(':')?;
                    Some(FunctionBody::PythonRef {
                        module: module.into(),
                        qualname: qualname.into(),
                    })
                }
                _ => None,
            },
            FunctionKind::Shell => Some(FunctionBody::Shell {
                template: self.command.clone()?,
            }),
            FunctionKind::Mpi => None,
        }
    }

    /// The container its tasks run in: the one it names, or the image built from its
    /// dependencies (an image recorded with the build).
    pub fn function_container(&self) -> Option<FunctionContainer> {
        self.container.as_ref().map(|c| FunctionContainer {
            runtime: c.runtime,
            // Records of older versions kept the image as sent.
            image: c.image.trim().to_string(),
        })
    }

    /// The key of the image build its tasks wait for.
    pub fn build_key(&self) -> Option<&str> {
        self.build.as_ref().map(|b| b.key.as_str())
    }

    /// The names of its parameters in order (a shell template's fields).
    pub fn param_names(&self) -> Vec<String> {
        self.signature
            .as_ref()
            .map(|s| s.params.iter().map(|p| p.name.clone()).collect())
            .unwrap_or_default()
    }
}

/// What a client sends to register a function (`POST /v1/functions`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct FunctionCreate {
    /// What it runs.
    pub kind: FunctionKind,
    /// Its name (default: the entry, the reference's last part, or `<kind>-<id>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Python source text (with `entry`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The function to call in `source`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entry: Option<String>,
    /// `module:qualname` of an importable Python function.
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// The command template of a shell or MPI function.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// An existing image to run its tasks in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerSpec>,
    /// Packages to build its image from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dependencies: Option<Dependencies>,
    /// What it is for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

impl FunctionCreate {
    /// A function of `kind`, every other field empty.
    pub fn new(kind: FunctionKind) -> FunctionCreate {
        FunctionCreate {
            kind,
            name: None,
            source: None,
            entry: None,
            reference: None,
            command: None,
            container: None,
            dependencies: None,
            description: None,
        }
    }

    /// A Python function given as source text, calling `entry`.
    pub fn python_source(source: &str, entry: &str) -> FunctionCreate {
        FunctionCreate {
            source: Some(source.into()),
            entry: Some(entry.into()),
            ..FunctionCreate::new(FunctionKind::Python)
        }
    }

    /// An importable Python function, `module:qualname`.
    pub fn python_ref(module: &str, qualname: &str) -> FunctionCreate {
        FunctionCreate {
            reference: Some(format!("{module}:{qualname}")),
            ..FunctionCreate::new(FunctionKind::Python)
        }
    }

    /// A shell command template.
    pub fn shell(template: &str) -> FunctionCreate {
        FunctionCreate {
            command: Some(template.into()),
            ..FunctionCreate::new(FunctionKind::Shell)
        }
    }

    /// An MPI program's command template.
    pub fn mpi(template: &str) -> FunctionCreate {
        FunctionCreate {
            command: Some(template.into()),
            ..FunctionCreate::new(FunctionKind::Mpi)
        }
    }

    /// As the JSON body of a request.
    pub fn to_json(&self) -> serde_json::Value {
        // Strings, options and enums: it always serialises.
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_stored_record_of_each_kind_reads_back_its_body_container_and_build() {
        let python: FunctionSpec = serde_json::from_value(json!({
            "kind": "python", "name": "double", "source": "def double(x): return 2*x\n",
            "entry": "double", "ref": null, "command": null,
            "signature": {"params": [{"name": "x", "kind": "positional_or_keyword", "default": null}]},
            "container": {"image": "/soft/a.sif", "runtime": "apptainer"},
            "dependencies": null
        }))
        .unwrap();
        assert_eq!(
            python.body(),
            Some(FunctionBody::PythonSource {
                source: "def double(x): return 2*x\n".into(),
                name: "double".into()
            })
        );
        assert_eq!(
            python.function_container(),
            Some(FunctionContainer {
                runtime: Some(Runtime::Apptainer),
                image: "/soft/a.sif".into()
            })
        );
        assert_eq!(python.param_names(), vec!["x"]);
        let reference: FunctionSpec =
            serde_json::from_value(json!({"kind": "python", "ref": "math:sqrt"})).unwrap();
        assert_eq!(
            reference.body(),
            Some(FunctionBody::PythonRef {
                module: "math".into(),
                qualname: "sqrt".into()
            })
        );
        let built: FunctionSpec = serde_json::from_value(json!({
            "kind": "shell", "command": "echo {x}", "build": {"key": "abc"},
            "dependencies": {"python": ["numpy"], "system": []}
        }))
        .unwrap();
        assert_eq!(built.build_key(), Some("abc"));
        assert_eq!(
            built.body(),
            Some(FunctionBody::Shell {
                template: "echo {x}".into()
            })
        );
        let mpi: FunctionSpec =
            serde_json::from_value(json!({"kind": "mpi", "command": "./lbm"})).unwrap();
        assert_eq!(mpi.body(), None);
        // A record of another shape is an error, not an empty function.
        assert!(serde_json::from_value::<FunctionSpec>(json!({"kind": "fortran"})).is_err());
        assert!(serde_json::from_value::<FunctionSpec>(json!(null)).is_err());
        // A container or dependencies stored by an older version as they were sent: the
        // function stays readable; a container it cannot read has no image (its tasks fail
        // naming it), and an image is trimmed.
        let old: FunctionSpec = serde_json::from_value(json!({
            "kind": "python", "ref": "m:f",
            "container": {"image": "x.sif", "runtime": "lxc", "extra": 1},
            "dependencies": {"python": "numpy"}
        }))
        .unwrap();
        assert_eq!(old.function_container().unwrap().image, "");
        assert_eq!(old.dependencies, Some(Dependencies::default()));
        let spaced: FunctionSpec = serde_json::from_value(json!({
            "kind": "python", "ref": "m:f", "container": {"image": " /soft/a.sif "}
        }))
        .unwrap();
        assert_eq!(spaced.function_container().unwrap().image, "/soft/a.sif");
    }

    #[test]
    fn a_record_round_trips_with_the_keys_clients_read() {
        let spec = FunctionSpec {
            name: Some("echo".into()),
            command: Some("echo {x}".into()),
            ..FunctionSpec::new(FunctionKind::Shell)
        };
        let v = serde_json::to_value(&spec).unwrap();
        // Absent fields clients test for are null, not missing.
        for k in [
            "entry",
            "ref",
            "command",
            "signature",
            "container",
            "dependencies",
        ] {
            assert!(v.get(k).is_some(), "{k} missing from {v}");
        }
        assert!(v.get("source").is_none() && v.get("build").is_none());
        assert_eq!(serde_json::from_value::<FunctionSpec>(v).unwrap(), spec);
    }
}
