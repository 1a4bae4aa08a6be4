//! `.npy` / `.safetensors` round trips and `bind_params` diagnostics.

use half::{bf16, f16};
use kiln_ir::tensor_io::{
    read_npy, read_safetensors, read_tensors, write_npy, write_safetensors, TensorIoError,
};
use kiln_ir::{
    bind_params, bind_params_with_warnings, init_param, Buffer, DType, Graph, Init, Op, Tensor, UnusedWeight,
    WeightsError,
};

fn tensors() -> Vec<(String, Tensor)> {
    let t = |shape: &[usize], data| Tensor::new(shape.to_vec(), data).unwrap();
    vec![
        ("f32".into(), t(&[2, 3], Buffer::F32(vec![1.0, -2.5, 3.25, f32::INFINITY, 0.0, -0.0]))),
        ("f64".into(), t(&[3], Buffer::F64(vec![0.1, -1e300, std::f64::consts::PI]))),
        ("f16".into(), t(&[2, 1], Buffer::F16(vec![f16::from_f32(0.1), f16::MAX]))),
        ("bf16".into(), t(&[1, 2], Buffer::BF16(vec![bf16::from_f32(-3.5), bf16::MIN_POSITIVE]))),
        ("i32".into(), t(&[2, 2], Buffer::I32(vec![i32::MIN, -1, 0, i32::MAX]))),
        ("i64".into(), t(&[], Buffer::I64(vec![i64::MIN + 7]))),
        ("bool".into(), t(&[4], Buffer::Bool(vec![true, false, false, true]))),
        ("empty".into(), t(&[0, 3], Buffer::F32(vec![]))),
    ]
}

#[test]
fn npy_round_trip_every_dtype() {
    let dir = tempfile::tempdir().unwrap();
    for (name, t) in tensors() {
        let path = dir.path().join(format!("{name}.npy"));
        if t.dtype() == DType::BF16 {
            let e = write_npy(&path, &t).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!(
                    "cannot write `{}`: numpy has no bf16 dtype; cast to f32 or write a .safetensors file",
                    path.display()
                )
            );
            continue;
        }
        write_npy(&path, &t).unwrap();
        assert_eq!(read_npy(&path).unwrap(), t, "{name}");
        assert_eq!(read_tensors(&path).unwrap(), vec![(name.clone(), t)]);
    }
}

#[test]
fn npy_header_is_little_endian_c_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.npy");
    write_npy(&path, &Tensor::new(vec![2], Buffer::I32(vec![1, 2])).unwrap()).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let header = String::from_utf8_lossy(&bytes[10..]);
    assert!(header.contains("'descr': '<i4'"), "{header}");
    assert!(header.contains("'fortran_order': False"), "{header}");
    assert_eq!(&bytes[bytes.len() - 8..], &[1, 0, 0, 0, 2, 0, 0, 0]);
}

/// A version-1.0 `.npy` file with the given header dict and raw data.
fn raw_npy(dict: &str, data: &[u8]) -> Vec<u8> {
    let mut header = dict.to_string();
    // magic (6) + version (2) + length (2) + header + '\n' is a multiple of 64 bytes
    let pad = (64 - (10 + header.len() + 1) % 64) % 64;
    header.push_str(&" ".repeat(pad));
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

#[test]
fn npy_rejects_fortran_order_and_odd_dtypes_reads_big_endian() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.npy");
    let data: Vec<u8> = [1f32, 2.0, 3.0, 4.0].iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(&path, raw_npy("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }", &data))
        .unwrap();
    assert_eq!(
        read_npy(&path).unwrap_err().to_string(),
        format!(
            "`{}`: Fortran-order arrays are not supported (save a C-order array, e.g. with np.ascontiguousarray)",
            path.display()
        )
    );
    std::fs::write(&path, raw_npy("{'descr': '|u1', 'fortran_order': False, 'shape': (2,), }", &[1, 2]))
        .unwrap();
    assert_eq!(
        read_npy(&path).unwrap_err().to_string(),
        format!("`{}`: unsupported dtype `|u1` (supported: f2, f4, f8, i4, i8, b1)", path.display())
    );
    let be: Vec<u8> = [7i32, -2].iter().flat_map(|x| x.to_be_bytes()).collect();
    std::fs::write(&path, raw_npy("{'descr': '>i4', 'fortran_order': False, 'shape': (2,), }", &be)).unwrap();
    assert_eq!(read_npy(&path).unwrap(), Tensor::new(vec![2], Buffer::I32(vec![7, -2])).unwrap());
    std::fs::write(&path, b"not an npy file").unwrap();
    let e = read_npy(&path).unwrap_err();
    assert!(matches!(e, TensorIoError::Format { .. }), "{e}");
}

