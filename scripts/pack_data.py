#!/usr/bin/env python3
"""The GPU check pack's data files (scripts/gpu_check.sh): safetensors files written, cut down
and split with nothing beyond Python's standard library, so that building a pack needs no
NumPy or safetensors package.

  pack_data.py header WEIGHTS OUT            OUT: WEIGHTS' length word and header only (the
                                             GPU machine synthesizes the values)
  pack_data.py int-div-inputs OUT            OUT: inputs of tests/gpu_check/int_div.ron whose
                                             divisor holds a zero at element [1]
  pack_data.py golden-weights WEIGHTS INPUTS OUT
                                             OUT: WEIGHTS with every word-embedding row that
                                             no token of INPUTS' input_ids reads set to zero
  pack_data.py golden-sentences INPUTS EXPECTED RUNS
                                             RUNS/sNN/: one run per sentence of the padded
                                             golden INPUTS, unpadded, with its EXPECTED row
"""

import json
import os
import struct
import sys

WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"


def read(path):
    """The header's raw bytes, the header (without __metadata__) and the data after it."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        raw = f.read(n)
        data = f.read()
    header = {k: v for k, v in json.loads(raw).items() if k != "__metadata__"}
    return raw, header, data


def write(path, tensors):
    """Writes {name: (dtype, shape, bytes)} in order, the header padded to 8 bytes."""
    header, blobs, at = {}, [], 0
    for name, (dtype, shape, blob) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + len(blob)]}
        blobs.append(blob)
        at += len(blob)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def header_only(weights, out):
    with open(weights, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        raw = f.read(n)
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", n) + raw)


def int_div_inputs(out):
    a, b = [7, -9, 4, 10, 11, -12], [2, 0, 5]
    write(out, {"a": ("I32", [2, 3], struct.pack("<6i", *a)),
                "b": ("I32", [3], struct.pack("<3i", *b))})


def golden_weights(weights, inputs, out):
    _, header, data = read(inputs)
    ids = header["input_ids"]
    assert ids["dtype"] == "I64", ids
    a, b = ids["data_offsets"]
    used = set(struct.unpack(f"<{(b - a) // 8}q", data[a:b]))
    raw, header, data = read(weights)
    table = header[WORD_EMBEDDINGS]
    a, b = table["data_offsets"]
    rows = table["shape"][0]
    width = (b - a) // rows
    data = bytearray(data)
    for r in range(rows):
        if r not in used:
            data[a + r * width:a + (r + 1) * width] = bytes(width)
    # The header as it was, byte for byte: only values change.
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)
    print(f"== gpu_check: golden: kept {len(used)} of {rows} rows of {WORD_EMBEDDINGS}",
          file=sys.stderr)


def golden_sentences(inputs_path, expected_path, runs):
    _, inputs, data = read(inputs_path)
    _, expected, edata = read(expected_path)
    mask = inputs["attention_mask"]
    batch, seq = mask["shape"]
    a, _ = mask["data_offsets"]
    emb = expected["sentence_embedding"]
    width = emb["shape"][1]
    for i in range(batch):
        keep = struct.unpack(f"<{seq}q", data[a + i * seq * 8:a + (i + 1) * seq * 8])
        length = sum(1 for k in keep if k)
        assert all(keep[:length]) and not any(keep[length:]), f"sentence {i}: its mask is not a prefix"
        run = os.path.join(runs, f"s{i:02}")
        os.makedirs(run, exist_ok=True)
        tensors = {}
        for name, t in inputs.items():
            assert t["dtype"] == "I64" and t["shape"] == [batch, seq], (name, t)
            start = t["data_offsets"][0] + i * seq * 8
            tensors[name] = ("I64", [1, length], data[start:start + length * 8])
        write(os.path.join(run, "inputs.safetensors"), tensors)
        start = emb["data_offsets"][0] + i * width * 4
        write(os.path.join(run, "expected.safetensors"),
              {"sentence_embedding": ("F32", [1, width], edata[start:start + width * 4])})


COMMANDS = {
    "header": (header_only, 2),
    "int-div-inputs": (int_div_inputs, 1),
    "golden-weights": (golden_weights, 3),
    "golden-sentences": (golden_sentences, 3),
}

if __name__ == "__main__":
    command = COMMANDS.get(sys.argv[1] if len(sys.argv) > 1 else "")
    if command is None or len(sys.argv) != 2 + command[1]:
        sys.exit(__doc__)
    command[0](*sys.argv[2:])
