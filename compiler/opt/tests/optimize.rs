//! The optimizer on data: variant files that must fuse, the shipped models' fusion counts, and
//! interpreter(original) ≈ interpreter(optimized) everywhere.

use kiln_ir::{Bindings, Graph, NodeId, Op};
use kiln_lower::Override;
use kiln_opt::{optimize, Options, Report};
use std::path::Path;

fn lower(path: &Path, set: &[&str]) -> Graph {
    let ov: Vec<Override> = set.iter().map(|s| Override::parse(s).expect("name=value")).collect();
    let (sources, r) = kiln_lower::load(path, &ov);
    r.unwrap_or_else(|d| panic!("{}:\n{}", path.display(), d.render(&sources))).graph
}

/// Seeded inputs (`kiln_ir::seeded_inputs`: indices inside the table they index, masks that
/// keep most positions) and parameters.
fn bindings(g: &Graph, seed: u64) -> Bindings {
    let params = kiln_ir::bind_params(g, None, seed, false).expect("params initialize");
    Bindings { inputs: kiln_ir::seeded_inputs(g, seed), params }
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

/// The weight gradients of a BERT train step (`x [B, S, d] · W [d, e]`'s is `Σ_b x[b]ᵀ·gy[b]`
/// as autodiff writes it) become one product each over the merged batch and sequence axes:
/// no sum of products is left, and the step computes what it computed before.
#[test]
fn a_bert_train_step_takes_each_weight_gradient_as_one_product() {
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/train/bert2_tokcls.ron");
    let set =
        ["layers=1", "batch=2", "seq=8", "hidden=16", "heads=2", "ffn=32", "vocab=40", "max_positions=16"];
    let ov: Vec<Override> = set.iter().map(|s| Override::parse(s).expect("name=value")).collect();
    let (sources, r) = kiln_lower::load(&spec, &ov);
    let lowered = r.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
    let step = kiln_lower::train_step(&lowered).expect("a train step").graph;
    let sums_of_products = |g: &Graph| {
        g.node_ids()
            .filter(|&n| matches!(g.node(n).op, Op::Reduce { op: kiln_ir::ReduceOp::Sum, .. }))
            .filter(|&n| {
                let p = g.operands(n)[0];
                let batched = |x: &NodeId| g.ty(*x).rank() == g.ty(p).rank();
                g.node(p).op == Op::MatMul && g.operands(p).iter().all(batched)
            })
            .count()
    };
    // One per linear layer of rank-3 activations: q, k, v, the attention's output, the FFN's
    // two and the head.
    assert_eq!(sums_of_products(&step), 7);
    let (opt, r) = optimize(&step, &Options::default()).expect("optimizes");
    assert_eq!(sums_of_products(&opt), 0, "{:?}", r.op_counts);
    assert!(r.rules_fired.get("batch-sum-matmul").is_some_and(|&n| n >= 7), "{:?}", r.rules_fired);
    assert_same_outputs(&step, &opt, 1e-4, "bert train step");
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

#[test]
fn bert_merges_q_k_v_when_the_target_folds_weights() {
    // Folded, `concat(Wq, Wk, Wv)` costs nothing per run, so one wide epilogue and three
    // slices beat three epilogues; attention still fuses over the slices.
    let layers = 2;
    let g = lower(&model("bert_encoder"), &[&format!("layers={layers}"), "seq=16", "batch=2"]);
    let mut opts = Options::default();
    opts.target.folds_weights = true;
    let (opt, r) = optimize(&g, &opts).expect("optimizes");
    assert_eq!(count(&r, "attention"), layers, "{:?}", r.op_counts);
    assert_eq!(norms(&r), 2 * layers + 1, "{:?}", r.op_counts);
    // Per layer: one concat of weights and one of biases; 3 wide + 3 other epilogues → 4.
    assert_eq!(count(&r, "concat"), 2 * layers, "{:?}", r.op_counts);
    assert_eq!(count(&r, "matmul_epilogue"), 4 * layers, "{:?}", r.op_counts);
    assert!(r.rules_fired.get("merge-shared-input").copied().unwrap_or(0) >= 3 * layers);
    let wide = opt.node_ids().filter(|&n| matches!(opt.node(n).op, Op::MatMulEpilogue { .. })).any(|n| {
        let users = opt.users(n);
        users.len() == 3 && users.iter().all(|u| matches!(opt.node(*u).op, Op::Slice { .. }))
    });
    assert!(wide, "no epilogue feeds three slices");
    assert_same_outputs(&g, &opt, 1e-4, "bert_encoder, merged q/k/v");
    assert_eq!(g.params().len(), opt.params().len());
}

#[test]
fn bert_keeps_separate_projections_when_weights_are_bound_at_run_time() {
    // The CPU pipeline concatenates on every run: 3·384² weights copied per layer cost more
    // than the two kernel launches the merge saves.
    let g = lower(&model("bert_encoder"), &["layers=1"]);
    let (_, r) = optimize(&g, &Options::default()).expect("optimizes");
    assert!(r.rules_fired.contains_key("merge-shared-input"), "{:?}", r.rules_fired);
    assert_eq!(count(&r, "concat"), 0, "{:?}", r.op_counts);
    assert_eq!(count(&r, "matmul_epilogue"), 6, "{:?}", r.op_counts);
}

#[test]
fn dag_extraction_normalizes_the_sums_a_pre_norm_model_computes_anyway() {
    // GPT-2's residual sum is both the next residual and a norm's input: reading it beats
    // `add_norm` re-reading both addends, except for the final norm, whose sum is not kept.
    let layers = 3;
    let g = lower(&model("gpt2"), &[&format!("layers={layers}"), "seq=8", "vocab=64", "ctx=16"]);
    let (opt, r) = optimize(&g, &Options::default()).expect("optimizes");
    let x = &r.extraction;
    assert_eq!(count(&r, "layer_norm"), 2 * layers, "{:?}", r.op_counts);
    assert_eq!(count(&r, "add_norm"), 1, "{:?}", r.op_counts);
    assert!(x.improvements >= 2 * layers && x.refined_cost < x.greedy_cost, "{x:?}");
    assert_eq!(x.stop_reason, "fixed point");
    assert!((r.cost_after - x.refined_cost).abs() <= 1e-9 * x.refined_cost + 1e-12 * r.nodes_after as f64);
    assert_same_outputs(&g, &opt, 1e-4, "gpt2");
}

#[test]
fn explanations_show_the_library_line_and_the_model_line_that_called_it() {
    let g = lower(&model("gpt2"), &["layers=1", "seq=8", "vocab=64", "ctx=16"]);
    let opts = Options { explain: true, ..Options::default() };
    let (_, r) = optimize(&g, &opts).expect("optimizes");
    let attention = r.explanations.iter().find(|e| e.op == "attention").expect("an attention");
    let called =
        attention.origins.iter().filter(|o| o.contains("std.ron:") && o.contains("(called at ")).count();
    assert!(called > 0, "{:?}", attention.origins);
    for o in &attention.origins {
        if let Some((line, call)) = o.split_once(" (called at ") {
            assert!(line.contains("std.ron:"), "{o}");
            assert!(call.contains("gpt2.ron:") && call.ends_with(')'), "{o}");
        }
    }
    let text = kiln_opt::explanations_to_text(&r.explanations);
    assert!(text.contains("(called at "), "{text}");
}

/// A fused node a rule wraps in a view stands for what the view's class was written as: a
/// layer norm over channels (transposed back) and attention over split heads (reshaped back)
/// name their rules, the ops they replace and where those were written.
#[test]
fn explanations_of_fused_nodes_inside_views_name_their_rules_and_sources() {
    let variants = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/variants");
    let opts = Options { explain: true, ..Options::default() };
    for (file, op, rules) in [
        ("layer_norm_over_channels.ron", "layer_norm", "fuse-layer-norm → fuse-layer-norm-affine"),
        ("attention_grouped_query.ron", "attention", "fuse-attention → attention-split-heads"),
    ] {
        let g = lower(&variants.join(file), &[]);
        let (_, r) = optimize(&g, &opts).expect("optimizes");
        let e = r.explanations.iter().find(|e| e.op == op).unwrap_or_else(|| panic!("{file}: a {op}"));
        assert!(e.rules.join(" → ").contains(rules), "{file}: {:?}", e.rules);
        assert!(
            e.replaces.contains_key("reduce_max") || e.replaces.contains_key("reduce_mean"),
            "{file}: {e:?}"
        );
        assert!(e.origins.iter().any(|o| o.contains(file)), "{file}: {:?}", e.origins);
    }
}

#[test]
fn a_10000_op_elementwise_chain_optimizes_without_overflowing_the_stack() {
    use kiln_ir::{BinaryOp, DType, UnaryOp};
    let mut g = Graph::new("chain");
    let x = g
        .add(Op::Input { name: "x".into(), dtype: DType::F32, shape: kiln_ir::dims(&[4]) }, &[])
        .expect("input");
    let mut v = x;
    for i in 0..10_000 {
        let (op, operands) = match i % 3 {
            0 => (Op::Unary(UnaryOp::Tanh), vec![v]),
            1 => (Op::Binary(BinaryOp::Add), vec![v, x]),
            _ => (Op::Unary(UnaryOp::Neg), vec![v]),
        };
        v = g.add(op, &operands).expect("elementwise op");
    }
    g.add_output("y", v);
    // On a thread with a small stack (the default of spawned threads is 2 MiB): a recursion
    // over the chain's depth anywhere in the optimizer would overflow it.
    let worker = std::thread::Builder::new().stack_size(1 << 20);
    let (before, after) = worker
        .spawn(move || {
            let (opt, _) = optimize(&g, &Options::default()).expect("optimizes");
            let b = bindings(&g, 3);
            let want = kiln_ir::eval(&g, &b).expect("original evaluates");
            let got = kiln_ir::eval(&opt, &b).expect("optimized evaluates");
            (want[0].1.to_f64_vec(), got[0].1.to_f64_vec())
        })
        .expect("spawn")
        .join()
        .expect("the optimizer ran to the end");
    for (a, b) in before.iter().zip(&after) {
        assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()), "{a} vs {b}");
    }
}

