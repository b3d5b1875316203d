//! Just enough netfilter netlink (nfnetlink) for the ctnetlink flushes, for reading the
//! nftables ruleset generation and for the shape of our nftables table (its chains, sets
//! and rules, without set elements), in the calling thread's network namespace.

use std::os::fd::{AsRawFd, OwnedFd};

pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
pub(crate) const NLM_F_DUMP: u16 = 0x300;
pub(crate) const NLMSG_ERROR: u16 = 2;
pub(crate) const NLMSG_DONE: u16 = 3;
/// NFNL_SUBSYS_NFTABLES << 8.
const NFTABLES: u16 = 10 << 8;
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;
const NFTA_GEN_ID: u16 = 1;

/// A netlink message with an nfgenmsg header for `family` and `payload` attributes.
pub fn message(kind: u16, flags: u16, seq: u32, family: u8, payload: &[u8]) -> Vec<u8> {
    message_for(kind, flags, seq, family, 0, payload)
}

/// [`message`] with the nfgenmsg's `res_id` (a batch header names its subsystem there).
pub(crate) fn message_for(
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
    payload: &[u8],
) -> Vec<u8> {
    let len = 16 + 4 + payload.len();
    let mut b = Vec::with_capacity(len);
    b.extend((len as u32).to_ne_bytes());
    b.extend(kind.to_ne_bytes());
    b.extend(flags.to_ne_bytes());
    b.extend(seq.to_ne_bytes());
    b.extend(0u32.to_ne_bytes());
    b.extend([family, 0]);
    b.extend(res_id.to_be_bytes());
    b.extend(payload);
    b
}

/// The messages in a buffer: (type, body after the netlink header).
pub(crate) fn messages(buf: &[u8]) -> Vec<(u16, &[u8])> {
    messages_with_flags(buf)
        .into_iter()
        .map(|(kind, _, body)| (kind, body))
        .collect()
}

/// One netlink message in a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    /// Its type.
    pub kind: u16,
    /// Its flags.
    pub flags: u16,
    /// Its sequence number.
    pub seq: u32,
    /// What follows the netlink header.
    pub body: &'a [u8],
}

/// The messages in a buffer, up to the first that does not fit.
pub fn parse(mut buf: &[u8]) -> Vec<Message<'_>> {
    let mut out = Vec::new();
    while buf.len() >= 16 {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < 16 || len > buf.len() {
            break;
        }
        out.push(Message {
            kind: u16::from_ne_bytes([buf[4], buf[5]]),
            flags: u16::from_ne_bytes([buf[6], buf[7]]),
            seq: u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]),
            body: &buf[16..len],
        });
        buf = &buf[((len + 3) & !3).min(buf.len())..];
    }
    out
}

/// The messages in a buffer: (type, flags, body after the netlink header).
pub fn messages_with_flags(buf: &[u8]) -> Vec<(u16, u16, &[u8])> {
    parse(buf)
        .into_iter()
        .map(|m| (m.kind, m.flags, m.body))
        .collect()
}

/// The attributes in `buf`: (type without flag bits, whole attribute, payload).
pub fn attrs(mut buf: &[u8]) -> Vec<(u16, &[u8], &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        if len < 4 || len > buf.len() {
            break;
        }
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        out.push((kind, &buf[..len], &buf[4..len]));
        buf = &buf[((len + 3) & !3).min(buf.len())..];
    }
    out
}

pub(crate) fn find<'a>(attrs: &[(u16, &'a [u8], &'a [u8])], kind: u16) -> Option<&'a [u8]> {
    attrs.iter().find(|a| a.0 == kind).map(|a| a.2)
}

/// A NETLINK_NETFILTER socket.
pub(crate) fn socket() -> nix::Result<OwnedFd> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType};
    nix::sys::socket::socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )
}

