"""evaluate.degenerate_model: collapsed models are named, weak but honest ones are not.

Each case is written out as the histogram of predicted classes over 500 test images (50 per
class) and the number classified correctly; `_predictions` builds arrays with exactly those.
"""

import numpy as np
import pytest

from gfa_jax import evaluate


def _predictions(counts, correct, per_class=50):
  """(predictions, labels): balanced labels, predictions with histogram `counts` of which
  exactly `correct` are right (each class's share of them about its share of predictions)."""
  counts = np.asarray(counts)
  k = len(counts)
  labels = np.repeat(np.arange(k), per_class)
  hits = np.minimum(counts * correct // counts.sum(), per_class)
  for c in np.argsort(-counts, kind="stable"):  # the rounding's remainder, largest classes first
    hits[c] += min(correct - hits.sum(), min(counts[c], per_class) - hits[c])
  predictions = np.where(np.arange(len(labels)) % per_class < hits[labels], labels, -1)
  left = counts - hits
  # The wrong ones: pair a prediction of one class with a label of another, always from the
  # class with most of both left (which keeps a pairing of the rest possible).
  slots = {c: list(np.flatnonzero((predictions < 0) & (labels == c))) for c in range(k)}
  free = np.array([len(slots[c]) for c in range(k)])
  others = lambda c, have: np.where((np.arange(k) != c) & (have > 0), free + left, -1).argmax()
  for _ in range(free.sum()):
    c = int((free + left).argmax())
    predicted, label = (c, others(c, free)) if left[c] else (others(c, left), c)
    predictions[slots[label].pop()] = predicted
    left[predicted] -= 1
    free[label] -= 1
  assert (left == 0).all() and (predictions == labels).sum() == correct  # the case as written
  return predictions, labels


COLLAPSED = {
    # `make quickstart`'s GFA-DEEP model (150 steps): 2 of 10 classes at 14.4 %, 3.3 standard
    # errors above chance, which one class >= 90 % or accuracy <= 1.2x chance both missed.
    "two classes": ([205, 0, 0, 295, 0, 0, 0, 0, 0, 0], 72),
    "three classes": ([183, 0, 0, 254, 0, 0, 0, 0, 63, 0], 97),  # the same at 60 steps
    "constant": ([0, 0, 0, 500, 0, 0, 0, 0, 0, 0], 50),
    # Every class predicted, but two of them for 92 % of the images.
    "two classes and a tail": ([240, 5, 5, 220, 5, 5, 5, 5, 5, 5], 60),
}
AT_CHANCE = {
    # Every class, evenly, but no better than guessing.
    "uniform guesses": ([55, 45, 52, 48, 50, 50, 47, 53, 49, 51], 52),
    "uneven guesses": ([120, 30, 40, 60, 50, 20, 70, 30, 40, 40], 58),
}
HONEST = {
    # A standard SmallCNN after about one epoch: weak, every class predicted.
    "one epoch": ([80, 30, 60, 20, 45, 25, 90, 50, 70, 30], 150),
    # Weak and biased towards a few classes, yet far above chance.
    "biased": ([150, 10, 90, 5, 25, 5, 120, 20, 60, 15], 130),
    "trained": ([52, 48, 50, 49, 51, 50, 50, 50, 50, 50], 410),
}


@pytest.mark.parametrize("name", COLLAPSED)
def test_collapsed_models_are_named(name):
  counts, correct = COLLAPSED[name]
  message = evaluate.degenerate_model(*_predictions(counts, correct), num_classes=10)
  top = int(np.argmax(counts))
  assert message is not None and message.startswith(
      f"collapsed: predicts class {top} for {round(100 * max(counts) / 500)} % of inputs")
  assert f"clean accuracy {100 * correct / 500:.1f} % on 500 examples" in message


def test_the_quickstart_model_is_named_for_its_few_classes_not_its_accuracy():
  message = evaluate.degenerate_model(*_predictions(*COLLAPSED["two classes"]), num_classes=10)
  assert "class 3 for 59 % of inputs, class 0 for 41 % (2 of 10 classes, 2.0 effective)" in message
  assert "few classes (entropy 0.29" in message
  assert "accuracy at chance" not in message  # 14.4 % on 500 images is above chance


@pytest.mark.parametrize("name", AT_CHANCE)
def test_accuracy_within_noise_of_chance_is_named(name):
  counts, correct = AT_CHANCE[name]
  message = evaluate.degenerate_model(*_predictions(counts, correct), num_classes=10)
  assert message is not None and message.startswith("at chance: ")
  assert message.endswith('(docs/results.md, "collapse")')


@pytest.mark.parametrize("name", HONEST)
def test_weak_but_honest_models_are_not_flagged(name):
  counts, correct = HONEST[name]
  assert evaluate.degenerate_model(*_predictions(counts, correct), num_classes=10) is None


def test_chance_grows_with_the_number_of_examples():
  # 14 % correct, every class predicted: within noise of 10 % on 100 images (z 1.3), not on
  # 5,000 (z 9.4), where the same accuracy is a (weak) model that learnt something.
  counts = np.array([12, 8, 10, 10, 10, 10, 10, 10, 10, 10])
  small = evaluate.degenerate_model(*_predictions(counts, 14, per_class=10), num_classes=10)
  large = evaluate.degenerate_model(*_predictions(50 * counts, 700, per_class=500),
                                    num_classes=10)
  assert small.startswith("at chance") and large is None


def test_chance_is_that_of_predictions_ignoring_the_image():
  # Labels 90 % class 0: a model answering 0 for every image scores 90 % and is collapsed.
  labels = np.array([0] * 450 + list(range(1, 10)) * 5 + [1] * 5)
  message = evaluate.degenerate_model(np.zeros(500, int), labels, num_classes=10)
  assert message.startswith("collapsed: predicts class 0 for 100 %")
  assert "chance 90.0 %" in message and "accuracy at chance" in message


def test_no_predictions_no_verdict():
  assert evaluate.degenerate_model(np.zeros(0, int), np.zeros(0, int), num_classes=10) is None
