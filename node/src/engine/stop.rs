//! Turning sampled token pieces into text for a stream: bytes are held until they form
//! valid UTF-8, and text that could be the start of a stop string is held until it is
//! known not to be one, so a client never sees part of a stop string.

/// Accumulates token bytes and releases text that is safe to show.
#[derive(Debug, Default)]
pub struct TextStream {
    pending_bytes: Vec<u8>,
    held: String,
    emitted: String,
    stops: Vec<String>,
}

/// What feeding a piece produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Fed {
    /// Text to emit now (may be empty).
    Text(String),
    /// A stop string matched: emit this final text, then finish.
    Stop(String),
}

impl TextStream {
    pub fn new(stops: &[String]) -> Self {
        TextStream {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            ..Default::default()
        }
    }

    /// Adds one token's bytes.
    pub fn feed(&mut self, bytes: &[u8]) -> Fed {
        self.pending_bytes.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.pending_bytes) {
            Ok(s) => s.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            // Invalid sequence (not just incomplete): replace it, keep going.
            Err(e) => e.valid_up_to() + e.error_len().unwrap_or(1),
        };
        let chunk = String::from_utf8_lossy(&self.pending_bytes[..valid]).into_owned();
        self.pending_bytes.drain(..valid);
        self.held.push_str(&chunk);

        if let Some((at, _)) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|i| (i, s.len())))
            .min_by_key(|(i, _)| *i)
        {
            let out = self.held[..at].to_string();
            self.emitted.push_str(&out);
            self.held.clear();
            return Fed::Stop(out);
        }
        // Hold back the longest suffix that is a prefix of some stop string.
        let keep = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(&self.held, s))
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out: String = self.held.drain(..cut).collect();
        self.emitted.push_str(&out);
        Fed::Text(out)
    }

    /// Releases everything held (end of generation without a stop string).
    pub fn finish(&mut self) -> String {
        let mut out = std::mem::take(&mut self.held);
        out.push_str(&String::from_utf8_lossy(&std::mem::take(
            &mut self.pending_bytes,
        )));
        self.emitted.push_str(&out);
        out
    }

    /// Everything emitted so far.
    pub fn text(&self) -> &str {
        &self.emitted
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`, on char
/// boundaries.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = text.len().min(stop.len().saturating_sub(1));
    (1..=max)
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && stop.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn holds_back_partial_stop_strings() {
        let mut s = TextStream::new(&["</end>".to_string()]);
        assert_eq!(s.feed(b"Hello </"), Fed::Text("Hello ".into()));
        assert_eq!(s.feed(b"en"), Fed::Text(String::new()));
        assert_eq!(s.feed(b"d> more"), Fed::Stop(String::new()));
        assert_eq!(s.text(), "Hello ");
    }

    #[test]
    fn releases_false_alarms() {
        let mut s = TextStream::new(&["STOP".to_string()]);
        assert_eq!(s.feed(b"ST"), Fed::Text(String::new()));
        assert_eq!(s.feed(b"AY"), Fed::Text("STAY".into()));
        assert_eq!(s.finish(), "");
    }

    #[test]
    fn joins_split_utf8() {
        let mut s = TextStream::new(&[]);
        let bytes = "é€".as_bytes();
        assert_eq!(s.feed(&bytes[..1]), Fed::Text(String::new()));
        assert_eq!(s.feed(&bytes[1..3]), Fed::Text("é".into()));
        assert_eq!(s.feed(&bytes[3..]), Fed::Text("€".into()));
    }

    proptest! {
        #[test]
        fn emitted_text_is_the_input_up_to_the_first_stop(
            text in "[a-c ]{0,40}", stop in "[a-c]{1,3}", cuts in proptest::collection::vec(0usize..40, 0..8)
        ) {
            let mut s = TextStream::new(std::slice::from_ref(&stop));
            let mut points: Vec<usize> = cuts.into_iter().filter(|&c| c <= text.len()).collect();
            points.push(text.len());
            points.sort();
            let mut last = 0;
            let mut out = String::new();
            let mut stopped = false;
            for p in points {
                match s.feed(&text.as_bytes()[last..p]) {
                    Fed::Text(t) => out.push_str(&t),
                    Fed::Stop(t) => { out.push_str(&t); stopped = true; break; }
                }
                last = p;
            }
            if !stopped { out.push_str(&s.finish()); }
            let expected = match text.find(&stop) { Some(i) => &text[..i], None => &text[..] };
            prop_assert_eq!(out, expected);
        }
    }
}
