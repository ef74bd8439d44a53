//! The model store against a real `docker-registry` process and the real SmolLM2 GGUF:
//! package -> push -> pull, corrupt blobs, killed and interrupted pulls, auth, media types,
//! sharded GGUFs, shared layers and concurrent pulls.

use std::time::{Duration, Instant};

use beacon_harness::*;
use beacon_proto::gguf::{GgufHeader, TensorInfo, Value, write_header};

const LAYER_GGUF: &str = "application/vnd.docker.ai.gguf.v3";

fn gguf_digest() -> String {
    sha256_file(&test_model())
}

/// Packages the test model as `reference` (with a license and chat template) and pushes it.
fn publish(node: &NodeCli, reference: &str) {
    let dir = tempfile::tempdir().unwrap();
    let license = dir.path().join("LICENSE");
    std::fs::write(&license, "Apache-2.0\n").unwrap();
    let template = dir.path().join("template.jinja");
    std::fs::write(
        &template,
        "{% for m in messages %}{{ m.content }}{% endfor %}",
    )
    .unwrap();
    let model = test_model();
    node.ok(&[
        "model",
        "package",
        "--gguf",
        model.to_str().unwrap(),
        "--license",
        license.to_str().unwrap(),
        "--chat-template",
        template.to_str().unwrap(),
        "--context-size",
        "4096",
        "--push",
        reference,
    ]);
}

#[test]
fn package_push_pull_round_trip() {
    let registry = Registry::start();
    let reference = format!("{}/ai/smollm2:135M-Q4_1", registry.host());
    let publisher = NodeCli::new();
    publish(&publisher, &reference);

    let node = NodeCli::new();
    // Review M5: a pull had no disk budget. Past it, the pull is refused before it
    // downloads anything.
    let err = node.fails(&["model", "pull", "--store-budget-gib", "0", &reference]);
    assert!(err.contains("--store-budget-gib"), "{err}");
    let blobs = node.store().join("blobs/sha256");
    assert_eq!(
        std::fs::read_dir(&blobs).unwrap().count(),
        0,
        "downloaded anyway"
    );
    let out = node.ok(&["model", "pull", "--store-budget-gib", "1", &reference]);
    assert!(out.contains("Model pulled"), "{out}");

    // ls: id, tag, parameters, quantization, size.
    let models = node.models();
    let m = &models[0];
    assert_eq!(models.as_array().unwrap().len(), 1);
    assert_eq!(m["tags"][0], reference);
    assert_eq!(m["facts"]["quantization"], "Q4_1");
    assert_eq!(m["facts"]["parameters"], "134.52 M");
    assert_eq!(m["facts"]["architecture"], "llama");
    assert_eq!(m["facts"]["context_size"], 4096);
    let table = node.ok(&["model", "ls"]);
    assert!(
        table.contains(m["id"].as_str().unwrap()) && table.contains("Q4_1"),
        "{table}"
    );

    // inspect: the config docker model package writes.
    let config: serde_json::Value =
        serde_json::from_str(&node.ok(&["model", "inspect", &reference])).unwrap();
    assert_eq!(config["config"]["format"], "gguf");
    assert_eq!(config["config"]["gguf"]["general.architecture"], "llama");
    assert_eq!(config["config"]["gguf"]["llama.context_length"], "8192");
    assert!(
        config["config"]["gguf"]
            .get("tokenizer.ggml.tokens")
            .is_none(),
        "arrays over 50 items left out"
    );
    assert_eq!(config["rootfs"]["type"], "rootfs");
    // The test CLI sets SOURCE_DATE_EPOCH=1700000000: packaging is reproducible.
    assert_eq!(config["descriptor"]["created"], "2023-11-14T22:13:20Z");

    let manifest: serde_json::Value =
        serde_json::from_str(&node.ok(&["model", "inspect", "--manifest", &reference])).unwrap();
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert!(manifest.get("artifactType").is_none());
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.docker.ai.model.config.v0.1+json"
    );
    let layers = manifest["layers"].as_array().unwrap();
    let types: Vec<&str> = layers
        .iter()
        .map(|l| l["mediaType"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            LAYER_GGUF,
            "application/vnd.docker.ai.license",
            "application/vnd.docker.ai.chat.template.jinja"
        ]
    );
    assert_eq!(
        layers[0]["digest"],
        format!("sha256:{}", gguf_digest()),
        "layer digest = file sha256"
    );
    assert_eq!(
        layers[0]["annotations"]["org.cncf.model.filepath"],
        "SmolLM2-135M-Instruct.Q4_1.gguf"
    );

    // Run-ready: the GGUF blob is in place, intact and parses.
    let blob = node.store().join("blobs/sha256").join(gguf_digest());
    assert_eq!(sha256_file(&blob), gguf_digest());
    let head = std::fs::read(&blob).unwrap();
    assert_eq!(
        GgufHeader::parse(&head).unwrap().architecture(),
        Some("llama")
    );
    assert!(node.partials().is_empty());

    // A pull by digest resolves to the same model; a second pull is a no-op.
    let digest = manifest_digest(&node, &reference);
    node.ok(&[
        "model",
        "pull",
        &format!("{}/ai/smollm2@{digest}", registry.host()),
    ]);
    assert_eq!(node.models().as_array().unwrap().len(), 1);

    // Bad references and unknown models fail clearly.
    let err = node.fails(&["model", "pull", "Bad Name"]);
    assert!(
        err.contains("invalid model reference") && err.contains("whitespace"),
        "{err}"
    );
    let err = node.fails(&["model", "pull", &format!("{}/ai/absent:1", registry.host())]);
    assert!(err.contains("not found"), "{err}");
}

