//! `cargo xtask deps`: install what the tests and benchmarks need, idempotently.
//!
//! QEMU 10.0.2 comes from bookworm-backports. A plain `apt-get install qemu-system-x86` would take
//! 7.2 from bookworm and remove qemu-utils 10.0.2, so we point apt at a private sources directory
//! (a copy of the system's sources plus a backports entry) with `-o Dir::Etc::SourceParts=...`,
//! leaving /etc/apt untouched. Downloaded .debs are kept in target/xtask/apt-archives.

use crate::util::{self, have, output, step, target_dir};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The QEMU version every test and benchmark is written against.
pub const QEMU_VERSION: &str = "10.0.2";
/// The Python QMP library measured as the peer of qmp-proto.
pub const PY_QEMU_QMP: &str = "qemu.qmp==0.0.6";

const BACKPORTS: &str = "
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";

/// One thing the project needs from the machine.
struct Need {
    what: &'static str,
    present: fn() -> bool,
    packages: &'static [&'static str],
    backports: bool,
}

fn version_of(prog: &str) -> Option<String> {
    let out = Command::new(prog).arg("--version").output().ok()?;
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn qemu_ok() -> bool {
    let want = format!("version {QEMU_VERSION}");
    [
        "qemu-system-x86_64",
        "qemu-img",
        "qemu-io",
        "qemu-storage-daemon",
    ]
    .iter()
    .all(|p| version_of(p).is_some_and(|v| v.contains(&want)))
}

const NEEDS: &[Need] = &[
    Need {
        what: "QEMU 10.0.2 (qemu-system-x86_64, qemu-img, qemu-io, qemu-storage-daemon)",
        present: qemu_ok,
        packages: &[
            "qemu-system-x86",
            "qemu-utils",
            "qemu-system-common",
            "qemu-system-data",
            "qemu-block-extra",
        ],
        backports: true,
    },
    Need {
        what: "btrfs-progs (mkfs.btrfs, btrfs)",
        present: || have("mkfs.btrfs") && have("btrfs"),
        packages: &["btrfs-progs"],
        backports: false,
    },
    Need {
        what: "lvm2 (lvm)",
        present: || have("lvm"),
        packages: &["lvm2"],
        backports: false,
    },
    Need {
        what: "e2fsprogs, util-linux (mkfs.ext4, losetup, mount)",
        present: || have("mkfs.ext4") && have("losetup") && have("mount"),
        packages: &["e2fsprogs", "util-linux", "mount"],
        backports: false,
    },
    Need {
        what: "etcd 3.4 (etcd, etcdctl: the cluster lockspace's tests and benchmarks)",
        present: || have("etcd") && have("etcdctl"),
        packages: &["etcd-server", "etcd-client"],
        backports: false,
    },
    Need {
        what: "protoc with protobuf's well-known types (protobuf-compiler, libprotobuf-dev: the \
               etcd client's build compiles etcd's API)",
        present: || {
            have("protoc")
                && std::path::Path::new("/usr/include/google/protobuf/descriptor.proto").exists()
        },
        packages: &["protobuf-compiler", "libprotobuf-dev"],
        backports: false,
    },
    Need {
        what: "python3-venv (for the benchmark peers)",
        present: || {
            Command::new("python3")
                .args(["-c", "import venv, ensurepip"])
                .output()
                .is_ok_and(|o| o.status.success())
        },
        packages: &["python3-venv"],
        backports: false,
    },
];

/// The private apt sources directory (system sources + bookworm-backports).
fn sources_dir() -> Result<PathBuf, String> {
    let dir = target_dir().join("xtask/apt-sources");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut text = String::new();
    let sys = PathBuf::from("/etc/apt/sources.list.d");
    if let Ok(entries) = std::fs::read_dir(&sys) {
        let mut names: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        names.sort();
        for p in names {
            if p.extension().is_some_and(|e| e == "sources") {
                text.push_str(&std::fs::read_to_string(&p).unwrap_or_default());
                text.push('\n');
            }
        }
    }
    if !text.contains("deb.debian.org/debian") {
        // No deb822 sources (older image): fall back to the standard bookworm entries.
        text.push_str(
            "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n\
             Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
             Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n\
             Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
        );
    }
    text.push_str(BACKPORTS);
    let file = dir.join("virt-snap.sources");
    if std::fs::read_to_string(&file).ok().as_deref() != Some(text.as_str()) {
        std::fs::write(&file, text).map_err(|e| format!("{}: {e}", file.display()))?;
    }
    Ok(dir)
}

/// An `apt-get` command that reads our private sources and keeps its .debs in target/.
pub fn apt_get() -> Result<Command, String> {
    let sources = sources_dir()?;
    let archives = target_dir().join("xtask/apt-archives");
    std::fs::create_dir_all(archives.join("partial")).map_err(|e| e.to_string())?;
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive")
        .arg("-q")
        .arg("-o")
        .arg(format!("Dir::Etc::SourceParts={}", sources.display()))
        .arg("-o")
        .arg(format!("Dir::Cache::Archives={}", archives.display()));
    Ok(cmd)
}

/// Run `apt-get update` against the private sources, once per xtask process.
pub fn apt_update() -> Result<(), String> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        step("apt-get update (bookworm + bookworm-backports, private sources list)");
        let mut cmd = apt_get()?;
        cmd.arg("update");
        util::run(&mut cmd).map_err(|e| {
            format!(
                "{e}\n  apt-get update failed: is Debian's archive reachable from this machine?"
            )
        })
    })
    .clone()
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_ok_and(|s| s.trim() == "0")
}

