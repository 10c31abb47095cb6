//! `--part revert` of `cargo xtask bench snapshot`: revert of a running no-OS KVM domain (the
//! other parts' shape, 256 MiB, two 64 MiB qcow2 disks), virt-snap against libvirt 11.3 in
//! the same run (issue 14's figures):
//!
//! - **internal**: an internal snapshot with RAM of the running domain (`snapshot-create-as
//!   DOM r`, untimed, once), then `snapshot-revert DOM r` each run: ours is
//!   `internal-in-place` (`snapshot-load` in the same QEMU), virsh's stops QEMU and starts a
//!   new one that loads it.
//! - **external `--running`**: an external disk-only snapshot of the running domain
//!   (`snapshot-create-as DOM r --disk-only`, untimed, once), then `snapshot-revert DOM r
//!   --running` each run: ours is `external-in-place` (new overlays, `blockdev-reopen`,
//!   `system_reset`, the same QEMU), virsh's (libvirt 11.3 reverts external snapshots)
//!   stops QEMU and starts a new one on new overlays.
//! - **external on another branch `--running`**: disk-only snapshots `a`, then (after a
//!   revert to `a`) `r` on a's revert overlay, untimed; each run reverts to `a` (untimed: r's
//!   image leaves the disk's chain) and then, timed, to `r`: ours is `external-in-place`
//!   onto an image QEMU did not have open (opened for the new overlay), virsh's restarts.
//!
//! Each run reverts ours and libvirt's domain of each case, the order alternating from run
//! to run; before each call every bench QEMU must be quiet (a guest reset or a new QEMU
//! spends seconds of CPU in its firmware) and the domain's QEMU idle. Measured: the whole
//! CLI process (spawn to exit), and ours' own `elapsed-ms`. After each call, untimed, the
//! domain must be running (`query-status` through each side's monitor command, and `virsh
//! domstate` for libvirt's) and ours must report the expected kind: a revert that failed
//! is counted as a failure, with its error, never as a number.

use super::super::harness::{ms, report, Series};
use super::{domain_xml, file_disks};
use super::{
    json, json_ms, libvirt, push, qcow2_disks, rows, settle, timed, verdict, virsh_monitor,
    virsh_remove, virsh_start, virsh_wait_idle, wait_quiet, Bins, Opts, Ours, Verdict,
};
use std::path::Path;
use std::time::Duration;

/// Targets (issue 14): ours' whole `snapshot-revert` call, median.
const INTERNAL_MAX: Duration = Duration::from_millis(150);
const EXTERNAL_RUNNING_MAX: Duration = Duration::from_millis(300);
const MEMORY_MIB: u64 = 256;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Case {
    Internal,
    ExternalRunning,
    Branch,
}

impl Case {
    fn tag(self) -> &'static str {
        match self {
            Case::Internal => "int",
            Case::ExternalRunning => "ext",
            Case::Branch => "br",
        }
    }
    /// The JSON key stem (`revert-internal-ms`, ...).
    fn key(self) -> &'static str {
        match self {
            Case::Internal => "revert-internal",
            Case::ExternalRunning => "revert-external-running",
            Case::Branch => "revert-branch-running",
        }
    }
    /// The kind virt-snap must report.
    fn kind(self) -> &'static str {
        match self {
            Case::Internal => "internal-in-place",
            Case::ExternalRunning | Case::Branch => "external-in-place",
        }
    }
    /// The untimed set-up of domain `dom` (the same commands for virt-snap and virsh).
    fn setup(self, dom: &str) -> Vec<Vec<String>> {
        let cmd = |a: &[&str]| a.iter().map(|s| s.replace("DOM", dom)).collect();
        match self {
            Case::Internal => vec![cmd(&["snapshot-create-as", "DOM", "r"])],
            Case::ExternalRunning => vec![cmd(&["snapshot-create-as", "DOM", "r", "--disk-only"])],
            Case::Branch => vec![
                cmd(&["snapshot-create-as", "DOM", "a", "--disk-only"]),
                cmd(&["snapshot-revert", "DOM", "a", "--running"]),
                cmd(&["snapshot-create-as", "DOM", "r", "--disk-only"]),
            ],
        }
    }
    /// What each run does first, untimed: the branch case's revert to `a`.
    fn before_each(self, dom: &str) -> Option<Vec<String>> {
        match self {
            Case::Branch => Some(
                ["snapshot-revert", dom, "a", "--running"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            ),
            _ => None,
        }
    }
    fn revert_args(self) -> &'static [&'static str] {
        match self {
            Case::Internal => &[],
            Case::ExternalRunning | Case::Branch => &["--running"],
        }
    }
    fn target(self) -> Duration {
        match self {
            Case::Internal => INTERNAL_MAX,
            Case::ExternalRunning | Case::Branch => EXTERNAL_RUNNING_MAX,
        }
    }
    fn what(self) -> &'static str {
        match self {
            Case::Internal => "internal with RAM",
            Case::ExternalRunning => "external disk-only, --running",
            Case::Branch => "external disk-only on another branch, --running",
        }
    }
    /// Short enough for the table's first column.
    fn short(self) -> &'static str {
        match self {
            Case::Internal => "internal+RAM",
            Case::ExternalRunning => "ext. --running",
            Case::Branch => "branch --running",
        }
    }
}