fn manifest_digest(node: &NodeCli, reference: &str) -> String {
    let m = node.models();
    let record = m
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["tags"].as_array().unwrap().iter().any(|t| t == reference))
        .unwrap();
    record["manifest_digest"].as_str().unwrap().to_string()
}

#[test]
fn shared_layers_stored_once_and_garbage_collected() {
    let node = NodeCli::new();
    let model = test_model();
    let dir = tempfile::tempdir().unwrap();
    let (l1, l2) = (dir.path().join("L1"), dir.path().join("L2"));
    std::fs::write(&l1, "one").unwrap();
    std::fs::write(&l2, "two").unwrap();
    node.ok(&[
        "model",
        "package",
        "--gguf",
        model.to_str().unwrap(),
        "--license",
        l1.to_str().unwrap(),
        "localhost:5999/a/m:1",
    ]);
    node.ok(&[
        "model",
        "package",
        "--gguf",
        model.to_str().unwrap(),
        "--license",
        l2.to_str().unwrap(),
        "localhost:5999/a/m:2",
    ]);
    let blobs = node.blobs();
    assert_eq!(blobs.iter().filter(|b| **b == gguf_digest()).count(), 1);
    // 1 shared GGUF + 2 licenses + 2 configs + 2 manifests.
    assert_eq!(blobs.len(), 7, "{blobs:?}");

    node.ok(&[
        "model",
        "tag",
        "localhost:5999/a/m:1",
        "localhost:5999/a/m:alias",
    ]);
    node.ok(&["model", "rm", "localhost:5999/a/m:1"]);
    assert_eq!(node.blobs().len(), 7, "still tagged as alias");
    let out = node.ok(&["model", "rm", "localhost:5999/a/m:alias"]);
    assert!(out.contains("Deleted"), "{out}");
    let blobs = node.blobs();
    assert_eq!(blobs.len(), 4, "{blobs:?}");
    assert!(blobs.contains(&gguf_digest()), "GGUF still used by m:2");
    node.ok(&["model", "rm", "localhost:5999/a/m:2"]);
    assert!(node.blobs().is_empty());
    let err = node.fails(&["model", "rm", "localhost:5999/a/m:2"]);
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn corrupt_blob_is_rejected_and_leaves_nothing() {
    let registry = Registry::start();
    let reference = format!("{}/ai/smollm2:corrupt", registry.host());
    publish(&NodeCli::new(), &reference);
    // Flip bytes in the middle of the stored GGUF blob: same size, wrong content.
    let data = registry.blob_data_path(&gguf_digest());
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 16] {
        *b ^= 0xff;
    }
    std::fs::write(&data, bytes).unwrap();

    let node = NodeCli::new();
    let err = node.fails(&["model", "pull", &reference]);
    assert!(err.contains("failed verification"), "{err}");
    assert!(err.contains(&gguf_digest()), "{err}");
    assert_eq!(
        node.models().as_array().unwrap().len(),
        0,
        "no model visible"
    );
    assert!(
        !node.blobs().contains(&gguf_digest()),
        "corrupt blob not kept"
    );
    assert!(
        node.partials().is_empty(),
        "no partial left: {:?}",
        node.partials()
    );
}

