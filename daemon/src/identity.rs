//! Which Unix account an fnx user's code runs under (`[users] mode`), and who may never be
//! one. In `service` mode every task runs as the account the daemon runs as. In `unix` mode an
//! fnx user *is* the Unix account of the same name; root, the daemon's own account, accounts
//! below `users.min_uid` and names with no account are refused before anything is spawned
//! (FAULTS.md 24): the client hears only `identity_not_allowed`, the admin log says why.

use crate::config::{UsersConfig, UsersMode};
use fnx_sys::user::{Account, Identity};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use thiserror::Error;

/// What a client is told when its identity may not run tasks here: deliberately vague (the
/// admin log says why).
pub const NOT_ALLOWED: &str =
    "this identity may not run tasks on this service; the site's admins can see why in the \
     daemon's log";

/// How the waiting tasks of a refused user end.
pub fn not_allowed_error() -> fnx_protocol::TaskError {
    fnx_protocol::TaskError::new(
        fnx_protocol::ErrorKind::BadInput,
        "IdentityNotAllowed",
        NOT_ALLOWED,
    )
}

/// Why a user may not run code here (for the admin log; clients get an opaque answer).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The account is root.
    #[error("{0:?} maps to root")]
    Root(String),
    /// The account is the one the daemon runs as.
    #[error("{name:?} maps to the service account (uid {uid}) the daemon runs as")]
    Service {
        /// The user.
        name: String,
        /// Its uid.
        uid: u32,
    },
    /// A system account.
    #[error("{name:?} has uid {uid}, below users.min_uid = {min}")]
    System {
        /// The user.
        name: String,
        /// Its uid.
        uid: u32,
        /// The limit.
        min: u32,
    },
    /// The kernel's overflow account (`nobody`, uid 65534): what unmapped ids become, so files
    /// of it are nobody's in particular.
    #[error("{0:?} is the overflow account (uid 65534, what unmapped ids become)")]
    Overflow(String),
    /// No such account.
    #[error("no Unix account is named {0:?}")]
    Missing(String),
    /// A socket peer whose uid has no account.
    #[error("no Unix account has uid {0}")]
    NoAccountForUid(u32),
    /// The databases could not be read.
    #[error("cannot look up {name:?}: {why}")]
    Lookup {
        /// The user.
        name: String,
        /// The error.
        why: String,
    },
}

/// The users policy of a running daemon.
#[derive(Clone, Debug)]
pub struct Identities {
    cfg: UsersConfig,
    service_uid: u32,
    service_name: String,
    /// When each refusal was last logged.
    log: std::sync::Arc<std::sync::Mutex<HashMap<String, Instant>>>,
}

impl Identities {
    /// The policy of `cfg`, for a daemon running as this process's account.
    pub fn new(cfg: &UsersConfig) -> Identities {
        // SAFETY: geteuid cannot fail.
        let service_uid = unsafe { libc::geteuid() };
        Identities {
            cfg: cfg.clone(),
            service_uid,
            service_name: crate::auth::current_user(),
            log: Default::default(),
        }
    }

    /// The mode.
    pub fn mode(&self) -> UsersMode {
        self.cfg.mode
    }

    /// The settings.
    pub fn config(&self) -> &UsersConfig {
        &self.cfg
    }

    /// The uid of the account the daemon runs as.
    pub fn service_uid(&self) -> u32 {
        self.service_uid
    }

    /// The fnx user of the daemon's own account (its first admin).
    pub fn service_name(&self) -> &str {
        &self.service_name
    }

    /// Check an account against the policy.
    pub fn check(&self, a: &Account) -> Result<(), Refusal> {
        if a.uid == 0 {
            return Err(Refusal::Root(a.name.clone()));
        }
        if a.uid == self.service_uid {
            return Err(Refusal::Service {
                name: a.name.clone(),
                uid: a.uid,
            });
        }
        if a.uid == 65534 {
            return Err(Refusal::Overflow(a.name.clone()));
        }
        if a.uid < self.cfg.min_uid {
            return Err(Refusal::System {
                name: a.name.clone(),
                uid: a.uid,
                min: self.cfg.min_uid,
            });
        }
        Ok(())
    }

    /// The account fnx user `name`'s code runs as (`unix` mode), or why there is none.
    pub fn account(&self, name: &str) -> Result<Account, Refusal> {
        let a = Account::by_name(name)
            .map_err(|e| Refusal::Lookup {
                name: name.to_string(),
                why: e.to_string(),
            })?
            .ok_or_else(|| Refusal::Missing(name.to_string()))?;
        self.check(&a)?;
        Ok(a)
    }

    /// The account of a socket peer's uid.
    pub fn account_of_uid(&self, uid: u32) -> Result<Account, Refusal> {
        Account::by_uid(uid)
            .map_err(|e| Refusal::Lookup {
                name: format!("uid {uid}"),
                why: e.to_string(),
            })?
            .ok_or(Refusal::NoAccountForUid(uid))
    }

    /// What a child running `account`'s code becomes (the policy checked again in the child).
    pub fn identity(&self, account: &Account) -> Identity {
        Identity::new(account, self.cfg.min_uid, self.service_uid)
    }

    /// Log a refusal for the admin: each distinct one at most once in 10 s, so a client that
    /// retries in a loop cannot flood the log.
    pub fn log_refusal(&self, what: &str, r: &Refusal) {
        let Ok(mut seen) = self.log.lock() else {
            return;
        };
        let line = format!("refused {what}: {r} (identity_not_allowed)");
        let now = Instant::now();
        if seen
            .get(&line)
            .is_some_and(|t| now.duration_since(*t) < Duration::from_secs(10))
        {
            return;
        }
        if seen.len() >= 1000 {
            seen.clear();
        }
        seen.insert(line.clone(), now);
        tracing::warn!("{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(min_uid: u32) -> Identities {
        let mut cfg = crate::config::SiteConfig::defaults().users;
        cfg.mode = UsersMode::Unix;
        cfg.min_uid = min_uid;
        Identities::new(&cfg)
    }

    #[test]
    fn fault_24_root_the_service_account_system_and_missing_accounts_are_refused() {
        let p = policy(1000);
        assert_eq!(p.account("root"), Err(Refusal::Root("root".into())));
        assert_eq!(
            p.account("no-such-account-fnx"),
            Err(Refusal::Missing("no-such-account-fnx".into()))
        );
        let me = Account::by_uid(p.service_uid()).unwrap().unwrap();
        if me.uid != 0 {
            assert!(matches!(p.check(&me), Err(Refusal::Service { .. })));
        }
        let mut sys = me.clone();
        sys.uid = 999;
        assert!(matches!(
            p.check(&sys),
            Err(Refusal::System { min: 1000, .. })
        ));
        sys.uid = 1000;
        assert_eq!(p.check(&sys), Ok(()));
        sys.uid = 65534;
        assert!(matches!(p.check(&sys), Err(Refusal::Overflow(_))));
    }
}
