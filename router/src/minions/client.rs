//! `beacon-router minions`: sends a job to a router's `/v1/minions`, shows its progress on
//! stderr while it runs, and prints the answer and what it cost.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// What the command line gives.
#[derive(Debug, Clone)]
pub struct ClientArgs {
    pub router: String,
    pub api_key: Option<beacon_proto::Secret>,
    pub task: String,
    pub context: Vec<PathBuf>,
    pub doc_metadata: Option<String>,
    pub protocol: String,
    pub max_rounds: Option<u32>,
    pub local_model: Option<String>,
    pub remote_model: Option<String>,
    pub allowed_regions: Vec<String>,
    pub baseline: Option<String>,
    /// Print the whole answer object as JSON instead of a summary.
    pub json: bool,
}

/// Runs the job; the summary goes to `out`.
pub async fn run(args: ClientArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let mut context = Vec::new();
    for p in &args.context {
        context
            .push(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?);
    }
    let mut body = json!({
        "task": args.task,
        "context": context,
        "protocol": args.protocol,
        "stream": true,
    });
    if let Some(m) = &args.doc_metadata {
        body["doc_metadata"] = json!(m);
    }
    if let Some(r) = args.max_rounds {
        body["max_rounds"] = json!(r);
    }
    if let Some(m) = &args.local_model {
        body["local_model"] = json!(m);
    }
    if let Some(m) = &args.remote_model {
        body["remote"] = json!({"model": m});
    }
    let mut policy = json!({});
    if !args.allowed_regions.is_empty() {
        policy["allowed_regions"] = json!(args.allowed_regions);
    }
    if let Some(b) = &args.baseline {
        policy["remote_only_baseline"] = json!(b);
    }
    body["policy"] = policy;
    let url = format!("{}/v1/minions", args.router.trim_end_matches('/'));
    let mut req = reqwest::Client::new().post(&url).json(&body);
    if let Some(k) = &args.api_key {
        req = req.bearer_auth(k.expose());
    }
    let mut resp = req
        .send()
        .await
        .with_context(|| format!("sending the job to {url}"))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let msg = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or(text);
        bail!("the router refused the job ({status}): {msg}");
    }
    let mut buf = String::new();
    let mut answer: Option<Value> = None;
    while let Some(chunk) = resp.chunk().await.context("reading the progress stream")? {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data).unwrap_or(Value::Null);
            match v["event"].as_str() {
                Some(event) => eprintln!("{}", describe(event, &v)),
                None if v.get("error").is_some() => bail!(
                    "the job failed: {}",
                    v["error"]["message"].as_str().unwrap_or("unknown error")
                ),
                None => answer = Some(v),
            }
        }
    }
    let Some(a) = answer else {
        bail!("the router closed the stream without an answer");
    };
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&a)?)?;
    } else {
        writeln!(out, "{}", summary(&a))?;
    }
    Ok(())
}

