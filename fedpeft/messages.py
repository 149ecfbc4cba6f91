"""Adapters on the wire: LoRA factors, scalings and heads to and from Flower records.

A payload or update travels as one ``ArrayRecord`` (``A/<module>``, ``B/<module>``,
``head/<name>``) and one ``ConfigRecord`` (per-module scalings, the client's plan
(:meth:`fedpeft.plan.ClientPlan.to_config`), and on replies the example count). Byte counts use
Flower's own ``count_bytes`` on exactly the records that are sent.

With compression (:mod:`fedpeft.compression`) the arrays are the codec's encoding (``<key>#q``,
``<key>#scale``, ...; ``config["codec"]`` names it). A payload is compressed as values; an update
as its difference from the client's start (``config["delta"]``), which the server knows: what it
sent, as the client decoded it, or the fresh LoRA :func:`fedpeft.lora.fresh_adapter` of the
payload's ``init_seed``. FLoRA's base merges always travel at full precision (every client must
train on the same base), each module's in the form the server chose (:mod:`fedpeft.merges`):
``merge<v>/A/<module>`` and ``merge<v>/B/<module>`` (factors) or ``merge<v>/D/<module>`` (dense).
The server encodes a merge once per round (:func:`encode_merge`) and every message that carries it
holds the same ``Array`` objects; each message's byte count still includes them.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedpeft import compression
from fedpeft import merges as merge_forms
from fedpeft.lora import Adapter, LoraFactors, fresh_adapter, scaling_for, seeded_lora_A
from fedpeft.plan import A_SEED, INIT_SEED
from fedpeft.scaffold import RECORD

ARRAYS, CONFIG, METRICS = "adapter", "config", "metrics"
# secagg (fedpeft/secagg.py): a reply's ConfigRecord naming its summed arrays in the order they were
# masked, with their dtypes (Flower's mod clears the ArrayRecords; the server puts the unmasked mean back under these keys).
SECAGG_LAYOUT = "secagg-layout"


class UpdateError(ValueError):
    """A client's reply that cannot be aggregated; the message names what is wrong."""


@dataclass
class Decoded:
    adapter: Adapter
    head: dict[str, torch.Tensor]
    config: dict[str, Any]
    merges: dict[int, merge_forms.Merge] = field(default_factory=dict)  # base version → its merge (factors or dense, per module)


@dataclass(frozen=True)
class EncodedMerge:
    """One base version's merge as the ``Array`` s a message carries (``merge<v>/<part>/<module>``),
    encoded once: :func:`encode` puts these very objects into every message it is given to."""

    version: int
    arrays: Mapping[str, Array]

    def num_bytes(self) -> int:
        """What the merge adds to a message's :func:`num_bytes` (Flower's count: data and keys)."""
        return sum(len(a.data) + len(k) for k, a in self.arrays.items())


def encode_merge(version: int, merge: Mapping[str, "merge_forms.Form"]) -> EncodedMerge:
    """Serialise one merge's forms (factors at scaling 1, or dense) as Flower ``Array`` s, at their
    own dtype (full precision: no codec)."""
    arrays: dict[str, Array] = {}
    for name, form in merge.items():
        try:
            parts = merge_forms.parts(form)
        except ValueError as e:
            raise ValueError(f"merge {version}, module {name}: {e}") from None
        for part, t in parts.items():
            arrays[f"merge{version}/{part}/{name}"] = Array.from_numpy_ndarray(t.cpu().numpy())
    return EncodedMerge(version, arrays)


def tensors_of(adapter: Adapter, head: Mapping[str, torch.Tensor], *, send_A: bool = True, send_B: bool = True) -> dict[str, torch.Tensor]:
    """The arrays an adapter travels as: ``A/<module>`` (unless ``send_A`` is false), ``B/<module>``
    (unless ``send_B`` is false), ``head/<name>``."""
    out: dict[str, torch.Tensor] = {}
    for name, f in adapter.items():
        if send_A:
            out[f"A/{name}"] = f.A.detach().cpu().float().contiguous()
        if send_B:
            out[f"B/{name}"] = f.B.detach().cpu().float().contiguous()
    for name, t in head.items():
        out[f"head/{name}"] = t.detach().cpu().float().contiguous()
    return out


