//! The CLI as a client of `fnx daemon`: `submit`, `result`, `cancel`, `status`, `function`.

pub mod http;

use crate::{EXIT_OK, EXIT_TASK_FAILED, EXIT_USAGE};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use fnx_api::{FileSubmission, FunctionCreate, FunctionKind, TaskBatch, TaskSubmission};
use http::Client;
use serde_json::{json, Value};
use std::path::PathBuf;

/// Exit status: the task has not finished yet.
pub const EXIT_NOT_DONE: u8 = 3;

/// How to print answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputMode {
    /// For people.
    Text,
    /// The API's JSON documents, one per line.
    Json,
}

/// The socket of a daemon that serves the whole host (the systemd unit's).
pub const SYSTEM_SOCKET: &str = "/run/fnx/fnx.sock";

/// Where the daemon is. Flags win over the environment, which wins over the file the daemon
/// wrote on its first start (`$FNX_HOME/client.json`); with no URL in any of them, the
/// daemon's local socket (`$FNX_HOME/fnx.sock`, then `/run/fnx/fnx.sock`) is used, where the
/// kernel tells the daemon who you are and no token is needed.
#[derive(Args, Debug, Clone)]
pub struct Conn {
    /// The daemon's URL, e.g. http://127.0.0.1:8470, or unix:///run/fnx/fnx.sock
    #[arg(long, env = "FNX_URL", global = true)]
    pub url: Option<String>,
    /// Your API token.
    #[arg(long, env = "FNX_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "text", global = true)]
    pub output: OutputMode,
}

impl Conn {
    /// Connect (no request is made yet).
    pub fn client(&self) -> Result<Client> {
        let file = fnx_daemon::config::fnx_home().join("client.json");
        let saved: Option<Value> = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let from_file = |k: &str| {
            saved
                .as_ref()
                .and_then(|v| v[k].as_str())
                .map(str::to_string)
        };
        let url = self.url.clone().or_else(|| from_file("url"));
        let token = self.token.clone().or_else(|| from_file("token"));
        // With no URL anywhere: the daemon's local socket, if one is there (no token needed).
        let sockets = [
            fnx_daemon::config::fnx_home().join("fnx.sock"),
            PathBuf::from(SYSTEM_SOCKET),
        ];
        let url = url.or_else(|| {
            use std::os::unix::fs::FileTypeExt;
            sockets
                .iter()
                .find(|p| std::fs::metadata(p).is_ok_and(|m| m.file_type().is_socket()))
                .map(|p| format!("unix://{}", p.display()))
        });
        match url {
            Some(u) => Client::new(&u, token.as_deref()),
            None => bail!(
                "no daemon URL: pass --url and --token, set FNX_URL and FNX_TOKEN, start \
                 `fnx daemon` once (it writes {}), or run a daemon whose socket is {} or {}",
                file.display(),
                sockets[0].display(),
                sockets[1].display()
            ),
        }
    }
}

fn print(mode: OutputMode, v: &Value, text: impl FnOnce(&Value) -> String) {
    match mode {
        OutputMode::Json => println!("{v}"),
        OutputMode::Text => {
            let t = text(v);
            if !t.is_empty() {
                println!("{t}");
            }
        }
    }
}

/// Run a client command and turn errors into exit status 1 (2 for usage problems).
pub fn finish(r: Result<u8>) -> u8 {
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fnx: {e:#}");
            if format!("{e:#}").contains("no daemon URL") {
                EXIT_USAGE
            } else {
                EXIT_TASK_FAILED
            }
        }
    }
}

