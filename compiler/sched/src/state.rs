//! Persistent state in the arena: each state variable of the graph (`kiln_ir::StateVar`) gets
//! a slot of its own at the start of the arena, which no scratch buffer ever shares, so its
//! value survives from one run to the next and every entry point over the same state
//! ([`state_layout`] of the same variables) finds it at the same offset.
//!
//! An update `state ← value` is written in place when it can be: the kernel computing the
//! value writes straight into the slot when every read of the old value comes before that
//! kernel (or is that kernel's own elementwise read of the same element). Otherwise the value
//! is copied into the slot at the end of the run, after every kernel; a value that is itself
//! another variable's old value is first copied aside, so the copies may run in any order.

use crate::partition::Builder;
use crate::plan::{Expr, Kernel, KernelOp, Operand, StateSlot, Storage};
use crate::view::StridedView;
use crate::SchedError;
use kiln_ir::StateVar;

/// The slots of `state`, in its order, each at a multiple of `align` from the arena's start.
pub fn state_layout(state: &[StateVar], align: usize) -> Vec<StateSlot> {
    let mut offset = 0;
    state
        .iter()
        .map(|v| {
            // A symbolic state variable gets an empty slot here; scheduling refuses it by name.
            let shape = kiln_ir::static_dims(&v.ty.shape).unwrap_or_default();
            let bytes = shape.iter().product::<usize>().max(1) * v.ty.dtype.size_bytes();
            let slot = StateSlot { name: v.name.clone(), dtype: v.ty.dtype, shape, offset, init: v.init };
            offset += bytes.next_multiple_of(align);
            slot
        })
        .collect()
}

/// The bytes the slots take at the start of the arena (scratch starts there).
pub(crate) fn state_bytes(layout: &[StateSlot], align: usize) -> usize {
    layout.last().map_or(0, |s| s.offset + s.bytes().next_multiple_of(align))
}

/// Checks that every variable of the graph has its slot in `layout`, of its type.
pub(crate) fn check_layout(state: &[StateVar], layout: &[StateSlot]) -> Result<(), SchedError> {
    for v in state {
        match layout.iter().find(|s| s.name == v.name) {
            Some(s) if s.dtype == v.ty.dtype && s.shape == v.ty.static_shape() => {}
            Some(s) => {
                return Err(SchedError::Invalid(format!(
                    "state `{}` is {} but its slot holds {}{}",
                    v.name,
                    v.ty,
                    s.dtype,
                    kiln_ir::fmt_shape(&s.shape)
                )))
            }
            None => return Err(SchedError::Invalid(format!("state `{}` has no slot in the layout", v.name))),
        }
    }
    Ok(())
}

/// Writes every update of the graph's state into its slot: in place where the module
/// documentation allows it, else by a copy at the end.
pub(crate) fn place_updates(b: &mut Builder<'_>) -> Result<(), SchedError> {
    let mut updates = Vec::new();
    for v in &b.g.state {
        if let Some(u) = v.update {
            let index = b.slot_of(&v.name)?;
            updates.push((index, b.operand(u)?));
        }
    }
    let reads_of = |b: &Builder<'_>, index: usize| -> Vec<usize> {
        b.state_reads.iter().filter(|(i, _)| *i == index).map(|(_, buf)| *buf).collect()
    };
    // A variable whose old value another update takes is never overwritten before the copies.
    let taken_old: Vec<usize> = updates
        .iter()
        .filter_map(|(_, src)| b.state_reads.iter().find(|(_, buf)| *buf == src.buffer).map(|(i, _)| *i))
        .collect();
    let mut copies = Vec::new();
    let mut claimed = Vec::new();
    for (index, src) in updates {
        let reads = reads_of(b, index);
        let producer = in_place_producer(&b.buffers, &b.kernels, &src, &reads, &b.layout[index]);
        match producer {
            Some(_) if !taken_old.contains(&index) && !claimed.contains(&src.buffer) => {
                b.buffers[src.buffer].storage = Storage::State { index };
                claimed.push(src.buffer);
            }
            _ => copies.push((index, src)),
        }
    }
    // Old values that a copy reads are copied aside first, so no copy sees a slot it follows.
    let mut sources = Vec::with_capacity(copies.len());
    for (index, src) in copies {
        let old_state = b.state_reads.iter().any(|(i, buf)| *buf == src.buffer && taken_old.contains(i));
        let src = if old_state { b.copy_to_arena(&src, Vec::new())? } else { src };
        sources.push((index, src));
    }
    for (index, src) in sources {
        let slot = &b.layout[index];
        let shape = slot.shape.clone();
        let buffer = b.add_buffer(Storage::State { index }, slot.dtype, shape.iter().product());
        let output = Operand { buffer, view: StridedView::contiguous(&shape), dtype: slot.dtype };
        b.kernels.push(Kernel {
            op: KernelOp::Elementwise(Expr::Operand(0)),
            inputs: vec![src],
            output,
            extra_outputs: vec![],
            nodes: Vec::new(),
        });
    }
    Ok(())
}

