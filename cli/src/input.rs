//! What `fnx map` runs and on what: the function reference and the input lines.

use fnx_daemon::signature::json_type;
use fnx_protocol::shell::{self, ShellTemplate};
use fnx_protocol::{FunctionBody, Payload};
use serde_json::Value;
use std::path::Path;

/// Turn `module:qualname` or `path.py:name` into a function body.
pub fn python_function(spec: &str) -> Result<FunctionBody, String> {
    let Some((left, name)) = spec.rsplit_once(':') else {
        return Err(format!(
            "function '{spec}' must be MODULE:NAME (e.g. mymod:simulate) or FILE.py:NAME (e.g. ./analysis.py:score)"
        ));
    };
    if left.is_empty() || name.is_empty() {
        return Err(format!(
            "function '{spec}' needs both a module (or file) and a name around the ':'"
        ));
    }
    let is_ident_path = |s: &str| {
        !s.is_empty()
            && s.split('.').all(|p| {
                let mut c = p.chars();
                matches!(c.next(), Some(f) if f == '_' || f.is_alphabetic())
                    && c.all(|ch| ch == '_' || ch.is_alphanumeric())
            })
    };
    if !is_ident_path(name) {
        return Err(format!(
            "'{name}' in '{spec}' is not a Python name (expected NAME or NAME.attr)"
        ));
    }
    if left.ends_with(".py") || left.contains('/') {
        let path = Path::new(left);
        let abs = std::fs::canonicalize(path)
            .map_err(|e| format!("cannot read Python file '{left}': {e}"))?;
        if !abs.is_file() {
            return Err(format!("'{left}' is not a file"));
        }
        return Ok(FunctionBody::PythonFile {
            path: abs.display().to_string(),
            name: name.to_string(),
        });
    }
    if !is_ident_path(left) {
        return Err(format!(
            "'{left}' in '{spec}' is not a module name (for a file, write path/to/file.py:{name})"
        ));
    }
    Ok(FunctionBody::PythonRef {
        module: left.to_string(),
        qualname: name.to_string(),
    })
}

/// A shell template, checked.
pub fn shell_function(template: &str) -> Result<(FunctionBody, ShellTemplate), String> {
    let parsed = shell::parse(template).map_err(|e| e.to_string())?;
    Ok((
        FunctionBody::Shell {
            template: template.to_string(),
        },
        parsed,
    ))
}

/// How to read input lines.
pub enum LineKind {
    /// Python: the line is the arguments as they are.
    Python,
    /// Shell: the line names the template's parameters.
    Shell(ShellTemplate),
}

/// Parse one input line into the task's arguments, or say what is wrong with it.
/// `None` for a blank line (skipped).
pub fn parse_line(kind: &LineKind, line: &str) -> Option<Result<Payload, String>> {
    let text = line.trim();
    if text.is_empty() {
        return None;
    }
    Some(match kind {
        LineKind::Python => python_args(text),
        LineKind::Shell(t) => shell_args(t, text),
    })
}

fn python_args(text: &str) -> Result<Payload, String> {
    // Check the JSON without converting numbers, so integers of any size travel exactly as written.
    let first = text.as_bytes()[0];
    if first != b'[' && first != b'{' {
        let what = serde_json::from_str::<Value>(text)
            .map(|v| json_type(&v))
            .unwrap_or("not valid JSON");
        return Err(format!(
            "expected a JSON array (positional arguments) or object (keyword arguments), got {what}"
        ));
    }
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map_err(|e| format!("invalid JSON: {e}"))?;
    Ok(Payload::json(text.as_bytes().to_vec()))
}

fn shell_value(name: &str, v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) if s.contains('\0') => Err(format!(
            "parameter '{name}' contains a NUL byte, which cannot be passed as a command argument"
        )),
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        other => Err(format!(
            "parameter '{name}' must be a string, number or boolean, got {}",
            json_type(other)
        )),
    }
}

fn shell_args(t: &ShellTemplate, text: &str) -> Result<Payload, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
    let values: Vec<String> = match &value {
        Value::Array(items) => {
            if items.len() != t.params.len() {
                return Err(format!(
                    "the template takes {} parameters ({}), the line has {} values",
                    t.params.len(),
                    t.params.join(", "),
                    items.len()
                ));
            }
            t.params
                .iter()
                .zip(items)
                .map(|(p, v)| shell_value(p, v))
                .collect::<Result<_, _>>()?
        }
        Value::Object(map) => {
            if let Some(extra) = map.keys().find(|k| !t.params.contains(k)) {
                return Err(format!(
                    "unknown parameter '{extra}' (the template has: {})",
                    t.params.join(", ")
                ));
            }
            t.params
                .iter()
                .map(|p| match map.get(p) {
                    Some(v) => shell_value(p, v),
                    None => Err(format!("missing parameter '{p}'")),
                })
                .collect::<Result<_, _>>()?
        }
        other => {
            return Err(format!(
                "expected a JSON object (parameters by name) or array, got {}",
                json_type(other)
            ))
        }
    };
    Ok(Payload::json(
        serde_json::to_vec(&values).expect("strings serialize"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_references() {
        assert_eq!(
            python_function("mymod.sub:Cls.run").unwrap(),
            FunctionBody::PythonRef {
                module: "mymod.sub".into(),
                qualname: "Cls.run".into()
            }
        );
        assert!(python_function("nocolon")
            .unwrap_err()
            .contains("MODULE:NAME"));
        assert!(python_function("./missing.py:f")
            .unwrap_err()
            .contains("cannot read"));
        assert!(python_function("m:1bad")
            .unwrap_err()
            .contains("not a Python name"));
    }

    #[test]
    fn python_lines_keep_big_integers_exact() {
        let p = parse_line(&LineKind::Python, " [123456789012345678901234567890] ")
            .unwrap()
            .unwrap();
        assert_eq!(p.data, b"[123456789012345678901234567890]");
        assert!(parse_line(&LineKind::Python, "   ").is_none());
        assert!(parse_line(&LineKind::Python, "42")
            .unwrap()
            .unwrap_err()
            .contains("got a number"));
        assert!(parse_line(&LineKind::Python, "[1,")
            .unwrap()
            .unwrap_err()
            .contains("invalid JSON"));
    }

    #[test]
    fn shell_lines_map_to_parameters_in_order() {
        let t = shell::parse("cp {src} {dst}").unwrap();
        let kind = LineKind::Shell(t);
        let p = parse_line(&kind, r#"{"dst": "b; rm -rf x", "src": 3}"#)
            .unwrap()
            .unwrap();
        assert_eq!(p.data, br#"["3","b; rm -rf x"]"#);
        assert!(parse_line(&kind, r#"{"src": "a"}"#)
            .unwrap()
            .unwrap_err()
            .contains("missing parameter 'dst'"));
        assert!(parse_line(&kind, r#"{"src": "a", "dst": "b", "x": 1}"#)
            .unwrap()
            .unwrap_err()
            .contains("unknown parameter 'x'"));
        assert!(parse_line(&kind, r#"["a"]"#)
            .unwrap()
            .unwrap_err()
            .contains("takes 2 parameters"));
        assert!(parse_line(&kind, r#"{"src": "a\u0000", "dst": "b"}"#)
            .unwrap()
            .unwrap_err()
            .contains("NUL byte"));
        assert!(parse_line(&kind, r#"{"src": [1], "dst": "b"}"#)
            .unwrap()
            .unwrap_err()
            .contains("must be a string"));
    }
}
