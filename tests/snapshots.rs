//! Domain snapshot metadata on the real binary: a small tree redefined from domainsnapshot XML
//! as libvirt writes it (internal with RAM, external disk-only, a branch with RAM in a file),
//! then snapshot-list in every filter mode against the tables virsh prints for such a tree,
//! --tree, --parent, --name, snapshot-info, snapshot-dumpxml (unknown parts kept),
//! snapshot-current, snapshot-parent; snapshot-create-as --print-xml for --diskspec/--memspec
//! combinations (re-parsed by snapshot-create --redefine); user errors; the timings a
//! disk-only snapshot of a running no-OS KVM domain reports with `--output json`.

use std::path::{Path, PathBuf};
use virt_snap_e2e::in_state::{fails, ok, ok_json, vs};
use virt_snap_e2e::{stderr, stdout};

const DOMAIN: &str = "<domain type='kvm'>
  <name>vm1</name>
  <memory unit='MiB'>256</memory>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/vm1.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/vm1-data.qcow2'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
  </devices>
</domain>
";

/// `virsh snapshot-create-as vm1 base` of a running domain: internal, with RAM; libvirt
/// embeds the domain and a cookie (unknown to us: kept as written).
const BASE: &str = "<domainsnapshot>
  <name>base</name>
  <description>fresh install</description>
  <state>running</state>
  <creationTime>1764662400</creationTime>
  <memory snapshot='internal'/>
  <disks>
    <disk name='vda' snapshot='internal'/>
    <disk name='vdb' snapshot='internal'/>
  </disks>
  <domain type='kvm'>
    <name>vm1</name>
    <uuid>6b0e6a51-3a8e-4a38-9d4e-9a1b6a3f9e10</uuid>
    <memory unit='KiB'>262144</memory>
    <devices>
      <disk type='file' device='disk'>
        <driver name='qemu' type='qcow2'/>
        <source file='/var/lib/libvirt/images/vm1.qcow2'/>
        <target dev='vda' bus='virtio'/>
      </disk>
    </devices>
  </domain>
  <cookie>
    <cpu mode='custom' match='exact' check='full'>
      <model fallback='forbid'>qemu64</model>
    </cpu>
  </cookie>
</domainsnapshot>
";

/// `virsh snapshot-create-as vm1 disk1 --disk-only --atomic`: external overlays.
const DISK1: &str = "<domainsnapshot>
  <name>disk1</name>
  <state>disk-snapshot</state>
  <parent>
    <name>base</name>
  </parent>
  <creationTime>1764662500</creationTime>
  <memory snapshot='no'/>
  <disks>
    <disk name='vda' snapshot='external' type='file'>
      <driver type='qcow2'/>
      <source file='/var/lib/libvirt/images/vm1.disk1'>
        <seclabel model='dac' relabel='no'/>
      </source>
    </disk>
    <disk name='vdb' snapshot='external' type='file'>
      <driver type='qcow2'/>
      <source file='/var/lib/libvirt/images/vm1-data.disk1'/>
    </disk>
  </disks>
</domainsnapshot>
";

const DISK2: &str = "<domainsnapshot>
  <name>disk2</name>
  <state>disk-snapshot</state>
  <parent>
    <name>disk1</name>
  </parent>
  <creationTime>1764662800</creationTime>
  <memory snapshot='no'/>
  <disks>
    <disk name='vda' snapshot='external' type='file'>
      <driver type='qcow2'/>
      <source file='/var/lib/libvirt/images/vm1.disk2'/>
    </disk>
    <disk name='vdb' snapshot='no'/>
  </disks>
</domainsnapshot>
";

/// A snapshot of the shut-off domain, reverted to base first: the branch.
const BRANCH: &str = "<domainsnapshot>
  <name>branch</name>
  <state>shutoff</state>
  <parent>
    <name>base</name>
  </parent>
  <creationTime>1764662600</creationTime>
  <memory snapshot='no'/>
  <disks>
    <disk name='vda' snapshot='internal'/>
    <disk name='vdb' snapshot='internal'/>
  </disks>
</domainsnapshot>
";

