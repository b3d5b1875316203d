//! Firewall backends: nftables (default) and iptables. Each change is one process (`nft
//! -f -`, or one `iptables-restore --noflush` per address family) fed text that
//! `randport-core` rendered; only our own table or chains are touched.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use randport_core::render::{iptables, nft};
use randport_core::{IpFamily, SandboxId, SandboxRecord};

/// A firewall change that failed.
#[derive(Debug, thiserror::Error)]
#[error("{backend}: {what} failed: {reason}")]
pub struct FirewallError {
    /// `nftables` or `iptables`.
    pub backend: &'static str,
    /// What was being done.
    pub what: String,
    /// The tool's own words.
    pub reason: String,
}

/// Which backend.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// One nft table with maps.
    Nftables,
    /// Our own chains in the nat table.
    Iptables,
}

/// The firewall as the agent sees it.
pub trait Firewall: Send + Sync {
    /// The backend's name.
    fn name(&self) -> &'static str;
    /// Replaces everything we own with exactly these sandboxes, in one transaction.
    fn replace_all(&self, records: &[SandboxRecord]) -> Result<(), FirewallError>;
    /// Adds one sandbox.
    fn add(&self, record: &SandboxRecord) -> Result<(), FirewallError>;
    /// Adds several sandboxes, in one transaction where the backend can.
    fn add_many(&self, records: &[SandboxRecord]) -> Result<(), FirewallError> {
        records.iter().try_for_each(|r| self.add(r))
    }
    /// Removes one sandbox; `remaining` is every other sandbox, for a rebuild when the
    /// small change cannot be made.
    fn remove(
        &self,
        record: &SandboxRecord,
        remaining: &[SandboxRecord],
    ) -> Result<(), FirewallError>;
    /// Whether every rule or element of this sandbox is present.
    fn verify(&self, record: &SandboxRecord) -> Result<bool, FirewallError>;
    /// Whether everything we own is present for these sandboxes (nobody flushed it).
    fn intact(&self, records: &[SandboxRecord]) -> Result<bool, FirewallError>;
    /// Removes everything we own (used to clean up after a switch of backend).
    fn teardown(&self) -> Result<(), FirewallError>;
    /// A number that changes whenever any rule of the node may have changed (the nftables
    /// ruleset generation), so that the watchdog can skip `intact` while it stays the
    /// same; `None` when the backend has none (then every check lists the rules).
    fn generation(&self) -> Option<u32> {
        None
    }
}

/// Creates the backend.
pub fn backend(kind: Backend, localhost: bool) -> Box<dyn Firewall> {
    match kind {
        Backend::Nftables => Box::new(NftFirewall::with_options(
            nft::DEFAULT_TABLE,
            nft::NftOptions { localhost },
        )),
        Backend::Iptables => Box::new(IptablesFirewall),
    }
}

/// Left in the agent's state directory while `route_localnet` is on because of us.
pub const ROUTE_LOCALNET_MARKER: &str = "route_localnet.set-by-randport";

/// kube-proxy's iptables mode relies on `route_localnet=1` for NodePorts on 127.0.0.1 and
/// marks that with this rule comment in the filter table.
const KUBE_PROXY_LOCALNET_RULE: &str = "block incoming localnet connections";

fn route_localnet_path(sysctl_dir: &std::path::Path) -> std::path::PathBuf {
    sysctl_dir.join("conf/all/route_localnet")
}

/// Lets the kernel route packets for 127.0.0.0/8 out of other interfaces
/// (`net.ipv4.conf.all.route_localnet=1`), which localhost access needs. Only together
/// with the nft table's guard, which drops such packets arriving from other hosts.
///
/// When it was off, a marker in `state_dir` remembers that we turned it on, so that
/// [`restore_route_localnet`] can turn it off again; when it was already on, it is
/// somebody else's and stays as it is. Returns whether it was turned on now.
pub fn enable_route_localnet(
    sysctl_dir: &std::path::Path,
    state_dir: &std::path::Path,
) -> std::io::Result<bool> {
    let path = route_localnet_path(sysctl_dir);
    if std::fs::read_to_string(&path)?.trim() != "0" {
        return Ok(false);
    }
    std::fs::write(state_dir.join(ROUTE_LOCALNET_MARKER), "0\n")?;
    std::fs::write(&path, "1")?;
    Ok(true)
}

