"uas.metrics against scikit-learn where the definitions coincide, and against hand-computed values where they differ."
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn import metrics as skm

from uas.metrics import (as_scores_labels, average_views, class_report, confusion_matrix, evaluate,
                         mean_class_accuracy, per_class_recall, predict, ranked_classes, top_k_accuracy)


@pytest.fixture
def scored():
    "200 videos, 7 classes, continuous scores (no ties) from a weak classifier; class 6 never occurs but is predicted."
    rng = np.random.default_rng(19)
    labels = rng.choice(6, size=200, p=[0.5, 0.2, 0.1, 0.1, 0.05, 0.05])
    scores = rng.normal(size=(200, 7)) + 1.5 * np.eye(7)[labels]
    scores[:, 6] += 0.8  # the absent class 6 wins some videos
    assert (predict(scores) == 6).any() and set(labels) == set(range(6))
    return scores, labels


def test_top1_equals_sklearn_accuracy(scored):
    scores, labels = scored
    assert top_k_accuracy(scores, labels, topk=1) == pytest.approx(skm.accuracy_score(labels, scores.argmax(1)))


@pytest.mark.parametrize('k', [1, 2, 3, 5])
def test_topk_equals_sklearn_without_ties(scored, k):
    scores, labels = scored
    expected = skm.top_k_accuracy_score(labels, scores, k=k, labels=range(7))
    assert top_k_accuracy(scores, labels, topk=(k,))[0] == pytest.approx(expected)


def test_topk_returns_one_value_per_k(scored):
    scores, labels = scored
    accs = top_k_accuracy(scores, labels)
    assert len(accs) == 2 and accs[0] <= accs[1]
    assert top_k_accuracy(scores, labels, topk=(1, 5)) == [top_k_accuracy(scores, labels, 1), top_k_accuracy(scores, labels, 5)]


def test_ties_rank_the_higher_class_first():
    "[0.5, 0.5, 0] with label 0 is a top-1 miss: mmaction ranks tied scores by its argsort order, the higher class first."
    assert top_k_accuracy([[0.5, 0.5, 0.0]], [0], topk=(1, 2)) == [0.0, 1.0]
    assert top_k_accuracy([[0.5, 0.5, 0.0]], [1], topk=1) == 1.0


def test_tie_order_holds_for_many_classes():
    "400 equal scores (Kinetics-sized): the order is exactly 399, 398, ..., 0, whatever sort numpy would pick."
    ranked = ranked_classes(np.zeros((3, 400)), 400)
    assert (ranked == np.arange(399, -1, -1)).all()
    scores = np.zeros((1, 400)); scores[0, [17, 250]] = 1.0
    assert ranked_classes(scores, 3).tolist() == [[250, 17, 399]]
    assert top_k_accuracy(scores, [17], topk=(1, 2)) == [0.0, 1.0]


def test_k_beyond_the_classes_counts_every_class():
    assert top_k_accuracy([[0.2, 0.8], [0.9, 0.1]], [0, 0], topk=(1, 5)) == [0.5, 1.0]
    with pytest.raises(ValueError, match='>= 1'): top_k_accuracy([[0.2, 0.8]], [0], topk=(0,))


def test_mean_class_accuracy_true_equals_balanced_accuracy(scored):
    scores, labels = scored
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # sklearn warns that class 6 is predicted but absent
        expected = skm.balanced_accuracy_score(labels, scores.argmax(1))
    assert mean_class_accuracy(scores, labels, classes='true') == pytest.approx(expected)


def test_mean_class_accuracy_union_counts_predicted_absent_classes(scored):
    "'union' = the 'true' mean rescaled by #true / (#true + #predicted-only classes), the extra classes scoring 0."
    scores, labels = scored
    true_mean = mean_class_accuracy(scores, labels, classes='true')
    assert mean_class_accuracy(scores, labels) == pytest.approx(true_mean * 6 / 7)
    assert mean_class_accuracy(scores, labels) < true_mean


def test_mean_class_accuracy_by_hand():
    scores = np.eye(4)[[0, 2, 1, 1]]  # predictions 0, 2, 1, 1
    labels = [0, 0, 1, 1]
    assert mean_class_accuracy(scores, labels) == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert mean_class_accuracy(scores, labels, classes='true') == pytest.approx((0.5 + 1.0) / 2)
    recall = per_class_recall(scores, labels)
    assert recall[:2].tolist() == [0.5, 1.0] and np.isnan(recall[2:]).all()


def test_mean_class_accuracy_definitions_agree_without_stray_predictions():
    scores = np.eye(3)[[0, 1, 1, 2, 0]]
    labels = [0, 1, 2, 2, 0]
    assert mean_class_accuracy(scores, labels) == mean_class_accuracy(scores, labels, 'true') == pytest.approx((1 + 1 + 0.5) / 3)


def test_mean_class_accuracy_uses_argmax_on_ties():
    "mmaction's mean_class_accuracy predicts with np.argmax (lowest index wins a tie), unlike its top-k ranking."
    assert predict(np.array([[0.5, 0.5, 0.0]])).tolist() == [0]
    assert mean_class_accuracy([[0.5, 0.5, 0.0]], [0]) == 1.0


