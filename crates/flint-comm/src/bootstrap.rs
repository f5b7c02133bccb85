//! Handing a communicator's unique id from node 0 to the other nodes of a job over TCP.
//!
//! Node 0 listens on the master address and answers each other node once; the others connect
//! (retrying until node 0 is up or the timeout passes), say who they are, and receive the id.
//! Every mismatch (another node count, a node rank given twice or out of range, a stranger on
//! the port) is an error on both sides, never a hang.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::{Error, Result};

const HELLO: &[u8; 4] = b"FLNT";
const REFUSED: &[u8; 4] = b"FLNO";

/// Where and how the nodes of a job meet.
#[derive(Clone, Debug)]
pub struct Rendezvous {
    /// `HOST:PORT` node 0 listens on and the others connect to.
    pub master_addr: String,
    pub node_rank: usize,
    pub nnodes: usize,
    pub timeout: Duration,
}

fn fail(addr: &str, detail: impl Into<String>) -> Error {
    Error::Bootstrap { addr: addr.to_string(), detail: detail.into() }
}

impl Rendezvous {
    /// Node 0: makes the id with `make_id` and serves it to the other `nnodes - 1` nodes, then
    /// returns it. Other nodes: fetch it from node 0.
    pub fn share_id(&self, make_id: impl FnOnce() -> Result<[u8; 128]>) -> Result<[u8; 128]> {
        if self.nnodes == 0 || self.node_rank >= self.nnodes {
            return Err(fail(&self.master_addr, format!("node rank {} of {} nodes", self.node_rank, self.nnodes)));
        }
        if self.node_rank == 0 { self.serve(make_id()?) } else { self.fetch() }
    }

    fn serve(&self, id: [u8; 128]) -> Result<[u8; 128]> {
        let addr = &self.master_addr;
        if self.nnodes == 1 {
            return Ok(id);
        }
        let listener = TcpListener::bind(addr).map_err(|e| fail(addr, format!("cannot listen: {e}")))?;
        listener.set_nonblocking(true).map_err(|e| fail(addr, e.to_string()))?;
        let deadline = Instant::now() + self.timeout;
        let mut served = HashSet::new();
        while served.len() < self.nnodes - 1 {
            let (mut stream, peer) = match listener.accept() {
                Ok(conn) => conn,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(fail(
                            addr,
                            format!(
                                "{} of {} nodes joined within {} s",
                                served.len() + 1,
                                self.nnodes,
                                self.timeout.as_secs()
                            ),
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Err(e) => return Err(fail(addr, e.to_string())),
            };
            stream.set_nonblocking(false).map_err(|e| fail(addr, e.to_string()))?;
            stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| fail(addr, e.to_string()))?;
            let mut hello = [0u8; 12];
            if stream.read_exact(&mut hello).is_err() || &hello[..4] != HELLO {
                tracing::warn!(%peer, "ignored a connection that did not speak the bootstrap protocol");
                continue;
            }
            let rank = u32::from_le_bytes([hello[4], hello[5], hello[6], hello[7]]) as usize;
            let nnodes = u32::from_le_bytes([hello[8], hello[9], hello[10], hello[11]]) as usize;
            let problem = if nnodes != self.nnodes {
                Some(format!("node {rank} ({peer}) was started with {nnodes} nodes, node 0 with {}", self.nnodes))
            } else if rank == 0 || rank >= self.nnodes {
                Some(format!("node {peer} claims node rank {rank} of {nnodes}"))
            } else if served.contains(&rank) {
                Some(format!("node rank {rank} joined twice (second from {peer})"))
            } else {
                None
            };
            if let Some(problem) = problem {
                let _ = stream.write_all(REFUSED).and_then(|()| stream.write_all(problem.as_bytes()));
                return Err(fail(addr, problem));
            }
            stream.write_all(HELLO).and_then(|()| stream.write_all(&id)).map_err(|e| fail(addr, e.to_string()))?;
            served.insert(rank);
        }
        Ok(id)
    }

    fn fetch(&self) -> Result<[u8; 128]> {
        let addr = &self.master_addr;
        let deadline = Instant::now() + self.timeout;
        let target = addr
            .to_socket_addrs()
            .map_err(|e| fail(addr, format!("bad address: {e}")))?
            .next()
            .ok_or_else(|| fail(addr, "the address resolves to nothing"))?;
        let mut stream = loop {
            match TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(fail(addr, format!("node 0 not reachable within {} s: {e}", self.timeout.as_secs())));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        stream.set_read_timeout(Some(self.timeout)).map_err(|e| fail(addr, e.to_string()))?;
        let mut hello = HELLO.to_vec();
        hello.extend_from_slice(&(self.node_rank as u32).to_le_bytes());
        hello.extend_from_slice(&(self.nnodes as u32).to_le_bytes());
        stream.write_all(&hello).map_err(|e| fail(addr, e.to_string()))?;
        let mut tag = [0u8; 4];
        stream.read_exact(&mut tag).map_err(|e| fail(addr, format!("no answer from node 0: {e}")))?;
        if &tag == REFUSED {
            let mut why = String::new();
            let _ = stream.read_to_string(&mut why);
            return Err(fail(addr, format!("node 0 refused this node: {why}")));
        }
        if &tag != HELLO {
            return Err(fail(addr, "the peer does not speak the bootstrap protocol"));
        }
        let mut id = [0u8; 128];
        stream.read_exact(&mut id).map_err(|e| fail(addr, format!("truncated id: {e}")))?;
        Ok(id)
    }
}
