//! The demo cluster's mappings as randport would decide them: pods, allocator and planner
//! from `randport-core`, no kernel involved. Shown by `randport-sim demo` until the
//! namespace simulator runs the real agent, and used by tests to load realistic rulesets.

use std::fmt::Write as _;
use std::net::IpAddr;

use randport_core::annotation::encode;
use randport_core::render::nft;
use randport_core::{
    ContainerPort, HostPortAllocator, PlanError, PodRef, PortRange, Protocol, ReservedPorts,
    SandboxId, SandboxRecord, SandboxRequest, plan,
};

use crate::addresses;

/// One simulated node's decisions.
#[derive(Debug, Clone)]
pub struct NodePreview {
    /// Node name, `node-<i>`.
    pub name: String,
    /// Its underlay address.
    pub ip: IpAddr,
    /// One record per pod sandbox.
    pub records: Vec<SandboxRecord>,
}

/// The demo pods' ports: a TCP and a UDP echo port.
fn demo_ports() -> Vec<ContainerPort> {
    vec![
        ContainerPort::new("echo", 8080, Protocol::Tcp),
        ContainerPort::new("echo", 8081, Protocol::Udp),
    ]
}

/// Plans `nodes` x `pods` annotated pods, IPv4 (and IPv6 with `ipv6`), each node with its
/// own allocator over `range`.
pub fn cluster(
    nodes: usize,
    pods: usize,
    range: PortRange,
    ipv6: bool,
    seed: u64,
) -> Result<Vec<NodePreview>, PlanError> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..nodes)
        .map(|node| {
            let mut alloc = HostPortAllocator::new(range, ReservedPorts::none());
            let records = (0..pods)
                .map(|pod| {
                    let (v4, v6) = addresses::pod_ips(node, pod);
                    let mut pod_ips = vec![IpAddr::V4(v4)];
                    if ipv6 {
                        pod_ips.push(IpAddr::V6(v6));
                    }
                    let request = SandboxRequest {
                        pod: PodRef::new("demo", format!("echo-{node}-{pod}")),
                        sandbox: SandboxId(format!("sandbox-{node}-{pod}")),
                        pod_ips,
                        ports: demo_ports(),
                        mapping_requested: true,
                        leave_explicit: false,
                    };
                    let mappings = plan(&request, &mut alloc, &mut rng, |_, _| true)?;
                    Ok(SandboxRecord {
                        network: None,
                        sandbox: request.sandbox,
                        pod: request.pod,
                        pod_ips: request.pod_ips,
                        mappings,
                    })
                })
                .collect::<Result<Vec<_>, PlanError>>()?;
            Ok(NodePreview {
                name: format!("node-{node}"),
                ip: addresses::node_ipv4(node).into(),
                records,
            })
        })
        .collect()
}

/// The table `randport-sim demo` prints: pod, node, container port, node address.
pub fn table(nodes: &[NodePreview]) -> String {
    let mut out = format!(
        "{:<18} {:<8} {:<12}    {}\n",
        "POD", "NODE", "PORT", "NODE ADDRESS"
    );
    for node in nodes {
        for record in &node.records {
            for m in &record.mappings {
                let port = format!("{}/{}", m.container_port, m.protocol);
                let _ = writeln!(
                    out,
                    "{:<18} {:<8} {:<12} -> {}:{}",
                    record.pod.to_string(),
                    node.name,
                    port,
                    node.ip,
                    m.host_port
                );
            }
        }
    }
    out
}

/// Each pod's annotation value, as the agent would write it.
pub fn annotations(nodes: &[NodePreview]) -> Vec<(PodRef, String)> {
    nodes
        .iter()
        .flat_map(|n| n.records.iter())
        .map(|r| (r.pod.clone(), encode(&r.annotation_entries())))
        .collect()
}

/// Node `node`'s whole nft table.
pub fn ruleset(node: &NodePreview) -> String {
    nft::ruleset(nft::DEFAULT_TABLE, &node.records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use randport_core::annotation::{AnnotationValue, decode};
    use std::collections::HashSet;

    #[test]
    fn demo_cluster_maps_every_port_once_per_node() {
        let nodes = cluster(2, 3, PortRange::DEFAULT, true, 42).unwrap();
        assert_eq!(nodes.len(), 2);
        for node in &nodes {
            let mut seen = HashSet::new();
            for r in &node.records {
                assert_eq!(r.mappings.len(), 2);
                for m in &r.mappings {
                    assert!(PortRange::DEFAULT.contains(m.host_port));
                    assert!(
                        seen.insert((m.protocol, m.host_port)),
                        "{} twice",
                        m.host_port
                    );
                }
            }
        }
        let table = table(&nodes);
        assert_eq!(table.lines().count(), 1 + 12);
        assert!(
            table.contains("demo/echo-1-2")
                && table.contains("8081/UDP")
                && table.contains("-> 192.0.2.2:")
        );
    }

    #[test]
    fn annotations_decode_to_the_planned_ports() {
        let nodes = cluster(1, 2, PortRange::new(20000, 20003).unwrap(), false, 1).unwrap();
        for ((pod, text), record) in annotations(&nodes).iter().zip(&nodes[0].records) {
            let AnnotationValue::Mapped(entries) = decode(pod, text).unwrap() else {
                panic!("{text}")
            };
            let ports: Vec<u16> = entries.iter().map(|e| e.host_port).collect();
            let planned: Vec<u16> = record.mappings.iter().map(|m| m.host_port).collect();
            assert_eq!(ports, planned);
            assert_eq!(entries[0].pod_ip, Some(record.pod_ips[0]));
        }
    }

    #[test]
    fn a_small_range_runs_out_with_the_planners_error() {
        // Five ports per protocol: the sixth pod finds no TCP port.
        assert!(cluster(1, 5, PortRange::new(20000, 20004).unwrap(), false, 1).is_ok());
        let err = cluster(1, 6, PortRange::new(20000, 20004).unwrap(), false, 1).unwrap_err();
        assert!(
            err.to_string()
                .contains("no free TCP host port in range 20000-20004"),
            "{err}"
        );
    }
}
