//! The optimizer on data: variant files that must fuse, the shipped models' fusion counts, and
//! interpreter(original) ≈ interpreter(optimized) everywhere.

use kiln_ir::{Bindings, Graph, Op, Tensor};
use kiln_lower::Override;
use kiln_opt::{optimize, Options, Report};
use std::collections::HashMap;
use std::path::Path;

fn lower(path: &Path, set: &[&str]) -> Graph {
    let ov: Vec<Override> = set.iter().map(|s| Override::parse(s).expect("name=value")).collect();
    let (sources, r) = kiln_lower::load(path, &ov);
    r.unwrap_or_else(|d| panic!("{}:\n{}", path.display(), d.render(&sources))).graph
}

/// Seeded inputs (indices inside the table they index) and parameters.
fn bindings(g: &Graph, seed: u64) -> Bindings {
    let mut inputs = HashMap::new();
    for &i in &g.inputs {
        let Op::Input { name, dtype, shape } = &g.node(i).op else { continue };
        let stream = kiln_ir::rng::stream_of(name);
        let n: usize = shape.iter().product();
        let bound = g
            .users(i)
            .into_iter()
            .filter_map(|u| match g.node(u).op {
                Op::Gather { axis } => Some(g.ty(g.operands(u)[0]).shape[axis]),
                _ => None,
            })
            .min()
            .unwrap_or(2);
        let values = (0..n as u64).map(|k| {
            if dtype.is_float() {
                kiln_ir::rng::normal(seed, stream, k)
            } else if name.contains("keep") || name.contains("mask") {
                // Keep most positions so no attention row is entirely masked.
                (kiln_ir::rng::uniform(seed, stream, k) < 0.8) as u8 as f64
            } else {
                (kiln_ir::rng::uniform(seed, stream, k) * bound as f64).floor()
            }
        });
        inputs.insert(
            name.clone(),
            Tensor { shape: shape.clone(), data: kiln_ir::Buffer::from_f64(*dtype, values) },
        );
    }
    let params = kiln_ir::bind_params(g, None, seed, false).expect("params initialize");
    Bindings { inputs, params }
}

/// interpreter(before) ≈ interpreter(after): max |Δ| ≤ tol·(1 + |ref|) on every output.
fn assert_same_outputs(before: &Graph, after: &Graph, tol: f64, what: &str) {
    let b = bindings(before, 7);
    let want = kiln_ir::eval(before, &b).expect("original evaluates");
    let got = kiln_ir::eval(after, &b).expect("optimized evaluates");
    for ((name, w), (_, g)) in want.iter().zip(&got) {
        assert_eq!(w.shape, g.shape, "{what}: output {name}");
        let (wv, gv) = (w.to_f64_vec(), g.to_f64_vec());
        let mut worst = 0.0f64;
        for (x, y) in wv.iter().zip(&gv) {
            if x.is_nan() && y.is_nan() {
                continue;
            }
            let err = (x - y).abs() / (1.0 + x.abs());
            assert!(err <= tol, "{what}: output {name} differs: {x} vs {y} (relative error {err:e})");
            worst = worst.max(err);
        }
        eprintln!("{what}: output {name} max relative error {worst:e}");
    }
}

fn count(r: &Report, op: &str) -> usize {
    r.op_counts.get(op).copied().unwrap_or(0)
}

