//! Spec files in, expected text out: every shipped model's IR, every class of spec error,
//! and the CLI's exit codes. Update snapshots with `INSTA_UPDATE=always cargo test --test specs`
//! (or `cargo insta review`).

use kiln_lower::Override;
use std::path::Path;
use std::process::Command;

/// Lowers a file and renders every diagnostic (errors and warnings) as the CLI prints them.
fn diagnostics_of(path: &Path) -> (Vec<kiln_spec::Diagnostic>, String) {
    let (sources, result) = kiln_lower::load(path, &[]);
    let diags = match result {
        Ok(l) => l.warnings,
        Err(d) => d.0,
    };
    let rendered = kiln_spec::Diagnostics(diags.clone()).render(&sources);
    let located = diags
        .iter()
        .map(|d| {
            let (loc, _) = d.span.as_ref().map(|(s, l)| (sources.location(*s), l)).unzip();
            (d.clone(), loc)
        })
        .collect::<Vec<_>>();
    // Keep the location alongside the diagnostic for the header check.
    let list = located
        .into_iter()
        .map(|(mut d, loc)| {
            if let Some(loc) = loc {
                d.notes.insert(0, format!("@ {}:{}", loc.line, loc.col));
            }
            d
        })
        .collect();
    (list, rendered)
}

/// The `// error: MESSAGE @ LINE:COL` (or `// warning: …`) header lines of a case file.
fn expectations(text: &str) -> Vec<(String, String, String)> {
    text.lines()
        .take_while(|l| l.starts_with("//"))
        .filter_map(|l| {
            let l = l.trim_start_matches("//").trim();
            let (kind, rest) = l.split_once(": ")?;
            let (msg, at) = rest.rsplit_once(" @ ")?;
            Some((kind.to_string(), msg.to_string(), at.to_string()))
        })
        .collect()
}

