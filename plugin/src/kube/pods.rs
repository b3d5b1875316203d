//! Where the agent learns a pod's ports and annotation, and where it writes the chosen
//! ports back. `--pods dir:PATH` reads Pod objects as JSON files (`kubectl get pod -o
//! json` shape) at `PATH/<namespace>/<name>.json`; `--pods kube` is the Kubernetes API
//! ([`crate::kube::api`]).

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use randport_core::{ContainerPort, PodRef, Protocol};
use serde_json::Value;

use crate::node::state::write_atomic;

/// What the agent needs of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// Namespace, name, uid.
    pub pod: PodRef,
    /// The node it is scheduled on, if any.
    pub node_name: Option<String>,
    /// Its containers' ports, container by container.
    pub ports: Vec<ContainerPort>,
    /// The port-mapping annotation's value, when the key is present.
    pub annotation: Option<String>,
}

/// A pod that could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// No such pod (yet).
    #[error("pod {pod} not found in {source_name}")]
    NotFound {
        /// The pod.
        pod: PodRef,
        /// Where we looked.
        source_name: String,
    },
    /// The pod object is not usable.
    #[error("pod {pod}: {reason}")]
    Invalid {
        /// The pod.
        pod: PodRef,
        /// What is wrong, and where.
        reason: String,
    },
    /// The API server refused or did not answer.
    #[error("pod {pod}: {what}: {message}")]
    Api {
        /// The pod (`*/*` for a listing).
        pod: PodRef,
        /// What was being done.
        what: String,
        /// Why it failed, and what to check.
        message: String,
    },
    /// Reading or writing failed.
    #[error("pod {pod}: {path}: {source}")]
    Io {
        /// The pod.
        pod: PodRef,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// A source of pods and a place to write annotations.
pub trait PodSource: Send + Sync {
    /// The pod, as it is now.
    fn get(&self, pod: &PodRef) -> Result<PodInfo, PodError>;
    /// Sets the annotation to `value` (and nothing else); no write when it already is.
    fn write_annotation(&self, pod: &PodRef, value: &str) -> Result<(), PodError>;
    /// Every pod on this node.
    fn list(&self) -> Result<Vec<PodInfo>, PodError>;
    /// Tells the pod's owner that its ports could not be mapped (a Kubernetes Event); does
    /// not wait and cannot fail the request (a source without events ignores it).
    fn warn(&self, pod: &PodRef, message: &str) {
        let _ = (pod, message);
    }
    /// Tells the pod's owner which ports it got (a Normal Kubernetes Event); does not wait
    /// and cannot fail the request (a source without events ignores it).
    fn mapped(&self, pod: &PodRef, message: &str) {
        let _ = (pod, message);
    }
    /// Whether the source can still serve ADDs: an error when it has been unable to for
    /// longer than `limit` while pods waited for it.
    fn health(&self, limit: std::time::Duration) -> Result<(), String> {
        let _ = limit;
        Ok(())
    }
    /// API calls retried so far (after conflicts and transient errors): pod reads,
    /// annotation writes, Event records.
    fn api_retries(&self) -> [u64; 3] {
        [0; 3]
    }
}

fn invalid(pod: &PodRef, reason: impl Into<String>) -> PodError {
    PodError::Invalid {
        pod: pod.clone(),
        reason: reason.into(),
    }
}

/// Reads a Pod object (`kubectl get pod -o json`) into what the agent needs.
pub fn parse_pod(object: &Value, annotation_key: &str) -> Result<PodInfo, PodError> {
    let meta = &object["metadata"];
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    let mut pod = PodRef::new(text(&meta["namespace"]), text(&meta["name"]));
    pod.uid = text(&meta["uid"]);
    if pod.name.is_empty() {
        return Err(invalid(&pod, "the Pod object has no metadata.name"));
    }
    if pod.namespace.is_empty() {
        pod.namespace = "default".into();
    }
    let annotation = meta["annotations"].get(annotation_key).map(&text);
    let node_name = object["spec"]["nodeName"]
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    let mut ports = Vec::new();
    for container in object["spec"]["containers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let cname = text(&container["name"]);
        for port in container["ports"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let number = |field: &str, required: bool| -> Result<Option<u16>, PodError> {
                match port.get(field) {
                    None | Some(Value::Null) if !required => Ok(None),
                    Some(Value::Number(n)) if !required && n.as_i64() == Some(0) => Ok(None),
                    Some(Value::Number(n)) => match n.as_i64() {
                        Some(v @ 1..=65535) => Ok(u16::try_from(v).ok()),
                        _ => Err(invalid(
                            &pod,
                            format!("container {cname}: {field} {n} is not a port from 1 to 65535"),
                        )),
                    },
                    other => Err(invalid(
                        &pod,
                        format!(
                            "container {cname}: {field} is {} instead of a port number",
                            other.map_or("missing".into(), Value::to_string)
                        ),
                    )),
                }
            };
            let container_port = number("containerPort", true)?.unwrap_or_default();
            let protocol: Protocol = port["protocol"]
                .as_str()
                .unwrap_or_default()
                .parse()
                .map_err(|e| {
                    invalid(
                        &pod,
                        format!("container {cname} port {container_port}: {e}"),
                    )
                })?;
            let host_ip = match port["hostIP"].as_str().unwrap_or_default() {
                "" => None,
                ip => Some(ip.parse::<IpAddr>().map_err(|_| {
                    invalid(&pod, format!("container {cname} port {container_port}: hostIP {ip:?} is not an IP address"))
                })?),
            };
            ports.push(ContainerPort {
                container: cname.clone(),
                container_port,
                protocol,
                host_port: number("hostPort", false)?,
                host_ip,
            });
        }
    }
    Ok(PodInfo {
        pod,
        node_name,
        ports,
        annotation,
    })
}

/// Pods as JSON files under a directory.
#[derive(Debug, Clone)]
pub struct DirPodSource {
    root: PathBuf,
    annotation_key: String,
    node_name: String,
}

impl DirPodSource {
    /// Pods under `root`, annotation `annotation_key`, node `node_name`.
    pub fn new(root: impl Into<PathBuf>, annotation_key: &str, node_name: &str) -> Self {
        DirPodSource {
            root: root.into(),
            annotation_key: annotation_key.to_owned(),
            node_name: node_name.to_owned(),
        }
    }

    fn path(&self, pod: &PodRef) -> Result<PathBuf, PodError> {
        let safe = |s: &str| !s.is_empty() && !s.contains('/') && s != "." && s != "..";
        if !safe(&pod.namespace) || !safe(&pod.name) {
            return Err(invalid(
                pod,
                "namespace or name is not a valid Kubernetes name",
            ));
        }
        Ok(self
            .root
            .join(&pod.namespace)
            .join(format!("{}.json", pod.name)))
    }

    fn read(&self, pod: &PodRef, path: &Path) -> Result<Value, PodError> {
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(PodError::NotFound {
                    pod: pod.clone(),
                    source_name: self.root.display().to_string(),
                });
            }
            Err(source) => {
                return Err(PodError::Io {
                    pod: pod.clone(),
                    path: path.to_owned(),
                    source,
                });
            }
        };
        serde_json::from_slice(&bytes).map_err(|e| {
            invalid(
                pod,
                format!("{} is not a JSON Pod object: {e}", path.display()),
            )
        })
    }
}

