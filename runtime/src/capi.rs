//! The C ABI (`libkiln_runtime.so`, declared in `include/kiln.h`): a model handle, its input and
//! output descriptions, and `kiln_model_run`; a training artifact's entry points
//! (`kiln_model_run_entry`) and persistent state (`kiln_model_read_state`, `_write_state`).
//! Errors and panics never cross the boundary: each function returns NULL or nonzero and
//! leaves a message for `kiln_last_error`.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::OnceLock;

use crate::manifest::{DType, TensorSpec};
use crate::model::{Model, Options};
use crate::symbols::SymbolSpec;
use crate::tensor::TensorRef;
use crate::RuntimeError;

/// A loaded model with its names and shapes in C form, kept so returned pointers stay valid
/// until `kiln_model_free`.
pub struct KilnModel {
    /// Reached only by the caller that set `busy` (see [`RunGuard`]), so two threads calling
    /// `kiln_model_run` on one handle get an error instead of sharing the arena.
    model: std::cell::UnsafeCell<Model>,
    /// Set for the duration of a run, or of a state read or write.
    busy: std::sync::atomic::AtomicBool,
    /// The entry points, `forward` first.
    entries: Vec<CEntry>,
    /// The persistent state, in the manifest's order.
    state: Vec<CSpec>,
    /// The symbols' names in C form, with their bounds.
    symbols: Vec<(CString, SymbolSpec)>,
    /// The symbols as the manifest declares them (to print shapes over them).
    symbol_specs: Vec<SymbolSpec>,
}

/// An entry point's name and interface in C form.
struct CEntry {
    name: CString,
    inputs: Vec<CSpec>,
    outputs: Vec<CSpec>,
}

struct CSpec {
    name: CString,
    /// The extents, `-1` where an extent depends on a symbol.
    shape: Vec<i64>,
    dtype: DType,
    /// The byte size, at the symbols' maxima when it depends on them.
    bytes: usize,
    /// The manifest's spec, to build `TensorRef`s without borrowing the model.
    spec: TensorSpec,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(message: impl Into<String>) {
    let mut message = message.into();
    message.retain(|c| c != '\0');
    let message = CString::new(message).unwrap_or_default();
    LAST_ERROR.with(|slot| *slot.borrow_mut() = message);
}

/// Runs `body`, turning its error or panic into `fallback` plus a `kiln_last_error` message.
fn guard<T>(fallback: T, body: impl FnOnce() -> Result<T, String>) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(value)) => value,
        Ok(Err(message)) => {
            set_error(message);
            fallback
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            set_error(format!("internal error in kiln-runtime (please report): {what}"));
            fallback
        }
    }
}

fn c_dtype(dtype: DType) -> &'static CStr {
    match dtype {
        DType::F32 => c"f32",
        DType::F64 => c"f64",
        DType::F16 => c"f16",
        DType::BF16 => c"bf16",
        DType::I32 => c"i32",
        DType::I64 => c"i64",
        DType::Bool => c"bool",
    }
}

/// The C view of `spec`; `maxima` are the symbols' largest values.
fn c_spec(spec: &TensorSpec, maxima: &[u64]) -> Result<CSpec, String> {
    let name =
        CString::new(spec.name.clone()).map_err(|_| format!("tensor name {:?} contains NUL", spec.name))?;
    let shape = spec
        .shape
        .iter()
        .map(|d| match d.fixed() {
            None => Ok(-1),
            Some(d) => i64::try_from(d).map_err(|_| format!("{:?} has an extent over i64::MAX", spec.name)),
        })
        .collect::<Result<_, _>>()?;
    // Model::from_parts already refused sizes (at the maxima) that do not fit usize.
    let bytes = spec.byte_len_at(maxima).and_then(|n| usize::try_from(n).ok()).unwrap_or(usize::MAX);
    Ok(CSpec { name, shape, dtype: spec.dtype, bytes, spec: spec.clone() })
}

fn model_ref<'a>(model: *const KilnModel) -> Result<&'a KilnModel, String> {
    // SAFETY: the C contract: `model` is NULL or a live pointer from kiln_model_load.
    unsafe { model.as_ref() }.ok_or_else(|| "model is NULL".to_string())
}

fn entry_at<'a>(model: *const KilnModel, entry: usize) -> Result<&'a CEntry, String> {
    let m = model_ref(model)?;
    m.entries.get(entry).ok_or_else(|| {
        format!("entry point {entry} does not exist: the model has {} entry points", m.entries.len())
    })
}

