//! Root-only fault scenarios on the simulator: the agent killed at random points, rules
//! flushed or deleted by someone else, port exhaustion, ports other processes hold.
//! After each, rules, holds, records and annotations must agree and traffic must flow.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use randport_core::Protocol;
use randport_core::render::nft;
use randport_itests::{assert_checks, root_or_skip};
use randport_sim::checks::{self, Check};
use randport_sim::cluster::{Cluster, ClusterSpec, Origin, PodSpec, SimPort};

fn cluster(firewall: &str, port_range: &str) -> Cluster {
    let spec = ClusterSpec {
        nodes: 1,
        firewall: firewall.into(),
        port_range: port_range.into(),
        ..ClusterSpec::default()
    };
    Cluster::up(spec, &mut |_| {}).unwrap_or_else(|e| panic!("{e:#}"))
}

fn tcp_pod(name: &str) -> PodSpec {
    let mut spec = PodSpec::echo("faults", name, 0);
    spec.ports = vec![SimPort::new(8080, Protocol::Tcp)];
    spec
}

/// Rules, holds, records, state files, annotations and traffic agree on node 0.
fn consistent(c: &Cluster, nftables: bool) -> Vec<Check> {
    let mut out = on_node(c, 0, nftables);
    out.extend(checks::annotations_match_agents(c));
    out.extend(checks::reach_every_mapping(c).into_iter().map(|r| r.check));
    out
}

/// Rules, holds, records and state files agree on node `node`.
fn on_node(c: &Cluster, node: usize, nftables: bool) -> Vec<Check> {
    let mut out = Vec::new();
    let records = match c.agent_records(node) {
        Ok(records) => records,
        Err(e) => {
            return vec![Check {
                name: "agent lists its records".into(),
                result: Err(format!("{e:#}")),
            }];
        }
    };
    let live: HashSet<String> = c
        .pods
        .iter()
        .filter(|p| p.spec.node == node)
        .map(|p| p.sandbox.0.clone())
        .collect();
    let recorded: HashSet<String> = records.iter().map(|r| r.sandbox.0.clone()).collect();
    out.push(Check {
        name: "the agent's records are exactly the live pods' sandboxes".into(),
        result: if live == recorded {
            Ok(())
        } else {
            Err(format!("live {live:?}, recorded {recorded:?}"))
        },
    });
    let files = std::fs::read_dir(c.nodes[node].dir.join("state"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                .count()
        })
        .unwrap_or(0);
    out.push(Check {
        name: "one state file per record".into(),
        result: if files == records.len() {
            Ok(())
        } else {
            Err(format!("{files} files, {} records", records.len()))
        },
    });
    let mut seen = HashSet::new();
    for m in records.iter().flat_map(|r| &r.mappings) {
        let unique = seen.insert((m.protocol, m.host_port));
        let held = c
            .port_free_on_node(node, m.protocol, m.host_port)
            .map(|free| !free)
            .unwrap_or(false);
        out.push(Check {
            name: format!(
                "host port {}/{} is held on node {node}, once",
                m.host_port, m.protocol
            ),
            result: if unique && held {
                Ok(())
            } else {
                Err(format!("unique {unique}, held {held}"))
            },
        });
    }
    if nftables {
        let listing = c.nodes[node]
            .ns
            .run_ok("nft", &["list", "table", "inet", "randport"], "")
            .unwrap_or_default();
        let tagged = listing.matches("comment \"sb:").count();
        let expected: usize = records.iter().map(nft::element_count).sum();
        out.push(Check {
            name: "the nft table holds exactly the records' elements".into(),
            result: if tagged == expected {
                Ok(())
            } else {
                Err(format!("{tagged} elements, {expected} expected"))
            },
        });
    }
    out
}

