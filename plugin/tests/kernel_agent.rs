//! Root-only: the real `randportd` and `randport` on the real kernel, in fresh network
//! namespaces (a node, two pods, an outside client), on both firewall backends. TCP and
//! UDP through nodeIP:hostPort reach the right pod, stop after DEL, survive an agent
//! restart, and come back within 2 s after someone flushes our rules.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use randport_core::annotation::{AnnotationValue, decode};
use randport_core::{PodRef, Protocol};
use randport_itests::{Netns, TestNetns, root_and_tools_or_skip, test_netns};
use serde::Deserialize;
use serde_json::{Value, json};

const NODE_IP: &str = "192.0.2.1";
/// The agent's metrics, on the node namespace's loopback.
const METRICS: &str = "127.0.0.1:9740";

/// A running agent, killed (by its own pid) when dropped.
struct AgentProcess {
    child: Child,
    log: PathBuf,
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Cluster {
    node: Netns,
    client: Netns,
    pods: Vec<(String, Netns)>,
    dir: PathBuf,
    backend: &'static str,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Serves TCP (greets with the pod's name, then echoes lines) and UDP (answers every
/// datagram with the pod's name) inside `ns`.
fn serve(ns: &Netns, name: &str) {
    let (tcp, udp) = ns.inside(|| {
        (
            TcpListener::bind("0.0.0.0:8080").unwrap(),
            UdpSocket::bind("0.0.0.0:8081").unwrap(),
        )
    });
    let tcp_name = name.to_owned();
    std::thread::spawn(move || {
        for stream in tcp.incoming().flatten() {
            let name = tcp_name.clone();
            std::thread::spawn(move || {
                let mut writer = stream.try_clone().unwrap();
                let _ = writeln!(writer, "{name}");
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = writeln!(writer, "{line}");
                }
            });
        }
    });
    let udp_name = name.to_owned();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((_, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(udp_name.as_bytes(), from);
        }
    });
}

/// Pod `name`, the `i`-th: a namespace joined to `node` by veth `veth` (198.18.i.2 in the
/// pod, 198.18.i.1 on the node), serving.
fn pod_netns(node: &Netns, i: usize, veth: &str, name: &str) -> Netns {
    let ns = test_netns(name);
    ns.lo_up().unwrap();
    node.link_to(
        veth,
        &format!("198.18.{i}.1/24"),
        &ns,
        "eth0",
        &format!("198.18.{i}.2/24"),
    );
    ns.ipc(&["route", "add", "default", "via", &format!("198.18.{i}.1")]);
    serve(&ns, name);
    ns
}

