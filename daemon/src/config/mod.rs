//! The site configuration: TOML parsed strictly (every unknown key is reported with its path),
//! then validated into [`SiteConfig`], the runtime form. With no file, [`SiteConfig::defaults`]
//! gives the embedded defaults: data in `$FNX_HOME`, one local pool, API on `127.0.0.1:8470`.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

mod pool;

use pool::RawPool;
pub use pool::{BlocksConfig, Connect, PoolConfig};

/// The default HTTP API address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8470";

/// A configuration that cannot be used; lists every problem found, each with its key path.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a value has the wrong type.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// Unknown keys or invalid values.
    #[error("{path}: {} problem(s):\n  {}", problems.len(), problems.join("\n  "))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// One entry per problem, each starting with the key path.
        problems: Vec<String>,
    },
}

#[derive(Deserialize, Default)]
struct RawConfig {
    #[serde(default)]
    daemon: RawDaemon,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    interchange: RawInterchange,
    #[serde(default)]
    pools: Pools,
    #[serde(default)]
    builds: RawBuilds,
    #[serde(default)]
    users: RawUsers,
}

#[derive(Deserialize, Default)]
struct RawUsers {
    mode: Option<String>,
    min_uid: Option<u32>,
    auto: Option<bool>,
    user_idle_s: Option<f64>,
}

/// Whose account user code runs under (`[users] mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsersMode {
    /// Every task runs as the account the daemon runs as: for one user, or a group of users
    /// who trust each other.
    Service,
    /// Each fnx user is a Unix account, and every process that runs a user's code runs as that
    /// account.
    Unix,
}

/// `[users]`: who the users are and whose account their code runs under.
#[derive(Clone, Debug)]
pub struct UsersConfig {
    /// The mode.
    pub mode: UsersMode,
    /// Accounts below this uid are never mapped to (`unix` mode).
    pub min_uid: u32,
    /// A socket peer with no fnx user gets one on first contact (`unix` mode).
    pub auto: bool,
    /// A user's local managers exit after this long without tasks (`unix` mode).
    pub user_idle: Duration,
}

#[derive(Deserialize, Default)]
struct RawBuilds {
    dir: Option<PathBuf>,
    command: Option<String>,
    base_image: Option<String>,
    timeout_s: Option<f64>,
    max_running: Option<usize>,
    max_per_user: Option<usize>,
}

/// `[builds]`: container images built from functions' dependencies.
#[derive(Clone, Debug)]
pub struct BuildsConfig {
    /// The image cache (None: `images/` in the shared directory, where compute nodes read it).
    pub dir: Option<PathBuf>,
    /// The build command's words before the output and definition paths.
    pub command: Vec<String>,
    /// The Docker image the definitions start from.
    pub base_image: String,
    /// Longest a build may run.
    pub timeout: Duration,
    /// Builds that run at once; the others wait their turn.
    pub max_running: usize,
    /// Builds one user's registrations may have started and not finished.
    pub max_per_user: usize,
}

/// `[pools.NAME]` tables in the order the file gives them (the first is the default pool).
#[derive(Default)]
struct Pools(Vec<(String, RawPool)>);

impl<'de> Deserialize<'de> for Pools {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Pools;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("tables [pools.NAME]")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Pools, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = m.next_entry::<String, RawPool>()? {
                    out.push((k, v));
                }
                Ok(Pools(out))
            }
        }
        d.deserialize_map(Visit)
    }
}

