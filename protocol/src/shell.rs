//! Shell command templates: `{name}` parameters that become single arguments, never code.
//!
//! A template such as `gzip -k {path}` is turned into the script `gzip -k "${1}"`, run as
//! `sh -c SCRIPT fnx-sh VALUE...`: the shell parses only the template, and each value reaches
//! the command as one literal argument (`a; rm -rf x` stays one argument). `{{` and `}}` stand
//! for literal braces; a `{` that does not start a `{identifier}` is kept as is, and so is
//! shell syntax such as `${HOME}` (a `{` right after `$`) and `{ a; b; }`, so `awk '{print $1}'`
//! works unchanged. A parameter used twice is passed once.
//!
//! Quotes: a parameter inside double quotes (`"<{x}>"`) becomes `${N}` there, so its value is
//! still one literal piece of that word (never split or globbed). Inside single quotes the shell
//! substitutes nothing, so a parameter there is refused, naming it.

use thiserror::Error;

/// A parsed template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShellTemplate {
    /// The script for `sh -c`, with parameters replaced by `"${N}"`.
    pub script: String,
    /// Parameter names in order of first appearance; argument N+1 is the value of `params[N]`.
    pub params: Vec<String>,
}

/// A template that cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TemplateError {
    /// The template is empty or only white space.
    #[error("the shell command template is empty")]
    Empty,
    /// A parameter is inside single quotes, where the shell substitutes nothing.
    #[error(
        "parameter {{{0}}} is inside single quotes, where the shell substitutes nothing: put it \
         outside the quotes or inside double quotes (each value is passed as one literal \
         argument), or write {{{{{0}}}}} for the literal text"
    )]
    SingleQuoted(String),
}

/// The longest parameter name, in bytes.
pub const MAX_PARAM: usize = 128;

fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// Parse a template.
pub fn parse(template: &str) -> Result<ShellTemplate, TemplateError> {
    if template.trim().is_empty() {
        return Err(TemplateError::Empty);
    }
    let mut script = String::with_capacity(template.len() + 16);
    let mut params: Vec<String> = Vec::new();
    // Parameter names to their positions: linear in the template (issue 12).
    let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    // Where the shell will be: outside quotes, in '...', $'...' or "...". `$(...)` and
    // backticks start a new context (unquoted, even inside "..."), saved on a stack with the
    // parentheses open in it.
    #[derive(Clone, Copy, PartialEq)]
    enum Quote {
        None,
        Single,
        AnsiC,
        Double,
    }
    #[derive(Clone, Copy, PartialEq)]
    enum Nest {
        Paren(u32),
        Backtick,
    }
    let mut quote = Quote::None;
    let mut nests: Vec<(Quote, Nest)> = Vec::new();
    let mut i = 0;
    while i < template.len() {
        let rest = &template[i..];
        let b = rest.as_bytes()[0];
        let code = matches!(quote, Quote::None | Quote::Double);
        // Quotes, escapes and nesting, copied as they are.
        let step = match (quote, b) {
            (Quote::None | Quote::Double | Quote::AnsiC, b'\\') if rest.len() > 1 => {
                Some(1 + rest[1..].chars().next().map_or(1, char::len_utf8))
            }
            (Quote::None, b'$') if rest[1..].starts_with('\'') => {
                quote = Quote::AnsiC;
                Some(2)
            }
            (Quote::None, b'\'') => {
                quote = Quote::Single;
                Some(1)
            }
            (Quote::Single | Quote::AnsiC, b'\'') => {
                quote = Quote::None;
                Some(1)
            }
            (Quote::None, b'"') => {
                quote = Quote::Double;
                Some(1)
            }
            (Quote::Double, b'"') => {
                quote = Quote::None;
                Some(1)
            }
            (_, b'$') if code && rest[1..].starts_with('(') => {
                nests.push((quote, Nest::Paren(0)));
                quote = Quote::None;
                Some(2)
            }
            (Quote::None, b'(') => {
                if let Some((_, Nest::Paren(n))) = nests.last_mut() {
                    *n += 1;
                }
                Some(1)
            }
            (Quote::None, b')') => {
                match nests.last_mut() {
                    Some((_, Nest::Paren(n))) if *n > 0 => *n -= 1,
                    Some((outer, Nest::Paren(_))) => {
                        quote = *outer;
                        nests.pop();
                    }
                    _ => {}
                }
                Some(1)
            }
            (_, b'`') if code => {
                match nests.last() {
                    Some((outer, Nest::Backtick)) if quote == Quote::None => {
                        quote = *outer;
                        nests.pop();
                    }
                    _ => {
                        nests.push((quote, Nest::Backtick));
                        quote = Quote::None;
                    }
                }
                Some(1)
            }
            _ => None,
        };
        if let Some(n) = step {
            script.push_str(&rest[..n]);
            i += n;
            continue;
        }
        if rest.starts_with("{{") {
            script.push('{');
            i += 2;
        } else if rest.starts_with("}}") {
            script.push('}');
            i += 2;
        } else if rest.starts_with('{') && !template[..i].ends_with('$') {
            // A parameter name is at most MAX_PARAM bytes: the search for its `}` stops there,
            // so a template full of unclosed `{` stays linear.
            let closing = rest.as_bytes()[1..]
                .iter()
                .take(MAX_PARAM + 1)
                .position(|&b| b == b'}');
            match closing.map(|end| &rest[1..1 + end]) {
                Some(name) if is_ident(name) => {
                    if matches!(quote, Quote::Single | Quote::AnsiC) {
                        return Err(TemplateError::SingleQuoted(name.to_string()));
                    }
                    let n = match index.get(name) {
                        Some(&n) => n,
                        None => {
                            params.push(name.to_string());
                            index.insert(name.to_string(), params.len());
                            params.len()
                        }
                    };
                    // In double quotes already: the value stays one literal part of the word.
                    if quote == Quote::Double {
                        script.push_str(&format!("${{{n}}}"));
                    } else {
                        script.push_str(&format!("\"${{{n}}}\""));
                    }
                    i += name.len() + 2;
                }
                _ => {
                    script.push('{');
                    i += 1;
                }
            }
        } else {
            let Some(c) = rest.chars().next() else { break };
            script.push(c);
            i += c.len_utf8();
        }
    }
    Ok(ShellTemplate { script, params })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_become_quoted_positional_arguments() {
        let t = parse("gzip -k {path} && echo {path} {n}").unwrap();
        assert_eq!(t.script, r#"gzip -k "${1}" && echo "${1}" "${2}""#);
        assert_eq!(t.params, vec!["path", "n"]);
    }

    #[test]
    fn braces_that_are_not_parameters_stay() {
        let t = parse("awk '{print $1}' {file} {{x}}").unwrap();
        assert_eq!(t.script, r#"awk '{print $1}' "${1}" {x}"#);
        assert_eq!(t.params, vec!["file"]);
    }

    #[test]
    fn bad_templates_are_errors() {
        assert_eq!(parse("  "), Err(TemplateError::Empty));
    }

    #[test]
    fn issue_12_parameters_in_quotes() {
        // In double quotes: one literal part of that word, not split or globbed.
        let t = parse(r#"printf '<%s>' "{x}" "a {x} b" {y}"#).unwrap();
        assert_eq!(t.script, r#"printf '<%s>' "${1}" "a ${1} b" "${2}""#);
        // Escaped quotes do not open or close anything.
        let t = parse(r#"echo \' {x} "\" {y}""#).unwrap();
        assert_eq!(t.script, r#"echo \' "${1}" "\" ${2}""#);
        // In single quotes the shell substitutes nothing: refused, naming the parameter.
        let e = parse("echo '{x}'").unwrap_err();
        assert_eq!(e, TemplateError::SingleQuoted("x".into()));
        assert!(
            e.to_string()
                .contains("parameter {x} is inside single quotes"),
            "{e}"
        );
        // Braces in single quotes that are not parameters stay (awk programs).
        assert_eq!(parse("awk '{print $1}' {f}").unwrap().params, ["f"]);
        // $(...) and backticks start anew, even inside double quotes: quoted again there.
        let t = parse(r#"echo "$(basename {p})" "`dirname {p}`" "$(f "{q}" (x))""#).unwrap();
        assert_eq!(
            t.script,
            r#"echo "$(basename "${1}")" "`dirname "${1}"`" "$(f "${2}" (x))""#
        );
        // $'...' takes backslash escapes and substitutes nothing.
        assert!(parse(r"echo $'it\'s {x}'").is_err());
        assert_eq!(
            parse(r"echo $'it\'s' {x}").unwrap().script,
            r#"echo $'it\'s' "${1}""#
        );
    }

    #[test]
    fn shell_expansions_are_not_parameters() {
        let t = parse("echo ${HOME} {x}; {{ true; }}").unwrap();
        assert_eq!(t.script, r#"echo ${HOME} "${1}"; { true; }"#);
        assert_eq!(t.params, vec!["x"]);
    }

    #[test]
    fn issue_12_many_parameters_and_unclosed_braces() {
        // 40,000 parameters, each used twice: positions stay right (a map, not a scan).
        let names: Vec<String> = (0..40_000).map(|i| format!("p{i}")).collect();
        let text: String = names.iter().map(|n| format!("{{{n}}} {{{n}}} ")).collect();
        let t = parse(&text).unwrap();
        assert_eq!(t.params.len(), 40_000);
        assert!(
            t.script.ends_with(r#""${40000}" "${40000}" "#),
            "{}",
            &t.script[t.script.len() - 40..]
        );
        // A name longer than MAX_PARAM is no parameter; unclosed braces stay literal.
        let long = format!("{{{}}}", "a".repeat(MAX_PARAM + 1));
        assert_eq!(parse(&long).unwrap().params, Vec::<String>::new());
        let open = "{a ".repeat(10_000);
        let t = parse(&open).unwrap();
        assert_eq!(t.script, open);
        assert!(t.params.is_empty());
    }
}
