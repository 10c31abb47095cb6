//! `cargo xtask bench qmp`, our side: `query-status` round trips on one running QEMU through
//! qmp-proto, next to the floors QEMU's monitor sets, measured in the same process run.
//!
//! Usage: `qmp_bench FLOOR_SOCKET OURS_SOCKET SEQ STREAM BLOCKS`
//!
//! The QEMU has several QMP monitors: the bare-socket floor and qmp-proto each keep their
//! own connection open, so the two alternate command by command (sequential) or block by
//! block (streams) on the same QEMU at the same moment. Prints one JSON line per series
//! (`{"label", "wall_ns", "cpu_ns"}`):
//! - `floor-seq`: a bare blocking `std` UnixStream: write one command, read its reply (SEQ
//!   samples, one per command, alternating with `ours-seq` in alternating order; `cpu_ns`: CPU per command over a block of SEQ alone);
//! - `ours-seq`: qmp-proto `run(&QueryStatus)`, one at a time, alternating with the floor
//!   (SEQ samples; `cpu_ns` holds the client's user+sys CPU per command from
//!   getrusage(RUSAGE_SELF) over a following block of SEQ qmp-proto round trips alone);
//! - `floor-stream`: STREAM commands written at once on the bare socket by one thread while
//!   another reads the replies: wall time per command (BLOCKS samples);
//! - `ours-8`: STREAM commands from 8 tasks sharing one qmp-proto client (8 in flight):
//!   wall and CPU per command (BLOCKS samples each), alternating with `floor-stream`;
//! - `fake-seq` / `fake-8`: the same two qmp-proto runs against an in-process fake server
//!   (a thread that answers each line at once): our own overhead per command. CPU is the
//!   client thread's only (RUSAGE_THREAD).
//!
//! The bare-socket floors negotiate `oob` like qmp-proto does (QEMU then queues up to 8
//! commands per monitor; without `oob` it reads one command at a time).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use qmp_proto::commands::QueryStatus;
use qmp_proto::QmpClient;

const IN_FLIGHT: usize = 8;