/// Failed runs of one series: how many, and the first error.
#[derive(Default)]
pub(super) struct Fails {
    pub(super) n: usize,
    pub(super) first: Option<String>,
}

impl Fails {
    pub(super) fn add(&mut self, e: String) {
        self.n += 1;
        self.first.get_or_insert(e);
    }
}

/// One case's measurements on both sides.
struct Measured {
    case: Case,
    ours: Series,
    ours_elapsed: Series,
    peer: Series,
    ours_fails: Fails,
    peer_fails: Fails,
    /// Runs in which the domain's QEMU pid changed (a restart), per side.
    ours_restarts: usize,
    peer_restarts: usize,
    /// The snapshot could not be created (the case cannot be measured on that side).
    ours_setup: Option<String>,
    peer_setup: Option<String>,
}

impl Measured {
    fn new(case: Case) -> Measured {
        let w = case.short();
        Measured {
            case,
            ours: Series::new(format!("virt-snap snapshot-revert ({w})")),
            ours_elapsed: Series::new(format!("  virt-snap elapsed-ms ({w})")),
            peer: Series::new(format!("virsh snapshot-revert ({w})")),
            ours_fails: Fails::default(),
            peer_fails: Fails::default(),
            ours_restarts: 0,
            peer_restarts: 0,
            ours_setup: None,
            peer_setup: None,
        }
    }
}

/// The pid of the QEMU whose `-name` is domain `dom` (`guest=DOM,...` or `DOM`).
pub(super) fn qemu_pid(dom: &str) -> Option<i32> {
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !args
            .first()
            .is_some_and(|a| a.ends_with("qemu-system-x86_64"))
        {
            continue;
        }
        let named = args.windows(2).any(|w| {
            w[0] == "-name"
                && w[1]
                    .strip_prefix("guest=")
                    .unwrap_or(&w[1])
                    .split(',')
                    .next()
                    == Some(dom)
        });
        if named {
            return Some(pid);
        }
    }
    None
}

/// `query-status` says running (the reply of either side's monitor command) after `what`.
pub(super) fn status_running(reply: &str, what: &str) -> Result<(), String> {
    let v = json(reply)?;
    let st = v["return"]["status"].as_str().unwrap_or("?");
    if st == "running" && v["return"]["running"].as_bool() == Some(true) {
        Ok(())
    } else {
        Err(format!(
            "not running after the {what}: query-status says {st:?}"
        ))
    }
}

/// Median, p90, min and max of a series in ms, the number of runs and every run's figure
/// in run order.
pub(super) fn stats(s: &Series) -> serde_json::Value {
    let r = |d: Duration| (d.as_secs_f64() * 1e5).round() / 100.0;
    let min = s.wall.iter().min().copied().unwrap_or_default();
    let max = s.wall.iter().max().copied().unwrap_or_default();
    serde_json::json!({
        "median": r(s.median()),
        "p90": r(s.p90()),
        "min": r(min),
        "max": r(max),
        "runs": s.wall.len(),
        "samples": s.wall.iter().map(|&d| r(d)).collect::<Vec<_>>(),
    })
}

