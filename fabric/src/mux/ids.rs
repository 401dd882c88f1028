//! The stream-id bitmap (seed 004): one bit per id, lowest free id of this end's space
//! first, no wrap-around.

use super::StreamIds;

/// Number of `u64` words covering every `u16` id.
const WORDS: usize = (u16::MAX as usize + 1) / 64;

/// Which stream ids are in use. Id 0 is reserved and permanently marked used.
#[derive(Debug, Clone)]
pub(crate) struct IdBitmap {
    words: Box<[u64; WORDS]>,
    /// Ids in use, not counting the reserved 0.
    used: u32,
    /// Index of the lowest word that may have a free bit of our space: every word below it
    /// has none.
    hint: usize,
    /// The bits of each word this end allocates.
    ours: u64,
}

impl IdBitmap {
    /// Usable ids: 1 ..= 65535.
    pub(crate) const CAPACITY: u32 = u16::MAX as u32;

    pub(crate) fn new(space: StreamIds) -> Self {
        let mut words = Box::new([0u64; WORDS]);
        words[0] = 1;
        let ours = match space {
            StreamIds::Any => u64::MAX,
            // Bit `b` of a word is id `64 * index + b`: odd ids are the odd bits.
            StreamIds::Odd => 0xAAAA_AAAA_AAAA_AAAA,
            StreamIds::Even => 0x5555_5555_5555_5555,
        };
        Self {
            words,
            used: 0,
            hint: 0,
            ours,
        }
    }

    /// Takes the lowest free id of our space, or `None` when all of them are in use.
    pub(crate) fn alloc(&mut self) -> Option<u16> {
        if self.used >= Self::CAPACITY {
            return None;
        }
        for index in self.hint..WORDS {
            let free = !self.words[index] & self.ours;
            if free != 0 {
                let bit = free.trailing_zeros() as usize;
                self.words[index] |= 1 << bit;
                self.used += 1;
                self.hint = index;
                // `index < 1024` and `bit < 64`, so the id fits in 16 bits.
                return u16::try_from(index * 64 + bit).ok();
            }
        }
        None
    }

    /// Marks `id` used (the peer opened it). Returns false if it already was.
    pub(crate) fn mark(&mut self, id: u16) -> bool {
        let (index, mask) = Self::locate(id);
        if self.words[index] & mask != 0 {
            return false;
        }
        self.words[index] |= mask;
        self.used += 1;
        true
    }

    /// Frees `id` for reuse. Freeing the reserved id 0 or a free id does nothing.
    pub(crate) fn free(&mut self, id: u16) {
        let (index, mask) = Self::locate(id);
        if id == 0 || self.words[index] & mask == 0 {
            return;
        }
        self.words[index] &= !mask;
        self.used -= 1;
        self.hint = self.hint.min(index);
    }

    fn locate(id: u16) -> (usize, u64) {
        (usize::from(id) / 64, 1 << (id % 64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_lowest_first_and_never_zero() {
        let mut ids = IdBitmap::new(StreamIds::Any);
        assert_eq!(ids.alloc(), Some(1));
        assert_eq!(ids.alloc(), Some(2));
        assert!(ids.mark(3));
        assert!(!ids.mark(3));
        assert_eq!(ids.alloc(), Some(4));
        ids.free(2);
        assert_eq!(ids.alloc(), Some(2));
        ids.free(0);
        assert_eq!(ids.alloc(), Some(5));
    }

    #[test]
    fn exhausts_after_65535_then_reuses_freed() {
        let mut ids = IdBitmap::new(StreamIds::Any);
        for expected in 1..=u16::MAX {
            assert_eq!(ids.alloc(), Some(expected));
        }
        assert_eq!(ids.alloc(), None);
        ids.free(40_000);
        assert_eq!(ids.alloc(), Some(40_000));
        assert_eq!(ids.alloc(), None);
    }
}
