//! Serving mode: a component that exports `wasi:http/incoming-handler` (the
//! `wasi:http/proxy` world) is an HTTP service.
//!
//! - Every request gets a fresh instance from a pre-instantiated component on Wasmtime's
//!   pooling allocator, with the policy's fuel and deadline for that request and its memory
//!   limit for that instance; all instances together stay inside the container's memory
//!   budget ([`Policy::serving`]).
//! - At most `concurrency` requests run at once; one over the cap waits for a slot up to
//!   its deadline (until a tenth of it is left), then gets 503 with `Retry-After`.
//! - A limit ends only its own request: deadline 504, fuel, memory or a trap 500, with the
//!   header `bulwark-limit` and the reason as the body and on stderr (with the method, the
//!   path and a request id). A guest that already sent its response head has its
//!   connection aborted instead.
//! - It listens only once the component is loaded and a first instance was made, so a
//!   readiness probe that connects means "ready".
//! - SIGTERM stops accepting, lets the requests in flight finish (each under its deadline),
//!   closes idle keep-alive connections and exits 0; a second SIGTERM, or SIGINT, exits at
//!   once.
//! - Outbound `wasi:http` requests go only to the policy's network grants.
//! - Prometheus text at `/metrics` on its own listener, when asked for.
//! - Clients get what the node's `[serving]` allows and no more: a request head must come
//!   within `head_timeout` (idle keep-alive connections too), open connections are capped
//!   (more are closed at once, never queued), a head over `max_head_size` gets 431 and a
//!   body over `max_body_size` 413, and a response is written only until its request's
//!   deadline, so a client that does not read frees its slot. Failed accepts back off.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use wasmtime::component::{Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::bindings::{Proxy, ProxyPre};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::p3::bindings::{Service as P3Service, ServicePre as P3ServicePre};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use crate::cache::Artifact;
use crate::config::ClientLimits;
use crate::engine::{ASYNC_STACK_SIZE, Allocation, build_engine};
use crate::policy::{Policy, Serving, ServingSizing};
use crate::run::{
    EgressCounts, EpochDeadline, Guard, GuardedHost, Outcome, RunError, Runtime, StoreLimits,
    Workload, arm, classify, deserialize_component, start_epoch_ticker, wasi_builder,
};

/// What one request's instance costs beyond its linear memory and tables: its stack (the
/// engine's async stack, touched as deep as the guest goes) and its host state (WASI and
/// HTTP contexts, buffers).
pub const INSTANCE_OVERHEAD: u64 = ASYNC_STACK_SIZE as u64 + (512 << 10);
use crate::units::format_size;
use crate::usage::{Fuel, Usage, fuel_consumed, write_line};

/// What a client that got 503 is told to wait before it tries again.
const RETRY_AFTER_SECONDS: u64 = 1;

/// A wasi:http component, compiled and linked, ready to serve.
pub struct Service {
    engine: Engine,
    pre: HandlerPre,
    policy: Policy,
    serving: Serving,
    sizing: ServingSizing,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("serving", &self.serving)
            .field("sizing", &self.sizing)
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// Loads a wasi:http component's artifact for serving under `policy`, on an engine
    /// whose instance pool holds one instance per request in flight, and settles the
    /// serving figures with the memory this process holds once it is loaded.
    pub fn load_service(&self, policy: &Policy, artifact: &Artifact) -> Result<Service, RunError> {
        let facts = &artifact.facts;
        if !facts.serves_http {
            return Err(RunError::Link(
                "not a wasi:http component (it exports no wasi:http/incoming-handler@0.2 or wasi:http/handler@0.3): it runs as a program"
                    .into(),
            ));
        }
        let mut sizing = ServingSizing {
            initial_memory: facts.initial_memory,
            footprint: 0,
            instance_overhead: INSTANCE_OVERHEAD,
        };
        // The most instances that could ever fit, before the runtime is measured: the pool
        // reserves address space for them, which costs no memory until used.
        let capacity = match policy.serving(&sizing) {
            Ok(serving) => serving.concurrency.value,
            // It cannot fit even before anything is loaded: say so with what this process
            // holds already.
            Err(_) => {
                sizing.footprint = own_footprint();
                return Err(policy.serving(&sizing).err().map_or_else(
                    || RunError::Serve("the serving figures do not fit".into()),
                    RunError::Policy,
                ));
            }
        };
        let allocation = Allocation::ComponentPool {
            // One more than in flight: the readiness check's instance.
            instances: capacity.saturating_add(1),
            shape: facts.shape,
        };
        // Serving always counts epochs (see [`FlavorRequest::flavor`]): a guest yields at
        // every tick, and a deadline is an epoch check, so no request can keep a server
        // thread to itself.
        let flavor = self.flavor_request(policy).flavor(facts);
        let engine = build_engine(flavor, allocation, false)?;
        let component = deserialize_component(&engine, &artifact.file)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .and_then(|()| wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker))
            .and_then(|()| {
                // 0.3's host functions exist only on engines with concurrency support,
                // which only components on the async ABI get (see [`Flavor::concurrency`]).
                if flavor.concurrency {
                    wasmtime_wasi::p3::add_to_linker(&mut linker)?;
                    wasmtime_wasi_http::p3::add_to_linker(&mut linker)?;
                }
                Ok(())
            })
            .map_err(|error| RunError::Link(format!("{error:#}")))?;
        let pre = linker
            .instantiate_pre(&component)
            .and_then(|pre| match flavor.concurrency {
                true => P3ServicePre::new(pre).map(HandlerPre::P3),
                false => ProxyPre::new(pre).map(HandlerPre::P2),
            })
            .map_err(|error| {
                RunError::Link(format!(
                    "the component does not serve wasi:http (no wasi:http/incoming-handler@0.2 or wasi:http/handler@0.3 export it can be called through): {error:#}"
                ))
            })?;
        sizing.footprint = own_footprint();
        let serving = policy.serving(&sizing)?;
        Ok(Service {
            engine,
            pre,
            policy: policy.clone(),
            serving,
            sizing,
        })
    }
}

