//! `make bench`: what Bulwark's runtime costs, measured side by side in one run.
//!
//! 1. Compile time vs loading the verified precompiled artifact from the cache.
//! 2. Instantiation latency with the pooling allocator and a precompiled module, next to
//!    bare Wasmtime doing the same; and a serving request's instance, for the small C
//!    component and the CPython one, each one timed (medians and p99, not buckets).
//! 3. A CPU-bound kernel natively (clang -O2), in bare Wasmtime, and under Bulwark with no
//!    limits, with fuel, and with a deadline (watchdog and epoch), interleaved in rounds so
//!    that machine noise hits every variant alike; medians and ratios.
//! 4. Idle memory per live instance at 1,000 instances.
//! 5. Deadline precision.
//! 6. What a usage record costs: reading the process's CPU clock (once per batch run) and
//!    writing a usage line to a pipe (once per run or request), next to a whole run of
//!    hello.c for scale.
//!
//! Guests come from `make guests` (build/guests, build/native).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use std::io::Write;

use bulwark_runtime::cache::{ModuleCache, module_digest};
use bulwark_runtime::compile::{CompileError, compile, compile_here};
use bulwark_runtime::engine::{Allocation, Facts, fingerprint_of};
use bulwark_runtime::policy::Knob;
use bulwark_runtime::run::{DeadlineMode, Workload};
use bulwark_runtime::{NodeConfig, Policy, Request, Runtime, RuntimeOptions};

const CPU_ROUNDS: &str = "2";
const CPU_REPEATS: usize = 11;
const INSTANTIATIONS: usize = 20_000;
const SERVING_INSTANTIATIONS: usize = 2_000;
const LIVE_INSTANCES: usize = 1_000;

fn build_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../build")
}

fn read_guest(name: &str) -> Vec<u8> {
    let path = build_dir().join("guests").join(format!("{name}.wasm"));
    std::fs::read(&path)
        .unwrap_or_else(|error| panic!("{}: {error} (run `make guests`)", path.display()))
}

