//! The node's cache of precompiled modules.
//!
//! Compiling is slow; loading a precompiled artifact is fast. But loading one is
//! `unsafe`: Wasmtime runs the machine code it contains. So the cache only ever hands out
//! entries it wrote itself, and proves it: every entry carries an HMAC-SHA256, under a
//! secret key that lives in the (root-only) cache directory, over its header and its
//! artifact. Bytes from an image, a foreign cache or a damaged disk fail the check and are
//! recompiled, never loaded. Only the process that owns the cache (the shim, or the CLI)
//! holds the key: the processes that compile a module or run a guest get descriptors of
//! files the cache opened, never the key.
//!
//! Layout:
//! - `<dir>/key`: the secret;
//! - `<dir>/<engine fingerprint>/<module sha256>.artifact`: Wasmtime's bytes, exactly, so
//!   a loader can map the file (its code and memory images then stay shared pages of the
//!   page cache across every process that runs the module);
//! - `<dir>/<engine fingerprint>/<module sha256>.sig`: the header and the MAC over header
//!   and artifact;
//! - `<dir>/facts/<module sha256>`: what compiling learnt of the module ([`Facts`]), with
//!   its own MAC: whether it serves HTTP decides which engine (so which entry) it needs;
//! - `<dir>/locks/<module sha256>.lock`: compile-once locks; `<dir>/tmp/`: artifacts being
//!   written.
//!
//! Writes are atomic (a temporary file renamed into place, its signature after it) and two
//! processes that miss on the same module at once compile it once: the second waits on the
//! first's lock, then finds its entry.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::engine::{Facts, hex};

/// The node-wide default location, shared by every pod on the node.
pub const DEFAULT_CACHE_DIR: &str = "/var/lib/bulwark/cache";
/// Overrides the node cache directory, for the CLI and the shim (tests use a private one).
pub const CACHE_DIR_ENV: &str = "BULWARK_CACHE_DIR";

const ARTIFACT_MAGIC: &[u8; 16] = b"BULWARK-ARTIF-2\n";
const FACTS_MAGIC: &[u8; 16] = b"BULWARK-FACTS-2\n";
const KEY_LEN: usize = 32;
const MAC_LEN: usize = 32;
/// How much of an artifact is read at once to check its MAC: it is never held whole.
const CHUNK: usize = 1 << 20;

/// A module's identity in the cache: the SHA-256 of its bytes.
pub type ModuleDigest = [u8; 32];

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
}

/// What happened on a lookup: tests and logs tell a warm start from a cold one by it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheEvent {
    /// A verified entry was found.
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
    /// Compiled, but the cache could not store it (its filesystem full, say): the module
    /// runs from an artifact in memory and the next start compiles it again.
    NotStored {
        /// What the cache's filesystem said.
        reason: String,
    },
}

/// A precompiled artifact ready to load: a file whose bytes this cache wrote and verified
/// (or that the compile step just wrote, in memory), and the facts of its module.
#[derive(Debug)]
pub struct Artifact {
    /// Wasmtime's serialized module or component, exactly; read-only from here on.
    pub file: File,
    /// What compiling learnt of the module.
    pub facts: Facts,
}

/// The SHA-256 of a module, read from `file` chunk by chunk (a module is never held whole).
pub fn digest_file(file: &File) -> std::io::Result<ModuleDigest> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; CHUNK];
    let mut offset = 0u64;
    loop {
        let read = file.read_at(&mut buffer, offset)?;
        if read == 0 {
            return Ok(hasher.finalize().into());
        }
        hasher.update(&buffer[..read]);
        offset += read as u64;
    }
}

/// The module's identity in the cache: the SHA-256 of its bytes.
pub fn module_digest(wasm: &[u8]) -> ModuleDigest {
    Sha256::digest(wasm).into()
}

