//! Containers that workers start in: a runtime (Apptainer, Singularity, Docker, Podman, Shifter,
//! or a custom command template), an image, and how a command is wrapped to run inside.
//!
//! A template is a list of words; `{image}` and `{rundir}` are replaced inside words, and the
//! word `{cmd}` becomes the command's words. Nothing goes through a shell.

use serde::{Deserialize, Serialize};
use std::path::Path;
use thiserror::Error;

/// Why a container cannot wrap commands, or a function's container cannot run in a pool.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ContainerError {
    /// A `custom` runtime with no template.
    #[error("a custom container runtime needs a template")]
    NoTemplate,
    /// A template without the `{cmd}` word.
    #[error("the container template {0:?} has no {{cmd}} word (where the command goes)")]
    NoCmdWord(String),
    /// An image reference that would be taken for an option.
    #[error("the image {0:?} starts with '-'")]
    ImageLikeOption(String),
    /// An image reference that is not one word.
    #[error("the image {0:?} has whitespace or control characters")]
    ImageNotOneWord(String),
    /// A function's container with an empty image.
    #[error(
        "the function's container names no image (a record of an older fnx?): register the \
         function again"
    )]
    NoImage,
    /// The function names a runtime other than the pool's.
    #[error(
        "the function asks for the {asked} runtime, but this pool runs containers with {pool} \
         only (its container_runtime)"
    )]
    NotThePoolsRuntime {
        /// The function's runtime.
        asked: &'static str,
        /// The pool's.
        pool: &'static str,
    },
    /// The function names a runtime, and the pool has none.
    #[error(
        "the function asks for the {0} runtime, but this pool has no container_runtime: a \
         function cannot choose one the site did not configure"
    )]
    PoolHasNoRuntime(&'static str),
    /// Neither the function nor the pool names a runtime.
    #[error(
        "the function's container image {0:?} names no runtime and this pool runs its workers \
         on the host: name a runtime in the function's container or set the pool's \
         container_runtime"
    )]
    NoRuntime(String),
    /// The function asks for `custom`, and the pool has no template.
    #[error(
        "the function asks for the custom runtime, but this pool has no custom \
         container_template"
    )]
    NoPoolTemplate,
    /// The pool's custom template cannot take an image.
    #[error(
        "this pool's custom container_template has no {{image}}, so it cannot run the \
         function's image {0:?}"
    )]
    TemplateTakesNoImage(String),
}

/// A container runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Runtime {
    /// `apptainer exec --bind RUNDIR IMAGE CMD`.
    Apptainer,
    /// `singularity exec --bind RUNDIR IMAGE CMD`.
    Singularity,
    /// `docker run --rm -i --network host -v RUNDIR:RUNDIR -w RUNDIR IMAGE CMD`.
    Docker,
    /// `podman run --rm -i --network host --env-host -v RUNDIR:RUNDIR -w RUNDIR IMAGE CMD`.
    Podman,
    /// `shifter --image=IMAGE --volume=RUNDIR:RUNDIR CMD`.
    Shifter,
    /// The pool's own template.
    Custom,
}

impl Runtime {
    /// Parse a configuration value.
    pub fn parse(s: &str) -> Option<Runtime> {
        Some(match s {
            "apptainer" => Runtime::Apptainer,
            "singularity" => Runtime::Singularity,
            "docker" => Runtime::Docker,
            "podman" => Runtime::Podman,
            "shifter" => Runtime::Shifter,
            "custom" => Runtime::Custom,
            _ => return None,
        })
    }

    /// The configuration name.
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Apptainer => "apptainer",
            Runtime::Singularity => "singularity",
            Runtime::Docker => "docker",
            Runtime::Podman => "podman",
            Runtime::Shifter => "shifter",
            Runtime::Custom => "custom",
        }
    }

    /// The built-in template (None for `custom`).
    pub fn template(self) -> Option<&'static str> {
        Some(match self {
            Runtime::Apptainer => "apptainer exec --bind {rundir} {image} {cmd}",
            Runtime::Singularity => "singularity exec --bind {rundir} {image} {cmd}",
            Runtime::Docker => {
                "docker run --rm -i --network host -v {rundir}:{rundir} -w {rundir} {image} {cmd}"
            }
            Runtime::Podman => {
                "podman run --rm -i --network host --env-host -v {rundir}:{rundir} -w {rundir} \
                 {image} {cmd}"
            }
            Runtime::Shifter => "shifter --image={image} --volume={rundir}:{rundir} {cmd}",
            Runtime::Custom => return None,
        })
    }
}

