//! The scaling rules of a batch pool, as a pure state machine: what the interchange and the
//! batch system report goes in, [`Action`]s come out. `blocks.rs` carries them out.
//!
//! Rules (after Parsl's `simple` strategy, with draining instead of killing):
//! - fewer than `min_blocks` active blocks → submit;
//! - `slots < tasks × parallelism` → submit enough blocks to cover the gap, up to `max_blocks`;
//! - a block whose managers held no task for `max_idletime` is drained (never cancelled while
//!   it runs tasks), down to `min_blocks`; a pending block nobody needs is cancelled;
//! - a job that ends while its block was not draining takes its managers with it: they are
//!   reported gone at once so their tasks are retried elsewhere;
//! - unexpected ends back off submissions (5 s doubling to 5 min); `max_failed_blocks` blocks
//!   in a row that end (or fail to submit) without any manager connecting mark the pool failed
//!   until a manager connects.

use crate::config::BlocksConfig;
use fnx_interchange::ManagerStatus;
use fnx_launcher::provider::JobState;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a drained block's job may take to end before it is cancelled.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// A job the scheduler does not know yet is given this long before it counts as gone.
const UNKNOWN_GRACE: Duration = Duration::from_secs(30);
const BACKOFF_FIRST: Duration = Duration::from_secs(5);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
const ENDED_KEPT: usize = 20;

/// Where a block is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Submitted; no manager has connected yet.
    Pending,
    /// Managers connected.
    Running,
    /// Being drained (scale-in): its managers finish their tasks and exit.
    Draining,
    /// The job ended.
    Ended,
}

impl Phase {
    /// Its name in the API.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Running => "running",
            Phase::Draining => "draining",
            Phase::Ended => "ended",
        }
    }
}

/// One block, as the status endpoint shows it.
#[derive(Clone, Debug, Serialize)]
pub struct Block {
    /// Block number (unique within the pool's run directory).
    pub id: u64,
    /// The scheduler's job id.
    pub job: String,
    /// Phase.
    pub phase: Phase,
    /// The scheduler's last word on the job (PENDING, RUNNING, COMPLETED, ...).
    pub job_state: String,
    /// Managers connected now.
    pub managers: usize,
    /// The block's run directory (batch script, job output, manager logs).
    pub dir: PathBuf,
    /// The job's stderr file.
    pub stderr: PathBuf,
    #[serde(skip)]
    submitted: Instant,
    #[serde(skip)]
    connected: bool,
    #[serde(skip)]
    busy_at: Instant,
    #[serde(skip)]
    drain_since: Option<Instant>,
    #[serde(skip)]
    cancelled: bool,
    #[serde(skip)]
    uids: Vec<String>,
    #[serde(skip)]
    seen: bool,
    #[serde(skip)]
    running_since: Option<Instant>,
    #[serde(skip)]
    timed_out: bool,
    #[serde(skip)]
    adopted: bool,
}

/// What the scaler wants done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Submit this many new blocks.
    Submit(u32),
    /// Drain the managers of a block.
    Drain(u64),
    /// Cancel jobs (block, job id).
    Cancel(Vec<(u64, String)>),
    /// These managers died with their job; retry their tasks now.
    ManagersGone(Vec<String>, String),
}

/// A batch pool's blocks and scaling state.
pub struct Scaler {
    pool: String,
    cfg: BlocksConfig,
    /// Slots a manager of this pool has (configured, or the largest seen).
    slots_per_manager: u32,
    blocks: BTreeMap<u64, Block>,
    ended: Vec<Block>,
    idle_since: Option<Instant>,
    failures_in_row: u32,
    failed: Option<String>,
    /// Why the last submission failed, until one succeeds.
    submit_error: Option<String>,
    backoff: Duration,
    not_before: Option<Instant>,
    started: bool,
}

impl Scaler {
    /// A scaler for pool `pool`; `slots` is its configured workers per manager.
    pub fn new(pool: &str, cfg: BlocksConfig, slots: Option<u32>) -> Scaler {
        Scaler {
            pool: pool.to_string(),
            cfg,
            slots_per_manager: slots.unwrap_or(1).max(1),
            blocks: BTreeMap::new(),
            ended: Vec::new(),
            idle_since: None,
            failures_in_row: 0,
            failed: None,
            submit_error: None,
            backoff: BACKOFF_FIRST,
            not_before: None,
            started: false,
        }
    }

