//! Adding the `bulwark` runtime to containerd's configuration, and taking it out again,
//! with a real TOML editor: comments, ordering and every other setting of the file are
//! kept, and running it twice changes nothing the second time.
//!
//! containerd's config version 2 (1.6, 1.7) keeps CRI runtimes under
//! `plugins."io.containerd.grpc.v1.cri".containerd.runtimes`; version 3 (2.x) under
//! `plugins."io.containerd.cri.v1.runtime".containerd.runtimes`.

use std::path::Path;

use toml_edit::{Array, DocumentMut, Item, Table, value};

/// The runtime handler (and RuntimeClass handler) name.
pub const RUNTIME_NAME: &str = "bulwark";
/// The binaries a node runs, in the order they are installed: the pod sandbox's holder and
/// the workload's (which the shim finds beside itself), then the shim.
pub const SHIM_BINARIES: [&str; 3] = ["bulwark-holder", "bulwark-workload", SHIM];

/// The shim's file, which containerd's `runtime_type` resolves to on its PATH.
pub const SHIM: &str = "containerd-shim-bulwark-v1";

/// containerd's name for the shim: `containerd-shim-bulwark-v1` on its PATH.
pub const RUNTIME_TYPE: &str = "io.containerd.bulwark.v1";
/// The annotations containerd must pass through to the shim.
pub const POD_ANNOTATIONS: &str = "bulwark.dev/*";

/// A containerd configuration that cannot be edited safely.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// Not TOML.
    #[error("{path}: not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// The parser's explanation.
        message: String,
    },
    /// A config version this installer does not edit.
    #[error(
        "{path}: containerd config version {version} is not supported (expected 2 for containerd 1.6/1.7 or 3 for 2.x; migrate with `containerd config migrate`)"
    )]
    Version {
        /// The file.
        path: String,
        /// The version found.
        version: String,
    },
    /// A k3s/RKE2 template this installer cannot edit safely.
    #[error(
        "{path}: a containerd template that does not start with {BASE_TEMPLATE} (or holds other Go template directives) cannot be edited safely; add the bulwark runtime to it by hand"
    )]
    Template {
        /// The file.
        path: String,
    },
    /// A key on the way to the runtimes table is not a table.
    #[error("{path}: {key} is not a table")]
    Shape {
        /// The file.
        path: String,
        /// The key.
        key: String,
    },
}

/// The CRI plugin's section for a config version.
fn cri_plugin(version: i64) -> &'static str {
    if version >= 3 {
        "io.containerd.cri.v1.runtime"
    } else {
        "io.containerd.grpc.v1.cri"
    }
}

fn parse(text: &str, path: &str) -> Result<(DocumentMut, i64), InstallError> {
    let document: DocumentMut =
        text.parse()
            .map_err(|error: toml_edit::TomlError| InstallError::Syntax {
                path: path.to_owned(),
                message: error.message().to_owned(),
            })?;
    let version = match document.get("version") {
        Some(item) => item.as_integer().ok_or_else(|| InstallError::Version {
            path: path.to_owned(),
            version: item.to_string().trim().to_owned(),
        })?,
        // An empty file is containerd's defaults: write it as version 2, which every
        // supported containerd reads (2.x migrates it).
        None if document.is_empty() => 2,
        None => 1,
    };
    if !(2..=3).contains(&version) {
        return Err(InstallError::Version {
            path: path.to_owned(),
            version: version.to_string(),
        });
    }
    Ok((document, version))
}

/// Walks (creating implicit tables) to `plugins.<cri>.containerd.runtimes`.
fn runtimes<'a>(
    document: &'a mut DocumentMut,
    version: i64,
    path: &str,
) -> Result<&'a mut Table, InstallError> {
    let mut table = document.as_table_mut();
    for key in ["plugins", cri_plugin(version), "containerd", "runtimes"] {
        let entry = table.entry(key).or_insert_with(|| {
            let mut implicit = Table::new();
            implicit.set_implicit(true);
            Item::Table(implicit)
        });
        table = entry.as_table_mut().ok_or_else(|| InstallError::Shape {
            path: path.to_owned(),
            key: key.to_owned(),
        })?;
    }
    Ok(table)
}

