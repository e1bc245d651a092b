//! The key file of an encrypted manager link (CurveZMQ).
//!
//! The daemon writes one per pool into its key directory (mode 0600 in a 0700 directory): the
//! interchange's public key and a key pair issued to that pool's managers. A manager is given
//! the file's path (`--curve-keys`, on a shared filesystem), never the keys themselves, so no
//! key shows up in `ps`. Keys are Z85 text (40 characters for 32 bytes), one per line:
//!
//! ```text
//! # fnx manager keys for pool gpu (issued by the daemon; keep private)
//! server_public = rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7
//! public = Yne@$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hID
//! secret = D:)Q[IlAW!ahhC2ac:9*A}h:p?([4%wOTJ%JR%cs
//! ```

use thiserror::Error;

/// Keys of one manager link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyFile {
    /// The interchange's public key (Z85).
    pub server_public: String,
    /// The manager's public key (Z85), which the interchange accepts.
    pub public: String,
    /// The manager's secret key (Z85).
    pub secret: String,
}

/// A key file that cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyFileError {
    /// A line is neither a comment nor `name = value`, or names an unknown key.
    #[error("line {line}: {what}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        what: String,
    },
    /// A key is missing.
    #[error("no {0} in the key file")]
    Missing(&'static str),
}

fn is_z85_key(v: &str) -> bool {
    v.len() == 40 && v.bytes().all(|b| b.is_ascii_graphic())
}

impl KeyFile {
    /// Parse the text of a key file.
    pub fn parse(text: &str) -> Result<KeyFile, KeyFileError> {
        let (mut server_public, mut public, mut secret) = (None, None, None);
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |what: &str| KeyFileError::Line {
                line: i + 1,
                what: what.to_string(),
            };
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| bad("expected `name = key`"))?;
            let v = v.trim();
            if !is_z85_key(v) {
                return Err(bad("a key must be 40 characters of Z85"));
            }
            let slot = match k.trim() {
                "server_public" => &mut server_public,
                "public" => &mut public,
                "secret" => &mut secret,
                other => return Err(bad(&format!("unknown name {other:?}"))),
            };
            *slot = Some(v.to_string());
        }
        Ok(KeyFile {
            server_public: server_public.ok_or(KeyFileError::Missing("server_public"))?,
            public: public.ok_or(KeyFileError::Missing("public"))?,
            secret: secret.ok_or(KeyFileError::Missing("secret"))?,
        })
    }

    /// The text of the file, with a comment naming what it is for.
    pub fn render(&self, comment: &str) -> String {
        format!(
            "# {comment}\nserver_public = {}\npublic = {}\nsecret = {}\n",
            self.server_public, self.public, self.secret
        )
    }
}

/// What a manager authenticates with: CurveZMQ keys, or (on loopback, for managers started by
/// the process that owns the interchange) a password under ZeroMQ's PLAIN mechanism. PLAIN
/// authenticates without encrypting: loopback traffic cannot be read by other accounts, and
/// such managers never outlive the interchange, so they cannot be lured to another one.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// A key file's keys.
    Curve(KeyFile),
    /// A password (64 hex digits).
    Plain(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Curve(_) => f.write_str("Credentials::Curve(..)"),
            Credentials::Plain(_) => f.write_str("Credentials::Plain(..)"),
        }
    }
}

impl Credentials {
    /// Parse a key file, or the one line `plain_password = <64 hex digits>`.
    pub fn parse(text: &str) -> Result<Credentials, KeyFileError> {
        let mut password = None;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if let Some(v) = line
                .strip_prefix("plain_password")
                .and_then(|r| r.trim_start().strip_prefix('='))
            {
                let v = v.trim();
                if v.len() != 64 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(KeyFileError::Line {
                        line: i + 1,
                        what: "a password must be 64 hex digits".into(),
                    });
                }
                password = Some(v.to_string());
            }
        }
        match password {
            Some(p) => Ok(Credentials::Plain(p)),
            None => KeyFile::parse(text).map(Credentials::Curve),
        }
    }

    /// The text a manager reads.
    pub fn render(&self, comment: &str) -> String {
        match self {
            Credentials::Curve(k) => k.render(comment),
            Credentials::Plain(p) => format!("# {comment}\nplain_password = {p}\n"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let k = KeyFile {
            server_public: "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7".into(),
            public: "Yne@$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hID".into(),
            secret: "D:)Q[IlAW!ahhC2ac:9*A}h:p?([4%wOTJ%JR%cs".into(),
        };
        assert_eq!(KeyFile::parse(&k.render("test")), Ok(k.clone()));
        let no_secret = k.render("x").replace("secret", "# secret");
        assert_eq!(
            KeyFile::parse(&no_secret),
            Err(KeyFileError::Missing("secret"))
        );
        assert!(matches!(
            KeyFile::parse("public = short\n"),
            Err(KeyFileError::Line { line: 1, .. })
        ));
        let plain = Credentials::Plain("ab".repeat(32));
        assert_eq!(Credentials::parse(&plain.render("x")), Ok(plain));
        assert_eq!(
            Credentials::parse(&k.render("x")),
            Ok(Credentials::Curve(k.clone()))
        );
        assert!(Credentials::parse("plain_password = 1234\n").is_err());
    }
}
