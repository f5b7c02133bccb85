//! Every CUDA kernel against the CPU reference (`flint-cpu`) on fresh random inputs of many
//! shapes: ‖out − ref‖ / ‖ref‖ ≤ 1e-2 for BF16 outputs.
//!
//! Runs on a machine with a Hopper GPU and the kernels built in; elsewhere each test says it was
//! skipped, unless `FLINT_REQUIRE_GPU=1` (the GPU bundle sets it), where a missing GPU fails.

#![allow(clippy::too_many_arguments)]

use flint_cpu::CpuBackend;
use flint_cuda::gemm::{Gemm, GemmOut};
use flint_cuda::ops::{self, DeviceSampling, Epilogue, PagedKv};
use flint_cuda::{DeviceBuffer, Gpu};
use flint_tensor::{AttentionBatch, Backend, DType, Shape};
use flint_testkit::{gpu, rng};
use half::bf16;
use rand::{Rng, seq::SliceRandom};

fn random_bf16(rng: &mut impl Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0) * scale).to_f32()).collect()
}

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

fn up_bf16(g: &Gpu, v: &[f32]) -> DeviceBuffer {
    g.upload(&to_bf16(v)).expect("upload")
}

fn read_bf16(g: &Gpu, buf: &DeviceBuffer, n: usize) -> Vec<f32> {
    let mut out = vec![bf16::ZERO; n];
    g.read(buf.ptr(), &mut out).expect("read");
    out.iter().map(|x| x.to_f32()).collect()
}

fn read_f32(g: &Gpu, buf: &DeviceBuffer, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    g.read(buf.ptr(), &mut out).expect("read");
    out
}

/// A buffer of `bytes` filled with NaN-like poison, so unwritten outputs show.
fn poisoned(g: &Gpu, bytes: usize) -> DeviceBuffer {
    let b = g.alloc(bytes).expect("alloc");
    g.memset(b.ptr(), 0xff, bytes).expect("memset");
    b
}

fn rel_err(out: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(out.len(), reference.len());
    assert!(out.iter().all(|x| x.is_finite()), "non-finite output");
    let num: f64 = out.iter().zip(reference).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let den: f64 = reference.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

fn check(what: &str, out: &[f32], reference: &[f32], tol: f64) {
    let e = rel_err(out, reference);
    eprintln!("{what}: rel err {e:.2e}");
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:e}");
}

fn cpu_tensor(cpu: &CpuBackend, data: &[f32], dims: &[usize]) -> flint_tensor::Tensor {
    cpu.upload_f32(data, Shape::new(dims), DType::F32).expect("cpu upload")
}

#[test]
fn embedding_gathers_rows() {
    let Some(g) = gpu() else { return };
    let mut r = rng();
    let cpu = CpuBackend::new();
    for (vocab, hidden, n) in [(1000, 64, 7), (49152, 576, 33), (3, 4096, 1)] {
        let table = random_bf16(&mut r, vocab * hidden, 1.0);
        let ids: Vec<u32> = (0..n).map(|_| r.random_range(0..vocab as u32)).collect();
        let (t, i, o) = (up_bf16(&g, &table), g.upload(&ids).expect("ids"), poisoned(&g, 2 * n * hidden));
        ops::embedding(&g, i.ptr(), t.ptr(), o.ptr(), n, hidden, vocab).expect("launch");
        let want = cpu.embedding(&cpu_tensor(&cpu, &table, &[vocab, hidden]), &ids).expect("cpu");
        assert_eq!(read_bf16(&g, &o, n * hidden), cpu.to_f32_vec(&want).expect("cpu"), "vocab {vocab} hidden {hidden}");
    }
}

#[test]
fn add_rms_norm_matches_cpu() {
    let Some(g) = gpu() else { return };
    let mut r = rng();
    let cpu = CpuBackend::new();
    for (n, hidden) in [(1, 576), (5, 4096), (33, 2048), (3, 8192), (2, 8)] {
        let res = random_bf16(&mut r, n * hidden, 2.0);
        let add = random_bf16(&mut r, n * hidden, 2.0);
        let w = random_bf16(&mut r, hidden, 1.5);
        let eps = 1e-5;
        // Plain norm (no add).
        let (rb, wb, ob) = (up_bf16(&g, &res), g.upload(&w).expect("w"), poisoned(&g, 2 * n * hidden));
        ops::add_rms_norm(&g, rb.ptr(), 0, wb.ptr(), ob.ptr(), n, hidden, eps).expect("launch");
        let want =
            cpu.rms_norm(&cpu_tensor(&cpu, &res, &[n, hidden]), &cpu_tensor(&cpu, &w, &[hidden]), eps).expect("cpu");
        check(
            &format!("rms_norm {n}x{hidden}"),
            &read_bf16(&g, &ob, n * hidden),
            &cpu.to_f32_vec(&want).expect("v"),
            1e-2,
        );
        // Fused add.
        let ab = up_bf16(&g, &add);
        ops::add_rms_norm(&g, rb.ptr(), ab.ptr(), wb.ptr(), ob.ptr(), n, hidden, eps).expect("launch");
        let (sum, normed) = cpu
            .add_rms_norm(
                &cpu_tensor(&cpu, &res, &[n, hidden]),
                &cpu_tensor(&cpu, &add, &[n, hidden]),
                &cpu_tensor(&cpu, &w, &[hidden]),
                eps,
            )
            .expect("cpu");
        check(
            &format!("residual {n}x{hidden}"),
            &read_bf16(&g, &rb, n * hidden),
            &cpu.to_f32_vec(&sum).expect("v"),
            1e-2,
        );
        check(
            &format!("add_rms_norm {n}x{hidden}"),
            &read_bf16(&g, &ob, n * hidden),
            &cpu.to_f32_vec(&normed).expect("v"),
            1e-2,
        );
    }
}

#[test]
fn rope_and_kv_write_match_cpu() {
    let Some(g) = gpu() else { return };
    let mut r = rng();
    let cpu = CpuBackend::new();
    for (n, heads, kv, hd, block_size) in
        [(1, 32, 8, 128, 16), (19, 9, 3, 64, 16), (7, 8, 8, 64, 5), (40, 64, 8, 128, 32)]
    {
        let width = (heads + 2 * kv) * hd;
        let qkv = random_bf16(&mut r, n * width, 1.0);
        let positions: Vec<u32> = (0..n).map(|_| r.random_range(0..100_000)).collect();
        let inv_freq: Vec<f32> = (0..hd / 2).map(|i| 1.0 / 500000f32.powf(2.0 * i as f32 / hd as f32)).collect();
        let n_blocks = n.div_ceil(block_size) + 3;
        let mut slots: Vec<u32> = (0..(n_blocks * block_size) as u32).collect();
        slots.shuffle(&mut r);
        slots.truncate(n);
        let cache_len = n_blocks * block_size * kv * hd;
        let (qb, pb, fb, sb) = (
            up_bf16(&g, &qkv),
            g.upload(&positions).expect("p"),
            g.upload(&inv_freq).expect("f"),
            g.upload(&slots).expect("s"),
        );
        let (kc, vc) = (g.zeros(2 * cache_len).expect("k"), g.zeros(2 * cache_len).expect("v"));
        ops::rope_kv_write(&g, qb.ptr(), 0, pb.ptr(), fb.ptr(), sb.ptr(), kc.ptr(), vc.ptr(), n, heads, kv, hd)
            .expect("launch");
        // Reference: split, rope q and k, write k and v.
        let split = |off: usize, cols: usize| -> Vec<f32> {
            (0..n).flat_map(|t| qkv[t * width + off..t * width + off + cols].to_vec()).collect()
        };
        let (q, k, v) = (split(0, heads * hd), split(heads * hd, kv * hd), split((heads + kv) * hd, kv * hd));
        let f = cpu_tensor(&cpu, &inv_freq, &[hd / 2]);
        let q_ref = cpu.rope(&cpu_tensor(&cpu, &q, &[n, heads, hd]), &positions, &f).expect("cpu");
        let k_ref = cpu.rope(&cpu_tensor(&cpu, &k, &[n, kv, hd]), &positions, &f).expect("cpu");
        let kcache = cpu.zeros(Shape::from([n_blocks, block_size, kv, hd]), DType::F32).expect("z");
        let vcache = cpu.zeros(Shape::from([n_blocks, block_size, kv, hd]), DType::F32).expect("z");
        cpu.write_kv(&kcache, &k_ref, &slots).expect("w");
        cpu.write_kv(&vcache, &cpu_tensor(&cpu, &v, &[n, kv, hd]), &slots).expect("w");
        let got = read_bf16(&g, &qb, n * width);
        let q_got: Vec<f32> = (0..n).flat_map(|t| got[t * width..t * width + heads * hd].to_vec()).collect();
        let what = format!("rope n={n} heads={heads}/{kv} hd={hd}");
        check(&format!("{what} q"), &q_got, &cpu.to_f32_vec(&q_ref).expect("v"), 1e-2);
        check(&format!("{what} k cache"), &read_bf16(&g, &kc, cache_len), &cpu.to_f32_vec(&kcache).expect("v"), 1e-2);
        assert_eq!(read_bf16(&g, &vc, cache_len), cpu.to_f32_vec(&vcache).expect("v"), "{what} v cache");

        // The FP8 cache: the same q, and the BF16 cache's rows of the written slots quantized
        // with one scale per (slot, KV head).
        let qb8 = up_bf16(&g, &qkv);
        let rows = n_blocks * block_size * kv;
        let (k8, v8) = (poisoned(&g, rows * hd), poisoned(&g, rows * hd));
        let (ks, vs) = (poisoned(&g, 4 * rows), poisoned(&g, 4 * rows));
        let cache = [k8.ptr(), v8.ptr(), ks.ptr(), vs.ptr()];
        ops::rope_kv_write_fp8(&g, qb8.ptr(), 0, pb.ptr(), fb.ptr(), sb.ptr(), cache, n, heads, kv, hd)
            .expect("launch");
        assert_eq!(read_bf16(&g, &qb8, n * width), got, "{what}: fp8 variant's q");
        let written: Vec<usize> = slots.iter().flat_map(|&s| (0..kv).map(move |h| s as usize * kv + h)).collect();
        for (name, bf16_cache, codes, scales) in [("k", &kc, &k8, &ks), ("v", &vc, &v8, &vs)] {
            let values = read_bf16(&g, bf16_cache, cache_len);
            let (all_codes, all_scales) = (read_u8(&g, codes, rows * hd), read_f32(&g, scales, rows));
            let pick =
                |v: &[f32]| -> Vec<f32> { written.iter().flat_map(|&r| v[r * hd..(r + 1) * hd].to_vec()).collect() };
            let want = Fp8Matrix::quantize(&pick(&values), written.len(), hd, Granularity::Channel, Fp8Format::E4M3);
            let got_codes: Vec<u8> = written.iter().flat_map(|&r| all_codes[r * hd..(r + 1) * hd].to_vec()).collect();
            let got_scales: Vec<f32> = written.iter().map(|&r| all_scales[r]).collect();
            check_codes(&format!("{what} fp8 {name} cache"), &got_codes, &got_scales, &want);
        }
    }
}

