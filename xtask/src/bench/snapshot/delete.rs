//! `--part delete` of `cargo xtask bench snapshot`: delete of an external disk-only snapshot
//! of a running no-OS KVM domain (the revert part's shape: 256 MiB, two 64 MiB qcow2 disks),
//! virt-snap against libvirt 11.3 in the same run (issue 14's figures). Two cases, each on its
//! own domain per side (four domains), each with the chain base <- s1 <- s2 (two external
//! disk-only snapshots of the running domain, s2 current, the disks on s2's overlays):
//!
//! - **leaf**: `snapshot-delete DOM s2`: the active block-commit of the top overlay into s1's,
//!   with pivot; the disks end on s1's overlays (chain of 2).
//! - **mid-chain**: `snapshot-delete DOM s1`: the intermediate block-commit of s1's overlay
//!   into the base, below the active layer; the disks stay on s2's overlays, now backed by
//!   the base (chain of 2).
//!
//! Each round builds its own chain (untimed: both snapshots created, each side with its own
//! `snapshot-create-as DOM NAME --disk-only`, names unique per round), times only the delete
//! (the whole CLI process, spawn to exit, and ours' own `elapsed-ms`), checks it (untimed:
//! `query-status` says running, `virsh domstate` too for libvirt's, the snapshot gone from
//! `snapshot-list --name` and the other one left, `domblklist` on the expected overlays,
//! `qemu-img info --backing-chain -U` of each disk's top the expected two images; ours must
//! report kind `external`, `deleted` the one snapshot, no warning), then deletes the remaining
//! snapshot (untimed) so that the disks are back on their base images for the next round. A
//! round that fails any of this is counted as failed, with its first error, never as a
//! number. Before each timed call every bench QEMU must be quiet and the domain's QEMU idle;
//! the order of the sides alternates from round to round; round 0 is a warm-up.

use super::super::harness::{ms, report, Series};
use super::revert::{qemu_pid, spread, stats, status_running, Fails};
use super::{domain_xml, file_disks};
use super::{
    json, json_ms, libvirt, push, qcow2_disks, rows, settle, timed, verdict, virsh_monitor,
    virsh_remove, virsh_start, virsh_wait_idle, wait_quiet, Bins, Opts, Ours, Verdict,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const MEMORY_MIB: u64 = 256;
const DISKS: usize = 2;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Case {
    Leaf,
    Mid,
}

impl Case {
    fn tag(self) -> &'static str {
        match self {
            Case::Leaf => "leaf",
            Case::Mid => "mid",
        }
    }
    /// The JSON key stem (`delete-leaf-ms`, ...).
    fn key(self) -> &'static str {
        match self {
            Case::Leaf => "delete-leaf",
            Case::Mid => "delete-mid-chain",
        }
    }
    fn what(self) -> &'static str {
        match self {
            Case::Leaf => "external leaf s2 (active commit, pivot)",
            Case::Mid => "external mid-chain s1 (intermediate commit)",
        }
    }
    /// Short enough for the table's first column.
    fn short(self) -> &'static str {
        match self {
            Case::Leaf => "leaf s2",
            Case::Mid => "mid-chain s1",
        }
    }
    /// libvirt's median measured before on this machine kind (../shared/notes/live-path.md):
    /// the yardstick when libvirt is not measured in the run.
    fn reference(self) -> Duration {
        match self {
            Case::Leaf => Duration::from_millis(97),
            Case::Mid => Duration::from_millis(118),
        }
    }
}

/// Each disk's (target, source), in the domain's order.
type Blk = Vec<(String, String)>;

/// One case's measurements on both sides.
struct Measured {
    case: Case,
    ours: Series,
    ours_elapsed: Series,
    peer: Series,
    ours_fails: Fails,
    peer_fails: Fails,
    ours_restarts: usize,
    peer_restarts: usize,
    /// Rounds whose merged overlay files were still there after the delete, per side.
    ours_left: usize,
    peer_left: usize,
}

impl Measured {
    fn new(case: Case) -> Measured {
        let w = case.short();
        Measured {
            case,
            ours: Series::new(format!("virt-snap snapshot-delete ({w})")),
            ours_elapsed: Series::new(format!("  virt-snap elapsed-ms ({w})")),
            peer: Series::new(format!("virsh snapshot-delete ({w})")),
            ours_fails: Fails::default(),
            peer_fails: Fails::default(),
            ours_restarts: 0,
            peer_restarts: 0,
            ours_left: 0,
            peer_left: 0,
        }
    }
}

/// One side's CLI: virt-snap's or virsh's.
#[derive(Clone, Copy)]
enum Side<'a> {
    Ours(&'a Ours),
    Peer,
}