/// `--memspec file=/var/lib/libvirt/qemu/ram-ext.save --diskspec vda,snapshot=external
/// --diskspec vdb,snapshot=no` of the running domain.
const RAM_EXT: &str = "<domainsnapshot>
  <name>ram-ext</name>
  <state>running</state>
  <parent>
    <name>branch</name>
  </parent>
  <creationTime>1764662700</creationTime>
  <memory snapshot='external' file='/var/lib/libvirt/qemu/ram-ext.save'/>
  <disks>
    <disk name='vda' snapshot='external' type='file'>
      <driver type='qcow2'/>
      <source file='/var/lib/libvirt/images/vm1.ram-ext'/>
    </disk>
    <disk name='vdb' snapshot='no'/>
  </disks>
</domainsnapshot>
";

struct Setup {
    _tmp: tempfile::TempDir,
    state: PathBuf,
    dir: PathBuf,
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// vm1 defined, and the tree redefined (disk2 current):
///
/// base ── branch ── ram-ext
///      └─ disk1 ── disk2
fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let dir = tmp.path().to_path_buf();
    let dom = write(&dir, "vm1.xml", DOMAIN);
    ok(&state, &["define", &dom]);
    for (name, xml) in [
        ("base", BASE),
        ("disk1", DISK1),
        ("branch", BRANCH),
        ("ram-ext", RAM_EXT),
    ] {
        let f = write(&dir, &format!("{name}.xml"), xml);
        let out = ok(&state, &["snapshot-create", "vm1", &f, "--redefine"]);
        assert_eq!(out, format!("Domain snapshot {name} created from '{f}'\n"));
    }
    let f = write(&dir, "disk2.xml", DISK2);
    ok(
        &state,
        &["snapshot-create", "vm1", &f, "--redefine", "--current"],
    );
    Setup {
        _tmp: tmp,
        state,
        dir,
    }
}

/// A virsh table's lines, and the blank line virsh ends a table with.
fn lines(l: &[&str]) -> String {
    let mut s = l.join("\n");
    s.push_str("\n\n");
    s
}

