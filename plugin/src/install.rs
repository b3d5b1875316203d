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

use crate::cni::{DEFAULT_SOCKET, DEFAULT_STATE_DIR};
use crate::state::write_atomic;

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

/// The file the runtime uses: the first `.conf`, `.conflist` or `.json` in name order (as
/// containerd and CRI-O choose).
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
    if value.get("plugins").is_some_and(Value::is_array) {
        Ok(first)
    } else {
        Err(InstallError::NotAList(first))
    }
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
    let path = active_config(dir)?;
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
    use super::*;

    /// kindnet's conflist as kind writes it (whitespace and all).
    const KINDNET: &str = include_str!("../tests/data/10-kindnet.conflist");

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

        let single = dir_with(&[("10-bridge.conf", r#"{"type": "bridge"}"#)]);
        let e = ensure_entry(
            &single,
            &entry(Path::new(DEFAULT_SOCKET), Path::new(DEFAULT_STATE_DIR)),
        )
        .unwrap_err();
        assert!(e.to_string().contains("turn it into a .conflist"), "{e}");
        assert_eq!(
            fs::read_to_string(single.join("10-bridge.conf")).unwrap(),
            r#"{"type": "bridge"}"#
        );

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
