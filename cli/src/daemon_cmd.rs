//! `fnx daemon` and `fnx config check`.

use crate::{EXIT_OK, EXIT_TASK_FAILED, EXIT_USAGE};
use clap::{Args, Subcommand};
use fnx_daemon::config::SiteConfig;
use std::path::PathBuf;

/// `fnx daemon`.
#[derive(Args, Debug)]
#[command(after_help = "\
With no options the daemon runs on embedded defaults: data directory $FNX_HOME (default ~/.fnx)
holding the SQLite store fnx.db, one local pool (one manager, a worker per core), and the HTTP
API on 127.0.0.1:8470. On its first start it creates an admin user for you and writes the URL
and token to <data dir>/client.json (mode 0600), where `fnx submit` and the Python SDK find them.

SIGTERM or Ctrl-C stops it gracefully: no new requests, everything accepted is committed.
Logs go to stderr (journald under systemd) or to [daemon] log_file; manager and worker logs are
under <data dir>/runs/<pool>/. FNX_LOG sets the log filter (default info).
Exit status: 0 stopped cleanly, 1 failed while running, 2 bad configuration or cannot start.")]
pub struct DaemonArgs {
    /// Site configuration (TOML); see scripts/systemd/site.toml and docs/admin.md.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// HTTP API address (overrides [daemon] listen).
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<std::net::SocketAddr>,
    /// Data directory (overrides [daemon] data_dir).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The store is damaged (the daemon said so and named the pages): move it aside (kept as
    /// fnx.db.damaged-TIME) and copy every row that can still be read into a new store, then
    /// start. The log says what was copied and which row ids were lost.
    #[arg(long)]
    pub salvage: bool,
}

pub(crate) fn load(config: Option<&PathBuf>) -> Result<SiteConfig, String> {
    match config {
        Some(f) => SiteConfig::load(f).map_err(|e| e.to_string()),
        None => Ok(SiteConfig::defaults()),
    }
}

fn init_logging(file: Option<&PathBuf>) -> Result<(), String> {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("FNX_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_thread_names(true);
    match file {
        Some(path) => {
            let f = std::fs::File::options()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("cannot open the log file {}: {e}", path.display()))?;
            let _ = b
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(f))
                .try_init();
        }
        None => {
            use std::io::IsTerminal;
            let ansi = std::io::stderr().is_terminal();
            let _ = b.with_ansi(ansi).with_writer(std::io::stderr).try_init();
        }
    }
    Ok(())
}

async fn signalled() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
}

/// `fnx daemon`.
pub fn run_daemon(a: DaemonArgs) -> u8 {
    let mut cfg = match load(a.config.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fnx daemon: {e}");
            return EXIT_USAGE;
        }
    };
    if let Some(l) = a.listen {
        cfg.listen = l;
    }
    cfg.store.salvage = a.salvage;
    if let Some(d) = a.data_dir {
        // The default socket lives in the data directory: it moves with it.
        if cfg.socket.as_deref() == Some(cfg.data_dir.join("fnx.sock").as_path()) {
            cfg.socket = Some(d.join("fnx.sock"));
        }
        cfg.data_dir = d;
    }
    // Everything the daemon creates (store, keys, logs, run directories) is its own unless it
    // says otherwise; its children start with the same umask.
    // SAFETY: umask cannot fail.
    unsafe {
        libc::umask(0o077);
    }
    // The log may be in a directory that does not exist yet (the data directory, on a first
    // start): create it, as the daemon creates the others it names.
    if let Some(dir) = cfg.log_file.as_ref().and_then(|f| f.parent()) {
        if let Err(e) = std::fs::create_dir_all(dir) {
            eprintln!(
                "fnx daemon: cannot create {} for [daemon] log_file: {e}",
                dir.display()
            );
            return EXIT_USAGE;
        }
    }
    if let Err(e) = init_logging(cfg.log_file.as_ref()) {
        eprintln!("fnx daemon: {e}");
        return EXIT_USAGE;
    }
    // The capabilities of `unix` mode (ambient, from systemd or setpriv) serve only the
    // children that become users; nothing else the daemon starts (batch commands, image builds,
    // the signature reader) gets any.
    if let Err(e) = fnx_sys::user::keep_capabilities_to_self() {
        tracing::warn!("cannot clear the ambient capabilities: {e}");
    }
    // Keep processes of the same account (user code in a shared-account pool) out of the
    // daemon's memory, environment and descriptors (/proc/PID/mem, environ, fd; ptrace).
    if let Err(e) = fnx_sys::process::set_undumpable() {
        tracing::warn!("cannot protect the daemon's memory from same-account processes: {e}");
    }
    let listener = match std::net::TcpListener::bind(cfg.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "fnx daemon: cannot listen on {}: {e} (is another daemon running? see --listen)",
                cfg.listen
            );
            return EXIT_USAGE;
        }
    };
    match fnx_daemon::service::run(cfg, listener, signalled()) {
        Ok(()) => EXIT_OK,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("fnx daemon: {e}");
            EXIT_TASK_FAILED
        }
    }
}