/// Returns `text` with the `bulwark` runtime added (or brought up to date), pointing the
/// shim at `bulwark_config` for its node configuration. Unchanged text when it is already
/// there as it should be.
pub fn add_runtime(text: &str, path: &str, bulwark_config: &Path) -> Result<String, InstallError> {
    let (mut document, version) = parse(text, path)?;
    if document.get("version").is_none() {
        document.insert("version", value(version));
    }
    let runtimes = runtimes(&mut document, version, path)?;
    let runtime = subtable(
        runtimes,
        RUNTIME_NAME,
        path,
        format!("runtimes.{RUNTIME_NAME}"),
    )?;
    set_if_different(runtime, "runtime_type", value(RUNTIME_TYPE));
    let has_annotation = runtime
        .get("pod_annotations")
        .and_then(Item::as_array)
        .is_some_and(|list| list.iter().any(|v| v.as_str() == Some(POD_ANNOTATIONS)));
    if !has_annotation {
        let mut list = runtime
            .get("pod_annotations")
            .and_then(Item::as_array)
            .cloned()
            .unwrap_or_else(Array::new);
        list.push(POD_ANNOTATIONS);
        runtime.insert("pod_annotations", value(list));
    }
    let options = subtable(
        runtime,
        "options",
        path,
        format!("runtimes.{RUNTIME_NAME}.options"),
    )?;
    set_if_different(
        options,
        "ConfigPath",
        value(bulwark_config.display().to_string()),
    );
    Ok(document.to_string())
}

/// `table[key]` as a table, an empty one added when it is missing; `shown` names it in the
/// error when it is something else.
fn subtable<'a>(
    table: &'a mut Table,
    key: &str,
    path: &str,
    shown: String,
) -> Result<&'a mut Table, InstallError> {
    table
        .entry(key)
        .or_insert_with(|| Item::Table(Table::new()))
        .as_table_mut()
        .ok_or_else(|| InstallError::Shape {
            path: path.to_owned(),
            key: shown,
        })
}

/// Returns `text` without the `bulwark` runtime (unchanged when it has none).
pub fn remove_runtime(text: &str, path: &str) -> Result<String, InstallError> {
    let (mut document, version) = parse(text, path)?;
    let runtimes = runtimes(&mut document, version, path)?;
    if runtimes.remove(RUNTIME_NAME).is_none() {
        return Ok(text.to_owned());
    }
    Ok(document.to_string())
}

fn set_if_different(table: &mut Table, key: &str, wanted: Item) {
    let same = match (table.get(key).and_then(Item::as_value), wanted.as_value()) {
        (Some(current), Some(wanted)) => current.to_string().trim() == wanted.to_string().trim(),
        _ => false,
    };
    if !same {
        table.insert(key, wanted);
    }
}

/// A line diff for `--dry-run`: `-` removed, `+` added, unchanged lines left out.
pub fn line_diff(before: &str, after: &str) -> String {
    let old: Vec<&str> = before.lines().collect();
    let new: Vec<&str> = after.lines().collect();
    // Longest common subsequence table; configs are small.
    let mut lcs = vec![vec![0usize; new.len() + 1]; old.len() + 1];
    for i in (0..old.len()).rev() {
        for j in (0..new.len()).rev() {
            lcs[i][j] = if old[i] == new[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, String::new());
    while i < old.len() || j < new.len() {
        if i < old.len() && j < new.len() && old[i] == new[j] {
            i += 1;
            j += 1;
        } else if j < new.len() && (i == old.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out.push_str(&format!("+{}\n", new[j]));
            j += 1;
        } else {
            out.push_str(&format!("-{}\n", old[i]));
            i += 1;
        }
    }
    out
}

/// The first line of a k3s/RKE2 containerd template that keeps the distribution's own
/// configuration and appends to it.
pub const BASE_TEMPLATE: &str = "{{ template \"base\" . }}";

/// The Kubernetes distribution that owns a node's containerd, which decides where its
/// configuration lives and how it is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Distribution {
    /// containerd installed on its own (kubeadm, kind, most managed nodes).
    Containerd,
    /// k3s: containerd's config is generated at every start; it takes a template.
    K3s,
    /// RKE2: as k3s.
    Rke2,
    /// MicroK8s: containerd's config is a template in the snap's data.
    MicroK8s,
    /// k0s: containerd's config merges drop-in files.
    K0s,
}

impl std::fmt::Display for ContainerdTarget {
    /// What the file is, in words: `k3s's containerd template`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let owner = match self.distribution {
            Distribution::Containerd => return f.write_str("containerd's config"),
            Distribution::K3s => "k3s's",
            Distribution::Rke2 => "RKE2's",
            Distribution::MicroK8s => "MicroK8s's",
            Distribution::K0s => "k0s's",
        };
        let what = match self.form {
            ConfigForm::Config | ConfigForm::Template { .. } => "containerd template",
            ConfigForm::DropIn => "containerd drop-in",
        };
        write!(f, "{owner} {what}")
    }
}

