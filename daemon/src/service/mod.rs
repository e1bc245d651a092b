//! Wiring: open the store, recover, start the pools, the writer and the HTTP API; stop them in
//! order.

use crate::api::{App, PoolRef};
use crate::blocks::{self, BlockPool, PoolReport};
use crate::config::{BlocksConfig, PoolConfig, SiteConfig, SyncMode};
use crate::keys::{Keys, LinkKeys};
use crate::local::{LocalError, LocalPool, PoolOptions};
use crate::store::writer::{Cmd, Shared, Stats, Writer, WriterConfig};
use crate::store::{self, Reader, StoreError};
use fnx_interchange::Event;
use fnx_launcher::script::Rendered;
use fnx_launcher::{BlockFiles, ManagerBootstrap};
use std::collections::HashMap;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;

mod dirs;
mod http;
mod recover;
mod tokens;

use dirs::{passage_mode, prepare_dir_mode, private_home, private_store_files};
use http::{bind_socket, serve};
use recover::{load, recover};
pub use tokens::{create_token, list_tokens, revoke_token};

/// The daemon could not start or failed.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// A file or directory problem.
    #[error("{what}: {source}")]
    Io {
        /// What was attempted.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The store could not be opened or read.
    #[error("the task store {path}: {source}")]
    Store {
        /// The store file.
        path: PathBuf,
        /// Why.
        source: StoreError,
    },
    /// The store file is damaged.
    #[error(
        "the task store {path} is damaged: {detail}. Start the daemon once with `fnx daemon \
         --salvage` to move the file aside (it is kept) and copy every task, function, user and \
         token that can still be read into a new store"
    )]
    Damaged {
        /// The store file.
        path: PathBuf,
        /// Where, and SQLite's own words.
        detail: String,
    },
    /// The CurveZMQ key directory cannot be used.
    #[error("{0}")]
    Keys(#[from] crate::keys::KeyError),
    /// Another daemon uses the data directory.
    #[error("{0}")]
    Locked(#[from] crate::lock::LockError),
    /// A pool could not start.
    #[error("pool {pool}: {source}")]
    Pool {
        /// The pool.
        pool: String,
        /// Why.
        source: LocalError,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DaemonError {
    let what = what.into();
    move |source| DaemonError::Io { what, source }
}

/// The store file inside a data directory.
pub fn store_path(data_dir: &Path) -> PathBuf {
    data_dir.join("fnx.db")
}

/// On the first start (no users yet), create an admin user named after the account running the
/// daemon and write its URL and token to `client.json` (mode 0600) in the data directory.
fn first_start(
    conn: &rusqlite::Connection,
    cfg: &SiteConfig,
    path: &Path,
) -> Result<(), DaemonError> {
    let serr = |source| store_failure(path, source);
    if store::user_count(conn).map_err(serr)? > 0 {
        return Ok(());
    }
    let user = crate::auth::current_user();
    store::ensure_user(conn, &user, true).map_err(serr)?;
    let (_, token) = store::create_token(conn, &user, true, None).map_err(serr)?;
    let file = cfg.data_dir.join("client.json");
    let body =
        serde_json::json!({"url": format!("http://{}", cfg.listen), "token": token, "user": user});
    let tmp = file.with_extension("json.tmp");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(format!("cannot write {}", tmp.display())))?;
        writeln!(f, "{body}").map_err(io(format!("cannot write {}", tmp.display())))?;
    }
    std::fs::rename(&tmp, &file).map_err(io(format!("cannot write {}", file.display())))?;
    eprintln!(
        "fnx: first start: created admin user {user:?}; its URL and token are in {} (readable only by you)",
        file.display()
    );
    Ok(())
}

/// The run directory of a pool: `<shared dir>/runs/<pool>` (the shared dir is the data dir
/// unless `[daemon] shared_dir` says otherwise).
pub fn pool_run_dir(shared: &Path, pool: &str) -> PathBuf {
    shared.join("runs").join(pool)
}

fn pool_port(cfg: &SiteConfig, i: usize) -> u16 {
    if cfg.interchange.port == 0 {
        0
    } else {
        // The configuration keeps port + pools within 65535.
        cfg.interchange.port.saturating_add(i as u16)
    }
}

/// A listener holding pool `i`'s configured port (None: the pool takes any free port, or the
/// port cannot be held, which its interchange's bind then reports).
fn hold_port(cfg: &SiteConfig, i: usize) -> Option<std::net::TcpListener> {
    match pool_port(cfg, i) {
        0 => None,
        port => std::net::TcpListener::bind((cfg.interchange.address.as_str(), port)).ok(),
    }
}

fn run_id(pool: &str) -> String {
    format!("fnxd-{}-{pool}", std::process::id())
}

/// The settings every manager of pool `p` starts with (uid, block and run directory are set
/// per manager).
pub fn manager_template(
    cfg: &SiteConfig,
    p: &PoolConfig,
    endpoint: String,
    curve_keys: Option<PathBuf>,
) -> ManagerBootstrap {
    let mut b = ManagerBootstrap::new(
        endpoint,
        String::new(),
        pool_run_dir(cfg.shared(), &p.name),
        run_id(&p.name),
    );
    b.slots = p.workers_per_manager;
    p.shape.apply(&mut b);
    b.python = p.python.clone();
    b.heartbeat_period_ms = cfg.interchange.heartbeat_period.as_millis() as u64;
    b.heartbeat_threshold_ms = cfg.interchange.heartbeat_threshold.as_millis() as u64;
    b.max_result_bytes = cfg.limits.max_result_bytes;
    b.kill_grace_ms = p.kill_grace.as_millis() as u64;
    b.curve_keys = curve_keys;
    b
}

/// What `fnx config check` shows of a batch pool: its first block's files, batch script and
/// launch line, rendered without starting or submitting anything, and a warning when the
/// managers' address cannot be known on this host (an interface it does not have).
pub type DryRun = (BlockFiles, Rendered, Option<String>);

/// Render pool `i`'s first block as [`DryRun`] (None: not a batch pool).
pub fn dry_run(cfg: &SiteConfig, i: usize) -> Option<Result<DryRun, blocks::BlockError>> {
    let p = &cfg.pools[i];
    let bc = p.blocks.as_ref()?;
    Some((|| {
        let port = pool_port(cfg, i);
        let bound = if port == 0 {
            "tcp://x:PORT".to_string()
        } else {
            format!("tcp://x:{port}")
        };
        let (endpoint, warning) =
            match blocks::manager_endpoint(&bound, &cfg.interchange.address, &bc.connect) {
                Ok(e) => (e, None),
                Err(e) => match &bc.connect {
                    crate::config::Connect::Interface(name) => (
                        format!(
                            "tcp://ADDRESS-OF-{name}:{}",
                            bound.rsplit(':').next().unwrap_or("")
                        ),
                        Some(format!("{e}; the daemon resolves it where it runs")),
                    ),
                    _ => return Err(e),
                },
            };
        let keys = Some(
            cfg.shared()
                .join("keys")
                .join(format!("{}.manager", p.name)),
        );
        let template = manager_template(cfg, p, endpoint, keys);
        let fnx = fnx_path(bc).map_err(blocks::BlockError::Fnx)?;
        let (files, rendered) =
            blocks::render_block(bc, &pool_run_dir(cfg.shared(), &p.name), &template, &fnx, 0)?;
        Ok((files, rendered, warning))
    })())
}

fn fnx_path(bc: &BlocksConfig) -> std::io::Result<PathBuf> {
    match &bc.fnx_path {
        Some(p) => Ok(p.clone()),
        None => std::env::current_exe(),
    }
}

/// A started pool: its interchange (and local managers), and for batch pools the block thread.
struct Started {
    pool: LocalPool,
    /// Its block thread's work (batch pools).
    blocks: Option<Box<dyn FnOnce(Arc<AtomicBool>) + Send>>,
    report: Arc<Mutex<PoolReport>>,
}

fn start_pool(
    cfg: &SiteConfig,
    i: usize,
    p: &PoolConfig,
    curve: LinkKeys,
) -> Result<Started, DaemonError> {
    let run_dir = pool_run_dir(cfg.shared(), &p.name);
    prepare_dir_mode(&run_dir, passage_mode(cfg))?;
    if let Some(runs) = run_dir.parent() {
        let _ = std::fs::set_permissions(runs, std::fs::Permissions::from_mode(passage_mode(cfg)));
    }
    let keys = curve.file.clone();
    let unix = cfg.users.mode == crate::config::UsersMode::Unix;
    let link = curve.clone();
    // Users' managers started here, on demand (batch pools start theirs in users' blocks).
    let per_user = (unix && p.blocks.is_none()).then(|| crate::local::PerUser {
        identities: crate::identity::Identities::new(&cfg.users),
        idle: cfg.users.user_idle,
    });
    let address = &cfg.interchange.address;
    let bind = match address.contains(':') {
        true => format!("tcp://[{address}]:{}", pool_port(cfg, i)),
        false => format!("tcp://{address}:{}", pool_port(cfg, i)),
    };
    let opts = PoolOptions {
        bind: bind.clone(),
        report_dispatch: true,
        inputs: Some(store_path(&cfg.data_dir)),
        max_payload_bytes: cfg.limits.max_payload_bytes,
        managers: p.managers,
        workers: p.workers_per_manager,
        shape: p.shape.clone(),
        python: p.python.clone(),
        heartbeat_period: cfg.interchange.heartbeat_period,
        heartbeat_threshold: cfg.interchange.heartbeat_threshold,
        warm_window: cfg.interchange.warm_window,
        max_result_bytes: cfg.limits.max_result_bytes,
        kill_grace: p.kill_grace,
        // Managers this daemon starts on loopback authenticate with a password (no need to
        // encrypt what other accounts cannot read); managers from elsewhere need the keys.
        curve: if p.blocks.is_none()
            && (p.managers > 0 || cfg.users.mode == crate::config::UsersMode::Unix)
            && !cfg.interchange.encrypt_loopback
            && crate::local::is_loopback(&bind)
        {
            None
        } else {
            Some(curve)
        },
        env: Some(cfg.child_env()),
        home: if per_user.is_none() && p.blocks.is_none() {
            Some(private_home(&p.name)?)
        } else {
            None
        },
        // Tasks under the daemon's own account are kept away from its files (Landlock).
        protect: if per_user.is_none() {
            let mut p = vec![cfg.data_dir.clone()];
            // With a shared_dir: its keys and every manager's run directory too (a manager's
            // own runtime and task directories stay reachable: fnx_sys::landlock exceptions).
            for d in [cfg.shared().join("keys"), cfg.shared().join("runs")] {
                if !d.starts_with(&cfg.data_dir) {
                    p.push(d);
                }
            }
            p
        } else {
            Vec::new()
        },
        per_user,
        ..PoolOptions::new(run_dir.clone(), run_id(&p.name))
    };
    let pool_err = |msg: String| DaemonError::Pool {
        pool: p.name.clone(),
        source: crate::local::LocalError::Managers(msg),
    };
    let pool = LocalPool::start(opts).map_err(|source| DaemonError::Pool {
        pool: p.name.clone(),
        source,
    })?;
    let report = Arc::new(Mutex::new(PoolReport {
        provider: "local",
        launcher: "single",
        run_dir: run_dir.clone(),
        ..PoolReport::default()
    }));
    let blocks = match &p.blocks {
        None => None,
        Some(bc) => {
            let endpoint = blocks::manager_endpoint(
                pool.handle.endpoint(),
                &cfg.interchange.address,
                &bc.connect,
            )
            .map_err(|e| pool_err(e.to_string()))?;
            let fnx = fnx_path(bc).map_err(|e| pool_err(format!("cannot find fnx: {e}")))?;
            tracing::info!(
                "pool {}: {} blocks of {} nodes ({} launcher), managers connect to {endpoint}",
                p.name,
                bc.spec.provider.name(),
                bc.spec.nodes,
                bc.spec.launcher.name()
            );
            let template = manager_template(cfg, p, endpoint, keys);
            let work: Box<dyn FnOnce(Arc<AtomicBool>) + Send> = if unix {
                let users = crate::user_blocks::UserBlockPools {
                    name: p.name.clone(),
                    cfg: bc.clone(),
                    slots: p.workers_per_manager,
                    handle: pool.handle.clone(),
                    report: report.clone(),
                    template,
                    fnx,
                    identities: crate::identity::Identities::new(&cfg.users),
                    env: cfg.child_env(),
                    keys: link,
                };
                Box::new(move |stop| users.run(stop))
            } else {
                let bp = BlockPool::new(
                    &p.name,
                    bc.clone(),
                    p.workers_per_manager,
                    pool.handle.clone(),
                    report.clone(),
                    template,
                    fnx,
                    None,
                );
                Box::new(move |stop| bp.run(stop))
            };
            Some(work)
        }
    };
    Ok(Started {
        pool,
        blocks,
        report,
    })
}

/// Every pool's link keys (issued on first use), in pool order. Local managers get theirs on
/// their standard input; managers started elsewhere read the pool's key file.
fn encryption(cfg: &SiteConfig) -> Result<Vec<LinkKeys>, DaemonError> {
    let keys = Keys::open(&cfg.shared().join("keys"))?;
    let mut out = Vec::new();
    for p in &cfg.pools {
        let link = keys.link(&p.name)?;
        if p.blocks.is_some() || p.managers == 0 {
            tracing::info!(
                "pool {}: manager links are encrypted (CurveZMQ); managers started outside the \
                 daemon need --curve-keys {}",
                p.name,
                link.file.as_deref().unwrap_or(Path::new("?")).display()
            );
        }
        out.push(link);
    }
    Ok(out)
}

/// Forward a pool's events to the writer and keep its managers running, until `stop`.
fn pump(mut pool: LocalPool, writer: Sender<Cmd>, stop: Arc<AtomicBool>, name: String) {
    // Managers that ended are replaced at once, but at most 5 a minute: a crash loop backs off
    // for 30 s (without ever holding up the events of the managers that still run).
    let mut restarts: Vec<Instant> = Vec::new();
    let (mut owed, mut not_before) = (0u32, Instant::now());
    while !stop.load(Ordering::Relaxed) {
        match pool.events.recv_timeout(Duration::from_millis(100)) {
            Ok(Event::Finished(f)) => {
                let _ = writer.send(Cmd::Finished(f));
            }
            Ok(Event::Dispatched(d)) => {
                let _ = writer.send(Cmd::Dispatched(d));
            }
            Ok(Event::Started(s)) => {
                let _ = writer.send(Cmd::Started(s));
            }
            Ok(Event::Notice(_)) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
        for exit in pool.poll_exits() {
            tracing::warn!(
                "pool {name}: manager {} ended ({}); its log: {}",
                exit.uid,
                exit.status,
                exit.log.display()
            );
            // Users' managers start again when their users have work, not at once.
            owed += u32::from(!pool.per_user());
        }
        pool.serve_users();
        let now = Instant::now();
        if owed == 0 || now < not_before {
            continue;
        }
        restarts.retain(|t| now.duration_since(*t) < Duration::from_secs(60));
        if restarts.len() >= 5 {
            tracing::error!(
                "pool {name}: 5 managers ended within a minute; the next starts in 30 s"
            );
            not_before = now + Duration::from_secs(30);
            restarts.clear();
            continue;
        }
        restarts.push(now);
        owed -= 1;
        match pool.replace_manager() {
            Ok(uid) => tracing::info!("pool {name}: started manager {uid}"),
            Err(e) => tracing::error!("pool {name}: cannot start a manager: {e}"),
        }
    }
    pool.stop_all("the daemon is stopping");
    // Outcomes reported while stopping are still recorded.
    while let Ok(ev) = pool.events.try_recv() {
        if let Event::Finished(f) = ev {
            let _ = writer.send(Cmd::Finished(f));
        }
    }
}

/// A store error at start; a damaged file is described (its damaged pages and their byte
/// offsets) with the way out.
pub(crate) fn store_failure(path: &Path, source: store::StoreError) -> DaemonError {
    if store::salvage::is_damage(&source) {
        return DaemonError::Damaged {
            path: path.to_path_buf(),
            detail: format!("{source}: {}", store::salvage::describe_damage(path)),
        };
    }
    DaemonError::Store {
        path: path.to_path_buf(),
        source,
    }
}

/// Run the daemon until `shutdown` completes: serve the API on `listener` (bound by the
/// caller), run the pools, and commit everything before returning.
pub fn run(
    cfg: SiteConfig,
    listener: std::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    let started = Instant::now();
    prepare_dir_mode(&cfg.data_dir, passage_mode(&cfg))?;
    let _lock = crate::lock::lock_data_dir(&cfg.data_dir)?;
    let path = store_path(&cfg.data_dir);
    let serr = |source| store_failure(&path, source);
    let mut damage = store::wal_damage(&path);
    if let Some(d) = &damage {
        tracing::warn!("{d}; task, function and result numbers skip ahead so that none is reused");
    }
    if cfg.store.salvage && path.exists() {
        tracing::warn!(
            "--salvage: moving {} aside and copying what can be read",
            path.display()
        );
        let saved = store::salvage::salvage(&path).map_err(serr)?;
        tracing::warn!(
            "salvaged the store {}: {saved}; task, function and result numbers skip ahead so \
             that none is reused",
            path.display()
        );
        damage = Some(format!("salvaged from {}", saved.damaged.display()));
    }
    let conn = store::open_writer(&path, cfg.store.sync == SyncMode::Full).map_err(serr)?;
    private_store_files(&path);
    if let Some(max) = cfg.store.max_size_bytes {
        let page: i64 = conn
            .pragma_query_value(None, "page_size", |r| r.get(0))
            .map_err(|e| serr(e.into()))?;
        conn.pragma_update(None, "max_page_count", (max as i64 / page).max(16))
            .map_err(|e| serr(e.into()))?;
    }
    first_start(&conn, &cfg, &path)?;
    if let Some((running, started)) = store::crash_check(&conn).map_err(serr)? {
        tracing::warn!(
            "the last daemon did not stop in order (it crashed or was killed) with {running} \
             tasks dispatched, {started} of them started; each started one that had also \
             started in the {} crash(es) before fails as daemon_crashed \
             (limits.max_daemon_crashes)",
            cfg.limits.max_daemon_crashes.saturating_sub(1)
        );
    }
    let per_user = cfg.users.mode == crate::config::UsersMode::Unix;
    let loaded = load(&conn, &path, per_user, cfg.limits.spill_bytes)?;
    let mut pools = Vec::new();
    let links = encryption(&cfg)?;
    // Each pool's port (interchange.port + i) is held from now until its interchange binds
    // it: the managers of the pools started before connect out from ephemeral ports, and one
    // of those must not take a later pool's port.
    let mut held: Vec<Option<std::net::TcpListener>> =
        (0..cfg.pools.len()).map(|i| hold_port(&cfg, i)).collect();
    for ((i, p), keys) in cfg.pools.iter().enumerate().zip(links) {
        drop(held[i].take());
        pools.push(start_pool(&cfg, i, p, keys)?);
    }
    let reports: Vec<_> = pools.iter().map(|s| s.report.clone()).collect();
    let mut block_pools = Vec::new();
    let pools: Vec<LocalPool> = pools
        .into_iter()
        .map(|s| {
            block_pools.extend(s.blocks);
            s.pool
        })
        .collect();
    let names: Vec<String> = cfg.pools.iter().map(|p| p.name.clone()).collect();
    let (wtx, wrx) = channel();
    let builds = crate::builds::Builds::new(crate::builds::BuildConfig {
        dir: cfg
            .builds
            .dir
            .clone()
            .unwrap_or_else(|| cfg.shared().join("images")),
        command: cfg.builds.command.clone(),
        base: cfg.builds.base_image.clone(),
        timeout: cfg.builds.timeout,
        max_running: cfg.builds.max_running,
        max_per_user: cfg.builds.max_per_user,
    });
    let building: HashMap<_, _> = loaded
        .functions
        .iter()
        .filter_map(|(def, build, _)| Some((def.id, build.clone()?)))
        .collect();
    let counts = recover(
        loaded,
        &pools,
        &names,
        &wtx,
        &builds,
        per_user,
        cfg.limits.max_daemon_crashes,
    );
    let shared = Arc::new(Shared::new(Stats {
        users: counts,
        ..Stats::default()
    }));
    let handles: HashMap<String, _> = names
        .iter()
        .cloned()
        .zip(pools.iter().map(|p| p.handle.clone()))
        .collect();
    let refs: Vec<PoolRef> = names
        .iter()
        .cloned()
        .zip(pools.iter().zip(reports))
        .map(|(name, (p, report))| PoolRef {
            mem_per_worker_mb: cfg
                .pools
                .iter()
                .find(|pc| pc.name == name)
                .and_then(|pc| pc.shape.mem_per_worker_mb),
            name,
            handle: p.handle.clone(),
            report,
        })
        .collect();
    let wcfg = WriterConfig::of_site(&cfg);
    let writer =
        Writer::new(conn, wcfg, shared.clone(), handles, damage.is_some()).map_err(serr)?;
    let writer_thread = std::thread::Builder::new()
        .name("store-writer".into())
        .spawn(move || writer.run(wrx))
        .map_err(io("cannot start the store writer"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut pumps = Vec::new();
    for (pool, name) in pools.into_iter().zip(names.iter().cloned()) {
        let (w, s) = (wtx.clone(), stop.clone());
        pumps.push(
            std::thread::Builder::new()
                .name(format!("pool-{name}"))
                .spawn(move || pump(pool, w, s, name))
                .map_err(io("cannot start a pool thread"))?,
        );
    }
    for (bp, name) in block_pools.into_iter().zip(
        cfg.pools
            .iter()
            .filter(|p| p.blocks.is_some())
            .map(|p| p.name.clone()),
    ) {
        let s = stop.clone();
        pumps.push(
            std::thread::Builder::new()
                .name(format!("blocks-{name}"))
                .spawn(move || bp(s))
                .map_err(io("cannot start a block thread"))?,
        );
    }
    let python = cfg.pools[0].python.clone();
    let app = Arc::new(App::new(
        Reader::new(&path),
        wtx,
        shared,
        refs,
        cfg.limits.clone(),
        python,
        path.clone(),
        builds,
        crate::identity::Identities::new(&cfg.users),
    ));
    if let Ok(mut b) = app.building.lock() {
        *b = building;
    }
    let socket = match &cfg.socket {
        Some(p) => Some((bind_socket(p)?, p.clone())),
        None => None,
    };
    tracing::info!(
        "fnx daemon ready in {:.2} s: API on http://{}{}, store {}, users mode {:?}",
        started.elapsed().as_secs_f64(),
        cfg.listen,
        socket
            .as_ref()
            .map(|(_, p)| format!(" and unix://{}", p.display()))
            .unwrap_or_default(),
        path.display(),
        cfg.users.mode
    );
    // Ready: a crash from now on counts against the tasks running then.
    if let Err(e) = rusqlite::Connection::open(&path)
        .map_err(store::StoreError::from)
        .and_then(|c| {
            c.busy_timeout(Duration::from_secs(10))?;
            store::mark_running(&c)
        })
    {
        tracing::warn!("cannot mark the store as in use: {e} (a crash will not be counted)");
    }
    let socket_path = socket.as_ref().map(|(_, p)| p.clone());
    let served = serve(app.clone(), listener, socket.map(|(l, _)| l), shutdown);
    if let Some(p) = socket_path {
        let _ = std::fs::remove_file(p);
    }
    served?;
    // Stop in order: no new requests, pools (their last outcomes go to the writer), writer.
    app.accepting.store(false, Ordering::Relaxed);
    app.builds.stop_all();
    stop.store(true, Ordering::Relaxed);
    for p in pumps {
        let _ = p.join();
    }
    drop(app);
    let _ = writer_thread.join();
    if let Err(e) = store::open_writer(&path, true).and_then(|c| store::mark_stopped(&c)) {
        tracing::warn!("cannot mark the store as stopped in order: {e}");
    }
    tracing::info!("fnx daemon stopped; everything is committed");
    Ok(())
}
