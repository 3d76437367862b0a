//! Forwards made by the engine (issue 20): a Get for a key another ring
//! member owns goes from here to the owner on the engine's own client, on
//! the thread that received it, without Python, where Python's rules allow
//! it. Python pushes the ring, which peers its breaker lets through, and
//! each group's hot-copy rule (`Front.set_forwarding`, `serve_group`).
//! Anything but a value the owner proved, or its answer about the key (a
//! missing key, its origin's failure), goes to Python as the miss it is, so
//! the breaker, peeks, local loads and fallbacks keep their one code.
//! A caller's deadline is waited out as Python's Breaker waits it out
//! (`patiently`: its first wait, a health probe, patience while the owner's
//! server answers); an owner silent through all that is reported to Python
//! (`take_silenced`), whose breaker then opens. Forwards to one owner that
//! arrive together go as one GetMany of what it holds (`fetch`, `send_batch`).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{oneshot, watch};

use crate::client;
use crate::hits::{Proofs, CACHED_ONLY};
use crate::server::{Metadata, Value};
use crate::store::monotonic;

/// The seed's ring: (crc32 of "node + replica", peer index), sorted.
/// Python computes the points (cache/ring.py), so both hash schemes work.
pub struct Ring {
    points: Vec<(u32, u16)>,
}

impl Ring {
    pub fn new(mut points: Vec<(u32, u16)>) -> Ring {
        // Stable: equal hashes keep Python's order, as bisect_left finds them.
        points.sort_by_key(|p| p.0);
        Ring { points }
    }

    /// HashRing.owner: the first point at or after crc32(key), wrapping.
    pub fn owner(&self, key: &[u8]) -> Option<u16> {
        if self.points.is_empty() {
            return None;
        }
        let h = crc32(key);
        let i = self.points.partition_point(|p| p.0 < h);
        Some(self.points[if i == self.points.len() { 0 } else { i }].1)
    }
}

/// CRC-32 (IEEE), as zlib.crc32 and Go's crc32.ChecksumIEEE compute it.
pub fn crc32(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| {
        table[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8)
    })
}

/// What the engine keeps of one peer across Python's pushes: its
/// connection and what its forwards taught.
pub struct Link {
    channel: Arc<client::Channel>,
    /// Monotonic seconds (as bits) until which a peer that failed a forward
    /// here is left to Python, whose breaker then decides.
    held_until: AtomicU64,
    /// When its server last answered anything here (monotonic seconds, as
    /// bits): PeerFacts.heard_at, for the forwards made here.
    heard_at: AtomicU64,
    /// A health probe is asking it.
    probing: AtomicBool,
    /// Forwards to it that arrived while another was about to be sent
    /// (None: no forward is gathering a batch).
    batch: Mutex<Option<Vec<Waiting>>>,
}

impl Link {
    fn new(channel: Arc<client::Channel>) -> Link {
        Link {
            channel,
            held_until: AtomicU64::new(0),
            heard_at: AtomicU64::new(0), // 0.0: never (the clock is positive)
            probing: AtomicBool::new(false),
            batch: Mutex::new(None),
        }
    }

    fn hold(&self) {
        self.held_until
            .store((monotonic() + HOLD_S).to_bits(), Ordering::Relaxed);
    }

    fn held(&self) -> bool {
        f64::from_bits(self.held_until.load(Ordering::Relaxed)) > monotonic()
    }

    fn heard(&self) {
        // Non-negative f64s order as their bits do.
        self.heard_at
            .fetch_max(monotonic().to_bits(), Ordering::Relaxed);
    }

    fn heard_since(&self, when: f64) -> bool {
        f64::from_bits(self.heard_at.load(Ordering::Relaxed)) >= when
    }

    /// Asks the peer's server for a health check in the background, unless
    /// one is asking (Breaker._start_probe): any answer but UNAVAILABLE
    /// and DEADLINE_EXCEEDED is a sign of life (GrpcPeerClient.answers).
    fn probe(self: &Arc<Self>, wait: f64) {
        if self.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let link = self.clone();
        tokio::spawn(async move {
            let outcome = link
                .channel
                .clone()
                .call(
                    "/grpc.health.v1.Health/Check".to_string(),
                    Bytes::new(),
                    Vec::new(),
                    Some(Duration::from_secs_f64(wait)),
                )
                .await;
            if !silent(outcome.code) {
                link.heard();
            }
            link.probing.store(false, Ordering::Release);
        });
    }
}

/// No answer from the peer's server: it is down, cut off or frozen.
fn silent(code: u32) -> bool {
    code == crate::grpc::UNAVAILABLE || code == crate::grpc::DEADLINE_EXCEEDED
}

pub struct Peer {
    pub addr: String,
    link: Arc<Link>,
    /// Its breaker is closed in Python.
    allowed: bool,
}

/// What Python last pushed.
pub struct Forwarding {
    ring: Ring,
    peers: Vec<Peer>,
    /// Our own index in `peers` (None: we are not in the ring).
    me: Option<u16>,
    /// node.peer_timeout, and the share of a caller's time a forward may take.
    peer_timeout: f64,
    share: f64,
}

