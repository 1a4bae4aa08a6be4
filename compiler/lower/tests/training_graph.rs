//! The training graph of a spec: the losses of the training section built from primitives
//! (values against hand-computed PyTorch semantics), and the gradients of every parameter of
//! a shipped model against central differences through the interpreter.

use kiln_ir::autodiff::check::{numeric_gradient, widen_to_f64};
use kiln_ir::{bind_params, eval, Bindings, Buffer, DType, Graph, Op, Tensor};
use kiln_lower::{training_graph, Lowered, Override, TrainingError};
use std::path::Path;

fn lower_file(model: &str, sets: &[&str]) -> Lowered {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models").join(model);
    let overrides: Vec<Override> = sets.iter().map(|s| Override::parse(s).unwrap()).collect();
    let (sources, r) = kiln_lower::load(&path, &overrides);
    r.unwrap_or_else(|d| panic!("{}", d.render(&sources)))
}

fn lower_str(text: &str) -> Lowered {
    let (sources, r) = kiln_lower::load_str("train.ron", text, &[]);
    r.unwrap_or_else(|d| panic!("{}", d.render(&sources)))
}

/// Seeded inputs: floats uniform in [-1, 1), integers (labels) in `0..bound`.
fn inputs(g: &Graph, bound: i64) -> Bindings {
    let mut b = Bindings::default();
    for &i in &g.inputs {
        let Op::Input { name, dtype, .. } = &g.node(i).op else { unreachable!() };
        let shape = g.ty(i).static_shape();
        let n: usize = shape.iter().product();
        let stream = kiln_ir::rng::stream_of(name);
        let u = (0..n as u64).map(|j| kiln_ir::rng::uniform(9, stream, j));
        let data = if dtype.is_int() {
            Buffer::from_f64(*dtype, u.map(|x| (x * bound as f64).floor()))
        } else {
            Buffer::from_f64(*dtype, u.map(|x| 2.0 * x - 1.0))
        };
        b.inputs.insert(name.clone(), Tensor::new(shape.clone(), data).unwrap());
    }
    b
}

fn output<'a>(out: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
    &out.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no output {name}")).1
}

/// Compares every `grad.NAME` output with central differences of `loss`.
#[track_caller]
fn check_gradients(g: &Graph, b: &Bindings, tol: f64) {
    let out = eval(g, b).unwrap_or_else(|e| panic!("{e}"));
    let grads: Vec<&str> = g.outputs.iter().filter_map(|(n, _)| n.strip_prefix("grad.")).collect();
    assert!(!grads.is_empty());
    for name in grads {
        let analytic = output(&out, &format!("grad.{name}")).to_f64_vec();
        let numeric = numeric_gradient(g, "loss", b, name, 1e-6).unwrap().to_f64_vec();
        for (i, (a, n)) in analytic.iter().zip(&numeric).enumerate() {
            assert!(
                (a - n).abs() <= tol * (1.0 + n.abs()),
                "{name}[{i}]: autodiff {a}, central differences {n}"
            );
        }
    }
}

#[test]
fn mlp_gradients_are_finite_and_match_central_differences() {
    let l = lower_file("mlp.ron", &["batch=3", "in=6", "hidden1=5", "hidden2=4", "classes=3"]);
    let t = training_graph(&l).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = t.gradients.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"]);
    // The model's outputs come first, then the loss and one gradient per parameter.
    let outs: Vec<&str> = t.graph.outputs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(&outs[..3], ["logits", "probs", "loss"]);
    kiln_ir::verify(&t.graph).unwrap();

    // f32, as shipped: every gradient is finite and the right type.
    let mut b = inputs(&t.graph, 3);
    b.params = bind_params(&t.graph, None, 0, true).unwrap();
    let out = eval(&t.graph, &b).unwrap();
    for (name, id) in &t.gradients {
        let grad = output(&out, &format!("grad.{name}"));
        assert_eq!(grad.dtype(), DType::F32);
        assert_eq!(grad.shape, t.graph.ty(*id).static_shape());
        assert!(grad.to_f64_vec().iter().all(|v| v.is_finite()), "{name}: {grad:?}");
        assert!(grad.to_f64_vec().iter().any(|&v| v != 0.0), "{name} is all zeros");
    }
    let loss = output(&out, "loss").to_f64_vec()[0];
    assert!(loss.is_finite() && loss > 0.0);

    // f64: every gradient matches central differences.
    let wide = widen_to_f64(&t.graph).unwrap();
    let mut b = inputs(&wide, 3);
    b.params = bind_params(&wide, None, 0, true).unwrap();
    check_gradients(&wide, &b, 1e-6);
}

