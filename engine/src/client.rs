//! The gRPC client (issue 20): unary calls over one HTTP/2 connection per
//! peer, for forwards and applications. Calls run on one client runtime per
//! process; Python either blocks on a call with the GIL released, or starts
//! it and is told through `Completions`, whose socket wakes its event loop
//! once per batch. No engine thread ever takes the GIL.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use h2::client::SendRequest;
use h2::RecvStream;
use http::{HeaderMap, Request};
use percent_encoding::percent_decode_str;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use crate::grpc;
use crate::grpc::{
    CANCELLED, DEADLINE_EXCEEDED, INTERNAL, OK, PERMISSION_DENIED, RESOURCE_EXHAUSTED,
    UNAUTHENTICATED, UNAVAILABLE, UNIMPLEMENTED, UNKNOWN,
};
use crate::server::{metadata_of, put_metadata, Metadata};

/// Connection states, numbered as grpc.ChannelConnectivity's order.
pub const IDLE: u8 = 0;
pub const CONNECTING: u8 = 1;
pub const READY: u8 = 2;
pub const TRANSIENT_FAILURE: u8 = 3;
pub const SHUTDOWN: u8 = 4;

/// A connection attempt with no call deadline to bound it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// How a call ended: status, message, the reply (empty unless OK) and the
/// trailing metadata.
#[derive(Debug)]
pub struct Outcome {
    pub code: u32,
    pub message: String,
    pub payload: Bytes,
    pub trailers: Metadata,
}

impl Outcome {
    pub(crate) fn fail(code: u32, message: impl Into<String>) -> Self {
        Outcome {
            code,
            message: message.into(),
            payload: Bytes::new(),
            trailers: Vec::new(),
        }
    }
}

/// The runtime of blocking calls: no thread of its own. The thread that
/// blocks on a call drives it, its connection included, so a call costs
/// no wakeup of another thread (what a sequential caller pays most for);
/// threads that block at once take turns driving.
pub fn blocking_runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("the engine's blocking client runtime starts")
    })
}

/// The runtime of started calls: one I/O thread serves every such channel
/// of the process.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("engine-client")
            .enable_all()
            .build()
            .expect("the engine's client runtime starts")
    })
}

pub struct Tls {
    pub connector: TlsConnector,
    pub server_name: ServerName<'static>,
}

struct Live {
    send: SendRequest<Bytes>,
    task: tokio::task::JoinHandle<()>,
    id: u64,
}

/// One peer: an address to dial, the `:authority` to send, and the one
/// HTTP/2 connection (made on first use, made again after it breaks).
pub struct Channel {
    addr: String,
    uri_prefix: String,
    tls: Option<Tls>,
    max_message: usize,
    live: Mutex<Option<Live>>,
    connecting: tokio::sync::Mutex<()>,
    failed: AtomicBool,
    closed: AtomicBool,
    dialled: AtomicU64,
}

impl Channel {
    pub fn new(addr: String, authority: String, tls: Option<Tls>, max_message: usize) -> Self {
        let scheme = if tls.is_some() { "https" } else { "http" };
        Channel {
            addr,
            uri_prefix: format!("{scheme}://{authority}"),
            tls,
            max_message,
            live: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            failed: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            dialled: AtomicU64::new(1),
        }
    }

    fn usable(&self) -> Option<(SendRequest<Bytes>, u64)> {
        match self.live.lock().unwrap().as_ref() {
            Some(live) if !live.task.is_finished() => Some((live.send.clone(), live.id)),
            _ => None,
        }
    }

    /// Drops connection `id` after it refused a call (unless another has
    /// replaced it already), so the next call dials again.
    fn forget(&self, id: u64) {
        let mut live = self.live.lock().unwrap();
        if live.as_ref().is_some_and(|l| l.id == id) {
            if let Some(old) = live.take() {
                old.task.abort();
            }
        }
    }