/// How long a peer that failed a forward is left to Python (the breaker's
/// first open period).
const HOLD_S: f64 = 1.0;
// Breaker's constants (peering/breaker.py), for the same waits.
const PROBE_S: f64 = 1.0;
const ALIVE_AFTER_S: f64 = 0.1;
const PATIENCE_MARGIN_S: f64 = 0.1;
const PATIENCE_MARGIN_SHARE: f64 = 0.05;
const REPROBE_S: f64 = PROBE_S * 1.5;

/// A forward's reply, as the owner sent it.
#[derive(Clone)]
pub struct Answer {
    pub data: Bytes,
    /// x-groupcache-ttl-ms: the owner's entry's TTL left (None: none).
    pub ttl_ms: Option<i64>,
    /// The owner's answer that the key has no value (its origin says it
    /// does not exist, or failed), passed on as Python passes it on.
    pub refused: Option<Refusal>,
}

/// An owner's error answer about a key, as it sent it.
#[derive(Clone)]
pub struct Refusal {
    pub code: u32,
    pub message: String,
    /// grpc-status-details-bin: a google.rpc.Status with our ErrorInfo.
    pub details: Metadata,
    /// ORIGIN_ERROR: its message holds the origin's words, told only to a
    /// caller with a read credential (node_rules.told).
    pub origin: bool,
}

impl Refusal {
    /// As node_rules.told for a caller not told the cause: the message
    /// ORIGIN_UNTOLD, in the status and in its details alike.
    pub fn untold(mut self) -> Refusal {
        if self.origin {
            self.message = ORIGIN_UNTOLD.to_string();
            for (_, value) in self.details.iter_mut() {
                if let Value::Binary(status) = value {
                    *status = with_message(status, ORIGIN_UNTOLD);
                }
            }
        }
        self
    }
}

/// node_rules.ORIGIN_UNTOLD.
const ORIGIN_UNTOLD: &str =
    "the origin failed; the worker's log has the cause (a caller with a read credential is told it)";

/// The ErrorInfo reasons of an owner's answers the engine passes on, with
/// their status codes (protocol/status.owner_error; a missing group is not
/// an answer about the key: Python loads it locally).
const PASSED_ON: [(&str, u32); 2] = [
    ("KEY_NOT_FOUND", crate::grpc::NOT_FOUND),
    ("ORIGIN_ERROR", crate::grpc::UNAVAILABLE),
];

/// The ErrorInfo reason in a reply's grpc-status-details-bin (a
/// google.rpc.Status: details = 3, each an Any: type_url = 1, value = 2;
/// ErrorInfo: reason = 1).
fn reason_of(trailers: &Metadata) -> Option<String> {
    let status = trailers.iter().find_map(|(k, v)| match v {
        Value::Binary(b) if k == "grpc-status-details-bin" => Some(b),
        _ => None,
    })?;
    let fields = |buf: &[u8]| -> Option<Vec<(u64, Vec<u8>)>> {
        let (mut out, mut at) = (Vec::new(), 0);
        while at < buf.len() {
            if let (n, Field::Bytes(b)) = next_field(buf, &mut at)? {
                out.push((n, b.to_vec()));
            }
        }
        Some(out)
    };
    for (_, any) in fields(status)?.into_iter().filter(|(n, _)| *n == 3) {
        let any = fields(&any)?;
        let is_info = any.iter().any(|(n, url)| {
            *n == 1 && url.as_slice() == b"type.googleapis.com/google.rpc.ErrorInfo"
        });
        let Some((_, info)) = any.into_iter().find(|(n, _)| *n == 2).filter(|_| is_info) else {
            continue;
        };
        let reason = fields(&info)?.into_iter().find(|(n, _)| *n == 1)?.1;
        return String::from_utf8(reason).ok();
    }
    None
}

/// A google.rpc.Status with its message (field 2) replaced.
fn with_message(status: &[u8], message: &str) -> Vec<u8> {
    // Fields in number order, as protobuf writes them: the code, the new
    // message, then the details.
    let (mut out, mut after) = (Vec::with_capacity(status.len() + message.len()), Vec::new());
    let mut at = 0;
    while at < status.len() {
        let start = at;
        match next_field(status, &mut at) {
            Some((2, _)) => {}
            Some((n, _)) if n < 2 => out.extend_from_slice(&status[start..at]),
            Some(_) => after.extend_from_slice(&status[start..at]),
            None => return status.to_vec(), // not a Status: left as it is
        }
    }
    out.push(0x12);
    crate::hits::put_varint(&mut out, message.len() as u64);
    out.extend_from_slice(message.as_bytes());
    out.extend_from_slice(&after);
    out
}

/// Peers a forward found silent (no answer, no sign of life by its first
/// wait), not yet taken by Python.
#[derive(Default)]
struct Silenced {
    addrs: Mutex<Vec<String>>,
    any: AtomicBool,
}

impl Silenced {
    fn report(&self, addr: &str) {
        self.addrs.lock().unwrap().push(addr.to_string());
        self.any.store(true, Ordering::Release);
    }

    fn take(&self) -> Vec<String> {
        if !self.any.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        std::mem::take(&mut *self.addrs.lock().unwrap())
    }
}

/// A forward that joined another's batch: it goes in that forward's
/// GetMany (a Get when it is alone), and its answer comes back on `tx`.
struct Waiting {
    group: Box<[u8]>,
    key: Box<[u8]>,
    payload: Bytes,
    remaining: Option<f64>,
    tx: oneshot::Sender<Option<Answer>>,
}

