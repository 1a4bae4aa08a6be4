//! Every shipped model schedules, and the schedule keeps its invariants.

use kiln_sched::{schedule, Schedule, Storage};
use std::path::Path;

fn scheduled(model: &str) -> Schedule {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models").join(model);
    let (_, lowered) = kiln_lower::load(&path, &[]);
    let lowered = lowered.unwrap_or_else(|_| panic!("{model} lowers"));
    let (g, _) = kiln_opt::optimize(&lowered.graph, &kiln_opt::Options::default()).unwrap();
    schedule(&g).unwrap()
}

/// Arena buffers alive at the same time never overlap, and every view stays inside its buffer.
fn check(s: &Schedule) {
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
            let extent = o.view.extent_at(&[]).expect("a static view");
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