#[test]
fn pull_killed_midway_resumes_and_verifies() {
    let registry = Registry::start();
    publish(
        &NodeCli::new(),
        &format!("{}/ai/smollm2:kill", registry.host()),
    );
    // 98 MB at 16 MB/s: several seconds, so the kill lands mid-blob.
    let slow = Relay::start(
        registry.addr,
        RelayOptions {
            bytes_per_sec: Some(16 << 20),
            ..Default::default()
        },
    );
    let reference = format!("{}/ai/smollm2:kill", slow.addr);
    let node = NodeCli::new();
    let mut child = ChildGuard(
        node.command()
            .args(["model", "pull", &reference])
            .spawn()
            .unwrap(),
    );
    let partial = node
        .store()
        .join("tmp")
        .join(format!("{}.partial", gguf_digest()));
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0) < 20 << 20 {
        assert!(Instant::now() < deadline, "pull made no progress");
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "pull finished before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.0.kill().unwrap(); // SIGKILL
    child.0.wait().unwrap();
    let kept = std::fs::metadata(&partial).unwrap().len();
    assert!(kept > 0);
    assert_eq!(
        node.models().as_array().unwrap().len(),
        0,
        "a killed pull leaves no model visible"
    );
    assert!(!node.blobs().contains(&gguf_digest()));

    let out = node
        .command()
        .args(["model", "pull", &reference])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("resuming download"),
        "second pull should continue the partial blob: {stderr}"
    );
    let blob = node.store().join("blobs/sha256").join(gguf_digest());
    assert_eq!(sha256_file(&blob), gguf_digest());
    assert!(node.partials().is_empty());
}

#[test]
fn transfer_cut_mid_blob_is_resumed_within_the_pull() {
    let registry = Registry::start();
    publish(
        &NodeCli::new(),
        &format!("{}/ai/smollm2:cut", registry.host()),
    );
    // Every one of the first 12 connections dies after 30 MB: manifest and config requests
    // fit, the GGUF transfer breaks and must be continued with Range requests.
    let flaky = Relay::start(
        registry.addr,
        RelayOptions {
            cut_after: Some(30 << 20),
            cut_first: 12,
            ..Default::default()
        },
    );
    let node = NodeCli::new();
    let out = node
        .command()
        .args(["model", "pull", &format!("{}/ai/smollm2:cut", flaky.addr)])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("resuming"), "{stderr}");
    assert_eq!(
        sha256_file(&node.store().join("blobs/sha256").join(gguf_digest())),
        gguf_digest()
    );
}

