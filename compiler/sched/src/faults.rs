//! Fault sites and the fault word: the ops whose compiled code can fail (today an integer
//! division whose divisor can be zero) and the small arena slot they report into.
//!
//! The interpreter stops at the first such error; compiled kernels cannot stop, so each site
//! records instead. The slot is `1 + sites` little-endian `u32` words: word 0 is the lowest
//! site that faulted (sites are numbered in step order, so it is the first fault of the run),
//! word `1 + s` the lowest element at which site `s` faulted. Both are kept with atomic
//! unsigned minimums, so the result does not depend on thread or invocation timing; the
//! runtime fills the slot with `u32::MAX` ("no fault") before every run and reads it after.
//! Only schedules with a site reserve a slot, and only kernels with a site take it as an
//! argument: everything else compiles exactly as before.

use crate::plan::{Buffer, BufferId, Expr, Kernel, KernelOp, Storage};
use kiln_ir::DType;
use serde::Serialize;

/// What faults at a site.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum FaultKind {
    /// An integer division met a zero divisor.
    IntDivByZero,
}

/// One op whose compiled code can fault, with what an error about it needs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FaultSite {
    pub kind: FaultKind,
    /// The kernel (index into [`crate::Schedule::kernels`]) that holds the op.
    pub kernel: usize,
    /// The op's name (`div`), its spec name and spec position, as the interpreter names a node.
    pub op: String,
    pub name: Option<String>,
    pub origin: Option<String>,
    /// The op's result shape: faults are recorded at row-major positions of it.
    pub shape: Vec<usize>,
    /// The divisor's own shape (broadcast to `shape`), in which the interpreter reports the
    /// element.
    pub divisor: Vec<usize>,
}

/// The schedule's fault sites and the arena buffer of `u32` words they report into.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Faults {
    pub slot: BufferId,
    pub sites: Vec<FaultSite>,
}

impl Faults {
    /// Words in the slot: the first-fault word, then one element word per site.
    pub fn words(&self) -> usize {
        1 + self.sites.len()
    }
}

/// Renumbers the sites in execution order (kernel order, then the order a kernel evaluates
/// its expression: operands before the op) and drops any no kernel holds. Partitioning numbers
/// them as it meets them, which can put a site of an operand's kernel after its user's.
pub(crate) fn renumber(kernels: &mut [Kernel], found: Vec<FaultSite>) -> Vec<FaultSite> {
    let mut sites = Vec::new();
    for (k, kernel) in kernels.iter_mut().enumerate() {
        if let KernelOp::Elementwise(e) = &mut kernel.op {
            visit(e, &mut |old| {
                let mut site = found[old].clone();
                site.kernel = k;
                sites.push(site);
                sites.len() - 1
            });
        }
    }
    sites
}

/// Calls `f` on each site of `e` in evaluation order and replaces it by what `f` returns.
fn visit(e: &mut Expr, f: &mut impl FnMut(usize) -> usize) {
    match e {
        Expr::Operand(_) | Expr::Scalar { .. } | Expr::Iota { .. } | Expr::Random { .. } => {}
        Expr::Apply { args, fault, .. } => {
            for a in args.iter_mut() {
                visit(a, f);
            }
            if let Some(site) = fault {
                *site = f(*site);
            }
        }
    }
}

/// Whether `e` holds a fault site.
pub(crate) fn can_fault(e: &Expr) -> bool {
    match e {
        Expr::Operand(_) | Expr::Scalar { .. } | Expr::Iota { .. } | Expr::Random { .. } => false,
        Expr::Apply { args, fault, .. } => fault.is_some() || args.iter().any(can_fault),
    }
}

/// Reserves the slot for `sites` at the end of the arena (at `align`) in a schedule of
/// `kernels` kernels; returns the faults and the bytes the arena grows by. `None` when there is
/// no site: no slot, no growth.
pub(crate) fn reserve(
    buffers: &mut Vec<Buffer>,
    kernels: usize,
    sites: Vec<FaultSite>,
    arena_bytes: usize,
    align: usize,
) -> (Option<Faults>, usize) {
    if sites.is_empty() {
        return (None, 0);
    }
    let offset = arena_bytes.next_multiple_of(align);
    let len = 1 + sites.len();
    // Alive for the whole run (the runtime reads it after the last kernel), after everything
    // memory planning placed.
    let live = Some((0, kernels.saturating_sub(1)));
    buffers.push(Buffer { storage: Storage::Arena { offset }, dtype: DType::I32, len, live });
    let slot = buffers.len() - 1;
    (Some(Faults { slot, sites }), offset + len * DType::I32.size_bytes() - arena_bytes)
}
