//! `TcpComm`: ranks on threads of this process joined over localhost TCP give bit for bit the
//! results of `LocalComm` (itself checked against serial definitions), and failures are errors.

use std::net::TcpListener;
use std::time::Duration;

use flint_comm::{Communicator, Error, LocalComm, ReduceOp, TcpComm};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn free_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
}

type Job<'a, C> = dyn Fn(&C, &mut Vec<f32>) -> flint_comm::Result<()> + Sync + 'a;

fn on_tcp(world: usize, data: &[Vec<f32>], f: &Job<'_, TcpComm>) -> Vec<(Vec<f32>, flint_comm::Result<()>)> {
    let addr = free_addr();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let (addr, mut buf) = (addr.clone(), data[rank].clone());
                s.spawn(move || {
                    let comm = TcpComm::join(&addr, rank, world, Duration::from_secs(20)).expect("join");
                    let r = f(&comm, &mut buf);
                    (buf, r)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
    })
}

fn on_local(world: usize, data: &[Vec<f32>], f: &Job<'_, LocalComm>) -> Vec<(Vec<f32>, flint_comm::Result<()>)> {
    let comms = LocalComm::group(world, Duration::from_secs(20));
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .zip(data.iter().cloned())
            .map(|(comm, mut buf)| {
                s.spawn(move || {
                    let r = f(&comm, &mut buf);
                    (buf, r)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
    })
}

#[test]
fn collectives_equal_local_comm_bit_for_bit() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for world in 1..=4usize {
        let len = world * 37;
        let data: Vec<Vec<f32>> =
            (0..world).map(|_| (0..len).map(|_| rng.random_range(-4.0f32..4.0)).collect()).collect();
        for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Min] {
            let tcp = on_tcp(world, &data, &|c, b| c.all_reduce(b.as_mut_slice(), op));
            let local = on_local(world, &data, &|c, b| c.all_reduce(b.as_mut_slice(), op));
            for ((t, tr), (l, lr)) in tcp.iter().zip(&local) {
                assert!(tr.is_ok() && lr.is_ok());
                assert!(t.iter().zip(l).all(|(a, b)| a.to_bits() == b.to_bits()), "all_reduce {op:?}, {world} ranks");
            }
        }
        let tcp = on_tcp(world, &data, &|c, b| {
            c.all_gather(b.as_mut_slice())?;
            c.broadcast(b.as_mut_slice(), world - 1)?;
            Communicator::<[f32]>::barrier(c)
        });
        let local = on_local(world, &data, &|c, b| {
            c.all_gather(b.as_mut_slice())?;
            c.broadcast(b.as_mut_slice(), world - 1)?;
            Communicator::<[f32]>::barrier(c)
        });
        for ((t, tr), (l, lr)) in tcp.iter().zip(&local) {
            assert!(tr.is_ok() && lr.is_ok());
            assert_eq!(t, l, "all_gather then broadcast, {world} ranks");
        }
    }
}

#[test]
fn messages_to_and_from_rank_0_arrive_in_order_and_others_are_refused() {
    let data = vec![vec![0.0f32; 3]; 3];
    let out = on_tcp(3, &data, &|c, b| {
        let rank = Communicator::<[f32]>::rank(c);
        if rank == 0 {
            c.send(&[1.0, 2.0, 3.0][..], 2)?;
            c.send(&[4.0, 5.0, 6.0][..], 2)?;
            c.recv(b.as_mut_slice(), 1)
        } else if rank == 1 {
            c.send(&[7.0, 8.0, 9.0][..], 0)?;
            b.copy_from_slice(&[1.0, 1.0, 1.0]);
            match c.send(&[0.0, 0.0, 0.0][..], 2) {
                Err(Error::Size { .. }) => Ok(()),
                other => panic!("a message between ranks 1 and 2 should be refused: {other:?}"),
            }
        } else {
            c.recv(b.as_mut_slice(), 0)?;
            assert_eq!(b, &[1.0, 2.0, 3.0]);
            c.recv(b.as_mut_slice(), 0)
        }
    });
    assert_eq!(out[0].0, vec![7.0, 8.0, 9.0]);
    assert_eq!(out[2].0, vec![4.0, 5.0, 6.0]);
    assert!(out.iter().all(|(_, r)| r.is_ok()));
}

#[test]
fn a_missing_rank_or_a_mismatched_buffer_is_an_error_not_a_hang() {
    // Rank 1 of 3 never comes: rank 0 and 2 give up after the timeout.
    let addr = free_addr();
    let results: Vec<_> = std::thread::scope(|s| {
        [0usize, 2]
            .map(|rank| {
                let addr = addr.clone();
                s.spawn(move || TcpComm::join(&addr, rank, 3, Duration::from_secs(2)).map(|_| ()))
            })
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    assert!(results.iter().all(Result::is_err), "{results:?}");
    // Lengths differ: rank 0 says so, and rank 1 fails instead of waiting.
    let data = vec![vec![1.0f32; 4], vec![1.0f32; 5]];
    let out = on_tcp(2, &data, &|c, b| c.all_reduce(b.as_mut_slice(), ReduceOp::Sum));
    assert!(matches!(out[0].1, Err(Error::Size { .. })), "{:?}", out[0].1);
    // Rank 0 returned early: rank 1's read ends with an error once rank 0's end is dropped.
    assert!(out[1].1.is_err());
}

#[test]
fn abort_from_another_thread_ends_a_pending_receive() {
    let addr = free_addr();
    let (a0, a1) = (addr.clone(), addr);
    let zero = std::thread::spawn(move || TcpComm::join(&a0, 0, 2, Duration::from_secs(20)).expect("rank 0"));
    let one = std::sync::Arc::new(TcpComm::join(&a1, 1, 2, Duration::from_secs(20)).expect("rank 1"));
    let _zero = zero.join().expect("rank 0 thread");
    let aborter = std::sync::Arc::clone(&one);
    let start = std::time::Instant::now();
    let waiter = std::thread::spawn(move || {
        let mut buf = [0.0f32; 4];
        one.recv(&mut buf[..], 0)
    });
    std::thread::sleep(Duration::from_millis(200));
    aborter.abort();
    let got = waiter.join().expect("waiter");
    assert!(got.is_err(), "{got:?}");
    assert!(start.elapsed() < Duration::from_secs(5), "the receive waited {:?}", start.elapsed());
}
