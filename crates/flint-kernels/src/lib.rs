//! Flint's CUDA kernels as embedded fatbins (`sm_90a` SASS plus `compute_90a` PTX), compiled
//! from `kernels/` by `cargo xtask kernels`. A build without them still compiles; asking for a
//! module then says how to build the kernels.

include!(concat!(env!("OUT_DIR"), "/modules.rs"));

/// The fatbin of module `name`, if the kernels were built.
pub fn module(name: &str) -> Option<&'static [u8]> {
    MODULES.iter().find(|(n, _)| *n == name).map(|(_, bytes)| *bytes)
}

/// Whether every module was compiled in.
pub fn all_built() -> bool {
    MODULE_NAMES.iter().all(|n| module(n).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_modules_are_fatbins() {
        for (name, bytes) in MODULES {
            // A fatbin starts with the magic 0xBA55ED50 (little endian).
            assert!(bytes.len() > 16, "{name} is empty");
            assert_eq!(&bytes[..4], &[0x50, 0xed, 0x55, 0xba], "{name} is not a fatbin");
        }
    }
}
