//! The CNI side of randport: reads the runtime's environment and network config, asks
//! the agent, and prints the result (ADD: `prevResult`, unchanged) or a CNI error.
//!
//! Config, as an entry of a conflist after the main plugin:
//! `{"type": "randport", "socket": "/run/randport/randportd.sock"}` (socket optional).

pub mod offline;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use randport_core::{CniCode, PodRef, SandboxId};
use rscni_types::error::Error as CniError;
use rscni_types::types::{Cmd, ErrorResult, NetConf};
use rscni_types::version::{PluginInfo, SpecVersion};
use serde_json::Value;

use crate::agent::rpc::{AddRequest, Request, Response, RpcError};

pub use crate::agent::rpc::{AGENT_TIMEOUT, DEFAULT_ADD_DEADLINE};
pub use crate::node::{DEFAULT_SOCKET, DEFAULT_STATE_DIR};

/// What a DEL does when the agent cannot be reached: removes the sandbox's mappings
/// itself, given the agent's state directory (see [`crate::cni::offline`]); the error says why
/// it could not.
pub type DelWithoutAgent<'a> = &'a mut dyn FnMut(&Path, &SandboxId) -> Result<(), String>;

/// The spec versions randport speaks.
pub fn plugin_info() -> PluginInfo {
    PluginInfo::new(
        SpecVersion::CURRENT,
        vec![
            SpecVersion::new(0, 3, 1),
            SpecVersion::new(0, 4, 0),
            SpecVersion::new(1, 0, 0),
            SpecVersion::new(1, 1, 0),
        ],
    )
}

