//! The metrics reference in `docs/metrics.md` says what the agent exposes: its table is
//! the one `randport_plugin::agent::metrics::METRICS` gives, row for row. A change to the metrics
//! without the doc (or the other way round) fails here, printing the table to paste.

use randport_plugin::agent::metrics::METRICS;

fn expected_table() -> String {
    let mut out = String::from("| metric | type | labels | what |\n| --- | --- | --- | --- |\n");
    for (name, kind, labels, help) in METRICS {
        let labels = if labels.is_empty() {
            String::new()
        } else {
            labels
                .split(", ")
                .map(|l| format!("`{l}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.push_str(&format!("| `{name}` | {kind} | {labels} | {help} |\n"));
    }
    out
}

#[test]
fn the_metrics_reference_lists_exactly_what_the_agent_exposes() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md"))
        .expect("docs/metrics.md");
    let table = expected_table();
    assert!(
        doc.contains(&table),
        "docs/metrics.md does not hold the current metrics table; paste this:\n\n{table}"
    );
    // No row for a metric that does not exist.
    let rows = doc
        .lines()
        .filter(|l| l.starts_with("| `randport_"))
        .count();
    assert_eq!(
        rows,
        METRICS.len(),
        "docs/metrics.md lists metrics the agent lacks"
    );
}

// ---- the operator docs (docs/*.md) ----

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn doc(name: &str) -> String {
    std::fs::read_to_string(repo().join("docs").join(name))
        .unwrap_or_else(|e| panic!("docs/{name}: {e}"))
}

fn help(bin: &str, args: &[&str]) -> String {
    let out = Command::new(bin).args(args).arg("--help").output().unwrap();
    assert!(out.status.success(), "{bin} {args:?} --help");
    String::from_utf8(out.stdout).unwrap()
}

/// `--long` flags and `[env: NAME=` variables in clap's help text.
fn flags_and_env(text: &str, flags: &mut BTreeSet<String>, env: &mut BTreeSet<String>) {
    for word in text.split(|c: char| c.is_whitespace() || c == ',') {
        if let Some(flag) = word.strip_prefix("--") {
            let flag: String = flag
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            if !flag.is_empty() {
                flags.insert(format!("--{flag}"));
            }
        }
    }
    for part in text.split("[env: ").skip(1) {
        env.insert(part.split('=').next().unwrap().to_owned());
    }
}

fn tokens_with_prefix(
    text: &str,
    prefix: &str,
    allowed: impl Fn(char) -> bool,
) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find(prefix) {
        let tail = &rest[i + prefix.len()..];
        let word: String = tail.chars().take_while(|c| allowed(*c)).collect();
        if word.starts_with(|c: char| c.is_ascii_alphabetic()) {
            out.insert(format!("{prefix}{word}"));
        }
        rest = tail;
    }
    out
}

#[test]
fn the_configuration_reference_matches_the_binaries_flags() {
    let (mut flags, mut env) = (BTreeSet::new(), BTreeSet::new());
    let agent = env!("CARGO_BIN_EXE_randportd");
    let kubectl = env!("CARGO_BIN_EXE_kubectl-randport");
    for (bin, args) in [
        (agent, &[][..]),
        (agent, &["install"][..]),
        (agent, &["uninstall"][..]),
        (agent, &["list"][..]),
        (kubectl, &["ports"][..]),
        (kubectl, &["nodes"][..]),
    ] {
        flags_and_env(&help(bin, args), &mut flags, &mut env);
    }
    assert!(flags.len() > 20 && env.len() > 10, "{flags:?} {env:?}");
    let text = doc("configuration.md");
    let missing: Vec<_> = flags
        .iter()
        .chain(&env)
        .filter(|f| !text.contains(f.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/configuration.md lacks {missing:?}"
    );
    // Nothing documented that the binaries lack.
    let documented_flags = tokens_with_prefix(&text, "--", |c| c.is_ascii_lowercase() || c == '-');
    let stale: Vec<_> = documented_flags
        .iter()
        .filter(|f| !flags.contains(*f))
        .collect();
    assert!(
        stale.is_empty(),
        "docs/configuration.md names flags no binary has: {stale:?}"
    );
    let documented_env =
        tokens_with_prefix(&text, "RANDPORT_", |c| c.is_ascii_uppercase() || c == '_');
    let stale: Vec<_> = documented_env
        .iter()
        .filter(|e| !env.contains(*e))
        .collect();
    assert!(
        stale.is_empty(),
        "docs/configuration.md names variables no binary reads: {stale:?}"
    );
}

/// The values.yaml keys, as dotted paths; maps that are free-form (labels, resources) are one.
fn value_paths(value: &serde_yaml_ng::Value, prefix: &str, out: &mut BTreeSet<String>) {
    const FREE_FORM: &[&str] = &[
        "nodeSelector",
        "resources",
        "podAnnotations",
        "podLabels",
        "affinity",
        "metrics.serviceMonitor.labels",
    ];
    match value {
        serde_yaml_ng::Value::Mapping(map) if !FREE_FORM.contains(&prefix) && !map.is_empty() => {
            for (k, v) in map {
                let k = k.as_str().unwrap();
                let path = if prefix.is_empty() {
                    k.to_owned()
                } else {
                    format!("{prefix}.{k}")
                };
                value_paths(v, &path, out);
            }
        }
        _ => {
            out.insert(prefix.to_owned());
        }
    }
}

#[test]
fn the_configuration_reference_lists_every_helm_value() {
    let values: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(repo().join("charts/randport/values.yaml")).unwrap(),
    )
    .unwrap();
    let mut paths = BTreeSet::new();
    value_paths(&values, "", &mut paths);
    assert!(
        paths.contains("image.digest") && paths.contains("distribution"),
        "{paths:?}"
    );
    let text = doc("configuration.md");
    let helm_section = text
        .split("## Helm values")
        .nth(1)
        .unwrap()
        .split("\n## ")
        .next()
        .unwrap();
    let rows: BTreeSet<String> = helm_section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .map(|l| l.split('`').next().unwrap().to_owned())
        .collect();
    let undocumented: Vec<_> = paths.difference(&rows).collect();
    assert!(
        undocumented.is_empty(),
        "docs/configuration.md lacks Helm values {undocumented:?}"
    );
    let stale: Vec<_> = rows.difference(&paths).collect();
    assert!(
        stale.is_empty(),
        "docs/configuration.md lists values the chart lacks: {stale:?}"
    );
}

/// Every CNI error code randport can return: `randport_core::CniCode`, the one list the
/// agent, its server and the plugin take their codes from.
fn cni_codes() -> BTreeSet<u32> {
    use randport_core::CniCode;
    // The plugin also builds rscni-types errors itself: each variant it names must be one
    // of ours (a new one needs its code in CniCode, and so a section).
    let cni = std::fs::read_to_string(repo().join("plugin/src/cni/mod.rs")).unwrap();
    for variant in tokens_with_prefix(&cni, "CniError::", |c| c.is_ascii_alphanumeric()) {
        let ours = match variant.trim_start_matches("CniError::") {
            "IncompatibleVersion" => Some(CniCode::IncompatibleVersion),
            "InvalidEnvValue" => Some(CniCode::InvalidEnvValue),
            "IOFailure" => Some(CniCode::IoFailure),
            "FailedToDecode" => Some(CniCode::FailedToDecode),
            "InvalidNetworkConfig" => Some(CniCode::InvalidNetworkConfig),
            "TryAgainLater" => Some(CniCode::TryAgainLater),
            "PluginNotAvailable" => Some(CniCode::PluginNotAvailable),
            // Custom carries a CniCode's number; `missing` is a helper, not a variant.
            "Custom" | "missing" => None,
            other => {
                panic!("cni.rs uses CniError::{other}: add its code to randport_core::CniCode")
            }
        };
        assert!(ours.is_none_or(|c| CniCode::ALL.contains(&c)));
    }
    CniCode::ALL.iter().map(|c| c.code()).collect()
}

#[test]
fn troubleshooting_has_a_section_for_every_cni_error_code() {
    let codes = cni_codes();
    assert!(
        codes.contains(&101) && codes.contains(&126) && codes.contains(&11),
        "{codes:?}"
    );
    let text = doc("troubleshooting.md");
    let sections: BTreeSet<u32> = text
        .lines()
        .filter_map(|l| l.strip_prefix("### "))
        .filter_map(|l| l.split(':').next()?.parse().ok())
        .collect();
    assert_eq!(
        sections, codes,
        "docs/troubleshooting.md sections vs the codes in the code"
    );
}

use randport_itests::fenced_blocks;

fn helm_dir() -> Option<PathBuf> {
    let helm = randport_itests::helm_path();
    helm.is_file().then(|| helm.parent().unwrap().to_owned())
}

/// Every `sh` block in docs/ is run by a test (`sh test` here, `sh e2e` on the real node) or
/// says why it cannot be (`# not run by the tests: ...`); the `sh test` blocks run here.
#[test]
fn every_command_in_the_docs_runs_or_says_why_not() {
    let mut files: Vec<_> = std::fs::read_dir(repo().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    files.sort();
    let mut to_run = Vec::new();
    let (mut e2e, mut unexplained) = (0, Vec::new());
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        for (info, body) in fenced_blocks(&std::fs::read_to_string(file).unwrap()) {
            match info.as_str() {
                "sh test" => to_run.push((name.clone(), body)),
                "sh e2e" => e2e += 1,
                "sh" | "bash" | "shell" | "console"
                    if !body.contains("# not run by the tests: ") =>
                {
                    unexplained.push(format!("{name}: {body}"))
                }
                _ => {}
            }
        }
    }
    assert!(
        unexplained.is_empty(),
        "sh blocks that neither run nor say why:\n{}",
        unexplained.join("\n---\n")
    );
    assert!(
        e2e >= 3 && to_run.len() >= 2,
        "{e2e} e2e blocks, {} run here",
        to_run.len()
    );
    let Some(helm_dir) = helm_dir() else {
        assert!(
            std::env::var("CI").is_err(),
            "helm is missing (target/tools/helm-3.17.3/helm); `just test` fetches it"
        );
        eprintln!("SKIPPED running the docs' commands: helm is missing; `just test` fetches it");
        return;
    };
    let bins = Path::new(env!("CARGO_BIN_EXE_randportd"))
        .parent()
        .unwrap()
        .to_owned();
    let path = format!(
        "{}:{}:{}",
        helm_dir.display(),
        bins.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for (name, body) in to_run {
        let out = Command::new("bash")
            .args(["-euo", "pipefail", "-c", &body])
            .current_dir(repo())
            .env("PATH", &path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "docs/{name}: the block\n{body}\nfailed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