/// A softmax written in primitives over `f32[batch, seq, 8]` with symbolic batch and seq: it
/// fuses (the rule's shape conditions hold by normal form), the optimized graph keeps the
/// symbols, and both specialize to graphs that compute the same at 1, the hints and the maxima.
#[test]
fn a_symbolic_softmax_fuses_and_specializes_like_the_original() {
    use kiln_ir::{BinaryOp, DType, Dim, ReduceOp, SizeExpr, SymbolDecl, UnaryOp};
    let mut g = Graph::new("dyn_softmax");
    g.symbols = vec![
        SymbolDecl { name: "batch".into(), min: 1, max: 4, hint: 2, multiple_of: 1 },
        SymbolDecl { name: "seq".into(), min: 1, max: 64, hint: 16, multiple_of: 1 },
    ];
    let (b, s) = (Dim::Sym(SizeExpr::symbol(0, "batch")), Dim::Sym(SizeExpr::symbol(1, "seq")));
    let x = g
        .add(Op::Input { name: "x".into(), dtype: DType::F32, shape: vec![b, s, Dim::Const(8)] }, &[])
        .unwrap();
    let red = |op| Op::Reduce { op, axes: vec![2], keepdims: true };
    let m = g.add(red(ReduceOp::Max), &[x]).unwrap();
    let d = g.add(Op::Binary(BinaryOp::Sub), &[x, m]).unwrap();
    let e = g.add(Op::Unary(UnaryOp::Exp), &[d]).unwrap();
    let sum = g.add(red(ReduceOp::Sum), &[e]).unwrap();
    let y = g.add(Op::Binary(BinaryOp::Div), &[e, sum]).unwrap();
    g.add_output("y", y);
    let (out, r) = optimize(&g, &Options::default()).expect("optimizes");
    assert_eq!(count(&r, "softmax"), 1, "{:?}", r.op_counts);
    assert_eq!(out.symbols, g.symbols);
    assert_eq!(out.ty(out.outputs[0].1).to_string(), "f32[batch, seq, 8]");
    for values in [[1, 1], [2, 16], [4, 64]] {
        let (before, after) = (g.specialize(&values).unwrap(), out.specialize(&values).unwrap());
        assert_same_outputs(&before, &after, 1e-6, &format!("softmax at {values:?}"));
    }
}

