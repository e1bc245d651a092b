//! Managers per user (`users.mode = "unix"`): a local pool starts one manager for each user
//! with queued tasks, *as* that user (see `fnx_sys::user`), and drains it after
//! `users.user_idle_s` without tasks. Each manager holds a key issued for its user alone, so
//! the interchange gives it that user's tasks and no one else's ([`fnx_interchange::tenants`]).
//!
//! A user's run directory is `<pool run dir>/<user>/`, mode 0700, owned by the user; its
//! manager writes its log and its workers' there (the daemon cannot read it; admins can).

use super::{bootstrap, io, spawn, LocalError, LocalPool, Result, Spawn};
use crate::identity::Identities;
use fnx_sys::user::{Account, Identity};
use std::collections::HashMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// How a pool runs users' managers.
#[derive(Clone, Debug)]
pub struct PerUser {
    /// Who may be a user, and whose account the daemon runs as.
    pub identities: Identities,
    /// A user's manager is drained after this long without tasks.
    pub idle: Duration,
}

/// A user to become in a child before exec, and the log it opens then.
pub(super) struct AsUser {
    pub(super) user: String,
    identity: Identity,
    dir: CString,
    log: CString,
    /// Its working directory (the account's home), entered once it is the user: a 0700 home
    /// is closed to the daemon's account.
    home: CString,
}

impl AsUser {
    /// In the child: become the user, create its manager directory and send stderr to its log.
    ///
    /// # Safety
    /// Only between fork and exec.
    pub(super) unsafe fn become_it(&self) -> std::io::Result<()> {
        self.identity.become_it()?;
        if libc::chdir(self.home.as_ptr()) != 0 {
            libc::chdir(c"/".as_ptr());
        }
        if libc::mkdir(self.dir.as_ptr(), 0o700) != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(e);
            }
        }
        let fd = libc::open(
            self.log.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND | libc::O_NOFOLLOW,
            0o600,
        );
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::dup2(fd, 2) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        libc::close(fd);
        Ok(())
    }
}

/// Why a user's manager did not start.
enum Spawned {
    /// The user may not run anything here.
    Refused,
    /// Something else failed (tried again later).
    Failed(LocalError),
}

/// Per-user bookkeeping of a pool.
pub(super) struct Users {
    cfg: PerUser,
    idle_since: HashMap<String, Instant>,
    /// Users whose manager could not start, and when to try again.
    retry_at: HashMap<String, Instant>,
    launched: u64,
    /// The last look at the tenants (a few times a second is enough).
    last: Option<Instant>,
}

impl Users {
    pub(super) fn new(cfg: PerUser) -> Users {
        Users {
            cfg,
            idle_since: HashMap::new(),
            retry_at: HashMap::new(),
            launched: 0,
            last: None,
        }
    }
}

/// The user's own directory under the pool's run directory: created 0700 and given to the
/// user, or checked to be theirs (a directory someone else made there is refused).
pub fn user_dir(dir: &Path, a: &Account) -> Result<()> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() && m.uid() == a.uid => Ok(()),
        Ok(_) => Err(LocalError::Managers(format!(
            "{} exists but is not a directory owned by {}; remove it",
            dir.display(),
            a.name
        ))),
        Err(_) => {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .map_err(io(format!("cannot create {}", dir.display())))?;
            std::os::unix::fs::chown(dir, Some(a.uid), Some(a.gid)).map_err(io(format!(
                "cannot give {} to {} (the daemon needs CAP_CHOWN)",
                dir.display(),
                a.name
            )))
        }
    }
}

fn cstring(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| LocalError::Managers(format!("{} contains a NUL byte", p.display())))
}

