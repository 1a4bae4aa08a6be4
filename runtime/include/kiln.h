/*
 * kiln.h: the C interface of the Kiln runtime (libkiln_runtime.so).
 *
 * Loads a compiled model, an artifact directory NAME.kiln/ written by the Kiln compiler, and
 * runs it on the CPU (native kernels), on a Vulkan device (SPIR-V kernels) or on a CUDA device
 * (PTX or cubin kernels, through the NVIDIA driver), whichever the model was compiled for. The
 * model checks everything at load (format version, target CPU or device, the manifest's own
 * checksum, file sizes and checksums, every shape, offset, size and kernel symbol of the
 * manifest against the arena, the weights and the kernels it was compiled with), so a damaged
 * or hand-edited artifact is refused with a message, and a run only fails on a bad call or bad
 * input data (e.g. a gather index outside its table).
 *
 * Trust: a CPU artifact CONTAINS NATIVE CODE (kernels.so), loaded into this process and run
 * with its privileges, and a GPU artifact's kernels run on the device with access to its
 * memory. Loading an artifact is trusting it exactly as much as dlopen-ing a shared library
 * from the same source: the checks above catch damage and mistakes, they are not a sandbox.
 * Load only artifacts you would run as programs.
 *
 *     KilnModel *m = kiln_model_load("mlp.kiln");
 *     if (!m) { fprintf(stderr, "%s\n", kiln_last_error()); return 1; }
 *     ... allocate kiln_model_output_bytes(m, i) bytes per output ...
 *     if (kiln_model_run(m, inputs, outputs) != 0) fprintf(stderr, "%s\n", kiln_last_error());
 *     kiln_model_free(m);
 *
 * Errors: functions returning a pointer return NULL, kiln_model_run returns nonzero, and
 * kiln_last_error() then describes the failure. Nothing aborts the process: internal panics
 * are caught and reported the same way.
 *
 * Devices: kiln_device_count and kiln_device_name list "cpu", "vulkan:0", "vulkan:1"... and
 * "cuda:0", "cuda:1"...; kiln_model_load_on picks one. A CPU model runs only on "cpu", a Vulkan
 * model only on a Vulkan device, a CUDA model only on a CUDA device; asking for another kind
 * is an error. libcuda.so.1 is opened when first needed: a machine without it runs CPU and
 * Vulkan models as usual (see kiln_cuda_unavailable_reason).
 *
 * Threads: a CPU model runs its steps on its own worker threads (see
 * kiln_model_load_with_threads); a Vulkan or CUDA model submits from the calling thread.
 * One model may be used from any thread, but by one thread at a time: it owns one scratch
 * arena. Load one model per concurrent caller (the weights file's pages are shared). A call
 * of kiln_model_run on a model another thread is running returns nonzero ("already running")
 * without touching either call's buffers.
 *
 * Training artifacts (kiln compile --train): besides "forward", which kiln_model_run runs,
 * an artifact may have more entry points ("train_step": one optimizer step) over persistent
 * state kept in the model between calls (the parameters, the optimizer's moments, the step
 * count). kiln_model_entry_count and kiln_model_entry_name list them (entry point 0 is
 * "forward"); kiln_model_entry_input_* and _output_* describe each one's tensors as
 * kiln_model_input_* and _output_* describe forward's; kiln_model_run_entry runs one by name.
 * kiln_model_state_count, _name, _shape, _dtype and _bytes list the state, and
 * kiln_model_read_state and kiln_model_write_state copy one tensor out of or into the model
 * (to save and resume a checkpoint). A state read or write on a model another thread is
 * running fails as a second run does.
 *
 *     kiln_model_run_entry(m, "train_step", batch, outputs);   // loss, learning rate
 *     kiln_model_read_state(m, "fc1.weight", buf, kiln_model_state_bytes(m, i));
 *
 * Tensors are dense, row-major, little-endian; dtypes are named "f32", "f64", "f16", "bf16",
 * "i32", "i64" and "bool" (one byte per element). Buffers are best aligned to their element
 * size; misaligned ones are copied, which costs time but is correct.
 */
#ifndef KILN_H
#define KILN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* A loaded model. Opaque; free with kiln_model_free. */
typedef struct KilnModel KilnModel;

/* Loads the artifact directory `dir` using KILN_THREADS threads, else every core.
 * Returns NULL on error (see kiln_last_error). */
KilnModel *kiln_model_load(const char *dir);

/* Like kiln_model_load with `threads` worker threads; 0 means the default. */
KilnModel *kiln_model_load_with_threads(const char *dir, size_t threads);

