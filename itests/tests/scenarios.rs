//! Root-only scenarios on the simulator: real agents, real plugin, real kernel, traffic
//! from an outside client and from pods. Each builds its own run (`rp-<run id>-…`) and
//! removes it, also when it fails.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::process::Command;

use randport_core::Protocol;
use randport_itests::{assert_checks, root_or_skip};
use randport_sim::checks;
use randport_sim::cluster::{Cluster, ClusterSpec, Origin, PodSpec, SimPort, ifindex};

fn cluster(nodes: usize, ipv6: bool, firewall: &str) -> Cluster {
    let spec = ClusterSpec {
        nodes,
        ipv6,
        firewall: firewall.into(),
        ..ClusterSpec::default()
    };
    Cluster::up(spec, &mut |_| {}).unwrap_or_else(|e| panic!("{e:#}"))
}

fn reach_all(cluster: &Cluster) -> usize {
    let rows = checks::reach_every_mapping(cluster);
    assert_checks(
        "checks",
        &rows.iter().map(|r| r.check.clone()).collect::<Vec<_>>(),
    );
    rows.len()
}

fn many_pods(firewall: &str) {
    let mut c = cluster(3, false, firewall);
    for node in 0..3 {
        for j in 0..6 {
            c.add_pod(PodSpec::echo("load", &format!("p{node}-{j}"), node))
                .unwrap();
        }
    }
    assert_eq!(reach_all(&c), 3 * 6 * 2, "one TCP and one UDP row per pod");
    let mut more = vec![
        checks::cross_node(&c, "p0-0", "p2-5", Protocol::Udp),
        checks::cross_node(&c, "p2-1", "p1-3", Protocol::Tcp),
        checks::hairpin(&c, "p1-1", Protocol::Tcp),
    ];
    more.extend(checks::annotations_match_agents(&c));
    assert_checks("checks", &more);
    // Host ports are unique per node and protocol.
    for node in 0..3 {
        let records = c.agent_records(node).unwrap();
        let mut seen = std::collections::HashSet::new();
        for m in records.iter().flat_map(|r| &r.mappings) {
            assert!(
                seen.insert((m.protocol, m.host_port)),
                "port {} given twice on node {node}",
                m.host_port
            );
        }
    }
    for j in 0..3 {
        let name = format!("p1-{j}");
        let entries = c.mappings(&name).unwrap();
        c.delete_pod(&name).unwrap();
        assert_checks(
            "checks",
            &checks::deleted_pod_is_gone(&c, &name, 1, &entries),
        );
    }
    assert_checks("checks", &checks::annotations_match_agents(&c));
}

#[test]
fn many_pods_on_three_nodes_nftables() {
    if root_or_skip("many_pods_on_three_nodes_nftables") {
        many_pods("nftables");
    }
}

#[test]
fn many_pods_on_three_nodes_iptables() {
    if root_or_skip("many_pods_on_three_nodes_iptables") {
        many_pods("iptables");
    }
}

fn dual_stack(firewall: &str) {
    let mut c = cluster(2, true, firewall);
    for node in 0..2 {
        for j in 0..2 {
            c.add_pod(PodSpec::echo("v6", &format!("d{node}-{j}"), node))
                .unwrap();
        }
    }
    // Every mapping on the node's IPv4 and IPv6 address: 4 pods x 2 ports x 2 families.
    assert_eq!(reach_all(&c), 16);
    let entries = c.mappings("d0-0").unwrap();
    assert_eq!(
        entries[0].pod_ip,
        Some("198.18.0.2".parse().unwrap()),
        "podIP is the primary (IPv4) address"
    );
    let v6 = SocketAddr::new(
        IpAddr::V6(c.nodes[1].ip6.unwrap()),
        c.mappings("d1-1").unwrap()[0].host_port,
    );
    assert_eq!(
        c.tcp(Origin::Pod("d0-1"), v6).unwrap(),
        "d1-1",
        "pod to pod across nodes over IPv6"
    );
}

#[test]
fn ipv6_dual_stack_nftables() {
    if root_or_skip("ipv6_dual_stack_nftables") {
        dual_stack("nftables");
    }
}

#[test]
fn ipv6_dual_stack_iptables() {
    if root_or_skip("ipv6_dual_stack_iptables") {
        dual_stack("iptables");
    }
}

