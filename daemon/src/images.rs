//! Functions' containers: the `container` and `dependencies` fields of a registration, and
//! holding a function's tasks in every pool until the image built from its dependencies is
//! ready (or failing them with the build's error).

use crate::builds::{BuildInfo, BuildState, Builds};
use crate::invalid::Invalid;
use fnx_interchange::driver::Handle;
use fnx_protocol::{ErrorKind, FunctionContainer, FunctionId, Runtime, TaskError};
use serde_json::Value;
use std::sync::Arc;

/// Parse a registration's `container` object: `{"image": "...", "runtime": "apptainer"}`
/// (runtime optional: the pool's).
pub fn parse_container(v: &Value) -> Result<FunctionContainer, Invalid> {
    let Value::Object(m) = v else {
        return Err(Invalid::at(
            "container",
            "must be an object with \"image\" (and \"runtime\")",
        ));
    };
    if let Some(k) = m
        .keys()
        .find(|k| !["image", "runtime"].contains(&k.as_str()))
    {
        return Err(Invalid::at(
            format!("container.{k}"),
            "unknown field (known: image, runtime)",
        ));
    }
    let image = match m.get("image") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
        _ => {
            return Err(Invalid::at(
                "container.image",
                "required (a .sif path, a registry reference, ...); to build an image from \
                 packages, give dependencies instead",
            ))
        }
    };
    fnx_protocol::container::check_image(&image)
        .map_err(|e| Invalid::at("container.image", e.to_string()))?;
    let runtime = match m.get("runtime") {
        None | Some(Value::Null) => None,
        Some(Value::String(r)) => Some(Runtime::parse(r).ok_or_else(|| {
            Invalid::at(
                "container.runtime",
                format!("{r:?} is not apptainer, singularity, docker, podman, shifter or custom"),
            )
        })?),
        Some(_) => return Err(Invalid::at("container.runtime", "must be a string")),
    };
    Ok(FunctionContainer { runtime, image })
}

/// The container of a stored function record. A record this fnx cannot read (a container or
/// dependencies stored by an older version) gives a container without an image, so its tasks
/// fail naming the problem instead of running outside the container.
pub fn container_of(spec: &fnx_api::FunctionSpec) -> Option<FunctionContainer> {
    let unusable = FunctionContainer {
        runtime: None,
        image: String::new(),
    };
    match &spec.container {
        Some(c) => Some(FunctionContainer::from(c)),
        None if spec.dependencies.is_some() => Some(unusable),
        None => None,
    }
}

/// The runtime that runs images made by `builds`' command (`apptainer build` makes SIF files
/// for Apptainer, `singularity build` for Singularity); `None`: the pool's.
pub fn runtime_of_builds(command: &[String]) -> Option<Runtime> {
    let program = command.first()?;
    let name = std::path::Path::new(program).file_name()?.to_str()?;
    match name {
        "apptainer" => Some(Runtime::Apptainer),
        "singularity" => Some(Runtime::Singularity),
        _ => None,
    }
}

/// A build's state as the API shows it.
pub fn build_status(info: &BuildInfo) -> fnx_api::BuildStatus {
    fnx_api::BuildStatus {
        state: match info.state {
            BuildState::Building => "building",
            BuildState::Ready => "ready",
            BuildState::Failed => "failed",
        }
        .into(),
        image: info.image.display().to_string(),
        definition: info.definition.display().to_string(),
        log: info.log.display().to_string(),
        error: info.error.clone(),
        started: info.started,
        finished: info.finished,
    }
}

/// The error of tasks whose function's image failed to build.
pub fn build_error(id: FunctionId, info: &BuildInfo) -> TaskError {
    TaskError::new(
        ErrorKind::ImportError,
        "ImageBuildFailed",
        format!(
            "the container image of {id} could not be built: {}; build log: {}",
            info.error.as_deref().unwrap_or("unknown error"),
            info.log.display()
        ),
    )
}

/// Hold the tasks of function `id` in every pool until the build `key` ends (see
/// [`release_when_built`]).
pub fn hold_until_built(builds: &Builds, key: &str, id: FunctionId, pools: Vec<Arc<Handle>>) {
    for h in &pools {
        h.hold_function(id);
    }
    release_when_built(builds, key, id, pools);
}

/// When the build `key` ends, release the held tasks of function `id` in every pool, or fail
/// them with the build's error. Race-free: [`Builds::watch`] calls back at once if the build
/// has already ended.
pub fn release_when_built(builds: &Builds, key: &str, id: FunctionId, pools: Vec<Arc<Handle>>) {
    builds.watch(
        key,
        Box::new(move |info: &BuildInfo| match info.state {
            BuildState::Ready => {
                tracing::info!("the image of {id} is ready: its tasks may run");
                for h in &pools {
                    h.release_function(id);
                }
            }
            _ => {
                let e = build_error(id, info);
                tracing::warn!("{}", e.message);
                for h in &pools {
                    h.fail_function(id, e.clone());
                }
            }
        }),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn containers_parse_strictly() {
        let c = parse_container(&json!({"image": " /soft/a.sif "})).unwrap();
        assert_eq!((c.image.as_str(), c.runtime), ("/soft/a.sif", None));
        let c = parse_container(&json!({"image": "x", "runtime": "docker"})).unwrap();
        assert_eq!(c.runtime, Some(Runtime::Docker));
        let stored: fnx_api::FunctionSpec = serde_json::from_value(json!({
            "kind": "python", "ref": "m:f", "container": fnx_api::ContainerSpec::from(&c)
        }))
        .unwrap();
        assert_eq!(container_of(&stored), Some(c));
        for (bad, why) in [
            (json!("img"), "must be an object"),
            (json!({}), "container.image: required"),
            (json!({"image": "x", "runtime": "lxc"}), "\"lxc\" is not"),
            (json!({"image": "x", "tag": 1}), "container.tag: unknown"),
            (json!({"image": "--privileged"}), "starts with '-'"),
            (json!({"image": "a\nb"}), "control characters"),
        ] {
            let e = parse_container(&bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert_eq!(
            runtime_of_builds(&["/usr/bin/apptainer".into(), "build".into()]),
            Some(Runtime::Apptainer)
        );
        assert_eq!(runtime_of_builds(&["sh".into()]), None);
    }
}
