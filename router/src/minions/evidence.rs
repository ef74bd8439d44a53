//! Grounded evidence: what the supervisor is shown of the workers' outputs.
//!
//! A worker answers `{citation, answer}` for one chunk. Small models make up answers and
//! quote text that is not there, so nothing they write goes up unchecked:
//!
//! - an answer counts when the chunk supports it (it is there verbatim, or its numbers and
//!   most of its words are) and it says more than the question already did;
//! - a citation counts when it is in the chunk (compared after case and whitespace
//!   normalisation; an ellipsis may join fragments, each of which must be there);
//! - a supported answer goes up with the worker's citation when that holds the answer, else
//!   with the sentence of the chunk that does, located by the router (`located`);
//! - a grounded citation without a supported answer goes up alone if it shares a word with
//!   the question, and is dropped as irrelevant otherwise;
//! - anything else is dropped as ungrounded;
//! - a quote over [`MAX_QUOTE_BYTES`] (small workers copy their whole chunk) is cut to its
//!   sentence that holds the answer or, with none, that is most about the question.
//!
//! The supervisor sees compact, de-duplicated quotes that a user can check against the
//! document, never the workers' prose, and the job's answer lists them.

use std::collections::HashMap;

use serde::Serialize;

/// The shortest citation that counts (after normalisation): a quote of a word or two
/// proves nothing about where it came from.
const MIN_CITATION_CHARS: usize = 8;

/// Quotes longer than this are cut to their sentence that matters ([`compact`]).
const MAX_QUOTE_BYTES: usize = 240;

/// One grounded finding.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Evidence {
    pub round: u32,
    /// The plan's task id.
    pub task: String,
    /// `document#chunk`
    pub chunk: String,
    /// Text that is in the chunk.
    pub citation: String,
    /// The worker's answer, when the chunk supports it.
    pub answer: Option<String>,
    /// The provider that found it first.
    pub provider: String,
    /// Its result's signature, signer and digests were checked (always, for a result that
    /// reached aggregation; stated so that a reader of the answer need not know that).
    pub verified: bool,
    /// The quote is the chunk's sentence holding the answer, found by the router, as the
    /// worker's citation did not hold it.
    pub located: bool,
    /// Jobs that reported the same citation and answer (samples, overlapping chunks,
    /// other tasks).
    pub seen: usize,
}

/// What grounding kept and dropped, over a job.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Grounding {
    /// Worker outputs with an answer (null answers are "not in this chunk").
    pub findings: usize,
    /// Findings kept: a supported answer, or a grounded citation on the question.
    pub grounded: usize,
    /// Findings dropped: neither a supported answer nor a citation that is in the chunk.
    pub ungrounded: usize,
    /// Findings dropped: a quote on nothing the question asks about.
    pub irrelevant: usize,
    /// Kept findings whose answer the chunk does not support: sent as the citation.
    pub answers_dropped: usize,
    /// Kept findings whose quote the router located (the worker's citation did not hold
    /// the answer).
    pub located: usize,
    /// Grounded findings that repeated one already kept.
    pub duplicates: usize,
}

/// A worker's finding, before grounding.
pub struct Finding<'a> {
    /// The job's task and the plan's instruction: what an answer must say more than, and
    /// what a citation must be about.
    pub question: &'a str,
    pub round: u32,
    pub task: &'a str,
    pub chunk: String,
    pub chunk_text: &'a str,
    pub citation: Option<&'a str>,
    pub answer: &'a str,
    pub provider: String,
}

/// Collects grounded, de-duplicated evidence.
#[derive(Default)]
pub struct Collector {
    pub evidence: Vec<Evidence>,
    pub counts: Grounding,
    index: HashMap<(String, String), usize>,
}

