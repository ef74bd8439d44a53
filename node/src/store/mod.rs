//! The content-addressed model store under the node's data directory.
//!
//! ```text
//! <data>/blobs/sha256/<hex>     complete, verified blobs (layers, configs, manifests)
//! <data>/tmp/<hex>.partial      downloads in progress, kept for resume (HTTP Range)
//! <data>/tmp/<hex>.lock         per-blob file lock: one writer per blob across processes
//! <data>/index/                 sled: tags (reference -> manifest digest), model records
//! ```
//!
//! A blob is written to a temporary file while its sha256 is computed and renamed into
//! `blobs/` only when the digest matches, so `blobs/` only ever holds verified content and a
//! blob shared by several models is stored once. A model becomes visible (its record and
//! tags are written, in one sled transaction) only after every blob it needs is in `blobs/`.
//! `rm` removes tags and garbage-collects blobs no remaining model references.
//!
//! The store is a cloneable handle rather than an actor: sled is itself concurrent, blob
//! writes are serialised per digest by file locks (which also covers several processes
//! sharing a data directory), and index mutations take one mutex. An actor would serialise
//! multi-gigabyte downloads through one task for no gain.

pub mod artifact;
pub mod auth;
pub mod package;
pub mod progress;
pub mod registry;
pub mod token;

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use beacon_proto::digest::Hasher;
use beacon_proto::{Digest, ModelRef, ProtoError};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use artifact::{FileKind, ModelFacts};

/// Everything that can go wrong in the store, with messages a user can act on.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error(transparent)]
    Reference(#[from] ProtoError),
    #[error("model {0} not found in the local store")]
    NotFound(String),
    #[error("registry {registry}: {message}")]
    Registry { registry: String, message: String },
    #[error(
        "registry {registry} refused the credentials{hint}",
        hint = if *.had_credentials { " (wrong username or password?)" } else { ": log in with --username/--password or ~/.docker/config.json" }
    )]
    Unauthorized {
        registry: String,
        had_credentials: bool,
    },
    #[error("blob {expected} failed verification: content hashes to {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("blob {digest}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    #[error("unsupported {what} media type {media_type:?} (supported: {supported})")]
    UnsupportedMediaType {
        what: &'static str,
        media_type: String,
        supported: &'static str,
    },
    #[error("invalid manifest: {0}")]
    Manifest(String),
    #[error("cannot package: {0}")]
    Package(String),
    #[error("credentials: {0}")]
    Credentials(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store index: {0}")]
    Index(String),
    /// A pull would take the store past its disk budget.
    #[error("{0}")]
    NoRoom(String),
}

/// A download in progress that has not grown for this long was abandoned: a failed pull
/// whose partial file nobody resumed (review M5: they were never collected).
const STALE_PARTIAL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Removes abandoned downloads (`*.partial`, `*.write`) from `tmp`; returns how many.
fn collect_stale_partials(tmp: &Path, older_than: std::time::Duration) -> usize {
    let Ok(dir) = fs::read_dir(tmp) else { return 0 };
    dir.flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.ends_with(".partial") || name.ends_with(".write")
        })
        .filter(|e| {
            e.metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= older_than)
        })
        .filter(|e| fs::remove_file(e.path()).is_ok())
        .count()
}

impl StoreError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> StoreError {
        let path = path.into();
        move |source| StoreError::Io { path, source }
    }
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Index(e.to_string())
    }
}

/// A file of a stored model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredFile {
    pub kind: FileKind,
    pub digest: Digest,
    pub size: u64,
    pub filepath: String,
}

/// What the index keeps per model (keyed by manifest digest).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelRecord {
    pub manifest_digest: Digest,
    pub config_digest: Digest,
    pub config_media_type: String,
    pub facts: ModelFacts,
    pub files: Vec<StoredFile>,
    /// Sum of the layer sizes.
    pub size: u64,
    pub created_unix: u64,
}

