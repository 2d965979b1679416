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

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use wasmtime::component::{Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use crate::cache::Artifact;
use crate::engine::{ASYNC_STACK_SIZE, Allocation, build_engine};
use crate::policy::{Policy, Serving, ServingSizing};
use crate::run::{
    EpochDeadline, Guard, GuardedHost, Outcome, RunError, Runtime, StoreLimits, Workload, arm,
    classify, deserialize_component, start_epoch_ticker, wasi_builder,
};

/// What one request's instance costs beyond its linear memory and tables: its stack (the
/// engine's async stack, touched as deep as the guest goes) and its host state (WASI and
/// HTTP contexts, buffers).
pub const INSTANCE_OVERHEAD: u64 = ASYNC_STACK_SIZE as u64 + (512 << 10);
use crate::units::format_size;

/// What a client that got 503 is told to wait before it tries again.
const RETRY_AFTER_SECONDS: u64 = 1;

/// A wasi:http component, compiled and linked, ready to serve.
pub struct Service {
    engine: Engine,
    pre: ProxyPre<ServeHost>,
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
                "not a wasi:http component (it exports no wasi:http/incoming-handler): it runs as a program"
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
            .map_err(|error| RunError::Link(format!("{error:#}")))?;
        let pre = linker
            .instantiate_pre(&component)
            .and_then(ProxyPre::new)
            .map_err(|error| {
                RunError::Link(format!(
                    "the component does not serve wasi:http (no wasi:http/incoming-handler export it can be called through): {error:#}"
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
                let instance = shared.pre.instantiate_async(&mut store).await;
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
            "bulwark: serving on http://{}: {} requests at once ({}), {} per instance; the runtime holds {} with the component loaded",
            serving.listen,
            serving.concurrency.value,
            serving.concurrency.source,
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

/// What every request's handling shares.
struct Shared {
    engine: Engine,
    pre: ProxyPre<ServeHost>,
    policy: Policy,
    workload: Workload,
    limits: StoreLimits,
    grants: Arc<[SocketAddr]>,
    slots: Arc<tokio::sync::Semaphore>,
    concurrency: u32,
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
        match self.pre.instantiate_async(&mut store).await {
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
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                // A response goes out as soon as it is written: with Nagle's algorithm, a
                // small response waits for the client's delayed ACK (40 ms) on keep-alive.
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                let service = hyper::service::service_fn(move |request| {
                    handle(shared.clone(), request)
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service);
                let watched = graceful.watch(connection);
                tokio::spawn(async move {
                    let _ = watched.await;
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
) -> Result<Response<HyperOutgoingBody>, Infallible> {
    let started = Instant::now();
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let what = format!("request {id} {} {}", request.method(), request.uri().path());
    let deadline = shared.limits.timeout.as_ref().map(|t| started + t.value);
    let response = match acquire(&shared, deadline).await {
        Some(slot) => run_request(&shared, request, deadline, &what, slot).await,
        None => {
            let reason = format!(
                "all {} instances were busy for this request's whole deadline ({})",
                shared.concurrency,
                shared
                    .limits
                    .timeout
                    .as_ref()
                    .map_or("none".into(), |t| t.source.to_string())
            );
            eprintln!("bulwark: {what}: 503: {reason}");
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
    };
    let metrics = &shared.metrics;
    metrics
        .requests
        .get_or_create(&StatusLabel {
            status: response.status().as_u16(),
        })
        .inc();
    metrics.duration.observe(started.elapsed().as_secs_f64());
    Ok(response)
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

/// Runs the guest's handler for `request` in a fresh instance.
async fn run_request(
    shared: &Arc<Shared>,
    request: Request<Incoming>,
    deadline: Option<Instant>,
    what: &str,
    slot: tokio::sync::OwnedSemaphorePermit,
) -> Response<HyperOutgoingBody> {
    let mut store = match shared.store(deadline) {
        Ok(store) => store,
        Err(error) => {
            eprintln!("bulwark: {what}: {error}");
            return text_response(StatusCode::INTERNAL_SERVER_ERROR, &error.to_string());
        }
    };
    let (sender, receiver) = tokio::sync::oneshot::channel();
    let prepared = store
        .data_mut()
        .http()
        .new_incoming_request(Scheme::Http, request)
        .and_then(|request| {
            let outparam = store.data_mut().http().new_response_outparam(sender)?;
            Ok((request, outparam))
        });
    let (incoming, outparam) = match prepared {
        Ok(resources) => resources,
        Err(error) => {
            return text_response(StatusCode::BAD_REQUEST, &format!("bad request: {error:#}"));
        }
    };
    let (ended, ending) = tokio::sync::oneshot::channel::<bool>();
    let task = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let in_flight = Counted::new(&shared.metrics.in_flight);
            let instantiating = Instant::now();
            let result = match shared.pre.instantiate_async(&mut store).await {
                Ok(proxy) => {
                    shared
                        .metrics
                        .instantiation
                        .observe(instantiating.elapsed().as_secs_f64());
                    proxy
                        .wasi_http_incoming_handler()
                        .call_handle(&mut store, incoming, outparam)
                        .await
                }
                Err(error) => Err(error),
            };
            drop(in_flight);
            let guard = &store.data().guard;
            shared.metrics.memory.observe(guard.peak() as f64);
            let outcome = result
                .err()
                .map(|error| classify(error, guard, &shared.limits));
            let _ = ended.send(outcome.is_some());
            outcome
        })
    };
    let waited = match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline.into(), receiver).await,
        None => Ok(receiver.await),
    };
    match waited {
        Ok(Ok(Ok(response))) => {
            // A limit may still end the handler while the body streams.
            let (shared, what) = (shared.clone(), what.to_owned());
            tokio::spawn(async move {
                if let Ok(Some(outcome)) = task.await {
                    shared.metrics.limit(&outcome);
                    eprintln!(
                        "bulwark: {what}: {} (after the response head: connection aborted)",
                        reason_of(&outcome)
                    );
                }
            });
            response.map(|body| {
                CompletedBody {
                    inner: body,
                    ending: Some(ending),
                }
                .boxed_unsync()
            })
        }
        Ok(Ok(Err(code))) => text_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("the handler answered with an error: {code:?}"),
        ),
        // The handler ended without answering: how?
        Ok(Err(_)) => match task.await {
            Ok(Some(outcome)) => limit_response(shared, what, &outcome),
            Ok(None) => text_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the handler returned without a response",
            ),
            Err(error) => text_response(StatusCode::INTERNAL_SERVER_ERROR, &error.to_string()),
        },
        // The deadline passed with no answer: the instance goes (a guest blocked in a
        // host call is dropped; one running Wasm would trap at the next epoch anyway).
        Err(_) => {
            task.abort();
            let timeout = shared
                .limits
                .timeout
                .clone()
                .expect("a deadline has a timeout");
            limit_response(shared, what, &Outcome::DeadlineExceeded(timeout))
        }
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
                    Ok(true) => {
                        Poll::Ready(Some(Err(wasmtime_wasi_http::Error::HttpResponseIncomplete)))
                    }
                    _ => Poll::Ready(None),
                }
            }
        }
    }
}

/// The response for a request a limit (or trap) ended before it answered.
fn limit_response(shared: &Shared, what: &str, outcome: &Outcome) -> Response<HyperOutgoingBody> {
    shared.metrics.limit(outcome);
    let reason = reason_of(outcome);
    eprintln!("bulwark: {what}: {reason}");
    let status = match outcome {
        Outcome::DeadlineExceeded(_) => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let mut response = text_response(status, &reason);
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

/// The `bulwark-limit` header's value (and the limits metric's label).
fn limit_kind(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::DeadlineExceeded(_) => "timeout",
        Outcome::FuelExhausted(_) => "fuel",
        Outcome::MemoryLimit { .. } => "memory",
        Outcome::Trapped(_) | Outcome::Exited(_) => "trap",
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
    in_flight: Gauge,
    queued: Gauge,
    concurrency: Gauge,
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
            in_flight: Gauge::default(),
            queued: Gauge::default(),
            concurrency: Gauge::default(),
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
            "instance_memory_bytes",
            "Linear memory an instance held at most",
            metrics.memory.clone(),
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
        metrics
    }

    fn limit(&self, outcome: &Outcome) {
        self.limits
            .get_or_create(&KindLabel {
                kind: limit_kind(outcome),
            })
            .inc();
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
    while let Ok((stream, _)) = listener.accept().await {
        let shared = shared.clone();
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let shared = shared.clone();
            async move {
                let response = if request.uri().path() == "/metrics" {
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
