"""Interrupted runs resume to the uninterrupted result; Ctrl-C handling; progress files."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch

from circuits.errors import OptionError
from circuits.methods import run_method
from circuits.progress import Checkpoint, check_interrupt, interrupted, sigint_handler
from circuits.setup import Setup
from circuits.testing import make_batch, tiny_gpt2

RUN = {"command": "test", "seed": 0}


def make_setup(n_batches: int = 3, checkpoint: Checkpoint | None = None) -> Setup:
    """A fresh tiny GPT-2 with weights large enough that many edges matter, and `n_batches`
    batches of random prompts (the same on every call)."""
    model = tiny_gpt2(n_layer=2, n_head=2, n_embd=16, vocab_size=24, seed=1,
                      initializer_range=0.2)
    batches = [make_batch(b=3 - i % 2, p=5, vocab=24, seed=i) for i in range(n_batches)]
    setup = Setup(model, batches, "logit-diff")
    setup.checkpoint = checkpoint
    return setup


def sigint_after(monkeypatch, writes: int) -> list[int]:
    """Make the process send itself a real SIGINT right after the `writes`-th progress write;
    returns the list that counts the writes."""
    done: list[int] = []
    save = Checkpoint.save

    def save_then_interrupt(self, name, tensors, state, force=False):
        save(self, name, tensors, state, force)
        done.append(1)
        if len(done) == writes:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises KeyboardInterrupt before this ends

    monkeypatch.setattr(Checkpoint, "save", save_then_interrupt)
    return done


def interrupted_then_resumed(tmp_path, monkeypatch, method: str, writes: int, n_batches: int = 3,
                             **options):
    """Run `method` with progress kept, stopped by Ctrl-C after `writes` writes, then resumed
    on a fresh setup; returns the resumed scores and the progress state left by the stop."""
    setup = make_setup(n_batches, Checkpoint(tmp_path, RUN, every=0))
    sigint_after(monkeypatch, writes)
    with pytest.raises(KeyboardInterrupt), sigint_handler():
        run_method(method, setup, **options)
    assert interrupted()
    monkeypatch.undo()
    left = Checkpoint(tmp_path, RUN, resume=True).load(method)
    assert left is not None
    resumed = run_method(method, make_setup(n_batches, Checkpoint(tmp_path, RUN, resume=True)),
                         **options)
    return resumed, left[1]


# -- methods resume bit for bit ------------------------------------------------------------------
def test_acdc_resumes_to_the_same_circuit_and_scores(tmp_path, monkeypatch):
    full = run_method("acdc", make_setup(2), threshold=2e-3)
    resumed, left = interrupted_then_resumed(tmp_path, monkeypatch, "acdc", 3, n_batches=2,
                                             threshold=2e-3)
    assert left["position"] == 3  # stopped after logits, m1 and a1.h1<v>
    assert torch.equal(resumed.values, full.values)
    assert torch.equal(resumed.extra["kept"], full.extra["kept"])
    assert resumed.extra["visits"] == full.extra["visits"]
    summary, done = resumed.extra["summary"], full.extra["summary"]
    assert summary["final_loss"] == done["final_loss"]
    assert summary["initial_loss"] == done["initial_loss"]
    # the three destinations done before the stop were not evaluated again
    assert 0 < summary["forwards_this_run"] < done["forwards_this_run"]


def test_exact_resumes_to_the_same_scores(tmp_path, monkeypatch):
    full = run_method("exact", make_setup())
    resumed, left = interrupted_then_resumed(tmp_path, monkeypatch, "exact", 1)
    assert left["done"] == 1
    assert torch.equal(resumed.values, full.values)


@pytest.mark.parametrize("method", ["eap-ig", "eap-ig-stages", "eap-ig-activations"])
def test_eap_ig_resumes_to_the_same_scores(tmp_path, monkeypatch, method):
    full = run_method(method, make_setup(), steps=2)
    resumed, left = interrupted_then_resumed(tmp_path, monkeypatch, method, 2, steps=2)
    assert left["done"] == 2
    assert torch.equal(resumed.values, full.values)


def test_finished_progress_returns_without_recomputing(tmp_path, monkeypatch):
    first = run_method("exact", make_setup(checkpoint=Checkpoint(tmp_path, RUN, every=1e9)))
    # throttled, but the last batch is always written: nothing is left to do on resume
    setup = make_setup(checkpoint=Checkpoint(tmp_path, RUN, resume=True))

    def no_work(*args, **kwargs):
        raise AssertionError("a finished run was computed again")

    monkeypatch.setattr(setup.engine, "edge_effects", no_work)
    assert torch.equal(run_method("exact", setup).values, first.values)


def test_other_options_are_refused_on_resume(tmp_path):
    run_method("eap-ig", make_setup(checkpoint=Checkpoint(tmp_path, RUN, every=0)), steps=2)
    setup = make_setup(checkpoint=Checkpoint(tmp_path, RUN, resume=True))
    with pytest.raises(OptionError,
                       match=r"eap-ig progress .*\(differs in options.steps\).*--resume"):
        run_method("eap-ig", setup, steps=3)
    with pytest.raises(OptionError, match="differs in batch_sizes"):
        run_method("eap-ig", make_setup(2, Checkpoint(tmp_path, RUN, resume=True)), steps=2)


@pytest.mark.parametrize("method", ["acdc", "exact", "eap-ig"])
@pytest.mark.parametrize(("change", "field"), [("dtype", "dtype"), ("weights", "model")])
def test_progress_of_other_weights_or_dtype_is_refused(tmp_path, method, change, field):
    """The progress key holds the weights' fingerprint and the dtype: a folder's progress made
    on other weights (one weight moved) or in another dtype is refused on resume, however
    little the folder's own run description says."""
    options = {"acdc": {"threshold": 2e-3}, "exact": {}, "eap-ig": {"steps": 2}}[method]
    run_method(method, make_setup(2, Checkpoint(tmp_path, RUN, every=0)), **options)
    other = make_setup(2, Checkpoint(tmp_path, RUN, resume=True))
    if change == "dtype":
        other.model.hf.double()
    else:
        with torch.no_grad():
            other.model.hf.transformer.wte.weight[0, 0] += 1.0
    with pytest.raises(OptionError, match=rf"progress .*\(differs in {field}\).*--resume"):
        run_method(method, other, **options)
    # the same weights in the same dtype resume it
    run_method(method, make_setup(2, Checkpoint(tmp_path, RUN, resume=True)), **options)


