//! Container images built from a function's dependencies, cached by content.
//!
//! ```text
//! <dir>/<key>/    key: SHA-256 of image.def (recipe::key)
//!     image.def   the Apptainer definition, written once
//!     image.sif   the image (image.sif.part while a build writes it)
//!     build.log   every build's output, each after a `# fnx: [argv]` line
//!     state.json  the last build: building / ready / failed, its error and times
//! ```
//!
//! Requests and watchers of a key being built join its build: one at a time per key in this
//! process, each on a thread of its own, killed with its process group at the timeout.

pub mod recipe;
pub use recipe::Deps;

use serde::Serialize;
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use thiserror::Error;
use BuildState::{Building, Failed, Ready};

/// How images are built.
#[derive(Clone, Debug)]
pub struct BuildConfig {
    /// The cache directory: one subdirectory per key.
    pub dir: PathBuf,
    /// The build command's words before OUTPUT and DEFINITION: `apptainer build --fakeroot`.
    pub command: Vec<String>,
    /// The base image (Docker reference) of the definition files.
    pub base: String,
    /// Longest a build may run before it is killed and marked failed.
    pub timeout: Duration,
    /// Builds that run at once; later ones wait for a slot (still `building`).
    pub max_running: usize,
    /// Builds one user's requests may have started and not finished.
    pub max_per_user: usize,
}

/// Where the build of a key stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildState {
    /// A build runs (read from disk with none in this process: one was interrupted).
    Building,
    /// The image exists.
    Ready,
    /// The last build failed; a new request builds again.
    Failed,
}

/// What is known of one build.
#[derive(Clone, Debug, Serialize)]
pub struct BuildInfo {
    /// The cache key: SHA-256 (hex) of the definition file.
    pub key: String,
    /// Where the build stands.
    pub state: BuildState,
    /// The image: `<dir>/<key>/image.sif`.
    pub image: PathBuf,
    /// The definition file: `<dir>/<key>/image.def`.
    pub definition: PathBuf,
    /// The build log: `<dir>/<key>/build.log`.
    pub log: PathBuf,
    /// Why it failed: `COMMAND exited with status 1: <its last output line>`, `timed out...`
    pub error: Option<String>,
    /// When the last build started (unix seconds).
    pub started: Option<f64>,
    /// When the last build ended (unix seconds).
    pub finished: Option<f64>,
}

/// A build cannot be requested.
#[derive(Debug, Error)]
pub enum BuildError {
    /// The configured base image is not a plain Docker reference (why).
    #[error("the image build configuration: {0}")]
    Base(crate::invalid::Invalid),
    /// A directory or file of the cache cannot be created or written (which, and why).
    #[error("cannot write {path}: {source}", path = .0.display(), source = .1)]
    Io(PathBuf, std::io::Error),
    /// The user has this many builds under way already.
    #[error(
        "you have {0} image builds under way, the most one user may (builds.max_per_user); \
         register again once one has finished"
    )]
    UserLimit(usize),
}

