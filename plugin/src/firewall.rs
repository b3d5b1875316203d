//! Firewall backends: nftables (default) and iptables. Each change is one process (`nft
//! -f -`, or one `iptables-restore --noflush` per address family) fed text that
//! `randport-core` rendered; only our own table or chains are touched.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use randport_core::render::{iptables, nft};
use randport_core::{IpFamily, SandboxId, SandboxRecord};

use crate::nft_elements::{self, Op};

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
    /// [`Firewall::remove`] with the other sandboxes made only if a rebuild is needed
    /// (the agent's DEL: copying every record for each DEL grows with the node).
    fn remove_or_rebuild(
        &self,
        record: &SandboxRecord,
        remaining: &dyn Fn() -> Vec<SandboxRecord>,
    ) -> Result<(), FirewallError> {
        self.remove(record, &remaining())
    }
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
        Backend::Iptables => Box::new(IptablesFirewall::default()),
    }
}

/// Creates the backend a [`preflight`] chose.
pub fn chosen_backend(choice: &Preflight, localhost: bool) -> Box<dyn Firewall> {
    match choice.backend {
        Backend::Iptables => Box::new(IptablesFirewall::new(choice.flavour)),
        nftables => backend(nftables, localhost),
    }
}

/// Runs a program: (program, args, stdin) to its stdout, or the error text.
pub type Runner<'a> = &'a dyn Fn(&str, &[&str], &str) -> Result<String, String>;

/// The programs of this node, run for real.
pub fn run_tool(program: &str, args: &[&str], input: &str) -> Result<String, String> {
    run(program, args, input)
}

/// What the agent's start-up check chose, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preflight {
    /// The backend to use.
    pub backend: Backend,
    /// With iptables: whose commands.
    pub flavour: IptablesFlavour,
    /// Why nftables was not used although asked for (the kernel refused our ruleset).
    pub fell_back: Option<String>,
    /// How the flavour was chosen, for the log.
    pub flavour_reason: String,
}

/// Checks, before anything is changed, that the kernel takes what the agent will load: for
/// nftables, a check load (`nft -c`) of its whole, empty ruleset (not a version string);
/// when that fails, iptables instead. For iptables, the flavour whose tables already hold
/// the node's rules (as kube-proxy's wrapper decides: its hint chains first, then the
/// number of rules), so that our chains sit beside kube-proxy's and the CNI plugins'.
pub fn preflight(requested: Backend, localhost: bool, run: Runner<'_>) -> Preflight {
    let mut fell_back = None;
    if requested == Backend::Nftables {
        let text = nft::ruleset_with(nft::DEFAULT_TABLE, &[], nft::NftOptions { localhost });
        match run("nft", &["-c", "-f", "-"], &text) {
            Ok(_) => {
                return Preflight {
                    backend: Backend::Nftables,
                    flavour: IptablesFlavour::System,
                    fell_back: None,
                    flavour_reason: String::new(),
                };
            }
            Err(e) => fell_back = Some(e),
        }
    }
    let (flavour, flavour_reason) = iptables_flavour(run);
    Preflight {
        backend: Backend::Iptables,
        flavour,
        fell_back,
        flavour_reason,
    }
}

