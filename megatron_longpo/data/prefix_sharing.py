"""Prefix-shared packing: a preference pair as [shared prefix | chosen branch | rejected branch].

The chosen and rejected sequences of a pair share a long prefix (LongPO: the document and the
first question; DPO: the prompt; SoLoPO: the short context) and differ in their responses.
Here the prefix is stored and computed once; each branch continues it:

    trunk   = the shared prefix, causal, positions 0..k-1, no scored tokens
    branch  = the rest of one sequence, positions k.., attends to the whole trunk and causally
              to itself, never to the other branch

k = min(common tokens - 1, first scored label position): the last trunk token's label is still
common to both sides, and every scored token lies in a branch, so the per-sequence log-prob sums
are exactly those of the two separate sequences. Sequences that have no partner (SoLoPO's
long_chosen, SFT) are trunks with no branches and keep their own scored tokens.

Whole-sequence statistics (`sequence_roles`, LongPO's NLL over the chosen long sequence): every
position of such a sequence that has a label adds to it (`*_whole`), each exactly once: the shared
trunk's positions 0..k-1 (the last one predicts the branch's first token) count for the one role of
the pair that asks for it, never for its partner; its branch adds positions k..len-2. A pair whose
two roles both ask for it is not shared (the trunk would have to count twice).

Row layout before the context-parallel split (global token ids):

    [trunk 0 | pad][trunk 1 | pad] ... | branch 0 branch 1 ... | pad

each trunk padded to `pad_multiple` (2*CP: TE's zig-zag CP split of THD sequences), the branch
section padded to a multiple of CP. CP rank r holds the zig-zag halves of every trunk (as for
plain THD) followed by the r-th contiguous slice of the branch section. A branch may be cut
between ranks; each rank's piece of it ("part") attends to the trunk and to the branch tokens up
to its own last position, gathered over the CP group (models/prefix_attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence as Seq

import numpy as np
import torch

from megatron_longpo.data.cp_split import zigzag_indices
from megatron_longpo.data.format import Sample, Sequence

# role pairs whose sequences share a prefix, in the order they are looked for
SHARED_PAIRS = (("chosen", "rejected"), ("long_chosen", "long_rejected"))


def shared_prefix_length(a: Sequence, b: Sequence) -> int:
    """Tokens the two sequences can share: common tokens minus one (the last shared token's label
    must be common too), and none past the first scored label (scored tokens stay in branches)."""
    n = min(len(a), len(b))
    diff = np.nonzero(a.tokens[:n] != b.tokens[:n])[0]
    common = int(diff[0]) if len(diff) else n
    first_scored = []
    for s in (a, b):
        nz = np.nonzero(s.loss_mask[1:])[0]  # label position t is scored iff loss_mask[t + 1]
        first_scored.append(int(nz[0]) if len(nz) else len(s) - 1)
    return max(0, min(common - 1, *first_scored))


@dataclass
class SharedRow:
    """The global row. Token arrays are numpy; `t_*` for the trunk section, `b_*` for branches."""

    t_tokens: np.ndarray
    t_labels: np.ndarray
    t_mask: np.ndarray
    t_pos: np.ndarray
    t_seq: np.ndarray  # virtual sequence whose sum a scored token adds to, -1 for none
    t_valid: np.ndarray
    t_trunk: np.ndarray  # trunk number of each token (padding too)
    t_whole: np.ndarray  # sequence whose whole-sequence sum the token's log-prob adds to, -1 for none
    cu: np.ndarray  # [n_trunks+1] real trunk lengths
    cu_pad: np.ndarray  # [n_trunks+1] trunk offsets in the section
    b_tokens: np.ndarray
    b_labels: np.ndarray
    b_mask: np.ndarray
    b_pos: np.ndarray
    b_seq: np.ndarray
    b_valid: np.ndarray
    b_trunk: np.ndarray  # parent trunk, -1 on padding
    b_branch: np.ndarray  # branch number, -1 on padding
    b_whole: np.ndarray
    seq_role: list[str]
    seq_sample: list[int]
    sample_ids: list[int]
    cp_size: int
    real_tokens: int  # tokens the model runs on (trunks + branches, no padding)
    unshared_tokens: int  # tokens the same sequences take when packed separately
    sequence_roles: tuple[str, ...] = ()  # roles with a whole-sequence statistic

    @property
    def num_trunk_tokens(self) -> int:
        return len(self.t_tokens)

    @property
    def num_branch_tokens(self) -> int:
        return len(self.b_tokens)

    @property
    def max_trunk_seqlen(self) -> int:
        return int((self.cu_pad[1:] - self.cu_pad[:-1]).max())

    @property
    def trunk_scored(self) -> bool:
        """A trunk token is scored (SoLoPO's long_chosen, SFT; a whole-sequence statistic such as
        LongPO's NLL over the chosen long sequence): the last layer must compute the trunk queries;
        otherwise it skips them (models/prefix_attention.py)."""
        return bool(self.t_mask.any() or (self.t_whole >= 0).any())

    @property
    def scored_tokens(self) -> int:
        """Positions any statistic reads (the output layer's work): scored or in a whole sequence."""
        return int(((self.t_mask > 0) | (self.t_whole >= 0)).sum() + ((self.b_mask > 0) | (self.b_whole >= 0)).sum())


def _labels(s: Sequence, lo: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scored flags of positions lo..len-1 of s (the last position has no label)."""
    labels = np.zeros(len(s) - lo, dtype=np.int64)
    mask = np.zeros(len(s) - lo, dtype=np.float32)
    labels[:-1] = s.tokens[lo + 1:]
    mask[:-1] = s.loss_mask[lo + 1:]
    return labels, mask


def _padding_section(n: int, pad_token_id: int, trunk: int):
    """n padding tokens: (tokens, labels, scored, positions, sequence ids, valid, trunk ids)."""
    return (np.full(n, pad_token_id, np.int64), np.zeros(n, np.int64), np.zeros(n, np.float32),
            np.zeros(n, np.int64), np.full(n, -1, np.int64), np.zeros(n, bool), np.full(n, trunk, np.int64))


def build_shared_row(samples: Seq[Sample], roles: Seq[str], cp_size: int = 1, pad_multiple: int = 1,
                     pad_token_id: int = 0, min_shared: int = 1, sequence_roles: Seq[str] = ()) -> SharedRow:
    """Lay the `roles` sequences of `samples` out with shared prefixes (see the module docstring).
    A pair shares when both roles are asked for, each has one sequence, they have at least
    `min_shared` shareable tokens and not both are in `sequence_roles`; otherwise its sequences
    are trunks of their own. `sequence_roles`: roles whose whole-sequence statistic is wanted."""
    if not samples or not roles:
        raise ValueError("build_shared_row needs samples and roles")
    sequence_roles = tuple(sequence_roles)
    trunks: list[tuple] = []  # (tokens, labels, mask, seq_of_scored, seq_of_whole)
    branches: list[tuple] = []  # (parent, start_pos, tokens, labels, mask, seq, whole)
    seq_role: list[str] = []
    seq_sample: list[int] = []
    unshared = 0

    def new_seq(role, b):
        seq_role.append(role)
        seq_sample.append(b)
        return len(seq_role) - 1

    for b, sample in enumerate(samples):
        seqs = {role: sample.sequences(role) for role in roles}
        done: set[str] = set()
        for role in roles:
            if role in done:
                continue
            partner = next((p[1] for p in SHARED_PAIRS if p[0] == role and p[1] in seqs), None)
            whole_pair = partner and role in sequence_roles and partner in sequence_roles
            if partner and not whole_pair and len(seqs[role]) == 1 and len(seqs[partner]) == 1:
                a, r = seqs[role][0], seqs[partner][0]
                k = shared_prefix_length(a, r)
                if k >= min_shared:
                    unshared += len(a) + len(r)
                    parent = len(trunks)
                    ids = {rl: new_seq(rl, b) for rl in (role, partner)}
                    owner = next((ids[rl] for rl in (role, partner) if rl in sequence_roles), -1)
                    trunks.append((a.tokens[:k], a.tokens[1:k + 1], np.zeros(k, np.float32), -1, owner))
                    for rl, s in ((role, a), (partner, r)):
                        labels, mask = _labels(s, k)
                        branches.append((parent, k, s.tokens[k:], labels, mask, ids[rl],
                                         ids[rl] if rl in sequence_roles else -1))
                    done.update((role, partner))
                    continue
            for s in seqs[role]:
                if len(s) == 0:
                    raise ValueError(f"sample {sample.index} role {role!r} has an empty sequence")
                unshared += len(s)
                labels, mask = _labels(s, 0)
                seq = new_seq(role, b)
                trunks.append((s.tokens, labels, mask, seq, seq if role in sequence_roles else -1))
            done.add(role)

    lengths = np.array([len(t[0]) for t in trunks], dtype=np.int64)
    padded = -(-lengths // pad_multiple) * pad_multiple
    cu = np.concatenate([[0], np.cumsum(lengths)])
    cu_pad = np.concatenate([[0], np.cumsum(padded)])
    T = int(cu_pad[-1])
    t_tokens, t_labels, t_mask, t_pos, t_seq, t_valid, t_trunk = _padding_section(T, pad_token_id, trunk=0)
    t_whole = np.full(T, -1, np.int64)
    for i, (tok, lab, msk, seq, whole) in enumerate(trunks):
        lo, n, pn = int(cu_pad[i]), len(tok), int(padded[i])
        t_tokens[lo:lo + n], t_labels[lo:lo + n], t_mask[lo:lo + n] = tok, lab, msk
        t_pos[lo:lo + pn] = np.arange(pn)
        t_seq[lo:lo + n] = np.where(msk > 0, seq, -1)
        # a shared trunk's every position has a label (the last one: the branches' common first token);
        # a sequence of its own has none at its last position
        t_whole[lo:lo + (n if seq < 0 else n - 1)] = whole
        t_valid[lo:lo + n] = True
        t_trunk[lo:lo + pn] = i
    nb = sum(len(br[2]) for br in branches)
    B = -(-nb // cp_size) * cp_size
    b_tokens, b_labels, b_mask, b_pos, b_seq, b_valid, b_trunk = _padding_section(B, pad_token_id, trunk=-1)
    b_branch = np.full(B, -1, np.int64)
    b_whole = np.full(B, -1, np.int64)
    o = 0
    for j, (parent, start, tok, lab, msk, seq, whole) in enumerate(branches):
        n = len(tok)
        b_whole[o:o + n - 1] = whole  # the branch's last token has no label
        b_tokens[o:o + n], b_labels[o:o + n], b_mask[o:o + n] = tok, lab, msk
        b_pos[o:o + n] = start + np.arange(n)
        b_seq[o:o + n] = np.where(msk > 0, seq, -1)
        b_valid[o:o + n] = True
        b_trunk[o:o + n] = parent
        b_branch[o:o + n] = j
        o += n
    return SharedRow(t_tokens, t_labels, t_mask, t_pos, t_seq, t_valid, t_trunk, t_whole, cu.astype(np.int32),
                     cu_pad.astype(np.int32), b_tokens, b_labels, b_mask, b_pos, b_seq, b_valid, b_trunk,
                     b_branch, b_whole, seq_role, seq_sample, [int(s.index) for s in samples], cp_size,
                     int(lengths.sum()) + nb, unshared, sequence_roles)


def flops_spans(row: SharedRow, last_layer_trunk: bool | None = None) -> list[tuple]:
    """(tokens, equivalent sequence length[, skips the last layer's attention]) items for
    metrics.batch_model_flops: a trunk is a causal sequence; a branch of n tokens starting at
    position k attends on average to k + n/2 keys, i.e. a causal sequence of length 2k + n.
    Trunk queries skip the last layer's attention when no trunk token is scored
    (models/prefix_attention.py); last_layer_trunk=True counts them anyway (the skip turned off)."""
    skip = not (row.trunk_scored if last_layer_trunk is None else last_layer_trunk)
    spans = [(int(n), float(n), skip) for n in (row.cu[1:] - row.cu[:-1])]
    for j in np.unique(row.b_branch[row.b_branch >= 0]):
        sel = row.b_branch == j
        n, k = int(sel.sum()), int(row.b_pos[sel][0])
        spans.append((n, float(2 * k + n), False))
    return spans


@dataclass
class RankView:
    """What one CP rank feeds the model: its tokens ([trunk part | branch part]) and, for the
    attention, the metadata of every rank's tokens in all-gather order."""

    tokens: torch.Tensor  # [t] int64
    labels: torch.Tensor
    loss_mask: torch.Tensor  # float32
    position_ids: torch.Tensor
    seq_index: torch.Tensor  # virtual sequence of each scored token, -1 elsewhere
    whole_index: torch.Tensor  # sequence of each token in a whole-sequence statistic, -1 elsewhere
    n_trunk: int  # the first n_trunk local tokens are trunk tokens
    meta: dict[str, torch.Tensor]  # over the gathered [cp * t] tokens: trunk, branch, pos, valid
    parts: list[tuple[int, int, torch.Tensor, bool]]  # (lo, hi, kv index into the gathered tokens,
    # True when the keys are positions 0..n-1 in order and the queries the last ones: the mask is
    # then plain lower-right causal and needs no tensor)


def rank_view(row: SharedRow, cp_rank: int = 0) -> RankView:
    cp = row.cp_size
    per_rank_b = row.num_branch_tokens // cp
    sections = []
    for r in range(cp):
        ti = zigzag_indices(row.cu_pad, cp, r)
        bi = np.arange(r * per_rank_b, (r + 1) * per_rank_b)
        sections.append((ti, bi))

    def gather(t_arr, b_arr):
        return np.concatenate([np.concatenate([t_arr[ti], b_arr[bi]]) for ti, bi in sections])

    t_local = len(sections[0][0]) + per_rank_b
    g_trunk = gather(row.t_trunk, row.b_trunk)
    g_branch = gather(np.full(row.num_trunk_tokens, -1), row.b_branch)
    g_pos = gather(row.t_pos, row.b_pos)
    g_valid = gather(row.t_valid, row.b_valid)
    mine = slice(cp_rank * t_local, (cp_rank + 1) * t_local)
    ti, bi = sections[cp_rank]
    n_trunk = len(ti)
    # the branch parts of this rank and the gathered tokens each attends to
    parts = []
    lb = g_branch[mine][n_trunk:]
    lp = g_pos[mine][n_trunk:]
    j = 0
    while j < len(lb):
        if lb[j] < 0:
            j += 1
            continue
        k = j
        while k < len(lb) and lb[k] == lb[j]:
            k += 1
        br = lb[j]
        parent = row.b_trunk[row.b_branch == br][0]
        last = lp[k - 1]
        kv = np.nonzero(((g_branch == -1) & (g_trunk == parent) & g_valid)
                        | ((g_branch == br) & (g_pos <= last)))[0]
        kv = kv[np.argsort(g_pos[kv], kind="stable")]  # keys in position order: 0 .. last
        # then the piece's queries are the last (k - j) keys' positions: lower-right causal
        tail = bool((g_pos[kv] == np.arange(len(kv))).all() and lp[j] == last - (k - j - 1))
        parts.append((n_trunk + j, n_trunk + k, torch.from_numpy(kv), tail))
        j = k

    def local(t_arr, b_arr):
        return torch.from_numpy(np.concatenate([t_arr[ti], b_arr[bi]]))

    return RankView(
        tokens=local(row.t_tokens, row.b_tokens), labels=local(row.t_labels, row.b_labels),
        loss_mask=local(row.t_mask, row.b_mask), position_ids=local(row.t_pos, row.b_pos),
        seq_index=local(row.t_seq, row.b_seq), whole_index=local(row.t_whole, row.b_whole), n_trunk=n_trunk,
        meta={"trunk": torch.from_numpy(g_trunk), "branch": torch.from_numpy(g_branch),
              "pos": torch.from_numpy(g_pos), "valid": torch.from_numpy(g_valid)},
        parts=parts,
    )