#[test]
fn host_ip_mapping_answers_only_on_that_address() {
    if !root_or_skip("host_ip_mapping_answers_only_on_that_address") {
        return;
    }
    let mut c = cluster(1, false, "nftables");
    let second: IpAddr = "192.0.2.101".parse().unwrap();
    c.nodes[0]
        .ns
        .addr(ifindex::ETH0, "192.0.2.101".parse().unwrap(), 24)
        .unwrap();
    let mut spec = PodSpec::echo("pin", "pinned", 0);
    spec.ports = vec![
        SimPort {
            host_ip: Some(second),
            ..SimPort::new(8080, Protocol::Tcp)
        },
        SimPort {
            host_ip: Some(second),
            host_port: Some(8081),
            ..SimPort::new(8081, Protocol::Udp)
        },
    ];
    let entries = c.add_pod(spec).unwrap();
    assert_eq!(entries[0].host_ip, Some(second));
    assert_eq!(entries[1].host_port, 8081, "explicit hostPort honoured");
    let tcp = entries[0].host_port;
    assert_eq!(
        c.tcp(Origin::Client, SocketAddr::new(second, tcp)).unwrap(),
        "pinned"
    );
    assert_eq!(
        c.udp(Origin::Client, SocketAddr::new(second, 8081))
            .unwrap(),
        "pinned"
    );
    let main_ip = IpAddr::V4(c.nodes[0].ip4);
    assert!(
        c.tcp(Origin::Client, SocketAddr::new(main_ip, tcp))
            .is_err(),
        "answered on the node's other address"
    );
    assert!(
        c.udp(Origin::Client, SocketAddr::new(main_ip, 8081))
            .is_err()
    );
    // The held port is bound on that address only: the other address's port is free.
    let free = c.nodes[0]
        .ns
        .enter(move || std::net::TcpListener::bind((main_ip, tcp)).is_ok())
        .unwrap();
    assert!(free);
}

#[test]
fn agent_restarted_mid_run_keeps_mappings_and_connections() {
    if !root_or_skip("agent_restarted_mid_run_keeps_mappings_and_connections") {
        return;
    }
    let mut c = cluster(2, false, "nftables");
    for j in 0..3 {
        c.add_pod(PodSpec::echo("rs", &format!("r{j}"), 0)).unwrap();
    }
    c.add_pod(PodSpec::echo("rs", "other", 1)).unwrap();
    let before = c.agent_records(0).unwrap();
    let tcp = c.mappings("r0").unwrap()[0].host_port;
    let (mut stream, hello) = c
        .tcp_connection(
            Origin::Client,
            SocketAddr::new(IpAddr::V4(c.nodes[0].ip4), tcp),
        )
        .unwrap();
    assert_eq!(hello, "r0");

    c.kill_agent(0);
    let err = c
        .add_pod(PodSpec::echo("rs", "during", 0))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("is the randport agent running on this node"),
        "{err}"
    );
    assert_eq!(
        reach_all(&c),
        4 * 2,
        "mappings keep working while the agent is down"
    );
    c.start_agent(0).unwrap();

    assert_eq!(c.agent_records(0).unwrap(), before, "restored exactly");
    stream.write_all(b"after restart\n").unwrap();
    let mut line = String::new();
    BufReader::new(stream.try_clone().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(
        line.trim(),
        "after restart",
        "established connection survived"
    );
    c.add_pod(PodSpec::echo("rs", "after", 0)).unwrap();
    assert_eq!(reach_all(&c), 5 * 2);
    assert_checks("checks", &checks::annotations_match_agents(&c));
}

