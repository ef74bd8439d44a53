//! The `beacon-node` command line, shaped like `docker model`. `main.rs` parses; this module
//! runs the commands against the library.

use std::path::PathBuf;

use anyhow::{Context, bail};
use beacon_proto::Secret;
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
    /// Exit successfully when the local API answers `/healthz` (the image's healthcheck).
    Healthcheck {
        /// Base URL of the API (default: from `BEACON_LISTEN`, an unspecified address
        /// meaning loopback).
        #[arg(long)]
        url: Option<String>,
    },
    /// Serve the local OpenAI / Docker Model Runner API and join the Beacon network as a
    /// provider (p2p control plane, QUIC data plane).
    Serve(Box<ServeArgs>),
    /// Chat with a model from the terminal: one answer for PROMPT, or a conversation.
    Run {
        model: String,
        prompt: Option<String>,
        /// Sampling temperature (0: greedy, reproducible).
        #[arg(long, default_value_t = 0.7)]
        temperature: f32,
        /// Sampling seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Longest answer, in tokens.
        #[arg(long, default_value_t = 1024)]
        max_tokens: u32,
        #[command(flatten)]
        engine: EngineArgs,
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

/// How models are run.
#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// Parallel sequences per loaded model.
    #[arg(long, env = "BEACON_PARALLEL", default_value_t = 8)]
    pub parallel: u32,
    /// Context tokens per sequence.
    #[arg(long, env = "BEACON_CTX_SIZE", default_value_t = 4096)]
    pub ctx_size: u32,
    /// CPU threads (default: all cores).
    #[arg(long, env = "BEACON_THREADS")]
    pub threads: Option<u32>,
    /// Layers to offload to the GPU (CUDA builds).
    #[arg(long, env = "BEACON_GPU_LAYERS", default_value_t = 0)]
    pub gpu_layers: u32,
}

impl EngineArgs {
    pub fn config(&self) -> crate::engine::EngineConfig {
        crate::engine::EngineConfig {
            parallel: self.parallel,
            ctx_per_slot: self.ctx_size,
            threads: self.threads,
            gpu_layers: self.gpu_layers,
            ..Default::default()
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address of the HTTP API.
    #[arg(long, env = "BEACON_LISTEN", default_value = "127.0.0.1:12434")]
    pub listen: std::net::SocketAddr,
    /// Require this bearer token on every request but /healthz.
    #[arg(long, env = "BEACON_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<Secret>,
    /// Keep the bearer token in this file (mode 0600): read when it exists, a new random
    /// one written there when not. `--api-token` wins over it; empty means none.
    #[arg(long, env = "BEACON_API_TOKEN_FILE")]
    pub api_token_file: Option<String>,
    /// Serve the API beyond loopback without a token: only where a private network guards
    /// the port (a Compose network whose port is not published).
    #[arg(long, env = "BEACON_API_OPEN")]
    pub api_open: bool,
    /// Unload a model after it has been idle this long (`-1` never, `0` at once; s/m/h).
    #[arg(long, env = "BEACON_KEEP_ALIVE", default_value = "5m")]
    pub keep_alive: String,
    /// Requests that may wait per model beyond its parallel slots (then 503).
    #[arg(long, env = "BEACON_MAX_QUEUE", default_value_t = 64)]
    pub max_queue: usize,
    /// Memory the loaded models may use, in MiB (default: 80% of available memory).
    #[arg(long, env = "BEACON_MEMORY_BUDGET_MIB")]
    pub memory_budget_mib: Option<u64>,
    /// Seconds a client may take to send a request's headers (then the connection is
    /// closed: a client that trickles them holds nothing).
    #[arg(long, env = "BEACON_HTTP_HEADER_TIMEOUT", default_value_t = 30)]
    pub http_header_timeout: u64,
    /// Largest request body, in MiB.
    #[arg(long, env = "BEACON_MAX_BODY_MIB", default_value_t = 16)]
    pub max_body_mib: usize,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub registry: RegistryArgs,
    #[command(flatten)]
    pub network: NetworkArgs,
}

#[derive(Args, Debug, Clone)]
pub struct NetworkArgs {
    /// Serve the local API only; do not join the network.
    #[arg(long, env = "BEACON_NO_NETWORK")]
    pub no_network: bool,
    /// Region this provider advertises (routers pin data to regions by this name).
    #[arg(long, env = "BEACON_REGION", default_value = "local")]
    pub region: String,
    /// libp2p listen addresses.
    #[arg(
        long,
        env = "BEACON_P2P_LISTEN",
        value_delimiter = ',',
        default_value = "/ip4/0.0.0.0/udp/4001/quic-v1,/ip4/0.0.0.0/tcp/4001"
    )]
    pub p2p_listen: Vec<libp2p::Multiaddr>,
    /// Bootstrap peers (`/ip4/…/udp/…/quic-v1/p2p/<peer id>`; the peer id may be left out
    /// and `/dns4/host/…` names are resolved), comma-separated.
    #[arg(long, env = "BEACON_BOOTSTRAP", value_delimiter = ',')]
    pub bootstrap: Vec<libp2p::Multiaddr>,
    /// libp2p addresses to advertise when others must use different ones than the
    /// listeners (behind NAT or port forwarding), comma-separated.
    #[arg(long, env = "BEACON_P2P_ADVERTISE", value_delimiter = ',')]
    pub p2p_advertise: Vec<libp2p::Multiaddr>,
    /// QUIC data-plane listen address.
    #[arg(long, env = "BEACON_DATA_PLANE", default_value = "0.0.0.0:4433")]
    pub data_plane: std::net::SocketAddr,
    /// Data-plane address to advertise (`host:port`) when others must use a different one.
    #[arg(long, env = "BEACON_DATA_PLANE_ADVERTISE")]
    pub data_plane_advertise: Option<String>,
    /// Serve work only for these router identities (peer ids, comma-separated); without
    /// it any peer may submit work, as an open network wants.
    #[arg(long, env = "BEACON_DATA_PLANE_ALLOW", value_delimiter = ',')]
    pub data_plane_allow: Vec<beacon_proto::PeerId>,
    /// Seconds between adverts.
    #[arg(long, env = "BEACON_ADVERT_INTERVAL", default_value_t = 10)]
    pub advert_interval: u64,
    /// Advertise local tags whose registry is on a private network (a private address, or
    /// a name under .local, .internal, .lan, .home.arpa, .intranet, .corp or .private);
    /// by default they stay on this machine, as their names describe its network.
    #[arg(long, env = "BEACON_ADVERTISE_PRIVATE_TAGS")]
    pub advertise_private_tags: bool,
    /// Misbehave on purpose, to test that routers catch it (tests and benchmarks only).
    #[arg(long, value_enum, hide = true, env = "BEACON_FAULT")]
    pub fault: Option<crate::provider::Fault>,
}

