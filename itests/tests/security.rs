//! Root-only security scenarios on the simulator: who can reach a pod through a mapping,
//! who can talk to the agent, and where stale UDP flows go.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use randport_core::Protocol;
use randport_itests::root_or_skip;
use randport_sim::cluster::{Cluster, ClusterSpec, Origin, PodSpec, SimPort};

fn cluster(nodes: usize) -> Cluster {
    let spec = ClusterSpec {
        nodes,
        ..ClusterSpec::default()
    };
    Cluster::up(spec, &mut |_| {}).unwrap_or_else(|e| panic!("{e:#}"))
}

fn tcp_pod(name: &str) -> PodSpec {
    let mut spec = PodSpec::echo("sec", name, 0);
    spec.ports = vec![SimPort::new(8080, Protocol::Tcp)];
    spec
}

#[test]
fn only_traffic_addressed_to_the_node_is_translated() {
    if !root_or_skip("only_traffic_addressed_to_the_node_is_translated") {
        return;
    }
    let mut c = cluster(2);
    let port = c.add_pod(tcp_pod("a")).unwrap()[0].host_port;
    let node0 = IpAddr::V4(c.nodes[0].ip4);
    assert_eq!(
        c.tcp(Origin::Client, SocketAddr::new(node0, port)).unwrap(),
        "a"
    );
    // The client routes node 1's pod range through node 0: a packet to an address there,
    // on the mapped port, crosses node 0 without being translated to pod a.
    let (subnet, bits) = randport_sim::addresses::pod_subnet_v4(1);
    c.client
        .ip(&[
            "route",
            "add",
            &format!("{subnet}/{bits}"),
            "via",
            &node0.to_string(),
        ])
        .unwrap();
    let elsewhere = SocketAddr::new("198.18.32.200".parse().unwrap(), port);
    if let Ok(who) = c.tcp(Origin::Client, elsewhere) {
        assert_ne!(
            who, "a",
            "traffic routed through node 0 was sent to its pod"
        );
    }
}

#[test]
fn loopback_reaches_no_pod_but_the_node_address_does() {
    if !root_or_skip("loopback_reaches_no_pod_but_the_node_address_does") {
        return;
    }
    let mut c = cluster(1);
    let port = c.add_pod(tcp_pod("a")).unwrap()[0].host_port;
    let on_node = SocketAddr::new(IpAddr::V4(c.nodes[0].ip4), port);
    assert_eq!(
        c.tcp(Origin::Node(0), on_node).unwrap(),
        "a",
        "the node reaches its own mapping"
    );
    let loopback = SocketAddr::new("127.0.0.1".parse().unwrap(), port);
    assert!(
        c.tcp(Origin::Node(0), loopback).is_err(),
        "127.0.0.1:{port} reached a pod"
    );
    let loopback6 = SocketAddr::new("::1".parse().unwrap(), port);
    assert!(
        c.tcp(Origin::Node(0), loopback6).is_err(),
        "[::1]:{port} reached a pod"
    );
}

/// Makes the client send 127.0.0.0/8 out of its eth0 to node 0 (the CVE-2020-8558 path:
/// another host on the node's link addressing its loopback).
fn route_loopback_to_node0(c: &Cluster) {
    for sysctl in [
        "net.ipv4.conf.all.route_localnet=1",
        "net.ipv4.conf.eth0.route_localnet=1",
    ] {
        c.client.run_ok("sysctl", &["-qw", sysctl], "").unwrap();
    }
    c.client
        .ip(&["route", "del", "127.0.0.0/8", "dev", "lo", "table", "local"])
        .unwrap();
    let via = c.nodes[0].ip4.to_string();
    c.client
        .ip(&["route", "add", "127.0.0.0/8", "via", &via, "dev", "eth0"])
        .unwrap();
}

