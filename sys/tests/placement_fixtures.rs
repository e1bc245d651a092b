//! Placement plans on fixed topologies: hwloc XML exports of a Theta KNL node (64 cores × 4
//! hardware threads, siblings numbered core + 64·k), a 2-socket AMD EPYC node (2 × 64 cores,
//! 4 NUMA nodes per socket, SMT2) and a Polaris node (32 cores, SMT2, 4 GPUs).
//! Regenerate with `lstopo-no-graphics --input "<synthetic description>" --of xml FILE` (see
//! the `SyntheticDescription` line inside each file).

use fnx_sys::placement::{plan, CpuAffinity, SlotPlan, Topology};
use std::collections::BTreeSet;

fn topo(name: &str) -> Topology {
    let path = format!("{}/tests/fixtures/{name}.xml", env!("CARGO_MANIFEST_DIR"));
    Topology::from_hwloc_xml(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn all(t: &Topology) -> Vec<u32> {
    t.pus.iter().map(|p| p.os).collect()
}

fn policy(s: &str) -> CpuAffinity {
    s.parse().unwrap()
}

fn env<'a>(s: &'a SlotPlan, k: &str) -> &'a str {
    s.env
        .iter()
        .find(|(n, _)| n == k)
        .map(|(_, v)| v.as_str())
        .unwrap_or("")
}

fn set(v: &[u32]) -> BTreeSet<u32> {
    v.iter().copied().collect()
}

#[test]
fn the_fixtures_read_as_their_machines() {
    for (name, pus, cores, packages, numas) in [
        ("theta-knl", 256, 64, 1, 1),
        ("epyc-2s", 256, 128, 2, 8),
        ("polaris", 64, 32, 1, 1),
    ] {
        let t = topo(name);
        let count = |f: fn(&fnx_sys::placement::Pu) -> u32| {
            t.pus.iter().map(f).collect::<BTreeSet<_>>().len()
        };
        assert_eq!(t.pus.len(), pus, "{name} PUs");
        assert_eq!(count(|p| p.core), cores, "{name} cores");
        assert_eq!(count(|p| p.package), packages, "{name} packages");
        assert_eq!(count(|p| p.numa), numas, "{name} NUMA nodes");
    }
    let knl = topo("theta-knl");
    let core0: Vec<u32> = knl
        .pus
        .iter()
        .filter(|p| p.core == 0)
        .map(|p| p.os)
        .collect();
    assert_eq!(core0, vec![0, 64, 128, 192], "hardware threads of core 0");
}

#[test]
fn knl_block_gives_whole_cores_and_openmp_settings() {
    let t = topo("theta-knl");
    let p = plan(&t, &all(&t), &policy("block"), 64, &[]).unwrap();
    for (i, s) in p.iter().enumerate() {
        let i = i as u32;
        assert_eq!(s.cpus, vec![i, i + 64, i + 128, i + 192], "slot {i}");
    }
    let p = plan(&t, &all(&t), &policy("block"), 16, &[]).unwrap();
    assert_eq!(
        set(&p[0].cpus),
        set(&[0, 1, 2, 3, 64, 65, 66, 67, 128, 129, 130, 131, 192, 193, 194, 195])
    );
    assert_eq!(env(&p[0], "OMP_NUM_THREADS"), "16");
    assert!(env(&p[0], "OMP_PLACES").starts_with("{0},{64},{128},{192},{1},"));
    assert!(env(&p[0], "KMP_AFFINITY").starts_with("explicit,proclist=[0,64,128,192,1,"));
    assert!(env(&p[0], "GOMP_CPU_AFFINITY").starts_with("0 64 128 192 1 "));
    // No two slots share a CPU, and together they use all.
    let used: Vec<u32> = p.iter().flat_map(|s| s.cpus.clone()).collect();
    assert_eq!(set(&used).len(), used.len());
    assert_eq!(used.len(), 256);
}

#[test]
fn knl_reverse_alternating_and_one_slot_per_hardware_thread() {
    let t = topo("theta-knl");
    let rev = plan(&t, &all(&t), &policy("block-reverse"), 4, &[]).unwrap();
    let cores_of = |s: &SlotPlan| -> BTreeSet<u32> {
        t.pus
            .iter()
            .filter(|p| s.cpus.contains(&p.os))
            .map(|p| p.core)
            .collect()
    };
    assert_eq!(cores_of(&rev[0]), (48..64).collect());
    assert_eq!(cores_of(&rev[3]), (0..16).collect());
    let alt = plan(&t, &all(&t), &policy("alternating"), 2, &[]).unwrap();
    assert_eq!(cores_of(&alt[0]), (0..64).step_by(2).collect());
    assert_eq!(cores_of(&alt[1]), (1..64).step_by(2).collect());
    // More slots than cores: one hardware thread each, siblings of a core side by side.
    let per_pu = plan(&t, &all(&t), &policy("block"), 256, &[]).unwrap();
    assert_eq!(per_pu[0].cpus, vec![0]);
    assert_eq!(per_pu[1].cpus, vec![64]);
    assert_eq!(per_pu[4].cpus, vec![1]);
    let err = plan(&t, &all(&t), &policy("block"), 300, &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("300 workers") && err.contains("0-255"),
        "{err}"
    );
}