impl NetworkArgs {
    fn config(&self) -> Option<crate::daemon::ProviderConfig> {
        (!self.no_network).then(|| crate::daemon::ProviderConfig {
            region: self.region.clone(),
            p2p_listen: self.p2p_listen.clone(),
            bootstrap: self.bootstrap.clone(),
            p2p_advertise: self.p2p_advertise.clone(),
            data_plane: self.data_plane,
            data_plane_advertise: self.data_plane_advertise.clone(),
            data_plane_allow: (!self.data_plane_allow.is_empty())
                .then(|| self.data_plane_allow.clone()),
            advert_interval: std::time::Duration::from_secs(self.advert_interval.max(1)),
            fault: self.fault,
            advertise_private_tags: self.advertise_private_tags,
        })
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
    pub password: Option<Secret>,
    /// The registry (`host:port`) --username and --password are for: they are sent to no
    /// other. Required with them on `serve`, whose API callers name the registries.
    #[arg(long, env = "BEACON_REGISTRY_HOST")]
    pub registry_host: Option<String>,
    /// The most the model store may take on disk, in GiB: a pull past it is refused before
    /// it downloads anything.
    #[arg(long, env = "BEACON_STORE_BUDGET_GIB")]
    pub store_budget_gib: Option<u64>,
}

impl RegistryArgs {
    fn registry(&self) -> Registry {
        Registry::new(RegistryOptions {
            insecure: self.insecure.clone(),
            username: self.username.clone(),
            password: self.password.clone(),
            credentials_for: self.registry_host.clone(),
            store_budget: self.store_budget_gib.map(|g| g.saturating_mul(1 << 30)),
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
        /// Print only the manifest digest (what a router pins the name to with
        /// `--model-pin REFERENCE=DIGEST`).
        #[arg(long, conflicts_with = "manifest")]
        digest: bool,
    },
    /// Give a model another tag.
    Tag { source: String, target: String },
    /// Requantise a GGUF file with llama.cpp's quantiser (tests and benchmarks make
    /// cheaper stand-ins of a model with it).
    #[command(hide = true)]
    Requantize {
        input: PathBuf,
        output: PathBuf,
        #[arg(long, value_enum)]
        to: crate::engine::quantize::Quantization,
    },
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
        Command::Healthcheck { url } => healthcheck(url).await,
        Command::Serve(args) => serve(&data_dir, *args).await,
        Command::Run {
            model,
            prompt,
            temperature,
            seed,
            max_tokens,
            engine,
        } => {
            let sampling = beacon_proto::Sampling {
                temperature,
                top_p: 0.95,
                top_k: 40,
                min_p: 0.05,
                max_tokens,
                seed,
                ..beacon_proto::Sampling::default()
            };
            run_chat(&data_dir, &model, prompt, sampling, engine).await
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
        ModelCommand::Rm { models } => remove(&store, models)?,
        ModelCommand::Inspect {
            model,
            digest: true,
            ..
        } => {
            println!("{}", store.resolve(&model)?.manifest_digest);
        }
        ModelCommand::Inspect {
            model, manifest, ..
        } => {
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
        ModelCommand::Requantize { input, output, to } => {
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
            crate::engine::quantize::requantize(&input, &output, to, threads)?;
            println!(
                "{} requantised to {to:?}: {}",
                input.display(),
                output.display()
            );
        }
        ModelCommand::Tag { source, target } => {
            let t = store.tag(&source, &target)?;
            println!("Model {source} tagged as {}", t.familiar());
        }
    }
    Ok(())
}

/// `beacon-node model rm`: each model untagged, and what no tag holds any more deleted;
/// an error when any of them could not be removed.
fn remove(store: &Store, models: Vec<String>) -> anyhow::Result<()> {
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

async fn healthcheck(url: Option<String>) -> anyhow::Result<()> {
    let url = url.unwrap_or_else(|| {
        let listen = std::env::var("BEACON_LISTEN").unwrap_or_else(|_| "127.0.0.1:12434".into());
        let listen = listen
            .replacen("0.0.0.0:", "127.0.0.1:", 1)
            .replacen("[::]:", "[::1]:", 1);
        format!("http://{listen}")
    });
    let url = format!("{}/healthz", url.trim_end_matches('/'));
    crate::tls::install_crypto_provider();
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(4))
        .build()?;
    let status = client
        .get(&url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?
        .status();
    anyhow::ensure!(status.is_success(), "GET {url}: {status}");
    Ok(())
}

fn info(data_dir: &std::path::Path) -> anyhow::Result<()> {
    let key = beacon_net::identity::load_or_create(&data_dir.join("identity.key"))?;
    let hw = crate::hardware::detect();
    println!("Peer ID:    {}", key.peer_id());
    println!("Data dir:   {}", data_dir.display());
    println!("Version:    {}", crate::VERSION);
    println!("Engine:     {}", hw.backend);
    println!(
        "CPU:        {} ({} cores)",
        hw.host.cpu_model, hw.host.cores
    );
    println!("CPU flags:  {}", hw.host.cpu_flags.join(" "));
    println!(
        "RAM:        {} total, {} available",
        beacon_proto::gguf::format_bytes(hw.host.ram_total),
        beacon_proto::gguf::format_bytes(hw.host.ram_free)
    );
    if hw.accelerators.is_empty() {
        println!(
            "GPUs:       none; runs on CPU ({})",
            hw.gpu_note.as_deref().unwrap_or("no GPU found")
        );
    }
    for (i, g) in hw.accelerators.iter().enumerate() {
        println!(
            "GPU {i}:      {} {}, {} total, {} free, compute {}, driver {}",
            g.vendor,
            g.name,
            beacon_proto::gguf::format_bytes(g.memory_total),
            beacon_proto::gguf::format_bytes(g.memory_free),
            g.compute_capability.as_deref().unwrap_or("?"),
            g.driver.as_deref().unwrap_or("?")
        );
    }
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

async fn serve(data_dir: &std::path::Path, args: ServeArgs) -> anyhow::Result<()> {
    use crate::scheduler::{KeepAlive, SchedulerConfig};
    // API callers name the registries `/models/create` pulls from: credentials bound to
    // no registry would go to theirs (review H6).
    if (args.registry.username.is_some() || args.registry.password.is_some())
        && args.registry.registry_host.is_none()
    {
        bail!(
            "--username/--password on serve need --registry-host (BEACON_REGISTRY_HOST): \
             the one registry they may be sent to"
        );
    }
    let token = api_token(&args)?;
    let keep_alive = KeepAlive::parse(&args.keep_alive).map_err(anyhow::Error::msg)?;
    let mut scheduler = SchedulerConfig {
        engine: args.engine.config(),
        keep_alive,
        max_queue: args.max_queue,
        ..Default::default()
    };
    if let Some(mib) = args.memory_budget_mib {
        scheduler.memory_budget = mib << 20;
    }
    scheduler.check_blobs = args.network.fault != Some(crate::provider::Fault::Unchecked);
    let config = crate::daemon::NodeConfig {
        data_dir: data_dir.to_path_buf(),
        scheduler,
        api: crate::api::ApiConfig {
            listen: args.listen,
            token,
            max_body: args.max_body_mib << 20,
            header_timeout: std::time::Duration::from_secs(args.http_header_timeout.max(1)),
        },
        registry: args.registry.registry(),
        provider: args.network.config(),
    };
    crate::daemon::run(config, beacon_net::shutdown_signal()).await
}

/// The API's bearer token: the flag's, or the token file's (made when missing). Beyond
/// loopback there must be one, unless told `--api-open` (review H5): whoever reaches an
/// open API pulls from any registry, deletes models and uses the machine.
fn api_token(args: &ServeArgs) -> anyhow::Result<Option<Secret>> {
    let file = args
        .api_token_file
        .as_deref()
        .filter(|p| !p.is_empty())
        .map(std::path::Path::new);
    let token = match (&args.api_token, file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(path)) => {
            let bytes = beacon_net::identity::load_or_create_private(path, || {
                let (a, b) = (beacon_proto::Id::random(), beacon_proto::Id::random());
                format!("{:032x}{:032x}\n", a.0, b.0).into_bytes()
            })?;
            let token = String::from_utf8(bytes)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .with_context(|| format!("{} holds no token", path.display()))?;
            tracing::info!(file = %path.display(), "the API requires the token in this file");
            Some(Secret::new(token))
        }
        (None, None) => None,
    };
    if token.is_none() && !args.listen.ip().is_loopback() && !args.api_open {
        bail!(
            "the API would listen on {} without a token, and anyone who reaches it could pull \
             and delete models and use this machine: set --api-token or --api-token-file \
             (BEACON_API_TOKEN, BEACON_API_TOKEN_FILE), listen on loopback, or pass \
             --api-open where a private network guards the port",
            args.listen
        );
    }
    Ok(token)
}

async fn run_chat(
    data_dir: &std::path::Path,
    model: &str,
    prompt: Option<String>,
    sampling: beacon_proto::Sampling,
    engine: EngineArgs,
) -> anyhow::Result<()> {
    use std::io::{BufRead, Write};

    use beacon_proto::{ChatMessage, Role};

    use crate::engine::{Engine, Event, GenerateRequest, OutputFormat, Prompt};
    let store = open_store(data_dir)?;
    let record = store.resolve(model)?;
    let path = store
        .gguf_paths(&record)
        .into_iter()
        .next()
        .context("the model has no GGUF file")?;
    let mut config = engine.config();
    config.parallel = 1;
    let engine = tokio::task::spawn_blocking(move || Engine::load(&path, config)).await??;
    let mut history: Vec<ChatMessage> = Vec::new();
    let interactive = prompt.is_none();
    let mut next = prompt;
    loop {
        let text = match next.take() {
            Some(t) => t,
            None => {
                eprint!("> ");
                let mut line = String::new();
                if std::io::stdin().lock().read_line(&mut line)? == 0 {
                    break;
                }
                let line = line.trim().to_string();
                if line.is_empty() {
                    continue;
                }
                if line == "/bye" {
                    break;
                }
                line
            }
        };
        history.push(ChatMessage {
            role: Role::User,
            content: text,
        });
        let req = GenerateRequest {
            prompt: Prompt::Chat(history.clone()),
            sampling: sampling.clone(),
            format: OutputFormat::Text,
            return_tokens: false,
        };
        let mut rx = engine.generate(req)?;
        let mut answer = String::new();
        while let Some(ev) = rx.recv().await {
            match ev? {
                Event::Token { text, .. } => {
                    print!("{text}");
                    std::io::stdout().flush()?;
                    answer.push_str(&text);
                }
                Event::Done(_) => println!(),
            }
        }
        history.push(ChatMessage {
            role: Role::Assistant,
            content: answer,
        });
        if !interactive {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review L2: the parsed flags derive `Debug`; neither the API token nor a registry
    /// password may show in it.
    #[test]
    fn secrets_never_show_in_debug_output() {
        let cli = Cli::try_parse_from([
            "beacon-node",
            "serve",
            "--api-token",
            "tok-secret-one",
            "--username",
            "u",
            "--password",
            "pw-secret-two",
            "--registry-host",
            "registry.example:443",
        ])
        .unwrap();
        let shown = format!("{cli:?}");
        assert!(
            !shown.contains("secret-one") && !shown.contains("secret-two"),
            "{shown}"
        );
        assert!(shown.contains("[redacted]"), "{shown}");
    }
}
