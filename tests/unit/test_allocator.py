"""server.allocator: when `serve` restarts itself, and with what."""

from __future__ import annotations

import sys

from broker import allocator


def test_restarts_once_on_malloc_with_the_same_command_line(monkeypatch):
    monkeypatch.delenv("PYTHONMALLOC", raising=False)
    monkeypatch.setattr(sys, "orig_argv", ["python3", "-m", "broker", "serve", "--port", "9"])
    restart = allocator.reexec_args("malloc")
    assert restart is not None
    argv, env = restart
    assert argv == [sys.executable, "-m", "broker", "serve", "--port", "9"]
    assert env["PYTHONMALLOC"] == "malloc"
    # the restarted process finds the variable set and goes on
    monkeypatch.setenv("PYTHONMALLOC", "malloc")
    assert allocator.current() == "malloc"
    assert allocator.reexec_args("malloc") is None


def test_pymalloc_needs_no_restart(monkeypatch):
    monkeypatch.delenv("PYTHONMALLOC", raising=False)
    assert allocator.current() == "pymalloc"
    assert allocator.reexec_args("pymalloc") is None


def test_an_operators_pythonmalloc_is_left_alone(monkeypatch, caplog):
    monkeypatch.setenv("PYTHONMALLOC", "pymalloc_debug")
    assert allocator.reexec_args("malloc") is None
    allocator.ensure("malloc")  # returns: no exec
    assert "runs on pymalloc_debug" in caplog.text
