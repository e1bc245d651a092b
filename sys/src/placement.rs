//! Worker placement: the node's topology (packages, NUMA nodes, cores, hardware threads), and
//! plans that give each worker slot its CPUs, accelerators and environment. Plans are pure data
//! computed from a topology and a policy; [`apply_affinity`] is the one place that binds a
//! process, right before it execs.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// Why a topology, a CPU list or a placement cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// hwloc's XML is not what `lstopo --of xml` writes.
    #[error("{0}")]
    Hwloc(&'static str),
    /// A cpuset word is not hexadecimal.
    #[error("bad cpuset {text:?}: {source}")]
    Cpuset {
        /// The cpuset.
        text: String,
        /// Why.
        source: std::num::ParseIntError,
    },
    /// A CPU list has a word that is not a CPU number.
    #[error("{word:?} in {list:?} is not a CPU number")]
    NotCpu {
        /// The word.
        word: String,
        /// The list.
        list: String,
    },
    /// A CPU range runs backwards, or is larger than any machine.
    #[error("{0:?} is not a CPU range")]
    NotRange(String),
    /// Not a policy's name.
    #[error(
        "{0:?} is not a cpu_affinity (none, block, block-reverse, alternating, numa, \
         list:CPUS:CPUS...)"
    )]
    NotAffinity(String),
    /// A `list:` policy with another number of lists than workers.
    #[error("cpu_affinity list: gives {lists} CPU lists for {slots} workers")]
    ListCount {
        /// Lists given.
        lists: usize,
        /// Workers.
        slots: usize,
    },
    /// A `list:` policy names a CPU outside the manager's.
    #[error("cpu_affinity list: CPU {cpu} is not one this manager may use ({allowed})")]
    NotAllowed {
        /// The CPU.
        cpu: u32,
        /// The CPUs the manager may use.
        allowed: String,
    },
    /// More workers than CPUs to pin them to.
    #[error(
        "{slots} workers cannot each get a CPU of the {units} this manager may use ({allowed})"
    )]
    TooFewCpus {
        /// Workers.
        slots: usize,
        /// CPUs (cores, or hardware threads).
        units: usize,
        /// The CPUs the manager may use.
        allowed: String,
    },
}

/// One hardware thread (hwloc "PU").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pu {
    /// The OS's CPU number (what `sched_setaffinity` takes).
    pub os: u32,
    /// The core it belongs to (index in topology order, unique on the node).
    pub core: u32,
    /// Its package (socket).
    pub package: u32,
    /// Its NUMA node.
    pub numa: u32,
}

/// The CPUs of a node, in topology order (package, core, thread).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Topology {
    /// Every hardware thread.
    pub pus: Vec<Pu>,
}

impl Topology {
    /// This node's topology from sysfs (`/sys/devices/system/{cpu,node}`); when that cannot be
    /// read, one core per CPU this process may use.
    pub fn discover() -> Topology {
        Self::from_sysfs(std::path::Path::new("/sys/devices/system")).unwrap_or_else(|| {
            let pus = allowed_cpus()
                .into_iter()
                .enumerate()
                .map(|(i, os)| Pu {
                    os,
                    core: i as u32,
                    package: 0,
                    numa: 0,
                })
                .collect();
            Topology { pus }
        })
    }

