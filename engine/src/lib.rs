//! appliance_engine: the appliance's native gRPC front (issue 19).

pub mod client;
pub mod forward;
pub mod grpc;
pub mod hits;
pub mod py_ratelimit;
pub mod py_store;
pub mod ratelimit;
pub mod server;
pub mod store;
pub mod tls;

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};

use server::{Event, Limits, Metadata, Reply, Shared, Value};

/// Rust's allocations only (Python's objects keep their own allocator).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// mi_option_arena_eager_commit in mimalloc.h (v3, the version Cargo.lock pins).
const MI_OPTION_ARENA_EAGER_COMMIT: std::ffi::c_int = 4;

fn metadata_from(items: Option<Vec<(String, Bound<'_, PyAny>)>>) -> PyResult<Metadata> {
    let mut out = Vec::new();
    for (key, value) in items.unwrap_or_default() {
        if let Ok(b) = value.downcast::<PyBytes>() {
            out.push((key, Value::Binary(b.as_bytes().to_vec())));
        } else {
            out.push((key, Value::Text(value.str()?.to_string())));
        }
    }
    Ok(out)
}

/// Front's `hits`: (GroupCache/Get's index, max group bytes, max key
/// bytes, the hot-key trailer, Some((Cache/GetMany's index, max keys, max
/// reply bytes, bytes each key adds to the reply's estimate))).
type HitsArg<'py> = (
    usize,
    usize,
    usize,
    Vec<(String, Bound<'py, PyAny>)>,
    Option<(usize, usize, usize, usize)>,
);

/// The front Python drives (appliance/fronts/grpc_engine/server.py): hits
/// answered here, every other call handed over as an event, answered by id.
#[pyclass(module = "appliance_engine")]
struct Front {
    shared: Arc<Shared>,
    events: Mutex<Option<mpsc::Receiver<Event>>>,
    listener: Mutex<Option<std::net::TcpListener>>,
    port: u16,
    tls: Option<tokio_rustls::TlsAcceptor>,
    io_threads: usize,
    runtime: Mutex<Option<Io>>,
    stop: Arc<tokio::sync::Notify>,
}

impl Front {
    /// The hit path, for the methods that configure it.
    fn hits(&self) -> PyResult<&hits::Hits> {
        self.shared
            .hits()
            .ok_or_else(|| PyRuntimeError::new_err("this front was made without hits"))
    }
}

#[pymethods]
impl Front {
    #[new]
    /// `hits` (HitsArg) to answer hits in the engine (serve_group,
    /// open_hits); None: every call goes to Python.
    #[pyo3(signature = (target, methods, io_threads=1, max_message=4_194_304, max_concurrent_streams=1024, max_header_list_size=16_384, max_connections=4096, tls_cert=None, tls_key=None, tls_ca=None, client_auth=false, hits=None))]
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn new(
        target: &str,
        methods: Vec<(String, bool)>,
        io_threads: usize,
        max_message: usize,
        max_concurrent_streams: u32,
        max_header_list_size: u32,
        max_connections: usize,
        tls_cert: Option<String>,
        tls_key: Option<String>,
        tls_ca: Option<String>,
        client_auth: bool,
        hits: Option<HitsArg<'_>>,
    ) -> PyResult<Self> {
        let tls = match (tls_cert, tls_key) {
            (Some(cert), Some(key)) => {
                let config = tls::server_config(&cert, &key, tls_ca.as_deref(), client_auth)
                    .map_err(PyValueError::new_err)?;
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
            }
            (None, None) => None,
            _ => return Err(PyValueError::new_err("tls_cert and tls_key go together")),
        };
        let listener =
            std::net::TcpListener::bind(target).map_err(|e| PyOSError::new_err(e.to_string()))?;
        let port = listener
            .local_addr()
            .map_err(|e| PyOSError::new_err(e.to_string()))?
            .port();
        let limits = Limits {
            max_message,
            max_concurrent_streams,
            max_header_list_size,
            max_connections,
        };
        let hits = match hits {
            Some((method, max_group, max_key, trailer, many)) => {
                let many = many.map(|(method, max_keys, max_reply, per_key)| hits::ManyLimits {
                    method,
                    max_keys,
                    max_reply,
                    per_key,
                });
                let trailer = metadata_from(Some(trailer))?;
                Some((method, hits::Hits::new(max_group, max_key, trailer, many)))
            }
            None => None,
        };
        let (shared, rx) = Shared::new(methods, limits, hits);
        Ok(Front {
            shared,
            events: Mutex::new(Some(rx)),
            listener: Mutex::new(Some(listener)),
            port,
            tls,
            io_threads: io_threads.max(1),
            runtime: Mutex::new(None),
            stop: Arc::new(tokio::sync::Notify::new()),
        })
    }

    #[getter]
    fn bound_port(&self) -> u16 {
        self.port
    }

    fn set_fallback(&self, path: String) {
        self.shared.set_fallback(path);
    }

    /// (requests refused over the message limit, connections refused over
    /// the connection limit) since the front was made.
    fn refusals(&self) -> (u64, u64) {
        (
            self.shared.refused_messages.load(Ordering::Relaxed),
            self.shared.refused_connections.load(Ordering::Relaxed),
        )
    }

    /// Serves hits of group `name` from these stores; `every`: one main
    /// hit in this many is sampled for the owner's hot keys.
    fn serve_group(
        &self,
        name: &str,
        main: &py_store::PyStore,
        hot: &py_store::PyStore,
        every: u64,
    ) -> PyResult<py_store::PyHitGroup> {
        let hits = self.hits()?;
        if main.clock.is_some() || hot.clock.is_some() {
            return Err(PyValueError::new_err(
                "a store on another clock than time.monotonic cannot be served from",
            ));
        }
        let group = Arc::new(hits::HitGroup::new(
            main.inner.clone(),
            hot.inner.clone(),
            every,
        ));
        hits.groups
            .write()
            .unwrap()
            .insert(name.as_bytes().into(), group.clone());
        Ok(py_store::PyHitGroup { inner: group })
    }

    /// Who may read on the hit path: everyone (`open`), else holders of
    /// these tokens (SHA-256 digest, has the read scope) and certificate
    /// identities (name, has the read scope).
    fn set_access(
        &self,
        open: bool,
        tokens: Vec<(Vec<u8>, bool)>,
        identities: Vec<(String, bool)>,
    ) -> PyResult<()> {
        let hits = self.hits()?;
        let mut digests = Vec::with_capacity(tokens.len());
        for (digest, read) in tokens {
            let digest: [u8; 32] = digest
                .try_into()
                .map_err(|_| PyValueError::new_err("a token digest is 32 bytes (SHA-256)"))?;
            digests.push((digest, read));
        }
        *hits.access.write().unwrap() = hits::Access {
            open,
            tokens: digests,
            identities: identities.into_iter().collect(),
        };
        Ok(())
    }

    /// How the hit path takes a peer's forward: `key` None, on its marker
    /// (a node with no cluster token); else checking its proof with
    /// PeerProofs' key, for `addr`, made no earlier than `since_ms`.
    #[pyo3(signature = (key, addr, since_ms))]
    fn set_peer_proofs(&self, key: Option<Vec<u8>>, addr: String, since_ms: i64) -> PyResult<()> {
        let hits = self.hits()?;
        let proofs = key.map(|k| Arc::new(hits::Proofs::new(&k, addr, since_ms)));
        *hits.peers.write().unwrap() = Some(proofs);
        Ok(())
    }

    /// `[ops] rate_limit` on the hit path: charge these buckets (the ones
    /// Python charges), where forwards from the `trusted` addresses (the
    /// ring's) are free; None: no limit.
    #[pyo3(signature = (buckets, trusted=Vec::new()))]
    fn set_limit(
        &self,
        buckets: Option<&py_ratelimit::PyTokenBuckets>,
        trusted: Vec<String>,
    ) -> PyResult<()> {
        let hits = self.hits()?;
        if buckets.is_some_and(|b| b.clock.is_some()) {
            return Err(PyValueError::new_err(
                "buckets on another clock than time.monotonic cannot be charged here",
            ));
        }
        *hits.limit.write().unwrap() = buckets.map(|b| ratelimit::Limit {
            buckets: b.inner.clone(),
            trusted: trusted.into_iter().collect(),
        });
        Ok(())
    }

    /// Opens (the node has a ring) or closes (it stops) the hit path.
    fn open_hits(&self, open: bool) {
        if let Some(hits) = self.shared.hits() {
            hits.open.store(open, Ordering::Release);
        }
    }

    /// Forward misses of keys other members own from here, on the
    /// engine's client (forward.rs): the ring's (hash, peer index) points
    /// over `addrs`, our own index, whose breaker is closed, the peer
    /// timeout and the share of a caller's time a forward takes. `addrs`
    /// None: Python forwards every miss.
    #[pyo3(signature = (points, addrs, me, allowed, peer_timeout, share))]
    fn set_forwarding(
        &self,
        points: Vec<(u32, u16)>,
        addrs: Option<Vec<String>>,
        me: Option<u16>,
        allowed: Vec<bool>,
        peer_timeout: f64,
        share: f64,
    ) -> PyResult<()> {
        let hits = self.hits()?;
        match addrs {
            None => hits.forwarder.off(),
            Some(addrs) => hits.forwarder.configure(
                points,
                addrs,
                me,
                allowed,
                peer_timeout,
                share,
                self.shared.limits.max_message,
            ),
        }
        Ok(())
    }

    /// Group `name`'s rules for forwarding its misses from here: hot copies
    /// never (`promote` 0) or while the hot cache has room (1), its ttl and
    /// budget; `promote` None: its misses go to Python.
    #[pyo3(signature = (name, promote, ttl, cache_bytes))]
    fn forward_group(
        &self,
        name: &str,
        promote: Option<u8>,
        ttl: f64,
        cache_bytes: usize,
    ) -> PyResult<()> {
        let hits = self.hits()?;
        let groups = hits.groups.read().unwrap();
        let group = groups
            .get(name.as_bytes())
            .ok_or_else(|| PyValueError::new_err(format!("group {name:?} is not served")))?;
        *group.forwarding.write().unwrap() = promote.map(|promote| hits::GroupForwarding {
            promote,
            ttl,
            cache_bytes,
        });
        Ok(())
    }

    /// Gets answered by forwards the engine made itself.
    fn forwards_answered(&self) -> u64 {
        self.shared
            .hits()
            .map_or(0, |h| h.forwarder.answered.load(Ordering::Relaxed))
    }

    /// Peers the engine's forwards found silent since the last call (no
    /// answer, and no sign of life by a forward's first wait): Python
    /// opens their breakers before it serves the calls handed over.
    fn forwards_silenced(&self) -> Vec<String> {
        self.shared
            .hits()
            .map_or_else(Vec::new, |h| h.forwarder.take_silenced())
    }

    /// Gets the engine answered itself since the front was made.
    fn hits_answered(&self) -> u64 {
        self.shared
            .hits()
            .map_or(0, |h| h.answered.load(Ordering::Relaxed))
    }

    fn start(&self) -> PyResult<()> {
        let Some(listener) = self.listener.lock().unwrap().take() else {
            return Err(PyRuntimeError::new_err("already started"));
        };
        let serve = server::accept_loop(
            self.shared.clone(),
            listener,
            self.tls.clone(),
            self.stop.clone(),
        );
        let io = Io::start(self.io_threads, serve).map_err(PyRuntimeError::new_err)?;
        *self.runtime.lock().unwrap() = Some(io);
        Ok(())
    }

    /// Up to `max_events` events; blocks (GIL released, parked) for the
    /// first. None once the front is closed.
    #[pyo3(signature = (max_events, timeout_ms=None))]
    fn recv_batch_details<'py>(
        &self,
        py: Python<'py>,
        max_events: usize,
        timeout_ms: Option<u64>,
    ) -> PyResult<Option<Bound<'py, PyList>>> {
        let guard = self.events.lock();
        let Ok(mut guard) = guard else {
            return Ok(None);
        };
        // Moved into the wait and back: a Receiver may move, not be shared.
        let Some(rx) = guard.take() else {
            return Ok(None);
        };
        let (rx, batch, closed) = py.allow_threads(move || {
            let (batch, closed) = wait(&rx, max_events, timeout_ms);
            (rx, batch, closed)
        });
        if !closed {
            *guard = Some(rx);
        }
        drop(guard);
        if closed && batch.is_empty() {
            return Ok(None);
        }
        Ok(Some(to_python(py, batch)?))
    }

    #[pyo3(signature = (call_id, payload, initial_metadata=None, trailing_metadata=None))]
    fn respond(
        &self,
        call_id: u64,
        payload: &[u8],
        initial_metadata: Option<Vec<(String, Bound<'_, PyAny>)>>,
        trailing_metadata: Option<Vec<(String, Bound<'_, PyAny>)>>,
    ) -> PyResult<bool> {
        let _ = initial_metadata;
        let trailers = metadata_from(trailing_metadata)?;
        Ok(self.shared.reply(
            call_id,
            Reply::Ok(Bytes::copy_from_slice(payload), trailers),
        ))
    }

    #[pyo3(signature = (call_id, code, message, trailing_metadata=None))]
    fn fail(
        &self,
        call_id: u64,
        code: u32,
        message: String,
        trailing_metadata: Option<Vec<(String, Bound<'_, PyAny>)>>,
    ) -> PyResult<bool> {
        let trailers = metadata_from(trailing_metadata)?;
        Ok(self
            .shared
            .reply(call_id, Reply::Fail(code, message, trailers)))
    }

    fn stream_try_send(&self, call_id: u64, payload: &[u8]) -> i32 {
        self.shared.stream_try_send(call_id, payload)
    }

    fn stream_send(&self, py: Python<'_>, call_id: u64, payload: Vec<u8>) -> bool {
        let shared = self.shared.clone();
        py.allow_threads(move || shared.stream_send(call_id, payload))
    }

    #[pyo3(signature = (call_id, trailing_metadata=None))]
    fn stream_end(
        &self,
        call_id: u64,
        trailing_metadata: Option<Vec<(String, Bound<'_, PyAny>)>>,
    ) -> PyResult<()> {
        let trailers = metadata_from(trailing_metadata)?;
        self.shared.stream_end(call_id, trailers);
        Ok(())
    }

    /// Stops accepting, ends open calls and the event stream.
    fn close(&self, py: Python<'_>) {
        self.shared.close();
        self.stop.notify_waiters();
        let runtime = self.runtime.lock().unwrap().take();
        self.listener.lock().unwrap().take();
        if let Some(io) = runtime {
            py.allow_threads(move || io.stop());
        }
    }
}

/// The front's I/O: with one thread, a current-thread runtime driven by a
/// thread of its own (no work-stealing queues to pay for); with more, a
/// multi-thread runtime.
enum Io {
    One {
        done: tokio::sync::oneshot::Sender<()>,
        thread: std::thread::JoinHandle<()>,
    },
    Many(tokio::runtime::Runtime),
}

impl Io {
    fn start<F>(threads: usize, serve: F) -> Result<Io, String>
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        if threads > 1 {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name("engine-io")
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.spawn(serve);
            return Ok(Io::Many(runtime));
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let (done, until) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("engine-io".into())
            .spawn(move || {
                runtime.spawn(serve);
                let _ = runtime.block_on(until);
                // Dropping the runtime cancels what is still open.
            })
            .map_err(|e| e.to_string())?;
        Ok(Io::One { done, thread })
    }

    fn stop(self) {
        match self {
            Io::One { done, thread } => {
                let _ = done.send(());
                let _ = thread.join();
            }
            Io::Many(runtime) => runtime.shutdown_timeout(Duration::from_secs(2)),
        }
    }
}

fn wait(
    rx: &mpsc::Receiver<Event>,
    max_events: usize,
    timeout_ms: Option<u64>,
) -> (Vec<Event>, bool) {
    let mut batch = Vec::new();
    let first = match timeout_ms {
        Some(ms) => match rx.recv_timeout(Duration::from_millis(ms)) {
            Ok(e) => Some(e),
            Err(mpsc::RecvTimeoutError::Timeout) => return (batch, false),
            Err(mpsc::RecvTimeoutError::Disconnected) => None,
        },
        None => rx.recv().ok(),
    };
    let Some(first) = first else {
        return (batch, true);
    };
    if matches!(first, Event::Closed) {
        return (batch, true);
    }
    batch.push(first);
    while batch.len() < max_events.max(1) {
        match rx.try_recv() {
            Ok(Event::Closed) => return (batch, true),
            Ok(e) => batch.push(e),
            Err(_) => break,
        }
    }
    (batch, false)
}

fn to_python<'py>(py: Python<'py>, batch: Vec<Event>) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    for event in batch {
        match event {
            Event::Call {
                id,
                method,
                payload,
                metadata,
                peer,
                remaining,
                identities,
            } => {
                let details =
                    (metadata_to_python(py, metadata)?, peer, remaining).into_pyobject(py)?;
                let item = (
                    server::EVENT_CALL,
                    id,
                    method,
                    PyBytes::new(py, &payload),
                    PyTuple::new(py, identities.iter())?,
                    details,
                );
                list.append(item)?;
            }
            Event::Cancel(id) => {
                list.append((
                    server::EVENT_CANCEL,
                    id,
                    -1i64,
                    py.None(),
                    py.None(),
                    py.None(),
                ))?;
            }
            Event::Closed => {}
        }
    }
    Ok(list)
}

fn metadata_to_python<'py>(py: Python<'py>, metadata: Metadata) -> PyResult<Bound<'py, PyTuple>> {
    let items: Vec<Bound<'py, PyTuple>> = metadata
        .into_iter()
        .map(|(k, v)| {
            let value: Bound<'py, PyAny> = match v {
                Value::Text(t) => PyString::new(py, &t).into_any(),
                Value::Binary(b) => PyBytes::new(py, &b).into_any(),
            };
            PyTuple::new(py, [PyString::new(py, &k).into_any(), value])
        })
        .collect::<PyResult<_>>()?;
    PyTuple::new(py, items)
}

