//! Hits answered in the engine: a GroupCache/Get whose key is in a group's
//! main or hot store is served here, without the GIL. Everything else (a
//! miss, a malformed or forwarded request, a credential this code cannot
//! vouch for, a rate limit to charge) goes to Python as before: this path
//! only ever answers what Python would have answered with the same bytes.
//!
//! What Python's lookup does beside reading the stores is kept too: the
//! group's Get and hit counters, the owner's hot-key tracking (1 in
//! `every` main hits, per key) and the promoter's view of hot-cache hits
//! (per key); Python takes them with `take()` and folds them into its own.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use base64::engine::general_purpose::URL_SAFE;
use base64::Engine as _;
use bytes::Bytes;

use crate::ratelimit::Limit;
use crate::server::{Metadata, Value};
use crate::store::{monotonic, Entry, Key, Store};

/// Distinct keys counted between two takes; more are not counted.
const SAMPLE_KEYS: usize = 4096;

#[derive(Default)]
struct Samples(HashMap<Key, u64>);

impl Samples {
    fn add(&mut self, key: &[u8]) {
        if let Some(n) = self.0.get_mut(key) {
            *n += 1;
        } else if self.0.len() < SAMPLE_KEYS {
            self.0.insert(Key::from(key), 1);
        }
    }
}

pub struct HitGroup {
    pub main: Arc<Mutex<Store>>,
    pub hot: Arc<Mutex<Store>>,
    every: u64,
    gets: AtomicU64,
    main_hits: AtomicU64,
    hot_hits: AtomicU64,
    server_requests: AtomicU64,
    tick: AtomicU64,
    hot_keys: RwLock<HashSet<Key>>,
    owned: Mutex<Samples>,
    seen: Mutex<Samples>,
    /// How the engine may forward this group's misses (None: it does not).
    pub forwarding: RwLock<Option<GroupForwarding>>,
    /// Gets a forward from here took on (less those handed to Python), the
    /// calls to owners they took, and those of the calls that brought a value.
    forward_gets: AtomicI64,
    fetches: AtomicU64,
    peer_loads: AtomicU64,
}

/// What the engine needs of a group's rules to forward its misses.
#[derive(Clone, Copy)]
pub struct GroupForwarding {
    /// A value fetched from its owner gets a hot copy: never (0), while
    /// the hot cache has room (1, RatePromoter's rule with room).
    pub promote: u8,
    /// The group's ttl (0: none) and its one budget over both stores.
    pub ttl: f64,
    pub cache_bytes: usize,
}

/// What `take()` hands Python: counters since the last take, and per key
/// the sampled main hits (owned) and the hot-cache hits (seen).
pub struct Taken {
    pub gets: u64,
    pub main_hits: u64,
    pub hot_hits: u64,
    pub server_requests: u64,
    pub owned: Vec<(Key, u64)>,
    pub seen: Vec<(Key, u64)>,
    /// Gets forwards from here took on (less those handed to Python), the
    /// calls they took, and those of the calls that brought a value.
    pub forward_gets: i64,
    pub fetches: u64,
    pub peer_loads: u64,
}

impl HitGroup {
    pub fn new(main: Arc<Mutex<Store>>, hot: Arc<Mutex<Store>>, every: u64) -> HitGroup {
        HitGroup {
            main,
            hot,
            every: every.max(1),
            gets: AtomicU64::new(0),
            main_hits: AtomicU64::new(0),
            hot_hits: AtomicU64::new(0),
            server_requests: AtomicU64::new(0),
            tick: AtomicU64::new(0),
            hot_keys: RwLock::new(HashSet::new()),
            owned: Mutex::new(Samples::default()),
            seen: Mutex::new(Samples::default()),
            forwarding: RwLock::new(None),
            forward_gets: AtomicI64::new(0),
            fetches: AtomicU64::new(0),
            peer_loads: AtomicU64::new(0),
        }
    }

    /// A Get a forward from here took on: counted as it arrives, as
    /// Group.lookup counts a miss (a load), until Python takes it over
    /// (`handed_over`: Python's lookup counts it then).
    pub fn forwarding(&self) {
        self.forward_gets.fetch_add(1, Ordering::Relaxed);
    }

    pub fn handed_over(&self) {
        self.forward_gets.fetch_sub(1, Ordering::Relaxed);
    }

    /// A Get answered by a forward made here: the promoter sees it, and the
    /// call that fetched it (`leader`) counts as _route_load counts one.
    /// With the group's rule and room, the value gets a hot copy, unless
    /// the hot store lost an entry since `removals` (a Remove or Set may
    /// have raced the fetch) or the main cache holds the key (handed to us).
    pub fn forwarded(
        &self,
        key: &[u8],
        leader: bool,
        answer: &crate::forward::Answer,
        removals: u64,
    ) {
        self.seen.lock().unwrap().add(key);
        if !leader {
            return;
        }
        self.fetches.fetch_add(1, Ordering::Relaxed);
        if answer.refused.is_some() {
            return;
        }
        self.peer_loads.fetch_add(1, Ordering::Relaxed);
        let Some(rule) = *self.forwarding.read().unwrap() else {
            return;
        };
        let Some(offset) = crate::forward::value_offset(&answer.data) else {
            return;
        };
        if rule.promote != 1 {
            return;
        }
        let now = monotonic();
        // As Group._carried_expiry: never later than the owner's, nor than our ttl.
        let own = if rule.ttl > 0.0 { now + rule.ttl } else { 0.0 };
        let expires = match answer.ttl_ms {
            Some(ms) if ms > 0 => {
                let carried = now + ms as f64 / 1000.0;
                if own > 0.0 {
                    own.min(carried)
                } else {
                    carried
                }
            }
            _ => own,
        };
        let size = key.len() + answer.data.len() - offset;
        let mut main = self.main.lock().unwrap();
        let mut hot = self.hot.lock().unwrap();
        // Only where Python's _populate would trim nothing: the same outcome.
        if hot.removals != removals
            || main.find(key, now).is_some()
            || !hot.fits(size)
            || main.bytes() + hot.bytes() + size > rule.cache_bytes
        {
            return;
        }
        drop(main);
        hot.set(key, answer.data.clone(), expires, offset, now);
    }

