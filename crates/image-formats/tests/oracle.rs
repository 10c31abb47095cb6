//! Oracle tests: qemu-img generates images across the options `qemu-img create`, `snapshot`
//! and `bitmap` accept; our JSON must carry every field qemu-img prints with the same value.

use image_formats::{backing_chain, ChainOptions, ErrorKind, Format, ImageInfo, ProbePolicy};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use testbed::{qemu_img, qemu_img_in};

const HINT: &str = "run `cargo xtask deps` (installs QEMU 10.0.2)";

fn qemu_json(args: &[&str]) -> Value {
    serde_json::from_str(&qemu_img(args)).expect("qemu-img prints JSON")
}

/// Every field qemu-img prints must be in ours with the same value (ours may have more).
fn assert_superset(ours: &Value, theirs: &Value, at: &str) {
    match (ours, theirs) {
        (Value::Object(o), Value::Object(t)) => {
            for (k, tv) in t {
                let ov = o
                    .get(k)
                    .unwrap_or_else(|| panic!("{at}: we lack field {k:?} (qemu-img: {tv})"));
                assert_superset(ov, tv, &format!("{at}.{k}"));
            }
        }
        (Value::Array(o), Value::Array(t)) => {
            assert_eq!(o.len(), t.len(), "{at}: array lengths differ");
            for (i, (ov, tv)) in o.iter().zip(t).enumerate() {
                assert_superset(ov, tv, &format!("{at}[{i}]"));
            }
        }
        _ => assert_eq!(ours, theirs, "{at}: values differ"),
    }
}

fn check(path: &Path) -> ImageInfo {
    let p = path.to_str().unwrap();
    let theirs = qemu_json(&["info", "--output=json", p]);
    let info = ImageInfo::open(path, None).expect("we read the image");
    assert_superset(&info.to_json(), &theirs, p);
    // The streaming serializer writes the same document.
    assert_eq!(serde_json::to_value(info.json()).unwrap(), info.to_json());
    info
}

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("img-oracle-")
        .tempdir()
        .unwrap()
}

fn create(dir: &Path, name: &str, opts: &str, size: &str) -> PathBuf {
    let p = dir.join(name);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    let ps = p.to_str().unwrap().to_string();
    args.push(&ps);
    args.push(size);
    qemu_img(&args);
    p
}

#[test]
fn versions_cluster_sizes_and_refcount_widths() {
    let d = tmp();
    let mut n = 0;
    for compat in ["0.10", "1.1"] {
        for cluster in ["512", "4096", "65536", "2M"] {
            let p = create(
                d.path(),
                &format!("c{n}.qcow2"),
                &format!("compat={compat},cluster_size={cluster}"),
                "100M",
            );
            n += 1;
            let info = check(&p);
            assert_eq!(info.format(), Format::Qcow2);
        }
    }
    for bits in [1, 2, 4, 8, 16, 32, 64] {
        let p = create(
            d.path(),
            &format!("r{bits}.qcow2"),
            &format!("refcount_bits={bits}"),
            "1G",
        );
        let info = check(&p);
        assert_eq!(info.qcow2().unwrap().header.refcount_bits(), bits);
    }
}

#[test]
fn extended_l2_compression_lazy_refcounts() {
    let d = tmp();
    for (i, opts) in [
        "extended_l2=on,cluster_size=16384",
        "extended_l2=on",
        "extended_l2=on,cluster_size=2M",
        "compression_type=zstd",
        "compression_type=zlib",
        "lazy_refcounts=on",
        "lazy_refcounts=on,extended_l2=on,compression_type=zstd,refcount_bits=8",
        "preallocation=metadata",
    ]
    .iter()
    .enumerate()
    {
        let p = create(d.path(), &format!("x{i}.qcow2"), opts, "64M");
        check(&p);
    }
}

