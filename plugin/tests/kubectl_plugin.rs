//! The real `kubectl-randport` binary against a fake API server on loopback (plain HTTP,
//! named by a kubeconfig, as kubectl's own flags give it): the namespace, the selector,
//! one pod, every namespace, the output formats, the node address types, `nodes`, and a
//! clear error for a pod that did not ask for ports.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

const KEY: &str = "tkestack.io/portmapping";

fn pod(ns: &str, name: &str, node: &str, app: &str, annotation: Option<&str>) -> Value {
    let annotations = annotation.map_or(json!({}), |v| json!({KEY: v}));
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": app}, "annotations": annotations},
        "spec": {"nodeName": node, "containers": []}
    })
}

fn mapped(name: &str, port: u16) -> String {
    format!(
        r#"[{{"hostPort":{port},"containerPort":9376,"protocol":"TCP","podName":"{name}","podIP":"198.18.0.5"}}]"#
    )
}

/// Serves nodes and pods (list, with a label selector, and get) until the test ends;
/// records each request's path and query.
fn fake_api(pods: Vec<Value>) -> (String, Arc<Mutex<Vec<String>>>) {
    let nodes = json!({"apiVersion": "v1", "kind": "NodeList", "metadata": {}, "items": [
        {"metadata": {"name": "node-a"}, "status": {"addresses": [
            {"type": "InternalIP", "address": "192.0.2.1"}, {"type": "ExternalIP", "address": "203.0.113.10"}]}},
        {"metadata": {"name": "node-b"}, "status": {"addresses": [
            {"type": "InternalIP", "address": "192.0.2.2"}]}}
    ]});
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (pods, nodes, log) = (pods.clone(), nodes.clone(), Arc::clone(&log));
            std::thread::spawn(move || serve(stream, &pods, &nodes, &log));
        }
    });
    (url, seen)
}

fn serve(mut stream: TcpStream, pods: &[Value], nodes: &Value, log: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let target = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
        let mut length = 0;
        loop {
            let mut header = String::new();
            reader.read_line(&mut header).unwrap();
            if header.trim().is_empty() {
                break;
            }
            if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        log.lock().unwrap().push(target.clone());
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let selector = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("labelSelector="))
            .map(|s| s.replace("%3D", "="));
        let list = |items: Vec<Value>| json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items});
        let in_ns = |ns: &str| -> Vec<Value> {
            pods.iter()
                .filter(|p| p["metadata"]["namespace"] == ns)
                .filter(|p| {
                    selector.as_deref().is_none_or(|s| {
                        let (k, v) = s.split_once('=').unwrap();
                        p["metadata"]["labels"][k] == v
                    })
                })
                .cloned()
                .collect()
        };
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let (code, body) = match parts.as_slice() {
            ["api", "v1", "nodes"] => (200, nodes.clone()),
            ["api", "v1", "pods"] => (200, list(pods.to_vec())),
            ["api", "v1", "namespaces", ns, "pods"] => (200, list(in_ns(ns))),
            ["api", "v1", "namespaces", ns, "pods", name] => match pods
                .iter()
                .find(|p| p["metadata"]["namespace"] == *ns && p["metadata"]["name"] == *name)
            {
                Some(p) => (200, p.clone()),
                None => (
                    404,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                     "code": 404, "reason": "NotFound", "message": format!("pods \"{name}\" not found")}),
                ),
            },
            _ => (
                404,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound", "message": "no route"}),
            ),
        };
        let body = body.to_string();
        let _ = write!(
            stream,
            "HTTP/1.1 {code} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
    }
}

fn kubeconfig(url: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("randport-kubectl-{}.yaml", fastrand::u64(..)));
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{url}\"}}\n\
             users:\n- name: me\n  user: {{token: t}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: me, namespace: shop}}\n\
             current-context: fake\n"
        ),
    )
    .unwrap();
    path
}

fn run(config: &PathBuf, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kubectl-randport"))
        .arg("--kubeconfig")
        .arg(config)
        .args(args)
        .env_remove("KUBECONFIG")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn kubectl_randport_against_an_api_server() {
    let (url, seen) = fake_api(vec![
        pod(
            "shop",
            "web-0",
            "node-a",
            "web",
            Some(&mapped("web-0", 23817)),
        ),
        pod("shop", "web-1", "node-b", "web", Some("")),
        pod("shop", "db-0", "node-b", "db", Some(&mapped("db-0", 20002))),
        pod("shop", "plain", "node-a", "web", None),
        pod(
            "other",
            "api-0",
            "node-b",
            "api",
            Some(&mapped("api-0", 21000)),
        ),
    ]);
    let config = kubeconfig(&url);

    // The context's namespace; ExternalIP where the node has one, else InternalIP.
    let (ok, out, err) = run(&config, &["ports", "-o", "json"]);
    assert!(ok, "{err}");
    let rows: Value = serde_json::from_str(&out).unwrap();
    let summary: Vec<(String, String)> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["pod"].as_str().unwrap().to_owned(),
                r["address"]
                    .as_str()
                    .unwrap_or(r["status"].as_str().unwrap())
                    .to_owned(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("web-0".into(), "203.0.113.10:23817".into()),
            ("web-1".into(), "waiting".into()),
            ("db-0".into(), "192.0.2.2:20002".into()),
        ]
    );
    assert!(
        seen.lock()
            .unwrap()
            .iter()
            .any(|r| r.starts_with("/api/v1/namespaces/shop/pods"))
    );

    // A selector, another namespace, every namespace, one pod, internal addresses.
    let (_, out, _) = run(&config, &["ports", "-l", "app=db", "-o", "json"]);
    assert_eq!(
        serde_json::from_str::<Value>(&out)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let (_, out, _) = run(&config, &["ports", "-n", "other"]);
    assert!(
        out.contains("192.0.2.2:21000") && !out.contains("web-0"),
        "{out}"
    );
    let (_, out, _) = run(&config, &["ports", "-A"]);
    assert!(out.contains("api-0") && out.contains("web-0"), "{out}");
    let (_, out, _) = run(&config, &["ports", "web-0", "--address-type", "internal"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[1].contains("192.0.2.1:23817") && lines[1].contains("9376/TCP"),
        "{out}"
    );
    let (_, out, _) = run(&config, &["ports", "-o", "wide"]);
    assert!(
        out.lines().next().unwrap().contains("STATUS") && out.contains("198.18.0.5"),
        "{out}"
    );

    // Per node.
    let (ok, out, _) = run(&config, &["nodes", "-o", "json"]);
    assert!(ok);
    let nodes: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(nodes[0]["node"], "node-a");
    assert_eq!(nodes[0]["tcp"], 1);
    assert_eq!(nodes[1]["node"], "node-b");
    assert_eq!(nodes[1]["tcp"], 2, "db-0 and api-0: {out}");
    assert_eq!(nodes[1]["waiting"], 1);

    // A pod that did not ask, and one that does not exist: clear errors.
    let (ok, _, err) = run(&config, &["ports", "plain"]);
    assert!(
        !ok && err.contains("no tkestack.io/portmapping annotation"),
        "{err}"
    );
    let (ok, _, err) = run(&config, &["ports", "nope"]);
    assert!(!ok && err.contains("shop/nope"), "{err}");
    std::fs::remove_file(config).unwrap();
}
