//! randport-core: everything randport decides, as pure functions of their inputs.
//!
//! This crate does no I/O and knows no Kubernetes types. The agent in `randport-plugin`
//! feeds it plain data (a pod's ports, the node's allocations, the port range) and applies
//! what it returns (mappings, nftables or iptables-restore text, annotation JSON) in one step.
//!
//! - [`annotation`]: the `tkestack.io/portmapping` value, byte-compatible with galaxy.
//! - [`range`]: the host port range and the node's reserved ports.
//! - [`allocator`]: random free host ports per (protocol, hostIP).
//! - [`planner`]: from a pod's ports to the mappings to create.
//! - [`render`]: nftables and iptables-restore text for the mappings.
//! - [`examples`]: example sandboxes for tests, benches and docs.
//! - [`model`]: pods, sandboxes, mappings and the per-sandbox record the agent persists.
//! - [`wire`]: the requests the plugin sends the agent and its answers (serde types).

pub mod allocator;
pub mod annotation;
pub mod cni_code;
pub mod examples;
pub mod model;
pub mod planner;
pub mod range;
pub mod render;
pub mod wire;

pub use allocator::{AllocError, HostPortAllocator, PortKey};
pub use annotation::{AnnotationError, AnnotationValue, PortEntry};
pub use cni_code::CniCode;
pub use model::{
    ContainerPort, IpFamily, Mapping, PodRef, Protocol, SandboxId, SandboxRecord, SandboxRequest,
};
pub use planner::{PlanError, plan};
pub use range::{PortRange, RangeError, ReservedPorts};

/// The annotation key galaxy uses, and randport's default.
pub const DEFAULT_ANNOTATION: &str = "tkestack.io/portmapping";
