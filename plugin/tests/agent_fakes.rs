//! The agent against recording fakes: every step of ADD in order, every failure path
//! undone, DEL/CHECK/GC/STATUS, restart and repair.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use randport_core::annotation::encode;
use randport_core::{ContainerPort, PodRef, PortKey, Protocol, ReservedPorts, SandboxId};
use randport_plugin::agent::rpc::{AddRequest, Request, Response};
use randport_plugin::agent::{Agent, AgentConfig, Effects, HostPorts};
use randport_plugin::firewall::{FakeFirewall, Firewall};
use randport_plugin::kube::pods::{FakePodSource, PodInfo, PodSource};
use randport_plugin::netfilter::conntrack::FakeConntrack;
use randport_plugin::node::holder::FakeHolder;
use randport_plugin::node::state::{MemoryStateStore, StateStore};

struct Node {
    agent: Agent,
    firewall: Arc<FakeFirewall>,
    holder: Arc<FakeHolder>,
    conntrack: Arc<FakeConntrack>,
    state: Arc<MemoryStateStore>,
    pods: Arc<FakePodSource>,
}

fn config(range: &str) -> AgentConfig {
    AgentConfig {
        node_name: "node-0".into(),
        port_range: range.parse().unwrap(),
        reserved: ReservedPorts::none(),
        annotation_key: "tkestack.io/portmapping".into(),
        pod_wait: Duration::ZERO,
        add_deadline: randport_plugin::cni::DEFAULT_ADD_DEADLINE,
        host_ports: HostPorts::Auto,
        cni_conf_dir: None,
    }
}

fn node_with(range: &str, state: Arc<MemoryStateStore>, pods: Arc<FakePodSource>) -> Node {
    node_with_config(config(range), state, pods)
}

fn node_with_config(
    config: AgentConfig,
    state: Arc<MemoryStateStore>,
    pods: Arc<FakePodSource>,
) -> Node {
    let firewall = Arc::new(FakeFirewall::default());
    let holder = Arc::new(FakeHolder::default());
    let conntrack = Arc::new(FakeConntrack::default());
    let fx = Effects {
        firewall: Box::new(Arc::clone(&firewall)),
        holder: Box::new(Arc::clone(&holder)),
        conntrack: Box::new(Arc::clone(&conntrack)),
        state: Box::new(Arc::clone(&state)),
        pods: Box::new(Arc::clone(&pods)),
    };
    Node {
        agent: Agent::new(config, fx),
        firewall,
        holder,
        conntrack,
        state,
        pods,
    }
}

fn started(range: &str) -> Node {
    let node = node_with(range, Arc::default(), Arc::default());
    node.agent.start().unwrap();
    node
}

fn pod(name: &str, annotation: Option<&str>, ports: Vec<ContainerPort>) -> PodInfo {
    let mut pod = PodRef::new("shop", name);
    pod.uid = format!("uid-{name}");
    PodInfo {
        pod,
        node_name: Some("node-0".into()),
        ports,
        annotation: annotation.map(str::to_owned),
    }
}

fn get_pod(pods: &FakePodSource, name: &str) -> PodInfo {
    pods.get(&PodRef::new("shop", name)).unwrap()
}

fn web_ports() -> Vec<ContainerPort> {
    vec![
        ContainerPort::new("web", 80, Protocol::Tcp),
        ContainerPort::new("dns", 53, Protocol::Udp),
    ]
}

fn add_req(name: &str, sandbox: &str, ip: &str) -> AddRequest {
    AddRequest {
        network: None,
        sandbox: SandboxId(sandbox.into()),
        pod: PodRef::new("shop", name),
        pod_ips: vec![ip.parse().unwrap()],
    }
}

fn error_code(node: &Node, req: Request) -> (u32, String) {
    match node.agent.handle(req) {
        Response::Error(e) => (e.code, e.details),
        ok => panic!("expected an error, got {ok:?}"),
    }
}

fn assert_nothing_left(node: &Node) {
    assert!(
        node.state.load_all().unwrap().is_empty(),
        "record left behind"
    );
    assert!(node.agent.list().is_empty(), "mapping left in memory");
    assert!(
        node.firewall.present.lock().unwrap().is_empty(),
        "rules left behind"
    );
    assert_eq!(
        node.agent.gauges().range_used,
        [0, 0, 0],
        "ports left allocated"
    );
}

#[test]
fn add_runs_every_step_in_order() {
    let node = started("20000-20099");
    node.pods.put(pod("web-0", Some(""), web_ports()));
    let record = node
        .agent
        .add(&add_req("web-0", "sb1", "198.18.0.5"))
        .unwrap()
        .unwrap();

    assert_eq!(record.mappings.len(), 2);
    assert!(
        record
            .mappings
            .iter()
            .all(|m| (20000..=20099).contains(&m.host_port))
    );
    assert_eq!(record.pod.uid, "uid-web-0", "uid taken from the pod source");
    // Held, persisted, programmed, flushed (UDP only), written back.
    let held: Vec<u16> = node
        .holder
        .calls
        .lock()
        .unwrap()
        .iter()
        .map(|(_, p)| *p)
        .collect();
    assert_eq!(
        held,
        record
            .mappings
            .iter()
            .map(|m| m.host_port)
            .collect::<Vec<_>>()
    );
    assert_eq!(node.state.load_all().unwrap(), vec![record.clone()]);
    assert_eq!(
        *node.firewall.calls.lock().unwrap(),
        vec!["replace_all(0)".to_owned(), "add_many(1)".to_owned()]
    );
    let udp = record
        .mappings
        .iter()
        .find(|m| m.protocol == Protocol::Udp)
        .unwrap()
        .host_port;
    assert!(
        node.agent.conntrack_idle(Duration::from_secs(2)),
        "conntrack flush not done"
    );
    assert_eq!(
        *node.conntrack.flushed.lock().unwrap(),
        vec![(PortKey::any(Protocol::Udp), udp)]
    );
    // Flows already translated to the new pod stay.
    let udp_container_port = record
        .mappings
        .iter()
        .find(|m| m.protocol == Protocol::Udp)
        .unwrap()
        .container_port;
    let pod_flows: Vec<std::net::SocketAddr> = record
        .pod_ips
        .iter()
        .map(|ip| std::net::SocketAddr::new(*ip, udp_container_port))
        .collect();
    assert_eq!(*node.conntrack.kept.lock().unwrap(), vec![pod_flows]);
    let writes = node.pods.writes.lock().unwrap().clone();
    assert_eq!(
        writes,
        vec![(record.pod.clone(), encode(&record.annotation_entries()))]
    );
    node.agent.check(&record.sandbox).unwrap();
}

