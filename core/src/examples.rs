//! Example sandboxes covering the shapes randport renders: one TCP port, several
//! containers with TCP and UDP, a hostIP, dual-stack IPv6 with SCTP. The snapshot tests,
//! the benches, the kernel checks in `randport-itests` and the docs all use these.

use std::net::IpAddr;

use crate::model::{Mapping, PodRef, Protocol, SandboxId, SandboxRecord};

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
}

fn mapping(container: &str, host_port: u16, container_port: u16, protocol: Protocol) -> Mapping {
    Mapping {
        container: container.into(),
        host_ip: None,
        host_port,
        container_port,
        protocol,
        explicit: false,
        delegated: false,
    }
}

fn record(name: &str, sandbox: &str, ips: &[&str], mappings: Vec<Mapping>) -> SandboxRecord {
    SandboxRecord {
        network: None,
        sandbox: SandboxId(sandbox.into()),
        pod: PodRef {
            namespace: "default".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
        },
        pod_ips: ips.iter().map(|t| ip(t)).collect(),
        mappings,
    }
}

/// One pod, one TCP port.
pub fn one_tcp() -> SandboxRecord {
    record(
        "web-0",
        "0a1b2c3d4e5f",
        &["198.18.0.5"],
        vec![mapping("web", 23817, 9040, Protocol::Tcp)],
    )
}

/// One pod, two containers, TCP and UDP ports (DNS on both protocols).
pub fn tcp_udp_containers() -> SandboxRecord {
    record(
        "app-0",
        "1b2c3d4e5f60",
        &["198.18.0.6"],
        vec![
            mapping("web", 20002, 80, Protocol::Tcp),
            mapping("web", 20003, 443, Protocol::Tcp),
            mapping("dns", 20004, 53, Protocol::Udp),
            mapping("dns", 20005, 53, Protocol::Tcp),
        ],
    )
}

/// An explicit hostPort bound to one node address.
pub fn host_ip() -> SandboxRecord {
    let mut m = mapping("web", 8080, 80, Protocol::Tcp);
    m.host_ip = Some(ip("192.0.2.1"));
    m.explicit = true;
    record("pinned-0", "2c3d4e5f6071", &["198.18.0.7"], vec![m])
}

/// A dual-stack pod: one host port for both families, and an SCTP port on one IPv6
/// node address only.
pub fn dual_stack() -> SandboxRecord {
    let mut sctp = mapping("diameter", 20006, 3868, Protocol::Sctp);
    sctp.host_ip = Some(ip("2001:db8::1"));
    record(
        "dual-0",
        "3d4e5f607182",
        &["198.18.0.8", "2001:db8:1:0::8"],
        vec![mapping("web", 20007, 80, Protocol::Tcp), sctp],
    )
}

/// All examples, in the order above.
pub fn all() -> Vec<SandboxRecord> {
    vec![one_tcp(), tcp_udp_containers(), host_ip(), dual_stack()]
}

/// `n` sandboxes of one TCP and one UDP port each, on consecutive pod addresses and host
/// ports from 20000: a node with `2 * n` mappings, for benches and load checks.
pub fn many(n: u16) -> Vec<SandboxRecord> {
    (0..n)
        .map(|i| {
            let pod_ip = IpAddr::from(
                u32::from_be_bytes([198, 18, 0, 0])
                    .wrapping_add(u32::from(i) + 2)
                    .to_be_bytes(),
            );
            SandboxRecord {
                network: None,
                sandbox: SandboxId(format!("sandbox-{i:05}")),
                pod: PodRef::new("load", format!("pod-{i}")),
                pod_ips: vec![pod_ip],
                mappings: vec![
                    mapping("app", 20000u16.wrapping_add(i), 8080, Protocol::Tcp),
                    mapping("app", 20000u16.wrapping_add(i), 8081, Protocol::Udp),
                ],
            }
        })
        .collect()
}
