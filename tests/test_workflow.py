"""The study's command lines end to end on tiny models: sample.py, finetune.py, e2e_eval.py."""

import json
import sys

import pytest
from conftest import REPO, assert_one_line_error, run_cli, run_entry, tiny_train_args, write_prepared_e2e

from finetune import E2EPairs
from gpt2study.e2e_data import load_prepared, tokenize_example
from gpt2study.e2e_table import read_error_report
from gpt2study.tokenizer import EOT, encode
from kernels.linear_cross_entropy import IGNORE_INDEX

pytestmark = pytest.mark.usefixtures("one_thread")


PAIRS = [
    ("name[The Eagle], eatType[coffee shop], food[French]", "The Eagle is a French coffee shop."),
    ("name[Blue Spice], area[riverside]", "Blue Spice is in the riverside area."),
    ("name[Clowns], eatType[pub], near[Crowne Plaza Hotel]", "Clowns is a pub near Crowne Plaza Hotel."),
    ("name[Zizzi], customer rating[5 out of 5]", "Zizzi has a customer rating of 5 out of 5."),
]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny pretrained model (a few steps on random tokens) in a run folder."""
    import numpy as np

    root = tmp_path_factory.mktemp("base")
    (root / "data").mkdir()
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        rng.integers(0, 50257, 20_000, dtype=np.uint16).tofile(root / "data" / f"{split}.bin")
    r = run_cli("train.py", *tiny_train_args(root / "data", root / "run", max_iters=2, block_size=64))
    assert r.returncode == 0, r.stderr
    return root / "run"


@pytest.fixture(scope="module")
def e2e_data(tmp_path_factory):
    """A prepared E2E folder with a handful of pairs, in data/e2e/prepare.py's format."""
    return write_prepared_e2e(tmp_path_factory.mktemp("e2e"), PAIRS, 10)


def finetune_args(base, data, out, **overrides):
    settings = {"init_from": base, "data_dir": data, "out_dir": out, "device": "cpu", "batch_size": 4,
                "max_iters": 4, "eval_interval": 2, "eval_iters": 1, "log_interval": 1, "warmup_iters": 1,
                "max_seq_len": 64, "progress": False, **overrides}
    return ["config/lora_e2e.py", *(f"--{k}={v}" for k, v in settings.items())]


# ----------------------------------------------------------------------------- sample.py


