//! The `beacon-router` command line: flags (`serve`, `minions`) and what each runs.

use std::path::PathBuf;
use std::time::Duration;

use beacon_proto::Secret;
use clap::{Args, Parser, Subcommand};

/// Beacon hybrid router: routes chat and MinionS jobs onto the provider network.
#[derive(Parser, Debug)]
#[command(name = "beacon-router", version = crate::VERSION)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Join the network and serve the router's HTTP API.
    Serve(Box<ServeArgs>),
    /// Send a MinionS (or Minion) job to a router, show its progress, print the answer and
    /// the remote tokens it saved.
    Minions(Box<MinionsArgs>),
}

#[derive(Args, Debug)]
pub struct MinionsArgs {
    /// The router's base URL.
    #[arg(
        long,
        env = "BEACON_ROUTER_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    router: String,
    /// Bearer key for the router.
    #[arg(long, env = "BEACON_API_KEY", hide_env_values = true)]
    api_key: Option<Secret>,
    /// The question or task.
    #[arg(long)]
    task: String,
    /// Documents (text files); repeat or separate with commas.
    #[arg(long, required = true, value_delimiter = ',')]
    context: Vec<PathBuf>,
    /// What the documents are (the supervisor sees this, never the documents).
    #[arg(long)]
    doc_metadata: Option<String>,
    #[arg(long, default_value = "minions", value_parser = ["minions", "minion"])]
    protocol: String,
    #[arg(long)]
    max_rounds: Option<u32>,
    /// Model the providers run (default: the router's, or the network's only model).
    #[arg(long)]
    local_model: Option<String>,
    /// Supervisor model (default: the router's --remote-model).
    #[arg(long)]
    remote_model: Option<String>,
    /// Keep the job's local work in these regions.
    #[arg(long, value_delimiter = ',')]
    allowed_regions: Vec<String>,
    /// How the remote-only comparison is made: estimate (free) or run (asks the supervisor).
    #[arg(long, value_parser = ["estimate", "run"])]
    baseline: Option<String>,
    /// Print the whole answer as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Data directory: identity key and reputation database.
    #[arg(long, env = "BEACON_ROUTER_DATA_DIR", default_value = ".beacon-router")]
    data_dir: PathBuf,
    /// HTTP API address. Beyond loopback it needs --api-key (or --open).
    #[arg(long, env = "BEACON_ROUTER_LISTEN", default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
    /// Serve beyond loopback without API keys: anyone who reaches the port may spend the
    /// remote key and the network's capacity. For a port only trusted hosts reach.
    #[arg(long, env = "BEACON_ROUTER_OPEN")]
    open: bool,
    /// libp2p listen addresses.
    #[arg(
        long,
        env = "BEACON_P2P_LISTEN",
        value_delimiter = ',',
        default_value = "/ip4/0.0.0.0/udp/0/quic-v1,/ip4/0.0.0.0/tcp/0"
    )]
    p2p_listen: Vec<libp2p::Multiaddr>,
    /// Bootstrap peers, comma-separated.
    #[arg(long, env = "BEACON_BOOTSTRAP", value_delimiter = ',')]
    bootstrap: Vec<libp2p::Multiaddr>,
    /// Accepted API keys (bearer), comma-separated; none: no authentication.
    #[arg(
        long,
        env = "BEACON_ROUTER_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    api_key: Vec<Secret>,
    /// Requests per minute per API key (0: unlimited).
    #[arg(long, env = "BEACON_ROUTER_RATE_LIMIT", default_value_t = 0)]
    rate_limit: u32,
    /// Remote OpenAI-compatible API for requests the network cannot serve (e.g. https://api.openai.com/v1).
    #[arg(long, env = "BEACON_REMOTE_BASE_URL")]
    remote_base_url: Option<String>,
    /// Models requests may be forwarded to the remote API for when no provider serves
    /// them, comma-separated (`*`: any). Default: --remote-model only.
    #[arg(long, env = "BEACON_FALLBACK_MODELS", value_delimiter = ',')]
    fallback_models: Vec<String>,
    /// The most completion tokens a request forwarded to the remote API may ask for.
    #[arg(long, env = "BEACON_FALLBACK_MAX_TOKENS", default_value_t = 4096)]
    fallback_max_tokens: u64,
    /// The region the remote API runs in. With --allowed-regions, requests go to it only
    /// when this is one of them.
    #[arg(long, env = "BEACON_REMOTE_REGION")]
    remote_region: Option<String>,
    /// Key for the remote API; prefer the environment variable.
    #[arg(long, env = "BEACON_REMOTE_API_KEY", hide_env_values = true)]
    remote_api_key: Option<Secret>,
    /// Only place work in these regions (data residency), comma-separated.
    #[arg(long, env = "BEACON_ALLOWED_REGIONS", value_delimiter = ',')]
    allowed_regions: Vec<String>,
    /// Model names this router trusts, as REFERENCE=sha256:DIGEST, comma-separated (the
    /// digest `beacon-node model inspect` prints). With pins, names resolve only through
    /// them and adverts that contradict them are ignored.
    #[arg(
        long = "model-pin",
        env = "BEACON_ROUTER_MODEL_PINS",
        value_delimiter = ','
    )]
    model_pins: Vec<String>,
    /// Providers (peer ids) the operator vouches for, such as its own nodes: never on
    /// probation and drawn as auditors from the start, so a network that opens with many
    /// strangers has honest auditors before anyone has a record.
    #[arg(
        long = "trusted-provider",
        env = "BEACON_ROUTER_TRUSTED_PROVIDERS",
        value_delimiter = ','
    )]
    trusted_providers: Vec<String>,
    /// Base fraction of results audited on a second provider.
    #[arg(long, env = "BEACON_AUDIT_RATE", default_value_t = 0.05)]
    audit_rate: f64,
    /// Per-attempt timeout, seconds.
    #[arg(long, env = "BEACON_ATTEMPT_TIMEOUT", default_value_t = 120)]
    attempt_timeout: u64,
    /// Send a duplicate of a subtask to a second provider once it runs longer than this
    /// quantile of observed latencies per token times its token budget (0: never).
    #[arg(long, env = "BEACON_HEDGE_QUANTILE", default_value_t = 0.95)]
    hedge_quantile: f64,
    /// Failures in a row that open a provider's circuit breaker.
    #[arg(long, env = "BEACON_BREAKER_FAILURES", default_value_t = 3)]
    breaker_failures: u32,
    /// Seconds an open circuit breaker keeps a provider out of placement.
    #[arg(long, env = "BEACON_BREAKER_OPEN", default_value_t = 30)]
    breaker_open: u64,
    /// Seconds a client may take to send a request's headers (then the connection is
    /// closed: a client that trickles them holds nothing).
    #[arg(long, env = "BEACON_HTTP_HEADER_TIMEOUT", default_value_t = 30)]
    http_header_timeout: u64,
    /// HTTP connections one client address may hold at once (raise it behind a proxy,
    /// where every client shares the proxy's address).
    #[arg(long, env = "BEACON_HTTP_MAX_PER_ADDRESS", default_value_t = 256)]
    http_max_per_address: usize,
    /// Largest request body, MiB.
    #[arg(long, env = "BEACON_MAX_BODY_MIB", default_value_t = 16)]
    max_body_mib: usize,
    /// Chat requests that may wait for a provider slot beyond the slots the model's
    /// providers advertise (then 503 with Retry-After).
    #[arg(long, env = "BEACON_ROUTER_MAX_QUEUE", default_value_t = 64)]
    max_queue: u64,
    /// Seconds without an advert after which a provider is dropped.
    #[arg(long, env = "BEACON_ADVERT_EXPIRY", default_value_t = 40)]
    advert_expiry: u64,
    /// PEM certificate chain: serve HTTPS (with --tls-key).
    #[arg(long, env = "BEACON_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "BEACON_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Supervisor model for MinionS jobs on the remote API.
    #[arg(long, env = "BEACON_REMOTE_MODEL")]
    remote_model: Option<String>,
    /// MinionS jobs that may run at once (each calls the supervisor on the remote key);
    /// more are refused with 503 and Retry-After.
    #[arg(long, env = "BEACON_MAX_MINIONS_JOBS", default_value_t = crate::http::DEFAULT_MINION_JOBS)]
    max_minions_jobs: usize,
    /// Supervisor tokens each client (API key, or address on an open router) may spend on
    /// MinionS jobs per hour, the remote-only baseline included; 0 for no budget. A job
    /// that finds its client's budget spent ends with 429 and Retry-After.
    #[arg(long, env = "BEACON_MINIONS_TOKEN_BUDGET", default_value_t = 2_000_000)]
    minions_token_budget: u64,
    /// Dial providers at private, loopback or link-local addresses (true for a router on
    /// a private network). Default: true when a bootstrap peer is at such an address,
    /// else false, so peers cannot point an internet router at its own network.
    #[arg(long, env = "BEACON_ROUTER_DIAL_PRIVATE")]
    dial_private: Option<bool>,
    /// Local model for MinionS jobs that name none.
    #[arg(long, env = "BEACON_MINIONS_LOCAL_MODEL")]
    minions_local_model: Option<String>,
    /// Deadline of one supervisor call in a MinionS job, seconds (a supervisor on a CPU
    /// reading a long prompt needs minutes).
    #[arg(long, env = "BEACON_REMOTE_TIMEOUT", default_value_t = 900)]
    remote_timeout: u64,
    /// Let MinionS jobs name their own supervisor URL and key (off: the router only calls
    /// the remote API its operator configured).
    #[arg(long, env = "BEACON_ALLOW_REMOTE_OVERRIDE")]
    allow_remote_override: bool,
}