fn policy(flags: &[(Knob, &str)]) -> Policy {
    let mut request = Request::flags();
    for (knob, value) in flags {
        request.set(*knob, value).unwrap();
    }
    Policy::resolve(&NodeConfig::default(), &request).unwrap()
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn percentile(samples: &mut [Duration], pct: f64) -> Duration {
    samples.sort();
    let index = ((samples.len() as f64 * pct / 100.0).ceil() as usize).clamp(1, samples.len()) - 1;
    samples[index]
}

fn us(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

fn main() {
    if let Ok(spec) = std::env::var(MEMORY_CHILD) {
        return measure_live_instances(&spec);
    }
    print_conditions();
    compile_vs_cached_load();
    instantiation_latency();
    cpu_kernel();
    idle_memory_per_instance();
    deadline_precision();
    usage_record_cost();
}

/// What the usage records add to a run or a request: a CPU clock read and one log line
/// (fuel and memory figures are counters the store and the limiter keep anyway).
fn usage_record_cost() {
    use bulwark_runtime::usage::{Fuel, Usage, process_cpu};
    use std::io::Write as _;
    const RECORDS: u32 = 200_000;
    println!("## 6. What a usage record costs");
    println!("| what | per run or request (us) |");
    println!("|---|---|");
    let started = Instant::now();
    for _ in 0..RECORDS {
        std::hint::black_box(process_cpu());
    }
    let clock = started.elapsed() / RECORDS;
    // The log is a pipe (the shim's FIFO to containerd): a thread drains it as they do.
    let (mut reader, mut writer) = std::io::pipe().unwrap();
    let drain = std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    let usage = Usage {
        wall: Duration::from_micros(3_587),
        cpu: None,
        fuel: Fuel::Consumed(978_336),
        memory: 14_090_240,
    };
    let started = Instant::now();
    for id in 0..RECORDS {
        // As the server writes it: formatted whole, then one write.
        let line = format!("bulwark: request {id} GET /: 200 {usage}\n");
        writer.write_all(line.as_bytes()).unwrap();
    }
    let line = started.elapsed() / RECORDS;
    drop(writer);
    drain.join().unwrap().unwrap();
    let runtime = Runtime::new(RuntimeOptions {
        allocation: Allocation::Pooling { instances: 16 },
        deadline: DeadlineMode::ProcessWatchdog,
    });
    let loaded = runtime.load(&policy(&[]), &read_guest("hello")).unwrap();
    let workload = Workload {
        inherit_stdio: false,
        ..Workload::default()
    };
    let mut runs: Vec<Duration> = (0..2_000)
        .map(|_| {
            let started = Instant::now();
            loaded.run(&workload, &Default::default()).unwrap();
            started.elapsed()
        })
        .collect();
    println!("| the process's CPU clock, read once | {:.3} |", us(clock));
    println!(
        "| a usage line, formatted and written to a drained pipe | {:.3} |",
        us(line)
    );
    println!(
        "| for scale: a whole run of hello.c (instantiate + run, its record included) | {:.2} |",
        us(median(&mut runs))
    );
    println!(
        "({RECORDS} records; the fuel and memory figures are counters Wasmtime and the limiter keep anyway)"
    );
    println!();
}

fn print_conditions() {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|name| name.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("# Bulwark runtime benchmarks");
    println!(
        "conditions: {cpu}, {} cores, Linux {}, Wasmtime 48.0.8, release build; medians over repeated runs, variants interleaved",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel.trim()
    );
    println!();
}

fn compile_vs_cached_load() {
    println!("## 1. Compile vs cached load (module cache, verified artifact)");
    println!("| module | size | compile (ms) | cached load (ms) | speed-up |");
    println!("|---|---|---|---|---|");
    let temp = tempfile::tempdir().unwrap();
    for name in ["hello", "cpu", "fileio"] {
        let wasm = read_guest(name);
        let policy = policy(&[]);
        let mut compiled_loads = Vec::new();
        let mut cached = Vec::new();
        // A new runtime on the cache directory (a new process on the node), its engine
        // built beforehand: only the load is timed (on a miss: compiling in this process,
        // signing and storing; on a hit: verifying and mapping the artifact).
        let timed_load = |dir: &Path| {
            let runtime = Runtime::new(RuntimeOptions::default());
            let request = runtime.flavor_request(&policy);
            let cache = ModuleCache::open(dir).unwrap();
            runtime
                .engine(request.flavor(&Facts::of(&wasm).unwrap()))
                .unwrap();
            let started = Instant::now();
            let fingerprint = |facts: &Facts| {
                Ok::<_, CompileError>(fingerprint_of(request.flavor(facts)).unwrap())
            };
            let (artifact, _) = cache
                .get_or_compile(&module_digest(&wasm), fingerprint, |file| {
                    let compiled = compile(&wasm, request, true)?;
                    (&*file)
                        .write_all(&compiled.artifact)
                        .map_err(CompileError::Write)?;
                    Ok(compiled.facts)
                })
                .unwrap();
            runtime.load_artifact(&policy, &artifact).unwrap();
            started.elapsed()
        };
        for round in 0..5 {
            // A fresh directory is a cold node; the second load on it is a warm one.
            let dir = temp.path().join(format!("{name}-{round}"));
            compiled_loads.push(timed_load(&dir));
            cached.push(timed_load(&dir));
        }
        let (compile, cached) = (median(&mut compiled_loads), median(&mut cached));
        println!(
            "| {name}.wasm | {} KiB | {:.2} | {:.3} | {:.0}x |",
            wasm.len() / 1024,
            ms(compile),
            ms(cached),
            compile.as_secs_f64() / cached.as_secs_f64()
        );
    }
    println!(
        "(cached load = HMAC-SHA256 check of the artifact file + mapping it + link against WASI)"
    );
    println!();
}

fn instantiation_latency() {
    println!("## 2. Instantiation latency, pooling allocator, precompiled module");
    println!("| what | median (us) | p99 (us) |");
    println!("|---|---|---|");
    let small = read_guest("small");
    let hello = read_guest("hello");

    // Bare Wasmtime: the floor. Same pooling allocator, no WASI, no limits.
    {
        let mut config = wasmtime::Config::new();
        let mut pool = wasmtime::PoolingAllocationConfig::new();
        pool.total_core_instances(16)
            .total_memories(16)
            .total_tables(16);
        config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        let engine = wasmtime::Engine::new(&config).unwrap();
        let serialized = engine.precompile_module(&small).unwrap();
        let module = unsafe { wasmtime::Module::deserialize(&engine, serialized) }.unwrap();
        let linker = wasmtime::Linker::<()>::new(&engine);
        let pre = linker.instantiate_pre(&module).unwrap();
        let mut samples = Vec::with_capacity(INSTANTIATIONS);
        for _ in 0..INSTANTIATIONS {
            let started = Instant::now();
            let mut store = wasmtime::Store::new(&engine, ());
            let instance = pre.instantiate(&mut store).unwrap();
            samples.push(started.elapsed());
            std::hint::black_box(instance);
        }
        let m = median(&mut samples);
        println!(
            "| bare Wasmtime: Store + InstancePre::instantiate (small.wat) | {:.2} | {:.2} |",
            us(m),
            us(percentile(&mut samples, 99.0))
        );
    }

    for (label, wasm, flags) in [
        ("Bulwark, no limits (small.wat)", &small, vec![]),
        (
            "Bulwark, fuel + memory cap (small.wat)",
            &small,
            vec![(Knob::Fuel, "1000000"), (Knob::Memory, "16Mi")],
        ),
        ("Bulwark, no limits (hello.c, WASI imports)", &hello, vec![]),
    ] {
        let runtime = Runtime::new(RuntimeOptions {
            allocation: Allocation::Pooling { instances: 16 },
            deadline: DeadlineMode::ProcessWatchdog,
        });
        let policy = policy(&flags);
        let loaded = runtime.load(&policy, wasm).unwrap(); // precompiled, mapped
        let workload = Workload::default();
        let mut samples = Vec::with_capacity(INSTANTIATIONS);
        for _ in 0..INSTANTIATIONS {
            let started = Instant::now();
            let instance = loaded.instantiate(&workload).unwrap().unwrap();
            samples.push(started.elapsed());
            std::hint::black_box(instance);
        }
        println!(
            "| {label}: Store + WASI context + limiter + instantiate | {:.2} | {:.2} |",
            us(median(&mut samples)),
            us(percentile(&mut samples, 99.0))
        );
    }
    // Serving mode: a fresh instance per request from the component's pool, as the server
    // makes it (Store, WASI and HTTP contexts, limiter, epoch deadline, instantiate).
    for (component, count, flags) in [
        (
            "httpd",
            SERVING_INSTANTIATIONS,
            vec![(Knob::Memory, "16Mi")],
        ),
        (
            "pyhttp",
            SERVING_INSTANTIATIONS / 10,
            vec![(Knob::Memory, "64Mi")],
        ),
    ] {
        let path = build_dir().join(format!("components/{component}.wasm"));
        let wasm = std::fs::read(&path)
            .unwrap_or_else(|error| panic!("{}: {error} (run `make components`)", path.display()));
        let runtime = Runtime::new(RuntimeOptions::default());
        let policy = policy(&flags);
        let artifact = compile_here(&wasm, runtime.flavor_request(&policy)).unwrap();
        let service = runtime.load_service(&policy, &artifact).unwrap();
        let mut samples = service
            .instantiation_times(Workload::default(), count)
            .unwrap();
        println!(
            "| serving {component}.wasm ({} KiB), a request's instance: Store + WASI + HTTP contexts + limiter + instantiate ({count} in a row) | {:.2} | {:.2} |",
            wasm.len() / 1024,
            us(median(&mut samples)),
            us(percentile(&mut samples, 99.0))
        );
    }
    println!();
}

fn cpu_kernel() {
    println!("## 3. CPU-bound kernel (cpu.c, {CPU_ROUNDS} rounds): native vs Wasm");
    let native = build_dir().join("native/cpu");
    let wasm = read_guest("cpu");
    let args = vec!["cpu".to_string(), CPU_ROUNDS.to_string()];

    // Bare Wasmtime with WASI preview 1 and a default config: the speed to match.
    let bare_engine = wasmtime::Engine::default();
    let bare_module = wasmtime::Module::new(&bare_engine, &wasm).unwrap();
    let mut bare_linker = wasmtime::Linker::new(&bare_engine);
    wasmtime_wasi::p1::add_to_linker_sync(&mut bare_linker, |cx| cx).unwrap();
    let bare_pre = bare_linker.instantiate_pre(&bare_module).unwrap();
    let run_bare = || {
        let started = Instant::now();
        let ctx = wasmtime_wasi::WasiCtxBuilder::new().args(&args).build_p1();
        let mut store = wasmtime::Store::new(&bare_engine, ctx);
        let instance = bare_pre.instantiate(&mut store).unwrap();
        let start = instance
            .get_typed_func::<(), ()>(&mut store, "_start")
            .unwrap();
        start.call(&mut store, ()).unwrap();
        started.elapsed()
    };

    let variants: Vec<(&str, Runtime, Policy)> = vec![
        (
            "Bulwark, no limits",
            Runtime::new(RuntimeOptions::default()),
            policy(&[]),
        ),
        (
            "Bulwark, memory cap 64Mi",
            Runtime::new(RuntimeOptions::default()),
            policy(&[(Knob::Memory, "64Mi")]),
        ),
        (
            "Bulwark, fuel",
            Runtime::new(RuntimeOptions::default()),
            policy(&[(Knob::Fuel, "1000000000000")]),
        ),
        (
            "Bulwark, deadline (watchdog, default)",
            Runtime::new(RuntimeOptions::default()),
            policy(&[(Knob::Timeout, "1h")]),
        ),
        (
            "Bulwark, deadline (epoch)",
            Runtime::new(RuntimeOptions {
                deadline: DeadlineMode::Epoch,
                ..RuntimeOptions::default()
            }),
            policy(&[(Knob::Timeout, "1h")]),
        ),
        (
            "Bulwark, fuel + deadline + memory",
            Runtime::new(RuntimeOptions::default()),
            policy(&[
                (Knob::Fuel, "1000000000000"),
                (Knob::Timeout, "1h"),
                (Knob::Memory, "64Mi"),
            ]),
        ),
    ];
    let loaded: Vec<_> = variants
        .iter()
        .map(|(_, runtime, policy)| runtime.load(policy, &wasm).unwrap())
        .collect();
    let workload = Workload {
        args: args.clone(),
        ..Workload::default()
    };

    let mut native_samples = Vec::new();
    let mut bare_samples = Vec::new();
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); variants.len()];
    for _ in 0..CPU_REPEATS {
        let started = Instant::now();
        let status = Command::new(&native)
            .arg(CPU_ROUNDS)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap_or_else(|error| panic!("{}: {error} (run `make guests`)", native.display()));
        assert!(status.success());
        native_samples.push(started.elapsed());
        bare_samples.push(run_bare());
        for (index, loaded) in loaded.iter().enumerate() {
            let started = Instant::now();
            let outcome = loaded.run(&workload, &Default::default()).unwrap();
            samples[index].push(started.elapsed());
            assert_eq!(outcome.exit_code(), 0, "{}", variants[index].0);
        }
    }
    let native = median(&mut native_samples);
    let bare = median(&mut bare_samples);
    println!("| variant | median (ms) | vs bare Wasmtime | vs native |");
    println!("|---|---|---|---|");
    println!(
        "| native clang -O2 (process start included) | {:.1} | {:.3} | 1.000 |",
        ms(native),
        native.as_secs_f64() / bare.as_secs_f64()
    );
    println!(
        "| bare Wasmtime, default config (instantiate + run) | {:.1} | 1.000 | {:.3} |",
        ms(bare),
        bare.as_secs_f64() / native.as_secs_f64()
    );
    for (index, (label, _, _)) in variants.iter().enumerate() {
        let m = median(&mut samples[index]);
        println!(
            "| {label} (instantiate + run) | {:.1} | {:.3} | {:.3} |",
            ms(m),
            m.as_secs_f64() / bare.as_secs_f64(),
            m.as_secs_f64() / native.as_secs_f64()
        );
    }
    println!("({CPU_REPEATS} interleaved rounds; ratios > 1 are slower)");
    println!();
}

