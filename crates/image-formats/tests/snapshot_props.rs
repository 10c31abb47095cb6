//! Property test: random sequences of guest writes (qemu-io), our snapshot create/apply/
//! delete and qemu-img's create/apply, on images of several formats. After every step
//! `qemu-img check` finds no corruption and no leaks; the active data and every snapshot's
//! data (read back with `qemu-img convert`) equal a simple model. Case count is small: each
//! step runs real processes.

mod write_common;
use write_common::*;

use image_formats::qcow2_write::SnapshotRef;
use proptest::prelude::*;

const SIZE: u64 = 1 << 20;
const OPTS: &[&str] = &[
    "",
    "compat=0.10",
    "cluster_size=4096,refcount_bits=8",
    "extended_l2=on,cluster_size=16384",
    "cluster_size=512,refcount_bits=64",
];

#[derive(Debug, Clone)]
enum Step {
    Write { pattern: u8, off_k: u64, len_k: u64 },
    Create { ours: bool, name: u8 },
    Apply { ours: bool, pick: usize },
    Delete { pick: usize },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (1u8..255, 0u64..1024, 1u64..256).prop_map(|(pattern, off_k, len_k)| Step::Write {
            pattern,
            off_k,
            len_k
        }),
        3 => (any::<bool>(), 0u8..3).prop_map(|(ours, name)| Step::Create { ours, name }),
        2 => (any::<bool>(), any::<usize>()).prop_map(|(ours, pick)| Step::Apply { ours, pick }),
        2 => any::<usize>().prop_map(|pick| Step::Delete { pick }),
    ]
}

fn run_case(opts: &str, steps: &[Step]) {
    let dir = tempfile::tempdir().unwrap();
    let p = qimg(dir.path(), "p.qcow2", opts, &SIZE.to_string());
    let mut active = vec![0u8; SIZE as usize];
    // (id, name, data) in table order.
    let mut snaps: Vec<(String, String, Vec<u8>)> = Vec::new();
    for (i, st) in steps.iter().enumerate() {
        match st {
            Step::Write {
                pattern,
                off_k,
                len_k,
            } => {
                let off = off_k * 1024;
                let len = (len_k * 1024).min(SIZE - off);
                if len == 0 {
                    continue;
                }
                write_pattern(&p, *pattern, off, len);
                active[off as usize..(off + len) as usize].fill(*pattern);
            }
            Step::Create { ours, name } => {
                let name = format!("n{name}");
                let id = if *ours {
                    String::from_utf8(editor(&p).create(name.as_bytes(), now()).unwrap()).unwrap()
                } else {
                    ok("qemu-img", &["snapshot", "-c", &name, s(&p)]);
                    snapshot_list(&p).last().unwrap().0.clone()
                };
                snaps.push((id, name, active.clone()));
            }
            Step::Apply { ours, pick } => {
                if snaps.is_empty() {
                    continue;
                }
                let (id, _, data) = &snaps[pick % snaps.len()];
                if *ours {
                    editor(&p)
                        .apply(&SnapshotRef::Id(id.as_bytes().to_vec()))
                        .unwrap();
                } else {
                    ok("qemu-img", &["snapshot", "-a", id, s(&p)]);
                }
                active = data.clone();
            }
            Step::Delete { pick } => {
                if snaps.is_empty() {
                    continue;
                }
                let idx = pick % snaps.len();
                // By name: the first snapshot with that name goes.
                let name = snaps[idx].1.clone();
                let first = snaps.iter().position(|s| s.1 == name).unwrap();
                editor(&p)
                    .delete(&SnapshotRef::Name(name.into_bytes()))
                    .unwrap();
                snaps.remove(first);
            }
        }
        assert_clean(&p);
        let listed = snapshot_list(&p);
        let want: Vec<(String, String)> = snaps
            .iter()
            .map(|(i, n, _)| (i.clone(), n.clone()))
            .collect();
        assert_eq!(listed, want, "{opts:?} step {i} {st:?}");
    }
    assert!(raw(&p, None) == active, "{opts:?}: active data differs");
    for (id, _, data) in &snaps {
        assert!(
            raw(&p, Some(id)) == *data,
            "{opts:?}: snapshot {id} data differs"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, max_shrink_iters: 16, ..ProptestConfig::default() })]
    #[test]
    fn random_sequences_match_the_model(opt in 0..OPTS.len(), steps in prop::collection::vec(step(), 4..14)) {
        run_case(OPTS[opt], &steps);
    }
}
