//! The Docker Model Runner artifact format: media types, the OCI manifest, the model config
//! JSON, and how a local GGUF (plus license and chat template) becomes an artifact.
//!
//! Pushed artifacts use exactly what `docker model package` writes: an OCI image manifest
//! without `artifactType`, config `application/vnd.docker.ai.model.config.v0.1+json`, one
//! uncompressed layer per file whose digest is the file's sha256 and whose
//! `org.cncf.model.filepath` annotation carries the file name. Pulls also read the v0.2
//! config and the CNCF ModelPack config.

use std::collections::BTreeMap;

use beacon_proto::Digest;
use beacon_proto::gguf::GgufHeader;
use serde::{Deserialize, Serialize};

use super::StoreError;

pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const CONFIG_V01: &str = "application/vnd.docker.ai.model.config.v0.1+json";
pub const CONFIG_V02: &str = "application/vnd.docker.ai.model.config.v0.2+json";
pub const CONFIG_CNCF: &str = "application/vnd.cncf.model.config.v1+json";
pub const LAYER_GGUF: &str = "application/vnd.docker.ai.gguf.v3";
pub const LAYER_LICENSE: &str = "application/vnd.docker.ai.license";
pub const LAYER_MMPROJ: &str = "application/vnd.docker.ai.mmproj";
pub const LAYER_TEMPLATE: &str = "application/vnd.docker.ai.chat.template.jinja";
pub const LAYER_CNCF_WEIGHT: &str = "application/vnd.cncf.model.weight.v1.raw";
pub const LAYER_CNCF_DOC: &str = "application/vnd.cncf.model.doc.v1.raw";
pub const ANNOTATION_FILEPATH: &str = "org.cncf.model.filepath";
/// Largest manifest or config accepted from a registry.
pub const MAX_METADATA_BYTES: usize = 4 << 20;

/// What a layer is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    Gguf,
    License,
    Mmproj,
    ChatTemplate,
    Doc,
}

impl FileKind {
    pub fn from_media_type(media_type: &str) -> Result<Self, StoreError> {
        Ok(match media_type {
            LAYER_GGUF | LAYER_CNCF_WEIGHT => FileKind::Gguf,
            LAYER_LICENSE => FileKind::License,
            LAYER_MMPROJ => FileKind::Mmproj,
            LAYER_TEMPLATE => FileKind::ChatTemplate,
            LAYER_CNCF_DOC => FileKind::Doc,
            other => {
                return Err(StoreError::UnsupportedMediaType {
                    what: "layer",
                    media_type: other.to_string(),
                    supported: "GGUF weights, license, mmproj, chat template",
                });
            }
        })
    }

    pub fn media_type(self) -> &'static str {
        match self {
            FileKind::Gguf => LAYER_GGUF,
            FileKind::License => LAYER_LICENSE,
            FileKind::Mmproj => LAYER_MMPROJ,
            FileKind::ChatTemplate => LAYER_TEMPLATE,
            FileKind::Doc => LAYER_CNCF_DOC,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

impl Manifest {
    /// Parses a manifest and checks that Beacon can use what it describes.
    pub fn parse(bytes: &[u8]) -> Result<Self, StoreError> {
        let m: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| StoreError::Manifest(format!("not an OCI image manifest: {e}")))?;
        if m.schema_version != 2 {
            return Err(StoreError::Manifest(format!(
                "schemaVersion {} (expected 2)",
                m.schema_version
            )));
        }
        if let Some(mt) = &m.media_type
            && mt != MANIFEST_MEDIA_TYPE
        {
            return Err(StoreError::UnsupportedMediaType {
                what: "manifest",
                media_type: mt.clone(),
                supported: MANIFEST_MEDIA_TYPE,
            });
        }
        if ![CONFIG_V01, CONFIG_V02, CONFIG_CNCF].contains(&m.config.media_type.as_str()) {
            return Err(StoreError::UnsupportedMediaType {
                what: "model config",
                media_type: m.config.media_type.clone(),
                supported: "application/vnd.docker.ai.model.config.v0.1+json, …v0.2+json, \
                            application/vnd.cncf.model.config.v1+json",
            });
        }
        for d in std::iter::once(&m.config).chain(&m.layers) {
            d.digest
                .parse::<Digest>()
                .map_err(|e| StoreError::Manifest(e.to_string()))?;
        }
        for l in &m.layers {
            FileKind::from_media_type(&l.media_type)?;
        }
        if !m
            .layers
            .iter()
            .any(|l| FileKind::from_media_type(&l.media_type).ok() == Some(FileKind::Gguf))
        {
            return Err(StoreError::Manifest(
                "the artifact has no GGUF weights layer".into(),
            ));
        }
        Ok(m)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("manifest serializes")
    }
}

/// The `config` object of a Docker model config.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelConfigInner {
    #[serde(default)]
    pub format: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub quantization: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub parameters: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub architecture: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub size: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub gguf: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_size: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DescriptorInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    pub diff_ids: Vec<String>,
}

