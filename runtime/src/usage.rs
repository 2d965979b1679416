//! Usage records: what one run, or one request, used, in the one line a platform bills,
//! alerts and audits on.
//!
//! The line is logfmt (`key=value` pairs with fixed units), so a log pipeline parses it
//! without knowing Bulwark, and a person reads it as it is:
//!
//! ```text
//! bulwark: usage: exit_code=0 wall_ms=12.345 cpu_ms=10.200 fuel=48213 memory_bytes=1179648
//! ```
//!
//! Nothing here meters anything: fuel is what the store already counts when a budget is
//! set (and absent when none is), memory is what the resource limiter already tracks, and
//! the clocks are read once at each end.

use std::fmt;
use std::time::Duration;

use wasmtime::Store;

/// Fuel a run or request consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fuel {
    /// No fuel budget: nothing was counted (and counting would cost speed).
    Unmetered,
    /// Units consumed from the budget.
    Consumed(u64),
    /// Metered, but the run was ended from outside its store (a batch run's deadline ends
    /// its process from a watchdog thread), where the count cannot be read.
    Unknown,
}

/// What one run, or one request, used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Wall-clock time: a run from its start (instantiation included) to its end; a
    /// request from its arrival to its handler's end.
    pub wall: Duration,
    /// CPU time (user and system) of the whole process, where the process is the run's
    /// own (a batch container); `None` for a request, which shares its process.
    pub cpu: Option<Duration>,
    /// Fuel consumed.
    pub fuel: Fuel,
    /// The most linear memory the instance held, in bytes.
    pub memory: u64,
}

impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "wall_ms={:.3}", self.wall.as_secs_f64() * 1e3)?;
        if let Some(cpu) = self.cpu {
            write!(f, " cpu_ms={:.3}", cpu.as_secs_f64() * 1e3)?;
        }
        match self.fuel {
            Fuel::Unmetered => {}
            Fuel::Consumed(units) => write!(f, " fuel={units}")?,
            Fuel::Unknown => write!(f, " fuel=unknown")?,
        }
        write!(f, " memory_bytes={}", self.memory)
    }
}

/// Writes `line` and a newline to stderr in one `write(2)`: Rust's stderr is unbuffered, so
/// `eprintln!` makes a call per piece of its format; one call is cheaper on the request path
/// and, in the pipe a container's log is, never interleaved with another writer's line.
pub fn write_line(line: fmt::Arguments<'_>) {
    use std::io::Write;
    let mut text = line.to_string();
    text.push('\n');
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// Fuel `store` consumed of `budget` (the budget it was armed with, if any).
pub(crate) fn fuel_consumed<T>(store: &Store<T>, budget: Option<u64>) -> Fuel {
    match budget {
        None => Fuel::Unmetered,
        Some(budget) => Fuel::Consumed(budget.saturating_sub(store.get_fuel().unwrap_or(0))),
    }
}

/// CPU time this process has used, user and system together, all its threads.
pub fn process_cpu() -> Duration {
    // CLOCK_PROCESS_CPUTIME_ID rather than getrusage: the same figure, and clock_gettime is
    // a call every locked-down workload already makes.
    let mut time = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the struct it is given.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut time) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        time.tv_sec.max(0) as u64,
        time.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_usage_line_names_only_what_was_measured() {
        let request = Usage {
            wall: Duration::from_micros(1_234_567),
            cpu: None,
            fuel: Fuel::Unmetered,
            memory: 65536,
        };
        assert_eq!(request.to_string(), "wall_ms=1234.567 memory_bytes=65536");
        let run = Usage {
            cpu: Some(Duration::from_millis(5)),
            fuel: Fuel::Consumed(42),
            ..request
        };
        assert_eq!(
            run.to_string(),
            "wall_ms=1234.567 cpu_ms=5.000 fuel=42 memory_bytes=65536"
        );
        let cut = Usage {
            fuel: Fuel::Unknown,
            ..request
        };
        assert_eq!(
            cut.to_string(),
            "wall_ms=1234.567 fuel=unknown memory_bytes=65536"
        );
    }

    #[test]
    fn process_cpu_grows_with_work() {
        let before = process_cpu();
        let mut x = 0u64;
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
        }
        assert!(process_cpu() >= before + Duration::from_millis(20));
    }
}
