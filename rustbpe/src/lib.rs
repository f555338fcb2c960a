//! rustbpe: fast, deterministic byte-level BPE training for speedchat (a Python module).
//!
//! ```python
//! import rustbpe
//! tok = rustbpe.Tokenizer()
//! tok.train_from_iterator(texts, vocab_size=32768, pattern=None)   # any iterable of str
//! tok.get_pattern()          # the split regex used (GPT-4 style by default)
//! tok.get_mergeable_ranks()  # [(bytes, rank)], ready for tiktoken.Encoding(mergeable_ranks=...)
//! tok.get_merges()           # [(left_id, right_id)], merge i made token 256 + i
//! ```
//!
//! Token ids 0..=255 are the single bytes (rank == byte value); merge i creates token 256 + i.
//! Text is first split into chunks by the pattern (default: GPT-4's, digits in groups of 1-2);
//! merges never cross chunk boundaries.
//!
//! Tie rule (what makes training deterministic): each step merges the adjacent pair with the
//! highest total count; among equal counts, the smallest (left_id, right_id) pair wins. Counts
//! are exact integer sums, so the merges do not depend on thread count or hash order.
//! Training stops early, with a smaller vocabulary, if the corpus runs out of pairs.
//!
//! How it is fast:
//! 1. The Python iterable is read in batches (with the GIL; each str's UTF-8 is borrowed, not
//!    copied); each batch is split and counted in parallel with the GIL released (rayon, one
//!    set of hash maps per thread, merged at the end; short chunks are keyed by a u128, so
//!    nothing is allocated per chunk). The default pattern uses a hand-written splitter
//!    (split.rs) instead of the regex engine: that is most of the speed.
//! 2. Each unique chunk becomes a "word" stored once with its count. A pair index maps every
//!    pair to its total count and the words containing it, and a max-heap with lazy updates
//!    picks the best pair: a popped entry whose count is stale is pushed back with the
//!    current count. A merge only touches the words that contain the pair.

mod split;

use ahash::AHashMap;
use dary_heap::QuaternaryHeap;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString};
use rayon::prelude::*;
use std::cmp::Reverse;
use std::sync::atomic::{AtomicUsize, Ordering};

pub use split::{split_default, DEFAULT_PATTERN};

// ---------------------------------------------------------------------------------------
// Pre-splitting

/// Splits text into chunks: the hand-written splitter for the default pattern, else fancy-regex.
pub enum Splitter {
    Default,
    Regex(fancy_regex::Regex),
}

impl Splitter {
    pub fn new(pattern: &str) -> Result<Self, String> {
        if pattern == DEFAULT_PATTERN {
            return Ok(Splitter::Default);
        }
        Self::regex(pattern)
    }

    /// Always the regex engine (used by tests to check the hand-written splitter).
    pub fn regex(pattern: &str) -> Result<Self, String> {
        fancy_regex::Regex::new(pattern).map(Splitter::Regex).map_err(|e| e.to_string())
    }

    /// Calls `f` on each chunk of `text`, in order.
    #[inline]
    pub fn for_each_chunk<'a>(&self, text: &'a str, mut f: impl FnMut(&'a str)) -> Result<(), String> {
        match self {
            Splitter::Default => split_default(text).for_each(f),
            Splitter::Regex(re) => {
                for m in re.find_iter(text) {
                    let m = m.map_err(|e| format!("regex error while splitting: {e}"))?;
                    f(m.as_str());
                }
            }
        }
        Ok(())
    }
}

/// Chunk counts. Chunks of up to 15 bytes (nearly all of them) are keyed by a u128 holding
/// the bytes plus the length in the top byte: hashing and comparing one integer is much
/// cheaper than hashing and memcmp-ing a short string, and nothing is allocated per chunk.
/// Longer chunks are rare; they are copied the first time a counter sees them.
#[derive(Default)]
struct ChunkCounts {
    short: AHashMap<u128, i64>,
    long: AHashMap<Box<str>, i64>,
}

const SHORT_MAX: usize = 15;

/// The u128 key of the `len <= 15` bytes at `text[start..]`.
#[inline(always)]
fn short_key(text: &[u8], start: usize, len: usize) -> u128 {
    let bytes = if start + 16 <= text.len() {
        // one unaligned 16-byte load, then keep the chunk's bytes
        u128::from_le_bytes(text[start..start + 16].try_into().unwrap()) & ((1u128 << (8 * len)) - 1)
    } else {
        let mut buf = [0u8; 16];
        buf[..len].copy_from_slice(&text[start..start + len]);
        u128::from_le_bytes(buf)
    };
    bytes | ((len as u128) << 120)
}