#[test]
fn silu_mul_matches_cpu() {
    let Some(g) = gpu() else { return };
    let mut r = rng();
    let cpu = CpuBackend::new();
    for (n, ff) in [(1, 1536), (17, 14336), (3, 8)] {
        let gu = random_bf16(&mut r, n * 2 * ff, 4.0);
        let (gb, ob) = (up_bf16(&g, &gu), poisoned(&g, 2 * n * ff));
        ops::silu_mul(&g, gb.ptr(), ob.ptr(), n, ff).expect("launch");
        let gate: Vec<f32> = (0..n).flat_map(|t| gu[t * 2 * ff..t * 2 * ff + ff].to_vec()).collect();
        let up: Vec<f32> = (0..n).flat_map(|t| gu[t * 2 * ff + ff..(t + 1) * 2 * ff].to_vec()).collect();
        let want = cpu.silu_mul(&cpu_tensor(&cpu, &gate, &[n, ff]), &cpu_tensor(&cpu, &up, &[n, ff])).expect("cpu");
        check(&format!("silu_mul {n}x{ff}"), &read_bf16(&g, &ob, n * ff), &cpu.to_f32_vec(&want).expect("v"), 1e-2);
    }
}

fn cpu_linear(cpu: &CpuBackend, x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let y = cpu.linear(&cpu_tensor(cpu, x, &[m, k]), &cpu_tensor(cpu, w, &[n, k]), None).expect("cpu");
    cpu.to_f32_vec(&y).expect("v")
}

#[test]
fn gemv_matches_cpu_for_every_batch_and_epilogue() {
    let Some(g) = gpu() else { return };
    let mut r = rng();
    let cpu = CpuBackend::new();
    // K of 2048 and 7168 take the GEMV's two- and one-load variants, 4096 its four-load one.
    for (n, k) in [(1, 8), (37, 576), (4096, 4096), (1000, 1336), (6144, 4104), (512, 2048), (300, 7168)] {
        let w = random_bf16(&mut r, 2 * n * k, 0.05);
        let wb = up_bf16(&g, &w);
        for m in 1..=8 {
            let x = random_bf16(&mut r, m * k, 1.0);
            let xb = up_bf16(&g, &x);
            let want = cpu_linear(&cpu, &x, &w[..n * k], m, n, k);
            let yb = poisoned(&g, 4 * m * n);
            ops::gemv(&g, xb.ptr(), wb.ptr(), yb.ptr(), m, n, k, Epilogue::Bf16).expect("launch");
            check(&format!("gemv bf16 m={m} n={n} k={k}"), &read_bf16(&g, &yb, m * n), &want, 1e-2);
            ops::gemv(&g, xb.ptr(), wb.ptr(), yb.ptr(), m, n, k, Epilogue::F32).expect("launch");
            check(&format!("gemv f32 m={m} n={n} k={k}"), &read_f32(&g, &yb, m * n), &want, 1e-3);
            // SwiGLU: rows 0..n are the gate, n..2n the up projection.
            let gate: Vec<f32> = want.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
            let up: Vec<f32> =
                cpu_linear(&cpu, &x, &w[n * k..], m, n, k).iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
            let act = cpu.silu_mul(&cpu_tensor(&cpu, &gate, &[m, n]), &cpu_tensor(&cpu, &up, &[m, n])).expect("cpu");
            ops::gemv(&g, xb.ptr(), wb.ptr(), yb.ptr(), m, n, k, Epilogue::SwiGlu).expect("launch");
            check(
                &format!("gemv swiglu m={m} n={n} k={k}"),
                &read_bf16(&g, &yb, m * n),
                &cpu.to_f32_vec(&act).expect("v"),
                1e-2,
            );
        }
    }
}

#[test]
fn cublaslt_gemm_matches_cpu() {
    let Some(g) = gpu() else { return };
    let mut r = rng();
    let cpu = CpuBackend::new();
    let gemm = Gemm::new(&g).expect("cublasLt");
    for (m, n, k) in [(9, 4096, 4096), (37, 1000, 576), (128, 6144, 4096), (300, 513, 136)] {
        let x = random_bf16(&mut r, m * k, 1.0);
        let w = random_bf16(&mut r, n * k, 0.05);
        let (xb, wb) = (up_bf16(&g, &x), up_bf16(&g, &w));
        let want = cpu_linear(&cpu, &x, &w, m, n, k);
        let yb = poisoned(&g, 4 * m * n);
        gemm.matmul(&g, xb.ptr(), wb.ptr(), yb.ptr(), m, n, k, GemmOut::Bf16).expect("gemm");
        check(&format!("gemm bf16 {m}x{n}x{k}"), &read_bf16(&g, &yb, m * n), &want, 1e-2);
        gemm.matmul(&g, xb.ptr(), wb.ptr(), yb.ptr(), m, n, k, GemmOut::F32).expect("gemm");
        check(&format!("gemm f32 {m}x{n}x{k}"), &read_f32(&g, &yb, m * n), &want, 1e-3);
    }
}

/// A random paged batch: sequences with `n_new` new tokens after `n_cached` cached ones, blocks
/// scattered through a cache with spare blocks.
struct PagedCase {
    batch: AttentionBatch,
    n_blocks: usize,
}

fn paged_case(rng: &mut impl Rng, block_size: usize, seqs: &[(usize, usize)]) -> PagedCase {
    let needed: Vec<usize> = seqs.iter().map(|(c, n)| (c + n).div_ceil(block_size)).collect();
    let n_blocks = needed.iter().sum::<usize>() + 5;
    let mut ids: Vec<u32> = (0..n_blocks as u32).collect();
    ids.shuffle(rng);
    let max_blocks = needed.iter().copied().max().unwrap_or(1) + 2;
    let mut block_tables = vec![0u32; seqs.len() * max_blocks];
    let mut next = 0;
    let mut query_starts = vec![0u32];
    let mut context_lens = Vec::new();
    for (s, ((cached, new), need)) in seqs.iter().zip(&needed).enumerate() {
        for b in 0..*need {
            block_tables[s * max_blocks + b] = ids[next];
            next += 1;
        }
        query_starts.push(query_starts[s] + *new as u32);
        context_lens.push((cached + new) as u32);
    }
    PagedCase {
        batch: AttentionBatch { block_size, query_starts, context_lens, block_tables, max_blocks_per_seq: max_blocks },
        n_blocks,
    }
}