impl PodSource for DirPodSource {
    fn get(&self, pod: &PodRef) -> Result<PodInfo, PodError> {
        let path = self.path(pod)?;
        parse_pod(&self.read(pod, &path)?, &self.annotation_key)
    }

    fn write_annotation(&self, pod: &PodRef, value: &str) -> Result<(), PodError> {
        let path = self.path(pod)?;
        let mut object = self.read(pod, &path)?;
        let meta = object
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .ok_or_else(|| invalid(pod, "the Pod object has no metadata"))?;
        let annotations = meta
            .entry("annotations")
            .or_insert_with(|| Value::Object(Default::default()));
        let Some(annotations) = annotations.as_object_mut() else {
            return Err(invalid(pod, "metadata.annotations is not an object"));
        };
        if annotations
            .get(&self.annotation_key)
            .and_then(Value::as_str)
            == Some(value)
        {
            return Ok(());
        }
        annotations.insert(self.annotation_key.clone(), Value::String(value.to_owned()));
        let mut bytes =
            serde_json::to_vec_pretty(&object).map_err(|e| invalid(pod, e.to_string()))?;
        bytes.push(b'\n');
        write_atomic(&path, &bytes).map_err(|source| PodError::Io {
            pod: pod.clone(),
            path,
            source,
        })
    }