/// Input or output `i` of entry point `entry` (0: `forward`).
fn spec_at<'a>(model: *const KilnModel, entry: usize, i: usize, outputs: bool) -> Result<&'a CSpec, String> {
    let e = entry_at(model, entry)?;
    let (kind, specs) = if outputs { ("output", &e.outputs) } else { ("input", &e.inputs) };
    specs.get(i).ok_or_else(|| match entry {
        0 => format!("{kind} {i} does not exist: the model has {} {kind}s", specs.len()),
        _ => format!(
            "{kind} {i} of entry point `{}` does not exist: it has {} {kind}s",
            e.name.to_string_lossy(),
            specs.len()
        ),
    })
}

/// State tensor `i`.
fn state_at<'a>(model: *const KilnModel, i: usize) -> Result<&'a CSpec, String> {
    let m = model_ref(model)?;
    m.state.get(i).ok_or_else(|| match m.state.len() {
        0 => format!("state {i} does not exist: the model keeps no state"),
        n => format!("state {i} does not exist: the model keeps {n} state tensors"),
    })
}

/// A C string argument that must be there.
fn c_arg<'a>(text: *const c_char, what: &str) -> Result<&'a str, String> {
    if text.is_null() {
        return Err(format!("{what} is NULL"));
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    unsafe { CStr::from_ptr(text) }.to_str().map_err(|_| format!("{what} is not UTF-8"))
}

/// Loads the artifact directory `dir` with `threads` worker threads (0: `KILN_THREADS`, else
/// every core). Returns NULL on error; see `kiln_last_error`.
///
/// # Safety
///
/// `dir` must be NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_load_with_threads(dir: *const c_char, threads: usize) -> *mut KilnModel {
    // SAFETY: same contract; a NULL device takes the artifact's default.
    unsafe { kiln_model_load_on(dir, ptr::null(), threads) }
}

/// Loads the artifact directory `dir` on `device` (`"cpu"`, `"vulkan"`, `"vulkan:N"`, `"cuda"`,
/// `"cuda:N"`; NULL: the kind of device the artifact was compiled for) with `threads` worker threads for a CPU model
/// (0: the default). Returns NULL on error; see `kiln_last_error`.
///
/// # Safety
///
/// `dir` and `device` must each be NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_load_on(
    dir: *const c_char,
    device: *const c_char,
    threads: usize,
) -> *mut KilnModel {
    guard(ptr::null_mut(), || {
        if dir.is_null() {
            return Err("directory is NULL".into());
        }
        // SAFETY: non-NULL and NUL-terminated by the caller's contract.
        let dir =
            unsafe { CStr::from_ptr(dir) }.to_str().map_err(|_| "directory is not UTF-8".to_string())?;
        let device = if device.is_null() {
            None
        } else {
            // SAFETY: non-NULL and NUL-terminated by the caller's contract.
            let text = unsafe { CStr::from_ptr(device) };
            Some(text.to_str().map_err(|_| "device is not UTF-8".to_string())?.to_string())
        };
        let options = Options { threads: (threads > 0).then_some(threads), device };
        let model = Model::load_with(dir, &options).map_err(|e| e.to_string())?;
        let maxima = model.manifest().max_values();
        let symbol_specs = model.symbols().to_vec();
        let symbols = symbol_specs
            .iter()
            .map(|s| {
                let name =
                    CString::new(s.name.clone()).map_err(|_| format!("symbol {:?} contains NUL", s.name))?;
                Ok((name, s.clone()))
            })
            .collect::<Result<_, String>>()?;
        let entries = model
            .manifest()
            .entry_views()
            .iter()
            .map(|e| {
                let name =
                    CString::new(e.name).map_err(|_| format!("entry point {:?} contains NUL", e.name))?;
                let inputs = e.inputs.iter().map(|s| c_spec(s, &maxima)).collect::<Result<_, _>>()?;
                let outputs = e.outputs.iter().map(|s| c_spec(s, &maxima)).collect::<Result<_, _>>()?;
                Ok(CEntry { name, inputs, outputs })
            })
            .collect::<Result<_, String>>()?;
        let state = model
            .state()
            .iter()
            .map(|s| c_spec(&TensorSpec::fixed(s.name.clone(), s.dtype, &s.shape), &[]))
            .collect::<Result<_, _>>()?;
        let (model, busy) = (std::cell::UnsafeCell::new(model), std::sync::atomic::AtomicBool::new(false));
        Ok(Box::into_raw(Box::new(KilnModel { model, busy, entries, state, symbols, symbol_specs })))
    })
}

/// This machine's devices, listed once per process (the C strings live as long as it does).
struct CDevices {
    /// `(id, one-line description)` of each device, the CPU first.
    devices: Vec<(CString, CString)>,
    /// Why Vulkan cannot be used, or "".
    vulkan_unavailable: CString,
    /// Why CUDA cannot be used, or "".
    cuda_unavailable: CString,
}

