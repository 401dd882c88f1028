//! Stream buffers made of fixed-size chunks from a per-mux pool.
//!
//! A growing `VecDeque<u8>` copies everything it holds each time it doubles, and freeing it
//! when it drains (so that idle streams cost nothing) makes the next burst grow it again from
//! zero, often through fresh, page-faulting memory. Chunks never move once written, a drained
//! buffer keeps no chunk, and the pool hands recently freed chunks to whichever stream needs
//! one next.

use std::collections::VecDeque;

/// Bytes per chunk.
pub(crate) const CHUNK: usize = 16 * 1024;

/// Free chunks kept for reuse while data is buffered (8 MiB): enough for a few streams with
/// full windows in each direction, so bulk transfers recycle chunks instead of allocating
/// (and zeroing) new ones.
const POOL_MAX: usize = 512;

/// Free chunks kept once nothing is buffered anywhere in the mux: 64 (1 MiB), plus 32 (half a
/// default window) per open stream, so that streams which go quiet between bursts find their
/// chunks again instead of allocating and zeroing new ones.
pub(crate) fn idle_pool_size(streams: usize) -> usize {
    64 + 32 * streams
}

type Chunk = Box<[u8]>;

/// Free chunks shared by the streams of one mux.
#[derive(Debug, Default)]
pub(crate) struct Pool {
    free: Vec<Chunk>,
}

impl Pool {
    fn take(&mut self) -> Chunk {
        self.free
            .pop()
            .unwrap_or_else(|| vec![0u8; CHUNK].into_boxed_slice())
    }

    /// Frees all but `keep` spare chunks.
    pub(crate) fn trim(&mut self, keep: usize) {
        if self.free.len() > keep {
            self.free.truncate(keep);
            self.free.shrink_to(keep);
        }
    }

    fn give(&mut self, chunk: Chunk) {
        // Small first chunks are not pooled: they are sized for one buffer's start.
        if chunk.len() == CHUNK && self.free.len() < POOL_MAX {
            self.free.push(chunk);
        }
    }
}

/// A FIFO byte buffer. Empty, it owns no chunk. A buffer that starts with less than a chunk
/// of data gets a small chunk of its own (a power of two from 256 bytes), so that many
/// streams holding a few unread bytes each do not pin 16 KiB apiece.
#[derive(Debug, Default)]
pub(crate) struct ChunkBuf {
    chunks: VecDeque<Chunk>,
    /// Read offset in the first chunk.
    head: usize,
    /// Write offset in the last chunk.
    tail: usize,
    /// Bytes held.
    len: usize,
}

impl ChunkBuf {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Chunks held (for tests of the memory policy).
    #[cfg(test)]
    pub(crate) fn chunks(&self) -> usize {
        self.chunks.len()
    }

    /// Appends `data`.
    pub(crate) fn push(&mut self, mut data: &[u8], pool: &mut Pool) {
        while !data.is_empty() {
            if let Some(last) = self.chunks.back_mut()
                && self.tail < last.len()
            {
                let take = data.len().min(last.len() - self.tail);
                let (now, rest) = data.split_at(take);
                last[self.tail..self.tail + take].copy_from_slice(now);
                self.tail += take;
                self.len += take;
                data = rest;
                continue;
            }
            let chunk = if self.chunks.is_empty() && data.len() < CHUNK {
                vec![0u8; data.len().next_power_of_two().clamp(256, CHUNK)].into_boxed_slice()
            } else {
                pool.take()
            };
            if self.chunks.is_empty() {
                self.head = 0;
            }
            self.chunks.push_back(chunk);
            self.tail = 0;
        }
    }

    /// Calls `sink` with the first `n` bytes (`n <= len`) in contiguous pieces and removes them.
    fn consume(&mut self, mut n: usize, pool: &mut Pool, mut sink: impl FnMut(&[u8])) {
        n = n.min(self.len);
        while n > 0 {
            let last = self.chunks.len() == 1;
            let Some(first) = self.chunks.front() else {
                break;
            };
            let end = if last { self.tail } else { first.len() };
            let take = n.min(end - self.head);
            sink(&first[self.head..self.head + take]);
            self.head += take;
            self.len -= take;
            n -= take;
            if self.head == end {
                if let Some(chunk) = self.chunks.pop_front() {
                    pool.give(chunk);
                }
                self.head = 0;
            }
        }
        if self.len == 0 {
            // Any chunk left is unused space past the tail.
            while let Some(chunk) = self.chunks.pop_front() {
                pool.give(chunk);
            }
            self.chunks = VecDeque::new();
            self.head = 0;
            self.tail = 0;
        }
    }

    /// Moves up to `out.len()` bytes into `out`; returns how many.
    pub(crate) fn read_into(&mut self, out: &mut [u8], pool: &mut Pool) -> usize {
        let n = out.len().min(self.len);
        let mut at = 0;
        self.consume(n, pool, |piece| {
            out[at..at + piece.len()].copy_from_slice(piece);
            at += piece.len();
        });
        n
    }

    /// Moves the first `n` bytes (`n <= len`) to the end of `out`.
    pub(crate) fn append_to(&mut self, n: usize, out: &mut Vec<u8>, pool: &mut Pool) {
        self.consume(n, pool, |piece| out.extend_from_slice(piece));
    }

    /// Drops everything; returns how many bytes that was.
    pub(crate) fn clear(&mut self, pool: &mut Pool) -> usize {
        let n = self.len;
        self.consume(n, pool, |_| {});
        n
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn behaves_like_a_fifo(ops in proptest::collection::vec((any::<bool>(), 0usize..40_000), 0..60)) {
            let mut pool = Pool::default();
            let mut buf = ChunkBuf::default();
            let mut model = VecDeque::new();
            let mut counter = 0u8;
            for (push, n) in ops {
                if push {
                    let data: Vec<u8> = (0..n).map(|_| { counter = counter.wrapping_add(1); counter }).collect();
                    buf.push(&data, &mut pool);
                    model.extend(data);
                } else if n % 2 == 0 {
                    let mut out = vec![0u8; n];
                    let got = buf.read_into(&mut out, &mut pool);
                    let want: Vec<u8> = model.drain(..got.min(model.len())).collect();
                    prop_assert_eq!(&out[..got], &want[..]);
                    prop_assert_eq!(got, n.min(got + model.len()));
                } else {
                    let take = n.min(buf.len());
                    let mut out = Vec::new();
                    buf.append_to(take, &mut out, &mut pool);
                    let want: Vec<u8> = model.drain(..take).collect();
                    prop_assert_eq!(out, want);
                }
                prop_assert_eq!(buf.len(), model.len());
                prop_assert!(buf.chunks() <= model.len().div_ceil(CHUNK) + 2);
                if model.is_empty() {
                    prop_assert_eq!(buf.chunks(), 0);
                }
            }
        }
    }
}