#[derive(Deserialize, Default)]
struct RawDaemon {
    data_dir: Option<PathBuf>,
    shared_dir: Option<PathBuf>,
    listen: Option<String>,
    log_file: Option<PathBuf>,
    pass_env: Option<Vec<String>>,
    socket: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
struct RawStore {
    sync: Option<String>,
    max_size_mb: Option<u64>,
    result_retention_s: Option<f64>,
    unfetched_retention_s: Option<f64>,
    prune_interval_s: Option<f64>,
}

#[derive(Deserialize, Default)]
struct RawLimits {
    max_tasks_per_request: Option<usize>,
    max_request_mb: Option<u64>,
    max_payload_mb: Option<f64>,
    max_result_mb: Option<f64>,
    max_queued_per_user: Option<u64>,
    max_answer_mb: Option<f64>,
    max_source_kb: Option<u64>,
    spill_kb: Option<u64>,
    max_daemon_crashes: Option<u32>,
    max_queued_mb_per_user: Option<f64>,
    max_function_mb_per_user: Option<f64>,
    max_connections: Option<usize>,
    max_connections_per_peer: Option<usize>,
    idle_timeout_s: Option<f64>,
    body_timeout_s: Option<f64>,
}

#[derive(Deserialize, Default)]
struct RawInterchange {
    address: Option<String>,
    encrypt: Option<String>,
    port: Option<u16>,
    heartbeat_period_s: Option<f64>,
    heartbeat_threshold_s: Option<f64>,
    warm_window: Option<u64>,
}

/// How hard each commit is pushed to disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// fsync the write-ahead log at every group commit: an acknowledged task survives a power
    /// loss.
    Full,
    /// fsync only at checkpoints: an acknowledged task survives a crash of the daemon, not of
    /// the machine.
    Normal,
}

/// Store settings.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Durability of each commit.
    pub sync: SyncMode,
    /// Size limit of the store in bytes (None: only the filesystem limits it).
    pub max_size_bytes: Option<u64>,
    /// How long a result is kept after it was fetched.
    pub result_retention: Duration,
    /// How long a result that was never fetched is kept.
    pub unfetched_retention: Duration,
    /// How often old results are pruned.
    pub prune_interval: Duration,
    /// Move a damaged store aside at start and copy what can be read of it into a new one
    /// (`fnx daemon --salvage`; never from the file).
    pub salvage: bool,
}

/// Request and queue limits.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Most tasks in one submit request.
    pub max_tasks_per_request: usize,
    /// Largest request body.
    pub max_request_bytes: usize,
    /// Largest argument payload of one task.
    pub max_payload_bytes: usize,
    /// Largest result of one task.
    pub max_result_bytes: u64,
    /// Most unfinished tasks of one user.
    pub max_queued_per_user: u64,
    /// Results and outcomes one answer carries (a results page, a status answer): at least
    /// one task, then up to this many bytes of results.
    pub max_answer_bytes: u64,
    /// Bytes of arguments and files one user's unfinished tasks may hold.
    pub max_queued_bytes_per_user: u64,
    /// Bytes of function records (sources, commands) one user may have registered.
    pub max_function_bytes_per_user: u64,
    /// Daemon crashes in a row a task may be running in before it fails as `daemon_crashed`
    /// instead of being dispatched again.
    pub max_daemon_crashes: u32,
    /// Largest Python source a function may register with (its signature is read from it).
    pub max_source_bytes: usize,
    /// Tasks whose arguments and inline files are larger keep them only in the store while
    /// they wait; the interchange reads them back at each dispatch.
    pub spill_bytes: u64,
    /// Most open API connections (TCP and the local socket together).
    pub max_connections: usize,
    /// Most open API connections from one peer (an IP address, or a uid on the socket).
    pub max_connections_per_peer: usize,
    /// A connection with no complete request head this long after it opened or after its last
    /// answer is closed (idle keep-alive connections, and clients that stall mid-header).
    pub idle_timeout: Duration,
    /// The longest pause while a request body arrives, or while an answer is written to a
    /// client that does not read it.
    pub body_timeout: Duration,
}

/// Interchange settings shared by every pool.
#[derive(Clone, Debug)]
pub struct InterchangeConfig {
    /// Address managers connect to (and the interchange binds).
    pub address: String,
    /// Port of the first pool's interchange (0: any free port); pool N uses `port + N`.
    pub port: u16,
    /// Heartbeat period.
    pub heartbeat_period: Duration,
    /// Silence after which a manager is lost.
    pub heartbeat_threshold: Duration,
    /// Warm routing: how many places older a queued task of another container may be before
    /// it goes ahead of the tasks a manager has warm workers for (0: strict arrival order).
    pub warm_window: u64,
    /// Encrypt links on loopback too (`encrypt = "always"`); otherwise the managers a local
    /// pool starts on loopback authenticate with a password (PLAIN), unencrypted.
    pub encrypt_loopback: bool,
}

