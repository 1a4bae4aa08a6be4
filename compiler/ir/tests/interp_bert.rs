//! End-to-end check that the interpreter runs a small BERT encoder (6 layers, hidden 384,
//! sequence 128, FFN 1536, 12 heads) quickly and deterministically.

use kiln_ir::{
    bind_params, eval, BinaryOp, Bindings, DType, Graph, Init, NodeId, Op, ReduceOp, Tensor, UnaryOp,
};

const LAYERS: usize = 6;
const HIDDEN: usize = 384;
const SEQ: usize = 128;
const FFN: usize = 1536;
const HEADS: usize = 12;
const HEAD: usize = HIDDEN / HEADS;
const VOCAB: usize = 1000;

struct B {
    g: Graph,
}

impl B {
    fn add(&mut self, op: Op, args: &[NodeId]) -> NodeId {
        self.g.add(op, args).unwrap_or_else(|e| panic!("{e}"))
    }
    fn param(&mut self, name: &str, shape: &[usize], init: Init) -> NodeId {
        self.add(Op::Param { name: name.into(), dtype: DType::F32, shape: kiln_ir::dims(shape), init }, &[])
    }
    fn bin(&mut self, op: BinaryOp, a: NodeId, b: NodeId) -> NodeId {
        self.add(Op::Binary(op), &[a, b])
    }
    fn scalar(&mut self, v: f64) -> NodeId {
        self.add(Op::Full { value: v, dtype: DType::F32, shape: kiln_ir::dims(&[]) }, &[])
    }
    fn linear(&mut self, x: NodeId, name: &str, i: usize, o: usize) -> NodeId {
        let w = self.param(&format!("{name}.weight"), &[i, o], Init::Normal { mean: 0.0, std: 0.02 });
        let b = self.param(&format!("{name}.bias"), &[o], Init::Zeros);
        let y = self.add(Op::MatMul, &[x, w]);
        self.bin(BinaryOp::Add, y, b)
    }
    fn layer_norm(&mut self, x: NodeId, name: &str) -> NodeId {
        let mean = self.add(Op::Reduce { op: ReduceOp::Mean, axes: vec![2], keepdims: true }, &[x]);
        let xc = self.bin(BinaryOp::Sub, x, mean);
        let sq = self.bin(BinaryOp::Mul, xc, xc);
        let var = self.add(Op::Reduce { op: ReduceOp::Mean, axes: vec![2], keepdims: true }, &[sq]);
        let eps = self.scalar(1e-12);
        let ve = self.bin(BinaryOp::Add, var, eps);
        let rs = self.add(Op::Unary(UnaryOp::Rsqrt), &[ve]);
        let xn = self.bin(BinaryOp::Mul, xc, rs);
        let gamma = self.param(&format!("{name}.gamma"), &[HIDDEN], Init::Ones);
        let beta = self.param(&format!("{name}.beta"), &[HIDDEN], Init::Zeros);
        let y = self.bin(BinaryOp::Mul, xn, gamma);
        self.bin(BinaryOp::Add, y, beta)
    }
    fn heads(&mut self, x: NodeId, perm: Vec<usize>) -> NodeId {
        let r = self.add(Op::Reshape { shape: kiln_ir::dims(&[1, SEQ, HEADS, HEAD]) }, &[x]);
        self.add(Op::Transpose { perm }, &[r])
    }
    fn softmax(&mut self, x: NodeId) -> NodeId {
        let m = self.add(Op::Reduce { op: ReduceOp::Max, axes: vec![3], keepdims: true }, &[x]);
        let xm = self.bin(BinaryOp::Sub, x, m);
        let e = self.add(Op::Unary(UnaryOp::Exp), &[xm]);
        let s = self.add(Op::Reduce { op: ReduceOp::Sum, axes: vec![3], keepdims: true }, &[e]);
        self.bin(BinaryOp::Div, e, s)
    }
    fn gelu(&mut self, x: NodeId) -> NodeId {
        let c = self.scalar(std::f64::consts::FRAC_1_SQRT_2);
        let xs = self.bin(BinaryOp::Mul, x, c);
        let erf = self.add(Op::Unary(UnaryOp::Erf), &[xs]);
        let one = self.scalar(1.0);
        let half = self.scalar(0.5);
        let e1 = self.bin(BinaryOp::Add, erf, one);
        let xh = self.bin(BinaryOp::Mul, x, half);
        self.bin(BinaryOp::Mul, xh, e1)
    }
}

