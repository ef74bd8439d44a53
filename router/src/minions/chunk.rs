//! Cutting documents into chunks by a plan's strategy. Pure and deterministic: the same
//! documents and plan always give the same chunks, so rounds can be replayed and audited.

use super::plan::{Chunking, Strategy};

/// One piece of one document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub doc: usize,
    /// Position of this chunk within its document.
    pub index: usize,
    pub text: String,
}

/// Chunks every document; empty documents give no chunks.
pub fn chunk(docs: &[String], c: &Chunking) -> Vec<Chunk> {
    let size = c.size.max(1) as usize;
    let overlap = (c.overlap as usize).min(size - 1);
    let mut out = Vec::new();
    for (doc, text) in docs.iter().enumerate() {
        let pieces: Vec<String> = match c.strategy {
            Strategy::Chars => windows(&text.chars().collect::<Vec<_>>(), size, overlap)
                .map(|w| w.iter().collect())
                .collect(),
            Strategy::Paragraphs => {
                let paras: Vec<&str> = text
                    .split("\n\n")
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .collect();
                windows(&paras, size, overlap)
                    .map(|w| w.join("\n\n"))
                    .collect()
            }
            Strategy::Pages => {
                let pages: Vec<&str> = text
                    .split('\x0c')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .collect();
                windows(&pages, size, overlap)
                    .map(|w| w.join("\n\n"))
                    .collect()
            }
            Strategy::Tokens => {
                // About 0.75 words per token.
                let words: Vec<&str> = text.split_whitespace().collect();
                let w = (size * 3 / 4).max(1);
                let o = (overlap * 3 / 4).min(w - 1);
                windows(&words, w, o).map(|w| w.join(" ")).collect()
            }
        };
        out.extend(
            pieces
                .into_iter()
                .filter(|p| !p.trim().is_empty())
                .enumerate()
                .map(|(index, text)| Chunk { doc, index, text }),
        );
    }
    out
}

/// About how many chunks `chunk` then `cap` give, worked out from lengths alone: no
/// chunk is built, so a plan whose windows would number in the millions costs a count.
/// Each window counts as its length divided by `max_chars`, rounded up (`cap` cuts at
/// whitespace, so it may give a few more or fewer); whitespace-only windows count too.
pub fn estimate(docs: &[String], c: &Chunking, max_chars: usize) -> usize {
    estimate_from(&Lengths::of(docs, c.strategy), c, max_chars)
}

/// The lengths [`estimate_from`] needs for one strategy, measured once (one pass over the
/// documents) for any number of chunk sizes.
pub struct Lengths {
    strategy: Strategy,
    /// Per document: its length in characters (chars), or the running sum of its items'
    /// lengths in characters, starting at 0 (paragraphs, pages, words).
    docs: Vec<Result<usize, Vec<usize>>>,
}

impl Lengths {
    pub fn of(docs: &[String], strategy: Strategy) -> Lengths {
        let prefix = |lens: &mut dyn Iterator<Item = usize>| {
            let mut prefix = vec![0];
            let mut sum = 0usize;
            for l in lens {
                sum += l;
                prefix.push(sum);
            }
            prefix
        };
        let docs = docs
            .iter()
            .map(|text| match strategy {
                Strategy::Chars => Ok(text.chars().count()),
                Strategy::Paragraphs | Strategy::Pages => {
                    let by = if strategy == Strategy::Pages {
                        "\x0c"
                    } else {
                        "\n\n"
                    };
                    Err(prefix(
                        &mut text
                            .split(by)
                            .map(str::trim)
                            .filter(|p| !p.is_empty())
                            .map(|p| p.chars().count()),
                    ))
                }
                Strategy::Tokens => Err(prefix(
                    &mut text.split_whitespace().map(|w| w.chars().count()),
                )),
            })
            .collect();
        Lengths { strategy, docs }
    }
}

