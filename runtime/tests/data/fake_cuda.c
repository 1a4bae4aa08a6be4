/*
 * A fake NVIDIA driver (libcuda.so.1) for tests/cuda.rs on machines without a GPU: one device
 * ("Kiln fake CUDA device", sm_90) whose memory is host memory and whose "kernels" are the two
 * kernels of tests/data/binop.ptx (add and mul of 1024 f32 elements), the one of
 * tests/data/divide.ptx (i32 division recording zero divisors in fault words) and the two of
 * tests/data/sized.ptx (scale and shift over rows * 16 elements, `rows` read from the symbol
 * words when the kernel runs, as a replayed graph reads them on a GPU), run on the CPU. It
 * implements exactly the entry points the runtime's CUDA backend calls, and checks what a real
 * driver would refuse or what would corrupt memory there:
 *
 *  - a call that needs a context without the model's context current on the calling thread;
 *  - a launch whose parameters are not three device pointers each covering 4096 bytes of one
 *    allocation (and, for `div`, a fourth covering its 8 bytes of fault words), a launch with
 *    more dynamic shared memory than its function allows (48 KiB, or what cuFuncSetAttribute
 *    opted it in to) or with `extra`, a grid and block that do not cover the 1024 elements; for `scale` and `shift`, four pointers, and when the kernel runs,
 *    a grid that does not cover the run's rows * 16 elements or a buffer that does not hold them;
 *  - a copy or memset while the stream is being captured into a graph;
 *  - a module image that is neither NUL-terminated PTX text nor an ELF cubin (a cubin is
 *    accepted when its section and program headers lie where its ELF header says, and its
 *    kernels are found by their `.text.NAME` sections).
 *
 * Streams are synchronous: work runs when it is queued, except during capture, when launches
 * are recorded into the graph that cuGraphLaunch replays. Events record a monotonic time.
 * Every refusal returns an error code the real driver uses, so the runtime's error paths run.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int CUresult;
typedef int CUdevice;
typedef uint64_t CUdeviceptr;

enum {
    SUCCESS = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    INVALID_IMAGE = 200,
    INVALID_CONTEXT = 201,
    INVALID_PTX = 218,
    INVALID_HANDLE = 400,
    NOT_FOUND = 500,
    CAPTURE_UNSUPPORTED = 900,
};

#define N 1024
#define MAX_ALLOCS 4096
#define MAX_NODES 256

static int fake_context; /* the primary context's address is its handle */
static int retained;
static __thread void *current;

struct alloc { uint64_t base, size; };
static struct alloc allocs[MAX_ALLOCS];

enum op { ADD, MUL, DIV, SCALE, SHIFT };
/* A function belongs to its module, as a real driver's does: its dynamic shared memory limit
 * (MAX_DYNAMIC_SHARED_SIZE_BYTES) starts at 48 KiB in every module loaded. */
struct function { enum op op; int max_dynamic_shared; };
struct module { int ops[5]; /* add, mul, div, scale, shift present */ struct function functions[5]; };

/* A launch: its function, pointers (`d` is div's fault words, or the fourth pointer of scale
 * and shift), grid and block. */
struct node { struct function *f; CUdeviceptr a, b, c, d; unsigned grid, block; };
struct stream { int capturing; };
struct graph { int count; struct node nodes[MAX_NODES]; };
static struct graph *capture_into;

#define NEED_CONTEXT() do { if (current != &fake_context || retained <= 0) return INVALID_CONTEXT; } while (0)

CUresult cuInit(unsigned flags) { return flags == 0 ? SUCCESS : INVALID_VALUE; }
CUresult cuDriverGetVersion(int *v) { *v = 12080; return SUCCESS; }

static const char *name_of(CUresult r) {
    switch (r) {
    case SUCCESS: return "CUDA_SUCCESS";
    case INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
    case OUT_OF_MEMORY: return "CUDA_ERROR_OUT_OF_MEMORY";
    case INVALID_IMAGE: return "CUDA_ERROR_INVALID_IMAGE";
    case INVALID_CONTEXT: return "CUDA_ERROR_INVALID_CONTEXT";
    case INVALID_PTX: return "CUDA_ERROR_INVALID_PTX";
    case INVALID_HANDLE: return "CUDA_ERROR_INVALID_HANDLE";
    case NOT_FOUND: return "CUDA_ERROR_NOT_FOUND";
    case CAPTURE_UNSUPPORTED: return "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED";
    default: return NULL;
    }
}
CUresult cuGetErrorName(CUresult r, const char **s) {
    *s = name_of(r);
    return *s ? SUCCESS : INVALID_VALUE;
}
CUresult cuGetErrorString(CUresult r, const char **s) {
    *s = name_of(r) ? "fake driver error" : NULL;
    return *s ? SUCCESS : INVALID_VALUE;
}

