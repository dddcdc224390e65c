"""Read ncnn models (``.param`` + ``.bin``) and convert Real-ESRGAN graphs to spandrel state dicts.

ncnn stores a network as two files:

* ``.param``: text. Line 1 is the magic number ``7767517``, line 2 ``<layer count> <blob count>``,
  then one line per layer: ``type name n_inputs n_outputs inputs... outputs... k=v ...``.
  A value with ``.``, ``e`` or ``E`` is a float, otherwise an int. Array parameters use the key
  ``-23300 - id`` and the value ``count,v1,v2,...``.
* ``.bin``: the weights of every layer that has some, concatenated in layer order. A blob loaded
  with "auto" type (Convolution weights) starts with a 4-byte tag that says how it is stored
  (``0x01306B47`` fp16, ``0`` raw fp32, a quantisation table, ...); a blob loaded as raw fp32
  (biases, PReLU slopes) has no tag.

The converter recognises the two Real-ESRGAN families by walking the graph in file order and
checking every layer's type, shape, activation and connections, so that a file that merely has
the right number of layers cannot be mapped onto the wrong weights:

* RRDBNet (``realesrgan-x4plus``, ``realesrgan-x4plus-anime``) -> spandrel ``ESRGAN``
  (BasicSR key names: ``conv_first``, ``body.N.rdbM.convK``, ``conv_body``, ``conv_upN``,
  ``conv_hr``, ``conv_last``).
* SRVGGNetCompact (``realesr-animevideov3``) -> spandrel ``Compact`` (``body.N``). The ncnn x2
  and x3 variants are the x4 network followed by a bicubic downscale; that trailing resize is
  reported as :attr:`ConvertedModel.post_resize` rather than folded into the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

from raim_diffusion.errors import RaimError

NCNN_MAGIC = 7767517
TAG_FP16 = 0x01306B47
TAG_INT8 = 0x000D4B38
TAG_FP32_SCALED = 0x0002C056

# Interp resize_type -> torch interpolate mode.
INTERP_MODES = {1: "nearest", 2: "bilinear", 3: "bicubic"}
# Convolution activation_type values (param 9).
_ACT_NONE, _ACT_RELU, _ACT_LEAKY = 0, 1, 2
# Layer types that carry no weights in the .bin (the ones Real-ESRGAN graphs use plus a few
# common ones); anything not here and not in the readers below is rejected, because we cannot
# know how many bytes it would consume.
_WEIGHTLESS = frozenset(
    {
        "Input", "Split", "Concat", "BinaryOp", "Eltwise", "Interp", "PixelShuffle", "ReLU",
        "Sigmoid", "TanH", "Clip", "Reshape", "Permute", "Crop", "Padding", "Slice", "Flatten",
        "Noop", "Dropout", "Softmax", "Pooling", "UnaryOp", "HardSigmoid", "HardSwish", "Swish",
        "Mish", "GELU", "ELU",
    }
)  # fmt: skip

ParamValue = Union[int, float, tuple[Union[int, float], ...]]
PathLike = Union[str, Path]


class NcnnFormatError(RaimError, ValueError):
    """An ncnn ``.param``/``.bin`` pair could not be read or converted.

    The message names the file, the line (for ``.param`` problems) and what was expected.
    """


@dataclass(frozen=True)
class NcnnLayer:
    """One layer line of an ncnn ``.param`` file.

    Args:
        type: Layer type, e.g. ``"Convolution"``.
        name: Layer name (unique in the file).
        inputs: Names of the blobs the layer reads.
        outputs: Names of the blobs the layer writes.
        params: ``id -> value``; array parameters are stored under their plain id (``-23310``
            becomes ``10``) as a tuple.
        line: 1-based line number in the ``.param`` file, for error messages.
    """

    type: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    params: dict[int, ParamValue]
    line: int

    def get(self, key: int, default: ParamValue) -> ParamValue:
        """Return parameter ``key`` or ``default`` (ncnn's own defaults are per layer type)."""
        return self.params.get(key, default)


@dataclass
class NcnnGraph:
    """A parsed ncnn ``.param`` file.

    Args:
        layers: Layers in file order (ncnn's execution order).
        blob_count: Blob count declared on line 2.
        source: Where the graph came from, used in error messages.
    """

    layers: list[NcnnLayer]
    blob_count: int
    source: str
    _producer: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for index, layer in enumerate(self.layers):
            for blob in layer.outputs:
                if blob in self._producer:
                    raise NcnnFormatError(
                        f"{self.source}:{layer.line}: blob {blob!r} is written twice "
                        f"(also by layer {self.layers[self._producer[blob]].name!r})"
                    )
                self._producer[blob] = index
        for layer in self.layers:
            for blob in layer.inputs:
                if blob not in self._producer:
                    raise NcnnFormatError(
                        f"{self.source}:{layer.line}: layer {layer.name!r} reads blob {blob!r} "
                        "that no layer writes"
                    )

    def producer(self, blob: str) -> NcnnLayer:
        """Return the layer that writes ``blob``."""
        return self.layers[self._producer[blob]]

    def origin(self, blob: str) -> str:
        """Follow ``Split`` layers back to the blob they copy (Split is a fan-out, not an op)."""
        layer = self.producer(blob)
        while layer.type == "Split":
            blob = layer.inputs[0]
            layer = self.producer(blob)
        return blob

    @property
    def consumed_blobs(self) -> set[str]:
        """Blobs read by at least one layer."""
        return {blob for layer in self.layers for blob in layer.inputs}


def _parse_value(text: str, where: str) -> int | float:
    try:
        if any(c in text for c in ".eE") and not text.lower().startswith(("0x", "-0x")):
            return float(text)
        return int(text)
    except ValueError:
        raise NcnnFormatError(f"{where}: parameter value {text!r} is not a number") from None


def parse_param(source: PathLike | str, *, text: str | None = None) -> NcnnGraph:
    """Parse an ncnn text ``.param`` file.

    Args:
        source: Path of the ``.param`` file (also used as the name in error messages).
        text: The file's contents, if already read; then ``source`` is only a label.

    Returns:
        The graph with its layers in file order.

    Raises:
        NcnnFormatError: The file is not a text ncnn param file, or a line is malformed, or the
            declared layer/blob counts do not match the contents.
    """
    label = str(source)
    if text is None:
        try:
            raw = Path(source).read_bytes()
        except OSError as err:
            raise NcnnFormatError(f"cannot read ncnn param file {label}: {err}") from err
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise NcnnFormatError(
                f"{label}: not a text ncnn .param file (binary .param.bin is not supported)"
            ) from None
    lines = text.splitlines()
    if not lines or lines[0].strip() != str(NCNN_MAGIC):
        first = lines[0].strip()[:40] if lines else ""
        raise NcnnFormatError(
            f"{label}:1: expected the ncnn magic number {NCNN_MAGIC}, found {first!r}"
        )
    header = lines[1].split() if len(lines) > 1 else []
    if len(header) != 2 or not all(h.isdigit() for h in header):
        raise NcnnFormatError(f"{label}:2: expected '<layer count> <blob count>', found {header}")
    layer_count, blob_count = int(header[0]), int(header[1])

    layers: list[NcnnLayer] = []
    for lineno, line in enumerate(lines[2:], start=3):
        tokens = line.split()
        if not tokens:
            continue
        where = f"{label}:{lineno}"
        if len(tokens) < 4 or not tokens[2].isdigit() or not tokens[3].isdigit():
            raise NcnnFormatError(
                f"{where}: expected 'type name n_inputs n_outputs ...', found {line.strip()!r}"
            )
        n_in, n_out = int(tokens[2]), int(tokens[3])
        blobs = tokens[4 : 4 + n_in + n_out]
        if len(blobs) != n_in + n_out:
            raise NcnnFormatError(f"{where}: layer declares {n_in}+{n_out} blobs, lists fewer")
        params: dict[int, ParamValue] = {}
        for item in tokens[4 + n_in + n_out :]:
            key_text, sep, value_text = item.partition("=")
            if not sep:
                raise NcnnFormatError(f"{where}: parameter {item!r} is not 'key=value'")
            try:
                key = int(key_text)
            except ValueError:
                raise NcnnFormatError(
                    f"{where}: parameter key {key_text!r} is not an int"
                ) from None
            if key <= -23300:
                values = value_text.split(",")
                count = _parse_value(values[0], where)
                items = tuple(_parse_value(v, where) for v in values[1:])
                if count != len(items):
                    raise NcnnFormatError(
                        f"{where}: array parameter {key_text} declares {count} values, "
                        f"has {len(items)}"
                    )
                params[-23300 - key] = items
            else:
                params[key] = _parse_value(value_text, where)
        layers.append(
            NcnnLayer(
                type=tokens[0],
                name=tokens[1],
                inputs=tuple(blobs[:n_in]),
                outputs=tuple(blobs[n_in:]),
                params=params,
                line=lineno,
            )
        )
    if len(layers) != layer_count:
        raise NcnnFormatError(
            f"{label}: header declares {layer_count} layers, the file has {len(layers)} "
            "(truncated or edited file?)"
        )
    n_blobs = len({b for layer in layers for b in layer.outputs})
    if n_blobs != blob_count:
        raise NcnnFormatError(
            f"{label}: header declares {blob_count} blobs, the file has {n_blobs}"
        )
    return NcnnGraph(layers=layers, blob_count=blob_count, source=label)


class _BinReader:
    """Sequential reader over a ``.bin`` buffer, mirroring ncnn's ``ModelBinFromDataReader``."""

    def __init__(self, data: bytes, label: str, param_label: str) -> None:
        self.data = data
        self.label = label
        self.param_label = param_label
        self.offset = 0

    def _take(self, nbytes: int, what: str) -> memoryview:
        end = self.offset + nbytes
        if end > len(self.data):
            raise NcnnFormatError(
                f"{self.label}: file ends at byte {len(self.data)} while reading {what} "
                f"({nbytes} bytes at offset {self.offset}); it does not match {self.param_label}"
            )
        view = memoryview(self.data)[self.offset : end]
        self.offset = end
        return view

    def raw_fp32(self, count: int, what: str) -> np.ndarray:
        return np.frombuffer(self._take(4 * count, what), dtype="<f4").astype(np.float32)

    def auto(self, count: int, what: str) -> np.ndarray:
        """Read a blob stored with ncnn's "auto" type: a 4-byte tag, then the data."""
        tag_bytes = bytes(self._take(4, f"{what} storage tag"))
        tag = int.from_bytes(tag_bytes, "little")
        if tag == TAG_FP16:
            # fp16 data is padded to a multiple of 4 bytes.
            nbytes = 2 * count
            data = np.frombuffer(self._take(nbytes, what), dtype="<f2").astype(np.float32)
            self._take((-nbytes) % 4, f"{what} padding")
            return data
        if tag == TAG_INT8:
            raise NcnnFormatError(
                f"{self.label}: {what} is int8-quantised (tag 0x{tag:08X}); int8 models need "
                "their scale tables and are not supported"
            )
        if tag == TAG_FP32_SCALED:
            return self.raw_fp32(count, what)
        if sum(tag_bytes) != 0:
            # Any other non-zero tag: a 256-entry fp32 table, then one uint8 index per value.
            table = self.raw_fp32(256, f"{what} quantisation table")
            index = np.frombuffer(self._take(count, what), dtype=np.uint8)
            self._take((-count) % 4, f"{what} padding")
            return table[index]
        return self.raw_fp32(count, what)


def _conv_shape(layer: NcnnLayer, label: str) -> tuple[int, int, int, int]:
    """(out, in, kh, kw) of a Convolution layer, from its params."""
    out_ch = int(layer.get(0, 0))
    kw = int(layer.get(1, 0))
    kh = int(layer.get(11, kw))
    size = int(layer.get(6, 0))
    if out_ch <= 0 or kw <= 0 or kh <= 0 or size <= 0 or size % (out_ch * kh * kw):
        raise NcnnFormatError(
            f"{label}:{layer.line}: Convolution {layer.name!r} has inconsistent sizes "
            f"(num_output={out_ch}, kernel={kh}x{kw}, weight_data_size={size})"
        )
    return out_ch, size // (out_ch * kh * kw), kh, kw


def read_weights(
    graph: NcnnGraph, bin_path: PathLike, *, data: bytes | None = None
) -> dict[str, dict[str, np.ndarray]]:
    """Read every layer's weights from an ncnn ``.bin`` file.

    Args:
        graph: The parsed ``.param`` that belongs to the file.
        bin_path: Path of the ``.bin`` file (also the label in error messages).
        data: The file's bytes, if already read.

    Returns:
        ``layer name -> {"weight": ..., "bias": ...}`` for Convolution-like layers (weights
        reshaped to ``(out, in, kh, kw)`` / ``(out, in)``), ``{"slope": ...}`` for PReLU, and so on.
        Arrays are float32.

    Raises:
        NcnnFormatError: A layer type whose storage is unknown, an unsupported storage tag, or a
            file size that does not match the ``.param``.
    """
    label = str(bin_path)
    if data is None:
        try:
            data = Path(bin_path).read_bytes()
        except OSError as err:
            raise NcnnFormatError(f"cannot read ncnn weight file {label}: {err}") from err
    reader = _BinReader(data, label, graph.source)
    weights: dict[str, dict[str, np.ndarray]] = {}
    for layer in graph.layers:
        what = f"layer {layer.name!r} ({layer.type}, {graph.source}:{layer.line})"
        if layer.type in ("Convolution", "ConvolutionDepthWise", "Deconvolution"):
            if int(layer.get(8, 0)):
                raise NcnnFormatError(f"{label}: {what} is int8-quantised; not supported")
            out_ch, _, kh, kw = _conv_shape(layer, graph.source)
            size = int(layer.get(6, 0))
            weight = reader.auto(size, f"{what} weights")
            entry = {"weight": weight.reshape(out_ch, -1, kh, kw)}
            if int(layer.get(5, 0)):
                entry["bias"] = reader.raw_fp32(out_ch, f"{what} bias")
            weights[layer.name] = entry
        elif layer.type == "InnerProduct":
            out_ch, size = int(layer.get(0, 0)), int(layer.get(2, 0))
            if int(layer.get(8, 0)):
                raise NcnnFormatError(f"{label}: {what} is int8-quantised; not supported")
            entry = {"weight": reader.auto(size, f"{what} weights").reshape(out_ch, -1)}
            if int(layer.get(1, 0)):
                entry["bias"] = reader.raw_fp32(out_ch, f"{what} bias")
            weights[layer.name] = entry
        elif layer.type == "PReLU":
            weights[layer.name] = {"slope": reader.raw_fp32(int(layer.get(0, 0)), what)}
        elif layer.type == "BatchNorm":
            channels = int(layer.get(0, 0))
            weights[layer.name] = {
                key: reader.raw_fp32(channels, f"{what} {key}")
                for key in ("slope", "mean", "var", "bias")
            }
        elif layer.type == "Scale":
            channels = int(layer.get(0, 0))
            entry = {"scale": reader.raw_fp32(channels, f"{what} scale")}
            if int(layer.get(1, 0)):
                entry["bias"] = reader.raw_fp32(channels, f"{what} bias")
            weights[layer.name] = entry
        elif layer.type not in _WEIGHTLESS:
            raise NcnnFormatError(
                f"{graph.source}:{layer.line}: layer type {layer.type!r} is not supported "
                "(cannot tell how many weights it stores)"
            )
    if reader.offset != len(data):
        raise NcnnFormatError(
            f"{label}: {len(data) - reader.offset} bytes left after the last layer's weights; "
            f"it does not match {graph.source}"
        )
    return weights


@dataclass
class ConvertedModel:
    """The result of :func:`convert_ncnn`.

    Args:
        state_dict: PyTorch weights, float32, with the key names spandrel detects.
        arch: spandrel architecture id: ``"ESRGAN"`` or ``"Compact"``.
        net_scale: Upscale factor of the network the state dict describes.
        post_resize: ``(factor, mode)`` of an ncnn Interp that runs after the network (the
            animevideov3 x2/x3 files downscale the x4 output bicubically), else ``None``.
        hyperparameters: What was read from the graph (blocks, features, ...).
    """

    state_dict: dict[str, torch.Tensor]
    arch: str
    net_scale: int
    post_resize: tuple[float, str] | None = None
    hyperparameters: dict[str, int] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        """Output size / input size of the whole ncnn graph (network and post-resize)."""
        if self.post_resize is None:
            return float(self.net_scale)
        return self.net_scale * self.post_resize[0]


def apply_post_resize(x: torch.Tensor, post_resize: tuple[float, str] | None) -> torch.Tensor:
    """Apply an ncnn Interp ``post_resize`` to a network output, the way ncnn computes it.

    ncnn's Interp takes the output size as ``int(size * factor)`` and samples with
    half-pixel centres (``align_corners=False``); bicubic uses ``A = -0.75`` and replicates the
    border, which is what :func:`torch.nn.functional.interpolate` does without antialiasing.

    Args:
        x: Network output, NCHW.
        post_resize: ``(factor, mode)`` from :attr:`ConvertedModel.post_resize`, or ``None``.

    Returns:
        The resized tensor (``x`` itself when ``post_resize`` is ``None``).
    """
    if post_resize is None:
        return x
    factor, mode = post_resize
    size = (int(x.shape[-2] * factor), int(x.shape[-1] * factor))
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


class _Walker:
    """Walks the non-Split layers of a graph in file order and checks each one."""

    def __init__(self, graph: NcnnGraph, kind: str) -> None:
        self.graph = graph
        self.kind = kind
        self.layers = [layer for layer in graph.layers if layer.type != "Split"]
        self.pos = 0

    def error(self, layer: NcnnLayer | None, message: str) -> NcnnFormatError:
        where = f"{self.graph.source}:{layer.line}" if layer else self.graph.source
        name = f" layer {layer.name!r}:" if layer else ""
        return NcnnFormatError(f"{where}:{name} {message} (not a {self.kind} graph)")

    def peek(self, offset: int = 0) -> NcnnLayer | None:
        index = self.pos + offset
        return self.layers[index] if index < len(self.layers) else None

    def take(self, layer_type: str, role: str) -> NcnnLayer:
        layer = self.peek()
        if layer is None:
            raise self.error(None, f"graph ends where {layer_type} ({role}) was expected")
        if layer.type != layer_type:
            raise self.error(layer, f"expected {layer_type} ({role}), found {layer.type}")
        self.pos += 1
        return layer

    def expect_reads(self, layer: NcnnLayer, blobs: list[str], role: str) -> None:
        found = [self.graph.origin(b) for b in layer.inputs]
        if found != blobs:
            raise self.error(layer, f"{role} reads {found}, expected {blobs}")

    def expect_sum(self, layer: NcnnLayer, coeffs: dict[str, float], role: str) -> None:
        """Check an elementwise sum ``sum(coeff * blob)`` (Eltwise SUM or BinaryOp ADD)."""
        found = [self.graph.origin(b) for b in layer.inputs]
        if sorted(found) != sorted(coeffs):
            raise self.error(layer, f"{role} adds {found}, expected {sorted(coeffs)}")
        if layer.type == "BinaryOp":
            if int(layer.get(0, 0)) != 0 or int(layer.get(1, 0)) != 0:
                raise self.error(layer, f"{role} must be a tensor-tensor add (BinaryOp 0=0)")
            have = dict.fromkeys(found, 1.0)
        elif layer.type == "Eltwise":
            if int(layer.get(0, 1)) != 1:
                raise self.error(layer, f"{role} must be an Eltwise SUM (0=1)")
            values = layer.get(1, ())
            values = tuple(values) if values else (1.0,) * len(found)
            if len(values) != len(found):
                raise self.error(layer, f"{role} has {len(values)} coefficients for 2 inputs")
            have = dict(zip(found, map(float, values), strict=True))
        else:
            raise self.error(layer, f"expected an add ({role}), found {layer.type}")
        for blob, coeff in coeffs.items():
            if not math.isclose(have[blob], coeff, rel_tol=1e-6):
                raise self.error(layer, f"{role} scales {blob!r} by {have[blob]}, expected {coeff}")

    def take_add(self, coeffs: dict[str, float], role: str) -> NcnnLayer:
        layer = self.peek()
        if layer is None or layer.type not in ("BinaryOp", "Eltwise"):
            found = layer.type if layer else "end of graph"
            raise self.error(layer, f"expected an add ({role}), found {found}")
        self.pos += 1
        self.expect_sum(layer, coeffs, role)
        return layer

    def take_conv(
        self,
        role: str,
        *,
        reads: str,
        in_ch: int | None,
        out_ch: int | None,
        act: tuple[int, float | None],
    ) -> NcnnLayer:
        """Take a 3x3, stride 1, pad 1, dilation 1 Convolution and check what it reads and does."""
        layer = self.take("Convolution", role)
        self.expect_reads(layer, [reads], role)
        out_, in_, kh, kw = _conv_shape(layer, self.graph.source)
        geometry = {
            "kernel": (kh, kw),
            "stride": (int(layer.get(13, layer.get(3, 1))), int(layer.get(3, 1))),
            "dilation": (int(layer.get(12, layer.get(2, 1))), int(layer.get(2, 1))),
        }
        pad_left = int(layer.get(4, 0))
        pads = (
            pad_left,
            int(layer.get(15, pad_left)),
            int(layer.get(14, pad_left)),
            int(layer.get(16, layer.get(14, pad_left))),
        )
        if geometry != {"kernel": (3, 3), "stride": (1, 1), "dilation": (1, 1)} or pads != (
            1,
            1,
            1,
            1,
        ):
            raise self.error(
                layer, f"{role} must be 3x3/stride 1/pad 1, found {geometry} pad={pads}"
            )
        if int(layer.get(19, 0)):
            raise self.error(layer, f"{role} uses dynamic weights")
        if in_ch is not None and in_ != in_ch:
            raise self.error(layer, f"{role} has {in_} input channels, expected {in_ch}")
        if out_ch is not None and out_ != out_ch:
            raise self.error(layer, f"{role} has {out_} output channels, expected {out_ch}")
        act_type = int(layer.get(9, 0))
        act_params = layer.get(10, ())
        if not isinstance(act_params, tuple):
            act_params = (act_params,)
        want_type, want_param = act
        ok = act_type == want_type
        if ok and want_param is not None:
            slope = float(act_params[0]) if act_params else 0.0
            ok = math.isclose(slope, want_param, rel_tol=1e-6)
        if not ok:
            raise self.error(
                layer,
                f"{role} has activation type {act_type} {tuple(act_params)}, expected "
                f"{want_type}" + (f" ({want_param},)" if want_param is not None else ""),
            )
        return layer

    def take_interp(self, role: str, *, reads: str) -> tuple[NcnnLayer, str, float]:
        layer = self.take("Interp", role)
        self.expect_reads(layer, [reads], role)
        mode = INTERP_MODES.get(int(layer.get(0, 0)))
        fy, fx = float(layer.get(1, 1.0)), float(layer.get(2, 1.0))
        if mode is None or fy != fx or fy <= 0 or int(layer.get(3, 0)) or int(layer.get(4, 0)):
            raise self.error(layer, f"{role} must resize by one factor, found {layer.params}")
        if int(layer.get(6, 0)) or int(layer.get(5, 0)):
            raise self.error(layer, f"{role} uses align_corner/dynamic size, not supported")
        return layer, mode, fy

    def finish(self, output_blob: str) -> None:
        extra = self.peek()
        if extra is not None:
            raise self.error(extra, "unexpected layer after the network's output")
        if output_blob in self.graph.consumed_blobs:
            raise self.error(None, f"output blob {output_blob!r} is read again")


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, dtype=np.float32))  # copy: buffers may be read-only


