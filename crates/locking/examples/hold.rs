//! Hold a volume's lease and QEMU image locks until Enter is pressed, to try the protocol by
//! hand: `cargo run -p locking --example hold -- LOCKSPACE FILE [--shared]`, then in another
//! shell `virt-snap image locks --lockspace LOCKSPACE FILE`, `qemu-img info FILE`, or start a
//! QEMU on FILE.

use locking::{DiskUse, LockManager, Purpose, Resource};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(space), Some(file)) = (args.first(), args.get(1)) else {
        return Err("usage: hold LOCKSPACE FILE [--shared]".into());
    };
    let locks = LockManager::local(space)?;
    let purpose = if args.iter().any(|a| a == "--shared") {
        Purpose::VmStart {
            domain: "example".into(),
            disks: vec![DiskUse::read_only(Resource::file(file))],
        }
    } else {
        Purpose::VolumeOp {
            op: "example hold".into(),
            volumes: vec![Resource::file(file)],
        }
    };
    let held = locks.acquire(&purpose)?;
    for l in held.leases() {
        println!("holding {} lease on {}", l.mode(), l.key());
    }
    for i in held.image_locks() {
        println!(
            "holding QEMU lock bytes {:?} on {}",
            i.access().bytes(),
            i.path().display()
        );
    }
    println!("press Enter to release");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(())
}
