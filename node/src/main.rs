use clap::{Parser, Subcommand};

/// Beacon provider node.
#[derive(Parser, Debug)]
#[command(name = "beacon-node", version = beacon_node::VERSION)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Manage models.
    Model,
}

fn main() -> anyhow::Result<()> {
    let _ = Cli::parse();
    anyhow::bail!("not implemented yet")
}