impl ModelRecord {
    /// Every blob this model needs, manifest included.
    pub fn blobs(&self) -> impl Iterator<Item = Digest> + '_ {
        [self.manifest_digest, self.config_digest]
            .into_iter()
            .chain(self.files.iter().map(|f| f.digest))
    }
}

/// A model with its tags, for listing.
#[derive(Clone, Debug, Serialize)]
pub struct ListedModel {
    pub id: String,
    pub tags: Vec<String>,
    #[serde(flatten)]
    pub record: ModelRecord,
}

/// What `rm` did.
#[derive(Debug, Default, Serialize)]
pub struct RemoveReport {
    pub untagged: Vec<String>,
    pub deleted_models: Vec<Digest>,
    pub deleted_blobs: usize,
    pub freed_bytes: u64,
}

/// Handle to a model store; clones share it.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    db: sled::Db,
    tags: sled::Tree,
    models: sled::Tree,
    index_lock: Mutex<()>,
    /// Blobs hashed since this process started, with the file's identity when they were:
    /// a blob is hashed again only when its size, times, inode or device change.
    verified: Mutex<std::collections::HashMap<Digest, FileStamp>>,
}

/// What identifies one version of a file on disk (ctime cannot be set by a user, so a
/// rewritten file never looks unchanged).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    ino: u64,
    dev: u64,
}

impl FileStamp {
    fn of(meta: &fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            len: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
            ino: meta.ino(),
            dev: meta.dev(),
        }
    }
}

impl Store {
    /// Opens (creating if needed) the store under `root`.
    pub fn open(root: impl AsRef<Path>) -> Result<Store, StoreError> {
        let root = root.as_ref().to_path_buf();
        for dir in [root.join("blobs/sha256"), root.join("tmp")] {
            fs::create_dir_all(&dir).map_err(StoreError::io(&dir))?;
        }
        collect_stale_partials(&root.join("tmp"), STALE_PARTIAL);
        let db = open_index(&root.join("index"))?;
        let tags = db.open_tree("tags")?;
        let models = db.open_tree("models")?;
        Ok(Store {
            inner: Arc::new(Inner {
                root,
                db,
                tags,
                models,
                index_lock: Mutex::new(()),
                verified: Mutex::default(),
            }),
        })
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.inner.root.join("blobs/sha256").join(digest.hex())
    }

    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Bytes the store's blobs and downloads in progress take on disk.
    pub fn disk_usage(&self) -> u64 {
        ["blobs/sha256", "tmp"]
            .iter()
            .filter_map(|d| fs::read_dir(self.inner.root.join(d)).ok())
            .flatten()
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .fold(0, u64::saturating_add)
    }

    pub(crate) fn tmp_path(&self, digest: &Digest, ext: &str) -> PathBuf {
        self.inner
            .root
            .join("tmp")
            .join(format!("{}.{ext}", digest.hex()))
    }

