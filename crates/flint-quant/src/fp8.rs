//! FP8 formats: E4M3 (the "fn" variant: no infinities, one NaN pattern per sign, largest finite
//! 448) and E5M2 (IEEE-like: infinities and NaNs, largest finite 57344), with conversions from
//! f32 that round to nearest, ties to even, as PyTorch's casts do; and the scales FP8 weights and
//! activations carry (per tensor, per output channel, per 128x128 block, per token).

use rayon::prelude::*;

/// An FP8 encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fp8Format {
    /// 4 exponent bits (bias 7), 3 mantissa bits; saturates at +-448.
    E4M3,
    /// 5 exponent bits (bias 15), 2 mantissa bits; overflows to infinity past +-57344.
    E5M2,
}

impl Fp8Format {
    const fn exp_bits(self) -> u32 {
        match self {
            Fp8Format::E4M3 => 4,
            Fp8Format::E5M2 => 5,
        }
    }

    const fn man_bits(self) -> u32 {
        7 - self.exp_bits()
    }

    const fn bias(self) -> i32 {
        (1 << (self.exp_bits() - 1)) - 1
    }

    /// The largest finite value.
    pub const fn max(self) -> f32 {
        match self {
            Fp8Format::E4M3 => 448.0,
            Fp8Format::E5M2 => 57344.0,
        }
    }

    /// The value of code `b`.
    pub fn decode(self, b: u8) -> f32 {
        let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
        let m_bits = self.man_bits();
        let exp = ((b & 0x7f) >> m_bits) as i32;
        let man = (b & ((1 << m_bits) - 1)) as i32;
        let exp_max = (1 << self.exp_bits()) - 1;
        match self {
            Fp8Format::E4M3 if exp == exp_max && man == (1 << m_bits) - 1 => return f32::NAN,
            Fp8Format::E5M2 if exp == exp_max => return if man == 0 { sign * f32::INFINITY } else { f32::NAN },
            _ => {}
        }
        let scale = 1 << m_bits;
        let magnitude = if exp == 0 {
            // Subnormal: man / 2^m * 2^(1 - bias).
            man as f32 / scale as f32 * 2f32.powi(1 - self.bias())
        } else {
            (scale + man) as f32 / scale as f32 * 2f32.powi(exp - self.bias())
        };
        sign * magnitude
    }

    /// The code nearest to `x` (ties to even). E4M3 saturates finite values past its range to
    /// +-448; E5M2 overflows to infinity (as PyTorch's casts do). NaN stays NaN.
    ///
    /// Integer arithmetic on the f32's bits: in the FP8 format's normal range the mantissa is
    /// rounded to nearest-even in place (a carry moves into the exponent, as it should); below
    /// it the value is scaled, exactly, to a count of the subnormal spacing and rounded.
    pub fn encode(self, x: f32) -> u8 {
        let bits = x.to_bits();
        let sign = ((bits >> 24) & 0x80) as u8;
        let abs = bits & 0x7fff_ffff;
        if abs > 0x7f80_0000 {
            // S.1111.111 is NaN in both formats.
            return sign | 0x7f;
        }
        let m_bits = self.man_bits();
        let emin = 1 - self.bias();
        let (largest, overflow) = match self {
            Fp8Format::E4M3 => (0x7e, 0x7e),
            Fp8Format::E5M2 => (0x7b, 0x7c),
        };
        if (abs >> 23) as i32 >= 127 + emin {
            let shift = 23 - m_bits;
            let rounded = (abs + ((1 << (shift - 1)) - 1) + ((abs >> shift) & 1)) >> shift;
            let code = rounded - (((127 - self.bias()) as u32) << m_bits);
            sign | if code > largest { overflow } else { code as u8 }
        } else {
            // |x| < 2^emin: multiples of 2^(emin - m_bits). Scaling by a power of two is exact;
            // a count of 2^m_bits is the smallest normal, whose code is that count too.
            let units = f32::from_bits(abs) * 2f32.powi(m_bits as i32 - emin);
            sign | units.round_ties_even() as u8
        }
    }

    /// The code nearest to `x`, clamped to the finite range first (what quantizers store).
    pub fn encode_saturating(self, x: f32) -> u8 {
        if x.is_nan() { self.encode(x) } else { self.encode(x.clamp(-self.max(), self.max())) }
    }
}

/// The scale that maps `amax` onto the format's largest value (1 when `amax` is 0 or not finite).
pub fn scale_for(amax: f32, format: Fp8Format) -> f32 {
    if amax > 0.0 && amax.is_finite() { amax / format.max() } else { 1.0 }
}

/// FP8 codes of `values / scale`, saturating.
pub fn quantize(values: &[f32], scale: f32, format: Fp8Format) -> Vec<u8> {
    values.iter().map(|&v| format.encode_saturating(v / scale)).collect()
}

/// `decode(code) * scale` for every code.
pub fn dequantize_fp8(codes: &[u8], scale: f32, format: Fp8Format) -> Vec<f32> {
    codes.iter().map(|&c| format.decode(c) * scale).collect()
}

