//! How one logit row's token is drawn from a sampler's settings and a uniform draw: the rule
//! the host's sampler, the CPU runtime and the GPU's `flint_sample` kernel all follow, so that a
//! seeded request gets the same tokens wherever its rows are sampled.

/// How the device picks one logit row's token: a host sampler's settings and its uniform draw.
/// The device keeps what the host's sampler keeps (top-k, then top-p and min-p over the row in
/// order of logit, ties to the lower id) and takes the token where `u` falls in the kept mass,
/// so it picks the token the host would from the same logits ([`Draw::pick`]).
/// `temperature <= 0` or `top_k == 1`: greedy.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Draw {
    pub temperature: f32,
    /// 0: off.
    pub top_k: u32,
    /// 1: off.
    pub top_p: f32,
    /// 0: off.
    pub min_p: f32,
    /// Uniform in `[0, 1)`.
    pub u: f64,
}

/// Largest vocabulary whose token ids a step returns exactly as f32 (draws).
pub const MAX_DRAW_VOCAB: usize = 1 << 24;

impl Draw {
    /// The greedy draw (argmax; no uniform taken).
    pub const GREEDY: Draw = Draw { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, u: 0.0 };

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }

    /// Whether the fields are in range (what a step accepts).
    pub fn is_valid(&self) -> bool {
        self.u >= 0.0 && self.u < 1.0 && self.temperature.is_finite() && self.top_p > 0.0
    }

    /// The token this draw picks from a row of logits (one per vocabulary entry; NaN entries
    /// are never picked, a row of nothing but NaN gives 0).
    pub fn pick(&self, logits: &[f32]) -> u32 {
        if self.is_greedy() {
            return argmax(logits);
        }
        // Sorted as u64 keys (the logit's descending total order, then the id): the order of
        // `by_logit` exactly, a strict one, so any sort gives the same sequence; integer keys
        // sort several times faster than the comparator over a vocabulary.
        let mut keys: Vec<u64> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.is_nan())
            .map(|(i, &l)| u64::from(!total_order_key(l)) << 32 | i as u64)
            .collect();
        let k = self.top_k as usize;
        if k > 0 && k < keys.len() {
            keys.select_nth_unstable(k - 1);
            keys.truncate(k);
        }
        keys.sort_unstable();
        if keys.is_empty() {
            return argmax(logits);
        }
        let cands: Vec<(u32, f32)> = keys
            .iter()
            .map(|&key| {
                let id = key as u32;
                (id, logits[id as usize])
            })
            .collect();
        self.pick_sorted(&cands)
    }

    /// The token this draw picks from `cands` (id, logit), sorted by [`by_logit`], non-empty and
    /// already cut to `top_k`: temperature, then top-p and min-p, then where `u` falls in the
    /// kept mass (weights in f64, summed in order). An infinite largest logit holds all the
    /// mass: its first token.
    pub fn pick_sorted(&self, cands: &[(u32, f32)]) -> u32 {
        let max = cands[0].1 as f64;
        if !max.is_finite() {
            return cands[0].0;
        }
        let inv_t = 1.0 / self.temperature as f64;
        let mut probs: Vec<f64> = cands.iter().map(|&(_, l)| ((l as f64 - max) * inv_t).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);

        let mut keep = probs.len();
        if self.top_p < 1.0 {
            let mut cum = 0.0;
            for (i, q) in probs.iter().enumerate() {
                cum += q;
                if cum >= self.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
        }
        if self.min_p > 0.0 {
            let threshold = self.min_p as f64 * probs[0];
            keep = keep.min(probs.iter().take_while(|&&q| q >= threshold).count().max(1));
        }
        let kept_total: f64 = probs[..keep].iter().sum();
        let mut r = self.u * kept_total;
        for (i, q) in probs[..keep].iter().enumerate() {
            if r < *q {
                return cands[i].0;
            }
            r -= q;
        }
        cands[keep - 1].0
    }
}

/// `x`'s place in `f32::total_cmp`'s order as an unsigned key (a larger key, a later value).
fn total_order_key(x: f32) -> u32 {
    let bits = x.to_bits();
    if bits >> 31 == 1 { !bits } else { bits | 0x8000_0000 }
}

/// The candidates' order: highest logit first, ties to the lower id.
pub fn by_logit(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Index of the largest logit; the lowest index wins ties, NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_val = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        if l > best_val {
            best = i;
            best_val = l;
        }
    }
    best as u32
}

