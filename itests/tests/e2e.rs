//! End-to-end tests against a real cluster with randport installed (`ci/kind-e2e.sh` makes
//! one with kind: one control plane, two workers). They use the cluster `KUBECONFIG`
//! names and are skipped, saying so, when it is unset; with `RANDPORT_E2E=1` (the kind
//! job) a missing cluster is a failure. Run them one at a time (`--test-threads 1`): one
//! of them restarts the agents.
//!
//! Each test works in a namespace of its own (`rp-e2e-<run id>-<purpose>`, deleted at the
//! end, also on failure) and sends traffic only to the cluster's nodes, which the kind job
//! created. The workload is agnhost's `serve-hostname`: it answers HTTP with the pod's
//! name.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use randport_core::PodRef;
use randport_core::annotation::{AnnotationValue, PortEntry, decode};
use randport_itests::run_id;
use serde_json::json;

const KEY: &str = "tkestack.io/portmapping";
const AGNHOST: &str = "registry.k8s.io/e2e-test-images/agnhost:2.53";
const AGENT_NS: &str = "kube-system";
const AGENT_LABEL: &str = "app.kubernetes.io/name=randport";
const TIMEOUT: Duration = Duration::from_secs(180);

fn cluster_or_skip(test: &str) -> bool {
    if std::env::var_os("KUBECONFIG").is_some() {
        return true;
    }
    assert!(
        std::env::var_os("RANDPORT_E2E").is_none(),
        "{test}: RANDPORT_E2E is set but KUBECONFIG is not: the e2e job must name its cluster"
    );
    eprintln!(
        "SKIPPED {test}: no cluster here (no Docker for kind); set KUBECONFIG to a cluster \
         with randport installed, or run ci/kind-e2e.sh where Docker exists"
    );
    false
}

/// A namespace for one test, deleted when dropped (also after a failed assertion).
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
        let _ = std::process::Command::new("kubectl")
            .args(["delete", "namespace", &self.name, "--wait=false"])
            .status();
    }
}

fn deployment(name: &str, replicas: i32) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}, "annotations": {KEY: ""}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "serve",
                        "image": AGNHOST,
                        "args": ["serve-hostname", "--port", "9376"],
                        "ports": [{"containerPort": 9376, "protocol": "TCP"}]
                    }]
                }
            }
        }
    }))
    .unwrap()
}

/// A running pod and where its port is reached.
#[derive(Debug, Clone)]
struct Mapped {
    name: String,
    uid: String,
    node_ip: IpAddr,
    entries: Vec<PortEntry>,
}

impl Mapped {
    fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.node_ip, self.entries[0].host_port)
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
                        name,
                        uid: pod.uid().unwrap_or_default(),
                        node_ip: ips[&node],
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
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A client, a namespace for `purpose`, and a Deployment `web` of `replicas` in it, once
/// every replica runs with its ports written.
async fn deploy(purpose: &str, replicas: usize) -> (Client, TestNamespace, Vec<Mapped>) {
    let client = Client::try_default().await.unwrap();
    let ns = TestNamespace::create(&client, purpose).await;
    Api::<Deployment>::namespaced(client.clone(), &ns.name)
        .create(&PostParams::default(), &deployment("web", replicas as i32))
        .await
        .unwrap();
    let pods = wait_mapped(&client, &ns.name, "web", replicas).await;
    (client, ns, pods)
}

/// What `addr` answers to an HTTP GET (agnhost: the pod's name), or why it did not.
fn http_get(addr: SocketAddr) -> Result<String, String> {
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(Duration::from_secs(3))).ok();
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: randport\r\n\r\n")
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

/// Retries for a while: the first packets may race the rules of a pod that just became
/// ready on a busy node.
async fn answers(addr: SocketAddr) -> Result<String, String> {
    let mut last = Err(String::new());
    for _ in 0..10 {
        last = tokio::task::spawn_blocking(move || http_get(addr))
            .await
            .unwrap();
        if last.is_ok() {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    last
}

fn check_entries(pod: &Mapped) {
    assert_eq!(pod.entries.len(), 1, "{pod:?}");
    let entry = &pod.entries[0];
    assert_eq!(entry.container_port, 9376);
    assert_eq!(entry.pod_name, pod.name);
    assert!(
        (20000..=29999).contains(&entry.host_port),
        "host port {} is outside the configured range: {pod:?}",
        entry.host_port
    );
}

#[tokio::test]
async fn every_replica_gets_valid_json_and_answers_with_its_name_at_its_host_port() {
    if !cluster_or_skip("every_replica_gets_valid_json_and_answers_with_its_name_at_its_host_port")
    {
        return;
    }
    let (_client, _ns, pods) = deploy("replicas", 4).await;
    let mut seen = std::collections::HashSet::new();
    for pod in &pods {
        check_entries(pod);
        assert!(seen.insert(pod.addr()), "two pods share {}", pod.addr());
        assert_eq!(
            answers(pod.addr()).await.as_deref(),
            Ok(pod.name.as_str()),
            "{pod:?}"
        );
    }
}

#[tokio::test]
async fn a_recreated_pod_gets_a_fresh_mapping_and_the_old_port_stops_answering() {
    if !cluster_or_skip("a_recreated_pod_gets_a_fresh_mapping_and_the_old_port_stops_answering") {
        return;
    }
    let (client, ns, mut pods) = deploy("recreate", 1).await;
    let old = pods.remove(0);
    assert_eq!(answers(old.addr()).await.as_deref(), Ok(old.name.as_str()));

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    pods.delete(&old.name, &DeleteParams::default())
        .await
        .unwrap();
    let deadline = Instant::now() + TIMEOUT;
    let new = loop {
        let now = wait_mapped(&client, &ns.name, "web", 1).await.remove(0);
        if now.uid != old.uid && pods.get_opt(&old.name).await.unwrap().is_none() {
            break now;
        }
        assert!(Instant::now() < deadline, "{} was not replaced", old.name);
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    check_entries(&new);
    assert_eq!(answers(new.addr()).await.as_deref(), Ok(new.name.as_str()));
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
    // While the agents are gone, the rules and holds stay: the mappings keep working.
    for pod in &before {
        assert_eq!(
            answers(pod.addr()).await.as_deref(),
            Ok(pod.name.as_str()),
            "during the restart"
        );
    }
    // New agents come up ready (restored and reconciled) ...
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
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agents did not come back ready"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // ... and keep every mapping as it was.
    let after = wait_mapped(&client, &ns.name, "web", 3).await;
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(b.uid, a.uid);
        assert_eq!(b.addr(), a.addr(), "the annotation of {} changed", a.name);
        assert_eq!(
            answers(a.addr()).await.as_deref(),
            Ok(a.name.as_str()),
            "after the restart"
        );
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
    let agents: Api<Pod> = Api::namespaced(client.clone(), AGENT_NS);
    let agent = agents
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
        .unwrap_or_else(|| panic!("no randport agent on node {node}"));
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
