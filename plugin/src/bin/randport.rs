//! `randport`: the CNI plugin. Reads the runtime's request, asks randportd, prints the
//! result or a CNI error (exit status 1). A DEL with randportd down removes the sandbox's
//! mappings itself (see `randport_plugin::offline`), so that it never blocks the node.

use std::io::{Read, Write};
use std::process::ExitCode;

use randport_plugin::agent::rpc::call;
use randport_plugin::cni::offline;
use randport_plugin::cni::{AGENT_TIMEOUT, CniEnv, run_with};
use randport_plugin::firewall;
use randport_plugin::netfilter::conntrack::NetlinkConntrack;

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let env = CniEnv::from_process();
    if env.command != "VERSION" {
        let _ = std::io::stdin().read_to_end(&mut stdin);
    }
    let outcome = run_with(
        &env,
        &stdin,
        &mut |socket, request| call(socket, request, AGENT_TIMEOUT),
        &mut |state_dir, sandbox| {
            let backend =
                |info: offline::AgentInfo| offline::backend_for(&info, &firewall::run_tool);
            let removed = offline::remove_sandbox(state_dir, sandbox, &backend, &NetlinkConntrack)?;
            // The runtime keeps the plugin's stderr in its log: say what happened.
            eprintln!(
                "randport: DEL {sandbox}: randportd is not reachable; {}",
                if removed {
                    "removed the sandbox's rules, conntrack entries and record without it"
                } else {
                    "nothing of this sandbox was recorded"
                }
            );
            Ok(())
        },
    );
    let mut out = std::io::stdout();
    let _ = out.write_all(outcome.stdout.as_bytes());
    let _ = out.flush();
    if outcome.success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
