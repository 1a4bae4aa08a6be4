/*
 * run_model: loads a compiled Kiln model and runs it once from C.
 *
 *     run_model MODEL.kiln [DEVICE]
 *     run_model --devices
 *
 * DEVICE is "cpu", "vulkan" or "vulkan:N" (default: the kind the model was compiled for);
 * --devices lists this machine's devices.
 * Each f32 input is filled with a deterministic ramp, (i % 32) / 16 - 1, every other input
 * with zeros; the program prints each output's name, dtype, shape and first values.
 * Exit status: 0 on success, 1 on any error (the message is on stderr).
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kiln.h"

#define SHOW 8

static void print_shape(const int64_t *shape, size_t rank) {
    printf("[");
    for (size_t d = 0; d < rank; d++) printf(d ? ", %" PRId64 : "%" PRId64, shape[d]);
    printf("]");
}

/* Prints element `k` of a buffer of dtype `dtype`. */
static void print_value(const char *dtype, const void *data, size_t k) {
    if (strcmp(dtype, "f32") == 0) {
        float v;
        memcpy(&v, (const char *)data + 4 * k, 4);
        printf(" %.6g", v);
    } else if (strcmp(dtype, "f64") == 0) {
        double v;
        memcpy(&v, (const char *)data + 8 * k, 8);
        printf(" %.6g", v);
    } else if (strcmp(dtype, "i32") == 0) {
        int32_t v;
        memcpy(&v, (const char *)data + 4 * k, 4);
        printf(" %" PRId32, v);
    } else if (strcmp(dtype, "i64") == 0) {
        int64_t v;
        memcpy(&v, (const char *)data + 8 * k, 8);
        printf(" %" PRId64, v);
    } else if (strcmp(dtype, "bool") == 0) {
        printf(" %d", ((const unsigned char *)data)[k] != 0);
    } else { /* f16, bf16: show the raw bits */
        uint16_t v;
        memcpy(&v, (const char *)data + 2 * k, 2);
        printf(" 0x%04x", v);
    }
}

static size_t dtype_size(const char *dtype) {
    if (strcmp(dtype, "f64") == 0 || strcmp(dtype, "i64") == 0) return 8;
    if (strcmp(dtype, "f32") == 0 || strcmp(dtype, "i32") == 0) return 4;
    if (strcmp(dtype, "bool") == 0) return 1;
    return 2;
}

int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "--devices") == 0) {
        for (size_t d = 0; d < kiln_device_count(); d++) printf("%s\n", kiln_device_description(d));
        const char *why = kiln_vulkan_unavailable_reason();
        if (why && *why) printf("(no Vulkan device: %s)\n", why);
        return 0;
    }
    if (argc != 2 && argc != 3) {
        fprintf(stderr, "usage: %s MODEL.kiln [DEVICE]\n       %s --devices\n", argv[0], argv[0]);
        return 1;
    }
    KilnModel *model = kiln_model_load_on(argv[1], argc == 3 ? argv[2] : NULL, 0);
    if (!model) {
        fprintf(stderr, "error: %s\n", kiln_last_error());
        return 1;
    }
    size_t n_in = kiln_model_input_count(model), n_out = kiln_model_output_count(model);
    void **inputs = calloc(n_in ? n_in : 1, sizeof(void *));
    void **outputs = calloc(n_out ? n_out : 1, sizeof(void *));
    int status = 1;
    if (!inputs || !outputs) goto oom;

    for (size_t i = 0; i < n_in; i++) {
        size_t bytes = kiln_model_input_bytes(model, i), rank = 0;
        const char *dtype = kiln_model_input_dtype(model, i);
        const int64_t *shape = kiln_model_input_shape(model, i, &rank);
        /* Allocate 8-byte aligned storage (calloc), at least one byte. */
        inputs[i] = calloc(bytes ? bytes : 1, 1);
        if (!inputs[i]) goto oom;
        int ramp = strcmp(dtype, "f32") == 0;
        if (ramp) {
            float *x = inputs[i];
            for (size_t k = 0; k < bytes / 4; k++) x[k] = (float)(k % 32) / 16.0f - 1.0f;
        }
        printf("input %s %s ", kiln_model_input_name(model, i), dtype);
        print_shape(shape, rank);
        printf(" (%s)\n", ramp ? "ramp" : "zeros");
    }
    for (size_t i = 0; i < n_out; i++) {
        size_t bytes = kiln_model_output_bytes(model, i);
        outputs[i] = calloc(bytes ? bytes : 1, 1);
        if (!outputs[i]) goto oom;
    }

    if (kiln_model_run(model, (const void *const *)inputs, outputs) != 0) {
        fprintf(stderr, "error: %s\n", kiln_last_error());
        goto done;
    }

    for (size_t i = 0; i < n_out; i++) {
        size_t rank = 0;
        const char *dtype = kiln_model_output_dtype(model, i);
        const int64_t *shape = kiln_model_output_shape(model, i, &rank);
        size_t count = kiln_model_output_bytes(model, i) / dtype_size(dtype);
        printf("output %s %s ", kiln_model_output_name(model, i), dtype);
        print_shape(shape, rank);
        printf(":");
        for (size_t k = 0; k < count && k < SHOW; k++) print_value(dtype, outputs[i], k);
        if (count > SHOW) printf(" ... (%zu values)", count);
        printf("\n");
    }
    status = 0;
    goto done;

oom:
    fprintf(stderr, "error: out of memory\n");
done:
    for (size_t i = 0; inputs && i < n_in; i++) free(inputs[i]);
    for (size_t i = 0; outputs && i < n_out; i++) free(outputs[i]);
    free(inputs);
    free(outputs);
    kiln_model_free(model);
    return status;
}