    /// The hot store's removals so far (see `forwarded`).
    pub fn removals(&self) -> u64 {
        self.hot.lock().unwrap().removals
    }

    /// A hit: (its entry, whether its owner (we) calls it hot); used and
    /// counted only once `admit` says it may be answered.
    fn lookup(
        &self,
        key: &[u8],
        now: f64,
        forwarded: bool,
        admit: impl FnOnce() -> bool,
    ) -> Option<(Entry, bool)> {
        let mut admit = Some(admit);
        for (store, from_main) in [(&self.main, true), (&self.hot, false)] {
            let mut store = store.lock().unwrap();
            let Some(entry) = store.find(key, now) else {
                continue;
            };
            // Taken once: a key found in main is not looked for in hot.
            if !admit.take().is_some_and(|admit| admit()) {
                return None;
            }
            store.used(key);
            drop(store);
            self.counted(key, from_main, forwarded);
            let hot = from_main && self.hot_keys.read().unwrap().contains(key);
            return Some((entry, hot));
        }
        None
    }

    /// One hit of `key` answered here, counted as Group.lookup counts it:
    /// 1 in `every` main hits sampled for the owner's hot keys, every
    /// hot-cache hit for the promoter.
    fn counted(&self, key: &[u8], from_main: bool, forwarded: bool) {
        self.gets.fetch_add(1, Ordering::Relaxed);
        if forwarded {
            self.server_requests.fetch_add(1, Ordering::Relaxed);
        }
        if !from_main {
            self.hot_hits.fetch_add(1, Ordering::Relaxed);
            self.seen.lock().unwrap().add(key);
            return;
        }
        self.main_hits.fetch_add(1, Ordering::Relaxed);
        if self.tick.fetch_add(1, Ordering::Relaxed) % self.every == self.every - 1 {
            self.owned.lock().unwrap().add(key);
        }
    }

    /// Every key's entry, in order, and whether it came from the main
    /// cache; None when any key misses. Neither uses nor counts them
    /// (use_many does).
    fn find_many(&self, keys: &[&[u8]], now: f64) -> Option<(Vec<Entry>, Vec<bool>)> {
        let (found, from_main) = self.find_each(keys, now);
        Some((found.into_iter().collect::<Option<_>>()?, from_main))
    }

    /// Each key's entry if either cache holds it, and whether it came from
    /// the main cache (false for a miss). Neither uses nor counts them.
    fn find_each(&self, keys: &[&[u8]], now: f64) -> (Vec<Option<Entry>>, Vec<bool>) {
        let mut found: Vec<Option<Entry>> = {
            let mut main = self.main.lock().unwrap();
            keys.iter().map(|k| main.find(k, now)).collect()
        };
        let from_main: Vec<bool> = found.iter().map(Option::is_some).collect();
        if from_main.iter().any(|m| !m) {
            let mut hot = self.hot.lock().unwrap();
            for (slot, key) in found.iter_mut().zip(keys) {
                if slot.is_none() {
                    *slot = hot.find(key, now);
                }
            }
        }
        (found, from_main)
    }

    /// Uses and counts the hits find_many found, as lookup() does each.
    fn use_many(&self, keys: &[&[u8]], from_main: &[bool], forwarded: bool) {
        for (store, main) in [(&self.main, true), (&self.hot, false)] {
            if from_main.contains(&main) {
                let mut store = store.lock().unwrap();
                for (key, _) in keys.iter().zip(from_main).filter(|(_, m)| **m == main) {
                    store.used(key);
                }
            }
        }
        for (key, main) in keys.iter().zip(from_main) {
            self.counted(key, *main, forwarded);
        }
    }

    pub fn set_hot(&self, keys: HashSet<Key>) {
        *self.hot_keys.write().unwrap() = keys;
    }

    pub fn take(&self) -> Taken {
        let drain = |m: &Mutex<Samples>| -> Vec<(Key, u64)> {
            std::mem::take(&mut m.lock().unwrap().0)
                .into_iter()
                .collect()
        };
        Taken {
            gets: self.gets.swap(0, Ordering::Relaxed),
            main_hits: self.main_hits.swap(0, Ordering::Relaxed),
            hot_hits: self.hot_hits.swap(0, Ordering::Relaxed),
            server_requests: self.server_requests.swap(0, Ordering::Relaxed),
            owned: drain(&self.owned),
            seen: drain(&self.seen),
            forward_gets: self.forward_gets.swap(0, Ordering::Relaxed),
            fetches: self.fetches.swap(0, Ordering::Relaxed),
            peer_loads: self.peer_loads.swap(0, Ordering::Relaxed),
        }
    }
}

/// Who may read without Python's help: anyone (reads open), or the holder
/// of a bearer token (by SHA-256 digest) or certificate identity with the
/// read scope. A credential not known here goes to Python, which answers it.
#[derive(Default)]
pub struct Access {
    pub open: bool,
    /// (digest, has the read scope) of every token Python knows.
    pub tokens: Vec<([u8; 32], bool)>,
    /// identity -> has the read scope, for every identity Python knows.
    pub identities: HashMap<String, bool>,
}

impl Access {
    /// `authorization`: the call's first such metadata value, if any.
    fn allows(&self, authorization: Option<&str>, identities: &[String]) -> bool {
        self.open || self.credentialed(authorization, identities)
    }

