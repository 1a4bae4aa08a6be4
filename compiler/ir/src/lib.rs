//! kiln-ir: the dataflow graph IR of primitive tensor ops.
//!
//! A [`Graph`] is a DAG of [`Node`]s, each one [`Op`] with a static [`TensorType`].
//! [`infer`] holds the typing rules, [`verify`] re-checks a whole graph, [`print`] renders it
//! as text, DOT or JSON, and [`interp`] is the reference interpreter every later stage is
//! tested against. [`seeded_input`] makes the deterministic stand-ins for inputs a run is not
//! given. A graph may keep persistent state between runs (`Graph::state`, [`eval_step`]).
//! [`autodiff`] appends the reverse-mode gradient of a loss to a graph.

pub mod alloc;
pub mod autodiff;
mod dtype;
mod fold;
mod graph;
pub mod infer;
mod init;
pub mod interp;
mod op;
pub mod print;
pub mod rng;
mod seeded;
pub mod size;
mod state;
mod tensor;
pub mod tensor_io;
mod verify;
mod weights;

pub use alloc::AllocError;
pub use autodiff::{grad, GradError};
pub use dtype::{
    dims, fmt_shape, numel, numel_dim, static_dims, strides, DType, Dim, IntoShape, Shape, TensorType,
};
pub use fold::{fold_weights, fold_weights_without_values, Folded, ProductWeights};
pub use graph::{Graph, Node, NodeId, Origin, SpecializeError, Unspecialized};
pub use infer::{broadcast_shapes, infer, infer_with, matmul_shape, InferError};
pub use init::{fans, init_param};
pub use interp::{eval, eval_op, Bindings, EvalError};
pub use op::{
    fmt_f64, Activation, BinaryOp, CompareOp, GeluApprox, Init, NormKind, Op, PoolKind, ReduceOp, UnaryOp,
};
pub use seeded::{index_bound, seeded_input, seeded_input_bounded, seeded_inputs, InputFill, SeededInput};
pub use size::{Range, SizeError, SizeExpr, Sym, SymbolDecl, TermFactor};
pub use state::{eval_step, initial_state, StateError, StateInit, StateVar};
pub use tensor::{Buffer, ShapeMismatch, Tensor};
pub use verify::{verify, VerifyError};
pub use weights::{
    bind_params, bind_params_with_warnings, MissingWeight, UnusedWeight, WeightMismatch, WeightsError,
    WeightsWarning,
};
