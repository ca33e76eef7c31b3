"""The cost of a task's terminal (vrun at a terminal), against the same command on a terminal
here, in one run:

    python bench/terminal_bench.py [--mb 50] [--keys 40]

- keystroke round trip: a key typed into `vrun --tty yes cat` until the task's terminal has
  echoed it back to ours (typed bytes go to the server and the task's terminal; the echo comes
  back through the log that vrun follows), against the echo of a terminal here;
- throughput: `vrun --tty yes cat BIGFILE` against `cat BIGFILE`, both on a terminal here.

It starts a private server in a temporary VELDA_HOME and stops it at the end.
"""

from __future__ import annotations

import argparse
import os
import pty
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class Session:
    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.execvpe(argv[0], argv, env)
        self.seen = b""

    def read_until(self, text: bytes, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            if time.monotonic() > deadline:
                raise SystemExit(f"never saw {text!r}")
            if select.select([self.fd], [], [], 0.05)[0]:
                self.seen += os.read(self.fd, 65536)

    def drain(self) -> int:
        """Read everything until it exits; the number of bytes read."""
        total = 0
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except OSError:
                break
            if not data:
                break
            total += len(data)
        os.waitpid(self.pid, 0)
        os.close(self.fd)
        return total


def round_trips(argv: list[str], env: dict[str, str], keys: int) -> list[float]:
    session = Session(argv, env)
    session.read_until(b"ready")
    times = []
    for i in range(keys):
        key = bytes([ord("a") + i % 26])
        session.seen = b""
        start = time.perf_counter()
        os.write(session.fd, key)
        session.read_until(key)
        times.append(time.perf_counter() - start)
    os.write(session.fd, b"\r\x04")
    session.drain()
    return times


def throughput(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    Session(argv, env).drain()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=50, help="size of the file to cat")
    parser.add_argument("--keys", type=int, default=40, help="keystrokes to time")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bin_dir = os.path.dirname(sys.executable)  # velda and vrun of this interpreter
        env = {**os.environ, "VELDA_HOME": f"{tmp}/home", "VELDA_PORT": "0",
               "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
        big = Path(tmp) / "big.txt"
        line = b"0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456\n"
        big.write_bytes(line * (args.mb * 1024 * 1024 // len(line)))
        subprocess.run(["velda", "task", "list"], env=env, check=True, capture_output=True)
        try:
            report(env, big, args)
        finally:
            subprocess.run(["velda", "server", "stop"], env=env, capture_output=True)


def report(env: dict[str, str], big: Path, args: argparse.Namespace) -> None:
    cat = ["sh", "-c", "echo ready; exec cat"]
    here = statistics.median(round_trips(cat, env, args.keys)) * 1000
    there = statistics.median(round_trips(["vrun", "--tty", "yes", *cat], env, args.keys)) * 1000
    plain = throughput(["cat", str(big)], env)
    relayed = throughput(["vrun", "--tty", "yes", "cat", str(big)], env)
    mb = big.stat().st_size / 1e6
    print("| what | vrun --tty yes | on a terminal here | ratio |")
    print("| --- | --- | --- | --- |")
    print(f"| keystroke round trip (median of {args.keys}) | {there:.1f} ms | {here:.2f} ms | "
          f"{there / here:.0f}x |")
    print(f"| cat of {mb:.0f} MB | {mb / relayed:.0f} MB/s ({relayed:.2f} s) | "
          f"{mb / plain:.0f} MB/s ({plain:.2f} s) | {relayed / plain:.2f}x |")


if __name__ == "__main__":
    main()