    /// Whether the call presents a credential with the read scope (open
    /// reads aside: node_rules.shows_cause).
    fn credentialed(&self, authorization: Option<&str>, identities: &[String]) -> bool {
        if let Some(auth) = authorization {
            // Python decides anything but a well-formed bearer token.
            let Some((scheme, token)) = auth.trim().split_once(' ') else {
                return false;
            };
            let token = token.trim();
            if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
                return false;
            }
            let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
            // Compared with every digest, in constant time, as Python does.
            let mut found = None;
            for (known, read) in &self.tokens {
                let diff = known
                    .iter()
                    .zip(digest.as_ref())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b));
                if diff == 0 && found.is_none() {
                    found = Some(*read);
                }
            }
            return found == Some(true);
        }
        // The first identity Python knows decides, as in Python.
        identities
            .iter()
            .find_map(|i| self.identities.get(i))
            .copied()
            .unwrap_or(false)
    }
}

/// A peer's proof checked as appliance/node/peer_proofs.py checks it, so
/// that a peer's forwarded Get is answered here with our proof back.
pub struct Proofs {
    key: ring::hmac::Key,
    /// The address we serve in the ring; proofs are made for it.
    addr: String,
    /// When we began listening (epoch ms): earlier proofs are refused.
    since_ms: i64,
}

/// How far a proof's time may be from our clock (peer_proofs.WINDOW_S).
const PROOF_WINDOW_S: f64 = 60.0;

impl Proofs {
    /// `key`: PeerProofs' HMAC key (SHA-256 of its context and the token).
    pub fn new(key: &[u8], addr: String, since_ms: i64) -> Proofs {
        Proofs {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key),
            addr,
            since_ms,
        }
    }

    fn mac(&self, text: &str) -> String {
        let tag = ring::hmac::sign(&self.key, text.as_bytes());
        URL_SAFE.encode(&tag.as_ref()[..24])
    }

    /// The nonce of a valid proof (what follows "GC-Proof "); None when
    /// it is not one (Python then says why).
    fn check<'a>(&self, proof: &'a str, now_s: f64) -> Option<&'a str> {
        if proof.len() > 200 {
            return None;
        }
        let mut parts = proof.trim().split('.');
        let (ms, nonce, scope, mac) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some()
            || ms.is_empty()
            || !ms.bytes().all(|b| b.is_ascii_digit())
            || !(scope == "r" || scope == "w")
        {
            return None;
        }
        let expected = self.mac(&format!("call|{}|{ms}|{nonce}|{scope}", self.addr));
        let diff = expected.len() != mac.len()
            || expected
                .bytes()
                .zip(mac.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                != 0;
        let made: i64 = ms.parse().ok()?;
        if diff || made < self.since_ms || (now_s - made as f64 / 1000.0).abs() > PROOF_WINDOW_S {
            return None;
        }
        Some(nonce)
    }

    /// (authorization value, nonce) for a call to the worker at `target`
    /// that may do `scope`, as PeerProofs.make makes it; None if the
    /// system gives no random bytes.
    pub fn make(&self, target: &str, scope: &str) -> Option<(String, String)> {
        use ring::rand::SecureRandom;
        let mut raw = [0u8; 12];
        ring::rand::SystemRandom::new().fill(&mut raw).ok()?;
        let nonce = URL_SAFE.encode(raw);
        let ms = (epoch_seconds() * 1000.0) as i64;
        let mac = self.mac(&format!("call|{target}|{ms}|{nonce}|{scope}"));
        Some((format!("GC-Proof {ms}.{nonce}.{scope}.{mac}"), nonce))
    }

    /// Whether reply metadata carries the callee's proof for `nonce`.
    pub fn replied(&self, nonce: &str, trailers: &Metadata) -> bool {
        let expected = self.mac(&format!("reply|{nonce}"));
        trailers.iter().any(|(k, v)| {
            k == "x-groupcache-proof"
                && matches!(v, Value::Text(t) if t.len() == expected.len()
                    && t.bytes().zip(expected.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0)
        })
    }

    fn reply(&self, nonce: &str) -> (String, Value) {
        (
            "x-groupcache-proof".to_string(),
            Value::Text(self.mac(&format!("reply|{nonce}"))),
        )
    }
}

fn epoch_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A Get the hit path may decide (Hits::admitted).
struct Admitted<'p> {
    group: &'p [u8],
    key: &'p [u8],
    found: Arc<HitGroup>,
    /// Our proof back to a peer's forward.
    proof: Option<(String, Value)>,
}

/// A Get to forward from here (Hits::forward_plan).
pub struct ForwardPlan {
    group: Arc<HitGroup>,
    names: (Box<[u8]>, Box<[u8]>),
    route: crate::forward::Route,
    proofs: Option<Arc<Proofs>>,
    /// The caller is told an origin failure's cause (a read credential).
    shows_cause: bool,
}

/// The metadata of a peer's GetMany of forwards batched together
/// (forward.rs): answer the keys held, and NOT_CACHED for the others,
/// never loading, so no forward in it waits on another's origin.
pub const CACHED_ONLY: &str = "x-groupcache-cached-only";
/// The code of a key a CACHED_ONLY GetMany found in no cache
/// (FAILED_PRECONDITION): its forward is then sent alone.
pub const NOT_CACHED: u64 = 9;

/// What the hit path reads off a call besides its message.
pub struct CallFacts<'a> {
    /// It carries x-groupcache-forwarded (a peer's forward).
    pub forwarded: bool,
    /// A peer's batch of forwards asks only for what is cached (CACHED_ONLY).
    pub cached_only: bool,
    /// Its authorization metadata: Ok(None) when absent; Err when present
    /// but not text (Python then decides).
    pub authorization: Result<Option<&'a str>, ()>,
    pub identities: &'a [String],
    /// The gRPC peer string ("ipv4:1.2.3.4:5678"): the rate limit's key.
    pub peer: &'a str,
}