impl ChunkCounts {
    fn add_text(&mut self, splitter: &Splitter, text: &str) -> Result<(), String> {
        let bytes = text.as_bytes();
        splitter.for_each_chunk(text, |chunk| {
            if chunk.len() <= SHORT_MAX {
                let start = chunk.as_ptr() as usize - bytes.as_ptr() as usize;
                *self.short.entry(short_key(bytes, start, chunk.len())).or_insert(0) += 1;
            } else if let Some(count) = self.long.get_mut(chunk) {
                *count += 1;
            } else {
                self.long.insert(chunk.into(), 1);
            }
        })
    }

    fn absorb(&mut self, other: ChunkCounts) {
        for (k, c) in other.short {
            *self.short.entry(k).or_insert(0) += c;
        }
        for (k, c) in other.long {
            *self.long.entry(k).or_insert(0) += c;
        }
    }

    fn into_words(self) -> Result<Words, String> {
        let mut words = Words::default();
        for (k, c) in self.short {
            let bytes = k.to_le_bytes();
            words.push(&bytes[..bytes[15] as usize], c)?;
        }
        for (k, c) in self.long {
            words.push(k.as_bytes(), c)?;
        }
        Ok(words)
    }
}

/// Splits and counts a batch of texts in parallel. There is one counter per thread, kept
/// across batches (merged once at the end); each takes the next text from a shared index
/// until none is left, so a thread that drew long texts does not hold up the rest.
fn count_batch(splitter: &Splitter, texts: &[&str], counters: &mut [ChunkCounts]) -> Result<(), String> {
    let next = AtomicUsize::new(0);
    counters.par_iter_mut().try_for_each(|counts| {
        while let Some(text) = texts.get(next.fetch_add(1, Ordering::Relaxed)) {
            counts.add_text(splitter, text)?;
        }
        Ok(())
    })
}

/// Counts of all chunks of all texts, from the per-thread counters.
fn merge_counters(counters: Vec<ChunkCounts>) -> ChunkCounts {
    let mut counters = counters;
    counters.sort_by_key(|c| std::cmp::Reverse(c.short.len())); // absorb into the biggest
    let mut total = counters.remove(0);
    for c in counters {
        total.absorb(c);
    }
    total
}

// ---------------------------------------------------------------------------------------
// Merging

const MAX_VOCAB: i64 = 1 << 31; // ids are u32

type Pair = u64; // (left << 32) | right, so u64 order == (left, right) order

#[inline(always)]
fn pack(a: u32, b: u32) -> Pair {
    ((a as u64) << 32) | b as u64
}

#[inline(always)]
fn unpack(p: Pair) -> (u32, u32) {
    ((p >> 32) as u32, p as u32)
}

#[derive(Default)]
struct PairInfo {
    count: i64,
    /// Words that contained the pair when it was created, increasing, no duplicates. A word
    /// may have lost the pair since (to a competing merge); merging just finds nothing there.
    words: Vec<u32>,
}

/// The unique chunks ("words"), each stored once with its count, in one buffer as
/// `[len, count low, count high, ids...]` and named by its offset there. The header sits next
/// to the ids so that visiting a word costs one cache miss; a merge shrinks it in place.
#[derive(Default)]
struct Words {
    buf: Vec<u32>,
    offsets: Vec<u32>,
}

const HEADER: usize = 3;

impl Words {
    /// Adds a chunk with its count. Chunks of one byte have no pairs and never matter.
    fn push(&mut self, bytes: &[u8], count: i64) -> Result<(), String> {
        if bytes.len() >= 2 {
            let offset =
                u32::try_from(self.buf.len()).map_err(|_| "too many unique chunks (over 16 GB of them)".to_string())?;
            self.offsets.push(offset);
            self.buf.extend([bytes.len() as u32, count as u32, (count >> 32) as u32]);
            self.buf.extend(bytes.iter().map(|&b| b as u32));
        }
        Ok(())
    }

    #[inline(always)]
    fn count(&self, w: usize) -> i64 {
        (self.buf[w + 1] as u64 | (self.buf[w + 2] as u64) << 32) as i64
    }