def test_no_checkpoint_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_method("acdc", make_setup(), threshold=2e-3)
    run_method("exact", make_setup())
    assert list(tmp_path.iterdir()) == []


# -- Ctrl-C ---------------------------------------------------------------------------------------
def test_sigint_raises_at_once_and_is_recorded():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), sigint_handler():
        assert not interrupted()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    assert interrupted()  # stays set after the block, for the caller's exit status
    check_interrupt()  # outside a block: nothing to stop
    assert signal.getsignal(signal.SIGINT) is before
    with sigint_handler():  # a new block starts with a clear record
        assert not interrupted()


def test_a_swallowed_ctrl_c_stops_at_the_next_safe_point(monkeypatch):
    setup = make_setup()
    effects = setup.engine.edge_effects
    calls = []

    def swallowing(*args, **kwargs):
        calls.append(1)
        try:  # a library that catches every exception, around a Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except BaseException:
            pass
        return effects(*args, **kwargs)

    monkeypatch.setattr(setup.engine, "edge_effects", swallowing)
    with pytest.raises(KeyboardInterrupt), sigint_handler():
        run_method("exact", setup)
    assert calls == [1]  # stopped before the second batch (Setup.items checks)


class _Finalized:
    """An object whose finalizer receives the Ctrl-C (Python can only report it there)."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)


def test_a_ctrl_c_in_a_finalizer_is_not_reported_but_still_stops(capfd):
    with pytest.raises(KeyboardInterrupt), sigint_handler():
        _Finalized()  # dropped at once: the KeyboardInterrupt is raised inside __del__
        assert interrupted()
        check_interrupt()
    assert "Exception ignored" not in capfd.readouterr().err


def test_the_handler_is_left_alone_outside_the_main_thread():
    import threading

    seen = []

    def run() -> None:
        with sigint_handler():
            seen.append(signal.getsignal(signal.SIGINT))

    before = signal.getsignal(signal.SIGINT)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == [before]


# -- the progress files ---------------------------------------------------------------------------
def test_save_load_round_trip_is_exact(tmp_path):
    ck = Checkpoint(tmp_path / "p", RUN, every=0)
    values = {"scores": torch.randn(3, 4, dtype=torch.float64), "mask": torch.rand(3, 4) > 0.5,
              "half": torch.randn(5).to(torch.bfloat16)}
    state = {"loss": 0.1 + 0.2, "visits": [{"name": "m0", "kept": 2}], "tiny": 5e-324}
    ck.save("part", values, state)
    tensors, back = Checkpoint(tmp_path / "p", RUN, resume=True).load("part")
    assert back == state
    assert all(torch.equal(tensors[k], v) and tensors[k].dtype == v.dtype
               for k, v in values.items())
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["part.safetensors", "run.json"]
    assert json.loads((tmp_path / "p" / "run.json").read_text())["run"] == RUN


def test_another_run_is_refused_naming_the_field(tmp_path):
    Checkpoint(tmp_path, {"method": "acdc", "options": {"threshold": 0.1}}, every=0).save(
        "acdc", {}, {})
    with pytest.raises(OptionError, match=r"differs in options.threshold \(there 0.1, now 0.2\)"
                                          r"; drop --resume to start over"):
        Checkpoint(tmp_path, {"method": "acdc", "options": {"threshold": 0.2}}, resume=True)
    with pytest.raises(OptionError, match="differs in method"):
        Checkpoint(tmp_path, {"method": "exact", "options": {"threshold": 0.1}}, resume=True)
    # without --resume a different run is fine: the old progress is dropped at the first save
    ck = Checkpoint(tmp_path, {"method": "exact"}, every=0)
    assert ck.load("acdc") is None
    ck.save("exact", {}, {"done": 1})
    assert not (tmp_path / "acdc.safetensors").exists()
    assert Checkpoint(tmp_path, {"method": "exact"}, resume=True).load("exact")[1] == {"done": 1}


def test_resume_with_nothing_there_starts_fresh(tmp_path):
    ck = Checkpoint(tmp_path / "none", RUN, resume=True)
    assert ck.load("acdc") is None
    assert not (tmp_path / "none").exists()  # nothing is created before the first save


def test_saves_are_throttled_unless_forced(tmp_path):
    ck = Checkpoint(tmp_path, RUN, every=3600)
    ck.save("x", {}, {"step": 1})  # the first save is written at once
    ck.save("x", {}, {"step": 2})
    assert ck.load("x")[1] == {"step": 1}
    ck.save("x", {}, {"step": 3}, force=True)
    assert ck.load("x")[1] == {"step": 3}


def test_finish_deletes_the_progress_only(tmp_path):
    ck = Checkpoint(tmp_path / "p", RUN, every=0)
    ck.save("a", {"t": torch.ones(2)}, {})
    ck.finish()
    assert not (tmp_path / "p").exists()
    ck.save("a", {"t": torch.ones(2)}, {})
    (tmp_path / "p" / "notes.txt").write_text("mine")
    ck.finish()
    assert [p.name for p in (tmp_path / "p").iterdir()] == ["notes.txt"]


def test_only_progress_files_are_ever_deleted(tmp_path):
    """A folder of the user's, with weights in safetensors and files of their own."""
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    (tmp_path / ".draft.tmp").write_text("mine")
    ck = Checkpoint(tmp_path, RUN, every=0)
    ck.save("acdc", {}, {})  # discards old progress: there is none
    ck.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".draft.tmp", "model.safetensors"]
    (tmp_path / "run.json").write_text('{"epochs": 3}')
    with pytest.raises(OptionError, match="not progress of circuits; keep the progress in"):
        Checkpoint(tmp_path, RUN).save("acdc", {}, {})
    assert (tmp_path / "run.json").read_text() == '{"epochs": 3}'


