//! A queue of plaintext bytes in fixed-size chunks, addressed by absolute stream offset.
//!
//! Used for the replay buffer (bytes written by the program and kept until the peer
//! acknowledges them) and for the receive buffer (bytes decrypted and not yet read). Released
//! chunks are zeroized before they are reused or freed, and a small pool of spare chunks keeps
//! the data path free of per-frame allocations.

use std::collections::VecDeque;
use std::sync::Mutex;

use zeroize::Zeroize;

/// Bytes per chunk. Equal to the largest DATA payload so a frame never spans more than two.
pub const CHUNK: usize = 16 * 1024;
/// Most buffers one [`ByteQueue::push_with`] hands out: the free end of the last chunk and up
/// to 17 new chunks, enough for a 256 KiB socket read that starts mid-chunk.
pub const MAX_IOV: usize = 18;
/// Spare chunks a queue keeps for itself.
const MAX_SPARE: usize = 4;
/// Wiped chunks kept for reuse by every queue of the process (4 MiB). A bulk transfer cycles
/// through hundreds of chunks a second; without the pool each one was a fresh zeroed
/// allocation, often with page faults, which cost more CPU than the copies themselves. Idle
/// sessions hand their spares back here, so they hold no buffer memory of their own.
const MAX_POOLED: usize = 256;

static POOL: Mutex<Vec<Chunk>> = Mutex::new(Vec::new());

fn pool() -> std::sync::MutexGuard<'static, Vec<Chunk>> {
    POOL.lock().unwrap_or_else(|p| p.into_inner())
}

/// One chunk of plaintext. Stored as words so that wiping it costs one volatile write per
/// eight bytes instead of one per byte (wiping is on the data path). Wiped on release and drop.
struct Chunk {
    words: Box<[u64]>,
    len: usize,
}

impl Chunk {
    fn new() -> Self {
        Chunk { words: vec![0u64; CHUNK / 8].into_boxed_slice(), len: 0 }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice::<u64, u8>(&self.words)[..self.len]
    }

    /// The unused space after the held bytes.
    fn free_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut::<u64, u8>(&mut self.words)[self.len..]
    }

    fn append(&mut self, data: &[u8]) -> usize {
        let n = (CHUNK - self.len).min(data.len());
        bytemuck::cast_slice_mut::<u64, u8>(&mut self.words)[self.len..self.len + n].copy_from_slice(&data[..n]);
        self.len += n;
        n
    }

    fn wipe(&mut self) {
        let used = self.len.div_ceil(8);
        self.words[..used].zeroize();
        self.len = 0;
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        self.wipe();
    }
}

/// Zeroes plaintext left in a buffer the queues do not own (the driver's read buffer after a
/// record was decrypted in place): one volatile store per aligned word (and per byte only at
/// the unaligned ends), eight times fewer than zeroizing the bytes.
pub(crate) fn wipe_bytes(b: &mut [u8]) {
    let (head, words, tail) = bytemuck::pod_align_to_mut::<u8, u64>(b);
    head.zeroize();
    words.zeroize();
    tail.zeroize();
}

/// Puts a wiped chunk in the process-wide pool, or frees it if the pool is full.
fn give_back(c: Chunk) {
    debug_assert_eq!(c.len, 0);
    let mut p = pool();
    if p.len() < MAX_POOLED {
        p.push(c);
    }
}

/// Chunked byte queue. Every chunk but the last is full, so the chunk holding any offset is
/// found by arithmetic.
#[derive(Default)]
pub struct ByteQueue {
    /// Absolute offset of byte 0 of the first chunk.
    chunk_base: u64,
    /// Absolute offset of the first byte still held (>= `chunk_base`).
    start: u64,
    /// Absolute offset one past the last byte held.
    end: u64,
    chunks: VecDeque<Chunk>,
    spare: Vec<Chunk>,
}

impl std::fmt::Debug for ByteQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ByteQueue").field("start", &self.start).field("end", &self.end).finish()
    }
}