    fn word(&self, w: usize) -> &[u32] {
        &self.buf[w + HEADER..w + HEADER + self.buf[w] as usize]
    }

    /// Asks the CPU to start loading word `w` (the merge loop knows which words come next).
    #[inline(always)]
    fn prefetch(&self, w: usize) {
        #[cfg(target_arch = "x86_64")]
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let p = self.buf.as_ptr().wrapping_add(w) as *const i8;
            _mm_prefetch(p, _MM_HINT_T0);
            _mm_prefetch(p.wrapping_add(60), _MM_HINT_T0); // a word may straddle two cache lines
        }
    }

    /// Replaces every (a, b) in word `w` by `z` (left to right, non-overlapping) and tallies
    /// the pair counts that change: for `x a b y` the pairs (x,a), (a,b), (b,y) lose the word's
    /// count and the new pairs (x,z), (z,y) gain it. In `a b a b` the middle (b,a) becomes
    /// (z,z), handled once, by the second occurrence.
    fn merge(
        &mut self,
        w: usize,
        a: u32,
        b: u32,
        z: u32,
        lost: &mut AHashMap<Pair, i64>,
        new_pairs: &mut AHashMap<Pair, PairInfo>,
    ) {
        let n = self.buf[w] as usize;
        let wc = self.count(w);
        let s = &mut self.buf[w + HEADER..w + HEADER + n];
        let (mut i, mut j) = (0, 0); // read and write positions; j <= i, so s[i - 1] is still the old token
        while i < n {
            if s[i] == a && i + 1 < n && s[i + 1] == b {
                sub(lost, pack(a, b), wc);
                if i > 0 {
                    sub(lost, pack(s[i - 1], a), wc);
                    add(new_pairs, pack(s[j - 1], z), wc, w as u32);
                }
                if i + 2 < n {
                    let y = s[i + 2];
                    let next_is_match = y == a && i + 3 < n && s[i + 3] == b;
                    if !next_is_match {
                        sub(lost, pack(b, y), wc);
                        add(new_pairs, pack(z, y), wc, w as u32);
                    }
                }
                s[j] = z;
                i += 2;
            } else {
                s[j] = s[i];
                i += 1;
            }
            j += 1;
        }
        self.buf[w] = j as u32;
    }
}

#[inline(always)]
fn sub(lost: &mut AHashMap<Pair, i64>, p: Pair, count: i64) {
    *lost.entry(p).or_insert(0) += count;
}

fn add(pairs: &mut AHashMap<Pair, PairInfo>, p: Pair, count: i64, w: u32) {
    let info = pairs.entry(p).or_default();
    info.count += count;
    if info.words.last() != Some(&w) {
        info.words.push(w);
    }
}

/// Counts every adjacent pair over all words, with the list of words containing each.
fn index_pairs(words: &Words) -> AHashMap<Pair, PairInfo> {
    let mut pairs: AHashMap<Pair, PairInfo> = AHashMap::new();
    for &w in &words.offsets {
        let s = words.word(w as usize);
        let count = words.count(w as usize);
        for k in 0..s.len() - 1 {
            add(&mut pairs, pack(s[k], s[k + 1]), count, w);
        }
    }
    pairs
}

/// Learns up to `n_merges` merges. Returns them in order: merge i made token 256 + i.
fn learn_merges(mut words: Words, n_merges: usize) -> Vec<(u32, u32)> {
    let mut pairs = index_pairs(&words);
    // Max-heap on (count, then smallest pair): Reverse makes the smaller pair the larger key.
    let mut heap: QuaternaryHeap<(i64, Reverse<Pair>)> =
        pairs.iter().filter(|(_, i)| i.count > 0).map(|(&p, i)| (i.count, Reverse(p))).collect();
    let mut merges = Vec::new();
    let mut lost: AHashMap<Pair, i64> = AHashMap::new(); // count each old pair loses in this step
    let mut new_pairs: AHashMap<Pair, PairInfo> = AHashMap::new(); // pairs with the new token
    while merges.len() < n_merges {
        let Some((count, Reverse(p))) = heap.pop() else { break };
        let Some(info) = pairs.get_mut(&p) else { continue };
        // Counts only ever fall for pairs already in the heap, so an up-to-date top is the max.
        if info.count != count {
            if info.count > 0 {
                heap.push((info.count, Reverse(p)));
            }
            continue;
        }
        let (a, b) = unpack(p);
        let z = 256 + merges.len() as u32;
        merges.push((a, b));
        let affected = std::mem::take(&mut info.words);
        for (k, &w) in affected.iter().enumerate() {
            // Visiting words is memory-bound: start loading the words a few steps ahead.
            if let Some(&ahead) = affected.get(k + 8) {
                words.prefetch(ahead as usize);
            }
            words.merge(w as usize, a, b, z, &mut lost, &mut new_pairs);
        }
        // Tallied per step first: a small map stays in cache, the big one is touched once per pair.
        for (lp, c) in lost.drain() {
            if let Some(info) = pairs.get_mut(&lp) {
                info.count -= c;
            }
        }
        pairs.remove(&p);
        // Pairs with the new token exist only from now on: their counts are final for this step.
        for (np, info) in new_pairs.drain() {
            heap.push((info.count, Reverse(np)));
            pairs.insert(np, info);
        }
    }
    merges
}

