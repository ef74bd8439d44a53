//! `model package`: turns local GGUF shards (plus license, chat template, mmproj) into a
//! model artifact in the store, with the config `docker model package` writes. GGUF
//! metadata is read from the files' headers, never guessed.

use std::path::{Path, PathBuf};

use beacon_proto::gguf::GgufHeader;
use beacon_proto::{Digest, ModelRef};

use super::artifact::{self, FileKind, PackagedFile};
use super::{ModelRecord, Store, StoreError, StoredFile, now_unix};

/// What to package.
#[derive(Clone, Debug, Default)]
pub struct PackageOptions {
    /// One GGUF, or every shard of a split model (`name-00001-of-0000N.gguf`).
    pub gguf: Vec<PathBuf>,
    pub licenses: Vec<PathBuf>,
    pub chat_template: Option<PathBuf>,
    pub mmproj: Option<PathBuf>,
    pub context_size: Option<u64>,
}

/// Largest GGUF header read while packaging.
const MAX_HEADER_READ: u64 = 512 << 20;

/// Reads and parses the GGUF header at the start of `path`, reading more as needed.
pub fn read_gguf_header(path: &Path) -> Result<GgufHeader, StoreError> {
    read_gguf_header_within(path, MAX_HEADER_READ)
}

/// [`read_gguf_header`], reading at most `max_read` bytes.
pub fn read_gguf_header_within(path: &Path, max_read: u64) -> Result<GgufHeader, StoreError> {
    use std::io::Read;
    let file_len = std::fs::metadata(path).map_err(StoreError::io(path))?.len();
    let mut want: u64 = (4 << 20).min(max_read);
    loop {
        let n = want.min(file_len).min(max_read);
        let mut buf = Vec::with_capacity(n as usize);
        std::fs::File::open(path)
            .map_err(StoreError::io(path))?
            .take(n)
            .read_to_end(&mut buf)
            .map_err(StoreError::io(path))?;
        match GgufHeader::parse(&buf) {
            Ok(h) => return Ok(h),
            Err(e) if e.to_string().contains("truncated") && n < file_len && want < max_read => {
                want *= 4;
            }
            Err(e) => return Err(StoreError::Package(format!("{}: {e}", path.display()))),
        }
    }
}

/// The first shard's GGUF header and the parameters of all shards; the first shard must
/// declare as many shards as were given.
fn shard_headers(shards: &[&PathBuf]) -> Result<(GgufHeader, u64), StoreError> {
    let mut total_params = 0u64;
    let mut first = None;
    for (i, shard) in shards.iter().enumerate() {
        let h = read_gguf_header(shard)?;
        if i == 0 && h.split_count() != shards.len() as u64 {
            return Err(StoreError::Package(format!(
                "{} declares split.count {} but {} file(s) were given",
                shard.display(),
                h.split_count(),
                shards.len()
            )));
        }
        total_params = total_params.saturating_add(h.parameter_count());
        first.get_or_insert(h);
    }
    let header = first.ok_or_else(|| StoreError::Package("no GGUF file given".into()))?;
    Ok((header, total_params))
}

/// Packages files into the store under `reference`.
pub fn package(
    store: &Store,
    opts: &PackageOptions,
    reference: &str,
) -> Result<ModelRecord, StoreError> {
    let r = ModelRef::parse(reference)?;
    if r.digest.is_some() {
        return Err(StoreError::Package(
            "the target reference needs a tag, not a digest".into(),
        ));
    }
    if opts.gguf.is_empty() {
        return Err(StoreError::Package("--gguf is required".into()));
    }
    let names: Vec<String> = opts
        .gguf
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let order = artifact::order_shards(&names)?;
    let shards: Vec<&PathBuf> = order.iter().map(|&i| &opts.gguf[i]).collect();

    let (header, total_params) = shard_headers(&shards)?;

    let mut files = Vec::new();
    let mut add = |kind: FileKind, path: &Path| -> Result<(), StoreError> {
        let (digest, size) = store.put_file(path)?;
        let filepath = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| digest.hex());
        files.push(PackagedFile {
            kind,
            digest,
            size,
            filepath,
        });
        Ok(())
    };
    for shard in &shards {
        add(FileKind::Gguf, shard)?;
    }
    for license in &opts.licenses {
        add(FileKind::License, license)?;
    }
    if let Some(t) = &opts.chat_template {
        add(FileKind::ChatTemplate, t)?;
    }
    if let Some(m) = &opts.mmproj {
        add(FileKind::Mmproj, m)?;
    }

    // SOURCE_DATE_EPOCH (the reproducible-builds convention) pins the creation time, so the
    // same files packaged twice give the same manifest digest.
    let created_at = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or_else(now_unix);
    let created = artifact::rfc3339(created_at).ok_or_else(|| {
        StoreError::Package(format!(
            "creation time {created_at} (SOURCE_DATE_EPOCH?) is not a date RFC 3339 can write"
        ))
    })?;
    let config = artifact::build_config(&header, total_params, &files, opts.context_size, created);
    let config_bytes =
        serde_json::to_vec(&config).map_err(|e| StoreError::Package(e.to_string()))?;
    let config_digest = store.put_bytes(&config_bytes)?;
    let manifest = artifact::build_manifest(&config_bytes, &files);
    let manifest_bytes = manifest.to_json();
    let manifest_digest: Digest = store.put_bytes(&manifest_bytes)?;

    let record = ModelRecord {
        manifest_digest,
        config_digest,
        config_media_type: artifact::CONFIG_V01.into(),
        facts: artifact::facts_from_config(artifact::CONFIG_V01, &config_bytes)?,
        size: files.iter().map(|f| f.size).sum(),
        files: files
            .into_iter()
            .map(|f| StoredFile {
                kind: f.kind,
                digest: f.digest,
                size: f.size,
                filepath: f.filepath,
            })
            .collect(),
        created_unix: now_unix(),
    };
    store.commit_model(&record, &[r])?;
    Ok(record)
}
