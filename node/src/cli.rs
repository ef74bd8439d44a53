//! The `beacon-node` command line, shaped like `docker model`. `main.rs` parses; this module
//! runs the commands against the library.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use crate::store::package::{PackageOptions, package};
use crate::store::progress::{self, ProgressSink};
use crate::store::registry::{Registry, RegistryOptions};
use crate::store::{ListedModel, Store};

/// Beacon provider node: serves models from OCI registries with llama.cpp and offers them to
/// the Beacon network.
#[derive(Parser, Debug)]
#[command(name = "beacon-node", version = crate::VERSION)]
pub struct Cli {
    /// Data directory: model store, index and identity key.
    #[arg(long, global = true, env = "BEACON_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Log output format.
    #[arg(long, global = true, env = "BEACON_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Manage models in the local store (like `docker model`).
    #[command(subcommand)]
    Model(ModelCommand),
    /// Print this node's identity, hardware and cached models.
    Info,
    /// Run the provider: HTTP API, p2p network, data plane. (Not built yet.)
    Serve,
    /// Chat with a model from the terminal. (Not built yet.)
    Run {
        model: String,
        prompt: Option<String>,
    },
}

/// How transfer progress is shown.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default)]
pub enum ProgressMode {
    /// Progress bars on a terminal (nothing when stderr is not one).
    #[default]
    Bars,
    /// One JSON object per line on stdout, the format the node's API streams.
    Json,
    /// Nothing.
    None,
}

impl ProgressMode {
    fn sink(self) -> ProgressSink {
        match self {
            ProgressMode::Bars => progress::terminal_bars(),
            ProgressMode::Json => progress::json_lines(),
            ProgressMode::None => progress::silent(),
        }
    }
}

#[derive(Args, Debug, Clone, Default)]
pub struct RegistryArgs {
    /// Progress display.
    #[arg(long, value_enum, default_value_t = ProgressMode::Bars)]
    pub progress: ProgressMode,
    /// Registry that may be reached over plain HTTP (repeatable; loopback always may).
    #[arg(
        long = "insecure-registry",
        env = "BEACON_INSECURE_REGISTRIES",
        value_delimiter = ','
    )]
    pub insecure: Vec<String>,
    /// Registry user name (else ~/.docker/config.json).
    #[arg(long, env = "BEACON_REGISTRY_USERNAME")]
    pub username: Option<String>,
    /// Registry password; prefer the environment variable over the flag.
    #[arg(long, env = "BEACON_REGISTRY_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
}

impl RegistryArgs {
    fn registry(&self) -> Registry {
        Registry::new(RegistryOptions {
            insecure: self.insecure.clone(),
            username: self.username.clone(),
            password: self.password.clone(),
        })
    }
}

#[derive(Subcommand, Debug)]
pub enum ModelCommand {
    /// Pull a model from a registry.
    Pull {
        model: String,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Push a local model to its registry.
    Push {
        model: String,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Package GGUF file(s) as a model artifact (stored locally; --push also pushes).
    Package {
        /// GGUF file; repeat for every shard of a split model.
        #[arg(long, required = true)]
        gguf: Vec<PathBuf>,
        /// License file (repeatable).
        #[arg(long)]
        license: Vec<PathBuf>,
        /// Jinja chat template to ship with the model.
        #[arg(long)]
        chat_template: Option<PathBuf>,
        /// Multimodal projector.
        #[arg(long)]
        mmproj: Option<PathBuf>,
        /// Context size to record in the config.
        #[arg(long)]
        context_size: Option<u64>,
        /// Push to the registry after packaging.
        #[arg(long)]
        push: bool,
        #[command(flatten)]
        registry: RegistryArgs,
        /// Target reference, e.g. localhost:5000/ai/smollm2:135M-Q4_1.
        target: String,
    },
    /// List local models.
    #[command(alias = "ls")]
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Only ids.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Remove models (tags; blobs no model uses are deleted).
    Rm {
        #[arg(required = true)]
        models: Vec<String>,
    },
    /// Print a model's config (or manifest) as JSON.
    Inspect {
        model: String,
        /// Print the OCI manifest instead of the config.
        #[arg(long)]
        manifest: bool,
    },
    /// Give a model another tag.
    Tag { source: String, target: String },
}

/// Default data directory: `$XDG_DATA_HOME/beacon` or `~/.local/share/beacon`.
pub fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(x).join("beacon");
    }
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".local/share/beacon"))
        .unwrap_or_else(|| PathBuf::from(".beacon"))
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let data_dir = cli.data_dir.clone().unwrap_or_else(default_data_dir);
    match cli.command {
        Command::Model(cmd) => model(&data_dir, cmd).await,
        Command::Info => info(&data_dir),
        Command::Serve | Command::Run { .. } => {
            bail!(
                "this build of beacon-node has no inference engine or network yet; only `model` and `info` work"
            )
        }
    }
}

