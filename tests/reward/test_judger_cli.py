"""oreal-judge: JSONL in, JSONL out, malformed lines reported with file:line, summary on stderr."""

import importlib
import json
import os
import shutil
import stat
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no output, no partial file


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


def test_module_entry_point_judges(tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(src, [json.dumps(r) for r in rows_for(2)])
    proc = subprocess.run([sys.executable, "-m", "oreal.reward.cli", "--input", str(src), "--output", str(out),
                           "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["judge"]["correct"] for line in out.read_text().splitlines()] == [False, True]


def test_a_line_that_is_not_utf8_is_malformed(tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [json.dumps(r).encode() + b"\n" for r in rows_for(3)]
    latin1 = json.dumps({"id": 9, "response": "Caf\u00e9 \\boxed{2}", "gold": "2"}, ensure_ascii=False)
    src.write_bytes(rows[0] + latin1.encode("latin-1") + b"\n" + rows[1] + rows[2])
    assert main(["--input", str(src), "--output", str(out), "--no-progress", "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert f"{src}:2: not UTF-8 text (byte 0xe9 at byte 27)" in err and "1 malformed lines skipped" in err
    text = out.read_text(encoding="utf-8")
    assert "\ufffd" not in text and [json.loads(line)["id"] for line in text.splitlines()] == [0, 1, 2]
    assert main(["--input", str(src), "--output", str(tmp_path / "o2.jsonl"), "--no-progress",
                 "--on-malformed", "fail"]) == 2


def test_output_gets_the_usual_permissions(tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(src, [json.dumps(r) for r in rows_for(2)])
    umask = os.umask(0o022)
    os.umask(umask)
    assert main(["--input", str(src), "--output", str(out), "--no-progress", "--workers", "1"]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask


def _interrupt_at_call(monkeypatch, n):
    """judge_batch raises KeyboardInterrupt (Ctrl-C) at its n-th call; returns the rows each call got."""
    judge_module = importlib.import_module("oreal.reward.judging")
    real, calls = judge_module.judge_batch, []

    def judge_batch(responses, golds, **kwargs):
        calls.append(len(responses))
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(responses, golds, **kwargs)

    monkeypatch.setattr(judge_module, "judge_batch", judge_batch)
    return calls


def test_ctrl_c_keeps_judged_rows_and_resume_judges_only_the_rest(tmp_path, capsys, monkeypatch):
    rows = rows_for(9)
    src, out, straight = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "straight.jsonl"
    write_lines(src, [json.dumps(r) for r in rows[:4]] + ["{bad"] + [json.dumps(r) for r in rows[4:]])
    common = ["--input", str(src), "--no-progress", "--workers", "1", "--chunk-size", "2"]
    assert main(common + ["--output", str(straight)]) == 0
    capsys.readouterr()

    calls = _interrupt_at_call(monkeypatch, 3)
    assert main(common + ["--output", str(out)]) == 130
    partial = tmp_path / "out.jsonl.partial"
    assert "the 4 rows judged so far are kept in" in capsys.readouterr().err
    assert not out.exists() and partial.read_text() == "".join(straight.read_text().splitlines(True)[:4])
    # a crash tore the last line: it is cut off and judged again
    with open(partial, "a") as f:
        f.write('{"id": 4, "response": "so $\\boxed{')

    # a fresh run would overwrite the judged rows: refused
    assert main(common + ["--output", str(out)]) == 2
    assert "pass --resume" in capsys.readouterr().err and partial.exists()

    monkeypatch.undo()
    calls = _interrupt_at_call(monkeypatch, 0)
    assert main(common + ["--output", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert calls == [2, 2, 1] and "9 rows judged, 1 malformed lines skipped (4 kept from the interrupted run)" in err
    assert out.read_text() == straight.read_text() and not partial.exists()


def test_resume_refuses_an_input_that_changed(tmp_path, capsys, monkeypatch):
    rows = rows_for(6)
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(src, [json.dumps(r) for r in rows])
    _interrupt_at_call(monkeypatch, 2)
    common = ["--input", str(src), "--output", str(out), "--no-progress", "--workers", "1", "--chunk-size", "3"]
    assert main(common) == 130
    judged = (tmp_path / "out.jsonl.partial").read_text()
    rows[1]["gold"] = "999"
    write_lines(src, [json.dumps(r) for r in rows])
    monkeypatch.undo()
    assert main(common + ["--resume"]) == 2
    assert f"{src}:2: differs from row 2 of" in capsys.readouterr().err
    assert (tmp_path / "out.jsonl.partial").read_text() == judged  # nothing judged was lost
