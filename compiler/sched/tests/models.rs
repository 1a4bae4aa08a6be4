//! Every shipped model schedules, and the schedule keeps its invariants.

use kiln_sched::{schedule, Schedule, Storage};
use std::path::Path;

fn scheduled(model: &str) -> Schedule {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models").join(model);
    let (_, lowered) = kiln_lower::load(&path, &[]);
    optimized_schedule(&lowered.unwrap_or_else(|_| panic!("{model} lowers")).graph)
}

/// The schedule of the spec `text`, optimized.
fn scheduled_text(text: &str) -> Schedule {
    let (_, lowered) = kiln_lower::load_str("spec.ron", text, &[]);
    optimized_schedule(&lowered.unwrap_or_else(|_| panic!("the spec lowers")).graph)
}

fn optimized_schedule(g: &kiln_ir::Graph) -> Schedule {
    let (g, _) = kiln_opt::optimize(g, &kiln_opt::Options::default()).unwrap();
    schedule(&g).unwrap()
}

/// Arena buffers alive at the same time never overlap, and every view stays inside its buffer.
fn check(s: &Schedule) {
    check_at(s, &[]);
}

/// [`check`] with the symbols at `values` (every buffer holds its size at the maxima).
fn check_at(s: &Schedule, values: &[i64]) {
    let arena: Vec<(usize, usize, (usize, usize))> = s
        .buffers
        .iter()
        .filter_map(|b| match b.storage {
            Storage::Arena { offset } => {
                Some((offset, offset + b.bytes(), b.live.expect("arena buffers are used")))
            }
            _ => None,
        })
        .collect();
    for (i, a) in arena.iter().enumerate() {
        assert!(a.1 <= s.arena_bytes);
        for b in &arena[i + 1..] {
            let overlap_time = a.2 .0 <= b.2 .1 && b.2 .0 <= a.2 .1;
            let overlap_bytes = a.0 < b.1 && b.0 < a.1;
            assert!(!(overlap_time && overlap_bytes), "{a:?} and {b:?} collide");
        }
    }
    for k in &s.kernels {
        for o in k.inputs.iter().chain([&k.output]) {
            let extent = o.view.extent_at(values).expect("every symbol has a value");
            assert!(extent <= s.buffers[o.buffer].len, "{o:?} overruns its buffer");
        }
    }
    for (i, _) in s.outputs.iter().enumerate() {
        let writers = s
            .kernels
            .iter()
            .filter(|k| matches!(s.buffers[k.output.buffer].storage, Storage::Output { index } if index == i))
            .count();
        assert_eq!(writers, 1, "output {i} is written by exactly one kernel");
    }
}

#[test]
fn shipped_models_schedule_with_sound_memory_plans() {
    for model in
        ["bert_encoder.ron", "gpt2.ron", "seed_transformer.ron", "mlp.ron", "resnet_block.ron", "lstm.ron"]
    {
        let s = scheduled(model);
        check(&s);
        assert!(s.arena_bytes <= s.arena_bytes_unshared, "{model}");
        // The schedule as `kiln inspect --stage kernels` prints it; bless changes with
        // `INSTA_UPDATE=always cargo test -p kiln-sched --test models`.
        let name = format!("kernels_{}", model.trim_end_matches(".ron"));
        insta::assert_snapshot!(name, kiln_sched::print::to_text(&s));
    }
}

#[test]
fn bert_layer_is_one_kernel_per_fused_op_with_views_for_heads() {
    let s = scheduled("bert_encoder.ron");
    let text = kiln_sched::print::to_text(&s);
    let count = |name: &str| s.kernels.iter().filter(|k| k.name() == name).count();
    assert_eq!(count("attention"), 6, "{text}");
    assert_eq!(count("add_norm"), 13, "{text}");
    assert_eq!(count("transpose"), 0);
    assert!(!text.contains(" copy "), "no copies in BERT:\n{text}");
    // Reuse: six layers of activations fit in far less than the sum of all intermediates.
    assert!(s.arena_bytes * 4 < s.arena_bytes_unshared, "{text}");
}

