//! The benchmark harness: time whole processes (wall clock, user+sys CPU, peak RSS), or
//! collect samples a driver program reports, and print virt-snap and its peer side by side.
//!
//! Every benchmark measures the peer in the same run, interleaving the two so that drift in
//! the machine's speed hits both alike, and reports medians and the ratio peer / ours
//! (above 1 means virt-snap is faster).

use std::process::Command;
use std::time::{Duration, Instant};

/// One timed run of a process.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Wall-clock time.
    pub wall: Duration,
    /// User + system CPU time of the process and its waited-for children.
    pub cpu: Duration,
    /// Peak resident set size in KiB.
    pub max_rss_kib: u64,
}

/// Run `cmd` to completion (stdout/stderr discarded unless `keep_output`), timing it.
pub fn time_process(cmd: &mut Command) -> Result<Sample, String> {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let start = Instant::now();
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it for the child we just spawned.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our own unreaped child; status and ru outlive the call.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let wall = start.elapsed();
    if r < 0 {
        return Err(format!("wait4: {}", std::io::Error::last_os_error()));
    }
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr {
        use std::io::Read;
        let _ = e.read_to_string(&mut stderr);
    }
    // The child is reaped by wait4 above; `child` must not be waited for again.
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        return Err(format!(
            "{:?} failed (status {status:#x}): {}",
            cmd,
            stderr.trim()
        ));
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Ok(Sample {
        wall,
        cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
        max_rss_kib: ru.ru_maxrss as u64,
    })
}

/// Samples of one measured thing.
#[derive(Debug, Clone, Default)]
pub struct Series {
    /// What was measured ("virt-snap image info", "qemu-img info", ...).
    pub label: String,
    /// Wall-clock samples.
    pub wall: Vec<Duration>,
    /// CPU samples (may be empty when the driver does not report CPU).
    pub cpu: Vec<Duration>,
    /// Peak RSS samples in KiB (may be empty).
    pub rss_kib: Vec<u64>,
}

impl Series {
    /// An empty series.
    pub fn new(label: impl Into<String>) -> Self {
        Series {
            label: label.into(),
            ..Default::default()
        }
    }
    /// Add a process sample.
    pub fn push(&mut self, s: Sample) {
        self.wall.push(s.wall);
        self.cpu.push(s.cpu);
        self.rss_kib.push(s.max_rss_kib);
    }
    /// Median wall time.
    pub fn median(&self) -> Duration {
        median(&self.wall)
    }
    /// 90th percentile wall time.
    pub fn p90(&self) -> Duration {
        percentile(&self.wall, 0.9)
    }
    /// Median CPU time.
    pub fn cpu_median(&self) -> Duration {
        median(&self.cpu)
    }
    /// Largest peak RSS seen.
    pub fn max_rss_kib(&self) -> u64 {
        self.rss_kib.iter().copied().max().unwrap_or(0)
    }
}

/// The median of `v` (zero when empty).
pub fn median(v: &[Duration]) -> Duration {
    percentile(v, 0.5)
}

/// The `q` quantile of `v` (nearest rank; zero when empty).
pub fn percentile(v: &[Duration], q: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    let mut s = v.to_vec();
    s.sort();
    let idx = ((s.len() - 1) as f64 * q).round() as usize;
    s[idx.min(s.len() - 1)]
}

/// Time `ours` and `peer` processes `runs` times each, interleaved, after one warm-up each.
pub fn compare_processes(
    runs: usize,
    ours: (&str, &mut dyn FnMut() -> Command),
    peer: (&str, &mut dyn FnMut() -> Command),
) -> Result<(Series, Series), String> {
    let (ours_label, ours_cmd) = ours;
    let (peer_label, peer_cmd) = peer;
    time_process(&mut ours_cmd())?;
    time_process(&mut peer_cmd())?;
    let mut a = Series::new(ours_label);
    let mut b = Series::new(peer_label);
    for _ in 0..runs {
        a.push(time_process(&mut ours_cmd())?);
        b.push(time_process(&mut peer_cmd())?);
    }
    Ok((a, b))
}