/// The errno of an NLMSG_ERROR body (0 for an acknowledgement).
pub(crate) fn error_code(body: &[u8]) -> i32 {
    body.get(..4)
        .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// The nftables ruleset generation of this network namespace. The kernel bumps it on
/// every committed change to any nftables table, which includes every change made with
/// the nf_tables flavour of iptables: while it stays the same, no rule has changed.
pub fn ruleset_generation() -> std::io::Result<u32> {
    use nix::sys::socket::{MsgFlags, NetlinkAddr, recv, sendto};
    let sock = socket()?;
    let request = message(NFTABLES | NFT_MSG_GETGEN, NLM_F_REQUEST, 1, 0, &[]);
    sendto(
        sock.as_raw_fd(),
        &request,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    let mut buf = vec![0u8; 4096];
    let n = recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty())?;
    for (kind, body) in messages(&buf[..n]) {
        if kind == NLMSG_ERROR && error_code(body) != 0 {
            return Err(std::io::Error::from_raw_os_error(-error_code(body)));
        }
        if kind == NFTABLES | NFT_MSG_NEWGEN && body.len() >= 4 {
            if let Some(id) =
                find(&attrs(&body[4..]), NFTA_GEN_ID).and_then(|b| <[u8; 4]>::try_from(b).ok())
            {
                return Ok(u32::from_be_bytes(id));
            }
        }
    }
    Err(std::io::Error::other(
        "the kernel's answer to NFT_MSG_GETGEN had no generation id",
    ))
}

const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_GETSET: u16 = 10;
/// NFTA_CHAIN_TABLE, NFTA_RULE_TABLE and NFTA_SET_TABLE are all attribute 1.
const NFTA_TABLE_OF: u16 = 1;
const NFTA_CHAIN_HANDLE: u16 = 2;
const NFTA_CHAIN_COUNTERS: u16 = 8;
const NFTA_RULE_HANDLE: u16 = 3;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_POSITION: u16 = 6;
const NFTA_SET_HANDLE: u16 = 16;
/// The number of elements (newer kernels put it in set dumps).
const NFTA_SET_COUNT: u16 = 20;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NFPROTO_INET: u8 = 1;

/// One netlink attribute: type, payload, padding.
pub fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
    let len = 4 + payload.len();
    let mut b = Vec::with_capacity((len + 3) & !3);
    b.extend((len as u16).to_ne_bytes());
    b.extend(kind.to_ne_bytes());
    b.extend(payload);
    b.resize((len + 3) & !3, 0);
    b
}

/// A string attribute (NUL-terminated, as the kernel wants).
pub(crate) fn str_attr(kind: u16, value: &str) -> Vec<u8> {
    let mut payload = value.as_bytes().to_vec();
    payload.push(0);
    attr(kind, &payload)
}

/// What our table is made of, as the kernel describes it, without what changes on its own
/// (handles, positions, counters) and without set elements: two shapes are equal when the
/// chains, hooks, sets and rules are. [`nft_table_shape`] reads it with three netlink dumps
/// that do not grow with the number of mappings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableShape {
    /// Each chain, set and rule: its message type and its attributes that matter, in the
    /// kernel's order (chains and sets by creation, rules by position).
    pub objects: Vec<(u16, Vec<u8>)>,
}

impl TableShape {
    /// How many chains, sets and rules it has.
    pub fn counts(&self) -> (usize, usize, usize) {
        let of = |kind: u16| self.objects.iter().filter(|(k, _)| *k == kind).count();
        (
            of(NFT_MSG_NEWCHAIN),
            of(NFT_MSG_NEWSET),
            of(NFT_MSG_NEWRULE),
        )
    }
}

/// The outcome of reading something with netlink dumps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reading<T> {
    /// What was read (nothing of a table or set that does not exist).
    Read(T),
    /// The ruleset changed while the kernel answered; read again later.
    Interrupted,
}

/// The outcome of reading a table's shape.
pub type ShapeRead = Reading<TableShape>;

