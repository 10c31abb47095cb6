//! Checks the invariants stated in docs/ARCHITECTURE.md against the code.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Our crates that a crate's `[dependencies]` (not dev-dependencies) name.
fn internal_deps(krate: &str) -> Vec<String> {
    let ours = [
        "qmp-proto",
        "image-formats",
        "storage-backends",
        "locking",
        "snapshot-core",
        "virt-snap",
        "testbed",
        "bench-drivers",
    ];
    let text = std::fs::read_to_string(root().join("crates").join(krate).join("Cargo.toml"))
        .unwrap_or_else(|e| panic!("{krate}/Cargo.toml: {e}"));
    let mut section = String::new();
    let mut deps = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            section = line.to_string();
            continue;
        }
        if section != "[dependencies]" {
            continue;
        }
        let name = line
            .split(['=', '.', ' '])
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
        if ours.contains(&name.as_str()) {
            deps.push(name);
        }
    }
    deps
}

#[test]
fn dependencies_point_down_the_layers() {
    let allowed: BTreeMap<&str, &[&str]> = BTreeMap::from([
        ("qmp-proto", &[][..]),
        ("image-formats", &[][..]),
        ("locking", &[][..]),
        // The guest-agent runner (LVM in a test guest) is a test helper: no qmp-proto.
        ("storage-backends", &["image-formats", "locking"][..]),
        ("snapshot-core", &[][..]),
        (
            "virt-snap",
            &[
                "qmp-proto",
                "image-formats",
                "storage-backends",
                "locking",
                "snapshot-core",
            ][..],
        ),
        ("testbed", &["qmp-proto"][..]),
    ]);
    for (krate, ok) in &allowed {
        for dep in internal_deps(krate) {
            assert!(
                ok.contains(&dep.as_str()),
                "{krate} depends on {dep}, which docs/ARCHITECTURE.md does not allow"
            );
        }
    }
}

fn rust_sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out
}

/// Library source of a crate (src/, without #[cfg(test)] modules' own files under tests/).
fn lib_sources_containing(krate: &str, needles: &[&str]) -> Vec<String> {
    let mut hits = Vec::new();
    for f in rust_sources(&root().join("crates").join(krate).join("src")) {
        let text = std::fs::read_to_string(&f).unwrap();
        // Only the part before a `#[cfg(test)]` module counts as library code.
        let lib = text.split("#[cfg(test)]").next().unwrap_or("");
        for n in needles {
            if lib.contains(n) {
                hits.push(format!("{}: {n}", f.display()));
            }
        }
    }
    hits
}

#[test]
fn image_formats_spawns_no_processes_and_takes_no_locks() {
    let hits = lib_sources_containing(
        "image-formats",
        &[
            "std::process",
            "tokio::process",
            "Command::new",
            "F_OFD_SETLK",
            "flock(",
        ],
    );
    assert!(hits.is_empty(), "{hits:#?}");
}

#[test]
fn only_the_facade_launches_qemu() {
    for krate in [
        "qmp-proto",
        "image-formats",
        "locking",
        "storage-backends",
        "snapshot-core",
    ] {
        let hits = lib_sources_containing(krate, &["qemu-system"]);
        assert!(hits.is_empty(), "{hits:#?}");
    }
}

#[test]
fn snapshot_core_qmp_proto_and_locking_spawn_no_processes() {
    for krate in ["snapshot-core", "qmp-proto", "locking"] {
        let hits = lib_sources_containing(
            krate,
            &["std::process::Command", "tokio::process", "Command::new"],
        );
        assert!(hits.is_empty(), "{hits:#?}");
    }
}

#[test]
fn library_crates_deny_missing_docs() {
    for krate in [
        "qmp-proto",
        "image-formats",
        "locking",
        "storage-backends",
        "snapshot-core",
        "virt-snap",
    ] {
        let lib =
            std::fs::read_to_string(root().join("crates").join(krate).join("src/lib.rs")).unwrap();
        assert!(
            lib.contains("#![deny(missing_docs)]"),
            "{krate}/src/lib.rs lacks #![deny(missing_docs)]"
        );
    }
}

