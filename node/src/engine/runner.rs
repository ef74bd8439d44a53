//! The runner thread: owns the model and context, admits requests into free sequences,
//! builds one batch per step from every active sequence (one token each while generating,
//! prompt chunks while prefilling), decodes, samples per sequence and streams the results.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Instant;

use beacon_proto::{FinishReason, Role, Timings, TokenScore, Usage};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::{LlamaContextParams, LlamaPoolingType};
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use tokio::sync::mpsc as tmpsc;
use tokio::sync::oneshot;
use tracing::{debug, warn};

use super::stop::{Fed, TextStream};
use super::{
    Command, Completion, Embeddings, EngineConfig, EngineError, Event, GenerateRequest, ModelInfo,
    Prompt, ScoreRequest, Scored, backend, grammar,
};

type Events = tmpsc::UnboundedSender<Result<Event, EngineError>>;

/// How a job picks its tokens.
enum Sampler {
    /// llama.cpp's chain: the output grammar (if any), then greedy.
    Chain(LlamaSampler),
    /// With a temperature: the grammar, then seeded inverse-CDF sampling
    /// (`beacon_proto::sampling`), which an auditor can replay from the seed.
    Seeded {
        grammar: Option<LlamaSampler>,
        sampling: beacon_proto::Sampling,
        seed: u64,
    },
}

struct Job {
    events: Events,
    sampler: Sampler,
    prompt: Vec<LlamaToken>,
    /// Next prompt index to feed.
    fed: usize,
    generated: Vec<u32>,
    max_tokens: usize,
    text: TextStream,
    /// Token sampled last, to be fed in the next step.
    next: Option<LlamaToken>,
    /// Index in the current batch whose logits this job samples from.
    logits_at: Option<i32>,
    submitted: Instant,
    admitted: Instant,
    first_token: Option<Instant>,
    cached: usize,
    return_tokens: bool,
    /// Sampling time spent under the output grammar, when there is one.
    grammar_clock: Option<grammar::Clock>,
}

/// Most positions an audit decodes in one slice while sequences are generating (a
/// generation step waits for at most one slice).
const SIDE_SLICE: usize = 64;
/// Most audits and embeddings requests waiting on one model; more are refused as busy.
const MAX_SIDE_TASKS: usize = 64;

/// Work on the model's other contexts, done in slices between decode steps.
enum SideTask {
    Score {
        task: Box<ScoreTask>,
        reply: oneshot::Sender<Result<Scored, EngineError>>,
    },
    Embed {
        task: EmbedTask,
        reply: oneshot::Sender<Result<Embeddings, EngineError>>,
    },
}

/// An audit under way.
struct ScoreTask {
    /// Prompt and claimed tokens.
    all: Vec<LlamaToken>,
    prompt_len: usize,
    /// Score the end of generation after the last claimed token.
    score_end: bool,
    grammar: Option<LlamaSampler>,
    /// Time spent applying `grammar`.
    grammar_clock: grammar::Clock,
    sampling: Option<beacon_proto::Sampling>,
    /// Next position to decode.
    pos: usize,
    scored: Scored,
}

/// An embeddings request under way.
struct EmbedTask {
    inputs: Vec<String>,
    next: usize,
    vectors: Vec<Vec<f32>>,
    prompt_tokens: u32,
}

struct Slot {
    seq: i32,
    /// Tokens whose KV cells this sequence holds, by position.
    cache: Vec<LlamaToken>,
    job: Option<Job>,
    last_used: Instant,
}

