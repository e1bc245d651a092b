//! `fnx map` and `fnx run`: embedded mode.

use crate::input::{self, LineKind};
use crate::output::{self, Progress, ResultWriter, Tally};
pub(crate) use crate::run_options::{validate_options, RunOptions};
use crate::{logging, EXIT_INTERRUPTED, EXIT_OK, EXIT_TASK_FAILED, EXIT_USAGE};
use clap::{Args, ValueEnum};
use fnx_daemon::local::LocalPool;
use fnx_interchange::{Event, NewTask, Notice};
use fnx_protocol::{
    ErrorKind, FunctionBody, FunctionDef, FunctionId, Outcome, Payload, TaskError, TaskId,
};
use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, TryRecvError};
use std::time::{Duration, Instant};

/// When to draw a progress bar.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ProgressMode {
    /// When stderr is a terminal.
    Auto,
    /// Always.
    Always,
    /// Never.
    Never,
}

/// `fnx map`.
#[derive(Args, Debug)]
#[command(after_help = MAP_HELP)]
pub struct MapArgs {
    /// Python function as MODULE:NAME (imported with the current directory and PYTHONPATH) or
    /// FILE.py:NAME
    #[arg(required_unless_present = "shell", conflicts_with = "shell")]
    pub function: Option<String>,
    /// Run a shell command template instead; each {name} becomes one argument, never shell code
    #[arg(long, value_name = "TEMPLATE")]
    pub shell: Option<String>,
    /// Input: one JSON array (positional arguments) or object (keyword arguments / template
    /// parameters) per line; '-' for stdin
    #[arg(short, long, default_value = "-")]
    pub input: String,
    /// Output: one JSON result line per input line; '-' for stdout
    #[arg(short, long, default_value = "-")]
    pub output: String,
    /// Write results in input order (default: as they complete)
    #[arg(long)]
    pub ordered: bool,
    /// Progress bar on stderr
    #[arg(long, value_enum, default_value = "auto")]
    pub progress: ProgressMode,
    /// Send the tasks to a running `fnx daemon` instead of starting workers here (URL optional:
    /// default from FNX_URL or $FNX_HOME/client.json); --workers, --managers and --python are
    /// then the daemon's business
    #[arg(long, value_name = "URL", num_args = 0..=1, default_missing_value = "")]
    pub daemon: Option<String>,
    /// API token for --daemon (default: FNX_TOKEN or $FNX_HOME/client.json)
    #[arg(long, env = "FNX_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[command(flatten)]
    pub run: RunOptions,
    #[command(flatten)]
    pub launch: crate::map_launch::LaunchArgs,
}

