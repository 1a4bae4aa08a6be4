//! Kernel emitters: each turns one scheduled kernel into MLIR text (see [`crate::kernel`] for
//! the calling contract). Operands arrive as [`View`]s of flat buffers.

pub mod attention;
pub mod elementwise;
pub mod matmul;
pub mod norm;
mod view;

pub use view::View;
