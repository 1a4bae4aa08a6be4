//! The optimizer updates in the graph: one step against values worked by hand, ten steps of
//! a train step graph (forward, MSE loss, gradients, update) against a transcription of
//! `torch.optim`'s update loops, with and without a schedule, the schedules' formulas, and
//! the shipped MLP's loss falling under its Adam and cosine schedule; gradient clipping
//! against a norm worked by hand, and gradient accumulation against one batch K times
//! larger.

use kiln_ir::{bind_params, eval, Bindings, Buffer, DType, Graph, Op, Tensor};
use kiln_lower::{
    learning_rate, train_step, training_graph, update, Lowered, Optimizer, Schedule, TrainingError,
    MAX_ACCUMULATE,
};
use std::collections::HashMap;

fn lower_str(text: &str) -> Lowered {
    let (sources, r) = kiln_lower::load_str("optim.ron", text, &[]);
    r.unwrap_or_else(|d| panic!("{}", d.render(&sources)))
}

fn t64(v: &[f64]) -> Tensor {
    Tensor::from_f64(vec![v.len()], v.to_vec()).unwrap()
}

fn scalar64(v: f64) -> Tensor {
    Tensor::from_f64(vec![], vec![v]).unwrap()
}

fn input(g: &mut Graph, name: &str, shape: &[usize]) -> kiln_ir::NodeId {
    g.add(Op::Input { name: name.into(), dtype: DType::F64, shape: kiln_ir::dims(shape) }, &[]).unwrap()
}

/// One step of `opt` from zero state at step 0, on parameter `p` with gradient `grad`.
fn one_step(opt: &Optimizer, p: &[f64], grad: &[f64]) -> Vec<f64> {
    let n = p.len();
    let mut g = Graph::new("step");
    let (pn, gn, step) = (input(&mut g, "p", &[n]), input(&mut g, "g", &[n]), input(&mut g, "step", &[]));
    let lr = input(&mut g, "lr", &[]);
    let state: Vec<_> = opt.state_names().iter().map(|k| input(&mut g, k, &[n])).collect();
    let (np, _) = update(&mut g, opt, pn, gn, &state, step, lr).unwrap();
    g.add_output("p", np);
    let mut b = Bindings::default();
    b.inputs.insert("p".into(), t64(p));
    b.inputs.insert("g".into(), t64(grad));
    b.inputs.insert("step".into(), scalar64(0.0));
    b.inputs.insert("lr".into(), scalar64(opt.lr()));
    for k in opt.state_names() {
        b.inputs.insert(k.to_string(), t64(&vec![0.0; n]));
    }
    eval(&g, &b).unwrap()[0].1.to_f64_vec()
}

#[track_caller]
fn close(got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len());
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= tol * (1.0 + b.abs()),
            "element {i}: got {a}, want {b} ({got:?} vs {want:?})"
        );
    }
}

#[test]
fn one_step_by_hand() {
    let (p, grad) = ([1.0, -2.0, 0.5], [0.5, 0.1, -1.0]);
    let sgd = |momentum, nesterov| Optimizer::Sgd {
        lr: 0.1,
        momentum,
        dampening: 0.0,
        nesterov,
        weight_decay: 0.01,
    };
    // d = g + 0.01·p = [0.51, 0.08, −0.995]; the first momentum buffer is d itself.
    close(&one_step(&sgd(0.0, false), &p, &grad), &[0.949, -2.008, 0.5995], 1e-14);
    close(&one_step(&sgd(0.9, false), &p, &grad), &[0.949, -2.008, 0.5995], 1e-14);
    // Nesterov: d + 0.9·buf = 1.9·d.
    close(&one_step(&sgd(0.9, true), &p, &grad), &[0.9031, -2.0152, 0.68905], 1e-14);
    // Adam's first step is lr·g / (|g| + eps) after bias correction: about lr·sign(g).
    let adam = |weight_decay, decoupled| Optimizer::Adam {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay,
        decoupled,
    };
    let step1 = |p: f64, g: f64| p - 1e-3 * g / (g.abs() + 1e-8);
    let want: Vec<f64> = p.iter().zip(&grad).map(|(&p, &g)| step1(p, g)).collect();
    close(&one_step(&adam(0.0, false), &p, &grad), &want, 1e-14);
    // AdamW shrinks the parameter by lr·wd first and leaves the gradient alone.
    let want: Vec<f64> = p.iter().zip(&grad).map(|(&p, &g)| step1(p * (1.0 - 1e-3 * 0.1), g)).collect();
    close(&one_step(&adam(0.1, true), &p, &grad), &want, 1e-14);
}

