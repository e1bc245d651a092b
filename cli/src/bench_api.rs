//! `fnx bench api`: throughput and latency of a running daemon through its HTTP API.

use crate::client::http::Client;
use crate::client::Conn;
use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// `fnx bench api`.
#[derive(Args, Debug)]
pub struct ApiArgs {
    /// Tasks for the throughput run (0: skip it).
    #[arg(long, default_value_t = 100_000)]
    pub tasks: u64,
    /// Tasks per submit request.
    #[arg(long, default_value_t = 1000)]
    pub batch: u64,
    /// Single-task round trips (submit, then wait for the result) for the latency run (0: skip).
    #[arg(long, default_value_t = 0)]
    pub round_trips: u64,
    /// Each throughput task carries a string argument of this many KiB (0: no argument). Tasks
    /// over the daemon's `limits.spill_kb` keep it in the store until dispatch.
    #[arg(long, default_value_t = 0)]
    pub payload_kb: u64,
    #[command(flatten)]
    conn: Conn,
}

fn register_noop(c: &mut Client) -> Result<u64> {
    let mut f =
        fnx_api::FunctionCreate::python_source("def noop(x=None):\n    return None\n", "noop");
    f.name = Some("bench-noop".into());
    c.request("POST", "/v1/functions", Some(&f.to_json()))?
        .ok()?["id"]
        .as_u64()
        .context("no function id")
}

/// The newest results cursor (results from before the run are skipped).
fn current_cursor(c: &mut Client) -> Result<u64> {
    let mut cursor = 0;
    loop {
        let page = c
            .request(
                "GET",
                &format!("/v1/results?since={cursor}&limit=10000"),
                None,
            )?
            .ok()?;
        let next = page["cursor"].as_u64().unwrap_or(cursor);
        if next == cursor {
            return Ok(cursor);
        }
        cursor = next;
    }
}

fn throughput(a: &ApiArgs, function: u64) -> Result<Value> {
    let mut c = a.conn.client()?;
    let start_cursor = current_cursor(&mut c)?;
    let (tasks, batch, payload_kb) = (a.tasks, a.batch.max(1), a.payload_kb);
    let conn = a.conn.clone();
    let started = Instant::now();
    let submitter = std::thread::spawn(move || -> Result<f64> {
        let mut s = conn.client()?;
        let args = match payload_kb {
            0 => serde_json::value::to_raw_value(&json!([]))?,
            kb => serde_json::value::to_raw_value(&json!(["x".repeat((kb << 10) as usize)]))?,
        };
        let one = fnx_api::TaskSubmission {
            function: Some(function),
            args: Some(&args),
            ..fnx_api::TaskSubmission::default()
        };
        let mut sent = 0;
        while sent < tasks {
            let n = batch.min(tasks - sent);
            let body = serde_json::to_value(fnx_api::TaskBatch {
                tasks: Some(vec![one.clone(); n as usize]),
            })?;
            let r = s.request("POST", "/v1/tasks", Some(&body))?.ok()?;
            if r["ids"].as_array().map_or(0, Vec::len) as u64 != n {
                bail!("the daemon acknowledged a different number of tasks");
            }
            sent += n;
        }
        Ok(started.elapsed().as_secs_f64())
    });
    let (mut got, mut cursor, mut requests, mut failed) = (0u64, start_cursor, 0u64, 0u64);
    while got < tasks {
        let page = c
            .request(
                "GET",
                &format!("/v1/results?since={cursor}&wait=10&limit=10000"),
                None,
            )?
            .ok()?;
        requests += 1;
        let results = page["results"].as_array().cloned().unwrap_or_default();
        if results.is_empty()
            && submitter.is_finished()
            && started.elapsed() > Duration::from_secs(600)
        {
            bail!("no results for a long time ({got} of {tasks})");
        }
        failed += results.iter().filter(|r| r["state"] != "success").count() as u64;
        got += results.len() as u64;
        cursor = page["cursor"].as_u64().unwrap_or(cursor);
    }
    let total = started.elapsed().as_secs_f64();
    let submit_s = submitter
        .join()
        .map_err(|_| anyhow::anyhow!("the submitter panicked"))??;
    Ok(json!({
        "tasks": tasks, "batch": batch, "failed": failed, "payload_kb": payload_kb,
        "seconds": total, "tasks_per_s": tasks as f64 / total,
        "submit_seconds": submit_s, "submit_tasks_per_s": tasks as f64 / submit_s,
        "result_requests": requests,
    }))
}

fn latency(a: &ApiArgs, function: u64) -> Result<Value> {
    let mut c = a.conn.client()?;
    let mut h = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
    let body = json!({"tasks": [{"function": function, "args": []}]});
    for i in 0..a.round_trips + 20 {
        let t = Instant::now();
        let r = c.request("POST", "/v1/tasks", Some(&body))?.ok()?;
        let id = r["ids"][0].as_u64().context("no task id")?;
        let rec = c
            .request("GET", &format!("/v1/tasks/{id}?wait=10"), None)?
            .ok()?;
        if rec["state"] != "success" {
            bail!("task {id} ended {}", rec["state"]);
        }
        if i >= 20 {
            h.record(t.elapsed().as_micros() as u64).ok();
        }
    }
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Ok(
        json!({"round_trips": h.len(), "p50_ms": ms(0.5), "p90_ms": ms(0.9), "p99_ms": ms(0.99), "max_ms": h.max() as f64 / 1000.0}),
    )
}

/// Run the benchmark against the daemon named by the connection options.
pub fn run(a: &ApiArgs) -> Result<Value> {
    let mut c = a.conn.client()?;
    let function = register_noop(&mut c)?;
    let mut out = json!({"function": function});
    if a.round_trips > 0 {
        out["latency"] = latency(a, function)?;
    }
    if a.tasks > 0 {
        out["throughput"] = throughput(a, function)?;
    }
    Ok(out)
}