/// What this process holds in memory that the kernel cannot take back: its anonymous and
/// shared pages, and its page tables. (Its mapped files, the binary and the artifact, are
/// page cache the kernel reclaims under the container's limit.)
pub fn own_footprint() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .filter_map(|line| {
            let (name, value) = line.split_once(':')?;
            matches!(name, "RssAnon" | "RssShmem" | "VmPTE")
                .then(|| {
                    value
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
                .flatten()
        })
        .sum::<u64>()
        * 1024
}

/// The sockets a service listens on: bound (so a port below 1024 or one already taken
/// fails before anything runs, and while the process may still bind it), but not yet
/// listening, so nothing connects before the service is ready.
#[derive(Debug)]
pub struct Listeners {
    http: socket2::Socket,
    metrics: Option<socket2::Socket>,
}

impl Listeners {
    /// Binds the addresses `serving` names.
    pub fn bind(serving: &Serving) -> Result<Listeners, RunError> {
        Ok(Listeners {
            http: bind(serving.listen)?,
            metrics: serving.metrics.map(bind).transpose()?,
        })
    }
}

fn bind(address: SocketAddr) -> Result<socket2::Socket, RunError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let failed = |error: std::io::Error| RunError::Listen {
        address,
        message: error.to_string(),
    };
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )
    .map_err(failed)?;
    socket.set_reuse_address(true).map_err(failed)?;
    socket.set_nonblocking(true).map_err(failed)?;
    socket.bind(&address.into()).map_err(failed)?;
    Ok(socket)
}

fn listen(socket: socket2::Socket) -> Result<tokio::net::TcpListener, RunError> {
    let address = socket
        .local_addr()
        .ok()
        .and_then(|address| address.as_socket())
        .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
    let failed = |error: std::io::Error| RunError::Listen {
        address,
        message: error.to_string(),
    };
    socket.listen(1024).map_err(failed)?;
    tokio::net::TcpListener::from_std(socket.into()).map_err(failed)
}

impl Service {
    /// Serving mode's figures: concurrency and memory per instance.
    pub fn serving(&self) -> &Serving {
        &self.serving
    }

    /// What the figures were worked out from: the component's initial memory, the memory
    /// this process held once the component was loaded, and what an instance costs besides
    /// its linear memory.
    pub fn sizing(&self) -> &ServingSizing {
        &self.sizing
    }

    /// What every request's handling shares, for `workload`.
    fn shared(self, workload: Workload) -> Shared {
        let serving = self.serving;
        Shared {
            limits: StoreLimits {
                fuel: self.policy.fuel.clone(),
                timeout: self.policy.timeout.clone(),
                memory: serving.instance_memory.clone(),
            },
            grants: self.policy.network.clone().into(),
            slots: Arc::new(tokio::sync::Semaphore::new(
                serving.concurrency.value as usize,
            )),
            concurrency: serving.concurrency.value,
            connections: ConnectionTable::new(serving.connections),
            clients: serving.clients,
            next_id: AtomicU64::new(1),
            pre: self.pre,
            engine: self.engine,
            policy: self.policy,
            workload,
            metrics: Metrics::new(),
        }
    }

    /// Makes `count` instances one after another, as requests would get them, and returns
    /// how long each took: per-request instantiation, measured (for benchmarks).
    pub fn instantiation_times(
        self,
        workload: Workload,
        count: usize,
    ) -> Result<Vec<std::time::Duration>, RunError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|error| RunError::Serve(format!("cannot start a runtime: {error}")))?;
        let shared = self.shared(workload);
        runtime.block_on(async {
            let mut times = Vec::with_capacity(count);
            for _ in 0..count {
                let mut store = shared.store(None)?;
                let started = Instant::now();
                let instance = shared.pre.instantiate(&mut store).await;
                times.push(started.elapsed());
                instance.map_err(|error| {
                    RunError::Serve(format!("cannot instantiate the component: {error:#}"))
                })?;
            }
            Ok(times)
        })
    }

    /// Serves until SIGTERM (then drains) or SIGINT; returns the process's exit code. Each
    /// instance gets `workload`'s args, env, preopened directories and stdio.
    pub fn serve(self, listeners: Listeners, workload: Workload) -> Result<i32, RunError> {
        let workers = std::thread::available_parallelism()
            .map(usize::from)
            .unwrap_or(1)
            .clamp(1, 8);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("bulwark-http")
            .enable_all()
            .build()
            .map_err(|error| RunError::Serve(format!("cannot start the server: {error}")))?;
        start_epoch_ticker(&self.engine);
        runtime.block_on(self.run(listeners, workload))
    }

    async fn run(self, listeners: Listeners, workload: Workload) -> Result<i32, RunError> {
        let serving = self.serving.clone();
        let sizing = self.sizing;
        let shared = Arc::new(self.shared(workload));
        shared.check_ready().await?;
        let http = listen(listeners.http)?;
        if let Some(socket) = listeners.metrics {
            tokio::spawn(serve_metrics(listen(socket)?, shared.clone()));
        }
        eprintln!(
            "bulwark: serving on http://{}: {} requests at once ({}), {} connections at most, {} per instance; the runtime holds {} with the component loaded",
            serving.listen,
            serving.concurrency.value,
            serving.concurrency.source,
            serving.connections,
            serving.instance_memory.as_ref().map_or(
                "no memory limit".to_owned(),
                |memory| format!(
                    "memory limit {} ({})",
                    format_size(memory.value),
                    memory.source
                )
            ),
            format_size(sizing.footprint)
        );
        accept_until_stopped(http, shared).await
    }
}

/// The handler a served component exports, linked: wasi:http 0.2's `incoming-handler` or
/// 0.3's `handler`.
enum HandlerPre {
    P2(ProxyPre<ServeHost>),
    P3(P3ServicePre<ServeHost>),
}

/// A request's instance of the component, ready to handle it.
enum Handler {
    P2(Proxy),
    P3(P3Service),
}

impl HandlerPre {
    async fn instantiate(&self, store: &mut Store<ServeHost>) -> wasmtime::Result<Handler> {
        Ok(match self {
            HandlerPre::P2(pre) => Handler::P2(pre.instantiate_async(store).await?),
            HandlerPre::P3(pre) => Handler::P3(pre.instantiate_async(store).await?),
        })
    }
}

/// What every request's handling shares.
struct Shared {
    engine: Engine,
    pre: HandlerPre,
    policy: Policy,
    workload: Workload,
    limits: StoreLimits,
    grants: Arc<[SocketAddr]>,
    slots: Arc<tokio::sync::Semaphore>,
    concurrency: u32,
    /// The open connections, and how many more may open.
    connections: ConnectionTable,
    clients: ClientLimits,
    next_id: AtomicU64,
    metrics: Metrics,
}

/// Store data of one request's instance.
struct ServeHost {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    guard: Guard,
    outbound: Outbound,
}

