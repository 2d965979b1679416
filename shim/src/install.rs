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
    let runtime = runtimes
        .entry(RUNTIME_NAME)
        .or_insert_with(|| Item::Table(Table::new()))
        .as_table_mut()
        .ok_or_else(|| InstallError::Shape {
            path: path.to_owned(),
            key: format!("runtimes.{RUNTIME_NAME}"),
        })?;
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
    let options = runtime
        .entry("options")
        .or_insert_with(|| Item::Table(Table::new()))
        .as_table_mut()
        .ok_or_else(|| InstallError::Shape {
            path: path.to_owned(),
            key: format!("runtimes.{RUNTIME_NAME}.options"),
        })?;
    set_if_different(
        options,
        "ConfigPath",
        value(bulwark_config.display().to_string()),
    );
    Ok(document.to_string())
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
        self.shim_dir.join("containerd-shim-bulwark-v1")
    }
}

/// Writes `bytes` to `path` atomically (a temporary file renamed over it), with `mode`.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut temp = tempfile::Builder::new()
        .prefix(".bulwark-")
        .tempfile_in(dir)?;
    temp.write_all(bytes)?;
    temp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))?;
    temp.as_file().sync_all()?;
    temp.persist(path).map_err(|error| error.error)?;
    Ok(())
}

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
}