def start_tensors(
    dec: "Decoded", shapes: Mapping[str, tuple[int, int]], rank: int, alpha: float, *, send_A: bool = True, send_B: bool = True
) -> dict[str, torch.Tensor]:
    """What a client starts training from, as arrays: the payload's adapter (as decoded), or for
    an empty one the fresh LoRA of ``init_seed``; the reference of an uplink delta."""
    adapter = dec.adapter or (fresh_adapter(shapes, rank, scaling_for(rank, alpha), int(dec.config[INIT_SEED])) if shapes else {})
    return tensors_of(adapter, dec.head, send_A=send_A, send_B=send_B)


def encode(
    adapter: Adapter,
    head: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    *,
    send_A: bool = True,
    send_B: bool = True,
    merges: Mapping[int, "merge_forms.Merge | Adapter | EncodedMerge"] | None = None,
    codec: str = "none",
    fraction: float = 0.1,
    generator: torch.Generator | None = None,
    reference: Mapping[str, torch.Tensor] | None = None,
    residual: dict[str, torch.Tensor] | None = None,
    joint: bool = False,
) -> RecordDict:
    """``send_A=False`` leaves out every ``A`` (FFA-LoRA: A is frozen and regenerated from
    ``config["A_seed"]`` by :func:`fedpeft.lora.seeded_lora_A`; RoLoRA's reply: the receiver has the
    frozen A it sent, :func:`decode`'s ``kept``), ``send_B=False`` every ``B`` (RoLoRA's reply, whose
    B is frozen; FedSA-LoRA both ways, each client keeping its own: ``out_features/<module>`` lets the
    receiver decode a zero ``B`` in its place, which it replaces); both: the head alone (SLoRA's
    stage-1 reply, whose LoRA is frozen and whose masked base values are head tensors, which
    :func:`decode` decodes as an empty adapter); ``merges`` carries FLoRA's
    merges of the base versions the receiver has not applied yet: per module stacked factors
    (scaling 1) or a dense ``ΔW``, or already encoded (:class:`EncodedMerge`, whose ``Array``
    objects are put into this message as they are, not copied).

    ``codec`` compresses the arrays with :func:`fedpeft.compression.encode`: their values, or with
    ``reference`` (arrays of the same keys; a shrunk rank uses its leading slice) their difference
    from it. ``residual`` is the sender's top-k error-feedback memory, updated in place. ``joint``:
    top-k keeps k entries among all the arrays together (FLASC), not k of each."""
    cfg: dict[str, Any] = dict(config)
    tensors = tensors_of(adapter, head, send_A=send_A, send_B=send_B)
    for name, f in adapter.items():
        if not send_A:
            cfg[f"in_features/{name}"] = int(f.A.shape[1])
        if not send_B:
            cfg[f"out_features/{name}"] = int(f.B.shape[0])
        cfg[f"scaling/{name}"] = float(f.scaling)
    if reference is not None:
        tensors = {k: t - slice_like(reference, k, t) for k, t in tensors.items()}
        cfg["delta"] = True
    if codec != "none" or reference is not None:
        past = {k: v for k, v in (residual or {}).items() if k in tensors and v.shape == tensors[k].shape}
        tensors, codec_cfg, new_residual = compression.encode(tensors, codec, fraction=fraction, generator=generator, residual=past, joint=joint)
        cfg.update(codec_cfg)
        if residual is not None:
            residual.clear()
            residual.update(new_residual)
    record = ArrayRecord(torch_state_dict=tensors)
    for version, merge in (merges or {}).items():
        encoded = merge if isinstance(merge, EncodedMerge) else encode_merge(version, merge)
        if encoded.version != version:
            raise ValueError(f"merge {encoded.version} was given as version {version}")
        for key, array in encoded.arrays.items():
            record[key] = array  # the same object in every message that carries this merge
    return RecordDict({ARRAYS: record, CONFIG: ConfigRecord(cfg)})


def slice_like(reference: Mapping[str, torch.Tensor], key: str, t: torch.Tensor) -> torch.Tensor:
    if key not in reference:
        raise UpdateError(f"array {key!r} has no reference to be measured against")
    ref = reference[key]
    if ref.dim() == 2 and t.dim() == 2 and (t.shape[0] < ref.shape[0] or t.shape[1] < ref.shape[1]):
        ref = ref[: t.shape[0], : t.shape[1]]  # a rank that shrank (HetLoRA): its leading components
    if ref.shape != t.shape:
        raise UpdateError(f"array {key!r}: shape {tuple(t.shape)} does not fit its reference {tuple(ref.shape)}")
    return ref


