"""Update compression: codecs that shrink a client's update before it goes on the wire.

Pure functions over plain torch tensors (no Flower, no I/O). :func:`encode` turns named float
tensors into wire arrays ``"<name>#<part>"`` plus config entries (``codec`` and
``shape/<name>``); :func:`decode` inverts it. Names may contain ``/`` and ``.`` but not ``#``.

Codecs and their error bounds (x is one element, x̂ its decoded value, n the element count,
rows = ``shape[0]`` for a tensor of dim ≥ 2, else 1; the quantizers lay a tall 2-D tensor such
as ``B [out × r]`` out transposed, so that its rows are the long side and it carries r scales, not
out):

``none``  float32 as is; exact. 4n bytes.
``fp16``  round-to-nearest to float16: |x̂ − x| ≤ 2⁻¹¹·|x| for |x| in float16's normal range
          [2⁻¹⁴, 65504]; below it (subnormals) |x̂ − x| ≤ 2⁻²⁵. Values beyond 65504 are refused.
          2n bytes.
``bf16``  round-to-nearest to bfloat16 (float32's exponent range): |x̂ − x| ≤ 2⁻⁸·|x|. Sent as
          ``int16`` (same bytes; numpy has no bfloat16). 2n bytes.
``int8``, ``int4``
          per-row symmetric stochastic rounding with L = 2^(bits−1) − 1 (127, 7):
          s_r = max|x_r| / L, y = x / s_r, q = ⌊y⌋ + 1[u < y − ⌊y⌋], u ~ U[0, 1), x̂ = q·s_r.
          Unbiased, E[x̂] = x; every draw |x̂ − x| < s_r; Var[x̂] ≤ s_r²/4. A zero row decodes
          to exactly 0. int8: n + 4·rows bytes; int4 packs two codes per byte: ⌈n/2⌉ + 4·rows.
``topk``  the k = max(1, ⌈f·n⌉) entries of largest magnitude (int32 flat index + float32 value)
          with error feedback: e = x + r, send top-k(e), r ← e − densify(sent). What is not sent
          is carried, not lost: Σ_t sent_t + r_T = Σ_t x_t exactly (up to float addition).
          8k bytes. ``joint=True`` chooses the k entries among all the tensors of a message together
          (k = max(1, ⌈f·N⌉) of their N entries: FLASC's sparsity, ``strategies/flasc.py``).

The quantizers are unbiased and the casts deterministic, so only ``topk`` returns a residual.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

KINDS = ("none", "fp16", "bf16", "int8", "int4", "topk")
PARTS = ("fp16", "bf16", "q", "scale", "idx", "val")
SEP = "#"
_FP16_MAX = float(torch.finfo(torch.float16).max)


# --- shapes ----------------------------------------------------------------------------------


def _rows_cols(shape: Sequence[int]) -> tuple[int, int]:
    """Rows of the per-row scales: ``shape[0]`` for dim ≥ 2, else one row; cols = n / rows."""
    n = math.prod(shape)
    rows = int(shape[0]) if len(shape) >= 2 else 1
    return rows, (n // rows if rows else 0)


def _tall(shape: Sequence[int]) -> bool:
    """A 2-D tensor with more rows than columns is quantized transposed (fewer scales)."""
    return len(shape) == 2 and shape[0] > shape[1]


def _levels(bits: int) -> int:
    if bits not in (8, 4):
        raise ValueError(f"compression: bits must be 8 or 4, got {bits!r}")
    return 2 ** (bits - 1) - 1


def _topk_k(n: int, fraction: float) -> int:
    """k = max(1, ⌈fraction·n⌉), at most n (the ceiling ignores float noise, e.g. 0.1·30)."""
    _check_fraction(fraction)
    return min(n, max(1, math.ceil(fraction * n * (1 - 1e-12))))


def _check_fraction(fraction: float) -> None:
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise ValueError(f"compression.topk_fraction must be in (0, 1], got {fraction!r}")


# --- quantization ----------------------------------------------------------------------------


def stochastic_quantize(x: Tensor, bits: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Per-row symmetric stochastic rounding to ``bits`` (8 or 4).

    s_r = max|x_r| / L with L = 2^(bits−1) − 1 (a zero row gets s_r = 0), y = x / s_r (0 where
    s_r = 0), q = ⌊y⌋ + 1[u < y − ⌊y⌋] with u ~ U[0, 1) drawn from ``generator``; so
    E[q·s_r] = x and |q·s_r − x| < s_r. Returns ``(codes, scales)``: bits=8 → int8 codes, one
    per element (flattened); bits=4 → uint8 codes holding q + 8 ∈ [1, 15] as nibbles (low =
    even index, high = odd index, an odd count padded with a zero nibble), ⌈n/2⌉ bytes.
    ``scales`` is float32 of shape [rows].
    """
    L = _levels(bits)
    x = x.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("compression: cannot quantize non-finite values")
    rows, cols = _rows_cols(tuple(x.shape))
    flat = x.reshape(rows, cols)
    if cols == 0:
        scales = torch.zeros(rows, dtype=torch.float32)
        q = torch.zeros((rows, 0), dtype=torch.float32)
    else:
        scales = flat.abs().amax(dim=1) / L
        s = scales[:, None]
        y = torch.where(s > 0, flat / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(flat))
        fl = torch.floor(y)
        u = torch.rand(y.shape, generator=generator, dtype=torch.float32)
        q = (fl + (u < y - fl).to(torch.float32)).clamp_(-L, L)  # clamp: float noise at |y| = L
    q = q.reshape(-1)
    if bits == 8:
        return q.to(torch.int8).contiguous(), scales.contiguous()
    v = (q + 8).to(torch.uint8)
    if v.numel() % 2:
        v = torch.cat([v, torch.zeros(1, dtype=torch.uint8)])
    return (v[0::2] | (v[1::2] << 4)).contiguous(), scales.contiguous()


