//! Image recipes: a function's dependencies, validated and normalised, and the Apptainer
//! definition file that installs them. Pure: no IO.
//!
//! Normalising first (names lowercased, runs of `-`, `_`, `.` folded to one `-` as in PEP 503,
//! whitespace removed, lists sorted and deduplicated) makes equivalent dependency lists write
//! the same definition, hence share one cache key and one image.

use crate::invalid::Invalid;
use crate::signature::json_type;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Longest requirement or package (characters).
pub const MAX_ITEM: usize = 200;
/// Most items in one list.
pub const MAX_ITEMS: usize = 200;
/// The first line of every definition file.
pub const HEADER: &str = "# fnx image: written from a function's dependencies; do not edit \
                          (the cache key is this file's SHA-256)";

const REQ_HINT: &str = "a requirement is NAME[EXTRAS] VERSIONS, e.g. \"requests[socks]>=2.31,<3\"";
const SYS_HINT: &str = "a system package is a Debian package name, optionally with =VERSION, \
                        e.g. \"libgomp1\" or \"zlib1g=1:1.2.13\"";
/// Version operators, longest first so that a prefix never hides a longer one.
const OPERATORS: [&str; 8] = ["===", "==", ">=", "<=", "!=", "~=", "<", ">"];

/// A function's dependencies, validated and normalised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deps {
    /// Python requirements for pip, sorted and unique (`numpy>=1.26`, `requests[socks]==2.31.0`).
    pub python: Vec<String>,
    /// Debian packages for apt-get, sorted and unique (`libgomp1`, `zlib1g=1:1.2.13`).
    pub system: Vec<String>,
}

/// Parse the `dependencies` JSON value of a registration: an object with optional keys
/// "python" and "system" (absent or null: none), each an array of strings. Unknown keys, wrong
/// types, empty strings and items with characters outside the allowed sets are errors whose
/// message names the exact item, e.g. `dependencies.python[2]: "numpy; rm -rf /" has
/// characters a requirement cannot have (...)`. Both lists empty is an error too.
pub fn parse(v: &Value) -> Result<Deps, Invalid> {
    let Value::Object(m) = v else {
        let got = json_type(v);
        return Err(Invalid::at(
            "dependencies",
            format!("must be an object, got {got}"),
        ));
    };
    let known = |k: &&String| matches!(k.as_str(), "python" | "system");
    if let Some(k) = m.keys().find(|k| !known(k)) {
        let known = "known: python, system";
        return Err(Invalid::at(
            format!("dependencies.{k}"),
            format!("unknown key ({known})"),
        ));
    }
    let python = list(m.get("python"), "python", python_requirement)?;
    let system = list(m.get("system"), "system", system_package)?;
    if python.is_empty() && system.is_empty() {
        return Err(Invalid::at(
            "dependencies",
            "name at least one python or system package",
        ));
    }
    Ok(Deps { python, system })
}