/// (code, message, reply bytes, trailing metadata) for Python.
fn outcome_to_python<'py>(
    py: Python<'py>,
    outcome: client::Outcome,
) -> PyResult<Bound<'py, PyTuple>> {
    let items: [Bound<'py, PyAny>; 4] = [
        outcome.code.into_pyobject(py)?.into_any(),
        PyString::new(py, &outcome.message).into_any(),
        PyBytes::new(py, &outcome.payload).into_any(),
        metadata_to_python(py, outcome.trailers)?.into_any(),
    ];
    PyTuple::new(py, items)
}

/// A Get's outcome with the reply's value as its payload (INTERNAL for a
/// reply that is no GetResponse, as grpc fails to deserialize one).
fn value_of_get(mut outcome: client::Outcome) -> client::Outcome {
    if outcome.code != grpc::OK {
        return outcome;
    }
    match client::get_response_value(&outcome.payload) {
        Some(value) => {
            outcome.payload = outcome.payload.slice_ref(value);
            outcome
        }
        None => client::Outcome::fail(grpc::INTERNAL, "malformed GetResponse"),
    }
}

/// A call's arguments as the client takes them.
fn call_args(
    payload: &[u8],
    metadata: Option<Vec<(String, Bound<'_, PyAny>)>>,
    timeout: Option<f64>,
) -> PyResult<(Bytes, Metadata, Option<Duration>)> {
    Ok((
        Bytes::copy_from_slice(payload),
        metadata_from(metadata)?,
        duration_of(timeout)?,
    ))
}

fn duration_of(timeout: Option<f64>) -> PyResult<Option<Duration>> {
    match timeout {
        None => Ok(None),
        Some(t) if t.is_finite() && t >= 0.0 => Ok(Some(Duration::from_secs_f64(t.min(1e8)))),
        Some(t) => Err(PyValueError::new_err(format!(
            "timeout must be a non-negative number of seconds, got {t}"
        ))),
    }
}

/// Finished calls of `Channel.start`, for one event loop: wait for
/// `fileno()` to be readable, then `take()` them all as
/// (token, (code, message, reply, trailers)).
#[pyclass(module = "appliance_engine")]
struct Completions {
    inner: Arc<client::Completions>,
}

#[pymethods]
impl Completions {
    #[new]
    fn new() -> PyResult<Self> {
        let inner = client::Completions::new().map_err(|e| PyOSError::new_err(e.to_string()))?;
        Ok(Completions {
            inner: Arc::new(inner),
        })
    }

    fn fileno(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.inner.reader.as_raw_fd()
    }

    fn take<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let batch = self.inner.take();
        let list = PyList::empty(py);
        for (token, outcome) in batch {
            list.append((token, outcome_to_python(py, outcome)?))?;
        }
        Ok(list)
    }
}