    /// Read a sysfs tree (`cpu/cpuN/topology/{physical_package_id,core_id}`,
    /// `node/nodeN/cpulist`).
    pub fn from_sysfs(root: &std::path::Path) -> Option<Topology> {
        let read = |p: std::path::PathBuf| std::fs::read_to_string(p).ok();
        let mut numa_of: BTreeMap<u32, u32> = BTreeMap::new();
        if let Ok(nodes) = std::fs::read_dir(root.join("node")) {
            for n in nodes.flatten() {
                let name = n.file_name().to_string_lossy().into_owned();
                let Some(id) = name
                    .strip_prefix("node")
                    .and_then(|i| i.parse::<u32>().ok())
                else {
                    continue;
                };
                if let Some(list) = read(n.path().join("cpulist")) {
                    for cpu in parse_cpu_list(list.trim()).unwrap_or_default() {
                        numa_of.insert(cpu, id);
                    }
                }
            }
        }
        let mut raw = Vec::new();
        for e in std::fs::read_dir(root.join("cpu")).ok()?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(os) = name.strip_prefix("cpu").and_then(|i| i.parse::<u32>().ok()) else {
                continue;
            };
            let topo = e.path().join("topology");
            let num = |f: &str| read(topo.join(f)).and_then(|t| t.trim().parse::<i64>().ok());
            let (Some(package), Some(core)) = (num("physical_package_id"), num("core_id")) else {
                continue; // offline CPUs have no topology
            };
            raw.push((package.max(0) as u32, core.max(0) as u32, os));
        }
        if raw.is_empty() {
            return None;
        }
        raw.sort();
        let mut cores: BTreeMap<(u32, u32), u32> = BTreeMap::new();
        let pus = raw
            .into_iter()
            .map(|(package, core_id, os)| {
                let n = cores.len() as u32;
                let core = *cores.entry((package, core_id)).or_insert(n);
                Pu {
                    os,
                    core,
                    package,
                    numa: numa_of.get(&os).copied().unwrap_or(0),
                }
            })
            .collect();
        Some(Topology { pus })
    }

    /// Parse hwloc's XML export (`lstopo --of xml`): PUs under their cores and packages, NUMA
    /// nodes matched by cpuset. Only what placement needs is read.
    pub fn from_hwloc_xml(text: &str) -> Result<Topology, PlacementError> {
        // Open objects: (type, os_index, sequence number of the object in the file).
        let mut stack: Vec<(String, Option<u32>, usize)> = Vec::new();
        let mut seen = 0usize;
        let mut numa_sets: Vec<(u32, Vec<u32>)> = Vec::new();
        let mut pus = Vec::new();
        let mut core_ids: BTreeMap<usize, u32> = BTreeMap::new();
        let mut rest = text;
        while let Some(start) = rest.find('<') {
            rest = &rest[start..];
            let end = rest
                .find('>')
                .ok_or(PlacementError::Hwloc("unterminated tag"))?;
            let tag = &rest[1..end];
            rest = &rest[end + 1..];
            if tag.starts_with("/object") {
                stack.pop();
                continue;
            }
            let Some(attrs) = tag.strip_prefix("object ") else {
                continue;
            };
            seen += 1;
            let closed = attrs.trim_end().ends_with('/');
            let ty =
                attr(attrs, "type").ok_or(PlacementError::Hwloc("an object without a type"))?;
            let os = attr(attrs, "os_index").and_then(|v| v.parse::<u32>().ok());
            match ty {
                "NUMANode" => {
                    let set = attr(attrs, "cpuset")
                        .ok_or(PlacementError::Hwloc("a NUMANode without a cpuset"))?;
                    numa_sets.push((os.unwrap_or(numa_sets.len() as u32), parse_cpuset(set)?));
                }
                "PU" => {
                    let os = os.ok_or(PlacementError::Hwloc("a PU without os_index"))?;
                    // Its core: the nearest Core object (a PU without one is its own core).
                    let key = stack
                        .iter()
                        .rev()
                        .find(|(t, _, _)| t == "Core")
                        .map_or(seen, |(_, _, seq)| *seq);
                    let n = core_ids.len() as u32;
                    let core = *core_ids.entry(key).or_insert(n);
                    let package = stack
                        .iter()
                        .rev()
                        .find(|(t, _, _)| t == "Package")
                        .and_then(|(_, i, _)| *i)
                        .unwrap_or(0);
                    pus.push(Pu {
                        os,
                        core,
                        package,
                        numa: 0,
                    });
                }
                _ => {}
            }
            if !closed {
                stack.push((ty.to_string(), os, seen));
            }
        }
        if pus.is_empty() {
            return Err(PlacementError::Hwloc(
                "no PU objects: not an hwloc XML topology",
            ));
        }
        for pu in &mut pus {
            if let Some((id, _)) = numa_sets.iter().find(|(_, set)| set.contains(&pu.os)) {
                pu.numa = *id;
            }
        }
        Ok(Topology { pus })
    }

    /// Cores (their PUs' OS numbers) among `allowed` CPUs, in topology order.
    fn cores(&self, allowed: &[u32]) -> Vec<Vec<Pu>> {
        let mut by_core: BTreeMap<u32, Vec<Pu>> = BTreeMap::new();
        for pu in self.pus.iter().filter(|p| allowed.contains(&p.os)) {
            by_core.entry(pu.core).or_default().push(*pu);
        }
        by_core.into_values().collect()
    }
}

fn attr<'a>(attrs: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=\"");
    let padded_start = attrs.find(&key).map(|i| i + key.len()).or_else(|| {
        let k = format!("{name}=\"");
        attrs.starts_with(&k).then_some(k.len())
    })?;
    let rest = &attrs[padded_start..];
    Some(&rest[..rest.find('"')?])
}