/// A DaemonSet rolling update on one node: the old agent gets SIGTERM, a new binary (another
/// file, as a new image brings) starts over the records the previous release wrote (format 1,
/// without a version), and an outside client that connects to every mapping over and over,
/// TCP and UDP, sees no refusal and no silence the whole time.
#[test]
fn a_rolling_update_to_a_new_binary_keeps_every_mapping_answering() {
    if !root_or_skip("a_rolling_update_to_a_new_binary_keeps_every_mapping_answering") {
        return;
    }
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    let mut c = cluster(1, false, "nftables");
    for j in 0..4 {
        c.add_pod(PodSpec::echo("ru", &format!("u{j}"), 0)).unwrap();
    }
    let before = c.agent_records(0).unwrap();
    // The records as randport wrote them before the format was versioned: no formatVersion.
    let state = c.nodes[0].dir.join("state");
    let record_files: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    assert_eq!(record_files.len(), 4);
    for path in &record_files {
        let mut doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        assert_eq!(doc["formatVersion"], 2, "{}", path.display());
        doc.as_object_mut().unwrap().remove("formatVersion");
        std::fs::write(path, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    }
    let mut targets = Vec::new();
    for j in 0..4 {
        let name = format!("u{j}");
        for m in c.mappings(&name).unwrap() {
            let addr = SocketAddr::new(IpAddr::V4(c.nodes[0].ip4), m.host_port);
            targets.push((addr, m.protocol, name.clone()));
        }
    }
    let next = c.nodes[0].dir.join("randportd-next");
    std::fs::copy(&c.bins.agent, &next).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let client = c.client.path();
    let traffic = {
        let (stop, rounds, failures) = (stop.clone(), rounds.clone(), failures.clone());
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&client).unwrap();
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            while !stop.load(Ordering::SeqCst) {
                for (addr, protocol, name) in &targets {
                    let answer = match protocol {
                        Protocol::Udp => udp_once(*addr),
                        _ => tcp_once(*addr),
                    };
                    match answer {
                        Ok(a) if a == *name => {}
                        Ok(a) => failures.lock().unwrap().push(format!("{addr}: {a}")),
                        Err(e) => failures
                            .lock()
                            .unwrap()
                            .push(format!("{addr} {protocol}: {e}")),
                    }
                }
                rounds.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let wait_rounds = |n: usize| {
        let start = rounds.load(Ordering::SeqCst);
        while rounds.load(Ordering::SeqCst) < start + n {
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_rounds(3);
    c.terminate_agent(0).unwrap();
    // No agent on the node while the new pod is pulled and started.
    wait_rounds(10);
    c.bins.agent = next;
    c.start_agent(0).unwrap();
    wait_rounds(10);
    stop.store(true, Ordering::SeqCst);
    traffic.join().unwrap();

    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} failed exchanges in {} rounds during the update: {:?}",
        failures.len(),
        rounds.load(Ordering::SeqCst),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(
        c.agent_records(0).unwrap(),
        before,
        "the new agent kept every mapping"
    );
    for path in &record_files {
        let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        assert_eq!(
            doc["formatVersion"],
            2,
            "rewritten in the new format: {}",
            path.display()
        );
    }
    c.add_pod(PodSpec::echo("ru", "after", 0)).unwrap();
    assert_eq!(reach_all(&c), 5 * 2);
}

fn tcp_once(addr: SocketAddr) -> std::io::Result<String> {
    let stream = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(1))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(1)))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    Ok(line.trim_end().to_owned())
}

fn udp_once(addr: SocketAddr) -> std::io::Result<String> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(std::time::Duration::from_millis(500)))?;
    socket.send_to(b"who are you?", addr)?;
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[test]
fn demo_command_passes_and_leaves_nothing_behind() {
    if !root_or_skip("demo_command_passes_and_leaves_nothing_behind") {
        return;
    }
    let bins = randport_sim::cluster::Binaries::find().unwrap();
    let sim = bins.agent.with_file_name("randport-sim");
    assert!(
        sim.is_file(),
        "{} missing: build the workspace first",
        sim.display()
    );
    let out = Command::new(&sim).arg("demo").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("checks: ") && l.ends_with(" passed, 0 failed")),
        "{stdout}"
    );
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.starts_with("demo/echo-") && l.ends_with(" ok"))
            .count(),
        12,
        "{stdout}"
    );
    let run = stdout
        .lines()
        .find_map(|l| l.strip_prefix("==> run "))
        .and_then(|l| l.split(':').next())
        .unwrap()
        .to_owned();
    assert!(
        randport_sim::netns::list_with_prefix(&format!("rp-{run}-")).is_empty(),
        "namespaces left behind"
    );
    assert!(
        !std::path::Path::new(randport_sim::cluster::RUNS_DIR)
            .join(&run)
            .exists(),
        "files left behind"
    );
}