fn describe(event: &str, v: &Value) -> String {
    match event {
        "plan" => format!(
            "round {}: plan with {} task(s), {} chunking of size {}, {} sample(s){}{}",
            v["round"],
            v["plan"]["tasks"].as_array().map_or(0, Vec::len),
            v["plan"]["chunking"]["strategy"].as_str().unwrap_or("?"),
            v["plan"]["chunking"]["size"],
            v["plan"]["samples_per_task"],
            match v["plan"]["top_k"].as_u64() {
                Some(k) if k > 0 => format!(", each task on its {k} best chunks"),
                _ => String::new(),
            },
            match (v["default"] == true, v["attempt"].as_u64()) {
                (true, Some(0)) => {
                    " (the router's default plan: the supervisor, whose plans are rarely valid, was not asked)"
                }
                (true, _) => " (the router's default plan: the supervisor gave no valid one)",
                _ => "",
            }
        ),
        "plan_rejected" => format!(
            "round {}: plan rejected ({}), asking again",
            v["round"],
            v["error"].as_str().unwrap_or("?")
        ),
        "jobs_placed" => format!(
            "round {}: {} jobs ({} of {} chunks x {} tasks) placed on the network",
            v["round"],
            v["jobs"],
            match v["top_k"].as_u64() {
                Some(k) if k > 0 => format!("the best {k}"),
                _ => "each".into(),
            },
            v["chunks"],
            v["tasks"]
        ),
        "job_finished" => match v["error"].as_str() {
            Some(e) => format!("  job {} failed: {e}", v["job"]),
            None => format!(
                "  job {} ({} on chunk {}) done on {} in {} ({} ms{})",
                v["job"],
                v["task"].as_str().unwrap_or("?"),
                v["chunk"].as_str().unwrap_or("?"),
                short(v["provider"].as_str().unwrap_or("?")),
                v["region"].as_str().unwrap_or("?"),
                v["ms"],
                if v["answered"] == true {
                    ", answered"
                } else {
                    ""
                }
            ),
        },
        "message" => format!(
            "round {} {}: {}",
            v["round"],
            v["from"].as_str().unwrap_or("?"),
            v["text"].as_str().unwrap_or("")
        ),
        "round" => format!(
            "round {}: {} of {} jobs answered, {} failed; supervisor decided {}",
            v["round"],
            v["answered"],
            v["jobs"],
            v["failed"],
            v["decision"].as_str().unwrap_or("?")
        ),
        other => format!("{other}: {v}"),
    }
}

fn short(peer: &str) -> &str {
    &peer[peer.len().saturating_sub(8)..]
}

/// A human summary of an answer: the answer, the evidence behind it, then cost and
/// placement.
pub fn summary(a: &Value) -> String {
    let mut evidence = String::new();
    if let Some(list) = a["evidence"].as_array() {
        let g = &a["grounding"];
        evidence = format!(
            "Evidence ({} quotes checked against the documents; {} findings dropped as not in their chunk):\n",
            list.len(),
            g["ungrounded"]
        );
        for (i, e) in list.iter().enumerate().take(12) {
            evidence.push_str(&format!(
                "  [{}] document {}: \"{}\"{}\n",
                i + 1,
                e["chunk"].as_str().unwrap_or("?").replace('#', " chunk "),
                e["citation"].as_str().unwrap_or(""),
                e["answer"]
                    .as_str()
                    .map(|a| format!(" -> {a}"))
                    .unwrap_or_default()
            ));
        }
        if list.len() > 12 {
            evidence.push_str(&format!("  ({} more in --json)\n", list.len() - 12));
        }
        evidence.push('\n');
    }
    if let Some(notes) = a["notes"].as_array() {
        for n in notes {
            evidence.push_str(&format!("Note: {}\n", n.as_str().unwrap_or("")));
        }
        if !notes.is_empty() {
            evidence.push('\n');
        }
    }
    let u = &a["usage"];
    let remote = u["remote"]["total_tokens"].as_u64().unwrap_or(0);
    let only = u["remote_only"]["total_tokens"].as_u64().unwrap_or(0);
    format!(
        "Answer: {}\n\nExplanation: {}\n\n{evidence}\
         Remote (supervisor) tokens: {} ({} prompt + {} completion in {} calls)\n\
         Remote-only run would use:  {} ({}, {})\n\
         Remote tokens saved:        {:.1}% (ratio {:.3})\n\
         Local (network) tokens:     {} in {} verified jobs over {} round(s), regions {}\n\
         Time: {} ms ({} ms remote, {} ms local)",
        a["answer"].as_str().unwrap_or(""),
        a["explanation"].as_str().unwrap_or(""),
        remote,
        u["remote"]["prompt_tokens"],
        u["remote"]["completion_tokens"],
        u["remote"]["calls"].as_array().map_or(0, Vec::len),
        only,
        u["remote_only"]["method"].as_str().unwrap_or("?"),
        a["remote_model"].as_str().unwrap_or("?"),
        u["remote_savings"].as_f64().unwrap_or(0.0) * 100.0,
        u["remote_ratio"].as_f64().unwrap_or(0.0),
        u["local"]["total_tokens"],
        a["verification"]["verified"],
        a["rounds"],
        a["regions"],
        a["timing"]["total_ms"],
        a["timing"]["remote_ms"],
        a["timing"]["local_ms"],
    )
}
