//! Issue 22: no allocation per frame on the data path. A counting allocator watches the session's
//! byte queue take a socket read (`push_with`, as the replay buffer does for every stream write)
//! and give a socket write (`read_with`, as a stream's receive queue does), once the process's
//! chunk pool is warm. Only the test's own thread is counted: the test harness's thread may
//! allocate meanwhile (CI caught 4 allocations once, on a busy machine: its first wait on a
//! channel, late).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use holdfast::proto::buffer::ByteQueue;

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// True on the thread whose allocations are counted (a const initialiser: no allocation).
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

// SAFETY: every call is passed on to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTED.try_with(Cell::get).unwrap_or(false) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn filling_and_draining_the_byte_queue_allocates_nothing_once_warm() {
    let mut q = ByteQueue::new();
    let data = vec![7u8; 256 * 1024];
    let mut sink = vec![0u8; 256 * 1024];
    let mut cycle = |q: &mut ByteQueue| {
        // A 256 KiB "socket read" straight into the queue's chunks, starting mid-chunk.
        let n = q
            .push_with(256 * 1024 + 5, |bufs| {
                let mut at = 0;
                for b in bufs.iter_mut() {
                    let k = b.len().min(data.len() - at);
                    b[..k].copy_from_slice(&data[at..at + k]);
                    at += k;
                }
                Ok::<_, ()>(at)
            })
            .unwrap();
        // ... and "socket writes" straight out of them until it is empty.
        let mut out = 0;
        while !q.is_empty() {
            out += q
                .read_with(|bufs| {
                    let mut at = 0;
                    for b in bufs {
                        sink[at..at + b.len()].copy_from_slice(b);
                        at += b.len();
                    }
                    Ok::<_, ()>(at)
                })
                .unwrap();
        }
        assert_eq!(out, n);
        n
    };
    for _ in 0..4 {
        cycle(&mut q); // warms the chunk pool and the queue's own vectors
    }
    COUNTED.with(|c| c.set(true));
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let mut moved = 0;
    for _ in 0..200 {
        moved += cycle(&mut q);
    }
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
    COUNTED.with(|c| c.set(false));
    assert_eq!(allocations, 0, "{allocations} allocations while moving {moved} bytes through the queue");
}
