//! Connects to a QMP socket and prints QEMU's version and run state.
//!
//! ```text
//! qemu-system-x86_64 -machine q35,accel=kvm -m 256 -nodefaults -display none \
//!     -qmp unix:/tmp/qmp.sock,server=on,wait=off &
//! cargo run -p qmp-proto --example query_status -- /tmp/qmp.sock
//! ```

use std::process::ExitCode;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let Some(path) = std::env::args_os().nth(1) else {
        eprintln!("usage: query_status QMP_SOCKET");
        return ExitCode::from(2);
    };
    match run(&path).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("query_status: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(path: &std::ffi::OsStr) -> Result<(), qmp_proto::Error> {
    let qmp = qmp_proto::QmpClient::connect_unix(path).await?;
    let g = qmp.greeting();
    let (major, minor, micro) = g.version;
    println!("QEMU {major}.{minor}.{micro} ({})", g.package);
    println!("capabilities: {}", g.capabilities.join(", "));
    let status = qmp.execute("query-status", None).await?;
    println!(
        "status: {} (running: {})",
        status["status"].as_str().unwrap_or("?"),
        status["running"]
    );
    Ok(())
}