/// The facade's library sources: crates/virt-snap/src without the CLI (src/cli, src/main.rs).
fn facade_library_sources() -> Vec<PathBuf> {
    let src = root().join("crates/virt-snap/src");
    rust_sources(&src)
        .into_iter()
        .filter(|p| !p.starts_with(src.join("cli")) && !p.ends_with("main.rs"))
        .collect()
}

#[test]
fn the_cli_names_no_lower_crate() {
    let src = root().join("crates/virt-snap/src");
    let mut files = rust_sources(&src.join("cli"));
    files.push(src.join("main.rs"));
    let mut hits = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for n in [
            "storage_backends",
            "image_formats",
            "qmp_proto",
            "snapshot_core",
            "locking::",
            "use locking",
        ] {
            // As a path or word of its own (`Blocking::Inline` names no `locking`).
            let named = text.match_indices(n).any(|(i, _)| {
                !text[..i]
                    .chars()
                    .next_back()
                    .is_some_and(|c| c.is_alphanumeric() || c == '_')
            });
            if named {
                hits.push(format!("{}: {n}", f.display()));
            }
        }
    }
    assert!(
        hits.is_empty(),
        "the CLI goes through the virt_snap library: {hits:#?}"
    );
}

#[test]
fn the_facade_library_has_no_clap_and_prints_nothing() {
    let mut hits = Vec::new();
    for f in facade_library_sources() {
        let text = std::fs::read_to_string(&f).unwrap();
        let lib = text.split("#[cfg(test)]").next().unwrap_or("");
        // Code only: doc examples may print.
        let code: String = lib
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        for n in ["clap", "println!", "print!(", "stdout()"] {
            if code.contains(n) {
                hits.push(format!("{}: {n}", f.display()));
            }
        }
    }
    assert!(hits.is_empty(), "{hits:#?}");
    // The renderers live in the CLI, one module per tool whose output it reproduces.
    for r in ["qemu_img.rs", "virsh.rs"] {
        let p = root().join("crates/virt-snap/src/cli/render").join(r);
        assert!(p.exists(), "{} is missing", p.display());
    }
}

#[test]
fn the_facade_lib_rs_reexports_no_whole_crate() {
    let lib = std::fs::read_to_string(root().join("crates/virt-snap/src/lib.rs")).unwrap();
    for krate in [
        "qmp_proto",
        "image_formats",
        "storage_backends",
        "locking",
        "snapshot_core",
    ] {
        assert!(
            !lib.contains(&format!("pub use {krate};")),
            "lib.rs re-exports all of {krate}: re-export the types the API exposes instead"
        );
    }
}

#[test]
fn the_storage_backends_lib_rs_is_a_face() {
    // Module list, docs, the Backend trait and re-exports: no free function, type or impl
    // of its own (those live in modules: open.rs, util.rs, volfile.rs, ...).
    let lib = std::fs::read_to_string(root().join("crates/storage-backends/src/lib.rs")).unwrap();
    for line in lib.lines() {
        for item in [
            "fn ",
            "pub fn ",
            "pub(crate) fn ",
            "async fn ",
            "pub async fn ",
            "pub(crate) async fn ",
            "struct ",
            "pub struct ",
            "enum ",
            "pub enum ",
            "impl",
            "const ",
            "pub const ",
            "static ",
        ] {
            assert!(
                !line.starts_with(item),
                "storage-backends/src/lib.rs defines `{line}`: move it to a module of its own"
            );
        }
    }
    assert!(
        lib.contains("pub trait Backend"),
        "the Backend trait is the crate's face"
    );
}

#[test]
fn storage_backends_share_volume_file_helpers_through_no_backend() {
    // The shared volume-file helpers live in volfile.rs (and util.rs): a backend imports
    // nothing from another backend's module.
    let src = root().join("crates/storage-backends/src");
    for (file, others) in [
        ("btrfs.rs", ["crate::dir", "crate::lvm"]),
        ("lvm.rs", ["crate::dir", "crate::btrfs"]),
        ("dir.rs", ["crate::btrfs", "crate::lvm"]),
    ] {
        let text = std::fs::read_to_string(src.join(file)).unwrap();
        for o in others {
            assert!(
                !text.contains(o),
                "{file} names {o}: share helpers through volfile.rs"
            );
        }
    }
}