/// Why an image build failed (kept, as text, in its `state.json`).
#[derive(Debug, Error)]
pub enum BuildFailure {
    /// No thread for it.
    #[error("cannot start a thread for the build: {0}")]
    Thread(std::io::Error),
    /// Its log cannot be written.
    #[error("cannot write to {path}: {source}", path = .path.display())]
    Log {
        /// The log.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The build program cannot be started.
    #[error("cannot run the image build program {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// It ran longer than `builds.timeout_s`.
    #[error("timed out after {0} s")]
    Timeout(f64),
    /// Its end could not be waited for.
    #[error("cannot wait for {program}: {source}")]
    Wait {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// It failed: its exit status or signal, and the last line of its log.
    #[error("{command} {how}{}", last.as_ref().map(|l| format!(": {l}")).unwrap_or_default())]
    Failed {
        /// The build command.
        command: String,
        /// `exited with status 3`, `was killed by signal 9`.
        how: String,
        /// The last line it logged.
        last: Option<String>,
    },
    /// It succeeded without writing the image.
    #[error("{0} exited 0 but wrote no image")]
    NoImage(String),
    /// The image cannot be moved into place.
    #[error("cannot rename {from} to {to}: {source}", from = .from.display(), to = .to.display())]
    Rename {
        /// The image being written.
        from: PathBuf,
        /// Where it goes.
        to: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The daemon cannot build images: the build program is not there.
#[derive(Debug, Error)]
#[error("the build program {program:?} was not found on PATH")]
pub struct NoBuildProgram {
    /// The program (`builds.command`'s first word).
    pub program: String,
}

/// A watcher, called once when the build it waits for has ended.
type Done = Box<dyn FnOnce(&BuildInfo) + Send>;

struct Entry {
    info: BuildInfo,
    /// The watchers of a running build (empty otherwise).
    waiting: Vec<Done>,
}

/// The cache of built images; cheap to clone (`Arc`s inside), shared by the API and the store
/// writer.
#[derive(Clone)]
pub struct Builds {
    cfg: Arc<BuildConfig>,
    entries: Arc<Mutex<HashMap<String, Entry>>>,
    /// Process groups of the builds running now, and whether the daemon is stopping them.
    running: Arc<Mutex<(std::collections::HashSet<u32>, bool)>>,
    /// Free build slots (of `max_running`); a build thread waits on the condition for one.
    slots: Arc<(Mutex<usize>, std::sync::Condvar)>,
    /// Per user, the keys of the builds their requests started that have not finished.
    by_user: Arc<Mutex<HashMap<String, Vec<String>>>>,
}

impl Builds {
    /// A cache over `cfg.dir` (created by the first request).
    pub fn new(cfg: BuildConfig) -> Builds {
        let slots = Arc::new((
            Mutex::new(cfg.max_running.max(1)),
            std::sync::Condvar::new(),
        ));
        let (cfg, entries) = (Arc::new(cfg), Arc::default());
        let running = Arc::default();
        Builds {
            cfg,
            entries,
            running,
            slots,
            by_user: Arc::default(),
        }
    }

    /// Kill the running builds (the daemon stops). Their state stays "building" on disk, so
    /// the next start of the daemon builds them again; their watchers are not called.
    pub fn stop_all(&self) {
        let groups: Vec<u32> = {
            let mut r = self.running.lock().unwrap_or_else(PoisonError::into_inner);
            r.1 = true;
            r.0.iter().copied().collect()
        };
        self.slots.1.notify_all();
        for pgid in groups {
            tracing::info!("stopping image build process group {pgid}: the daemon stops");
            fnx_sys::process::terminate_group(pgid, Duration::from_secs(2));
        }
    }

    /// Wait for a free build slot; false if the daemon stops meanwhile.
    fn take_slot(&self, key: &str) -> bool {
        let (free, cv) = &*self.slots;
        let mut free = free.lock().unwrap_or_else(PoisonError::into_inner);
        let mut told = false;
        loop {
            if self
                .running
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .1
            {
                return false;
            }
            if *free > 0 {
                *free -= 1;
                return true;
            }
            if !told {
                tracing::info!(
                    key = &key[..12],
                    "image build waits: {} builds run already (builds.max_running)",
                    self.cfg.max_running
                );
                told = true;
            }
            free = cv
                .wait_timeout(free, Duration::from_secs(1))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn give_slot(&self) {
        let (free, cv) = &*self.slots;
        *free.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        cv.notify_one();
    }

    /// The build command's program (`command[0]`) is on PATH, or is an existing executable
    /// path. Used to refuse registrations on a daemon that cannot build.
    pub fn can_build(&self) -> Result<(), NoBuildProgram> {
        let program = self.cfg.command.first().map_or("", String::as_str);
        let runnable = |p: &Path| {
            let meta = p.metadata();
            meta.is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        };
        let path = std::env::var_os("PATH").unwrap_or_default();
        let found = match program.contains('/') {
            true => runnable(Path::new(program)),
            false => std::env::split_paths(&path).any(|d| runnable(&d.join(program))),
        };
        match found {
            true => Ok(()),
            false => Err(NoBuildProgram {
                program: program.to_string(),
            }),
        }
    }

    /// The build command's words (before OUTPUT and DEFINITION).
    pub fn command(&self) -> &[String] {
        &self.cfg.command
    }

    /// Write the definition for `deps` into the cache if new and start its build, unless the
    /// image exists (Ready) or a build of this key runs in this process (joined). A key whose
    /// last build failed is built again. Returns the current info.
    ///
    /// `user`'s requests may have started at most `max_per_user` builds that have not ended;
    /// joining a running build or finding an image is always allowed.
    pub fn request(&self, deps: &Deps, user: &str) -> Result<BuildInfo, BuildError> {
        recipe::check_base(&self.cfg.base).map_err(BuildError::Base)?;
        let text = recipe::definition(deps, &self.cfg.base);
        let key = recipe::key(&text);
        let def = self.blank(&key, Building).definition;
        let dir = self.cfg.dir.join(&key);
        fs::create_dir_all(&dir).map_err(|e| BuildError::Io(dir, e))?;
        if !def.is_file() {
            write_atomic(&def, text.as_bytes()).map_err(|e| BuildError::Io(def, e))?;
        }
        self.join(&key, true, None, Some(user))
    }

    /// Call `done` once the build of `key` has ended (at once, on this thread, if it already
    /// has). A key this process has not seen is looked up on disk: `image.sif` present →
    /// Ready; a `state.json` saying failed → Failed; a definition without either (a build
    /// interrupted by a restart) → its build starts again. An unknown key → Failed, with the
    /// error "no build with key K".
    pub fn watch(&self, key: &str, done: Box<dyn FnOnce(&BuildInfo) + Send>) {
        let _ = self.join(key, false, Some(done), None);
    }

    /// What is known of `key` (memory, else disk), or None.
    pub fn info(&self, key: &str) -> Option<BuildInfo> {
        let known = self.lock().get(key).map(|e| e.info.clone());
        known.or_else(|| self.on_disk(key))
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The info of `key` with nothing known yet.
    fn blank(&self, key: &str, state: BuildState) -> BuildInfo {
        let dir = self.cfg.dir.join(key);
        BuildInfo {
            key: key.to_string(),
            state,
            image: dir.join("image.sif"),
            definition: dir.join("image.def"),
            log: dir.join("build.log"),
            error: None,
            started: None,
            finished: None,
        }
    }

    /// What the cache directory says of `key`: Ready (an image), Failed (state.json), Building
    /// (a definition only: interrupted), or None (no such build).
    fn on_disk(&self, key: &str) -> Option<BuildInfo> {
        // Keys are 64 lowercase hex digits; nothing else (`../x`) may name a directory.
        if key.len() != 64 || !key.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        let mut info = self.blank(key, Building);
        let saved = fs::read(info.image.with_file_name("state.json")).unwrap_or_default();
        let saved: serde_json::Value = serde_json::from_slice(&saved).unwrap_or_default();
        info.started = saved["started"].as_f64();
        info.finished = saved["finished"].as_f64();
        if info.image.is_file() {
            info.state = Ready;
        } else if saved["state"] == "failed" {
            info.state = Failed;
            info.error = saved["error"].as_str().map(str::to_string);
        } else if info.definition.is_file() {
            info.finished = None;
        } else {
            return None;
        }
        Some(info)
    }

    /// Join, report or start the build of `key` (`retry`: a failed or unknown key is built
    /// again, as a request does, rather than reported, as a watch does). `done` is registered
    /// under the lock that decides, so a build ending meanwhile cannot miss it.
    fn join(
        &self,
        key: &str,
        retry: bool,
        done: Option<Done>,
        user: Option<&str>,
    ) -> Result<BuildInfo, BuildError> {
        let seen = self.lock().contains_key(key);
        let disk = if seen { None } else { self.on_disk(key) };
        let mut map = self.lock();
        if let Some(e) = map.get_mut(key).filter(|e| e.info.state == Building) {
            e.waiting.extend(done);
            return Ok(e.info.clone());
        }
        let known = map.get(key).map(|e| e.info.clone()).or(disk);
        let start = known.as_ref().map_or(retry, |i| match i.state {
            // Only on disk: a build interrupted by a restart.
            Building => true,
            Ready => !i.image.is_file(),
            Failed => retry,
        });
        if !start {
            drop(map);
            let info = known.unwrap_or_else(|| BuildInfo {
                error: Some(format!("no build with key {key}")),
                ..self.blank(key, Failed)
            });
            done.into_iter().for_each(|done| done(&info));
            return Ok(info);
        }
        if let Some(user) = user {
            let mut by_user = self.by_user.lock().unwrap_or_else(PoisonError::into_inner);
            let mine = by_user.entry(user.to_string()).or_default();
            if mine.len() >= self.cfg.max_per_user {
                return Err(BuildError::UserLimit(mine.len()));
            }
            mine.push(key.to_string());
        }
        let mut info = self.blank(key, Building);
        info.started = Some(now());
        let (ret, waiting) = (info.clone(), done.into_iter().collect());
        map.insert(key.to_string(), Entry { info, waiting });
        drop(map);
        let (me, info) = (self.clone(), ret.clone());
        let build = move || {
            save(&info);
            if !me.take_slot(&info.key) {
                return; // the daemon stops: built at its next start
            }
            let t0 = Instant::now();
            tracing::info!(key = &info.key[..12], "image build started");
            let result = run(&me.cfg, &info, &me.running);
            me.give_slot();
            let stopping = me.running.lock().unwrap_or_else(PoisonError::into_inner).1;
            if stopping {
                return; // killed because the daemon stops: built again at its next start
            }
            me.finish(info, result, t0.elapsed());
        };
        let thread = std::thread::Builder::new().name(format!("fnx-build-{}", &key[..12]));
        if let Err(e) = thread.spawn(build) {
            self.finish(ret.clone(), Err(BuildFailure::Thread(e)), Duration::ZERO);
        }
        Ok(ret)
    }

    /// Record the end of a build (state.json, then memory) and call its watchers.
    fn finish(&self, mut info: BuildInfo, result: Result<(), BuildFailure>, took: Duration) {
        let (key, seconds) = (&info.key[..12], took.as_secs_f64());
        info.finished = Some(now());
        info.state = if result.is_ok() { Ready } else { Failed };
        info.error = result.err().map(|e| e.to_string());
        let log = info.log.display();
        match &info.error {
            None => tracing::info!(key, seconds, "image build ready"),
            Some(e) => tracing::warn!(key, seconds, %log, "image build failed: {e}"),
        }
        save(&info);
        for keys in self
            .by_user
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values_mut()
        {
            keys.retain(|k| *k != info.key);
        }
        let mut map = self.lock();
        let e = map.get_mut(&info.key).expect("a started build");
        e.info = info.clone();
        let waiting = std::mem::take(&mut e.waiting);
        drop(map);
        waiting.into_iter().for_each(|done| done(&info));
    }
}

fn now() -> f64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH);
    since.map_or(0.0, |d| d.as_secs_f64())
}

/// Write `state.json` (a failure is logged: the build itself goes on).
fn save(info: &BuildInfo) {
    let text = serde_json::to_vec_pretty(info).unwrap_or_default();
    if let Err(e) = write_atomic(&info.image.with_file_name("state.json"), &text) {
        tracing::warn!(key = &info.key[..12], "cannot write the build state: {e}");
    }
}

/// Write `path` whole or not at all: a temporary file in the same directory, synced, renamed.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}-{seq}", std::process::id()));
    let mut f = fs::File::create(&tmp)?;
    let written = f.write_all(bytes).and_then(|()| f.sync_all());
    let renamed = written.and_then(|()| fs::rename(&tmp, path));
    renamed.inspect_err(|_| drop(fs::remove_file(&tmp)))
}

/// The last non-empty line of `log` after byte `from`, if any.
fn last_line(log: &Path, from: u64) -> Option<String> {
    let bytes = fs::read(log).ok()?;
    let text = String::from_utf8_lossy(bytes.get(from as usize..)?);
    let line = text.lines().rev().map(str::trim).find(|l| !l.is_empty())?;
    Some(line.chars().take(500).collect())
}

/// Process groups of running builds, and whether the daemon stops them.
type Running = Mutex<(std::collections::HashSet<u32>, bool)>;

/// Removes a build's process group from the running ones when the build ends.
struct Forget<'a>(&'a Running, u32);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        if let Ok(mut r) = self.0.lock() {
            r.0.remove(&self.1);
        }
    }
}

/// One build: `command... image.sif.part image.def`, its output appended to the log, the
/// image renamed into place on success. Err: why it failed.
fn run(cfg: &BuildConfig, info: &BuildInfo, running: &Running) -> Result<(), BuildFailure> {
    let part = info.image.with_file_name("image.sif.part");
    // A leftover of an interrupted build (apptainer would ask before overwriting it).
    let _ = fs::remove_file(&part);
    let mut argv = cfg.command.clone();
    argv.extend([&part, &info.definition].map(|p| p.to_string_lossy().into_owned()));
    let log_err = |source| BuildFailure::Log {
        path: info.log.clone(),
        source,
    };
    let mut log = fs::File::options()
        .create(true)
        .append(true)
        .open(&info.log)
        .map_err(log_err)?;
    writeln!(log, "# fnx: {argv:?}").map_err(log_err)?;
    let from = log.metadata().map_or(0, |m| m.len());
    let (out, err) = (log.try_clone().map_err(log_err)?, log.try_clone());
    let mut child = Command::new(&argv[0]);
    child
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err.map_err(log_err)?);
    // SAFETY: child_setup runs between fork and exec and makes only async-signal-safe calls.
    // Its own process group; killed if the daemon dies (even by SIGKILL).
    unsafe {
        child.pre_exec(|| fnx_sys::process::child_setup(libc::SIGKILL));
    }
    let mut child = child.spawn().map_err(|source| BuildFailure::Spawn {
        program: argv[0].clone(),
        source,
    })?;
    let pgid = child.id();
    running
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .0
        .insert(pgid);
    let _forget = Forget(running, pgid);
    let deadline = Instant::now() + cfg.timeout;
    let status = loop {
        let why = match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            Ok(None) => BuildFailure::Timeout(cfg.timeout.as_secs_f64()),
            Err(source) => BuildFailure::Wait {
                program: argv[0].clone(),
                source,
            },
        };
        // SAFETY: kill(2) of -pid signals the child's own process group (all it started too).
        unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
        let _ = child.wait();
        let _ = writeln!(log, "# fnx: {why}; killed with its process group");
        return Err(why);
    };
    let command = cfg.command.join(" ");
    if !status.success() {
        let how = match status.code() {
            Some(code) => format!("exited with status {code}"),
            None => format!("was killed by signal {:?}", status.signal()),
        };
        return Err(BuildFailure::Failed {
            command,
            how,
            last: last_line(&info.log, from),
        });
    }
    fs::rename(&part, &info.image).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => BuildFailure::NoImage(command),
        _ => BuildFailure::Rename {
            from: part.clone(),
            to: info.image.clone(),
            source,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    const WAIT: Duration = Duration::from_secs(30);
    /// Counts its builds in $T/count; fails (exit 3) while $T/fail exists.
    const BUILDER: &str = r#"echo "building from $2"; sleep 0.3
if [ -e "$T/fail" ]; then echo resolving >&2; echo 'FATAL: no numpy' >&2; echo >&2; exit 3; fi
echo built >> "$T/count"; printf 'SIF\n' > "$1""#;

    /// Builds with `sh $T/build.sh OUTPUT DEFINITION`, $T being the temporary directory.
    fn cache(script: &str, timeout: Duration) -> (tempfile::TempDir, Builds) {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("build.sh");
        fs::write(&path, format!("T='{}'\n{script}\n", t.path().display())).unwrap();
        let cfg = BuildConfig {
            dir: t.path().join("cache"),
            command: vec!["/bin/sh".into(), path.display().to_string()],
            base: "python:3.11-slim".into(),
            timeout,
            max_running: 1,
            max_per_user: 2,
        };
        (t, Builds::new(cfg))
    }

    fn numpy() -> Deps {
        recipe::parse(&serde_json::json!({"python": ["numpy"]})).unwrap()
    }

    fn watch(b: &Builds, key: &str) -> mpsc::Receiver<BuildInfo> {
        let (tx, rx) = mpsc::channel();
        b.watch(key, Box::new(move |i| tx.send(i.clone()).unwrap()));
        rx
    }

    fn wait(b: &Builds, key: &str) -> BuildInfo {
        watch(b, key).recv_timeout(WAIT).expect("the build ends")
    }

    fn runs(t: &tempfile::TempDir) -> usize {
        read(&t.path().join("count")).lines().count()
    }

    fn read(path: &Path) -> String {
        fs::read_to_string(path).unwrap()
    }

    #[test]
    fn concurrent_requests_share_one_build_and_a_fresh_cache_finds_it() {
        let (t, b) = cache(BUILDER, WAIT);
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let (tx, rx) = mpsc::channel();
        for _ in 0..2 {
            let (b, barrier, tx) = (b.clone(), barrier.clone(), tx.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let key = b.request(&numpy(), "u").unwrap().key;
                b.watch(&key, Box::new(move |i| tx.send(i.clone()).unwrap()));
            });
        }
        let x = rx.recv_timeout(WAIT).unwrap();
        let y = rx.recv_timeout(WAIT).unwrap();
        assert_eq!((x.state, y.state, runs(&t)), (Ready, Ready, 1));
        assert_eq!(recipe::key(&read(&x.definition)), x.key);
        assert_eq!((read(&x.image), &y.key), ("SIF\n".into(), &x.key));
        assert!(read(&x.log).starts_with("# fnx: [\"/bin/sh\", "));
        let state = read(&x.image.with_file_name("state.json"));
        assert!(state.contains("\"state\": \"ready\""), "{state}");
        assert_eq!(b.request(&numpy(), "u").unwrap().state, Ready);
        let fresh = Builds::new((*b.cfg).clone());
        assert_eq!(fresh.info(&x.key).unwrap().state, Ready);
        let now = watch(&fresh, &x.key).try_recv().expect("called at once");
        assert_eq!((now.state, runs(&t)), (Ready, 1));
    }

    #[test]
    fn builds_run_one_at_a_time_and_a_user_may_start_only_two() {
        let script = r#"echo start >> "$T/events"; sleep 0.2; echo end >> "$T/events"
printf 'SIF\n' > "$1""#;
        let (t, b) = cache(script, WAIT);
        let deps = |p: &str| recipe::parse(&serde_json::json!({"python": [p]})).unwrap();
        let first = b.request(&deps("numpy"), "u").unwrap();
        let second = b.request(&deps("scipy"), "u").unwrap();
        // A third new build of the same user is refused; joining one of theirs is not.
        let err = b.request(&deps("pandas"), "u").unwrap_err();
        assert!(matches!(err, BuildError::UserLimit(2)), "{err}");
        assert!(err.to_string().contains("builds.max_per_user"), "{err}");
        assert_eq!(b.request(&deps("numpy"), "u").unwrap().key, first.key);
        let third = b.request(&deps("pandas"), "v").unwrap();
        for info in [&first, &second, &third] {
            assert_eq!(wait(&b, &info.key).state, Ready);
        }
        // max_running = 1: never two at once.
        let events = read(&t.path().join("events"));
        assert_eq!(events, "start\nend\n".repeat(3), "builds overlapped");
        // Finished builds no longer count against their user.
        assert_eq!(b.request(&deps("pandas"), "u").unwrap().state, Ready);
        let last = b.request(&deps("polars"), "u").unwrap();
        assert_eq!(last.state, Building);
        assert_eq!(wait(&b, &last.key).state, Ready);
    }

    #[test]
    fn a_failed_build_says_why_and_a_later_request_builds_again() {
        let (t, b) = cache(BUILDER, WAIT);
        fs::write(t.path().join("fail"), "").unwrap();
        let failed = wait(&b, &b.request(&numpy(), "u").unwrap().key);
        let error = failed.error.clone().unwrap();
        assert!(error.ends_with("build.sh exited with status 3: FATAL: no numpy"));
        assert!(read(&failed.log).contains("resolving\nFATAL: no numpy\n"));
        let fresh = Builds::new((*b.cfg).clone()).info(&failed.key).unwrap();
        assert_eq!((fresh.state, fresh.error), (Failed, Some(error)));
        let watched = wait(&b, &failed.key);
        assert_eq!(watched.state, Failed, "a watch does not retry");
        fs::remove_file(t.path().join("fail")).unwrap();
        let again = b.request(&numpy(), "u").unwrap();
        assert_eq!((again.state, again.error), (Building, None));
        assert_eq!((wait(&b, &failed.key).state, runs(&t)), (Ready, 1));
        assert_eq!(read(&again.log).matches("# fnx: [").count(), 2);
    }

    #[test]
    fn unknown_keys_fail_and_an_interrupted_build_starts_again() {
        let (t, b) = cache(BUILDER, WAIT);
        for key in ["0".repeat(64), "../../etc".into()] {
            let info = watch(&b, &key).try_recv().expect("called at once");
            assert_eq!(info.error, Some(format!("no build with key {key}")));
            assert!(info.state == Failed && b.info(&key).is_none());
        }
        let text = recipe::definition(&numpy(), "python:3.11-slim");
        let dir = t.path().join("cache").join(recipe::key(&text));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("image.def"), &text).unwrap();
        fs::write(dir.join("state.json"), r#"{"state": "building"}"#).unwrap();
        let key = recipe::key(&text);
        assert_eq!(b.info(&key).unwrap().state, Building);
        assert_eq!((wait(&b, &key).state, runs(&t)), (Ready, 1));
    }

    #[test]
    fn timeouts_and_missing_programs_fail() {
        let (_t, b) = cache("sleep 30", Duration::from_millis(500));
        assert!(b.can_build().is_ok());
        let info = wait(&b, &b.request(&numpy(), "u").unwrap().key);
        assert_eq!(info.error.as_deref(), Some("timed out after 0.5 s"));
        assert!(read(&info.log).contains("timed out after 0.5 s; killed"));
        let mut cfg = (*b.cfg).clone();
        for program in ["/nonexistent/fnx-build", "fnx-no-such-program"] {
            cfg.command = vec![program.into()];
            let b = Builds::new(cfg.clone());
            assert!(b
                .can_build()
                .unwrap_err()
                .to_string()
                .contains("not found on PATH"));
            let error = wait(&b, &b.request(&numpy(), "u").unwrap().key)
                .error
                .unwrap();
            assert!(error.contains(&format!("program {program}: ")), "{error}");
        }
    }
}