fn another_host_to_loopback_reaches_no_pod(firewall: &str) {
    let spec = ClusterSpec {
        nodes: 1,
        firewall: firewall.into(),
        ..ClusterSpec::default()
    };
    let mut c = Cluster::up(spec, &mut |_| {}).unwrap_or_else(|e| panic!("{e:#}"));
    let port = c.add_pod(tcp_pod("a")).unwrap()[0].host_port;
    route_loopback_to_node0(&c);
    // 127.0.0.2: the client keeps a local route for 127.0.0.1 itself.
    let loopback = SocketAddr::new("127.0.0.2".parse().unwrap(), port);
    // With the node's route_localnet off (the kernel's default), and on (kube-proxy's
    // iptables mode turns it on): never translated to the pod.
    for route_localnet in ["0", "1"] {
        c.nodes[0]
            .ns
            .run_ok(
                "sysctl",
                &[
                    "-qw",
                    &format!("net.ipv4.conf.all.route_localnet={route_localnet}"),
                ],
                "",
            )
            .unwrap();
        if let Ok(who) = c.tcp(Origin::Client, loopback) {
            panic!(
                "{firewall}, route_localnet={route_localnet}: another host reached pod {who} through 127.0.0.2:{port}"
            );
        }
    }
    c.nodes[0]
        .ns
        .run_ok("sysctl", &["-qw", "net.ipv4.conf.all.route_localnet=0"], "")
        .unwrap();
    // The node's own address still works for the client.
    let on_node = SocketAddr::new(IpAddr::V4(c.nodes[0].ip4), port);
    assert_eq!(c.tcp(Origin::Client, on_node).unwrap(), "a");
}

#[test]
fn another_host_sending_to_loopback_reaches_no_pod_nftables() {
    if !root_or_skip("another_host_sending_to_loopback_reaches_no_pod_nftables") {
        return;
    }
    another_host_to_loopback_reaches_no_pod("nftables");
}

#[test]
fn another_host_sending_to_loopback_reaches_no_pod_iptables() {
    if !root_or_skip("another_host_sending_to_loopback_reaches_no_pod_iptables") {
        return;
    }
    another_host_to_loopback_reaches_no_pod("iptables");
}

#[test]
fn the_agent_refuses_callers_other_than_root() {
    if !root_or_skip("the_agent_refuses_callers_other_than_root") {
        return;
    }
    let mut c = cluster(1);
    c.add_pod(tcp_pod("a")).unwrap();
    let before = c.agent_records(0).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&c.bins.agent)
        .arg("list")
        .arg("--socket")
        .arg(c.nodes[0].socket())
        .output()
        .expect("run setpriv (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "uid 65534 listed the mappings");
    assert!(stderr.contains("Permission denied"), "{stderr}");
    assert_eq!(c.agent_records(0).unwrap(), before);
}