impl Cluster {
    fn new(backend: &'static str) -> Cluster {
        let node = test_netns("node");
        let client = test_netns("client");
        for ns in [&node, &client] {
            ns.lo_up().unwrap();
        }
        node.link_to(
            "uplink",
            &format!("{NODE_IP}/24"),
            &client,
            "eth0",
            "192.0.2.254/24",
        );
        node.sysctl("net.ipv4.ip_forward", "1").unwrap();
        let mut pods = Vec::new();
        for (i, name) in ["pod-a", "pod-b"].into_iter().enumerate() {
            pods.push((
                name.to_owned(),
                pod_netns(&node, i, &format!("veth{i}"), name),
            ));
        }
        let dir = std::env::temp_dir().join(format!("randport-kernel-{}-{}", node.name(), backend));
        std::fs::create_dir_all(dir.join("pods/shop")).unwrap();
        for (name, _) in &pods {
            let pod = json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"),
                             "annotations": {"tkestack.io/portmapping": ""}},
                "spec": {"nodeName": "node-0", "containers": [{"name": "echo", "ports": [
                    {"containerPort": 8080, "protocol": "TCP"}, {"containerPort": 8081, "protocol": "UDP"}]}]}
            });
            std::fs::write(dir.join(format!("pods/shop/{name}.json")), pod.to_string()).unwrap();
        }
        Cluster {
            node,
            client,
            pods,
            dir,
            backend,
        }
    }

    /// Replaces pod `name`'s spec ports (and drops its annotation when `annotated` is false).
    fn set_pod_ports(&self, name: &str, annotated: bool, ports: Value) {
        let path = self.dir.join(format!("pods/shop/{name}.json"));
        let mut pod: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        pod["spec"]["containers"][0]["ports"] = ports;
        if !annotated {
            pod["metadata"]["annotations"] = json!({});
        }
        std::fs::write(&path, pod.to_string()).unwrap();
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    fn start_agent(&self) -> AgentProcess {
        self.start_agent_with(&[])
    }

    /// The agent with only `capabilities` in its bounding set (as a container that drops
    /// all others), when some are given.
    fn start_agent_with(&self, capabilities: &[String]) -> AgentProcess {
        let log = self.dir.join("agent.log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let _ = std::fs::remove_file(self.socket());
        let mut command = Command::new("ip");
        command.args(["netns", "exec", self.node.name()]);
        if !capabilities.is_empty() {
            let bounding: Vec<String> = capabilities
                .iter()
                .map(|c| format!("+{}", c.to_lowercase()))
                .collect();
            command
                .arg("setpriv")
                .arg(format!("--bounding-set=-all,{}", bounding.join(",")));
            command.arg("--");
        }
        let child = command
            .arg(env!("CARGO_BIN_EXE_randportd"))
            // One JSON object a line, so that tests can read the fields.
            .env("RANDPORT_LOG_FORMAT", "json")
            .args([
                "--node-name",
                "node-0",
                "--port-range",
                "20000-20999",
                "--metrics-addr",
                METRICS,
            ])
            .args(["--repair-interval-ms", "300", "--firewall", self.backend])
            .arg("--pods")
            .arg(format!("dir:{}", self.dir.join("pods").display()))
            .arg("--socket")
            .arg(self.socket())
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start randportd");
        let agent = AgentProcess { child, log };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (ok, _) = self.cni("STATUS", "", "");
            if ok {
                return agent;
            }
            assert!(
                Instant::now() < deadline,
                "randportd did not become ready:\n{}",
                std::fs::read_to_string(&agent.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `randportd list` against the running agent.
    fn list(&self, args: &[&str]) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_randportd"))
            .arg("list")
            .args(args)
            .arg("--socket")
            .arg(self.socket())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "randportd list: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs the plugin as a runtime would; (success, stdout).
    fn cni(&self, command: &str, sandbox: &str, pod: &str) -> (bool, String) {
        let pod_index = self.pods.iter().position(|(n, _)| n == pod).unwrap_or(0);
        let conf = json!({
            "cniVersion": "1.1.0", "name": "sim", "type": "randport", "socket": self.socket(),
            "stateDir": self.dir.join("state"),
            "prevResult": {"cniVersion": "1.1.0", "interfaces": [{"name": "eth0"}],
                           "ips": [{"address": format!("198.18.{pod_index}.2/24"), "gateway": format!("198.18.{pod_index}.1")}]}
        });
        // On the node, as a runtime runs it: a DEL without the agent works on its firewall.
        common::run_plugin_in(Some(self.node.name()), command, sandbox, pod, "", &conf)
    }

    fn add(&self, pod: &str) -> (u16, u16) {
        let (ok, stdout) = self.cni("ADD", &format!("sb-{pod}"), pod);
        assert!(ok, "ADD {pod} failed: {stdout}");
        let printed: Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(
            printed["ips"][0]["address"],
            format!(
                "198.18.{}.2/24",
                self.pods.iter().position(|(n, _)| n == pod).unwrap()
            )
        );
        self.host_ports(pod)
    }

    /// The (TCP, UDP) host ports written into the pod's annotation.
    fn host_ports(&self, pod: &str) -> (u16, u16) {
        let object: Value = serde_json::from_slice(
            &std::fs::read(self.dir.join(format!("pods/shop/{pod}.json"))).unwrap(),
        )
        .unwrap();
        let value = object["metadata"]["annotations"]["tkestack.io/portmapping"]
            .as_str()
            .unwrap();
        let AnnotationValue::Mapped(entries) = decode(&PodRef::new("shop", pod), value).unwrap()
        else {
            panic!("no mapping written for {pod}: {value:?}");
        };
        let port = |p: Protocol| entries.iter().find(|e| e.protocol == p).unwrap().host_port;
        (port(Protocol::Tcp), port(Protocol::Udp))
    }
}

/// UDP conntrack entries in `node` for flows sent to `port`.
fn conntrack_entries(node: &Netns, port: u16) -> usize {
    let out = node.out(
        "conntrack",
        &["-L", "-p", "udp", "--orig-port-dst", &port.to_string()],
        "",
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("udp"))
        .count()
}

/// From the outside client: the first line a TCP connection to nodeIP:port gets.
fn tcp_hello(client: &Netns, port: u16) -> Result<String, String> {
    let stream = client.inside(move || {
        TcpStream::connect_timeout(
            &SocketAddr::new(NODE_IP.parse().unwrap(), port),
            Duration::from_secs(2),
        )
    });
    let stream = stream.map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    Ok(line.trim().to_owned())
}

/// From the outside client: the answer to a UDP datagram to nodeIP:port.
fn udp_hello(client: &Netns, port: u16) -> Result<String, String> {
    let socket = client.inside(|| UdpSocket::bind("0.0.0.0:0").unwrap());
    socket
        .set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    socket
        .send_to(b"hello", (NODE_IP, port))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    let n = socket.recv(&mut buf).map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn ready(test: &str, backend: &str) -> bool {
    let tool = if backend == "nftables" {
        "nft"
    } else {
        "iptables-restore"
    };
    root_and_tools_or_skip(test, &[tool, "conntrack"])
}

fn traffic_reaches_the_right_pod_and_stops_after_del(backend: &'static str) {
    let cluster = Cluster::new(backend);
    let _agent = cluster.start_agent();
    let (a_tcp, a_udp) = cluster.add("pod-a");
    let (b_tcp, b_udp) = cluster.add("pod-b");
    assert_ne!(a_tcp, b_tcp);
    assert_eq!(tcp_hello(&cluster.client, a_tcp).as_deref(), Ok("pod-a"));
    assert_eq!(udp_hello(&cluster.client, a_udp).as_deref(), Ok("pod-a"));
    assert_eq!(tcp_hello(&cluster.client, b_tcp).as_deref(), Ok("pod-b"));
    assert_eq!(udp_hello(&cluster.client, b_udp).as_deref(), Ok("pod-b"));

    // ADD again: same ports. CHECK passes.
    assert_eq!(cluster.add("pod-a"), (a_tcp, a_udp));
    assert!(cluster.cni("CHECK", "sb-pod-a", "pod-a").0);
    if backend == "nftables" {
        // One of its map elements deleted by hand (the watchdog leaves elements to CHECK):
        // CHECK fails with code 105, pod-b's passes. The same element put back by hand,
        // comment and all, satisfies it again.
        let key = format!("udp . {a_udp}");
        let nft = |verb: &str, element: &str| {
            let element = format!("{{ {element} }}");
            cluster.node.sh(
                "nft",
                &[verb, "element", "inet", "randport", "hostports4", &element],
                "",
            );
        };
        nft("delete", &key);
        let (ok, out) = cluster.cni("CHECK", "sb-pod-a", "pod-a");
        let code = serde_json::from_str::<Value>(&out).map(|v| v["code"].clone());
        assert!(
            !ok && code.ok() == Some(json!(105)),
            "CHECK after a lost element: {out}"
        );
        assert!(cluster.cni("CHECK", "sb-pod-b", "pod-b").0);
        let tag = randport_core::SandboxId("sb-pod-a".into()).tag();
        nft(
            "add",
            &format!("{key} comment \"{tag}\" : 198.18.0.2 . 8081"),
        );
        assert!(cluster.cni("CHECK", "sb-pod-a", "pod-a").0);
    }
    // The host port is held on the node: nothing else can bind it.
    let held = cluster
        .node
        .inside(move || TcpListener::bind(("0.0.0.0", a_tcp)).is_err());
    assert!(held, "host port {a_tcp} is not held");

    // The agent lists what it mapped, as a table and as JSON.
    let listing = cluster.list(&[]);
    assert!(
        listing.lines().next().unwrap().starts_with("SANDBOX"),
        "{listing}"
    );
    assert!(
        listing.contains("shop/pod-a") && listing.contains(&format!("*:{a_udp}")),
        "{listing}"
    );
    let json: Value = serde_json::from_str(&cluster.list(&["--json"])).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2);

    assert!(
        conntrack_entries(&cluster.node, a_udp) > 0,
        "the UDP exchange left no conntrack entry"
    );
    let (ok, out) = cluster.cni("DEL", "sb-pod-a", "pod-a");
    assert!(ok, "DEL failed: {out}");
    // The flush runs on the agent's worker right after the rules change.
    let deleted = Instant::now();
    while conntrack_entries(&cluster.node, a_udp) > 0 {
        assert!(
            deleted.elapsed() < Duration::from_secs(1),
            "DEL left UDP conntrack entries"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        tcp_hello(&cluster.client, a_tcp).is_err(),
        "TCP still answers after DEL"
    );
    assert!(
        udp_hello(&cluster.client, a_udp).is_err(),
        "UDP still answers after DEL"
    );
    assert_eq!(
        tcp_hello(&cluster.client, b_tcp).as_deref(),
        Ok("pod-b"),
        "the other pod lost its mapping"
    );
    let freed = cluster
        .node
        .inside(move || TcpListener::bind(("0.0.0.0", a_tcp)).is_ok());
    assert!(freed, "host port {a_tcp} still held after DEL");
    assert!(
        cluster.cni("DEL", "sb-pod-a", "pod-a").0,
        "a second DEL must succeed"
    );
    // The watchdog ran several times meanwhile and found nothing to repair.
    let log = std::fs::read_to_string(&_agent.log).unwrap();
    assert!(!log.contains("re-applied"), "spurious repair:\n{log}");

    // Every log line is a JSON object; those about a mapping carry pod, sandbox and port,
    // a failure its CNI code.
    let (ok, _) = cluster.cni("ADD", "sb-pod-b", "pod-a");
    assert!(!ok, "a sandbox reused for another pod must fail");
    let log = std::fs::read_to_string(&_agent.log).unwrap();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let mapped = lines
        .iter()
        // Port numbers are per protocol: pod-a's UDP port may carry b_tcp's number.
        .find(|l| l["message"] == "mapped" && l["port"] == b_tcp && l["protocol"] == "TCP")
        .unwrap_or_else(|| panic!("no line for port {b_tcp}:\n{log}"));
    assert_eq!(mapped["pod"], "shop/pod-b");
    assert_eq!(mapped["sandbox"], "sb-pod-b");
    assert_eq!(mapped["protocol"], "TCP");
    assert_eq!(mapped["level"], "INFO");
    let released = lines
        .iter()
        .find(|l| l["message"] == "released")
        .unwrap_or_else(|| panic!("no DEL line:\n{log}"));
    assert_eq!(released["pod"], "shop/pod-a");
    let failed = lines
        .iter()
        .find(|l| l["message"] == "ADD failed")
        .unwrap_or_else(|| panic!("no failed ADD line:\n{log}"));
    assert_eq!(failed["pod"], "shop/pod-a");
    assert_eq!(failed["sandbox"], "sb-pod-b");
    assert_eq!(failed["level"], "WARN");
    assert_eq!(
        failed["code"], 7,
        "a reused sandbox is a bad request: {failed}"
    );
    assert!(
        failed["error"].as_str().unwrap().contains("sb-pod-b"),
        "{failed}"
    );
}

fn restart_keeps_connections_and_flushes_are_repaired(backend: &'static str) {
    let cluster = Cluster::new(backend);
    let agent = cluster.start_agent();
    let (tcp, udp) = cluster.add("pod-a");

    // An established connection through the mapping survives a SIGKILL and restart.
    let stream = cluster
        .client
        .inside(move || TcpStream::connect((NODE_IP, tcp)).unwrap());
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "pod-a");
    drop(agent);
    // With the agent down, the plugin says so.
    let (ok, out) = cluster.cni("ADD", "sb-pod-b", "pod-b");
    assert!(!ok);
    let error: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(error["code"], 11);
    assert!(
        error["details"]
            .as_str()
            .unwrap()
            .contains("is the randport agent running on this node"),
        "{out}"
    );
    let _agent = cluster.start_agent();
    (&stream).write_all(b"still there\n").unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "still there");
    assert_eq!(cluster.host_ports("pod-a"), (tcp, udp));
    assert_eq!(udp_hello(&cluster.client, udp).as_deref(), Ok("pod-a"));

    // Idle, the watchdog (every 300 ms) lists our rules no more: nothing in the node's
    // ruleset changes, so it skips on the nftables generation.
    let counts = |cluster: &Cluster| {
        let page = cluster.node.inside(|| {
            let mut stream = TcpStream::connect(METRICS).unwrap();
            stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
            let mut page = String::new();
            stream.read_to_string(&mut page).unwrap();
            page
        });
        let count = |result: &str| -> Result<u64, String> {
            let key = format!("randport_firewall_checks_total{{result=\"{result}\"}} ");
            page.lines()
                .find_map(|l| l.strip_prefix(key.as_str()))
                .map(|n| n.parse().unwrap())
                .ok_or_else(|| format!("{key} missing:\n{page}"))
        };
        Ok::<_, String>((count("listed")?, count("skipped")?))
    };
    // Settled: the restarted agent has listed once and skipped since (on a loaded machine
    // its first checks can take longer than a few periods).
    let settled = Instant::now();
    let (listed, skipped) = loop {
        match counts(&cluster) {
            Ok(c) => break c,
            Err(e) if settled.elapsed() > Duration::from_secs(10) => panic!("{backend}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    std::thread::sleep(Duration::from_millis(1500));
    let (listed_later, skipped_later) = counts(&cluster).unwrap();
    assert_eq!(listed_later, listed, "{backend}: listed while idle");
    assert!(
        skipped_later >= skipped + 3,
        "{backend}: skipped {skipped} then {skipped_later}"
    );

    // Someone flushes our rules: new connections work again within 2 s.
    let flush: &[&str] = if backend == "nftables" {
        &["nft", "flush", "table", "inet", "randport"]
    } else {
        &["iptables", "-t", "nat", "-F", "RANDPORT-HOSTPORTS"]
    };
    cluster.node.sh(flush[0], &flush[1..], "");
    let flushed = Instant::now();
    loop {
        if tcp_hello(&cluster.client, tcp).as_deref() == Ok("pod-a") {
            break;
        }
        assert!(
            flushed.elapsed() < Duration::from_secs(2),
            "mapping not repaired within 2 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The agent logs the repair right after applying it: wait for the line.
    let logged = |log: &str| log.contains("flushed by someone else; re-applied");
    let mut log = String::new();
    while !logged(&log) && flushed.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(20));
        log.clear();
        std::fs::File::open(&_agent.log)
            .unwrap()
            .read_to_string(&mut log)
            .unwrap();
    }
    assert!(logged(&log), "{log}");
    let _ = Path::new(&cluster.dir);
}

#[test]
fn nftables_traffic_reaches_the_right_pod_and_stops_after_del() {
    if ready(
        "nftables_traffic_reaches_the_right_pod_and_stops_after_del",
        "nftables",
    ) {
        traffic_reaches_the_right_pod_and_stops_after_del("nftables");
    }
}

#[test]
fn iptables_traffic_reaches_the_right_pod_and_stops_after_del() {
    if ready(
        "iptables_traffic_reaches_the_right_pod_and_stops_after_del",
        "iptables",
    ) {
        traffic_reaches_the_right_pod_and_stops_after_del("iptables");
    }
}

#[test]
fn nftables_restart_keeps_connections_and_flushes_are_repaired() {
    if ready(
        "nftables_restart_keeps_connections_and_flushes_are_repaired",
        "nftables",
    ) {
        restart_keeps_connections_and_flushes_are_repaired("nftables");
    }
}

#[test]
fn iptables_restart_keeps_connections_and_flushes_are_repaired() {
    if ready(
        "iptables_restart_keeps_connections_and_flushes_are_repaired",
        "iptables",
    ) {
        restart_keeps_connections_and_flushes_are_repaired("iptables");
    }
}

#[test]
fn switching_backends_removes_the_other_backends_leftovers() {
    let test = "switching_backends_removes_the_other_backends_leftovers";
    if !ready(test, "iptables") || !ready(test, "nftables") {
        return;
    }
    let mut cluster = Cluster::new("iptables");
    let agent = cluster.start_agent();
    let (tcp, _) = cluster.add("pod-a");
    assert!(
        cluster
            .node
            .sh("iptables-save", &["-t", "nat"], "")
            .contains("RANDPORT-HOSTPORTS")
    );
    drop(agent);
    cluster.backend = "nftables";
    let _agent = cluster.start_agent();
    let saved = cluster.node.sh("iptables-save", &["-t", "nat"], "");
    assert!(
        !saved.contains("RANDPORT"),
        "iptables leftovers after switching to nftables:\n{saved}"
    );
    assert_eq!(
        tcp_hello(&cluster.client, tcp).as_deref(),
        Ok("pod-a"),
        "mapping lost in the switch"
    );
    let table = cluster
        .node
        .sh("nft", &["list", "table", "inet", "randport"], "");
    assert!(table.contains(&format!("tcp . {tcp}")), "{table}");
}

/// The capabilities `deploy/randport.yaml` adds to the agent container (all others are
/// dropped there), read from the manifest itself.
fn daemonset_capabilities() -> Vec<String> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/randport.yaml"
    ))
    .unwrap();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let doc = Value::deserialize(doc).unwrap();
        if doc["kind"] != "DaemonSet" || doc["metadata"]["name"] != "randport" {
            continue;
        }
        let agent = doc["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "agent")
            .expect("the agent container");
        let security = &agent["securityContext"]["capabilities"];
        assert_eq!(
            security["drop"],
            json!(["ALL"]),
            "the agent drops all others"
        );
        return security["add"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_owned())
            .collect();
    }
    panic!("no DaemonSet randport in deploy/randport.yaml");
}

#[test]
fn privileged_host_ports_work_with_exactly_the_daemonsets_capabilities() {
    let test = "privileged_host_ports_work_with_exactly_the_daemonsets_capabilities";
    if !root_and_tools_or_skip(test, &["nft", "setpriv"]) {
        return;
    }
    let capabilities = daemonset_capabilities();
    let cluster = Cluster::new("nftables");
    // An ingress controller's pod: hostPort 80 (TCP) and 443 (UDP, as QUIC), no annotation.
    cluster.set_pod_ports(
        "pod-a",
        false,
        json!([{"containerPort": 8080, "protocol": "TCP", "hostPort": 80},
               {"containerPort": 8081, "protocol": "UDP", "hostPort": 443}]),
    );
    let agent = cluster.start_agent_with(&capabilities);
    let (ok, out) = cluster.cni("ADD", "sb-pod-a", "pod-a");
    assert!(
        ok,
        "ADD with hostPorts 80 and 443 under the DaemonSet's capabilities {capabilities:?} \
         failed: {out}\nagent log:\n{}",
        std::fs::read_to_string(&agent.log).unwrap_or_default()
    );
    assert_eq!(tcp_hello(&cluster.client, 80).as_deref(), Ok("pod-a"));
    assert_eq!(udp_hello(&cluster.client, 443).as_deref(), Ok("pod-a"));
    // Held: nothing else on the node can take them.
    let held = cluster.node.inside(|| {
        TcpListener::bind("0.0.0.0:80").is_err() && UdpSocket::bind("0.0.0.0:443").is_err()
    });
    assert!(held, "hostPorts 80 and 443 are not held");
    // CHECK reads the elements over netlink: with these capabilities too.
    let (ok, out) = cluster.cni("CHECK", "sb-pod-a", "pod-a");
    assert!(
        ok,
        "CHECK under the DaemonSet's capabilities failed: {out}\nagent log:\n{}",
        std::fs::read_to_string(&agent.log).unwrap_or_default()
    );
    assert!(cluster.cni("DEL", "sb-pod-a", "pod-a").0);
}

/// Replaces pod `name`'s namespace with a new pod `new_name` on the same veth and address
/// (IPAM handing the old pod's IP to a new one), serving the same ports.
fn reuse_pod_ip(cluster: &mut Cluster, name: &str, new_name: &str) {
    let i = cluster.pods.iter().position(|(n, _)| n == name).unwrap();
    cluster.node.ipc(&["link", "del", &format!("veth{i}")]);
    cluster.pods.remove(i);
    let ns = pod_netns(&cluster.node, i, &format!("veth{i}n"), new_name);
    cluster.pods.insert(i, (new_name.to_owned(), ns));
}

fn del_without_the_agent_never_blocks_and_leaves_nothing(backend: &'static str) {
    let mut cluster = Cluster::new(backend);
    let agent = cluster.start_agent();
    let (a_tcp, a_udp) = cluster.add("pod-a");
    let (b_tcp, _) = cluster.add("pod-b");
    assert_eq!(tcp_hello(&cluster.client, a_tcp).as_deref(), Ok("pod-a"));
    assert_eq!(udp_hello(&cluster.client, a_udp).as_deref(), Ok("pod-a"));
    assert!(conntrack_entries(&cluster.node, a_udp) > 0);

    // The agent dies (SIGKILL); the runtime deletes pod-a's sandbox.
    drop(agent);
    let started = Instant::now();
    let (ok, out) = cluster.cni("DEL", "sb-pod-a", "pod-a");
    let took = started.elapsed();
    assert!(ok, "{backend}: DEL with the agent down failed: {out}");
    assert!(
        took < Duration::from_secs(2),
        "{backend}: DEL took {took:?}"
    );
    // Its UDP flows are gone at once (the plugin flushed them), its record too.
    assert_eq!(conntrack_entries(&cluster.node, a_udp), 0, "{backend}");
    let records: Vec<String> = std::fs::read_dir(cluster.dir.join("state"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".json"))
        .collect();
    assert_eq!(records, vec!["sb-pod-b.json".to_owned()], "{backend}");

    // IPAM gives pod-a's address to a new pod listening on the same ports.
    reuse_pod_ip(&mut cluster, "pod-a", "pod-c");
    let no_answer = |cluster: &Cluster, when: &str| {
        let tcp = tcp_hello(&cluster.client, a_tcp);
        assert!(
            tcp.is_err(),
            "{backend} {when}: old TCP port {a_tcp} reached {tcp:?}"
        );
        let udp = udp_hello(&cluster.client, a_udp);
        assert!(
            udp.is_err(),
            "{backend} {when}: old UDP port {a_udp} reached {udp:?}"
        );
    };
    no_answer(&cluster, "with the agent down");
    // pod-b's mapping was left alone.
    assert_eq!(tcp_hello(&cluster.client, b_tcp).as_deref(), Ok("pod-b"));

    // The agent comes back and finds nothing of pod-a's sandbox: no record, no hold, no rule.
    let _agent = cluster.start_agent();
    no_answer(&cluster, "after the agent came back");
    let listing = cluster.list(&[]);
    assert!(!listing.contains("pod-a"), "{backend}: {listing}");
    assert!(listing.contains("pod-b"), "{backend}: {listing}");
    let free = cluster.node.inside(move || {
        TcpListener::bind(("0.0.0.0", a_tcp)).is_ok() && UdpSocket::bind(("0.0.0.0", a_udp)).is_ok()
    });
    assert!(free, "{backend}: pod-a's host ports are held again");
    let tag = randport_core::SandboxId("sb-pod-a".into()).tag();
    let rules = if backend == "nftables" {
        cluster
            .node
            .sh("nft", &["list", "table", "inet", "randport"], "")
    } else {
        cluster.node.sh("iptables-save", &["-t", "nat"], "")
    };
    assert!(
        !rules.contains(&tag),
        "{backend}: a rule of pod-a is left:\n{rules}"
    );
    assert_eq!(tcp_hello(&cluster.client, b_tcp).as_deref(), Ok("pod-b"));
    // A second DEL (the runtime retries) is fine with the agent up too.
    assert!(cluster.cni("DEL", "sb-pod-a", "pod-a").0);
}

#[test]
fn nftables_del_without_the_agent_never_blocks_and_leaves_nothing() {
    let test = "nftables_del_without_the_agent_never_blocks_and_leaves_nothing";
    if ready(test, "nftables") {
        del_without_the_agent_never_blocks_and_leaves_nothing("nftables");
    }
}

#[test]
fn iptables_del_without_the_agent_never_blocks_and_leaves_nothing() {
    let test = "iptables_del_without_the_agent_never_blocks_and_leaves_nothing";
    if ready(test, "iptables") {
        del_without_the_agent_never_blocks_and_leaves_nothing("iptables");
    }
}
