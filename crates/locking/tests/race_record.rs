//! A virt-snap that just won a race for a lease is named by its record, never shown as
//! "another tool, or virtlockd". Alone in its test binary: threads race like processes do
//! (OFD locks belong to each open), but a fork by another test in the same process would
//! keep a released lock alive in the child until its exec, and no record then names it.

use locking::{ErrorKind, LockManager, Purpose, Resource};
use std::time::Duration;

#[test]
fn a_racing_virt_snap_is_named_by_its_record() {
    // Threads of one process race like processes do: OFD locks belong to each open.
    let d = tempfile::tempdir().unwrap();
    let space = d.path().join("locks");
    let img = d.path().join("a.img");
    std::fs::write(&img, [0u8; 4096]).unwrap();
    let racers: Vec<_> = (0..6)
        .map(|i| {
            let (space, img) = (space.clone(), img.clone());
            std::thread::spawn(move || {
                let locks = LockManager::local(space).unwrap();
                let op = Purpose::VolumeOp {
                    op: format!("racer {i}"),
                    volumes: vec![Resource::file(&img)],
                };
                let mut bad = Vec::new();
                for _ in 0..150 {
                    match locks.acquire(&op) {
                        Ok(held) => {
                            std::thread::sleep(Duration::from_micros(100));
                            drop(held);
                        }
                        Err(e) if e.kind() == ErrorKind::Conflict => {
                            if e.holders().is_empty() {
                                bad.push(e.to_string());
                            } else {
                                assert!(e.to_string().contains("racer "), "{e}");
                            }
                        }
                        Err(e) => {
                            // A racer between its lease and its image locks is named by
                            // its lease record too.
                            assert_eq!(e.kind(), ErrorKind::ImageInUse, "{e}");
                            if e.holders().is_empty() && e.owners().is_empty() {
                                bad.push(e.to_string());
                            }
                        }
                    }
                }
                bad
            })
        })
        .collect();
    let bad: Vec<String> = racers.into_iter().flat_map(|r| r.join().unwrap()).collect();
    assert!(bad.is_empty(), "refusals naming nobody: {bad:#?}");
}