/// Integer divisions whose divisor can be zero are fault sites, numbered in step order, with
/// the fault words reserved after every other arena buffer; a constant non-zero divisor is
/// none.
#[test]
fn integer_divisions_are_fault_sites_in_step_order() {
    let text = r#"Model(name: "divs", config: {}, inputs: { "a": (i32, [2, 3]), "b": (i32, [3]) },
       body: [
           Let("q", Div("a", "b")),
           Let("h", Div(Mul("q", "q"), 2)),
           Let("r", Add(Div(Mul("a", 3), Sub("a", "b")), Div("h", Add("b", 1)))),
       ],
       outputs: ["r", "h"])"#;
    let (_, lowered) = kiln_lower::load_str("divs", text, &[]);
    let s = schedule(&lowered.unwrap_or_else(|_| panic!("divs lowers")).graph).unwrap();
    check(&s);
    assert!(s.arena_bytes <= s.arena_bytes_unshared);
    assert_eq!(
        kiln_sched::print::to_text(&s),
        "# 4 kernels, arena 80 bytes (144 without reuse), 7 buffers
schedule divs {
  k0 div (i32[2, 3] in:a, i32[2, 3] in:b strides=[0, 1]) -> i32[2, 3] arena@0
  k1 elementwise×2 (i32[2, 3] arena@0) -> i32[2, 3] out:h  = div(mul(%0, %0), 2.0)
  k2 add (i32[3] in:b) -> i32[3] arena@0
  k3 elementwise×5 (i32[2, 3] in:a, i32[2, 3] in:b strides=[0, 1], i32[2, 3] out:h, i32[2, 3] arena@0 strides=[0, 1]) -> i32[2, 3] out:r  = add(div(mul(%0, 3.0), sub(%0, %1)), div(%2, %3))
  faults arena@64 (4 words): k0 div, k3 div, k3 div
}
"
    );
    let faults = s.faults.as_ref().expect("fault sites");
    let sites: Vec<String> = faults
        .sites
        .iter()
        .map(|f| {
            let at = f.origin.as_deref().unwrap_or("?");
            format!("k{} {} at {at}: {:?} by {:?}", f.kernel, f.op, f.shape, f.divisor)
        })
        .collect();
    assert_eq!(
        sites,
        [
            "k0 div at divs:3:21: [2, 3] by [3]",
            "k3 div at divs:5:25: [2, 3] by [2, 3]",
            "k3 div at divs:5:58: [2, 3] by [3]",
        ]
    );
    // Only the kernels with a site take the fault words.
    let faulting: Vec<bool> = s.kernels.iter().map(kiln_sched::Kernel::can_fault).collect();
    assert_eq!(faulting, vec![true, false, false, true]);
}

/// BERT and GPT-2 with a dynamic batch and sequence length (as `tests/specs.rs` makes them):
/// the symbolic graphs schedule into the same kernels as the static ones at the hints, every
/// view stays inside its buffer at the minima, the hints and the maxima, and the arena is the
/// one of the static graph at the maxima.
#[test]
fn dynamic_bert_and_gpt2_schedule_with_one_plan_at_the_maxima() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
    let cases = [
        (
            "bert_encoder.ron",
            r#""batch": 1, "seq": 128,"#,
            r#""batch": Dyn(min: 1, max: 4, hint: 2), "seq": Dyn(min: 1, max: "max_positions", hint: 16),"#,
            ["layers=1", "hidden=32", "heads=2", "ffn=64", "vocab=50", "max_positions=64"],
        ),
        (
            "gpt2.ron",
            r#""batch": 1, "seq": 64,"#,
            r#""batch": Dyn(min: 1, max: 4, hint: 2), "seq": Dyn(min: 8, max: "ctx", hint: 16, multiple_of: 8),"#,
            ["layers=1", "d=32", "heads=2", "vocab=50", "ctx=64", "eps=1e-5"],
        ),
    ];
    for (model, entry, decl, small) in cases {
        let text = std::fs::read_to_string(root.join(model)).expect("model");
        assert!(text.contains(entry), "{model}");
        let text = text.replacen(entry, decl, 1);
        let sets: Vec<kiln_lower::Override> =
            small.iter().map(|s| kiln_lower::Override::parse(s).expect("name=value")).collect();
        let (_, lowered) = kiln_lower::load_str(model, &text, &sets);
        let g = lowered.unwrap_or_else(|_| panic!("{model} lowers")).graph;
        let (g, _) = kiln_opt::optimize(&g, &kiln_opt::Options::default()).unwrap();
        let s = schedule(&g).unwrap_or_else(|e| panic!("{model}: {e}"));
        let lo: Vec<i64> = g.symbols.iter().map(|d| d.min).collect();
        let hint: Vec<i64> = g.symbols.iter().map(|d| d.hint).collect();
        let hi: Vec<i64> = g.symbols.iter().map(|d| d.max).collect();
        for values in [&lo, &hint, &hi] {
            check_at(&s, values);
        }
        let at_hint = schedule(&g.specialize(&hint).unwrap()).unwrap();
        let names = |s: &Schedule| s.kernels.iter().map(|k| k.name()).collect::<Vec<_>>();
        assert_eq!(names(&s), names(&at_hint), "{model}: the same kernels as at the hints");
        let at_max = schedule(&g.specialize(&hi).unwrap()).unwrap();
        let lens = |s: &Schedule| s.buffers.iter().map(|b| b.len).collect::<Vec<_>>();
        assert_eq!(lens(&s), lens(&at_max), "{model}: every buffer holds its size at the maxima");
        assert_eq!(s.arena_bytes, at_max.arena_bytes, "{model}: the arena is planned at the maxima");
        assert_eq!(s.arena_bytes_at_hints, Some(at_hint.arena_bytes), "{model}: the arena at the hints");
        assert!(kiln_sched::print::to_text(&s).starts_with(&format!(
            "# {} kernels, arena {} bytes at the maxima, {} bytes at the hints",
            s.kernels.len(),
            s.arena_bytes,
            at_hint.arena_bytes
        )));
        let symbolic: Vec<String> = s
            .kernels
            .iter()
            .filter(|k| k.operands().any(|o| !o.view.is_static()))
            .map(|k| k.name())
            .collect();
        eprintln!("{model}: kernels over symbolic extents: {symbolic:?}");
    }
}