impl Collector {
    /// Checks one finding; keeps it when grounded. Returns whether it was.
    pub fn add(&mut self, f: Finding<'_>) -> bool {
        self.counts.findings += 1;
        let chunk = normalise(f.chunk_text);
        let question = normalise(f.question);
        let supported = supported(f.answer, &chunk) && informative(f.answer, &question);
        let citation = f.citation.filter(|c| grounded(c, &chunk));
        let (citation, answer, located) = match (citation, supported) {
            (Some(c), true) if holds(&normalise(c), f.answer) => (
                c.trim().to_string(),
                Some(f.answer.trim().to_string()),
                false,
            ),
            (_, true) => match sentence_with(f.chunk_text, f.answer) {
                Some(s) if relevant(&normalise(&s), &question) => {
                    (s, Some(f.answer.trim().to_string()), true)
                }
                Some(_) => {
                    self.counts.irrelevant += 1;
                    return false;
                }
                None => {
                    self.counts.ungrounded += 1;
                    return false;
                }
            },
            (Some(c), false) if relevant(&normalise(c), &question) => {
                self.counts.answers_dropped += 1;
                (c.trim().to_string(), None, false)
            }
            (Some(_), false) => {
                self.counts.irrelevant += 1;
                return false;
            }
            (None, false) => {
                self.counts.ungrounded += 1;
                return false;
            }
        };
        let citation = compact(citation, answer.as_deref(), &question);
        self.counts.grounded += 1;
        self.counts.located += located as usize;
        let key = (
            normalise(&citation),
            answer.as_deref().map(normalise).unwrap_or_default(),
        );
        if let Some(&i) = self.index.get(&key) {
            self.evidence[i].seen += 1;
            self.counts.duplicates += 1;
            return true;
        }
        self.index.insert(key, self.evidence.len());
        self.evidence.push(Evidence {
            round: f.round,
            task: f.task.to_string(),
            chunk: f.chunk,
            citation,
            answer,
            provider: f.provider,
            verified: true,
            located,
            seen: 1,
        });
        true
    }

    /// The evidence so far as the supervisor reads it: one numbered line per quote, at
    /// most `max_bytes`.
    pub fn render(&self, max_bytes: usize) -> String {
        let mut out = String::new();
        let mut n = 0;
        for e in &self.evidence {
            n += 1;
            let line = format!(
                "[{n}] document {} ({}): \"{}\"{}{}\n",
                e.chunk.replace('#', " chunk "),
                e.task,
                e.citation,
                e.answer
                    .as_deref()
                    .map(|a| format!(" -> answer: {a}"))
                    .unwrap_or_default(),
                if e.seen > 1 {
                    format!(" (found {} times)", e.seen)
                } else {
                    String::new()
                }
            );
            if out.len() + line.len() > max_bytes {
                out.push_str("(further evidence left out for length)\n");
                break;
            }
            out.push_str(&line);
        }
        if n == 0 {
            out.push_str("No chunk contained a quote that answers the task.\n");
        }
        out
    }

    /// The answer found most often (then earliest), or its citation when no answer was
    /// supported: what a job answers when its supervisor cannot aggregate.
    pub fn most_seen(&self) -> Option<&Evidence> {
        let best = self.evidence.iter().map(|e| e.seen).max()?;
        self.evidence
            .iter()
            .filter(|e| e.seen == best)
            .find(|e| e.answer.is_some())
            .or_else(|| self.evidence.iter().find(|e| e.seen == best))
    }
}

impl Collector {
    /// Whether `answer` draws on the evidence: it contains one of the evidence's answers,
    /// or shares two consecutive content words (three letters or more, or a number of two
    /// digits or more) with one of its quotes. With no evidence anything does (the answer
    /// may say nothing was found). This tells a final answer from a weak supervisor's
    /// junk (a list of numbers, a fragment of the prompt), not a right answer from a wrong
    /// one.
    pub fn supports(&self, answer: &str) -> bool {
        if self.evidence.is_empty() {
            return true;
        }
        let said = content_words(answer);
        let pairs: std::collections::HashSet<(&str, &str)> = said
            .windows(2)
            .map(|w| (w[0].as_str(), w[1].as_str()))
            .collect();
        let flat = format!(" {} ", said.join(" "));
        self.evidence.iter().any(|e| {
            let found = e.answer.as_deref().map(content_words).unwrap_or_default();
            (!found.is_empty() && flat.contains(&format!(" {} ", found.join(" "))))
                || content_words(&e.citation)
                    .windows(2)
                    .any(|w| pairs.contains(&(w[0].as_str(), w[1].as_str())))
        })
    }
}

/// The words of `s` that carry content, lower case, in order: runs of letters and digits of
/// three characters or more, or numbers of two digits or more.
fn content_words(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_alphanumeric())
        .filter(|w| {
            let n = w.chars().count();
            n >= 3 || (n == 2 && w.chars().all(|c| c.is_ascii_digit()))
        })
        .map(str::to_lowercase)
        .collect()
}

/// Lower case, curly quotes and dashes made plain, runs of whitespace as one space.
pub fn normalise(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut space = false;
    for c in s.chars() {
        let c = match c {
            '\u{2018}' | '\u{2019}' | '`' => '\'',
            '\u{201c}' | '\u{201d}' => '"',
            '\u{2013}' | '\u{2014}' => '-',
            c => c,
        };
        if c.is_whitespace() {
            space = !out.is_empty();
            continue;
        }
        if space {
            out.push(' ');
            space = false;
        }
        out.extend(c.to_lowercase());
    }
    out
}