fn c_devices() -> &'static CDevices {
    static DEVICES: OnceLock<CDevices> = OnceLock::new();
    DEVICES.get_or_init(|| {
        let listed = crate::device::devices();
        let c = |text: String| CString::new(text.replace('\0', "")).unwrap_or_default();
        CDevices {
            devices: listed.devices.iter().map(|d| (c(d.id()), c(d.to_string()))).collect(),
            vulkan_unavailable: c(listed.vulkan_unavailable.unwrap_or_default()),
            cuda_unavailable: c(listed.cuda_unavailable.unwrap_or_default()),
        }
    })
}

/// Number of devices models can be loaded on: the CPU, then each Vulkan device, then each CUDA
/// device.
#[no_mangle]
pub extern "C" fn kiln_device_count() -> usize {
    guard(0, || Ok(c_devices().devices.len()))
}

/// The selector of device `i` (`"cpu"`, `"vulkan:0"`, `"cuda:0"`…), for `kiln_model_load_on`; NULL if out of
/// range. Static string.
#[no_mangle]
pub extern "C" fn kiln_device_name(i: usize) -> *const c_char {
    guard(ptr::null(), || device_at(i).map(|d| d.0.as_ptr()))
}

/// One line describing device `i` (name, type or architecture, version, limits); NULL if out of
/// range.
/// Static string.
#[no_mangle]
pub extern "C" fn kiln_device_description(i: usize) -> *const c_char {
    guard(ptr::null(), || device_at(i).map(|d| d.1.as_ptr()))
}

/// Why no Vulkan device is listed (no loader, no device…), or "" when Vulkan is usable.
/// Static string.
#[no_mangle]
pub extern "C" fn kiln_vulkan_unavailable_reason() -> *const c_char {
    guard(ptr::null(), || Ok(c_devices().vulkan_unavailable.as_ptr()))
}

/// Why no CUDA device is listed (no `libcuda.so.1`, a driver too old, no device…), or "" when
/// CUDA is usable. Static string.
#[no_mangle]
pub extern "C" fn kiln_cuda_unavailable_reason() -> *const c_char {
    guard(ptr::null(), || Ok(c_devices().cuda_unavailable.as_ptr()))
}

fn device_at(i: usize) -> Result<&'static (CString, CString), String> {
    let devices = &c_devices().devices;
    devices
        .get(i)
        .ok_or_else(|| format!("device {i} does not exist: this machine has {} devices", devices.len()))
}

/// Loads the artifact directory `dir`. Returns NULL on error; see `kiln_last_error`.
///
/// # Safety
///
/// `dir` must be NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_load(dir: *const c_char) -> *mut KilnModel {
    // SAFETY: same contract.
    unsafe { kiln_model_load_with_threads(dir, 0) }
}

/// The message of this thread's last failed call, or "" if none failed. Valid until the next
/// failing call on this thread.
#[no_mangle]
pub extern "C" fn kiln_last_error() -> *const c_char {
    LAST_ERROR.with(|slot| slot.borrow().as_ptr())
}

/// Frees a model; NULL is ignored.
///
/// # Safety
///
/// `model` must be NULL or a pointer from `kiln_model_load` not freed yet.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_free(model: *mut KilnModel) {
    if !model.is_null() {
        // SAFETY: created by Box::into_raw in kiln_model_load and not freed (caller's contract).
        let model = unsafe { Box::from_raw(model) };
        guard((), || {
            drop(model);
            Ok(())
        });
    }
}

/// Number of inputs (0 if `model` is NULL).
///
/// # Safety
///
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_input_count(model: *const KilnModel) -> usize {
    guard(0, || Ok(entry_at(model, 0)?.inputs.len()))
}

/// Number of outputs (0 if `model` is NULL).
///
/// # Safety
///
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_output_count(model: *const KilnModel) -> usize {
    guard(0, || Ok(entry_at(model, 0)?.outputs.len()))
}

/// Name of input `i`, or NULL if out of range. Valid until the model is freed.
///
/// # Safety
///
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_input_name(model: *const KilnModel, i: usize) -> *const c_char {
    guard(ptr::null(), || Ok(spec_at(model, 0, i, false)?.name.as_ptr()))
}

/// Name of output `i`, or NULL if out of range. Valid until the model is freed.
///
/// # Safety
///
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_output_name(model: *const KilnModel, i: usize) -> *const c_char {
    guard(ptr::null(), || Ok(spec_at(model, 0, i, true)?.name.as_ptr()))
}

fn shape_out(spec: impl FnOnce() -> Result<&'static CSpec, String>, rank: *mut usize) -> *const i64 {
    guard(ptr::null(), || {
        let spec = spec()?;
        if !rank.is_null() {
            // SAFETY: non-NULL, and points to a size_t by the caller's contract.
            unsafe { *rank = spec.shape.len() };
        }
        Ok(spec.shape.as_ptr())
    })
}

