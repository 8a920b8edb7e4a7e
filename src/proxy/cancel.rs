//! Cancel keys. Each client gets keyshift's own (pid, secret) pair in BackendKeyData; a
//! CancelRequest carrying it is forwarded, on a new upstream connection, with the upstream
//! backend's real key. Upstream keys never reach clients, and a guessed key cancels nothing.

use std::sync::Arc;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

/// The upstream backend a client key stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamKey {
    pub pid: u32,
    pub secret: u32,
}

#[derive(Default)]
pub struct CancelMap {
    keys: DashMap<(u32, u32), UpstreamKey>,
}

impl CancelMap {
    /// Registers an upstream key and returns the fresh client-facing key for it.
    pub fn register(&self, upstream: UpstreamKey) -> (u32, u32) {
        loop {
            // Positive pids, as clients that print them expect.
            let key = (rand::random::<u32>() & 0x7fff_ffff, rand::random::<u32>());
            if let Entry::Vacant(v) = self.keys.entry(key) {
                v.insert(upstream);
                return key;
            }
        }
    }

    pub fn lookup(&self, pid: u32, secret: u32) -> Option<UpstreamKey> {
        self.keys.get(&(pid, secret)).map(|e| *e.value())
    }

    pub fn remove(&self, key: (u32, u32)) {
        self.keys.remove(&key);
    }

    /// Registers an upstream key; the client-facing key stays valid until the guard is
    /// dropped, however the session ends.
    pub fn register_guarded(self: &Arc<Self>, upstream: UpstreamKey) -> CancelKey {
        CancelKey {
            key: self.register(upstream),
            map: Arc::clone(self),
        }
    }
}

/// A client-facing cancel key, removed from the map on drop.
pub struct CancelKey {
    map: Arc<CancelMap>,
    key: (u32, u32),
}

impl CancelKey {
    pub fn key(&self) -> (u32, u32) {
        self.key
    }
}

impl Drop for CancelKey {
    fn drop(&mut self) {
        self.map.remove(self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_back() {
        let m = CancelMap::default();
        let up = UpstreamKey { pid: 42, secret: 7 };
        let k = m.register(up);
        assert_eq!(m.lookup(k.0, k.1), Some(up));
        assert_eq!(m.lookup(k.0, k.1.wrapping_add(1)), None);
        m.remove(k);
        assert_eq!(m.lookup(k.0, k.1), None);
        let m = Arc::new(m);
        let g = m.register_guarded(up);
        let k = g.key();
        assert_eq!(m.lookup(k.0, k.1), Some(up));
        drop(g);
        assert_eq!(m.lookup(k.0, k.1), None);
    }
}
