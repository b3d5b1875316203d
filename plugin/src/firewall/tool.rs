//! The one place the firewall runs programs (`nft`, `iptables-restore`, `iptables-save`…):
//! a small trait with typed errors, the real implementation and, for tests, a recording
//! fake ([`super::fake::RecordingTool`]).

use std::io::Write as _;
use std::process::{Command, Stdio};

/// Why a program did not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ToolError {
    /// It could not be started.
    #[error("cannot run {program}: {reason}; is it installed?")]
    NotInstalled {
        /// The program.
        program: String,
        /// The operating system's words.
        reason: String,
    },
    /// It said the table or chain it was asked about does not exist.
    #[error("{stderr}")]
    NoSuchTable {
        /// The program.
        program: String,
        /// Its own words.
        stderr: String,
    },
    /// It failed otherwise.
    #[error("{}", if stderr.is_empty() { format!("{program} exited with status {status:?}") } else { stderr.clone() })]
    Failed {
        /// The program.
        program: String,
        /// Its exit status (None when killed by a signal).
        status: Option<i32>,
        /// Its own words.
        stderr: String,
    },
}

impl ToolError {
    /// Sorts a failed run by what the program said.
    pub fn classify(program: &str, status: Option<i32>, stderr: &str) -> ToolError {
        let stderr = stderr.trim().to_owned();
        // nft: "No such file or directory" for a missing table, chain or set; iptables:
        // "No chain/target/match by that name", "does not exist".
        let missing = [
            "No such file or directory",
            "No chain/target/match by that name",
            "does not exist",
        ];
        if missing.iter().any(|m| stderr.contains(m)) {
            ToolError::NoSuchTable {
                program: program.to_owned(),
                stderr,
            }
        } else {
            ToolError::Failed {
                program: program.to_owned(),
                status,
                stderr,
            }
        }
    }
}

/// Runs programs: (program, args, stdin) to its stdout.
pub trait Tool: Send + Sync + std::fmt::Debug {
    /// Runs `program args` with `input` on stdin.
    fn run(&self, program: &str, args: &[&str], input: &str) -> Result<String, ToolError>;
}

/// The node's programs, run for real.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemTool;

/// The one [`SystemTool`] (the backends keep a `&'static dyn Tool`).
pub static SYSTEM: SystemTool = SystemTool;

impl Tool for SystemTool {
    fn run(&self, program: &str, args: &[&str], input: &str) -> Result<String, ToolError> {
        let failed = |reason: String| ToolError::Failed {
            program: program.to_owned(),
            status: None,
            stderr: reason,
        };
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| ToolError::NotInstalled {
                program: program.to_owned(),
                reason: e.to_string(),
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(input.as_bytes())
                .map_err(|e| failed(format!("writing to {program}: {e}")))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| failed(format!("waiting for {program}: {e}")))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(ToolError::classify(
                program,
                out.status.code(),
                &String::from_utf8_lossy(&out.stderr),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_sorted_by_what_the_program_said() {
        let nft = ToolError::classify(
            "nft",
            Some(1),
            "Error: No such file or directory\nlist table inet randport\n",
        );
        assert!(matches!(nft, ToolError::NoSuchTable { .. }), "{nft:?}");
        let ipt = ToolError::classify(
            "iptables-save",
            Some(1),
            "iptables: No chain/target/match by that name.",
        );
        assert!(matches!(ipt, ToolError::NoSuchTable { .. }), "{ipt:?}");
        let other = ToolError::classify("nft", Some(1), "Error: syntax error");
        assert_eq!(other.to_string(), "Error: syntax error");
        let silent = ToolError::classify("nft", Some(2), "");
        assert_eq!(silent.to_string(), "nft exited with status Some(2)");
    }

    #[test]
    fn a_missing_program_says_so() {
        let err = SYSTEM.run("randport-no-such-program", &[], "").unwrap_err();
        assert!(matches!(err, ToolError::NotInstalled { .. }), "{err:?}");
        assert!(
            err.to_string()
                .starts_with("cannot run randport-no-such-program"),
            "{err}"
        );
        assert_eq!(SYSTEM.run("cat", &[], "hello").unwrap(), "hello");
        let failed = SYSTEM
            .run("sh", &["-c", "echo oops >&2; exit 3"], "")
            .unwrap_err();
        assert_eq!(
            failed,
            ToolError::Failed {
                program: "sh".into(),
                status: Some(3),
                stderr: "oops".into()
            }
        );
    }
}