/// Shape of input `i` (`*rank` extents), or NULL if out of range. Valid until the model is freed.
///
/// # Safety
///
/// `model` must be NULL or a live model; `rank` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_input_shape(
    model: *const KilnModel,
    i: usize,
    rank: *mut usize,
) -> *const i64 {
    shape_out(|| spec_at(model, 0, i, false), rank)
}

/// Shape of output `i` (`*rank` extents), or NULL if out of range. Valid until the model is freed.
///
/// # Safety
///
/// `model` must be NULL or a live model; `rank` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_output_shape(
    model: *const KilnModel,
    i: usize,
    rank: *mut usize,
) -> *const i64 {
    shape_out(|| spec_at(model, 0, i, true), rank)
}

/// Dtype name of input `i` ("f32", "i64", "bool"…), or NULL if out of range. Static string.
///
/// # Safety
///
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_input_dtype(model: *const KilnModel, i: usize) -> *const c_char {
    guard(ptr::null(), || Ok(c_dtype(spec_at(model, 0, i, false)?.dtype).as_ptr()))
}

/// Dtype name of output `i`, or NULL if out of range. Static string.
///
/// # Safety
///
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_output_dtype(model: *const KilnModel, i: usize) -> *const c_char {
    guard(ptr::null(), || Ok(c_dtype(spec_at(model, 0, i, true)?.dtype).as_ptr()))
}

/// Byte size of input `i` (0 if out of range).
///
/// # Safety
///
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_input_bytes(model: *const KilnModel, i: usize) -> usize {
    guard(0, || Ok(spec_at(model, 0, i, false)?.bytes))
}

/// Byte size of output `i` (0 if out of range): the buffer `kiln_model_run` writes.
///
/// # Safety
///
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_output_bytes(model: *const KilnModel, i: usize) -> usize {
    guard(0, || Ok(spec_at(model, 0, i, true)?.bytes))
}

/// Runs the model: `inputs[i]` holds input i's bytes, `outputs[i]` receives output i's, both in
/// manifest order and of the sizes given by `kiln_model_input_bytes`/`_output_bytes`. Returns 0,
/// or nonzero with `kiln_last_error` set.
///
/// # Safety
///
/// `model` must be NULL or a live model not used by another thread during the call; `inputs`
/// and `outputs` must hold one valid pointer per input and output, each to a buffer of at least
/// that tensor's byte size; output buffers must not overlap each other or the inputs.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_run(
    model: *mut KilnModel,
    inputs: *const *const c_void,
    outputs: *const *mut c_void,
) -> c_int {
    // SAFETY: the same contract, for entry point 0.
    unsafe { run_entry_at(model, None, inputs, None, outputs, None) }
}

/// An error of a run through the C ABI, as the message `kiln_last_error` will give.
struct Message(String);

impl From<RuntimeError> for Message {
    fn from(e: RuntimeError) -> Message {
        Message(e.to_string())
    }
}