#[test]
fn odd_sizes_and_raw() {
    let d = tmp();
    let p = create(d.path(), "small.qcow2", "", "1536");
    check(&p);
    let raw = d.path().join("odd.raw");
    std::fs::write(&raw, vec![0u8; 1000]).unwrap();
    assert_eq!(check(&raw).format(), Format::Raw);
    let empty = d.path().join("empty.raw");
    std::fs::write(&empty, b"").unwrap();
    check(&empty);
    let r = d.path().join("r.raw");
    qemu_img(&["create", "-q", "-f", "raw", r.to_str().unwrap(), "10M"]);
    check(&r);
}

#[test]
fn dirty_and_corrupt_bits() {
    let d = tmp();
    let p = create(d.path(), "dirty.qcow2", "lazy_refcounts=on", "16M");
    // qemu-io aborts without closing: with lazy refcounts the dirty bit stays set.
    let out = Command::new("qemu-io")
        .args(["-c", "write 0 64k", "-c", "abort", p.to_str().unwrap()])
        .output()
        .unwrap_or_else(|e| panic!("cannot run qemu-io ({e}): {HINT}"));
    assert!(
        !out.status.success(),
        "qemu-io abort should not exit cleanly"
    );
    let info = check(&p);
    assert!(info.dirty(), "the dirty bit is set after an abort");

    let c = create(d.path(), "corrupt.qcow2", "", "16M");
    let mut bytes = std::fs::read(&c).unwrap();
    bytes[79] |= 2; // incompatible feature bit 1: corrupt
    std::fs::write(&c, bytes).unwrap();
    let info = check(&c);
    assert!(info.qcow2().unwrap().header.is_corrupt());
}

#[test]
fn backing_chains_relative_paths_and_formats() {
    let d = tmp();
    let dir = d.path();
    std::fs::create_dir(dir.join("sub")).unwrap();
    qemu_img_in(
        Some(dir),
        &["create", "-q", "-f", "raw", "sub/base.raw", "8M"],
    );
    qemu_img_in(
        Some(dir),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "sub/mid.qcow2",
        ],
    );
    qemu_img_in(
        Some(dir),
        &[
            "create",
            "-q",
            "-f",
            "qed",
            "-b",
            "sub/mid.qcow2",
            "-F",
            "qcow2",
            "mid2.qed",
        ],
    );
    qemu_img_in(
        Some(dir),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid2.qed",
            "-F",
            "qed",
            "top.qcow2",
        ],
    );
    let top = dir.join("top.qcow2");
    let mid = dir.join("sub/mid.qcow2");
    let info = check(&top);
    assert_eq!(info.backing_format().as_deref(), Some("qed"));
    let info = check(&mid);
    assert_eq!(
        info.full_backing_filename().unwrap(),
        dir.join("sub/base.raw").to_str().unwrap()
    );
    check(&dir.join("mid2.qed"));

    // The QED overlay does not record its backing file's format (qcow2): refused by default.
    let err = backing_chain(&top, None, ChainOptions::default()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ProbeRefused, "{err}");
    assert!(err.to_string().contains("refusing to probe"), "{err}");

    // With probing allowed the chain matches qemu-img's --backing-chain array.
    let opts = ChainOptions {
        probe: ProbePolicy::Allow,
        ..ChainOptions::default()
    };
    let chain = backing_chain(&top, None, opts).unwrap();
    assert_eq!(chain.len(), 4);
    let theirs = qemu_json(&[
        "info",
        "--backing-chain",
        "--output=json",
        top.to_str().unwrap(),
    ]);
    let ours = Value::Array(chain.iter().map(ImageInfo::to_json).collect());
    assert_superset(&ours, &theirs, "chain");

    // A chain where every format is recorded needs no probing.
    let chain = backing_chain(&mid, None, ChainOptions::default()).unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1].format(), Format::Raw);
}

