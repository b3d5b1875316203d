//! Installing the plugin on a node: the binary into the CNI bin directory, and our entry
//! at the end of the node's existing conflist (kindnet's, flannel's, ...), chained after
//! whatever is there. Both steps are idempotent; uninstall takes out exactly our entry and
//! leaves the rest of the file as it was. Network plugins rewrite their conflist now and
//! then (kindnet does on every start), so the agent puts the entry back when it goes
//! missing ([`ensure_entry`] on a timer).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::node::state::write_atomic;
use crate::node::{DEFAULT_SOCKET, DEFAULT_STATE_DIR};

/// Our plugin's `type` in a conflist.
pub const PLUGIN_TYPE: &str = "randport";

/// Something about the node's CNI configuration that stops an install.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// No configuration file to chain into.
    #[error(
        "no network configuration (*.conflist) in {0}: install the cluster's network plugin \
         first; randport chains after it"
    )]
    NoConflist(PathBuf),
    /// The runtime would pick a single-plugin file, which cannot chain.
    #[error(
        "{0}: the runtime uses this single-plugin config, which cannot chain another plugin; \
         turn it into a .conflist ({{\"name\", \"cniVersion\", \"plugins\": [it]}})"
    )]
    NotAList(PathBuf),
    /// Multus delegates to a network whose conflist is not in this directory.
    #[error(
        "{path}: Multus delegates the cluster network to {delegate}, which is not a conflist \
         in this directory; randport goes into the cluster network's conflist: point Multus' \
         clusterNetwork at a .conflist here (or install randport into that network's conflist \
         where it lives)"
    )]
    MultusDelegate {
        /// Multus' config.
        path: PathBuf,
        /// What it delegates to.
        delegate: String,
    },
    /// The file is not a conflist.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Our conflist entry; the socket and the agent's state directory (where a DEL without
/// the agent finds the records) only when they are not the defaults.
pub fn entry(socket: &Path, state_dir: &Path) -> Value {
    let mut entry = json!({ "type": PLUGIN_TYPE });
    if socket != Path::new(DEFAULT_SOCKET) {
        entry["socket"] = Value::String(socket.display().to_string());
    }
    if state_dir != Path::new(DEFAULT_STATE_DIR) {
        entry["stateDir"] = Value::String(state_dir.display().to_string());
    }
    entry
}

fn plugins_mut<'a>(
    path: &Path,
    conflist: &'a mut Value,
) -> Result<&'a mut Vec<Value>, InstallError> {
    conflist
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| InstallError::Invalid {
            path: path.to_owned(),
            reason: "has no \"plugins\" list".into(),
        })
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// `conflist` with `entry` as its last plugin (replacing an older entry of ours in place);
/// `None` when it is already there exactly.
pub fn with_entry(
    path: &Path,
    conflist: &Value,
    entry: &Value,
) -> Result<Option<Value>, InstallError> {
    let mut out = conflist.clone();
    let plugins = plugins_mut(path, &mut out)?;
    match plugins.iter().position(is_ours) {
        Some(i) if plugins[i] == *entry => return Ok(None),
        Some(i) => plugins[i] = entry.clone(),
        None => plugins.push(entry.clone()),
    }
    Ok(Some(out))
}

/// `conflist` without our entries; `None` when it has none.
pub fn without_entry(path: &Path, conflist: &Value) -> Result<Option<Value>, InstallError> {
    let mut out = conflist.clone();
    let plugins = plugins_mut(path, &mut out)?;
    let before = plugins.len();
    plugins.retain(|p| !is_ours(p));
    Ok((plugins.len() != before).then_some(out))
}

/// The `type` of the first plugin before ours in `conflist` that declares the
/// `portMappings` capability (portmap, or a network plugin that maps hostPorts itself):
/// the runtime passes it every explicit hostPort, and it maps them. Without our entry in
/// the list, every plugin counts as before ours.
pub fn earlier_port_mapper(conflist: &Value) -> Option<String> {
    let plugins = conflist.get("plugins")?.as_array()?;
    let ours = plugins.iter().position(is_ours).unwrap_or(plugins.len());
    plugins[..ours]
        .iter()
        .find(|p| p.pointer("/capabilities/portMappings") == Some(&Value::Bool(true)))
        .map(|p| {
            p.get("type")
                .and_then(Value::as_str)
                .unwrap_or("(a plugin without a type)")
                .to_owned()
        })
}

