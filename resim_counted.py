"""The exact relative similarity loss (eq. 3 of jasper.py) in O(P log P) time and O(P) memory, P = C(m, 2).

The dense version in jasper.py compares all P x P pairs of text pairs: at the paper's global batch of m = 1024 texts
that is P = 523,776 pairs and 2.7e11 pairs of pairs, which no GPU holds. The hinge sum is linear in the pair
similarities once two counts per pair are known, and those counts come from sorting and a wavelet matrix.
jasper.resim_loss(method="counted" or "auto") calls resim_hinge_sum_counted; tests/test_losses.py checks it against
the dense version and a plain loop (values and gradients, ties and duplicates) and count_ranks_below against a loop.
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def resim_hinge_sum_counted(s_pairs: Tensor, t_pairs: Tensor, margin: float, tie_tolerance: float) -> Tensor:
    """The same sum as jasper.resim_hinge_sum_dense, from two counts per pair instead of a (P, P) matrix.
    s_pairs, t_pairs: (P,) -> scalar.

    Each active hinge, pair a above pair b in the teachers' order with s_a < s_b + margin, adds
    (s_b + margin) - s_a. Collect the terms per pair p:
        below[p] = #{a : t_a > t_p + tol and s_a < s_p + margin}   active hinges where p is the lower pair
        above[p] = #{b : t_p > t_b + tol and s_p < s_b + margin}   active hinges where p is the higher one
        sum = sum_p below[p] (s_p + margin) - above[p] s_p,   d sum / d s_p = below[p] - above[p]
    The counts are constants of the step, so autograd through the last line gives the dense gradient.

    Sorted by teacher similarity, the pairs ranked above p are a suffix [start_p, P) and those ranked
    below a prefix [0, end_p) (ties excluded by the same comparisons as the dense version). Replacing
    each student similarity by its rank r (a permutation of 0..P-1), both counts become "how many
    ranks below a limit in a prefix", which count_ranks_below answers for all 2P queries at once.
    O(P log P) time, O(P) memory. Summed in float64: the two terms are ~P^2 and their difference small.
    """
    n = s_pairs.shape[0]  # P
    order = torch.argsort(sortable_int(t_pairs.detach()))
    s_in_order = s_pairs[order]  # (P,) with its gradient, for the last line
    with torch.no_grad():
        t, s = t_pairs[order], s_in_order.detach()
        floor = t + tie_tolerance  # as in the dense version: a is above b iff t_a > t_b + tol
        start = torch.searchsorted(t, floor, right=True, out_int32=True)  # [start_p, P): the pairs above p
        end = torch.searchsorted(floor, t, out_int32=True)  # [0, end_p): the pairs below p
        by_value = torch.argsort(sortable_int(s))
        s_sorted = s[by_value]
        rank = torch.empty(n, dtype=torch.int32, device=s.device)
        rank[by_value] = torch.arange(n, dtype=torch.int32, device=s.device)
        ceiling = s_sorted + margin
        # #{a : s_a < s_p + margin} and #{b : s_b + margin <= s_p}
        fewer_than_ceiling = torch.searchsorted(s_sorted, ceiling, out_int32=True).index_select(0, rank)
        at_most = torch.searchsorted(ceiling, s_sorted, right=True, out_int32=True).index_select(0, rank)
        counts = count_ranks_below(rank, torch.cat([start, end]), torch.cat([fewer_than_ceiling, at_most]))
        below = fewer_than_ceiling - counts[:n]  # the suffix: all ranks below the limit minus the prefix's
        above = end - counts[n:]  # the prefix's ranks not below the limit
    total = ((below - above).double() * s_in_order.double()).sum() + margin * below.sum().double()
    return total.to(s_pairs.dtype)


def sortable_int(x: Tensor) -> Tensor:
    """Integers that sort like the floats x: their IEEE 754 bits, with the magnitude bits of negative
    numbers flipped. Integer sorts are radix sorts, several times faster than float sorts on a CPU."""
    bits = x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])
    return bits ^ ((bits >> (8 * x.element_size() - 1)) & torch.iinfo(bits.dtype).max)


def count_ranks_below(ranks: Tensor, prefix: Tensor, limit: Tensor) -> Tensor:
    """For each query q: #{b < prefix[q] : ranks[b] < limit[q]}.

    ranks: (n,) a permutation of 0..n-1; prefix, limit: (Q,) in [0, n] -> (Q,) counts (ranks' dtype).
    A wavelet matrix, queried for all q at once: one pass per bit of the ranks, from the highest.
    Each pass reorders the ranks stably by that bit (zeros first, then ones). The ranks that agree
    with a query's limit in the bits above stay together in one block (a node) whose start depends
    on those bits alone, so each query follows only its end `hi` into the half that shares its
    limit's bit; where the limit has a 1, the node's ranks before `hi` with a 0 there are below the
    limit and counted. O((n + Q) log n) time, O(n + Q) memory; int32 halves the memory traffic.
    """
    n = ranks.shape[0]
    boundaries = torch.arange(n + 1, dtype=ranks.dtype, device=ranks.device)
    hi, count = prefix.clone(), torch.zeros_like(prefix)
    node_start = boundaries[:1]  # one node: the whole sequence
    for bit in reversed(range(max(1, n.bit_length()))):
        ones = (ranks >> bit) & 1
        zeros_before = F.pad(torch.cumsum(1 - ones, 0, dtype=ranks.dtype), (1, 0))  # (n+1,) among the first k
        n_zeros = zeros_before[-1]
        # (2 * (n+1),): where boundary k lands among the zeros, then where it lands among the ones
        follow = torch.cat([zeros_before, n_zeros + boundaries - zeros_before])
        # (index_select takes int32 indices as they are; x[i] would copy them to int64)
        start_zeros = zeros_before.index_select(0, node_start)  # (nodes,)
        lo_zeros = start_zeros.index_select(0, limit >> (bit + 1))  # (Q,)
        hi_zeros = zeros_before.index_select(0, hi)  # (Q,)
        limit_bit = (limit >> bit) & 1
        count += limit_bit * (hi_zeros - lo_zeros)
        hi = follow.index_select(0, limit_bit * (n + 1) + hi)
        # node (prefix) splits into (prefix, 0) among the zeros and (prefix, 1) among the ones
        node_start = torch.stack([start_zeros, n_zeros + node_start - start_zeros], dim=1).flatten()
        destination = follow.index_select(0, ones * (n + 1) + boundaries[:-1])
        ranks = torch.empty_like(ranks).scatter_(0, destination.long(), ranks)
    return count
