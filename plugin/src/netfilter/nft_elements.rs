//! One sandbox's map and set elements added or removed as one nftables netlink batch
//! (NFT_MSG_NEWSETELEM / NFT_MSG_DELSETELEM between NFNL_MSG_BATCH_BEGIN and _END), from
//! the agent's own process: no `nft` exec on ADD or DEL. The kernel applies a batch as one
//! transaction, as `nft -f` does; whole-table loads stay with `nft -f`.
//!
//! The elements are [`randport_core::render::nft::elements`], the same data the text
//! rendering writes: keys and values are concatenations, each field stored in 4-byte
//! registers (an address in 4 or 16 bytes, a protocol number in 1, a port in 2, big
//! endian, each padded to 4), and the sandbox's tag is the element's comment in nft's
//! user-data format. The root tests compare the kernel's listing after a batch with the
//! listing after `nft -f` of the rendered text.

use std::os::fd::{AsRawFd, OwnedFd};

use randport_core::render::nft::{Field, SetElement};

#[cfg(test)]
use crate::netfilter::netlink::messages;
use crate::netfilter::netlink::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_ERROR, Reading, attr, attrs, error_code, find,
    message_for as message, socket, str_attr,
};

const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_DELSETELEM: u16 = 14;
const NLM_F_CREATE: u16 = 0x400;
const NLA_F_NESTED: u16 = 0x8000;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
const NFTA_DATA_VALUE: u16 = 1;
/// libnftnl's NFTNL_UDATA_SET_ELEM_COMMENT: the user-data record nft reads comments from.
const UDATA_SET_ELEM_COMMENT: u8 = 0;
const NFPROTO_INET: u8 = 1;

/// What a batch does to one element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Add it with its comment (nothing happens when it is there already with that value).
    Add,
    /// Add it without a comment (fails when its key maps elsewhere), then delete it:
    /// succeeds when it is already gone, changes nothing when it belongs to another.
    Remove,
}

/// Why a batch was refused.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The netlink socket could not be used.
    #[error("nftables netlink: {0}")]
    Io(#[from] std::io::Error),
    /// The kernel refused a message (and so the whole batch).
    #[error("nftables refused {what}: {source}")]
    Refused {
        /// The message, as nft would write it.
        what: String,
        /// The kernel's errno.
        source: std::io::Error,
    },
}

impl BatchError {
    /// The errno, when the kernel refused.
    pub fn errno(&self) -> Option<i32> {
        match self {
            BatchError::Refused { source, .. } => source.raw_os_error(),
            BatchError::Io(e) => e.raw_os_error(),
        }
    }
}

/// A concatenation as nftables stores it: each field in whole 4-byte registers.
pub fn concat(fields: &[Field]) -> Vec<u8> {
    let mut out = Vec::new();
    for field in fields {
        match field {
            Field::Ip(std::net::IpAddr::V4(ip)) => out.extend(ip.octets()),
            Field::Ip(std::net::IpAddr::V6(ip)) => out.extend(ip.octets()),
            Field::Proto(p) => out.push(p.ip_number()),
            Field::Port(port) => out.extend(port.to_be_bytes()),
        }
        out.resize((out.len() + 3) & !3, 0);
    }
    out
}

/// The element's attributes inside NFTA_LIST_ELEM.
fn element(e: &SetElement, with_value_and_comment: bool) -> Vec<u8> {
    let key = attr(NFTA_DATA_VALUE, &concat(&e.key));
    let mut out = attr(NFTA_SET_ELEM_KEY | NLA_F_NESTED, &key);
    if with_value_and_comment {
        if let Some(value) = &e.value {
            let data = attr(NFTA_DATA_VALUE, &concat(value));
            out.extend(attr(NFTA_SET_ELEM_DATA | NLA_F_NESTED, &data));
        }
    }
    out
}

fn with_comment(e: &SetElement) -> Vec<u8> {
    let mut out = element(e, true);
    let mut udata = vec![UDATA_SET_ELEM_COMMENT, (e.tag.len() + 1) as u8];
    udata.extend(e.tag.as_bytes());
    udata.push(0);
    out.extend(attr(NFTA_SET_ELEM_USERDATA, &udata));
    out
}

