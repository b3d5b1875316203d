//! The node's kernel settings randport reads or changes: `ip_local_reserved_ports` (never
//! handed out), `ip_local_port_range` (the ephemeral range, which the port range should
//! avoid) and `route_localnet` (turned on for `--localhost-access`, and off again).

use std::fs;
use std::path::PathBuf;

use randport_core::range::ReservedPortsError;

use crate::firewall::Tool as _;
use randport_core::{PortRange, ReservedPorts};

/// Where the kernel publishes its port settings.
pub const DEFAULT_SYSCTL_DIR: &str = "/proc/sys/net/ipv4";

/// A port setting of the node that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum NodePortsError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `ip_local_reserved_ports` is not in the kernel's format.
    #[error("{path}: {source}")]
    Reserved {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: ReservedPortsError,
    },
    /// `ip_local_port_range` is not two port numbers.
    #[error("{path}: {text:?} is not two port numbers")]
    Ephemeral {
        /// The file.
        path: PathBuf,
        /// What it holds.
        text: String,
    },
}

/// The node's port settings, read from a sysctl directory (`/proc/sys/net/ipv4` on a
/// node; any directory with the same two files in tests).
#[derive(Debug, Clone)]
pub struct NodePorts {
    dir: PathBuf,
}

impl Default for NodePorts {
    fn default() -> Self {
        NodePorts::new(DEFAULT_SYSCTL_DIR)
    }
}

impl NodePorts {
    /// Reads from `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        NodePorts { dir: dir.into() }
    }

    fn read(&self, name: &str) -> Result<(PathBuf, String), NodePortsError> {
        let path = self.dir.join(name);
        let text = fs::read_to_string(&path).map_err(|source| NodePortsError::Read {
            path: path.clone(),
            source,
        })?;
        Ok((path, text))
    }

    /// The ports listed in `ip_local_reserved_ports`.
    pub fn reserved(&self) -> Result<ReservedPorts, NodePortsError> {
        let (path, text) = self.read("ip_local_reserved_ports")?;
        ReservedPorts::parse(&text).map_err(|source| NodePortsError::Reserved { path, source })
    }

    /// The kernel's ephemeral port range, `ip_local_port_range`.
    pub fn ephemeral(&self) -> Result<PortRange, NodePortsError> {
        let (path, text) = self.read("ip_local_port_range")?;
        parse_ephemeral(&text).ok_or(NodePortsError::Ephemeral {
            path,
            text: text.trim().to_owned(),
        })
    }
}

fn parse_ephemeral(text: &str) -> Option<PortRange> {
    let mut parts = text.split_whitespace().map(str::parse::<u16>);
    match (parts.next(), parts.next(), parts.next()) {
        (Some(Ok(lo)), Some(Ok(hi)), None) => PortRange::new(lo, hi).ok(),
        _ => None,
    }
}

/// A warning for the operator when `range` overlaps the ephemeral range: random host ports
/// would then compete with the source ports of outgoing connections.
pub fn overlap_warning(range: PortRange, ephemeral: PortRange) -> Option<String> {
    let lo = range.lo().max(ephemeral.lo());
    let hi = range.hi().min(ephemeral.hi());
    (lo <= hi).then(|| {
        format!(
            "port range {range} overlaps the kernel's ephemeral range {ephemeral} \
             (net.ipv4.ip_local_port_range) on {lo}-{hi}: outgoing connections may take \
             ports randport wants; move --port-range out of it or add it to \
             net.ipv4.ip_local_reserved_ports"
        )
    })
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
    crate::firewall::tool::SYSTEM
        .run("iptables-save", &["-t", "filter"], "")
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sysctl_dir(reserved: &str, ephemeral: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "randport-node-ports-{}-{}",
            std::process::id(),
            fastrand_suffix(reserved, ephemeral)
        ));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("ip_local_reserved_ports"), reserved).unwrap();
        fs::write(dir.join("ip_local_port_range"), ephemeral).unwrap();
        dir
    }

    fn fastrand_suffix(a: &str, b: &str) -> String {
        randport_core::SandboxId(format!("{a}|{b}")).short_hash()
    }

    #[test]
    fn reads_the_kernel_files() {
        let dir = sysctl_dir("20005,21000-21002\n", "32768\t60999\n");
        let node = NodePorts::new(&dir);
        let reserved = node.reserved().unwrap();
        assert_eq!(reserved.len(), 4);
        assert!(reserved.contains(21001));
        assert_eq!(
            node.ephemeral().unwrap(),
            PortRange::new(32768, 60999).unwrap()
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_files_name_the_file() {
        let dir = sysctl_dir("80,oops\n", "32768\n");
        let node = NodePorts::new(&dir);
        let err = node.reserved().unwrap_err().to_string();
        assert!(
            err.contains("ip_local_reserved_ports") && err.contains("\"oops\""),
            "{err}"
        );
        let err = node.ephemeral().unwrap_err().to_string();
        assert!(
            err.ends_with("ip_local_port_range: \"32768\" is not two port numbers"),
            "{err}"
        );
        let missing = NodePorts::new(dir.join("nope"))
            .reserved()
            .unwrap_err()
            .to_string();
        assert!(
            missing.starts_with("cannot read ") && missing.contains("nope/ip_local_reserved_ports")
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn this_node_can_be_read() {
        // Every Linux host has these; the test proves the real paths and format.
        let node = NodePorts::default();
        node.reserved().unwrap();
        assert!(node.ephemeral().unwrap().len() > 1);
    }

    #[test]
    fn overlap_is_reported_with_the_overlapping_part() {
        let ephemeral = PortRange::new(32768, 60999).unwrap();
        assert_eq!(overlap_warning(PortRange::DEFAULT, ephemeral), None);
        let warning = overlap_warning(PortRange::new(30000, 40000).unwrap(), ephemeral).unwrap();
        assert!(warning.starts_with(
            "port range 30000-40000 overlaps the kernel's ephemeral range 32768-60999"
        ));
        assert!(warning.contains("on 32768-40000"));
    }
}

#[cfg(test)]
mod route_localnet_tests {
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