#[test]
fn snapshot_list_filters_print_virsh_tables() {
    let s = setup();
    let st = &s.state;
    let list = |extra: &[&str]| {
        let mut a = vec!["snapshot-list", "vm1"];
        a.extend(extra);
        ok(st, &a)
    };
    // The tables virsh prints: each column as wide as its widest shown cell.
    assert_eq!(
        list(&[]),
        lines(&[
            " Name      Creation Time               State",
            "------------------------------------------------------",
            " base      2025-12-02 08:00:00 +0000   running",
            " branch    2025-12-02 08:03:20 +0000   shutoff",
            " disk1     2025-12-02 08:01:40 +0000   disk-snapshot",
            " disk2     2025-12-02 08:06:40 +0000   disk-snapshot",
            " ram-ext   2025-12-02 08:05:00 +0000   running",
        ])
    );
    assert_eq!(
        list(&["--roots"]),
        lines(&[
            " Name   Creation Time               State",
            "---------------------------------------------",
            " base   2025-12-02 08:00:00 +0000   running",
        ])
    );
    assert_eq!(
        list(&["--leaves"]),
        lines(&[
            " Name      Creation Time               State",
            "------------------------------------------------------",
            " disk2     2025-12-02 08:06:40 +0000   disk-snapshot",
            " ram-ext   2025-12-02 08:05:00 +0000   running",
        ])
    );
    assert_eq!(
        list(&["--no-leaves"]),
        lines(&[
            " Name     Creation Time               State",
            "-----------------------------------------------------",
            " base     2025-12-02 08:00:00 +0000   running",
            " branch   2025-12-02 08:03:20 +0000   shutoff",
            " disk1    2025-12-02 08:01:40 +0000   disk-snapshot",
        ])
    );
    assert_eq!(
        list(&["--internal"]),
        lines(&[
            " Name     Creation Time               State",
            "-----------------------------------------------",
            " base     2025-12-02 08:00:00 +0000   running",
            " branch   2025-12-02 08:03:20 +0000   shutoff",
        ])
    );
    assert_eq!(
        list(&["--external"]),
        lines(&[
            " Name      Creation Time               State",
            "------------------------------------------------------",
            " disk1     2025-12-02 08:01:40 +0000   disk-snapshot",
            " disk2     2025-12-02 08:06:40 +0000   disk-snapshot",
            " ram-ext   2025-12-02 08:05:00 +0000   running",
        ])
    );
    assert_eq!(
        list(&["--disk-only"]),
        lines(&[
            " Name    Creation Time               State",
            "----------------------------------------------------",
            " disk1   2025-12-02 08:01:40 +0000   disk-snapshot",
            " disk2   2025-12-02 08:06:40 +0000   disk-snapshot",
        ])
    );
    assert_eq!(
        list(&["--active"]),
        lines(&[
            " Name      Creation Time               State",
            "------------------------------------------------",
            " base      2025-12-02 08:00:00 +0000   running",
            " ram-ext   2025-12-02 08:05:00 +0000   running",
        ])
    );
    assert_eq!(
        list(&["--inactive"]),
        lines(&[
            " Name     Creation Time               State",
            "-----------------------------------------------",
            " branch   2025-12-02 08:03:20 +0000   shutoff",
        ])
    );
    assert_eq!(
        list(&["--external", "--leaves"]),
        lines(&[
            " Name      Creation Time               State",
            "------------------------------------------------------",
            " disk2     2025-12-02 08:06:40 +0000   disk-snapshot",
            " ram-ext   2025-12-02 08:05:00 +0000   running",
        ])
    );
    assert_eq!(
        list(&["--topological"]),
        lines(&[
            " Name      Creation Time               State",
            "------------------------------------------------------",
            " base      2025-12-02 08:00:00 +0000   running",
            " branch    2025-12-02 08:03:20 +0000   shutoff",
            " ram-ext   2025-12-02 08:05:00 +0000   running",
            " disk1     2025-12-02 08:01:40 +0000   disk-snapshot",
            " disk2     2025-12-02 08:06:40 +0000   disk-snapshot",
        ])
    );
    assert_eq!(
        list(&["--from", "base"]),
        lines(&[
            " Name     Creation Time               State",
            "-----------------------------------------------------",
            " branch   2025-12-02 08:03:20 +0000   shutoff",
            " disk1    2025-12-02 08:01:40 +0000   disk-snapshot",
        ])
    );
    assert_eq!(
        list(&["--from", "base", "--descendants"]),
        lines(&[
            " Name      Creation Time               State",
            "------------------------------------------------------",
            " branch    2025-12-02 08:03:20 +0000   shutoff",
            " disk1     2025-12-02 08:01:40 +0000   disk-snapshot",
            " disk2     2025-12-02 08:06:40 +0000   disk-snapshot",
            " ram-ext   2025-12-02 08:05:00 +0000   running",
        ])
    );
    assert_eq!(
        list(&["--from", "disk2"]),
        lines(&[
            " Name   Creation Time   State",
            "-------------------------------",
        ])
    );
    assert_eq!(
        list(&["--parent"]),
        lines(&[
            " Name      Creation Time               State           Parent",
            "---------------------------------------------------------------",
            " base      2025-12-02 08:00:00 +0000   running",
            " branch    2025-12-02 08:03:20 +0000   shutoff         base",
            " disk1     2025-12-02 08:01:40 +0000   disk-snapshot   base",
            " disk2     2025-12-02 08:06:40 +0000   disk-snapshot   disk1",
            " ram-ext   2025-12-02 08:05:00 +0000   running         branch",
        ])
    );
    assert_eq!(list(&["--name"]), "base\nbranch\ndisk1\ndisk2\nram-ext\n");
    assert_eq!(
        list(&["--name", "--topological", "--leaves"]),
        "ram-ext\ndisk2\n"
    );
    // virsh's --tree, trailing spaces on the blank lines after a last leaf included.
    assert_eq!(
        list(&["--tree"]),
        "base\n  |\n  +- branch\n  |   |\n  |   +- ram-ext\n  |     \n  +- disk1\n      |\n      +- disk2\n        \n"
    );

    let j = ok_json(st, &["snapshot-list", "vm1", "--leaves"]);
    let rows = j.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["name"], "disk2");
    assert_eq!(rows[0]["parent"], "disk1");
    assert_eq!(rows[0]["current"], true);
    assert_eq!(rows[0]["location"], "external");
    assert_eq!(rows[0]["creation_time"], 1764662800);
    assert_eq!(rows[1]["name"], "ram-ext");
    assert_eq!(rows[1]["current"], false);
    let j = ok_json(st, &["snapshot-list", "vm1", "--name", "--roots"]);
    assert_eq!(j, serde_json::json!(["base"]));
    let j = ok_json(st, &["snapshot-list", "vm1", "--tree"]);
    assert_eq!(j.as_array().unwrap()[2]["name"], "ram-ext");
    assert_eq!(j.as_array().unwrap()[2]["parent"], "branch");
}