/// libvirt measured as the peer of the live path (bookworm-backports; bookworm has 9.0).
pub const LIBVIRT_VERSION: &str = "11.3.0-2~bpo12+1";
/// The libvirt packages, pinned to [`LIBVIRT_VERSION`]: not libvirt-daemon-system and not
/// `-t bookworm-backports`, both of which pull a newer systemd.
const LIBVIRT_PACKAGES: &[&str] = &[
    "libvirt-daemon",
    "libvirt-clients",
    "libvirt-daemon-driver-qemu",
    "libvirt-daemon-driver-storage",
    "libvirt-daemon-log",
    "libvirt0",
    "libvirt-common",
    "libvirt-daemon-common",
];

/// What `cargo xtask deps` installs beyond the defaults.
#[derive(Debug, Default, Clone, Copy)]
pub struct Extras {
    /// libvirt 11.3 (`--libvirt`), the benchmark peer of domains and live snapshots.
    pub libvirt: bool,
}

impl Extras {
    /// Parses `deps`' flags.
    pub fn parse(args: &[String]) -> Result<Extras, String> {
        let mut x = Extras::default();
        for a in args {
            match a.as_str() {
                "--libvirt" => x.libvirt = true,
                other => return Err(format!("deps: unknown flag {other:?} (known: --libvirt)")),
            }
        }
        Ok(x)
    }
}

fn dpkg_version(pkg: &str) -> Option<String> {
    output(Command::new("dpkg-query").args(["-W", "-f=${Version}", pkg]))
        .ok()
        .filter(|v| !v.trim().is_empty())
        .map(|v| v.trim().to_owned())
}

/// Whether libvirt [`LIBVIRT_VERSION`] (daemon, QEMU driver, virsh) is installed.
pub fn libvirt_ok() -> bool {
    LIBVIRT_PACKAGES
        .iter()
        .all(|p| dpkg_version(p).as_deref() == Some(LIBVIRT_VERSION))
        && have("virsh")
        && have("libvirtd")
}

