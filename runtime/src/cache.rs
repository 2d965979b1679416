//! The node's cache of precompiled modules.
//!
//! Compiling is slow; loading a precompiled artifact is fast. But loading one is
//! `unsafe`: Wasmtime runs the machine code it contains. So the cache only ever loads
//! entries it wrote itself, and proves it: every entry carries an HMAC-SHA256, under a
//! secret key that lives in the (root-only) cache directory, over its header and its
//! artifact. Bytes from an image, a foreign cache or a damaged disk fail the check and are
//! recompiled, never loaded.
//!
//! Layout: `<dir>/key` (the secret), `<dir>/<engine fingerprint>/<module sha256>.<kind>`
//! (entries) and `.lock` files beside them (compile-once locks). Writes are atomic (a
//! temporary file renamed into place) and two processes that miss on the same module at
//! once compile it once: the second waits on the first's lock, then finds its entry.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::engine::{WasmKind, hex};

/// The node-wide default location, shared by every pod on the node.
pub const DEFAULT_CACHE_DIR: &str = "/var/lib/bulwark/cache";
/// Overrides the node cache directory, for the CLI and the shim (tests use a private one).
pub const CACHE_DIR_ENV: &str = "BULWARK_CACHE_DIR";

const MAGIC: &[u8; 16] = b"BULWARK-CACHE-1\n";
const KEY_LEN: usize = 32;
const MAC_LEN: usize = 32;
// magic, kind, fingerprint (32 hex bytes), module digest (32 bytes), artifact length.
const HEADER_LEN: usize = MAGIC.len() + 1 + 32 + 32 + 8;

/// A cache that cannot be used safely or at all.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The filesystem refused an operation.
    #[error("module cache {path}: {action}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the cache was doing.
        action: &'static str,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Others could plant entries: the cache refuses to trust the directory.
    #[error(
        "module cache {path} is not safe to trust: {problem} (it must be owned by uid {uid} and writable by no one else)"
    )]
    Insecure {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
        /// The uid it must belong to.
        uid: u32,
    },
    /// The compiler refused the module (it is invalid); the entry was not written.
    #[error("{0}")]
    Compile(String),
}

/// What happened on a lookup: tests and logs tell a warm start from a cold one by it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheEvent {
    /// A verified entry was loaded.
    Hit,
    /// No entry existed; the module was compiled and stored.
    Compiled,
    /// An entry existed but failed verification; it was replaced.
    Replaced {
        /// Why the old entry was rejected.
        reason: String,
    },
    /// Another process compiled it while this one waited on the lock.
    CompiledByPeer,
    /// Compiled here, but the cache could not store it (its filesystem full, say): the
    /// module runs compiled in memory and the next start compiles it again.
    NotStored {
        /// What the cache's filesystem said.
        reason: String,
    },
}

/// Warns, once per workload, that the cache could not take an entry.
fn not_stored(error: CacheError) -> CacheEvent {
    log::warn!("{error}: the module cache cannot store it; running it compiled in memory");
    CacheEvent::NotStored {
        reason: error.to_string(),
    }
}

/// A directory of verified precompiled artifacts for one node.
pub struct ModuleCache {
    dir: PathBuf,
    /// The secret, in one heap block that is zeroed when the cache is dropped: a process
    /// that drops its cache before running untrusted code keeps no copy of it.
    key: Box<Zeroizing<[u8; KEY_LEN]>>,
}

impl std::fmt::Debug for ModuleCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleCache")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// The module's identity in the cache: the SHA-256 of its bytes.
pub fn module_digest(wasm: &[u8]) -> [u8; 32] {
    Sha256::digest(wasm).into()
}

impl ModuleCache {
    /// Opens (creating if needed, mode 0700) the cache at `dir` and its secret key.
    /// Refuses a directory that anyone but this user could write to.
    pub fn open(dir: &Path) -> Result<ModuleCache, CacheError> {
        let io = |action, source| CacheError::Io {
            path: dir.to_owned(),
            action,
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| io("create the directory", source))?;
        check_private(dir)?;
        let key = load_or_create_key(dir)?;
        Ok(ModuleCache {
            dir: dir.to_owned(),
            key,
        })
    }

