"""The helpers the embedded warm starts and task demos share: the padded supervised batch, the greedy metrics."""

import torch

from rlsd.experiments.task import greedy_metrics
from rlsd.experiments.warmstart import labelled_batch


def test_labelled_batch_right_pads_ids_mask_and_labels():
    batch = labelled_batch([([5, 6, 7], [-100, 6, 7]), ([8], [8])], pad_token_id=0)
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 0, 0]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([[-100, 6, 7], [8, -100, -100]]))
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["attention_mask"].dtype == torch.long


def test_greedy_metrics_pass_leakage_length_and_outcomes():
    def tokenizer(text):
        return {"input_ids": list(text)}  # one token a character

    metrics = greedy_metrics(["ab", "[ref 3] c", "abcd", "x"], [1.0, 0.0, 1.0, 1.0], tokenizer)
    assert metrics == {"pass_at_1": 0.75, "leakage_rate": 0.25, "mean_length": 4, "correct": "1011"}
    assert list(metrics) == ["pass_at_1", "leakage_rate", "mean_length", "correct"]  # the metrics rows' order