/// `// expect: op n, op n` header lines of a variant file.
fn expectations(text: &str) -> Vec<(String, usize)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("// expect:"))
        .flat_map(|l| l.split(','))
        .filter_map(|p| {
            let mut it = p.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect()
}

#[test]
fn every_written_form_fuses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/variants");
    let mut files: Vec<_> =
        std::fs::read_dir(&dir).expect("variants").filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    assert!(files.len() >= 15);
    let mut failures = vec![];
    for path in files {
        let text = std::fs::read_to_string(&path).expect("readable");
        let g = lower(&path, &[]);
        let (opt, report) = optimize(&g, &Options::default()).expect("optimizes");
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        for (op, n) in expectations(&text) {
            if count(&report, &op) != n {
                failures.push(format!(
                    "{name}: expected {n} × {op}, got {} ({:?})",
                    count(&report, &op),
                    report.op_counts
                ));
            }
        }
        assert_same_outputs(&g, &opt, 1e-4, &name);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn model(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models").join(format!("{name}.ron"))
}

fn norms(r: &Report) -> usize {
    count(r, "layer_norm") + count(r, "add_norm") + count(r, "rms_norm")
}

#[test]
fn bert_has_one_attention_per_layer_and_2l_plus_1_norms() {
    for layers in [1, 2, 6] {
        let g = lower(&model("bert_encoder"), &[&format!("layers={layers}"), "seq=16", "batch=2"]);
        let (opt, r) = optimize(&g, &Options::default()).expect("optimizes");
        assert_eq!(count(&r, "attention"), layers, "{:?}", r.op_counts);
        assert_eq!(norms(&r), 2 * layers + 1, "{:?}", r.op_counts);
        for gone in ["softmax", "exp", "reduce_mean", "reduce_max", "erf"] {
            assert_eq!(count(&r, gone), 0, "{gone} left: {:?}", r.op_counts);
        }
        if layers == 2 {
            assert_same_outputs(&g, &opt, 1e-4, "bert_encoder");
        }
    }
}

#[test]
fn gpt2_has_causal_attention_in_every_layer() {
    let layers = 3;
    let g = lower(&model("gpt2"), &[&format!("layers={layers}"), "seq=8", "vocab=64", "ctx=16"]);
    let (opt, r) = optimize(&g, &Options::default()).expect("optimizes");
    let causal =
        opt.node_ids().filter(|&n| matches!(opt.node(n).op, Op::Attention { causal: true, .. })).count();
    assert_eq!(causal, layers, "{:?}", r.op_counts);
    assert_eq!(norms(&r), 2 * layers + 1, "{:?}", r.op_counts);
    assert_eq!(count(&r, "tanh"), 0, "{:?}", r.op_counts);
    assert_same_outputs(&g, &opt, 1e-4, "gpt2");
}

#[test]
fn seed_transformer_has_l_attentions_and_2l_norms() {
    let layers = 6;
    let g = lower(&model("seed_transformer"), &["seq=8", "batch=1"]);
    let (opt, r) = optimize(&g, &Options::default()).expect("optimizes");
    assert_eq!(count(&r, "attention"), layers, "{:?}", r.op_counts);
    assert_eq!(norms(&r), 2 * layers, "{:?}", r.op_counts);
    assert_same_outputs(&g, &opt, 1e-4, "seed_transformer");
}

#[test]
fn every_shipped_model_computes_the_same_after_optimization() {
    let small: &[(&str, &[&str])] = &[
        ("mlp", &[]),
        ("lstm", &["steps=4"]),
        ("resnet_block", &["size=8"]),
        ("bert_encoder", &["layers=1", "seq=8"]),
        ("gpt2", &["layers=1", "seq=8", "vocab=64", "ctx=16"]),
        ("seed_transformer", &["layers=2", "seq=8"]),
    ];
    for (name, set) in small {
        let g = lower(&model(name), set);
        let (opt, r) = optimize(&g, &Options::default()).expect("optimizes");
        assert!(
            r.cost_after <= r.cost_before * 1.0001,
            "{name}: cost rose {} → {}",
            r.cost_before,
            r.cost_after
        );
        assert_same_outputs(&g, &opt, 1e-4, name);
        // Interface unchanged.
        assert_eq!(
            g.outputs.iter().map(|o| &o.0).collect::<Vec<_>>(),
            opt.outputs.iter().map(|o| &o.0).collect::<Vec<_>>()
        );
        assert_eq!(g.params().len(), opt.params().len(), "{name}: parameters");
    }
}

#[test]
fn a_48_layer_gpt2_fuses_every_layer_within_the_limits() {
    let layers = 48;
    let g = lower(
        &model("gpt2"),
        &[&format!("layers={layers}"), "seq=8", "vocab=64", "ctx=16", "d=64", "heads=4"],
    );
    let (_, r) = optimize(&g, &Options::default()).expect("optimizes");
    assert_eq!(count(&r, "attention"), layers, "{:?}", r.op_counts);
    assert_eq!(norms(&r), 2 * layers + 1, "{:?}", r.op_counts);
    assert!(r.stages.iter().all(|s| s.stop_reason == "saturated"), "{:?}", r.stages);
    assert!(r.cost_after < r.cost_before);
}
