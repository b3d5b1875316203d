//! The checks the demo and the scenario tests run, each proven with traffic or with
//! what the agent reports.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use randport_core::Protocol;
use randport_core::annotation::PortEntry;

use crate::cluster::{Cluster, Origin};

/// One check and its result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// `Ok` or what went wrong.
    pub result: Result<(), String>,
}

impl Check {
    /// A check and its result.
    pub fn new(name: impl Into<String>, result: Result<(), String>) -> Self {
        Check {
            name: name.into(),
            result,
        }
    }

    /// A check that failed with `error`.
    pub fn failed(name: String, error: anyhow::Error) -> Self {
        Check::new(name, Err(format!("{error:#}")))
    }

    /// Whether it passed.
    pub fn ok(&self) -> bool {
        self.result.is_ok()
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.result {
            Ok(()) => write!(f, "ok    {}", self.name),
            Err(e) => write!(f, "FAIL  {}: {e}", self.name),
        }
    }
}

/// One mapping reached from somewhere.
#[derive(Debug, Clone)]
pub struct MappingRow {
    /// `namespace/name`.
    pub pod: String,
    /// The pod's node.
    pub node: String,
    /// The mapping, as written in the annotation.
    pub entry: PortEntry,
    /// The node address it was reached on.
    pub address: SocketAddr,
    /// What happened.
    pub check: Check,
}

/// Probes `addr` with the mapping's protocol from `origin` and expects `expected` back.
pub fn expect_answer(
    cluster: &Cluster,
    origin: Origin<'_>,
    protocol: Protocol,
    addr: SocketAddr,
    expected: &str,
) -> Result<(), String> {
    let answer = match protocol {
        Protocol::Tcp => cluster.tcp(origin, addr),
        Protocol::Udp => cluster.udp(origin, addr),
        Protocol::Sctp => return Err("SCTP is not probed by the simulator".into()),
    };
    match answer {
        Ok(name) if name == expected => Ok(()),
        Ok(name) => Err(format!("answered by {name:?}, not {expected:?}")),
        Err(e) => Err(format!("{e:#}")),
    }
}

/// From the outside client, every mapping of every pod, on each node address of the
/// mapping's family (or its hostIP): the right pod answers.
pub fn reach_every_mapping(cluster: &Cluster) -> Vec<MappingRow> {
    let mut rows = Vec::new();
    for pod in &cluster.pods {
        let node = &cluster.nodes[pod.spec.node];
        let entries = match cluster.mappings(&pod.spec.name) {
            Ok(entries) => entries,
            Err(e) => {
                rows.push(MappingRow {
                    pod: pod.spec.pod_ref().to_string(),
                    node: node.name.clone(),
                    entry: PortEntry {
                        host_port: 0,
                        container_port: 0,
                        protocol: Protocol::Tcp,
                        host_ip: None,
                        pod_name: pod.spec.name.clone(),
                        pod_ip: None,
                    },
                    address: SocketAddr::new(IpAddr::V4(node.ip4), 0),
                    check: Check::new(
                        format!("{} has mappings", pod.spec.pod_ref()),
                        Err(format!("{e:#}")),
                    ),
                });
                continue;
            }
        };
        for entry in entries {
            let addresses: Vec<IpAddr> = match entry.host_ip {
                Some(ip) => vec![ip],
                None => node
                    .ips()
                    .into_iter()
                    .filter(|ip| pod.ips.iter().any(|p| p.is_ipv6() == ip.is_ipv6()))
                    .collect(),
            };
            for ip in addresses {
                let address = SocketAddr::new(ip, entry.host_port);
                let name = format!(
                    "client -> {address}/{} reaches {}",
                    entry.protocol,
                    pod.spec.pod_ref()
                );
                let result = expect_answer(
                    cluster,
                    Origin::Client,
                    entry.protocol,
                    address,
                    &pod.spec.name,
                );
                rows.push(MappingRow {
                    pod: pod.spec.pod_ref().to_string(),
                    node: node.name.clone(),
                    entry: entry.clone(),
                    address,
                    check: Check::new(name, result),
                });
            }
        }
    }
    rows
}

fn first_mapping(
    cluster: &Cluster,
    pod: &str,
    protocol: Protocol,
) -> Result<(SocketAddr, String), String> {
    let entries = cluster.mappings(pod).map_err(|e| format!("{e:#}"))?;
    let entry = entries
        .iter()
        .find(|e| e.protocol == protocol)
        .ok_or_else(|| format!("pod {pod} has no {protocol} mapping"))?;
    let node = cluster.node_of(pod).map_err(|e| format!("{e:#}"))?;
    Ok((
        SocketAddr::new(
            entry.host_ip.unwrap_or(IpAddr::V4(node.ip4)),
            entry.host_port,
        ),
        pod.to_owned(),
    ))
}

