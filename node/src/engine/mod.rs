//! The inference engine: llama.cpp (`llama-cpp-2`) behind a cloneable handle.
//!
//! One OS thread owns each loaded model and its context (`LlamaContext` is not `Send`) and
//! runs **continuous batching**: requests join between decode steps, each in its own
//! sequence with its own sampler chain; prompts that share a prefix with any sequence in the
//! KV cache copy those cells (`seq_cp` in a unified cache) instead of prefilling again; a
//! finished sequence frees its generated cells at once and keeps its prompt as a prefix
//! cache, evicted least-recently-used when cells run short. The rest of the node talks to
//! the thread through [`Engine`]: `generate` returns a stream of [`Event`]s.

mod grammar;
pub mod quantize;
mod runner;
pub mod stop;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, mpsc};
use std::time::Instant;

use beacon_proto::{ChatMessage, FinishReason, Sampling, Timings, Usage};
use thiserror::Error;
use tokio::sync::mpsc as tmpsc;

/// Engine failures, each mapped to an HTTP status by the API layer.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum EngineError {
    #[error("cannot load model {path}: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error("chat template: {0}")]
    Template(String),
    #[error("invalid response_format: {0}")]
    Grammar(String),
    #[error("prompt is {tokens} tokens; this model's context allows {limit}")]
    PromptTooLong { tokens: usize, limit: usize },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("inference failed: {0}")]
    Decode(String),
    #[error("busy: {0}")]
    Busy(String),
    #[error("the engine has stopped")]
    Stopped,
}

/// How a model is run.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Parallel sequences (slots) decoded together.
    pub parallel: u32,
    /// Context tokens available to one sequence.
    pub ctx_per_slot: u32,
    /// Most tokens decoded in one step.
    pub batch: u32,
    /// CPU threads; `None` = all cores.
    pub threads: Option<u32>,
    /// Layers offloaded to the GPU (builds with the `cuda` feature); 0 on CPU.
    pub gpu_layers: u32,
    /// A Jinja chat template shipped with the artifact, overriding the GGUF's.
    pub chat_template: Option<String>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            parallel: 8,
            ctx_per_slot: 4096,
            batch: 512,
            threads: None,
            gpu_layers: 0,
            chat_template: None,
        }
    }
}

/// The prompt of a request.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    /// Rendered with the model's chat template, assistant turn opened.
    Chat(Vec<ChatMessage>),
    /// Used as is (completions).
    Text(String),
}

/// Constraint on the output.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum OutputFormat {
    #[default]
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON valid against this schema (JSON text).
    JsonSchema(String),
}

/// One generation.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    pub sampling: Sampling,
    pub format: OutputFormat,
    /// Report generated token ids in the completion (for audits).
    pub return_tokens: bool,
}

/// A finished generation.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    pub text: String,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub timings: Timings,
    pub token_ids: Option<Vec<u32>>,
}

/// What a generation stream yields.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Newly visible text (may be empty while bytes are held back) and the token that
    /// produced it (`None` for text released at the end).
    Token { text: String, id: Option<u32> },
    /// The end, with the whole text and accounting.
    Done(Completion),
}

/// Facts about the loaded model.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub path: PathBuf,
    pub n_ctx_train: u32,
    pub n_vocab: i32,
    pub n_params: u64,
    pub size_bytes: u64,
    pub config: EngineConfig,
    pub load_ms: u64,
}

/// Embeddings of several inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Embeddings {
    /// One L2-normalised, mean-pooled vector per input, in input order.
    pub vectors: Vec<Vec<f32>>,
    pub prompt_tokens: u32,
}

/// A teacher-forced scoring of a claimed output (an audit).
#[derive(Clone, Debug, PartialEq)]
pub struct ScoreRequest {
    pub prompt: Prompt,
    pub claimed: Vec<u32>,
    /// The constraint the claimed output was generated under.
    pub format: OutputFormat,
    /// The stop strings the claimed output was generated with.
    pub stop: Vec<String>,
    /// A sampled output's sampling (temperature, filters, seed): its tokens are scored by
    /// replaying the seeded choice (`beacon_proto::sampling`) instead of by argmax.
    pub sampling: Option<beacon_proto::Sampling>,
    /// The claimed output says the model ended it: unless a stop string explains the end,
    /// score the end-of-generation after the last claimed token too.
    pub ended_by_model: bool,
}