/// [`estimate`] from lengths measured before (`lengths` must be of `c.strategy`).
pub fn estimate_from(lengths: &Lengths, c: &Chunking, max_chars: usize) -> usize {
    debug_assert_eq!(lengths.strategy, c.strategy);
    let size = c.size.max(1) as usize;
    let overlap = (c.overlap as usize).min(size - 1);
    let max_chars = max_chars.max(1);
    // The separator `chunk` joins items with, and the window it uses (about 0.75 words
    // per token).
    let (sep, size, overlap) = match c.strategy {
        Strategy::Chars => (0, size, overlap),
        Strategy::Paragraphs | Strategy::Pages => (2, size, overlap),
        Strategy::Tokens => {
            let w = (size * 3 / 4).max(1);
            (1, w, (overlap * 3 / 4).min(w - 1))
        }
    };
    let mut total = 0usize;
    for doc in &lengths.docs {
        let n = match doc {
            Ok(chars) => *chars,
            Err(prefix) => prefix.len() - 1,
        };
        for start in window_starts(n, size, overlap) {
            let end = (start + size).min(n);
            let chars = match doc {
                Ok(_) => end - start,
                Err(p) => p[end] - p[start] + sep * (end - start - 1),
            };
            total = total.saturating_add(chars.div_ceil(max_chars).max(1));
        }
    }
    total
}

/// Splits every chunk longer than `max_chars` characters into pieces of at most that many,
/// cut at whitespace where there is some, so no local call gets more than a small model
/// can read; chunks are renumbered within each document.
pub fn cap(chunks: Vec<Chunk>, max_chars: usize) -> Vec<Chunk> {
    let max_chars = max_chars.max(1);
    let mut out: Vec<Chunk> = Vec::with_capacity(chunks.len());
    for c in chunks {
        let mut rest = c.text.as_str();
        while !rest.is_empty() {
            let end = match rest.char_indices().nth(max_chars) {
                None => rest.len(),
                Some((hard, _)) => rest[..hard]
                    .rfind(char::is_whitespace)
                    .filter(|&w| w > hard / 2)
                    .unwrap_or(hard),
            };
            let (piece, tail) = rest.split_at(end);
            if !piece.trim().is_empty() {
                let index = match out.last() {
                    Some(l) if l.doc == c.doc => l.index + 1,
                    _ => 0,
                };
                out.push(Chunk {
                    doc: c.doc,
                    index,
                    text: piece.to_string(),
                });
            }
            rest = tail;
        }
    }
    out
}

/// Windows of `size` items advancing by `size - overlap`, the last one possibly shorter;
/// together they cover every item.
fn windows<T>(items: &[T], size: usize, overlap: usize) -> impl Iterator<Item = &[T]> {
    let n = items.len();
    window_starts(n, size, overlap).map(move |start| &items[start..(start + size).min(n)])
}