def dequantize(codes: Tensor, scales: Tensor, bits: int, shape: tuple[int, ...]) -> Tensor:
    """x̂ = q·s_r as float32 of ``shape``; the inverse of :func:`stochastic_quantize`'s layout."""
    L = _levels(bits)
    shape = tuple(int(d) for d in shape)
    n = math.prod(shape)
    rows, cols = _rows_cols(shape)
    if scales.dtype != torch.float32 or scales.numel() != rows:
        raise ValueError(f"scales must be {rows} float32 values, got {scales.numel()} {scales.dtype}")
    if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
        raise ValueError("scales must be finite and non-negative")
    codes = codes.reshape(-1)
    if bits == 8:
        if codes.dtype != torch.int8 or codes.numel() != n:
            raise ValueError(f"int8 codes must be {n} int8 values, got {codes.numel()} {codes.dtype}")
        q = codes.to(torch.int32)
    else:
        nbytes = (n + 1) // 2
        if codes.dtype != torch.uint8 or codes.numel() != nbytes:
            raise ValueError(f"int4 codes must be {nbytes} uint8 bytes, got {codes.numel()} {codes.dtype}")
        v = torch.stack([codes & 0x0F, codes >> 4], dim=1).reshape(-1)[:n].to(torch.int32)
        q = v - 8
    if bool((q.abs() > L).any()):
        raise ValueError(f"codes out of range [-{L}, {L}]")
    return (q.to(torch.float32).reshape(rows, cols) * scales[:, None]).reshape(shape)


# --- sparsification --------------------------------------------------------------------------


def topk_sparsify(x: Tensor, fraction: float) -> tuple[Tensor, Tensor]:
    """The k = max(1, ⌈fraction·n⌉) entries of largest |x|: (int32 flat indices, ascending;
    float32 values)."""
    return topk_sparsify_joint({"x": x}, fraction)["x"]


def topk_sparsify_joint(tensors: Mapping[str, Tensor], fraction: float) -> dict[str, tuple[Tensor, Tensor]]:
    """One top-k over several tensors together: the k = max(1, ⌈fraction·N⌉) entries of largest
    magnitude among all N entries of ``tensors`` (FLASC's mask over a whole adapter), returned per
    tensor as (int32 flat indices, ascending; float32 values); a tensor may keep any number of its
    entries, none included. One tensor alone: :func:`topk_sparsify`."""
    flats = {name: t.detach().to("cpu", torch.float32).reshape(-1) for name, t in tensors.items()}
    every = torch.cat(list(flats.values())) if flats else torch.zeros(0)
    k = _topk_k(every.numel(), fraction)
    chosen = torch.topk(every.abs(), k, sorted=False).indices.sort().values if every.numel() else every.long()
    out: dict[str, tuple[Tensor, Tensor]] = {}
    start = 0
    for name, flat in flats.items():
        lo, hi = torch.searchsorted(chosen, torch.tensor([start, start + flat.numel()])).tolist()
        idx = chosen[lo:hi] - start
        out[name] = (idx.to(torch.int32).contiguous(), flat[idx].contiguous())
        start += flat.numel()
    return out


def densify(indices: Tensor, values: Tensor, shape: Sequence[int]) -> Tensor:
    """The float32 tensor of ``shape`` that is ``values`` at the flat ``indices`` and 0 elsewhere."""
    out = torch.zeros(math.prod(shape), dtype=torch.float32)
    out[indices.reshape(-1).to(torch.int64)] = values.reshape(-1).to(torch.float32)
    return out.reshape(tuple(int(d) for d in shape))