fn open_store(data_dir: &std::path::Path) -> anyhow::Result<Store> {
    Store::open(data_dir.join("models"))
        .with_context(|| format!("opening the model store in {}", data_dir.display()))
}

async fn model(data_dir: &std::path::Path, cmd: ModelCommand) -> anyhow::Result<()> {
    let store = open_store(data_dir)?;
    match cmd {
        ModelCommand::Pull { model, registry } => {
            let record = registry
                .registry()
                .pull(&store, &model, registry.progress.sink())
                .await?;
            println!("Model pulled: {} ({})", model, record.manifest_digest);
        }
        ModelCommand::Push { model, registry } => {
            let digest = registry
                .registry()
                .push(&store, &model, registry.progress.sink())
                .await?;
            println!("Model pushed: {model} ({digest})");
        }
        ModelCommand::Package {
            gguf,
            license,
            chat_template,
            mmproj,
            context_size,
            push,
            registry,
            target,
        } => {
            let opts = PackageOptions {
                gguf,
                licenses: license,
                chat_template,
                mmproj,
                context_size,
            };
            let s = store.clone();
            let t = target.clone();
            let record = tokio::task::spawn_blocking(move || package(&s, &opts, &t)).await??;
            println!("Model packaged: {target} ({})", record.manifest_digest);
            if push {
                registry
                    .registry()
                    .push(&store, &target, registry.progress.sink())
                    .await?;
                println!("Model pushed: {target}");
            }
        }
        ModelCommand::List { json, quiet } => {
            let models = store.list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&models)?);
            } else if quiet {
                for m in &models {
                    println!("{}", m.id);
                }
            } else {
                print_table(&models);
            }
        }
        ModelCommand::Rm { models } => {
            let mut failed = false;
            for m in models {
                match store.remove(&m) {
                    Ok(report) => {
                        for t in &report.untagged {
                            println!("Untagged: {t}");
                        }
                        for d in &report.deleted_models {
                            println!("Deleted: {d}");
                        }
                        if report.deleted_blobs > 0 {
                            println!(
                                "Freed {} in {} blob(s)",
                                beacon_proto::gguf::format_bytes(report.freed_bytes),
                                report.deleted_blobs
                            );
                        }
                    }
                    Err(e) => {
                        eprintln!("Error: {m}: {e}");
                        failed = true;
                    }
                }
            }
            if failed {
                bail!("some models could not be removed");
            }
        }
        ModelCommand::Inspect { model, manifest } => {
            let record = store.resolve(&model)?;
            let digest = if manifest {
                record.manifest_digest
            } else {
                record.config_digest
            };
            let bytes = store.read_blob(&digest)?;
            let value: serde_json::Value = serde_json::from_slice(&bytes)?;
            println!("{}", serde_json::to_string_pretty(&value)?);
        }
        ModelCommand::Tag { source, target } => {
            let t = store.tag(&source, &target)?;
            println!("Model {source} tagged as {}", t.familiar());
        }
    }
    Ok(())
}

fn print_table(models: &[ListedModel]) {
    println!(
        "{:<40} {:<12} {:<12} {:<14} {:<12}",
        "MODEL NAME", "PARAMETERS", "QUANTIZATION", "ID", "SIZE"
    );
    for m in models {
        let names = if m.tags.is_empty() {
            vec!["<none>".to_string()]
        } else {
            m.tags.clone()
        };
        for name in names {
            println!(
                "{:<40} {:<12} {:<12} {:<14} {:<12}",
                name,
                m.record.facts.parameters,
                m.record.facts.quantization,
                m.id,
                beacon_proto::gguf::format_bytes(m.record.size)
            );
        }
    }
}

fn info(data_dir: &std::path::Path) -> anyhow::Result<()> {
    let key = crate::identity::load_or_create(&data_dir.join("identity.key"))?;
    println!("Peer ID:    {}", key.peer_id());
    println!("Data dir:   {}", data_dir.display());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!("CPU cores:  {cores}");
    println!("GPUs:       detection not built yet (runs on CPU)");
    let store = open_store(data_dir)?;
    let models = store.list()?;
    println!("Models:     {}", models.len());
    for m in models {
        println!(
            "  {} {} {}",
            m.id,
            m.tags.join(","),
            m.record.facts.quantization
        );
    }
    Ok(())
}
