//! Function signatures: read from Python source without running it (a short `ast` script run
//! by the pool's interpreter), and checked against a task's JSON arguments at submit, so that a
//! call that cannot bind is refused at once with the parameter's name instead of failing later
//! on a node. Shell templates have one parameter per `{name}` field.

use serde_json::Value;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use thiserror::Error;

/// Why a function's signature could not be read from its source.
#[derive(Debug, Error)]
pub enum ReadError {
    /// The interpreter could not be started.
    #[error("cannot run {python} to read the function's signature: {source}")]
    Spawn {
        /// The interpreter.
        python: String,
        /// Why.
        source: std::io::Error,
    },
    /// The reader ran out of time.
    #[error(
        "reading the function's signature took longer than {secs} s; the source is too large \
         or too complex to register"
    )]
    Timeout {
        /// Its time limit.
        secs: f64,
    },
    /// The reader ran out of memory.
    #[error(
        "reading the function's signature needed more than {mib} MiB of memory; the source is \
         too large or too complex to register"
    )]
    Memory {
        /// Its memory limit.
        mib: u64,
    },
    /// The reader failed without an answer.
    #[error("{python} could not read the function's signature ({status}): {stderr}")]
    Failed {
        /// The interpreter.
        python: String,
        /// How it ended.
        status: std::process::ExitStatus,
        /// What it wrote on its standard error.
        stderr: String,
    },
    /// The source is not what can be registered (a syntax error with its line, no such entry):
    /// the reader's message.
    #[error("{0}")]
    Source(String),
    /// The reader answered something else than a signature.
    #[error("unexpected signature from {python}: {source}")]
    Unexpected {
        /// The interpreter.
        python: String,
        /// Why it does not decode.
        source: serde_json::Error,
    },
}

