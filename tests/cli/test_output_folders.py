"""Issue 15, output folders: every command that writes a folder follows lpq.outputs' rules."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lpq.outputs import HELD_ENV, MARKER, check_output, claim_output, read_marker
from tests.cli.helpers import RECIPE, error_line, lpq, lpq_process, snapshot, user_folder


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    return path


# ---------------------------------------------------------------- lpq export (case 1)

def test_export_force_never_deletes_a_user_folder(recipe, tmp_path):
    mine = user_folder(tmp_path / "mine")
    before = snapshot(tmp_path)
    code, out = lpq("export", "--config", recipe, "--out", mine, "--force")
    assert code == 2
    assert "is not empty and was not written by lpq (no lpq_output.json)" in error_line(out)
    assert snapshot(tmp_path) == before


def test_export_force_into_the_working_folder_is_refused(recipe, tmp_path, monkeypatch):
    work = user_folder(tmp_path / "work")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    code, out = lpq("export", "--config", recipe, "--out", ".", "--force")
    assert code == 2 and "not written by lpq" in error_line(out)
    # Even a folder that lpq wrote is never replaced while it is the working folder (or above it).
    (work / "notes.txt").unlink()
    (work / "sub" / "data.bin").unlink()
    (work / "sub").rmdir()
    claim_output(work, fingerprint="x", command="lpq export").release()
    before = snapshot(tmp_path)
    code, out = lpq("export", "--config", recipe, "--out", ".", "--force")
    assert code == 2
    assert "error: . is the working folder; lpq never replaces or deletes it, even with --force" == error_line(out)
    code, out = lpq("export", "--config", recipe, "--out", "..", "--force")     # tmp_path: the user's
    assert code == 2 and "not written by lpq" in error_line(out)
    (work / "inner").mkdir()
    monkeypatch.chdir(work / "inner")
    code, out = lpq("export", "--config", recipe, "--out", "..", "--force")     # lpq's, but above us
    assert code == 2 and "is a folder above the working folder; lpq never replaces" in error_line(out)
    assert snapshot(tmp_path) == {**before, "work/inner": "dir"}


def test_export_adopts_an_empty_folder_and_replaces_its_own_only_with_force(recipe, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    code, text = lpq("export", "--config", recipe, "--out", out)
    assert code == 0, text
    assert read_marker(out)["command"] == "lpq export" and (out / "lpq_export.json").is_file()
    first = snapshot(tmp_path)
    code, text = lpq("export", "--config", recipe, "--out", out)
    assert code == 2 and "holds the output of an earlier lpq run" in error_line(text) and "--force" in text
    assert snapshot(tmp_path) == first
    # A file the user added to the export makes it theirs too: --force refuses to delete it.
    (out / "my_eval.txt").write_text("results I wrote")
    before = snapshot(tmp_path)
    code, text = lpq("export", "--config", recipe, "--out", out, "--force")
    assert code == 2 and "holds files lpq did not write (my_eval.txt)" in error_line(text)
    assert snapshot(tmp_path) == before
    (out / "my_eval.txt").unlink()
    code, text = lpq("export", "--config", recipe, "--out", out, "--force")
    assert code == 0, text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yaml"]


def test_export_into_the_model_folder_it_reads_is_refused(recipe, tmp_path):
    """An lpq export read back as --model and written over with --force would replace its own input."""
    fake = recipe.read_text().replace("kind: packed", "kind: fake")
    recipe.write_text(fake)
    code, text = lpq("export", "--config", recipe, "--out", tmp_path / "fk")
    assert code == 0, text
    before = snapshot(tmp_path)
    code, text = lpq("export", "--config", recipe, "--model", f"{tmp_path / 'fk'}/", "--out", tmp_path / "fk", "--force")
    assert code == 2 and error_line(text) == (f"error: the output folder {tmp_path / 'fk'} is the folder it reads "
                                              f"(model.id {tmp_path / 'fk'}); choose another output folder"), text
    assert snapshot(tmp_path) == before


def test_no_command_writes_into_the_folder_it_reads(recipe, tmp_path):
    """`lpq eval --candidate X --out X --force` deleted the candidate export before reading it; ptq and train
    replaced a model folder given as model.id the same way; an output inside an input folder mixes files into it."""
    packed, fake = tmp_path / "packed", tmp_path / "fake"
    for out, kind in ((packed, "packed"), (fake, "fake")):
        code, text = lpq("export", "--config", recipe, "--out", out, "--kind", kind)
        assert code == 0, text
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"w{i % 97}" for i in range(400)))
    ptq = tmp_path / "ptq.yaml"
    ptq.write_text(f"model: {{id: {fake}}}\nquant: {{format: hif4}}\nalgorithms: [{{name: rtn}}]\n"
                   f"calibration: {{text_file: {calib}, num_sequences: 2, seq_len: 16, batch_size: 2}}\n"
                   f"protect: {{blocks: []}}\nevaluation: {{wikitext2: {calib}, windows: 1, seq_len: 16}}\n")
    before = snapshot(tmp_path)
    cases = [
        (["eval", "--model", "tiny-llama", "--candidate", packed, "--tasks", "wikitext2", "--out", packed, "--force"],
         f"the output folder {packed} is the folder it reads (--candidate {packed})"),
        (["eval", "--model", "tiny-llama", "--candidate", packed, "--tasks", "wikitext2", "--out", packed / "ev"],
         f"the output folder {packed / 'ev'} is inside the folder it reads (--candidate {packed})"),
        (["eval", "--model", fake, "--candidate", "tiny-llama", "--tasks", "wikitext2", "--out", tmp_path, "--force"],
         f"the output folder {tmp_path} holds the folder it reads (model.id {fake})"),
        (["ptq", "--config", ptq, "--out", fake, "--force"],
         f"the output folder {fake} is the folder it reads (model.id {fake})"),
        (["train", "--config", "configs/smollm2_hif8.yaml", "--set", f"model.id={fake}",
          "--set", "quant.protected_blocks=[]", "--set", "data.seq_len=64", "--set", "domain_eval.seq_len=64",
          "--set", f"train.output_dir={fake}", "--force"],
         f"the output folder {fake} is the folder it reads (model.id {fake})"),
    ]
    for args, message in cases:
        code, text = lpq(*args)
        assert code == 2 and message in error_line(text), (args, text)
    assert snapshot(tmp_path) == before


def test_export_removes_the_temp_folder_of_a_killed_run(recipe, tmp_path):
    left = tmp_path / ".exp.lpq-tmp-deadbeef"
    left.mkdir()
    (left / "lpq_packed.safetensors").write_bytes(b"half written")
    code, out = lpq("export", "--config", recipe, "--out", tmp_path / "exp")
    assert code == 0, out
    assert "removed .exp.lpq-tmp-deadbeef, left by an interrupted run" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp", "r.yaml"]


def test_a_swap_killed_between_its_renames_gets_the_old_folder_back(recipe, tmp_path):
    """A hard kill after the old folder was moved aside and before the new one took its name leaves
    both hidden; the next run puts the old (complete) folder back, then writes as usual."""
    code, out = lpq("export", "--config", recipe, "--out", tmp_path / "exp")
    assert code == 0, out
    old = snapshot(tmp_path / "exp")
    (tmp_path / "exp").rename(tmp_path / ".exp.lpq-old-0badcafe")
    (tmp_path / ".exp.lpq-tmp-0badcafe").mkdir()
    code, out = lpq("export", "--config", recipe, "--out", tmp_path / "exp")      # no --force: still refused
    assert code == 2 and "holds the output of an earlier lpq run" in error_line(out)
    assert "restored the previous folder from .exp.lpq-old-0badcafe" in out and "removed .exp.lpq-tmp-0badcafe" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp", "r.yaml"] and snapshot(tmp_path / "exp") == old


def _hold(folder, tmp_path):
    """Another process that claims `folder` and waits; returns it once it holds the lock."""
    ready = tmp_path / "ready"
    code = ("import sys, time; from lpq.outputs import claim_output; "
            f"claim_output({str(folder)!r}, fingerprint='other', command='lpq ptq'); "
            f"open({str(ready)!r}, 'w').close(); time.sleep(120)")
    env = {k: v for k, v in os.environ.items() if k != HELD_ENV}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.time() + 60
    while not ready.exists():
        assert proc.poll() is None and time.time() < deadline, "the holder did not start"
        time.sleep(0.05)
    return proc


def test_a_second_run_into_a_locked_folder_is_refused_and_a_dead_holder_is_taken_over(recipe, tmp_path):
    folder = tmp_path / "run"
    holder = _hold(folder, tmp_path)
    try:
        before = snapshot(tmp_path)
        code, out = lpq_process("export", "--config", recipe, "--out", folder)
        assert code == 2
        assert f"{folder} is in use by another lpq run (pid {holder.pid} on" in error_line(out)
        assert "`lpq ptq`" in out
        assert snapshot(tmp_path) == before
    finally:
        holder.send_signal(signal.SIGKILL)   # a hard kill: the lock file stays behind
        holder.wait()
    assert (tmp_path / ".run.lpq-lock").is_file()
    run = claim_output(folder, fingerprint="other", command="lpq ptq")
    assert run.state == "continued"
    run.release()
    assert not (tmp_path / ".run.lpq-lock").exists()


def test_stale_lock_takeover_is_reported(tmp_path, capsys):
    folder = tmp_path / "run"
    lock = tmp_path / ".run.lpq-lock"
    lock.write_text(json.dumps({"pid": 2 ** 22 + 7, "host": os.uname().nodename, "command": "lpq train",
                                "since": "yesterday"}))
    with claim_output(folder, fingerprint="f", command="lpq train") as run:
        assert run.state == "new"
        assert "taking over the lock left by a run that is no longer running" in capsys.readouterr().err
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


# ---------------------------------------------------------------- lpq formats quantize (case 6)

@pytest.fixture
def array(tmp_path):
    import numpy as np

    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32))
    return path


@pytest.mark.parametrize("how", ["same", "dot", "symlink", "hardlink"])
def test_formats_quantize_never_overwrites_its_input(array, tmp_path, monkeypatch, how):
    monkeypatch.chdir(tmp_path)
    out = {"same": "x.npy", "dot": "./x.npy", "symlink": "link.npy", "hardlink": "hard.npy"}[how]
    if how == "symlink":
        (tmp_path / "link.npy").symlink_to("x.npy")
    if how == "hardlink":
        os.link(array, tmp_path / "hard.npy")
    before = snapshot(tmp_path)
    code, text = lpq("formats", "quantize", "x.npy", "--fmt", "hif4", "--out", out, "--force")
    assert code == 2 and "is the input file x.npy" in error_line(text)
    assert snapshot(tmp_path) == before


def test_formats_quantize_replaces_an_existing_out_only_with_force(array, tmp_path):
    other = tmp_path / "y.npy"
    other.write_bytes(b"not mine to lose")
    code, text = lpq("formats", "quantize", array, "--fmt", "hif8", "--out", other)
    assert code == 2 and "exists; pass --force" in error_line(text)
    assert other.read_bytes() == b"not mine to lose"
    code, text = lpq("formats", "quantize", array, "--fmt", "hif8", "--out", other, "--force")
    assert code == 0, text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy", "y.npy"]     # no temporary file left


# ---------------------------------------------------------------- lpq eval --out, lpq train output_dir

def test_eval_out_user_folder_is_refused(tmp_path):
    mine = user_folder(tmp_path / "mine")
    (mine / "results.json").write_text('{"mine": true}')
    before = snapshot(tmp_path)
    code, out = lpq("eval", "--model", "tiny-llama", "--candidate", "tiny-llama", "--tasks", "wikitext2",
                    "--out", mine)
    assert code == 2 and "not written by lpq" in error_line(out)
    assert snapshot(tmp_path) == before


def _train_recipe(tmp_path, out, protected="[]"):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": " ".join(f"w{(i * 7 + j) % 50}" for j in range(80))})
                                for i in range(12)) + "\n")
    path = tmp_path / "t.yaml"
    path.write_text(f"""model: {{id: tiny-llama}}
