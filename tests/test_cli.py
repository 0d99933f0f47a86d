"""End to end: `workbench demo` on the embedded model writes its report and summary in well under 2 minutes."""

import re
import subprocess
import sys
import time


def test_demo_writes_report_and_summary(tmp_path):
    report = tmp_path / "report.html"
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "workbench", "demo", "--out", str(report)], capture_output=True,
                         text=True, timeout=300)
    elapsed = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr
    assert elapsed < 120
    text = out.stdout
    assert "deepseek_v4, 6 layers" in text
    rows = re.findall(r"^\s+(\d)\s+[\d.]+\s+((?:e\d+ [\d.]+x\s*){7})$", text, flags=re.M)
    assert [r[0] for r in rows] == [str(i) for i in range(6)]
    page = report.read_text()
    assert page.count("<table") == 3 and "plotly" in page and "Plotly.newPlot" in page
    # facts in tables with units and 2 decimals, not raw Python dicts
    assert "{'code'" not in page and "3.328772" not in page
    assert re.search(r"<td class=label>code</td><td>[\d,]+</td><td>3\.33</td>", page)
    assert len(set(re.findall(r"layer (\d), expert %\{x\}: ", page))) == 6  # a load panel per layer
    for domain in ("code", "prose", "french", "numbers", "structured"):
        assert domain in page


def test_demo_reports_a_missing_model(tmp_path):
    out = subprocess.run([sys.executable, "-m", "workbench", "demo", "--model", str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "error" in out.stderr and "none" in out.stderr