    /// The directory the cache lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the entry for a module would live.
    pub fn entry_path(&self, fingerprint: &str, digest: &[u8; 32], kind: WasmKind) -> PathBuf {
        let extension = match kind {
            WasmKind::Module => "module",
            WasmKind::Component => "component",
        };
        self.dir
            .join(fingerprint)
            .join(format!("{}.{extension}", hex(digest)))
    }

    /// Returns the verified precompiled artifact for `digest`, compiling it with `compile`
    /// (and storing the result) when there is no valid entry. The returned bytes are safe
    /// to deserialize into an engine with `fingerprint`: this cache wrote and verified them,
    /// or `compile` made them in this process ([`CacheEvent::NotStored`]).
    pub fn get_or_compile(
        &self,
        fingerprint: &str,
        digest: &[u8; 32],
        kind: WasmKind,
        compile: impl FnOnce() -> Result<Vec<u8>, CacheError>,
    ) -> Result<(Vec<u8>, CacheEvent), CacheError> {
        let path = self.entry_path(fingerprint, digest, kind);
        let first_look = match self.read_verified(&path, fingerprint, digest, kind) {
            Ok(artifact) => return Ok((artifact, CacheEvent::Hit)),
            Err(rejection) => rejection,
        };
        let locked = path
            .parent()
            .ok_or_else(|| CacheError::Io {
                path: path.clone(),
                action: "find the fingerprint directory",
                source: std::io::ErrorKind::NotFound.into(),
            })
            .and_then(|entry_dir| {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(entry_dir)
                    .map_err(|source| CacheError::Io {
                        path: entry_dir.to_owned(),
                        action: "create the directory",
                        source,
                    })
            })
            .and_then(|()| EntryLock::acquire(&path.with_extension("lock")));
        let _lock = match locked {
            Ok(lock) => lock,
            // A cache that cannot take entries (its filesystem full or read-only) must not
            // stop a workload: it runs compiled in memory, as with no cache at all.
            Err(error) => return Ok((compile()?, not_stored(error))),
        };
        // Whoever held the lock before us may have written the entry.
        if let Ok(artifact) = self.read_verified(&path, fingerprint, digest, kind) {
            return Ok((artifact, CacheEvent::CompiledByPeer));
        }
        let artifact = compile()?;
        if let Err(error) = self.write_entry(&path, fingerprint, digest, kind, &artifact) {
            return Ok((artifact, not_stored(error)));
        }
        let event = match first_look {
            Rejection::Missing => CacheEvent::Compiled,
            Rejection::Invalid(reason) => {
                log::warn!("replaced cache entry {}: {reason}", path.display());
                CacheEvent::Replaced { reason }
            }
        };
        Ok((artifact, event))
    }

    fn header(&self, fingerprint: &str, digest: &[u8; 32], kind: WasmKind, len: usize) -> Vec<u8> {
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(MAGIC);
        header.push(match kind {
            WasmKind::Module => b'm',
            WasmKind::Component => b'c',
        });
        let mut fingerprint_field = [0u8; 32];
        let bytes = fingerprint.as_bytes();
        fingerprint_field[..bytes.len().min(32)].copy_from_slice(&bytes[..bytes.len().min(32)]);
        header.extend_from_slice(&fingerprint_field);
        header.extend_from_slice(digest);
        header.extend_from_slice(&(len as u64).to_le_bytes());
        header
    }