#[test]
fn rmsprop_one_step_by_hand() {
    let (p, grad) = ([1.0, -2.0, 0.5], [0.5, 0.1, -1.0]);
    let rms = |momentum, centered, weight_decay| Optimizer::RmsProp {
        lr: 0.01,
        alpha: 0.99,
        eps: 1e-8,
        weight_decay,
        momentum,
        centered,
    };
    // From zero state: square_avg = 0.01·d², so avg = 0.1·|d| + eps and the step is
    // lr·d / avg, about 0.1 in the direction of d. The momentum buffer starts at zero, so
    // the first step is the same with momentum.
    let plain = |wd: f64| -> Vec<f64> {
        p.iter()
            .zip(&grad)
            .map(|(&p, &g)| {
                let d = g + wd * p;
                p - 0.01 * d / (0.1 * d.abs() + 1e-8)
            })
            .collect()
    };
    close(&one_step(&rms(0.0, false, 0.0), &p, &grad), &plain(0.0), 1e-14);
    close(&one_step(&rms(0.9, false, 0.0), &p, &grad), &plain(0.0), 1e-14);
    close(&one_step(&rms(0.0, false, 0.1), &p, &grad), &plain(0.1), 1e-14);
    // Centered: grad_avg = 0.01·d, so the variance is (0.01 − 0.0001)·d² = 0.0099·d².
    let centered: Vec<f64> =
        p.iter().zip(&grad).map(|(&p, &g)| p - 0.01 * g / (0.0099f64.sqrt() * g.abs() + 1e-8)).collect();
    close(&one_step(&rms(0.0, true, 0.0), &p, &grad), &centered, 1e-14);
    close(&one_step(&rms(0.5, true, 0.0), &p, &grad), &centered, 1e-14);
    // The state each variant keeps, in `update`'s order.
    assert_eq!(rms(0.0, false, 0.0).state_names(), ["square_avg"]);
    assert_eq!(rms(0.0, true, 0.0).state_names(), ["square_avg", "grad_avg"]);
    assert_eq!(rms(0.9, false, 0.0).state_names(), ["square_avg", "momentum"]);
    assert_eq!(rms(0.9, true, 0.0).state_names(), ["square_avg", "grad_avg", "momentum"]);
}

/// `torch.optim`'s single-tensor update loops, transcribed, on the gradient of
/// `mean((w − t)²)`, one step per learning rate of `lrs`. Returns the parameter after each
/// step.
fn reference(opt: &Optimizer, w0: &[f64], t: &[f64], lrs: &[f64]) -> Vec<Vec<f64>> {
    let n = w0.len();
    let mut p = w0.to_vec();
    let (mut buf, mut m, mut v): (Option<Vec<f64>>, Vec<f64>, Vec<f64>) = (None, vec![0.0; n], vec![0.0; n]);
    let (mut square_avg, mut grad_avg, mut rms_buf) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    let mut out = Vec::new();
    for (step, &lr) in (1..).zip(lrs) {
        let grad: Vec<f64> = p.iter().zip(t).map(|(w, t)| 2.0 * (w - t) / n as f64).collect();
        match *opt {
            Optimizer::Sgd { momentum, dampening, nesterov, weight_decay, .. } => {
                let mut d: Vec<f64> = grad.iter().zip(&p).map(|(g, p)| g + weight_decay * p).collect();
                if momentum != 0.0 {
                    let b = match buf.take() {
                        None => d.clone(),
                        Some(b) => {
                            b.iter().zip(&d).map(|(b, d)| momentum * b + (1.0 - dampening) * d).collect()
                        }
                    };
                    d = if nesterov {
                        d.iter().zip(&b).map(|(d, b)| d + momentum * b).collect()
                    } else {
                        b.clone()
                    };
                    buf = Some(b);
                }
                p = p.iter().zip(&d).map(|(p, d)| p - lr * d).collect();
            }
            Optimizer::Adam { beta1, beta2, eps, weight_decay, decoupled, .. } => {
                let mut g = grad.clone();
                if decoupled {
                    p.iter_mut().for_each(|p| *p *= 1.0 - lr * weight_decay);
                } else {
                    g = g.iter().zip(&p).map(|(g, p)| g + weight_decay * p).collect();
                }
                for i in 0..n {
                    m[i] += (g[i] - m[i]) * (1.0 - beta1);
                    v[i] = v[i] * beta2 + (1.0 - beta2) * g[i] * g[i];
                }
                let bc1 = 1.0 - beta1.powi(step);
                let bc2 = 1.0 - beta2.powi(step);
                let step_size = lr / bc1;
                for i in 0..n {
                    let denom = v[i].sqrt() / bc2.sqrt() + eps;
                    p[i] -= step_size * m[i] / denom;
                }
            }
            Optimizer::RmsProp { alpha, eps, weight_decay, momentum, centered, .. } => {
                let g: Vec<f64> = grad.iter().zip(&p).map(|(g, p)| g + weight_decay * p).collect();
                for i in 0..n {
                    // square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
                    square_avg[i] = square_avg[i] * alpha + (1.0 - alpha) * g[i] * g[i];
                    let avg = if centered {
                        // grad_avg.lerp_(grad, 1 - alpha); square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
                        grad_avg[i] += (g[i] - grad_avg[i]) * (1.0 - alpha);
                        (square_avg[i] - grad_avg[i] * grad_avg[i]).sqrt()
                    } else {
                        square_avg[i].sqrt()
                    } + eps;
                    if momentum > 0.0 {
                        rms_buf[i] = rms_buf[i] * momentum + g[i] / avg;
                        p[i] -= lr * rms_buf[i];
                    } else {
                        p[i] -= lr * g[i] / avg;
                    }
                }
            }
        }
        out.push(p.clone());
    }
    out
}

