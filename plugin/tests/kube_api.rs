//! The Kubernetes pod source and the agent against a mock API server (tower-test, as kube's
//! own tests do it): lookup through the watch cache and by GET, retries on transient
//! errors and conflicts, forbidden and not-found, the merge patch, Events, and the startup
//! reconcile.
//!
//! The mock serves pods from memory: a LIST (the watch's first sync), a streaming WATCH
//! that sees later changes, GET, PATCH (a real RFC 7386 merge, with the uid precondition
//! the API server applies) and POST of Events. Failures are injected per request.
#![cfg(feature = "kube")]

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use randport_core::annotation::encode;
use randport_core::{PodRef, ReservedPorts, SandboxId};
use randport_plugin::agent::rpc::AddRequest;
use randport_plugin::agent::{Agent, AgentConfig, Effects};
use randport_plugin::firewall::FakeFirewall;
use randport_plugin::kube::api::{
    FAILURE_REASON, HOST_NETWORK_REASON, KubePodSource, KubeSettings, UNMAPPED_REASON,
};
use randport_plugin::kube::pods::{PodError, PodSource};
use randport_plugin::netfilter::conntrack::FakeConntrack;
use randport_plugin::node::holder::FakeHolder;
use randport_plugin::node::state::{MemoryStateStore, StateStore};
use serde_json::{Value, json};
use tokio::sync::mpsc;

const KEY: &str = "tkestack.io/portmapping";
const NODE: &str = "node-0";

type Body = BoxBody<Bytes, Infallible>;

#[derive(Default)]
struct State {
    pods: BTreeMap<(String, String), Value>,
    /// "METHOD path?query" of every request, in order.
    requests: Vec<String>,
    /// (method, path, status, message): the next request that matches fails so.
    failures: VecDeque<(Method, String, u16, String)>,
    /// (content type, body) of every PATCH that reached the pods.
    patches: Vec<(String, Value)>,
    events: Vec<Value>,
    watchers: Vec<mpsc::UnboundedSender<Bytes>>,
    resource_version: u64,
}

/// The mock API server and a pod source using it, on a runtime of the test's own.
struct Mock {
    state: Arc<Mutex<State>>,
    source: Arc<KubePodSource>,
    _runtime: tokio::runtime::Runtime,
}

fn pod(name: &str, node: &str, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"),
                     "resourceVersion": "1", "annotations": annotations},
        "spec": {"nodeName": node, "containers": [
            {"name": "web", "image": "web", "ports": [{"containerPort": 8080}]}
        ]},
        "status": {"podIP": "198.18.0.10"}
    })
}

fn pod_ref(name: &str) -> PodRef {
    let mut pod = PodRef::new("shop", name);
    pod.uid = format!("uid-{name}");
    pod
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "code": code, "reason": reason, "message": message})
}

