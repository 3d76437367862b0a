//! Forwards made by the engine (issue 20): a Get for a key another ring
//! member owns goes from here to the owner on the engine's own client, on
//! the thread that received it, without Python, where Python's rules allow
//! it. Python pushes the ring, which peers its breaker lets through, and
//! each group's hot-copy rule (`Front.set_forwarding`, `serve_group`).
//! Anything but an answer the owner proved goes to Python as the miss it is,
//! so the breaker, peeks, local loads and fallbacks keep their one code.
//! A caller's deadline is waited out as Python's Breaker waits it out
//! (`patiently`: its first wait, a health probe, patience while the owner's
//! server answers); an owner silent through all that is reported to Python
//! (`take_silenced`), whose breaker then opens.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

use crate::client;
use crate::hits::Proofs;
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
}

impl Link {
    fn new(channel: Arc<client::Channel>) -> Link {
        Link {
            channel,
            held_until: AtomicU64::new(0),
            heard_at: AtomicU64::new(0), // 0.0: never (the clock is positive)
            probing: AtomicBool::new(false),
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
    /// The owner's NOT_FOUND (no such key or group): its message and
    /// status details, passed on as Python passes on an owner's answer.
    pub missing: Option<(String, Metadata)>,
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
    /// Peers a forward found silent (no answer, no sign of life by its
    /// first wait), not yet taken by Python.
    silenced: Mutex<Vec<String>>,
    any_silenced: AtomicBool,
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
        if !self.any_silenced.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        std::mem::take(&mut *self.silenced.lock().unwrap())
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
        proofs: Option<&Proofs>,
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
        let outcome = self.call(&route, payload, remaining, proofs).await;
        leader.tx.send_replace(Some(outcome.clone()));
        (outcome, true)
    }

    async fn call(
        &self,
        route: &Route,
        payload: Bytes,
        remaining: Option<f64>,
        proofs: Option<&Proofs>,
    ) -> Option<Answer> {
        let config = &route.config;
        let peer = &config.peers[route.peer as usize];
        let (first, patience) = waits(config.peer_timeout, config.share, remaining);
        let mut metadata: Metadata = vec![(
            "x-groupcache-forwarded".to_string(),
            Value::Text("1".to_string()),
        )];
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
            "/groupcachepb.GroupCache/Get".to_string(),
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
            self.silenced.lock().unwrap().push(peer.addr.clone());
            self.any_silenced.store(true, Ordering::Release);
            return None;
        };
        if !silent(outcome.code) {
            peer.link.heard();
        }
        // An owner proves its values; its errors carry no proof, and are
        // taken as the peer client takes them (status.from_rpc_error).
        if outcome.code == crate::grpc::NOT_FOUND {
            let details = outcome
                .trailers
                .into_iter()
                .filter(|(k, _)| k == "grpc-status-details-bin")
                .collect();
            return Some(Answer {
                data: Bytes::new(),
                ttl_ms: None,
                missing: Some((outcome.message, details)),
            });
        }
        let proven = match (proofs, &nonce) {
            (Some(p), Some(n)) => p.replied(n, &outcome.trailers),
            _ => true,
        };
        if silent(outcome.code) || (outcome.code == crate::grpc::OK && !proven) {
            // Python's breaker (or its refusal of the value) decides from here.
            peer.link.hold();
        }
        if outcome.code != crate::grpc::OK || !proven {
            return None;
        }
        let ttl_ms = outcome.trailers.iter().find_map(|(k, v)| match v {
            Value::Text(t) if k == "x-groupcache-ttl-ms" => t.parse::<i64>().ok(),
            _ => None,
        });
        Some(Answer {
            data: outcome.payload,
            ttl_ms,
            missing: None,
        })
    }
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

    #[test]
    fn silenced_peers_are_taken_once() {
        let f = Forwarder::default();
        assert!(f.take_silenced().is_empty());
        f.silenced.lock().unwrap().push("127.0.0.1:1".into());
        f.any_silenced.store(true, Ordering::Release);
        assert_eq!(f.take_silenced(), vec!["127.0.0.1:1".to_string()]);
        assert!(f.take_silenced().is_empty());
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
