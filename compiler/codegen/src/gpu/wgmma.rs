//! Warpgroup products (`wgmma.mma_async`, NVIDIA `sm_90a`): four warps multiply a 64-row A
//! tile by a B tile straight from shared memory into f32 accumulators, `m64nNk16` with f16
//! or bf16 operands, `m64nNk8` with TF32 ones (which the instruction reads only along k).
//! The operands are named by matrix descriptors (PTX ISA, "Matrix Descriptor"): a 64-bit
//! value holding the tile's shared address, and the distances between its core matrices (8
//! lines of 16 bytes) along k (the leading byte offset) and along m or n (the stride byte
//! offset), all in units of 16 bytes, with no swizzling; A may come from registers instead
//! (attention's fragments). Here are the descriptors of the layouts `plan::warpgroup_layouts`
//! and `plan::warpgroup_attention_layouts` give, the instructions as NVVM text, and, on
//! SPIR-V, the products emulated from the same descriptors, so that the layouts, the
//! descriptors' offsets and the accumulators' places can be checked on any Vulkan device.

use super::mma::{mma_parts, unpack, Fragment, Lanes, Part, Parts, C_FRAGMENT, MMA_M, MMA_N};
use super::plan::{CoreLines, MmaPrecision, SharedLayout, CORE, CORE_LINE_BYTES};
use super::skeleton::{offset_at, plus, SharedArray};
use crate::mlir_text::Body;

/// The rows of A one warpgroup's products cover.
pub(crate) const WGMMA_M: usize = 64;

/// How one operand's tile lies for the products, in bytes: the distance between neighbouring
/// core matrices along k (`leading`) and along m or n (`stride`), and whether a core's lines
/// run along m or n (the operand "transposed" for the instruction) instead of along k.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Descriptor {
    pub leading: usize,
    pub stride: usize,
    pub mn_major: bool,
}

impl Descriptor {
    /// The descriptor of A's tile (`m × k`) laid out as `layout`, of `elem` bytes per element.
    pub fn of_a(layout: &SharedLayout, elem: usize) -> Descriptor {
        Descriptor {
            leading: layout.col * elem,
            stride: layout.row * elem,
            mn_major: layout.cores.is_some_and(|c| c.lines == CoreLines::AlongRows),
        }
    }

    /// The descriptor of B's tile (`k × n`) laid out as `layout`.
    pub fn of_b(layout: &SharedLayout, elem: usize) -> Descriptor {
        Descriptor {
            leading: layout.row * elem,
            stride: layout.col * elem,
            mn_major: layout.cores.is_some_and(|c| c.lines == CoreLines::AlongColumns),
        }
    }

    /// The descriptor's fields but the start address: the leading byte offset in bits 16–29,
    /// the stride byte offset in bits 32–45 (both in 16-byte units), no base offset, no
    /// swizzling (bits 62–63 zero).
    pub fn high_bits(&self) -> u64 {
        (((self.leading >> 4) as u64) << 16) | (((self.stride >> 4) as u64) << 32)
    }

    /// The byte offset, from a product's start, of the element at `mn` along m (or n) and `k`
    /// along k, as the instruction reads the tile: k-major, core `(mn / 8, k / w)` at
    /// `(mn / 8)·stride + (k / w)·leading` (`w` elements to a line of 16 bytes), inside it 8
    /// lines along k; mn-major, the other way round.
    fn element(&self, b: &mut Body, mn: &str, k: &str, elem: usize) -> String {
        let width = CORE_LINE_BYTES / elem;
        let (per_mn, per_k) = if self.mn_major { (width, CORE) } else { (CORE, width) };
        let [mn_core, mn_in, k_core, k_in] =
            [("divui", mn, per_mn), ("remui", mn, per_mn), ("divui", k, per_k), ("remui", k, per_k)].map(
                |(op, x, per)| {
                    let per = b.index(per);
                    b.assign(format!("arith.{op} {x}, {per} : index"))
                },
            );
        // Within a core, a line is 16 bytes: the line runs along k (k-major) or along m or n.
        let (line, along) = if self.mn_major { (k_in, mn_in) } else { (mn_in, k_in) };
        offset_at(
            b,
            0,
            &[
                (Some(&mn_core), self.stride),
                (Some(&k_core), self.leading),
                (Some(&line), CORE_LINE_BYTES),
                (Some(&along), elem),
            ],
        )
    }
}

/// The warpgroup's product's operand types in the instruction's name.
fn ptx_type(precision: MmaPrecision) -> &'static str {
    match precision {
        MmaPrecision::F16 => "f16",
        MmaPrecision::Bf16 => "bf16",
        MmaPrecision::Tf32 | MmaPrecision::Tf32x3 => "tf32",
    }
}