fn run_attention_case(
    g: &Gpu,
    rng: &mut impl Rng,
    heads: usize,
    kv: usize,
    hd: usize,
    block_size: usize,
    seqs: &[(usize, usize)],
) {
    let cpu = CpuBackend::new();
    let case = paged_case(rng, block_size, seqs);
    let b = &case.batch;
    let n = b.n_tokens();
    let cache_len = case.n_blocks * block_size * kv * hd;
    let kc = random_bf16(rng, cache_len, 1.0);
    let vc = random_bf16(rng, cache_len, 1.0);
    // q rows sit in a wider fused-QKV row, as in the model.
    let stride = (heads + 2 * kv) * hd;
    let q = random_bf16(rng, n * heads * hd, 1.0);
    let mut q_wide = vec![0f32; n * stride];
    for t in 0..n {
        q_wide[t * stride..t * stride + heads * hd].copy_from_slice(&q[t * heads * hd..(t + 1) * heads * hd]);
    }
    let scale = 1.0 / (hd as f32).sqrt();
    let cache_shape = [case.n_blocks, block_size, kv, hd];
    let qb = up_bf16(g, &q_wide);
    let tables = g.upload(&b.block_tables).expect("tables");
    // The BF16 cache, then the FP8 one: codes and a scale per (slot, KV head) row, against the
    // same attention over the values those codes stand for.
    let rows = case.n_blocks * block_size * kv;
    let k8 = Fp8Matrix::quantize(&kc, rows, hd, Granularity::Channel, Fp8Format::E4M3);
    let v8 = Fp8Matrix::quantize(&vc, rows, hd, Granularity::Channel, Fp8Format::E4M3);
    let (kd, vd) = (k8.dequantize(), v8.dequantize());
    let caches = [
        ("bf16", &kc, &vc, up_bf16(g, &kc), up_bf16(g, &vc), None),
        (
            "fp8",
            &kd,
            &vd,
            g.upload(&k8.codes).expect("k codes"),
            g.upload(&v8.codes).expect("v codes"),
            Some((g.upload(&k8.scales).expect("k scales"), g.upload(&v8.scales).expect("v scales"))),
        ),
    ];
    for (dtype, kc, vc, kb, vb, scales) in &caches {
        let (k_scales, v_scales) = scales.as_ref().map_or((0, 0), |(k, v)| (k.ptr(), v.ptr()));
        let kvp = PagedKv {
            k_cache: kb.ptr(),
            v_cache: vb.ptr(),
            k_scales,
            v_scales,
            block_tables: tables.ptr(),
            max_blocks: b.max_blocks_per_seq,
            block_size,
            n_heads: heads,
            n_kv: kv,
            head_dim: hd,
            scale,
        };
        let what = format!("{dtype} cache, heads {heads}/{kv} hd {hd} block {block_size} seqs {seqs:?}");
        check_attention(g, &cpu, b, &kvp, &qb, &q, kc, vc, cache_shape, stride, &what);
    }
}

/// Prefill and decode kernels over `kvp` against the CPU's attention over the values `kc`, `vc`
/// (what the cache holds), for the queries `q` (also in `qb`, rows of `stride`).
#[allow(clippy::too_many_arguments)]
fn check_attention(
    g: &Gpu,
    cpu: &CpuBackend,
    b: &AttentionBatch,
    kvp: &PagedKv,
    qb: &DeviceBuffer,
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
    cache_shape: [usize; 4],
    stride: usize,
    what: &str,
) {
    let (n, heads, hd) = (b.n_tokens(), kvp.n_heads, kvp.head_dim);
    let want = cpu
        .attention(
            &cpu_tensor(cpu, q, &[n, heads, hd]),
            &cpu_tensor(cpu, kc, &cache_shape),
            &cpu_tensor(cpu, vc, &cache_shape),
            b,
            kvp.scale,
        )
        .expect("cpu");
    let want = cpu.to_f32_vec(&want).expect("v");
    // Prefill kernel: tiles of 64 queries per sequence.
    let (mut tile_seq, mut tile_start) = (Vec::new(), Vec::new());
    for s in 0..b.n_seqs() {
        let mut t = b.query_starts[s];
        while t < b.query_starts[s + 1] {
            tile_seq.push(s as i32);
            tile_start.push(t);
            t += 64;
        }
    }
    let out = poisoned(g, 2 * n * heads * hd);
    let (qs, cl, ts, tst) = (
        g.upload(&b.query_starts).expect("qs"),
        g.upload(&b.context_lens).expect("cl"),
        g.upload(&tile_seq).expect("ts"),
        g.upload(&tile_start).expect("tst"),
    );
    ops::attention_prefill(
        g,
        kvp,
        qb.ptr(),
        stride,
        qs.ptr(),
        cl.ptr(),
        ts.ptr(),
        tst.ptr(),
        out.ptr(),
        tile_seq.len(),
    )
    .expect("prefill");
    check(&format!("prefill {what}"), &read_bf16(g, &out, n * heads * hd), &want, 1e-2);

    // Decode kernel: every query token on its own (valid for any batch), several split counts.
    let mut token_seq = Vec::new();
    let mut positions = Vec::new();
    for s in 0..b.n_seqs() {
        let (start, end) = (b.query_starts[s], b.query_starts[s + 1]);
        for i in start..end {
            token_seq.push(s as i32);
            positions.push(b.context_lens[s] - (end - i));
        }
    }
    let (tsq, pos) = (g.upload(&token_seq).expect("ts"), g.upload(&positions).expect("pos"));
    // One set of counters for every launch: each launch must leave them zero for the next.
    let counters = g.zeros(4 * n * kvp.n_kv).expect("counters");
    for splits in [1, 3, 8, 32, 3] {
        let part_o = g.alloc(4 * n * heads * splits * hd).expect("po");
        let part_ml = g.alloc(4 * n * heads * splits * 2).expect("pml");
        let out = poisoned(g, 2 * n * heads * hd);
        let scratch = ops::DecodeScratch { part_o: part_o.ptr(), part_ml: part_ml.ptr(), counters: counters.ptr() };
        // Up to 8 tokens, the output's amax is published too (for the FP8 GEMV's bf16 input).
        let amax = (n <= ops::GEMV_FP8_MAX_M).then(|| g.zeros(4 * n * ops::AMAX_SLOTS).expect("amax"));
        let amax_ptr = amax.as_ref().map_or(0, |a| a.ptr());
        let (q, ts, p) = (qb.ptr(), tsq.ptr(), pos.ptr());
        ops::attention_decode(g, kvp, q, stride, ts, p, &scratch, out.ptr(), amax_ptr, None, n, splits)
            .expect("decode");
        let got = read_bf16(g, &out, n * heads * hd);
        check(&format!("decode splits {splits} {what}"), &got, &want, 1e-2);
        if let Some(amax) = &amax {
            check_published_amax(g, amax, &got, n, &format!("decode splits {splits} {what}"));
        }
        let left: Vec<u32> = {
            let mut v = vec![0u32; n * kvp.n_kv];
            g.read(counters.ptr(), &mut v).expect("read");
            v
        };
        assert!(left.iter().all(|&c| c == 0), "decode splits {splits} {what}: counters left {left:?}");
    }
}

/// The amax slots a kernel published (`[rows, AMAX_SLOTS]`) hold, per row, exactly the largest
/// `|value|` of that row of `out` (what `quantize_rows` would take as its amax).
fn check_published_amax(g: &Gpu, amax: &DeviceBuffer, out: &[f32], rows: usize, what: &str) {
    let mut slots = vec![0f32; rows * ops::AMAX_SLOTS];
    g.read(amax.ptr(), &mut slots).expect("read amax");
    let cols = out.len() / rows;
    for r in 0..rows {
        let published = slots[r * ops::AMAX_SLOTS..(r + 1) * ops::AMAX_SLOTS].iter().copied().fold(0f32, f32::max);
        let want = out[r * cols..(r + 1) * cols].iter().map(|v| v.abs()).fold(0f32, f32::max);
        assert_eq!(published.to_bits(), want.to_bits(), "{what}: row {r}'s published amax");
    }
}

#[test]
fn attention_matches_cpu_on_paged_batches() {
    let Some(g) = gpu() else { return };
    let mut r = rng();
    // GQA ratios 1, 3 (SmolLM2), 4 and 8; head dims 64 and 128; lengths off the tile and block
    // sizes; chunked prefill after cached positions; decode rows mixed with prefill rows.
    run_attention_case(&g, &mut r, 8, 8, 64, 16, &[(0, 1), (0, 17), (5, 1)]);
    run_attention_case(&g, &mut r, 9, 3, 64, 16, &[(0, 100), (37, 29), (1000, 1)]);
    run_attention_case(&g, &mut r, 32, 8, 128, 16, &[(0, 130), (15, 1), (16, 1), (17, 64)]);
    run_attention_case(&g, &mut r, 64, 8, 128, 32, &[(300, 200), (0, 65), (2047, 1)]);
    run_attention_case(&g, &mut r, 16, 4, 128, 7, &[(63, 2), (0, 1), (129, 127)]);
}

