//! The escape fuzzer: generated scripts of hostile filesystem calls (`..`, absolute paths,
//! symlinks the guest makes, long and odd names, NUL bytes through raw `path_open`, renames
//! and links across preopens) run by the `fsops` guest under `bulwark run`, with one
//! directory preopened read-only and one read-write. After every script the host holds it
//! against the model of what those preopens allow:
//!
//! - nothing the guest printed comes from outside the preopens (the files and entry names
//!   out there carry tokens that appear nowhere else; `/etc/passwd`'s first line too);
//! - nothing outside the read-write directory changed: every file, directory and link
//!   under the scratch root keeps its type, size, content, mode, link count, mtime and
//!   link target (the read-only directory included), and nothing is added there;
//! - the guest ended as the contract says (exit 0: `fsops` reports failed calls, it does
//!   not die of them), never a host panic.
//!
//! Two more tests plant a flaw (the read-only directory granted read-write; the scratch
//! root granted as well) and require the fuzzer to find it, so the model is known to catch
//! the escapes it is meant to.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bulwark_fuzz::{Result, Unstructured, fuzz, pick, search};
use sha2::{Digest, Sha256};

/// Content of the file outside the preopens.
const SECRET: &str = "BWK-SECRET-OUTSIDE-7f3a";
/// Name of an entry outside the preopens (in `outside/`).
const OUTSIDE_ENTRY: &str = "bwk-outside-entry-91c2";
/// Name of an entry in the scratch root, next to the preopens.
const PARENT_ENTRY: &str = "bwk-parent-entry-5d07";
/// The start of /etc/passwd.
const PASSWD: &str = "root:x:0:0";

/// The scratch tree: `<root>/top/{outside,ro,rw}`; `ro` and `rw` are preopened.
struct Tree {
    _temp: tempfile::TempDir,
    root: PathBuf,
    top: PathBuf,
}

impl Tree {
    fn new() -> Tree {
        let temp = tempfile::tempdir().expect("a temp dir");
        let root = temp.path().to_owned();
        let top = root.join("top");
        let write = |path: &Path, text: &str| std::fs::write(path, text).expect("write");
        for dir in ["top/outside/sub", "top/ro/sub", "top/rw/sub"] {
            std::fs::create_dir_all(root.join(dir)).expect("mkdir");
        }
        write(&root.join(PARENT_ENTRY), SECRET);
        write(&top.join(PARENT_ENTRY), SECRET);
        write(&top.join("outside/secret.txt"), SECRET);
        write(&top.join("outside").join(OUTSIDE_ENTRY), SECRET);
        write(&top.join("outside/sub/secret.txt"), SECRET);
        for dir in ["ro", "rw"] {
            write(&top.join(dir).join("file.txt"), "inside\n");
            write(&top.join(dir).join("sub/inner.txt"), "inner\n");
            let link = |target: &str, name: &str| {
                std::os::unix::fs::symlink(target, top.join(dir).join(name)).expect("symlink")
            };
            link("../outside", "link-out");
            link("../outside/secret.txt", "link-secret");
            link("/etc/passwd", "abs");
            link("sub", "link-in");
        }
        Tree {
            _temp: temp,
            root,
            top,
        }
    }

    /// Everything below the scratch root except the read-write directory.
    fn snapshot(&self) -> BTreeMap<PathBuf, String> {
        let mut entries = BTreeMap::new();
        let skip = self.top.join("rw");
        walk(&self.root, &skip, &mut entries);
        entries
    }
}

fn walk(dir: &Path, skip: &Path, entries: &mut BTreeMap<PathBuf, String>) {
    let mut children: Vec<_> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").path())
        .collect();
    children.sort();
    for path in children {
        if path == skip {
            continue;
        }
        let meta = std::fs::symlink_metadata(&path).expect("lstat");
        let what = if meta.file_type().is_symlink() {
            format!("link -> {:?}", std::fs::read_link(&path).expect("readlink"))
        } else if meta.is_dir() {
            "dir".to_owned()
        } else {
            format!(
                "file {:x}",
                Sha256::digest(std::fs::read(&path).expect("read"))
            )
        };
        entries.insert(
            path.clone(),
            format!(
                "{what} mode {:o} links {} size {} mtime {}.{}",
                meta.permissions().mode(),
                meta.nlink(),
                meta.len(),
                meta.mtime(),
                meta.mtime_nsec()
            ),
        );
        if meta.is_dir() {
            walk(&path, skip, entries);
        }
    }
}