type Flight = watch::Receiver<Option<Option<Answer>>>;
/// In-flight forwards by (group, key).
type Flights = Mutex<HashMap<(Box<[u8]>, Box<[u8]>), Flight>>;

#[derive(Default)]
pub struct Forwarder {
    config: RwLock<Option<Arc<Forwarding>>>,
    /// Kept across pushes, so a ring change keeps the peers' connections.
    links: Mutex<HashMap<String, Arc<Link>>>,
    flights: Flights,
    silenced: Arc<Silenced>,
    /// Gets answered by a forward made here, for the worker's metrics.
    pub answered: AtomicU64,
}

/// Who a Get goes to, decided before any wait.
pub struct Route {
    config: Arc<Forwarding>,
    peer: u16,
}

impl Forwarder {
    /// Python's push: the ring's points over `addrs`, our own index, whose
    /// breaker is closed. `max_message`: the client's reply limit.
    #[allow(clippy::too_many_arguments)]
    pub fn configure(
        &self,
        points: Vec<(u32, u16)>,
        addrs: Vec<String>,
        me: Option<u16>,
        allowed: Vec<bool>,
        peer_timeout: f64,
        share: f64,
        max_message: usize,
    ) {
        let mut links = self.links.lock().unwrap();
        links.retain(|addr, link| {
            let keep = addrs.contains(addr);
            if !keep {
                link.channel.close();
            }
            keep
        });
        let peers = addrs
            .iter()
            .enumerate()
            .map(|(i, addr)| Peer {
                addr: addr.clone(),
                link: links
                    .entry(addr.clone())
                    .or_insert_with(|| {
                        Arc::new(Link::new(Arc::new(client::Channel::new(
                            addr.clone(),
                            addr.clone(),
                            None,
                            max_message,
                        ))))
                    })
                    .clone(),
                allowed: allowed.get(i).copied().unwrap_or(false),
            })
            .collect();
        *self.config.write().unwrap() = Some(Arc::new(Forwarding {
            ring: Ring::new(points),
            peers,
            me,
            peer_timeout,
            share,
        }));
    }

    /// No forwards here (Python forwards everything).
    pub fn off(&self) {
        *self.config.write().unwrap() = None;
    }

    /// The peer to forward `key` to, where the engine may: None when we own
    /// it, its owner's breaker is open (or it failed here lately), or no
    /// ring was pushed.
    pub fn route(&self, key: &[u8]) -> Option<Route> {
        let config = self.config.read().unwrap().clone()?;
        let peer = config.ring.owner(key)?;
        if Some(peer) == config.me {
            return None;
        }
        let p = config.peers.get(peer as usize)?;
        if !p.allowed || p.link.held() {
            return None;
        }
        Some(Route { config, peer })
    }

    /// The peers forwards found silent since the last call (Python opens
    /// their breakers). Cheap when there are none: Python asks per batch.
    pub fn take_silenced(&self) -> Vec<String> {
        self.silenced.take()
    }

    /// The owner's answer to a forwarded Get of `payload` (the caller's
    /// GetRequest, sent on as it came; None: Python serves the call), and
    /// whether this call fetched it rather than joined another: concurrent
    /// forwards of one key share one call.
    pub async fn forward(
        &self,
        route: Route,
        group: &[u8],
        key: &[u8],
        payload: Bytes,
        remaining: Option<f64>,
        proofs: Option<Arc<Proofs>>,
    ) -> (Option<Answer>, bool) {
        let flight_key = (Box::<[u8]>::from(group), Box::<[u8]>::from(key));
        let (tx, joined) = {
            let mut flights = self.flights.lock().unwrap();
            match flights.get(&flight_key) {
                Some(rx) => (None, Some(rx.clone())),
                None => {
                    let (tx, rx) = watch::channel(None);
                    flights.insert(flight_key.clone(), rx);
                    (Some(tx), None)
                }
            }
        };
        if let Some(mut rx) = joined {
            loop {
                if let Some(outcome) = rx.borrow_and_update().clone() {
                    return (outcome, false);
                }
                if rx.changed().await.is_err() {
                    return (None, false); // the leading call was dropped: Python serves
                }
            }
        }
        // Leaving the map however the call ends (its caller may go away).
        let leader = Leader {
            flights: &self.flights,
            key: flight_key,
            tx: tx.expect("a leader has the sender"),
        };
        let outcome = self
            .fetch(route, group, key, payload, remaining, proofs)
            .await;
        leader.tx.send_replace(Some(outcome.clone()));
        (outcome, true)
    }

