//! [`Invalid`]: a value from a request or a file that cannot be accepted, with where it is (a
//! field path such as `tasks[3].files[0].name`) and why. The API answers it as a 400 naming
//! the field.

use std::fmt;

/// A value that cannot be accepted: the path of its field (empty until a caller that knows it
/// adds it with [`Invalid::under`]) and the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    field: String,
    reason: String,
}

impl Invalid {
    /// A reason, the field not known yet.
    pub fn new(reason: impl Into<String>) -> Invalid {
        Invalid {
            field: String::new(),
            reason: reason.into(),
        }
    }

    /// A reason about `field`.
    pub fn at(field: impl Into<String>, reason: impl Into<String>) -> Invalid {
        Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The same reason, its field inside `parent`: `files[0]` under `tasks[3]` is
    /// `tasks[3].files[0]`; an index (`[2]`) joins without a dot.
    pub fn under(mut self, parent: &str) -> Invalid {
        self.field = match self.field.as_str() {
            "" => parent.to_string(),
            f if f.starts_with('[') => format!("{parent}{f}"),
            f => format!("{parent}.{f}"),
        };
        self
    }

    /// The field's path (empty: the value as a whole).
    pub fn field(&self) -> &str {
        &self.field
    }

    /// Why it cannot be accepted.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.field.as_str() {
            "" => f.write_str(&self.reason),
            field => write!(f, "{field}: {}", self.reason),
        }
    }
}

impl std::error::Error for Invalid {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_field_path_grows_outwards_with_dots_and_indexes() {
        let e = Invalid::new("not base64")
            .under("data_b64")
            .under("[1]")
            .under("files");
        assert_eq!(e.field(), "files[1].data_b64");
        assert_eq!(e.to_string(), "files[1].data_b64: not base64");
        assert_eq!(Invalid::new("empty").to_string(), "empty");
        assert_eq!(
            Invalid::at("x", "bad").under("tasks[0]").field(),
            "tasks[0].x"
        );
    }
}
