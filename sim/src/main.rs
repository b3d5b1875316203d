//! `randport-sim`: the simulator's command line (`demo`, `down`).

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use randport_core::PortRange;
use randport_sim::preview;

const USAGE: &str = "usage: randport-sim demo [--nodes N] [--pods N] [--ipv6] [--seed N] [--rules]
       randport-sim help";

fn main() -> ExitCode {
    match run(std::env::args().skip(1).collect()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("randport-sim: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Vec<String>) -> Result<()> {
    let Some((command, rest)) = args.split_first() else {
        println!("{USAGE}");
        return Ok(());
    };
    match command.as_str() {
        "demo" => demo(rest),
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown command {other:?}\n{USAGE}"),
    }
}

fn demo(args: &[String]) -> Result<()> {
    let (mut nodes, mut pods, mut ipv6, mut rules) = (2usize, 3usize, false, false);
    let mut seed = fastrand::u64(..);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--nodes" => {
                nodes = value("--nodes")?
                    .parse()
                    .context("--nodes takes a number")?
            }
            "--pods" => pods = value("--pods")?.parse().context("--pods takes a number")?,
            "--seed" => seed = value("--seed")?.parse().context("--seed takes a number")?,
            "--ipv6" => ipv6 = true,
            "--rules" => rules = true,
            other => bail!("unknown option {other:?}\n{USAGE}"),
        }
    }
    if nodes == 0 || nodes > randport_sim::addresses::MAX_NODES {
        bail!(
            "--nodes must be from 1 to {}",
            randport_sim::addresses::MAX_NODES
        );
    }
    if pods > randport_sim::addresses::MAX_PODS_PER_NODE {
        bail!(
            "--pods must be at most {}",
            randport_sim::addresses::MAX_PODS_PER_NODE
        );
    }
    println!(
        "randport-sim demo: the network-namespace simulator is not built yet, so no agent runs \
         and no traffic is sent.\nBelow is what randport decides for {nodes} node(s) x {pods} \
         pod(s) (seed {seed}), computed by randport-core alone.\n"
    );
    let cluster = preview::cluster(nodes, pods, PortRange::DEFAULT, ipv6, seed)?;
    print!("{}", preview::table(&cluster));
    println!("\nAnnotations written back (tkestack.io/portmapping):");
    for (pod, value) in preview::annotations(&cluster) {
        println!("  {pod}: {value}");
    }
    if rules {
        for node in &cluster {
            println!(
                "\nnft ruleset of {} ({}):\n{}",
                node.name,
                node.ip,
                preview::ruleset(node)
            );
        }
    } else {
        println!("\n(add --rules to print each node's nft table)");
    }
    Ok(())
}
