//! What Flint's GPU tests share (a dev-dependency of the crates that test on the GPU).
//!
//! - [`gpu`]: GPU 0 when there is a usable CUDA device and the kernels are built, else `None`
//!   and a line saying the test is skipped; with `FLINT_REQUIRE_GPU` set (the GPU machine's
//!   runs) a missing GPU fails the test instead of skipping it.
//! - [`rng`]: fresh random inputs on every run, from a seed that is printed (and taken from
//!   `FLINT_TEST_SEED` when set) so that a failure can be replayed.

use std::sync::Arc;

use flint_cuda::Gpu;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Whether this run must have a GPU (`FLINT_REQUIRE_GPU` is set).
pub fn gpu_required() -> bool {
    std::env::var_os("FLINT_REQUIRE_GPU").is_some()
}

/// GPU 0, or `None` (the caller returns: skipped) where there is no usable GPU or the kernels
/// are not built. Panics instead of skipping when [`gpu_required`].
pub fn gpu() -> Option<Arc<Gpu>> {
    if !flint_cuda::cuda_available() || !flint_kernels::all_built() {
        assert!(!gpu_required(), "FLINT_REQUIRE_GPU is set but there is no usable GPU or the kernels are not built");
        eprintln!("skipped: no CUDA device or kernels not built");
        return None;
    }
    Some(Gpu::new(0).expect("open GPU 0"))
}

/// A generator seeded from `FLINT_TEST_SEED`, else at random; the seed is printed.
pub fn rng() -> ChaCha8Rng {
    let seed = std::env::var("FLINT_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("seed {seed}");
    ChaCha8Rng::seed_from_u64(seed)
}
