//! Buffer planning: liveness of every scratch buffer, then one arena where buffers whose
//! lifetimes do not overlap share bytes.
//!
//! Placement is greedy by size (largest first, each at the lowest aligned offset that
//! does not collide with an already placed buffer alive at the same time), which is what
//! TFLite's and ONNX Runtime's arena planners do and lands within a few percent of the peak
//! live size on transformer graphs.

use crate::plan::{Buffer, Kernel, Storage};

/// Alignment of every arena buffer on a CPU (a cache line; enough for any vector load). A GPU
/// target asks for its own ([`crate::schedule_aligned`]): each buffer is bound on its own there,
/// so offsets must meet the device's binding alignment.
pub const ALIGN: usize = 64;

/// Fills in `live` for every arena buffer and places them at multiples of `align`, from
/// `base` on (the persistent state's slots lie below it and are never shared); returns
/// (arena bytes with reuse, arena bytes without), both counting the slots.
pub(crate) fn plan(buffers: &mut [Buffer], kernels: &[Kernel], align: usize, base: usize) -> (usize, usize) {
    for (k, kernel) in kernels.iter().enumerate() {
        for o in kernel.operands() {
            let b = &mut buffers[o.buffer];
            if matches!(b.storage, Storage::Arena { .. }) {
                b.live = Some(match b.live {
                    None => (k, k),
                    Some((first, last)) => (first.min(k), last.max(k)),
                });
            }
        }
    }
    let mut order: Vec<usize> = (0..buffers.len()).filter(|&i| buffers[i].live.is_some()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(buffers[i].bytes()), i));
    let mut placed: Vec<(usize, usize, (usize, usize))> = Vec::new(); // (offset, size, live)
    let mut arena = 0;
    let mut unshared = 0;
    debug_assert!(base.is_multiple_of(align));
    for i in order {
        let size = buffers[i].bytes().next_multiple_of(align);
        let live = buffers[i].live.expect("filtered on live");
        unshared += size;
        let mut conflicts: Vec<(usize, usize)> = placed
            .iter()
            .filter(|(_, _, l)| l.0 <= live.1 && live.0 <= l.1)
            .map(|&(o, s, _)| (o, o + s))
            .collect();
        conflicts.sort_unstable();
        let mut offset = 0;
        for (start, end) in conflicts {
            if offset + size <= start {
                break;
            }
            offset = offset.max(end);
        }
        buffers[i].storage = Storage::Arena { offset: base + offset };
        placed.push((offset, size, live));
        arena = arena.max(offset + size);
    }
    (base + arena, base + unshared)
}