CUresult cuDeviceGetCount(int *n) { *n = 1; return SUCCESS; }
CUresult cuDeviceGet(CUdevice *d, int ordinal) {
    if (ordinal != 0) return INVALID_VALUE;
    *d = 0;
    return SUCCESS;
}
CUresult cuDeviceGetName(char *name, int len, CUdevice d) {
    if (d != 0 || len < 1) return INVALID_VALUE;
    snprintf(name, (size_t)len, "Kiln fake CUDA device");
    return SUCCESS;
}
CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice d) {
    if (d != 0) return INVALID_VALUE;
    *bytes = (size_t)1 << 32;
    return SUCCESS;
}
CUresult cuDeviceGetAttribute(int *v, int attribute, CUdevice d) {
    if (d != 0) return INVALID_VALUE;
    switch (attribute) {
    case 1: *v = 1024; break;                /* MAX_THREADS_PER_BLOCK */
    case 2: case 3: *v = 1024; break;        /* MAX_BLOCK_DIM_X, Y */
    case 4: *v = 64; break;                  /* MAX_BLOCK_DIM_Z */
    case 5: *v = 2147483647; break;          /* MAX_GRID_DIM_X */
    case 6: case 7: *v = 65535; break;       /* MAX_GRID_DIM_Y, Z */
    case 8: *v = 49152; break;               /* MAX_SHARED_MEMORY_PER_BLOCK */
    case 97: *v = 232448; break;             /* MAX_SHARED_MEMORY_PER_BLOCK_OPTIN */
    case 16: *v = 4; break;                  /* MULTIPROCESSOR_COUNT */
    case 75: *v = 9; break;                  /* COMPUTE_CAPABILITY_MAJOR */
    case 76: *v = 0; break;                  /* COMPUTE_CAPABILITY_MINOR */
    default: return INVALID_VALUE;
    }
    return SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(void **ctx, CUdevice d) {
    if (d != 0) return INVALID_VALUE;
    retained++;
    *ctx = &fake_context;
    return SUCCESS;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) {
    if (d != 0 || retained <= 0) return INVALID_VALUE;
    retained--;
    return SUCCESS;
}
CUresult cuCtxSetCurrent(void *ctx) {
    if (ctx != NULL && ctx != &fake_context) return INVALID_CONTEXT;
    current = ctx;
    return SUCCESS;
}

CUresult cuStreamCreate(void **s, unsigned flags) {
    NEED_CONTEXT();
    if (flags != 1) return INVALID_VALUE; /* the runtime asks for CU_STREAM_NON_BLOCKING */
    *s = calloc(1, sizeof(struct stream));
    return *s ? SUCCESS : OUT_OF_MEMORY;
}
CUresult cuStreamDestroy_v2(void *s) { NEED_CONTEXT(); free(s); return SUCCESS; }
CUresult cuStreamSynchronize(void *s) {
    NEED_CONTEXT();
    if (!s || ((struct stream *)s)->capturing) return INVALID_VALUE;
    return SUCCESS;
}
CUresult cuStreamBeginCapture_v2(void *s, int mode) {
    NEED_CONTEXT();
    struct stream *stream = s;
    if (!stream || stream->capturing || mode != 1 /* THREAD_LOCAL */) return INVALID_VALUE;
    capture_into = calloc(1, sizeof(struct graph));
    if (!capture_into) return OUT_OF_MEMORY;
    stream->capturing = 1;
    return SUCCESS;
}
CUresult cuStreamEndCapture(void *s, void **graph) {
    NEED_CONTEXT();
    struct stream *stream = s;
    if (!stream || !stream->capturing) return INVALID_VALUE;
    stream->capturing = 0;
    *graph = capture_into;
    capture_into = NULL;
    return SUCCESS;
}

static int inside(CUdeviceptr p, uint64_t bytes);

/* The sized kernels: `rows` from the symbol words as the kernel runs. */
static CUresult run_sized(const struct node *n) {
    CUdeviceptr syms = n->f->op == SCALE ? n->d : n->b;
    if (!inside(syms, 4)) return INVALID_VALUE;
    uint32_t rows = *(const uint32_t *)(uintptr_t)syms;
    uint64_t count = (uint64_t)rows * 16;
    if ((uint64_t)n->grid * n->block < count) return INVALID_VALUE;
    if (n->f->op == SCALE) {
        if (!inside(n->a, 4 * count) || !inside(n->b, 4 * count) || !inside(n->c, 4 * count)) return INVALID_VALUE;
        const float *x = (const float *)(uintptr_t)n->a, *w = (const float *)(uintptr_t)n->b;
        float *t = (float *)(uintptr_t)n->c;
        for (uint64_t i = 0; i < count; i++) t[i] = x[i] * w[i];
        return SUCCESS;
    }
    if (!inside(n->a, 4 * count) || !inside(n->c, 4 * count) || !inside(n->d, 4)) return INVALID_VALUE;
    const float *t = (const float *)(uintptr_t)n->a;
    float *y = (float *)(uintptr_t)n->c;
    *(int32_t *)(uintptr_t)n->d = (int32_t)n->grid;
    for (uint64_t i = 0; i < count; i++) y[i] = t[i] + (float)rows;
    return SUCCESS;
}

static CUresult run(const struct node *n) {
    if (n->f->op == SCALE || n->f->op == SHIFT) return run_sized(n);
    if (n->f->op == DIV) {
        const int32_t *a = (const int32_t *)(uintptr_t)n->a, *b = (const int32_t *)(uintptr_t)n->b;
        int32_t *q = (int32_t *)(uintptr_t)n->c;
        uint32_t *faults = (uint32_t *)(uintptr_t)n->d;
        for (unsigned i = 0; i < n->grid * n->block && i < N; i++) {
            if (b[i] == 0) {
                q[i] = 0;
                if (i < faults[1]) faults[1] = i;
                faults[0] = 0;
            } else {
                q[i] = a[i] / b[i];
            }
        }
        return SUCCESS;
    }
    const float *a = (const float *)(uintptr_t)n->a, *b = (const float *)(uintptr_t)n->b;
    float *c = (float *)(uintptr_t)n->c;
    for (unsigned i = 0; i < n->grid * n->block && i < N; i++) c[i] = n->f->op == ADD ? a[i] + b[i] : a[i] * b[i];
    return SUCCESS;
}

CUresult cuGraphInstantiateWithFlags(void **exec, void *graph, unsigned long long flags) {
    NEED_CONTEXT();
    if (!graph || flags != 0) return INVALID_VALUE;
    struct graph *copy = malloc(sizeof(struct graph));
    if (!copy) return OUT_OF_MEMORY;
    memcpy(copy, graph, sizeof(struct graph));
    *exec = copy;
    return SUCCESS;
}
CUresult cuGraphLaunch(void *exec, void *s) {
    NEED_CONTEXT();
    struct graph *g = exec;
    if (!g || !s || ((struct stream *)s)->capturing) return INVALID_VALUE;
    for (int i = 0; i < g->count; i++) {
        CUresult r = run(&g->nodes[i]);
        if (r != SUCCESS) return r;
    }
    return SUCCESS;
}
CUresult cuGraphExecDestroy(void *exec) { NEED_CONTEXT(); free(exec); return SUCCESS; }
CUresult cuGraphDestroy(void *graph) { NEED_CONTEXT(); free(graph); return SUCCESS; }

CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t bytes) {
    NEED_CONTEXT();
    if (bytes == 0) return INVALID_VALUE;
    for (int i = 0; i < MAX_ALLOCS; i++) {
        if (allocs[i].base == 0) {
            void *m = aligned_alloc(256, (bytes + 255) / 256 * 256);
            if (!m) return OUT_OF_MEMORY;
            memset(m, 0xA5, bytes); /* not zero: the runtime must clear what it relies on */
            allocs[i].base = (uintptr_t)m;
            allocs[i].size = bytes;
            *p = (uintptr_t)m;
            return SUCCESS;
        }
    }
    return OUT_OF_MEMORY;
}
CUresult cuMemFree_v2(CUdeviceptr p) {
    NEED_CONTEXT();
    for (int i = 0; i < MAX_ALLOCS; i++) {
        if (allocs[i].base == p && p != 0) {
            free((void *)(uintptr_t)p);
            allocs[i].base = allocs[i].size = 0;
            return SUCCESS;
        }
    }
    return INVALID_VALUE;
}
/* Whether [p, p + bytes) lies inside one allocation. */
static int inside(CUdeviceptr p, uint64_t bytes) {
    for (int i = 0; i < MAX_ALLOCS; i++)
        if (allocs[i].base != 0 && p >= allocs[i].base && p + bytes <= allocs[i].base + allocs[i].size) return 1;
    return 0;
}
static int capturing(void *s) { return !s || ((struct stream *)s)->capturing; }
CUresult cuMemsetD8Async(CUdeviceptr p, unsigned char v, size_t n, void *s) {
    NEED_CONTEXT();
    if (capturing(s)) return CAPTURE_UNSUPPORTED;
    if (!inside(p, n)) return INVALID_VALUE;
    memset((void *)(uintptr_t)p, v, n);
    return SUCCESS;
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, void *s) {
    NEED_CONTEXT();
    if (capturing(s)) return CAPTURE_UNSUPPORTED;
    if (!inside(dst, n)) return INVALID_VALUE;
    memcpy((void *)(uintptr_t)dst, src, n);
    return SUCCESS;
}
CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, void *s) {
    NEED_CONTEXT();
    if (capturing(s)) return CAPTURE_UNSUPPORTED;
    if (!inside(src, n)) return INVALID_VALUE;
    memcpy(dst, (const void *)(uintptr_t)src, n);
    return SUCCESS;
}