impl<'a> CallFacts<'a> {
    pub fn of(
        headers: &'a http::HeaderMap,
        identities: &'a [String],
        peer: &'a str,
    ) -> CallFacts<'a> {
        CallFacts {
            forwarded: headers.contains_key("x-groupcache-forwarded"),
            cached_only: headers.contains_key(CACHED_ONLY),
            authorization: match headers.get("authorization") {
                None => Ok(None),
                Some(v) => v.to_str().map(Some).map_err(|_| ()),
            },
            identities,
            peer,
        }
    }
}

/// Cache/GetMany's method index and NodeInstance's limits on it.
pub struct ManyLimits {
    pub method: usize,
    /// MAX_BATCH_KEYS: more is Python's error.
    pub max_keys: usize,
    /// max_reply: a reply that would be larger is Python's refusal.
    pub max_reply: usize,
    /// RESULT_OVERHEAD: what each key adds to the reply's size estimate.
    pub per_key: usize,
}

pub struct Hits {
    /// Python opens the path once the node has a ring, and closes it to stop.
    pub open: AtomicBool,
    pub groups: RwLock<HashMap<Box<[u8]>, Arc<HitGroup>>>,
    pub access: RwLock<Access>,
    pub max_group: usize,
    pub max_key: usize,
    pub hot_trailer: Metadata,
    /// Cache/GetMany answered here too, when all its keys hit.
    pub get_many: Option<ManyLimits>,
    /// Forwards from peers: checked against the cluster token's proofs
    /// (Some), taken on the marker alone (None; nodes with no cluster
    /// token), or left to Python until Python says which (unset).
    pub peers: RwLock<Option<Option<Arc<Proofs>>>>,
    /// Misses of keys another member owns, forwarded from here.
    pub forwarder: crate::forward::Forwarder,
    /// Gets answered here, for the worker's metrics.
    pub answered: AtomicU64,
    /// `[ops] rate_limit`: the buckets Python charges too (None: no limit).
    /// A call the buckets refuse goes to Python, which refuses it.
    pub limit: RwLock<Option<Limit>>,
}

impl Hits {
    pub fn new(
        max_group: usize,
        max_key: usize,
        hot_trailer: Metadata,
        get_many: Option<ManyLimits>,
    ) -> Hits {
        Hits {
            get_many,
            open: AtomicBool::new(false),
            groups: RwLock::new(HashMap::new()),
            access: RwLock::new(Access::default()),
            max_group,
            max_key,
            hot_trailer,
            peers: RwLock::new(None),
            forwarder: Default::default(),
            answered: AtomicU64::new(0),
            limit: RwLock::new(None),
        }
    }

    /// A GroupCache/Get the engine may decide: the path is open, its names
    /// are valid, its caller may read (a peer's forward by its proof), and
    /// its group is served here. None: Python serves it.
    fn admitted<'p>(&self, payload: &'p [u8], call: &CallFacts<'_>) -> Option<Admitted<'p>> {
        if !self.open.load(Ordering::Acquire) {
            return None;
        }
        let authorization = call.authorization.ok()?;
        // A peer's forward: served as the owner, with our proof back.
        let proof = if call.forwarded {
            self.peer_proof(authorization)?
        } else {
            None
        };
        let (group, key) = parse_get(payload)?;
        if !self.valid_group(group) || !self.valid_key(key) {
            return None;
        }
        // A valid proof reads (the cluster's reading); anything else is checked.
        if proof.is_none()
            && !self
                .access
                .read()
                .unwrap()
                .allows(authorization, call.identities)
        {
            return None;
        }
        let found = self.groups.read().unwrap().get(group).cloned()?;
        Some(Admitted {
            key,
            group,
            found,
            proof,
        })
    }

    /// A peer's forward checked by its proof: Some(our proof back), or
    /// Some(None) where the cluster has no token; None: Python decides (no
    /// proof, a bad one, or no peers told yet).
    fn peer_proof(&self, authorization: Option<&str>) -> Option<Option<(String, Value)>> {
        let peers = self.peers.read().unwrap();
        match (peers.as_ref()?, authorization) {
            (Some(proofs), Some(auth)) => {
                let (scheme, rest) = auth.trim().split_once(' ')?;
                if scheme != "GC-Proof" {
                    return None;
                }
                let nonce = proofs.check(rest, epoch_seconds())?;
                Some(Some(proofs.reply(nonce)))
            }
            (None, _) => Some(None),
            (Some(_), None) => None,
        }
    }

    /// A GroupCache/Get answered here: (framed value, trailers); None:
    /// Python serves it.
    pub fn answer(
        &self,
        payload: &[u8],
        call: &CallFacts<'_>,
    ) -> Option<(Bytes, Cow<'_, Metadata>)> {
        let Admitted {
            key, found, proof, ..
        } = self.admitted(payload, call)?;
        let now = monotonic();
        let limit = self.limit.read().unwrap();
        let admit = || {
            limit
                .as_ref()
                .is_none_or(|l| l.admit(call.peer, call.forwarded, 1.0, now))
        };
        let (entry, hot) = found.lookup(key, now, call.forwarded, admit)?;
        drop(limit);
        self.answered.fetch_add(1, Ordering::Relaxed);
        static NONE: Metadata = Vec::new();
        let trailers = if call.forwarded {
            // As peer_trailers(): our proof, and the TTL the entry has left.
            let mut t: Metadata = proof.into_iter().collect();
            if entry.expires != 0.0 {
                let ms = (((entry.expires - now).max(0.001) * 1000.0) as i64).max(1);
                t.push(("x-groupcache-ttl-ms".into(), Value::Text(ms.to_string())));
            }
            Cow::Owned(t)
        } else if hot {
            Cow::Borrowed(&self.hot_trailer)
        } else {
            Cow::Borrowed(&NONE)
        };
        Some((entry.data, trailers))
    }