/// One list: each item checked and normalised by `norm`, then sorted and deduplicated.
fn list(
    v: Option<&Value>,
    which: &str,
    norm: fn(&str) -> Result<String, Invalid>,
) -> Result<Vec<String>, Invalid> {
    let items = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(other) => {
            let got = json_type(other);
            return Err(Invalid::at(
                format!("dependencies.{which}"),
                format!("must be an array of strings, got {got}"),
            ));
        }
    };
    if items.len() > MAX_ITEMS {
        return Err(Invalid::at(
            format!("dependencies.{which}"),
            format!("{} items; at most {MAX_ITEMS} are allowed", items.len()),
        ));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let at = format!("dependencies.{which}[{i}]");
        let Value::String(s) = item else {
            return Err(Invalid::at(
                at,
                format!("must be a string, got {}", json_type(item)),
            ));
        };
        let n = s.chars().count();
        if n > MAX_ITEM {
            let head: String = s.chars().take(40).collect();
            return Err(Invalid::at(
                at,
                format!("{head:?}... is {n} characters long; at most {MAX_ITEM} are allowed"),
            ));
        }
        out.push(norm(s).map_err(|why| why.under(&at))?);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The characters of `s` that `ok` refuses, each once, quoted: `';' '/'`.
fn bad_chars(s: &str, ok: impl Fn(char) -> bool) -> String {
    let mut bad: Vec<char> = Vec::new();
    for c in s.chars().filter(|&c| !ok(c)) {
        if !bad.contains(&c) {
            bad.push(c);
        }
    }
    let quoted: Vec<String> = bad.iter().map(|c| format!("{c:?}")).collect();
    quoted.join(" ")
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// A project or extra name (`[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?`) normalised as PEP 503
/// says: lowercase, each run of `-`, `_`, `.` one `-`. None if it is not a name.
fn project_name(n: &str) -> Option<String> {
    let edge = |c: char| c.is_ascii_alphanumeric();
    if n.is_empty() || !n.chars().all(is_name_char) || !n.starts_with(edge) || !n.ends_with(edge) {
        return None;
    }
    let mut out = String::with_capacity(n.len());
    for c in n.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    Some(out)
}

/// One Python requirement: NAME [EXTRAS] [VERSIONS], normalised.
fn python_requirement(item: &str) -> Result<String, Invalid> {
    let s = item.trim();
    if s.is_empty() {
        return Err(Invalid::new(format!("{item:?} is empty; {REQ_HINT}")));
    }
    if s.contains("://") {
        return Err(Invalid::new(format!(
            "{item:?} is a URL; fnx installs Python packages by name from the package index \
             ({REQ_HINT})"
        )));
    }
    if s.contains('@') {
        return Err(Invalid::new(format!(
            "{item:?} is a direct reference ('@'); give a version instead, e.g. \"name==1.0\""
        )));
    }
    let bad = bad_chars(s, |c| {
        c.is_ascii_alphanumeric() || " \t._-[],<>=!~*+".contains(c)
    });
    if !bad.is_empty() {
        return Err(Invalid::new(format!(
            "{item:?} has characters a requirement cannot have ({bad}); {REQ_HINT}"
        )));
    }
    let end = s.find(|c: char| !is_name_char(c)).unwrap_or(s.len());
    let (name, rest) = s.split_at(end);
    let Some(mut out) = project_name(name) else {
        return Err(Invalid::new(format!(
            "{item:?} does not start with a package name (letters, digits and . _ -, first and \
             last a letter or digit); {REQ_HINT}"
        )));
    };
    let mut rest = rest.trim_start();
    if rest.starts_with(is_name_char) {
        return Err(Invalid::new(format!(
            "{item:?} has a space inside its name; {REQ_HINT}"
        )));
    }
    if let Some(r) = rest.strip_prefix('[') {
        let Some((inner, after)) = r.split_once(']') else {
            return Err(Invalid::new(format!(
                "{item:?} has a '[' without its ']'; {REQ_HINT}"
            )));
        };
        let mut extras = Vec::new();
        for e in inner.split(',') {
            let Some(e) = project_name(e.trim()) else {
                return Err(Invalid::new(format!(
                    "{item:?} has an extra, {:?}, that is not a name; {REQ_HINT}",
                    e.trim()
                )));
            };
            extras.push(e);
        }
        extras.sort();
        extras.dedup();
        out = format!("{out}[{}]", extras.join(","));
        rest = after;
    }
    let version: String = rest.chars().filter(|c| !c.is_whitespace()).collect();
    if !version.is_empty() {
        version_spec(&version)
            .map_err(|why| Invalid::new(format!("{item:?}: {why}; {REQ_HINT}")))?;
        out.push_str(&version);
    }
    Ok(out)
}

/// The version part of a requirement (no whitespace): comma-separated OPERATOR VERSION clauses.
fn version_spec(v: &str) -> Result<(), Invalid> {
    let version_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '*' | '+' | '!');
    let bad = bad_chars(v, |c| {
        version_char(c) || matches!(c, '<' | '>' | '=' | '~' | ',')
    });
    if !bad.is_empty() {
        return Err(Invalid::new(format!(
            "the version part {v:?} has characters a version cannot have ({bad})"
        )));
    }
    for clause in v.split(',') {
        let Some(op) = OPERATORS.iter().find(|op| clause.starts_with(**op)) else {
            return Err(Invalid::new(format!(
                "the version part {v:?} has a clause, {clause:?}, that does not start with an \
                 operator ({})",
                OPERATORS.join(" ")
            )));
        };
        let version = &clause[op.len()..];
        if version.is_empty() || !version.chars().all(version_char) {
            return Err(Invalid::new(format!(
                "the version part {v:?} has a clause, {clause:?}, that is not OPERATOR VERSION"
            )));
        }
    }
    Ok(())
}

/// One Debian package: NAME or NAME=VERSION, the name lowercased.
fn system_package(item: &str) -> Result<String, Invalid> {
    let s = item.trim();
    if s.is_empty() {
        return Err(Invalid::new(format!("{item:?} is empty; {SYS_HINT}")));
    }
    let (name, version) = match s.split_once('=') {
        Some((n, v)) => (n.to_ascii_lowercase(), Some(v)),
        None => (s.to_ascii_lowercase(), None),
    };
    let name_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "+.-".contains(c);
    let bad = bad_chars(&name, name_char);
    if !bad.is_empty() {
        return Err(Invalid::new(format!(
            "{item:?} has characters a Debian package name cannot have ({bad}); {SYS_HINT}"
        )));
    }
    if name.len() < 2 || !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(Invalid::new(format!(
            "{item:?} is not a Debian package name (two or more characters, the first a \
             letter or digit); {SYS_HINT}"
        )));
    }
    let Some(v) = version else {
        return Ok(name);
    };
    let bad = bad_chars(v, |c| c.is_ascii_alphanumeric() || ".+~:-".contains(c));
    if v.is_empty() || !bad.is_empty() {
        return Err(Invalid::new(format!(
            "{item:?} has a version, {v:?}, that is not a Debian version (letters, digits and \
             . + ~ : -); {SYS_HINT}"
        )));
    }
    Ok(format!("{name}={v}"))
}

