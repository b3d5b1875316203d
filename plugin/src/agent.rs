//! The node agent's logic: ADD, DEL, CHECK, GC, STATUS, LIST, start-up recovery and
//! firewall repair, over the effect traits (firewall, port holder, conntrack, state
//! store, pod source). One mutex serialises changes, so no port is ever given twice.
//!
//! ADD, in order, each step undone if a later one fails: resolve the pod (with short
//! retries), plan and hold every host port, persist the record, apply the firewall
//! change, flush UDP/SCTP conntrack, write the annotation.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use randport_core::annotation::{self, AnnotationError};
use randport_core::{
    CniCode, HostPortAllocator, PlanError, PodRef, PortKey, PortRange, Protocol, ReservedPorts,
    SandboxId, SandboxRecord, SandboxRequest, plan,
};

use crate::conntrack::{Conntrack, ConntrackQueue, needs_flush};
use crate::firewall::{Firewall, FirewallError};
use crate::holder::{HeldPort, HoldError, PortHolder};
use crate::metrics::{Gauges, Metrics};
use crate::pods::{PodError, PodSource};
use crate::rpc::{AddRequest, ErrorReply, Request, Response};
use crate::state::{StateError, StateStore, validate_id};

/// The agent's settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This node's name.
    pub node_name: String,
    /// Where random ports come from.
    pub port_range: PortRange,
    /// Ports never handed out at random.
    pub reserved: ReservedPorts,
    /// The annotation key.
    pub annotation_key: String,
    /// How long an ADD waits for a pod the source does not know yet.
    pub pod_wait: Duration,
    /// Who maps explicit hostPorts.
    pub host_ports: HostPorts,
    /// The node's CNI config directory: in [`HostPorts::Auto`], an ADD with explicit
    /// hostPorts reads the runtime's conflist there to see whether an earlier plugin maps
    /// them. `None`: randport maps them.
    pub cni_conf_dir: Option<std::path::PathBuf>,
}

/// What a PortsMapped Event says: each container port and the host port that reaches it.
pub fn mapped_message(record: &SandboxRecord, node: &str) -> String {
    let ports: Vec<String> = record
        .mappings
        .iter()
        .map(|m| {
            let host = match m.host_ip {
                Some(ip) => format!("{ip}:{}", m.host_port),
                None => format!("host port {}", m.host_port),
            };
            let by = if m.delegated {
                " (by an earlier plugin)"
            } else {
                ""
            };
            format!("{}/{} -> {host}{by}", m.container_port, m.protocol)
        })
        .collect();
    format!("randport mapped {} on node {node}", ports.join(", "))
}

/// Who maps a pod's explicit hostPorts (`--host-ports`). One port must have one owner:
/// most clusters already chain `portmap`, which maps every explicit hostPort the runtime
/// passes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum HostPorts {
    /// Left to an earlier plugin in the node's conflist with the `portMappings`
    /// capability (portmap); randport maps them when there is none.
    #[default]
    Auto,
    /// randport maps them, whatever else is in the chain.
    All,
    /// randport maps only the random ports the annotation asks for; explicit hostPorts
    /// are left to others.
    Annotated,
}

impl HostPorts {
    /// Whether explicit hostPorts are left to another plugin, given the type of the
    /// earliest plugin before randport in the chain that maps ports, if any.
    pub fn leave_explicit(self, earlier_mapper: Option<&str>) -> bool {
        match self {
            HostPorts::Auto => earlier_mapper.is_some(),
            HostPorts::All => false,
            HostPorts::Annotated => true,
        }
    }
}

/// The effects the agent drives.
pub struct Effects {
    /// nftables or iptables.
    pub firewall: Box<dyn Firewall>,
    /// Binds host ports.
    pub holder: Box<dyn PortHolder>,
    /// Flushes conntrack entries.
    pub conntrack: Box<dyn Conntrack>,
    /// Persists records.
    pub state: Box<dyn StateStore>,
    /// Pods and annotation writeback.
    pub pods: Box<dyn PodSource>,
}

