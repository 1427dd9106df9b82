"""safetensors files one tensor at a time: headers without the data, single tensors by offset, and
a writer that takes each tensor as it is made.

The safetensors library writes a file from a dict holding all of its tensors at once (5 GB per shard
of an 8B model, more with ``--max-shard-size`` raised), and its reader maps whole files, which counts
the pages a read touches in the process's resident memory. A file is an 8-byte little-endian header
length, a JSON header (each tensor's dtype, shape and ``data_offsets`` relative to the end of the
header, plus ``__metadata__``), padded with spaces to a multiple of 8 bytes, then the tensors' bytes;
knowing every tensor's shape and dtype up front, the header can be written first and each tensor's
bytes appended when it arrives.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from megatron_moh.conversion import ConversionError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_HEADER_LIMIT = 100_000_000  # as the safetensors library: a larger header is a damaged file


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lies in a safetensors file, and its dtype and shape."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offset of its data in the file
    nbytes: int

    def meta(self) -> Tensor:
        """A meta-device tensor of this shape and dtype (no data)."""
        return torch.empty(self.shape, dtype=self.dtype, device="meta")


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Every tensor of a safetensors file, from its header alone (ConversionError if damaged)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as file:
        head = file.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < length <= min(_HEADER_LIMIT, size - 8):
            raise ConversionError(f"{path} is not a safetensors file (its header length is unreadable)")
        try:
            header = json.loads(file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ConversionError(f"{path} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path} is not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    infos, data_start = {}, 8 + length
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = DTYPES[entry["dtype"]], tuple(entry["shape"]), entry["data_offsets"]
            nbytes = torch.Size(shape).numel() * dtype.itemsize
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{path}: tensor {name!r} has an unreadable header entry {entry!r} (dtypes: "
                                  f"{', '.join(DTYPES)})") from None
        if end - begin != nbytes or begin < 0 or data_start + end > size:
            raise ConversionError(f"{path}: tensor {name!r} ({entry['dtype']} {list(shape)}) does not fit its "
                                  f"data_offsets {[begin, end]} in a {size}-byte file: the file is damaged")
        infos[name] = TensorInfo(path, dtype, shape, data_start + begin, nbytes)
    return infos


def read_tensor(info: TensorInfo) -> Tensor:
    """The tensor, read into memory of its own (nothing of the file stays mapped)."""
    data = torch.empty(info.nbytes, dtype=torch.uint8)
    view = memoryview(data.numpy())
    with open(info.path, "rb") as file:
        file.seek(info.start)
        done = 0
        while done < info.nbytes:
            read = file.readinto(view[done:])
            if not read:
                raise ConversionError(f"{info.path} ends before its tensors do: the file is damaged")
            done += read
    return data.view(info.dtype).reshape(info.shape)


def _little_endian_bytes(tensor: Tensor) -> memoryview:
    if sys.byteorder != "little":
        raise ConversionError("safetensors files are little-endian; this machine is not")
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def write_file(path: str | os.PathLike, specs: dict[str, Tensor], produce: Callable[[str], Tensor],
               metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file of the tensors ``specs`` names (meta tensors: their shapes and
    dtypes), in that order, asking ``produce(name)`` for each when its turn comes; only that one is
    held. ``metadata`` defaults to transformers' ``{"format": "pt"}``."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, spec in specs.items():
        if spec.dtype not in _NAMES:
            raise ConversionError(f"{name}: dtype {spec.dtype} has no safetensors name")
        nbytes = spec.numel() * spec.element_size()
        header[name] = {"dtype": _NAMES[spec.dtype], "shape": list(spec.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(text)))
        file.write(text)
        for name, spec in specs.items():
            tensor = produce(name)
            if tensor.shape != spec.shape or tensor.dtype != spec.dtype:
                raise ConversionError(f"{name} came as {tensor.dtype} {list(tensor.shape)}, but the header of "
                                      f"{path} says {spec.dtype} {list(spec.shape)}")
            file.write(_little_endian_bytes(tensor))
            del tensor