/// Runs the command the flags name.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(a) => crate::run(config(*a)?, beacon_net::shutdown_signal()).await,
        Command::Minions(m) => {
            let m = *m;
            let args = crate::minions::client::ClientArgs {
                router: m.router,
                api_key: m.api_key,
                task: m.task,
                context: m.context,
                doc_metadata: m.doc_metadata,
                protocol: m.protocol,
                max_rounds: m.max_rounds,
                local_model: m.local_model,
                remote_model: m.remote_model,
                allowed_regions: m.allowed_regions,
                baseline: m.baseline,
                json: m.json,
            };
            crate::minions::client::run(args, &mut std::io::stdout()).await
        }
    }
}

/// The router's configuration from `serve`'s flags, checked.
fn config(a: ServeArgs) -> anyhow::Result<crate::RouterConfig> {
    // An open router beyond loopback spends its operator's remote key for anyone
    // who finds it (review H8): keys, or an explicit --open.
    if !a.listen.ip().is_loopback() && a.api_key.is_empty() && !a.open {
        anyhow::bail!(
            "listening on {} (beyond loopback) needs API keys: --api-key \
             (BEACON_ROUTER_API_KEYS), or --open (BEACON_ROUTER_OPEN=true) when only \
             trusted hosts reach the port",
            a.listen
        );
    }
    let pins = crate::directory::Pins::parse(&a.model_pins).map_err(anyhow::Error::msg)?;
    let trusted = a
        .trusted_providers
        .iter()
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<beacon_proto::PeerId>()
                .map_err(|e| anyhow::anyhow!("--trusted-provider {p:?}: {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    // A router bootstrapped at a private address is on a private network.
    let dial_private = a.dial_private.unwrap_or_else(|| {
        a.bootstrap.iter().any(|b| {
            beacon_net::addr::multiaddr_ip(b).is_some_and(|ip| !beacon_net::addr::is_public(ip))
        })
    });
    Ok(crate::RouterConfig {
        pins,
        trusted,
        data_dir: a.data_dir,
        listen: a.listen,
        p2p_listen: a.p2p_listen,
        bootstrap: a.bootstrap,
        api_keys: a.api_key,
        rate_per_minute: a.rate_limit,
        remote: a.remote_base_url.map(|base_url| crate::remote::Remote {
            base_url,
            api_key: a.remote_api_key,
        }),
        fallback: crate::remote::FallbackPolicy {
            models: if a.fallback_models.iter().any(|m| m == "*") {
                None
            } else {
                Some(
                    a.fallback_models
                        .iter()
                        .map(|m| m.trim().to_string())
                        .filter(|m| !m.is_empty())
                        .chain(a.remote_model.clone())
                        .collect(),
                )
            },
            max_tokens: a.fallback_max_tokens.max(1),
            region: a.remote_region,
        },
        dispatch: crate::dispatch::DispatchConfig {
            attempt_timeout: Duration::from_secs(a.attempt_timeout.max(1)),
            audit_rate: a.audit_rate.clamp(0.0, 1.0),
            hedge_quantile: Some(a.hedge_quantile),
            breaker_failures: a.breaker_failures.max(1),
            breaker_open: Duration::from_secs(a.breaker_open),
            ..Default::default()
        },
        policy: crate::placement::Policy {
            allowed_regions: (!a.allowed_regions.is_empty())
                .then(|| a.allowed_regions.into_iter().collect()),
            ..Default::default()
        },
        max_body: a.max_body_mib << 20,
        max_queue: a.max_queue,
        advert_expiry: Duration::from_secs(a.advert_expiry.max(3)),
        tls: a.tls_cert.zip(a.tls_key),
        dial_private,
        http: beacon_net::http::HttpLimits {
            header_timeout: Duration::from_secs(a.http_header_timeout.max(1)),
            max_per_address: a.http_max_per_address.max(1),
            ..Default::default()
        },
        max_minion_jobs: a.max_minions_jobs,
        minions_token_budget: a.minions_token_budget,
        minions: crate::minions::MinionsConfig {
            local_model: a.minions_local_model,
            remote_model: a.remote_model,
            allow_remote_override: a.allow_remote_override,
            remote_timeout: Some(Duration::from_secs(a.remote_timeout.max(1))),
            ..Default::default()
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review L2: the parsed flags derive `Debug`; no key may show in it.
    #[test]
    fn keys_never_show_in_debug_output() {
        let serve = Cli::try_parse_from([
            "beacon-router",
            "serve",
            "--api-key",
            "sk-client-one,sk-client-two",
            "--remote-api-key",
            "sk-remote-three",
        ])
        .unwrap();
        let minions = Cli::try_parse_from([
            "beacon-router",
            "minions",
            "--api-key",
            "sk-client-four",
            "--task",
            "t",
            "--context",
            "doc.txt",
        ])
        .unwrap();
        let shown = format!("{serve:?} {minions:?}");
        for key in ["one", "two", "three", "four"] {
            assert!(!shown.contains(&format!("-{key}")), "{shown}");
        }
        assert!(shown.contains("[redacted]"));
    }
}