    /// Why the pool cannot get managers, if it is marked failed.
    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Why the last block could not be submitted, until a submission succeeds: shown before
    /// the pool is marked failed, and when no task is queued to make it try again.
    pub fn submit_error(&self) -> Option<&str> {
        self.submit_error.as_deref()
    }

    /// Live blocks, then the most recently ended ones.
    pub fn blocks(&self) -> Vec<Block> {
        let mut v: Vec<Block> = self.blocks.values().cloned().collect();
        v.extend(self.ended.iter().rev().cloned());
        v
    }

    /// Job ids of blocks whose jobs have not ended.
    pub fn live_jobs(&self) -> Vec<String> {
        self.blocks.values().map(|b| b.job.clone()).collect()
    }

    /// A block was submitted as job `job`.
    pub fn submitted(&mut self, now: Instant, id: u64, job: String, dir: &Path, stderr: &Path) {
        self.submit_error = None;
        self.blocks.insert(
            id,
            Block {
                id,
                job,
                phase: Phase::Pending,
                job_state: "SUBMITTED".into(),
                managers: 0,
                dir: dir.to_path_buf(),
                stderr: stderr.to_path_buf(),
                submitted: now,
                connected: false,
                busy_at: now,
                drain_since: None,
                cancelled: false,
                uids: Vec::new(),
                seen: false,
                running_since: None,
                timed_out: false,
                adopted: false,
            },
        );
    }

    /// A block submitted before a restart whose job the scheduler still lists: it is counted
    /// again, and its managers (which register again) are scaled like any other.
    pub fn adopt(&mut self, now: Instant, id: u64, job: String, dir: &Path, stderr: &Path) {
        self.submitted(now, id, job, dir, stderr);
        if let Some(b) = self.blocks.get_mut(&id) {
            b.seen = true;
            b.adopted = true;
            b.job_state = "ADOPTED".into();
        }
    }

    /// A submission failed.
    pub fn submit_failed(&mut self, now: Instant, error: &str) {
        self.submit_error = Some(error.to_string());
        self.failures_in_row += 1;
        self.back_off(now);
        if self.failures_in_row >= self.cfg.max_failed_blocks {
            self.failed = Some(format!(
                "pool {}: {} blocks in a row failed to start; the last could not be submitted: \
                 {error}",
                self.pool, self.failures_in_row
            ));
        }
    }

