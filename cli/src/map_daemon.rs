//! `fnx map --daemon`: the same input and output as embedded mode, with the tasks going through
//! a running daemon. Input lines are submitted in batches of up to 1,000 (each batch with an
//! idempotency key, retried on connection errors and 503), while a second connection streams
//! the results; at most [`WINDOW`] tasks are unfinished at a time.

use crate::client::http::Client;
use crate::client::Conn;
use crate::input::LineKind;
use crate::map::{spawn_reader, take_input, Accounting, InputState, Report, RunOptions, Sink};
use crate::output::{Progress, Tally};
use anyhow::{bail, Context, Result};
use fnx_api::{FunctionCreate, ResultsPage, TaskRecord, TaskState};
use fnx_protocol::{Encoding, ErrorKind, FunctionBody, Outcome, Payload, TaskError};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::io::BufRead;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BATCH: usize = 1000;

/// Which daemon.
pub struct Remote {
    /// URL ("" for the configured one).
    pub url: String,
    /// Token (None for the configured one).
    pub token: Option<String>,
}

impl Remote {
    fn conn(&self) -> Conn {
        Conn {
            url: (!self.url.is_empty())
                .then(|| self.url.clone())
                .or_else(|| std::env::var("FNX_URL").ok()),
            token: self.token.clone(),
            output: crate::client::OutputMode::Text,
        }
    }
}

fn register(c: &mut Client, body: &FunctionBody) -> Result<u64> {
    let spec = match body {
        FunctionBody::PythonRef { module, qualname } => {
            FunctionCreate::python_ref(module, qualname)
        }
        FunctionBody::PythonFile { path, name } => {
            let source =
                std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
            FunctionCreate::python_source(&source, name)
        }
        FunctionBody::PythonSource { source, name } => FunctionCreate::python_source(source, name),
        FunctionBody::Shell { template } => FunctionCreate::shell(template),
    };
    let rec = c
        .request("POST", "/v1/functions", Some(&spec.to_json()))?
        .ok()?;
    rec["id"]
        .as_u64()
        .context("the daemon returned no function id")
}

/// The outcome a task record of the API reports; a JSON result keeps its own text (every
/// digit of its numbers, the order of its keys).
pub(crate) fn outcome_of(rec: &TaskRecord) -> Outcome {
    match (&rec.result, &rec.error) {
        (Some(r), _) if rec.state == TaskState::Success => match (r.encoding, &r.value) {
            (Encoding::Json, Some(v)) => Outcome::Ok(Payload::json(v.get())),
            (Encoding::Json, None) => Outcome::Ok(Payload::json(
                serde_json::to_string(&r.text).unwrap_or_else(|_| "null".into()),
            )),
            (Encoding::Pickle, _) => Outcome::Ok(Payload::json(
                json!({ "pickle_b64": r.data_b64 }).to_string(),
            )),
        },
        (_, Some(e)) => {
            let mut err = TaskError::new(e.kind, e.type_name.as_ref(), e.message.as_ref());
            err.traceback = e.traceback.as_deref().map(str::to_string);
            Outcome::Err(err)
        }
        (_, None) => Outcome::Err(TaskError::new(
            ErrorKind::Exception,
            "Error",
            format!("the task ended {} without its outcome", rec.state.name()),
        )),
    }
}

