//! [`ToolCmd`]: every command a backend runs, as a typed value. A runner gets the value;
//! [`ToolCmd::argv`] renders the exact command line (what the golden files in
//! `tests/golden/` check, what a runner that spawns the tool executes, what errors show).
//! The local runner recognises its built-in commands by matching on the value, never by
//! re-parsing strings.

use crate::lvm::{LVS_FIELDS, SNAPSHOT_TAG};
use std::path::PathBuf;

/// A storage tool command.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ToolCmd {
    /// `btrfs subvolume create PATH`.
    BtrfsSubvolumeCreate {
        /// The new subvolume.
        path: PathBuf,
    },
    /// `btrfs subvolume delete PATH`.
    BtrfsSubvolumeDelete {
        /// The subvolume.
        path: PathBuf,
    },
    /// `btrfs subvolume snapshot [-r] SRC DST`.
    BtrfsSnapshot {
        /// The subvolume to snapshot.
        src: PathBuf,
        /// The snapshot's path (inside DST when DST is an existing directory).
        dst: PathBuf,
        /// `-r`: a read-only snapshot.
        readonly: bool,
    },
    /// `btrfs subvolume list -s -o DIR`: the snapshots below DIR.
    BtrfsSnapshotList {
        /// The directory.
        dir: PathBuf,
    },
    /// `lvs --reportformat json --units b --nosuffix -o LVS_FIELDS VG`.
    Lvs {
        /// The volume group.
        vg: String,
    },
    /// `vgs --reportformat json --units b --nosuffix -o vg_name,vg_size,vg_free VG`.
    Vgs {
        /// The volume group.
        vg: String,
    },
    /// `lvcreate -q -y -n NAME -L SIZEb VG`: a linear LV.
    LvCreate {
        /// The volume group.
        vg: String,
        /// The new LV.
        name: String,
        /// Its size in bytes.
        size: u64,
    },
    /// `lvcreate -q -y -n NAME -V SIZEb --thinpool VG/POOL`: a thin LV.
    LvCreateThin {
        /// The new LV.
        name: String,
        /// Its virtual size in bytes.
        size: u64,
        /// The thin pool, `VG/POOL`.
        thin_pool: String,
    },
    /// A tagged read-only snapshot of `origin` (`VG/LV`): COW with `cow_size`
    /// (`lvcreate -q -y -s -n NAME -L SIZEb --addtag vs_snap -pr ORIGIN`), thin without
    /// (`lvcreate -q -y -s -n NAME --addtag vs_snap -pr --setactivationskip y ORIGIN`).
    LvCreateSnapshot {
        /// The origin, `VG/LV`.
        origin: String,
        /// The snapshot LV.
        name: String,
        /// A COW snapshot's size in bytes; `None`: a thin snapshot.
        cow_size: Option<u64>,
    },
    /// `lvcreate -q -y -s -n NAME -kn -prw ORIGIN`: a writable thin snapshot activated like
    /// any LV (a revert's new volume).
    LvCreateWritableThinSnapshot {
        /// The origin, `VG/LV`.
        origin: String,
        /// The new LV.
        name: String,
    },
    /// `lvremove -q -y VG/LV`.
    LvRemove {
        /// The LV, `VG/LV`.
        lv: String,
    },
    /// `lvrename -q VG FROM TO`.
    LvRename {
        /// The volume group.
        vg: String,
        /// The LV's name.
        from: String,
        /// Its new name.
        to: String,
    },
    /// `lvconvert -q -y --merge VG/SNAP`: merge a COW snapshot into its origin.
    LvConvertMerge {
        /// The snapshot LV, `VG/SNAP`.
        lv: String,
    },
    /// Any other command line, as is (runner tests, diagnostics): no backend runs one.
    Argv(Vec<String>),
}

fn s(items: &[&str]) -> Vec<String> {
    items.iter().map(|x| x.to_string()).collect()
}

fn p(path: &std::path::Path) -> String {
    path.display().to_string()
}