impl Side<'_> {
    fn cmd(&self, args: &[&str]) -> Command {
        match self {
            Side::Ours(us) => us.cmd(args),
            Side::Peer => libvirt::virsh(args),
        }
    }
    fn ok(&self, args: &[&str]) -> Result<String, String> {
        crate::util::output(&mut self.cmd(args))
    }
    fn monitor(&self, dom: &str, cmd: &str) -> Result<String, String> {
        match self {
            Side::Ours(us) => us.monitor(dom, cmd),
            Side::Peer => virsh_monitor(dom, cmd),
        }
    }
    fn wait_idle(&self, dom: &str) -> Result<(), String> {
        match self {
            Side::Ours(us) => us.wait_idle(dom),
            Side::Peer => virsh_wait_idle(dom),
        }
    }
    fn blklist(&self, dom: &str) -> Result<Blk, String> {
        match self {
            Side::Ours(_) => {
                let out = self.ok(&["domblklist", dom, "--output", "json"])?;
                ours_blklist(&out)
            }
            Side::Peer => Ok(virsh_blklist(&self.ok(&["domblklist", dom])?)),
        }
    }
    fn names(&self, dom: &str) -> Result<Vec<String>, String> {
        let out = self.ok(&["snapshot-list", dom, "--name"])?;
        let mut v: Vec<String> = out
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        v.sort();
        Ok(v)
    }
}

/// virt-snap's `domblklist --output json`: `[{"target", "source"}, ...]`.
fn ours_blklist(out: &str) -> Result<Blk, String> {
    let v = json(out)?;
    let disks = v
        .as_array()
        .or_else(|| v["disks"].as_array())
        .ok_or_else(|| format!("domblklist: no disks in {out}"))?;
    Ok(disks
        .iter()
        .map(|d| {
            (
                d["target"].as_str().unwrap_or_default().to_string(),
                d["source"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect())
}

/// `virsh -q domblklist DOM`: ` vda   /path` lines, no header.
fn virsh_blklist(out: &str) -> Blk {
    out.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.to_string(), w.next()?.to_string()))
        })
        .collect()
}

/// The files of `qemu-img info --backing-chain --output json` (top first), canonicalized.
fn chain_files(out: &str) -> Result<Vec<PathBuf>, String> {
    let v = json(out)?;
    let imgs = v
        .as_array()
        .ok_or_else(|| format!("qemu-img info: not an array: {out}"))?;
    imgs.iter()
        .map(|i| {
            let f = i["filename"]
                .as_str()
                .ok_or_else(|| format!("qemu-img info: an image without filename: {i}"))?;
            Ok(canon(f))
        })
        .collect()
}

fn canon(f: &str) -> PathBuf {
    std::fs::canonicalize(f).unwrap_or_else(|_| PathBuf::from(f))
}

/// Each disk's chain from `top` down must be exactly `want` (top first).
fn check_chain(top: &Blk, want: &[&Blk]) -> Result<(), String> {
    for (i, (t, src)) in top.iter().enumerate() {
        let out = crate::util::output(Command::new("qemu-img").args([
            "info",
            "--backing-chain",
            "-U",
            "--output",
            "json",
            src,
        ]))?;
        let got = chain_files(&out)?;
        let exp: Vec<PathBuf> = want.iter().map(|b| canon(&b[i].1)).collect();
        if got != exp {
            return Err(format!(
                "{t}: qemu-img info --backing-chain of {src} shows {} images {got:?}, expected {} {exp:?}",
                got.len(),
                exp.len()
            ));
        }
    }
    Ok(())
}

/// Every disk moved onto a new source between `a` and `b`.
fn all_moved(a: &Blk, b: &Blk, what: &str) -> Result<(), String> {
    if a.len() != DISKS
        || b.len() != DISKS
        || a.iter().zip(b).any(|(x, y)| x.0 != y.0 || x.1 == y.1)
    {
        return Err(format!(
            "after {what} domblklist shows {b:?}, before it {a:?}"
        ));
    }
    Ok(())
}

/// The round's chain, built untimed: each disk's sources on the base, after s1, after s2.
struct Chain {
    base: Blk,
    s1: Blk,
    s2: Blk,
}