    pub fn state(&self) -> u8 {
        if self.closed.load(Ordering::Relaxed) {
            return SHUTDOWN;
        }
        if self.usable().is_some() {
            return READY;
        }
        if self.connecting.try_lock().is_err() {
            return CONNECTING;
        }
        if self.failed.load(Ordering::Relaxed) {
            TRANSIENT_FAILURE
        } else {
            IDLE
        }
    }

    /// The connection, made now if there is none (one attempt at a time).
    async fn sender(&self) -> Result<(SendRequest<Bytes>, u64), Outcome> {
        if let Some(found) = self.usable() {
            return Ok(found);
        }
        let _turn = self.connecting.lock().await;
        if let Some(found) = self.usable() {
            return Ok(found);
        }
        if self.closed.load(Ordering::Relaxed) {
            return Err(Outcome::fail(UNAVAILABLE, "channel closed"));
        }
        match self.connect().await {
            Ok(mut live) => {
                live.id = self.dialled.fetch_add(1, Ordering::Relaxed);
                let found = (live.send.clone(), live.id);
                if let Some(old) = self.live.lock().unwrap().replace(live) {
                    old.task.abort();
                }
                self.failed.store(false, Ordering::Relaxed);
                Ok(found)
            }
            Err(message) => {
                self.failed.store(true, Ordering::Relaxed);
                Err(Outcome::fail(
                    UNAVAILABLE,
                    format!("{}: {message}", self.addr),
                ))
            }
        }
    }

    async fn connect(&self) -> Result<Live, String> {
        let tcp = tokio::net::TcpStream::connect(&self.addr)
            .await
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let mut builder = h2::client::Builder::new();
        builder
            .initial_window_size(4 << 20)
            .initial_connection_window_size(8 << 20)
            .max_header_list_size(16 << 10)
            .enable_push(false);
        match &self.tls {
            None => handshake(&builder, tcp).await,
            Some(tls) => {
                let stream = tls
                    .connector
                    .connect(tls.server_name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                handshake(&builder, stream).await
            }
        }
    }

    /// Starts connecting in the background (grpc's try_to_connect).
    pub fn connect_soon(self: &Arc<Self>, runtime: &tokio::runtime::Runtime) {
        if self.usable().is_none() && !self.closed.load(Ordering::Relaxed) {
            let me = self.clone();
            runtime.spawn(async move {
                let _ = tokio::time::timeout(CONNECT_TIMEOUT, me.sender()).await;
            });
        }
    }

    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        if let Some(live) = self.live.lock().unwrap().take() {
            live.task.abort();
        }
    }

    /// One unary call; `timeout` bounds all of it, connecting included.
    pub async fn call(
        self: Arc<Self>,
        path: String,
        payload: Bytes,
        metadata: Metadata,
        timeout: Option<Duration>,
    ) -> Outcome {
        let run = self.clone().call_inner(path, payload, metadata, timeout);
        match timeout {
            Some(t) => match tokio::time::timeout(t, run).await {
                Ok(outcome) => outcome,
                Err(_) => Outcome::fail(DEADLINE_EXCEEDED, "Deadline Exceeded"),
            },
            None => run.await,
        }
    }