/// The optimizer's cost model charges a reshape of a broadcast as a copy exactly where this
/// scheduler cannot view it (`kiln_opt::reshape_copies_broadcast` against
/// `StridedView::reshape` of a contiguous operand broadcast), over every operand of rank ≤ 3
/// with extents 1 to 3, every broadcast of it adding at most one axis, and every reshape that
/// merges runs of its axes.
#[test]
fn the_cost_model_charges_a_copy_where_a_reshape_of_a_broadcast_has_no_view() {
    use kiln_sched::StridedView;
    let ty = |s: &[usize]| kiln_ir::TensorType::new(kiln_ir::DType::F32, kiln_ir::dims(s));
    let broadcast = kiln_ir::Op::BroadcastTo { shape: vec![] };
    // Every shape of `rank` axes with extents in 1..=3.
    let shapes = |rank: u32| -> Vec<Vec<usize>> {
        (0..3usize.pow(rank)).map(|k| (0..rank).map(|i| 1 + (k / 3usize.pow(i)) % 3).collect()).collect()
    };
    let (mut copies, mut views) = (0, 0);
    for rank in 1..=3 {
        for input in shapes(rank) {
            for lead in 0..=1 {
                for grow in shapes(rank) {
                    // A unit axis may grow; others keep their extent.
                    let mut mid: Vec<usize> = vec![2; lead];
                    mid.extend(input.iter().zip(&grow).map(|(&i, &g)| if i == 1 { g } else { i }));
                    // Every way to merge runs of adjacent axes: bit k merges axis k + 1 into k.
                    for merges in 0..1u32 << (mid.len() - 1) {
                        let mut out = vec![mid[0]];
                        for (k, &e) in mid.iter().enumerate().skip(1) {
                            match merges >> (k - 1) & 1 {
                                1 => *out.last_mut().unwrap() *= e,
                                _ => out.push(e),
                            }
                        }
                        let view =
                            StridedView::contiguous(&input).broadcast_to_static(&mid).reshape_static(&out);
                        let charged =
                            kiln_opt::reshape_copies_broadcast(&broadcast, &ty(&input), &ty(&mid), &ty(&out));
                        assert_eq!(charged, view.is_none(), "{input:?} → {mid:?} → {out:?}");
                        if charged {
                            copies += 1;
                        } else {
                            views += 1;
                        }
                    }
                }
            }
        }
    }
    assert!(copies > 100 && views > 100, "{copies} copies, {views} views");
}

