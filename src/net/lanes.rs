//! Lanes: threads that each run a single-threaded runtime, on which a server runs whole
//! sessions. A session's driver, the tasks that serve its streams and the connections they make
//! all run on one lane, so the bytes of a session never wait for another thread to wake: on a
//! runtime with a worker per CPU, a stream's socket read and the driver that seals what it read
//! often ran on different workers, and each hand-over cost a wake-up of the other thread. The
//! sessions are spread over the lanes, each new one to the lane with the fewest.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::runtime::Handle;

/// A set of lanes (see the module's text). Cloning shares them; the threads live as long as
/// the process (they wait for work and cost nothing while idle).
#[derive(Clone)]
pub struct Lanes {
    lanes: Arc<[Lane]>,
}

struct Lane {
    handle: Handle,
    /// Sessions running on this lane now.
    sessions: AtomicUsize,
}

impl std::fmt::Debug for Lanes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lanes").field("lanes", &self.lanes.len()).finish()
    }
}

impl Lanes {
    /// Starts `n` lanes (at least one), each a thread named `holdfast-lane-N` running a
    /// single-threaded tokio runtime with I/O and timers.
    ///
    /// # Errors
    /// A runtime or a thread could not be made (the threads already started stay idle).
    pub fn start(n: usize) -> io::Result<Self> {
        let mut lanes = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let handle = rt.handle().clone();
            std::thread::Builder::new()
                .name(format!("holdfast-lane-{i}"))
                .spawn(move || rt.block_on(std::future::pending::<()>()))?;
            lanes.push(Lane { handle, sessions: AtomicUsize::new(0) });
        }
        Ok(Lanes { lanes: lanes.into() })
    }

    /// The number of lanes.
    pub fn len(&self) -> usize {
        self.lanes.len()
    }

    /// Never true: there is at least one lane.
    pub fn is_empty(&self) -> bool {
        self.lanes.is_empty()
    }

    /// The lane with the fewest sessions, counted as holding one more until the returned
    /// [`Seat`] is dropped.
    pub(crate) fn seat(&self) -> Seat {
        let index = (0..self.lanes.len()).min_by_key(|&i| self.lanes[i].sessions.load(Ordering::Relaxed)).unwrap_or(0);
        self.lanes[index].sessions.fetch_add(1, Ordering::Relaxed);
        Seat { lanes: self.lanes.clone(), index }
    }

    /// The sessions on each lane now.
    pub fn sessions(&self) -> Vec<usize> {
        self.lanes.iter().map(|l| l.sessions.load(Ordering::Relaxed)).collect()
    }
}

/// One session's place on a lane: the lane counts it until this is dropped.
pub(crate) struct Seat {
    lanes: Arc<[Lane]>,
    index: usize,
}

impl Seat {
    /// The runtime of this seat's lane.
    pub(crate) fn handle(&self) -> &Handle {
        &self.lanes[self.index].handle
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.lanes[self.index].sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Registers `sock`, made on another runtime (the listener's), with the runtime of the task
/// that calls this, so that its readiness wakes that task on its own thread.
///
/// # Errors
/// The socket could not be taken off its old runtime or put on this one.
pub(crate) fn rehome(sock: tokio::net::TcpStream) -> io::Result<tokio::net::TcpStream> {
    tokio::net::TcpStream::from_std(sock.into_std()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_go_to_the_emptiest_lane_and_leave_with_their_seat() {
        let lanes = Lanes::start(2).unwrap();
        let a = lanes.seat();
        let b = lanes.seat();
        assert_ne!(a.index, b.index);
        assert_eq!(lanes.sessions(), vec![1, 1]);
        let c = lanes.seat();
        assert_eq!(lanes.sessions().iter().sum::<usize>(), 3);
        drop(a);
        drop(c);
        assert_eq!(lanes.sessions().iter().sum::<usize>(), 1);
        let d = lanes.seat();
        assert_ne!(d.index, b.index, "the emptier lane takes the new session");
    }

    #[test]
    fn a_task_on_a_lane_runs_on_the_lanes_thread() {
        let lanes = Lanes::start(1).unwrap();
        let seat = lanes.seat();
        let (tx, rx) = std::sync::mpsc::channel();
        seat.handle().spawn(async move {
            let inner = tokio::spawn(async { std::thread::current().name().map(str::to_owned) });
            let _ = tx.send((std::thread::current().name().map(str::to_owned), inner.await.ok().flatten()));
        });
        let (outer, inner) = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        assert_eq!(outer.as_deref(), Some("holdfast-lane-0"));
        assert_eq!(inner.as_deref(), Some("holdfast-lane-0"), "what a session's task spawns stays on its lane");
    }
}
