//! `bulwark`: run a WebAssembly workload under exactly the policy a pod would get, and
//! manage the node's precompiled-module cache.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use bulwark_runtime::cache::{Artifact, CacheEvent, DEFAULT_CACHE_DIR, ModuleCache, digest_file};
use bulwark_runtime::egress::NetworkRange;
use bulwark_runtime::engine::FlavorRequest;
use bulwark_runtime::policy::Knob;
use bulwark_runtime::run::{Preopen, Report};
use bulwark_runtime::units::format_size;
use bulwark_runtime::{NodeConfig, Policy, Request, Runtime, RuntimeOptions, Workload};
use bulwark_shim::process::SELF_EXE;
use bulwark_shim::process::compile::parent::{
    CompileStepError, CompileSteps, ModuleToCompile, Placement, Reaping,
};
use bulwark_shim::process::compile::{COMPILE_STEP_ARG, step_user};

/// Exit code for usage errors and bad input (flags, files, modules, configuration).
const EXIT_USAGE: u8 = 2;

#[derive(Parser)]
#[command(
    name = "bulwark",
    version,
    about = "Run untrusted WebAssembly with deny-by-default capabilities and hard limits",
    long_about = "Run untrusted WebAssembly with deny-by-default capabilities and hard limits.\n\n\
        `bulwark run` applies the same policy a Kubernetes pod gets from its bulwark.dev/* \
        annotations, so a policy can be tried here before it meets a cluster."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a WASI module or component under a policy
    #[command(
        after_help = "Exit code: the workload's own; 152 when fuel runs out, 124 when the deadline \
            passes, 137 when memory growth was refused and the workload died of it, 134 for any \
            other trap, 2 for bad flags or input.\n\n\
            Examples:\n  bulwark run --timeout 2s --memory 64Mi app.wasm --port 8080\n  \
            bulwark run --dir /srv/data:ro --dir /tmp/out:rw --env LANG=C --env HOME app.wasm"
    )]
    Run(RunArgs),
    /// Serve a wasi:http component: a fresh instance per request, with the policy's fuel
    /// and deadline per request and its memory limit per instance
    #[command(
        after_help = "A limit ends only its request: 504 for the deadline, 500 for fuel, memory or \
            a trap, with the header bulwark-limit and the reason as the body. SIGTERM drains the \
            requests in flight, then exits 0; SIGINT exits at once.\n\n\
            Example:\n  bulwark serve --timeout 2s --memory 32Mi --listen 127.0.0.1:8080 app.wasm"
    )]
    Serve(ServeArgs),
    /// Precompile modules into the node's cache, so their first run starts fast
    Compile(CompileArgs),
    /// Install Bulwark on this node: the shim, /etc/bulwark/config.toml and the bulwark
    /// runtime in containerd's config (idempotent; keeps a backup)
    Install(InstallArgs),
    /// Take Bulwark off this node: the runtime from containerd's config, and the shim
    Uninstall(InstallArgs),
    /// Take Bulwark off every node the installer DaemonSet runs on, from inside the
    /// cluster: switch its pods to `uninstall` and wait until each node has run it (the
    /// Helm chart's pre-delete hook)
    UninstallNodes(UninstallNodesArgs),
    /// Wait until terminated (SIGTERM or SIGINT), then exit 0: keeps the installer's
    /// DaemonSet pod alive after it set the node up
    Pause,
    /// Package a module as an OCI image
    #[command(subcommand)]
    Image(ImageCommand),
}

#[derive(Args)]
struct InstallArgs {
    /// containerd's config on the node [default: found by distribution: k3s's or RKE2's
    /// template, MicroK8s's template, a k0s drop-in, else /etc/containerd/config.toml]
    #[arg(long, value_name = "PATH")]
    containerd_config: Option<PathBuf>,
    /// Directory on containerd's PATH for the shim, on the node
    #[arg(long, value_name = "DIR", default_value = "/usr/local/bin")]
    shim_dir: PathBuf,
    /// Node configuration to install (validated first) [default: keep the node's; where it
    /// has none, write one that asks for nothing]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where the node configuration lives on the node (containerd passes it to the shim as
    /// the runtime's ConfigPath)
    #[arg(long, value_name = "PATH", default_value = "/etc/bulwark/config.toml")]
    config_path: PathBuf,
    /// The node's root as seen from here (a privileged pod mounts it, e.g. at /host)
    #[arg(long, value_name = "DIR", default_value = "/")]
    host_root: PathBuf,
    /// Change files but do not restart containerd
    #[arg(long)]
    no_restart: bool,
    /// Print what would change; change nothing
    #[arg(long)]
    dry_run: bool,
    /// Label this Kubernetes node bulwark.dev/installed=true once installed (uninstall:
    /// remove the label first), through the API server as the pod's service account
    #[arg(long, value_name = "NODE")]
    label_node: Option<String>,
}