impl GuardedHost for ServeHost {
    fn guard(&mut self) -> &mut Guard {
        &mut self.guard
    }
}

impl WasiView for ServeHost {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for ServeHost {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.outbound,
        }
    }
}

/// Outbound wasi:http requests: only to granted `IP:PORT` destinations (no DNS).
struct Outbound {
    grants: Arc<[SocketAddr]>,
}

impl WasiHttpHooks for Outbound {
    fn send_request(
        &mut self,
        request: hyper::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Box<
        dyn Future<
                Output = Result<
                    (
                        hyper::Response<wasmtime_wasi_http::WasiBody>,
                        Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
                    ),
                    wasmtime_wasi_http::Error,
                >,
            > + Send,
    > {
        if !outbound_allowed(&self.grants, request.uri()) {
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        let default: &mut dyn WasiHttpHooks = wasmtime_wasi_http::default_hooks();
        default.send_request(request, options, fut)
    }
}

/// Whether a request to `uri` goes to a granted destination: its authority an IP address
/// and port (80 or 443 by scheme when left out) among the grants.
fn outbound_allowed(grants: &[SocketAddr], uri: &hyper::Uri) -> bool {
    let Some(authority) = uri.authority() else {
        return false;
    };
    let port = authority.port_u16().unwrap_or(match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    });
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    host.parse()
        .is_ok_and(|ip| grants.contains(&SocketAddr::new(ip, port)))
}

impl Shared {
    /// A store for one request, armed with the request's limits (its deadline at `deadline`).
    fn store(&self, deadline: Option<Instant>) -> Result<Store<ServeHost>, RunError> {
        let mut wasi = wasi_builder(&self.policy, &self.workload)?;
        let mut store = Store::new(
            &self.engine,
            ServeHost {
                wasi: wasi.build(),
                http: WasiHttpCtx::new(),
                table: ResourceTable::new(),
                guard: Guard::with_cap(self.limits.memory.as_ref().map(|limit| limit.value)),
                outbound: Outbound {
                    grants: self.grants.clone(),
                },
            },
        );
        arm(&mut store, &self.limits, EpochDeadline::Yielding(deadline));
        Ok(store)
    }

    /// One instance, made and dropped: the component can be served. A limit that already
    /// fires here (an initial memory above the cap) is named as a request's would be.
    async fn check_ready(&self) -> Result<(), RunError> {
        let mut store = self.store(None)?;
        match self.pre.instantiate(&mut store).await {
            Ok(_) => Ok(()),
            Err(error) => {
                let outcome = classify(error, &store.data().guard, &self.limits);
                Err(RunError::Serve(format!(
                    "cannot instantiate the component: {}",
                    reason_of(&outcome)
                )))
            }
        }
    }
}

/// Accepts connections until SIGTERM, then drains them; SIGINT or a second SIGTERM ends
/// the process at once.
async fn accept_until_stopped(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
) -> Result<i32, RunError> {
    use tokio::signal::unix::{SignalKind, signal};
    let signals = |kind| {
        signal(kind).map_err(|error| RunError::Serve(format!("cannot handle signals: {error}")))
    };
    let mut terminate = signals(SignalKind::terminate())?;
    let mut interrupt = signals(SignalKind::interrupt())?;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http1 = hyper::server::conn::http1::Builder::new();
    let clients = shared.clients;
    let head_size = usize::try_from(clients.max_head_size).unwrap_or(usize::MAX);
    http1
        .keep_alive(true)
        .timer(TokioTimer::new())
        // hyper starts this clock whenever the connection waits for a head: just
        // accepted, or idle on keep-alive after a response.
        .header_read_timeout(clients.head_timeout)
        .max_header_size(head_size)
        .max_buf_size(head_size.max(MIN_READ_BUFFER));
    let mut backoff = AcceptBackoff::default();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => {
                        backoff.reset();
                        stream
                    }
                    Err(error) => {
                        // Out of descriptors or memory: trying again at once would spin.
                        shared.metrics.accept_errors.inc();
                        let pause = backoff.next();
                        eprintln!("bulwark: cannot accept a connection ({error}); trying again in {pause:?}");
                        tokio::time::sleep(pause).await;
                        continue;
                    }
                };
                let Some(permit) = shared.connections.admit(&shared.metrics).await else {
                    shared.metrics.connection("refused");
                    // Closed at once: a queue of waiting connections is what an attacker
                    // would fill.
                    drop(stream);
                    continue;
                };
                shared.metrics.connection("accepted");
                // A response goes out as soon as it is written: with Nagle's algorithm, a
                // small response waits for the client's delayed ACK (40 ms) on keep-alive.
                let _ = stream.set_nodelay(true);
                let client = shared.connections.register();
                let service = {
                    let (shared, client) = (shared.clone(), client.clone());
                    hyper::service::service_fn(move |request| {
                        handle(shared.clone(), request, client.clone())
                    })
                };
                let connection = http1.serve_connection(
                    TokioIo::new(Deadlined::new(stream, client.clone())),
                    service,
                );
                let watched = graceful.watch(connection);
                let shared = shared.clone();
                tokio::spawn(async move {
                    let _open = (permit, Counted::new(&shared.metrics.connections_open));
                    tokio::select! {
                        ended = watched => {
                            if let Err(error) = ended {
                                let event = if client.cut_at_deadline.load(Ordering::Relaxed) {
                                    "response_deadline"
                                } else {
                                    connection_end(&error)
                                };
                                shared.metrics.connection(event);
                            }
                        }
                        // Pushed out by a newer connection while it only waited: dropped,
                        // so closed.
                        () = client.evict.notified() => {}
                    }
                    client.closed.store(true, Ordering::Relaxed);
                });
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => return Ok(128 + libc::SIGINT),
        }
    }
    drop(listener);
    eprintln!("bulwark: SIGTERM: no new connections; finishing the requests in flight");
    tokio::select! {
        () = graceful.shutdown() => {
            eprintln!("bulwark: every request finished; exiting");
            Ok(0)
        }
        _ = terminate.recv() => Ok(128 + libc::SIGTERM),
        _ = interrupt.recv() => Ok(128 + libc::SIGINT),
    }
}

