//! End-to-end tests against a real cluster with randport installed. Two clusters run them:
//! - `ci/e2e-local.sh` (`just e2e-local`, and `just test` wherever the Kubernetes binaries
//!   are): a real kube-apiserver, kubelet and containerd for one node, made here without
//!   Docker; the tests run in a client network namespace outside the node, and
//!   `RANDPORT_E2E_LOCAL` names the cluster's directory (its agent is a process there,
//!   controlled through the `agent` script in it; there is no controller manager or
//!   scheduler, so the tests create bound pods where the kind job creates Deployments);
//! - `ci/kind-e2e.sh` on GitHub: kind, one control plane and two workers, randport as its
//!   DaemonSet.
//!
//! They use the cluster `KUBECONFIG` names and are skipped, saying so, when it is unset;
//! with `RANDPORT_E2E=1` (both jobs) a missing cluster is a failure. Run them one at a time
//! (`--test-threads 1`): some restart the agents or change their permissions.
//!
//! Each test works in a namespace of its own (`rp-e2e-<run id>-<purpose>`, deleted at the
//! end, also on failure) and sends traffic only to the cluster's nodes, which the job
//! created. The workload answers with the pod's name: HTTP over TCP and a datagram over
//! UDP, both on port 9376 (agnhost's `serve-hostname` on kind; `itests/workload/echo.rs` on
//! the local node, whose busybox has no UDP server).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Event, Namespace, Node, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use randport_core::annotation::{AnnotationValue, PortEntry, decode};
use randport_core::{PodRef, Protocol, SandboxRecord};
use randport_itests::run_id;
use serde_json::{Value, json};

const KEY: &str = "tkestack.io/portmapping";
const AGNHOST: &str = "registry.k8s.io/e2e-test-images/agnhost:2.53";
const ECHO: &str = "local.test/randport-echo:1";
const LOCAL_BUSYBOX: &str = "local.test/busybox:1.0";
const PORT: u16 = 9376;
const AGENT_NS: &str = "kube-system";
const AGENT_LABEL: &str = "app.kubernetes.io/name=randport";
const TIMEOUT: Duration = Duration::from_secs(180);
/// The local node's name and address (ci/local-cluster.sh).
const LOCAL_NODE: &str = "rp-node";
const LOCAL_NODE_IP: &str = "203.0.113.1";

fn cluster_or_skip(test: &str) -> bool {
    if std::env::var_os("KUBECONFIG").is_some() {
        return true;
    }
    assert!(
        std::env::var_os("RANDPORT_E2E").is_none(),
        "{test}: RANDPORT_E2E is set but KUBECONFIG is not: the e2e job must name its cluster"
    );
    eprintln!(
        "SKIPPED {test}: no cluster here; run `just e2e-local` (needs root and the Kubernetes \
         binaries) or ci/kind-e2e.sh where Docker exists, or set KUBECONFIG to a cluster with \
         randport installed"
    );
    false
}

/// The local one-node cluster's directory, when the tests run there.
fn local_cluster() -> Option<PathBuf> {
    std::env::var_os("RANDPORT_E2E_LOCAL").map(PathBuf::from)
}

fn kubectl() -> Command {
    Command::new(std::env::var_os("RANDPORT_E2E_KUBECTL").unwrap_or_else(|| "kubectl".into()))
}

/// Runs kubectl; its stdout, or a panic with its stderr.
fn kubectl_ok(args: &[&str]) -> String {
    let out = kubectl().args(args).output().expect("running kubectl");
    assert!(
        out.status.success(),
        "kubectl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs the local cluster's agent control script (`stop`, `start`, `list`).
fn local_agent(dir: &std::path::Path, verb: &str) -> String {
    let out = Command::new(dir.join("agent"))
        .arg(verb)
        .output()
        .expect("running the local cluster's agent script");
    assert!(
        out.status.success(),
        "agent {verb}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The records of the agent on `node`, as `randportd list --json` prints them.
async fn agent_records(client: &Client, node: &str) -> Vec<SandboxRecord> {
    let json = match local_cluster() {
        Some(dir) => local_agent(&dir, "list"),
        None => in_agent_pod(client, node, &["randportd", "list", "--json"]).await,
    };
    serde_json::from_str(&json).unwrap_or_else(|e| panic!("randportd list --json: {e}: {json}"))
}

/// What `command` prints in the agent container of the DaemonSet's pod on `node`.
async fn in_agent_pod(client: &Client, node: &str, command: &[&str]) -> String {
    let agent = agent_pod_on(client, node).await;
    let name = agent.name_any();
    let mut args = vec!["-n", AGENT_NS, "exec", &name, "-c", "agent", "--"];
    args.extend_from_slice(command);
    kubectl_ok(&args)
}

/// randport's nft table on `node`, as `nft list table inet randport` prints it.
async fn randport_table(client: &Client, node: &str) -> String {
    match local_cluster() {
        Some(dir) => local_agent(&dir, "table"),
        None => in_agent_pod(client, node, &["nft", "list", "table", "inet", "randport"]).await,
    }
}

/// A namespace for one test, deleted when dropped (also after a failed assertion), its
/// pods first (the local cluster has no namespace controller to do it).
struct TestNamespace {
    name: String,
}

impl TestNamespace {
    async fn create(client: &Client, purpose: &str) -> TestNamespace {
        let name = format!("rp-e2e-{}-{purpose}", run_id());
        let ns: Namespace = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"randport.io/e2e": "true"}}
        }))
        .unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
        TestNamespace { name }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        // Drop cannot await: kubectl does it, without waiting for the namespace to go.
        for kind in ["deployments", "pods"] {
            let _ = kubectl()
                .args(["-n", &self.name, "delete", kind, "--all", "--wait=false"])
                .output();
        }
        let _ = kubectl()
            .args(["delete", "namespace", &self.name, "--wait=false"])
            .output();
    }
}

/// The containers of a pod that answers with its name on TCP and UDP port 9376, and also on
/// TCP at each `(containerPort, hostPort)` of `explicit`.
fn workload(explicit: &[(u16, u16)]) -> Value {
    let mut containers = if local_cluster().is_some() {
        json!([{
            "name": "serve",
            "image": ECHO,
            "imagePullPolicy": "Never",
            "args": [PORT.to_string()],
            "ports": [{"containerPort": PORT, "protocol": "TCP"},
                      {"containerPort": PORT, "protocol": "UDP"}]
        }])
    } else {
        json!([{
            "name": "serve",
            "image": AGNHOST,
            "args": ["serve-hostname", "--port", PORT.to_string()],
            "ports": [{"containerPort": PORT, "protocol": "TCP"}]
        }, {
            "name": "serve-udp",
            "image": AGNHOST,
            "args": ["serve-hostname", "--udp", "--http=false", "--port", PORT.to_string()],
            "ports": [{"containerPort": PORT, "protocol": "UDP"}]
        }])
    };
    for (i, (port, host_port)) in explicit.iter().enumerate() {
        let port_spec = json!({"containerPort": port, "hostPort": host_port, "protocol": "TCP"});
        if local_cluster().is_some() {
            let c = &mut containers[0];
            c["args"]
                .as_array_mut()
                .unwrap()
                .push(json!(port.to_string()));
            c["ports"].as_array_mut().unwrap().push(port_spec);
        } else {
            containers.as_array_mut().unwrap().push(json!({
                "name": format!("explicit-{i}"),
                "image": AGNHOST,
                "args": ["serve-hostname", "--port", port.to_string()],
                "ports": [port_spec]
            }));
        }
    }
    containers
}

/// The pod template of app `app`: annotated, the workload's containers.
fn template(app: &str) -> Value {
    json!({
        "metadata": {"labels": {"app": app}, "annotations": {KEY: ""}},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": workload(&[])
        }
    })
}

fn deployment(name: &str, replicas: i32) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": template(name)
        }
    }))
    .unwrap()
}

/// Creates pod `name` from `pod` (a template or a whole pod); on the local cluster, with no
/// scheduler, bound to its one node.
async fn create_pod(client: &Client, ns: &str, name: &str, mut pod: Value) -> Pod {
    pod["metadata"]["name"] = json!(name);
    if local_cluster().is_some() {
        let node = node_ips(client).await.into_keys().next().expect("a node");
        pod["spec"]["nodeName"] = json!(node);
    }
    let pod: Pod = serde_json::from_value(pod).unwrap();
    Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap_or_else(|e| panic!("creating pod {ns}/{name}: {e}"))
}

/// A running pod and where its ports are reached.
#[derive(Debug, Clone)]
struct Mapped {
    namespace: String,
    name: String,
    uid: String,
    node: String,
    node_ip: IpAddr,
    entries: Vec<PortEntry>,
}

impl Mapped {
    /// Where the pod's port 9376 of `protocol` is reached.
    fn addr_of(&self, protocol: Protocol) -> SocketAddr {
        let entry = self
            .entries
            .iter()
            .find(|e| e.protocol == protocol)
            .unwrap_or_else(|| panic!("{self:?} has no {protocol:?} mapping"));
        SocketAddr::new(self.node_ip, entry.host_port)
    }

    fn addr(&self) -> SocketAddr {
        self.addr_of(Protocol::Tcp)
    }

    /// Whether an agent's record is this pod's.
    fn owns(&self, record: &SandboxRecord) -> bool {
        record.pod.namespace == self.namespace && record.pod.name == self.name
    }