def test_save_is_a_safe_point(tmp_path):
    ck = Checkpoint(tmp_path, RUN, every=0)
    ck.save("a", {}, {"step": 1})
    with pytest.raises(KeyboardInterrupt), sigint_handler():
        try:  # swallowed somewhere
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            pass
        ck.save("a", {}, {"step": 2})
    assert ck.load("a")[1] == {"step": 1}  # nothing written after the Ctrl-C


def test_a_crash_while_writing_keeps_the_previous_file(tmp_path):
    ck = Checkpoint(tmp_path, RUN, every=0)
    ck.save("acdc", {"t": torch.zeros(3)}, {"position": 4})
    # killed in the middle of the next write: a half temporary file next to the good one
    half = (tmp_path / "acdc.safetensors").read_bytes()[:40]
    (tmp_path / ".acdc.safetensors.x1y2.tmp").write_bytes(half)
    again = Checkpoint(tmp_path, RUN, resume=True, every=0)
    assert again.load("acdc")[1] == {"position": 4}
    again.save("acdc", {"t": torch.ones(3)}, {"position": 5})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acdc.safetensors", "run.json"]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "other-run"])
def test_a_damaged_progress_file_restarts_cleanly(tmp_path, damage, caplog):
    full = run_method("exact", make_setup())
    run_method("exact", make_setup(checkpoint=Checkpoint(tmp_path, RUN, every=0)))
    path = tmp_path / "exact.safetensors"
    data = path.read_bytes()
    if damage == "other-run":  # the file of another run, copied in
        other = tmp_path / "other"
        # all batches done with zero sums: taken, it would give zero scores
        Checkpoint(other, {"command": "other"}, every=0).save(
            "exact", {"total": torch.zeros_like(full.values)}, {"done": 3})
        data = (other / "exact.safetensors").read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00not it" * 9,
                      "empty": b"", "other-run": data}[damage])
    (tmp_path / "run.json").write_text('{"format": "circuits.pro')  # torn as well
    resumed = run_method("exact", make_setup(checkpoint=Checkpoint(tmp_path, RUN, resume=True)))
    assert torch.equal(resumed.values, full.values)


def test_run_must_be_json(tmp_path):
    with pytest.raises(OptionError, match="plain JSON"):
        Checkpoint(tmp_path, {"model": object()})
    with pytest.raises(OptionError, match="every"):
        Checkpoint(tmp_path, RUN, every=-1)


def test_names_are_checked(tmp_path):
    with pytest.raises(ValueError, match="progress name"):
        Checkpoint(tmp_path, RUN).save("../escape", {}, {})