const QUADRATIC: &str = r#"
Model(
    name: "quadratic",
    inputs: { "t": (f64, [4]) },
    body: [ Let("p", Mul(Param(name: "w", shape: [4], dtype: f64, init: Normal(std: 1.0)), 1.0)) ],
    outputs: ["p"],
    training: Training(loss: Mse(pred: "p", target: "t"), optimizer: OPT SCHEDULE),
)
"#;

#[test]
fn ten_steps_match_the_torch_optim_update_loops() {
    let optimizers = [
        "Sgd(lr: 0.1)",
        "Sgd(lr: 0.1, momentum: 0.9, dampening: 0.1, weight_decay: 0.01)",
        "Sgd(lr: 0.05, momentum: 0.8, nesterov: true, weight_decay: 0.1)",
        "Adam(lr: 0.05)",
        "Adam(lr: 0.05, beta1: 0.8, beta2: 0.99, eps: 1e-6, weight_decay: 0.1)",
        "AdamW(lr: 0.05, weight_decay: 0.1)",
        "AdamW(lr: 0.05)",
        "RmsProp()",
        "RmsProp(lr: 0.02, momentum: 0.9)",
        "RmsProp(lr: 0.02, centered: true)",
        "RmsProp(lr: 0.02, weight_decay: 0.1)",
        "RmsProp(lr: 0.005, alpha: 0.9, eps: 1e-6, momentum: 0.5, weight_decay: 0.1, centered: true)",
    ];
    let target = [0.5, -1.0, 2.0, 0.0];
    for opt_text in optimizers {
        let l = lower_str(&QUADRATIC.replace("OPT", opt_text).replace("SCHEDULE", ""));
        let step = train_step(&l).unwrap_or_else(|e| panic!("{opt_text}: {e}"));
        let g = &step.graph;
        kiln_ir::verify(g).unwrap();
        let mut params = bind_params(g, None, 3, true).unwrap();
        let w0 = params["w"].to_f64_vec();
        let want = reference(&step.optimizer, &w0, &target, &[step.optimizer.lr(); 10]);
        let mut state: HashMap<String, Tensor> =
            step.optimizer.state_names().iter().map(|k| (format!("optim.{k}.w"), t64(&[0.0; 4]))).collect();
        let mut count = Tensor::from_f32(vec![], vec![0.0]).unwrap();
        let mut losses = Vec::new();
        for (i, want) in want.iter().enumerate() {
            let mut b = Bindings { params: params.clone(), ..Bindings::default() };
            b.inputs.insert("t".into(), t64(&target));
            b.inputs.insert("optim.step".into(), count.clone());
            b.inputs.extend(state.clone());
            let out = eval(g, &b).unwrap_or_else(|e| panic!("{opt_text}: {e}"));
            let get = |n: &str| {
                out.iter().find(|(k, _)| k == n).unwrap_or_else(|| panic!("no output {n}")).1.clone()
            };
            losses.push(get("loss").to_f64_vec()[0]);
            let w = get("param.w");
            close(&w.to_f64_vec(), want, 1e-12);
            params.insert("w".into(), w);
            for k in state.clone().keys() {
                state.insert(k.clone(), get(k));
            }
            count = get("optim.step");
            assert_eq!(count.to_f64_vec(), [(i + 1) as f64]);
        }
        assert!(losses[9] < losses[0], "{opt_text}: the loss did not fall: {losses:?}");
    }
}