/// One request: a slot, a fresh instance, the guest's response or the limit that ended it.
async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
    client: Arc<ClientConnection>,
) -> Result<Response<HyperOutgoingBody>, Infallible> {
    // Busy (not to be pushed out) until hyper has written the response and dropped it.
    let busy = Busy::new(&client);
    let started = Instant::now();
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let what = format!("request {id} {} {}", request.method(), request.uri().path());
    let deadline = shared.limits.timeout.as_ref().map(|t| started + t.value);
    client.set_write_deadline(deadline);
    let max_body = shared.clients.max_body_size;
    let declared_body = request
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|length| length.to_str().ok()?.parse::<u64>().ok());
    let response = match declared_body.filter(|length| *length > max_body) {
        Some(length) => {
            let reason = format!(
                "the request body of {length} bytes is over this node's cap of {} (serving.max_body_size)",
                format_size(max_body)
            );
            write_line(format_args!("bulwark: {what}: 413: {reason}"));
            text_response(StatusCode::PAYLOAD_TOO_LARGE, &reason)
        }
        None => match acquire(&shared, deadline).await {
            Some(slot) => {
                let request = request.map(|body| CappedBody {
                    inner: body,
                    left: max_body,
                });
                run_request(&shared, &client, request, started, deadline, &what, slot).await
            }
            None => busy_response(&shared, &what),
        },
    };
    let metrics = &shared.metrics;
    metrics
        .requests
        .get_or_create(&StatusLabel {
            status: response.status().as_u16(),
        })
        .inc();
    metrics.duration.observe(started.elapsed().as_secs_f64());
    Ok(response.map(|body| {
        BusyBody {
            inner: body,
            _busy: busy,
        }
        .boxed_unsync()
    }))
}

/// 503 for a request that found every instance busy for its whole deadline.
fn busy_response(shared: &Shared, what: &str) -> Response<HyperOutgoingBody> {
    let reason = format!(
        "all {} instances were busy for this request's whole deadline ({})",
        shared.concurrency,
        shared
            .limits
            .timeout
            .as_ref()
            .map_or("none".into(), |t| t.source.to_string())
    );
    write_line(format_args!("bulwark: {what}: 503: {reason}"));
    let mut response = text_response(StatusCode::SERVICE_UNAVAILABLE, &reason);
    response.headers_mut().insert(
        hyper::header::RETRY_AFTER,
        RETRY_AFTER_SECONDS
            .to_string()
            .parse()
            .expect("a number is a header value"),
    );
    response
}

/// A slot among the `concurrency` ones, waited for until `deadline` (or forever). A slot
/// that comes with less than a tenth of the request's time left comes too late to serve
/// it: the request is refused (503) rather than started only to hit its deadline (and, in
/// a burst, every later request queued behind it with it).
async fn acquire(
    shared: &Shared,
    deadline: Option<Instant>,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    let _queued = Counted::new(&shared.metrics.queued);
    let wait = shared.slots.clone().acquire_owned();
    match (deadline, &shared.limits.timeout) {
        (Some(deadline), Some(timeout)) => {
            let too_late = deadline - timeout.value / 10;
            tokio::time::timeout_at(too_late.into(), wait)
                .await
                .ok()
                .and_then(Result::ok)
        }
        _ => wait.await.ok(),
    }
}

/// What the guest answered: its response (head sent on, body streaming), or the error code
/// it answered with instead, in words.
type Answer = Result<Response<HyperOutgoingBody>, String>;

/// One request, made ready for the handler its component exports.
enum Prepared {
    P2 {
        request: wasmtime::component::Resource<wasmtime_wasi_http::p2::types::HostIncomingRequest>,
        outparam:
            wasmtime::component::Resource<wasmtime_wasi_http::p2::types::HostResponseOutparam>,
    },
    P3 {
        request: wasmtime_wasi_http::p3::Request,
        io: std::pin::Pin<
            Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send + 'static>,
        >,
        answer: Answering,
    },
}

/// Where a guest's answer goes, remembering what became of it for the request's log line.
#[derive(Clone)]
struct Answering {
    sender: Arc<std::sync::Mutex<Option<tokio::sync::oneshot::Sender<Answer>>>>,
    answered: Arc<std::sync::Mutex<Answered>>,
}

/// What became of a guest's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answered {
    Not,
    /// A response head went out with this status; its body streams.
    Response(u16),
    /// The guest answered with an error code: the client got a whole 500 saying so.
    Error(String),
    /// The client had gone before the answer came.
    ClientGone,
}

impl Answering {
    fn new() -> (Answering, tokio::sync::oneshot::Receiver<Answer>) {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let answering = Answering {
            sender: Arc::new(std::sync::Mutex::new(Some(sender))),
            answered: Arc::new(std::sync::Mutex::new(Answered::Not)),
        };
        (answering, receiver)
    }

    fn send(&self, answer: Answer) {
        let what = match &answer {
            Ok(response) => Answered::Response(response.status().as_u16()),
            Err(code) => Answered::Error(code.clone()),
        };
        let sender = self
            .sender
            .lock()
            .map(|mut sender| sender.take())
            .ok()
            .flatten();
        let Some(sender) = sender else {
            return;
        };
        let what = match sender.send(answer) {
            Ok(()) => what,
            Err(_) => Answered::ClientGone,
        };
        if let Ok(mut answered) = self.answered.lock() {
            *answered = what;
        }
    }

    fn answered(&self) -> Answered {
        self.answered
            .lock()
            .map_or(Answered::Not, |answered| answered.clone())
    }
}

impl HandlerPre {
    /// Turns `request` into what the handler takes, with `answer` where its response goes.
    fn prepare(
        &self,
        store: &mut Store<ServeHost>,
        request: Request<CappedBody>,
        answer: &Answering,
    ) -> wasmtime::Result<Prepared> {
        match self {
            HandlerPre::P2(_) => {
                let mut http = store.data_mut().http();
                let request = http.new_incoming_request(Scheme::Http, request)?;
                let answer = answer.clone();
                let outparam = http.new_response_outparam_from_callback(move |result| {
                    answer.send(result.map_err(|code| format!("{code:?}")));
                })?;
                Ok(Prepared::P2 { request, outparam })
            }
            HandlerPre::P3(_) => {
                let (request, io) = wasmtime_wasi_http::p3::Request::from_http(
                    store.data_mut().http().hooks,
                    request,
                );
                Ok(Prepared::P3 {
                    request,
                    io: Box::pin(io),
                    answer: answer.clone(),
                })
            }
        }
    }
}