/// Before a warpgroup's first product that reads registers written otherwise (the
/// accumulators, carried in from the previous step).
pub(crate) fn fence(b: &mut Body) {
    b.line("nvvm.wgmma.fence.aligned");
}

/// After the products of a step: commits them as a group and waits until no more than
/// `in_flight` groups run, so the stages the others read may be refilled.
pub(crate) fn commit(b: &mut Body, in_flight: usize) {
    group(b);
    b.line(format!("nvvm.wgmma.wait.group.sync.aligned {in_flight}"));
}

/// After products: commits them as a group, to be waited for later ([`finished`]).
pub(crate) fn group(b: &mut Body) {
    b.line("nvvm.wgmma.commit.group.sync.aligned");
}

/// Waits until no more than `pending` groups run (the latest ones), then passes the
/// accumulators through an empty instruction that claims to change them, so that nothing
/// reads them before the wait.
pub(crate) fn finished(b: &mut Body, pending: usize, acc: &[String]) -> Vec<String> {
    b.line(format!("nvvm.wgmma.wait.group.sync.aligned {pending}"));
    on_accumulators(b, "", &[], acc)
}

/// Inline assembly `asm` that updates the f32 accumulators `acc` in place (its outputs
/// `$0…`, tied to them) from the `inputs` (value, type, constraint; `$count…` in order).
/// Returns the accumulators after it.
fn on_accumulators(b: &mut Body, asm: &str, inputs: &[(String, &str, &str)], acc: &[String]) -> Vec<String> {
    let count = acc.len();
    let mut constraints: Vec<String> = vec!["=f".to_string(); count];
    constraints.extend(inputs.iter().map(|i| i.2.to_string()));
    constraints.extend((0..count).map(|i| i.to_string()));
    let mut values: Vec<&str> = inputs.iter().map(|i| i.0.as_str()).collect();
    values.extend(acc.iter().map(String::as_str));
    let mut types: Vec<&str> = inputs.iter().map(|i| i.1).collect();
    types.extend(vec!["f32"; count]);
    let st = format!("!llvm.struct<({})>", vec!["f32"; count].join(", "));
    let r = b.assign(format!(
        "llvm.inline_asm has_side_effects asm_dialect = att \"{asm}\", \"{}\" {} : ({}) -> {st}",
        constraints.join(","),
        values.join(", "),
        types.join(", ")
    ));
    (0..count).map(|i| b.assign(format!("llvm.extractvalue {r}[{i}] : {st}"))).collect()
}

/// Orders this invocation's writes to shared memory (copies included) before the reads of
/// the warpgroup products, which go through the async proxy; the barrier after it publishes
/// everyone's.
pub(crate) fn proxy_fence(b: &mut Body) {
    b.line("llvm.inline_asm has_side_effects \"fence.proxy.async.shared::cta;\", \"\" : () -> ()");
}

/// The descriptor of an operand whose product starts `at` elements (an `index` value) into the
/// shared array whose byte address is `base` (an `i32`).
pub(crate) fn descriptor(b: &mut Body, base: &str, at: &str, elem: usize, d: &Descriptor) -> String {
    let at = b.assign(format!("arith.index_cast {at} : index to i32"));
    let eb = b.int(elem as i64, "i32");
    let bytes = b.assign(format!("arith.muli {at}, {eb} : i32"));
    let addr = b.assign(format!("arith.addi {base}, {bytes} : i32"));
    let c4 = b.int(4, "i32");
    let units = b.assign(format!("arith.shrui {addr}, {c4} : i32"));
    let mask = b.int(0x3FFF, "i32");
    let units = b.assign(format!("arith.andi {units}, {mask} : i32"));
    let wide = b.assign(format!("arith.extui {units} : i32 to i64"));
    let high = b.int(d.high_bits() as i64, "i64");
    b.assign(format!("arith.ori {wide}, {high} : i64"))
}

/// The byte address of shared array `pointer` (an `!llvm.ptr<3>`) in the shared window.
pub(crate) fn shared_address(b: &mut Body, pointer: &str) -> String {
    b.assign(format!("llvm.ptrtoint {pointer} : !llvm.ptr<3> to i32"))
}

/// One `m64nNk16` product of the warpgroup: `acc += A·B` with A and B named by descriptors
/// `da` and `db`, `acc` this invocation's `N / 2` accumulators (in the order of
/// [`C_FRAGMENT`] per 8 columns). Returns the accumulators after it.
pub(crate) fn product(
    b: &mut Body,
    precision: MmaPrecision,
    (da, db): (&str, &str),
    [a, bb]: [&Descriptor; 2],
    acc: &[String],
) -> Vec<String> {
    let operands = [(da.to_string(), "i64", "l"), (db.to_string(), "i64", "l")];
    let transposed = format!(", {}, {}", u8::from(a.mn_major), u8::from(bb.mn_major));
    mma_async(b, precision, (&operands, 1), &transposed, acc)
}