/// Set in a child process that measures one memory configuration from a clean heap.
const MEMORY_CHILD: &str = "BULWARK_BENCH_MEMORY";

fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let resident: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    resident * 4
}

fn measure_live_instances(spec: &str) {
    let (name, allocation) = spec.split_once(':').unwrap();
    let allocation = match allocation {
        "pooling" => Allocation::Pooling {
            instances: LIVE_INSTANCES as u32 + 8,
        },
        _ => Allocation::OnDemand,
    };
    let wasm = read_guest(name);
    let runtime = Runtime::new(RuntimeOptions {
        allocation,
        ..RuntimeOptions::default()
    });
    let loaded = runtime.load(&policy(&[]), &wasm).unwrap();
    let workload = Workload::default();
    drop(loaded.instantiate(&workload).unwrap().unwrap());
    let before = rss_kib();
    let live: Vec<_> = (0..LIVE_INSTANCES)
        .map(|_| loaded.instantiate(&workload).unwrap().unwrap())
        .collect();
    let after = rss_kib();
    std::hint::black_box(&live);
    println!("{before} {after}");
}

fn idle_memory_per_instance() {
    println!(
        "## 4. Idle memory per live instance ({LIVE_INSTANCES} instances, instantiated, not run)"
    );
    println!("| module | allocator | RSS before (MiB) | RSS after (MiB) | per instance (KiB) |");
    println!("|---|---|---|---|---|");
    for name in ["small", "hello"] {
        for allocation in ["pooling", "on-demand"] {
            // A fresh process per configuration: freed heap from an earlier one would
            // otherwise absorb the growth and hide it.
            let output = Command::new(std::env::current_exe().unwrap())
                .env(MEMORY_CHILD, format!("{name}:{allocation}"))
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
            let text = String::from_utf8(output.stdout).unwrap();
            let mut numbers = text.split_whitespace().map(|n| n.parse::<u64>().unwrap());
            let (before, after) = (numbers.next().unwrap(), numbers.next().unwrap());
            println!(
                "| {name}.wasm | {allocation} | {:.1} | {:.1} | {:.1} |",
                before as f64 / 1024.0,
                after as f64 / 1024.0,
                after.saturating_sub(before) as f64 / LIVE_INSTANCES as f64
            );
        }
    }
    println!("(RSS of a fresh process: stores, WASI contexts, limiters and touched linear memory)");
}