/// A client channel to one node: unary gRPC calls over one HTTP/2
/// connection (TLS with rustls when `tls_ca` is given). A `blocking`
/// channel makes calls with `call`, its connection driven by the threads
/// that wait on it; any other makes them with `start`, on the engine's
/// client thread.
#[pyclass(module = "appliance_engine")]
struct Channel {
    inner: Arc<client::Channel>,
    blocking: bool,
}

impl Channel {
    fn runtime(&self) -> &'static tokio::runtime::Runtime {
        if self.blocking {
            client::blocking_runtime()
        } else {
            client::runtime()
        }
    }
}

fn host_of(target: &str) -> &str {
    if let Some(rest) = target.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    target.rsplit_once(':').map(|(h, _)| h).unwrap_or(target)
}

#[pymethods]
impl Channel {
    #[new]
    #[pyo3(signature = (target, blocking=false, authority=None, max_message=4_259_840, tls_ca=None, tls_cert=None, tls_key=None, server_name=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        target: String,
        blocking: bool,
        authority: Option<String>,
        max_message: usize,
        tls_ca: Option<String>,
        tls_cert: Option<String>,
        tls_key: Option<String>,
        server_name: Option<String>,
    ) -> PyResult<Self> {
        let tls = match tls_ca {
            None if tls_cert.is_some() || tls_key.is_some() => {
                return Err(PyValueError::new_err(
                    "a client certificate needs tls_ca too",
                ))
            }
            None => None,
            Some(ca) => {
                let config = tls::client_config(&ca, tls_cert.as_deref(), tls_key.as_deref())
                    .map_err(PyValueError::new_err)?;
                let name = server_name.unwrap_or_else(|| host_of(&target).to_string());
                let server_name =
                    tokio_rustls::rustls::pki_types::ServerName::try_from(name.clone())
                        .map_err(|e| PyValueError::new_err(format!("server name {name:?}: {e}")))?;
                Some(client::Tls {
                    connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
                    server_name,
                })
            }
        };
        let authority = authority.unwrap_or_else(|| target.clone());
        if http::uri::Authority::try_from(authority.as_str()).is_err() {
            return Err(PyValueError::new_err(format!(
                "{authority:?} is not a host:port"
            )));
        }
        Ok(Channel {
            inner: Arc::new(client::Channel::new(target, authority, tls, max_message)),
            blocking,
        })
    }

    /// Starts a call; its outcome goes to `completions` under `token`.
    #[pyo3(signature = (completions, token, path, payload, metadata=None, timeout=None))]
    fn start(
        &self,
        completions: &Completions,
        token: u64,
        path: String,
        payload: &[u8],
        metadata: Option<Vec<(String, Bound<'_, PyAny>)>>,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        if self.blocking {
            return Err(PyRuntimeError::new_err(
                "a blocking channel makes calls with call()",
            ));
        }
        let (payload, metadata, timeout) = call_args(payload, metadata, timeout)?;
        let channel = self.inner.clone();
        let done = completions.inner.clone();
        client::runtime().spawn(async move {
            let outcome = channel.call(path, payload, metadata, timeout).await;
            done.push(token, outcome);
        });
        Ok(())
    }

    /// Starts a GroupCache/Get (as start() does); its outcome carries the
    /// reply's value, not the reply: Python builds no message objects.
    #[pyo3(signature = (completions, token, group, key, metadata=None, timeout=None))]
    #[allow(clippy::too_many_arguments)]
    fn start_get(
        &self,
        completions: &Completions,
        token: u64,
        group: &str,
        key: &str,
        metadata: Option<Vec<(String, Bound<'_, PyAny>)>>,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        if self.blocking {
            return Err(PyRuntimeError::new_err(
                "a blocking channel makes calls with get()",
            ));
        }
        let payload = client::get_request(group, key);
        let (metadata, timeout) = (metadata_from(metadata)?, duration_of(timeout)?);
        let channel = self.inner.clone();
        let done = completions.inner.clone();
        client::runtime().spawn(async move {
            let outcome = channel
                .call(client::GET_PATH.to_string(), payload, metadata, timeout)
                .await;
            done.push(token, value_of_get(outcome));
        });
        Ok(())
    }

    /// One call, blocking this thread (not the GIL) until it ends.
    #[pyo3(signature = (path, payload, metadata=None, timeout=None))]
    fn call<'py>(
        &self,
        py: Python<'py>,
        path: String,
        payload: &[u8],
        metadata: Option<Vec<(String, Bound<'_, PyAny>)>>,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        if !self.blocking {
            return Err(PyRuntimeError::new_err(
                "only a blocking channel makes calls with call()",
            ));
        }
        let (payload, metadata, timeout) = call_args(payload, metadata, timeout)?;
        let channel = self.inner.clone();
        let outcome = py.allow_threads(move || {
            client::blocking_runtime().block_on(channel.call(path, payload, metadata, timeout))
        });
        outcome_to_python(py, outcome)
    }

    /// A GroupCache/Get, blocking as call() does: the value (bytes) when
    /// it is answered, else the outcome as call() returns it. The request
    /// is encoded and the value taken here: the client's hot path builds
    /// no message objects in Python.
    #[pyo3(signature = (group, key, metadata=None, timeout=None))]
    fn get<'py>(
        &self,
        py: Python<'py>,
        group: &str,
        key: &str,
        metadata: Option<Vec<(String, Bound<'_, PyAny>)>>,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if !self.blocking {
            return Err(PyRuntimeError::new_err(
                "only a blocking channel makes calls with get()",
            ));
        }
        let payload = client::get_request(group, key);
        let (metadata, timeout) = (metadata_from(metadata)?, duration_of(timeout)?);
        let channel = self.inner.clone();
        let outcome = py.allow_threads(move || {
            client::blocking_runtime().block_on(channel.call(
                client::GET_PATH.to_string(),
                payload,
                metadata,
                timeout,
            ))
        });
        let outcome = value_of_get(outcome);
        if outcome.code == grpc::OK {
            return Ok(PyBytes::new(py, &outcome.payload).into_any());
        }
        Ok(outcome_to_python(py, outcome)?.into_any())
    }

    /// The connection's state, numbered as grpc.ChannelConnectivity's
    /// members are listed; `connect` starts connecting if there is none.
    #[pyo3(signature = (connect=false))]
    fn state(&self, connect: bool) -> u8 {
        if connect {
            self.inner.connect_soon(self.runtime());
        }
        self.inner.state()
    }

    fn close(&self) {
        self.inner.close();
    }
}

#[pymodule]
fn appliance_engine(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Commit arena memory as it is touched, not ahead: else the first
    // buffer of a refused 50 MiB request adds a whole arena chunk to the
    // worker's peak (4 MiB, the bound) instead of 0.3 MiB.
    // SAFETY: sets a plain option; no allocation depends on it yet.
    unsafe { mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0) };
    m.add_class::<Front>()?;
    m.add_class::<Channel>()?;
    m.add_class::<Completions>()?;
    m.add_class::<py_store::PyStore>()?;
    m.add_class::<py_store::PyHitGroup>()?;
    m.add_class::<py_ratelimit::PyTokenBuckets>()?;
    m.add("EVENT_CALL", server::EVENT_CALL)?;
    m.add("EVENT_CANCEL", server::EVENT_CANCEL)?;
    m.add("STREAM_SENT", server::STREAM_SENT)?;
    m.add("STREAM_FULL", server::STREAM_FULL)?;
    m.add("STREAM_CLOSED", server::STREAM_CLOSED)?;
    Ok(())
}