/// One `m64nNk16` product with A from registers: `acc += A·B` with `a` this invocation's
/// four registers of its warp's 16 rows of A (16-bit pairs as `i32`, placed as an
/// `m16n8k16` A fragment), B named by descriptor `db`, `acc` as in [`product`].
pub(crate) fn product_from_registers(
    b: &mut Body,
    precision: MmaPrecision,
    a: &[String],
    (db, bd): (&str, &Descriptor),
    acc: &[String],
) -> Vec<String> {
    let mut operands: Vec<(String, &str, &str)> = a.iter().map(|r| (r.clone(), "i32", "r")).collect();
    operands.push((db.to_string(), "i64", "l"));
    mma_async(b, precision, (&operands, a.len()), &format!(", {}", u8::from(bd.mn_major)), acc)
}

/// `wgmma.mma_async` as inline assembly: D is `acc` (this invocation's f32 accumulators, tied
/// to the outputs), then the `operands` (value, type, constraint): A (its registers, braced,
/// or its descriptor: the first `a_count`) and B's descriptor; the scale-d predicate set (D
/// accumulates), unit scales for A and B, and the `transposed` flags (16-bit operands only:
/// TF32 ones are read along k, and the instruction takes no flags for them). Returns the
/// accumulators after it.
fn mma_async(
    b: &mut Body,
    precision: MmaPrecision,
    (operands, a_count): (&[(String, &str, &str)], usize),
    transposed: &str,
    acc: &[String],
) -> Vec<String> {
    let (n, count) = (acc.len() * 2, acc.len());
    let ty = ptx_type(precision);
    let k = precision.warpgroup_k();
    let transposed = if precision.paired() { transposed } else { "" };
    let place = |i: usize| format!("${i}");
    let outs: Vec<String> = (0..count).map(place).collect();
    let a: Vec<String> = (count..count + a_count).map(place).collect();
    let a = if a_count > 1 { format!("{{{}}}", a.join(", ")) } else { a.join(", ") };
    let (ib, scale) = (count + a_count, count + operands.len());
    let asm = format!(
        "{{\\0A.reg .pred p;\\0Asetp.ne.b32 p, ${scale}, 0;\\0Awgmma.mma_async.sync.aligned.m64n{n}k{k}.f32.{ty}.{ty} {{{}}}, {a}, ${ib}, p, 1, 1{transposed};\\0A}}",
        outs.join(", ")
    );
    let mut inputs = operands.to_vec();
    inputs.push((b.int(1, "i32"), "i32", "r"));
    on_accumulators(b, &asm, &inputs, acc)
}

/// The same product emulated (SPIR-V): per 8 columns of B, the warp's `mma.sync` product
/// (emulated, [`mma_parts`]) of the A fragment `a` and B's fragment, which each invocation
/// reads from shared memory at element offset `at_b` (the product's start) as the descriptor
/// describes it.
pub(crate) fn emulated_from_registers(
    b: &mut Body,
    l: &Lanes,
    ops: &Parts,
    a: &Fragment,
    (mb, at_b, bd): (&SharedArray, &str, &Descriptor),
    acc: &[String],
) -> Vec<String> {
    let elem = ops.precision.shared_bytes();
    let ty = ops.shared_elem();
    let k_lane = l.k_lane(b);
    let per = C_FRAGMENT.len();
    let mut out = Vec::with_capacity(acc.len());
    for (j, c) in acc.chunks(per).enumerate() {
        let parts: Vec<Part> = l
            .frag
            .b
            .iter()
            .map(|&(dr, dc)| {
                // B fragment entry `(dr, dc)`: row `k_lane + dr`, column `group + dc` of the
                // 8-column block.
                let k = plus(b, &k_lane, dr);
                let col = plus(b, &l.group, j * MMA_N + dc);
                let bytes = bd.element(b, &col, &k, elem);
                let eb = b.index(elem);
                let at = b.assign(format!("arith.divui {bytes}, {eb} : index"));
                let at = b.assign(format!("arith.addi {at_b}, {at} : index"));
                let x = mb.read(b, &at, 1, ty).remove(0);
                ops.stored(b, &x)
            })
            .collect();
        out.extend(mma_parts(b, l, a, &Fragment::Elements(parts), c));
    }
    out
}

