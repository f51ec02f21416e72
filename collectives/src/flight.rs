//! What a communicator is doing right now, for error messages, and a hook for fault-injection
//! tests.
//!
//! [`FlightRecorder`]: every collective of a [`crate::tcp::TcpRing`] records its operation and
//! sequence number when it starts and ends, so that another thread (the rank's coordinator
//! monitor, when the job is aborted) can say which collective this rank was stuck in and for
//! how long. [`set_fault_hook`]: tests kill, stop or hang a rank at an exact point of a
//! collective (see `TESSERA_FAULT` in the rank crate).

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct FlightState {
    current: Option<(&'static str, u64, Instant)>,
    last: Option<(&'static str, u64, Instant)>,
}

/// The collective in flight and the last one completed; shared with other threads.
#[derive(Debug, Default)]
pub struct FlightRecorder {
    state: Mutex<FlightState>,
}

/// A snapshot of a [`FlightRecorder`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flight {
    /// The collective in progress: operation, sequence number, time in it.
    pub current: Option<(&'static str, u64, Duration)>,
    /// The last collective that returned (successfully or not), and how long ago.
    pub last: Option<(&'static str, u64, Duration)>,
}

impl FlightRecorder {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FlightState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn begin(&self, op: &'static str, seq: u64) {
        self.lock().current = Some((op, seq, Instant::now()));
    }

    pub(crate) fn end(&self) {
        let mut s = self.lock();
        if let Some((op, seq, _)) = s.current.take() {
            s.last = Some((op, seq, Instant::now()));
        }
    }

    pub fn snapshot(&self) -> Flight {
        let s = self.lock();
        Flight {
            current: s.current.map(|(op, seq, t)| (op, seq, t.elapsed())),
            last: s.last.map(|(op, seq, t)| (op, seq, t.elapsed())),
        }
    }
}

impl std::fmt::Display for Flight {
    /// "in all_reduce_f32 #57 for 9.8 s" or "between collectives (last: barrier #3, 0.2 s ago)".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.current, self.last) {
            (Some((op, seq, d)), _) => write!(f, "in {op} #{seq} for {:.1} s", d.as_secs_f64()),
            (None, Some((op, seq, d))) => write!(
                f,
                "between collectives (the last one, {op} #{seq}, ended {:.1} s ago)",
                d.as_secs_f64()
            ),
            (None, None) => write!(f, "before its first collective"),
        }
    }
}

/// A point of a collective where a fault-injection hook is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// A collective starts.
    Begin { op: &'static str, seq: u64 },
    /// The `frame`-th data frame (1-based) of a collective was written to rank r+1.
    FrameSent { op: &'static str, seq: u64, frame: usize },
}

type Hook = Box<dyn Fn(FaultPoint) + Send + Sync>;
static FAULT_HOOK: OnceLock<Hook> = OnceLock::new();

/// Installs the process's fault-injection hook (once; returns false if one was installed).
/// Only tests and `TESSERA_FAULT` use it; with no hook a point costs one atomic load.
pub fn set_fault_hook(hook: Box<dyn Fn(FaultPoint) + Send + Sync>) -> bool {
    FAULT_HOOK.set(hook).is_ok()
}

pub(crate) fn fault_point(p: FaultPoint) {
    if let Some(h) = FAULT_HOOK.get() {
        h(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recorder_says_what_is_in_flight_and_what_ended_last() {
        let r = FlightRecorder::new();
        assert_eq!(r.snapshot().to_string(), "before its first collective");
        r.begin("all_reduce_f32", 7);
        let s = r.snapshot();
        assert_eq!(s.current.map(|c| (c.0, c.1)), Some(("all_reduce_f32", 7)));
        assert!(s.to_string().starts_with("in all_reduce_f32 #7 for "), "{s}");
        r.end();
        let s = r.snapshot();
        assert!(s.current.is_none());
        assert!(s.to_string().contains("the last one, all_reduce_f32 #7, ended"), "{s}");
    }
}