const MAP_HELP: &str = "\
Output lines:
  {\"index\": N, \"ok\": true, \"result\": ...}
  {\"index\": N, \"ok\": false, \"error\": {\"kind\": K, \"type\": T, \"message\": M, \"traceback\": TB}}
  N is the 0-based input line number. K is one of exception, worker_lost, manager_lost, walltime,
  result_too_large, bad_input, not_serializable, import_error, cancelled. Shell results are
  {\"returncode\", \"stdout\", \"stderr\"} (64 KiB tails); a non-zero exit is an exception.

Examples:
  fnx map mymod:simulate --input params.jsonl --output results.jsonl --workers 64
  fnx map ./analysis.py:score --input params.jsonl
  fnx map --shell 'gzip -k {path}' --input files.jsonl

Exit status: 0 all succeeded, 1 some task failed, 2 usage or configuration error,
130 interrupted (Ctrl-C/SIGTERM; every process of the run is stopped).
Logs: each manager and worker writes its own log under the run directory; its path is printed
when a task fails for an infrastructure reason.";

/// `fnx run`.
#[derive(Args, Debug)]
#[command(
    after_help = "Example:\n  fnx run mymod:simulate -- '[1, 2]'\n\nPrints the result as JSON on stdout. \
On failure prints the error and traceback on stderr and exits 1."
)]
pub struct RunArgs {
    /// Python function as MODULE:NAME or FILE.py:NAME
    #[arg(required_unless_present = "shell", conflicts_with = "shell")]
    pub function: Option<String>,
    /// Run a shell command template instead
    #[arg(long, value_name = "TEMPLATE")]
    pub shell: Option<String>,
    /// The arguments: one JSON array or object (default: [] / {})
    #[arg(last = true)]
    pub args: Vec<String>,
    #[command(flatten)]
    pub run: RunOptions,
}

pub(crate) fn fail_usage(msg: impl std::fmt::Display) -> u8 {
    eprintln!("fnx: {msg}");
    EXIT_USAGE
}

pub(crate) fn resolve(
    function: &Option<String>,
    shell: &Option<String>,
) -> Result<(FunctionBody, LineKind), String> {
    match (function, shell) {
        (_, Some(template)) => {
            input::shell_function(template).map(|(body, t)| (body, LineKind::Shell(t)))
        }
        (Some(f), None) => input::python_function(f).map(|body| (body, LineKind::Python)),
        (None, None) => Err("give a FUNCTION or --shell TEMPLATE".into()),
    }
}

fn default_run_dir() -> PathBuf {
    let home = std::env::var_os("FNX_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into())).join(".fnx")
        });
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    home.join("runs")
        .join(format!("{}-{}", timestamp(secs as i64), std::process::id()))
}