/// BERT and GPT-2 with a dynamic batch and sequence length (small): the symbolic graph fuses
/// exactly as the static one at the hints (attention, the norms, GELU, the matmul epilogues),
/// the optimized graph keeps the symbols, and specialized at the minima, the hints and the
/// maxima it computes what the static model lowered with those sizes by `--set` computes.
#[test]
fn dynamic_bert_and_gpt2_fuse_like_the_static_ones_and_compute_the_same() {
    let cases: [(&str, &str, &str, &[&str]); 2] = [
        (
            "bert_encoder",
            r#""batch": 1, "seq": 128,"#,
            r#""batch": Dyn(min: 1, max: 3, hint: 2), "seq": Dyn(min: 1, max: "max_positions", hint: 8),"#,
            &["layers=2", "hidden=32", "heads=2", "ffn=64", "vocab=50", "max_positions=24"],
        ),
        (
            "gpt2",
            r#""batch": 1, "seq": 64,"#,
            r#""batch": Dyn(min: 1, max: 3, hint: 2), "seq": Dyn(min: 1, max: "ctx", hint: 8),"#,
            &["layers=2", "d=32", "heads=2", "vocab=50", "ctx=24"],
        ),
    ];
    for (name, entry, decl, small) in cases {
        let text = std::fs::read_to_string(model(name)).expect("model");
        assert!(text.contains(entry), "{name}: `{entry}`");
        let text = text.replacen(entry, decl, 1);
        let ov: Vec<Override> = small.iter().map(|s| Override::parse(s).expect("name=value")).collect();
        let (sources, r) = kiln_lower::load_str("m.ron", &text, &ov);
        let g = r.unwrap_or_else(|d| panic!("{name}:\n{}", d.render(&sources))).graph;
        let (opt, report) = optimize(&g, &Options::default()).expect("optimizes");
        assert_eq!(opt.symbols, g.symbols, "{name}");
        let static_at = |batch: i64, seq: i64| {
            let (b, s) = (format!("batch={batch}"), format!("seq={seq}"));
            lower(&model(name), &[small, &[b.as_str(), s.as_str()]].concat())
        };
        let (_, at_hints) = optimize(&static_at(2, 8), &Options::default()).expect("optimizes");
        assert_eq!(report.op_counts, at_hints.op_counts, "{name}: symbolic vs static at the hints");
        assert_eq!(report.rules_fired, at_hints.rules_fired, "{name}: symbolic vs static at the hints");
        assert_eq!(count(&report, "attention"), 2, "{name}: {:?}", report.op_counts);
        assert_eq!(norms(&report), 5, "{name}: {:?}", report.op_counts);
        for rule in ["fuse-attention", "fuse-layer-norm", "fuse-gelu", "fuse-matmul-bias"] {
            let fired = report.rules_fired.keys().any(|k| k.starts_with(rule));
            assert!(fired, "{name}: {rule} did not fire: {:?}", report.rules_fired);
        }
        for (batch, seq) in [(1, 1), (2, 8), (3, 24)] {
            let after = opt.specialize(&[batch, seq]).expect("specializes");
            // Every value is a number (a NaN on both sides would compare as equal).
            let outputs = kiln_ir::eval(&after, &bindings(&after, 7)).expect("evaluates");
            assert!(outputs.iter().all(|(_, t)| t.to_f64_vec().iter().all(|x| x.is_finite())), "{name}");
            assert_same_outputs(
                &static_at(batch, seq),
                &after,
                1e-4,
                &format!("{name} at batch {batch}, seq {seq}"),
            );
        }
    }
}

