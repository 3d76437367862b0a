"""Operations: Prometheus metrics, the HTTP read API, rate limiting."""