/// Keeps the attributes of one chain, set or rule that describe it, dropping handles,
/// positions, counters, a set's element count and the values of counter expressions.
pub fn shape_of(kind: u16, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for (attr_kind, whole, payload) in attrs(body.get(4..).unwrap_or_default()) {
        let dropped = match kind {
            NFT_MSG_NEWCHAIN => matches!(attr_kind, NFTA_CHAIN_HANDLE | NFTA_CHAIN_COUNTERS),
            NFT_MSG_NEWSET => matches!(attr_kind, NFTA_SET_HANDLE | NFTA_SET_COUNT),
            NFT_MSG_NEWRULE => matches!(attr_kind, NFTA_RULE_HANDLE | NFTA_RULE_POSITION),
            _ => false,
        };
        if dropped {
            continue;
        }
        if kind == NFT_MSG_NEWRULE && attr_kind == NFTA_RULE_EXPRESSIONS {
            let mut expressions = Vec::new();
            for (_, element, element_payload) in attrs(payload) {
                let fields = attrs(element_payload);
                if find(&fields, NFTA_EXPR_NAME) == Some(b"counter\0".as_slice()) {
                    // A counter's packets and bytes change with traffic.
                    expressions.extend(attr(NFTA_LIST_ELEM, &str_attr(NFTA_EXPR_NAME, "counter")));
                } else {
                    expressions.extend(element);
                    expressions.resize((expressions.len() + 3) & !3, 0);
                }
            }
            out.extend(attr(NFTA_RULE_EXPRESSIONS, &expressions));
            continue;
        }
        out.extend(whole);
        out.resize((out.len() + 3) & !3, 0);
    }
    out
}

/// The messages of a dump: (type without the subsystem, body).
pub(crate) type Dumped = Vec<(u16, Vec<u8>)>;

