//! The engine model's KV cache: a pool of fixed-size blocks kept as vLLM's
//! V1 `BlockPool` keeps them, because the order in which it reuses blocks
//! decides what the prefix cache still holds, and so the hit rate and what a
//! preempted request has to compute again.
//!
//! - A block whose tokens are all computed is *committed* under the hash of
//!   its tokens and everything before them (a chain), prompt and output
//!   alike; a later request whose tokens hash the same reuses it.
//! - A block no request holds stays cached until it is taken for new work.
//!   Freed blocks go back to the free queue: blocks without a hash to its
//!   front (reused first, they can never hit), committed ones to its back,
//!   a request's last block first, so that the oldest and the deepest blocks
//!   of a prefix are evicted first and the head of a shared prefix stays.
//! - New blocks come from the front: the least recently freed committed
//!   block is evicted when no hashless one is left.

use std::collections::{HashMap, VecDeque};

/// One physical KV block.
#[derive(Clone, Debug, Default)]
struct Block {
    /// Requests holding it.
    refs: u32,
    /// The hash it is committed under, once its tokens are all computed.
    hash: Option<u64>,
    /// Bumped whenever it leaves the free queue, so that stale entries of
    /// the queue are skipped (a cached block is taken out of the middle).
    generation: u64,
}

/// The pool of KV blocks and the prefix cache over it.
#[derive(Debug)]
pub struct BlockPool {
    blocks: Vec<Block>,
    /// Blocks no request holds, next to be taken first (each with the
    /// generation it was freed at; stale entries are skipped).
    free: VecDeque<(usize, u64)>,
    free_count: usize,
    /// Committed blocks by hash (a hash computed twice, by two requests
    /// admitted together, may name two blocks).
    cached: HashMap<u64, Vec<usize>>,
    caching: bool,
}

impl BlockPool {
    /// `n` free blocks; `caching` commits full blocks for reuse.
    pub fn new(n: usize, caching: bool) -> Self {
        BlockPool {
            blocks: vec![Block::default(); n],
            free: (0..n).map(|i| (i, 0)).collect(),
            free_count: n,
            cached: HashMap::new(),
            caching,
        }
    }

    /// Blocks in all.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks no request holds (cached ones among them: they can be evicted).
    pub fn free(&self) -> usize {
        self.free_count
    }

    /// Share of the blocks held by requests, 0 to 1 (`vllm:kv_cache_usage_perc`).
    pub fn usage(&self) -> f64 {
        1.0 - self.free_count as f64 / self.blocks.len() as f64
    }

    /// The leading run of `hashes` found in the cache: the blocks a new
    /// request can reuse instead of computing them.
    pub fn lookup(&self, hashes: &[u64]) -> Vec<usize> {
        if !self.caching {
            return Vec::new();
        }
        hashes
            .iter()
            .map_while(|h| self.cached.get(h).and_then(|v| v.first().copied()))
            .collect()
    }

    /// How many of `blocks` nobody holds: reusing them takes them off the
    /// free queue, so they count against the free blocks as new ones do.
    pub fn evictable(&self, blocks: &[usize]) -> usize {
        blocks.iter().filter(|i| self.blocks[**i].refs == 0).count()
    }

    /// Takes cached block `i` for one more holder.
    pub fn reuse(&mut self, i: usize) {
        let block = &mut self.blocks[i];
        if block.refs == 0 {
            block.generation += 1; // its free-queue entry is now stale
            self.free_count -= 1;
        }
        block.refs += 1;
    }

    /// A block for new tokens, from the front of the free queue, evicting
    /// what it cached; `None` when every block is held.
    pub fn allocate(&mut self) -> Option<usize> {
        while let Some((i, generation)) = self.free.pop_front() {
            let block = &mut self.blocks[i];
            if block.refs > 0 || block.generation != generation {
                continue; // taken again from the cache since it was freed
            }
            block.refs = 1;
            block.generation += 1;
            if let Some(h) = block.hash.take() {
                self.uncache(h, i);
            }
            self.free_count -= 1;
            return Some(i);
        }
        None
    }

