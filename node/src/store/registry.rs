//! Pull and push of model artifacts over the OCI distribution API (`oci-client`).
//!
//! Pull: manifest (digest-checked when the reference pins one, media types checked), then
//! the config and each layer. Every blob streams into `tmp/<hex>.partial` while it is
//! hashed; an interrupted download is continued with an HTTP Range request on the next try
//! or the next run, and a blob enters `blobs/` only when its digest matches. The model is
//! committed to the index only when all its blobs are present, so a killed pull never leaves
//! a half model visible.

use std::time::Duration;

use beacon_proto::digest::Hasher;
use beacon_proto::{Digest, ModelRef, Secret};
use futures::StreamExt;
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use tokio::io::AsyncReadExt;
use tracing::{debug, info, warn};

use super::artifact::{self, FileKind, MANIFEST_MEDIA_TYPE, MAX_METADATA_BYTES, Manifest};
use super::auth::{self, Credentials};
use super::progress::{Progress, ProgressSink};
use super::{ModelRecord, Store, StoreError, StoredFile, now_unix};

/// How to reach registries.
#[derive(Clone, Debug, Default)]
pub struct RegistryOptions {
    /// Registries (`host:port`) that may be reached over plain HTTP. Loopback always may.
    pub insecure: Vec<String>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// The registry (`host:port`) `username`/`password` belong to; `None`: whichever one
    /// an operator's own command names (never on a server, where callers name registries).
    pub credentials_for: Option<String>,
    /// The most bytes the store may take on disk; a pull that would go past it is refused
    /// before it downloads anything.
    pub store_budget: Option<u64>,
}

/// Pulls one process runs at once; more wait their turn (review M5: pulls started through
/// the API outlive their clients, so nothing else bounded them).
pub const MAX_CONCURRENT_PULLS: usize = 2;

/// Talks to OCI registries on behalf of a [`Store`].
#[derive(Clone, Debug)]
pub struct Registry {
    opts: RegistryOptions,
    pulls: std::sync::Arc<tokio::sync::Semaphore>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new(RegistryOptions::default())
    }
}

/// Retries of one blob download before the pull fails (each continues where it stopped).
const BLOB_ATTEMPTS: u32 = 4;

