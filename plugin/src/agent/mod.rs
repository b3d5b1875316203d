//! The node agent's logic: ADD, DEL, CHECK, GC, STATUS, LIST, start-up recovery and
//! firewall repair, over the effect traits (firewall, port holder, conntrack, state
//! store, pod source). One mutex serialises changes, so no port is ever given twice.
//!
//! ADD, in order, each step undone if a later one fails: resolve the pod (with short
//! retries), plan and hold every host port, persist the record, apply the firewall
//! change, flush UDP/SCTP conntrack, write the annotation.

pub mod metrics;
pub mod removal;
pub mod rpc;
pub mod server;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use randport_core::annotation::{self, AnnotationError};
use randport_core::{
    CniCode, HostPortAllocator, PlanError, PodRef, PortKey, PortRange, Protocol, ReservedPorts,
    SandboxId, SandboxRecord, SandboxRequest, plan,
};

use crate::agent::metrics::{Gauges, Metrics};
use crate::agent::rpc::{AddRequest, ErrorReply, Request, Response};
use crate::firewall::{Firewall, FirewallError};
use crate::kube::pods::{PodError, PodSource};
use crate::netfilter::conntrack::{Conntrack, ConntrackQueue, needs_flush};
use crate::node::holder::{HeldPort, HoldError, PortHolder};
use crate::node::state::{StateError, StateStore, validate_id};

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
    /// How long one ADD may take in all, from its arrival to its answer: past it, the ADD
    /// stops at its next step and undoes what it did. Shorter than the plugin's timeout
    /// ([`rpc::AGENT_TIMEOUT`]), so that the agent gives up before the runtime does.
    pub add_deadline: Duration,
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
    /// A DEL or GC of the sandbox came while (or before) its ADD ran: the ADD was undone.
    #[error(
        "sandbox {sandbox} of pod {pod} was deleted {when}; this ADD stopped and undid what it \
         had done (the runtime gave up on it), nothing is mapped for it"
    )]
    SandboxDeleted {
        /// The sandbox.
        sandbox: SandboxId,
        /// The pod.
        pod: PodRef,
        /// When, in the ADD's course.
        when: String,
    },
    /// The ADD ran past the agent's deadline and was undone.
    #[error(
        "the ADD of sandbox {sandbox} of pod {pod} took longer than {limit:?} (at {step}); it \
         was undone so that the runtime's retry starts clean: see the agent's log for the slow \
         step (usually the API server)"
    )]
    Deadline {
        /// The sandbox.
        sandbox: SandboxId,
        /// The pod.
        pod: PodRef,
        /// The step it had reached.
        step: &'static str,
        /// The deadline.
        limit: Duration,
    },
    /// The sandbox is being removed (a DEL whose cleanup failed is retried).
    #[error(
        "sandbox {sandbox} of pod {pod} is being removed (a DEL of it did not finish); it cannot \
         be added again: the runtime retries its DEL"
    )]
    Removing {
        /// The sandbox.
        sandbox: SandboxId,
        /// The pod.
        pod: PodRef,
    },
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
            AgentError::SandboxDeleted { .. } => CniCode::SandboxDeleted,
            AgentError::Deadline { .. } | AgentError::Removing { .. } => CniCode::TryAgainLater,
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
            AgentError::SandboxDeleted { .. } => "sandbox_deleted",
            AgentError::Deadline { .. } => "deadline",
            AgentError::Removing { .. } => "removing",
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

/// How long a DEL of a sandbox the agent did not know keeps a late ADD of it from
/// running: longer than any runtime waits between giving up on an ADD and its DEL.
pub const TOMBSTONE_TTL: Duration = Duration::from_secs(120);
/// At most this many tombstones are kept (the oldest go first).
const MAX_TOMBSTONES: usize = 10_000;

/// An ADD in progress, as the DEL or GC of its sandbox and a second ADD of it see it.
#[derive(Default)]
struct AddTicket {
    /// Set (under the agent's lock) by a DEL or GC of the sandbox: the ADD stops at its
    /// next step and undoes what it did.
    cancelled: AtomicBool,
    /// Set when the ADD is over, whatever its outcome; a second ADD of the sandbox waits
    /// for it on `over`.
    done: Mutex<bool>,
    over: Condvar,
}