    /// Commits held block `i` under `hash`: its tokens are all computed.
    pub fn commit(&mut self, i: usize, hash: u64) {
        if !self.caching || self.blocks[i].hash.is_some() {
            return;
        }
        self.blocks[i].hash = Some(hash);
        self.cached.entry(hash).or_default().push(i);
    }

    /// Gives back one request's blocks (in the order it holds them): its
    /// last block first, hashless ones to be reused first, committed ones
    /// to be evicted least recently freed first.
    pub fn release(&mut self, blocks: &[usize]) {
        let mut front = Vec::new();
        for &i in blocks.iter().rev() {
            let block = &mut self.blocks[i];
            block.refs -= 1;
            if block.refs > 0 {
                continue;
            }
            block.generation += 1;
            self.free_count += 1;
            if block.hash.is_some() {
                self.free.push_back((i, block.generation));
            } else {
                front.push((i, block.generation));
            }
        }
        for entry in front.into_iter().rev() {
            self.free.push_front(entry);
        }
    }

    /// Forgets every cached block; `false` (nothing done) while a request
    /// holds blocks, as vLLM's `/reset_prefix_cache` refuses then.
    pub fn reset_prefix_cache(&mut self) -> bool {
        if self.free_count < self.blocks.len() {
            return false;
        }
        for block in &mut self.blocks {
            block.hash = None;
        }
        self.cached.clear();
        true
    }

    /// Every block free and nothing cached (after every holder was dropped).
    pub fn clear(&mut self) {
        *self = BlockPool::new(self.blocks.len(), self.caching);
    }

    fn uncache(&mut self, h: u64, i: usize) {
        if let Some(v) = self.cached.get_mut(&h) {
            v.retain(|b| *b != i);
            if v.is_empty() {
                self.cached.remove(&h);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashless_blocks_are_reused_before_cached_ones_are_evicted() {
        let mut p = BlockPool::new(4, true);
        let a: Vec<usize> = (0..2).map(|_| p.allocate().unwrap()).collect();
        p.commit(a[0], 10);
        // a[1] holds a partial block: no hash.
        p.release(&a);
        assert_eq!(p.free(), 4);
        // a[1] first, then the two never used, before the cached a[0].
        let taken: Vec<usize> = (0..3).map(|_| p.allocate().unwrap()).collect();
        assert_eq!(taken[0], a[1]);
        assert!(!taken.contains(&a[0]), "{taken:?} {a:?}");
        assert_eq!(p.lookup(&[10]), vec![a[0]]);
        assert_eq!(p.allocate(), Some(a[0]));
        assert!(p.lookup(&[10]).is_empty(), "evicted once taken");
    }

    #[test]
    fn a_hashless_block_freed_later_still_goes_before_a_cached_one() {
        let mut p = BlockPool::new(2, true);
        let (x, y) = (p.allocate().unwrap(), p.allocate().unwrap());
        p.commit(x, 10);
        p.release(&[x]);
        p.release(&[y]);
        assert_eq!(p.allocate(), Some(y));
        assert_eq!(p.lookup(&[10]), vec![x], "the cached block stays");
    }

    #[test]
    fn a_requests_last_block_is_evicted_before_its_first() {
        let mut p = BlockPool::new(3, true);
        let a: Vec<usize> = (0..3).map(|_| p.allocate().unwrap()).collect();
        for (k, &i) in a.iter().enumerate() {
            p.commit(i, 100 + k as u64);
        }
        p.release(&a);
        assert_eq!(p.allocate(), Some(a[2]));
        assert_eq!(p.lookup(&[100, 101, 102]), vec![a[0], a[1]]);
    }

    #[test]
    fn a_reused_block_leaves_the_free_queue() {
        let mut p = BlockPool::new(2, true);
        let a = p.allocate().unwrap();
        p.commit(a, 7);
        p.release(&[a]);
        p.reuse(a);
        assert_eq!(p.free(), 1);
        let b = p.allocate().unwrap();
        assert_ne!(a, b);
        assert_eq!(p.allocate(), None, "the reused block is held");
        assert!(!p.reset_prefix_cache(), "blocks are held");
        p.release(&[a, b]);
        assert!(p.reset_prefix_cache());
        assert!(p.lookup(&[7]).is_empty());
    }
}
