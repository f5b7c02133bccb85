//! Ranks in several processes (or hosts), buffers on the host, over TCP: the host-side
//! communicator of a job spread over processes (the CPU ranks' collectives, and the GPU ranks'
//! agreements and NCCL id exchange).
//!
//! Rank 0 listens on the master address and every other rank keeps one connection to it (a
//! star): a collective sends each rank's buffer to rank 0, which combines them in rank order
//! (the same bits on every rank, as [`crate::LocalComm`]) and sends the result back. Point-to-
//! point messages go between rank 0 and another rank. Made for control-sized messages and tests,
//! not for bandwidth.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::local::HostElement;
use crate::{Communicator, Error, ReduceOp, Result, check_peer, part_len};

const HELLO: &[u8; 4] = b"FLTC";

/// One rank of a group of processes. Made by [`TcpComm::join`].
pub struct TcpComm {
    rank: usize,
    world: usize,
    /// Rank 0: the connection to rank r at index r (none at 0). Others: the one to rank 0.
    peers: Vec<Option<Mutex<TcpStream>>>,
    /// Clones of the connections, for [`TcpComm::abort`] from any thread (the locked ones may be
    /// blocked in a read).
    handles: Vec<TcpStream>,
    addr: String,
}

impl std::fmt::Debug for TcpComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TcpComm(rank {} of {} via {})", self.rank, self.world, self.addr)
    }
}

fn fail(addr: &str, detail: impl Into<String>) -> Error {
    Error::Bootstrap { addr: addr.to_string(), detail: detail.into() }
}

impl TcpComm {
    /// Rank `rank` of `world` joins the group whose rank 0 listens on `master_addr`
    /// (`HOST:PORT`); returns once rank 0 has every rank. Waits at most `timeout` for the
    /// others, here and at every later collective.
    pub fn join(master_addr: &str, rank: usize, world: usize, timeout: Duration) -> Result<Self> {
        let addr = master_addr.to_string();
        if world == 0 || rank >= world {
            return Err(fail(&addr, format!("rank {rank} of {world}")));
        }
        let mut peers: Vec<Option<Mutex<TcpStream>>> = (0..world).map(|_| None).collect();
        let deadline = Instant::now() + timeout;
        if rank == 0 {
            if world > 1 {
                let listener = TcpListener::bind(&addr).map_err(|e| fail(&addr, format!("cannot listen: {e}")))?;
                listener.set_nonblocking(true).map_err(|e| fail(&addr, e.to_string()))?;
                let mut joined = 1;
                while joined < world {
                    let (mut stream, from) = match listener.accept() {
                        Ok(c) => c,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            if Instant::now() >= deadline {
                                return Err(fail(
                                    &addr,
                                    format!("{joined} of {world} ranks joined within {} s", timeout.as_secs()),
                                ));
                            }
                            std::thread::sleep(Duration::from_millis(10));
                            continue;
                        }
                        Err(e) => return Err(fail(&addr, e.to_string())),
                    };
                    let setup = |s: &TcpStream| {
                        s.set_nonblocking(false)?;
                        s.set_nodelay(true)?;
                        s.set_read_timeout(Some(Duration::from_secs(10)))
                    };
                    setup(&stream).map_err(|e| fail(&addr, e.to_string()))?;
                    let mut hello = [0u8; 12];
                    if stream.read_exact(&mut hello).is_err() || &hello[..4] != HELLO {
                        tracing::warn!(%from, "ignored a connection that did not speak the group protocol");
                        continue;
                    }
                    let r = u32::from_le_bytes([hello[4], hello[5], hello[6], hello[7]]) as usize;
                    let w = u32::from_le_bytes([hello[8], hello[9], hello[10], hello[11]]) as usize;
                    if w != world || r == 0 || r >= world || peers[r].is_some() {
                        let _ = stream.write_all(b"FLNO");
                        return Err(fail(&addr, format!("{from} joined as rank {r} of {w} (group of {world})")));
                    }
                    stream.set_read_timeout(Some(timeout)).map_err(|e| fail(&addr, e.to_string()))?;
                    peers[r] = Some(Mutex::new(stream));
                    joined += 1;
                }
                for p in peers.iter().flatten() {
                    p.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .write_all(HELLO)
                        .map_err(|e| fail(&addr, e.to_string()))?;
                }
            }
        } else {
            let target = addr
                .to_socket_addrs()
                .map_err(|e| fail(&addr, format!("bad address: {e}")))?
                .next()
                .ok_or_else(|| fail(&addr, "the address resolves to nothing"))?;
            let mut stream = loop {
                match TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() >= deadline => {
                        return Err(fail(&addr, format!("rank 0 not reachable within {} s: {e}", timeout.as_secs())));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            };
            stream.set_nodelay(true).map_err(|e| fail(&addr, e.to_string()))?;
            stream.set_read_timeout(Some(timeout)).map_err(|e| fail(&addr, e.to_string()))?;
            let mut hello = HELLO.to_vec();
            hello.extend_from_slice(&(rank as u32).to_le_bytes());
            hello.extend_from_slice(&(world as u32).to_le_bytes());
            stream.write_all(&hello).map_err(|e| fail(&addr, e.to_string()))?;
            let mut ack = [0u8; 4];
            stream.read_exact(&mut ack).map_err(|e| fail(&addr, format!("no answer from rank 0: {e}")))?;
            if &ack != HELLO {
                return Err(fail(&addr, "rank 0 refused this rank (wrong group size or rank taken)"));
            }
            peers[0] = Some(Mutex::new(stream));
        }
        let handles = peers
            .iter()
            .flatten()
            .map(|p| p.lock().unwrap_or_else(|e| e.into_inner()).try_clone())
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| fail(&addr, e.to_string()))?;
        Ok(TcpComm { rank, world, peers, handles, addr })
    }

    /// Makes this rank's pending and later operations fail (and, on rank 0, every other rank's).
    pub fn abort(&self) {
        for h in &self.handles {
            let _ = h.shutdown(Shutdown::Both);
        }
    }

    fn stream(&self, op: &'static str, peer: usize) -> Result<std::sync::MutexGuard<'_, TcpStream>> {
        self.peers
            .get(peer)
            .and_then(Option::as_ref)
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
            .ok_or_else(|| Error::Size { op, detail: format!("rank {} has no link to rank {peer}", self.rank) })
    }

    fn io(&self, op: &'static str, peer: usize, e: std::io::Error) -> Error {
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                Error::Timeout { op, rank: self.rank, seconds: 0 }
            }
            _ => fail(&self.addr, format!("{op}: rank {} and rank {peer}: {e}", self.rank)),
        }
    }

    fn write<T: HostElement>(&self, op: &'static str, peer: usize, data: &[T]) -> Result<()> {
        let mut bytes = Vec::with_capacity(8 + 4 * data.len());
        bytes.extend_from_slice(&(data.len() as u64).to_le_bytes());
        for &v in data {
            bytes.extend_from_slice(&v.to_bits().to_le_bytes());
        }
        self.stream(op, peer)?.write_all(&bytes).map_err(|e| self.io(op, peer, e))
    }

    fn read<T: HostElement>(&self, op: &'static str, peer: usize, out: &mut [T]) -> Result<()> {
        let mut stream = self.stream(op, peer)?;
        let mut len = [0u8; 8];
        stream.read_exact(&mut len).map_err(|e| self.io(op, peer, e))?;
        let len = u64::from_le_bytes(len) as usize;
        if len != out.len() {
            return Err(Error::Size {
                op,
                detail: format!("rank {peer} sent {len} elements into a buffer of {}", out.len()),
            });
        }
        let mut bytes = vec![0u8; 4 * len];
        stream.read_exact(&mut bytes).map_err(|e| self.io(op, peer, e))?;
        for (v, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *v = T::from_bits(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        }
        Ok(())
    }

    /// Rank 0 collects every rank's `buf` (rank order), `combine`s them into `buf` and sends
    /// the result back; the others send theirs and receive the result.
    fn through_root<T: HostElement>(
        &self,
        op: &'static str,
        buf: &mut [T],
        combine: impl FnOnce(&[Vec<T>], &mut [T]),
    ) -> Result<()> {
        if self.rank != 0 {
            self.write(op, 0, buf)?;
            return self.read(op, 0, buf);
        }
        let mut parts = vec![buf.to_vec()];
        for r in 1..self.world {
            let mut part = buf.to_vec();
            self.read(op, r, &mut part)?;
            parts.push(part);
        }
        combine(&parts, buf);
        for r in 1..self.world {
            self.write(op, r, buf)?;
        }
        Ok(())
    }
}

