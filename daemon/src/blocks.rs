//! A batch pool's block thread: carries out the [`Scaler`]'s decisions with the provider's
//! commands (render and submit batch scripts, poll job states in one call, cancel), and
//! publishes the pool's blocks for `/v1/status`.

use crate::config::{BlocksConfig, Connect};
use crate::scaler::{Action, Block, Scaler};
use fnx_interchange::Handle;
use fnx_launcher::provider::{self, run_command, run_command_with, Runner};
use fnx_launcher::{script, BlockFiles, ManagerBootstrap, Provider};
use fnx_protocol::BlockId;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use thiserror::Error;

/// Why a block cannot be rendered or submitted.
#[derive(Debug, Error)]
pub enum BlockError {
    /// The pool's managers connect to an interface without an address.
    #[error("network interface {0:?} has no IPv4 address on this host (see `ip -br addr`)")]
    NoAddress(String),
    /// The fnx executable the batch script runs cannot be found.
    #[error("cannot find fnx: {0}")]
    Fnx(std::io::Error),
    /// The batch script cannot be written.
    #[error(transparent)]
    Render(#[from] script::RenderError),
    /// A block file cannot be written.
    #[error("cannot {what} {path}: {source}", path = .path.display())]
    File {
        /// What was done: `create`, `write`, `make executable`.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The submit command failed.
    #[error(transparent)]
    Command(#[from] provider::CommandError),
}
use std::time::{Duration, Instant};

/// What `/v1/status` shows of a pool's blocks.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PoolReport {
    /// The provider (`local`, `slurm`, `pbs`, `cobalt`).
    pub provider: &'static str,
    /// The launcher.
    pub launcher: &'static str,
    /// The pool's run directory (`<data_dir>/runs/<pool>`).
    pub run_dir: PathBuf,
    /// Why the pool cannot get managers, when it is marked failed.
    pub failed: Option<String>,
    /// Why its last block could not be submitted, until one is.
    pub submit_error: Option<String>,
    /// Live blocks, then recently ended ones.
    pub blocks: Vec<Block>,
    /// Admin requests for the block thread (`POST /v1/pools/{pool}/blocks/{id}/drain|cancel`).
    #[serde(skip)]
    pub requests: Vec<BlockRequest>,
    /// `unix` mode: each user's blocks, merged into `blocks`.
    #[serde(skip)]
    pub by_user: std::collections::BTreeMap<String, Vec<Block>>,
}

/// A user's own blocks of a batch pool (`users.mode = "unix"`): submitted, written and
/// cancelled as the user, run by managers that hold the user's key.
#[derive(Clone, Debug)]
pub struct UserBlocks {
    /// The user (the interchange tenant of its tasks and managers).
    pub user: String,
    /// Runs batch commands as the user.
    pub runner: Runner,
    /// The daemon's own record of the user's blocks (job ids, ended markers, script copies),
    /// outside the user's directory, which the daemon cannot write.
    pub control: PathBuf,
    /// Block numbers, unique across the pool's users.
    pub counter: Arc<std::sync::atomic::AtomicU64>,
}

impl UserBlocks {
    fn job_id(&self, block: u64) -> PathBuf {
        self.control.join(format!("block-{block}.job"))
    }
    fn ended(&self, block: u64) -> PathBuf {
        self.control.join(format!("block-{block}.ended"))
    }
    fn script(&self, block: u64) -> PathBuf {
        self.control.join(format!("block-{block}.sh"))
    }
}

/// One more than the highest block number recorded under `control_root` (every user's
/// control directory), so block numbers are unique across a pool's users and restarts.
pub fn next_user_block_number(control_root: &Path) -> u64 {
    let Ok(users) = std::fs::read_dir(control_root) else {
        return 0;
    };
    users
        .filter_map(|u| u.ok())
        .filter_map(|u| std::fs::read_dir(u.path()).ok())
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("block-"))
                .and_then(|n| n.split('.').next())
                .and_then(|n| n.parse::<u64>().ok())
        })
        .map(|n| n + 1)
        .max()
        .unwrap_or(0)
}

/// What an admin asks of one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockRequest {
    /// Drain it now: its managers finish what they hold, take nothing new, and exit.
    Drain(u64),
    /// Cancel its job now, running tasks or not (they are retried elsewhere).
    Cancel(u64),
}