impl Registry {
    pub fn new(opts: RegistryOptions) -> Self {
        crate::tls::install_crypto_provider();
        Registry {
            opts,
            pulls: std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_PULLS)),
        }
    }

    fn client_for(&self, r: &ModelRef) -> Client {
        let protocol = if self.plain_http(r) {
            ClientProtocol::HttpsExcept(vec![r.registry.clone()])
        } else {
            ClientProtocol::Https
        };
        Client::new(ClientConfig {
            protocol,
            use_monolithic_push: true,
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(60)),
            ..Default::default()
        })
    }

    fn plain_http(&self, r: &ModelRef) -> bool {
        r.is_loopback_registry() || self.opts.insecure.iter().any(|h| h == &r.registry)
    }

    /// The credentials for `r`, and whether any were configured.
    async fn credentials(
        &self,
        r: &ModelRef,
        op: RegistryOperation,
    ) -> Result<(RegistryAuth, bool), StoreError> {
        // Flag credentials go to their own registry only: an API caller that names
        // another one must not receive them (review H6).
        let own = self
            .opts
            .credentials_for
            .as_ref()
            .is_none_or(|h| h == &r.registry);
        let creds = if own {
            auth::resolve(
                &r.registry,
                self.opts.username.as_deref(),
                self.opts.password.as_ref().map(Secret::expose),
            )?
        } else {
            auth::resolve(&r.registry, None, None)?
        };
        Ok(match creds {
            Credentials::Anonymous => (RegistryAuth::Anonymous, false),
            Credentials::Basic { username, password } => {
                (RegistryAuth::Basic(username, password), true)
            }
            Credentials::IdentityToken(token) => {
                let push = matches!(op, RegistryOperation::Push);
                let access = super::token::exchange(r, self.plain_http(r), &token, push).await?;
                (RegistryAuth::Bearer(access), true)
            }
        })
    }

    /// Authenticates `client` for `op` on `r`; returns the image reference, the auth used,
    /// and whether credentials were configured (for error messages).
    async fn authenticate(
        &self,
        client: &Client,
        r: &ModelRef,
        op: RegistryOperation,
    ) -> Result<(Reference, RegistryAuth, bool), StoreError> {
        let image = oci_reference(r);
        let (auth, had) = self.credentials(r, op).await?;
        client
            .auth(&image, &auth, op)
            .await
            .map_err(|e| map_err(r, had, e))?;
        Ok((image, auth, had))
    }

    /// Pulls `reference` into `store` and returns the committed record.
    pub async fn pull(
        &self,
        store: &Store,
        reference: &str,
        progress: ProgressSink,
    ) -> Result<ModelRecord, StoreError> {
        let r = ModelRef::parse(reference)?;
        let _turn = self
            .pulls
            .acquire()
            .await
            .map_err(|_| StoreError::Manifest("the pull queue is closed".into()))?;
        let client = self.client_for(&r);
        let (image, auth, had_creds) = self
            .authenticate(&client, &r, RegistryOperation::Pull)
            .await?;
        progress(Progress::Status {
            message: format!("pulling {}", r.familiar()),
        });
        let (bytes, _) = client
            .pull_manifest_raw(&image, &auth, &[MANIFEST_MEDIA_TYPE])
            .await
            .map_err(|e| map_err(&r, had_creds, e))?;
        if bytes.len() > MAX_METADATA_BYTES {
            return Err(StoreError::Manifest(format!(
                "manifest of {} bytes is too large",
                bytes.len()
            )));
        }
        let manifest_digest = Digest::of(&bytes);
        if let Some(want) = r.digest
            && want != manifest_digest
        {
            return Err(StoreError::DigestMismatch {
                expected: want,
                actual: manifest_digest,
            });
        }
        let manifest = Manifest::parse(&bytes)?;
        info!(manifest = %manifest_digest, layers = manifest.layers.len(), "manifest");

        if manifest.config.size > MAX_METADATA_BYTES as u64 {
            return Err(StoreError::Manifest("model config is too large".into()));
        }
        // What the manifest says it will add (each download is held to its size).
        let new = std::iter::once(&manifest.config)
            .chain(&manifest.layers)
            .filter(|d| d.digest.parse().map_or(true, |d| !store.has_blob(&d)))
            .map(|d| d.size)
            .fold(0, u64::saturating_add);
        check_room(
            &r.familiar(),
            new,
            self.opts.store_budget.map(|b| (store.disk_usage(), b)),
            fs2::available_space(store.root()).ok(),
        )?;
        let pull = BlobPull {
            client: &client,
            image: &image,
            r: &r,
            had_creds,
            store,
            progress: &progress,
        };
        pull.fetch_blob(&manifest.config).await?;
        let config_digest: Digest = manifest.config.digest.parse()?;
        let config = store.read_blob(&config_digest)?;
        let facts = artifact::facts_from_config(&manifest.config.media_type, &config)?;

        let mut files = Vec::new();
        for layer in &manifest.layers {
            pull.fetch_blob(layer).await?;
            let digest: Digest = layer.digest.parse()?;
            files.push(StoredFile {
                kind: FileKind::from_media_type(&layer.media_type)?,
                digest,
                size: layer.size,
                filepath: layer
                    .annotations
                    .get(artifact::ANNOTATION_FILEPATH)
                    .cloned()
                    .unwrap_or_else(|| digest.hex()),
            });
        }
        store.put_bytes(&bytes)?;
        let record = ModelRecord {
            manifest_digest,
            config_digest,
            config_media_type: manifest.config.media_type.clone(),
            facts,
            size: files.iter().map(|f| f.size).sum(),
            files,
            created_unix: now_unix(),
        };
        store.commit_model(&record, std::slice::from_ref(&r))?;
        progress(Progress::Status {
            message: format!("pulled {} ({})", r.familiar(), manifest_digest),
        });
        Ok(record)
    }
}

