//! kiln-sched: from an optimized graph to kernels and a memory plan.
//!
//! [`schedule`] partitions the graph into kernels ([`partition`](crate) — fused ops, fused
//! elementwise loops, views instead of copies) and places every scratch buffer in one arena
//! ([`memory`] — liveness, then greedy best-fit). The result is target-independent: code
//! generation turns each [`Kernel`] into machine code, the runtime runs them in order.

mod faults;
mod memory;
mod partition;
mod plan;
pub mod print;
mod view;

pub use faults::{FaultKind, FaultSite, Faults};
pub use memory::ALIGN;
pub use plan::{Buffer, BufferId, Expr, Kernel, KernelOp, Operand, Schedule, Storage};
pub use view::StridedView;

use kiln_ir::Graph;
use thiserror::Error;

/// A graph that cannot be scheduled.
#[derive(Debug, Error)]
pub enum SchedError {
    #[error("cannot schedule the graph: {0}")]
    Invalid(String),
}

/// Partitions `g` into kernels and plans its memory (arena offsets aligned to [`ALIGN`]).
pub fn schedule(g: &Graph) -> Result<Schedule, SchedError> {
    schedule_aligned(g, ALIGN)
}

/// [`schedule`] with every arena offset a multiple of `align` (a power of two, at least
/// [`ALIGN`]): a GPU target binds each buffer separately, at its device's binding alignment.
pub fn schedule_aligned(g: &Graph, align: usize) -> Result<Schedule, SchedError> {
    if !align.is_power_of_two() || align < ALIGN {
        return Err(SchedError::Invalid(format!("arena alignment {align} is not a power of two ≥ {ALIGN}")));
    }
    let mut p = partition::partition(g)?;
    let (arena_bytes, arena_bytes_unshared) = memory::plan(&mut p.buffers, &p.kernels, align);
    let sites = faults::renumber(&mut p.kernels, p.fault_sites);
    let (faults, slot_bytes) = faults::reserve(&mut p.buffers, p.kernels.len(), sites, arena_bytes, align);
    let (arena_bytes, arena_bytes_unshared) = (arena_bytes + slot_bytes, arena_bytes_unshared + slot_bytes);
    let io = |n: &kiln_ir::NodeId| {
        let t = g.ty(*n);
        (t.dtype, t.shape.clone())
    };
    Ok(Schedule {
        graph: g.name.clone(),
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
        faults,
    })
}
