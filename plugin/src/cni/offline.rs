//! DEL without the agent. A DEL must never block a node: when randportd is down (crashed,
//! upgrading, deleted without the uninstaller), the runtime would retry the DEL for ever,
//! the pod would hang in Terminating and its IP would never be released, and when IPAM
//! hands that IP to a new pod, the old host ports' DNAT would reach it. So the plugin
//! removes that one sandbox's mappings itself: its rules in one transaction of the
//! agent's backend, its UDP/SCTP conntrack entries, and its record.
//!
//! The agent and such a plugin never work on the records at once: the agent holds an
//! exclusive lock on `<state dir>/agent.lock` for its whole life, taken before it reads
//! the records; the plugin takes the same lock, without waiting for long, before it
//! touches anything. The agent writes its firewall settings to `<state dir>/agent.info`
//! for the plugin to use the same backend.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use randport_core::{PortKey, SandboxId};
use serde::{Deserialize, Serialize};

use crate::firewall::iptables::tools;
use crate::firewall::{Backend, Firewall, IptablesFirewall, IptablesFlavour, Runner};
use crate::netfilter::conntrack::{Conntrack, needs_flush};
use crate::node::state::{DirStateStore, StateStore, write_atomic};
use randport_core::IpFamily;

/// The lock file in the state directory.
pub const LOCK_FILE: &str = "agent.lock";
/// The agent's firewall settings in the state directory.
pub const INFO_FILE: &str = "agent.info";
/// How long a DEL waits for the lock an agent holds (a starting agent) before it gives up.
pub const LOCK_WAIT: Duration = Duration::from_millis(1500);

/// An exclusive lock on the records; released when dropped (or when its process dies).
#[derive(Debug)]
pub struct StateLock {
    _lock: Flock<File>,
}

impl StateLock {
    fn open(state_dir: &Path) -> std::io::Result<File> {
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(state_dir.join(LOCK_FILE))
    }

    /// Waits for the lock (the agent, at start).
    pub fn acquire(state_dir: &Path) -> std::io::Result<StateLock> {
        let lock = Flock::lock(Self::open(state_dir)?, FlockArg::LockExclusive)
            .map_err(|(_, e)| std::io::Error::from(e))?;
        Ok(StateLock { _lock: lock })
    }

    /// The lock if nobody holds it.
    pub fn try_acquire(state_dir: &Path) -> std::io::Result<Option<StateLock>> {
        match Flock::lock(Self::open(state_dir)?, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Some(StateLock { _lock: lock })),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(e.into()),
        }
    }
}

/// What a plugin needs to know of the agent's firewall.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentInfo {
    /// The backend.
    pub firewall: Backend,
    /// Whether `--localhost-access` is on (its nft table has a guard chain).
    pub localhost_access: bool,
    /// With iptables: whose commands.
    #[serde(default)]
    pub iptables_flavour: IptablesFlavour,
    /// With iptables: the kernel interface its commands used, as `iptables-save
    /// --version` says it (`nf_tables` or `legacy`), so that a plugin on the host does not
    /// change the other one's tables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iptables_backend: Option<String>,
}

impl Default for AgentInfo {
    fn default() -> Self {
        AgentInfo {
            firewall: Backend::Nftables,
            localhost_access: false,
            iptables_flavour: IptablesFlavour::System,
            iptables_backend: None,
        }
    }
}

/// The kernel interface (`nf_tables` or `legacy`) named in an iptables `--version` line
/// (`iptables-save v1.8.9 (nf_tables)`).
pub fn iptables_backend_of(version: &str) -> Option<String> {
    ["nf_tables", "legacy"]
        .into_iter()
        .find(|b| version.contains(&format!("({b})")))
        .map(str::to_owned)
}

/// Which iptables commands a plugin on the host runs to change what the agent made: the
/// agent's own flavour, or, when the agent ran its node's plain `iptables` (from its image),
/// the host's commands of the same kernel interface. An error, saying what to do, when the
/// host has none of those.
pub fn iptables_flavour_for(info: &AgentInfo, run: Runner<'_>) -> Result<IptablesFlavour, String> {
    let (IptablesFlavour::System, Some(want)) = (info.iptables_flavour, &info.iptables_backend)
    else {
        return Ok(info.iptables_flavour);
    };
    let backend_of = |flavour: IptablesFlavour| {
        run(tools(IpFamily::V4, flavour).1, &["--version"], "")
            .ok()
            .and_then(|v| iptables_backend_of(&v))
    };
    let host = backend_of(IptablesFlavour::System);
    if host.as_deref() == Some(want.as_str()) {
        return Ok(IptablesFlavour::System);
    }
    let explicit = if want == "legacy" {
        IptablesFlavour::Legacy
    } else {
        IptablesFlavour::Nft
    };
    if backend_of(explicit).as_deref() == Some(want.as_str()) {
        return Ok(explicit);
    }
    Err(format!(
        "randportd made its rules with iptables ({want}), and this node has no iptables \
         commands of that kind (its `iptables` is {}; no {}): the rules cannot be removed \
         without the agent; start randportd, which removes them",
        host.as_deref().unwrap_or("missing"),
        tools(IpFamily::V4, explicit).0
    ))
}

