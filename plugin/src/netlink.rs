//! Just enough netfilter netlink (nfnetlink) for the ctnetlink flushes and for reading
//! the nftables ruleset generation, in the calling thread's network namespace.

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
pub(crate) fn message(kind: u16, flags: u16, seq: u32, family: u8, payload: &[u8]) -> Vec<u8> {
    let len = 16 + 4 + payload.len();
    let mut b = Vec::with_capacity(len);
    b.extend((len as u32).to_ne_bytes());
    b.extend(kind.to_ne_bytes());
    b.extend(flags.to_ne_bytes());
    b.extend(seq.to_ne_bytes());
    b.extend(0u32.to_ne_bytes());
    b.extend([family, 0, 0, 0]);
    b.extend(payload);
    b
}

/// The messages in a buffer: (type, flags-free body after the netlink header).
pub(crate) fn messages(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= 16 {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < 16 || len > buf.len() {
            break;
        }
        out.push((u16::from_ne_bytes([buf[4], buf[5]]), &buf[16..len]));
        buf = &buf[((len + 3) & !3).min(buf.len())..];
    }
    out
}

/// The attributes in `buf`: (type without flag bits, whole attribute, payload).
pub(crate) fn attrs(mut buf: &[u8]) -> Vec<(u16, &[u8], &[u8])> {
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
}
