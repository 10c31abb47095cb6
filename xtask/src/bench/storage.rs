//! `cargo xtask bench storage [--runs N] [--copy-runs N]`: volume snapshot create and revert
//! of a 4 GiB raw volume (1 GiB of it written, the rest sparse), ours (the `virt-snap`
//! binary, whole processes) against the bare tools run by hand:
//!
//! - btrfs pool: `vol-snapshot-create` vs `btrfs subvolume snapshot -r`; `vol-snapshot-revert`
//!   vs `btrfs subvolume snapshot SNAP TMP && mv VOL OLD && mv TMP VOL && btrfs subvolume
//!   delete OLD` (one `sh -c`).
//! - dir pool on btrfs (reflink): `vol-snapshot-create` vs `cp --reflink=always`; revert vs
//!   `cp --reflink=always SNAP TMP && mv TMP VOL`.
//! - dir pool on the host's ext4 (no reflink: sparse copy): `vol-snapshot-create` vs
//!   `cp --sparse=always`; revert vs `cp --sparse=always SNAP TMP && mv TMP VOL`.
//! - dir pools, durable: ours makes a snapshot durable (a copy is fsynced before it gets its
//!   name, the snapshot directory is fsynced after), `cp` does not: the create is also timed
//!   against `cp ... && sync DIR` (reflink) and `cp ... && sync FILE` (copy), and the revert
//!   against `cp ... [&& sync TMP] && mv TMP VOL && sync DIR`, one `sh -c` each.
//!
//! The btrfs filesystem is a sparse file on a loop device under target/bench/storage,
//! unmounted and detached at the end (also on error). Each run's snapshot is deleted,
//! untimed, before the next one.

use super::harness::{report, time_process, Series};
use super::{build_release, num_arg, runs_arg};
use crate::util::{self, step};
use std::path::{Path, PathBuf};
use std::process::Command;

const VOL_SIZE: &str = "4G";
const DATA_MIB: u64 = 1024;

/// A btrfs filesystem on a loop device (`DIR/btrfs.img` mounted on `DIR/mnt`), torn down on
/// drop.
pub(super) struct LoopBtrfs {
    image: PathBuf,
    dev: String,
    pub(super) mnt: PathBuf,
    mounted: bool,
}

impl LoopBtrfs {
    /// Unmount and detach what an interrupted earlier run left under `dir`.
    pub(super) fn clear_leftovers(dir: &Path) {
        let (image, mnt) = (dir.join("btrfs.img"), dir.join("mnt"));
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let m = mnt.display().to_string();
        if mounts
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(m.as_str()))
        {
            let _ = Command::new("umount").arg(&mnt).status();
        }
        if let Ok(out) = util::output(Command::new("losetup").arg("-j").arg(&image)) {
            for dev in out.lines().filter_map(|l| l.split(':').next()) {
                let _ = Command::new("losetup").args(["-d", dev]).status();
            }
        }
    }

    pub(super) fn new(dir: &Path, size: &str) -> Result<LoopBtrfs, String> {
        let image = dir.join("btrfs.img");
        let mnt = dir.join("mnt");
        let _ = std::fs::remove_file(&image);
        std::fs::create_dir_all(&mnt).map_err(|e| e.to_string())?;
        util::run(Command::new("truncate").args(["-s", size]).arg(&image))?;
        let dev = util::output(Command::new("losetup").args(["-f", "--show"]).arg(&image))?
            .trim()
            .to_string();
        let mut fs = LoopBtrfs {
            image,
            dev,
            mnt,
            mounted: false,
        };
        util::output(Command::new("mkfs.btrfs").args(["-q", "-f", &fs.dev]))?;
        util::run(Command::new("mount").arg(&fs.dev).arg(&fs.mnt))?;
        fs.mounted = true;
        Ok(fs)
    }
}

