//! The gRPC front: HTTP/2 on tokio/hyper; each call becomes an event for
//! Python, answered by call id. No spinning: Python waits on a parking
//! std channel with the GIL released.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine as _;
use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Either};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::{oneshot, Semaphore};

use crate::grpc;
use crate::grpc::{
    CANCELLED, DEADLINE_EXCEEDED, INTERNAL, RESOURCE_EXHAUSTED, UNAVAILABLE, UNIMPLEMENTED,
};

pub const EVENT_CALL: i32 = 0;
pub const EVENT_CANCEL: i32 = 1;
pub const STREAM_SENT: i32 = 0;
pub const STREAM_FULL: i32 = 1;
pub const STREAM_CLOSED: i32 = 2;

const STREAM_BUFFER: usize = 16;

/// Metadata values: text, or bytes for `-bin` keys.
#[derive(Debug, Clone)]
pub enum Value {
    Text(String),
    Binary(Vec<u8>),
}

pub type Metadata = Vec<(String, Value)>;

pub enum Event {
    Call {
        id: u64,
        method: usize,
        payload: Bytes,
        metadata: Metadata,
        peer: String,
        remaining: Option<f64>,
        identities: Arc<[String]>,
    },
    Cancel(u64),
    Closed,
}

pub enum Reply {
    Ok(Bytes, Metadata),
    Fail(u32, String, Metadata),
}

enum Call {
    Unary(oneshot::Sender<Reply>),
    Stream(tokio::sync::mpsc::Sender<Frame<Bytes>>),
}

/// The receiving end of a registered Call.
enum Pending {
    Unary(oneshot::Receiver<Reply>),
    Stream(tokio::sync::mpsc::Receiver<Frame<Bytes>>),
}

pub struct Limits {
    pub max_message: usize,
    pub max_concurrent_streams: u32,
    pub max_header_list_size: u32,
    pub max_connections: usize,
}

pub struct Shared {
    methods: HashMap<String, (usize, bool)>,
    calls: Mutex<HashMap<u64, Call>>,
    next_id: AtomicU64,
    events: Mutex<Option<mpsc::Sender<Event>>>,
    fallback: Mutex<Option<String>>,
    proxy: tokio::sync::Mutex<Option<hyper::client::conn::http2::SendRequest<Incoming>>>,
    closed: AtomicBool,
    pub limits: Limits,
    /// GroupCache/Get's method index and the hits answered without Python.
    hits: Option<(usize, crate::hits::Hits)>,
    /// Refusals at the socket, for the worker's metrics: requests over the
    /// message limit, connections over the connection limit.
    pub refused_messages: AtomicU64,
    pub refused_connections: AtomicU64,
}

impl Shared {
    pub fn new(
        methods: Vec<(String, bool)>,
        limits: Limits,
        hits: Option<(usize, crate::hits::Hits)>,
    ) -> (Arc<Shared>, mpsc::Receiver<Event>) {
        let (tx, rx) = mpsc::channel();
        let methods = methods
            .into_iter()
            .enumerate()
            .map(|(i, (path, streaming))| (path, (i, streaming)))
            .collect();
        let shared = Shared {
            methods,
            calls: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            events: Mutex::new(Some(tx)),
            fallback: Mutex::new(None),
            proxy: tokio::sync::Mutex::new(None),
            closed: AtomicBool::new(false),
            limits,
            hits,
            refused_messages: AtomicU64::new(0),
            refused_connections: AtomicU64::new(0),
        };
        (Arc::new(shared), rx)
    }

    fn emit(&self, event: Event) -> bool {
        match self.events.lock().unwrap().as_ref() {
            Some(tx) => tx.send(event).is_ok(),
            None => false,
        }
    }

    pub fn hits(&self) -> Option<&crate::hits::Hits> {
        self.hits.as_ref().map(|(_, h)| h)
    }

    pub fn set_fallback(&self, path: String) {
        *self.fallback.lock().unwrap() = Some(path);
    }

