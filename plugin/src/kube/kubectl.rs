//! `kubectl randport`: where a person reaches each pod. Reads the pods' port-mapping
//! annotations and their nodes' addresses, and prints, per mapping, the address to use
//! (`nodeAddress:hostPort`) and what it reaches; or, per node, the mappings in use. The
//! functions here are pure: the binary (`kubectl-randport`) fetches the objects.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use randport_core::annotation::{AnnotationValue, decode};
use randport_core::{PodRef, Protocol};
use serde::Serialize;

/// Which node address to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AddressType {
    /// ExternalIP, else InternalIP.
    #[default]
    Auto,
    /// ExternalIP only.
    External,
    /// InternalIP only.
    Internal,
}

/// The address of `node` of `kind`, if it has one.
pub fn node_address(node: &Node, kind: AddressType) -> Option<String> {
    let addresses = node.status.as_ref()?.addresses.as_ref()?;
    let find = |t: &str| {
        addresses
            .iter()
            .find(|a| a.type_ == t)
            .map(|a| a.address.clone())
    };
    match kind {
        AddressType::Auto => find("ExternalIP").or_else(|| find("InternalIP")),
        AddressType::External => find("ExternalIP"),
        AddressType::Internal => find("InternalIP"),
    }
}

/// One mapping of one pod, or a pod still waiting for its ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod.
    pub pod: String,
    /// Its node, once scheduled.
    pub node: Option<String>,
    /// `address:hostPort` to connect to (`[v6]:port` for IPv6); none while waiting.
    pub address: Option<String>,
    /// The host port.
    pub host_port: Option<u16>,
    /// The container port it reaches.
    pub container_port: Option<u16>,
    /// TCP, UDP or SCTP.
    pub protocol: Option<Protocol>,
    /// The pod address traffic goes to.
    pub pod_ip: Option<String>,
    /// The node address the mapping is bound to, when it is not all of them.
    pub host_ip: Option<String>,
    /// `mapped`, `waiting` (asked for, not written yet), or why the value is unusable.
    pub status: String,
}

