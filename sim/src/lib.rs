//! randport-sim: simulated nodes and pods for randport, on the real kernel.
//!
//! - [`cluster`]: nodes, pods, an outside client and an underlay in network namespaces,
//!   one real `randportd` per node, the real `randport` plugin driven as a runtime would.
//! - [`bench`]: randport against the CNI portmap plugin, on simulated nodes.
//! - [`checks`]: what the demo verifies with traffic.
//! - [`workload`]: the echo server in every pod.
//! - [`netns`]: namespaces and their links, addresses and routes over rtnetlink, entered on
//!   dedicated threads.
//! - [`down`]: cleanup of runs that crashed.
//! - [`addresses`]: the address plan (documentation and benchmarking ranges only).
//! - [`preview`]: the mappings randport-core decides, without a kernel.
//! - [`scale`]: the simulator at cluster size (build, check, delete a share, teardown, rates).

pub mod addresses;
pub mod bench;
pub mod checks;
pub mod cluster;
pub mod down;
pub mod netns;
pub mod preview;
pub mod scale;
pub mod workload;
