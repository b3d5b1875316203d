//! Flushing stale conntrack entries: a UDP or SCTP flow that reached a host port before
//! its mapping changed would otherwise keep going where it went. Flushed by protocol,
//! host port and (when set) host IP, after the rules change, on ADD and DEL.

use std::process::Command;

use randport_core::{IpFamily, PortKey, Protocol};

/// A flush that failed.
#[derive(Debug, thiserror::Error)]
#[error("conntrack flush of {port}/{key} failed: {reason}; is the conntrack tool installed?")]
pub struct ConntrackError {
    /// Protocol and address.
    pub key: PortKey,
    /// The port.
    pub port: u16,
    /// What went wrong.
    pub reason: String,
}

/// Removes conntrack entries.
pub trait Conntrack: Send + Sync {
    /// Removes the entries of flows sent to `port` for `key`, both families unless the
    /// key's host IP picks one.
    fn flush(&self, key: PortKey, port: u16) -> Result<(), ConntrackError>;
}

/// Whether entries of `protocol` need flushing (TCP flows end on their own).
pub fn needs_flush(protocol: Protocol) -> bool {
    matches!(protocol, Protocol::Udp | Protocol::Sctp)
}

/// The `conntrack` command line tool.
#[derive(Debug, Default, Clone, Copy)]
pub struct ConntrackTool;

impl Conntrack for ConntrackTool {
    fn flush(&self, key: PortKey, port: u16) -> Result<(), ConntrackError> {
        let families: &[IpFamily] = match key.host_ip.as_ref().map(IpFamily::of) {
            Some(IpFamily::V4) => &[IpFamily::V4],
            Some(IpFamily::V6) => &[IpFamily::V6],
            None => &[IpFamily::V4, IpFamily::V6],
        };
        for family in families {
            let mut cmd = Command::new("conntrack");
            cmd.args([
                "-D",
                "-f",
                if *family == IpFamily::V4 {
                    "ipv4"
                } else {
                    "ipv6"
                },
            ]);
            cmd.args([
                "-p",
                key.protocol.as_lower(),
                "--orig-port-dst",
                &port.to_string(),
            ]);
            if let Some(ip) = key.host_ip {
                cmd.args(["--orig-dst", &ip.to_string()]);
            }
            let out = cmd.output().map_err(|e| ConntrackError {
                key,
                port,
                reason: e.to_string(),
            })?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            // Exit 1 with "0 flow entries have been deleted" means there was nothing to do.
            if !out.status.success() && !stderr.contains("0 flow entries") {
                return Err(ConntrackError {
                    key,
                    port,
                    reason: stderr.trim().to_owned(),
                });
            }
        }
        Ok(())
    }
}

/// Records every flush; for tests.
#[derive(Debug, Default)]
pub struct FakeConntrack {
    /// Every (key, port) flushed, in order.
    pub flushed: std::sync::Mutex<Vec<(PortKey, u16)>>,
}

impl Conntrack for FakeConntrack {
    fn flush(&self, key: PortKey, port: u16) -> Result<(), ConntrackError> {
        self.flushed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((key, port));
        Ok(())
    }
}

impl<T: Conntrack + ?Sized> Conntrack for std::sync::Arc<T> {
    fn flush(&self, key: PortKey, port: u16) -> Result<(), ConntrackError> {
        (**self).flush(key, port)
    }
}