/// Whether `citation` is in the (normalised) chunk: each fragment between ellipses,
/// without surrounding quotes and punctuation, is a substring, and together they are long
/// enough to mean something.
fn grounded(citation: &str, chunk: &str) -> bool {
    let c = normalise(citation).replace('\u{2026}', "...");
    let trim = |s: &str| {
        s.trim_matches(|c: char| c.is_whitespace() || "\"'.,;:!?()[]".contains(c))
            .to_string()
    };
    let fragments: Vec<String> = c.split("...").map(trim).filter(|f| !f.is_empty()).collect();
    let total: usize = fragments.iter().map(|f| f.chars().count()).sum();
    total >= MIN_CITATION_CHARS && fragments.iter().all(|f| chunk.contains(f.as_str()))
}

/// Words too common to say anything about where an answer came from.
const STOPWORDS: [&str; 24] = [
    "the", "and", "that", "this", "with", "from", "were", "was", "are", "for", "has", "have",
    "had", "its", "their", "there", "which", "what", "when", "who", "about", "into", "than",
    "been",
];

/// Numbers (digits, with separators dropped) and content words of `s`.
fn terms(s: &str) -> (Vec<String>, Vec<String>) {
    let (mut numbers, mut words) = (Vec::new(), Vec::new());
    for raw in s.split(|c: char| !(c.is_alphanumeric() || c == '.' || c == ',' || c == '-')) {
        let t = raw.trim_matches(|c: char| c == '.' || c == ',' || c == '-');
        if t.is_empty() {
            continue;
        }
        if t.chars().any(|c| c.is_ascii_digit()) {
            numbers.push(t.replace(',', ""));
        } else if t.chars().count() >= 3 && !STOPWORDS.contains(&t) {
            words.push(t.to_string());
        }
    }
    (numbers, words)
}

/// Whether `answer` says something the (normalised) question does not: a number or a word
/// of it that the question lacks ("2025" to "how many tonnes ... in 2025?" says nothing).
fn informative(answer: &str, question: &str) -> bool {
    let (numbers, words) = terms(&normalise(answer));
    let (q_numbers, _) = terms(question);
    numbers.iter().any(|n| !q_numbers.contains(n))
        || words.iter().any(|w| !question.contains(w.as_str()))
}

/// Whether the (normalised) `citation` holds the answer: its numbers, and the answer
/// verbatim or most of its words.
fn holds(citation: &str, answer: &str) -> bool {
    supported(answer, citation)
}

/// Whether the (normalised) quote shares a content word with the question: a word of the
/// quote that begins with one of the question's words of four letters or more ("handled"
/// for "handle"; not "northport" for "port").
fn relevant(quote: &str, question: &str) -> bool {
    let (_, asked) = terms(question);
    let (_, said) = terms(quote);
    asked
        .iter()
        .filter(|w| w.chars().count() >= 4)
        .any(|w| said.iter().any(|s| s.starts_with(w.as_str())))
}

/// The sentences of `text`, trimmed, in order: a sentence ends at `.`, `?` or `!` before
/// white space, or at a blank line.
fn sentences(text: &str) -> Vec<&str> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    for (i, c) in text.char_indices() {
        let end = i + c.len_utf8();
        let boundary =
            matches!(c, '.' | '?' | '!') && bytes.get(end).is_none_or(|b| b.is_ascii_whitespace());
        if boundary || (c == '\n' && bytes.get(end) == Some(&b'\n')) {
            out.push(text[start..end].trim());
            start = end;
        }
    }
    out.push(text[start..].trim());
    out.retain(|s| !s.is_empty());
    out
}

/// The sentence of `chunk` that best holds `answer`: every number of the answer and the
/// most of its words (ties: the first), as it stands in the chunk.
fn sentence_with(chunk: &str, answer: &str) -> Option<String> {
    let (numbers, words) = terms(&normalise(answer));
    let whole = normalise(answer);
    let whole = whole.trim_matches(|c: char| c.is_whitespace() || "\"'.".contains(c));
    let mut best: Option<(usize, &str)> = None;
    for sentence in sentences(chunk) {
        let n = normalise(sentence);
        let (s_numbers, _) = terms(&n);
        if !numbers.iter().all(|x| s_numbers.contains(x)) {
            continue;
        }
        let score = if n.contains(whole) {
            usize::MAX
        } else {
            words.iter().filter(|w| n.contains(w.as_str())).count()
        };
        let enough = score == usize::MAX
            || (score > 0 && score * 2 >= words.len())
            || (words.is_empty() && !numbers.is_empty());
        if enough && best.is_none_or(|(b, _)| score > b) {
            best = Some((score, sentence));
        }
    }
    best.map(|(_, s)| s.to_string())
}

