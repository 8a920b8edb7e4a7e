//! Coarse clocks for the relay's hot path.
//!
//! A session publishes the time of each state change (for `/v1/sessions` and the busy list of
//! a pause) and checks whether its counters are due for a flush: three clock reads per
//! transaction. Through `std::time` each cost ~75 instructions (the vDSO reads the TSC, then
//! `Timespec` arithmetic), about 5 % of the relay's work per transaction (callgrind,
//! 2026-12-03). The kernel's coarse clocks return the time of the last tick (1–4 ms old)
//! without reading the TSC, which is precise enough for both uses.

/// Milliseconds since the UNIX epoch, to within a clock tick.
pub fn coarse_wall_ms() -> u64 {
    #[cfg(target_os = "linux")]
    {
        read(libc::CLOCK_REALTIME_COARSE)
    }
    #[cfg(not(target_os = "linux"))]
    {
        std::time::SystemTime::now()
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// Milliseconds on a monotonic clock with an arbitrary origin, to within a clock tick.
pub fn coarse_monotonic_ms() -> u64 {
    #[cfg(target_os = "linux")]
    {
        read(libc::CLOCK_MONOTONIC_COARSE)
    }
    #[cfg(not(target_os = "linux"))]
    {
        use std::sync::OnceLock;
        static ORIGIN: OnceLock<std::time::Instant> = OnceLock::new();
        ORIGIN
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_millis() as u64
    }
}

#[cfg(target_os = "linux")]
fn read(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; clock_gettime only writes it.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64) * 1000 + (ts.tv_nsec as u64) / 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coarse_clocks_agree_with_std_within_a_tick() {
        let std_ms = std::time::SystemTime::now()
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let coarse = coarse_wall_ms();
        assert!(std_ms.abs_diff(coarse) < 50, "{std_ms} vs {coarse}");
        let a = coarse_monotonic_ms();
        std::thread::sleep(std::time::Duration::from_millis(30));
        let b = coarse_monotonic_ms();
        assert!((20..1000).contains(&(b - a)), "{a} then {b}");
    }
}
