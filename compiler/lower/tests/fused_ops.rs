//! The fused ops called directly from the model language: they parse, lower to one IR op
//! each with the right attributes and defaults, evaluate like the std layers they stand for,
//! and report mistakes in their arguments.

use kiln_ir::{bind_params, eval, Activation, Bindings, GeluApprox, Graph, NormKind, Op, Tensor};

fn lower(text: &str) -> Graph {
    let (sources, result) = kiln_lower::load_str("fused.ron", text, &[]);
    match result {
        Ok(l) => l.graph,
        Err(d) => panic!("{}", d.render(&sources)),
    }
}

fn errors(text: &str) -> String {
    let (sources, result) = kiln_lower::load_str("bad.ron", text, &[]);
    match result {
        Ok(_) => panic!("expected errors"),
        Err(d) => d.render(&sources),
    }
}

/// Every input filled with seeded normal values, every parameter from its initializer.
fn run(g: &Graph) -> Vec<(String, Tensor)> {
    let mut b = Bindings::default();
    for &i in &g.inputs {
        let Op::Input { name, dtype, .. } = &g.node(i).op else { unreachable!() };
        let shape = g.ty(i).static_shape();
        let stream = kiln_ir::rng::stream_of(name);
        let n: usize = shape.iter().product();
        let v = (0..n as u64).map(|j| kiln_ir::rng::normal(5, stream, j));
        b.inputs
            .insert(name.clone(), Tensor::new(shape.clone(), kiln_ir::Buffer::from_f64(*dtype, v)).unwrap());
    }
    b.params = bind_params(g, None, 0, true).unwrap();
    eval(g, &b).unwrap_or_else(|e| panic!("{e}"))
}

/// The op of the node bound to output `name`.
fn op_of<'g>(g: &'g Graph, name: &str) -> &'g Op {
    let id = g.outputs.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no output {name}")).1;
    &g.node(id).op
}

const EVERY_OP: &str = r#"
// Every fused op, called directly.
Model(
    name: "fused",
    inputs: {
        "x": (f32, [2, 5, 8]), "m": (f32, [8, 4]), "g": (f32, [8]), "b": (f32, [8]), "c": (f32, [4]),
        "q": (f32, [2, 3, 5, 4]), "k": (f32, [2, 3, 6, 4]), "v": (f32, [2, 3, 6, 7]), "mask": (f32, [2, 1, 1, 6]),
    },
    body: [
        Let("s", Softmax("x")),
        Let("s1", Softmax(x: "x", axis: 0)),
        Let("ls", LogSoftmax(x: "x", axis: -2)),
        Let("ln", LayerNorm("x", "g", "b")),
        Let("ln0", LayerNorm(x: "x", eps: "1e-3 * 2")),
        Let("rn", RmsNorm(x: "x", gamma: "g")),
        Let("rn0", RmsNorm("x")),
        Let("ge", Gelu("x")),
        Let("gt", Gelu(x: "x", approx: tanh)),
        Let("gq", Gelu(x: "x", approx: "erf")),
        Let("at", Attention(q: "q", k: "k", v: "v", mask: "mask", causal: true)),
        Let("at0", Attention("q", "k", "v")),
        Let("at1", Attention(q: "q", k: "k", v: "v", mask: 0.0, scale: 0.125)),
        Let("an", AddNorm(a: "x", b: "b", gamma: "g", beta: "b")),
        Let("an0", AddNorm("x", "x")),
        Let("ar", AddNorm(a: "x", b: 1.0, gamma: "g", rms: true, eps: 1e-6)),
        Let("me", MatMulEpilogue(a: "x", b: "m", bias: "c", activation: gelu_tanh)),
        Let("me0", MatMulEpilogue("x", "m")),
        Let("me1", MatMulEpilogue(a: "x", b: "m", activation: sigmoid)),
    ],
    outputs: ["s", "s1", "ls", "ln", "ln0", "rn", "rn0", "ge", "gt", "gq", "at", "at0", "at1", "an", "an0", "ar", "me", "me0", "me1"],
)
"#;

