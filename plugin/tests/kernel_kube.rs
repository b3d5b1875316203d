//! Root-only: the real `randportd --pods kube` and `randport` against a fake API server
//! over plain HTTP (a kubeconfig names it), all inside a fresh network namespace. This is
//! the binaries' wiring the kind job exercises, where no cluster can run: the agent finds
//! its client configuration, syncs its watch of the node's pods, maps a pod on ADD and
//! writes the annotation with a merge patch; when the API refuses the write, the ADD fails
//! with code 104, nothing stays mapped, and a `PortMappingFailed` Event is posted.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use randport_core::PodRef;
use randport_core::annotation::{AnnotationValue, decode};
use randport_itests::{Netns, TestNetns, root_and_tools_or_skip, test_netns};
use serde_json::{Value, json};

const KEY: &str = "tkestack.io/portmapping";

#[derive(Default)]
struct Api {
    pods: BTreeMap<String, Value>,
    /// "METHOD path" of every request.
    requests: Vec<String>,
    /// (content type, body) of every PATCH.
    patches: Vec<(String, Value)>,
    events: Vec<Value>,
    /// Pod names whose PATCH is refused with 403.
    forbidden: Vec<String>,
    /// Open watch connections, kept so they stay open.
    watches: Vec<TcpStream>,
}

fn pod(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"),
                     "resourceVersion": "5", "annotations": {KEY: "", "team": "web"}},
        "spec": {"nodeName": "node-0", "containers": [
            {"name": "web", "image": "web", "ports": [{"containerPort": 8080}]}]}
    })
}

fn reply(stream: &mut TcpStream, code: u16, body: &Value) {
    let body = body.to_string();
    let _ = write!(
        stream,
        "HTTP/1.1 {code} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
}

fn status(code: u16, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
           "reason": "Forbidden", "message": message})
}