/// Runs entry point `entry` (`None`: `forward`) of `model` on C buffers.
///
/// # Safety
///
/// As [`kiln_model_run`], with the entry point's inputs and outputs.
unsafe fn run_entry_at(
    model: *mut KilnModel,
    entry: Option<*const c_char>,
    inputs: *const *const c_void,
    input_shapes: Option<*const *const i64>,
    outputs: *const *mut c_void,
    output_shapes: Option<*const *mut i64>,
) -> c_int {
    guard(1, || {
        let m = model_ref(model)?;
        let index = match entry {
            None => 0,
            Some(name) => {
                let name = c_arg(name, "entry")?;
                m.entries.iter().position(|e| e.name.to_bytes() == name.as_bytes()).ok_or_else(|| {
                    let known: Vec<_> = m.entries.iter().map(|e| e.name.to_string_lossy()).collect();
                    format!("the model has no entry point {name:?}: it has {}", known.join(", "))
                })?
            }
        };
        let e = &m.entries[index];
        let input_ptrs = pointer_array(inputs, e.inputs.len(), "inputs")?;
        let output_ptrs = pointer_array(outputs.cast::<*const c_void>(), e.outputs.len(), "outputs")?;
        // Each input's shape: the caller's (`kiln_model_run_shaped`), else the fixed one.
        let shapes: Vec<Vec<u64>> = match input_shapes {
            Some(array) => {
                let ptrs = pointer_array(array.cast::<*const c_void>(), e.inputs.len(), "input_shapes")?;
                e.inputs
                    .iter()
                    .zip(&ptrs)
                    .map(|(spec, &p)| {
                        // SAFETY: non-NULL, with one int64_t per axis of the input (caller's contract).
                        let dims = unsafe { std::slice::from_raw_parts(p.cast::<i64>(), spec.shape.len()) };
                        dims.iter()
                            .map(|&d| {
                                u64::try_from(d).map_err(|_| {
                                    format!("input {:?} has a negative extent {d}", spec.spec.name)
                                })
                            })
                            .collect::<Result<Vec<u64>, String>>()
                    })
                    .collect::<Result<_, _>>()?
            }
            None => e
                .inputs
                .iter()
                .map(|spec| {
                    spec.spec.fixed_shape().ok_or_else(|| {
                        format!(
                            "input {:?} has extents set at run time ({}): run it with kiln_model_run_shaped",
                            spec.spec.name,
                            crate::dims_str(&spec.spec.shape, &m.symbol_specs)
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        let mut refs = Vec::with_capacity(e.inputs.len());
        for ((spec, &p), shape) in e.inputs.iter().zip(&input_ptrs).zip(&shapes) {
            let len = crate::manifest::shape_bytes(spec.dtype, shape)
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| format!("input {:?} of shape {shape:?} is too large", spec.spec.name))?;
            // SAFETY: p is non-NULL and points to the bytes of the input at its shape (caller's
            // contract).
            let bytes = unsafe { byte_slice(p, len) };
            refs.push(TensorRef::new(&spec.spec.name, spec.dtype, shape, bytes));
        }
        let _running = RunGuard::acquire(m)?;
        // SAFETY: `RunGuard` holds `busy`, so this is the only reference to the model until it
        // is dropped at the end of this closure (a concurrent caller fails to acquire it).
        let inner = unsafe { &mut *m.model.get() };
        let name = e.name.to_string_lossy();
        let out_shapes = inner
            .run_entry_shaped(&name, &refs, |shapes| {
                let mut bufs = Vec::with_capacity(e.outputs.len());
                for ((spec, &p), shape) in e.outputs.iter().zip(&output_ptrs).zip(shapes) {
                    let len = crate::manifest::shape_bytes(spec.dtype, shape)
                        .and_then(|n| usize::try_from(n).ok())
                        .filter(|&n| n <= spec.bytes)
                        .ok_or_else(|| {
                            Message(format!(
                                "output {:?} at shape {shape:?} needs more than the {} bytes of its buffer",
                                spec.spec.name, spec.bytes
                            ))
                        })?;
                    // SAFETY: p is non-NULL, points to spec.bytes >= len writable bytes, and
                    // overlaps no other buffer of this call (caller's contract).
                    bufs.push(unsafe { byte_slice_mut(p.cast_mut(), len) });
                }
                Ok(bufs)
            })
            .map_err(|Message(m)| m)?;
        if let Some(array) = output_shapes {
            let ptrs = pointer_array(array.cast::<*const c_void>(), e.outputs.len(), "output_shapes")?;
            for (&p, shape) in ptrs.iter().zip(&out_shapes) {
                // SAFETY: non-NULL and writable for the output's rank (caller's contract).
                let out = unsafe { std::slice::from_raw_parts_mut(p.cast::<i64>().cast_mut(), shape.len()) };
                // Extents are at most the symbols' maxima, which fit i64 (checked at load).
                out.iter_mut().zip(shape).for_each(|(o, &d)| *o = d as i64);
            }
        }
        Ok(0)
    })
}

/// Number of entry points (0 if `model` is NULL): 1 (`forward`) for a plain artifact, 2
/// (`forward`, `train_step`) for a training artifact.
///
/// # Safety
///
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_entry_count(model: *const KilnModel) -> usize {
    guard(0, || Ok(model_ref(model)?.entries.len()))
}

/// Name of entry point `e` (0: `forward`), or NULL if out of range. Valid until the model is
/// freed.
///
/// # Safety
///
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_entry_name(model: *const KilnModel, e: usize) -> *const c_char {
    guard(ptr::null(), || Ok(entry_at(model, e)?.name.as_ptr()))
}

/// Number of inputs of entry point `e` (0 if it does not exist).
///
/// # Safety
///
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_entry_input_count(model: *const KilnModel, e: usize) -> usize {
    guard(0, || Ok(entry_at(model, e)?.inputs.len()))
}

/// Number of outputs of entry point `e` (0 if it does not exist).
///
/// # Safety
///
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_entry_output_count(model: *const KilnModel, e: usize) -> usize {
    guard(0, || Ok(entry_at(model, e)?.outputs.len()))
}

/// Name of input `i` of entry point `e`, or NULL if out of range. Valid until the model is
/// freed.
///
/// # Safety
///
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_entry_input_name(
    model: *const KilnModel,
    e: usize,
    i: usize,
) -> *const c_char {
    guard(ptr::null(), || Ok(spec_at(model, e, i, false)?.name.as_ptr()))
}

/// Name of output `i` of entry point `e`, or NULL if out of range. Valid until the model is
/// freed.
///
/// # Safety
///
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_entry_output_name(
    model: *const KilnModel,
    e: usize,
    i: usize,
) -> *const c_char {
    guard(ptr::null(), || Ok(spec_at(model, e, i, true)?.name.as_ptr()))
}

/// Shape of input `i` of entry point `e` (`*rank` extents), or NULL if out of range.
///
/// # Safety
///
/// `model` must be NULL or a live model; `rank` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_entry_input_shape(
    model: *const KilnModel,
    e: usize,
    i: usize,
    rank: *mut usize,
) -> *const i64 {
    shape_out(|| spec_at(model, e, i, false), rank)
}

/// Shape of output `i` of entry point `e` (`*rank` extents), or NULL if out of range.
///
/// # Safety
///
/// `model` must be NULL or a live model; `rank` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_entry_output_shape(
    model: *const KilnModel,
    e: usize,
    i: usize,
    rank: *mut usize,
) -> *const i64 {
    shape_out(|| spec_at(model, e, i, true), rank)
}

/// Dtype name of input `i` of entry point `e`, or NULL if out of range. Static string.
///
/// # Safety
///
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_entry_input_dtype(
    model: *const KilnModel,
    e: usize,
    i: usize,
) -> *const c_char {
    guard(ptr::null(), || Ok(c_dtype(spec_at(model, e, i, false)?.dtype).as_ptr()))
}

/// Dtype name of output `i` of entry point `e`, or NULL if out of range. Static string.
///
/// # Safety
///
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_entry_output_dtype(
    model: *const KilnModel,
    e: usize,
    i: usize,
) -> *const c_char {
    guard(ptr::null(), || Ok(c_dtype(spec_at(model, e, i, true)?.dtype).as_ptr()))
}

/// Byte size of input `i` of entry point `e` (0 if out of range).
///
/// # Safety
///
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_entry_input_bytes(model: *const KilnModel, e: usize, i: usize) -> usize {
    guard(0, || Ok(spec_at(model, e, i, false)?.bytes))
}

/// Byte size of output `i` of entry point `e` (0 if out of range).
///
/// # Safety
///
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_entry_output_bytes(model: *const KilnModel, e: usize, i: usize) -> usize {
    guard(0, || Ok(spec_at(model, e, i, true)?.bytes))
}

/// Runs the entry point named `entry` (`"forward"`, `"train_step"`…) as [`kiln_model_run`]
/// runs `forward`: its inputs and outputs in the order the `kiln_model_entry_*` functions give.
/// Returns 0, or nonzero with `kiln_last_error` set.
///
/// # Safety
///
/// As [`kiln_model_run`]; `entry` NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_run_entry(
    model: *mut KilnModel,
    entry: *const c_char,
    inputs: *const *const c_void,
    outputs: *const *mut c_void,
) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { run_entry_at(model, Some(entry), inputs, None, outputs, None) }
}

/// Runs entry point `entry` (NULL: `forward`) of a model whose extents may depend on symbols
/// (`kiln_model_symbol`): `input_shapes[i]` holds input i's extents (as many as its rank),
/// which bind the symbols; `output_shapes[i]`, when `output_shapes` is not NULL, receives
/// output i's extents at them. Each output is written contiguously at that shape into
/// `outputs[i]`, which must hold the output's `kiln_model_*output_bytes` (its size at the
/// symbols' maxima). A shape outside the symbols' bounds, or inconsistent between inputs, is
/// refused before anything runs, with an error naming the input and the axis. Returns 0, or
/// nonzero with `kiln_last_error` set.
///
/// # Safety
///
/// As [`kiln_model_run_entry`]; `input_shapes` must hold one pointer per input to its rank of
/// `int64_t`s, and each input buffer the bytes of its shape; `output_shapes` NULL or one
/// pointer per output to its rank of writable `int64_t`s.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_run_shaped(
    model: *mut KilnModel,
    entry: *const c_char,
    inputs: *const *const c_void,
    input_shapes: *const *const i64,
    outputs: *const *mut c_void,
    output_shapes: *const *mut i64,
) -> c_int {
    let entry = (!entry.is_null()).then_some(entry);
    if input_shapes.is_null() {
        set_error("input_shapes is NULL");
        return 1;
    }
    let output_shapes = (!output_shapes.is_null()).then_some(output_shapes);
    // SAFETY: the caller's contract.
    unsafe { run_entry_at(model, entry, inputs, Some(input_shapes), outputs, output_shapes) }
}

