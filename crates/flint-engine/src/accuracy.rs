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
}

impl Comparison {
    /// The model's perplexity relative to the reference's, minus one (0.01 = 1% higher).
    pub fn ppl_change(&self) -> f64 {
        self.ppl / self.reference_ppl - 1.0
    }
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
                self.ref_nll -= lr[next as usize];
                self.nll -= lm[next as usize];
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
        .iter()
        .map(|t| {
            let n = t.nll_count.max(1) as f64;
            Comparison {
                reference_ppl: (t.ref_nll / n).exp(),
                ppl: (t.nll / n).exp(),
                text_positions: t.nll_count,
                top1_agreement: t.agree as f64 / t.count.max(1) as f64,
                mean_kl: t.kl / t.count.max(1) as f64,
                positions: t.count,
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
