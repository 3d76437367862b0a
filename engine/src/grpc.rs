//! gRPC framing pieces that need no I/O: the length prefix, grpc-timeout,
//! grpc-message encoding.

use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};

/// The status codes the engine's server and client use (grpc's numbering).
pub const OK: u32 = 0;
pub const CANCELLED: u32 = 1;
pub const UNKNOWN: u32 = 2;
pub const DEADLINE_EXCEEDED: u32 = 4;
pub const NOT_FOUND: u32 = 5;
pub const PERMISSION_DENIED: u32 = 7;
pub const RESOURCE_EXHAUSTED: u32 = 8;
pub const UNIMPLEMENTED: u32 = 12;
pub const INTERNAL: u32 = 13;
pub const UNAVAILABLE: u32 = 14;
pub const UNAUTHENTICATED: u32 = 16;

/// grpc-message: percent-encode what is not printable ASCII, and '%'.
const MESSAGE: &AsciiSet = &CONTROLS.add(b'%');

pub fn encode_message(message: &str) -> String {
    utf8_percent_encode(message, MESSAGE).to_string()
}

/// The 5-byte message prefix: (compressed, length).
pub fn parse_prefix(prefix: &[u8; 5]) -> (bool, usize) {
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
    (prefix[0] != 0, len as usize)
}

pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(0);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// grpc-timeout ("100m", "5S", ...) in seconds; None when absent or bad.
pub fn parse_timeout(value: &str) -> Option<f64> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    let scale = match unit {
        "H" => 3600.0,
        "M" => 60.0,
        "S" => 1.0,
        "m" => 1e-3,
        "u" => 1e-6,
        "n" => 1e-9,
        _ => return None,
    };
    Some(n as f64 * scale)
}

/// grpc-timeout for a duration: at most 8 digits, in the finest unit that fits.
pub fn encode_timeout(t: std::time::Duration) -> String {
    let micros = t.as_micros().max(1);
    if micros < 100_000_000 {
        return format!("{micros}u");
    }
    let millis = t.as_millis();
    if millis < 100_000_000 {
        return format!("{millis}m");
    }
    format!("{}S", t.as_secs().min(99_999_999))
}

/// The peer string grpcio gives (`ipv4:1.2.3.4:5`, `ipv6:[::1]:5`).
pub fn peer_string(addr: &std::net::SocketAddr) -> String {
    match addr {
        std::net::SocketAddr::V4(a) => format!("ipv4:{}:{}", a.ip(), a.port()),
        std::net::SocketAddr::V6(a) => format!("ipv6:[{}]:{}", a.ip(), a.port()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_round_trip() {
        let framed = frame(b"hello");
        let prefix: [u8; 5] = framed[..5].try_into().unwrap();
        assert_eq!(parse_prefix(&prefix), (false, 5));
        assert_eq!(&framed[5..], b"hello");
    }

    #[test]
    fn prefix_reads_large_lengths_without_a_body() {
        // 50 MiB announced: the length is known from five bytes alone.
        let prefix = [0u8, 0x03, 0x20, 0x00, 0x00];
        assert_eq!(parse_prefix(&prefix), (false, 50 * 1024 * 1024));
        assert!(parse_prefix(&[1, 0, 0, 0, 0]).0);
    }

    #[test]
    fn timeouts() {
        assert_eq!(parse_timeout("100m"), Some(0.1));
        assert_eq!(parse_timeout("2S"), Some(2.0));
        assert_eq!(parse_timeout("1H"), Some(3600.0));
        assert_eq!(parse_timeout("5x"), None);
        assert_eq!(parse_timeout("m"), None);
        assert_eq!(parse_timeout("1234567890S"), None);
    }

    #[test]
    fn timeouts_encode_within_eight_digits() {
        use std::time::Duration;
        assert_eq!(encode_timeout(Duration::from_millis(250)), "250000u");
        assert_eq!(encode_timeout(Duration::ZERO), "1u");
        assert_eq!(encode_timeout(Duration::from_secs(3600)), "3600000m");
        assert_eq!(encode_timeout(Duration::from_secs(10_000_000)), "10000000S");
        for t in [1u64, 99, 100_000, 99_999_999_999] {
            let text = encode_timeout(Duration::from_millis(t));
            assert!(text.len() <= 9, "{text}");
            assert!(parse_timeout(&text).is_some(), "{text}");
        }
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(encode_message("a b"), "a b");
        assert_eq!(encode_message("100%"), "100%25");
        assert_eq!(encode_message("é\n"), "%C3%A9%0A");
    }

    #[test]
    fn peers_look_like_grpcio() {
        let v4: std::net::SocketAddr = "127.0.0.1:5".parse().unwrap();
        let v6: std::net::SocketAddr = "[::1]:6".parse().unwrap();
        assert_eq!(peer_string(&v4), "ipv4:127.0.0.1:5");
        assert_eq!(peer_string(&v6), "ipv6:[::1]:6");
    }
}