/// Whether kube-proxy (iptables mode) relies on `route_localnet=1` here: its rule for it
/// is in this network namespace's filter table.
pub fn kube_proxy_uses_route_localnet() -> bool {
    run("iptables-save", &["-t", "filter"], "")
        .is_ok_and(|saved| saved.contains(KUBE_PROXY_LOCALNET_RULE))
}

/// Undoes [`enable_route_localnet`] when `--localhost-access` is off or on uninstall:
/// turns `route_localnet` off again if we turned it on, unless `kube_proxy_uses_it` says
/// kube-proxy relies on it (see [`kube_proxy_uses_route_localnet`]). Returns what it did,
/// for the log.
pub fn restore_route_localnet(
    sysctl_dir: &std::path::Path,
    state_dir: &std::path::Path,
    kube_proxy_uses_it: impl FnOnce() -> bool,
) -> std::io::Result<Option<String>> {
    let marker = state_dir.join(ROUTE_LOCALNET_MARKER);
    if !marker.exists() {
        return Ok(None);
    }
    let path = route_localnet_path(sysctl_dir);
    let said = if std::fs::read_to_string(&path)?.trim() != "1" {
        "net.ipv4.conf.all.route_localnet is already 0"
    } else if kube_proxy_uses_it() {
        "left net.ipv4.conf.all.route_localnet=1 (turned on for --localhost-access): \
         kube-proxy's localhost NodePorts use it too"
    } else {
        std::fs::write(&path, "0")?;
        "set net.ipv4.conf.all.route_localnet back to 0 (turned on for --localhost-access)"
    };
    std::fs::remove_file(&marker)?;
    Ok(Some(said.to_owned()))
}