/// [`earlier_port_mapper`] of the runtime's active config in `dir`; `None` when there is
/// none or it cannot be read.
pub fn earlier_port_mapper_in(dir: &Path) -> Option<String> {
    let path = active_config(dir).ok()?;
    earlier_port_mapper(&read_json(&path).ok()?)
}

/// The conflist our entry goes into: the file the runtime uses (the first `.conf`,
/// `.conflist` or `.json` in name order, as containerd and CRI-O choose) when it is a
/// conflist; when it is Multus' config, the conflist of the cluster network Multus
/// delegates to (its `clusterNetwork`, a file or a network name, or else the first other
/// conflist here, which Multus' automatic configuration copies).
pub fn active_config(dir: &Path) -> Result<PathBuf, InstallError> {
    let mut names: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io_error(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|e| e == "conf" || e == "conflist" || e == "json")
        })
        .collect();
    names.sort();
    let first = names
        .into_iter()
        .next()
        .ok_or_else(|| InstallError::NoConflist(dir.to_owned()))?;
    let value = read_json(&first)?;
    if is_conflist(&value) {
        Ok(first)
    } else if is_multus(&value) {
        multus_delegate(dir, &first, &value)
    } else {
        Err(InstallError::NotAList(first))
    }
}

fn is_conflist(value: &Value) -> bool {
    value.get("plugins").is_some_and(Value::is_array)
}

fn is_multus(value: &Value) -> bool {
    matches!(
        value.get("type").and_then(Value::as_str),
        Some("multus" | "multus-shim")
    )
}

/// The conflist in `dir` of the network Multus (`multus`, at `path`) delegates to.
fn multus_delegate(dir: &Path, path: &Path, multus: &Value) -> Result<PathBuf, InstallError> {
    let mut others: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io_error(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p != path
                && p.extension()
                    .is_some_and(|e| e == "conflist" || e == "json")
        })
        .collect();
    others.sort();
    let conflists: Vec<(PathBuf, Value)> = others
        .into_iter()
        .filter_map(|p| read_json(&p).ok().filter(is_conflist).map(|v| (p, v)))
        .collect();
    let cluster = multus.get("clusterNetwork").and_then(Value::as_str);
    let found = match cluster {
        // A file: Multus names it as its container sees it; the same file is here.
        Some(file)
            if file.contains('/') || file.ends_with(".conflist") || file.ends_with(".conf") =>
        {
            let name = Path::new(file).file_name().unwrap_or_default();
            conflists.iter().find(|(p, _)| p.file_name() == Some(name))
        }
        Some(network) => conflists
            .iter()
            .find(|(_, v)| v.get("name").and_then(Value::as_str) == Some(network)),
        None => conflists.first(),
    };
    found
        .map(|(p, _)| p.clone())
        .ok_or_else(|| InstallError::MultusDelegate {
            path: path.to_owned(),
            delegate: cluster.unwrap_or("the first conflist").to_owned(),
        })
}

/// The suffix a single-plugin `.conf` is kept under while randport runs from the
/// `.conflist` made of it.
pub const ORIGINAL_SUFFIX: &str = "randport-orig";

/// Turns the single-plugin config at `path` (`NAME.conf`) into `NAME.conflist` holding it
/// and nothing else, keeping the original as `NAME.conf.randport-orig` (which no runtime
/// reads) for the uninstall to put back; returns the new file.
fn convert_single(path: &Path) -> Result<PathBuf, InstallError> {
    let mut plugin = read_json(path)?;
    let Some(object) = plugin.as_object_mut() else {
        return Err(InstallError::Invalid {
            path: path.to_owned(),
            reason: "is not a JSON object".into(),
        });
    };
    let version = object.remove("cniVersion").unwrap_or(json!("0.4.0"));
    let name = object.remove("name").unwrap_or(json!("randport-chain"));
    let list = path.with_extension("conflist");
    if list.exists() {
        return Err(InstallError::Invalid {
            path: list,
            reason: format!(
                "exists already beside {}; remove one of them",
                path.display()
            ),
        });
    }
    write_json(
        &list,
        &json!({"cniVersion": version, "name": name, "plugins": [plugin]}),
    )?;
    let kept = path.with_extension(format!("conf.{ORIGINAL_SUFFIX}"));
    fs::rename(path, &kept).map_err(io_error(path))?;
    Ok(list)
}

