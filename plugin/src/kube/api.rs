//! The Kubernetes API as the agent's pod source (`--pods kube`, the default).
//!
//! One watch of the pods on this node (field selector `spec.nodeName`) feeds a cache; an
//! ADD reads the cache and, when the pod is not there yet (it may be a moment old), GETs it
//! from the API server. There is no list per ADD. The annotation is written with a merge
//! patch of that one key (plus the pod's uid, so a patch meant for a deleted pod never lands
//! on its same-named successor), retried with backoff on conflicts and transient errors.
//! Failures become Events on the pod (reason `PortMappingFailed`).
//!
//! The agent is synchronous; this source owns a small tokio runtime and blocks on it from
//! the agent's threads (never from inside the runtime).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event as RecordedEvent, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use randport_core::PodRef;
use serde_json::{Value, json};
use tokio::runtime::{Handle, Runtime};
use tokio::task::JoinHandle;

use crate::kube::pods::{PodError, PodInfo, PodSource, parse_pod};

/// The reason of the Events the agent records on pods.
pub const FAILURE_REASON: &str = "PortMappingFailed";
/// The reason of the Warning on an annotated pod that has been running for a while and
/// still has no ports (the plugin was never called for it, say).
pub const UNMAPPED_REASON: &str = "PortMappingMissing";
/// The reason of the Normal Event on a pod whose ports were mapped.
pub const MAPPED_REASON: &str = "PortsMapped";
/// The reason of the Warning on an annotated pod that uses the node's network: such a pod
/// gets no CNI call, so randport never sees it.
pub const HOST_NETWORK_REASON: &str = "PortMappingNotPossible";

/// How the Kubernetes pod source behaves.
#[derive(Debug, Clone)]
pub struct KubeSettings {
    /// This node's name (the watch's field selector).
    pub node_name: String,
    /// The port-mapping annotation's key.
    pub annotation_key: String,
    /// Attempts per API call (GET, PATCH, Event) on conflicts and transient errors.
    pub attempts: u32,
    /// The first retry's delay; doubled on each further retry.
    pub first_backoff: Duration,
    /// How long one API call may take.
    pub call_timeout: Duration,
    /// How long a listing waits for the watch's first sync.
    pub sync_timeout: Duration,
    /// How long an annotated pod may run without its ports before it gets a Warning.
    pub unmapped_after: Duration,
    /// How often pods are looked at for that.
    pub unmapped_check: Duration,
    /// Counts retried API calls, by kind (shared by every clone of these settings).
    pub retried: Arc<Retried>,
}

impl KubeSettings {
    /// Defaults: 6 attempts from 25 ms (about 0.8 s of backoff in all), 5 s per call, 30 s
    /// for the first sync.
    pub fn new(node_name: &str, annotation_key: &str) -> Self {
        KubeSettings {
            node_name: node_name.to_owned(),
            annotation_key: annotation_key.to_owned(),
            attempts: 6,
            first_backoff: Duration::from_millis(25),
            call_timeout: Duration::from_secs(5),
            sync_timeout: Duration::from_secs(30),
            unmapped_after: Duration::from_secs(30),
            unmapped_check: Duration::from_secs(10),
            retried: Arc::default(),
        }
    }
}

/// Pods from the Kubernetes API, cached by a watch of this node's pods.
pub struct KubePodSource {
    settings: KubeSettings,
    client: Client,
    /// Events to record, in order, by one task (so that a repeat finds the first in the
    /// recorder's cache and counts, instead of racing it).
    events: tokio::sync::mpsc::UnboundedSender<(PodRef, EventKind, String)>,
    handle: Handle,
    store: Store<Pod>,
    synced: Arc<AtomicBool>,
    /// Since when the watch has failed (cleared by its next event).
    watch_down: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    /// Whether an ADD missed the cache while the watch was down (a pod waited for it).
    missed_while_down: Arc<AtomicBool>,
    watch: JoinHandle<()>,
    unmapped: JoinHandle<()>,
    // Dropped last: the tasks above run on it.
    _runtime: Option<Runtime>,
}

