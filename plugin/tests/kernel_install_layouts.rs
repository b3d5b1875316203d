//! Root-only: `randportd install` and `uninstall` on the CNI configuration layouts real
//! distributions write (fixtures in `tests/data/layouts/`): Multus delegating by file
//! (thick plugin, `clusterNetwork`) and by its automatic configuration (inline delegates
//! copied from the first conflist), k3s's flannel, RKE2's canal, and a plain single-plugin
//! `.conf`. Our entry goes where the runtime (or Multus) will run it, once; nothing else
//! changes; uninstall puts every file back. Uninstall runs in a fresh network namespace
//! (it removes our firewall rules there).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use randport_itests::{Netns, root_and_tools_or_skip, test_netns};
use serde_json::Value;

/// The files of fixture layout `name`.
fn layout(name: &str) -> BTreeMap<String, Vec<u8>> {
    files(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/layouts")
            .join(name),
    )
}

/// Every file in `dir`, by name.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect()
}

fn plugin_types(bytes: &[u8]) -> Vec<String> {
    let value: Value = serde_json::from_slice(bytes).unwrap();
    value["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap().to_owned())
        .collect()
}

struct Node {
    ns: Netns,
    dir: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Node {
    fn with(layout_files: &BTreeMap<String, Vec<u8>>) -> Node {
        let ns = test_netns("layout");
        let dir = std::env::temp_dir().join(format!("randport-layout-{}", ns.name()));
        for sub in ["bin", "conf", "state"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        for (name, bytes) in layout_files {
            std::fs::write(dir.join("conf").join(name), bytes).unwrap();
        }
        Node { ns, dir }
    }

    fn randportd(&self, subcommand: &str) -> String {
        let path = |p: &str| self.dir.join(p).display().to_string();
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                self.ns.name(),
                env!("CARGO_BIN_EXE_randportd"),
            ])
            .args([
                "--socket",
                &path("randportd.sock"),
                "--state-dir",
                &path("state"),
            ])
            .arg(subcommand)
            .args([
                "--cni-bin-dir",
                &path("bin"),
                "--cni-conf-dir",
                &path("conf"),
            ])
            .args(
                (subcommand == "install")
                    .then_some(["--binary", env!("CARGO_BIN_EXE_randport")])
                    .into_iter()
                    .flatten(),
            )
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "randportd {subcommand}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Installs on `name`'s files: `target` ends with our entry (after `expected` plugins),
/// the other files are untouched; a second install changes nothing; uninstall restores
/// every file.
fn check_layout(name: &str, target: &str, expected: &[&str]) {
    let original = layout(name);
    let node = Node::with(&original);
    let conf = node.dir.join("conf");
    let said = node.randportd("install");
    assert!(
        said.contains(&format!(
            "added randport to {}",
            conf.join(target).display()
        )),
        "{name}: {said}"
    );
    let after = files(&conf);
    let mut types = expected.iter().map(|t| t.to_string()).collect::<Vec<_>>();
    types.push("randport".into());
    assert_eq!(plugin_types(&after[target]), types, "{name}");
    let entry: Value = serde_json::from_slice(&after[target]).unwrap();
    let ours = entry["plugins"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        ours["stateDir"],
        node.dir.join("state").display().to_string(),
        "{name}"
    );
    for (file, bytes) in &original {
        if file != target && after.contains_key(file) {
            assert_eq!(&after[file], bytes, "{name}: {file} changed");
        }
    }
    assert!(node.dir.join("bin/randport").exists());

    // Idempotent.
    let said = node.randportd("install");
    assert!(said.contains("randport is already in"), "{name}: {said}");
    assert_eq!(
        files(&conf),
        after,
        "{name}: a second install changed files"
    );

    // Uninstall: every file as it was (the target's JSON as it was; the others' bytes).
    node.randportd("uninstall");
    let restored = files(&conf);
    assert_eq!(
        restored.keys().collect::<Vec<_>>(),
        original.keys().collect::<Vec<_>>(),
        "{name}: files after uninstall"
    );
    for (file, bytes) in &original {
        if file == target && !target.ends_with(".conf") {
            let was: Value = serde_json::from_slice(bytes).unwrap();
            let now: Value = serde_json::from_slice(&restored[file]).unwrap();
            assert_eq!(now, was, "{name}: {file}");
        } else {
            assert_eq!(
                &restored[file], bytes,
                "{name}: {file} not restored exactly"
            );
        }
    }
    assert!(!node.dir.join("bin/randport").exists());
}

fn ready(test: &str) -> bool {
    root_and_tools_or_skip(test, &["nft", "ip"])
}

#[test]
fn multus_thick_gets_us_in_the_cluster_networks_conflist_it_names() {
    if ready("multus_thick_gets_us_in_the_cluster_networks_conflist_it_names") {
        check_layout(
            "multus",
            "10-calico.conflist",
            &["calico", "portmap", "bandwidth"],
        );
    }
}

#[test]
fn multus_automatic_configuration_gets_us_in_the_conflist_it_copies() {
    if ready("multus_automatic_configuration_gets_us_in_the_conflist_it_copies") {
        check_layout(
            "multus-auto",
            "10-flannel.conflist",
            &["flannel", "portmap"],
        );
    }
}

#[test]
fn k3s_flannel_conflist() {
    if ready("k3s_flannel_conflist") {
        check_layout(
            "k3s",
            "10-flannel.conflist",
            &["flannel", "portmap", "bandwidth"],
        );
    }
}

#[test]
fn rke2_canal_conflist() {
    if ready("rke2_canal_conflist") {
        check_layout(
            "rke2",
            "10-canal.conflist",
            &["calico", "portmap", "bandwidth"],
        );
    }
}

#[test]
fn a_single_plugin_conf_becomes_a_conflist_and_comes_back_on_uninstall() {
    if !ready("a_single_plugin_conf_becomes_a_conflist_and_comes_back_on_uninstall") {
        return;
    }
    let original = layout("bridge-conf");
    let node = Node::with(&original);
    let conf = node.dir.join("conf");
    node.randportd("install");
    let after = files(&conf);
    // The runtime now picks 10-bridge.conflist (first by name); the .conf is kept aside.
    assert_eq!(
        after.keys().cloned().collect::<Vec<_>>(),
        [
            "10-bridge.conf.randport-orig",
            "10-bridge.conflist",
            "99-loopback.conf"
        ]
    );
    assert_eq!(
        after["10-bridge.conf.randport-orig"],
        original["10-bridge.conf"]
    );
    let list: Value = serde_json::from_slice(&after["10-bridge.conflist"]).unwrap();
    assert_eq!(list["name"], "bridge");
    assert_eq!(list["cniVersion"], "0.4.0");
    assert_eq!(
        plugin_types(&after["10-bridge.conflist"]),
        ["bridge", "randport"]
    );
    assert_eq!(list["plugins"][0]["bridge"], "cni0");
    assert!(list["plugins"][0].get("name").is_none());
    node.randportd("install");
    assert_eq!(files(&conf), after);
    node.randportd("uninstall");
    assert_eq!(
        files(&conf),
        original,
        "the .conf is back exactly, the .conflist gone"
    );
}