#[test]
fn safetensors_round_trip_keeps_every_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let ts = tensors();
    write_safetensors(&path, &ts).unwrap();
    let back = read_safetensors(&path).unwrap();
    assert_eq!(back.len(), ts.len());
    for (name, t) in &ts {
        let got = &back.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{name} missing")).1;
        assert_eq!(got, t, "{name}");
    }
    assert_eq!(read_tensors(&path).unwrap(), back);
}

#[test]
fn safetensors_reads_in_file_order() {
    // Names in reverse alphabetical order, same dtype: the writer sorts them by name, so the
    // file order is a, b, c (by data offset), whatever order the header JSON lists them in.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.safetensors");
    let one = |v: f32| Tensor::new(vec![1], Buffer::F32(vec![v])).unwrap();
    write_safetensors(&path, &[("c".into(), one(3.0)), ("b".into(), one(2.0)), ("a".into(), one(1.0))])
        .unwrap();
    let names: Vec<String> = read_safetensors(&path).unwrap().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["a", "b", "c"]);

    // A hand-written file whose header lists `z` first while its data comes second.
    let header = r#"{"z":{"dtype":"I32","shape":[1],"data_offsets":[4,8]},"y":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&5i32.to_le_bytes());
    bytes.extend_from_slice(&6i32.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    let got = read_safetensors(&path).unwrap();
    assert_eq!(got[0], ("y".to_string(), Tensor::new(vec![1], Buffer::I32(vec![5])).unwrap()));
    assert_eq!(got[1], ("z".to_string(), Tensor::new(vec![1], Buffer::I32(vec![6])).unwrap()));
}

#[test]
fn io_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("x.npy");
    assert_eq!(
        read_npy(&missing).unwrap_err().to_string(),
        format!("cannot read `{}`: No such file or directory", missing.display())
    );
    let missing = dir.path().join("w.safetensors");
    assert_eq!(
        read_tensors(&missing).unwrap_err().to_string(),
        format!("cannot read `{}`: No such file or directory", missing.display())
    );
    let odd = dir.path().join("w.bin");
    assert_eq!(
        read_tensors(&odd).unwrap_err().to_string(),
        format!("`{}`: unknown tensor file type (expected a `.npy` or `.safetensors` file)", odd.display())
    );
    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!").unwrap();
    let e = read_safetensors(&bad).unwrap_err();
    assert!(e.to_string().starts_with(&format!("`{}`: not a valid .safetensors file", bad.display())), "{e}");
    let nowhere = dir.path().join("no/such/dir/x.npy");
    let t = Tensor::new(vec![1], Buffer::F32(vec![1.0])).unwrap();
    assert_eq!(
        write_npy(&nowhere, &t).unwrap_err().to_string(),
        format!("cannot write `{}`: No such file or directory", nowhere.display())
    );
    let dup = dir.path().join("dup.safetensors");
    let e = write_safetensors(&dup, &[("a".into(), t.clone()), ("a".into(), t)]).unwrap_err();
    assert_eq!(e.to_string(), format!("cannot write `{}`: two tensors are named `a`", dup.display()));
}

// ---------------------------------------------------------------------------------------
// bind_params

fn graph(params: &[(&str, &[usize])]) -> Graph {
    let mut g = Graph::new("m");
    for (name, shape) in params {
        let p = g
            .add(
                Op::Param {
                    name: name.to_string(),
                    dtype: DType::F32,
                    shape: kiln_ir::dims(shape),
                    init: Init::Normal { mean: 0.0, std: 1.0 },
                },
                &[],
            )
            .unwrap();
        g.add_output(name.to_string(), p);
    }
    g
}

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::full(DType::F32, shape.to_vec(), 0.0)
}