const CE: &str = r#"
Model(
    name: "ce",
    inputs: { "x": (f64, [2, 3, 4]), "y": (i64, [2, 3]) },
    body: [ Let("z", Mul("x", Param(name: "w", shape: [4], dtype: f64, init: Normal(std: 1.0)))) ],
    outputs: ["z"],
    training: Training(
        loss: CrossEntropy(logits: "z", labels: "y", label_smoothing: 0.2),
        optimizer: Sgd(),
    ),
)
"#;

/// PyTorch's cross-entropy with label smoothing, by hand: per position
/// `−(1 − ε)·log p[label] − (ε / C)·Σ log p`, averaged.
fn cross_entropy_by_hand(z: &[f64], labels: &[i64], classes: usize, eps: f64) -> f64 {
    let rows = z.len() / classes;
    let mut total = 0.0;
    for (r, row) in z.chunks(classes).enumerate() {
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
        let logp: Vec<f64> = row.iter().map(|v| v - lse).collect();
        total += -(1.0 - eps) * logp[labels[r] as usize] - eps / classes as f64 * logp.iter().sum::<f64>();
    }
    total / rows as f64
}

#[test]
fn cross_entropy_with_label_smoothing_has_pytorch_semantics() {
    let t = training_graph(&lower_str(CE)).unwrap();
    let mut b = inputs(&t.graph, 4);
    b.params = bind_params(&t.graph, None, 0, true).unwrap();
    let out = eval(&t.graph, &b).unwrap();
    let z = output(&out, "z").to_f64_vec();
    let labels: Vec<i64> = b.inputs["y"].to_f64_vec().iter().map(|&v| v as i64).collect();
    let want = cross_entropy_by_hand(&z, &labels, 4, 0.2);
    let got = output(&out, "loss").to_f64_vec()[0];
    assert!((got - want).abs() < 1e-12, "loss {got}, by hand {want}");
    check_gradients(&t.graph, &b, 1e-6);

    // Without smoothing, a known value: logits [0, ln 2, ln 3] and label 2 give −log(3/6).
    let text = CE.replace(", label_smoothing: 0.2", "");
    let t = training_graph(&lower_str(&text)).unwrap();
    let mut b = Bindings::default();
    let row = [0.0, 2f64.ln(), 3f64.ln(), f64::NEG_INFINITY];
    let x: Vec<f64> = (0..6).flat_map(|_| row).collect();
    b.inputs.insert("x".into(), Tensor::from_f64(vec![2, 3, 4], x).unwrap());
    b.inputs.insert("y".into(), Tensor::new(vec![2, 3], Buffer::I64(vec![2; 6])).unwrap());
    b.params.insert("w".into(), Tensor::from_f64(vec![4], vec![1.0; 4]).unwrap());
    let out = eval(&t.graph, &b).unwrap();
    let got = output(&out, "loss").to_f64_vec()[0];
    assert!((got - 2f64.ln()).abs() < 1e-15, "{got}");
}

/// Positions labelled `ignore_index` (PyTorch's default -100, or the spec's) leave the sum and
/// the count, label smoothing included; their gradients are zero.
#[test]
fn cross_entropy_leaves_out_ignored_positions() {
    for (text, ignore) in [
        (CE.to_string(), -100i64),
        (CE.replace("label_smoothing: 0.2", "label_smoothing: 0.2, ignore_index: 3"), 3),
    ] {
        let t = training_graph(&lower_str(&text)).unwrap();
        let mut b = inputs(&t.graph, 5);
        b.params = bind_params(&t.graph, None, 0, true).unwrap();
        let labels = vec![1, ignore, 0, 2, ignore, 3.min(ignore.max(0))];
        b.inputs.insert("y".into(), Tensor::new(vec![2, 3], Buffer::I64(labels.clone())).unwrap());
        let out = eval(&t.graph, &b).unwrap();
        let z = output(&out, "z").to_f64_vec();
        let kept: Vec<usize> = (0..6).filter(|&i| labels[i] != ignore).collect();
        let zk: Vec<f64> = kept.iter().flat_map(|&i| z[i * 4..i * 4 + 4].to_vec()).collect();
        let lk: Vec<i64> = kept.iter().map(|&i| labels[i]).collect();
        let want = cross_entropy_by_hand(&zk, &lk, 4, 0.2);
        let got = output(&out, "loss").to_f64_vec()[0];
        assert!((got - want).abs() < 1e-12, "ignore_index {ignore}: loss {got}, by hand {want}");
        check_gradients(&t.graph, &b, 1e-6);
    }
    // Every position ignored: 0/0, as PyTorch.
    let t = training_graph(&lower_str(CE)).unwrap();
    let mut b = inputs(&t.graph, 5);
    b.params = bind_params(&t.graph, None, 0, true).unwrap();
    b.inputs.insert("y".into(), Tensor::new(vec![2, 3], Buffer::I64(vec![-100; 6])).unwrap());
    let out = eval(&t.graph, &b).unwrap();
    assert!(output(&out, "loss").to_f64_vec()[0].is_nan());
}