#[test]
fn backing_chain_errors() {
    let d = tmp();
    let dir = d.path();
    // Missing backing file: a clear error naming the chain so far.
    let a = dir.join("a.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "gone.qcow2",
        "-F",
        "qcow2",
        a.to_str().unwrap(),
        "1M",
    ]);
    let err = backing_chain(&a, None, ChainOptions::default()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BackingMissing);
    let msg = err.to_string();
    assert!(
        msg.contains("gone.qcow2") && msg.contains("a.qcow2"),
        "{msg}"
    );

    // A loop: x -> y -> x.
    let x = dir.join("x.qcow2");
    let y = dir.join("y.qcow2");
    for (img, back) in [(&x, "y.qcow2"), (&y, "x.qcow2")] {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            back,
            "-F",
            "qcow2",
            img.to_str().unwrap(),
            "1M",
        ]);
    }
    let err = backing_chain(&x, None, ChainOptions::default()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BackingLoop, "{err}");

    // Depth limit.
    let mut prev = dir.join("l0.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", prev.to_str().unwrap(), "1M"]);
    for i in 1..5 {
        let p = dir.join(format!("l{i}.qcow2"));
        let back = format!("l{}.qcow2", i - 1);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &back,
            "-F",
            "qcow2",
            p.to_str().unwrap(),
        ]);
        prev = p;
    }
    let opts = ChainOptions {
        max_depth: 3,
        ..ChainOptions::default()
    };
    let err = backing_chain(&prev, None, opts).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ChainTooDeep, "{err}");
    assert_eq!(
        backing_chain(&prev, None, ChainOptions::default())
            .unwrap()
            .len(),
        5
    );
}

#[test]
fn data_files_and_bitmaps() {
    let d = tmp();
    let dir = d.path();
    for (i, raw) in ["on", "off"].iter().enumerate() {
        let p = dir.join(format!("df{i}.qcow2"));
        let data = format!("df{i}.data");
        qemu_img_in(
            Some(dir),
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("data_file={data},data_file_raw={raw}"),
                p.to_str().unwrap(),
                "8M",
            ],
        );
        let info = check(&p);
        assert!(info.qcow2().unwrap().has_data_file());
    }
    let p = create(dir, "bm.qcow2", "cluster_size=16384", "64M");
    let ps = p.to_str().unwrap();
    qemu_img(&["bitmap", "--add", ps, "bm0"]);
    qemu_img(&["bitmap", "--add", "--disable", "-g", "65536", ps, "bm1"]);
    qemu_img(&["bitmap", "--add", "-g", "1M", ps, "b\u{e9}tmap \u{1f600}"]);
    let info = check(&p);
    let q = info.qcow2().unwrap();
    assert_eq!(q.bitmaps.len(), 3);
    assert_eq!(q.bitmaps[1].flag_names(), Vec::<&str>::new());
    assert_eq!(q.bitmaps[2].granularity(), 1 << 20);
}

#[test]
fn hundreds_of_snapshots_with_long_repeated_and_non_ascii_names() {
    let d = tmp();
    let p = create(d.path(), "snaps.qcow2", "", "32M");
    let ps = p.to_str().unwrap();
    let long = "L".repeat(300); // qemu-img truncates names to 255 bytes
    let mut names: Vec<String> = Vec::new();
    for i in 0..250 {
        let name = match i % 5 {
            0 => format!("snap-{i}"),
            1 => "repeated".to_string(),
            2 => format!("\u{e9}t\u{e9} \u{65e5}\u{672c} \u{1f600} {i}"),
            3 => long.clone(),
            _ => format!("with spaces and \"quotes\" {i}"),
        };
        if i == 100 {
            // Some guest data and a changed size partway through.
            Command::new("qemu-io")
                .args(["-c", "write -P 0xab 0 1M", ps])
                .output()
                .unwrap();
            qemu_img(&["resize", "-q", ps, "64M"]);
        }
        qemu_img(&["snapshot", "-c", &name, ps]);
        names.push(name);
    }
    // Deleting some leaves gaps in the ids.
    qemu_img(&["snapshot", "-d", "snap-5", ps]);
    qemu_img(&["snapshot", "-d", "snap-10", ps]);
    let info = check(&p);
    assert_eq!(info.snapshots().len(), 248);
    let first = &info.snapshots()[0];
    assert_eq!(first.name, names[0].as_bytes());
    let long_one = info
        .snapshots()
        .iter()
        .find(|s| s.name.len() > 200)
        .unwrap();
    assert_eq!(
        long_one.name.len(),
        255,
        "qemu-img truncates names to 255 bytes"
    );
}