#[test]
fn bind_params_initializes_without_weights() {
    let g = graph(&[("a.weight", &[2, 3]), ("a.bias", &[3])]);
    let p = bind_params(&g, None, 7, false).unwrap();
    assert_eq!(p.len(), 2);
    let init = Init::Normal { mean: 0.0, std: 1.0 };
    assert_eq!(p["a.weight"], init_param("a.weight", &init, DType::F32, &[2, 3], 7).expect("small"));
    assert_eq!(p["a.bias"], init_param("a.bias", &init, DType::F32, &[3], 7).expect("small"));
    assert_ne!(p["a.weight"], init_param("a.weight", &init, DType::F32, &[2, 3], 8).expect("small"));
}

#[test]
fn bind_params_takes_file_values_and_converts_floats() {
    let g = graph(&[("w", &[2]), ("b", &[1])]);
    let w = Tensor::new(vec![2], Buffer::F64(vec![0.5, 0.1])).unwrap();
    let b = Tensor::new(vec![1], Buffer::BF16(vec![bf16::from_f32(2.0)])).unwrap();
    let p = bind_params(&g, Some(&[("w".into(), w), ("b".into(), b)]), 0, false).unwrap();
    assert_eq!(p["w"], Tensor::new(vec![2], Buffer::F32(vec![0.5, 0.1])).unwrap());
    assert_eq!(p["b"], Tensor::new(vec![1], Buffer::F32(vec![2.0])).unwrap());
}

#[test]
fn bind_params_init_missing_fills_the_rest() {
    let g = graph(&[("w", &[2]), ("b", &[1])]);
    let p = bind_params(&g, Some(&[("w".into(), zeros(&[2]))]), 3, true).unwrap();
    assert_eq!(p["w"], zeros(&[2]));
    assert_eq!(
        p["b"],
        init_param("b", &Init::Normal { mean: 0.0, std: 1.0 }, DType::F32, &[1], 3).expect("small")
    );
    // An unused tensor is a warning, not an error; a near miss of an initialized parameter
    // says which one.
    let g = graph(&[("enc.weight", &[2]), ("enc.bias", &[1])]);
    let file =
        [("enc.weight".into(), zeros(&[2])), ("extra".into(), zeros(&[1])), ("enc.bais".into(), zeros(&[1]))];
    let (p, warning) = bind_params_with_warnings(&g, Some(&file), 3, true).unwrap();
    assert_eq!(p["enc.weight"], zeros(&[2]));
    let init = Init::Normal { mean: 0.0, std: 1.0 };
    assert_eq!(p["enc.bias"], init_param("enc.bias", &init, DType::F32, &[1], 3).expect("small"));
    assert_eq!(
        warning.unused,
        [
            UnusedWeight { name: "extra".into(), did_you_mean: None },
            UnusedWeight { name: "enc.bais".into(), did_you_mean: Some("enc.bias".into()) }
        ]
    );
    assert_eq!(
        warning.to_string(),
        "ignoring 2 tensors in the weights file that the model does not use: extra, \
         enc.bais (did you mean parameter `enc.bias`? it was initialized instead)"
    );
}

#[test]
fn bind_params_missing_with_suggestion() {
    let g = graph(&[("enc.weight", &[2]), ("enc.bias", &[2]), ("head.weight", &[2])]);
    let file = vec![("enc.weight".to_string(), zeros(&[2])), ("enc.bais".to_string(), zeros(&[2]))];
    let e = bind_params(&g, Some(&file), 0, false).unwrap_err();
    assert_eq!(
        e.to_string(),
        "missing weights for 2 parameters: enc.bias (did you mean `enc.bais`?), head.weight\n\
         also, tensors in the weights file that the model does not use: enc.bais (the model has \
         no parameters with these names)"
    );
}

#[test]
fn bind_params_missing_lists_ten_and_counts() {
    let names: Vec<String> = (0..12).map(|i| format!("p{i:02}")).collect();
    let spec: Vec<(&str, &[usize])> = names.iter().map(|n| (n.as_str(), &[1usize][..])).collect();
    let g = graph(&spec);
    let e = bind_params(&g, Some(&[]), 0, false).unwrap_err();
    assert_eq!(e.missing.len(), 12);
    assert_eq!(
        e.to_string(),
        "missing weights for 12 parameters: p00, p01, p02, p03, p04, p05, p06, p07, p08, p09, … and 2 more"
    );
}

