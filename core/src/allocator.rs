//! Random free host ports per (protocol, hostIP), never one port twice.
//!
//! A port held on all node addresses (no hostIP) conflicts with the same port on any
//! single address, and the other way round, as the kernel's bind rules have it. Random
//! picks are tried first, so an allocation costs O(1) while the range is mostly free; when
//! they keep hitting used ports the allocator scans the whole range once from a random
//! offset, so it always ends, and reports exhaustion only when no port is left.
//!
//! Each candidate is offered to a *probe* before it is handed out: the agent's probe binds
//! the port for real and keeps the socket, so a port some other process holds is skipped.
//!
//! ```
//! use randport_core::{HostPortAllocator, PortKey, PortRange, Protocol, ReservedPorts};
//!
//! let range: PortRange = "20000-20009".parse().unwrap();
//! let mut alloc = HostPortAllocator::new(range, ReservedPorts::parse("20000-20004").unwrap());
//! let mut rng = fastrand::Rng::with_seed(7);
//! let key = PortKey::any(Protocol::Tcp);
//! let port = alloc.allocate(key, &mut rng, |_, _| true).unwrap();
//! assert!((20005..=20009).contains(&port));
//! assert!(!alloc.is_free(key, port));
//! ```

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;

use crate::model::Protocol;
use crate::range::{PortRange, PortSet, ReservedPorts};

/// Random picks tried before the allocator falls back to a scan of the range.
const RANDOM_TRIES: usize = 32;

/// What a host port is allocated for: a protocol, on one node address or on all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    /// The protocol.
    pub protocol: Protocol,
    /// The node address; `None` for all of them.
    pub host_ip: Option<IpAddr>,
}

impl PortKey {
    /// A key for all node addresses.
    pub fn any(protocol: Protocol) -> Self {
        PortKey {
            protocol,
            host_ip: None,
        }
    }

    /// A key for one node address; an unspecified address (`0.0.0.0`, `::`) means all.
    pub fn on(protocol: Protocol, host_ip: Option<IpAddr>) -> Self {
        PortKey {
            protocol,
            host_ip: host_ip.filter(|ip| !ip.is_unspecified()),
        }
    }
}

impl fmt::Display for PortKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host_ip {
            Some(ip) => write!(f, "{} on {ip}", self.protocol),
            None => write!(f, "{}", self.protocol),
        }
    }
}

/// An allocation that cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// No free port is left in the range.
    #[error(
        "no free {key} host port in range {range}: {in_use} of its {size} ports are mapped, \
         {reserved} are reserved by the node and {refused} are held by other processes; \
         widen the port range or remove pods that use it"
    )]
    Exhausted {
        /// What was asked for.
        key: PortKey,
        /// The range.
        range: PortRange,
        /// Ports of the range mapped by randport (for this key).
        in_use: usize,
        /// Ports of the range the node reserves.
        reserved: usize,
        /// Free ports the probe refused (another process holds them).
        refused: usize,
        /// Ports in the range.
        size: usize,
    },
    /// The port is already mapped.
    #[error("host port {port}/{key} is already mapped for another pod")]
    InUse {
        /// What was asked for.
        key: PortKey,
        /// The port.
        port: u16,
    },
}

/// One protocol's allocations.
#[derive(Debug)]
struct ProtocolUse {
    /// Ports held on all node addresses.
    wildcard: PortSet,
    /// Ports held on single addresses.
    by_ip: HashMap<IpAddr, PortSet>,
    /// For each port held on any single address, on how many.
    by_ip_count: HashMap<u16, u32>,
}

impl ProtocolUse {
    fn new() -> Self {
        ProtocolUse {
            wildcard: PortSet::new(),
            by_ip: HashMap::new(),
            by_ip_count: HashMap::new(),
        }
    }

    fn is_free(&self, host_ip: Option<IpAddr>, port: u16) -> bool {
        if self.wildcard.contains(port) {
            return false;
        }
        match host_ip {
            None => !self.by_ip_count.contains_key(&port),
            Some(ip) => !self.by_ip.get(&ip).is_some_and(|set| set.contains(port)),
        }
    }

