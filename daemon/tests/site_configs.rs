//! Every site configuration in `scripts/site-configs/` loads and validates, and the batch
//! script each of its batch pools would submit matches its snapshot in
//! `scripts/site-configs/snapshots/<site>.<pool>.sh`.
//!
//! After an intended change of the scripts: `UPDATE_SNAPSHOTS=1 cargo test -p fnx-daemon --test
//! site_configs`, then review the diff.

use fnx_daemon::config::SiteConfig;
use fnx_daemon::service::dry_run;
use std::path::{Path, PathBuf};

fn site_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/site-configs")
}

#[test]
fn every_site_config_validates_and_renders_its_snapshot() {
    let dir = site_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("scripts/site-configs exists")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in [
        "local",
        "slurm-generic",
        "perlmutter",
        "frontier",
        "polaris",
        "aurora",
        "theta",
    ] {
        assert!(names.iter().any(|n| n == want), "{want}.toml is missing");
    }
    let update = std::env::var_os("UPDATE_SNAPSHOTS").is_some();
    let mut problems = Vec::new();
    let mut rendered = 0;
    for file in &files {
        let site = file.file_stem().unwrap().to_string_lossy().into_owned();
        let mut cfg = match SiteConfig::load(file) {
            Ok(c) => c,
            Err(e) => {
                problems.push(format!("{e}"));
                continue;
            }
        };
        for i in 0..cfg.pools.len() {
            // The fnx path would otherwise be this test's own executable.
            if let Some(b) = cfg.pools[i].blocks.as_mut() {
                b.fnx_path.get_or_insert_with(|| "/opt/fnx/bin/fnx".into());
            }
            let pool = cfg.pools[i].name.clone();
            let Some(result) = dry_run(&cfg, i) else {
                continue;
            };
            let (_, r, _) = match result {
                Ok(x) => x,
                Err(e) => {
                    problems.push(format!("{site}.{pool}: {e}"));
                    continue;
                }
            };
            rendered += 1;
            let snap = dir.join("snapshots").join(format!("{site}.{pool}.sh"));
            if update {
                std::fs::create_dir_all(snap.parent().unwrap()).unwrap();
                std::fs::write(&snap, &r.script).unwrap();
                continue;
            }
            match std::fs::read_to_string(&snap) {
                Ok(want) if want == r.script => {}
                Ok(want) => problems.push(format!(
                    "{} differs from the rendered script (UPDATE_SNAPSHOTS=1 to accept):\n\
                     --- snapshot\n{want}\n--- rendered\n{}",
                    snap.display(),
                    r.script
                )),
                Err(e) => problems.push(format!(
                    "{}: {e} (UPDATE_SNAPSHOTS=1 to create it)",
                    snap.display()
                )),
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
    assert!(rendered >= 7, "only {rendered} batch pools rendered");
}