#[test]
fn qed_images() {
    let d = tmp();
    let dir = d.path();
    qemu_img_in(Some(dir), &["create", "-q", "-f", "raw", "b.raw", "4M"]);
    for (name, args) in [
        ("plain.qed", vec!["-o", "cluster_size=4096,table_size=2"]),
        ("big.qed", vec!["-o", "cluster_size=1M,table_size=16"]),
        ("raw-backed.qed", vec!["-b", "b.raw", "-F", "raw"]),
        ("no-format.qed", vec!["-u", "-b", "b.raw", "-F", "qcow2"]),
    ] {
        let mut a = vec!["create", "-q", "-f", "qed"];
        a.extend(args);
        a.push(name);
        a.push("8M");
        qemu_img_in(Some(dir), &a);
        let info = check(&dir.join(name));
        assert_eq!(info.format(), Format::Qed);
    }
    // The need-check bit: qemu-img still reports "dirty-flag": false.
    let p = dir.join("raw-backed.qed");
    let mut b = std::fs::read(&p).unwrap();
    b[16] |= 0x02;
    std::fs::write(&p, b).unwrap();
    let info = check(&p);
    assert!(
        matches!(&info.details, image_formats::info::Details::Qed(q) if q.header.needs_check())
    );

    // qemu-img creates QED images with one-cluster tables that QEMU itself refuses to open
    // ("QED table offset is invalid"): we refuse them the same way.
    qemu_img_in(
        Some(dir),
        &[
            "create",
            "-q",
            "-f",
            "qed",
            "-o",
            "table_size=1",
            "one.qed",
            "8M",
        ],
    );
    let out = Command::new("qemu-img")
        .args(["info", "one.qed"])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = ImageInfo::open(&dir.join("one.qed"), None).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid);
    assert!(
        err.to_string().contains("QED table offset is invalid"),
        "{err}"
    );
}

