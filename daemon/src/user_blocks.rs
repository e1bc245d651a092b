//! A batch pool in `users.mode = "unix"`: each user with queued tasks gets a block thread of
//! their own ([`BlockPool::new`] with a [`UserBlocks`]) whose blocks are written, submitted and cancelled *as
//! the user* (the scheduler charges the user's account and applies the user's limits; the
//! pool's `max_blocks` applies per user). Their managers hold a CurveZMQ key issued for that
//! user alone, so the interchange gives them that user's tasks and no one else's.
//!
//! Files: the user's run directory `<pool run dir>/<user>/` (0700, the user's: block
//! directories, scripts, job output, manager logs), and the daemon's control directory
//! `<pool run dir>/.blocks/<user>/` (0711, the daemon's: job ids, ended markers, a copy of each
//! script for adoption after a restart, and `manager.key`, 0600, owned by the user).

use crate::blocks::{next_user_block_number, BlockPool, PoolReport, UserBlocks};
use crate::config::BlocksConfig;
use crate::identity::Identities;
use crate::keys::LinkKeys;
use fnx_interchange::Handle;
use fnx_launcher::provider::Runner;
use fnx_launcher::ManagerBootstrap;
use fnx_sys::user::Account;
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Starts a block thread for each user of a batch pool that has work.
pub struct UserBlockPools {
    /// The pool.
    pub name: String,
    /// Its blocks.
    pub cfg: BlocksConfig,
    /// Worker slots per manager.
    pub slots: Option<u32>,
    /// Its interchange.
    pub handle: Arc<Handle>,
    /// What `/v1/status` shows.
    pub report: Arc<Mutex<PoolReport>>,
    /// Managers' settings; the run directory is the pool's (each user's is beneath it).
    pub template: ManagerBootstrap,
    /// `fnx` on the compute nodes.
    pub fnx: PathBuf,
    /// Who may be a user.
    pub identities: Identities,
    /// The environment of batch commands (the daemon's clean one; the user's name and home
    /// are set per user).
    pub env: Vec<(String, String)>,
    /// The pool's link keys (CurveZMQ), from which each user's are issued.
    pub keys: LinkKeys,
}

/// Why a user's blocks could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The user may not run anything here (the admin log says why).
    #[error("refused (the admin log says why)")]
    Refused,
    /// A file or directory could not be made or given to the user.
    #[error("{what}: {source}")]
    Io {
        /// What was attempted.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The user's run directory cannot be used.
    #[error("{0}")]
    Dir(#[from] crate::local::LocalError),
    /// No key could be made.
    #[error("{0}")]
    Keys(#[from] crate::keys::KeyError),
    /// The thread could not start.
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> StartError {
    move |source| StartError::Io { what, source }
}

/// The user's key file, written by the daemon and then given to the user (0600).
fn write_key(path: &Path, text: &str, a: &Account) -> Result<(), StartError> {
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(format!("cannot create {}", path.display())))?;
    f.write_all(text.as_bytes())
        .map_err(io_err(format!("cannot write {}", path.display())))?;
    std::os::unix::fs::chown(path, Some(a.uid), Some(a.gid)).map_err(io_err(format!(
        "cannot give {} to {} (the daemon needs CAP_CHOWN)",
        path.display(),
        a.name
    )))
}

impl UserBlockPools {
    /// Watch for users with queued tasks until `stop`; then wait for their block threads
    /// (which cancel their blocks).
    pub fn run(self, stop: Arc<AtomicBool>) {
        let control_root = self.template.run_dir.join(".blocks");
        if let Err(e) = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&control_root)
        {
            tracing::error!(
                "pool {}: cannot create {}: {e}",
                self.name,
                control_root.display()
            );
        }
        let _ = std::fs::set_permissions(&control_root, std::fs::Permissions::from_mode(0o711));
        let counter = Arc::new(AtomicU64::new(next_user_block_number(&control_root)));
        let mut threads: HashMap<String, JoinHandle<()>> = HashMap::new();
        let mut retry_at: HashMap<String, Instant> = HashMap::new();
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            for (user, c) in self.handle.tenants().unwrap_or_default() {
                if user.is_empty() || c.queued == 0 || threads.contains_key(&user) {
                    continue;
                }
                if retry_at.get(&user).is_some_and(|t| now < *t) {
                    continue;
                }
                match self.start_user(&user, &control_root, &counter, &stop) {
                    Ok(t) => {
                        tracing::info!("pool {}: blocks for user {user:?} start", self.name);
                        threads.insert(user, t);
                    }
                    Err(e) => {
                        tracing::error!(
                            "pool {}: cannot start blocks for user {user:?}: {e}; retrying in 30 s",
                            self.name
                        );
                        retry_at.insert(user, now + Duration::from_secs(30));
                    }
                }
            }
            std::thread::sleep(self.cfg.scaling_interval.min(Duration::from_secs(1)));
        }
        for (_, t) in threads {
            let _ = t.join();
        }
    }

    fn start_user(
        &self,
        user: &str,
        control_root: &Path,
        counter: &Arc<AtomicU64>,
        stop: &Arc<AtomicBool>,
    ) -> Result<JoinHandle<()>, StartError> {
        let ids = &self.identities;
        let account = match ids.account(user) {
            Ok(a) => a,
            Err(r) => {
                ids.log_refusal("blocks", &r);
                self.handle
                    .fail_tenant(user, crate::identity::not_allowed_error());
                return Err(StartError::Refused);
            }
        };
        let run_dir = self.template.run_dir.join(user);
        crate::local::user_dir(&run_dir, &account)?;
        let control = control_root.join(user);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&control)
            .map_err(io_err(format!("cannot create {}", control.display())))?;
        let _ = std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o711));
        let key_file = control.join("manager.key");
        let (text, public) = self.keys.issue()?;
        write_key(&key_file, &text, &account)?;
        self.handle.allow_manager_key(public, user);
        let mut template = self.template.clone();
        template.run_dir = run_dir;
        template.curve_keys = Some(key_file);
        let identity = ids.identity(&account);
        let mut env: Vec<(String, String)> = self
            .env
            .iter()
            .filter(|(k, _)| !["HOME", "USER", "LOGNAME"].contains(&k.as_str()))
            .cloned()
            .collect();
        env.push(("HOME".into(), account.home.display().to_string()));
        env.push(("USER".into(), account.name.clone()));
        env.push(("LOGNAME".into(), account.name.clone()));
        let runner = Runner {
            env: Some(env),
            // SAFETY: become_it is async-signal-safe and made for this place.
            pre_exec: Some(Arc::new(move || unsafe { identity.become_it() })),
            stdin: None,
        };
        let bp = BlockPool::new(
            &self.name,
            self.cfg.clone(),
            self.slots,
            self.handle.clone(),
            self.report.clone(),
            template,
            self.fnx.clone(),
            Some(UserBlocks {
                user: user.to_string(),
                runner,
                control,
                counter: counter.clone(),
            }),
        );
        let stop = stop.clone();
        std::thread::Builder::new()
            .name(format!("blocks-{}-{user}", self.name))
            .spawn(move || bp.run(stop))
            .map_err(StartError::Thread)
    }
}