/// A label outside `0..C` that is not `ignore_index` is an evaluation error naming the
/// position, as an out-of-range gather (PyTorch raises one too), never a position that
/// silently adds nothing to the loss.
#[test]
fn cross_entropy_label_out_of_range_is_an_evaluation_error() {
    let with_ignore_3 = CE.replace("label_smoothing: 0.2", "label_smoothing: 0.2, ignore_index: 3");
    for (text, labels, want) in [
        (
            CE,
            [1, 0, 2, 3, 4, 0],
            "gather index 4 at position [1, 1] of the indices is out of range for axis 0 of extent 4",
        ),
        (
            CE,
            [1, -1, 2, -100, 0, 0],
            "gather index -1 at position [0, 1] of the indices is out of range for axis 0 of extent 4",
        ),
        // -100 is only ignored while it is the ignore_index.
        (
            &with_ignore_3,
            [3, 1, 2, -100, 0, 0],
            "gather index -100 at position [1, 0] of the indices is out of range for axis 0 of extent 4",
        ),
    ] {
        let t = training_graph(&lower_str(text)).unwrap();
        let mut b = inputs(&t.graph, 4);
        b.params = bind_params(&t.graph, None, 0, true).unwrap();
        b.inputs.insert("y".into(), Tensor::new(vec![2, 3], Buffer::I64(labels.to_vec())).unwrap());
        let err = eval(&t.graph, &b).unwrap_err().to_string();
        assert!(
            err.contains("(gather `cross_entropy.labels` at train.ron:4:") && err.ends_with(want),
            "{err}"
        );
    }
}

#[test]
fn mse_is_the_mean_of_squared_differences() {
    let text = r#"
Model(
    name: "mse",
    inputs: { "x": (f64, [3, 2]), "t": (f64, [3, 2]) },
    body: [ Let("p", Add(MatMul("x", Param(name: "w", shape: [2, 2], dtype: f64, init: Normal(std: 1.0))), Param(name: "b", shape: [2], dtype: f64, init: Ones))) ],
    outputs: ["p"],
    training: Training(loss: Mse(pred: "p", target: "t"), optimizer: Adam()),
)
"#;
    let t = training_graph(&lower_str(text)).unwrap();
    let mut b = inputs(&t.graph, 1);
    b.params = bind_params(&t.graph, None, 0, true).unwrap();
    let out = eval(&t.graph, &b).unwrap();
    let (p, target) = (output(&out, "p").to_f64_vec(), b.inputs["t"].to_f64_vec());
    let want = p.iter().zip(&target).map(|(a, b)| (a - b) * (a - b)).sum::<f64>() / 6.0;
    let got = output(&out, "loss").to_f64_vec()[0];
    assert!((got - want).abs() < 1e-14, "{got} vs {want}");
    check_gradients(&t.graph, &b, 1e-6);
}

