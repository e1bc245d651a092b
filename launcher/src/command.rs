//! The manager command line.

use fnx_protocol::ManagerBootstrap;

/// The arguments after the `fnx` executable that start a manager with `b`'s settings, e.g.
/// `["manager", "--interchange", "tcp://10.0.0.1:5000", "--uid", "m0", ...]`.
///
/// Every value is passed as its own argument (never through a shell), so no escaping is needed
/// when the caller executes it directly; a launcher that must go through a shell quotes each
/// argument with [`shell_quote`].
pub fn manager_args(b: &ManagerBootstrap) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "manager".into(),
        "--interchange".into(),
        b.interchange.clone(),
        "--uid".into(),
        b.uid.clone(),
        "--run-dir".into(),
        b.run_dir.display().to_string(),
        "--run-id".into(),
        b.run_id.clone(),
        "--python".into(),
        b.python.clone(),
        "--heartbeat-period-ms".into(),
        b.heartbeat_period_ms.to_string(),
        "--heartbeat-threshold-ms".into(),
        b.heartbeat_threshold_ms.to_string(),
        "--max-result-bytes".into(),
        b.max_result_bytes.to_string(),
        "--kill-grace-ms".into(),
        b.kill_grace_ms.to_string(),
    ];
    if let Some(block) = b.block_id {
        args.extend(["--block-id".into(), block.0.to_string()]);
    }
    if let Some(slots) = b.slots {
        args.extend(["--slots".into(), slots.to_string()]);
    }
    if let Some(c) = b.cores_per_worker {
        args.extend(["--cores-per-worker".into(), c.to_string()]);
    }
    if let Some(m) = b.mem_per_worker_mb {
        args.extend(["--mem-per-worker-mb".into(), m.to_string()]);
    }
    if let Some(a) = &b.cpu_affinity {
        args.extend(["--cpu-affinity".into(), a.clone()]);
    }
    if !b.accelerators.is_empty() {
        args.extend(["--accelerators".into(), b.accelerators.join(",")]);
    }
    if let Some(c) = &b.container {
        args.extend(["--container-runtime".into(), c.runtime.name().into()]);
        if !c.image.is_empty() {
            args.extend(["--container-image".into(), c.image.clone()]);
        }
        if let Some(t) = &c.template {
            args.extend(["--container-template".into(), t.clone()]);
        }
    }
    if let Some(s) = b.container_idle_s {
        args.extend(["--container-idle-s".into(), s.to_string()]);
    }
    if let Some(d) = b.drain_after_ms {
        args.extend(["--drain-after-ms".into(), d.to_string()]);
    }
    if let Some(prefetch) = b.prefetch {
        args.extend(["--prefetch".into(), prefetch.to_string()]);
    }
    if b.zero_work {
        args.push("--zero-work".into());
    }
    for p in &b.protect {
        args.extend(["--protect".into(), p.display().to_string()]);
    }
    if let Some(keys) = &b.curve_keys {
        // The path only: the keys stay in the (private) file, out of `ps`.
        args.extend(["--curve-keys".into(), keys.display().to_string()]);
    }
    args
}

/// Quote one argument for a POSIX shell (single quotes; embedded `'` as `'\''`).
pub fn shell_quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=,@%+".contains(&b))
    {
        return arg.to_string();
    }
    format!("'{}'", arg.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_keeps_values_literal() {
        assert_eq!(shell_quote("tcp://h:1"), "tcp://h:1");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's; rm -rf x"), r"'it'\''s; rm -rf x'");
        assert_eq!(shell_quote(""), "''");
    }
}