fn respond(code: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())).boxed())
        .unwrap()
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            let object = target.as_object_mut().unwrap();
            for (k, v) in fields {
                if v.is_null() {
                    object.remove(k);
                } else {
                    merge(object.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

impl State {
    fn event(&mut self, kind: &str, pod: &Value) {
        let line = format!("{}\n", json!({"type": kind, "object": pod}));
        self.watchers
            .retain(|w| w.send(Bytes::from(line.clone())).is_ok());
    }

    fn bump(&mut self, pod: &mut Value) {
        self.resource_version += 1;
        pod["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
    }

    fn handle(
        &mut self,
        method: &Method,
        path: &str,
        query: &str,
        content_type: &str,
        body: &[u8],
    ) -> Response<Body> {
        let failure = self
            .failures
            .iter()
            .position(|(m, p, ..)| m == method && p == path);
        if let Some(i) = failure {
            let (_, _, code, message) = self.failures.remove(i).unwrap();
            return respond(code, &status(code, "Injected", &message));
        }
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match (method, parts.as_slice()) {
            (&Method::GET, ["api", "v1", "pods"]) if query.contains("watch=true") => {
                let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
                self.watchers.push(tx);
                let frames = futures::stream::unfold(rx, |mut rx| async move {
                    rx.recv()
                        .await
                        .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
                });
                Response::new(StreamBody::new(frames).boxed())
            }
            (&Method::GET, ["api", "v1", "pods"]) => {
                let wanted = format!("spec.nodeName%3D{NODE}");
                assert!(
                    query.contains(&wanted),
                    "the LIST is not limited to this node: {query}"
                );
                let items: Vec<&Value> = self
                    .pods
                    .values()
                    .filter(|p| p["spec"]["nodeName"] == NODE)
                    .collect();
                respond(
                    200,
                    &json!({"apiVersion": "v1", "kind": "PodList",
                    "metadata": {"resourceVersion": self.resource_version.to_string()},
                    "items": items}),
                )
            }
            (&Method::GET, ["api", "v1", "namespaces", ns, "pods", name]) => {
                match self.pods.get(&(ns.to_string(), name.to_string())) {
                    Some(pod) => respond(200, pod),
                    None => respond(
                        404,
                        &status(404, "NotFound", &format!("pods \"{name}\" not found")),
                    ),
                }
            }
            (&Method::PATCH, ["api", "v1", "namespaces", ns, "pods", name]) => {
                let patch: Value = serde_json::from_slice(body).unwrap();
                let key = (ns.to_string(), name.to_string());
                let Some(mut pod) = self.pods.get(&key).cloned() else {
                    return respond(
                        404,
                        &status(404, "NotFound", &format!("pods \"{name}\" not found")),
                    );
                };
                if let Some(uid) = patch["metadata"]["uid"].as_str()
                    && pod["metadata"]["uid"] != uid
                {
                    return respond(
                        409,
                        &status(
                            409,
                            "Conflict",
                            &format!(
                                "Operation cannot be fulfilled on Pod \"{name}\": Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                                pod["metadata"]["uid"]
                            ),
                        ),
                    );
                }
                self.patches.push((content_type.to_owned(), patch.clone()));
                merge(&mut pod, &patch);
                self.bump(&mut pod);
                self.pods.insert(key, pod.clone());
                self.event("MODIFIED", &pod);
                respond(200, &pod)
            }
            // kube's event recorder: events.k8s.io/v1, created, then patched per repeat.
            (&Method::POST, ["apis", "events.k8s.io", "v1", "namespaces", _, "events"]) => {
                let event: Value = serde_json::from_slice(body).unwrap();
                self.events.push(event.clone());
                respond(201, &event)
            }
            (
                &Method::PATCH,
                [
                    "apis",
                    "events.k8s.io",
                    "v1",
                    "namespaces",
                    _,
                    "events",
                    name,
                ],
            ) => {
                let patch: Value = serde_json::from_slice(body).unwrap();
                let Some(event) = self
                    .events
                    .iter_mut()
                    .find(|e| e["metadata"]["name"] == *name)
                else {
                    return respond(404, &status(404, "NotFound", "no such event"));
                };
                merge(event, &patch);
                respond(200, &event.clone())
            }
            _ => respond(
                404,
                &status(404, "NotFound", &format!("no route {method} {path}")),
            ),
        }
    }
}

impl Mock {
    fn start(pods: Vec<Value>, tweak: impl FnOnce(&mut KubeSettings)) -> Mock {
        Mock::start_failing(pods, &[], tweak)
    }

    /// [`Mock::start`] with requests that fail from the start: (method, path, status, times).
    fn start_failing(
        pods: Vec<Value>,
        failures: &[(Method, &str, u16, usize)],
        tweak: impl FnOnce(&mut KubeSettings),
    ) -> Mock {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let state = Arc::new(Mutex::new(State {
            resource_version: 10,
            ..State::default()
        }));
        for p in pods {
            Mock::insert(&mut state.lock().unwrap(), p);
        }
        for (method, path, code, times) in failures {
            for _ in 0..*times {
                state.lock().unwrap().failures.push_back((
                    method.clone(),
                    (*path).to_owned(),
                    *code,
                    format!("injected {code}"),
                ));
            }
        }
        let (service, handle) =
            tower_test::mock::pair::<Request<kube::client::Body>, Response<Body>>();
        let server_state = Arc::clone(&state);
        runtime.spawn(async move {
            let mut handle = std::pin::pin!(handle);
            while let Some((request, send)) = handle.next_request().await {
                let method = request.method().clone();
                let path = request.uri().path().to_owned();
                let query = request.uri().query().unwrap_or_default().to_owned();
                let content_type = request
                    .headers()
                    .get("content-type")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default();
                let body = request.into_body().collect_bytes().await.unwrap();
                let mut state = server_state.lock().unwrap();
                state.requests.push(format!("{method} {path}?{query}"));
                let response = state.handle(&method, &path, &query, &content_type, &body);
                send.send_response(response);
            }
        });
        // The client's request buffer is a task: it is made inside the runtime.
        let client = {
            let _inside = runtime.enter();
            kube::Client::new(service, "default")
        };
        let mut settings = KubeSettings::new(NODE, KEY);
        settings.first_backoff = Duration::from_millis(5);
        settings.sync_timeout = Duration::from_secs(10);
        tweak(&mut settings);
        let source = Arc::new(KubePodSource::start(
            client,
            runtime.handle().clone(),
            settings,
        ));
        Mock {
            state,
            source,
            _runtime: runtime,
        }
    }

    fn insert(state: &mut State, mut pod: Value) -> Value {
        state.bump(&mut pod);
        let key = (
            pod["metadata"]["namespace"].as_str().unwrap().to_owned(),
            pod["metadata"]["name"].as_str().unwrap().to_owned(),
        );
        state.pods.insert(key, pod.clone());
        pod
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// A pod created in the API: the watch sees it.
    fn create(&self, pod: Value) {
        let mut state = self.state();
        let pod = Mock::insert(&mut state, pod);
        state.event("ADDED", &pod);
    }

    /// A pod the API has but whose watch event has not arrived (yet).
    fn create_unwatched(&self, pod: Value) {
        Mock::insert(&mut self.state(), pod);
    }

    fn delete(&self, name: &str) {
        let mut state = self.state();
        if let Some(pod) = state.pods.remove(&("shop".into(), name.into())) {
            state.event("DELETED", &pod);
        }
    }

    fn fail_next(&self, method: Method, path: &str, code: u16, times: usize) {
        for _ in 0..times {
            self.state().failures.push_back((
                method.clone(),
                path.to_owned(),
                code,
                format!("injected {code}"),
            ));
        }
    }

    fn requests(&self, prefix: &str) -> Vec<String> {
        self.state()
            .requests
            .iter()
            .filter(|r| r.starts_with(prefix))
            .cloned()
            .collect()
    }

    fn wait_for(&self, what: &str, mut done: impl FnMut(&Mock) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn synced(self) -> Mock {
        self.wait_for("the watch's first sync", |m| m.source.synced());
        self
    }

    fn annotations(&self, name: &str) -> Value {
        self.state().pods[&("shop".to_owned(), name.to_owned())]["metadata"]["annotations"].clone()
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        // The source's watch runs on the runtime; stop both without blocking in async code.
        self.state().watchers.clear();
    }
}

const WEB_0: &str = "/api/v1/namespaces/shop/pods/web-0";

#[test]
fn a_watched_pod_is_resolved_from_the_cache_without_a_request() {
    let mock = Mock::start(vec![pod("web-0", NODE, json!({KEY: ""}))], |_| {}).synced();
    let info = mock.source.get(&pod_ref("web-0")).unwrap();
    assert_eq!(info.annotation.as_deref(), Some(""));
    assert_eq!(info.ports[0].container_port, 8080);

    // A pod created later arrives by the watch, and is read from the cache too.
    mock.create(pod("web-1", NODE, json!({KEY: ""})));
    mock.wait_for("web-1 in the cache", |m| {
        m.source.is_cached(&pod_ref("web-1"))
    });
    mock.source.get(&pod_ref("web-1")).unwrap();

    assert_eq!(
        mock.requests("GET /api/v1/namespaces/"),
        Vec::<String>::new()
    );
    // One LIST in all (the watch's sync): none per lookup.
    let lists: Vec<String> = mock
        .requests("GET /api/v1/pods?")
        .into_iter()
        .filter(|r| !r.contains("watch=true"))
        .collect();
    assert_eq!(lists.len(), 1, "{lists:?}");
}

#[test]
fn a_pod_the_cache_lacks_is_fetched_and_a_missing_one_is_not_found() {
    let mock = Mock::start(vec![], |_| {}).synced();
    mock.create_unwatched(pod("web-0", NODE, json!({KEY: ""})));
    let info = mock.source.get(&pod_ref("web-0")).unwrap();
    assert_eq!(info.pod.uid, "uid-web-0");
    assert_eq!(mock.requests("GET /api/v1/namespaces/").len(), 1);

    let e = mock.source.get(&pod_ref("nope")).unwrap_err();
    assert!(matches!(e, PodError::NotFound { .. }), "{e}");

    // Same name, other uid: not our pod (its sandbox belongs to a deleted predecessor).
    let mut old = pod_ref("web-0");
    old.uid = "uid-old".into();
    let e = mock.source.get(&old).unwrap_err();
    assert!(e.to_string().contains("another uid"), "{e}");
}

#[test]
fn transient_errors_are_retried_and_forbidden_is_not() {
    let mock = Mock::start(vec![], |_| {}).synced();
    mock.create_unwatched(pod("web-0", NODE, json!({KEY: ""})));
    mock.fail_next(Method::GET, WEB_0, 503, 2);
    mock.fail_next(Method::GET, WEB_0, 429, 1);
    mock.source.get(&pod_ref("web-0")).unwrap();
    assert_eq!(mock.requests(&format!("GET {WEB_0}")).len(), 4);
    // Counted for randport_api_retries_total{call="read"}.
    assert_eq!(mock.source.api_retries(), [3, 0, 0]);

    mock.fail_next(Method::GET, WEB_0, 403, 1);
    let e = mock.source.get(&pod_ref("web-0")).unwrap_err();
    assert!(matches!(e, PodError::Api { .. }), "{e}");
    assert!(
        e.to_string().contains("403") && e.to_string().contains("ClusterRole"),
        "{e}"
    );
    assert_eq!(
        mock.requests(&format!("GET {WEB_0}")).len(),
        5,
        "403 is not retried"
    );

    // Out of attempts: the error says what failed.
    mock.fail_next(Method::GET, WEB_0, 500, 6);
    let e = mock.source.get(&pod_ref("web-0")).unwrap_err();
    assert!(e.to_string().contains("reading the pod: 500"), "{e}");
}

#[test]
fn writeback_is_a_merge_patch_of_one_key_with_the_uid_retried_on_conflict() {
    let mock = Mock::start(
        vec![pod(
            "web-0",
            NODE,
            json!({KEY: "", "other": "keep", "z": "2"}),
        )],
        |_| {},
    )
    .synced();
    mock.fail_next(Method::PATCH, WEB_0, 409, 2);
    let value = r#"[{"containerPort":8080,"hostPort":20001,"podName":"web-0"}]"#;
    mock.source
        .write_annotation(&pod_ref("web-0"), value)
        .unwrap();

    assert_eq!(
        mock.requests(&format!("PATCH {WEB_0}")).len(),
        3,
        "two conflicts, then the write"
    );
    let state = mock.state();
    let (content_type, patch) = state.patches.last().unwrap();
    assert_eq!(content_type, "application/merge-patch+json");
    assert_eq!(
        *patch,
        json!({"metadata": {"annotations": {KEY: value}, "uid": "uid-web-0"}})
    );
    drop(state);
    assert_eq!(
        mock.annotations("web-0"),
        json!({KEY: value, "other": "keep", "z": "2"})
    );

    // Already right (the watch brought the new value): no second write.
    mock.wait_for("the patched pod in the cache", |m| {
        m.source
            .get(&pod_ref("web-0"))
            .unwrap()
            .annotation
            .as_deref()
            == Some(value)
    });
    mock.source
        .write_annotation(&pod_ref("web-0"), value)
        .unwrap();
    assert_eq!(mock.state().patches.len(), 1);
    // The conflict's retry counts as a write.
    assert!(
        mock.source.api_retries()[1] >= 1,
        "{:?}",
        mock.source.api_retries()
    );
}

#[test]
fn writeback_failures_say_what_to_do_and_replaced_pods_are_left_alone() {
    let mock = Mock::start(vec![pod("web-0", NODE, json!({KEY: ""}))], |_| {}).synced();

    mock.fail_next(Method::PATCH, WEB_0, 403, 1);
    let e = mock
        .source
        .write_annotation(&pod_ref("web-0"), "[]")
        .unwrap_err();
    assert!(e.to_string().contains("writing the annotation: 403"), "{e}");
    assert!(e.to_string().contains("ValidatingAdmissionPolicy"), "{e}");
    assert_eq!(mock.requests("PATCH").len(), 1, "403 is not retried");

    // A pod recreated under the same name: the uid precondition refuses, once.
    let mut old = pod_ref("web-0");
    old.uid = "uid-old".into();
    let e = mock.source.write_annotation(&old, "[]").unwrap_err();
    assert!(matches!(e, PodError::NotFound { .. }), "{e}");
    assert!(e.to_string().contains("replaced"), "{e}");
    assert_eq!(mock.requests("PATCH").len(), 2);
    assert_eq!(mock.annotations("web-0"), json!({KEY: ""}));

    mock.delete("web-0");
    let e = mock
        .source
        .write_annotation(&pod_ref("web-0"), "[]")
        .unwrap_err();
    assert!(matches!(e, PodError::NotFound { .. }), "{e}");
}

// The agent over the API source.

struct Node {
    agent: Agent,
    firewall: Arc<FakeFirewall>,
    state: Arc<MemoryStateStore>,
}

fn node(mock: &Mock, state: Arc<MemoryStateStore>) -> Node {
    let firewall = Arc::new(FakeFirewall::default());
    let fx = Effects {
        firewall: Box::new(Arc::clone(&firewall)),
        holder: Box::new(FakeHolder::default()),
        conntrack: Box::new(FakeConntrack::default()),
        state: Box::new(Arc::clone(&state)),
        pods: Box::new(Arc::clone(&mock.source)),
    };
    let config = AgentConfig {
        node_name: NODE.into(),
        port_range: "20000-20099".parse().unwrap(),
        reserved: ReservedPorts::none(),
        annotation_key: KEY.into(),
        pod_wait: Duration::from_secs(3),
        add_deadline: randport_plugin::cni::DEFAULT_ADD_DEADLINE,
        host_ports: randport_plugin::agent::HostPorts::Auto,
        cni_conf_dir: None,
    };
    Node {
        agent: Agent::new(config, fx),
        firewall,
        state,
    }
}

fn add_request(name: &str, sandbox: &str) -> AddRequest {
    AddRequest {
        pod: pod_ref(name),
        sandbox: SandboxId(sandbox.into()),
        pod_ips: vec!["198.18.0.10".parse().unwrap()],
        network: None,
    }
}

#[test]
fn an_add_waits_for_a_pod_created_a_moment_later_and_writes_its_ports() {
    let mock = Mock::start(vec![], |_| {}).synced();
    let node = node(&mock, Arc::default());
    node.agent.start().unwrap();
    let state = Arc::clone(&mock.state);
    let creator = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(150));
        Mock::insert(
            &mut state.lock().unwrap(),
            pod("web-0", NODE, json!({KEY: ""})),
        );
    });
    let record = node
        .agent
        .add(&add_request("web-0", "sb0"))
        .unwrap()
        .unwrap();
    creator.join().unwrap();
    assert!(
        mock.requests("GET /api/v1/namespaces/").len() >= 2,
        "retried the GET"
    );
    assert_eq!(
        mock.annotations("web-0")[KEY],
        json!(encode(&record.annotation_entries()))
    );
}

#[test]
fn a_failed_writeback_records_an_event_and_undoes_the_add() {
    let mock = Mock::start(vec![pod("web-0", NODE, json!({KEY: ""}))], |_| {}).synced();
    let node = node(&mock, Arc::default());
    node.agent.start().unwrap();
    mock.fail_next(Method::PATCH, WEB_0, 403, 1);

    let e = node.agent.add(&add_request("web-0", "sb0")).unwrap_err();
    assert_eq!(e.code().0, 104, "{e}");
    assert!(e.to_string().contains("403"), "{e}");
    assert!(
        node.firewall.present.lock().unwrap().is_empty(),
        "rules undone"
    );
    assert!(node.state.load_all().unwrap().is_empty(), "record deleted");
    assert!(node.agent.list().is_empty());

    mock.wait_for("the Event", |m| !m.state().events.is_empty());
    let event = mock.state().events[0].clone();
    assert_eq!(event["reason"], FAILURE_REASON);
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["regarding"]["kind"], "Pod");
    assert_eq!(event["regarding"]["name"], "web-0");
    assert_eq!(event["regarding"]["uid"], "uid-web-0");
    let message = event["note"].as_str().unwrap();
    assert!(
        message.contains("node-0") && message.contains("403"),
        "{message}"
    );
    assert!(
        mock.requests("POST /apis/events.k8s.io/v1/namespaces/shop/events")
            .len()
            == 1
    );

    // The next ADD (the kubelet retries) succeeds.
    node.agent
        .add(&add_request("web-0", "sb0"))
        .unwrap()
        .unwrap();
    assert_eq!(node.firewall.present.lock().unwrap().len(), 1);
}

#[test]
fn startup_reconciles_records_with_the_api() {
    let kept = pod("kept", NODE, json!({KEY: ""}));
    let stale = pod("stale", NODE, json!({KEY: "[]"}));
    let mock = Mock::start(vec![kept, stale], |_| {}).synced();

    // A first agent maps three pods; then one pod goes while the agent is down, and one
    // annotation is changed.
    let records = Arc::new(MemoryStateStore::default());
    let gone_pod = pod("gone", NODE, json!({KEY: ""}));
    mock.create(gone_pod);
    let first = node(&mock, Arc::clone(&records));
    first.agent.start().unwrap();
    for (name, sb) in [
        ("kept", "sb-kept"),
        ("stale", "sb-stale"),
        ("gone", "sb-gone"),
    ] {
        first.agent.add(&add_request(name, sb)).unwrap().unwrap();
    }
    drop(first);
    mock.delete("gone");
    {
        let mut state = mock.state();
        let key = ("shop".to_owned(), "stale".to_owned());
        let mut pod = state.pods[&key].clone();
        pod["metadata"]["annotations"][KEY] = json!("");
        state.pods.insert(key, pod.clone());
        state.event("MODIFIED", &pod);
    }
    let patches_before = mock.state().patches.len();
    mock.wait_for("the watch to see both changes", |m| {
        !m.source.is_cached(&pod_ref("gone"))
            && m.source
                .get(&pod_ref("stale"))
                .unwrap()
                .annotation
                .as_deref()
                == Some("")
    });

    let second = node(&mock, Arc::clone(&records));
    let report = second.agent.start().unwrap();
    assert_eq!(report.restored, 3);
    assert_eq!(report.released, vec![SandboxId("sb-gone".into())]);
    assert_eq!(report.rewritten, vec![pod_ref("stale")]);
    assert_eq!(
        mock.state().patches.len(),
        patches_before + 1,
        "only the wrong one is written"
    );
    assert_ne!(mock.annotations("stale")[KEY], "");
    let left: Vec<String> = records
        .load_all()
        .unwrap()
        .iter()
        .map(|r| r.sandbox.0.clone())
        .collect();
    assert_eq!(left, ["sb-kept", "sb-stale"]);
}

#[test]
fn without_the_api_at_startup_every_mapping_is_kept() {
    let mock = Mock::start(vec![pod("web-0", NODE, json!({KEY: ""}))], |_| {}).synced();
    let records = Arc::new(MemoryStateStore::default());
    let first = node(&mock, Arc::clone(&records));
    first.agent.start().unwrap();
    first
        .agent
        .add(&add_request("web-0", "sb0"))
        .unwrap()
        .unwrap();
    drop(first);
    drop(mock);

    // A new source whose LIST keeps failing never syncs.
    let down = Mock::start(vec![], |s| s.sync_timeout = Duration::from_millis(300));
    for _ in 0..1000 {
        down.fail_next(Method::GET, "/api/v1/pods", 503, 1);
    }
    let second = node(&down, Arc::clone(&records));
    let report = second.agent.start().unwrap();
    assert!(report.released.is_empty());
    assert_eq!(report.restored, 1);
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("every mapping kept") && w.contains("not synced")),
        "{:?}",
        report.warnings
    );
    assert_eq!(records.load_all().unwrap().len(), 1);
    assert_eq!(second.firewall.present.lock().unwrap().len(), 1);
    assert!(!down.source.synced());
    // A stream of requests, not one: the watcher backs off and retries.
    let lists = down.requests("GET /api/v1/pods?");
    assert!(!lists.is_empty());
}