#[test]
fn info_dumpxml_current_parent() {
    let s = setup();
    let st = &s.state;
    let info = "Name:           disk2\n\
                Domain:         vm1\n\
                Current:        yes\n\
                State:          disk-snapshot\n\
                Location:       external\n\
                Parent:         disk1\n\
                Children:       0\n\
                Descendants:    0\n\
                Metadata:       yes\n";
    assert_eq!(ok(st, &["snapshot-info", "vm1", "disk2"]), info);
    assert_eq!(ok(st, &["snapshot-info", "vm1", "--current"]), info);
    let out = ok(st, &["snapshot-info", "vm1", "base"]);
    assert!(out.contains("Current:        no\n"), "{out}");
    assert!(out.contains("Location:       internal\n"), "{out}");
    assert!(out.contains("Parent:         -\n"), "{out}");
    assert!(
        out.contains("Children:       2\nDescendants:    4\n"),
        "{out}"
    );
    let j = ok_json(st, &["snapshot-info", "vm1", "ram-ext"]);
    assert_eq!(j["state"], "running");
    assert_eq!(j["location"], "external");
    assert_eq!(j["parent"], "branch");
    assert_eq!(j["descendants"], 0);

    // dumpxml gives back what libvirt wrote: its embedded domain, cookie and the disk
    // source's seclabel included; redefining from it changes nothing.
    let xml = ok(st, &["snapshot-dumpxml", "vm1", "base"]);
    for part in [
        "<uuid>6b0e6a51-3a8e-4a38-9d4e-9a1b6a3f9e10</uuid>",
        "<model fallback='forbid'>qemu64</model>",
        "<description>fresh install</description>",
        "<memory snapshot='internal'/>",
    ] {
        assert!(xml.contains(part), "{part} missing from {xml}");
    }
    let xml1 = ok(st, &["snapshot-dumpxml", "vm1", "disk1"]);
    assert!(
        xml1.contains("<seclabel model='dac' relabel='no'/>"),
        "{xml1}"
    );
    let again = write(&s.dir, "base-again.xml", &xml);
    ok(st, &["snapshot-create", "vm1", &again, "--redefine"]);
    assert_eq!(ok(st, &["snapshot-dumpxml", "vm1", "base"]), xml);
    assert_eq!(
        ok(st, &["snapshot-list", "vm1", "--name"]).lines().count(),
        5
    );
    let j = ok_json(st, &["snapshot-dumpxml", "vm1", "disk1"]);
    assert_eq!(j["xml"], xml1.as_str());

    assert_eq!(ok(st, &["snapshot-current", "vm1", "--name"]), "disk2\n");
    assert_eq!(
        ok(st, &["snapshot-current", "vm1"]),
        ok(st, &["snapshot-dumpxml", "vm1", "disk2"])
    );
    assert_eq!(
        ok_json(st, &["snapshot-current", "vm1", "--name"])["name"],
        "disk2"
    );
    // --current moves the pointer.
    let f = write(&s.dir, "branch2.xml", BRANCH);
    ok(
        st,
        &["snapshot-create", "vm1", &f, "--redefine", "--current"],
    );
    assert_eq!(ok(st, &["snapshot-current", "vm1", "--name"]), "branch\n");

    assert_eq!(ok(st, &["snapshot-parent", "vm1", "disk2"]), "disk1\n");
    assert_eq!(ok(st, &["snapshot-parent", "vm1", "ram-ext"]), "branch\n");
    assert_eq!(
        ok_json(st, &["snapshot-parent", "vm1", "disk1"])["parent"],
        "base"
    );
    let e = fails(st, &["snapshot-parent", "vm1", "base"]);
    assert!(e.contains("has no parent"), "{e}");
}