/// `fnx submit`.
#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// Function id or registered name.
    pub function: String,
    /// Arguments: `name=value` is a keyword argument, anything else positional; values are
    /// parsed as JSON when valid, else taken as strings.
    pub args: Vec<String>,
    /// Wait for the result and print it (as `fnx result --wait`).
    #[arg(long)]
    pub wait: bool,
    /// Pool to run in (default: the daemon's first pool).
    #[arg(long)]
    pub pool: Option<String>,
    /// Priority (higher first).
    #[arg(long)]
    pub priority: Option<i32>,
    /// Walltime in seconds.
    #[arg(long, value_parser = crate::run_options::seconds)]
    pub walltime: Option<f64>,
    /// Re-runs after an infrastructure failure.
    #[arg(long)]
    pub retries: Option<u32>,
    /// The task's memory limit in MiB (at most the pool's mem_per_worker): over it, the task
    /// fails as memory_exceeded.
    #[arg(long)]
    pub memory_mb: Option<u32>,
    /// An input file for the task's working directory, as PATH or NAME=PATH (repeatable):
    /// files up to 1 MiB are uploaded, larger ones passed by absolute path (shared filesystem)
    #[arg(long = "file", value_name = "[NAME=]PATH")]
    pub files: Vec<String>,
    #[command(flatten)]
    conn: Conn,
}

/// The `files` of a task from `--file [NAME=]PATH` options.
fn file_entries(specs: &[String]) -> Result<Vec<FileSubmission>> {
    specs
        .iter()
        .map(|spec| {
            let (name, path) = match spec.split_once('=') {
                Some((n, p)) if !n.is_empty() && !n.contains('/') => (n.to_string(), p),
                _ => {
                    let name = std::path::Path::new(spec)
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned());
                    (
                        name.with_context(|| format!("--file {spec}: not a file path"))?,
                        spec.as_str(),
                    )
                }
            };
            let abs = std::fs::canonicalize(path)
                .with_context(|| format!("--file {spec}: cannot read {path}"))?;
            let len = std::fs::metadata(&abs)?.len();
            if len <= 1 << 20 {
                let bytes = std::fs::read(&abs)
                    .with_context(|| format!("cannot read {}", abs.display()))?;
                Ok(FileSubmission {
                    name,
                    data_b64: Some(fnx_daemon::records::b64(&bytes)),
                    ..FileSubmission::default()
                })
            } else {
                Ok(FileSubmission {
                    name,
                    path: Some(abs.display().to_string()),
                    ..FileSubmission::default()
                })
            }
        })
        .collect()
}

fn value_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

/// Resolve a function given by id or name.
fn function_id(c: &mut Client, f: &str) -> Result<u64> {
    if let Ok(id) = f.parse::<u64>() {
        return Ok(id);
    }
    let list = c.request("GET", "/v1/functions", None)?.ok()?;
    let found: Vec<u64> = list["functions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["name"].as_str() == Some(f))
        .filter_map(|r| r["id"].as_u64())
        .collect();
    match found.as_slice() {
        [] => bail!("no function named {f:?} (see `fnx function list`)"),
        [one] => Ok(*one),
        many => Ok(*many.iter().max().expect("non-empty")),
    }
}

/// `fnx submit`.
pub fn submit(a: SubmitArgs) -> Result<u8> {
    let mut c = a.conn.client()?;
    let function = function_id(&mut c, &a.function)?;
    let (mut pos, mut kw) = (Vec::new(), serde_json::Map::new());
    for arg in &a.args {
        match arg.split_once('=') {
            Some((k, v))
                if !k.is_empty() && k.chars().all(|ch| ch == '_' || ch.is_ascii_alphanumeric()) =>
            {
                kw.insert(k.to_string(), value_of(v));
            }
            _ => pos.push(value_of(arg)),
        }
    }
    if !pos.is_empty() && !kw.is_empty() {
        bail!("give either positional arguments or name=value arguments, not both");
    }
    let args = if kw.is_empty() {
        Value::Array(pos)
    } else {
        Value::Object(kw)
    };
    let args = serde_json::value::to_raw_value(&args)?;
    let task = TaskSubmission {
        function: Some(function),
        args: Some(&args),
        files: file_entries(&a.files)?,
        pool: a.pool,
        priority: a.priority,
        walltime: a.walltime,
        retries: a.retries,
        memory_mb: a.memory_mb.map(u64::from),
        ..TaskSubmission::default()
    };
    let body = serde_json::to_value(TaskBatch {
        tasks: Some(vec![task]),
    })?;
    let r = c.request("POST", "/v1/tasks", Some(&body))?.ok()?;
    let id = r["ids"][0]
        .as_u64()
        .context("the daemon returned no task id")?;
    if a.wait {
        return show_result(&mut c, id, Some(0.0), a.conn.output);
    }
    print(a.conn.output, &json!({"id": id}), |_| id.to_string());
    Ok(EXIT_OK)
}

/// `fnx result`.
#[derive(Args, Debug)]
pub struct ResultArgs {
    /// Task id.
    pub id: u64,
    /// Wait until the task finishes (at most SECONDS; no value: as long as it takes).
    #[arg(long, num_args = 0..=1, default_missing_value = "0", value_name = "SECONDS",
          value_parser = crate::run_options::seconds)]
    pub wait: Option<f64>,
    #[command(flatten)]
    conn: Conn,
}

