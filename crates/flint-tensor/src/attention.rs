//! `AttentionBatch`: where each sequence of a batch sits in the flattened token axis and in the
//! paged KV cache. Built once per step by the model and read by every attention layer.

use crate::{Error, Result};

/// Layout of one step's sequences for paged attention.
///
/// Sequence `s` owns query rows `query_starts[s]..query_starts[s + 1]` (its new tokens), has
/// `context_lens[s]` positions in the cache once they are written, and keeps them in blocks
/// `block_tables[s * max_blocks_per_seq..][..context_lens[s].div_ceil(block_size)]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttentionBatch {
    /// Tokens per KV block.
    pub block_size: usize,
    /// `n_seqs + 1` offsets into the token axis, starting at 0.
    pub query_starts: Vec<u32>,
    /// KV positions of each sequence after this step.
    pub context_lens: Vec<u32>,
    /// Row-major `[n_seqs, max_blocks_per_seq]` block ids; unused entries are ignored.
    pub block_tables: Vec<u32>,
    pub max_blocks_per_seq: usize,
}

impl AttentionBatch {
    pub fn n_seqs(&self) -> usize {
        self.context_lens.len()
    }

    /// Total new tokens in the batch.
    pub fn n_tokens(&self) -> usize {
        self.query_starts.last().map_or(0, |&n| n as usize)
    }

    /// Block ids of sequence `seq` that hold its context.
    pub fn blocks_of(&self, seq: usize) -> &[u32] {
        let used = (self.context_lens[seq] as usize).div_ceil(self.block_size);
        &self.block_tables[seq * self.max_blocks_per_seq..][..used]
    }

    /// Checks the layout's internal consistency and that every block id is below `n_blocks`.
    pub fn validate(&self, op: &'static str, n_blocks: usize) -> Result<()> {
        let bad = |detail: String| Err(Error::ShapeMismatch { op, detail });
        let n_seqs = self.context_lens.len();
        if self.block_size == 0 {
            return bad("block_size is 0".to_string());
        }
        if self.query_starts.len() != n_seqs + 1 || self.query_starts.first() != Some(&0) {
            return bad(format!("{} query offsets for {n_seqs} sequences", self.query_starts.len()));
        }
        if self.block_tables.len() != n_seqs * self.max_blocks_per_seq {
            return bad(format!(
                "block table of {} entries for {n_seqs} x {} blocks",
                self.block_tables.len(),
                self.max_blocks_per_seq
            ));
        }
        for s in 0..n_seqs {
            let (start, end) = (self.query_starts[s], self.query_starts[s + 1]);
            if end < start {
                return bad(format!("sequence {s}: query offsets decrease"));
            }
            let n_new = end - start;
            let ctx = self.context_lens[s];
            if n_new > ctx {
                return bad(format!("sequence {s}: {n_new} new tokens but a context of {ctx}"));
            }
            let used = (ctx as usize).div_ceil(self.block_size);
            if used > self.max_blocks_per_seq {
                return bad(format!(
                    "sequence {s}: context {ctx} needs {used} blocks, table has {}",
                    self.max_blocks_per_seq
                ));
            }
            if let Some(&b) = self.blocks_of(s).iter().find(|&&b| b as usize >= n_blocks) {
                return Err(Error::OutOfRange { op, index: b as usize, limit: n_blocks });
            }
        }
        Ok(())
    }
}
