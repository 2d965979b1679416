//! A fuzzing driver for stable Rust. `cargo fuzz` needs a nightly compiler, which this
//! project does not use; the targets here read their inputs through [`arbitrary`] from
//! byte strings instead, so every input, generated or found, is a file that replays.
//!
//! [`fuzz`] first replays the target's regression inputs (`fuzz/regressions/<target>/*`,
//! crashes found earlier and fixed), then feeds it pseudo-random inputs until its time is
//! up. A panic in the target (an assertion of the property it checks, or a panic in the
//! code under test) saves the input under `fuzz/regressions/<target>/` and fails.
//!
//! - `BULWARK_FUZZ_SECONDS`: seconds per target (default 15: CI runs every target for
//!   about three minutes in all; `make fuzz FUZZ_SECONDS=600` runs them longer);
//! - `BULWARK_FUZZ_SEED`: the first seed (default: the clock), printed so that a run
//!   can be repeated.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use arbitrary::{Arbitrary, Result, Unstructured};
use sha2::{Digest, Sha256};

/// Seconds per target when `BULWARK_FUZZ_SECONDS` is not set.
pub const DEFAULT_SECONDS: u64 = 15;

/// Where a target's regression inputs live.
pub fn regressions(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("regressions")
        .join(target)
}

/// The time each target runs for.
pub fn budget() -> Duration {
    let seconds = std::env::var("BULWARK_FUZZ_SECONDS")
        .ok()
        .map(|text| {
            text.parse::<u64>().unwrap_or_else(|_| {
                panic!("BULWARK_FUZZ_SECONDS: {text:?} is not a number of seconds")
            })
        })
        .unwrap_or(DEFAULT_SECONDS);
    Duration::from_secs(seconds)
}

/// SplitMix64: a small, fast, seedable generator; inputs need no better randomness.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator starting at `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(len + 8);
        while bytes.len() < len {
            bytes.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        bytes.truncate(len);
        bytes
    }
}

/// One input's length: mostly short (parsers fail early on long noise), sometimes long.
fn input_len(rng: &mut Rng, max: usize) -> usize {
    let bound = match rng.next_u64() % 8 {
        0..=3 => 256,
        4..=6 => 4096,
        _ => max,
    };
    (rng.next_u64() as usize) % bound.min(max).max(1)
}

/// What one fuzzing session of a target did.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    /// Regression inputs replayed.
    pub replayed: usize,
    /// Generated inputs run.
    pub generated: u64,
    /// Inputs the target used up before it was done with them (`arbitrary` ran dry).
    pub exhausted: u64,
}

/// Fuzzes `target` with `check` for [`budget`], inputs at most `max_len` bytes long; see
/// the crate documentation. Panics (failing the test) on the first input that makes
/// `check` panic, after saving it.
pub fn fuzz(
    target: &str,
    max_len: usize,
    check: impl Fn(&mut Unstructured<'_>) -> Result<()>,
) -> Summary {
    fuzz_for(target, budget(), max_len, check)
}

/// [`fuzz`] for a given time.
pub fn fuzz_for(
    target: &str,
    time: Duration,
    max_len: usize,
    check: impl Fn(&mut Unstructured<'_>) -> Result<()>,
) -> Summary {
    let dir = regressions(target);
    let mut saved: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|entries| entries.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    saved.sort();
    let mut replayed = 0;
    for path in saved.iter().filter(|p| p.is_file()) {
        let input = std::fs::read(path)
            .unwrap_or_else(|e| panic!("cannot read regression input {}: {e}", path.display()));
        if let Err(message) = run_one(&check, &input) {
            panic!(
                "{target}: regression input {} fails again: {message}",
                path.display()
            );
        }
        replayed += 1;
    }
    match search(target, time, max_len, check) {
        Ok(summary) => Summary {
            replayed,
            ..summary
        },
        Err(finding) => {
            let path = save(&dir, &finding.input);
            panic!(
                "{target}: {}\nThe input is saved at {}; once fixed, commit it there as a regression test.",
                finding,
                path.display()
            );
        }
    }
}

/// An input that made a target panic.
#[derive(Debug, Clone)]
pub struct Finding {
    /// The input.
    pub input: Vec<u8>,
    /// The seed and the index of the input, which reproduce it.
    pub seed: u64,
    /// How many inputs ran before it.
    pub index: u64,
    /// The panic's message.
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "input {} of seed {} fails: {}",
            self.index, self.seed, self.message
        )
    }
}

/// Runs `check` on generated inputs for `time` and returns the first [`Finding`], without
/// saving it: for [`fuzz_for`], and for tests that show a target finds a planted flaw.
pub fn search(
    target: &str,
    time: Duration,
    max_len: usize,
    check: impl Fn(&mut Unstructured<'_>) -> Result<()>,
) -> std::result::Result<Summary, Finding> {
    let seed = std::env::var("BULWARK_FUZZ_SEED")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
    let mut summary = Summary {
        replayed: 0,
        generated: 0,
        exhausted: 0,
    };
    let started = Instant::now();
    while started.elapsed() < time {
        let mut rng = Rng::new(seed.wrapping_add(summary.generated));
        let len = input_len(&mut rng, max_len);
        let input = rng.bytes(len);
        match run_one(&check, &input) {
            Ok(true) => {}
            Ok(false) => summary.exhausted += 1,
            Err(message) => {
                return Err(Finding {
                    input,
                    seed,
                    index: summary.generated,
                    message,
                });
            }
        }
        summary.generated += 1;
    }
    println!(
        "fuzz {target}: {} inputs in {:.0?} ({} ran out of bytes early; seed {seed}, BULWARK_FUZZ_SEED={seed} repeats it)",
        summary.generated,
        started.elapsed(),
        summary.exhausted
    );
    Ok(summary)
}

/// Runs `check` on one input: `Ok(true)` when it passed, `Ok(false)` when the input ran
/// out before the target was done with it, `Err` with the panic's message.
fn run_one(
    check: &impl Fn(&mut Unstructured<'_>) -> Result<()>,
    input: &[u8],
) -> std::result::Result<bool, String> {
    match catch_unwind(AssertUnwindSafe(|| check(&mut Unstructured::new(input)))) {
        Ok(result) => Ok(result.is_ok()),
        Err(panic) => Err(describe(&panic)),
    }
}

fn save(dir: &Path, input: &[u8]) -> PathBuf {
    let name = format!("crash-{:x}", Sha256::digest(input))[..22].to_owned();
    let path = dir.join(name);
    if let Err(error) = std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&path, input)) {
        eprintln!(
            "cannot save the failing input at {}: {error}",
            path.display()
        );
    }
    path
}

fn describe(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Picks one of `choices`.
pub fn pick<'a, T: ?Sized>(u: &mut Unstructured<'_>, choices: &[&'a T]) -> Result<&'a T> {
    Ok(choices[u.choose_index(choices.len())?])
}

/// A short text built mostly from `pieces` (the tokens a parser cares about), with an
/// arbitrary string now and then.
pub fn text(u: &mut Unstructured<'_>, pieces: &[&str]) -> Result<String> {
    let mut text = String::new();
    for _ in 0..u.int_in_range(0..=6)? {
        if u.ratio(1, 6)? {
            let noise: &str = u.arbitrary()?;
            text.push_str(&noise[..noise.floor_char_boundary(16)]);
        } else {
            text.push_str(pick(u, pieces)?);
        }
    }
    Ok(text)
}
