//! A tiny real artifact for the tests: C kernels compiled with `cc`, weights written with the
//! safetensors crate and a manifest with true crc32s, so the loader is tested as the compiler
//! will use it. The "toy" model computes, for x f32 [64, 16] and scale i32 [64]:
//! t = x·w, u = t + c (both in the arena), y = 2u + x, s[r] = (Σ_j t[r, j]) · scale[r].

#![allow(dead_code)]

pub mod cuda;
pub mod gpu;

use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use kiln_runtime::{
    BufRef, DType, Dispatch, FileDigest, Manifest, Step, Target, TargetInfo, TensorSpec,
    ARTIFACT_FORMAT_VERSION, KERNELS_FILE, MANIFEST_FILE, WEIGHTS_FILE,
};

pub const ROWS: usize = 64;
pub const COLS: usize = 16;
pub const N: usize = ROWS * COLS;

/// Kernels over rows: each iteration of the outer loop is one row of 16 elements.
pub const KERNELS_C: &str = r#"
#include <stdint.h>
#define COLS 16

static int64_t calls;

void kiln_k0(void **b, const int64_t *syms, int64_t begin, int64_t end) {
    const float *x = b[0], *w = b[1];
    float *t = b[2];
    __atomic_add_fetch(&calls, 1, __ATOMIC_RELAXED);
    for (int64_t i = begin * COLS; i < end * COLS; i++) t[i] = x[i] * w[i];
}

void kiln_k1(void **b, const int64_t *syms, int64_t begin, int64_t end) {
    const float *t = b[0], *c = b[1];
    float *u = b[2];
    for (int64_t i = begin * COLS; i < end * COLS; i++) u[i] = t[i] + c[i];
}

void kiln_k2(void **b, const int64_t *syms, int64_t begin, int64_t end) {
    const float *u = b[0], *x = b[1];
    float *y = b[2];
    for (int64_t i = begin * COLS; i < end * COLS; i++) y[i] = u[i] * 2.0f + x[i];
}

void kiln_k3(void **b, const int64_t *syms, int64_t begin, int64_t end) {
    const float *t = b[0];
    const int32_t *scale = b[1];
    float *s = b[2];
    for (int64_t r = begin; r < end; r++) {
        float acc = 0.0f;
        for (int64_t j = 0; j < COLS; j++) acc += t[r * COLS + j];
        s[r] = acc * (float)scale[r];
    }
}

int64_t toy_calls_of_k_mul(void) { return __atomic_load_n(&calls, __ATOMIC_RELAXED); }
"#;

/// The toy kernels with the contract digest of [`toy_manifest`], exported as the compiler
/// exports it, so that the toy artifact loads as a compiled one does.
pub fn toy_source() -> String {
    with_contract(KERNELS_C, &toy_manifest())
}

/// `source` plus the `kiln_contract` constant of `manifest`.
pub fn with_contract(source: &str, manifest: &Manifest) -> String {
    format!(
        "{source}\nconst unsigned long long {} = {:#x}ULL;\n",
        kiln_runtime::CONTRACT_SYMBOL,
        manifest.contract()
    )
}

/// Compiles C source into a shared object, as the compiler's backend would emit one.
pub fn compile_shared(source: &str, out: &Path) {
    let dir = out.parent().expect("output has a parent");
    let c_file = dir.join("kernels.c");
    std::fs::write(&c_file, source).expect("write C source");
    let status = Command::new("cc")
        .args(["-O2", "-shared", "-fPIC", "-ffp-contract=off", "-o"])
        .arg(out)
        .arg(&c_file)
        .status()
        .expect("run cc");
    assert!(status.success(), "cc failed");
    std::fs::remove_file(&c_file).expect("remove C source");
}

/// The toy kernels, compiled once per test binary.
pub fn toy_kernels() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let so = dir.path().join(KERNELS_FILE);
        compile_shared(&toy_source(), &so);
        std::fs::read(&so).expect("read kernels")
    })
}

pub fn x_data() -> Vec<f32> {
    (0..N).map(|i| ((i * 7) % 23) as f32 * 0.25 - 2.0).collect()
}

pub fn scale_data() -> Vec<i32> {
    (0..ROWS as i32).map(|r| r % 5 - 2).collect()
}

pub fn w_data() -> Vec<f32> {
    (0..N).map(|i| ((i * 5) % 11) as f32 * 0.5 - 1.5).collect()
}

pub fn c_data() -> Vec<f32> {
    (0..N).map(|i| (i % 13) as f32 * 0.125).collect()
}