/// An hwloc cpuset (`0xffffffff,0x0000000f`: 32-bit words, most significant first) as CPU
/// numbers.
fn parse_cpuset(text: &str) -> Result<Vec<u32>, PlacementError> {
    let mut cpus = Vec::new();
    let words: Vec<&str> = text.split(',').collect();
    for (i, w) in words.iter().rev().enumerate() {
        // hwloc leaves all-zero words empty (`0x0000ffff,,,,0x0000ffff`).
        let w = w.trim().trim_start_matches("0x");
        let bits = if w.is_empty() {
            0
        } else {
            u32::from_str_radix(w, 16).map_err(|source| PlacementError::Cpuset {
                text: text.to_string(),
                source,
            })?
        };
        for b in 0..32 {
            if bits & (1 << b) != 0 {
                cpus.push(i as u32 * 32 + b);
            }
        }
    }
    Ok(cpus)
}

/// A Linux CPU list (`0-3,8,10-11`).
pub fn parse_cpu_list(text: &str) -> Result<Vec<u32>, PlacementError> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let num = |s: &str| {
            s.trim().parse::<u32>().map_err(|_| PlacementError::NotCpu {
                word: s.to_string(),
                list: text.to_string(),
            })
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b || b - a > 65536 {
                    return Err(PlacementError::NotRange(part.to_string()));
                }
                out.extend(a..=b);
            }
            None => out.push(num(part)?),
        }
    }
    Ok(out)
}

/// How workers are pinned (`cpu_affinity`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CpuAffinity {
    /// No binding: every worker may run anywhere the manager may.
    None,
    /// Contiguous cores: worker i gets the i-th equal share.
    Block,
    /// The same, from the last core backwards.
    BlockReverse,
    /// Round robin: worker i gets cores i, i+n, i+2n, ...
    Alternating,
    /// Workers spread evenly over NUMA nodes, contiguous cores within each.
    Numa,
    /// Explicit CPUs per worker (`list:0-3,8:4-7`: worker 0 gets 0-3 and 8, worker 1 gets 4-7).
    List(Vec<Vec<u32>>),
}

impl fmt::Display for CpuAffinity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CpuAffinity::None => f.write_str("none"),
            CpuAffinity::Block => f.write_str("block"),
            CpuAffinity::BlockReverse => f.write_str("block-reverse"),
            CpuAffinity::Alternating => f.write_str("alternating"),
            CpuAffinity::Numa => f.write_str("numa"),
            CpuAffinity::List(lists) => {
                let l: Vec<String> = lists.iter().map(|c| cpu_list(c)).collect();
                write!(f, "list:{}", l.join(":"))
            }
        }
    }
}

impl FromStr for CpuAffinity {
    type Err = PlacementError;
    fn from_str(s: &str) -> Result<Self, PlacementError> {
        Ok(match s {
            "none" => CpuAffinity::None,
            "block" => CpuAffinity::Block,
            "block-reverse" => CpuAffinity::BlockReverse,
            "alternating" => CpuAffinity::Alternating,
            "numa" => CpuAffinity::Numa,
            other => match other.strip_prefix("list:") {
                Some(lists) => CpuAffinity::List(
                    lists
                        .split(':')
                        .map(parse_cpu_list)
                        .collect::<Result<_, _>>()?,
                ),
                None => return Err(PlacementError::NotAffinity(other.to_string())),
            },
        })
    }
}

/// What one worker slot gets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlotPlan {
    /// CPUs it is bound to (empty: not bound).
    pub cpus: Vec<u32>,
    /// Accelerators it sees (empty: not restricted).
    pub accelerators: Vec<String>,
    /// Environment set for it (OpenMP and GPU variables, `FNX_WORKER_SLOT`).
    pub env: Vec<(String, String)>,
}