/// Why a request failed; each maps to a CNI error code.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent is still starting.
    #[error("randportd on node {0} is still starting (restoring mappings); try again in a moment")]
    NotReady(String),
    /// The pod could not be found or read.
    #[error("{0}")]
    Pod(#[from] PodError),
    /// The annotation is garbage.
    #[error("{0}")]
    Annotation(#[from] AnnotationError),
    /// The ports could not be planned.
    #[error("{0}")]
    Plan(#[from] PlanError),
    /// A port could not be held for a reason other than being busy.
    #[error("{0}")]
    Hold(#[from] HoldError),
    /// The record could not be stored.
    #[error("{0}")]
    State(#[from] StateError),
    /// The firewall change failed.
    #[error("{0}; the pod's ports were released, the ADD can be retried")]
    Firewall(#[from] FirewallError),
    /// The annotation could not be written.
    #[error("writing the port-mapping annotation back failed: {0}; the pod's ports were released")]
    Writeback(PodError),
    /// CHECK found something missing.
    #[error(
        "sandbox {sandbox} of pod {pod}: {what}; delete the pod or restart randportd to re-apply"
    )]
    Missing {
        /// The sandbox.
        sandbox: SandboxId,
        /// The pod.
        pod: PodRef,
        /// What is missing.
        what: String,
    },
    /// A sandbox that was added for another pod.
    #[error("sandbox {sandbox} is already mapped for pod {existing}, not {requested}")]
    SandboxReused {
        /// The sandbox.
        sandbox: SandboxId,
        /// The pod it belongs to.
        existing: PodRef,
        /// The pod the request names.
        requested: PodRef,
    },
    /// Several cleanup steps failed.
    #[error("{}", .0.join("; "))]
    Cleanup(Vec<String>),
}

impl AgentError {
    /// The CNI error code.
    pub fn cni_code(&self) -> CniCode {
        match self {
            AgentError::NotReady(_) => CniCode::TryAgainLater,
            AgentError::Pod(PodError::NotFound { .. } | PodError::Api { .. }) => {
                CniCode::TryAgainLater
            }
            AgentError::Pod(PodError::Io { .. }) => CniCode::IoFailure,
            AgentError::Pod(PodError::Invalid { .. }) | AgentError::Annotation(_) => {
                CniCode::InvalidPod
            }
            AgentError::Plan(
                PlanError::Exhausted { .. }
                | PlanError::HostPortBusy { .. }
                | PlanError::HostPortTaken { .. },
            ) => CniCode::NoHostPort,
            AgentError::Plan(_) => CniCode::InvalidPod,
            AgentError::Hold(_) => CniCode::NoHostPort,
            AgentError::State(_) => CniCode::IoFailure,
            AgentError::Firewall(_) => CniCode::FirewallChangeFailed,
            AgentError::Writeback(_) => CniCode::WritebackFailed,
            AgentError::Missing { .. } => CniCode::MappingMissing,
            AgentError::SandboxReused { .. } => CniCode::InvalidNetworkConfig,
            AgentError::Cleanup(_) => CniCode::CleanupIncomplete,
        }
    }

    /// The CNI error code and short message.
    pub fn code(&self) -> (u32, &'static str) {
        let code = self.cni_code();
        (code.code(), code.msg())
    }

    /// A short label for the failures metric.
    pub fn reason(&self) -> &'static str {
        match self {
            AgentError::NotReady(_) => "not_ready",
            AgentError::Pod(_) => "pod_lookup",
            AgentError::Annotation(_)
            | AgentError::Plan(PlanError::ZeroContainerPort { .. })
            | AgentError::Plan(PlanError::DuplicateContainerPort { .. })
            | AgentError::Plan(PlanError::HostIpFamily { .. })
            | AgentError::Plan(PlanError::NoPodIp { .. }) => "invalid_pod",
            AgentError::Plan(_) | AgentError::Hold(_) => "ports_unavailable",
            AgentError::State(_) => "state_store",
            AgentError::Firewall(_) => "firewall",
            AgentError::Writeback(_) => "writeback",
            AgentError::Missing { .. } => "check_missing",
            AgentError::SandboxReused { .. } => "sandbox_reused",
            AgentError::Cleanup(_) => "cleanup",
        }
    }

    /// The CNI error reply.
    pub fn reply(&self) -> ErrorReply {
        let (code, msg) = self.code();
        ErrorReply {
            code,
            msg: msg.to_owned(),
            details: self.to_string(),
        }
    }
}

struct Inner {
    alloc: HostPortAllocator,
    records: BTreeMap<SandboxId, SandboxRecord>,
    holds: HashMap<SandboxId, Vec<HeldPort>>,
    rng: fastrand::Rng,
}

impl Inner {
    fn release(&mut self, record: &SandboxRecord) {
        for m in record.owned() {
            self.alloc
                .release(PortKey::on(m.protocol, m.host_ip), m.host_port);
        }
        self.holds.remove(&record.sandbox);
    }

    fn others(&self, sandbox: &SandboxId) -> Vec<SandboxRecord> {
        self.records
            .values()
            .filter(|r| &r.sandbox != sandbox)
            .cloned()
            .collect()
    }
}

/// Where a queued addition's result goes.
type CommitReply = std::sync::mpsc::Sender<Result<(), FirewallError>>;

/// Firewall additions waiting for a group commit.
#[derive(Default)]
struct AddBatch {
    queue: Mutex<Vec<(SandboxRecord, CommitReply)>>,
    commit: Mutex<()>,
}

/// What start-up found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StartReport {
    /// Records restored.
    pub restored: usize,
    /// Records released because their pod is gone.
    pub released: Vec<SandboxId>,
    /// Annotations rewritten.
    pub rewritten: Vec<PodRef>,
    /// Problems that did not stop the start, for the log.
    pub warnings: Vec<String>,
}

/// The node agent.
pub struct Agent {
    config: AgentConfig,
    firewall: Box<dyn Firewall>,
    holder: Box<dyn PortHolder>,
    state: Box<dyn StateStore>,
    pods: Box<dyn PodSource>,
    conntrack: ConntrackQueue,
    batch: AddBatch,
    inner: Mutex<Inner>,
    ready: AtomicBool,
    /// The firewall generation and records fingerprint of the last check that found
    /// everything in place: while both stay the same, the next check is skipped.
    verified: Mutex<Option<(u32, u64)>>,
    /// Since when the watchdog has failed to check or repair our rules, and why.
    repair_failing: Mutex<Option<(Instant, String)>>,
    /// Counters and histograms.
    pub metrics: Metrics,
}

/// How long each thing may be broken before `/healthz` fails.
#[derive(Debug, Clone, Copy)]
pub struct HealthLimits {
    /// How long the agent's state may stay locked (a request stuck inside it).
    pub lock: Duration,
    /// How long the watchdog may fail to check or repair the rules.
    pub repair: Duration,
    /// How long the pod source (the API watch) may be down while pods wait for it.
    pub pods: Duration,
}

impl Default for HealthLimits {
    /// 5 s, 30 s, 60 s.
    fn default() -> Self {
        HealthLimits {
            lock: Duration::from_secs(5),
            repair: Duration::from_secs(30),
            pods: Duration::from_secs(60),
        }
    }
}

impl Agent {
    /// An agent that is not ready until [`Agent::start`] has run.
    pub fn new(config: AgentConfig, fx: Effects) -> Self {
        let alloc = HostPortAllocator::new(config.port_range, config.reserved.clone());
        let Effects {
            firewall,
            holder,
            conntrack,
            state,
            pods,
        } = fx;
        Agent {
            config,
            firewall,
            holder,
            state,
            pods,
            conntrack: ConntrackQueue::spawn(conntrack),
            batch: AddBatch::default(),
            inner: Mutex::new(Inner {
                alloc,
                records: BTreeMap::new(),
                holds: HashMap::new(),
                rng: fastrand::Rng::new(),
            }),
            ready: AtomicBool::new(false),
            verified: Mutex::new(None),
            repair_failing: Mutex::new(None),
            metrics: Metrics::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the agent serves.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// The settings.
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// Restores the node from the records: re-holds every port, rebuilds the firewall in
    /// one transaction, reconciles with the pod source, and becomes ready.
    pub fn start(&self) -> Result<StartReport, AgentError> {
        let mut report = StartReport::default();
        let mut inner = self.lock();
        for record in self.state.load_all()? {
            let mut holds = Vec::new();
            for m in record.owned() {
                let key = PortKey::on(m.protocol, m.host_ip);
                if inner.alloc.claim(key, m.host_port).is_err() {
                    report.warnings.push(format!(
                        "sandbox {}: host port {}/{key} is recorded twice",
                        record.sandbox, m.host_port
                    ));
                }
                match self.holder.hold(key, m.host_port) {
                    Ok(held) => holds.push(held),
                    Err(e) => report.warnings.push(format!(
                        "pod {}: {e}; its mapping stays, but the port is not held",
                        record.pod
                    )),
                }
            }
            inner.holds.insert(record.sandbox.clone(), holds);
            inner.records.insert(record.sandbox.clone(), record);
        }
        report.restored = inner.records.len();
        let all: Vec<SandboxRecord> = inner.records.values().cloned().collect();
        self.firewall.replace_all(&all)?;

        // One listing of this node's pods (the API source waits for its watch to sync);
        // when there is none, nothing is released: a pod we cannot see is not a gone pod.
        match self.pods.list() {
            Ok(pods) => {
                let pods: HashMap<(String, String), crate::pods::PodInfo> = pods
                    .into_iter()
                    .map(|p| ((p.pod.namespace.clone(), p.pod.name.clone()), p))
                    .collect();
                for record in all {
                    let key = (record.pod.namespace.clone(), record.pod.name.clone());
                    match pods.get(&key) {
                        Some(pod)
                            if record.pod.uid.is_empty()
                                || pod.pod.uid.is_empty()
                                || pod.pod.uid == record.pod.uid =>
                        {
                            let value = annotation::encode(&record.annotation_entries());
                            if pod.annotation.as_ref().is_some_and(|v| *v != value) {
                                match self.pods.write_annotation(&record.pod, &value) {
                                    Ok(()) => report.rewritten.push(record.pod.clone()),
                                    Err(e) => report
                                        .warnings
                                        .push(format!("rewriting the annotation: {e}")),
                                }
                            }
                        }
                        _ => {
                            if let Err(e) = self.remove_locked(&mut inner, &record.sandbox) {
                                report.warnings.push(e.to_string());
                            }
                            report.released.push(record.sandbox.clone());
                        }
                    }
                }
            }
            Err(e) => report.warnings.push(format!(
                "not reconciled with the pods, every mapping kept: {e}"
            )),
        }
        self.ready.store(true, Ordering::SeqCst);
        Ok(report)
    }

    fn resolve_pod(&self, pod: &PodRef) -> Result<crate::pods::PodInfo, AgentError> {
        // The pod may be moments old: the API source's watch may not have it yet and a GET
        // may race its creation. Short retries, growing from 20 ms to 320 ms.
        let deadline = Instant::now() + self.config.pod_wait;
        let mut pause = Duration::from_millis(20);
        loop {
            match self.pods.get(pod) {
                Err(PodError::NotFound { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(
                        pause.min(deadline.saturating_duration_since(Instant::now())),
                    );
                    pause = (pause * 2).min(Duration::from_millis(320));
                }
                other => return Ok(other?),
            }
        }
    }

    /// ADD: maps the pod's ports for the sandbox; returns the record (none when the pod
    /// has nothing to map). A repeated ADD returns the first one's record. A failure that
    /// the pod's owner can act on is also told to the pod source (an Event on the pod).
    pub fn add(&self, req: &AddRequest) -> Result<Option<SandboxRecord>, AgentError> {
        let result = self.try_add(req);
        if let Err(e) = &result
            && !matches!(
                e,
                AgentError::NotReady(_)
                    | AgentError::Pod(PodError::NotFound { .. } | PodError::Api { .. })
            )
        {
            self.pods.warn(
                &req.pod,
                &format!(
                    "randport could not map this pod's ports on node {}: {e}",
                    self.config.node_name
                ),
            );
        }
        result
    }

    /// Whether this node's explicit hostPorts are left to an earlier plugin in the chain
    /// (read from the runtime's conflist at each ADD that has some, so a changed chain
    /// counts at once).
    fn leave_explicit_ports(&self) -> bool {
        let earlier = match (self.config.host_ports, &self.config.cni_conf_dir) {
            (HostPorts::Auto, Some(dir)) => crate::install::earlier_port_mapper_in(dir),
            _ => None,
        };
        self.config.host_ports.leave_explicit(earlier.as_deref())
    }

    fn try_add(&self, req: &AddRequest) -> Result<Option<SandboxRecord>, AgentError> {
        if !self.is_ready() {
            return Err(AgentError::NotReady(self.config.node_name.clone()));
        }
        validate_id(&req.sandbox)?;
        if let Some(existing) = self.existing(req)? {
            return Ok(Some(existing));
        }

        // 1. The pod (without the lock: it may wait for a pod the source lacks yet).
        let pod = self.resolve_pod(&req.pod)?;
        if let Some(value) = &pod.annotation {
            annotation::decode(&req.pod, value)?;
        }
        let mut pod_ref = req.pod.clone();
        if pod_ref.uid.is_empty() {
            pod_ref.uid = pod.pod.uid.clone();
        }
        let leave_explicit =
            pod.ports.iter().any(|p| p.host_port.is_some()) && self.leave_explicit_ports();
        let request = SandboxRequest {
            pod: pod_ref,
            sandbox: req.sandbox.clone(),
            pod_ips: req.pod_ips.clone(),
            ports: pod.ports,
            mapping_requested: pod.annotation.is_some(),
            leave_explicit,
        };

        let record = {
            let mut guard = self.lock();
            let inner = &mut *guard;
            if let Some(existing) = inner.records.get(&req.sandbox) {
                return Ok(Some(existing.clone()));
            }
            // 2 and 3. Plan, holding every port as it is chosen.
            let mut holds: Vec<HeldPort> = Vec::new();
            let mut hard_error: Option<HoldError> = None;
            let holder = &self.holder;
            let planned = plan(
                &request,
                &mut inner.alloc,
                &mut inner.rng,
                |key, port| match holder.hold(key, port) {
                    Ok(held) => {
                        holds.push(held);
                        true
                    }
                    Err(HoldError::Busy { .. }) => false,
                    Err(other) => {
                        hard_error = Some(other);
                        false
                    }
                },
            );
            let mappings = match (planned, hard_error) {
                (Ok(mappings), _) => mappings,
                (Err(_), Some(hold)) => return Err(hold.into()),
                (Err(plan), None) => return Err(plan.into()),
            };
            let record = SandboxRecord {
                sandbox: request.sandbox.clone(),
                pod: request.pod.clone(),
                pod_ips: request.pod_ips.clone(),
                mappings,
            };
            if record.owned().next().is_none() {
                // Nothing for randport to map (no ports, or only ones another plugin maps).
                drop(guard);
                if request.mapping_requested {
                    let value = annotation::encode(&record.annotation_entries());
                    self.pods
                        .write_annotation(&record.pod, &value)
                        .map_err(AgentError::Writeback)?;
                }
                return Ok(None);
            }
            // The ports are ours from here on; the lock is not held for the I/O below.
            inner.holds.insert(record.sandbox.clone(), holds);
            inner.records.insert(record.sandbox.clone(), record.clone());
            record
        };
        let undo = |error: AgentError| {
            let mut inner = self.lock();
            if inner.records.get(&record.sandbox) == Some(&record) {
                inner.records.remove(&record.sandbox);
                inner.release(&record);
                let _ = self.state.delete(&record.sandbox);
            }
            error
        };

        // 4. Persist (concurrent ADDs fsync in parallel).
        self.state.save(&record).map_err(|e| undo(e.into()))?;
        // 5. Firewall, in one transaction with the ADDs that arrive meanwhile.
        self.commit_add(&record).map_err(|e| undo(e.into()))?;
        // 6. Conntrack, after the rules, on the worker. A failure leaves stale UDP
        // flows, not a broken mapping: it is logged, not undone.
        self.flush_conntrack(&record, true);
        // 7. Writeback, and a note on the pod for `kubectl describe`.
        if request.mapping_requested {
            let value = annotation::encode(&record.annotation_entries());
            if let Err(e) = self.pods.write_annotation(&record.pod, &value) {
                let mut inner = self.lock();
                let _ = self.remove_locked(&mut inner, &record.sandbox);
                return Err(AgentError::Writeback(e));
            }
            self.pods.mapped(
                &record.pod,
                &mapped_message(&record, &self.config.node_name),
            );
        }
        Ok(Some(record))
    }

    /// The record of a sandbox that was added already, or an error if it was added for
    /// another pod.
    fn existing(&self, req: &AddRequest) -> Result<Option<SandboxRecord>, AgentError> {
        let inner = self.lock();
        let Some(existing) = inner.records.get(&req.sandbox) else {
            return Ok(None);
        };
        if existing.pod.namespace != req.pod.namespace || existing.pod.name != req.pod.name {
            return Err(AgentError::SandboxReused {
                sandbox: req.sandbox.clone(),
                existing: existing.pod.clone(),
                requested: req.pod.clone(),
            });
        }
        Ok(Some(existing.clone()))
    }

    /// Applies `record`'s firewall change together with those of concurrent ADDs: the
    /// first caller to get the commit lock applies everything queued in one transaction
    /// and hands each caller its result (group commit). If the batch fails, each change
    /// is applied on its own, so that one bad change fails only its own ADD.
    fn commit_add(&self, record: &SandboxRecord) -> Result<(), FirewallError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.batch
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((record.clone(), tx));
        loop {
            if let Ok(result) = rx.try_recv() {
                return result;
            }
            let _leader = self.batch.commit.lock().unwrap_or_else(|e| e.into_inner());
            if let Ok(result) = rx.try_recv() {
                return result;
            }
            let jobs =
                std::mem::take(&mut *self.batch.queue.lock().unwrap_or_else(|e| e.into_inner()));
            let records: Vec<SandboxRecord> = jobs.iter().map(|(r, _)| r.clone()).collect();
            if self.firewall.add_many(&records).is_ok() {
                for (_, tx) in jobs {
                    let _ = tx.send(Ok(()));
                }
            } else {
                for (record, tx) in jobs {
                    let _ = tx.send(self.firewall.add(&record));
                }
            }
        }
    }

    /// Queues the conntrack flushes of a sandbox's ports: after an ADD (`added`) the
    /// flows already translated to the pod stay, after a DEL every flow goes.
    fn flush_conntrack(&self, record: &SandboxRecord, added: bool) {
        for m in record.owned().filter(|m| needs_flush(m.protocol)) {
            let keep = if added {
                record
                    .pod_ips
                    .iter()
                    .map(|ip| std::net::SocketAddr::new(*ip, m.container_port))
                    .collect()
            } else {
                Vec::new()
            };
            let context = format!("pod {} sandbox {}", record.pod, record.sandbox);
            self.conntrack.enqueue(
                PortKey::on(m.protocol, m.host_ip),
                m.host_port,
                keep,
                context,
            );
        }
    }

    /// Waits until the queued conntrack flushes are done (at most `timeout`).
    pub fn conntrack_idle(&self, timeout: Duration) -> bool {
        self.conntrack.wait_idle(timeout)
    }

    /// Removes a sandbox's rules, holds, conntrack entries and record, going on after
    /// errors and reporting all of them.
    fn remove_locked(&self, inner: &mut Inner, sandbox: &SandboxId) -> Result<(), AgentError> {
        let Some(record) = inner.records.get(sandbox).cloned() else {
            return Ok(());
        };
        let mut errors = Vec::new();
        let remaining = || inner.others(sandbox);
        if let Err(e) = self.firewall.remove_or_rebuild(&record, &remaining) {
            errors.push(e.to_string());
        }
        inner.release(&record);
        inner.records.remove(sandbox);
        self.flush_conntrack(&record, false);
        if let Err(e) = self.state.delete(sandbox) {
            errors.push(e.to_string());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(AgentError::Cleanup(errors))
        }
    }

    /// DEL: releases the sandbox; succeeds when there is nothing to release.
    pub fn del(&self, sandbox: &SandboxId) -> Result<(), AgentError> {
        let mut inner = self.lock();
        self.remove_locked(&mut inner, sandbox)
    }

    /// CHECK: the sandbox's rules and holds are all there.
    pub fn check(&self, sandbox: &SandboxId) -> Result<(), AgentError> {
        let inner = self.lock();
        let Some(record) = inner.records.get(sandbox) else {
            return Ok(());
        };
        let missing = |what: String| AgentError::Missing {
            sandbox: sandbox.clone(),
            pod: record.pod.clone(),
            what,
        };
        let held = inner.holds.get(sandbox).map_or(0, Vec::len);
        let owned = record.owned().count();
        if held != owned {
            return Err(missing(format!(
                "{} of its {owned} host ports are not held",
                owned - held.min(owned),
            )));
        }
        if !self.firewall.verify(record)? {
            return Err(missing(format!(
                "its {} rules are incomplete",
                self.firewall.name()
            )));
        }
        Ok(())
    }

    /// GC: releases every sandbox not in `valid`; returns how many.
    pub fn gc(&self, valid: &[SandboxId]) -> Result<usize, AgentError> {
        let mut inner = self.lock();
        let stale: Vec<SandboxId> = inner
            .records
            .keys()
            .filter(|s| !valid.contains(s))
            .cloned()
            .collect();
        let mut errors = Vec::new();
        for sandbox in &stale {
            if let Err(e) = self.remove_locked(&mut inner, sandbox) {
                errors.push(e.to_string());
            }
        }
        if errors.is_empty() {
            Ok(stale.len())
        } else {
            Err(AgentError::Cleanup(errors))
        }
    }

    /// Every record, by sandbox id.
    pub fn list(&self) -> Vec<SandboxRecord> {
        self.lock().records.values().cloned().collect()
    }

    /// Re-applies the whole firewall state when someone flushed it; true if it did.
    pub fn repair(&self) -> Result<bool, AgentError> {
        let result = self.check_and_repair();
        let mut failing = self
            .repair_failing
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match &result {
            Ok(_) => *failing = None,
            Err(e) => match &mut *failing {
                Some((_, why)) => *why = e.to_string(),
                None => *failing = Some((Instant::now(), e.to_string())),
            },
        }
        result
    }

    /// Whether the agent can still serve, for `/healthz`: its state can be locked within
    /// `limits.lock` (no request is stuck holding it), the watchdog has not failed for
    /// longer than `limits.repair`, and the pod source is healthy (see
    /// [`PodSource::health`]). The error says what is wrong.
    pub fn health(&self, limits: &HealthLimits) -> Result<(), String> {
        let deadline = Instant::now() + limits.lock;
        loop {
            match self.inner.try_lock() {
                Ok(_) => break,
                Err(std::sync::TryLockError::Poisoned(_)) => {
                    return Err("a request panicked while it held the agent's state".into());
                }
                Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(std::sync::TryLockError::WouldBlock) => {
                    return Err(format!(
                        "the agent's state has been locked for over {:?}: a request is stuck",
                        limits.lock
                    ));
                }
            }
        }
        if let Some((since, why)) = &*self
            .repair_failing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            && since.elapsed() > limits.repair
        {
            return Err(format!(
                "the firewall rules could not be checked or repaired for {:?}: {why}",
                since.elapsed()
            ));
        }
        self.pods.health(limits.pods)
    }

    #[cfg(test)]
    pub(crate) fn hold_state_for(&self, duration: Duration) {
        let _inner = self.lock();
        std::thread::sleep(duration);
    }

    fn check_and_repair(&self) -> Result<bool, AgentError> {
        // The check runs without the lock, so that ADD and DEL never wait for it.
        let snapshot: Vec<SandboxRecord> = self.lock().records.values().cloned().collect();
        // Read before the check: a change during it shows as a newer generation next time.
        let seen = self
            .firewall
            .generation()
            .map(|generation| (generation, fingerprint(&snapshot)));
        let verified = || self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if seen.is_some() && *verified() == seen {
            self.metrics.count_check(false);
            return Ok(false);
        }
        self.metrics.count_check(true);
        if self.firewall.intact(&snapshot)? {
            *verified() = seen;
            return Ok(false);
        }
        *verified() = None;
        let inner = self.lock();
        let all: Vec<SandboxRecord> = inner.records.values().cloned().collect();
        self.firewall.replace_all(&all)?;
        self.metrics.count_repair();
        Ok(true)
    }

    /// Gauges for the metrics page.
    pub fn gauges(&self) -> Gauges {
        let inner = self.lock();
        Gauges {
            mappings: inner.records.values().map(|r| r.owned().count()).sum(),
            sandboxes: inner.records.len(),
            range_used: Protocol::ALL.map(|p| inner.alloc.in_use(p)),
            range_size: self.config.port_range.len(),
            range: self.config.port_range.to_string(),
            ready: self.is_ready(),
            api_retries: self.pods.api_retries(),
        }
    }

    /// Answers one request, counting it in the metrics.
    pub fn handle(&self, request: Request) -> Response {
        let started = Instant::now();
        let ok = |records: Vec<SandboxRecord>| Response::Ok {
            records,
            ready: self.is_ready(),
        };
        let result = match request {
            Request::Add(add) => {
                let r = self.add(&add);
                self.metrics.observe("ADD", started.elapsed());
                match &r {
                    Ok(Some(record)) => {
                        self.metrics.count_request("ADD");
                        for m in &record.mappings {
                            tracing::info!(
                                pod = %add.pod,
                                sandbox = %add.sandbox,
                                port = m.host_port,
                                container_port = m.container_port,
                                protocol = %m.protocol,
                                by_another_plugin = m.delegated,
                                "mapped"
                            );
                        }
                    }
                    Ok(None) => {
                        self.metrics.count_request("ADD");
                        tracing::debug!(pod = %add.pod, sandbox = %add.sandbox, "nothing to map");
                    }
                    Err(e) => tracing::warn!(
                        pod = %add.pod,
                        sandbox = %add.sandbox,
                        code = e.code().0,
                        error = %e,
                        "ADD failed"
                    ),
                }
                r.map(|r| ok(r.into_iter().collect()))
            }
            Request::Del { sandbox } => {
                let pod = self.lock().records.get(&sandbox).map(|r| r.pod.to_string());
                let r = self.del(&sandbox).map(|()| ok(vec![]));
                self.metrics.observe("DEL", started.elapsed());
                match &r {
                    Ok(_) => {
                        self.metrics.count_request("DEL");
                        if let Some(pod) = pod {
                            tracing::info!(%pod, %sandbox, "released");
                        }
                    }
                    Err(e) => tracing::warn!(
                        pod = pod.as_deref().unwrap_or(""),
                        %sandbox,
                        code = e.code().0,
                        error = %e,
                        "DEL failed"
                    ),
                }
                r
            }
            Request::Check { sandbox } => self.check(&sandbox).map(|()| ok(vec![])),
            Request::Gc { valid } => self.gc(&valid).map(|_| ok(vec![])),
            Request::Status => Ok(ok(vec![])),
            Request::List => Ok(ok(self.list())),
        };
        match result {
            Ok(response) => response,
            Err(e) => {
                self.metrics.fail(e.reason(), e.code().0);
                Response::Error(e.reply())
            }
        }
    }
}

/// What the records say the firewall must hold, as one number (for the watchdog's skip).
fn fingerprint(records: &[SandboxRecord]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    for r in records {
        r.sandbox.0.hash(&mut hasher);
        r.pod_ips.hash(&mut hasher);
        r.mappings.hash(&mut hasher);
    }
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::HostPorts;

    #[test]
    fn explicit_host_ports_have_one_owner() {
        // auto: left to portmap when the chain has it, mapped here when it does not.
        assert!(HostPorts::Auto.leave_explicit(Some("portmap")));
        assert!(!HostPorts::Auto.leave_explicit(None));
        // all and annotated force either way.
        assert!(!HostPorts::All.leave_explicit(Some("portmap")));
        assert!(!HostPorts::All.leave_explicit(None));
        assert!(HostPorts::Annotated.leave_explicit(Some("portmap")));
        assert!(HostPorts::Annotated.leave_explicit(None));
        assert_eq!(HostPorts::default(), HostPorts::Auto);
    }
}