impl ByteQueue {
    /// An empty queue whose next byte has offset 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Offset of the first byte held.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Offset one past the last byte held.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        (self.end - self.start) as usize
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// Appends all of `data`. The caller bounds the size.
    pub fn push(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let need_new = self.chunks.back().is_none_or(|c| c.len() == CHUNK);
            if need_new {
                if self.chunks.is_empty() {
                    self.chunk_base = self.end;
                    self.start = self.end;
                }
                let chunk = self.spare.pop().or_else(|| pool().pop()).unwrap_or_else(Chunk::new);
                self.chunks.push_back(chunk);
            }
            let Some(last) = self.chunks.back_mut() else { return };
            let n = last.append(data);
            self.end += n as u64;
            data = &data[n..];
        }
    }

    /// Appends up to `max` bytes that `fill` writes straight into the queue's free space, given
    /// as a list of buffers (for a vectored socket read), and returns what `fill` returned.
    /// `fill` returns how many bytes it wrote, from the first buffer on. With this a driver reads
    /// a socket into the queue with no intermediate buffer.
    ///
    /// # Errors
    /// `fill`'s error; nothing is appended then.
    pub fn push_with<E>(
        &mut self,
        max: usize,
        fill: impl FnOnce(&mut [std::io::IoSliceMut<'_>]) -> Result<usize, E>,
    ) -> Result<usize, E> {
        if self.chunks.is_empty() {
            self.chunk_base = self.end;
            self.start = self.end;
        }
        let tail_free = self.chunks.back().map_or(0, |c| CHUNK - c.len());
        // No allocation per call: the new chunks and the list of buffers live in arrays, so a
        // call takes at most `MAX_IOV - 1` new chunks (a larger `max` is cut to what they hold).
        let max = max.min(tail_free + (MAX_IOV - 1) * CHUNK);
        let want = max.saturating_sub(tail_free).div_ceil(CHUNK);
        let mut extra: [Option<Chunk>; MAX_IOV - 1] = std::array::from_fn(|i| {
            (i < want).then(|| self.spare.pop().or_else(|| pool().pop()).unwrap_or_else(Chunk::new))
        });
        let res = {
            let mut bufs: [std::io::IoSliceMut<'_>; MAX_IOV] =
                std::array::from_fn(|_| std::io::IoSliceMut::new(&mut []));
            let (mut used, mut room) = (0, max);
            if let Some(tail) = self.chunks.back_mut().filter(|_| tail_free > 0) {
                let f = tail.free_mut();
                let k = f.len().min(room);
                room -= k;
                bufs[used] = std::io::IoSliceMut::new(&mut f[..k]);
                used += 1;
            }
            for c in extra.iter_mut().flatten() {
                let f = c.free_mut();
                let k = f.len().min(room);
                room -= k;
                bufs[used] = std::io::IoSliceMut::new(&mut f[..k]);
                used += 1;
            }
            fill(&mut bufs[..used])
        };
        let mut left = *res.as_ref().unwrap_or(&0);
        if let Some(tail) = self.chunks.back_mut().filter(|_| tail_free > 0) {
            let k = left.min(tail_free);
            tail.len += k;
            left -= k;
        }
        let n = res.as_ref().map_or(0, |n| *n);
        for mut c in extra.into_iter().flatten() {
            let k = left.min(CHUNK);
            if k > 0 {
                c.len = k;
                left -= k;
                self.chunks.push_back(c);
            } else if self.spare.len() < MAX_SPARE {
                self.spare.push(c);
            } else {
                give_back(c);
            }
        }
        self.end += (n - left) as u64;
        res.map(|_| n - left)
    }

    /// Hands the held bytes from the front, as a list of buffers (for a vectored socket
    /// write), to `drain`, which returns how many it consumed; those are released.
    ///
    /// # Errors
    /// `drain`'s error; nothing is released then.
    pub fn read_with<E>(
        &mut self,
        drain: impl FnOnce(&[std::io::IoSlice<'_>]) -> Result<usize, E>,
    ) -> Result<usize, E> {
        let n = {
            let mut bufs: [std::io::IoSlice<'_>; 16] = [std::io::IoSlice::new(&[]); 16];
            let (mut used, mut off) = (0, self.start);
            while off < self.end && used < bufs.len() {
                let s = self.slice_from(off, CHUNK);
                off += s.len() as u64;
                bufs[used] = std::io::IoSlice::new(s);
                used += 1;
            }
            drain(&bufs[..used])?
        };
        let n = n.min(self.len());
        self.release_to(self.start + n as u64);
        Ok(n)
    }

    /// The contiguous bytes held from `offset` to the end of its chunk, at most `max`.
    /// Empty if `offset` is outside the held range.
    pub fn slice_from(&self, offset: u64, max: usize) -> &[u8] {
        if offset < self.start || offset >= self.end {
            return &[];
        }
        let rel = (offset - self.chunk_base) as usize;
        let Some(chunk) = self.chunks.get(rel / CHUNK) else { return &[] };
        let from = rel % CHUNK;
        let to = chunk.len().min(from + max);
        &chunk.bytes()[from..to]
    }

    /// Drops (and zeroizes) every byte below `offset`.
    pub fn release_to(&mut self, offset: u64) {
        let offset = offset.min(self.end);
        if offset <= self.start {
            return;
        }
        self.start = offset;
        while let Some(front) = self.chunks.front() {
            let front_end = self.chunk_base + front.len() as u64;
            if front_end > offset {
                break;
            }
            if let Some(mut c) = self.chunks.pop_front() {
                c.wipe();
                if self.spare.len() < MAX_SPARE {
                    self.spare.push(c);
                } else {
                    give_back(c);
                }
            }
            self.chunk_base = front_end;
        }
        if self.chunks.is_empty() {
            self.chunk_base = self.end;
            // Empty: keep nothing. An idle session then holds no buffer memory, and a busy one
            // takes its chunks back from the pool.
            self.shrink();
        }
    }

    /// Copies bytes from the front into `buf` and releases them. Returns the count.
    pub fn read_into(&mut self, buf: &mut [u8]) -> usize {
        let mut n = 0;
        while n < buf.len() && !self.is_empty() {
            let s = self.slice_from(self.start, buf.len() - n);
            let k = s.len();
            buf[n..n + k].copy_from_slice(s);
            n += k;
            self.release_to(self.start + k as u64);
        }
        n
    }

    /// Advances an empty queue's offsets by `n` without holding the bytes (they were handed
    /// on elsewhere, for example to a stream's own queue).
    pub fn skip(&mut self, n: u64) {
        debug_assert!(self.is_empty());
        self.end += n;
        self.start = self.end;
        self.chunk_base = self.end;
    }

    /// Hands the spare chunks back to the process-wide pool (for idle sessions).
    pub fn shrink(&mut self) {
        for c in self.spare.drain(..) {
            give_back(c);
        }
    }
}

impl Drop for ByteQueue {
    fn drop(&mut self) {
        for mut c in self.chunks.drain(..) {
            c.wipe();
            give_back(c);
        }
        self.shrink();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn slices_follow_offsets_across_chunks() {
        let mut q = ByteQueue::new();
        let data: Vec<u8> = (0..CHUNK * 3 + 100).map(|i| i as u8).collect();
        q.push(&data);
        assert_eq!(q.len(), data.len());
        assert_eq!(q.slice_from(5, 10), &data[5..15]);
        assert_eq!(q.slice_from(CHUNK as u64 - 3, 100), &data[CHUNK - 3..CHUNK]);
        q.release_to(CHUNK as u64 + 7);
        assert_eq!(q.start(), CHUNK as u64 + 7);
        assert_eq!(q.slice_from(3, 10), b"");
        assert_eq!(q.slice_from(CHUNK as u64 + 7, 4), &data[CHUNK + 7..CHUNK + 11]);
        q.release_to(q.end());
        assert!(q.is_empty());
        q.push(b"xyz");
        assert_eq!(q.slice_from(q.start(), 10), b"xyz");
        assert_eq!(q.start(), data.len() as u64);
    }

    #[test]
    fn vectored_fill_and_drain_keep_the_bytes_in_order() {
        let mut q = ByteQueue::new();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut fed = 0;
        let mut got = Vec::new();
        for (i, max) in [5usize, 16_384, 40_000, 100_000, 7, 70_000].iter().cycle().enumerate() {
            if fed == data.len() {
                break;
            }
            let n = q
                .push_with(*max, |bufs| {
                    let mut k = 0;
                    for b in bufs.iter_mut() {
                        let m = b.len().min(data.len() - fed - k).min(*max / 2 + 1);
                        b[..m].copy_from_slice(&data[fed + k..fed + k + m]);
                        k += m;
                        if m < b.len() {
                            break;
                        }
                    }
                    Ok::<_, ()>(k)
                })
                .unwrap();
            fed += n;
            assert_eq!(q.end(), fed as u64);
            if i % 2 == 1 {
                q.read_with(|bufs| {
                    let mut k = 0;
                    for b in bufs {
                        got.extend_from_slice(b);
                        k += b.len();
                    }
                    Ok::<_, ()>(k)
                })
                .unwrap();
            }
        }
        assert_eq!(q.push_with(10, |_| Err::<usize, _>("boom")), Err("boom"));
        while !q.is_empty() {
            q.read_with(|bufs| {
                got.extend_from_slice(&bufs[0][..3.min(bufs[0].len())]);
                Ok::<_, ()>(3.min(bufs[0].len()))
            })
            .unwrap();
        }
        assert_eq!(got, data);
    }

    proptest! {
        /// Any interleaving of pushes and reads yields the bytes in order.
        #[test]
        fn reads_return_what_was_pushed(ops in proptest::collection::vec((0usize..40000, 1usize..40000), 1..30)) {
            let mut q = ByteQueue::new();
            let mut expect = Vec::new();
            let mut got = Vec::new();
            let mut k = 0u8;
            for (push, read) in ops {
                let data: Vec<u8> = (0..push).map(|_| { k = k.wrapping_add(13); k }).collect();
                q.push(&data);
                expect.extend_from_slice(&data);
                let mut buf = vec![0; read];
                let n = q.read_into(&mut buf);
                got.extend_from_slice(&buf[..n]);
            }
            let mut buf = vec![0; q.len()];
            let n = q.read_into(&mut buf);
            got.extend_from_slice(&buf[..n]);
            prop_assert_eq!(got, expect);
        }
    }
}
