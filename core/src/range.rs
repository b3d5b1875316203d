//! The host port range random ports come from, and the node's reserved ports.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An inclusive range of host ports, written `LO-HI` (e.g. `20000-29999`).
///
/// The default, `20000-29999`, lies below the NodePort range (30000-32767) and the
/// kernel's default ephemeral range (32768-60999), so random host ports compete with
/// neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PortRange {
    lo: u16,
    hi: u16,
}

/// A port range that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// Not of the form `LO-HI`.
    #[error("port range {0:?} is not of the form LO-HI, e.g. 20000-29999")]
    Syntax(String),
    /// A bound is not a number from 1 to 65535.
    #[error("port range {text:?}: {bound:?} is not a port number from 1 to 65535")]
    Bound {
        /// The whole range text.
        text: String,
        /// The offending bound.
        bound: String,
    },
    /// The low bound is above the high bound.
    #[error("port range {lo}-{hi} is empty: the low bound must not exceed the high bound")]
    Empty {
        /// Low bound.
        lo: u16,
        /// High bound.
        hi: u16,
    },
}

impl PortRange {
    /// The default range, `20000-29999`.
    pub const DEFAULT: PortRange = PortRange {
        lo: 20000,
        hi: 29999,
    };

    /// A range from `lo` to `hi`, both included.
    pub fn new(lo: u16, hi: u16) -> Result<Self, RangeError> {
        if lo == 0 {
            return Err(RangeError::Bound {
                text: format!("{lo}-{hi}"),
                bound: "0".into(),
            });
        }
        if lo > hi {
            return Err(RangeError::Empty { lo, hi });
        }
        Ok(PortRange { lo, hi })
    }

    /// The lowest port.
    pub fn lo(&self) -> u16 {
        self.lo
    }

    /// The highest port.
    pub fn hi(&self) -> u16 {
        self.hi
    }

    /// How many ports the range holds.
    pub fn len(&self) -> usize {
        usize::from(self.hi - self.lo) + 1
    }

    /// Never true: a range holds at least one port.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.lo..=self.hi).contains(&port)
    }

    /// The ports of the range, lowest first.
    pub fn iter(&self) -> impl Iterator<Item = u16> + use<> {
        self.lo..=self.hi
    }
}

impl Default for PortRange {
    fn default() -> Self {
        PortRange::DEFAULT
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.lo, self.hi)
    }
}

fn parse_port(text: &str, bound: &str) -> Result<u16, RangeError> {
    match bound.trim().parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(RangeError::Bound {
            text: text.to_owned(),
            bound: bound.trim().to_owned(),
        }),
    }
}

impl FromStr for PortRange {
    type Err = RangeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (lo, hi) = text
            .split_once('-')
            .ok_or_else(|| RangeError::Syntax(text.to_owned()))?;
        PortRange::new(parse_port(text, lo)?, parse_port(text, hi)?)
    }
}

impl TryFrom<String> for PortRange {
    type Error = RangeError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<PortRange> for String {
    fn from(range: PortRange) -> Self {
        range.to_string()
    }
}

/// A set of ports, one bit each.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct PortSet {
    bits: Box<[u64; 1024]>,
    len: usize,
}

impl PortSet {
    pub(crate) fn new() -> Self {
        PortSet {
            bits: Box::new([0; 1024]),
            len: 0,
        }
    }

    pub(crate) fn contains(&self, port: u16) -> bool {
        self.bits[usize::from(port / 64)] & (1 << (port % 64)) != 0
    }

    /// Adds `port`; true if it was not there.
    pub(crate) fn insert(&mut self, port: u16) -> bool {
        let word = &mut self.bits[usize::from(port / 64)];
        let bit = 1 << (port % 64);
        let fresh = *word & bit == 0;
        *word |= bit;
        self.len += usize::from(fresh);
        fresh
    }

    /// Removes `port`; true if it was there.
    pub(crate) fn remove(&mut self, port: u16) -> bool {
        let word = &mut self.bits[usize::from(port / 64)];
        let bit = 1 << (port % 64);
        let present = *word & bit != 0;
        *word &= !bit;
        self.len -= usize::from(present);
        present
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn count_in(&self, range: PortRange) -> usize {
        range.iter().filter(|p| self.contains(*p)).count()
    }
}

impl fmt::Debug for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PortSet({} ports)", self.len)
    }
}

/// Ports the node keeps out of automatic use: the contents of
/// `/proc/sys/net/ipv4/ip_local_reserved_ports` (`8080,9000-9100`), or any other list
/// the operator gives.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ReservedPorts(PortSet);