/// The same product emulated (SPIR-V): each invocation computes its own accumulators from
/// the operands as the descriptors describe them, reading A and B from shared memory at
/// element offsets `at_a` and `at_b` (the products' starts). `l` places the invocation's
/// accumulators (its warp's 16 rows of the warpgroup's 64, blocks of 8 columns); `rows` is
/// its warp's first row in the warpgroup's 64 (16 times the warp's place in the group).
pub(crate) fn emulated(
    b: &mut Body,
    l: &Lanes,
    precision: MmaPrecision,
    (ma, at_a, a): (&SharedArray, &str, &Descriptor),
    (mb, at_b, bd): (&SharedArray, &str, &Descriptor),
    rows: &str,
    acc: &[String],
) -> Vec<String> {
    let elem = precision.shared_bytes();
    let ty = match precision {
        MmaPrecision::F16 => "f16",
        MmaPrecision::Bf16 => "i16",
        MmaPrecision::Tf32 | MmaPrecision::Tf32x3 => "f32",
    };
    let read = |b: &mut Body, mem: &SharedArray, start: &str, bytes: &str| {
        let eb = b.index(elem);
        let at = b.assign(format!("arith.divui {bytes}, {eb} : index"));
        let at = b.assign(format!("arith.addi {start}, {at} : index"));
        let x = mem.read(b, &at, 1, ty).remove(0);
        // TF32 operands lie in the tiles as the f32 values the tensor cores read.
        match precision {
            MmaPrecision::Tf32 | MmaPrecision::Tf32x3 => x,
            MmaPrecision::F16 | MmaPrecision::Bf16 => unpack(b, precision, &x),
        }
    };
    let wk = precision.warpgroup_k() as usize;
    // The invocation's two rows (of the 64) and its two columns per block of 8.
    let row_of = |b: &mut Body, dr: usize| l.at(b, rows, dr, &l.group, 1);
    let per = C_FRAGMENT.len();
    let blocks = acc.len() / per;
    let mut out = acc.to_vec();
    let row_values: Vec<Vec<String>> = [0, MMA_M / 2]
        .iter()
        .map(|&dr| {
            let r = row_of(b, dr);
            (0..wk)
                .map(|k| {
                    let k = b.index(k);
                    let bytes = a.element(b, &r, &k, elem);
                    read(b, ma, at_a, &bytes)
                })
                .collect()
        })
        .collect();
    for j in 0..blocks {
        for dc in 0..2 {
            let zero = b.index(0);
            let col = l.at(b, &zero, j * MMA_N + dc, &l.in_group, 2);
            let col_values: Vec<String> = (0..wk)
                .map(|k| {
                    let k = b.index(k);
                    let bytes = bd.element(b, &col, &k, elem);
                    read(b, mb, at_b, &bytes)
                })
                .collect();
            for (e, &(dr, ec)) in C_FRAGMENT.iter().enumerate() {
                if ec != dc {
                    continue;
                }
                let rv = &row_values[dr / (MMA_M / 2)];
                let x = &mut out[j * per + e];
                for k in 0..wk {
                    *x = b.fma(&rv[k], &col_values[k], x, "f32");
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::plan::warpgroup_layouts;

    /// The descriptors of the 4096³ product's tiles (128×256×64 of f16): A k-major, its cores
    /// 128 bytes apart along k and 1 KiB along m; B row-major (n-major, "transposed" for the
    /// instruction), 4 KiB apart along k and 128 bytes along n. In 16-byte units in bits
    /// 16–29 and 32–45.
    #[test]
    fn descriptors_name_the_core_matrix_strides() {
        let [la, lb] = warpgroup_layouts([128, 256, 64], [false, true], 2);
        let (a, b) = (Descriptor::of_a(&la, 2), Descriptor::of_b(&lb, 2));
        assert_eq!(a, Descriptor { leading: 128, stride: 1024, mn_major: false });
        assert_eq!(b, Descriptor { leading: 4096, stride: 128, mn_major: true });
        assert_eq!(a.high_bits(), (8 << 16) | (64 << 32));
        assert_eq!(b.high_bits(), (256 << 16) | (8 << 32));
        let [ta, tb] = warpgroup_layouts([128, 256, 64], [true, false], 2);
        assert_eq!(Descriptor::of_a(&ta, 2), Descriptor { leading: 2048, stride: 128, mn_major: true });
        assert_eq!(Descriptor::of_b(&tb, 2), Descriptor { leading: 128, stride: 1024, mn_major: false });
        // TF32 operands along k, 128×128×32 tiles: cores of 8 lines of 4, 128 bytes apart along
        // k and 1 KiB along m or n.
        let [fa, fb] = warpgroup_layouts([128, 128, 32], [false, false], 4);
        let along_k = Descriptor { leading: 128, stride: 1024, mn_major: false };
        assert_eq!((Descriptor::of_a(&fa, 4), Descriptor::of_b(&fb, 4)), (along_k, along_k));
    }
}