/// The container a pool's workers start in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    /// The runtime.
    pub runtime: Runtime,
    /// The image (a `.sif` path, a registry reference, ...); may be empty for `custom`.
    pub image: String,
    /// The template of a `custom` runtime (ignored otherwise).
    pub template: Option<String>,
}

impl Container {
    /// Check that the container can wrap commands: a `custom` runtime needs a template with
    /// `{cmd}`. (Without an image, a pool's container only names the runtime that functions
    /// with their own image use; see [`Container::is_for_all`].)
    pub fn validate(&self) -> Result<(), ContainerError> {
        let template = self.template_text();
        match template {
            None => Err(ContainerError::NoTemplate),
            Some(t) if !t.split_whitespace().any(|w| w == "{cmd}") => {
                Err(ContainerError::NoCmdWord(t.to_string()))
            }
            Some(_) => Ok(()),
        }
    }

    /// Whether a pool's container wraps the tasks of every function that names no container of
    /// its own: it has an image, or it is a `custom` template that needs none.
    pub fn is_for_all(&self) -> bool {
        !self.image.trim().is_empty()
            || (self.runtime == Runtime::Custom
                && !self.template_text().unwrap_or("").contains("{image}"))
    }

    fn template_text(&self) -> Option<&str> {
        match self.runtime {
            Runtime::Custom => self.template.as_deref(),
            r => r.template(),
        }
    }

    /// `cmd` wrapped to run in the container, with `rundir` (the manager's run directory)
    /// bound inside.
    pub fn wrap(&self, rundir: &Path, cmd: &[String]) -> Vec<String> {
        let rundir = rundir.display().to_string();
        let mut out = Vec::new();
        for word in self.template_text().unwrap_or("{cmd}").split_whitespace() {
            if word == "{cmd}" {
                out.extend(cmd.iter().cloned());
            } else {
                out.push(
                    word.replace("{image}", &self.image)
                        .replace("{rundir}", &rundir),
                );
            }
        }
        out
    }
}

/// Check a function's image reference: one word that cannot be taken for an option.
pub fn check_image(image: &str) -> Result<(), ContainerError> {
    if image.starts_with('-') {
        return Err(ContainerError::ImageLikeOption(image.to_string()));
    }
    if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ContainerError::ImageNotOneWord(image.to_string()));
    }
    Ok(())
}

/// The container a function asks for: an image, and the runtime to start it with (`None`: the
/// pool's runtime). A function cannot bring its own template; a `custom` runtime's template is
/// the pool's (its `{image}` becomes the function's image).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FunctionContainer {
    /// The runtime, if the function names one.
    pub runtime: Option<Runtime>,
    /// The image (a `.sif` path, a registry reference, ...).
    pub image: String,
}

impl FunctionContainer {
    /// The worker environment this container is: workers started in it serve every function
    /// with the same key.
    pub fn key(&self) -> String {
        let runtime = self.runtime.map_or("pool", Runtime::name);
        format!("{runtime}:{}", self.image)
    }