    fn mac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(&self.key[..]).expect("HMAC takes keys of any length")
    }

    fn read_verified(
        &self,
        path: &Path,
        fingerprint: &str,
        digest: &[u8; 32],
        kind: WasmKind,
    ) -> Result<Vec<u8>, Rejection> {
        let mut file = match File::open(path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(Rejection::Missing);
            }
            Err(error) => return Err(Rejection::Invalid(format!("unreadable: {error}"))),
        };
        let mut contents = Vec::new();
        file.read_to_end(&mut contents)
            .map_err(|error| Rejection::Invalid(format!("unreadable: {error}")))?;
        if contents.len() < HEADER_LEN + MAC_LEN {
            return Err(Rejection::Invalid("truncated".into()));
        }
        let artifact_len = contents.len() - HEADER_LEN - MAC_LEN;
        let expected_header = self.header(fingerprint, digest, kind, artifact_len);
        if contents[..HEADER_LEN] != expected_header[..] {
            return Err(Rejection::Invalid(
                "header does not match this module, engine or format".into(),
            ));
        }
        let (signed, tag) = contents.split_at(HEADER_LEN + artifact_len);
        let mut mac = self.mac();
        mac.update(signed);
        mac.verify_slice(tag).map_err(|_| {
            Rejection::Invalid(
                "authentication failed: not written by this cache, or corrupt".into(),
            )
        })?;
        contents.truncate(HEADER_LEN + artifact_len);
        contents.drain(..HEADER_LEN);
        Ok(contents)
    }

    fn write_entry(
        &self,
        path: &Path,
        fingerprint: &str,
        digest: &[u8; 32],
        kind: WasmKind,
        artifact: &[u8],
    ) -> Result<(), CacheError> {
        let dir = path
            .parent()
            .expect("entries live in a fingerprint directory");
        let io = |action, source| CacheError::Io {
            path: path.to_owned(),
            action,
            source,
        };
        let header = self.header(fingerprint, digest, kind, artifact.len());
        let mut mac = self.mac();
        mac.update(&header);
        mac.update(artifact);
        let tag = mac.finalize().into_bytes();
        let mut temp = tempfile::Builder::new()
            .prefix(".entry-")
            .tempfile_in(dir)
            .map_err(|source| io("create a temporary entry", source))?;
        temp.write_all(&header)
            .and_then(|()| temp.write_all(artifact))
            .and_then(|()| temp.write_all(&tag))
            .and_then(|()| temp.as_file().sync_all())
            .map_err(|source| io("write the entry", source))?;
        temp.persist(path)
            .map_err(|error| io("move the entry into place", error.error))?;
        Ok(())
    }
}

enum Rejection {
    Missing,
    Invalid(String),
}

fn check_private(dir: &Path) -> Result<(), CacheError> {
    let uid = unsafe { libc::geteuid() };
    let metadata = fs::symlink_metadata(dir).map_err(|source| CacheError::Io {
        path: dir.to_owned(),
        action: "inspect the directory",
        source,
    })?;
    let insecure = |problem: String| CacheError::Insecure {
        path: dir.to_owned(),
        problem,
        uid,
    };
    if !metadata.is_dir() {
        return Err(insecure("it is not a directory".into()));
    }
    if metadata.uid() != uid {
        return Err(insecure(format!("it is owned by uid {}", metadata.uid())));
    }
    if metadata.permissions().mode() & 0o022 != 0 {
        return Err(insecure(format!(
            "its mode is {:o}",
            metadata.permissions().mode() & 0o7777
        )));
    }
    Ok(())
}

