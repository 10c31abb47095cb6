//! What is not an image is refused at once: FIFOs, sockets, directories, character devices
//! and symlink loops given as an image, a backing file or a file to write, each answered
//! within a second with `InvalidInput` saying what the path is. Block devices are images.

use image_formats::qcow2_write::{create, CreateOptions, SnapshotEditor};
use image_formats::{backing_chain, ChainOptions, ErrorKind, FileStorage, Format, ImageInfo};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

/// Run `f` on a thread; fail the test if it has not answered within a second (a blocked
/// open(2) on a FIFO would never answer; the thread is left behind).
fn within_a_second<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(1))
        .unwrap_or_else(|_| panic!("{what}: no answer within a second (blocked?)"))
}

fn mkfifo(p: &Path) {
    let st = Command::new("mkfifo").arg(p).status().unwrap();
    assert!(st.success());
}

/// Every kind of non-file, with the words its error must contain. The socket's listener is
/// returned to keep it bound.
fn non_files(
    dir: &Path,
) -> (
    Vec<(PathBuf, &'static str)>,
    std::os::unix::net::UnixListener,
) {
    let fifo = dir.join("fifo");
    mkfifo(&fifo);
    let sock = dir.join("sock");
    let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let sub = dir.join("subdir");
    std::fs::create_dir(&sub).unwrap();
    let lp = dir.join("loop");
    std::os::unix::fs::symlink("loop", &lp).unwrap();
    (
        vec![
            (fifo, "is a FIFO, not a regular file or block device"),
            (sock, "is a socket, not a regular file or block device"),
            (sub, "is a directory, not a regular file or block device"),
            (
                PathBuf::from("/dev/null"),
                "is a character device, not a regular file or block device",
            ),
            (lp, "symlink loop"),
        ],
        l,
    )
}

#[test]
fn non_files_are_refused_as_images() {
    let d = tempfile::tempdir().unwrap();
    let (cases, _l) = non_files(d.path());
    for (p, words) in cases {
        for fmt in [None, Some(Format::Raw), Some(Format::Qcow2)] {
            let q = p.clone();
            let e = within_a_second(&format!("info {p:?}"), move || {
                ImageInfo::open(&q, fmt).unwrap_err()
            });
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{p:?}: {e}");
            assert!(e.to_string().contains(words), "{p:?}: {e}");
            assert_eq!(e.path(), Some(p.as_path()));

            let q = p.clone();
            let e = within_a_second(&format!("chain {p:?}"), move || {
                backing_chain(&q, fmt, ChainOptions::default()).unwrap_err()
            });
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{p:?}: {e}");
            assert!(e.to_string().contains(words), "{p:?}: {e}");
        }
        let q = p.clone();
        let e = within_a_second(&format!("open rw {p:?}"), move || {
            FileStorage::open_read_write(&q).unwrap_err()
        });
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{p:?}: {e}");
        assert!(e.to_string().contains(words), "{p:?}: {e}");
    }
}

#[test]
fn non_files_are_refused_as_backing_files() {
    let d = tempfile::tempdir().unwrap();
    let (cases, _l) = non_files(d.path());
    for (p, words) in cases {
        for bfmt in ["raw", "qcow2"] {
            let top = d.path().join("top.qcow2");
            let _ = std::fs::remove_file(&top);
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&top)
                .unwrap();
            let opts = CreateOptions {
                size: 1 << 20,
                backing_file: Some(p.as_os_str().as_encoded_bytes().to_vec()),
                backing_format: Some(bfmt.as_bytes().to_vec()),
            };
            create(&FileStorage::from_file(f), &opts).unwrap();
            // The top alone reads fine: the backing file is only named.
            ImageInfo::open(&top, Some(Format::Qcow2)).unwrap();
            let t = top.clone();
            let e = within_a_second(&format!("chain with backing {p:?}"), move || {
                backing_chain(&t, Some(Format::Qcow2), ChainOptions::default()).unwrap_err()
            });
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{p:?}: {e}");
            let msg = e.to_string();
            assert!(msg.contains(words), "{p:?}: {msg}");
            assert!(msg.contains(&*p.to_string_lossy()), "{p:?}: {msg}");
            assert!(msg.contains("chain so far: "), "{p:?}: {msg}");
        }
    }
}

#[test]
fn a_directory_is_not_a_4k_raw_backing_file() {
    let d = tempfile::tempdir().unwrap();
    let sub = d.path().join("dir");
    std::fs::create_dir(&sub).unwrap();
    let top = d.path().join("top.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-u", "-b"])
        .arg(&sub)
        .args(["-F", "raw"])
        .arg(&top)
        .arg("1M")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e = backing_chain(&top, Some(Format::Qcow2), ChainOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("is a directory"), "{e}");
}

#[test]
fn writing_never_opens_a_fifo() {
    let d = tempfile::tempdir().unwrap();
    let fifo = d.path().join("fifo");
    mkfifo(&fifo);
    let f = fifo.clone();
    let e = within_a_second("snapshot editor on a FIFO", move || {
        FileStorage::open_read_write(&f)
            .map(SnapshotEditor::open)
            .unwrap_err()
    });
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
    // The FIFO is still there, still a FIFO.
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
}

#[test]
fn regular_files_and_block_devices_are_images() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("a.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("1M")
        .output()
        .unwrap();
    assert!(out.status.success());
    // Through a symlink too.
    let link = d.path().join("link");
    std::os::unix::fs::symlink(&img, &link).unwrap();
    assert_eq!(
        ImageInfo::open(&link, None).unwrap().format(),
        Format::Qcow2
    );
    // The flag set to open without blocking is cleared again.
    let f = image_formats::open_image_file(&img, true).unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: F_GETFL on an open descriptor.
    let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
    assert_eq!(flags & libc::O_NONBLOCK, 0, "O_NONBLOCK left set");

    let fs = testbed::Btrfs::new(128).unwrap();
    let dev = PathBuf::from(fs.loop_device());
    let info = ImageInfo::open(&dev, Some(Format::Raw)).unwrap();
    assert_eq!(info.virtual_size(), 128 << 20);
    assert_eq!(info.protocol(), "host_device");
}
