"""kNN at ImageNet size: a 1,281,167 × 2048 bank searched in bounded memory."""

from __future__ import annotations

from .conftest import measure

IMAGENET = 1_281_167


def test_knn_over_an_imagenet_sized_bank_stays_within_its_chunk() -> None:
    # The bank (1.28M × 2048, float16: 5.2 GB whole) is streamed in blocks of 32,768 rows: one
    # random block, its columns rolled by the block's number (distinct directions, cheaper than
    # drawing 2.6G numbers); the queries are copies of known bank rows, so their nearest
    # neighbour is known. With 256 MiB chunks the search may hold a few chunks and one block
    # (128 MiB in float16), never the bank nor the 64 × 1.28M similarity matrix at once.
    r = measure(f"""
        import torch.nn.functional as F
        from pretrain.knn import nearest
        N, D, B = {IMAGENET}, 2048, 32768
        g = torch.Generator().manual_seed(0)
        pool = F.normalize(torch.randn(B, D, generator=g), dim=1).half()
        def block(j):
            return pool[:min(B, N - j * B)].roll(j, dims=1)
        picks = [(0, 0), (7, 123), (20, 32767), ((N - 1) // B, (N - 1) % B)]
        queries = torch.stack([block(j)[r].float() for j, r in picks])
        queries = queries.repeat(16, 1)  # 64 queries
        base()
        t = time.perf_counter()
        sims, idx = nearest((block(j) for j in range((N + B - 1) // B)), queries, 20,
                            chunk_bytes=256 << 20)
        done(seconds=time.perf_counter() - t, top=idx[:4, 0].tolist(),
             want=[j * B + r for j, r in picks], top_sim=sims[:4, 0].tolist(),
             shape=list(idx.shape))
        """)
    assert r["top"] == r["want"]
    assert all(s > 0.999 for s in r["top_sim"])
    assert r["shape"] == [64, 20]
    # whole bank in float16: 5,004 MiB; the chunks and a block: well under 1 GiB
    assert r["peak_mib"] - r["base_mib"] < 1024, r


def test_many_queries_against_a_large_bank_are_bounded_by_the_chunk() -> None:
    # 50,000 queries (ImageNet's validation set) × 1.28M bank rows would be a 239 GiB matrix in
    # one go; ImageNet's 50,000 queries against a smaller bank, at a small feature size, show
    # the query side bounded too (a one-go matrix would be 7.5 GiB).
    r = measure("""
        import torch.nn.functional as F
        from pretrain.knn import knn_predict
        N, Q, D = 40_000, 50_000, 4
        g = torch.Generator().manual_seed(0)
        bank = F.normalize(torch.randn(N, D, generator=g), dim=1)
        labels = torch.randint(1000, (N,), generator=g)
        queries = bank[:Q].clone()
        base()
        scores = knn_predict(bank, labels, queries, 1000, k=20, chunk_bytes=64 << 20)
        hit = (scores.argmax(1) == labels[:Q]).float().mean().item()
        done(hit=hit)
        """)
    # one full 50,000 × 40,000 float32 matrix would be 7.5 GiB
    assert r["peak_mib"] - r["base_mib"] < 1024, r
    assert r["hit"] > 0.01  # the votes are counted at all (each query is its own neighbour)