/// Stream results from `cursor` until `stop`; sends (task id, outcome) batches.
fn stream(
    mut c: Client,
    mut cursor: u64,
    stop: Arc<AtomicBool>,
) -> Receiver<Result<Vec<(u64, Outcome)>>> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let mut failing_since: Option<Instant> = None;
        while !stop.load(Ordering::Relaxed) {
            let answer = c.request(
                "GET",
                &format!("/v1/results?since={cursor}&wait=1&limit=10000"),
                None,
            );
            let page = match &answer {
                Ok(r) => r.read::<ResultsPage>(),
                Err(e) => Err(anyhow::anyhow!("{e:#}")),
            };
            match page {
                Ok(page) => {
                    failing_since = None;
                    cursor = page.cursor;
                    let batch: Vec<(u64, Outcome)> =
                        page.results.iter().map(|r| (r.id, outcome_of(r))).collect();
                    if !batch.is_empty() && tx.send(Ok(batch)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_secs(60) {
                        let _ =
                            tx.send(Err(e.context("the daemon's results stream failed for 60 s")));
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
    });
    rx
}

/// What a submit gave.
enum Submitted {
    /// The ids, in order.
    Ids(Vec<u64>),
    /// The daemon refused task `.0` of the batch (400 naming it); nothing was accepted.
    Refused(usize, String),
}

/// The index of the task a 400 message names (`tasks[3]: ...`).
fn refused_task(msg: &str) -> Option<usize> {
    msg.strip_prefix("tasks[")?.split(']').next()?.parse().ok()
}

/// Submit one batch; retried with the same idempotency key while the daemon is unreachable or
/// its store unavailable, so a retry never creates duplicates.
fn submit(c: &mut Client, body: &[u8], key: &str) -> Result<Submitted> {
    let mut delay = Duration::from_millis(100);
    let started = Instant::now();
    loop {
        let r = c.raw(
            "POST",
            "/v1/tasks",
            Some(body),
            "application/json",
            &[("Idempotency-Key", key)],
        );
        let retry = match r {
            Ok(r) if r.status == 503 => true,
            Ok(r) if r.status == 400 => {
                let msg = r
                    .json()
                    .ok()
                    .and_then(|v| v["error"]["message"].as_str().map(str::to_string));
                match msg.as_deref().and_then(|m| Some((refused_task(m)?, m))) {
                    Some((i, m)) => return Ok(Submitted::Refused(i, m.to_string())),
                    None => bail!("the daemon refused the tasks: {}", msg.unwrap_or_default()),
                }
            }
            Ok(r) => {
                let v = r.ok()?;
                return Ok(Submitted::Ids(
                    v["ids"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_u64)
                        .collect(),
                ));
            }
            Err(_) => true,
        };
        if retry && started.elapsed() > Duration::from_secs(120) {
            bail!("the daemon did not accept a batch of tasks for 120 s");
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// The JSON body of a submit: arguments are inserted as they are (each line was checked to be a
/// JSON array or object when it was read).
fn batch_body(function: u64, chunk: &[(u64, Payload)], extra: &str) -> String {
    let mut body = String::from("{\"tasks\":[");
    for (i, (_, args)) in chunk.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&format!("{{\"function\":{function},\"args\":"));
        body.push_str(std::str::from_utf8(&args.data).unwrap_or("null"));
        body.push_str(extra);
        body.push('}');
    }
    body.push_str("]}");
    body
}

/// Run every input line through the function on the daemon.
pub fn execute(
    remote: Remote,
    body: FunctionBody,
    kind: LineKind,
    source: Box<dyn BufRead + Send>,
    opts: &RunOptions,
    sink: &mut dyn Sink,
    progress: &mut Progress,
) -> Result<Report> {
    let started = Instant::now();
    crate::logging::to_stderr();
    let conn = remote.conn();
    let mut c = conn.client()?;
    let function = register(&mut c, &body)?;
    let cursor = c.request("GET", "/v1/results?since=end", None)?.ok()?["cursor"]
        .as_u64()
        .unwrap_or(0);
    let stop = Arc::new(AtomicBool::new(false));
    let results = stream(conn.client()?, cursor, stop.clone());
    let signals = fnx_sys::signals::install(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP])
        .map_err(|e| anyhow::anyhow!("cannot install signal handlers: {e}"))?;
    let input = spawn_reader(source, kind);
    let mut extra = String::new();
    if let Some(w) = opts.walltime {
        extra.push_str(&format!(",\"walltime\":{w}"));
    }
    extra.push_str(&format!(",\"retries\":{}", opts.retries));
    let run_key = format!(
        "map-{}-{:x}",
        std::process::id(),
        started.elapsed().as_nanos() ^ crate::map::rand_seed()
    );
    let mut acc = Accounting {
        sink,
        progress,
        tally: Tally::default(),
        infra: false,
        run_dir: PathBuf::from("(the daemon's data directory: runs/<pool>/, see `fnx status`)"),
        outstanding: HashSet::new(),
    };
    let mut by_task: HashMap<u64, u64> = HashMap::new();
    let mut early: HashMap<u64, Outcome> = HashMap::new();
    let (mut inp, mut interrupted, mut batches) = (InputState::default(), false, 0u64);
    loop {
        if !signals.drain().is_empty() {
            interrupted = true;
            break;
        }
        take_input(&input, &mut acc, &mut inp, |acc, good| {
            for chunk in good.chunks(BATCH) {
                let mut chunk = chunk.to_vec();
                let ids = loop {
                    if chunk.is_empty() {
                        break Vec::new();
                    }
                    let body = batch_body(function, &chunk, &extra);
                    batches += 1;
                    match submit(&mut c, body.as_bytes(), &format!("{run_key}-{batches}"))? {
                        Submitted::Ids(ids) => break ids,
                        Submitted::Refused(i, msg) if i < chunk.len() => {
                            // The daemon names the task and the problem: that line fails alone.
                            let (index, _) = chunk.remove(i);
                            let msg = msg.split_once(": ").map_or(msg.as_str(), |(_, m)| m);
                            acc.fail(index, ErrorKind::BadInput, "BadArguments", msg.to_string())?;
                        }
                        Submitted::Refused(_, msg) => bail!("the daemon refused the tasks: {msg}"),
                    }
                };
                if ids.len() != chunk.len() {
                    bail!(
                        "the daemon acknowledged {} of {} tasks",
                        ids.len(),
                        chunk.len()
                    );
                }
                for ((index, _), id) in chunk.iter().zip(ids) {
                    acc.outstanding.insert(*index);
                    match early.remove(&id) {
                        Some(outcome) => {
                            acc.outstanding.remove(index);
                            acc.finish(*index, &outcome)?;
                        }
                        None => {
                            by_task.insert(id, *index);
                        }
                    }
                }
            }
            Ok(())
        })?;
        if inp.done && acc.outstanding.is_empty() {
            break;
        }
        match results.recv_timeout(Duration::from_millis(20)) {
            Ok(batch) => {
                for (id, outcome) in batch? {
                    match by_task.remove(&id) {
                        Some(index) => {
                            acc.outstanding.remove(&index);
                            acc.finish(index, &outcome)?;
                        }
                        // Not ours, or ours before its submit was answered.
                        None if early.len() < 1_000_000 => {
                            early.insert(id, outcome);
                        }
                        None => {}
                    }
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                bail!("the results stream stopped")
            }
        }
        acc.sink.tick()?;
        acc.progress
            .draw(&acc.tally, inp.done.then_some(inp.total), false);
    }
    stop.store(true, Ordering::Relaxed);
    if interrupted {
        let ids: Vec<u64> = by_task.keys().copied().collect();
        for chunk in ids.chunks(10_000) {
            let _ = c.request("POST", "/v1/tasks/cancel", Some(&json!({ "ids": chunk })));
        }
        let mut left: Vec<u64> = acc.outstanding.drain().collect();
        left.sort_unstable();
        for index in left {
            let msg =
                "fnx map was interrupted before the task finished; it was cancelled on the daemon"
                    .to_string();
            acc.fail(index, ErrorKind::Cancelled, "Interrupted", msg)?;
        }
    }
    acc.progress
        .draw(&acc.tally, inp.done.then_some(inp.total), true);
    acc.progress.clear();
    Ok(Report {
        tally: acc.tally,
        interrupted,
        input_error: inp.error,
        run_dir: acc.run_dir,
        infra_failures: acc.infra,
        elapsed: started.elapsed(),
    })
}
