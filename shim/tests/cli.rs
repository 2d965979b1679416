//! `bulwark run` and `bulwark compile`, end to end: the real binary, real guests built by
//! `make guests components`, real files. Every knob, every exit code, every adversarial
//! guest and the bad inputs a user will type.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

fn build_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../build")
}

/// A guest module built by `make guests` (`components/NAME` for a component).
fn guest(name: &str) -> PathBuf {
    let path = build_dir().join(if name.starts_with("components/") {
        format!("{name}.wasm")
    } else {
        format!("guests/{name}.wasm")
    });
    assert!(
        path.exists(),
        "{} is missing: run `make guests components` (make test does)",
        path.display()
    );
    path
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl From<Output> for Run {
    fn from(output: Output) -> Run {
        Run {
            code: output
                .status
                .code()
                .expect("bulwark was killed by a signal"),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

/// `bulwark` with a private cache and an empty environment, so nothing of the test
/// runner's environment can leak into a guest by accident.
fn bulwark(cache: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_bulwark"));
    command
        .env_clear()
        .env("BULWARK_CACHE_DIR", cache)
        .stdin(Stdio::null());
    command
}

struct Fixture {
    temp: TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture {
            temp: tempfile::tempdir().unwrap(),
        }
    }

    fn cache(&self) -> PathBuf {
        self.temp.path().join("cache")
    }

    fn dir(&self, name: &str) -> PathBuf {
        let path = self.temp.path().join(name);
        fs::create_dir_all(&path).unwrap();
        path
    }

    fn run(&self, args: &[&str]) -> Run {
        bulwark(&self.cache())
            .arg("run")
            .args(args)
            .output()
            .unwrap()
            .into()
    }
}

fn path(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn hello_runs_and_exits_zero() {
    let fx = Fixture::new();
    let run = fx.run(&[path(&guest("hello"))]);
    assert_eq!(
        (run.code, run.stdout.as_str(), run.stderr.as_str()),
        (0, "hello from bulwark\n", "")
    );
}

#[test]
fn args_and_only_the_given_env_reach_the_guest() {
    let fx = Fixture::new();
    let module = guest("echo");
    let run: Run = bulwark(&fx.cache())
        .env("FROM_HOST", "host value")
        .env("SECRET", "must not leak")
        .args([
            "run",
            "--env",
            "MODE=fast",
            "--env",
            "FROM_HOST",
            "--env",
            "EMPTY=",
        ])
        .arg(&module)
        .args(["one", "--two", "three four"])
        .output()
        .unwrap()
        .into();
    assert_eq!(run.code, 0, "{}", run.stderr);
    let expected = format!(
        "arg[0]={}\narg[1]=one\narg[2]=--two\narg[3]=three four\nenv:MODE=fast\nenv:FROM_HOST=host value\nenv:EMPTY=\n",
        module.display()
    );
    assert_eq!(run.stdout, expected);
}

#[test]
fn env_name_not_set_here_is_an_error() {
    let fx = Fixture::new();
    let run = fx.run(&["--env", "NOT_SET_ANYWHERE", path(&guest("echo"))]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("--env NOT_SET_ANYWHERE"),
        "{}",
        run.stderr
    );
}

#[test]
fn guest_exit_codes_pass_through() {
    let fx = Fixture::new();
    for code in ["0", "1", "3", "42", "125"] {
        let run = fx.run(&[path(&guest("exit")), code]);
        assert_eq!(run.code.to_string(), code, "{}", run.stderr);
        assert_eq!(run.stderr, "");
    }
}

#[test]
fn stdin_reaches_the_guest() {
    let fx = Fixture::new();
    let mut child = bulwark(&fx.cache())
        .args(["run", path(&guest("cat"))])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"line one\nline two\n")
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(output.stdout, b"line one\nline two\n");
}

#[test]
fn fuel_stops_an_infinite_loop_with_152() {
    let fx = Fixture::new();
    let run = fx.run(&["--fuel", "1000000", path(&guest("loop"))]);
    assert_eq!(run.code, 152);
    assert_eq!(
        run.stderr,
        "bulwark: fuel exhausted after 1000000 units (--fuel)\n"
    );
}

#[test]
fn enough_fuel_lets_a_guest_finish() {
    let fx = Fixture::new();
    let run = fx.run(&["--fuel", "100000000", path(&guest("hello"))]);
    assert_eq!((run.code, run.stdout.as_str()), (0, "hello from bulwark\n"));
}

#[test]
fn deadline_stops_an_infinite_loop_with_124() {
    let fx = Fixture::new();
    let started = Instant::now();
    let run = fx.run(&["--timeout", "300ms", path(&guest("loop"))]);
    let elapsed = started.elapsed();
    assert_eq!(run.code, 124);
    assert_eq!(
        run.stderr,
        "bulwark: deadline of 300ms exceeded (--timeout)\n"
    );
    // Precision is measured in `make bench`; here only that it is not wildly late.
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
}

#[test]
fn deadline_also_stops_a_guest_blocked_in_a_host_call() {
    let fx = Fixture::new();
    let run = fx.run(&["--timeout", "200ms", path(&guest("sleep")), "60000"]);
    assert_eq!(run.code, 124, "{}", run.stderr);
    assert!(
        run.stderr.contains("deadline of 200ms exceeded"),
        "{}",
        run.stderr
    );
}

#[test]
fn memory_bomb_dies_with_137_and_the_host_stays_healthy() {
    let fx = Fixture::new();
    let run = fx.run(&["--memory", "16Mi", path(&guest("membomb"))]);
    assert_eq!(run.code, 137, "{}", run.stderr);
    let last = run.stderr.lines().last().unwrap();
    assert!(
        last.starts_with(
            "bulwark: memory limit of 16Mi reached (--memory): growing linear memory to "
        ),
        "{}",
        run.stderr
    );
    // The guest saw malloc fail: growth was refused, not the process killed.
    assert!(run.stderr.contains("malloc failed after"), "{}", run.stderr);
}

#[test]
fn pure_wasm_memory_growth_is_capped() {
    let fx = Fixture::new();
    let run = fx.run(&["--memory", "8Mi", path(&guest("grow"))]);
    assert_eq!(run.code, 137, "{}", run.stderr);
    assert!(
        run.stderr.contains("memory limit of 8Mi reached"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_module_whose_initial_memory_exceeds_the_cap_does_not_start() {
    let fx = Fixture::new();
    // C guests start with more than 64Ki of memory (stack and data).
    let run = fx.run(&["--memory", "64Ki", path(&guest("hello"))]);
    assert_eq!(run.code, 137, "{}", run.stderr);
    assert_eq!(run.stdout, "");
    assert!(
        run.stderr.contains("memory limit of 64Ki reached"),
        "{}",
        run.stderr
    );
}

#[test]
fn table_growth_is_capped_even_without_a_memory_limit() {
    let fx = Fixture::new();
    let run = fx.run(&[path(&guest("tablebomb"))]);
    assert_eq!(run.code, 137, "{}", run.stderr);
    assert!(run.stderr.contains("growing tables to"), "{}", run.stderr);
}

#[test]
fn unbounded_recursion_traps_with_134() {
    let fx = Fixture::new();
    for name in ["stack", "recurse"] {
        let run = fx.run(&[path(&guest(name))]);
        assert_eq!(run.code, 134, "{name}: {}", run.stderr);
        assert!(run.stderr.contains("bulwark: trapped: "), "{}", run.stderr);
        assert!(
            run.stderr.contains("call stack exhausted"),
            "{}",
            run.stderr
        );
    }
}

#[test]
fn etc_passwd_is_unreadable_without_a_grant() {
    let fx = Fixture::new();
    let run = fx.run(&[path(&guest("passwd"))]);
    assert_eq!(run.code, 1);
    assert_eq!(run.stdout, "");
    assert!(
        run.stderr.starts_with("passwd: /etc/passwd: "),
        "{}",
        run.stderr
    );
}

#[test]
fn a_granted_directory_is_readable_at_its_own_path() {
    let fx = Fixture::new();
    let data = fx.dir("data");
    fs::write(data.join("note.txt"), "granted\n").unwrap();
    let run = fx.run(&[
        "--dir",
        path(&data),
        path(&guest("fileio")),
        "read",
        path(&data.join("note.txt")),
    ]);
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (0, "granted\n"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_read_only_directory_cannot_be_changed() {
    let fx = Fixture::new();
    let data = fx.dir("ro");
    fs::write(data.join("file"), "original").unwrap();
    fs::create_dir(data.join("sub")).unwrap();
    let file = path(&data.join("file")).to_owned();
    let new = path(&data.join("new")).to_owned();
    let sub = path(&data.join("sub")).to_owned();
    let attempts: Vec<Vec<&str>> = vec![
        vec!["write", &file, "changed"],
        vec!["append", &file, "more"],
        vec!["write", &new, "x"],
        vec!["truncate", &file],
        vec!["rm", &file],
        vec!["rename", &file, &new],
        vec!["mkdir", &new],
        vec!["rmdir", &sub],
        vec!["symlink", "/etc/passwd", &new],
    ];
    let fileio = guest("fileio");
    for mode in [
        format!("{}", data.display()),
        format!("{}:ro", data.display()),
    ] {
        for attempt in &attempts {
            let mut args = vec!["--dir", mode.as_str(), path(&fileio)];
            args.extend(attempt.iter().copied());
            let run = fx.run(&args);
            assert_eq!(
                run.code, 1,
                "{attempt:?} succeeded: {} {}",
                run.stdout, run.stderr
            );
            assert!(run.stderr.starts_with("fileio: "), "{}", run.stderr);
        }
    }
    assert_eq!(fs::read_to_string(data.join("file")).unwrap(), "original");
    let mut entries: Vec<_> = fs::read_dir(&data)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    entries.sort();
    assert_eq!(entries, ["file", "sub"]);
    // Reading still works.
    let run = fx.run(&[
        "--dir",
        &format!("{}:ro", data.display()),
        path(&guest("fileio")),
        "read",
        &file,
    ]);
    assert_eq!((run.code, run.stdout.as_str()), (0, "original"));
}

#[test]
fn a_read_write_directory_can_be_changed() {
    let fx = Fixture::new();
    let data = fx.dir("rw");
    let file = data.join("out.txt");
    let grant = format!("{}:rw", data.display());
    let run = fx.run(&[
        "--dir",
        &grant,
        path(&guest("fileio")),
        "write",
        path(&file),
        "written",
    ]);
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (0, "wrote 7 bytes\n"),
        "{}",
        run.stderr
    );
    assert_eq!(fs::read_to_string(&file).unwrap(), "written");
    let run = fx.run(&["--dir", &grant, path(&guest("fileio")), "rm", path(&file)]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(!file.exists());
}

#[test]
fn symlinks_and_dotdot_cannot_leave_a_preopen() {
    let fx = Fixture::new();
    let jail = fx.dir("jail");
    symlink("/etc", jail.join("link-to-etc")).unwrap();
    symlink("/etc/passwd", jail.join("link-to-passwd")).unwrap();
    symlink("../../../../../../..", jail.join("link-up")).unwrap();
    for mode in ["ro", "rw"] {
        let run = fx.run(&[
            "--dir",
            &format!("{}:{mode}", jail.display()),
            path(&guest("escape")),
            path(&jail),
        ]);
        assert!(!run.stdout.contains("ESCAPED"), "{mode}: {}", run.stdout);
        assert_eq!(run.code, 0, "{mode}: {}{}", run.stdout, run.stderr);
        assert!(run.stdout.lines().count() >= 10, "{}", run.stdout);
        assert!(
            run.stdout
                .lines()
                .all(|line| line.starts_with("contained: ")),
            "{}",
            run.stdout
        );
    }
}

#[test]
fn missing_and_non_wasm_files_are_clear_errors() {
    let fx = Fixture::new();
    let text = fx.temp.path().join("notes.txt");
    fs::write(&text, "just text").unwrap();
    let invalid = fx.temp.path().join("invalid.wasm");
    fs::write(&invalid, b"\0asm\x01\0\0\0\x01\x05garbage").unwrap();
    let empty = fx.temp.path().join("empty.wasm");
    fs::write(&empty, b"").unwrap();
    let cases: [(&str, &str); 6] = [
        ("/nonexistent/app.wasm", "No such file"),
        ("/bin/true", "ELF executable"),
        (path(&text), "not a WebAssembly module or component"),
        (path(&invalid), "invalid WebAssembly"),
        (path(&empty), "empty"),
        (path(fx.temp.path()), "is a directory"),
    ];
    for (module, message) in cases {
        let run = fx.run(&[module]);
        assert_eq!(run.code, 2, "{module}: {}", run.stderr);
        assert!(run.stderr.starts_with("bulwark: error: "), "{}", run.stderr);
        assert!(
            run.stderr.contains(module) && run.stderr.contains(message),
            "{}",
            run.stderr
        );
        assert_eq!(run.stderr.lines().count(), 1, "one line: {}", run.stderr);
    }
}

#[test]
fn modules_that_need_what_bulwark_does_not_provide_are_refused() {
    let fx = Fixture::new();
    let library = fx.temp.path().join("library.wasm");
    fs::write(&library, wat_module("(module (func (export \"add\")))")).unwrap();
    let run = fx.run(&[path(&library)]);
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("exports no _start"), "{}", run.stderr);
    let importer = fx.temp.path().join("importer.wasm");
    fs::write(
        &importer,
        wat_module("(module (import \"env\" \"secret\" (func)) (func (export \"_start\")))"),
    )
    .unwrap();
    let run = fx.run(&[path(&importer)]);
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("env::secret"), "{}", run.stderr);
}

/// Builds a tiny module with wat2wasm (installed with the guests' toolchain).
fn wat_module(text: &str) -> Vec<u8> {
    let temp = tempfile::tempdir().unwrap();
    let source = temp.path().join("m.wat");
    let output = temp.path().join("m.wasm");
    fs::write(&source, text).unwrap();
    let status = Command::new("wat2wasm")
        .arg(&source)
        .arg("-o")
        .arg(&output)
        .status()
        .unwrap();
    assert!(status.success());
    fs::read(output).unwrap()
}

#[test]
fn bad_flags_name_the_flag_and_value() {
    let fx = Fixture::new();
    let hello = guest("hello");
    let cases: [(&[&str], &str); 9] = [
        (&["--fuel", "lots"], "--fuel: \"lots\" is malformed"),
        (&["--fuel", "0"], "--fuel: \"0\" is malformed"),
        (&["--timeout", "30"], "--timeout: \"30\" is malformed"),
        (&["--memory", "64MB"], "--memory: \"64MB\" is malformed"),
        (
            &["--dir", "relative/path"],
            "--dir: \"relative/path\" is malformed",
        ),
        (&["--dir", "/tmp:rx"], "--dir: \"/tmp:rx\" is malformed"),
        (
            &["--dir", "/nonexistent-dir"],
            "--dir /nonexistent-dir: not a directory",
        ),
        (
            &["--network", "tcp:example.com:80"],
            "--network: \"tcp:example.com:80\" is malformed",
        ),
        (&["--frobnicate"], "--frobnicate"),
    ];
    for (flags, message) in cases {
        let mut args = flags.to_vec();
        args.push(path(&hello));
        let run = fx.run(&args);
        assert_eq!(run.code, 2, "{flags:?}: {}", run.stderr);
        assert!(run.stderr.contains(message), "{flags:?}: {}", run.stderr);
    }
    let run: Run = bulwark(&fx.cache()).arg("run").output().unwrap().into();
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("MODULE"), "{}", run.stderr);
}

#[test]
fn node_config_ceilings_and_defaults_apply() {
    let fx = Fixture::new();
    let config = fx.temp.path().join("config.toml");
    fs::write(
        &config,
        "[defaults]\nmemory = \"16Mi\"\n[ceilings]\nmemory = \"32Mi\"\nfuel = 5000000\n",
    )
    .unwrap();
    let config = path(&config).to_owned();
    // Above the ceiling: refused before anything runs.
    let run = fx.run(&[
        "--config",
        &config,
        "--memory",
        "64Mi",
        path(&guest("hello")),
    ]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr
            .contains("--memory: \"64Mi\" is above this node's ceiling of 32Mi"),
        "{}",
        run.stderr
    );
    // Nothing asked: the default memory and the fuel ceiling hold.
    let run = fx.run(&["--config", &config, path(&guest("grow"))]);
    assert_eq!(run.code, 137, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("memory limit of 16Mi reached (node default)"),
        "{}",
        run.stderr
    );
    let run = fx.run(&["--config", &config, path(&guest("loop"))]);
    assert_eq!(run.code, 152, "{}", run.stderr);
    assert!(
        run.stderr.contains("after 5000000 units (node ceiling)"),
        "{}",
        run.stderr
    );
    // Network grants need the node's permission.
    let run = fx.run(&[
        "--config",
        &config,
        "--network",
        "tcp:127.0.0.1:80",
        path(&guest("hello")),
    ]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("allow_network = false"),
        "{}",
        run.stderr
    );
}

#[test]
fn bad_node_configs_are_errors() {
    let fx = Fixture::new();
    let cases = [
        ("[ceilings]\nmemroy = \"1Gi\"\n", "memroy"),
        ("[defaults]\nmemory = \"lots\"\n", "defaults.memory"),
        (
            "[defaults]\nfuel = 10\n[ceilings]\nfuel = 5\n",
            "defaults.fuel = 10 is above ceilings.fuel = 5",
        ),
        ("this is [not toml", "malformed node configuration"),
    ];
    for (text, message) in cases {
        let config = fx.temp.path().join("bad.toml");
        fs::write(&config, text).unwrap();
        let run = fx.run(&["--config", path(&config), path(&guest("hello"))]);
        assert_eq!(run.code, 2, "{text}: {}", run.stderr);
        assert!(run.stderr.contains(message), "{}", run.stderr);
    }
    let run = fx.run(&[
        "--config",
        "/nonexistent/config.toml",
        path(&guest("hello")),
    ]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr
            .contains("cannot read node configuration /nonexistent/config.toml: No such file"),
        "{}",
        run.stderr
    );
}

#[test]
fn compile_fills_the_cache_once_and_runs_use_it() {
    let fx = Fixture::new();
    let hello = guest("hello");
    let compile = |fx: &Fixture| -> Run {
        bulwark(&fx.cache())
            .arg("compile")
            .arg(&hello)
            .output()
            .unwrap()
            .into()
    };
    let first = compile(&fx);
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert_eq!(
        first.stdout.matches(": compiled ").count(),
        2,
        "{}",
        first.stdout
    );
    let second = compile(&fx);
    assert_eq!(
        second.stdout.matches(": already cached ").count(),
        2,
        "{}",
        second.stdout
    );
    // Corrupt every entry: the next run must detect it, recompile and still work.
    let mut entries = 0;
    for fingerprint in fs::read_dir(fx.cache()).unwrap() {
        let fingerprint = fingerprint.unwrap().path();
        if !fingerprint.is_dir() {
            continue;
        }
        for entry in fs::read_dir(&fingerprint).unwrap() {
            let entry = entry.unwrap().path();
            if entry.extension().is_some_and(|ext| ext == "artifact") {
                let mut bytes = fs::read(&entry).unwrap();
                let middle = bytes.len() / 2;
                bytes[middle] ^= 0xff;
                fs::write(&entry, bytes).unwrap();
                entries += 1;
            }
        }
    }
    assert_eq!(entries, 2);
    let run = fx.run(&[path(&hello)]);
    assert_eq!((run.code, run.stdout.as_str()), (0, "hello from bulwark\n"));
    assert!(
        run.stderr.contains("replaced cache entry"),
        "{}",
        run.stderr
    );
    let third = compile(&fx);
    assert_eq!(
        third.stdout.matches(": recompiled ").count(),
        1,
        "{}",
        third.stdout
    );
    assert_eq!(
        third.stdout.matches(": already cached ").count(),
        1,
        "{}",
        third.stdout
    );
}

#[test]
fn concurrent_first_runs_compile_once() {
    let fx = Fixture::new();
    let cpu = guest("cpu");
    let children: Vec<_> = (0..4)
        .map(|_| {
            bulwark(&fx.cache())
                .arg("compile")
                .arg(&cpu)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<String> = children
        .into_iter()
        .map(|child| String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap())
        .collect();
    let all = outputs.concat();
    assert_eq!(all.matches(": compiled ").count(), 2, "{all}");
    assert_eq!(all.matches(": already cached ").count(), 6, "{all}");
}

#[test]
fn an_unsafe_cache_directory_is_not_trusted() {
    let fx = Fixture::new();
    let cache = fx.dir("open-cache");
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&cache, fs::Permissions::from_mode(0o777)).unwrap();
    let run: Run = bulwark(&cache)
        .args(["run", path(&guest("hello"))])
        .output()
        .unwrap()
        .into();
    assert_eq!((run.code, run.stdout.as_str()), (0, "hello from bulwark\n"));
    assert!(run.stderr.contains("not safe to trust"), "{}", run.stderr);
    assert_eq!(
        fs::read_dir(&cache).unwrap().count(),
        0,
        "nothing written to it"
    );
}

#[test]
fn no_cache_runs_without_touching_the_cache() {
    let fx = Fixture::new();
    let run = fx.run(&["--no-cache", path(&guest("hello"))]);
    assert_eq!(run.code, 0);
    assert!(!fx.cache().exists());
}

#[test]
fn components_run_under_the_same_policy() {
    let fx = Fixture::new();
    let run = fx.run(&[path(&guest("components/hello"))]);
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (0, "hello from bulwark\n"),
        "{}",
        run.stderr
    );
    let run = fx.run(&["--env", "A=1", path(&guest("components/echo")), "x"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout.ends_with("arg[1]=x\nenv:A=1\n"),
        "{}",
        run.stdout
    );
    // WASI preview 2 exits carry success or failure only.
    let run = fx.run(&[path(&guest("components/exit")), "3"]);
    assert_eq!(run.code, 1);
    let run = fx.run(&["--fuel", "100000", path(&guest("components/cpu"))]);
    assert_eq!(run.code, 152, "{}", run.stderr);
    let run = fx.run(&["--memory", "16Mi", path(&guest("components/membomb"))]);
    assert_eq!(run.code, 137, "{}", run.stderr);
    let run = fx.run(&[
        "--timeout",
        "200ms",
        path(&guest("components/sleep")),
        "60000",
    ]);
    assert_eq!(run.code, 124, "{}", run.stderr);
    let run = fx.run(&[path(&guest("components/passwd"))]);
    assert_eq!(run.code, 1, "{}", run.stderr);
}

#[test]
fn components_respect_read_only_dirs_and_escapes() {
    let fx = Fixture::new();
    let data = fx.dir("cdata");
    fs::write(data.join("file"), "original").unwrap();
    symlink("/etc", data.join("link-to-etc")).unwrap();
    let ro = format!("{}:ro", data.display());
    let run = fx.run(&[
        "--dir",
        &ro,
        path(&guest("components/fileio")),
        "write",
        path(&data.join("file")),
        "x",
    ]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert_eq!(fs::read_to_string(data.join("file")).unwrap(), "original");
    let run = fx.run(&["--dir", &ro, path(&guest("components/escape")), path(&data)]);
    assert!(!run.stdout.contains("ESCAPED"), "{}", run.stdout);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
}

#[test]
fn help_explains_every_flag() {
    let output = Command::new(env!("CARGO_BIN_EXE_bulwark"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    for flag in [
        "--fuel",
        "--timeout",
        "--memory",
        "--dir",
        "--env",
        "--network",
        "--config",
        "152",
        "124",
        "137",
        "134",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
}

/// The value of `key` in a `key=value` usage line.
fn usage_value<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
}

/// The usage line of a run's stderr.
fn usage_line(run: &Run) -> &str {
    run.stderr
        .lines()
        .find(|line| line.starts_with("bulwark: usage: "))
        .unwrap_or_else(|| panic!("no usage line: {}", run.stderr))
}

#[test]
fn the_usage_line_counts_the_fuel_the_run_needed() {
    let fx = Fixture::new();
    let hello_path = guest("hello");
    let hello = path(&hello_path);
    let run = fx.run(&["--usage", "--fuel", "100000000", hello]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let line = usage_line(&run);
    assert!(
        line.starts_with("bulwark: usage: exit_code=0 wall_ms="),
        "{line}"
    );
    assert!(usage_value(line, "cpu_ms").is_some(), "{line}");
    let fuel: u64 = usage_value(line, "fuel").unwrap().parse().unwrap();
    // Measured apart from the count: that budget is enough, half of it is not. (Wasmtime
    // checks fuel at loop heads and calls, so the least budget that finishes can be a few
    // units under the count; the runtime's tests pin the count to the instruction.)
    let exact = fx.run(&["--fuel", &fuel.to_string(), hello]);
    assert_eq!(exact.code, 0, "{fuel}: {}", exact.stderr);
    let short = fx.run(&["--fuel", &(fuel / 2).to_string(), hello]);
    assert_eq!(short.code, 152, "{}: {}", fuel / 2, short.stderr);
    // Without a budget nothing is metered, and the line says no figure for it.
    let unmetered = fx.run(&["--usage", hello]);
    assert!(usage_value(usage_line(&unmetered), "fuel").is_none());
    // And without --usage the CLI prints no line at all.
    assert_eq!(fx.run(&[hello]).stderr, "");
}

#[test]
fn the_usage_line_names_the_memory_the_guest_grew_to() {
    let fx = Fixture::new();
    // grow.wat: 1 page, then 16 pages (1 MiB) at a time until refused, then a trap. Under
    // 4Mi: 1, 17, 33 and 49 pages are granted, 65 (4.06 MiB) is refused.
    let run = fx.run(&["--usage", "--memory", "4Mi", path(&guest("grow"))]);
    assert_eq!(run.code, 137, "{}", run.stderr);
    let line = usage_line(&run);
    assert!(line.contains("exit_code=137 limit=memory "), "{line}");
    assert_eq!(usage_value(line, "memory_bytes"), Some("3211264"), "{line}");
}

#[test]
fn a_run_the_deadline_ended_still_reports_its_usage() {
    let fx = Fixture::new();
    let run = fx.run(&[
        "--usage",
        "--timeout",
        "300ms",
        "--fuel",
        "100000000000",
        path(&guest("sleep")),
        "60000",
    ]);
    assert_eq!(run.code, 124, "{}", run.stderr);
    let line = usage_line(&run);
    assert!(line.contains("exit_code=124 limit=timeout "), "{line}");
    let wall: f64 = usage_value(line, "wall_ms").unwrap().parse().unwrap();
    assert!(wall >= 300.0, "{line}");
    // The guest held its store when the process was ended: its count is not to be had.
    assert_eq!(usage_value(line, "fuel"), Some("unknown"), "{line}");
    assert_ne!(usage_value(line, "memory_bytes"), Some("0"), "{line}");
}

#[test]
fn wasi_0_3_commands_run_with_their_exit_codes_and_limits() {
    let fx = Fixture::new();
    // Hand-written: WASI 0.3 imports only.
    let wat_path = guest("components/p3-command");
    let wat = path(&wat_path);
    let run = fx.run(&[wat, "42"]);
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (42, "hello from a p3 command\n")
    );
    // CPython by componentize-py: WASI 0.3 and 0.2 imports together.
    let python_path = guest("components/pycmd-p3");
    let python = path(&python_path);
    let run = fx.run(&["--usage", "--fuel", "10000000000", python, "3"]);
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert_eq!(run.stdout, "hello from a p3 command\n");
    assert!(usage_line(&run).contains("exit_code=3 "), "{}", run.stderr);
    assert_eq!(fx.run(&[python, "ok"]).code, 0);
    assert_eq!(fx.run(&[python, "err"]).code, 1);
    let starved = fx.run(&["--fuel", "100000", python]);
    assert_eq!(starved.code, 152, "{}", starved.stderr);
    assert!(
        starved
            .stderr
            .contains("fuel exhausted after 100000 units (--fuel)"),
        "{}",
        starved.stderr
    );
    let small = fx.run(&["--memory", "8Mi", python]);
    assert_eq!(small.code, 137, "{}", small.stderr);
}
