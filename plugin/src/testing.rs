//! Test seams shared by the fakes: a [`Gate`] where a fake's call stops until the test
//! lets it go, to put a DEL (or anything else) between two steps of an ADD. Only with
//! `cfg(test)` or the `testing` feature.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// A point in a fake's call that can be closed: calls arriving while it is closed wait
/// there until it is opened. Open by default.
#[derive(Debug, Default)]
pub struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    closed: bool,
    /// Calls waiting at the gate now.
    waiting: usize,
    /// Calls that have arrived since the gate was last closed.
    arrived: usize,
}

impl Gate {
    fn state(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes the gate: the next calls wait at it.
    pub fn close(&self) {
        let mut state = self.state();
        state.closed = true;
        state.arrived = 0;
    }

    /// Opens the gate and lets every waiting call go on.
    pub fn open(&self) {
        self.state().closed = false;
        self.changed.notify_all();
    }

    /// Called by the fake: waits while the gate is closed.
    pub fn pass(&self) {
        let mut state = self.state();
        state.arrived += 1;
        if !state.closed {
            return;
        }
        state.waiting += 1;
        self.changed.notify_all();
        while state.closed {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.waiting -= 1;
    }

    /// Waits until `n` calls are stopped at the gate; false after `timeout`.
    pub fn wait_for_waiting(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.state();
        while state.waiting < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// How many calls arrived since the gate was last closed.
    pub fn arrived(&self) -> usize {
        self.state().arrived
    }
}