/// A pod reaches its own mapping through its node's address (hairpin).
pub fn hairpin(cluster: &Cluster, pod: &str, protocol: Protocol) -> Check {
    let name = format!("{pod} reaches its own {protocol} mapping through its node (hairpin)");
    let result = first_mapping(cluster, pod, protocol).and_then(|(addr, expected)| {
        expect_answer(cluster, Origin::Pod(pod), protocol, addr, &expected)
    });
    Check::new(name, result)
}

/// Pod `from` reaches a mapping of pod `to`, on another node.
pub fn cross_node(cluster: &Cluster, from: &str, to: &str, protocol: Protocol) -> Check {
    let name = format!("{from} reaches {to}'s {protocol} mapping on another node");
    let result = first_mapping(cluster, to, protocol).and_then(|(addr, expected)| {
        expect_answer(cluster, Origin::Pod(from), protocol, addr, &expected)
    });
    Check::new(name, result)
}

/// Every pod's annotation says what its node's agent reports.
pub fn annotations_match_agents(cluster: &Cluster) -> Vec<Check> {
    let mut checks = Vec::new();
    for (i, node) in cluster.nodes.iter().enumerate() {
        let records = match cluster.agent_records(i) {
            Ok(records) => records,
            Err(e) => {
                checks.push(Check::new(
                    format!("{} agent lists its mappings", node.name),
                    Err(format!("{e:#}")),
                ));
                continue;
            }
        };
        for pod in cluster
            .pods
            .iter()
            .filter(|p| p.spec.node == i && p.spec.annotate)
        {
            let name = format!(
                "annotation of {} matches what randportd on {} reports",
                pod.spec.pod_ref(),
                node.name
            );
            let result = match (
                cluster.mappings(&pod.spec.name),
                records.iter().find(|r| r.sandbox == pod.sandbox),
            ) {
                (Ok(written), Some(record)) if written == record.annotation_entries() => Ok(()),
                (Ok(written), Some(record)) => Err(format!(
                    "written {written:?}, agent {:?}",
                    record.annotation_entries()
                )),
                (Ok(_), None) => Err("the agent has no record of this sandbox".into()),
                (Err(e), _) => Err(format!("{e:#}")),
            };
            checks.push(Check::new(name, result));
        }
        let live: std::collections::HashSet<_> = cluster.pods.iter().map(|p| &p.sandbox).collect();
        let orphans: Vec<_> = records
            .iter()
            .filter(|r| !live.contains(&r.sandbox))
            .collect();
        checks.push(Check::new(
            format!(
                "randportd on {} holds no mapping of a deleted pod",
                node.name
            ),
            if orphans.is_empty() {
                Ok(())
            } else {
                Err(format!("{} stale sandboxes", orphans.len()))
            },
        ));
    }
    checks
}

/// After pod deletion: each of its mappings refuses (TCP) or stays silent (UDP), and the
/// node no longer holds the port.
pub fn deleted_pod_is_gone(
    cluster: &Cluster,
    pod: &str,
    node: usize,
    entries: &[PortEntry],
) -> Vec<Check> {
    let mut checks = Vec::new();
    for entry in entries {
        let addr = SocketAddr::new(
            entry.host_ip.unwrap_or(IpAddr::V4(cluster.nodes[node].ip4)),
            entry.host_port,
        );
        let answered = match entry.protocol {
            Protocol::Tcp => cluster.tcp(Origin::Client, addr).ok(),
            Protocol::Udp => cluster.udp(Origin::Client, addr).ok(),
            Protocol::Sctp => None,
        };
        checks.push(Check::new(
            format!(
                "after deleting {pod}, {addr}/{} no longer answers",
                entry.protocol
            ),
            match answered {
                None => Ok(()),
                Some(who) => Err(format!("answered by {who:?}")),
            },
        ));
        checks.push(Check::new(
            format!(
                "after deleting {pod}, host port {}/{} is released on its node",
                entry.host_port, entry.protocol
            ),
            match cluster.port_free_on_node(node, entry.protocol, entry.host_port) {
                Ok(true) => Ok(()),
                Ok(false) => Err("still held".into()),
                Err(e) => Err(format!("{e:#}")),
            },
        ));
    }
    checks
}