/// One pull's connection and destination: what every blob download of it shares.
#[derive(Clone, Copy)]
struct BlobPull<'a> {
    client: &'a Client,
    image: &'a Reference,
    r: &'a ModelRef,
    had_creds: bool,
    store: &'a Store,
    progress: &'a ProgressSink,
}

impl BlobPull<'_> {
    /// Makes `desc` present and verified in the store (locked per blob, retried with resume).
    async fn fetch_blob(&self, desc: &artifact::Descriptor) -> Result<(), StoreError> {
        let BlobPull {
            store, progress, ..
        } = *self;
        let digest: Digest = desc.digest.parse()?;
        if store.has_blob(&digest) {
            progress(Progress::Done {
                digest: desc.digest.clone(),
                total: desc.size,
                cached: true,
            });
            return Ok(());
        }
        let locker = store.clone();
        let lock = tokio::task::spawn_blocking(move || locker.lock_blob(&digest))
            .await
            .map_err(|e| StoreError::Index(format!("lock task failed: {e}")))??;
        if store.has_blob(&digest) {
            progress(Progress::Done {
                digest: desc.digest.clone(),
                total: desc.size,
                cached: true,
            });
            return Ok(());
        }
        let mut attempt = 1;
        let result = loop {
            match self.download_once(desc, digest).await {
                Ok(()) => break Ok(()),
                Err(e) if retryable(&e) && attempt < BLOB_ATTEMPTS => {
                    warn!(blob = %digest, attempt, error = %e, "blob download interrupted, resuming");
                    tokio::time::sleep(Duration::from_millis(250 * u64::from(attempt))).await;
                    attempt += 1;
                }
                Err(e) => break Err(e),
            }
        };
        drop(lock);
        result
    }

    /// Downloads the rest of the blob from byte `have` into `partial`, hashing as it is
    /// written; returns the hasher and the bytes now there.
    async fn fetch(
        &self,
        desc: &artifact::Descriptor,
        digest: Digest,
        partial: &std::path::Path,
        mut hasher: Hasher,
        mut have: u64,
    ) -> Result<(Hasher, u64), StoreError> {
        let BlobPull {
            client,
            image,
            r,
            had_creds,
            progress,
            ..
        } = *self;
        let oci_desc = oci_descriptor(desc)?;
        // Always a range request from what is here, also from 0: a 206 answer is not
        // hashed by oci-client, so each byte is hashed once, by the writer below (a full
        // download was hashed twice). A registry that ignores Range answers 200; that
        // body starts over, and oci-client checks it too.
        let mut stream = match client
            .pull_blob_stream_partial(image, &oci_desc, have, None)
            .await
            .map_err(|e| map_err(r, had_creds, e))?
        {
            BlobResponse::Partial(s) => s.stream,
            BlobResponse::Full(s) => {
                if have > 0 {
                    debug!(blob = %digest, "registry ignored Range, restarting blob");
                    truncate(partial).await?;
                    (hasher, have) = (Hasher::new(), 0);
                }
                s.stream
            }
        };
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(partial)
            .await
            .map_err(StoreError::io(partial))?
            .into_std()
            .await;
        let writer = Writer::spawn(file, hasher);
        let mut next_report = have + (1 << 20);
        let mut stream_error = None;
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    stream_error = Some(e);
                    break;
                }
            };
            let len = chunk.len() as u64;
            if have + len > desc.size {
                drop(writer.finish().await);
                let _ = tokio::fs::remove_file(partial).await;
                return Err(StoreError::SizeMismatch {
                    digest,
                    expected: desc.size,
                    actual: have + len,
                });
            }
            if !writer.send(chunk).await {
                break;
            }
            have += len;
            if have >= next_report {
                next_report = have + (1 << 20);
                progress(Progress::Advance {
                    digest: desc.digest.clone(),
                    completed: have,
                    total: desc.size,
                });
            }
        }
        // Every byte received is written, hashed and on disk before the checks below
        // (a failed write ends the loop above and is the error here).
        hasher = writer.finish().await.map_err(StoreError::io(partial))?;
        // oci-client's own verification reports a mismatch as a stream error at the end;
        // with every byte here, our digest check below gives the precise error.
        if let Some(e) = stream_error
            && have < desc.size
        {
            return Err(StoreError::Registry {
                registry: r.registry.clone(),
                message: format!(
                    "transfer of {digest} broke after {have} of {} bytes: {e}",
                    desc.size
                ),
            });
        }
        Ok((hasher, have))
    }

    async fn download_once(
        &self,
        desc: &artifact::Descriptor,
        digest: Digest,
    ) -> Result<(), StoreError> {
        let BlobPull {
            r, store, progress, ..
        } = *self;
        let partial = store.tmp_path(&digest, "partial");
        let (mut hasher, mut have) = rehash(&partial).await?;
        if have > desc.size {
            truncate(&partial).await?;
            (hasher, have) = (Hasher::new(), 0);
        }
        if have > 0 {
            info!(blob = %digest, offset = have, total = desc.size, "resuming download");
        }
        progress(Progress::Start {
            digest: desc.digest.clone(),
            total: desc.size,
            resumed_from: have,
        });
        if have < desc.size {
            (hasher, have) = self.fetch(desc, digest, &partial, hasher, have).await?;
        }
        if have != desc.size {
            return Err(StoreError::Registry {
                registry: r.registry.clone(),
                message: format!(
                    "transfer of {digest} ended after {have} of {} bytes",
                    desc.size
                ),
            });
        }
        let actual = hasher.finish();
        if actual != digest {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(StoreError::DigestMismatch {
                expected: digest,
                actual,
            });
        }
        store.install_blob(&partial, &digest)?;
        progress(Progress::Done {
            digest: desc.digest.clone(),
            total: desc.size,
            cached: false,
        });
        Ok(())
    }
}

