//! Logits processing and token sampling: repetition, frequency and presence penalties,
//! temperature, top-k, top-p and min-p, with a seeded generator so a run can be repeated.

use std::collections::HashMap;

use flint_model::Draw;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How the next token is chosen. Defaults: greedy, no penalties.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy (argmax); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; 1 keeps all.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 keeps all.
    pub min_p: f32,
    /// Hugging Face-style penalty on tokens already in the prompt or the output: positive logits
    /// are divided by it, negative ones multiplied. 1 is off.
    pub repetition_penalty: f32,
    /// OpenAI-style: subtract `frequency_penalty * count` for each generated token.
    pub frequency_penalty: f32,
    /// OpenAI-style: subtract `presence_penalty` once for each token generated so far.
    pub presence_penalty: f32,
    /// Seed for sampling; `None` picks one at random (reported back so the run can be repeated).
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Checks every field's range; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, why: &str| Err(Error::InvalidRequest(format!("{field} {why}")));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad("temperature", &format!("must be a number >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", &format!("must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", &format!("must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad("repetition_penalty", &format!("must be > 0, got {}", self.repetition_penalty));
        }
        for (field, v) in [("frequency_penalty", self.frequency_penalty), ("presence_penalty", self.presence_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(field, &format!("must be in [-2, 2], got {v}"));
            }
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
}

/// Per-sequence sampling state.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    seed: u64,
    rng: ChaCha8Rng,
    /// Tokens of the prompt and the output, for the repetition penalty.
    seen: HashMap<u32, ()>,
    /// Counts of generated tokens, for frequency and presence penalties.
    generated: HashMap<u32, u32>,
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

impl Sampler {
    /// A sampler for one sequence whose prompt is `prompt_ids`.
    pub fn new(params: SamplingParams, prompt_ids: &[u32]) -> Result<Self> {
        params.validate()?;
        let seed = params.seed.unwrap_or_else(random_seed);
        let seen = prompt_ids.iter().map(|&id| (id, ())).collect();
        Ok(Sampler { params, seed, rng: ChaCha8Rng::seed_from_u64(seed), seen, generated: HashMap::new() })
    }

    /// The seed in use.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Picks the next token from `logits` (one per vocabulary entry) and records it.
    pub fn sample(&mut self, logits: &mut [f32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(Error::Internal("sampling from empty logits".to_string()));
        }
        self.apply_penalties(logits);
        let token = if self.params.is_greedy() { argmax(logits) } else { self.sample_from(logits) };
        self.record(token);
        Ok(token)
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            for &id in self.seen.keys() {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
                }
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            for (&id, &count) in &self.generated {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l -= p.frequency_penalty * count as f32 + p.presence_penalty;
                }
            }
        }
    }

    fn sample_from(&mut self, logits: &[f32]) -> u32 {
        // One draw per sampled token, whatever the logits (as a device draw takes it up front).
        let u = self.rng.random::<f64>();
        self.draw(u).pick(logits)
    }

    /// This sampler's settings with the uniform `u`: what [`Draw::pick`] (and the device's
    /// `flint_sample` kernel) take.
    fn draw(&self, u: f64) -> Draw {
        let p = &self.params;
        let top_k = u32::try_from(p.top_k).unwrap_or(u32::MAX);
        Draw { temperature: p.temperature, top_k, top_p: p.top_p, min_p: p.min_p, u }
    }

    /// How many of the most likely tokens this sampler needs to pick exactly what it would from
    /// the full logits: 1 when greedy, `top_k` when sampling among the top `k`; `None` when it
    /// needs every logit (penalties, which can lift any token, or sampling over the whole
    /// vocabulary).
    pub fn candidates_needed(&self) -> Option<usize> {
        let p = &self.params;
        if p.repetition_penalty != 1.0 || p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            return None;
        }
        if p.is_greedy() {
            Some(1)
        } else if p.top_k > 0 {
            Some(p.top_k)
        } else {
            None
        }
    }

    /// [`Sampler::sample`] from the most likely tokens only: `cands` as (id, logit), sorted by
    /// logit (highest first, ties to the lower id), at least [`Sampler::candidates_needed`] of
    /// them where the vocabulary has that many. Picks the token `sample` would pick from the full
    /// logits (with the same generator state).
    pub fn sample_candidates(&mut self, cands: &[(u32, f32)]) -> Result<u32> {
        let Some(needed) = self.candidates_needed() else {
            return Err(Error::Internal("this sampler needs the full logits".to_string()));
        };
        let cands = &cands[..cands.len().min(needed)];
        let token = if self.params.is_greedy() {
            // Nothing but NaN: what argmax picks.
            cands.first().map_or(0, |&(id, _)| id)
        } else {
            let u = self.rng.random::<f64>();
            cands.first().map_or(0, |_| self.draw(u).pick_sorted(cands))
        };
        self.record(token);
        Ok(token)
    }

    /// Whether a device can pick this sampler's tokens ([`Sampler::device_draw`]): no penalties.
    pub fn draws_on_device(&self) -> bool {
        let p = &self.params;
        p.repetition_penalty == 1.0 && p.frequency_penalty == 0.0 && p.presence_penalty == 0.0
    }

    /// What a device needs to pick this sampler's next token from the full logits itself
    /// (`ForwardBatch::set_draws`): the settings and, unless greedy, this token's uniform draw
    /// from the generator, taken now. Pass the token the device picked to
    /// [`Sampler::accept_drawn`]. `None` when penalties apply (they depend on the history kept
    /// here, so those rows are sampled on the host).
    pub fn device_draw(&mut self) -> Option<Draw> {
        if !self.draws_on_device() {
            return None;
        }
        if self.params.is_greedy() {
            return Some(Draw::GREEDY);
        }
        let u = self.rng.random::<f64>();
        Some(self.draw(u))
    }

    /// Records the token a device picked with [`Sampler::device_draw`]'s draw.
    pub fn accept_drawn(&mut self, token: u32) {
        self.record(token);
    }

    fn record(&mut self, token: u32) {
        self.seen.insert(token, ());
        *self.generated.entry(token).or_insert(0) += 1;
    }
}

