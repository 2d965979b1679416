//! The installer's containerd config editing against the real thing: each supported
//! containerd's own default config (1.6.20 from Debian 12, 1.7.24 and 2.1.9 fetched from
//! Debian's trixie and sid), patched, must be read back by that containerd
//! (`containerd config dump`) with the `bulwark` runtime, its annotation allow-list and
//! options in place, and with nothing of the original lost.

use std::path::{Path, PathBuf};
use std::process::Command;

use bulwark_shim::node::install::{
    BASE_TEMPLATE, ConfigForm, ContainerdTarget, Distribution, POD_ANNOTATIONS, RUNTIME_TYPE,
    add_runtime, remove_runtime,
};

fn containerd(version: &str) -> PathBuf {
    if version == "1.6.20" {
        return PathBuf::from("/usr/bin/containerd");
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dest = root.join("build/containerd").join(version);
    let binary = dest.join("usr/bin/containerd");
    if !binary.exists() {
        let status = Command::new("sh")
            .arg(root.join("tests/containerd/fetch.sh"))
            .arg(version)
            .arg(&dest)
            .status()
            .unwrap();
        assert!(status.success(), "fetching containerd {version} failed");
    }
    binary
}

fn run(binary: &Path, args: &[&str]) -> String {
    let output = Command::new(binary).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "{} {args:?}: {}",
        binary.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The CRI runtimes table of `config` as containerd `binary` reads it back
/// (`config dump`; `version3`: containerd 2.x's plugin), and the whole dump.
fn runtimes_as_read(binary: &Path, config: &str, version3: bool) -> (toml::Value, String) {
    let temp = tempfile::tempdir().unwrap();
    let file = temp.path().join("config.toml");
    std::fs::write(&file, config).unwrap();
    let dump = run(
        binary,
        &["--config", file.to_str().unwrap(), "config", "dump"],
    );
    let dumped: toml::Table = toml::from_str(&dump).unwrap();
    let plugin = if version3 {
        "io.containerd.cri.v1.runtime"
    } else {
        "io.containerd.grpc.v1.cri"
    };
    let runtimes = dumped["plugins"][plugin]["containerd"]["runtimes"].clone();
    (runtimes, dump)
}

#[test]
fn every_supported_containerd_reads_the_patched_default_config() {
    for version in ["1.6.20", "1.7.24", "2.1.9"] {
        let binary = containerd(version);
        let default = run(&binary, &["config", "default"]);
        let patched = add_runtime(
            &default,
            "config.toml",
            Path::new("/etc/bulwark/config.toml"),
        )
        .unwrap();
        assert_eq!(
            add_runtime(
                &patched,
                "config.toml",
                Path::new("/etc/bulwark/config.toml")
            )
            .unwrap(),
            patched,
            "{version}: not idempotent"
        );
        assert_eq!(
            remove_runtime(&patched, "config.toml").unwrap(),
            default,
            "{version}: not reversible"
        );
        let (runtimes, dump) = runtimes_as_read(&binary, &patched, version.starts_with('2'));
        let runtimes = &runtimes;
        let bulwark = &runtimes["bulwark"];
        assert_eq!(
            bulwark["runtime_type"].as_str(),
            Some(RUNTIME_TYPE),
            "{version}: {dump}"
        );
        assert_eq!(
            bulwark["pod_annotations"][0].as_str(),
            Some(POD_ANNOTATIONS),
            "{version}"
        );
        assert_eq!(
            bulwark["options"]["ConfigPath"].as_str(),
            Some("/etc/bulwark/config.toml"),
            "{version}"
        );
        assert!(runtimes.get("runc").is_some(), "{version}: runc lost");
    }
}

/// k3s and RKE2 render their template by putting their own config where
/// [`BASE_TEMPLATE`] stands. With containerd's default config as that base (theirs is a
/// trimmed one), the rendered file must be one containerd reads, with the runtime in it.
#[test]
fn a_rendered_k3s_template_is_a_config_containerd_reads() {
    for (version, config_version) in [("1.7.24", 2), ("2.1.9", 3)] {
        let binary = containerd(version);
        let target = ContainerdTarget {
            distribution: Distribution::K3s,
            file: "config.toml.tmpl".into(),
            form: ConfigForm::Template {
                version: config_version,
            },
            restart_unit: Some("k3s"),
        };
        let template = target
            .edit(
                "",
                "config.toml.tmpl",
                Path::new("/etc/bulwark/config.toml"),
                true,
            )
            .unwrap();
        let base = run(&binary, &["config", "default"]);
        let rendered = template.replacen(BASE_TEMPLATE, &base, 1);
        let (runtimes, dump) = runtimes_as_read(&binary, &rendered, config_version == 3);
        let runtimes = &runtimes;
        assert_eq!(
            runtimes["bulwark"]["runtime_type"].as_str(),
            Some(RUNTIME_TYPE),
            "{version}: {dump}"
        );
        assert!(runtimes.get("runc").is_some(), "{version}: runc lost");
    }
}

#[test]
fn on_a_k3s_node_install_writes_the_template_and_uninstall_removes_it() {
    let node = tempfile::tempdir().unwrap();
    let root = node.path().to_str().unwrap();
    let containerd_dir = node.path().join("var/lib/rancher/k3s/agent/etc/containerd");
    std::fs::create_dir_all(&containerd_dir).unwrap();
    // k3s's generated config, which k3s rewrites at every start: never edited.
    let generated = run(Path::new("/usr/bin/containerd"), &["config", "default"]);
    std::fs::write(containerd_dir.join("config.toml"), &generated).unwrap();
    let template = containerd_dir.join("config.toml.tmpl");

    let output = bulwark(&["install", "--host-root", root, "--no-restart"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("config.toml.tmpl: k3s's containerd template"),
        "{stdout}"
    );
    assert!(stdout.contains("restart k3s-agent"), "{stdout}");
    let written = std::fs::read_to_string(&template).unwrap();
    assert!(written.starts_with(BASE_TEMPLATE), "{written}");
    assert!(written.contains("runtimes.bulwark"), "{written}");
    assert_eq!(
        std::fs::read_to_string(containerd_dir.join("config.toml")).unwrap(),
        generated
    );
    let again = bulwark(&["install", "--host-root", root, "--no-restart"]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to change"));

    let output = bulwark(&["uninstall", "--host-root", root, "--no-restart"]);
    assert!(output.status.success());
    assert!(!template.exists(), "the template is left");
    assert!(
        !node
            .path()
            .join("usr/local/bin/containerd-shim-bulwark-v1")
            .exists()
    );
}

/// A restart that failed leaves the node marked, so the next run restarts again although
/// the files need no change: a crash-looping installer pod keeps trying, and never reports
/// (or labels) a node whose containerd has not read the runtime. Here the restart fails
/// because the node's root is a directory whose processes this test cannot see.
#[test]
fn a_restart_that_failed_is_tried_again_on_the_next_run() {
    let node = tempfile::tempdir().unwrap();
    let root = node.path().to_str().unwrap();
    let config = node.path().join("etc/containerd/config.toml");
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    let default = run(Path::new("/usr/bin/containerd"), &["config", "default"]);
    std::fs::write(&config, &default).unwrap();
    let marker = node
        .path()
        .join("etc/containerd/config.toml.bulwark-restart-pending");

    let first = bulwark(&["install", "--host-root", root]);
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(!first.status.success(), "{stderr}");
    assert!(
        stderr.contains("cannot see the node's processes to restart containerd"),
        "{stderr}"
    );
    assert!(marker.exists(), "no marker after a failed restart");

    // Files as wanted, containerd not told: --no-restart has nothing to do...
    let quiet = bulwark(&["install", "--host-root", root, "--no-restart"]);
    assert!(String::from_utf8_lossy(&quiet.stdout).contains("nothing to change"));
    // ...but a run that may restart does it again.
    let again = bulwark(&["install", "--host-root", root]);
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(
        stdout.contains("the restart of an earlier run did not complete: restarting again"),
        "{stdout}"
    );
    assert!(!again.status.success());
    assert!(marker.exists());
}

/// Where the plain containerd config is, as the installer names it (on the node).
fn containerd_config_on_node() -> &'static str {
    "/etc/containerd/config.toml"
}

fn bulwark(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_bulwark"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn install_and_uninstall_change_a_node_and_restore_it() {
    let node = tempfile::tempdir().unwrap();
    let root = node.path().to_str().unwrap();
    let original = format!(
        "# site settings: keep\n{}",
        run(Path::new("/usr/bin/containerd"), &["config", "default"])
    );
    let containerd_config = node.path().join("etc/containerd/config.toml");
    std::fs::create_dir_all(containerd_config.parent().unwrap()).unwrap();
    std::fs::write(&containerd_config, &original).unwrap();
    let settings = node.path().join("values.toml");
    std::fs::write(&settings, "[ceilings]\nmemory = \"1Gi\"\n").unwrap();
    let settings = settings.to_str().unwrap();
    let install = |extra: &[&str]| {
        bulwark(&[&["install", "--host-root", root, "--no-restart"], extra].concat())
    };

    // A malformed node configuration changes nothing.
    let bad = node.path().join("bad.toml");
    std::fs::write(&bad, "[ceilings]\nmemroy = 1\n").unwrap();
    let output = install(&["--config", bad.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("memroy"));
    assert_eq!(
        std::fs::read_to_string(&containerd_config).unwrap(),
        original
    );

    // A dry run shows the change and makes none.
    let output = install(&["--dry-run", "--config", settings]);
    assert!(output.status.success());
    let diff = String::from_utf8_lossy(&output.stdout);
    assert!(
        diff.lines()
            .any(|line| line.starts_with('+') && line.contains("io.containerd.bulwark.v1")),
        "{diff}"
    );
    assert_eq!(
        std::fs::read_to_string(&containerd_config).unwrap(),
        original
    );

    let output = install(&["--config", settings]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let installed =
        std::fs::read(node.path().join("usr/local/bin/containerd-shim-bulwark-v1")).unwrap();
    assert_eq!(
        installed,
        std::fs::read(env!("CARGO_BIN_EXE_containerd-shim-bulwark-v1")).unwrap()
    );
    assert_eq!(
        std::fs::read_to_string(node.path().join("etc/bulwark/config.toml")).unwrap(),
        "[ceilings]\nmemory = \"1Gi\"\n"
    );
    let patched = std::fs::read_to_string(&containerd_config).unwrap();
    assert!(
        patched.starts_with("# site settings: keep\n")
            && patched.contains("io.containerd.bulwark.v1")
    );
    assert_eq!(
        std::fs::read_to_string(
            node.path()
                .join("etc/containerd/config.toml.bulwark-backup")
        )
        .unwrap(),
        original
    );

    // Twice is once.
    let output = install(&["--config", settings]);
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!(
            "{}: containerd's config\nnothing to change\n",
            containerd_config_on_node()
        )
    );

    let output = bulwark(&["uninstall", "--host-root", root, "--no-restart"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(&containerd_config).unwrap(),
        original
    );
    assert!(
        !node
            .path()
            .join("usr/local/bin/containerd-shim-bulwark-v1")
            .exists()
    );
    assert!(
        !node.path().join("etc/bulwark/config.toml").exists(),
        "the node configuration is left"
    );
    let output = bulwark(&["uninstall", "--host-root", root, "--no-restart"]);
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!(
            "{}: containerd's config\nnothing to change\n",
            containerd_config_on_node()
        )
    );
}

/// The file containerd passes to the shim as ConfigPath must exist (a named file that is
/// missing refuses every pod): without --config, install writes one that asks for nothing,
/// and keeps one that is there.
#[test]
fn install_writes_a_node_configuration_only_where_there_is_none() {
    let node = tempfile::tempdir().unwrap();
    let root = node.path().to_str().unwrap();
    let node_config = node.path().join("etc/bulwark/config.toml");
    let output = bulwark(&["install", "--host-root", root, "--no-restart"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(&node_config).unwrap(),
        bulwark_shim::node::install::DEFAULT_NODE_CONFIG
    );
    std::fs::write(&node_config, "[ceilings]\nfuel = 5\n").unwrap();
    let output = bulwark(&["install", "--host-root", root, "--no-restart"]);
    assert!(String::from_utf8_lossy(&output.stdout).contains("nothing to change"));
    assert_eq!(
        std::fs::read_to_string(&node_config).unwrap(),
        "[ceilings]\nfuel = 5\n"
    );
}

/// `--containerd-config config.toml` names the file in the working directory (it used to
/// name /config.toml); a symlinked config is edited through its target, which keeps its
/// mode and owner; a relative path under --host-root is refused, naming the flag.
#[test]
fn a_relative_or_symlinked_containerd_config_is_the_file_named() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let work = tempfile::tempdir().unwrap();
    let default = run(Path::new("/usr/bin/containerd"), &["config", "default"]);
    std::fs::write(work.path().join("config.toml"), &default).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_bulwark"))
        .current_dir(work.path())
        .args([
            "install",
            "--containerd-config",
            "config.toml",
            "--no-restart",
        ])
        .arg("--shim-dir")
        .arg(work.path().join("bin"))
        .arg("--config-path")
        .arg(work.path().join("bulwark.toml"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let edited = std::fs::read_to_string(work.path().join("config.toml")).unwrap();
    assert!(
        edited.contains(RUNTIME_TYPE),
        "the file in the working directory"
    );
    assert!(!Path::new("/config.toml").exists(), "wrote /config.toml");

    let node = tempfile::tempdir().unwrap();
    let root = node.path().to_str().unwrap();
    let managed = node.path().join("srv/managed/containerd.toml");
    std::fs::create_dir_all(managed.parent().unwrap()).unwrap();
    std::fs::write(&managed, &default).unwrap();
    std::fs::set_permissions(&managed, std::fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(&managed, Some(1234), Some(5678)).unwrap();
    let link = node.path().join("etc/containerd/config.toml");
    std::fs::create_dir_all(link.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink("/srv/managed/containerd.toml", &link).unwrap();
    let output = bulwark(&["install", "--host-root", root, "--no-restart"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("is a symlink: editing /srv/managed/containerd.toml"),
        "{stdout}"
    );
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(
        std::fs::read_to_string(&managed)
            .unwrap()
            .contains(RUNTIME_TYPE)
    );
    let metadata = std::fs::metadata(&managed).unwrap();
    assert_eq!(metadata.mode() & 0o7777, 0o640);
    assert_eq!((metadata.uid(), metadata.gid()), (1234, 5678));

    let output = bulwark(&[
        "install",
        "--host-root",
        root,
        "--containerd-config",
        "config.toml",
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("--containerd-config config.toml: a relative path"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