/// Percent-encodes a field for `fsops` (see images/guests/fsops.c).
fn encode(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| {
            if b.is_ascii_alphanumeric() || b"/._-".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A hostile path: a base (a preopen, its parent, outside, the host's root, relative)
/// and components that climb, loop through links, and stretch names.
fn path(u: &mut Unstructured<'_>, top: &Path) -> Result<Vec<u8>> {
    let top = top.display().to_string();
    let bases = [
        format!("{top}/ro"),
        format!("{top}/rw"),
        format!("{top}/rw/sub"),
        format!("{top}/ro/sub"),
        top.clone(),
        format!("{top}/outside"),
        "/".to_owned(),
        "/etc".to_owned(),
        String::new(),
        ".".to_owned(),
        "..".to_owned(),
    ];
    let mut path = bases[u.choose_index(bases.len())?].clone().into_bytes();
    let long = "a".repeat(255);
    let longer = "b".repeat(300);
    let components: [&str; 27] = [
        "..",
        "..",
        ".",
        "",
        "sub",
        "file.txt",
        "inner.txt",
        "link-out",
        "link-secret",
        "abs",
        "link-in",
        "secret.txt",
        "outside",
        "new",
        "x",
        "ro",
        "rw",
        "etc",
        "passwd",
        &long,
        &longer,
        "a\nb",
        " ",
        "%",
        "é",
        "\u{1}",
        "*",
    ];
    for _ in 0..u.int_in_range(0..=4)? {
        if !path.is_empty() {
            path.push(b'/');
        }
        if u.ratio(1, 12)? {
            path.push(b'/');
        }
        path.extend_from_slice(pick(u, &components)?.as_bytes());
    }
    if u.ratio(1, 10)? {
        path.push(b'/');
    }
    Ok(path)
}

/// One `fsops` operation, encoded.
fn operation(u: &mut Unstructured<'_>, top: &Path) -> Result<String> {
    let p = |u: &mut Unstructured<'_>| path(u, top).map(|p| encode(&p));
    let data = |u: &mut Unstructured<'_>| -> Result<String> {
        let bytes: &[u8] = u.arbitrary()?;
        Ok(encode(&bytes[..bytes.len().min(64)]))
    };
    let link_targets = [
        "../outside",
        "../../outside/secret.txt",
        "/etc/passwd",
        "..",
        "/",
        "sub",
        "file.txt",
        "link-out/secret.txt",
    ];
    Ok(match u.int_in_range(0..=18)? {
        0 | 1 => format!("read {}", p(u)?),
        2 => format!("list {}", p(u)?),
        3 | 4 => format!("write {} {}", p(u)?, data(u)?),
        5 => format!("append {} {}", p(u)?, data(u)?),
        6 => format!("mkdir {}", p(u)?),
        7 => format!("rmdir {}", p(u)?),
        8 => format!("unlink {}", p(u)?),
        9 => format!("truncate {}", p(u)?),
        10 => format!("utime {}", p(u)?),
        11 => format!("chdir {}", p(u)?),
        12 => {
            let target = if u.arbitrary()? {
                encode(pick(u, &link_targets)?.as_bytes())
            } else {
                p(u)?
            };
            format!("symlink {target} {}", p(u)?)
        }
        13 => format!("link {} {}", p(u)?, p(u)?),
        14 => format!("rename {} {}", p(u)?, p(u)?),
        15 => format!("readlink {}", p(u)?),
        16 => format!("{} {}", pick(u, &["stat", "lstat"])?, p(u)?),
        _ => {
            // Relative to a preopen's descriptor (3: ro, 4: rw, 5: none), bytes as they are.
            let raw_paths = [
                "../outside/secret.txt",
                "link-out/secret.txt",
                "link-secret",
                "abs",
                "/etc/passwd",
                "..",
                ".",
                "sub/../..",
                "a\0b",
                "file.txt\0/../../outside",
                "new",
                "sub//inner.txt",
            ];
            let raw = if u.arbitrary()? {
                pick(u, &raw_paths)?.as_bytes().to_vec()
            } else {
                path(u, top)?
            };
            format!(
                "raw {} {} {} {}",
                u.int_in_range(3..=5)?,
                encode(&raw),
                u.int_in_range(0..=15)?,
                pick(u, &["r", "w"])?
            )
        }
    })
}

/// How the preopens are granted to the guest (the model always assumes `Grants::AS_MODELLED`).
#[derive(Debug, Clone, Copy)]
struct Grants {
    /// `ro` granted read-write: the read-only check turned off.
    ro_writable: bool,
    /// The scratch root's `top` granted too: the preopen boundary turned off.
    top_granted: bool,
}

impl Grants {
    const AS_MODELLED: Grants = Grants {
        ro_writable: false,
        top_granted: false,
    };
}

struct Runner {
    bulwark: PathBuf,
    fsops: PathBuf,
    cache: tempfile::TempDir,
    config: PathBuf,
}

impl Runner {
    fn new() -> Runner {
        let bulwark = bulwark_tests::harness::node::bulwark_binary().expect("run `make build`");
        let fsops = bulwark_tests::build_dir().join("guests/fsops.wasm");
        assert!(
            fsops.exists(),
            "{} is missing: run `make guests`",
            fsops.display()
        );
        let cache = tempfile::tempdir().expect("a temp dir");
        // No ceilings, no defaults: the grants alone decide.
        let config = cache.path().join("config.toml");
        std::fs::write(&config, "").expect("config");
        Runner {
            bulwark,
            fsops,
            cache,
            config,
        }
    }

    /// Runs one generated script and holds it against the model.
    fn check(&self, u: &mut Unstructured<'_>, grants: Grants) -> Result<()> {
        let tree = Tree::new();
        let script = (0..u.int_in_range(1..=16)?)
            .map(|_| operation(u, &tree.top))
            .collect::<Result<Vec<_>>>()?;
        let before = tree.snapshot();
        let top = tree.top.display().to_string();
        let mut command = Command::new(&self.bulwark);
        command
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .arg("--cache-dir")
            .arg(self.cache.path().join("modules"))
            .arg("--dir")
            .arg(format!(
                "{top}/ro:{}",
                if grants.ro_writable { "rw" } else { "ro" }
            ))
            .arg("--dir")
            .arg(format!("{top}/rw:rw"));
        if grants.top_granted {
            command.arg("--dir").arg(format!("{top}:ro"));
        }
        let output = command
            .arg(&self.fsops)
            .arg("--")
            .args(&script)
            .output()
            .expect("bulwark runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let context = || format!("script {script:#?}\nstdout:\n{stdout}\nstderr:\n{stderr}");
        assert_eq!(
            output.status.code(),
            Some(0),
            "fsops did not end with 0: {}",
            context()
        );
        assert_eq!(
            stdout.lines().count(),
            script.len(),
            "one line per operation: {}",
            context()
        );
        for token in [SECRET, OUTSIDE_ENTRY, PARENT_ENTRY, PASSWD] {
            assert!(
                !stdout.contains(token),
                "the guest read {token:?} from outside its preopens: {}",
                context()
            );
        }
        let after = tree.snapshot();
        if before != after {
            let changed: Vec<_> = before
                .keys()
                .chain(after.keys())
                .filter(|path| before.get(*path) != after.get(*path))
                .map(|path| {
                    format!(
                        "{}: {:?} -> {:?}",
                        path.display(),
                        before.get(path),
                        after.get(path)
                    )
                })
                .collect();
            panic!(
                "the guest changed what is outside its read-write preopen: {changed:#?}\n{}",
                context()
            );
        }
        Ok(())
    }
}

#[test]
fn hostile_filesystem_scripts_never_leave_the_preopens() {
    let runner = Runner::new();
    fuzz("escape", 4096, |u| runner.check(u, Grants::AS_MODELLED));
}

/// The model must catch a planted escape within this time (it usually takes a second).
const PLANTED: Duration = Duration::from_secs(120);

#[test]
fn the_model_catches_a_read_only_preopen_granted_writable() {
    let runner = Runner::new();
    let grants = Grants {
        ro_writable: true,
        ..Grants::AS_MODELLED
    };
    let finding = search("escape-ro-writable", PLANTED, 4096, |u| {
        runner.check(u, grants)
    })
    .expect_err("the fuzzer must find writes through a read-only preopen granted writable");
    assert!(
        finding.message.contains("changed what is outside"),
        "{finding}"
    );
}

#[test]
fn the_model_catches_a_preopen_wider_than_granted() {
    let runner = Runner::new();
    let grants = Grants {
        top_granted: true,
        ..Grants::AS_MODELLED
    };
    let finding = search("escape-top-granted", PLANTED, 4096, |u| {
        runner.check(u, grants)
    })
    .expect_err("the fuzzer must find reads outside the preopens when their parent is granted");
    assert!(
        finding.message.contains("from outside its preopens"),
        "{finding}"
    );
}
