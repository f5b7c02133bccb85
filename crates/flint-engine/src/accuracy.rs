//! Accuracy of a quantized model against its reference, measured as users of quantized serving
//! measure it: perplexity on a fixed text, and for every position of the text and of a prompt set
//! the agreement of the most likely next token and the KL divergence of the next-token
//! distributions (reference first: `KL(reference || quantized)`).

use flint_model::cuda::CudaLlama;
use flint_model::{ForwardBatch, Llama, Logits};
use flint_tensor::Backend;

use crate::{Error, Result};

/// A model that returns next-token logits `[tokens.len(), vocab]` for a sequence scored alone.
pub trait Scorer {
    fn vocab(&self) -> usize;
    fn logits(&self, tokens: &[u32]) -> Result<Vec<f32>>;
}

/// A [`Llama`] on a backend (the CPU reference, with or without FP8 emulation).
#[derive(Debug)]
pub struct BackendScorer<'a> {
    pub model: &'a Llama,
    pub backend: &'a dyn Backend,
    /// Tokens per forward pass.
    pub chunk: usize,
}

impl Scorer for BackendScorer<'_> {
    fn vocab(&self) -> usize {
        self.model.config().vocab_size
    }

    fn logits(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let mut cache = self.model.new_kv_cache(self.backend, tokens.len())?;
        let mut out = Vec::with_capacity(tokens.len() * self.vocab());
        for chunk in tokens.chunks(self.chunk.max(1)) {
            let logits = self.model.forward(self.backend, chunk, &mut cache, true)?;
            out.extend(self.backend.to_f32_vec(&logits)?);
        }
        Ok(out)
    }
}

/// A [`CudaLlama`], scoring each sequence from the start of its KV cache (nothing else may use
/// the model meanwhile).
#[derive(Debug)]
pub struct CudaScorer<'a> {
    pub model: &'a CudaLlama,
}

impl Scorer for CudaScorer<'_> {
    fn vocab(&self) -> usize {
        self.model.config().vocab_size
    }

    fn logits(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let bs = self.model.block_size();
        let table: Vec<u32> = (0..tokens.len().div_ceil(bs) as u32).collect();
        if table.len() > self.model.n_blocks() {
            return Err(Error::Internal(format!("{} tokens do not fit the KV cache", tokens.len())));
        }
        // Logit rows per step are bounded by the model's largest batch.
        let chunk = self.model.options().max_seqs.min(self.model.options().max_batch_tokens);
        let mut out = Vec::with_capacity(tokens.len() * self.vocab());
        let mut done = 0;
        for part in tokens.chunks(chunk) {
            let mut batch = ForwardBatch::new(bs);
            batch.push_sequence(part, done, &table, Logits::All)?;
            out.extend(self.model.forward(&batch).map_err(|e| Error::Device(e.to_string()))?);
            done += part.len();
        }
        Ok(out)
    }
}

/// Accuracy of one model against a reference.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Comparison {
    /// Perplexity of the reference and of the model on the text.
    pub reference_ppl: f64,
    pub ppl: f64,
    /// Positions of the text scored.
    pub text_positions: usize,
    /// Over every position of the text and the prompts: how often the most likely next token
    /// is the reference's, and the mean KL divergence (nats).
    pub top1_agreement: f64,
    pub mean_kl: f64,
    pub positions: usize,
    /// For each scored position of the text, in order: the model's negative log-likelihood of the
    /// next token minus the reference's (nats). Their mean is the log of `ppl / reference_ppl`.
    pub nll_diffs: Vec<f64>,
}

impl Comparison {
    /// The model's perplexity relative to the reference's, minus one (0.01 = 1% higher).
    pub fn ppl_change(&self) -> f64 {
        self.ppl / self.reference_ppl - 1.0
    }

    /// A 95% interval of [`Comparison::ppl_change`] over texts like this one (see
    /// [`ppl_change_interval`]).
    pub fn ppl_change_interval(&self) -> Option<(f64, f64)> {
        ppl_change_interval(&self.nll_diffs)
    }
}

/// Tokens per batch of [`ppl_change_interval`]'s batch means.
pub const INTERVAL_BATCH: usize = 32;

/// A 95% interval of `exp(mean(diffs)) - 1`, the perplexity change that paired per-token
/// log-likelihood differences `diffs` (one model's minus another's, in text order) give.
///
/// Neighbouring tokens' differences are correlated, so the standard error is that of the means of
/// consecutive batches of [`INTERVAL_BATCH`] tokens (the method of batch means), with Student's t
/// for their number. None with fewer than 8 batches.
pub fn ppl_change_interval(diffs: &[f64]) -> Option<(f64, f64)> {
    let means: Vec<f64> =
        diffs.chunks_exact(INTERVAL_BATCH).map(|b| b.iter().sum::<f64>() / INTERVAL_BATCH as f64).collect();
    let k = means.len();
    if k < 8 {
        return None;
    }
    let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
    let batch_mean = means.iter().sum::<f64>() / k as f64;
    let var = means.iter().map(|m| (m - batch_mean).powi(2)).sum::<f64>() / (k - 1) as f64;
    let half = student_t_975(k - 1) * (var / k as f64).sqrt();
    Some(((mean - half).exp() - 1.0, (mean + half).exp() - 1.0))
}

