//! Mounts left under a directory, found in `/proc/self/mountinfo` and lazily unmounted.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The mount points at or below `dir`, deepest first (the order to unmount them in).
///
/// `dir` is compared after resolving symlinks, as the kernel reports real paths.
pub fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let info = fs::read_to_string("/proc/self/mountinfo").context("cannot read mountinfo")?;
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape(field)))
        .filter(|mount_point| mount_point.starts_with(&dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    Ok(found)
}

/// Lazily unmounts (`MNT_DETACH`) everything mounted at or below `dir`, deepest first, until
/// nothing is left. Returns the mount points it unmounted.
pub fn unmount_all_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut unmounted = Vec::new();
    // Stacked mounts show up once per layer: go round until the list is empty.
    for _ in 0..16 {
        let mounts = mounts_under(dir)?;
        if mounts.is_empty() {
            return Ok(unmounted);
        }
        for mount_point in mounts {
            let c_path = CString::new(mount_point.as_os_str().as_bytes())?;
            // SAFETY: c_path is a valid NUL-terminated string that outlives the call.
            let rc = unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) };
            if rc == 0 {
                unmounted.push(mount_point);
            } else {
                let err = std::io::Error::last_os_error();
                log::warn!("cannot unmount {}: {err}", mount_point.display());
            }
        }
    }
    let left = mounts_under(dir)?;
    if left.is_empty() {
        Ok(unmounted)
    } else {
        bail!("mounts remain under {}: {left:?}", dir.display())
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(digits) if bytes[i] == b'\\' => {
                out.push(
                    digits
                        .iter()
                        .fold(0u8, |v, d| v.wrapping_mul(8) + (d - b'0')),
                );
                i += 4;
            }
            _ => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A tmpfs a test mounted, unmounted when dropped, even when the test fails.
#[derive(Debug)]
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs with `options` (`size=64m`, ...) on the directory `at`.
    pub fn mount(at: &Path, options: &str) -> Result<Tmpfs> {
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(at)
            .status()?;
        anyhow::ensure!(status.success(), "mount tmpfs on {}", at.display());
        Ok(Tmpfs(at.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[cfg(test)]
mod tests {
    use super::unescape;

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/end\"), "/end\\");
    }
}
