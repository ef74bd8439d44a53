use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = beacon_node::cli::Cli::parse();
    init_logging(cli.log_format);
    let result = tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(beacon_node::cli::run(cli)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: beacon_node::cli::LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("BEACON_LOG")
        .unwrap_or_else(|_| EnvFilter::new("warn,beacon_node=info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        beacon_node::cli::LogFormat::Json => builder.json().init(),
        beacon_node::cli::LogFormat::Text => builder.init(),
    }
}
