//! The schedule's data: buffers, kernels and the fused elementwise expressions.

use crate::view::StridedView;
use kiln_ir::{DType, NodeId, Op, Shape, StateInit, SymbolDecl, Tensor};
use serde::Serialize;

/// Index into [`Schedule::buffers`].
pub type BufferId = usize;

/// Where a buffer's bytes live at run time.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Storage {
    /// The caller's input `index`.
    Input { index: usize },
    /// The caller's output `index`.
    Output { index: usize },
    /// A parameter, bound by its checkpoint name.
    Weight { name: String },
    /// A literal tensor of the graph, stored with the weights under `name`.
    Const {
        name: String,
        #[serde(skip)]
        value: Tensor,
    },
    /// Scratch memory at `offset` of the arena (aligned to the schedule's alignment, 64 bytes on a CPU).
    Arena { offset: usize },
    /// Persistent state: slot `index` of [`Schedule::state`], kept from one run to the next.
    State { index: usize },
}

/// A state variable's slot: where in the arena it lives and where its first value comes from.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StateSlot {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Byte offset from the arena's start (the slots come first; scratch never reuses them).
    pub offset: usize,
    #[serde(skip)]
    pub init: StateInit,
}

impl StateSlot {
    pub fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>().max(1) * self.dtype.size_bytes()
    }
}

/// One buffer: a flat array of `len` elements of `dtype`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Buffer {
    pub storage: Storage,
    pub dtype: DType,
    /// Elements, at the symbols' maxima when the shape is symbolic: the arena holds every
    /// buffer at its largest, so one plan serves every run.
    pub len: usize,
    /// Kernels (indices into [`Schedule::kernels`]) that first write and last read it;
    /// `None` for buffers that outlive the run (inputs, outputs, weights, state).
    pub live: Option<(usize, usize)>,
}

impl Buffer {
    pub fn bytes(&self) -> usize {
        self.len * self.dtype.size_bytes()
    }
}

/// A kernel operand: a view of a buffer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Operand {
    pub buffer: BufferId,
    pub view: StridedView,
    pub dtype: DType,
}

/// A fused elementwise computation: a tree over the kernel's operands, evaluated per element
/// of the output.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Expr {
    /// The kernel's input operand at this index (its view is broadcast to the output shape).
    Operand(usize),
    /// A constant of `dtype`.
    Scalar { value: f64, dtype: DType },
    /// The output element's index along `axis`, as `dtype` (an `iota` kernel).
    Iota { axis: usize, dtype: DType },
    /// Counter-based uniform random numbers: the output element at row-major position `i`
    /// is `rng::uniform(seed, 0, offset + base + i)`, `base` the i64 value of the kernel's
    /// input operand at that index (a scalar broadcast to the output) when there is one.
    Random { seed: u64, offset: u64, base: Option<usize>, dtype: DType },
    /// An elementwise op (unary, binary, compare, where, cast, gelu) of sub-expressions,
    /// with its result dtype. `fault` is the op's fault site (an index into
    /// [`crate::Faults::sites`]) when its compiled code can fault: an integer division whose
    /// divisor is not a non-zero constant.
    Apply { op: Op, args: Vec<Expr>, dtype: DType, fault: Option<usize> },
}

impl Expr {
    /// Number of IR ops the expression computes.
    pub fn op_count(&self) -> usize {
        match self {
            Expr::Operand(_) | Expr::Scalar { .. } => 0,
            Expr::Iota { .. } | Expr::Random { .. } => 1,
            Expr::Apply { args, .. } => 1 + args.iter().map(Expr::op_count).sum::<usize>(),
        }
    }

    /// The expression in prefix form, e.g. `add(mul(%0, 2.0), %1)`.
    pub fn render(&self) -> String {
        match self {
            Expr::Operand(i) => format!("%{i}"),
            Expr::Scalar { value, .. } => kiln_ir::fmt_f64(*value),
            Expr::Iota { axis, .. } => format!("iota({axis})"),
            Expr::Random { seed, offset, base: None, .. } => format!("random({seed}, {offset})"),
            Expr::Random { seed, offset, base: Some(i), .. } => format!("random({seed}, {offset} + %{i})"),
            Expr::Apply { op, args, .. } => {
                let a: Vec<String> = args.iter().map(Expr::render).collect();
                let name = match op {
                    Op::Cast { to } => format!("cast<{to}>"),
                    other => other.name().to_string(),
                };
                format!("{name}({})", a.join(", "))
            }
        }
    }
}