/// The 97.5% quantile of Student's t with `dof` degrees of freedom (7 or more): the normal
/// quantile with the first three terms of its expansion in 1 / dof (Abramowitz and Stegun
/// 26.7.5), within 1e-3 of the table.
fn student_t_975(dof: usize) -> f64 {
    let (z, v) = (1.959_963_984_540_054_f64, dof as f64);
    let g1 = (z.powi(3) + z) / 4.0;
    let g2 = (5.0 * z.powi(5) + 16.0 * z.powi(3) + 3.0 * z) / 96.0;
    let g3 = (3.0 * z.powi(7) + 19.0 * z.powi(5) + 17.0 * z.powi(3) - 15.0 * z) / 384.0;
    z + g1 / v + g2 / (v * v) + g3 / (v * v * v)
}

/// `log_softmax(logits)` in f64.
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    logits.iter().map(|&x| x as f64 - lse).collect()
}

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

#[derive(Default)]
struct Totals {
    ref_nll: f64,
    nll: f64,
    nll_count: usize,
    agree: usize,
    kl: f64,
    count: usize,
    nll_diffs: Vec<f64>,
}

impl Totals {
    fn add(&mut self, reference: &[f32], model: &[f32], vocab: usize, tokens: &[u32], with_nll: bool) -> Result<()> {
        if reference.len() != tokens.len() * vocab || model.len() != reference.len() {
            return Err(Error::Internal("logits of unexpected size".into()));
        }
        for (i, (r, m)) in reference.chunks(vocab).zip(model.chunks(vocab)).enumerate() {
            let (lr, lm) = (log_softmax(r), log_softmax(m));
            self.kl += lr.iter().zip(&lm).map(|(a, b)| a.exp() * (a - b)).sum::<f64>().max(0.0);
            self.agree += (argmax(r) == argmax(m)) as usize;
            self.count += 1;
            if with_nll && let Some(&next) = tokens.get(i + 1) {
                let (r, m) = (-lr[next as usize], -lm[next as usize]);
                self.ref_nll += r;
                self.nll += m;
                self.nll_diffs.push(m - r);
                self.nll_count += 1;
            }
        }
        Ok(())
    }
}