    async fn call_inner(
        self: Arc<Self>,
        path: String,
        payload: Bytes,
        metadata: Metadata,
        timeout: Option<Duration>,
    ) -> Outcome {
        let connecting = async {
            let (send, id) = self.sender().await?;
            match send.ready().await {
                Ok(ready) => Ok::<_, Outcome>((ready, id)),
                Err(e) => {
                    self.forget(id);
                    Err(Outcome::fail(UNAVAILABLE, format!("{}: {e}", self.addr)))
                }
            }
        };
        let (mut send, id) = match timeout {
            Some(_) => match connecting.await {
                Ok(s) => s,
                Err(o) => return o,
            },
            None => match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
                Ok(Ok(s)) => s,
                Ok(Err(o)) => return o,
                Err(_) => {
                    return Outcome::fail(UNAVAILABLE, format!("{}: connect timed out", self.addr))
                }
            },
        };
        let mut builder = Request::builder()
            .method("POST")
            .uri(format!("{}{path}", self.uri_prefix))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if let Some(t) = timeout {
            builder = builder.header("grpc-timeout", grpc::encode_timeout(t));
        }
        let Ok(mut request) = builder.body(()) else {
            return Outcome::fail(INTERNAL, format!("bad method path {path:?}"));
        };
        put_metadata(request.headers_mut(), &metadata);
        // HEADERS and DATA are both queued before the connection writes:
        // one write per call.
        let (response, mut body) = match send.send_request(request, false) {
            Ok(r) => r,
            Err(e) => {
                self.forget(id);
                return Outcome::fail(UNAVAILABLE, format!("{}: {e}", self.addr));
            }
        };
        if let Err(e) = body.send_data(Bytes::from(grpc::frame(&payload)), true) {
            return Outcome::fail(UNAVAILABLE, format!("{}: {e}", self.addr));
        }
        let response = match response.await {
            Ok(r) => r,
            Err(e) => return Outcome::fail(code_of_reset(&e), format!("{}: {e}", self.addr)),
        };
        let (parts, body) = response.into_parts();
        if parts.status != http::StatusCode::OK {
            return Outcome::fail(
                code_of_http(parts.status.as_u16()),
                format!("HTTP status {}", parts.status),
            );
        }
        if parts.headers.contains_key("grpc-status") {
            // Trailers-only: the status came in the one HEADERS frame.
            return outcome_of(&parts.headers, Bytes::new());
        }
        read_reply(body, self.max_message).await
    }
}

/// The h2 handshake on a connected stream; the connection runs as a task.
async fn handshake<T>(builder: &h2::client::Builder, io: T) -> Result<Live, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = builder.handshake(io).await.map_err(|e| e.to_string())?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(Live { send, task, id: 0 })
}

/// grpc's mapping of a stream reset (RST_STREAM's error code).
fn code_of_reset(e: &h2::Error) -> u32 {
    match e.reason() {
        Some(h2::Reason::REFUSED_STREAM) => UNAVAILABLE,
        Some(h2::Reason::CANCEL) => CANCELLED,
        Some(h2::Reason::ENHANCE_YOUR_CALM) => RESOURCE_EXHAUSTED,
        Some(h2::Reason::INADEQUATE_SECURITY) => PERMISSION_DENIED,
        Some(_) => INTERNAL,
        None => UNAVAILABLE, // the connection broke
    }
}

/// grpc's mapping of HTTP statuses that are not 200 (a proxy's, mostly).
fn code_of_http(status: u16) -> u32 {
    match status {
        400 => INTERNAL,
        401 => UNAUTHENTICATED,
        403 => PERMISSION_DENIED,
        404 => UNIMPLEMENTED,
        429 | 502..=504 => UNAVAILABLE,
        _ => UNKNOWN,
    }
}

fn outcome_of(trailers: &HeaderMap, payload: Bytes) -> Outcome {
    let code = trailers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok());
    let Some(code) = code else {
        return Outcome::fail(INTERNAL, "the reply ended without a grpc-status");
    };
    let message = trailers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(|v| percent_decode_str(v).decode_utf8_lossy().into_owned())
        .unwrap_or_default();
    Outcome {
        code,
        message,
        payload: if code == OK { payload } else { Bytes::new() },
        trailers: metadata_of(trailers),
    }
}

