"""jaxpeft.parallel.distributed: argument checks before jax.distributed starts (the real two-process job is
tests/train/test_multiprocess.py), and the CLI flags that lead there."""
from __future__ import annotations

import pytest

from jaxpeft.cli import main
from jaxpeft.parallel.distributed import DistributedError, initialize


@pytest.mark.parametrize("kw, match", [
    ({"coordinator": "127.0.0.1:1234"}, "pass all of --coordinator, --num-processes and --process-id"),
    ({"coordinator": "127.0.0.1:1234", "num_processes": 2, "process_id": 2}, "outside 0..1"),
])
def test_incomplete_or_inconsistent_arguments_are_named(kw, match):
    with pytest.raises(DistributedError, match=match):
        initialize(**kw)


def test_train_cli_reports_a_bad_job_description_without_a_traceback(capsys, tmp_path):
    code = main(["train", str(tmp_path / "missing.yaml"), "--coordinator", "127.0.0.1:1234", "--num-processes", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: pass all of --coordinator") and "Traceback" not in err