fn load_or_create_key(dir: &Path) -> Result<Box<Zeroizing<[u8; KEY_LEN]>>, CacheError> {
    let path = dir.join("key");
    let io = |action, source| CacheError::Io {
        path: path.clone(),
        action,
        source,
    };
    // Read straight into the key's own block: no other buffer ever holds the secret.
    let mut key = Box::new(Zeroizing::new([0u8; KEY_LEN]));
    loop {
        match File::open(&path) {
            Ok(mut file) => {
                let metadata = file
                    .metadata()
                    .map_err(|source| io("inspect the key", source))?;
                if metadata.len() == KEY_LEN as u64 {
                    if metadata.permissions().mode() & 0o077 != 0 {
                        return Err(CacheError::Insecure {
                            path: path.clone(),
                            problem: format!(
                                "the key's mode is {:o}",
                                metadata.permissions().mode() & 0o7777
                            ),
                            uid: unsafe { libc::geteuid() },
                        });
                    }
                    file.read_exact(&mut key[..])
                        .map_err(|source| io("read the key", source))?;
                    return Ok(key);
                }
                // A damaged key invalidates every entry; a new one makes them recompile.
                log::warn!("cache key {} is damaged; replacing it", path.display());
                fs::remove_file(&path).map_err(|source| io("remove the damaged key", source))?;
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(io("read the key", source)),
        }
        File::open("/dev/urandom")
            .and_then(|mut random| random.read_exact(&mut key[..]))
            .map_err(|source| io("draw a random key", source))?;
        let mut temp = tempfile::Builder::new()
            .prefix(".key-")
            .tempfile_in(dir)
            .map_err(|source| io("create the key", source))?;
        temp.as_file()
            .set_permissions(fs::Permissions::from_mode(0o600))
            .and_then(|()| temp.write_all(&key[..]))
            .and_then(|()| temp.as_file().sync_all())
            .map_err(|source| io("write the key", source))?;
        // Linking fails if a concurrent first user created the key first; then we use theirs.
        match fs::hard_link(temp.path(), &path) {
            Ok(()) => return Ok(key),
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(source) => return Err(io("install the key", source)),
        }
    }
}

/// An exclusive `flock` on an entry's lock file, released on drop.
struct EntryLock(File);

impl EntryLock {
    fn acquire(path: &Path) -> Result<EntryLock, CacheError> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| CacheError::Io {
                path: path.to_owned(),
                action: "open the lock",
                source,
            })?;
        loop {
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(EntryLock(file));
            }
            let error = std::io::Error::last_os_error();
            if error.kind() != std::io::ErrorKind::Interrupted {
                return Err(CacheError::Io {
                    path: path.to_owned(),
                    action: "take the lock",
                    source: error,
                });
            }
        }
    }
}

impl Drop for EntryLock {
    fn drop(&mut self) {
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier};

    const FP: &str = "0123456789abcdef0123456789abcdef";