    fn udp_addr(&self) -> SocketAddr {
        self.addr_of(Protocol::Udp)
    }
}

async fn node_ips(client: &Client) -> BTreeMap<String, IpAddr> {
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap();
    nodes
        .items
        .iter()
        .filter_map(|n| {
            let ip = n
                .status
                .as_ref()?
                .addresses
                .as_ref()?
                .iter()
                .find(|a| a.type_ == "InternalIP")?
                .address
                .parse()
                .ok()?;
            Some((n.name_any(), ip))
        })
        .collect()
}

/// The pods of `app` once `count` of them run, are ready and have their ports written.
async fn wait_mapped(client: &Client, ns: &str, app: &str, count: usize) -> Vec<Mapped> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let ips = node_ips(client).await;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let list = pods
            .list(&ListParams::default().labels(&format!("app={app}")))
            .await
            .unwrap();
        let mut mapped = Vec::new();
        let mut waiting = Vec::new();
        for pod in &list.items {
            if pod.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let name = pod.name_any();
            let ready = is_ready(pod);
            let value = pod.annotations().get(KEY).cloned().unwrap_or_default();
            let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
            match (ready, decode(&PodRef::new(ns, &name), &value), node) {
                (true, Ok(AnnotationValue::Mapped(entries)), Some(node)) if !entries.is_empty() => {
                    mapped.push(Mapped {
                        namespace: ns.to_owned(),
                        name,
                        uid: pod.uid().unwrap_or_default(),
                        node_ip: ips[&node],
                        node,
                        entries,
                    })
                }
                (_, Err(e), _) => panic!("pod {ns}/{name}: the annotation is not valid JSON: {e}"),
                (ready, _, _) => {
                    waiting.push(format!("{name} (ready {ready}, annotation {value:?})"))
                }
            }
        }
        if mapped.len() == count && waiting.is_empty() {
            mapped.sort_by(|a, b| a.name.cmp(&b.name));
            return mapped;
        }
        assert!(
            Instant::now() < deadline,
            "{ns}/{app}: {} of {count} pods mapped after {TIMEOUT:?}; waiting for {waiting:?}",
            mapped.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A client, a namespace for `purpose`, and `replicas` pods of app `web` in it (a
/// Deployment where a controller manager runs, bound pods `web-N` on the local node), once
/// every one runs with its ports written.
async fn deploy(purpose: &str, replicas: usize) -> (Client, TestNamespace, Vec<Mapped>) {
    let client = Client::try_default().await.unwrap();
    let ns = TestNamespace::create(&client, purpose).await;
    if local_cluster().is_some() {
        for i in 0..replicas {
            create_pod(&client, &ns.name, &format!("web-{i}"), template("web")).await;
        }
    } else {
        Api::<Deployment>::namespaced(client.clone(), &ns.name)
            .create(&PostParams::default(), &deployment("web", replicas as i32))
            .await
            .unwrap();
    }
    let pods = wait_mapped(&client, &ns.name, "web", replicas).await;
    (client, ns, pods)
}

/// Deletes pod `name` and waits until it is gone (the kubelet has torn its sandbox down).
async fn delete_and_wait(pods: &Api<Pod>, name: &str) {
    pods.delete(name, &DeleteParams::default()).await.unwrap();
    wait_gone(pods, name).await;
}

/// Waits until pod `name` is gone.
async fn wait_gone(pods: &Api<Pod>, name: &str) {
    let deadline = Instant::now() + TIMEOUT;
    while pods.get_opt(name).await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "pod {name} was not deleted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What `addr` answers to an HTTP GET of `path` (the workload: the pod's name), or why it
/// did not.
fn http_get_path(addr: SocketAddr, path: &str) -> Result<String, String> {
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(Duration::from_secs(3))).ok();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: randport\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| e.to_string())?;
    Ok(response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.trim().to_owned())
        .unwrap_or_default())
}

fn http_get(addr: SocketAddr) -> Result<String, String> {
    http_get_path(addr, "/")
}

/// What `addr` answers to a datagram (the workload: the pod's name), or why it did not.
fn udp_ask(addr: SocketAddr) -> Result<String, String> {
    let socket = UdpSocket::bind(("0.0.0.0", 0)).map_err(|e| e.to_string())?;
    socket
        .set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(|e| e.to_string())?;
    socket
        .send_to(b"name?\n", addr)
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 512];
    let (n, _) = socket.recv_from(&mut buf).map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
}