/// Installs libvirt [`LIBVIRT_VERSION`] without upgrading systemd (systemd-container pinned to
/// the installed systemd) and without touching /etc/apt, and lets its QEMU driver run as root
/// (/dev/kvm is root-only here). The daemons are not started: the benchmarks run them.
fn install_libvirt() -> Result<(), String> {
    if !libvirt_ok() {
        let systemd = dpkg_version("systemd")
            .ok_or("libvirt: cannot read the installed systemd's version (dpkg-query)")?;
        apt_update()?;
        let mut pkgs: Vec<String> = LIBVIRT_PACKAGES
            .iter()
            .map(|p| format!("{p}={LIBVIRT_VERSION}"))
            .collect();
        pkgs.push(format!("systemd-container={systemd}"));
        step(&format!("apt-get install {}", pkgs.join(" ")));
        let mut cmd = apt_get()?;
        cmd.args(["install", "-y", "--no-install-recommends"])
            .args(&pkgs);
        util::run(&mut cmd)?;
        if dpkg_version("systemd").as_deref() != Some(systemd.as_str()) {
            return Err(format!(
                "installing libvirt changed systemd (was {systemd}): refusing to go on"
            ));
        }
        if !libvirt_ok() {
            return Err(format!(
                "libvirt {LIBVIRT_VERSION} still missing after install"
            ));
        }
    }
    let conf = PathBuf::from("/etc/libvirt/qemu.conf");
    let text = std::fs::read_to_string(&conf).unwrap_or_default();
    let set = |k: &str| {
        text.lines()
            .any(|l| l.trim_start().starts_with(k) && l.contains("\"root\""))
    };
    if !(set("user") && set("group")) {
        step("libvirt: QEMU driver runs QEMU as root (/dev/kvm is root-only here)");
        let mut t = text.clone();
        if !t.is_empty() && !t.ends_with('\n') {
            t.push('\n');
        }
        t.push_str("# added by `cargo xtask deps --libvirt` (virt-snap benchmarks)\nuser = \"root\"\ngroup = \"root\"\n");
        std::fs::write(&conf, t).map_err(|e| format!("{}: {e}", conf.display()))?;
    }
    eprintln!("    [ok] libvirt {LIBVIRT_VERSION} (virsh, libvirtd, QEMU driver)");
    Ok(())
}

/// `cargo xtask deps [--libvirt]`.
pub fn run_with(extras: Extras) -> Result<(), String> {
    run()?;
    if extras.libvirt {
        if !is_root() {
            return Err("--libvirt: installing libvirt needs root".into());
        }
        install_libvirt()?;
    }
    Ok(())
}

/// `cargo xtask deps`.
pub fn run() -> Result<(), String> {
    step("checking what the tests and benchmarks need");
    let missing: Vec<&Need> = NEEDS.iter().filter(|n| !(n.present)()).collect();
    for n in NEEDS {
        let ok = !missing.iter().any(|m| std::ptr::eq(*m, n));
        eprintln!("    [{}] {}", if ok { "ok" } else { "missing" }, n.what);
    }
    if !missing.is_empty() {
        let pkgs: Vec<&str> = missing
            .iter()
            .flat_map(|n| n.packages.iter().copied())
            .collect();
        if !is_root() {
            return Err(format!(
                "missing: {}; installing them needs root (run `sudo cargo xtask deps`, \
                 or install these Debian packages yourself: {})",
                missing
                    .iter()
                    .map(|n| n.what)
                    .collect::<Vec<_>>()
                    .join(", "),
                pkgs.join(" ")
            ));
        }
        apt_update()?;
        for backports in [true, false] {
            let pkgs: Vec<&str> = missing
                .iter()
                .filter(|n| n.backports == backports)
                .flat_map(|n| n.packages.iter().copied())
                .collect();
            if pkgs.is_empty() {
                continue;
            }
            step(&format!(
                "apt-get install {}{}",
                if backports {
                    "-t bookworm-backports "
                } else {
                    ""
                },
                pkgs.join(" ")
            ));
            let mut cmd = apt_get()?;
            cmd.args(["install", "-y", "--no-install-recommends"]);
            if backports {
                cmd.args(["-t", "bookworm-backports"]);
            }
            cmd.args(&pkgs);
            util::run(&mut cmd)?;
        }
        let still: Vec<&str> = NEEDS
            .iter()
            .filter(|n| !(n.present)())
            .map(|n| n.what)
            .collect();
        if !still.is_empty() {
            return Err(format!("still missing after install: {}", still.join(", ")));
        }
    }
    bench_venv()?;
    eprintln!("    all dependencies present");
    Ok(())
}

/// The Python virtualenv holding the benchmark peers (qemu.qmp). Returns its python.
pub fn bench_venv() -> Result<PathBuf, String> {
    let venv = target_dir().join("bench-venv");
    let python = venv.join("bin/python");
    let probe = |py: &PathBuf| {
        Command::new(py)
            .args(["-c", "import qemu.qmp"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if probe(&python) {
        return Ok(python);
    }
    step(&format!(
        "python venv {} with {PY_QEMU_QMP}",
        venv.display()
    ));
    util::run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    util::run(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg(PY_QEMU_QMP),
    )
    .map_err(|e| format!("{e}\n  pip could not install {PY_QEMU_QMP}: is PyPI reachable?"))?;
    if !probe(&python) {
        return Err(format!(
            "{PY_QEMU_QMP} installed but `import qemu.qmp` fails"
        ));
    }
    Ok(python)
}
