//! Tenants: users whose tasks and managers never meet. Each tenant has its own state machine
//! ([`Interchange`]): its own queues, managers and dispatch, so a manager can only ever be
//! given tasks of the tenant it belongs to. The driver learns a manager's tenant from the
//! CurveZMQ key it authenticated with (the ZAP handler names the key's tenant), never from
//! what the manager says. The tenant `""` is the shared one: every task and manager of a
//! daemon in `service` mode, and of `fnx map`.
//!
//! Functions are known to every tenant that submits tasks of them; holds and failures of
//! functions (image builds) apply to every tenant, now and later.

use crate::state::{Comm, Config, Counts, Interchange, ManagerStatus, NewTask, Peer};
use fnx_protocol::{
    BlockId, FrameError, FunctionDef, FunctionId, ManagerToInterchange, TaskError, TaskId,
};
use std::collections::{HashMap, HashSet};
use std::time::Instant;

struct Tenant {
    ic: Interchange,
    functions: HashSet<FunctionId>,
}

/// Every tenant's state machine.
pub struct Tenants {
    config: Config,
    by_name: HashMap<String, Tenant>,
    functions: HashMap<FunctionId, FunctionDef>,
    held: HashSet<FunctionId>,
    failed: HashMap<FunctionId, TaskError>,
    created: u64,
    /// Deleted functions, forgotten once no task of theirs is left.
    doomed: HashSet<FunctionId>,
    swept: Option<Instant>,
}

/// How often deleted functions are looked for among the tasks.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

impl Tenants {
    /// No tenant yet.
    pub fn new(config: Config) -> Tenants {
        Tenants {
            config,
            by_name: HashMap::new(),
            functions: HashMap::new(),
            held: HashSet::new(),
            failed: HashMap::new(),
            created: 0,
            doomed: HashSet::new(),
            swept: None,
        }
    }

    /// A function was deleted: forget it (its definition, source included) once no task of it
    /// is queued or running in any tenant, looked for at the next [`Tenants::tick`] (at most
    /// every 5 s, one pass over the tasks for all deleted functions). New tasks of it are
    /// refused before they get here.
    pub fn remove_function(&mut self, id: FunctionId) {
        self.doomed.insert(id);
    }

    fn sweep(&mut self) {
        let mut used = HashSet::new();
        for t in self.by_name.values() {
            t.ic.used_functions(&mut used);
        }
        let gone: Vec<FunctionId> = self.doomed.difference(&used).copied().collect();
        for f in gone {
            self.doomed.remove(&f);
            self.functions.remove(&f);
            self.held.remove(&f);
            self.failed.remove(&f);
            for t in self.by_name.values_mut() {
                t.functions.remove(&f);
                t.ic.remove_function(f);
            }
        }
    }

    /// Function definitions held (shared, and per tenant).
    pub fn function_count(&self) -> usize {
        self.functions.len()
            + self
                .by_name
                .values()
                .map(|t| t.ic.function_count())
                .sum::<usize>()
    }

    fn tenant(&mut self, name: &str) -> &mut Tenant {
        if !self.by_name.contains_key(name) {
            // Manager ids stay unique across tenants: each tenant numbers from its own base.
            let mut ic = Interchange::new(self.config.clone());
            ic.set_first_manager_id((self.created << 32) + 1);
            self.created += 1;
            for &f in &self.held {
                ic.hold_function(f);
            }
            self.by_name.insert(
                name.to_string(),
                Tenant {
                    ic,
                    functions: HashSet::new(),
                },
            );
        }
        self.by_name.get_mut(name).expect("just inserted")
    }

    /// Make a function known (to the tenants that have it now, and to any that submits it).
    pub fn add_function(&mut self, def: FunctionDef) {
        for t in self.by_name.values_mut() {
            if t.functions.contains(&def.id) {
                t.ic.add_function(def.clone());
            }
        }
        self.functions.insert(def.id, def);
    }

    /// See [`Interchange::hold_function`]; for every tenant.
    pub fn hold_function(&mut self, id: FunctionId) {
        self.held.insert(id);
        self.failed.remove(&id);
        for t in self.by_name.values_mut() {
            t.ic.hold_function(id);
        }
    }

    /// See [`Interchange::release_function`]; for every tenant.
    pub fn release_function(&mut self, id: FunctionId) {
        self.held.remove(&id);
        self.failed.remove(&id);
        for t in self.by_name.values_mut() {
            t.ic.release_function(id);
        }
    }

    /// See [`Interchange::fail_function`]; for every tenant.
    pub fn fail_function(&mut self, id: FunctionId, error: TaskError, comm: &mut impl Comm) {
        self.held.remove(&id);
        self.failed.insert(id, error.clone());
        for t in self.by_name.values_mut() {
            t.ic.fail_function(id, error.clone(), comm);
        }
    }

