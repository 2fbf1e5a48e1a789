"""The kNN monitor's bounded-memory search (SPEC §2) gives the votes of the full similarity
matrix: checked against a hand-written reference (one matrix, one topk), hand-computed
cases, banks given as blocks or streamed once, and float16 banks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.knn import knn_accuracy, knn_predict, merge_nearest, nearest, vote


def reference_scores(bank, labels, queries, num_classes, k, temperature):
    """SPEC §2 written out with the whole query × bank matrix (what knn_predict did before)."""
    sim = queries @ bank.T
    top, idx = sim.topk(min(k, bank.shape[0]), dim=1)
    logits = top / temperature
    if logits.abs().max() > 80:
        logits = logits - logits[:, :1]
    scores = torch.zeros(queries.shape[0], num_classes)
    return scores.scatter_add_(1, labels[idx], logits.exp())


def clustered(n_bank: int, n_query: int, dim: int, classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    bank_labels = torch.randint(classes, (n_bank,), generator=g)
    query_labels = torch.randint(classes, (n_query,), generator=g)
    bank = F.normalize(centres[bank_labels] + 0.8 * torch.randn(n_bank, dim, generator=g), dim=1)
    queries = F.normalize(centres[query_labels] + 0.8 * torch.randn(n_query, dim, generator=g),
                          dim=1)
    return bank, bank_labels, queries, query_labels


@pytest.mark.parametrize("chunk_bytes", [4 * 7, 4 * 1000, 4 * 4096 * 3, 1 << 30])
@pytest.mark.parametrize("temperature", [0.07, 0.001])
def test_chunked_votes_equal_the_full_matrix(chunk_bytes: int, temperature: float) -> None:
    bank, labels, queries, _ = clustered(3000, 500, 32, 10)
    want = reference_scores(bank, labels, queries, 10, 20, temperature)
    got = knn_predict(bank, labels, queries, 10, k=20, temperature=temperature,
                      chunk_bytes=chunk_bytes)
    # the blocks' dot products round differently from one big matrix product (~1e-7 in cos);
    # exp(cos / T) magnifies that by 1/T
    torch.testing.assert_close(got, want, rtol=1e-7 / temperature + 1e-5, atol=1e-6)
    assert torch.equal(got.argmax(1), want.argmax(1))


def test_more_queries_than_one_block_and_a_bank_of_uneven_blocks() -> None:
    bank, labels, queries, _ = clustered(2500, 9000, 16, 5, seed=1)  # > QUERY_ROWS queries
    want = reference_scores(bank, labels, queries, 5, 7, 0.1)
    blocks = [bank[:1], bank[1:1000], bank[1000:1001], bank[1001:]]
    got = knn_predict(iter(blocks), labels, queries, 5, k=7, temperature=0.1,
                      chunk_bytes=4 * 9000 * 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_hand_computed_neighbours_and_votes() -> None:
    # bank on the unit circle at 0°, 90°, 180°; the query at 0°: cos 1, 0, -1
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    sims, idx = nearest(bank, query, 2, chunk_bytes=4)  # one bank row per block
    assert idx.tolist() == [[0, 1]] and sims.tolist() == [[1.0, 0.0]]
    scores = knn_predict(bank, labels, query, 2, k=3, temperature=1.0, chunk_bytes=4)
    e = torch.e
    torch.testing.assert_close(scores, torch.tensor([[e, 1.0 + 1 / e]]))


def test_a_float16_bank_gives_the_float32_bank_neighbours() -> None:
    bank, labels, queries, qlabels = clustered(4000, 300, 64, 10, seed=2)
    acc32 = knn_accuracy(bank, labels, queries, qlabels, 10)
    acc16 = knn_accuracy(bank.half(), labels, queries, qlabels, 10, chunk_bytes=1 << 16)
    assert abs(acc32 - acc16) <= 100.0 / 300  # at most one query flips on a rounding tie
    assert acc32 > 50  # the clusters are found at all


def test_k_larger_than_the_bank_and_an_empty_bank() -> None:
    bank, labels, queries, _ = clustered(5, 3, 8, 2)
    want = reference_scores(bank, labels, queries, 2, 50, 0.07)
    torch.testing.assert_close(knn_predict(bank, labels, queries, 2, k=50), want)
    with pytest.raises(ValueError, match="empty"):
        nearest(iter([]), queries, 3)


def test_shards_of_the_bank_merged_give_the_votes_of_the_whole_bank() -> None:
    # what ranks do: each searches its own shard (strided, as a distributed sampler splits),
    # and the (similarity, label) lists of every shard are merged
    bank, labels, queries, _ = clustered(1999, 300, 24, 7, seed=3)
    want = reference_scores(bank, labels, queries, 7, 20, 0.07)
    parts = []
    for rank in range(3):
        sims, idx = nearest(bank[rank::3], queries, 20, chunk_bytes=4 * 300 * 50)
        parts.append((sims, labels[rank::3][idx]))
    got = vote(*merge_nearest(parts, 20), 7, 0.07)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
