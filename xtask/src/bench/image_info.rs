//! `cargo xtask bench image-info [--runs N] [--snapshots N]`: on a qcow2 image with 1000
//! internal snapshots, `virt-snap image snapshot list` and `virt-snap image info` against
//! `qemu-img snapshot -l` and `qemu-img info`, whole processes, side by side.
//!
//! The image is made by qemu-img itself (one `qemu-img snapshot -c` per snapshot, about
//! 200 s for 1000 because qemu-img rewrites the table with small I/Os each time) and cached
//! in target/bench/image-info/ under a name that records the recipe, so later runs start at
//! once. Before timing, the benchmark checks that both tools print the same snapshot list.

use super::harness::{compare_processes, report};
use super::{build_release, runs_arg};
use crate::util::{self, step};
use std::path::{Path, PathBuf};
use std::process::Command;

const DEFAULT_SNAPSHOTS: usize = 1000;
const RECIPE: &str = "v1-1G-16M-data";

fn count_arg(args: &[String]) -> Result<usize, String> {
    match args.iter().position(|a| a == "--snapshots") {
        Some(i) => args
            .get(i + 1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| "--snapshots takes a number".to_string()),
        None => Ok(DEFAULT_SNAPSHOTS),
    }
}

/// Create (or reuse) the image with `n` snapshots, made by qemu-img.
fn image(n: usize) -> Result<PathBuf, String> {
    let dir = util::target_dir().join("bench").join("image-info");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let img = dir.join(format!("snapshots-{n}-{RECIPE}.qcow2"));
    if img.exists() {
        step(&format!("reusing {}", img.display()));
        return Ok(img);
    }
    for tool in ["qemu-img", "qemu-io"] {
        if !util::have(tool) {
            return Err(format!("`{tool}` is not installed: run `cargo xtask deps`"));
        }
    }
    let partial = dir.join(format!("snapshots-{n}-{RECIPE}.qcow2.partial"));
    let p = partial.to_str().ok_or("non-UTF-8 target dir")?;
    step(&format!(
        "creating {} with {n} snapshots by qemu-img (once; about {} s)",
        img.display(),
        n * n / 5000 + 1
    ));
    util::output(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", p, "1G"]))?;
    util::output(Command::new("qemu-io").args(["-c", "write -P 0x5a 0 16M", p]))?;
    for i in 1..=n {
        util::output(Command::new("qemu-img").args([
            "snapshot",
            "-c",
            &format!("snapshot-{i:04}"),
            p,
        ]))?;
        if i % 100 == 0 {
            eprintln!("    {i}/{n}");
        }
    }
    let check = Command::new("qemu-img")
        .args(["check", "-q", p])
        .status()
        .map_err(|e| format!("cannot run qemu-img check: {e}"))?;
    if !check.success() {
        return Err(format!("qemu-img check failed on {p}"));
    }
    std::fs::rename(&partial, &img).map_err(|e| format!("cannot rename: {e}"))?;
    Ok(img)
}

fn stdout_of(cmd: &mut Command) -> Result<String, String> {
    util::output(cmd)
}

/// Run the benchmark.
pub fn run(args: &[String]) -> Result<(), String> {
    let runs = runs_arg(args, 30)?;
    let n = count_arg(args)?;
    let release = build_release("virt-snap")?;
    let ours = release.join("virt-snap");
    let img = image(n)?;
    let img_s = img.to_str().ok_or("non-UTF-8 path")?.to_string();

    step("checking both tools print the same snapshot list and info");
    let a = stdout_of(Command::new(&ours).args(["image", "snapshot", "list", &img_s]))?;
    let b = stdout_of(Command::new("qemu-img").args(["snapshot", "-l", &img_s]))?;
    if a != b {
        return Err("virt-snap and qemu-img print different snapshot lists".into());
    }
    let a = stdout_of(Command::new(&ours).args(["-o", "json", "image", "info", &img_s]))?;
    let b = stdout_of(Command::new("qemu-img").args(["info", "--output=json", &img_s]))?;
    let (a, b): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(&a).map_err(|e| e.to_string())?,
        serde_json::from_str(&b).map_err(|e| e.to_string())?,
    );
    if a["snapshots"] != b["snapshots"] || a["snapshots"].as_array().map(Vec::len) != Some(n) {
        return Err("virt-snap and qemu-img report different snapshots".into());
    }

    step(&format!(
        "timing whole processes, {runs} runs each, interleaved"
    ));
    let cmd = |prog: &Path, a: &[&str]| {
        let mut c = Command::new(prog);
        c.args(a);
        c
    };
    let qemu_img = PathBuf::from("qemu-img");
    let (l_ours, l_peer) = compare_processes(
        runs,
        ("virt-snap image snapshot list", &mut || {
            cmd(&ours, &["image", "snapshot", "list", &img_s])
        }),
        ("qemu-img snapshot -l", &mut || {
            cmd(&qemu_img, &["snapshot", "-l", &img_s])
        }),
    )?;
    let (i_ours, i_peer) = compare_processes(
        runs,
        ("virt-snap image info", &mut || {
            cmd(&ours, &["image", "info", &img_s])
        }),
        ("qemu-img info", &mut || cmd(&qemu_img, &["info", &img_s])),
    )?;
    let (j_ours, j_peer) = compare_processes(
        runs,
        ("virt-snap -o json image info", &mut || {
            cmd(&ours, &["-o", "json", "image", "info", &img_s])
        }),
        ("qemu-img info --output=json", &mut || {
            cmd(&qemu_img, &["info", "--output=json", &img_s])
        }),
    )?;
    let ratios = report(
        &format!("image-info: qcow2 image with {n} internal snapshots ({RECIPE})"),
        &[(&l_ours, &l_peer), (&i_ours, &i_peer), (&j_ours, &j_peer)],
    );
    let worst = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "\ntarget: at least 10x faster than qemu-img: {} (worst ratio {worst:.1}x)",
        if worst >= 10.0 { "met" } else { "NOT met" }
    );
    Ok(())
}
