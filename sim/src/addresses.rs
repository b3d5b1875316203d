//! The address plan: the underlay is 192.0.2.0/24 (nodes from .1, the outside client at
//! .254; IPv6 2001:db8::/64), pods of node `i` live in the `i`-th /19 of 198.18.0.0/15
//! (IPv6 2001:db8:1:i::/64). Nothing else is ever addressed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Most nodes a plan can hold: 198.18.0.0/15 has 16 /19s.
pub const MAX_NODES: usize = 16;
/// Most pods a node can hold: a /19 less the network, node and broadcast addresses.
pub const MAX_PODS_PER_NODE: usize = 8189;

/// The underlay address of node `node` (0-based): 192.0.2.1, 192.0.2.2, ….
pub fn node_ipv4(node: usize) -> Ipv4Addr {
    assert!(node < MAX_NODES, "node index {node} out of the plan");
    Ipv4Addr::new(192, 0, 2, 1 + node as u8)
}

/// The underlay IPv6 address of node `node`: 2001:db8::1, 2001:db8::2, ….
pub fn node_ipv6(node: usize) -> Ipv6Addr {
    assert!(node < MAX_NODES, "node index {node} out of the plan");
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1 + node as u16)
}

/// The outside client's addresses.
pub fn client_ips() -> (Ipv4Addr, Ipv6Addr) {
    (
        Ipv4Addr::new(192, 0, 2, 254),
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0xfe),
    )
}

/// The first address of node `node`'s pod /19, as `u32`.
fn pod_base(node: usize) -> u32 {
    u32::from(Ipv4Addr::new(198, 18, 0, 0)) + (node as u32) * (1 << 13)
}

/// Node `node`'s pod subnet, e.g. `198.18.32.0/19` for node 1.
pub fn pod_subnet_v4(node: usize) -> (Ipv4Addr, u8) {
    assert!(node < MAX_NODES, "node index {node} out of the plan");
    (Ipv4Addr::from(pod_base(node)), 19)
}

/// The node's own address inside its pod subnet (the pods' gateway): the first host.
pub fn pod_gateway_v4(node: usize) -> Ipv4Addr {
    Ipv4Addr::from(pod_base(node) + 1)
}

/// The address of pod `pod` (0-based) on node `node`, and its IPv6 twin.
pub fn pod_ips(node: usize, pod: usize) -> (Ipv4Addr, Ipv6Addr) {
    assert!(
        node < MAX_NODES && pod < MAX_PODS_PER_NODE,
        "pod {node}/{pod} out of the plan"
    );
    let v4 = Ipv4Addr::from(pod_base(node) + 2 + pod as u32);
    let v6 = Ipv6Addr::new(0x2001, 0xdb8, 1, node as u16, 0, 0, 0, 2 + pod as u16);
    (v4, v6)
}

/// Whether `ip` is one the plan may use: 192.0.2.0/24, 198.18.0.0/15 or 2001:db8::/32.
pub fn in_plan(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            (o[0], o[1], o[2]) == (192, 0, 2) || (o[0] == 198 && (o[1] == 18 || o[1] == 19))
        }
        IpAddr::V6(v6) => v6.segments()[..2] == [0x2001, 0xdb8],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_follows_the_design() {
        assert_eq!(node_ipv4(0), Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!(pod_subnet_v4(1), (Ipv4Addr::new(198, 18, 32, 0), 19));
        assert_eq!(pod_subnet_v4(15), (Ipv4Addr::new(198, 19, 224, 0), 19));
        assert_eq!(pod_gateway_v4(1), Ipv4Addr::new(198, 18, 32, 1));
        assert_eq!(pod_ips(1, 0).0, Ipv4Addr::new(198, 18, 32, 2));
        assert_eq!(
            pod_ips(0, MAX_PODS_PER_NODE - 1).0,
            Ipv4Addr::new(198, 18, 31, 254)
        );
        assert_eq!(pod_ips(2, 3).1.to_string(), "2001:db8:1:2::5");
    }

    #[test]
    fn every_planned_address_is_in_the_allowed_ranges() {
        for node in 0..MAX_NODES {
            assert!(in_plan(node_ipv4(node).into()) && in_plan(node_ipv6(node).into()));
            for pod in [0, 1, MAX_PODS_PER_NODE - 1] {
                let (v4, v6) = pod_ips(node, pod);
                assert!(in_plan(v4.into()) && in_plan(v6.into()), "{v4} {v6}");
            }
        }
        let (c4, c6) = client_ips();
        assert!(in_plan(c4.into()) && in_plan(c6.into()));
        assert!(!in_plan("10.0.0.1".parse().unwrap()));
        assert!(!in_plan("198.20.0.1".parse().unwrap()));
        assert!(!in_plan("2001:db9::1".parse().unwrap()));
    }
}
