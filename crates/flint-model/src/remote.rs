//! Ranks of a group that live in other processes (or hosts): `flint serve --nnodes M`.
//!
//! Node 0 (the leader) runs the engine and a [`TpGroup`] whose local ranks are threads and whose
//! other ranks are [`RemoteRank`] proxies; each proxy hands its step to a rank thread of a
//! follower node over a control connection and waits for it to finish ([`follow`]). The ranks
//! meet in their collectives as usual ([`TcpComm`] on the CPU, NCCL on GPUs), so a step costs
//! the leader one control message per remote rank.
//!
//! Control messages: a kind byte, a little-endian u64 length, the payload. A follower opens with
//! `FLRK`, its rank and its [`RankInfo`] (JSON); the leader sends steps (`ForwardBatch` as
//! JSON) and cache requests; the follower answers each with its logits or its error.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flint_tensor::DType;

use flint_comm::TcpComm;
use flint_tensor::Backend;

use crate::tp::{CpuRank, RankInfo, RankModel, TpGroup};
use crate::{Error, ForwardBatch, Llama, ModelConfig, ModelSource, Result, Shard};

const HELLO: &[u8; 4] = b"FLRK";
const FORWARD: u8 = 1;
const NEW_KV_CACHE: u8 = 2;
const OK: u8 = 3;
const FAILED: u8 = 4;
/// Largest control message (a step's batch as JSON, or logits).
const MAX_MESSAGE: u64 = 1 << 32;

fn link(detail: impl Into<String>) -> Error {
    Error::Sharding(format!("remote rank: {}", detail.into()))
}

/// The control address of a job: the master address's port plus one (the master port itself
/// carries the ranks' host collectives).
pub fn control_addr(master_addr: &str) -> Result<String> {
    let (host, port) = master_addr.rsplit_once(':').ok_or_else(|| link(format!("{master_addr:?} is not HOST:PORT")))?;
    let port: u16 = port.parse().map_err(|_| link(format!("{master_addr:?}: bad port")))?;
    let next = port.checked_add(1).ok_or_else(|| link(format!("{master_addr:?}: no port after {port}")))?;
    Ok(format!("{host}:{next}"))
}

fn write_message(stream: &mut TcpStream, kind: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 9];
    head[0] = kind;
    head[1..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    stream.write_all(&head)?;
    stream.write_all(payload)
}

fn read_message(stream: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 9];
    stream.read_exact(&mut head)?;
    let len = u64::from_le_bytes(head[1..].try_into().unwrap_or([0; 8]));
    if len > MAX_MESSAGE {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("a message of {len} bytes")));
    }
    let mut payload = vec![0u8; len as usize];
    stream.read_exact(&mut payload)?;
    Ok((head[0], payload))
}

fn info_to_json(info: &RankInfo) -> Vec<u8> {
    serde_json::json!({
        "device": info.device,
        "dtype": info.dtype.as_str(),
        "kv_bytes_per_token": info.kv_bytes_per_token,
        "fixed_limits": info.fixed_limits.map(|(a, b, c, d)| [a, b, c, d]),
        "max_seq_len": info.max_seq_len,
        "draws_on_device": info.draws_on_device,
    })
    .to_string()
    .into_bytes()
}

fn info_from_json(bytes: &[u8]) -> Result<RankInfo> {
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| link(format!("bad rank info: {e}")))?;
    let num = |key: &str| v[key].as_u64().map(|n| n as usize).ok_or_else(|| link(format!("rank info without {key}")));
    let dtype = [DType::F32, DType::BF16, DType::F16, DType::F8E4M3, DType::F8E5M2, DType::NvFp4, DType::Int4]
        .into_iter()
        .find(|&d| v["dtype"].as_str() == Some(d.as_str()))
        .ok_or_else(|| link("rank info with an unknown dtype"))?;
    let fixed_limits = match v["fixed_limits"].as_array() {
        Some(a) if a.len() == 4 => {
            let n: Vec<usize> = a.iter().filter_map(|x| x.as_u64().map(|n| n as usize)).collect();
            if n.len() != 4 {
                return Err(link("bad fixed limits"));
            }
            Some((n[0], n[1], n[2], n[3]))
        }
        _ => None,
    };
    Ok(RankInfo {
        device: v["device"].as_str().unwrap_or("remote").to_string(),
        dtype,
        kv_bytes_per_token: num("kv_bytes_per_token")?,
        fixed_limits,
        max_seq_len: num("max_seq_len")?,
        draws_on_device: v["draws_on_device"].as_bool().unwrap_or(false),
    })
}

/// The leader's stand-in for a rank in another process.
#[derive(Debug)]
pub struct RemoteRank {
    rank: usize,
    stream: TcpStream,
}

