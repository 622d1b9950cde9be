"""Beam search and answer ranking over the KV-cached decoder, against greedy decoding, full recomputation and
exhaustive search (fixed random weights of the tiny model)."""
import itertools

import pytest
import torch

from mplug_ds.data.tokenizer import CLS_ID, SEP_ID
from mplug_ds.models.generation import BeamConfig, beam_search, greedy_decode, length_penalty, rank_answers
from mplug_ds.models.mplug import build_model


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    d = model.decoder
    with torch.no_grad():  # peaked, memory-dependent predictions and a competitive [SEP]: rows end at different steps
        d.bert.embeddings.word_embeddings.weight.mul_(20)  # tied to the LM head's output weights
        for layer in d.bert.encoder.layer:
            layer.crossattention.self.value.weight.mul_(10)
            layer.crossattention.output.dense.weight.mul_(10)
        d.cls.predictions.bias[SEP_ID] += 8.0
    return d


def _memory(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    memory = torch.randn(n, 9, 64, generator=g)
    mask = torch.ones(n, 9, dtype=torch.long)
    mask[1, 5:] = 0
    return memory, mask


def _strip(row):
    return row[:row.index(SEP_ID) + 1] if SEP_ID in row else row


def test_one_beam_equals_greedy_decoding(decoder):
    memory, mask = _memory(8)
    prompt = torch.full((8, 1), CLS_ID)
    greedy = [_strip(r[1:]) for r in greedy_decode(decoder, memory, mask, prompt, 12, SEP_ID).tolist()]
    beam = beam_search(decoder, memory, mask, prompt, BeamConfig(num_beams=1, min_length=0, max_length=12), SEP_ID)
    assert beam.tokens == greedy
    lengths = {len(g) for g in greedy}
    assert len(lengths) > 1 and any(g[-1] == SEP_ID for g in greedy)  # the cases exercise early ends


@pytest.mark.parametrize("cfg", [
    BeamConfig(num_beams=3, min_length=2, max_length=10),
    BeamConfig(num_beams=4, min_length=1, max_length=8, early_stop=False, length_penalty=1.0, no_repeat_ngram=2)])
def test_kv_cached_beam_search_equals_recomputing_the_prefix(decoder, cfg):
    memory, mask = _memory(5, seed=2)
    prompt = torch.full((5, 1), CLS_ID)
    cached = beam_search(decoder, memory, mask, prompt, cfg, SEP_ID, use_cache=True)
    full = beam_search(decoder, memory, mask, prompt, cfg, SEP_ID, use_cache=False)
    assert cached.tokens == full.tokens
    assert torch.allclose(cached.scores, full.scores, atol=1e-5)
    assert all(len(t) >= cfg.min_length + 1 or t[-1] != SEP_ID for t in cached.tokens)
    if cfg.no_repeat_ngram:
        for seq in cached.tokens:
            pairs = list(zip([CLS_ID] + seq, seq))
            assert len(pairs) == len(set(pairs))


def _sequence_logprob(decoder, memory, mask, tokens):
    ids = torch.tensor([[CLS_ID] + tokens])
    logp = decoder(ids, torch.ones_like(ids), memory, mask)[0, :-1].float()
    lo, hi = 100, 104
    logp[:, :lo] = float("-inf")
    logp[:, hi:] = float("-inf")
    logp = logp.log_softmax(-1)
    return sum(logp[i, t].item() for i, t in enumerate(tokens))


def test_wide_beam_finds_the_exhaustive_best_with_length_penalty(decoder):
    """Vocabulary of four ids ([UNK], [CLS], [SEP], [MASK]), three steps: 4 + 3·4 + 9·4 hypotheses in all."""
    memory, mask = _memory(2, seed=3)
    cfg = BeamConfig(num_beams=27, min_length=1, max_length=3, early_stop=False, length_penalty=1.0)
    out = beam_search(decoder, memory, mask, torch.full((2, 1), CLS_ID), cfg, SEP_ID, token_range=(100, 104))
    others = [100, 101, 103]
    for i in range(2):
        candidates = []
        for n in (1, 2):  # n ordinary tokens then [SEP]
            candidates += [list(p) + [SEP_ID] for p in itertools.product(others, repeat=n)]
        candidates += [list(p) for p in itertools.product(others, repeat=3)]  # unfinished at max_length
        scored = [(_sequence_logprob(decoder, memory[i:i + 1], mask[i:i + 1], c) / length_penalty(len(c), 1.0), c)
                  for c in candidates]
        best_score, best = max(scored)
        assert out.tokens[i] == best
        assert out.scores[i].item() == pytest.approx(best_score, abs=1e-4)


def test_answer_ranking_is_first_token_top_k_then_sequence_log_probability(decoder):
    from mplug_ds.data.collate import tokenize

    memory, mask = _memory(4, seed=4)
    answers = ["yes", "no", "two", "red circle", "blue", "on the left", "3"]
    ids, amask = tokenize([f"{a} [SEP]" for a in answers], 10)
    full = torch.stack([torch.tensor([-decoder.token_nll(ids[j:j + 1], amask[j:j + 1], memory[i:i + 1],
                                                          mask[i:i + 1])[0].sum().item() for j in range(len(answers))])
                        for i in range(4)])
    index, score = rank_answers(decoder, memory, mask, ids, amask, k=len(answers))
    assert index.tolist() == full.argmax(dim=1).tolist()
    assert torch.allclose(score, full.max(dim=1).values, atol=1e-4)
    first = decoder(torch.full((4, 1), CLS_ID), torch.ones(4, 1, dtype=torch.long), memory, mask)[:, 0]
    index_k1, _ = rank_answers(decoder, memory, mask, ids, amask, k=1)
    assert index_k1.tolist() == first[:, ids[:, 1]].argmax(dim=1).tolist()