/// `fnx config ...`.
#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Validate a site configuration (every bad key is named with its path) and show, for each
    /// batch pool, the batch script its blocks would be submitted with and the manager launch
    /// line: a dry run that submits nothing
    Check {
        /// The file.
        file: PathBuf,
        /// Print only the summary, not the batch scripts.
        #[arg(long)]
        quiet: bool,
    },
}

/// `fnx config check`.
pub fn config(cmd: ConfigCommand) -> u8 {
    let ConfigCommand::Check { file, quiet } = cmd;
    let c = match SiteConfig::load(&file) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fnx config check: {e}");
            return EXIT_USAGE;
        }
    };
    let warnings = std::fs::read_to_string(&file)
        .map(|text| c.warnings(&text))
        .unwrap_or_default();
    if warnings.is_empty() {
        println!("{}: OK", file.display());
    } else {
        println!(
            "{}: valid, with {} warning(s):",
            file.display(),
            warnings.len()
        );
        for w in &warnings {
            println!("  warning: {w}");
        }
    }
    println!(
        "  data dir {}; API on http://{}; interchange on {} (port {}), manager links encrypted \
         and authenticated (CurveZMQ)",
        c.data_dir.display(),
        c.listen,
        c.interchange.address,
        if c.interchange.port == 0 {
            "any free".to_string()
        } else {
            format!("{} + pool index", c.interchange.port)
        },
    );
    let mut code = EXIT_OK;
    for (i, p) in c.pools.iter().enumerate() {
        let workers = p
            .workers_per_manager
            .map_or("one per core".to_string(), |w| w.to_string());
        let Some(b) = &p.blocks else {
            println!(
                "  pool {}: local, {} manager(s), workers per manager: {workers}, python {}",
                p.name, p.managers, p.python
            );
            continue;
        };
        println!(
            "  pool {}: {} blocks of {} node(s) started with {}, {}..{} blocks (init {}), \
             walltime {}, workers per node: {workers}",
            p.name,
            b.spec.provider.name(),
            b.spec.nodes,
            b.spec.launcher.name(),
            b.min_blocks,
            b.max_blocks,
            b.init_blocks,
            fnx_launcher::block::format_walltime(b.spec.walltime),
        );
        match fnx_daemon::service::dry_run(&c, i) {
            Some(Ok((files, r, warning))) => {
                if let Some(w) = warning {
                    eprintln!("fnx config check: pool {}: warning: {w}", p.name);
                }
                if !quiet {
                    println!(
                        "\n--- pool {}: batch script of block 0 ({}) ---",
                        p.name,
                        files.script.display()
                    );
                    print!("{}", r.script);
                    println!(
                        "--- pool {}: manager launch line ---\n{}\n",
                        p.name, r.launch_line
                    );
                }
            }
            Some(Err(e)) => {
                eprintln!("fnx config check: pool {}: {e}", p.name);
                code = EXIT_USAGE;
            }
            None => {}
        }
    }
    code
}