#[test]
fn every_fused_op_lowers_to_one_op_with_its_attributes() {
    let g = lower(EVERY_OP);
    assert_eq!(op_of(&g, "s"), &Op::Softmax { axis: 2 });
    assert_eq!(op_of(&g, "s1"), &Op::Softmax { axis: 0 });
    assert_eq!(op_of(&g, "ls"), &Op::LogSoftmax { axis: 1 });
    assert_eq!(op_of(&g, "ln"), &Op::LayerNorm { eps: 1e-5, affine: true });
    assert_eq!(op_of(&g, "ln0"), &Op::LayerNorm { eps: 2e-3, affine: false });
    assert_eq!(op_of(&g, "rn"), &Op::RmsNorm { eps: 1e-6, affine: true });
    assert_eq!(op_of(&g, "rn0"), &Op::RmsNorm { eps: 1e-6, affine: false });
    assert_eq!(op_of(&g, "ge"), &Op::Gelu { approx: GeluApprox::Erf });
    assert_eq!(op_of(&g, "gt"), &Op::Gelu { approx: GeluApprox::Tanh });
    assert_eq!(op_of(&g, "gq"), &Op::Gelu { approx: GeluApprox::Erf });
    // The scale defaults to 1/√d with d = 4.
    assert_eq!(op_of(&g, "at"), &Op::Attention { scale: 0.5, causal: true, masked: true });
    assert_eq!(op_of(&g, "at0"), &Op::Attention { scale: 0.5, causal: false, masked: false });
    assert_eq!(op_of(&g, "at1"), &Op::Attention { scale: 0.125, causal: false, masked: true });
    assert_eq!(op_of(&g, "an"), &Op::AddNorm { eps: 1e-5, kind: NormKind::Layer, affine: true });
    assert_eq!(op_of(&g, "an0"), &Op::AddNorm { eps: 1e-5, kind: NormKind::Layer, affine: false });
    assert_eq!(op_of(&g, "ar"), &Op::AddNorm { eps: 1e-6, kind: NormKind::Rms, affine: true });
    assert_eq!(
        op_of(&g, "me"),
        &Op::MatMulEpilogue { bias: true, activation: Activation::Gelu(GeluApprox::Tanh) }
    );
    assert_eq!(op_of(&g, "me0"), &Op::MatMulEpilogue { bias: false, activation: Activation::None });
    assert_eq!(op_of(&g, "me1"), &Op::MatMulEpilogue { bias: false, activation: Activation::Sigmoid });
    kiln_ir::verify(&g).unwrap();

    let out = run(&g);
    for (name, t) in &out {
        let id = g.outputs.iter().find(|(n, _)| n == name).unwrap().1;
        assert_eq!(t.shape, g.ty(id).static_shape(), "{name}");
        assert!(t.to_f64_vec().iter().all(|v| v.is_finite()), "{name} has non-finite values");
    }
    let text = kiln_ir::print::to_text(&g, Default::default());
    assert!(
        text.contains(
            "attention(%5, %6, %7, %8) {scale = 0.5, causal = true, masked = true} : f32[2, 3, 5, 7]  # at"
        ),
        "{text}"
    );
}