/// A file in memory (`memfd_create`), for an artifact the cache cannot hold.
pub fn memory_file(name: &str) -> std::io::Result<File> {
    use std::os::fd::FromRawFd;
    let name = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: memfd_create with a NUL-terminated name; the descriptor is ours.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is fresh and owned by nothing else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// An artifact compiled without a cache: `compile` writes it into a memory file.
pub fn compile_in_memory<E: From<CacheError>>(
    compile: impl FnOnce(&File) -> Result<Facts, E>,
) -> Result<Artifact, E> {
    let memory = artifact_memory()?;
    let facts = compile(&memory)?;
    Ok(in_memory(memory, facts)?)
}

/// A new memory file for a compile step to write an artifact to.
fn artifact_memory() -> Result<File, CacheError> {
    memory_file("bulwark-artifact").map_err(|source| CacheError::Io {
        path: PathBuf::from("memfd:bulwark-artifact"),
        action: "create an artifact in memory",
        source,
    })
}

/// A directory of verified precompiled artifacts for one node.
pub struct ModuleCache {
    dir: PathBuf,
    /// The secret, in one heap block that is zeroed when the cache is dropped.
    key: Box<Zeroizing<[u8; KEY_LEN]>>,
}

impl std::fmt::Debug for ModuleCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleCache")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

enum Rejection {
    Missing,
    Invalid(String),
}

fn create_private_dir(path: &Path) -> Result<(), CacheError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| CacheError::Io {
            path: path.to_owned(),
            action: "create the directory",
            source,
        })
}

impl ModuleCache {
    /// Opens (creating if needed, mode 0700) the cache at `dir` and its secret key.
    /// Refuses a directory that anyone but this user could write to.
    pub fn open(dir: &Path) -> Result<ModuleCache, CacheError> {
        create_private_dir(dir)?;
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

    /// Where the artifact for a module lives for an engine (its signature is beside it,
    /// with the extension `sig`).
    pub fn artifact_path(&self, fingerprint: &str, digest: &ModuleDigest) -> PathBuf {
        self.dir
            .join(fingerprint)
            .join(format!("{}.artifact", hex(digest)))
    }

    fn facts_path(&self, digest: &ModuleDigest) -> PathBuf {
        self.dir.join("facts").join(hex(digest))
    }

    fn mac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(&self.key[..]).expect("HMAC takes keys of any length")
    }

    /// The verified facts of a module, if a compilation recorded them.
    pub fn facts(&self, digest: &ModuleDigest) -> Option<Facts> {
        self.read_facts(digest).ok()
    }