/// The toy model's outputs, computed in the same f32 operation order as the kernels.
pub fn expected(x: &[f32], scale: &[i32]) -> (Vec<f32>, Vec<f32>) {
    let (w, c) = (w_data(), c_data());
    let t: Vec<f32> = x.iter().zip(&w).map(|(a, b)| a * b).collect();
    let y = t.iter().zip(&c).zip(x).map(|((t, c), x)| (t + c) * 2.0 + x).collect();
    let s = (0..ROWS)
        .map(|r| t[r * COLS..(r + 1) * COLS].iter().fold(0.0f32, |acc, v| acc + v) * scale[r] as f32)
        .collect();
    (y, s)
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn weights_file() -> Vec<u8> {
    let (w, c) = (f32_bytes(&w_data()), f32_bytes(&c_data()));
    let shape = vec![ROWS, COLS];
    let tensors = vec![
        (
            "w",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), &w).expect("view"),
        ),
        ("c", safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, &c).expect("view")),
    ];
    safetensors::serialize(tensors, None).expect("serialize")
}

pub fn host_target() -> TargetInfo {
    TargetInfo {
        triple: format!("{}-unknown-linux-gnu", std::env::consts::ARCH),
        cpu: "generic".into(),
        features: String::new(),
    }
}

pub fn toy_manifest() -> Manifest {
    let plane = (N * 4) as u64;
    let step = |symbol: &str, label: &str, args: Vec<BufRef>, grain: u64, flops: u64| Step {
        symbol: symbol.into(),
        label: label.into(),
        args,
        dispatch: Dispatch::Cpu { range: kiln_runtime::Dim::Fixed(ROWS as u64), grain },
        flops,
        bytes: 3 * plane,
    };
    let w = || BufRef::Weight { name: "w".into(), bytes: plane };
    let c = || BufRef::Weight { name: "c".into(), bytes: plane };
    let t = || BufRef::Arena { offset: 0, bytes: plane };
    let u = || BufRef::Arena { offset: plane, bytes: plane };
    Manifest {
        format_version: ARTIFACT_FORMAT_VERSION,
        symbols: Vec::new(),
        model: "toy".into(),
        kiln_version: "0.1.0".into(),
        target: Target::Cpu(host_target()),
        inputs: vec![
            TensorSpec::fixed("x", DType::F32, &[ROWS as u64, COLS as u64]),
            TensorSpec::fixed("scale", DType::I32, &[ROWS as u64]),
        ],
        outputs: vec![
            TensorSpec::fixed("y", DType::F32, &[ROWS as u64, COLS as u64]),
            TensorSpec::fixed("s", DType::F32, &[ROWS as u64]),
        ],
        arena_bytes: 2 * plane,
        index_bounds: Vec::new(),
        files: Vec::new(),
        modules: Vec::new(),
        state: Vec::new(),
        entries: Vec::new(),
        faults: None,
        steps: vec![
            step("kiln_k0", "k0 mul [64,16]", vec![BufRef::Input { index: 0 }, w(), t()], 4, N as u64),
            step("kiln_k1", "k1 add [64,16]", vec![t(), c(), u()], 4, N as u64),
            step(
                "kiln_k2",
                "k2 out [64,16]",
                vec![u(), BufRef::Input { index: 0 }, BufRef::Output { index: 0 }],
                4,
                2 * N as u64,
            ),
            step(
                "kiln_k3",
                "k3 rowsum [64]",
                vec![t(), BufRef::Input { index: 1 }, BufRef::Output { index: 1 }],
                8,
                N as u64,
            ),
        ],
    }
}

/// How a test artifact's kernels are written: their file, the files beside it that are
/// digested when present, and how the manifest's contract digest is stamped into them.
pub trait Kernels {
    /// The kernels' file.
    const FILE: &'static str;
    /// Further code files (a cubin beside the PTX), digested where the test wrote them.
    const EXTRA: &'static [&'static str];
    /// The kernels with `contract` stamped as the compiler stamps it (replacing any), or
    /// `None` where it is compiled in (a shared library: [`with_contract`]).
    fn stamped(kernels: Vec<u8>, contract: u64) -> Option<Vec<u8>>;
}

/// Native kernels: a shared library compiled by the test with its contract constant.
pub struct Native;

impl Kernels for Native {
    const FILE: &'static str = KERNELS_FILE;
    const EXTRA: &'static [&'static str] = &[];
    fn stamped(_: Vec<u8>, _: u64) -> Option<Vec<u8>> {
        None
    }
}

/// An artifact in a temporary directory: its files and the manifest as the test last wrote it.
pub struct TestArtifact<K> {
    pub dir: tempfile::TempDir,
    pub manifest: Manifest,
    kernels: PhantomData<K>,
}

/// The toy model's CPU artifact.
pub type Toy = TestArtifact<Native>;

