//! Chunks ranked for a task by Okapi BM25, on the router, without a model: a plan's
//! `top_k` runs each task on the chunks that best match its instruction and the job's
//! question instead of on every chunk.

use std::collections::HashMap;

use super::chunk::Chunk;

/// BM25's term-frequency saturation and length normalisation (the usual values).
const K1: f64 = 1.2;
const B: f64 = 0.75;

/// Words that match everywhere and rank nothing.
const STOPWORDS: [&str; 40] = [
    "a", "an", "and", "are", "as", "at", "be", "by", "did", "do", "does", "for", "from", "how",
    "in", "is", "it", "its", "many", "much", "of", "on", "or", "that", "the", "their", "this",
    "to", "was", "were", "what", "when", "where", "which", "who", "why", "with", "you", "your",
    "chunk",
];

/// Lower-case words and numbers of `text`, stop words left out.
fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .filter(|w| !STOPWORDS.contains(&w.as_str()))
}

/// Chunk indices, best match for `query` first; ties (and chunks that share no word with
/// the query) keep document order.
pub fn rank(chunks: &[Chunk], query: &str) -> Vec<usize> {
    let query: Vec<String> = {
        let mut q: Vec<String> = words(query).collect();
        q.sort();
        q.dedup();
        q
    };
    let docs: Vec<HashMap<String, u32>> = chunks
        .iter()
        .map(|c| {
            let mut tf = HashMap::new();
            for w in words(&c.text) {
                *tf.entry(w).or_insert(0) += 1;
            }
            tf
        })
        .collect();
    let lengths: Vec<f64> = docs
        .iter()
        .map(|d| d.values().map(|&n| f64::from(n)).sum())
        .collect();
    let n = chunks.len() as f64;
    let avg = (lengths.iter().sum::<f64>() / n.max(1.0)).max(1.0);
    let idf: Vec<f64> = query
        .iter()
        .map(|q| {
            let df = docs.iter().filter(|d| d.contains_key(q)).count() as f64;
            ((n - df + 0.5) / (df + 0.5) + 1.0).ln()
        })
        .collect();
    let score = |i: usize| -> f64 {
        query
            .iter()
            .zip(&idf)
            .map(|(q, idf)| {
                let tf = f64::from(docs[i].get(q).copied().unwrap_or(0));
                idf * tf * (K1 + 1.0) / (tf + K1 * (1.0 - B + B * lengths[i] / avg))
            })
            .sum()
    };
    let scores: Vec<f64> = (0..chunks.len()).map(score).collect();
    let mut order: Vec<usize> = (0..chunks.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    order
}

/// The chunks a task runs on: every chunk when `top_k` is 0 or not below their number,
/// else the `top_k` best for `query`, in document order.
pub fn select(chunks: &[Chunk], query: &str, top_k: u32) -> Vec<usize> {
    select_after(chunks, query, top_k, 0)
}

/// As [`select`], passing over the `skip` best first (chunks an earlier round read): the
/// next `top_k`, or the best again when none is left.
pub fn select_after(chunks: &[Chunk], query: &str, top_k: u32, skip: usize) -> Vec<usize> {
    let k = top_k as usize;
    let skip = if skip < chunks.len() { skip } else { 0 };
    if k == 0 || (skip == 0 && k >= chunks.len()) {
        return (0..chunks.len()).collect();
    }
    let mut best = rank(chunks, query);
    best.drain(..skip);
    best.truncate(k);
    best.sort_unstable();
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(texts: &[&str]) -> Vec<Chunk> {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| Chunk {
                doc: 0,
                index: i,
                text: (*t).to_string(),
            })
            .collect()
    }

    #[test]
    fn the_chunk_that_holds_the_answer_ranks_first() {
        let c = chunks(&[
            "Rainfall in the valley was close to the ten-year average this spring.",
            "The committee reviewed the maintenance schedule for the northern depot.",
            "Cargo volumes: the port handled 14.2 million tonnes of cargo in 2025.",
            "The port's board met four times. The port's staff grew.",
        ]);
        let order = rank(&c, "How many tonnes of cargo did the port handle in 2025?");
        assert_eq!(order[0], 2);
        assert_eq!(order.len(), 4);
        assert_eq!(select(&c, "the port and its cargo in 2025", 2), vec![2, 3]);
        assert_eq!(select(&c, "tonnes of cargo", 0), vec![0, 1, 2, 3]);
        assert_eq!(select(&c, "tonnes of cargo", 9), vec![0, 1, 2, 3]);
        // A later round reads the next best; past the end, the best again.
        assert_eq!(
            select_after(&c, "the port and its cargo in 2025", 2, 2),
            vec![0, 1]
        );
        assert_eq!(
            select_after(&c, "the port and its cargo in 2025", 1, 1),
            vec![3]
        );
        assert_eq!(select_after(&c, "tonnes of cargo", 2, 4), vec![0, 2]);
        // Nothing in common with the query: document order.
        assert_eq!(select(&c, "zebra", 2), vec![0, 1]);
        assert!(rank(&[], "anything").is_empty());
    }
}
