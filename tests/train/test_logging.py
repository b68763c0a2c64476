"""jaxpeft.train.logging: metrics.jsonl, TensorBoard events (read back), progress bar, plots, no TensorFlow."""
import io
import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jaxpeft.train.logging import METRICS_FILE, RunLogger, plot_run, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake_run(run_dir, *, start=0, stop=30, eval_every=10, **kw):
    with RunLogger(run_dir, total_steps=stop, start_step=start, **kw) as log:
        for step in range(start + 1, stop + 1):
            log.log(step, {"loss": 3.0 / step**0.5, "lr": 1e-3})
            log.progress(step, loss=3.0 / step**0.5, tokens=512)
            if step % eval_every == 0:
                log.log(step, {"loss": 2.5 / step**0.4, "accuracy": 1 - 1 / step, "f1": 0.5 + step / 100}, split="eval")
    return log


def _read_tb_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Minimal TFRecord reader (u64 length, u32 crc, payload, u32 crc) + tensorboardX's Event proto."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    files = sorted(tb_dir.glob("events.out.tfevents.*"))
    assert files, f"no event files in {tb_dir}"
    for path in files:
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack_from("<Q", data, pos)
            payload = data[pos + 12 : pos + 12 + length]
            pos += 12 + length + 4
            event = event_pb2.Event.FromString(payload)
            for v in event.summary.value:
                scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
    return scalars


def test_jsonl_lines_parse_and_hold_metrics(tmp_path):
    _fake_run(tmp_path, stop=20)
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert len(lines) == 20 + 2
    recs = [json.loads(line) for line in lines]
    assert recs[0]["step"] == 1 and recs[0]["split"] == "train"
    assert recs[0]["loss"] == pytest.approx(3.0) and recs[0]["lr"] == pytest.approx(1e-3)
    assert isinstance(recs[0]["time"], float)
    evals = [r for r in recs if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20]
    assert evals[1]["accuracy"] == pytest.approx(0.95)


def test_each_line_is_flushed_before_close(tmp_path):
    log = RunLogger(tmp_path, total_steps=5, tensorboard=False, enable_progress=False)
    log.log(1, {"loss": 1.0})
    assert json.loads((tmp_path / METRICS_FILE).read_text())["loss"] == 1.0  # readable while still open
    log.close()
    log.close()  # idempotent
    with pytest.raises(RuntimeError):
        log.log(2, {"loss": 0.5})


def test_numpy_values_and_bad_values(tmp_path):
    import numpy as np

    with RunLogger(tmp_path, total_steps=5, tensorboard=False, enable_progress=False) as log:
        log.log(1, {"loss": np.float32(0.25), "tokens": np.int64(7), "n": 3, "nan": float("nan")})
        with pytest.raises(TypeError, match="metric 'x' must be a number"):
            log.log(2, {"x": "abc"})
        with pytest.raises(ValueError, match="reserved"):
            log.log(2, {"step": 1.0})
    (rec,) = read_metrics(tmp_path)
    assert rec["loss"] == 0.25 and rec["tokens"] == 7 and rec["n"] == 3 and rec["nan"] != rec["nan"]


def test_resume_duplicate_steps_keep_last(tmp_path):
    # first run killed after step 25 (last checkpoint at 20), then resumed from 20 with different numbers
    with RunLogger(tmp_path, total_steps=40, tensorboard=False, enable_progress=False) as log:
        for step in range(1, 26):
            log.log(step, {"loss": 10.0})
        log.log(20, {"loss": 9.0, "accuracy": 0.1}, split="eval")
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"step": 26, "split": "train", "lo')  # killed mid-write
    with pytest.warns(UserWarning, match="unreadable line"):
        with RunLogger(tmp_path, total_steps=40, start_step=20, tensorboard=False, enable_progress=False) as log:
            for step in range(21, 41):
                log.log(step, {"loss": 1.0})
            log.log(30, {"loss": 0.5, "accuracy": 0.9}, split="eval")

    with pytest.warns(UserWarning, match=r"metrics.jsonl:27: skipping unreadable line"):
        raw = read_metrics(tmp_path, raw=True)
    assert len(raw) == 25 + 1 + 20 + 1  # every well-formed line, the partial one skipped
    with pytest.warns(UserWarning, match="unreadable line"):
        recs = read_metrics(tmp_path)
    train = [r for r in recs if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 41))  # one record per step, sorted
    assert {r["step"]: r["loss"] for r in train if 21 <= r["step"] <= 25} == dict.fromkeys(range(21, 26), 1.0)
    assert all(r["loss"] == 10.0 for r in train if r["step"] <= 20)
    assert [(r["step"], r["accuracy"]) for r in recs if r["split"] == "eval"] == [(20, 0.1), (30, 0.9)]
    # the resumed run started on a fresh line, so its first record survived
    assert any(r["step"] == 21 and r["loss"] == 1.0 for r in raw)


