//! Long jobs' progress on stderr: a bar (indicatif) when stderr is a terminal, one line per
//! job when it is not (a log, a pipe, CI), printed once the job is done. Nothing is printed
//! for a job that fails: the command's error line says why.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use virt_snap::progress::{Progress, Unit};

/// The CLI's reporter.
#[derive(Debug)]
pub struct StderrProgress {
    terminal: bool,
    job: Mutex<Option<Job>>,
}

#[derive(Debug)]
struct Job {
    what: String,
    started: Instant,
    bar: Option<ProgressBar>,
    unit: Unit,
    last: (u64, u64),
}

impl Default for StderrProgress {
    fn default() -> Self {
        StderrProgress::new()
    }
}

impl StderrProgress {
    /// A bar if stderr is a terminal, lines otherwise.
    pub fn new() -> StderrProgress {
        StderrProgress {
            terminal: std::io::stderr().is_terminal(),
            job: Mutex::new(None),
        }
    }

    fn job(&self) -> std::sync::MutexGuard<'_, Option<Job>> {
        self.job.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn template(unit: Unit) -> &'static str {
    match unit {
        Unit::Bytes => "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {elapsed}",
        Unit::Work => "{msg} [{bar:30}] {percent}% {elapsed}",
    }
}

fn style(unit: Unit) -> ProgressStyle {
    ProgressStyle::with_template(template(unit))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// `1.2 s`, `340 ms`.
fn took(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// `64.0 MiB`.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

impl Progress for StderrProgress {
    fn start(&self, what: &str, unit: Unit) {
        let bar = self.terminal.then(|| {
            let b = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            b.set_style(style(unit));
            b.set_message(what.to_string());
            b.enable_steady_tick(Duration::from_millis(200));
            b
        });
        *self.job() = Some(Job {
            what: what.to_string(),
            started: Instant::now(),
            bar,
            unit,
            last: (0, 0),
        });
    }

    fn update(&self, done: u64, total: u64) {
        if let Some(j) = self.job().as_mut() {
            j.last = (done, total);
            if let Some(b) = &j.bar {
                b.set_length(total.max(done));
                b.set_position(done);
            }
        }
    }

    fn finish(&self, ok: bool) {
        let Some(j) = self.job().take() else { return };
        if let Some(b) = &j.bar {
            b.finish_and_clear();
        }
        if !ok {
            return;
        }
        let size = match (j.unit, j.last) {
            (Unit::Bytes, (_, total)) if total > 0 => format!(", {} of RAM", mib(total)),
            _ => String::new(),
        };
        eprintln!(
            "virt-snap: {}: done in {}{size}",
            j.what,
            took(j.started.elapsed())
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_read_as_people_write_them() {
        assert_eq!(took(Duration::from_millis(340)), "340 ms");
        assert_eq!(took(Duration::from_millis(1250)), "1.2 s");
        assert_eq!(mib(64 << 20), "64.0 MiB");
    }

    #[test]
    fn every_style_template_parses() {
        for u in [Unit::Bytes, Unit::Work] {
            assert!(ProgressStyle::with_template(template(u)).is_ok(), "{u:?}");
        }
    }
}