fn timestamp(secs: i64) -> String {
    // SAFETY: localtime_r fills the struct it is given.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&secs, &mut tm);
        tm
    };
    format!(
        "{:04}{:02}{:02}-{:02}{:02}{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// One parsed chunk of input.
pub(crate) enum InputMsg {
    Lines(Vec<(u64, Result<Payload, String>)>),
    Done,
    Failed(String),
}

const CHUNK: usize = 1024;
pub(crate) const WINDOW: usize = 200_000;

pub(crate) fn spawn_reader(source: Box<dyn BufRead + Send>, kind: LineKind) -> Receiver<InputMsg> {
    let (tx, rx) = sync_channel(8);
    std::thread::spawn(move || {
        let mut chunk = Vec::with_capacity(CHUNK);
        let mut buf = Vec::new();
        let mut source = source;
        let mut index = 0u64;
        loop {
            buf.clear();
            match source.read_until(b'\n', &mut buf) {
                Ok(0) => break,
                Ok(_) => {
                    let parsed = match std::str::from_utf8(&buf) {
                        Ok(line) => input::parse_line(&kind, line),
                        Err(_) => Some(Err("the line is not valid UTF-8".to_string())),
                    };
                    if let Some(p) = parsed {
                        chunk.push((index, p.map_err(|e| format!("line {}: {e}", index + 1))));
                    }
                    index += 1;
                    if chunk.len() >= CHUNK
                        && tx
                            .send(InputMsg::Lines(std::mem::take(&mut chunk)))
                            .is_err()
                    {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(InputMsg::Lines(std::mem::take(&mut chunk)));
                    let _ = tx.send(InputMsg::Failed(format!("cannot read the input: {e}")));
                    return;
                }
            }
        }
        let _ = tx.send(InputMsg::Lines(chunk));
        let _ = tx.send(InputMsg::Done);
    });
    rx
}

/// Where outcomes go.
pub trait Sink {
    /// `index` will produce an outcome (called in input order, before its outcome).
    fn expect(&mut self, index: u64);
    /// A task's outcome.
    fn outcome(&mut self, index: u64, outcome: &Outcome) -> std::io::Result<()>;
    /// Called every loop round (about every 20 ms), so buffered output reaches readers.
    fn tick(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    /// Finished outcomes held back (e.g. waiting for their turn in input order); they count
    /// against the in-flight window so memory stays bounded.
    fn held(&self) -> usize {
        0
    }
}

impl Sink for ResultWriter {
    fn expect(&mut self, index: u64) {
        ResultWriter::expect(self, index);
    }
    fn outcome(&mut self, index: u64, outcome: &Outcome) -> std::io::Result<()> {
        let (line, _) = output::result_line(index, outcome);
        self.write(index, line)
    }
    fn tick(&mut self) -> std::io::Result<()> {
        self.maybe_flush()
    }
    fn held(&self) -> usize {
        self.pending_len()
    }
}

/// How a run ended.
pub struct Report {
    pub(crate) tally: Tally,
    pub(crate) interrupted: bool,
    pub(crate) input_error: Option<String>,
    pub(crate) run_dir: PathBuf,
    pub(crate) infra_failures: bool,
    pub(crate) elapsed: Duration,
}

pub(crate) struct Accounting<'a> {
    pub(crate) sink: &'a mut dyn Sink,
    pub(crate) progress: &'a mut Progress,
    pub(crate) tally: Tally,
    pub(crate) infra: bool,
    pub(crate) run_dir: PathBuf,
    pub(crate) outstanding: HashSet<u64>,
}

impl Accounting<'_> {
    pub(crate) fn finish(&mut self, index: u64, outcome: &Outcome) -> std::io::Result<()> {
        let kind = match outcome {
            Outcome::Ok(_) => None,
            Outcome::Err(e) => Some(e.kind),
        };
        if kind.is_some_and(ErrorKind::is_infrastructure) && !self.infra {
            self.infra = true;
            self.progress.clear();
            eprintln!(
                "fnx: task {index} failed for an infrastructure reason; logs are in {}",
                self.run_dir.display()
            );
        }
        self.tally.add(kind);
        self.sink.outcome(index, outcome)
    }

    pub(crate) fn fail(
        &mut self,
        index: u64,
        kind: ErrorKind,
        type_name: &str,
        msg: String,
    ) -> std::io::Result<()> {
        self.finish(index, &Outcome::Err(TaskError::new(kind, type_name, msg)))
    }

    fn on_event(&mut self, event: Event) -> std::io::Result<()> {
        match event {
            Event::Finished(batch) => {
                for f in batch {
                    if self.outstanding.remove(&f.id.0) {
                        self.finish(f.id.0, &f.outcome)?;
                    }
                }
            }
            Event::Notice(Notice::Lost { uid, reason, .. }) => {
                tracing::warn!("manager {uid} lost: {reason}")
            }
            Event::Notice(_) | Event::Dispatched(_) | Event::Started(_) => {}
        }
        Ok(())
    }
}

/// Where the input stands.
#[derive(Default)]
pub(crate) struct InputState {
    /// No more lines will come.
    pub(crate) done: bool,
    /// Lines read (blank ones excluded).
    pub(crate) total: u64,
    /// Why reading stopped early.
    pub(crate) error: Option<String>,
}

/// Take input while the in-flight window has room: every line is expected by the sink, a line
/// that could not be parsed fails at once as `bad_input`, and the good ones (index, arguments)
/// go to `submit` chunk by chunk. The caller's thread submits, so every task is outstanding
/// before any of its results can arrive.
pub(crate) fn take_input(
    input: &Receiver<InputMsg>,
    acc: &mut Accounting<'_>,
    state: &mut InputState,
    mut submit: impl FnMut(&mut Accounting<'_>, Vec<(u64, Payload)>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    while !state.done && acc.outstanding.len() + acc.sink.held() < WINDOW {
        match input.try_recv() {
            Ok(InputMsg::Lines(lines)) => {
                let mut good = Vec::with_capacity(lines.len());
                for (index, parsed) in lines {
                    state.total += 1;
                    acc.sink.expect(index);
                    match parsed {
                        Err(msg) => acc.fail(index, ErrorKind::BadInput, "BadInputLine", msg)?,
                        Ok(args) => good.push((index, args)),
                    }
                }
                if !good.is_empty() {
                    submit(acc, good)?;
                }
            }
            Ok(InputMsg::Done) | Err(TryRecvError::Disconnected) => state.done = true,
            Ok(InputMsg::Failed(msg)) => {
                state.error = Some(msg);
                state.done = true;
            }
            Err(TryRecvError::Empty) => break,
        }
    }
    Ok(())
}

/// Run every input line through the function; `sink` gets each task's outcome.
fn execute(
    body: FunctionBody,
    kind: LineKind,
    source: Box<dyn BufRead + Send>,
    opts: &RunOptions,
    launch: Option<&crate::map_launch::LaunchArgs>,
    sink: &mut dyn Sink,
    progress: &mut Progress,
) -> anyhow::Result<Report> {
    let started = Instant::now();
    let run_dir = opts.run_dir.clone().unwrap_or_else(default_run_dir);
    std::fs::create_dir_all(&run_dir)
        .map_err(|e| anyhow::anyhow!("cannot create run directory {}: {e}", run_dir.display()))?;
    let log = run_dir.join("fnx.log");
    logging::to_file(&log).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", log.display()))?;
    let signals = fnx_sys::signals::install(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP])
        .map_err(|e| anyhow::anyhow!("cannot install signal handlers: {e}"))?;
    let run_id = format!("{}-{:x}", std::process::id(), rand_seed());
    let mut pool_opts = opts.pool_options(run_dir.clone(), run_id);
    if let Some(l) = launch {
        if l.launcher != crate::map_launch::LauncherArg::Local && opts.managers != 1 {
            anyhow::bail!(
                "--managers is for --launcher local; --launcher {} starts one manager per \
                 node (choose how many with --nodes or --hostfile)",
                format!("{:?}", l.launcher).to_lowercase()
            );
        }
        crate::map_launch::configure(l, &run_dir, &mut pool_opts)?;
    }
    let mut pool = LocalPool::start(pool_opts)?;
    tracing::info!("run directory {}", run_dir.display());
    let function = FunctionId(1);
    pool.handle.add_function(FunctionDef::new(function, body));
    let walltime_ms = opts.walltime.map(|s| (s * 1000.0).ceil() as u64);
    let input = spawn_reader(source, kind);
    let mut acc = Accounting {
        sink,
        progress,
        tally: Tally::default(),
        infra: false,
        run_dir: run_dir.clone(),
        outstanding: HashSet::new(),
    };
    let (mut inp, mut interrupted) = (InputState::default(), false);
    let mut all_lost: Option<String> = None;
    loop {
        if !signals.drain().is_empty() {
            interrupted = true;
            break;
        }
        take_input(&input, &mut acc, &mut inp, |acc, lines| {
            let mut tasks = Vec::with_capacity(lines.len());
            for (index, args) in lines {
                if let Some(lost) = &all_lost {
                    acc.fail(index, ErrorKind::ManagerLost, "ManagerLost", lost.clone())?;
                    continue;
                }
                acc.outstanding.insert(index);
                tasks.push(NewTask {
                    id: TaskId(index),
                    function,
                    args,
                    priority: 0,
                    walltime_ms,
                    retries: opts.retries,
                    attempt: fnx_protocol::Attempt(0),
                    files: Vec::new(),
                    stored: None,
                    memory_mb: None,
                });
            }
            if !tasks.is_empty() {
                pool.handle.submit(tasks);
            }
            Ok(())
        })?;
        for exit in pool.poll_exits() {
            tracing::warn!("manager {} ended: {}", exit.uid, exit.status);
            acc.progress.clear();
            eprintln!(
                "fnx: manager {} ended ({}); its log: {}",
                exit.uid,
                exit.status,
                exit.log.display()
            );
        }
        if pool.alive() == 0 && all_lost.is_none() {
            let msg = format!(
                "every manager of this run ended; logs are in {}",
                run_dir.display()
            );
            all_lost = Some(msg.clone());
            let mut lost: Vec<u64> = acc.outstanding.drain().collect();
            lost.sort_unstable();
            for index in lost {
                acc.fail(index, ErrorKind::ManagerLost, "ManagerLost", msg.clone())?;
            }
        }
        if inp.done && acc.outstanding.is_empty() {
            break;
        }
        match pool.events.recv_timeout(Duration::from_millis(20)) {
            Ok(event) => {
                acc.on_event(event)?;
                while let Ok(event) = pool.events.try_recv() {
                    acc.on_event(event)?;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                anyhow::bail!("the interchange stopped unexpectedly")
            }
        }
        acc.sink.tick()?;
        acc.progress
            .draw(&acc.tally, inp.done.then_some(inp.total), false);
    }
    if interrupted {
        // Every task that was handed out gets its line: none is left silent.
        let mut left: Vec<u64> = acc.outstanding.drain().collect();
        left.sort_unstable();
        for index in left {
            let msg = "fnx map was interrupted before the task finished".to_string();
            acc.fail(index, ErrorKind::Cancelled, "Interrupted", msg)?;
        }
    }
    acc.progress
        .draw(&acc.tally, inp.done.then_some(inp.total), true);
    acc.progress.clear();
    pool.stop(if interrupted {
        "interrupted"
    } else {
        "run finished"
    });
    Ok(Report {
        tally: acc.tally,
        interrupted,
        input_error: inp.error,
        run_dir,
        infra_failures: acc.infra,
        elapsed: started.elapsed(),
    })
}

pub(crate) fn rand_seed() -> u128 {
    let mut x = 0u64;
    // SAFETY: getrandom fills the 8 bytes given.
    unsafe { libc::getrandom((&mut x as *mut u64).cast(), 8, 0) };
    u128::from(x)
}

pub(crate) fn open_input(path: &str) -> Result<Box<dyn BufRead + Send>, String> {
    if path == "-" {
        // SAFETY: isatty on a standard fd.
        if unsafe { libc::isatty(0) } == 1 {
            eprintln!("fnx: reading input lines from the terminal (end with Ctrl-D; --input FILE reads a file)");
        }
        return Ok(Box::new(BufReader::with_capacity(
            1 << 20,
            std::io::stdin(),
        )));
    }
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open input '{path}': {e}"))?;
    Ok(Box::new(BufReader::with_capacity(1 << 20, file)))
}

pub(crate) fn open_output(path: &str) -> Result<Box<dyn Write>, String> {
    if path == "-" {
        return Ok(Box::new(std::io::BufWriter::with_capacity(
            1 << 20,
            std::io::stdout(),
        )));
    }
    let file =
        std::fs::File::create(path).map_err(|e| format!("cannot create output '{path}': {e}"))?;
    Ok(Box::new(std::io::BufWriter::with_capacity(1 << 20, file)))
}

pub(crate) fn stderr_is_tty() -> bool {
    // SAFETY: isatty on a standard fd.
    unsafe { libc::isatty(2) == 1 }
}

/// `fnx map`.
pub fn run_map(args: MapArgs) -> u8 {
    if let Err(e) = validate_options(&args.run) {
        return fail_usage(e);
    }
    let (body, kind) = match resolve(&args.function, &args.shell) {
        Ok(x) => x,
        Err(e) => return fail_usage(e),
    };
    let source = match open_input(&args.input) {
        Ok(s) => s,
        Err(e) => return fail_usage(e),
    };
    let out = match open_output(&args.output) {
        Ok(o) => o,
        Err(e) => return fail_usage(e),
    };
    let show = match args.progress {
        ProgressMode::Auto => stderr_is_tty(),
        ProgressMode::Always => true,
        ProgressMode::Never => false,
    };
    let mut progress = Progress::new(show);
    let mut writer = ResultWriter::new(out, args.ordered);
    let mut result = match &args.daemon {
        Some(url) => crate::map_daemon::execute(
            crate::map_daemon::Remote {
                url: url.clone(),
                token: args.token.clone(),
            },
            body,
            kind,
            source,
            &args.run,
            &mut writer,
            &mut progress,
        ),
        None => execute(
            body,
            kind,
            source,
            &args.run,
            Some(&args.launch),
            &mut writer,
            &mut progress,
        ),
    };
    if let (Ok(_), Err(e)) = (&result, writer.flush()) {
        result = Err(anyhow::anyhow!("cannot write results: {e}"));
    }
    finish_report(result)
}

pub(crate) fn finish_report(result: anyhow::Result<Report>) -> u8 {
    match result {
        Err(e) => {
            eprintln!("fnx: {e:#}");
            // Nothing ran (bad configuration) or results could not be written.
            if e.downcast_ref::<std::io::Error>().is_some()
                || e.to_string().starts_with("cannot write")
            {
                EXIT_TASK_FAILED
            } else {
                EXIT_USAGE
            }
        }
        Ok(r) => {
            let mut line = format!("fnx: {}", r.tally.summary(r.elapsed));
            if r.infra_failures || r.interrupted {
                line.push_str(&format!("; logs in {}", r.run_dir.display()));
            }
            if r.interrupted {
                line.push_str("; interrupted");
            }
            eprintln!("{line}");
            if let Some(e) = r.input_error {
                eprintln!("fnx: {e}");
                return EXIT_USAGE;
            }
            if r.interrupted {
                EXIT_INTERRUPTED
            } else if r.tally.failures() > 0 {
                EXIT_TASK_FAILED
            } else {
                EXIT_OK
            }
        }
    }
}

struct Capture(Option<Outcome>);

impl Sink for Capture {
    fn expect(&mut self, _index: u64) {}
    fn outcome(&mut self, _index: u64, outcome: &Outcome) -> std::io::Result<()> {
        self.0 = Some(outcome.clone());
        Ok(())
    }
}

/// `fnx run`.
pub fn run_once(args: RunArgs) -> u8 {
    if let Err(e) = validate_options(&args.run) {
        return fail_usage(e);
    }
    let (body, kind) = match resolve(&args.function, &args.shell) {
        Ok(x) => x,
        Err(e) => return fail_usage(e),
    };
    let line = match args.args.as_slice() {
        [] if matches!(kind, LineKind::Shell(_)) => "{}".to_string(),
        [] => "[]".to_string(),
        [one] => one.clone(),
        more => {
            return fail_usage(format!(
                "give the arguments as one JSON array or object after --, got {} words",
                more.len()
            ))
        }
    };
    if let Some(Err(e)) | Some(Ok(Err(e))) =
        input::parse_line(&kind, &line).map(|r| r.map(|_| Ok::<(), String>(())))
    {
        return fail_usage(format!("arguments: {e}"));
    }
    let mut opts = args.run.clone();
    opts.workers = Some(opts.workers.unwrap_or(1));
    opts.managers = 1;
    let mut capture = Capture(None);
    let mut progress = Progress::new(false);
    let result = execute(
        body,
        kind,
        Box::new(std::io::Cursor::new(line.into_bytes())),
        &opts,
        None,
        &mut capture,
        &mut progress,
    );
    let outcome = capture.0;
    match result {
        Err(e) => fail_usage(format!("{e:#}")),
        Ok(r) if r.interrupted => EXIT_INTERRUPTED,
        Ok(_) => match outcome {
            Some(Outcome::Ok(p)) => {
                let (line, kind) = output::result_line(0, &Outcome::Ok(p.clone()));
                if kind.is_some() {
                    eprintln!("{line}");
                    return EXIT_TASK_FAILED;
                }
                println!("{}", String::from_utf8_lossy(&p.data));
                EXIT_OK
            }
            Some(Outcome::Err(e)) => {
                if let Some(tb) = &e.traceback {
                    eprintln!("{}", tb.trim_end());
                }
                eprintln!("{} ({}): {}", e.type_name, e.kind, e.message);
                EXIT_TASK_FAILED
            }
            None => fail_usage("the task produced no result"),
        },
    }
}