/// Grouped-query attention written as `reshape(broadcast_to(k))` (the key and value heads
/// repeated for each group) optimizes to one attention over the heads split in two, reading k
/// and v through the broadcast: its key operand is the broadcast itself, rank 5, and no
/// reshape of a broadcast is left (that would be a copy per run).
#[test]
fn a_grouped_query_attention_reads_the_shared_heads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/variants/attention_grouped_query.ron");
    let g = lower(&path, &[]);
    let (opt, r) = optimize(&g, &Options::default()).expect("optimizes");
    let attentions: Vec<NodeId> =
        opt.node_ids().filter(|n| matches!(opt.node(*n).op, Op::Attention { .. })).collect();
    assert_eq!(attentions.len(), 1, "{:?}", r.op_counts);
    let k = opt.operands(attentions[0])[1];
    assert!(matches!(opt.node(k).op, Op::BroadcastTo { .. }), "k is {:?}", opt.node(k).op);
    assert_eq!(opt.ty(k).rank(), 5);
    let reshaped_broadcasts = opt
        .node_ids()
        .filter(|n| {
            matches!(opt.node(*n).op, Op::Reshape { .. })
                && matches!(opt.node(opt.operands(*n)[0]).op, Op::BroadcastTo { .. })
        })
        .count();
    assert_eq!(reshaped_broadcasts, 0, "{:?}", r.op_counts);
    assert!(r.rules_fired.contains_key("attention-split-heads"), "{:?}", r.rules_fired);
}