/// A quote as the supervisor is shown it: as the worker gave it when it is short; else
/// (small workers often copy their whole chunk) the sentence of it that holds the answer,
/// or, with no answer, the sentence that shares the most content words with the question
/// (ties: the first). Every sentence is the quote's own, so what is shown is still in the
/// document.
fn compact(quote: String, answer: Option<&str>, question: &str) -> String {
    if quote.len() <= MAX_QUOTE_BYTES {
        return quote;
    }
    if let Some(s) = answer.and_then(|a| sentence_with(&quote, a)) {
        return s;
    }
    let (_, asked) = terms(question);
    let asked: Vec<&String> = asked.iter().filter(|w| w.chars().count() >= 4).collect();
    let score = |s: &str| {
        let (_, said) = terms(&normalise(s));
        asked
            .iter()
            .filter(|w| said.iter().any(|x| x.starts_with(w.as_str())))
            .count()
    };
    let mut best: Option<(usize, &str)> = None;
    for s in sentences(&quote) {
        let n = score(s);
        if best.is_none_or(|(b, _)| n > b) {
            best = Some((n, s));
        }
    }
    match best {
        Some((n, s)) if n > 0 => s.to_string(),
        _ => quote,
    }
}

/// Whether the (normalised) chunk supports `answer`: it holds the answer verbatim, or every
/// number of the answer and at least half of its content words.
fn supported(answer: &str, chunk: &str) -> bool {
    let a = normalise(answer);
    let a = a.trim_matches(|c: char| c.is_whitespace() || "\"'.".contains(c));
    if a.is_empty() {
        return false;
    }
    if chunk.contains(a) {
        return true;
    }
    let (numbers, words) = terms(a);
    let (chunk_numbers, _) = terms(chunk);
    let numbers_ok = numbers.iter().all(|n| chunk_numbers.contains(n));
    let found = words.iter().filter(|w| chunk.contains(w.as_str())).count();
    let words_ok = found * 2 >= words.len();
    numbers_ok && words_ok && !(numbers.is_empty() && words.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: &str = "The port handled a total of 14.2 million tonnes of cargo in 2025,\n\
                         up from 13,100,000 tonnes the year before. Container traffic  rose.";

    fn finding<'a>(citation: Option<&'a str>, answer: &'a str) -> Finding<'a> {
        Finding {
            question: "How many tonnes of cargo did the port handle in 2025?",
            round: 1,
            task: "cargo",
            chunk: "0#3".into(),
            chunk_text: CHUNK,
            citation,
            answer,
            provider: "peer".into(),
        }
    }

    #[test]
    fn a_final_answer_must_draw_on_the_evidence() {
        let mut c = Collector::default();
        assert!(c.supports("Nothing in the documents says."));
        c.add(finding(
            Some("The port handled a total of 14.2 million tonnes of cargo in 2025"),
            "14.2 million tonnes",
        ));
        assert!(!c.evidence.is_empty());
        for drawn in [
            "The answer is 14.2 million tonnes.",
            "}24.2 tonnes of cargo was handled by the port in 2025. { 14.2 } tonnes of cargo",
            // Wrong, but from the evidence: this check is against junk, not error.
            "The port handled a total of 2025 tonnes.",
        ] {
            assert!(c.supports(drawn), "{drawn:?}");
        }
        for junk in [
            "); 1. 1. 2. 3. 4. 5. 6. 7. 8. 9. 10. 11. 12.",
            "The North Port of Glasgow, a city of innovation.",
            "",
        ] {
            assert!(!c.supports(junk), "{junk:?}");
        }
    }

    #[test]
    fn a_copied_paragraph_is_cut_to_the_sentence_that_matters() {
        let paragraph = "Harbour Authority annual review, section four, on operations. \
            The weather was mild for most of the year and the staff canteen was renovated. \
            The port handled a total of 14.2 million tonnes of cargo in 2025, a record. \
            Dredging of the outer channel continued through the autumn months as planned.";
        assert!(paragraph.len() > MAX_QUOTE_BYTES);
        let mut c = Collector::default();
        let f = |citation, answer| Finding {
            chunk_text: paragraph,
            ..finding(citation, answer)
        };
        // A supported answer: the sentence holding it.
        assert!(c.add(f(Some(paragraph), "14.2 million tonnes")));
        // A junk answer: the sentence most about the question.
        assert!(c.add(f(Some(paragraph), "0.000000")));
        let quotes: Vec<&str> = c.evidence.iter().map(|e| e.citation.as_str()).collect();
        let sentence =
            "The port handled a total of 14.2 million tonnes of cargo in 2025, a record.";
        assert_eq!(quotes, [sentence, sentence]);
        // Short quotes stay as the worker gave them.
        assert_eq!(
            compact("Container traffic rose.".into(), None, "cargo"),
            "Container traffic rose."
        );
    }

    #[test]
    fn citations_must_be_in_the_chunk() {
        let chunk = normalise(CHUNK);
        for good in [
            "handled a total of 14.2 million tonnes",
            "  \u{201c}The PORT handled a total of 14.2 Million tonnes of cargo in 2025,\u{201d}",
            "the year before. Container traffic rose.",
            "The port handled ... 14.2 million tonnes \u{2026} Container traffic rose",
        ] {
            assert!(grounded(good, &chunk), "{good:?}");
        }
        for bad in [
            "The port handled 15 million tonnes",
            "2025",
            "...",
            "",
            "The port handled ... 99 million tonnes",
        ] {
            assert!(!grounded(bad, &chunk), "{bad:?}");
        }
    }

    #[test]
    fn answers_must_be_supported_by_the_chunk() {
        let chunk = normalise(CHUNK);
        for good in [
            "14.2 million tonnes",
            "The port handled 14.2 million tonnes of cargo.",
            "13100000 tonnes",
            "13,100,000",
        ] {
            assert!(supported(good, &chunk), "{good:?}");
        }
        for junk in [
            "0.000000",
            "2026",
            "",
            "null",
            "seventeen giraffes",
            "14.3 million",
        ] {
            assert!(!supported(junk, &chunk), "{junk:?}");
        }
    }

    #[test]
    fn findings_are_kept_only_when_the_chunk_backs_them() {
        let mut c = Collector::default();
        let quote = "a total of 14.2 million tonnes of cargo in 2025";
        // Kept, twice: merged.
        assert!(c.add(finding(Some(quote), "14.2 million tonnes")));
        assert!(c.add(finding(Some(quote), "14.2 million tonnes")));
        // A supported answer with a citation that does not hold it: the router locates
        // the sentence that does.
        assert!(c.add(finding(
            Some("Container traffic rose."),
            "13,100,000 tonnes"
        )));
        assert!(c.add(finding(
            Some("https://example.com/port-2025"),
            "14.2 million"
        )));
        // A grounded citation on the question with a junk answer: the citation alone.
        assert!(c.add(finding(Some(quote), "0.000000")));
        // Dropped: a made-up quote and answer; an answer that repeats the question; a
        // grounded citation on nothing asked; nothing at all.
        assert!(!c.add(finding(Some("The port handled 99 million tonnes"), "99")));
        assert!(!c.add(finding(Some("Container traffic rose."), "2025")));
        assert!(!c.add(finding(None, "seventeen giraffes")));
        assert_eq!(
            c.counts,
            Grounding {
                findings: 8,
                grounded: 5,
                ungrounded: 2,
                irrelevant: 1,
                answers_dropped: 1,
                located: 2,
                duplicates: 1,
            }
        );
        let e = &c.evidence;
        assert_eq!(e.len(), 4, "{e:?}");
        assert_eq!(e[0].seen, 2);
        assert_eq!(
            e[1].citation,
            "The port handled a total of 14.2 million tonnes of cargo in 2025,\nup from 13,100,000 tonnes the year before."
        );
        assert!(e[1].located && !e[0].located);
        assert_eq!(e[2].answer.as_deref(), Some("14.2 million"));
        assert_eq!(e[3].answer, None);
        let shown = c.render(10_000);
        assert!(shown.starts_with(
            "[1] document 0 chunk 3 (cargo): \"a total of 14.2 million tonnes of cargo in 2025\" -> answer: 14.2 million tonnes (found 2 times)\n"
        ), "{shown}");
        assert!(
            !shown.contains("99") && !shown.contains("giraffes") && !shown.contains("example.com")
        );
        assert_eq!(
            c.most_seen().unwrap().answer.as_deref(),
            Some("14.2 million tonnes")
        );
        assert_eq!(
            Collector::default().render(100),
            "No chunk contained a quote that answers the task.\n"
        );
    }
}