def test_mean_class_accuracy_rejects_unknown_definition():
    with pytest.raises(ValueError, match="'union' or 'true'"): mean_class_accuracy([[1.0, 0.0]], [0], classes='macro')


@pytest.mark.parametrize('normalize', [None, 'true', 'pred', 'all'])
def test_confusion_matrix_equals_sklearn(scored, normalize):
    scores, labels = scored
    expected = skm.confusion_matrix(labels, scores.argmax(1), labels=range(7), normalize=normalize)
    np.testing.assert_allclose(confusion_matrix(scores, labels, normalize=normalize), np.nan_to_num(expected))


def test_confusion_matrix_by_hand():
    cm = confusion_matrix(np.eye(4)[[0, 2, 1, 1]], [0, 0, 1, 1])
    assert cm.tolist() == [[1, 0, 1, 0], [0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    with pytest.raises(ValueError, match='normalize'): confusion_matrix(np.eye(2), [0, 1], normalize='rows')


def test_class_report_equals_sklearn(scored):
    scores, labels = scored
    names = [f'behaviour_{i}' for i in range(7)]
    report = class_report(scores, labels, class_names=names)
    p, r, f, s = skm.precision_recall_fscore_support(labels, scores.argmax(1), labels=range(7), zero_division=0)
    assert isinstance(report, pd.DataFrame) and report.index.tolist() == names
    np.testing.assert_allclose(report[['precision', 'recall', 'f1', 'support']].to_numpy(), np.stack([p, r, f, s], 1))


def test_average_views_prob_is_the_mean_softmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 12, 5)) * 3
    softmax = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(average_views(logits), softmax.mean(1), rtol=1e-12)
    np.testing.assert_allclose(average_views(logits, mode='score'), logits.mean(1), rtol=1e-12)
    # mmaction's layout: [N*V, C] with each video's views adjacent
    np.testing.assert_allclose(average_views(logits.reshape(48, 5), views=12), softmax.mean(1), rtol=1e-12)


def test_average_views_prob_and_score_can_disagree():
    "Hand-computed: views [10, 0], [0, 3], [0, 3]; the logit mean is [3.33, 2] (class 0), the probability mean [0.365, 0.635]."
    views = np.array([[[10.0, 0.0], [0.0, 3.0], [0.0, 3.0]]])
    np.testing.assert_allclose(average_views(views, mode='score'), [[10 / 3, 2.0]])
    p0, p1 = 1 / (1 + np.exp(-10.0)), 1 / (1 + np.exp(3.0))  # softmax([10, 0])[0], softmax([0, 3])[0]
    np.testing.assert_allclose(average_views(views), [[(p0 + 2 * p1) / 3, (3 - p0 - 2 * p1) / 3]])
    np.testing.assert_allclose(average_views(views), [[0.364935, 0.635065]], atol=1e-6)
    assert predict(average_views(views)).tolist() == [1] and predict(average_views(views, mode='score')).tolist() == [0]


def test_average_views_keeps_torch_tensors():
    logits = torch.randn(6, 3)
    out = average_views(logits, views=3)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3)
    torch.testing.assert_close(out.sum(-1), torch.ones(2))


def test_average_views_rejects_bad_shapes():
    with pytest.raises(ValueError, match='dividing 10'): average_views(np.zeros((10, 5)), views=3)
    with pytest.raises(ValueError, match='dividing 10'): average_views(np.zeros((10, 5)))
    with pytest.raises(ValueError, match='views=4'): average_views(np.zeros((2, 3, 5)), views=4)
    with pytest.raises(ValueError, match="'prob' or 'score'"): average_views(np.zeros((2, 3, 5)), mode='max')


def test_evaluate_reports_both_mean_class_accuracies(scored):
    scores, labels = scored
    out = evaluate(scores, labels)
    assert set(out) == {'top1_acc', 'top5_acc', 'mean_class_accuracy', 'mean_class_accuracy_true'}
    assert out['mean_class_accuracy'] == mean_class_accuracy(scores, labels, 'union')
    assert out['mean_class_accuracy_true'] == mean_class_accuracy(scores, labels, 'true')


def test_inputs_accept_torch_and_lists_and_reject_bad_labels():
    s, l = as_scores_labels(torch.tensor([[0.1, 0.9]], requires_grad=True), torch.tensor([1]))
    assert s.dtype == np.float64 and l.tolist() == [1]
    with pytest.raises(ValueError, match='label 3 at position 1 is outside 0..2'): top_k_accuracy(np.eye(3)[:2], [0, 3])
    with pytest.raises(ValueError, match='with N = 2'): top_k_accuracy(np.eye(3)[:2], [0])
    with pytest.raises(ValueError, match='integer class ids'): top_k_accuracy(np.eye(3)[:2], [0.5, 1])
    with pytest.raises(ValueError, match='empty'): mean_class_accuracy(np.zeros((0, 3)), [])