impl<K: Kernels> TestArtifact<K> {
    /// Writes the kernels (with `write_kernels`, given their path) and `weights`, stamps the
    /// kernels for `manifest` and writes it with the files' true digests.
    pub fn write(manifest: Manifest, weights: &[u8], write_kernels: impl FnOnce(&Path)) -> Self {
        let dir = tempfile::Builder::new().suffix(".kiln").tempdir().expect("tempdir");
        write_kernels(&dir.path().join(K::FILE));
        std::fs::write(dir.path().join(WEIGHTS_FILE), weights).expect("write weights");
        let mut artifact = TestArtifact { dir, manifest, kernels: PhantomData };
        artifact.stamp();
        artifact.refresh_digests();
        artifact
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Stamps the kernels with the current manifest's contract, as the compiler does, and
    /// records their new digest if the manifest lists them.
    pub fn stamp(&mut self) {
        let Ok(kernels) = std::fs::read(self.file(K::FILE)) else { return };
        let Some(kernels) = K::stamped(kernels, self.manifest.contract()) else { return };
        std::fs::write(self.file(K::FILE), &kernels).expect("write kernels");
        for f in &mut self.manifest.files {
            if f.name == K::FILE {
                *f = FileDigest::of(K::FILE, &kernels);
            }
        }
    }

    /// Records the files' sizes and crc32s (the kernels, the extra code files present, the
    /// weights) and rewrites the manifest.
    pub fn refresh_digests(&mut self) {
        let present = K::EXTRA.iter().filter(|name| self.file(name).exists());
        self.manifest.files = std::iter::once(&K::FILE)
            .chain(present)
            .chain([&WEIGHTS_FILE])
            .map(|name| FileDigest::of(*name, &std::fs::read(self.file(name)).expect("read artifact file")))
            .collect();
        self.write_manifest();
    }

    /// Edits the manifest and rewrites it, with the kernels stamped for it as a compiler
    /// would have (other digests untouched), so the edit meets the checks behind the contract.
    /// Native kernels keep the contract they were compiled with.
    pub fn edit(&mut self, f: impl FnOnce(&mut Manifest)) {
        f(&mut self.manifest);
        self.stamp();
        self.write_manifest();
    }

    /// Edits the manifest and rewrites it, leaving the kernels as compiled: a hand edit.
    pub fn edit_by_hand(&mut self, f: impl FnOnce(&mut Manifest)) {
        f(&mut self.manifest);
        self.write_manifest();
    }

    pub fn write_manifest(&self) {
        let text = self.manifest.to_ron().expect("manifest to RON");
        std::fs::write(self.file(MANIFEST_FILE), text).expect("write manifest");
    }
}

impl Toy {
    /// Writes kernels, weights and a manifest with their true digests.
    pub fn new() -> Toy {
        Toy::write(toy_manifest(), &weights_file(), |path| {
            std::fs::write(path, toy_kernels()).expect("write kernels")
        })
    }