/// A layer norm over the channels of `[N, C, H, W]` (the optimizer's transpose, fused norm,
/// transpose back) is one kernel that reads `x` through a strided view and writes the
/// transposed layout: into the caller's buffer when the result is a graph output, into the
/// arena for the ReLU after it. Neither transpose is a copy.
#[test]
fn a_norm_over_channels_is_one_kernel_writing_the_transposed_layout() {
    let spec = r#"Model(name: "c", inputs: { "x": (f32, [2, 6, 4, 5]) },
        body: [
            Let("w", Param(shape: [6, 1, 1], init: Normal(1.0))),
            Let("b", Param(shape: [6, 1, 1], init: Normal(1.0))),
            Let("mu", Mean(x: "x", axes: 1, keepdims: true)),
            Let("var", Mean(x: Pow(Sub("x", "mu"), 2.0), axes: 1, keepdims: true)),
            Let("y", Add(Mul("w", Div(Sub("x", "mu"), Sqrt(Add("var", 1e-6)))), "b")),
            Let("z", Relu(Add(Mul("w", Div(Sub("x", "mu"), Sqrt(Add("var", 1e-6)))), "b"))),
        ],
        outputs: ["y", "z"])"#;
    let s = scheduled_text(spec);
    check(&s);
    let text = kiln_sched::print::to_text(&s);
    assert_eq!(s.kernels.iter().filter(|k| k.name() == "layer_norm").count(), 1, "{text}");
    assert!(!text.contains(" copy "), "no copies:\n{text}");
    let norm = s.kernels.iter().find(|k| k.name() == "layer_norm").expect("a norm kernel");
    // [N, H, W, C] computed, stored as [N, C, H, W]: C steps by H·W.
    assert_eq!(norm.output.view.strides.last(), Some(&kiln_ir::Dim::Const(20)), "{text}");
    assert_eq!(norm.inputs[0].view.strides.last(), Some(&kiln_ir::Dim::Const(20)), "{text}");
}

/// A layer norm over the last three axes of `[N, C, H, W]` (the optimizer's reshape, fused
/// norm, reshape back) that is a graph output is one kernel writing the caller's buffer: the
/// reshape back of its row-major result is the same bytes, so no copy.
#[test]
fn a_norm_over_trailing_axes_writes_the_output_in_place() {
    let spec = r#"Model(name: "t", inputs: { "x": (f32, [2, 4, 3, 5]) },
        body: [
            Let("mu", Mean(x: "x", axes: [1, 2, 3], keepdims: true)),
            Let("var", Mean(x: Pow(Sub("x", "mu"), 2.0), axes: [1, 2, 3], keepdims: true)),
            Let("y", Div(Sub("x", "mu"), Sqrt(Add("var", 1e-5)))),
        ],
        outputs: ["y"])"#;
    let s = scheduled_text(spec);
    check(&s);
    let text = kiln_sched::print::to_text(&s);
    assert_eq!(s.kernels.len(), 1, "{text}");
    assert_eq!(s.kernels[0].name(), "layer_norm", "{text}");
    assert!(matches!(s.buffers[s.kernels[0].output.buffer].storage, Storage::Output { index: 0 }), "{text}");
}

/// A pre-norm residual stream: the sum `x + y` feeds a norm and, later, the next residual add.
/// The norm's kernel computes the sum anyway, so it takes the add kernel's place and stores
/// the sum as its second result: one `add_norm` kernel for both. Where something reads the
/// sum before the norm, the add keeps its kernel.
#[test]
fn a_norm_of_a_residual_sum_stores_the_sum_as_its_second_result() {
    let spec = |between: &str| {
        format!(
            r#"Model(name: "t", inputs: {{ "x": (f32, [2, 5, 16]), "y": (f32, [2, 5, 16]) }},
            body: [
                Let("w", Param(shape: [16, 16], init: Normal(std: 0.3))),
                Let("s", Add("x", "y")),
                {between}
                Let("n", LayerNorm(x: "s", eps: 1e-5)),
                Let("o", Add("s", MatMul("n", "w"))),
            ],
            outputs: [{first}"o"])"#,
            first = if between.is_empty() { "" } else { r#""m", "# }
        )
    };
    let s = scheduled_text(&spec(""));
    check(&s);
    let text = kiln_sched::print::to_text(&s);
    let names: Vec<String> = s.kernels.iter().map(|k| k.name()).collect();
    // The residual add, its norm, the product, the next residual add (the output).
    assert_eq!(names, ["add_norm", "matmul", "add"], "{text}");
    let k = s.kernels.iter().find(|k| k.name() == "add_norm").unwrap();
    assert_eq!(k.extra_outputs.len(), 1, "{text}");
    // The sum the norm stores is what the last add reads.
    assert!(
        s.kernels.iter().any(|r| r.inputs.iter().any(|o| o.buffer == k.extra_outputs[0].buffer)),
        "{text}"
    );

    let s = scheduled_text(&spec(r#"Let("m", MatMul("s", "w")),"#));
    check(&s);
    let text = kiln_sched::print::to_text(&s);
    let names: Vec<String> = s.kernels.iter().map(|k| k.name()).collect();
    assert!(names.iter().any(|n| n == "add") && names.iter().any(|n| n == "layer_norm"), "{text}");
}