#[test]
fn epyc_numa_spreads_slots_over_numa_nodes() {
    let t = topo("epyc-2s");
    let numa_of = |s: &SlotPlan| -> BTreeSet<u32> {
        t.pus
            .iter()
            .filter(|p| s.cpus.contains(&p.os))
            .map(|p| p.numa)
            .collect()
    };
    let p = plan(&t, &all(&t), &policy("numa"), 8, &[]).unwrap();
    let domains: Vec<BTreeSet<u32>> = p.iter().map(numa_of).collect();
    for d in &domains {
        assert_eq!(d.len(), 1, "a slot stays within one NUMA node: {domains:?}");
    }
    assert_eq!(
        domains.iter().flatten().collect::<BTreeSet<_>>().len(),
        8,
        "one slot per NUMA node"
    );
    assert_eq!(p[0].cpus.len(), 32, "16 cores × 2 threads");
    let p = plan(&t, &all(&t), &policy("numa"), 16, &[]).unwrap();
    for pair in p.chunks(2) {
        assert_eq!(
            numa_of(&pair[0]),
            numa_of(&pair[1]),
            "two slots per NUMA node"
        );
        assert!(set(&pair[0].cpus).is_disjoint(&set(&pair[1].cpus)));
    }
    // Block on two sockets: slot 0 on package 0, slot 1 on package 1.
    let p = plan(&t, &all(&t), &policy("block"), 2, &[]).unwrap();
    let pkg = |s: &SlotPlan| -> BTreeSet<u32> {
        t.pus
            .iter()
            .filter(|p| s.cpus.contains(&p.os))
            .map(|p| p.package)
            .collect()
    };
    assert_eq!(pkg(&p[0]), [0].into());
    assert_eq!(pkg(&p[1]), [1].into());
}

#[test]
fn polaris_gpus_and_a_restricted_cpuset() {
    let t = topo("polaris");
    let gpus: Vec<String> = (0..4).map(|i| i.to_string()).collect();
    let p = plan(&t, &all(&t), &policy("block"), 4, &gpus).unwrap();
    for (i, s) in p.iter().enumerate() {
        let first = 8 * i as u32;
        let want: Vec<u32> = (first..first + 8).flat_map(|c| [c, c + 32]).collect();
        assert_eq!(s.cpus, want, "slot {i}");
        assert_eq!(env(s, "CUDA_VISIBLE_DEVICES"), i.to_string());
        assert_eq!(env(s, "ROCR_VISIBLE_DEVICES"), i.to_string());
        assert_eq!(env(s, "ZE_AFFINITY_MASK"), i.to_string());
        assert_eq!(env(s, "FNX_WORKER_SLOT"), i.to_string());
    }
    let p = plan(&t, &all(&t), &policy("none"), 8, &gpus).unwrap();
    let devs: Vec<&str> = p.iter().map(|s| env(s, "CUDA_VISIBLE_DEVICES")).collect();
    assert_eq!(
        devs,
        ["0", "0", "1", "1", "2", "2", "3", "3"],
        "two slots per GPU"
    );
    assert!(p
        .iter()
        .all(|s| s.cpus.is_empty() && env(s, "OMP_NUM_THREADS").is_empty()));
    // The launcher gave this manager cores 0-7 only (with their siblings 32-39).
    let allowed: Vec<u32> = (0..8).chain(32..40).collect();
    let p = plan(&t, &allowed, &policy("block"), 2, &[]).unwrap();
    assert_eq!(p[0].cpus, vec![0, 32, 1, 33, 2, 34, 3, 35]);
    let err = plan(&t, &allowed, &policy("list:0-3:40-41"), 2, &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("CPU 40") && err.contains("0-7,32-39"), "{err}");
    let err = plan(&t, &allowed, &policy("list:0-3"), 2, &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("1 CPU lists for 2 workers"), "{err}");
    let p = plan(&t, &allowed, &policy("list:0-3:4-7"), 2, &[]).unwrap();
    assert_eq!(p[1].cpus, vec![4, 5, 6, 7]);
}

#[test]
fn this_machine_reads_from_sysfs() {
    let t = Topology::discover();
    let allowed = fnx_sys::placement::allowed_cpus();
    assert!(!t.pus.is_empty());
    assert!(allowed.iter().all(|c| t.pus.iter().any(|p| p.os == *c)));
}
