//! The scheduler: which models are loaded, and who may use them.
//!
//! An actor owns the table of loaded models. `acquire` resolves a model in the store, loads
//! it on first use (estimating weights + KV cache from GGUF metadata first, and evicting
//! least-recently-used idle models when the memory budget would be exceeded), and hands out
//! a [`Lease`] on its engine. Requests beyond a model's parallel slots wait in the engine's
//! queue, bounded: past `max_queue` waiting requests, `acquire` answers [`SchedError::Busy`]
//! (HTTP 503 with `Retry-After`). Idle models are unloaded after their keep-alive
//! (default 5 minutes; `0` unloads right after use, `-1` never), like Docker Model Runner.

use crate::hardware::available_memory;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use beacon_proto::Digest;
use serde::Serialize;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::engine::{Engine, EngineConfig, EngineError};
use crate::store::{ModelRecord, Store, StoreError};

#[derive(Debug, Error)]
pub enum SchedError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("model {model} needs about {need} MiB but only {budget} MiB can be used on this node")]
    TooLarge {
        model: String,
        need: u64,
        budget: u64,
    },
    #[error("busy: {0}")]
    Busy(String),
    #[error("the scheduler has stopped")]
    Stopped,
}

/// How long an idle model stays loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum KeepAlive {
    For(Duration),
    Forever,
}

impl KeepAlive {
    /// Parses DMR/Ollama style values: `-1` forever, `0` unload at once, `300`/`300s`/`5m`/`1h`.
    pub fn parse(s: &str) -> Result<KeepAlive, String> {
        let s = s.trim();
        if s == "-1" {
            return Ok(KeepAlive::Forever);
        }
        let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
        let n: u64 = num
            .parse()
            .map_err(|_| format!("keep_alive {s:?} is not a duration"))?;
        let secs = match unit {
            "" | "s" => Some(n),
            "m" => n.checked_mul(60),
            "h" => n.checked_mul(3600),
            _ => return Err(format!("keep_alive {s:?}: unit must be s, m or h")),
        }
        .ok_or_else(|| format!("keep_alive {s:?} is too long (use -1 to keep forever)"))?;
        Ok(KeepAlive::For(Duration::from_secs(secs)))
    }
}

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    pub engine: EngineConfig,
    /// Bytes the loaded models may use in total.
    pub memory_budget: u64,
    pub keep_alive: KeepAlive,
    /// Requests that may wait per model beyond its parallel slots.
    pub max_queue: usize,
    /// Check each model file's digest before loading it (off only for `--fault unchecked`).
    pub check_blobs: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            engine: EngineConfig::default(),
            memory_budget: available_memory() / 10 * 8,
            keep_alive: KeepAlive::For(Duration::from_secs(300)),
            max_queue: 64,
            check_blobs: true,
        }
    }
}

/// Per loaded model: shared between the actor and leases.
struct Loaded {
    engine: Engine,
    record: ModelRecord,
    name: String,
    estimate: u64,
    in_flight: Arc<AtomicUsize>,
    last_used: Arc<Mutex<Instant>>,
    keep_alive: KeepAlive,
    loaded_at: Instant,
}

/// A right to use a loaded engine; dropping it marks the request finished.
pub struct Lease {
    pub engine: Engine,
    pub record: ModelRecord,
    in_flight: Arc<AtomicUsize>,
    last_used: Arc<Mutex<Instant>>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        *self.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A loaded model as `/engines/ps` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct RunningModel {
    pub model: String,
    pub digest: String,
    pub memory_estimate: u64,
    pub in_flight: usize,
    /// Parallel sequences of the loaded engine.
    pub parallel: usize,
    /// Requests waiting for a free sequence.
    pub queued: usize,
    pub idle_seconds: u64,
    pub loaded_seconds: u64,
    pub load_ms: u64,
}

enum Cmd {
    Acquire {
        model: String,
        keep_alive: Option<KeepAlive>,
        reply: oneshot::Sender<Result<Lease, SchedError>>,
    },
    Loaded {
        digest: Digest,
        result: Result<Engine, EngineError>,
    },
    /// A model's header and template were read: paths, memory estimate, template.
    Prepared {
        digest: Digest,
        record: Box<ModelRecord>,
        model: String,
        result: Result<(Vec<PathBuf>, u64, Option<String>), SchedError>,
    },
    Ps {
        reply: oneshot::Sender<Vec<RunningModel>>,
    },
    Unload {
        model: Option<String>,
        reply: oneshot::Sender<Vec<String>>,
    },
}

/// Cloneable handle to the scheduler actor.
#[derive(Clone)]
pub struct Scheduler {
    tx: mpsc::Sender<Cmd>,
}

impl Scheduler {
    pub fn start(store: Store, config: SchedulerConfig) -> Scheduler {
        let (tx, rx) = mpsc::channel(256);
        let actor = Actor {
            store,
            config,
            loaded: HashMap::new(),
            loading: HashMap::new(),
            preparing: HashMap::new(),
            tx: tx.clone(),
        };
        tokio::spawn(actor.run(rx));
        Scheduler { tx }
    }