impl std::fmt::Debug for KubePodSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubePodSource")
            .field("settings", &self.settings)
            .field("synced", &self.synced.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

/// The API call that failed and why, for one pod.
fn api_error(pod: &PodRef, what: &str, e: &CallError) -> PodError {
    let hint = match e {
        CallError::Kube(kube::Error::Api(s)) if s.code == 403 => {
            "; the agent's ServiceAccount lacks the permission, or the admission policy \
             refused it: check the ClusterRole and ValidatingAdmissionPolicy in deploy/randport.yaml"
        }
        CallError::Kube(kube::Error::Api(s)) if s.code == 422 => {
            "; the API server refused the change (an admission policy?)"
        }
        CallError::Kube(kube::Error::Api(_)) => "",
        _ => "; is the API server reachable from this node?",
    };
    PodError::Api {
        pod: pod.clone(),
        what: what.to_owned(),
        message: format!("{e}{hint}"),
    }
}

#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("{}", describe(.0))]
    Kube(kube::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} {}: {}", s.code, s.reason, s.message),
        other => other.to_string(),
    }
}

/// A conflict on a pod that was replaced (its uid changed) is not worth retrying.
fn uid_mismatch(e: &CallError) -> bool {
    matches!(e, CallError::Kube(kube::Error::Api(s))
        if s.code == 409 && s.message.contains("Precondition failed"))
}

fn transient(e: &CallError) -> bool {
    match e {
        CallError::Timeout(_) => true,
        CallError::Kube(kube::Error::Api(s)) => {
            matches!(s.code, 409 | 429 | 500 | 502 | 503 | 504) && !uid_mismatch(e)
        }
        CallError::Kube(
            kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_),
        ) => true,
        CallError::Kube(_) => false,
    }
}

fn not_found(e: &CallError) -> bool {
    matches!(e, CallError::Kube(kube::Error::Api(s)) if s.code == 404)
}

/// API calls retried after a conflict or a transient error, by what they did.
#[derive(Debug, Default)]
pub struct Retried {
    /// Pod reads (GET).
    pub reads: std::sync::atomic::AtomicU64,
    /// Annotation writes (PATCH).
    pub writes: std::sync::atomic::AtomicU64,
    /// Event records.
    pub events: std::sync::atomic::AtomicU64,
}

/// Which counter of [`Retried`] a call counts in.
#[derive(Debug, Clone, Copy)]
enum CallKind {
    Read,
    Write,
    Event,
}

impl Retried {
    fn counter(&self, kind: CallKind) -> &std::sync::atomic::AtomicU64 {
        match kind {
            CallKind::Read => &self.reads,
            CallKind::Write => &self.writes,
            CallKind::Event => &self.events,
        }
    }
}