/// The kernel that may write `src` straight into its variable's slot, if one may: `src` is
/// the whole of an arena buffer that one kernel writes, and every read of the old value
/// (`reads`) is in an earlier kernel or is that kernel's own elementwise read of the same
/// element.
fn in_place_producer(
    buffers: &[crate::plan::Buffer],
    kernels: &[Kernel],
    src: &Operand,
    reads: &[usize],
    slot: &StateSlot,
) -> Option<usize> {
    let whole = StridedView::contiguous(&slot.shape);
    let buffer = &buffers[src.buffer];
    let numel: usize = slot.shape.iter().product();
    if !matches!(buffer.storage, Storage::Arena { .. }) || src.view != whole || buffer.len != numel.max(1) {
        return None;
    }
    let writers: Vec<usize> =
        kernels.iter().enumerate().filter(|(_, k)| k.output.buffer == src.buffer).map(|(i, _)| i).collect();
    let [k] = writers.as_slice() else { return None };
    let producer = &kernels[*k];
    let elementwise_same_place =
        matches!(producer.op, KernelOp::Elementwise(_)) && producer.output.view == whole;
    for (j, kernel) in kernels.iter().enumerate() {
        for o in kernel.inputs.iter().filter(|o| reads.contains(&o.buffer)) {
            let fine = j < *k || (j == *k && elementwise_same_place && o.view == whole);
            if !fine {
                return None;
            }
        }
    }
    Some(*k)
}

#[cfg(test)]
mod tests {
    use crate::{schedule, Schedule, Storage};
    use kiln_ir::{BinaryOp, DType, Graph, Init, NodeId, Op, ReduceOp, StateInit};

    fn leaf(g: &mut Graph, op: Op) -> NodeId {
        g.add(op, &[]).unwrap()
    }

    fn param(g: &mut Graph, name: &str) -> NodeId {
        leaf(
            g,
            Op::Param { name: name.into(), dtype: DType::F32, shape: kiln_ir::dims(&[4]), init: Init::Zeros },
        )
    }

    /// `y = w·x`, `w ← w − x`, and with `late_read` an output `s = sum(w)` computed after
    /// the update's kernel.
    fn step(late_read: bool) -> Schedule {
        let mut g = Graph::new("step");
        let x = leaf(&mut g, Op::Input { name: "x".into(), dtype: DType::F32, shape: kiln_ir::dims(&[4]) });
        let w = param(&mut g, "w");
        let y = g.add(Op::Binary(BinaryOp::Mul), &[w, x]).unwrap();
        let w2 = g.add(Op::Binary(BinaryOp::Sub), &[w, x]).unwrap();
        g.add_output("y", y);
        g.add_output("new_w", w2);
        if late_read {
            let s = g.add(Op::Reduce { op: ReduceOp::Sum, axes: vec![0], keepdims: false }, &[w]).unwrap();
            g.add_output("s", s);
        }
        g.declare_state("w", StateInit::Weights, Some("new_w")).unwrap();
        kiln_ir::verify(&g).unwrap();
        schedule(&g).unwrap()
    }

    fn writes_to_state(s: &Schedule) -> Vec<(usize, String)> {
        s.kernels
            .iter()
            .enumerate()
            .filter(|(_, k)| matches!(s.buffers[k.output.buffer].storage, Storage::State { .. }))
            .map(|(i, k)| (i, k.name()))
            .collect()
    }

    #[test]
    fn an_update_after_every_read_writes_in_place() {
        let s = step(false);
        assert_eq!(writes_to_state(&s), [(1, "sub".to_string())]);
        assert_eq!(s.state[0].offset, 0);
        // Scratch starts after the slot (16 bytes, one 64-byte line).
        for b in &s.buffers {
            if let Storage::Arena { offset } = b.storage {
                assert!(offset >= 64, "{b:?}");
            }
        }
    }

    #[test]
    fn an_update_before_a_read_of_the_old_value_is_copied_at_the_end() {
        let s = step(true);
        let last = s.kernels.len() - 1;
        assert_eq!(writes_to_state(&s), [(last, "copy".to_string())]);
        assert_eq!(s.kernels[last].name(), "copy");
    }

    #[test]
    fn an_update_another_op_reads_is_computed_once_into_its_slot() {
        let mut g = Graph::new("reuse");
        let x = leaf(&mut g, Op::Input { name: "x".into(), dtype: DType::F32, shape: kiln_ir::dims(&[4]) });
        let w = param(&mut g, "w");
        let w2 = g.add(Op::Binary(BinaryOp::Sub), &[w, x]).unwrap();
        let y = g.add(Op::Binary(BinaryOp::Mul), &[w2, x]).unwrap();
        g.add_output("y", y);
        g.add_output("new_w", w2);
        g.declare_state("w", StateInit::Weights, Some("new_w")).unwrap();
        let s = schedule(&g).unwrap();
        let kernels: Vec<String> = s
            .kernels
            .iter()
            .map(|k| {
                let ins: Vec<String> = k.inputs.iter().map(|o| crate::print::storage(&s, o)).collect();
                format!("{}({}) -> {}", k.name(), ins.join(", "), crate::print::storage(&s, &k.output))
            })
            .collect();
        assert_eq!(kernels, ["sub(state:w@0, in:x) -> state:w@0", "mul(state:w@0, in:x) -> out:y"]);
    }

    #[test]
    fn swapped_state_is_copied_aside_first() {
        let mut g = Graph::new("swap");
        let (a, b) = (param(&mut g, "a"), param(&mut g, "b"));
        g.add_output("new_a", b);
        g.add_output("new_b", a);
        g.declare_state("a", StateInit::Zeros, Some("new_a")).unwrap();
        g.declare_state("b", StateInit::Zeros, Some("new_b")).unwrap();
        let s = schedule(&g).unwrap();
        let kinds: Vec<String> = s
            .kernels
            .iter()
            .map(|k| crate::print::storage(&s, &k.inputs[0]) + " -> " + &crate::print::storage(&s, &k.output))
            .collect();
        assert_eq!(
            kinds,
            [
                "state:b@64 -> arena@128",
                "state:a@0 -> arena@192",
                "arena@128 -> state:a@0",
                "arena@192 -> state:b@64",
            ]
        );
    }
}