impl ToolCmd {
    /// The command line, argv\[0\] first: exactly what the tool is run with.
    pub fn argv(&self) -> Vec<String> {
        use ToolCmd::*;
        let reportformat = ["--reportformat", "json", "--units", "b", "--nosuffix", "-o"];
        match self {
            BtrfsSubvolumeCreate { path } => s(&["btrfs", "subvolume", "create", &p(path)]),
            BtrfsSubvolumeDelete { path } => s(&["btrfs", "subvolume", "delete", &p(path)]),
            BtrfsSnapshot { src, dst, readonly } => {
                let mut a = s(&["btrfs", "subvolume", "snapshot"]);
                if *readonly {
                    a.push("-r".into());
                }
                a.extend([p(src), p(dst)]);
                a
            }
            BtrfsSnapshotList { dir } => s(&["btrfs", "subvolume", "list", "-s", "-o", &p(dir)]),
            Lvs { vg } => {
                let mut a = s(&["lvs"]);
                a.extend(s(&reportformat));
                a.extend(s(&[LVS_FIELDS, vg]));
                a
            }
            Vgs { vg } => {
                let mut a = s(&["vgs"]);
                a.extend(s(&reportformat));
                a.extend(s(&["vg_name,vg_size,vg_free", vg]));
                a
            }
            LvCreate { vg, name, size } => s(&[
                "lvcreate",
                "-q",
                "-y",
                "-n",
                name,
                "-L",
                &format!("{size}b"),
                vg,
            ]),
            LvCreateThin {
                name,
                size,
                thin_pool,
            } => s(&[
                "lvcreate",
                "-q",
                "-y",
                "-n",
                name,
                "-V",
                &format!("{size}b"),
                "--thinpool",
                thin_pool,
            ]),
            LvCreateSnapshot {
                origin,
                name,
                cow_size: Some(size),
            } => s(&[
                "lvcreate",
                "-q",
                "-y",
                "-s",
                "-n",
                name,
                "-L",
                &format!("{size}b"),
                "--addtag",
                SNAPSHOT_TAG,
                "-pr",
                origin,
            ]),
            LvCreateSnapshot {
                origin,
                name,
                cow_size: None,
            } => s(&[
                "lvcreate",
                "-q",
                "-y",
                "-s",
                "-n",
                name,
                "--addtag",
                SNAPSHOT_TAG,
                "-pr",
                "--setactivationskip",
                "y",
                origin,
            ]),
            LvCreateWritableThinSnapshot { origin, name } => s(&[
                "lvcreate", "-q", "-y", "-s", "-n", name, "-kn", "-prw", origin,
            ]),
            LvRemove { lv } => s(&["lvremove", "-q", "-y", lv]),
            LvRename { vg, from, to } => s(&["lvrename", "-q", vg, from, to]),
            LvConvertMerge { lv } => s(&["lvconvert", "-q", "-y", "--merge", lv]),
            Argv(a) => a.clone(),
        }
    }

    /// The program run (argv\[0\]).
    pub fn program(&self) -> String {
        self.argv().into_iter().next().unwrap_or_default()
    }
}

impl std::fmt::Display for ToolCmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.argv().join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_command_renders_the_tools_argv() {
        let snap = |readonly| ToolCmd::BtrfsSnapshot {
            src: "/p/v".into(),
            dst: "/p/.snapshots/v/s".into(),
            readonly,
        };
        assert_eq!(
            snap(true).argv(),
            [
                "btrfs",
                "subvolume",
                "snapshot",
                "-r",
                "/p/v",
                "/p/.snapshots/v/s"
            ]
        );
        assert_eq!(
            snap(false).to_string(),
            "btrfs subvolume snapshot /p/v /p/.snapshots/v/s"
        );
        assert_eq!(
            ToolCmd::LvRename {
                vg: "vg0".into(),
                from: "a".into(),
                to: "b".into()
            }
            .argv(),
            ["lvrename", "-q", "vg0", "a", "b"]
        );
        assert_eq!(ToolCmd::Argv(vec!["true".into()]).program(), "true");
    }
}
