//! randport-sim: simulated nodes and pods for randport.
//!
//! - [`addresses`]: the address plan every simulated cluster uses (documentation and
//!   benchmarking ranges only).
//! - [`preview`]: what randport decides for the demo cluster, computed with
//!   `randport-core` alone; the network-namespace simulator that runs the real agent and
//!   plugin builds on these.

pub mod addresses;
pub mod preview;
