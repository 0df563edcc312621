"""A command on a pseudo-terminal: it sees a real terminal (isatty, line editing, Ctrl-C as SIGINT), and the
test reads what a person would see and types what a person would type."""

import fcntl
import os
import pty
import select
import signal
import struct
import sys
import termios
import time


class Terminal:
    def __init__(self, args: list[str], *, env: dict[str, str], cwd) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # the child: exec at once, nothing else runs after a fork
            os.chdir(cwd)
            os.execve(sys.executable, [sys.executable, *args], env)
        self.pid, self.fd = pid, fd
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a new pty is 0x0: no bars fit
        self.output = ""  # everything shown so far
        self.seen = 0  # how much of it `expect` has consumed
        self.returncode: int | None = None

    def expect(self, text: str, timeout: float = 60.0) -> str:
        """Wait until `text` appears after what was already matched; return the output up to and including it."""
        deadline = time.monotonic() + timeout
        while (found := self.output.find(text, self.seen)) < 0:
            if not self._read(deadline - time.monotonic()):
                raise AssertionError(f"no {text!r} within {timeout} s; the terminal shows:\n{self.output[-3000:]}")
        start, self.seen = self.seen, found + len(text)
        return self.output[start : self.seen]

    def send(self, line: str) -> None:
        os.write(self.fd, (line + "\r").encode())

    def interrupt(self) -> None:
        os.write(self.fd, b"\x03")  # the terminal turns Ctrl-C into SIGINT for the program

    def wait(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
            elif time.monotonic() > deadline:
                raise AssertionError(f"still running after {timeout} s:\n{self.output[-3000:]}")
            elif not self._read(0.2):
                time.sleep(0.05)
        return self.returncode

    def close(self) -> None:
        if self.returncode is None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.returncode = -9
        os.close(self.fd)

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], max(timeout, 0))
        if not ready:
            return False
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # EIO: the program has closed the terminal
            return False
        self.output += chunk.decode(errors="replace").replace("\r\n", "\n")
        return bool(chunk)
