//! Paged KV-cache block manager: hands out fixed-size blocks, counts references, never
//! double-frees, and remembers full blocks by a hash of their tokens (chained through the
//! blocks before them) so that requests sharing a prompt prefix share its blocks.
//!
//! A block whose last reference is dropped stays cached, evictable in least-recently-used
//! order, until its memory is needed for a new block.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};

/// Hash of a full block: its tokens chained with the hash of the block before it.
pub type BlockHash = u64;

/// The content key of a cached block, kept to rule out hash collisions.
#[derive(Clone, Debug, PartialEq, Eq)]
struct BlockKey {
    parent: Option<BlockHash>,
    tokens: Vec<u32>,
}

/// Hash of a block of `tokens` that follows the block hashed `parent`.
pub fn block_hash(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// The block pool.
#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    ref_counts: Vec<u32>,
    /// Blocks with no references and no cached content.
    free: VecDeque<u32>,
    /// Cached full blocks: hash to block.
    cached: HashMap<BlockHash, u32>,
    /// Content of each cached block.
    keys: Vec<Option<(BlockHash, BlockKey)>>,
    /// Cached blocks with no references, by the tick they were released (oldest first).
    evictable: BTreeMap<u64, u32>,
    evictable_tick: Vec<Option<u64>>,
    tick: u64,
}

