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
            assert!(o.view.extent() <= s.buffers[o.buffer].len, "{o:?} overruns its buffer");
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