fn read_json(path: &Path) -> Result<Value, InstallError> {
    let bytes = fs::read(path).map_err(io_error(path))?;
    serde_json::from_slice(&bytes).map_err(|e| InstallError::Invalid {
        path: path.to_owned(),
        reason: format!("not JSON: {e}"),
    })
}

fn write_json(path: &Path, value: &Value) -> Result<(), InstallError> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| InstallError::Invalid {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    bytes.push(b'\n');
    write_atomic(path, &bytes).map_err(io_error(path))
}

/// Puts our entry ([`entry`]) into the runtime's conflist in `dir`; returns the file when
/// it changed it.
pub fn ensure_entry(dir: &Path, ours: &Value) -> Result<Option<PathBuf>, InstallError> {
    let path = match active_config(dir) {
        Ok(path) => path,
        // A single plugin cannot chain: it becomes a conflist of one, then gets our entry.
        Err(InstallError::NotAList(single)) => convert_single(&single)?,
        Err(e) => return Err(e),
    };
    let conflist = read_json(&path)?;
    match with_entry(&path, &conflist, ours)? {
        Some(changed) => {
            write_json(&path, &changed)?;
            Ok(Some(path))
        }
        None => Ok(None),
    }
}

/// Takes our entry out of every conflist in `dir`; returns the files it changed.
pub fn remove_entries(dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut changed = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(changed),
        Err(e) => return Err(io_error(dir)(e)),
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for path in paths {
        if path
            .extension()
            .is_none_or(|e| e != "conflist" && e != "json")
        {
            continue;
        }
        let Ok(conflist) = read_json(&path) else {
            continue;
        };
        if !conflist.get("plugins").is_some_and(Value::is_array) {
            continue;
        }
        if let Some(cleaned) = without_entry(&path, &conflist)? {
            write_json(&path, &cleaned)?;
            changed.push(path);
        }
    }
    // Single-plugin configs we turned into conflists go back as they were.
    let kept: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io_error(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.to_string_lossy()
                .ends_with(&format!(".conf.{ORIGINAL_SUFFIX}"))
        })
        .collect();
    for original in kept {
        let conf = original.with_extension("");
        let list = conf.with_extension("conflist");
        match fs::remove_file(&list) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(&list)(e)),
        }
        fs::rename(&original, &conf).map_err(io_error(&original))?;
        changed.push(conf);
    }
    Ok(changed)
}

/// Copies `binary` to `bin_dir/randport` (through a temporary file and a rename, so a
/// runtime executing the old one is not disturbed); returns whether it changed.
pub fn install_binary(binary: &Path, bin_dir: &Path) -> Result<bool, InstallError> {
    let target = bin_dir.join(PLUGIN_TYPE);
    let new = fs::read(binary).map_err(io_error(binary))?;
    if fs::read(&target).is_ok_and(|old| old == new) {
        return Ok(false);
    }
    fs::create_dir_all(bin_dir).map_err(io_error(bin_dir))?;
    let tmp = bin_dir.join(format!(".{PLUGIN_TYPE}.tmp-{}", std::process::id()));
    fs::write(&tmp, &new).map_err(io_error(&tmp))?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).map_err(io_error(&tmp))?;
    fs::rename(&tmp, &target).map_err(io_error(&target))?;
    Ok(true)
}

/// Removes the agent's state directory and everything in it; returns whether it was there.
/// A directory that is a mount point (the uninstall DaemonSet mounts it from the node, so
/// removing it fails with EBUSY) is emptied and left in place.
pub fn remove_state_dir(dir: &Path) -> io::Result<bool> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        if fs::symlink_metadata(&path)?.is_dir() {
            fs::remove_dir_all(&path)?;
        } else {
            fs::remove_file(&path)?;
        }
    }
    match fs::remove_dir(dir) {
        Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => Ok(true),
        other => other.map(|()| true),
    }
}

