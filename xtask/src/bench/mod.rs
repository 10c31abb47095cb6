//! `cargo xtask bench NAME`: benchmarks that measure virt-snap and its peer in the same run.

/// Run the named benchmark.
pub fn run(args: &[String]) -> Result<(), String> {
    Err(format!("unknown benchmark {args:?}"))
}
