//! randport-plugin: the CNI plugin `randport` and the node agent `randportd`.
//!
//! Every kernel or API effect sits here, behind a small trait with a real implementation
//! and a recording fake; every decision is made by `randport-core`.
//!
//! - [`node_ports`]: what the node's kernel says about ports (reserved ports, the
//!   ephemeral range), read from `/proc/sys`.

pub mod node_ports;