/// The validated configuration the daemon runs with.
#[derive(Clone, Debug)]
pub struct SiteConfig {
    /// Data directory: store, run directories, `client.json`.
    pub data_dir: PathBuf,
    /// Where batch jobs' run directories (`runs/`) and the CurveZMQ keys (`keys/`) go: a
    /// filesystem the compute nodes share (None: the data directory). The store stays in
    /// `data_dir`, which may then be a local disk.
    pub shared_dir: Option<PathBuf>,
    /// HTTP API address.
    pub listen: SocketAddr,
    /// Log file (None: stderr).
    pub log_file: Option<PathBuf>,
    /// The local socket (identity from the kernel, no token); None: no socket.
    pub socket: Option<PathBuf>,
    /// `[users]`.
    pub users: UsersConfig,
    /// Variables of the daemon's environment that its managers and workers get, beyond
    /// [`BASE_PASS_ENV`]; nothing else of the daemon's environment reaches user code.
    pub pass_env: Vec<String>,
    /// Store settings.
    pub store: StoreConfig,
    /// Limits.
    pub limits: Limits,
    /// Interchange settings.
    pub interchange: InterchangeConfig,
    /// Pools, in the order of the file; tasks that name no pool go to the first.
    pub pools: Vec<PoolConfig>,
    /// Image builds.
    pub builds: BuildsConfig,
}

/// `$FNX_HOME`, else `~/.fnx`.
pub fn fnx_home() -> PathBuf {
    if let Some(h) = std::env::var_os("FNX_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    PathBuf::from(home).join(".fnx")
}

/// What managers and workers the daemon starts get of its environment, always: the search
/// path, the locale and time zone, and the account's name and home. `LC_*` matches every
/// locale variable.
pub const BASE_PASS_ENV: [&str; 8] = [
    "PATH", "LANG", "LANGUAGE", "LC_*", "TZ", "HOME", "USER", "LOGNAME",
];

impl SiteConfig {
    /// The environment of the processes the daemon starts for user code: [`BASE_PASS_ENV`]
    /// and `pass_env`, with their values in the daemon's own environment.
    pub fn child_env(&self) -> Vec<(String, String)> {
        std::env::vars()
            .filter(|(k, _)| {
                BASE_PASS_ENV.iter().any(|p| match p.strip_suffix('*') {
                    Some(prefix) => k.starts_with(prefix),
                    None => k == p,
                }) || self.pass_env.iter().any(|p| p == k)
            })
            .collect()
    }

    /// The directory shared with compute nodes: `shared_dir`, else `data_dir`.
    pub fn shared(&self) -> &Path {
        self.shared_dir.as_deref().unwrap_or(&self.data_dir)
    }

    /// The embedded defaults (what `fnx daemon` runs with when given no file).
    pub fn defaults() -> SiteConfig {
        validate(RawConfig::default(), Path::new("(defaults)")).expect("defaults are valid")
    }

    /// Read, parse and validate a file.
    pub fn load(path: &Path) -> Result<SiteConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// What a valid file probably still gets wrong on this host, one line each: placeholders
    /// left from an example (`text` is the file), a result limit larger than a manager can
    /// send, batch pools without a fixed interchange port or a worker count, an `fnx_path`
    /// that is not here.
    pub fn warnings(&self, text: &str) -> Vec<String> {
        let mut out: Vec<String> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| l.contains("CHANGEME") && !l.trim_start().starts_with('#'))
            .map(|(n, l)| format!("line {}: a CHANGEME is left in place: {}", n + 1, l.trim()))
            .collect();
        let largest = fnx_protocol::LARGEST_RESULT_BYTES;
        if self.limits.max_result_bytes > largest {
            out.push(format!(
                "limits.max_result_mb: results over {} MiB cannot travel from a manager to the \
                 interchange; they fail as result_too_large at that size",
                largest >> 20
            ));
        }
        for p in &self.pools {
            let Some(b) = &p.blocks else { continue };
            if self.interchange.port == 0 {
                out.push(format!(
                    "pool {}: interchange.port is 0 (any free port): batch jobs need a fixed \
                     port that compute nodes may reach through the firewall; set one",
                    p.name
                ));
            }
            if p.workers_per_manager.is_none() {
                out.push(format!(
                    "pool {}: no workers_per_node: each node runs one worker per core it \
                     reports, which may not be what the node allows or the tasks need",
                    p.name
                ));
            }
            if let Some(f) = b.fnx_path.as_ref().filter(|f| !f.exists()) {
                out.push(format!(
                    "pool {}: fnx_path {} does not exist on this host (fine only if it exists \
                     on the compute nodes)",
                    p.name,
                    f.display()
                ));
            }
        }
        out
    }

    /// Parse and validate TOML text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<SiteConfig, ConfigError> {
        let de = toml::de::Deserializer::parse(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim().to_string(),
        })?;
        let mut unknown = Vec::new();
        let raw: RawConfig = serde_ignored::deserialize(de, |p| {
            unknown.push(format!("{p}: unknown key"));
        })
        .map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim().to_string(),
        })?;
        // Unknown keys and bad values are reported together, so one fix-and-check round
        // sees every problem.
        match validate(raw, path) {
            Ok(cfg) if unknown.is_empty() => Ok(cfg),
            Ok(_) => Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problems: unknown,
            }),
            Err(ConfigError::Invalid { problems, .. }) => {
                unknown.extend(problems);
                Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    problems: unknown,
                })
            }
            Err(e) => Err(e),
        }
    }
}