CUresult cuModuleLoadDataEx(void **module, const void *image, unsigned n, int *options, void **values) {
    NEED_CONTEXT();
    char *log = NULL;
    size_t log_size = 0;
    for (unsigned i = 0; i < n; i++) {
        if (options[i] == 5) log = values[i];
        else if (options[i] == 6) log_size = (size_t)(uintptr_t)values[i];
        else return INVALID_VALUE;
    }
    const char *text = image;
    struct module *m = calloc(1, sizeof(struct module));
    if (!m) return OUT_OF_MEMORY;
    for (int i = 0; i < 5; i++) m->functions[i] = (struct function){ (enum op)i, 49152 };
    if (memcmp(text, "\x7f" "ELF", 4) == 0) {
        /* The image's extent from its 64-bit ELF header: the section and program headers. */
        uint64_t shoff, phoff;
        uint16_t phentsize, phnum, shentsize, shnum;
        memcpy(&phoff, text + 0x20, 8);
        memcpy(&shoff, text + 0x28, 8);
        memcpy(&phentsize, text + 0x36, 2);
        memcpy(&phnum, text + 0x38, 2);
        memcpy(&shentsize, text + 0x3A, 2);
        memcpy(&shnum, text + 0x3C, 2);
        uint64_t end = shoff + (uint64_t)shentsize * shnum, ph_end = phoff + (uint64_t)phentsize * phnum;
        if (ph_end > end) end = ph_end;
        if (shnum == 0 || end > (1u << 20)) {
            free(m);
            if (log && log_size) snprintf(log, log_size, "fake driver: not a cubin");
            return INVALID_IMAGE;
        }
        for (uint64_t i = 0; i + 10 <= end; i++) {
            if (memcmp(text + i, ".text.add", 10) == 0) m->ops[ADD] = 1;
            if (memcmp(text + i, ".text.mul", 10) == 0) m->ops[MUL] = 1;
            if (memcmp(text + i, ".text.div", 10) == 0) m->ops[DIV] = 1;
            if (i + 12 <= end && memcmp(text + i, ".text.scale", 12) == 0) m->ops[SCALE] = 1;
            if (i + 12 <= end && memcmp(text + i, ".text.shift", 12) == 0) m->ops[SHIFT] = 1;
        }
        *module = m;
        return SUCCESS;
    }
    if (strstr(text, ".version") == NULL || strstr(text, "nonsense") != NULL) {
        free(m);
        if (log && log_size) snprintf(log, log_size, "ptxas fatal   : Unknown modifier '.nonsense'");
        return INVALID_PTX;
    }
    m->ops[ADD] = strstr(text, ".entry add(") != NULL;
    m->ops[MUL] = strstr(text, ".entry mul(") != NULL;
    m->ops[DIV] = strstr(text, ".entry div(") != NULL;
    m->ops[SCALE] = strstr(text, ".entry scale(") != NULL;
    m->ops[SHIFT] = strstr(text, ".entry shift(") != NULL;
    *module = m;
    return SUCCESS;
}
CUresult cuModuleGetFunction(void **f, void *module, const char *name) {
    NEED_CONTEXT();
    struct module *m = module;
    if (!m) return INVALID_HANDLE;
    if (strcmp(name, "add") == 0 && m->ops[ADD]) *f = &m->functions[ADD];
    else if (strcmp(name, "mul") == 0 && m->ops[MUL]) *f = &m->functions[MUL];
    else if (strcmp(name, "div") == 0 && m->ops[DIV]) *f = &m->functions[DIV];
    else if (strcmp(name, "scale") == 0 && m->ops[SCALE]) *f = &m->functions[SCALE];
    else if (strcmp(name, "shift") == 0 && m->ops[SHIFT]) *f = &m->functions[SHIFT];
    else return NOT_FOUND;
    return SUCCESS;
}
CUresult cuModuleUnload(void *module) { NEED_CONTEXT(); free(module); return SUCCESS; }
CUresult cuFuncGetAttribute(int *v, int attribute, void *f) {
    NEED_CONTEXT();
    if (!f) return INVALID_HANDLE;
    if (attribute == 0) *v = 1024;      /* MAX_THREADS_PER_BLOCK */
    else if (attribute == 1) *v = 0;    /* SHARED_SIZE_BYTES */
    else return INVALID_VALUE;
    return SUCCESS;
}
CUresult cuFuncSetAttribute(void *f, int attribute, int value) {
    NEED_CONTEXT();
    if (!f) return INVALID_HANDLE;
    /* MAX_DYNAMIC_SHARED_SIZE_BYTES, within the opt-in limit (the kernels have no static
     * shared memory). */
    if (attribute != 8 || value < 0 || value > 232448) return INVALID_VALUE;
    ((struct function *)f)->max_dynamic_shared = value;
    return SUCCESS;
}

