//! Ranks as threads of one process, buffers on the host.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::{Communicator, Error, ReduceOp, Result, check_peer, part_len};

/// Element types [`LocalComm`] moves.
pub trait HostElement: Copy + Send + 'static {
    fn reduce(a: Self, b: Self, op: ReduceOp) -> Self;

    /// The value's 32 bits (both element types are 4 bytes), for the wire.
    fn to_bits(self) -> u32;

    fn from_bits(bits: u32) -> Self;
}

impl HostElement for f32 {
    fn reduce(a: f32, b: f32, op: ReduceOp) -> f32 {
        match op {
            ReduceOp::Sum => a + b,
            ReduceOp::Max => a.max(b),
            ReduceOp::Min => a.min(b),
        }
    }

    fn to_bits(self) -> u32 {
        f32::to_bits(self)
    }

    fn from_bits(bits: u32) -> Self {
        f32::from_bits(bits)
    }
}

impl HostElement for u32 {
    fn reduce(a: u32, b: u32, op: ReduceOp) -> u32 {
        match op {
            ReduceOp::Sum => a.wrapping_add(b),
            ReduceOp::Max => a.max(b),
            ReduceOp::Min => a.min(b),
        }
    }

    fn to_bits(self) -> u32 {
        self
    }

    fn from_bits(bits: u32) -> Self {
        bits
    }
}

type Message = Box<dyn Any + Send>;

#[derive(Default)]
struct State {
    generation: u64,
    arrived: usize,
    slots: Vec<Option<Message>>,
    mail: HashMap<(usize, usize), VecDeque<Message>>,
    aborted: Option<usize>,
}

struct Shared {
    world: usize,
    state: Mutex<State>,
    cv: Condvar,
}

/// One rank of a group of threads in this process. Made by [`LocalComm::group`]; move each
/// member to its own thread.
pub struct LocalComm {
    rank: usize,
    shared: Arc<Shared>,
    timeout: Duration,
}

impl std::fmt::Debug for LocalComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalComm(rank {} of {})", self.rank, self.shared.world)
    }
}

impl LocalComm {
    /// A group of `world` ranks; element `r` is rank `r`. A rank waits at most `timeout` for the
    /// others at any collective.
    pub fn group(world: usize, timeout: Duration) -> Vec<LocalComm> {
        assert!(world > 0, "a group has at least one rank");
        let state = State { slots: (0..world).map(|_| None).collect(), ..State::default() };
        let shared = Arc::new(Shared { world, state: Mutex::new(state), cv: Condvar::new() });
        (0..world).map(|rank| LocalComm { rank, shared: shared.clone(), timeout }).collect()
    }

    /// [`LocalComm::group`] as [`Members`] for threads to take.
    pub fn members(world: usize, timeout: Duration) -> Members {
        Members(Mutex::new(Self::group(world, timeout).into_iter().map(Some).collect()))
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.shared.world
    }

    /// Returns when every rank has called it (the same as [`Communicator::barrier`]).
    pub fn barrier(&self) -> Result<()> {
        self.rendezvous("barrier")
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A rank that panicked while holding the lock has aborted the group already (Drop).
        self.shared.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Marks the group failed: every rank waiting now or later gets [`Error::Aborted`].
    pub fn abort(&self) {
        let mut state = self.lock();
        state.aborted.get_or_insert(self.rank);
        self.shared.cv.notify_all();
    }

    /// Waits until every rank has arrived at this point.
    fn rendezvous(&self, op: &'static str) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        let mut state = self.lock();
        if let Some(r) = state.aborted {
            return Err(Error::Aborted(r));
        }
        let generation = state.generation;
        state.arrived += 1;
        if state.arrived == self.shared.world {
            state.arrived = 0;
            state.generation += 1;
            self.shared.cv.notify_all();
            return Ok(());
        }
        loop {
            let now = Instant::now();
            if now >= deadline {
                state.aborted.get_or_insert(self.rank);
                self.shared.cv.notify_all();
                return Err(Error::Timeout { op, rank: self.rank, seconds: self.timeout.as_secs() });
            }
            state = self.shared.cv.wait_timeout(state, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
            if state.generation != generation {
                return Ok(());
            }
            if let Some(r) = state.aborted {
                return Err(Error::Aborted(r));
            }
        }
    }

    /// Publishes `data` in this rank's slot, waits for all ranks, runs `read` over every rank's
    /// data (in rank order), then waits again so no slot is overwritten while being read.
    fn exchange<T: HostElement, R>(
        &self,
        op: &'static str,
        data: &mut [T],
        read: impl FnOnce(&[&Vec<T>], &mut [T]) -> R,
    ) -> Result<R> {
        self.lock().slots[self.rank] = Some(Box::new(data.to_vec()));
        self.rendezvous(op)?;
        let result = {
            let state = self.lock();
            let parts: Vec<&Vec<T>> =
                state.slots.iter().filter_map(|s| s.as_ref().and_then(|m| m.downcast_ref::<Vec<T>>())).collect();
            if parts.len() != self.shared.world || parts.iter().any(|p| p.len() != data.len()) {
                let lens: Vec<usize> = parts.iter().map(|p| p.len()).collect();
                Err(Error::Size { op, detail: format!("ranks passed buffers of lengths {lens:?} (or other types)") })
            } else {
                Ok(read(&parts, data))
            }
        };
        self.rendezvous(op)?;
        result
    }
}

/// The members of a [`LocalComm`] group, each taken once by the thread that will own it.
#[derive(Debug)]
pub struct Members(Mutex<Vec<Option<LocalComm>>>);

impl Members {
    /// Rank `rank`'s member; an error if it was taken already or does not exist.
    pub fn take(&self, rank: usize) -> Result<LocalComm> {
        let mut members = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let world = members.len();
        members.get_mut(rank).and_then(Option::take).ok_or_else(|| Error::Size {
            op: "Members::take",
            detail: format!("rank {rank} of {world} is taken or does not exist"),
        })
    }
}

impl Drop for LocalComm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.abort();
        }
    }
}

