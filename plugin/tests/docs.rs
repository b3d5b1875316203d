//! The metrics reference in `docs/metrics.md` says what the agent exposes: its table is
//! the one `randport_plugin::metrics::METRICS` gives, row for row. A change to the metrics
//! without the doc (or the other way round) fails here, printing the table to paste.

use randport_plugin::metrics::METRICS;

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
