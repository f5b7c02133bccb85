//! flint-server over real gRPC on loopback, with the real default model on the CPU.

mod hostile;
mod load;
mod support;