#[test]
fn the_mlp_learns_a_batch_under_adam_and_its_schedule() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/mlp.ron");
    let sets = ["batch=8", "in=12", "hidden1=16", "hidden2=16", "classes=4"];
    let overrides: Vec<_> = sets.iter().map(|s| kiln_lower::Override::parse(s).unwrap()).collect();
    let (sources, r) = kiln_lower::load(&path, &overrides);
    let l = r.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
    let step = train_step(&l).unwrap();
    let g = &step.graph;
    let mut params = bind_params(g, None, 0, true).unwrap();
    let mut b = Bindings::default();
    let image: Vec<f32> = (0..96u64).map(|i| kiln_ir::rng::normal(1, 2, i) as f32).collect();
    b.inputs.insert("image".into(), Tensor::from_f32(vec![8, 12], image).unwrap());
    b.inputs.insert("label".into(), Tensor::new(vec![8], Buffer::I64(vec![0, 1, 2, 3, 3, 2, 1, 0])).unwrap());
    b.inputs.insert("optim.step".into(), Tensor::from_f32(vec![], vec![0.0]).unwrap());
    for &i in &g.inputs {
        if let Op::Input { name, dtype, shape } = &g.node(i).op {
            if name.starts_with("optim.") && name != "optim.step" {
                b.inputs.insert(
                    name.clone(),
                    Tensor::full(*dtype, kiln_ir::static_dims(shape).expect("static"), 0.0),
                );
            }
        }
    }
    let mut losses = Vec::new();
    for _ in 0..30 {
        b.params = params.clone();
        let out = eval(g, &b).unwrap();
        for (name, t) in out {
            match name.strip_prefix("param.") {
                Some(p) => {
                    params.insert(p.to_string(), t);
                }
                None if name == "loss" => losses.push(t.to_f64_vec()[0]),
                None => {
                    b.inputs.insert(name, t);
                }
            }
        }
    }
    // Adam at the model's lr of 1e-3 under its cosine schedule, whose warm-up starts at 0:
    // the first step changes nothing, then the loss on the batch falls at every step.
    assert!(losses.iter().all(|l| l.is_finite()));
    assert_eq!(losses[0], losses[1]);
    assert!(losses[1..].windows(2).all(|w| w[1] < w[0]), "{losses:?}");
    assert!(losses[29] < 0.99 * losses[0], "{losses:?}");
}

#[test]
fn nesterov_without_momentum_is_an_error() {
    let e = train_step(&lower_str(&QUADRATIC.replace("OPT", "Sgd(nesterov: true)").replace("SCHEDULE", "")))
        .unwrap_err();
    assert!(matches!(e, TrainingError::Optimizer(_)), "{e}");
    assert!(e.to_string().contains("Nesterov"), "{e}");
}

#[test]
fn rmsprop_state_is_graph_inputs_and_outputs() {
    let text = QUADRATIC.replace("OPT", "RmsProp(momentum: 0.9, centered: true)").replace("SCHEDULE", "");
    let step = train_step(&lower_str(&text)).unwrap();
    assert_eq!(
        step.optimizer,
        Optimizer::RmsProp {
            lr: 0.01,
            alpha: 0.99,
            eps: 1e-8,
            weight_decay: 0.0,
            momentum: 0.9,
            centered: true
        }
    );
    let g = &step.graph;
    let inputs: Vec<String> = g
        .inputs
        .iter()
        .filter_map(|&i| match &g.node(i).op {
            Op::Input { name, .. } => Some(name.clone()),
            _ => None,
        })
        .collect();
    let state = ["optim.square_avg.w", "optim.grad_avg.w", "optim.momentum.w"];
    assert_eq!(inputs, ["t", "optim.step", state[0], state[1], state[2]]);
    let outputs: Vec<&str> = g.outputs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(outputs, ["loss", "optim.lr", "param.w", state[0], state[1], state[2], "optim.step"]);
}