/// The rows of the pods that carry annotation `key` (other pods are left out), pod by pod
/// in the order given, mapping by mapping.
pub fn rows(pods: &[Pod], nodes: &[Node], key: &str, kind: AddressType) -> Vec<Row> {
    let addresses: BTreeMap<String, Option<String>> = nodes
        .iter()
        .map(|n| (n.name_any(), node_address(n, kind)))
        .collect();
    let mut out = Vec::new();
    for pod in pods {
        let Some(value) = pod.annotations().get(key) else {
            continue;
        };
        let namespace = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        let node_address = node
            .as_ref()
            .and_then(|n| addresses.get(n).cloned().flatten());
        let base = Row {
            namespace: namespace.clone(),
            pod: name.clone(),
            node: node.clone(),
            address: None,
            host_port: None,
            container_port: None,
            protocol: None,
            pod_ip: None,
            host_ip: None,
            status: String::new(),
        };
        match decode(&PodRef::new(&namespace, &name), value) {
            Ok(AnnotationValue::Mapped(entries)) if !entries.is_empty() => {
                for e in entries {
                    let host = e
                        .host_ip
                        .map(|ip| ip.to_string())
                        .or_else(|| node_address.clone());
                    out.push(Row {
                        address: host.map(|h| join_host_port(&h, e.host_port)),
                        host_port: Some(e.host_port),
                        container_port: Some(e.container_port),
                        protocol: Some(e.protocol),
                        pod_ip: e.pod_ip.map(|ip| ip.to_string()),
                        host_ip: e.host_ip.map(|ip| ip.to_string()),
                        status: "mapped".into(),
                        ..base.clone()
                    });
                }
            }
            Ok(AnnotationValue::Mapped(_)) => out.push(Row {
                status: "no ports".into(),
                ..base
            }),
            Ok(_) => out.push(Row {
                status: "waiting".into(),
                ..base
            }),
            Err(e) => out.push(Row {
                status: format!("unreadable: {e}"),
                ..base
            }),
        }
    }
    out
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The rows as a table; `wide` adds the pod address, the bound node address and the status.
pub fn table(rows: &[Row], wide: bool) -> String {
    let mut out = String::new();
    let header = ["NAMESPACE", "POD", "NODE", "ADDRESS", "", "PORT"];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut cells = vec![
                r.namespace.clone(),
                r.pod.clone(),
                r.node.clone().unwrap_or_else(|| "<none>".into()),
                // The reason in short; `-o wide` and JSON have it whole.
                r.address.clone().unwrap_or_else(|| {
                    format!("<{}>", r.status.split(':').next().unwrap_or_default())
                }),
                if r.address.is_some() { "->" } else { "" }.into(),
                match (r.container_port, r.protocol) {
                    (Some(port), Some(protocol)) => format!("{port}/{protocol}"),
                    _ => String::new(),
                },
            ];
            if wide {
                cells.push(r.pod_ip.clone().unwrap_or_default());
                cells.push(r.host_ip.clone().unwrap_or_else(|| "*".into()));
                cells.push(r.status.clone());
            }
            cells
        })
        .collect();
    let mut header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    if wide {
        header.extend(["POD IP".into(), "HOST IP".into(), "STATUS".into()]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            cells
                .iter()
                .map(|c| c[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    for line in std::iter::once(&header).chain(&cells) {
        let text: Vec<String> = line
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        let _ = writeln!(out, "{}", text.join("  ").trim_end());
    }
    out
}

/// Mappings in use on one node, counted from its pods' annotations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeUse {
    /// The node.
    pub node: String,
    /// Its address (per `--address-type`).
    pub address: Option<String>,
    /// Annotated pods on it.
    pub pods: usize,
    /// Mappings, per protocol.
    pub tcp: usize,
    /// UDP mappings.
    pub udp: usize,
    /// SCTP mappings.
    pub sctp: usize,
    /// Annotated pods still waiting for their ports.
    pub waiting: usize,
}

/// Per node (every node, in name order), the mappings its pods' annotations hold.
pub fn node_use(pods: &[Pod], nodes: &[Node], key: &str, kind: AddressType) -> Vec<NodeUse> {
    let mut by_node: BTreeMap<String, NodeUse> = nodes
        .iter()
        .map(|n| {
            (
                n.name_any(),
                NodeUse {
                    node: n.name_any(),
                    address: node_address(n, kind),
                    pods: 0,
                    tcp: 0,
                    udp: 0,
                    sctp: 0,
                    waiting: 0,
                },
            )
        })
        .collect();
    let rows = rows(pods, nodes, key, kind);
    let mut counted = std::collections::BTreeSet::new();
    for row in rows {
        let Some(node) = row.node.as_ref().and_then(|n| by_node.get_mut(n)) else {
            continue;
        };
        if counted.insert((row.namespace.clone(), row.pod.clone())) {
            node.pods += 1;
        }
        match row.protocol {
            Some(Protocol::Tcp) => node.tcp += 1,
            Some(Protocol::Udp) => node.udp += 1,
            Some(Protocol::Sctp) => node.sctp += 1,
            None if row.status == "waiting" => node.waiting += 1,
            None => {}
        }
    }
    by_node.into_values().collect()
}

/// The node use as a table.
pub fn node_table(nodes: &[NodeUse]) -> String {
    let mut out = format!(
        "{:<24} {:<40} {:>5} {:>5} {:>5} {:>5} {:>8}\n",
        "NODE", "ADDRESS", "PODS", "TCP", "UDP", "SCTP", "WAITING"
    );
    for n in nodes {
        let _ = writeln!(
            out,
            "{:<24} {:<40} {:>5} {:>5} {:>5} {:>5} {:>8}",
            n.node,
            n.address.as_deref().unwrap_or("<none>"),
            n.pods,
            n.tcp,
            n.udp,
            n.sctp,
            n.waiting
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const KEY: &str = "tkestack.io/portmapping";

    fn node(name: &str, internal: &str, external: Option<&str>) -> Node {
        let mut addresses = vec![json!({"type": "InternalIP", "address": internal})];
        if let Some(e) = external {
            addresses.push(json!({"type": "ExternalIP", "address": e}));
        }
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "status": {"addresses": addresses}
        }))
        .unwrap()
    }

    fn pod(name: &str, node: Option<&str>, annotation: Option<&str>) -> Pod {
        let annotations = match annotation {
            Some(v) => json!({KEY: v}),
            None => json!({}),
        };
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop", "annotations": annotations},
            "spec": {"nodeName": node, "containers": []}
        }))
        .unwrap()
    }

    const MAPPED: &str = r#"[{"hostPort":23817,"containerPort":9376,"protocol":"TCP","podName":"web-0","podIP":"198.18.0.5"},{"hostPort":20001,"containerPort":53,"protocol":"UDP","hostIP":"2001:db8::1","podName":"web-0","podIP":"2001:db8:1::5"}]"#;

    fn fixture() -> (Vec<Pod>, Vec<Node>) {
        (
            vec![
                pod("web-0", Some("node-a"), Some(MAPPED)),
                pod("web-1", Some("node-b"), Some("")),
                pod("plain", Some("node-a"), None),
                pod("broken", Some("node-b"), Some("{nope")),
            ],
            vec![
                node("node-a", "192.0.2.1", Some("203.0.113.10")),
                node("node-b", "192.0.2.2", None),
            ],
        )
    }

    #[test]
    fn every_mapping_gets_the_address_a_person_connects_to() {
        let (pods, nodes) = fixture();
        let rows = rows(&pods, &nodes, KEY, AddressType::Auto);
        let summary: Vec<(&str, Option<&str>, &str)> = rows
            .iter()
            .map(|r| (r.pod.as_str(), r.address.as_deref(), r.status.as_str()))
            .collect();
        assert_eq!(summary[0], ("web-0", Some("203.0.113.10:23817"), "mapped"));
        // A mapping bound to one node address uses that address.
        assert_eq!(summary[1], ("web-0", Some("[2001:db8::1]:20001"), "mapped"));
        assert_eq!(summary[2], ("web-1", None, "waiting"));
        assert!(summary[3].2.starts_with("unreadable"), "{summary:?}");
        assert_eq!(rows.len(), 4, "the pod without the annotation is left out");
        // Internal addresses on request; none where a node has no address of that type.
        let internal = super::rows(&pods, &nodes, KEY, AddressType::Internal);
        assert_eq!(internal[0].address.as_deref(), Some("192.0.2.1:23817"));
        let external = super::rows(&pods, &nodes, KEY, AddressType::External);
        assert_eq!(external[0].address.as_deref(), Some("203.0.113.10:23817"));
        let web_b = pod(
            "web-2",
            Some("node-b"),
            Some(MAPPED.replace(",\"hostIP\":\"2001:db8::1\"", "").as_str()),
        );
        let external = super::rows(&[web_b], &nodes, KEY, AddressType::External);
        assert_eq!(external[0].address, None);
    }

    #[test]
    fn tables_and_json_say_the_same() {
        let (pods, nodes) = fixture();
        let rows = rows(&pods, &nodes, KEY, AddressType::Auto);
        let table = table(&rows, false);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("NAMESPACE  POD"), "{table}");
        let words = |line: &str| {
            line.split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            words(lines[1]),
            [
                "shop",
                "web-0",
                "node-a",
                "203.0.113.10:23817",
                "->",
                "9376/TCP"
            ],
            "{table}"
        );
        assert_eq!(
            words(lines[3]),
            ["shop", "web-1", "node-b", "<waiting>"],
            "{table}"
        );
        assert_eq!(
            words(lines[4]),
            ["shop", "broken", "node-b", "<unreadable>"],
            "{table}"
        );
        let wide = super::table(&rows, true);
        assert!(
            words(wide.lines().next().unwrap()).ends_with(&[
                "POD".to_owned(),
                "IP".to_owned(),
                "HOST".to_owned(),
                "IP".to_owned(),
                "STATUS".to_owned()
            ]),
            "{wide}"
        );
        assert!(wide.contains("not a galaxy port list"), "{wide}");
        assert!(wide.contains("198.18.0.5"), "{wide}");
        let json = serde_json::to_value(&rows).unwrap();
        assert_eq!(json[0]["address"], "203.0.113.10:23817");
        assert_eq!(json[0]["hostPort"], 23817);
        assert_eq!(json[0]["protocol"], "TCP");
        assert_eq!(json[2]["status"], "waiting");
    }

    #[test]
    fn node_use_counts_each_nodes_mappings() {
        let (pods, nodes) = fixture();
        let use_ = node_use(&pods, &nodes, KEY, AddressType::Auto);
        assert_eq!(use_.len(), 2);
        assert_eq!(
            (
                use_[0].node.as_str(),
                use_[0].pods,
                use_[0].tcp,
                use_[0].udp,
                use_[0].waiting
            ),
            ("node-a", 1, 1, 1, 0)
        );
        assert_eq!(
            (
                use_[1].node.as_str(),
                use_[1].pods,
                use_[1].tcp,
                use_[1].waiting
            ),
            ("node-b", 2, 0, 1)
        );
        let table = node_table(&use_);
        assert!(
            table.lines().nth(1).unwrap().starts_with("node-a"),
            "{table}"
        );
    }
}