/// How the runtime goes into a distribution's containerd configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigForm {
    /// A containerd config file, edited in place.
    Config,
    /// A k3s/RKE2 template: [`BASE_TEMPLATE`] (the distribution's generated config) and
    /// TOML appended to it, for a rendered config of this version.
    Template {
        /// The config version the distribution renders (2, or 3 for containerd 2.x).
        version: i64,
    },
    /// A k0s drop-in, merged into the generated config by k0s.
    DropIn,
}

/// Where and how Bulwark's runtime goes into a node's containerd configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerdTarget {
    /// Whose containerd it is.
    pub distribution: Distribution,
    /// The file to edit, as a path on the node.
    pub file: std::path::PathBuf,
    /// What kind of file it is.
    pub form: ConfigForm,
    /// The systemd unit to restart to apply a change; `None` when the distribution applies
    /// it on its own (k0s watches its drop-ins).
    pub restart_unit: Option<&'static str>,
}

impl ContainerdTarget {
    /// containerd's own config file at `file` (restarting `containerd.service`).
    pub fn config(file: &Path) -> ContainerdTarget {
        ContainerdTarget {
            distribution: Distribution::Containerd,
            file: file.to_owned(),
            form: ConfigForm::Config,
            restart_unit: Some("containerd"),
        }
    }

    /// Finds which distribution runs containerd on the node whose paths `on_host` maps
    /// (see [`Layout::on_host`]), by the files each one keeps; plain containerd's
    /// `/etc/containerd/config.toml` when none matches.
    pub fn detect(on_host: impl Fn(&Path) -> std::path::PathBuf) -> ContainerdTarget {
        let exists = |path: &str| on_host(Path::new(path)).exists();
        for (distribution, data, server_unit, agent_unit) in [
            (
                Distribution::K3s,
                "/var/lib/rancher/k3s",
                "k3s",
                "k3s-agent",
            ),
            (
                Distribution::Rke2,
                "/var/lib/rancher/rke2",
                "rke2-server",
                "rke2-agent",
            ),
        ] {
            let generated = format!("{data}/agent/etc/containerd/config.toml");
            if !exists(&generated) {
                continue;
            }
            // The generated file says which containerd renders it; 2.x reads its own
            // template name.
            let version = std::fs::read_to_string(on_host(Path::new(&generated)))
                .ok()
                .and_then(|text| parse(&text, &generated).ok())
                .map_or(2, |(_, version)| version);
            let template = if version >= 3 {
                "config-v3.toml.tmpl"
            } else {
                "config.toml.tmpl"
            };
            return ContainerdTarget {
                distribution,
                file: Path::new(&data).join("agent/etc/containerd").join(template),
                form: ConfigForm::Template { version },
                // Only servers keep a server directory.
                restart_unit: Some(if exists(&format!("{data}/server")) {
                    server_unit
                } else {
                    agent_unit
                }),
            };
        }
        let microk8s = "/var/snap/microk8s/current/args/containerd-template.toml";
        if exists(microk8s) {
            return ContainerdTarget {
                distribution: Distribution::MicroK8s,
                file: microk8s.into(),
                form: ConfigForm::Config,
                restart_unit: Some("snap.microk8s.daemon-containerd"),
            };
        }
        if exists("/etc/k0s/containerd.toml") {
            return ContainerdTarget {
                distribution: Distribution::K0s,
                file: "/etc/k0s/containerd.d/bulwark.toml".into(),
                form: ConfigForm::DropIn,
                restart_unit: None,
            };
        }
        ContainerdTarget::config(Path::new("/etc/containerd/config.toml"))
    }

