"""What a run stopped by SIGTERM says about its checkpoint, with checkpointing on and off.

(test_train_resume.py stops real train.py processes and checks what they saved.)
"""

import logging
import signal

import pytest
from test_train_common import tiny_config

from ghn.train import Trainer

NOT_SAVED = "checkpointing is disabled (checkpoint.enabled=False): nothing saved"


@pytest.mark.parametrize("enabled", [True, False])
def test_a_stopped_run_says_whether_it_saved_a_checkpoint(tmp_path, capsys, caplog, enabled):
    config = tiny_config({"num_steps": 2, "checkpoint.enabled": enabled})
    trainer = Trainer(config, tmp_path)
    try:
        # The handler only records the signal; the loop stops before its first step.
        with caplog.at_level(logging.WARNING, logger="ghn.train.trainer"), trainer._signals():
            signal.raise_signal(signal.SIGTERM)
        summary = trainer.train()
    finally:
        trainer.close()
    assert summary["stopped_by"] == "SIGTERM" and summary["step"] == 0
    said = caplog.text + capsys.readouterr().out
    if enabled:
        assert "got SIGTERM: saving a checkpoint, then stopping" in said
        assert "stopped by SIGTERM at step 0; checkpoint saved" in said
        assert (tmp_path / "checkpoints" / "0").is_dir()
    else:
        assert f"got SIGTERM: {NOT_SAVED}, then stopping" in said
        assert f"stopped by SIGTERM at step 0; {NOT_SAVED}" in said
        assert "saving a checkpoint" not in said and "checkpoint saved" not in said
        assert not (tmp_path / "checkpoints").exists()