    /// An artifact of `manifest` whose kernels are `source` (C) compiled with the manifest's
    /// contract, and the toy's weights.
    pub fn custom(manifest: Manifest, source: &str) -> Toy {
        let source = with_contract(source, &manifest);
        Toy::write(manifest, &weights_file(), |path| compile_shared(&source, path))
    }
}

/// Kernels of a model whose row count is the symbol `rows` (1..=64): `syms[0]` is its value.
pub const DYNAMIC_C: &str = r#"
#include <stdint.h>
#define COLS 16

void kiln_k0(void **b, const int64_t *syms, int64_t begin, int64_t end) {
    const float *x = b[0], *w = b[1];
    float *t = b[2];
    for (int64_t i = begin * COLS; i < end * COLS; i++) t[i] = x[i] * w[i];
}

/* Over 16 * rows elements. */
void kiln_k1(void **b, const int64_t *syms, int64_t begin, int64_t end) {
    const float *t = b[0];
    float *y = b[1];
    float rows = (float)syms[0];
    for (int64_t i = begin; i < end; i++) y[i] = t[i] * 2.0f + rows;
}

void kiln_k2(void **b, const int64_t *syms, int64_t begin, int64_t end) {
    const float *t = b[0];
    float *s = b[1];
    for (int64_t r = begin; r < end; r++) {
        float acc = 0.0f;
        for (int64_t j = 0; j < COLS; j++) acc += t[r * COLS + j];
        s[r] = acc * (float)syms[0];
    }
}
"#;

/// `rows` as an extent.
/// The grid of the sized GPU test models (`tests/data/sized.*`): `ceil(16·rows / 64)`
/// workgroups (CUDA blocks) of 64, written as `(16·rows + 63)//64`.
pub fn sized_grid() -> kiln_runtime::Dim {
    use kiln_runtime::{SizeFactor, SizeTerm};
    kiln_runtime::Dim::Size(vec![SizeTerm {
        coeff: 1,
        factors: vec![SizeFactor::FloorDiv(
            vec![
                SizeTerm { coeff: 16, factors: vec![SizeFactor::Sym(0)] },
                SizeTerm { coeff: 63, factors: vec![] },
            ],
            64,
        )],
    }])
}

/// Runs a sized GPU test model at `rows` rows: y and the workgroups its second step launched.
pub fn run_sized(model: &mut kiln_runtime::Model, rows: usize) -> (Vec<f32>, i32) {
    let x = &x_data()[..rows * 16];
    let out = model.run(&[kiln_runtime::TensorRef::f32("x", &[rows as u64, 16], x)]).unwrap();
    assert_eq!(out[0].shape(), &[rows as u64, 16][..]);
    (out[0].as_f32().unwrap().to_vec(), out[1].as_i32().unwrap()[0])
}

/// What a sized GPU test model computes at `rows` rows: y = x·w + rows over the first `rows`
/// rows, and the grid `ceil(16·rows / 64)`.
pub fn sized_expected(rows: usize) -> (Vec<f32>, i32) {
    let (x, w) = (x_data(), w_data());
    let y = (0..rows * 16).map(|i| x[i] * w[i] + rows as f32).collect();
    (y, (16 * rows).div_ceil(64) as i32)
}

pub fn rows_dim() -> kiln_runtime::Dim {
    kiln_runtime::Dim::Size(vec![kiln_runtime::SizeTerm {
        coeff: 1,
        factors: vec![kiln_runtime::SizeFactor::Sym(0)],
    }])
}

/// A model with one symbol, `rows` in 1..=64 (hint 8): `x` f32[rows, 16] gives
/// `y = x * w * 2 + rows` f32[rows, 16] and `s` f32[rows], each row's sum of `x * w` times
/// `rows`. Its intermediate lies in an arena planned for 64 rows; the middle step's range is
/// the compound size `16*rows`.
pub fn dynamic_manifest() -> Manifest {
    use kiln_runtime::{Dim, SizeFactor, SizeTerm, SymbolSpec};
    let plane = (N * 4) as u64;
    let step = |symbol: &str, label: &str, args: Vec<BufRef>, range: Dim| Step {
        symbol: symbol.into(),
        label: label.into(),
        args,
        dispatch: Dispatch::Cpu { range, grain: 2 },
        flops: 0,
        bytes: 0,
    };
    let elements = Dim::Size(vec![SizeTerm { coeff: COLS as i64, factors: vec![SizeFactor::Sym(0)] }]);
    let t = || BufRef::Arena { offset: 0, bytes: plane };
    let spec = |name: &str, shape: Vec<Dim>| TensorSpec { name: name.into(), dtype: DType::F32, shape };
    Manifest {
        format_version: ARTIFACT_FORMAT_VERSION,
        symbols: vec![SymbolSpec { name: "rows".into(), min: 1, max: ROWS as u64, hint: 8, multiple_of: 1 }],
        model: "rows".into(),
        kiln_version: "0.1.0".into(),
        target: Target::Cpu(host_target()),
        inputs: vec![spec("x", vec![rows_dim(), Dim::Fixed(COLS as u64)])],
        outputs: vec![spec("y", vec![rows_dim(), Dim::Fixed(COLS as u64)]), spec("s", vec![rows_dim()])],
        arena_bytes: plane,
        index_bounds: Vec::new(),
        files: Vec::new(),
        modules: Vec::new(),
        state: Vec::new(),
        entries: Vec::new(),
        faults: None,
        steps: vec![
            step(
                "kiln_k0",
                "k0 mul [rows,16]",
                vec![BufRef::Input { index: 0 }, BufRef::Weight { name: "w".into(), bytes: plane }, t()],
                rows_dim(),
            ),
            step("kiln_k1", "k1 out [rows,16]", vec![t(), BufRef::Output { index: 0 }], elements),
            step("kiln_k2", "k2 rowsum [rows]", vec![t(), BufRef::Output { index: 1 }], rows_dim()),
        ],
    }
}

/// The outputs of [`dynamic_manifest`]'s model at `rows` rows of `x`, in the kernels' order.
pub fn dynamic_expected(x: &[f32], rows: usize) -> (Vec<f32>, Vec<f32>) {
    let w = w_data();
    let t: Vec<f32> = x.iter().zip(&w).map(|(a, b)| a * b).collect();
    let y = t.iter().map(|t| t * 2.0 + rows as f32).collect();
    let s = (0..rows)
        .map(|r| t[r * COLS..(r + 1) * COLS].iter().fold(0.0f32, |acc, v| acc + v) * rows as f32)
        .collect();
    (y, s)
}