/// A batch pool's blocks.
pub struct BlockPool {
    name: String,
    cfg: BlocksConfig,
    handle: Arc<Handle>,
    report: Arc<Mutex<PoolReport>>,
    run_dir: PathBuf,
    /// Every manager's settings but uid, block, run directory and drain time.
    template: ManagerBootstrap,
    fnx: PathBuf,
    next_block: u64,
    scaler: Scaler,
    /// `unix` mode: the user whose blocks these are.
    user: Option<UserBlocks>,
}

impl BlockPool {
    /// Blocks of pool `name`; managers start from `template` with `fnx` on the compute nodes.
    /// `template`'s run directory is the pool's, or with `user` (`unix` mode) the user's own.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: &str,
        cfg: BlocksConfig,
        slots: Option<u32>,
        handle: Arc<Handle>,
        report: Arc<Mutex<PoolReport>>,
        template: ManagerBootstrap,
        fnx: PathBuf,
        user: Option<UserBlocks>,
    ) -> BlockPool {
        let run_dir = template.run_dir.clone();
        // A user's block numbers come from the pool's shared counter.
        let next_block = match &user {
            Some(_) => 0,
            None => next_block_number(&run_dir),
        };
        if let Ok(mut r) = report.lock() {
            r.provider = cfg.spec.provider.name();
            r.launcher = cfg.spec.launcher.name();
            if user.is_none() {
                r.run_dir = run_dir.clone();
            }
        }
        BlockPool {
            name: match &user {
                Some(u) => format!("{name} ({})", u.user),
                None => name.to_string(),
            },
            scaler: Scaler::new(name, cfg.clone(), slots),
            cfg,
            handle,
            report,
            run_dir,
            template,
            fnx,
            next_block,
            user,
        }
    }

    fn new_block_number(&mut self) -> u64 {
        match &self.user {
            Some(u) => u.counter.fetch_add(1, Ordering::Relaxed),
            None => {
                let id = self.next_block;
                self.next_block += 1;
                id
            }
        }
    }

    /// Where a block's end is marked.
    fn ended_marker(&self, block: u64, dir: &Path) -> PathBuf {
        match &self.user {
            Some(u) => u.ended(block),
            None => dir.join(ENDED),
        }
    }

    /// The files of block `block` (in `unix` mode its job id is kept in the daemon's control
    /// directory).
    fn files(&self, block: u64) -> BlockFiles {
        let mut files = BlockFiles::new(self.cfg.spec.provider, &self.run_dir, block);
        if let Some(u) = &self.user {
            files.job_id = u.job_id(block);
        }
        files
    }

    /// This pool's queued and running tasks and its managers (in `unix` mode: its user's).
    fn load(&self) -> Option<(usize, usize, Vec<fnx_interchange::ManagerStatus>)> {
        let (counts, managers) = self.handle.status()?;
        match &self.user {
            None => Some((counts.queued, counts.running, managers)),
            Some(u) => {
                let mine = self
                    .handle
                    .tenants()?
                    .into_iter()
                    .find(|(t, _)| *t == u.user)
                    .map(|(_, c)| c)
                    .unwrap_or_default();
                let managers = managers
                    .into_iter()
                    .filter(|m| m.tenant == u.user)
                    .collect();
                Some((mine.queued, mine.running, managers))
            }
        }
    }

    /// The batch script and launch line of block `block` (also `fnx config check`'s dry run).
    pub fn render(&self, block: u64) -> Result<(BlockFiles, script::Rendered), BlockError> {
        let (mut files, rendered) =
            render_block(&self.cfg, &self.run_dir, &self.template, &self.fnx, block)?;
        files.job_id = self.files(block).job_id;
        Ok((files, rendered))
    }

    /// Blocks of an earlier run of the daemon (a `job_id` file and no `ended` marker in their
    /// directory) are adopted when their managers can still reach this interchange (the same
    /// endpoint in their batch script); the polls that follow drop the ones whose jobs have
    /// ended. Blocks rendered for another endpoint are cancelled: their managers could never
    /// connect.
    fn adopt(&mut self) {
        let now = Instant::now();
        let endpoint = format!("--interchange {} ", self.template.interchange);
        let mut stale = Vec::new();
        let ids: Vec<u64> = match &self.user {
            Some(u) => (0..u.counter.load(Ordering::Relaxed))
                .filter(|&id| u.job_id(id).exists())
                .collect(),
            None => (0..self.next_block).collect(),
        };
        for id in ids {
            let files = self.files(id);
            if self.ended_marker(id, &files.dir).exists() {
                continue;
            }
            let Ok(job) = std::fs::read_to_string(&files.job_id) else {
                continue;
            };
            let job = job.trim().to_string();
            let script_path = match &self.user {
                Some(u) => u.script(id),
                None => files.script.clone(),
            };
            let script = std::fs::read_to_string(&script_path).unwrap_or_default();
            if script.contains(&endpoint) {
                tracing::info!(
                    "pool {}: adopting block {id} (job {job}) of an earlier run, if it still lives",
                    self.name
                );
                self.scaler.adopt(now, id, job, &files.dir, &files.stderr);
            } else {
                stale.push((id, job));
            }
        }
        if !stale.is_empty() {
            tracing::info!(
                "pool {}: {} blocks of an earlier run were started for another interchange \
                 address; cancelling them if they still live",
                self.name,
                stale.len()
            );
            self.cancel(stale);
        }
    }

    /// Scale until `stop`; then cancel every live block.
    pub fn run(mut self, stop: Arc<AtomicBool>) {
        self.adopt();
        let mut next_scale = Instant::now();
        let mut next_poll = Instant::now() + self.cfg.poll_interval;
        let mut poll_errors = 0u32;
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now >= next_scale {
                next_scale = now + self.cfg.scaling_interval;
                if let Some((queued, running, managers)) = self.load() {
                    let acts = self.scaler.tick(now, queued, running, &managers);
                    self.execute(acts);
                }
                self.publish();
            }
            if now >= next_poll {
                next_poll = now + self.cfg.poll_interval;
                let jobs = self.scaler.live_jobs();
                if !jobs.is_empty() {
                    let p = self.cfg.spec.provider;
                    match provider::query_status(p, &jobs, &self.run_dir, self.cfg.submit_timeout) {
                        Ok(states) => {
                            poll_errors = 0;
                            let acts = self.scaler.job_states(Instant::now(), &states, last_line);
                            let live = self.scaler.live_jobs();
                            for b in self.scaler.blocks() {
                                if jobs.contains(&b.job) && !live.contains(&b.job) {
                                    tracing::info!(
                                        "pool {}: block {} (job {}) ended: {}",
                                        self.name,
                                        b.id,
                                        b.job,
                                        b.job_state
                                    );
                                }
                                if !live.contains(&b.job) {
                                    mark_ended(&self.ended_marker(b.id, &b.dir));
                                }
                            }
                            self.execute(acts);
                            self.publish();
                        }
                        Err(e) => {
                            poll_errors += 1;
                            // A scheduler hiccup is common; say so once, then every 20th time.
                            if poll_errors == 1 || poll_errors.is_multiple_of(20) {
                                tracing::warn!(
                                    "pool {}: cannot read job states ({poll_errors} times in a \
                                     row): {e}",
                                    self.name
                                );
                            }
                        }
                    }
                }
            }
            self.serve_requests();
            std::thread::sleep(Duration::from_millis(50));
        }
        let live = self.scaler.cancel_all();
        if !live.is_empty() {
            tracing::info!("pool {}: cancelling {} blocks", self.name, live.len());
            self.cancel(live);
        }
    }

    /// Carry out admins' requests.
    fn serve_requests(&mut self) {
        let requests = match self.report.lock() {
            Ok(mut r) if !r.requests.is_empty() => {
                // Several users' block threads share the report: each takes its own blocks'.
                let mine: Vec<u64> = self.scaler.blocks().iter().map(|b| b.id).collect();
                let (ours, others): (Vec<_>, Vec<_>) = std::mem::take(&mut r.requests)
                    .into_iter()
                    .partition(|q| match q {
                        BlockRequest::Drain(id) | BlockRequest::Cancel(id) => {
                            self.user.is_none() || mine.contains(id)
                        }
                    });
                r.requests = others;
                ours
            }
            _ => return,
        };
        if requests.is_empty() {
            return;
        }
        for req in requests {
            match req {
                BlockRequest::Drain(id) => {
                    if self.scaler.force_drain(id, Instant::now()) {
                        tracing::info!("pool {}: draining block {id} (admin request)", self.name);
                        self.handle.drain_block(BlockId(id));
                    }
                }
                BlockRequest::Cancel(id) => {
                    if let Some(job) = self.scaler.force_cancel(id) {
                        tracing::warn!(
                            "pool {}: cancelling block {id} (job {job}) on an admin's request; \
                             its running tasks are retried elsewhere",
                            self.name
                        );
                        self.cancel(vec![(id, job)]);
                    }
                }
            }
        }
        self.publish();
    }

    fn publish(&self) {
        if let Ok(mut r) = self.report.lock() {
            match &self.user {
                None => {
                    r.failed = self.scaler.failed().map(str::to_string);
                    r.submit_error = self.scaler.submit_error().map(str::to_string);
                    r.blocks = self.scaler.blocks();
                }
                Some(u) => {
                    if let Some(f) = self.scaler.failed() {
                        r.failed = Some(format!("{}: {f}", u.user));
                    }
                    if let Some(e) = self.scaler.submit_error() {
                        r.submit_error = Some(format!("{}: {e}", u.user));
                    }
                    r.by_user.insert(u.user.clone(), self.scaler.blocks());
                    let mut all: Vec<Block> = r.by_user.values().flatten().cloned().collect();
                    all.sort_by_key(|b| b.id);
                    r.blocks = all;
                }
            }
        }
    }

    fn execute(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Submit(n) => {
                    for _ in 0..n {
                        if !self.submit() {
                            break;
                        }
                    }
                }
                Action::Drain(block) => {
                    tracing::info!("pool {}: block {block} is idle; draining it", self.name);
                    self.handle.drain_block(BlockId(block));
                }
                Action::Cancel(list) => self.cancel(list),
                Action::ManagersGone(uids, reason) => {
                    tracing::warn!(
                        "pool {}: {} managers are gone: {reason}",
                        self.name,
                        uids.len()
                    );
                    for uid in uids {
                        self.handle.manager_gone(uid, reason.clone());
                    }
                }
            }
        }
    }

    /// Submit one block; false when it failed (the rest of a scale-out waits for the backoff).
    fn submit(&mut self) -> bool {
        let id = self.new_block_number();
        let result = self.render(id).and_then(|(files, rendered)| {
            let argv = provider::submit_argv(&self.cfg.spec, &files);
            let out = match &self.user {
                None => {
                    write_script(&files.script, &rendered.script)?;
                    run_command(&argv, &files.dir, self.cfg.submit_timeout)?
                }
                Some(u) => {
                    // The user writes the block's directory and script and submits it: the
                    // scheduler runs it as the user and charges the user's account.
                    let _ = std::fs::create_dir_all(&u.control);
                    let _ = std::fs::write(u.script(id), &rendered.script);
                    let mut wrapped = vec![
                        "/bin/sh".to_string(),
                        "-c".into(),
                        "umask 077 && mkdir -p \"$1\" && cat > \"$2\" && chmod 700 \"$2\" && \
                         cd \"$1\" && shift 2 && exec \"$@\""
                            .into(),
                        "sh".into(),
                        files.dir.display().to_string(),
                        files.script.display().to_string(),
                    ];
                    wrapped.extend(argv.iter().cloned());
                    let runner = Runner {
                        stdin: Some(rendered.script.clone().into_bytes()),
                        ..u.runner.clone()
                    };
                    run_command_with(&wrapped, Path::new("/"), self.cfg.submit_timeout, &runner)?
                }
            };
            let job = provider::parse_submit(self.cfg.spec.provider, &out)?;
            let _ = std::fs::write(&files.job_id, format!("{job}\n"));
            Ok((files, job))
        });
        let now = Instant::now();
        match result {
            Ok((files, job)) => {
                tracing::info!(
                    "pool {}: submitted block {id} as job {job} ({} nodes); its files: {}",
                    self.name,
                    self.cfg.spec.nodes,
                    files.dir.display()
                );
                self.scaler
                    .submitted(now, id, job, &files.dir, &files.stderr);
                true
            }
            Err(e) => {
                tracing::error!("pool {}: cannot submit block {id}: {e}", self.name);
                let dir = match &self.user {
                    Some(u) => u.control.clone(),
                    None => self.run_dir.join(format!("block-{id}")),
                };
                let _ = std::fs::create_dir_all(&dir);
                let name = match &self.user {
                    Some(_) => format!("block-{id}.submit.error"),
                    None => "submit.error".to_string(),
                };
                let _ = std::fs::write(dir.join(name), format!("{e}\n"));
                self.scaler.submit_failed(now, &e.to_string());
                self.publish();
                false
            }
        }
    }

    /// Cancel jobs; their blocks are marked ended once the scheduler took the request. A
    /// failed cancel is retried by the scaler (the blocks stay counted until their jobs end).
    fn cancel(&mut self, list: Vec<(u64, String)>) {
        if list.is_empty() || self.cfg.spec.provider == Provider::Local {
            return;
        }
        let jobs: Vec<String> = list.iter().map(|(_, j)| j.clone()).collect();
        tracing::info!(
            "pool {}: cancelling jobs {} (blocks {})",
            self.name,
            jobs.join(" "),
            list.iter()
                .map(|(b, _)| b.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let argv = provider::cancel_argv(self.cfg.spec.provider, &jobs);
        let done = match &self.user {
            // The user's jobs are cancelled by the user.
            Some(u) => run_command_with(&argv, Path::new("/"), self.cfg.submit_timeout, &u.runner),
            None => run_command(&argv, &self.run_dir, self.cfg.submit_timeout),
        };
        match done {
            Ok(_) => {
                for (id, _) in &list {
                    if !self.scaler.is_live(*id) {
                        let dir = self.run_dir.join(format!("block-{id}"));
                        mark_ended(&self.ended_marker(*id, &dir));
                    }
                }
            }
            Err(e) => {
                tracing::warn!("pool {}: {e}; the cancel is retried", self.name);
                self.scaler.cancel_failed(&list);
            }
        }
    }
}

/// The endpoint managers of a batch pool connect to: the interchange's port (from `bound`, its
/// bound endpoint) at the pool's `address`, the address of its `interface`, or the
/// interchange's own address.
pub fn manager_endpoint(
    bound: &str,
    interchange_address: &str,
    connect: &Connect,
) -> Result<String, BlockError> {
    let port = bound.rsplit(':').next().unwrap_or("0");
    let host = match connect {
        Connect::Interchange => interchange_address.to_string(),
        Connect::Address(a) => a.clone(),
        Connect::Interface(i) => fnx_sys::node::interface_ipv4(i)
            .ok_or_else(|| BlockError::NoAddress(i.clone()))?
            .to_string(),
    };
    Ok(if host.contains(':') {
        format!("tcp://[{host}]:{port}")
    } else {
        format!("tcp://{host}:{port}")
    })
}

/// Render block `block`'s files and script: managers named `block-N.{rank}`, logging into the
/// block directory, draining `drain_margin` before the walltime.
pub fn render_block(
    cfg: &BlocksConfig,
    run_dir: &Path,
    template: &ManagerBootstrap,
    fnx: &Path,
    block: u64,
) -> Result<(BlockFiles, script::Rendered), BlockError> {
    let files = BlockFiles::new(cfg.spec.provider, run_dir, block);
    let mut b = template.clone();
    b.uid = format!("block-{block}.{{rank}}");
    b.block_id = Some(BlockId(block));
    b.run_dir = files.dir.clone();
    // Block numbers are never reused in a pool's run directory, so this marks the block's
    // processes uniquely (and keeps rendered scripts reproducible).
    b.run_id = format!("fnx-{}-block-{block}", cfg.spec.pool);
    b.drain_after_ms = Some(
        cfg.spec
            .walltime
            .saturating_sub(cfg.drain_margin)
            .as_millis() as u64,
    );
    let mut argv = vec![fnx.display().to_string()];
    argv.extend(fnx_launcher::manager_args(&b));
    let rendered = script::render(&cfg.spec, block, &files, &argv)?;
    Ok((files, rendered))
}

fn write_script(path: &Path, text: &str) -> Result<(), BlockError> {
    use std::os::unix::fs::PermissionsExt;
    fn failed(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BlockError {
        let path = path.to_path_buf();
        move |source| BlockError::File { what, path, source }
    }
    let dir = path.parent().expect("a block file has a directory");
    std::fs::create_dir_all(dir).map_err(failed("create", dir))?;
    std::fs::write(path, text).map_err(failed("write", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .map_err(failed("make executable", path))
}

/// The marker of a block whose job has ended (not adopted after a restart).
const ENDED: &str = "ended";

fn mark_ended(marker: &Path) {
    if !marker.exists() {
        let _ = std::fs::write(marker, b"");
    }
}

/// One more than the highest `block-N` in the pool's run directory, so block numbers (and their
/// directories) are never reused across restarts.
fn next_block_number(run_dir: &Path) -> u64 {
    std::fs::read_dir(run_dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    e.file_name()
                        .to_str()
                        .and_then(|n| n.strip_prefix("block-"))
                        .and_then(|n| n.parse::<u64>().ok())
                })
                .map(|n| n + 1)
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

/// The last non-empty line of a file (a job's stderr), at most 300 characters.
fn last_line(path: &Path) -> Option<String> {
    let text = std::fs::read(path).ok()?;
    let start = text.len().saturating_sub(64 << 10);
    let text = String::from_utf8_lossy(&text[start..]);
    let line = text.lines().map(str::trim).rfind(|l| !l.is_empty())?;
    Some(line.chars().take(300).collect())
}
