//! The CLI conventions every subcommand follows, checked on the real binary.

use virt_snap_e2e::{run, stderr, stdout, virt_snap};

#[test]
fn state_dir_resolution_order() {
    let o = run(virt_snap()
        .args(["state-dir", "--state-dir", "/flag"])
        .env("VIRT_SNAP_STATE_DIR", "/env"));
    assert!(o.status.success());
    assert_eq!(stdout(&o).trim(), "/flag");

    let o = run(virt_snap()
        .arg("state-dir")
        .env("VIRT_SNAP_STATE_DIR", "/env")
        .env("XDG_STATE_HOME", "/xdg"));
    assert_eq!(stdout(&o).trim(), "/env");

    let o = run(virt_snap()
        .arg("state-dir")
        .env("XDG_STATE_HOME", "/xdg")
        .env("HOME", "/home/u"));
    assert_eq!(stdout(&o).trim(), "/xdg/virt-snap");

    let o = run(virt_snap().arg("state-dir").env("HOME", "/home/u"));
    assert_eq!(stdout(&o).trim(), "/home/u/.local/state/virt-snap");
}

#[test]
fn output_json_is_one_json_document() {
    let o = run(virt_snap()
        .args(["state-dir", "--output", "json"])
        .env("HOME", "/home/u"));
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("valid JSON");
    assert_eq!(v["state-dir"], "/home/u/.local/state/virt-snap");
}

#[test]
fn errors_are_one_line_on_stderr_with_nonzero_exit() {
    let o = run(virt_snap().arg("state-dir").env_remove("HOME"));
    assert!(!o.status.success());
    assert!(stdout(&o).is_empty());
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(err.starts_with("virt-snap: error: "), "{err:?}");
}

#[test]
fn verbose_and_rust_log_are_accepted() {
    let o = run(virt_snap().args(["-vv", "state-dir"]).env("HOME", "/h"));
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(virt_snap()
        .arg("state-dir")
        .env("HOME", "/h")
        .env("RUST_LOG", "debug"));
    assert!(o.status.success(), "{}", stderr(&o));
}