impl Handler {
    /// Calls the handler with `prepared` and runs it to its end: a 0.2 handler's call
    /// returning, a 0.3 handler's response body fully sent (its instance produces the body
    /// after the call returned, so the instance lives until then).
    async fn handle(
        self,
        store: &mut Store<ServeHost>,
        prepared: Prepared,
    ) -> wasmtime::Result<()> {
        match (self, prepared) {
            (Handler::P2(proxy), Prepared::P2 { request, outparam }) => {
                proxy
                    .wasi_http_incoming_handler()
                    .call_handle(&mut *store, request, outparam)
                    .await
            }
            (
                Handler::P3(service),
                Prepared::P3 {
                    request,
                    io,
                    answer,
                },
            ) => {
                store
                    .run_concurrent(async move |accessor| {
                        match service.handle(accessor, request).await? {
                            Ok(response) => {
                                let response = accessor
                                    .with(|mut store| response.into_http(&mut store, io))?;
                                let (sent, body_done) = tokio::sync::oneshot::channel();
                                answer.send(Ok(response.map(|body| {
                                    BodyEnd {
                                        inner: body,
                                        ended: Some(sent),
                                    }
                                    .boxed_unsync()
                                })));
                                let _ = body_done.await;
                            }
                            Err(code) => answer.send(Err(format!("{code:?}"))),
                        }
                        Ok(())
                    })
                    .await?
            }
            _ => Err(wasmtime::Error::msg(
                "a request prepared for the other wasi:http version",
            )),
        }
    }
}

/// Runs the guest's handler for `request` in a fresh instance.
async fn run_request(
    shared: &Arc<Shared>,
    client: &Arc<ClientConnection>,
    request: Request<CappedBody>,
    started: Instant,
    deadline: Option<Instant>,
    what: &str,
    slot: tokio::sync::OwnedSemaphorePermit,
) -> Response<HyperOutgoingBody> {
    let mut store = match shared.store(deadline) {
        Ok(store) => store,
        Err(error) => {
            write_line(format_args!("bulwark: {what}: {error}"));
            return text_response(StatusCode::INTERNAL_SERVER_ERROR, &error.to_string());
        }
    };
    let (answering, answered) = Answering::new();
    let prepared = match shared.pre.prepare(&mut store, request, &answering) {
        Ok(prepared) => prepared,
        Err(error) => {
            write_line(format_args!("bulwark: {what}: 400 bad request: {error:#}"));
            return text_response(StatusCode::BAD_REQUEST, &format!("bad request: {error:#}"));
        }
    };
    let (ended, ending) = tokio::sync::oneshot::channel::<bool>();
    let task = tokio::spawn(run_instance(
        shared.clone(),
        store,
        prepared,
        Finish {
            what: what.to_owned(),
            started,
            deadline,
            client: client.clone(),
            answering,
            ended,
            _slot: slot,
        },
    ));
    // The instance keeps the deadline itself (whether or not this future, which hyper
    // drops when the client goes away, is still here): an answer, or the instance's end.
    match answered.await {
        Ok(Ok(response)) => response.map(|body| {
            // A limit may still end the handler while the body streams, the deadline
            // included (a guest stuck writing to a client that does not read): the
            // connection is then aborted.
            CompletedBody {
                inner: body,
                ending: Some(ending),
            }
            .boxed_unsync()
        }),
        Ok(Err(code)) => text_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("the handler answered with an error: {code}"),
        ),
        // The instance ended without answering: how?
        Err(_) => match task.await {
            Ok(Some(outcome)) => limit_response(&outcome),
            Ok(None) => text_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the handler returned without a response",
            ),
            Err(error) => {
                write_line(format_args!(
                    "bulwark: {what}: 500 the request's task failed: {error}"
                ));
                text_response(StatusCode::INTERNAL_SERVER_ERROR, &error.to_string())
            }
        },
    }
}