/// The fused ops against the std layers and primitive forms they stand for, in one model.
#[test]
fn fused_ops_evaluate_like_the_std_layers() {
    let g = lower(
        r#"
// Fused ops next to their unfused forms.
Model(
    name: "pairs",
    config: { "heads": 2 },
    inputs: { "x": (f32, [2, 6, 8]), "y": (f32, [2, 6, 8]), "m": (f32, [8, 5]), "c": (f32, [5]), "keep": (f32, [2, 6]) },
    use: ["std"],
    body: [
        Let("f_softmax", Softmax("x")),
        Let("p_softmax", Call(fn: "std.softmax", args: ["x"])),
        Let("f_layer_norm", LayerNorm("x")),
        Let("p_layer_norm", Call(fn: "std.layer_norm", args: ["x"], scope: "ln")),
        Let("f_rms_norm", RmsNorm("x")),
        Let("p_rms_norm", Call(fn: "std.rms_norm", args: ["x"], scope: "rms")),
        Let("f_gelu", Gelu("x")),
        Let("p_gelu", Call(fn: "std.gelu", args: ["x"])),
        Let("f_gelu_tanh", Gelu(x: "x", approx: tanh)),
        Let("p_gelu_tanh", Call(fn: "std.gelu_tanh", args: ["x"])),
        Let("f_add_norm", AddNorm("x", "y")),
        Let("p_add_norm", Call(fn: "std.add_norm", args: ["x", "y"], scope: "an")),
        Let("f_epilogue", MatMulEpilogue(a: "x", b: "m", bias: "c", activation: relu)),
        Let("p_epilogue", Relu(Add(MatMul("x", "m"), "c"))),
        Let("f_log_softmax", LogSoftmax("x")),
        Let("p_log_softmax", Sub(Sub("x", ReduceMax(x: "x", axes: -1, keepdims: true)),
            Log(Sum(x: Exp(Sub("x", ReduceMax(x: "x", axes: -1, keepdims: true))), axes: -1, keepdims: true)))),
        // std.attention splits heads itself; the fused form gets them split.
        Let("mask", Call(fn: "std.padding_mask", args: ["keep"])),
        Let("p_attention", Call(fn: "std.attention", args: ["x", "y", "y", "mask"], with: { "heads": "heads", "causal": true })),
        Let("q", Transpose(x: Reshape("x", [2, 6, "heads", 4]), perm: [0, 2, 1, 3])),
        Let("kv", Transpose(x: Reshape("y", [2, 6, "heads", 4]), perm: [0, 2, 1, 3])),
        Let("a", Attention(q: "q", k: "kv", v: "kv", mask: "mask", causal: true)),
        Let("f_attention", Reshape(Transpose(x: "a", perm: [0, 2, 1, 3]), [2, 6, 8])),
    ],
    outputs: ["f_softmax", "p_softmax", "f_layer_norm", "p_layer_norm", "f_rms_norm", "p_rms_norm",
              "f_gelu", "p_gelu", "f_gelu_tanh", "p_gelu_tanh", "f_add_norm", "p_add_norm",
              "f_epilogue", "p_epilogue", "f_log_softmax", "p_log_softmax", "f_attention", "p_attention"],
)
"#,
    );
    let out = run(&g);
    for pair in out.chunks(2) {
        let ((fname, f), (pname, p)) = (&pair[0], &pair[1]);
        assert_eq!(fname[2..], pname[2..]);
        let diff = f.max_abs_diff(p).unwrap_or_else(|| panic!("{fname}: shapes differ"));
        // The same steps in the same order agree exactly; attention divides by √d where the
        // fused op multiplies by 1/√d.
        let tol = if fname == "f_attention" { 1e-6 } else { 0.0 };
        assert!(diff <= tol, "{fname} vs {pname}: max difference {diff:e}");
    }
}

