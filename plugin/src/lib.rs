//! randport-plugin: the CNI plugin `randport` and the node agent `randportd`.
//!
//! Every kernel or API effect sits here, behind a small trait with a real implementation
//! and a recording fake; every decision is made by `randport-core`.
//!
//! - [`agent`]: ADD/DEL/CHECK/GC/STATUS/LIST, start-up recovery, firewall repair.
//! - [`rpc`]: the plugin-agent wire protocol; [`server`]: the agent's socket and HTTP.
//! - [`cni`]: the CNI side: environment, config, prevResult, error JSON.
//! - [`firewall`], [`holder`], [`conntrack`], [`state`], [`pods`]: the effects.
//! - [`metrics`]: Prometheus text; [`node_ports`]: the node's port sysctls.

pub mod agent;
pub mod cni;
pub mod conntrack;
pub mod firewall;
pub mod holder;
pub mod install;
#[cfg(feature = "kube")]
pub mod kube_pods;
#[cfg(feature = "kube")]
pub mod kubectl;
pub mod metrics;
pub mod netlink;
pub mod nft_elements;
pub mod node_ports;
pub mod offline;
pub mod pods;
pub mod removal;
pub mod rpc;
pub mod server;
pub mod state;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
