//! The plugin's and agent's side of the wire protocol ([`randport_core::wire`]): sending a
//! request and reading an answer on the agent's unix socket, within limits.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub use randport_core::wire::{
    AddRequest, ErrorReply, MAX_REQUEST, MAX_RESPONSE, Request, Response,
};

/// How long the plugin waits for the agent's answer to one request. The agent's own ADD
/// deadline (`--add-deadline-ms`, default [`DEFAULT_ADD_DEADLINE`]) is shorter, so that
/// the agent gives up and undoes an ADD before the plugin does; both are shorter than the
/// runtimes' CNI timeouts (docs/configuration.md).
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(30);
/// The agent's default deadline for one ADD.
pub const DEFAULT_ADD_DEADLINE: Duration = Duration::from_secs(25);

/// A request or response that could not be exchanged.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// The socket could not be reached.
    #[error(
        "cannot reach randportd at {path}: {source}; is the randport agent running on this \
         node (DaemonSet randportd)?"
    )]
    Connect {
        /// The socket path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Reading or writing failed.
    #[error("talking to randportd: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes were not a valid message.
    #[error("malformed message from randportd: {0}")]
    Decode(#[from] serde_json::Error),
    /// The message was too long.
    #[error("message longer than {0} bytes")]
    TooLong(usize),
}

/// Reads until EOF, at most `limit` bytes.
pub fn read_limited(stream: &mut impl Read, limit: usize) -> Result<Vec<u8>, RpcError> {
    let mut buf = Vec::new();
    stream.take(limit as u64 + 1).read_to_end(&mut buf)?;
    if buf.len() > limit {
        return Err(RpcError::TooLong(limit));
    }
    Ok(buf)
}

/// Sends one request to the agent at `socket` and waits up to `timeout` for the answer.
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> Result<Response, RpcError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| RpcError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(&serde_json::to_vec(request)?)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let bytes = read_limited(&mut stream, MAX_RESPONSE)?;
    Ok(serde_json::from_slice(&bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_limited_refuses_long_input() {
        let mut long = std::io::Cursor::new(vec![b'x'; 11]);
        assert!(matches!(
            read_limited(&mut long, 10),
            Err(RpcError::TooLong(10))
        ));
        let mut ok = std::io::Cursor::new(vec![b'x'; 10]);
        assert_eq!(read_limited(&mut ok, 10).unwrap().len(), 10);
    }
}