/// Compares `model` with `reference` on `text` (token ids, scored in windows of `window`
/// tokens, each window on its own) and on `prompts` (each scored alone).
pub fn compare(
    reference: &dyn Scorer,
    model: &dyn Scorer,
    text: &[u32],
    window: usize,
    prompts: &[Vec<u32>],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Comparison> {
    let mut all = compare_many(reference, &[model], text, window, prompts, progress)?;
    Ok(all.remove(0))
}

/// [`compare`] for several models against one reference, which runs once per sequence.
pub fn compare_many(
    reference: &dyn Scorer,
    models: &[&dyn Scorer],
    text: &[u32],
    window: usize,
    prompts: &[Vec<u32>],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Comparison>> {
    let vocab = reference.vocab();
    if let Some(m) = models.iter().find(|m| m.vocab() != vocab) {
        return Err(Error::Internal(format!("vocabularies of {vocab} and {} tokens", m.vocab())));
    }
    let mut totals: Vec<Totals> = models.iter().map(|_| Totals::default()).collect();
    let windows: Vec<&[u32]> = text.chunks(window.max(2)).filter(|w| w.len() > 1).collect();
    let prompts: Vec<&[u32]> = prompts.iter().filter(|p| !p.is_empty()).map(Vec::as_slice).collect();
    let sequences: Vec<(&[u32], bool)> =
        windows.iter().map(|w| (*w, true)).chain(prompts.iter().map(|p| (*p, false))).collect();
    for (i, (seq, with_nll)) in sequences.iter().enumerate() {
        let reference_logits = reference.logits(seq)?;
        for (m, t) in models.iter().zip(totals.iter_mut()) {
            t.add(&reference_logits, &m.logits(seq)?, vocab, seq, *with_nll)?;
        }
        progress(i + 1, sequences.len());
    }
    Ok(totals
        .into_iter()
        .map(|t| {
            let n = t.nll_count.max(1) as f64;
            Comparison {
                reference_ppl: (t.ref_nll / n).exp(),
                ppl: (t.nll / n).exp(),
                text_positions: t.nll_count,
                top1_agreement: t.agree as f64 / t.count.max(1) as f64,
                mean_kl: t.kl / t.count.max(1) as f64,
                positions: t.count,
                nll_diffs: t.nll_diffs,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Vec<f32>, usize);

    impl Scorer for Fixed {
        fn vocab(&self) -> usize {
            self.1
        }

        fn logits(&self, tokens: &[u32]) -> Result<Vec<f32>> {
            Ok(self.0.iter().copied().cycle().take(tokens.len() * self.1).collect())
        }
    }

    #[test]
    fn identical_models_agree_fully() {
        let a = Fixed(vec![0.5, 2.0, -1.0], 3);
        let c = compare(&a, &a, &[1, 1, 1, 1], 4, &[vec![0, 2]], &mut |_, _| {}).expect("compares");
        assert_eq!(c.top1_agreement, 1.0);
        assert!(c.mean_kl.abs() < 1e-12);
        assert!((c.ppl - c.reference_ppl).abs() < 1e-12);
        // Token 1 has probability softmax([0.5, 2, -1])[1] at every position.
        let p1 = 2f64.exp() / (0.5f64.exp() + 2f64.exp() + (-1f64).exp());
        assert!((c.ppl - 1.0 / p1).abs() < 1e-9, "{}", c.ppl);
        assert_eq!(c.text_positions, 3);
        assert_eq!(c.positions, 6);
    }

    #[test]
    fn student_t_quantiles_match_the_table() {
        for (dof, want) in [(7, 2.364_624), (10, 2.228_139), (30, 2.042_272), (100, 1.983_972), (1000, 1.962_339)] {
            let got = student_t_975(dof);
            assert!((got - want).abs() < 1e-3, "t(0.975, {dof}) = {got}, table {want}");
        }
    }

    #[test]
    fn the_interval_of_a_constant_difference_is_that_change() {
        let c = (1.03f64).ln();
        let (lo, hi) = ppl_change_interval(&vec![c; 8 * INTERVAL_BATCH]).expect("eight batches");
        assert!((lo - 0.03).abs() < 1e-12 && (hi - 0.03).abs() < 1e-12, "{lo} {hi}");
        assert_eq!(ppl_change_interval(&vec![c; 8 * INTERVAL_BATCH - 1]), None);
    }

    #[test]
    fn the_interval_covers_the_true_change_about_95_times_in_100() {
        // Differences of mean mu with noise correlated over 4 tokens (a moving sum), which an
        // interval from independent tokens would understate by about 2x.
        use rand::Rng;
        let mu = 0.02;
        let mut rng = flint_testkit::rng();
        let mut uniform = move || rng.random::<f64>() - 0.5;
        let trials = 400;
        let mut covered = 0;
        for _ in 0..trials {
            let noise: Vec<f64> = (0..2048 + 3).map(|_| uniform()).collect();
            let diffs: Vec<f64> = noise.windows(4).map(|w| mu + w.iter().sum::<f64>()).collect();
            let (lo, hi) = ppl_change_interval(&diffs).expect("64 batches");
            let truth = mu.exp() - 1.0;
            covered += (lo <= truth && truth <= hi) as usize;
        }
        let rate = covered as f64 / trials as f64;
        // 400 trials at 0.95 have a standard deviation of 0.011: the bounds are 4 of them away.
        assert!((0.90..=0.995).contains(&rate), "coverage {rate}");
    }

    #[test]
    fn comparisons_keep_each_positions_difference() {
        let a = Fixed(vec![0.0, 1.0], 2);
        let b = Fixed(vec![1.0, 0.0], 2);
        let c = compare(&a, &b, &[0, 1, 1, 0, 1], 3, &[vec![1, 1]], &mut |_, _| {}).expect("compares");
        // Windows [0 1 1] and [0 1]: three scored positions, the prompt none.
        assert_eq!(c.nll_diffs.len(), c.text_positions);
        assert_eq!(c.text_positions, 3);
        let mean = c.nll_diffs.iter().sum::<f64>() / 3.0;
        assert!((mean.exp() - c.ppl / c.reference_ppl).abs() < 1e-12);
        // Next tokens 1, 1, 1: a gives each ln(1 + e) - 1 nats, b ln(1 + e), 1 nat more.
        assert!(c.nll_diffs.iter().all(|d| (d - 1.0).abs() < 1e-12), "{:?}", c.nll_diffs);
    }

    #[test]
    fn kl_and_agreement_of_different_models() {
        let a = Fixed(vec![0.0, 1.0], 2);
        let b = Fixed(vec![1.0, 0.0], 2);
        let c = compare(&a, &b, &[0, 1], 2, &[], &mut |_, _| {}).expect("compares");
        assert_eq!(c.top1_agreement, 0.0);
        // KL(p || q) with p = (s(-1), s(1)), q reversed: (p1 - p0) * 2 ... = tanh(1/2) * 2.
        let (p0, p1) = (1.0 / (1.0 + 1f64.exp()), 1.0 / (1.0 + (-1f64).exp()));
        let want = p0 * (p0 / p1).ln() + p1 * (p1 / p0).ln();
        assert!((c.mean_kl - want).abs() < 1e-9, "{} vs {want}", c.mean_kl);
    }
}