/// The decode attention with RoPE and the KV write folded in (`DecodeRope`) gives, bit for bit,
/// the output, the published amax and the cache bytes of `rope_kv_write(_fp8)` followed by the
/// plain decode kernel, and leaves the QKV rows as they were: random raw QKV rows (with and
/// without a bias), one new token per sequence after a random cached context (the new position
/// first, inside or last in a block and a split), a padding row, every split count.
#[test]
fn decode_with_rope_equals_rope_then_decode() {
    let Some(g) = gpu() else { return };
    let mut r = rng();
    for (heads, kv, hd, block_size, cached) in [
        (8, 8, 64, 16, vec![0, 16, 31, 1000]),
        (9, 3, 64, 16, vec![5, 63, 64, 2047]),
        (32, 8, 128, 16, vec![0, 127, 200, 999, 3000]),
        (16, 2, 128, 7, vec![1, 33, 64]),
    ] {
        let seqs: Vec<(usize, usize)> = cached.iter().map(|&c| (c, 1)).collect();
        let case = paged_case(&mut r, block_size, &seqs);
        let b = &case.batch;
        let n_seqs = b.n_seqs();
        let n = n_seqs + 1; // and a padding row
        let width = (heads + 2 * kv) * hd;
        let qkv = random_bf16(&mut r, n * width, 1.0);
        let bias = random_bf16(&mut r, width, 0.5);
        let positions: Vec<u32> = (0..n).map(|t| if t < n_seqs { b.context_lens[t] - 1 } else { 0 }).collect();
        let token_seq: Vec<i32> = (0..n).map(|t| if t < n_seqs { t as i32 } else { -1 }).collect();
        let slots: Vec<u32> = (0..n)
            .map(|t| {
                if t >= n_seqs {
                    return u32::MAX;
                }
                let p = positions[t] as usize;
                b.block_tables[t * b.max_blocks_per_seq + p / block_size] * block_size as u32 + (p % block_size) as u32
            })
            .collect();
        let inv_freq: Vec<f32> = (0..hd / 2).map(|i| 1.0 / 500000f32.powf(2.0 * i as f32 / hd as f32)).collect();
        let rows = case.n_blocks * block_size * kv;
        let cache_vals = [random_bf16(&mut r, rows * hd, 1.0), random_bf16(&mut r, rows * hd, 1.0)];
        let (pb, fb, sb, tsq, tables) = (
            g.upload(&positions).expect("p"),
            g.upload(&inv_freq).expect("f"),
            g.upload(&slots).expect("s"),
            g.upload(&token_seq).expect("ts"),
            g.upload(&b.block_tables).expect("tables"),
        );
        let biased = up_bf16(&g, &bias);
        for (fp8, with_bias) in [(false, false), (false, true), (true, false), (true, true)] {
            let bias_ptr = if with_bias { biased.ptr() } else { 0 };
            // Each path gets its own copy of the cache.
            let cache = || -> [DeviceBuffer; 4] {
                if fp8 {
                    let [k, v] = cache_vals
                        .each_ref()
                        .map(|c| Fp8Matrix::quantize(c, rows, hd, Granularity::Channel, Fp8Format::E4M3));
                    [
                        g.upload(&k.codes).expect("k"),
                        g.upload(&v.codes).expect("v"),
                        g.upload(&k.scales).expect("ks"),
                        g.upload(&v.scales).expect("vs"),
                    ]
                } else {
                    [
                        up_bf16(&g, &cache_vals[0]),
                        up_bf16(&g, &cache_vals[1]),
                        g.alloc(4).expect("a"),
                        g.alloc(4).expect("a"),
                    ]
                }
            };
            let paged = |c: &[DeviceBuffer; 4]| PagedKv {
                k_cache: c[0].ptr(),
                v_cache: c[1].ptr(),
                k_scales: if fp8 { c[2].ptr() } else { 0 },
                v_scales: if fp8 { c[3].ptr() } else { 0 },
                block_tables: tables.ptr(),
                max_blocks: b.max_blocks_per_seq,
                block_size,
                n_heads: heads,
                n_kv: kv,
                head_dim: hd,
                scale: 1.0 / (hd as f32).sqrt(),
            };
            let counters = g.zeros(4 * n * kv).expect("counters");
            for splits in [1, 3, 8, 32] {
                let part_o = g.alloc(4 * n * heads * splits * hd).expect("po");
                let part_ml = g.alloc(4 * n * heads * splits * 2).expect("pml");
                let scratch =
                    ops::DecodeScratch { part_o: part_o.ptr(), part_ml: part_ml.ptr(), counters: counters.ptr() };
                let run = |fused: bool| {
                    let (c, qb) = (cache(), up_bf16(&g, &qkv));
                    let kvp = paged(&c);
                    if !fused && fp8 {
                        let cache = [kvp.k_cache, kvp.v_cache, kvp.k_scales, kvp.v_scales];
                        ops::rope_kv_write_fp8(
                            &g,
                            qb.ptr(),
                            bias_ptr,
                            pb.ptr(),
                            fb.ptr(),
                            sb.ptr(),
                            cache,
                            n,
                            heads,
                            kv,
                            hd,
                        )
                        .expect("rope fp8");
                    } else if !fused {
                        let (k, v) = (kvp.k_cache, kvp.v_cache);
                        ops::rope_kv_write(
                            &g,
                            qb.ptr(),
                            bias_ptr,
                            pb.ptr(),
                            fb.ptr(),
                            sb.ptr(),
                            k,
                            v,
                            n,
                            heads,
                            kv,
                            hd,
                        )
                        .expect("rope");
                    }
                    let rope = ops::DecodeRope { bias: bias_ptr, inv_freq: fb.ptr(), slots: sb.ptr() };
                    let (out, amax) =
                        (poisoned(&g, 2 * n * heads * hd), g.zeros(4 * n * ops::AMAX_SLOTS).expect("amax"));
                    ops::attention_decode(
                        &g,
                        &kvp,
                        qb.ptr(),
                        width,
                        tsq.ptr(),
                        pb.ptr(),
                        &scratch,
                        out.ptr(),
                        amax.ptr(),
                        fused.then_some(&rope),
                        n,
                        splits,
                    )
                    .expect("decode");
                    let cache_bytes = if fp8 { rows * hd } else { 2 * rows * hd };
                    let bytes: Vec<Vec<u8>> = c
                        .iter()
                        .zip([cache_bytes, cache_bytes, 4 * rows, 4 * rows])
                        .take(if fp8 { 4 } else { 2 })
                        .map(|(buf, len)| read_u8(&g, buf, len))
                        .collect();
                    (
                        read_u16(&g, &out, n * heads * hd),
                        read_f32(&g, &amax, n * ops::AMAX_SLOTS),
                        bytes,
                        read_u16(&g, &qb, n * width),
                    )
                };
                let (fused, separate) = (run(true), run(false));
                let what =
                    format!("heads {heads}/{kv} hd {hd} block {block_size} fp8 {fp8} bias {with_bias} splits {splits}");
                assert_eq!(
                    fused.0[..n_seqs * heads * hd],
                    separate.0[..n_seqs * heads * hd],
                    "{what}: attention output"
                );
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&fused.1), bits(&separate.1), "{what}: published amax");
                for (i, name) in ["k codes", "v codes", "k scales", "v scales"].iter().enumerate().take(fused.2.len()) {
                    assert!(fused.2[i] == separate.2[i], "{what}: {name} of the cache differ");
                }
                let raw: Vec<u16> = to_bf16(&qkv).iter().map(|x| x.to_bits()).collect();
                assert_eq!(fused.3, raw, "{what}: the fused kernel changed the QKV rows");
                let left = read_u8(&g, &counters, 4 * n * kv);
                assert!(left.iter().all(|&c| c == 0), "{what}: counters left");
            }
        }
    }
}

#[test]
fn sampling_is_greedy_exact_and_respects_top_k_top_p_and_min_p() {
    let Some(g) = gpu() else { return };
    let mut r = rng();
    let vocab = 128_256;
    let rows = 6;
    let logits: Vec<f32> = (0..rows * vocab).map(|_| r.random_range(-5.0f32..5.0)).collect();
    let lb = g.upload(&logits).expect("logits");
    // Each row's entries in sampling order: logit descending, ties to the lower id.
    let order: Vec<Vec<u32>> = (0..rows)
        .map(|row| {
            let x = &logits[row * vocab..(row + 1) * vocab];
            let mut idx: Vec<u32> = (0..vocab as u32).collect();
            idx.sort_by(|&a, &b| x[b as usize].total_cmp(&x[a as usize]).then(a.cmp(&b)));
            idx
        })
        .collect();
    let out = g.alloc(4 * rows).expect("out");
    let draw = |params: &[DeviceSampling]| -> Vec<u32> {
        let pb = g.upload(params).expect("params");
        ops::sample(&g, lb.ptr(), vocab, pb.ptr(), out.ptr(), rows).expect("sample");
        let mut t = vec![0u32; rows];
        g.read(out.ptr(), &mut t).expect("read");
        t
    };
    let firsts: Vec<u32> = order.iter().map(|o| o[0]).collect();
    let with = |temperature: f32, top_k: i32, top_p: f32, min_p: f32, u: f64| {
        vec![DeviceSampling { temperature, top_k, top_p, min_p, u }; rows]
    };
    assert_eq!(draw(&vec![DeviceSampling::GREEDY; rows]), firsts, "greedy is the argmax");
    assert_eq!(draw(&with(1.0, 1, 1.0, 0.0, 0.7)), firsts, "top-k 1 is the argmax");
    assert_eq!(draw(&with(1.0, 0, 1e-6, 0.0, 0.9)), firsts, "a tiny top-p keeps only the most likely token");
    assert_eq!(draw(&with(1.0, 0, 1.0, 0.0, 0.0)), firsts, "u = 0 takes the first token in order");
    assert_eq!(draw(&with(1.0, 0, 1.0, 1.0, 0.99)), firsts, "min-p 1 keeps only the most likely token");
    // Top-k 5 with u just below 1 takes the fifth token; spread over u, every one of the five.
    let fifth: Vec<u32> = order.iter().map(|o| o[4]).collect();
    assert_eq!(draw(&with(1.0, 5, 1.0, 0.0, 1.0 - 1e-12)), fifth, "the last of the top 5");
    for step in 0..32 {
        let u = r.random::<f64>();
        let t = draw(&with(0.7, 5, 1.0, 0.0, u));
        for row in 0..rows {
            assert!(order[row][..5].contains(&t[row]), "row {row}: token {} outside the top 5", t[row]);
        }
        let t = draw(&with(1.0, 0, 1.0, 0.0, (step as f64 + 0.5) / 32.0));
        assert!(t.iter().all(|&t| (t as usize) < vocab));
    }
    // Unrestricted sampling of a flat row covers many tokens.
    let distinct: std::collections::HashSet<u32> =
        (0..32).map(|s| draw(&with(1.0, 0, 1.0, 0.0, (s as f64 + 0.5) / 32.0))[0]).collect();
    assert!(distinct.len() > 16, "sampling over 128k near-uniform logits repeated itself: {} distinct", distinct.len());
}