    /// Ends the event stream: the receiver sees `Closed`, then nothing.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        if let Some(hits) = self.hits() {
            hits.open.store(false, Ordering::Release);
        }
        if let Some(tx) = self.events.lock().unwrap().take() {
            let _ = tx.send(Event::Closed);
        }
        // Calls still open end now.
        let calls: Vec<Call> = self.calls.lock().unwrap().drain().map(|(_, c)| c).collect();
        for call in calls {
            match call {
                Call::Unary(tx) => {
                    let _ = tx.send(Reply::Fail(
                        UNAVAILABLE,
                        "server is stopping".into(),
                        vec![],
                    ));
                }
                Call::Stream(tx) => {
                    let _ = tx.try_send(Frame::trailers(status_trailers(0, "", &[])));
                }
            }
        }
    }

    pub fn reply(&self, id: u64, reply: Reply) -> bool {
        let call = self.calls.lock().unwrap().remove(&id);
        match call {
            Some(Call::Unary(tx)) => tx.send(reply).is_ok(),
            Some(Call::Stream(tx)) => {
                let trailers = match reply {
                    Reply::Ok(data, trailers) => {
                        let _ = tx.try_send(Frame::data(Bytes::from(grpc::frame(&data))));
                        status_trailers(0, "", &trailers)
                    }
                    Reply::Fail(code, message, trailers) => {
                        status_trailers(code, &message, &trailers)
                    }
                };
                tx.try_send(Frame::trailers(trailers)).is_ok()
            }
            None => false,
        }
    }

    fn stream_sender(&self, id: u64) -> Option<tokio::sync::mpsc::Sender<Frame<Bytes>>> {
        match self.calls.lock().unwrap().get(&id) {
            Some(Call::Stream(tx)) => Some(tx.clone()),
            _ => None,
        }
    }

    pub fn stream_try_send(&self, id: u64, data: &[u8]) -> i32 {
        let Some(tx) = self.stream_sender(id) else {
            return STREAM_CLOSED;
        };
        match tx.try_send(Frame::data(Bytes::from(grpc::frame(data)))) {
            Ok(()) => STREAM_SENT,
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => STREAM_FULL,
            Err(_) => STREAM_CLOSED,
        }
    }

    /// Blocks (the caller released the GIL) until there is room.
    pub fn stream_send(&self, id: u64, data: Vec<u8>) -> bool {
        let Some(tx) = self.stream_sender(id) else {
            return false;
        };
        tx.blocking_send(Frame::data(Bytes::from(grpc::frame(&data))))
            .is_ok()
    }

    pub fn stream_end(&self, id: u64, trailers: Metadata) {
        if let Some(Call::Stream(tx)) = self.calls.lock().unwrap().remove(&id) {
            let _ = tx.try_send(Frame::trailers(status_trailers(0, "", &trailers)));
        }
    }
}

/// Sends a cancel event if the call is dropped (client reset) unanswered.
struct Guard {
    id: u64,
    shared: Arc<Shared>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let open = self.shared.calls.lock().unwrap().remove(&self.id).is_some();
        if open && !self.shared.closed.load(Ordering::SeqCst) {
            self.shared.emit(Event::Cancel(self.id));
        }
    }
}

/// A response body fed by a channel (server streams) or ready frames.
pub struct ChannelBody {
    ready: std::collections::VecDeque<Frame<Bytes>>,
    rx: Option<tokio::sync::mpsc::Receiver<Frame<Bytes>>>,
    _guard: Option<Guard>,
    done: bool,
}