/// The iptables flavour the node's rules are in, and why.
fn iptables_flavour(run: Runner<'_>) -> (IptablesFlavour, String) {
    // (has a kube hint chain, number of rules) of one flavour, both families.
    let look = |flavour: IptablesFlavour| -> Option<(bool, usize)> {
        let mut hint = false;
        let mut rules = 0;
        for family in FAMILIES {
            let saved = run(tools(family, flavour).1, &[], "").ok()?;
            hint |= saved.contains("KUBE-IPTABLES-HINT") || saved.contains("KUBE-KUBELET-CANARY");
            rules += saved.lines().filter(|l| l.starts_with("-A")).count();
        }
        Some((hint, rules))
    };
    use IptablesFlavour::*;
    match (look(Legacy), look(Nft)) {
        (None, None) => (
            System,
            "no iptables-legacy/-nft commands: the node's `iptables`".into(),
        ),
        (Some(_), None) => (Legacy, "only the legacy commands are installed".into()),
        (None, Some(_)) => (Nft, "only the nf_tables commands are installed".into()),
        (Some((true, _)), Some((false, _))) => (Legacy, "kube's hint chain is in legacy".into()),
        (Some((false, _)), Some((true, _))) => (Nft, "kube's hint chain is in nf_tables".into()),
        (Some((_, legacy)), Some((_, nft))) if legacy > nft => (
            Legacy,
            format!("{legacy} rules in legacy, {nft} in nf_tables"),
        ),
        (Some((_, legacy)), Some((_, nft))) if nft > legacy => {
            (Nft, format!("{nft} rules in nf_tables, {legacy} in legacy"))
        }
        (Some((_, n)), Some(_)) => (System, format!("{n} rules in each: the node's `iptables`")),
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
    /// The table's shape (chains, sets, rules; no elements) as read right after this
    /// backend last loaded it whole: what the watchdog compares with.
    loaded: std::sync::Arc<std::sync::Mutex<Option<crate::netlink::TableShape>>>,
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
            loaded: std::sync::Arc::default(),
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

    fn loaded(&self) -> std::sync::MutexGuard<'_, Option<crate::netlink::TableShape>> {
        self.loaded.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The table's shape now; None when every one of five readings was interrupted by
    /// a change (each is three small dumps, so pods coming and going rarely spoil more
    /// than one).
    fn shape(&self) -> Result<Option<crate::netlink::TableShape>, FirewallError> {
        use crate::netlink::ShapeRead;
        for _ in 0..5 {
            match crate::netlink::nft_table_shape(&self.table) {
                Ok(ShapeRead::Shape(shape)) => return Ok(Some(shape)),
                Ok(ShapeRead::Interrupted) => continue,
                Err(e) => {
                    return Err(self.err(
                        format!(
                            "reading the chains, sets and rules of table inet {}",
                            self.table
                        ),
                        e.to_string(),
                    ));
                }
            }
        }
        Ok(None)
    }

    /// The table's shape now if it has every chain, set and rule of ours: someone may
    /// have flushed or changed it between our load and this reading, and a reference
    /// taken then would make the damage look normal.
    fn whole_shape(&self) -> Option<crate::netlink::TableShape> {
        let shape = self.shape().ok().flatten()?;
        (shape.counts() == nft::object_counts(self.options)).then_some(shape)
    }

    /// The intact check by a terse listing, compared with the rendered rules as text:
    /// used until this backend has loaded the table itself (an agent that found its table
    /// in place at start).
    fn intact_by_listing(&self) -> Result<bool, FirewallError> {
        // A terse listing prints no set contents, but nft still reads every element and
        // lists again while the ruleset changes: fine once, not under churn.
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
        *self.loaded() = None;
        self.apply(
            format!(
                "rebuilding table inet {} ({} sandboxes)",
                self.table,
                records.len()
            ),
            &nft::ruleset_with(&self.table, records, self.options),
        )?;
        // What we loaded, as the kernel describes it: the watchdog's reference. (If it
        // cannot be read now, the next check lists the table instead.)
        *self.loaded() = self.whole_shape();
        Ok(())
    }

    fn add(&self, record: &SandboxRecord) -> Result<(), FirewallError> {
        self.add_many(std::slice::from_ref(record))
    }

    fn add_many(&self, records: &[SandboxRecord]) -> Result<(), FirewallError> {
        let elements: Vec<nft::SetElement> = records.iter().flat_map(nft::elements).collect();
        let ops: Vec<(Op, &nft::SetElement)> = elements.iter().map(|e| (Op::Add, e)).collect();
        nft_elements::apply(&self.table, &ops).map_err(|e| {
            let what = match records {
                [one] => format!("adding mappings of pod {}", one.pod),
                _ => format!("adding the mappings of {} pods", records.len()),
            };
            self.err(what, e.to_string())
        })
    }

    fn remove(
        &self,
        record: &SandboxRecord,
        remaining: &[SandboxRecord],
    ) -> Result<(), FirewallError> {
        self.remove_or_rebuild(record, &|| remaining.to_vec())
    }

    fn remove_or_rebuild(
        &self,
        record: &SandboxRecord,
        remaining: &dyn Fn() -> Vec<SandboxRecord>,
    ) -> Result<(), FirewallError> {
        let elements = nft::elements(record);
        let ops: Vec<(Op, &nft::SetElement)> = elements.iter().map(|e| (Op::Remove, e)).collect();
        match nft_elements::apply(&self.table, &ops) {
            Ok(()) => Ok(()),
            // Some element now maps elsewhere, or the table is gone: rebuild without it.
            Err(_) => self.replace_all(&remaining()),
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
        // Three netlink dumps (chains, sets, rules: no elements; a reading interrupted by
        // a change is taken again, five times at most) against what was there right after
        // our last whole load; they cost the same at any number of
        // mappings and while mappings come and go. They catch a deleted table, a flushed
        // table or ruleset, a deleted or changed chain, set or rule. A lost element is what
        // CHECK (`verify`) finds.
        let reference = self.loaded().clone();
        let now = match self.shape() {
            Ok(Some(now)) => now,
            // Still changing after five readings: the generation moved, so the watchdog
            // checks again on its next round.
            Ok(None) => return Ok(true),
            // Netlink refused (it should not, with the agent's capabilities): list instead.
            Err(_) => return self.intact_by_listing(),
        };
        match reference {
            Some(reference) => Ok(now == reference),
            None if now.counts() != nft::object_counts(self.options) => Ok(false),
            // A table this backend did not load (an agent restarted with its table in
            // place): compared with the rendered rules once, by listing, then by shape.
            None => {
                let intact = self.intact_by_listing()?;
                if intact {
                    *self.loaded() = Some(now);
                }
                Ok(intact)
            }
        }
    }

    fn teardown(&self) -> Result<(), FirewallError> {
        *self.loaded() = None;
        self.apply(
            format!("deleting table inet {}", self.table),
            &nft::teardown(&self.table),
        )
    }

    fn generation(&self) -> Option<u32> {
        crate::netlink::ruleset_generation().ok()
    }
}

/// Which `iptables` commands: the node's default (`iptables`, as its alternatives pick),
/// or one flavour's own (`iptables-legacy`, `iptables-nft`). Rules must go where the
/// node's other rules are: the two flavours do not see each other's rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IptablesFlavour {
    /// `iptables-restore`, `iptables-save`, ...
    #[default]
    System,
    /// `iptables-legacy-restore`, ...
    Legacy,
    /// `iptables-nft-restore`, ...
    Nft,
}

/// iptables: chains `RANDPORT-*` in the nat table, IPv4 and IPv6.
#[derive(Debug, Clone, Copy, Default)]
pub struct IptablesFirewall {
    flavour: IptablesFlavour,
}

const FAMILIES: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

/// The (restore, save) programs of `family` in `flavour`.
fn tools(family: IpFamily, flavour: IptablesFlavour) -> (&'static str, &'static str) {
    use IptablesFlavour::*;
    match (family, flavour) {
        (IpFamily::V4, System) => ("iptables-restore", "iptables-save"),
        (IpFamily::V6, System) => ("ip6tables-restore", "ip6tables-save"),
        (IpFamily::V4, Legacy) => ("iptables-legacy-restore", "iptables-legacy-save"),
        (IpFamily::V6, Legacy) => ("ip6tables-legacy-restore", "ip6tables-legacy-save"),
        (IpFamily::V4, Nft) => ("iptables-nft-restore", "iptables-nft-save"),
        (IpFamily::V6, Nft) => ("ip6tables-nft-restore", "ip6tables-nft-save"),
    }
}

impl IptablesFirewall {
    /// The backend with `flavour`'s commands.
    pub const fn new(flavour: IptablesFlavour) -> Self {
        IptablesFirewall { flavour }
    }

    fn err(what: impl Into<String>, reason: String) -> FirewallError {
        FirewallError {
            backend: "iptables",
            what: what.into(),
            reason,
        }
    }

    fn restore(&self, family: IpFamily, what: &str, payload: &str) -> Result<(), FirewallError> {
        run(tools(family, self.flavour).0, &["--noflush"], payload)
            .map(drop)
            .map_err(|reason| Self::err(what, reason))
    }

    fn save(&self, family: IpFamily) -> Result<String, FirewallError> {
        run(tools(family, self.flavour).1, &["-t", "nat"], "")
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
            let missing = Self::missing_jumps(&self.save(family)?, family);
            let payload = iptables::full_payload(family, records, &missing);
            self.restore(
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
                self.restore(
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
            self.restore(
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
                if self.restore(family, "removing mappings", &payload).is_err() {
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
            let found = self
                .save(family)?
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
            let saved = self.save(family)?;
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
            let saved = match self.save(family) {
                Ok(saved) => saved,
                // No iptables on this node: nothing of ours can be there.
                Err(e) if e.reason.starts_with("cannot run") => continue,
                Err(e) => return Err(e),
            };
            if !saved.contains(&format!(":{}", iptables::HOSTPORTS_CHAIN)) {
                continue;
            }
            let payload = iptables::teardown_payload(&Self::present_jumps(&saved, family));
            self.restore(family, "removing our chains", &payload)?;
        }
        Ok(())
    }

    /// Only with the nf_tables flavour of iptables: the legacy one changes rules without
    /// touching the nftables generation.
    fn generation(&self) -> Option<u32> {
        static NF_TABLES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let flavour = self.flavour;
        let nf_tables = NF_TABLES.get_or_init(|| {
            FAMILIES.iter().all(|family| {
                run(tools(*family, flavour).1, &["--version"], "")
                    .is_ok_and(|v| v.contains("nf_tables"))
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
    /// When set, `replace_all` fails (a kernel that refuses our rules).
    pub fail_replace: std::sync::atomic::AtomicBool,
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
        if self.fail_replace.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(FirewallError {
                backend: "fake",
                what: "replace_all".into(),
                reason: "injected failure".into(),
            });
        }
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

#[cfg(test)]
mod preflight_tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// A node's programs: what each (program and first arg) prints, or its error.
    struct FakeTools {
        answers: HashMap<&'static str, Result<String, String>>,
        calls: Mutex<Vec<String>>,
    }

    impl FakeTools {
        fn new(answers: &[(&'static str, Result<&str, &str>)]) -> Self {
            FakeTools {
                answers: answers
                    .iter()
                    .map(|(k, v)| (*k, v.map(str::to_owned).map_err(str::to_owned)))
                    .collect(),
                calls: Mutex::new(Vec::new()),
            }
        }

        fn run(&self, program: &str, args: &[&str], input: &str) -> Result<String, String> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("{program} {}", args.join(" ")));
            if program == "nft" {
                assert!(input.contains("table inet randport"), "{input}");
            }
            self.answers
                .get(program)
                .cloned()
                .unwrap_or_else(|| Err(format!("cannot run {program}: not installed")))
        }
    }

    fn choose(tools: &FakeTools, requested: Backend) -> Preflight {
        preflight(requested, false, &|p, a, i| tools.run(p, a, i))
    }

    const KUBE_NFT: &str = "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n";

    #[test]
    fn nftables_is_used_when_the_kernel_takes_a_check_load_of_the_ruleset() {
        let tools = FakeTools::new(&[("nft", Ok(""))]);
        let choice = choose(&tools, Backend::Nftables);
        assert_eq!(choice.backend, Backend::Nftables);
        assert_eq!(choice.fell_back, None);
        assert_eq!(*tools.calls.lock().unwrap(), vec!["nft -c -f -".to_owned()]);
    }

    #[test]
    fn a_refused_ruleset_falls_back_to_iptables_and_says_why() {
        let tools = FakeTools::new(&[
            (
                "nft",
                Err("Error: Could not process rule: No such file or directory"),
            ),
            ("iptables-nft-save", Ok(KUBE_NFT)),
            ("ip6tables-nft-save", Ok("")),
            ("iptables-legacy-save", Ok("")),
            ("ip6tables-legacy-save", Ok("")),
        ]);
        let choice = choose(&tools, Backend::Nftables);
        assert_eq!(choice.backend, Backend::Iptables);
        assert_eq!(choice.flavour, IptablesFlavour::Nft);
        assert!(choice.fell_back.unwrap().contains("Could not process rule"));
        // nft missing altogether is a refusal too.
        let tools = FakeTools::new(&[]);
        let choice = choose(&tools, Backend::Nftables);
        assert_eq!(choice.backend, Backend::Iptables);
        assert!(choice.fell_back.unwrap().contains("cannot run nft"));
        assert_eq!(choice.flavour, IptablesFlavour::System);
    }

    #[test]
    fn iptables_goes_where_the_nodes_rules_are() {
        let rules = |n: usize| "-A KUBE-SERVICES -j ACCEPT\n".repeat(n);
        let (many, few) = (rules(5), rules(1));
        // Asked for iptables: no nft check at all.
        let case = |legacy: &str, nft: &str| {
            let tools = FakeTools::new(&[
                ("iptables-legacy-save", Ok(legacy)),
                ("ip6tables-legacy-save", Ok("")),
                ("iptables-nft-save", Ok(nft)),
                ("ip6tables-nft-save", Ok("")),
            ]);
            let choice = choose(&tools, Backend::Iptables);
            assert!(
                !tools
                    .calls
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|c| c.starts_with("nft"))
            );
            assert_eq!(choice.fell_back, None);
            (choice.backend, choice.flavour)
        };
        use IptablesFlavour::*;
        assert_eq!(case(&many, &few), (Backend::Iptables, Legacy));
        assert_eq!(case(&few, &many), (Backend::Iptables, Nft));
        // kube's hint chain wins over counts.
        assert_eq!(case(&many, KUBE_NFT), (Backend::Iptables, Nft));
        let legacy_hint = format!("{KUBE_NFT}{few}");
        assert_eq!(case(&legacy_hint, &many), (Backend::Iptables, Legacy));
        // A tie: the node's own `iptables`.
        assert_eq!(case(&few, &few), (Backend::Iptables, System));
        // One flavour installed: that one; none: the node's `iptables`.
        let only_legacy = FakeTools::new(&[
            ("iptables-legacy-save", Ok("")),
            ("ip6tables-legacy-save", Ok("")),
        ]);
        assert_eq!(choose(&only_legacy, Backend::Iptables).flavour, Legacy);
        assert_eq!(
            choose(&FakeTools::new(&[]), Backend::Iptables).flavour,
            System
        );
    }

    #[test]
    fn each_flavour_runs_its_own_commands() {
        assert_eq!(
            tools(IpFamily::V4, IptablesFlavour::System).0,
            "iptables-restore"
        );
        assert_eq!(
            tools(IpFamily::V6, IptablesFlavour::Legacy).1,
            "ip6tables-legacy-save"
        );
        assert_eq!(
            tools(IpFamily::V4, IptablesFlavour::Nft).0,
            "iptables-nft-restore"
        );
    }
}
