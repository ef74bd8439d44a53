use anyhow::bail;
use clap::{Parser, Subcommand};

/// Beacon hybrid router: routes chat and MinionS jobs onto the provider network.
#[derive(Parser, Debug)]
#[command(name = "beacon-router", version = beacon_router::VERSION)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Join the network and serve the router's HTTP API.
    Serve,
    /// Send a MinionS job to a router and print the answer.
    Minions,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve | Command::Minions => {
            bail!("`{:?}` is not implemented yet in this build", cli.command)
        }
    }
}