fn show_result(c: &mut Client, id: u64, wait: Option<f64>, mode: OutputMode) -> Result<u8> {
    let deadline = wait
        .filter(|w| *w > 0.0)
        .map(|w| std::time::Instant::now() + std::time::Duration::from_secs_f64(w));
    let rec = loop {
        let slice = match (wait, deadline) {
            (None, _) => 0.0,
            (Some(_), None) => 30.0,
            (Some(_), Some(d)) => d
                .saturating_duration_since(std::time::Instant::now())
                .as_secs_f64()
                .min(30.0),
        };
        let resp = c.request("GET", &format!("/v1/tasks/{id}?wait={slice:.3}"), None)?;
        // Kept as text: a JSON result is printed exactly as the function returned it.
        let body = String::from_utf8_lossy(&resp.body).into_owned();
        let rec = resp.ok()?;
        let state = rec["state"].as_str().unwrap_or("");
        let terminal = matches!(state, "success" | "failed" | "cancelled");
        let expired = deadline.is_some_and(|d| std::time::Instant::now() >= d);
        if terminal || wait.is_none() || expired {
            break (rec, body);
        }
    };
    let (rec, body) = rec;
    let state = rec["state"].as_str().unwrap_or("").to_string();
    match mode {
        OutputMode::Json => println!("{}", body.trim_end()),
        OutputMode::Text => match state.as_str() {
            "success" => match rec["result"]["encoding"].as_str() {
                Some("json") => {
                    let typed = serde_json::from_str::<fnx_api::TaskRecord>(&body).ok();
                    let raw = typed
                        .as_ref()
                        .and_then(|r| r.result.as_ref()?.value.as_ref());
                    match raw {
                        Some(v) => println!("{}", v.get()),
                        None => println!("{}", rec["result"]["value"]),
                    }
                }
                _ => println!(
                    "(pickled result, {} base64 characters)",
                    rec["result"]["data_b64"].as_str().map_or(0, str::len)
                ),
            },
            "failed" | "cancelled" => {
                let e = &rec["error"];
                eprintln!(
                    "task {id} {state}: [{}] {}: {}",
                    e["kind"].as_str().unwrap_or(""),
                    e["type"].as_str().unwrap_or(""),
                    e["message"].as_str().unwrap_or("")
                );
                if let Some(tb) = e["traceback"].as_str() {
                    eprintln!("{tb}");
                }
            }
            other => eprintln!("task {id} is {other}"),
        },
    }
    Ok(match state.as_str() {
        "success" => EXIT_OK,
        "failed" | "cancelled" => EXIT_TASK_FAILED,
        _ => EXIT_NOT_DONE,
    })
}

/// `fnx result`.
pub fn result(a: ResultArgs) -> Result<u8> {
    let mut c = a.conn.client()?;
    show_result(&mut c, a.id, a.wait, a.conn.output)
}