#[test]
fn print_xml_builds_virsh_domainsnapshot_xml() {
    let s = setup();
    let st = &s.state;
    let print = |args: &[&str]| {
        let mut a = vec!["snapshot-create-as", "vm1"];
        a.extend(args);
        a.push("--print-xml");
        ok(st, &a)
    };
    // Each printed XML is redefined as a child of base and read back.
    let check = |name: &str, xml: &str| {
        assert!(xml.starts_with("<domainsnapshot>"), "{xml}");
        let with_parent = xml.replacen(
            "</name>",
            "</name>\n  <parent>\n    <name>base</name>\n  </parent>",
            1,
        );
        let f = write(&s.dir, &format!("{name}-print.xml"), &with_parent);
        ok(st, &["snapshot-create", "vm1", &f, "--redefine"]);
        ok(st, &["snapshot-dumpxml", "vm1", name])
    };

    let xml = print(&[
        "ext1",
        "--description",
        "before, upgrade",
        "--disk-only",
        "--atomic",
        "--diskspec",
        "vda,snapshot=external,file=/images/vm1.ext1,driver=qcow2",
        "--diskspec",
        "vdb,snapshot=no",
    ]);
    let back = check("ext1", &xml);
    for part in [
        "<name>ext1</name>",
        "<description>before, upgrade</description>",
        "<disk name='vda' snapshot='external'>",
        "<source file='/images/vm1.ext1'/>",
        "<driver type='qcow2'/>",
        "<disk name='vdb' snapshot='no'/>",
    ] {
        assert!(back.contains(part), "{part} missing from {back}");
    }
    assert!(!xml.contains("<memory"), "{xml}");

    // --memspec with a bare path, escaped commas (virsh's ",," and "\,"), a block target.
    let xml = print(&[
        "--name",
        "ram1",
        "--memspec",
        "/var/lib/ram,,1.save,snapshot=external",
        "--diskspec",
        r"vda,snapshot=external,stype=block,file=/dev/vg0/vm1\,snap",
        "--diskspec",
        "vdb,snapshot=storage",
        "--live",
    ]);
    let back = check("ram1", &xml);
    for part in [
        "<memory snapshot='external' file='/var/lib/ram,1.save'/>",
        "<disk name='vda' snapshot='external' type='block'>",
        "<source dev='/dev/vg0/vm1,snap'/>",
        "<disk name='vdb' snapshot='storage'/>",
    ] {
        assert!(back.contains(part), "{part} missing from {back}");
    }
    let info = ok_json(st, &["snapshot-info", "vm1", "ram1"]);
    assert_eq!(info["location"], "storage");

    let xml = print(&["int1", "--memspec", "snapshot=internal"]);
    let back = check("int1", &xml);
    assert!(back.contains("<memory snapshot='internal'/>"), "{back}");
    assert_eq!(
        ok_json(st, &["snapshot-info", "vm1", "int1"])["location"],
        "internal"
    );

    // No name: virsh leaves it to the creation.
    let xml = print(&["--diskspec", "vda,snapshot=manual"]);
    assert_eq!(
        xml,
        "<domainsnapshot>\n  <disks>\n    <disk name='vda' snapshot='manual'/>\n  </disks>\n</domainsnapshot>\n"
    );
    let j = ok_json(st, &["snapshot-create-as", "vm1", "j1", "--print-xml"]);
    assert!(
        j["xml"].as_str().unwrap().contains("<name>j1</name>"),
        "{j}"
    );
}

