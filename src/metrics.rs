//! Prometheus metrics (stub, filled in by the proxy work).