impl Registry {
    /// Pushes the local model `reference` (which must carry a tag) to its registry.
    pub async fn push(
        &self,
        store: &Store,
        reference: &str,
        progress: ProgressSink,
    ) -> Result<Digest, StoreError> {
        let r = ModelRef::parse(reference)?;
        if r.digest.is_some() {
            return Err(StoreError::Index("push needs a tag, not a digest".into()));
        }
        let record = store.resolve_ref(&r)?;
        let manifest_bytes = store.read_blob(&record.manifest_digest)?;
        let manifest = Manifest::parse(&manifest_bytes)?;
        let client = self.client_for(&r);
        // Blob existence checks authenticate as pulls, uploads as pushes.
        self.authenticate(&client, &r, RegistryOperation::Pull)
            .await?;
        let (image, _, had_creds) = self
            .authenticate(&client, &r, RegistryOperation::Push)
            .await?;
        progress(Progress::Status {
            message: format!("pushing {}", r.familiar()),
        });
        for desc in std::iter::once(&manifest.config).chain(&manifest.layers) {
            let digest: Digest = desc.digest.parse()?;
            if client
                .blob_exists(&image, &desc.digest)
                .await
                .map_err(|e| map_err(&r, had_creds, e))?
            {
                progress(Progress::Done {
                    digest: desc.digest.clone(),
                    total: desc.size,
                    cached: true,
                });
                continue;
            }
            let path = store.blob_path(&digest);
            let file = tokio::fs::File::open(&path)
                .await
                .map_err(StoreError::io(&path))?;
            progress(Progress::Start {
                digest: desc.digest.clone(),
                total: desc.size,
                resumed_from: 0,
            });
            let sink = progress.clone();
            let label = desc.digest.clone();
            let total = desc.size;
            let mut sent = 0u64;
            let stream = tokio_util::io::ReaderStream::with_capacity(file.take(desc.size), 1 << 20)
                .map(move |chunk| {
                    let chunk = chunk.map_err(OciDistributionError::IoError)?;
                    sent += chunk.len() as u64;
                    sink(Progress::Advance {
                        digest: label.clone(),
                        completed: sent,
                        total,
                    });
                    Ok(chunk)
                });
            client
                .push_blob_stream(&image, stream, &desc.digest, Some(desc.size))
                .await
                .map_err(|e| map_err(&r, had_creds, e))?;
            progress(Progress::Done {
                digest: desc.digest.clone(),
                total: desc.size,
                cached: false,
            });
        }
        client
            .push_manifest_raw(
                &image,
                manifest_bytes,
                http::HeaderValue::from_static(MANIFEST_MEDIA_TYPE),
            )
            .await
            .map_err(|e| map_err(&r, had_creds, e))?;
        progress(Progress::Status {
            message: format!("pushed {} ({})", r.familiar(), record.manifest_digest),
        });
        Ok(record.manifest_digest)
    }
}