pub(super) fn run(
    path: PathBuf,
    config: EngineConfig,
    rx: mpsc::Receiver<Command>,
    ready: mpsc::Sender<Result<ModelInfo, EngineError>>,
) {
    let load_err = |reason: String| EngineError::Load {
        path: path.clone(),
        reason,
    };
    let started = Instant::now();
    let backend = match backend() {
        Ok(b) => b,
        Err(e) => {
            let _ = ready.send(Err(load_err(e)));
            return;
        }
    };
    let model_params = LlamaModelParams::default().with_n_gpu_layers(config.gpu_layers);
    let model = match LlamaModel::load_from_file(backend, &path, &model_params) {
        Ok(m) => m,
        Err(e) => {
            let _ = ready.send(Err(load_err(e.to_string())));
            return;
        }
    };
    let parallel = config.parallel.max(1);
    let ctx_per_slot = config.ctx_per_slot.clamp(64, model.n_ctx_train().max(64));
    let n_ctx = ctx_per_slot * parallel;
    let threads = config.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1)
    }) as i32;
    let ctx_params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch(config.batch.max(parallel))
        .with_n_ubatch(config.batch.max(parallel))
        .with_n_seq_max(parallel)
        .with_n_threads(threads)
        .with_n_threads_batch(threads)
        .with_kv_unified(true);
    let mut ctx = match model.new_context(backend, ctx_params) {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(load_err(e.to_string())));
            return;
        }
    };
    let template = match &config.chat_template {
        Some(t) => LlamaChatTemplate::new(t).map_err(|e| e.to_string()),
        None => model.chat_template(None).map_err(|e| e.to_string()),
    };
    let info = ModelInfo {
        path: path.clone(),
        n_ctx_train: model.n_ctx_train(),
        n_vocab: model.n_vocab(),
        n_params: model.n_params(),
        size_bytes: model.size(),
        config: EngineConfig {
            ctx_per_slot,
            parallel,
            ..config.clone()
        },
        load_ms: started.elapsed().as_millis() as u64,
    };
    if ready.send(Ok(info)).is_err() {
        return;
    }

    let mut runner = Runner {
        model: &model,
        embed_ctx: None,
        score_ctx: None,
        threads,
        template,
        slots: (0..parallel as i32)
            .map(|seq| Slot {
                seq,
                cache: Vec::new(),
                job: None,
                last_used: Instant::now(),
            })
            .collect(),
        queue: VecDeque::new(),
        side: VecDeque::new(),
        batch: LlamaBatch::new(config.batch.max(parallel) as usize, parallel as i32),
        batch_cap: config.batch.max(parallel) as usize,
        ctx_per_slot: ctx_per_slot as usize,
        n_ctx: n_ctx as usize,
    };
    runner.serve(&mut ctx, &rx);
    debug!(path = %path.display(), "runner stopped");
}

struct Runner<'m> {
    model: &'m LlamaModel,
    /// A second context with embeddings on, created on the first embeddings request.
    embed_ctx: Option<LlamaContext<'m>>,
    /// A context for audits (teacher-forced scoring), created on the first audit.
    score_ctx: Option<LlamaContext<'m>>,
    threads: i32,
    template: Result<LlamaChatTemplate, String>,
    slots: Vec<Slot>,
    queue: VecDeque<(Box<GenerateRequest>, Events, Instant)>,
    /// Audits and embeddings requests, oldest first; the oldest advances one slice per
    /// decode step.
    side: VecDeque<SideTask>,
    batch: LlamaBatch<'static>,
    batch_cap: usize,
    ctx_per_slot: usize,
    n_ctx: usize,
}

