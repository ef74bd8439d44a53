//! Codec and signature properties of every wire message: round-trips, tampering, wrong
//! domain, wrong key, truncation, and arbitrary input never panicking.

use beacon_proto::*;
use proptest::prelude::*;

fn spec() -> ModelSpec {
    ModelSpec {
        reference: "index.docker.io/ai/smollm2:latest".into(),
        digest: Digest::of(b"m"),
    }
}

fn request(prompt: &str) -> InferRequest {
    InferRequest {
        prompt: None,
        request_id: Id(7),
        job_id: Some(Id(9)),
        model: spec(),
        messages: vec![
            ChatMessage {
                role: Role::System,
                content: "be brief".into(),
            },
            ChatMessage {
                role: Role::User,
                content: prompt.into(),
            },
        ],
        sampling: Sampling {
            max_tokens: 16,
            stop: vec!["\n\n".into()],
            ..Sampling::default()
        },
        json_schema: Some(r#"{"type":"object"}"#.into()),
        deadline_ms: Some(1_700_000_000_000),
        return_tokens: true,
    }
}

fn result_for(req: &InferRequest) -> InferResult {
    InferResult {
        request_id: req.request_id,
        request_digest: req.digest().unwrap(),
        model_digest: req.model.digest,
        output: "Paris".into(),
        finish_reason: FinishReason::Stop,
        usage: Usage {
            prompt_tokens: 20,
            completion_tokens: 2,
            cached_prompt_tokens: 0,
        },
        timings: Timings {
            queue_ms: 1,
            prefill_ms: 2,
            decode_ms: 3,
        },
        token_ids: Some(vec![11, 12]),
    }
}

fn advert(kp: &Keypair, seq: u64, ts: u64) -> ProviderAdvert {
    ProviderAdvert {
        peer_id: kp.peer_id(),
        region: "eu-west".into(),
        listen_addrs: vec!["/ip4/127.0.0.1/udp/4001/quic-v1".into()],
        data_plane: Some("127.0.0.1:4002".into()),
        version: "0.1.0".into(),
        accelerators: vec![Accelerator {
            vendor: "nvidia".into(),
            name: "H100".into(),
            memory_total: 80 << 30,
            memory_free: 70 << 30,
            compute_capability: Some("9.0".into()),
            driver: Some("550".into()),
            utilisation_pct: Some(3),
        }],
        host: HostInfo {
            cpu_model: "x".into(),
            cores: 2,
            ram_total: 1,
            ram_free: 1,
            cpu_flags: vec!["avx2".into()],
        },
        engines: vec!["llama.cpp".into()],
        models: vec![CachedModel {
            references: vec!["ai/smollm2:latest".into()],
            digest: Digest::of(b"m"),
            size: 1,
            quantization: "Q4_1".into(),
            parameters: "135M".into(),
            architecture: "llama".into(),
            context_size: Some(8192),
        }],
        slots: Slots {
            total: 4,
            busy: 1,
            queued: 0,
        },
        throughput: vec![Throughput {
            model: Digest::of(b"m"),
            tokens_per_second: 90.0,
        }],
        price: None,
        seq,
        timestamp_ms: ts,
    }
}

#[test]
fn messages_round_trip() {
    let req = request("capital of France?");
    assert_eq!(InferRequest::decode(&req.encode().unwrap()).unwrap(), req);
    let res = result_for(&req);
    assert_eq!(InferResult::decode(&res.encode().unwrap()).unwrap(), res);
    let kp = Keypair::generate();
    let ad = advert(&kp, 1, 1000);
    assert_eq!(ProviderAdvert::decode(&ad.encode().unwrap()).unwrap(), ad);
    let audit = AuditRequest {
        prompt: None,
        audit_id: Id(1),
        model: spec(),
        messages: req.messages.clone(),
        claimed_tokens: vec![1, 2, 3],
        json_schema: None,
        sampling: Sampling {
            stop: vec!["\n\n".into()],
            ..Sampling::default()
        },
        finish_reason: FinishReason::Stop,
    };
    assert_eq!(
        AuditRequest::decode(&audit.encode().unwrap()).unwrap(),
        audit
    );
    let ar = AuditResult {
        audit_id: Id(1),
        request_digest: audit.digest().unwrap(),
        model_digest: Digest::of(b"m"),
        prompt_tokens: 10,
        scores: vec![TokenScore {
            logprob: -0.1,
            argmax: 1,
            argmax_logprob: -0.1,
        }],
        output_digest: Digest::of(b"Paris"),
        end: None,
    };
    assert_eq!(AuditResult::decode(&ar.encode().unwrap()).unwrap(), ar);
}

#[test]
fn signed_envelope_round_trips_and_verifies() {
    let kp = Keypair::generate();
    let req = request("q");
    let signed = Signed::sign(&kp, &result_for(&req)).unwrap();
    let bytes = signed.encode().unwrap();
    let back = Signed::<InferResult>::decode(&bytes).unwrap();
    assert_eq!(back, signed);
    assert_eq!(
        verify_result(&back, &kp.peer_id(), &req).unwrap(),
        result_for(&req)
    );
}

#[test]
fn tampered_payload_is_rejected() {
    let kp = Keypair::generate();
    let req = request("q");
    let signed = Signed::sign(&kp, &result_for(&req)).unwrap();
    let mut payload = signed.payload().to_vec();
    // Flip a byte of the output text ("Paris" -> "Qaris").
    let at = payload.windows(5).position(|w| w == b"Paris").unwrap();
    payload[at] ^= 1;
    let forged = Signed::<InferResult>::from_parts(payload, signed.signer(), signature_of(&signed));
    assert!(matches!(
        forged.verify(),
        Err(ProtoError::BadSignature { .. })
    ));
}

/// The signature bytes, read back through the public codec (the field is private).
fn signature_of<T: Domain>(signed: &Signed<T>) -> Vec<u8> {
    let bytes = signed.encode().unwrap();
    bytes[bytes.len() - 64..].to_vec()
}

#[test]
fn wrong_domain_tag_is_rejected() {
    // A result signature replayed as an audit result (same envelope shape, other domain).
    let kp = Keypair::generate();
    let req = request("q");
    let signed = Signed::sign(&kp, &result_for(&req)).unwrap();
    let replayed: Signed<AuditResult> = signed.clone().cast();
    assert!(matches!(
        replayed.verify(),
        Err(ProtoError::BadSignature { .. })
    ));
    // And the genuine envelope still verifies.
    assert!(signed.verify().is_ok());
}

#[test]
fn wrong_key_is_rejected() {
    let kp = Keypair::generate();
    let other = Keypair::generate();
    let req = request("q");
    let signed = Signed::sign(&kp, &result_for(&req)).unwrap();
    // Claimed signer swapped for another key: signature no longer verifies.
    let swapped = Signed::<InferResult>::from_parts(
        signed.payload().to_vec(),
        other.public(),
        signature_of(&signed),
    );
    assert!(matches!(
        swapped.verify(),
        Err(ProtoError::BadSignature { .. })
    ));
    // Genuine signature, but not from the peer we asked.
    assert!(matches!(
        verify_result(&signed, &other.peer_id(), &req),
        Err(ProtoError::WrongSigner { .. })
    ));
}

#[test]
fn result_must_answer_the_request_asked() {
    let kp = Keypair::generate();
    let req = request("q");
    let mut wrong_model = result_for(&req);
    wrong_model.model_digest = Digest::of(b"other model");
    let err = verify_result(
        &Signed::sign(&kp, &wrong_model).unwrap(),
        &kp.peer_id(),
        &req,
    )
    .unwrap_err();
    assert!(err.to_string().contains("ran model"), "{err}");

    let other_req = request("another question");
    let err = verify_result(
        &Signed::sign(&kp, &result_for(&req)).unwrap(),
        &kp.peer_id(),
        &other_req,
    )
    .unwrap_err();
    assert!(err.to_string().contains("request digest"), "{err}");

    let mut no_tokens = result_for(&req);
    no_tokens.token_ids = None;
    let err =
        verify_result(&Signed::sign(&kp, &no_tokens).unwrap(), &kp.peer_id(), &req).unwrap_err();
    assert!(err.to_string().contains("token ids"), "{err}");

    // Attack (b): text with no tokens behind it is refused, whatever the request asked.
    let mut empty = result_for(&req);
    empty.token_ids = Some(vec![]);
    empty.usage.completion_tokens = 0;
    let err = verify_result(&Signed::sign(&kp, &empty).unwrap(), &kp.peer_id(), &req).unwrap_err();
    assert!(err.to_string().contains("0 generated tokens"), "{err}");
    let mut no_return = req.clone();
    no_return.return_tokens = false;
    let mut untokened = result_for(&no_return);
    untokened.token_ids = None;
    untokened.usage.completion_tokens = 0;
    assert!(
        verify_result(
            &Signed::sign(&kp, &untokened).unwrap(),
            &kp.peer_id(),
            &no_return
        )
        .is_err()
    );
    // An empty answer is a valid answer.
    empty.output.clear();
    verify_result(&Signed::sign(&kp, &empty).unwrap(), &kp.peer_id(), &req).unwrap();
}

#[test]
fn truncated_bytes_are_rejected() {
    let kp = Keypair::generate();
    let signed = Signed::sign(&kp, &advert(&kp, 1, 1)).unwrap();
    let bytes = signed.encode().unwrap();
    for cut in 0..bytes.len() {
        assert!(
            Signed::<ProviderAdvert>::decode(&bytes[..cut]).is_err(),
            "prefix {cut} decoded"
        );
    }
    let mut extra = bytes.clone();
    extra.push(0);
    let err = Signed::<ProviderAdvert>::decode(&extra).unwrap_err();
    assert!(err.to_string().contains("trailing"), "{err}");
}

#[test]
fn oversized_input_is_rejected_before_parsing() {
    let big = vec![0u8; ProviderAdvert::MAX_BYTES + 1];
    assert!(matches!(
        ProviderAdvert::decode(&big),
        Err(ProtoError::TooLarge { .. })
    ));
    // A length prefix claiming far more than the input holds fails cleanly, no huge alloc.
    let mut claim = vec![0u8; 16];
    claim[0] = 0xfc; // varint u32 marker
    claim[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(InferRequest::decode(&claim).is_err());
    // Encoding refuses values over the limit too.
    let huge = request(&"x".repeat(InferRequest::MAX_BYTES));
    assert!(matches!(huge.encode(), Err(ProtoError::TooLarge { .. })));
}

#[test]
fn advert_validation() {
    let kp = Keypair::generate();
    let policy = AdvertPolicy::default();
    let now = 1_000_000;
    let good = Signed::sign(&kp, &advert(&kp, 5, now)).unwrap();
    assert!(validate_advert(&good, &kp.peer_id(), now, Some(4), policy).is_ok());
    // Not newer than what we have.
    assert!(validate_advert(&good, &kp.peer_id(), now, Some(5), policy).is_err());
    // Stale and future.
    let stale = Signed::sign(&kp, &advert(&kp, 6, now - policy.max_age_ms - 1)).unwrap();
    assert!(
        validate_advert(&stale, &kp.peer_id(), now, None, policy)
            .unwrap_err()
            .to_string()
            .contains("stale")
    );
    let future = Signed::sign(&kp, &advert(&kp, 6, now + policy.max_skew_ms + 1)).unwrap();
    assert!(validate_advert(&future, &kp.peer_id(), now, None, policy).is_err());
    // Extreme timestamps and clocks (review M7: `timestamp_ms + max_age_ms` overflowed and
    // panicked the swarm actor in debug builds) are refused, never a panic.
    let far = Signed::sign(&kp, &advert(&kp, 6, u64::MAX)).unwrap();
    let e = validate_advert(&far, &kp.peer_id(), now, None, policy).unwrap_err();
    assert!(e.to_string().contains("future"), "{e}");
    assert!(validate_advert(&good, &kp.peer_id(), u64::MAX, None, policy).is_err());
    let wide = AdvertPolicy {
        max_age_ms: u64::MAX,
        max_skew_ms: u64::MAX,
    };
    assert!(validate_advert(&far, &kp.peer_id(), now, None, wide).is_ok());
    // Forwarded by someone else than the signer.
    let relay = Keypair::generate();
    assert!(matches!(
        validate_advert(&good, &relay.peer_id(), now, None, policy),
        Err(ProtoError::WrongSigner { .. })
    ));
    // Signed by the sender, but describing another peer.
    let mut impersonation = advert(&kp, 1, now);
    impersonation.peer_id = relay.peer_id();
    let signed = Signed::sign(&kp, &impersonation).unwrap();
    assert!(
        validate_advert(&signed, &kp.peer_id(), now, None, policy)
            .unwrap_err()
            .to_string()
            .contains("describes")
    );
}

#[test]
fn audit_summary_tolerates_near_ties() {
    let ar = AuditResult {
        audit_id: Id(1),
        request_digest: Digest::of(b"r"),
        model_digest: Digest::of(b"m"),
        prompt_tokens: 3,
        scores: vec![
            TokenScore {
                logprob: -0.1,
                argmax: 5,
                argmax_logprob: -0.1,
            },
            TokenScore {
                logprob: -0.70,
                argmax: 9,
                argmax_logprob: -0.69,
            },
            TokenScore {
                logprob: -9.0,
                argmax: 4,
                argmax_logprob: -0.01,
            },
        ],
        output_digest: Digest::of(b"abc"),
        end: None,
    };
    let s = ar.summarize(&[5, 6, 7], 0.05);
    assert_eq!((s.tokens, s.greedy_matches, s.near_ties), (3, 1, 1));
}

fn audit_of(output: &str, scores: Vec<TokenScore>, end: Option<TokenScore>) -> AuditResult {
    AuditResult {
        audit_id: Id(1),
        request_digest: Digest::of(b"r"),
        model_digest: Digest::of(b"m"),
        prompt_tokens: 3,
        scores,
        output_digest: Digest::of(output.as_bytes()),
        end,
    }
}

fn agreeing(token: u32) -> TokenScore {
    TokenScore {
        logprob: -0.2,
        argmax: token,
        argmax_logprob: -0.2,
    }
}

/// Attack (a): honest tokens with other text. The auditor's decoding of the tokens is the
/// ground truth, whatever the agreement of the tokens themselves.
#[test]
fn audit_fails_text_that_is_not_its_tokens() {
    let ar = audit_of("Paris", vec![agreeing(11), agreeing(12)], None);
    assert!(ar.judge(&[11, 12], "Paris", Some(0.5), 0.9).passed);
    let v = ar.judge(&[11, 12], "Visit evil.example", Some(0.5), 0.9);
    assert!(!v.passed && v.hard);
    assert!(v.reason.unwrap().contains("decode"));
    // Sampled outputs are held to their text too.
    assert!(!ar.judge(&[11, 12], "Lyon", None, 0.9).passed);
    // Fewer scores than claimed tokens never pass.
    let short = audit_of("Paris", vec![agreeing(11)], None);
    assert!(!short.judge(&[11, 12], "Paris", Some(0.5), 0.9).passed);
}

/// Attack (b) with empty text: an answer of no tokens that claims the model stopped is
/// judged on the auditor's end-of-generation score.
#[test]
fn audit_judges_the_end_of_generation() {
    let stop_here = TokenScore {
        logprob: -0.05,
        argmax: 2,
        argmax_logprob: -0.05,
    };
    let would_go_on = TokenScore {
        logprob: -8.0,
        argmax: 300,
        argmax_logprob: -0.01,
    };
    assert!(
        audit_of("", vec![], Some(stop_here))
            .judge(&[], "", Some(0.5), 0.9)
            .passed
    );
    let v = audit_of("", vec![], Some(would_go_on)).judge(&[], "", Some(0.5), 0.9);
    assert!(!v.passed && !v.hard, "{v:?}");
    let s = audit_of("", vec![], Some(would_go_on)).summarize(&[], 0.5);
    assert_eq!((s.tokens, s.greedy_matches, s.near_ties), (1, 0, 0));
    // A token the grammar forbids fails even a sampled output.
    let forbidden = TokenScore {
        logprob: f32::MIN,
        argmax: 3,
        argmax_logprob: -0.1,
    };
    assert!(
        !audit_of("x", vec![forbidden], None)
            .judge(&[7], "x", None, 0.9)
            .passed
    );
}

fn arb_request() -> impl Strategy<Value = InferRequest> {
    (
        any::<u128>(),
        proptest::option::of(any::<u128>()),
        "\\PC{0,40}",
        proptest::collection::vec(("\\PC{0,60}", 0u8..3), 0..5),
        (0.0f32..2.0, 0.0f32..1.0, any::<u32>(), any::<Option<u64>>()),
        proptest::collection::vec("\\PC{0,5}", 0..3),
        proptest::option::of("\\PC{0,30}"),
        any::<(Option<u64>, bool, [u8; 32])>(),
    )
        .prop_map(
            |(rid, jid, reference, msgs, (t, p, max, seed), stop, schema, (deadline, rt, d))| {
                InferRequest {
                    prompt: None,
                    request_id: Id(rid),
                    job_id: jid.map(Id),
                    model: ModelSpec {
                        reference,
                        digest: Digest(d),
                    },
                    messages: msgs
                        .into_iter()
                        .map(|(content, r)| ChatMessage {
                            role: [Role::System, Role::User, Role::Assistant][r as usize],
                            content,
                        })
                        .collect(),
                    sampling: Sampling {
                        temperature: t,
                        top_p: p,
                        top_k: max % 100,
                        min_p: 0.05,
                        max_tokens: max,
                        seed,
                        stop,
                    },
                    json_schema: schema,
                    deadline_ms: deadline,
                    return_tokens: rt,
                }
            },
        )
}

proptest! {
    #[test]
    fn codec_round_trips(req in arb_request()) {
        let bytes = req.encode().unwrap();
        prop_assert_eq!(InferRequest::decode(&bytes).unwrap(), req.clone());
        // Canonical: one value, one encoding, so digests are stable.
        prop_assert_eq!(InferRequest::decode(&bytes).unwrap().encode().unwrap(), bytes);
    }

    #[test]
    fn signed_round_trips(req in arb_request(), tokens in proptest::collection::vec(any::<u32>(), 0..20)) {
        let kp = Keypair::generate();
        let mut res = result_for(&req);
        res.usage.completion_tokens = tokens.len() as u32;
        if tokens.is_empty() {
            res.output.clear();
        }
        res.token_ids = Some(tokens);
        let signed = Signed::sign(&kp, &res).unwrap();
        let back = Signed::<InferResult>::decode(&signed.encode().unwrap()).unwrap();
        prop_assert_eq!(verify_result(&back, &kp.peer_id(), &req).unwrap(), res);
    }

    #[test]
    fn any_single_bit_flip_breaks_the_signature(req in arb_request(), bit in any::<proptest::sample::Index>()) {
        let kp = Keypair::generate();
        let signed = Signed::sign(&kp, &result_for(&req)).unwrap();
        let mut payload = signed.payload().to_vec();
        let i = bit.index(payload.len() * 8);
        payload[i / 8] ^= 1 << (i % 8);
        let forged = Signed::<InferResult>::from_parts(payload, signed.signer(), signature_of(&signed));
        prop_assert!(forged.verify().is_err());
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = InferRequest::decode(&bytes);
        let _ = InferResult::decode(&bytes);
        let _ = ProviderAdvert::decode(&bytes);
        let _ = AuditRequest::decode(&bytes);
        let _ = AuditResult::decode(&bytes);
        if let Ok(s) = Signed::<InferResult>::decode(&bytes) { let _ = s.verify(); }
        if let Ok(s) = Signed::<ProviderAdvert>::decode(&bytes) { let _ = s.verify(); }
    }

    #[test]
    fn mutated_valid_messages_never_panic(req in arb_request(), edits in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 1..8)) {
        let mut bytes = req.encode().unwrap();
        for (at, v) in edits { let i = at.index(bytes.len()); bytes[i] = v; }
        let _ = InferRequest::decode(&bytes);
    }
}

/// Review M3: the data plane applied none of the HTTP API's input limits. One check now
/// serves every receiver; NaN, infinities and oversized stop lists fail it.
#[test]
fn sampling_and_requests_are_bounded_alike_everywhere() {
    let ok = Sampling {
        temperature: 0.7,
        top_p: 0.9,
        min_p: 0.05,
        max_tokens: 64,
        stop: vec!["\n\n".into()],
        ..Sampling::default()
    };
    assert_eq!(ok.check(), Ok(()));
    let cases: Vec<(Sampling, &str)> = vec![
        (
            Sampling {
                temperature: f32::NAN,
                ..ok.clone()
            },
            "temperature",
        ),
        (
            Sampling {
                temperature: f32::INFINITY,
                ..ok.clone()
            },
            "temperature",
        ),
        (
            Sampling {
                temperature: 2.5,
                ..ok.clone()
            },
            "temperature",
        ),
        (
            Sampling {
                top_p: f32::NAN,
                ..ok.clone()
            },
            "top_p",
        ),
        (
            Sampling {
                top_p: 0.0,
                ..ok.clone()
            },
            "top_p",
        ),
        (
            Sampling {
                min_p: -1.0,
                ..ok.clone()
            },
            "min_p",
        ),
        (
            Sampling {
                min_p: f32::NAN,
                ..ok.clone()
            },
            "min_p",
        ),
        (
            Sampling {
                max_tokens: 0,
                ..ok.clone()
            },
            "max_tokens",
        ),
        (
            Sampling {
                max_tokens: u32::MAX,
                ..ok.clone()
            },
            "max_tokens",
        ),
        (
            Sampling {
                stop: vec!["x".into(); MAX_STOPS + 1],
                ..ok.clone()
            },
            "stop",
        ),
        (
            Sampling {
                stop: vec!["x".repeat(MAX_STOP_BYTES + 1)],
                ..ok.clone()
            },
            "stop",
        ),
    ];
    for (s, field) in cases {
        assert_eq!(s.check().unwrap_err().field, field, "{s:?}");
    }
    let mut r = request("hi");
    r.sampling = ok;
    assert_eq!(r.check(), Ok(()));
    r.sampling.stop = vec!["y".repeat(8 << 20)];
    assert_eq!(r.check().unwrap_err().field, "stop");
    r.sampling.stop.clear();
    r.messages = vec![r.messages[0].clone(); MAX_MESSAGES + 1];
    assert_eq!(r.check().unwrap_err().field, "messages");
    // A raw prompt (a completion) comes without messages, never with them; its audit
    // carries it too.
    let mut text = request("hi");
    text.prompt = Some("Once upon a time".into());
    assert_eq!(text.check().unwrap_err().field, "prompt");
    text.messages.clear();
    assert_eq!(text.check(), Ok(()));
    let audit = AuditRequest::of(&text, &result_for(&text));
    assert_eq!(audit.prompt, text.prompt);
    assert_eq!(audit.check(), Ok(()));
    let hi = request("hi");
    let mut a = AuditRequest::of(&hi, &result_for(&hi));
    assert_eq!(a.check(), Ok(()));
    a.claimed_tokens = vec![1; MAX_COMPLETION_TOKENS as usize + 1];
    assert_eq!(a.check().unwrap_err().field, "claimed_tokens");
    a.claimed_tokens.clear();
    a.sampling.temperature = f32::NAN;
    assert_eq!(a.check().unwrap_err().field, "temperature");
}