/// The `CNI_*` environment of one invocation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniEnv {
    /// `CNI_COMMAND`.
    pub command: String,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_ARGS`.
    pub args: String,
}

impl CniEnv {
    /// Reads the process environment.
    pub fn from_process() -> Self {
        let var = |name: &str| std::env::var(name).unwrap_or_default();
        CniEnv {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            args: var("CNI_ARGS"),
        }
    }

    /// `CNI_ARGS` as key-value pairs (`K8S_POD_NAME=web-0;K8S_POD_NAMESPACE=shop;…`).
    pub fn arg_map(&self) -> HashMap<&str, &str> {
        self.args
            .split(';')
            .filter_map(|kv| kv.split_once('='))
            .collect()
    }
}

/// A finished invocation: what to print on stdout, and whether it succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The text for stdout.
    pub stdout: String,
    /// Exit status 0 when true, 1 otherwise.
    pub success: bool,
}

fn failure(version: SpecVersion, error: &CniError) -> Outcome {
    let json = serde_json::to_string(&ErrorResult::new(version, error)).unwrap_or_default();
    Outcome {
        stdout: json,
        success: false,
    }
}

/// Runs one CNI invocation: `env` and the config on `stdin`; `call` reaches the agent
/// (the socket in the config is passed to it). A DEL that cannot reach the agent fails
/// (code 11); [`run_with`] gives it a way to remove the mappings itself.
pub fn run(
    env: &CniEnv,
    stdin: &[u8],
    call: &mut dyn FnMut(&PathBuf, &Request) -> Result<Response, RpcError>,
) -> Outcome {
    run_with(env, stdin, call, &mut |_, _| {
        Err("this caller cannot remove mappings itself".into())
    })
}

/// [`run`], with `del_without_agent` for a DEL when the agent cannot be reached (the state
/// directory comes from the config's `stateDir`, else [`DEFAULT_STATE_DIR`]).
pub fn run_with(
    env: &CniEnv,
    stdin: &[u8],
    call: &mut dyn FnMut(&PathBuf, &Request) -> Result<Response, RpcError>,
    del_without_agent: DelWithoutAgent<'_>,
) -> Outcome {
    let info = plugin_info();
    let cmd: Cmd = match env.command.parse() {
        Ok(cmd) => cmd,
        Err(e) => return failure(SpecVersion::CURRENT, &e),
    };
    if cmd == Cmd::Version {
        let json = serde_json::to_string(&info).unwrap_or_default();
        return Outcome {
            stdout: json,
            success: true,
        };
    }
    let raw: Value = match serde_json::from_slice(stdin) {
        Ok(v) => v,
        Err(e) => {
            return failure(
                SpecVersion::CURRENT,
                &CniError::FailedToDecode(format!("network config on stdin is not JSON: {e}")),
            );
        }
    };
    let conf: NetConf = match serde_json::from_value(raw.clone()) {
        Ok(c) => c,
        Err(e) => {
            return failure(
                SpecVersion::CURRENT,
                &CniError::FailedToDecode(format!("network config: {e}")),
            );
        }
    };
    let version = match info.negotiate(&conf, cmd) {
        Ok(v) => v,
        Err(e) => return failure(conf.version().unwrap_or(SpecVersion::CURRENT), &e),
    };
    let paths = absolute_path(&raw, "socket", DEFAULT_SOCKET)
        .and_then(|socket| Ok((socket, absolute_path(&raw, "stateDir", DEFAULT_STATE_DIR)?)));
    let (socket, state_dir) = match paths {
        Ok(paths) => paths,
        Err(e) => return failure(version, &e),
    };
    match invoke(
        cmd,
        env,
        &raw,
        &conf,
        (&socket, &state_dir),
        call,
        del_without_agent,
    ) {
        Ok(stdout) => {
            let stdout = match stdout {
                Some(mut result) => {
                    if let Some(obj) = result.as_object_mut() {
                        obj.entry("cniVersion")
                            .or_insert_with(|| Value::String(version.to_string()));
                    }
                    result.to_string()
                }
                None => String::new(),
            };
            Outcome {
                stdout,
                success: true,
            }
        }
        Err(e) => failure(version, &e),
    }
}

/// The absolute path in the config's `key`, or `default` when it is not there.
fn absolute_path(raw: &Value, key: &str, default: &str) -> Result<PathBuf, CniError> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(PathBuf::from(default)),
        Some(Value::String(s)) if s.starts_with('/') => Ok(PathBuf::from(s)),
        Some(other) => Err(CniError::InvalidNetworkConfig(format!(
            "\"{key}\" must be an absolute path, not {other}"
        ))),
    }
}

fn need_container_id(env: &CniEnv) -> Result<SandboxId, CniError> {
    if env.container_id.is_empty() {
        return Err(CniError::missing_env(&["CNI_CONTAINERID"]));
    }
    Ok(SandboxId(env.container_id.clone()))
}

fn pod_from_args(env: &CniEnv) -> Result<PodRef, CniError> {
    let args = env.arg_map();
    let (Some(ns), Some(name)) = (args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME")) else {
        return Err(CniError::InvalidEnvValue(
            "CNI_ARGS lacks K8S_POD_NAMESPACE or K8S_POD_NAME; randport needs them to find the pod \
             (Kubernetes runtimes pass them)"
                .into(),
        ));
    };
    let mut pod = PodRef::new(*ns, *name);
    pod.uid = args
        .get("K8S_POD_UID")
        .copied()
        .unwrap_or_default()
        .to_owned();
    Ok(pod)
}

/// The pod's addresses in `prevResult.ips`, in order, without their prefix lengths.
pub fn prev_result_ips(prev: &Value) -> Result<Vec<IpAddr>, CniError> {
    let mut ips = Vec::new();
    for ip in prev["ips"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let text = ip["address"].as_str().unwrap_or_default();
        let addr = text.split('/').next().unwrap_or_default();
        ips.push(addr.parse().map_err(|_| {
            CniError::FailedToDecode(format!("prevResult has an invalid address {text:?}"))
        })?);
    }
    Ok(ips)
}

fn agent_error(error: RpcError, cmd: Cmd) -> CniError {
    match (&error, cmd) {
        (RpcError::Connect { .. }, Cmd::Status) => CniError::PluginNotAvailable(error.to_string()),
        (RpcError::Connect { .. }, _) => CniError::TryAgainLater(error.to_string()),
        _ => CniError::IOFailure(error.to_string()),
    }
}

fn invoke(
    cmd: Cmd,
    env: &CniEnv,
    raw: &Value,
    conf: &NetConf,
    (socket, state_dir): (&PathBuf, &PathBuf),
    call: &mut dyn FnMut(&PathBuf, &Request) -> Result<Response, RpcError>,
    del_without_agent: DelWithoutAgent<'_>,
) -> Result<Option<Value>, CniError> {
    let request = match cmd {
        Cmd::Add => {
            let prev = raw.get("prevResult").filter(|v| v.is_object()).ok_or_else(|| {
                CniError::InvalidNetworkConfig(
                    "no prevResult: randport must come after the main plugin (the one that assigns pod \
                     IPs) in the conflist"
                        .into(),
                )
            })?;
            Request::Add(AddRequest {
                sandbox: need_container_id(env)?,
                pod: pod_from_args(env)?,
                pod_ips: prev_result_ips(prev)?,
                network: Some(conf.name.clone()).filter(|n| !n.is_empty()),
            })
        }
        Cmd::Del => Request::Del {
            sandbox: need_container_id(env)?,
        },
        Cmd::Check => Request::Check {
            sandbox: need_container_id(env)?,
        },
        Cmd::Gc => Request::Gc {
            valid: conf.valid_attachments.as_ref().map(|attachments| {
                attachments
                    .iter()
                    .map(|a| SandboxId(a.container_id.clone()))
                    .collect()
            }),
            network: Some(conf.name.clone()).filter(|n| !n.is_empty()),
        },
        Cmd::Status => Request::Status,
        Cmd::Version => return Ok(None),
    };
    let response = match (call(socket, &request), &request) {
        // A DEL never blocks the node: without the agent, the plugin removes the mappings.
        (Err(e @ RpcError::Connect { .. }), Request::Del { sandbox }) => {
            return match del_without_agent(state_dir, sandbox) {
                Ok(()) => Ok(None),
                Err(why) => Err(CniError::TryAgainLater(format!(
                    "{e}; removing sandbox {sandbox}'s mappings without it failed too: {why}"
                ))),
            };
        }
        (result, _) => result.map_err(|e| agent_error(e, cmd))?,
    };
    match response {
        Response::Error(reply) => Err(match CniCode::from_code(reply.code) {
            Some(CniCode::IoFailure) => CniError::IOFailure(reply.details),
            Some(CniCode::FailedToDecode) => CniError::FailedToDecode(reply.details),
            Some(CniCode::InvalidNetworkConfig) => CniError::InvalidNetworkConfig(reply.details),
            Some(CniCode::TryAgainLater) => CniError::TryAgainLater(reply.details),
            _ => CniError::Custom(reply.code, reply.msg, reply.details),
        }),
        Response::Ok { ready, .. } => match cmd {
            Cmd::Add => Ok(raw.get("prevResult").cloned()),
            Cmd::Status if !ready => Err(CniError::PluginNotAvailable(
                "randportd is starting (restoring mappings)".into(),
            )),
            _ => Ok(None),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::rpc::ErrorReply;
    use serde_json::json;

    fn env(command: &str) -> CniEnv {
        CniEnv {
            command: command.into(),
            container_id: "c0ffee".into(),
            args: "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=u1".into(),
        }
    }

    fn conf(version: &str) -> Value {
        json!({
            "cniVersion": version, "name": "kindnet", "type": "randport",
            "prevResult": {"cniVersion": version, "interfaces": [{"name": "eth0"}],
                           "ips": [{"address": "198.18.0.5/19", "gateway": "198.18.0.1"},
                                   {"address": "2001:db8:1::5/64"}]}
        })
    }

    /// Runs with an agent that records the request and answers `reply`.
    fn run_with(
        env: &CniEnv,
        stdin: &Value,
        reply: Result<Response, RpcError>,
    ) -> (Outcome, Option<(PathBuf, Request)>) {
        let mut seen = None;
        let mut reply = Some(reply);
        let out = run(env, stdin.to_string().as_bytes(), &mut |socket, req| {
            seen = Some((socket.clone(), req.clone()));
            reply.take().expect("one call")
        });
        (out, seen)
    }

    fn ok() -> Result<Response, RpcError> {
        Ok(Response::Ok {
            records: vec![],
            ready: true,
        })
    }

    #[test]
    fn add_sends_pod_and_ips_and_prints_prev_result_unchanged() {
        for version in ["0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
            let (out, seen) = run_with(&env("ADD"), &conf(version), ok());
            assert!(out.success, "{version}: {}", out.stdout);
            let printed: Value = serde_json::from_str(&out.stdout).unwrap();
            assert_eq!(printed, conf(version)["prevResult"]);
            let (socket, req) = seen.unwrap();
            assert_eq!(socket, PathBuf::from(DEFAULT_SOCKET));
            let Request::Add(add) = req else { panic!() };
            assert_eq!(add.pod.to_string(), "shop/web-0");
            assert_eq!(add.pod.uid, "u1");
            assert_eq!(
                add.pod_ips,
                vec![
                    "198.18.0.5".parse::<IpAddr>().unwrap(),
                    "2001:db8:1::5".parse().unwrap()
                ]
            );
        }
    }

    #[test]
    fn version_lists_the_supported_versions() {
        let (out, seen) = run_with(&env("VERSION"), &json!({}), ok());
        assert!(seen.is_none());
        assert_eq!(
            out.stdout,
            r#"{"cniVersion":"1.1.0","supportedVersions":["0.3.1","0.4.0","1.0.0","1.1.0"]}"#
        );
    }

    #[test]
    fn socket_comes_from_the_config() {
        let mut c = conf("1.0.0");
        c["socket"] = json!("/tmp/x.sock");
        let (_, seen) = run_with(&env("DEL"), &c, ok());
        assert_eq!(
            seen.unwrap(),
            (
                PathBuf::from("/tmp/x.sock"),
                Request::Del {
                    sandbox: SandboxId("c0ffee".into())
                }
            )
        );
        c["socket"] = json!("relative.sock");
        let (out, _) = run_with(&env("DEL"), &c, ok());
        assert!(
            out.stdout.contains("\"code\":7") && out.stdout.contains("absolute path"),
            "{}",
            out.stdout
        );
    }

    fn unreachable() -> Result<Response, RpcError> {
        Err(RpcError::Connect {
            path: "/run/randport/randportd.sock".into(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        })
    }

    /// Runs with an unreachable agent and a recording DEL-without-agent that answers
    /// `offline`; the outcome and what it was asked.
    fn run_agent_down(
        command: &str,
        conf: &Value,
        offline: Result<(), String>,
    ) -> (Outcome, Vec<(PathBuf, SandboxId)>) {
        let mut asked = Vec::new();
        let mut offline = Some(offline);
        let out = super::run_with(
            &env(command),
            conf.to_string().as_bytes(),
            &mut |_, _| unreachable(),
            &mut |dir, sandbox| {
                asked.push((dir.to_owned(), sandbox.clone()));
                offline.take().expect("one removal")
            },
        );
        (out, asked)
    }

    #[test]
    fn del_with_the_agent_down_removes_the_mappings_itself_and_succeeds() {
        let (out, asked) = run_agent_down("DEL", &conf("1.0.0"), Ok(()));
        assert!(out.success && out.stdout.is_empty(), "{}", out.stdout);
        assert_eq!(
            asked,
            vec![(PathBuf::from(DEFAULT_STATE_DIR), SandboxId("c0ffee".into()))]
        );
        // The state directory comes from the config.
        let mut c = conf("1.0.0");
        c["stateDir"] = json!("/tmp/randport-state");
        let (_, asked) = run_agent_down("DEL", &c, Ok(()));
        assert_eq!(asked[0].0, PathBuf::from("/tmp/randport-state"));
        c["stateDir"] = json!("state");
        let (out, asked) = run_agent_down("DEL", &c, Ok(()));
        assert!(
            out.stdout.contains("\"code\":7") && asked.is_empty(),
            "{}",
            out.stdout
        );
        // When that fails too, the runtime is told to retry, with both reasons.
        let (out, _) = run_agent_down("DEL", &conf("1.0.0"), Err("nft failed".into()));
        assert!(!out.success);
        assert!(
            out.stdout.contains("\"code\":11")
                && out.stdout.contains("is the randport agent running")
                && out.stdout.contains("nft failed"),
            "{}",
            out.stdout
        );
    }

    #[test]
    fn add_and_check_with_the_agent_down_fail_with_code_11_and_touch_nothing() {
        for command in ["ADD", "CHECK"] {
            let (out, asked) = run_agent_down(command, &conf("1.0.0"), Ok(()));
            assert!(!out.success, "{command}");
            assert!(
                out.stdout.contains("\"code\":11"),
                "{command}: {}",
                out.stdout
            );
            assert!(
                out.stdout
                    .contains("is the randport agent running on this node"),
                "{command}: {}",
                out.stdout
            );
            assert!(asked.is_empty(), "{command} removed something");
        }
    }

    #[test]
    fn gc_sends_the_valid_attachments() {
        let mut c = conf("1.1.0");
        c["cni.dev/valid-attachments"] =
            json!([{"containerID": "a", "ifname": "eth0"}, {"containerID": "b", "ifname": "eth0"}]);
        let (out, seen) = run_with(&env("GC"), &c, ok());
        assert!(out.success && out.stdout.is_empty());
        assert_eq!(
            seen.unwrap().1,
            Request::Gc {
                valid: Some(vec![SandboxId("a".into()), SandboxId("b".into())]),
                network: Some("kindnet".into()),
            }
        );
    }

    #[test]
    fn gc_without_valid_attachments_sends_no_list() {
        // libcni's GC without arguments DELs every attachment it knows, then sends GC with
        // no key: that must not read as "nothing is valid".
        let (out, seen) = run_with(&env("GC"), &conf("1.1.0"), ok());
        assert!(out.success && out.stdout.is_empty());
        assert_eq!(
            seen.unwrap().1,
            Request::Gc {
                valid: None,
                network: Some("kindnet".into())
            }
        );
    }

    #[test]
    fn the_spec_codes_we_use_are_rscnis_numbers_and_words() {
        let s = String::new;
        for (error, code) in [
            (
                CniError::IncompatibleVersion(s()),
                CniCode::IncompatibleVersion,
            ),
            (CniError::InvalidEnvValue(s()), CniCode::InvalidEnvValue),
            (CniError::IOFailure(s()), CniCode::IoFailure),
            (CniError::FailedToDecode(s()), CniCode::FailedToDecode),
            (
                CniError::InvalidNetworkConfig(s()),
                CniCode::InvalidNetworkConfig,
            ),
            (CniError::TryAgainLater(s()), CniCode::TryAgainLater),
            (
                CniError::PluginNotAvailable(s()),
                CniCode::PluginNotAvailable,
            ),
        ] {
            assert_eq!((u32::from(&error), error.msg()), (code.code(), code.msg()));
        }
    }

    #[test]
    fn errors_are_cni_error_json_with_the_right_code() {
        let code = |out: &Outcome| {
            serde_json::from_str::<Value>(&out.stdout).unwrap()["code"]
                .as_u64()
                .unwrap()
        };
        // Malformed config.
        let out = run(&env("ADD"), b"{not json", &mut |_, _| unreachable!());
        assert!(!out.success);
        assert_eq!(code(&out), 6);
        // Unknown version.
        let (out, _) = run_with(&env("ADD"), &conf("9.9.9"), ok());
        assert_eq!(code(&out), 1, "{}", out.stdout);
        // GC is not in 1.0.0.
        let (out, _) = run_with(&env("GC"), &conf("1.0.0"), ok());
        assert_eq!(code(&out), 1);
        // Missing CNI_ARGS.
        let mut no_args = env("ADD");
        no_args.args.clear();
        let (out, _) = run_with(&no_args, &conf("1.0.0"), ok());
        assert_eq!(code(&out), 4);
        assert!(out.stdout.contains("K8S_POD_NAMESPACE"));
        // Missing prevResult.
        let mut no_prev = conf("1.0.0");
        no_prev.as_object_mut().unwrap().remove("prevResult");
        let (out, _) = run_with(&env("ADD"), &no_prev, ok());
        assert_eq!(code(&out), 7);
        // Unknown command.
        let (out, _) = run_with(&env("FROB"), &conf("1.0.0"), ok());
        assert_eq!(code(&out), 4);
        // The agent's own errors keep their code and details.
        let reply = Response::Error(ErrorReply {
            code: 101,
            msg: "no host port available".into(),
            details: "pod shop/web-0: …".into(),
        });
        let (out, _) = run_with(&env("ADD"), &conf("1.0.0"), Ok(reply));
        let v: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(
            (v["code"].as_u64(), v["msg"].as_str(), v["details"].as_str()),
            (
                Some(101),
                Some("no host port available"),
                Some("pod shop/web-0: …")
            )
        );
        assert_eq!(v["cniVersion"], "1.0.0");
    }

    #[test]
    fn agent_down_says_so() {
        let down = || {
            Err(RpcError::Connect {
                path: DEFAULT_SOCKET.into(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            })
        };
        let (out, _) = run_with(&env("ADD"), &conf("1.1.0"), down());
        let v: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["code"], 11);
        assert!(
            v["details"]
                .as_str()
                .unwrap()
                .contains("is the randport agent running on this node")
        );
        let (out, _) = run_with(&env("STATUS"), &conf("1.1.0"), down());
        assert_eq!(
            serde_json::from_str::<Value>(&out.stdout).unwrap()["code"],
            50
        );
        let (out, _) = run_with(
            &env("STATUS"),
            &conf("1.1.0"),
            Ok(Response::Ok {
                records: vec![],
                ready: false,
            }),
        );
        assert_eq!(
            serde_json::from_str::<Value>(&out.stdout).unwrap()["code"],
            50
        );
    }
}
