//! `cargo xtask bench qemu-start`: from spawning QEMU (KVM, no guest OS) to the first answered
//! query-status, through qmp-proto and through the peer, Python's qemu.qmp.

use super::harness::{parse_driver_output, report};
use crate::{deps, util};
use std::process::Command;

pub fn run(args: &[String]) -> Result<(), String> {
    let runs = super::runs_arg(args, 20)?;
    let python = deps::bench_venv()?;
    let release = super::build_release("bench-drivers")?;
    let script = util::workspace_root().join("xtask/bench-py/qemu_start.py");
    let mut ours = Vec::new();
    let mut peer = Vec::new();
    // Interleave in rounds so that drift hits both sides alike.
    let rounds = 4;
    for _ in 0..rounds {
        let per = runs.div_ceil(rounds).to_string();
        let out = util::output(Command::new(release.join("qemu_start")).arg(&per))?;
        ours.extend(parse_driver_output(&out)?);
        let out = util::output(Command::new(&python).arg(&script).arg(&per))?;
        peer.extend(parse_driver_output(&out)?);
    }
    let merge = |v: Vec<super::harness::Series>| {
        let mut s = super::harness::Series::new(v[0].label.clone());
        for x in v {
            s.wall.extend(x.wall);
        }
        s
    };
    let (ours, peer) = (merge(ours), merge(peer));
    report(
        "qemu-start: spawn QEMU 10.0.2 (KVM, no guest OS) -> QMP negotiated -> query-status answered",
        &[(&ours, &peer)],
    );
    Ok(())
}