# --- named tensors ---------------------------------------------------------------------------


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"compression: unknown codec {kind!r}; expected one of {', '.join(KINDS)}")


def encode(
    tensors: Mapping[str, Tensor],
    kind: str,
    *,
    fraction: float = 0.1,
    generator: torch.Generator | None = None,
    residual: Mapping[str, Tensor] | None = None,
    joint: bool = False,
) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Tensor]]:
    """Compress named tensors with codec ``kind``; returns (wire arrays, config, new residual).

    Wire keys are ``"<name>#<part>"`` (``"<name>"`` itself, float32, for ``none``); config holds
    ``"codec": kind`` and ``"shape/<name>": list[int]`` per tensor. int8/int4 need ``generator``.
    ``topk`` sends top-k(e) of e = x + residual[name] and returns residual[name] = e − sent;
    residual entries for names not in ``tensors`` are carried over unchanged. ``joint``: top-k's
    k entries are chosen among all the tensors together (:func:`topk_sparsify_joint`), not k per
    tensor. Other codecs return an empty residual.
    """
    _check_kind(kind)
    if kind == "topk":
        _check_fraction(fraction)
    if kind in ("int8", "int4") and generator is None:
        raise ValueError(f"compression: codec {kind!r} needs a torch.Generator for stochastic rounding")
    residual = residual or {}
    arrays: dict[str, Tensor] = {}
    config: dict[str, Any] = {"codec": kind}
    new_residual: dict[str, Tensor] = {}
    errors: dict[str, Tensor] = {}  # topk: each tensor plus its residual, before sparsification
    for name, t in tensors.items():
        if SEP in name:
            raise ValueError(f"compression: tensor name {name!r} must not contain {SEP!r}")
        x = t.detach().to("cpu", torch.float32)
        shape = tuple(x.shape)
        config[f"shape/{name}"] = list(shape)
        if kind != "none" and not bool(torch.isfinite(x).all()):
            raise ValueError(f"compression: tensor {name!r} has non-finite values; codec {kind!r} cannot send them")
        key = f"{name}{SEP}"
        if kind == "none":
            arrays[name] = x.clone().contiguous()
        elif kind == "fp16":
            if bool((x.abs() > _FP16_MAX).any()):
                raise ValueError(f"compression: tensor {name!r} exceeds the float16 range (±{_FP16_MAX:g}); use bf16")
            arrays[key + "fp16"] = x.to(torch.float16).contiguous()
        elif kind == "bf16":
            arrays[key + "bf16"] = x.to(torch.bfloat16).contiguous().view(torch.int16)
        elif kind in ("int8", "int4"):
            assert generator is not None
            q, s = stochastic_quantize(x.T.contiguous() if _tall(shape) else x, 8 if kind == "int8" else 4, generator)
            arrays[key + "q"], arrays[key + "scale"] = q, s
        else:  # topk: e = x + residual, sparsified below (per tensor, or all together)
            e = x
            if name in residual:
                r = residual[name].detach().to("cpu", torch.float32)
                if tuple(r.shape) != shape:
                    raise ValueError(f"compression: residual for {name!r} has shape {tuple(r.shape)}, tensor has {shape}")
                e = x + r
            errors[name] = e
    if kind == "topk":
        kept = topk_sparsify_joint(errors, fraction) if joint else {name: topk_sparsify(e, fraction) for name, e in errors.items()}
        for name, e in errors.items():
            idx, val = kept[name]
            arrays[f"{name}{SEP}idx"], arrays[f"{name}{SEP}val"] = idx, val
            new_residual[name] = (e - densify(idx, val, tuple(e.shape))).contiguous()
        for name, r in residual.items():
            if name not in tensors:
                new_residual[name] = r.detach().to("cpu", torch.float32).clone()
    return arrays, config, new_residual


