//! Transfer progress: events from pulls and pushes, rendered as indicatif bars on a
//! terminal (nothing when stderr is not one) or forwarded as JSON lines by the node's API.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

/// One progress event. Serialised as one JSON line on the API.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Progress {
    /// A blob transfer starts (`resumed_from` > 0 when a partial download is continued).
    Start {
        digest: String,
        total: u64,
        resumed_from: u64,
    },
    /// Bytes of a blob done so far.
    Advance {
        digest: String,
        completed: u64,
        total: u64,
    },
    /// A blob is complete and verified (or was already present).
    Done {
        digest: String,
        total: u64,
        cached: bool,
    },
    /// A line of status.
    Status { message: String },
}

/// Where progress goes.
pub type ProgressSink = Arc<dyn Fn(Progress) + Send + Sync>;

/// A sink that drops everything.
pub fn silent() -> ProgressSink {
    Arc::new(|_| {})
}

/// A sink that prints each event as one JSON line on stdout.
pub fn json_lines() -> ProgressSink {
    Arc::new(|event| {
        if let Ok(line) = serde_json::to_string(&event) {
            println!("{line}");
        }
    })
}

/// A sink that draws one bar per blob on stderr, hidden when stderr is not a terminal.
pub fn terminal_bars() -> ProgressSink {
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    let bars: Mutex<HashMap<String, ProgressBar>> = Mutex::new(HashMap::new());
    let style = ProgressStyle::with_template(
        "{prefix:.bold} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    Arc::new(move |event| {
        let mut bars = bars.lock().unwrap_or_else(|p| p.into_inner());
        match event {
            Progress::Start {
                digest,
                total,
                resumed_from,
            } => {
                let bar = multi.add(ProgressBar::new(total));
                bar.set_style(style.clone());
                bar.set_prefix(short(&digest));
                bar.set_position(resumed_from);
                bars.insert(digest, bar);
            }
            Progress::Advance {
                digest, completed, ..
            } => {
                if let Some(bar) = bars.get(&digest) {
                    bar.set_position(completed);
                }
            }
            Progress::Done { digest, .. } => {
                if let Some(bar) = bars.remove(&digest) {
                    bar.finish();
                }
            }
            Progress::Status { message } => {
                let _ = multi.println(message);
            }
        }
    })
}

fn short(digest: &str) -> String {
    digest
        .strip_prefix("sha256:")
        .unwrap_or(digest)
        .chars()
        .take(12)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_single_json_lines() {
        let e = Progress::Start {
            digest: "sha256:ab".into(),
            total: 10,
            resumed_from: 4,
        };
        let line = serde_json::to_string(&e).unwrap();
        assert_eq!(
            line,
            r#"{"type":"start","digest":"sha256:ab","total":10,"resumed_from":4}"#
        );
        assert!(!line.contains('\n'));
    }
}