    /// Returns `text` (the file's content, empty when it does not exist) with the runtime
    /// added (`adding`) or removed. An empty result means the file should go: a template or
    /// drop-in that held nothing but Bulwark's runtime.
    pub fn edit(
        &self,
        text: &str,
        path: &str,
        bulwark_config: &Path,
        adding: bool,
    ) -> Result<String, InstallError> {
        let change = |text: &str| {
            if adding {
                add_runtime(text, path, bulwark_config)
            } else {
                remove_runtime(text, path)
            }
        };
        match self.form {
            ConfigForm::Config => change(text),
            ConfigForm::DropIn => {
                let after = change(text)?;
                Ok(if holds_no_tables(&after) {
                    String::new()
                } else {
                    after
                })
            }
            ConfigForm::Template { version } => {
                let appended = match text.trim_start().strip_prefix(BASE_TEMPLATE) {
                    Some(rest) => rest.trim_start_matches(['\r', '\n']),
                    None if text.trim().is_empty() => "",
                    None => return Err(InstallError::Template { path: path.into() }),
                };
                if appended.contains("{{") {
                    return Err(InstallError::Template { path: path.into() });
                }
                // The appended TOML has no version of its own (the rendered base has it):
                // give the editor one for the plugin's name, then take it off again.
                let header = format!("version = {version}\n");
                let edited = change(&format!("{header}{appended}"))?;
                let edited = edited.strip_prefix(&header).unwrap_or(&edited);
                if !adding && edited.trim().is_empty() {
                    return Ok(String::new());
                }
                Ok(format!(
                    "{BASE_TEMPLATE}\n\n{}",
                    edited.trim_start_matches('\n')
                ))
            }
        }
    }
}

/// Whether a config holds nothing but top-level keys such as `version` (the editor leaves
/// out tables that became empty).
fn holds_no_tables(text: &str) -> bool {
    text.lines().all(|line| !line.trim_start().starts_with('['))
}

/// Where an installation puts things, all under `host_root` (the node's `/` when the
/// installer runs in a pod with the host's root mounted).
#[derive(Debug, Clone)]
pub struct Layout {
    /// The node's root as this process sees it.
    pub host_root: std::path::PathBuf,
    /// containerd's config, as a path on the node.
    pub containerd_config: std::path::PathBuf,
    /// The directory on containerd's PATH that receives the shim, as a path on the node.
    pub shim_dir: std::path::PathBuf,
    /// Bulwark's node configuration, as a path on the node.
    pub bulwark_config: std::path::PathBuf,
}

impl Layout {
    /// A node path as this process reaches it.
    pub fn on_host(&self, node_path: &Path) -> std::path::PathBuf {
        self.host_root
            .join(node_path.strip_prefix("/").unwrap_or(node_path))
    }

    /// Where containerd finds the shim, on the node.
    pub fn shim_path(&self) -> std::path::PathBuf {
        self.shim_dir.join(SHIM)
    }

    /// Where the shim and the binaries it starts go, on the node: the helpers first.
    pub fn shim_paths(&self) -> Vec<std::path::PathBuf> {
        SHIM_BINARIES
            .iter()
            .map(|name| self.shim_dir.join(name))
            .collect()
    }
}

/// Writes `bytes` to `path` atomically (a temporary file renamed over it). A file that is
/// there keeps its mode and owner; a new one gets `mode` (and this process's owner).
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let existing = std::fs::metadata(path).ok();
    let mut temp = tempfile::Builder::new()
        .prefix(".bulwark-")
        .tempfile_in(dir)?;
    temp.write_all(bytes)?;
    if let Some(existing) = &existing {
        std::os::unix::fs::fchown(temp.as_file(), Some(existing.uid()), Some(existing.gid()))?;
    }
    let mode = existing.map_or(mode, |existing| existing.mode() & 0o7777);
    temp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))?;
    temp.as_file().sync_all()?;
    temp.persist(path).map_err(|error| error.error)?;
    Ok(())
}

/// How many symlinks [`resolve_on_node`] follows before it calls it a loop (as the kernel).
const MAX_SYMLINKS: usize = 40;

