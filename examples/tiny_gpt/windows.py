#!/usr/bin/env python3
"""Cuts a text file into byte-level training examples for `kiln train`: windows of SEQ + 1
bytes, STRIDE bytes apart; `input_ids` are a window's first SEQ bytes and `labels` its last
SEQ (the next byte at each position). Writes them as i64 [examples, SEQ] tensors to a
.safetensors file. Python's standard library only.

Usage: windows.py TEXT OUT.safetensors [SEQ] [STRIDE]   (defaults: 32, 4)
"""
import json
import struct
import sys


def main():
    if len(sys.argv) not in (3, 4, 5):
        sys.exit(__doc__)
    text = open(sys.argv[1], "rb").read()
    seq = int(sys.argv[3]) if len(sys.argv) > 3 else 32
    stride = int(sys.argv[4]) if len(sys.argv) > 4 else 4
    starts = range(0, len(text) - seq, stride)
    ids = [b for s in starts for b in text[s : s + seq]]
    labels = [b for s in starts for b in text[s + 1 : s + seq + 1]]
    n = len(starts)
    a = struct.pack("<%dq" % len(ids), *ids)
    b = struct.pack("<%dq" % len(labels), *labels)
    header = json.dumps(
        {
            "input_ids": {"dtype": "I64", "shape": [n, seq], "data_offsets": [0, len(a)]},
            "labels": {"dtype": "I64", "shape": [n, seq], "data_offsets": [len(a), len(a) + len(b)]},
        },
        separators=(",", ":"),
    ).encode()
    header += b" " * (-len(header) % 8)
    with open(sys.argv[2], "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + a + b)
    print(f"{n} examples of {seq} bytes from {len(text)} bytes of text", file=sys.stderr)


if __name__ == "__main__":
    main()
