//! The node's own things: bound sockets that hold host ports ([`holder`]), the records on
//! disk ([`state`]), the node's port settings and route_localnet ([`ports`]), and putting
//! the plugin into the runtime's CNI config ([`install`]).

/// The agent's default socket (the plugin's default too).
pub const DEFAULT_SOCKET: &str = "/run/randport/randportd.sock";
/// The agent's default state directory (its records; the plugin's DEL without the agent
/// reads it).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/randport";

pub mod holder;
pub mod install;
pub mod ports;
pub mod state;
