//! `kubectl randport`: a kubectl plugin (put `kubectl-randport` on the PATH) that shows
//! where each pod's random host ports are reached from outside the cluster.
//!
//!   kubectl randport ports [POD] [-l SELECTOR] [-A] [-o table|wide|json] [--address-type auto|external|internal]
//!   kubectl randport nodes [-o table|json]
//!
//! The usual kubeconfig flags work: `--kubeconfig`, `--context`, `-n/--namespace`.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use randport_core::DEFAULT_ANNOTATION;
use randport_plugin::kube::kubectl::{self, AddressType};

#[derive(Debug, Parser)]
#[command(
    name = "kubectl randport",
    version,
    about = "Where each pod's random host ports are reached"
)]
struct Cli {
    /// The kubeconfig file (default: $KUBECONFIG, else ~/.kube/config).
    #[arg(long, global = true)]
    kubeconfig: Option<std::path::PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    context: Option<String>,
    /// The namespace (default: the context's, else `default`).
    #[arg(short = 'n', long, global = true)]
    namespace: Option<String>,
    /// The annotation randport writes.
    #[arg(long, global = true, default_value = DEFAULT_ANNOTATION)]
    annotation: String,
    /// Which node address to print: ExternalIP else InternalIP (auto), or one of them.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    address_type: AddressType,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value = "table")]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Wide,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Per mapping: the address to connect to (node address:host port) and the container
    /// port it reaches.
    Ports {
        /// One pod (else every annotated pod in the namespace).
        pod: Option<String>,
        /// Only pods with these labels.
        #[arg(short = 'l', long)]
        selector: Option<String>,
        /// Pods of every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// Per node: the mappings in use, counted from its pods' annotations.
    Nodes,
}

async fn client(cli: &Cli) -> Result<(Client, String)> {
    let options = KubeConfigOptions {
        context: cli.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = match &cli.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &options).await?
        }
        None if cli.context.is_some() => Config::from_kubeconfig(&options).await?,
        None => Config::infer()
            .await
            .context("no cluster: set KUBECONFIG or pass --kubeconfig")?,
    };
    let namespace = cli
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    Ok((Client::try_from(config)?, namespace))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let (client, namespace) = client(&cli).await?;
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .context("listing nodes (for their addresses)")?
        .items;
    match &cli.command {
        Command::Ports {
            pod,
            selector,
            all_namespaces,
        } => {
            let api: Api<Pod> = if *all_namespaces {
                Api::all(client)
            } else {
                Api::namespaced(client, &namespace)
            };
            let pods = match pod {
                Some(name) => vec![
                    api.get(name)
                        .await
                        .with_context(|| format!("pod {namespace}/{name}"))?,
                ],
                None => {
                    let mut params = ListParams::default();
                    if let Some(selector) = selector {
                        params = params.labels(selector);
                    }
                    api.list(&params).await.context("listing pods")?.items
                }
            };
            let rows = kubectl::rows(&pods, &nodes, &cli.annotation, cli.address_type);
            if let (Some(name), true) = (pod, rows.is_empty()) {
                bail!(
                    "pod {namespace}/{name} has no {} annotation: it did not ask for random ports",
                    cli.annotation
                );
            }
            match cli.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
                Output::Table | Output::Wide => {
                    print!("{}", kubectl::table(&rows, cli.output == Output::Wide))
                }
            }
        }
        Command::Nodes => {
            let pods = Api::<Pod>::all(client)
                .list(&ListParams::default())
                .await
                .context("listing pods")?
                .items;
            let use_ = kubectl::node_use(&pods, &nodes, &cli.annotation, cli.address_type);
            match cli.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&use_)?),
                Output::Table | Output::Wide => print!("{}", kubectl::node_table(&use_)),
            }
        }
    }
    Ok(())
}