def test_sample_prints_and_appends(base_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The history of\n\nOnce upon a time\n")
    for _ in range(2):
        r = run_cli("sample.py", "--prompts", prompts, "--model", base_run, "--max_new_tokens", 5, "--greedy")
        assert r.returncode == 0, r.stderr
    assert "The history of" in r.stdout and "Once upon a time" in r.stdout
    saved = (base_run / "samples.txt").read_text()
    assert saved.count("Once upon a time") == 2  # appended, the first run's samples kept


def test_sample_errors(base_run, tmp_path, monkeypatch, capsys):
    import sample

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert_one_line_error(run_cli("sample.py", "--prompts", empty, "--model", base_run), "is empty")
    # the rest in this process: the same main, the same one line, without a second start
    r = run_entry(sample, ["--prompts", tmp_path / "none.txt", "--model", base_run], monkeypatch, capsys)
    assert_one_line_error(r, "not found")
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    r = run_entry(sample, ["--prompts", prompts, "--model", base_run, "--max_new_tokens", 64], monkeypatch, capsys)
    assert_one_line_error(r, "leaves no room")
    assert_one_line_error(run_entry(sample, ["--prompts", prompts, "--model", tmp_path], monkeypatch, capsys),
                          "holds no model")


def test_long_prompt_is_cut_from_the_left(base_run, tmp_path):
    prompts = tmp_path / "long.txt"
    prompts.write_text(" ".join(["word"] * 200) + " END\n")
    r = run_cli("sample.py", "--prompts", prompts, "--model", base_run, "--max_new_tokens", 4, "--greedy")
    assert r.returncode == 0, r.stderr
    assert "cut from the left" in r.stderr and "only its last 60" in r.stderr


# ----------------------------------------------------------------------------- finetune.py


def test_examples_score_the_reference_only():
    prompt, target = tokenize_example(*PAIRS[0])
    x, y = E2EPairs([{"prompt": prompt, "target": target}], max_seq_len=512).batch([0])
    assert x[0].tolist() == (prompt + target)[:-1]
    assert (y[0, :len(prompt) - 1] == IGNORE_INDEX).all()
    assert y[0, len(prompt) - 1:].tolist() == target and target[-1] == EOT
    assert target[:-1] == encode(" " + PAIRS[0][1])


def test_finetune_trains_adapter_only_and_resumes(base_run, e2e_data, tmp_path, monkeypatch):
    import finetune
    from gpt2study.training import EpochSampler

    def run(args):
        monkeypatch.setattr(sys, "argv", ["finetune.py", *map(str, args)])
        finetune.main()

    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run(finetune_args(base_run, e2e_data, whole, max_iters=6, ckpt_interval=2))
    files = sorted(p.name for p in (whole / "checkpoint").iterdir())
    assert files == ["adapter.safetensors", "config.json", "train_state.pt"]  # the adapter, not the model
    assert (whole / "checkpoint" / "adapter.safetensors").stat().st_size < 100_000

    original = EpochSampler.next_batch

    def crash_at_step_5(self):
        if self.offset + self.epoch * self.n >= 4 * self.global_batch:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(EpochSampler, "next_batch", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        run(finetune_args(base_run, e2e_data, broken, max_iters=6, ckpt_interval=2))
    monkeypatch.setattr(EpochSampler, "next_batch", original)
    run(finetune_args("resume", e2e_data, broken, max_iters=6, ckpt_interval=2))
    losses = [[(x["step"], x["loss"]) for x in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
               if x["split"] == "train"] for d in (whole, broken)]
    assert losses[0] == losses[1] and len(losses[0]) == 6


def test_a_resumed_lora_run_trains_and_reports_its_own_settings(base_run, e2e_data, tmp_path, monkeypatch, capsys):
    """--init_from=resume alone continues the run as it was started; a LoRA setting that says otherwise
    is refused in one line instead of being printed, recorded and not trained."""
    import finetune

    out = tmp_path / "o"
    r = run_entry(finetune, finetune_args(base_run, e2e_data, out, max_iters=2, lora_r=2, lora_targets="q,k"),
                  monkeypatch, capsys)
    assert r.returncode == 0, r.stderr
    r = run_entry(finetune, finetune_args(base_run, e2e_data, out, max_iters=4, init_from="resume", lora_r=8),
                  monkeypatch, capsys)
    assert_one_line_error(r, "has lora_r=2, not 8")
    r = run_entry(finetune, [f"--out_dir={out}", "--init_from=resume", "--max_iters=4"], monkeypatch, capsys)
    assert r.returncode == 0, r.stderr
    assert "LoRA r=2 alpha=32 on q, k" in r.stdout
    info = json.loads((out / "checkpoint" / "config.json").read_text())
    assert info["step"] == 4 and info["lora"]["lora_r"] == 2 and info["train"]["lora_r"] == 2
    assert info["train"]["data_dir"] == str(e2e_data) and info["train"]["batch_size"] == 4  # the run's own


def test_finetune_errors(base_run, e2e_data, tmp_path, monkeypatch, capsys):
    import finetune

    assert_one_line_error(run_cli("finetune.py", *finetune_args(base_run, tmp_path, tmp_path / "o")),
                          "no prepared E2E data", "prepare.py")
    r = run_entry(finetune, finetune_args(base_run, e2e_data, tmp_path / "o", lora_targets="('q', 'x')"),
                  monkeypatch, capsys)
    assert_one_line_error(r, "config key 'lora_targets' has 'x'")
    r = run_entry(finetune, finetune_args(base_run, e2e_data, tmp_path / "o", max_seq_len=512), monkeypatch, capsys)
    assert_one_line_error(r, "exceeds the base model's context")
    assert not (tmp_path / "o").exists()


def test_finetune_can_train_on_the_references_that_say_what_their_mr_says(base_run, tmp_path, monkeypatch, capsys):
    import finetune

    unfaithful = [("name[The Eagle], eatType[pub], food[French]", "The Eagle is a pub."),  # food missing
                  ("name[Blue Spice], area[riverside]", "Blue Spice is a cheap pub in the riverside area."),  # added
                  ("name[Clowns], eatType[pub], area[riverside]", "Clowns is a pub in the city centre.")]  # wrong
    (tmp_path / "e2e").mkdir(), (tmp_path / "bad").mkdir()
    data = write_prepared_e2e(tmp_path / "e2e", [*PAIRS, *unfaithful], 2)
    r = run_entry(finetune, finetune_args(base_run, data, tmp_path / "o", max_iters=1, train_refs="checked"),
                  monkeypatch, capsys)
    assert r.returncode == 0, r.stderr
    assert "train_refs=checked: 8 of 14 training pairs kept" in r.stdout
    assert "; 8 training pairs;" in r.stdout
    # the first of them says its MR without the food: that MR becomes its prompt; the others are left out
    r = run_entry(finetune, finetune_args(base_run, data, tmp_path / "o3", max_iters=1, train_refs="mr_of_ref"),
                  monkeypatch, capsys)
    assert r.returncode == 0, r.stderr
    assert "train_refs=mr_of_ref: 10 of 14 training pairs kept, 2 with the MR their reference says" in r.stdout
    fitted = [p for p in (finetune.as_trained(r, "mr_of_ref") for r in load_prepared(data, "train")) if p]
    without_food = ("name[The Eagle], eatType[pub]", "The Eagle is a pub.")
    assert [(p["mr"], p["ref"]) for p in fitted] == [*PAIRS, without_food] * 2
    assert all(p["prompt"] == tokenize_example(p["mr"], p["ref"])[0] for p in fitted)
    # a subset counts the pairs kept: the first 5 that pass of a seeded random order
    r = run_entry(finetune, finetune_args(base_run, data, tmp_path / "o4", max_iters=1, train_refs="checked",
                                          train_subset=5), monkeypatch, capsys)
    assert "train_refs=checked: 5 of" in r.stdout and "; 5 training pairs;" in r.stdout
    only_bad = write_prepared_e2e(tmp_path / "bad", unfaithful, 2)
    r = run_entry(finetune, finetune_args(base_run, only_bad, tmp_path / "o2", train_refs="checked"), monkeypatch,
                  capsys)
    assert_one_line_error(r, "no training pair", "--train_refs=all")


# ----------------------------------------------------------------------------- e2e_eval.py


def test_e2e_eval_table(base_run, e2e_data, tmp_path, monkeypatch, capsys):
    import finetune

    adapter_run = tmp_path / "lora"
    r = run_entry(finetune, finetune_args(base_run, e2e_data, adapter_run, max_iters=2), monkeypatch, capsys)
    assert r.returncode == 0, r.stderr
    config = tmp_path / "cfg.py"
    # as if trained offline with --init_from=FOLDER: the run's recorded base wins over the config's
    config.write_text(f'include("{REPO / "config/lora_e2e.py"}")\n'
                      f'init_from = "gpt2-medium"\nout_dir = "{adapter_run}"\n')
    missing = tmp_path / "missing.py"
    missing.write_text(f'include("{REPO / "config/lora_e2e.py"}")\n'
                       f'init_from = "{base_run}"\nout_dir = "{tmp_path / "nothing"}"\n')
    out = tmp_path / "eval"
    r = run_cli("e2e_eval.py", f"--configs={config},{missing}", "--data_dir", e2e_data, "--out_dir", out,
                "--beam_size", 2, "--max_new_tokens", 6, env={"E2E_METRICS_NO_JAVA": "1"})
    assert r.returncode == 0, r.stderr
    tag = "beam_size_2_max_new_tokens_6"  # not the study's decoding: its files are named for it
    record = json.loads((out / f"scores.{tag}.json").read_text())
    assert record["mrs"] == len(PAIRS) and record["decoding"]["beam_size"] == 2
    scores = record["systems"]
    names = list(scores)
    # one base row for both configs, the LoRA run that exists, and the one that does not
    lora, nothing = (f"GPT-2 {base_run.name} + LoRA ({d})" for d in (adapter_run, tmp_path / "nothing"))
    assert names == [f"GPT-2 {base_run.name}", lora, nothing]
    assert all(0 <= scores[n]["BLEU"] <= 1 for n in names[:2])
    assert "python finetune.py" in scores[nothing]["missing"]
    table = (out / f"scores.{tag}.md").read_text()
    assert "0." in table and "*" in table and "unofficial" in table  # no Java: marked
    outputs = (out / f"gpt_2_{base_run.name}.{tag}.txt").read_text().splitlines()
    assert len(outputs) == len(PAIRS) and all(outputs)
    assert "python finetune.py" in r.stdout  # the missing adapter is listed with its command there too
    # slot errors beside the five metrics, and an error report beside each system's outputs
    assert "| SER |" in table and record["decoding"]["rerank_slots"] is True and record["decoding"]["slot_penalty"] == 1
    report = read_error_report(out / f"gpt_2_{base_run.name}.{tag}.errors.tsv")
    assert [(row["mr"], row["output"]) for row in report] == [(mr, o) for (mr, _), o in zip(PAIRS, outputs)]
    base = scores[names[0]]
    assert base["SER"] == pytest.approx(sum(int(row["errors"]) for row in report) / 10)
    assert base["slot_errors"]["slots"] == 10 and base["errors"].endswith(".errors.tsv")

    # the decoder checks itself: of each final beam, the hypothesis with the fewest slot errors; without that,
    # the best scored, which never has fewer
    r = run_cli("e2e_eval.py", f"--configs={config}", "--data_dir", e2e_data, "--out_dir", out, "--beam_size", 2,
                "--max_new_tokens", 6, "--rerank_slots=False", "--max_mrs", 2, env={"E2E_METRICS_NO_JAVA": "1"})
    assert r.returncode == 0, r.stderr
    plain = f"first2_{tag}_rerank_slots_false"
    assert json.loads((out / f"scores.{plain}.json").read_text())["decoding"]["rerank_slots"] is False
    best_scored = read_error_report(out / f"gpt_2_{base_run.name}.{plain}.errors.tsv")
    assert len(best_scored) == 2
    assert all(int(a["errors"]) <= int(b["errors"]) for a, b in zip(report, best_scored))


def test_a_wider_search_retries_near_misses_and_keeps_what_says_more(monkeypatch):
    import e2e_eval
    from gpt2study.settings import EvalConfig

    said = "name[Aromi], eatType[pub], area[riverside]"
    near_miss = "name[Aromi], eatType[pub], area[city centre], familyFriendly[yes]"
    no_better = "name[Wildwood], eatType[pub], area[riverside]"
    lost = "name[Zizzi], eatType[pub], food[Chinese], area[riverside], familyFriendly[no]"
    first = {said: "Aromi is a pub in the riverside area.",
             near_miss: "Aromi is a pub in the city centre.",  # familyFriendly missing: one error
             no_better: "Wildwood is a pub.",  # area missing
             lost: "Zizzi is a pub."}  # three slots missing: no near miss
    wider = {near_miss: "Aromi is a family friendly pub in the city centre.",
             no_better: "Wildwood is a pub in the city centre.",  # a wrong area for a missing one: the first stays
             lost: "Zizzi is a Chinese pub in the riverside area. It is not family friendly."}
    calls = []

    def searched(model, prompts, slots, cfg, beam_size):
        calls.append((beam_size, prompts))
        return [(first if beam_size == cfg.beam_size else wider)[p] for p in prompts]

    monkeypatch.setattr(e2e_eval, "beam_outputs", searched)
    test = [{"prompt": mr, "mr": mr} for mr in first]
    outputs = e2e_eval.decode_outputs(None, test, EvalConfig(beam_size=3, widen_beam=6))
    assert calls == [(3, list(first)), (6, [near_miss, no_better])]
    assert outputs == [first[said], wider[near_miss], first[no_better], first[lost]]
    calls.clear()
    assert e2e_eval.decode_outputs(None, test, EvalConfig(beam_size=3, widen_beam=0)) == list(first.values())
    assert calls == [(3, list(first))]  # widen_beam 0: one search


def test_e2e_eval_scores_a_file(tmp_path):
    refs = tmp_path / "refs.csv"
    refs.write_text("mr,ref\n" + "".join(f'"{mr}","{ref}"\n' for mr, ref in PAIRS))
    outputs = tmp_path / "out.txt"
    outputs.write_text("".join(ref + "\n" for _, ref in PAIRS))
    r = run_cli("e2e_eval.py", "--outputs", outputs, "--refs", refs, "--json", env={"E2E_METRICS_NO_JAVA": "1"})
    assert r.returncode == 0, r.stderr
    scores = json.loads(r.stdout.strip().splitlines()[-1])
    assert scores["BLEU"] == pytest.approx(1.0) and scores["official"] is False
    assert scores["SER"] == 0.0 and scores["slot_errors"]["without_error"] == 1.0  # the references say every slot
    outputs.write_text("The Eagle is a French pub.\n" + "".join(ref + "\n" for _, ref in PAIRS[1:]))
    r = run_cli("e2e_eval.py", "--outputs", outputs, "--refs", refs, "--json", env={"E2E_METRICS_NO_JAVA": "1"})
    scores = json.loads(r.stdout.strip().splitlines()[-1])
    assert scores["SER"] == pytest.approx(1 / 10) and scores["slot_errors"]["wrong"] == 1
    assert scores["slot_errors"]["without_error"] == 0.75
    outputs.write_text("one line only\n")
    assert_one_line_error(run_cli("e2e_eval.py", "--outputs", outputs, "--refs", refs,
                                  env={"E2E_METRICS_NO_JAVA": "1"}), "1", "4")
