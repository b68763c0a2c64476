"""Tests for jaxpeft.train.checkpoint: roundtrip, retention, fingerprints, corruption, SIGKILL during saves."""
import glob
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jaxpeft.loading.errors import CheckpointError
from jaxpeft.train.checkpoint import RunCheckpointer, fingerprint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FP = fingerprint({"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3)})


def make_trainable(seed: int = 0, d: int = 64, r: int = 8) -> dict:
    rng = np.random.RandomState(seed)  # 64x8 f32 = 2 KiB per leaf: above OCDBT inline limit (1 KiB)
    return {
        "layers_0": {
            "q_proj": {"lora_a": jnp.asarray(rng.randn(d, r).astype(np.float32)),
                       "lora_b": jnp.asarray(rng.randn(r, d).astype(np.float32))},
        },
        "layers_1": {"v_proj": {"lora_a": jnp.asarray(rng.randn(d, r).astype(np.float32)),
                                "lora_b": jnp.zeros((r, d), jnp.float32)}},
    }


def trained_state(steps: int = 3):
    """(optimizer, trainable, opt_state) after `steps` adamw updates: non-trivial mu/nu and count."""
    opt = optax.adamw(1e-2)
    params = make_trainable()
    state = opt.init(params)
    for i in range(steps):
        grads = jax.tree.map(lambda p: jnp.sin(p * (i + 1)) + 0.1, params)
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return opt, params, state


def assert_bit_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def save_steps(ckpt, losses, key="eval_loss"):
    _, params, state = trained_state(1)
    for step, loss in losses.items():
        ckpt.save(step, params, state, {"step": step}, None if loss is None else {key: loss})
        assert ckpt.latest_step() == step  # the step just saved is never deleted
        assert os.path.isdir(os.path.join(ckpt.directory, str(step)))


def step_dirs(path) -> set:
    return {int(n) for n in os.listdir(path) if n.isdigit()}


# ------------------------------------------------------------------------------------- fingerprint


def test_fingerprint_equal_trees_equal_and_any_change_changes_it():
    a = {"x": jnp.arange(12, dtype=jnp.float32).reshape(3, 4), "y": {"b": jnp.ones((2,), jnp.bfloat16)}}
    same = {"y": {"b": np.ones((2,), dtype=jnp.bfloat16)}, "x": np.arange(12, dtype=np.float32).reshape(3, 4)}
    fa = fingerprint(a)
    assert len(fa) == 64 and int(fa, 16) >= 0
    assert fingerprint(same) == fa  # insertion order and host/device placement do not matter
    one_value = {"x": a["x"].at[2, 3].set(11.5), "y": a["y"]}
    assert fingerprint(one_value) != fa
    assert fingerprint({"x": a["x"], "y": {"b": a["y"]["b"].astype(jnp.float16)}}) != fa  # dtype
    assert fingerprint({"x": a["x"].reshape(4, 3), "y": a["y"]}) != fa  # shape, same bytes
    assert fingerprint({"z": a["x"], "y": a["y"]}) != fa  # path


# ------------------------------------------------------------------------------------- roundtrip


def test_roundtrip_bit_identical_with_adamw_namedtuples_and_meta(tmp_path):
    opt, params, state = trained_state(3)
    meta = {"epoch": 2, "pos_in_epoch": 17, "seed": 2**40 + 3, "lr": 0.1 + 0.2, "order": [3, 1, 2], "name": "r"}
    with RunCheckpointer(tmp_path, base_fingerprint=FP) as ckpt:
        ckpt.save(30, params, state, meta, {"eval_loss": 1.25})
        assert ckpt.all_steps() == [30] and ckpt.latest_step() == 30

    # resume in a "new process": fresh checkpointer, fresh init trees as templates
    fresh_params = make_trainable(seed=1)
    fresh_state = opt.init(fresh_params)
    with RunCheckpointer(tmp_path, base_fingerprint=FP) as ckpt:
        got_params, got_state, got_meta = ckpt.restore(trainable_like=fresh_params, opt_state_like=fresh_state)
        only_params, meta2 = ckpt.restore_trainable(30, trainable_like=fresh_params)

    assert_bit_identical(got_params, params)
    assert_bit_identical(got_state, state)
    assert_bit_identical(only_params, params)
    assert type(got_state) is type(state) and type(got_state[0]) is optax.ScaleByAdamState
    assert got_state[0].count.dtype == jnp.int32 and int(got_state[0].count) == 3
    assert got_meta == {**meta, "base_fingerprint": FP} and meta2 == got_meta

    # the resumed run continues bit-identically
    grads = jax.tree.map(lambda p: jnp.cos(p), params)
    u1, s1 = opt.update(grads, state, params)
    u2, s2 = opt.update(grads, got_state, got_params)
    assert_bit_identical(u1, u2)
    assert_bit_identical(s1, s2)


def test_async_save_roundtrip(tmp_path):
    _, params, state = trained_state(2)
    ckpt = RunCheckpointer(tmp_path, base_fingerprint=FP, async_save=True)
    ckpt.save(1, params, state, {"e": 1})
    ckpt.save(2, params, state, {"e": 2})
    ckpt.wait()
    assert ckpt.all_steps() == [1, 2]
    p, s, m = ckpt.restore(trainable_like=params, opt_state_like=state)
    ckpt.close()
    assert m["e"] == 2
    assert_bit_identical(p, params)
    assert_bit_identical(s, state)


def test_save_rejects_non_increasing_step_and_non_json_meta(tmp_path):
    _, params, state = trained_state(1)
    with RunCheckpointer(tmp_path, base_fingerprint=FP) as ckpt:
        ckpt.save(5, params, state, {})
        with pytest.raises(ValueError, match="step 5 is already saved"):
            ckpt.save(5, params, state, {})
        with pytest.raises(ValueError, match="steps must increase"):
            ckpt.save(3, params, state, {})
        with pytest.raises(TypeError, match="JSON"):
            ckpt.save(6, params, state, {"x": object()})
        with pytest.raises(ValueError, match="differs"):
            ckpt.save(6, params, state, {"base_fingerprint": "other"})
        assert ckpt.all_steps() == [5]


# ------------------------------------------------------------------------------------- retention


def test_keeps_last_n_and_best_min_and_never_deletes_latest(tmp_path):
    losses = {1: 1.0, 2: 0.5, 3: 0.8, 4: 0.9, 5: 1.1, 6: 1.2}
    with RunCheckpointer(tmp_path, keep_last=2, best_metric="eval_loss", best_mode="min", base_fingerprint=FP) as c:
        save_steps(c, losses)
        assert c.all_steps() == [2, 5, 6]
        assert c.latest_step() == 6 and c.best_step() == 2
    assert step_dirs(tmp_path) == {2, 5, 6}

    # after a restart the old best must still be known (metrics re-read from disk) and kept
    with RunCheckpointer(tmp_path, keep_last=2, best_metric="eval_loss", best_mode="min", base_fingerprint=FP) as c:
        assert c.best_step() == 2
        save_steps(c, {7: 1.3, 8: 0.4})
        assert c.all_steps() == [7, 8] and c.best_step() == 8
    assert step_dirs(tmp_path) == {7, 8}


def test_keeps_best_max_and_steps_without_metric_are_only_latest(tmp_path):
    acc = {1: 0.1, 2: 0.9, 3: 0.5, 4: 0.4, 5: 0.3, 6: 0.2}
    with RunCheckpointer(tmp_path, keep_last=2, best_metric="accuracy", best_mode="max", base_fingerprint=FP) as c:
        save_steps(c, acc, key="accuracy")
        assert c.all_steps() == [2, 5, 6] and c.best_step() == 2
        save_steps(c, {7: None, 8: None, 9: None})  # no metrics: kept as latest only, never best
        assert c.all_steps() == [2, 8, 9] and c.best_step() == 2
        save_steps(c, {10: 0.95}, key="accuracy")
        assert c.all_steps() == [9, 10] and c.best_step() == 10
        save_steps(c, {11: float("nan")}, key="accuracy")  # non-finite is not a best candidate
        assert c.all_steps() == [10, 11] and c.best_step() == 10
    assert step_dirs(tmp_path) == {10, 11}


def test_keep_last_without_best_metric(tmp_path):
    with RunCheckpointer(tmp_path, keep_last=3, base_fingerprint=FP) as c:
        save_steps(c, {s: 1.0 / s for s in range(1, 7)})
        assert c.all_steps() == [4, 5, 6] and c.best_step() is None
    assert step_dirs(tmp_path) == {4, 5, 6}


def test_trap_plain_max_to_keep_with_best_fn_deletes_latest(tmp_path):
    """Orbax's legacy max_to_keep + best_fn keeps the N best only: the just-saved (latest) step is deleted."""
    opts = ocp.CheckpointManagerOptions(
        max_to_keep=2, best_fn=lambda m: m["eval_loss"], best_mode="min", enable_async_checkpointing=False
    )
    tree = {"w": jnp.ones((2,), jnp.float32)}
    with ocp.CheckpointManager(tmp_path, options=opts) as mngr:
        for step, loss in {1: 1.0, 2: 0.5, 3: 0.8, 4: 0.9, 5: 1.1, 6: 1.2}.items():
            mngr.save(step, args=ocp.args.StandardSave(tree), metrics={"eval_loss": loss})
        assert list(mngr.all_steps()) == [2, 3]
        assert mngr.latest_step() == 3
    assert step_dirs(tmp_path) == {2, 3}  # step 6, the latest, is gone


# ------------------------------------------------------------------------------------- errors


def test_restore_on_different_base_fingerprint_raises(tmp_path):
    _, params, state = trained_state(1)
    with RunCheckpointer(tmp_path, base_fingerprint=FP) as c:
        c.save(1, params, state, {})
    other = fingerprint({"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3).at[0, 0].set(9.0)})
    assert other != FP
    with RunCheckpointer(tmp_path, base_fingerprint=other) as c:
        with pytest.raises(CheckpointError, match="trained on a different base model") as ei:
            c.restore(trainable_like=params, opt_state_like=state)
        assert FP in str(ei.value) and other in str(ei.value)
        with pytest.raises(CheckpointError, match="different base model"):
            c.restore_trainable(trainable_like=params)


def test_restore_without_checkpoint_raises(tmp_path):
    _, params, state = trained_state(1)
    with RunCheckpointer(tmp_path / "empty", base_fingerprint=FP) as c:
        assert c.latest_step() is None and c.all_steps() == [] and c.best_step() is None
        with pytest.raises(CheckpointError, match="no checkpoint found"):
            c.restore(trainable_like=params, opt_state_like=state)
        c.save(1, params, state, {})
        with pytest.raises(CheckpointError, match="no committed checkpoint for step 7"):
            c.restore(7, trainable_like=params, opt_state_like=state)


def test_restore_with_mismatched_like_raises(tmp_path):
    opt, params, state = trained_state(1)
    with RunCheckpointer(tmp_path, base_fingerprint=FP) as c:
        c.save(1, params, state, {})
        bigger = make_trainable(d=128)
        with pytest.raises(CheckpointError, match="does not fit trainable_like"):
            c.restore(trainable_like=bigger, opt_state_like=opt.init(bigger))


def _corrupt(step_dir, mode):
    if mode == "delete_array_data":
        files = glob.glob(os.path.join(step_dir, "trainable", "ocdbt.process_0", "d", "*"))
        assert files
        for f in files:
            os.remove(f)
    elif mode == "truncate_opt_state_manifest":
        f = os.path.join(step_dir, "opt_state", "manifest.ocdbt")
        data = open(f, "rb").read()
        open(f, "wb").write(data[: len(data) // 2])
    elif mode == "flip_byte_in_array_data":
        files = sorted(glob.glob(os.path.join(step_dir, "trainable", "ocdbt.process_0", "d", "*")), key=os.path.getsize)
        data = bytearray(open(files[-1], "rb").read())
        data[len(data) // 2] ^= 0x5A
        open(files[-1], "wb").write(bytes(data))
    elif mode == "truncate_meta":
        f = os.path.join(step_dir, "meta", "metadata")
        data = open(f, "rb").read()
        open(f, "wb").write(data[: len(data) // 2])
    else:
        raise AssertionError(mode)


# Orbax leaves its other shard-read coroutines un-awaited when one read of a damaged file fails.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    "mode", ["delete_array_data", "truncate_opt_state_manifest", "flip_byte_in_array_data", "truncate_meta"]
)
def test_corrupt_checkpoint_raises_naming_step_and_older_step_restores(tmp_path, mode):
    opt, params, state = trained_state(2)
    with RunCheckpointer(tmp_path, base_fingerprint=FP) as c:
        c.save(1, params, state, {"e": 1})
        c.save(2, params, state, {"e": 2})
    _corrupt(os.path.join(tmp_path, "2"), mode)
    fresh = make_trainable(seed=5)
    with RunCheckpointer(tmp_path, base_fingerprint=FP) as c:
        with pytest.raises(CheckpointError) as ei:
            c.restore(trainable_like=fresh, opt_state_like=opt.init(fresh))
        msg = str(ei.value)
        assert "step 2" in msg and os.path.join(str(tmp_path), "2") in msg and "restore(step=1)" in msg and "--step 1" in msg
        p, s, m = c.restore(1, trainable_like=fresh, opt_state_like=opt.init(fresh))
    assert m["e"] == 1
    assert_bit_identical(p, params)
    assert_bit_identical(s, state)


def test_leftover_tmp_step_dir_is_not_latest_and_is_cleaned(tmp_path):
    _, params, state = trained_state(1)
    with RunCheckpointer(tmp_path, base_fingerprint=FP) as c:
        c.save(1, params, state, {"e": 1})
    # what a killed save leaves behind (orbax 0.12.8 writes "<step>.orbax-checkpoint-tmp"; older ones add "-<ts>")
    tmp_dirs = [tmp_path / "2.orbax-checkpoint-tmp", tmp_path / "3.orbax-checkpoint-tmp-1234567890"]
    for tmp_dir in tmp_dirs:
        (tmp_dir / "trainable").mkdir(parents=True)
        (tmp_dir / "trainable" / "partial").write_bytes(b"\0" * 10)
    with RunCheckpointer(tmp_path, base_fingerprint=FP) as c:
        assert c.all_steps() == [1] and c.latest_step() == 1
        p, _, m = c.restore(trainable_like=params, opt_state_like=state)
        assert m["e"] == 1
        assert_bit_identical(p, params)
        c.save(2, params, state, {"e": 2})  # the interrupted step number can be saved again
        assert c.all_steps() == [1, 2]
    assert not any(d.exists() for d in tmp_dirs)


# ------------------------------------------------------------------------------------- SIGKILL

CHILD = textwrap.dedent(
    """
    import os, sys
    os.environ["JAX_PLATFORMS"] = "cpu"
    import numpy as np, jax.numpy as jnp, optax
    from jaxpeft.train.checkpoint import RunCheckpointer

    def tree(step):  # ~4 MB of adapter weights so a save takes a noticeable time
        rng = np.random.RandomState(step)
        return {"a": {"lora_a": jnp.asarray(rng.randn(1024, 512).astype(np.float32)),
                      "lora_b": jnp.asarray(rng.randn(512, 1024).astype(np.float32))}}

    ckpt = RunCheckpointer(sys.argv[1], keep_last=2, base_fingerprint="base", async_save=sys.argv[2] == "1")
    opt = optax.adam(1e-3)
    for step in range(1, 1000):
        p = tree(step)
        print("saving", step, flush=True)
        ckpt.save(step, p, opt.init(p), {"step": step})
        if ckpt.async_save:
            ckpt.wait()
        print("committed", step, flush=True)
    """
)


@pytest.mark.parametrize("async_save", [False, True])
def test_sigkill_during_saves_keeps_latest_committed_step_intact(tmp_path, async_save):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    ckdir = tmp_path / "ckpt"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(ckdir), "1" if async_save else "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO, env=env,
    )
    committed = 0
    deadline = time.time() + 60
    try:
        for line in proc.stdout:
            kind, step = line.split()
            if kind == "committed":
                committed = int(step)
            if kind == "saving" and int(step) == 4:  # kill while step 4 is being written
                time.sleep(0.02)
                break
            assert time.time() < deadline, "child too slow"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert committed == 3

    import optax

    def expected(step):
        rng = np.random.RandomState(step)
        return {"a": {"lora_a": rng.randn(1024, 512).astype(np.float32),
                      "lora_b": rng.randn(512, 1024).astype(np.float32)}}

    like = jax.tree.map(jnp.zeros_like, expected(0))
    opt_like = optax.adam(1e-3).init(like)
    with RunCheckpointer(ckdir, keep_last=2, base_fingerprint="base") as c:
        latest = c.latest_step()
        assert latest in (3, 4)  # 4 only if its commit raced ahead of the kill
        assert c.all_steps() == [latest - 1, latest]
        for step in c.all_steps():
            p, s, m = c.restore(step, trainable_like=like, opt_state_like=opt_like)
            assert m["step"] == step
            assert_bit_identical(p, jax.tree.map(jnp.asarray, expected(step)))
            assert int(s[0].count) == 0
        # the run resumes and keeps saving after the crash
        c.save(latest + 1, p, s, {"step": latest + 1})
        assert c.latest_step() == latest + 1
    assert not glob.glob(str(ckdir / "*.orbax-checkpoint-tmp-*"))
