"""User errors at the command line: one `error:` line, exit status 2, no traceback."""

import logging
import subprocess
import sys
import textwrap

import pytest
from test_train_common import ROOT, env, tiny_config, write_config_file

from ghn.errors import USER_ERROR_EXIT, ConfigError, GHNError, exit_on_user_error
from ghn.train import run


def command(*args: str, cwd=ROOT, devices: int = 8) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        env=env(devices),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == USER_ERROR_EXIT, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("error: ") == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-3000:])


def test_misspelled_config_key_names_the_flag_and_the_likely_key(tmp_path):
    proc = command(
        "train.py",
        "--config=configs/vit_mnist.py",
        f"--workdir={tmp_path}",
        "--config.optim.lrr=1",
    )
    assert_user_error(proc, "--config.optim.lrr", "no key 'lrr'", 'Did you mean "lr"')
    assert not (tmp_path / "config.json").exists()


def test_bad_config_value_or_file_is_one_line_too(tmp_path):
    proc = command(
        "train.py",
        "--config=configs/vit_mnist.py",
        f"--workdir={tmp_path}",
        "--config.num_steps=abc",
    )
    assert_user_error(proc, "--config.num_steps=abc", "invalid literal")
    # ml_collections would report a wrong path only at the config's first use, in the run.
    proc = command("train.py", "--config=configs/nope.py", f"--workdir={tmp_path}")
    assert_user_error(proc, "--config=configs/nope.py could not be loaded", "No such file")


def test_missing_dataset_says_where_to_get_it(tmp_path):
    proc = command(
        "train.py",
        "--config=configs/vit_cifar10.py",
        f"--workdir={tmp_path / 'w'}",
        f"--config.data.data_dir={tmp_path}",
        devices=1,  # its eval.batch_size (500) needs a device count dividing it
    )
    assert_user_error(proc, "CIFAR-10 not found", str(tmp_path), "Download https://")


def test_bad_architecture_field_in_eval_py(tmp_path):
    proc = command(
        "eval.py", "--ghn=vit-mnist", "--archs=vit-ti:depth=abc", f"--workdir={tmp_path}"
    )
    assert_user_error(proc, "ViTSpec.depth must be int, got 'abc'")


def test_unknown_ghn_lists_the_shipped_ones(tmp_path):
    proc = command("eval.py", "--ghn=nonexistent", f"--workdir={tmp_path}")
    assert_user_error(proc, "no GHN at 'nonexistent'", "available: ", "vit-mnist")


def test_unknown_preset_and_missing_file_in_python_m_ghn(tmp_path):
    assert_user_error(command("-m", "ghn", "predict", "gpt5"), "unknown preset 'gpt5'", "vit-ti")
    proc = command("-m", "ghn", "trace", "nope.json", cwd=tmp_path)
    assert_user_error(proc, "architecture file nope.json does not exist", "preset name")


def test_corrupt_checkpoint_in_train_py_and_eval_py(tmp_path):
    workdir = tmp_path / "run"
    run(tiny_config({"num_steps": 1}), workdir)
    for path in (workdir / "checkpoints" / "1" / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":  # the array data files
            path.write_bytes(b"garbage")
    config = write_config_file(tmp_path / "tiny.py", {"num_steps": 2})
    proc = command("train.py", f"--config={config}", f"--workdir={workdir}")
    # Also no TensorStore JSON specs nor "Event loop is closed" echoes of the failed reads.
    assert_user_error(proc, "checkpoint", "could not be restored", "corrupt", "fresh workdir")
    assert "tensorstore_spec" not in proc.stderr and "Event loop is closed" not in proc.stderr
    proc = command("eval.py", f"--ghn={workdir}", f"--workdir={tmp_path / 'eval'}")
    assert_user_error(proc, "could not be restored")


def test_programming_errors_keep_their_traceback(tmp_path):
    script = tmp_path / "bug.py"
    script.write_text(
        textwrap.dedent(
            """
            from ghn.errors import run_absl

            def main(argv):
                return {}["a bug, not a user error"]

            run_absl(main)
            """
        )
    )
    proc = command(str(script))
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "KeyError" in proc.stderr
    assert "error: " not in proc.stderr


def test_exit_on_user_error_prints_the_message_alone(capsys):
    with pytest.raises(SystemExit) as exit_info, exit_on_user_error():
        raise ConfigError("bad value; set it to 3")
    assert exit_info.value.code == USER_ERROR_EXIT
    assert capsys.readouterr().err == "error: bad value; set it to 3\n"
    with pytest.raises(KeyError), exit_on_user_error():
        raise KeyError("a bug")
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, GHNError)


def test_unread_restore_errors_are_dropped_from_the_log():
    """asyncio logs a failed read nobody awaited as an unread Task or Future; both
    forms of a TensorStore/Orbax read are dropped, anything else is kept."""
    from ghn.checkpoint import _UnreadRestoreErrors

    def record(message):
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, None, None)

    keep = _UnreadRestoreErrors().filter
    spec = "ValueError('OUT_OF_RANGE: Error opening \"zarr\" driver [tensorstore_spec=...]')"
    assert not keep(record(f"Future exception was never retrieved\nfuture: <Future {spec}>"))
    assert not keep(record("Task exception was never retrieved orbax ... deserialize ..."))
    assert keep(record("Future exception was never retrieved\nfuture: <Future ValueError('x')>"))
    assert keep(record(f"something else {spec}"))