impl<'m> Runner<'m> {
    fn serve(&mut self, ctx: &mut LlamaContext, rx: &mpsc::Receiver<Command>) {
        loop {
            let idle = self.slots.iter().all(|s| s.job.is_none())
                && self.queue.is_empty()
                && self.side.is_empty();
            if idle {
                match rx.recv() {
                    Ok(cmd) => self.accept(cmd),
                    Err(_) => return,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(cmd) => self.accept(cmd),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        if self.slots.iter().all(|s| s.job.is_none())
                            && self.queue.is_empty()
                            && self.side.is_empty()
                        {
                            return;
                        }
                        break;
                    }
                }
            }
            self.admit(ctx);
            self.step(ctx);
            let generating = self.slots.iter().any(|s| s.job.is_some());
            self.side_step(generating);
        }
    }

    fn accept(&mut self, cmd: Command) {
        match cmd {
            Command::Generate {
                request,
                events,
                submitted,
            } => self.queue.push_back((request, events, submitted)),
            Command::Embed { .. } | Command::Score { .. } if self.side.len() >= MAX_SIDE_TASKS => {
                let busy = EngineError::Busy(format!(
                    "{MAX_SIDE_TASKS} audits and embeddings requests are already waiting"
                ));
                match cmd {
                    Command::Embed { reply, .. } => {
                        let _ = reply.send(Err(busy));
                    }
                    Command::Score { reply, .. } => {
                        let _ = reply.send(Err(busy));
                    }
                    Command::Generate { .. } => {}
                }
            }
            Command::Embed { inputs, reply } => self.side.push_back(SideTask::Embed {
                task: EmbedTask {
                    inputs,
                    next: 0,
                    vectors: Vec::new(),
                    prompt_tokens: 0,
                },
                reply,
            }),
            Command::Score { request, reply } => match self.begin_score(&request) {
                Ok(task) => self.side.push_back(SideTask::Score {
                    task: Box::new(task),
                    reply,
                }),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
        }
    }

    /// Starts an audit (teacher-forced scoring): the claimed text is rebuilt and the grammar
    /// set up now; the prefill of prompt + claimed tokens, which reads at every claimed
    /// position the claimed token's log-probability and the argmax (under the same grammar
    /// when the output was constrained), runs in slices between decode steps
    /// ([`Runner::advance_score`]).
    fn begin_score(&self, request: &ScoreRequest) -> Result<ScoreTask, EngineError> {
        let prompt = self.render(&request.prompt)?;
        let n_vocab = self.model.n_vocab().max(0) as u32;
        if let Some(bad) = request.claimed.iter().find(|t| **t >= n_vocab) {
            return Err(EngineError::InvalidRequest(format!(
                "claimed token {bad} is outside the vocabulary ({n_vocab})"
            )));
        }
        let total = prompt.len() + request.claimed.len();
        if prompt.is_empty() || total > self.ctx_per_slot {
            return Err(EngineError::PromptTooLong {
                tokens: total,
                limit: self.ctx_per_slot,
            });
        }
        // The text the claimed tokens make, the way generation makes it.
        let vocab = self.model.vocab();
        let mut text = TextStream::new(&request.stop);
        let mut stopped = false;
        for t in &request.claimed {
            if stopped {
                break;
            }
            let piece = vocab.token_to_piece(LlamaToken(*t as i32), false, None);
            stopped = matches!(text.feed(&piece), Fed::Stop(_));
        }
        if !stopped {
            text.finish();
        }
        let score_end = request.ended_by_model && !stopped;
        let scored = Scored {
            prompt_tokens: prompt.len() as u32,
            scores: Vec::with_capacity(request.claimed.len()),
            text: text.text().to_string(),
            end: None,
        };
        let grammar = match grammar::for_format(&request.format)? {
            Some(g) if !request.claimed.is_empty() || score_end => Some(
                LlamaSampler::grammar(self.model, &g, "root")
                    .map_err(|e| EngineError::Grammar(e.to_string()))?,
            ),
            _ => None,
        };
        let prompt_len = prompt.len();
        let all: Vec<LlamaToken> = prompt
            .into_iter()
            .chain(request.claimed.iter().map(|t| LlamaToken(*t as i32)))
            .collect();
        Ok(ScoreTask {
            pos: if request.claimed.is_empty() && !score_end {
                total
            } else {
                0
            },
            all,
            prompt_len,
            score_end,
            grammar,
            grammar_clock: grammar::Clock::new(n_vocab),
            sampling: request.sampling.clone(),
            scored,
        })
    }

    /// The context audits run on, created on the first audit.
    fn score_context(&mut self) -> Result<&mut LlamaContext<'m>, EngineError> {
        if self.score_ctx.is_none() {
            let backend = backend().map_err(EngineError::Decode)?;
            let n = self.ctx_per_slot as u32;
            let params = LlamaContextParams::default()
                .with_n_ctx(NonZeroU32::new(n))
                .with_n_batch(self.batch_cap as u32)
                .with_n_ubatch(self.batch_cap as u32)
                .with_n_seq_max(1)
                .with_n_threads(self.threads)
                .with_n_threads_batch(self.threads);
            let ctx = self
                .model
                .new_context(backend, params)
                .map_err(|e| EngineError::Decode(e.to_string()))?;
            self.score_ctx = Some(ctx);
        }
        Ok(self.score_ctx.as_mut().expect("scoring context"))
    }

    /// One slice of an audit: at most `cap` positions are decoded and at most
    /// `SCORE_CHUNK` positions' logits read (memory stays bounded for any vocabulary).
    /// Returns whether the audit is complete.
    fn advance_score(&mut self, t: &mut ScoreTask, cap: usize) -> Result<bool, EngineError> {
        const SCORE_CHUNK: usize = 64;
        let total = t.all.len();
        if t.pos >= total {
            return Ok(true);
        }
        let model = self.model;
        let vocab = model.vocab();
        let batch_cap = self.batch_cap;
        let ctx = self.score_context()?;
        if t.pos == 0 {
            ctx.clear_kv_cache();
        }
        // Position p's logits predict all[p + 1]; claimed token k sits at prompt_len + k.
        let first_out = t.prompt_len - 1;
        let pos = t.pos;
        let end = total
            .min(pos + cap.clamp(1, batch_cap))
            .min(pos.max(first_out) + SCORE_CHUNK);
        let mut batch = LlamaBatch::new(end - pos, 1);
        // Logits are needed at every position that predicts a claimed token, and at the
        // last one when the end of generation is scored.
        let last_out = if t.score_end { total } else { total - 1 };
        for (p, token) in t.all.iter().enumerate().take(end).skip(pos) {
            let out = p >= first_out && p < last_out;
            batch
                .add(*token, p as i32, &[0], out)
                .map_err(|e| EngineError::Decode(e.to_string()))?;
        }
        ctx.decode(&mut batch)
            .map_err(|e| EngineError::Decode(e.to_string()))?;
        for p in pos.max(first_out)..end.min(last_out) {
            if p + 1 == total {
                // After the last claimed token: how likely is ending here?
                let array =
                    LlamaTokenDataArray::from_iter(ctx.candidates_ith((p - pos) as i32), false);
                t.scored.end = Some(score_end(t, array, |id| vocab.is_eog(id))?);
                continue;
            }
            let claimed = t.all[p + 1];
            let candidates = ctx.candidates_ith((p - pos) as i32);
            let mut array = LlamaTokenDataArray::from_iter(candidates, false);
            let started = grammar::thread_cpu_time();
            if let Some(g) = t.grammar.as_mut() {
                g.apply(&mut array);
            }
            let applied = grammar::thread_cpu_time().saturating_sub(started);
            let score = match &t.sampling {
                None => score_position(&array, claimed),
                Some(s) => {
                    let k = (p + 1 - t.prompt_len) as u32;
                    seeded_score(&array, s, k, claimed)
                }
            };
            // Accepting a token the grammar forbids aborts llama.cpp: a claimed output
            // that breaks the grammar is scored raw from there on instead.
            match t.grammar.as_mut() {
                Some(g) if score.logprob > f32::MIN => {
                    let started = grammar::thread_cpu_time();
                    g.accept(claimed);
                    t.grammar_clock
                        .charge(applied + grammar::thread_cpu_time().saturating_sub(started))?;
                }
                Some(_) => t.grammar = None,
                None => {}
            }
            t.scored.scores.push(score);
        }
        t.pos = end;
        Ok(t.pos >= total)
    }

    /// The context embeddings run on, created on the first embeddings request.
    fn embed_context(&mut self) -> Result<&mut LlamaContext<'m>, EngineError> {
        if self.embed_ctx.is_none() {
            let backend = backend().map_err(EngineError::Decode)?;
            let n = self.ctx_per_slot as u32;
            let params = LlamaContextParams::default()
                .with_n_ctx(NonZeroU32::new(n))
                .with_n_batch(n)
                .with_n_ubatch(n)
                .with_n_seq_max(1)
                .with_n_threads(self.threads)
                .with_n_threads_batch(self.threads)
                .with_embeddings(true)
                .with_pooling_type(LlamaPoolingType::Mean);
            let ctx = self
                .model
                .new_context(backend, params)
                .map_err(|e| EngineError::Decode(e.to_string()))?;
            self.embed_ctx = Some(ctx);
        }
        Ok(self.embed_ctx.as_mut().expect("embedding context"))
    }

    /// One slice of an embeddings request: its next input (mean pooling needs a whole
    /// input in one batch). Returns whether every input is done.
    fn advance_embed(&mut self, t: &mut EmbedTask) -> Result<bool, EngineError> {
        let Some(text) = t.inputs.get(t.next) else {
            return Ok(true);
        };
        let model = self.model;
        let limit = self.ctx_per_slot;
        let tokens = model.vocab().tokenize(text.as_bytes(), true, false);
        if tokens.is_empty() {
            return Err(EngineError::InvalidRequest(format!(
                "input {} is empty",
                t.next
            )));
        }
        if tokens.len() > limit {
            return Err(EngineError::PromptTooLong {
                tokens: tokens.len(),
                limit,
            });
        }
        let ctx = self.embed_context()?;
        ctx.clear_kv_cache();
        let mut batch = LlamaBatch::new(tokens.len(), 1);
        for (pos, tok) in tokens.iter().enumerate() {
            batch
                .add(*tok, pos as i32, &[0], true)
                .map_err(|e| EngineError::Decode(e.to_string()))?;
        }
        ctx.decode(&mut batch)
            .map_err(|e| EngineError::Decode(e.to_string()))?;
        let v = ctx
            .embeddings_seq_ith(0)
            .map_err(|e| EngineError::Decode(e.to_string()))?;
        let norm = v
            .iter()
            .map(|x| x * x)
            .sum::<f32>()
            .sqrt()
            .max(f32::MIN_POSITIVE);
        t.vectors.push(v.iter().map(|x| x / norm).collect());
        t.prompt_tokens = t.prompt_tokens.saturating_add(tokens.len() as u32);
        t.next += 1;
        Ok(t.next >= t.inputs.len())
    }

    /// Advances the oldest audit or embeddings request by one slice: while sequences are
    /// generating, a slice is at most `SIDE_SLICE` positions (one input for embeddings),
    /// so no audit or embedding stalls generation for longer than that.
    fn side_step(&mut self, generating: bool) {
        let Some(task) = self.side.pop_front() else {
            return;
        };
        let cap = if generating {
            SIDE_SLICE
        } else {
            self.batch_cap
        };
        match task {
            SideTask::Score { mut task, reply } => {
                if reply.is_closed() {
                    return;
                }
                match self.advance_score(&mut task, cap) {
                    Ok(false) => self.side.push_front(SideTask::Score { task, reply }),
                    Ok(true) => {
                        let _ = reply.send(Ok(task.scored));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            SideTask::Embed { mut task, reply } => {
                if reply.is_closed() {
                    return;
                }
                match self.advance_embed(&mut task) {
                    Ok(false) => self.side.push_front(SideTask::Embed { task, reply }),
                    Ok(true) => {
                        let _ = reply.send(Ok(Embeddings {
                            vectors: task.vectors,
                            prompt_tokens: task.prompt_tokens,
                        }));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
        }
    }

    /// Moves queued requests into free sequences, reusing the longest cached prefix.
    fn admit(&mut self, ctx: &mut LlamaContext) {
        while !self.queue.is_empty() {
            let Some(free) = self.free_slot() else { return };
            let (request, events, submitted) = self.queue.pop_front().expect("queue not empty");
            if events.is_closed() {
                continue;
            }
            match self.prepare(&request) {
                Ok((prompt, sampler, max_tokens)) => self.start(
                    ctx, free, prompt, sampler, max_tokens, &request, events, submitted,
                ),
                Err(e) => {
                    let _ = events.send(Err(e));
                }
            }
        }
    }

    fn free_slot(&self) -> Option<usize> {
        // Prefer an empty cache, then the least recently used one.
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.job.is_none())
            .min_by_key(|(_, s)| (!s.cache.is_empty(), s.last_used))
            .map(|(i, _)| i)
    }

    /// The prompt's tokens, rendered through the chat template for chat prompts. Only the
    /// template's own markup may become special tokens: message text (a user's, or a
    /// document's in a MinionS job) is tokenised as plain text, so `<|im_start|>system`
    /// inside it stays text (review M12).
    fn render(&self, prompt: &Prompt) -> Result<Vec<LlamaToken>, EngineError> {
        let vocab = self.model.vocab();
        let messages = match prompt {
            Prompt::Text(t) => return Ok(vocab.tokenize(t.as_bytes(), true, true)),
            Prompt::Chat(messages) => messages,
        };
        let template = self
            .template
            .as_ref()
            .map_err(|e| EngineError::Template(e.clone()))?;
        // The template is rendered with a marker in place of each message's text, where
        // the text is then put back as plain tokens. A second rendering with the markers
        // padded by spaces tells which texts the template trims (Gemma's trims the user's
        // and not the system's), so the text put back is what the template would show.
        let marker = |i: usize| format!("\u{E000}{i}\u{E001}");
        let render = |pad: &str| {
            let chat = messages
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let role = match m.role {
                        Role::System => "system",
                        Role::User => "user",
                        Role::Assistant => "assistant",
                    };
                    LlamaChatMessage::new(role.into(), format!("{pad}{}{pad}", marker(i)))
                        .map_err(|e| EngineError::InvalidRequest(format!("message: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            self.model
                .apply_chat_template(template, &chat, true)
                .map_err(|e| EngineError::Template(e.to_string()))
        };
        let rendered = render("")?;
        let padded = render(" ")?;
        let mut tokens = Vec::new();
        let mut rest = rendered.as_str();
        let mut first = true;
        for (i, m) in messages.iter().enumerate() {
            let mark = marker(i);
            let Some(at) = rest.find(&mark) else {
                return Err(EngineError::Template(format!(
                    "the chat template drops or reorders message {i}"
                )));
            };
            tokens.extend(vocab.tokenize(&rest.as_bytes()[..at], first, true));
            first = false;
            let trims = !padded.contains(&format!(" {mark} "));
            let text = if trims { m.content.trim() } else { &m.content };
            tokens.extend(vocab.tokenize(text.as_bytes(), false, false));
            rest = &rest[at + mark.len()..];
        }
        tokens.extend(vocab.tokenize(rest.as_bytes(), first, true));
        Ok(tokens)
    }

    fn prepare(
        &self,
        request: &GenerateRequest,
    ) -> Result<(Vec<LlamaToken>, Sampler, usize), EngineError> {
        let prompt = self.render(&request.prompt)?;
        if prompt.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        if prompt.len() >= self.ctx_per_slot {
            return Err(EngineError::PromptTooLong {
                tokens: prompt.len(),
                limit: self.ctx_per_slot - 1,
            });
        }
        let max_tokens =
            (request.sampling.max_tokens as usize).min(self.ctx_per_slot - prompt.len());
        let s = &request.sampling;
        let grammar = match grammar::for_format(&request.format)? {
            Some(g) => Some(
                LlamaSampler::grammar(self.model, &g, "root")
                    .map_err(|e| EngineError::Grammar(e.to_string()))?,
            ),
            None => None,
        };
        let sampler = if s.temperature <= 0.0 {
            let mut chain: Vec<LlamaSampler> = grammar.into_iter().collect();
            chain.push(LlamaSampler::greedy());
            Sampler::Chain(LlamaSampler::chain_simple(chain))
        } else {
            Sampler::Seeded {
                grammar,
                sampling: s.clone(),
                seed: s.seed.unwrap_or_else(rand_seed),
            }
        };
        Ok((prompt, sampler, max_tokens))
    }

    #[allow(clippy::too_many_arguments)]
    fn start(
        &mut self,
        ctx: &mut LlamaContext,
        slot: usize,
        prompt: Vec<LlamaToken>,
        sampler: Sampler,
        max_tokens: usize,
        request: &GenerateRequest,
        events: Events,
        submitted: Instant,
    ) {
        // Longest prefix of this prompt already in some sequence's cells.
        let (src, mut lcp) = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| (i, common_prefix(&s.cache, &prompt)))
            .max_by_key(|&(i, n)| (n, i == slot))
            .unwrap_or((slot, 0));
        lcp = lcp.min(prompt.len() - 1); // at least one token must be decoded for logits
        let seq = self.slots[slot].seq;
        if src == slot {
            let _ = ctx.clear_kv_cache_seq(Some(seq as u32), Some(lcp as u32), None);
            self.slots[slot].cache.truncate(lcp);
        } else {
            let _ = ctx.clear_kv_cache_seq(Some(seq as u32), None, None);
            if lcp > 0 {
                let _ = ctx.kv_cache_seq_cp(self.slots[src].seq, seq, Some(0), Some(lcp as u32));
            }
            self.slots[slot].cache = prompt[..lcp].to_vec();
        }
        self.make_room(ctx, prompt.len() - lcp + max_tokens, slot);
        let now = Instant::now();
        let s = &mut self.slots[slot];
        s.last_used = now;
        s.job = Some(Job {
            events,
            sampler,
            fed: lcp,
            prompt,
            generated: Vec::new(),
            max_tokens,
            text: TextStream::new(&request.sampling.stop),
            next: None,
            logits_at: None,
            submitted,
            admitted: now,
            first_token: None,
            cached: lcp,
            return_tokens: request.return_tokens,
            grammar_clock: (!matches!(request.format, super::OutputFormat::Text))
                .then(|| grammar::Clock::new(self.model.n_vocab().max(0) as u32)),
        });
    }

    /// Frees idle prefix caches (least recently used first) until `need` more cells fit.
    fn make_room(&mut self, ctx: &mut LlamaContext, need: usize, keep: usize) {
        let used = |slots: &[Slot]| slots.iter().map(|s| s.cache.len()).sum::<usize>();
        while used(&self.slots) + need > self.n_ctx {
            let victim = self
                .slots
                .iter()
                .enumerate()
                .filter(|(i, s)| *i != keep && s.job.is_none() && !s.cache.is_empty())
                .min_by_key(|(_, s)| s.last_used)
                .map(|(i, _)| i);
            let Some(v) = victim else { break };
            let _ = ctx.clear_kv_cache_seq(Some(self.slots[v].seq as u32), None, None);
            self.slots[v].cache.clear();
        }
    }

    /// Fills the batch: the next token of each generating sequence first (one token each
    /// keeps their latency low), then prompt chunks, within the batch's capacity.
    fn fill_batch(&mut self) {
        self.batch.clear();
        let mut budget = self.batch_cap;
        // Generating sequences first: one token each keeps their latency low.
        for s in &mut self.slots {
            let Some(job) = &mut s.job else { continue };
            job.logits_at = None;
            if let Some(tok) = job.next {
                if budget == 0 {
                    break;
                }
                let pos = s.cache.len() as i32;
                if self.batch.add(tok, pos, &[s.seq], true).is_ok() {
                    job.logits_at = Some(self.batch.n_tokens() - 1);
                    s.cache.push(tok);
                    budget -= 1;
                }
            }
        }
        // Then prompt chunks.
        for s in &mut self.slots {
            let Some(job) = &mut s.job else { continue };
            if job.next.is_some() || job.fed >= job.prompt.len() {
                continue;
            }
            while budget > 0 && job.fed < job.prompt.len() {
                let last = job.fed + 1 == job.prompt.len();
                let tok = job.prompt[job.fed];
                if self.batch.add(tok, job.fed as i32, &[s.seq], last).is_err() {
                    break;
                }
                s.cache.push(tok);
                job.fed += 1;
                budget -= 1;
                if last {
                    job.logits_at = Some(self.batch.n_tokens() - 1);
                }
            }
        }
    }

    /// One decode step over every active sequence.
    fn step(&mut self, ctx: &mut LlamaContext) {
        self.fill_batch();
        if self.batch.n_tokens() == 0 {
            return;
        }
        if let Err(e) = ctx.decode(&mut self.batch) {
            warn!(error = %e, "decode failed");
            // Fail every job in this step; their cells are dropped.
            for s in &mut self.slots {
                if let Some(job) = s.job.take() {
                    let _ = job.events.send(Err(EngineError::Decode(e.to_string())));
                    let _ = ctx.clear_kv_cache_seq(Some(s.seq as u32), None, None);
                    s.cache.clear();
                }
            }
            return;
        }
        for i in 0..self.slots.len() {
            let Some(at) = self.slots[i].job.as_ref().and_then(|j| j.logits_at) else {
                continue;
            };
            let eos = self.model.vocab().eos();
            let token = {
                let job = self.slots[i].job.as_mut().expect("job present");
                job.first_token.get_or_insert_with(Instant::now);
                let position = job.generated.len() as u32;
                // Time under the grammar: the whole chain (grammar, then a greedy pick), or
                // the grammar's two calls around a seeded choice.
                let (token, took) = match &mut job.sampler {
                    Sampler::Chain(chain) => {
                        let started = grammar::thread_cpu_time();
                        let token = chain.sample(ctx, at);
                        (token, grammar::thread_cpu_time().saturating_sub(started))
                    }
                    Sampler::Seeded {
                        grammar,
                        sampling,
                        seed,
                    } => {
                        let mut array =
                            LlamaTokenDataArray::from_iter(ctx.candidates_ith(at), false);
                        let started = grammar::thread_cpu_time();
                        if let Some(g) = grammar.as_mut() {
                            g.apply(&mut array);
                        }
                        let mut took = grammar::thread_cpu_time().saturating_sub(started);
                        let token = seeded_choice_of(&array, sampling, *seed, position)
                            .map_or(eos, |c| LlamaToken(c.token() as i32));
                        if let Some(g) = grammar.as_mut() {
                            let started = grammar::thread_cpu_time();
                            g.accept(token);
                            took += grammar::thread_cpu_time().saturating_sub(started);
                        }
                        (token, took)
                    }
                };
                match job.grammar_clock.as_mut() {
                    Some(clock) => clock.charge(took).map(|()| token),
                    None => Ok(token),
                }
            };
            let token = match token {
                Ok(t) => t,
                Err(e) => {
                    self.fail(ctx, i, e);
                    continue;
                }
            };
            let done = self.sample_done(i, token);
            if let Some(reason) = done {
                self.finish(ctx, i, reason);
            }
        }
    }

    /// Handles a sampled token; returns the finish reason when the job is complete.
    fn sample_done(&mut self, i: usize, token: LlamaToken) -> Option<FinishReason> {
        let vocab = self.model.vocab();
        let s = &mut self.slots[i];
        let job = s.job.as_mut().expect("job present");
        if job.events.is_closed() {
            return Some(FinishReason::Cancelled);
        }
        if vocab.is_eog(token) {
            return Some(FinishReason::Stop);
        }
        job.generated.push(token.0 as u32);
        let piece = vocab.token_to_piece(token, false, None);
        match job.text.feed(&piece) {
            Fed::Stop(text) => {
                let _ = job.events.send(Ok(Event::Token {
                    text,
                    id: Some(token.0 as u32),
                }));
                return Some(FinishReason::Stop);
            }
            Fed::Text(text) => {
                if job
                    .events
                    .send(Ok(Event::Token {
                        text,
                        id: Some(token.0 as u32),
                    }))
                    .is_err()
                {
                    return Some(FinishReason::Cancelled);
                }
            }
        }
        if job.generated.len() >= job.max_tokens {
            return Some(FinishReason::Length);
        }
        job.next = Some(token);
        None
    }

    /// Ends slot `i`'s job with an error.
    fn fail(&mut self, ctx: &mut LlamaContext, i: usize, error: EngineError) {
        if let Some(job) = self.release(ctx, i) {
            let _ = job.events.send(Err(error));
        }
    }

    /// Takes slot `i`'s job and frees its generated cells now, keeping the prompt as a
    /// prefix cache.
    fn release(&mut self, ctx: &mut LlamaContext, i: usize) -> Option<Job> {
        let s = &mut self.slots[i];
        let job = s.job.take()?;
        let keep = job.prompt.len().min(s.cache.len());
        let _ = ctx.clear_kv_cache_seq(Some(s.seq as u32), Some(keep as u32), None);
        s.cache.truncate(keep);
        s.last_used = Instant::now();
        Some(job)
    }

    fn finish(&mut self, ctx: &mut LlamaContext, i: usize, reason: FinishReason) {
        let Some(mut job) = self.release(ctx, i) else {
            return;
        };
        let tail = job.text.finish();
        if !tail.is_empty() {
            let _ = job.events.send(Ok(Event::Token {
                text: tail,
                id: None,
            }));
        }
        let now = Instant::now();
        let first = job.first_token.unwrap_or(now);
        let completion = Completion {
            text: job.text.text().to_string(),
            finish_reason: reason,
            usage: Usage {
                prompt_tokens: job.prompt.len() as u32,
                completion_tokens: job.generated.len() as u32,
                cached_prompt_tokens: job.cached as u32,
            },
            timings: Timings {
                queue_ms: ms(job.admitted - job.submitted),
                prefill_ms: ms(first - job.admitted),
                decode_ms: ms(now - first),
            },
            token_ids: job.return_tokens.then(|| job.generated.clone()),
        };
        let _ = job.events.send(Ok(Event::Done(completion)));
    }
}

/// Log-probability of `claimed` among the allowed candidates (finite logits) and the argmax;
/// a forbidden claimed token scores `f32::MIN`.
fn score_position(array: &LlamaTokenDataArray, claimed: LlamaToken) -> TokenScore {
    let mut max = f32::NEG_INFINITY;
    let mut argmax = claimed;
    let mut claimed_logit = f32::NEG_INFINITY;
    for d in &array.data {
        let l = d.logit();
        if l > max {
            max = l;
            argmax = d.id();
        }
        if d.id() == claimed {
            claimed_logit = l;
        }
    }
    let lse = max
        + array
            .data
            .iter()
            .map(|d| d.logit())
            .filter(|l| l.is_finite())
            .map(|l| (l - max).exp())
            .sum::<f32>()
            .ln();
    TokenScore {
        logprob: if claimed_logit.is_finite() {
            claimed_logit - lse
        } else {
            f32::MIN
        },
        argmax: argmax.0 as u32,
        argmax_logprob: max - lse,
    }
}

/// The logit of `token` in `array` (−∞ when absent).
fn logit_of(array: &LlamaTokenDataArray, token: LlamaToken) -> f32 {
    array
        .data
        .iter()
        .find(|d| d.id() == token)
        .map_or(f32::NEG_INFINITY, |d| d.logit())
}

/// How a sampled `claimed` token at generated position `k` agrees with the seeded choice
/// replayed here: `logprob` is minus how far its key falls short of the replayed choice's,
/// in logits (0: exactly the replayed choice; −1000 when the filters leave it out),
/// `argmax` the replayed choice, `argmax_logprob` 0. A token the grammar forbids scores
/// `f32::MIN`.
fn seeded_score(
    array: &LlamaTokenDataArray,
    sampling: &beacon_proto::Sampling,
    k: u32,
    claimed: LlamaToken,
) -> TokenScore {
    let allowed = logit_of(array, claimed).is_finite();
    match seeded_choice_of(array, sampling, sampling.seed.unwrap_or(0), k) {
        Some(choice) if allowed => TokenScore {
            logprob: -(choice
                .shortfall(claimed.0 as u32)
                .map_or(1000.0, |s| s.min(1000.0)) as f32),
            argmax: choice.token(),
            argmax_logprob: 0.0,
        },
        _ => TokenScore {
            logprob: f32::MIN,
            argmax: 0,
            argmax_logprob: 0.0,
        },
    }
}

/// The seeded choice (`beacon_proto::sampling`) among `array`, the grammar already applied:
/// what a provider samples at generated position `position`, and what an auditor replays.
fn seeded_choice_of(
    array: &LlamaTokenDataArray,
    sampling: &beacon_proto::Sampling,
    seed: u64,
    position: u32,
) -> Option<beacon_proto::sampling::Choice> {
    let candidates: Vec<(u32, f32)> = array
        .data
        .iter()
        .map(|d| (d.id().0 as u32, d.logit()))
        .collect();
    beacon_proto::sampling::Choice::new(&candidates, sampling, seed, position)
}

fn ms(d: std::time::Duration) -> u32 {
    d.as_millis().min(u32::MAX as u128) as u32
}

fn common_prefix(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn rand_seed() -> u64 {
    beacon_proto::Id::random().0 as u64
}
/// How likely ending generation is after the last claimed token of `t`: the best
/// end-of-generation token's score under the same grammar and sampling (the lowest score
/// when the grammar allows none).
fn score_end(
    t: &mut ScoreTask,
    mut array: LlamaTokenDataArray,
    is_eog: impl Fn(LlamaToken) -> bool,
) -> Result<TokenScore, EngineError> {
    if let Some(g) = t.grammar.as_mut() {
        let started = grammar::thread_cpu_time();
        g.apply(&mut array);
        t.grammar_clock
            .charge(grammar::thread_cpu_time().saturating_sub(started))?;
    }
    let eogs: Vec<LlamaToken> = array
        .data
        .iter()
        .filter(|d| is_eog(d.id()) && d.logit().is_finite())
        .map(|d| d.id())
        .collect();
    let forbidden = TokenScore {
        logprob: f32::MIN,
        argmax: 0,
        argmax_logprob: 0.0,
    };
    let total = t.all.len();
    Ok(match &t.sampling {
        _ if eogs.is_empty() => forbidden,
        None => {
            let best = eogs
                .iter()
                .copied()
                .max_by(|a, b| logit_of(&array, *a).total_cmp(&logit_of(&array, *b)))
                .unwrap_or(eogs[0]);
            score_position(&array, best)
        }
        Some(s) => {
            let k = (total - t.prompt_len) as u32;
            let best = eogs
                .iter()
                .map(|e| seeded_score(&array, s, k, *e))
                .max_by(|a, b| a.logprob.total_cmp(&b.logprob));
            best.unwrap_or(forbidden)
        }
    })
}