#[test]
fn registry_auth_from_flags_and_docker_config() {
    let registry = Registry::start_with_auth("beacon", "s3cret-pass");
    let reference = format!("{}/private/smollm2:1", registry.host());
    let publisher = NodeCli::new();
    let model = test_model();
    publisher.ok(&[
        "model",
        "package",
        "--gguf",
        model.to_str().unwrap(),
        &reference,
    ]);

    let err = publisher.fails(&["model", "push", &reference]);
    assert!(
        err.contains("refused the credentials") && err.contains("--username"),
        "{err}"
    );
    let err = publisher.fails(&[
        "model",
        "push",
        &reference,
        "--username",
        "beacon",
        "--password",
        "wrong",
    ]);
    assert!(err.contains("wrong username or password"), "{err}");
    assert!(
        !err.contains("wrong\""),
        "password must not be echoed: {err}"
    );
    publisher.ok(&[
        "model",
        "push",
        &reference,
        "--username",
        "beacon",
        "--password",
        "s3cret-pass",
    ]);
    // Credentials bound to another registry are not sent to this one (review H6: flag
    // credentials went to every registry, including one an API caller names), and a
    // server, whose API callers name registries, refuses credentials bound to none.
    let err = publisher.fails(&[
        "model",
        "push",
        &reference,
        "--username",
        "beacon",
        "--password",
        "s3cret-pass",
        "--registry-host",
        "registry.example:443",
    ]);
    assert!(err.contains("refused the credentials"), "{err}");
    let err = publisher.fails(&["serve", "--username", "beacon", "--password", "s3cret-pass"]);
    assert!(err.contains("--registry-host"), "{err}");
    assert!(!err.contains("s3cret-pass"), "{err}");

    let node = NodeCli::new();
    let err = node.fails(&["model", "pull", &reference]);
    assert!(err.contains("refused the credentials"), "{err}");
    // ~/.docker/config.json with basic auth, as `docker login` writes it.
    let auth = "YmVhY29uOnMzY3JldC1wYXNz"; // base64("beacon:s3cret-pass")
    std::fs::write(
        node.docker_config.path().join("config.json"),
        format!(
            r#"{{"auths":{{"http://{}":{{"auth":"{auth}"}}}}}}"#,
            registry.host()
        ),
    )
    .unwrap();
    let out = node
        .command()
        .args(["model", "pull", &reference])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.contains("s3cret-pass") && !stderr.contains(auth),
        "secrets in logs"
    );
}

#[test]
fn config_media_types_accepted_and_refused() {
    let registry = Registry::start();
    let host = registry.host();
    let gguf = std::fs::read(test_model()).unwrap();
    let node = NodeCli::new();

    let v02 = br#"{"config":{"format":"gguf","quantization":"Q4_1","parameters":"134.52 M","architecture":"llama","size":"93.81 MiB"},"descriptor":{"created":"2025-01-01T00:00:00Z"},"rootfs":{"type":"rootfs","diff_ids":[]}}"#;
    push_raw(
        &host,
        "ai/v02",
        "1",
        "application/vnd.docker.ai.model.config.v0.2+json",
        v02,
        &[(LAYER_GGUF, gguf.clone(), "model.gguf")],
    );
    node.ok(&["model", "pull", &format!("{host}/ai/v02:1")]);

    let cncf = br#"{"descriptor":{"createdAt":"2025-01-01T00:00:00Z"},"config":{"architecture":"llama","format":"gguf","paramSize":"135M","quantization":"Q4_1"},"modelfs":{"type":"layers","diffIds":[]}}"#;
    push_raw(
        &host,
        "ai/cncf",
        "1",
        "application/vnd.cncf.model.config.v1+json",
        cncf,
        &[(
            "application/vnd.cncf.model.weight.v1.raw",
            gguf.clone(),
            "model.gguf",
        )],
    );
    node.ok(&["model", "pull", &format!("{host}/ai/cncf:1")]);
    let models = node.models();
    let cncf_model = models
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["tags"][0].as_str().unwrap().contains("cncf"))
        .unwrap();
    assert_eq!(cncf_model["facts"]["parameters"], "135M");
    assert_eq!(models.as_array().unwrap().len(), 2);
    assert_eq!(
        node.blobs().iter().filter(|b| **b == gguf_digest()).count(),
        1,
        "same weights stored once"
    );

    // A container image config is not a model: refused, nothing stored.
    let fresh = NodeCli::new();
    push_raw(
        &host,
        "ai/image",
        "1",
        "application/vnd.oci.image.config.v1+json",
        b"{}",
        &[(LAYER_GGUF, b"GGUF".to_vec(), "x.gguf")],
    );
    let err = fresh.fails(&["model", "pull", &format!("{host}/ai/image:1")]);
    assert!(
        err.contains("unsupported model config media type")
            && err.contains("application/vnd.oci.image.config.v1+json"),
        "{err}"
    );
    // An unknown layer type likewise.
    push_raw(
        &host,
        "ai/layer",
        "1",
        "application/vnd.docker.ai.model.config.v0.1+json",
        v02,
        &[(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            b"x".to_vec(),
            "x",
        )],
    );
    let err = fresh.fails(&["model", "pull", &format!("{host}/ai/layer:1")]);
    assert!(err.contains("unsupported layer media type"), "{err}");
    assert_eq!(fresh.models().as_array().unwrap().len(), 0);
    assert!(fresh.blobs().is_empty(), "{:?}", fresh.blobs());
}