fn retryable(e: &StoreError) -> bool {
    matches!(e, StoreError::Registry { .. } | StoreError::Io { .. })
}

/// Hash of what a partial file already holds, and its length.
/// Hashes and writes a blob's bytes on a blocking thread while the download task receives
/// the next ones: on two cores, receiving, hashing and writing overlap instead of taking
/// turns. Bounded: at most [`Writer::QUEUE`] chunks wait.
struct Writer {
    tx: tokio::sync::mpsc::Sender<bytes::Bytes>,
    done: tokio::task::JoinHandle<std::io::Result<Hasher>>,
}

impl Writer {
    const QUEUE: usize = 64;

    fn spawn(file: std::fs::File, mut hasher: Hasher) -> Writer {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(Self::QUEUE);
        let done = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
            while let Some(chunk) = rx.blocking_recv() {
                hasher.update(&chunk);
                out.write_all(&chunk)?;
            }
            out.flush()?;
            out.get_ref().sync_data()?;
            Ok(hasher)
        });
        Writer { tx, done }
    }

    /// Queues a chunk; false when the writer has stopped (a write failed: see `finish`).
    async fn send(&self, chunk: bytes::Bytes) -> bool {
        self.tx.send(chunk).await.is_ok()
    }

    /// Waits until everything queued is written and synced; the hash of the whole file.
    async fn finish(self) -> std::io::Result<Hasher> {
        drop(self.tx);
        self.done
            .await
            .map_err(|e| std::io::Error::other(format!("blob writer failed: {e}")))?
    }
}

/// `desc` as oci-client describes a blob.
fn oci_descriptor(desc: &artifact::Descriptor) -> Result<OciDescriptor, StoreError> {
    Ok(OciDescriptor {
        media_type: desc.media_type.clone(),
        digest: desc.digest.clone(),
        size: i64::try_from(desc.size).map_err(|_| {
            StoreError::Manifest(format!("blob {} claims {} bytes", desc.digest, desc.size))
        })?,
        ..Default::default()
    })
}

async fn rehash(path: &std::path::Path) -> Result<(Hasher, u64), StoreError> {
    let mut hasher = Hasher::new();
    let mut file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((hasher, 0)),
        Err(e) => return Err(StoreError::io(path)(e)),
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut buf).await.map_err(StoreError::io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    Ok((hasher, len))
}

async fn truncate(path: &std::path::Path) -> Result<(), StoreError> {
    tokio::fs::File::create(path)
        .await
        .map(drop)
        .map_err(StoreError::io(path))
}

fn oci_reference(r: &ModelRef) -> Reference {
    let (reg, repo) = (r.registry.clone(), r.repository.clone());
    match (&r.tag, &r.digest) {
        (Some(t), Some(d)) => Reference::with_tag_and_digest(reg, repo, t.clone(), d.to_string()),
        (Some(t), None) => Reference::with_tag(reg, repo, t.clone()),
        (None, Some(d)) => Reference::with_digest(reg, repo, d.to_string()),
        (None, None) => Reference::with_tag(reg, repo, "latest".into()),
    }
}

