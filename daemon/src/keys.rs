//! The daemon's CurveZMQ keys: a key directory only its owner may enter, the interchange's key
//! pair, and one key file per pool issued to that pool's managers.
//!
//! ```text
//! <data dir>/keys/             mode 0700 (a looser mode stops the daemon)
//!     interchange.key          the interchange's own key pair (server_public = public)
//!     <pool>.manager           what a pool's managers need: the interchange's public key and
//!                              the key pair issued to them (pass its path: --curve-keys)
//! ```
//!
//! The interchange accepts exactly the public keys of the `*.manager` files in the directory.

use fnx_interchange::{CurveServer, Mechanism};
use fnx_protocol::{Credentials, KeyFile};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// The key directory cannot be used.
#[derive(Debug, Error)]
pub enum KeyError {
    /// Others may read or enter it.
    #[error("the key directory {dir} has mode {mode:03o}; it must be accessible only by its owner (chmod 700 {dir})")]
    Loose {
        /// The directory.
        dir: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// A key pair could not be made.
    #[error("{path}: cannot make a key pair: {source}")]
    NewPair {
        /// The file it was for.
        path: PathBuf,
        /// Why.
        source: fnx_interchange::DriverError,
    },
    /// A file could not be read, written or parsed.
    #[error("{path}: {what}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        what: String,
    },
}

fn new_pair(path: &Path) -> Result<(String, String), KeyError> {
    fnx_interchange::new_key_pair().map_err(|source| KeyError::NewPair {
        path: path.to_path_buf(),
        source,
    })
}

fn file_err(path: &Path) -> impl Fn(String) -> KeyError + '_ {
    move |what| KeyError::File {
        path: path.to_path_buf(),
        what,
    }
}

fn write_private(path: &Path, text: &str) -> Result<(), KeyError> {
    use std::io::Write;
    let err = file_err(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| err(format!("cannot create: {e}")))?;
    f.write_all(text.as_bytes())
        .map_err(|e| err(format!("cannot write: {e}")))
}

fn read(path: &Path) -> Result<KeyFile, KeyError> {
    let err = file_err(path);
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
    KeyFile::parse(&text).map_err(|e| err(e.to_string()))
}

fn decode(path: &Path, z85: &str) -> Result<Vec<u8>, KeyError> {
    fnx_interchange::decode_key(z85).ok_or_else(|| file_err(path)("not a Z85 key".into()))
}

/// Everything one pool's manager links need: the interchange's side, and the keys its managers
/// authenticate with. Local managers get the manager keys on their standard input (never a
/// path or a key on a command line); managers on other nodes read `file`.
#[derive(Clone, Debug)]
pub struct LinkKeys {
    /// The interchange's CURVE settings.
    pub server: CurveServer,
    /// What the managers authenticate with: a key pair issued to them with the interchange's
    /// public key, or a password (PLAIN, loopback only).
    pub manager: Credentials,
    /// Where `manager` is written, for managers started elsewhere (None: in memory only).
    pub file: Option<PathBuf>,
}

impl LinkKeys {
    /// A new key pair for one more manager of this interchange: the text a manager reads on
    /// its standard input, and the public key to accept (see
    /// `fnx_interchange::Handle::allow_manager_key`).
    pub fn issue(&self) -> Result<(String, Vec<u8>), KeyError> {
        let here = Path::new("(in memory)");
        let creds = match &self.manager {
            Credentials::Plain(_) => {
                let p = password();
                let raw = p.as_bytes().to_vec();
                return Ok((
                    Credentials::Plain(p).render("fnx manager password (issued for one manager)"),
                    raw,
                ));
            }
            Credentials::Curve(k) => k,
        };
        let (public, secret) = new_pair(here)?;
        let raw = decode(here, &public)?;
        let k = KeyFile {
            server_public: creds.server_public.clone(),
            public,
            secret,
        };
        Ok((k.render("fnx manager keys (issued for one manager)"), raw))
    }

    /// A password for the managers a local pool starts on loopback: PLAIN, authenticated but
    /// not encrypted (see `fnx_interchange::Mechanism::Plain`).
    pub fn ephemeral_plain() -> LinkKeys {
        let p = password();
        LinkKeys {
            server: CurveServer {
                mechanism: Mechanism::Plain,
                secret: Vec::new(),
                clients: vec![(p.as_bytes().to_vec(), String::new())],
            },
            manager: Credentials::Plain(p),
            file: None,
        }
    }