/// Serves one connection's requests (HTTP/1.1, kept alive) until the client closes it.
fn serve(stream: TcpStream, api: Arc<Mutex<Api>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut stream = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (
            parts.next().unwrap_or("").to_owned(),
            parts.next().unwrap_or("").to_owned(),
        );
        let (mut length, mut content_type) = (0usize, String::new());
        loop {
            let mut header = String::new();
            reader.read_line(&mut header).unwrap();
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            let (name, value) = header.split_once(':').unwrap();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().unwrap(),
                "content-type" => content_type = value.trim().to_owned(),
                _ => {}
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let mut api = api.lock().unwrap();
        api.requests.push(format!("{method} {path}"));
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match (method.as_str(), segments.as_slice()) {
            ("GET", ["api", "v1", "pods"]) if query.contains("watch=true") => {
                // Headers only; the stream stays open and quiet.
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
                );
                api.watches.push(stream.try_clone().unwrap());
            }
            ("GET", ["api", "v1", "pods"]) => {
                assert!(
                    query.contains("fieldSelector=spec.nodeName%3Dnode-0"),
                    "{query}"
                );
                let items: Vec<Value> = api.pods.values().cloned().collect();
                reply(
                    &mut stream,
                    200,
                    &json!({"apiVersion": "v1", "kind": "PodList",
                    "metadata": {"resourceVersion": "10"}, "items": items}),
                );
            }
            ("GET", ["api", "v1", "namespaces", "shop", "pods", name]) => match api.pods.get(*name)
            {
                Some(pod) => reply(&mut stream, 200, &pod.clone()),
                None => reply(&mut stream, 404, &status(404, "not found")),
            },
            ("PATCH", ["api", "v1", "namespaces", "shop", "pods", name]) => {
                let name = name.to_string();
                if api.forbidden.contains(&name) {
                    reply(&mut stream, 403, &status(403, "denied by test policy"));
                    continue;
                }
                let patch: Value = serde_json::from_slice(&body).unwrap();
                api.patches.push((content_type.clone(), patch.clone()));
                let pod = api.pods.get_mut(&name).unwrap();
                for (k, v) in patch["metadata"]["annotations"].as_object().unwrap() {
                    pod["metadata"]["annotations"][k] = v.clone();
                }
                let pod = pod.clone();
                reply(&mut stream, 200, &pod);
            }
            (
                "POST",
                [
                    "apis",
                    "events.k8s.io",
                    "v1",
                    "namespaces",
                    "shop",
                    "events",
                ],
            ) => {
                let event: Value = serde_json::from_slice(&body).unwrap();
                api.events.push(event.clone());
                reply(&mut stream, 201, &event);
            }
            _ => reply(&mut stream, 404, &status(404, "no such route")),
        }
    }
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Setup {
    ns: Netns,
    dir: PathBuf,
    api: Arc<Mutex<Api>>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Setup {
    fn new() -> Setup {
        let ns = test_netns("kube");
        ns.lo_up().unwrap();
        let dir = std::env::temp_dir().join(format!("randport-kube-{}", ns.name()));
        std::fs::create_dir_all(&dir).unwrap();
        let api = Arc::new(Mutex::new(Api::default()));
        for name in ["web-0", "web-1"] {
            api.lock().unwrap().pods.insert(name.into(), pod(name));
        }
        // The fake API server listens on the namespace's loopback.
        let listener = ns.inside(|| TcpListener::bind("127.0.0.1:0").unwrap());
        let port = listener.local_addr().unwrap().port();
        let served = Arc::clone(&api);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let api = Arc::clone(&served);
                std::thread::spawn(move || serve(stream, api));
            }
        });
        let kubeconfig = json!({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": format!("http://127.0.0.1:{port}")}}],
            "users": [{"name": "test", "user": {"token": "test-token"}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}]
        });
        std::fs::write(dir.join("kubeconfig"), kubeconfig.to_string()).unwrap();
        Setup { ns, dir, api }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("randportd.sock")
    }

    fn agent(&self) -> Agent {
        let log = std::fs::File::create(self.dir.join("agent.log")).unwrap();
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                self.ns.name(),
                env!("CARGO_BIN_EXE_randportd"),
            ])
            .args([
                "--pods",
                "kube",
                "--node-name",
                "node-0",
                "--metrics-addr",
                "off",
            ])
            .args(["--port-range", "20000-20999"])
            .arg("--socket")
            .arg(self.socket())
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .env("KUBECONFIG", self.dir.join("kubeconfig"))
            .env_remove("KUBERNETES_SERVICE_HOST")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let agent = Agent(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.cni("STATUS", "", "").0 {
            assert!(
                Instant::now() < deadline,
                "randportd --pods kube did not become ready:\n{}",
                std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        agent
    }

    /// Runs the plugin as a runtime would; (success, stdout).
    fn cni(&self, command: &str, sandbox: &str, pod: &str) -> (bool, String) {
        let conf = json!({
            "cniVersion": "1.1.0", "name": "kube", "type": "randport", "socket": self.socket(),
            "prevResult": {"cniVersion": "1.1.0", "interfaces": [{"name": "eth0"}],
                           "ips": [{"address": "198.18.0.2/24"}]}
        });
        common::run_plugin(
            command,
            sandbox,
            pod,
            &format!(";K8S_POD_UID=uid-{pod}"),
            &conf,
        )
    }
}

#[test]
fn the_agent_binary_maps_pods_from_the_api_and_writes_back_with_a_merge_patch() {
    let test = "the_agent_binary_maps_pods_from_the_api_and_writes_back_with_a_merge_patch";
    if !root_and_tools_or_skip(test, &["nft", "ip"]) {
        return;
    }
    let setup = Setup::new();
    let _agent = setup.agent();

    let (ok, stdout) = setup.cni("ADD", "sb-web-0", "web-0");
    assert!(ok, "ADD failed: {stdout}");
    {
        let api = setup.api.lock().unwrap();
        let lists = api
            .requests
            .iter()
            .filter(|r| *r == "GET /api/v1/pods")
            .count();
        assert!(lists >= 2, "a LIST and a WATCH: {:?}", api.requests);
        assert!(
            !api.requests
                .iter()
                .any(|r| r.starts_with("GET /api/v1/namespaces/")),
            "the pod came from the watch's cache: {:?}",
            api.requests
        );
        assert_eq!(api.patches.len(), 1);
        let (content_type, patch) = &api.patches[0];
        assert_eq!(content_type, "application/merge-patch+json");
        assert_eq!(patch["metadata"]["uid"], "uid-web-0");
        let value = patch["metadata"]["annotations"][KEY].as_str().unwrap();
        let AnnotationValue::Mapped(entries) =
            decode(&PodRef::new("shop", "web-0"), value).unwrap()
        else {
            panic!("no ports written: {value}");
        };
        assert_eq!(entries.len(), 1);
        assert!(
            (20000..=20999).contains(&entries[0].host_port),
            "{entries:?}"
        );
        assert_eq!(api.pods["web-0"]["metadata"]["annotations"]["team"], "web");
    }
    let rules = setup
        .ns
        .sh("nft", &["list", "table", "inet", "randport"], "");
    assert!(rules.contains("198.18.0.2"), "{rules}");

    // The API refuses the next write: the ADD fails (104), nothing stays, an Event tells.
    setup.api.lock().unwrap().forbidden.push("web-1".into());
    let (ok, stdout) = setup.cni("ADD", "sb-web-1", "web-1");
    assert!(!ok);
    let error: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(error["code"], 104, "{stdout}");
    assert!(
        error["details"].as_str().unwrap().contains("403"),
        "{stdout}"
    );
    let list = Command::new(env!("CARGO_BIN_EXE_randportd"))
        .args(["list", "--json", "--socket"])
        .arg(setup.socket())
        .output()
        .unwrap();
    let records: Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(
        records.as_array().unwrap().len(),
        1,
        "only web-0 is mapped: {records}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let events = setup.api.lock().unwrap().events.clone();
        let failed = events.iter().find(|e| e["reason"] == "PortMappingFailed");
        let mapped = events.iter().find(|e| e["reason"] == "PortsMapped");
        if let (Some(failed), Some(mapped)) = (failed, mapped) {
            assert_eq!(failed["regarding"]["name"], "web-1");
            assert_eq!(failed["type"], "Warning");
            // web-0's mapping is on record for `kubectl describe pod`.
            assert_eq!(mapped["regarding"]["name"], "web-0");
            assert_eq!(mapped["type"], "Normal");
            assert!(
                mapped["note"]
                    .as_str()
                    .unwrap()
                    .starts_with("randport mapped 8080/TCP -> host port 20"),
                "{mapped}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "Events posted: {events:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