/// Plan `slots` worker slots on `topo`, within the CPUs this manager may use (`allowed`).
pub fn plan(
    topo: &Topology,
    allowed: &[u32],
    affinity: &CpuAffinity,
    slots: usize,
    accelerators: &[String],
) -> Result<Vec<SlotPlan>, PlacementError> {
    if slots == 0 {
        return Ok(Vec::new());
    }
    let cpus: Vec<Vec<u32>> = match affinity {
        CpuAffinity::None => vec![Vec::new(); slots],
        CpuAffinity::List(lists) => {
            if lists.len() != slots {
                return Err(PlacementError::ListCount {
                    lists: lists.len(),
                    slots,
                });
            }
            for l in lists {
                if let Some(c) = l.iter().find(|c| !allowed.contains(c)) {
                    return Err(PlacementError::NotAllowed {
                        cpu: *c,
                        allowed: cpu_list(allowed),
                    });
                }
            }
            lists.clone()
        }
        _ => split(topo, allowed, affinity, slots)?,
    };
    Ok(cpus
        .into_iter()
        .enumerate()
        .map(|(i, cpus)| {
            let accelerators = share(accelerators, i, slots);
            let mut env = vec![("FNX_WORKER_SLOT".to_string(), i.to_string())];
            if !cpus.is_empty() {
                let list = |sep: &str, f: &dyn Fn(u32) -> String| {
                    cpus.iter().map(|&c| f(c)).collect::<Vec<_>>().join(sep)
                };
                env.push(("OMP_NUM_THREADS".into(), cpus.len().to_string()));
                env.push(("OMP_PLACES".into(), list(",", &|c| format!("{{{c}}}"))));
                env.push(("GOMP_CPU_AFFINITY".into(), list(" ", &|c| c.to_string())));
                env.push((
                    "KMP_AFFINITY".into(),
                    format!("explicit,proclist=[{}]", list(",", &|c| c.to_string())),
                ));
            }
            if !accelerators.is_empty() {
                let ids = accelerators.join(",");
                for var in [
                    "CUDA_VISIBLE_DEVICES",
                    "ROCR_VISIBLE_DEVICES",
                    "ZE_AFFINITY_MASK",
                ] {
                    env.push((var.into(), ids.clone()));
                }
                env.push(("ZE_ENABLE_PCI_ID_DEVICE_ORDER".into(), "1".into()));
            }
            SlotPlan {
                cpus,
                accelerators,
                env,
            }
        })
        .collect())
}

/// Accelerators of slot `i` of `n`: with at least as many slots as accelerators, slots share
/// them in blocks (8 slots on 4 GPUs: two per GPU); with fewer, each slot gets its own group.
fn share(acc: &[String], i: usize, n: usize) -> Vec<String> {
    if acc.is_empty() {
        return Vec::new();
    }
    if n >= acc.len() {
        return vec![acc[i * acc.len() / n].clone()];
    }
    acc[i * acc.len() / n..(i + 1) * acc.len() / n].to_vec()
}

/// Split the allowed cores (or, with more slots than cores, hardware threads) among slots.
fn split(
    topo: &Topology,
    allowed: &[u32],
    affinity: &CpuAffinity,
    slots: usize,
) -> Result<Vec<Vec<u32>>, PlacementError> {
    let cores = topo.cores(allowed);
    // Units to hand out: whole cores when there are enough, else single hardware threads.
    let units: Vec<Vec<Pu>> = if cores.len() >= slots {
        cores
    } else {
        cores.into_iter().flatten().map(|p| vec![p]).collect()
    };
    if units.len() < slots {
        return Err(PlacementError::TooFewCpus {
            slots,
            units: units.len(),
            allowed: cpu_list(allowed),
        });
    }
    let per = units.len() / slots;
    let ids = |us: &[Vec<Pu>]| -> Vec<u32> { us.iter().flatten().map(|p| p.os).collect() };
    Ok(match affinity {
        CpuAffinity::Block => (0..slots)
            .map(|i| ids(&units[i * per..(i + 1) * per]))
            .collect(),
        CpuAffinity::BlockReverse => (0..slots)
            .map(|i| {
                let end = units.len() - i * per;
                ids(&units[end - per..end])
            })
            .collect(),
        CpuAffinity::Alternating => (0..slots)
            .map(|i| {
                let mine: Vec<Vec<Pu>> = units.iter().skip(i).step_by(slots).cloned().collect();
                ids(&mine)
            })
            .collect(),
        CpuAffinity::Numa => {
            let mut by_numa: BTreeMap<u32, Vec<Vec<Pu>>> = BTreeMap::new();
            for u in units {
                by_numa.entry(u[0].numa).or_default().push(u);
            }
            let domains: Vec<Vec<Vec<Pu>>> = by_numa.into_values().collect();
            let n = domains.len();
            (0..slots)
                .map(|i| {
                    // Slot i goes to domain i*n/slots; the slots of a domain split it in blocks.
                    let d = i * n / slots;
                    let first = (0..slots).find(|&j| j * n / slots == d).unwrap_or(i);
                    let count = (0..slots).filter(|&j| j * n / slots == d).count();
                    let dom = &domains[d];
                    let per = (dom.len() / count).max(1);
                    let k = i - first;
                    let start = (k * per).min(dom.len().saturating_sub(1));
                    ids(&dom[start..(start + per).min(dom.len())])
                })
                .collect()
        }
        CpuAffinity::None | CpuAffinity::List(_) => unreachable!("handled by plan"),
    })
}