#[test]
fn a_udp_flow_follows_its_host_port_to_the_new_pod() {
    if !root_or_skip("a_udp_flow_follows_its_host_port_to_the_new_pod") {
        return;
    }
    let mut c = cluster(1);
    let udp_pod = |name: &str| {
        let mut spec = PodSpec::echo("sec", name, 0);
        spec.ports = vec![SimPort {
            host_port: Some(25000),
            ..SimPort::new(8081, Protocol::Udp)
        }];
        spec
    };
    c.add_pod(udp_pod("old")).unwrap();
    // One client socket, one source port: the same conntrack tuple throughout.
    let socket = c
        .client
        .enter(|| UdpSocket::bind("0.0.0.0:40000").unwrap())
        .unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let target = SocketAddr::new(IpAddr::V4(c.nodes[0].ip4), 25000);
    let ask = |socket: &UdpSocket| -> Option<String> {
        let mut buf = [0u8; 64];
        for _ in 0..3 {
            socket.send_to(b"?", target).ok()?;
            if let Ok(n) = socket.recv(&mut buf) {
                return Some(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        None
    };
    assert_eq!(ask(&socket).as_deref(), Some("old"));
    c.delete_pod("old").unwrap();
    // Sent while no pod has the port: conntrack remembers an untranslated flow.
    assert_eq!(ask(&socket), None);
    c.add_pod(udp_pod("new")).unwrap();
    assert_eq!(
        ask(&socket).as_deref(),
        Some("new"),
        "the flow kept going where it went before the new mapping"
    );
}

#[test]
fn localhost_access_serves_the_node_and_no_other_host() {
    if !root_or_skip("localhost_access_serves_the_node_and_no_other_host") {
        return;
    }
    let spec = ClusterSpec {
        nodes: 1,
        localhost_access: true,
        ..ClusterSpec::default()
    };
    let mut c = Cluster::up(spec, &mut |_| {}).unwrap_or_else(|e| panic!("{e:#}"));
    let port = c.add_pod(tcp_pod("a")).unwrap()[0].host_port;
    let loopback = SocketAddr::new("127.0.0.1".parse().unwrap(), port);
    assert_eq!(
        c.tcp(Origin::Node(0), loopback).unwrap(),
        "a",
        "127.0.0.1 from the node itself"
    );
    // Another host sends to 127.0.0.1 through the node (the CVE-2020-8558 path): the
    // client routes loopback addresses to node 0 and may send them out of eth0.
    route_loopback_to_node0(&c);
    let guard = c.nodes[0]
        .ns
        .run_ok(
            "nft",
            &["list", "chain", "inet", "randport", "localhost_guard"],
            "",
        )
        .unwrap();
    let before = counter(&guard);
    // 127.0.0.2: the client keeps a local route for 127.0.0.1 itself.
    let elsewhere = SocketAddr::new("127.0.0.2".parse().unwrap(), port);
    assert!(
        c.tcp(Origin::Client, elsewhere).is_err(),
        "another host reached a pod through 127.0.0.2"
    );
    let guard = c.nodes[0]
        .ns
        .run_ok(
            "nft",
            &["list", "chain", "inet", "randport", "localhost_guard"],
            "",
        )
        .unwrap();
    assert!(
        counter(&guard) > before,
        "the guard dropped nothing:\n{guard}"
    );
    // The node address still works for the client.
    let on_node = SocketAddr::new(IpAddr::V4(c.nodes[0].ip4), port);
    assert_eq!(c.tcp(Origin::Client, on_node).unwrap(), "a");
    // The watchdog (every 500 ms here) recognises the table with the localhost chains.
    std::thread::sleep(Duration::from_millis(1200));
    let log = std::fs::read_to_string(c.nodes[0].log()).unwrap();
    assert!(!log.contains("re-applied"), "spurious repair:\n{log}");

    // Switched off, the agent turns route_localnet off again: it was off in the new
    // namespace and the agent turned it on.
    let route_localnet = |c: &Cluster| {
        c.nodes[0]
            .ns
            .run_ok("sysctl", &["-n", "net.ipv4.conf.all.route_localnet"], "")
            .unwrap()
            .trim()
            .to_owned()
    };
    assert_eq!(route_localnet(&c), "1");
    let restart = |c: &mut Cluster, localhost_access: bool| {
        c.kill_agent(0);
        c.spec.localhost_access = localhost_access;
        c.start_agent(0).unwrap_or_else(|e| panic!("{e:#}"));
    };
    restart(&mut c, false);
    assert_eq!(route_localnet(&c), "0");
    let log = std::fs::read_to_string(c.nodes[0].log()).unwrap();
    assert!(log.contains("route_localnet back to 0"), "{log}");
    // Unless kube-proxy's rule for it shows that kube-proxy relies on it too.
    restart(&mut c, true);
    assert_eq!(route_localnet(&c), "1");
    c.nodes[0]
        .ns
        .run_ok(
            "iptables-restore",
            &["--noflush"],
            "*filter\n:KUBE-FIREWALL - [0:0]\n-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 \
             -m comment --comment \"block incoming localnet connections\" -j DROP\nCOMMIT\n",
        )
        .unwrap();
    restart(&mut c, false);
    assert_eq!(route_localnet(&c), "1");
    let log = std::fs::read_to_string(c.nodes[0].log()).unwrap();
    assert!(
        log.contains("kube-proxy's localhost NodePorts use it"),
        "{log}"
    );
}

/// The packets a listing's `counter packets N` shows (0 without a counter).
fn counter(listing: &str) -> u64 {
    listing
        .split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}