/// The reply's one message (refused at its length prefix if over `max`),
/// then its trailers.
async fn read_reply(mut body: RecvStream, max: usize) -> Outcome {
    let mut buf = BytesMut::new();
    let mut want: Option<usize> = None;
    let mut message: Option<Bytes> = None;
    while let Some(data) = body.data().await {
        let data = match data {
            Ok(d) => d,
            Err(e) => return Outcome::fail(code_of_reset(&e), format!("the reply broke: {e}")),
        };
        let _ = body.flow_control().release_capacity(data.len());
        if message.is_some() {
            return Outcome::fail(UNIMPLEMENTED, "a unary reply with more than one message");
        }
        buf.extend_from_slice(&data);
        if want.is_none() && buf.len() >= 5 {
            let prefix: [u8; 5] = buf[..5].try_into().unwrap();
            let (compressed, len) = grpc::parse_prefix(&prefix);
            if compressed {
                return Outcome::fail(INTERNAL, "a compressed reply (none was asked for)");
            }
            if len > max {
                return Outcome::fail(
                    RESOURCE_EXHAUSTED,
                    format!("Received message larger than max ({len} vs. {max})"),
                );
            }
            buf.advance(5);
            buf.reserve(len.saturating_sub(buf.len()));
            want = Some(len);
        }
        if let Some(len) = want {
            if buf.len() >= len {
                if buf.len() > len {
                    return Outcome::fail(
                        UNIMPLEMENTED,
                        "a unary reply with more than one message",
                    );
                }
                message = Some(std::mem::take(&mut buf).freeze());
            }
        }
    }
    let trailers = match body.trailers().await {
        Ok(Some(t)) => t,
        Ok(None) => return Outcome::fail(INTERNAL, "the reply ended without trailers"),
        Err(e) => return Outcome::fail(code_of_reset(&e), format!("the reply broke: {e}")),
    };
    if want.is_some() && message.is_none() {
        return Outcome::fail(INTERNAL, "the reply ended inside a message");
    }
    let outcome = outcome_of(&trailers, message.unwrap_or_default());
    if outcome.code == OK && want.is_none() {
        return Outcome::fail(UNIMPLEMENTED, "an OK reply with no message");
    }
    outcome
}

/// Finished calls for an event loop: Python reads the socket `fileno`
/// (one byte per batch, written only when the batch starts) and `take`s.
pub struct Completions {
    queue: Mutex<(Vec<(u64, Outcome)>, bool)>,
    writer: UnixStream,
    pub reader: UnixStream,
}

impl Completions {
    pub fn new() -> std::io::Result<Self> {
        let (reader, writer) = UnixStream::pair()?;
        reader.set_nonblocking(true)?;
        writer.set_nonblocking(true)?;
        Ok(Completions {
            queue: Mutex::new((Vec::new(), false)),
            writer,
            reader,
        })
    }

    pub fn push(&self, token: u64, outcome: Outcome) {
        let mut queue = self.queue.lock().unwrap();
        queue.0.push((token, outcome));
        if !queue.1 {
            queue.1 = true;
            // A full socket already holds a wakeup: nothing is lost.
            let _ = (&self.writer).write(&[1]);
        }
    }

    /// Everything finished so far; the next push wakes the loop again.
    pub fn take(&self) -> Vec<(u64, Outcome)> {
        use std::io::Read;
        let mut sink = [0u8; 64];
        while matches!((&self.reader).read(&mut sink), Ok(n) if n > 0) {}
        let mut queue = self.queue.lock().unwrap();
        queue.1 = false;
        std::mem::take(&mut queue.0)
    }
}

/// GroupCache/Get, the call `Channel.get` makes for Python's clients.
pub const GET_PATH: &str = "/groupcachepb.GroupCache/Get";

/// A GetRequest (`string group = 1; string key = 2;`), as protobuf
/// serializes it (an empty field is left out).
pub fn get_request(group: &str, key: &str) -> Bytes {
    let mut out = Vec::with_capacity(group.len() + key.len() + 12);
    for (tag, field) in [(0x0a, group), (0x12, key)] {
        if !field.is_empty() {
            out.push(tag);
            crate::hits::put_varint(&mut out, field.len() as u64);
            out.extend_from_slice(field.as_bytes());
        }
    }
    Bytes::from(out)
}