#[test]
fn an_annotated_host_network_pod_gets_one_warning_and_keeps_its_annotation() {
    let host_network = |name: &str, annotations: Value| {
        let mut p = pod(name, NODE, annotations);
        p["spec"]["hostNetwork"] = json!(true);
        p
    };
    // One in the first listing, one plain hostNetwork pod, one created later.
    let mock = Mock::start(
        vec![
            host_network("ingress-0", json!({KEY: ""})),
            host_network("plain", json!({})),
            pod("web-0", NODE, json!({KEY: ""})),
        ],
        |_| {},
    )
    .synced();
    mock.create(host_network("ingress-1", json!({KEY: ""})));
    mock.wait_for("two Events", |m| m.state().events.len() >= 2);
    // Updates of the same pod (a watch event per change) do not repeat it.
    mock.create(host_network("ingress-1", json!({KEY: "", "other": "x"})));
    std::thread::sleep(Duration::from_millis(300));
    let events = mock.state().events.clone();
    let mut warned: Vec<&str> = events
        .iter()
        .map(|e| e["regarding"]["name"].as_str().unwrap())
        .collect();
    warned.sort();
    assert_eq!(warned, ["ingress-0", "ingress-1"], "{events:?}");
    for event in &events {
        assert_eq!(event["reason"], HOST_NETWORK_REASON);
        assert_eq!(event["type"], "Warning");
        let message = event["note"].as_str().unwrap();
        assert!(
            message.contains("hostNetwork") && message.contains(NODE),
            "{message}"
        );
    }
    // The annotation is left as it is: no PATCH at all.
    assert!(mock.requests("PATCH").is_empty());
    assert_eq!(mock.annotations("ingress-0")[KEY], "");
}