#[test]
fn user_errors_are_one_clear_line() {
    let s = setup();
    let st = &s.state;
    let e = fails(st, &["snapshot-list", "nosuch"]);
    assert!(e.contains("\"nosuch\" not found"), "{e}");
    for args in [
        &["snapshot-info", "nosuch", "base"][..],
        &["snapshot-dumpxml", "nosuch", "base"],
        &["snapshot-current", "nosuch"],
        &["snapshot-parent", "nosuch", "base"],
    ] {
        let e = fails(st, args);
        assert!(e.contains("\"nosuch\""), "{args:?}: {e}");
    }
    for args in [
        &["snapshot-info", "vm1", "gone"][..],
        &["snapshot-dumpxml", "vm1", "gone"],
        &["snapshot-parent", "vm1", "gone"],
        &["snapshot-list", "vm1", "--from", "gone"],
    ] {
        let e = fails(st, args);
        assert!(e.contains("has no snapshot \"gone\""), "{args:?}: {e}");
    }

    let bad = write(&s.dir, "bad.xml", "<domainsnapshot><name>x</name>");
    let e = fails(st, &["snapshot-create", "vm1", &bad, "--redefine"]);
    assert!(e.contains("cannot be parsed"), "{e}");
    let e = fails(st, &["snapshot-create", "vm1", &bad]);
    assert!(e.contains("cannot be parsed"), "{e}");
    let e = fails(
        st,
        &["snapshot-create", "vm1", "/nonexistent/s.xml", "--redefine"],
    );
    assert!(e.contains("cannot read /nonexistent/s.xml"), "{e}");
    let orphan = write(
        &s.dir,
        "orphan.xml",
        "<domainsnapshot><name>o</name><parent><name>nope</name></parent></domainsnapshot>",
    );
    let e = fails(st, &["snapshot-create", "vm1", &orphan, "--redefine"]);
    assert!(e.contains("parent \"nope\""), "{e}");
    // base under its own descendant: refused, the tree unchanged.
    let cyc = write(
        &s.dir,
        "cycle.xml",
        "<domainsnapshot><name>base</name><parent><name>disk2</name></parent></domainsnapshot>",
    );
    let e = fails(st, &["snapshot-create", "vm1", &cyc, "--redefine"]);
    assert!(e.contains("descendant"), "{e}");
    assert_eq!(ok(st, &["snapshot-parent", "vm1", "disk1"]), "base\n");
    let slash = write(
        &s.dir,
        "slash.xml",
        "<domainsnapshot><name>a/b</name></domainsnapshot>",
    );
    let e = fails(st, &["snapshot-create", "vm1", &slash, "--redefine"]);
    assert!(e.contains('/'), "{e}");
    let e = fails(st, &["snapshot-create-as", "vm1", "a/b", "--print-xml"]);
    assert!(e.contains("invalid snapshot name \"a/b\""), "{e}");

    let e = fails(
        st,
        &[
            "snapshot-create-as",
            "vm1",
            "s",
            "--diskspec",
            "vdz,snapshot=external",
        ],
    );
    assert!(e.contains("has no disk \"vdz\""), "{e}");
    for (spec, why) in [
        ("snapshot=bogus", "memspec"),
        ("/ram,snapshot=internal", "memspec"),
        ("snapshot=external", "memspec"),
        ("/a,/b", "memspec"),
    ] {
        let e = fails(
            st,
            &[
                "snapshot-create-as",
                "vm1",
                "s",
                "--memspec",
                spec,
                "--print-xml",
            ],
        );
        assert!(e.contains(&format!("unable to parse {why}")), "{spec}: {e}");
    }
    for spec in [
        "vda,snapshot=bogus",
        "vda,stype=net",
        "vda,size=1G",
        "snapshot=no",
    ] {
        let e = fails(
            st,
            &[
                "snapshot-create-as",
                "vm1",
                "s",
                "--diskspec",
                spec,
                "--print-xml",
            ],
        );
        assert!(e.contains("unable to parse diskspec"), "{spec}: {e}");
    }
    let dom2 = write(&s.dir, "vm2.xml", &DOMAIN.replace("vm1", "vm2"));
    ok(st, &["define", &dom2]);
    let e = fails(st, &["snapshot-current", "vm2"]);
    assert!(e.contains("domain \"vm2\" has no current snapshot"), "{e}");
    assert_eq!(ok(st, &["snapshot-list", "vm2", "--name"]), "");
    assert_eq!(ok(st, &["snapshot-list", "vm2", "--tree"]), "");
}