/// Per-token scores of a claimed output, and the text its tokens make.
#[derive(Clone, Debug, PartialEq)]
pub struct Scored {
    pub prompt_tokens: u32,
    pub scores: Vec<beacon_proto::TokenScore>,
    /// The claimed tokens as text, exactly as generation would have produced it (pieces
    /// joined, invalid UTF-8 replaced, cut at the first stop string).
    pub text: String,
    /// The score of ending generation after the claimed tokens (the likeliest
    /// end-of-generation token), when `ended_by_model` and no stop string ended it.
    pub end: Option<beacon_proto::TokenScore>,
}

pub(crate) enum Command {
    Score {
        request: Box<ScoreRequest>,
        reply: tokio::sync::oneshot::Sender<Result<Scored, EngineError>>,
    },
    Embed {
        inputs: Vec<String>,
        reply: tokio::sync::oneshot::Sender<Result<Embeddings, EngineError>>,
    },
    Generate {
        request: Box<GenerateRequest>,
        events: tmpsc::UnboundedSender<Result<Event, EngineError>>,
        submitted: Instant,
    },
}

/// Handle to a loaded model. Clones share the runner thread, which stops when the last
/// handle is dropped.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Command>,
    info: Arc<ModelInfo>,
}

static BACKEND: OnceLock<Result<llama_cpp_2::llama_backend::LlamaBackend, String>> =
    OnceLock::new();

/// The process-wide llama.cpp backend (initialised once; logs go to `tracing`).
pub(crate) fn backend() -> Result<&'static llama_cpp_2::llama_backend::LlamaBackend, String> {
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            llama_cpp_2::llama_backend::LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(Clone::clone)
}

impl Engine {
    /// Loads the GGUF at `path` on a new runner thread and waits until it is ready.
    pub fn load(path: &Path, config: EngineConfig) -> Result<Engine, EngineError> {
        if !path.is_file() {
            return Err(EngineError::Load {
                path: path.to_path_buf(),
                reason: "no such file".into(),
            });
        }
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let path_buf = path.to_path_buf();
        std::thread::Builder::new()
            .name("llama-runner".into())
            .spawn(move || runner::run(path_buf, config, rx, ready_tx))
            .map_err(|e| EngineError::Load {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        let info = ready_rx.recv().map_err(|_| EngineError::Load {
            path: path.to_path_buf(),
            reason: "runner thread exited during load".into(),
        })??;
        Ok(Engine {
            tx,
            info: Arc::new(info),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Starts a generation; tokens arrive on the returned stream, then one `Done`.
    /// Dropping the stream cancels the generation and frees its sequence.
    pub fn generate(
        &self,
        request: GenerateRequest,
    ) -> Result<tmpsc::UnboundedReceiver<Result<Event, EngineError>>, EngineError> {
        let (events, rx) = tmpsc::unbounded_channel();
        self.tx
            .send(Command::Generate {
                request: Box::new(request),
                events,
                submitted: Instant::now(),
            })
            .map_err(|_| EngineError::Stopped)?;
        Ok(rx)
    }

    /// Mean-pooled, normalised embeddings of `inputs`, computed between decode steps on a
    /// second context of the same model.
    pub async fn embed(&self, inputs: Vec<String>) -> Result<Embeddings, EngineError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Command::Embed { inputs, reply })
            .map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    /// Scores `claimed` tokens after `prompt` by teacher-forced prefill on a separate
    /// context (between decode steps of the running generations).
    pub async fn score(&self, request: ScoreRequest) -> Result<Scored, EngineError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Command::Score {
                request: Box::new(request),
                reply,
            })
            .map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    /// Runs a generation to the end.
    pub async fn complete(&self, request: GenerateRequest) -> Result<Completion, EngineError> {
        let mut rx = self.generate(request)?;
        while let Some(event) = rx.recv().await {
            if let Event::Done(c) = event? {
                return Ok(c);
            }
        }
        Err(EngineError::Stopped)
    }
}
