//! Chains as deep as users make them (issue 13): libvirt failed at about 25 external snapshots
//! until 12.0 and caps chains at 200 now. A running no-OS KVM domain gets 500 disk-only
//! snapshots in one chain through the real binary; then every command still works on it:
//! snapshot-list (plain, --tree, --parent, --roots, --leaves), snapshot-info, snapshot-current,
//! domblklist, destroy, start on the 501-image chain (QEMU opens it, virt-snap leases it), one
//! more snapshot, and qemu-img as the oracle of the chain on disk.

use std::path::Path;
use std::time::Instant;
use virt_snap_e2e::in_state::{ok, ok_json};
use virt_snap_e2e::NoOsDomain;

/// How deep: the issue's "at least 500".
const DEPTH: usize = 500;

/// The source of `vda` in `domblklist`.
fn vda_source(state: &Path) -> String {
    let v = ok_json(state, &["domblklist", "deep"]);
    let disks = v
        .as_array()
        .or_else(|| v["disks"].as_array())
        .expect("disks");
    disks
        .iter()
        .find(|d| d["target"] == "vda")
        .and_then(|d| d["source"].as_str())
        .expect("vda's source")
        .to_string()
}

#[test]
fn five_hundred_snapshots_in_one_chain_and_every_command_still_works() {
    let dom = NoOsDomain::start("deep", &["vda"]);
    let s = dom.s();
    let base = dom.disk("vda");

    let t0 = Instant::now();
    let mut first = None;
    let mut last = None;
    for i in 1..=DEPTH {
        let name = format!("s{i}");
        let t = Instant::now();
        ok(
            s,
            &[
                "snapshot-create-as",
                "deep",
                &name,
                "--disk-only",
                "--atomic",
            ],
        );
        let d = t.elapsed();
        if i == 1 {
            first = Some(d);
        }
        last = Some(d);
    }
    eprintln!(
        "{DEPTH} snapshots in {:?} (first {:?}, last {:?})",
        t0.elapsed(),
        first.unwrap(),
        last.unwrap()
    );

    // The top of the chain is the last overlay, named as virsh names it.
    let dir = &dom.dir;
    let top = dir.join(format!("vda.s{DEPTH}"));
    assert_eq!(vda_source(s), top.display().to_string());

    // snapshot-list: every snapshot, in one chain.
    let list = ok_json(s, &["snapshot-list", "deep"]);
    let list = list.as_array().expect("a list");
    assert_eq!(list.len(), DEPTH);
    let names = ok(s, &["snapshot-list", "deep", "--name", "--topological"]);
    let expect: Vec<String> = (1..=DEPTH).map(|i| format!("s{i}")).collect();
    assert_eq!(names.lines().collect::<Vec<_>>(), expect);
    let tree = ok(s, &["snapshot-list", "deep", "--tree"]);
    assert!(tree.starts_with("s1\n"), "{}", &tree[..200.min(tree.len())]);
    assert!(tree.contains(&format!("s{DEPTH}\n")));
    assert_eq!(
        ok(s, &["snapshot-list", "deep", "--roots", "--name"]),
        "s1\n"
    );
    assert_eq!(
        ok(s, &["snapshot-list", "deep", "--leaves", "--name"]),
        format!("s{DEPTH}\n")
    );
    let parent = ok(s, &["snapshot-list", "deep", "--parent"]);
    assert!(
        parent.contains(&format!("s{DEPTH} ")) && parent.contains(&format!("s{}", DEPTH - 1)),
        "{parent}"
    );
    assert_eq!(
        ok(s, &["snapshot-current", "deep", "--name"]),
        format!("s{DEPTH}\n")
    );
    assert_eq!(
        ok(s, &["snapshot-parent", "deep", &format!("s{DEPTH}")]),
        format!("s{}\n", DEPTH - 1)
    );
    let info = ok_json(s, &["snapshot-info", "deep", "--current"]);
    assert_eq!(info["name"], format!("s{DEPTH}"), "{info}");

    // QEMU's own view of the chain: 500 images below the top (the reply nests one object per
    // image, deeper than a default JSON parser accepts; QEMU also says the depth).
    let blk = ok(
        s,
        &[
            "qemu-monitor-command",
            "deep",
            r#"{"execute":"query-block"}"#,
        ],
    );
    assert!(
        blk.contains(&format!("\"backing_file_depth\":{DEPTH},")),
        "{}",
        &blk[..300.min(blk.len())]
    );
    assert_eq!(blk.matches("\"backing-image\":").count(), DEPTH);

    // Stopped and started again on the 501-image chain.
    ok(s, &["destroy", "deep"]);
    ok(s, &["start", "deep"]);
    assert_eq!(vda_source(s), top.display().to_string());
    ok(
        s,
        &["snapshot-create-as", "deep", "one-more", "--disk-only"],
    );
    assert_eq!(
        vda_source(s),
        dir.join("vda.one-more").display().to_string()
    );
    ok(s, &["destroy", "deep"]);

    // The oracle: qemu-img walks the same 502 images, and the top is consistent.
    let out = std::process::Command::new("qemu-img")
        .args(["info", "--backing-chain", "--output", "json", "-U"])
        .arg(dir.join("vda.one-more"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let chain: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        // serde_json's default recursion limit does not matter here: the list is flat.
        panic!("qemu-img's JSON")
    });
    let chain = chain.as_array().unwrap();
    assert_eq!(chain.len(), DEPTH + 2);
    assert_eq!(
        chain.last().unwrap()["filename"],
        base.display().to_string()
    );
}