fn bert() -> Graph {
    let mut b = B { g: Graph::new("bert") };
    let ids =
        b.add(Op::Input { name: "ids".into(), dtype: DType::I64, shape: kiln_ir::dims(&[1, SEQ]) }, &[]);
    let emb = b.param("emb.word", &[VOCAB, HIDDEN], Init::Normal { mean: 0.0, std: 0.02 });
    let pos = b.param("emb.pos", &[SEQ, HIDDEN], Init::Normal { mean: 0.0, std: 0.02 });
    let e = b.add(Op::Gather { axis: 0 }, &[emb, ids]);
    let e = b.bin(BinaryOp::Add, e, pos);
    let mut x = b.layer_norm(e, "emb.ln");
    for l in 0..LAYERS {
        let p = format!("layer{l}");
        let q = b.linear(x, &format!("{p}.q"), HIDDEN, HIDDEN);
        let k = b.linear(x, &format!("{p}.k"), HIDDEN, HIDDEN);
        let v = b.linear(x, &format!("{p}.v"), HIDDEN, HIDDEN);
        let q = b.heads(q, vec![0, 2, 1, 3]);
        let kt = b.heads(k, vec![0, 2, 3, 1]);
        let v = b.heads(v, vec![0, 2, 1, 3]);
        let s = b.add(Op::MatMul, &[q, kt]);
        let scale = b.scalar(1.0 / (HEAD as f64).sqrt());
        let s = b.bin(BinaryOp::Mul, s, scale);
        let a = b.softmax(s);
        let ctx = b.add(Op::MatMul, &[a, v]);
        let ctx = b.add(Op::Transpose { perm: vec![0, 2, 1, 3] }, &[ctx]);
        let ctx = b.add(Op::Reshape { shape: kiln_ir::dims(&[1, SEQ, HIDDEN]) }, &[ctx]);
        let o = b.linear(ctx, &format!("{p}.o"), HIDDEN, HIDDEN);
        let r = b.bin(BinaryOp::Add, o, x);
        let h = b.layer_norm(r, &format!("{p}.ln1"));
        let f = b.linear(h, &format!("{p}.ffn1"), HIDDEN, FFN);
        let f = b.gelu(f);
        let f = b.linear(f, &format!("{p}.ffn2"), FFN, HIDDEN);
        let r = b.bin(BinaryOp::Add, f, h);
        x = b.layer_norm(r, &format!("{p}.ln2"));
    }
    b.g.add_output("hidden", x);
    b.g
}

#[test]
fn bert_encoder_is_normalized_and_deterministic() {
    let g = bert();
    kiln_ir::verify(&g).unwrap();
    let mut bind = Bindings { params: bind_params(&g, None, 42, false).unwrap(), ..Bindings::default() };
    let ids: Vec<i64> = (0..SEQ as i64).map(|i| (i * 37 + 11) % VOCAB as i64).collect();
    bind.inputs.insert("ids".into(), Tensor::new(vec![1, SEQ], kiln_ir::Buffer::I64(ids)).unwrap());

    let t0 = std::time::Instant::now();
    let out = eval(&g, &bind).unwrap();
    let dt = t0.elapsed();
    eprintln!("6-layer BERT encoder (hidden 384, seq 128): {dt:?}");

    let h = &out[0].1;
    assert_eq!(h.shape, vec![1, SEQ, HIDDEN]);
    let v = h.to_f64_vec();
    assert!(v.iter().all(|x| x.is_finite()));
    // each row is layer-normalized: mean 0, variance 1
    for row in v.chunks(HIDDEN).take(4) {
        let mean = row.iter().sum::<f64>() / HIDDEN as f64;
        let var = row.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / HIDDEN as f64;
        assert!(mean.abs() < 1e-4 && (var - 1.0).abs() < 1e-3, "mean {mean}, var {var}");
    }
    assert_eq!(eval(&g, &bind).unwrap(), out, "deterministic");
}