// ---------------------------------------------------------------------------------------
// Python API

/// Byte-level BPE trainer: train it, export its ranks for tiktoken (which does the encoding).
///
/// Ids 0..255 are the single bytes, merge i makes id 256 + i. Each training step merges the
/// adjacent pair with the highest count; equal counts go to the smallest (left_id, right_id),
/// so the result is deterministic whatever the thread count (RAYON_NUM_THREADS).
#[pyclass(module = "rustbpe")]
pub struct Tokenizer {
    pattern: String,
    splitter: Splitter,
    merges: Vec<(u32, u32)>,
    token_bytes: Vec<Vec<u8>>,
}

impl Tokenizer {
    fn set_merges(&mut self, merges: Vec<(u32, u32)>) {
        let mut token_bytes: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for &(a, b) in &merges {
            let bytes = [token_bytes[a as usize].as_slice(), token_bytes[b as usize].as_slice()].concat();
            token_bytes.push(bytes);
        }
        self.token_bytes = token_bytes;
        self.merges = merges;
    }
}

#[pymethods]
impl Tokenizer {
    #[new]
    fn new() -> Self {
        let mut tok = Tokenizer {
            pattern: DEFAULT_PATTERN.to_string(),
            splitter: Splitter::Default,
            merges: Vec::new(),
            token_bytes: Vec::new(),
        };
        tok.set_merges(Vec::new());
        tok
    }

    /// Train on an iterable of str until the vocabulary has `vocab_size` tokens (256 bytes +
    /// merges). `pattern` is the split regex (default: GPT-4 style). Ties between pairs of equal
    /// count go to the smallest (left_id, right_id). `buffer_size` texts are read per batch.
    #[pyo3(signature = (iterator, vocab_size, pattern=None, buffer_size=8192))]
    fn train_from_iterator(
        &mut self,
        py: Python<'_>,
        iterator: &Bound<'_, PyAny>,
        vocab_size: i64,
        pattern: Option<String>,
        buffer_size: usize,
    ) -> PyResult<()> {
        if !(256..=MAX_VOCAB).contains(&vocab_size) {
            return Err(PyValueError::new_err(format!(
                "vocab_size must be between 256 (one token per byte) and {MAX_VOCAB}, got {vocab_size}"
            )));
        }
        let pattern = pattern.unwrap_or_else(|| DEFAULT_PATTERN.to_string());
        let splitter = Splitter::new(&pattern)
            .map_err(|e| PyValueError::new_err(format!("invalid split pattern {pattern:?}: {e}")))?;
        let type_name = iterator.get_type().name()?;
        let mut iter = iterator.try_iter().map_err(|_| {
            PyTypeError::new_err(format!("train_from_iterator expects an iterable of str, got {type_name}"))
        })?;
        let buffer_size = buffer_size.max(1);

        let mut counters: Vec<ChunkCounts> =
            (0..rayon::current_num_threads()).map(|_| ChunkCounts::default()).collect();
        let mut batch: Vec<Bound<'_, PyString>> = Vec::with_capacity(buffer_size);
        let mut n_seen = 0usize;
        let mut exhausted = false;
        while !exhausted {
            batch.clear();
            while batch.len() < buffer_size {
                let Some(item) = iter.next() else {
                    exhausted = true;
                    break;
                };
                let item = item?;
                if !item.is_instance_of::<PyString>() {
                    let type_name = item.get_type().name()?;
                    return Err(PyTypeError::new_err(format!(
                        "train_from_iterator: item {n_seen} is {type_name}, expected str"
                    )));
                }
                batch.push(item.downcast_into::<PyString>()?);
                n_seen += 1;
            }
            // Borrow the UTF-8 of each str (zero-copy for ASCII; the str objects stay alive in `batch`).
            let texts: Vec<&str> = batch.iter().map(|s| s.to_str()).collect::<PyResult<_>>()?;
            py.allow_threads(|| count_batch(&splitter, &texts, &mut counters)).map_err(PyRuntimeError::new_err)?;
            py.check_signals()?; // let Ctrl-C stop a long training
        }

        let n_merges = (vocab_size - 256) as usize;
        let merges = py
            .allow_threads(|| merge_counters(counters).into_words().map(|words| learn_merges(words, n_merges)))
            .map_err(PyRuntimeError::new_err)?;
        self.pattern = pattern;
        self.splitter = splitter;
        self.set_merges(merges);
        Ok(())
    }

