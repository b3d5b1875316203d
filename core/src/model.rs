//! The data randport works on: pods, sandboxes, container ports, mappings, and the
//! per-sandbox record the agent persists. Plain values with serde, no behaviour beyond
//! validation and small conversions.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::annotation::PortEntry;

/// A transport protocol a host port can be mapped for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// TCP, the default when a pod spec names none.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    /// All protocols, in a fixed order.
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// The Kubernetes spelling: `TCP`, `UDP`, `SCTP`.
    pub fn as_k8s(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    /// The IP protocol number (what nftables stores for an `inet_proto`).
    pub fn ip_number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// The lower-case spelling used by nft, iptables and CNI `portMappings`.
    pub fn as_lower(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_k8s())
    }
}

/// A protocol name that is not TCP, UDP or SCTP.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown protocol {0:?}: use TCP, UDP or SCTP")]
pub struct UnknownProtocol(pub String);

impl FromStr for Protocol {
    type Err = UnknownProtocol;

    /// Accepts any case (`TCP` from Kubernetes, `tcp` from CNI); the empty string is TCP,
    /// as the Kubernetes API defaults it.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "" | "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Ok(Protocol::Sctp),
            _ => Err(UnknownProtocol(s.to_owned())),
        }
    }
}

/// IPv4 or IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum IpFamily {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl IpFamily {
    /// The family of an address.
    pub fn of(ip: &IpAddr) -> IpFamily {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }
}

/// Which pod: namespace, name and uid.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PodRef {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Pod uid; empty when the runtime did not pass one.
    #[serde(default)]
    pub uid: String,
}

impl PodRef {
    /// A pod reference without a uid.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        PodRef {
            namespace: namespace.into(),
            name: name.into(),
            uid: String::new(),
        }
    }
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A pod sandbox (infra container) id: the key everything is owned by. A pod can get a
/// new sandbox before the old one's DEL arrives, so nothing is keyed by pod name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SandboxId(pub String);

impl SandboxId {
    /// A short, stable tag for this sandbox (16 hex digits of FNV-1a 64), used as the
    /// comment on every nft element and iptables rule it owns.
    pub fn short_hash(&self) -> String {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in self.0.as_bytes() {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("{hash:016x}")
    }

    /// The tag put on rules and elements: `sb:` and the short hash.
    pub fn tag(&self) -> String {
        format!("sb:{}", self.short_hash())
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One port of one container, as the pod spec declares it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerPort {
    /// Container name.
    pub container: String,
    /// The port the workload listens on inside the pod.
    pub container_port: u16,
    /// Protocol; TCP when the spec names none.
    pub protocol: Protocol,
    /// An explicit host port from the spec, mapped exactly.
    pub host_port: Option<u16>,
    /// A host IP from the spec: the mapping then answers only on that node address.
    pub host_ip: Option<IpAddr>,
}

impl ContainerPort {
    /// A TCP or UDP container port with neither hostPort nor hostIP.
    pub fn new(container: impl Into<String>, container_port: u16, protocol: Protocol) -> Self {
        ContainerPort {
            container: container.into(),
            container_port,
            protocol,
            host_port: None,
            host_ip: None,
        }
    }
}

/// What the planner needs to know about a new sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxRequest {
    /// The pod.
    pub pod: PodRef,
    /// The sandbox being added.
    pub sandbox: SandboxId,
    /// The pod's addresses from the main plugin's result, primary first.
    pub pod_ips: Vec<IpAddr>,
    /// Every container port of the pod, in container-then-port order.
    pub ports: Vec<ContainerPort>,
    /// Whether the pod carries the port-mapping annotation (random ports wanted).
    pub mapping_requested: bool,
    /// Whether explicit hostPorts are left to an earlier port mapper in the CNI chain
    /// (portmap): they are listed in the annotation but neither reserved, held nor given
    /// rules here, so that one port has one owner.
    pub leave_explicit: bool,
}

/// One host port mapped to a container port of one sandbox. A dual-stack pod has one
/// mapping serving both of its addresses.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Mapping {
    /// Container name.
    pub container: String,
    /// The node address the mapping answers on; `None` for all of the node's addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<IpAddr>,
    /// The host port.
    pub host_port: u16,
    /// The container port traffic is sent to.
    pub container_port: u16,
    /// Protocol.
    pub protocol: Protocol,
    /// True when the host port came from the pod spec rather than the allocator.
    #[serde(default)]
    pub explicit: bool,
    /// True for an explicit hostPort left to an earlier port mapper in the CNI chain: it is
    /// listed in the annotation (as galaxy does), and randport neither holds it nor has a
    /// rule for it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub delegated: bool,
}

impl Mapping {
    /// Whether randport itself maps this port (holds it, has its rules).
    pub fn owned(&self) -> bool {
        !self.delegated
    }

