//! Property tests: every spelling of a volume's path (symlinks, `.`, `..`, relative paths,
//! symlinked base directories) resolves to one key, so one lease file.

use locking::{canonical_path, Resource};
use proptest::prelude::*;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// T/real/sub/{img.qcow2, deeper/}, T/link -> real, T/chain -> link, T/abs -> T/real/sub
/// (absolute), T/real/sub/up -> .. (relative, to T/real).
fn tree() -> &'static Path {
    static T: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &T.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        let t = std::fs::canonicalize(d.path()).unwrap();
        std::fs::create_dir_all(t.join("real/sub/deeper")).unwrap();
        std::fs::write(t.join("real/sub/img.qcow2"), b"QFI\xfb").unwrap();
        std::os::unix::fs::symlink("real", t.join("link")).unwrap();
        std::os::unix::fs::symlink("link", t.join("chain")).unwrap();
        std::os::unix::fs::symlink(t.join("real/sub"), t.join("abs")).unwrap();
        std::os::unix::fs::symlink("..", t.join("real/sub/up")).unwrap();
        (d, t)
    })
    .1
}

/// Spellings of T/real/sub, relative to T.
const SUB: &[&str] = &[
    "real/sub",
    "link/sub",
    "chain/sub",
    "abs",
    "real/sub/up/sub",
    "abs/up/sub",
    "link/sub/deeper/..",
    "chain/sub/up/sub/deeper/../up/sub",
    "real/./sub",
    "abs/deeper/../../sub",
];

/// (base directory, prefix that leads from it to T).
fn bases(t: &Path) -> Vec<(PathBuf, String)> {
    vec![
        (PathBuf::from("/"), format!("{}/", t.display())),
        (t.to_path_buf(), String::new()),
        (t.join("real/sub/deeper"), "../../../".into()),
        // A symlinked base: `..` from T/link is the parent of its target T/real, i.e. T.
        (t.join("link"), "../".into()),
        (t.join("abs"), "../../".into()),
    ]
}

fn noisy(path: &str, dots: &[bool], doubles: &[bool]) -> String {
    let mut out = String::new();
    let last = path.split('/').count() - 1;
    for (i, part) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
            if doubles.get(i).copied().unwrap_or(false) {
                out.push('/');
            }
        }
        out.push_str(part);
        // Not after the file name: `img.qcow2/.` is ENOTDIR for the kernel.
        if i < last && dots.get(i).copied().unwrap_or(false) && !part.is_empty() {
            out.push_str("/.");
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn every_spelling_resolves_to_one_key(
        sub in 0..SUB.len(),
        base in 0..5usize,
        new_file in any::<bool>(),
        dots in proptest::collection::vec(any::<bool>(), 12),
        doubles in proptest::collection::vec(any::<bool>(), 12),
    ) {
        let t = tree();
        let file = if new_file { "new.qcow2" } else { "img.qcow2" };
        let (base_dir, prefix) = &bases(t)[base];
        let spelled = format!("{prefix}{}", noisy(&format!("{}/{file}", SUB[sub]), &dots, &doubles));
        let want = t.join("real/sub").join(file);
        let key = Resource::file(&spelled).key_from(base_dir).unwrap();
        prop_assert_eq!(key.canonical(), want.as_os_str().as_bytes(), "{} from {}", spelled, base_dir.display());
        let reference = Resource::file(&want).key_from(Path::new("/")).unwrap();
        prop_assert_eq!(key.hash(), reference.hash());
        if !new_file {
            // The kernel agrees for paths that exist.
            let kernel = std::fs::canonicalize(base_dir.join(&spelled)).unwrap();
            prop_assert_eq!(kernel, want);
        }
    }

    #[test]
    fn canonical_paths_are_absolute_clean_and_fixed_points(
        parts in proptest::collection::vec(
            prop::sample::select(vec!["real", "sub", "link", "chain", "abs", "up", "deeper",
                                      "..", ".", "x", "img.qcow2"]),
            0..10),
        relative in any::<bool>(),
    ) {
        let t = tree();
        let joined = parts.join("/");
        let spelled = if relative { joined.clone() } else { format!("{}/{joined}", t.display()) };
        if spelled.is_empty() {
            return Ok(());
        }
        let c = canonical_path(t, Path::new(&spelled)).unwrap();
        prop_assert!(c.is_absolute());
        prop_assert!(c.components().all(|x| matches!(x,
            std::path::Component::RootDir | std::path::Component::Normal(_))), "{:?}", c);
        prop_assert_eq!(canonical_path(Path::new("/"), &c).unwrap(), c.clone());
        // No component of the result that exists is a symlink.
        let mut p = PathBuf::from("/");
        for comp in c.components().skip(1) {
            p.push(comp);
            if let Ok(m) = std::fs::symlink_metadata(&p) {
                prop_assert!(!m.file_type().is_symlink(), "{:?} in {:?}", p, c);
            }
        }
    }

    #[test]
    fn hostile_paths_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = canonical_path(tree(), Path::new(OsStr::from_bytes(&bytes)));
        let _ = Resource::file(OsStr::from_bytes(&bytes)).key_from(tree());
    }
}

#[test]
fn relative_paths_resolve_against_the_current_directory() {
    let t = tree();
    let cwd = std::fs::canonicalize(std::env::current_dir().unwrap()).unwrap();
    let ups = "../".repeat(cwd.components().count() - 1);
    let rel = format!(
        "{ups}{}/link/sub/img.qcow2",
        t.display().to_string().trim_start_matches('/')
    );
    let k = Resource::file(&rel).key().unwrap();
    assert_eq!(
        k.canonical(),
        t.join("real/sub/img.qcow2").as_os_str().as_bytes()
    );
    assert_eq!(k.image(), Some(t.join("real/sub/img.qcow2").as_path()));
}