#[test]
fn every_error_case_reports_its_message_at_its_position() {
    insta::glob!("specs/errors/*.ron", |path| {
        // Relative to the package root, so renderings do not depend on where the checkout is.
        let path = path.strip_prefix(env!("CARGO_MANIFEST_DIR")).unwrap_or(path);
        let text = std::fs::read_to_string(path).expect("case file is readable");
        let expected = expectations(&text);
        assert!(!expected.is_empty(), "{}: no `// error: MESSAGE @ LINE:COL` header", path.display());
        let (diags, rendered) = diagnostics_of(path);
        for (kind, msg, at) in &expected {
            let found = diags.iter().any(|d| {
                let k = if d.is_error() { "error" } else { "warning" };
                k == kind && &d.message == msg && d.notes.first() == Some(&format!("@ {at}"))
            });
            assert!(
                found,
                "{}: expected {kind} `{msg}` at {at}; got:\n{}",
                path.display(),
                diags
                    .iter()
                    .map(|d| format!("  {} {}", d.message, d.notes.first().cloned().unwrap_or_default()))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        // The whole rendering: message, file:line:col, the source line and the caret.
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        assert!(rendered.contains(&format!("tests/specs/errors/{name}:")), "{rendered}");
        insta::assert_snapshot!(rendered);
    });
}

fn shipped_models() -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir("models")
        .expect("models/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "ron") && p.file_stem().is_some_and(|s| s != "std"))
        .collect();
    v.sort();
    v
}

#[test]
fn every_shipped_model_lowers_and_optimizes_to_its_snapshots() {
    let models = shipped_models();
    assert!(models.len() >= 6, "expected the six shipped models, found {models:?}");
    for path in models {
        let (sources, result) = kiln_lower::load(&path, &[]);
        let lowered = result.unwrap_or_else(|d| panic!("{}:\n{}", path.display(), d.render(&sources)));
        assert!(lowered.warnings.iter().all(|w| !w.is_error()));
        let text = kiln_ir::print::to_text(&lowered.graph, Default::default());
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
        insta::assert_snapshot!(format!("ir_{name}"), text);
        let (opt, report) = kiln_opt::optimize(&lowered.graph, &kiln_opt::Options::default())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(report.cost_after <= report.cost_before, "{name}: {}", report.summary());
        insta::assert_snapshot!(format!("opt_{name}"), kiln_ir::print::to_text(&opt, Default::default()));
    }
}

#[test]
fn every_shipped_model_is_plain_ron_and_starts_with_a_comment() {
    for path in shipped_models().into_iter().chain([Path::new("models/std.ron").to_path_buf()]) {
        let text = std::fs::read_to_string(&path).expect("readable");
        assert!(text.starts_with("//"), "{}: no header comment", path.display());
        ron::from_str::<ron::Value>(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

#[test]
fn overrides_change_the_graph_and_bad_overrides_are_errors() {
    let set = |s: &str| Override::parse(s).expect("name=value");
    let (_, r) = kiln_lower::load(Path::new("models/bert_encoder.ron"), &[set("layers=2"), set("seq=16")]);
    let g = r.expect("lowers").graph;
    let out = g.outputs[0].1;
    assert_eq!(g.ty(out).shape, vec![1, 16, 384]);
    assert_eq!(g.params().len(), 5 + 2 * 16, "embeddings (3 tables + LayerNorm) and 16 tensors per layer");
    let (sources, r) = kiln_lower::load(Path::new("models/bert_encoder.ron"), &[set("layer=2")]);
    let msg = r.expect_err("unknown config").render(&sources);
    assert!(msg.contains("--set layer: the model has no config `layer` (did you mean `layers`?)"), "{msg}");
}

/// `text` with one static config entry made a `Dyn` one (the shipped models stay static: their
/// tests, benchmarks and README commands load them without `--set`).
fn with_dynamic(text: &str, entry: &str, decl: &str) -> String {
    assert!(text.contains(entry), "`{entry}` is not in the model");
    text.replacen(entry, decl, 1)
}

/// A dynamic batch and sequence length specialized by `--set` give exactly the graph of the
/// model written with those sizes.
#[test]
fn specialized_dynamic_sizes_lower_to_the_static_graph() {
    let set = |s: &str| Override::parse(s).expect("name=value");
    let bert = std::fs::read_to_string("models/bert_encoder.ron").expect("model");
    let gpt2 = std::fs::read_to_string("models/gpt2.ron").expect("model");
    let cases = [
        (
            with_dynamic(
                &bert,
                r#""batch": 1, "seq": 128,"#,
                r#""batch": Dyn(min: 1, max: 64, hint: 1), "seq": Dyn(min: 1, max: "max_positions", hint: 128),"#,
            ),
            &bert,
        ),
        (
            with_dynamic(
                &gpt2,
                r#""batch": 1, "seq": 64,"#,
                r#""batch": Dyn(min: 1, max: 16, hint: 1), "seq": Dyn(min: 8, max: "ctx", hint: 64, multiple_of: 8),"#,
            ),
            &gpt2,
        ),
    ];
    for (dynamic, static_text) in &cases {
        for (batch, seq) in [(1, 8), (2, 64), (3, 512)] {
            let overrides = [set("layers=1"), set(&format!("batch={batch}")), set(&format!("seq={seq}"))];
            let (sources, r) = kiln_lower::load_str("m.ron", dynamic, &overrides);
            let lowered = r.unwrap_or_else(|d| panic!("batch={batch} seq={seq}:\n{}", d.render(&sources)));
            let (_, r) = kiln_lower::load_str("m.ron", static_text, &overrides);
            let expected = r.expect("the static model lowers");
            assert_eq!(
                kiln_ir::print::to_text(&lowered.graph, Default::default()),
                kiln_ir::print::to_text(&expected.graph, Default::default()),
                "batch={batch} seq={seq}"
            );
        }
    }
    // Any `--set` of a symbol, and bounds at the ends of i64: diagnostics, never a panic.
    for value in EXTREME_VALUES {
        front_end_with(
            &cases[1].0,
            &[set("layers=1"), Override { name: "seq".into(), value: value.to_string() }],
        );
    }
    for bounds in ["min: 1, max: 9223372036854775807, hint: 1", "min: 9223372036854775807, max: 9223372036854775807, hint: 9223372036854775807, multiple_of: 9223372036854775807"] {
        let text = with_dynamic(&gpt2, r#""seq": 64,"#, &format!(r#""seq": Dyn({bounds}), "s2": "seq * seq + 1 - (0 - seq) // 2","#));
        front_end_with(&text, &[set("layers=1")]);
    }
    // GPT-2's learned positions cover `ctx` = 1024 of them: a longer maximum is refused.
    let long = with_dynamic(&gpt2, r#""seq": 64,"#, r#""seq": Dyn(min: 1, max: 2048, hint: 64),"#);
    let (sources, r) = kiln_lower::load_str("m.ron", &long, &[set("layers=1")]);
    let msg = r.expect_err("too long").render(&sources);
    assert!(
        msg.contains(
            "error: the slice bound `seq` reaches 2048 for the dynamic size `seq` in its bounds, past the axis's 1024 entries"
        ),
        "{msg}"
    );
}

/// BERT and GPT-2 with a dynamic batch and sequence length, at small sizes: each model's
/// text and the `--set`s that make it small.
fn small_dynamic_models() -> [(&'static str, String, [&'static str; 6]); 2] {
    let bert = std::fs::read_to_string("models/bert_encoder.ron").expect("model");
    let gpt2 = std::fs::read_to_string("models/gpt2.ron").expect("model");
    [
        (
            "bert_encoder",
            with_dynamic(
                &bert,
                r#""batch": 1, "seq": 128,"#,
                r#""batch": Dyn(min: 1, max: 4, hint: 2), "seq": Dyn(min: 1, max: "max_positions", hint: 16),"#,
            ),
            ["layers=1", "hidden=32", "heads=2", "ffn=64", "vocab=50", "max_positions=64"],
        ),
        (
            "gpt2",
            with_dynamic(
                &gpt2,
                r#""batch": 1, "seq": 64,"#,
                r#""batch": Dyn(min: 1, max: 4, hint: 2), "seq": Dyn(min: 8, max: "ctx", hint: 16, multiple_of: 8),"#,
            ),
            ["layers=1", "d=32", "heads=2", "vocab=50", "ctx=64", "eps=1e-5"],
        ),
    ]
}

/// Left unspecialized, the symbols become the graph's: the symbolic IR and its optimized
/// graph print as their snapshots, and specializing either at a binding gives exactly the
/// graph `--set` gives for it (the optimized one: the optimized `--set` graph's text).
#[test]
fn dynamic_models_lower_to_symbolic_graphs_that_specialize_to_the_static_ones() {
    let set = |s: &str| Override::parse(s).expect("name=value");
    for (name, text, small) in small_dynamic_models() {
        let small: Vec<Override> = small.iter().map(|s| set(s)).collect();
        let (sources, r) = kiln_lower::load_str("m.ron", &text, &small);
        let lowered = r.unwrap_or_else(|d| panic!("{name}:\n{}", d.render(&sources)));
        let g = &lowered.graph;
        let names: Vec<&str> = g.symbols.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["batch", "seq"], "{name}");
        insta::assert_snapshot!(format!("ir_{name}_dynamic"), kiln_ir::print::to_text(g, Default::default()));
        let (opt, _) = kiln_opt::optimize(g, &kiln_opt::Options::default()).expect("optimizes");
        insta::assert_snapshot!(
            format!("opt_{name}_dynamic"),
            kiln_ir::print::to_text(&opt, Default::default())
        );
        for (batch, seq) in [(1, 8), (2, 16), (3, 64)] {
            let mut sets = small.clone();
            sets.extend([set(&format!("batch={batch}")), set(&format!("seq={seq}"))]);
            let (_, r) = kiln_lower::load_str("m.ron", &text, &sets);
            let expected = r.expect("the specialized model lowers").graph;
            let at = g.specialize(&[batch, seq]).expect("specializes");
            assert_eq!(
                kiln_ir::print::to_text(&at, Default::default()),
                kiln_ir::print::to_text(&expected, Default::default()),
                "{name} batch={batch} seq={seq}"
            );
        }
    }
}

/// `kiln check` lists the symbols with their ranges and the entries computed from them;
/// `kiln inspect` prints the symbolic IR and optimized graph; `kiln compile` builds one CPU
/// artifact for every size within the bounds (its arena at the maxima), `kiln inspect` of it
/// lists the symbols and the shapes over them, and `kiln run` runs it (its inputs filled at
/// the hints).
#[test]
fn cli_checks_inspects_compiles_and_runs_a_dynamic_spec() {
    let [(_, text, small), _] = small_dynamic_models();
    let text = text.replacen(
        r#""max_positions": 512,"#,
        r#""max_positions": 512, "tokens": "batch * seq", "half": "seq // 2", "short": "min(seq, 10)","#,
        1,
    );
    let dir = temp_dir("dynamic");
    let spec = dir.join("bert.ron");
    std::fs::write(&spec, &text).expect("spec written");
    let spec = spec.to_str().expect("utf-8 path");
    let mut args = vec![spec];
    for s in &small {
        args.extend(["--set", s]);
    }
    let run = |command: &[&str]| kiln(&[command, args.as_slice()].concat());
    let (code, out, err) = run(&["check"]);
    assert_eq!((code, err.as_str()), (0, ""));
    assert_eq!(
        out,
        "model bert_encoder: ok
config: vocab=50 hidden=32 layers=1 heads=2 ffn=64 max_positions=64 type_vocab=2 eps=1e-12 training=false seed=0
dynamic sizes:
  batch: 1..=4, hint 2
  seq: 1..=64, hint 16
  tokens = batch*seq: 1..=256
  half = seq//2: 0..=32
  short: 1..=10 (not an extent the graph can hold)
inputs:
  input_ids: i64[batch, seq]
  token_type_ids: i64[batch, seq]
  attention_mask: i64[batch, seq]
outputs:
  last_hidden_state: f32[batch, seq, 32]
parameters: 21 tensors, 12.3K values (0.0 MiB)
ops (111 nodes): add 18, cast 1, div 6, erf 1, exp 1, full 9, gather 2, matmul 8, mul 9, reduce_max 1, reduce_mean 6, reduce_sum 1, reshape 5, slice 1, sqrt 3, sub 5, transpose 10
"
    );
    let overrides: Vec<Override> = small.iter().map(|s| Override::parse(s).expect("name=value")).collect();
    let (_, r) = kiln_lower::load_str("m.ron", &text, &overrides);
    let g = r.expect("lowers").graph;
    let (code, out, _) = run(&["inspect", "--stage", "ir"]);
    assert_eq!((code, out), (0, kiln_ir::print::to_text(&g, Default::default())));
    // As `kiln compile` optimizes: weights folded at compile time.
    let mut folding = kiln_opt::Options::default();
    folding.target.folds_weights = true;
    let (opt, _) = kiln_opt::optimize(&g, &folding).expect("optimizes");
    let (code, out, _) = run(&["inspect", "--stage", "opt"]);
    assert_eq!(code, 0);
    assert!(out.ends_with(&kiln_ir::print::to_text(&opt, Default::default())), "{out}");
    let artifact = dir.join("bert.kiln");
    let art = artifact.to_str().expect("utf-8 path");
    let (code, out, err) = run(&["compile", "-o", art]);
    assert_eq!((code, err.as_str()), (0, ""), "{out}");
    assert!(out.starts_with("compiled `bert_encoder` for "), "{out}");
    // The arena is planned at the maxima; the same plan at the hints is smaller.
    assert!(out.contains(", arena "), "{out}");
    assert!(out.contains(" (at batch = 4, seq = 64; ") && out.contains(" at the hints)\n"), "{out}");
    let (code, out, err) = kiln(&["inspect", art]);
    assert_eq!((code, err.as_str()), (0, ""));
    for line in [
        "symbol batch: 1..=4 (hint 2)\n",
        "symbol seq: 1..=64 (hint 16)\n",
        "  input input_ids: i64[batch, seq]\n",
        "  output last_hidden_state: f32[batch, seq, 32]\n",
    ] {
        assert!(out.contains(line), "`{}` in:\n{out}", line.trim_end());
    }
    let (code, out, err) = kiln(&["run", art]);
    assert_eq!(
        (code, err.as_str()),
        (
            0,
            "note: input `input_ids` not given: filled with random indices in [0, 50) (seed 0)
note: input `token_type_ids` not given: filled with random indices in [0, 2) (seed 0)
note: input `attention_mask` not given: filled with a random mask keeping 80 % of positions (seed 0)
"
        )
    );
    assert!(out.contains("last_hidden_state: f32[2, 16, 32] "), "runs at the hints: {out}");
    // Timed against an artifact compiled for the hints' shape, run by run on the same inputs.
    let fixed = dir.join("bert_fixed.kiln");
    let fixed = fixed.to_str().expect("utf-8 path");
    let (code, out, err) = kiln(&[
        "compile",
        spec,
        "--set",
        "layers=1",
        "--set",
        "hidden=32",
        "--set",
        "heads=2",
        "--set",
        "ffn=64",
        "--set",
        "vocab=50",
        "--set",
        "max_positions=64",
        "--set",
        "batch=2",
        "--set",
        "seq=16",
        "-o",
        fixed,
    ]);
    assert_eq!((code, err.as_str()), (0, ""), "{out}");
    let (code, out, _) = kiln(&["run", art, "--against", fixed, "--repeats", "3"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("against {fixed}: median ")), "{out}");
    assert!(out.contains(" over 3 runs, taking turns; median ratio "), "{out}");
    assert!(out.contains("last_hidden_state: f32[2, 16, 32] "), "{out}");
    // At a size the fixed artifact does not take, the run says which input and why.
    let ids = dir.join("ids.npy");
    let t = kiln_ir::Tensor::new(vec![1usize, 5], kiln_ir::Buffer::I64(vec![3; 5])).expect("a tensor");
    kiln_ir::tensor_io::write_npy(&ids, &t).expect("npy written");
    let ids = format!("input_ids={}", ids.to_str().expect("utf-8 path"));
    let (code, _, err) = kiln(&["run", art, "--against", fixed, "--input", &ids]);
    assert_eq!(code, 1);
    assert!(
        err.ends_with(&format!("error: {fixed}: input \"input_ids\" must have shape [2, 16], got [1, 5]\n")),
        "{err}"
    );
    // One Vulkan artifact for every size too; it runs at the hints where a device exists.
    let vulkan = dir.join("bert_vulkan.kiln");
    let vart = vulkan.to_str().expect("utf-8 path");
    let (code, out, err) = run(&["compile", "--target", "vulkan", "-o", vart]);
    assert_eq!((code, err.as_str()), (0, ""), "{out}");
    assert!(out.contains("arena 161.0 KiB (at batch = 4, seq = 64"), "{out}");
    if kiln_runtime::devices().devices.iter().any(|d| matches!(d, kiln_runtime::DeviceInfo::Vulkan(_))) {
        let (code, out, _) = kiln(&["run", vart]);
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("last_hidden_state: f32[2, 16, 32] "), "runs at the hints on Vulkan: {out}");
    } else {
        eprintln!("skipped: running the dynamic spec on Vulkan: no Vulkan device");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--set` of a symbol is checked against its declaration, with one exact message each.
#[test]
fn specializing_outside_a_symbols_bounds_is_an_error() {
    let text = r#"Model(
    name: "m",
    config: { "seq": Dyn(min: 8, max: 512, hint: 128, multiple_of: 8) },
    inputs: { "x": (f32, ["seq"]) },
    body: [ Let("y", Relu("x")) ],
    outputs: ["y"],
)"#;
    for (value, want) in [
        ("1024", "--set seq=1024: `seq` is declared from 8 to 512, and 1024 is outside"),
        ("0", "--set seq=0: `seq` is declared from 8 to 512, and 0 is outside"),
        ("100", "--set seq=100: `seq` is declared a multiple of 8, and 100 is not"),
        ("1.5", "--set seq=1.5: `seq` is a size, so its value must be an integer, not 1.5"),
        ("true", "--set seq=true: `seq` is a size, so its value must be an integer, not true"),
    ] {
        let (sources, r) =
            kiln_lower::load_str("m.ron", text, &[Override { name: "seq".into(), value: value.into() }]);
        let d = r.expect_err(value);
        assert_eq!(d.0.len(), 1, "{}", d.render(&sources));
        assert_eq!(d.0[0].message, want);
        let rendered = d.render(&sources);
        assert!(rendered.contains("m.ron:3:22"), "{rendered}");
        assert!(rendered.contains("`seq` takes 8..=512, a multiple of 8"), "{rendered}");
    }
    let (_, r) = kiln_lower::load_str("m.ron", text, &[Override { name: "seq".into(), value: "64".into() }]);
    let g = r.expect("64 is inside the bounds").graph;
    assert_eq!(g.ty(g.outputs[0].1).shape, vec![64]);
}

/// `--set NAME=Dyn(…)` makes a static entry of a shipped model dynamic: the graph is the one
/// of the model written with that `Dyn`, and bad bounds are errors that point into the
/// `--set` text.
#[test]
fn set_makes_a_static_size_dynamic() {
    let set = |s: &str| Override::parse(s).expect("name=value");
    let small = ["layers=2", "vocab=40", "hidden=16", "heads=2", "ffn=32", "max_positions=64"];
    let dynamic = ["batch=Dyn(min: 1, max: 8, hint: 2)", "seq=Dyn(min: 1, max: \"max_positions\", hint: 16)"];
    let overrides: Vec<Override> = small.iter().chain(&dynamic).map(|s| set(s)).collect();
    let (sources, r) = kiln_lower::load(Path::new("models/bert_encoder.ron"), &overrides);
    let g = r.unwrap_or_else(|d| panic!("{}", d.render(&sources))).graph;
    let names: Vec<&str> = g.symbols.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["batch", "seq"]);
    assert_eq!((g.symbols[1].min, g.symbols[1].max, g.symbols[1].hint), (1, 64, 16));
    // The same graph as the model written with those declarations.
    let text = std::fs::read_to_string("models/bert_encoder.ron").expect("model");
    let text = with_dynamic(
        &text,
        r#""batch": 1, "seq": 128,"#,
        r#""batch": Dyn(min: 1, max: 8, hint: 2), "seq": Dyn(min: 1, max: "max_positions", hint: 16),"#,
    );
    let small_sets: Vec<Override> = small.iter().map(|s| set(s)).collect();
    let (sources, r) = kiln_lower::load_str("models/bert_encoder.ron", &text, &small_sets);
    let written = r.unwrap_or_else(|d| panic!("{}", d.render(&sources))).graph;
    let print = |g: &kiln_ir::Graph| kiln_ir::print::to_text(g, Default::default());
    assert_eq!(print(&g), print(&written));

    // Errors, each pointing into the `--set` text where it can.
    let err = |value: &str| {
        let overrides = [set(&format!("seq={value}"))];
        let (sources, r) = kiln_lower::load(Path::new("models/bert_encoder.ron"), &overrides);
        r.expect_err(value).render(&sources)
    };
    assert_eq!(
        err("Dyn(min: 1, max: 5)"),
        "error: `Dyn` is missing the field `hint`\n  ┌─ --set seq:1:1\n  │\n1 │ Dyn(min: 1, max: 5)\n  │ ^^^^^^^^^^^^^^^^^^^ needs `hint: …`\n\n"
    );
    assert_eq!(
        err("Dynamic"),
        "error: a dynamic size is written `Dyn(min: …, max: …, hint: …[, multiple_of: …])`\n  ┌─ --set seq:1:1\n  │\n1 │ Dynamic\n  │ ^^^^^^^ not a `Dyn(…)`\n\n"
    );
    let long = err("Dyn(min: 1, max: 1024, hint: 128)");
    assert!(
        long.starts_with("error: the slice bound `len` reaches 1024 for the dynamic size `seq` in its bounds, past the axis's 512 entries")
            && long.contains("┌─ --set seq:1:1")
            && long.contains("`seq` is declared dynamic here"),
        "{long}"
    );
    let (sources, r) =
        kiln_lower::load(Path::new("models/bert_encoder.ron"), &[set("seed=Dyn(min: 1, max: 2, hint: 1)")]);
    assert_eq!(
        r.expect_err("seed").render(&sources),
        "error: --set seed=Dyn(…): the built-in config `seed` cannot be a dynamic size\n\n"
    );
}

/// Modules that call each other 300 deep (each a different module, so no cycle): lowering
/// refuses past its nesting limit instead of overflowing the stack (this runs on a test
/// thread's 2 MiB stack).
#[test]
fn deeply_nested_module_calls_are_an_error() {
    let n = 300;
    let modules: Vec<String> = (0..n)
        .map(|i| {
            let body = if i + 1 < n {
                format!("Let(\"x\", Call(fn: \"m{}\", args: [\"x\"]))", i + 1)
            } else {
                String::new()
            };
            format!("\"m{i}\": Module(args: [\"x\"], body: [{body}], ret: [\"x\"]),")
        })
        .collect();
    let text = format!(
        "Model(name: \"deep\", inputs: {{ \"x\": (f32, [2]) }}, modules: {{ {} }}, body: [Let(\"y\", Call(fn: \"m0\", args: [\"x\"]))], outputs: [\"y\"])",
        modules.join("\n")
    );
    let (sources, r) = kiln_lower::load_str("deep.ron", &text, &[]);
    let d = r.expect_err("too deep");
    let msg = d.render(&sources);
    assert_eq!(d.0.len(), 1, "one diagnostic, no follow-on errors: {msg}");
    assert!(
        msg.contains(&format!(
            "error: expressions and module calls nest more than {} levels deep",
            kiln_lower::MAX_NESTING
        )),
        "{msg}"
    );
}

/// Config overrides that no model means: each is an error from the lowering, never a panic.
#[test]
fn builtin_config_and_nan_overrides_are_errors() {
    let set = |s: &str| Override::parse(s).expect("name=value");
    for (o, want) in [
        ("seed=-1", "config `seed` must be a non-negative integer, but it is -1"),
        ("seed=0.5", "config `seed` must be a non-negative integer, but it is 0.5"),
        ("seed=NaN", "--set seed=NaN: NaN is not a valid config value"),
        ("training=2", "config `training` must be true or false, but it is 2"),
        ("batch=nan", "--set batch=nan: NaN is not a valid config value"),
    ] {
        let (sources, r) = kiln_lower::load(Path::new("models/mlp.ron"), &[set(o)]);
        let msg = r.expect_err(o).render(&sources);
        assert!(msg.contains(want), "{o}: {msg}");
    }
}

/// Every config entry of every shipped model at each end of i64, one at a time, and the pair
/// the extreme-override fuzz found (GPT-2 with `d=0`, so every tensor is empty, and
/// `heads=i64::MAX`: a reshape's known extents multiplied past usize): a graph or
/// diagnostics, never a panic.
#[test]
fn every_config_entry_at_the_ends_of_i64_lowers_or_is_an_error() {
    let set = |s: &str| Override::parse(s).expect("name=value");
    let gpt2 = std::fs::read_to_string("models/gpt2.ron").expect("model");
    front_end_with(&gpt2, &[set("d=0"), set("heads=9223372036854775807")]);
    for m in shipped_models() {
        let text = std::fs::read_to_string(&m).expect("model");
        let (_, r) = kiln_lower::load_str("m.ron", &text, &[]);
        for (name, _) in r.expect("shipped models lower").config {
            for value in ["9223372036854775807", "-9223372036854775808"] {
                front_end_with(&text, &[Override { name: name.clone(), value: value.into() }]);
            }
        }
    }
}

// ------------------------------------------------------------------ the CLI

fn kiln(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().expect("kiln runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-specs-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// `vm.overcommit_memory = 1` grants any allocation (the OOM killer decides later), so a
/// refusal cannot be observed there.
fn refuses_huge_allocations() -> bool {
    std::fs::read_to_string("/proc/sys/vm/overcommit_memory").map_or(true, |s| s.trim() != "1")
}

#[test]
fn cli_memory_limits_are_errors_not_aborts() {
    if !refuses_huge_allocations() {
        eprintln!("skipped: vm.overcommit_memory = 1 grants any allocation");
        return;
    }
    // The input the interpreter would fill: 10^8 × 784 f32.
    let (code, out, err) = kiln(&["eval", "models/mlp.ron", "--set", "batch=100000000"]);
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    assert!(
        err.contains(
            "error: cannot allocate 292.1 GiB (313600000000 bytes) for input `image` f32[100000000, 784]"
        ),
        "{err}"
    );
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "{err}");
    // A parameter sized by config: 2^20 × 2^20 f32 weights (4 TiB).
    let (code, _, err) = kiln(&[
        "eval",
        "models/mlp.ron",
        "--set",
        "in=1048576",
        "--set",
        "hidden1=1048576",
        "--set",
        "batch=1",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(
            "cannot allocate 4.0 TiB (4398046511104 bytes) for parameter `fc1.weight` f32[1048576, 1048576]"
        ),
        "{err}"
    );
}

#[test]
fn cli_zero_extents_give_empty_results() {
    for cmd in ["check", "eval"] {
        let (code, out, err) = kiln(&[cmd, "models/seed_transformer.ron", "--set", "batch=0"]);
        assert_eq!(code, 0, "{cmd}: {err}");
        assert!(out.contains("f32[0, 32, 512]"), "{cmd}: {out}");
    }
    // Native code is not generated for empty tensors yet: a clear error, not a panic in an
    // emitter or a crash in a kernel.
    let dir = temp_dir("empty");
    let artifact = dir.join("m.kiln");
    for args in [
        vec![
            "compile",
            "models/resnet_block.ron",
            "-o",
            artifact.to_str().unwrap_or_default(),
            "--set",
            "batch=0",
        ],
        vec!["run", "models/seed_transformer.ron", "--set", "batch=0"],
        vec!["inspect", "models/mlp.ron", "--stage", "mlir", "--set", "batch=0"],
    ] {
        let (code, _, err) = kiln(&args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(
            err.contains("has no elements") && err.contains("`kiln eval` computes the empty result"),
            "{err}"
        );
    }
}

#[test]
fn cli_refuses_huge_spec_files_and_repeated_or_ignored_arguments() {
    #[cfg(unix)]
    {
        let (code, _, err) = kiln(&["check", "/dev/zero"]);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("error: `/dev/zero` is larger than 16 MiB, the limit for a spec file"), "{err}");
    }
    let dir = temp_dir("repeated");
    let image = dir.join("image.npy");
    let t = kiln_ir::Tensor::full(kiln_ir::DType::F32, vec![8, 784], 0.5);
    kiln_ir::tensor_io::write_npy(&image, &t).expect("writes");
    let arg = format!("image={}", image.display());
    let (code, _, err) = kiln(&["eval", "models/mlp.ron", "--input", &arg, "--input", &arg]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("error: input `image` is given twice"), "{err}");
    // An artifact has its weights and config built in.
    for extra in [&["--weights", "w.safetensors"][..], &["--set", "batch=2"], &["--init-missing"]] {
        let mut args = vec!["run", "no-such.kiln"];
        args.extend_from_slice(extra);
        let (code, _, err) = kiln(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(&format!("{} applies only when running a model spec", extra[0])), "{err}");
    }
    // The seed is also the config `seed`, an i64.
    let (code, _, err) = kiln(&["eval", "models/mlp.ron", "--seed", "9223372036854775808"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("9223372036854775808 is not in 0..=9223372036854775807"), "{err}");
    let (code, _, err) = kiln(&["run", "no-such.kiln", "--threads", "100000"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("error: --threads 100000 is more than 1024"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["run", "no-such.kiln"])
        .env("KILN_THREADS", "99999999999999999999")
        .output()
        .expect("kiln runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("error: KILN_THREADS=99999999999999999999 is more than 1024"), "{err}");
}

#[test]
fn cli_reports_spec_errors_with_exit_code_1() {
    let (code, out, err) = kiln(&["check", "tests/specs/errors/unknown_op.ron"]);
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    assert!(err.contains("error: unknown op `Sofmax`"), "{err}");
    assert!(err.contains("tests/specs/errors/unknown_op.ron:6:18"), "{err}");
}

#[test]
fn cli_reports_an_unreadable_model_or_input_file() {
    let (code, _, err) = kiln(&["check", "no/such/model.ron"]);
    assert_eq!(code, 1);
    assert!(err.contains("error: cannot read `no/such/model.ron`: No such file or directory"), "{err}");
    let (code, _, err) = kiln(&["eval", "models/mlp.ron", "--input", "image=no/such/image.npy"]);
    assert_eq!(code, 1);
    assert!(err.contains("no/such/image.npy"), "{err}");
    assert!(err.contains("No such file or directory"), "{err}");
}

#[test]
fn cli_reports_missing_and_mismatched_weights() {
    let dir = temp_dir("weights");
    let params = dir.join("params.safetensors");
    let p = params.to_str().expect("utf-8 path");
    let (code, _, err) = kiln(&["eval", "models/mlp.ron", "--save-params", p]);
    assert_eq!(code, 0, "{err}");
    // The same weights load back, and give the same outputs.
    let (code, _, err) = kiln(&["eval", "models/mlp.ron", "--weights", p]);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("warning"), "{err}");
    // A smaller model: fc2 and fc3 have other shapes; clear errors listing names and shapes.
    let (code, _, err) = kiln(&["eval", "models/mlp.ron", "--weights", p, "--set", "hidden2=64"]);
    assert_eq!(code, 1);
    assert!(err.contains("fc2.weight"), "{err}");
    assert!(err.contains("[128, 256]") && err.contains("[64, 256]"), "{err}");
    // A model with parameters the file lacks.
    let (code, _, err) = kiln(&["eval", "models/lstm.ron", "--weights", p]);
    assert_eq!(code, 1);
    assert!(err.contains("missing weights"), "{err}");
    assert!(err.contains("lstm.weight_ih"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Tensors the model does not use (a checkpoint's buffers and heads) are a warning, on every
/// command that takes `--weights`; a misspelt name is still caught.
#[test]
fn cli_warns_about_unused_weights() {
    let dir = temp_dir("unused-weights");
    let params = dir.join("params.safetensors");
    let p = params.to_str().expect("utf-8 path");
    let (code, _, err) = kiln(&["eval", "models/mlp.ron", "--save-params", p]);
    assert_eq!(code, 0, "{err}");
    let saved = kiln_ir::tensor_io::read_safetensors(&params).expect("saved parameters");
    let extra_ids = kiln_ir::Tensor::new(vec![1, 3], kiln_ir::Buffer::I64(vec![0, 1, 2])).expect("tensor");
    let extra_bias = kiln_ir::Tensor::full(kiln_ir::DType::F32, vec![4], 0.5);

    // The file plus a checkpoint's extras: loads, with a warning naming them.
    let extra = dir.join("extra.safetensors");
    let mut tensors = saved.clone();
    tensors.push(("embeddings.position_ids".into(), extra_ids));
    tensors.push(("pooler.dense.bias".into(), extra_bias));
    kiln_ir::tensor_io::write_safetensors(&extra, &tensors).expect("write");
    let e = extra.to_str().expect("utf-8 path");
    let (code, out_plain, err) = kiln(&["eval", "models/mlp.ron", "--weights", p]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = kiln(&["eval", "models/mlp.ron", "--weights", e]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(
            "warning: ignoring 2 tensors in the weights file that the model does not use: \
             embeddings.position_ids, pooler.dense.bias"
        ),
        "{err}"
    );
    let outputs = |s: &str| s.lines().filter(|l| !l.starts_with("evaluated")).collect::<Vec<_>>().join("\n");
    assert_eq!(outputs(&out), outputs(&out_plain), "the extra tensors changed the outputs");
    let artifact = dir.join("mlp.kiln");
    let a = artifact.to_str().expect("utf-8 path");
    let (code, _, err) = kiln(&["compile", "models/mlp.ron", "--weights", e, "-o", a]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("warning: ignoring 2 tensors"), "{err}");
    let (code, _, err) = kiln(&["run", "models/mlp.ron", "--weights", e, "--repeats", "1"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("warning: ignoring 2 tensors"), "{err}");

    // A misspelt name: an error with a hint, or with --init-missing a warning that says which
    // parameter was initialized instead.
    let typo = dir.join("typo.safetensors");
    let renamed: Vec<_> = saved
        .iter()
        .map(|(n, t)| (if n == "fc2.bias" { "fc2.bais".to_string() } else { n.clone() }, t.clone()))
        .collect();
    kiln_ir::tensor_io::write_safetensors(&typo, &renamed).expect("write");
    let t = typo.to_str().expect("utf-8 path");
    let (code, _, err) = kiln(&["eval", "models/mlp.ron", "--weights", t]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("missing weights for 1 parameter: fc2.bias (did you mean `fc2.bais`?)"), "{err}");
    let (code, _, err) = kiln(&["eval", "models/mlp.ron", "--weights", t, "--init-missing"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(
            "warning: ignoring 1 tensor in the weights file that the model does not use: fc2.bais \
             (did you mean parameter `fc2.bias`? it was initialized instead)"
        ),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn cli_usage_errors_exit_with_2_and_help_is_there() {
    let (code, _, _) = kiln(&["frobnicate"]);
    assert_eq!(code, 2);
    let (code, _, err) = kiln(&["check", "models/mlp.ron", "--set", "nonsense"]);
    assert_eq!(code, 2, "{err}");
    for cmd in [&["help"][..], &["--help"], &["check", "--help"], &["inspect", "--help"], &["eval", "--help"]]
    {
        let (code, out, _) = kiln(cmd);
        assert_eq!(code, 0, "{cmd:?}");
        assert!(out.contains("Usage"), "{cmd:?}: {out}");
    }
}

#[test]
fn cli_inspect_prints_every_format() {
    let (code, out, _) = kiln(&["inspect", "models/mlp.ron", "--stage", "ir"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("graph mlp {"), "{out}");
    let (code, out, _) = kiln(&["inspect", "models/mlp.ron", "--format", "dot"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("digraph \"mlp\""), "{out}");
    let (code, out, _) = kiln(&["inspect", "models/mlp.ron", "--format", "json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
    assert_eq!(v["name"], "mlp");
    assert_eq!(v["outputs"].as_array().map(Vec::len), Some(2));
    let (code, out, _) = kiln(&["inspect", "models/bert_encoder.ron", "--stage", "spec"]);
    assert_eq!(code, 0);
    assert!(out.contains("module layer calls: std.linear, std.attention, std.layer_norm, std.gelu"), "{out}");
    let (code, out, _) = kiln(&[
        "inspect",
        "models/bert_encoder.ron",
        "--stage",
        "opt",
        "--format",
        "dot",
        "--set",
        "layers=1",
    ]);
    assert_eq!(code, 0);
    assert!(out.contains("attention") && out.contains("fillcolor=gold"), "{out}");
    let (code, out, _) = kiln(&[
        "inspect",
        "models/bert_encoder.ron",
        "--stage",
        "opt",
        "--format",
        "json",
        "--set",
        "layers=2",
    ]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
    assert_eq!(v["op_counts"]["attention"], 2);
    for key in [
        "rules_fired",
        "cost_before",
        "cost_after",
        "egraph_nodes",
        "egraph_classes",
        "iterations",
        "stop_reason",
        "time_ms",
        "graph",
    ] {
        assert!(!v[key].is_null(), "{key} missing from the report");
    }
    let (code, out, _) =
        kiln(&["inspect", "models/gpt2.ron", "--stage", "opt", "--explain", "--set", "layers=1"]);
    assert_eq!(code, 0);
    assert!(out.contains("attention {scale = 0.125, causal = true, masked = false}"), "{out}");
    assert!(out.contains("rules: fuse-softmax → fuse-attention"), "{out}");
    assert!(out.contains("from: models/std.ron:"), "{out}");
    let (code, out, _) = kiln(&["inspect", "models/mlp.ron", "--stage", "ir", "--origins"]);
    assert_eq!(code, 0);
    assert!(out.contains("# logits models/std.ron:"), "{out}");
}

#[test]
fn cli_eval_writes_outputs_in_every_format() {
    let dir = temp_dir("outputs");
    let st = dir.join("out.safetensors");
    let (code, out, err) = kiln(&["eval", "models/mlp.ron", "-o", st.to_str().unwrap_or_default()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("logits: f32[8, 10]"), "{out}");
    assert!(out.contains("mean") && out.contains("std"), "{out}");
    assert!(err.contains("input `image` not given: filled with standard normal values (seed 0)"), "{err}");
    let read = kiln_ir::tensor_io::read_safetensors(&st).expect("readable outputs");
    assert_eq!(read.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), vec!["logits", "probs"]);
    // Feed one output back as an input file: the image of a second model run.
    let folder = dir.join("each");
    let (code, _, err) = kiln(&["eval", "models/mlp.ron", "-o", folder.to_str().unwrap_or_default()]);
    assert_eq!(code, 0, "{err}");
    assert!(folder.join("logits.npy").is_file() && folder.join("probs.npy").is_file());
    let _ = std::fs::remove_dir_all(dir);
}

// ------------------------------------------------------------------ docs and robustness

#[test]
fn every_op_of_the_language_is_documented() {
    let doc = std::fs::read_to_string("docs/spec-language.md").expect("docs/spec-language.md exists");
    let missing: Vec<&str> = kiln_spec::ops::OPS
        .iter()
        .map(|o| o.name)
        .filter(|name| !doc.lines().any(|l| l.trim() == format!("### {name}")))
        .collect();
    assert!(missing.is_empty(), "ops without a `### Name` section in docs/spec-language.md: {missing:?}");
}

/// Lowers text as a model, asserting only that the front end returns (no panic, no hang).
fn front_end(text: &str) {
    front_end_with(text, &[]);
}

fn front_end_with(text: &str, overrides: &[Override]) {
    let (sources, result) = kiln_lower::load_str("fuzz.ron", text, overrides);
    if let Err(d) = result {
        // Rendering must not panic either, whatever the spans are.
        let _ = d.render(&sources);
    }
}

/// Pieces of the language to splice into a model: tokens, ops, odd numbers and expressions.
const FRAGMENTS: &[&str] = &[
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    ",",
    ":",
    "\"",
    "\"x\"",
    "-1",
    "0",
    "1e309",
    "-0.0",
    "9223372036854775807",
    "Add(\"x\", \"x\")",
    "Reshape(\"x\", [-1, -1])",
    "Slice(x: \"x\", axis: 9)",
    "\"dim(x, 99)\"",
    "\"1 / 0\"",
    "\"2 ** 64\"",
    "\"d // 0\"",
    "Param(shape: [99999999999, 99999999999])",
    "Call(fn: \"std.linear\", args: [])",
    "Repeat(n: 1000000000, body: [])",
    "Split(x: \"x\", axis: 0, sizes: 0)",
    "Transpose(\"x\", [0, 0])",
    "Concat(xs: [], axis: 0)",
    "Gather(\"x\", 1.5)",
    "Conv2d(x: \"x\", w: \"x\", groups: 0)",
    "MaxPool2d(x: \"x\", kernel: 0)",
    "Iota(shape: [3], axis: -4)",
    "Const([[1], [2, 3]])",
    "If(cond: 1, then: 1, else: 2)",
    "Scalar(\"inf\")",
    "/*",
    "//",
    "r#\"",
    "'",
    "\\u{110000}",
    "Let(\"x\", \"x\")",
    "Dyn(min: 1, max: 64, hint: 8, multiple_of: 4)",
    "Dyn(min: -9223372036854775808, max: 9223372036854775807, hint: 0, multiple_of: 0)",
    "\"seq * 9223372036854775807 // 3 % 2\"",
    "𝕜",
    "\u{0}",
];

/// `--set` values at the edges: zero, negative, the ends of i64, past them, huge and tiny
/// floats, infinities, NaN, a bool and a fraction. Repeat counts between a few thousand and
/// `MAX_REPEAT` are left out on purpose: they lower correctly but slowly (a 100,000-layer
/// BERT reaches the 2,000,000-op limit in about 15 s of a debug build).
const EXTREME_VALUES: &[&str] = &[
    "0",
    "-1",
    "1",
    "3",
    "-9223372036854775808",
    "9223372036854775807",
    "9223372036854775808",
    "4294967296",
    "1e308",
    "-1e-308",
    "inf",
    "-inf",
    "nan",
    "NaN",
    "true",
    "0.5",
];

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: std::env::var("KILN_FUZZ_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(192), ..Default::default() })]

    /// Shipped models lowered with one or two config entries (or a built-in) set to extreme
    /// values: every case returns a graph or diagnostics, never a panic or a hang.
    #[test]
    fn front_end_never_panics_on_extreme_overrides(
        model in 0usize..6,
        sets in proptest::collection::vec((0usize..64, 0usize..EXTREME_VALUES.len()), 1..3),
    ) {
        let models = ["mlp", "lstm", "resnet_block", "seed_transformer", "bert_encoder", "gpt2"];
        let text = std::fs::read_to_string(format!("models/{}.ron", models[model])).expect("model");
        let (_, r) = kiln_lower::load_str("m.ron", &text, &[]);
        let mut names: Vec<String> = r.expect("shipped models lower").config.into_iter().map(|(k, _)| k).collect();
        names.sort();
        let overrides: Vec<Override> = sets
            .iter()
            .map(|&(n, v)| Override { name: names[n % names.len()].clone(), value: EXTREME_VALUES[v].to_string() })
            .collect();
        front_end_with(&text, &overrides);
    }

    /// Any value a symbol admits specializes it: the model lowers, and an entry computed
    /// from it (`seq * 2`, `seq / m`) takes its static value.
    #[test]
    fn specializing_within_the_bounds_always_lowers(
        multiple in 1i64..9,
        lo in 1i64..40,
        width in 0i64..40,
        hint_at in 0i64..40,
        pick in 0i64..40,
    ) {
        let (min, max) = (lo * multiple, (lo + width) * multiple);
        let hint = (lo + hint_at % (width + 1)) * multiple;
        let value = (lo + pick % (width + 1)) * multiple;
        let text = format!(
            r#"Model(
    name: "m",
    config: {{ "seq": Dyn(min: {min}, max: {max}, hint: {hint}, multiple_of: {multiple}), "tokens": "seq * 2", "rows": "seq / {multiple}" }},
    inputs: {{ "x": (f32, ["seq", 2]) }},
    body: [ Let("y", Reshape("x", ["tokens"])), Let("z", Reshape("x", ["rows", "2 * {multiple}"])) ],
    outputs: ["y", "z"],
)"#
        );
        let (sources, r) = kiln_lower::load_str("m.ron", &text, &[Override { name: "seq".into(), value: value.to_string() }]);
        let g = r.unwrap_or_else(|d| panic!("seq={value}:\n{}", d.render(&sources))).graph;
        proptest::prop_assert_eq!(&g.ty(g.outputs[0].1).shape, &vec![2 * value as usize]);
        proptest::prop_assert_eq!(&g.ty(g.outputs[1].1).shape, &vec![(value / multiple) as usize, 2 * multiple as usize]);
        // One past the maximum is refused.
        let (_, r) = kiln_lower::load_str("m.ron", &text, &[Override { name: "seq".into(), value: (max + multiple).to_string() }]);
        proptest::prop_assert!(r.is_err());
        // Left symbolic, the graph specialized at the value is the `--set` graph. (`rows`
        // is `seq//m` in the normal form, whose product with `2*m` is not provably `2*seq`:
        // only the reshape to `tokens` is kept.)
        let text = text.replace(r#", Let("z", Reshape("x", ["rows", "2 * {multiple}"])) ]"#.replace("{multiple}", &multiple.to_string()).as_str(), r#", Let("z", Concat(xs: ["x", "x"], axis: 0)) ]"#);
        let (sources, r) = kiln_lower::load_str("m.ron", &text, &[]);
        let symbolic = r.unwrap_or_else(|d| panic!("symbolic:\n{}", d.render(&sources))).graph;
        let (_, r) = kiln_lower::load_str("m.ron", &text, &[Override { name: "seq".into(), value: value.to_string() }]);
        let set = r.expect("the specialized model lowers").graph;
        let at = symbolic.specialize(&[value]).expect("specializes");
        proptest::prop_assert_eq!(
            kiln_ir::print::to_text(&at, Default::default()),
            kiln_ir::print::to_text(&set, Default::default())
        );
    }

    #[test]
    fn front_end_never_panics_on_random_text(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
        front_end(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn front_end_never_panics_on_mutated_models(
        model in 0usize..6,
        edits in proptest::collection::vec((0usize..100_000, 0usize..40, 0usize..FRAGMENTS.len(), 0u8..3), 1..6),
    ) {
        let models = ["mlp", "lstm", "resnet_block", "seed_transformer", "bert_encoder", "gpt2"];
        let mut text = std::fs::read_to_string(format!("models/{}.ron", models[model])).expect("model");
        // Keep the unrolled graphs small so each case stays fast.
        text = text.replace("\"layers\": 12", "\"layers\": 1").replace("\"layers\": 6", "\"layers\": 1");
        for (at, len, frag, kind) in edits {
            let mut at = at % (text.len() + 1);
            while !text.is_char_boundary(at) { at -= 1; }
            let mut end = (at + len).min(text.len());
            while !text.is_char_boundary(end) { end -= 1; }
            match kind {
                0 => text.replace_range(at..end, ""),
                1 => text.insert_str(at, FRAGMENTS[frag]),
                _ => text.replace_range(at..end, FRAGMENTS[frag]),
            }
        }
        front_end(&text);
    }
}