#[test]
fn reads_an_image_a_running_qemu_holds() {
    let d = tmp();
    let p = create(d.path(), "held.qcow2", "", "64M");
    qemu_img(&["snapshot", "-c", "before-boot", p.to_str().unwrap()]);
    let expected = qemu_json(&["info", "--output=json", p.to_str().unwrap()]);
    let qemu = testbed::Qemu::builder()
        .existing_disk("d0", testbed::DiskFormat::Qcow2, &p)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start QEMU: {e}"));
    // qemu-img without -U is refused because QEMU holds the image's write lock...
    let out = Command::new("qemu-img")
        .args(["info", p.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "qemu-img info should hit QEMU's lock"
    );
    // ...we take no lock and read it.
    let info = ImageInfo::open(&p, None).unwrap();
    let mut ours = info.to_json();
    // A running QEMU has the image open: qcow2 v3 sets the dirty bit only with lazy
    // refcounts, so the header matches what qemu-img printed before QEMU started.
    if let (Some(o), Some(e)) = (ours.as_object_mut(), expected.as_object()) {
        o.insert("actual-size".into(), e["actual-size"].clone());
        if let Some(c) = o.get_mut("children") {
            *c = e["children"].clone();
        }
    }
    assert_superset(&ours, &expected, "held");
    assert_eq!(info.snapshots().len(), 1);
    drop(qemu);
}

#[test]
fn luks_encrypted_images() {
    let d = tmp();
    for (i, extra) in [
        "",
        ",encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256",
    ]
    .iter()
    .enumerate()
    {
        let p = d.path().join(format!("enc{i}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=sec0,data=123456",
            "-o",
            &format!("encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10{extra}"),
            p.to_str().unwrap(),
            "4M",
        ]);
        let info = check(&p);
        assert!(info.encrypted());
        assert!(info.qcow2().unwrap().luks.is_some());
    }
}

/// A minimal synchronous QMP exchange: greeting, capabilities, then `cmd`.
fn qmp(sock: &Path, cmds: &[&str]) -> Vec<Value> {
    use std::io::{BufRead, BufReader, Write};
    let s = std::os::unix::net::UnixStream::connect(sock).expect("connect to QMP");
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let mut line = String::new();
    let mut read_reply = |r: &mut BufReader<_>| loop {
        line.clear();
        r.read_line(&mut line).expect("QMP reply");
        let v: Value = serde_json::from_str(&line).expect("QMP JSON");
        if v.get("return").is_some() || v.get("error").is_some() || v.get("QMP").is_some() {
            return v;
        }
    };
    read_reply(&mut r);
    let mut out = Vec::new();
    for c in std::iter::once(r#"{"execute":"qmp_capabilities"}"#).chain(cmds.iter().copied()) {
        writeln!(w, "{c}").unwrap();
        out.push(read_reply(&mut r));
    }
    out
}

#[test]
fn snapshots_with_vm_state_from_a_running_qemu() {
    let d = tmp();
    let p = create(d.path(), "vm.qcow2", "", "64M");
    let qemu = testbed::Qemu::builder()
        .existing_disk("d0", testbed::DiskFormat::Qcow2, &p)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start QEMU: {e}"));
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let replies = qmp(
        qemu.qmp_path(),
        &[
            r#"{"execute":"human-monitor-command","arguments":{"command-line":"savevm with-state"}}"#,
            r#"{"execute":"human-monitor-command","arguments":{"command-line":"savevm second"}}"#,
        ],
    );
    for r in &replies {
        assert!(r.get("error").is_none(), "{r}");
        if let Some(s) = r["return"].as_str() {
            assert!(s.is_empty(), "savevm said: {s}");
        }
    }
    // QEMU holds the image: qemu-img needs -U (force share); we need nothing.
    let theirs = qemu_json(&["info", "-U", "--output=json", p.to_str().unwrap()]);
    let info = ImageInfo::open(&p, None).unwrap();
    assert_superset(&info.to_json(), &theirs, "running");
    let s = &info.snapshots()[0];
    assert!(s.vm_state_size() > 0, "savevm stores VM state");
    assert!(s.vm_clock_nsec > 0, "the guest clock ran");
    drop(qemu);
}

#[test]
fn snapshots_on_v2_and_tiny_clusters() {
    let d = tmp();
    for (i, opts) in [
        "compat=0.10,cluster_size=512",
        "cluster_size=512,refcount_bits=1",
    ]
    .iter()
    .enumerate()
    {
        let p = create(d.path(), &format!("s{i}.qcow2"), opts, "1M");
        let ps = p.to_str().unwrap();
        for name in ["a", "b", "c"] {
            qemu_img(&["snapshot", "-c", name, ps]);
        }
        qemu_img(&["snapshot", "-d", "a", ps]);
        let info = check(&p);
        assert_eq!(info.snapshots().len(), 2);
        assert_eq!(info.snapshots()[0].id, b"2");
    }
}

/// A loop device over a file, detached on drop.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn images_on_block_devices() {
    let d = tmp();
    let p = create(d.path(), "dev.qcow2", "", "64M");
    qemu_img(&["snapshot", "-c", "on-a-device", p.to_str().unwrap()]);
    // Loop devices cover whole 4 KiB blocks: pad the file so the snapshot table is inside.
    let len = std::fs::metadata(&p).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(len.div_ceil(4096) * 4096).unwrap();
    let out = Command::new("losetup")
        .args(["--find", "--show", "--read-only", p.to_str().unwrap()])
        .output()
        .unwrap_or_else(|e| panic!("cannot run losetup ({e}): install util-linux (root needed)"));
    assert!(
        out.status.success(),
        "losetup failed (loop devices need root): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dev = Loop(String::from_utf8(out.stdout).unwrap().trim().to_string());
    let info = check(Path::new(&dev.0));
    assert!(info.block_device);
    assert_eq!(info.snapshots().len(), 1);
}