    /// Where a Get `answer` left to Python may instead be forwarded from
    /// here: a client's Get (not a peer's forward) that the path would
    /// have answered had the key been held, of a group whose rules Python
    /// pushed, with no rate limit, for a key another member owns whose
    /// breaker is closed. None: Python serves it.
    pub fn forward_plan(&self, payload: &[u8], call: &CallFacts<'_>) -> Option<ForwardPlan> {
        if call.forwarded || self.limit.read().unwrap().is_some() {
            return None;
        }
        let proofs = self.peers.read().unwrap().clone()?;
        let Admitted {
            group, key, found, ..
        } = self.admitted(payload, call)?;
        found.forwarding.read().unwrap().as_ref()?;
        let route = self.forwarder.route(key)?;
        let shows_cause = self
            .access
            .read()
            .unwrap()
            .credentialed(call.authorization.ok().flatten(), call.identities);
        Some(ForwardPlan {
            group: found,
            names: (group.into(), key.into()),
            route,
            proofs,
            shows_cause,
        })
    }

    /// The owner's reply to a planned forward (its value, or its NOT_FOUND
    /// as (message, details)), counted in its group; None: Python serves
    /// the call (it failed, or was not proven).
    pub async fn forward(
        &self,
        plan: ForwardPlan,
        payload: Bytes,
        remaining: Option<f64>,
    ) -> Option<Result<Bytes, crate::forward::Refusal>> {
        let removals = plan.group.removals();
        plan.group.forwarding();
        let (group, key) = &plan.names;
        let (answer, leader) = self
            .forwarder
            .forward(plan.route, group, key, payload, remaining, plan.proofs)
            .await;
        let Some(answer) = answer else {
            plan.group.handed_over();
            return None;
        };
        self.forwarder.answered.fetch_add(1, Ordering::Relaxed);
        plan.group.forwarded(key, leader, &answer, removals);
        Some(match answer.refused {
            Some(refusal) if plan.shows_cause => Err(refusal),
            Some(refusal) => Err(refusal.untold()),
            None => Ok(answer.data),
        })
    }

    /// Whether the call's credential may read here (None: its authorization
    /// is not text; Python answers it).
    fn may_read(&self, call: &CallFacts<'_>) -> Option<bool> {
        let authorization = call.authorization.ok()?;
        Some(
            self.access
                .read()
                .unwrap()
                .allows(authorization, call.identities),
        )
    }

    /// NodeRules.validate's rule: names present and within their limits.
    fn valid_group(&self, group: &[u8]) -> bool {
        !group.is_empty() && group.len() <= self.max_group
    }

    fn valid_key(&self, key: &[u8]) -> bool {
        !key.is_empty() && key.len() <= self.max_key
    }

    /// A Cache/GetMany whose keys all hit, encoded as
    /// codec.encode_get_many_response encodes it, and its trailers (our
    /// proof to a peer's forward, the batches forward.rs sends); None:
    /// Python serves it (a miss, an invalid key, a reply over the limit, ...).
    pub fn answer_many(&self, payload: &[u8], call: &CallFacts<'_>) -> Option<(Bytes, Metadata)> {
        let limits = self.get_many.as_ref()?;
        if !self.open.load(Ordering::Acquire) {
            return None;
        }
        let proof = if call.forwarded {
            self.peer_proof(call.authorization.ok()?)?
        } else {
            None
        };
        let (group, keys) = parse_get_many(payload, limits.max_keys)?;
        if !self.valid_group(group) || keys.is_empty() || !keys.iter().all(|k| self.valid_key(k)) {
            return None;
        }
        if proof.is_none() && !self.may_read(call)? {
            return None;
        }
        let found = self.groups.read().unwrap().get(group).cloned()?;
        let now = monotonic();
        // A peer's batch takes what is held; anything else all hits or goes to Python.
        let (entries, from_main) = if call.cached_only && call.forwarded {
            found.find_each(&keys, now)
        } else {
            let (entries, from_main) = found.find_many(&keys, now)?;
            (entries.into_iter().map(Some).collect(), from_main)
        };
        // Python's estimate of the reply; over the limit, Python counts and refuses it.
        let size: usize = keys
            .iter()
            .zip(&entries)
            .map(|(k, e)| k.len() + limits.per_key + e.as_ref().map_or(0, |e| e.data.len()))
            .sum();
        if size > limits.max_reply {
            return None;
        }
        if let Some(limit) = self.limit.read().unwrap().as_ref() {
            // codec.call_cost: one token per distinct key.
            let cost = keys.iter().collect::<HashSet<_>>().len() as f64;
            // (A batch's misses are charged again when they come alone:
            // free for ring members, who alone send batches.)
            if !limit.admit(call.peer, call.forwarded, cost, now) {
                return None;
            }
        }
        let held: Vec<&[u8]> = keys
            .iter()
            .zip(&entries)
            .filter(|(_, e)| e.is_some())
            .map(|(k, _)| *k)
            .collect();
        let held_main: Vec<bool> = from_main
            .iter()
            .zip(&entries)
            .filter(|(_, e)| e.is_some())
            .map(|(m, _)| *m)
            .collect();
        found.use_many(&held, &held_main, call.forwarded);
        self.answered.fetch_add(1, Ordering::Relaxed);
        Some((
            encode_get_many(&keys, &entries, now),
            proof.into_iter().collect(),
        ))
    }
}

