//! Gradients and optimizer steps checked against PyTorch itself, not against Kiln's own
//! reading of its formulas: the golden files in `tests/golden/training/` were written by
//! `tests/golden/make_training_golden.py` (pinned PyTorch, `tests/golden/README.md` says how
//! and why the tolerances are what they are). No Python is needed here.
//!
//! * `MODELS`: for `models/mlp.ron`, a 2-layer `models/bert_encoder.ron`, `models/lstm.ron`
//!   and `models/resnet_block.ron` at small sizes, Kiln's parameters (norm parameters drawn at
//!   random so their affine part counts), fixed inputs, the loss and every parameter's
//!   gradient, from PyTorch in float32 and float64.
//! * `CROSS_ENTROPY`: the MLP's cross-entropy with label smoothing and `ignore_index`.
//! * `OPTIMIZERS`: ten steps of `torch.optim` (each optimizer, schedule, clipping and
//!   accumulation) on the MLP: the learning rate, loss and gradient norm of every step, the
//!   parameters after the first and the tenth, in float32 and (Kiln's train step widened)
//!   float64.

use kiln_ir::autodiff::check::widen_to_f64;
use kiln_ir::tensor_io::{read_safetensors, write_safetensors};
use kiln_ir::{bind_params, eval, grad, Bindings, DType, Graph, Op, Tensor};
use kiln_lower::{cross_entropy, mse, train_step, training_graph, Lowered, Override};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The seed of Kiln's parameter initializers for the golden parameters.
const SEED: u64 = 0;

/// The loss a golden file was made with: the spec's own training section, or one stated here
/// for models without one (the script states the same).
#[derive(Clone, Copy)]
enum Loss {
    Spec,
    /// Cross-entropy of the output `logits` against an input `label` (PyTorch's defaults).
    CrossEntropy,
    /// Mean squared error of the output `last_hidden_state` against an input `target`.
    Mse,
}

/// Each model, its sizes (`--set` overrides; the script uses the same) and its loss.
const MODELS: &[(&str, &[&str], Loss)] = &[
    ("mlp", &["batch=6", "in=6", "hidden1=5", "hidden2=4", "classes=3"], Loss::Spec),
    (
        "bert_encoder",
        &["vocab=40", "hidden=16", "layers=2", "heads=2", "ffn=32", "max_positions=12", "batch=2", "seq=8"],
        Loss::Mse,
    ),
    ("lstm", &["batch=3", "steps=5", "features=4", "hidden=6", "classes=3"], Loss::CrossEntropy),
    ("resnet_block", &["batch=2", "size=8", "width=4", "blocks=2", "classes=3"], Loss::CrossEntropy),
];

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/training")
}

fn lower_model(model: &str, sets: &[&str], text: Option<&str>) -> Lowered {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models").join(format!("{model}.ron"));
    let overrides: Vec<Override> = sets.iter().map(|s| Override::parse(s).unwrap()).collect();
    let (sources, r) = match text {
        Some(text) => kiln_lower::load_str(&format!("{model}.ron"), text, &overrides),
        None => kiln_lower::load(&path, &overrides),
    };
    r.unwrap_or_else(|d| panic!("{}", d.render(&sources)))
}

