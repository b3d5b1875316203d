//! Flushing stale conntrack entries: a UDP or SCTP flow that reached a host port before
//! its mapping changed would otherwise keep going where it went. Flushed by protocol,
//! host port and (when set) host IP, after the rules change, on ADD and DEL.
//!
//! [`NetlinkConntrack`] (the agent's) talks ctnetlink directly: one dump, then one delete
//! per matching entry, no process started. [`ConntrackTool`] runs the `conntrack` command
//! (about 10 ms a call here) and stays for comparison and as a fallback.

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
    fn flush(&self, key: PortKey, port: u16) -> Result<(), ConntrackError> {
        self.flush_stale(key, port, &[])
    }

    /// After an ADD: removes the entries of flows sent to `port` for `key` except those
    /// already translated to one of `pods` (their replies come from the pod): those
    /// are flows through the new mapping, which a flush running a moment after the ADD
    /// answered must not cut. Implementations that cannot tell remove them all.
    fn flush_stale(
        &self,
        key: PortKey,
        port: u16,
        pods: &[std::net::SocketAddr],
    ) -> Result<(), ConntrackError>;

    /// [`Conntrack::flush`] of only the address families in `families` (those the pod
    /// has: each family is one walk of the kernel's table). Implementations that cannot
    /// tell flush them all.
    fn flush_in(
        &self,
        key: PortKey,
        port: u16,
        families: &[IpFamily],
    ) -> Result<(), ConntrackError> {
        let _ = families;
        self.flush(key, port)
    }
}

/// Whether entries of `protocol` need flushing (TCP flows end on their own).
pub fn needs_flush(protocol: Protocol) -> bool {
    matches!(protocol, Protocol::Udp | Protocol::Sctp)
}

/// The `conntrack` command line tool.
#[derive(Debug, Default, Clone, Copy)]
pub struct ConntrackTool;

impl Conntrack for ConntrackTool {
    /// The tool cannot select entries by their reply direction: it removes them all.
    fn flush_stale(
        &self,
        key: PortKey,
        port: u16,
        _pods: &[std::net::SocketAddr],
    ) -> Result<(), ConntrackError> {
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

/// One queued flush: the port, the pod addresses whose flows stay (after an ADD), the log
/// context.
type Flush = (PortKey, u16, Vec<std::net::SocketAddr>, String);

/// Runs the flushes after an ADD on a worker thread, in order, so that ADD answers without
/// waiting for them (flows that predate the mapping). Each is queued after its rule change,
/// so it still runs after the rules are in. A DEL flushes at once ([`ConntrackQueue::flush_now`]),
/// and queues a flush here only when that failed.
pub struct ConntrackQueue {
    tx: std::sync::Mutex<std::sync::mpsc::Sender<Flush>>,
    pending: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    conntrack: std::sync::Arc<dyn Conntrack>,
}

impl std::fmt::Debug for ConntrackQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ConntrackQueue({} pending)", self.pending())
    }
}

impl ConntrackQueue {
    /// Starts the worker; it ends when the queue is dropped.
    pub fn spawn(conntrack: Box<dyn Conntrack>) -> Self {
        use std::sync::atomic::Ordering;
        let conntrack: std::sync::Arc<dyn Conntrack> = std::sync::Arc::from(conntrack);
        let shared = std::sync::Arc::clone(&conntrack);
        let (tx, rx) = std::sync::mpsc::channel::<Flush>();
        let pending = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = std::sync::Arc::clone(&pending);
        std::thread::spawn(move || {
            for (key, port, keep, context) in rx {
                if let Err(e) = shared.flush_stale(key, port, &keep) {
                    tracing::warn!(context = %context, error = %e, "conntrack flush failed");
                }
                counter.fetch_sub(1, Ordering::SeqCst);
            }
        });
        ConntrackQueue {
            tx: std::sync::Mutex::new(tx),
            pending,
            conntrack,
        }
    }

    /// Flushes every flow of `families` to `port` for `key` now, on the caller's thread (a
    /// DEL answers only after its stale UDP/SCTP flows are gone).
    pub fn flush_now(
        &self,
        key: PortKey,
        port: u16,
        families: &[IpFamily],
    ) -> Result<(), ConntrackError> {
        self.conntrack.flush_in(key, port, families)
    }