/// A GetManyResponse, byte for byte as Python's codec writes it for hits;
/// a key with no entry is NOT_CACHED (a CACHED_ONLY batch's miss).
pub fn encode_get_many(keys: &[&[u8]], entries: &[Option<Entry>], now: f64) -> Bytes {
    let mut out = Vec::with_capacity(
        keys.iter()
            .zip(entries)
            .map(|(k, e)| k.len() + e.as_ref().map_or(0, |e| e.data.len()) + 24)
            .sum(),
    );
    for (key, e) in keys.iter().zip(entries) {
        let mut head = Vec::with_capacity(key.len() + 6);
        if !key.is_empty() {
            head.push(0x0a);
            put_varint(&mut head, key.len() as u64);
            head.extend_from_slice(key);
        }
        let Some(e) = e else {
            head.push(0x18); // code = 3
            put_varint(&mut head, NOT_CACHED);
            out.push(0x0a);
            put_varint(&mut out, head.len() as u64);
            out.extend_from_slice(&head);
            continue;
        };
        let mut ttl = Vec::new();
        if e.expires != 0.0 {
            ttl.push(0x29);
            ttl.extend_from_slice(&(e.expires - now).max(0.001).to_le_bytes());
        }
        let data = &e.data[..];
        out.push(0x0a);
        if e.offset > 0 {
            // Framed: data is `0x0a <length> value`; as field 2, `0x12` and the rest.
            put_varint(&mut out, (head.len() + data.len() + ttl.len()) as u64);
            out.extend_from_slice(&head);
            out.push(0x12);
            out.extend_from_slice(&data[1..]);
        } else if !data.is_empty() {
            let mut field = vec![0x12];
            put_varint(&mut field, data.len() as u64);
            put_varint(
                &mut out,
                (head.len() + field.len() + data.len() + ttl.len()) as u64,
            );
            out.extend_from_slice(&head);
            out.extend_from_slice(&field);
            out.extend_from_slice(data);
        } else {
            put_varint(&mut out, (head.len() + ttl.len()) as u64);
            out.extend_from_slice(&head);
        }
        out.extend_from_slice(&ttl);
    }
    Bytes::from(out)
}

pub(crate) fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