impl BlockManager {
    pub fn new(n_blocks: usize, block_size: usize) -> Self {
        BlockManager {
            block_size,
            ref_counts: vec![0; n_blocks],
            free: (0..n_blocks as u32).collect(),
            cached: HashMap::new(),
            keys: vec![None; n_blocks],
            evictable: BTreeMap::new(),
            evictable_tick: vec![None; n_blocks],
            tick: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn n_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks that can be handed out now (free or evictable).
    pub fn n_available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks referenced by at least one sequence.
    pub fn n_used(&self) -> usize {
        self.n_blocks() - self.n_available()
    }

    /// Blocks holding reusable cached content (referenced or not).
    pub fn n_cached(&self) -> usize {
        self.cached.len()
    }

    /// Takes a block, evicting the least recently released cached block when none is free.
    pub fn allocate(&mut self) -> Option<u32> {
        let block = match self.free.pop_front() {
            Some(b) => b,
            None => {
                let (&tick, &b) = self.evictable.iter().next()?;
                self.evictable.remove(&tick);
                self.evictable_tick[b as usize] = None;
                if let Some((hash, _)) = self.keys[b as usize].take() {
                    self.cached.remove(&hash);
                }
                b
            }
        };
        debug_assert_eq!(self.ref_counts[block as usize], 0);
        self.ref_counts[block as usize] = 1;
        Some(block)
    }

    /// Drops one reference to `block`.
    ///
    /// # Panics
    /// When `block` has no reference: that is a double free, a bug in the caller.
    pub fn release(&mut self, block: u32) {
        let count = &mut self.ref_counts[block as usize];
        assert!(*count > 0, "block {block} released with no reference");
        *count -= 1;
        if *count == 0 {
            if self.keys[block as usize].is_some() {
                self.tick += 1;
                self.evictable.insert(self.tick, block);
                self.evictable_tick[block as usize] = Some(self.tick);
            } else {
                self.free.push_back(block);
            }
        }
    }

    fn acquire(&mut self, block: u32) {
        if self.ref_counts[block as usize] == 0
            && let Some(tick) = self.evictable_tick[block as usize].take()
        {
            self.evictable.remove(&tick);
        }
        self.ref_counts[block as usize] += 1;
    }

    /// The cached blocks that hold a prefix of `tokens`, each with a new reference, and the
    /// hash of the last one. At least one token is always left uncovered, so the caller has a
    /// token to compute logits from.
    pub fn match_prefix(&mut self, tokens: &[u32]) -> (Vec<u32>, Option<BlockHash>) {
        let mut blocks = Vec::new();
        let mut parent = None;
        let reusable = tokens.len().saturating_sub(1) / self.block_size;
        for chunk in tokens.chunks_exact(self.block_size).take(reusable) {
            let hash = block_hash(parent, chunk);
            let Some(&block) = self.cached.get(&hash) else { break };
            let key = BlockKey { parent, tokens: chunk.to_vec() };
            if self.keys[block as usize].as_ref().is_none_or(|(_, k)| *k != key) {
                break;
            }
            self.acquire(block);
            blocks.push(block);
            parent = Some(hash);
        }
        (blocks, parent)
    }

    /// Records that `block`, referenced by the caller, now holds the full block `tokens` after
    /// the block hashed `parent`; returns its hash. If the same content is already cached in
    /// another block, this block stays uncached.
    pub fn register_full(&mut self, block: u32, parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
        debug_assert_eq!(tokens.len(), self.block_size);
        let hash = block_hash(parent, tokens);
        if self.keys[block as usize].is_none() && !self.cached.contains_key(&hash) {
            self.cached.insert(hash, block);
            self.keys[block as usize] = Some((hash, BlockKey { parent, tokens: tokens.to_vec() }));
        }
        hash
    }

    /// References held on each block, for accounting checks.
    pub fn ref_count(&self, block: u32) -> u32 {
        self.ref_counts[block as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn allocate_until_empty_then_reuse() {
        let mut m = BlockManager::new(2, 4);
        let a = m.allocate().expect("a");
        let b = m.allocate().expect("b");
        assert_eq!(m.allocate(), None);
        m.release(a);
        assert_eq!(m.allocate(), Some(a));
        m.release(a);
        m.release(b);
        assert_eq!(m.n_available(), 2);
    }

    #[test]
    #[should_panic(expected = "released with no reference")]
    fn double_free_is_caught() {
        let mut m = BlockManager::new(1, 4);
        let a = m.allocate().expect("a");
        m.release(a);
        m.release(a);
    }

    #[test]
    fn shared_prefixes_share_blocks() {
        let mut m = BlockManager::new(8, 2);
        let prompt = [1, 2, 3, 4, 5];
        // First request computes two full blocks and registers them.
        let b0 = m.allocate().expect("block");
        let b1 = m.allocate().expect("block");
        let h0 = m.register_full(b0, None, &prompt[0..2]);
        m.register_full(b1, Some(h0), &prompt[2..4]);
        // A second request with the same prefix reuses both.
        let (blocks, _) = m.match_prefix(&[1, 2, 3, 4, 9, 9]);
        assert_eq!(blocks, vec![b0, b1]);
        assert_eq!(m.ref_count(b0), 2);
        // A different second block only shares the first.
        let (blocks, _) = m.match_prefix(&[1, 2, 7, 7, 9]);
        assert_eq!(blocks, vec![b0]);
        // The whole prompt is never covered: one token is left to compute.
        let (blocks, _) = m.match_prefix(&[1, 2, 3, 4]);
        assert_eq!(blocks, vec![b0]);
    }

    #[test]
    fn released_cached_blocks_are_evicted_last() {
        let mut m = BlockManager::new(2, 1);
        let a = m.allocate().expect("a");
        m.register_full(a, None, &[7]);
        m.release(a);
        assert_eq!(m.n_available(), 2);
        // The free block goes first; the cached one survives.
        let b = m.allocate().expect("b");
        assert_ne!(a, b);
        assert_eq!(m.match_prefix(&[7, 8]).0, vec![a]);
        m.release(a);
        // Now the cached block is evicted and its content forgotten.
        let c = m.allocate().expect("c");
        assert_eq!(c, a);
        assert!(m.match_prefix(&[7, 8]).0.is_empty());
        m.release(b);
        m.release(c);
        assert_eq!(m.n_available(), 2);
    }

    proptest! {
        /// Any interleaving of allocations, shares and releases keeps the counts consistent,
        /// and releasing every reference makes every block available again.
        #[test]
        fn accounting_balances(ops in proptest::collection::vec((0u8..4, 0usize..16, 0u32..3), 1..200)) {
            let mut m = BlockManager::new(6, 2);
            let mut held: Vec<u32> = Vec::new();
            for (op, idx, tok) in ops {
                match op {
                    0 => if let Some(b) = m.allocate() { held.push(b) },
                    1 if !held.is_empty() => { let b = held.swap_remove(idx % held.len()); m.release(b) }
                    2 if !held.is_empty() => { let b = held[idx % held.len()]; m.register_full(b, None, &[tok, tok]); }
                    _ => { let (blocks, _) = m.match_prefix(&[tok, tok, 0]); held.extend(blocks); }
                }
                let total_refs: u32 = (0..6).map(|b| m.ref_count(b)).sum();
                prop_assert_eq!(total_refs as usize, held.len());
                prop_assert_eq!(m.n_used(), (0..6).filter(|&b| m.ref_count(b) > 0).count());
            }
            for b in held { m.release(b) }
            prop_assert_eq!(m.n_available(), 6);
        }
    }
}