fn model_text(model: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models").join(format!("{model}.ron"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The mlp spec with its training section replaced by `training` (the text inside
/// `Training(…)`).
fn mlp_with_training(training: &str) -> String {
    let text = model_text("mlp");
    let start = text.find("training: Training(").expect("mlp.ron has a training section");
    format!("{}training: Training({training}),\n)\n", &text[..start])
}

/// The training graph of a lowered model: outputs `loss` and `grad.NAME` per parameter.
fn with_loss(l: &Lowered, loss: Loss) -> Graph {
    let mut g = l.graph.clone();
    let output = |g: &Graph, name: &str| {
        g.outputs.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no output {name}")).1
    };
    let input = |g: &mut Graph, name: &str, dtype, shape| {
        g.add(Op::Input { name: name.into(), dtype, shape }, &[]).unwrap()
    };
    let loss = match loss {
        Loss::Spec => return training_graph(l).unwrap_or_else(|e| panic!("{e}")).graph,
        Loss::CrossEntropy => {
            let logits = output(&g, "logits");
            let shape = g.ty(logits).shape.split_last().expect("logits have classes").1.to_vec();
            let labels = input(&mut g, "label", DType::I64, shape);
            cross_entropy(&mut g, logits, labels, 0.0, -100).unwrap()
        }
        Loss::Mse => {
            let pred = output(&g, "last_hidden_state");
            let ty = g.ty(pred).clone();
            let target = input(&mut g, "target", ty.dtype, ty.shape.to_vec());
            mse(&mut g, pred, target).unwrap()
        }
    };
    let params = g.params();
    let grads = grad(&mut g, loss, &params).unwrap_or_else(|e| panic!("{e}"));
    g.outputs = vec![("loss".into(), loss)];
    for (name, n) in grads {
        g.add_output(format!("grad.{name}"), n);
    }
    g
}

/// Not a check: writes Kiln's parameters of each model at its golden sizes into
/// `$KILN_GOLDEN_PARAMS/MODEL.safetensors`, in the graph's parameter order, for
/// `make_training_golden.py` (which runs it).
#[test]
#[ignore = "run by tests/golden/make_training_golden.py"]
fn write_kiln_parameters() {
    let dir = std::env::var_os("KILN_GOLDEN_PARAMS").expect("set KILN_GOLDEN_PARAMS to a folder");
    for &(model, sets, _) in MODELS {
        let l = lower_model(model, sets, None);
        let mut params = bind_params(&l.graph, None, SEED, true).unwrap_or_else(|e| panic!("{e}"));
        let ordered: Vec<(String, Tensor)> = param_names(&l.graph)
            .into_iter()
            .filter_map(|name| params.remove(&name).map(|t| (name, t)))
            .collect();
        write_safetensors(Path::new(&dir).join(format!("{model}.safetensors")), &ordered).unwrap();
    }
}

/// The graph's parameter names, once each, in its parameter order.
fn param_names(g: &Graph) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for p in g.params() {
        if let Op::Param { name, .. } = &g.node(p).op {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
    }
    names
}

/// A golden file's tensors by name.
fn golden(file: &str) -> HashMap<String, Tensor> {
    let path = golden_dir().join(file);
    read_safetensors(&path).unwrap_or_else(|e| panic!("{e}")).into_iter().collect()
}

/// The tensors named `PREFIX.NAME`, as `NAME`.
fn prefixed(g: &HashMap<String, Tensor>, prefix: &str) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> =
        g.iter().filter_map(|(n, t)| n.strip_prefix(prefix).map(|k| (k.to_string(), t.clone()))).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The bindings of graph `g` from a golden file: parameters `param.NAME` (every one of the
/// graph's, no more), inputs `input.NAME`, each cast to the graph's dtype.
fn bindings(g: &Graph, file: &HashMap<String, Tensor>, inputs: &str) -> Bindings {
    let params = prefixed(file, "param.");
    let mut b = Bindings::default();
    let mut want = param_names(g);
    want.sort_unstable();
    let have: Vec<&String> = params.iter().map(|(n, _)| n).collect();
    assert_eq!(have, want.iter().collect::<Vec<_>>(), "the golden parameters are not the graph's");
    b.params = bind_params(g, Some(&params), SEED, false).unwrap_or_else(|e| panic!("{e}"));
    for &i in &g.inputs {
        let Op::Input { name, dtype, .. } = &g.node(i).op else { unreachable!("inputs are inputs") };
        let t = file.get(&format!("{inputs}{name}")).unwrap_or_else(|| panic!("no input {inputs}{name}"));
        let t = if dtype.is_float() { t.cast(*dtype) } else { t.clone() };
        b.inputs.insert(name.clone(), t);
    }
    b
}

/// `max |got − want| / max(max |want|, floor)` over one tensor: the error relative to the
/// tensor's scale (the elements of one tensor share their rounding noise, and elements near
/// zero have no relative accuracy of their own). `floor` keeps a gradient that is zero in
/// exact arithmetic (a key projection's bias: softmax ignores a shift of each row) from
/// making rounding noise look large.
fn scaled_error(what: &str, got: &Tensor, want: &Tensor, floor: f64) -> f64 {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    let (g, w) = (got.to_f64_vec(), want.to_f64_vec());
    let scale = w.iter().fold(floor, |m, v| m.max(v.abs()));
    let mut worst = 0.0f64;
    for (a, b) in g.iter().zip(&w) {
        let e = (a - b).abs() / scale;
        // NaN anywhere is a failure, never a pass.
        worst = if e.is_nan() { f64::INFINITY } else { worst.max(e) };
    }
    worst
}

/// The floor of [`scaled_error`] for the gradients of one graph: a hundredth of the largest
/// gradient element of any parameter.
fn gradient_floor<'a>(grads: impl Iterator<Item = &'a Tensor>) -> f64 {
    let max = grads.flat_map(|t| t.to_f64_vec()).fold(0.0f64, |m, v| m.max(v.abs()));
    (1e-2 * max).max(f64::MIN_POSITIVE)
}

/// Relative tolerances: f32 Kiln against f32 PyTorch (both round, in different orders), and
/// f64 against f64 (the same formulas should agree to a few ulps of f64, times the depth).
const GRAD_TOL_F32: f64 = 1e-5;
const GRAD_TOL_F64: f64 = 1e-12;

/// Evaluates `g` on a golden file and compares `loss` and every `grad.NAME` with the file's
/// `PREFIX.loss` and `PREFIX.grad.NAME` (f32) or `PREFIX.loss64` and `PREFIX.grad64.NAME`
/// (f64). Returns the worst scaled error, after asserting it is within `tol`.
#[track_caller]
fn check_against(g: &Graph, file: &HashMap<String, Tensor>, prefix: &str, wide: bool, tol: f64) -> f64 {
    let b = bindings(g, file, &format!("{prefix}input."));
    let out = eval(g, &b).unwrap_or_else(|e| panic!("{e}"));
    let (loss_key, grad_key) = if wide { ("loss64", "grad64.") } else { ("loss", "grad.") };
    let mut pairs = Vec::new();
    for (name, t) in &out {
        let key = if name == "loss" {
            format!("{prefix}{loss_key}")
        } else if let Some(p) = name.strip_prefix("grad.") {
            format!("{prefix}{grad_key}{p}")
        } else {
            continue;
        };
        let want = file.get(&key).unwrap_or_else(|| panic!("the golden file has no {key}"));
        pairs.push((key, name != "loss", t, want));
    }
    let floor = gradient_floor(pairs.iter().filter(|p| p.1).map(|p| p.3));
    let mut worst = (0.0f64, String::new());
    let mut compared = 0;
    for (key, is_grad, t, want) in pairs {
        let floor = if is_grad { floor } else { f64::MIN_POSITIVE };
        let e = scaled_error(&key, t, want, floor);
        println!("{key}: {e:.2e}");
        if e > worst.0 || worst.1.is_empty() {
            worst = (e, key);
        }
        compared += 1;
    }
    assert_eq!(compared, g.outputs.iter().filter(|(n, _)| n == "loss" || n.starts_with("grad.")).count());
    assert!(worst.0 <= tol, "{}: scaled error {:.3e} > {tol:.0e}", worst.1, worst.0);
    worst.0
}

#[test]
fn gradients_match_pytorch() {
    for &(model, sets, loss) in MODELS {
        let l = lower_model(model, sets, None);
        let g = with_loss(&l, loss);
        let file = golden(&format!("{model}.safetensors"));
        let e32 = check_against(&g, &file, "", false, GRAD_TOL_F32);
        let wide = widen_to_f64(&g).unwrap();
        let e64 = check_against(&wide, &file, "", true, GRAD_TOL_F64);
        println!("{model}: f32 {e32:.2e}, f64 {e64:.2e}");
    }
}

/// Cross-entropy variants of the MLP (the script's `CROSS_ENTROPY`): the loss arguments of
/// each, as the training section writes them.
const CROSS_ENTROPY: &[(&str, &str)] =
    &[("smoothing", "label_smoothing: 0.1"), ("ignore_index", "label_smoothing: 0.2, ignore_index: 1")];

#[test]
fn cross_entropy_matches_pytorch() {
    let file = golden("mlp.safetensors");
    let sets = MODELS[0].1;
    for &(case, args) in CROSS_ENTROPY {
        let text = mlp_with_training(&format!(
            r#"loss: CrossEntropy(logits: "logits", labels: "label", {args}), optimizer: Adam()"#
        ));
        let l = lower_model("mlp", sets, Some(&text));
        let g = with_loss(&l, Loss::Spec);
        let prefix = format!("{case}.");
        let e32 = check_against(&g, &file, &prefix, false, GRAD_TOL_F32);
        let e64 = check_against(&widen_to_f64(&g).unwrap(), &file, &prefix, true, GRAD_TOL_F64);
        println!("{case}: f32 {e32:.2e}, f64 {e64:.2e}");
    }
}

/// The optimizer cases (the script's `OPTIMIZERS`, with the same hyper-parameters): the MLP's
/// training section after its loss, and the micro-batches per step.
const OPTIMIZERS: &[(&str, &str, usize)] = &[
    ("sgd", "optimizer: Sgd(lr: 0.1)", 1),
    ("sgd_momentum", "optimizer: Sgd(lr: 0.1, momentum: 0.9, dampening: 0.1)", 1),
    ("sgd_nesterov", "optimizer: Sgd(lr: 0.1, momentum: 0.9, nesterov: true)", 1),
    ("sgd_weight_decay", "optimizer: Sgd(lr: 0.1, momentum: 0.5, weight_decay: 0.05)", 1),
    ("adam", "optimizer: Adam(lr: 0.01)", 1),
    ("adam_weight_decay", "optimizer: Adam(lr: 0.01, beta1: 0.8, beta2: 0.99, eps: 1e-6, weight_decay: 0.1)", 1),
    ("adamw", "optimizer: AdamW(lr: 0.01, weight_decay: 0.1)", 1),
    ("rmsprop", "optimizer: RmsProp(lr: 0.01)", 1),
    ("rmsprop_momentum", "optimizer: RmsProp(lr: 0.002, momentum: 0.9, weight_decay: 0.05)", 1),
    ("rmsprop_centered", "optimizer: RmsProp(lr: 0.01, alpha: 0.9, centered: true)", 1),
    ("rmsprop_centered_momentum", "optimizer: RmsProp(lr: 0.002, momentum: 0.5, eps: 1e-6, centered: true)", 1),
    ("constant", "optimizer: Adam(lr: 0.01), schedule: Constant()", 1),
    ("linear", "optimizer: Adam(lr: 0.01), schedule: Linear(total: 10)", 1),
    ("linear_warmup", "optimizer: Sgd(lr: 0.1, momentum: 0.9), schedule: Linear(warmup: 3, total: 8)", 1),
    ("cosine", "optimizer: Adam(lr: 0.01), schedule: Cosine(total: 10, min_lr: 1e-3)", 1),
    ("cosine_warmup", "optimizer: Adam(lr: 0.01), schedule: Cosine(warmup: 3, total: 10, min_lr: 1e-3)", 1),
    ("step", "optimizer: Sgd(lr: 0.1, momentum: 0.9), schedule: Step(step_size: 3, gamma: 0.5)", 1),
    ("clip", "optimizer: Sgd(lr: 0.1, momentum: 0.9), clip_grad_norm: 0.3", 1),
    ("clip_inactive", "optimizer: Adam(lr: 0.01), clip_grad_norm: 100.0", 1),
    (
        "accumulate",
        "optimizer: Adam(lr: 0.01), schedule: Cosine(warmup: 2, total: 10), clip_grad_norm: 0.5, accumulate: 3",
        3,
    ),
];

/// Optimizer steps in the golden file.
const STEPS: usize = 10;

/// What ten train steps of one case give: each step's learning rate, loss and gradient norm
/// (under clipping), and the parameters after the first and the last step.
struct Run {
    lr: Vec<f64>,
    loss: Vec<f64>,
    grad_norm: Vec<f64>,
    after: [HashMap<String, Tensor>; 2],
}

fn zeros(dtype: DType, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::new(shape.to_vec(), kiln_ir::Buffer::from_f64(dtype, std::iter::repeat_n(0.0, n))).unwrap()
}

/// Ten train steps of the MLP under `training` through the interpreter, each output fed back
/// as the next step's parameters and state, on the golden batches (split into `micro`
/// micro-batches of equal size); in f64 throughout when `wide`.
fn train(file: &HashMap<String, Tensor>, training: &str, micro: usize, wide: bool) -> Run {
    let mut sets: Vec<String> = MODELS[0].1.iter().map(|s| s.to_string()).collect();
    let batch: usize = 6;
    assert_eq!(sets[0], format!("batch={batch}"));
    sets[0] = format!("batch={}", batch / micro);
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let text =
        mlp_with_training(&format!(r#"loss: CrossEntropy(logits: "logits", labels: "label"), {training}"#));
    let l = lower_model("mlp", &sets, Some(&text));
    let mut g = train_step(&l).unwrap_or_else(|e| panic!("{e}")).graph;
    if wide {
        g = widen_to_f64(&g).unwrap();
    }
    let mut params =
        bind_params(&g, Some(&prefixed(file, "param.")), SEED, false).unwrap_or_else(|e| panic!("{e}"));
    let mut state: HashMap<String, Tensor> = HashMap::new();
    for &i in &g.inputs {
        let Op::Input { name, dtype, shape } = &g.node(i).op else { unreachable!("inputs are inputs") };
        if name.starts_with("optim.") {
            state.insert(name.clone(), zeros(*dtype, &kiln_ir::static_dims(shape).expect("static")));
        }
    }
    let mut run =
        Run { lr: vec![], loss: vec![], grad_norm: vec![], after: [HashMap::new(), HashMap::new()] };
    for k in 0..STEPS {
        let mut b = Bindings { params: params.clone(), ..Default::default() };
        b.inputs = state.clone();
        for name in ["image", "label"] {
            let t = &file[&format!("input.{k}.{name}")];
            let mut shape = vec![micro, t.shape[0] / micro];
            shape.extend_from_slice(&t.shape[1..]);
            let t = if micro == 1 { t.clone() } else { Tensor::new(shape, t.data.clone()).unwrap() };
            let t = if wide && t.dtype().is_float() { t.cast(DType::F64) } else { t };
            b.inputs.insert(name.into(), t);
        }
        for (name, t) in eval(&g, &b).unwrap_or_else(|e| panic!("step {k}: {e}")) {
            let one = || t.to_f64_vec()[0];
            match name.as_str() {
                "loss" => run.loss.push(one()),
                "optim.lr" => run.lr.push(one()),
                "optim.grad_norm" => run.grad_norm.push(one()),
                _ => match name.strip_prefix("param.") {
                    Some(p) => {
                        params.insert(p.to_string(), t);
                    }
                    None => {
                        assert!(state.insert(name.clone(), t).is_some(), "unexpected output {name}");
                    }
                },
            }
        }
        if k == 0 {
            run.after[0] = params.clone();
        }
    }
    run.after[1] = params;
    run
}

/// f32 Kiln against f32 PyTorch, ten steps: the parameters (scaled error), the loss and the
/// gradient norm (relative), the learning rate (relative: Kiln computes it in f32).
const PARAM_TOL: f64 = 1e-5;
const LOSS_TOL: f64 = 1e-5;
const LR_TOL: f64 = 1e-6;
/// The same in f64 on both sides, for every one of them (the widened graph computes the
/// learning rate in f64 too).
const TOL_F64: f64 = 1e-12;

#[track_caller]
fn relative(what: &str, got: &[f64], want: &Tensor, tol: f64) -> f64 {
    let want = want.to_f64_vec();
    assert_eq!(got.len(), want.len(), "{what}: {got:?} vs {want:?}");
    let mut worst = 0.0f64;
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        let e = (a - b).abs() / b.abs().max(1e-12);
        assert!(e <= tol, "{what}[{i}]: Kiln {a}, PyTorch {b} (relative error {e:.2e} > {tol:.0e})");
        worst = worst.max(e);
    }
    worst
}

#[test]
fn optimizer_steps_match_torch_optim() {
    let file = golden("optimizers.safetensors");
    let mut cases: Vec<&str> = file.keys().filter_map(|k| k.strip_suffix(".lr")).collect();
    cases.sort_unstable();
    let mut ours: Vec<&str> = OPTIMIZERS.iter().map(|c| c.0).collect();
    ours.sort_unstable();
    assert_eq!(cases, ours, "the golden file's cases are not this test's");
    for &(case, training, micro) in OPTIMIZERS {
        let run = train(&file, training, micro, false);
        let lr = relative(&format!("{case}.lr"), &run.lr, &file[&format!("{case}.lr")], LR_TOL);
        let loss = relative(&format!("{case}.loss"), &run.loss, &file[&format!("{case}.loss")], LOSS_TOL);
        let norm = match file.get(&format!("{case}.grad_norm")) {
            Some(want) => relative(&format!("{case}.grad_norm"), &run.grad_norm, want, LOSS_TOL),
            None => {
                assert!(run.grad_norm.is_empty(), "{case}: Kiln clips, PyTorch does not");
                0.0
            }
        };
        let after = compare_parameters(&file, &format!("{case}."), &run, PARAM_TOL);
        // The same in f64 on both sides: what f32 rounding could hide.
        let run = train(&file, training, micro, true);
        let f64_key = |what: &str| format!("{case}.f64.{what}");
        let loss64 = relative(&f64_key("loss"), &run.loss, &file[&f64_key("loss")], TOL_F64);
        let lr64 = relative(&format!("{case}.lr (f64)"), &run.lr, &file[&format!("{case}.lr")], TOL_F64);
        if let Some(want) = file.get(&f64_key("grad_norm")) {
            relative(&f64_key("grad_norm"), &run.grad_norm, want, TOL_F64);
        }
        let after64 = compare_parameters(&file, &format!("{case}.f64."), &run, TOL_F64);
        println!(
            "{case}: parameters after 1 step {:.2e}, after {STEPS} {:.2e}; lr {lr:.2e}, loss {loss:.2e}, grad norm {norm:.2e}; f64: parameters {:.2e}, {:.2e}, loss {loss64:.2e}, lr {lr64:.2e}",
            after[0], after[1], after64[0], after64[1]
        );
    }
}

/// Compares the parameters after the first and the last step with the file's
/// `PREFIXafter1.NAME` and `PREFIXafter10.NAME`; returns the worst scaled error of each.
#[track_caller]
fn compare_parameters(file: &HashMap<String, Tensor>, prefix: &str, run: &Run, tol: f64) -> [f64; 2] {
    let mut worst = [0.0f64; 2];
    for (slot, step) in [1, STEPS].into_iter().enumerate() {
        let want = prefixed(file, &format!("{prefix}after{step}."));
        assert_eq!(want.len(), run.after[slot].len(), "{prefix}: parameters");
        for (name, w) in &want {
            let what = format!("{prefix}after{step}.{name}");
            let e = scaled_error(&what, &run.after[slot][name], w, 1e-6);
            assert!(e <= tol, "{what}: scaled error {e:.2e} > {tol:.0e}");
            worst[slot] = worst[slot].max(e);
        }
    }
    worst
}
