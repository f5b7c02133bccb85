//! `LocalComm` collectives against the same reductions computed serially, and the TCP bootstrap.

use std::net::TcpListener;
use std::time::Duration;

use flint_comm::bootstrap::Rendezvous;
use flint_comm::{Communicator, Error, LocalComm, ReduceOp};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Runs `f(comm, rank_data)` on a thread per rank and returns each rank's result.
fn run<R: Send>(
    world: usize,
    data: &[Vec<f32>],
    f: impl Fn(&LocalComm, &mut Vec<f32>) -> flint_comm::Result<R> + Sync,
) -> Vec<(Vec<f32>, flint_comm::Result<R>)> {
    let comms = LocalComm::group(world, Duration::from_secs(20));
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .zip(data.iter().cloned())
            .map(|(comm, mut buf)| {
                let f = &f;
                s.spawn(move || {
                    let r = f(&comm, &mut buf);
                    (buf, r)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
    })
}

fn random_data(world: usize, len: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..world).map(|_| (0..len).map(|_| rng.random_range(-4.0f32..4.0)).collect()).collect()
}

fn reduce(data: &[Vec<f32>], i: usize, op: ReduceOp) -> f32 {
    data[1..].iter().fold(data[0][i], |acc, d| match op {
        ReduceOp::Sum => acc + d[i],
        ReduceOp::Max => acc.max(d[i]),
        ReduceOp::Min => acc.min(d[i]),
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn collectives_equal_their_serial_definitions(world in 1usize..6, part in 1usize..40, seed in any::<u64>()) {
        let len = world * part;
        let data = random_data(world, len, seed);
        for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Min] {
            let out = run(world, &data, |c, b| c.all_reduce(b.as_mut_slice(), op));
            for (buf, r) in &out {
                prop_assert!(r.is_ok());
                for (i, &v) in buf.iter().enumerate() {
                    // Bit for bit: every rank reduces in rank order.
                    prop_assert_eq!(v.to_bits(), reduce(&data, i, op).to_bits());
                }
            }
            let out = run(world, &data, |c, b| c.reduce_scatter(b.as_mut_slice(), op));
            for (rank, (buf, r)) in out.iter().enumerate() {
                prop_assert!(r.is_ok());
                for (i, v) in buf.iter().enumerate().skip(rank * part).take(part) {
                    prop_assert_eq!(v.to_bits(), reduce(&data, i, op).to_bits());
                }
            }
        }
        let out = run(world, &data, |c, b| c.all_gather(b.as_mut_slice()));
        for (buf, r) in &out {
            prop_assert!(r.is_ok());
            for (i, &v) in buf.iter().enumerate() {
                prop_assert_eq!(v, data[i / part][i]);
            }
        }
        let root = seed as usize % world;
        let out = run(world, &data, |c, b| c.broadcast(b.as_mut_slice(), root));
        for (buf, r) in &out {
            prop_assert!(r.is_ok());
            prop_assert_eq!(buf, &data[root]);
        }
    }
}

#[test]
fn send_and_recv_keep_order_around_a_ring() {
    let world = 4;
    let data = random_data(world, 16, 7);
    let out = run(world, &data, |c, b| {
        let next = (c.rank() + 1) % world;
        let prev = (c.rank() + world - 1) % world;
        for round in 0..3 {
            let mut msg = b.clone();
            msg[0] = round as f32;
            c.send(msg.as_slice(), next)?;
        }
        let mut got = Vec::new();
        for _ in 0..3 {
            let mut m = vec![0.0f32; 16];
            c.recv(m.as_mut_slice(), prev)?;
            got.push(m);
        }
        c.barrier()?;
        Ok(got)
    });
    for (rank, (_, r)) in out.iter().enumerate() {
        let got = r.as_ref().expect("ring");
        let prev = (rank + world - 1) % world;
        for (round, m) in got.iter().enumerate() {
            assert_eq!(m[0], round as f32);
            assert_eq!(m[1..], data[prev][1..]);
        }
    }
}

#[test]
fn u32_collectives_and_mismatched_lengths() {
    let comms = LocalComm::group(2, Duration::from_secs(20));
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|c| {
                s.spawn(move || {
                    let mut ids = [c.rank() as u32 * 10 + 1, 7];
                    c.all_reduce(ids.as_mut_slice(), ReduceOp::Max).expect("u32 all-reduce");
                    assert_eq!(ids, [11, 7]);
                    // Ranks disagree on the length: both get an error, nobody hangs.
                    let mut bad = vec![0u32; 3 + c.rank()];
                    c.all_reduce(bad.as_mut_slice(), ReduceOp::Sum)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    for r in results {
        assert!(matches!(r, Err(Error::Size { op: "all_reduce", .. })), "{r:?}");
    }
}

#[test]
fn a_missing_rank_times_out_and_a_failed_one_aborts_the_group() {
    let mut comms = LocalComm::group(3, Duration::from_millis(300));
    let absent = comms.pop().expect("three ranks");
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> =
            comms.into_iter().map(|c| s.spawn(move || c.all_reduce([1.0f32].as_mut_slice(), ReduceOp::Sum))).collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    assert!(results.iter().all(|r| matches!(r, Err(Error::Timeout { .. }) | Err(Error::Aborted(_)))), "{results:?}");
    assert!(matches!(absent.barrier(), Err(Error::Aborted(_))));

    let comms = LocalComm::group(2, Duration::from_secs(30));
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|c| {
                s.spawn(move || {
                    if c.rank() == 1 {
                        c.abort();
                        return Err(Error::Aborted(1));
                    }
                    c.barrier()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    assert!(matches!(results[0], Err(Error::Aborted(1))), "{:?}", results[0]);
}

fn free_port() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
}

#[test]
fn bootstrap_hands_node_0s_id_to_every_node() {
    let addr = free_port();
    let nnodes = 4;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let id: [u8; 128] = std::array::from_fn(|_| rng.random());
    let got: Vec<_> = std::thread::scope(|s| {
        // Later nodes start first: they must wait for node 0.
        let hs: Vec<_> = (0..nnodes)
            .rev()
            .map(|node_rank| {
                let r = Rendezvous { master_addr: addr.clone(), node_rank, nnodes, timeout: Duration::from_secs(20) };
                s.spawn(move || r.share_id(|| Ok(id)))
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    for g in got {
        assert_eq!(g.expect("share"), id);
    }
}

#[test]
fn bootstrap_refuses_disagreeing_nodes_with_a_reason() {
    let addr = free_port();
    let results: Vec<_> = std::thread::scope(|s| {
        let a = addr.clone();
        let root = s.spawn(move || {
            Rendezvous { master_addr: a, node_rank: 0, nnodes: 2, timeout: Duration::from_secs(20) }
                .share_id(|| Ok([1; 128]))
        });
        let a = addr.clone();
        let other = s.spawn(move || {
            Rendezvous { master_addr: a, node_rank: 1, nnodes: 3, timeout: Duration::from_secs(20) }
                .share_id(|| Ok([2; 128]))
        });
        vec![root.join().expect("root"), other.join().expect("other")]
    });
    for r in &results {
        let e = r.as_ref().expect_err("mismatch").to_string();
        assert!(e.contains("3 nodes"), "{e}");
    }
    // Nobody comes: node 0 gives up with how many joined.
    let lone = Rendezvous { master_addr: free_port(), node_rank: 0, nnodes: 2, timeout: Duration::from_millis(200) };
    let e = lone.share_id(|| Ok([0; 128])).expect_err("alone").to_string();
    assert!(e.contains("1 of 2 nodes joined"), "{e}");
    let bad =
        Rendezvous { master_addr: "127.0.0.1:1".into(), node_rank: 2, nnodes: 2, timeout: Duration::from_millis(200) };
    assert!(bad.share_id(|| Ok([0; 128])).is_err());
}
