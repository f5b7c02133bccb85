//! The device's draws against the host's sampler: `flint_sample` given a [`Sampler`]'s
//! [`Sampler::device_draw`] picks the token [`Sampler::sample`] picks from the same logits with
//! the same seed, over fresh random logits (wide rows, rows on a coarse grid full of ties, rows
//! with NaN and infinite entries) and every kind of setting: greedy, temperature, top-k, top-p,
//! min-p and their mixtures.
//!
//! Skipped without a GPU, unless `FLINT_REQUIRE_GPU=1`.

use flint_cuda::ops::{self, DeviceSampling};
use flint_engine::{Sampler, SamplingParams};
use flint_testkit::{gpu, rng};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// One row of logits of a kind: 0 uniform, 1 a coarse grid (ties everywhere), 2 peaked (a few
/// large logits over a flat tail), 3 uniform with NaN and -inf entries.
fn row(r: &mut ChaCha8Rng, vocab: usize, kind: usize) -> Vec<f32> {
    (0..vocab)
        .map(|i| match kind {
            0 => r.random_range(-6.0f32..6.0),
            1 => r.random_range(-8i32..8) as f32 * 0.25,
            2 => {
                if i % 997 == 3 {
                    r.random_range(8.0f32..14.0)
                } else {
                    r.random_range(-4.0f32..0.0)
                }
            }
            _ => match r.random_range(0..50) {
                0 => f32::NAN,
                1 => f32::NEG_INFINITY,
                _ => r.random_range(-3.0f32..3.0),
            },
        })
        .collect()
}

fn settings(r: &mut ChaCha8Rng) -> SamplingParams {
    let pick = |r: &mut ChaCha8Rng, v: &[f32]| v[r.random_range(0..v.len())];
    SamplingParams {
        temperature: pick(r, &[0.0, 0.3, 0.7, 1.0, 1.6]),
        top_k: [0usize, 0, 1, 3, 40, 300][r.random_range(0..6)],
        top_p: pick(r, &[1.0, 1.0, 0.95, 0.8, 0.3, 1e-4]),
        min_p: pick(r, &[0.0, 0.0, 0.02, 0.2, 0.9]),
        seed: Some(r.random()),
        ..SamplingParams::default()
    }
}

#[test]
fn device_draws_pick_what_the_host_sampler_picks() {
    let Some(g) = gpu() else { return };
    let mut r = rng();
    let mut checked = 0;
    for &(vocab, rows) in &[(37usize, 64usize), (1000, 64), (49_152, 48), (128_256, 32)] {
        let logits: Vec<Vec<f32>> = (0..rows).map(|i| row(&mut r, vocab, i % 4)).collect();
        let flat: Vec<f32> = logits.concat();
        let lb = g.upload(&flat).expect("logits");
        let out = g.alloc(4 * rows).expect("out");
        let params: Vec<SamplingParams> = (0..rows).map(|_| settings(&mut r)).collect();
        let mut device: Vec<Sampler> = params.iter().map(|p| Sampler::new(p.clone(), &[]).expect("valid")).collect();
        let mut host: Vec<Sampler> = params.iter().map(|p| Sampler::new(p.clone(), &[]).expect("valid")).collect();
        for step in 0..4 {
            let draws: Vec<DeviceSampling> = device
                .iter_mut()
                .map(|s| {
                    let d = s.device_draw().expect("no penalties");
                    DeviceSampling {
                        temperature: d.temperature,
                        top_k: d.top_k as i32,
                        top_p: d.top_p,
                        min_p: d.min_p,
                        u: d.u,
                    }
                })
                .collect();
            let pb = g.upload(&draws).expect("params");
            ops::sample(&g, lb.ptr(), vocab, pb.ptr(), out.ptr(), rows).expect("sample");
            let mut got = vec![0u32; rows];
            g.read(out.ptr(), &mut got).expect("read");
            for i in 0..rows {
                let want = host[i].sample(&mut logits[i].clone()).expect("host sample");
                device[i].accept_drawn(got[i]);
                assert_eq!(
                    got[i],
                    want,
                    "vocab {vocab}, row {i} (kind {}), step {step}: {:?} with draw {:?}",
                    i % 4,
                    params[i],
                    draws[i]
                );
                checked += 1;
            }
        }
    }
    eprintln!("{checked} device draws equal the host sampler's tokens");
}