    /// Takes the cross-process lock for writing `digest` (blocking; call off the runtime).
    pub(crate) fn lock_blob(&self, digest: &Digest) -> Result<fs::File, StoreError> {
        let path = self.tmp_path(digest, "lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(StoreError::io(&path))?;
        file.lock().map_err(StoreError::io(&path))?;
        Ok(file)
    }

    /// Moves a verified temporary file into `blobs/`.
    pub(crate) fn install_blob(&self, tmp: &Path, digest: &Digest) -> Result<(), StoreError> {
        let dest = self.blob_path(digest);
        fs::rename(tmp, &dest).map_err(StoreError::io(&dest))?;
        if let Ok(dir) = fs::File::open(dest.parent().unwrap_or(Path::new("."))) {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    /// Stores bytes as a blob and returns their digest.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<Digest, StoreError> {
        let digest = Digest::of(bytes);
        if self.has_blob(&digest) {
            return Ok(digest);
        }
        let _lock = self.lock_blob(&digest)?;
        let tmp = self.tmp_path(&digest, "write");
        let mut f = fs::File::create(&tmp).map_err(StoreError::io(&tmp))?;
        f.write_all(bytes)
            .and_then(|_| f.sync_all())
            .map_err(StoreError::io(&tmp))?;
        self.install_blob(&tmp, &digest)?;
        Ok(digest)
    }

    /// Copies a local file into the store, hashing while it copies. Blocking.
    pub fn put_file(&self, src: &Path) -> Result<(Digest, u64), StoreError> {
        let mut input = fs::File::open(src).map_err(StoreError::io(src))?;
        let tmp = self.inner.root.join("tmp").join(format!(
            "import-{}-{}.write",
            std::process::id(),
            beacon_proto::Id::random().short()
        ));
        let result = (|| {
            let mut out = fs::File::create(&tmp).map_err(StoreError::io(&tmp))?;
            let mut hasher = Hasher::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut size = 0u64;
            loop {
                let n = input.read(&mut buf).map_err(StoreError::io(src))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n]).map_err(StoreError::io(&tmp))?;
                size += n as u64;
            }
            out.sync_all().map_err(StoreError::io(&tmp))?;
            Ok((hasher.finish(), size))
        })();
        let (digest, size) = match result {
            Ok(v) => v,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let _lock = self.lock_blob(&digest)?;
        if self.has_blob(&digest) {
            let _ = fs::remove_file(&tmp);
        } else {
            self.install_blob(&tmp, &digest)?;
        }
        Ok((digest, size))
    }

    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>, StoreError> {
        let p = self.blob_path(digest);
        fs::read(&p).map_err(StoreError::io(&p))
    }

    /// Makes a model visible: writes its record and tags in one transaction. Every blob it
    /// needs must already be in the store.
    pub fn commit_model(&self, record: &ModelRecord, tags: &[ModelRef]) -> Result<(), StoreError> {
        if let Some(missing) = record.blobs().find(|d| !self.has_blob(d)) {
            return Err(StoreError::Index(format!(
                "refusing to commit: blob {missing} is missing"
            )));
        }
        let _guard = self
            .inner
            .index_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let key = record.manifest_digest.hex();
        let value = serde_json::to_vec(record).map_err(|e| StoreError::Index(e.to_string()))?;
        let tag_keys: Vec<String> = tags
            .iter()
            .filter(|t| t.tag.is_some())
            .map(|t| {
                ModelRef {
                    digest: None,
                    ..t.clone()
                }
                .to_string()
            })
            .collect();
        use sled::Transactional;
        (&self.inner.models, &self.inner.tags)
            .transaction(|(models, tags)| {
                models.insert(key.as_bytes(), value.as_slice())?;
                for t in &tag_keys {
                    tags.insert(t.as_bytes(), key.as_bytes())?;
                }
                Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| StoreError::Index(format!("{e:?}")))?;
        self.inner.db.flush()?;
        Ok(())
    }

    /// Finds a model by tag, by `@digest`, or by (a prefix of at least 12 hex of) its id.
    pub fn resolve(&self, reference: &str) -> Result<ModelRecord, StoreError> {
        let hexish = reference.strip_prefix("sha256:").unwrap_or(reference);
        if hexish.len() >= 12 && hexish.len() <= 64 && hexish.bytes().all(|b| b.is_ascii_hexdigit())
        {
            let matches: Vec<_> = self
                .inner
                .models
                .scan_prefix(hexish.to_ascii_lowercase().as_bytes())
                .filter_map(Result::ok)
                .collect();
            if matches.len() == 1 {
                return decode_record(&matches[0].1);
            }
        }
        let r = ModelRef::parse(reference)?;
        self.resolve_ref(&r)
    }

    pub fn resolve_ref(&self, r: &ModelRef) -> Result<ModelRecord, StoreError> {
        let key = match (&r.digest, &r.tag) {
            (Some(d), _) => d.hex(),
            (None, Some(_)) => {
                let v = self
                    .inner
                    .tags
                    .get(r.to_string().as_bytes())?
                    .ok_or_else(|| StoreError::NotFound(r.familiar()))?;
                String::from_utf8_lossy(&v).into_owned()
            }
            (None, None) => return Err(StoreError::NotFound(r.familiar())),
        };
        match self.inner.models.get(key.as_bytes())? {
            Some(v) => decode_record(&v),
            None => Err(StoreError::NotFound(r.familiar())),
        }
    }

    /// Tags pointing at a manifest digest, familiar form.
    pub fn tags_of(&self, manifest: &Digest) -> Vec<String> {
        let hex = manifest.hex();
        self.inner
            .tags
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| v.as_ref() == hex.as_bytes())
            .filter_map(|(k, _)| ModelRef::parse(&String::from_utf8_lossy(&k)).ok())
            .map(|r| r.familiar())
            .collect()
    }

    pub fn list(&self) -> Result<Vec<ListedModel>, StoreError> {
        let mut out = Vec::new();
        for item in self.inner.models.iter() {
            let (_, v) = item?;
            let record = decode_record(&v)?;
            out.push(ListedModel {
                id: record.manifest_digest.short(),
                tags: self.tags_of(&record.manifest_digest),
                record,
            });
        }
        out.sort_by(|a, b| a.tags.first().cmp(&b.tags.first()));
        Ok(out)
    }

    /// Adds `target` as another tag of the model `source` names.
    pub fn tag(&self, source: &str, target: &str) -> Result<ModelRef, StoreError> {
        let record = self.resolve(source)?;
        let target = ModelRef::parse(target)?;
        if target.tag.is_none() || target.digest.is_some() {
            return Err(StoreError::Index(
                "a tag target needs a tag and no digest".into(),
            ));
        }
        let _guard = self
            .inner
            .index_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.inner.tags.insert(
            target.to_string().as_bytes(),
            record.manifest_digest.hex().as_bytes(),
        )?;
        self.inner.db.flush()?;
        Ok(target)
    }

    /// Removes a tag (or, given an id or digest, the model and all its tags); models left
    /// without tags are deleted and unreferenced blobs garbage-collected.
    pub fn remove(&self, reference: &str) -> Result<RemoveReport, StoreError> {
        let record = self.resolve(reference)?;
        let mut report = RemoveReport::default();
        {
            let _guard = self
                .inner
                .index_lock
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let by_tag = ModelRef::parse(reference).ok().filter(|r| {
                r.digest.is_none()
                    && self
                        .inner
                        .tags
                        .contains_key(r.to_string().as_bytes())
                        .unwrap_or(false)
            });
            match by_tag {
                Some(r) => {
                    self.inner.tags.remove(r.to_string().as_bytes())?;
                    report.untagged.push(r.familiar());
                }
                None => {
                    for t in self.tags_of(&record.manifest_digest) {
                        if let Ok(r) = ModelRef::parse(&t) {
                            self.inner.tags.remove(r.to_string().as_bytes())?;
                            report.untagged.push(t);
                        }
                    }
                }
            }
            if self.tags_of(&record.manifest_digest).is_empty() {
                self.inner
                    .models
                    .remove(record.manifest_digest.hex().as_bytes())?;
                report.deleted_models.push(record.manifest_digest);
            }
            self.inner.db.flush()?;
        }
        let (blobs, bytes) = self.gc()?;
        report.deleted_blobs = blobs;
        report.freed_bytes = bytes;
        Ok(report)
    }

    /// Deletes blobs that no model references. Returns (blobs, bytes) removed.
    pub fn gc(&self) -> Result<(usize, u64), StoreError> {
        let _guard = self
            .inner
            .index_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut live = std::collections::HashSet::new();
        for item in self.inner.models.iter() {
            let (_, v) = item?;
            live.extend(decode_record(&v)?.blobs());
        }
        let dir = self.inner.root.join("blobs/sha256");
        let mut removed = (0, 0);
        for entry in fs::read_dir(&dir).map_err(StoreError::io(&dir))? {
            let entry = entry.map_err(StoreError::io(&dir))?;
            let name = entry.file_name();
            let Ok(digest) = Digest::from_hex(&name.to_string_lossy()) else {
                continue;
            };
            if live.contains(&digest) {
                continue;
            }
            // Skip blobs a pull in progress holds the lock for.
            let lock_path = self.tmp_path(&digest, "lock");
            if let Ok(lock) = fs::OpenOptions::new().write(true).open(&lock_path)
                && lock.try_lock().is_err()
            {
                continue;
            }
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            if fs::remove_file(entry.path()).is_ok() {
                removed.0 += 1;
                removed.1 += size;
                let _ = fs::remove_file(lock_path);
            }
        }
        Ok(removed)
    }

    /// Checks that the blob on disk still hashes to its name before anything loads it: a
    /// file swapped or corrupted after the pull is refused, never served under the
    /// digest it no longer has. Hashes once per version of the file (see [`FileStamp`]).
    /// Blocking: call it off the async runtime.
    pub fn check_blob(&self, digest: &Digest) -> Result<(), StoreError> {
        let path = self.blob_path(digest);
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        let before = FileStamp::of(&fs::metadata(&path).map_err(io)?);
        let known = self
            .inner
            .verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
            .copied();
        if known == Some(before) {
            return Ok(());
        }
        let mut file = fs::File::open(&path).map_err(io)?;
        let mut hasher = Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let actual = hasher.finish();
        let after = FileStamp::of(&file.metadata().map_err(io)?);
        if actual != *digest {
            return Err(StoreError::DigestMismatch {
                expected: *digest,
                actual,
            });
        }
        if after == before {
            self.inner
                .verified
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(*digest, after);
        }
        Ok(())
    }

    /// Paths of a model's GGUF files in shard order: what the engine loads.
    pub fn gguf_paths(&self, record: &ModelRecord) -> Vec<PathBuf> {
        record
            .files
            .iter()
            .filter(|f| f.kind == FileKind::Gguf)
            .map(|f| self.blob_path(&f.digest))
            .collect()
    }
}

/// How long a command waits for another process that holds the store's index.
const INDEX_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

/// Opens the sled index, waiting while another process holds it (sled allows one process).
fn open_index(path: &Path) -> Result<sled::Db, StoreError> {
    let start = std::time::Instant::now();
    let mut warned = false;
    loop {
        match sled::Config::new().path(path).open() {
            Ok(db) => return Ok(db),
            // sled reports the lock held by another process as an I/O error with this text.
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                if start.elapsed() > INDEX_LOCK_WAIT {
                    return Err(StoreError::Index(format!(
                        "{} is in use by another beacon-node process (a running `serve`? \
                         use its API, or give this command another --data-dir)",
                        path.display()
                    )));
                }
                if !warned {
                    tracing::warn!(path = %path.display(), "store in use by another process, waiting");
                    warned = true;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => {
                return Err(StoreError::Index(format!(
                    "cannot open {}: {e}",
                    path.display()
                )));
            }
        }
    }
}

fn decode_record(bytes: &[u8]) -> Result<ModelRecord, StoreError> {
    serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Index(format!("corrupt model record: {e}")))
}

/// Seconds since the Unix epoch.
pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review M5: partial downloads of failed pulls were never collected. Those that have
    /// not grown for a day go when the store opens; fresh ones (a pull to resume) stay.
    #[test]
    fn stale_partial_downloads_are_collected() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        let (old, fresh, lock) = (
            tmp.join("aa.partial"),
            tmp.join("bb.partial"),
            tmp.join("aa.lock"),
        );
        for p in [&old, &fresh, &lock] {
            std::fs::write(p, b"x").unwrap();
        }
        let two_days = std::time::SystemTime::now() - std::time::Duration::from_secs(48 * 3600);
        std::fs::File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(two_days)
            .unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(!old.exists() && fresh.exists() && lock.exists());
        assert!(store.disk_usage() >= 2);
    }
}