CUresult cuLaunchKernel(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shared, void *s, void **params, void **extra) {
    NEED_CONTEXT();
    if (!f || !s || !params || extra != NULL) return INVALID_VALUE;
    if (shared > (unsigned)((struct function *)f)->max_dynamic_shared) return INVALID_VALUE;
    if (gy != 1 || gz != 1 || by != 1 || bz != 1) return INVALID_VALUE;
    struct node n = { f, *(CUdeviceptr *)params[0], *(CUdeviceptr *)params[1], *(CUdeviceptr *)params[2], 0, gx, bx };
    int sized = n.f->op == SCALE || n.f->op == SHIFT;
    if (sized) {
        /* Sizes are known when the kernel runs (the symbol words may not be written yet). */
        n.d = *(CUdeviceptr *)params[3];
        if (!inside(n.a, 4) || !inside(n.b, 4) || !inside(n.c, 4) || !inside(n.d, 4)) return INVALID_VALUE;
    } else {
        if ((uint64_t)gx * bx < N) return INVALID_VALUE;
        if (!inside(n.a, 4 * N) || !inside(n.b, 4 * N) || !inside(n.c, 4 * N)) return INVALID_VALUE;
    }
    if (n.f->op == DIV) {
        n.d = *(CUdeviceptr *)params[3];
        if (!inside(n.d, 8)) return INVALID_VALUE;
    }
    if (((struct stream *)s)->capturing) {
        if (!capture_into || capture_into->count == MAX_NODES) return INVALID_VALUE;
        capture_into->nodes[capture_into->count++] = n;
        return SUCCESS;
    }
    return run(&n);
}

CUresult cuEventCreate(void **e, unsigned flags) {
    NEED_CONTEXT();
    if (flags != 0) return INVALID_VALUE;
    *e = calloc(1, sizeof(double));
    return *e ? SUCCESS : OUT_OF_MEMORY;
}
CUresult cuEventRecord(void *e, void *s) {
    NEED_CONTEXT();
    if (!e || capturing(s)) return INVALID_VALUE;
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    *(double *)e = (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
    return SUCCESS;
}
CUresult cuEventElapsedTime(float *ms, void *start, void *end) {
    NEED_CONTEXT();
    if (!start || !end || *(double *)start == 0 || *(double *)end == 0) return INVALID_HANDLE;
    /* At least one microsecond, as a real device's resolution would show for any kernel. */
    double d = *(double *)end - *(double *)start;
    *ms = (float)(d < 1e-3 ? 1e-3 : d);
    return SUCCESS;
}
CUresult cuEventDestroy_v2(void *e) { NEED_CONTEXT(); free(e); return SUCCESS; }
