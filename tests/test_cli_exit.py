"""The installed command's ending: under torchrun, after a command that imported
torch.distributed, the process ends by os._exit with main()'s status (no interpreter
finalisation, which could abort the process while a gloo thread still releases tensors);
elsewhere console_main returns the status."""
from __future__ import annotations

import pytest
import torch.distributed  # noqa: F401 - console_main looks for it in sys.modules

from dpkfac import cli

TORCHRUN_ENV = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}


class _Exited(Exception):
    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


def _fake_exit(status: int) -> None:
    raise _Exited(status)


@pytest.mark.parametrize("status", [0, 1, 2])
def test_under_torchrun_the_process_ends_with_mains_status(monkeypatch, status):
    for key, value in TORCHRUN_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(cli, "main", lambda: status)
    monkeypatch.setattr(cli.os, "_exit", _fake_exit)
    with pytest.raises(_Exited) as ended:
        cli.console_main()
    assert ended.value.status == status


def test_outside_torchrun_the_status_is_returned(monkeypatch):
    for key in TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(cli, "main", lambda: 2)
    monkeypatch.setattr(cli.os, "_exit", _fake_exit)
    assert cli.console_main() == 2