/// Retries `ask` for a while: the first packets may race the rules of a pod that just
/// became ready on a busy node.
async fn retried(
    ask: fn(SocketAddr) -> Result<String, String>,
    addr: SocketAddr,
) -> Result<String, String> {
    let mut last = Err(String::new());
    for _ in 0..10 {
        last = tokio::task::spawn_blocking(move || ask(addr))
            .await
            .unwrap();
        if last.is_ok() {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    last
}

async fn answers(addr: SocketAddr) -> Result<String, String> {
    retried(http_get, addr).await
}

async fn answers_udp(addr: SocketAddr) -> Result<String, String> {
    retried(udp_ask, addr).await
}

/// The pod answers its name over both its mappings.
async fn check_answers(pod: &Mapped, when: &str) {
    assert_eq!(
        answers(pod.addr()).await.as_deref(),
        Ok(pod.name.as_str()),
        "TCP {when}: {pod:?}"
    );
    assert_eq!(
        answers_udp(pod.udp_addr()).await.as_deref(),
        Ok(pod.name.as_str()),
        "UDP {when}: {pod:?}"
    );
}

fn check_entries(pod: &Mapped) {
    assert_eq!(pod.entries.len(), 2, "one TCP and one UDP mapping: {pod:?}");
    for entry in &pod.entries {
        assert_eq!(entry.container_port, PORT);
        assert_eq!(entry.pod_name, pod.name);
        assert!(
            (20000..=29999).contains(&entry.host_port),
            "host port {} is outside the configured range: {pod:?}",
            entry.host_port
        );
    }
}

#[tokio::test]
async fn every_replica_gets_valid_json_and_answers_with_its_name_at_its_host_port() {
    if !cluster_or_skip("every_replica_gets_valid_json_and_answers_with_its_name_at_its_host_port")
    {
        return;
    }
    let (client, _ns, pods) = deploy("replicas", 4).await;
    let mut seen = std::collections::HashSet::new();
    for pod in &pods {
        check_entries(pod);
        for entry in &pod.entries {
            assert!(
                seen.insert((pod.node.clone(), entry.protocol, entry.host_port)),
                "two pods share {:?} {} on {}",
                entry.protocol,
                entry.host_port,
                pod.node
            );
        }
        check_answers(pod, "after the ADD").await;
        // `kubectl describe pod` shows which ports it got.
        let event = wait_event(&client, &pod.namespace, &pod.uid, "PortsMapped").await;
        assert_eq!(event.type_.as_deref(), Some("Normal"));
        let message = event.message.unwrap_or_default();
        for entry in &pod.entries {
            assert!(
                message.contains(&format!("host port {}", entry.host_port)),
                "{message}"
            );
        }
        // The agent's records say the same as the annotation.
        let records = agent_records(&client, &pod.node).await;
        let record = records
            .iter()
            .find(|r| pod.owns(r))
            .unwrap_or_else(|| panic!("no record for {} on {}", pod.name, pod.node));
        assert_eq!(record.annotation_entries(), pod.entries);
    }
}

#[tokio::test]
async fn a_deleted_pod_stops_answering_and_its_ports_are_released() {
    if !cluster_or_skip("a_deleted_pod_stops_answering_and_its_ports_are_released") {
        return;
    }
    let (client, ns, mut pods) = deploy("delete", 1).await;
    let old = pods.remove(0);
    check_answers(&old, "before the delete").await;

    if local_cluster().is_some() {
        delete_and_wait(&Api::namespaced(client.clone(), &ns.name), &old.name).await;
    } else {
        Api::<Deployment>::namespaced(client.clone(), &ns.name)
            .delete("web", &DeleteParams::foreground())
            .await
            .unwrap();
        wait_gone(&Api::namespaced(client.clone(), &ns.name), &old.name).await;
    }
    let (tcp, udp) = (old.addr(), old.udp_addr());
    let after = tokio::task::spawn_blocking(move || (http_get(tcp), udp_ask(udp)))
        .await
        .unwrap();
    assert!(after.0.is_err(), "TCP {tcp} still answers: {:?}", after.0);
    assert!(after.1.is_err(), "UDP {udp} still answers: {:?}", after.1);
    let records = agent_records(&client, &old.node).await;
    let still: Vec<_> = records
        .iter()
        .flat_map(|r| r.mappings.iter().map(move |m| (r, m)))
        .filter(|(r, m)| old.owns(r) || old.entries.iter().any(|e| e.host_port == m.host_port))
        .collect();
    assert!(
        still.is_empty(),
        "ports of the deleted pod still held: {still:?}"
    );
}

#[tokio::test]
async fn a_recreated_pod_gets_a_fresh_mapping_and_the_old_port_stops_answering() {
    if !cluster_or_skip("a_recreated_pod_gets_a_fresh_mapping_and_the_old_port_stops_answering") {
        return;
    }
    let (client, ns, mut pods) = deploy("recreate", 1).await;
    let old = pods.remove(0);
    check_answers(&old, "before the delete").await;

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    if local_cluster().is_some() {
        // No controller manager: the test recreates the pod, under the same name.
        delete_and_wait(&pods, &old.name).await;
        create_pod(&client, &ns.name, &old.name, template("web")).await;
    } else {
        pods.delete(&old.name, &DeleteParams::default())
            .await
            .unwrap();
    }
    let deadline = Instant::now() + TIMEOUT;
    let new = loop {
        let now = wait_mapped(&client, &ns.name, "web", 1).await.remove(0);
        if now.uid != old.uid {
            break now;
        }
        assert!(Instant::now() < deadline, "{} was not replaced", old.name);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    check_entries(&new);
    check_answers(&new, "after the recreation").await;
    if new.addr() == old.addr() {
        // The same node drew the same port again (1 in 10,000): it is the new pod's now.
        eprintln!("note: the new pod drew the old pod's port; it answers with the new name");
    } else {
        let old_addr = old.addr();
        let after = tokio::task::spawn_blocking(move || http_get(old_addr))
            .await
            .unwrap();
        assert!(
            after.is_err(),
            "the old port {old_addr} still answers: {after:?}"
        );
    }
}

#[tokio::test]
async fn restarting_the_agents_keeps_the_existing_mappings_working() {
    if !cluster_or_skip("restarting_the_agents_keeps_the_existing_mappings_working") {
        return;
    }
    let (client, ns, before) = deploy("restart", 3).await;

    if let Some(dir) = local_cluster() {
        // SIGKILL, as a crash or an OOM kill would.
        local_agent(&dir, "stop");
        for pod in &before {
            check_answers(pod, "while the agent is down").await;
        }
        local_agent(&dir, "start");
    } else {
        let old_agents = delete_daemonset_agents(&client).await;
        for pod in &before {
            check_answers(pod, "during the restart").await;
        }
        wait_agents_back(&client, &old_agents).await;
    }
    // ... and keep every mapping as it was.
    let after = wait_mapped(&client, &ns.name, "web", 3).await;
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(b.uid, a.uid);
        assert_eq!(b.entries, a.entries, "the annotation of {} changed", a.name);
        check_answers(a, "after the restart").await;
        let records = agent_records(&client, &a.node).await;
        assert!(
            records
                .iter()
                .any(|r| a.owns(r) && r.annotation_entries() == a.entries),
            "the restarted agent lost the record of {}",
            a.name
        );
    }
}

/// Deletes the DaemonSet's agent pods (it makes new ones); their uids.
async fn delete_daemonset_agents(client: &Client) -> Vec<String> {
    let agents: Api<Pod> = Api::namespaced(client.clone(), AGENT_NS);
    let old_agents: Vec<String> = agents
        .list(&ListParams::default().labels(AGENT_LABEL))
        .await
        .unwrap()
        .items
        .iter()
        .filter_map(|p| p.uid())
        .collect();
    assert!(!old_agents.is_empty(), "no randport agents in {AGENT_NS}");
    agents
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels(AGENT_LABEL),
        )
        .await
        .unwrap();
    old_agents
}

/// Waits until new agents, as many as were deleted, are ready (restored and reconciled).
async fn wait_agents_back(client: &Client, old_agents: &[String]) {
    let agents: Api<Pod> = Api::namespaced(client.clone(), AGENT_NS);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let now = agents
            .list(&ListParams::default().labels(AGENT_LABEL))
            .await
            .unwrap();
        let ready_new = now
            .items
            .iter()
            .filter(|p| !old_agents.contains(&p.uid().unwrap_or_default()))
            .filter(|p| is_ready(p))
            .count();
        if ready_new >= old_agents.len() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the agents did not come back ready"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test]
async fn the_agents_identity_may_change_only_its_nodes_pods_and_only_the_annotation() {
    let test = "the_agents_identity_may_change_only_its_nodes_pods_and_only_the_annotation";
    if !cluster_or_skip(test) {
        return;
    }
    let client = Client::try_default().await.unwrap();
    let policies: Api<k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicy> =
        Api::all(client.clone());
    if policies
        .get_opt("randport-agent-writes")
        .await
        .ok()
        .flatten()
        .is_none()
    {
        assert!(
            std::env::var_os("RANDPORT_E2E_POLICY").is_none(),
            "{test}: RANDPORT_E2E_POLICY is set but the policy is not installed"
        );
        eprintln!(
            "SKIPPED {test}: deploy/admission-policy.yaml is not installed (Kubernetes < 1.30?)"
        );
        return;
    }
    let (_, ns, pods) = deploy("policy", 2).await;
    let pod_api: Api<Pod> = Api::namespaced(client.clone(), &ns.name);

    let first = pod_api.get(&pods[0].name).await.unwrap();
    let node = first.spec.as_ref().unwrap().node_name.clone().unwrap();
    let patch = |annotations: serde_json::Value| {
        Patch::Merge(json!({"metadata": {"annotations": annotations}}))
    };
    let params = PatchParams::default();

    // As the agent on the pod's node: our annotation is allowed, another one is not.
    let as_local = as_agent_on(&client, &node, &ns.name).await;
    let value = first.annotations()[KEY].clone();
    as_local
        .patch(&pods[0].name, &params, &patch(json!({KEY: value})))
        .await
        .expect("the agent may write the annotation of a pod on its node");
    let e = as_local
        .patch(&pods[0].name, &params, &patch(json!({"other": "x"})))
        .await
        .expect_err("the agent must not write other annotations");
    assert!(
        e.to_string()
            .contains("only the tkestack.io/portmapping annotation"),
        "{e}"
    );

    // As the agent on a node without the pod (the control plane's, say): refused.
    let other = node_ips(&client)
        .await
        .into_keys()
        .find(|n| *n != node)
        .expect("a second node");
    let as_remote = as_agent_on(&client, &other, &ns.name).await;
    let e = as_remote
        .patch(&pods[0].name, &params, &patch(json!({KEY: "[]"})))
        .await
        .expect_err("the agent must not write pods on other nodes");
    assert!(e.to_string().contains("only pods on its own node"), "{e}");
}

/// A client with what the agent on `node` presents: a token of its service account bound
/// to its pod (so the API server knows the node).
async fn as_agent_on(client: &Client, node: &str, ns: &str) -> Api<Pod> {
    let agent = agent_pod_on(client, node).await;
    let request: TokenRequest = serde_json::from_value(json!({
        "spec": {"audiences": [], "expirationSeconds": 600,
                 "boundObjectRef": {"kind": "Pod", "apiVersion": "v1",
                                    "name": agent.name_any(), "uid": agent.uid()}}
    }))
    .unwrap();
    let token = Api::<ServiceAccount>::namespaced(client.clone(), AGENT_NS)
        .create_token_request("randport", &PostParams::default(), &request)
        .await
        .unwrap()
        .status
        .unwrap()
        .token;
    let mut config = kube::Config::infer().await.unwrap();
    config.auth_info = kube::config::AuthInfo {
        token: Some(token.into()),
        ..Default::default()
    };
    Api::namespaced(Client::try_from(config).unwrap(), ns)
}

/// The DaemonSet's agent pod on `node`.
async fn agent_pod_on(client: &Client, node: &str) -> Pod {
    Api::<Pod>::namespaced(client.clone(), AGENT_NS)
        .list(
            &ListParams::default()
                .labels(AGENT_LABEL)
                .fields(&format!("spec.nodeName={node}")),
        )
        .await
        .unwrap()
        .items
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no randport agent on node {node}"))
}

/// Takes `patch` on pods away from the agent's ClusterRole (as a cluster admin who
/// tightened RBAC would) and gives it back when dropped, also after a failed assertion.
struct PatchForbidden {
    original: ClusterRole,
}

impl PatchForbidden {
    async fn apply(client: &Client) -> PatchForbidden {
        let roles: Api<ClusterRole> = Api::all(client.clone());
        let original = roles.get("randport").await.unwrap();
        let mut tightened = original.clone();
        for rule in tightened.rules.iter_mut().flatten() {
            rule.verbs.retain(|v| v != "patch");
        }
        roles
            .replace("randport", &PostParams::default(), &tightened)
            .await
            .unwrap();
        PatchForbidden { original }
    }
}

impl Drop for PatchForbidden {
    fn drop(&mut self) {
        let mut role = self.original.clone();
        role.metadata.resource_version = None;
        role.metadata.managed_fields = None;
        let mut child = kubectl()
            .args(["replace", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("running kubectl");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(serde_json::to_string(&role).unwrap().as_bytes())
            .unwrap();
        let status = child.wait().unwrap();
        assert!(
            status.success() || std::thread::panicking(),
            "restoring the ClusterRole"
        );
    }
}

#[tokio::test]
async fn a_pod_whose_writeback_is_forbidden_gets_an_event_and_its_add_fails_cleanly() {
    let test = "a_pod_whose_writeback_is_forbidden_gets_an_event_and_its_add_fails_cleanly";
    if !cluster_or_skip(test) {
        return;
    }
    let client = Client::try_default().await.unwrap();
    let ns = TestNamespace::create(&client, "forbidden").await;
    let forbidden = PatchForbidden::apply(&client).await;
    let pod = create_pod(&client, &ns.name, "web-0", template("web")).await;
    let uid = pod.uid().unwrap();

    // The agent says why on the pod, and the pod does not start.
    let event = wait_event(&client, &ns.name, &uid, "PortMappingFailed").await;
    let message = event.message.unwrap_or_default();
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert!(
        message.contains("forbidden") || message.contains("403"),
        "the event should say the write was forbidden: {message}"
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let now = pods.get("web-0").await.unwrap();
    assert!(!is_ready(&now), "web-0 runs without its ports");
    assert_eq!(
        now.annotations().get(KEY).map(String::as_str),
        Some(""),
        "nothing was written"
    );
    // Nothing of the failed ADD is left on the node.
    let node = now.spec.as_ref().unwrap().node_name.clone().unwrap();
    let records = agent_records(&client, &node).await;
    assert!(
        records
            .iter()
            .all(|r| r.pod.name != "web-0" || r.pod.namespace != ns.name),
        "a record of the failed ADD is left: {records:?}"
    );

    // Permission back: the kubelet's next try maps the pod.
    drop(forbidden);
    let mapped = wait_mapped(&client, &ns.name, "web", 1).await.remove(0);
    check_answers(&mapped, "after the permission came back").await;
}

/// Whether the API server serves `kind` in `group_version` (discovery, not version strings).
async fn serves(client: &Client, group_version: &str, plural: &str) -> bool {
    match client.list_api_group_resources(group_version).await {
        Ok(list) => list.resources.iter().any(|r| r.name == plural),
        Err(_) => false,
    }
}

#[tokio::test]
async fn the_shipped_manifests_pass_a_server_side_dry_run() {
    if !cluster_or_skip("the_shipped_manifests_pass_a_server_side_dry_run") {
        return;
    }
    let deploy_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
    for file in ["randport.yaml", "uninstall.yaml"] {
        let path = format!("{deploy_dir}/{file}");
        let out = kubectl_ok(&["apply", "--dry-run=server", "-f", &path]);
        assert!(out.contains("(server dry run)"), "{file}: {out}");
    }
    let policy = format!("{deploy_dir}/admission-policy.yaml");
    let client = Client::try_default().await.unwrap();
    if serves(
        &client,
        "admissionregistration.k8s.io/v1",
        "validatingadmissionpolicies",
    )
    .await
    {
        let out = kubectl_ok(&["apply", "--dry-run=server", "-f", &policy]);
        assert!(out.contains("(server dry run)"), "{out}");
    } else {
        // What the install scripts skip, and why they must: the API refuses the kind.
        let out = kubectl()
            .args(["apply", "--dry-run=server", "-f", &policy])
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "the policy applied where its kind is not served"
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("no matches for kind"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "note: this API server does not serve ValidatingAdmissionPolicy v1; the policy \
             is skipped (what that leaves open: docs/install.md)"
        );
    }
}

/// helm (`HELM`; the e2e scripts fetch it). Under RANDPORT_E2E it must be there.
fn helm_or_skip(test: &str) -> Option<PathBuf> {
    let helm = randport_itests::helm_path();
    if helm.is_file() {
        return Some(helm);
    }
    assert!(
        std::env::var_os("RANDPORT_E2E").is_none(),
        "{test}: RANDPORT_E2E is set but there is no helm at {} (HELM, or ci/lib.sh ensure_helm)",
        helm.display()
    );
    eprintln!("SKIPPED {test}: no helm at {}", helm.display());
    None
}

fn run_ok(mut cmd: Command, stdin: Option<&str>) -> String {
    use std::io::Write as _;
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut input = child.stdin.take().unwrap();
    input
        .write_all(stdin.unwrap_or_default().as_bytes())
        .unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The chart, for every distribution preset, against the real API server: its rendering
/// passes `kubectl apply --dry-run=server`, and `helm install --dry-run=server` renders the
/// admission policy exactly where the server serves it (the chart's `.Capabilities` check
/// against real discovery). Under another name, so nothing collides with the installed agent.
#[tokio::test]
async fn the_chart_passes_a_server_side_dry_run_for_every_preset() {
    let test = "the_chart_passes_a_server_side_dry_run_for_every_preset";
    if !cluster_or_skip(test) {
        return;
    }
    let Some(helm) = helm_or_skip(test) else {
        return;
    };
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let client = Client::try_default().await.unwrap();
    let policy_served = serves(
        &client,
        "admissionregistration.k8s.io/v1",
        "validatingadmissionpolicies",
    )
    .await;
    for preset in ["kubeadm", "kind", "k3s", "rke2", "openshift"] {
        let values = format!("{repo}/charts/randport/presets/{preset}.yaml");
        let chart = format!("{repo}/charts/randport");
        let mut template = Command::new(&helm);
        template.args([
            "template",
            "randport-dry",
            &chart,
            "-n",
            "kube-system",
            "-f",
            &values,
            "--set",
            "nameOverride=randport-dry",
        ]);
        let rendered = run_ok(template, None);
        let mut apply = kubectl();
        apply.args(["apply", "--dry-run=server", "-f", "-"]);
        let out = run_ok(apply, Some(&rendered));
        for object in [
            "serviceaccount/randport-dry",
            "clusterrole.rbac.authorization.k8s.io/randport-dry",
            "daemonset.apps/randport-dry",
            "service/randport-dry-metrics",
        ] {
            assert!(
                out.contains(&format!("{object} created (server dry run)")),
                "{preset}: {object} missing from:\n{out}"
            );
        }
        let mut install = Command::new(&helm);
        install.args([
            "install",
            "randport-dry",
            &chart,
            "-n",
            "kube-system",
            "-f",
            &values,
            "--set",
            "nameOverride=randport-dry",
            "--dry-run=server",
        ]);
        let manifest = run_ok(install, None);
        assert!(manifest.contains("kind: DaemonSet"), "{preset}: {manifest}");
        assert_eq!(
            manifest.contains("kind: ValidatingAdmissionPolicy"),
            policy_served,
            "{preset}: the policy is rendered exactly where the API server serves it"
        );
    }
}

/// The `sh e2e` blocks of docs/*.md, run against the real cluster, with the docs' example
/// namespace and pod (`shop`, `web-0`) replaced by a mapped pod of this test's. Commands
/// find kubectl, helm and kubectl-randport on the PATH, as an operator's would.
#[tokio::test]
async fn the_commands_in_the_docs_run_against_the_cluster() {
    let test = "the_commands_in_the_docs_run_against_the_cluster";
    if !cluster_or_skip(test) {
        return;
    }
    let Some(helm) = helm_or_skip(test) else {
        return;
    };
    let (_client, ns, pods) = deploy("docs", 1).await;
    let pod = &pods[0];
    let repo = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let bin_dir = std::env::var("RANDPORT_E2E_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo.join("target/debug"));
    let kubectl_bin =
        PathBuf::from(std::env::var_os("RANDPORT_E2E_KUBECTL").unwrap_or_else(|| "kubectl".into()));
    let mut path = vec![bin_dir, helm.parent().unwrap().to_owned()];
    if let Some(dir) = kubectl_bin.parent().filter(|d| !d.as_os_str().is_empty()) {
        path.push(dir.to_owned());
    }
    let path = format!(
        "{}:{}",
        path.iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":"),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut ran = 0;
    let mut files: Vec<_> = std::fs::read_dir(repo.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (info, body) in randport_itests::fenced_blocks(&text) {
            if info != "sh e2e" {
                continue;
            }
            let body = body
                .replace("-n shop", &format!("-n {}", ns.name))
                .replace("web-0", &pod.name);
            let out = Command::new("bash")
                .args(["-euo", "pipefail", "-c", &body])
                .current_dir(&repo)
                .env("PATH", &path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: the block\n{body}\nfailed: {}{}",
                file.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let stdout = String::from_utf8_lossy(&out.stdout);
            if body.contains("portmapping") {
                assert!(
                    stdout.contains(&format!("\"podName\":\"{}\"", pod.name)),
                    "{body}: {stdout}"
                );
            }
            if body.contains("randport ports") {
                let port = pod.entries[0].host_port.to_string();
                assert!(
                    stdout.contains(&port),
                    "{body}: no host port {port} in {stdout}"
                );
            }
            ran += 1;
        }
    }
    assert!(ran >= 3, "only {ran} sh e2e blocks in docs/");
}

#[tokio::test]
async fn the_downward_api_example_shows_a_container_its_own_ports_within_5_s() {
    let test = "the_downward_api_example_shows_a_container_its_own_ports_within_5_s";
    if !cluster_or_skip(test) {
        return;
    }
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/examples/own-ports.yaml"
    ))
    .unwrap();
    let mut pod: Value = serde_yaml_ng::from_str(&example).unwrap();
    if local_cluster().is_some() {
        let container = &mut pod["spec"]["containers"][0];
        container["image"] = json!(LOCAL_BUSYBOX);
        container["imagePullPolicy"] = json!("Never");
    }
    pod["metadata"]["labels"] = json!({"app": "own-ports"});
    let client = Client::try_default().await.unwrap();
    let ns = TestNamespace::create(&client, "downward").await;
    let name = pod["metadata"]["name"].as_str().unwrap().to_owned();
    create_pod(&client, &ns.name, &name, pod).await;
    let mapped = wait_mapped(&client, &ns.name, "own-ports", 1)
        .await
        .remove(0);

    // The example serves what it read (and how long it waited) on its mapped port.
    let addr = mapped.addr();
    let read = retried(|a| http_get_path(a, "/ports"), addr).await.unwrap();
    let waited = retried(|a| http_get_path(a, "/waited-ms"), addr)
        .await
        .unwrap();
    let entries = match decode(&PodRef::new(&ns.name, &name), &read) {
        Ok(AnnotationValue::Mapped(entries)) => entries,
        other => panic!("the container read {read:?}: {other:?}"),
    };
    assert_eq!(
        entries, mapped.entries,
        "the container read another mapping"
    );
    let waited: u64 = waited
        .parse()
        .unwrap_or_else(|_| panic!("waited-ms: {waited:?}"));
    eprintln!("the container waited {waited} ms for its ports");
    assert!(
        waited <= 5000,
        "the container waited {waited} ms for its ports"
    );
}

/// The first Event `reason` on the object with `uid` in namespace `ns`, waited for.
async fn wait_event(client: &Client, ns: &str, uid: &str, reason: &str) -> Event {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let list = events
            .list(&ListParams::default().fields(&format!("involvedObject.uid={uid}")))
            .await
            .unwrap();
        if let Some(e) = list
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some(reason))
        {
            return e;
        }
        assert!(Instant::now() < deadline, "no {reason} event on {ns}/{uid}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until pod `name` runs and is ready; the pod.
async fn wait_ready(pods: &Api<Pod>, name: &str) -> Pod {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(pod) = pods.get_opt(name).await.unwrap()
            && is_ready(&pod)
        {
            return pod;
        }
        assert!(Instant::now() < deadline, "pod {name} did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A pod (annotated or not) with the workload, also answering on `explicit` ports.
fn pod_with(app: &str, annotated: bool, explicit: &[(u16, u16)]) -> Value {
    let annotations = if annotated {
        json!({KEY: ""})
    } else {
        json!({})
    };
    json!({
        "metadata": {"labels": {"app": app}, "annotations": annotations},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": workload(explicit)}
    })
}

#[tokio::test]
async fn an_explicit_host_port_next_to_portmap_has_one_owner_and_is_still_listed() {
    let test = "an_explicit_host_port_next_to_portmap_has_one_owner_and_is_still_listed";
    if !cluster_or_skip(test) {
        return;
    }
    // Both clusters chain portmap before randport (kindnet's conflist; the local node's
    // bridge conflist), and the agents run with the default --host-ports auto.
    let client = Client::try_default().await.unwrap();
    let ns = TestNamespace::create(&client, "hostport").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    create_pod(
        &client,
        &ns.name,
        "both",
        pod_with("both", true, &[(9377, 30377)]),
    )
    .await;
    create_pod(
        &client,
        &ns.name,
        "plain",
        pod_with("plain", false, &[(9378, 30378)]),
    )
    .await;

    // The annotated pod lists all three ports, the explicit one as the pod asked.
    let both = wait_mapped(&client, &ns.name, "both", 1).await.remove(0);
    let listed: Vec<(u16, Protocol, u16)> = both
        .entries
        .iter()
        .map(|e| (e.container_port, e.protocol, e.host_port))
        .collect();
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert_eq!(listed[2], (9377, Protocol::Tcp, 30377));
    check_answers(&both, "beside an explicit hostPort").await;
    let plain = wait_ready(&pods, "plain").await;
    assert_eq!(plain.annotations().get(KEY), None);

    // One owner: randport holds and maps neither explicit port; its record says so.
    let node = both.node.clone();
    let records = agent_records(&client, &node).await;
    let record = records
        .iter()
        .find(|r| both.owns(r))
        .expect("a record of pod both");
    let explicit: Vec<_> = record
        .mappings
        .iter()
        .filter(|m| m.host_port == 30377)
        .collect();
    assert!(explicit.len() == 1 && explicit[0].delegated, "{record:?}");
    assert!(
        records
            .iter()
            .all(|r| r.pod.name != "plain" || r.pod.namespace != ns.name),
        "randport made a record for a pod without the annotation"
    );
    let table = randport_table(&client, &node).await;
    for port in ["30377", "30378"] {
        assert!(
            !table.contains(port),
            "randport's table maps {port} too:\n{table}"
        );
    }
    // ... and portmap's rules make both answer.
    let ip = both.node_ip;
    let plain_ip =
        node_ips(&client).await[plain.spec.as_ref().unwrap().node_name.as_ref().unwrap()];
    assert_eq!(
        answers(SocketAddr::new(ip, 30377)).await.as_deref(),
        Ok("both")
    );
    assert_eq!(
        answers(SocketAddr::new(plain_ip, 30378)).await.as_deref(),
        Ok("plain")
    );
}

/// Percentile `p` (0..=100) of sorted `values`.
fn percentile(values: &[Duration], p: usize) -> Duration {
    values[(values.len() - 1) * p / 100]
}

/// Polls until `addr` answers HTTP with `name`; false after `TIMEOUT`.
async fn first_answer(mut addr: impl AsyncFnMut() -> Option<SocketAddr>, name: &str) -> bool {
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        if let Some(addr) = addr().await {
            let got = tokio::task::spawn_blocking(move || http_get(addr))
                .await
                .unwrap();
            if got.as_deref() == Ok(name) {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// A measurement, not a timed test: pod create to the first successful connection through
/// its random port (read from the annotation), beside the same for an explicit hostPort
/// that portmap maps, alternating, one pod at a time. Asserts only that every pod was
/// reached; the figures go to stderr and target/e2e-startup-latency.txt.
#[tokio::test]
async fn startup_latency_random_port_beside_portmap_explicit_host_port() {
    let test = "startup_latency_random_port_beside_portmap_explicit_host_port";
    if !cluster_or_skip(test) {
        return;
    }
    let count: usize = std::env::var("RANDPORT_E2E_LATENCY_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let client = Client::try_default().await.unwrap();
    let ns = TestNamespace::create(&client, "latency").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let ips = node_ips(&client).await;
    let (mut random, mut explicit) = (Vec::new(), Vec::new());
    for i in 0..count {
        // Random port: create, read the annotation, connect.
        let name = format!("random-{i}");
        let start = Instant::now();
        create_pod(&client, &ns.name, &name, pod_with("random", true, &[])).await;
        let mut seen = None;
        let lookup = async || {
            let pod = pods.get_opt(&name).await.ok().flatten()?;
            let node = pod.spec.as_ref()?.node_name.clone()?;
            let value = pod.annotations().get(KEY)?.clone();
            let Ok(AnnotationValue::Mapped(entries)) =
                decode(&PodRef::new(&ns.name, &name), &value)
            else {
                return None;
            };
            let tcp = entries.iter().find(|e| e.protocol == Protocol::Tcp)?;
            seen = Some(SocketAddr::new(ips[&node], tcp.host_port));
            seen
        };
        let reached = first_answer(lookup, &name).await;
        assert!(reached, "{name} never answered (its address: {seen:?})");
        random.push(start.elapsed());
        pods.delete(&name, &DeleteParams::default()).await.unwrap();

        // Explicit hostPort (no annotation): portmap maps it; connect until it answers.
        let name = format!("explicit-{i}");
        let host_port = 31000 + i as u16;
        let start = Instant::now();
        let created = create_pod(
            &client,
            &ns.name,
            &name,
            pod_with("explicit", false, &[(9377, host_port)]),
        )
        .await;
        let node = created.spec.as_ref().and_then(|s| s.node_name.clone());
        let lookup = async || {
            let node = match &node {
                Some(node) => node.clone(),
                // Scheduled later (kind): ask where it went.
                None => pods.get_opt(&name).await.ok().flatten()?.spec?.node_name?,
            };
            Some(SocketAddr::new(ips[&node], host_port))
        };
        assert!(
            first_answer(lookup, &name).await,
            "{name} never answered on {host_port}"
        );
        explicit.push(start.elapsed());
        pods.delete(&name, &DeleteParams::default()).await.unwrap();
    }
    random.sort();
    explicit.sort();
    let row = |what: &str, v: &[Duration]| {
        format!(
            "{what:<44} p50 {:>5} ms  p90 {:>5} ms  min {:>5} ms  max {:>5} ms",
            percentile(v, 50).as_millis(),
            percentile(v, 90).as_millis(),
            v[0].as_millis(),
            v[v.len() - 1].as_millis()
        )
    };
    let report = format!(
        "pod create -> first answer, {count} pods each, one at a time:\n{}\n{}\n",
        row("random port (randport, read from annotation)", &random),
        row("explicit hostPort (portmap)", &explicit)
    );
    eprint!("{report}");
    let _ = std::fs::write(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../target/e2e-startup-latency.txt"
        ),
        &report,
    );
}

#[tokio::test]
async fn a_pod_deleted_while_the_agent_is_down_goes_away_and_leaves_nothing() {
    let test = "a_pod_deleted_while_the_agent_is_down_goes_away_and_leaves_nothing";
    if !cluster_or_skip(test) {
        return;
    }
    let Some(dir) = local_cluster() else {
        // A DaemonSet puts its agent back at once; the root tests cover this on kind's
        // behalf (plugin/tests/kernel_agent.rs).
        eprintln!("note: {test} needs an agent it can keep down (the local node)");
        return;
    };
    let (client, ns, mut pods) = deploy("agent-down", 1).await;
    let old = pods.remove(0);
    check_answers(&old, "before the delete").await;

    local_agent(&dir, "stop");
    let started = Instant::now();
    delete_and_wait(&Api::namespaced(client.clone(), &ns.name), &old.name).await;
    let took = started.elapsed();
    eprintln!("the pod was gone {took:?} after its delete, with the agent down");
    // The kubelet's DEL succeeded at once; without it the pod would hang in Terminating.
    assert!(took < Duration::from_secs(30), "deleting took {took:?}");
    let (tcp, udp) = (old.addr(), old.udp_addr());
    let after = tokio::task::spawn_blocking(move || (http_get(tcp), udp_ask(udp)))
        .await
        .unwrap();
    assert!(
        after.0.is_err() && after.1.is_err(),
        "still answers: {after:?}"
    );

    local_agent(&dir, "start");
    let records = agent_records(&client, &old.node).await;
    assert!(
        records.iter().all(|r| !old.owns(r)),
        "the agent came back with a record of the deleted pod: {records:?}"
    );
    let table = randport_table(&client, &old.node).await;
    for entry in &old.entries {
        let needle = format!(" . {} ", entry.host_port);
        assert!(
            !table.contains(&needle),
            "a rule for {} is left:\n{table}",
            entry.host_port
        );
    }
}

#[tokio::test]
async fn an_annotated_host_network_pod_gets_a_warning_event_and_keeps_its_annotation() {
    let test = "an_annotated_host_network_pod_gets_a_warning_event_and_keeps_its_annotation";
    if !cluster_or_skip(test) {
        return;
    }
    let client = Client::try_default().await.unwrap();
    let ns = TestNamespace::create(&client, "hostnet").await;
    let mut pod = pod_with("hostnet", true, &[]);
    pod["spec"]["hostNetwork"] = json!(true);
    // On the node's own network: a port nothing else there uses.
    let containers = pod["spec"]["containers"].as_array_mut().unwrap();
    containers.truncate(1);
    containers[0]["args"] = if local_cluster().is_some() {
        json!(["9390"])
    } else {
        json!(["serve-hostname", "--port", "9390"])
    };
    containers[0]["ports"] = json!([{"containerPort": 9390, "protocol": "TCP"}]);
    let created = create_pod(&client, &ns.name, "hostnet-0", pod).await;
    let uid = created.uid().unwrap();
    let event = wait_event(&client, &ns.name, &uid, "PortMappingNotPossible").await;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert!(event.message.unwrap_or_default().contains("hostNetwork"));
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let running = wait_ready(&pods, "hostnet-0").await;
    assert_eq!(running.annotations().get(KEY).map(String::as_str), Some(""));
}

/// `kubectl randport ARGS` as a person runs it: kubectl finds the plugin on the PATH
/// (`kubectl-randport` from this build: RANDPORT_E2E_BIN_DIR, else target/debug).
fn kubectl_randport(args: &[&str]) -> String {
    let bin_dir = std::env::var("RANDPORT_E2E_BIN_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../target/debug").to_owned());
    assert!(
        std::path::Path::new(&bin_dir)
            .join("kubectl-randport")
            .exists(),
        "no kubectl-randport in {bin_dir}: cargo build -p randport-plugin --bins"
    );
    let path = format!("{bin_dir}:{}", std::env::var("PATH").unwrap_or_default());
    let out = kubectl()
        .arg("randport")
        .args(args)
        .env("PATH", path)
        .output()
        .expect("running kubectl randport");
    assert!(
        out.status.success(),
        "kubectl randport {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn kubectl_randport_prints_the_address_that_reaches_each_pod() {
    let test = "kubectl_randport_prints_the_address_that_reaches_each_pod";
    if !cluster_or_skip(test) {
        return;
    }
    let (_client, ns, pods) = deploy("kubectl", 2).await;
    let json: Value =
        serde_json::from_str(&kubectl_randport(&["ports", "-n", &ns.name, "-o", "json"])).unwrap();
    let rows = json.as_array().unwrap();
    assert_eq!(rows.len(), 4, "two mappings for each of two pods: {json}");
    for pod in &pods {
        for entry in &pod.entries {
            let row = rows
                .iter()
                .find(|r| r["pod"] == pod.name.as_str() && r["hostPort"] == entry.host_port)
                .unwrap_or_else(|| panic!("no row for {} {}: {json}", pod.name, entry.host_port));
            let address = SocketAddr::new(pod.node_ip, entry.host_port);
            assert_eq!(row["address"], address.to_string());
            assert_eq!(row["node"], pod.node.as_str());
            assert_eq!(row["status"], "mapped");
        }
        // What it prints reaches the pod.
        let tcp: SocketAddr = rows
            .iter()
            .find(|r| r["pod"] == pod.name.as_str() && r["protocol"] == "TCP")
            .unwrap()["address"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(answers(tcp).await.as_deref(), Ok(pod.name.as_str()));
    }
    // One pod, as a table; and the nodes' counts.
    let table = kubectl_randport(&["ports", &pods[0].name, "-n", &ns.name]);
    assert!(table.starts_with("NAMESPACE"), "{table}");
    assert!(table.contains(&pods[0].addr().to_string()), "{table}");
    assert!(!table.contains(&pods[1].name), "{table}");
    let nodes: Value = serde_json::from_str(&kubectl_randport(&["nodes", "-o", "json"])).unwrap();
    let here = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == pods[0].node.as_str())
        .unwrap();
    let on_node = pods.iter().filter(|p| p.node == pods[0].node).count() as u64;
    assert!(here["tcp"].as_u64().unwrap() >= on_node, "{nodes}");
}

// ---- the chart's own pods on the real node ----

/// Puts the hand-run agent back when the chart test ends, also when it fails: the chart's
/// pods and release go, our entry goes back into the conflist, the agent starts.
struct LiveRestore {
    dir: PathBuf,
    helm: PathBuf,
}

impl Drop for LiveRestore {
    fn drop(&mut self) {
        let _ = kubectl()
            .args(["-n", AGENT_NS, "delete", "pod", "-l", "randport-e2e/live=1"])
            .args(["--grace-period=1", "--wait=true", "--timeout=60s"])
            .output();
        let _ = Command::new(&self.helm)
            .args([
                "uninstall",
                "randport-live",
                "-n",
                AGENT_NS,
                "--ignore-not-found",
            ])
            .output();
        let _ = Command::new(self.dir.join("agent")).arg("install").output();
        let _ = Command::new(self.dir.join("agent")).arg("start").output();
    }
}

/// What the DaemonSet controller does (this node runs without a controller manager): a pod
/// of DaemonSet `ds`'s current template, bound to the node; and what the ServiceAccount
/// admission plugin does (off here for the same reason): the service-account token volume.
fn daemonset_pod(ds: &str, name: &str, node: &str) -> Pod {
    let ds: Value = serde_json::from_str(&kubectl_ok(&[
        "-n",
        AGENT_NS,
        "get",
        "daemonset",
        ds,
        "-o",
        "json",
    ]))
    .unwrap();
    let template = &ds["spec"]["template"];
    let mut spec = template["spec"].clone();
    spec["nodeName"] = json!(node);
    if spec["automountServiceAccountToken"] != json!(false) {
        let token_mount = json!({"name": "sa-token", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true});
        for list in ["initContainers", "containers"] {
            if let Some(containers) = spec[list].as_array_mut() {
                for c in containers {
                    c["volumeMounts"]
                        .as_array_mut()
                        .unwrap()
                        .push(token_mount.clone());
                }
            }
        }
        spec["volumes"].as_array_mut().unwrap().push(json!({"name": "sa-token", "projected": {"sources": [
            {"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}}
        ]}}));
    }
    let mut labels = template["metadata"]["labels"].clone();
    labels["randport-e2e/live"] = json!("1");
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": AGENT_NS, "labels": labels},
        "spec": spec,
    }))
    .unwrap()
}

/// Creates `pod` and waits until it is Ready; on a timeout, says what the kubelet saw.
async fn run_until_ready(pods: &Api<Pod>, pod: Pod) {
    let name = pod.metadata.name.clone().unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let p = pods.get(&name).await.unwrap();
        let ready = p
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if ready {
            return;
        }
        if Instant::now() > deadline {
            let describe = kubectl()
                .args(["-n", AGENT_NS, "describe", "pod", &name])
                .output()
                .unwrap();
            let logs = kubectl()
                .args([
                    "-n",
                    AGENT_NS,
                    "logs",
                    &name,
                    "--all-containers",
                    "--tail=30",
                ])
                .output()
                .unwrap();
            panic!(
                "pod {name} not Ready after 90 s:\n{}\n{}{}",
                String::from_utf8_lossy(&describe.stdout),
                String::from_utf8_lossy(&logs.stdout),
                String::from_utf8_lossy(&logs.stderr)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// What the DaemonSet controller does when the template changes: pod `old` goes (SIGTERM,
/// its grace period), then `new`, of DaemonSet `ds`'s current template, comes up Ready.
async fn replace_pod(pods: &Api<Pod>, old: &str, ds: &str, new: &str) {
    pods.delete(old, &DeleteParams::default()).await.unwrap();
    wait_gone(pods, old).await;
    run_until_ready(pods, daemonset_pod(ds, new, LOCAL_NODE)).await;
}

fn our_entry(conf_dir: &std::path::Path) -> Option<Value> {
    let text = std::fs::read_to_string(conf_dir.join("10-bridge.conflist")).unwrap();
    let conf: Value = serde_json::from_str(&text).unwrap();
    conf["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["type"] == "randport")
        .cloned()
}

/// The chart as an operator installs it, its pods run by the real kubelet and containerd
/// from an image of this build (`local.test/randport:dev`, ci/local-cluster.sh): the
/// install init container puts the entry into the node's conflist, the agent (with the
/// chart's capabilities, env and host paths, probed on /readyz) maps pods that answer
/// from outside; `helm upgrade` with the pod replaced as a DaemonSet rolls it keeps a
/// mapping answering throughout; the chart's uninstall mode cleans the node, and
/// `helm uninstall` removes the rest. Only on the local node (the kind job installs the
/// chart with a real DaemonSet controller).
#[tokio::test]
async fn the_chart_runs_on_the_node_maps_pods_rolls_and_uninstalls() {
    let test = "the_chart_runs_on_the_node_maps_pods_rolls_and_uninstalls";
    if !cluster_or_skip(test) {
        return;
    }
    let Some(dir) = local_cluster() else {
        eprintln!("{test}: only on the local node; the kind job installs the chart itself");
        return;
    };
    let Some(helm) = helm_or_skip(test) else {
        return;
    };
    let client = Client::try_default().await.unwrap();
    let agents: Api<Pod> = Api::namespaced(client.clone(), AGENT_NS);
    let node = LOCAL_NODE;
    let (conf_dir, bin_dir) = (dir.join("cni/net.d"), dir.join("cni/bin"));
    let live = dir.join("live");
    let socket_dir = live.join("run");
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

    local_agent(&dir, "stop");
    let _restore = LiveRestore {
        dir: dir.clone(),
        helm: helm.clone(),
    };
    // The CA the kubelet puts into the token volume (the controller manager publishes it).
    let ca = std::fs::read_to_string(dir.join("pki/ca.crt")).unwrap();
    let maps: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(client.clone(), AGENT_NS);
    if maps.get_opt("kube-root-ca.crt").await.unwrap().is_none() {
        let cm = serde_json::from_value(
            json!({"metadata": {"name": "kube-root-ca.crt"}, "data": {"ca.crt": ca}}),
        )
        .unwrap();
        maps.create(&PostParams::default(), &cm).await.unwrap();
    }
    let values = live.join("values.yaml");
    std::fs::create_dir_all(&live).unwrap();
    std::fs::write(
        &values,
        format!(
            "nameOverride: randport-live\n\
             image: {{repository: local.test/randport, tag: dev, pullPolicy: Never}}\n\
             cni: {{binDir: {}, confDir: {}}}\n\
             socketDir: {}\nstateDir: {}\nxtablesLock: {}\n\
             # No kube-proxy on this node: the API server's own address.\n\
             extraEnv:\n  - {{name: KUBERNETES_SERVICE_HOST, value: \"{LOCAL_NODE_IP}\"}}\n  - {{name: KUBERNETES_SERVICE_PORT, value: \"6443\"}}\n",
            bin_dir.display(),
            conf_dir.display(),
            socket_dir.display(),
            live.join("state").display(),
            live.join("xtables.lock").display()
        ),
    )
    .unwrap();
    let chart = format!("{repo}/charts/randport");
    let helm_ok = |args: &[&str]| {
        let mut command = Command::new(&helm);
        command.args(args);
        run_ok(command, None);
    };
    let values_arg = values.to_str().unwrap();
    helm_ok(&[
        "install",
        "randport-live",
        &chart,
        "-n",
        AGENT_NS,
        "-f",
        values_arg,
    ]);
    let upgrade = |set: &str| {
        helm_ok(&[
            "upgrade",
            "randport-live",
            &chart,
            "-n",
            AGENT_NS,
            "-f",
            values_arg,
            "--set",
            set,
        ])
    };

    // The agent pod: its init container installs the entry, the agent becomes Ready.
    run_until_ready(
        &agents,
        daemonset_pod("randport-live", "randport-live-a", node),
    )
    .await;
    let entry = our_entry(&conf_dir).expect("the install init container added our entry");
    assert_eq!(
        entry["socket"],
        socket_dir.join("randportd.sock").display().to_string(),
        "the entry names the chart's socket: {entry}"
    );
    assert!(bin_dir.join("randport").exists());

    let (_client, ns, pods) = deploy("live", 2).await;
    for pod in &pods {
        check_entries(pod);
        check_answers(pod, "mapped by the chart's agent pod").await;
    }

    // A rolling update: new template, the old pod goes (SIGTERM), the new one comes up,
    // while a client connects to a mapping over and over.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let target = pods[0].addr();
    let expect = pods[0].name.clone();
    let traffic = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut tries, mut failures) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                tries += 1;
                match http_get(target) {
                    Ok(name) if name == expect => {}
                    other => failures.push(format!("{other:?}")),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (tries, failures)
        })
    };
    upgrade("logFormat=json");
    replace_pod(
        &agents,
        "randport-live-a",
        "randport-live",
        "randport-live-b",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (tries, failures) = traffic.join().unwrap();
    eprintln!("{tries} connections to a mapping during the rolling update");
    assert!(tries > 10, "only {tries} connections during the update");
    assert!(
        failures.is_empty(),
        "{} of {tries} connections failed during the update: {failures:?}",
        failures.len()
    );
    let new = agents.get("randport-live-b").await.unwrap();
    let env = serde_json::to_string(&new.spec.unwrap().containers[0].env).unwrap();
    assert!(
        env.contains("\"json\""),
        "the new pod runs the new template: {env}"
    );
    for pod in &pods {
        check_answers(pod, "after the rolling update").await;
    }

    // Off the node: the pods go first (their DEL through the agent), then the chart's
    // uninstall mode, whose init container cleans the node, then the release.
    drop(ns);
    let web: Api<Pod> = Api::namespaced(client.clone(), &pods[0].namespace);
    for pod in &pods {
        wait_gone(&web, &pod.name).await;
    }
    upgrade("uninstall.enabled=true");
    replace_pod(
        &agents,
        "randport-live-b",
        "randport-live-uninstall",
        "randport-live-uninstall-a",
    )
    .await;
    assert_eq!(
        our_entry(&conf_dir),
        None,
        "the uninstall pod took our entry out"
    );
    assert!(!bin_dir.join("randport").exists(), "and the plugin binary");
    let records = std::fs::read_dir(live.join("state"))
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "json")
            })
            .count()
        })
        .unwrap_or(0);
    assert_eq!(records, 0, "and the records");
    agents
        .delete("randport-live-uninstall-a", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone(&agents, "randport-live-uninstall-a").await;
    helm_ok(&["uninstall", "randport-live", "-n", AGENT_NS]);
}

/// What the [`ApiProxy`] does with the agent's traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProxyMode {
    /// Passes every byte both ways.
    Pass,
    /// Holds every byte: the API server "does not answer".
    Stall,
    /// Cuts every connection, and every new one at once.
    Reset,
    /// Cuts every connection, and answers every new request with this HTTP status.
    Answer(u16),
}

impl ProxyMode {
    fn code(self) -> u16 {
        match self {
            ProxyMode::Pass => 0,
            ProxyMode::Stall => 1,
            ProxyMode::Reset => 2,
            ProxyMode::Answer(status) => status,
        }
    }

    fn of(code: u16) -> ProxyMode {
        match code {
            0 => ProxyMode::Pass,
            1 => ProxyMode::Stall,
            2 => ProxyMode::Reset,
            status => ProxyMode::Answer(status),
        }
    }
}

/// A TCP proxy of the test's own between the agent and `kubectl proxy` (which passes the
/// requests on to the real API server with the cluster's credentials): it passes, holds
/// or cuts every byte, or answers every request itself with an HTTP error.
struct ApiProxy {
    addr: SocketAddr,
    mode: std::sync::Arc<std::sync::atomic::AtomicU16>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Answers one request on `client` with `status` (its head read first), then closes.
fn answer_with(mut client: TcpStream, status: u16) {
    let _ = client.set_read_timeout(Some(Duration::from_secs(5)));
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 64 * 1024 {
        match client.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let reason = if status == 429 {
        "TooManyRequests"
    } else {
        "InternalError"
    };
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": format!("injected by the test's proxy: {status}"),
                      "reason": reason, "code": status})
    .to_string();
    let _ = write!(
        client,
        "HTTP/1.1 {status} Injected\r\nContent-Type: application/json\r\nRetry-After: 1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

impl ApiProxy {
    fn start(upstream: SocketAddr) -> ApiProxy {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU16, Ordering::SeqCst};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (mode, stop) = (
            Arc::new(AtomicU16::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let (m, st) = (mode.clone(), stop.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if st.load(SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                match ProxyMode::of(m.load(SeqCst)) {
                    ProxyMode::Reset => {
                        drop(client);
                        continue;
                    }
                    ProxyMode::Answer(status) => {
                        std::thread::spawn(move || answer_with(client, status));
                        continue;
                    }
                    ProxyMode::Pass | ProxyMode::Stall => {}
                }
                let Ok(server) = TcpStream::connect_timeout(&upstream, Duration::from_secs(5))
                else {
                    continue;
                };
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let (m, st) = (m.clone(), st.clone());
                    std::thread::spawn(move || {
                        let _ = from.set_read_timeout(Some(Duration::from_millis(100)));
                        let mut buf = [0u8; 16 * 1024];
                        let cut = |m: &AtomicU16| {
                            matches!(
                                ProxyMode::of(m.load(SeqCst)),
                                ProxyMode::Reset | ProxyMode::Answer(_)
                            )
                        };
                        loop {
                            if cut(&m) || st.load(SeqCst) {
                                let _ = from.shutdown(std::net::Shutdown::Both);
                                let _ = to.shutdown(std::net::Shutdown::Both);
                                return;
                            }
                            let n = match from.read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => n,
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        std::io::ErrorKind::WouldBlock
                                            | std::io::ErrorKind::TimedOut
                                    ) =>
                                {
                                    continue;
                                }
                                Err(_) => break,
                            };
                            // Held while stalled: the API server "does not answer".
                            while ProxyMode::of(m.load(SeqCst)) == ProxyMode::Stall
                                && !st.load(SeqCst)
                            {
                                std::thread::sleep(Duration::from_millis(10));
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        ApiProxy { addr, mode, stop }
    }

    fn set(&self, mode: ProxyMode) {
        self.mode
            .store(mode.code(), std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for ApiProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

/// `kubectl proxy` on a loopback port: plain HTTP in, the cluster's credentials and TLS out.
struct KubectlProxy {
    child: std::process::Child,
    addr: SocketAddr,
}

impl KubectlProxy {
    fn start() -> KubectlProxy {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = kubectl()
            .args([
                "proxy",
                "--address",
                "127.0.0.1",
                "--port",
                &port.to_string(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting kubectl proxy");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let started = Instant::now();
        while TcpStream::connect(addr).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "kubectl proxy never listened"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        KubectlProxy { child, addr }
    }
}

impl Drop for KubectlProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A randportd of the test's own (`--pods kube` through an [`ApiProxy`]) in the client
/// namespace, with its own socket, records and port range; killed, its table deleted and
/// its files removed when dropped.
struct ProxiedAgent {
    child: std::process::Child,
    dir: PathBuf,
    bin_dir: PathBuf,
}

impl ProxiedAgent {
    fn socket(&self) -> PathBuf {
        self.dir.join("randportd.sock")
    }

    /// Runs the plugin for `verb` of `sandbox` (pod `ns/name`, address `ip`); the child,
    /// its stdin already written.
    fn plugin(
        &self,
        verb: &str,
        sandbox: &str,
        pod: (&str, &str),
        ip: &str,
    ) -> std::process::Child {
        let conf = json!({
            "cniVersion": "1.1.0", "name": "e2e-proxied", "type": "randport",
            "socket": self.socket(), "stateDir": self.dir.join("state"),
            "prevResult": {"cniVersion": "1.1.0", "interfaces": [{"name": "eth0"}],
                           "ips": [{"address": format!("{ip}/24")}]}
        });
        let mut child = Command::new(self.bin_dir.join("randport"))
            .env("CNI_COMMAND", verb)
            .env("CNI_CONTAINERID", sandbox)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_NETNS", "/proc/self/ns/net")
            .env("CNI_PATH", &self.bin_dir)
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={}",
                    pod.0, pod.1
                ),
            )
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("running randport");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.to_string().as_bytes())
            .unwrap();
        child
    }

    /// Runs the plugin to its end; (success, stdout).
    fn plugin_ok(&self, verb: &str, sandbox: &str, pod: (&str, &str), ip: &str) -> (bool, String) {
        let out = self
            .plugin(verb, sandbox, pod, ip)
            .wait_with_output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    fn records(&self) -> Vec<SandboxRecord> {
        let out = Command::new(self.bin_dir.join("randportd"))
            .args(["list", "--json", "--socket"])
            .arg(self.socket())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for ProxiedAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", "randport"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The worst of the failure model, against the real API server: it stops answering while
/// an ADD waits on it (or cuts every connection, or answers 429 or 500), the runtime gives
/// up on the plugin and
/// sends DEL, which succeeds; then the API server answers again. The abandoned ADD must
/// not map anything afterwards: its sandbox's pod IP goes to the next pod each time, and
/// only that pod's mapping may name it. 200 rounds; then the agent's records, its held
/// ports and the kernel's elements are all empty.
#[tokio::test]
async fn adds_abandoned_while_the_api_server_stalls_resets_or_fails_leave_nothing() {
    let test = "adds_abandoned_while_the_api_server_stalls_resets_or_fails_leave_nothing";
    if !cluster_or_skip(test) {
        return;
    }
    if local_cluster().is_none() {
        eprintln!(
            "note: {test} runs a second agent of its own beside the node (the local cluster)"
        );
        return;
    }
    let client = Client::try_default().await.unwrap();
    let ns = TestNamespace::create(&client, "proxied").await;
    let node = format!("rp-proxied-{}", run_id());
    let kubectl_proxy = KubectlProxy::start();
    let proxy = ApiProxy::start(kubectl_proxy.addr);

    let dir = std::env::temp_dir().join(format!("rp-e2e-proxied-{}", run_id()));
    std::fs::create_dir_all(dir.join("state")).unwrap();
    let kubeconfig = json!({
        "apiVersion": "v1", "kind": "Config", "current-context": "proxied",
        "clusters": [{"name": "proxied", "cluster": {"server": format!("http://{}", proxy.addr)}}],
        "users": [{"name": "proxied", "user": {}}],
        "contexts": [{"name": "proxied", "context": {"cluster": "proxied", "user": "proxied"}}]
    });
    std::fs::write(dir.join("kubeconfig"), kubeconfig.to_string()).unwrap();
    let bin_dir = std::env::var("RANDPORT_E2E_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/debug")));
    let log = std::fs::File::create(dir.join("randportd.log")).unwrap();
    let child = Command::new(bin_dir.join("randportd"))
        .env("KUBECONFIG", dir.join("kubeconfig"))
        .args([
            "--node-name",
            &node,
            "--pods",
            "kube",
            "--metrics-addr",
            "off",
        ])
        .args(["--port-range", "28000-28999", "--socket"])
        .arg(dir.join("randportd.sock"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("starting randportd");
    let agent = ProxiedAgent {
        child,
        dir: dir.clone(),
        bin_dir,
    };
    let started = Instant::now();
    while !agent.plugin_ok("STATUS", "x", ("", ""), "198.18.9.9").0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the agent never became ready: {}",
            std::fs::read_to_string(dir.join("randportd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let pod = |name: &str| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": {KEY: ""}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": LOCAL_BUSYBOX,
                     "ports": [{"containerPort": 8080}, {"containerPort": 53, "protocol": "UDP"}]}]}
        }))
        .unwrap()
    };
    let ip = "198.18.9.9";
    let rounds = 200;
    let mut abandoned_codes = BTreeMap::<String, usize>::new();
    for round in 0..rounds {
        let (old, new) = (format!("old-{round}"), format!("new-{round}"));
        for name in [&old, &new] {
            pods.create(&PostParams::default(), &pod(name))
                .await
                .unwrap();
        }
        // The API server holds every byte, cuts every connection, or answers 429 or 500.
        let mode = [
            ProxyMode::Stall,
            ProxyMode::Reset,
            ProxyMode::Answer(429),
            ProxyMode::Answer(500),
        ][round % 4];
        proxy.set(mode);
        let abandoned = format!("abandoned{round}");
        let mut add = agent.plugin("ADD", &abandoned, (&ns.name, &old), ip);
        std::thread::sleep(Duration::from_millis(150));
        if add.try_wait().unwrap().is_none() {
            // The runtime gives up on the plugin (its CNI timeout, a cancelled request).
            let _ = add.kill();
        }
        let add = add.wait_with_output().unwrap();
        *abandoned_codes
            .entry(if add.status.success() {
                "succeeded".into()
            } else {
                "failed or killed".into()
            })
            .or_default() += 1;
        let (deleted, out) = agent.plugin_ok("DEL", &abandoned, (&ns.name, &old), ip);
        assert!(deleted, "round {round}: DEL failed: {out}");
        // The API server answers again; the IP goes to the next pod.
        proxy.set(ProxyMode::Pass);
        let (added, out) = agent.plugin_ok("ADD", &format!("next{round}"), (&ns.name, &new), ip);
        assert!(added, "round {round}: the next pod's ADD failed: {out}");
        let with_ip: Vec<String> = agent
            .records()
            .into_iter()
            .filter(|r| r.pod_ips.iter().any(|a| a.to_string() == ip))
            .map(|r| r.sandbox.0)
            .collect();
        assert_eq!(with_ip, vec![format!("next{round}")], "round {round}");
        let (deleted, out) = agent.plugin_ok("DEL", &format!("next{round}"), (&ns.name, &new), ip);
        assert!(deleted, "round {round}: {out}");
    }
    // Every abandoned ADD has finished by now (each stops at its next step once the API
    // answers): nothing of any sandbox is left anywhere.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let records = agent.records();
        let table = Command::new("nft")
            .args(["-j", "list", "table", "inet", "randport"])
            .output()
            .unwrap();
        let elements = String::from_utf8_lossy(&table.stdout)
            .matches("\"elem\"")
            .count();
        let held: Vec<u16> = (28000..=28999)
            .filter(|p| std::net::TcpListener::bind(("0.0.0.0", *p)).is_err())
            .collect();
        if records.is_empty() && elements == 0 && held.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: {} records, {elements} map elements, held ports {held:?}; log: {}",
            records.len(),
            std::fs::read_to_string(dir.join("randportd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let state: Vec<_> = std::fs::read_dir(dir.join("state"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .collect();
    assert!(state.is_empty(), "records left on disk: {state:?}");
    eprintln!("{rounds} abandoned ADDs: {abandoned_codes:?}; nothing left");
    let log = std::fs::read_to_string(dir.join("randportd.log")).unwrap_or_default();
    eprintln!(
        "the agent saw {} ADDs cancelled by their DEL and {} late ADDs refused",
        log.matches("while its ADD was at").count(),
        log.matches("before its ADD arrived").count()
    );
    drop(agent);
    drop(proxy);
    drop(kubectl_proxy);
}