/// The base image must be a plain Docker reference: `[A-Za-z0-9._/:@-]`, not empty, no
/// leading `-`.
pub fn check_base(base: &str) -> Result<(), Invalid> {
    if base.is_empty() {
        return Err(Invalid::new(
            "the base image is empty; give a Docker reference such as python:3.11-slim",
        ));
    }
    let bad = bad_chars(base, |c| c.is_ascii_alphanumeric() || "._/:@-".contains(c));
    if !bad.is_empty() {
        return Err(Invalid::new(format!(
            "the base image {base:?} has characters a Docker reference cannot have ({bad})"
        )));
    }
    if base.starts_with('-') {
        return Err(Invalid::new(format!(
            "the base image {base:?} starts with '-'"
        )));
    }
    Ok(())
}

/// Each word single-quoted, space-separated (validation has excluded quotes).
fn quoted(words: &[String]) -> String {
    let q: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    q.join(" ")
}

/// The Apptainer definition file that installs `deps` on top of `base` (a Docker reference such
/// as `python:3.11-slim`, checked by [`check_base`]; Bootstrap is `docker`). Deterministic:
/// same deps and base → same text.
pub fn definition(deps: &Deps, base: &str) -> String {
    let mut d = format!("{HEADER}\nBootstrap: docker\nFrom: {base}\n\n%post\n    set -e\n");
    if !deps.system.is_empty() {
        d.push_str("    export DEBIAN_FRONTEND=noninteractive\n    apt-get update\n");
        d.push_str(&format!(
            "    apt-get install -y --no-install-recommends {}\n",
            quoted(&deps.system)
        ));
        d.push_str("    rm -rf /var/lib/apt/lists/*\n");
    }
    if !deps.python.is_empty() {
        d.push_str(&format!(
            "    python3 -m pip install --no-cache-dir {}\n",
            quoted(&deps.python)
        ));
    }
    let labels = [("python", &deps.python), ("system", &deps.system)];
    if labels.iter().any(|(_, l)| !l.is_empty()) {
        d.push_str("\n%labels\n");
        for (which, l) in labels.iter().filter(|(_, l)| !l.is_empty()) {
            d.push_str(&format!("    fnx.dependencies.{which} {}\n", l.join(" ")));
        }
    }
    d
}