    fn insert(&mut self, host_ip: Option<IpAddr>, port: u16) {
        match host_ip {
            None => {
                self.wildcard.insert(port);
            }
            Some(ip) => {
                if self
                    .by_ip
                    .entry(ip)
                    .or_insert_with(PortSet::new)
                    .insert(port)
                {
                    *self.by_ip_count.entry(port).or_default() += 1;
                }
            }
        }
    }

    fn remove(&mut self, host_ip: Option<IpAddr>, port: u16) -> bool {
        match host_ip {
            None => self.wildcard.remove(port),
            Some(ip) => {
                let Some(set) = self.by_ip.get_mut(&ip) else {
                    return false;
                };
                if !set.remove(port) {
                    return false;
                }
                if set.len() == 0 {
                    self.by_ip.remove(&ip);
                }
                if let Some(count) = self.by_ip_count.get_mut(&port) {
                    *count -= 1;
                    if *count == 0 {
                        self.by_ip_count.remove(&port);
                    }
                }
                true
            }
        }
    }
}

/// Hands out random free host ports from a range and remembers every port in use.
#[derive(Debug)]
pub struct HostPortAllocator {
    range: PortRange,
    reserved: ReservedPorts,
    used: [ProtocolUse; 3],
}

fn slot(protocol: Protocol) -> usize {
    match protocol {
        Protocol::Tcp => 0,
        Protocol::Udp => 1,
        Protocol::Sctp => 2,
    }
}

impl HostPortAllocator {
    /// An allocator with nothing in use.
    pub fn new(range: PortRange, reserved: ReservedPorts) -> Self {
        HostPortAllocator {
            range,
            reserved,
            used: [ProtocolUse::new(), ProtocolUse::new(), ProtocolUse::new()],
        }
    }

    /// The range random ports come from.
    pub fn range(&self) -> PortRange {
        self.range
    }

    /// Whether `port` can be allocated or claimed for `key` (reserved ports still can be
    /// claimed, but are never picked at random).
    pub fn is_free(&self, key: PortKey, port: u16) -> bool {
        self.used[slot(key.protocol)].is_free(key.host_ip, port)
    }

    /// How many ports of the range are mapped for `protocol` on any address.
    pub fn in_use(&self, protocol: Protocol) -> usize {
        let usage = &self.used[slot(protocol)];
        self.range
            .iter()
            .filter(|p| usage.wildcard.contains(*p) || usage.by_ip_count.contains_key(p))
            .count()
    }

    /// Marks a specific port as used: an explicit hostPort, or a mapping restored from a
    /// record. The port may lie outside the range.
    pub fn claim(&mut self, key: PortKey, port: u16) -> Result<(), AllocError> {
        if !self.is_free(key, port) {
            return Err(AllocError::InUse { key, port });
        }
        self.used[slot(key.protocol)].insert(key.host_ip, port);
        Ok(())
    }

    /// Gives a port back; true if it was in use for `key`.
    pub fn release(&mut self, key: PortKey, port: u16) -> bool {
        self.used[slot(key.protocol)].remove(key.host_ip, port)
    }

