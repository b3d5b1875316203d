//! `randport`: the CNI plugin. Reads the runtime's request, asks randportd, prints the
//! result or a CNI error (exit status 1).

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use randport_plugin::cni::{CniEnv, run};
use randport_plugin::rpc::call;

/// How long one request to the agent may take (ADD may wait for a new pod to appear).
const AGENT_TIMEOUT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let env = CniEnv::from_process();
    if env.command != "VERSION" {
        let _ = std::io::stdin().read_to_end(&mut stdin);
    }
    let outcome = run(&env, &stdin, &mut |socket, request| {
        call(socket, request, AGENT_TIMEOUT)
    });
    let mut out = std::io::stdout();
    let _ = out.write_all(outcome.stdout.as_bytes());
    let _ = out.flush();
    if outcome.success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