/// Format a duration in milliseconds with sensible precision.
pub fn ms(d: Duration) -> String {
    let m = d.as_secs_f64() * 1000.0;
    if m >= 100.0 {
        format!("{m:.0} ms")
    } else if m >= 1.0 {
        format!("{m:.2} ms")
    } else {
        format!("{m:.3} ms")
    }
}

/// Print a side-by-side table of (ours, peer) pairs with medians, p90 and the ratio
/// peer/ours; returns the ratios in order.
pub fn report(title: &str, pairs: &[(&Series, &Series)]) -> Vec<f64> {
    println!("\n{title}");
    println!(
        "{:<44} {:>11} {:>11} {:>11} {:>10} {:>5}",
        "measured", "median", "p90", "cpu median", "max rss", "runs"
    );
    let mut ratios = Vec::new();
    for (ours, peer) in pairs {
        for s in [ours, peer] {
            row(s);
        }
        let r = peer.median().as_secs_f64() / ours.median().as_secs_f64().max(1e-12);
        println!("  => peer / ours = {r:.2}x (above 1: virt-snap is faster)");
        ratios.push(r);
    }
    ratios
}

/// Print rows for `series` alone (no peer to compare with), in [`report`]'s format; an empty
/// title prints no heading.
pub fn report_series(title: &str, series: &[&Series]) {
    if !title.is_empty() {
        println!("\n{title}");
        println!(
            "{:<44} {:>11} {:>11} {:>11} {:>10} {:>5}",
            "measured", "median", "p90", "cpu median", "max rss", "runs"
        );
    }
    for s in series {
        row(s);
    }
}

fn row(s: &Series) {
    println!(
        "{:<44} {:>11} {:>11} {:>11} {:>10} {:>5}",
        s.label,
        ms(s.median()),
        ms(s.p90()),
        if s.cpu.is_empty() {
            "-".into()
        } else {
            ms(s.cpu_median())
        },
        if s.rss_kib.is_empty() {
            "-".into()
        } else {
            format!("{} KiB", s.max_rss_kib())
        },
        s.wall.len()
    );
}

/// Parse a driver's report: one JSON object `{"label": ..., "wall_ns": [..], "cpu_ns": [..]}`
/// per line on stdout.
pub fn parse_driver_output(stdout: &str) -> Result<Vec<Series>, String> {
    let mut out = Vec::new();
    for line in stdout.lines().filter(|l| l.trim_start().starts_with('{')) {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("bad driver line {line:?}: {e}"))?;
        let durs = |k: &str| -> Vec<Duration> {
            v[k].as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_u64())
                        .map(Duration::from_nanos)
                        .collect()
                })
                .unwrap_or_default()
        };
        out.push(Series {
            label: v["label"].as_str().unwrap_or("?").to_string(),
            wall: durs("wall_ns"),
            cpu: durs("cpu_ns"),
            rss_kib: Vec::new(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<Duration> = [5, 1, 3, 2, 4].map(Duration::from_millis).to_vec();
        assert_eq!(median(&v), Duration::from_millis(3));
        assert_eq!(percentile(&v, 0.0), Duration::from_millis(1));
        assert_eq!(percentile(&v, 1.0), Duration::from_millis(5));
        assert_eq!(median(&[]), Duration::ZERO);
    }

    #[test]
    fn time_a_real_process() {
        let s = time_process(Command::new("true").arg("x")).unwrap();
        assert!(s.wall > Duration::ZERO);
        assert!(s.max_rss_kib > 0);
        assert!(time_process(&mut Command::new("false")).is_err());
    }

    #[test]
    fn driver_lines() {
        let s = parse_driver_output("noise\n{\"label\":\"a\",\"wall_ns\":[1000,3000]}\n").unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].label, "a");
        assert_eq!(s[0].median(), Duration::from_nanos(3000));
    }
}