    /// The container to start on a node whose pool runs its workers in `pool` (`None`: on the
    /// host): with the pool's runtime and template. A function may name a runtime only when it
    /// is the pool's (the pool's runtime is the allow-list). An error says why it cannot run
    /// there (another runtime, no runtime known, a `custom` runtime without a template).
    pub fn resolve(&self, pool: Option<&Container>) -> Result<Container, ContainerError> {
        if self.image.trim().is_empty() {
            return Err(ContainerError::NoImage);
        }
        check_image(&self.image)?;
        let runtime = match (self.runtime, pool) {
            // The pool's runtime is its allow-list: a function cannot pick a runtime the
            // site did not configure for this pool (docker on an apptainer pool, say).
            (Some(r), Some(p)) if r != p.runtime => {
                return Err(ContainerError::NotThePoolsRuntime {
                    asked: r.name(),
                    pool: p.runtime.name(),
                })
            }
            (Some(r), None) => return Err(ContainerError::PoolHasNoRuntime(r.name())),
            (Some(r), Some(_)) => r,
            (None, Some(p)) => p.runtime,
            (None, None) => return Err(ContainerError::NoRuntime(self.image.clone())),
        };
        let template = pool
            .filter(|p| p.runtime == runtime)
            .and_then(|p| p.template.clone());
        match &template {
            None if runtime == Runtime::Custom => return Err(ContainerError::NoPoolTemplate),
            Some(t) if runtime == Runtime::Custom && !t.contains("{image}") => {
                return Err(ContainerError::TemplateTakesNoImage(self.image.clone()))
            }
            _ => {}
        }
        let c = Container {
            runtime,
            image: self.image.clone(),
            template,
        };
        c.validate()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd() -> Vec<String> {
        vec!["python3".into(), "-u".into(), "worker.py".into()]
    }

    #[test]
    fn built_in_templates_wrap_without_a_shell() {
        let c = Container {
            runtime: Runtime::Apptainer,
            image: "/soft/img.sif".into(),
            template: None,
        };
        c.validate().unwrap();
        assert_eq!(
            c.wrap(Path::new("/runs/a b"), &cmd()).join("|"),
            "apptainer|exec|--bind|/runs/a b|/soft/img.sif|python3|-u|worker.py"
        );
        let s = Container {
            runtime: Runtime::Shifter,
            image: "docker:python:3.11".into(),
            template: None,
        };
        assert_eq!(
            s.wrap(Path::new("/r"), &cmd())[..3],
            ["shifter", "--image=docker:python:3.11", "--volume=/r:/r"]
        );
    }

    #[test]
    fn custom_templates_need_a_cmd_word() {
        let mut c = Container {
            runtime: Runtime::Custom,
            image: String::new(),
            template: Some("bwrap --ro-bind / / --bind {rundir} {rundir} {cmd}".into()),
        };
        c.validate().unwrap();
        assert_eq!(
            c.wrap(Path::new("/r"), &cmd()).join(" "),
            "bwrap --ro-bind / / --bind /r /r python3 -u worker.py"
        );
        c.template = Some("bwrap --ro-bind / / sh -c '{cmd}'".into());
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("no {cmd} word"));
        c.template = None;
        assert!(c.validate().is_err());
        // Without an image, a pool's container only names the runtime for functions' images.
        let no_image = Container {
            runtime: Runtime::Apptainer,
            image: " ".into(),
            template: None,
        };
        no_image.validate().unwrap();
        assert!(!no_image.is_for_all());
        c.template = Some("bwrap {cmd}".into());
        assert!(c.is_for_all());
        c.template = Some("rec {image} {cmd}".into());
        assert!(!c.is_for_all());
    }

    #[test]
    fn function_containers_resolve_against_the_pool() {
        let bwrap = Container {
            runtime: Runtime::Custom,
            image: String::new(),
            template: Some("rec {image} bwrap {cmd}".into()),
        };
        let f = FunctionContainer {
            runtime: None,
            image: "alpha".into(),
        };
        assert_eq!(f.key(), "pool:alpha");
        let c = f.resolve(Some(&bwrap)).unwrap();
        assert_eq!(
            c.wrap(Path::new("/r"), &cmd())[..3],
            ["rec", "alpha", "bwrap"]
        );
        assert!(f
            .resolve(None)
            .unwrap_err()
            .to_string()
            .contains("names no runtime"));
        let a = FunctionContainer {
            runtime: Some(Runtime::Apptainer),
            image: "/img.sif".into(),
        };
        assert_eq!(a.key(), "apptainer:/img.sif");
        // Issue 11: a function cannot pick a runtime its pool did not configure.
        let e = a.resolve(Some(&bwrap)).unwrap_err().to_string();
        assert!(e.contains("apptainer") && e.contains("custom only"), "{e}");
        assert!(a
            .resolve(None)
            .unwrap_err()
            .to_string()
            .contains("no container_runtime"));
        let apptainer_pool = Container {
            runtime: Runtime::Apptainer,
            image: String::new(),
            template: None,
        };
        let c = a.resolve(Some(&apptainer_pool)).unwrap();
        assert_eq!(c.wrap(Path::new("/r"), &cmd())[0], "apptainer");
        let custom = FunctionContainer {
            runtime: Some(Runtime::Custom),
            image: "x".into(),
        };
        assert!(custom
            .resolve(Some(&Container {
                template: None,
                ..bwrap.clone()
            }))
            .unwrap_err()
            .to_string()
            .contains("container_template"));
        let sandbox = Container {
            template: Some("bwrap {cmd}".into()),
            ..bwrap.clone()
        };
        assert!(f
            .resolve(Some(&sandbox))
            .unwrap_err()
            .to_string()
            .contains("has no {image}"));
        for bad in ["--privileged", "a b", "x\ny"] {
            let e = FunctionContainer {
                runtime: Some(Runtime::Docker),
                image: bad.into(),
            };
            assert!(e.resolve(None).is_err(), "{bad:?}");
        }
        assert!(FunctionContainer {
            runtime: Some(Runtime::Docker),
            image: " ".into()
        }
        .resolve(None)
        .unwrap_err()
        .to_string()
        .contains("image"));
        // Not docker on a pool that never configured it, whatever the image.
        let docker = FunctionContainer {
            runtime: Some(Runtime::Docker),
            image: "alpine".into(),
        };
        assert!(docker.resolve(Some(&apptainer_pool)).is_err());
        assert!(docker.resolve(None).is_err());
    }
}