    /// Fresh keys that live only in this process (a local pool whose managers all start here).
    pub fn ephemeral() -> Result<LinkKeys, KeyError> {
        let here = Path::new("(in memory)");
        let (server_public, server_secret) = new_pair(here)?;
        let (public, secret) = new_pair(here)?;
        let client = decode(here, &public)?;
        Ok(LinkKeys {
            server: CurveServer {
                mechanism: Mechanism::Curve,
                secret: decode(here, &server_secret)?,
                clients: vec![(client, String::new())],
            },
            manager: Credentials::Curve(KeyFile {
                server_public,
                public,
                secret,
            }),
            file: None,
        })
    }
}

/// 256 random bits as 64 hex digits (a PLAIN password).
fn password() -> String {
    crate::auth::new_token()
        .trim_start_matches("fnx_")
        .to_string()
}

/// The keys of one daemon.
pub struct Keys {
    dir: PathBuf,
    server: KeyFile,
}

impl Keys {
    /// Open (creating if needed) the key directory and the interchange's key pair.
    pub fn open(dir: &Path) -> Result<Keys, KeyError> {
        if !dir.exists() {
            std::fs::create_dir_all(dir)
                .map_err(|e| file_err(dir)(format!("cannot create: {e}")))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| file_err(dir)(format!("cannot set its mode: {e}")))?;
        }
        let mode = std::fs::metadata(dir)
            .map_err(|e| file_err(dir)(format!("cannot read: {e}")))?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Loose {
                dir: dir.to_path_buf(),
                mode,
            });
        }
        let path = dir.join("interchange.key");
        if !path.exists() {
            let (public, secret) = new_pair(&path)?;
            let k = KeyFile {
                server_public: public.clone(),
                public,
                secret,
            };
            write_private(
                &path,
                &k.render("the interchange's own key pair (keep private)"),
            )?;
        }
        Ok(Keys {
            dir: dir.to_path_buf(),
            server: read(&path)?,
        })
    }

    /// The key file of `pool`'s managers, issued now if it does not exist yet.
    pub fn manager_file(&self, pool: &str) -> Result<PathBuf, KeyError> {
        let path = self.dir.join(format!("{pool}.manager"));
        if !path.exists() {
            let (public, secret) = new_pair(&path)?;
            let k = KeyFile {
                server_public: self.server.public.clone(),
                public,
                secret,
            };
            let note =
                format!("fnx manager keys for pool {pool} (issued by the daemon; keep private)");
            write_private(&path, &k.render(&note))?;
        }
        Ok(path)
    }

    /// The link keys of `pool`: the interchange's settings and the pool's issued manager keys.
    pub fn link(&self, pool: &str) -> Result<LinkKeys, KeyError> {
        let file = self.manager_file(pool)?;
        Ok(LinkKeys {
            server: self.server()?,
            manager: Credentials::Curve(read(&file)?),
            file: Some(file),
        })
    }

    /// The interchange's CURVE settings: its secret key, and every issued manager key.
    pub fn server(&self) -> Result<CurveServer, KeyError> {
        let mut clients = Vec::new();
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| file_err(&self.dir)(format!("cannot list: {e}")))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "manager") {
                let k = read(&path)?;
                clients.push((decode(&path, &k.public)?, String::new()));
            }
        }
        let path = self.dir.join("interchange.key");
        Ok(CurveServer {
            mechanism: Mechanism::Curve,
            secret: decode(&path, &self.server.secret)?,
            clients,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_issued_once_and_a_loose_directory_is_refused() {
        let dir = std::env::temp_dir().join(format!("fnx-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let keys = Keys::open(&dir).unwrap();
        let f = keys.manager_file("gpu").unwrap();
        assert_eq!(keys.manager_file("gpu").unwrap(), f, "issued once");
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let server = keys.server().unwrap();
        assert_eq!(server.clients.len(), 1);
        let issued = read(&f).unwrap();
        assert_eq!(issued.server_public, keys.server.public);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = Keys::open(&dir).err().expect("refused").to_string();
        assert!(err.contains("755") && err.contains("chmod 700"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ephemeral_keys_pair_up() {
        let k = LinkKeys::ephemeral().unwrap();
        assert!(k.file.is_none());
        let Credentials::Curve(m) = &k.manager else {
            panic!("curve keys expected")
        };
        let public = decode(Path::new("x"), &m.public).unwrap();
        assert_eq!(k.server.clients, vec![(public, String::new())]);
        let other = LinkKeys::ephemeral().unwrap();
        assert_ne!(other.manager, k.manager);
        let plain = LinkKeys::ephemeral_plain();
        let (text, raw) = plain.issue().unwrap();
        assert!(text.contains("plain_password = ") && raw.len() == 64);
        assert_ne!(plain.issue().unwrap().1, raw, "every manager gets its own");
    }
}