/// Runs `call` until it succeeds, fails for good, or runs out of attempts, with a timeout
/// on each attempt and a doubling pause between them; retries count under `kind`.
async fn retrying<T, F, Fut>(
    settings: &KubeSettings,
    kind: CallKind,
    mut call: F,
) -> Result<T, CallError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, kube::Error>>,
{
    let mut delay = settings.first_backoff;
    let mut attempt = 1;
    loop {
        let result = match tokio::time::timeout(settings.call_timeout, call()).await {
            Ok(result) => result.map_err(CallError::Kube),
            Err(_) => Err(CallError::Timeout(settings.call_timeout)),
        };
        match result {
            Err(e) if attempt < settings.attempts && transient(&e) => {
                settings
                    .retried
                    .counter(kind)
                    .fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
            other => return other,
        }
    }
}

impl KubePodSource {
    /// Connects with the in-cluster service account, or `KUBECONFIG` / `~/.kube/config`
    /// outside a cluster, on a runtime of its own.
    pub fn connect(settings: KubeSettings) -> Result<Self, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("randport-kube")
            .enable_all()
            .build()
            .map_err(|e| format!("starting the Kubernetes client's runtime: {e}"))?;
        let client = runtime.block_on(Client::try_default()).map_err(|e| {
            format!(
                "no Kubernetes client configuration: {e}; run in a pod with a service \
                 account, set KUBECONFIG, or use --pods dir:PATH"
            )
        })?;
        let mut source = Self::start(client, runtime.handle().clone(), settings);
        source._runtime = Some(runtime);
        Ok(source)
    }

    /// Starts the watch on `handle` with `client` (tests pass a mock API server's client).
    pub fn start(client: Client, handle: Handle, settings: KubeSettings) -> Self {
        let (store, writer) = reflector::store();
        let synced = Arc::new(AtomicBool::new(false));
        let api: Api<Pod> = Api::all(client.clone());
        let config =
            watcher::Config::default().fields(&format!("spec.nodeName={}", settings.node_name));
        let stream = watcher(api, config)
            .default_backoff()
            .modify(|pod: &mut Pod| pod.managed_fields_mut().clear())
            .reflect(writer);
        let warned = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
        let watch_down = Arc::new(std::sync::Mutex::new(None));
        let missed_while_down = Arc::new(AtomicBool::new(false));
        let (down, missed) = (Arc::clone(&watch_down), Arc::clone(&missed_while_down));
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "randportd".into(),
                instance: Some(settings.node_name.clone()),
            },
        );
        let (watch_client, watch_settings) = (recorder.clone(), settings.clone());
        let watch = handle.spawn(async move {
            stream
                .for_each(|event| {
                    let (warned, client, settings) = (
                        Arc::clone(&warned),
                        watch_client.clone(),
                        watch_settings.clone(),
                    );
                    {
                        let mut down = down.lock().unwrap_or_else(|e| e.into_inner());
                        if event.is_ok() {
                            *down = None;
                            missed.store(false, Ordering::SeqCst);
                        } else if down.is_none() {
                            *down = Some(std::time::Instant::now());
                        }
                    }
                    async move {
                        match event {
                            Err(e) => {
                                tracing::warn!(error = %e, "watching this node's pods; retrying")
                            }
                            Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => {
                                warn_host_network(&client, &settings, &pod, &warned).await
                            }
                            Ok(_) => {}
                        }
                    }
                })
                .await;
        });
        let (events, mut queue) =
            tokio::sync::mpsc::unbounded_channel::<(PodRef, EventKind, String)>();
        {
            let (recorder, settings) = (recorder.clone(), settings.clone());
            handle.spawn(async move {
                while let Some((pod, kind, message)) = queue.recv().await {
                    let posted = post_event(&recorder, &settings, &pod, kind, &message).await;
                    if let Err(e) = posted {
                        tracing::warn!(error = %e, "recording an Event");
                    }
                }
            });
        }
        let unmapped = handle.spawn(warn_unmapped(
            store.clone(),
            recorder.clone(),
            settings.clone(),
        ));
        let ready = store.clone();
        let flag = Arc::clone(&synced);
        handle.spawn(async move {
            if ready.wait_until_ready().await.is_ok() {
                flag.store(true, Ordering::SeqCst);
            }
        });
        KubePodSource {
            settings,
            client,
            events,
            handle,
            store,
            synced,
            watch_down,
            missed_while_down,
            watch,
            unmapped,
            _runtime: None,
        }
    }

    /// Whether the pod (with that uid, when given) is in the watch's cache.
    pub fn is_cached(&self, pod: &PodRef) -> bool {
        self.cached(pod).is_some()
    }

    /// Whether the watch has delivered its first full listing.
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }

    /// Runs `call` until it succeeds, fails for good, or runs out of attempts.
    fn call<T, F, Fut>(&self, kind: CallKind, call: F) -> Result<T, CallError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, kube::Error>>,
    {
        self.handle.block_on(retrying(&self.settings, kind, call))
    }

    fn info(&self, pod: &Pod) -> Result<PodInfo, PodError> {
        let object = serde_json::to_value(pod).map_err(|e| PodError::Invalid {
            pod: PodRef::new(pod.namespace().unwrap_or_default(), pod.name_any()),
            reason: e.to_string(),
        })?;
        parse_pod(&object, &self.settings.annotation_key)
    }

    fn cached(&self, pod: &PodRef) -> Option<Arc<Pod>> {
        let cached = self
            .store
            .get(&ObjectRef::new(&pod.name).within(&pod.namespace))?;
        let uid = cached.uid().unwrap_or_default();
        (pod.uid.is_empty() || uid == pod.uid).then_some(cached)
    }

    /// Records an Event on the pod in the background: the request's answer does not wait
    /// for the API server. A failure to record is logged.
    fn record(&self, pod: &PodRef, kind: EventKind, message: &str) {
        // The queue lives as long as the runtime; a send fails only while shutting down.
        let _ = self.events.send((pod.clone(), kind, message.to_owned()));
    }

    fn gone(pod: &PodRef, why: &str) -> PodError {
        PodError::NotFound {
            pod: pod.clone(),
            source_name: format!("the API server ({why})"),
        }
    }
}

/// A Warning Event, once per pod, on an annotated pod that uses the node's network: the
/// runtime makes no CNI call for it, so it gets no mapping (the annotation is left as is).
async fn warn_host_network(
    recorder: &Recorder,
    settings: &KubeSettings,
    pod: &Pod,
    warned: &std::sync::Mutex<std::collections::HashSet<String>>,
) {
    let host_network = pod.spec.as_ref().and_then(|s| s.host_network) == Some(true);
    if !host_network || !pod.annotations().contains_key(&settings.annotation_key) {
        return;
    }
    let uid = pod.uid().unwrap_or_default();
    if !warned
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(uid.clone())
    {
        return;
    }
    let mut pod_ref = PodRef::new(pod.namespace().unwrap_or_default(), pod.name_any());
    pod_ref.uid = uid;
    let message = format!(
        "the pod uses hostNetwork: it shares node {}'s ports and gets no CNI call, so \
         randport maps none of its ports and its {} annotation stays as it is; use its \
         container ports on the node directly, or drop hostNetwork to get random ports",
        settings.node_name, settings.annotation_key
    );
    tracing::warn!(pod = %pod_ref, "{message}");
    if let Err(e) = post_event(
        recorder,
        settings,
        &pod_ref,
        Warning(HOST_NETWORK_REASON),
        &message,
    )
    .await
    {
        tracing::warn!(error = %e, "recording an Event");
    }
}