/// What a step returns for logit rows that carry draws ([`crate::ForwardBatch::set_draws`]):
/// rows in order, each the drawn token's id as one f32, or (a row drawn on the host, `None`)
/// its `vocab` logits. The length of that output.
pub fn drawn_output_len(draws: &[Option<Draw>], vocab: usize) -> usize {
    draws.iter().map(|d| if d.is_some() { 1 } else { vocab }).sum()
}

/// The output of [`drawn_output_len`]'s layout from a step's full logits `[rows, vocab]`: each
/// drawn row's token by [`Draw::pick`], each `None` row's logits as they are.
pub fn apply_draws(draws: &[Option<Draw>], logits: &[f32], vocab: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(drawn_output_len(draws, vocab));
    for (d, row) in draws.iter().zip(logits.chunks_exact(vocab)) {
        match d {
            Some(d) => out.push(d.pick(row) as f32),
            None => out.extend_from_slice(row),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The integer keys `pick` sorts by put candidates in `by_logit`'s order exactly: signed
    /// zeros, infinities, ties broken by id, with and without top-k.
    #[test]
    fn pick_orders_candidates_as_by_logit() {
        let specials = [0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, 1.5, -1.5, f32::MIN_POSITIVE, -f32::MAX];
        let mut x: u64 = 7;
        for case in 0..200 {
            let n = 1 + case % 37;
            let logits: Vec<f32> = (0..n)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    match x >> 61 {
                        0 => specials[(x >> 32) as usize % specials.len()],
                        1 => f32::NAN,
                        _ => ((x >> 40) % 9) as f32 * 0.25 - 1.0, // many ties
                    }
                })
                .collect();
            for top_k in [0, 1, 3, 50] {
                for u in [0.0, 0.31, 0.77, 0.999] {
                    let d = Draw { temperature: 0.7, top_k, top_p: 0.9, min_p: 0.0, u };
                    let mut cands: Vec<(u32, f32)> =
                        logits.iter().enumerate().filter(|(_, l)| !l.is_nan()).map(|(i, &l)| (i as u32, l)).collect();
                    cands.sort_unstable_by(by_logit);
                    if top_k > 0 {
                        cands.truncate(top_k as usize);
                    }
                    let want = if d.is_greedy() || cands.is_empty() { argmax(&logits) } else { d.pick_sorted(&cands) };
                    assert_eq!(d.pick(&logits), want, "{logits:?} top_k {top_k} u {u}");
                }
            }
        }
    }

    #[test]
    fn greedy_takes_the_first_largest_and_never_nan() {
        assert_eq!(Draw::GREEDY.pick(&[1.0, 3.0, 3.0, f32::NAN]), 1);
        assert_eq!(Draw::GREEDY.pick(&[f32::NAN, f32::NAN]), 0);
        let top1 = Draw { temperature: 1.0, top_k: 1, ..Draw::GREEDY };
        assert_eq!(top1.pick(&[0.5, 2.0, -1.0]), 1);
    }

    #[test]
    fn the_uniform_walks_the_kept_mass_in_logit_order() {
        // Equal logits: mass 1/4 each, in id order (ties to the lower id).
        let row = [0.0f32; 4];
        let at = |u: f64| Draw { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, u }.pick(&row);
        assert_eq!([at(0.0), at(0.26), at(0.51), at(0.99)], [0, 1, 2, 3]);
        // top-p 0.5 keeps the first two of them; u spans their mass.
        let half = |u: f64| Draw { temperature: 1.0, top_k: 0, top_p: 0.5, min_p: 0.0, u }.pick(&row);
        assert_eq!([half(0.0), half(0.49), half(0.5), half(0.99)], [0, 0, 1, 1]);
        // top-k 3 over distinct logits: the three largest, highest first.
        let row = [0.0f32, 5.0, 1.0, 4.0, 2.0];
        let k3 = Draw { temperature: 1e-3, top_k: 3, top_p: 1.0, min_p: 0.0, u: 0.9 };
        assert_eq!(k3.pick(&row), 1);
        // An infinite largest logit holds all the mass.
        let inf = Draw { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, u: 0.99 };
        assert_eq!(inf.pick(&[0.0, f32::INFINITY, f32::INFINITY]), 1);
    }

    #[test]
    fn applied_draws_keep_host_rows_whole() {
        let logits = [0.0f32, 1.0, 3.0, 2.0, 9.0, 8.0];
        let out = apply_draws(&[Some(Draw::GREEDY), None], &logits, 3);
        assert_eq!(out, vec![2.0, 2.0, 9.0, 8.0]);
        assert_eq!(drawn_output_len(&[Some(Draw::GREEDY), None], 3), out.len());
    }
}