impl ChannelBody {
    fn ready(frames: Vec<Frame<Bytes>>) -> Self {
        ChannelBody {
            ready: frames.into(),
            rx: None,
            _guard: None,
            done: false,
        }
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Some(frame) = self.ready.pop_front() {
            if frame.is_trailers() {
                self.done = true;
            }
            return Poll::Ready(Some(Ok(frame)));
        }
        let Some(rx) = self.rx.as_mut() else {
            self.done = true;
            return Poll::Ready(None);
        };
        match rx.poll_recv(cx) {
            Poll::Ready(Some(frame)) => {
                if frame.is_trailers() {
                    self.done = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || (self.rx.is_none() && self.ready.is_empty())
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

type Out = Either<ChannelBody, Incoming>;

pub(crate) fn put_metadata(headers: &mut HeaderMap, metadata: &[(String, Value)]) {
    for (key, value) in metadata {
        let Ok(name) = HeaderName::from_bytes(key.as_bytes()) else {
            continue;
        };
        let value = match value {
            Value::Binary(b) => HeaderValue::from_str(&STANDARD_NO_PAD.encode(b)),
            Value::Text(t) if key.ends_with("-bin") => {
                HeaderValue::from_str(&STANDARD_NO_PAD.encode(t.as_bytes()))
            }
            Value::Text(t) => HeaderValue::from_str(t),
        };
        if let Ok(value) = value {
            headers.append(name, value);
        }
    }
}

fn status_trailers(code: u32, message: &str, metadata: &[(String, Value)]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let status = match code {
        0 => HeaderValue::from_static("0"),
        _ => HeaderValue::from(code),
    };
    headers.insert("grpc-status", status);
    if !message.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&grpc::encode_message(message)) {
            headers.insert("grpc-message", v);
        }
    }
    put_metadata(&mut headers, metadata);
    headers
}

fn grpc_headers() -> http::response::Builder {
    Response::builder().status(StatusCode::OK).header(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    )
}

/// A trailers-only response: the status in the one HEADERS frame.
fn failure(code: u32, message: &str, metadata: &[(String, Value)]) -> Response<Out> {
    let mut response = grpc_headers()
        .body(Either::Left(ChannelBody::ready(vec![])))
        .unwrap();
    let trailers = status_trailers(code, message, metadata);
    response.headers_mut().extend(trailers);
    response
}

/// Values up to this size are copied behind their length prefix (one DATA
/// frame); larger ones go out as they are, after a 5-byte frame.
const COPY_BELOW: usize = 16 * 1024;

fn success(data: Bytes, metadata: &[(String, Value)]) -> Response<Out> {
    let mut frames = Vec::with_capacity(3);
    if data.len() < COPY_BELOW {
        frames.push(Frame::data(Bytes::from(grpc::frame(&data))));
    } else {
        let mut prefix = [0u8; 5];
        prefix[1..].copy_from_slice(&(data.len() as u32).to_be_bytes());
        frames.push(Frame::data(Bytes::copy_from_slice(&prefix)));
        frames.push(Frame::data(data));
    }
    frames.push(Frame::trailers(status_trailers(0, "", metadata)));
    grpc_headers()
        .body(Either::Left(ChannelBody::ready(frames)))
        .unwrap()
}

fn request_metadata(headers: &HeaderMap) -> Metadata {
    metadata_without(headers, |key| {
        matches!(
            key,
            "content-type" | "te" | "grpc-timeout" | "grpc-encoding" | "grpc-accept-encoding"
        )
    })
}

/// A reply's trailers as grpcio gives them: without the status and message.
pub(crate) fn metadata_of(headers: &HeaderMap) -> Metadata {
    metadata_without(headers, |key| {
        matches!(
            key,
            "content-type"
                | "grpc-status"
                | "grpc-message"
                | "grpc-encoding"
                | "grpc-accept-encoding"
        )
    })
}

fn metadata_without(headers: &HeaderMap, skip: impl Fn(&str) -> bool) -> Metadata {
    let mut out = Vec::with_capacity(headers.len());
    for (name, value) in headers {
        let key = name.as_str();
        if skip(key) {
            continue;
        }
        if key.ends_with("-bin") {
            let raw = value.as_bytes();
            let trimmed: Vec<u8> = raw.iter().copied().filter(|b| *b != b'=').collect();
            if let Ok(bytes) = STANDARD_NO_PAD.decode(trimmed) {
                out.push((key.to_string(), Value::Binary(bytes)));
            }
        } else if let Ok(text) = value.to_str() {
            out.push((key.to_string(), Value::Text(text.to_string())));
        }
    }
    out
}

enum ReadError {
    TooLarge(usize),
    Compressed,
    Missing,
    Broken,
}

/// One request message; refused at its length prefix if over `max`.
async fn read_message(body: &mut Incoming, max: usize) -> Result<Bytes, ReadError> {
    let mut buf = BytesMut::new();
    let mut want: Option<usize> = None;
    loop {
        if want.is_none() && buf.len() >= 5 {
            let prefix: [u8; 5] = buf[..5].try_into().unwrap();
            let (compressed, len) = grpc::parse_prefix(&prefix);
            if compressed {
                return Err(ReadError::Compressed);
            }
            if len > max {
                return Err(ReadError::TooLarge(len));
            }
            buf.advance(5);
            buf.reserve(len.saturating_sub(buf.len()));
            want = Some(len);
        }
        if let Some(len) = want {
            if buf.len() >= len {
                buf.truncate(len);
                return Ok(buf.freeze());
            }
        }
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                }
            }
            Some(Err(_)) => return Err(ReadError::Broken),
            None => return Err(ReadError::Missing),
        }
    }
}

