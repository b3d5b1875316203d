//! The CNI side never panics on any config, for any verb, and always prints JSON (or
//! nothing, for a DEL, CHECK, GC or STATUS that succeeded).
#![no_main]

use libfuzzer_sys::fuzz_target;
use randport_plugin::cni::{CniEnv, run};
use randport_plugin::agent::rpc::Response;

fuzz_target!(|data: &[u8]| {
    for command in ["ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION"] {
        let env = CniEnv {
            command: command.into(),
            container_id: "fuzz".into(),
            args: "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=pod".into(),
        };
        let out = run(&env, data, &mut |_, _| Ok(Response::Ok { records: vec![], ready: true }));
        if !out.stdout.is_empty() {
            serde_json::from_str::<serde_json::Value>(&out.stdout).expect("stdout is JSON");
        }
        assert!(out.success || !out.stdout.is_empty(), "a failure prints an error");
    }
});