    /// The split pattern (regex) the tokenizer was trained with.
    fn get_pattern(&self) -> String {
        self.pattern.clone()
    }

    /// [(token_bytes, rank)] for every token, rank == id: tiktoken's mergeable_ranks.
    fn get_mergeable_ranks<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let items = self.token_bytes.iter().enumerate().map(|(id, bytes)| (PyBytes::new(py, bytes), id as u32));
        PyList::new(py, items)
    }

    /// [(left_id, right_id)] in order: merge i created token 256 + i.
    fn get_merges(&self) -> Vec<(u32, u32)> {
        self.merges.clone()
    }

    /// Number of tokens: 256 + number of merges.
    fn get_vocab_size(&self) -> usize {
        self.token_bytes.len()
    }
}

/// Testing aid: the chunks of `text` under `pattern` (default pattern when None), with the
/// hand-written splitter when it applies, or always with the regex engine if `use_regex`.
#[pyfunction]
#[pyo3(signature = (text, pattern=None, use_regex=false))]
fn _split(text: &str, pattern: Option<&str>, use_regex: bool) -> PyResult<Vec<String>> {
    let pattern = pattern.unwrap_or(DEFAULT_PATTERN);
    let splitter = if use_regex { Splitter::regex(pattern) } else { Splitter::new(pattern) };
    let splitter = splitter.map_err(|e| PyValueError::new_err(format!("invalid split pattern {pattern:?}: {e}")))?;
    let mut chunks = Vec::new();
    splitter.for_each_chunk(text, |c| chunks.push(c.to_string())).map_err(PyRuntimeError::new_err)?;
    Ok(chunks)
}

/// Fast, deterministic byte-level BPE training: Tokenizer().train_from_iterator(texts,
/// vocab_size, pattern=None), get_pattern(), get_mergeable_ranks() (for tiktoken), get_merges().
/// Ties between equally frequent pairs go to the smallest (left_id, right_id).
#[pymodule]
fn rustbpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Tokenizer>()?;
    m.add_function(wrap_pyfunction!(_split, m)?)?;
    m.add("DEFAULT_PATTERN", DEFAULT_PATTERN)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(texts: &[&str]) -> ChunkCounts {
        let mut counters: Vec<ChunkCounts> = (0..3).map(|_| ChunkCounts::default()).collect();
        count_batch(&Splitter::Default, texts, &mut counters).unwrap();
        merge_counters(counters)
    }

    #[test]
    fn chunk_counts_match_naive_counting() {
        // short (u128) and long keys, chunks at the very end of a text and in the middle
        let texts = ["hello world", "a", "", " supercalifragilistic word\n\n", "x 123456 ünïcödé 😀!!", "hello"];
        let counts = count(&texts);
        let mut ours: Vec<(Vec<u8>, i64)> = counts
            .short
            .iter()
            .map(|(k, &c)| {
                let b = k.to_le_bytes();
                (b[..b[15] as usize].to_vec(), c)
            })
            .collect();
        ours.extend(counts.long.iter().map(|(k, &c)| (k.as_bytes().to_vec(), c)));
        ours.sort();
        let mut naive: AHashMap<Vec<u8>, i64> = AHashMap::new();
        for t in texts {
            for chunk in split_default(t) {
                *naive.entry(chunk.as_bytes().to_vec()).or_insert(0) += 1;
            }
        }
        let mut naive: Vec<(Vec<u8>, i64)> = naive.into_iter().collect();
        naive.sort();
        assert_eq!(ours, naive);
        assert!(!counts.long.is_empty());
    }
}
