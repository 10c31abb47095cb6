//! List a pool's volumes and snapshot one of them (it must be inactive: a VM holding it is
//! refused with `ErrorKind::InUse`, naming the VM).
//!
//! ```sh
//! cargo run -p virt-snap --example pool_snapshot -- POOL VOLUME SNAPSHOT
//! ```
//!
//! The state dir is the CLI's (`$VIRT_SNAP_STATE_DIR`, `$XDG_STATE_HOME/virt-snap` or
//! `~/.local/state/virt-snap`); define the pool with `virt-snap pool-define-as` or
//! `Connection::define_pool`.

use virt_snap::pool::SnapshotOptions;
use virt_snap::{Connection, ErrorKind};

fn main() -> Result<(), virt_snap::Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [pool, volume, snapshot] = &args[..] else {
        eprintln!("usage: pool_snapshot POOL VOLUME SNAPSHOT");
        std::process::exit(2);
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let conn = Connection::open_default()?;
        let pool = conn.pool(pool)?;
        for v in pool.volumes().await? {
            println!("{:<20} {:<6} {}", v.name, v.format, v.path);
        }
        match pool
            .volume(volume)
            .create_snapshot(snapshot, &SnapshotOptions::default())
            .await
        {
            Ok(s) => println!("created snapshot {} of {volume}", s.name),
            Err(e) if e.kind() == ErrorKind::InUse => eprintln!("not now: {e}"),
            Err(e) => return Err(e),
        }
        Ok(())
    })
}