/// A CPU list in Linux's compact form (`0-3,8`).
pub fn cpu_list(cpus: &[u32]) -> String {
    let mut v = cpus.to_vec();
    v.sort_unstable();
    v.dedup();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            v[i].to_string()
        } else {
            format!("{}-{}", v[i], v[j])
        });
        i = j + 1;
    }
    out.join(",")
}

/// The CPUs this process may run on (`sched_getaffinity`: what the launcher, the batch system
/// or a cgroup left it).
pub fn allowed_cpus() -> Vec<u32> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
            return (0..libc::CPU_SETSIZE as u32)
                .filter(|&c| libc::CPU_ISSET(c as usize, &set))
                .collect();
        }
    }
    (0..crate::node::usable_cpus()).collect()
}

/// Bind the calling process to `cpus` (nothing when empty). Async-signal-safe: called between
/// fork and exec.
pub fn apply_affinity(cpus: &[u32]) -> std::io::Result<()> {
    if cpus.is_empty() {
        return Ok(());
    }
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it; sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            if (c as usize) < libc::CPU_SETSIZE as usize {
                libc::CPU_SET(c as usize, &mut set);
            }
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A plan as `fnx manager --print-plan` shows it.
pub struct PlanReport<'a> {
    /// The topology.
    pub topo: &'a Topology,
    /// The CPUs the manager may use.
    pub allowed: &'a [u32],
    /// The policy.
    pub affinity: &'a CpuAffinity,
    /// The plan.
    pub plan: &'a [SlotPlan],
}

impl fmt::Display for PlanReport<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.topo;
        let count = |key: fn(&Pu) -> u32| {
            let mut v: Vec<u32> = t.pus.iter().map(key).collect();
            v.sort_unstable();
            v.dedup();
            v.len()
        };
        writeln!(
            f,
            "node: {} packages, {} NUMA nodes, {} cores, {} hardware threads; this manager may \
             use CPUs {}",
            count(|p| p.package),
            count(|p| p.numa),
            count(|p| p.core),
            t.pus.len(),
            cpu_list(self.allowed)
        )?;
        writeln!(
            f,
            "cpu_affinity: {}; {} worker slots",
            self.affinity,
            self.plan.len()
        )?;
        for (i, s) in self.plan.iter().enumerate() {
            let cpus = if s.cpus.is_empty() {
                "not bound".to_string()
            } else {
                let mut cores: Vec<u32> = t
                    .pus
                    .iter()
                    .filter(|p| s.cpus.contains(&p.os))
                    .map(|p| p.core)
                    .collect();
                cores.sort_unstable();
                cores.dedup();
                let n = cores.len();
                format!(
                    "CPUs {} ({n} core{})",
                    cpu_list(&s.cpus),
                    if n == 1 { "" } else { "s" }
                )
            };
            let acc = if s.accelerators.is_empty() {
                String::new()
            } else {
                format!("; accelerators {}", s.accelerators.join(","))
            };
            writeln!(f, "  slot {i}: {cpus}{acc}")?;
            let env: Vec<String> = s
                .env
                .iter()
                .filter(|(k, _)| k != "FNX_WORKER_SLOT")
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            if !env.is_empty() {
                writeln!(f, "    {}", env.join(" "))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_and_cpusets() {
        assert_eq!(
            parse_cpu_list("0-3,8, 10-11").unwrap(),
            vec![0, 1, 2, 3, 8, 10, 11]
        );
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("x").is_err());
        assert_eq!(parse_cpuset("0x00000001,0x80000000").unwrap(), vec![31, 32]);
        assert_eq!(parse_cpuset("0x1,,0x1").unwrap(), vec![0, 64]);
        assert_eq!(cpu_list(&[8, 0, 1, 2, 3, 10]), "0-3,8,10");
    }

    #[test]
    fn affinity_policies_parse() {
        assert_eq!("block".parse::<CpuAffinity>().unwrap(), CpuAffinity::Block);
        assert_eq!(
            "list:0-1,8:2-3".parse::<CpuAffinity>().unwrap(),
            CpuAffinity::List(vec![vec![0, 1, 8], vec![2, 3]])
        );
        let err = "blocky".parse::<CpuAffinity>().unwrap_err().to_string();
        assert!(err.contains("block-reverse"), "{err}");
    }

    #[test]
    fn shares_of_accelerators() {
        let acc: Vec<String> = (0..4).map(|i| i.to_string()).collect();
        let of = |i, n| share(&acc, i, n).join(",");
        assert_eq!(
            (0..8).map(|i| of(i, 8)).collect::<Vec<_>>(),
            ["0", "0", "1", "1", "2", "2", "3", "3"]
        );
        assert_eq!((0..2).map(|i| of(i, 2)).collect::<Vec<_>>(), ["0,1", "2,3"]);
    }
}