/// What a kernel computes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum KernelOp {
    /// A fused elementwise group.
    Elementwise(Expr),
    /// One non-elementwise op of the IR (matmul, attention, norms, reduce, gather, …).
    Node(Op),
}

/// One kernel: its computation, operands (inputs in op order) and output.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Kernel {
    pub op: KernelOp,
    pub inputs: Vec<Operand>,
    pub output: Operand,
    /// Further results the same kernel writes, its arguments after `output`: the log-sum-exp
    /// of an attention's scores beside its output (`attention_lse` of the same operands, which
    /// the backward reads). Usually empty.
    pub extra_outputs: Vec<Operand>,
    /// The IR nodes it computes (for inspection and profiles).
    #[serde(skip)]
    pub nodes: Vec<NodeId>,
}

impl Kernel {
    /// Every operand in argument order: the inputs, the output, the extra outputs.
    pub fn operands(&self) -> impl Iterator<Item = &Operand> {
        self.inputs.iter().chain(std::iter::once(&self.output)).chain(&self.extra_outputs)
    }

    /// [`Kernel::operands`], to rewrite.
    pub fn operands_mut(&mut self) -> impl Iterator<Item = &mut Operand> {
        self.inputs.iter_mut().chain(std::iter::once(&mut self.output)).chain(&mut self.extra_outputs)
    }

    /// Whether the kernel holds a fault site, and so takes the fault slot as its last argument.
    pub fn can_fault(&self) -> bool {
        match &self.op {
            KernelOp::Elementwise(e) => crate::faults::can_fault(e),
            KernelOp::Node(_) => false,
        }
    }

    /// A short name: the op, or `fused(a, b, …)` for an elementwise group.
    pub fn name(&self) -> String {
        match &self.op {
            KernelOp::Node(op) => match op {
                Op::MatMulEpilogue { activation, .. } if activation.name() != "none" => {
                    format!("matmul_epilogue({})", activation.name())
                }
                other => other.name().to_string(),
            },
            KernelOp::Elementwise(e) => match e {
                Expr::Operand(_) => "copy".to_string(),
                Expr::Iota { .. } => "iota".to_string(),
                Expr::Random { .. } => "random_uniform".to_string(),
                Expr::Scalar { .. } => "fill".to_string(),
                Expr::Apply { op, .. } if e.op_count() == 1 => op.name().to_string(),
                _ => format!("elementwise×{}", e.op_count()),
            },
        }
    }
}

/// A graph partitioned into kernels, with every buffer placed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Schedule {
    pub graph: String,
    /// The graph's symbols (empty for a static graph): views, input and output shapes and
    /// kernel ranges are sizes over them, bound at run time.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub symbols: Vec<SymbolDecl>,
    pub inputs: Vec<(String, DType, Shape)>,
    pub outputs: Vec<(String, DType, Shape)>,
    pub buffers: Vec<Buffer>,
    pub kernels: Vec<Kernel>,
    /// Bytes of scratch memory all arena buffers need at once, after reuse (at the symbols'
    /// maxima: the plan is one for every run).
    pub arena_bytes: usize,
    /// For a graph with symbols, the arena the same plan would take with every buffer at its
    /// size at the hints (what a typical run touches); `None` for a static graph.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arena_bytes_at_hints: Option<usize>,
    /// Bytes the arena buffers would need without reuse.
    pub arena_bytes_unshared: usize,
    /// Every arena offset is a multiple of this (a power of two).
    pub arena_align: usize,
    /// For each input, in order, the bound stand-in values must stay below when it indexes a
    /// table (`kiln_ir::index_bound`), so a run of the compiled model given no inputs draws
    /// what the interpreter draws.
    pub index_bounds: Vec<Option<usize>>,
    /// The persistent state's slots (the same for every entry point over that state);
    /// empty for a graph without state.
    pub state: Vec<StateSlot>,
    /// The ops whose compiled code can fault and the arena slot they report into; `None` when
    /// no kernel can fault.
    pub faults: Option<crate::Faults>,
}