#[test]
fn a_loss_on_a_value_no_output_needs_is_an_error() {
    let text = CE.replace(r#"outputs: ["z"]"#, r#"outputs: ["x"]"#);
    let e = training_graph(&lower_str(&text)).unwrap_err();
    assert_eq!(e, TrainingError::Dropped("z".into()));
    assert!(e.to_string().contains("list `z` among the outputs"), "{e}");
    let text = CE.split("    training:").next().unwrap().to_string() + ")\n";
    assert_eq!(training_graph(&lower_str(&text)).unwrap_err(), TrainingError::NoTraining);
}

/// Every shipped model at small sizes, in f64: the gradient of a weighted sum of its float
/// outputs with respect to every parameter (each has a nonzero one), against central differences on three elements of
/// each parameter (its first, middle and last).
#[test]
fn every_shipped_model_differentiates_like_central_differences() {
    let models: [(&str, &[&str]); 6] = [
        ("mlp.ron", &["batch=2", "in=5", "hidden1=4", "hidden2=3", "classes=3"]),
        ("lstm.ron", &["batch=2", "steps=3", "features=3", "hidden=4", "classes=3"]),
        ("resnet_block.ron", &["batch=1", "size=6", "width=2", "blocks=1", "classes=3"]),
        (
            "bert_encoder.ron",
            &["vocab=11", "hidden=8", "layers=2", "heads=2", "ffn=12", "max_positions=6", "batch=2", "seq=5"],
        ),
        ("gpt2.ron", &["vocab=11", "ctx=6", "d=8", "heads=2", "layers=2", "batch=1", "seq=5"]),
        (
            "seed_transformer.ron",
            &["input_dim=11", "d_model=8", "heads=2", "layers=1", "d_ff=12", "batch=1", "seq=4"],
        ),
    ];
    for (model, sets) in models {
        let l = lower_file(model, sets);
        let mut g = widen_to_f64(&l.graph).unwrap();
        let ys: Vec<_> = g.outputs.iter().map(|(_, n)| *n).filter(|&n| g.ty(n).dtype.is_float()).collect();
        let mut loss = None;
        for (k, y) in ys.into_iter().enumerate() {
            let shape = g.ty(y).static_shape();
            let n: usize = shape.iter().product();
            let w = (0..n as u64).map(|i| kiln_ir::rng::uniform(4, k as u64, i) - 0.5).collect();
            let w = g.add(Op::Const { value: Tensor::from_f64(shape.clone(), w).unwrap() }, &[]).unwrap();
            let prod = g.add(Op::Binary(kiln_ir::BinaryOp::Mul), &[y, w]).unwrap();
            let axes = (0..shape.len()).collect();
            let s = g.add(Op::Reduce { op: kiln_ir::ReduceOp::Sum, axes, keepdims: false }, &[prod]).unwrap();
            loss = Some(match loss {
                Some(l) => g.add(Op::Binary(kiln_ir::BinaryOp::Add), &[l, s]).unwrap(),
                None => s,
            });
        }
        let loss = loss.unwrap();
        g.outputs = vec![("loss".into(), loss)];
        let params = g.params();
        let grads = kiln_ir::grad(&mut g, loss, &params).unwrap_or_else(|e| panic!("{model}: {e}"));
        for (name, id) in &grads {
            g.add_output(format!("grad.{name}"), *id);
        }
        kiln_ir::verify(&g).unwrap_or_else(|e| panic!("{model}: {e}"));
        let mut b = Bindings { inputs: kiln_ir::seeded_inputs(&g, 5), ..Bindings::default() };
        b.params = bind_params(&g, None, 0, true).unwrap();
        let out = eval(&g, &b).unwrap_or_else(|e| panic!("{model}: {e}"));
        let loss_at = |b: &Bindings| eval(&g, b).unwrap()[0].1.to_f64_vec()[0];
        let nonzero = grads
            .iter()
            .filter(|(n, _)| output(&out, &format!("grad.{n}")).to_f64_vec().iter().any(|&v| v != 0.0));
        eprintln!("{model}: {} parameters, {} with a nonzero gradient", grads.len(), nonzero.count());
        for (name, _) in &grads {
            let analytic = output(&out, &format!("grad.{name}")).to_f64_vec();
            assert!(analytic.iter().all(|v| v.is_finite()), "{model}: {name}");
            assert!(analytic.iter().any(|&v| v != 0.0), "{model}: {name} has a zero gradient");
            let base = b.params[name].clone();
            let len = analytic.len();
            let mut elements = vec![0, len / 2, len - 1];
            elements.dedup();
            for i in elements {
                let h = 1e-6;
                let at = |d: f64| {
                    let mut v = base.to_f64_vec();
                    v[i] += d;
                    let mut b2 = b.clone();
                    b2.params.insert(name.clone(), Tensor::from_f64(base.shape.clone(), v).unwrap());
                    loss_at(&b2)
                };
                let numeric = (at(h) - at(-h)) / (2.0 * h);
                let a = analytic[i];
                assert!(
                    (a - numeric).abs() <= 1e-5 * (1.0 + numeric.abs()),
                    "{model}: d loss / d {name}[{i}]: autodiff {a}, central differences {numeric}"
                );
            }
        }
    }
}

/// The loss and autodiff build on static shapes: a model with symbols is refused by name,
/// with the `--set`s that specialize it.
#[test]
fn a_model_with_symbols_trains_only_specialized() {
    let lowered = lower_str(
        r#"Model(
    name: "m",
    config: { "batch": Dyn(min: 1, max: 8, hint: 2) },
    inputs: { "x": (f32, ["batch", 3]), "y": (f32, ["batch", 3]) },
    body: [ Let("w", Param(shape: [3], init: Ones)), Let("p", Mul("x", "w")) ],
    outputs: ["p"],
    training: Training(loss: Mse(pred: "p", target: "y"), optimizer: Sgd(lr: 0.1)),
)"#,
    );
    let err = training_graph(&lowered).expect_err("symbolic");
    assert!(matches!(err, TrainingError::Unspecialized(_)));
    assert_eq!(
        err.to_string(),
        "the dynamic size `batch` is not specialized: compiling needs static shapes; specialize with `--set NAME=VALUE` (--set batch=2)"
    );
}