impl AddTicket {
    fn finish(&self) {
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.over.notify_all();
    }

    /// Waits until the ADD is over; false when `deadline` came first.
    fn wait(&self, deadline: Instant) -> bool {
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        while !*done {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            done = self
                .over
                .wait_timeout(done, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

/// A sandbox's operation lock: held around every effect on that one sandbox (holding its
/// ports and recording it, saving, committing its rules, removing it), so an ADD's step
/// and a DEL of the same sandbox never interleave. Taken before the agent's lock, never
/// while holding it.
type SandboxLock = Arc<Mutex<()>>;

struct Inner {
    alloc: HostPortAllocator,
    records: BTreeMap<SandboxId, SandboxRecord>,
    holds: HashMap<SandboxId, Vec<HeldPort>>,
    /// ADDs in progress.
    adding: HashMap<SandboxId, Arc<AddTicket>>,
    /// Sandboxes whose removal has begun and not finished (a failed DEL is retried): their
    /// ports stay claimed and held, their rules are left out of every rebuild.
    removing: HashSet<SandboxId>,
    /// Sandboxes whose ADD recorded them and has not committed their rules yet.
    uncommitted: HashSet<SandboxId>,
    /// Sandboxes whose removal runs now (a subset of `removing`; the others' removal
    /// failed and waits for a retried DEL).
    in_removal: HashSet<SandboxId>,
    /// Sandboxes deleted before their ADD arrived, and when.
    tombstones: HashMap<SandboxId, Instant>,
    /// Per-sandbox operation locks, while someone uses them.
    locks: HashMap<SandboxId, SandboxLock>,
    rng: fastrand::Rng,
}

impl Inner {
    fn release(&mut self, record: &SandboxRecord) {
        for m in &record.mappings {
            let key = PortKey::on(m.protocol, m.host_ip);
            // A port left to another mapper may be reserved by another sandbox too (the
            // reservation was its): it stays while any other record names it.
            if !m.owned()
                && self.records.values().any(|r| {
                    r.sandbox != record.sandbox
                        && r.mappings.iter().any(|o| {
                            o.host_port == m.host_port && PortKey::on(o.protocol, o.host_ip) == key
                        })
                })
            {
                continue;
            }
            self.alloc.release(key, m.host_port);
        }
        self.holds.remove(&record.sandbox);
    }

    /// The records whose rules the firewall must hold: all but those being removed and
    /// those that only reserve ports another plugin maps.
    fn wanted(&self) -> Vec<SandboxRecord> {
        self.records
            .values()
            .filter(|r| !self.removing.contains(&r.sandbox) && r.owned().next().is_some())
            .cloned()
            .collect()
    }

    /// [`Inner::wanted`], split into the records whose rules must be there and those
    /// being added or removed, whose rules may or may not be there yet.
    fn wanted_and_in_flux(&self) -> (Vec<SandboxRecord>, Vec<SandboxRecord>) {
        let mut settled = Vec::new();
        let mut in_flux = Vec::new();
        for r in self.records.values().filter(|r| r.owned().next().is_some()) {
            if self.in_removal.contains(&r.sandbox) || self.uncommitted.contains(&r.sandbox) {
                in_flux.push(r.clone());
            } else if !self.removing.contains(&r.sandbox) {
                settled.push(r.clone());
            }
            // A sandbox whose removal failed has no rule wanted: a rebuild leaves it out.
        }
        (settled, in_flux)
    }

    fn others(&self, sandbox: &SandboxId) -> Vec<SandboxRecord> {
        let mut wanted = self.wanted();
        wanted.retain(|r| &r.sandbox != sandbox);
        wanted
    }

    fn sandbox_lock(&mut self, sandbox: &SandboxId) -> SandboxLock {
        // Drop the locks nobody holds any more (the map keeps the only reference).
        if self.locks.len() > 64 {
            self.locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        }
        Arc::clone(self.locks.entry(sandbox.clone()).or_default())
    }

    fn tombstone(&mut self, sandbox: &SandboxId) {
        let now = Instant::now();
        self.tombstones
            .retain(|_, at| now.duration_since(*at) < TOMBSTONE_TTL);
        if self.tombstones.len() >= MAX_TOMBSTONES
            && let Some(oldest) = self
                .tombstones
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(s, _)| s.clone())
        {
            self.tombstones.remove(&oldest);
        }
        self.tombstones.insert(sandbox.clone(), now);
    }

    fn tombstoned(&self, sandbox: &SandboxId) -> bool {
        self.tombstones
            .get(sandbox)
            .is_some_and(|at| at.elapsed() < TOMBSTONE_TTL)
    }
}

/// Locks a sandbox's operation lock.
fn hold_sandbox(lock: &SandboxLock) -> MutexGuard<'_, ()> {
    lock.lock().unwrap_or_else(|e| e.into_inner())
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
    /// Older records released because a newer one claims the same host port.
    pub conflicts: Vec<SandboxId>,
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
                adding: HashMap::new(),
                removing: HashSet::new(),
                uncommitted: HashSet::new(),
                in_removal: HashSet::new(),
                tombstones: HashMap::new(),
                locks: HashMap::new(),
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
        // The store lists records oldest first; the newest claim of a port wins, so they
        // are taken newest first and an older record that claims a taken port loses.
        let mut loaded = self.state.load_all()?;
        let set_aside = self.state.set_aside();
        self.metrics.count_corrupt_records(set_aside.len());
        report.warnings.extend(set_aside);
        loaded.reverse();
        let mut newest_first = Vec::new();
        {
            let mut inner = self.lock();
            for record in loaded {
                let mut claimed = Vec::new();
                let mut conflict = None;
                // Ports left to another mapper are reserved again, as the ADD did.
                for m in record.mappings.iter().filter(|m| !m.owned()) {
                    let _ = inner
                        .alloc
                        .claim(PortKey::on(m.protocol, m.host_ip), m.host_port);
                }
                for m in record.owned() {
                    let key = PortKey::on(m.protocol, m.host_ip);
                    if inner.alloc.claim(key, m.host_port).is_err() {
                        conflict = Some((key, m.host_port));
                        break;
                    }
                    claimed.push((key, m.host_port));
                }
                if let Some((key, port)) = conflict {
                    for (key, port) in claimed {
                        inner.alloc.release(key, port);
                    }
                    let owner = inner
                        .records
                        .values()
                        .find(|r| {
                            r.owned().any(|m| {
                                m.host_port == port && PortKey::on(m.protocol, m.host_ip) == key
                            })
                        })
                        .map(|r| format!("sandbox {} of pod {}", r.sandbox, r.pod))
                        .unwrap_or_default();
                    let deleted = match self.state.delete(&record.sandbox) {
                        Ok(()) => "its record was deleted".to_owned(),
                        Err(e) => format!("deleting its record failed too: {e}"),
                    };
                    report.warnings.push(format!(
                        "sandbox {} of pod {} and the newer {owner} both claim host port {port}/{key}: \
                         the newer keeps it, the older was released ({deleted})",
                        record.sandbox,
                        record.pod
                    ));
                    report.conflicts.push(record.sandbox.clone());
                    continue;
                }
                let mut holds = Vec::new();
                for m in record.owned() {
                    match self
                        .holder
                        .hold(PortKey::on(m.protocol, m.host_ip), m.host_port)
                    {
                        Ok(held) => holds.push(held),
                        Err(e) => report.warnings.push(format!(
                            "pod {}: {e}; its mapping stays, but the port is not held",
                            record.pod
                        )),
                    }
                }
                inner.holds.insert(record.sandbox.clone(), holds);
                inner.records.insert(record.sandbox.clone(), record.clone());
                newest_first.push(record);
            }
            report.restored = inner.records.len();
        }
        let all = self.lock().wanted();
        self.firewall.replace_all(&all)?;

        // One listing of this node's pods (the API source waits for its watch to sync);
        // when there is none, nothing is released: a pod we cannot see is not a gone pod.
        match self.pods.list() {
            Ok(pods) => {
                let pods: HashMap<(String, String), crate::kube::pods::PodInfo> = pods
                    .into_iter()
                    .map(|p| ((p.pod.namespace.clone(), p.pod.name.clone()), p))
                    .collect();
                // Only a pod's newest sandbox writes its annotation.
                let mut annotated: HashSet<(String, String)> = HashSet::new();
                let mut stale = Vec::new();
                for record in &newest_first {
                    let key = (record.pod.namespace.clone(), record.pod.name.clone());
                    match pods.get(&key) {
                        Some(pod)
                            if record.pod.uid.is_empty()
                                || pod.pod.uid.is_empty()
                                || pod.pod.uid == record.pod.uid =>
                        {
                            if !annotated.insert(key) {
                                continue;
                            }
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
                        _ => stale.push(record.sandbox.clone()),
                    }
                }
                stale.sort();
                for sandbox in stale {
                    if let Err(e) = self.remove(&sandbox) {
                        report.warnings.push(e.to_string());
                    }
                    report.released.push(sandbox);
                }
            }
            Err(e) => report.warnings.push(format!(
                "not reconciled with the pods, every mapping kept: {e}"
            )),
        }
        self.ready.store(true, Ordering::SeqCst);
        Ok(report)
    }

    fn resolve_pod(
        &self,
        req: &AddRequest,
        ticket: &AddTicket,
        deadline: Instant,
    ) -> Result<crate::kube::pods::PodInfo, AgentError> {
        // The pod may be moments old: the API source's watch may not have it yet and a GET
        // may race its creation. Short retries, growing from 20 ms to 320 ms, each after a
        // look at whether the runtime gave up (a DEL came) or the deadline passed.
        let wait_until = (Instant::now() + self.config.pod_wait).min(deadline);
        let mut pause = Duration::from_millis(20);
        loop {
            let result = self.pods.get(&req.pod);
            self.still_wanted(req, ticket, deadline, "the pod lookup")?;
            match result {
                Err(PodError::NotFound { .. }) if Instant::now() < wait_until => {
                    std::thread::sleep(
                        pause.min(wait_until.saturating_duration_since(Instant::now())),
                    );
                    pause = (pause * 2).min(Duration::from_millis(320));
                }
                other => return Ok(other?),
            }
        }
    }

    /// Whether an ADD may go on: not cancelled by a DEL or GC of its sandbox, not past its
    /// deadline. `step` is what it has just done or is about to do, for the error.
    fn still_wanted(
        &self,
        req: &AddRequest,
        ticket: &AddTicket,
        deadline: Instant,
        step: &'static str,
    ) -> Result<(), AgentError> {
        if ticket.cancelled.load(Ordering::SeqCst) {
            return Err(AgentError::SandboxDeleted {
                sandbox: req.sandbox.clone(),
                pod: req.pod.clone(),
                when: format!("while its ADD was at {step}"),
            });
        }
        if Instant::now() >= deadline {
            return Err(AgentError::Deadline {
                sandbox: req.sandbox.clone(),
                pod: req.pod.clone(),
                step,
                limit: self.config.add_deadline,
            });
        }
        Ok(())
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
                    | AgentError::SandboxDeleted { .. }
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
            (HostPorts::Auto, Some(dir)) => crate::node::install::earlier_port_mapper_in(dir),
            _ => None,
        };
        self.config.host_ports.leave_explicit(earlier.as_deref())
    }

    fn try_add(&self, req: &AddRequest) -> Result<Option<SandboxRecord>, AgentError> {
        if !self.is_ready() {
            return Err(AgentError::NotReady(self.config.node_name.clone()));
        }
        validate_id(&req.sandbox)?;
        let deadline = Instant::now() + self.config.add_deadline;
        // One ADD of a sandbox at a time: a second one waits for the first and then
        // answers with its record (or runs itself, if the first failed).
        let ticket = loop {
            let running = {
                let mut inner = self.lock();
                if inner.tombstoned(&req.sandbox) {
                    return Err(AgentError::SandboxDeleted {
                        sandbox: req.sandbox.clone(),
                        pod: req.pod.clone(),
                        when: "before its ADD arrived (a DEL or GC came first)".into(),
                    });
                }
                match inner.adding.get(&req.sandbox) {
                    Some(ticket) => Arc::clone(ticket),
                    None => {
                        if let Some(existing) = self.existing(&inner, req)? {
                            return Ok(Some(existing));
                        }
                        let ticket = Arc::new(AddTicket::default());
                        inner
                            .adding
                            .insert(req.sandbox.clone(), Arc::clone(&ticket));
                        break ticket;
                    }
                }
            };
            if !running.wait(deadline) {
                return Err(AgentError::Deadline {
                    sandbox: req.sandbox.clone(),
                    pod: req.pod.clone(),
                    step: "waiting for another ADD of the same sandbox",
                    limit: self.config.add_deadline,
                });
            }
        };
        let result = self.add_steps(req, &ticket, deadline);
        {
            let mut inner = self.lock();
            if inner
                .adding
                .get(&req.sandbox)
                .is_some_and(|t| Arc::ptr_eq(t, &ticket))
            {
                inner.adding.remove(&req.sandbox);
            }
        }
        ticket.finish();
        result
    }

    /// The ADD's steps, each undone if a later one fails or the ADD is cancelled.
    fn add_steps(
        &self,
        req: &AddRequest,
        ticket: &AddTicket,
        deadline: Instant,
    ) -> Result<Option<SandboxRecord>, AgentError> {
        // 1. The pod (without any lock: it may wait for a pod the source lacks yet).
        let pod = self.resolve_pod(req, ticket, deadline)?;
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
            pod_ips: first_of_each_family(req),
            ports: pod.ports,
            mapping_requested: pod.annotation.is_some(),
            leave_explicit,
        };

        let sandbox_lock = self.lock().sandbox_lock(&req.sandbox);
        let op = hold_sandbox(&sandbox_lock);
        let record = {
            let mut guard = self.lock();
            let inner = &mut *guard;
            // Checked under the agent's lock, where a DEL sets it: either the DEL sees
            // the record below, or this ADD sees the DEL.
            self.still_wanted(req, ticket, deadline, "planning its ports")?;
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
                network: req.network.clone(),
                sandbox: request.sandbox.clone(),
                pod: request.pod.clone(),
                pod_ips: request.pod_ips.clone(),
                mappings,
            };
            // A record only reserves ports another plugin maps when one of them lies in the
            // random range: a random pick could land there, also after a restart.
            let reserves = record
                .mappings
                .iter()
                .any(|m| !m.owned() && self.config.port_range.contains(m.host_port));
            if record.owned().next().is_none() && !reserves {
                // Nothing to map or reserve (no ports, no annotation and no hostPort, or
                // only hostPorts another plugin maps outside the range).
                inner.release(&record);
                drop(guard);
                drop(op);
                if request.mapping_requested {
                    self.still_wanted(req, ticket, deadline, "writing the annotation back")?;
                    let value = annotation::encode(&record.annotation_entries());
                    self.pods
                        .write_annotation(&record.pod, &value)
                        .map_err(AgentError::Writeback)?;
                }
                return Ok(None);
            }
            // The ports are ours from here on; the agent's lock is not held for the I/O
            // below, the sandbox's is (a DEL of it waits for the step to end).
            inner.holds.insert(record.sandbox.clone(), holds);
            inner.records.insert(record.sandbox.clone(), record.clone());
            inner.uncommitted.insert(record.sandbox.clone());
            record
        };
        // Undoes this ADD through the one removal path (the sandbox's lock is held).
        let undo = |error: AgentError| match self.remove_record(&record.sandbox, Some(&record)) {
            Ok(_) => error,
            Err(cleanup) => {
                tracing::error!(
                    pod = %record.pod,
                    sandbox = %record.sandbox,
                    error = %cleanup,
                    "undoing a failed ADD did not finish; the record stays, marked removing"
                );
                error
            }
        };