def _conv_tensors(layer: NcnnLayer, weights: dict[str, dict[str, np.ndarray]]) -> tuple:
    entry = weights[layer.name]
    weight = _tensor(entry["weight"])
    # A conv without bias equals one with zero bias; spandrel's modules always have one.
    bias = _tensor(entry["bias"]) if "bias" in entry else torch.zeros(weight.shape[0])
    return weight, bias


def _input_blob(walker: _Walker) -> str:
    layer = walker.take("Input", "the image input")
    if len(layer.outputs) != 1:
        raise walker.error(layer, "Input must have one output")
    return layer.outputs[0]


def convert_rrdbnet(graph: NcnnGraph, weights: dict[str, dict[str, np.ndarray]]) -> ConvertedModel:
    """Convert an ncnn Real-ESRGAN RRDBNet graph to BasicSR-named weights for spandrel's ESRGAN.

    Args:
        graph: Parsed ``.param``.
        weights: Output of :func:`read_weights` for the same model.

    Returns:
        The converted model (``arch="ESRGAN"``).

    Raises:
        NcnnFormatError: The graph is not an RRDBNet that spandrel can represent (3x3 convs,
            growth 32, residual scale 0.2, LeakyReLU 0.2, nearest x2 upsampling).
    """
    walker = _Walker(graph, "Real-ESRGAN RRDBNet")
    lrelu = (_ACT_LEAKY, 0.2)
    none = (_ACT_NONE, None)
    x = _input_blob(walker)
    convs = [layer for layer in walker.layers if layer.type == "Convolution"]
    ups = [layer for layer in walker.layers if layer.type == "Interp"]
    # conv_first + 15 per RRDB + conv_body + one per upsample + conv_hr + conv_last
    num_blocks, rest = divmod(len(convs) - 4 - len(ups), 15)
    if num_blocks < 1 or rest:
        raise walker.error(
            None, f"{len(convs)} convolutions and {len(ups)} upsamples fit no RRDB count"
        )
    sd: dict[str, torch.Tensor] = {}

    def put(key: str, layer: NcnnLayer) -> str:
        sd[f"{key}.weight"], sd[f"{key}.bias"] = _conv_tensors(layer, weights)
        return layer.outputs[0]

    first = walker.take_conv("conv_first", reads=x, in_ch=None, out_ch=None, act=none)
    in_nc, nf = _conv_shape(first, graph.source)[1], _conv_shape(first, graph.source)[0]
    gc = 32  # spandrel's RRDB hard-codes the growth channels
    feat = put("conv_first", first)
    trunk = feat
    for b in range(num_blocks):
        block_in = trunk
        for r in range(1, 4):
            feats = [trunk]
            for k in range(1, 6):
                role = f"body.{b}.rdb{r}.conv{k}"
                reads = trunk
                if k > 1:
                    cat = walker.take("Concat", f"input of {role}")
                    if int(cat.get(0, 0)) != 0:
                        raise walker.error(cat, f"input of {role} must concat channels (0=0)")
                    walker.expect_reads(cat, feats, f"input of {role}")
                    reads = cat.outputs[0]
                conv = walker.take_conv(
                    role,
                    reads=reads,
                    in_ch=nf + (k - 1) * gc,
                    out_ch=gc if k < 5 else nf,
                    act=lrelu if k < 5 else none,
                )
                feats.append(put(role, conv))
            add = walker.take_add({feats[-1]: 0.2, trunk: 1.0}, f"body.{b}.rdb{r} residual")
            trunk = add.outputs[0]
        add = walker.take_add({trunk: 0.2, block_in: 1.0}, f"body.{b} residual")
        trunk = add.outputs[0]
    body = put(
        "conv_body",
        walker.take_conv("conv_body", reads=trunk, in_ch=nf, out_ch=nf, act=none),
    )
    trunk = walker.take_add({body: 1.0, feat: 1.0}, "trunk residual").outputs[0]
    for u in range(1, len(ups) + 1):
        interp, mode, factor = walker.take_interp(f"upsample {u}", reads=trunk)
        if mode != "nearest" or factor != 2.0:
            raise walker.error(interp, f"upsample {u} must be nearest x2, found {mode} x{factor}")
        role = f"conv_up{u}"
        trunk = put(
            role,
            walker.take_conv(role, reads=interp.outputs[0], in_ch=nf, out_ch=nf, act=lrelu),
        )
    trunk = put("conv_hr", walker.take_conv("conv_hr", reads=trunk, in_ch=nf, out_ch=nf, act=lrelu))
    last = walker.take_conv("conv_last", reads=trunk, in_ch=nf, out_ch=in_nc, act=none)
    walker.finish(put("conv_last", last))
    return ConvertedModel(
        state_dict=sd,
        arch="ESRGAN",
        net_scale=2 ** len(ups),
        hyperparameters={
            "in_nc": in_nc,
            "num_feat": nf,
            "num_block": num_blocks,
            "num_grow_ch": gc,
        },
    )