    fn back_off(&mut self, now: Instant) {
        self.not_before = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    /// Decide, given the pool's queued and running tasks and its managers.
    pub fn tick(
        &mut self,
        now: Instant,
        queued: usize,
        running: usize,
        managers: &[ManagerStatus],
    ) -> Vec<Action> {
        let tasks = queued + running;
        let mut actions = Vec::new();
        let mut redrain = Vec::new();
        for b in self.blocks.values_mut() {
            let mine: Vec<&ManagerStatus> = managers
                .iter()
                .filter(|m| m.block_id.map(|x| x.0) == Some(b.id))
                .collect();
            b.managers = mine.len();
            if !mine.is_empty() {
                b.uids = mine.iter().map(|m| m.uid.clone()).collect();
                if !b.connected {
                    b.connected = true;
                    b.busy_at = now;
                    self.failures_in_row = 0;
                    self.failed = None;
                    self.backoff = BACKOFF_FIRST;
                    self.not_before = None;
                }
                if b.phase == Phase::Pending {
                    b.phase = Phase::Running;
                }
                // Managers drain themselves before the walltime ends: the block is on its way
                // out, and a replacement may be needed.
                if b.phase == Phase::Running && mine.iter().all(|m| m.draining) {
                    b.phase = Phase::Draining;
                    b.drain_since = Some(now);
                }
            }
            if mine.is_empty() && b.connected && b.phase == Phase::Running {
                // Its managers left (drained themselves, or exited): the block is on its way
                // out and no longer counts as capacity.
                b.phase = Phase::Draining;
                b.drain_since = Some(now);
            }
            if b.phase == Phase::Draining && mine.iter().any(|m| !m.draining) {
                // Managers that registered after the drain (a cancelled job that started
                // anyway, a late node) are drained too.
                redrain.push(b.id);
            }
            if mine.iter().any(|m| m.inflight > 0) {
                b.busy_at = now;
            }
            for m in &mine {
                self.slots_per_manager = self.slots_per_manager.max(m.slots);
            }
        }
        actions.extend(redrain.into_iter().map(Action::Drain));
        if tasks == 0 {
            self.idle_since.get_or_insert(now);
        } else {
            self.idle_since = None;
        }
        let active = self
            .blocks
            .values()
            .filter(|b| matches!(b.phase, Phase::Pending | Phase::Running))
            .count() as u32;
        let per_block = (self.cfg.spec.nodes * self.slots_per_manager).max(1) as f64;
        let mut want = 0u32;
        if !self.started {
            self.started = true;
            // Blocks adopted from an earlier run count towards the initial ones.
            want = self
                .cfg
                .init_blocks
                .max(self.cfg.min_blocks)
                .saturating_sub(active);
        }
        want = want.max(self.cfg.min_blocks.saturating_sub(active));
        let needed = tasks as f64 * self.cfg.parallelism;
        let slots = active as f64 * per_block;
        if tasks > 0 && slots < needed {
            want = want.max(((needed - slots) / per_block).ceil() as u32);
        }
        let want = want.min(self.cfg.max_blocks.saturating_sub(active));
        let may_submit = self.not_before.is_none_or(|t| now >= t);
        if want > 0 && may_submit {
            actions.push(Action::Submit(want));
        }
        // Scale in: idle blocks above min_blocks, pending ones nobody waits for.
        let idle_for = self.cfg.max_idletime;
        let mut keep = active;
        let pool_idle = self
            .idle_since
            .is_some_and(|t| now.duration_since(t) >= idle_for);
        let mut cancel = Vec::new();
        for b in self.blocks.values_mut() {
            if keep <= self.cfg.min_blocks {
                break;
            }
            match b.phase {
                Phase::Running if now.duration_since(b.busy_at) >= idle_for && queued == 0 => {
                    b.phase = Phase::Draining;
                    b.drain_since = Some(now);
                    keep -= 1;
                    actions.push(Action::Drain(b.id));
                }
                Phase::Pending if pool_idle => {
                    b.phase = Phase::Draining;
                    b.drain_since = Some(now);
                    b.cancelled = true;
                    keep -= 1;
                    cancel.push((b.id, b.job.clone()));
                }
                _ => {}
            }
        }
        // A job that runs without any manager connecting (a launcher that hangs, managers that
        // cannot reach the interchange) is cancelled, and counts as a block that never connected.
        for b in self.blocks.values_mut() {
            if b.phase == Phase::Pending
                && !b.cancelled
                && b.running_since
                    .is_some_and(|t| now.duration_since(t) >= self.cfg.connect_timeout)
            {
                b.cancelled = true;
                b.timed_out = true;
                cancel.push((b.id, b.job.clone()));
            }
        }
        // Drained blocks whose jobs linger are cancelled (they hold no task).
        for b in self.blocks.values_mut() {
            if b.phase == Phase::Draining
                && !b.cancelled
                && b.drain_since
                    .is_some_and(|t| now.duration_since(t) >= DRAIN_TIMEOUT)
                && b.managers == 0
            {
                b.cancelled = true;
                cancel.push((b.id, b.job.clone()));
            }
        }
        if !cancel.is_empty() {
            actions.push(Action::Cancel(cancel));
        }
        actions
    }

    /// The scheduler's job states; `stderr_tail` reads the last line of a job's stderr.
    pub fn job_states(
        &mut self,
        now: Instant,
        states: &std::collections::HashMap<String, JobState>,
        stderr_tail: impl Fn(&Path) -> Option<String>,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        let mut ended = Vec::new();
        for b in self.blocks.values_mut() {
            let Some(state) = states.get(&b.job) else {
                continue;
            };
            let final_state = match state {
                JobState::Pending => {
                    b.seen = true;
                    b.job_state = "PENDING".into();
                    None
                }
                JobState::Running => {
                    b.seen = true;
                    b.job_state = "RUNNING".into();
                    b.running_since.get_or_insert(now);
                    None
                }
                JobState::Ended(s) => Some(s.clone()),
                JobState::Unknown if b.seen || now.duration_since(b.submitted) > UNKNOWN_GRACE => {
                    Some("GONE".to_string())
                }
                JobState::Unknown => None,
            };
            if let Some(s) = final_state {
                b.job_state = s;
                ended.push(b.id);
            }
        }
        for id in ended {
            let mut b = self.blocks.remove(&id).expect("listed above");
            let expected = ((b.phase == Phase::Draining || b.cancelled) && !b.timed_out)
                || b.adopted && !b.connected;
            if b.timed_out {
                b.job_state = format!(
                    "{}, cancelled: no manager connected within {}s of its start",
                    b.job_state,
                    self.cfg.connect_timeout.as_secs()
                );
            }
            if b.managers > 0 {
                actions.push(Action::ManagersGone(
                    b.uids.clone(),
                    format!(
                        "its batch job {} (block {}) ended ({})",
                        b.job, b.id, b.job_state
                    ),
                ));
            }
            if !expected {
                self.back_off(now);
                if !b.connected {
                    self.failures_in_row += 1;
                    if self.failures_in_row >= self.cfg.max_failed_blocks {
                        let tail = stderr_tail(&b.stderr)
                            .map(|t| format!("; its last line: {t:?}"))
                            .unwrap_or_default();
                        self.failed = Some(format!(
                            "pool {}: {} blocks in a row ended without any manager connecting; \
                             the last, block {} (job {}, {}), wrote its errors to {}{tail} \
                             (manager logs, if any: {}/block-{}.*/manager.log)",
                            self.pool,
                            self.failures_in_row,
                            b.id,
                            b.job,
                            b.job_state,
                            b.stderr.display(),
                            b.dir.display(),
                            b.id
                        ));
                    }
                }
            }
            b.phase = Phase::Ended;
            b.managers = 0;
            self.ended.push(b);
            if self.ended.len() > ENDED_KEPT {
                self.ended.remove(0);
            }
        }
        actions
    }

    /// Every live block, now ended (for the daemon's stop: their jobs are cancelled).
    pub fn cancel_all(&mut self) -> Vec<(u64, String)> {
        let all = std::mem::take(&mut self.blocks);
        all.into_values()
            .map(|mut b| {
                let out = (b.id, b.job.clone());
                b.cancelled = true;
                b.phase = Phase::Ended;
                self.ended.push(b);
                out
            })
            .collect()
    }

    /// An admin drains block `id` (false: no such live block).
    pub fn force_drain(&mut self, id: u64, now: Instant) -> bool {
        match self.blocks.get_mut(&id) {
            Some(b) => {
                if b.phase != Phase::Draining {
                    b.phase = Phase::Draining;
                    b.drain_since = Some(now);
                }
                true
            }
            None => false,
        }
    }

    /// An admin cancels block `id`: its job id (None: no such live block). Its end is expected
    /// (no backoff, no failure); managers still connected then are reported gone.
    pub fn force_cancel(&mut self, id: u64) -> Option<String> {
        let b = self.blocks.get_mut(&id)?;
        b.cancelled = true;
        b.phase = Phase::Draining;
        b.drain_since.get_or_insert_with(Instant::now);
        Some(b.job.clone())
    }

    /// Whether block `id`'s job is still tracked (not ended).
    pub fn is_live(&self, id: u64) -> bool {
        self.blocks.contains_key(&id)
    }

    /// A cancel request failed: the blocks are cancelled again at the next chance.
    pub fn cancel_failed(&mut self, list: &[(u64, String)]) {
        for (id, _) in list {
            if let Some(b) = self.blocks.get_mut(id) {
                b.cancelled = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BlocksConfig, Connect};
    use fnx_launcher::{BlockSpec, Launcher, Provider};
    use fnx_protocol::{BlockId, ManagerId};
    use std::collections::HashMap;

    fn cfg(min: u32, max: u32) -> BlocksConfig {
        let mut spec = BlockSpec::new("p", Provider::Slurm, Launcher::Srun);
        spec.nodes = 2;
        BlocksConfig {
            spec,
            init_blocks: 0,
            min_blocks: min,
            max_blocks: max,
            parallelism: 1.0,
            max_idletime: Duration::from_secs(10),
            drain_margin: Duration::from_secs(60),
            connect: Connect::Interchange,
            fnx_path: None,
            poll_interval: Duration::from_secs(1),
            scaling_interval: Duration::from_secs(1),
            max_failed_blocks: 2,
            submit_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(20),
        }
    }

    fn manager(block: u64, rank: u32, inflight: usize) -> ManagerStatus {
        ManagerStatus {
            id: ManagerId(block * 10 + rank as u64),
            uid: format!("block-{block}.{rank}"),
            host: format!("n{rank}"),
            block_id: Some(BlockId(block)),
            slots: 2,
            inflight,
            completed: 0,
            draining: false,
            idle_for: None,
            workers: Vec::new(),
            tenant: String::new(),
        }
    }

    fn submit(s: &mut Scaler, now: Instant, id: u64) {
        s.submitted(
            now,
            id,
            format!("{}", 100 + id),
            Path::new("/b"),
            Path::new("/b/job.err"),
        );
    }

    #[test]
    fn scales_out_with_load_up_to_max_blocks() {
        let t0 = Instant::now();
        let mut s = Scaler::new("p", cfg(0, 3), Some(2));
        assert_eq!(s.tick(t0, 0, 0, &[]), vec![]);
        // 10 tasks, 4 slots per block (2 nodes × 2) → 3 blocks, capped at max 3.
        assert_eq!(s.tick(t0, 10, 0, &[]), vec![Action::Submit(3)]);
        submit(&mut s, t0, 0);
        // One block pending covers 4 of 5 tasks → one more.
        let mut s = Scaler::new("p", cfg(0, 3), Some(2));
        submit(&mut s, t0, 0);
        assert_eq!(s.tick(t0, 5, 0, &[]), vec![Action::Submit(1)]);
    }

    #[test]
    fn idle_blocks_drain_down_to_min_blocks_and_busy_ones_stay() {
        let t0 = Instant::now();
        let mut s = Scaler::new("p", cfg(1, 3), Some(2));
        for id in 0..3 {
            submit(&mut s, t0, id);
        }
        let ms = vec![
            manager(0, 0, 0),
            manager(0, 1, 0),
            manager(1, 0, 1),
            manager(2, 0, 0),
        ];
        assert_eq!(s.tick(t0, 0, 1, &ms), vec![]);
        let later = t0 + Duration::from_secs(11);
        let ms = vec![
            manager(0, 0, 0),
            manager(0, 1, 0),
            manager(1, 0, 1),
            manager(2, 0, 0),
        ];
        let acts = s.tick(later, 0, 1, &ms);
        // Blocks 0 and 2 are idle; block 1 runs a task. Both idle ones may go (3 active, min 1).
        assert_eq!(acts, vec![Action::Drain(0), Action::Drain(2)]);
        // Block 0's managers are released; block 2's still finish (draining).
        let mut draining = manager(2, 0, 1);
        draining.draining = true;
        let ms = vec![manager(1, 0, 1), draining];
        assert_eq!(s.tick(later, 0, 2, &ms), vec![]);
        // A drained job that ends is expected: no managers lost, no backoff.
        let states: HashMap<String, JobState> =
            [("100".to_string(), JobState::Ended("COMPLETED".into()))].into();
        assert_eq!(s.job_states(later, &states, |_| None), vec![]);
        assert!(s.failed().is_none());
        assert_eq!(
            s.tick(later, 5, 2, &ms),
            vec![Action::Submit(1)],
            "no backoff"
        );
        // A draining block's job that ends under a busy manager (its walltime) reports it gone,
        // so its task is retried at once.
        let states: HashMap<String, JobState> =
            [("102".to_string(), JobState::Ended("TIMEOUT".into()))].into();
        assert_eq!(
            s.job_states(later, &states, |_| None),
            vec![Action::ManagersGone(
                vec!["block-2.0".into()],
                "its batch job 102 (block 2) ended (TIMEOUT)".into()
            )]
        );
    }

    #[test]
    fn a_job_ending_under_its_managers_reports_them_gone() {
        let t0 = Instant::now();
        let mut s = Scaler::new("p", cfg(0, 2), Some(2));
        submit(&mut s, t0, 4);
        s.tick(t0, 0, 2, &[manager(4, 0, 1), manager(4, 1, 1)]);
        let states: HashMap<String, JobState> =
            [("104".to_string(), JobState::Ended("CANCELLED".into()))].into();
        let acts = s.job_states(t0, &states, |_| None);
        assert_eq!(
            acts,
            vec![Action::ManagersGone(
                vec!["block-4.0".into(), "block-4.1".into()],
                "its batch job 104 (block 4) ended (CANCELLED)".into()
            )]
        );
        // Replacement waits for the backoff.
        assert_eq!(s.tick(t0, 2, 0, &[]), vec![]);
        assert_eq!(
            s.tick(t0 + Duration::from_secs(6), 2, 0, &[]),
            vec![Action::Submit(1)]
        );
    }

    #[test]
    fn blocks_that_never_connect_mark_the_pool_failed_until_one_does() {
        let t0 = Instant::now();
        let mut s = Scaler::new("p", cfg(0, 1), Some(2));
        for id in 0..2 {
            submit(&mut s, t0, id);
            let states: HashMap<String, JobState> =
                [(format!("{}", 100 + id), JobState::Ended("FAILED".into()))].into();
            s.job_states(t0, &states, |p| Some(format!("tail of {}", p.display())));
        }
        let why = s.failed().expect("failed").to_string();
        assert!(why.contains("2 blocks in a row"), "{why}");
        assert!(why.contains("/b/job.err"), "{why}");
        assert!(why.contains("tail of /b/job.err"), "{why}");
        submit(&mut s, t0, 2);
        s.tick(t0, 1, 0, &[manager(2, 0, 1)]);
        assert!(s.failed().is_none());
    }

    #[test]
    fn blocks_draining_before_their_walltime_are_replaced() {
        let t0 = Instant::now();
        let mut s = Scaler::new("p", cfg(0, 2), Some(2));
        submit(&mut s, t0, 0);
        let mut ms = vec![manager(0, 0, 1), manager(0, 1, 1)];
        assert_eq!(s.tick(t0, 2, 2, &ms), vec![]);
        for m in &mut ms {
            m.draining = true;
        }
        assert_eq!(s.tick(t0, 2, 2, &ms), vec![Action::Submit(1)]);
        assert_eq!(s.blocks()[0].phase, Phase::Draining);
    }

    #[test]
    fn a_running_job_without_managers_is_cancelled_and_counts_as_failed() {
        let t0 = Instant::now();
        let mut s = Scaler::new("p", cfg(0, 1), Some(2));
        submit(&mut s, t0, 0);
        let running: HashMap<String, JobState> = [("100".to_string(), JobState::Running)].into();
        s.job_states(t0, &running, |_| None);
        assert_eq!(s.tick(t0 + Duration::from_secs(5), 1, 0, &[]), vec![]);
        let acts = s.tick(t0 + Duration::from_secs(21), 1, 0, &[]);
        assert_eq!(acts, vec![Action::Cancel(vec![(0, "100".into())])]);
        let ended: HashMap<String, JobState> =
            [("100".to_string(), JobState::Ended("CANCELLED".into()))].into();
        s.job_states(t0 + Duration::from_secs(22), &ended, |_| None);
        let b = &s.blocks()[0];
        assert!(
            b.job_state.contains("no manager connected within 20s"),
            "{}",
            b.job_state
        );
        assert_eq!(s.failures_in_row, 1);
    }

    #[test]
    fn adopted_blocks_count_towards_init_and_min_blocks() {
        let t0 = Instant::now();
        let mut c = cfg(1, 3);
        c.init_blocks = 2;
        let mut s = Scaler::new("p", c, Some(2));
        s.adopt(
            t0,
            5,
            "105".into(),
            Path::new("/b"),
            Path::new("/b/job.err"),
        );
        assert_eq!(s.tick(t0, 0, 0, &[]), vec![Action::Submit(1)]);
    }

    #[test]
    fn unknown_jobs_get_a_grace_period_and_pending_ones_are_cancelled_when_idle() {
        let t0 = Instant::now();
        let mut s = Scaler::new("p", cfg(0, 1), Some(2));
        submit(&mut s, t0, 0);
        let states: HashMap<String, JobState> = [("100".to_string(), JobState::Unknown)].into();
        assert_eq!(s.job_states(t0, &states, |_| None), vec![]);
        assert_eq!(s.live_jobs(), vec!["100".to_string()]);
        s.tick(t0, 0, 0, &[]);
        let acts = s.tick(t0 + Duration::from_secs(11), 0, 0, &[]);
        assert_eq!(acts, vec![Action::Cancel(vec![(0, "100".into())])]);
    }
}
