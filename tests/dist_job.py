"""One torchrun job for tests/test_distributed.py: several checks under one process group.

``torchrun ... tests/dist_job.py PLAN.json``: PLAN holds ``report`` (a folder), ``library``
(whether to run the library checks first) and ``commands`` (``circuits`` command lines). Each
command runs through `circuits.cli.main` in the job, as ``torchrun -m circuits`` would run it;
every rank writes its status and what it printed to ``report/I.rank-R.json``. The job stops at
the first interrupted command and ends with the last command's status, like ``circuits`` does.
Starting torchrun and importing torch take seconds: one job for several checks saves them.
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import sys
from pathlib import Path

import torch

from circuits import Setup, cli, distributed, evaluate
from circuits.features.discovery import score_features
from circuits.features.runs import FeatureSet
from circuits.features.sae import SAE
from circuits.methods import get_method, run_method
from circuits.testing import make_batch, tiny_gpt2, tiny_model
from circuits.toys import induction_toy


def library_checks() -> dict:
    """What the ranks compute together through the library: each additive method's scores
    and a feature circuit's against the whole run in this process, ACDC, evaluation and
    `gather_rows`."""
    setup = Setup(tiny_gpt2(), [make_batch(b=3, vocab=32, seed=0),
                                make_batch(b=4, vocab=32, seed=1)], "logit-diff")
    diffs, passes = {}, {}
    for method in ("eap", "exact", "eap-ig", "path-patching"):
        with distributed.alone():  # the whole run, in this process
            out = get_method(method).fn(setup)
        whole = out[0] if isinstance(out, tuple) else out
        both = run_method(method, setup)  # each rank its share, then the sum
        diffs[method] = [float((both.values - whole).abs().max()), float(whole.abs().max())]
        passes[method] = [both.cost.forward, both.cost.backward]
    model, batches, _ = induction_toy(n=8)
    acdc = run_method("acdc", Setup(model, batches, "logit-diff"), threshold=0.1)
    passes["acdc"] = [acdc.cost.forward, acdc.cost.backward]
    found = evaluate(acdc.circuit, Setup(model, batches, "logit-diff", "mean")).as_dict()
    # feature circuits: the ranks add their shares of every score
    model = tiny_model("llama", vocab_size=40)
    setup = Setup(model, [make_batch(b=3, p=5, vocab=40, seed=0),
                          make_batch(b=2, p=5, vocab=40, seed=1)], "logit-diff")
    fs = FeatureSet.of(model, [SAE.init(32, 96, "relu", site=s, seed=i)
                               for i, s in enumerate(["resid.0", "resid.1"])])
    both = score_features(setup, fs, "eap-ig", steps=2, per_site=2)
    with distributed.alone():
        whole = score_features(setup, fs, "eap-ig", steps=2, per_site=2)
    features = {
        "names": [list(both.graph.sources), list(whole.graph.sources)],
        "diff": [float((both.values - whole.values).abs().max()),
                 float(whole.values.abs().max())],
        "exact": [both.extra["exact_node_scores"], whole.extra["exact_node_scores"]],
        "passes": [[both.cost.forward, both.cost.backward],
                   [whole.cost.forward, whole.cost.backward]]}
    rows = distributed.gather_rows(torch.arange(3.0) + 10 * distributed.rank())
    objects = distributed.gather_objects({"rank": distributed.rank()})
    with distributed.alone():
        alone = [distributed.world(), distributed.is_main(), distributed.all_sum(torch.ones(1))]
    return {"diffs": diffs, "rows": rows.tolist(), "acdc": acdc.values.tolist(),
            "kept": acdc.circuit.tolist(), "evaluation": found, "passes": passes,
            "objects": objects, "alone": [alone[0], alone[1], float(alone[2])],
            "features": features}


def main(plan_file: str) -> int:
    plan = json.loads(Path(plan_file).read_text())
    report = Path(plan["report"])
    torch.set_num_threads(1)
    status = 0
    with distributed.process_group():
        r = distributed.rank()
        if plan.get("library"):
            found = library_checks()
            (report / f"library.rank-{r}.json").write_text(json.dumps(found))
        # a rank with its status keeps it when torchrun's agent stops the job (inside a
        # command, its SIGTERM still stops the rank as interrupted)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for i, argv in enumerate(plan["commands"]):
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                status = cli.main(argv)
            said = {"status": status, "stdout": out.getvalue(), "stderr": err.getvalue()}
            (report / f"{i}.rank-{r}.json").write_text(json.dumps(said))
            if status == 130:
                break
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