#[derive(Args)]
struct UninstallNodesArgs {
    /// The installer DaemonSet
    #[arg(long, value_name = "NAME")]
    daemonset: String,
    /// Its namespace [default: this pod's]
    #[arg(long, value_name = "NAMESPACE")]
    namespace: Option<String>,
    /// How long every node may take: 30s, 10m, 1h
    #[arg(long, value_name = "DURATION", default_value = "10m")]
    timeout: String,
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Build an OCI image from a .wasm file, as an OCI layout directory or a tar of one
    #[command(
        after_help = "Formats:\n  layer     the module at /app.wasm in an ordinary tar layer, which is the \
            entrypoint; every containerd runs it (1.6 included)\n  artifact  the CNCF Wasm artifact \
            (application/wasm layer); containerd >= 1.7.7\n\n\
            Push a layout with skopeo: skopeo copy oci:DIR:TAG docker://REGISTRY/REPO:TAG\n\
            Import an archive: ctr image import FILE"
    )]
    Build(ImageBuildArgs),
    /// Build an OCI image from a .wasm file and push it to a registry
    #[command(
        after_help = "Credentials, when the registry asks: --username with the password on stdin \
            (--password-stdin), else what `podman login` or `docker login` stored \
            ($REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR/containers/auth.json, \
            $DOCKER_CONFIG/config.json or ~/.docker/config.json; credential helpers are not run)."
    )]
    Push(ImagePushArgs),
}

#[derive(Args)]
struct ImagePushArgs {
    #[command(flatten)]
    image: ImageArgs,
    /// Speak plain HTTP to the registry (a registry on loopback or in a lab)
    #[arg(long)]
    insecure: bool,
    /// Registry user name (the password is read from stdin: --password-stdin)
    #[arg(long, value_name = "USER", requires = "password_stdin")]
    username: Option<String>,
    /// Read the registry password (or token) from stdin
    #[arg(long, requires = "username")]
    password_stdin: bool,
    /// Where to push: REGISTRY/REPOSITORY[:TAG]
    #[arg(value_name = "REF")]
    reference: String,
}

#[derive(Args)]
struct ImageBuildArgs {
    #[command(flatten)]
    image: ImageArgs,
    /// Full image reference to record (registry/repo:tag)
    #[arg(long, value_name = "REF")]
    name: String,
    /// Write an OCI image layout directory
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with = "archive",
        required_unless_present = "archive"
    )]
    oci_layout: Option<PathBuf>,
    /// Write a tar of an OCI image layout (for ctr image import)
    #[arg(long, value_name = "FILE")]
    archive: Option<PathBuf>,
}