pub(crate) struct Problems(pub(crate) Vec<String>);

impl Problems {
    pub(crate) fn secs(&mut self, key: &str, v: Option<f64>, default: f64, min: f64) -> Duration {
        let v = v.unwrap_or(default);
        // Above a billion seconds (31 years) is a mistake, and would overflow a deadline.
        match Duration::try_from_secs_f64(v) {
            Ok(d) if v >= min && v <= 1e9 => d,
            _ => {
                self.0.push(format!(
                    "{key}: must be a number of seconds from {min} to 1e9, got {v}"
                ));
                Duration::from_secs_f64(default)
            }
        }
    }

    /// Seconds in `[min, max]`: values the daemon waits for, where a huge one is a mistake.
    fn secs_at_most(
        &mut self,
        key: &str,
        v: Option<f64>,
        default: f64,
        min: f64,
        max: f64,
    ) -> Duration {
        match v {
            Some(x) if x.is_finite() && x > max => {
                self.0
                    .push(format!("{key}: must be at most {max} s, got {x}"));
                Duration::from_secs_f64(default)
            }
            _ => self.secs(key, v, default, min),
        }
    }

    /// A count of at least 1.
    fn count(&mut self, key: &str, v: Option<usize>, default: usize) -> usize {
        match v {
            Some(0) => {
                self.0.push(format!("{key}: must be at least 1"));
                default
            }
            v => v.unwrap_or(default),
        }
    }

    fn mb(&mut self, key: &str, v: Option<f64>, default: f64) -> u64 {
        let v = v.unwrap_or(default);
        if !v.is_finite() || v <= 0.0 || v > 1e6 {
            self.0
                .push(format!("{key}: must be a size in MiB above 0, got {v}"));
            return (default * 1048576.0) as u64;
        }
        (v * 1048576.0) as u64
    }
}