#[test]
fn random_fill_has_the_asked_moments() {
    let Some(g) = gpu() else { return };
    let n = 1 << 20;
    let b = g.alloc(2 * n).expect("alloc");
    ops::fill_uniform(&g, b.ptr(), n, 42, 0.0, 0.02).expect("fill");
    let v = read_bf16(&g, &b, n);
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
    let std = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
    assert!(mean.abs() < 1e-3 && (std - 0.02).abs() < 1e-3, "mean {mean}, std {std}");
}

// ---- FP8 ----------------------------------------------------------------------------------

use flint_quant::{Fp8Format, Fp8Matrix, Granularity};

fn read_u16(g: &Gpu, buf: &DeviceBuffer, n: usize) -> Vec<u16> {
    let mut out = vec![0u16; n];
    g.read(buf.ptr(), &mut out).expect("read");
    out
}

fn read_u8(g: &Gpu, buf: &DeviceBuffer, n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    g.read(buf.ptr(), &mut out).expect("read");
    out
}

/// Codes may differ from the host's by one step where v / scale lands on a rounding tie after the
/// device's division; the values they stand for must agree to that step.
fn check_codes(what: &str, got: &[u8], got_scales: &[f32], want: &Fp8Matrix) {
    let table = flint_quant::fp8::decode_table(Fp8Format::E4M3);
    for (r, (&gs, &ws)) in got_scales.iter().zip(&want.scales).enumerate() {
        assert!((gs - ws).abs() <= 1e-6 * ws.abs(), "{what}: scale of row {r}: {gs} vs {ws}");
    }
    let mut off = 0;
    for (i, (&a, &b)) in got.iter().zip(&want.codes).enumerate() {
        if a != b {
            off += 1;
            let (va, vb) = (table[a as usize], table[b as usize]);
            assert!((va - vb).abs() <= vb.abs() / 8.0 + 1e-9, "{what}: code {i}: {a:#x} ({va}) vs {b:#x} ({vb})");
        }
    }
    assert!(off * 1000 <= got.len(), "{what}: {off} of {} codes differ", got.len());
}

#[test]
fn fp8_quantization_kernels_match_the_host() {
    let Some(g) = gpu() else { return };
    let mut r = rng();
    // 576 and 4096 hold the row in 2 vectors per thread of the norm, 8192 in 4, 14336 in 8; 20480 takes three passes.
    for (rows, cols) in [(1, 8), (7, 576), (33, 4096), (3, 8192), (5, 14336), (2, 20480)] {
        let x = random_bf16(&mut r, rows * cols, 3.0);
        let xb = up_bf16(&g, &x);
        let (codes, scales) = (poisoned(&g, rows * cols), poisoned(&g, 4 * rows));
        ops::quantize_rows(&g, xb.ptr(), codes.ptr(), scales.ptr(), rows, cols).expect("launch");
        let want = Fp8Matrix::quantize(&x, rows, cols, Granularity::Channel, Fp8Format::E4M3);
        check_codes(
            &format!("quantize_rows {rows}x{cols}"),
            &read_u8(&g, &codes, rows * cols),
            &read_f32(&g, &scales, rows),
            &want,
        );

        // RMSNorm (with the residual add) then quantization; the reference rounds as the kernel does.
        let add = random_bf16(&mut r, rows * cols, 1.0);
        let w: Vec<f32> = random_bf16(&mut r, cols, 1.0);
        let res = up_bf16(&g, &x);
        let addb = up_bf16(&g, &add);
        let wb = g.upload(&w).expect("upload");
        ops::add_rms_norm_fp8(&g, res.ptr(), addb.ptr(), wb.ptr(), codes.ptr(), scales.ptr(), rows, cols, 1e-5)
            .expect("launch");
        let sum: Vec<f32> = x.iter().zip(&add).map(|(a, b)| bf16::from_f32(a + b).to_f32()).collect();
        let mut normed = vec![0f32; rows * cols];
        for i in 0..rows {
            let row = &sum[i * cols..(i + 1) * cols];
            let rr = 1.0 / (row.iter().map(|v| v * v).sum::<f32>() / cols as f32 + 1e-5).sqrt();
            for j in 0..cols {
                normed[i * cols + j] = bf16::from_f32(w[j] * bf16::from_f32(row[j] * rr).to_f32()).to_f32();
            }
        }
        let want = Fp8Matrix::quantize(&normed, rows, cols, Granularity::Channel, Fp8Format::E4M3);
        check_codes(
            &format!("add_rms_norm_fp8 {rows}x{cols}"),
            &read_u8(&g, &codes, rows * cols),
            &read_f32(&g, &scales, rows),
            &want,
        );
        check(&format!("add_rms_norm_fp8 residual {rows}x{cols}"), &read_bf16(&g, &res, rows * cols), &sum, 1e-6);

        // SwiGLU then quantization.
        let gu = random_bf16(&mut r, rows * 2 * cols, 2.0);
        let gub = up_bf16(&g, &gu);
        ops::silu_mul_fp8(&g, gub.ptr(), codes.ptr(), scales.ptr(), rows, cols).expect("launch");
        let mut act = vec![0f32; rows * cols];
        for i in 0..rows {
            for j in 0..cols {
                let (a, b) = (gu[i * 2 * cols + j], gu[i * 2 * cols + cols + j]);
                act[i * cols + j] = bf16::from_f32(a / (1.0 + (-a).exp()) * b).to_f32();
            }
        }
        let want = Fp8Matrix::quantize(&act, rows, cols, Granularity::Channel, Fp8Format::E4M3);
        check_codes(
            &format!("silu_mul_fp8 {rows}x{cols}"),
            &read_u8(&g, &codes, rows * cols),
            &read_f32(&g, &scales, rows),
            &want,
        );
    }
}

/// x and W as FP8 codes with per-row scales, and the exact product of the values they stand for.
struct Fp8Case {
    xq: Fp8Matrix,
    wq: Fp8Matrix,
    want: Vec<f32>,
}

fn fp8_case(r: &mut impl Rng, cpu: &CpuBackend, m: usize, n: usize, k: usize) -> Fp8Case {
    let x = random_bf16(r, m * k, 2.0);
    let w = random_bf16(r, n * k, 0.05);
    let xq = Fp8Matrix::quantize(&x, m, k, Granularity::Channel, Fp8Format::E4M3);
    let wq = Fp8Matrix::quantize(&w, n, k, Granularity::Channel, Fp8Format::E4M3);
    let want = cpu_linear(cpu, &xq.dequantize(), &wq.dequantize(), m, n, k);
    Fp8Case { xq, wq, want }
}

#[test]
fn fp8_gemv_and_gemm_match_the_dequantized_product() {
    let Some(g) = gpu() else { return };
    let mut r = rng();
    let cpu = CpuBackend::new();
    let gemm = Gemm::new(&g).expect("cublasLt");
    // Where cuBLASLt refuses per-row scales the product goes through a reserved f32 scratch.
    gemm.reserve_fp8(&g, 128 * 6144).expect("reserve the FP8 scratch");
    // GEMV: every batch size and compiled variant, plain and SwiGLU, K with and without a tail
    // past the unrolled chunks, n with a partial last block.
    for (n, k) in [(16, 64), (960, 576), (4096, 4096), (6144, 4160), (1536, 14336), (200, 1024)] {
        for m in 1..=8 {
            let c = fp8_case(&mut r, &cpu, m, 2 * n, k);
            let (xb, xs) = (g.upload(&c.xq.codes).expect("up"), g.upload(&c.xq.scales).expect("up"));
            let (wb, ws) = (g.upload(&c.wq.codes).expect("up"), g.upload(&c.wq.scales).expect("up"));
            let mut act = vec![0f32; m * n];
            for t in 0..m {
                for j in 0..n {
                    let gt = bf16::from_f32(c.want[t * 2 * n + j]).to_f32();
                    let up = bf16::from_f32(c.want[t * 2 * n + n + j]).to_f32();
                    act[t * n + j] = gt / (1.0 + (-gt).exp()) * up;
                }
            }
            let configs = std::iter::once(None).chain(ops::Fp8GemvConfig::ALL.map(Some));
            for config in configs.filter(|c| c.is_none() || [1, 3, 8].contains(&m)) {
                let run = |n: usize, y: u64, epilogue| {
                    let op = ops::Fp8Gemv::codes(xb.ptr(), xs.ptr(), wb.ptr(), ws.ptr(), y, m, n, k, epilogue);
                    ops::run_gemv_fp8(&g, config, &op)
                };
                let label = config.map_or("default".to_string(), |c| c.label());
                let yb = poisoned(&g, 2 * m * 2 * n);
                run(2 * n, yb.ptr(), ops::Fp8Epilogue::Bf16).expect("launch");
                check(
                    &format!("gemv_fp8 {label} m={m} n={} k={k}", 2 * n),
                    &read_bf16(&g, &yb, m * 2 * n),
                    &c.want,
                    1e-2,
                );
                // SwiGLU over [gate; up] = the first and second n rows.
                let yb = poisoned(&g, 2 * m * n);
                run(n, yb.ptr(), ops::Fp8Epilogue::SwiGlu).expect("launch");
                check(&format!("gemv_fp8 swiglu {label} m={m} n={n} k={k}"), &read_bf16(&g, &yb, m * n), &act, 1e-2);
            }
        }
    }
    // cuBLASLt FP8 with per-row scales on both sides.
    for (m, n, k) in [(9, 4096, 4096), (37, 960, 576), (128, 6144, 4096), (300, 512, 1536)] {
        let c = fp8_case(&mut r, &cpu, m, n, k);
        let (xb, xs) = (g.upload(&c.xq.codes).expect("up"), g.upload(&c.xq.scales).expect("up"));
        let (wb, ws) = (g.upload(&c.wq.codes).expect("up"), g.upload(&c.wq.scales).expect("up"));
        let yb = poisoned(&g, 2 * m * n);
        gemm.matmul_fp8(&g, xb.ptr(), xs.ptr(), wb.ptr(), ws.ptr(), yb.ptr(), m, n, k).expect("gemm");
        check(&format!("gemm fp8 {m}x{n}x{k}"), &read_bf16(&g, &yb, m * n), &c.want, 1e-2);
    }
}

