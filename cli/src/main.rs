//! `fnx`: the one binary of fnx. Every role is a subcommand.
//!
//! Exit codes (documented in `--help`): 0 success, 1 some task failed, 2 usage or
//! configuration error, 3 a manager lost or was refused by its interchange, 130 interrupted.

use clap::{Parser, Subcommand};
use mimalloc::MiMalloc;
use std::process::ExitCode;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

extern "C" {
    /// mimalloc's own: collect this thread's heap and, forced, purge every arena's freed pages
    /// now (they would otherwise wait for a later allocation after the purge delay).
    fn mi_collect(force: bool);
}

fn release_free_memory() {
    // SAFETY: mi_collect takes no pointers; it walks mimalloc's own structures under its locks.
    unsafe { mi_collect(true) }
}

mod bench;
mod bench_api;
mod client;
mod daemon_cmd;
mod input;
mod logging;
mod manager_cmd;
mod map;
mod map_daemon;
mod map_launch;
mod output;
mod run_options;
mod token_cmd;

/// Exit status: every task succeeded.
pub const EXIT_OK: u8 = 0;
/// Exit status: at least one task failed.
pub const EXIT_TASK_FAILED: u8 = 1;
/// Exit status: bad usage or configuration.
pub const EXIT_USAGE: u8 = 2;
/// Exit status: a manager was refused by or lost its interchange.
pub const EXIT_LINK: u8 = 3;
/// Exit status: interrupted by SIGINT or SIGTERM.
pub const EXIT_INTERRUPTED: u8 = 130;

const AFTER_HELP: &str = "\
Exit status:
  0    every task succeeded
  1    at least one task failed (see the output lines with \"ok\": false)
  2    usage or configuration error (nothing ran)
  130  interrupted by Ctrl-C (SIGINT) or SIGTERM; no process is left behind

Environment:
  FNX_HOME   where run directories (logs) go: $FNX_HOME/runs/ (default ~/.fnx)
  FNX_LOG    log filter for fnx's own log files (default: info)";

/// fnx runs functions — Python functions and shell commands — on many cores and nodes, fast,
/// without losing any.
#[derive(Parser, Debug)]
#[command(name = "fnx", version, about, long_about = None, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a function over many inputs (one JSON line each) and write one result line each.
    Map(map::MapArgs),
    /// Run a function once and print its result.
    Run(map::RunArgs),
    /// Measure fnx's own overhead.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Run the fnx service: durable task store, HTTP API, pools of workers.
    Daemon(daemon_cmd::DaemonArgs),
    /// Submit one task to the daemon.
    Submit(client::SubmitArgs),
    /// Show a task's result (optionally waiting for it).
    Result(client::ResultArgs),
    /// Cancel a task.
    Cancel(client::CancelArgs),
    /// Show the daemon's pools, managers and task counts.
    Status(client::StatusArgs),
    /// Drain or cancel a batch pool's block (admins).
    #[command(subcommand)]
    Block(client::BlockCommand),
    /// Register, list and show functions.
    #[command(subcommand)]
    Function(client::FunctionCommand),
    /// Create, list and revoke API tokens (admin, on the daemon's host; writes its store
    /// directly). Users may also manage their own through the API (/v1/tokens).
    #[command(subcommand)]
    Token(token_cmd::TokenCommand),
    /// Validate site configurations.
    #[command(subcommand)]
    Config(daemon_cmd::ConfigCommand),
    /// Run a node manager (started by fnx itself or by a launcher inside a batch job).
    #[command(hide = true)]
    Manager(manager_cmd::ManagerArgs),
}

fn main() -> ExitCode {
    fnx_sys::memory::set_release_hook(release_free_memory);
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { EXIT_OK };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    if matches!(
        cli.command,
        Command::Submit(_)
            | Command::Result(_)
            | Command::Cancel(_)
            | Command::Status(_)
            | Command::Block(_)
            | Command::Function(_)
            | Command::Token(_)
            | Command::Config(_)
    ) {
        // Commands that only print: `fnx status | head` ends quietly when the reader goes away,
        // like other Unix tools (the runners keep SIGPIPE ignored and handle EPIPE themselves).
        // SAFETY: setting a signal disposition before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let code = match cli.command {
        Command::Map(args) => map::run_map(args),
        Command::Run(args) => map::run_once(args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Manager(args) => manager_cmd::run(args),
        Command::Daemon(args) => daemon_cmd::run_daemon(args),
        Command::Submit(args) => client::finish(client::submit(args)),
        Command::Result(args) => client::finish(client::result(args)),
        Command::Cancel(args) => client::finish(client::cancel(args)),
        Command::Status(args) => client::finish(client::status(args)),
        Command::Block(cmd) => client::finish(client::block(cmd)),
        Command::Function(cmd) => client::finish(client::function(cmd)),
        Command::Token(cmd) => token_cmd::token(cmd),
        Command::Config(cmd) => daemon_cmd::config(cmd),
    };
    ExitCode::from(code)
}
