"""Multi-process training on CPU (gloo): 2 ranks really run, only rank 0 writes, losses match 1 process;
a 2-process checkpoint resumes on 2 processes and on 1, and a checkpoint the strategy cannot read is refused."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from ci_helpers import adapter_tensors, free_port, max_abs_diff, popen_ftkit, read_jsonl, recipe
from conftest import CHAT_ROWS, ftkit

# Same global batch (4) either way: 1 process x 4 rows, or 2 processes x 2 rows.
TRAIN = {"max_steps": 3, "learning_rate": 1e-3, "seed": 3, "save_steps": 2}  # checkpoint-2 to resume from
OUTPUT = {"keep_checkpoints": True, "samples": 0}  # no sample replies: nothing here reads them, and they cost time
METHOD = {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0}  # dropout draws differ per rank
# fp32 on every CPU: a batch of 4 and two of 2 round differently in bf16 (~1e-3), which would hide
# what this compares (data order and gradient averaging) behind a loose tolerance.
MODEL = {"dtype": "float32"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("ddp")
    data = tmp / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHAT_ROWS))
    one = recipe(tmp / "one.yaml", tiny_model, data, train={**TRAIN, "batch_size": 4}, method=METHOD,
                 model=MODEL, output={"dir": str(tmp / "one"), **OUTPUT})
    two = recipe(tmp / "two.yaml", tiny_model, data, train={**TRAIN, "batch_size": 2}, method=METHOD,
                 model=MODEL, output={"dir": str(tmp / "two"), **OUTPUT})
    res_one = ftkit("sft", str(one))
    assert res_one.returncode == 0, res_one.stderr
    res_two = ftkit("sft", str(two), "--num-processes", "2", "--json", "--fail-if", "world_size < 2")
    return tmp, res_one, res_two, data


def test_two_processes_really_run_and_complete(runs):
    tmp, _, res, _ = runs
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["status"] == "ok"
    m = json.loads((tmp / "two" / "metrics.json").read_text())
    assert m["world_size"] == 2, "the run must not silently fall back to one process"
    assert m["distributed"] == "ddp" and m["global_batch_size"] == 4 and m["steps"] == 3


def test_only_rank0_writes(runs):
    tmp, _, res, _ = runs
    run = tmp / "two"
    assert sorted(p.name for p in tmp.iterdir() if p.name.startswith("two")) == ["two", "two.yaml"]
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [1, 2, 3], "one log line per step, not one per rank"
    assert res.stderr.count("done in") == 1 and res.stderr.count("trainable params") == 1
    one = {p.name for p in (tmp / "one").iterdir()}
    assert {p.name for p in run.iterdir()} == one


def test_losses_match_single_process(runs):
    tmp, _, _, _ = runs
    l1 = [r["loss"] for r in read_jsonl(tmp / "one" / "metrics.jsonl") if r["kind"] == "train"]
    l2 = [r["loss"] for r in read_jsonl(tmp / "two" / "metrics.jsonl") if r["kind"] == "train"]
    assert len(l1) == len(l2) == 3
    assert l2 == pytest.approx(l1, rel=1e-4)
    # Same data order and averaged gradients: the adapters agree to float noise.
    assert max_abs_diff(adapter_tensors(tmp / "one"), adapter_tensors(tmp / "two")) < 1e-4


# Measured on this CPU (fp32): resumed on 2 processes vs the uninterrupted 2-process run 0.0, resumed on 1
# process 7.5e-9, one process vs two 1.5e-8; the bound leaves room for another CPU's summation order.
RESUME_TOL = 1e-6


def _resume(runs, tiny_model, name: str, batch: int, ckpt, *args: str):
    tmp, _, _, data = runs
    r = recipe(tmp / f"{name}.yaml", tiny_model, data, train={**TRAIN, "batch_size": batch}, method=METHOD,
               model=MODEL, output={"dir": str(tmp / name), "samples": 0})
    res = ftkit("sft", str(r), f"--resume={ckpt}", *args)
    assert res.returncode == 0, res.stderr
    m = json.loads((tmp / name / "metrics.json").read_text())
    assert m["resumed_from_step"] == 2 and m["steps"] == 3, "continued from the checkpoint's step to max_steps"
    assert [r["step"] for r in read_jsonl(tmp / name / "metrics.jsonl") if r["kind"] == "train"] == [3]
    return res, m


def test_two_nodes_resume_the_two_process_checkpoint(runs, tiny_model):
    """Two "nodes" (torchrun agents on 127.0.0.1, one process each, static rendezvous) continue the
    `-n 2` run's checkpoint-2: a resume on the same world size, through the multi-node launch."""
    tmp, _, _, data = runs
    r = recipe(tmp / "nodes.yaml", tiny_model, data, train={**TRAIN, "batch_size": 2}, method=METHOD, model=MODEL,
               output={"dir": str(tmp / "nodes"), "samples": 0})
    common = ("sft", str(r), "-n", "1", "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port",
              str(free_port()), f"--resume={tmp / 'two' / 'checkpoints' / 'checkpoint-2'}")
    node0 = popen_ftkit(*common, "--node-rank", "0", "--json")
    node1 = popen_ftkit(*common, "--node-rank", "1")
    out0, err0 = node0.communicate(timeout=600)
    out1, err1 = node1.communicate(timeout=600)
    assert node0.returncode == 0, err0
    assert node1.returncode == 0, err1
    # Every rank names itself; node 0 holds rank 0 and alone reports (and writes the run dir).
    assert re.search(r"rank 0 \(on .+, node 0, pid \d+\) of 2", err0)
    assert re.search(r"rank 1 \(on .+, node 1, pid \d+\) of 2", err1)
    assert json.loads(out0.strip().splitlines()[-1])["status"] == "ok" and out1.strip() == ""
    assert "done in" in err0 and "done in" not in err1
    m = json.loads((tmp / "nodes" / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["global_batch_size"] == 4
    assert m["resumed_from_step"] == 2 and m["steps"] == 3, "continued from the checkpoint's step to max_steps"
    assert "resuming a 2-process checkpoint" not in out0 + err0, "same world size: no note"
    for ref in ("two", "one"):  # the uninterrupted 2-process run, and one process with the same global batch
        diff = max_abs_diff(adapter_tensors(tmp / "nodes"), adapter_tensors(tmp / ref))
        assert diff <= RESUME_TOL, f"two nodes resumed vs uninterrupted {ref!r}: max abs diff {diff}"


def test_resume_a_two_process_checkpoint_on_one(runs, tiny_model):
    """DDP replicates the adapter and optimizer, so one process loads them; the Trainer skips batches by
    steps, so with the same global batch (1 x 4 = 2 x 2) the data continues where it was. No dropout here:
    the ranks' RNG files do not apply to one process (rng_state.pth is missing, the seeds start fresh)."""
    tmp = runs[0]
    res, m = _resume(runs, tiny_model, "again-on-1", 4, tmp / "two" / "checkpoints" / "checkpoint-2")
    assert m["world_size"] == 1
    assert "resuming a 2-process checkpoint on 1 process(es)" in res.stdout + res.stderr
    assert "the global batch is unchanged (4 rows)" in res.stdout + res.stderr
    diff = max_abs_diff(adapter_tensors(tmp / "again-on-1"), adapter_tensors(tmp / "two"))
    assert diff <= RESUME_TOL, f"2-process checkpoint resumed on 1 process vs uninterrupted: max abs diff {diff}"


def test_a_checkpoint_of_another_strategy_is_refused_before_loading(runs, tiny_model):
    tmp, _, _, data = runs
    fake = tmp / "fsdp-written" / "checkpoint-2"
    shutil.copytree(tmp / "two" / "checkpoints" / "checkpoint-2", fake)
    (fake / "pytorch_model_fsdp_0").mkdir()  # what accelerate's FSDP2 sharded save leaves
    r = recipe(tmp / "refused.yaml", tiny_model, data, output={"dir": str(tmp / "refused")})
    res = ftkit("sft", str(r), f"--resume={fake}")
    assert res.returncode == 2, res.stderr
    assert "--resume checkpoint-2 was written by 2 processes under FSDP, and this run uses DDP or one process" \
        in res.stderr and "Traceback" not in res.stderr
    assert "loading" not in res.stdout + res.stderr, "refused before the model loads"


@pytest.mark.parametrize("files, distributed, world, device, refused", [
    (["rng_state_0.pth", "rng_state_1.pth", "global_step2/"], "deepspeed", 4, "cuda",
     "DeepSpeed ZeRO's optimizer partitions are tied to the number of processes"),
    (["rng_state_0.pth", "rng_state_1.pth", "global_step2/"], "deepspeed", 2, "cuda", None),
    (["rng_state_0.pth", "rng_state_1.pth", "global_step2/"], "ddp", 2, "cuda", "under DeepSpeed, and this run uses DDP"),
    (["rng_state_0.pth", "rng_state_1.pth", "optimizer_0/"], "fsdp", 4, "cuda", None),  # DCP re-shards
    (["rng_state.pth"], "fsdp", 2, "cuda", "under DDP or one process, and this run uses FSDP"),
    (["rng_state.pth"], "fsdp", 2, "cpu", None),  # FSDP on CPU processes writes and reads plain checkpoints
    (["rng_state_0.pth", "rng_state_1.pth"], "ddp", 3, "cpu", None),
])
def test_what_each_strategy_resumes(tmp_path, tiny_model, chat_file, files, distributed, world, device, refused):
    from ftkit.distributed_resume import check_resume
    from ftkit.errors import UserError
    from ftkit.recipe import load_recipe

    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    for f in files:
        (ckpt / f.rstrip("/")).mkdir() if f.endswith("/") else (ckpt / f).write_bytes(b"")
    r = load_recipe(recipe(tmp_path / "r.yaml", tiny_model, chat_file, distributed=distributed))
    if refused is None:
        check_resume(r, ckpt, world, device)
    else:
        with pytest.raises(UserError, match=re.escape(refused)):
            check_resume(r, ckpt, world, device)
