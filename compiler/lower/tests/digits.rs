//! End to end: `models/mlp.ron`, at the digits' sizes, learns the optical-recognition-of-
//! handwritten-digits data set (E. Alpaydin and C. Kaynak, UCI Machine Learning Repository,
//! 1998; the copy scikit-learn ships, fetched by `scripts/fetch_digits.sh`) through its own
//! training section: cross-entropy, Adam under its cosine schedule, one train-step graph per
//! batch run by the reference interpreter. On a seeded 80/20 split it must reach 95 % test
//! accuracy. Without the data (`${KILN_CACHE:-~/.cache/kiln}/digits/digits.csv`) it says so
//! and passes.

use kiln_ir::{bind_params, eval, Bindings, Buffer, Op, Tensor};
use kiln_lower::{train_step, Override};
use std::collections::HashMap;
use std::path::PathBuf;

const BATCH: usize = 32;
const EPOCHS: usize = 20;
const SEED: u64 = 7;

/// The 1797 images (64 pixels each, scaled to [0, 1]) and their digits; `None` when the data
/// is not cached.
fn digits() -> Option<(Vec<[f32; 64]>, Vec<i64>)> {
    let cache = match std::env::var_os("KILN_CACHE").filter(|v| !v.is_empty()) {
        Some(c) => PathBuf::from(c),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".cache/kiln"),
    };
    let text = std::fs::read_to_string(cache.join("digits/digits.csv")).ok()?;
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let values: Vec<f32> = line.split(',').map(|v| v.trim().parse().expect("a number")).collect();
        assert_eq!(values.len(), 65, "64 pixels and a digit per row");
        let mut image = [0f32; 64];
        for (p, v) in image.iter_mut().zip(&values) {
            *p = v / 16.0;
        }
        images.push(image);
        labels.push(values[64] as i64);
    }
    Some((images, labels))
}

/// splitmix64: a seeded permutation's source, so the split and the epochs' orders are fixed.
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

fn mlp(batch: usize) -> kiln_lower::Lowered {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/mlp.ron");
    let sets = [format!("batch={batch}"), "in=64".into(), "hidden1=128".into(), "hidden2=64".into()];
    let overrides: Vec<Override> = sets.iter().map(|s| Override::parse(s).expect("an override")).collect();
    let (sources, r) = kiln_lower::load(&path, &overrides);
    r.unwrap_or_else(|d| panic!("{}", d.render(&sources)))
}

fn batch_of(images: &[[f32; 64]], labels: &[i64], rows: &[usize]) -> (Tensor, Tensor) {
    let x: Vec<f32> = rows.iter().flat_map(|&r| images[r]).collect();
    let y: Vec<i64> = rows.iter().map(|&r| labels[r]).collect();
    (
        Tensor::from_f32(vec![rows.len(), 64], x).expect("images"),
        Tensor::new(vec![rows.len()], Buffer::I64(y)).expect("labels"),
    )
}

#[test]
fn the_mlp_learns_the_digits_to_95_percent() {
    let Some((images, labels)) = digits() else {
        eprintln!(
            "skipped: the_mlp_learns_the_digits_to_95_percent: no digits data (scripts/fetch_digits.sh fetches it)"
        );
        return;
    };
    let order = shuffled(images.len(), SEED);
    let (train, test) = order.split_at(images.len() * 4 / 5);

    let step = train_step(&mlp(BATCH)).expect("the MLP's train step");
    let g = &step.graph;
    let mut params = bind_params(g, None, SEED, true).expect("initial parameters");
    let mut state: HashMap<String, Tensor> = HashMap::new();
    for &i in &g.inputs {
        if let Op::Input { name, dtype, .. } = &g.node(i).op {
            if name.starts_with("optim.") && name != "optim.step" {
                state.insert(name.clone(), Tensor::full(*dtype, g.ty(i).static_shape(), 0.0));
            }
        }
    }
    let mut steps = 0u32;
    for epoch in 0..EPOCHS {
        let mine = shuffled(train.len(), SEED ^ (epoch as u64 + 1));
        for chunk in mine.chunks_exact(BATCH) {
            let rows: Vec<usize> = chunk.iter().map(|&i| train[i]).collect();
            let (x, y) = batch_of(&images, &labels, &rows);
            let mut b = Bindings { params: params.clone(), ..Bindings::default() };
            b.inputs.insert("image".into(), x);
            b.inputs.insert("label".into(), y);
            b.inputs.insert("optim.step".into(), Tensor::from_f32(vec![], vec![steps as f32]).expect("step"));
            b.inputs.extend(state.clone());
            for (name, t) in eval(g, &b).expect("a train step") {
                match name.strip_prefix("param.") {
                    Some(p) => {
                        params.insert(p.to_string(), t);
                    }
                    None if name.starts_with("optim.") && state.contains_key(&name) => {
                        state.insert(name, t);
                    }
                    None => {}
                }
            }
            steps += 1;
        }
    }

    // Accuracy on the held-out fifth, through the forward graph at its size.
    let forward = mlp(test.len());
    let (x, y) = batch_of(&images, &labels, test);
    let mut b = Bindings { params, ..Bindings::default() };
    b.inputs.insert("image".into(), x);
    b.inputs.insert("label".into(), y);
    let out = eval(&forward.graph, &b).expect("the forward pass");
    let logits = out.iter().find(|(n, _)| n == "logits").expect("logits").1.to_f64_vec();
    let right = logits
        .chunks(10)
        .zip(test)
        .filter(|(row, &r)| {
            let best = row.iter().enumerate().fold(0, |m, (i, v)| if *v > row[m] { i } else { m });
            best as i64 == labels[r]
        })
        .count();
    let accuracy = right as f64 / test.len() as f64;
    eprintln!("digits: {steps} steps, test accuracy {:.1} % ({right} of {})", 100.0 * accuracy, test.len());
    assert!(accuracy >= 0.95, "test accuracy {accuracy}");
}