#[test]
fn the_source_is_unhealthy_when_its_watch_is_down_while_pods_wait() {
    // The API lists and watches nothing (every LIST/WATCH of pods fails); single pods can
    // still be read.
    let mock = Mock::start_failing(
        vec![pod("web-0", NODE, json!({KEY: ""}))],
        &[(Method::GET, "/api/v1/pods", 500, 10_000)],
        |_| {},
    );
    let limit = Duration::from_millis(300);
    mock.wait_for("a failed watch", |m| {
        !m.requests("GET /api/v1/pods").is_empty()
    });
    std::thread::sleep(Duration::from_millis(100));
    // Down, but no pod waited: healthy.
    assert_eq!(mock.source.health(limit), Ok(()));
    // An ADD misses the cache (and is served by a GET)...
    mock.source.get(&pod_ref("web-0")).unwrap();
    std::thread::sleep(limit + Duration::from_millis(100));
    // ... and the watch has been down for longer than the limit: unhealthy, saying why.
    let e = mock.source.health(limit).unwrap_err();
    assert!(
        e.contains("watch") && e.contains("node-0") && e.contains("API server"),
        "{e}"
    );
    assert_eq!(
        mock.source.health(Duration::from_secs(3600)),
        Ok(()),
        "within a long limit"
    );
}