    /// The pod addresses this mapping sends traffic to: every pod address, or only those
    /// of the host IP's family when the mapping has a host IP.
    pub fn targets<'a>(&self, pod_ips: &'a [IpAddr]) -> impl Iterator<Item = &'a IpAddr> + 'a {
        let family = self.host_ip.as_ref().map(IpFamily::of);
        pod_ips
            .iter()
            .filter(move |ip| family.is_none_or(|f| f == IpFamily::of(ip)))
    }
}

/// Everything the agent knows about one sandbox's mappings; persisted one file each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxRecord {
    /// The sandbox that owns the mappings.
    pub sandbox: SandboxId,
    /// The pod it belongs to.
    pub pod: PodRef,
    /// The pod's addresses, primary first.
    pub pod_ips: Vec<IpAddr>,
    /// The mappings, in container-then-port order.
    pub mappings: Vec<Mapping>,
    /// The network (the conflist's `name`) whose ADD made it; a GC of another network
    /// leaves it alone. `None` in records of agents before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
}

impl SandboxRecord {
    /// The mappings randport itself maps (not those left to another plugin).
    pub fn owned(&self) -> impl Iterator<Item = &Mapping> {
        self.mappings.iter().filter(|m| m.owned())
    }

    /// The annotation entries for this sandbox, as galaxy writes them: one per mapping,
    /// with the first pod address the mapping sends traffic to as `podIP` (the primary
    /// address, unless the mapping's hostIP is of the other family).
    pub fn annotation_entries(&self) -> Vec<PortEntry> {
        self.mappings
            .iter()
            .map(|m| PortEntry {
                host_port: m.host_port,
                container_port: m.container_port,
                protocol: m.protocol,
                host_ip: m.host_ip,
                pod_name: self.pod.name.clone(),
                pod_ip: m.targets(&self.pod_ips).next().copied(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_parses_any_case_and_defaults_to_tcp() {
        assert_eq!("udp".parse::<Protocol>(), Ok(Protocol::Udp));
        assert_eq!("SCTP".parse::<Protocol>(), Ok(Protocol::Sctp));
        assert_eq!("".parse::<Protocol>(), Ok(Protocol::Tcp));
        let err = "icmp".parse::<Protocol>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown protocol \"icmp\": use TCP, UDP or SCTP"
        );
    }

    #[test]
    fn short_hash_is_stable_and_distinct() {
        let a = SandboxId("4f1c0a".into());
        assert_eq!(a.short_hash(), a.clone().short_hash());
        assert_eq!(a.short_hash().len(), 16);
        assert_ne!(a.short_hash(), SandboxId("4f1c0b".into()).short_hash());
        // FNV-1a 64 of the empty string is the offset basis.
        assert_eq!(SandboxId(String::new()).short_hash(), "cbf29ce484222325");
    }

    #[test]
    fn targets_follow_the_host_ip_family() {
        let ips: Vec<IpAddr> = vec![
            "198.18.0.5".parse().unwrap(),
            "2001:db8:1:1::5".parse().unwrap(),
        ];
        let mut m = Mapping {
            container: "web".into(),
            host_ip: None,
            host_port: 20000,
            container_port: 80,
            protocol: Protocol::Tcp,
            explicit: false,
            delegated: false,
        };
        assert_eq!(m.targets(&ips).count(), 2);
        m.host_ip = Some("2001:db8::1".parse().unwrap());
        assert_eq!(m.targets(&ips).collect::<Vec<_>>(), vec![&ips[1]]);
    }
}
