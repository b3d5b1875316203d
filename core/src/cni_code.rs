//! Every CNI error code randport returns, in one place: the spec's codes it uses and its own
//! (100 and up), each with the short message (`msg` of the CNI error JSON). The agent, its
//! socket server and the plugin take their codes from here; docs/troubleshooting.md has a
//! section for each ([`CniCode::ALL`]), which a test checks.

/// A CNI error code randport returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CniCode {
    /// 1: the config's cniVersion, or the verb in it, is not supported.
    IncompatibleVersion,
    /// 4: CNI_ARGS lacks the pod's namespace or name.
    InvalidEnvValue,
    /// 5: reading or writing a file or socket failed.
    IoFailure,
    /// 6: the input could not be decoded.
    FailedToDecode,
    /// 7: the network config is wrong (no prevResult, a relative path, a reused sandbox).
    InvalidNetworkConfig,
    /// 11: the agent is down or starting, or the pod is not known yet.
    TryAgainLater,
    /// 50: STATUS while the agent is down or starting.
    PluginNotAvailable,
    /// 101: no host port available (range exhausted, explicit hostPort busy or taken).
    NoHostPort,
    /// 102: the pod's ports or annotation are invalid.
    InvalidPod,
    /// 103: the firewall change failed.
    FirewallChangeFailed,
    /// 104: the annotation could not be written back.
    WritebackFailed,
    /// 105: CHECK found a rule or a held port missing.
    MappingMissing,
    /// 106: a DEL could not remove everything.
    CleanupIncomplete,
    /// 107: the sandbox was deleted (DEL or GC) while or before its ADD ran; the ADD was
    /// undone.
    SandboxDeleted,
    /// 126: the caller may not use the agent's socket.
    PermissionDenied,
}

impl CniCode {
    /// Every code, in numeric order.
    pub const ALL: [CniCode; 15] = [
        CniCode::IncompatibleVersion,
        CniCode::InvalidEnvValue,
        CniCode::IoFailure,
        CniCode::FailedToDecode,
        CniCode::InvalidNetworkConfig,
        CniCode::TryAgainLater,
        CniCode::PluginNotAvailable,
        CniCode::NoHostPort,
        CniCode::InvalidPod,
        CniCode::FirewallChangeFailed,
        CniCode::WritebackFailed,
        CniCode::MappingMissing,
        CniCode::CleanupIncomplete,
        CniCode::SandboxDeleted,
        CniCode::PermissionDenied,
    ];

    /// The number on the wire.
    pub fn code(self) -> u32 {
        match self {
            CniCode::IncompatibleVersion => 1,
            CniCode::InvalidEnvValue => 4,
            CniCode::IoFailure => 5,
            CniCode::FailedToDecode => 6,
            CniCode::InvalidNetworkConfig => 7,
            CniCode::TryAgainLater => 11,
            CniCode::PluginNotAvailable => 50,
            CniCode::NoHostPort => 101,
            CniCode::InvalidPod => 102,
            CniCode::FirewallChangeFailed => 103,
            CniCode::WritebackFailed => 104,
            CniCode::MappingMissing => 105,
            CniCode::CleanupIncomplete => 106,
            CniCode::SandboxDeleted => 107,
            CniCode::PermissionDenied => 126,
        }
    }

    /// The short message (`msg`); the spec's wording for its codes.
    pub fn msg(self) -> &'static str {
        match self {
            CniCode::IncompatibleVersion => "Incompatible CNI version",
            CniCode::InvalidEnvValue => "Invalid necessary environment variables",
            CniCode::IoFailure => "I/O failure",
            CniCode::FailedToDecode => "Failed to decode content",
            CniCode::InvalidNetworkConfig => "Invalid network config",
            CniCode::TryAgainLater => "Try again later",
            CniCode::PluginNotAvailable => "Plugin not available",
            CniCode::NoHostPort => "no host port available",
            CniCode::InvalidPod => "invalid pod",
            CniCode::FirewallChangeFailed => "firewall change failed",
            CniCode::WritebackFailed => "annotation writeback failed",
            CniCode::MappingMissing => "mapping missing",
            CniCode::CleanupIncomplete => "cleanup incomplete",
            CniCode::SandboxDeleted => "sandbox deleted during ADD",
            CniCode::PermissionDenied => "permission denied",
        }
    }

    /// The code with this number.
    pub fn from_code(code: u32) -> Option<CniCode> {
        CniCode::ALL.into_iter().find(|c| c.code() == code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_ordered_and_found_by_number() {
        let numbers: Vec<u32> = CniCode::ALL.iter().map(|c| c.code()).collect();
        let mut sorted = numbers.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(numbers, sorted, "ALL is in numeric order, without repeats");
        for c in CniCode::ALL {
            assert_eq!(CniCode::from_code(c.code()), Some(c));
        }
        assert_eq!(CniCode::from_code(2), None);
    }
}