#[test]
fn an_annotated_pod_running_without_ports_gets_one_warning() {
    let running = |name: &str, annotations: Value, started: &str| {
        let mut p = pod(name, NODE, annotations);
        p["status"]["phase"] = json!("Running");
        p["status"]["startTime"] = json!(started);
        p
    };
    let long_ago = "2026-01-01T00:00:00Z";
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let mut pending = pod("pending", NODE, json!({KEY: ""}));
    pending["status"]["phase"] = json!("Pending");
    pending["status"]["startTime"] = json!(long_ago);
    let mock = Mock::start(
        vec![
            running("forgotten", json!({KEY: ""}), long_ago),
            running(
                "mapped",
                json!({KEY: r#"[{"hostPort":20001,"containerPort":8080,"protocol":"TCP","podName":"mapped"}]"#}),
                long_ago,
            ),
            running("young", json!({KEY: ""}), &now),
            running("plain", json!({}), long_ago),
            pending,
        ],
        |s| s.unmapped_check = Duration::from_millis(50),
    )
    .synced();
    mock.wait_for("the Warning", |m| !m.state().events.is_empty());
    // A few more checks: no repeat, nobody else.
    std::thread::sleep(Duration::from_millis(300));
    let events = mock.state().events.clone();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["reason"], UNMAPPED_REASON);
    assert_eq!(events[0]["type"], "Warning");
    assert_eq!(events[0]["regarding"]["name"], "forgotten");
    let message = events[0]["note"].as_str().unwrap();
    assert!(
        message.contains("randport was never called") && message.contains(NODE),
        "{message}"
    );
}

#[test]
fn repeated_failures_of_a_pod_are_one_event_that_counts_them() {
    let mock = Mock::start(vec![pod("web-0", NODE, json!({KEY: ""}))], |_| {}).synced();
    let node = node(&mock, Arc::default());
    node.agent.start().unwrap();
    // The kubelet retries the sandbox three times; each write is refused.
    mock.fail_next(Method::PATCH, WEB_0, 403, 3);
    for _ in 0..3 {
        let e = node.agent.add(&add_request("web-0", "sb0")).unwrap_err();
        assert_eq!(e.code().0, 104, "{e}");
    }
    mock.wait_for("the third failure counted", |m| {
        m.state()
            .events
            .first()
            .is_some_and(|e| e["series"]["count"] == 3)
    });
    let events = mock.state().events.clone();
    assert_eq!(events.len(), 1, "one Event, not one per retry: {events:?}");
    assert_eq!(events[0]["reason"], FAILURE_REASON);
    assert_eq!(
        mock.requests("POST /apis/events.k8s.io/v1/namespaces/shop/events")
            .len(),
        1
    );
    assert_eq!(
        mock.requests("PATCH /apis/events.k8s.io/v1/namespaces/shop/events/")
            .len(),
        2
    );
}

#[test]
fn a_pod_whose_spec_cannot_be_read_keeps_its_mapping_at_startup() {
    let mock = Mock::start(vec![pod("odd", NODE, json!({KEY: ""}))], |_| {}).synced();
    let records = Arc::new(MemoryStateStore::default());
    let first = node(&mock, Arc::clone(&records));
    first.agent.start().unwrap();
    first
        .agent
        .add(&add_request("odd", "sb-odd"))
        .unwrap()
        .unwrap();
    drop(first);
    // Its spec changes into something this agent cannot read (a protocol it does not
    // know): the pod is still there, and so must its mapping be.
    {
        let mut state = mock.state();
        let key = ("shop".to_owned(), "odd".to_owned());
        let mut pod = state.pods[&key].clone();
        pod["spec"]["containers"][0]["ports"][0]["protocol"] = json!("QUIC");
        state.pods.insert(key, pod.clone());
        state.event("MODIFIED", &pod);
    }
    mock.wait_for("the watch to see the change", |m| {
        m.source.get(&pod_ref("odd")).is_err()
    });
    let second = node(&mock, Arc::clone(&records));
    let report = second.agent.start().unwrap();
    assert_eq!(report.restored, 1);
    assert!(report.released.is_empty(), "{report:?}");
    assert_eq!(second.agent.list().len(), 1);
    assert_eq!(records.load_all().unwrap().len(), 1);
}
