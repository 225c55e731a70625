"""Packed THD micro-batches: offsets, CP padding, labels, loss masks, positions, BSHD form."""

import numpy as np
import pytest
import torch

from megatron_longpo.data.schema import Sample, Seg, Segment
from megatron_longpo.data.packing import pack, pad_multiple_for

PAD = 99


def seg(t, tokens):
    return Segment(t, np.asarray(tokens, dtype=np.uint16))


# pair: prompt [1,2,3], chosen [4,5] (5 = end of turn), rejected [6], tail [7]
PAIR = Sample(index=10, kind="pair", segments=(
    seg(Seg.PROMPT, [1, 2, 3]), seg(Seg.CHOSEN, [4, 5]), seg(Seg.REJECTED, [6]), seg(Seg.TAIL, [7])))
# longpo, 2 turns
LONGPO = Sample(index=3, kind="longpo", segments=(
    seg(Seg.LONG_PROMPT, [11, 12, 13, 14]), seg(Seg.CHOSEN, [21, 22]), seg(Seg.REJECTED, [31]),
    seg(Seg.TURN, [15, 16]), seg(Seg.CHOSEN, [23]), seg(Seg.REJECTED, [32, 33]), seg(Seg.TAIL, [17]),
    seg(Seg.SHORT_PROMPT, [41, 42]), seg(Seg.SHORT_PROMPT, [43])))


def test_sample_assembly():
    [c] = PAIR.sequences("chosen")
    assert c.tokens.tolist() == [1, 2, 3, 4, 5, 7] and c.loss_mask.tolist() == [0, 0, 0, 1, 1, 0]
    assert PAIR.sequences("ref_rejected")[0].tokens.tolist() == [1, 2, 3, 6, 7]
    [lc] = LONGPO.sequences("chosen")
    assert lc.tokens.tolist() == [11, 12, 13, 14, 21, 22, 15, 16, 23, 17]
    assert lc.loss_mask.tolist() == [0, 0, 0, 0, 1, 1, 0, 0, 1, 0]
    [lr] = LONGPO.sequences("rejected")
    assert lr.tokens.tolist() == [11, 12, 13, 14, 31, 15, 16, 32, 33, 17]
    refs = LONGPO.sequences("ref_rejected")
    assert [r.tokens.tolist() for r in refs] == [[41, 42, 31, 17], [43, 32, 33, 17]]
    assert [r.loss_mask.tolist() for r in refs] == [[0, 0, 1, 0], [0, 1, 1, 0]]


def test_pad_multiple_for():
    assert pad_multiple_for(1) == 1
    assert pad_multiple_for(2) == 4 and pad_multiple_for(4, tp=2) == 8
    assert pad_multiple_for(4, tp=2, sequence_parallel=True) == 16
    assert pad_multiple_for(1, tp=4, sequence_parallel=True) == 4
    with pytest.raises(ValueError, match="cp must be a positive integer"):
        pad_multiple_for(0)


def test_pack_offsets_labels_masks_positions():
    b = pack([PAIR, LONGPO], ["chosen", "ref_chosen"], pad_multiple=4, pad_token_id=PAD)
    # PAIR chosen (6), PAIR ref_chosen (6), LONGPO chosen (10), LONGPO ref_chosen turn 1 (5) and turn 2 (3)
    assert b.seq_role == ["chosen", "ref_chosen", "chosen", "ref_chosen", "ref_chosen"]
    assert b.seq_sample == [0, 0, 1, 1, 1] and b.sample_ids == [10, 3]
    assert b.cu_seqlens.tolist() == [0, 6, 12, 22, 27, 30] and b.cu_seqlens.dtype == torch.int32
    assert b.cu_seqlens_padded.tolist() == [0, 8, 16, 28, 36, 40] and b.cu_seqlens_padded.dtype == torch.int32
    assert b.max_seqlen == 12
    assert b.tokens.shape == b.labels.shape == b.loss_mask.shape == b.position_ids.shape == (1, 40)
    assert b.tokens.dtype == torch.long and b.loss_mask.dtype == torch.float32
    assert all(int(d) % 4 == 0 for d in b.cu_seqlens_padded[1:] - b.cu_seqlens_padded[:-1])
    tok, lab, mask, pos = b.tokens[0].tolist(), b.labels[0].tolist(), b.loss_mask[0].tolist(), b.position_ids[0].tolist()
    # sequence 2 (LONGPO chosen) at [16, 28): 10 tokens then 2 pads
    assert tok[16:28] == [11, 12, 13, 14, 21, 22, 15, 16, 23, 17, PAD, PAD]
    assert lab[16:28] == [12, 13, 14, 21, 22, 15, 16, 23, 17, 0, 0, 0]
    assert mask[16:28] == [0, 0, 0, 1, 1, 0, 0, 1, 0, 0, 0, 0]
    assert pos[16:28] == list(range(12))
    # never a label across a sequence boundary; padding carries nothing
    for i in range(b.num_sequences):
        s = slice(int(b.cu_seqlens_padded[i]), int(b.cu_seqlens_padded[i + 1]))  # sequence i with its padding
        real_end = int(b.cu_seqlens_padded[i]) + int(b.cu_seqlens[i + 1] - b.cu_seqlens[i])
        assert lab[real_end - 1] == 0 and mask[real_end - 1] == 0
        assert all(t == PAD for t in tok[real_end : s.stop]) and not any(mask[real_end : s.stop])
        assert pos[s.start] == 0
    # scored labels are exactly the response tokens of each sequence
    scored = [lab[t] for t in range(40) if mask[t]]
    assert scored == [4, 5, 4, 5, 21, 22, 23, 21, 22, 23]


def test_to_padded_matches_packed():
    b = pack([PAIR, LONGPO], ["chosen", "rejected"], pad_multiple=8, pad_token_id=PAD)
    p = b.to_padded()
    n = b.num_sequences
    lengths = (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).tolist()
    assert p.tokens.shape == (n, max(lengths)) and p.lengths.tolist() == lengths
    assert p.seq_role == b.seq_role and p.seq_sample == b.seq_sample and p.sample_ids == b.sample_ids
    for i in range(n):
        start, length = int(b.cu_seqlens_padded[i]), lengths[i]
        assert torch.equal(p.tokens[i, :length], b.tokens[0, start : start + length])
        assert torch.equal(p.labels[i, :length], b.labels[0, start : start + length])
        assert torch.equal(p.loss_mask[i, :length], b.loss_mask[0, start : start + length])
        assert torch.equal(p.position_ids[i], torch.arange(p.tokens.shape[1]))
        assert (p.tokens[i, length:] == PAD).all() and not p.loss_mask[i, length:].any()
    # the same scored (label, position) pairs in both layouts
    assert p.loss_mask.sum() == b.loss_mask.sum() == 2 + 1 + 3 + 3


def test_pack_errors():
    with pytest.raises(ValueError, match=r"'pair'.*long_chosen|long_chosen.*'pair'"):
        pack([PAIR], ["long_chosen"])
    with pytest.raises(ValueError, match="at least one sample"):
        pack([], ["chosen"])
    with pytest.raises(ValueError, match="pad_multiple"):
        pack([PAIR], ["chosen"], pad_multiple=0)
