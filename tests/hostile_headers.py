"""Safetensors files with hostile or broken headers (issue 18 item 4), for the LoRA and model-file tests."""
import json
import struct


def write_header(path, header: bytes, tail: bytes = b""):
    path.write_bytes(struct.pack("<Q", len(header)) + header + tail)
    return path


def hostile_headers(folder):
    """name -> (file, what the refusal says): the shapes a hostile or broken header can take."""
    deep = b'{"a": {"dtype": "F32", "shape": ' + b"[" * 100_000 + b"]" * 100_000 + b', "data_offsets": [0, 0]}}'
    big = json.dumps({"__metadata__": {"notes": "x" * (130 << 20)}}).encode()  # 130 MiB: over safetensors' 100 MB
    return {
        "deep": (write_header(folder / "deep.safetensors", deep), "nests more than 8 levels deep"),
        "open": (write_header(folder / "open.safetensors", b"[" * 5000), "brackets do not pair up"),
        "big": (write_header(folder / "big.safetensors", big), r"header claims 136 MB, over the 100 MB"),
        "empty": (write_header(folder / "empty.safetensors", json.dumps({"__metadata__": {"a": "b" * 4096}}).encode()),
                  "holds no tensors"),
        "meta": (write_header(folder / "meta.safetensors", b'{"__metadata__": {"a": {"b": 1}}}'), "not an object of strings"),
        "inf": (write_header(folder / "inf.safetensors", b'{"t": {"dtype": "F32", "shape": [1e999], "data_offsets": [0, 4]}}',
                             b"\0" * 4), "tensor 't' has a malformed header entry"),
    }