    /// Accept tasks of `tenant`.
    pub fn submit(&mut self, tenant: &str, tasks: Vec<NewTask>, comm: &mut impl Comm) {
        self.tenant(tenant);
        let t = self.by_name.get_mut(tenant).expect("made above");
        // Functions the tenant has not seen yet, each once (a batch usually calls one).
        let mut new: Vec<FunctionId> = tasks
            .iter()
            .map(|task| task.function)
            .filter(|f| !t.functions.contains(f))
            .collect();
        new.sort_unstable();
        new.dedup();
        for id in new {
            let Some(def) = self.functions.get(&id) else {
                continue; // unknown: the state machine fails its tasks as bad input
            };
            t.functions.insert(id);
            t.ic.add_function(def.clone());
            if let Some(e) = self.failed.get(&id) {
                t.ic.fail_function(id, e.clone(), comm);
            }
        }
        t.ic.submit(tasks, comm);
    }

    /// Finish the undispatched tasks of `tenant` with `error` (the tenant may not run here).
    pub fn fail_queued(&mut self, tenant: &str, error: &TaskError, comm: &mut impl Comm) {
        if let Some(t) = self.by_name.get_mut(tenant) {
            t.ic.fail_queued(error, comm);
        }
    }

    /// Cancel tasks, whichever tenant holds them.
    pub fn cancel(&mut self, ids: &[TaskId], comm: &mut impl Comm) {
        for t in self.by_name.values_mut() {
            t.ic.cancel(ids, comm);
        }
    }

    /// A message from `peer`, authenticated as a manager of `tenant`.
    pub fn on_message(
        &mut self,
        tenant: &str,
        now: Instant,
        peer: &Peer,
        msg: ManagerToInterchange,
        comm: &mut impl Comm,
    ) {
        self.tenant(tenant).ic.on_message(now, peer, msg, comm);
    }

    /// Bytes from `peer` (of `tenant`) that could not be decoded.
    pub fn on_bad_frame(
        &mut self,
        tenant: &str,
        peer: &Peer,
        err: &FrameError,
        comm: &mut impl Comm,
    ) {
        self.tenant(tenant).ic.on_bad_frame(peer, err, comm);
    }

    /// Expire silent managers, in every tenant; forget deleted functions whose tasks ended.
    pub fn tick(&mut self, now: Instant, comm: &mut impl Comm) {
        for t in self.by_name.values_mut() {
            t.ic.tick(now, comm);
        }
        if !self.doomed.is_empty() && self.swept.is_none_or(|at| now >= at + SWEEP_EVERY) {
            self.swept = Some(now);
            self.sweep();
        }
    }

    /// Dispatch queued tasks, in every tenant.
    pub fn dispatch(&mut self, comm: &mut impl Comm) {
        for t in self.by_name.values_mut() {
            t.ic.dispatch(comm);
        }
    }

    /// A peer cannot be reached any more.
    pub fn peer_unreachable(&mut self, peer: &Peer, comm: &mut impl Comm) {
        for t in self.by_name.values_mut() {
            t.ic.peer_unreachable(peer, comm);
        }
    }

    /// The manager launched as `uid` has ended.
    pub fn manager_gone(&mut self, uid: &str, reason: &str, comm: &mut impl Comm) {
        for t in self.by_name.values_mut() {
            t.ic.manager_gone(uid, reason, comm);
        }
    }

    /// Drain the manager launched as `uid`, whichever tenant it serves.
    pub fn drain_named(&mut self, uid: &str, comm: &mut impl Comm) {
        for t in self.by_name.values_mut() {
            t.ic.drain_named(uid, comm);
        }
    }

    /// Drain every manager of a block.
    pub fn drain_block(&mut self, block: BlockId, comm: &mut impl Comm) {
        for t in self.by_name.values_mut() {
            t.ic.drain_block(block, comm);
        }
    }

    /// Tell every manager of every tenant to exit now.
    pub fn shutdown_all(&mut self, reason: &str, comm: &mut impl Comm) {
        for t in self.by_name.values_mut() {
            t.ic.shutdown_all(reason, comm);
        }
    }

    /// Counts over every tenant.
    pub fn counts(&self) -> Counts {
        self.by_name
            .values()
            .map(|t| t.ic.counts())
            .fold(Counts::default(), |a, c| Counts {
                queued: a.queued + c.queued,
                held: a.held + c.held,
                running: a.running + c.running,
                managers: a.managers + c.managers,
                slots: a.slots + c.slots,
            })
    }

    /// Counts of each tenant.
    pub fn tenant_counts(&self) -> Vec<(String, Counts)> {
        let mut out: Vec<(String, Counts)> = self
            .by_name
            .iter()
            .map(|(n, t)| (n.clone(), t.ic.counts()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Every tenant's managers, each with its tenant.
    pub fn managers(&self, now: Instant) -> Vec<ManagerStatus> {
        let mut out: Vec<ManagerStatus> = self
            .by_name
            .iter()
            .flat_map(|(n, t)| {
                t.ic.managers(now).into_iter().map(move |mut m| {
                    m.tenant = n.clone();
                    m
                })
            })
            .collect();
        out.sort_by_key(|m| m.id);
        out
    }
}