    /// A lease on `model`'s engine, loading it if needed.
    pub async fn acquire(
        &self,
        model: &str,
        keep_alive: Option<KeepAlive>,
    ) -> Result<Lease, SchedError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Acquire {
                model: model.to_string(),
                keep_alive,
                reply,
            })
            .await
            .map_err(|_| SchedError::Stopped)?;
        rx.await.map_err(|_| SchedError::Stopped)?
    }

    pub async fn ps(&self) -> Vec<RunningModel> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Cmd::Ps { reply }).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Unloads `model` (or every idle model); returns what was unloaded.
    pub async fn unload(&self, model: Option<String>) -> Vec<String> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Cmd::Unload { model, reply }).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }
}

type Waiter = (
    oneshot::Sender<Result<Lease, SchedError>>,
    Option<KeepAlive>,
);

struct Actor {
    store: Store,
    config: SchedulerConfig,
    loaded: HashMap<Digest, Loaded>,
    loading: HashMap<Digest, (ModelRecord, String, u64, Vec<Waiter>)>,
    /// Models whose header is being read before they load, and who waits for them.
    preparing: HashMap<Digest, Vec<Waiter>>,
    tx: mpsc::Sender<Cmd>,
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.handle(cmd),
                    None => return,
                },
                _ = tick.tick() => self.expire(),
            }
        }
    }

    fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Acquire {
                model,
                keep_alive,
                reply,
            } => self.acquire(model, keep_alive, reply),
            Cmd::Loaded { digest, result } => self.loaded(digest, result),
            Cmd::Prepared {
                digest,
                record,
                model,
                result,
            } => self.prepared(digest, *record, model, result),
            Cmd::Ps { reply } => {
                let list = self
                    .loaded
                    .values()
                    .map(|l| RunningModel {
                        model: l.name.clone(),
                        digest: l.record.manifest_digest.to_string(),
                        memory_estimate: l.estimate,
                        in_flight: l.in_flight.load(Ordering::SeqCst),
                        parallel: l.engine.info().config.parallel as usize,
                        queued: l
                            .in_flight
                            .load(Ordering::SeqCst)
                            .saturating_sub(l.engine.info().config.parallel as usize),
                        idle_seconds: l
                            .last_used
                            .lock()
                            .map(|t| t.elapsed().as_secs())
                            .unwrap_or(0),
                        loaded_seconds: l.loaded_at.elapsed().as_secs(),
                        load_ms: l.engine.info().load_ms,
                    })
                    .collect();
                let _ = reply.send(list);
            }
            Cmd::Unload { model, reply } => {
                let target = model
                    .and_then(|m| self.store.resolve(&m).ok())
                    .map(|r| r.manifest_digest);
                let victims: Vec<Digest> = self
                    .loaded
                    .iter()
                    .filter(|(d, l)| {
                        target.is_none_or(|t| t == **d) && l.in_flight.load(Ordering::SeqCst) == 0
                    })
                    .map(|(d, _)| *d)
                    .collect();
                let names = victims
                    .iter()
                    .filter_map(|d| self.loaded.remove(d))
                    .map(|l| l.name)
                    .collect();
                let _ = reply.send(names);
            }
        }
    }

    fn lease(&self, l: &Loaded) -> Lease {
        l.in_flight.fetch_add(1, Ordering::SeqCst);
        Lease {
            engine: l.engine.clone(),
            record: l.record.clone(),
            in_flight: l.in_flight.clone(),
            last_used: l.last_used.clone(),
        }
    }

    fn acquire(
        &mut self,
        model: String,
        keep_alive: Option<KeepAlive>,
        reply: oneshot::Sender<Result<Lease, SchedError>>,
    ) {
        let record = match self.store.resolve(&model) {
            Ok(r) => r,
            Err(e) => {
                let _ = reply.send(Err(e.into()));
                return;
            }
        };
        let digest = record.manifest_digest;
        if let Some(l) = self.loaded.get_mut(&digest) {
            let waiting = l
                .in_flight
                .load(Ordering::SeqCst)
                .saturating_sub(l.engine.info().config.parallel as usize);
            if waiting >= self.config.max_queue {
                let _ = reply.send(Err(SchedError::Busy(format!(
                    "{waiting} requests already wait for {model}"
                ))));
                return;
            }
            if let Some(k) = keep_alive {
                l.keep_alive = k;
            }
            let lease = self.lease(&self.loaded[&digest]);
            let _ = reply.send(Ok(lease));
            return;
        }
        if let Some((_, _, _, waiters)) = self.loading.get_mut(&digest) {
            waiters.push((reply, keep_alive));
            return;
        }
        if let Some(waiters) = self.preparing.get_mut(&digest) {
            waiters.push((reply, keep_alive));
            return;
        }
        // The GGUF header and the chat template are read off the actor (review L7: a large
        // header stalled every other request while it was read), bounded, and the load
        // goes on when they are in.
        self.preparing.insert(digest, vec![(reply, keep_alive)]);
        let (tx, store, engine) = (
            self.tx.clone(),
            self.store.clone(),
            self.config.engine.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let paths = store.gguf_paths(&record);
            let result = estimate_memory(&paths, &engine)
                .map(|estimate| (paths, estimate, chat_template(&store, &record)));
            let _ = tx.blocking_send(Cmd::Prepared {
                digest,
                record: Box::new(record),
                model,
                result,
            });
        });
    }

    /// The header is read: check the memory budget, make room, and load.
    fn prepared(
        &mut self,
        digest: Digest,
        record: ModelRecord,
        model: String,
        result: Result<(Vec<PathBuf>, u64, Option<String>), SchedError>,
    ) {
        let Some(waiters) = self.preparing.remove(&digest) else {
            return;
        };
        // The first waiter gets the error itself, any others its message.
        let fail = |waiters: Vec<Waiter>, e: SchedError| {
            let message = e.to_string();
            let mut e = Some(e);
            for (reply, _) in waiters {
                let e = e
                    .take()
                    .unwrap_or_else(|| SchedError::Store(StoreError::Manifest(message.clone())));
                let _ = reply.send(Err(e));
            }
        };
        let (paths, estimate, template) = match result {
            Ok(r) => r,
            Err(e) => return fail(waiters, e),
        };
        if estimate > self.config.memory_budget {
            let e = SchedError::TooLarge {
                model,
                need: estimate >> 20,
                budget: self.config.memory_budget >> 20,
            };
            return fail(waiters, e);
        }
        // Evict idle models, least recently used first, until the new one fits.
        let in_use = |a: &Actor| {
            a.loaded.values().map(|l| l.estimate).sum::<u64>()
                + a.loading.values().map(|l| l.2).sum::<u64>()
        };
        while in_use(self) + estimate > self.config.memory_budget {
            let victim = self
                .loaded
                .iter()
                .filter(|(_, l)| l.in_flight.load(Ordering::SeqCst) == 0)
                .min_by_key(|(_, l)| *l.last_used.lock().unwrap_or_else(|p| p.into_inner()))
                .map(|(d, _)| *d);
            match victim {
                Some(d) => {
                    if let Some(l) = self.loaded.remove(&d) {
                        info!(model = %l.name, "evicting to make room");
                    }
                }
                None => {
                    let e = SchedError::Busy("memory is taken by models in use".into());
                    return fail(waiters, e);
                }
            }
        }
        let Some(path) = paths.first().cloned() else {
            let e = SchedError::Store(StoreError::Manifest("model has no GGUF file".into()));
            return fail(waiters, e);
        };
        let mut engine_config = self.config.engine.clone();
        engine_config.chat_template = template;
        let blobs: Vec<Digest> = record
            .files
            .iter()
            .filter(|f| f.kind == crate::store::artifact::FileKind::Gguf)
            .map(|f| f.digest)
            .collect();
        self.loading
            .insert(digest, (record, model, estimate, waiters));
        let tx = self.tx.clone();
        let store = self.store.clone();
        let check = self.config.check_blobs;
        tokio::task::spawn_blocking(move || {
            // Load-time integrity: what is loaded is what was pulled and advertised.
            let checked = blobs.iter().filter(|_| check).try_for_each(|d| {
                store.check_blob(d).map_err(|e| EngineError::Load {
                    path: store.blob_path(d),
                    reason: format!("{e}; the file changed after it was pulled, so it is not served (pull the model again)"),
                })
            });
            let result = checked.and_then(|()| Engine::load(&path, engine_config));
            let _ = tx.blocking_send(Cmd::Loaded { digest, result });
        });
    }

    fn loaded(&mut self, digest: Digest, result: Result<Engine, EngineError>) {
        let Some((record, name, estimate, waiters)) = self.loading.remove(&digest) else {
            return;
        };
        match result {
            Ok(engine) => {
                info!(model = %name, load_ms = engine.info().load_ms, "model loaded");
                let keep_alive = waiters
                    .iter()
                    .find_map(|(_, k)| *k)
                    .unwrap_or(self.config.keep_alive);
                let l = Loaded {
                    engine,
                    record,
                    name,
                    estimate,
                    in_flight: Arc::new(AtomicUsize::new(0)),
                    last_used: Arc::new(Mutex::new(Instant::now())),
                    keep_alive,
                    loaded_at: Instant::now(),
                };
                for (reply, _) in waiters {
                    let _ = reply.send(Ok(self.lease(&l)));
                }
                self.loaded.insert(digest, l);
            }
            Err(e) => {
                warn!(model = %name, error = %e, "model failed to load");
                for (reply, _) in waiters {
                    let _ = reply.send(Err(e.clone().into()));
                }
            }
        }
    }

    fn expire(&mut self) {
        let expired: Vec<Digest> = self
            .loaded
            .iter()
            .filter(|(_, l)| {
                let idle = l.last_used.lock().map(|t| t.elapsed()).unwrap_or_default();
                l.in_flight.load(Ordering::SeqCst) == 0
                    && matches!(l.keep_alive, KeepAlive::For(d) if idle >= d)
            })
            .map(|(d, _)| *d)
            .collect();
        for d in expired {
            if let Some(l) = self.loaded.remove(&d) {
                info!(model = %l.name, "unloaded after idle timeout");
            }
        }
    }
}

