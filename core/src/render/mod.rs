//! Rule rendering: what the node's firewall should hold, as text for one `nft -f` or one
//! `iptables-restore --noflush` run. Pure functions of the sandbox records.
//!
//! Both backends DNAT only traffic addressed to the node itself, and masquerade hairpin
//! traffic (a pod reaching its own mapping), and tag everything a sandbox owns with
//! [`SandboxId::tag`](crate::SandboxId::tag).

pub mod iptables;
pub mod nft;

use std::net::IpAddr;

use crate::model::{IpFamily, Mapping, SandboxRecord};

/// One DNAT a mapping needs: traffic to `host_ip` (or any local address) on `host_port`
/// goes to `pod_ip:container_port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dnat<'a> {
    pub mapping: &'a Mapping,
    pub pod_ip: IpAddr,
}

/// Every DNAT of a record, mapping by mapping, pod address by pod address.
pub(crate) fn dnats(record: &SandboxRecord) -> impl Iterator<Item = Dnat<'_>> {
    record.owned().flat_map(move |mapping| {
        mapping.targets(&record.pod_ips).map(move |ip| Dnat {
            mapping,
            pod_ip: *ip,
        })
    })
}

/// The pod addresses of a record that some mapping sends traffic to: the ones that need
/// hairpin masquerading.
pub(crate) fn hairpin_ips(record: &SandboxRecord) -> Vec<IpAddr> {
    record
        .pod_ips
        .iter()
        .filter(|ip| dnats(record).any(|d| d.pod_ip == **ip))
        .copied()
        .collect()
}

/// Whether `ip` is of `family`.
pub(crate) fn is(family: IpFamily, ip: &IpAddr) -> bool {
    IpFamily::of(ip) == family
}