/// The schedules' formulas, written out: warm-up from 0, then linear, cosine down to
/// `min_lr`, or steps of `gamma`.
fn schedule_by_hand(lr: f64, s: &Schedule, step: f64) -> f64 {
    let warm = |w: f64| step < w;
    match *s {
        Schedule::Constant => lr,
        Schedule::Linear { warmup, .. } if warm(warmup) => lr * step / warmup,
        Schedule::Linear { warmup, total } => lr * ((total - step) / (total - warmup)).max(0.0),
        Schedule::Cosine { warmup, .. } if warm(warmup) => lr * step / warmup,
        Schedule::Cosine { warmup, total, min_lr } => {
            let progress = ((step - warmup) / (total - warmup)).min(1.0);
            min_lr + (lr - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
        Schedule::Step { step_size, gamma } => lr * gamma.powi((step / step_size).floor() as i32),
    }
}

#[test]
fn schedules_follow_their_formulas() {
    let schedules = [
        Schedule::Constant,
        Schedule::Linear { warmup: 3.0, total: 10.0 },
        Schedule::Linear { warmup: 0.0, total: 4.0 },
        Schedule::Cosine { warmup: 2.0, total: 9.0, min_lr: 0.01 },
        Schedule::Cosine { warmup: 0.0, total: 5.0, min_lr: 0.0 },
        Schedule::Step { step_size: 3.0, gamma: 0.5 },
    ];
    for s in &schedules {
        let mut g = Graph::new("lr");
        let step = g
            .add(Op::Input { name: "step".into(), dtype: DType::F32, shape: kiln_ir::dims(&[]) }, &[])
            .unwrap();
        let lr = learning_rate(&mut g, 0.1, s, step, DType::F64).unwrap();
        g.add_output("lr", lr);
        for k in [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 7.0, 9.0, 10.0, 12.0] {
            let mut b = Bindings::default();
            b.inputs.insert("step".into(), Tensor::from_f32(vec![], vec![k as f32]).unwrap());
            let got = eval(&g, &b).unwrap()[0].1.to_f64_vec()[0];
            let want = schedule_by_hand(0.1, s, k);
            assert!((got - want).abs() < 1e-15, "{s:?} at step {k}: {got} vs {want}");
        }
    }
}

#[test]
fn ten_steps_under_a_schedule_match_the_torch_optim_update_loops() {
    let cases = [
        (
            "Sgd(lr: 0.2, momentum: 0.5)",
            "Linear(warmup: 2, total: 8)",
            Schedule::Linear { warmup: 2.0, total: 8.0 },
        ),
        (
            "AdamW(lr: 0.05, weight_decay: 0.1)",
            "Cosine(warmup: 3, total: 10, min_lr: 0.001)",
            Schedule::Cosine { warmup: 3.0, total: 10.0, min_lr: 0.001 },
        ),
        ("Adam(lr: 0.05)", "Step(step_size: 4, gamma: 0.5)", Schedule::Step { step_size: 4.0, gamma: 0.5 }),
    ];
    let target = [0.5, -1.0, 2.0, 0.0];
    for (opt_text, schedule_text, schedule) in cases {
        let text =
            QUADRATIC.replace("OPT", opt_text).replace("SCHEDULE", &format!(", schedule: {schedule_text}"));
        let step = train_step(&lower_str(&text)).unwrap();
        assert_eq!(step.schedule, schedule);
        let g = &step.graph;
        let mut params = bind_params(g, None, 3, true).unwrap();
        let lrs: Vec<f64> =
            (0..10).map(|k| schedule_by_hand(step.optimizer.lr(), &schedule, k as f64)).collect();
        let want = reference(&step.optimizer, &params["w"].to_f64_vec(), &target, &lrs);
        let mut state: HashMap<String, Tensor> =
            step.optimizer.state_names().iter().map(|k| (format!("optim.{k}.w"), t64(&[0.0; 4]))).collect();
        for (k, want) in want.iter().enumerate() {
            let mut b = Bindings { params: params.clone(), ..Bindings::default() };
            b.inputs.insert("t".into(), t64(&target));
            b.inputs.insert("optim.step".into(), Tensor::from_f32(vec![], vec![k as f32]).unwrap());
            b.inputs.extend(state.clone());
            let out = eval(g, &b).unwrap();
            let get = |n: &str| out.iter().find(|(o, _)| o == n).unwrap().1.clone();
            assert!((get("optim.lr").to_f64_vec()[0] - lrs[k]).abs() < 1e-15, "{schedule_text} at {k}");
            let w = get("param.w");
            close(&w.to_f64_vec(), want, 1e-12);
            if k == 0 && schedule_text.starts_with("Linear") {
                // A warm-up starts at 0: the first step leaves the parameter alone.
                assert_eq!(w.to_f64_vec(), params["w"].to_f64_vec());
            }
            params.insert("w".into(), w);
            for name in state.clone().keys() {
                state.insert(name.clone(), get(name));
            }
        }
    }
}

/// `w + b` against `t` under MSE and plain SGD, so the gradients are easy to write out.
const CLIPPED: &str = r#"
Model(
    name: "clipped",
    inputs: { "t": (f64, [4]) },
    body: [
        Let("p", Add(
            Param(name: "w", shape: [4], dtype: f64, init: Normal(std: 1.0)),
            Param(name: "b", shape: [1], dtype: f64, init: Normal(std: 1.0)),
        )),
    ],
    outputs: ["p"],
    training: Training(loss: Mse(pred: "p", target: "t"), optimizer: Sgd(lr: 0.1), clip_grad_norm: MAX),
)
"#;

#[test]
fn clipping_scales_every_gradient_by_the_global_norm() {
    let (w, b, t) = ([1.0, 2.0, 3.0, 4.0], [0.5], [0.5, -1.0, 2.0, 0.0]);
    // p − t = [1, 3.5, 1.5, 4.5]; the gradient of the mean of squares is 2(p − t)/4 for `w`
    // and its sum for `b`: Σ gw² = 8.9375, gb² = 27.5625, so the norm is √36.5 ≈ 6.04.
    let gw = [0.5, 1.75, 0.75, 2.25];
    let gb = [5.25];
    let norm = 36.5f64.sqrt();
    for (max_norm, clipped) in [(1.0, true), (2.5, true), (10.0, false), (1e6, false)] {
        let text = CLIPPED.replace("MAX", &max_norm.to_string());
        let l = lower_str(&text);
        assert_eq!(l.training.as_ref().unwrap().clip_grad_norm, Some(max_norm));
        let step = train_step(&l).unwrap();
        let g = &step.graph;
        kiln_ir::verify(g).unwrap();
        let mut bind = Bindings::default();
        bind.params.insert("w".into(), t64(&w));
        bind.params.insert("b".into(), t64(&b));
        bind.inputs.insert("t".into(), t64(&t));
        bind.inputs.insert("optim.step".into(), Tensor::from_f32(vec![], vec![0.0]).unwrap());
        let out = eval(g, &bind).unwrap();
        let get =
            |n: &str| out.iter().find(|(k, _)| k == n).unwrap_or_else(|| panic!("no {n}")).1.to_f64_vec();
        close(&get("optim.grad_norm"), &[norm], 1e-15);
        // clip_coef = max_norm / (norm + 1e-6), clamped to 1.
        let coef = if clipped { max_norm / (norm + 1e-6) } else { 1.0 };
        assert_eq!(clipped, max_norm / (norm + 1e-6) < 1.0);
        let sgd =
            |p: &[f64], d: &[f64]| -> Vec<f64> { p.iter().zip(d).map(|(p, d)| p - 0.1 * coef * d).collect() };
        close(&get("param.w"), &sgd(&w, &gw), 1e-15);
        close(&get("param.b"), &sgd(&b, &gb), 1e-15);
        if clipped {
            // The clipped gradients' norm is max_norm (up to the 1e-6 in the divisor).
            let moved: f64 = get("param.w")
                .iter()
                .zip(&w)
                .chain(get("param.b").iter().zip(&b))
                .map(|(new, old)| ((old - new) / 0.1).powi(2))
                .sum::<f64>()
                .sqrt();
            assert!((moved - max_norm).abs() < 1e-6, "{moved} vs {max_norm}");
        }
    }
    // Without `clip_grad_norm` there is no norm output.
    let plain = lower_str(&CLIPPED.replace(", clip_grad_norm: MAX", ""));
    assert_eq!(plain.training.as_ref().unwrap().clip_grad_norm, None);
    let step = train_step(&plain).unwrap();
    assert!(!step.graph.outputs.iter().any(|(n, _)| n == "optim.grad_norm"));
}

/// A small network with dropout (the config `training` is true), two heads and a loss on
/// one of them; `batch` is set per test.
const MICRO: &str = r#"
Model(
    name: "micro",
    config: { "batch": 6, "training": true },
    inputs: { "x": (f64, ["batch", 3]), "t": (f64, ["batch", 2]), "y": (i64, ["batch"]) },
    use: ["std"],
    body: [
        Let("h", Tanh(MatMul("x", Param(name: "w", shape: [3, 4], dtype: f64, init: Normal(std: 1.0))))),
        Let("h", Add("h", Param(name: "c", shape: [4], dtype: f64, init: Normal(std: 1.0)))),
        Let("h", Call(fn: "std.dropout", args: ["h"], with: { "p": 0.25 })),
        Let("logits", MatMul("h", Param(name: "v", shape: [4, 3], dtype: f64, init: Normal(std: 1.0)))),
        Let("pred", MatMul("h", Param(name: "u", shape: [4, 2], dtype: f64, init: Normal(std: 1.0)))),
    ],
    outputs: ["logits", "pred"],
    training: Training(loss: LOSS, optimizer: OPT, TAIL),
)
"#;

/// A train step's dropout draws from counter `optim.step × span` on, so consecutive steps draw
/// different masks and a step count always draws the same one (a resumed run's included).
#[test]
fn each_train_step_draws_a_new_dropout_mask() {
    let text = MICRO.replace("LOSS", "Mse(pred: \"pred\", target: \"t\")").replace("OPT", "Sgd(lr: 0.1)");
    let (sources, r) = kiln_lower::load_str("micro.ron", &text.replace(", TAIL", ""), &[]);
    let lowered = r.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
    let mut g = train_step(&lowered).unwrap().graph;
    let draws: Vec<_> = g.node_ids().filter(|&n| matches!(g.node(n).op, Op::RandomUniform { .. })).collect();
    let [draw] = draws[..] else { panic!("one dropout: {draws:?}") };
    let Op::RandomUniform { seed, offset, base: true, .. } = g.node(draw).op else {
        panic!("the train step's draw reads a counter base: {:?}", g.node(draw).op)
    };
    // The base is optim.step (cast to i64) times the 6 × 4 counters the mask uses.
    let base = g.operands(draw)[0];
    assert_eq!(g.ty(base).to_string(), "i64[]");
    g.outputs = vec![("u".into(), draw)];
    kiln_ir::verify(&g).unwrap();
    let at = |step: f32| {
        let params = bind_params(&g, None, 5, true).unwrap();
        let mut b = Bindings { inputs: kiln_ir::seeded_inputs(&g, 5), params };
        b.inputs.insert("optim.step".into(), Tensor::from_f32(vec![], vec![step]).unwrap());
        eval(&g, &b).unwrap().remove(0).1.to_f64_vec()
    };
    let want = |step: u64| {
        (0..24).map(|i| kiln_ir::rng::uniform(seed, 0, offset + 24 * step + i)).collect::<Vec<_>>()
    };
    let want32 = |step: u64| want(step).iter().map(|&u| f64::from(u as f32)).collect::<Vec<_>>();
    assert_eq!(at(0.0), want32(0), "step 0 draws what the spec's own op draws");
    assert_eq!(at(1.0), want32(1));
    assert_eq!(at(7.0), want32(7));
    assert_ne!(at(0.0), at(1.0), "consecutive steps draw different masks");
    assert_eq!(at(3.0), at(3.0), "a step count always draws the same mask");
}

#[test]
fn k_micro_batches_make_the_step_of_a_batch_k_times_larger() {
    let cases = [
        (
            "CrossEntropy(logits: \"logits\", labels: \"y\", label_smoothing: 0.1)",
            "Adam(lr: 0.05)",
            "clip_grad_norm: 0.5",
        ),
        (
            "Mse(pred: \"pred\", target: \"t\")",
            "Sgd(lr: 0.1, momentum: 0.9)",
            "schedule: Linear(warmup: 1, total: 5)",
        ),
        ("Mse(pred: \"pred\", target: \"t\")", "RmsProp(lr: 0.01, centered: true)", "clip_grad_norm: 0.1"),
    ];
    let (k, micro) = (3usize, 2usize);
    let rows = k * micro;
    let x: Vec<f64> = (0..rows as u64 * 3).map(|i| kiln_ir::rng::normal(7, 1, i)).collect();
    let t: Vec<f64> = (0..rows as u64 * 2).map(|i| kiln_ir::rng::normal(7, 2, i)).collect();
    let y: Vec<i64> = (0..rows as i64).map(|i| (i * 5 + 1) % 3).collect();
    for (loss, opt, tail) in cases {
        let text = MICRO.replace("LOSS", loss).replace("OPT", opt);
        let large = lower_str(&text.replace("TAIL", tail));
        let set = [kiln_lower::Override::parse(&format!("batch={micro}")).unwrap()];
        let (sources, r) = kiln_lower::load_str(
            "micro.ron",
            &text.replace("TAIL", &format!("{tail}, accumulate: {k}")),
            &set,
        );
        let small = r.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
        assert_eq!(small.training.as_ref().unwrap().accumulate, k);
        let (tl, ts) = (training_graph(&large).unwrap(), training_graph(&small).unwrap());
        let (large, small) = (train_step(&large).unwrap(), train_step(&small).unwrap());
        let (gl, gs) = (&large.graph, &small.graph);
        kiln_ir::verify(&ts.graph).unwrap();
        kiln_ir::verify(gs).unwrap();
        // Every model input and output gains a leading axis of K micro-batches; each
        // micro-batch draws its own dropout mask.
        let input = |g: &Graph, name: &str| {
            let n =
                g.inputs.iter().find(|&&n| matches!(&g.node(n).op, Op::Input { name: m, .. } if m == name));
            g.ty(*n.unwrap_or_else(|| panic!("no {name}"))).shape.clone()
        };
        let output = |g: &Graph, name: &str| {
            let n = g.outputs.iter().find(|(o, _)| o == name).unwrap_or_else(|| panic!("no {name}")).1;
            g.ty(n).shape.clone()
        };
        assert_eq!(input(gs, "x"), [k, micro, 3]);
        assert_eq!(input(gs, "y"), [k, micro]);
        assert_eq!(output(&ts.graph, "logits"), [k, micro, 3]);
        assert_eq!(output(&ts.graph, "pred"), [k, micro, 2]);
        let random =
            |g: &Graph| g.node_ids().filter(|&n| matches!(g.node(n).op, Op::RandomUniform { .. })).count();
        assert_eq!((random(gl), random(gs)), (1, k));

        let params = bind_params(gl, None, 5, true).unwrap();
        let bind = |g: &Graph, shape: &[usize]| {
            let mut b = Bindings { params: params.clone(), ..Bindings::default() };
            let lead = |rest: &[usize]| shape.iter().chain(rest).copied().collect::<Vec<_>>();
            b.inputs.insert("x".into(), Tensor::from_f64(lead(&[3]), x.clone()).unwrap());
            b.inputs.insert("t".into(), Tensor::from_f64(lead(&[2]), t.clone()).unwrap());
            b.inputs.insert("y".into(), Tensor::new(lead(&[]), Buffer::I64(y.clone())).unwrap());
            b.inputs.insert("optim.step".into(), Tensor::from_f32(vec![], vec![0.0]).unwrap());
            for &i in &g.inputs {
                if let Op::Input { name, dtype, shape } = &g.node(i).op {
                    if name.starts_with("optim.") && name != "optim.step" {
                        b.inputs.insert(
                            name.clone(),
                            Tensor::full(*dtype, kiln_ir::static_dims(shape).expect("static"), 0.0),
                        );
                    }
                }
            }
            b
        };
        let (mut bl, mut bs) = (bind(gl, &[rows]), bind(gs, &[k, micro]));
        // The training graphs: the model's outputs (stacked), the loss and every gradient.
        let (ol, os) = (eval(&tl.graph, &bl).unwrap(), eval(&ts.graph, &bs).unwrap());
        assert_eq!(ol.len(), os.len());
        for ((name, a), (other, b)) in ol.iter().zip(&os) {
            assert_eq!(name, other);
            close(&b.to_f64_vec(), &a.to_f64_vec(), 1e-12);
        }
        for step in 0..4 {
            let (ol, os) = (eval(gl, &bl).unwrap(), eval(gs, &bs).unwrap());
            if let Some(max) = tail.strip_prefix("clip_grad_norm: ") {
                // The clipping cases clip at the first step.
                let norm = ol.iter().find(|(n, _)| n == "optim.grad_norm").unwrap().1.to_f64_vec()[0];
                assert!(step > 0 || norm > max.parse::<f64>().unwrap(), "{opt}: {norm}");
            }
            let names: Vec<&str> = ol.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names, os.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>());
            for ((name, a), (_, b)) in ol.iter().zip(&os) {
                let (a, b) = (a.to_f64_vec(), b.to_f64_vec());
                assert!(a.iter().all(|v| v.is_finite()), "{opt}, step {step}: {name} = {a:?}");
                close(&b, &a, 1e-12);
            }
            for (b, out) in [(&mut bl, ol), (&mut bs, os)] {
                for (name, v) in out {
                    match name.strip_prefix("param.") {
                        Some(p) => {
                            b.params.insert(p.to_string(), v);
                        }
                        None if name.starts_with("optim.")
                            && name != "optim.lr"
                            && name != "optim.grad_norm" =>
                        {
                            b.inputs.insert(name, v);
                        }
                        None => {}
                    }
                }
            }
        }
        // The parameters moved.
        assert!(bl.params["w"].to_f64_vec() != params["w"].to_f64_vec(), "{opt}");
    }
}

#[test]
fn bad_clipping_and_accumulation_values_are_errors_at_the_value() {
    let cases = [
        ("clip_grad_norm: 0", "`clip_grad_norm` must be a finite number > 0, got 0"),
        ("clip_grad_norm: -1.5", "`clip_grad_norm` must be a finite number > 0, got -1.5"),
        ("clip_grad_norm: true", "`clip_grad_norm` must be a number, not a bool"),
        ("accumulate: 0", "`accumulate` must be a number of micro-batches from 1 to 1024, got 0"),
        ("accumulate: 5000", "got 5000"),
        ("accumulate: 2.5", "`accumulate`"),
        ("accumulat: 2", "accumulat"),
    ];
    assert_eq!(MAX_ACCUMULATE, 1024);
    for (field, want) in cases {
        let text = QUADRATIC.replace("OPT", "Sgd()").replace("SCHEDULE", &format!(", {field}"));
        let (sources, r) = kiln_lower::load_str("optim.ron", &text, &[]);
        let d = r.expect_err(field);
        let rendered = d.0.iter().map(|d| d.render(&sources)).collect::<String>();
        assert!(rendered.contains(want), "{field}: {rendered}");
        // The error points at the value (or the unknown field) in the training section.
        assert!(rendered.contains(field), "{field}: {rendered}");
    }
}

#[test]
fn accumulating_past_the_op_limit_is_an_error() {
    // About 2,000 ops unrolled 1,024 times is past the 2,000,000 ops of a lowered model.
    let text = r#"
Model(
    name: "deep",
    inputs: { "t": (f64, [4]) },
    body: [
        Let("p", Mul(Param(name: "w", shape: [4], dtype: f64, init: Normal(std: 1.0)), 1.0)),
        Repeat(n: 2000, body: [ Let("p", Mul("p", 1.0)) ]),
    ],
    outputs: ["p"],
    training: Training(loss: Mse(pred: "p", target: "t"), optimizer: Sgd(), accumulate: 1024),
)
"#;
    let e = train_step(&lower_str(text)).unwrap_err();
    assert!(matches!(e, TrainingError::TooLarge { accumulate: 1024, limit: 2_000_000, .. }), "{e}");
    assert!(e.to_string().contains("accumulate fewer"), "{e}");
}