/// Runs `program args` with `input` on stdin; the stdout, or the stderr as the error.
fn run(program: &str, args: &[&str], input: &str) -> Result<String, String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}; is it installed?"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| format!("writing to {program}: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for {program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// nftables: table `inet <name>`.
#[derive(Debug, Clone)]
pub struct NftFirewall {
    table: String,
    options: nft::NftOptions,
}

impl NftFirewall {
    /// The backend for table `table`.
    pub fn new(table: &str) -> Self {
        NftFirewall::with_options(table, nft::NftOptions::default())
    }

    /// The backend for table `table`, with `options` (localhost access).
    pub fn with_options(table: &str, options: nft::NftOptions) -> Self {
        NftFirewall {
            table: table.to_owned(),
            options,
        }
    }

    fn apply(&self, what: impl Into<String>, text: &str) -> Result<(), FirewallError> {
        if text.is_empty() {
            return Ok(());
        }
        run("nft", &["-f", "-"], text)
            .map(drop)
            .map_err(|reason| self.err(what, reason))
    }

    fn err(&self, what: impl Into<String>, reason: String) -> FirewallError {
        FirewallError {
            backend: "nftables",
            what: what.into(),
            reason,
        }
    }

    fn listing(&self) -> Result<Option<String>, FirewallError> {
        match run("nft", &["list", "table", "inet", &self.table], "") {
            Ok(text) => Ok(Some(text)),
            Err(reason) if reason.contains("No such file or directory") => Ok(None),
            Err(reason) => Err(self.err(format!("listing table inet {}", self.table), reason)),
        }
    }
}

impl Firewall for NftFirewall {
    fn name(&self) -> &'static str {
        "nftables"
    }

    fn replace_all(&self, records: &[SandboxRecord]) -> Result<(), FirewallError> {
        self.apply(
            format!(
                "rebuilding table inet {} ({} sandboxes)",
                self.table,
                records.len()
            ),
            &nft::ruleset_with(&self.table, records, self.options),
        )
    }

    fn add(&self, record: &SandboxRecord) -> Result<(), FirewallError> {
        self.apply(
            format!("adding mappings of pod {}", record.pod),
            &nft::add_sandbox(&self.table, record),
        )
    }

    fn add_many(&self, records: &[SandboxRecord]) -> Result<(), FirewallError> {
        let text: String = records
            .iter()
            .map(|r| nft::add_sandbox(&self.table, r))
            .collect();
        self.apply(
            format!("adding the mappings of {} pods", records.len()),
            &text,
        )
    }

    fn remove(
        &self,
        record: &SandboxRecord,
        remaining: &[SandboxRecord],
    ) -> Result<(), FirewallError> {
        match self.apply(
            format!("removing mappings of pod {}", record.pod),
            &nft::remove_sandbox(&self.table, record),
        ) {
            Ok(()) => Ok(()),
            // Some element now maps elsewhere, or the table is gone: rebuild without it.
            Err(_) => self.replace_all(remaining),
        }
    }

    fn verify(&self, record: &SandboxRecord) -> Result<bool, FirewallError> {
        let needle = format!("comment \"{}\"", record.sandbox.tag());
        let found = self
            .listing()?
            .map_or(0, |text| text.matches(&needle).count());
        Ok(found == nft::element_count(record))
    }

    fn intact(&self, _records: &[SandboxRecord]) -> Result<bool, FirewallError> {
        // A terse listing (no set contents) costs the same at any number of mappings; it
        // catches a deleted table, a flushed table or ruleset and a deleted chain. A lost
        // element is what CHECK (`verify`) finds.
        let text = match run("nft", &["-t", "list", "table", "inet", &self.table], "") {
            Ok(text) => text,
            Err(reason) if reason.contains("No such file or directory") => return Ok(false),
            Err(reason) => {
                return Err(self.err(format!("listing table inet {}", self.table), reason));
            }
        };
        let expected = nft::ruleset_with(&self.table, &[], self.options);
        let rules = expected.lines().map(str::trim).filter(|l| {
            l.contains("goto hostports") || l.contains(" map @") || l.contains("masquerade")
        });
        // The guard's rule carries a counter, which a listing prints with its values.
        if self.options.localhost && !text.contains("chain localhost_guard") {
            return Ok(false);
        }
        let sets = [
            "map hostipports4",
            "map hostipports6",
            "map hostports4",
            "map hostports6",
            "set hairpin4",
            "set hairpin6",
        ];
        Ok(sets.iter().all(|s| text.contains(s))
            && rules
                .map(|r| {
                    r.replace("meta nfproto ipv4 ", "")
                        .replace("meta nfproto ipv6 ", "")
                })
                .all(|r| text.contains(&r)))
    }

    fn teardown(&self) -> Result<(), FirewallError> {
        self.apply(
            format!("deleting table inet {}", self.table),
            &nft::teardown(&self.table),
        )
    }

    fn generation(&self) -> Option<u32> {
        crate::netlink::ruleset_generation().ok()
    }
}

/// iptables: chains `RANDPORT-*` in the nat table, IPv4 and IPv6.
#[derive(Debug, Clone, Copy, Default)]
pub struct IptablesFirewall;

const FAMILIES: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

fn tools(family: IpFamily) -> (&'static str, &'static str) {
    match family {
        IpFamily::V4 => ("iptables-restore", "iptables-save"),
        IpFamily::V6 => ("ip6tables-restore", "ip6tables-save"),
    }
}

impl IptablesFirewall {
    fn err(what: impl Into<String>, reason: String) -> FirewallError {
        FirewallError {
            backend: "iptables",
            what: what.into(),
            reason,
        }
    }

    fn restore(family: IpFamily, what: &str, payload: &str) -> Result<(), FirewallError> {
        run(tools(family).0, &["--noflush"], payload)
            .map(drop)
            .map_err(|reason| Self::err(what, reason))
    }

    fn save(family: IpFamily) -> Result<String, FirewallError> {
        run(tools(family).1, &["-t", "nat"], "")
            .map_err(|reason| Self::err("listing the nat table", reason))
    }