/// `fnx cancel`.
#[derive(Args, Debug)]
pub struct CancelArgs {
    /// Task id.
    pub id: u64,
    #[command(flatten)]
    conn: Conn,
}

/// `fnx cancel`.
pub fn cancel(a: CancelArgs) -> Result<u8> {
    let mut c = a.conn.client()?;
    let rec = c
        .request("DELETE", &format!("/v1/tasks/{}", a.id), None)?
        .ok()?;
    print(a.conn.output, &rec, |r| {
        format!("task {} {}", a.id, r["state"].as_str().unwrap_or("?"))
    });
    Ok(EXIT_OK)
}

/// `fnx block ...` (admins).
#[derive(Subcommand, Debug)]
pub enum BlockCommand {
    /// Drain a block now: its managers finish the tasks they hold, take no new ones and exit;
    /// then its job ends
    Drain(BlockArgs),
    /// Cancel a block's job now, even while it runs tasks (they are retried elsewhere)
    Cancel(BlockArgs),
}

/// A pool's block.
#[derive(Args, Debug)]
pub struct BlockArgs {
    /// The pool.
    pub pool: String,
    /// The block number (`fnx status` lists them).
    pub id: u64,
    #[command(flatten)]
    conn: Conn,
}

/// `fnx block drain|cancel`.
pub fn block(cmd: BlockCommand) -> Result<u8> {
    let (action, a) = match cmd {
        BlockCommand::Drain(a) => ("drain", a),
        BlockCommand::Cancel(a) => ("cancel", a),
    };
    let mut c = a.conn.client()?;
    let path = format!("/v1/pools/{}/blocks/{}/{action}", a.pool, a.id);
    let v = c
        .request("POST", &path, Some(&serde_json::json!({})))?
        .ok()?;
    print(a.conn.output, &v, |_| {
        format!(
            "pool {} block {}: {action} requested (see fnx status)",
            a.pool, a.id
        )
    });
    Ok(EXIT_OK)
}

/// `fnx status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    conn: Conn,
}

/// `fnx status`.
pub fn status(a: StatusArgs) -> Result<u8> {
    let mut c = a.conn.client()?;
    let s = c.request("GET", "/v1/status", None)?.ok()?;
    print(a.conn.output, &s, |s| {
        let t = &s["tasks"];
        let mut out = format!(
            "fnx {} up {:.0} s; user {}{}\ntasks: {} queued, {} running, {} finished; {:.1} tasks/s",
            s["version"].as_str().unwrap_or("?"),
            s["uptime_s"].as_f64().unwrap_or(0.0),
            s["user"].as_str().unwrap_or("?"),
            if s["admin"].as_bool() == Some(true) { " (admin)" } else { "" },
            t["queued"], t["running"], t["finished"],
            s["tasks_per_s"].as_f64().unwrap_or(0.0)
        );
        for p in s["pools"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "\npool {} ({}, {}): ",
                p["name"].as_str().unwrap_or("?"),
                p["provider"].as_str().unwrap_or("local"),
                p["launcher"].as_str().unwrap_or("single"),
            ));
            // Admins see the pool's whole load and where it runs; others what it offers.
            if p.get("queued").is_some() {
                out.push_str(&format!(
                    "{} queued, {} running, ",
                    p["queued"], p["running"]
                ));
            }
            out.push_str(&format!(
                "{} workers in {} managers",
                p["workers"], p["managers_connected"]
            ));
            if let Some(dir) = p["run_dir"].as_str() {
                out.push_str(&format!("; runs in {dir}"));
            }
            match &p["failed"] {
                serde_json::Value::String(why) => out.push_str(&format!("\n  FAILED: {why}")),
                serde_json::Value::Bool(true) => out.push_str("\n  FAILED (admins see why)"),
                _ => {
                    if let Some(why) = p["submit_error"].as_str() {
                        out.push_str(&format!("\n  cannot submit blocks: {why}"));
                    }
                }
            }
            for b in p["blocks"].as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "\n  block {} (job {}): {}, job {}, {} managers; files in {}",
                    b["id"],
                    b["job"].as_str().unwrap_or("?"),
                    b["phase"].as_str().unwrap_or("?"),
                    b["job_state"].as_str().unwrap_or("?"),
                    b["managers"],
                    b["dir"].as_str().unwrap_or("?"),
                ));
            }
            for m in p["managers"].as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "\n  {} on {}: {} workers, {} in flight, {} done, idle {:.1} s",
                    m["uid"].as_str().unwrap_or("?"),
                    m["host"].as_str().unwrap_or("?"),
                    m["workers"],
                    m["inflight"],
                    m["completed"],
                    m["idle_s"].as_f64().unwrap_or(0.0)
                ));
            }
        }
        out
    });
    Ok(EXIT_OK)
}