#[test]
fn add_is_idempotent_and_refuses_a_reused_sandbox() {
    let node = started("20000-20099");
    node.pods.put(pod("web-0", Some(""), web_ports()));
    node.pods.put(pod("web-1", Some(""), web_ports()));
    let first = node
        .agent
        .add(&add_req("web-0", "sb1", "198.18.0.5"))
        .unwrap();
    let again = node
        .agent
        .add(&add_req("web-0", "sb1", "198.18.0.5"))
        .unwrap();
    assert_eq!(first, again);
    assert_eq!(node.holder.calls.lock().unwrap().len(), 2, "no new holds");
    assert_eq!(
        node.firewall
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.starts_with("add"))
            .count(),
        1
    );
    let (code, details) = error_code(&node, Request::Add(add_req("web-1", "sb1", "198.18.0.6")));
    assert_eq!(code, 7);
    assert!(
        details.contains("already mapped for pod shop/web-0"),
        "{details}"
    );
}

#[test]
fn pod_without_annotation_gets_only_explicit_ports_and_no_writeback() {
    let node = started("20000-20099");
    let mut explicit = ContainerPort::new("web", 443, Protocol::Tcp);
    explicit.host_port = Some(8443);
    node.pods.put(pod(
        "plain",
        None,
        vec![ContainerPort::new("web", 80, Protocol::Tcp), explicit],
    ));
    let record = node
        .agent
        .add(&add_req("plain", "sb1", "198.18.0.5"))
        .unwrap()
        .unwrap();
    assert_eq!(record.mappings.len(), 1);
    assert_eq!(record.mappings[0].host_port, 8443);
    assert!(node.pods.writes.lock().unwrap().is_empty());

    node.pods.put(pod("nothing", None, web_ports()));
    assert_eq!(
        node.agent
            .add(&add_req("nothing", "sb2", "198.18.0.6"))
            .unwrap(),
        None
    );
    node.pods.put(pod("portless", Some(""), vec![]));
    assert_eq!(
        node.agent
            .add(&add_req("portless", "sb3", "198.18.0.7"))
            .unwrap(),
        None
    );
    assert_eq!(node.pods.writes.lock().unwrap().last().unwrap().1, "[]");
}

/// A CNI config directory holding kindnet's conflist (ptp, then portmap with the
/// portMappings capability), as `randportd install` finds it on a kind node.
fn kindnet_conf_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("randport-fakes-{}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/10-kindnet.conflist"
        ),
        dir.join("10-kindnet.conflist"),
    )
    .unwrap();
    dir
}

