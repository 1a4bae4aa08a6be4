//! Kernel emitters: each turns one scheduled kernel into MLIR text (see [`crate::kernel`] for
//! the calling contract). Operands arrive as [`View`]s of flat buffers.

pub mod attention;
pub mod conv;
pub mod data;
pub mod elementwise;
pub mod matmul;
pub mod norm;
pub mod reduce;
mod rows;
pub mod scatter;
mod view;

pub use view::View;