/// Removes `bin_dir/randport`; returns whether it was there.
pub fn remove_binary(bin_dir: &Path) -> Result<bool, InstallError> {
    let target = bin_dir.join(PLUGIN_TYPE);
    match fs::remove_file(&target) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_error(&target)(e)),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_state_dir_goes_with_everything_in_it() {
        let dir = std::env::temp_dir().join(format!("randport-rmstate-{}", std::process::id()));
        fs::create_dir_all(dir.join("sub")).unwrap();
        fs::write(dir.join("a.json"), "{}").unwrap();
        fs::write(dir.join("sub/b"), "x").unwrap();
        assert!(super::remove_state_dir(&dir).unwrap());
        assert!(!dir.exists());
        assert!(!super::remove_state_dir(&dir).unwrap(), "gone already");
    }

    use super::*;

    /// kindnet's conflist as kind writes it (whitespace and all).
    const KINDNET: &str = include_str!("../../tests/data/10-kindnet.conflist");

    fn dir_with(files: &[(&str, &str)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "randport-install-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        fs::create_dir_all(&dir).unwrap();
        for (name, text) in files {
            fs::write(dir.join(name), text).unwrap();
        }
        dir
    }

    fn plugin_types(path: &Path) -> Vec<String> {
        read_json(path).unwrap()["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn an_earlier_plugin_with_the_port_mappings_capability_is_found() {
        // kindnet's chain: portmap before randport.
        let dir = dir_with(&[("10-kindnet.conflist", KINDNET)]);
        assert_eq!(earlier_port_mapper_in(&dir), Some("portmap".into()));
        ensure_entry(
            &dir,
            &entry(Path::new(DEFAULT_SOCKET), Path::new(DEFAULT_STATE_DIR)),
        )
        .unwrap();
        assert_eq!(earlier_port_mapper_in(&dir), Some("portmap".into()));
        fs::remove_dir_all(&dir).unwrap();

        let chain =
            |plugins: Value| json!({"cniVersion": "1.0.0", "name": "n", "plugins": plugins});
        // portmap without the capability gets no mappings from the runtime: not a mapper.
        assert_eq!(
            earlier_port_mapper(&chain(json!([{"type": "bridge"}, {"type": "portmap"}]))),
            None
        );
        // A mapper after randport does not count; one before does, whatever its type.
        let cap = json!({"portMappings": true});
        assert_eq!(
            earlier_port_mapper(&chain(json!([
                {"type": "bridge"}, {"type": "randport"}, {"type": "portmap", "capabilities": cap}
            ]))),
            None
        );
        assert_eq!(
            earlier_port_mapper(&chain(json!([
                {"type": "cilium-cni", "capabilities": cap}, {"type": "randport"}
            ]))),
            Some("cilium-cni".into())
        );
        assert_eq!(earlier_port_mapper(&json!({"type": "bridge"})), None);
        // No config at all: nothing to leave the ports to.
        assert_eq!(
            earlier_port_mapper_in(Path::new("/nonexistent/randport")),
            None
        );
    }

    #[test]
    fn install_appends_once_and_uninstall_restores_the_rest() {
        let dir = dir_with(&[("10-kindnet.conflist", KINDNET)]);
        let file = dir.join("10-kindnet.conflist");
        let socket = Path::new(DEFAULT_SOCKET);

        assert_eq!(
            ensure_entry(&dir, &entry(socket, Path::new(DEFAULT_STATE_DIR))).unwrap(),
            Some(file.clone())
        );
        assert_eq!(plugin_types(&file), ["ptp", "portmap", "randport"]);
        let installed = fs::read(&file).unwrap();
        // Idempotent: a second install does not even rewrite the file.
        assert_eq!(
            ensure_entry(&dir, &entry(socket, Path::new(DEFAULT_STATE_DIR))).unwrap(),
            None
        );
        assert_eq!(fs::read(&file).unwrap(), installed);

        // Everything that was there is still there, in the same order.
        let original: Value = serde_json::from_str(KINDNET).unwrap();
        let after = read_json(&file).unwrap();
        assert_eq!(after["plugins"][0], original["plugins"][0]);
        assert_eq!(after["plugins"][1], original["plugins"][1]);
        assert_eq!(after["name"], "kindnet");
        assert_eq!(after["plugins"][2], json!({"type": "randport"}));

        assert_eq!(remove_entries(&dir).unwrap(), vec![file.clone()]);
        assert_eq!(read_json(&file).unwrap(), original);
        assert_eq!(remove_entries(&dir).unwrap(), Vec::<PathBuf>::new());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_changed_socket_replaces_our_entry_in_place() {
        let dir = dir_with(&[("10-kindnet.conflist", KINDNET)]);
        let file = dir.join("10-kindnet.conflist");
        ensure_entry(
            &dir,
            &entry(Path::new(DEFAULT_SOCKET), Path::new(DEFAULT_STATE_DIR)),
        )
        .unwrap();
        ensure_entry(
            &dir,
            &entry(
                Path::new("/run/other/randportd.sock"),
                Path::new(DEFAULT_STATE_DIR),
            ),
        )
        .unwrap();
        assert_eq!(plugin_types(&file), ["ptp", "portmap", "randport"]);
        assert_eq!(
            read_json(&file).unwrap()["plugins"][2]["socket"],
            "/run/other/randportd.sock"
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_runtimes_choice_is_the_first_file_by_name() {
        let dir = dir_with(&[
            ("20-other.conflist", KINDNET),
            ("10-kindnet.conflist", KINDNET),
            ("99-loopback.conf", r#"{"type": "loopback"}"#),
            ("README", "not a config"),
        ]);
        assert_eq!(
            active_config(&dir).unwrap(),
            dir.join("10-kindnet.conflist")
        );
        ensure_entry(
            &dir,
            &entry(Path::new(DEFAULT_SOCKET), Path::new(DEFAULT_STATE_DIR)),
        )
        .unwrap();
        assert_eq!(
            plugin_types(&dir.join("20-other.conflist")),
            ["ptp", "portmap"]
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn configs_that_cannot_chain_are_refused_with_the_way_out() {
        let empty = dir_with(&[]);
        let e = ensure_entry(
            &empty,
            &entry(Path::new(DEFAULT_SOCKET), Path::new(DEFAULT_STATE_DIR)),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("install the cluster's network plugin first"),
            "{e}"
        );

        // Multus delegating to a network that has no conflist here.
        let single = dir_with(&[(
            "00-multus.conf",
            r#"{"type": "multus", "clusterNetwork": "/host/etc/cni/net.d/10-calico.conflist"}"#,
        )]);
        let e = ensure_entry(
            &single,
            &entry(Path::new(DEFAULT_SOCKET), Path::new(DEFAULT_STATE_DIR)),
        )
        .unwrap_err();
        assert!(e.to_string().contains("10-calico.conflist"), "{e}");
        assert!(e.to_string().contains("clusterNetwork"), "{e}");

        let broken = dir_with(&[("10-x.conflist", "{not json")]);
        let e = ensure_entry(
            &broken,
            &entry(Path::new(DEFAULT_SOCKET), Path::new(DEFAULT_STATE_DIR)),
        )
        .unwrap_err();
        assert!(e.to_string().contains("not JSON"), "{e}");
        for d in [empty, single, broken] {
            fs::remove_dir_all(d).unwrap();
        }
    }

    #[test]
    fn the_binary_is_replaced_atomically_and_removed() {
        let dir = dir_with(&[("plugin-build", "new binary")]);
        let bin = dir.join("bin");
        assert!(install_binary(&dir.join("plugin-build"), &bin).unwrap());
        assert!(!install_binary(&dir.join("plugin-build"), &bin).unwrap());
        use std::os::unix::fs::PermissionsExt;
        let meta = fs::metadata(bin.join("randport")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o755);
        assert_eq!(
            fs::read_dir(&bin).unwrap().count(),
            1,
            "no temporary file left"
        );
        assert!(remove_binary(&bin).unwrap());
        assert!(!remove_binary(&bin).unwrap());
        fs::remove_dir_all(dir).unwrap();
    }
}