    fn list(&self) -> Result<Vec<PodInfo>, PodError> {
        let mut pods = Vec::new();
        let root_pod = PodRef::new("*", "*");
        let io = |path: &Path, source| PodError::Io {
            pod: root_pod.clone(),
            path: path.to_owned(),
            source,
        };
        let namespaces = match fs::read_dir(&self.root) {
            Ok(dir) => dir,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(pods),
            Err(e) => return Err(io(&self.root, e)),
        };
        for ns in namespaces {
            let ns = ns.map_err(|e| io(&self.root, e))?.path();
            if !ns.is_dir() {
                continue;
            }
            for file in fs::read_dir(&ns).map_err(|e| io(&ns, e))? {
                let path = file.map_err(|e| io(&ns, e))?.path();
                if path.extension().is_none_or(|e| e != "json") {
                    continue;
                }
                let Ok(bytes) = fs::read(&path) else { continue };
                let Ok(object) = serde_json::from_slice::<Value>(&bytes) else {
                    continue;
                };
                let Ok(info) = parse_pod(&object, &self.annotation_key) else {
                    continue;
                };
                if info
                    .node_name
                    .as_deref()
                    .is_none_or(|n| n == self.node_name)
                {
                    pods.push(info);
                }
            }
        }
        pods.sort_by(|a, b| a.pod.cmp(&b.pod));
        Ok(pods)
    }
}

/// Pods in memory, recording every annotation write; `fail_write` makes writes fail.
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Default)]
pub struct FakePodSource {
    /// Where `get` stops while closed (an API server that does not answer).
    pub get_gate: crate::testing::Gate,
    /// Where `write_annotation` stops while closed.
    pub write_gate: crate::testing::Gate,
    /// The pods, by reference.
    pub pods: std::sync::Mutex<std::collections::BTreeMap<PodRef, PodInfo>>,
    /// Every (pod, value) written, in order.
    pub writes: std::sync::Mutex<Vec<(PodRef, String)>>,
    /// When set, writes fail.
    pub fail_write: std::sync::atomic::AtomicBool,
    /// Every (pod, message) warned about, in order.
    pub warnings: std::sync::Mutex<Vec<(PodRef, String)>>,
    /// Every (pod, message) of a successful mapping, in order.
    pub mapped: std::sync::Mutex<Vec<(PodRef, String)>>,
}

#[cfg(any(test, feature = "testing"))]
impl FakePodSource {
    /// Adds or replaces a pod (keyed by namespace and name).
    pub fn put(&self, info: PodInfo) {
        let key = PodRef::new(info.pod.namespace.clone(), info.pod.name.clone());
        self.pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, info);
    }

    /// Removes a pod.
    pub fn remove(&self, pod: &PodRef) {
        self.pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&PodRef::new(pod.namespace.clone(), pod.name.clone()));
    }
}

#[cfg(any(test, feature = "testing"))]
impl PodSource for FakePodSource {
    fn get(&self, pod: &PodRef) -> Result<PodInfo, PodError> {
        self.get_gate.pass();
        let key = PodRef::new(pod.namespace.clone(), pod.name.clone());
        self.pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned()
            .ok_or_else(|| PodError::NotFound {
                pod: pod.clone(),
                source_name: "fake".into(),
            })
    }

    fn write_annotation(&self, pod: &PodRef, value: &str) -> Result<(), PodError> {
        self.write_gate.pass();
        if self.fail_write.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(PodError::Io {
                pod: pod.clone(),
                path: "fake".into(),
                source: std::io::Error::other("API unreachable (test)"),
            });
        }
        self.writes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((pod.clone(), value.to_owned()));
        let key = PodRef::new(pod.namespace.clone(), pod.name.clone());
        if let Some(info) = self
            .pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&key)
        {
            info.annotation = Some(value.to_owned());
        }
        Ok(())
    }

    fn warn(&self, pod: &PodRef, message: &str) {
        self.warnings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((pod.clone(), message.to_owned()));
    }

    fn mapped(&self, pod: &PodRef, message: &str) {
        self.mapped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((pod.clone(), message.to_owned()));
    }

    fn list(&self) -> Result<Vec<PodInfo>, PodError> {
        Ok(self
            .pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect())
    }
}