        // 4. Persist (concurrent ADDs write in parallel).
        self.still_wanted(req, ticket, deadline, "saving its record")
            .map_err(undo)?;
        self.state.save(&record).map_err(|e| undo(e.into()))?;
        // 5. Firewall, in one transaction with the ADDs that arrive meanwhile. A record of
        // ports that only another plugin maps has no rule: it only keeps them reserved.
        let ours = record.owned().next().is_some();
        if ours {
            self.still_wanted(req, ticket, deadline, "adding its rules")
                .map_err(undo)?;
            self.commit_add(&record).map_err(|e| undo(e.into()))?;
        }
        self.lock().uncommitted.remove(&record.sandbox);
        if ours {
            self.still_wanted(req, ticket, deadline, "adding its rules")
                .map_err(undo)?;
        }
        drop(op);
        // 6. Conntrack, after the rules, on the worker. A failure leaves stale UDP
        // flows, not a broken mapping: it is logged, not undone.
        self.flush_after_add(&record);
        // 7. Writeback, and a note on the pod for `kubectl describe`. The sandbox's lock
        // is not held while the API server is asked: a DEL of the sandbox meanwhile
        // removes it at once, and this ADD then finds itself cancelled.
        let undo_unlocked = |error: AgentError| {
            let _op = hold_sandbox(&sandbox_lock);
            undo(error)
        };
        if request.mapping_requested {
            self.still_wanted(req, ticket, deadline, "writing the annotation back")
                .map_err(undo_unlocked)?;
            let value = annotation::encode(&record.annotation_entries());
            if let Err(e) = self.pods.write_annotation(&record.pod, &value) {
                return Err(undo_unlocked(AgentError::Writeback(e)));
            }
            self.still_wanted(req, ticket, deadline, "writing the annotation back")
                .map_err(undo_unlocked)?;
            if ours {
                self.pods.mapped(
                    &record.pod,
                    &mapped_message(&record, &self.config.node_name),
                );
            }
        }
        // Nothing of randport's to report for a record that only reserves ports.
        Ok(ours.then_some(record))
    }

    /// The record of a sandbox that was added already, or an error if it was added for
    /// another pod or is being removed.
    fn existing(
        &self,
        inner: &Inner,
        req: &AddRequest,
    ) -> Result<Option<SandboxRecord>, AgentError> {
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
        if inner.removing.contains(&req.sandbox) {
            return Err(AgentError::Removing {
                sandbox: req.sandbox.clone(),
                pod: existing.pod.clone(),
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

    /// Queues the conntrack flushes of an added sandbox's ports: the flows already
    /// translated to the pod stay (a DEL flushes every flow itself: `flush_removed`).
    fn flush_after_add(&self, record: &SandboxRecord) {
        for m in record.owned().filter(|m| needs_flush(m.protocol)) {
            let keep = record
                .pod_ips
                .iter()
                .map(|ip| std::net::SocketAddr::new(*ip, m.container_port))
                .collect();
            let context = format!("pod {} sandbox {}", record.pod, record.sandbox);
            self.conntrack.enqueue(
                PortKey::on(m.protocol, m.host_ip),
                m.host_port,
                keep,
                context,
            );
        }
    }

    /// Flushes a removed sandbox's UDP/SCTP flows now; what fails is queued for the worker.
    fn flush_removed(&self, record: &SandboxRecord) {
        for m in record.owned().filter(|m| needs_flush(m.protocol)) {
            let key = PortKey::on(m.protocol, m.host_ip);
            // Only the families the mapping sent traffic to: each is a walk of the table.
            let mut families: Vec<randport_core::IpFamily> = m
                .targets(&record.pod_ips)
                .map(randport_core::IpFamily::of)
                .collect();
            families.dedup();
            if let Err(e) = self.conntrack.flush_now(key, m.host_port, &families) {
                let context = format!("pod {} sandbox {}", record.pod, record.sandbox);
                tracing::warn!(context = %context, error = %e, "conntrack flush failed; queued again");
                self.conntrack
                    .enqueue(key, m.host_port, Vec::new(), context);
            }
        }
    }

    /// Waits until the queued conntrack flushes are done (at most `timeout`).
    pub fn conntrack_idle(&self, timeout: Duration) -> bool {
        self.conntrack.wait_idle(timeout)
    }

    /// The one removal of a sandbox (DEL, GC, reconciliation at start, an ADD undone):
    /// its rules, then its conntrack entries and record; its ports are released last,
    /// only when every step succeeded, so that nobody else gets a port whose rule may
    /// still be there. Until then the record stays, marked removing (left out of every
    /// rebuild of the rules), and the error lists every step that failed: the runtime
    /// retries the DEL. With `only`, nothing is done unless the record is that one. The
    /// caller holds the sandbox's lock; the agent's lock is not held for the I/O.
    /// Returns whether there was a record.
    fn remove_record(
        &self,
        sandbox: &SandboxId,
        only: Option<&SandboxRecord>,
    ) -> Result<bool, AgentError> {
        let record = {
            let mut inner = self.lock();
            let Some(record) = inner.records.get(sandbox).cloned() else {
                return Ok(false);
            };
            if only.is_some_and(|only| *only != record) {
                return Ok(false);
            }
            inner.removing.insert(sandbox.clone());
            inner.in_removal.insert(sandbox.clone());
            record
        };
        let mut errors = crate::agent::removal::remove_sandbox(
            &*self.firewall,
            &*self.state,
            &record,
            &crate::agent::removal::Others {
                all: &|| self.lock().others(sandbox),
                sharing: &|record| {
                    let inner = self.lock();
                    crate::agent::removal::shared_addresses(
                        record,
                        inner
                            .records
                            .values()
                            .filter(|r| !inner.removing.contains(&r.sandbox)),
                    )
                },
            },
            // Before DEL answers: a stale UDP/SCTP flow must not follow the pod's address to
            // the next pod given it. A failure is not the DEL's: the flush is queued again
            // for the worker (and logged), and the DEL goes on.
            &mut |record| {
                self.flush_removed(record);
                Vec::new()
            },
        );
        let mut inner = self.lock();
        inner.in_removal.remove(sandbox);
        if errors.is_empty() {
            inner.release(&record);
            inner.records.remove(sandbox);
            inner.removing.remove(sandbox);
            inner.uncommitted.remove(sandbox);
            Ok(true)
        } else {
            self.metrics.count_removal_retry();
            errors.push(format!(
                "the record of pod {} stays, its ports held, until a retried DEL removes \
                 everything",
                record.pod
            ));
            Err(AgentError::Cleanup(errors))
        }
    }

    /// Removes a sandbox (taking its lock): DEL, GC and reconciliation.
    fn remove(&self, sandbox: &SandboxId) -> Result<bool, AgentError> {
        let lock = self.lock().sandbox_lock(sandbox);
        let _op = hold_sandbox(&lock);
        self.remove_record(sandbox, None)
    }

    /// Cancels the ADD of `sandbox` if one runs, and leaves a tombstone unless the
    /// sandbox has a finished record (a late ADD of it then fails).
    fn cancel_add(inner: &mut Inner, sandbox: &SandboxId) {
        let running = inner.adding.get(sandbox).map(Arc::clone);
        if let Some(ticket) = &running {
            ticket.cancelled.store(true, Ordering::SeqCst);
        }
        if running.is_some() || !inner.records.contains_key(sandbox) {
            inner.tombstone(sandbox);
        }
    }

    /// DEL: releases the sandbox; succeeds when there is nothing to release. An ADD of it
    /// that is still running is cancelled (it undoes itself; the DEL waits at most for
    /// the step it is in), and a DEL that comes first keeps a late ADD from mapping it.
    pub fn del(&self, sandbox: &SandboxId) -> Result<(), AgentError> {
        validate_id(sandbox)?;
        Self::cancel_add(&mut self.lock(), sandbox);
        self.remove(sandbox).map(|_| ())
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
        if owned == 0 {
            // Only ports another plugin maps: nothing of ours to check.
            return Ok(());
        }
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

    /// GC: releases every sandbox of `network` not in `valid` (and cancels their ADDs);
    /// returns how many. Without a list (`cni.dev/valid-attachments` missing), nothing is
    /// released: libcni DELs every attachment it knows itself before such a GC. With a
    /// network name, only sandboxes added for that network are concerned (Multus and
    /// others run one GC per network); records that carry no network (made by an agent
    /// before it was kept) are left to DEL and to the reconciliation at start.
    pub fn gc(
        &self,
        valid: Option<&[SandboxId]>,
        network: Option<&str>,
    ) -> Result<usize, AgentError> {
        let Some(valid) = valid else {
            tracing::warn!(
                network = network.unwrap_or(""),
                "GC without cni.dev/valid-attachments: nothing released (the runtime DELs \
                 each attachment it knows itself)"
            );
            return Ok(0);
        };
        let ours = |record_network: Option<&str>| match network {
            None => true,
            Some(network) => record_network == Some(network),
        };
        let stale: Vec<SandboxId> = {
            let mut inner = self.lock();
            // An ADD in progress has no record's network to go by until it is recorded:
            // only a GC of its own network cancels it.
            let running: Vec<SandboxId> = inner
                .adding
                .keys()
                .filter(|s| !valid.contains(s))
                .filter(|s| {
                    inner
                        .records
                        .get(*s)
                        .is_none_or(|r| ours(r.network.as_deref()))
                })
                .cloned()
                .collect();
            for sandbox in &running {
                Self::cancel_add(&mut inner, sandbox);
            }
            inner
                .records
                .values()
                .filter(|r| !valid.contains(&r.sandbox) && ours(r.network.as_deref()))
                .map(|r| r.sandbox.clone())
                .collect()
        };
        let mut errors = Vec::new();
        for sandbox in &stale {
            if let Err(e) = self.remove(sandbox) {
                errors.push(e.to_string());
            }
        }
        if errors.is_empty() {
            Ok(stale.len())
        } else {
            Err(AgentError::Cleanup(errors))
        }
    }

    /// The ADDs in progress, by sandbox, and whether each was cancelled (a DEL or GC of
    /// its sandbox came; it is undoing itself).
    pub fn adds_in_progress(&self) -> Vec<(SandboxId, bool)> {
        let mut adds: Vec<_> = self
            .lock()
            .adding
            .iter()
            .map(|(s, t)| (s.clone(), t.cancelled.load(Ordering::SeqCst)))
            .collect();
        adds.sort();
        adds
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
        let (settled, in_flux) = self.lock().wanted_and_in_flux();
        // Read before the check: a change during it shows as a newer generation next time.
        let seen = self.firewall.generation().map(|generation| {
            (
                generation,
                fingerprint(settled.iter().chain(&in_flux))
                    ^ (in_flux.len() as u64).rotate_left(32),
            )
        });
        let verified = || self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if seen.is_some() && *verified() == seen {
            self.metrics.count_check(false);
            return Ok(false);
        }
        self.metrics.count_check(true);
        if self.firewall.intact_within(&settled, &in_flux)? {
            *verified() = seen;
            return Ok(false);
        }
        *verified() = None;
        // Under the lock, so that the records do not change while the rules are built
        // from them. An ADD whose commit lands during the load adds its elements again
        // (the kernel takes an element it has); a DEL's removal that finds them gone
        // rebuilds once more.
        let inner = self.lock();
        self.firewall.replace_all(&inner.wanted())?;
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
            Request::Gc { valid, network } => self
                .gc(valid.as_deref(), network.as_deref())
                .map(|_| ok(vec![])),
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

/// The pod's first address of each family (prevResult lists the primary first): a DNAT
/// goes to one address, and a second of the same family would be a second element with
/// the same key, which the kernel refuses. The others are ignored, and said so.
fn first_of_each_family(req: &AddRequest) -> Vec<std::net::IpAddr> {
    let mut ips: Vec<std::net::IpAddr> = Vec::new();
    for ip in &req.pod_ips {
        if ips.iter().any(|kept| kept.is_ipv4() == ip.is_ipv4()) {
            tracing::info!(
                pod = %req.pod,
                sandbox = %req.sandbox,
                %ip,
                "a second pod address of one family: mappings go to the first one only"
            );
        } else {
            ips.push(*ip);
        }
    }
    ips
}

/// What the records say the firewall must hold, as one number (for the watchdog's skip).
fn fingerprint<'a>(records: impl IntoIterator<Item = &'a SandboxRecord>) -> u64 {
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