pub(super) fn spread(s: &Series) -> String {
    match (s.wall.iter().min(), s.wall.iter().max()) {
        (Some(a), Some(b)) => format!("{}-{}", ms(*a), ms(*b)),
        _ => "-".into(),
    }
}

/// Ours: one revert, timed, then checked (kind, state, `query-status`); the error is a
/// failed run.
fn ours_once(us: &Ours, dom: &str, case: Case) -> Result<(Duration, Duration, bool), String> {
    us.wait_idle(dom)?;
    let before = qemu_pid(dom);
    let mut args = vec!["snapshot-revert", dom, "r"];
    args.extend(case.revert_args());
    args.extend(["--output", "json"]);
    let (wall, out) = timed(&mut us.cmd(&args))?;
    let j = json(&out)?;
    if j["kind"] != case.kind() || j["state"] != "running" {
        return Err(format!(
            "expected kind {} and state running, got {out}",
            case.kind()
        ));
    }
    status_running(&us.monitor(dom, r#"{"execute":"query-status"}"#)?, "revert")?;
    let elapsed = json_ms(&j, "elapsed-ms").ok_or_else(|| format!("no elapsed-ms: {out}"))?;
    Ok((wall, elapsed, qemu_pid(dom) != before))
}

/// libvirt's: one revert, timed, then checked (`domstate`, `query-status`).
fn peer_once(dom: &str, case: Case) -> Result<(Duration, bool), String> {
    virsh_wait_idle(dom)?;
    let before = qemu_pid(dom);
    let mut args = vec!["snapshot-revert", dom, "r"];
    args.extend(case.revert_args());
    let (wall, _) = timed(&mut libvirt::virsh(&args))?;
    let st = crate::util::output(&mut libvirt::virsh(&["domstate", dom]))?;
    if st.trim() != "running" {
        return Err(format!(
            "not running after the revert: domstate says {:?}",
            st.trim()
        ));
    }
    status_running(
        &virsh_monitor(dom, r#"{"execute":"query-status"}"#)?,
        "revert",
    )?;
    Ok((wall, qemu_pid(dom) != before))
}

/// `cmd` as the argument list `Ours::ok` and `virsh` take.
fn args(cmd: &[String]) -> Vec<&str> {
    cmd.iter().map(String::as_str).collect()
}

/// (d) revert of a running domain: internal with RAM, external disk-only `--running`, and
/// external disk-only `--running` onto another branch of the tree.
pub(super) fn revert_part(
    o: &Opts,
    bins: &Bins,
    state: &Path,
    dir: &Path,
    peer: bool,
) -> Result<Vec<Verdict>, String> {
    let cases = [Case::Internal, Case::ExternalRunning, Case::Branch];
    let ours_dom = |c: Case| format!("vsbench-snap-rev-{}", c.tag());
    let peer_dom = |c: Case| format!("vsbench-snap-rev-{}-libvirt", c.tag());
    crate::util::step(
        "revert: domains with 2 qcow2 disks, 256 MiB (ours and libvirt's, internal and external)",
    );
    let mut ours = bins.virt_snap.as_ref().map(|b| Ours::new(b, state));
    if let Some(us) = &mut ours {
        for c in cases {
            let d = ours_dom(c);
            let disks = qcow2_disks(dir, &format!("ours-{}", c.tag()), 2)?;
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
            let disks = qcow2_disks(dir, &format!("libvirt-{}", c.tag()), 2)?;
            peer_doms.0.push(d.clone());
            virsh_start(&d, &domain_xml(&d, MEMORY_MIB, &file_disks(&disks)), dir)?;
        }
    }
    wait_quiet("revert");

    // The snapshots, untimed: each side's domain of each case gets snapshot `r` (and the
    // branch case its `a`).
    let mut m: Vec<Measured> = cases.iter().map(|&c| Measured::new(c)).collect();
    for x in &mut m {
        let c = x.case;
        if let Some(us) = &ours {
            for cmd in c.setup(&ours_dom(c)) {
                if let Err(e) = us.ok(&args(&cmd)) {
                    x.ours_setup.get_or_insert(e);
                }
                wait_quiet("revert set-up");
            }
        }
        if peer {
            for cmd in c.setup(&peer_dom(c)) {
                if let Err(e) = crate::util::output(&mut libvirt::virsh(&args(&cmd))) {
                    x.peer_setup.get_or_insert(e);
                }
                wait_quiet("revert set-up");
            }
        }
    }

    crate::util::step(&format!(
        "revert: {} runs each after a warm-up, ours / libvirt alternating, every QEMU quiet and the domain's idle before each call",
        o.runs
    ));
    let mut busy = 0;
    for i in 0..=o.runs {
        let keep = i > 0;
        for x in &mut m {
            let c = x.case;
            for k in 0..2 {
                if (i + k) % 2 == 0 {
                    let Some(us) = &ours else { continue };
                    if x.ours_setup.is_some() {
                        continue;
                    }
                    if let Some(cmd) = c.before_each(&ours_dom(c)) {
                        busy += usize::from(!settle().0);
                        if let Err(e) = us.ok(&args(&cmd)) {
                            x.ours_fails.add(format!("run {i}, before it: {e}"));
                            continue;
                        }
                    }
                    busy += usize::from(!settle().0);
                    match ours_once(us, &ours_dom(c), c) {
                        Ok((wall, elapsed, restarted)) if keep => {
                            push(&mut x.ours, wall);
                            push(&mut x.ours_elapsed, elapsed);
                            x.ours_restarts += usize::from(restarted);
                        }
                        Ok(_) => {}
                        Err(e) => x.ours_fails.add(format!("run {i}: {e}")),
                    }
                } else {
                    if !peer || x.peer_setup.is_some() {
                        continue;
                    }
                    if let Some(cmd) = c.before_each(&peer_dom(c)) {
                        busy += usize::from(!settle().0);
                        if let Err(e) = crate::util::output(&mut libvirt::virsh(&args(&cmd))) {
                            x.peer_fails.add(format!("run {i}, before it: {e}"));
                            continue;
                        }
                    }
                    busy += usize::from(!settle().0);
                    match peer_once(&peer_dom(c), c) {
                        Ok((wall, restarted)) if keep => {
                            push(&mut x.peer, wall);
                            x.peer_restarts += usize::from(restarted);
                        }
                        Ok(_) => {}
                        Err(e) => x.peer_fails.add(format!("run {i}: {e}")),
                    }
                }
            }
        }
    }
    if busy > 0 {
        eprintln!("    revert: {busy} calls started with a QEMU still busy after 60 s");
    }
    if let Some(mut us) = ours.take() {
        for c in cases {
            us.remove(&ours_dom(c));
        }
    }
    drop(peer_doms);

    let have_ours = bins.virt_snap.is_some();
    let title = format!(
        "snapshot (d): revert of a running no-OS KVM domain ({MEMORY_MIB} MiB, 2 qcow2 disks), whole CLI call"
    );
    let pairs: Vec<(&Series, &Series)> = m.iter().map(|x| (&x.ours, &x.peer)).collect();
    let mut summary = serde_json::Map::new();
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
    let mut v = Vec::new();
    for x in &m {
        let key = x.case.key();
        let n = o.runs;
        let mut line = format!("{}:", x.case.what());
        if have_ours {
            line += &format!(
                " ours spread {} (elapsed-ms {}), kind {}, QEMU restarted in {} of {} runs, {} failed;",
                spread(&x.ours),
                spread(&x.ours_elapsed),
                x.case.kind(),
                x.ours_restarts,
                x.ours.wall.len(),
                x.ours_fails.n
            );
        }
        if peer {
            line += &format!(
                " virsh spread {}, QEMU restarted in {} of {} runs, {} failed",
                spread(&x.peer),
                x.peer_restarts,
                x.peer.wall.len(),
                x.peer_fails.n
            );
        }
        println!("{line}");
        for (who, setup, fails) in [
            ("virt-snap", &x.ours_setup, &x.ours_fails),
            ("virsh", &x.peer_setup, &x.peer_fails),
        ] {
            if let Some(e) = setup {
                println!(
                    "  {who} cannot make the snapshot, this case is not measured on its side: {e}"
                );
            }
            if let Some(e) = &fails.first {
                println!(
                    "  {who}: {} of {} runs failed (not counted); first: {e}",
                    fails.n,
                    n + 1
                );
            }
        }
        if have_ours {
            summary.insert(format!("{key}-ms"), stats(&x.ours));
            summary.insert(format!("{key}-elapsed-ms"), stats(&x.ours_elapsed));
            summary.insert(format!("{key}-kind"), x.case.kind().into());
            summary.insert(format!("{key}-failed"), x.ours_fails.n.into());
            summary.insert(format!("{key}-qemu-restarts"), x.ours_restarts.into());
        }
        if peer {
            summary.insert(format!("peer-{key}-ms"), stats(&x.peer));
            summary.insert(format!("peer-{key}-failed"), x.peer_fails.n.into());
            summary.insert(format!("peer-{key}-qemu-restarts"), x.peer_restarts.into());
            if let Some(e) = x.peer_setup.as_ref().or(x.peer_fails.first.as_ref()) {
                summary.insert(format!("peer-{key}-error"), e.clone().into());
            }
        }
        let measured = !x.ours.wall.is_empty();
        if have_ours && peer && measured && !x.peer.wall.is_empty() {
            let r = x.peer.median().as_secs_f64() / x.ours.median().as_secs_f64().max(1e-9);
            summary.insert(format!("{key}-ratio"), ((r * 100.0).round() / 100.0).into());
        }
        if have_ours {
            let med = x.ours.median();
            let pass = measured && x.ours_fails.n == 0 && med <= x.case.target();
            summary.insert(
                format!("{key}-target"),
                if pass { "PASS" } else { "FAIL" }.into(),
            );
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
                "not measured: every run failed".into()
            };
            if peer && !x.peer.wall.is_empty() {
                detail += &format!(", virsh median {}", ms(x.peer.median()));
                if measured {
                    detail += &format!(
                        " ({:.2}x)",
                        x.peer.median().as_secs_f64() / med.as_secs_f64().max(1e-9)
                    );
                }
            }
            v.push(verdict(
                format!(
                    "(d) revert {} <= {} ms ({})",
                    x.case.what(),
                    x.case.target().as_millis(),
                    x.case.kind()
                ),
                pass,
                detail,
            ));
        }
    }
    println!(
        "revert figures (JSON): {}",
        serde_json::Value::Object(summary)
    );
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_status_replies() {
        assert!(status_running(
            r#"{"return":{"status":"running","running":true}}"#,
            "revert"
        )
        .is_ok());
        assert!(status_running(
            r#"{"return":{"status":"internal-error","running":false},"id":"libvirt-9"}"#,
            "revert"
        )
        .is_err());
        assert!(status_running("garbage", "revert").is_err());
    }

    #[test]
    fn the_branch_case_takes_r_on_as_revert_overlay_and_reverts_to_a_first() {
        let s = Case::Branch.setup("d");
        assert_eq!(
            s,
            [
                ["snapshot-create-as", "d", "a", "--disk-only"],
                ["snapshot-revert", "d", "a", "--running"],
                ["snapshot-create-as", "d", "r", "--disk-only"],
            ]
        );
        assert_eq!(
            Case::Branch.before_each("d").unwrap(),
            ["snapshot-revert", "d", "a", "--running"]
        );
        assert!(Case::Internal.before_each("d").is_none());
        assert_eq!(
            Case::Internal.setup("d"),
            [["snapshot-create-as", "d", "r"]]
        );
    }

    #[test]
    fn figures() {
        let mut s = Series::new("x");
        for m in [30, 10, 20] {
            push(&mut s, Duration::from_millis(m));
        }
        let j = stats(&s);
        assert_eq!(j["median"], 20.0);
        assert_eq!(j["min"], 10.0);
        assert_eq!(j["max"], 30.0);
        assert_eq!(j["runs"], 3);
        assert_eq!(j["samples"], serde_json::json!([30.0, 10.0, 20.0]));
        assert_eq!(spread(&s), "10.00 ms-30.00 ms");
        assert_eq!(spread(&Series::new("y")), "-");
    }
}