/// Why a task's arguments do not bind to its function's parameters (the message follows the
/// function's name, as Python's does: `f() takes 2 positional arguments but 3 were given`).
#[derive(Debug, Error)]
pub enum BindError {
    /// Neither an array nor an object.
    #[error("arguments must be a JSON array (positional) or object (keywords), got {0}")]
    NotArguments(&'static str),
    /// More positional arguments than parameters.
    #[error("takes {takes} positional argument{} but {given} were given", plural(*.takes))]
    TooManyPositional {
        /// Positional parameters.
        takes: usize,
        /// Positional arguments.
        given: usize,
    },
    /// A parameter given by position and by name.
    #[error("got multiple values for parameter '{0}'")]
    Multiple(String),
    /// A positional-only parameter given by name.
    #[error("parameter '{0}' is positional-only")]
    PositionalOnly(String),
    /// No parameter of this name.
    #[error("has no parameter '{0}'")]
    NoSuchParameter(String),
    /// A required parameter not given.
    #[error("missing required parameter '{0}'")]
    Missing(String),
    /// No field of a shell template of this name.
    #[error("has no parameter '{name}' (the template's parameters: {shown})")]
    NoSuchField {
        /// The name given.
        name: String,
        /// The template's parameters (the first of them).
        shown: String,
    },
    /// Another number of values than the template has fields.
    #[error("the template takes {takes} parameters ({shown}), got {given} values")]
    FieldCount {
        /// Fields.
        takes: usize,
        /// The template's parameters (the first of them).
        shown: String,
        /// Values given.
        given: usize,
    },
    /// A shell value that is not a string, number or boolean.
    #[error("the value of parameter '{name}' must be a string or number, got {got}")]
    NotScalar {
        /// The parameter.
        name: String,
        /// What it got.
        got: &'static str,
    },
    /// Shell arguments that are not JSON.
    #[error("not valid JSON: {0}")]
    NotJson(#[from] serde_json::Error),
    /// Shell arguments neither an object nor an array.
    #[error("shell arguments must be an object {{param: value}} or an array, got {0}")]
    NotShellArguments(&'static str),
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

pub use fnx_api::{Param, ParamKind, Signature};

const READ_SIGNATURE: &str = r#"
import ast, json, sys
req = json.load(sys.stdin)
try:
    tree = ast.parse(req["source"])
except SyntaxError as e:
    print(json.dumps({"error": "line %s: %s" % (e.lineno, e.msg)})); sys.exit(0)
defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
fn = [n for n in defs if n.name == req["entry"]]
if not fn:
    names = ", ".join(n.name for n in defs) or "none"
    print(json.dumps({"error": "no top-level function %r in the source (functions found: %s)" % (req["entry"], names)}))
    sys.exit(0)
a = fn[0].args
out = []
def text(d):
    return None if d is None else ast.unparse(d)
pos = list(getattr(a, "posonlyargs", [])) + list(a.args)
defaults = [None] * (len(pos) - len(a.defaults)) + list(a.defaults)
for i, (p, d) in enumerate(zip(pos, defaults)):
    kind = "positional_only" if i < len(getattr(a, "posonlyargs", [])) else "positional_or_keyword"
    out.append({"name": p.arg, "kind": kind, "default": text(d)})
if a.vararg:
    out.append({"name": a.vararg.arg, "kind": "var_positional", "default": None})
for p, d in zip(a.kwonlyargs, a.kw_defaults):
    out.append({"name": p.arg, "kind": "keyword_only", "default": text(d)})
if a.kwarg:
    out.append({"name": a.kwarg.arg, "kind": "var_keyword", "default": None})
print(json.dumps({"params": out}))
"#;

/// The longest a signature reading may take.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The address space a signature reader may use.
pub const READ_MEMORY_BYTES: u64 = 1 << 30;
/// How much of a reader's output is read.
const MAX_OUTPUT: u64 = 4 << 20;

/// Read the signature of `entry` in `source` with `python`. `Err` is a message for the user
/// (syntax error with its line, entry not found, the reading took too long or too much
/// memory) or names the interpreter that failed.
pub fn from_python_source(python: &str, source: &str, entry: &str) -> Result<Signature, ReadError> {
    read_bounded(python, source, entry, READ_TIMEOUT, READ_MEMORY_BYTES)
}

/// [`from_python_source`] with its bounds: the reader is killed after `timeout`, and its
/// address space is limited to `memory` bytes.
fn read_bounded(
    python: &str,
    source: &str,
    entry: &str,
    timeout: Duration,
    memory: u64,
) -> Result<Signature, ReadError> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(python);
    cmd.args(["-I", "-c", READ_SIGNATURE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let cpu = timeout.as_secs() + 1;
    // SAFETY: setrlimit is async-signal-safe; the closure allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let limit = |what, n: u64| {
                let l = libc::rlimit {
                    rlim_cur: n,
                    rlim_max: n,
                };
                if libc::setrlimit(what, &l) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            };
            limit(libc::RLIMIT_AS, memory)?;
            limit(libc::RLIMIT_CPU, cpu)
        });
    }
    let mut child = cmd.spawn().map_err(|source| ReadError::Spawn {
        python: python.to_string(),
        source,
    })?;
    let req = serde_json::json!({"source": source, "entry": entry}).to_string();
    let stdin = child.stdin.take();
    let writer = std::thread::spawn(move || {
        if let Some(mut stdin) = stdin {
            let _ = stdin.write_all(req.as_bytes());
        }
    });
    // Both pipes at once: a reader that fills one while the other is read would block.
    fn drain(pipe: Option<impl Read + Send + 'static>, max: u64) -> JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            if let Some(p) = pipe {
                let _ = p.take(max).read_to_end(&mut out);
            }
            out
        })
    }
    let stdout = drain(child.stdout.take(), MAX_OUTPUT);
    let stderr = drain(child.stderr.take(), 64 << 10);
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let _ = writer.join();
    let (stdout, stderr) = (
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default(),
    );
    let Some(status) = status else {
        return Err(ReadError::Timeout {
            secs: timeout.as_secs_f64(),
        });
    };
    let stderr = String::from_utf8_lossy(&stderr);
    if stderr.contains("MemoryError") {
        return Err(ReadError::Memory { mib: memory >> 20 });
    }
    let v: Value = serde_json::from_slice(&stdout).map_err(|_| ReadError::Failed {
        python: python.to_string(),
        status,
        stderr: stderr.trim().to_string(),
    })?;
    if let Some(err) = v.get("error").and_then(Value::as_str) {
        return Err(ReadError::Source(err.to_string()));
    }
    serde_json::from_value(v).map_err(|source| ReadError::Unexpected {
        python: python.to_string(),
        source,
    })
}

/// The signature of a shell template: one parameter per field, in order.
pub fn of_shell(params: &[String]) -> Signature {
    Signature {
        params: params
            .iter()
            .map(|p| Param {
                name: p.clone(),
                kind: ParamKind::PositionalOrKeyword,
                default: None,
            })
            .collect(),
    }
}

