"""Resume benchmark: how soon a killed `workbench trace` writes its next chunk after a restart, resuming from its
state snapshot against replaying the committed tokens.

    .venv/bin/python bench/resume.py [--tokens 1000000] [--kill-at 900000] [--model DIR] [--chunk-tokens N]
                                     [--out STORE]

1. `workbench trace MODEL --random-tokens N --out STORE` in a child process, SIGKILLed once its commit marker
   reaches --kill-at tokens (K: the marker then, a multiple of the chunk size). The interval between its last two
   commits is what one chunk costs at that depth, uninterrupted.
2. Two copies of the killed store, each restarted with the same command (a fresh process: imports, model load,
   identity and damage checks included): one resumes from its snapshot, the other replays (WORKBENCH_TRACE_REPLAY=1,
   which only this benchmark sets). Each is timed from its start to its next commit, then stopped.
3. The snapshot's bytes on disk, and the seconds `Snapshots.restore` takes to read it back (checksums included),
   in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import workbench as wb
from workbench.demo import EMBEDDED_MODEL
from workbench.store import disk_bytes
from workbench.store.snapshot import FOLDER, REPLAY_ENV, Snapshots


def committed(out: Path) -> int:
    """The store's commit marker (0 before it exists or while it is being replaced)."""
    try:
        return int(json.loads((out / "zarr.json").read_text())["attributes"]["committed_tokens"])
    except (OSError, ValueError, KeyError):
        return 0


def command(args: argparse.Namespace, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "workbench", "trace", args.model, "--random-tokens", str(args.tokens),
           "--out", str(out)]
    return cmd + (["--chunk-tokens", str(args.chunk_tokens)] if args.chunk_tokens else [])


def run_until(cmd: list[str], out: Path, done, env: dict | None = None) -> tuple[float, list[tuple[float, int]]]:
    """Start `cmd`, SIGKILL it once done(marker) holds; (seconds from start to then, [(seconds, marker)] of each
    commit seen)."""
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen = [(0.0, committed(out))]
    try:
        while True:
            mark = committed(out)
            if mark != seen[-1][1]:
                seen.append((time.perf_counter() - t0, mark))
            if done(mark):
                return time.perf_counter() - t0, seen
            if child.poll() is not None:
                raise SystemExit(f"the trace exited ({child.returncode}) before the marker it was waited for")
            time.sleep(0.02)
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
        child.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(EMBEDDED_MODEL))
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--kill-at", type=int, default=900_000, help="kill the first run once this many tokens commit")
    ap.add_argument("--chunk-tokens", type=int, help="tokens per chunk (default: the CLI's)")
    ap.add_argument("--out", help="store of the killed run to keep (default: a temporary one)")
    args = ap.parse_args()
    if not 0 < args.kill_at < args.tokens:
        raise SystemExit("--kill-at must lie between 0 and --tokens")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        out = Path(args.out) if args.out else tmp / "run.zarr"
        if out.exists():
            shutil.rmtree(out)
        cmd = command(args, out)
        print("$", " ".join(cmd), flush=True)
        wall, seen = run_until(cmd, out, lambda mark: mark >= args.kill_at)
        k = committed(out)
        (t1, _), (t2, _) = seen[-2:]
        print(f"killed at {k:,} committed tokens after {wall:.0f} s; the last chunk took {t2 - t1:.1f} s "
              f"uninterrupted", flush=True)
        snapshot = disk_bytes(out / FOLDER)
        times = {}
        for how in ("snapshot", "replay"):
            copy = tmp / f"{how}.zarr"
            shutil.copytree(out, copy)
            env = {**os.environ, REPLAY_ENV: "1"} if how == "replay" else None
            times[how], _ = run_until(command(args, copy), copy, lambda mark: mark > k, env)
            print(f"restart to the next commit, {how}: {times[how]:.1f} s", flush=True)
        files = len(list((out / FOLDER).glob("*.safetensors")))
        appended = wb.load(args.model).appended_state
        t0 = time.perf_counter()
        state = Snapshots(out, appended).restore(k, "cpu")
        restore = time.perf_counter() - t0
    print(f"\nkilled after {k:,} of {args.tokens:,} tokens; restart to the next commit: {times['snapshot']:.1f} s from "
          f"the snapshot, {times['replay']:.1f} s replaying ({times['replay'] / times['snapshot']:.1f}x); one chunk "
          f"at that depth takes {t2 - t1:.1f} s")
    print(f"snapshot: {snapshot / 1e6:.1f} MB on disk in {files} files, "
          f"{state.nbytes / 1e6:.1f} MB of state, restored in {restore:.2f} s")


if __name__ == "__main__":
    main()