fn map_err(r: &ModelRef, had_credentials: bool, e: OciDistributionError) -> StoreError {
    let unauthorized = StoreError::Unauthorized {
        registry: r.registry.clone(),
        had_credentials,
    };
    match &e {
        OciDistributionError::AuthenticationFailure(_)
        | OciDistributionError::UnauthorizedError { .. } => unauthorized,
        OciDistributionError::ServerError {
            code: 401 | 403, ..
        } => unauthorized,
        OciDistributionError::RequestError(e)
            if matches!(e.status().map(|s| s.as_u16()), Some(401 | 403)) =>
        {
            unauthorized
        }
        OciDistributionError::RegistryError { envelope, .. }
            if envelope
                .errors
                .iter()
                .any(|x| matches!(x.code, OciErrorCode::Unauthorized | OciErrorCode::Denied)) =>
        {
            unauthorized
        }
        OciDistributionError::ImageManifestNotFoundError(_) => StoreError::Registry {
            registry: r.registry.clone(),
            message: format!("{} not found", r.familiar()),
        },
        OciDistributionError::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|x| {
                matches!(
                    x.code,
                    OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown
                )
            }) =>
        {
            StoreError::Registry {
                registry: r.registry.clone(),
                message: format!("{} not found", r.familiar()),
            }
        }
        OciDistributionError::UnsupportedMediaTypeError(mt) => StoreError::UnsupportedMediaType {
            what: "manifest",
            media_type: mt.clone(),
            supported: MANIFEST_MEDIA_TYPE,
        },
        _ => StoreError::Registry {
            registry: r.registry.clone(),
            message: e.to_string(),
        },
    }
}

/// Disk left free beyond a pull, for the store's own metadata and the rest of the system.
const DISK_RESERVE: u64 = 256 << 20;

/// Refuses a pull of `new` bytes that would take the store past its budget (`used`,
/// `budget`) or the disk past its free space (`available`, when known) with
/// [`DISK_RESERVE`] to spare, before anything is downloaded.
fn check_room(
    name: &str,
    new: u64,
    budget: Option<(u64, u64)>,
    available: Option<u64>,
) -> Result<(), StoreError> {
    use beacon_proto::gguf::format_bytes;
    if let Some((used, budget)) = budget
        && used.saturating_add(new) > budget
    {
        return Err(StoreError::NoRoom(format!(
            "{name} needs {} more on disk; the store uses {} of its {} budget \
             (--store-budget-gib): remove models or raise the budget",
            format_bytes(new),
            format_bytes(used),
            format_bytes(budget)
        )));
    }
    if let Some(free) = available
        && new > 0
        && new.saturating_add(DISK_RESERVE) > free
    {
        return Err(StoreError::NoRoom(format!(
            "{name} needs {} on disk and {} are free (with {} kept free): remove models \
             or free space",
            format_bytes(new),
            format_bytes(free),
            format_bytes(DISK_RESERVE)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod room_tests {
    use super::*;

    #[test]
    fn a_pull_needs_room_in_the_budget_and_on_the_disk() {
        let gib = 1u64 << 30;
        assert!(check_room("m", gib, Some((gib, 3 * gib)), Some(10 * gib)).is_ok());
        assert!(check_room("m", gib, None, None).is_ok());
        let e = check_room("m", 2 * gib, Some((2 * gib, 3 * gib)), Some(10 * gib)).unwrap_err();
        assert!(e.to_string().contains("budget"), "{e}");
        let e = check_room("m", 2 * gib, None, Some(2 * gib)).unwrap_err();
        assert!(e.to_string().contains("free"), "{e}");
        // Nothing new to fetch needs no room; huge sizes do not wrap.
        assert!(check_room("m", 0, None, Some(0)).is_ok());
        assert!(check_room("m", u64::MAX, Some((1, u64::MAX - 1)), None).is_err());
    }
}
