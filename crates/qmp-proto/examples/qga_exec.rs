//! Runs a command in a guest through the QEMU guest agent and prints its output.
//!
//! ```text
//! cargo run -p qmp-proto --example qga_exec -- /path/to/qga.sock /bin/uname -a
//! ```

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: qga_exec QGA_SOCKET PROGRAM [ARGS...]");
        return ExitCode::from(2);
    }
    let argv: Vec<&str> = args[1..].iter().map(String::as_str).collect();
    match run(&args[0], &argv).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("qga_exec: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(sock: &str, argv: &[&str]) -> Result<ExitCode, qmp_proto::Error> {
    let t = Duration::from_secs(30);
    let mut ga = qmp_proto::QgaClient::connect_unix(sock, t).await?;
    let out = ga.exec(argv, None, t).await?;
    let _ = std::io::stdout().write_all(&out.stdout);
    let _ = std::io::stderr().write_all(&out.stderr);
    Ok(match (out.exit_code, out.signal) {
        (Some(c), _) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        (None, Some(s)) => {
            eprintln!("qga_exec: killed by signal {s}");
            ExitCode::FAILURE
        }
        (None, None) => ExitCode::FAILURE,
    })
}