fn validate(raw: RawConfig, path: &Path) -> Result<SiteConfig, ConfigError> {
    let mut p = Problems(Vec::new());
    let listen_text = raw.daemon.listen.unwrap_or_else(|| DEFAULT_LISTEN.into());
    let listen = listen_text.parse::<SocketAddr>().unwrap_or_else(|e| {
        p.0.push(format!(
            "daemon.listen: {listen_text:?} is not an address:port ({e})"
        ));
        DEFAULT_LISTEN.parse().expect("valid")
    });
    let sync = match raw.store.sync.as_deref().unwrap_or("full") {
        "full" => SyncMode::Full,
        "normal" => SyncMode::Normal,
        other => {
            p.0.push(format!(
                "store.sync: must be \"full\" or \"normal\", got {other:?}"
            ));
            SyncMode::Full
        }
    };
    let store = StoreConfig {
        sync,
        max_size_bytes: raw.store.max_size_mb.filter(|&m| m > 0).map(|m| m << 20),
        result_retention: p.secs(
            "store.result_retention_s",
            raw.store.result_retention_s,
            86400.0,
            0.0,
        ),
        unfetched_retention: p.secs(
            "store.unfetched_retention_s",
            raw.store.unfetched_retention_s,
            30.0 * 86400.0,
            0.0,
        ),
        salvage: false,
        prune_interval: p.secs(
            "store.prune_interval_s",
            raw.store.prune_interval_s,
            60.0,
            0.1,
        ),
    };
    let l = raw.limits;
    let max_tasks_per_request = l.max_tasks_per_request.unwrap_or(10_000);
    if max_tasks_per_request == 0 || max_tasks_per_request > fnx_api::submit::MAX_TASKS {
        p.0.push(format!(
            "limits.max_tasks_per_request: must be 1 to {}, got {max_tasks_per_request}",
            fnx_api::submit::MAX_TASKS
        ));
    }
    let limits = Limits {
        max_tasks_per_request: max_tasks_per_request.max(1),
        max_request_bytes: p.mb(
            "limits.max_request_mb",
            l.max_request_mb.map(|m| m as f64),
            256.0,
        ) as usize,
        max_payload_bytes: p.mb("limits.max_payload_mb", l.max_payload_mb, 10.0) as usize,
        max_result_bytes: p.mb("limits.max_result_mb", l.max_result_mb, 10.0),
        max_queued_per_user: l.max_queued_per_user.unwrap_or(2_000_000),
        max_answer_bytes: p.mb("limits.max_answer_mb", l.max_answer_mb, 32.0),
        max_queued_bytes_per_user: p.mb(
            "limits.max_queued_mb_per_user",
            l.max_queued_mb_per_user,
            4096.0,
        ),
        max_function_bytes_per_user: p.mb(
            "limits.max_function_mb_per_user",
            l.max_function_mb_per_user,
            64.0,
        ),
        max_daemon_crashes: p.count(
            "limits.max_daemon_crashes",
            l.max_daemon_crashes.map(|n| n as usize),
            2,
        ) as u32,
        max_source_bytes: p
            .count(
                "limits.max_source_kb",
                l.max_source_kb.map(|k| k as usize),
                1024,
            )
            .min(4096)
            << 10,
        spill_bytes: (p.count("limits.spill_kb", l.spill_kb.map(|k| k as usize), 16) as u64)
            .min(1 << 20)
            << 10,
        max_connections: p.count("limits.max_connections", l.max_connections, 1024),
        max_connections_per_peer: p.count(
            "limits.max_connections_per_peer",
            l.max_connections_per_peer,
            256,
        ),
        idle_timeout: p.secs_at_most("limits.idle_timeout_s", l.idle_timeout_s, 30.0, 0.1, 3600.0),
        body_timeout: p.secs_at_most("limits.body_timeout_s", l.body_timeout_s, 30.0, 0.1, 3600.0),
    };
    let i = raw.interchange;
    let interchange = InterchangeConfig {
        address: i.address.unwrap_or_else(|| "127.0.0.1".into()),
        port: i.port.unwrap_or(0),
        heartbeat_period: p.secs(
            "interchange.heartbeat_period_s",
            i.heartbeat_period_s,
            5.0,
            0.05,
        ),
        heartbeat_threshold: p.secs(
            "interchange.heartbeat_threshold_s",
            i.heartbeat_threshold_s,
            30.0,
            0.1,
        ),
        warm_window: i.warm_window.unwrap_or(4096),
        encrypt_loopback: i.encrypt.as_deref() == Some("always"),
    };
    // Manager links are always encrypted and authenticated (CurveZMQ), loopback included:
    // any account on the host can reach a loopback port. "auto" and "always" are kept so that
    // existing site files load.
    match i.encrypt.as_deref().unwrap_or("auto") {
        "auto" | "always" => {}
        "never" => p.0.push(
            "interchange.encrypt: \"never\" is no longer allowed: every manager link is \
             authenticated with CurveZMQ, loopback included (any local account could otherwise \
             register as a manager and receive tasks); remove the key"
                .into(),
        ),
        other => p.0.push(format!(
            "interchange.encrypt: must be \"auto\" or \"always\" (both mean CurveZMQ), got {other:?}"
        )),
    }
    if interchange.heartbeat_threshold <= interchange.heartbeat_period {
        p.0.push(
            "interchange.heartbeat_threshold_s: must be longer than heartbeat_period_s".into(),
        );
    }
    if interchange.address.parse::<std::net::IpAddr>().is_err() {
        p.0.push(format!(
            "interchange.address: {:?} is not an IP address",
            interchange.address
        ));
    }
    let mut raw_pools = raw.pools.0;
    if raw_pools.is_empty() {
        raw_pools.push(("local".into(), RawPool::default()));
    }
    let port = interchange.port as usize;
    if port != 0 && port + raw_pools.len() - 1 > 65535 {
        p.0.push(format!(
            "interchange.port: pool i listens on port + i; {port} + {} pools passes 65535",
            raw_pools.len()
        ));
    }
    let mut pools = Vec::new();
    for (name, rp) in raw_pools {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
        {
            p.0.push(format!(
                "pools.{name:?}: a pool name may use letters, digits, '-' and '_'"
            ));
        }
        pools.push(pool::validate(name, rp, &mut p));
    }
    let unspecified = interchange
        .address
        .parse::<std::net::IpAddr>()
        .is_ok_and(|a| a.is_unspecified());
    for pool in &pools {
        if let Some(b) = &pool.blocks {
            if unspecified && b.connect == Connect::Interchange {
                p.0.push(format!(
                    "pools.{}.address: the interchange listens on every interface ({}); say \
                     which address (or interface) the managers on compute nodes connect to",
                    pool.name, interchange.address
                ));
            }
        }
    }
    let command: Vec<String> = raw
        .builds
        .command
        .as_deref()
        .unwrap_or("apptainer build --fakeroot")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    if command.is_empty() {
        p.0.push(
            "builds.command: must name a program (e.g. \"apptainer build --fakeroot\")".into(),
        );
    }
    let base_image = raw
        .builds
        .base_image
        .unwrap_or_else(|| "python:3.11-slim".into());
    if let Err(e) = crate::builds::recipe::check_base(&base_image) {
        p.0.push(format!("builds.base_image: {e}"));
    }
    let builds = BuildsConfig {
        dir: raw.builds.dir.filter(|d| !d.as_os_str().is_empty()),
        command,
        base_image,
        timeout: p.secs("builds.timeout_s", raw.builds.timeout_s, 3600.0, 1.0),
        max_running: p.count(
            "builds.max_running",
            raw.builds.max_running,
            (fnx_sys::node::usable_cpus() as usize / 4).max(1),
        ),
        max_per_user: p.count("builds.max_per_user", raw.builds.max_per_user, 2),
    };
    if !p.0.is_empty() {
        return Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            problems: p.0,
        });
    }
    let users = UsersConfig {
        mode: match raw.users.mode.as_deref().unwrap_or("service") {
            "service" => UsersMode::Service,
            "unix" => UsersMode::Unix,
            other => {
                p.0.push(format!(
                    "users.mode: must be \"service\" or \"unix\", got {other:?}"
                ));
                UsersMode::Service
            }
        },
        min_uid: raw.users.min_uid.unwrap_or(1000),
        auto: raw.users.auto.unwrap_or(true),
        user_idle: p.secs("users.user_idle_s", raw.users.user_idle_s, 300.0, 1.0),
    };
    if users.min_uid == 0 {
        p.0.push("users.min_uid: must be at least 1 (root is never a user's account)".into());
    }
    let pass_env = raw.daemon.pass_env.unwrap_or_default();
    for name in &pass_env {
        let ok = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ok {
            p.0.push(format!(
                "daemon.pass_env: {name:?} is not an environment variable name"
            ));
        }
    }
    if !p.0.is_empty() {
        return Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            problems: p.0,
        });
    }
    let data_dir = raw.daemon.data_dir.unwrap_or_else(fnx_home);
    let socket = match raw.daemon.socket {
        None => Some(data_dir.join("fnx.sock")),
        Some(s) if s.as_os_str().is_empty() => None,
        Some(s) => Some(s),
    };
    Ok(SiteConfig {
        data_dir,
        socket,
        users,
        pass_env,
        shared_dir: raw.daemon.shared_dir.filter(|d| !d.as_os_str().is_empty()),
        listen,
        log_file: raw.daemon.log_file.filter(|f| !f.as_os_str().is_empty()),
        store,
        limits,
        interchange,
        pools,
        builds,
    })
}

#[cfg(test)]
mod tests;
