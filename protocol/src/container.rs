//! Containers that workers start in: a runtime (Apptainer, Singularity, Docker, Podman, Shifter,
//! or a custom command template), an image, and how a command is wrapped to run inside.
//!
//! A template is a list of words; `{image}` and `{rundir}` are replaced inside words, and the
//! word `{cmd}` becomes the command's words. Nothing goes through a shell.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// A container runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
    /// `{cmd}`; the others need an image.
    pub fn validate(&self) -> Result<(), String> {
        let template = self.template_text();
        match template {
            None => Err("a custom container runtime needs a template".into()),
            Some(t) if !t.split_whitespace().any(|w| w == "{cmd}") => Err(format!(
                "the container template {t:?} has no {{cmd}} word (where the command goes)"
            )),
            Some(_) if self.runtime != Runtime::Custom && self.image.trim().is_empty() => {
                Err("the container needs an image".into())
            }
            Some(_) => Ok(()),
        }
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
        assert!(c.validate().unwrap_err().contains("no {cmd} word"));
        c.template = None;
        assert!(c.validate().is_err());
        let no_image = Container {
            runtime: Runtime::Apptainer,
            image: " ".into(),
            template: None,
        };
        assert!(no_image.validate().unwrap_err().contains("image"));
    }
}