impl<T: HostElement> Communicator<[T]> for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        self.through_root("all_reduce", buf, |parts, out| {
            for (i, o) in out.iter_mut().enumerate() {
                *o = parts[1..].iter().fold(parts[0][i], |acc, p| T::reduce(acc, p[i], op));
            }
        })
    }

    fn all_gather(&self, buf: &mut [T]) -> Result<()> {
        let n = part_len("all_gather", buf.len(), self.world)?;
        self.through_root("all_gather", buf, |parts, out| {
            for (r, part) in parts.iter().enumerate() {
                out[r * n..(r + 1) * n].copy_from_slice(&part[r * n..(r + 1) * n]);
            }
        })
    }

    fn reduce_scatter(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        part_len("reduce_scatter", buf.len(), self.world)?;
        // Every part reduced (the others' parts are allowed to be anything).
        Communicator::<[T]>::all_reduce(self, buf, op)
    }

    fn broadcast(&self, buf: &mut [T], root: usize) -> Result<()> {
        if root >= self.world {
            return Err(Error::Size { op: "broadcast", detail: format!("root {root} of {}", self.world) });
        }
        self.through_root("broadcast", buf, |parts, out| out.copy_from_slice(&parts[root]))
    }

    fn send(&self, buf: &[T], peer: usize) -> Result<()> {
        check_peer("send", peer, self.rank, self.world)?;
        if self.rank != 0 && peer != 0 {
            return Err(Error::Size {
                op: "send",
                detail: format!("rank {} to rank {peer}: over TCP, messages go to or from rank 0", self.rank),
            });
        }
        self.write("send", peer, buf)
    }

    fn recv(&self, buf: &mut [T], peer: usize) -> Result<()> {
        check_peer("recv", peer, self.rank, self.world)?;
        if self.rank != 0 && peer != 0 {
            return Err(Error::Size {
                op: "recv",
                detail: format!("rank {} from rank {peer}: over TCP, messages go to or from rank 0", self.rank),
            });
        }
        self.read("recv", peer, buf)
    }

    fn barrier(&self) -> Result<()> {
        let mut token = [0u32];
        self.through_root("barrier", &mut token, |_, _| {})
    }
}