/// Largest chat template read (real ones are a few KiB).
const MAX_TEMPLATE_BYTES: u64 = 1 << 20;
/// Largest GGUF header read to estimate memory (a 256k-token vocabulary is a few MiB).
const MAX_ESTIMATE_HEADER: u64 = 64 << 20;

/// A `.jinja` chat template shipped in the artifact, if any and not over the bound.
fn chat_template(store: &Store, record: &ModelRecord) -> Option<String> {
    let f = record
        .files
        .iter()
        .find(|f| f.kind == crate::store::artifact::FileKind::ChatTemplate)?;
    let path = store.blob_path(&f.digest);
    if std::fs::metadata(&path).ok()?.len() > MAX_TEMPLATE_BYTES {
        warn!(template = %path.display(), "chat template over 1 MiB: not used");
        return None;
    }
    std::fs::read_to_string(path).ok()
}

/// Weights + KV cache + compute buffers, estimated from the GGUF header before loading.
pub fn estimate_memory(paths: &[PathBuf], config: &EngineConfig) -> Result<u64, SchedError> {
    let first = paths
        .first()
        .ok_or_else(|| SchedError::Store(StoreError::Manifest("no GGUF file".into())))?;
    let weights: u64 = paths
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .fold(0, u64::saturating_add);
    let h = crate::store::package::read_gguf_header_within(first, MAX_ESTIMATE_HEADER)?;
    let arch = h.architecture().unwrap_or("llama").to_string();
    let get = |k: &str| h.get(&format!("{arch}.{k}")).and_then(|v| v.as_u64());
    let n_layer = get("block_count").unwrap_or(32);
    let n_embd = get("embedding_length").unwrap_or(4096);
    let n_head = get("attention.head_count").unwrap_or(32).max(1);
    let n_head_kv = get("attention.head_count_kv").unwrap_or(n_head);
    let head_dim = get("attention.key_length").unwrap_or(n_embd / n_head);
    let n_ctx = u64::from(config.ctx_per_slot) * u64::from(config.parallel.max(1));
    // The header comes from an artifact anyone may publish: every product saturates, so
    // absurd dimensions make a model that never fits rather than an overflow.
    let kv = [n_layer, n_ctx, n_head_kv, head_dim, 2] // K and V, f16
        .into_iter()
        .fold(2u64, u64::saturating_mul);
    let vocab = h.get("tokenizer.ggml.tokens").map(|v| match v {
        beacon_proto::gguf::Value::Array(a) => a.len() as u64,
        _ => 32_000,
    });
    let compute = vocab
        .unwrap_or(32_000)
        .saturating_mul(u64::from(config.batch) * 4)
        .saturating_add(64 * 1024 * 1024);
    Ok(weights.saturating_add(kv).saturating_add(compute))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_values() {
        assert_eq!(KeepAlive::parse("-1"), Ok(KeepAlive::Forever));
        assert_eq!(KeepAlive::parse("0"), Ok(KeepAlive::For(Duration::ZERO)));
        assert_eq!(
            KeepAlive::parse("5m"),
            Ok(KeepAlive::For(Duration::from_secs(300)))
        );
        assert_eq!(
            KeepAlive::parse("90s"),
            Ok(KeepAlive::For(Duration::from_secs(90)))
        );
        assert!(KeepAlive::parse("soon").is_err());
        assert!(KeepAlive::parse("5d").is_err());
        // Review M7: `n * 3600` overflowed (a panic in debug builds, a wrap in release).
        let e = KeepAlive::parse("18446744073709551615h").unwrap_err();
        assert!(e.contains("too long"), "{e}");
        assert!(KeepAlive::parse("18446744073709551615m").is_err());
    }

    /// Review M7: a GGUF header from an untrusted artifact with absurd dimensions made the
    /// memory estimate overflow (a panic of the scheduler actor in debug builds, in release
    /// a wrap that slipped under the memory budget). It saturates: such a model never fits.
    #[test]
    fn absurd_gguf_dimensions_saturate_the_memory_estimate() {
        use beacon_proto::gguf::{Value, write_header};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absurd.gguf");
        let header = write_header(
            &[
                ("general.architecture".into(), Value::Str("llama".into())),
                ("llama.block_count".into(), Value::U64(u64::MAX / 3)),
                ("llama.attention.head_count".into(), Value::U64(1)),
                (
                    "llama.attention.head_count_kv".into(),
                    Value::U64(u64::MAX / 5),
                ),
                ("llama.attention.key_length".into(), Value::U64(u64::MAX)),
            ],
            &[],
        );
        std::fs::write(&path, header).unwrap();
        let bytes = estimate_memory(&[path], &EngineConfig::default()).unwrap();
        assert_eq!(bytes, u64::MAX);
    }

    /// Review L7: the header read to estimate memory had no bound below 512 MiB, and it
    /// ran on the actor. It runs beside it now, and reads at most `MAX_ESTIMATE_HEADER`.
    #[test]
    fn the_estimate_reads_a_bounded_header() {
        use beacon_proto::gguf::{Value, write_header};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bloated.gguf");
        // Five 15 MiB strings (one string may have 16 MiB): a 75 MiB header.
        let mut keys = vec![("general.architecture".into(), Value::Str("llama".into()))];
        for i in 0..5 {
            keys.push((
                format!("general.padding{i}"),
                Value::Str("x".repeat(15 << 20)),
            ));
        }
        let header = write_header(&keys, &[]);
        std::fs::write(&path, header).unwrap();
        let e = estimate_memory(std::slice::from_ref(&path), &EngineConfig::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated"), "{e}");
        // Packaging, which reads once and off any actor, still takes it.
        assert!(crate::store::package::read_gguf_header(&path).is_ok());
    }
}
