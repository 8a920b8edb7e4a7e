//! Starting a keyshift proxy for a test (filled in by the proxy work).