/// The file a node path names once its symlinks are followed as the node would follow
/// them: an absolute target is a path on the node (under `layout`'s host root from here).
/// A file edited through a symlink keeps the link, and whatever manages the target sees
/// the change.
pub fn resolve_on_node(layout: &Layout, node_path: &Path) -> Result<std::path::PathBuf, String> {
    let mut path = node_path.to_path_buf();
    for _ in 0..MAX_SYMLINKS {
        let target = match std::fs::read_link(layout.on_host(&path)) {
            Ok(target) => target,
            // Not a symlink, or not there (a new file): this is the file.
            Err(_) => return Ok(path),
        };
        path = match target.is_absolute() {
            true => target,
            false => path.parent().unwrap_or(Path::new("/")).join(target),
        };
        path = normalize(&path);
    }
    Err(format!(
        "{}: more than {MAX_SYMLINKS} symlinks (a loop?)",
        node_path.display()
    ))
}

/// `path` with `.` and `..` taken out lexically (`..` at the root stays at the root).
fn normalize(path: &Path) -> std::path::PathBuf {
    use std::path::Component;
    let mut normal = std::path::PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::Normal(part) => normal.push(part),
            Component::ParentDir => {
                normal.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    normal
}

/// The node configuration `bulwark install` writes where none exists and none was given:
/// containerd passes its path to the shim (`ConfigPath`), and a named file that is missing
/// refuses every pod, so the file must exist even when it asks for nothing.
pub const DEFAULT_NODE_CONFIG: &str = r#"# Bulwark's node configuration, written by `bulwark install`: no defaults and no
# ceilings, so each pod gets exactly what its bulwark.dev/* annotations ask for.
# Replace it with `bulwark install --config FILE` (or the Helm chart's values).
#
# [defaults]            # what a pod gets when it asks for nothing; unset = no limit
# memory = "256Mi"
# [ceilings]            # the most a pod may ask for; unset = no ceiling
# fuel = 100000000000
# timeout = "1h"
# memory = "1Gi"
# concurrency = 1000    # serving pods: requests in flight
# [capabilities]
# allow_native = false  # native (ELF) containers other than pause, e.g. sidecars
# allow_network = false # bulwark.dev/network grants at all
# allow_without_landlock = false # run where the kernel does not enforce Landlock
# allow_without_egress_filter = false # run network grants where no cgroup BPF filter attaches
"#;

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "/etc/bulwark/config.toml";

    const CUSTOMISED_V2: &str = r#"# Our node's containerd: keep this comment.
version = 2
root = "/data/containerd"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.internal/pause:3.9" # pinned
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = true
"#;

    #[test]
    fn adds_the_runtime_and_keeps_everything_else() {
        let patched = add_runtime(CUSTOMISED_V2, "config.toml", Path::new(CONFIG)).unwrap();
        for kept in [
            "# Our node's containerd: keep this comment.",
            "root = \"/data/containerd\"",
            "sandbox_image = \"registry.internal/pause:3.9\" # pinned",
            "SystemdCgroup = true",
        ] {
            assert!(patched.contains(kept), "lost {kept:?}:\n{patched}");
        }
        let document: DocumentMut = patched.parse().unwrap();
        let runtime =
            &document["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["bulwark"];
        assert_eq!(runtime["runtime_type"].as_str(), Some(RUNTIME_TYPE));
        assert_eq!(
            runtime["pod_annotations"][0].as_str(),
            Some(POD_ANNOTATIONS)
        );
        assert_eq!(runtime["options"]["ConfigPath"].as_str(), Some(CONFIG));
        assert!(
            patched.starts_with(CUSTOMISED_V2.trim_end()),
            "appended, not rewritten:\n{patched}"
        );
    }

    #[test]
    fn is_idempotent_and_reversible() {
        let once = add_runtime(CUSTOMISED_V2, "c", Path::new(CONFIG)).unwrap();
        let twice = add_runtime(&once, "c", Path::new(CONFIG)).unwrap();
        assert_eq!(once, twice);
        assert_eq!(remove_runtime(&once, "c").unwrap(), CUSTOMISED_V2);
        assert_eq!(remove_runtime(CUSTOMISED_V2, "c").unwrap(), CUSTOMISED_V2);
    }

    #[test]
    fn version_3_uses_the_new_plugin() {
        let patched = add_runtime("version = 3\n", "c", Path::new(CONFIG)).unwrap();
        let document: DocumentMut = patched.parse().unwrap();
        assert_eq!(
            document["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]["bulwark"]
                ["runtime_type"]
                .as_str(),
            Some(RUNTIME_TYPE)
        );
    }

    #[test]
    fn an_existing_entry_is_brought_up_to_date_keeping_its_extras() {
        let old = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.bulwark]\n  runtime_type = \"io.containerd.old.v1\"\n  pod_annotations = [\"example.com/*\"]\n  privileged_without_host_devices = true\n";
        let patched = add_runtime(old, "c", Path::new(CONFIG)).unwrap();
        assert!(patched.contains("privileged_without_host_devices = true"));
        assert!(patched.contains("\"example.com/*\""));
        assert!(patched.contains(RUNTIME_TYPE));
        assert_eq!(
            add_runtime(&patched, "c", Path::new(CONFIG)).unwrap(),
            patched
        );
    }

    #[test]
    fn bad_configs_are_clear_errors() {
        let error = add_runtime(
            "version = [",
            "/etc/containerd/config.toml",
            Path::new(CONFIG),
        )
        .unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("/etc/containerd/config.toml: not valid TOML"),
            "{error}"
        );
        let error = add_runtime("[plugins.cri]\n", "c", Path::new(CONFIG)).unwrap_err();
        assert!(
            error.to_string().contains("version 1 is not supported"),
            "{error}"
        );
        let error = add_runtime("version = 2\nplugins = 5\n", "c", Path::new(CONFIG)).unwrap_err();
        assert!(
            error.to_string().contains("plugins is not a table"),
            "{error}"
        );
        let empty = add_runtime("", "c", Path::new(CONFIG)).unwrap();
        assert!(empty.starts_with("version = 2"), "{empty}");
    }

    #[test]
    fn diffs_show_only_changes() {
        assert_eq!(line_diff("a\nb\nc\n", "a\nc\nd\n"), "-b\n+d\n");
        assert_eq!(line_diff("same\n", "same\n"), "");
    }

    fn node_with(files: &[&str]) -> tempfile::TempDir {
        let node = tempfile::tempdir().unwrap();
        for file in files {
            let path = node.path().join(file.trim_start_matches('/'));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(
                &path,
                if file.ends_with(".toml") {
                    "version = 3\n"
                } else {
                    ""
                },
            )
            .unwrap();
        }
        node
    }

    fn detect_on(node: &tempfile::TempDir) -> ContainerdTarget {
        ContainerdTarget::detect(|path| node.path().join(path.strip_prefix("/").unwrap()))
    }

    #[test]
    fn distributions_are_found_by_their_files() {
        let plain = detect_on(&node_with(&[]));
        assert_eq!(
            plain,
            ContainerdTarget::config(Path::new("/etc/containerd/config.toml"))
        );

        // A k3s agent whose containerd is 2.x (its generated config is version 3).
        let k3s = detect_on(&node_with(&[
            "/var/lib/rancher/k3s/agent/etc/containerd/config.toml",
        ]));
        assert_eq!(k3s.distribution, Distribution::K3s);
        assert_eq!(
            k3s.file,
            Path::new("/var/lib/rancher/k3s/agent/etc/containerd/config-v3.toml.tmpl")
        );
        assert_eq!(k3s.form, ConfigForm::Template { version: 3 });
        assert_eq!(k3s.restart_unit, Some("k3s-agent"));

        let rke2 = detect_on(&node_with(&[
            "/var/lib/rancher/rke2/agent/etc/containerd/config.toml",
            "/var/lib/rancher/rke2/server/token",
        ]));
        assert_eq!(rke2.distribution, Distribution::Rke2);
        assert_eq!(rke2.restart_unit, Some("rke2-server"));

        let microk8s = detect_on(&node_with(&[
            "/var/snap/microk8s/current/args/containerd-template.toml",
        ]));
        assert_eq!(microk8s.form, ConfigForm::Config);
        assert_eq!(
            microk8s.restart_unit,
            Some("snap.microk8s.daemon-containerd")
        );

        let k0s = detect_on(&node_with(&["/etc/k0s/containerd.toml"]));
        assert_eq!(k0s.file, Path::new("/etc/k0s/containerd.d/bulwark.toml"));
        assert_eq!((k0s.form, k0s.restart_unit), (ConfigForm::DropIn, None));
    }

    #[test]
    fn templates_keep_the_base_and_go_away_when_only_bulwark_was_there() {
        let target = ContainerdTarget {
            distribution: Distribution::K3s,
            file: "config.toml.tmpl".into(),
            form: ConfigForm::Template { version: 2 },
            restart_unit: Some("k3s"),
        };
        let config = Path::new(CONFIG);
        let added = target.edit("", "t", config, true).unwrap();
        assert!(added.starts_with(BASE_TEMPLATE), "{added}");
        assert!(!added.contains("version"), "{added}");
        assert!(
            added.contains(r#"[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.bulwark]"#)
        );
        assert_eq!(target.edit(&added, "t", config, true).unwrap(), added);
        assert_eq!(target.edit(&added, "t", config, false).unwrap(), "");

        // A template of the admin's own keeps its additions, with and without Bulwark.
        let own = format!(
            "{BASE_TEMPLATE}\n# ours\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/certs.d\"\n"
        );
        let added = target.edit(&own, "t", config, true).unwrap();
        assert!(
            added.contains("config_path") && added.contains("runtimes.bulwark"),
            "{added}"
        );
        let removed = target.edit(&added, "t", config, false).unwrap();
        assert!(
            removed.contains("# ours") && !removed.contains("bulwark"),
            "{removed}"
        );

        for unsafe_template in [
            "[plugins]\n",
            &format!("{BASE_TEMPLATE}\n{{{{ if .x }}}}\n"),
        ] {
            let error = target
                .edit(unsafe_template, "t.tmpl", config, true)
                .unwrap_err();
            assert!(error.to_string().contains("t.tmpl"), "{error}");
        }
    }

    #[test]
    fn drop_ins_hold_the_runtime_alone() {
        let target = ContainerdTarget {
            distribution: Distribution::K0s,
            file: "bulwark.toml".into(),
            form: ConfigForm::DropIn,
            restart_unit: None,
        };
        let added = target.edit("", "d", Path::new(CONFIG), true).unwrap();
        assert!(added.contains("runtimes.bulwark"), "{added}");
        assert_eq!(
            target.edit(&added, "d", Path::new(CONFIG), false).unwrap(),
            ""
        );
    }

    #[test]
    fn symlinks_resolve_as_the_node_sees_them() {
        let node = tempfile::tempdir().unwrap();
        let layout = Layout {
            host_root: node.path().to_owned(),
            containerd_config: "/etc/containerd/config.toml".into(),
            shim_dir: "/usr/local/bin".into(),
            bulwark_config: CONFIG.into(),
        };
        let etc = node.path().join("etc/containerd");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::create_dir_all(node.path().join("srv/managed")).unwrap();
        // An absolute target is a node path; a relative one is beside the link.
        std::os::unix::fs::symlink("/srv/managed/containerd.toml", etc.join("config.toml"))
            .unwrap();
        std::os::unix::fs::symlink(
            "../managed/real.toml",
            node.path().join("srv/managed/containerd.toml"),
        )
        .unwrap();
        let resolved = resolve_on_node(&layout, Path::new("/etc/containerd/config.toml")).unwrap();
        assert_eq!(resolved, Path::new("/srv/managed/real.toml"));
        std::os::unix::fs::symlink("loop", etc.join("loop")).unwrap();
        let error = resolve_on_node(&layout, Path::new("/etc/containerd/loop")).unwrap_err();
        assert!(error.contains("loop"), "{error}");
    }

    #[test]
    fn rewrites_keep_the_files_mode_and_owner() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        std::os::unix::fs::chown(&path, Some(4321), Some(8765)).unwrap();
        write_atomically(&path, b"new", 0o644).unwrap();
        let metadata = std::fs::metadata(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        assert_eq!(metadata.mode() & 0o7777, 0o640);
        assert_eq!((metadata.uid(), metadata.gid()), (4321, 8765));
        let fresh = dir.path().join("fresh.toml");
        write_atomically(&fresh, b"x", 0o600).unwrap();
        assert_eq!(std::fs::metadata(&fresh).unwrap().mode() & 0o7777, 0o600);
    }

    #[test]
    fn the_default_node_config_asks_for_nothing() {
        let config = crate::node::install::DEFAULT_NODE_CONFIG;
        assert_eq!(
            bulwark_runtime::NodeConfig::parse(config, "default").unwrap(),
            bulwark_runtime::NodeConfig::default()
        );
    }
}