impl<T: PodSource + ?Sized> PodSource for std::sync::Arc<T> {
    fn get(&self, pod: &PodRef) -> Result<PodInfo, PodError> {
        (**self).get(pod)
    }
    fn write_annotation(&self, pod: &PodRef, value: &str) -> Result<(), PodError> {
        (**self).write_annotation(pod, value)
    }
    fn list(&self) -> Result<Vec<PodInfo>, PodError> {
        (**self).list()
    }
    fn warn(&self, pod: &PodRef, message: &str) {
        (**self).warn(pod, message)
    }
    fn mapped(&self, pod: &PodRef, message: &str) {
        (**self).mapped(pod, message)
    }
    fn health(&self, limit: std::time::Duration) -> Result<(), String> {
        (**self).health(limit)
    }
    fn api_retries(&self) -> [u64; 3] {
        (**self).api_retries()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const KEY: &str = "tkestack.io/portmapping";

    fn pod_json() -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-0", "namespace": "shop", "uid": "u-1",
                         "labels": {"app": "web"}, "annotations": {KEY: "", "other": "keep"}},
            "spec": {"nodeName": "node-0", "containers": [
                {"name": "web", "image": "x", "ports": [
                    {"containerPort": 80, "protocol": "TCP"},
                    {"containerPort": 443, "hostPort": 8443, "hostIP": "192.0.2.1"}]},
                {"name": "dns", "ports": [{"containerPort": 53, "protocol": "UDP", "hostPort": 0}]},
                {"name": "sidecar"}]},
            "status": {"podIP": "198.18.0.5"}
        })
    }

    #[test]
    fn reads_ports_and_annotation() {
        let info = parse_pod(&pod_json(), KEY).unwrap();
        assert_eq!(info.pod.to_string(), "shop/web-0");
        assert_eq!(info.pod.uid, "u-1");
        assert_eq!(info.annotation.as_deref(), Some(""));
        assert_eq!(info.node_name.as_deref(), Some("node-0"));
        let summary: Vec<_> = info
            .ports
            .iter()
            .map(|p| {
                (
                    p.container.as_str(),
                    p.container_port,
                    p.protocol,
                    p.host_port,
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("web", 80, Protocol::Tcp, None),
                ("web", 443, Protocol::Tcp, Some(8443)),
                ("dns", 53, Protocol::Udp, None)
            ]
        );
        assert_eq!(info.ports[1].host_ip, Some("192.0.2.1".parse().unwrap()));
        assert_eq!(
            parse_pod(&pod_json(), "other.io/key").unwrap().annotation,
            None
        );
    }

    #[test]
    fn bad_ports_name_the_container_and_field() {
        for (port, expected) in [
            (
                json!({"containerPort": 70000}),
                "container c: containerPort 70000 is not a port from 1 to 65535",
            ),
            (
                json!({"containerPort": 0}),
                "container c: containerPort 0 is not a port from 1 to 65535",
            ),
            (
                json!({"containerPort": "80"}),
                "container c: containerPort is \"80\" instead of a port number",
            ),
            (
                json!({}),
                "container c: containerPort is missing instead of a port number",
            ),
            (
                json!({"containerPort": 80, "protocol": "ICMP"}),
                "container c port 80: unknown protocol \"ICMP\"",
            ),
            (
                json!({"containerPort": 80, "hostIP": "x"}),
                "container c port 80: hostIP \"x\" is not an IP address",
            ),
            (
                json!({"containerPort": 80, "hostPort": -1}),
                "container c: hostPort -1 is not a port from 1 to 65535",
            ),
        ] {
            let object = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "ports": [port]}]}});
            let err = parse_pod(&object, KEY).unwrap_err().to_string();
            assert!(
                err.starts_with("pod default/p: ") && err.contains(expected),
                "{err}"
            );
        }
    }

    #[test]
    fn dir_source_reads_writes_back_and_lists() {
        let root = std::env::temp_dir().join(format!(
            "randport-pods-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        fs::create_dir_all(root.join("shop")).unwrap();
        let file = root.join("shop/web-0.json");
        fs::write(&file, serde_json::to_vec_pretty(&pod_json()).unwrap()).unwrap();
        let source = DirPodSource::new(&root, KEY, "node-0");
        let pod = PodRef::new("shop", "web-0");
        assert_eq!(source.get(&pod).unwrap().ports.len(), 3);
        source.write_annotation(&pod, "[]").unwrap();
        let written: Value = serde_json::from_slice(&fs::read(&file).unwrap()).unwrap();
        let mut expected = pod_json();
        expected["metadata"]["annotations"][KEY] = json!("[]");
        assert_eq!(written, expected, "only the annotation may change");
        // Field order is kept too.
        let text = fs::read_to_string(&file).unwrap();
        assert!(text.find("\"apiVersion\"").unwrap() < text.find("\"metadata\"").unwrap());
        assert!(matches!(
            source.get(&PodRef::new("shop", "gone")),
            Err(PodError::NotFound { .. })
        ));
        assert!(matches!(
            source.get(&PodRef::new("..", "x")),
            Err(PodError::Invalid { .. })
        ));
        assert_eq!(source.list().unwrap().len(), 1);
        assert_eq!(
            DirPodSource::new(&root, KEY, "node-1")
                .list()
                .unwrap()
                .len(),
            0
        );
        fs::remove_dir_all(root).unwrap();
    }
}