#[test]
fn damaged_snapshot_file_is_named_and_hides_nothing() {
    let s = setup();
    let st = &s.state;
    std::fs::write(st.join("snapshots/vm1/disk1.xml"), "<domainsnapshot><name>").unwrap();
    let o = vs(st, &["snapshot-list", "vm1", "--name"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // disk1 is gone, its child disk2 is shown as a root; the others are all there.
    assert_eq!(stdout(&o), "base\nbranch\ndisk2\nram-ext\n");
    let err = stderr(&o);
    assert!(
        err.contains("warning: snapshot disk1 cannot be loaded"),
        "{err}"
    );
    let o = vs(st, &["snapshot-list", "vm1", "--tree"]);
    assert!(o.status.success());
    assert!(stderr(&o).contains("disk1"), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("base\n"), "{}", stdout(&o));
}

/// Destroys the running domain when the test ends, however it ends.
struct Destroy<'a>(&'a Path, &'a str);

impl Drop for Destroy<'_> {
    fn drop(&mut self) {
        let _ = vs(self.0, &["destroy", self.1]);
    }
}

/// A JSON member that is a number of milliseconds, or `None` for `null`.
fn ms_of(j: &serde_json::Value, key: &str) -> Option<f64> {
    match &j[key] {
        serde_json::Value::Null => None,
        v => Some(
            v.as_f64()
                .unwrap_or_else(|| panic!("{key} is a number: {j}")),
        ),
    }
}

#[test]
fn disk_only_snapshot_of_a_running_domain_reports_its_stall() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, state) = (tmp.path(), tmp.path().join("state"));
    let mut disks = String::new();
    for dev in ["vda", "vdb"] {
        let p = dir.join(format!("{dev}.qcow2"));
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&p)
            .arg("32M")
            .status()
            .expect("qemu-img");
        assert!(st.success());
        disks.push_str(&format!(
            "    <disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2'/>\n      \
             <source file='{}'/>\n      <target dev='{dev}' bus='virtio'/>\n    </disk>\n",
            p.display()
        ));
    }
    // No guest OS: the vCPU idles in the firmware; the disks are attached all the same.
    let xml = format!(
        "<domain type='kvm'>\n  <name>live1</name>\n  <memory unit='MiB'>128</memory>\n  \
         <vcpu>1</vcpu>\n  <os>\n    <type arch='x86_64' machine='q35'>hvm</type>\n  </os>\n  \
         <devices>\n{disks}  </devices>\n</domain>\n"
    );
    let st = &state;
    ok(st, &["define", &write(dir, "live1.xml", &xml)]);
    ok(st, &["start", "live1"]);
    let _destroy = Destroy(st, "live1");
    let j = ok_json(
        st,
        &[
            "snapshot-create-as",
            "live1",
            "s1",
            "--disk-only",
            "--atomic",
        ],
    );
    assert_eq!(j["name"], "s1", "{j}");
    assert_eq!(j["redefined"], false, "{j}");
    let stall = ms_of(&j, "stall-ms").expect("a disk-only snapshot of a running domain stalls");
    assert!(stall > 0.0 && stall < 10_000.0, "{j}");
    // Microsecond resolution: not rounded to whole milliseconds.
    assert!(
        (stall * 1000.0 - (stall * 1000.0).round()).abs() < 1e-6,
        "{j}"
    );
    // No pause is needed for overlays alone (the stall is the transaction).
    assert!(ms_of(&j, "paused-ms").is_none_or(|p| p < 50.0), "{j}");
    assert!(ms_of(&j, "frozen-ms").is_none(), "{j}");
    assert!(j["memory-downtime-ms"].is_null(), "{j}");
    let top = ok(st, &["domblklist", "live1"]);
    assert!(top.contains("vda.s1"), "vda is on its overlay: {top}");
    // A redefinition captures nothing: its timings are null.
    let x = ok(st, &["snapshot-dumpxml", "live1", "s1"]);
    let f = write(
        dir,
        "s1.xml",
        &x.replace("<name>s1</name>", "<name>s1b</name>"),
    );
    let j = ok_json(st, &["snapshot-create", "live1", &f, "--redefine"]);
    assert_eq!(j["redefined"], true, "{j}");
    assert!(j["stall-ms"].is_null() && j["paused-ms"].is_null(), "{j}");
}
