#!/usr/bin/env python3
"""Extract the UCI optical handwritten digits from scikit-learn's bundled copy into .npy files.

Reads `sklearn/datasets/data/digits.csv.gz` (1797 rows; 64 pixel columns with integers 0..16,
then the class 0..9) from one of:
  * an installed scikit-learn package (default),
  * a scikit-learn wheel given with --wheel (e.g. from `pip download --no-deps scikit-learn`),
  * the csv.gz itself given with --csv,
and writes, with the standard library only (no numpy needed):
  OUT/digits-features.npy   uint8, shape (1797, 64), row-major 8x8 images, values 0..16
  OUT/digits-labels.npy     uint8, shape (1797,), values 0..9

The Rust side (tessera_rank::data::digits::build_digits) turns these into shards; see
data/digits/README.md for the whole command sequence.
"""

import argparse
import gzip
import importlib.util
import os
import struct
import sys
import zipfile

MEMBER = "sklearn/datasets/data/digits.csv.gz"


def read_csv_gz(args):
    if args.csv:
        with open(args.csv, "rb") as f:
            return f.read(), args.csv
    if args.wheel:
        with zipfile.ZipFile(args.wheel) as z:
            return z.read(MEMBER), f"{args.wheel}:{MEMBER}"
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        sys.exit(
            "error: scikit-learn is not installed; install it (`pip install scikit-learn`) or "
            "pass --wheel <scikit_learn-*.whl> (from `pip download --no-deps scikit-learn`) "
            "or --csv <digits.csv.gz>"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", "digits.csv.gz")
    with open(path, "rb") as f:
        return f.read(), path


def npy_bytes(descr, shape, payload):
    """A version 1.0 .npy file: magic, header dict padded to a multiple of 64 bytes, data."""
    shape_txt = "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
    header = "{'descr': '%s', 'fortran_order': False, 'shape': %s, }" % (descr, shape_txt)
    total = 10 + len(header) + 1
    header += " " * ((64 - total % 64) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1") + payload


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/digits/raw", help="output directory (default: data/digits/raw)")
    p.add_argument("--wheel", help="read the csv from this scikit-learn wheel")
    p.add_argument("--csv", help="read this digits.csv.gz directly")
    args = p.parse_args()

    raw, source = read_csv_gz(args)
    rows = [line for line in gzip.decompress(raw).decode("ascii").splitlines() if line.strip()]
    features = bytearray()
    labels = bytearray()
    for i, line in enumerate(rows):
        vals = [int(float(v)) for v in line.split(",")]
        if len(vals) != 65:
            sys.exit(f"error: {source} row {i}: expected 65 columns (64 pixels + class), got {len(vals)}")
        px, label = vals[:64], vals[64]
        if any(v < 0 or v > 16 for v in px) or not 0 <= label <= 9:
            sys.exit(f"error: {source} row {i}: pixel outside 0..16 or class outside 0..9")
        features.extend(px)
        labels.append(label)
    if len(rows) != 1797:
        sys.exit(f"error: {source}: expected 1797 rows, got {len(rows)}")

    os.makedirs(args.out, exist_ok=True)
    for name, data in [
        ("digits-features.npy", npy_bytes("|u1", (len(rows), 64), bytes(features))),
        ("digits-labels.npy", npy_bytes("|u1", (len(rows),), bytes(labels))),
    ]:
        path = os.path.join(args.out, name)
        with open(path, "wb") as f:
            f.write(data)
        print(f"wrote {path} ({len(data)} bytes)")
    print(f"source: {source}")


if __name__ == "__main__":
    main()