impl LocalPool {
    /// Start a manager for each user with queued tasks and none running; drain the managers of
    /// users idle for `users.user_idle_s`. Called by the pool's thread a few times a second.
    pub fn serve_users(&mut self) {
        let Some(users) = &mut self.users else {
            return;
        };
        let now = Instant::now();
        if users
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_millis(100))
        {
            return;
        }
        users.last = Some(now);
        let Some(tenants) = self.handle.tenants() else {
            return;
        };
        let mut start = Vec::new();
        let mut drain = Vec::new();
        for (tenant, c) in tenants {
            if tenant.is_empty() {
                continue;
            }
            let live: Vec<&mut super::Child> = self
                .children
                .iter_mut()
                .filter(|ch| ch.running && !ch.draining && ch.tenant.as_deref() == Some(&tenant))
                .collect();
            if c.queued + c.held + c.running > 0 {
                users.idle_since.remove(&tenant);
                let due = users.retry_at.get(&tenant).is_none_or(|t| now >= *t);
                if live.is_empty() && c.queued > 0 && due {
                    start.push(tenant);
                }
            } else if !live.is_empty() {
                let since = *users.idle_since.entry(tenant.clone()).or_insert(now);
                if now.duration_since(since) >= users.cfg.idle {
                    for ch in live {
                        ch.draining = true;
                        drain.push(ch.uid.clone());
                    }
                    users.idle_since.remove(&tenant);
                }
            }
        }
        for uid in drain {
            tracing::info!("manager {uid}: its user has had no task for a while; draining it");
            self.handle.drain_manager(&uid);
        }
        for user in start {
            match self.spawn_user_manager(&user) {
                Ok(uid) => tracing::info!("started manager {uid} as user {user:?}"),
                Err(Spawned::Refused) => {
                    // Nothing will ever run for them here: their waiting tasks fail now
                    // (the admin log says why; FAULTS.md 24).
                    self.handle
                        .fail_tenant(&user, crate::identity::not_allowed_error());
                }
                Err(Spawned::Failed(e)) => {
                    tracing::error!(
                        "cannot start a manager for user {user:?}: {e}; retrying in 30 s"
                    );
                    if let Some(u) = &mut self.users {
                        u.retry_at.insert(user, now + Duration::from_secs(30));
                    }
                }
            }
        }
    }

    /// Start one manager as `user`, with a key issued for that user alone.
    fn spawn_user_manager(&mut self, user: &str) -> std::result::Result<String, Spawned> {
        let users = self.users.as_mut().expect("per-user pool");
        // Checked again right before anything runs as the account (FAULTS.md 24).
        let ids = &users.cfg.identities;
        let account = ids.account(user).map_err(|r| {
            ids.log_refusal("a manager", &r);
            Spawned::Refused
        })?;
        self.start_as(user, &account).map_err(Spawned::Failed)
    }

    fn start_as(&mut self, user: &str, account: &Account) -> Result<String> {
        let users = self.users.as_mut().expect("per-user pool");
        let ids = &users.cfg.identities;
        let identity = ids.identity(account);
        users.launched += 1;
        let uid = format!("{user}.manager-{}", users.launched);
        let keys = self
            .opts
            .curve
            .as_ref()
            .ok_or_else(|| LocalError::Managers("the pool has no link keys".into()))?
            .issue()
            .map_err(|e| LocalError::Managers(format!("cannot make keys: {e}")))?;
        let run_dir = self.opts.run_dir.join(user);
        user_dir(&run_dir, account)?;
        self.handle.allow_manager_key(keys.1, user);
        let mut b = bootstrap(&self.handle, &self.opts, &uid);
        b.run_dir = run_dir;
        let dir = b.dir();
        let log = dir.join("manager.log");
        let mut cmd = Command::new(&self.exe);
        cmd.args(fnx_launcher::manager_args(&b));
        // The pool's clean environment, with the account's own name and home.
        cmd.env_clear()
            .envs(self.opts.env.iter().flatten().cloned())
            .env("HOME", &account.home)
            .env("USER", &account.name)
            .env("LOGNAME", &account.name)
            .current_dir("/");
        let as_user = AsUser {
            user: user.to_string(),
            identity,
            dir: cstring(&dir)?,
            log: cstring(&log)?,
            home: cstring(&account.home)?,
        };
        let child = spawn(
            Spawn {
                cmd,
                uid: uid.clone(),
                managers: vec![uid.clone()],
                log,
                cpus: Vec::new(),
                stdin: Some(keys.0),
                as_user: Some(as_user),
            },
            &self.opts,
            self.exit_tx.clone(),
        )?;
        self.children.retain(|c| c.running);
        self.children.push(child);
        Ok(uid)
    }
}