impl Drop for LoopBtrfs {
    fn drop(&mut self) {
        if self.mounted {
            // A QEMU that just ended may still hold files open for a moment: retry.
            let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !Command::new("umount")
                .arg(&self.mnt)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
                && std::time::Instant::now() < end
            {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
        let _ = std::fs::remove_file(&self.image);
    }
}

fn vs(bin: &Path, state: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(bin);
    c.arg("--state-dir").arg(state).args(args);
    c
}

fn sh(script: &str) -> Command {
    let mut c = Command::new("sh");
    c.args(["-c", script]);
    c
}

/// Time `ours()` and `peer()` alternately `runs` times after a warm-up each, running the
/// untimed `reset(i)` after each timed command.
fn interleaved(
    runs: usize,
    ours: (&str, &mut dyn FnMut(usize) -> Command),
    peer: (&str, &mut dyn FnMut(usize) -> Command),
    reset: &mut dyn FnMut(usize, bool) -> Result<(), String>,
) -> Result<(Series, Series), String> {
    let (mut a, mut b) = (Series::new(ours.0), Series::new(peer.0));
    for i in 0..=runs {
        let s = time_process(&mut (ours.1)(i))?;
        reset(i, true)?;
        let t = time_process(&mut (peer.1)(i))?;
        reset(i, false)?;
        if i > 0 {
            a.push(s);
            b.push(t);
        }
    }
    Ok((a, b))
}

fn quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

/// Write DATA_MIB MiB of random data at the start of `path` (4 GiB, sparse).
fn fill(path: &str) -> Result<(), String> {
    util::run(Command::new("dd").args([
        "if=/dev/urandom",
        &format!("of={path}"),
        "bs=1M",
        &format!("count={DATA_MIB}"),
        "conv=notrunc,fsync",
        "status=none",
    ]))
}

/// Run the benchmark.
pub fn run(args: &[String]) -> Result<(), String> {
    let runs = runs_arg(args, 20)?;
    let copy_runs = num_arg(args, "--copy-runs", 5)?;
    for t in ["btrfs", "mkfs.btrfs", "losetup", "cp"] {
        if !util::have(t) {
            return Err(format!("`{t}` is not installed: run `cargo xtask deps`"));
        }
    }
    let release = build_release("virt-snap")?;
    let bin = release.join("virt-snap");
    let work = util::target_dir().join("bench").join("storage");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let state = work.join("state");
    step("btrfs on a loop device (12 GiB sparse file)");
    let fs = LoopBtrfs::new(&work, "12G")?;
    let out = |c: &mut Command| util::output(c).map(|_| ());

    // --- btrfs pool.
    let bpool = fs.mnt.join("bpool");
    std::fs::create_dir(&bpool).map_err(|e| e.to_string())?;
    let bp = bpool.display().to_string();
    out(&mut vs(
        &bin,
        &state,
        &["pool-define-as", "b", "btrfs", &bp],
    ))?;
    out(&mut vs(
        &bin,
        &state,
        &["vol-create-as", "b", "v", VOL_SIZE],
    ))?;
    step(&format!("writing {DATA_MIB} MiB into the btrfs volume"));
    fill(&bpool.join("v/volume.raw").display().to_string())?;
    out(&mut vs(
        &bin,
        &state,
        &["vol-snapshot-create", "v", "base", "--pool", "b"],
    ))?;
    let snapdir = bpool.join(".snapshots/v");
    step(&format!(
        "btrfs snapshot create, {runs} runs each, interleaved"
    ));
    let (bc_ours, bc_peer) = interleaved(
        runs,
        ("virt-snap vol-snapshot-create (btrfs)", &mut |i| {
            vs(
                &bin,
                &state,
                &["vol-snapshot-create", "v", &format!("s{i}"), "--pool", "b"],
            )
        }),
        ("btrfs subvolume snapshot -r", &mut |i| {
            let mut c = Command::new("btrfs");
            c.args(["-q", "subvolume", "snapshot", "-r"])
                .arg(bpool.join("v"))
                .arg(snapdir.join(format!("h{i}")));
            c
        }),
        &mut |i, ours| {
            if ours {
                util::output(&mut vs(
                    &bin,
                    &state,
                    &["vol-snapshot-delete", "v", &format!("s{i}"), "--pool", "b"],
                ))
                .map(|_| ())
            } else {
                util::output(
                    Command::new("btrfs")
                        .args(["-q", "subvolume", "delete"])
                        .arg(snapdir.join(format!("h{i}"))),
                )
                .map(|_| ())
            }
        },
    )?;
    step(&format!("btrfs revert, {runs} runs each, interleaved"));
    let (v, s, tmp, old) = (
        quote(&bpool.join("v")),
        quote(&snapdir.join("base")),
        quote(&bpool.join(".v.tmp")),
        quote(&bpool.join(".v.old")),
    );
    let by_hand = format!(
        "btrfs -q subvolume snapshot {s} {tmp} && mv {v} {old} && mv {tmp} {v} && btrfs -q subvolume delete {old}"
    );
    let (br_ours, br_peer) = interleaved(
        runs,
        ("virt-snap vol-snapshot-revert (btrfs)", &mut |_| {
            vs(
                &bin,
                &state,
                &["vol-snapshot-revert", "v", "base", "--pool", "b"],
            )
        }),
        ("btrfs snapshot + 2 mv + delete (sh)", &mut |_| sh(&by_hand)),
        &mut |_, _| Ok(()),
    )?;
    out(&mut vs(&bin, &state, &["vol-delete", "v", "--pool", "b"]))?;

    // --- dir pools: on btrfs (reflink) and on the host's filesystem (copy).
    let mut dir_pairs = Vec::new();
    let mut synced = Vec::new();
    let host_dir = work.join("dpool");
    std::fs::create_dir(&host_dir).map_err(|e| e.to_string())?;
    let rdir = fs.mnt.join("dpool");
    std::fs::create_dir(&rdir).map_err(|e| e.to_string())?;
    for (pool, dir, how, n) in [
        ("r", rdir.clone(), "reflink", runs),
        ("c", host_dir.clone(), "copy", copy_runs),
    ] {
        let d = dir.display().to_string();
        out(&mut vs(&bin, &state, &["pool-define-as", pool, "dir", &d]))?;
        out(&mut vs(
            &bin,
            &state,
            &["vol-create-as", pool, "v", VOL_SIZE],
        ))?;
        step(&format!(
            "writing {DATA_MIB} MiB into the dir volume ({how})"
        ));
        fill(&dir.join("v").display().to_string())?;
        out(&mut vs(
            &bin,
            &state,
            &["vol-snapshot-create", "v", "base", "--pool", pool],
        ))?;
        let cp = if how == "reflink" {
            "--reflink=always"
        } else {
            "--sparse=always"
        };
        step(&format!("dir ({how}) snapshot create, {n} runs each"));
        let vol = dir.join("v");
        let (c_ours, c_peer) = interleaved(
            n,
            (
                &format!("virt-snap vol-snapshot-create (dir, {how})"),
                &mut |i| {
                    vs(
                        &bin,
                        &state,
                        &["vol-snapshot-create", "v", &format!("s{i}"), "--pool", pool],
                    )
                },
            ),
            (&format!("cp {cp}"), &mut |i| {
                let mut c = Command::new("cp");
                c.arg(cp).arg(&vol).arg(dir.join(format!(".h{i}")));
                c
            }),
            &mut |i, ours| {
                if ours {
                    util::output(&mut vs(
                        &bin,
                        &state,
                        &["vol-snapshot-delete", "v", &format!("s{i}"), "--pool", pool],
                    ))
                    .map(|_| ())
                } else {
                    std::fs::remove_file(dir.join(format!(".h{i}"))).map_err(|e| e.to_string())
                }
            },
        )?;
        step(&format!("dir ({how}) revert, {n} runs each"));
        let by_hand = format!(
            "cp {cp} {} {} && mv {} {}",
            quote(&dir.join(".snapshots/v/base")),
            quote(&dir.join(".v.tmp")),
            quote(&dir.join(".v.tmp")),
            quote(&vol)
        );
        let (r_ours, r_peer) = interleaved(
            n,
            (
                &format!("virt-snap vol-snapshot-revert (dir, {how})"),
                &mut |_| {
                    vs(
                        &bin,
                        &state,
                        &["vol-snapshot-revert", "v", "base", "--pool", pool],
                    )
                },
            ),
            (&format!("cp {cp} + mv (sh)"), &mut |_| sh(&by_hand)),
            &mut |_, _| Ok(()),
        )?;
        // The same revert made durable, as ours is: a copy is fsynced before it is renamed
        // over the volume, the directory after the rename (a reflink clone: the directory).
        step(&format!(
            "dir ({how}) revert vs a durable cp + mv, {n} runs each"
        ));
        let tmp = quote(&dir.join(".v.tmp"));
        let durable = format!(
            "cp {cp} {} {tmp} && {}mv {tmp} {} && sync {}",
            quote(&dir.join(".snapshots/v/base")),
            if how == "copy" {
                format!("sync {tmp} && ")
            } else {
                String::new()
            },
            quote(&vol),
            quote(&dir)
        );
        let durable_name = if how == "copy" {
            format!("cp {cp} + sync FILE + mv + sync DIR (sh)")
        } else {
            format!("cp {cp} + mv + sync DIR (sh)")
        };
        let (dr_ours, dr_peer) = interleaved(
            n,
            (
                &format!("virt-snap vol-snapshot-revert (dir, {how})"),
                &mut |_| {
                    vs(
                        &bin,
                        &state,
                        &["vol-snapshot-revert", "v", "base", "--pool", pool],
                    )
                },
            ),
            (&durable_name, &mut |_| sh(&durable)),
            &mut |_, _| Ok(()),
        )?;
        synced.push((dr_ours, dr_peer));
        {
            // The same snapshot made durable, as ours is: a copy is fsynced before it gets
            // its name (`sync FILE`); a reflink snapshot's directory is fsynced once it has
            // its name (`sync DIR`, the fsync we make). `cp` flushes neither.
            let what = if how == "copy" { "FILE" } else { "DIR" };
            step(&format!(
                "dir ({how}) snapshot create vs cp + sync {what}, {n} runs each"
            ));
            let (s_ours, s_peer) = interleaved(
                n,
                (
                    &format!("virt-snap vol-snapshot-create (dir, {how})"),
                    &mut |i| {
                        vs(
                            &bin,
                            &state,
                            &["vol-snapshot-create", "v", &format!("s{i}"), "--pool", pool],
                        )
                    },
                ),
                (&format!("cp {cp} + sync {what} (sh)"), &mut |i| {
                    let t = quote(&dir.join(format!(".h{i}")));
                    let flushed = if how == "copy" {
                        t.clone()
                    } else {
                        quote(&dir)
                    };
                    sh(&format!("cp {cp} {} {t} && sync {flushed}", quote(&vol)))
                }),
                &mut |i, ours| {
                    if ours {
                        util::output(&mut vs(
                            &bin,
                            &state,
                            &["vol-snapshot-delete", "v", &format!("s{i}"), "--pool", pool],
                        ))
                        .map(|_| ())
                    } else {
                        std::fs::remove_file(dir.join(format!(".h{i}"))).map_err(|e| e.to_string())
                    }
                },
            )?;
            synced.push((s_ours, s_peer));
        }
        out(&mut vs(&bin, &state, &["vol-delete", "v", "--pool", pool]))?;
        dir_pairs.push((c_ours, c_peer, r_ours, r_peer));
    }

    let mut pairs: Vec<(&Series, &Series)> = vec![(&bc_ours, &bc_peer), (&br_ours, &br_peer)];
    for (a, b, c, d) in &dir_pairs {
        pairs.push((a, b));
        pairs.push((c, d));
    }
    for (a, b) in &synced {
        pairs.push((a, b));
    }
    let ratios = report(
        &format!("storage: {VOL_SIZE} raw volume, {DATA_MIB} MiB written (ours vs the bare tools by hand)"),
        &pairs,
    );
    let worst = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "\ntarget: overhead over the bare tool under 10% (ratio >= 0.91): {} (worst ratio {worst:.2})",
        if worst >= 0.91 { "met" } else { "NOT met" }
    );
    let (rc, cc) = (&dir_pairs[0].0, &dir_pairs[1].0);
    println!(
        "dir snapshot create, reflink vs copy: {} vs {} ({:.0}x)",
        super::harness::ms(rc.median()),
        super::harness::ms(cc.median()),
        cc.median().as_secs_f64() / rc.median().as_secs_f64().max(1e-9)
    );
    drop(fs);
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
