//! kiln-sched: from an optimized graph to kernels and a memory plan.
//!
//! [`schedule`] partitions the graph into kernels ([`partition`](crate) — fused ops, fused
//! elementwise loops, views instead of copies) and places every scratch buffer in one arena
//! ([`memory`] — liveness, then greedy best-fit), after the slots of the graph's persistent
//! state (`state.rs`), which no scratch buffer shares. The result is target-independent: code
//! generation turns each [`Kernel`] into machine code, the runtime runs them in order.

mod faults;
mod memory;
mod partition;
mod plan;
pub mod print;
mod state;
mod view;

pub use faults::{FaultKind, FaultSite, Faults};
pub use memory::ALIGN;
pub use plan::{Buffer, BufferId, Expr, Kernel, KernelOp, Operand, Schedule, StateSlot, Storage};
pub use state::state_layout;
pub use view::{product, row_major, StridedView};

use kiln_ir::Graph;
use thiserror::Error;

/// A graph that cannot be scheduled.
#[derive(Debug, Error)]
pub enum SchedError {
    #[error("cannot schedule the graph: {0}")]
    Invalid(String),
    /// A state variable whose shape reads a symbol: its slot must be the same in every run.
    #[error("cannot schedule the graph: state `{name}` is {ty}; state needs a static shape")]
    SymbolicState { name: String, ty: String },
}

/// Partitions `g` into kernels and plans its memory (arena offsets aligned to [`ALIGN`]).
pub fn schedule(g: &Graph) -> Result<Schedule, SchedError> {
    schedule_aligned(g, ALIGN)
}

/// [`schedule`] with every arena offset a multiple of `align` (a power of two, at least
/// [`ALIGN`]): a GPU target binds each buffer separately, at its device's binding alignment.
pub fn schedule_aligned(g: &Graph, align: usize) -> Result<Schedule, SchedError> {
    require_static_state(g)?;
    schedule_with_state(g, align, &state_layout(&g.state, align))
}

/// [`schedule_aligned`] with the persistent state in the slots of `layout` (made by
/// [`state_layout`] at the same `align`), which may hold more variables than `g` reads: the
/// entry points of one artifact (`forward`, `train_step`) share one layout and so one state.
pub fn schedule_with_state(g: &Graph, align: usize, layout: &[StateSlot]) -> Result<Schedule, SchedError> {
    // Extents may read the graph's symbols: views and ranges are sizes over them, and every
    // buffer is planned at its size at the maxima (`Builder::max_len`), so one plan serves
    // every run. Only the state's slots must be static.
    require_static_state(g)?;
    if !align.is_power_of_two() || align < ALIGN {
        return Err(SchedError::Invalid(format!("arena alignment {align} is not a power of two ≥ {ALIGN}")));
    }
    if layout.iter().any(|s| !s.offset.is_multiple_of(align)) {
        return Err(SchedError::Invalid(format!("a state slot is not aligned to {align} bytes")));
    }
    state::check_layout(&g.state, layout)?;
    let mut p = partition::partition(g, layout)?;
    // The arena holds the state's slots, then the scratch buffers, then the fault words.
    let base = state::state_bytes(layout, align);
    let (arena_bytes, arena_bytes_unshared) = memory::plan(&mut p.buffers, &p.kernels, align, base);
    let arena_at_hints = arena_at_hints(g, &p, align, base);
    let sites = faults::renumber(&mut p.kernels, p.fault_sites);
    let (faults, slot_bytes) = faults::reserve(&mut p.buffers, p.kernels.len(), sites, arena_bytes, align);
    let (arena_bytes, arena_bytes_unshared) = (arena_bytes + slot_bytes, arena_bytes_unshared + slot_bytes);
    let arena_bytes_at_hints = arena_at_hints.map(|b| b + slot_bytes);
    let io = |n: &kiln_ir::NodeId| {
        let t = g.ty(*n);
        (t.dtype, t.shape.clone())
    };
    Ok(Schedule {
        graph: g.name.clone(),
        symbols: g.symbols.clone(),
        inputs: g
            .inputs
            .iter()
            .map(|n| {
                let name = match &g.node(*n).op {
                    kiln_ir::Op::Input { name, .. } => name.clone(),
                    _ => format!("input{}", n.index()),
                };
                let (d, s) = io(n);
                (name, d, s)
            })
            .collect(),
        outputs: g
            .outputs
            .iter()
            .map(|(name, n)| {
                let (d, s) = io(n);
                (name.clone(), d, s)
            })
            .collect(),
        buffers: p.buffers,
        kernels: p.kernels,
        arena_bytes,
        arena_bytes_at_hints,
        arena_align: align,
        index_bounds: g
            .inputs
            .iter()
            .map(|n| match &g.node(*n).op {
                kiln_ir::Op::Input { name, .. } => kiln_ir::index_bound(g, name),
                _ => None,
            })
            .collect(),
        arena_bytes_unshared,
        state: layout.to_vec(),
        faults,
    })
}

/// Refuses a state variable with a symbolic shape, by name.
fn require_static_state(g: &Graph) -> Result<(), SchedError> {
    match g.state.iter().find(|v| !v.ty.is_static()) {
        Some(v) => Err(SchedError::SymbolicState { name: v.name.clone(), ty: v.ty.to_string() }),
        None => Ok(()),
    }
}

/// The arena the same kernels would need with every buffer at its size at the symbols' hints
/// (planned again at those sizes; the schedule itself keeps the plan at the maxima). `None`
/// for a static graph.
fn arena_at_hints(g: &Graph, p: &partition::Partition, align: usize, base: usize) -> Option<usize> {
    if g.symbols.is_empty() {
        return None;
    }
    let hints: Vec<i64> = g.symbols.iter().map(|d| d.hint).collect();
    let mut buffers = p.buffers.clone();
    for (b, size) in buffers.iter_mut().zip(&p.sizes) {
        b.len = size.eval(&hints)?.max(1);
        b.live = None;
    }
    Some(memory::plan(&mut buffers, &p.kernels, align, base).0)
}
