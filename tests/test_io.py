import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from diffmodels.core.checkpoint import (
    FORMAT,
    join_tensors,
    load_checkpoint,
    load_module_state,
    save_checkpoint,
    split_tensors,
)
from diffmodels.core.errors import CheckpointError
from diffmodels.core.io import atomic_dir, atomic_path, write_json, write_text


def test_write_json_is_sorted_and_rejects_nan(tmp_path):
    path = tmp_path / "m.json"
    write_json(path, {"b": 1, "a": 2})
    assert path.read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    with pytest.raises(ValueError):
        write_json(path, {"x": float("nan")})
    assert json.loads(path.read_text()) == {"a": 2, "b": 1}, "failed write kept the old file"
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"], "no temporary file left behind"


def test_exception_mid_write_leaves_old_file_intact(tmp_path):
    path = tmp_path / "out.txt"
    write_text(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half of the new cont")
            raise RuntimeError("crash")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_sigkill_mid_write_leaves_old_file_intact(tmp_path):
    """A process killed while writing leaves the previous file, byte for byte."""
    path = tmp_path / "weights.bin"
    write_text(path, "old contents")
    script = textwrap.dedent(
        f"""
        import os, sys, time
        from diffmodels.core.io import atomic_path
        with atomic_path({str(path)!r}) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(b"new" * 1000)
                fh.flush()
                print("writing", flush=True)
                time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert path.read_text() == "old contents"


def test_atomic_dir_replaces_whole_directory(tmp_path):
    target = tmp_path / "prepared"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(KeyError):
        with atomic_dir(target) as tmp:
            (tmp / "b.txt").write_text("partial")
            raise KeyError("crash")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"], "failed build left the old directory"
    with atomic_dir(target) as tmp:
        (tmp / "c.txt").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c.txt"], "old contents fully replaced"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"], "no temporaries left"


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def test_checkpoint_round_trip_with_optimizer_state(tmp_path):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    skeleton, opt_tensors = split_tensors(opt.state_dict(), "optimizer")
    meta = {"config": {"width": 4}, "step": 7, "optimizer": skeleton}
    tensors = {**{f"model/{k}": v for k, v in model.state_dict().items()}, **opt_tensors}
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, tensors, meta)

    ckpt = load_checkpoint(path)
    assert ckpt.meta["step"] == 7 and ckpt.meta["config"] == {"width": 4}
    restored = make_model()
    with torch.no_grad():
        for p in restored.parameters():
            p.zero_()
    load_module_state(restored, {k[6:]: v for k, v in ckpt.tensors.items() if k.startswith("model/")}, path)
    for a, b in zip(model.state_dict().values(), restored.state_dict().values()):
        assert torch.equal(a, b)

    opt2 = torch.optim.AdamW(restored.parameters(), lr=1e-3)
    opt2.load_state_dict(join_tensors(ckpt.meta["optimizer"], ckpt.tensors))
    state, state2 = opt.state_dict(), opt2.state_dict()
    assert state2["param_groups"][0]["betas"] == (0.9, 0.99)
    assert set(state2["state"]) == set(state["state"]) == {0, 1, 2, 3}
    for idx in state["state"]:
        for key, value in state["state"][idx].items():
            assert torch.equal(value, state2["state"][idx][key])


def test_checkpoint_shares_no_storage_problem(tmp_path):
    weight = torch.randn(4, 4)
    save_checkpoint(tmp_path / "tied.safetensors", {"a": weight, "b": weight, "view": weight[0]}, {})
    ckpt = load_checkpoint(tmp_path / "tied.safetensors")
    assert torch.equal(ckpt.tensors["b"], weight) and torch.equal(ckpt.tensors["view"], weight[0])


def test_malformed_checkpoints_give_one_clear_line(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, {"w": torch.ones(1000)}, {"step": 1})
    data = path.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 7)
    pickle_file = tmp_path / "evil.safetensors"
    pickle_file.write_bytes(b"\x80\x04\x95" + os.urandom(64))
    for bad in (truncated, garbage, pickle_file):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(bad)
        message = str(info.value)
        assert message.startswith(f"{bad}: not a readable safetensors checkpoint")
        assert "\n" not in message

    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a diffmodels checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_load_module_state_lists_mismatches_in_one_line(tmp_path):
    model = make_model()
    state = dict(model.state_dict())
    state.pop("0.bias")
    state["extra.weight"] = torch.zeros(1)
    state["2.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError) as info:
        load_module_state(model, state, "ckpt.safetensors")
    msg = str(info.value)
    assert "1 missing (0.bias)" in msg and "1 unexpected (extra.weight)" in msg
    assert "1 wrong shape (2.weight (3, 3) vs (2, 4))" in msg
    assert "\n" not in msg


def test_checkpoints_of_equal_contents_are_byte_identical_across_processes(tmp_path):
    """DVC hashes outs: identical weights must give identical files, whichever process wrote them."""
    code = ("import sys, torch; from diffmodels.core.checkpoint import save_checkpoint; "
            "save_checkpoint(sys.argv[1], {'w': torch.arange(4.0), 'b': torch.ones(2)}, {'step': 3, 'cfg': {'a': 1, 'b': [2]}})")
    digests = set()
    for i in range(4):  # safetensors' metadata order varies with each process's hash seed
        path = tmp_path / f"{i}.safetensors"
        subprocess.run([sys.executable, "-c", code, str(path)], check=True, env={**os.environ, "PYTHONHASHSEED": str(i)})
        digests.add(path.read_bytes())
    assert len(digests) == 1


def test_checkpoints_in_the_earlier_two_key_layout_still_load(tmp_path):
    metadata = {"format": FORMAT, "meta": json.dumps({"step": 5})}
    save_file({"w": torch.zeros(2)}, str(tmp_path / "old.safetensors"), metadata=metadata)
    assert load_checkpoint(tmp_path / "old.safetensors").meta == {"step": 5}


def test_progress_logs_a_line_every_few_percent_when_not_a_terminal():
    import io

    from diffmodels.core.progress import progress

    stream = io.StringIO()  # not a TTY, as under `dvc repro > log`
    ticks = iter(range(0, 10_000, 3))  # a clock advancing 3 s per reading: slower than min_interval_s
    items = progress(range(100), desc="train", unit="step", stream=stream, clock=lambda: next(ticks))
    assert list(items) == list(range(100))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 20  # every 5 %
    assert lines[0].startswith("train: 5/100 step (5%") and lines[-1].startswith("train: 100/100 step (100%")
    assert "\r" not in stream.getvalue()
    quiet = io.StringIO()
    assert list(progress(range(3), stream=quiet, enabled=False)) == [0, 1, 2] and quiet.getvalue() == ""
    fast = io.StringIO()  # a loop over in a blink says nothing (real clock, min_interval_s = 2)
    assert list(progress(range(50), stream=fast)) == list(range(50)) and fast.getvalue() == ""


def test_progress_lines_are_at_least_min_interval_apart():
    import io

    from diffmodels.core.progress import progress

    stream = io.StringIO()
    ticks = iter([0.5 * i for i in range(1000)])  # 0.5 s per clock reading
    list(progress(range(100), desc="x", stream=stream, min_interval_s=4.0, clock=lambda: next(ticks)))
    lines = stream.getvalue().splitlines()
    assert 3 <= len(lines) < 20 and lines[-1].startswith("x: 100/100")


def test_progress_resumed_bar_counts_from_its_start():
    import io

    from diffmodels.core.progress import progress_bar

    stream = io.StringIO()
    ticks = iter(range(0, 1000, 5))
    bar = progress_bar(10, "train", "step", initial=6, stream=stream, clock=lambda: next(ticks))
    for _ in range(4):
        bar.update()
    bar.close()
    assert [line.split(" (")[0] for line in stream.getvalue().splitlines()] == [
        "train: 7/10 step", "train: 8/10 step", "train: 9/10 step", "train: 10/10 step"]