/// Number of symbols: sizes each run binds from its inputs' shapes (0 when every extent is
/// fixed, or if `model` is NULL).
///
/// # Safety
///
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_symbol_count(model: *const KilnModel) -> usize {
    guard(0, || Ok(model_ref(model)?.symbols.len()))
}

/// Symbol `i`: its name (valid until the model is freed) and bounds (a run binds a value in
/// `min..=max`, a multiple of `multiple_of`; the kernels were chosen for `hint`). Any out
/// pointer may be NULL. Returns 0, or nonzero with `kiln_last_error` set.
///
/// # Safety
///
/// `model` must be NULL or a live model; each out pointer NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_symbol(
    model: *const KilnModel,
    i: usize,
    name: *mut *const c_char,
    min: *mut i64,
    max: *mut i64,
    hint: *mut i64,
    multiple_of: *mut i64,
) -> c_int {
    guard(1, || {
        let m = model_ref(model)?;
        let (c_name, spec) = m
            .symbols
            .get(i)
            .ok_or_else(|| format!("symbol {i} does not exist: the model has {}", m.symbols.len()))?;
        if !name.is_null() {
            // SAFETY: non-NULL and writable by the caller's contract.
            unsafe { *name = c_name.as_ptr() };
        }
        for (out, v) in [(min, spec.min), (max, spec.max), (hint, spec.hint), (multiple_of, spec.multiple_of)]
        {
            if !out.is_null() {
                // SAFETY: non-NULL and writable by the caller's contract; the loader checked
                // that every bound fits i64.
                unsafe { *out = v as i64 };
            }
        }
        Ok(0)
    })
}

