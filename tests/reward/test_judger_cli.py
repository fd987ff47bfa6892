"""oreal-judge: JSONL in, JSONL out, malformed lines reported with file:line, summary on stderr."""

import json
import shutil
import subprocess
import sys

import pytest

from oreal.reward.cli import main


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def rows_for(n):
    rows = []
    for i in range(n):
        right = i % 3 != 0
        rows.append({"id": i, "response": rf"so $\boxed{{\frac{{{2 * i + 2}}}{{4}}}}$",
                     "gold": f"{(i + 1) / 2}" if right else f"{i + 7}", "question": f"q{i}"})
    return rows


def test_judges_in_order_and_reports_malformed_lines(tmp_path, capsys):
    rows = rows_for(12)
    lines = [json.dumps(r) for r in rows]
    lines.insert(3, "{not json")
    lines.insert(6, "[1, 2]")
    lines.insert(8, json.dumps({"response": "x"}))
    lines.insert(9, json.dumps({"response": 5, "gold": "5"}))
    lines.insert(10, "")
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(src, lines)
    assert main(["--input", str(src), "--output", str(out), "--no-progress", "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert f"{src}:4: not valid JSON" in err
    assert f"{src}:7: expected a JSON object" in err
    assert f"{src}:9: missing field 'gold'" in err
    assert f"{src}:10: field 'response' must be text" in err
    assert "12 rows judged, 4 malformed lines skipped" in err
    assert "accuracy   66.67% (8/12)" in err and "timeouts   0" in err
    judged = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in judged] == list(range(12))
    for r in judged:
        assert r["judge"]["correct"] == (r["id"] % 3 != 0)
        assert r["judge"]["pred"] == rf"\frac{{{2 * r['id'] + 2}}}{{4}}"


def test_fail_mode_stops_and_writes_nothing(tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(src, [json.dumps(r) for r in rows_for(3)] + ['{"response": "1", "gold": [1]}'])
    assert main(["--input", str(src), "--output", str(out), "--on-malformed", "fail", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{src}:4: field 'gold' must be text or a number" in err
    assert not out.exists() and not list(tmp_path.glob(".out.jsonl.*"))


def test_custom_fields_and_summary_json(tmp_path, capsys):
    src, out, summary = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "s.json"
    write_lines(src, [json.dumps({"text": r"\boxed{025}", "answer": 25}), json.dumps({"text": "", "answer": 3.0})])
    assert main(["--input", str(src), "--output", str(out), "--response-field", "text", "--gold-field", "answer",
                 "--output-field", "verdict", "--summary-json", str(summary), "--no-progress"]) == 0
    judged = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["verdict"]["correct"] for r in judged] == [True, False]
    stats = json.loads(summary.read_text())
    assert stats["n"] == 2 and stats["correct"] == 1 and stats["reasons"]["no_answer"] == 1


def test_usage_errors(tmp_path, capsys):
    assert main(["--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o.jsonl")]) == 1
    assert "cannot read" in capsys.readouterr().err
    src = tmp_path / "in.jsonl"
    write_lines(src, [json.dumps(rows_for(1)[0])])
    assert main(["--input", str(src), "--output", str(tmp_path / "o.jsonl"), "--verifier-host", "x"]) == 2
    assert "--verifier-model" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("oreal-judge") is None, reason="console script not installed")
def test_console_script_with_progress_bar(tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(src, [json.dumps(r) for r in rows_for(5)])
    proc = subprocess.run(["oreal-judge", "--input", str(src), "--output", str(out)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "judging" in proc.stderr and "5 rows judged" in proc.stderr
    assert len(out.read_text().splitlines()) == 5


def test_module_entry_point_exists():
    assert callable(main) and sys.modules["oreal.reward.cli"].main is main