impl RemoteRank {
    fn call(&mut self, kind: u8, payload: &[u8]) -> Result<Vec<f32>> {
        let rank = self.rank;
        write_message(&mut self.stream, kind, payload).map_err(|e| link(format!("rank {rank}: {e}")))?;
        let (kind, reply) = read_message(&mut self.stream).map_err(|e| link(format!("rank {rank} is gone: {e}")))?;
        match kind {
            OK => Ok(reply.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()),
            FAILED => Err(Error::Sharding(format!("rank {rank}: {}", String::from_utf8_lossy(&reply)))),
            other => Err(link(format!("rank {rank} answered with message kind {other}"))),
        }
    }
}

impl Drop for RemoteRank {
    fn drop(&mut self) {
        // Closes the connection itself, not just this handle (the group's aborter keeps a
        // clone): the follower sees the job end now and releases its rank (its NCCL
        // communicator's teardown waits for this node's).
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

impl RankModel for RemoteRank {
    fn forward(&mut self, batch: &ForwardBatch) -> Result<Vec<f32>> {
        let payload = serde_json::to_vec(batch).map_err(|e| link(e.to_string()))?;
        self.call(FORWARD, &payload)
    }

    fn new_kv_cache(&mut self, n_blocks: usize, block_size: usize) -> Result<()> {
        let mut payload = (n_blocks as u64).to_le_bytes().to_vec();
        payload.extend_from_slice(&(block_size as u64).to_le_bytes());
        self.call(NEW_KV_CACHE, &payload).map(|_| ())
    }

    fn as_any(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn aborter(&self) -> Option<Arc<dyn Fn() + Send + Sync>> {
        let stream = self.stream.try_clone().ok()?;
        Some(Arc::new(move || {
            let _ = stream.shutdown(Shutdown::Both);
        }))
    }
}

/// A follower rank that connected: its proxy and information, or why its hello was bad.
type Joined = Result<(RemoteRank, RankInfo)>;

/// The leader's side: accepts the follower ranks `ranks` on `control_addr` (each once), in a
/// background thread; [`RemoteRanks::take`] waits for one.
pub struct RemoteRanks {
    slots: Arc<(Mutex<Vec<Option<Joined>>>, std::sync::Condvar)>,
    ranks: Range<usize>,
    timeout: Duration,
}

impl std::fmt::Debug for RemoteRanks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RemoteRanks({:?})", self.ranks)
    }
}

impl RemoteRanks {
    pub fn listen(control_addr: &str, ranks: Range<usize>, timeout: Duration) -> Result<Self> {
        let listener =
            TcpListener::bind(control_addr).map_err(|e| link(format!("cannot listen on {control_addr}: {e}")))?;
        let slots =
            Arc::new((Mutex::new((0..ranks.len()).map(|_| None).collect::<Vec<_>>()), std::sync::Condvar::new()));
        let (shared, range) = (Arc::clone(&slots), ranks.clone());
        std::thread::Builder::new()
            .name("flint-remote-accept".into())
            .spawn(move || {
                let mut left = range.len();
                while left > 0 {
                    let Ok((mut stream, from)) = listener.accept() else { break };
                    let _ = stream.set_nodelay(true);
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                    let hello = (|| -> std::io::Result<(usize, Vec<u8>)> {
                        let mut head = [0u8; 8];
                        stream.read_exact(&mut head)?;
                        if &head[..4] != HELLO {
                            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "not a rank"));
                        }
                        let rank = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
                        let (_, info) = read_message(&mut stream)?;
                        Ok((rank, info))
                    })();
                    let Ok((rank, info)) = hello else {
                        tracing::warn!(%from, "ignored a connection that is not a follower rank");
                        continue;
                    };
                    let (lock, cv) = &*shared;
                    let mut slots = lock.lock().unwrap_or_else(|p| p.into_inner());
                    let Some(slot) = rank.checked_sub(range.start).and_then(|i| slots.get_mut(i)) else {
                        tracing::warn!(%from, rank, "a follower claims a rank this node does not wait for");
                        continue;
                    };
                    if slot.is_some() {
                        tracing::warn!(%from, rank, "rank joined twice; the second is ignored");
                        continue;
                    }
                    let _ = stream.set_read_timeout(None);
                    *slot = Some(info_from_json(&info).map(|info| (RemoteRank { rank, stream }, info)));
                    left -= 1;
                    cv.notify_all();
                }
            })
            .map_err(|e| link(e.to_string()))?;
        Ok(RemoteRanks { slots, ranks, timeout })
    }

    /// Rank `rank`'s proxy and information, once its follower has connected.
    pub fn take(&self, rank: usize) -> Result<(RemoteRank, RankInfo)> {
        let i = rank.checked_sub(self.ranks.start).filter(|&i| i < self.ranks.len());
        let i = i.ok_or_else(|| link(format!("rank {rank} is not remote ({:?})", self.ranks)))?;
        let deadline = Instant::now() + self.timeout;
        let (lock, cv) = &*self.slots;
        let mut slots = lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(got) = slots[i].take() {
                return got;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(link(format!("rank {rank} did not connect within {} s", self.timeout.as_secs())));
            }
            slots = cv.wait_timeout(slots, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

/// A follower rank: connects to the leader's `control_addr` (retrying until `timeout`), then
/// runs every step and cache request the leader sends on `model` until the leader hangs up.
pub fn follow(
    control_addr: &str,
    rank: usize,
    model: &mut dyn RankModel,
    info: &RankInfo,
    timeout: Duration,
) -> Result<()> {
    let target = control_addr
        .to_socket_addrs()
        .map_err(|e| link(format!("bad address {control_addr}: {e}")))?
        .next()
        .ok_or_else(|| link(format!("{control_addr} resolves to nothing")))?;
    let deadline = Instant::now() + timeout;
    let mut stream = loop {
        match TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                return Err(link(format!("the leader at {control_addr} is not reachable: {e}")));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let _ = stream.set_nodelay(true);
    let mut hello = HELLO.to_vec();
    hello.extend_from_slice(&(rank as u32).to_le_bytes());
    stream.write_all(&hello).map_err(|e| link(e.to_string()))?;
    write_message(&mut stream, 0, &info_to_json(info)).map_err(|e| link(e.to_string()))?;
    loop {
        let (kind, payload) = match read_message(&mut stream) {
            Ok(m) => m,
            // The leader closed the job.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(link(format!("the leader's link broke: {e}"))),
        };
        let result = match kind {
            FORWARD => serde_json::from_slice::<ForwardBatch>(&payload)
                .map_err(|e| link(format!("a bad step from the leader: {e}")))
                .and_then(|batch| model.forward(&batch)),
            NEW_KV_CACHE if payload.len() == 16 => {
                let n_blocks = u64::from_le_bytes(payload[..8].try_into().unwrap_or([0; 8])) as usize;
                let block_size = u64::from_le_bytes(payload[8..].try_into().unwrap_or([0; 8])) as usize;
                model.new_kv_cache(n_blocks, block_size).map(|()| Vec::new())
            }
            other => Err(link(format!("unknown message kind {other} from the leader"))),
        };
        let sent = match result {
            Ok(logits) => {
                let bytes: Vec<u8> = logits.iter().flat_map(|x| x.to_le_bytes()).collect();
                write_message(&mut stream, OK, &bytes)
            }
            Err(e) => write_message(&mut stream, FAILED, e.to_string().as_bytes()),
        };
        sent.map_err(|e| link(format!("answering the leader: {e}")))?;
    }
}

/// Where a process sits in a job of several: `nnodes` processes of `world / nnodes` ranks each,
/// node 0 (the leader) listening on `master_addr` (its port for the ranks' collectives, the
/// next port for control).
#[derive(Clone, Debug)]
pub struct Nodes {
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: String,
    /// How long ranks wait for each other (joining, and inside any collective).
    pub timeout: Duration,
}

impl Nodes {
    /// This node's ranks of `world`.
    pub fn local_ranks(&self, world: usize) -> Result<Range<usize>> {
        if self.nnodes == 0 || self.node_rank >= self.nnodes || world == 0 || !world.is_multiple_of(self.nnodes) {
            return Err(Error::Sharding(format!(
                "{world} ranks over {} nodes (node {}): every node holds the same number of ranks",
                self.nnodes, self.node_rank
            )));
        }
        let k = world / self.nnodes;
        Ok(self.node_rank * k..(self.node_rank + 1) * k)
    }
}

/// A CPU node's rank of a tensor-parallel job over several processes: rank `rank` loads its
/// shard of `source` onto `backend` and joins the others' collectives over [`TcpComm`].
pub fn cpu_rank_model(
    source: &ModelSource,
    config: &ModelConfig,
    world: usize,
    rank: usize,
    nodes: &Nodes,
    dtype: DType,
    backend: Box<dyn Backend>,
) -> Result<(Box<dyn RankModel>, RankInfo)> {
    let comm = TcpComm::join(&nodes.master_addr, rank, world, nodes.timeout)?;
    let model =
        Llama::load_shard(source, config.clone(), backend.as_ref(), dtype, Shard::new(rank, world)?, &mut |_| {})?;
    let info = RankInfo::cpu(backend.as_ref(), &model, dtype);
    Ok((Box::new(CpuRank { backend, model, comm: Arc::new(comm), cache: None }), info))
}

/// How a node builds its rank `rank` (the job's world and this node's layout are the caller's).
pub type MakeRank<'a> = dyn Fn(usize) -> Result<(Box<dyn RankModel>, RankInfo)> + Send + Sync + 'a;

impl TpGroup {
    /// Node 0 of a job of `tp * pp` ranks (`tp` per pipeline stage, stage-major) over
    /// `nodes.nnodes` processes: this node's ranks as threads built by `make`, the other nodes'
    /// ranks through their control links (they run [`follow`]). The output rank is the last
    /// stage's first.
    pub fn leader(
        config: ModelConfig,
        tp: usize,
        pp: usize,
        nodes: &Nodes,
        make: Box<MakeRank<'static>>,
    ) -> Result<Self> {
        Shard::check(tp, &config)?;
        if pp == 0 || pp > config.n_layers {
            return Err(Error::Sharding(format!("{pp} pipeline stages of {} layers", config.n_layers)));
        }
        let world = tp * pp;
        let local = nodes.local_ranks(world)?;
        if nodes.node_rank != 0 {
            return Err(Error::Sharding(format!("node {} is a follower, not the leader", nodes.node_rank)));
        }
        let remote = RemoteRanks::listen(&control_addr(&nodes.master_addr)?, local.end..world, nodes.timeout)?;
        Self::spawn(world, (pp - 1) * tp, config, move |rank| {
            if local.contains(&rank) {
                make(rank)
            } else {
                let (model, info) = remote.take(rank)?;
                Ok((Box::new(model) as Box<dyn RankModel>, info))
            }
        })
        .map(|group| group.with_pipeline_stages(pp))
    }
}

/// A follower node: builds each of this node's ranks with `make` (on its own thread) and serves
/// the leader's steps on them until the leader closes the job (`Ok`) or a rank fails.
pub fn follow_node(world: usize, nodes: &Nodes, make: &MakeRank<'_>) -> Result<()> {
    let local = nodes.local_ranks(world)?;
    if nodes.node_rank == 0 {
        return Err(Error::Sharding("node 0 leads the job; it does not follow".to_string()));
    }
    let control = control_addr(&nodes.master_addr)?;
    std::thread::scope(|s| {
        let handles: Vec<_> = local
            .map(|rank| {
                let control = &control;
                s.spawn(move || -> Result<()> {
                    let (mut model, info) = make(rank)?;
                    let served = follow(control, rank, model.as_mut(), &info, nodes.timeout);
                    if served.is_err()
                        && let Some(abort) = model.aborter()
                    {
                        abort();
                    }
                    served
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(Error::Sharding("a rank thread panicked".to_string()))))
            .collect::<Result<Vec<()>>>()
            .map(|_| ())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers every step with the batch's token count, as logits.
    struct Echo;

    impl RankModel for Echo {
        fn forward(&mut self, batch: &ForwardBatch) -> Result<Vec<f32>> {
            if batch.n_tokens() == 0 {
                return Err(Error::Sharding("an empty step".to_string()));
            }
            Ok(vec![batch.n_tokens() as f32; 2])
        }

        fn new_kv_cache(&mut self, _: usize, _: usize) -> Result<()> {
            Ok(())
        }

        fn as_any(&mut self) -> &mut dyn std::any::Any {
            self
        }
    }

    fn free_addr() -> String {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").to_string()
    }

    #[test]
    fn steps_and_errors_cross_the_link_and_dropping_the_proxy_ends_the_follower() {
        let addr = free_addr();
        let ranks = RemoteRanks::listen(&addr, 1..2, Duration::from_secs(20)).expect("listen");
        let info = RankInfo {
            device: "cpu".into(),
            dtype: DType::F32,
            kv_bytes_per_token: 96,
            fixed_limits: Some((10, 16, 256, 8)),
            max_seq_len: 512,
            draws_on_device: true,
        };
        let (a, i) = (addr.clone(), info.clone());
        let (done, ended) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(follow(&a, 1, &mut Echo, &i, Duration::from_secs(20)));
        });
        let (mut remote, got) = ranks.take(1).expect("rank 1 joins");
        assert_eq!((got.kv_bytes_per_token, got.fixed_limits, got.max_seq_len), (96, Some((10, 16, 256, 8)), 512));
        assert!(got.draws_on_device);
        let mut batch = ForwardBatch::new(16);
        batch.push_sequence(&[1, 2, 3], 0, &[0], crate::Logits::Last).expect("batch");
        assert_eq!(remote.forward(&batch).expect("step"), vec![3.0, 3.0]);
        let err = remote.forward(&ForwardBatch::new(16)).expect_err("the follower's error comes back");
        assert!(err.to_string().contains("an empty step"), "{err}");
        remote.new_kv_cache(4, 16).expect("cache");
        // The group's aborter holds a clone of the connection; dropping the proxy still ends it.
        let _aborter = remote.aborter();
        drop(remote);
        let ended = ended.recv_timeout(Duration::from_secs(5)).expect("the follower ends when the proxy goes");
        ended.expect("the follower ends cleanly");
    }
}