    /// A leader's fetch. Forwards to one owner that arrive together are
    /// batched: the first yields once, so those already received on any
    /// I/O thread join it, then sends its own Get and theirs as one
    /// GetMany per group (a Get when one joined).
    async fn fetch(
        &self,
        route: Route,
        group: &[u8],
        key: &[u8],
        payload: Bytes,
        remaining: Option<f64>,
        proofs: Option<Arc<Proofs>>,
    ) -> Option<Answer> {
        let link = route.config.peers[route.peer as usize].link.clone();
        let (opened, payload) = {
            let mut slot = link.batch.lock().unwrap();
            match slot.as_mut() {
                Some(waiting) if waiting.len() < MAX_BATCH => {
                    let (tx, rx) = oneshot::channel();
                    waiting.push(Waiting {
                        group: group.into(),
                        key: key.into(),
                        payload,
                        remaining,
                        tx,
                    });
                    (Err(rx), Bytes::new())
                }
                Some(_) => (Ok(false), payload), // full: this one goes alone
                None => {
                    *slot = Some(Vec::new());
                    (Ok(true), payload)
                }
            }
        };
        let opened = match opened {
            Ok(opened) => opened,
            Err(rx) => return rx.await.unwrap_or(None), // dropped unanswered: Python serves
        };
        if opened {
            // Closes the batch however this ends: a caller gone during the
            // yield leaves no batch open (its forwards then go to Python).
            let gathering = Gathering(&link);
            tokio::task::yield_now().await;
            let joined = gathering.close();
            let mut by_group: HashMap<Box<[u8]>, Vec<Waiting>> = HashMap::new();
            for w in joined {
                by_group.entry(w.group.clone()).or_default().push(w);
            }
            for (group, waiting) in by_group {
                let (config, peer) = (route.config.clone(), route.peer);
                let (silenced, proofs) = (self.silenced.clone(), proofs.clone());
                tokio::spawn(send_batch(config, peer, silenced, group, waiting, proofs));
            }
        }
        let outcome = exchange(
            &route.config,
            route.peer,
            &self.silenced,
            GET_PATH,
            payload,
            remaining,
            proofs.as_deref(),
            false,
        )
        .await?;
        Some(get_answer(outcome))
    }
}

/// How many forwards one batch takes: a GetMany of at most this many keys.
const MAX_BATCH: usize = 64;
const GET_PATH: &str = "/groupcachepb.GroupCache/Get";
const GET_MANY_PATH: &str = "/appliance.cache.Cache/GetMany";

/// Sends forwards that joined a batch: one Get alone, else one GetMany of
/// what the owner holds (CACHED_ONLY: it loads nothing, so no forward
/// waits on another's origin), whose deadline is the most urgent one's.
/// Each held key's value goes to its forward; a key not held goes alone
/// as a Get; a failed call goes to Python, per forward.
async fn send_batch(
    config: Arc<Forwarding>,
    peer: u16,
    silenced: Arc<Silenced>,
    group: Box<[u8]>,
    mut waiting: Vec<Waiting>,
    proofs: Option<Arc<Proofs>>,
) {
    if waiting.len() == 1 {
        let w = waiting.pop().expect("one");
        return send_alone(config, peer, silenced, w, 0.0, proofs).await;
    }
    // The most urgent deadline (None: no forward in it has one).
    let remaining = waiting.iter().filter_map(|w| w.remaining).reduce(f64::min);
    let started = monotonic();
    let keys: Vec<&[u8]> = waiting.iter().map(|w| &w.key[..]).collect();
    let payload = get_many_request(&group, &keys);
    let outcome = exchange(
        &config,
        peer,
        &silenced,
        GET_MANY_PATH,
        payload,
        remaining,
        proofs.as_deref(),
        true,
    )
    .await;
    let answers = match outcome {
        Some(o) if o.code == crate::grpc::OK => many_answers(&o.payload, &keys),
        Some(_) => Some(vec![None; keys.len()]), // refused as a batch: each goes alone
        None => None,
    };
    let Some(answers) = answers else {
        return; // the senders drop: each forward goes to Python
    };
    let spent = monotonic() - started;
    for (w, answer) in waiting.into_iter().zip(answers) {
        match answer {
            Some(answer) => {
                let _ = w.tx.send(Some(answer));
            }
            None => {
                let (config, silenced, proofs) = (config.clone(), silenced.clone(), proofs.clone());
                tokio::spawn(send_alone(config, peer, silenced, w, spent, proofs));
            }
        }
    }
}

/// One forward of a batch sent as a Get of its own, `spent` seconds of its
/// time gone.
async fn send_alone(
    config: Arc<Forwarding>,
    peer: u16,
    silenced: Arc<Silenced>,
    w: Waiting,
    spent: f64,
    proofs: Option<Arc<Proofs>>,
) {
    let remaining = w.remaining.map(|r| (r - spent).max(0.0));
    let outcome = exchange(
        &config,
        peer,
        &silenced,
        GET_PATH,
        w.payload,
        remaining,
        proofs.as_deref(),
        false,
    )
    .await;
    let _ = w.tx.send(outcome.map(get_answer));
}