/* Loads `dir` on `device`: "cpu", "vulkan" (the first discrete or integrated GPU, else any
 * Vulkan device), "vulkan:N", "cuda" (CUDA device 0) or "cuda:N"; NULL means the kind of device
 * the model was compiled for.
 * `threads` is as for kiln_model_load_with_threads (CPU models only). Returns NULL on error,
 * e.g. a device that does not exist or cannot run the model (see kiln_last_error). */
KilnModel *kiln_model_load_on(const char *dir, const char *device, size_t threads);

/* Number of devices: the CPU (index 0), then each Vulkan device, then each CUDA device. Listed
 * once per process. */
size_t kiln_device_count(void);

/* The selector of device `i` ("cpu", "vulkan:0", "cuda:0", ...) for kiln_model_load_on, or NULL if `i`
 * is out of range. Static string. */
const char *kiln_device_name(size_t i);

/* One line describing device `i` (name, type, Vulkan version and subgroup size, or CUDA
 * architecture, and limits), or NULL if `i` is out of range. Static string. */
const char *kiln_device_description(size_t i);

/* Why no Vulkan device is listed (no loader, no driver, ...), or "" when Vulkan is usable.
 * Static string. */
const char *kiln_vulkan_unavailable_reason(void);

/* Why no CUDA device is listed (no libcuda.so.1, a driver too old, no device, ...), or "" when
 * CUDA is usable. Static string. */
const char *kiln_cuda_unavailable_reason(void);

/* The message of this thread's last failed call ("" if none failed). The string stays valid
 * until the next failing call on the same thread. */
const char *kiln_last_error(void);

/* Frees a model and everything it returned. NULL is ignored. */
void kiln_model_free(KilnModel *model);

/* Number of graph inputs and outputs. */
size_t kiln_model_input_count(const KilnModel *model);
size_t kiln_model_output_count(const KilnModel *model);

/* Name of input / output `i`, or NULL if `i` is out of range. Valid until kiln_model_free. */
const char *kiln_model_input_name(const KilnModel *model, size_t i);
const char *kiln_model_output_name(const KilnModel *model, size_t i);

/* Shape of input / output `i`: returns the extents (outermost first) and stores their count in
 * `*rank` (when `rank` is not NULL); NULL if `i` is out of range. Valid until kiln_model_free.
 * A scalar has rank 0 and its pointer must not be dereferenced. */
const int64_t *kiln_model_input_shape(const KilnModel *model, size_t i, size_t *rank);
const int64_t *kiln_model_output_shape(const KilnModel *model, size_t i, size_t *rank);

/* Dtype name ("f32", ...) of input / output `i`, or NULL if out of range. Static strings. */
const char *kiln_model_input_dtype(const KilnModel *model, size_t i);
const char *kiln_model_output_dtype(const KilnModel *model, size_t i);

/* Size in bytes of input / output `i` (elements times dtype size), 0 if out of range. */
size_t kiln_model_input_bytes(const KilnModel *model, size_t i);
size_t kiln_model_output_bytes(const KilnModel *model, size_t i);

/* Runs the model. `inputs[i]` points to input i's bytes (kiln_model_input_bytes of them),
 * `outputs[i]` to a caller-allocated buffer of kiln_model_output_bytes(model, i) bytes that
 * receives output i; both arrays are in the model's order. Inputs are only read. Output
 * buffers must not overlap each other or the inputs. Returns 0 on success, nonzero on error
 * (see kiln_last_error), including when another thread is running the same model, and when
 * a kernel faulted (an integer division by zero: the message names the op, its spec position
 * and the divisor element, as `kiln eval` does; the outputs are then not the model's, and
 * the model stays usable for the next run). */
int kiln_model_run(KilnModel *model, const void *const *inputs, void *const *outputs);

/* Number of entry points: 1 ("forward") for a plain artifact, 2 ("forward", "train_step")
 * for a training artifact. */
size_t kiln_model_entry_count(const KilnModel *model);

/* Name of entry point `e` (0 is "forward"), or NULL if `e` is out of range. Valid until
 * kiln_model_free. */
const char *kiln_model_entry_name(const KilnModel *model, size_t e);

/* The inputs and outputs of entry point `e`, as kiln_model_input_* and _output_* give
 * forward's (which are those of entry point 0): counts (0 if `e` is out of range), names,
 * shapes, dtypes (NULL if out of range) and byte sizes (0 if out of range). */
