"""End to end: the `workbench demo` command on the embedded model."""

import re
import subprocess
import sys


def test_demo_runs_and_reports_routing():
    out = subprocess.run([sys.executable, "-m", "workbench", "demo"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "deepseek_v3, 4 layers, 3 routed" in text
    rows = re.findall(r"^\s+(\d+)\s+(e\d+\s+\d+%\s+){4}\s+[\d.]+$", text, flags=re.M)
    assert [r[0] for r in rows] == ["1", "2", "3"]
    m = re.search(r"changes the next-token prediction at (\d+)/(\d+) positions", text)
    assert m and 0 < int(m[1]) <= int(m[2])
