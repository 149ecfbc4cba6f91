"""Update-compression codecs: unbiasedness, error bounds, packing, error feedback, byte counts."""

from __future__ import annotations

import math

import pytest
import torch

from fedpeft.compression import (
    KINDS,
    decode,
    densify,
    dequantize,
    encode,
    expected_bytes,
    payload_bytes,
    stochastic_quantize,
    topk_sparsify,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def off_grid(bits: int, rows: int = 16, cols: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x whose row r has scale s_r (magnitudes 1e-4 … 1e2) and all values at 0.3 of a step:
    one element per row is exactly L·s_r (sets the scale), the rest are (k + 0.3)·s_r."""
    L = 2 ** (bits - 1) - 1
    g = gen(seed)
    s = (10.0 ** torch.linspace(-4, 2, rows)) / L
    k = torch.randint(-L, L, (rows, cols), generator=g).to(torch.float32)  # k + 0.3 ∈ (−L, L)
    x = (k + 0.3) * s[:, None]
    x[:, 0] = L * s * torch.where(torch.arange(rows) % 2 == 0, 1.0, -1.0)
    return x, s


@pytest.mark.parametrize("kind,bits", [("int8", 8), ("int4", 4)])
def test_stochastic_quantizers_are_unbiased(kind: str, bits: int) -> None:
    x, s = off_grid(bits)
    N = 2000
    total = torch.zeros_like(x, dtype=torch.float64)
    for seed in range(N):
        arrays, config, residual = encode({"w": x}, kind, generator=gen(seed))
        assert residual == {}
        total += decode(arrays, config)["w"].double()
    mean = total / N
    _, scales = stochastic_quantize(x, bits, gen(0))
    torch.testing.assert_close(scales, s, rtol=1e-6, atol=0)
    # Var ≤ s²/4 per element, so a 5-sigma bound on the mean is 5·s / (2·√N).
    bound = (5 * s / (2 * math.sqrt(N))).double()[:, None]
    err = (mean - x.double()).abs()
    assert bool((err <= bound).all()), f"max err/bound {float((err / bound).max()):.2f}"
    # The test can fail: round-to-nearest is off by 0.3·s on every off-grid element, ≫ the bound.
    nearest = torch.round(x / s[:, None]) * s[:, None]
    biased = (nearest.double() - x.double()).abs()
    assert bool((biased[:, 1:] > bound).all())
    assert float((biased / bound).max()) > 5


@pytest.mark.parametrize("kind,bits", [("int8", 8), ("int4", 4)])
def test_every_decode_is_within_one_step(kind: str, bits: int) -> None:
    L = 2 ** (bits - 1) - 1
    x = torch.randn(12, 40, generator=gen(1)) * (10.0 ** torch.linspace(-5, 3, 12))[:, None]
    x[3] = 0.0
    scale = x.abs().amax(dim=1) / L
    for seed in range(50):
        arrays, config, _ = encode({"w": x}, kind, generator=gen(seed))
        xh = decode(arrays, config)["w"]
        assert xh.dtype == torch.float32 and xh.shape == x.shape
        assert bool(((xh - x).abs()[scale > 0] < scale[scale > 0][:, None]).all())
        assert torch.equal(xh[3], torch.zeros(40))
        torch.testing.assert_close(arrays["w#scale"], scale, rtol=1e-6, atol=0)
        q = dequantize(arrays["w#q"], arrays["w#scale"], bits, tuple(x.shape))
        assert torch.equal(q, xh)


def test_quantize_layout_and_1d() -> None:
    x = torch.tensor([0.5, -1.0, 0.25, 0.0, 1.0])  # a 1-D tensor is one row
    codes, scales = stochastic_quantize(x, 8, gen(0))
    assert codes.dtype == torch.int8 and codes.shape == (5,)
    assert scales.dtype == torch.float32 and scales.shape == (1,)
    assert float(scales[0]) == pytest.approx(1.0 / 127)
    assert codes[1].item() == -127 and codes[4].item() == 127 and codes[3].item() == 0
    codes, scales = stochastic_quantize(torch.zeros(4, 3), 4, gen(0))
    assert torch.equal(scales, torch.zeros(4))
    assert torch.equal(codes, torch.full((6,), 0x88, dtype=torch.uint8))  # q = 0 → nibble 8


def test_int4_packing_round_trips_odd_counts() -> None:
    x = torch.randn(3, 5, generator=gen(1))
    x[0] = torch.tensor([-7.0, -3.0, 0.0, 3.0, 7.0])  # on the grid of scale 1: exact
    codes, scales = stochastic_quantize(x, 4, gen(0))
    assert codes.dtype == torch.uint8 and codes.numel() == math.ceil(15 / 2) == 8
    low, high = codes & 0x0F, codes >> 4
    assert [int(v) for v in low[:3]] == [1, 8, 15]  # q + 8 at even indices 0, 2, 4
    assert [int(v) for v in high[:2]] == [5, 11]  # odd indices 1, 3
    assert int(high[-1]) == 0  # the padding nibble
    xh = dequantize(codes, scales, 4, (3, 5))
    assert torch.equal(xh[0], x[0])
    for shape in [(3, 5), (7,), (1,), (2, 3, 3), ()]:
        y = torch.randn(shape, generator=gen(2))
        arrays, config, _ = encode({"b": y}, "int4", generator=gen(3))
        assert arrays["b#q"].numel() == math.ceil(y.numel() / 2)
        yh = decode(arrays, config)["b"]
        assert yh.shape == y.shape
        s = y.abs().max() / 7
        assert bool(((yh - y).abs() < s).all())


def test_fp16_bf16_relative_error_and_wire_dtypes() -> None:
    sign = torch.where(torch.rand(64, 64, generator=gen(4)) < 0.5, -1.0, 1.0)
    x = sign * 10.0 ** (torch.rand(64, 64, generator=gen(5)) * 8 - 4)  # 1e-4 … 1e4: fp16 normal range
    name = "A/base_model.model.layers.0.q_proj"
    for kind, part, dtype, rel in [("fp16", "fp16", torch.float16, 2**-11), ("bf16", "bf16", torch.int16, 2**-8)]:
        arrays, config, residual = encode({name: x}, kind)
        assert list(arrays) == [f"{name}#{part}"] and residual == {}
        assert arrays[f"{name}#{part}"].dtype == dtype and arrays[f"{name}#{part}"].is_contiguous()
        assert config == {"codec": kind, f"shape/{name}": [64, 64]}
        xh = decode(arrays, config)[name]
        assert xh.dtype == torch.float32
        r = ((xh - x).abs() / x.abs()).max().item()
        assert 0 < r <= rel
        assert r > rel / 4  # the bound is tight-ish: a coarser codec would show
    with pytest.raises(ValueError, match="float16 range"):
        encode({"w": torch.tensor([1e6])}, "fp16")


def test_none_is_exact_and_not_aliased() -> None:
    x = torch.randn(4, 6, generator=gen(6))
    arrays, config, residual = encode({"head/bias": x[0], "w": x}, "none")
    assert set(arrays) == {"head/bias", "w"} and residual == {}
    x.add_(1.0)
    out = decode(arrays, config)
    torch.testing.assert_close(out["w"], x - 1.0, rtol=0, atol=1e-6)
    assert out["head/bias"].shape == (6,)


def test_topk_error_feedback_loses_nothing() -> None:
    shapes = {"A/layer.0": (8, 50), "head/bias": (7,)}
    total = {n: torch.zeros(s) for n, s in shapes.items()}
    sent_fb = {n: torch.zeros(s) for n, s in shapes.items()}
    sent_plain = {n: torch.zeros(s) for n, s in shapes.items()}
    residual: dict[str, torch.Tensor] = {}
    for t in range(20):
        x = {n: torch.randn(s, generator=gen(100 + t)) for n, s in shapes.items()}
        for n in shapes:
            total[n] += x[n]
        arrays, config, residual = encode(x, "topk", fraction=0.05, residual=residual)
        assert set(arrays) == {f"{n}#{p}" for n in shapes for p in ("idx", "val")}
        assert arrays["A/layer.0#idx"].numel() == 20  # ⌈0.05·400⌉
        for n, v in decode(arrays, config).items():
            sent_fb[n] += v
        arrays, config, _ = encode(x, "topk", fraction=0.05)  # no feedback
        for n, v in decode(arrays, config).items():
            sent_plain[n] += v
    for n in shapes:
        torch.testing.assert_close(sent_fb[n] + residual[n], total[n], rtol=0, atol=1e-5)
        assert float((sent_plain[n] - total[n]).abs().max()) > 0.5  # the test can fail
    assert float(residual["A/layer.0"].abs().max()) > 0  # something really was deferred


def test_topk_carries_residual_of_absent_tensor() -> None:
    r = {"gone": torch.ones(3)}
    _, _, new = encode({"w": torch.ones(4)}, "topk", fraction=0.5, residual=r)
    assert torch.equal(new["gone"], torch.ones(3))
    assert float(new["w"].sum()) == 2.0 and int((new["w"] == 0).sum()) == 2  # k = 2 of 4 sent


def test_topk_keeps_exactly_the_k_largest() -> None:
    x = (torch.randperm(91, generator=gen(7)).to(torch.float32) + 1) * torch.where(
        torch.rand(91, generator=gen(8)) < 0.5, -1.0, 1.0
    )
    x = x.reshape(7, 13)
    idx, val = topk_sparsify(x, 0.1)
    assert idx.dtype == torch.int32 and val.dtype == torch.float32
    assert idx.numel() == 10  # ⌈9.1⌉
    expect = set(torch.argsort(x.abs().reshape(-1), descending=True)[:10].tolist())
    assert set(idx.tolist()) == expect
    assert torch.equal(val, x.reshape(-1)[idx.long()])
    d = densify(idx, val, (7, 13))
    assert int((d != 0).sum()) == 10 and torch.equal(d[d != 0], x[d != 0])
    assert topk_sparsify(torch.randn(30), 0.1)[0].numel() == 3  # not 4 from 0.1·30 = 3.0000000000000004
    assert topk_sparsify(x, 1e-9)[0].numel() == 1
    assert topk_sparsify(x, 1.0)[0].numel() == 91


SHAPES = {"A/m.q_proj": (16, 384), "head/classifier.bias": (3,), "B/m.v": (3, 5), "odd": (7, 1, 3), "one": (1,)}


@pytest.mark.parametrize("kind", KINDS)
def test_payload_bytes_match_expected(kind: str) -> None:
    tensors = {n: torch.randn(s, generator=gen(9)) for n, s in SHAPES.items()}
    arrays, config, _ = encode(tensors, kind, fraction=0.1, generator=gen(10))
    assert payload_bytes(arrays) == sum(expected_bytes(s, kind, 0.1) for s in SHAPES.values())
    assert all(a.is_contiguous() and a.device.type == "cpu" for a in arrays.values())
    out = decode(arrays, config)
    assert {n: tuple(t.shape) for n, t in out.items()} == SHAPES
    assert all(t.dtype == torch.float32 for t in out.values())


def test_expected_bytes_formulas() -> None:
    shape, n, rows = (256, 1024), 256 * 1024, 256
    assert expected_bytes(shape, "none") == 4 * n == 1048576
    assert expected_bytes(shape, "fp16") == expected_bytes(shape, "bf16") == 2 * n
    assert expected_bytes(shape, "int8") == n + 4 * rows == 263168  # ≈ 4x smaller
    assert expected_bytes(shape, "int4") == n // 2 + 4 * rows == 132096  # ≈ 8x smaller
    assert expected_bytes(shape, "topk", 0.01) == 8 * math.ceil(0.01 * n) == 20976
    assert expected_bytes((3, 5), "int4") == 8 + 12
    assert expected_bytes((7,), "int8") == 7 + 4  # 1-D: one row
    x = torch.randn(shape, generator=gen(11))
    for kind in KINDS:
        arrays, _, _ = encode({"w": x}, kind, fraction=0.01, generator=gen(12))
        assert payload_bytes(arrays) == expected_bytes(shape, kind, 0.01)


def test_encode_rejects_bad_arguments() -> None:
    x = {"w": torch.ones(3)}
    with pytest.raises(ValueError, match=r"unknown codec 'xyz'; expected one of none, fp16"):
        encode(x, "xyz")
    for f in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"compression\.topk_fraction"):
            encode(x, "topk", fraction=f)
    with pytest.raises(ValueError, match="Generator"):
        encode(x, "int8")
    with pytest.raises(ValueError, match="'w'"):
        encode({"w": torch.tensor([1.0, float("nan")])}, "int4", generator=gen(0))
    with pytest.raises(ValueError, match="must not contain"):
        encode({"a#b": torch.ones(1)}, "none")


def test_decode_errors_name_the_tensor() -> None:
    x = {"A/layer.0.q": torch.randn(4, 6, generator=gen(13)), "w": torch.randn(5)}
    arrays, config, _ = encode(x, "int4", generator=gen(14))

    bad = dict(arrays)
    del bad["A/layer.0.q#scale"]
    with pytest.raises(ValueError, match=r"'A/layer\.0\.q'.*missing array 'A/layer\.0\.q#scale'"):
        decode(bad, config)

    bad = dict(arrays, **{"A/layer.0.q#q": arrays["A/layer.0.q#q"][:-1]})
    with pytest.raises(ValueError, match=r"tensor 'A/layer\.0\.q'.*12 uint8 bytes, got 11"):
        decode(bad, config)

    with pytest.raises(ValueError, match="unknown codec 'zip'"):
        decode(arrays, dict(config, codec="zip"))

    with pytest.raises(ValueError, match="unexpected array 'stray#q'"):
        decode(dict(arrays, **{"stray#q": torch.zeros(1, dtype=torch.uint8)}), config)

    arrays8, config8, _ = encode(x, "int8", generator=gen(15))
    bad = dict(arrays8, **{"w#q": arrays8["w#q"][:3]})
    with pytest.raises(ValueError, match=r"tensor 'w'.*5 int8 values, got 3"):
        decode(bad, config8)

    arrays_k, config_k, _ = encode(x, "topk", fraction=0.5)
    idx = arrays_k["w#idx"].clone()
    idx[0] = 5
    with pytest.raises(ValueError, match=r"tensor 'w'.*out of range"):
        decode(dict(arrays_k, **{"w#idx": idx}), config_k)

    arrays_f, config_f, _ = encode(x, "fp16")
    with pytest.raises(ValueError, match=r"tensor 'w'.*expected 5"):
        decode(dict(arrays_f, **{"w#fp16": arrays_f["w#fp16"][:4]}), config_f)


@pytest.mark.parametrize("kind, bits", [("int8", 8), ("int4", 4)])
def test_tall_matrices_are_quantized_per_column(kind, bits):
    """B [out × r] carries r scales, not out: each column gets its own, and the error bound is
    that column's step."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 4, generator=g) * torch.tensor([1e-3, 1e-1, 1.0, 10.0])
    arrays, cfg, _ = encode({"B/m": x}, kind, generator=torch.Generator().manual_seed(1))
    assert arrays["B/m#scale"].numel() == 4
    step = x.abs().amax(dim=0) / (2 ** (bits - 1) - 1)
    err = (decode(arrays, cfg)["B/m"] - x).abs()
    assert (err < step[None, :]).all()
    assert payload_bytes(arrays) == expected_bytes((96, 4), kind) == (384 if bits == 8 else 192) + 16
