"""bench/gpu_session.py: the session's own machinery (budgets, a failing or overrunning part, the files it writes,
the summary), checked on the CPU. Its measurements need a GPU; `--dry_run` runs every part on tiny shapes."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_session", REPO / "bench" / "gpu_session.py")
gpu_session = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_session)


def _cfg(*args):
    return gpu_session.load_config(gpu_session.SessionConfig, list(args))


def test_pytest_counts():
    counts = gpu_session.pytest_counts
    assert counts("3 passed, 1 failed, 2 skipped, 1 warning in 4.51s") == {"passed": 3, "failed": 1, "skipped": 2,
                                                                         "warning": 1}
    assert counts("==== 12 passed, 3 errors in 0.2s ====") == {"passed": 12, "error": 3}
    assert counts("no tests ran in 0.01s") == {}
    assert counts("timed out") == {}


def test_record_keeps_what_it_measured(tmp_path):
    path = tmp_path / "part.json"
    rec = gpu_session.Record(str(path), budget_s=60, dry_run=False)
    assert rec.afford(10, "a small step") and not rec.afford(1000, "a long step")
    rec.add_row("t", {"a": 1})
    rec.check("3", "ratio", "1.30x", "≥ 1.2x", True)
    saved = json.loads(path.read_text())  # saved at every change: a part killed later keeps this
    assert saved["tables"] == {"t": [{"a": 1}]} and saved["summary"][0]["met"] is True
    assert "skipped a long step" in saved["notes"][0]
    dry = gpu_session.Record("", budget_s=60, dry_run=True)
    dry.check("3", "ratio", "0.01x", "≥ 1.2x", False)
    assert dry.data["summary"][0]["met"] is None  # a dry run judges nothing


def test_proposed_wins_follow_kernel_and_whole_step_numbers():
    wins = gpu_session._proposed_wins
    assert wins({})[0] == ""  # nothing measured on a GPU: no entry, defaults stay PyTorch
    parts = {"info": {"facts": {"capability": "9.0"}},
             "kernels": {"facts": {"kernel_wins": {"attention_fwd": True, "attention": True, "lora_linear": False}}},
             "train": {"facts": {"train_triton_over_sdpa_eager": 1.02, "train_triton_over_sdpa_compiled": 0.97}}}
    entry, _ = wins(parts)
    # attention won alone but slowed the compiled training step: only the forward (decoding) kind is proposed
    assert entry.startswith("(9, 0): {") and '"attention_fwd"' in entry and '"attention"' not in entry
    parts["train"]["facts"]["train_triton_over_sdpa_compiled"] = 1.01
    assert '"attention"' in wins(parts)[0]


def test_synthetic_prompts_look_like_e2e_mrs(tmp_path):
    from gpt2study.tokenizer import decode

    prompts, source = gpu_session.e2e_like_prompts(20, tmp_path / "absent.jsonl")
    assert len(prompts) == 20 and "synthetic" in source
    assert prompts == gpu_session.e2e_like_prompts(20, tmp_path / "absent.jsonl")[0]  # the same every run
    texts = [decode(p) for p in prompts]
    assert all(t.startswith("name : ") and t.endswith(" ||") and 3 <= t.count(" : ") <= 8 for t in texts)
    assert len(set(texts)) > 15
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"mr": "m", "prompt": [i, 7]}) + "\n" for i in range(3)))
    assert gpu_session.e2e_like_prompts(2, test) == ([[0, 7], [1, 7]], "the first 2 MRs of test.jsonl")


@pytest.mark.parametrize("code,ended", [("raise SystemExit(3)", "failed (exit status 3)"),
                                        ("import time; time.sleep(60)", "killed at its budget")])
def test_a_failing_or_overrunning_part_is_recorded(tmp_path, monkeypatch, code, ended):
    # What the part saved before it failed or was killed is kept.
    def command(name, cfg, budget, result):
        prelude = f"import json; open({str(result)!r}, 'w').write(json.dumps({{'notes': ['started']}}))"
        return [sys.executable, "-c", f"{prelude}\n{code}"]

    monkeypatch.setattr(gpu_session, "_part_command", command)
    with open(tmp_path / "log.txt", "w") as log:
        record = gpu_session.run_part("beam", _cfg(), budget=1.0, workdir=tmp_path, log=log, grace=2.0)
    assert record["ended"] == ended and record["notes"] == ["started"] and record["seconds"] < 30


def test_dry_session_writes_its_files_and_prints_the_summary_last(tmp_path):
    # Two quick parts end to end, each in its own process as in a real session.
    run = subprocess.run([sys.executable, "bench/gpu_session.py", "--dry_run", "--parts=info,tests",
                          f"--out={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    files = sorted(p.name for p in tmp_path.iterdir())
    assert set(files) <= set(gpu_session.FILES) and len(files) <= 8
    assert {"session.md", "session.json", "log.txt", "tests.txt"} <= set(files)
    lines = run.stdout.strip().splitlines()
    assert lines[-1].startswith("| session | the whole session |")  # the table is the last thing printed
    assert any("kernel tests" in line and "passed" in line for line in lines)
    session = json.loads((tmp_path / "session.json").read_text())
    assert session["dry_run"] and session["complete"]
    assert [p["ended"] for p in session["parts"].values()] == ["done", "done"]
    assert "passed" in (tmp_path / "tests.txt").read_text()
    assert (tmp_path / "session.md").read_text().index("## Summary") < (tmp_path / "session.md").read_text().index(
        "## info")  # the summary first


def test_a_session_killed_part_way_leaves_its_finished_rows(tmp_path):
    """Kill a dry session (its whole process group) once the train part has recorded its first row: the output
    folder holds the finished info part and that row, in session.md and session.json."""
    proc = subprocess.Popen([sys.executable, "bench/gpu_session.py", "--dry_run", "--parts=info,train",
                             f"--out={tmp_path}"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    session = {}
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(1)
            try:
                session = json.loads((tmp_path / "session.json").read_text())
            except (OSError, ValueError):
                continue
            if any(session["parts"].get("train", {}).get("tables", {}).values()):
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    parts = session["parts"]
    assert not session["complete"] and parts["info"]["ended"] == "done" and parts["train"]["ended"] == "running"
    (rows,) = parts["train"]["tables"].values()
    assert rows[0]["model"] == "ours, defaults (compiled)"  # the headline row first
    text = (tmp_path / "session.md").read_text()
    assert "IN PROGRESS" in text and "### Device" in text and "ours, defaults (compiled)" in text