/// A run killed while it builds pods (SIGKILL: no cleanup of its own), whose record is gone
/// too, is still found and removed entirely by `randport-sim down`: its namespaces (among
/// them the pod being built), its agents, its files.
#[test]
fn a_run_killed_mid_build_without_its_record_is_found_and_removed_by_down() {
    if !root_or_skip("a_run_killed_mid_build_without_its_record_is_found_and_removed_by_down") {
        return;
    }
    use std::io::BufRead as _;
    let bins = randport_sim::cluster::Binaries::find().unwrap();
    let sim = bins.agent.with_file_name("randport-sim");
    let mut child = Command::new(&sim)
        .args(["demo", "--nodes", "2", "--pods", "40"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut run = None;
    let mut adds = 0;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("==> run ") {
            run = rest.split(':').next().map(str::to_owned);
        }
        if line.contains(": ADD ") {
            adds += 1;
            if adds == 5 {
                break;
            }
        }
    }
    // The pods' namespaces are held by the simulator's descriptors only (not mounted).
    let pod_namespaces = net_namespaces_held_by(child.id());
    child.kill().unwrap();
    child.wait().unwrap();
    let run = run.expect("the demo printed its run id");
    assert_eq!(adds, 5, "the demo got to its fifth pod");
    assert!(
        pod_namespaces.len() >= 5,
        "the simulator held its pods' namespaces: {pod_namespaces:?}"
    );
    let alive = live_net_namespaces();
    let survivors: Vec<_> = pod_namespaces.intersection(&alive).collect();
    assert!(
        survivors.is_empty(),
        "no pod namespace outlives the simulator: {survivors:?} still held"
    );
    let prefix = format!("rp-{run}-");
    let left = randport_sim::netns::list_with_prefix(&prefix);
    assert!(
        left.iter().any(|n| n.ends_with("-node-0")),
        "the killed run left its nodes' namespaces: {left:?}"
    );
    assert!(
        !left.iter().any(|n| n.contains("-p")),
        "no pod namespace is mounted: {left:?}"
    );
    let run_dir = std::path::Path::new(randport_sim::cluster::RUNS_DIR).join(&run);
    let agents_of_run = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                    String::from_utf8_lossy(&c).contains(&run_dir.display().to_string())
                })
            })
            .count()
    };
    assert_eq!(agents_of_run(), 2, "its two agents outlived it");
    std::fs::remove_dir_all(&run_dir).unwrap();
    assert!(
        randport_sim::down::leftover_runs().contains(&run),
        "found without its record"
    );

    let out = Command::new(&sim).args(["down", &run]).output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("2 agent(s)"), "{said}");
    assert_eq!(
        randport_sim::netns::list_with_prefix(&prefix),
        Vec::<String>::new()
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(agents_of_run(), 0, "no agent of the run is left");
    assert!(!run_dir.exists());
    assert!(!randport_sim::down::leftover_runs().contains(&run));
}

#[test]
fn a_scale_run_of_four_nodes_by_a_hundred_pods_builds_checks_deletes_and_tears_down() {
    if !root_or_skip(
        "a_scale_run_of_four_nodes_by_a_hundred_pods_builds_checks_deletes_and_tears_down",
    ) {
        return;
    }
    use randport_sim::scale::{self, ScaleSpec};
    let mut said = Vec::new();
    let spec = ScaleSpec {
        cluster: ClusterSpec {
            nodes: 4,
            repair_interval_ms: 1000,
            ..ClusterSpec::default()
        },
        pods_per_node: 100,
        traffic_percent: 5,
        delete_percent: 10,
        wait_for_kernel: false,
    };
    let report = scale::run(&spec, &mut |m| said.push(m.to_owned())).unwrap();
    let run = said[0]
        .strip_prefix("run ")
        .and_then(|r| r.split(':').next())
        .expect("the run is named first")
        .to_owned();
    eprintln!("{report:#?}");
    assert_checks("the scale run", &report.checks);
    assert_eq!(report.build.pods, 400);
    assert_eq!(report.mappings, 800, "two mappings a pod, all written back");
    assert_eq!(report.traffic_pods, 20, "5 % reached with traffic");
    assert_eq!(report.delete.pods, 40, "a tenth deleted");
    assert_eq!(report.teardown.pods, 360);
    // Every kind of check ran: agents vs annotations twice, traffic both ways, ports.
    assert_eq!(report.checks.len(), 7, "{:#?}", report.checks);
    assert!(
        said.iter().any(|m| m.starts_with("built 400/400 pods")),
        "progress is reported: {said:?}"
    );
    assert_eq!(
        randport_sim::netns::list_with_prefix(&format!("rp-{run}-")),
        Vec::<String>::new(),
        "the teardown removed every namespace"
    );
    assert!(!randport_sim::down::leftover_runs().contains(&run));
}

/// A namespace's links, addresses and routes, without what the kernel numbers or draws at
/// random (indexes, MAC and link-local addresses, lifetimes).
fn wiring_of(ns: &randport_sim::netns::Netns, links: &[&str]) -> Vec<serde_json::Value> {
    let json = |args: &[&str]| -> Vec<serde_json::Value> {
        serde_json::from_str(&ns.run_ok("ip", args, "").unwrap()).unwrap()
    };
    let mut out = Vec::new();
    for mut link in json(&["-j", "addr", "show"]) {
        if !links.contains(&link["ifname"].as_str().unwrap_or_default()) {
            continue;
        }
        let object = link.as_object_mut().unwrap();
        for key in [
            "ifindex",
            "link_index",
            "address",
            "broadcast",
            "link_netnsid",
            "qdisc",
            "group",
            "txqlen",
            "altnames",
        ] {
            object.remove(key);
        }
        if let Some(addrs) = object.get_mut("addr_info").and_then(|a| a.as_array_mut()) {
            addrs.retain(|a| !a["local"].as_str().unwrap_or_default().starts_with("fe80"));
            for a in addrs.iter_mut() {
                let a = a.as_object_mut().unwrap();
                a.remove("valid_life_time");
                a.remove("preferred_life_time");
            }
        }
        out.push(link);
    }
    for family in ["-4", "-6"] {
        out.extend(
            json(&["-j", family, "route", "show"])
                .into_iter()
                .filter(|r| r["dst"].as_str() != Some("fe80::/64")),
        );
    }
    out
}