def test_tensorboard_events_hold_the_scalars(tmp_path):
    _fake_run(tmp_path, stop=20)
    scalars = _read_tb_scalars(tmp_path / "tb")
    assert set(scalars) == {"train/loss", "train/lr", "eval/loss", "eval/accuracy", "eval/f1"}
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 21))
    assert scalars["train/loss"][3] == (4, pytest.approx(1.5))
    assert scalars["eval/accuracy"] == [(10, pytest.approx(0.9)), (20, pytest.approx(0.95))]


def test_tensorboard_off_writes_no_events(tmp_path):
    _fake_run(tmp_path, stop=5, tensorboard=False)
    assert not (tmp_path / "tb").exists()


def test_plot_run_writes_pngs(tmp_path):
    _fake_run(tmp_path, stop=60)  # close() plots
    loss, evals = tmp_path / "loss.png", tmp_path / "eval_metrics.png"
    for png in (loss, evals):
        data = png.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1024
    assert plot_run(tmp_path) == [loss, evals]


def test_plot_run_train_only_and_empty(tmp_path):
    with RunLogger(tmp_path / "a", total_steps=3, tensorboard=False, enable_progress=False) as log:
        for step in (1, 2, 3):
            log.log(step, {"loss": 1.0 / step})
    assert plot_run(tmp_path / "a") == [tmp_path / "a" / "loss.png"]
    assert not (tmp_path / "a" / "eval_metrics.png").exists()
    assert plot_run(tmp_path / "missing") == [] and read_metrics(tmp_path / "missing") == []


class _FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_tty_shows_loss_and_throughput(tmp_path, monkeypatch):
    tty = _FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    with RunLogger(tmp_path, total_steps=10, start_step=2, tensorboard=False) as log:
        for step in range(3, 11):
            log.progress(step, loss=0.5, tokens=1000)
    out = tty.getvalue()
    assert "10/10" in out and "loss=0.5000" in out and "tok/s=" in out


def test_off_a_terminal_a_plain_line_every_log_every_steps_replaces_the_bar(tmp_path, monkeypatch):
    stream = io.StringIO()  # a pod's or batch job's log file: no terminal
    monkeypatch.setattr(sys, "stderr", stream)
    with RunLogger(tmp_path, total_steps=10, start_step=2, tensorboard=False, log_every=4) as log:
        for step in range(3, 11):
            log.progress(step, loss=0.5, tokens=1000)
    lines = stream.getvalue().splitlines()
    assert [ln.split()[1] for ln in lines] == ["4/10", "8/10", "10/10"]  # every 4 steps and the last
    assert all("loss 0.5000" in ln for ln in lines) and "tok/s" in lines[-1] and " eta 0:00:00" in lines[-1]
    assert "\r" not in stream.getvalue()  # no bar redraws in a log file


def test_progress_off_on_request_and_on_processes_that_do_not_write(tmp_path, monkeypatch):
    for kw, stream in (({"enable_progress": False}, _FakeTTY()), ({"write": False}, _FakeTTY()),
                       ({"write": False}, io.StringIO())):
        monkeypatch.setattr(sys, "stderr", stream)
        run_dir = tmp_path / str(len(stream.getvalue()) + id(stream))
        with RunLogger(run_dir, total_steps=5, tensorboard=False, log_every=1, **kw) as log:
            for step in range(1, 6):
                log.log(step, {"loss": 1.0})
                log.progress(step, loss=1.0, tokens=10)
        assert stream.getvalue() == ""
        if kw.get("write") is False:  # a non-zero process of a multi-process run writes no run files
            assert not run_dir.exists()


def test_no_tensorflow_imported(tmp_path):
    code = textwrap.dedent(
        f"""
        import sys
        from jaxpeft.train.logging import RunLogger
        with RunLogger({str(tmp_path)!r}, total_steps=3) as log:
            for step in (1, 2, 3):
                log.log(step, {{"loss": 1.0}})
                log.log(step, {{"accuracy": 0.5}}, split="eval")
                log.progress(step, loss=1.0, tokens=8)
        assert (log.run_dir / "loss.png").exists()
        bad = sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow" or m == "flax.metrics.tensorboard")
        assert not bad, bad
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