    /// Picks a random free, unreserved port of the range that `probe` accepts, and marks
    /// it used. `probe(key, port)` is asked once per candidate; return false to skip a
    /// port (the agent binds it there, and false means another process holds it).
    pub fn allocate(
        &mut self,
        key: PortKey,
        rng: &mut fastrand::Rng,
        mut probe: impl FnMut(PortKey, u16) -> bool,
    ) -> Result<u16, AllocError> {
        let (lo, hi) = (self.range.lo(), self.range.hi());
        let candidate =
            |this: &Self, port: u16| !this.reserved.contains(port) && this.is_free(key, port);
        for _ in 0..RANDOM_TRIES {
            let port = rng.u16(lo..=hi);
            if candidate(self, port) && probe(key, port) {
                self.used[slot(key.protocol)].insert(key.host_ip, port);
                return Ok(port);
            }
        }
        let size = self.range.len();
        let start = rng.usize(0..size);
        let mut refused = 0;
        for step in 0..size {
            // `size` <= 65535 and the offset is below it, so this stays a valid port.
            let port = lo + u16::try_from((start + step) % size).unwrap_or(0);
            if !candidate(self, port) {
                continue;
            }
            if probe(key, port) {
                self.used[slot(key.protocol)].insert(key.host_ip, port);
                return Ok(port);
            }
            refused += 1;
        }
        let usage = &self.used[slot(key.protocol)];
        let in_use = self
            .range
            .iter()
            .filter(|p| !usage.is_free(key.host_ip, *p))
            .count();
        Err(AllocError::Exhausted {
            key,
            range: self.range,
            in_use,
            reserved: self.reserved.count_in(self.range),
            refused,
            size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(lo: u16, hi: u16) -> PortRange {
        PortRange::new(lo, hi).unwrap()
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn wildcard_and_specific_addresses_conflict_both_ways() {
        let mut a = HostPortAllocator::new(range(100, 200), ReservedPorts::none());
        let tcp_any = PortKey::any(Protocol::Tcp);
        let tcp_one = PortKey::on(Protocol::Tcp, ip("192.0.2.1"));
        let tcp_two = PortKey::on(Protocol::Tcp, ip("192.0.2.2"));
        a.claim(tcp_one, 150).unwrap();
        assert!(!a.is_free(tcp_any, 150));
        assert!(a.is_free(tcp_two, 150));
        assert!(a.is_free(PortKey::any(Protocol::Udp), 150));
        a.claim(tcp_two, 150).unwrap();
        assert!(a.release(tcp_one, 150));
        assert!(!a.is_free(tcp_any, 150), "still held on 192.0.2.2");
        assert!(a.release(tcp_two, 150));
        assert!(a.is_free(tcp_any, 150));
        a.claim(tcp_any, 151).unwrap();
        assert_eq!(
            a.claim(tcp_one, 151),
            Err(AllocError::InUse {
                key: tcp_one,
                port: 151
            })
        );
        assert!(!a.release(tcp_one, 151));
        assert_eq!(a.in_use(Protocol::Tcp), 1);
    }

    #[test]
    fn unspecified_host_ip_means_all_addresses() {
        assert_eq!(
            PortKey::on(Protocol::Udp, ip("0.0.0.0")),
            PortKey::any(Protocol::Udp)
        );
        assert_eq!(
            PortKey::on(Protocol::Udp, ip("::")),
            PortKey::any(Protocol::Udp)
        );
    }

    #[test]
    fn refused_ports_are_skipped_and_counted() {
        let mut a = HostPortAllocator::new(range(10, 14), ReservedPorts::from_iter([10]));
        let key = PortKey::any(Protocol::Tcp);
        let mut rng = fastrand::Rng::with_seed(1);
        let port = a.allocate(key, &mut rng, |_, p| p == 13).unwrap();
        assert_eq!(port, 13);
        let err = a
            .allocate(key, &mut rng, |_, p| p != 11 && p != 12 && p != 14)
            .unwrap_err();
        assert_eq!(
            err,
            AllocError::Exhausted {
                key,
                range: range(10, 14),
                in_use: 1,
                reserved: 1,
                refused: 3,
                size: 5
            }
        );
        assert_eq!(
            err.to_string(),
            "no free TCP host port in range 10-14: 1 of its 5 ports are mapped, 1 are reserved \
             by the node and 3 are held by other processes; widen the port range or remove \
             pods that use it"
        );
    }

    #[test]
    fn fills_a_nearly_full_range_by_scanning() {
        let size = 1000;
        let mut a = HostPortAllocator::new(range(1, size), ReservedPorts::none());
        let key = PortKey::on(Protocol::Sctp, ip("2001:db8::1"));
        let mut rng = fastrand::Rng::with_seed(3);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..size {
            assert!(seen.insert(a.allocate(key, &mut rng, |_, _| true).unwrap()));
        }
        assert!(matches!(
            a.allocate(key, &mut rng, |_, _| true),
            Err(AllocError::Exhausted { .. })
        ));
    }
}