#[test]
fn argument_mistakes_are_reported() {
    let text = errors(
        r#"
Model(
    name: "bad",
    inputs: {
        "x": (f32, [2, 5, 8]), "g": (f32, [4]), "b": (f32, [8]),
        "q": (f32, [2, 3, 5, 4]), "k": (f32, [2, 2, 6, 4]), "v": (f32, [2, 3, 6, 7]), "mask": (f32, [2, 5, 5]),
    },
    body: [
        Let("a", Gelu(x: "x", approx: tanhh)),
        Let("c", LayerNorm(x: "x", gamma: "b")),
        Let("d", LayerNorm("x", "g", "b")),
        Let("e", Attention("q", "k", "v")),
        Let("f", Attention(q: "q", k: "q", v: "q", mask: "mask")),
        Let("h", AddNorm(a: "x", b: "x", gamma: "b", beta: "b", rms: true)),
        Let("i", AddNorm(a: "x", b: "x", beta: "b")),
        Let("j", MatMulEpilogue(a: "x", b: "x", activation: 3)),
        Let("k2", MatMulEpilogue(a: "x", b: Transpose("x"), activation: softmax)),
        Let("l", Softmax(x: "x", axis: 3)),
        Let("n", RmsNorm(x: "x", eps: true)),
        Let("o", Attention(q: "q", k: "q", v: "q", causal: 1)),
    ],
    outputs: ["a"],
)
"#,
    );
    for want in [
        "error: `tanhh` is not a valid `approx` of `Gelu`",
        "= did you mean `tanh`?",
        "error: `LayerNorm` takes both `gamma` and `beta`, or neither",
        "error: `layer_norm`: gamma must have shape [8] (the last axis of [2, 5, 8]), got [4]",
        "error: `attention`: the batch axes of q, k and v differ",
        "error: `attention`: the mask [2, 5, 5] does not broadcast to the scores [2, 3, 5, 5]",
        "error: `AddNorm` with `rms: true` takes `gamma` but no `beta`",
        "error: `AddNorm` takes both `gamma` and `beta`, or neither",
        "error: expected one of none, relu, gelu, gelu_tanh, sigmoid, tanh, silu, found the integer 3",
        "error: `softmax` is not a valid `activation` of `MatMulEpilogue`",
        "error: axis 3 is out of range for a tensor of rank 3",
        "error: `eps` must be a number, not a bool",
        "error: `causal` must be a bool, but it is 1",
    ] {
        assert!(text.contains(want), "missing `{want}` in:\n{text}");
    }
}

/// Odd calls return errors (or a graph), never panic.
#[test]
fn odd_calls_do_not_panic() {
    let calls = [
        "Softmax(1.0)",
        "Softmax(x: \"s\", axis: 0)",
        "LogSoftmax(x: \"x\", axis: -4)",
        "LayerNorm(\"s\")",
        "LayerNorm(x: 1.0, gamma: 2.0, beta: 3.0)",
        "LayerNorm(x: \"x\", gamma: \"i\", beta: \"i\")",
        "RmsNorm(x: \"x\", gamma: 1.0)",
        "RmsNorm(x: \"x\", eps: \"1 / 0\")",
        "Gelu(\"i\")",
        "Gelu(x: \"x\", approx: [1])",
        "Attention(\"s\", \"s\", \"s\")",
        "Attention(\"x\", \"x\", \"x\", 1.0, \"sqrt(-1)\")",
        "Attention(q: \"x\", k: \"x\", v: \"x\", mask: \"i\")",
        "Attention(q: Split(x: \"x\", axis: 0, sizes: 2), k: \"x\", v: \"x\")",
        "Attention(q: \"nope\", k: \"nope2\", v: \"x\", mask: \"nope3\")",
        "AddNorm(1.0, 2.0)",
        "AddNorm(a: \"x\", b: \"s\", gamma: \"x\", beta: \"x\")",
        "AddNorm(a: \"x\", b: \"x\", rms: \"x\")",
        "MatMulEpilogue(\"s\", \"s\")",
        "MatMulEpilogue(a: \"x\", b: Transpose(\"x\"), bias: \"x\", activation: \"relu\")",
        "MatMulEpilogue(a: \"i\", b: \"i\")",
    ];
    for call in calls {
        let text = format!(
            "Model(name: \"m\", inputs: {{ \"x\": (f32, [2, 3, 4]), \"s\": (f32, []), \"i\": (i32, [4]) }}, body: [ Let(\"y\", {call}) ], outputs: [\"y\"])"
        );
        let (sources, result) = kiln_lower::load_str("odd.ron", &text, &[]);
        if let Err(d) = result {
            let _ = d.render(&sources);
        }
    }
}