quant:
  weight: {{format: hif8, scaling: current}}
  input: {{format: hif8, scaling: delayed, history_len: 4}}
  protected_blocks: {protected}
train: {{output_dir: {out}, steps: 4, batch_size: 2, lr: 1e-3, bf16_warmup_steps: 1, stats_every: 2}}
data: {{paths: [{corpus}], seq_len: 32, eval_blocks: 4}}
""")
    return path


def test_train_output_dir_user_folder_is_refused(tmp_path):
    mine = user_folder(tmp_path / "mine")
    recipe = _train_recipe(tmp_path, mine)
    before = snapshot(tmp_path)
    code, out = lpq("train", "--config", recipe)
    assert code == 2 and "not written by lpq" in error_line(out) and "t.yaml" in out
    assert snapshot(tmp_path) == before


def test_train_output_of_another_recipe_needs_force(tmp_path):
    out = tmp_path / "run"
    claim_output(out, fingerprint="an-older-recipe", command="lpq train").release()
    (out / "train_report.json").write_text("{}")
    recipe = _train_recipe(tmp_path, out)
    before = snapshot(tmp_path)
    code, text = lpq("train", "--config", recipe)
    assert code == 2 and "holds the output of another recipe (`lpq train`" in error_line(text)
    assert "pass --force" in text
    assert snapshot(tmp_path) == before
    assert read_marker(out)["fingerprint"] == "an-older-recipe"


def test_a_run_that_stopped_before_any_result_starts_over_without_force(tmp_path, capsys):
    """A run whose data failed after its folder was claimed leaves only its recipe copy: a corrected
    recipe may take the folder over (said so); a user's file of that name is never taken for it."""
    out = tmp_path / "run"
    with claim_output(out, fingerprint="a", command="lpq train"):
        (out / "recipe.yaml").write_text("lpq's copy")
    with claim_output(out, fingerprint="b", command="lpq train") as run:
        assert run.state == "replaced" and not (out / "recipe.yaml").exists()
    assert "it holds no results" in capsys.readouterr().err
    (out / "recipe.yaml").write_text("the user's")          # not in the marker's list: the user's file
    with pytest.raises(ValueError, match="pass --force"):
        claim_output(out, fingerprint="c", command="lpq train")
    assert (out / "recipe.yaml").read_text() == "the user's"