/// One call to a peer as the peer client makes it: the forwarded marker and
/// our proof, waited out as Breaker waits (`patiently`). Some: the owner's
/// proven reply, or its answer about the key (PASSED_ON: an owner's errors
/// carry no proof, and are taken as the peer client takes them,
/// status.from_rpc_error), or for a batch (`cached_only`) any answer of its
/// server. None: Python decides; a silent owner is reported to it, and one
/// that failed is left to it for HOLD_S.
#[allow(clippy::too_many_arguments)]
async fn exchange(
    config: &Forwarding,
    peer: u16,
    silenced: &Silenced,
    path: &str,
    payload: Bytes,
    remaining: Option<f64>,
    proofs: Option<&Proofs>,
    cached_only: bool,
) -> Option<client::Outcome> {
    let peer = &config.peers[peer as usize];
    let (first, patience) = waits(config.peer_timeout, config.share, remaining);
    let mut metadata: Metadata = vec![(
        "x-groupcache-forwarded".to_string(),
        Value::Text("1".to_string()),
    )];
    if cached_only {
        metadata.push((CACHED_ONLY.to_string(), Value::Text("1".to_string())));
    }
    let nonce = match proofs {
        Some(p) => {
            let (authorization, nonce) = p.make(&peer.addr, "r")?;
            metadata.push(("authorization".to_string(), Value::Text(authorization)));
            Some(nonce)
        }
        None => None,
    };
    let started = monotonic();
    let call = peer.link.channel.clone().call(
        path.to_string(),
        payload,
        metadata,
        Some(Duration::from_secs_f64(patience.max(0.001))),
    );
    let probe_wait = config.peer_timeout.min(PROBE_S);
    let Some(outcome) = patiently(&peer.link, call, started, first, patience, probe_wait).await
    else {
        // No answer and no sign of life by the first wait: Python's
        // breaker opens, and this caller loads locally.
        peer.link.hold();
        silenced.report(&peer.addr);
        return None;
    };
    // An owner's answer about the key (its errors carry no proof, and are
    // taken as the peer client takes them, status.from_rpc_error).
    let reason = (outcome.code != crate::grpc::OK)
        .then(|| reason_of(&outcome.trailers))
        .flatten();
    if !silent(outcome.code) || reason.is_some() {
        peer.link.heard();
    }
    if PASSED_ON
        .iter()
        .any(|(r, code)| reason.as_deref() == Some(r) && outcome.code == *code)
    {
        return Some(outcome);
    }
    if outcome.code != crate::grpc::OK {
        if cached_only && !silent(outcome.code) {
            return Some(outcome); // a batch refused (its reply too large, ...): each goes alone
        }
        // Any other error: Python's peer client decides (a missing group
        // loads locally), and the breaker with it.
        peer.link.hold();
        return None;
    }
    let proven = match (proofs, &nonce) {
        (Some(p), Some(n)) => p.replied(n, &outcome.trailers),
        _ => true,
    };
    if !proven {
        // Python's refusal of the value decides from here.
        peer.link.hold();
    }
    proven.then_some(outcome)
}

/// A Get's answer from the owner's outcome: OK, or an error it passes on.
fn get_answer(outcome: client::Outcome) -> Answer {
    if outcome.code != crate::grpc::OK {
        let details = outcome
            .trailers
            .into_iter()
            .filter(|(k, _)| k == "grpc-status-details-bin")
            .collect();
        return Answer {
            data: Bytes::new(),
            ttl_ms: None,
            refused: Some(Refusal {
                code: outcome.code,
                message: outcome.message,
                details,
                origin: outcome.code == crate::grpc::UNAVAILABLE,
            }),
        };
    }
    let ttl_ms = outcome.trailers.iter().find_map(|(k, v)| match v {
        Value::Text(t) if k == "x-groupcache-ttl-ms" => t.parse::<i64>().ok(),
        _ => None,
    });
    Answer {
        data: outcome.payload,
        ttl_ms,
        refused: None,
    }
}

/// A GetManyRequest (`string group = 1; repeated string keys = 2;`).
fn get_many_request(group: &[u8], keys: &[&[u8]]) -> Bytes {
    let mut out =
        Vec::with_capacity(group.len() + keys.iter().map(|k| k.len() + 3).sum::<usize>() + 3);
    for (tag, field) in std::iter::once((0x0a, group)).chain(keys.iter().map(|k| (0x12, *k))) {
        out.push(tag);
        crate::hits::put_varint(&mut out, field.len() as u64);
        out.extend_from_slice(field);
    }
    Bytes::from(out)
}

/// Each requested key's answer from a GetManyResponse (one KeyResult per
/// key, in request order: key = 1, value = 2, code = 3, ttl = 5 seconds
/// left, 0 none): a value as a Get's reply; None for a key the owner did
/// not answer with one (NOT_CACHED, or an error: it is asked alone). None
/// for all when the reply does not hold exactly the keys asked, in order.
fn many_answers(reply: &[u8], keys: &[&[u8]]) -> Option<Vec<Option<Answer>>> {
    let mut answers = Vec::with_capacity(keys.len());
    let mut at = 0;
    while at < reply.len() {
        let (field, item) = next_field(reply, &mut at)?;
        let Field::Bytes(result) = item else { continue };
        if field != 1 {
            continue;
        }
        let (mut key, mut value, mut code, mut ttl): (&[u8], &[u8], u64, f64) = (b"", b"", 0, 0.0);
        let mut i = 0;
        while i < result.len() {
            match next_field(result, &mut i)? {
                (1, Field::Bytes(b)) => key = b,
                (2, Field::Bytes(b)) => value = b,
                (3, Field::Varint(n)) => code = n,
                (4, Field::Bytes(_)) => {} // the error's text: Python's ask gets it again
                (5, Field::Fixed64(bits)) => ttl = f64::from_bits(bits),
                (1..=5, _) => return None, // a known field in another wire type
                _ => {}
            }
        }
        if keys.get(answers.len()) != Some(&key) {
            return None;
        }
        answers.push((code == 0).then(|| {
            let mut data = Vec::with_capacity(value.len() + 6);
            data.push(0x0a);
            crate::hits::put_varint(&mut data, value.len() as u64);
            data.extend_from_slice(value);
            Answer {
                data: Bytes::from(data),
                ttl_ms: (ttl > 0.0).then(|| ((ttl * 1000.0) as i64).max(1)),
                refused: None,
            }
        }));
    }
    (answers.len() == keys.len()).then_some(answers)
}

