//! What the node's kernel says about ports: `ip_local_reserved_ports` (never handed out)
//! and `ip_local_port_range` (the ephemeral range, which the port range should avoid).

use std::fs;
use std::path::PathBuf;

use randport_core::range::ReservedPortsError;
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