/// What a request's instance needs to end it and to say how it ended.
struct Finish {
    what: String,
    started: Instant,
    answering: Answering,
    /// When the instance is dropped wherever it is (running Wasm traps at the next epoch
    /// tick anyway; suspended in a host call, it is dropped there).
    deadline: Option<Instant>,
    /// Its connection, told when its response was cut at the deadline.
    client: Arc<ClientConnection>,
    /// Told whether a limit (or trap) ended the handler, when it is done.
    ended: tokio::sync::oneshot::Sender<bool>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

/// Instantiates the component and runs the request's handler to its end, or until its
/// deadline; then writes the request's log line with what it used, and counts
/// it. Returns the limit (or trap) that ended it, if any.
async fn run_instance(
    shared: Arc<Shared>,
    mut store: Store<ServeHost>,
    prepared: Prepared,
    finish: Finish,
) -> Option<Outcome> {
    let in_flight = Counted::new(&shared.metrics.in_flight);
    let work = async {
        let instantiating = Instant::now();
        let handler = shared.pre.instantiate(&mut store).await?;
        shared
            .metrics
            .instantiation
            .observe(instantiating.elapsed().as_secs_f64());
        handler.handle(&mut store, prepared).await
    };
    // A client that went away ends nothing (the handler may have work to finish); the
    // deadline ends everything.
    let deadline_passed = async {
        match finish.deadline {
            Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
            None => std::future::pending().await,
        }
    };
    let result = tokio::select! {
        biased;
        () = deadline_passed => None,
        result = work => Some(result),
    };
    drop(in_flight);
    let guard = &store.data().guard;
    let deadline_passed = result.is_none();
    let outcome = match result {
        None => shared.limits.timeout.clone().map(Outcome::DeadlineExceeded),
        Some(Ok(())) => None,
        Some(Err(error)) => Some(classify(error, guard, &shared.limits)),
    };
    let usage = Usage {
        wall: finish.started.elapsed(),
        cpu: None,
        fuel: fuel_consumed(&store, shared.limits.fuel.as_ref().map(|fuel| fuel.value)),
        memory: guard.peak(),
    };
    shared.metrics.usage(&usage, outcome.as_ref());
    let answered = finish.answering.answered();
    if deadline_passed && matches!(answered, Answered::Response(_)) {
        finish.client.cut_at_deadline.store(true, Ordering::Relaxed);
    }
    write_line(format_args!(
        "bulwark: {}: {} {usage}",
        finish.what,
        request_ending(&answered, outcome.as_ref())
    ));
    let _ = finish.ended.send(outcome.is_some());
    outcome
}

/// How a request ended, for its log line: the status the client got, and the limit's (or
/// trap's) reason if one ended its handler.
fn request_ending(answered: &Answered, outcome: Option<&Outcome>) -> String {
    let then = |outcome: Option<&Outcome>| {
        outcome.map_or(String::new(), |outcome| {
            format!(", then {}", reason_of(outcome))
        })
    };
    match (answered, outcome) {
        (Answered::Not, Some(outcome)) => {
            format!("{} {}", limit_status(outcome).as_u16(), reason_of(outcome))
        }
        (Answered::Not, None) => "500 the handler returned without a response".into(),
        (Answered::Response(status), None) => status.to_string(),
        (Answered::Response(status), Some(outcome)) => format!(
            "{status}, then {} (after the response head: connection aborted)",
            reason_of(outcome)
        ),
        (Answered::Error(code), outcome) => format!(
            "500 the handler answered with an error: {code}{}",
            then(outcome)
        ),
        (Answered::ClientGone, outcome) => {
            format!("the client went away before the answer{}", then(outcome))
        }
    }
}

/// A 0.3 handler's response body that says when it ended (or was dropped), so its
/// instance, which produces it, lives exactly as long as it is needed.
struct BodyEnd {
    inner: HyperOutgoingBody,
    ended: Option<tokio::sync::oneshot::Sender<()>>,
}

impl hyper::body::Body for BodyEnd {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(context);
        if matches!(polled, std::task::Poll::Ready(None | Some(Err(_)))) {
            self.ended.take().map(|ended| ended.send(()));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A guest's response body that fails, instead of ending, when the guest's handler failed
/// (a limit or a trap after it sent the head): hyper then aborts the connection, and the
/// client sees a broken response rather than a complete one.
struct CompletedBody {
    inner: HyperOutgoingBody,
    /// Whether the handler failed; sent when it is done.
    ending: Option<tokio::sync::oneshot::Receiver<bool>>,
}

impl hyper::body::Body for CompletedBody {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        match std::pin::Pin::new(&mut self.inner).poll_frame(context) {
            Poll::Ready(None) => {}
            other => return other,
        }
        let Some(ending) = self.ending.as_mut() else {
            return Poll::Ready(None);
        };
        match std::pin::Pin::new(ending).poll(context) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(failed) => {
                self.ending = None;
                match failed {
                    Ok(false) => Poll::Ready(None),
                    // Failed, or ended by its deadline (its task aborted, the sender gone).
                    Ok(true) | Err(_) => {
                        Poll::Ready(Some(Err(wasmtime_wasi_http::Error::HttpResponseIncomplete)))
                    }
                }
            }
        }
    }
}

/// The response for a request a limit (or trap) ended before it answered (its instance
/// wrote the log line).
fn limit_response(outcome: &Outcome) -> Response<HyperOutgoingBody> {
    let mut response = text_response(limit_status(outcome), &reason_of(outcome));
    response.headers_mut().insert(
        "bulwark-limit",
        limit_kind(outcome)
            .parse()
            .expect("a kind is a header value"),
    );
    response
}

fn reason_of(outcome: &Outcome) -> String {
    outcome
        .reason()
        .unwrap_or_else(|| format!("the handler exited ({})", outcome.exit_code()))
}

/// The `bulwark-limit` header's value (and the limits metric's label): a handler that
/// exited instead of answering is a trap here.
fn limit_kind(outcome: &Outcome) -> &'static str {
    outcome.limit().unwrap_or("trap")
}

/// The status of a request a limit ended before it answered.
fn limit_status(outcome: &Outcome) -> StatusCode {
    match outcome {
        Outcome::DeadlineExceeded(_) => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn text_response(status: StatusCode, text: &str) -> Response<HyperOutgoingBody> {
    let body = Full::new(Bytes::from(format!("{text}\n")))
        .map_err(|never: Infallible| match never {})
        .boxed_unsync();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        "text/plain; charset=utf-8"
            .parse()
            .expect("a media type is a header value"),
    );
    response
}

/// How long past its request's deadline a response may still be written: the limit's own
/// response (504 at the deadline) must get out; a client that does not read gets no more.
const RESPONSE_GRACE: Duration = Duration::from_secs(1);

/// hyper's read buffer may not be smaller than this.
const MIN_READ_BUFFER: usize = 8192;

/// How long to wait before accepting again after a failed accept (out of descriptors, out
/// of memory): doubling from 5 ms to 1 s, back to the start after a success.
#[derive(Debug, Default)]
struct AcceptBackoff(u32);

impl AcceptBackoff {
    fn next(&mut self) -> Duration {
        let pause = Duration::from_millis(5u64 << self.0.min(8)).min(Duration::from_secs(1));
        self.0 = self.0.saturating_add(1);
        pause
    }

    fn reset(&mut self) {
        self.0 = 0;
    }
}

/// What ended a connection with an error, for `bulwark_connections_total{event}` (one whose
/// response was cut at its deadline says so itself: [`ClientConnection::cut_at_deadline`]).
fn connection_end(error: &hyper::Error) -> &'static str {
    if error.is_timeout() {
        return "head_timeout";
    }
    if error.is_parse_too_large() {
        return "head_too_large";
    }
    if error.is_parse() {
        return "malformed";
    }
    "broken"
}

/// The open client connections of a service, oldest first, and the cap on them.
///
/// At the cap, a new connection pushes out the oldest one that is only waiting (for a
/// request head that is slow to come, or idle on keep-alive) instead of being refused:
/// otherwise slow clients that fill the cap would lock every other client out until
/// `head_timeout`. Only when every open connection is in the middle of a request is the new
/// one refused.
struct ConnectionTable {
    slots: Arc<tokio::sync::Semaphore>,
    open: std::sync::Mutex<std::collections::VecDeque<Arc<ClientConnection>>>,
    cap: usize,
}

/// How long a new connection waits for the slot of the one it pushed out.
const EVICTION_WAIT: Duration = Duration::from_millis(500);

impl ConnectionTable {
    fn new(cap: u32) -> ConnectionTable {
        ConnectionTable {
            slots: Arc::new(tokio::sync::Semaphore::new(cap as usize)),
            open: std::sync::Mutex::new(std::collections::VecDeque::new()),
            cap: cap as usize,
        }
    }