/// What goes into a Wasm image, for `image build` and `image push`.
#[derive(Args)]
struct ImageArgs {
    /// Image format
    #[arg(long, value_enum, default_value = "layer")]
    format: ImageFormat,
    /// The user the image runs as, UID[:GID] in numbers (layer format only): a non-root
    /// user lets pods with runAsNonRoot run it without a runAsUser
    #[arg(long, value_name = "UID[:GID]")]
    user: Option<String>,
    /// The WebAssembly module or component
    #[arg(value_name = "MODULE")]
    module: PathBuf,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ImageFormat {
    /// Wasm file in an ordinary layer
    Layer,
    /// CNCF OCI Wasm artifact
    Artifact,
}

#[derive(Args)]
struct CacheArgs {
    /// Directory of the precompiled-module cache (root-only on a node)
    #[arg(long, value_name = "DIR", env = "BULWARK_CACHE_DIR", default_value = DEFAULT_CACHE_DIR)]
    cache_dir: PathBuf,
}

/// The policy flags `run` and `serve` share: the same knobs as a pod's annotations.
#[derive(Args)]
struct PolicyArgs {
    /// Fuel budget for the run (Wasmtime fuel units); out of fuel exits 152
    #[arg(long, value_name = "N")]
    fuel: Option<String>,
    /// Wall-clock deadline: 250ms, 30s, 5m, 1h30m; passing it exits 124
    #[arg(long, value_name = "DURATION")]
    timeout: Option<String>,
    /// Cap on linear memory and tables: 64Mi, 1Gi; dying of it exits 137
    #[arg(long, value_name = "QUANTITY")]
    memory: Option<String>,
    /// Preopen a host directory at the same path in the guest, read-only unless :rw
    #[arg(long = "dir", value_name = "PATH[:ro|:rw]")]
    dirs: Vec<String>,
    /// Set NAME=VALUE in the guest, or pass this environment's NAME; nothing else is passed
    #[arg(long = "env", value_name = "NAME=VALUE|NAME")]
    env: Vec<String>,
    /// Outbound TCP the guest may open (components only): none, or tcp:IP:PORT,...
    #[arg(long, value_name = "none|tcp:IP:PORT,...")]
    network: Option<String>,
    /// Node configuration with defaults and ceilings (as /etc/bulwark/config.toml);
    /// without it there are no defaults, no ceilings and network grants are allowed
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    cache: CacheArgs,
    /// Compile in memory; do not read or write the cache
    #[arg(long)]
    no_cache: bool,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    policy: PolicyArgs,
    /// The WebAssembly module (WASI preview 1) or component (a WASI 0.2 or 0.3 command)
    #[arg(value_name = "MODULE")]
    module: PathBuf,
    /// At the end, print what the run used to stderr (as a pod's log shows it): `bulwark:
    /// usage: exit_code=N wall_ms=.. cpu_ms=.. [fuel=..] memory_bytes=..`
    #[arg(long)]
    usage: bool,
    /// Arguments for the workload (after MODULE, or after --)
    #[arg(
        value_name = "ARGS",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    args: Vec<OsString>,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    policy: PolicyArgs,
    /// Where to listen: PORT, IP:PORT or [IPv6]:PORT [default: 0.0.0.0:8080]
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Requests in flight at most; more wait for a slot up to their deadline, then get 503
    /// [default: from the memory budget, else 64]
    #[arg(long, value_name = "N")]
    concurrency: Option<String>,
    /// Serve Prometheus metrics at /metrics on this address (PORT, IP:PORT, [IPv6]:PORT)
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// The component: it exports wasi:http/incoming-handler (the wasi:http/proxy world)
    #[arg(value_name = "COMPONENT")]
    component: PathBuf,
    /// Arguments for each instance (after COMPONENT, or after --)
    #[arg(
        value_name = "ARGS",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    args: Vec<OsString>,
}

#[derive(Args)]
struct CompileArgs {
    #[command(flatten)]
    cache: CacheArgs,
    /// Node configuration whose [compile] section bounds the compilation
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The modules or components to precompile
    #[arg(value_name = "MODULE", required = true)]
    modules: Vec<PathBuf>,
}

/// An error that is the user's input, not Bulwark's failure: exit 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct InputError(String);

fn main() -> ExitCode {
    // The compile step `compile`, `run` and `serve` start: this binary again.
    let mut raw = std::env::args();
    if raw.nth(1).as_deref() == Some(COMPILE_STEP_ARG) {
        let job = raw.next().unwrap_or_default();
        return ExitCode::from(bulwark_shim::process::compile::main(&job) as u8);
    }
    bulwark_shim::init_stderr_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Serve(args) => serve(args),
        Command::Compile(args) => compile(args),
        Command::Image(ImageCommand::Build(args)) => build_image(args),
        Command::Image(ImageCommand::Push(args)) => push_image(args),
        Command::Pause => pause(),
        Command::Install(args) => install(args, true),
        Command::Uninstall(args) => install(args, false),
        Command::UninstallNodes(args) => uninstall_nodes(args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("bulwark: error: {error:#}");
            if error.chain().any(|cause| cause.is::<InputError>()) {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn input(message: impl std::fmt::Display) -> anyhow::Error {
    InputError(message.to_string()).into()
}

/// What `run` and `serve` set up from their flags.
struct Prepared {
    policy: Policy,
    artifact: Artifact,
    workload: Workload,
    runtime: Runtime,
}

fn prepare(
    flags: &PolicyArgs,
    extra: &[(Knob, &Option<String>)],
    module: &Path,
    args: &[OsString],
) -> Result<Prepared> {
    let config = match &flags.config {
        Some(path) => NodeConfig::load_required(path).map_err(input)?,
        // A laptop is its own admin: no ceilings, and grants are the user's to make, its
        // own loopback included.
        None => {
            let mut config = NodeConfig::default();
            config.capabilities.allow_network = true;
            config.network_ceiling = Some(
                ["0.0.0.0/0:1-65535", "[::]/0:1-65535"]
                    .into_iter()
                    .map(NetworkRange::parse)
                    .collect::<Result<_, _>>()
                    .map_err(|error| anyhow::anyhow!("the whole network: {error}"))?,
            );
            config
        }
    };
    let mut request = Request::flags();
    let mut knobs = vec![
        (Knob::Fuel, flags.fuel.as_slice()),
        (Knob::Timeout, flags.timeout.as_slice()),
        (Knob::Memory, flags.memory.as_slice()),
        (Knob::Dirs, flags.dirs.as_slice()),
        (Knob::Network, flags.network.as_slice()),
    ];
    knobs.extend(extra.iter().map(|(knob, value)| (*knob, value.as_slice())));
    for (knob, values) in knobs {
        for value in values {
            request.set(knob, value).map_err(input)?;
        }
    }
    let policy = Policy::resolve(&config, &request).map_err(input)?;
    let mut argv = vec![module.display().to_string()];
    for arg in args {
        argv.push(
            arg.to_str()
                .ok_or_else(|| input(format!("argument {arg:?} is not valid UTF-8")))?
                .to_owned(),
        );
    }
    let workload = Workload {
        args: argv,
        env: policy.filter_env(guest_env(&flags.env)?),
        preopens: Preopen::same_path(&policy.dirs),
        inherit_stdio: true,
        egress_counts: None,
    };
    for preopen in &workload.preopens {
        if !preopen.host.is_dir() {
            return Err(input(format!(
                "--dir {}: not a directory on this host",
                preopen.host.display()
            )));
        }
    }
    let cache = if flags.no_cache {
        None
    } else {
        open_cache_or_warn(&flags.cache.cache_dir)
    };
    let runtime = Runtime::new(RuntimeOptions::default());
    log::debug!(
        "policy: fuel {:?}, timeout {:?}, memory {:?}",
        policy.fuel,
        policy.timeout,
        policy.memory
    );
    let (artifact, _) = compile_module(
        &config,
        cache.as_ref(),
        module,
        runtime.flavor_request(&policy),
    )?;
    Ok(Prepared {
        policy,
        artifact,
        workload,
        runtime,
    })
}

/// The compiled artifact of the module at `path` for `request`: from `cache`, or from a
/// compile step (the same one the shim runs), bounded by the configuration's `[compile]`.
fn compile_module(
    config: &NodeConfig,
    cache: Option<&ModuleCache>,
    path: &Path,
    request: FlavorRequest,
) -> Result<(Artifact, Option<CacheEvent>)> {
    let shown = path.display().to_string();
    let file = open_module(path)?;
    let size = file
        .metadata()
        .map_err(|error| input(format!("{shown}: {error}")))?
        .len();
    if size > config.compile.module_size {
        return Err(input(format!(
            "{shown} is {}, more than the {} allowed (compile.module_size)",
            format_size(size),
            format_size(config.compile.module_size)
        )));
    }
    let mut head = [0u8; 8];
    let read = std::os::unix::fs::FileExt::read_at(&file, &mut head, 0)
        .map_err(|error| input(format!("{shown}: {error}")))?;
    bulwark_runtime::engine::detect_kind(&head[..read])
        .map_err(|error| input(format!("{shown}: {error}")))?;
    let digest = digest_file(&file).map_err(|error| input(format!("{shown}: {error}")))?;
    let steps = CompileSteps {
        exe: PathBuf::from(SELF_EXE),
        memory: config.compile.memory,
        concurrency: config.compile.concurrency,
        allow_without_landlock: config.capabilities.allow_without_landlock,
        reaping: Reaping::Direct,
    };
    // SAFETY: geteuid and getegid have no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let (uid, gid) = step_user(uid, gid);
    let placement = Placement {
        uid,
        gid,
        cgroup: None,
    };
    let module = ModuleToCompile {
        file: &file,
        name: &shown,
        size,
        digest,
    };
    let mut progress = |line: &str| log::info!("{line}");
    steps
        .artifact(cache, &module, request, &placement, &mut progress)
        .map_err(|error| match error {
            CompileStepError::Invalid { .. } | CompileStepError::OverMemory { .. } => input(error),
            other => other.into(),
        })
}

fn run(args: RunArgs) -> Result<ExitCode> {
    let prepared = prepare(&args.policy, &[], &args.module, &args.args)?;
    let shown = args.module.display();
    if prepared.artifact.facts.serves_http {
        return Err(input(format!(
            "{shown}: a wasi:http component is a service, not a program to run: serve it with `bulwark serve`"
        )));
    }
    let loaded = prepared
        .runtime
        .load_artifact(&prepared.policy, &prepared.artifact)
        .map_err(|error| input(format!("{shown}: {error}")))?;
    drop(prepared.artifact);
    let outcome = loaded
        .run(
            &prepared.workload,
            &Report {
                usage: args.usage,
                ..Report::default()
            },
        )
        .map_err(|error| input(format!("{shown}: {error}")))?;
    // Exit codes are a byte; a guest's proc_exit(256) wraps as a shell would show it.
    Ok(ExitCode::from(outcome.exit_code() as u8))
}

fn serve(args: ServeArgs) -> Result<ExitCode> {
    let extra = [
        (Knob::Listen, &args.listen),
        (Knob::Concurrency, &args.concurrency),
        (Knob::Metrics, &args.metrics),
    ];
    let prepared = prepare(&args.policy, &extra, &args.component, &args.args)?;
    let shown = args.component.display();
    if !prepared.artifact.facts.serves_http {
        return Err(input(format!(
            "{shown}: not a wasi:http component (it exports no wasi:http/incoming-handler@0.2 or wasi:http/handler@0.3): run it with `bulwark run`"
        )));
    }
    let service = prepared
        .runtime
        .load_service(&prepared.policy, &prepared.artifact)
        .map_err(|error| input(format!("{shown}: {error}")))?;
    let listeners = bulwark_runtime::serve::Listeners::bind(service.serving()).map_err(input)?;
    let code = service.serve(listeners, prepared.workload)?;
    Ok(ExitCode::from(code as u8))
}

/// The guest's environment from `--env` flags: `NAME=VALUE` sets, `NAME` passes this
/// environment's value. Nothing else of this environment reaches the guest.
fn guest_env(flags: &[String]) -> Result<Vec<(String, String)>> {
    let mut env = Vec::new();
    for flag in flags {
        let (name, value) = match flag.split_once('=') {
            Some((name, value)) => (name.to_owned(), value.to_owned()),
            None => {
                let value = std::env::var(flag).map_err(|_| {
                    input(format!(
                        "--env {flag}: {flag} is not set here (use --env {flag}=VALUE to set it)"
                    ))
                })?;
                (flag.clone(), value)
            }
        };
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(input(format!(
                "--env {flag:?}: expected NAME=VALUE or NAME"
            )));
        }
        env.retain(|(existing, _): &(String, String)| existing != &name);
        env.push((name, value));
    }
    Ok(env)
}

fn read_module(path: &Path) -> Result<Vec<u8>> {
    if path.is_dir() {
        return Err(input(format!(
            "{}: is a directory, not a module",
            path.display()
        )));
    }
    std::fs::read(path).map_err(|error| input(format!("{}: {error}", path.display())))
}

/// The module at `path`, opened for reading: a regular file (a FIFO or a device would
/// block or reach a driver).
fn open_module(path: &Path) -> Result<std::fs::File> {
    let shown = path.display();
    let metadata = std::fs::metadata(path).map_err(|error| input(format!("{shown}: {error}")))?;
    if metadata.is_dir() {
        return Err(input(format!("{shown}: is a directory, not a module")));
    }
    if !metadata.is_file() {
        return Err(input(format!("{shown}: not a regular file")));
    }
    std::fs::File::open(path).map_err(|error| input(format!("{shown}: {error}")))
}

fn open_cache_or_warn(dir: &Path) -> Option<ModuleCache> {
    match ModuleCache::open(dir) {
        Ok(cache) => Some(cache),
        Err(error) => {
            log::warn!("{error}; compiling without the cache");
            None
        }
    }
}

fn compile(args: CompileArgs) -> Result<ExitCode> {
    let cache = ModuleCache::open(&args.cache.cache_dir)
        .with_context(|| format!("cannot use the cache at {}", args.cache.cache_dir.display()))?;
    let config = match &args.config {
        Some(path) => NodeConfig::load_required(path).map_err(input)?,
        None => NodeConfig::default(),
    };
    // With and without fuel: every engine `bulwark run`, `bulwark serve` and the shim may
    // load the module into (whether it serves decides the rest), so that no first start
    // compiles.
    for module in &args.modules {
        for fuel in [false, true] {
            let started = std::time::Instant::now();
            let request = FlavorRequest { fuel, epoch: false };
            let (_, event) = compile_module(&config, Some(&cache), module, request)?;
            let what = match event {
                Some(CacheEvent::Hit) | Some(CacheEvent::CompiledByPeer) => "already cached",
                Some(CacheEvent::Compiled) => "compiled",
                Some(CacheEvent::Replaced { .. }) => "recompiled (the old entry was invalid)",
                Some(CacheEvent::NotStored { reason }) => {
                    bail!("{}: compiled, but not stored: {reason}", module.display())
                }
                None => bail!("the cache was not used"),
            };
            let label = if fuel {
                "with fuel metering"
            } else {
                "without metering"
            };
            println!(
                "{}: {what} {label} in {:.1} ms",
                module.display(),
                started.elapsed().as_secs_f64() * 1000.0
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn wasm_image(args: &ImageArgs) -> Result<bulwark_runtime::image::Image> {
    use bulwark_runtime::image;
    let module = &args.module;
    let wasm = read_module(module)?;
    bulwark_runtime::engine::detect_kind(&wasm)
        .map_err(|error| input(format!("{}: {error}", module.display())))?;
    match (args.format, &args.user) {
        (ImageFormat::Layer, user) => image::wasm_in_layer(&wasm, user.as_deref())
            .map_err(|error| input(format!("--user: {error}"))),
        (ImageFormat::Artifact, Some(_)) => Err(input(
            "--user applies to --format layer only: a Wasm artifact's config has no user (set runAsUser in the pod instead)",
        )),
        (ImageFormat::Artifact, None) => image::wasm_artifact(&wasm)
            .map_err(|error| input(format!("{}: {error}", module.display()))),
    }
}

fn push_image(args: ImagePushArgs) -> Result<ExitCode> {
    use bulwark_shim::registry::{Credentials, Reference, push};
    let reference = Reference::parse(&args.reference).map_err(input)?;
    let credentials = match args.username {
        Some(username) => {
            let mut password = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut password)
                .context("cannot read the password from stdin")?;
            let password = password.trim_end_matches(['\r', '\n']).to_owned();
            if password.is_empty() {
                return Err(input("--password-stdin: stdin held no password"));
            }
            Some(Credentials {
                username,
                password,
                source: "--username".into(),
            })
        }
        None => Credentials::stored_for(&reference.registry).map_err(input)?,
    };
    let built = wasm_image(&args.image)?;
    let digest = push(&built, &reference, args.insecure, credentials.as_ref())?;
    println!("{} {digest}", args.reference);
    Ok(ExitCode::SUCCESS)
}

fn build_image(args: ImageBuildArgs) -> Result<ExitCode> {
    use bulwark_runtime::image;
    let built = wasm_image(&args.image)?;
    let images = [(args.name.as_str(), &built)];
    match (&args.oci_layout, &args.archive) {
        (Some(dir), _) => image::write_layout(dir, &images)?,
        (None, Some(file)) => image::write_archive(file, &images)?,
        (None, None) => unreachable!("clap requires one of them"),
    }
    println!("{} {}", args.name, built.manifest.descriptor.digest);
    Ok(ExitCode::SUCCESS)
}

/// What `bulwark install` (`adding`) or `bulwark uninstall` changes on a node, worked out
/// (and validated) before anything is changed.
struct InstallPlan {
    adding: bool,
    layout: bulwark_shim::node::install::Layout,
    target: bulwark_shim::node::install::ContainerdTarget,
    /// containerd's config as this process reaches it, symlinks followed.
    config_path: PathBuf,
    before: String,
    after: String,
    /// The node configuration to write, if it changes.
    node_config: Option<String>,
    node_config_path: PathBuf,
    /// The shim and the binaries it starts: (here, on the node), helpers before the shim.
    binaries: Vec<(PathBuf, PathBuf)>,
}

/// `bulwark install` (`adding`) and `bulwark uninstall`.
fn install(args: InstallArgs, adding: bool) -> Result<ExitCode> {
    let plan = plan_install(&args, adding)?;
    // The API client is made before anything changes, so missing credentials stop a run
    // that could not label its node.
    let kube = match &args.label_node {
        Some(node) if !args.dry_run => Some((
            node.as_str(),
            bulwark_shim::node::kube::Client::in_cluster()
                .with_context(|| format!("cannot label node {node}"))?,
        )),
        _ => None,
    };
    if args.dry_run {
        print_install_plan(&plan, args.label_node.as_deref());
        return Ok(ExitCode::SUCCESS);
    }
    let label = bulwark_shim::node::kube::INSTALLED_LABEL;
    // Off the RuntimeClass's nodes first, so no Wasm pod lands here while it goes.
    if let (Some((node, client)), false) = (&kube, adding) {
        client
            .label_node(node, label, None)
            .with_context(|| format!("cannot remove the label {label} from node {node}"))?;
        println!("removed the label {label} from node {node}");
    }
    let changed = change_files(&plan)?;
    let applied = apply_change(&plan, &args, changed)?;
    if let (Some((node, client)), true) = (&kube, adding) {
        if applied {
            client
                .label_node(node, label, Some("true"))
                .with_context(|| format!("cannot label node {node} {label}=true"))?;
            println!("labelled node {node} {label}=true");
        } else {
            // Labelled now, the node would get Wasm pods its containerd cannot run yet.
            println!(
                "node {node} not labelled {label}=true: its containerd has not read the change; restart it, then run this again"
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn plan_install(args: &InstallArgs, adding: bool) -> Result<InstallPlan> {
    use bulwark_shim::node::install::{
        ContainerdTarget, DEFAULT_NODE_CONFIG, Layout, resolve_on_node,
    };
    let mut layout = Layout {
        host_root: args.host_root.clone(),
        containerd_config: PathBuf::new(),
        shim_dir: args.shim_dir.clone(),
        bulwark_config: args.config_path.clone(),
    };
    let target = match &args.containerd_config {
        Some(file) => ContainerdTarget::config(&node_path_of(file, &args.host_root)?),
        None => ContainerdTarget::detect(|path| layout.on_host(path)),
    };
    layout.containerd_config = target.file.clone();
    println!("{}: {target}", target.file.display());
    let resolved = resolve_on_node(&layout, &target.file).map_err(input)?;
    if resolved != target.file {
        println!(
            "{} is a symlink: editing {}",
            target.file.display(),
            resolved.display()
        );
    }
    let config_path = layout.on_host(&resolved);
    // A missing file is containerd's defaults.
    let before = match std::fs::read_to_string(&config_path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(error) => return Err(input(format!("{}: {error}", config_path.display()))),
    };
    let shown = config_path.display().to_string();
    let after = target
        .edit(&before, &shown, &layout.bulwark_config, adding)
        .map_err(input)?;
    let node_config_path = layout.on_host(&layout.bulwark_config);
    let node_config = match &args.config {
        Some(file) if adding => {
            let text = std::fs::read_to_string(file)
                .map_err(|error| input(format!("--config {}: {error}", file.display())))?;
            NodeConfig::parse(&text, &file.display().to_string()).map_err(input)?;
            Some(text)
        }
        _ if adding && !node_config_path.exists() => Some(DEFAULT_NODE_CONFIG.to_owned()),
        _ => None,
    };
    let node_config = node_config.filter(|text| {
        std::fs::read_to_string(&node_config_path).ok().as_deref() != Some(text.as_str())
    });
    Ok(InstallPlan {
        adding,
        target,
        config_path,
        before,
        after,
        node_config,
        node_config_path,
        binaries: {
            let here = std::env::current_exe().context("cannot find this binary")?;
            layout
                .shim_paths()
                .into_iter()
                .map(|target| {
                    let name = target.file_name().expect("binaries have names").to_owned();
                    (here.with_file_name(name), layout.on_host(&target))
                })
                .collect()
        },
        layout,
    })
}

/// `--containerd-config` as a path on the node. A relative path names a file in the
/// working directory, which is a node path only where this runs on the node itself.
fn node_path_of(file: &Path, host_root: &Path) -> Result<PathBuf> {
    if file.is_absolute() {
        return Ok(file.to_owned());
    }
    if host_root != Path::new("/") {
        return Err(input(format!(
            "--containerd-config {}: a relative path cannot name a file on the node under --host-root {}: give the path on the node (e.g. /etc/containerd/config.toml)",
            file.display(),
            host_root.display()
        )));
    }
    Ok(std::env::current_dir()
        .context("cannot find the working directory")?
        .join(file))
}

fn print_install_plan(plan: &InstallPlan, label_node: Option<&str>) {
    print!(
        "{}",
        bulwark_shim::node::install::line_diff(&plan.before, &plan.after)
    );
    if let Some(node) = label_node {
        let verb = if plan.adding {
            "label"
        } else {
            "remove the label"
        };
        let label = bulwark_shim::node::kube::INSTALLED_LABEL;
        println!("would {verb} {label}=true on node {node}");
    }
    if plan.adding {
        for (source, target) in &plan.binaries {
            println!("would install {} as {}", source.display(), target.display());
        }
        if plan.node_config.is_some() {
            println!("would write {}", plan.node_config_path.display());
        }
    } else {
        for (_, target) in &plan.binaries {
            println!("would remove {}", target.display());
        }
        if plan.node_config_path.exists() {
            println!("would remove {}", plan.node_config_path.display());
        }
    }
}

/// Writes (or removes) the shim, the node configuration and containerd's config; returns
/// whether anything changed.
fn change_files(plan: &InstallPlan) -> Result<bool> {
    let write = |path: &Path, bytes: &[u8], mode: u32| -> Result<()> {
        bulwark_shim::node::install::write_atomically(path, bytes, mode)
            .with_context(|| format!("cannot write {}", path.display()))
    };
    let mut changed = false;
    if plan.adding {
        // Helpers first: a shim that starts meanwhile finds them in its new version, and
        // running shims hold the ones they started with.
        for (source, target) in &plan.binaries {
            let bytes = std::fs::read(source)
                .with_context(|| format!("cannot read {}", source.display()))?;
            if std::fs::read(target).ok().as_deref() != Some(bytes.as_slice()) {
                write(target, &bytes, 0o755)?;
                println!("installed {}", target.display());
                changed = true;
            }
        }
        if let Some(text) = &plan.node_config {
            write(&plan.node_config_path, text.as_bytes(), 0o644)?;
            println!("wrote {}", plan.node_config_path.display());
            changed = true;
        }
    } else {
        let binaries = plan.binaries.iter().rev().map(|(_, target)| target);
        for path in binaries.chain([&plan.node_config_path]) {
            if path.exists() {
                std::fs::remove_file(path)
                    .with_context(|| format!("cannot remove {}", path.display()))?;
                println!("removed {}", path.display());
                changed = true;
            }
        }
    }
    if plan.after != plan.before {
        let config_path = &plan.config_path;
        let backup = config_path.with_extension("toml.bulwark-backup");
        if !plan.before.is_empty() {
            write(&backup, plan.before.as_bytes(), 0o600)?;
        }
        if plan.after.is_empty() {
            // A template or drop-in that held only the runtime: the node is as before.
            std::fs::remove_file(config_path)
                .with_context(|| format!("cannot remove {}", config_path.display()))?;
        } else {
            write(config_path, plan.after.as_bytes(), 0o644)?;
        }
        println!(
            "{} the bulwark runtime in {} (backup: {})",
            if plan.adding { "added" } else { "removed" },
            config_path.display(),
            backup.display()
        );
        changed = true;
    }
    Ok(changed)
}

/// Restarts containerd (or what runs it) when something changed, or when an earlier run's
/// restart did not complete; returns whether containerd serves what the files now say.
fn apply_change(plan: &InstallPlan, args: &InstallArgs, changed: bool) -> Result<bool> {
    use bulwark_shim::node::install::write_atomically;
    use bulwark_shim::node::restart::{Applied, apply};
    // A restart that failed (or was cut short) in an earlier run left this marker: the files
    // are as wanted, but containerd may not have read them, so restart again.
    let pending = PathBuf::from(format!(
        "{}.bulwark-restart-pending",
        plan.config_path.display()
    ));
    let retry = !changed && !args.no_restart && pending.exists();
    if retry {
        println!("the restart of an earlier run did not complete: restarting again");
    }
    if !changed && !retry {
        println!("nothing to change");
        return Ok(true);
    }
    if let (true, Some(unit)) = (args.no_restart, plan.target.restart_unit) {
        println!("restart {unit} to apply the change (--no-restart)");
        return Ok(false);
    }
    write_atomically(&pending, b"", 0o600)
        .with_context(|| format!("cannot write {}", pending.display()))?;
    let outcome = apply(&plan.layout.host_root, &plan.target)?;
    std::fs::remove_file(&pending)
        .with_context(|| format!("cannot remove {}", pending.display()))?;
    match outcome {
        Applied::Systemd { unit } => println!("restarted {unit}"),
        Applied::Signalled { stopped, started } => println!(
            "restarted containerd: pid {stopped} stopped, its supervisor started pid {started}"
        ),
        Applied::NotRunning => println!(
            "no running containerd serves {}: it reads the change when it starts",
            plan.target.file.display()
        ),
        Applied::ByDistribution => {
            println!("{}: applied by the distribution on its own", plan.target)
        }
    }
    Ok(true)
}

/// `bulwark uninstall-nodes`: switches the installer DaemonSet's pods to `uninstall` and
/// waits until every node has run it.
fn uninstall_nodes(args: UninstallNodesArgs) -> Result<ExitCode> {
    use bulwark_shim::node::kube::Client;
    let timeout = bulwark_runtime::units::parse_duration(&args.timeout)
        .map_err(|error| input(format!("--timeout {:?}: {error}", args.timeout)))?;
    let client = Client::in_cluster()?;
    let namespace = match (&args.namespace, client.namespace()) {
        (Some(namespace), _) => namespace.clone(),
        (None, Some(namespace)) => namespace.to_owned(),
        (None, None) => bail!("--namespace is needed: the service account names no namespace"),
    };
    let name = &args.daemonset;
    client.set_daemonset_action(&namespace, name, "uninstall")?;
    println!("DaemonSet {namespace}/{name}: its pods now uninstall Bulwark from their nodes");
    client.wait_rolled_out(&namespace, name, timeout)?;
    println!("DaemonSet {namespace}/{name}: every node has uninstalled Bulwark");
    Ok(ExitCode::SUCCESS)
}

/// Waits for SIGTERM or SIGINT. As a container's PID 1 the default actions would be
/// ignored, so the signals are taken synchronously.
fn pause() -> Result<ExitCode> {
    // SAFETY: sigset operations on a local set; blocking the signals makes sigwait the
    // only way they are delivered.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut signal = 0;
        libc::sigwait(&set, &mut signal);
    }
    Ok(ExitCode::SUCCESS)
}
