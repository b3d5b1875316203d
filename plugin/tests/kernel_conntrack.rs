//! Root-only: the ctnetlink flush deletes exactly the entries of one protocol, port and
//! (when given) address, in a fresh namespace; the `conntrack` tool agrees.

use std::net::UdpSocket;

use randport_core::{PortKey, Protocol};
use randport_itests::{TestNetns, root_and_tools_or_skip, test_netns};
use randport_plugin::netfilter::conntrack::{Conntrack, ConntrackTool, NetlinkConntrack};

/// Conntrack entries listed by the tool for UDP flows to `port` (and `dst`).
fn entries(ns: &randport_itests::Netns, port: u16, dst: Option<&str>) -> usize {
    let port = port.to_string();
    let mut args = vec!["-L", "-p", "udp", "--orig-port-dst", port.as_str()];
    if let Some(dst) = dst {
        args.extend(["--orig-dst", dst]);
    }
    let out = ns.out("conntrack", &args, "");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("udp"))
        .count()
}

fn flows(ns: &randport_itests::Netns, to: &[(&'static str, u16)]) {
    let to = to.to_vec();
    ns.inside(move || {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        for (ip, port) in to {
            socket.send_to(b"x", (ip, port)).unwrap();
        }
    });
}

/// A test namespace with 127.0.0.1 and 127.0.0.2 on its loopback that tracks connections
/// (a nat table makes it).
fn tracking_netns(purpose: &str) -> randport_itests::Netns {
    let ns = test_netns(purpose);
    ns.sh("ip", &["link", "set", "lo", "up"], "");
    ns.sh("ip", &["addr", "add", "127.0.0.2/8", "dev", "lo"], "");
    ns.sh(
        "nft",
        &["-f", "-"],
        &randport_core::render::nft::ruleset("randport", &[]),
    );
    ns
}

fn flush_removes_only_the_matching_entries(conntrack: impl Conntrack + Copy + 'static) {
    let ns = tracking_netns("ct");
    flows(
        &ns,
        &[
            ("127.0.0.1", 20001),
            ("127.0.0.2", 20001),
            ("127.0.0.1", 20002),
        ],
    );
    assert_eq!(entries(&ns, 20001, None), 2);
    assert_eq!(entries(&ns, 20002, None), 1);

    let one = PortKey::on(Protocol::Udp, Some("127.0.0.2".parse().unwrap()));
    ns.inside(move || conntrack.flush(one, 20001)).unwrap();
    assert_eq!(
        entries(&ns, 20001, Some("127.0.0.2")),
        0,
        "the host IP's entry stays"
    );
    assert_eq!(
        entries(&ns, 20001, Some("127.0.0.1")),
        1,
        "another address's entry went"
    );

    ns.inside(move || conntrack.flush(PortKey::any(Protocol::Tcp), 20001))
        .unwrap();
    assert_eq!(
        entries(&ns, 20001, None),
        1,
        "a TCP flush removed UDP entries"
    );
    ns.inside(move || conntrack.flush(PortKey::any(Protocol::Udp), 20001))
        .unwrap();
    assert_eq!(entries(&ns, 20001, None), 0);
    assert_eq!(entries(&ns, 20002, None), 1, "another port's entry went");
    // Nothing left to flush is fine.
    ns.inside(move || conntrack.flush(PortKey::any(Protocol::Udp), 20001))
        .unwrap();
}

/// After an ADD the flush keeps the flows whose replies come from the new pod (here the
/// address a flow was sent to, as nothing translates it): they already go through the
/// new mapping.
#[test]
fn netlink_flush_after_an_add_keeps_the_pods_own_flows() {
    if !root_and_tools_or_skip(
        "netlink_flush_after_an_add_keeps_the_pods_own_flows",
        &["conntrack", "nft"],
    ) {
        return;
    }
    let ns = tracking_netns("ct-keep");
    flows(&ns, &[("127.0.0.1", 20003), ("127.0.0.2", 20003)]);
    assert_eq!(entries(&ns, 20003, None), 2);
    // The pod's address with another port (an IP reused by a pod serving another port)
    // does not keep a flow.
    let other_port: std::net::SocketAddr = "127.0.0.1:20004".parse().unwrap();
    let pod: std::net::SocketAddr = "127.0.0.2:20003".parse().unwrap();
    ns.inside(move || {
        NetlinkConntrack.flush_stale(PortKey::any(Protocol::Udp), 20003, &[pod, other_port])
    })
    .unwrap();
    assert_eq!(
        entries(&ns, 20003, Some("127.0.0.2")),
        1,
        "the pod's flow went"
    );
    assert_eq!(
        entries(&ns, 20003, Some("127.0.0.1")),
        0,
        "a stale flow stayed"
    );
}

#[test]
fn netlink_flush_removes_only_the_matching_entries() {
    if root_and_tools_or_skip(
        "netlink_flush_removes_only_the_matching_entries",
        &["conntrack", "nft"],
    ) {
        flush_removes_only_the_matching_entries(NetlinkConntrack);
    }
}

#[test]
fn tool_flush_removes_only_the_matching_entries() {
    if root_and_tools_or_skip(
        "tool_flush_removes_only_the_matching_entries",
        &["conntrack", "nft"],
    ) {
        flush_removes_only_the_matching_entries(ConntrackTool);
    }
}