/// Reads every answer to one dump request: each message's (type, body), None when the
/// kernel says the dump was interrupted by a change, or the errno.
pub(crate) fn dump(sock: &OwnedFd, request: &[u8]) -> std::io::Result<Option<Dumped>> {
    use nix::sys::socket::{MsgFlags, NetlinkAddr, recv, sendto};
    sendto(
        sock.as_raw_fd(),
        request,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    let mut buf = vec![0u8; 1 << 16];
    let mut out = Vec::new();
    loop {
        let n = recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        if n == 0 {
            return Err(std::io::Error::other(
                "the kernel closed the netlink socket",
            ));
        }
        for (kind, flags, body) in messages_with_flags(&buf[..n]) {
            if flags & NLM_F_DUMP_INTR != 0 {
                return Ok(None);
            }
            match kind {
                NLMSG_DONE => return Ok(Some(out)),
                NLMSG_ERROR if error_code(body) != 0 => {
                    return Err(std::io::Error::from_raw_os_error(-error_code(body)));
                }
                NLMSG_ERROR => {}
                kind => out.push((kind & 0xff, body.to_vec())),
            }
        }
    }
}

/// The shape of table `inet <table>`: its chains, sets and rules (no elements), read with
/// three netlink dumps, once each (no retry: an interrupted dump says so).
pub fn nft_table_shape(table: &str) -> std::io::Result<ShapeRead> {
    let sock = socket()?;
    let mut objects = Vec::new();
    for (seq, kind) in [
        (1, NFT_MSG_GETCHAIN),
        (2, NFT_MSG_GETSET),
        (3, NFT_MSG_GETRULE),
    ] {
        let request = message(
            NFTABLES | kind,
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            NFPROTO_INET,
            &str_attr(NFTA_TABLE_OF, table),
        );
        let answers = match dump(&sock, &request) {
            Ok(Some(answers)) => answers,
            Ok(None) => return Ok(Reading::Interrupted),
            // No such table: nothing of it.
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOENT) => Vec::new(),
            Err(e) => return Err(e),
        };
        let mut wanted = table.as_bytes().to_vec();
        wanted.push(0);
        for (kind, body) in answers {
            // Chain dumps are not filtered by table in every kernel: keep ours.
            let ours = body.len() >= 4
                && find(&attrs(&body[4..]), NFTA_TABLE_OF) == Some(wanted.as_slice());
            if ours {
                objects.push((kind, shape_of(kind, &body)));
            }
        }
    }
    Ok(Reading::Read(TableShape { objects }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_attributes_round_trip() {
        // One attribute (type 1, a big-endian u32) after the nfgenmsg header.
        let mut payload = Vec::new();
        payload.extend(8u16.to_ne_bytes());
        payload.extend(NFTA_GEN_ID.to_ne_bytes());
        payload.extend(42u32.to_be_bytes());
        let msg = message(NFTABLES | NFT_MSG_NEWGEN, 0, 7, 0, &payload);
        let parsed = messages(&msg);
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].0, NFTABLES | NFT_MSG_NEWGEN);
        let found = find(&attrs(&parsed[0].1[4..]), NFTA_GEN_ID).unwrap();
        assert_eq!(found, 42u32.to_be_bytes());
    }

    /// A rule message: nfgenmsg, table, chain, handle, then expressions.
    fn rule(handle: u64, counter_packets: u64, extra: &str) -> Vec<u8> {
        let mut body = vec![NFPROTO_INET, 0, 0, 0];
        body.extend(str_attr(NFTA_TABLE_OF, "randport"));
        body.extend(str_attr(2, "hostports"));
        body.extend(attr(NFTA_RULE_HANDLE, &handle.to_be_bytes()));
        let counter = [
            str_attr(NFTA_EXPR_NAME, "counter"),
            attr(2, &attr(1, &counter_packets.to_be_bytes())),
        ]
        .concat();
        let lookup = [
            str_attr(NFTA_EXPR_NAME, "lookup"),
            attr(2, &str_attr(1, extra)),
        ]
        .concat();
        let expressions = [
            attr(NFTA_LIST_ELEM, &counter),
            attr(NFTA_LIST_ELEM, &lookup),
        ]
        .concat();
        body.extend(attr(NFTA_RULE_EXPRESSIONS, &expressions));
        body
    }

    #[test]
    fn a_rules_shape_ignores_its_handle_and_counter_values_but_not_its_expressions() {
        let base = shape_of(NFT_MSG_NEWRULE, &rule(5, 0, "hostports4"));
        assert_eq!(
            base,
            shape_of(NFT_MSG_NEWRULE, &rule(9, 1234, "hostports4"))
        );
        assert_ne!(base, shape_of(NFT_MSG_NEWRULE, &rule(5, 0, "hostports6")));
        // The counter stays in the shape, without its values.
        let expressions = find(&attrs(&base), NFTA_RULE_EXPRESSIONS).unwrap();
        let first = attrs(expressions)[0].2;
        assert_eq!(
            find(&attrs(first), NFTA_EXPR_NAME),
            Some(b"counter\0".as_slice())
        );
        assert_eq!(attrs(first).len(), 1);
    }

    #[test]
    fn a_chains_shape_ignores_its_handle_but_not_its_hook() {
        let chain = |handle: u64, hook: u32| {
            let mut body = vec![NFPROTO_INET, 0, 0, 0];
            body.extend(str_attr(NFTA_TABLE_OF, "randport"));
            body.extend(attr(NFTA_CHAIN_HANDLE, &handle.to_be_bytes()));
            body.extend(str_attr(3, "prerouting"));
            body.extend(attr(4, &attr(1, &hook.to_be_bytes())));
            body
        };
        assert_eq!(
            shape_of(NFT_MSG_NEWCHAIN, &chain(1, 0)),
            shape_of(NFT_MSG_NEWCHAIN, &chain(7, 0))
        );
        assert_ne!(
            shape_of(NFT_MSG_NEWCHAIN, &chain(1, 0)),
            shape_of(NFT_MSG_NEWCHAIN, &chain(1, 3))
        );
    }

    #[test]
    fn truncated_or_garbled_messages_are_read_without_panicking() {
        let good = rule(1, 2, "hostports4");
        for cut in 0..good.len() {
            let _ = shape_of(NFT_MSG_NEWRULE, &good[..cut]);
            let _ = messages_with_flags(&good[..cut]);
        }
        let mut garbled = good.clone();
        for i in (0..garbled.len()).step_by(3) {
            garbled[i] ^= 0xa5;
        }
        let _ = shape_of(NFT_MSG_NEWRULE, &garbled);
    }
}