fn cpu_now(who: libc::c_int) -> Duration {
    // SAFETY: an all-zero rusage is valid; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` outlives the call; `who` is RUSAGE_SELF or RUSAGE_THREAD.
    let r = unsafe { libc::getrusage(who, &mut ru) };
    assert_eq!(r, 0, "getrusage: {}", std::io::Error::last_os_error());
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn emit(label: &str, wall: &[Duration], cpu: &[Duration]) {
    let ns = |v: &[Duration]| v.iter().map(|d| d.as_nanos() as u64).collect::<Vec<_>>();
    println!(
        "{}",
        serde_json::json!({ "label": label, "wall_ns": ns(wall), "cpu_ns": ns(cpu) })
    );
}

/// A bare blocking QMP connection: greeting read, capabilities negotiated (with oob).
fn bare_connect(sock: &Path) -> (UnixStream, BufReader<UnixStream>) {
    let s = UnixStream::connect(sock).expect("connect to QEMU's QMP socket");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let w = s.try_clone().unwrap();
    let mut r = BufReader::with_capacity(64 * 1024, s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("\"QMP\""), "no greeting: {line}");
    let mut w2 = &w;
    w2.write_all(b"{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":[\"oob\"]}}\n")
        .unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("\"return\""), "negotiation failed: {line}");
    (w, r)
}

/// Reads lines until a reply (skipping events); panics on EOF.
fn read_reply(r: &mut BufReader<UnixStream>, line: &mut String) {
    loop {
        line.clear();
        let n = r.read_line(line).unwrap();
        assert!(n > 0, "QEMU closed the connection");
        if !line.starts_with("{\"event\"") {
            return;
        }
    }
}

/// One bare round trip on an open connection.
fn bare_round_trip(
    w: &mut UnixStream,
    r: &mut BufReader<UnixStream>,
    id: usize,
    line: &mut String,
) {
    let cmd = format!("{{\"execute\":\"query-status\",\"id\":{id}}}\n");
    w.write_all(cmd.as_bytes()).unwrap();
    read_reply(r, line);
    assert!(line.contains("\"running\""), "{line}");
}

/// Sequential round trips, the bare floor and qmp-proto alternating command by command.
async fn seq_interleaved(
    floor_sock: &Path,
    ours_sock: &Path,
    n: usize,
) -> (Vec<Duration>, Vec<Duration>, Duration, Duration) {
    let (mut w, mut r) = bare_connect(floor_sock);
    let c = QmpClient::connect_unix(ours_sock)
        .await
        .expect("qmp-proto connect");
    let mut line = String::new();
    for i in 0..50 {
        bare_round_trip(&mut w, &mut r, i, &mut line);
        c.run(&QueryStatus).await.unwrap();
    }
    let (mut floor, mut ours) = (Vec::with_capacity(n), Vec::with_capacity(n));
    // The order alternates: whichever goes second meets QEMU still finishing the other's
    // command (its monitor re-arming), a bias that must hit both sides alike.
    for i in 0..n {
        let floor_first = i % 2 == 0;
        if floor_first {
            let t0 = Instant::now();
            bare_round_trip(&mut w, &mut r, i, &mut line);
            floor.push(t0.elapsed());
        }
        let t0 = Instant::now();
        let st = c.run(&QueryStatus).await.unwrap();
        ours.push(t0.elapsed());
        std::hint::black_box(st);
        if !floor_first {
            let t0 = Instant::now();
            bare_round_trip(&mut w, &mut r, i, &mut line);
            floor.push(t0.elapsed());
        }
    }
    // CPU: a block of qmp-proto round trips alone, then one of bare round trips (getrusage
    // itself is a syscall: two calls per block rather than per command).
    let cpu0 = cpu_now(libc::RUSAGE_SELF);
    for _ in 0..n {
        std::hint::black_box(c.run(&QueryStatus).await.unwrap());
    }
    let cpu = cpu_now(libc::RUSAGE_SELF) - cpu0;
    let cpu0 = cpu_now(libc::RUSAGE_SELF);
    for i in 0..n {
        bare_round_trip(&mut w, &mut r, i, &mut line);
    }
    let floor_cpu = cpu_now(libc::RUSAGE_SELF) - cpu0;
    settle(c).await;
    (floor, ours, floor_cpu / n as u32, cpu / n as u32)
}

fn floor_stream(w: &UnixStream, r: &mut BufReader<UnixStream>, n: usize) -> Duration {
    let mut w = w.try_clone().unwrap();
    let mut all = Vec::with_capacity(n * 40);
    for i in 0..n {
        all.extend_from_slice(format!("{{\"execute\":\"query-status\",\"id\":{i}}}\n").as_bytes());
    }
    let t0 = Instant::now();
    let writer = std::thread::spawn(move || w.write_all(&all).unwrap());
    let mut line = String::new();
    for _ in 0..n {
        read_reply(r, &mut line);
    }
    let dt = t0.elapsed();
    writer.join().unwrap();
    dt
}

/// Drops the client and lets its connection tasks run to their end, so the socket is
/// closed before the next (blocking) measurement connects: QEMU serves one client at a time.
async fn settle(c: QmpClient) {
    drop(c);
    tokio::time::sleep(Duration::from_millis(20)).await;
}

async fn ours_in_flight(c: &QmpClient, n: usize, who: libc::c_int) -> (Duration, Duration) {
    let cpu0 = cpu_now(who);
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..IN_FLIGHT)
        .map(|i| {
            let c = c.clone();
            let k = n / IN_FLIGHT + usize::from(i < n % IN_FLIGHT);
            tokio::spawn(async move {
                for _ in 0..k {
                    std::hint::black_box(c.run(&QueryStatus).await.unwrap());
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let wall = t0.elapsed() / n as u32;
    let cpu = (cpu_now(who) - cpu0) / n as u32;
    (wall, cpu)
}

/// A QMP server on a thread that answers every command at once with a `query-status`
/// reply carrying the command's id.
fn fake_server(sock: &Path) -> std::thread::JoinHandle<()> {
    let l = UnixListener::bind(sock).expect("bind fake server");
    std::thread::spawn(move || {
        // One connection per measurement; ends when the listener's socket file is gone.
        for conn in l.incoming() {
            let Ok(s) = conn else { return };
            let mut w = std::io::BufWriter::new(s.try_clone().unwrap());
            let mut r = BufReader::new(s);
            w.write_all(
                b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \
                  \"package\": \"fake\"}, \"capabilities\": [\"oob\"]}}\n",
            )
            .unwrap();
            w.flush().unwrap();
            let mut line = Vec::new();
            loop {
                line.clear();
                match r.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                if line.starts_with(b"STOP") {
                    return;
                }
                let id = line
                    .windows(5)
                    .position(|x| x == b"\"id\":")
                    .map(|i| {
                        let rest = &line[i + 5..];
                        let end = rest
                            .iter()
                            .position(|b| !b.is_ascii_digit())
                            .unwrap_or(rest.len());
                        String::from_utf8_lossy(&rest[..end]).into_owned()
                    })
                    .unwrap_or_else(|| "null".into());
                let _ = writeln!(
                    w,
                    "{{\"return\": {{\"status\": \"running\", \"running\": true}}, \"id\": {id}}}"
                );
                // Answer at once, but write several replies together when several
                // commands arrived together.
                if r.buffer().is_empty() && w.flush().is_err() {
                    break;
                }
            }
        }
    })
}

async fn connect_warm(sock: &Path) -> QmpClient {
    let c = QmpClient::connect_unix(sock)
        .await
        .expect("qmp-proto connect");
    for _ in 0..50 {
        c.run(&QueryStatus).await.unwrap();
    }
    c
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [floor_sock, ours_sock, seq, stream, blocks] = &args[..] else {
        eprintln!("usage: qmp_bench FLOOR_SOCKET OURS_SOCKET SEQ STREAM BLOCKS");
        std::process::exit(2);
    };
    let (floor_sock, ours_sock) = (Path::new(floor_sock), Path::new(ours_sock));
    let seq: usize = seq.parse().expect("SEQ");
    let stream: usize = stream.parse().expect("STREAM");
    let blocks: usize = blocks.parse().expect("BLOCKS");

    // Against QEMU: sequential, alternating command by command.
    let (floor, ours, floor_cpu, cpu) = seq_interleaved(floor_sock, ours_sock, seq).await;
    emit("floor-seq", &floor, &[floor_cpu]);
    emit("ours-seq", &ours, &[cpu]);

    // Against QEMU: a pipelined stream vs 8 in flight, alternating block by block.
    let (w, mut r) = bare_connect(floor_sock);
    let c = connect_warm(ours_sock).await;
    let (mut fw, mut ow, mut oc) = (Vec::new(), Vec::new(), Vec::new());
    for b in 0..blocks {
        // Alternating order here too.
        if b % 2 == 0 {
            fw.push(floor_stream(&w, &mut r, stream) / stream as u32);
        }
        let (wall, cpu) = ours_in_flight(&c, stream, libc::RUSAGE_SELF).await;
        ow.push(wall);
        oc.push(cpu);
        if b % 2 == 1 {
            fw.push(floor_stream(&w, &mut r, stream) / stream as u32);
        }
    }
    emit("floor-stream", &fw, &[]);
    emit("ours-8", &ow, &oc);
    settle(c).await;
    drop((w, r));

    // Against the in-process fake server (client thread's CPU only).
    let dir = tempfile::tempdir().expect("tempdir");
    let fsock = dir.path().join("fake.sock");
    let server = fake_server(&fsock);
    let c = connect_warm(&fsock).await;
    let mut wall = Vec::with_capacity(seq * 4);
    let cpu0 = cpu_now(libc::RUSAGE_THREAD);
    for _ in 0..seq * 4 {
        let t0 = Instant::now();
        std::hint::black_box(c.run(&QueryStatus).await.unwrap());
        wall.push(t0.elapsed());
    }
    let cpu = (cpu_now(libc::RUSAGE_THREAD) - cpu0) / (seq * 4) as u32;
    emit("fake-seq", &wall, &[cpu]);
    let (mut fw, mut fc) = (Vec::new(), Vec::new());
    for _ in 0..blocks {
        let (wall, cpu) = ours_in_flight(&c, stream * 4, libc::RUSAGE_THREAD).await;
        fw.push(wall);
        fc.push(cpu);
    }
    emit("fake-8", &fw, &fc);
    settle(c).await;
    let mut stop = UnixStream::connect(&fsock).unwrap();
    stop.write_all(b"STOP\n").unwrap();
    server.join().unwrap();
}