#[test]
fn pods_wired_over_netlink_look_exactly_like_pods_wired_with_ip_commands() {
    if !root_or_skip("pods_wired_over_netlink_look_exactly_like_pods_wired_with_ip_commands") {
        return;
    }
    use randport_sim::cluster::Wiring;
    let wired = |wiring: Wiring| {
        let mut c = Cluster::up(
            ClusterSpec {
                nodes: 1,
                ipv6: true,
                wiring,
                ..ClusterSpec::default()
            },
            &mut |_| {},
        )
        .unwrap();
        c.add_pod(PodSpec::echo("wiring", "echo-0", 0)).unwrap();
        let pod = wiring_of(&c.pod("echo-0").unwrap().ns, &["lo", "eth0"]);
        let node = wiring_of(&c.nodes[0].ns, &["eth0", "p0"]);
        // And it carries traffic both ways.
        assert_checks(
            "the wired pod answers",
            &checks::reach_every_mapping(&c)
                .into_iter()
                .map(|r| r.check)
                .collect::<Vec<_>>(),
        );
        (pod, node)
    };
    let (netlink_pod, netlink_node) = wired(Wiring::Netlink);
    let (ip_pod, ip_node) = wired(Wiring::IpCommands);
    assert!(
        netlink_pod.len() >= 6,
        "links and routes were read: {netlink_pod:#?}"
    );
    assert_eq!(netlink_pod, ip_pod, "the pod's namespace");
    assert_eq!(netlink_node, ip_node, "the node's side");
}

#[test]
fn a_pod_whose_add_fails_leaves_no_namespace_veth_or_pod_object() {
    if !root_or_skip("a_pod_whose_add_fails_leaves_no_namespace_veth_or_pod_object") {
        return;
    }
    let mut c = cluster(1, false, "nftables");
    c.add_pod(PodSpec::echo("fail", "echo-ok", 0)).unwrap();
    let held_before = net_namespaces_held_by(std::process::id());
    // With its agent gone the plugin's ADD fails, after the pod was wired.
    c.kill_agent(0);
    let err = c
        .add_pod(PodSpec::echo("fail", "echo-doomed", 0))
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("ADD of pod fail/echo-doomed failed"),
        "{err:#}"
    );
    assert_eq!(
        net_namespaces_held_by(std::process::id()),
        held_before,
        "the failed pod's namespace is no longer held"
    );
    assert!(c.pod("echo-doomed").is_err());
    assert!(
        !c.nodes[0].dir.join("pods/fail/echo-doomed.json").exists(),
        "the Pod object went with it"
    );
    // The kernel removes the namespace, and with it the veth, in the background.
    let started = std::time::Instant::now();
    loop {
        let links = c.nodes[0]
            .ns
            .run_ok("ip", &["-o", "link", "show"], "")
            .unwrap();
        if !links.contains(" p1@") {
            assert!(
                links.contains(" p0@"),
                "the first pod's veth stays: {links}"
            );
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "the failed pod's veth p1 is still on its node: {links}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The network namespaces (nsfs inodes) process `pid` holds by a descriptor.
fn net_namespaces_held_by(pid: u32) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .map(|target| target.display().to_string())
        .filter(|target| target.starts_with("net:["))
        .collect()
}

/// Every network namespace something still holds: a task's, a descriptor's or a mount's.
fn live_net_namespaces() -> std::collections::BTreeSet<String> {
    let mut alive = std::collections::BTreeSet::new();
    for process in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = process
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for task in tasks.flatten() {
                if let Ok(ns) = std::fs::read_link(task.path().join("ns/net")) {
                    alive.insert(ns.display().to_string());
                }
            }
        }
        if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
            for fd in fds.flatten() {
                if let Ok(target) = std::fs::read_link(fd.path()) {
                    alive.insert(target.display().to_string());
                }
            }
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for field in mounts.split_whitespace() {
        if let Some(ns) = field.strip_prefix("net:[") {
            alive.insert(format!("net:[{ns}"));
        }
    }
    alive
}