def decode(content: RecordDict, reference: Mapping[str, torch.Tensor] | None = None, *, with_merges: bool = True, kept: Adapter | None = None) -> Decoded:
    """Inverse of :func:`encode`; raises :class:`UpdateError` on a malformed record. A delta-coded
    update needs the ``reference`` it was measured against. ``with_merges=False`` leaves the
    merges' arrays undeserialised (``merges`` stays empty). ``kept``: the adapter whose factor a
    reply leaves out (the receiver sent it; the client kept it frozen): a missing ``B``, or a
    missing ``A`` without ``A_seed``, is taken from it; without it a missing ``B`` decodes as zeros
    of ``out_features/<module>`` rows (a personal B, which the receiver replaces with its own)."""
    if ARRAYS not in content.array_records or CONFIG not in content.config_records:
        raise UpdateError(f"reply lacks its '{ARRAYS}' arrays or '{CONFIG}' config record")
    record = content.array_records[ARRAYS]
    tensors = {k: torch.from_numpy(a.numpy()) for k, a in record.items() if with_merges or not k.startswith("merge")}
    cfg = dict(content.config_records[CONFIG])
    if "codec" in cfg:
        merges = {k: t for k, t in tensors.items() if k.startswith("merge")}
        try:
            tensors = {**compression.decode({k: t for k, t in tensors.items() if k not in merges}, cfg), **merges}
        except ValueError as e:
            raise UpdateError(str(e)) from None
    if cfg.get("delta"):
        if reference is None:
            raise UpdateError("a delta-coded update arrived without the reference it was measured against")
        tensors = {k: t + slice_like(reference, k, t) if not k.startswith("merge") else t for k, t in tensors.items()}
    skip = ("scaling/", "in_features/", "out_features/", "shape/")
    out = Decoded({}, {}, {k: v for k, v in cfg.items() if not k.startswith(skip) and k not in ("codec", "delta")})
    merge_parts: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        kind, _, name = key.partition("/")
        if kind in ("A", "B") and (kind == "B" or f"B/{name}" not in tensors):  # each module once
            if f"B/{name}" in tensors:
                B = tensors[f"B/{name}"]
            elif kept is not None and name in kept:  # frozen on the client (RoLoRA): the one sent
                B = kept[name].B.detach().cpu().float()
            elif (
                isinstance(cfg.get(f"out_features/{name}"), int) and not isinstance(cfg.get(f"out_features/{name}"), bool)
                and cfg[f"out_features/{name}"] >= 1
            ):
                B = t.new_zeros(int(cfg[f"out_features/{name}"]), t.shape[0])  # personal (FedSA-LoRA): the receiver puts its own
            else:
                raise UpdateError(f"module {name}: A without B (and neither a kept B nor a valid out_features/{name})")
            if f"scaling/{name}" not in cfg:
                raise UpdateError(f"module {name}: {kind} without a scaling")
            if f"A/{name}" in tensors:
                A = tensors[f"A/{name}"]
            elif f"in_features/{name}" in cfg and A_SEED in cfg:
                A = seeded_lora_A(name, B.shape[1], int(cfg[f"in_features/{name}"]), int(cfg[A_SEED]))
            elif kept is not None and name in kept:
                A = kept[name].A.detach().cpu().float()
            else:
                raise UpdateError(f"module {name}: B without A (and no A_seed to regenerate it)")
            try:
                out.adapter[name] = LoraFactors(A, B, float(cfg[f"scaling/{name}"]))
            except ValueError as e:
                raise UpdateError(f"module {name}: {e}") from None
        elif kind == "head":
            out.head[name] = t
        elif kind.startswith("merge") and kind[5:].isdigit():
            part, _, module = name.partition("/")
            merge_parts.setdefault(int(kind[5:]), {}).setdefault(module, {})[part] = t
        elif kind == "A":
            pass  # with its module's B, above
        else:
            raise UpdateError(f"unexpected array {key!r}")
    for version, modules in sorted(merge_parts.items()):
        try:
            out.merges[version] = {m: merge_forms.from_parts(p) for m, p in modules.items()}
        except ValueError as e:
            raise UpdateError(f"merge {version}: incomplete or inconsistent parts ({e})") from None
    return out