/// An Event's type and reason.
#[derive(Debug, Clone, Copy)]
enum EventKind {
    Normal(&'static str),
    Warning(&'static str),
}
use EventKind::{Normal, Warning};

/// Every `settings.unmapped_check`, a Warning (once per pod) on each annotated pod of this
/// node that has been running for over `settings.unmapped_after` and still has no ports:
/// something kept randport out of its network setup (the conflist was rewritten without
/// it, another runtime handler, the plugin missing from the CNI bin directory).
async fn warn_unmapped(store: Store<Pod>, recorder: Recorder, settings: KubeSettings) {
    let mut warned = std::collections::HashSet::new();
    loop {
        tokio::time::sleep(settings.unmapped_check).await;
        let now = k8s_openapi::jiff::Timestamp::now();
        for pod in store.state() {
            let status = pod.status.as_ref();
            let running = status.and_then(|s| s.phase.as_deref()) == Some("Running");
            let host_network = pod.spec.as_ref().and_then(|s| s.host_network) == Some(true);
            let unmapped = pod
                .annotations()
                .get(&settings.annotation_key)
                .is_some_and(|v| v.is_empty());
            let Some(started) = status.and_then(|s| s.start_time.as_ref()) else {
                continue;
            };
            let for_ = now.duration_since(started.0).unsigned_abs();
            if !running || host_network || !unmapped || for_ < settings.unmapped_after {
                continue;
            }
            let uid = pod.uid().unwrap_or_default();
            if !warned.insert(uid.clone()) {
                continue;
            }
            let mut pod_ref = PodRef::new(pod.namespace().unwrap_or_default(), pod.name_any());
            pod_ref.uid = uid;
            let message = format!(
                "the pod has run for {}s on node {} and asked for ports ({}), but randport was \
                 never called for it: is randport in the node's CNI conflist (randportd \
                 install; kubectl -n kube-system logs ds/randport) and the plugin in the CNI \
                 bin directory? Recreate the pod once it is",
                for_.as_secs(),
                settings.node_name,
                settings.annotation_key
            );
            tracing::warn!(pod = %pod_ref, "{message}");
            if let Err(e) = post_event(
                &recorder,
                &settings,
                &pod_ref,
                Warning(UNMAPPED_REASON),
                &message,
            )
            .await
            {
                tracing::warn!(error = %e, "recording an Event");
            }
        }
    }
}

/// Records an Event on the pod through kube's event recorder (events.k8s.io/v1): the same
/// reason on the same pod within minutes becomes one Event whose series counts them, not
/// one Event per kubelet retry. Retried like every call.
async fn post_event(
    recorder: &Recorder,
    settings: &KubeSettings,
    pod: &PodRef,
    kind: EventKind,
    message: &str,
) -> Result<(), PodError> {
    let (type_, reason, action) = match kind {
        Normal(reason) => (EventType::Normal, reason, "MapPorts"),
        Warning(reason) => (EventType::Warning, reason, "MapPorts"),
    };
    let event = RecordedEvent {
        type_,
        reason: reason.into(),
        // At most 1 kB.
        note: Some(message.chars().take(1000).collect()),
        action: action.into(),
        secondary: None,
    };
    let regarding = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        namespace: Some(pod.namespace.clone()),
        name: Some(pod.name.clone()),
        uid: (!pod.uid.is_empty()).then(|| pod.uid.clone()),
        ..ObjectReference::default()
    };
    retrying(settings, CallKind::Event, || {
        recorder.publish(&event, &regarding)
    })
    .await
    .map_err(|e| api_error(pod, "recording an Event", &e))
}

impl Drop for KubePodSource {
    fn drop(&mut self) {
        self.watch.abort();
        self.unmapped.abort();
    }
}

impl PodSource for KubePodSource {
    fn get(&self, pod: &PodRef) -> Result<PodInfo, PodError> {
        if let Some(cached) = self.cached(pod) {
            return self.info(&cached);
        }
        if self
            .watch_down
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
        {
            self.missed_while_down.store(true, Ordering::SeqCst);
        }
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        match self.call(CallKind::Read, || api.get_opt(&pod.name)) {
            Ok(Some(found)) if pod.uid.is_empty() || found.uid().as_deref() == Some(&pod.uid) => {
                self.info(&found)
            }
            Ok(Some(_)) => Err(Self::gone(pod, "a pod of that name with another uid")),
            Ok(None) => Err(Self::gone(pod, "no such pod")),
            Err(e) => Err(api_error(pod, "reading the pod", &e)),
        }
    }