impl<T: HostElement> Communicator<[T]> for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        self.exchange("all_reduce", buf, |parts, buf| {
            for (i, out) in buf.iter_mut().enumerate() {
                *out = parts[1..].iter().fold(parts[0][i], |acc, p| T::reduce(acc, p[i], op));
            }
        })
    }

    fn all_gather(&self, buf: &mut [T]) -> Result<()> {
        let n = part_len("all_gather", buf.len(), self.shared.world)?;
        self.exchange("all_gather", buf, |parts, buf| {
            for (r, part) in parts.iter().enumerate() {
                buf[r * n..(r + 1) * n].copy_from_slice(&part[r * n..(r + 1) * n]);
            }
        })
    }

    fn reduce_scatter(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        let n = part_len("reduce_scatter", buf.len(), self.shared.world)?;
        let at = self.rank * n;
        self.exchange("reduce_scatter", buf, |parts, buf| {
            for i in at..at + n {
                buf[i] = parts[1..].iter().fold(parts[0][i], |acc, p| T::reduce(acc, p[i], op));
            }
        })
    }

    fn broadcast(&self, buf: &mut [T], root: usize) -> Result<()> {
        if root >= self.shared.world {
            return Err(Error::Size { op: "broadcast", detail: format!("root {root} of {}", self.shared.world) });
        }
        self.exchange("broadcast", buf, |parts, buf| buf.copy_from_slice(parts[root]))
    }

    fn send(&self, buf: &[T], peer: usize) -> Result<()> {
        check_peer("send", peer, self.rank, self.shared.world)?;
        let mut state = self.lock();
        if let Some(r) = state.aborted {
            return Err(Error::Aborted(r));
        }
        state.mail.entry((self.rank, peer)).or_default().push_back(Box::new(buf.to_vec()));
        self.shared.cv.notify_all();
        Ok(())
    }

    fn recv(&self, buf: &mut [T], peer: usize) -> Result<()> {
        check_peer("recv", peer, self.rank, self.shared.world)?;
        let deadline = Instant::now() + self.timeout;
        let mut state = self.lock();
        loop {
            if let Some(message) = state.mail.get_mut(&(peer, self.rank)).and_then(VecDeque::pop_front) {
                let data = message.downcast::<Vec<T>>().map_err(|_| Error::Size {
                    op: "recv",
                    detail: format!("rank {peer} sent another element type"),
                })?;
                if data.len() != buf.len() {
                    return Err(Error::Size {
                        op: "recv",
                        detail: format!("rank {peer} sent {} elements into a buffer of {}", data.len(), buf.len()),
                    });
                }
                buf.copy_from_slice(&data);
                return Ok(());
            }
            if let Some(r) = state.aborted {
                return Err(Error::Aborted(r));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout { op: "recv", rank: self.rank, seconds: self.timeout.as_secs() });
            }
            state = self.shared.cv.wait_timeout(state, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    fn barrier(&self) -> Result<()> {
        self.rendezvous("barrier")
    }
}