/// Where the windows over `n` items start.
fn window_starts(n: usize, size: usize, overlap: usize) -> impl Iterator<Item = usize> {
    let step = size.saturating_sub(overlap).max(1);
    (0..)
        .map(move |k| k * step)
        .take_while(move |&start| start < n && (start == 0 || start + overlap < n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::minions::plan::Strategy;
    use proptest::prelude::{prop, prop_assert, prop_assert_eq, proptest};

    fn plan(strategy: Strategy, size: u32, overlap: u32) -> Chunking {
        Chunking {
            strategy,
            size,
            overlap,
        }
    }

    #[test]
    fn cap_splits_long_chunks_at_whitespace_and_renumbers() {
        let docs = vec!["aaaa bbbb cccc dddd".to_string(), "x".to_string()];
        let c = cap(chunk(&docs, &plan(Strategy::Paragraphs, 1, 0)), 10);
        let got: Vec<_> = c
            .iter()
            .map(|c| (c.doc, c.index, c.text.as_str()))
            .collect();
        assert_eq!(
            got,
            [(0, 0, "aaaa bbbb"), (0, 1, " cccc dddd"), (1, 0, "x")]
        );
        assert!(c.iter().all(|c| c.text.chars().count() <= 10));
    }

    #[test]
    fn paragraphs_and_pages() {
        let doc = "A one.\n\nB two.\n\n\n\nC three.\n\nD four.".to_string();
        let c = chunk(
            std::slice::from_ref(&doc),
            &plan(Strategy::Paragraphs, 2, 1),
        );
        let texts: Vec<_> = c.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(
            texts,
            [
                "A one.\n\nB two.",
                "B two.\n\nC three.",
                "C three.\n\nD four."
            ]
        );
        let pdf = "page one\x0cpage two\x0c\x0cpage three".to_string();
        let c = chunk(&[pdf, String::new()], &plan(Strategy::Pages, 2, 0));
        assert_eq!(c.len(), 2);
        assert_eq!(c[1].text, "page three");
        assert!(c.iter().all(|c| c.doc == 0));
        // Windows of nothing but whitespace are not worth a worker's call.
        let c = chunk(&["ab    cd".to_string()], &plan(Strategy::Chars, 2, 0));
        let texts: Vec<_> = c.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(texts, ["ab", "cd"]);
    }

    proptest! {
        #[test]
        fn char_chunks_are_bounded_and_cover_the_document(text in "[^\\s]{0,3000}", size in 1u32..500, overlap in 0u32..500) {
            // (Whitespace-only windows are dropped by design, so the text has none.)
            let overlap = overlap % size;
            let c = chunk(std::slice::from_ref(&text), &plan(Strategy::Chars, size, overlap));
            let chars: Vec<char> = text.chars().collect();
            prop_assert!(c.iter().all(|c| c.text.chars().count() <= size as usize));
            // Rebuild the document from the chunks by dropping each overlap.
            let mut rebuilt: Vec<char> = Vec::new();
            for (i, ch) in c.iter().enumerate() {
                let skip = if i == 0 { 0 } else { overlap as usize };
                rebuilt.extend(ch.text.chars().skip(skip));
            }
            prop_assert_eq!(rebuilt, chars);
        }

        #[test]
        fn every_word_lands_in_some_token_chunk(words in prop::collection::vec("[a-z]{1,8}", 0..400), size in 50u32..400) {
            let text = words.join(" ");
            let c = chunk(std::slice::from_ref(&text), &plan(Strategy::Tokens, size, size / 10));
            let seen: std::collections::HashSet<&str> = c.iter().flat_map(|c| c.text.split(' ')).collect();
            prop_assert!(words.iter().all(|w| seen.contains(w.as_str())));
            prop_assert_eq!(chunk(std::slice::from_ref(&text), &plan(Strategy::Tokens, size, size / 10)), c);
        }

        /// The estimate sizes are chosen on matches what is then built: exactly, where no
        /// window is cut at whitespace or dropped as blank.
        #[test]
        fn estimates_match_what_is_built(
            paras in prop::collection::vec("[a-z]{1,40}", 0..60),
            strategy in prop::sample::select(vec![Strategy::Chars, Strategy::Paragraphs, Strategy::Pages, Strategy::Tokens]),
            size in 1u32..300,
            overlap in 0u32..300,
            max_chars in 1usize..5000,
        ) {
            let overlap = overlap % size;
            let sep = match strategy {
                Strategy::Pages => "\x0c",
                Strategy::Tokens => " ",
                Strategy::Chars => "",
                Strategy::Paragraphs => "\n\n",
            };
            let docs = vec![paras.join(sep), String::new()];
            let c = plan(strategy, size, overlap);
            let built = chunk(&docs, &c);
            prop_assert_eq!(estimate(&docs, &c, usize::MAX), built.len());
            // Cut pieces: at least as many as the estimate, since no piece is longer than
            // max_chars and the text has no whitespace to cut earlier at (chars only).
            if strategy == Strategy::Chars {
                prop_assert_eq!(estimate(&docs, &c, max_chars), cap(built, max_chars).len());
            }
        }
    }

    /// The plan bomb of the security review (H7): 4 MiB, one window per character. Its
    /// count is had without building any of the four million 50,000-character windows
    /// (about 200 GB of text).
    #[test]
    fn a_plan_bomb_is_counted_not_built() {
        let doc = "x".repeat(4 << 20);
        let n = estimate(
            std::slice::from_ref(&doc),
            &plan(Strategy::Chars, 50_000, 49_999),
            1 << 20,
        );
        assert_eq!(n, (4 << 20) - 49_999);
    }
}