/// `application/vnd.docker.ai.model.config.v0.1+json` (and v0.2, which adds fields).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub config: ModelConfigInner,
    #[serde(default)]
    pub descriptor: DescriptorInfo,
    #[serde(default)]
    pub rootfs: RootFs,
}

/// The facts Beacon keeps about a model, whichever config format it came in.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelFacts {
    pub format: String,
    pub quantization: String,
    pub parameters: String,
    pub architecture: String,
    pub context_size: Option<u64>,
}

/// Reads the facts out of a config blob of the given media type.
pub fn facts_from_config(media_type: &str, bytes: &[u8]) -> Result<ModelFacts, StoreError> {
    let bad =
        |e: serde_json::Error| StoreError::Manifest(format!("model config is not valid: {e}"));
    match media_type {
        CONFIG_V01 | CONFIG_V02 => {
            let c: ModelConfig = serde_json::from_slice(bytes).map_err(bad)?;
            Ok(ModelFacts {
                format: c.config.format,
                quantization: c.config.quantization,
                parameters: c.config.parameters,
                architecture: c.config.architecture,
                context_size: c.config.context_size,
            })
        }
        CONFIG_CNCF => {
            #[derive(Deserialize)]
            struct Cncf {
                #[serde(default)]
                config: CncfInner,
            }
            #[derive(Deserialize, Default)]
            #[serde(rename_all = "camelCase")]
            struct CncfInner {
                #[serde(default)]
                architecture: String,
                #[serde(default)]
                format: String,
                #[serde(default)]
                param_size: String,
                #[serde(default)]
                quantization: String,
            }
            let c: Cncf = serde_json::from_slice(bytes).map_err(bad)?;
            Ok(ModelFacts {
                format: c.config.format,
                quantization: c.config.quantization,
                parameters: c.config.param_size,
                architecture: c.config.architecture,
                context_size: None,
            })
        }
        other => Err(StoreError::UnsupportedMediaType {
            what: "model config",
            media_type: other.to_string(),
            supported: CONFIG_V01,
        }),
    }
}

/// One file to package, with its digest already computed.
#[derive(Clone, Debug)]
pub struct PackagedFile {
    pub kind: FileKind,
    pub digest: Digest,
    pub size: u64,
    pub filepath: String,
}

/// Builds the config JSON `docker model package` writes, from the first shard's header.
pub fn build_config(
    header: &GgufHeader,
    total_params: u64,
    files: &[PackagedFile],
    context_size: Option<u64>,
    created: String,
) -> ModelConfig {
    let gguf_bytes: u64 = files
        .iter()
        .filter(|f| f.kind == FileKind::Gguf)
        .map(|f| f.size)
        .sum();
    ModelConfig {
        config: ModelConfigInner {
            format: "gguf".into(),
            quantization: header.quantization().unwrap_or("unknown").into(),
            parameters: beacon_proto::gguf::format_parameters(total_params),
            architecture: header.architecture().unwrap_or("unknown").into(),
            size: beacon_proto::gguf::format_bytes(gguf_bytes),
            gguf: header.metadata_strings(),
            context_size,
        },
        descriptor: DescriptorInfo {
            created: Some(created),
        },
        rootfs: RootFs {
            kind: "rootfs".into(),
            diff_ids: files.iter().map(|f| f.digest.to_string()).collect(),
        },
    }
}