/// Check that JSON arguments (an array: positional; an object: keywords) bind to the
/// parameters of `sig`, as Python's call rules would. `Err` names the parameter.
pub fn check_binding(sig: &Signature, args: &Value) -> Result<(), BindError> {
    let (npos, keys): (usize, Vec<&str>) = match args {
        Value::Array(a) => (a.len(), Vec::new()),
        Value::Object(m) => (0, m.keys().map(String::as_str).collect()),
        Value::Null => (0, Vec::new()),
        other => return Err(BindError::NotArguments(json_type(other))),
    };
    let positional: Vec<&Param> = sig
        .params
        .iter()
        .filter(|p| {
            matches!(
                p.kind,
                ParamKind::PositionalOnly | ParamKind::PositionalOrKeyword
            )
        })
        .collect();
    let has = |k: ParamKind| sig.params.iter().any(|p| p.kind == k);
    if npos > positional.len() && !has(ParamKind::VarPositional) {
        return Err(BindError::TooManyPositional {
            takes: positional.len(),
            given: npos,
        });
    }
    let mut bound: Vec<&str> = positional
        .iter()
        .take(npos)
        .map(|p| p.name.as_str())
        .collect();
    for k in keys {
        match sig.params.iter().find(|p| p.name == k) {
            Some(p)
                if matches!(
                    p.kind,
                    ParamKind::PositionalOrKeyword | ParamKind::KeywordOnly
                ) =>
            {
                if bound.contains(&k) {
                    return Err(BindError::Multiple(k.to_string()));
                }
                bound.push(k);
            }
            _ if has(ParamKind::VarKeyword) => {}
            Some(_) => return Err(BindError::PositionalOnly(k.to_string())),
            None => return Err(BindError::NoSuchParameter(k.to_string())),
        }
    }
    for p in &sig.params {
        let required = p.default.is_none()
            && !matches!(p.kind, ParamKind::VarPositional | ParamKind::VarKeyword);
        if required && !bound.contains(&p.name.as_str()) {
            return Err(BindError::Missing(p.name.clone()));
        }
    }
    Ok(())
}

/// The name of a JSON value's type, for messages.
pub fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The first parameters' names for an error message (all of them when there are few).
fn shown(params: &[String]) -> String {
    const MAX: usize = 20;
    let mut s = params[..params.len().min(MAX)].join(", ");
    if params.len() > MAX {
        s.push_str(&format!(", ... ({} in all)", params.len()));
    }
    s
}

