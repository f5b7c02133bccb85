//! Tensor-parallel sharding: which heads, MLP columns and vocabulary rows a rank holds.
//!
//! Megatron-style: Q/K/V and gate/up are split by output rows (column-parallel), O and down by
//! input columns (row-parallel, followed by an all-reduce); the embedding and the LM head by
//! vocabulary rows. When there are more ranks than KV heads, each KV head is replicated on
//! `world / n_kv_heads` consecutive ranks, the ones whose query heads use it.

use std::ops::Range;

use crate::{Error, ModelConfig, Result};

/// Rank `rank` of `world` tensor-parallel ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
}

impl Shard {
    /// The whole model on one rank.
    pub const SINGLE: Shard = Shard { rank: 0, world: 1 };

    pub fn new(rank: usize, world: usize) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(Error::Sharding(format!("rank {rank} of {world} ranks")));
        }
        Ok(Shard { rank, world })
    }

    pub fn is_single(&self) -> bool {
        self.world == 1
    }

    /// Whether `config` splits over `world` ranks, and why not.
    pub fn check(world: usize, c: &ModelConfig) -> Result<()> {
        let fail = |what: String| Err(Error::Sharding(format!("{what} do not split over {world} ranks")));
        if world == 0 {
            return Err(Error::Sharding("at least one rank is needed".to_string()));
        }
        if !c.n_heads.is_multiple_of(world) {
            return fail(format!("{} attention heads", c.n_heads));
        }
        if !c.n_kv_heads.is_multiple_of(world) && !world.is_multiple_of(c.n_kv_heads) {
            return fail(format!("{} KV heads (nor does {world} split into them)", c.n_kv_heads));
        }
        if !c.intermediate_size.is_multiple_of(world) {
            return fail(format!("{} MLP columns", c.intermediate_size));
        }
        Ok(())
    }

    /// Query heads of this rank.
    pub fn heads(&self, c: &ModelConfig) -> Range<usize> {
        let n = c.n_heads / self.world;
        self.rank * n..(self.rank + 1) * n
    }

    /// KV heads of this rank (one replicated head when there are more ranks than KV heads).
    pub fn kv_heads(&self, c: &ModelConfig) -> Range<usize> {
        if c.n_kv_heads >= self.world {
            let n = c.n_kv_heads / self.world;
            self.rank * n..(self.rank + 1) * n
        } else {
            let head = self.rank / (self.world / c.n_kv_heads);
            head..head + 1
        }
    }

    /// MLP (intermediate) columns of this rank.
    pub fn ffn(&self, c: &ModelConfig) -> Range<usize> {
        let n = c.intermediate_size / self.world;
        self.rank * n..(self.rank + 1) * n
    }

    /// Vocabulary rows per rank: the vocabulary rounded up to a multiple of the ranks.
    pub fn vocab_part(&self, c: &ModelConfig) -> usize {
        c.vocab_size.div_ceil(self.world)
    }

    /// Vocabulary rows this rank holds (the last rank may hold fewer than `vocab_part`).
    pub fn vocab(&self, c: &ModelConfig) -> Range<usize> {
        let part = self.vocab_part(c);
        let start = (self.rank * part).min(c.vocab_size);
        start..((self.rank + 1) * part).min(c.vocab_size)
    }
}

/// Rows `rows` of a row-major `[_, cols]` matrix.
pub(crate) fn slice_rows(data: &[f32], cols: usize, rows: Range<usize>) -> Vec<f32> {
    data[rows.start * cols..rows.end * cols].to_vec()
}

/// Columns `range` of a row-major `[rows, cols]` matrix.
pub(crate) fn slice_cols(data: &[f32], cols: usize, range: Range<usize>) -> Vec<f32> {
    data.chunks_exact(cols).flat_map(|row| row[range.clone()].iter().copied()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(heads: usize, kv: usize, ff: usize, vocab: usize) -> ModelConfig {
        let json = format!(
            r#"{{"architectures": ["LlamaForCausalLM"], "vocab_size": {vocab}, "hidden_size": {h},
            "intermediate_size": {ff}, "num_hidden_layers": 2, "num_attention_heads": {heads},
            "num_key_value_heads": {kv}}}"#,
            h = heads * 16
        );
        ModelConfig::from_hf_json(&json, "test").expect("config")
    }

    #[test]
    fn every_head_column_and_row_has_exactly_one_owner_or_a_consistent_replica() {
        for (heads, kv, world) in [(9, 3, 3), (8, 8, 4), (32, 8, 4), (32, 8, 8), (32, 2, 8), (8, 1, 4)] {
            let c = config(heads, kv, 24 * world, 1000 + world);
            Shard::check(world, &c).expect("splits");
            let mut q = Vec::new();
            let mut ff = Vec::new();
            let mut vocab = Vec::new();
            for rank in 0..world {
                let s = Shard::new(rank, world).expect("shard");
                let group = heads / kv;
                // Every query head of the rank uses one of the rank's KV heads.
                for h in s.heads(&c) {
                    assert!(s.kv_heads(&c).contains(&(h / group)), "{heads}/{kv} over {world}: head {h}");
                }
                q.extend(s.heads(&c));
                ff.extend(s.ffn(&c));
                vocab.extend(s.vocab(&c));
            }
            assert_eq!(q, (0..heads).collect::<Vec<_>>());
            assert_eq!(ff, (0..c.intermediate_size).collect::<Vec<_>>());
            assert_eq!(vocab, (0..c.vocab_size).collect::<Vec<_>>());
        }
    }

    #[test]
    fn shapes_that_do_not_split_are_refused_by_name() {
        let e = Shard::check(2, &config(9, 3, 64, 100)).expect_err("9 heads").to_string();
        assert!(e.contains("9 attention heads"), "{e}");
        let e = Shard::check(4, &config(12, 6, 64, 100)).expect_err("6 kv heads").to_string();
        assert!(e.contains("6 KV heads"), "{e}");
        let e = Shard::check(3, &config(9, 3, 64, 100)).expect_err("ffn").to_string();
        assert!(e.contains("64 MLP columns"), "{e}");
    }

    #[test]
    fn slicing_picks_rows_and_columns() {
        let m: Vec<f32> = (0..12).map(|v| v as f32).collect(); // 3 x 4
        assert_eq!(slice_rows(&m, 4, 1..3), (4..12).map(|v| v as f32).collect::<Vec<_>>());
        assert_eq!(slice_cols(&m, 4, 1..3), vec![1.0, 2.0, 5.0, 6.0, 9.0, 10.0]);
    }
}
