//! Per-client token buckets (`[ops] rate_limit`), the rule of
//! appliance/node/ratelimit.py's TokenBuckets: Python and the hit path
//! charge the same buckets, so a client's rate is one rate whichever
//! answers it.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

pub struct Buckets {
    pub rate: f64,
    pub burst: f64,
    pub max_clients: usize,
    /// key -> (tokens, last refill)
    buckets: Mutex<HashMap<Box<str>, (f64, f64)>>,
}

impl Buckets {
    pub fn new(rate: f64, burst: f64, max_clients: usize) -> Result<Buckets, &'static str> {
        if rate.is_nan() || burst.is_nan() || rate <= 0.0 || burst < 1.0 {
            return Err("rate must be > 0 and burst >= 1");
        }
        Ok(Buckets {
            rate,
            burst,
            max_clients,
            buckets: Mutex::new(HashMap::new()),
        })
    }

    /// 0.0 when the call may go ahead, charged `cost` tokens; else the
    /// seconds until it may. A call costing more than the burst goes ahead
    /// on one token and leaves the bucket in debt (as Python's take).
    pub fn take(&self, key: &str, cost: f64, now: f64) -> f64 {
        let mut buckets = self.buckets.lock().unwrap();
        let Some(bucket) = buckets.get_mut(key) else {
            if buckets.len() >= self.max_clients {
                self.sweep(&mut buckets, now);
            }
            buckets.insert(key.into(), (self.burst - cost, now));
            return 0.0;
        };
        let tokens = self.burst.min(bucket.0 + (now - bucket.1) * self.rate);
        bucket.1 = now;
        if tokens >= 1.0 {
            bucket.0 = tokens - cost;
            return 0.0;
        }
        bucket.0 = tokens;
        (1.0 - tokens) / self.rate
    }

    /// A full bucket is the same as no bucket: drop those. If every client
    /// is active, forget them all rather than grow without bound.
    fn sweep(&self, buckets: &mut HashMap<Box<str>, (f64, f64)>, now: f64) {
        buckets.retain(|_, (tokens, last)| *tokens + (now - *last) * self.rate < self.burst);
        if buckets.len() >= self.max_clients {
            buckets.clear();
        }
    }

    pub fn len(&self) -> usize {
        self.buckets.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The IP address in a gRPC peer string ("ipv4:1.2.3.4:5678",
/// "ipv6:[::1]:5678"), as ratelimit.client_address reads it.
pub fn client_address(peer: &str) -> &str {
    match peer.split_once(':') {
        Some(("ipv4" | "ipv6", rest)) => rest
            .rsplit_once(':')
            .map_or("", |(host, _)| host)
            .trim_matches(|c| c == '[' || c == ']'),
        _ => peer,
    }
}

/// What the hit path charges: the shared buckets, and the ring members'
/// addresses, whose forwarded calls are free (RateLimiter.admit).
pub struct Limit {
    pub buckets: std::sync::Arc<Buckets>,
    pub trusted: HashSet<String>,
}

impl Limit {
    /// Whether a call from `peer` costing `cost` may be answered now.
    pub fn admit(&self, peer: &str, forwarded: bool, cost: f64, now: f64) -> bool {
        let client = client_address(peer);
        (forwarded && self.trusted.contains(client)) || self.buckets.take(client, cost, now) == 0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let b = Buckets::new(10.0, 3.0, 100).unwrap();
        for _ in 0..3 {
            assert_eq!(b.take("a", 1.0, 0.0), 0.0);
        }
        assert!((b.take("a", 1.0, 0.0) - 0.1).abs() < 1e-9);
        assert_eq!(b.take("b", 1.0, 0.0), 0.0); // its own bucket
        assert_eq!(b.take("a", 1.0, 0.1), 0.0); // one token back after 1/rate
        assert!(b.take("a", 1.0, 0.1) > 0.0);
    }

    #[test]
    fn a_costly_call_goes_ahead_in_debt() {
        let b = Buckets::new(10.0, 3.0, 100).unwrap();
        assert_eq!(b.take("a", 5.0, 0.0), 0.0); // burst 3 - 5 = -2
        assert!((b.take("a", 1.0, 0.0) - 0.3).abs() < 1e-9); // 3 tokens to pay back first
        assert_eq!(b.take("a", 1.0, 0.3), 0.0);
    }

    #[test]
    fn full_buckets_are_swept_at_the_cap() {
        let b = Buckets::new(1.0, 2.0, 2).unwrap();
        b.take("a", 1.0, 0.0);
        b.take("b", 1.0, 0.0);
        b.take("c", 1.0, 5.0); // a and b are full again by now: dropped
        assert_eq!(b.len(), 1);
        b.take("d", 1.0, 5.0);
        b.take("e", 1.0, 5.0); // c and d are both active: all forgotten
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(Buckets::new(0.0, 3.0, 1).is_err());
        assert!(Buckets::new(1.0, 0.5, 1).is_err());
        assert!(Buckets::new(f64::NAN, 3.0, 1).is_err());
    }

    #[test]
    fn client_addresses_read_as_python_reads_them() {
        assert_eq!(client_address("ipv4:127.0.0.1:5678"), "127.0.0.1");
        assert_eq!(client_address("ipv6:[::1]:5678"), "::1");
        assert_eq!(client_address("unix:/tmp/s"), "unix:/tmp/s");
    }

    #[test]
    fn ring_members_forward_free_and_nobody_else() {
        let buckets = std::sync::Arc::new(Buckets::new(1.0, 1.0, 10).unwrap());
        let limit = Limit {
            buckets,
            trusted: ["10.0.0.2".to_string()].into_iter().collect(),
        };
        for _ in 0..5 {
            assert!(limit.admit("ipv4:10.0.0.2:1", true, 1.0, 0.0));
        }
        assert!(limit.admit("ipv4:10.0.0.2:1", false, 1.0, 0.0));
        assert!(!limit.admit("ipv4:10.0.0.2:1", false, 1.0, 0.0));
        assert!(limit.admit("ipv4:10.0.0.3:1", true, 1.0, 0.0));
        assert!(!limit.admit("ipv4:10.0.0.3:1", true, 1.0, 0.0));
    }
}