/// A reserved-ports list that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("reserved ports list {text:?}: {item:?} is not a port or a LO-HI range of ports")]
pub struct ReservedPortsError {
    /// The whole list.
    pub text: String,
    /// The offending item.
    pub item: String,
}

impl ReservedPorts {
    /// No reserved ports.
    pub fn none() -> Self {
        ReservedPorts(PortSet::new())
    }

    /// Reads the kernel's format: comma-separated ports and `LO-HI` ranges, possibly empty.
    pub fn parse(text: &str) -> Result<Self, ReservedPortsError> {
        let mut set = PortSet::new();
        for item in text
            .trim()
            .split(',')
            .map(str::trim)
            .filter(|i| !i.is_empty())
        {
            let bad = || ReservedPortsError {
                text: text.to_owned(),
                item: item.to_owned(),
            };
            let (lo, hi) = match item.split_once('-') {
                Some((lo, hi)) => (lo.trim().parse::<u16>(), hi.trim().parse::<u16>()),
                None => (item.parse::<u16>(), item.parse::<u16>()),
            };
            let (Ok(lo), Ok(hi)) = (lo, hi) else {
                return Err(bad());
            };
            if lo > hi {
                return Err(bad());
            }
            for port in lo..=hi {
                set.insert(port);
            }
        }
        Ok(ReservedPorts(set))
    }

    /// Whether `port` is reserved.
    pub fn contains(&self, port: u16) -> bool {
        self.0.contains(port)
    }

    /// How many ports of `range` are reserved.
    pub fn count_in(&self, range: PortRange) -> usize {
        self.0.count_in(range)
    }

    /// How many ports are reserved in all.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no port is reserved.
    pub fn is_empty(&self) -> bool {
        self.0.len() == 0
    }
}

impl FromIterator<u16> for ReservedPorts {
    fn from_iter<I: IntoIterator<Item = u16>>(iter: I) -> Self {
        let mut set = PortSet::new();
        for port in iter {
            set.insert(port);
        }
        ReservedPorts(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_ranges() {
        let r: PortRange = "20000-29999".parse().unwrap();
        assert_eq!((r.lo(), r.hi(), r.len()), (20000, 29999, 10000));
        assert_eq!(r.to_string(), "20000-29999");
        assert_eq!(" 1 - 65535 ".parse::<PortRange>().unwrap().len(), 65535);
        assert_eq!("7-7".parse::<PortRange>().unwrap().len(), 1);
        assert_eq!(PortRange::default(), r);
    }

    #[test]
    fn rejects_bad_ranges_with_clear_errors() {
        let msg = |s: &str| s.parse::<PortRange>().unwrap_err().to_string();
        assert_eq!(
            msg("20000"),
            "port range \"20000\" is not of the form LO-HI, e.g. 20000-29999"
        );
        assert_eq!(
            msg("0-10"),
            "port range \"0-10\": \"0\" is not a port number from 1 to 65535"
        );
        assert_eq!(
            msg("1-65536"),
            "port range \"1-65536\": \"65536\" is not a port number from 1 to 65535"
        );
        assert_eq!(
            msg("a-10"),
            "port range \"a-10\": \"a\" is not a port number from 1 to 65535"
        );
        assert_eq!(
            msg("30000-20000"),
            "port range 30000-20000 is empty: the low bound must not exceed the high bound"
        );
        assert!(PortRange::new(0, 5).is_err());
    }

    #[test]
    fn range_serde_is_the_text_form() {
        let r: PortRange = serde_json::from_str("\"100-200\"").unwrap();
        assert_eq!(serde_json::to_string(&r).unwrap(), "\"100-200\"");
        assert!(serde_json::from_str::<PortRange>("\"200-100\"").is_err());
    }

    #[test]
    fn reads_the_kernel_reserved_ports_format() {
        let r = ReservedPorts::parse("8080,9000-9002, 20005\n").unwrap();
        assert_eq!(r.len(), 5);
        assert!(r.contains(8080) && r.contains(9001) && r.contains(20005));
        assert!(!r.contains(9003));
        assert!(ReservedPorts::parse("").unwrap().is_empty());
        assert_eq!(r.count_in(PortRange::new(9000, 20005).unwrap()), 4);
        let err = ReservedPorts::parse("80,x-9").unwrap_err();
        assert_eq!(err.item, "x-9");
        assert!(ReservedPorts::parse("90-80").is_err());
    }

    #[test]
    fn port_set_counts() {
        let mut s = PortSet::new();
        assert!(s.insert(0) && s.insert(65535) && !s.insert(0));
        assert_eq!(s.len(), 2);
        assert!(s.remove(0) && !s.remove(0));
        assert_eq!(s.len(), 1);
        assert!(s.contains(65535));
    }
}