fn setup(side: Side<'_>, dom: &str, base: &Blk, s1: &str, s2: &str) -> Result<Chain, String> {
    side.wait_idle(dom)?;
    let now = side.blklist(dom)?;
    if &now != base {
        return Err(format!(
            "before the round the disks are not on their base images: {now:?}"
        ));
    }
    let names = side.names(dom)?;
    if !names.is_empty() {
        return Err(format!("before the round snapshots are left: {names:?}"));
    }
    side.ok(&["snapshot-create-as", dom, s1, "--disk-only"])?;
    let t1 = side.blklist(dom)?;
    all_moved(base, &t1, s1)?;
    side.ok(&["snapshot-create-as", dom, s2, "--disk-only"])?;
    let t2 = side.blklist(dom)?;
    all_moved(&t1, &t2, s2)?;
    check_chain(&t2, &[&t2, &t1, base])?;
    Ok(Chain {
        base: base.clone(),
        s1: t1,
        s2: t2,
    })
}

/// What one round measured.
struct Round {
    wall: Duration,
    elapsed: Option<Duration>,
    restarted: bool,
    /// The merged overlay files are still there.
    left: bool,
}

/// One round of one side: the chain made, the delete timed and checked, the other snapshot
/// deleted (untimed). `busy` counts calls started with a bench QEMU still busy.
fn once(
    side: Side<'_>,
    dom: &str,
    base: &Blk,
    case: Case,
    round: usize,
    busy: &mut usize,
) -> Result<Round, String> {
    let (s1, s2) = (format!("s1-{round}"), format!("s2-{round}"));
    let c = setup(side, dom, base, &s1, &s2)?;
    let (victim, other, after, merged) = match case {
        Case::Leaf => (&s2, &s1, &c.s1, &c.s2),
        Case::Mid => (&s1, &s2, &c.s2, &c.s1),
    };
    *busy += usize::from(!settle().0);
    side.wait_idle(dom)?;
    let before = qemu_pid(dom);
    let mut args = vec!["snapshot-delete", dom, victim.as_str()];
    if let Side::Ours(_) = side {
        args.extend(["--output", "json"]);
    }
    let (wall, out) = timed(&mut side.cmd(&args))?;
    // The checks, untimed.
    let mut elapsed = None;
    if let Side::Ours(_) = side {
        let j = json(&out)?;
        if j["kind"] != "external" || j["deleted"] != serde_json::json!([victim]) {
            return Err(format!(
                "expected kind external and deleted [{victim}], got {out}"
            ));
        }
        if j["warnings"].as_array().is_some_and(|w| !w.is_empty()) {
            return Err(format!("warnings: {}", j["warnings"]));
        }
        elapsed = Some(json_ms(&j, "elapsed-ms").ok_or_else(|| format!("no elapsed-ms: {out}"))?);
    } else {
        let st = side.ok(&["domstate", dom])?;
        if st.trim() != "running" {
            return Err(format!(
                "not running after the delete: domstate says {:?}",
                st.trim()
            ));
        }
    }
    status_running(
        &side.monitor(dom, r#"{"execute":"query-status"}"#)?,
        "delete",
    )?;
    let names = side.names(dom)?;
    if names != [other.clone()] {
        return Err(format!(
            "after deleting {victim} snapshot-list shows {names:?}, expected [{other}]"
        ));
    }
    let now = side.blklist(dom)?;
    if &now != after {
        return Err(format!(
            "after deleting {victim} domblklist shows {now:?}, expected {after:?}"
        ));
    }
    check_chain(&now, &[after, &c.base])?;
    let left = merged.iter().any(|(_, f)| Path::new(f).exists());
    let restarted = qemu_pid(dom) != before;
    // Back to the base images for the next round, untimed.
    side.wait_idle(dom)?;
    side.ok(&["snapshot-delete", dom, other])?;
    let now = side.blklist(dom)?;
    if &now != base {
        return Err(format!(
            "after deleting {other} too (untimed) domblklist shows {now:?}, expected the base {base:?}"
        ));
    }
    Ok(Round {
        wall,
        elapsed,
        restarted,
        left,
    })
}

/// (e) delete of an external disk-only snapshot of a running domain: the leaf on top, the
/// middle of the chain.
pub(super) fn delete_part(
    o: &Opts,
    bins: &Bins,
    state: &Path,
    dir: &Path,
    peer: bool,
) -> Result<Vec<Verdict>, String> {
    let cases = [Case::Leaf, Case::Mid];
    let ours_dom = |c: Case| format!("vsbench-snap-del-{}", c.tag());
    let peer_dom = |c: Case| format!("vsbench-snap-del-{}-libvirt", c.tag());
    crate::util::step(
        "delete: domains with 2 qcow2 disks, 256 MiB (ours and libvirt's, leaf and mid-chain)",
    );
    let mut ours = bins.virt_snap.as_ref().map(|b| Ours::new(b, state));
    if let Some(us) = &mut ours {
        for c in cases {
            let d = ours_dom(c);
            let disks = qcow2_disks(dir, &format!("ours-{}", c.tag()), DISKS)?;
            us.start(&d, &domain_xml(&d, MEMORY_MIB, &file_disks(&disks)), dir)?;
        }
    }
    struct PeerDoms(Vec<String>);
    impl Drop for PeerDoms {
        fn drop(&mut self) {
            for d in &self.0 {
                virsh_remove(d);
            }
        }
    }
    let mut peer_doms = PeerDoms(Vec::new());
    if peer {
        for c in cases {
            let d = peer_dom(c);
            let disks = qcow2_disks(dir, &format!("libvirt-{}", c.tag()), DISKS)?;
            peer_doms.0.push(d.clone());
            virsh_start(&d, &domain_xml(&d, MEMORY_MIB, &file_disks(&disks)), dir)?;
        }
    }
    wait_quiet("delete");
    // Each domain's disks on their base images, as the rounds must find them.
    let mut ours_base = Vec::new();
    let mut peer_base = Vec::new();
    for c in cases {
        if let Some(us) = &ours {
            ours_base.push(Side::Ours(us).blklist(&ours_dom(c))?);
        }
        if peer {
            peer_base.push(Side::Peer.blklist(&peer_dom(c))?);
        }
    }

    crate::util::step(&format!(
        "delete: {} rounds each after a warm-up, each building its chain untimed, ours / libvirt alternating, every QEMU quiet and the domain's idle before each call",
        o.runs
    ));
    let mut m: Vec<Measured> = cases.iter().map(|&c| Measured::new(c)).collect();
    let mut busy = 0;
    for i in 0..=o.runs {
        let keep = i > 0;
        for (ci, x) in m.iter_mut().enumerate() {
            let c = x.case;
            for k in 0..2 {
                if (i + k) % 2 == 0 {
                    let Some(us) = &ours else { continue };
                    match once(
                        Side::Ours(us),
                        &ours_dom(c),
                        &ours_base[ci],
                        c,
                        i,
                        &mut busy,
                    ) {
                        Ok(r) if keep => {
                            push(&mut x.ours, r.wall);
                            push(&mut x.ours_elapsed, r.elapsed.unwrap_or_default());
                            x.ours_restarts += usize::from(r.restarted);
                            x.ours_left += usize::from(r.left);
                        }
                        Ok(_) => {}
                        Err(e) => x.ours_fails.add(format!("round {i}: {e}")),
                    }
                } else {
                    if !peer {
                        continue;
                    }
                    match once(Side::Peer, &peer_dom(c), &peer_base[ci], c, i, &mut busy) {
                        Ok(r) if keep => {
                            push(&mut x.peer, r.wall);
                            x.peer_restarts += usize::from(r.restarted);
                            x.peer_left += usize::from(r.left);
                        }
                        Ok(_) => {}
                        Err(e) => x.peer_fails.add(format!("round {i}: {e}")),
                    }
                }
            }
        }
    }
    if busy > 0 {
        eprintln!("    delete: {busy} calls started with a QEMU still busy after 60 s");
    }
    if let Some(mut us) = ours.take() {
        for c in cases {
            us.remove(&ours_dom(c));
        }
    }
    drop(peer_doms);

    let have_ours = bins.virt_snap.is_some();
    let title = format!(
        "snapshot (e): delete of an external disk-only snapshot, running no-OS KVM domain ({MEMORY_MIB} MiB, 2 qcow2 disks, chain base <- s1 <- s2), whole CLI call"
    );
    let pairs: Vec<(&Series, &Series)> = m.iter().map(|x| (&x.ours, &x.peer)).collect();
    if have_ours && peer {
        report(&title, &pairs);
    } else if have_ours {
        rows(&title, &m.iter().map(|x| &x.ours).collect::<Vec<_>>());
    } else {
        rows(&title, &m.iter().map(|x| &x.peer).collect::<Vec<_>>());
    }
    if have_ours {
        rows("", &m.iter().map(|x| &x.ours_elapsed).collect::<Vec<_>>());
    }
    let mut summary = serde_json::Map::new();
    let mut v = Vec::new();
    for x in &m {
        let key = x.case.key();
        let n = o.runs;
        let mut line = format!("{}:", x.case.what());
        if have_ours {
            line += &format!(
                " ours spread {} (elapsed-ms {}), QEMU restarted in {} of {} rounds, merged overlays left in {}, {} failed;",
                spread(&x.ours),
                spread(&x.ours_elapsed),
                x.ours_restarts,
                x.ours.wall.len(),
                x.ours_left,
                x.ours_fails.n
            );
        }
        if peer {
            line += &format!(
                " virsh spread {}, QEMU restarted in {} of {} rounds, merged overlays left in {}, {} failed",
                spread(&x.peer),
                x.peer_restarts,
                x.peer.wall.len(),
                x.peer_left,
                x.peer_fails.n
            );
        }
        println!("{line}");
        for (who, fails) in [("virt-snap", &x.ours_fails), ("virsh", &x.peer_fails)] {
            if let Some(e) = &fails.first {
                println!(
                    "  {who}: {} of {} rounds failed (not counted); first: {e}",
                    fails.n,
                    n + 1
                );
            }
        }
        if have_ours {
            summary.insert(format!("{key}-ms"), stats(&x.ours));
            summary.insert(format!("{key}-elapsed-ms"), stats(&x.ours_elapsed));
            summary.insert(format!("{key}-failed"), x.ours_fails.n.into());
            summary.insert(format!("{key}-qemu-restarts"), x.ours_restarts.into());
            summary.insert(format!("{key}-overlays-left"), x.ours_left.into());
            if let Some(e) = &x.ours_fails.first {
                summary.insert(format!("{key}-error"), e.clone().into());
            }
        }
        if peer {
            summary.insert(format!("peer-{key}-ms"), stats(&x.peer));
            summary.insert(format!("peer-{key}-failed"), x.peer_fails.n.into());
            summary.insert(format!("peer-{key}-qemu-restarts"), x.peer_restarts.into());
            summary.insert(format!("peer-{key}-overlays-left"), x.peer_left.into());
            if let Some(e) = &x.peer_fails.first {
                summary.insert(format!("peer-{key}-error"), e.clone().into());
            }
        }
        let measured = !x.ours.wall.is_empty();
        let peer_measured = peer && !x.peer.wall.is_empty();
        if have_ours && peer_measured && measured {
            let r = x.peer.median().as_secs_f64() / x.ours.median().as_secs_f64().max(1e-9);
            summary.insert(format!("{key}-ratio"), ((r * 100.0).round() / 100.0).into());
        }
        if have_ours {
            let med = x.ours.median();
            // Judged against libvirt's median in this run; without one (`--only ours`, or
            // every virsh round failed), against the figure measured before.
            let (yard, against) = if peer_measured {
                (x.peer.median(), "virsh in this run")
            } else {
                (x.case.reference(), "libvirt's figure measured before")
            };
            let pass = measured && x.ours_fails.n == 0 && med <= yard;
            summary.insert(
                format!("{key}-target"),
                if pass { "PASS" } else { "FAIL" }.into(),
            );
            summary.insert(format!("{key}-target-against"), against.into());
            let mut detail = if measured {
                format!(
                    "ours median {} (p90 {}, spread {}, elapsed-ms {}), {} failed",
                    ms(med),
                    ms(x.ours.p90()),
                    spread(&x.ours),
                    ms(x.ours_elapsed.median()),
                    x.ours_fails.n
                )
            } else {
                "not measured: every round failed".into()
            };
            detail += &format!(", {against} {}", ms(yard));
            if measured {
                detail += &format!(
                    " ({:.2}x)",
                    yard.as_secs_f64() / med.as_secs_f64().max(1e-9)
                );
            }
            v.push(verdict(
                format!("(e) delete {} at least as fast as libvirt's", x.case.what()),
                pass,
                detail,
            ));
        }
    }
    println!(
        "delete figures (JSON): {}",
        serde_json::Value::Object(summary)
    );
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_lists() {
        let b = virsh_blklist(" vda      /a/x.s1-2\n vdb      /a/y.s1-2\n\n");
        assert_eq!(
            b,
            vec![
                ("vda".to_string(), "/a/x.s1-2".to_string()),
                ("vdb".to_string(), "/a/y.s1-2".to_string())
            ]
        );
        let o = ours_blklist(r#"[{"target":"vda","source":"/a/x.qcow2"}]"#).unwrap();
        assert_eq!(o, vec![("vda".to_string(), "/a/x.qcow2".to_string())]);
        assert!(ours_blklist("{}").is_err());
        let base = vec![("vda".to_string(), "/a/x".to_string())];
        let moved = vec![("vda".to_string(), "/a/x.s1".to_string())];
        assert!(all_moved(&base, &moved, "s1").is_err(), "one disk only");
    }

    #[test]
    fn chains() {
        let out = r#"[{"filename":"/nonexistent/t"},{"filename":"/nonexistent/b"}]"#;
        assert_eq!(
            chain_files(out).unwrap(),
            vec![
                PathBuf::from("/nonexistent/t"),
                PathBuf::from("/nonexistent/b")
            ]
        );
        assert!(chain_files("{}").is_err());
    }
}