def convert_compact(graph: NcnnGraph, weights: dict[str, dict[str, np.ndarray]]) -> ConvertedModel:
    """Convert an ncnn SRVGGNetCompact graph (realesr-animevideov3) to spandrel ``Compact`` weights.

    Args:
        graph: Parsed ``.param``.
        weights: Output of :func:`read_weights` for the same model.

    Returns:
        The converted model (``arch="Compact"``); a trailing Interp becomes ``post_resize``.

    Raises:
        NcnnFormatError: The graph is not a PReLU SRVGGNetCompact (conv/PReLU chain, last conv,
            PixelShuffle, plus the nearest-upsampled input).
    """
    walker = _Walker(graph, "SRVGGNetCompact")
    x = _input_blob(walker)
    sd: dict[str, torch.Tensor] = {}
    index = 0
    feat: str = x
    nf = in_nc = out_ch = 0
    # conv + PReLU pairs, until a conv that is followed by PixelShuffle
    while True:
        nxt = walker.peek(1)
        is_last = nxt is not None and nxt.type == "PixelShuffle"
        role = f"body.{index}"
        conv = walker.take_conv(
            role,
            reads=feat,
            in_ch=nf if index else None,
            out_ch=None if is_last or not index else nf,
            act=(_ACT_NONE, None),
        )
        out_ch, conv_in, _, _ = _conv_shape(conv, graph.source)
        if not index:
            in_nc, nf = conv_in, out_ch
        sd[f"{role}.weight"], sd[f"{role}.bias"] = _conv_tensors(conv, weights)
        feat = conv.outputs[0]
        index += 1
        if is_last:
            break
        prelu = walker.take("PReLU", f"body.{index}")
        walker.expect_reads(prelu, [feat], f"body.{index}")
        slope = weights[prelu.name]["slope"]
        if slope.size not in (1, nf):
            raise walker.error(prelu, f"PReLU has {slope.size} slopes, expected 1 or {nf}")
        sd[f"body.{index}.weight"] = _tensor(np.broadcast_to(slope, (nf,)))
        feat = prelu.outputs[0]
        index += 1
    if index < 3:
        raise walker.error(conv, "too few layers for SRVGGNetCompact")
    shuffle = walker.take("PixelShuffle", "upsampler")
    walker.expect_reads(shuffle, [feat], "upsampler")
    scale = int(shuffle.get(0, 1))
    if int(shuffle.get(1, 0)) != 0:
        raise walker.error(shuffle, "PixelShuffle must use PyTorch's channel order (1=0)")
    if out_ch != in_nc * scale * scale:
        raise walker.error(conv, f"last conv has {out_ch} channels, expected {in_nc}*{scale}^2")
    interp, mode, factor = walker.take_interp("nearest-upsampled input", reads=x)
    if mode != "nearest" or factor != scale:
        raise walker.error(
            interp, f"input upsample must be nearest x{scale}, found {mode} x{factor}"
        )
    out = walker.take_add(
        {shuffle.outputs[0]: 1.0, interp.outputs[0]: 1.0}, "residual add"
    ).outputs[0]
    post_resize = None
    if walker.peek() is not None and walker.peek().type == "Interp":
        resize, mode, factor = walker.take_interp("post-resize", reads=out)
        post_resize = (factor, mode)
        out = resize.outputs[0]
    walker.finish(out)
    return ConvertedModel(
        state_dict=sd,
        arch="Compact",
        net_scale=scale,
        post_resize=post_resize,
        hyperparameters={"in_nc": in_nc, "num_feat": nf, "num_conv": (index - 3) // 2},
    )


def load_ncnn(param_path: PathLike, bin_path: PathLike | None = None) -> tuple[NcnnGraph, dict]:
    """Parse an ncnn model pair.

    Args:
        param_path: The ``.param`` file.
        bin_path: The ``.bin`` file; defaults to ``param_path`` with the suffix ``.bin``.

    Returns:
        ``(graph, weights)`` as from :func:`parse_param` and :func:`read_weights`.
    """
    param_path = Path(param_path)
    bin_path = Path(bin_path) if bin_path is not None else param_path.with_suffix(".bin")
    graph = parse_param(param_path)
    return graph, read_weights(graph, bin_path)


def convert_ncnn(
    param_path: PathLike, bin_path: PathLike | None = None, *, verify: bool = True
) -> ConvertedModel:
    """Convert an ncnn Real-ESRGAN model to a spandrel-loadable PyTorch state dict.

    The architecture is recognised from the graph: PReLU layers mean SRVGGNetCompact, Concat
    layers (dense blocks) mean RRDBNet.

    Args:
        param_path: The ``.param`` file.
        bin_path: The ``.bin`` file; defaults to ``param_path`` with the suffix ``.bin``.
        verify: Load the state dict with spandrel and check that it detects the same architecture
            and scale (catches key-naming drift between spandrel versions).

    Returns:
        The converted model.

    Raises:
        NcnnFormatError: Unreadable files, or a graph that is neither architecture.
    """
    graph, weights = load_ncnn(param_path, bin_path)
    types = {layer.type for layer in graph.layers}
    if "PReLU" in types and "PixelShuffle" in types:
        converted = convert_compact(graph, weights)
    elif "Concat" in types and "Eltwise" in types:
        converted = convert_rrdbnet(graph, weights)
    else:
        raise NcnnFormatError(
            f"{graph.source}: layer types {sorted(types)} match neither RRDBNet nor SRVGGNetCompact"
        )
    if verify:
        verify_with_spandrel(converted, str(graph.source))
    return converted


def verify_with_spandrel(converted: ConvertedModel, label: str = "converted model") -> None:
    """Check that spandrel loads ``converted.state_dict`` as ``converted.arch`` at its scale.

    Args:
        converted: Output of :func:`convert_ncnn`.
        label: Name used in the error message.

    Raises:
        NcnnFormatError: spandrel rejects the weights or detects something else.
    """
    # Imported here so that listing built-in names does not pay for spandrel's registry.
    from spandrel import ModelLoader

    try:
        descriptor = ModelLoader().load_from_state_dict(dict(converted.state_dict))
    except Exception as err:  # spandrel raises several types; all mean "cannot load"
        raise NcnnFormatError(
            f"{label}: spandrel cannot load the converted weights: {err}"
        ) from err
    if descriptor.architecture.id != converted.arch or descriptor.scale != converted.net_scale:
        raise NcnnFormatError(
            f"{label}: spandrel detects {descriptor.architecture.id} x{descriptor.scale}, "
            f"the graph is {converted.arch} x{converted.net_scale}"
        )


__all__ = [
    "ConvertedModel",
    "NcnnFormatError",
    "NcnnGraph",
    "NcnnLayer",
    "apply_post_resize",
    "convert_compact",
    "convert_ncnn",
    "convert_rrdbnet",
    "load_ncnn",
    "parse_param",
    "read_weights",
    "verify_with_spandrel",
]