    fn present_jumps(saved: &str, family: IpFamily) -> Vec<iptables::HookJump> {
        iptables::hook_jumps(family)
            .into_iter()
            .filter(|j| saved.lines().any(|l| l == j.append_line()))
            .collect()
    }

    fn missing_jumps(saved: &str, family: IpFamily) -> Vec<iptables::HookJump> {
        iptables::hook_jumps(family)
            .into_iter()
            .filter(|j| !saved.lines().any(|l| l == j.append_line()))
            .collect()
    }
}

impl Firewall for IptablesFirewall {
    fn name(&self) -> &'static str {
        "iptables"
    }

    fn replace_all(&self, records: &[SandboxRecord]) -> Result<(), FirewallError> {
        for family in FAMILIES {
            let missing = Self::missing_jumps(&Self::save(family)?, family);
            let payload = iptables::full_payload(family, records, &missing);
            Self::restore(
                family,
                &format!("rebuilding our chains ({} sandboxes)", records.len()),
                &payload,
            )?;
        }
        Ok(())
    }

    fn add(&self, record: &SandboxRecord) -> Result<(), FirewallError> {
        for family in FAMILIES {
            if let Some(payload) = iptables::add_sandbox(family, record) {
                Self::restore(
                    family,
                    &format!("adding mappings of pod {}", record.pod),
                    &payload,
                )?;
            }
        }
        Ok(())
    }

    fn add_many(&self, records: &[SandboxRecord]) -> Result<(), FirewallError> {
        for family in FAMILIES {
            let rules: Vec<String> = records
                .iter()
                .filter_map(|r| iptables::add_sandbox(family, r))
                .flat_map(|p| {
                    p.lines()
                        .filter(|l| l.starts_with("-A"))
                        .map(str::to_owned)
                        .collect::<Vec<_>>()
                })
                .collect();
            if rules.is_empty() {
                continue;
            }
            let payload = format!("*nat\n{}\nCOMMIT\n", rules.join("\n"));
            Self::restore(
                family,
                &format!("adding the mappings of {} pods", records.len()),
                &payload,
            )?;
        }
        Ok(())
    }

    fn remove(
        &self,
        record: &SandboxRecord,
        remaining: &[SandboxRecord],
    ) -> Result<(), FirewallError> {
        for family in FAMILIES {
            if let Some(payload) = iptables::remove_sandbox(family, record) {
                if Self::restore(family, "removing mappings", &payload).is_err() {
                    // A rule was already gone: rebuild our chains without this sandbox.
                    return self.replace_all(remaining);
                }
            }
        }
        Ok(())
    }

    fn verify(&self, record: &SandboxRecord) -> Result<bool, FirewallError> {
        let needle = format!("--comment \"{}\"", record.sandbox.tag());
        for family in FAMILIES {
            let found = Self::save(family)?
                .lines()
                .filter(|l| l.contains(&needle))
                .count();
            if found != iptables::rule_count(family, record) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn intact(&self, records: &[SandboxRecord]) -> Result<bool, FirewallError> {
        for family in FAMILIES {
            let saved = Self::save(family)?;
            let expected: usize = records
                .iter()
                .map(|r| iptables::rule_count(family, r))
                .sum();
            let tagged = saved
                .lines()
                .filter(|l| l.contains("--comment \"sb:"))
                .count();
            if tagged != expected || !Self::missing_jumps(&saved, family).is_empty() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn teardown(&self) -> Result<(), FirewallError> {
        for family in FAMILIES {
            let saved = match Self::save(family) {
                Ok(saved) => saved,
                // No iptables on this node: nothing of ours can be there.
                Err(e) if e.reason.starts_with("cannot run") => continue,
                Err(e) => return Err(e),
            };
            if !saved.contains(&format!(":{}", iptables::HOSTPORTS_CHAIN)) {
                continue;
            }
            let payload = iptables::teardown_payload(&Self::present_jumps(&saved, family));
            Self::restore(family, "removing our chains", &payload)?;
        }
        Ok(())
    }

    /// Only with the nf_tables flavour of iptables: the legacy one changes rules without
    /// touching the nftables generation.
    fn generation(&self) -> Option<u32> {
        static NF_TABLES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let nf_tables = NF_TABLES.get_or_init(|| {
            FAMILIES.iter().all(|family| {
                run(tools(*family).1, &["--version"], "").is_ok_and(|v| v.contains("nf_tables"))
            })
        });
        if *nf_tables {
            crate::netlink::ruleset_generation().ok()
        } else {
            None
        }
    }
}

/// A firewall in memory that records every call; `fail_add` makes additions fail.
#[derive(Debug, Default)]
pub struct FakeFirewall {
    /// The sandboxes present, by tag.
    pub present: Mutex<std::collections::BTreeMap<SandboxId, usize>>,
    /// Every call, in order: `replace_all(n)`, `add(id)`, `remove(id)`, `teardown`.
    pub calls: Mutex<Vec<String>>,
    /// When set, `add` fails.
    pub fail_add: std::sync::atomic::AtomicBool,
    /// Sandboxes whose addition fails (alone or in a batch).
    pub fail_for: Mutex<std::collections::HashSet<SandboxId>>,
    /// How long `add_many` takes, to let concurrent ADDs pile up.
    pub batch_delay: Mutex<std::time::Duration>,
    /// What `generation` answers (`None` by default, as without a change counter).
    pub generation: Mutex<Option<u32>>,
}

impl FakeFirewall {
    fn log(&self, call: String) {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(call);
    }

    fn present(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<SandboxId, usize>> {
        self.present.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Firewall for FakeFirewall {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn replace_all(&self, records: &[SandboxRecord]) -> Result<(), FirewallError> {
        self.log(format!("replace_all({})", records.len()));
        let mut present = self.present();
        present.clear();
        for r in records {
            present.insert(r.sandbox.clone(), nft::element_count(r));
        }
        Ok(())
    }

    fn add(&self, record: &SandboxRecord) -> Result<(), FirewallError> {
        self.log(format!("add({})", record.sandbox));
        let failing = self
            .fail_for
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&record.sandbox);
        if failing || self.fail_add.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(FirewallError {
                backend: "fake",
                what: "add".into(),
                reason: "injected failure".into(),
            });
        }
        self.present()
            .insert(record.sandbox.clone(), nft::element_count(record));
        Ok(())
    }

    fn add_many(&self, records: &[SandboxRecord]) -> Result<(), FirewallError> {
        self.log(format!("add_many({})", records.len()));
        std::thread::sleep(*self.batch_delay.lock().unwrap_or_else(|e| e.into_inner()));
        let fail_for = self
            .fail_for
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if self.fail_add.load(std::sync::atomic::Ordering::SeqCst)
            || records.iter().any(|r| fail_for.contains(&r.sandbox))
        {
            return Err(FirewallError {
                backend: "fake",
                what: "add_many".into(),
                reason: "injected failure".into(),
            });
        }
        let mut present = self.present();
        for r in records {
            present.insert(r.sandbox.clone(), nft::element_count(r));
        }
        Ok(())
    }

    fn remove(
        &self,
        record: &SandboxRecord,
        _remaining: &[SandboxRecord],
    ) -> Result<(), FirewallError> {
        self.log(format!("remove({})", record.sandbox));
        self.present().remove(&record.sandbox);
        Ok(())
    }

    fn verify(&self, record: &SandboxRecord) -> Result<bool, FirewallError> {
        Ok(self.present().get(&record.sandbox) == Some(&nft::element_count(record)))
    }

    fn intact(&self, records: &[SandboxRecord]) -> Result<bool, FirewallError> {
        let present = self.present();
        Ok(present.len() == records.len()
            && records
                .iter()
                .all(|r| present.get(&r.sandbox) == Some(&nft::element_count(r))))
    }

    fn teardown(&self) -> Result<(), FirewallError> {
        self.log("teardown".into());
        self.present().clear();
        Ok(())
    }

    fn generation(&self) -> Option<u32> {
        *self.generation.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<T: Firewall + ?Sized> Firewall for std::sync::Arc<T> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn replace_all(&self, records: &[SandboxRecord]) -> Result<(), FirewallError> {
        (**self).replace_all(records)
    }
    fn add(&self, record: &SandboxRecord) -> Result<(), FirewallError> {
        (**self).add(record)
    }
    fn add_many(&self, records: &[SandboxRecord]) -> Result<(), FirewallError> {
        (**self).add_many(records)
    }
    fn remove(
        &self,
        record: &SandboxRecord,
        remaining: &[SandboxRecord],
    ) -> Result<(), FirewallError> {
        (**self).remove(record, remaining)
    }
    fn verify(&self, record: &SandboxRecord) -> Result<bool, FirewallError> {
        (**self).verify(record)
    }
    fn intact(&self, records: &[SandboxRecord]) -> Result<bool, FirewallError> {
        (**self).intact(records)
    }
    fn teardown(&self) -> Result<(), FirewallError> {
        (**self).teardown()
    }
    fn generation(&self) -> Option<u32> {
        (**self).generation()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    /// A fake `/proc/sys/net/ipv4` with `route_localnet` at `value`, and a state dir.
    fn dirs(name: &str, value: &str) -> (PathBuf, PathBuf) {
        let root =
            std::env::temp_dir().join(format!("randport-localnet-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (sysctl, state) = (root.join("sysctl"), root.join("state"));
        std::fs::create_dir_all(sysctl.join("conf/all")).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(route_localnet_path(&sysctl), value).unwrap();
        (sysctl, state)
    }

    fn value(sysctl: &Path) -> String {
        std::fs::read_to_string(route_localnet_path(sysctl))
            .unwrap()
            .trim()
            .to_owned()
    }

    fn cleanup(sysctl: &Path) {
        std::fs::remove_dir_all(sysctl.parent().unwrap()).unwrap();
    }

    #[test]
    fn route_localnet_we_turned_on_is_turned_off_again() {
        let (sysctl, state) = dirs("ours", "0\n");
        assert!(enable_route_localnet(&sysctl, &state).unwrap());
        assert_eq!(value(&sysctl), "1");
        // The agent restarts with the flag still on: nothing changes, the marker stays.
        assert!(!enable_route_localnet(&sysctl, &state).unwrap());
        assert!(state.join(ROUTE_LOCALNET_MARKER).exists());

        let said = restore_route_localnet(&sysctl, &state, || false).unwrap();
        assert_eq!(value(&sysctl), "0");
        assert!(said.unwrap().contains("back to 0"));
        assert!(!state.join(ROUTE_LOCALNET_MARKER).exists());
        // Once undone, there is nothing more to undo.
        assert_eq!(
            restore_route_localnet(&sysctl, &state, || false).unwrap(),
            None
        );
        cleanup(&sysctl);
    }

    #[test]
    fn route_localnet_somebody_else_turned_on_stays_on() {
        let (sysctl, state) = dirs("theirs", "1\n");
        assert!(!enable_route_localnet(&sysctl, &state).unwrap());
        assert!(!state.join(ROUTE_LOCALNET_MARKER).exists());
        assert_eq!(
            restore_route_localnet(&sysctl, &state, || false).unwrap(),
            None
        );
        assert_eq!(value(&sysctl), "1");
        cleanup(&sysctl);
    }

    #[test]
    fn route_localnet_stays_on_while_kube_proxy_relies_on_it() {
        let (sysctl, state) = dirs("kube-proxy", "0\n");
        assert!(enable_route_localnet(&sysctl, &state).unwrap());
        let said = restore_route_localnet(&sysctl, &state, || true)
            .unwrap()
            .unwrap();
        assert_eq!(value(&sysctl), "1");
        assert!(said.contains("kube-proxy"), "{said}");
        assert!(!state.join(ROUTE_LOCALNET_MARKER).exists());
        cleanup(&sysctl);
    }
}