#[test]
fn agent_killed_at_random_points_loses_and_leaks_nothing() {
    if !root_or_skip("agent_killed_at_random_points_loses_and_leaks_nothing") {
        return;
    }
    let seed = fastrand::u64(..);
    eprintln!("seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut c = cluster("nftables", "20000-29999");
    let (mut next, mut kills, mut interrupted, mut pending_delete) =
        (0usize, 0usize, 0usize, None::<String>);
    for cycle in 0..50 {
        let kill = cycle % 3 == 1 || rng.u8(..4) == 0;
        let pid = c.nodes[0].agent_pid().expect("agent running");
        let delay = Duration::from_micros(rng.u64(0..15_000));
        // The kill is timed from the moment the plugin is exec'd, so that it lands
        // anywhere in the request: before it, in planning, persisting, programming,
        // writing back, or after the answer.
        let mut killer = None;
        let mut arm = || {
            if kill {
                killer = Some(std::thread::spawn(move || {
                    std::thread::sleep(delay);
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }));
            }
        };
        if c.pods.len() < 3 || (c.pods.len() < 8 && rng.bool()) {
            let name = format!("k{next}");
            next += 1;
            interrupted += usize::from(c.add_pod_then(tcp_pod(&name), &mut arm).is_err());
        } else {
            let name = c.pods[rng.usize(..c.pods.len())].spec.name.clone();
            arm();
            if c.delete_pod(&name).is_err() {
                interrupted += 1;
                pending_delete = Some(name);
            }
        }
        if let Some(killer) = killer {
            killer.join().unwrap();
            kills += 1;
            c.kill_agent(0);
            c.start_agent(0)
                .unwrap_or_else(|e| panic!("restart after kill {kills} (seed {seed}): {e:#}"));
            // The runtime retries a DEL that failed.
            if let Some(name) = pending_delete.take() {
                c.delete_pod(&name)
                    .unwrap_or_else(|e| panic!("retried DEL of {name} (seed {seed}): {e:#}"));
            }
            assert_checks(
                &format!("after kill {kills}, cycle {cycle} (seed {seed})"),
                &consistent(&c, true),
            );
        }
    }
    assert!(kills >= 17, "only {kills} kills");
    eprintln!("{kills} kills, {interrupted} ADDs or DELs interrupted");
    assert!(interrupted > 0, "no kill landed during a request");
    assert_checks(&format!("at the end (seed {seed})"), &consistent(&c, true));
}

fn repaired_within_2s(c: &Cluster, what: &str, addr: SocketAddr, expected: &str) {
    let started = Instant::now();
    loop {
        if c.tcp(Origin::Client, addr).is_ok_and(|who| who == expected) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{what}: mapping not working again within 2 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn flushes_are_repaired(firewall: &str, breakers: &[&[&str]]) {
    let mut c = cluster(firewall, "20000-29999");
    c.add_pod(tcp_pod("a")).unwrap();
    c.add_pod(tcp_pod("b")).unwrap();
    let addr = |c: &Cluster, pod: &str| {
        SocketAddr::new(
            IpAddr::V4(c.nodes[0].ip4),
            c.mappings(pod).unwrap()[0].host_port,
        )
    };
    for breaker in breakers {
        c.nodes[0]
            .ns
            .run_ok(breaker[0], &breaker[1..], "")
            .unwrap_or_else(|e| panic!("{e:#}"));
        let what = breaker.join(" ");
        repaired_within_2s(&c, &what, addr(&c, "a"), "a");
        repaired_within_2s(&c, &what, addr(&c, "b"), "b");
    }
    assert_checks("after the repairs", &consistent(&c, firewall == "nftables"));
}

#[test]
fn nft_table_flushed_deleted_or_whole_ruleset_flushed_is_repaired() {
    if root_or_skip("nft_table_flushed_deleted_or_whole_ruleset_flushed_is_repaired") {
        flushes_are_repaired(
            "nftables",
            &[
                &["nft", "flush", "table", "inet", "randport"],
                // Only the elements: chains, sets and rules stay as they were loaded.
                &["nft", "flush", "map", "inet", "randport", "hostports4"],
                &["nft", "flush", "set", "inet", "randport", "hairpin4"],
                &["nft", "delete", "table", "inet", "randport"],
                &["nft", "flush", "ruleset"],
            ],
        );
    }
}

#[test]
fn iptables_chains_flushed_or_deleted_are_repaired() {
    if root_or_skip("iptables_chains_flushed_or_deleted_are_repaired") {
        flushes_are_repaired(
            "iptables",
            &[
                &["iptables", "-t", "nat", "-F", "RANDPORT-HOSTPORTS"],
                // One DNAT rule.
                &["iptables", "-t", "nat", "-D", "RANDPORT-HOSTPORTS", "1"],
                &[
                    "sh",
                    "-c",
                    "iptables -t nat -F && iptables -t nat -X RANDPORT-HOSTPORTS && iptables -t nat -X RANDPORT-POSTROUTING",
                ],
            ],
        );
    }
}

#[test]
fn exhaustion_fails_the_ninth_pod_cleanly_until_one_is_deleted() {
    if !root_or_skip("exhaustion_fails_the_ninth_pod_cleanly_until_one_is_deleted") {
        return;
    }
    let mut c = cluster("nftables", "20000-20007");
    for i in 0..8 {
        c.add_pod(tcp_pod(&format!("e{i}"))).unwrap();
    }
    let err = c.add_pod(tcp_pod("e8")).unwrap_err().to_string();
    assert!(
        err.contains("no free TCP host port in range 20000-20007")
            && err.contains("8 of its 8 ports are mapped"),
        "{err}"
    );
    assert_checks("after the failed ADD", &consistent(&c, true));
    c.delete_pod("e3").unwrap();
    let entries = c.add_pod(tcp_pod("e8")).unwrap();
    assert!((20000..=20007).contains(&entries[0].host_port));
    assert_checks("after the retry", &consistent(&c, true));
}

#[test]
fn ports_other_processes_hold_are_never_handed_out() {
    if !root_or_skip("ports_other_processes_hold_are_never_handed_out") {
        return;
    }
    let mut c = cluster("nftables", "20000-20003");
    // A host process on the node holds two ports of the range (TCP on all addresses).
    let held = c.nodes[0]
        .ns
        .enter(|| {
            (
                TcpListener::bind(("::", 20001)).unwrap(),
                TcpListener::bind(("0.0.0.0", 20002)).unwrap(),
            )
        })
        .unwrap();
    let mut got = HashSet::new();
    for i in 0..2 {
        got.insert(c.add_pod(tcp_pod(&format!("h{i}"))).unwrap()[0].host_port);
    }
    assert_eq!(got, HashSet::from([20000, 20003]));
    let err = c.add_pod(tcp_pod("h2")).unwrap_err().to_string();
    assert!(err.contains("2 are held by other processes"), "{err}");
    drop(held);
    let freed = c.add_pod(tcp_pod("h3")).unwrap()[0].host_port;
    assert!(freed == 20001 || freed == 20002, "{freed}");
    assert_checks("at the end", &consistent(&c, true));
}

#[test]
fn two_hundred_pods_added_and_deleted_at_once_three_times() {
    if !root_or_skip("two_hundred_pods_added_and_deleted_at_once_three_times") {
        return;
    }
    let spec = ClusterSpec {
        nodes: 2,
        ..ClusterSpec::default()
    };
    let mut c = Cluster::up(spec, &mut |_| {}).unwrap_or_else(|e| panic!("{e:#}"));
    for round in 0..3 {
        let specs: Vec<PodSpec> = (0..200)
            .map(|i| PodSpec::echo("crowd", &format!("r{round}-{i}"), i % 2))
            .collect();
        let results = c.add_pods_concurrently(specs);
        let failed: Vec<String> = results
            .iter()
            .filter_map(|r| r.as_ref().err().map(|e| format!("{e:#}")))
            .collect();
        assert!(
            failed.is_empty(),
            "round {round}: {} ADDs failed: {:?}",
            failed.len(),
            &failed[..failed.len().min(3)]
        );
        // Every mapping reachable, with the right pod behind it.
        let rows = checks::reach_every_mapping(&c);
        assert_eq!(rows.len(), 400);
        assert_checks(
            &format!("round {round}: reachable"),
            &rows.into_iter().map(|r| r.check).collect::<Vec<_>>(),
        );
        let mut all = checks::annotations_match_agents(&c);
        all.extend(on_node(&c, 0, true));
        all.extend(on_node(&c, 1, true));
        assert_checks(&format!("round {round}: consistent"), &all);

        let entries: Vec<(usize, Vec<randport_core::annotation::PortEntry>)> = c
            .pods
            .iter()
            .map(|p| (p.spec.node, c.mappings(&p.spec.name).unwrap()))
            .collect();
        let names: Vec<String> = c.pods.iter().map(|p| p.spec.name.clone()).collect();
        let results = c.delete_pods_concurrently(&names);
        assert!(
            results.iter().all(Result::is_ok),
            "round {round}: a DEL failed"
        );
        assert!(c.pods.is_empty());
        // Nothing answers, nothing is held, nothing is left.
        for (node, entries) in &entries {
            for e in entries {
                let addr = SocketAddr::new(IpAddr::V4(c.nodes[*node].ip4), e.host_port);
                if e.protocol == Protocol::Tcp {
                    assert!(
                        c.tcp(Origin::Client, addr).is_err(),
                        "round {round}: {addr} still answers"
                    );
                }
                assert!(
                    c.port_free_on_node(*node, e.protocol, e.host_port).unwrap(),
                    "round {round}: {addr}/{} still held",
                    e.protocol
                );
            }
        }
        for (node, entries) in entries.iter().take(3) {
            let udp = entries
                .iter()
                .find(|e| e.protocol == Protocol::Udp)
                .unwrap();
            let addr = SocketAddr::new(IpAddr::V4(c.nodes[*node].ip4), udp.host_port);
            assert!(
                c.udp(Origin::Client, addr).is_err(),
                "round {round}: {addr}/UDP still answers"
            );
        }
        let mut left = on_node(&c, 0, true);
        left.extend(on_node(&c, 1, true));
        assert_checks(&format!("round {round}: nothing left"), &left);
        for node in 0..2 {
            assert!(c.agent_records(node).unwrap().is_empty());
        }
    }
}

#[test]
fn bad_pods_get_clear_errors_and_change_nothing() {
    if !root_or_skip("bad_pods_get_clear_errors_and_change_nothing") {
        return;
    }
    let mut c = cluster("nftables", "20000-29999");
    c.add_pod(tcp_pod("good")).unwrap();
    let cases: Vec<(PodSpec, &str)> = vec![
        (
            PodSpec {
                ports: vec![SimPort::new(0, Protocol::Tcp)],
                ..tcp_pod("zero")
            },
            "containerPort 0 is not a port from 1 to 65535",
        ),
        (
            PodSpec {
                ports: vec![
                    SimPort::new(8080, Protocol::Tcp),
                    SimPort::new(8080, Protocol::Tcp),
                ],
                ..tcp_pod("twice")
            },
            "containerPort 8080/TCP is declared twice",
        ),
        (
            PodSpec {
                ports: vec![SimPort {
                    host_ip: Some("2001:db8::1".parse().unwrap()),
                    ..SimPort::new(8080, Protocol::Tcp)
                }],
                ..tcp_pod("family")
            },
            "asks for hostIP 2001:db8::1 but the pod has no address of that family",
        ),
    ];
    for (spec, expected) in cases {
        let name = spec.name.clone();
        let err = c.add_pod(spec).unwrap_err().to_string();
        assert!(
            err.contains(&format!("pod faults/{name}")) && err.contains(expected),
            "{err}"
        );
        assert_checks(&format!("after the bad pod {name}"), &consistent(&c, true));
    }
}

/// What a power loss or a crash can leave in the state directory stops nothing: the real
/// agent, restarted over an empty, a truncated and a garbage record and an unfinished
/// write beside real ones, starts, keeps every real mapping answering, moves the bad files
/// aside and removes the leftover; a DEL with the agent down works beside them too.
#[test]
fn bad_state_files_stop_neither_the_agent_nor_a_del_without_it() {
    if !root_or_skip("bad_state_files_stop_neither_the_agent_nor_a_del_without_it") {
        return;
    }
    let mut c = cluster("nftables", "20000-29999");
    c.add_pod(tcp_pod("a")).unwrap();
    c.add_pod(tcp_pod("b")).unwrap();
    let state = c.nodes[0].dir.join("state");
    let bad: [(&str, &[u8]); 3] = [
        ("empty.json", b""),
        (
            "truncated.json",
            b"{\"formatVersion\": 2, \"sandbox\": \"trunc",
        ),
        ("garbage.json", b"\x00\x01\x02 not json"),
    ];
    let plant = |state: &std::path::Path| {
        for (name, bytes) in bad {
            std::fs::write(state.join(name), bytes).unwrap();
        }
        std::fs::write(state.join("c.json.tmp.4242"), b"{\"sandbox\"").unwrap();
    };
    c.kill_agent(0);
    plant(&state);
    c.start_agent(0)
        .unwrap_or_else(|e| panic!("the agent did not start beside bad records: {e:#}"));
    assert_checks("after the restart over bad files", &consistent(&c, true));
    for (name, _) in bad {
        assert!(
            state.join(format!("{name}.corrupt")).exists(),
            "{name} not moved aside"
        );
        assert!(!state.join(name).exists(), "{name} still in the way");
    }
    assert!(
        !state.join("c.json.tmp.4242").exists(),
        "the unfinished write is still there"
    );
    let log = std::fs::read_to_string(c.nodes[0].log()).unwrap();
    assert!(
        log.contains("moved aside to"),
        "nothing said about it:\n{log}"
    );
    // A new pod maps as usual.
    c.add_pod(tcp_pod("c")).unwrap();
    // With the agent down and bad files planted again, a DEL still removes its pod.
    c.kill_agent(0);
    plant(&state);
    c.delete_pod("a")
        .unwrap_or_else(|e| panic!("DEL without the agent beside bad records: {e:#}"));
    c.start_agent(0).unwrap();
    assert_checks("after the DEL without the agent", &consistent(&c, true));
}