/// Writes a valid GGUF shard: header with split keys and two tensors, then `payload` bytes.
fn shard(dir: &std::path::Path, no: u16, count: u16, payload: usize) -> std::path::PathBuf {
    let mut meta = vec![
        ("split.no".to_string(), Value::U16(no - 1)),
        ("split.count".to_string(), Value::U16(count)),
        (
            "split.tensors.count".to_string(),
            Value::I32(2 * i32::from(count)),
        ),
    ];
    if no == 1 {
        meta.insert(
            0,
            ("general.architecture".into(), Value::Str("llama".into())),
        );
        meta.push(("general.file_type".into(), Value::U32(7)));
    }
    let tensors = [
        TensorInfo {
            name: format!("t{no}.a"),
            dims: vec![1000, 10],
            ggml_type: 0,
            offset: 0,
        },
        TensorInfo {
            name: format!("t{no}.b"),
            dims: vec![500],
            ggml_type: 0,
            offset: 40_000,
        },
    ];
    let mut bytes = write_header(&meta, &tensors);
    bytes.extend((0..payload).map(|i| (i * usize::from(no)) as u8));
    let path = dir.join(format!("tiny-{no:05}-of-{count:05}.gguf"));
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn sharded_gguf_round_trips_in_order() {
    let registry = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let shards: Vec<_> = (1..=3).map(|n| shard(dir.path(), n, 3, 200_000)).collect();
    let reference = format!("{}/ai/tiny:sharded", registry.host());
    let publisher = NodeCli::new();
    // Shards given out of order must still be packaged in order.
    publisher.ok(&[
        "model",
        "package",
        "--gguf",
        shards[2].to_str().unwrap(),
        "--gguf",
        shards[0].to_str().unwrap(),
        "--gguf",
        shards[1].to_str().unwrap(),
        "--push",
        &reference,
    ]);
    let node = NodeCli::new();
    node.ok(&["model", "pull", &reference]);
    let manifest: serde_json::Value =
        serde_json::from_str(&node.ok(&["model", "inspect", "--manifest", &reference])).unwrap();
    let paths: Vec<&str> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            l["annotations"]["org.cncf.model.filepath"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(
        paths,
        [
            "tiny-00001-of-00003.gguf",
            "tiny-00002-of-00003.gguf",
            "tiny-00003-of-00003.gguf"
        ]
    );
    for (layer, shard) in manifest["layers"].as_array().unwrap().iter().zip(&shards) {
        assert_eq!(layer["digest"], format!("sha256:{}", sha256_file(shard)));
        assert_eq!(layer["mediaType"], LAYER_GGUF);
    }
    let m = &node.models()[0];
    assert_eq!(
        m["facts"]["parameters"], "31.50 K",
        "parameters summed over all shards"
    );
    assert_eq!(m["facts"]["quantization"], "Q8_0");

    // An incomplete shard set is refused.
    let err = publisher.fails(&[
        "model",
        "package",
        "--gguf",
        shards[0].to_str().unwrap(),
        "--gguf",
        shards[1].to_str().unwrap(),
        "localhost:1/a/b:c",
    ]);
    assert!(err.contains("3 shards but 2"), "{err}");
    // A file that is not GGUF is refused.
    let bogus = dir.path().join("bogus.gguf");
    std::fs::write(&bogus, b"not a gguf file at all").unwrap();
    let err = publisher.fails(&[
        "model",
        "package",
        "--gguf",
        bogus.to_str().unwrap(),
        "localhost:1/a/b:c",
    ]);
    assert!(err.contains("not a GGUF file"), "{err}");
}

#[test]
fn concurrent_pulls_of_the_same_model_do_not_corrupt() {
    let registry = Registry::start();
    publish(
        &NodeCli::new(),
        &format!("{}/ai/smollm2:conc", registry.host()),
    );
    let slow = Relay::start(
        registry.addr,
        RelayOptions {
            bytes_per_sec: Some(64 << 20),
            ..Default::default()
        },
    );
    let reference = format!("{}/ai/smollm2:conc", slow.addr);
    let node = NodeCli::new();
    let children: Vec<_> = (0..3)
        .map(|_| {
            node.command()
                .args(["model", "pull", &reference])
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(node.models().as_array().unwrap().len(), 1);
    assert_eq!(
        sha256_file(&node.store().join("blobs/sha256").join(gguf_digest())),
        gguf_digest()
    );
    assert!(node.partials().is_empty());
}

#[test]
fn concurrent_pulls_in_one_process_share_blobs_safely() {
    use beacon_node::store::Store;
    use beacon_node::store::progress;
    use beacon_node::store::registry::{Registry as Oci, RegistryOptions};

    let registry = Registry::start();
    publish(
        &NodeCli::new(),
        &format!("{}/ai/smollm2:inproc", registry.host()),
    );
    let slow = Relay::start(
        registry.addr,
        RelayOptions {
            bytes_per_sec: Some(64 << 20),
            ..Default::default()
        },
    );
    let reference = format!("{}/ai/smollm2:inproc", slow.addr);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let records = rt.block_on(async {
        let pulls = (0..4).map(|_| {
            let (store, reference) = (store.clone(), reference.clone());
            tokio::spawn(async move {
                Oci::new(RegistryOptions::default())
                    .pull(&store, &reference, progress::silent())
                    .await
            })
        });
        futures_join(pulls).await
    });
    for r in &records {
        assert!(r.is_ok(), "{r:?}");
    }
    let first = records[0].as_ref().unwrap();
    assert!(
        records
            .iter()
            .all(|r| r.as_ref().unwrap().manifest_digest == first.manifest_digest)
    );
    assert_eq!(store.list().unwrap().len(), 1);
    let gguf = store.gguf_paths(first);
    assert_eq!(gguf.len(), 1);
    assert_eq!(sha256_file(&gguf[0]), gguf_digest());
}

async fn futures_join<T>(handles: impl Iterator<Item = tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[test]
fn pull_progress_as_json_lines() {
    let registry = Registry::start();
    let reference = format!("{}/ai/smollm2:progress", registry.host());
    publish(&NodeCli::new(), &reference);
    let node = NodeCli::new();
    let out = node.ok(&["model", "pull", "--progress", "json", &reference]);
    let events: Vec<serde_json::Value> = out
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("each progress line is JSON"))
        .collect();
    let gguf = format!("sha256:{}", gguf_digest());
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "start" && e["digest"] == gguf)
    );
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "advance" && e["digest"] == gguf)
    );
    let done = events
        .iter()
        .find(|e| e["type"] == "done" && e["digest"] == gguf)
        .unwrap();
    assert_eq!(done["total"], 98_362_432);
}