/// Number of persistent state tensors (0 for a plain artifact, or if `model` is NULL).
///
/// # Safety
///
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_state_count(model: *const KilnModel) -> usize {
    guard(0, || Ok(model_ref(model)?.state.len()))
}

/// Name of state tensor `i` (what `kiln_model_read_state` takes), or NULL if out of range.
/// Valid until the model is freed.
///
/// # Safety
///
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_state_name(model: *const KilnModel, i: usize) -> *const c_char {
    guard(ptr::null(), || Ok(state_at(model, i)?.name.as_ptr()))
}

/// Shape of state tensor `i` (`*rank` extents), or NULL if out of range.
///
/// # Safety
///
/// `model` must be NULL or a live model; `rank` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_state_shape(
    model: *const KilnModel,
    i: usize,
    rank: *mut usize,
) -> *const i64 {
    shape_out(|| state_at(model, i), rank)
}

/// Dtype name of state tensor `i`, or NULL if out of range. Static string.
///
/// # Safety
///
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_state_dtype(model: *const KilnModel, i: usize) -> *const c_char {
    guard(ptr::null(), || Ok(c_dtype(state_at(model, i)?.dtype).as_ptr()))
}

/// Byte size of state tensor `i` (0 if out of range).
///
/// # Safety
///
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_state_bytes(model: *const KilnModel, i: usize) -> usize {
    guard(0, || Ok(state_at(model, i)?.bytes))
}

/// The state tensor named `name` and its C buffer's size, which must be the tensor's.
fn sized_state(m: &KilnModel, name: *const c_char, bytes: usize) -> Result<&CSpec, String> {
    let name = c_arg(name, "name")?;
    let spec = m.state.iter().find(|s| s.name.to_bytes() == name.as_bytes()).ok_or_else(|| {
        let known: Vec<_> = m.state.iter().map(|s| s.name.to_string_lossy()).collect();
        match known.is_empty() {
            true => format!("the model has no state {name:?}: it keeps none"),
            false => format!("the model has no state {name:?}: it keeps {}", known.join(", ")),
        }
    })?;
    if bytes != spec.bytes {
        return Err(format!(
            "state {name:?} is {}{}, {} bytes; the buffer has {bytes}",
            spec.dtype,
            crate::dims_str(&spec.spec.shape, &[]),
            spec.bytes
        ));
    }
    Ok(spec)
}

/// Copies state tensor `name`'s current value into `out` (`bytes` bytes, exactly the
/// tensor's size), e.g. to save a checkpoint. Returns 0, or nonzero with `kiln_last_error` set.
///
/// # Safety
///
/// `model` must be NULL or a live model; `name` NULL or a NUL-terminated string; `out` NULL or
/// writable for `bytes` bytes.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_read_state(
    model: *mut KilnModel,
    name: *const c_char,
    out: *mut c_void,
    bytes: usize,
) -> c_int {
    guard(1, || {
        let m = model_ref(model)?;
        let spec = sized_state(m, name, bytes)?;
        if out.is_null() {
            return Err("out is NULL".into());
        }
        let _using = RunGuard::acquire(m)?;
        // SAFETY: `RunGuard` holds `busy`, so this is the only reference to the model.
        let inner = unsafe { &mut *m.model.get() };
        let value = inner.read_state(&spec.spec.name).map_err(|e| e.to_string())?;
        // SAFETY: out is non-NULL and writable for `bytes` bytes, the value's size (checked).
        unsafe { byte_slice_mut(out, bytes) }.copy_from_slice(value.bytes());
        Ok(0)
    })
}