pub use flint_model::argmax;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams { temperature, seed: Some(7), ..SamplingParams::default() }
    }

    #[test]
    fn greedy_picks_argmax_and_first_of_ties() {
        let mut s = Sampler::new(params(0.0), &[]).expect("valid");
        assert_eq!(s.sample(&mut [0.1, 3.0, 3.0, -1.0]).expect("ok"), 1);
    }

    proptest! {
        /// Picking from the top-k candidates that vocabulary-parallel ranks return (each rank's
        /// part's top k, merged) gives the token the full logits give, step after step with the
        /// same seed: greedy and top-k sampling with temperature, top-p and min-p. Logits on a
        /// coarse grid make ties common.
        #[test]
        fn candidates_pick_what_full_logits_pick(
            grid in prop::collection::vec(-8i32..8, 3..70),
            ranks in 1usize..5,
            top_k in 1usize..12,
            greedy in any::<bool>(),
            temperature in 0.2f32..2.0,
            top_p in 0.3f32..1.0,
            min_p in 0.0f32..0.3,
            seed in any::<u64>(),
        ) {
            let logits: Vec<f32> = grid.iter().map(|&g| g as f32 * 0.25).collect();
            let p = SamplingParams {
                temperature: if greedy { 0.0 } else { temperature },
                top_k,
                top_p,
                min_p,
                seed: Some(seed),
                ..SamplingParams::default()
            };
            let mut full = Sampler::new(p.clone(), &[]).expect("valid");
            let mut cand = Sampler::new(p, &[]).expect("valid");
            let k = cand.candidates_needed().expect("no penalties");
            // Split the vocabulary over ranks in contiguous parts, as the model shards it.
            let part = logits.len().div_ceil(ranks);
            let lists: Vec<Vec<f32>> = logits
                .chunks(part)
                .enumerate()
                .map(|(r, l)| flint_model::top_candidates(l, l.len(), r * part, k))
                .collect();
            let refs: Vec<&[f32]> = lists.iter().map(Vec::as_slice).collect();
            let merged = flint_model::merge_candidates(&refs, k).expect("merge");
            let pairs: Vec<(u32, f32)> =
                flint_model::candidate_pairs(&merged).collect();
            for _ in 0..8 {
                let want = full.sample(&mut logits.clone()).expect("full");
                prop_assert_eq!(cand.sample_candidates(&pairs).expect("candidates"), want);
            }
        }
    }

    #[test]
    fn penalties_and_whole_vocabulary_sampling_need_full_logits() {
        let needs = |p: SamplingParams| Sampler::new(p, &[]).expect("valid").candidates_needed();
        assert_eq!(needs(params(0.0)), Some(1));
        assert_eq!(needs(SamplingParams { top_k: 1, ..params(1.0) }), Some(1));
        assert_eq!(needs(SamplingParams { top_k: 50, ..params(1.0) }), Some(50));
        assert_eq!(needs(params(1.0)), None);
        assert_eq!(needs(SamplingParams { repetition_penalty: 1.1, ..params(0.0) }), None);
        assert_eq!(needs(SamplingParams { presence_penalty: 0.5, top_k: 5, ..params(1.0) }), None);
        let mut s = Sampler::new(params(1.0), &[]).expect("valid");
        assert!(s.sample_candidates(&[(3, 1.0)]).is_err());
    }

    #[test]
    fn device_draws_take_the_generator_as_sampling_does() {
        let p = SamplingParams { temperature: 0.8, top_p: 0.9, min_p: 0.05, top_k: 7, ..params(1.0) };
        let mut drawn = Sampler::new(p.clone(), &[]).expect("valid");
        let mut host = Sampler::new(p, &[]).expect("valid");
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for _ in 0..5 {
            let d = drawn.device_draw().expect("no penalties");
            assert_eq!((d.temperature, d.top_k, d.top_p, d.min_p), (0.8, 7, 0.9, 0.05));
            assert_eq!(d.u, rand::Rng::random::<f64>(&mut rng), "one uniform per token, in the generator's order");
            // The host path takes one draw per token too, so both stay in step.
            let t = host.sample(&mut [0.5, 0.1, 2.0]).expect("ok");
            drawn.accept_drawn(t);
        }
        // Greedy draws take nothing from the generator; penalties keep rows on the host.
        let mut greedy = Sampler::new(params(0.0), &[]).expect("valid");
        assert_eq!(greedy.device_draw().map(|d| (d.temperature, d.u)), Some((0.0, 0.0)));
        let mut penalized = Sampler::new(SamplingParams { presence_penalty: 0.5, ..params(1.0) }, &[]).expect("valid");
        assert!(!penalized.draws_on_device() && penalized.device_draw().is_none());
    }

    #[test]
    fn an_infinite_logit_takes_all_the_mass() {
        let mut s = Sampler::new(params(1.0), &[]).expect("valid");
        for _ in 0..10 {
            assert_eq!(s.sample(&mut [0.0, f32::INFINITY, 3.0, f32::INFINITY]).expect("ok"), 1);
        }
    }

    #[test]
    fn invalid_params_name_the_field() {
        let bad = SamplingParams { top_p: 1.5, ..SamplingParams::default() };
        assert!(bad.validate().expect_err("bad").to_string().contains("top_p"));
        let bad = SamplingParams { temperature: -1.0, ..SamplingParams::default() };
        assert!(bad.validate().expect_err("bad").to_string().contains("temperature"));
    }

    #[test]
    fn repetition_penalty_changes_greedy_choice() {
        let p = SamplingParams { repetition_penalty: 2.0, ..params(0.0) };
        let mut s = Sampler::new(p, &[0]).expect("valid");
        assert_eq!(s.sample(&mut [2.0, 1.5]).expect("ok"), 1);
    }

    #[test]
    fn presence_penalty_applies_after_first_use() {
        let p = SamplingParams { presence_penalty: 1.0, ..params(0.0) };
        let mut s = Sampler::new(p, &[]).expect("valid");
        assert_eq!(s.sample(&mut [2.0, 1.5]).expect("ok"), 0);
        assert_eq!(s.sample(&mut [2.0, 1.5]).expect("ok"), 1);
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        for p in [SamplingParams { top_k: 1, ..params(1.0) }, SamplingParams { top_p: 1e-6, ..params(1.0) }] {
            let mut s = Sampler::new(p, &[]).expect("valid");
            for _ in 0..20 {
                assert_eq!(s.sample(&mut [0.0, 1.0, 0.5]).expect("ok"), 1);
            }
        }
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let p = SamplingParams { min_p: 0.5, ..params(1.0) };
        let mut s = Sampler::new(p, &[]).expect("valid");
        for _ in 0..200 {
            // exp(-3) < 0.5: token 2 is never drawn.
            assert_ne!(s.sample(&mut [0.0, 0.0, -3.0]).expect("ok"), 2);
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let mut s = Sampler::new(params(1.0), &[]).expect("valid");
        let logits = [0.0f32, (3.0f32).ln()];
        let ones = (0..4000).filter(|_| s.sample(&mut logits.clone()).expect("ok") == 1).count();
        // Expected 3000 of 4000; five standard deviations is about 137.
        assert!((ones as i64 - 3000).abs() < 140, "{ones}");
    }

    proptest! {
        #[test]
        fn same_seed_same_tokens(seed in any::<u64>(), logits in proptest::collection::vec(-5.0f32..5.0, 2..50)) {
            let p = SamplingParams { temperature: 0.8, top_p: 0.9, top_k: 20, seed: Some(seed), ..SamplingParams::default() };
            let mut a = Sampler::new(p.clone(), &[]).unwrap();
            let mut b = Sampler::new(p, &[]).unwrap();
            for _ in 0..5 {
                let ta = a.sample(&mut logits.clone()).unwrap();
                let tb = b.sample(&mut logits.clone()).unwrap();
                prop_assert_eq!(ta, tb);
                prop_assert!((ta as usize) < logits.len());
            }
        }
    }
}
