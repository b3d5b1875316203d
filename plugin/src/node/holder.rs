//! Holding host ports: a socket bound to each mapped port, so that no other process on
//! the node, and no outgoing connection, can take it. TCP and SCTP sockets are bound but
//! never listen (a listening socket would accept connections before DNAT is in place);
//! no socket sets `SO_REUSEADDR`. A port on all addresses is held by one dual-stack
//! `[::]` socket (`IPV6_V6ONLY` off), or `0.0.0.0` where the node has no IPv6.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use randport_core::{PortKey, Protocol};
use socket2::{Domain, Socket, Type};

/// A port that could not be held.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    /// Another socket has the port.
    #[error("host port {port}/{key} is in use by another process on this node")]
    Busy {
        /// Protocol and address.
        key: PortKey,
        /// The port.
        port: u16,
    },
    /// The kernel has no SCTP.
    #[error(
        "host port {port}/{key}: this node's kernel does not support SCTP (load the sctp \
         module: modprobe sctp), so SCTP ports cannot be mapped"
    )]
    SctpUnsupported {
        /// Protocol and address.
        key: PortKey,
        /// The port.
        port: u16,
    },
    /// Any other socket error.
    #[error("cannot hold host port {port}/{key}: {source}")]
    Other {
        /// Protocol and address.
        key: PortKey,
        /// The port.
        port: u16,
        /// The socket error.
        source: io::Error,
    },
}

/// A held port; dropping it frees the port.
pub struct HeldPort {
    /// What it holds.
    pub key: PortKey,
    /// The port.
    pub port: u16,
    _socket: Option<Socket>,
}

impl fmt::Debug for HeldPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HeldPort({}/{})", self.port, self.key)
    }
}

impl HeldPort {
    /// A hold without a socket, for fakes.
    pub fn detached(key: PortKey, port: u16) -> Self {
        HeldPort {
            key,
            port,
            _socket: None,
        }
    }
}

/// Something that can hold host ports.
pub trait PortHolder: Send + Sync {
    /// Binds `port` for `key`.
    fn hold(&self, key: PortKey, port: u16) -> Result<HeldPort, HoldError>;
}

/// Holds ports with real sockets in the current network namespace.
#[derive(Debug, Default, Clone, Copy)]
pub struct SocketHolder;

fn socket_type(protocol: Protocol) -> (Type, socket2::Protocol) {
    match protocol {
        Protocol::Tcp => (Type::STREAM, socket2::Protocol::TCP),
        Protocol::Udp => (Type::DGRAM, socket2::Protocol::UDP),
        Protocol::Sctp => (Type::STREAM, socket2::Protocol::from(132)),
    }
}

impl SocketHolder {
    fn bind(
        key: PortKey,
        port: u16,
        addr: SocketAddr,
        dual_stack: bool,
    ) -> Result<Socket, io::Error> {
        let (ty, proto) = socket_type(key.protocol);
        let socket = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
        if addr.is_ipv6() {
            socket.set_only_v6(!dual_stack)?;
        }
        socket.bind(&addr.into())?;
        debug_assert_eq!(
            socket
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .map(|a| a.port()),
            Some(port)
        );
        Ok(socket)
    }
}

impl PortHolder for SocketHolder {
    fn hold(&self, key: PortKey, port: u16) -> Result<HeldPort, HoldError> {
        let attempt = match key.host_ip {
            Some(ip) => Self::bind(key, port, SocketAddr::new(ip, port), false),
            None => match Self::bind(
                key,
                port,
                SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
                true,
            ) {
                // No IPv6 on this node: all IPv4 addresses.
                Err(e) if e.raw_os_error() == Some(nix::libc::EAFNOSUPPORT) => Self::bind(
                    key,
                    port,
                    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
                    false,
                ),
                other => other,
            },
        };
        match attempt {
            Ok(socket) => Ok(HeldPort {
                key,
                port,
                _socket: Some(socket),
            }),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(HoldError::Busy { key, port }),
            Err(e)
                if key.protocol == Protocol::Sctp
                    && matches!(
                        e.raw_os_error(),
                        Some(nix::libc::EPROTONOSUPPORT | nix::libc::ESOCKTNOSUPPORT)
                    ) =>
            {
                Err(HoldError::SctpUnsupported { key, port })
            }
            Err(source) => Err(HoldError::Other { key, port, source }),
        }
    }
}

/// A holder that holds nothing and refuses the ports it is told are busy, recording
/// every call; for tests.
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Default)]
pub struct FakeHolder {
    /// Ports refused as busy.
    pub busy: std::sync::Mutex<std::collections::HashSet<u16>>,
    /// Every (key, port) asked for.
    pub calls: std::sync::Mutex<Vec<(PortKey, u16)>>,
}

#[cfg(any(test, feature = "testing"))]
impl PortHolder for FakeHolder {
    fn hold(&self, key: PortKey, port: u16) -> Result<HeldPort, HoldError> {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((key, port));
        if self
            .busy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&port)
        {
            return Err(HoldError::Busy { key, port });
        }
        Ok(HeldPort::detached(key, port))
    }
}

impl<T: PortHolder + ?Sized> PortHolder for std::sync::Arc<T> {
    fn hold(&self, key: PortKey, port: u16) -> Result<HeldPort, HoldError> {
        (**self).hold(key, port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, UdpSocket};

    /// A free port on loopback, found by the kernel.
    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn a_held_tcp_port_cannot_be_bound_or_connected_and_frees_on_drop() {
        let port = free_port();
        let held = SocketHolder
            .hold(PortKey::any(Protocol::Tcp), port)
            .unwrap();
        assert!(
            TcpListener::bind(("127.0.0.1", port)).is_err(),
            "held port could be bound"
        );
        assert!(TcpListener::bind(("0.0.0.0", port)).is_err());
        // Bound without listen: a connection is refused, not accepted.
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
        assert!(matches!(
            SocketHolder.hold(PortKey::any(Protocol::Tcp), port),
            Err(HoldError::Busy { .. })
        ));
        drop(held);
        TcpListener::bind(("0.0.0.0", port)).unwrap();
    }

    #[test]
    fn a_port_some_process_has_is_busy() {
        let listener = UdpSocket::bind("0.0.0.0:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let err = SocketHolder
            .hold(PortKey::any(Protocol::Udp), port)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("host port {port}/UDP is in use by another process on this node")
        );
        // Another protocol is a separate port space.
        SocketHolder.hold(PortKey::any(Protocol::Tcp), port).ok();
    }

    #[test]
    fn a_host_ip_hold_binds_only_that_address() {
        let port = free_port();
        let key = PortKey::on(Protocol::Tcp, Some("127.0.0.1".parse().unwrap()));
        let _held = SocketHolder.hold(key, port).unwrap();
        assert!(TcpListener::bind(("127.0.0.1", port)).is_err());
        assert!(
            TcpListener::bind(("127.0.0.2", port)).is_ok(),
            "another address stays free"
        );
        assert!(matches!(
            SocketHolder.hold(PortKey::any(Protocol::Tcp), port),
            Err(HoldError::Busy { .. })
        ));
    }

    #[test]
    fn sctp_is_held_or_reported_clearly() {
        let port = free_port();
        match SocketHolder.hold(PortKey::any(Protocol::Sctp), port) {
            Ok(held) => assert_eq!(held.port, port),
            Err(err @ HoldError::SctpUnsupported { .. }) => {
                assert!(err.to_string().contains("modprobe sctp"))
            }
            Err(other) => panic!("unexpected: {other}"),
        }
    }
}
