//! The workload in every simulated pod: on each TCP container port it greets a
//! connection with the pod's name and then echoes lines; on each UDP port it answers
//! every datagram with the pod's name. Sockets are made inside the pod's namespace and
//! served by threads of the simulator; dropping the [`Workload`] closes them.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use randport_core::Protocol;

use crate::netns::Netns;

/// A running workload; its sockets close when it is dropped.
#[derive(Debug)]
pub struct Workload {
    stop: Arc<AtomicBool>,
    tcp: Vec<TcpListener>,
    udp: Vec<UdpSocket>,
}

fn shutdown(fd: BorrowedFd<'_>) {
    // Wakes the thread blocked in accept() or recv() on this socket.
    let _ = nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Both);
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for l in &self.tcp {
            shutdown(std::os::fd::AsFd::as_fd(l));
        }
        for s in &self.udp {
            shutdown(std::os::fd::AsFd::as_fd(s));
        }
    }
}

/// Starts serving `ports` (container port, protocol) in `ns`, answering with `name`.
/// SCTP ports are not served (the standard library has no SCTP).
pub fn start(ns: &Netns, name: &str, ports: &[(u16, Protocol)]) -> Result<Workload> {
    // A port declared twice is served once.
    let mut wanted = ports.to_vec();
    wanted.sort();
    wanted.dedup();
    let (tcp, udp) = ns
        .enter(
            move || -> std::io::Result<(Vec<TcpListener>, Vec<UdpSocket>)> {
                let mut tcp = Vec::new();
                let mut udp = Vec::new();
                for (port, protocol) in wanted {
                    match protocol {
                        // [::] is dual-stack: IPv4 clients arrive as mapped addresses.
                        Protocol::Tcp => tcp.push(TcpListener::bind(("::", port))?),
                        Protocol::Udp => udp.push(UdpSocket::bind(("::", port))?),
                        Protocol::Sctp => {}
                    }
                }
                Ok((tcp, udp))
            },
        )?
        .with_context(|| format!("binding the workload's ports in {}", ns.name()))?;

    let stop = Arc::new(AtomicBool::new(false));
    let workload = Workload {
        stop: Arc::clone(&stop),
        tcp: Vec::new(),
        udp: Vec::new(),
    };
    let mut workload = workload;
    for listener in tcp {
        let (name, stop) = (name.to_owned(), Arc::clone(&stop));
        workload.tcp.push(listener.try_clone()?);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let name = name.clone();
                std::thread::spawn(move || {
                    let Ok(mut writer) = stream.try_clone() else {
                        return;
                    };
                    if writeln!(writer, "{name}").is_err() {
                        return;
                    }
                    for line in BufReader::new(stream).lines().map_while(Result::ok) {
                        if writeln!(writer, "{line}").is_err() {
                            break;
                        }
                    }
                });
            }
        });
    }
    for socket in udp {
        let (name, stop) = (name.to_owned(), Arc::clone(&stop));
        workload.udp.push(socket.try_clone()?);
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !stop.load(Ordering::SeqCst) {
                if let Ok((_, from)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(name.as_bytes(), from);
                }
            }
        });
    }
    Ok(workload)
}
