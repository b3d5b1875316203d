//! randport-plugin: the CNI plugin `randport`, the node agent `randportd` and the kubectl
//! plugin `kubectl-randport`.
//!
//! Every kernel or API effect sits here, behind a small trait with a real implementation
//! and a recording fake (behind the `testing` feature); every decision is made by
//! `randport-core`. One folder per concern, each importing only the ones below it
//! (ARCHITECTURE.md at the repository's root maps them):
//!
//! - [`cni`]: the plugin side: environment, config, prevResult, error JSON, and the DEL
//!   that removes a sandbox without the agent ([`cni::offline`]).
//! - [`agent`]: ADD/DEL/CHECK/GC/STATUS/LIST, start-up recovery and firewall repair; its
//!   socket and HTTP front doors ([`agent::server`]), the wire protocol ([`agent::rpc`]),
//!   metrics, and the one removal of a sandbox ([`agent::removal`]).
//! - [`kube`]: where pods come from and annotations go: the [`kube::pods::PodSource`]
//!   trait, its file store, the Kubernetes API source and the kubectl plugin's logic.
//! - [`node`]: the node's own things: port holds, the state store, the node's port
//!   settings, the CNI install.
//! - [`firewall`]: the nftables and iptables backends behind one trait.
//! - [`netfilter`]: netlink to netfilter: message framing, nftables element batches and
//!   dumps, ctnetlink conntrack flushes.

pub mod agent;
pub mod cni;
pub mod firewall;
pub mod kube;
pub mod netfilter;
pub mod node;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