    fn read_facts(&self, digest: &ModuleDigest) -> Result<Facts, Rejection> {
        let contents = match fs::read(self.facts_path(digest)) {
            Ok(contents) => contents,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(Rejection::Missing);
            }
            Err(error) => return Err(Rejection::Invalid(format!("unreadable facts: {error}"))),
        };
        let header = FACTS_MAGIC.len() + digest.len();
        if contents.len() < header + MAC_LEN
            || &contents[..FACTS_MAGIC.len()] != FACTS_MAGIC
            || &contents[FACTS_MAGIC.len()..header] != digest
        {
            return Err(Rejection::Invalid(
                "facts of another module or format".into(),
            ));
        }
        let (signed, tag) = contents.split_at(contents.len() - MAC_LEN);
        let mut mac = self.mac();
        mac.update(signed);
        mac.verify_slice(tag)
            .map_err(|_| Rejection::Invalid("facts failed authentication".into()))?;
        serde_json::from_slice(&signed[header..])
            .map_err(|error| Rejection::Invalid(format!("malformed facts: {error}")))
    }

    fn artifact_header(&self, fingerprint: &str, digest: &ModuleDigest, len: u64) -> Vec<u8> {
        let mut header = Vec::with_capacity(ARTIFACT_MAGIC.len() + 32 + 32 + 8);
        header.extend_from_slice(ARTIFACT_MAGIC);
        let mut fingerprint_field = [0u8; 32];
        let bytes = fingerprint.as_bytes();
        let used = bytes.len().min(32);
        fingerprint_field[..used].copy_from_slice(&bytes[..used]);
        header.extend_from_slice(&fingerprint_field);
        header.extend_from_slice(digest);
        header.extend_from_slice(&len.to_le_bytes());
        header
    }

    /// The MAC of an artifact file under `header`, read chunk by chunk.
    fn artifact_mac(&self, header: &[u8], file: &File, len: u64) -> std::io::Result<Vec<u8>> {
        let mut mac = self.mac();
        mac.update(header);
        let mut buffer = vec![0u8; CHUNK];
        let mut offset = 0u64;
        while offset < len {
            let want = CHUNK.min((len - offset) as usize);
            let read = file.read_at(&mut buffer[..want], offset)?;
            if read == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            mac.update(&buffer[..read]);
            offset += read as u64;
        }
        Ok(mac.finalize().into_bytes().to_vec())
    }

    /// The verified artifact of a module for an engine: its file, opened once and checked
    /// through that very descriptor, so what is checked is what is loaded.
    fn read_artifact(&self, fingerprint: &str, digest: &ModuleDigest) -> Result<File, Rejection> {
        let path = self.artifact_path(fingerprint, digest);
        let sig = match fs::read(path.with_extension("sig")) {
            Ok(sig) => sig,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(Rejection::Missing);
            }
            Err(error) => return Err(Rejection::Invalid(format!("unreadable: {error}"))),
        };
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(Rejection::Invalid("its signature has no artifact".into()));
            }
            Err(error) => return Err(Rejection::Invalid(format!("unreadable: {error}"))),
        };
        let len = file
            .metadata()
            .map_err(|error| Rejection::Invalid(format!("unreadable: {error}")))?
            .len();
        let header = self.artifact_header(fingerprint, digest, len);
        if sig.len() != header.len() + MAC_LEN || sig[..header.len()] != header[..] {
            return Err(Rejection::Invalid(
                "header does not match this module, engine, format or length (truncated?)".into(),
            ));
        }
        let tag = self
            .artifact_mac(&header, &file, len)
            .map_err(|error| Rejection::Invalid(format!("unreadable: {error}")))?;
        if !constant_time_eq(&tag, &sig[header.len()..]) {
            return Err(Rejection::Invalid(
                "authentication failed: not written by this cache, or corrupt".into(),
            ));
        }
        Ok(file)
    }

    /// The verified artifact for `digest` on the engine `fingerprint` names, compiling it
    /// when there is none. `fingerprint` gives the engine's fingerprint for a module's
    /// facts (a module that serves HTTP needs another engine than one run to its end);
    /// `compile` writes the artifact into the memory file it is given and returns the
    /// facts. The cache signs and stores a copy; where it cannot (its filesystem full, say)
    /// the artifact is loaded from memory ([`CacheEvent::NotStored`]).
    pub fn get_or_compile<E>(
        &self,
        digest: &ModuleDigest,
        fingerprint: impl Fn(&Facts) -> Result<String, E>,
        compile: impl FnOnce(&File) -> Result<Facts, E>,
    ) -> Result<(Artifact, CacheEvent), E>
    where
        E: From<CacheError>,
    {
        let first_look = match self.lookup(digest, &fingerprint)? {
            Ok(artifact) => return Ok((artifact, CacheEvent::Hit)),
            Err(rejection) => rejection,
        };
        let lock_path = self.dir.join("locks").join(format!("{}.lock", hex(digest)));
        let lock = create_private_dir(&self.dir.join("locks"))
            .and_then(|()| EntryLock::acquire(&lock_path));
        // A cache that cannot even take a lock (its filesystem full or read-only) must not
        // stop a workload: it still compiles, and runs from memory.
        let (held, lock_error) = match lock {
            Ok(lock) => (Some(lock), None),
            Err(error) => (None, Some(error)),
        };
        // Whoever held the lock before us may have written the entry.
        if held.is_some()
            && let Ok(artifact) = self.lookup(digest, &fingerprint)?
        {
            return Ok((artifact, CacheEvent::CompiledByPeer));
        }
        let memory = artifact_memory()?;
        let facts = compile(&memory)?;
        if let Some(error) = lock_error {
            return Ok((in_memory(memory, facts)?, not_stored(error)));
        }
        let fingerprint = fingerprint(&facts)?;
        match self.store(&memory, &fingerprint, digest, &facts) {
            Ok(file) => {
                let event = match first_look {
                    Rejection::Missing => CacheEvent::Compiled,
                    Rejection::Invalid(reason) => {
                        log::warn!(
                            "replaced cache entry {}: {reason}",
                            self.artifact_path(&fingerprint, digest).display()
                        );
                        CacheEvent::Replaced { reason }
                    }
                };
                Ok((Artifact { file, facts }, event))
            }
            Err(error) => Ok((in_memory(memory, facts)?, not_stored(error))),
        }
    }

    /// A verified entry (facts, then the artifact for their engine), or why there is none.
    fn lookup<E>(
        &self,
        digest: &ModuleDigest,
        fingerprint: &impl Fn(&Facts) -> Result<String, E>,
    ) -> Result<Result<Artifact, Rejection>, E> {
        let facts = match self.read_facts(digest) {
            Ok(facts) => facts,
            Err(rejection) => return Ok(Err(rejection)),
        };
        let fingerprint = fingerprint(&facts)?;
        Ok(self
            .read_artifact(&fingerprint, digest)
            .map(|file| Artifact { file, facts }))
    }

    /// Copies an artifact from memory into the cache, signing it on the way, and records
    /// its facts; returns the stored file, opened read-only.
    fn store(
        &self,
        memory: &File,
        fingerprint: &str,
        digest: &ModuleDigest,
        facts: &Facts,
    ) -> Result<File, CacheError> {
        let path = self.artifact_path(fingerprint, digest);
        let io = |action: &'static str| {
            let path = path.clone();
            move |source| CacheError::Io {
                path,
                action,
                source,
            }
        };
        let len = memory.metadata().map_err(io("read the artifact"))?.len();
        let header = self.artifact_header(fingerprint, digest, len);
        create_private_dir(&self.dir.join("tmp"))?;
        let mut pending = tempfile::Builder::new()
            .prefix("artifact-")
            .tempfile_in(self.dir.join("tmp"))
            .map_err(io("create a temporary artifact"))?;
        let mut mac = self.mac();
        mac.update(&header);
        let mut buffer = vec![0u8; CHUNK];
        let mut offset = 0u64;
        while offset < len {
            let want = CHUNK.min((len - offset) as usize);
            let read = memory
                .read_at(&mut buffer[..want], offset)
                .map_err(io("read the artifact"))?;
            if read == 0 {
                return Err(io("read the artifact")(
                    std::io::ErrorKind::UnexpectedEof.into(),
                ));
            }
            mac.update(&buffer[..read]);
            pending
                .write_all(&buffer[..read])
                .map_err(io("write the artifact"))?;
            offset += read as u64;
        }
        let tag = mac.finalize().into_bytes();
        pending
            .as_file()
            .sync_all()
            .map_err(io("write the artifact"))?;
        create_private_dir(
            path.parent()
                .expect("entries live in a fingerprint directory"),
        )?;
        // The signature goes last: until it is in place, no reader takes the artifact.
        let _ = fs::remove_file(path.with_extension("sig"));
        let written = pending
            .persist(&path)
            .map_err(|error| io("move the artifact into place")(error.error))?;
        write_atomically(&path.with_extension("sig"), &[&header, &tag])?;
        self.write_facts(digest, facts)?;
        // The very file just signed, read-only: not whatever the path names by now.
        reopen_read_only(&written).map_err(io("open the stored artifact"))
    }
    fn write_facts(&self, digest: &ModuleDigest, facts: &Facts) -> Result<(), CacheError> {
        let mut signed = Vec::new();
        signed.extend_from_slice(FACTS_MAGIC);
        signed.extend_from_slice(digest);
        signed.extend_from_slice(&serde_json::to_vec(facts).expect("facts serialize"));
        let mut mac = self.mac();
        mac.update(&signed);
        let tag = mac.finalize().into_bytes();
        create_private_dir(&self.dir.join("facts"))?;
        write_atomically(&self.facts_path(digest), &[&signed, &tag])
    }
}