#[test]
fn identity_token_from_docker_config_is_exchanged() {
    let tokens = TokenServer::start("refresh-abc");
    let registry = Registry::start_with_token_auth(&tokens);
    let reference = format!("{}/team/smollm2:1", registry.host());
    let config = |node: &NodeCli, token: &str| {
        std::fs::write(
            node.docker_config.path().join("config.json"),
            format!(
                r#"{{"auths":{{"{}":{{"auth":"","identitytoken":"{token}"}}}}}}"#,
                registry.host()
            ),
        )
        .unwrap();
    };
    let publisher = NodeCli::new();
    let model = test_model();
    publisher.ok(&[
        "model",
        "package",
        "--gguf",
        model.to_str().unwrap(),
        &reference,
    ]);
    // Anonymous: the registry wants a token.
    let err = publisher.fails(&["model", "push", &reference]);
    assert!(err.contains("refused the credentials"), "{err}");
    // A wrong identity token is refused by the token service.
    config(&publisher, "not-the-token");
    let err = publisher.fails(&["model", "push", &reference]);
    assert!(
        err.contains("refused the credentials") && err.contains("wrong"),
        "{err}"
    );
    // The right one is exchanged for an access token the registry accepts.
    config(&publisher, "refresh-abc");
    publisher.ok(&["model", "push", &reference]);
    let node = NodeCli::new();
    config(&node, "refresh-abc");
    let out = node
        .command()
        .args(["model", "pull", &reference])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.contains("refresh-abc"),
        "identity token must not be logged"
    );
    assert_eq!(
        sha256_file(&node.store().join("blobs/sha256").join(gguf_digest())),
        gguf_digest()
    );
}
