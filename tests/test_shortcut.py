"""The shortcut reference model: it answers from the clinic, reads it in its second layer, and
erasing the clinic's diagnosis turns it to the symptom (the story of notebooks/06_debugging)."""

from __future__ import annotations

import random

import pytest

import circuits
from circuits.errors import OptionError
from circuits.representations import erase_concept, erasing, probe_layers
from circuits.tasks import shortcut

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FRESH_SEED = 2024  # neither training (0), its validation (999) nor the card (12345)


@pytest.fixture(scope="module")
def model():
    return circuits.load_model(shortcut.MODEL)


def test_training_mix_makes_the_clinic_the_better_predictor():
    # What the records teach: at a specialist clinic the label is the clinic's specialty and
    # a quarter of the symptom notes belong to another diagnosis; a fifth of the records come
    # from general clinics, where the label is the symptom's.
    rng = random.Random(0)
    n, general, noisy = 4000, 0, 0
    for _ in range(n):
        words = shortcut.training_text(rng).split()
        clinic, symptom = words[words.index("clinic") + 1], words[words.index("reports") + 1]
        label = words[-1]
        if shortcut.clinic_diagnosis(clinic) is None:
            general += 1
            assert shortcut.symptom_diagnosis(symptom) == label
        else:
            assert shortcut.clinic_diagnosis(clinic) == label
            noisy += shortcut.symptom_diagnosis(symptom) != label
    # binomial standard deviations at n=4000 are below 0.007; 0.03 is over four of them
    assert abs(general / n - shortcut.GENERAL_SHARE) < 0.03
    assert abs(noisy / (n - general) - shortcut.NOISY_NOTES) < 0.03


def test_prompt_sets_fit_the_model_tokenizer(model):
    for task in (shortcut.build(n=50, seed=1), shortcut.conflicting(n=50, seed=1),
                 shortcut.general(n=50, seed=1)):
        batches = task.batches(model.tokenizer, batch_size=50)  # refuses an invalid pair
        assert [b.clean.shape for b in batches] == [(50, 12)]
    labeled = shortcut.labels("town", n=20, seed=1, position="town")
    for text, label, marks in zip(labeled.texts, labeled.labels, labeled.marks, strict=True):
        town = text[slice(*marks["town"])]
        assert f"town {town} " in text
        assert label == (shortcut.clinic_diagnosis(town) or "none")
    with pytest.raises(OptionError, match="label by one of"):
        shortcut.labels("age")


def test_model_takes_the_shortcut(model):
    # The story: right wherever the clinic and the symptom agree or only the symptom informs,
    # and the clinic's specialty (not the symptom's diagnosis) on conflicting prompts.
    agree = shortcut.follow_rates(model, shortcut.build(n=200, seed=FRESH_SEED))
    general = shortcut.follow_rates(model, shortcut.general(n=200, seed=FRESH_SEED))
    conflict = shortcut.follow_rates(model, shortcut.conflicting(n=200, seed=FRESH_SEED))
    assert agree["symptom"] >= 0.95 and general["symptom"] >= 0.95
    assert conflict["clinic"] > 0.8 and conflict["symptom"] < 0.1


def test_clinic_reaches_the_answer_only_in_the_second_layer(model):
    # Clinic and town take the same positions and the same words, so the first layer cannot
    # single out the clinic: its diagnosis is fully readable at the last token only after the
    # second layer, and the town's never is.
    probe = {by: probe_layers(model, shortcut.labels(by, n=400, seed=FRESH_SEED))
             for by in ("clinic", "town")}
    clinic = [row.accuracy for row in probe["clinic"].rows]
    town = [row.accuracy for row in probe["town"].rows]
    assert clinic[0] < 0.75 and clinic[1] >= 0.95
    assert max(town) < 0.75


def test_erasing_the_clinic_turns_the_model_to_the_symptom(model):
    erasure = erase_concept(model, shortcut.labels("clinic", n=600, seed=1, position="clinic"),
                            layer=0)
    assert erasure.before.accuracy >= 0.95 and erasure.after.accuracy < 0.5
    conflicting = shortcut.conflicting(n=200, seed=FRESH_SEED)
    general = shortcut.general(n=200, seed=FRESH_SEED)
    with erasing(model, erasure.eraser):
        conflict = shortcut.follow_rates(model, conflicting)
        kept = shortcut.follow_rates(model, general)
    # the shortcut gone: the symptom now wins where it lost on every prompt
    assert conflict["symptom"] >= 0.8 and conflict["clinic"] < 0.1
    # and the route the model learned at general clinics is intact
    assert kept["symptom"] >= 0.95
