//! The workload of the local real-node e2e tests (`ci/e2e-local.sh` builds it statically
//! with plain `rustc` and packs it as the OCI image `local.test/randport-echo:1`; the
//! busybox image has no UDP server). It answers with the pod's name:
//! - TCP on each port given: an HTTP GET gets `HTTP/1.0 200` with the name as the body,
//!   anything else the name and a newline;
//! - UDP on the same ports: each datagram gets the name back.
//!
//! The name is `$POD_NAME`, else the host name (a pod's host name is its name).
//! Usage: `echo PORT...` (default 9376).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::thread;
use std::time::Duration;

fn pod_name() -> String {
    std::env::var("POD_NAME").unwrap_or_else(|_| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into())
    })
}

fn answer_tcp(mut stream: TcpStream, name: &str) {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut request = [0u8; 1024];
    let n = stream.read(&mut request).unwrap_or(0);
    let reply = if request[..n].starts_with(b"GET ") {
        format!("HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n{name}\n")
    } else {
        format!("{name}\n")
    };
    let _ = stream.write_all(reply.as_bytes());
}

fn main() {
    let name: &'static str = Box::leak(pod_name().into_boxed_str());
    let mut ports: Vec<u16> = std::env::args()
        .skip(1)
        .map(|p| p.parse().unwrap_or_else(|_| panic!("not a port: {p}")))
        .collect();
    if ports.is_empty() {
        ports.push(9376);
    }
    let mut threads = Vec::new();
    for port in ports {
        let tcp = TcpListener::bind(("0.0.0.0", port))
            .unwrap_or_else(|e| panic!("binding TCP port {port}: {e}"));
        let udp = UdpSocket::bind(("0.0.0.0", port))
            .unwrap_or_else(|e| panic!("binding UDP port {port}: {e}"));
        eprintln!("{name}: answering on TCP and UDP port {port}");
        threads.push(thread::spawn(move || {
            for stream in tcp.incoming().flatten() {
                thread::spawn(move || answer_tcp(stream, name));
            }
        }));
        threads.push(thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((_, peer)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(format!("{name}\n").as_bytes(), peer);
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
}