    fn write_annotation(&self, pod: &PodRef, value: &str) -> Result<(), PodError> {
        let key = &self.settings.annotation_key;
        if let Some(cached) = self.cached(pod)
            && cached.annotations().get(key).map(String::as_str) == Some(value)
        {
            return Ok(());
        }
        let mut metadata = json!({ "annotations": { key: value } });
        if !pod.uid.is_empty() {
            metadata["uid"] = Value::String(pod.uid.clone());
        }
        let patch = Patch::Merge(json!({ "metadata": metadata }));
        let params = PatchParams {
            field_manager: Some("randportd".into()),
            ..PatchParams::default()
        };
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        match self.call(CallKind::Write, || api.patch(&pod.name, &params, &patch)) {
            Ok(_) => Ok(()),
            Err(e) if not_found(&e) => {
                Err(Self::gone(pod, "deleted before its ports were written"))
            }
            Err(e) if uid_mismatch(&e) => {
                Err(Self::gone(pod, "replaced by a pod of the same name"))
            }
            Err(e) => Err(api_error(pod, "writing the annotation", &e)),
        }
    }

    fn list(&self) -> Result<Vec<PodInfo>, PodError> {
        // The timer is made inside the runtime (async block), not on the caller's thread.
        let waited = self.handle.block_on(async {
            tokio::time::timeout(self.settings.sync_timeout, self.store.wait_until_ready()).await
        });
        if !matches!(waited, Ok(Ok(()))) {
            return Err(PodError::Api {
                pod: PodRef::new("*", "*"),
                what: format!("listing the pods on node {}", self.settings.node_name),
                message: format!(
                    "the watch has not synced within {:?}; is the API server reachable?",
                    self.settings.sync_timeout
                ),
            });
        }
        // A pod whose spec cannot be read is still a pod of this node: it is listed by
        // its identity (no ports, no annotation), so that the reconciliation at start
        // keeps its mappings instead of taking it for gone, and said so.
        let mut pods: Vec<PodInfo> = self
            .store
            .state()
            .iter()
            .map(|pod| {
                self.info(pod).unwrap_or_else(|e| {
                    let mut id = PodRef::new(pod.namespace().unwrap_or_default(), pod.name_any());
                    id.uid = pod.uid().unwrap_or_default();
                    tracing::warn!(
                        pod = %id,
                        error = %e,
                        "cannot read this pod's spec; its mappings are kept as they are"
                    );
                    PodInfo {
                        pod: id,
                        node_name: Some(self.settings.node_name.clone()),
                        ports: Vec::new(),
                        annotation: None,
                    }
                })
            })
            .collect();
        pods.sort_by(|a, b| a.pod.cmp(&b.pod));
        Ok(pods)
    }

    /// Records a Warning Event on the pod, in the background: the failed request's answer
    /// does not wait for the API server.
    fn warn(&self, pod: &PodRef, message: &str) {
        self.record(pod, Warning(FAILURE_REASON), message);
    }

    /// Unhealthy when the watch of this node's pods has failed for longer than `limit` and
    /// an ADD has missed the cache meanwhile (a pod waited on the API).
    fn health(&self, limit: Duration) -> Result<(), String> {
        let down = *self.watch_down.lock().unwrap_or_else(|e| e.into_inner());
        match down {
            Some(since)
                if since.elapsed() > limit && self.missed_while_down.load(Ordering::SeqCst) =>
            {
                Err(format!(
                    "the watch of node {}'s pods has failed for {:?} while pods waited for \
                     their ports; is the API server reachable from this node?",
                    self.settings.node_name,
                    since.elapsed()
                ))
            }
            _ => Ok(()),
        }
    }

    fn api_retries(&self) -> [u64; 3] {
        let r = &self.settings.retried;
        [&r.reads, &r.writes, &r.events].map(|c| c.load(Ordering::Relaxed))
    }

    /// Records a Normal Event with the pod's mappings, in the background.
    fn mapped(&self, pod: &PodRef, message: &str) {
        self.record(pod, Normal(MAPPED_REASON), message);
    }
}