/// The cache key: SHA-256 (hex, 64 digits) of the definition text.
pub fn key(definition: &str) -> String {
    Sha256::digest(definition.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deps(v: Value) -> Deps {
        parse(&v).unwrap_or_else(|e| panic!("{v}: {e}"))
    }

    fn err(v: Value) -> String {
        match parse(&v) {
            Ok(d) => panic!("{v} was accepted: {d:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn requirements_are_normalised_sorted_and_deduplicated() {
        let d = deps(json!({"python": [
            "scipy ~= 1.11", "NumPy>=1.26,<2", "requests[socks]==2.31.0", "Foo__Bar.baz",
            " numpy >= 1.26 , < 2 ", "zope.interface", "Requests [ SOCKS , http_2, socks ]",
            "a", "x1!=2.0.*", "pkg===1.0+local"
        ]}));
        let want = "a foo-bar-baz numpy>=1.26,<2 pkg===1.0+local requests[http-2,socks] \
                    requests[socks]==2.31.0 scipy~=1.11 x1!=2.0.* zope-interface";
        assert_eq!(d.python.join(" "), want);
        assert!(d.system.is_empty());
        let system = json!(["zlib1g=1:1.2.13", "LibGOMP1", "libgomp1", " g++ "]);
        let d = deps(json!({"system": system, "python": null}));
        assert_eq!(d.system, ["g++", "libgomp1", "zlib1g=1:1.2.13"]);
        assert!(d.python.is_empty());
    }

    #[test]
    fn equivalent_lists_share_a_key_and_different_ones_do_not() {
        let k = |v: Value| key(&definition(&deps(v), "python:3.11-slim"));
        let a = k(json!({"python": ["NumPy", "scipy"], "system": ["libgomp1"]}));
        let b = k(json!({"python": ["scipy", "numpy", "numpy"], "system": ["LIBGOMP1"]}));
        assert_eq!(a, b);
        assert_eq!(a.len(), 64);
        assert_ne!(a, k(json!({"python": ["numpy", "scipy"]})));
        assert_ne!(
            a,
            k(json!({"python": ["numpy>=1", "scipy"], "system": ["libgomp1"]}))
        );
        let d = deps(json!({"python": ["numpy"]}));
        assert_ne!(
            key(&definition(&d, "python:3.11-slim")),
            key(&definition(&d, "python:3.12-slim"))
        );
    }

    #[test]
    fn the_definition_of_a_sample() {
        let d = deps(json!({"python": ["scipy", "numpy>=1.26"],
                            "system": ["zlib1g=1:1.2.13", "libgomp1"]}));
        let want = "\
# fnx image: written from a function's dependencies; do not edit (the cache key is this file's SHA-256)
Bootstrap: docker
From: python:3.11-slim

%post
    set -e
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends 'libgomp1' 'zlib1g=1:1.2.13'
    rm -rf /var/lib/apt/lists/*
    python3 -m pip install --no-cache-dir 'numpy>=1.26' 'scipy'

%labels
    fnx.dependencies.python numpy>=1.26 scipy
    fnx.dependencies.system libgomp1 zlib1g=1:1.2.13
";
        assert_eq!(definition(&d, "python:3.11-slim"), want);
        let python_only = definition(&deps(json!({"python": ["numpy"]})), "python:3.11-slim");
        assert!(!python_only.contains("apt-get") && !python_only.contains(".system"));
        assert!(python_only.ends_with(
            "    set -e\n    python3 -m pip install --no-cache-dir 'numpy'\n\n%labels\n    \
             fnx.dependencies.python numpy\n"
        ));
        let system_only = definition(&deps(json!({"system": ["curl"]})), "debian:12");
        assert!(!system_only.contains("pip") && system_only.contains("From: debian:12\n"));
    }

    #[test]
    fn bad_items_are_refused_naming_the_item() {
        let many: Vec<String> = (0..201).map(|i| format!("p{i}")).collect();
        let cases = [
            (json!({"python": ["a", "b", "numpy; rm -rf /"]}),
             "dependencies.python[2]: \"numpy; rm -rf /\" has characters a requirement cannot have (';' '/')"),
            (json!({"python": ["numpy$(id)"]}), "('$' '(' ')')"),
            (json!({"python": ["`id`"]}), "('`')"),
            (json!({"python": ["'numpy'"]}), "('\\'')"),
            (json!({"python": ["a\\b"]}), "('\\\\')"),
            (json!({"python": ["https://example.com/x.whl"]}), "[0]: \"https://example.com/x.whl\" is a URL"),
            (json!({"python": ["pkg @ git+https://x/y"]}), "is a URL"),
            (json!({"python": ["pkg@1.0"]}), "is a direct reference ('@')"),
            (json!({"python": ["numpy ; python_version<'3.8'"]}), "(';' '\\'')"),
            (json!({"python": ["./local/pkg"]}), "('/')"),
            (json!({"python": ["num py"]}), "\"num py\" has a space inside its name"),
            (json!({"python": [""]}), "dependencies.python[0]: \"\" is empty"),
            (json!({"python": ["  "]}), "is empty"),
            (json!({"python": ["-numpy"]}), "does not start with a package name"),
            (json!({"python": ["numpy_"]}), "does not start with a package name"),
            (json!({"python": [">=1.0"]}), "does not start with a package name"),
            (json!({"python": ["numpy[]"]}), "has an extra, \"\", that is not a name"),
            (json!({"python": ["numpy[a"]}), "'[' without its ']'"),
            (json!({"python": ["numpy 1.0"]}), "has a space inside its name"),
            (json!({"python": ["numpy=1.0"]}), "does not start with an operator"),
            (json!({"python": ["numpy>=1.0,"]}), "clause, \"\""),
            (json!({"python": ["numpy>="]}), "is not OPERATOR VERSION"),
            (json!({"python": ["numpy>=1_0"]}), "('_')"),
            (json!({"python": ["x".repeat(201)]}), "is 201 characters long; at most 200"),
            (json!({"python": many}),
             "dependencies.python: 201 items; at most 200"),
            (json!({"system": ["curl", "lib gomp"]}),
             "dependencies.system[1]: \"lib gomp\" has characters a Debian package name cannot have (' ')"),
            (json!({"system": ["curl;reboot"]}), "(';')"),
            (json!({"system": ["-y"]}), "is not a Debian package name"),
            (json!({"system": ["c"]}), "is not a Debian package name"),
            (json!({"system": ["zlib1g="]}), "has a version, \"\""),
            (json!({"system": ["zlib1g=1 2"]}), "has a version, \"1 2\""),
            (json!({"system": [""]}), "dependencies.system[0]: \"\" is empty"),
            (json!({"python": "numpy"}), "dependencies.python: must be an array of strings, got a string"),
            (json!({"python": [1]}), "dependencies.python[0]: must be a string, got a number"),
            (json!(["numpy"]), "dependencies: must be an object, got an array"),
            (json!({"pip": ["numpy"]}), "dependencies.pip: unknown key (known: python, system)"),
            (json!({}), "dependencies: name at least one python or system package"),
            (json!({"python": [], "system": null}), "name at least one python or system package"),
        ];
        for (v, want) in cases {
            let e = err(v.clone());
            assert!(e.contains(want), "{v}:\n  got  {e}\n  want {want}");
        }
    }

    #[test]
    fn base_images_are_checked() {
        for ok in [
            "python:3.11-slim",
            "docker.io/library/debian:12",
            "img@sha256:abc",
            "a_b",
        ] {
            check_base(ok).unwrap();
        }
        for (bad, want) in [
            ("", "empty"),
            ("-x", "starts with '-'"),
            ("python:3.11\nBootstrap: localimage", "('\\n' ' ')"),
            ("a b", "(' ')"),
        ] {
            let e = check_base(bad).expect_err(bad).to_string();
            assert!(e.contains(want), "{bad:?}: {e}");
        }
    }
}