fn amax(values: &[f32]) -> f32 {
    values.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// One scale for the whole tensor.
pub fn scale_per_tensor(values: &[f32], format: Fp8Format) -> f32 {
    scale_for(amax(values), format)
}

/// One scale per row of a row-major `[rows, cols]` matrix: per output channel of a weight, or
/// per token of an activation (dynamic per-token scales).
pub fn scales_per_row(values: &[f32], cols: usize, format: Fp8Format) -> Vec<f32> {
    values.chunks(cols.max(1)).map(|row| scale_for(amax(row), format)).collect()
}

/// One scale per `block x block` tile of a row-major `[rows, cols]` matrix (DeepSeek-style FP8
/// checkpoints use 128), tiles at the edges cut short; `[ceil(rows / block), ceil(cols / block)]`.
pub fn scales_per_block(values: &[f32], rows: usize, cols: usize, block: usize, format: Fp8Format) -> Vec<f32> {
    let (br, bc) = (rows.div_ceil(block), cols.div_ceil(block));
    let mut out = vec![0.0f32; br * bc];
    for (i, scale) in out.iter_mut().enumerate() {
        let (r0, c0) = ((i / bc) * block, (i % bc) * block);
        let mut m = 0.0f32;
        for r in r0..(r0 + block).min(rows) {
            m = m.max(amax(&values[r * cols + c0..r * cols + (c0 + block).min(cols)]));
        }
        *scale = scale_for(m, format);
    }
    out
}

/// Candidate scales [`ScaleRule::Mse`] tries for a group: log-spaced over one octave.
pub const MSE_CANDIDATES: usize = 64;

/// How the scale of one group of values (a tensor, a row, a block) is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum ScaleRule {
    /// The group's largest magnitude maps onto the format's largest value (`amax / max`): what
    /// FP8 checkpoints and dynamic activation scales use.
    #[default]
    Max,
    /// Of the [`MSE_CANDIDATES`] scales `amax / max * 2^(i / MSE_CANDIDATES)`, the one whose
    /// rounding leaves the least squared error over the group (ties to the smallest). None of
    /// them clips the largest value; together they place the format's grid at every offset
    /// against the group's values (a scale twice as large is the same grid one binade over), so
    /// the error is never above [`ScaleRule::Max`]'s, which is the first candidate.
    Mse,
    /// `amax / max` times this factor (at least 1: the largest value lands below the format's
    /// largest); the same error distribution as `Max` with the grid elsewhere against the values,
    /// which is how `flint eval` measures how much a perplexity depends on the rounding alone.
    Headroom(f32),
}

impl ScaleRule {
    /// Parses `max` or `mse`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "max" => Some(ScaleRule::Max),
            "mse" => Some(ScaleRule::Mse),
            _ => None,
        }
    }
}

/// Values per piece when a group's squared error is summed over threads (pieces summed in
/// order, so the result does not depend on how the work was split).
const ERROR_PIECE: usize = 1 << 14;

/// Squared error of rounding `values` to `format` under `scale` (f64, summed in a fixed order).
pub fn rounding_error(values: &[f32], scale: f32, format: Fp8Format) -> f64 {
    error_with(values, scale, format, &decode_table(format))
}

fn error_with(values: &[f32], scale: f32, format: Fp8Format, table: &[f32; 256]) -> f64 {
    let piece = |part: &[f32]| -> f64 {
        part.iter()
            .map(|&v| {
                let d = (v - table[format.encode_saturating(v / scale) as usize] * scale) as f64;
                d * d
            })
            .sum()
    };
    if values.len() <= ERROR_PIECE {
        return piece(values);
    }
    let parts: Vec<f64> = values.par_chunks(ERROR_PIECE).map(piece).collect();
    parts.iter().sum()
}

/// The scale `rule` picks for one group of values (1 when the group is all zeros or not finite,
/// as [`scale_for`]).
pub fn fit_scale(values: &[f32], rule: ScaleRule, format: Fp8Format) -> f32 {
    let a = amax(values);
    let base = scale_for(a, format);
    if !(a > 0.0 && a.is_finite()) {
        return base;
    }
    match rule {
        ScaleRule::Max => base,
        ScaleRule::Headroom(f) => base * f.max(1.0),
        ScaleRule::Mse => {
            let table = decode_table(format);
            let mut best = (error_with(values, base, format, &table), base);
            for i in 1..MSE_CANDIDATES {
                let s = base * (i as f32 / MSE_CANDIDATES as f32).exp2();
                let e = error_with(values, s, format, &table);
                if e < best.0 {
                    best = (e, s);
                }
            }
            best.1
        }
    }
}

/// How finely an FP8 matrix's scales are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Granularity {
    /// One scale for the matrix.
    Tensor,
    /// One scale per row (output channel).
    Channel,
    /// One scale per `n x n` tile (DeepSeek-style checkpoints: 128).
    Block(usize),
}