def num_bytes(content: RecordDict) -> int:
    """Bytes of the arrays and config actually carried by a message."""
    total = sum(r.count_bytes() for r in content.array_records.values())
    total += sum(_config_bytes(r) for r in content.config_records.values())
    return total


def _config_bytes(record: ConfigRecord) -> int:
    """Flower's ``ConfigRecord.count_bytes`` (each key's length; a bool 1 byte, an int or float 8, a str
    or bytes its length; a list the sum of its elements), written out because Flower 1.41's raises
    on an empty list or an empty string (SecAgg+'s ``dead_nids=[]``, a legacy ``FitRes`` status's
    empty message)."""

    def size(v: Any) -> int:
        return len(v) if isinstance(v, (str, bytes)) else 1 if isinstance(v, bool) else 8

    return sum(len(k) + (sum(size(x) for x in v) if isinstance(v, list) else size(v)) for k, v in record.items())


def check_update(
    adapter: Adapter,
    head: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, int]],
    max_rank: int,
    expect_head: Mapping[str, torch.Tensor],
) -> None:
    """An update must cover the model's modules with their ``(out, in)`` shapes at a rank no
    larger than the client was given (HetLoRA clients may shrink), and hold finite values only."""
    if set(adapter) != set(shapes):
        missing, extra = sorted(set(shapes) - set(adapter)), sorted(set(adapter) - set(shapes))
        raise UpdateError(f"modules differ from the model's: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, f in adapter.items():
        if f.shape != tuple(shapes[name]) or f.rank > max_rank:
            raise UpdateError(f"module {name}: shapes A {tuple(f.A.shape)}, B {tuple(f.B.shape)} do not fit {tuple(shapes[name])} at rank <= {max_rank}")
        if not (torch.isfinite(f.A).all() and torch.isfinite(f.B).all()):
            raise UpdateError(f"module {name}: non-finite values")
    if set(head) != set(expect_head):
        raise UpdateError(f"head tensors {sorted(head)} differ from the payload's {sorted(expect_head)}")
    for name, t in head.items():
        if t.shape != expect_head[name].shape or not torch.isfinite(t).all():
            raise UpdateError(f"head {name}: shape {tuple(t.shape)} or values do not fit")


MAX_EXAMPLES = 10**9  # the most examples a reply may claim where the server does not know its client's count


def check_num_examples(value: Any, expected: int | None = None) -> int:
    """A reply's ``num-examples``: an int, equal to ``expected`` (the client's partition size)
    where the server knows it, else in ``[1, MAX_EXAMPLES]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UpdateError(f"num-examples is {value!r}, not an integer")
    if expected is not None and value != expected:
        raise UpdateError(f"num-examples is {value}, expected {expected} (the client's partition size)")
    if not 1 <= value <= MAX_EXAMPLES:
        raise UpdateError(f"num-examples is {value}, outside [1, {MAX_EXAMPLES}]")
    return value


def _dims(where: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise UpdateError(f"{where}: bad shape {value!r}")
    return tuple(value)


def _npy_header(key: str, arr: Any) -> tuple[tuple[int, ...], np.dtype]:
    """An ``Array``'s shape and dtype from its ``.npy`` header, which must agree with its declared
    ``shape`` and ``dtype`` and with its byte length; nothing is deserialised."""
    if arr.stype != "numpy.ndarray":
        raise UpdateError(f"array {key!r}: serialisation {arr.stype!r} is not 'numpy.ndarray'")
    fp = io.BytesIO(arr.data)
    try:
        version = np.lib.format.read_magic(fp)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"version {version}")
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(fp)
    except Exception as e:  # malformed foreign bytes: whatever the parser raises
        raise UpdateError(f"array {key!r}: unreadable .npy header ({str(e).strip().splitlines()[0][:80] if str(e).strip() else type(e).__name__})") from None
    declared = _dims(f"array {key!r}", arr.shape)
    if dtype.hasobject or tuple(shape) != declared or str(dtype) != str(arr.dtype):
        raise UpdateError(f"array {key!r}: declared {arr.dtype} {declared}, its .npy header says {dtype} {tuple(shape)}")
    need, have = math.prod(shape) * dtype.itemsize, len(arr.data) - fp.tell()
    if have != need:
        raise UpdateError(f"array {key!r}: {have} data bytes, its {dtype} {tuple(shape)} needs {need}")
    return tuple(shape), dtype


def encode_control(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """SCAFFOLD's ``c`` (down) or ``Δc_i`` (up) as the message's own ``ArrayRecord``
    (:data:`fedpeft.scaffold.RECORD`), keyed as the adapter's arrays, float32, never compressed."""
    return ArrayRecord(torch_state_dict={k: t.detach().cpu().float().contiguous() for k, t in tensors.items()})


def decode_control(content: RecordDict, like: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
    """The SCAFFOLD record of ``content``, checked before it is deserialised: exactly the keys of
    ``like`` with its shapes, float32; then every value finite. Raises :class:`UpdateError` naming
    the key."""
    if RECORD not in content.array_records:
        raise UpdateError(f"the '{RECORD}' array record (SCAFFOLD's control variates) is missing")
    record = content.array_records[RECORD]
    if set(record) != set(like):
        raise UpdateError(f"'{RECORD}' holds {sorted(set(record) - set(like))[:3]} more and {sorted(set(like) - set(record))[:3]} fewer "
                          "arrays than the tensors trained")
    out = {}
    for k, a in record.items():
        shape, dtype = _npy_header(f"{RECORD}/{k}", a)
        if shape != tuple(like[k]) or str(dtype) != "float32":
            raise UpdateError(f"'{RECORD}' array {k!r} is {dtype} {shape}, expected float32 {tuple(like[k])}")
        t = torch.from_numpy(a.numpy())
        if not torch.isfinite(t).all():
            raise UpdateError(f"'{RECORD}' array {k!r} has non-finite values")
        out[k] = t
    return out


def check_reply_layout(
    content: RecordDict,
    shapes: Mapping[str, tuple[int, int]],
    head: Mapping[str, Sequence[int]],
    ranks: Sequence[int],
    *,
    scaling: float,
    send_A: bool = True,
    send_B: bool = True,
    A_seed: int | None = None,
    codec: str = "none",
) -> int:
    """Check a reply against what its client was sent, before anything is deserialised: keys and
    declared shapes (``A/<module>`` unless A is not sent back, ``B/<module>`` likewise, ``head/<name>``; with an
    uplink ``codec`` their ``<key>#<part>`` arrays and ``shape/<key>`` entries), one rank in
    ``ranks`` for every module, each array's ``.npy`` header, dtype and size as the codec makes
    them, the scalings (``scaling``, finite), and for a frozen A its ``in_features`` and
    ``A_seed``, for a personal B its ``out_features``. So no size a client declares is allocated unchecked. Returns the reply's rank;
    raises :class:`UpdateError` naming the key."""
    if set(content.array_records) != {ARRAYS} or CONFIG not in content.config_records:
        raise UpdateError(
            f"reply holds array records {sorted(content.array_records)} and config records {sorted(content.config_records)}, "
            f"expected '{ARRAYS}' and '{CONFIG}'"
        )
    record, cfg = content.array_records[ARRAYS], content.config_records[CONFIG]
    got, delta = cfg.get("codec"), cfg.get("delta")
    if (codec == "none" and (got is not None or delta is not None)) or (codec != "none" and (got != codec or delta is not True)):
        raise UpdateError(f"codec {got!r} (delta {delta!r}) is not the uplink codec {codec!r}" + (" as a delta" if codec != "none" else ""))
    if codec == "none":
        declared = {k: _dims(f"array {k!r}", a.shape) for k, a in record.items()}
    else:
        declared = {k[len("shape/"):]: _dims(k, v) for k, v in cfg.items() if k.startswith("shape/")}
    rank = max(ranks)  # neither factor sent back (SLoRA's stage 1): the rank the client was given
    part, axis = ("B", 1) if send_B else ("A", 0)
    for i, m in enumerate(sorted(shapes) if send_A or send_B else ()):  # the rank: B's columns (A's rows), one of ``ranks``, the same in every module
        s = declared.get(f"{part}/{m}")
        if s is None:
            raise UpdateError(f"array '{part}/{m}' is missing")
        r = s[axis] if len(s) == 2 else None
        if r not in ranks:
            raise UpdateError(f"array '{part}/{m}' has shape {s}: rank {r}, expected rank {' or '.join(map(str, ranks))}")
        if i and r != rank:
            raise UpdateError(f"array '{part}/{m}' is at rank {r}, other modules at rank {rank}")
        rank = r
    want: dict[str, tuple[int, ...]] = {}
    for m, (o, i) in shapes.items():
        if send_A:
            want[f"A/{m}"] = (rank, i)
        if send_B:
            want[f"B/{m}"] = (o, rank)
    want.update({f"head/{h}": tuple(int(d) for d in s) for h, s in head.items()})
    extra = sorted(set(declared) - set(want))
    if extra:
        raise UpdateError(f"unexpected array {extra[0]!r}")
    for k, s in want.items():
        if k not in declared:
            raise UpdateError(f"array {k!r} is missing")
        if declared[k] != s:
            raise UpdateError(f"array {k!r} has shape {declared[k]}, expected {s}")
    wire = {w: (dt, n) for k, s in want.items() for w, (dt, n) in compression.wire_parts(k, s, codec).items()}
    extra = sorted(set(record) - set(wire))
    if extra:
        raise UpdateError(f"unexpected array {extra[0]!r}")
    count = {}
    for w, (dt, n) in wire.items():
        if w not in record:
            raise UpdateError(f"array {w!r} is missing")
        shape, dtype = _npy_header(w, record[w])
        if dtype != np.dtype(dt):
            raise UpdateError(f"array {w!r} is {dtype}, expected {dt}")
        count[w] = math.prod(shape)
        if count[w] > n or (codec != "topk" and count[w] != n):
            raise UpdateError(f"array {w!r} holds {count[w]} values, expected {'at most ' if codec == 'topk' else ''}{n}")
    if codec == "topk":
        for k in want:
            if count[f"{k}{compression.SEP}idx"] != count[f"{k}{compression.SEP}val"]:
                raise UpdateError(f"array {k!r}: {count[f'{k}{compression.SEP}idx']} indices but {count[f'{k}{compression.SEP}val']} values")
    for m, (o, i) in shapes.items():
        v = cfg.get(f"scaling/{m}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not math.isclose(v, scaling, rel_tol=1e-9):
            raise UpdateError(f"scaling/{m} is {v!r}, expected {scaling!r}")
        v = cfg.get(f"in_features/{m}")
        if not send_A and (isinstance(v, bool) or not isinstance(v, int) or v != i):
            raise UpdateError(f"in_features/{m} is {v!r}, expected {i}")
        v = cfg.get(f"out_features/{m}")
        if not send_B and (isinstance(v, bool) or not isinstance(v, int) or v != o):
            raise UpdateError(f"out_features/{m} is {v!r}, expected {o}")
    v = cfg.get(A_SEED)
    if not send_A and A_seed is not None and (isinstance(v, bool) or not isinstance(v, int) or v != A_seed):
        raise UpdateError(f"A_seed is {v!r}, expected {A_seed!r} (the one sent)")
    if not send_A and A_seed is None and v is not None:  # A is the one the server sent, not regenerated
        raise UpdateError(f"A_seed is {v!r}, but none was sent")
    allowed = ({f"scaling/{m}" for m in shapes} | {f"in_features/{m}" for m in shapes if not send_A}
               | {f"out_features/{m}" for m in shapes if not send_B} | {f"shape/{k}" for k in want if codec != "none"})
    for k in cfg:
        if k.startswith(("scaling/", "in_features/", "out_features/", "shape/")) and k not in allowed:
            raise UpdateError(f"unexpected config entry {k!r}")
    return rank


def metric_record(metrics: Mapping[str, float]) -> MetricRecord:
    return MetricRecord({k: float(v) for k, v in metrics.items()})


def unmasked_content(mean: list[np.ndarray], layout: ConfigRecord, config: ConfigRecord) -> RecordDict:
    """The unmasked mean as a reply's records: ``mean`` under the layout's keys at their dtypes, with
    ``config`` (a surviving reply's ConfigRecord: scalings and plan keys, the same for every client)."""
    keys, dtypes = list(layout["keys"]), list(layout["dtypes"])
    if len(keys) != len(mean) or len(dtypes) != len(mean):
        raise UpdateError(f"the unmasked sum has {len(mean)} arrays, the layout names {len(keys)}")
    arrays = ArrayRecord({k: Array(np.ascontiguousarray(a.astype(d))) for k, a, d in zip(keys, mean, dtypes)})
    return RecordDict({ARRAYS: arrays, CONFIG: config})