/// The firewall backend the agent recorded in `agent.info`, for a plugin on the host.
pub fn backend_for(info: &AgentInfo, run: Runner<'_>) -> Result<Box<dyn Firewall>, String> {
    match info.firewall {
        Backend::Iptables => Ok(Box::new(IptablesFirewall::new(iptables_flavour_for(
            info, run,
        )?))),
        nftables => Ok(crate::firewall::backend(nftables, info.localhost_access)),
    }
}

/// Writes the agent's settings for plugins that remove a sandbox without it.
pub fn write_info(state_dir: &Path, info: &AgentInfo) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(info).map_err(std::io::Error::other)?;
    write_atomic(&state_dir.join(INFO_FILE), &bytes)
}

/// The agent's settings, or the defaults when it never wrote them. A file that is there
/// but cannot be read is an error: guessing the backend could leave the sandbox's rules
/// in the other one while its record goes.
pub fn read_info(state_dir: &Path) -> Result<AgentInfo, String> {
    let path = state_dir.join(INFO_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            format!(
                "{} cannot be read ({e}): which firewall backend randportd used is unknown, so \
                 the mapping is left for randportd to remove when it is back",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(AgentInfo::default()),
        Err(e) => Err(format!("reading {}: {e}", path.display())),
    }
}

/// Removes `sandbox`'s mappings with the agent down: takes the state lock (waiting up to
/// [`LOCK_WAIT`] for an agent that is starting), then removes its rules in one
/// transaction, flushes its UDP/SCTP conntrack entries and deletes its record. Nothing
/// recorded is success. Returns whether a record was removed; the error says what failed.
pub fn remove_sandbox(
    state_dir: &Path,
    sandbox: &SandboxId,
    firewall: &dyn Fn(AgentInfo) -> Result<Box<dyn Firewall>, String>,
    conntrack: &dyn Conntrack,
) -> Result<bool, String> {
    if !state_dir.is_dir() {
        // No agent ever ran here with this state directory: nothing is mapped.
        return Ok(false);
    }
    let deadline = Instant::now() + LOCK_WAIT;
    let _lock = loop {
        match StateLock::try_acquire(state_dir) {
            Ok(Some(lock)) => break lock,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                return Err(format!(
                    "randportd holds {} but does not answer: it is starting, or stuck; the \
                     runtime retries the DEL",
                    state_dir.join(LOCK_FILE).display()
                ));
            }
            Err(e) => {
                return Err(format!(
                    "cannot lock {}: {e}",
                    state_dir.join(LOCK_FILE).display()
                ));
            }
        }
    };
    let store = DirStateStore::open(state_dir).map_err(|e| e.to_string())?;
    let records = store.load_all().map_err(|e| e.to_string())?;
    let Some(record) = records.iter().find(|r| &r.sandbox == sandbox) else {
        return Ok(false);
    };
    let remaining = || {
        records
            .iter()
            .filter(|r| &r.sandbox != sandbox)
            .cloned()
            .collect()
    };
    let errors = crate::agent::removal::remove_sandbox(
        &*firewall(read_info(state_dir)?)?,
        &store,
        record,
        &crate::agent::removal::Others {
            all: &remaining,
            sharing: &|record| crate::agent::removal::shared_addresses(record, &records),
        },
        &mut |record| {
            record
                .owned()
                .filter(|m| needs_flush(m.protocol))
                .filter_map(|m| {
                    conntrack
                        .flush(PortKey::on(m.protocol, m.host_ip), m.host_port)
                        .err()
                        .map(|e| e.to_string())
                })
                .collect()
        },
    );
    if errors.is_empty() {
        Ok(true)
    } else {
        Err(errors.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::FakeFirewall;
    use crate::netfilter::conntrack::FakeConntrack;
    use randport_core::{Mapping, PodRef, Protocol, SandboxRecord};
    use std::sync::Arc;

    fn record(sandbox: &str, port: u16) -> SandboxRecord {
        SandboxRecord {
            network: None,
            sandbox: SandboxId(sandbox.into()),
            pod: PodRef::new("shop", sandbox),
            // One address per sandbox (two sandboxes of one address share elements).
            pod_ips: vec![std::net::IpAddr::from([198, 18, 0, (port % 250) as u8])],
            mappings: vec![
                Mapping {
                    container: "web".into(),
                    host_ip: None,
                    host_port: port,
                    container_port: 8080,
                    protocol: Protocol::Tcp,
                    explicit: false,
                    delegated: false,
                },
                Mapping {
                    container: "web".into(),
                    host_ip: None,
                    host_port: port + 1,
                    container_port: 8081,
                    protocol: Protocol::Udp,
                    explicit: false,
                    delegated: false,
                },
            ],
        }
    }

    fn state_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("randport-offline-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn removes_the_record_rules_and_udp_flows_of_one_sandbox() {
        let dir = state_dir();
        let store = DirStateStore::open(&dir).unwrap();
        store.save(&record("sb1", 20000)).unwrap();
        store.save(&record("sb2", 20010)).unwrap();
        write_info(
            &dir,
            &AgentInfo {
                firewall: Backend::Iptables,
                localhost_access: false,
                iptables_flavour: IptablesFlavour::Legacy,
                iptables_backend: None,
            },
        )
        .unwrap();
        let firewall = Arc::new(FakeFirewall::default());
        let conntrack = FakeConntrack::default();
        let used = std::sync::Mutex::new(None);
        let make = |info: AgentInfo| -> Result<Box<dyn Firewall>, String> {
            *used.lock().unwrap() = Some(info.firewall);
            Ok(Box::new(Arc::clone(&firewall)))
        };
        assert_eq!(
            remove_sandbox(&dir, &SandboxId("sb1".into()), &make, &conntrack),
            Ok(true)
        );
        assert_eq!(*used.lock().unwrap(), Some(Backend::Iptables));
        assert_eq!(
            *firewall.calls.lock().unwrap(),
            vec!["remove(sb1)".to_owned()]
        );
        // Only the UDP port's flows; TCP flows end on their own.
        let flushed: Vec<u16> = conntrack
            .flushed
            .lock()
            .unwrap()
            .iter()
            .map(|c| c.1)
            .collect();
        assert_eq!(flushed, vec![20001]);
        let left: Vec<_> = store
            .load_all()
            .unwrap()
            .into_iter()
            .map(|r| r.sandbox.0)
            .collect();
        assert_eq!(left, vec!["sb2"]);
        // Again: nothing recorded, nothing to do.
        assert_eq!(
            remove_sandbox(&dir, &SandboxId("sb1".into()), &make, &conntrack),
            Ok(false)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn waits_for_a_starting_agent_and_then_says_so() {
        let dir = state_dir();
        DirStateStore::open(&dir)
            .unwrap()
            .save(&record("sb1", 20000))
            .unwrap();
        let agent = StateLock::acquire(&dir).unwrap();
        let firewall = |_: AgentInfo| -> Result<Box<dyn Firewall>, String> {
            Ok(Box::new(FakeFirewall::default()))
        };
        let started = Instant::now();
        let e = remove_sandbox(
            &dir,
            &SandboxId("sb1".into()),
            &firewall,
            &FakeConntrack::default(),
        )
        .unwrap_err();
        assert!(started.elapsed() >= LOCK_WAIT, "{:?}", started.elapsed());
        assert!(e.contains("does not answer"), "{e}");
        // The record is untouched: the agent owns it.
        assert_eq!(
            DirStateStore::open(&dir).unwrap().load_all().unwrap().len(),
            1
        );
        drop(agent);
        assert_eq!(
            remove_sandbox(
                &dir,
                &SandboxId("sb1".into()),
                &firewall,
                &FakeConntrack::default()
            ),
            Ok(true)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_node_without_a_state_directory_has_nothing_to_remove() {
        let firewall =
            |_: AgentInfo| -> Result<Box<dyn Firewall>, String> { panic!("no firewall needed") };
        assert_eq!(
            remove_sandbox(
                Path::new("/nonexistent/randport-state"),
                &SandboxId("sb1".into()),
                &firewall,
                &FakeConntrack::default()
            ),
            Ok(false)
        );
    }

    /// A runner whose `PROGRAM --version` answers come from `versions`; other programs
    /// are missing.
    fn versions<'a>(
        versions: &'a [(&'a str, &'a str)],
    ) -> impl Fn(&str, &[&str], &str) -> Result<String, String> + 'a {
        move |program, _, _| {
            versions
                .iter()
                .find(|(p, _)| *p == program)
                .map(|(_, v)| (*v).to_owned())
                .ok_or_else(|| format!("cannot run {program}: not installed"))
        }
    }

    #[test]
    fn the_plugin_uses_iptables_commands_of_the_kernel_interface_the_agent_used() {
        let info = |flavour, backend: Option<&str>| AgentInfo {
            firewall: Backend::Iptables,
            localhost_access: false,
            iptables_flavour: flavour,
            iptables_backend: backend.map(str::to_owned),
        };
        let nft_host = [("iptables-save", "iptables-save v1.8.9 (nf_tables)")];
        let legacy_host_with_nft = [
            ("iptables-save", "iptables-save v1.8.9 (legacy)"),
            ("iptables-nft-save", "iptables-nft-save v1.8.9 (nf_tables)"),
        ];
        let legacy_only = [("iptables-save", "iptables-save v1.8.9 (legacy)")];
        // The agent's image ran plain iptables (nf_tables): the host's plain one is the same.
        assert_eq!(
            iptables_flavour_for(
                &info(IptablesFlavour::System, Some("nf_tables")),
                &versions(&nft_host)
            ),
            Ok(IptablesFlavour::System)
        );
        // The host's plain iptables is legacy: its -nft commands change the agent's tables.
        assert_eq!(
            iptables_flavour_for(
                &info(IptablesFlavour::System, Some("nf_tables")),
                &versions(&legacy_host_with_nft)
            ),
            Ok(IptablesFlavour::Nft)
        );
        // Nothing of the kind on the host: an error that says what to do, nothing run.
        let err = iptables_flavour_for(
            &info(IptablesFlavour::System, Some("nf_tables")),
            &versions(&legacy_only),
        )
        .unwrap_err();
        assert!(
            err.contains("iptables (nf_tables)")
                && err.contains("its `iptables` is legacy")
                && err.contains("start randportd"),
            "{err}"
        );
        // An explicit flavour, or an agent that recorded no interface (older agent.info), is used as it is.
        assert_eq!(
            iptables_flavour_for(&info(IptablesFlavour::Legacy, None), &versions(&[])),
            Ok(IptablesFlavour::Legacy)
        );
        assert_eq!(
            iptables_flavour_for(&info(IptablesFlavour::System, None), &versions(&[])),
            Ok(IptablesFlavour::System)
        );
        assert_eq!(
            iptables_backend_of("iptables v1.8.7 (legacy)").as_deref(),
            Some("legacy")
        );
        assert_eq!(iptables_backend_of("iptables v1.4"), None);
    }

    #[test]
    fn a_del_without_the_agent_works_beside_an_empty_record() {
        let dir = state_dir();
        let store = DirStateStore::open(&dir).unwrap();
        store.save(&record("sb1", 20000)).unwrap();
        // What a power loss can leave: an empty file where a record was renamed.
        std::fs::write(dir.join("torn.json"), b"").unwrap();
        let firewall = Arc::new(FakeFirewall::default());
        let make = |_: AgentInfo| -> Result<Box<dyn Firewall>, String> {
            Ok(Box::new(Arc::clone(&firewall)))
        };
        let conntrack = FakeConntrack::default();
        assert_eq!(
            remove_sandbox(&dir, &SandboxId("sb1".into()), &make, &conntrack),
            Ok(true)
        );
        assert!(
            dir.join("torn.json.corrupt").exists(),
            "moved aside, not in the way"
        );
        assert!(
            DirStateStore::open(&dir)
                .unwrap()
                .load_all()
                .unwrap()
                .is_empty()
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_unreadable_agent_info_keeps_the_record_for_the_agent() {
        let dir = state_dir();
        let store = DirStateStore::open(&dir).unwrap();
        store.save(&record("sb1", 20000)).unwrap();
        // What a power loss can leave of the agent's settings.
        std::fs::write(dir.join(INFO_FILE), b"").unwrap();
        let make = |_: AgentInfo| -> Result<Box<dyn Firewall>, String> {
            panic!("no backend may be guessed")
        };
        let err = remove_sandbox(
            &dir,
            &SandboxId("sb1".into()),
            &make,
            &FakeConntrack::default(),
        )
        .unwrap_err();
        assert!(
            err.contains("agent.info cannot be read") && err.contains("left for randportd"),
            "{err}"
        );
        assert_eq!(store.load_all().unwrap().len(), 1, "the record stays");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