/// A GEMV that asks its weights into L2 before its wait (every block, with a 1 GiB budget) gives
/// the bits it gives without: BF16 (plain, SwiGLU, f32) and FP8 (codes and bf16 input).
#[test]
fn gemv_l2_prefetch_changes_no_bit() {
    let Some(g) = gpu() else { return };
    let mut r = rng();
    let cpu = CpuBackend::new();
    g.set_launch_tuning(flint_cuda::LaunchTuning { early_launch: true, l2_prefetch_budget: 1 << 30 }).expect("tuning");
    for (n, k) in [(16, 64), (4096, 4096), (1536, 14336), (208, 1024)] {
        for m in [1, 2, 8] {
            let x = random_bf16(&mut r, m * k, 1.0);
            let w = random_bf16(&mut r, 2 * n * k, 0.05);
            let (xb, wb) = (up_bf16(&g, &x), up_bf16(&g, &w));
            for e in [Epilogue::Bf16, Epilogue::F32, Epilogue::SwiGlu] {
                let run = |l2: bool| {
                    let y = poisoned(&g, 4 * m * n);
                    ops::gemv_l2(&g, xb.ptr(), wb.ptr(), y.ptr(), m, n, k, e, l2).expect("launch");
                    read_u8(&g, &y, 4 * m * n)
                };
                assert_eq!(run(false), run(true), "gemv {e:?} m={m} n={n} k={k}");
            }
            let c = fp8_case(&mut r, &cpu, m, 2 * n, k);
            let (xq, xs) = (g.upload(&c.xq.codes).expect("up"), g.upload(&c.xq.scales).expect("up"));
            let (wq, ws) = (g.upload(&c.wq.codes).expect("up"), g.upload(&c.wq.scales).expect("up"));
            for e in [ops::Fp8Epilogue::Bf16, ops::Fp8Epilogue::SwiGlu] {
                let run = |l2: bool| {
                    let y = poisoned(&g, 4 * m * n);
                    let op = ops::Fp8Gemv {
                        l2_prefetch: l2,
                        ..ops::Fp8Gemv::codes(xq.ptr(), xs.ptr(), wq.ptr(), ws.ptr(), y.ptr(), m, n, k, e)
                    };
                    ops::run_gemv_fp8(&g, None, &op).expect("launch");
                    read_u8(&g, &y, 4 * m * n)
                };
                assert_eq!(run(false), run(true), "gemv_fp8 {e:?} m={m} n={n} k={k}");
            }
        }
    }
    g.set_launch_tuning(flint_cuda::LaunchTuning::default()).expect("tuning");
}

/// The FP8 GEMV that quantizes its bf16 input from published amax slots gives, bit for bit, the
/// output of `quantize_rows` then the GEMV of the codes; it zeroes the slots it is told to, and
/// the SwiGLU epilogue publishes its output's exact amax.
#[test]
fn fp8_gemv_of_bf16_input_equals_quantize_then_gemv() {
    let Some(g) = gpu() else { return };
    let mut r = rng();
    // The 8B projections (o, down), a K tail past the chunks (576), a partial last block (200).
    for (n, k) in [(4096, 4096), (4096, 14336), (960, 576), (200, 1024)] {
        let w = random_bf16(&mut r, 2 * n * k, 0.05);
        let wq = Fp8Matrix::quantize(&w, 2 * n, k, Granularity::Channel, Fp8Format::E4M3);
        let (wb, ws) = (g.upload(&wq.codes).expect("up"), g.upload(&wq.scales).expect("up"));
        for m in 1..=ops::GEMV_FP8_QUANTIZING_MAX_M {
            let mut x = random_bf16(&mut r, m * k, 3.0);
            // Zeros of both signs, and a row of zeros (scale 1) beside a real one.
            x[0] = 0.0;
            x[1] = -0.0;
            if m == 2 {
                x[k..2 * k].fill(0.0);
            }
            let xb = up_bf16(&g, &x);
            let (codes, scales) = (poisoned(&g, m * k), poisoned(&g, 4 * m));
            ops::quantize_rows(&g, xb.ptr(), codes.ptr(), scales.ptr(), m, k).expect("quantize");
            // Each row's amax in one slot, smaller values in the others.
            let mut slots = vec![0f32; m * ops::AMAX_SLOTS];
            for t in 0..m {
                let amax = x[t * k..(t + 1) * k].iter().map(|v| v.abs()).fold(0f32, f32::max);
                for (s, slot) in slots[t * ops::AMAX_SLOTS..(t + 1) * ops::AMAX_SLOTS].iter_mut().enumerate() {
                    *slot = if s == (7 * t + 3) % ops::AMAX_SLOTS { amax } else { amax * r.random_range(0.0..1.0) };
                }
            }
            let amax = g.upload(&slots).expect("up");
            let configs = std::iter::once(None).chain(ops::Fp8GemvConfig::ALL.map(Some));
            for config in configs {
                let label = config.map_or("default".to_string(), |c| c.label());
                for (epilogue, rows) in [(ops::Fp8Epilogue::Bf16, 2 * n), (ops::Fp8Epilogue::SwiGlu, n)] {
                    let what = format!("gemv_fp8q {label} {epilogue:?} m={m} n={rows} k={k}");
                    let want = poisoned(&g, 2 * m * rows);
                    let published = g.zeros(4 * m * ops::AMAX_SLOTS).expect("slots");
                    let swiglu = epilogue == ops::Fp8Epilogue::SwiGlu;
                    let mut op = ops::Fp8Gemv::codes(
                        codes.ptr(),
                        scales.ptr(),
                        wb.ptr(),
                        ws.ptr(),
                        want.ptr(),
                        m,
                        rows,
                        k,
                        epilogue,
                    );
                    op.publish_amax = if swiglu { published.ptr() } else { 0 };
                    ops::run_gemv_fp8(&g, config, &op).expect("codes");
                    let got = poisoned(&g, 2 * m * rows);
                    let cleared = poisoned(&g, 4 * m * ops::AMAX_SLOTS);
                    let op = ops::Fp8Gemv {
                        input: ops::Fp8Input::Bf16 { x: xb.ptr(), amax: amax.ptr() },
                        y: got.ptr(),
                        publish_amax: 0,
                        clear_amax: cleared.ptr(),
                        ..op
                    };
                    ops::run_gemv_fp8(&g, config, &op).expect("bf16 input");
                    let (a, b) = (read_u16(&g, &got, m * rows), read_u16(&g, &want, m * rows));
                    let diff = a.iter().zip(&b).position(|(a, b)| a != b);
                    assert!(
                        diff.is_none(),
                        "{what}: output {diff:?} differs: {:#x} vs {:#x}",
                        a[diff.unwrap()],
                        b[diff.unwrap()]
                    );
                    assert!(
                        read_f32(&g, &cleared, m * ops::AMAX_SLOTS).iter().all(|&v| v.to_bits() == 0),
                        "{what}: slots not cleared"
                    );
                    if swiglu {
                        check_published_amax(&g, &published, &read_bf16(&g, &want, m * rows), m, &what);
                    }
                }
            }
        }
    }
    // A bf16 input that would clear its own slots or has more tokens than the kernel converts, or a
    // plain epilogue that publishes, is refused.
    let buf = g.zeros(4 * ops::AMAX_SLOTS * 16).expect("buf");
    let mut op =
        ops::Fp8Gemv::codes(buf.ptr(), buf.ptr(), buf.ptr(), buf.ptr(), buf.ptr(), 1, 16, 64, ops::Fp8Epilogue::Bf16);
    op.publish_amax = buf.ptr();
    assert!(ops::run_gemv_fp8(&g, None, &op).is_err());
    let op = ops::Fp8Gemv {
        input: ops::Fp8Input::Bf16 { x: buf.ptr(), amax: buf.ptr() },
        publish_amax: 0,
        clear_amax: buf.ptr(),
        ..op
    };
    assert!(ops::run_gemv_fp8(&g, None, &op).is_err());
    let other = g.zeros(4 * ops::AMAX_SLOTS * 16).expect("buf");
    let op = ops::Fp8Gemv { clear_amax: other.ptr(), ..op };
    ops::run_gemv_fp8(&g, None, &op).expect("one token of a bf16 input");
    let op = ops::Fp8Gemv { m: ops::GEMV_FP8_QUANTIZING_MAX_M + 1, ..op };
    assert!(ops::run_gemv_fp8(&g, None, &op).is_err());
    g.synchronize().expect("sync");
}