    /// Queues a flush of `port` for `key`, keeping flows already translated to `keep`
    /// (see [`Conntrack::flush_stale`]); `context` names the pod for the log.
    pub fn enqueue(
        &self,
        key: PortKey,
        port: u16,
        keep: Vec<std::net::SocketAddr>,
        context: String,
    ) {
        self.pending
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let sent = self
            .tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send((key, port, keep, context));
        if sent.is_err() {
            self.pending
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Flushes queued and not yet done.
    pub fn pending(&self) -> usize {
        self.pending.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until every queued flush is done, at most `timeout`; true if they are.
    pub fn wait_idle(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while self.pending() > 0 {
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        true
    }
}

/// ctnetlink over a netlink socket in the agent's network namespace.
#[derive(Debug, Default, Clone, Copy)]
pub struct NetlinkConntrack;

mod nl {
    //! ctnetlink: just enough to dump the table and delete entries.

    pub(crate) use crate::netfilter::netlink::{
        NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, attrs, find, message,
        messages,
    };
    /// NFNL_SUBSYS_CTNETLINK << 8.
    pub const CTNETLINK: u16 = 1 << 8;
    pub const IPCTNL_MSG_CT_NEW: u16 = 0;
    pub const IPCTNL_MSG_CT_GET: u16 = 1;
    pub const IPCTNL_MSG_CT_DELETE: u16 = 2;
    pub const CTA_TUPLE_ORIG: u16 = 1;
    pub const CTA_TUPLE_REPLY: u16 = 2;
    pub const CTA_IP_V4_SRC: u16 = 1;
    pub const CTA_IP_V6_SRC: u16 = 3;
    pub const CTA_TUPLE_IP: u16 = 1;
    pub const CTA_TUPLE_PROTO: u16 = 2;
    pub const CTA_IP_V4_DST: u16 = 2;
    pub const CTA_IP_V6_DST: u16 = 4;
    pub const CTA_PROTO_NUM: u16 = 1;
    pub const CTA_PROTO_SRC_PORT: u16 = 2;
    pub const CTA_PROTO_DST_PORT: u16 = 3;
    /// Kernel-side filtering of a dump (Linux 5.8 on): which fields of CTA_TUPLE_ORIG
    /// an entry must match.
    pub const CTA_FILTER: u16 = 25;
    pub const CTA_FILTER_ORIG_FLAGS: u16 = 1;
    pub const CTA_FILTER_FLAG_CTA_IP_DST: u32 = 1 << 1;
    pub const CTA_FILTER_FLAG_CTA_PROTO_NUM: u32 = 1 << 3;
    pub const CTA_FILTER_FLAG_CTA_PROTO_DST_PORT: u32 = 1 << 5;
    pub const NLA_F_NESTED: u16 = 1 << 15;
    pub const AF_INET: u8 = 2;
    pub const AF_INET6: u8 = 10;
}

/// The body of a ctnetlink dump that the kernel filters itself: only the entries of
/// `family` whose original direction goes to `proto`/`port` (and `host_ip`, when set).
/// Kernels before 5.8 ignore the filter and send every entry; the caller checks each
/// entry anyway.
pub(crate) fn filtered_dump_body(
    proto: u8,
    port: u16,
    host_ip: Option<std::net::IpAddr>,
) -> Vec<u8> {
    use crate::netfilter::netlink::attr;
    let nested = |kind: u16, parts: &[Vec<u8>]| attr(kind | nl::NLA_F_NESTED, &parts.concat());
    let mut tuple = Vec::new();
    let mut flags = nl::CTA_FILTER_FLAG_CTA_PROTO_NUM | nl::CTA_FILTER_FLAG_CTA_PROTO_DST_PORT;
    if let Some(ip) = host_ip {
        flags |= nl::CTA_FILTER_FLAG_CTA_IP_DST;
        let ip_attr = match ip {
            std::net::IpAddr::V4(v4) => attr(nl::CTA_IP_V4_DST, &v4.octets()),
            std::net::IpAddr::V6(v6) => attr(nl::CTA_IP_V6_DST, &v6.octets()),
        };
        tuple.push(nested(nl::CTA_TUPLE_IP, &[ip_attr]));
    }
    tuple.push(nested(
        nl::CTA_TUPLE_PROTO,
        &[
            attr(nl::CTA_PROTO_NUM, &[proto]),
            attr(nl::CTA_PROTO_DST_PORT, &port.to_be_bytes()),
        ],
    ));
    [
        nested(nl::CTA_TUPLE_ORIG, &tuple),
        nested(
            nl::CTA_FILTER,
            &[attr(nl::CTA_FILTER_ORIG_FLAGS, &flags.to_ne_bytes())],
        ),
    ]
    .concat()
}

impl NetlinkConntrack {
    /// The original-direction tuples (with their nfgenmsg family) of every entry for
    /// `port` and `key`, except those whose replies come from one of `keep`: one dump per
    /// address family, filtered by the kernel (so a flush costs about the same with
    /// 100,000 unrelated entries as with none), and each entry checked here too.
    fn matching(
        socket: &std::os::fd::OwnedFd,
        key: PortKey,
        port: u16,
        keep: &[std::net::SocketAddr],
        families: &[IpFamily],
    ) -> std::io::Result<Vec<(u8, Vec<u8>)>> {
        let families: Vec<u8> = families
            .iter()
            .filter(|f| key.host_ip.is_none_or(|ip| IpFamily::of(&ip) == **f))
            .map(|f| match f {
                IpFamily::V4 => nl::AF_INET,
                IpFamily::V6 => nl::AF_INET6,
            })
            .collect();
        let mut found = Vec::new();
        for (seq, family) in families.iter().enumerate() {
            found.extend(Self::matching_in(
                socket,
                *family,
                seq as u32 + 1,
                key,
                port,
                keep,
            )?);
        }
        Ok(found)
    }

    fn matching_in(
        socket: &std::os::fd::OwnedFd,
        family: u8,
        seq: u32,
        key: PortKey,
        port: u16,
        keep: &[std::net::SocketAddr],
    ) -> std::io::Result<Vec<(u8, Vec<u8>)>> {
        use std::os::fd::AsRawFd;
        let proto: u8 = match key.protocol {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        };
        let request = nl::message(
            nl::CTNETLINK | nl::IPCTNL_MSG_CT_GET,
            nl::NLM_F_REQUEST | nl::NLM_F_DUMP,
            seq,
            family,
            &filtered_dump_body(proto, port, key.host_ip),
        );
        let to = nix::sys::socket::NetlinkAddr::new(0, 0);
        nix::sys::socket::sendto(
            socket.as_raw_fd(),
            &request,
            &to,
            nix::sys::socket::MsgFlags::empty(),
        )?;
        let mut found = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = nix::sys::socket::recv(
                socket.as_raw_fd(),
                &mut buf,
                nix::sys::socket::MsgFlags::empty(),
            )?;
            for (kind, body) in nl::messages(&buf[..n]) {
                match kind {
                    nl::NLMSG_DONE => return Ok(found),
                    nl::NLMSG_ERROR => {
                        let errno = crate::netfilter::netlink::error_code(body);
                        if errno != 0 {
                            return Err(std::io::Error::from_raw_os_error(-errno));
                        }
                        return Ok(found);
                    }
                    k if k == nl::CTNETLINK | nl::IPCTNL_MSG_CT_NEW && body.len() >= 4 => {
                        let family = body[0];
                        let top = nl::attrs(&body[4..]);
                        let Some(orig) = top.iter().find(|a| a.0 == nl::CTA_TUPLE_ORIG) else {
                            continue;
                        };
                        let tuple = nl::attrs(orig.2);
                        let proto_attrs = nl::find(&tuple, nl::CTA_TUPLE_PROTO)
                            .map(nl::attrs)
                            .unwrap_or_default();
                        let ip_attrs = nl::find(&tuple, nl::CTA_TUPLE_IP)
                            .map(nl::attrs)
                            .unwrap_or_default();
                        let num = nl::find(&proto_attrs, nl::CTA_PROTO_NUM)
                            .and_then(|b| b.first().copied());
                        let dport = nl::find(&proto_attrs, nl::CTA_PROTO_DST_PORT)
                            .filter(|b| b.len() >= 2)
                            .map(|b| u16::from_be_bytes([b[0], b[1]]));
                        let dst: Option<std::net::IpAddr> = nl::find(&ip_attrs, nl::CTA_IP_V4_DST)
                            .and_then(|b| <[u8; 4]>::try_from(b).ok().map(std::net::IpAddr::from))
                            .or_else(|| {
                                nl::find(&ip_attrs, nl::CTA_IP_V6_DST).and_then(|b| {
                                    <[u8; 16]>::try_from(b).ok().map(std::net::IpAddr::from)
                                })
                            });
                        if num == Some(proto)
                            && dport == Some(port)
                            && key.host_ip.is_none_or(|ip| Some(ip) == dst)
                            && !reply_source(&top).is_some_and(|src| keep.contains(&src))
                        {
                            found.push((family, orig.1.to_vec()));
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

/// The source of an entry's reply direction (the DNAT target, for a mapped flow).
fn reply_source(top: &[(u16, &[u8], &[u8])]) -> Option<std::net::SocketAddr> {
    let reply = nl::attrs(nl::find(top, nl::CTA_TUPLE_REPLY)?);
    let ip = nl::attrs(nl::find(&reply, nl::CTA_TUPLE_IP)?);
    let proto = nl::attrs(nl::find(&reply, nl::CTA_TUPLE_PROTO)?);
    let port = nl::find(&proto, nl::CTA_PROTO_SRC_PORT)
        .and_then(|b| <[u8; 2]>::try_from(b).ok())
        .map(u16::from_be_bytes)?;
    let ip = nl::find(&ip, nl::CTA_IP_V4_SRC)
        .and_then(|b| <[u8; 4]>::try_from(b).ok().map(std::net::IpAddr::from))
        .or_else(|| {
            nl::find(&ip, nl::CTA_IP_V6_SRC)
                .and_then(|b| <[u8; 16]>::try_from(b).ok().map(std::net::IpAddr::from))
        })?;
    Some(std::net::SocketAddr::new(ip, port))
}

impl Conntrack for NetlinkConntrack {
    fn flush_stale(
        &self,
        key: PortKey,
        port: u16,
        pods: &[std::net::SocketAddr],
    ) -> Result<(), ConntrackError> {
        self.flush_with(key, port, pods, &[IpFamily::V4, IpFamily::V6])
    }

    fn flush_in(
        &self,
        key: PortKey,
        port: u16,
        families: &[IpFamily],
    ) -> Result<(), ConntrackError> {
        self.flush_with(key, port, &[], families)
    }
}

impl NetlinkConntrack {
    fn flush_with(
        &self,
        key: PortKey,
        port: u16,
        pods: &[std::net::SocketAddr],
        families: &[IpFamily],
    ) -> Result<(), ConntrackError> {
        use nix::sys::socket::{MsgFlags, NetlinkAddr, recv, sendto};
        use std::os::fd::AsRawFd;
        let fail = |e: &dyn std::fmt::Display| ConntrackError {
            key,
            port,
            reason: format!("ctnetlink: {e}"),
        };
        let sock = crate::netfilter::netlink::socket().map_err(|e| fail(&e))?;
        let entries = Self::matching(&sock, key, port, pods, families).map_err(|e| fail(&e))?;
        let to = NetlinkAddr::new(0, 0);
        let mut buf = vec![0u8; 8192];
        for (seq, (family, tuple)) in entries.iter().enumerate() {
            let msg = nl::message(
                nl::CTNETLINK | nl::IPCTNL_MSG_CT_DELETE,
                nl::NLM_F_REQUEST | nl::NLM_F_ACK,
                seq as u32 + 3,
                *family,
                tuple,
            );
            sendto(sock.as_raw_fd(), &msg, &to, MsgFlags::empty()).map_err(|e| fail(&e))?;
            let n = recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(|e| fail(&e))?;
            for (kind, body) in nl::messages(&buf[..n]) {
                if kind == nl::NLMSG_ERROR {
                    let errno = crate::netfilter::netlink::error_code(body);
                    // Gone already (it timed out meanwhile) is what we wanted.
                    if errno != 0 && -errno != nix::libc::ENOENT {
                        return Err(fail(&std::io::Error::from_raw_os_error(-errno)));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Records every flush; for tests.
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Default)]
pub struct FakeConntrack {
    /// Every (key, port) flushed, in order.
    pub flushed: std::sync::Mutex<Vec<(PortKey, u16)>>,
    /// The pod addresses each flush kept, in the same order (empty after a DEL).
    pub kept: std::sync::Mutex<Vec<Vec<std::net::SocketAddr>>>,
    /// Where a flush stops while closed.
    pub gate: crate::testing::Gate,
}

#[cfg(any(test, feature = "testing"))]
impl Conntrack for FakeConntrack {
    fn flush_stale(
        &self,
        key: PortKey,
        port: u16,
        pods: &[std::net::SocketAddr],
    ) -> Result<(), ConntrackError> {
        self.gate.pass();
        self.flushed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((key, port));
        self.kept
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(pods.to_vec());
        Ok(())
    }
}

impl<T: Conntrack + ?Sized> Conntrack for std::sync::Arc<T> {
    fn flush_stale(
        &self,
        key: PortKey,
        port: u16,
        pods: &[std::net::SocketAddr],
    ) -> Result<(), ConntrackError> {
        (**self).flush_stale(key, port, pods)
    }
}