    fn compile_counting(counter: &AtomicUsize, bytes: &[u8]) -> Result<Vec<u8>, CacheError> {
        counter.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(50));
        Ok(bytes.to_vec())
    }

    #[test]
    fn miss_then_hit() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ModuleCache::open(&dir.path().join("cache")).unwrap();
        let digest = module_digest(b"module");
        let count = AtomicUsize::new(0);
        let (artifact, event) = cache
            .get_or_compile(FP, &digest, WasmKind::Module, || {
                compile_counting(&count, b"artifact")
            })
            .unwrap();
        assert_eq!(
            (artifact.as_slice(), event),
            (&b"artifact"[..], CacheEvent::Compiled)
        );
        let (artifact, event) = cache
            .get_or_compile(FP, &digest, WasmKind::Module, || {
                compile_counting(&count, b"other")
            })
            .unwrap();
        assert_eq!(
            (artifact.as_slice(), event),
            (&b"artifact"[..], CacheEvent::Hit)
        );
        assert_eq!(count.load(Ordering::SeqCst), 1);
        let mode = fs::metadata(dir.path().join("cache"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let key_mode = fs::metadata(dir.path().join("cache/key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o777, 0o600);
    }

    #[test]
    fn corrupt_truncated_and_foreign_entries_are_recompiled() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ModuleCache::open(dir.path()).unwrap();
        let digest = module_digest(b"module");
        let path = cache.entry_path(FP, &digest, WasmKind::Module);
        let count = AtomicUsize::new(0);
        cache
            .get_or_compile(FP, &digest, WasmKind::Module, || {
                compile_counting(&count, b"good")
            })
            .unwrap();

        // A flipped bit in the artifact.
        let mut bytes = fs::read(&path).unwrap();
        bytes[HEADER_LEN] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let (artifact, event) = cache
            .get_or_compile(FP, &digest, WasmKind::Module, || {
                compile_counting(&count, b"good")
            })
            .unwrap();
        assert_eq!(artifact, b"good");
        assert!(
            matches!(event, CacheEvent::Replaced { ref reason } if reason.contains("authentication")),
            "{event:?}"
        );

        // A truncated entry.
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..10]).unwrap();
        let (_, event) = cache
            .get_or_compile(FP, &digest, WasmKind::Module, || {
                compile_counting(&count, b"good")
            })
            .unwrap();
        assert!(matches!(event, CacheEvent::Replaced { .. }), "{event:?}");

        // An entry written under another key (another node's cache, or planted bytes).
        let other = ModuleCache::open(&dir.path().join("other")).unwrap();
        other
            .get_or_compile(FP, &digest, WasmKind::Module, || Ok(b"evil".to_vec()))
            .unwrap();
        fs::copy(other.entry_path(FP, &digest, WasmKind::Module), &path).unwrap();
        let (artifact, event) = cache
            .get_or_compile(FP, &digest, WasmKind::Module, || {
                compile_counting(&count, b"good")
            })
            .unwrap();
        assert_eq!(artifact, b"good");
        assert!(matches!(event, CacheEvent::Replaced { .. }), "{event:?}");
        assert_eq!(count.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn entries_do_not_cross_modules_kinds_or_engines() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ModuleCache::open(dir.path()).unwrap();
        let digest = module_digest(b"module");
        cache
            .get_or_compile(FP, &digest, WasmKind::Module, || {
                Ok(b"module artifact".to_vec())
            })
            .unwrap();
        // Same bytes copied to where another module's / kind's / engine's entry would be.
        let source = cache.entry_path(FP, &digest, WasmKind::Module);
        let other_digest = module_digest(b"another");
        let other_fp = "ffffffffffffffffffffffffffffffff";
        for (fp, digest, kind) in [
            (FP, other_digest, WasmKind::Module),
            (FP, digest, WasmKind::Component),
            (other_fp, digest, WasmKind::Module),
        ] {
            let target = cache.entry_path(fp, &digest, kind);
            fs::create_dir_all(target.parent().unwrap()).unwrap();
            fs::copy(&source, &target).unwrap();
            let (artifact, event) = cache
                .get_or_compile(fp, &digest, kind, || Ok(b"fresh".to_vec()))
                .unwrap();
            assert_eq!(artifact, b"fresh");
            assert!(matches!(event, CacheEvent::Replaced { .. }), "{event:?}");
        }
    }

    #[test]
    fn concurrent_misses_compile_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        let count = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(Barrier::new(4));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (path, count, barrier) = (path.clone(), count.clone(), barrier.clone());
                std::thread::spawn(move || {
                    // Separate opens: separate keys loads and separate lock descriptions,
                    // as separate shim processes would have.
                    barrier.wait();
                    let cache = ModuleCache::open(&path).unwrap();
                    cache
                        .get_or_compile(FP, &module_digest(b"m"), WasmKind::Module, || {
                            compile_counting(&count, b"artifact")
                        })
                        .unwrap()
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(count.load(Ordering::SeqCst), 1);
        assert!(results.iter().all(|(artifact, _)| artifact == b"artifact"));
    }

    #[test]
    fn an_open_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cache_dir = dir.path().join("cache");
        fs::create_dir(&cache_dir).unwrap();
        fs::set_permissions(&cache_dir, fs::Permissions::from_mode(0o777)).unwrap();
        let error = ModuleCache::open(&cache_dir).unwrap_err();
        assert!(matches!(error, CacheError::Insecure { .. }), "{error}");
        assert!(error.to_string().contains("777"), "{error}");
    }
}