/// Sets state tensor `name` from `value` (`bytes` bytes, exactly the tensor's size, in its
/// dtype), e.g. to resume from a checkpoint. Returns 0, or nonzero with `kiln_last_error` set.
///
/// # Safety
///
/// `model` must be NULL or a live model; `name` NULL or a NUL-terminated string; `value` NULL
/// or readable for `bytes` bytes.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_write_state(
    model: *mut KilnModel,
    name: *const c_char,
    value: *const c_void,
    bytes: usize,
) -> c_int {
    guard(1, || {
        let m = model_ref(model)?;
        let spec = sized_state(m, name, bytes)?;
        if value.is_null() {
            return Err("value is NULL".into());
        }
        // SAFETY: value is non-NULL and readable for `bytes` bytes (caller's contract).
        let data = unsafe { byte_slice(value, bytes) };
        let shape = spec.spec.fixed_shape().unwrap_or_default();
        let value = TensorRef::new(&spec.spec.name, spec.dtype, &shape, data);
        let _using = RunGuard::acquire(m)?;
        // SAFETY: `RunGuard` holds `busy`, so this is the only reference to the model.
        let inner = unsafe { &mut *m.model.get() };
        inner.write_state(&spec.spec.name, &value).map_err(|e| e.to_string())?;
        Ok(0)
    })
}

/// Holds a model's `busy` flag for one run. The C contract forbids running one handle from two
/// threads at once; this turns that misuse into an error status instead of two runs sharing
/// one arena (wrong outputs) or aliasing the model.
struct RunGuard<'a>(&'a std::sync::atomic::AtomicBool);

impl<'a> RunGuard<'a> {
    fn acquire(m: &'a KilnModel) -> Result<RunGuard<'a>, String> {
        use std::sync::atomic::Ordering;
        m.busy
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .map(|_| RunGuard(&m.busy))
            .map_err(|_| {
                "the model is already running on another thread: one handle runs one call at a time \
                 (load one model per thread)"
                    .to_string()
            })
    }
}

impl Drop for RunGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }
}

/// Reads `count` non-NULL pointers from a C array.
fn pointer_array(
    array: *const *const c_void,
    count: usize,
    what: &str,
) -> Result<Vec<*const c_void>, String> {
    if count == 0 {
        return Ok(Vec::new());
    }
    if array.is_null() {
        return Err(format!("{what} is NULL, the model has {count}"));
    }
    // SAFETY: the caller's contract gives `count` readable pointers.
    let ptrs = unsafe { std::slice::from_raw_parts(array, count) }.to_vec();
    match ptrs.iter().position(|p| p.is_null()) {
        Some(i) => Err(format!("{what}[{i}] is NULL")),
        None => Ok(ptrs),
    }
}

/// # Safety
/// `p` non-NULL and readable for `len` bytes for the returned lifetime.
unsafe fn byte_slice<'a>(p: *const c_void, len: usize) -> &'a [u8] {
    // SAFETY: per this function's contract.
    unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) }
}

/// # Safety
/// `p` non-NULL, writable for `len` bytes and unaliased for the returned lifetime.
unsafe fn byte_slice_mut<'a>(p: *mut c_void, len: usize) -> &'a mut [u8] {
    // SAFETY: per this function's contract.
    unsafe { std::slice::from_raw_parts_mut(p.cast::<u8>(), len) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last_error() -> String {
        // SAFETY: kiln_last_error always returns a valid NUL-terminated string.
        unsafe { CStr::from_ptr(kiln_last_error()) }.to_string_lossy().into_owned()
    }

    #[test]
    fn errors_are_reported_not_raised() {
        assert_eq!(last_error(), "");
        // SAFETY: NULL and valid strings are both allowed.
        unsafe {
            assert!(kiln_model_load(ptr::null()).is_null());
            assert_eq!(last_error(), "directory is NULL");
            assert!(kiln_model_load(c"/nonexistent/x.kiln".as_ptr()).is_null());
            assert!(last_error().contains("manifest.ron is missing"), "{}", last_error());
            assert_eq!(kiln_model_input_count(ptr::null()), 0);
            assert!(kiln_model_output_name(ptr::null(), 0).is_null());
            assert_eq!(kiln_model_run(ptr::null_mut(), ptr::null(), ptr::null()), 1);
            assert_eq!(last_error(), "model is NULL");
            kiln_model_free(ptr::null_mut());
        }
    }

    #[test]
    fn panics_become_errors() {
        let value = guard(7, || -> Result<i32, String> { panic!("boom") });
        assert_eq!(value, 7);
        assert!(last_error().contains("boom"), "{}", last_error());
        set_error("a\0b");
        assert_eq!(last_error(), "ab");
    }
}
