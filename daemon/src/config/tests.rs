//! Tests of the parent module.
use super::*;

fn parse(text: &str) -> Result<SiteConfig, ConfigError> {
    SiteConfig::parse(text, Path::new("site.toml"))
}

#[test]
fn defaults_have_one_local_pool() {
    let c = parse("").unwrap();
    assert_eq!(c.pools.len(), 1);
    assert_eq!(c.pools[0].name, "local");
    assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
    assert_eq!(c.limits.max_tasks_per_request, 10_000);
    assert_eq!(c.store.sync, SyncMode::Full);
}

#[test]
fn every_unknown_key_is_named_with_its_path() {
    let err = parse("[daemon]\nlisten_on = 1\n[pools.cpu]\nworkerz = 2\n[bogus]\nx = 1\n")
        .unwrap_err()
        .to_string();
    for key in ["daemon.listen_on", "pools.cpu.workerz", "bogus"] {
        assert!(err.contains(key), "{key} missing from: {err}");
    }
}

#[test]
fn every_bad_value_is_named() {
    let err = parse(
        "[store]\nsync = \"sometimes\"\n[daemon]\nlisten = \"nowhere\"\n\
         [pools.a]\nprovider = \"slurmish\"\nmanagers = 2000\n",
    )
    .unwrap_err()
    .to_string();
    for key in [
        "store.sync",
        "daemon.listen",
        "pools.a.provider",
        "pools.a.managers",
    ] {
        assert!(err.contains(key), "{key} missing from: {err}");
    }
}

#[test]
fn unknown_keys_and_bad_values_are_reported_together() {
    let err = parse("[pools.p]\nprovider = \"slurm\"\nworker_inits = \"x\"\nparallelism = 2.0\n")
        .unwrap_err()
        .to_string();
    for key in ["pools.p.worker_inits", "pools.p.parallelism"] {
        assert!(err.contains(key), "{key} missing from: {err}");
    }
}

#[test]
fn batch_pool_keys_are_checked() {
    let err = parse(
        "[interchange]\naddress = \"0.0.0.0\"\n[pools.b]\nprovider = \"pbs\"\n\
         partition = \"x\"\nwalltime = \"1h\"\nnodes_per_block = 2\nlauncher = \"single\"\n\
         account = \"a b\"\nmin_blocks = 3\nmax_blocks = 2\nscheduler_options = \"-l x\"\n\
         [pools.l]\nnodes_per_block = 2\n",
    )
    .unwrap_err()
    .to_string();
    for key in [
        "pools.b.partition",
        "pools.b.walltime",
        "pools.b.launcher",
        "pools.b.account",
        "pools.b.max_blocks",
        "pools.b.scheduler_options",
        "pools.b.address",
        "pools.l.nodes_per_block",
    ] {
        assert!(err.contains(key), "{key} missing from: {err}");
    }
    let c = parse("[pools.s]\nprovider = \"slurm\"\nnodes_per_block = 4\nwalltime = \"2:00:00\"\n")
        .unwrap();
    let b = c.pools[0].blocks.as_ref().unwrap();
    assert_eq!(b.spec.launcher, fnx_launcher::Launcher::Srun);
    assert_eq!(b.drain_margin, Duration::from_secs(300));
    assert_eq!(c.pools[0].managers, 0);
}

#[test]
fn placement_keys() {
    let c = parse(
        "[pools.g]\ncpu_affinity = \"block\"\navailable_accelerators = 4\n\
         [pools.h]\navailable_accelerators = [\"GPU-a\", \"GPU-b\"]\n",
    )
    .unwrap();
    assert_eq!(c.pools[0].shape.cpu_affinity.as_deref(), Some("block"));
    assert_eq!(c.pools[0].shape.accelerators, ["0", "1", "2", "3"]);
    assert_eq!(c.pools[1].shape.accelerators, ["GPU-a", "GPU-b"]);
    let err = parse("[pools.g]\ncpu_affinity = \"diagonal\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("pools.g.cpu_affinity"), "{err}");
}

#[test]
fn connection_limits_and_huge_durations_are_checked_not_panics() {
    let c = parse("").unwrap();
    assert_eq!(c.limits.max_connections, 1024);
    assert_eq!(c.limits.max_connections_per_peer, 256);
    assert_eq!(c.limits.idle_timeout, Duration::from_secs(30));
    assert_eq!(c.limits.body_timeout, Duration::from_secs(30));
    let err = parse(
        "[limits]\nmax_connections = 0\nidle_timeout_s = 7200\nbody_timeout_s = 1e300\n\
         [store]\nprune_interval_s = 1e300\n",
    )
    .unwrap_err()
    .to_string();
    for key in [
        "limits.max_connections: must be at least 1",
        "limits.idle_timeout_s: must be at most 3600 s",
        "limits.body_timeout_s: must be at most 3600 s",
        "store.prune_interval_s: must be a number of seconds from 0.1 to 1e9",
    ] {
        assert!(err.contains(key), "{key} not in {err}");
    }
}

#[test]
fn pools_keep_the_order_of_the_file() {
    let c = parse("[pools.zeta]\nmanagers = 2\n[pools.alpha]\nmanagers = 0\n").unwrap();
    let names: Vec<_> = c
        .pools
        .iter()
        .map(|p| (p.name.as_str(), p.managers))
        .collect();
    assert_eq!(names, vec![("zeta", 2), ("alpha", 0)]);
}

#[test]
fn wrong_types_name_the_line() {
    let err = parse("[limits]\nmax_tasks_per_request = \"many\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("max_tasks_per_request"), "{err}");
}

#[test]
fn a_pool_port_past_65535_and_a_task_limit_past_what_a_body_may_hold_are_named() {
    let err = parse(
        "[interchange]\nport = 65535\n[pools.a]\n[pools.b]\n[limits]\nmax_tasks_per_request = 2000000\n",
    )
    .unwrap_err()
    .to_string();
    for key in ["interchange.port", "limits.max_tasks_per_request"] {
        assert!(err.contains(key), "{key} missing from: {err}");
    }
    assert!(parse("[interchange]\nport = 65534\n[pools.a]\n[pools.b]\n").is_ok());
}