pub(crate) fn varint(buf: &[u8], at: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *buf.get(*at)?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// Calls `each(field, bytes)` for every length-delimited field of a
/// message whose fields 1 and 2 are strings, skipping the other wire
/// types; None for anything Python's parser would refuse or might read
/// differently (a truncated field, field 1 or 2 in another wire type).
fn each_field<'a>(buf: &'a [u8], mut each: impl FnMut(u64, &'a [u8]) -> Option<()>) -> Option<()> {
    let mut at = 0;
    while at < buf.len() {
        let tag = varint(buf, &mut at)?;
        let (field, wire) = (tag >> 3, tag & 7);
        if field == 0 || ((field == 1 || field == 2) && wire != 2) {
            return None;
        }
        match wire {
            0 => {
                varint(buf, &mut at)?;
            }
            1 | 5 => {
                at = at.checked_add(if wire == 1 { 8 } else { 4 })?;
                if at > buf.len() {
                    return None;
                }
            }
            2 => {
                let len = usize::try_from(varint(buf, &mut at)?).ok()?;
                let end = at.checked_add(len).filter(|&e| e <= buf.len())?;
                each(field, &buf[at..end])?;
                at = end;
            }
            _ => return None,
        }
    }
    Some(())
}

/// (group, key) of a GetRequest (`string group = 1; string key = 2;`),
/// both valid UTF-8 (the last copy of a field wins, as in protobuf).
pub fn parse_get(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let (mut group, mut key): (&[u8], &[u8]) = (b"", b"");
    each_field(buf, |field, bytes| {
        match field {
            1 => group = bytes,
            2 => key = bytes,
            _ => {}
        }
        Some(())
    })?;
    std::str::from_utf8(group).ok()?;
    std::str::from_utf8(key).ok()?;
    Some((group, key))
}

/// (group, keys) of a GetManyRequest (`string group = 1; repeated string
/// keys = 2;`), all valid UTF-8 and at most `max_keys` keys.
pub fn parse_get_many(buf: &[u8], max_keys: usize) -> Option<(&[u8], Vec<&[u8]>)> {
    let mut group: &[u8] = b"";
    let mut keys = Vec::new();
    each_field(buf, |field, bytes| {
        match field {
            1 => group = bytes,
            2 if keys.len() < max_keys => {
                std::str::from_utf8(bytes).ok()?;
                keys.push(bytes);
            }
            2 => return None,
            _ => {}
        }
        Some(())
    })?;
    std::str::from_utf8(group).ok()?;
    Some((group, keys))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Policy;

    fn request(group: &str, key: &str) -> Vec<u8> {
        let mut out = vec![0x0a, group.len() as u8];
        out.extend_from_slice(group.as_bytes());
        out.extend_from_slice(&[0x12, key.len() as u8]);
        out.extend_from_slice(key.as_bytes());
        out
    }

    fn facts<'a>(headers: &'a http::HeaderMap, identities: &'a [String]) -> CallFacts<'a> {
        CallFacts::of(headers, identities, "ipv4:127.0.0.1:1")
    }

    fn headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    fn hits_with(group: &str, key: &str) -> (Hits, Arc<HitGroup>) {
        let main = Arc::new(Mutex::new(Store::new(Policy::Lru, 1000)));
        let hot = Arc::new(Mutex::new(Store::new(Policy::Lru, 100)));
        main.lock()
            .unwrap()
            .set(key.as_bytes(), Bytes::from_static(b"framed"), 0.0, 0, 0.0);
        let g = Arc::new(HitGroup::new(main, hot, 2));
        let many = ManyLimits {
            method: 1,
            max_keys: 4,
            max_reply: 200,
            per_key: 24,
        };
        let hits = Hits::new(
            64,
            64,
            vec![("x-groupcache-hot".into(), Value::Text("1".into()))],
            Some(many),
        );
        hits.groups
            .write()
            .unwrap()
            .insert(group.as_bytes().into(), g.clone());
        hits.access.write().unwrap().open = true;
        hits.open.store(true, Ordering::Release);
        (hits, g)
    }

    #[test]
    fn parses_what_protobuf_writes_and_refuses_the_rest() {
        assert_eq!(parse_get(&request("g", "k")), Some((&b"g"[..], &b"k"[..])));
        // Unknown fields are skipped; the last copy of a field wins.
        let mut buf = vec![0x18, 0x05];
        buf.extend(request("a", "b"));
        buf.extend_from_slice(&[0x12, 0x01, b'c']);
        assert_eq!(parse_get(&buf), Some((&b"a"[..], &b"c"[..])));
        assert_eq!(parse_get(&[0x0a, 0x05, b'g']), None); // truncated
        assert_eq!(parse_get(&[0x08, 0x01]), None); // group as a varint
        assert_eq!(parse_get(&[0x0a, 0x01, 0xff]), None); // not UTF-8
    }

    #[test]
    fn a_hit_is_answered_and_counted() {
        let (hits, g) = hits_with("g", "k");
        let none = http::HeaderMap::new();
        let plain = facts(&none, &[]);
        let (data, trailers) = hits.answer(&request("g", "k"), &plain).unwrap();
        assert_eq!((&data[..], trailers.len()), (&b"framed"[..], 0));
        hits.answer(&request("g", "k"), &plain).unwrap();
        assert!(hits.answer(&request("g", "miss"), &plain).is_none());
        assert!(hits.answer(&request("other", "k"), &plain).is_none());
        let taken = g.take();
        assert_eq!((taken.gets, taken.main_hits, taken.hot_hits), (2, 2, 0));
        assert_eq!(taken.owned.len(), 1); // 1 in every=2 main hits sampled
        g.set_hot([Key::from(&b"k"[..])].into_iter().collect());
        let (_, trailers) = hits.answer(&request("g", "k"), &plain).unwrap();
        assert_eq!(trailers.len(), 1);
    }

    #[test]
    fn python_answers_forwards_closed_paths_and_unknown_credentials() {
        let (hits, _) = hits_with("g", "k");
        let get = request("g", "k");
        let forwarded = headers(&[("x-groupcache-forwarded", "1")]);
        assert!(hits.answer(&get, &facts(&forwarded, &[])).is_none());
        {
            let mut access = hits.access.write().unwrap();
            access.open = false;
            for (token, read) in [(&b"reader"[..], true), (&b"writer"[..], false)] {
                let digest = ring::digest::digest(&ring::digest::SHA256, token);
                access
                    .tokens
                    .push((digest.as_ref().try_into().unwrap(), read));
            }
            access.identities.insert("cn-reader".into(), true);
            access.identities.insert("cn-writer".into(), false);
        }
        let with = |auth: &str| {
            let h = headers(&[("authorization", auth)]);
            hits.answer(&get, &facts(&h, &[])).is_some()
        };
        assert!(with("Bearer reader"));
        assert!(with("bearer  reader "));
        assert!(!with("Bearer writer"));
        assert!(!with("Bearer nobody"));
        assert!(!with("GC-Proof x"));
        let mut opaque = http::HeaderMap::new();
        opaque.insert(
            "authorization",
            http::HeaderValue::from_bytes(b"Bearer \xffreader").unwrap(),
        );
        assert!(hits.answer(&get, &facts(&opaque, &[])).is_none());
        let none = http::HeaderMap::new();
        assert!(hits.answer(&get, &facts(&none, &[])).is_none());
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let reader_second = names(&["x", "cn-reader"]);
        assert!(hits.answer(&get, &facts(&none, &reader_second)).is_some());
        let writer_first = names(&["cn-writer", "cn-reader"]);
        assert!(hits.answer(&get, &facts(&none, &writer_first)).is_none());
        hits.access.write().unwrap().open = true;
        hits.open.store(false, Ordering::Release);
        assert!(hits.answer(&get, &facts(&none, &[])).is_none());
    }

    #[test]
    fn a_peer_proof_made_by_python_checks_here() {
        // PeerProofs("tok", clock=1000.0), listening("127.0.0.1:7000", 999.0):
        // its key, one proof it made, and its reply to that proof.
        let key = (0..32)
            .map(|i| {
                u8::from_str_radix(
                    &"2772731e197c1faf015a569e236c72243cc6f2de5140ce24f2a46b793e02c5fb"
                        [2 * i..2 * i + 2],
                    16,
                )
                .unwrap()
            })
            .collect::<Vec<u8>>();
        let proof = "1000000.DdqniT5wvMBOfT8n.r.kaeWbhgLxHaTOCobaeIAuKo-VMK8NmXY";
        let proofs = Proofs::new(&key, "127.0.0.1:7000".into(), 999_000);
        assert_eq!(proofs.check(proof, 1000.0), Some("DdqniT5wvMBOfT8n"));
        let (name, value) = proofs.reply("DdqniT5wvMBOfT8n");
        assert_eq!(name, "x-groupcache-proof");
        assert!(matches!(value, Value::Text(t) if t == "kytBwURNiUPkPsJGS1-5wudhZReYgecf"));
        assert_eq!(proofs.check(proof, 1061.0), None); // outside the window
        assert_eq!(proofs.check(&proof.replace(".r.", ".w."), 1000.0), None); // scope is signed
        let elsewhere = Proofs::new(&key, "127.0.0.1:7001".into(), 999_000);
        assert_eq!(elsewhere.check(proof, 1000.0), None); // made for another address
        let later = Proofs::new(&key, "127.0.0.1:7000".into(), 1_000_001);
        assert_eq!(later.check(proof, 1000.0), None); // made before we listened
    }

    #[test]
    fn a_forward_is_served_with_our_proof_or_left_to_python() {
        let (hits, g) = hits_with("g", "k");
        let get = request("g", "k");
        let marked = headers(&[("x-groupcache-forwarded", "1")]);
        assert!(hits.answer(&get, &facts(&marked, &[])).is_none()); // Python has not said how yet
        *hits.peers.write().unwrap() = Some(None); // no cluster token: the marker is enough
        let (_, trailers) = hits.answer(&get, &facts(&marked, &[])).unwrap();
        assert!(trailers.is_empty());
        assert_eq!(g.take().server_requests, 1);
        *hits.peers.write().unwrap() = Some(Some(Arc::new(Proofs::new(b"key", "a:1".into(), 0))));
        assert!(hits.answer(&get, &facts(&marked, &[])).is_none()); // no proof: Python's
        let bad = headers(&[
            ("x-groupcache-forwarded", "1"),
            ("authorization", "GC-Proof 1.n.r.wrong"),
        ]);
        assert!(hits.answer(&get, &facts(&bad, &[])).is_none());
    }

    #[test]
    fn a_getmany_is_answered_only_when_every_key_hits_within_the_limits() {
        let (hits, g) = hits_with("g", "k");
        let many = |keys: &[&str]| {
            let mut out = vec![0x0a, 1, b'g'];
            for k in keys {
                out.extend_from_slice(&[0x12, k.len() as u8]);
                out.extend_from_slice(k.as_bytes());
            }
            out
        };
        let none = http::HeaderMap::new();
        let plain = facts(&none, &[]);
        let (reply, trailers) = hits.answer_many(&many(&["k", "k"]), &plain).unwrap();
        assert!(trailers.is_empty());
        // "framed" stored unframed (offset 0): field 2 with its own length.
        let one = [&[0x0a, 11, 0x0a, 1, b'k', 0x12, 6][..], b"framed"].concat();
        assert_eq!(&reply[..], [one.clone(), one].concat());
        assert_eq!(g.take().gets, 2);
        assert!(hits.answer_many(&many(&["k", "miss"]), &plain).is_none());
        assert_eq!(g.take().gets, 0); // nothing counted: Python serves it
        assert!(hits.answer_many(&many(&["k"; 5]), &plain).is_none()); // over max_keys
        assert!(hits.answer_many(&many(&["k", ""]), &plain).is_none()); // an invalid key
                                                                        // 4 x (1 + 24) + 4 x 6 = 124 bytes fits 200; a bigger entry does not.
        g.main
            .lock()
            .unwrap()
            .set(b"k", Bytes::from(vec![0; 60]), 0.0, 0, 0.0);
        assert!(hits.answer_many(&many(&["k"; 4]), &plain).is_none());
    }

    #[test]
    fn a_forwarded_getmany_is_served_as_a_forwarded_get_is() {
        let (hits, g) = hits_with("g", "k");
        let many = [&[0x0a, 1, b'g'][..], &[0x12, 1, b'k', 0x12, 1, b'k']].concat();
        let marked = headers(&[("x-groupcache-forwarded", "1")]);
        assert!(hits.answer_many(&many, &facts(&marked, &[])).is_none()); // peers not told yet
        *hits.peers.write().unwrap() = Some(None);
        let (_, trailers) = hits.answer_many(&many, &facts(&marked, &[])).unwrap();
        assert!(trailers.is_empty());
        let counted = g.take();
        assert_eq!((counted.gets, counted.server_requests), (2, 2)); // as lookup(key, forwarded)
        *hits.peers.write().unwrap() = Some(Some(Arc::new(Proofs::new(b"key", "a:1".into(), 0))));
        assert!(hits.answer_many(&many, &facts(&marked, &[])).is_none()); // no proof: Python's
        let proofs = Proofs::new(b"key", "a:1".into(), 0);
        let (authorization, _) = proofs.make("a:1", "r").unwrap();
        let proven = headers(&[
            ("x-groupcache-forwarded", "1"),
            ("authorization", authorization.as_str()),
        ]);
        let (_, trailers) = hits.answer_many(&many, &facts(&proven, &[])).unwrap();
        assert_eq!(trailers.len(), 1);
        assert_eq!(trailers[0].0, "x-groupcache-proof");
        g.take();
        // A peer's batch (CACHED_ONLY): what is held, NOT_CACHED for the rest, nothing loaded.
        let with_miss = [&[0x0a, 1, b'g'][..], &[0x12, 1, b'k', 0x12, 1, b'm']].concat();
        let (authorization, _) = proofs.make("a:1", "r").unwrap();
        let batch = headers(&[
            ("x-groupcache-forwarded", "1"),
            (CACHED_ONLY, "1"),
            ("authorization", authorization.as_str()),
        ]);
        let (reply, _) = hits.answer_many(&with_miss, &facts(&batch, &[])).unwrap();
        let miss = [0x0a, 5, 0x0a, 1, b'm', 0x18, NOT_CACHED as u8];
        assert!(reply.ends_with(&miss), "{reply:?}");
        let counted = g.take();
        assert_eq!((counted.gets, counted.server_requests), (1, 1)); // the miss comes again alone
                                                                     // Without the peer's marker the header means nothing: a miss is Python's.
        let plain = headers(&[(CACHED_ONLY, "1")]);
        assert!(hits.answer_many(&with_miss, &facts(&plain, &[])).is_none());
    }
}