    /// A slot for a new connection: a free one, or the one of the oldest waiting
    /// connection, pushed out; `None` when every connection is busy with a request.
    async fn admit(&self, metrics: &Metrics) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Some(permit);
        }
        let pushed_out = {
            let mut open = self.lock();
            open.retain(|client| !client.closed.load(Ordering::Relaxed));
            open.iter()
                .position(|client| client.waiting())
                .and_then(|index| open.remove(index))
        }?;
        metrics.connection("pushed_out");
        pushed_out.evict.notify_one();
        tokio::time::timeout(EVICTION_WAIT, self.slots.clone().acquire_owned())
            .await
            .ok()?
            .ok()
    }

    /// Records a connection just admitted.
    fn register(&self) -> Arc<ClientConnection> {
        let client = Arc::new(ClientConnection::default());
        let mut open = self.lock();
        if open.len() >= self.cap {
            open.retain(|client| !client.closed.load(Ordering::Relaxed));
        }
        open.push_back(client.clone());
        client
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<Arc<ClientConnection>>> {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One client connection's state, shared by its task, its requests and its I/O.
#[derive(Debug, Default)]
struct ClientConnection {
    /// Requests whose response hyper has not finished with.
    busy: std::sync::atomic::AtomicU32,
    /// The latest time the connection may still write its response: the deadline of the
    /// request it answers (set when the request arrives; hyper serves one at a time).
    write_deadline: std::sync::Mutex<Option<Instant>>,
    /// Told to close: pushed out by a newer connection.
    evict: tokio::sync::Notify,
    /// Its task ended.
    closed: std::sync::atomic::AtomicBool,
    /// A response of its was cut off at its request's deadline (the guest's handler ended,
    /// or writing to a client that did not read stopped).
    cut_at_deadline: std::sync::atomic::AtomicBool,
}

impl ClientConnection {
    /// Whether it only waits for a request (none in progress): it may be pushed out.
    fn waiting(&self) -> bool {
        self.busy.load(Ordering::Relaxed) == 0 && !self.closed.load(Ordering::Relaxed)
    }

    fn set_write_deadline(&self, deadline: Option<Instant>) {
        *self
            .write_deadline
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = deadline;
    }

    /// When writing its response must stop: the request's deadline and [`RESPONSE_GRACE`].
    fn write_deadline(&self) -> Option<Instant> {
        self.write_deadline
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .map(|deadline| deadline + RESPONSE_GRACE)
    }
}

/// A request in progress on its connection, from its handling until hyper drops its
/// response (written, or abandoned with the connection).
struct Busy(Arc<ClientConnection>);

impl Busy {
    fn new(client: &Arc<ClientConnection>) -> Busy {
        client.busy.fetch_add(1, Ordering::Relaxed);
        Busy(client.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its connection [`Busy`] for as long as hyper holds it.
struct BusyBody {
    inner: HyperOutgoingBody,
    _busy: Busy,
}

impl hyper::body::Body for BusyBody {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(context)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A client connection whose writes fail once the response's deadline has passed, even
/// while a write waits on a client that does not read: the connection then closes, so a
/// client cannot hold a connection (or the instance behind it) past the request's deadline
/// by leaving its receive window shut.
struct Deadlined {
    stream: tokio::net::TcpStream,
    client: Arc<ClientConnection>,
    timer: Option<(Instant, std::pin::Pin<Box<tokio::time::Sleep>>)>,
}

impl Deadlined {
    fn new(stream: tokio::net::TcpStream, client: Arc<ClientConnection>) -> Deadlined {
        Deadlined {
            stream,
            client,
            timer: None,
        }
    }

    /// The error of a write past the deadline, recorded on the connection.
    fn cut(&self) -> std::io::Error {
        self.client.cut_at_deadline.store(true, Ordering::Relaxed);
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the request's deadline passed while its response was being written",
        )
    }

    /// Whether the deadline has passed; if not, a wake-up is set for it.
    fn deadline_passed(&mut self, context: &mut std::task::Context<'_>) -> bool {
        let Some(deadline) = self.client.write_deadline() else {
            return false;
        };
        if Instant::now() >= deadline {
            return true;
        }
        let timer = match &mut self.timer {
            Some((at, timer)) if *at == deadline => timer,
            _ => {
                let timer = Box::pin(tokio::time::sleep_until(deadline.into()));
                &mut self.timer.insert((deadline, timer)).1
            }
        };
        timer.as_mut().poll(context).is_ready()
    }

    /// A write (or flush) that gives up at the deadline: at once when it has passed, or
    /// when it comes while the write waits for a client that does not read.
    fn bounded<T>(
        &mut self,
        context: &mut std::task::Context<'_>,
        write: impl FnOnce(
            std::pin::Pin<&mut tokio::net::TcpStream>,
            &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::task::Poll;
        if self
            .client
            .write_deadline()
            .is_some_and(|deadline| Instant::now() >= deadline)
        {
            return Poll::Ready(Err(self.cut()));
        }
        match write(std::pin::Pin::new(&mut self.stream), context) {
            Poll::Pending if self.deadline_passed(context) => Poll::Ready(Err(self.cut())),
            done => done,
        }
    }
}

impl tokio::io::AsyncRead for Deadlined {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_read(context, buf)
    }
}

impl tokio::io::AsyncWrite for Deadlined {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.get_mut()
            .bounded(context, |stream, context| stream.poll_write(context, buf))
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.get_mut().bounded(context, |stream, context| {
            stream.poll_write_vectored(context, bufs)
        })
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.get_mut()
            .bounded(context, |stream, context| stream.poll_flush(context))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_shutdown(context)
    }
}

/// A request body that fails once it has brought more than the node's cap: a chunked body
/// declares no length up front, so the cap is counted as it arrives.
struct CappedBody {
    inner: Incoming,
    left: u64,
}

impl hyper::body::Body for CappedBody {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        match std::pin::Pin::new(&mut self.inner).poll_frame(context) {
            Poll::Ready(Some(Ok(frame))) => {
                let size = frame.data_ref().map_or(0, |data| data.len() as u64);
                match self.left.checked_sub(size) {
                    Some(left) => {
                        self.left = left;
                        Poll::Ready(Some(Ok(frame)))
                    }
                    None => Poll::Ready(Some(Err(wasmtime_wasi_http::Error::HttpRequestBodySize(
                        None,
                    )))),
                }
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// One in a gauge for as long as it lives: a request's future may be dropped anywhere (a
/// deadline aborts it, a client goes away), and the gauge must not keep counting it.
struct Counted(Gauge);

impl Counted {
    fn new(gauge: &Gauge) -> Counted {
        gauge.inc();
        Counted(gauge.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabel {
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabel {
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// What `/metrics` shows.
struct Metrics {
    registry: Registry,
    requests: Family<StatusLabel, Counter>,
    limits: Family<KindLabel, Counter>,
    duration: Histogram,
    instantiation: Histogram,
    memory: Histogram,
    fuel: Histogram,
    in_flight: Gauge,
    queued: Gauge,
    concurrency: Gauge,
    connections: Family<EventLabel, Counter>,
    connections_open: Gauge,
    accept_errors: Counter,
    egress: Family<VerdictLabel, Counter>,
}

impl Metrics {
    fn new() -> Metrics {
        let mut metrics = Metrics {
            registry: Registry::with_prefix("bulwark"),
            requests: Family::default(),
            limits: Family::default(),
            duration: Histogram::new(exponential_buckets(0.0001, 4.0, 10)),
            // 1 us to about half a second, in doublings: fine enough for a p50 of a few us.
            instantiation: Histogram::new(exponential_buckets(0.000_001, 2.0, 20)),
            memory: Histogram::new(exponential_buckets(65536.0, 4.0, 10)),
            // A thousand units to about 270 billion, in quadruplings.
            fuel: Histogram::new(exponential_buckets(1000.0, 4.0, 15)),
            in_flight: Gauge::default(),
            queued: Gauge::default(),
            concurrency: Gauge::default(),
            connections: Family::default(),
            connections_open: Gauge::default(),
            accept_errors: Counter::default(),
            egress: Family::default(),
        };
        let registry = &mut metrics.registry;
        registry.register(
            "requests",
            "HTTP requests by status code",
            metrics.requests.clone(),
        );
        registry.register(
            "limits",
            "Requests a limit ended, by kind",
            metrics.limits.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from a request's arrival to its response head",
            metrics.duration.clone(),
        );
        registry.register(
            "instantiation_seconds",
            "Time to make a request's instance",
            metrics.instantiation.clone(),
        );
        registry.register(
            "request_memory_bytes",
            "Linear memory a request's instance held at most",
            metrics.memory.clone(),
        );
        registry.register(
            "request_fuel",
            "Fuel a request consumed (only where fuel is metered)",
            metrics.fuel.clone(),
        );
        registry.register(
            "in_flight",
            "Requests running in an instance",
            metrics.in_flight.clone(),
        );
        registry.register(
            "queued",
            "Requests waiting for an instance slot",
            metrics.queued.clone(),
        );
        registry.register("concurrency", "Instance slots", metrics.concurrency.clone());
        registry.register(
            "connections",
            "Client connections by event: accepted, pushed_out (a waiting one closed for a new one at the cap), refused (at the cap with every one busy), and how those that ended in an error ended (head_timeout, head_too_large, response_deadline, malformed, broken)",
            metrics.connections.clone(),
        );
        registry.register(
            "connections_open",
            "Client connections open",
            metrics.connections_open.clone(),
        );
        registry.register(
            "accept_errors",
            "Failed accepts (each followed by a pause)",
            metrics.accept_errors.clone(),
        );
        registry.register(
            "egress",
            "Connection attempts of the container's sockets, by the kernel's egress filter's verdict (allowed, denied; reports_dropped: denials counted but not logged)",
            metrics.egress.clone(),
        );
        metrics
    }

    /// Brings the egress counters up to what the shim last published in `counts`.
    fn read_egress(&self, counts: &std::fs::File) {
        use std::os::unix::fs::FileExt;
        let mut bytes = [0u8; EgressCounts::SIZE];
        // No filter attached (none on this node, or none needed): no series, rather than
        // zeros that would read as "nothing was denied".
        let Some(counts) = counts
            .read_exact_at(&mut bytes, 0)
            .ok()
            .and_then(|()| EgressCounts::decode(&bytes))
        else {
            return;
        };
        for (verdict, value) in [
            ("allowed", counts.allowed),
            ("denied", counts.denied),
            ("reports_dropped", counts.dropped),
        ] {
            let counter = self.egress.get_or_create(&VerdictLabel { verdict });
            counter.inc_by(value.saturating_sub(counter.get()));
        }
    }

    fn connection(&self, event: &'static str) {
        self.connections.get_or_create(&EventLabel { event }).inc();
    }

    /// Counts what a request's instance used, and the limit that ended it, if any.
    fn usage(&self, usage: &Usage, outcome: Option<&Outcome>) {
        self.memory.observe(usage.memory as f64);
        if let Fuel::Consumed(units) = usage.fuel {
            self.fuel.observe(units as f64);
        }
        if let Some(outcome) = outcome {
            self.limits
                .get_or_create(&KindLabel {
                    kind: limit_kind(outcome),
                })
                .inc();
        }
    }

    fn text(&self) -> String {
        let mut text = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// `/metrics` (Prometheus text) on its own listener; anything else is 404.
async fn serve_metrics(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    shared
        .metrics
        .concurrency
        .set(i64::from(shared.concurrency));
    let mut backoff = AcceptBackoff::default();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                backoff.reset();
                stream
            }
            Err(_) => {
                shared.metrics.accept_errors.inc();
                tokio::time::sleep(backoff.next()).await;
                continue;
            }
        };
        // A scraper is a client too: it gets the same time to send its request head.
        let head_timeout = shared.clients.head_timeout;
        let shared = shared.clone();
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let shared = shared.clone();
            async move {
                let response = if request.uri().path() == "/metrics" {
                    if let Some(counts) = &shared.workload.egress_counts {
                        shared.metrics.read_egress(counts);
                    }
                    let mut response =
                        text_response(StatusCode::OK, shared.metrics.text().trim_end());
                    response.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8"
                            .parse()
                            .expect("a media type is a header value"),
                    );
                    response
                } else {
                    text_response(StatusCode::NOT_FOUND, "metrics are at /metrics")
                };
                Ok::<_, Infallible>(response)
            }
        });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(head_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbound_requests_reach_only_granted_addresses() {
        let grants: Vec<SocketAddr> = vec![
            "10.0.0.5:8080".parse().unwrap(),
            "[::1]:80".parse().unwrap(),
        ];
        let allowed = |uri: &str| outbound_allowed(&grants, &uri.parse().unwrap());
        assert!(allowed("http://10.0.0.5:8080/x"));
        assert!(allowed("http://[::1]/"));
        assert!(!allowed("http://10.0.0.5/x"), "port 80 is not granted");
        assert!(
            allowed("https://10.0.0.5:8080/x"),
            "the grant is the address, any scheme"
        );
        assert!(!allowed("http://example.com:8080/"), "no DNS");
        assert!(!allowed("http://10.0.0.6:8080/"));
        assert!(!allowed("/relative"));
    }
}