impl Granularity {
    /// Parses `tensor`, `channel` or `block` (128x128 tiles).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "tensor" => Some(Granularity::Tensor),
            "channel" => Some(Granularity::Channel),
            "block" => Some(Granularity::Block(128)),
            _ => None,
        }
    }

    /// Dims of the scale tensor of a `[rows, cols]` matrix, as checkpoints store it.
    pub fn scale_dims(self, rows: usize, cols: usize) -> [usize; 2] {
        match self {
            Granularity::Tensor => [1, 1],
            Granularity::Channel => [rows, 1],
            Granularity::Block(b) => [rows.div_ceil(b), cols.div_ceil(b)],
        }
    }
}

/// An FP8 matrix: codes and the scales that turn them back into values (`value = decode(code) *
/// scale`), row-major `[rows, cols]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Fp8Matrix {
    pub rows: usize,
    pub cols: usize,
    pub format: Fp8Format,
    pub granularity: Granularity,
    pub codes: Vec<u8>,
    /// `granularity.scale_dims(rows, cols)` values, row-major.
    pub scales: Vec<f32>,
}

impl Fp8Matrix {
    /// Quantizes a row-major `[rows, cols]` matrix with scales of the given granularity (each
    /// scale maps its group's largest magnitude onto the format's largest value).
    pub fn quantize(values: &[f32], rows: usize, cols: usize, granularity: Granularity, format: Fp8Format) -> Self {
        Self::quantize_with(values, rows, cols, granularity, format, ScaleRule::Max)
    }

    /// [`Fp8Matrix::quantize`] with each group's scale chosen by `rule`.
    pub fn quantize_with(
        values: &[f32],
        rows: usize,
        cols: usize,
        granularity: Granularity,
        format: Fp8Format,
        rule: ScaleRule,
    ) -> Self {
        assert_eq!(values.len(), rows * cols, "values of a [{rows}, {cols}] matrix");
        let scales = match (granularity, rule) {
            (Granularity::Tensor, ScaleRule::Max) => vec![scale_per_tensor(values, format)],
            (Granularity::Channel, ScaleRule::Max) => scales_per_row(values, cols, format),
            (Granularity::Block(b), ScaleRule::Max) => scales_per_block(values, rows, cols, b, format),
            (Granularity::Tensor, rule) => vec![fit_scale(values, rule, format)],
            (Granularity::Channel, rule) => {
                values.par_chunks(cols.max(1)).map(|row| fit_scale(row, rule, format)).collect()
            }
            (Granularity::Block(b), rule) => {
                let bc = cols.div_ceil(b);
                (0..rows.div_ceil(b) * bc)
                    .into_par_iter()
                    .map(|i| {
                        let (r0, c0) = ((i / bc) * b, (i % bc) * b);
                        let c1 = (c0 + b).min(cols);
                        let tile: Vec<f32> = (r0..(r0 + b).min(rows))
                            .flat_map(|r| values[r * cols + c0..r * cols + c1].iter().copied())
                            .collect();
                        fit_scale(&tile, rule, format)
                    })
                    .collect()
            }
        };
        let mut m = Fp8Matrix { rows, cols, format, granularity, codes: Vec::new(), scales };
        let mut codes = vec![0u8; values.len()];
        codes.par_chunks_mut(cols.max(1)).zip(values.par_chunks(cols.max(1))).enumerate().for_each(
            |(r, (out, row))| {
                for (c, (code, &v)) in out.iter_mut().zip(row).enumerate() {
                    *code = format.encode_saturating(v / m.scale_at(r * cols + c));
                }
            },
        );
        m.codes = codes;
        m
    }

    /// The scale of element `i` (row-major index).
    pub fn scale_at(&self, i: usize) -> f32 {
        match self.granularity {
            Granularity::Tensor => self.scales[0],
            Granularity::Channel => self.scales[i / self.cols],
            Granularity::Block(b) => {
                let (r, c) = (i / self.cols, i % self.cols);
                self.scales[(r / b) * self.cols.div_ceil(b) + c / b]
            }
        }
    }

    /// The matrix's values.
    pub fn dequantize(&self) -> Vec<f32> {
        let table = decode_table(self.format);
        self.codes.iter().enumerate().map(|(i, &c)| table[c as usize] * self.scale_at(i)).collect()
    }
}

/// Every code's value, indexed by code.
pub fn decode_table(format: Fp8Format) -> [f32; 256] {
    let mut t = [0.0f32; 256];
    for (i, v) in t.iter_mut().enumerate() {
        *v = format.decode(i as u8);
    }
    t
}

/// Quantize-dequantize each row of a row-major `[rows, cols]` matrix with its own dynamic scale
/// (per-token activation quantization, emulated in f32): returns the values the FP8 codes stand for.
pub fn fake_quantize_rows(values: &mut [f32], cols: usize, format: Fp8Format) {
    let table = decode_table(format);
    values.par_chunks_mut(cols.max(1)).with_min_len(8).for_each(|row| {
        let scale = scale_for(amax(row), format);
        for v in row.iter_mut() {
            *v = table[format.encode_saturating(*v / scale) as usize] * scale;
        }
    });
}
