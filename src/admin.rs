//! Admin HTTP endpoint (stub, filled in by the proxy work).