#[test]
fn explicit_host_ports_are_left_to_portmap_before_us_in_the_chain_and_still_listed() {
    let conf_dir = kindnet_conf_dir();
    let mut config = config("20000-20099");
    config.cni_conf_dir = Some(conf_dir.clone());
    let node = node_with_config(config, Arc::default(), Arc::default());
    node.agent.start().unwrap();
    let mut explicit = ContainerPort::new("web", 443, Protocol::Tcp);
    explicit.host_port = Some(8443);
    let ports = vec![ContainerPort::new("web", 80, Protocol::Tcp), explicit];

    // Annotated: the random port is ours; 8443 is portmap's, listed in the annotation.
    node.pods.put(pod("both", Some(""), ports.clone()));
    let record = node
        .agent
        .add(&add_req("both", "sb1", "198.18.0.5"))
        .unwrap()
        .unwrap();
    let owned: Vec<u16> = record.owned().map(|m| m.host_port).collect();
    assert_eq!(owned.len(), 1);
    assert!((20000..=20099).contains(&owned[0]));
    assert!(record.mappings[1].delegated && record.mappings[1].host_port == 8443);
    let held: Vec<u16> = node
        .holder
        .calls
        .lock()
        .unwrap()
        .iter()
        .map(|c| c.1)
        .collect();
    assert_eq!(held, owned, "only the random port is held");
    // One DNAT element (the random port's) and the pod's hairpin element; none for 8443.
    assert_eq!(node.firewall.present.lock().unwrap()[&record.sandbox], 2);
    let written = node.pods.writes.lock().unwrap().last().unwrap().1.clone();
    assert!(
        written.contains(r#""hostPort":8443"#)
            && written.contains(&format!(r#""hostPort":{}"#, owned[0])),
        "{written}"
    );
    node.agent.check(&record.sandbox).unwrap();
    assert_eq!(node.agent.gauges().range_used[0], 1);
    // The pod's Event says which ports it got, and who maps 8443.
    let mapped = node.pods.mapped.lock().unwrap().clone();
    assert_eq!(mapped.len(), 1);
    assert_eq!(
        mapped[0].1,
        format!(
            "randport mapped 80/TCP -> host port {}, 443/TCP -> host port 8443 (by an earlier \
             plugin) on node node-0",
            owned[0]
        )
    );

    // Without the annotation: nothing of ours, so no record and no rule (8443 is outside
    // the random range: nothing to reserve).
    node.pods.put(pod("plain", None, ports.clone()));
    assert_eq!(
        node.agent
            .add(&add_req("plain", "sb2", "198.18.0.6"))
            .unwrap(),
        None
    );
    assert!(
        !node
            .firewall
            .present
            .lock()
            .unwrap()
            .contains_key(&SandboxId("sb2".into()))
    );

    node.agent.del(&record.sandbox).unwrap();
    assert_nothing_left(&node);

    // The same chain without portmap: randport maps 8443 itself.
    std::fs::write(
        conf_dir.join("10-kindnet.conflist"),
        r#"{"cniVersion": "0.3.1", "name": "kindnet", "plugins": [{"type": "ptp"}]}"#,
    )
    .unwrap();
    node.pods.put(pod("plain2", None, ports));
    let record = node
        .agent
        .add(&add_req("plain2", "sb3", "198.18.0.7"))
        .unwrap()
        .unwrap();
    assert!(record.mappings.iter().all(|m| m.owned()));
    assert_eq!(record.mappings[0].host_port, 8443);
    std::fs::remove_dir_all(&conf_dir).unwrap();
}

#[test]
fn a_failing_firewall_undoes_the_add() {
    let node = started("20000-20099");
    node.pods.put(pod("web-0", Some(""), web_ports()));
    node.firewall.fail_add.store(true, Ordering::SeqCst);
    let (code, details) = error_code(&node, Request::Add(add_req("web-0", "sb1", "198.18.0.5")));
    assert_eq!(code, 103);
    assert!(
        details.contains("injected failure") && details.contains("ports were released"),
        "{details}"
    );
    assert_nothing_left(&node);
    assert!(
        node.pods.writes.lock().unwrap().is_empty(),
        "no writeback after a failed step"
    );
    node.firewall.fail_add.store(false, Ordering::SeqCst);
    node.agent
        .add(&add_req("web-0", "sb1", "198.18.0.5"))
        .unwrap()
        .unwrap();
}

#[test]
fn a_failing_state_store_undoes_the_add() {
    let node = started("20000-20099");
    node.pods.put(pod("web-0", Some(""), web_ports()));
    node.state.fail_save.store(true, Ordering::SeqCst);
    let (code, details) = error_code(&node, Request::Add(add_req("web-0", "sb1", "198.18.0.5")));
    assert_eq!(code, 5);
    assert!(details.contains("disk full"), "{details}");
    assert_nothing_left(&node);
    assert!(
        !node
            .firewall
            .calls
            .lock()
            .unwrap()
            .iter()
            .any(|c| c.starts_with("add"))
    );
}

#[test]
fn a_failing_writeback_undoes_the_add() {
    let node = started("20000-20099");
    node.pods.put(pod("web-0", Some(""), web_ports()));
    node.pods.fail_write.store(true, Ordering::SeqCst);
    let (code, details) = error_code(&node, Request::Add(add_req("web-0", "sb1", "198.18.0.5")));
    assert_eq!(code, 104);
    assert!(details.contains("API unreachable"), "{details}");
    assert_nothing_left(&node);
    assert_eq!(
        *node.firewall.calls.lock().unwrap(),
        vec!["replace_all(0)", "add_many(1)", "remove(sb1)"]
    );
}

#[test]
fn busy_ports_are_skipped_and_explicit_busy_ports_fail() {
    let node = started("20000-20003");
    node.holder
        .busy
        .lock()
        .unwrap()
        .extend([20000, 20001, 20003]);
    node.pods.put(pod(
        "web-0",
        Some(""),
        vec![ContainerPort::new("web", 80, Protocol::Tcp)],
    ));
    let record = node
        .agent
        .add(&add_req("web-0", "sb1", "198.18.0.5"))
        .unwrap()
        .unwrap();
    assert_eq!(record.mappings[0].host_port, 20002);

    let mut explicit = ContainerPort::new("web", 80, Protocol::Tcp);
    explicit.host_port = Some(20003);
    node.pods.put(pod("web-1", None, vec![explicit]));
    let (code, details) = error_code(&node, Request::Add(add_req("web-1", "sb2", "198.18.0.6")));
    assert_eq!(code, 101);
    assert!(
        details.contains("hostPort 20003/TCP, which another process on this node holds"),
        "{details}"
    );

    node.pods.put(pod(
        "web-2",
        Some(""),
        vec![ContainerPort::new("web", 80, Protocol::Tcp)],
    ));
    let (code, details) = error_code(&node, Request::Add(add_req("web-2", "sb3", "198.18.0.7")));
    assert_eq!(code, 101);
    assert!(
        details.contains("no free TCP host port in range 20000-20003"),
        "{details}"
    );
    assert_eq!(node.agent.list().len(), 1);
}

#[test]
fn bad_pods_change_nothing() {
    let node = started("20000-20099");
    node.pods.put(pod("garbage", Some("{oops"), web_ports()));
    let (code, details) = error_code(&node, Request::Add(add_req("garbage", "sb1", "198.18.0.5")));
    assert_eq!(code, 102);
    assert!(
        details.contains("pod shop/garbage") && details.contains("\"{oops\""),
        "{details}"
    );
    let (code, _) = error_code(&node, Request::Add(add_req("missing", "sb2", "198.18.0.5")));
    assert_eq!(code, 11, "unknown pod: try again later");
    let (code, details) = error_code(
        &node,
        Request::Add(add_req("garbage", "../x", "198.18.0.5")),
    );
    assert_eq!(code, 5);
    assert!(details.contains("not a valid container id"), "{details}");
    assert_nothing_left(&node);
    assert!(node.holder.calls.lock().unwrap().is_empty());
}

#[test]
fn del_releases_everything_and_is_idempotent() {
    let node = started("20000-20000");
    node.agent.del(&SandboxId("never-added".into())).unwrap();
    node.pods.put(pod("web-0", Some(""), web_ports()));
    let record = node
        .agent
        .add(&add_req("web-0", "sb1", "198.18.0.5"))
        .unwrap()
        .unwrap();
    assert!(node.agent.conntrack_idle(Duration::from_secs(2)));
    node.conntrack.flushed.lock().unwrap().clear();
    node.conntrack.kept.lock().unwrap().clear();
    node.agent.del(&record.sandbox).unwrap();
    node.agent.del(&record.sandbox).unwrap();
    assert_nothing_left(&node);
    assert!(
        node.agent.conntrack_idle(Duration::from_secs(2)),
        "conntrack flush not done"
    );
    assert_eq!(
        *node.conntrack.flushed.lock().unwrap(),
        vec![(PortKey::any(Protocol::Udp), 20000)]
    );
    // After a DEL no flow stays.
    assert_eq!(
        *node.conntrack.kept.lock().unwrap(),
        vec![Vec::<std::net::SocketAddr>::new()]
    );
    // The single port of the range is free again.
    node.pods.put(pod("web-1", Some(""), web_ports()));
    node.agent
        .add(&add_req("web-1", "sb2", "198.18.0.6"))
        .unwrap()
        .unwrap();
}

#[test]
fn check_fails_when_a_rule_is_missing() {
    let node = started("20000-20099");
    node.pods.put(pod("web-0", Some(""), web_ports()));
    node.agent
        .add(&add_req("web-0", "sb1", "198.18.0.5"))
        .unwrap();
    node.agent.check(&SandboxId("sb1".into())).unwrap();
    node.agent.check(&SandboxId("unknown".into())).unwrap();
    node.firewall.present.lock().unwrap().clear();
    let (code, details) = error_code(
        &node,
        Request::Check {
            sandbox: SandboxId("sb1".into()),
        },
    );
    assert_eq!(code, 105);
    assert!(
        details.contains("sandbox sb1 of pod shop/web-0: its fake rules are incomplete"),
        "{details}"
    );
}

#[test]
fn gc_releases_every_sandbox_not_listed() {
    let node = started("20000-20099");
    for i in 0..3 {
        node.pods
            .put(pod(&format!("web-{i}"), Some(""), web_ports()));
        node.agent
            .add(&add_req(
                &format!("web-{i}"),
                &format!("sb{i}"),
                &format!("198.18.0.{}", 5 + i),
            ))
            .unwrap();
    }
    assert_eq!(
        node.agent
            .gc(Some(&[SandboxId("sb1".into())]), None)
            .unwrap(),
        2
    );
    let left: Vec<String> = node
        .agent
        .list()
        .iter()
        .map(|r| r.sandbox.0.clone())
        .collect();
    assert_eq!(left, vec!["sb1"]);
    assert_eq!(node.state.load_all().unwrap().len(), 1);
}

#[test]
fn not_ready_until_started() {
    let node = node_with("20000-20099", Arc::default(), Arc::default());
    node.pods.put(pod("web-0", Some(""), web_ports()));
    assert_eq!(
        node.agent.handle(Request::Status),
        Response::Ok {
            records: vec![],
            ready: false
        }
    );
    let (code, details) = error_code(&node, Request::Add(add_req("web-0", "sb1", "198.18.0.5")));
    assert_eq!(code, 11);
    assert!(details.contains("still starting"));
    node.agent.start().unwrap();
    assert_eq!(
        node.agent.handle(Request::Status),
        Response::Ok {
            records: vec![],
            ready: true
        }
    );
}

#[test]
fn restart_restores_reconciles_and_rebuilds_in_one_batch() {
    let state = Arc::new(MemoryStateStore::default());
    let pods = Arc::new(FakePodSource::default());
    let first = node_with("20000-20099", Arc::clone(&state), Arc::clone(&pods));
    first.agent.start().unwrap();
    for i in 0..3 {
        pods.put(pod(&format!("web-{i}"), Some(""), web_ports()));
        first
            .agent
            .add(&add_req(
                &format!("web-{i}"),
                &format!("sb{i}"),
                &format!("198.18.0.{}", 5 + i),
            ))
            .unwrap();
    }
    let before = first.agent.list();
    drop(first);

    // While the agent was down: web-1 was deleted, web-2's annotation was lost.
    pods.remove(&PodRef::new("shop", "web-1"));
    let mut web2 = get_pod(&pods, "web-2");
    web2.annotation = Some(String::new());
    pods.put(web2);

    let second = node_with("20000-20099", Arc::clone(&state), Arc::clone(&pods));
    let report = second.agent.start().unwrap();
    assert_eq!(report.restored, 3);
    assert_eq!(report.released, vec![SandboxId("sb1".into())]);
    assert_eq!(report.rewritten, vec![before[2].pod.clone()]);
    assert_eq!(
        second.firewall.calls.lock().unwrap()[0],
        "replace_all(3)",
        "one batch with every restored sandbox"
    );
    assert_eq!(
        second.holder.calls.lock().unwrap().len(),
        6,
        "every port held again"
    );
    assert_eq!(
        second.agent.list(),
        vec![before[0].clone(), before[2].clone()]
    );
    assert_eq!(
        get_pod(&pods, "web-2").annotation.unwrap(),
        encode(&before[2].annotation_entries())
    );
    // Restored ports are not handed out again.
    pods.put(pod("web-9", Some(""), web_ports()));
    let new = second
        .agent
        .add(&add_req("web-9", "sb9", "198.18.0.20"))
        .unwrap()
        .unwrap();
    for m in &new.mappings {
        let clash = before[0]
            .mappings
            .iter()
            .chain(&before[2].mappings)
            .any(|o| o.host_port == m.host_port && o.protocol == m.protocol);
        assert!(!clash, "{m:?} handed out twice");
    }
}

#[test]
fn repair_reapplies_a_flushed_firewall() {
    let node = started("20000-20099");
    node.pods.put(pod("web-0", Some(""), web_ports()));
    node.agent
        .add(&add_req("web-0", "sb1", "198.18.0.5"))
        .unwrap();
    assert!(!node.agent.repair().unwrap());
    node.firewall.teardown().unwrap();
    assert!(node.agent.repair().unwrap());
    assert_eq!(
        node.firewall.calls.lock().unwrap().last().unwrap(),
        "replace_all(1)"
    );
    node.agent.check(&SandboxId("sb1".into())).unwrap();
    assert!(
        node.agent
            .metrics
            .render(node.agent.gauges())
            .contains("randport_firewall_repairs_total 1")
    );
}

#[test]
fn the_watchdog_skips_checks_while_no_rule_and_no_record_changed() {
    let node = started("20000-20099");
    let checks = |node: &Node| node.agent.metrics.checks();
    // Without a generation every round lists the rules.
    assert!(!node.agent.repair().unwrap());
    assert!(!node.agent.repair().unwrap());
    assert_eq!(checks(&node), (2, 0));

    *node.firewall.generation.lock().unwrap() = Some(7);
    assert!(!node.agent.repair().unwrap());
    assert!(!node.agent.repair().unwrap());
    assert!(!node.agent.repair().unwrap());
    assert_eq!(checks(&node), (3, 2), "one listing, then skips");

    // A new generation (somebody changed a rule somewhere) means a listing.
    *node.firewall.generation.lock().unwrap() = Some(8);
    assert!(!node.agent.repair().unwrap());
    assert_eq!(checks(&node), (4, 2));

    // New records mean a listing too, even if the generation were the same.
    node.pods.put(pod("web-0", Some(""), web_ports()));
    node.agent
        .add(&add_req("web-0", "sb1", "198.18.0.5"))
        .unwrap();
    assert!(!node.agent.repair().unwrap());
    assert_eq!(checks(&node), (5, 2));

    // A flush that the generation shows is repaired, and the repair is checked again.
    node.firewall.teardown().unwrap();
    *node.firewall.generation.lock().unwrap() = Some(9);
    assert!(node.agent.repair().unwrap());
    assert!(!node.agent.repair().unwrap());
    assert_eq!(checks(&node), (7, 2));
    assert!(!node.agent.repair().unwrap());
    assert_eq!(checks(&node), (7, 3));
    let page = node.agent.metrics.render(node.agent.gauges());
    assert!(
        page.contains("randport_firewall_checks_total{result=\"listed\"} 7")
            && page.contains("randport_firewall_checks_total{result=\"skipped\"} 3"),
        "{page}"
    );
}

#[test]
fn handle_counts_requests_and_failures() {
    let node = started("20000-20099");
    node.pods.put(pod("web-0", Some(""), web_ports()));
    node.agent
        .handle(Request::Add(add_req("web-0", "sb1", "198.18.0.5")));
    node.agent
        .handle(Request::Add(add_req("gone", "sb2", "198.18.0.6")));
    node.agent.handle(Request::Del {
        sandbox: SandboxId("sb1".into()),
    });
    let text = node.agent.metrics.render(node.agent.gauges());
    for line in [
        "randport_cni_requests_total{verb=\"ADD\"} 1",
        "randport_cni_requests_total{verb=\"DEL\"} 1",
        "randport_failures_total{reason=\"pod_lookup\",code=\"11\"} 1",
        "randport_mappings 0",
    ] {
        assert!(text.contains(line), "{line} missing:\n{text}");
    }
}

#[test]
fn concurrent_adds_are_committed_in_batches_and_never_share_a_port() {
    let node = Arc::new(started("20000-20199"));
    *node.firewall.batch_delay.lock().unwrap() = Duration::from_millis(20);
    for i in 0..40 {
        node.pods.put(pod(&format!("c-{i}"), Some(""), web_ports()));
    }
    node.firewall
        .fail_for
        .lock()
        .unwrap()
        .insert(SandboxId("sb7".into()));
    let handles: Vec<_> = (0..40)
        .map(|i| {
            let node = Arc::clone(&node);
            std::thread::spawn(move || {
                node.agent.add(&add_req(
                    &format!("c-{i}"),
                    &format!("sb{i}"),
                    &format!("198.18.1.{i}"),
                ))
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (i, result) in results.iter().enumerate() {
        assert_eq!(result.is_ok(), i != 7, "sandbox sb{i}: {result:?}");
    }
    let batches = node
        .firewall
        .calls
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.starts_with("add_many"))
        .count();
    assert!(
        batches < 40,
        "no batching: {batches} transactions for 40 ADDs"
    );
    let records = node.agent.list();
    assert_eq!(records.len(), 39, "the failed ADD left nothing behind");
    let mut seen = std::collections::HashSet::new();
    for m in records.iter().flat_map(|r| &r.mappings) {
        assert!(
            seen.insert((m.protocol, m.host_port)),
            "port {} given twice",
            m.host_port
        );
    }
    for r in &records {
        node.agent.check(&r.sandbox).unwrap();
    }
    assert_eq!(node.state.load_all().unwrap().len(), 39);
}

// ---- Abandoned ADDs: a DEL or GC between any two steps of an ADD leaves nothing. ----

const WAIT: Duration = Duration::from_secs(10);

/// Runs an ADD of web-0 (sandbox sb1) on another thread while `gate` is closed, waits
/// until the ADD is stopped at the gate, calls `meanwhile`, opens the gate and returns
/// the ADD's answer.
fn add_stopped_at(
    node: &Node,
    gate: &randport_plugin::testing::Gate,
    meanwhile: impl FnOnce(),
) -> Response {
    node.pods.put(pod("web-0", Some(""), web_ports()));
    gate.close();
    std::thread::scope(|s| {
        let add = s.spawn(|| {
            node.agent
                .handle(Request::Add(add_req("web-0", "sb1", "198.18.0.5")))
        });
        assert!(
            gate.wait_for_waiting(1, WAIT),
            "the ADD never reached the gate"
        );
        meanwhile();
        gate.open();
        add.join().unwrap()
    })
}

fn del_sb1(node: &Node) -> Response {
    node.agent.handle(Request::Del {
        sandbox: SandboxId("sb1".into()),
    })
}

fn assert_deleted_during_add(response: Response) {
    match response {
        Response::Error(e) => {
            assert_eq!(e.code, 107, "{e:?}");
            assert!(
                e.details.contains("undid what it had done"),
                "{}",
                e.details
            );
        }
        ok => panic!("the abandoned ADD succeeded: {ok:?}"),
    }
}

fn ok_empty() -> Response {
    Response::Ok {
        records: vec![],
        ready: true,
    }
}

#[test]
fn a_del_while_the_add_waits_for_the_api_server_cancels_it_at_once() {
    let node = started("20000-20099");
    let answered = add_stopped_at(&node, &node.pods.get_gate, || {
        // The API server does not answer; the runtime gives up and sends DEL, which is
        // answered without waiting for the ADD.
        let started = std::time::Instant::now();
        assert_eq!(del_sb1(&node), ok_empty());
        assert!(started.elapsed() < Duration::from_secs(1));
    });
    assert_deleted_during_add(answered);
    assert_nothing_left(&node);
    assert!(node.pods.writes.lock().unwrap().is_empty(), "no writeback");
    assert!(node.holder.calls.lock().unwrap().is_empty(), "no port held");
}

#[test]
fn a_del_during_the_save_waits_for_that_step_and_the_add_undoes_itself() {
    let node = started("20000-20099");
    let answered = add_stopped_at(&node, &node.state.save_gate, || {
        std::thread::scope(|s| {
            let del = s.spawn(|| del_sb1(&node));
            std::thread::sleep(Duration::from_millis(100));
            assert!(
                !del.is_finished(),
                "the DEL did not wait for the step in progress"
            );
            node.state.save_gate.open();
            assert_eq!(del.join().unwrap(), ok_empty());
        });
    });
    assert_deleted_during_add(answered);
    assert_nothing_left(&node);
    let calls = node.firewall.calls.lock().unwrap().clone();
    assert!(
        !calls.iter().any(|c| c.starts_with("add")),
        "no rule added after the DEL: {calls:?}"
    );
}

#[test]
fn a_del_during_the_firewall_commit_leaves_no_rule() {
    let node = started("20000-20099");
    let answered = add_stopped_at(&node, &node.firewall.add_gate, || {
        std::thread::scope(|s| {
            let del = s.spawn(|| del_sb1(&node));
            std::thread::sleep(Duration::from_millis(100));
            assert!(!del.is_finished(), "the DEL did not wait for the commit");
            node.firewall.add_gate.open();
            assert_eq!(del.join().unwrap(), ok_empty());
        });
    });
    assert_deleted_during_add(answered);
    assert_nothing_left(&node);
}

#[test]
fn a_del_during_the_writeback_removes_the_mapping_at_once() {
    let node = started("20000-20099");
    let answered = add_stopped_at(&node, &node.pods.write_gate, || {
        // The rules are in and the PATCH hangs: the DEL removes them now, not when the
        // API server answers.
        assert!(
            node.firewall
                .present
                .lock()
                .unwrap()
                .contains_key(&SandboxId("sb1".into()))
        );
        assert_eq!(del_sb1(&node), ok_empty());
        assert!(node.firewall.present.lock().unwrap().is_empty());
        assert_eq!(node.agent.gauges().range_used, [0, 0, 0]);
    });
    assert_deleted_during_add(answered);
    assert_nothing_left(&node);
    assert!(
        node.pods.mapped.lock().unwrap().is_empty(),
        "no PortsMapped Event for a deleted sandbox"
    );
}

#[test]
fn a_del_that_comes_first_makes_a_late_add_fail() {
    let node = started("20000-20099");
    node.pods.put(pod("web-0", Some(""), web_ports()));
    assert_eq!(del_sb1(&node), ok_empty());
    let (code, details) = error_code(&node, Request::Add(add_req("web-0", "sb1", "198.18.0.5")));
    assert_eq!(code, 107);
    assert!(details.contains("before its ADD arrived"), "{details}");
    assert_nothing_left(&node);
    // Another sandbox of the pod is not concerned.
    node.agent
        .add(&add_req("web-0", "sb2", "198.18.0.6"))
        .unwrap()
        .unwrap();
    // A DEL of a sandbox that was mapped leaves no tombstone: nothing to refuse later.
    assert_eq!(
        node.agent.handle(Request::Del {
            sandbox: SandboxId("sb2".into())
        }),
        ok_empty()
    );
}

#[test]
fn a_gc_that_does_not_list_a_running_add_cancels_it() {
    let node = started("20000-20099");
    let answered = add_stopped_at(&node, &node.pods.get_gate, || {
        assert_eq!(node.agent.gc(Some(&[]), None).unwrap(), 0);
    });
    assert_deleted_during_add(answered);
    assert_nothing_left(&node);
}

#[test]
fn a_second_add_of_one_sandbox_waits_for_the_first_and_gets_its_record() {
    let node = started("20000-20099");
    node.pods.put(pod("web-0", Some(""), web_ports()));
    node.state.save_gate.close();
    let (first, second) = std::thread::scope(|s| {
        let first = s.spawn(|| node.agent.add(&add_req("web-0", "sb1", "198.18.0.5")));
        assert!(node.state.save_gate.wait_for_waiting(1, WAIT));
        let second = s.spawn(|| node.agent.add(&add_req("web-0", "sb1", "198.18.0.5")));
        std::thread::sleep(Duration::from_millis(100));
        // It must not answer with a record that is not committed yet.
        assert!(!second.is_finished(), "the second ADD did not wait");
        node.state.save_gate.open();
        (first.join().unwrap(), second.join().unwrap())
    });
    let first = first.unwrap().unwrap();
    assert_eq!(second.unwrap().unwrap(), first);
    assert_eq!(node.agent.list(), vec![first]);
    assert_eq!(node.state.save_gate.arrived(), 1, "saved once");
    assert_eq!(node.agent.gauges().range_used, [1, 1, 0]);
}

#[test]
fn an_add_past_the_agents_deadline_is_undone() {
    let mut config = config("20000-20099");
    config.add_deadline = Duration::from_millis(200);
    let node = node_with_config(config, Arc::default(), Arc::default());
    node.agent.start().unwrap();
    let answered = add_stopped_at(&node, &node.pods.write_gate, || {
        std::thread::sleep(Duration::from_millis(300));
    });
    match answered {
        Response::Error(e) => {
            assert_eq!(e.code, 11, "{e:?}");
            assert!(
                e.details
                    .contains("took longer than 200ms (at writing the annotation back)"),
                "{}",
                e.details
            );
        }
        ok => panic!("expected the deadline, got {ok:?}"),
    }
    assert_nothing_left(&node);
}

#[test]
fn two_hundred_abandoned_adds_leave_nothing_and_never_reach_the_next_pod() {
    // Each round: an ADD stopped at a random step, a DEL of its sandbox meanwhile, then a
    // new pod given the same IP. The abandoned sandbox keeps nothing; the new pod's
    // mapping is the only one with that IP.
    let node = started("20000-20999");
    let gates: [&randport_plugin::testing::Gate; 4] = [
        &node.pods.get_gate,
        &node.state.save_gate,
        &node.firewall.add_gate,
        &node.pods.write_gate,
    ];
    let mut rng = fastrand::Rng::with_seed(24);
    for round in 0..200 {
        let name = format!("app-{round}");
        let sandbox = format!("abandoned{round}");
        node.pods.put(pod(&name, Some(""), web_ports()));
        let gate = gates[rng.usize(..gates.len())];
        gate.close();
        let answered = std::thread::scope(|s| {
            let add = s.spawn(|| {
                node.agent
                    .handle(Request::Add(add_req(&name, &sandbox, "198.18.0.9")))
            });
            assert!(gate.wait_for_waiting(1, WAIT), "round {round}");
            let del = s.spawn(|| {
                node.agent.handle(Request::Del {
                    sandbox: SandboxId(sandbox.clone()),
                })
            });
            // Once the DEL has reached the agent (the ADD is cancelled), let the ADD go on.
            let cancelled = (SandboxId(sandbox.clone()), true);
            let deadline = std::time::Instant::now() + WAIT;
            while !node.agent.adds_in_progress().contains(&cancelled) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "round {round}: no cancel"
                );
                std::thread::yield_now();
            }
            std::thread::sleep(Duration::from_millis(rng.u64(0..2)));
            gate.open();
            assert_eq!(del.join().unwrap(), ok_empty(), "round {round}");
            add.join().unwrap()
        });
        assert!(
            matches!(answered, Response::Error(ref e) if e.code == 107),
            "round {round}: {answered:?}"
        );
        // The IP goes to the next pod.
        let next = format!("next-{round}");
        node.pods.put(pod(&next, Some(""), web_ports()));
        node.agent
            .add(&add_req(&next, &format!("next{round}"), "198.18.0.9"))
            .unwrap()
            .unwrap();
        let records = node.agent.list();
        let with_ip: Vec<_> = records
            .iter()
            .filter(|r| r.pod_ips.contains(&"198.18.0.9".parse().unwrap()))
            .map(|r| r.sandbox.0.clone())
            .collect();
        assert_eq!(with_ip, vec![format!("next{round}")], "round {round}");
        node.agent.del(&SandboxId(format!("next{round}"))).unwrap();
    }
    assert_nothing_left(&node);
    assert_eq!(node.holder.calls.lock().unwrap().len() % 2, 0);
}

// ---- A failed DEL is retried, not forgotten. ----

#[test]
fn a_del_whose_rule_removal_fails_keeps_the_record_until_a_retry_succeeds() {
    let node = started("20000-20099");
    node.pods.put(pod("web-0", Some(""), web_ports()));
    node.agent
        .add(&add_req("web-0", "sb1", "198.18.0.5"))
        .unwrap();
    node.firewall.fail_removals.store(1, Ordering::SeqCst);
    let (code, details) = error_code(
        &node,
        Request::Del {
            sandbox: SandboxId("sb1".into()),
        },
    );
    assert_eq!(code, 106);
    assert!(
        details.contains("stays, its ports held, until a retried DEL"),
        "{details}"
    );
    // Nothing is forgotten: the record (memory and disk) and its ports stay.
    assert_eq!(node.agent.list().len(), 1);
    assert_eq!(node.state.load_all().unwrap().len(), 1);
    assert_eq!(node.agent.gauges().range_used, [1, 1, 0]);
    // A new ADD of that sandbox is refused while it is being removed.
    let (code, _) = error_code(&node, Request::Add(add_req("web-0", "sb1", "198.18.0.5")));
    assert_eq!(code, 11);
    // The watchdog's rebuild leaves its rules out meanwhile.
    assert!(node.agent.repair().unwrap());
    assert!(node.firewall.present.lock().unwrap().is_empty());
    // The runtime's retry finishes it.
    assert_eq!(del_sb1(&node), ok_empty());
    assert_nothing_left(&node);
    assert!(
        node.agent
            .metrics
            .render(node.agent.gauges())
            .contains("randport_removals_failed_total 1")
    );
}

#[test]
fn a_del_whose_record_cannot_be_deleted_is_retried_too() {
    let node = started("20000-20099");
    node.pods.put(pod("web-0", Some(""), web_ports()));
    node.agent
        .add(&add_req("web-0", "sb1", "198.18.0.5"))
        .unwrap();
    node.state.fail_deletes.store(1, Ordering::SeqCst);
    let (code, _) = error_code(
        &node,
        Request::Del {
            sandbox: SandboxId("sb1".into()),
        },
    );
    assert_eq!(code, 106);
    assert_eq!(node.agent.list().len(), 1, "not forgotten");
    assert_eq!(
        node.agent.gauges().range_used,
        [1, 1, 0],
        "ports still held"
    );
    assert_eq!(del_sb1(&node), ok_empty());
    assert_nothing_left(&node);
}

// ---- GC without its key. ----

#[test]
fn a_gc_without_valid_attachments_releases_nothing() {
    let node = started("20000-20099");
    for i in 0..2 {
        node.pods
            .put(pod(&format!("web-{i}"), Some(""), web_ports()));
        node.agent
            .add(&add_req(
                &format!("web-{i}"),
                &format!("sb{i}"),
                &format!("198.18.0.{}", 5 + i),
            ))
            .unwrap();
    }
    assert_eq!(
        node.agent.handle(Request::Gc {
            valid: None,
            network: None
        }),
        ok_empty()
    );
    assert_eq!(node.agent.list().len(), 2);
    assert_eq!(node.firewall.present.lock().unwrap().len(), 2);
}

// ---- Start-up with conflicting records. ----

fn record_for(name: &str, sandbox: &str, ip: &str, port: u16) -> randport_core::SandboxRecord {
    let mut pod = PodRef::new("shop", name);
    pod.uid = format!("uid-{name}");
    randport_core::SandboxRecord {
        network: None,
        sandbox: SandboxId(sandbox.into()),
        pod,
        pod_ips: vec![ip.parse().unwrap()],
        mappings: vec![randport_core::Mapping {
            container: "web".into(),
            host_ip: None,
            host_port: port,
            container_port: 80,
            protocol: Protocol::Tcp,
            explicit: false,
            delegated: false,
        }],
    }
}

/// An agent started over two records of pod web-0 (sandbox, address), the older first,
/// on ports 20001 and 20002.
fn started_with_two_sandboxes_of_web_0(older: (&str, &str), newer: (&str, &str)) -> Node {
    let state = Arc::new(MemoryStateStore::default());
    for ((sandbox, ip), port) in [(older, 20001), (newer, 20002)] {
        state.save(&record_for("web-0", sandbox, ip, port)).unwrap();
    }
    let pods = Arc::new(FakePodSource::default());
    pods.put(pod(
        "web-0",
        Some("[]"),
        vec![ContainerPort::new("web", 80, Protocol::Tcp)],
    ));
    let node = node_with("20000-20099", state, pods);
    node.agent.start().unwrap();
    node
}

#[test]
fn at_start_the_newest_sandbox_of_a_pod_writes_its_annotation() {
    // Two sandboxes of one pod recorded (the old one's DEL never came); the newer one's
    // id sorts first, so an order by id would pick the older.
    let node =
        started_with_two_sandboxes_of_web_0(("zzz-old", "198.18.0.5"), ("aaa-new", "198.18.0.6"));
    let writes = node.pods.writes.lock().unwrap().clone();
    assert_eq!(writes.len(), 1, "{writes:?}");
    assert!(
        writes[0].1.contains("\"hostPort\":20002") && writes[0].1.contains("198.18.0.6"),
        "{writes:?}"
    );
}

#[test]
fn at_start_two_records_claiming_one_port_leave_one_owner() {
    let state = Arc::new(MemoryStateStore::default());
    state
        .save(&record_for("old-0", "sb-old", "198.18.0.5", 20001))
        .unwrap();
    state
        .save(&record_for("new-0", "sb-new", "198.18.0.6", 20001))
        .unwrap();
    let pods = Arc::new(FakePodSource::default());
    for name in ["old-0", "new-0"] {
        pods.put(pod(
            name,
            Some(""),
            vec![ContainerPort::new("web", 80, Protocol::Tcp)],
        ));
    }
    let node = node_with("20000-20099", state, pods);
    let report = node.agent.start().unwrap();
    assert_eq!(report.conflicts, vec![SandboxId("sb-old".into())]);
    assert!(
        report.warnings.iter().any(|w| w.contains("sandbox sb-old of pod shop/old-0 and the newer sandbox sb-new of pod shop/new-0 both claim host port 20001")),
        "{:?}",
        report.warnings
    );
    let left: Vec<_> = node.agent.list().into_iter().map(|r| r.sandbox.0).collect();
    assert_eq!(left, vec!["sb-new"]);
    assert_eq!(
        node.state.load_all().unwrap().len(),
        1,
        "the loser's record is gone"
    );
    assert_eq!(node.firewall.present.lock().unwrap().len(), 1);
}

// ---- Ports left to portmap are reserved. ----

#[test]
fn a_port_left_to_portmap_is_never_handed_out_at_random_also_after_a_restart() {
    let conf_dir = kindnet_conf_dir();
    let mut config = config("20050-20051");
    config.cni_conf_dir = Some(conf_dir.clone());
    let state = Arc::new(MemoryStateStore::default());
    let pods = Arc::new(FakePodSource::default());
    let node = node_with_config(config.clone(), Arc::clone(&state), Arc::clone(&pods));
    node.agent.start().unwrap();
    // portmap maps 20050 for this pod (no annotation: nothing of randport's).
    let mut explicit = ContainerPort::new("web", 80, Protocol::Tcp);
    explicit.host_port = Some(20050);
    node.pods.put(pod("pinned", None, vec![explicit]));
    assert_eq!(
        node.agent
            .add(&add_req("pinned", "sb-pinned", "198.18.0.5"))
            .unwrap(),
        None
    );
    let random = || vec![ContainerPort::new("web", 80, Protocol::Tcp)];
    node.pods.put(pod("a", Some(""), random()));
    let a = node
        .agent
        .add(&add_req("a", "sb-a", "198.18.0.6"))
        .unwrap()
        .unwrap();
    assert_eq!(a.mappings[0].host_port, 20051, "20050 is portmap's");
    node.pods.put(pod("b", Some(""), random()));
    let (code, _) = error_code(&node, Request::Add(add_req("b", "sb-b", "198.18.0.7")));
    assert_eq!(
        code, 101,
        "the range is used up: 20051 by a, 20050 by portmap"
    );

    // The reservation is recorded: a restarted agent keeps it.
    drop(node);
    let node = node_with_config(config, state, pods);
    node.agent.start().unwrap();
    node.agent.del(&SandboxId("sb-a".into())).unwrap();
    for i in 0..20 {
        let name = format!("c{i}");
        node.pods.put(pod(&name, Some(""), random()));
        let r = node
            .agent
            .add(&add_req(&name, &format!("sb-{name}"), "198.18.0.8"))
            .unwrap()
            .unwrap();
        assert_eq!(r.mappings[0].host_port, 20051);
        node.agent.del(&r.sandbox).unwrap();
    }
    // Once its pod is gone, portmap's port is free again.
    node.agent.del(&SandboxId("sb-pinned".into())).unwrap();
    assert_eq!(node.agent.gauges().range_used, [0, 0, 0]);
    std::fs::remove_dir_all(&conf_dir).unwrap();
}

#[test]
fn a_second_address_of_one_family_is_ignored_and_the_pod_starts() {
    let node = started("20000-20099");
    node.pods.put(pod("multi", Some(""), web_ports()));
    let mut req = add_req("multi", "sb1", "198.18.0.5");
    req.pod_ips = [
        "198.18.0.5",
        "198.18.0.99",
        "2001:db8:1::5",
        "2001:db8:1::99",
    ]
    .iter()
    .map(|ip| ip.parse().unwrap())
    .collect();
    let record = node.agent.add(&req).unwrap().unwrap();
    let ips: Vec<String> = record.pod_ips.iter().map(ToString::to_string).collect();
    assert_eq!(ips, vec!["198.18.0.5", "2001:db8:1::5"]);
}

#[test]
fn a_gc_of_one_network_leaves_the_sandboxes_of_another() {
    // Multus: randport chained in two networks; each network's GC lists only its own
    // attachments.
    let node = started("20000-20099");
    for (i, network) in ["kindnet", "storage"].iter().enumerate() {
        node.pods
            .put(pod(&format!("web-{i}"), Some(""), web_ports()));
        let mut req = add_req(
            &format!("web-{i}"),
            &format!("sb{i}"),
            &format!("198.18.0.{}", 5 + i),
        );
        req.network = Some((*network).into());
        node.agent.add(&req).unwrap();
    }
    assert_eq!(
        node.agent.handle(Request::Gc {
            valid: Some(vec![SandboxId("sb0".into())]),
            network: Some("kindnet".into())
        }),
        ok_empty()
    );
    let left: Vec<String> = node
        .agent
        .list()
        .iter()
        .map(|r| r.sandbox.0.clone())
        .collect();
    assert_eq!(
        left,
        vec!["sb0", "sb1"],
        "storage's sandbox is not kindnet's to collect"
    );
    assert_eq!(
        node.agent.list()[1].network.as_deref(),
        Some("storage"),
        "recorded"
    );
    assert_eq!(node.agent.gc(Some(&[]), Some("storage")).unwrap(), 1);
    let left: Vec<String> = node
        .agent
        .list()
        .iter()
        .map(|r| r.sandbox.0.clone())
        .collect();
    assert_eq!(left, vec!["sb0"]);
}

#[test]
fn del_answers_only_after_the_udp_flows_of_its_ports_are_flushed() {
    let node = started("20000-20099");
    node.pods.put(pod("web-0", Some(""), web_ports()));
    let record = node
        .agent
        .add(&add_req("web-0", "sb1", "198.18.0.5"))
        .unwrap()
        .unwrap();
    assert!(node.agent.conntrack_idle(WAIT), "the ADD's flush is done");
    let udp = record
        .mappings
        .iter()
        .find(|m| m.protocol == Protocol::Udp)
        .unwrap()
        .host_port;
    node.conntrack.gate.close();
    std::thread::scope(|s| {
        let del = s.spawn(|| del_sb1(&node));
        assert!(node.conntrack.gate.wait_for_waiting(1, WAIT), "no flush");
        std::thread::sleep(Duration::from_millis(100));
        assert!(!del.is_finished(), "DEL answered before its flush");
        node.conntrack.gate.open();
        assert_eq!(del.join().unwrap(), ok_empty());
    });
    let flushed = node.conntrack.flushed.lock().unwrap().clone();
    assert_eq!(flushed.last().map(|f| f.1), Some(udp));
}

#[test]
fn a_late_del_of_a_stale_sandbox_keeps_what_the_pods_new_sandbox_shares() {
    // The old sandbox's record is still there (its DEL is late) and the new sandbox has
    // the same pod address: the removal must not take their shared hairpin element.
    let node = started_with_two_sandboxes_of_web_0(("old", "198.18.0.5"), ("new", "198.18.0.5"));
    node.firewall.calls.lock().unwrap().clear();
    node.agent.del(&SandboxId("old".into())).unwrap();
    // The fake cannot remove part of a sandbox: it rebuilds without the old one, which
    // is what a backend without a shared-element removal does.
    assert_eq!(*node.firewall.calls.lock().unwrap(), vec!["replace_all(1)"]);
    assert!(
        node.firewall
            .present
            .lock()
            .unwrap()
            .contains_key(&SandboxId("new".into()))
    );
    // Unshared: the usual removal.
    node.agent.del(&SandboxId("new".into())).unwrap();
    assert_eq!(
        node.firewall.calls.lock().unwrap().last().unwrap(),
        "remove(new)"
    );
}