@pytest.mark.parametrize("how", [claim_output, check_output])
def test_the_filesystem_root_is_refused_in_one_line(how):
    with pytest.raises(ValueError, match="^/ is the filesystem root; give a folder below it$"):
        how("/", fingerprint="f", force=True)


def test_an_output_folder_below_a_file_is_refused_in_one_line(recipe, tmp_path):
    # mkdir of the folder's parent failed on the file with a FileExistsError traceback.
    (tmp_path / "afile").write_text("the user's")
    before = snapshot(tmp_path)
    for out in (tmp_path / "afile" / "sub", tmp_path / "afile" / "sub" / "deeper"):
        code, text = lpq_process("export", "--config", recipe, "--out", out)
        assert code == 2, text
        assert error_line(text) == f"error: {out}: {tmp_path / 'afile'} is a file, not a folder; choose another " \
                                   f"output folder"
        with pytest.raises(ValueError, match="is a file, not a folder"):
            claim_output(out, fingerprint="f", command="lpq train")
    assert snapshot(tmp_path) == before


def test_a_parent_folder_that_cannot_be_created_is_one_line(tmp_path, monkeypatch):
    import pathlib

    def no_permission(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(pathlib.Path, "mkdir", no_permission)
    with pytest.raises(ValueError, match=r"^.*/new/out: cannot create the folder it goes in \(Permission denied: "):
        claim_output(tmp_path / "new" / "out", fingerprint="f", command="lpq train")


def test_train_sequence_longer_than_the_model_context_is_refused_before_any_folder(tmp_path):
    out = tmp_path / "run"
    recipe = _train_recipe(tmp_path, out)
    code, text = lpq("train", "--config", recipe, "--set", "data.seq_len=999")
    assert code == 2 and "data.seq_len: 999 tokens is beyond tiny-llama's context of 256" in error_line(text)
    assert not out.exists()


def test_marker_is_required_before_anything_is_deleted(tmp_path):
    """The marker alone does not make a folder deletable when it lists what lpq wrote."""
    out = tmp_path / "run"
    with claim_output(out, fingerprint="a", command="lpq ptq"):
        (out / "report.md").write_text("lpq's")
    assert read_marker(out)["files"] == ["report.md"]
    (out / "mine.txt").write_text("user")
    with pytest.raises(ValueError, match=r"holds files lpq did not write \(mine.txt\)"):
        claim_output(out, fingerprint="b", command="lpq ptq", force=True)
    # Continuing the same recipe keeps the user's file and never counts it as lpq's.
    with claim_output(out, fingerprint="a", command="lpq ptq") as run:
        assert run.state == "continued"
    assert read_marker(out)["foreign"] == ["mine.txt"] and (out / "mine.txt").read_text() == "user"
    (out / "mine.txt").unlink()
    with claim_output(out, fingerprint="b", command="lpq ptq", force=True) as run:
        assert run.state == "replaced" and sorted(p.name for p in out.iterdir()) == [MARKER]


@pytest.mark.slow   # two exports in two processes at once
def test_two_exports_into_one_folder_at_once_one_wins(tmp_path):
    """Whichever order the two runs take the lock in, exactly one writes the folder; the other says why."""
    from tests.cli.helpers import OFFLINE

    for kind in ("packed", "fake"):
        (tmp_path / f"{kind}.yaml").write_text(RECIPE.replace("kind: packed", f"kind: {kind}"))
    env = {k: v for k, v in os.environ.items() if k != HELD_ENV} | OFFLINE
    procs = [subprocess.Popen([sys.executable, "-m", "lpq.cli", "export", "--config", str(tmp_path / f"{kind}.yaml"),
                               "--out", str(tmp_path / "out")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for kind in ("packed", "fake")]
    results = [(p.wait(timeout=300), p.stdout.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    lost = max(results)[1]
    assert "is in use by another lpq run" in lost or "holds the output of an earlier lpq run" in lost
    kind = json.loads((tmp_path / "out" / "lpq_export.json").read_text())["kind"]
    assert results[("packed", "fake").index(kind)][0] == 0                  # the folder is the winner's, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.yaml", "out", "packed.yaml"]


@pytest.mark.parametrize("args, message", [
    (["--set", "nosuch.key=1"], "error: --set nosuch.key: unknown key 'nosuch'; allowed at the top level"),
    (["--set", "train.seed=-1"], "error: --set train.seed: 'train': seed must be in [0, 2**32), got -1"),
    (["-n", "0"], "error: --num-processes must be >= 1, got 0"),     # was the recipe's count, silently
    # the data files are read and parsed before the folder is claimed and the model loads
    (["--set", "data.paths=[{tmp}/missing.txt]"], "error: data.paths: {tmp}/missing.txt does not exist"),
    (["--set", "data.paths=[{tmp}/bad.jsonl]"], "error: {tmp}/bad.jsonl:2: record has no string field 'text'"),
    (["--set", "eval={{tasks: [wikitext2], data_dir: {tmp}/none}}"],
     "error: data folder {tmp}/none (--data-dir, eval.data_dir or $LPQ_DATA_DIR) does not exist"),
])
def test_bad_train_options_are_named_before_any_folder(tmp_path, args, message):
    out = tmp_path / "run"
    (tmp_path / "bad.jsonl").write_text('{"text": "a b c"}\n{"txt": "d"}\n')
    args = [a.format(tmp=tmp_path) for a in args]
    code, text = lpq("train", "--config", _train_recipe(tmp_path, out), *args)
    assert code == 2 and error_line(text).startswith(message.format(tmp=tmp_path)), text
    assert not out.exists()