/// The manifest for a config blob and files, in `docker model package`'s layout.
pub fn build_manifest(config: &[u8], files: &[PackagedFile]) -> Manifest {
    Manifest {
        schema_version: 2,
        media_type: Some(MANIFEST_MEDIA_TYPE.into()),
        config: Descriptor {
            media_type: CONFIG_V01.into(),
            digest: Digest::of(config).to_string(),
            size: config.len() as u64,
            annotations: BTreeMap::new(),
        },
        layers: files
            .iter()
            .map(|f| Descriptor {
                media_type: f.kind.media_type().into(),
                digest: f.digest.to_string(),
                size: f.size,
                annotations: BTreeMap::from([(
                    ANNOTATION_FILEPATH.to_string(),
                    f.filepath.clone(),
                )]),
            })
            .collect(),
    }
}

/// Orders shard paths `name-00001-of-0000N.gguf` and checks the set is complete.
pub fn order_shards(names: &[String]) -> Result<Vec<usize>, StoreError> {
    fn shard_no(name: &str) -> Option<(u32, u32)> {
        let stem = name.strip_suffix(".gguf")?;
        let (rest, of) = stem.rsplit_once("-of-")?;
        let (_, no) = rest.rsplit_once('-')?;
        Some((no.parse().ok()?, of.parse().ok()?))
    }
    if names.len() == 1 {
        return Ok(vec![0]);
    }
    let mut numbered = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let file = n.rsplit('/').next().unwrap_or(n);
        let (no, of) = shard_no(file).ok_or_else(|| {
            StoreError::Package(format!("{file} is not named like name-00001-of-00002.gguf"))
        })?;
        if of as usize != names.len() {
            return Err(StoreError::Package(format!(
                "{file} says {of} shards but {} were given",
                names.len()
            )));
        }
        numbered.push((no, i));
    }
    numbered.sort();
    for (want, (no, _)) in (1..).zip(&numbered) {
        if *no != want {
            return Err(StoreError::Package(format!(
                "shard {want} is missing or duplicated"
            )));
        }
    }
    Ok(numbered.into_iter().map(|(_, i)| i).collect())
}

/// RFC 3339 UTC timestamp of a Unix time, as Go's `time.Time` marshals it (none past the
/// year 9999).
pub fn rfc3339(unix_secs: u64) -> Option<String> {
    let t = time::OffsetDateTime::from_unix_timestamp(i64::try_from(unix_secs).ok()?).ok()?;
    t.format(&time::format_description::well_known::Rfc3339)
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0).unwrap(), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000).unwrap(), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400).unwrap(), "2000-02-29T00:00:00Z");
        // Past year 9999 there is no RFC 3339 date.
        assert_eq!(rfc3339(u64::MAX), None);
    }

    #[test]
    fn shard_order() {
        let names: Vec<String> = [
            "m-00002-of-00003.gguf",
            "m-00001-of-00003.gguf",
            "m-00003-of-00003.gguf",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(order_shards(&names).unwrap(), vec![1, 0, 2]);
        assert!(order_shards(&names[..2]).is_err());
        let dup = vec![
            "m-00001-of-00002.gguf".to_string(),
            "m-00001-of-00002.gguf".to_string(),
        ];
        assert!(order_shards(&dup).is_err());
    }

    #[test]
    fn refuses_unknown_media_types() {
        let m = |config: &str, layer: &str| {
            format!(
                r#"{{"schemaVersion":2,"mediaType":"{MANIFEST_MEDIA_TYPE}","config":{{"mediaType":"{config}","digest":"{d}","size":1}},"layers":[{{"mediaType":"{layer}","digest":"{d}","size":1}}]}}"#,
                d = Digest::of(b"x")
            )
        };
        assert!(Manifest::parse(m(CONFIG_V01, LAYER_GGUF).as_bytes()).is_ok());
        assert!(Manifest::parse(m(CONFIG_V02, LAYER_GGUF).as_bytes()).is_ok());
        assert!(Manifest::parse(m(CONFIG_CNCF, LAYER_CNCF_WEIGHT).as_bytes()).is_ok());
        let err =
            Manifest::parse(m("application/vnd.oci.image.config.v1+json", LAYER_GGUF).as_bytes())
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("application/vnd.oci.image.config.v1+json"),
            "{err}"
        );
        let err = Manifest::parse(
            m(CONFIG_V01, "application/vnd.oci.image.layer.v1.tar+gzip").as_bytes(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("tar+gzip"), "{err}");
    }
}