enum Field<'a> {
    Varint(u64),
    Fixed64(u64),
    Fixed32,
    Bytes(&'a [u8]),
}

/// The protobuf field at `at` (its number and value), moving past it.
fn next_field<'a>(buf: &'a [u8], at: &mut usize) -> Option<(u64, Field<'a>)> {
    let tag = crate::hits::varint(buf, at)?;
    let field = match tag & 7 {
        0 => Field::Varint(crate::hits::varint(buf, at)?),
        1 => {
            let bytes = buf.get(*at..*at + 8)?;
            *at += 8;
            Field::Fixed64(u64::from_le_bytes(bytes.try_into().ok()?))
        }
        5 => {
            buf.get(*at..*at + 4)?;
            *at += 4;
            Field::Fixed32
        }
        2 => {
            let len = usize::try_from(crate::hits::varint(buf, at)?).ok()?;
            let end = at.checked_add(len).filter(|&e| e <= buf.len())?;
            let bytes = &buf[*at..end];
            *at = end;
            Field::Bytes(bytes)
        }
        _ => return None,
    };
    (tag >> 3 != 0).then_some((tag >> 3, field))
}

/// Breaker._wait and Breaker._patience: (how long a forward waits for an
/// owner, how long it waits for one whose server is alive), in seconds,
/// for a caller with `remaining` seconds (None: no deadline).
fn waits(peer_timeout: f64, share: f64, remaining: Option<f64>) -> (f64, f64) {
    match remaining {
        None => (peer_timeout, peer_timeout),
        Some(r) => {
            let first = (r * share).min(peer_timeout);
            let margin = PATIENCE_MARGIN_S.min(r * PATIENCE_MARGIN_SHARE);
            (first, first.max(peer_timeout.min(r - margin)))
        }
    }
}

/// Breaker._patiently: the call's outcome, or None when the owner's server
/// was silent. The call ends by `patience` on its own deadline. Past
/// `first` it is waited for only while the owner answers anything (a
/// health probe, started at ALIVE_AFTER_S unless the owner answered since
/// the call was sent, asks, and asks again every REPROBE_S).
async fn patiently(
    link: &Arc<Link>,
    call: impl Future<Output = client::Outcome>,
    started: f64,
    first: f64,
    patience: f64,
    probe_wait: f64,
) -> Option<client::Outcome> {
    if patience <= first {
        return Some(call.await); // nothing to wait out past `first`
    }
    tokio::pin!(call);
    let secs = |s: f64| Duration::from_secs_f64(s.max(0.0));
    if let Ok(outcome) = tokio::time::timeout(secs(ALIVE_AFTER_S.min(first / 2.0)), &mut call).await
    {
        return Some(outcome);
    }
    if !link.heard_since(started) {
        link.probe(probe_wait);
    }
    let left = started + first - monotonic();
    if let Ok(outcome) = tokio::time::timeout(secs(left), &mut call).await {
        return Some(outcome);
    }
    if !link.heard_since(started) {
        return None;
    }
    // Alive: worth the wait while it stays so.
    loop {
        let asked = monotonic();
        link.probe(probe_wait);
        match tokio::time::timeout(secs(REPROBE_S), &mut call).await {
            Ok(outcome) => return Some(outcome),
            Err(_) if !link.heard_since(asked) => return None,
            Err(_) => {}
        }
    }
}

/// A batch being gathered on a link, closed when taken or dropped.
struct Gathering<'a>(&'a Link);

impl Gathering<'_> {
    fn close(self) -> Vec<Waiting> {
        self.0.batch.lock().unwrap().take().unwrap_or_default()
    }
}

impl Drop for Gathering<'_> {
    fn drop(&mut self) {
        // Unsent forwards' senders drop with it: they go to Python.
        self.0.batch.lock().unwrap().take();
    }
}

/// The call that fetches for its flight: its entry leaves the map when it
/// ends, answered or dropped (its followers then see the channel close).
struct Leader<'a> {
    flights: &'a Flights,
    key: (Box<[u8]>, Box<[u8]>),
    tx: watch::Sender<Option<Option<Answer>>>,
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        self.flights.lock().unwrap().remove(&self.key);
    }
}