/// A GetResponse's value (`bytes value = 1;`: the last copy wins, other
/// fields are skipped, none is empty); None where protobuf's parser
/// would refuse the message.
pub fn get_response_value(buf: &[u8]) -> Option<&[u8]> {
    let (mut value, mut at): (&[u8], usize) = (b"", 0);
    while at < buf.len() {
        let tag = crate::hits::varint(buf, &mut at)?;
        let (field, wire) = (tag >> 3, tag & 7);
        if field == 0 || (field == 1 && wire != 2) {
            return None;
        }
        match wire {
            0 => {
                crate::hits::varint(buf, &mut at)?;
            }
            1 | 5 => {
                at = at
                    .checked_add(if wire == 1 { 8 } else { 4 })
                    .filter(|&e| e <= buf.len())?;
            }
            2 => {
                let len = usize::try_from(crate::hits::varint(buf, &mut at)?).ok()?;
                let end = at.checked_add(len).filter(|&e| e <= buf.len())?;
                if field == 1 {
                    value = &buf[at..end];
                }
                at = end;
            }
            _ => return None,
        }
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_messages_are_protobuf_s() {
        // groupcache_pb2.GetRequest(group="g", key="k1").SerializeToString()
        assert_eq!(&get_request("g", "k1")[..], b"\x0a\x01g\x12\x02k1");
        assert_eq!(&get_request("", "k")[..], b"\x12\x01k");
        assert_eq!(get_response_value(b"\x0a\x03abc"), Some(&b"abc"[..]));
        assert_eq!(get_response_value(b""), Some(&b""[..]));
        // An unknown double field (a seed node's minute_qps) is skipped.
        let mut with_qps = b"\x0a\x01v\x11".to_vec();
        with_qps.extend_from_slice(&[0; 8]);
        assert_eq!(get_response_value(&with_qps), Some(&b"v"[..]));
        assert_eq!(get_response_value(b"\x0a\x05ab"), None, "truncated");
        assert_eq!(
            get_response_value(b"\x18\x01"),
            Some(&b""[..]),
            "a varint field skipped"
        );
        assert_eq!(
            get_response_value(b"\x0d\x01"),
            None,
            "field 1 as a fixed32"
        );
    }

    #[test]
    fn http_statuses_map_as_grpc_does() {
        assert_eq!(code_of_http(404), UNIMPLEMENTED);
        assert_eq!(code_of_http(503), UNAVAILABLE);
        assert_eq!(code_of_http(418), UNKNOWN);
    }

    #[test]
    fn trailers_give_status_message_and_metadata() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "5".parse().unwrap());
        trailers.insert("grpc-message", "no%20such%25key".parse().unwrap());
        trailers.insert("x-groupcache-ttl", "1.5".parse().unwrap());
        let outcome = outcome_of(&trailers, Bytes::from_static(b"dropped"));
        assert_eq!(outcome.code, 5);
        assert_eq!(outcome.message, "no such%key");
        assert!(outcome.payload.is_empty(), "a failed call carries no reply");
        assert_eq!(outcome.trailers.len(), 1);
        assert_eq!(outcome.trailers[0].0, "x-groupcache-ttl");
    }

    #[test]
    fn a_reply_without_a_status_is_internal() {
        let outcome = outcome_of(&HeaderMap::new(), Bytes::new());
        assert_eq!(outcome.code, INTERNAL);
    }

    #[test]
    fn completions_wake_once_per_batch() {
        use std::io::Read;
        let done = Completions::new().unwrap();
        done.push(1, Outcome::fail(OK, ""));
        done.push(2, Outcome::fail(OK, ""));
        let mut byte = [0u8; 8];
        assert_eq!(
            (&done.reader).read(&mut byte).unwrap(),
            1,
            "one byte for the batch"
        );
        let batch = done.take();
        assert_eq!(
            batch.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert!(done.take().is_empty());
        done.push(3, Outcome::fail(OK, ""));
        assert_eq!(done.take().len(), 1, "a push after take wakes again");
    }
}
