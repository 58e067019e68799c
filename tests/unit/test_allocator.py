"""server.allocator: when `serve` restarts itself, and with what."""

from __future__ import annotations

import os
import sys

import pytest

from broker import allocator


@pytest.fixture
def on_pymalloc(monkeypatch):
    """This process as pymalloc reports itself (it counts its blocks), PYTHONMALLOC unset."""
    monkeypatch.delenv("PYTHONMALLOC", raising=False)
    monkeypatch.setattr(sys, "getallocatedblocks", lambda: 12345)


def test_current_is_read_off_the_interpreter(monkeypatch):
    monkeypatch.setattr(sys, "getallocatedblocks", lambda: 12345)
    assert allocator.current() == "pymalloc"
    monkeypatch.setattr(sys, "getallocatedblocks", lambda: 0)  # the C malloc counts nothing
    assert allocator.current() == "malloc"


def test_restarts_once_on_malloc_with_the_same_command_line(on_pymalloc, monkeypatch):
    monkeypatch.setattr(sys, "orig_argv", ["python3", "-m", "broker", "serve", "--port", "9"])
    restart = allocator.reexec_args("malloc")
    assert restart is not None
    argv, env = restart
    assert argv == [sys.executable, "-m", "broker", "serve", "--port", "9"]
    assert env["PYTHONMALLOC"] == "malloc"
    # the restarted process finds the variable set and goes on
    monkeypatch.setenv("PYTHONMALLOC", "malloc")
    assert allocator.reexec_args("malloc") is None


def test_pymalloc_needs_no_restart(on_pymalloc):
    assert allocator.reexec_args("pymalloc") is None


def test_an_operators_pythonmalloc_is_left_alone(on_pymalloc, monkeypatch, caplog):
    monkeypatch.setenv("PYTHONMALLOC", "pymalloc_debug")
    assert allocator.reexec_args("malloc") is None
    allocator.ensure("malloc")  # returns: no exec
    assert "runs on pymalloc (PYTHONMALLOC='pymalloc_debug'" in caplog.text


def test_a_failed_restart_serves_on(on_pymalloc, monkeypatch, caplog):
    def execve(*_args: object) -> None:
        raise FileNotFoundError("interpreter gone")

    monkeypatch.setattr(os, "execve", execve)
    allocator.ensure("malloc")  # returns instead of raising
    assert "could not restart on the malloc allocator" in caplog.text