/// The batch for `ops` on table `inet <table>`, sequence numbers from `seq`; also what
/// each acknowledged message does, as nft would write it, by sequence number.
pub fn batch(table: &str, ops: &[(Op, &SetElement)], seq: u32) -> (Vec<u8>, Vec<(u32, String)>) {
    let mut out = message(
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    let mut said = Vec::new();
    let mut next = seq + 1;
    let mut one = |kind: u16, flags: u16, set: &str, elem: Vec<u8>, what: String| {
        let mut attrs = Vec::new();
        attrs.extend(str_attr(NFTA_SET_ELEM_LIST_TABLE, table));
        attrs.extend(str_attr(NFTA_SET_ELEM_LIST_SET, set));
        let list = attr(NFTA_LIST_ELEM | NLA_F_NESTED, &elem);
        attrs.extend(attr(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, &list));
        out.extend(message(
            (NFNL_SUBSYS_NFTABLES << 8) | kind,
            NLM_F_REQUEST | NLM_F_ACK | flags,
            next,
            NFPROTO_INET,
            0,
            &attrs,
        ));
        said.push((next, what));
        next += 1;
    };
    for (op, e) in ops {
        let text = |verb: &str| {
            format!(
                "{verb} element inet {table} {} {{ {} }}",
                e.set,
                e.key_text()
            )
        };
        match op {
            Op::Add => one(
                NFT_MSG_NEWSETELEM,
                NLM_F_CREATE,
                e.set,
                with_comment(e),
                text("add"),
            ),
            Op::Remove => {
                one(
                    NFT_MSG_NEWSETELEM,
                    NLM_F_CREATE,
                    e.set,
                    element(e, true),
                    text("add"),
                );
                one(
                    NFT_MSG_DELSETELEM,
                    0,
                    e.set,
                    element(e, false),
                    text("delete"),
                );
            }
        }
    }
    out.extend(message(
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        next,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    ));
    (out, said)
}

/// Sends `ops` on table `inet <table>` as one batch in the calling thread's network
/// namespace and waits for the kernel's answer to each message (5 s at most).
pub fn apply(table: &str, ops: &[(Op, &SetElement)]) -> Result<(), BatchError> {
    use nix::sys::socket::{MsgFlags, NetlinkAddr, recv, sendto, setsockopt, sockopt};
    if ops.is_empty() {
        return Ok(());
    }
    let sock: OwnedFd = socket().map_err(std::io::Error::from)?;
    setsockopt(
        &sock,
        sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(5, 0),
    )
    .map_err(std::io::Error::from)?;
    let (request, said) = batch(table, ops, 1);
    sendto(
        sock.as_raw_fd(),
        &request,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .map_err(std::io::Error::from)?;
    let mut answered = 0;
    let mut refused: Option<BatchError> = None;
    let mut buf = vec![0u8; 1 << 16];
    while answered < said.len() {
        let n =
            recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(std::io::Error::from)?;
        if n == 0 {
            break;
        }
        for (seq, kind, body) in answers(&buf[..n]) {
            if kind != NLMSG_ERROR {
                continue;
            }
            answered += 1;
            let code = error_code(body);
            if code != 0 && refused.is_none() {
                let what = said
                    .iter()
                    .find(|(s, _)| *s == seq)
                    .map_or_else(|| "the batch".to_owned(), |(_, w)| w.clone());
                refused = Some(BatchError::Refused {
                    what,
                    source: std::io::Error::from_raw_os_error(-code),
                });
                // A refused batch header is the only answer there will be.
                if seq == 1 {
                    answered = said.len();
                }
            }
        }
    }
    refused.map_or(Ok(()), Err)
}

/// One element of a set as the kernel holds it: what a dump of the set answers, and what
/// [`stored`] says an element of ours must look like there.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StoredElement {
    /// The set or map it is in.
    pub set: String,
    /// Its key, as stored (a concatenation in whole registers).
    pub key: Vec<u8>,
    /// Its value, for maps.
    pub value: Option<Vec<u8>>,
    /// Its comment (nft's user-data record), if it has one.
    pub comment: Option<String>,
}

/// What the kernel holds for `e` once it is added.
pub fn stored(e: &SetElement) -> StoredElement {
    StoredElement {
        set: e.set.to_owned(),
        key: concat(&e.key),
        value: e.value.as_deref().map(concat),
        comment: Some(e.tag.clone()),
    }
}

/// The outcome of reading the elements of our sets.
pub type ElementsRead = Reading<Vec<StoredElement>>;

/// The elements in one NEWSETELEM message of a dump (set named in the message).
pub fn parse_elements(body: &[u8]) -> Vec<StoredElement> {
    let top = attrs(body.get(4..).unwrap_or_default());
    let Some(set) = find(&top, NFTA_SET_ELEM_LIST_SET).and_then(c_string) else {
        return Vec::new();
    };
    let Some(list) = find(&top, NFTA_SET_ELEM_LIST_ELEMENTS) else {
        return Vec::new();
    };
    let value_of = |nested: &[u8]| find(&attrs(nested), NFTA_DATA_VALUE).map(<[u8]>::to_vec);
    attrs(list)
        .into_iter()
        .filter(|(kind, _, _)| *kind == NFTA_LIST_ELEM)
        .filter_map(|(_, _, elem)| {
            let fields = attrs(elem);
            Some(StoredElement {
                set: set.clone(),
                key: value_of(find(&fields, NFTA_SET_ELEM_KEY)?)?,
                value: find(&fields, NFTA_SET_ELEM_DATA).and_then(value_of),
                comment: find(&fields, NFTA_SET_ELEM_USERDATA).and_then(udata_comment),
            })
        })
        .collect()
}

/// A NUL-terminated string attribute.
fn c_string(payload: &[u8]) -> Option<String> {
    let text = payload.split(|b| *b == 0).next()?;
    String::from_utf8(text.to_vec()).ok()
}

/// The comment record of nft's user data (type, length, value records).
fn udata_comment(mut udata: &[u8]) -> Option<String> {
    while let [kind, len, rest @ ..] = udata {
        let value = rest.get(..usize::from(*len))?;
        if *kind == UDATA_SET_ELEM_COMMENT {
            return c_string(value);
        }
        udata = &rest[usize::from(*len)..];
    }
    None
}

/// Every element of the sets `sets` of table `inet <table>`, one dump per set, in the
/// calling thread's network namespace.
pub fn read(table: &str, sets: &[&str]) -> std::io::Result<ElementsRead> {
    let sock = socket()?;
    let mut out = Vec::new();
    for (seq, set) in (1..).zip(sets) {
        let mut attrs = Vec::new();
        attrs.extend(str_attr(NFTA_SET_ELEM_LIST_TABLE, table));
        attrs.extend(str_attr(NFTA_SET_ELEM_LIST_SET, set));
        let request = message(
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM,
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            NFPROTO_INET,
            0,
            &attrs,
        );
        match crate::netfilter::netlink::dump(&sock, &request) {
            Ok(Some(answers)) => out.extend(
                answers
                    .iter()
                    .filter(|(kind, _)| *kind == NFT_MSG_NEWSETELEM)
                    .flat_map(|(_, body)| parse_elements(body)),
            ),
            Ok(None) => return Ok(Reading::Interrupted),
            // No such table or set: no elements in it.
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Reading::Read(out))
}

/// (sequence number, type, body) of each message in a buffer.
pub fn answers(buf: &[u8]) -> Vec<(u32, u16, &[u8])> {
    crate::netfilter::netlink::parse(buf)
        .into_iter()
        .map(|m| (m.seq, m.kind, m.body))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use randport_core::Protocol;

    #[test]
    fn concatenations_use_whole_registers() {
        let key = [Field::Proto(Protocol::Udp), Field::Port(24427)];
        assert_eq!(concat(&key), [17, 0, 0, 0, 0x5f, 0x6b, 0, 0]);
        let value = [Field::Ip("198.18.0.2".parse().unwrap()), Field::Port(8080)];
        assert_eq!(concat(&value), [198, 18, 0, 2, 0x1f, 0x90, 0, 0]);
        let v6 = [
            Field::Ip("2001:db8::1".parse().unwrap()),
            Field::Proto(Protocol::Tcp),
        ];
        assert_eq!(concat(&v6).len(), 20);
    }

    #[test]
    fn a_removal_readds_then_deletes_each_element_in_one_batch() {
        let e = SetElement {
            set: "hostports4",
            key: vec![Field::Proto(Protocol::Tcp), Field::Port(20000)],
            value: Some(vec![
                Field::Ip("198.18.0.2".parse().unwrap()),
                Field::Port(80),
            ]),
            tag: "sb:0123456789abcdef".into(),
        };
        let (bytes, said) = batch("randport", &[(Op::Remove, &e)], 7);
        let kinds: Vec<u16> = messages(&bytes).into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            kinds,
            [
                NFNL_MSG_BATCH_BEGIN,
                (10 << 8) | NFT_MSG_NEWSETELEM,
                (10 << 8) | NFT_MSG_DELSETELEM,
                NFNL_MSG_BATCH_END
            ]
        );
        assert_eq!(
            said,
            [
                (
                    8,
                    "add element inet randport hostports4 { tcp . 20000 }".to_owned()
                ),
                (
                    9,
                    "delete element inet randport hostports4 { tcp . 20000 }".to_owned()
                ),
            ]
        );
        // The deletion names the key only; the re-addition carries the value.
        let bodies: Vec<&[u8]> = messages(&bytes).into_iter().map(|(_, b)| b).collect();
        let list = |body: &[u8]| -> Vec<u16> {
            let top = attrs(&body[4..]);
            let elements =
                crate::netfilter::netlink::find(&top, NFTA_SET_ELEM_LIST_ELEMENTS).unwrap();
            let elem = attrs(elements)[0].2;
            attrs(elem).into_iter().map(|a| a.0).collect()
        };
        assert_eq!(list(bodies[1]), [NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_DATA]);
        assert_eq!(list(bodies[2]), [NFTA_SET_ELEM_KEY]);
    }

    #[test]
    fn an_addition_carries_the_tag_as_nfts_comment() {
        let e = SetElement {
            set: "hairpin4",
            key: vec![
                Field::Ip("198.18.0.2".parse().unwrap()),
                Field::Ip("198.18.0.2".parse().unwrap()),
            ],
            value: None,
            tag: "sb:ab".into(),
        };
        let fields = attrs(&with_comment(&e))
            .into_iter()
            .map(|(k, _, p)| (k, p.to_vec()))
            .collect::<Vec<_>>();
        assert_eq!(fields[0].0, NFTA_SET_ELEM_KEY);
        assert_eq!(
            fields[1],
            (NFTA_SET_ELEM_USERDATA, b"\x00\x06sb:ab\x00".to_vec())
        );
    }

    #[test]
    fn an_element_message_reads_back_as_the_element_it_was_made_from() {
        for record in randport_core::examples::all() {
            for e in randport_core::render::nft::elements(&record) {
                let (bytes, _) = batch("randport", &[(Op::Add, &e)], 1);
                let bodies: Vec<&[u8]> = messages(&bytes).into_iter().map(|(_, b)| b).collect();
                assert_eq!(parse_elements(bodies[1]), vec![stored(&e)], "{e:?}");
            }
        }
    }

    #[test]
    fn truncated_or_garbled_element_messages_are_read_without_panicking() {
        let e = &randport_core::render::nft::elements(&randport_core::examples::dual_stack())[0];
        let (bytes, _) = batch("randport", &[(Op::Add, e)], 1);
        let body = messages(&bytes)[1].1.to_vec();
        for cut in 0..body.len() {
            let _ = parse_elements(&body[..cut]);
        }
        for flip in 0..body.len() {
            let mut garbled = body.clone();
            garbled[flip] ^= 0xff;
            let _ = parse_elements(&garbled);
        }
        assert_eq!(udata_comment(&[0, 200, b'x']), None);
        assert_eq!(udata_comment(b"\x07\x01z\x00\x03ab\x00"), Some("ab".into()));
    }
}
