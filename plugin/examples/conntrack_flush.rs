//! What the DEL's conntrack flush costs with many unrelated entries on the node: in a
//! network namespace of its own, this fills the conntrack table with 100,000 UDP entries
//! (to 1,000 ports, 100 each) over ctnetlink, then flushes one port's 100 entries again and
//! again, with the agent's flush (one dump per family that the kernel filters, then a
//! delete per entry) and with the `conntrack` tool (which dumps every entry and filters in
//! userspace), alternating; it prints p50 and p99 of each. Root only.
//! `cargo run --release -p randport-plugin --example conntrack_flush [ENTRIES]`.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use randport_core::{IpFamily, PortKey, Protocol};
use randport_plugin::netfilter::conntrack::{Conntrack, ConntrackTool, NetlinkConntrack};
use randport_plugin::netfilter::netlink::{attr, message};

fn nested(kind: u16, parts: &[Vec<u8>]) -> Vec<u8> {
    attr(kind | 0x8000, &parts.concat())
}

/// CTA_TUPLE_* for a UDP flow src:sport -> dst:dport.
fn tuple(kind: u16, src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    nested(
        kind,
        &[
            nested(1, &[attr(1, &src), attr(2, &dst)]),
            nested(
                2,
                &[
                    attr(1, &[17]),
                    attr(2, &sport.to_be_bytes()),
                    attr(3, &dport.to_be_bytes()),
                ],
            ),
        ],
    )
}

fn socket() -> OwnedFd {
    use nix::sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType};
    nix::sys::socket::socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )
    .expect("a netlink socket")
}

/// Creates `n` UDP entries 203.0.113.x:sport -> 192.0.2.1:(30000 + i % 1000).
fn fill(n: usize) {
    let sock = socket();
    let to = nix::sys::socket::NetlinkAddr::new(0, 0);
    let mut buf = vec![0u8; 1 << 16];
    for i in 0..n {
        let src = [203, 0, 113, (i / 60000) as u8 + 1];
        let sport = 1024 + (i % 60000) as u16;
        let dport = 30000 + (i % 1000) as u16;
        let dst = [192, 0, 2, 1];
        let body = [
            tuple(1, src, dst, sport, dport),
            tuple(2, dst, src, dport, sport),
            attr(7, &600u32.to_be_bytes()), // CTA_TIMEOUT
        ]
        .concat();
        // IPCTNL_MSG_CT_NEW, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK
        // AF_INET
        let msg = message(1 << 8, 0x1 | 0x400 | 0x4, i as u32, 2, &body);
        nix::sys::socket::sendto(
            sock.as_raw_fd(),
            &msg,
            &to,
            nix::sys::socket::MsgFlags::empty(),
        )
        .expect("sending CT_NEW");
        nix::sys::socket::recv(
            sock.as_raw_fd(),
            &mut buf,
            nix::sys::socket::MsgFlags::empty(),
        )
        .expect("its answer");
        let errno = i32::from_ne_bytes(buf[16..20].try_into().unwrap());
        assert!(errno == 0, "CT_NEW {i}: errno {}", -errno);
    }
}

fn count() -> usize {
    std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    assert!(
        nix::unistd::geteuid().is_root(),
        "run as root: it makes a network namespace"
    );
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("a network namespace");
    let started = Instant::now();
    fill(n);
    println!(
        "{n} UDP entries made in {:.1} s; nf_conntrack_count {}",
        started.elapsed().as_secs_f64(),
        count()
    );
    let key = PortKey::any(Protocol::Udp);
    type Flush = Box<dyn Fn(u16)>;
    let tools: [(&str, Flush); 3] = [
        (
            "randport, a pod with IPv4 only (one kernel-filtered dump, a delete per entry)",
            Box::new(move |port| {
                NetlinkConntrack
                    .flush_in(key, port, &[IpFamily::V4])
                    .unwrap()
            }),
        ),
        (
            "randport, a dual-stack pod (a dump per family)",
            Box::new(move |port| NetlinkConntrack.flush(key, port).unwrap()),
        ),
        (
            "the conntrack tool (every entry dumped, filtered in userspace)",
            Box::new(move |port| ConntrackTool.flush(key, port).unwrap()),
        ),
    ];
    println!(
        "| flush of one port among {n} entries | its entries | p50 | p99 |\n|---|---:|---:|---:|"
    );
    // A port with 100 entries (a new one each time) and a port with none (the usual DEL).
    for (entries, first) in [(100, 30000u16), (0, 40000)] {
        let mut times: [Vec<Duration>; 3] = [vec![], vec![], vec![]];
        for round in 0..39u16 {
            let which = round as usize % 3;
            let t = Instant::now();
            (tools[which].1)(first + round);
            times[which].push(t.elapsed());
        }
        for (which, mut t) in times.into_iter().enumerate() {
            t.sort();
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            println!(
                "| {} | {entries} | {:.2} ms | {:.2} ms |",
                tools[which].0,
                ms(t[t.len() / 2]),
                ms(t[t.len() - 1])
            );
        }
    }
    println!(
        "left: {} entries (each flush of a full port removed its 100)",
        count()
    );
}