async fn proxy(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Out> {
    let Some(path) = shared.fallback.lock().unwrap().clone() else {
        return failure(UNIMPLEMENTED, "Method not found", &[]);
    };
    let mut guard = shared.proxy.lock().await;
    let usable = matches!(guard.as_ref(), Some(s) if !s.is_closed());
    if !usable {
        let stream = match tokio::net::UnixStream::connect(&path).await {
            Ok(s) => s,
            Err(e) => return failure(UNAVAILABLE, &format!("fallback unreachable: {e}"), &[]),
        };
        match hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
        {
            Ok((send, conn)) => {
                tokio::spawn(conn);
                *guard = Some(send);
            }
            Err(e) => return failure(UNAVAILABLE, &format!("fallback unreachable: {e}"), &[]),
        }
    }
    let mut send = guard.as_ref().unwrap().clone();
    drop(guard);
    let (mut parts, body) = req.into_parts();
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    parts.uri = match format!("http://localhost{pq}").parse() {
        Ok(uri) => uri,
        Err(_) => return failure(INTERNAL, "bad path", &[]),
    };
    if send.ready().await.is_err() {
        return failure(UNAVAILABLE, "fallback closed", &[]);
    }
    match send.send_request(Request::from_parts(parts, body)).await {
        Ok(resp) => resp.map(Either::Right),
        Err(e) => failure(UNAVAILABLE, &format!("fallback failed: {e}"), &[]),
    }
}

async fn serve_call(
    shared: Arc<Shared>,
    peer: Arc<str>,
    identities: Arc<[String]>,
    req: Request<Incoming>,
) -> Result<Response<Out>, Infallible> {
    if shared.closed.load(Ordering::SeqCst) {
        return Ok(failure(UNAVAILABLE, "server is stopping", &[]));
    }
    let Some(&(method, streaming)) = shared.methods.get(req.uri().path()) else {
        return Ok(Box::pin(proxy(&shared, req)).await);
    };
    let mut remaining = req
        .headers()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(grpc::parse_timeout);
    let max = shared.limits.max_message;
    let (parts, mut body) = req.into_parts();
    let payload = match read_message(&mut body, max).await {
        Ok(p) => p,
        Err(ReadError::TooLarge(len)) => {
            shared.refused_messages.fetch_add(1, Ordering::Relaxed);
            let msg = format!("Received message larger than max ({len} vs. {max})");
            return Ok(failure(RESOURCE_EXHAUSTED, &msg, &[]));
        }
        Err(ReadError::Compressed) => {
            return Ok(failure(
                UNIMPLEMENTED,
                "compressed requests are not supported",
                &[],
            ))
        }
        Err(ReadError::Missing) => return Ok(failure(INTERNAL, "Missing request message", &[])),
        Err(ReadError::Broken) => return Ok(failure(CANCELLED, "request body broken", &[])),
    };
    drop(body);
    if let Some((get, hits)) = &shared.hits {
        let call = crate::hits::CallFacts::of(&parts.headers, &identities, &peer);
        if method == *get {
            if let Some((data, trailers)) = hits.answer(&payload, &call) {
                return Ok(success(data, &trailers));
            }
            if let Some(plan) = hits.forward_plan(&payload, &call) {
                let started = std::time::Instant::now();
                // Boxed, as the call to Python below: the hit path's task stays small.
                match Box::pin(hits.forward(plan, payload.clone(), remaining)).await {
                    Some(Ok(data)) => return Ok(success(data, &[])),
                    Some(Err(refused)) => {
                        return Ok(failure(refused.code, &refused.message, &refused.details))
                    }
                    // Python gets what is left of the caller's time.
                    None => {
                        remaining =
                            remaining.map(|r| (r - started.elapsed().as_secs_f64()).max(0.0))
                    }
                }
            }
        } else if hits.get_many.as_ref().is_some_and(|m| m.method == method) {
            if let Some((data, trailers)) = hits.answer_many(&payload, &call) {
                return Ok(success(data, &trailers));
            }
        }
    }
    let metadata = request_metadata(&parts.headers);
    let call = ToPython {
        method,
        streaming,
        payload,
        metadata,
        peer,
        remaining,
        identities,
    };
    // Boxed: the hit path above keeps each stream's task small.
    Ok(Box::pin(call.send(shared)).await)
}

/// A call Python answers: its event, and the wait for the answer.
struct ToPython {
    method: usize,
    streaming: bool,
    payload: Bytes,
    metadata: Metadata,
    peer: Arc<str>,
    remaining: Option<f64>,
    identities: Arc<[String]>,
}

impl ToPython {
    async fn send(self, shared: Arc<Shared>) -> Response<Out> {
        let remaining = self.remaining;
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        // Registered before the event goes out: Python may answer at once.
        let (call, pending) = if self.streaming {
            let (tx, rx) = tokio::sync::mpsc::channel(STREAM_BUFFER);
            (Call::Stream(tx), Pending::Stream(rx))
        } else {
            let (tx, rx) = oneshot::channel();
            (Call::Unary(tx), Pending::Unary(rx))
        };
        shared.calls.lock().unwrap().insert(id, call);
        let guard = Guard {
            id,
            shared: shared.clone(),
        };
        let event = Event::Call {
            id,
            method: self.method,
            payload: self.payload,
            metadata: self.metadata,
            peer: self.peer.to_string(),
            remaining,
            identities: self.identities,
        };
        if !shared.emit(event) {
            return failure(UNAVAILABLE, "server is stopping", &[]);
        }
        let rx = match pending {
            Pending::Stream(rx) => {
                let body = ChannelBody {
                    ready: Default::default(),
                    rx: Some(rx),
                    _guard: Some(guard),
                    done: false,
                };
                return grpc_headers().body(Either::Left(body)).unwrap();
            }
            Pending::Unary(rx) => rx,
        };
        let _guard = guard;
        let reply = match remaining {
            Some(secs) => {
                match tokio::time::timeout(Duration::from_secs_f64(secs.min(1e9)), rx).await {
                    Ok(r) => r,
                    Err(_) => return failure(DEADLINE_EXCEEDED, "Deadline Exceeded", &[]),
                }
            }
            None => rx.await,
        };
        match reply {
            Ok(Reply::Ok(data, trailers)) => success(data, &trailers),
            Ok(Reply::Fail(code, message, trailers)) => failure(code, &message, &trailers),
            Err(_) => failure(UNAVAILABLE, "server is stopping", &[]),
        }
    }
}

/// Serves one connection (plain or TLS) until it ends or `stop` fires.
async fn serve_connection<S>(
    shared: Arc<Shared>,
    io: S,
    peer: Arc<str>,
    identities: Arc<[String]>,
    stop: Arc<tokio::sync::Notify>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let limits = &shared.limits;
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_list_size)
        // gRPC has no use for a `date` header: one fewer to encode per reply.
        .auto_date_header(false);
    let service_shared = shared.clone();
    let service = hyper::service::service_fn(move |req| {
        serve_call(
            service_shared.clone(),
            peer.clone(),
            identities.clone(),
            req,
        )
    });
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stop.notified() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
        }
    }
}

/// Accepts until `stop` fires; each connection holds a permit.
pub async fn accept_loop(
    shared: Arc<Shared>,
    listener: std::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: Arc<tokio::sync::Notify>,
) {
    listener.set_nonblocking(true).ok();
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    let permits = Arc::new(Semaphore::new(shared.limits.max_connections));
    loop {
        let accepted = tokio::select! {
            _ = stop.notified() => return,
            a = listener.accept() => a,
        };
        let Ok((stream, addr)) = accepted else {
            continue;
        };
        // Over the connection limit: refuse at once rather than queue.
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            shared.refused_connections.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let peer: Arc<str> = grpc::peer_string(&addr).into();
        let stop = stop.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_connection(shared, stream, peer, Arc::from(Vec::new()), stop).await,
                Some(acceptor) => {
                    // A handshake that stalls must not hold a permit forever.
                    let handshake =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                            .await;
                    if let Ok(Ok(stream)) = handshake {
                        let names = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .map(|c| crate::tls::identities(c))
                            .unwrap_or_default();
                        serve_connection(shared, stream, peer, Arc::from(names), stop).await
                    }
                }
            }
            drop(permit);
        });
    }
}
