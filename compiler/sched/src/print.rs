//! `kiln inspect --stage kernels`: the kernels, their operands and the memory plan.

use crate::plan::{Operand, Schedule, Storage};
use kiln_ir::fmt_shape;
use std::fmt::Write;

pub(crate) fn storage(s: &Schedule, o: &Operand) -> String {
    buffer_storage(s, o.buffer)
}

fn buffer_storage(s: &Schedule, b: usize) -> String {
    match &s.buffers[b].storage {
        Storage::Input { index } => format!("in:{}", s.inputs[*index].0),
        Storage::Output { index } => format!("out:{}", s.outputs[*index].0),
        Storage::Weight { name } => format!("w:{name}"),
        Storage::Const { name, .. } => format!("const:{name}"),
        Storage::Arena { offset } => format!("arena@{offset}"),
        Storage::State { index } => format!("state:{}@{}", s.state[*index].name, s.state[*index].offset),
    }
}

fn operand(s: &Schedule, o: &Operand) -> String {
    let mut t = format!("{}{} {}", o.dtype, fmt_shape(&o.view.shape), storage(s, o));
    if !o.view.is_dense() || o.view.offset != 0 {
        let _ = write!(t, " strides={}", fmt_shape(&o.view.strides));
        if o.view.offset != 0 {
            let _ = write!(t, " +{}", o.view.offset);
        }
    }
    t
}

/// The schedule as text: one line per kernel, then the arena summary.
pub fn to_text(s: &Schedule) -> String {
    let mut out = String::new();
    // With symbols, the arena is planned at their maxima; the hints' arena follows.
    let at_hints = match s.arena_bytes_at_hints {
        Some(b) => format!(" at the maxima, {b} bytes at the hints"),
        None => String::new(),
    };
    let _ = writeln!(
        out,
        "# {} kernels, arena {} bytes{at_hints} ({} without reuse), {} buffers",
        s.kernels.len(),
        s.arena_bytes,
        s.arena_bytes_unshared,
        s.buffers.len()
    );
    let _ = writeln!(out, "schedule {} {{", s.graph);
    for (i, k) in s.kernels.iter().enumerate() {
        let ins: Vec<String> = k.inputs.iter().map(|o| operand(s, o)).collect();
        let outs: Vec<String> =
            std::iter::once(&k.output).chain(&k.extra_outputs).map(|o| operand(s, o)).collect();
        let _ = write!(out, "  k{i} {} ({}) -> {}", k.name(), ins.join(", "), outs.join(", "));
        if let crate::KernelOp::Elementwise(e) = &k.op {
            if e.op_count() > 1 {
                let _ = write!(out, "  = {}", e.render());
            }
        }
        out.push('\n');
    }
    if let Some(f) = &s.faults {
        let sites: Vec<String> = f.sites.iter().map(|site| format!("k{} {}", site.kernel, site.op)).collect();
        let _ = writeln!(
            out,
            "  faults {} ({} words): {}",
            buffer_storage(s, f.slot),
            f.words(),
            sites.join(", ")
        );
    }
    out.push_str("}\n");
    out
}