def wire_parts(name: str, shape: Sequence[int], kind: str) -> dict[str, tuple[str, int]]:
    """The wire arrays :func:`encode` makes of one tensor ``name`` of ``shape`` with codec
    ``kind``: key → (numpy dtype name, element count). For ``topk`` the count is the most allowed
    (``idx`` and ``val`` hold the same k ≤ n). A receiver checks arrays against this before it
    decodes (and so allocates) anything."""
    _check_kind(kind)
    n = math.prod(shape)
    rows, _ = _rows_cols((shape[1], shape[0]) if _tall(shape) else shape)
    key = f"{name}{SEP}"
    return {
        "none": {name: ("float32", n)},
        "fp16": {key + "fp16": ("float16", n)},
        "bf16": {key + "bf16": ("int16", n)},
        "int8": {key + "q": ("int8", n), key + "scale": ("float32", rows)},
        "int4": {key + "q": ("uint8", (n + 1) // 2), key + "scale": ("float32", rows)},
        "topk": {key + "idx": ("int32", n), key + "val": ("float32", n)},
    }[kind]


def _shape_of(name: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise ValueError(f"compression: tensor {name!r}: bad shape entry {value!r}")
    return tuple(value)


def decode(arrays: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """Inverse of :func:`encode`: float32 tensors of the shapes recorded in ``config``.

    Raises ValueError (one line, naming the tensor) on an unknown codec, a missing or unexpected
    array, a wrong dtype or element count, or an index out of range.
    """
    kind = config.get("codec")
    if kind not in KINDS:
        raise ValueError(f"compression: unknown codec {kind!r}; expected one of {', '.join(KINDS)}")
    shapes = {k[len("shape/"):]: _shape_of(k[len("shape/"):], v) for k, v in config.items() if k.startswith("shape/")}
    arrays = {k: torch.as_tensor(v) for k, v in arrays.items()}
    expected_parts = {
        "none": (), "fp16": ("fp16",), "bf16": ("bf16",), "int8": ("q", "scale"),
        "int4": ("q", "scale"), "topk": ("idx", "val"),
    }[kind]
    wanted = {name if kind == "none" else f"{name}{SEP}{p}" for name in shapes for p in (expected_parts or ("",))}
    extra = sorted(set(arrays) - wanted)
    if extra:
        raise ValueError(f"compression: unexpected array {extra[0]!r} for codec {kind!r} (no matching shape/ entry)")

    out: dict[str, Tensor] = {}
    for name, shape in shapes.items():
        def part(p: str, name: str = name) -> Tensor:
            key = name if kind == "none" else f"{name}{SEP}{p}"
            if key not in arrays:
                raise ValueError(f"compression: tensor {name!r}: missing array {key!r} (codec {kind!r})")
            return arrays[key].detach().to("cpu").reshape(-1)

        n = math.prod(shape)
        try:
            if kind in ("none", "fp16", "bf16"):
                a = part(kind if kind != "none" else "")
                dtype = {"none": torch.float32, "fp16": torch.float16, "bf16": torch.int16}[kind]
                if a.dtype != dtype or a.numel() != n:
                    raise ValueError(f"expected {n} {dtype} values, got {a.numel()} {a.dtype}")
                if kind == "bf16":
                    a = a.contiguous().view(torch.bfloat16)
                out[name] = a.to(torch.float32).reshape(shape).clone()
            elif kind in ("int8", "int4"):
                bits = 8 if kind == "int8" else 4
                if _tall(shape):
                    out[name] = dequantize(part("q"), part("scale"), bits, (shape[1], shape[0])).T.contiguous()
                else:
                    out[name] = dequantize(part("q"), part("scale"), bits, shape)
            else:  # topk
                idx, val = part("idx"), part("val")
                if idx.dtype not in (torch.int32, torch.int64) or val.dtype != torch.float32:
                    raise ValueError(f"idx must be int32 and val float32, got {idx.dtype} and {val.dtype}")
                if idx.numel() != val.numel() or idx.numel() > n:
                    raise ValueError(f"{idx.numel()} indices and {val.numel()} values for {n} elements")
                if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
                    raise ValueError(f"index out of range [0, {n})")
                if torch.unique(idx).numel() != idx.numel():
                    raise ValueError("duplicate indices")
                out[name] = densify(idx, val, shape)
        except ValueError as e:
            msg = str(e)
            if msg.startswith("compression: "):
                raise
            raise ValueError(f"compression: tensor {name!r} (codec {kind!r}): {msg}") from None
    return out


# --- byte counts -----------------------------------------------------------------------------


def payload_bytes(arrays: Mapping[str, Tensor]) -> int:
    """Σ numel · element_size over the wire arrays (data only, no framing)."""
    return sum(t.numel() * t.element_size() for t in arrays.values())


def expected_bytes(shape: Sequence[int], kind: str, fraction: float = 0.1) -> int:
    """Data bytes codec ``kind`` produces for one tensor of ``shape``: none 4n; fp16/bf16 2n;
    int8 n + 4·rows; int4 ⌈n/2⌉ + 4·rows (rows: the shorter side of a 2-D tensor); topk 8k with
    k = max(1, ⌈fraction·n⌉)."""
    _check_kind(kind)
    n = math.prod(shape)
    rows, _ = _rows_cols((shape[1], shape[0]) if _tall(shape) else shape)
    if kind == "none":
        return 4 * n
    if kind in ("fp16", "bf16"):
        return 2 * n
    if kind == "int8":
        return n + 4 * rows
    if kind == "int4":
        return (n + 1) // 2 + 4 * rows
    return 8 * _topk_k(n, fraction)