/// Turn JSON arguments of a shell task (their text) into the values of the template's
/// parameters, in order: an object `{param: value}` or an array in parameter order; values are
/// strings, numbers (passed as written: `1e3` stays `1e3`, every digit kept) or booleans.
pub fn shell_values(params: &[String], text: &[u8]) -> Result<Vec<String>, BindError> {
    use serde_json::value::RawValue;
    // Each raw value is part of a document that has parsed already.
    let scalar = |name: &str, raw: &RawValue| -> Result<String, BindError> {
        match serde_json::from_str::<Value>(raw.get())? {
            Value::String(s) => Ok(s),
            Value::Number(_) | Value::Bool(_) => Ok(raw.get().trim().to_string()),
            other => Err(BindError::NotScalar {
                name: name.to_string(),
                got: json_type(&other),
            }),
        }
    };
    let shape: Value = serde_json::from_slice(text)?;
    match shape {
        Value::Object(m) => {
            // Linear in parameters and keys (issue 12: `contains` per key was quadratic).
            let known: std::collections::HashSet<&str> =
                params.iter().map(String::as_str).collect();
            if let Some(k) = m.keys().find(|k| !known.contains(k.as_str())) {
                return Err(BindError::NoSuchField {
                    name: k.clone(),
                    shown: shown(params),
                });
            }
            let raw: std::collections::HashMap<String, Box<RawValue>> =
                serde_json::from_slice(text)?;
            params
                .iter()
                .map(|p| match raw.get(p) {
                    Some(v) => scalar(p, v),
                    None => Err(BindError::Missing(p.clone())),
                })
                .collect()
        }
        Value::Array(a) => {
            if a.len() != params.len() {
                return Err(BindError::FieldCount {
                    takes: params.len(),
                    shown: shown(params),
                    given: a.len(),
                });
            }
            let raw: Vec<Box<RawValue>> = serde_json::from_slice(text)?;
            params.iter().zip(&raw).map(|(p, v)| scalar(p, v)).collect()
        }
        Value::Null if params.is_empty() => Ok(Vec::new()),
        other => Err(BindError::NotShellArguments(json_type(&other))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sig() -> Signature {
        // def f(x, y=2, *, z)
        from_python_source("python3", "def f(x, y=2, *, z):\n    pass\n", "f").unwrap()
    }

    #[test]
    fn reads_kinds_and_defaults_from_source() {
        let s = sig();
        let kinds: Vec<_> = s
            .params
            .iter()
            .map(|p| (p.name.as_str(), p.kind, p.default.as_deref()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("x", ParamKind::PositionalOrKeyword, None),
                ("y", ParamKind::PositionalOrKeyword, Some("2")),
                ("z", ParamKind::KeywordOnly, None),
            ]
        );
    }

    /// A stand-in interpreter: a shell script that ignores its arguments.
    fn fake_python(dir: &std::path::Path, body: &str) -> String {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("python");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path.display().to_string()
    }

    #[test]
    fn a_reader_that_hangs_is_killed_at_its_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let python = fake_python(dir.path(), "exec sleep 30");
        let t0 = Instant::now();
        let e = read_bounded(
            &python,
            "def f(): pass",
            "f",
            Duration::from_millis(300),
            1 << 30,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("took longer than 0.3 s"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_reader_is_held_to_its_memory_limit() {
        let dir = tempfile::tempdir().unwrap();
        // The real interpreter, asked to allocate 2 GiB under a 256 MiB limit.
        let python = fake_python(dir.path(), "exec python3 -c 'bytearray(2 << 30)'");
        let e = read_bounded(&python, "", "f", Duration::from_secs(10), 256 << 20)
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than 256 MiB of memory"), "{e}");
    }

    #[test]
    fn a_large_output_does_not_block_the_reader() {
        // 20,000 parameters: the answer is larger than a pipe's buffer.
        let params: Vec<String> = (0..20_000).map(|i| format!("p{i}")).collect();
        let source = format!("def f({}):\n    pass\n", params.join(", "));
        let s = from_python_source("python3", &source, "f").unwrap();
        assert_eq!(s.params.len(), 20_000);
    }

    #[test]
    fn syntax_errors_and_missing_entries_are_explained() {
        let e = from_python_source("python3", "def f(:\n", "f")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1"), "{e}");
        let e = from_python_source("python3", "def g():\n    pass\n", "f")
            .unwrap_err()
            .to_string();
        assert!(e.contains("'f'") && e.contains("g"), "{e}");
    }

    #[test]
    fn binding_follows_python_rules() {
        let s = sig();
        assert!(check_binding(&s, &json!({"x": 1, "z": 3})).is_ok());
        assert!(check_binding(&s, &json!({"x": 1, "y": 1, "z": 3})).is_ok());
        let e = check_binding(&s, &json!({"x": 1})).unwrap_err().to_string();
        assert!(e.contains("'z'"), "{e}");
        let e = check_binding(&s, &json!({"x": 1, "z": 1, "w": 2}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("'w'"), "{e}");
        let e = check_binding(&s, &json!([1, 2, 3]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 positional"), "{e}");
        let e = check_binding(&s, &json!([1])).unwrap_err().to_string();
        assert!(e.contains("'z'"), "{e}");
        let e = check_binding(&s, &json!("x")).unwrap_err().to_string();
        assert!(e.contains("a string"), "{e}");
        let var = from_python_source("python3", "def v(*a, **k):\n    pass\n", "v").unwrap();
        assert!(check_binding(&var, &json!([1, 2, 3])).is_ok());
        assert!(check_binding(&var, &json!({"q": 1})).is_ok());
    }

    #[test]
    fn shell_values_come_in_template_order() {
        let p = vec!["src".to_string(), "n".to_string()];
        let v = |j: &str| shell_values(&p, j.as_bytes());
        assert_eq!(v(r#"{"n": 3, "src": "a b"}"#).unwrap(), vec!["a b", "3"]);
        assert_eq!(v(r#"["x", "y"]"#).unwrap(), vec!["x", "y"]);
        // Numbers are passed as written, every digit kept.
        assert_eq!(
            v(r#"[1180591620717411303424, 3.7416573867739413e0]"#).unwrap(),
            vec!["1180591620717411303424", "3.7416573867739413e0"]
        );
        assert!(v(r#"{"src": "a"}"#)
            .unwrap_err()
            .to_string()
            .contains("'n'"));
        assert!(v(r#"{"src": "a", "n": 1, "k": 2}"#)
            .unwrap_err()
            .to_string()
            .contains("'k'"));
        assert!(v(r#"{"src": [1], "n": 1}"#)
            .unwrap_err()
            .to_string()
            .contains("'src'"));
    }
}