/// Warns, once per workload, that the cache could not take an entry.
fn not_stored(error: CacheError) -> CacheEvent {
    log::warn!("{error}: the module cache cannot store it; running it compiled in memory");
    CacheEvent::NotStored {
        reason: error.to_string(),
    }
}

/// An artifact that stays in memory: sealed against any change, and opened anew read-only,
/// so that whoever loads it cannot write to it.
fn in_memory(memory: File, facts: Facts) -> Result<Artifact, CacheError> {
    let io = |action: &'static str| {
        move |source| CacheError::Io {
            path: PathBuf::from("memfd:bulwark-artifact"),
            action,
            source,
        }
    };
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: fcntl on a memfd we own.
    if unsafe { libc::fcntl(memory.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(io("seal the artifact")(std::io::Error::last_os_error()));
    }
    let file = reopen_read_only(&memory).map_err(io("reopen the artifact"))?;
    Ok(Artifact { file, facts })
}

/// `file` opened anew, read-only, through its descriptor: the same file, whatever its path
/// names meanwhile.
fn reopen_read_only(file: &File) -> std::io::Result<File> {
    File::open(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// Writes `parts` to `path` through a temporary file renamed into place.
fn write_atomically(path: &Path, parts: &[&[u8]]) -> Result<(), CacheError> {
    let dir = path.parent().expect("cache files live in a directory");
    let io = |action: &'static str| {
        let path = path.to_owned();
        move |source| CacheError::Io {
            path,
            action,
            source,
        }
    };
    let mut temp = tempfile::Builder::new()
        .prefix(".write-")
        .tempfile_in(dir)
        .map_err(io("create a temporary file"))?;
    for part in parts {
        temp.write_all(part).map_err(io("write"))?;
    }
    temp.as_file().sync_all().map_err(io("write"))?;
    temp.persist(path)
        .map_err(|error| io("move into place")(error.error))?;
    Ok(())
}

/// Compares two MACs without leaking where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