/// Amax slots of the rows of `x` (`[m, k]`) as a producer publishes them: each row's amax in one
/// slot, smaller values in the others.
fn amax_slots(r: &mut impl Rng, x: &[f32], m: usize, k: usize) -> Vec<f32> {
    let mut slots = vec![0f32; m * ops::AMAX_SLOTS];
    for t in 0..m {
        let amax = x[t * k..(t + 1) * k].iter().map(|v| v.abs()).fold(0f32, f32::max);
        for (s, slot) in slots[t * ops::AMAX_SLOTS..(t + 1) * ops::AMAX_SLOTS].iter_mut().enumerate() {
            *slot = if s == (5 * t + 2) % ops::AMAX_SLOTS { amax } else { amax * r.random_range(0.0..1.0) };
        }
    }
    slots
}

/// A random activation `[m, k]` as the two inputs of an FP8 GEMV: its codes and scales (as
/// `quantize_rows` writes them) and the bf16 rows with their amax slots; and the buffers behind
/// them, to keep alive while the inputs are used.
fn fp8_inputs(
    g: &Gpu,
    r: &mut impl Rng,
    m: usize,
    k: usize,
) -> (Vec<DeviceBuffer>, [(&'static str, ops::Fp8Input); 2]) {
    let x = random_bf16(r, m * k, 2.0);
    let xb = up_bf16(g, &x);
    let (xq, xs) = (poisoned(g, m * k), poisoned(g, 4 * m));
    ops::quantize_rows(g, xb.ptr(), xq.ptr(), xs.ptr(), m, k).expect("quantize");
    let amax = g.upload(&amax_slots(r, &x, m, k)).expect("up");
    let inputs = [
        ("codes", ops::Fp8Input::Codes { x: xq.ptr(), scales: xs.ptr() }),
        ("bf16", ops::Fp8Input::Bf16 { x: xb.ptr(), amax: amax.ptr() }),
    ];
    (vec![xb, xq, xs, amax], inputs)
}

/// The add + RMSNorm + quantize split over two FP8 GEMVs (`ops::SplitNorm`) against the first
/// one's norm tail followed by a GEMV of its codes: the same residual bit for bit; partials whose
/// sums of squares add up to the residual's and whose max is that of |residual * weight| exactly;
/// and outputs of the next GEMV (plain and SwiGLU) near the tail's (the scales differ in the last
/// bits, which moves some codes a step) and no further from the exact product of the normed
/// residual than the tail's are. For codes and bf16
/// inputs of the first GEMV, one and two tokens, every variant compiled with the split, and
/// hidden sizes from 64 to 8192. Splits that do not fit are refused.
#[test]
fn gemv_split_norm_matches_the_norm_tail() {
    let Some(g) = gpu() else { return };
    let mut r = rng();
    let eps = 1e-5;
    // (hidden, k of the first GEMV, rows of the next): SmolLM2's O, the 8B O and down (s16), a
    // hidden of 512 tiles (s8_u2), a small one.
    for (n, k, n2) in [(576, 576, 960), (4096, 4096, 6144), (4096, 14336, 1024), (8192, 1024, 512), (64, 128, 64)] {
        let w = random_bf16(&mut r, n * k, 0.05);
        let wq = Fp8Matrix::quantize(&w, n, k, Granularity::Channel, Fp8Format::E4M3);
        let (wb, ws) = (g.upload(&wq.codes).expect("up"), g.upload(&wq.scales).expect("up"));
        // The next GEMV: n2 plain outputs, or n2 / 2 of SwiGLU (gate rows, then up rows).
        let w2 = random_bf16(&mut r, n2 * n, 0.05);
        let w2q = Fp8Matrix::quantize(&w2, n2, n, Granularity::Channel, Fp8Format::E4M3);
        let (w2b, w2s) = (g.upload(&w2q.codes).expect("up"), g.upload(&w2q.scales).expect("up"));
        let w2d = w2q.dequantize();
        let norm_w: Vec<f32> = (0..n).map(|_| r.random_range(0.5f32..1.5)).collect();
        let nw = g.upload(&norm_w).expect("up");
        let counter = g.zeros(4).expect("counter");
        let parts = ops::split_norm_parts(n);
        for m in 1..=ops::GEMV_FP8_QUANTIZING_MAX_M {
            let residual = random_bf16(&mut r, m * n, 4.0);
            let (_buffers, inputs) = fp8_inputs(&g, &mut r, m, k);
            let configs = std::iter::once(None).chain(ops::Fp8GemvConfig::NORM_TAIL.map(Some));
            for config in configs {
                for (input_name, input) in inputs {
                    let label = config.map_or("default".to_string(), |c| c.label());
                    let what = format!("split norm {label} {input_name} m={m} n={n} k={k}");
                    let first = ops::Fp8Gemv {
                        input,
                        ..ops::Fp8Gemv::codes(0, 0, wb.ptr(), ws.ptr(), 0, m, n, k, ops::Fp8Epilogue::Bf16)
                    };
                    let nexts = [(ops::Fp8Epilogue::Bf16, n2), (ops::Fp8Epilogue::SwiGlu, n2 / 2)];
                    // The tail: residual, then the next GEMV's outputs from its codes.
                    let res_a = up_bf16(&g, &residual);
                    let (y, codes, scales) = (poisoned(&g, 2 * m * n), poisoned(&g, m * n), poisoned(&g, 4 * m));
                    let tail = ops::NormTail {
                        residual: res_a.ptr(),
                        weight: nw.ptr(),
                        codes: codes.ptr(),
                        scales: scales.ptr(),
                        counter: counter.ptr(),
                        eps,
                    };
                    let op = ops::Fp8Gemv { y: y.ptr(), norm_tail: Some(tail), ..first };
                    ops::run_gemv_fp8(&g, config, &op).expect("tail");
                    let want: Vec<Vec<f32>> = nexts
                        .iter()
                        .map(|&(e, rows)| {
                            let out = poisoned(&g, 2 * m * rows);
                            let op = ops::Fp8Gemv::codes(
                                codes.ptr(),
                                scales.ptr(),
                                w2b.ptr(),
                                w2s.ptr(),
                                out.ptr(),
                                m,
                                rows,
                                n,
                                e,
                            );
                            ops::run_gemv_fp8(&g, None, &op).expect("next of codes");
                            read_bf16(&g, &out, m * rows)
                        })
                        .collect();
                    // The split: the same residual and partials, then the next GEMV from them.
                    let res_b = up_bf16(&g, &residual);
                    let partials = poisoned(&g, 8 * m * parts);
                    let split =
                        ops::SplitNorm { weight: nw.ptr(), partials: partials.ptr(), n_parts: parts as i32, eps };
                    let op = ops::Fp8Gemv { y: res_b.ptr(), split_norm: Some(split), ..first };
                    ops::run_gemv_fp8(&g, config, &op).expect("split");
                    let res = read_u16(&g, &res_a, m * n);
                    assert_eq!(read_u16(&g, &res_b, m * n), res, "{what}: residual");
                    let res: Vec<f32> = res.iter().map(|&b| bf16::from_bits(b).to_f32()).collect();
                    let p = read_f32(&g, &partials, 2 * m * parts);
                    for t in 0..m {
                        let row = &res[t * n..(t + 1) * n];
                        let ss: f64 = row.iter().map(|&v| (v as f64).powi(2)).sum();
                        let got_ss: f64 = (0..parts).map(|i| p[2 * (t * parts + i)] as f64).sum();
                        assert!((got_ss - ss).abs() <= 1e-5 * ss, "{what}: token {t} sum of squares {got_ss} vs {ss}");
                        let mx = row.iter().zip(&norm_w).map(|(v, w)| (v * w).abs()).fold(0f32, f32::max);
                        let got_mx = (0..parts).map(|i| p[2 * (t * parts + i) + 1]).fold(0f32, f32::max);
                        assert_eq!(got_mx.to_bits(), mx.to_bits(), "{what}: token {t} max");
                    }
                    // The exact normed residual.
                    let normed: Vec<f32> = (0..m)
                        .flat_map(|t| {
                            let row = &res[t * n..(t + 1) * n];
                            let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n as f64;
                            let rr = 1.0 / (ms + eps as f64).sqrt();
                            row.iter().zip(&norm_w).map(move |(&v, &w)| (v as f64 * rr * w as f64) as f32)
                        })
                        .collect();
                    for (&(e, rows), want) in nexts.iter().zip(&want) {
                        let out = poisoned(&g, 2 * m * rows);
                        let input = ops::Fp8Input::Normed { residual: res_b.ptr(), norm: split };
                        let op = ops::Fp8Gemv {
                            input,
                            ..ops::Fp8Gemv::codes(0, 0, w2b.ptr(), w2s.ptr(), out.ptr(), m, rows, n, e)
                        };
                        ops::run_gemv_fp8(&g, None, &op).expect("next of the split");
                        let got = read_bf16(&g, &out, m * rows);
                        let mut exact = Vec::with_capacity(m * rows);
                        for t in 0..m {
                            let xrow = &normed[t * n..(t + 1) * n];
                            let dot = |j: usize| -> f32 {
                                w2d[j * n..(j + 1) * n].iter().zip(xrow).map(|(a, b)| (a * b) as f64).sum::<f64>()
                                    as f32
                            };
                            for j in 0..rows {
                                exact.push(match e {
                                    ops::Fp8Epilogue::Bf16 => dot(j),
                                    ops::Fp8Epilogue::SwiGlu => {
                                        let (gate, up) = (dot(j), dot(rows + j));
                                        gate / (1.0 + (-gate).exp()) * up
                                    }
                                });
                            }
                        }
                        let (vs_tail, err, tail_err) =
                            (rel_err(&got, want), rel_err(&got, &exact), rel_err(want, &exact));
                        assert!(vs_tail <= 5e-2, "{what} next {e:?}: rel err {vs_tail:.2e} against the tail's output");
                        assert!(
                            err <= 1.5 * tail_err + 1e-3,
                            "{what} next {e:?}: rel err {err:.2e} to the exact product, the tail's {tail_err:.2e}"
                        );
                    }
                }
            }
        }
    }
    // Refused: with a tail too, a SwiGLU epilogue, three tokens, the wrong number of partials, a
    // variant compiled without the split; a normed input of three tokens, the wrong number of
    // partials or none.
    let buf = g.zeros(1 << 16).expect("buf");
    let p = buf.ptr();
    let split = ops::SplitNorm { weight: p, partials: p, n_parts: 4, eps };
    let tail = ops::NormTail { residual: p, weight: p, codes: p, scales: p, counter: p, eps };
    let op = ops::Fp8Gemv {
        split_norm: Some(split),
        ..ops::Fp8Gemv::codes(p, p, p, p, p, 1, 64, 64, ops::Fp8Epilogue::Bf16)
    };
    ops::run_gemv_fp8(&g, None, &op).expect("a split that fits");
    assert!(ops::run_gemv_fp8(&g, None, &ops::Fp8Gemv { norm_tail: Some(tail), ..op }).is_err());
    assert!(ops::run_gemv_fp8(&g, None, &ops::Fp8Gemv { epilogue: ops::Fp8Epilogue::SwiGlu, ..op }).is_err());
    assert!(ops::run_gemv_fp8(&g, None, &ops::Fp8Gemv { m: ops::GEMV_FP8_QUANTIZING_MAX_M + 1, ..op }).is_err());
    let wrong_parts = ops::SplitNorm { n_parts: 3, ..split };
    assert!(ops::run_gemv_fp8(&g, None, &ops::Fp8Gemv { split_norm: Some(wrong_parts), ..op }).is_err());
    let plain_only = ops::Fp8GemvConfig { split_k: 4, unroll: 2, prefetch: false };
    assert!(ops::run_gemv_fp8(&g, Some(plain_only), &op).is_err());
    let normed = ops::Fp8Gemv {
        input: ops::Fp8Input::Normed { residual: p, norm: split },
        ..ops::Fp8Gemv::codes(p, p, p, p, p, 1, 64, 64, ops::Fp8Epilogue::Bf16)
    };
    ops::run_gemv_fp8(&g, None, &normed).expect("a normed input that fits");
    assert!(ops::run_gemv_fp8(&g, None, &ops::Fp8Gemv { m: ops::GEMV_FP8_QUANTIZING_MAX_M + 1, ..normed }).is_err());
    let wrong_parts = ops::Fp8Input::Normed { residual: p, norm: ops::SplitNorm { n_parts: 8, ..split } };
    assert!(ops::run_gemv_fp8(&g, None, &ops::Fp8Gemv { input: wrong_parts, ..normed }).is_err());
    let no_partials = ops::Fp8Input::Normed { residual: p, norm: ops::SplitNorm { partials: 0, ..split } };
    assert!(ops::run_gemv_fp8(&g, None, &ops::Fp8Gemv { input: no_partials, ..normed }).is_err());
    g.synchronize().expect("sync");
}

/// An FP8 GEMV that runs the residual add + RMSNorm + quantize of its output in its last block
/// leaves, bit for bit, the output, residual, codes and scales of the GEMV followed by
/// `add_rms_norm_fp8`: for codes and bf16 inputs, one and two tokens, every variant compiled
/// with the tail, and outputs from 64 to 8192 wide. Its arrival counter is zero again after each
/// launch (so the next launch works too), and shapes or variants without a tail are refused.
#[test]
fn gemv_norm_tail_equals_norm_kernel() {
    let Some(g) = gpu() else { return };
    let mut r = rng();
    let eps = 1e-5;
    // SmolLM2's O (576 wide), the 8B O and down (s16), an output of 512 tiles (s8_u2), a small one.
    for (n, k) in [(576, 576), (4096, 4096), (4096, 14336), (8192, 1024), (64, 128)] {
        let w = random_bf16(&mut r, n * k, 0.05);
        let wq = Fp8Matrix::quantize(&w, n, k, Granularity::Channel, Fp8Format::E4M3);
        let (wb, ws) = (g.upload(&wq.codes).expect("up"), g.upload(&wq.scales).expect("up"));
        let norm_w: Vec<f32> = (0..n).map(|_| r.random_range(0.5f32..1.5)).collect();
        let nw = g.upload(&norm_w).expect("up");
        let counter = g.zeros(4).expect("counter");
        for m in 1..=ops::NORM_TAIL_MAX_M {
            let residual = random_bf16(&mut r, m * n, 4.0);
            let (_buffers, inputs) = fp8_inputs(&g, &mut r, m, k);
            let configs = std::iter::once(None).chain(ops::Fp8GemvConfig::NORM_TAIL.map(Some));
            for config in configs {
                for (input_name, input) in inputs {
                    let label = config.map_or("default".to_string(), |c| c.label());
                    let what = format!("gemv_fp8 norm tail {label} {input_name} m={m} n={n} k={k}");
                    // Output, residual, codes, scales.
                    let run = |tail: bool| {
                        let (y, res) = (poisoned(&g, 2 * m * n), up_bf16(&g, &residual));
                        let (codes, scales) = (poisoned(&g, m * n), poisoned(&g, 4 * m));
                        let op = ops::Fp8Gemv {
                            input,
                            norm_tail: tail.then_some(ops::NormTail {
                                residual: res.ptr(),
                                weight: nw.ptr(),
                                codes: codes.ptr(),
                                scales: scales.ptr(),
                                counter: counter.ptr(),
                                eps,
                            }),
                            ..ops::Fp8Gemv::codes(0, 0, wb.ptr(), ws.ptr(), y.ptr(), m, n, k, ops::Fp8Epilogue::Bf16)
                        };
                        ops::run_gemv_fp8(&g, config, &op).expect("gemv");
                        if !tail {
                            ops::add_rms_norm_fp8(
                                &g,
                                res.ptr(),
                                y.ptr(),
                                nw.ptr(),
                                codes.ptr(),
                                scales.ptr(),
                                m,
                                n,
                                eps,
                            )
                            .expect("norm");
                        }
                        (
                            read_u16(&g, &y, m * n),
                            read_u16(&g, &res, m * n),
                            read_u8(&g, &codes, m * n),
                            read_f32(&g, &scales, m).iter().map(|s| s.to_bits()).collect::<Vec<_>>(),
                        )
                    };
                    let (want, got) = (run(false), run(true));
                    assert_eq!(got.0, want.0, "{what}: output");
                    assert_eq!(got.1, want.1, "{what}: residual");
                    let diff = got.2.iter().zip(&want.2).position(|(a, b)| a != b);
                    assert!(diff.is_none(), "{what}: code {diff:?} differs");
                    assert_eq!(got.3, want.3, "{what}: scales");
                    assert_eq!(read_u8(&g, &counter, 4), [0; 4], "{what}: counter not reset");
                }
            }
        }
    }
    // Refused: a SwiGLU epilogue, three tokens, a variant compiled without the tail, no counter.
    let buf = g.zeros(1 << 16).expect("buf");
    let p = buf.ptr();
    let tail = ops::NormTail { residual: p, weight: p, codes: p, scales: p, counter: p, eps };
    let op =
        ops::Fp8Gemv { norm_tail: Some(tail), ..ops::Fp8Gemv::codes(p, p, p, p, p, 1, 64, 64, ops::Fp8Epilogue::Bf16) };
    assert!(ops::run_gemv_fp8(&g, None, &ops::Fp8Gemv { epilogue: ops::Fp8Epilogue::SwiGlu, ..op }).is_err());
    assert!(ops::run_gemv_fp8(&g, None, &ops::Fp8Gemv { m: ops::NORM_TAIL_MAX_M + 1, ..op }).is_err());
    let plain_only = ops::Fp8GemvConfig { split_k: 4, unroll: 2, prefetch: false };
    assert!(ops::run_gemv_fp8(&g, Some(plain_only), &op).is_err());
    let no_counter = ops::Fp8Gemv { norm_tail: Some(ops::NormTail { counter: 0, ..tail }), ..op };
    assert!(ops::run_gemv_fp8(&g, None, &no_counter).is_err());
    g.synchronize().expect("sync");
}