/// Where a GetResponse's value starts, when it holds the value alone
/// (field 1, as our nodes write it: 0x0a, its length, the bytes); None
/// for any other shape (a hot copy is then left to Python).
pub fn value_offset(data: &[u8]) -> Option<usize> {
    if data.first() != Some(&0x0a) {
        return None;
    }
    let mut len: u64 = 0;
    for (i, &b) in data[1..].iter().enumerate().take(10) {
        len |= ((b & 0x7f) as u64) << (7 * i);
        if b & 0x80 == 0 {
            let start = 2 + i;
            return (start as u64 + len == data.len() as u64).then_some(start);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_is_zlibs() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"127.0.0.1:70010"), 0x543e_160b); // zlib.crc32
    }

    #[test]
    fn the_seed_ring_owns_keys_as_python_s_hash_ring_does() {
        let nodes = ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"];
        let points = nodes
            .iter()
            .enumerate()
            .flat_map(|(n, node)| {
                (0..50).map(move |i| (crc32(format!("{node}{i}").as_bytes()), n as u16))
            })
            .collect();
        let ring = Ring::new(points);
        // HashRing(nodes, 50, "seed").owner(key), by node index
        for (key, owner) in [
            ("a", 0),
            ("k1", 1),
            ("k2", 1),
            ("hello", 0),
            ("v100-hot", 1),
            ("zz", 2),
        ] {
            assert_eq!(ring.owner(key.as_bytes()), Some(owner), "{key}");
        }
    }

    #[test]
    fn the_owner_is_the_first_point_at_or_after_the_hash_wrapping() {
        let ring = Ring::new(vec![(300, 2), (100, 0), (200, 1)]);
        let h = crc32(b"k");
        let expected = if h <= 100 {
            0
        } else if h <= 200 {
            1
        } else if h <= 300 {
            2
        } else {
            0
        };
        assert_eq!(ring.owner(b"k"), Some(expected));
        assert_eq!(Ring::new(vec![]).owner(b"k"), None);
    }

    #[test]
    fn only_keys_of_other_members_with_a_closed_breaker_are_routed_here() {
        let f = Forwarder::default();
        assert!(f.route(b"k").is_none(), "no ring pushed");
        let addrs = vec!["127.0.0.1:1".to_string(), "127.0.0.1:2".to_string()];
        // We are member 0; `points` place every key on one member.
        let push = |points: Vec<(u32, u16)>, allowed: Vec<bool>| {
            f.configure(points, addrs.clone(), Some(0), allowed, 1.0, 0.5, 1 << 20)
        };
        push(vec![(1, 1), (2, 1)], vec![false, true]);
        assert_eq!(f.route(b"k").map(|r| r.peer), Some(1));
        push(vec![(1, 0)], vec![false, true]);
        assert!(f.route(b"k").is_none(), "our own key");
        push(vec![(1, 1)], vec![true, false]);
        assert!(f.route(b"k").is_none(), "its breaker is open");
        push(vec![(1, 1)], vec![false, true]);
        let config = f.config.read().unwrap().clone().unwrap();
        config.peers[1].link.hold();
        assert!(f.route(b"k").is_none(), "it failed a forward lately");
        // A push keeps what was learned of a peer, and its connection.
        push(vec![(1, 1)], vec![false, true]);
        assert!(f.route(b"k").is_none());
        f.off();
        assert!(f.route(b"k").is_none());
    }

    #[test]
    fn waits_are_the_breaker_s() {
        // Breaker._wait and _patience (peer timeout 5 s, share 0.5).
        assert_eq!(waits(5.0, 0.5, None), (5.0, 5.0));
        assert_eq!(waits(5.0, 0.5, Some(2.0)), (1.0, 1.9));
        assert_eq!(waits(5.0, 0.5, Some(30.0)), (5.0, 5.0));
        let (first, patience) = waits(5.0, 0.5, Some(1.0));
        assert_eq!(first, 0.5);
        assert!((patience - 0.95).abs() < 1e-9);
        assert_eq!(waits(1.0, 0.5, Some(0.0)), (0.0, 0.0));
    }

    /// A link to a port nothing listens on: its probes are never answered.
    fn deaf_link() -> Arc<Link> {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        Arc::new(Link::new(Arc::new(client::Channel::new(
            addr.clone(),
            addr,
            None,
            1 << 20,
        ))))
    }

    fn answered() -> client::Outcome {
        client::Outcome::fail(crate::grpc::OK, "")
    }

    #[tokio::test]
    async fn a_silent_owner_is_left_at_the_first_wait_a_live_one_waited_for() {
        let link = deaf_link();
        // Silent: nothing heard, the probe fails: left at `first`.
        let t = std::time::Instant::now();
        let never = std::future::pending::<client::Outcome>();
        assert!(patiently(&link, never, monotonic(), 0.3, 2.0, 0.1)
            .await
            .is_none());
        let took = t.elapsed().as_secs_f64();
        assert!((0.29..1.0).contains(&took), "{took}");
        // Alive: heard from after the call was sent, so waited past `first`.
        let late = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            answered()
        };
        let started = monotonic();
        link.heard();
        let outcome = patiently(&link, late, started, 0.2, 2.0, 0.1).await;
        assert_eq!(outcome.map(|o| o.code), Some(crate::grpc::OK));
        // No patience past `first`: the call alone decides.
        let quick = async { answered() };
        assert!(patiently(&link, quick, monotonic(), 1.0, 1.0, 0.1)
            .await
            .is_some());
    }

    #[tokio::test]
    async fn a_batch_whose_gatherer_went_away_hands_its_forwards_to_python() {
        let link = deaf_link();
        let (tx, rx) = oneshot::channel();
        let gathering = Gathering(&link);
        *link.batch.lock().unwrap() = Some(vec![Waiting {
            group: b"g"[..].into(),
            key: b"k"[..].into(),
            payload: Bytes::new(),
            remaining: None,
            tx,
        }]);
        drop(gathering); // its caller went away during the yield
        assert!(link.batch.lock().unwrap().is_none(), "no batch left open");
        assert!(
            rx.await.is_err(),
            "the joined forward is told: Python serves it"
        );
        let gathering = Gathering(&link);
        *link.batch.lock().unwrap() = Some(Vec::new());
        assert!(gathering.close().is_empty());
        assert!(link.batch.lock().unwrap().is_none());
    }

    #[test]
    fn silenced_peers_are_taken_once() {
        let f = Forwarder::default();
        assert!(f.take_silenced().is_empty());
        f.silenced.report("127.0.0.1:1");
        assert_eq!(f.take_silenced(), vec!["127.0.0.1:1".to_string()]);
        assert!(f.take_silenced().is_empty());
    }

    #[test]
    fn an_owner_s_origin_failure_is_passed_on_told_as_python_tells_it() {
        // protocol.status.failure(OriginError("HTTP 500: database on fire"), "g", "k")
        let told = b"\x08\x0e\x12\x1aHTTP 500: database on fire\x1af\x0a(type.googleapis.com/google.rpc.ErrorInfo\x12:\x0a\x0cORIGIN_ERROR\x12\x14groupcache-appliance\x1a\x0a\x0a\x05group\x12\x01g\x1a\x08\x0a\x03key\x12\x01k";
        // the same for OriginError(ORIGIN_UNTOLD)
        let untold = b"\x08\x0e\x12^the origin failed; the worker's log has the cause (a caller with a read credential is told it)\x1af\x0a(type.googleapis.com/google.rpc.ErrorInfo\x12:\x0a\x0cORIGIN_ERROR\x12\x14groupcache-appliance\x1a\x0a\x0a\x05group\x12\x01g\x1a\x08\x0a\x03key\x12\x01k";
        let trailers: Metadata = vec![(
            "grpc-status-details-bin".to_string(),
            Value::Binary(told.to_vec()),
        )];
        assert_eq!(reason_of(&trailers).as_deref(), Some("ORIGIN_ERROR"));
        assert_eq!(reason_of(&Vec::new()), None);
        assert_eq!(with_message(told, ORIGIN_UNTOLD), untold.to_vec());
        let refusal = Refusal {
            code: crate::grpc::UNAVAILABLE,
            message: "HTTP 500: database on fire".into(),
            details: trailers,
            origin: true,
        }
        .untold();
        assert_eq!(refusal.message, ORIGIN_UNTOLD);
        assert!(matches!(&refusal.details[0].1, Value::Binary(b) if b == &untold.to_vec()));
    }

    #[test]
    fn a_batch_is_a_getmany_and_its_reply_each_key_s_answer() {
        // cache_pb2.GetManyRequest(group="g", keys=["a", "bc"]).SerializeToString()
        assert_eq!(
            &get_many_request(b"g", &[b"a", b"bc"])[..],
            b"\x0a\x01g\x12\x01a\x12\x02bc"
        );
        // GetManyResponse(results=[KeyResult(key="a", value=b"v", ttl=1.5),
        //   KeyResult(key="bc", code=5, error="no")]).SerializeToString()
        let mut a = b"\x0a\x01a\x12\x01v\x29".to_vec();
        a.extend_from_slice(&1.5f64.to_le_bytes());
        let bc = b"\x0a\x02bc\x18\x05\x22\x02no".to_vec();
        let mut reply = vec![0x0a, a.len() as u8];
        reply.extend_from_slice(&a);
        reply.extend_from_slice(&[0x0a, bc.len() as u8]);
        reply.extend_from_slice(&bc);
        let answers = many_answers(&reply, &[b"a", b"bc"]).unwrap();
        let first = answers[0].as_ref().unwrap();
        assert_eq!(&first.data[..], b"\x0a\x01v"); // a GetResponse, as the owner's Get sends it
        assert_eq!(first.ttl_ms, Some(1500));
        assert!(answers[1].is_none(), "a key's error: Python asks again");
        // Not the keys asked, in order: nothing is taken from it.
        assert!(many_answers(&reply, &[b"bc", b"a"]).is_none());
        assert!(many_answers(&reply, &[b"a", b"bc", b"d"]).is_none());
        assert!(many_answers(&reply[..reply.len() - 1], &[b"a", b"bc"]).is_none());
    }

    #[test]
    fn a_value_alone_has_its_offset_anything_else_none() {
        assert_eq!(value_offset(&[0x0a, 3, b'a', b'b', b'c']), Some(2));
        assert_eq!(value_offset(&[0x0a, 0]), Some(2));
        assert_eq!(value_offset(&[0x0a, 3, b'a']), None);
        assert_eq!(
            value_offset(&[0x0a, 1, b'a', 0x11, 0, 0, 0, 0, 0, 0, 0, 0]),
            None
        );
        assert_eq!(value_offset(&[]), None);
        let mut long = vec![0x0a, 0x80, 0x01];
        long.extend(std::iter::repeat_n(7u8, 128));
        assert_eq!(value_offset(&long), Some(3));
    }
}