size_t kiln_model_entry_input_count(const KilnModel *model, size_t e);
size_t kiln_model_entry_output_count(const KilnModel *model, size_t e);
const char *kiln_model_entry_input_name(const KilnModel *model, size_t e, size_t i);
const char *kiln_model_entry_output_name(const KilnModel *model, size_t e, size_t i);
const int64_t *kiln_model_entry_input_shape(const KilnModel *model, size_t e, size_t i, size_t *rank);
const int64_t *kiln_model_entry_output_shape(const KilnModel *model, size_t e, size_t i, size_t *rank);
const char *kiln_model_entry_input_dtype(const KilnModel *model, size_t e, size_t i);
const char *kiln_model_entry_output_dtype(const KilnModel *model, size_t e, size_t i);
size_t kiln_model_entry_input_bytes(const KilnModel *model, size_t e, size_t i);
size_t kiln_model_entry_output_bytes(const KilnModel *model, size_t e, size_t i);

/* Runs the entry point named `entry` ("forward", "train_step", ...) as kiln_model_run runs
 * forward, with that entry point's inputs and outputs in its order. Every entry point reads
 * and updates the model's one state. Returns 0, or nonzero (see kiln_last_error), e.g. for a
 * name the model does not have. */
int kiln_model_run_entry(KilnModel *model, const char *entry, const void *const *inputs,
                         void *const *outputs);

/* Sizes set at run time. A model may declare symbols (a batch size, a sequence length): an
 * input or output extent that depends on one reads -1 in the *_shape functions, and the
 * *_bytes functions give the size at the symbols' maxima. Such a model runs with
 * kiln_model_run_shaped (kiln_model_run and _run_entry refuse it). */

/* Number of symbols (0 when every extent is fixed). */
size_t kiln_model_symbol_count(const KilnModel *model);

/* Symbol `i`: its name (valid until kiln_model_free) and bounds: a run binds a value in
 * min..=max that is a multiple of `multiple_of`; the kernels were chosen for `hint`. Any out
 * pointer may be NULL. Returns 0, or nonzero if `i` is out of range. */
int kiln_model_symbol(const KilnModel *model, size_t i, const char **name, int64_t *min,
                      int64_t *max, int64_t *hint, int64_t *multiple_of);

/* Runs entry point `entry` (NULL: "forward") with each input's shape: `input_shapes[i]`
 * points to input i's extents (its rank of them), which bind the symbols, and `inputs[i]` to
 * the bytes of that shape. Each output is written contiguously at the shape the symbols give
 * it into `outputs[i]`, a buffer of the output's *_output_bytes (its size at the maxima);
 * when `output_shapes` is not NULL, `output_shapes[i]` receives output i's extents. A shape
 * outside the symbols' bounds, or inconsistent between inputs, is refused before anything
 * runs, with a message naming the input and the axis ("input `input_ids` axis 1 is 600, but
 * `seq` is at most 512"). Works for models without symbols too. Returns 0, or nonzero (see
 * kiln_last_error). */
int kiln_model_run_shaped(KilnModel *model, const char *entry, const void *const *inputs,
                          const int64_t *const *input_shapes, void *const *outputs,
                          int64_t *const *output_shapes);

/* Number of persistent state tensors (0 for a plain artifact). */
size_t kiln_model_state_count(const KilnModel *model);

/* Name, shape (`*rank` extents), dtype and byte size of state tensor `i`; NULL (or 0) if `i`
 * is out of range. Names and shapes are valid until kiln_model_free. */
const char *kiln_model_state_name(const KilnModel *model, size_t i);
const int64_t *kiln_model_state_shape(const KilnModel *model, size_t i, size_t *rank);
const char *kiln_model_state_dtype(const KilnModel *model, size_t i);
size_t kiln_model_state_bytes(const KilnModel *model, size_t i);

/* Copies the current value of state tensor `name` into `out`, whose size `bytes` must be the
 * tensor's (kiln_model_state_bytes). Returns 0, or nonzero (see kiln_last_error): an unknown
 * name, another size, a NULL pointer, or a model another thread is running. */
int kiln_model_read_state(KilnModel *model, const char *name, void *out, size_t bytes);

/* Sets state tensor `name` from `value` (`bytes` bytes, exactly the tensor's size, in its
 * dtype); the next run of any entry point computes with it. Returns 0, or nonzero as
 * kiln_model_read_state. */
int kiln_model_write_state(KilnModel *model, const char *name, const void *value, size_t bytes);

#ifdef __cplusplus
}
#endif

#endif /* KILN_H */
