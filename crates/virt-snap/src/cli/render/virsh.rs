//! virsh's text: tables (a header, a rule, one row per line), sizes (`8.00 MiB`) and times.

use crate::cli::output;

/// Bytes as virsh shows them (`8.00 MiB`).
pub fn human(n: u64) -> String {
    const U: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} bytes")
    } else {
        format!("{v:.2} {}", U[i])
    }
}

/// A text table with virsh's layout: a header, a rule, one row per line.
pub fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            s.push(' ');
            s.push_str(c);
            if i + 1 < cells.len() {
                s.push_str(&" ".repeat(w[i] - c.chars().count() + 2));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut s = line(head.iter().map(|h| h.to_string()).collect());
    s.push_str(&"-".repeat(w.iter().sum::<usize>() + 3 * w.len()));
    s.push('\n');
    for r in rows {
        s.push_str(&line(r.clone()));
    }
    s
}

/// A time as virsh prints it (`2026-11-27 09:23:39 +0000`), or `-`.
pub fn time(t: Option<i64>) -> String {
    match t {
        Some(t) => format!("{} +0000", output::utc_date_time(t)),
        None => "-".into(),
    }
}