fn deadline_precision() {
    println!();
    println!(
        "## 5. Deadline precision: `bulwark run --timeout 100ms` end to end (process start to exit 124)"
    );
    println!(
        "| guest | deadline | median elapsed (ms) | max elapsed (ms) | median overshoot (ms) |"
    );
    println!("|---|---|---|---|---|");
    // The bench runs from `<release dir>/deps`; the CLI is built next to that.
    let bulwark = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("bulwark");
    let cache = tempfile::tempdir().unwrap();
    for (label, guest, args) in [
        ("loop.wat (busy in Wasm)", "loop", vec![]),
        ("sleep.c (blocked in a host call)", "sleep", vec!["60000"]),
    ] {
        let module = build_dir().join("guests").join(format!("{guest}.wasm"));
        let mut samples = Vec::new();
        // The first run compiles into the cache; it is not a deadline sample.
        for round in 0..11 {
            let started = Instant::now();
            let status = Command::new(&bulwark)
                .env("BULWARK_CACHE_DIR", cache.path())
                .args(["run", "--timeout", "100ms"])
                .arg(&module)
                .args(&args)
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap_or_else(|error| {
                    panic!("{}: {error} (run `make build`)", bulwark.display())
                });
            if round > 0 {
                samples.push(started.elapsed());
            }
            assert_eq!(status.code(), Some(124));
        }
        let max = *samples.iter().max().unwrap();
        let m = median(&mut samples);
        println!(
            "| {label} | 100ms | {:.1} | {:.1} | {:.1} |",
            ms(m),
            ms(max),
            ms(m) - 100.0
        );
    }
    println!("(elapsed includes process start and loading the cached module)");
}