/// `fnx function ...`.
#[derive(Subcommand, Debug)]
pub enum FunctionCommand {
    /// Register a function and print its id.
    Register(RegisterArgs),
    /// List your functions.
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// Show one function (with its source).
    Show {
        /// Function id.
        id: u64,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `fnx function register`.
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("kind").required(true).args(["python", "reference", "shell", "mpi"])))]
pub struct RegisterArgs {
    /// A Python file defining the function (with --entry).
    #[arg(long, value_name = "FILE", requires = "entry")]
    pub python: Option<std::path::PathBuf>,
    /// The function in --python FILE to call.
    #[arg(long)]
    pub entry: Option<String>,
    /// An importable Python function, MODULE:QUALNAME.
    #[arg(long = "ref", id = "reference", value_name = "MODULE:QUALNAME")]
    pub reference: Option<String>,
    /// A shell command template with {name} parameters.
    #[arg(long, value_name = "COMMAND")]
    pub shell: Option<String>,
    /// An MPI command template (stored; run by a later version).
    #[arg(long, value_name = "COMMAND")]
    pub mpi: Option<String>,
    /// A name to find it by.
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    conn: Conn,
}

/// `fnx function ...`.
pub fn function(cmd: FunctionCommand) -> Result<u8> {
    match cmd {
        FunctionCommand::Register(a) => {
            let python = FunctionCreate::new(FunctionKind::Python);
            let mut body = if let Some(file) = &a.python {
                let source = std::fs::read_to_string(file)
                    .with_context(|| format!("cannot read {}", file.display()))?;
                FunctionCreate {
                    source: Some(source),
                    entry: a.entry.clone(),
                    ..python
                }
            } else if let Some(r) = &a.reference {
                FunctionCreate {
                    reference: Some(r.clone()),
                    ..python
                }
            } else if let Some(s) = &a.shell {
                FunctionCreate::shell(s)
            } else {
                FunctionCreate {
                    command: a.mpi.clone(),
                    ..FunctionCreate::new(FunctionKind::Mpi)
                }
            };
            body.name = a.name.clone();
            let mut c = a.conn.client()?;
            let rec = c
                .request("POST", "/v1/functions", Some(&body.to_json()))?
                .ok()?;
            print(a.conn.output, &rec, |r| r["id"].to_string());
        }
        FunctionCommand::List { conn } => {
            let mut c = conn.client()?;
            let list = c.request("GET", "/v1/functions", None)?.ok()?;
            print(conn.output, &list, |l| {
                l["functions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|f| {
                        format!(
                            "{}\t{}\t{}",
                            f["id"],
                            f["kind"].as_str().unwrap_or(""),
                            f["name"].as_str().unwrap_or("")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        FunctionCommand::Show { id, conn } => {
            let mut c = conn.client()?;
            let rec = c
                .request("GET", &format!("/v1/functions/{id}"), None)?
                .ok()?;
            print(conn.output, &rec, |r| {
                serde_json::to_string_pretty(r).unwrap_or_default()
            });
        }
    }
    Ok(EXIT_OK)
}