#[test]
fn bind_params_unused_tensors_are_a_warning() {
    let g = graph(&[("w", &[2])]);
    let file = vec![
        ("w".to_string(), zeros(&[2])),
        ("old.w".to_string(), zeros(&[1])),
        ("position_ids".to_string(), Tensor::new(vec![3], Buffer::I64(vec![0, 1, 2])).unwrap()),
        ("old.w".to_string(), zeros(&[1])),
    ];
    let (p, warning) = bind_params_with_warnings(&g, Some(&file[..3]), 0, false).unwrap();
    assert_eq!(p.len(), 1);
    assert_eq!(p["w"], zeros(&[2]));
    assert_eq!(
        warning.to_string(),
        "ignoring 2 tensors in the weights file that the model does not use: old.w, position_ids"
    );
    assert_eq!(bind_params(&g, Some(&file[..3]), 0, false).unwrap(), p);
    // Every parameter from the file: nothing to warn about.
    let (_, warning) = bind_params_with_warnings(&g, Some(&file[..1]), 0, false).unwrap();
    assert!(warning.is_empty() && warning.to_string().is_empty());
    // Duplicates stay an error, and the unused names are listed once along with it.
    let e = bind_params_with_warnings(&g, Some(&file), 0, false).unwrap_err();
    assert_eq!(
        e.to_string(),
        "duplicate tensor names in weights file: old.w\n\
         also, tensors in the weights file that the model does not use: old.w, position_ids (the \
         model has no parameters with these names)"
    );
}

#[test]
fn bind_params_wrong_shapes_and_dtypes() {
    let g = graph(&[("x.weight", &[384, 1536]), ("x.bias", &[1536]), ("y", &[2])]);
    let file = vec![
        ("x.weight".to_string(), zeros(&[384, 384])),
        ("x.bias".to_string(), zeros(&[1536])),
        ("y".to_string(), Tensor::new(vec![2], Buffer::I32(vec![1, 2])).unwrap()),
    ];
    let e = bind_params(&g, Some(&file), 0, false).unwrap_err();
    assert_eq!(
        e.to_string(),
        "`x.weight`: file has [384, 384], the model expects [384, 1536]\n\
         `y`: file has i32, the model expects f32"
    );
    assert_eq!(e.mismatched.len(), 2);
    let e: Box<WeightsError> = bind_params(
        &g,
        Some(&[
            ("x.weight".to_string(), Tensor::new(vec![1], Buffer::I64(vec![1])).unwrap()),
            ("x.bias".to_string(), zeros(&[1536])),
            ("y".to_string(), zeros(&[2])),
        ]),
        0,
        false,
    )
    .unwrap_err();
    assert_eq!(e.to_string(), "`x.weight`: file has i64[1], the model expects f32[384, 1536]");
}

#[test]
fn bind_params_reports_everything_at_once() {
    let g = graph(&[("a", &[1]), ("b", &[2]), ("c", &[3])]);
    let file =
        vec![("a".to_string(), zeros(&[2])), ("d".to_string(), zeros(&[1])), ("d".to_string(), zeros(&[1]))];
    let e = bind_params(&g, Some(&file), 0, false).unwrap_err();
    assert_eq!(
        e.to_string(),
        "missing weights for 2 parameters: b, c\n\
         `a`: file has [2], the model expects [1]\n\
         duplicate tensor names in weights file: d\n\
         also, tensors in the weights file that the model does not use: d (the model has no \
         parameters with these names)"
    );
}

#[test]
fn bind_params_from_a_safetensors_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let g = graph(&[("enc.w", &[2, 2]), ("enc.b", &[2])]);
    let values = bind_params(&g, None, 1, false).unwrap();
    let mut named: Vec<(String, Tensor)> = values.clone().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    write_safetensors(&path, &named).unwrap();
    let file = read_tensors(&path).unwrap();
    assert_eq!(bind_params(&g, Some(&file), 999, false).unwrap(), values);
}
